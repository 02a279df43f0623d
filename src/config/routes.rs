//! The routes: the main one (`fhir_prefix`, `public_base_url`, `pre`, `post`, `policy`) and
//! each `routes[]` entry, with their module chains and role policies.

use super::{Errors, GatewayConfig};
use crate::auth::policy::{role_by_name, RolePolicy};
use crate::upstream::BaseUrl;
use fhir_gateway_modules::builtin::Registry;
use fhir_gateway_modules::processor::{PostProcess, PreProcess};
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;

/// One module of a chain: its registered name and its settings.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    pub name: String,
    #[serde(default)]
    pub settings: serde_yaml::Value,
}

impl ModuleConfig {
    pub fn settings_json(&self) -> Result<serde_json::Value, String> {
        serde_json::to_value(&self.settings).map_err(|e| e.to_string())
    }
}

/// Which application roles may read and which may write on a route.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct RolePolicyConfig {
    pub read: Vec<String>,
    pub write: Vec<String>,
}

impl Default for RolePolicyConfig {
    fn default() -> Self {
        RolePolicyConfig {
            read: vec!["Reader".into(), "Administrator".into()],
            write: vec!["Writer".into(), "Administrator".into()],
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub prefix: String,
    /// Public base of this route; default derived like the main one.
    #[serde(default)]
    pub public_base_url: Option<String>,
    #[serde(default)]
    pub pre: Vec<ModuleConfig>,
    #[serde(default)]
    pub post: Vec<ModuleConfig>,
    /// Candidate post modules, evaluated next to `post` and never enforced.
    #[serde(default)]
    pub shadow: Vec<ModuleConfig>,
    #[serde(default)]
    pub policy: RolePolicyConfig,
}

/// A route as validation built it: the runtime (`gateway::Route`) takes it over, so no module
/// is built and no URL or role parsed a second time.
pub struct BuiltRoute {
    pub prefix: String,
    /// The configured public base (`None`: derived per request).
    pub public_base: Option<BaseUrl>,
    pub pre: Vec<Arc<dyn PreProcess>>,
    pub post: Vec<Arc<dyn PostProcess>>,
    pub shadow: Vec<Arc<dyn PostProcess>>,
    pub policy: RolePolicy,
}

impl fmt::Debug for BuiltRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pre: Vec<&str> = self.pre.iter().map(|m| m.name()).collect();
        let post: Vec<&str> = self.post.iter().map(|m| m.name()).collect();
        let shadow: Vec<&str> = self.shadow.iter().map(|m| m.name()).collect();
        f.debug_struct("BuiltRoute")
            .field("prefix", &self.prefix)
            .field("public_base", &self.public_base)
            .field("pre", &pre)
            .field("post", &post)
            .field("shadow", &shadow)
            .field("policy", &self.policy)
            .finish()
    }
}

/// A route's own keys: top-level for the main route, in its entry for a `routes[]` one.
struct RouteKeys<'a> {
    prefix: &'a str,
    public_base_url: Option<&'a str>,
    pre: &'a [ModuleConfig],
    post: &'a [ModuleConfig],
    shadow: &'a [ModuleConfig],
    policy: &'a RolePolicyConfig,
}

impl<'a> From<&'a RouteConfig> for RouteKeys<'a> {
    fn from(r: &'a RouteConfig) -> Self {
        RouteKeys {
            prefix: &r.prefix,
            public_base_url: r.public_base_url.as_deref(),
            pre: &r.pre,
            post: &r.post,
            shadow: &r.shadow,
            policy: &r.policy,
        }
    }
}

