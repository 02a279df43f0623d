//! The routes: the main one (`fhir_prefix`, `public_base_url`, `pre`, `post`, `policy`) and
//! each `routes[]` entry, with their module chains and role policies.

use super::{Errors, GatewayConfig};
use serde::Deserialize;

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
    #[serde(default)]
    pub policy: RolePolicyConfig,
}

/// Checks the main route and every `routes[]` entry: prefixes (valid, not overlapping), public
/// bases, module chains and role policies.
pub(super) fn validate(cfg: &GatewayConfig, errs: &mut Errors) {
    if !is_valid_prefix(&cfg.fhir_prefix) {
        errs.at(
            &["fhir_prefix"],
            format!(
                "fhir_prefix: {:?} must start with '/', not end with '/', and hold only URL path characters",
                cfg.fhir_prefix
            ),
        );
    }
    if let Some(p) = &cfg.public_base_url {
        if let Err(e) = crate::upstream::BaseUrl::parse(p) {
            errs.at(&["public_base_url"], format!("public_base_url: {e}"));
        }
    }
    validate_chains(&[], &cfg.pre, &cfg.post, &cfg.policy, errs);
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
        if let Some(p) = &r.public_base_url {
            if let Err(e) = crate::upstream::BaseUrl::parse(p) {
                errs.at(
                    &["routes", &idx, "public_base_url"],
                    format!("routes[{i}].public_base_url: {e}"),
                );
            }
        }
        validate_chains(&["routes", &idx], &r.pre, &r.post, &r.policy, errs);
    }
}

/// Builds every module once, so `-t` reports unknown names and bad settings with their line.
fn validate_chains(
    at: &[&str],
    pre: &[ModuleConfig],
    post: &[ModuleConfig],
    policy: &RolePolicyConfig,
    errs: &mut Errors,
) {
    let label = if at.is_empty() {
        String::new()
    } else {
        format!("{}[{}].", at[0], at[1])
    };
    for (list, items, build) in [("pre", pre, true), ("post", post, false)] {
        for (i, m) in items.iter().enumerate() {
            let idx = i.to_string();
            let mut path: Vec<&str> = at.to_vec();
            path.extend([list, idx.as_str(), "name"]);
            let result = m.settings_json().and_then(|s| {
                if build {
                    fhir_gateway_modules::builtin::build_pre(&m.name, &s).map(|_| ())
                } else {
                    fhir_gateway_modules::builtin::build_post(&m.name, &s).map(|_| ())
                }
            });
            if let Err(e) = result {
                errs.at(&path, format!("{label}{list}[{i}]: {e}"));
            }
        }
    }
    for (k, roles) in [("read", &policy.read), ("write", &policy.write)] {
        for r in roles {
            if crate::auth::policy::role_by_name(r).is_none() {
                let mut path: Vec<&str> = at.to_vec();
                path.extend(["policy", k]);
                errs.at(&path, format!("{label}policy.{k}: unknown role {r:?}"));
            }
        }
    }
    // Participant roles read only through the filter that limits them to their patients:
    // granting them reads without it would show them everyone (fail closed).
    let filtered = post.iter().any(|m| m.name == "ParticipantFilter");
    for r in policy.read.iter().chain(&policy.write) {
        if ["Patient", "Practitioner", "RelatedPerson"].contains(&r.as_str()) && !filtered {
            let mut path: Vec<&str> = at.to_vec();
            path.extend(["policy"]);
            errs.at(
                &path,
                format!(
                    "{label}policy grants the participant role {r} but the post chain has no ParticipantFilter: they would see every patient"
                ),
            );
            break;
        }
    }
}

fn is_valid_prefix(p: &str) -> bool {
    p.starts_with('/')
        && p.len() > 1
        && !p.ends_with('/')
        && !p.contains("//")
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/-._~".contains(&b))
}