/// Checks the main route and every `routes[]` entry: prefixes (valid, not overlapping), public
/// bases, module chains and role policies. Returns the built routes, the main one first; a
/// route with an error is left out (the errors then refuse the file anyway).
pub(super) fn validate(
    cfg: &GatewayConfig,
    registry: &Registry,
    errs: &mut Errors,
) -> Vec<BuiltRoute> {
    let mut built = Vec::new();
    if !is_valid_prefix(&cfg.fhir_prefix) {
        errs.at(
            &["fhir_prefix"],
            format!(
                "fhir_prefix: {:?} must start with '/', not end with '/', and hold only URL path characters",
                cfg.fhir_prefix
            ),
        );
    }
    let main = RouteKeys {
        prefix: &cfg.fhir_prefix,
        public_base_url: cfg.public_base_url.as_deref(),
        pre: &cfg.pre,
        post: &cfg.post,
        shadow: &cfg.shadow,
        policy: &cfg.policy,
    };
    built.extend(build_route(&[], main, registry, errs));
    let mut prefixes = vec![cfg.fhir_prefix.clone()];
    for (i, r) in cfg.routes.iter().enumerate() {
        let idx = i.to_string();
        if !is_valid_prefix(&r.prefix) {
            errs.at(
                &["routes", &idx, "prefix"],
                format!(
                    "routes[{i}].prefix: {:?} is not a valid path prefix",
                    r.prefix
                ),
            );
        }
        let overlaps = prefixes.iter().any(|p| {
            p == &r.prefix
                || r.prefix.starts_with(&format!("{p}/"))
                || p.starts_with(&format!("{}/", r.prefix))
        });
        if overlaps || ["/healthz", "/readyz", "/manage"].contains(&r.prefix.as_str()) {
            errs.at(
                &["routes", &idx, "prefix"],
                format!("routes[{i}].prefix: {:?} overlaps another route", r.prefix),
            );
        }
        prefixes.push(r.prefix.clone());
        built.extend(build_route(&["routes", &idx], r.into(), registry, errs));
    }
    built
}

/// Parses a route's public base, builds each of its modules once (so `-t` reports unknown
/// names and bad settings with their line) and resolves its roles. `at` is the route's key
/// path: empty for the main route, `["routes", "<i>"]` for the others.
fn build_route(
    at: &[&str],
    r: RouteKeys,
    registry: &Registry,
    errs: &mut Errors,
) -> Option<BuiltRoute> {
    let label = if at.is_empty() {
        String::new()
    } else {
        format!("{}[{}].", at[0], at[1])
    };
    let public_base = match r.public_base_url.map(BaseUrl::parse) {
        None => Some(None),
        Some(Ok(u)) => Some(Some(u)),
        Some(Err(e)) => {
            let mut path: Vec<&str> = at.to_vec();
            path.push("public_base_url");
            errs.at(&path, format!("{label}public_base_url: {e}"));
            None
        }
    };
    let pre = build_chain(
        at,
        &label,
        "pre",
        r.pre,
        |n, s| registry.build_pre(n, s),
        errs,
    );
    let post = build_chain(
        at,
        &label,
        "post",
        r.post,
        |n, s| registry.build_post(n, s),
        errs,
    );
    // Same names and settings as `post`; built (and checked) the same way.
    let shadow = build_chain(
        at,
        &label,
        "shadow",
        r.shadow,
        |n, s| registry.build_post(n, s),
        errs,
    );
    let mut roles = |k: &str, names: &[String]| -> Option<Vec<_>> {
        let mut resolved = Vec::new();
        let mut failed = false;
        for n in names {
            match role_by_name(n) {
                Some(role) => resolved.push(role),
                None => {
                    let mut path: Vec<&str> = at.to_vec();
                    path.extend(["policy", k]);
                    errs.at(&path, format!("{label}policy.{k}: unknown role {n:?}"));
                    failed = true;
                }
            }
        }
        (!failed).then_some(resolved)
    };
    let read = roles("read", &r.policy.read);
    let write = roles("write", &r.policy.write);
    // Participant roles read only through a module that limits them to their own data:
    // granting them reads without one would show them everyone (fail closed). When the post
    // chain did not build, that error stands alone: which module was meant is not known.
    if let Some(post) = &post {
        let scoped = post.iter().any(|m| m.scopes_data_to_the_caller());
        for n in r.policy.read.iter().chain(&r.policy.write) {
            if ["Patient", "Practitioner", "RelatedPerson"].contains(&n.as_str()) && !scoped {
                let mut path: Vec<&str> = at.to_vec();
                path.extend(["policy"]);
                errs.at(
                    &path,
                    format!(
                        "{label}policy grants the participant role {n} but the post chain has no ParticipantFilter: they would see every patient"
                    ),
                );
                return None;
            }
        }
    }
    Some(BuiltRoute {
        prefix: r.prefix.to_string(),
        public_base: public_base?,
        pre: pre?,
        post: post?,
        shadow: shadow?,
        policy: RolePolicy {
            read: read?,
            write: write?,
        },
    })
}

/// Builds the modules of one list (`pre` or `post`) of a route; `None` if any fails, each
/// failure reported at the line of its `name`.
fn build_chain<M: ?Sized>(
    at: &[&str],
    label: &str,
    list: &str,
    items: &[ModuleConfig],
    build: impl Fn(&str, &serde_json::Value) -> Result<Arc<M>, String>,
    errs: &mut Errors,
) -> Option<Vec<Arc<M>>> {
    let mut built = Vec::new();
    let mut failed = false;
    for (i, m) in items.iter().enumerate() {
        match m.settings_json().and_then(|s| build(&m.name, &s)) {
            Ok(module) => built.push(module),
            Err(e) => {
                let idx = i.to_string();
                let mut path: Vec<&str> = at.to_vec();
                path.extend([list, idx.as_str(), "name"]);
                errs.at(&path, format!("{label}{list}[{i}]: {e}"));
                failed = true;
            }
        }
    }
    (!failed).then_some(built)
}

fn is_valid_prefix(p: &str) -> bool {
    p.starts_with('/')
        && p.len() > 1
        && !p.ends_with('/')
        && !p.contains("//")
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::super::parse_with;
    use super::*;
    use async_trait::async_trait;
    use fhir_gateway_modules::processor::{Context, ModuleError, PostOutcome, Request, Response};
    use fhir_gateway_modules::Identity;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A third-party post module: limits data to the caller and reads identity links.
    struct OwnPatients;

    #[async_trait]
    impl PostProcess for OwnPatients {
        fn name(&self) -> &'static str {
            "OwnPatients"
        }
        fn applies(&self, _req: &Request, _caller: Option<&Identity>) -> bool {
            false
        }
        async fn process(
            &self,
            _req: &Request,
            _resp: &mut Response,
            _cx: &Context,
        ) -> Result<PostOutcome, ModuleError> {
            Ok(PostOutcome::Continue)
        }
        fn uses_identity_links(&self) -> bool {
            true
        }
        fn scopes_data_to_the_caller(&self) -> bool {
            true
        }
    }

    static BUILT: AtomicUsize = AtomicUsize::new(0);

    fn registry() -> Registry {
        let mut r = Registry::builtin();
        r.register_post("OwnPatients", |_| {
            BUILT.fetch_add(1, Ordering::SeqCst);
            Ok(Arc::new(OwnPatients))
        })
        .unwrap();
        r
    }

    fn env(_: &str) -> Option<String> {
        None
    }

    const BASE: &str = "\
listen:
  - addr: 127.0.0.1:8080
upstream:
  url: http://127.0.0.1:8090/fhir/
auth:
  mode: insecure_dev
trusted_proxies: [10.0.0.0/8, 127.0.0.1]
";

    #[test]
    fn modules_are_built_once_and_the_gateway_runs_those() {
        let text = format!(
            "{BASE}policy:\n  read: [Patient]\npost:\n  - name: OwnPatients\nroutes:\n  - prefix: /research/fhir\n    public_base_url: https://gw.example/research/fhir/\n    post:\n      - name: DateSort\n"
        );
        let before = BUILT.load(Ordering::SeqCst);
        let cfg = parse_with(&text, &env, &registry()).unwrap();
        assert_eq!(BUILT.load(Ordering::SeqCst) - before, 1);
        let b = &cfg.built;
        assert_eq!(b.routes.len(), 2);
        assert_eq!(b.routes[0].prefix, "/fhir");
        assert_eq!(b.routes[0].public_base, None);
        assert_eq!(
            b.routes[1].public_base.as_ref().map(BaseUrl::as_string),
            Some("https://gw.example/research/fhir".to_string())
        );
        assert_eq!(b.routes[1].post[0].name(), "DateSort");
        assert_eq!(b.trusted_proxies.len(), 2);

        let gw = crate::Gateway::new(&cfg).unwrap();
        assert_eq!(BUILT.load(Ordering::SeqCst) - before, 1, "built again");
        assert!(Arc::ptr_eq(&gw.routes[0].post[0], &b.routes[0].post[0]));
        assert!(Arc::ptr_eq(&gw.routes[1].post[0], &b.routes[1].post[0]));
        assert!(gw.links_in_use, "OwnPatients reads identity links");
        assert!(gw.is_trusted_proxy("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn the_gateway_asks_modules_not_names() {
        // No module that scopes data: the participant role is refused, message as before.
        let text = format!("{BASE}policy:\n  read: [Patient]\npost:\n  - name: DateSort\n");
        let e = parse_with(&text, &env, &registry()).unwrap_err();
        assert!(e.0[0].message.contains("no ParticipantFilter"), "{e}");
        // No module that reads links: link identifiers are not guarded.
        let text = format!("{BASE}post:\n  - name: DateSort\n");
        let cfg = parse_with(&text, &env, &registry()).unwrap();
        assert!(!crate::Gateway::new(&cfg).unwrap().links_in_use);
    }

    #[test]
    fn a_chain_that_does_not_build_is_its_only_error() {
        // Which module was meant is unknown: no second error about the participant role.
        let text = format!(
            "{BASE}policy:\n  read: [Patient]\npost:\n  - name: ParticipantFilter\n    settings: {{max_related: 0}}\n"
        );
        let e = parse_with(&text, &env, &registry()).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e}");
        assert!(
            e.0[0].message.starts_with("post[0]: ParticipantFilter: "),
            "{e}"
        );
        assert_eq!(e.0[0].line, Some(11));
    }

    #[test]
    fn shadow_modules_are_built_and_checked_like_post() {
        let text = format!(
            "{BASE}post:\n  - name: DateSort\nshadow:\n  - name: ParticipantFilter\n    settings: {{relations: [care_team_member]}}\n"
        );
        let cfg = parse_with(&text, &env, &registry()).unwrap();
        assert_eq!(cfg.built.routes[0].shadow[0].name(), "ParticipantFilter");
        let gw = crate::Gateway::new(&cfg).unwrap();
        assert_eq!(gw.routes[0].shadow.len(), 1);
        assert!(gw.links_in_use, "a candidate resolves links too");
        // A candidate never scopes what participants see: it cannot stand in for the live one.
        let text =
            format!("{BASE}policy:\n  read: [Patient]\nshadow:\n  - name: ParticipantFilter\n");
        let e = parse_with(&text, &env, &registry()).unwrap_err();
        assert!(e.0[0].message.contains("no ParticipantFilter"), "{e}");
        let text = format!(
            "{BASE}shadow:\n  - name: ParticipantFilter\n    settings: {{max_related: 0}}\n"
        );
        let e = parse_with(&text, &env, &registry()).unwrap_err();
        assert!(
            e.0[0].message.starts_with("shadow[0]: ParticipantFilter: "),
            "{e}"
        );
    }

    #[test]
    fn an_unvalidated_config_is_refused() {
        let cfg: GatewayConfig = serde_yaml::from_str(BASE).unwrap();
        let e = crate::Gateway::new(&cfg).err().unwrap();
        assert!(e.contains("not validated"), "{e}");
    }
}
