//! The runtime object built from a validated configuration and shared by every request.

use crate::auth::policy::RolePolicy;
use crate::auth::Authenticator;
use crate::config::BuiltRoute;
use crate::config::{AuthMode, GatewayConfig, LimitsConfig, RetryConfig, SmartConfig};
use crate::headers::FORWARDED_REQUEST_HEADERS;
use crate::health::Health;
use crate::net::IpNet;
use crate::rewrite::{Replacements, Rewriter};
use crate::upstream::identity::ServiceIdentity;
use crate::upstream::Upstream;
use fhir_gateway_modules::links::Directory;
use fhir_gateway_modules::processor::{EventSink, PostProcess, PreProcess};
use http::HeaderName;
use pingora_core::connectors::http::Connector;
use pingora_core::connectors::ConnectorOptions;
use std::sync::Arc;
use std::time::Duration;

/// The types whose writes change what the caches of links, relations and consents hold.
pub const CACHED_TYPES: [&str; 7] = [
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "RelatedPerson",
    "Encounter",
    "CareTeam",
    "Consent",
];

/// A public prefix in front of the FHIR server, with its own chains and role policy.
pub struct Route {
    pub prefix: String,
    /// Configured public base and its encoded forms; `None` = derived per request.
    pub public_base: Option<(std::sync::Arc<str>, Replacements)>,
    pub pre: Vec<Arc<dyn PreProcess>>,
    pub post: Vec<Arc<dyn PostProcess>>,
    /// Candidate post modules (shadow mode): judged on a copy, never enforced.
    pub shadow: Vec<Arc<dyn PostProcess>>,
    pub policy: RolePolicy,
}

pub struct Gateway {
    /// `routes[0]` is the main route (`fhir_prefix`).
    pub routes: Vec<Route>,
    pub name: String,
    /// `name` as the proxy audit header's value, built once.
    pub name_header: http::HeaderValue,
    pub upstream: Upstream,
    pub identity: ServiceIdentity,
    pub rewriter: Rewriter,
    pub trusted_proxies: Vec<IpNet>,
    pub limits: LimitsConfig,
    pub retries: RetryConfig,
    /// Request headers copied upstream.
    pub forward: Vec<HeaderName>,
    pub auth_mode: AuthMode,
    pub auth: Authenticator,
    pub smart: SmartConfig,
    /// Audit header names: user id, UPN, tenant, source, proxy (valid, lower-case; as bytes,
    /// which Pingora's header API takes without copying them).
    pub audit: [bytes::Bytes; 5],
    pub access_log: bool,
    pub health: Health,
    /// Client for the service identity's token endpoint (client credentials, IMDS).
    pub http: reqwest::Client,
    /// Where modules publish events.
    pub events: Arc<dyn EventSink>,
    /// The queue behind `events` (its background service drains it).
    pub event_queue: Arc<crate::events::Events>,
    /// Callers' identity links (shared by the filters and `/manage`).
    pub links: Arc<Directory>,
    /// Some route filters by participant or consent: link identifiers are guarded.
    pub links_in_use: bool,
    /// Pingora's client connector for the calls the gateway makes to the FHIR server itself
    /// (the module path, the modules' own calls): one per gateway, with its own keep-alive
    /// pool, built from the same `ServerConf` as the proxy's (`upstream.pool_size`), and used
    /// only with `upstream.peer()`, the proxy's peer (SNI, CA list, verify flags, timeouts).
    pub connector: Connector,
    /// Bulk Data export: who may start one, and the key of the URLs handed out.
    pub bulk: crate::bulk::Bulk,
    /// The audit trail of what each caller was shown (`audit:`), when configured.
    pub trail: Option<crate::audit::Audit>,
    /// Break-the-glass sessions (`break_the_glass:`), when configured.
    pub glass: Option<crate::audit::glass::Glass>,
}

impl Gateway {
    /// Builds the runtime from a configuration that `config::parse` accepted.
    pub fn new(cfg: &GatewayConfig) -> Result<Gateway, String> {
        let upstream = Upstream::new(&cfg.upstream)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(cfg.upstream.timeouts.connect_ms))
            .timeout(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        let identity = ServiceIdentity::new(&cfg.upstream.identity, http.clone())?;
        // The proxy's connector is built by Pingora from the same `ServerConf`.
        let connector = Connector::new(Some(ConnectorOptions::from_server_conf(
            &cfg.server_conf().map_err(|e| format!("pingora: {e}"))?,
        )));
        let auth_cfg = cfg.auth.as_ref().ok_or("auth: required")?;
        let auth = Authenticator::new(
            auth_cfg,
            reqwest::Client::builder()
                .timeout(Duration::from_millis(auth_cfg.jwks.timeout_ms))
                .build()
                .map_err(|e| format!("HTTP client: {e}"))?,
        )?;
        let a = &auth_cfg.audit_headers;
        let hn = |s: &str| {
            HeaderName::from_bytes(s.as_bytes())
                .map(|n| bytes::Bytes::copy_from_slice(n.as_str().as_bytes()))
                .map_err(|e| format!("{s}: {e}"))
        };
        let audit = [
            hn(&a.user_id)?,
            hn(&a.upn)?,
            hn(&a.tenant)?,
            hn(&a.source)?,
            hn(&a.proxy)?,
        ];
        let rewriter = Rewriter::new(&upstream.base.spellings());
        let event_queue = Arc::new(crate::events::Events::new(&cfg.events));
        // The modules validation built are the ones that run: built once, from one reading.
        if cfg.built.routes.is_empty() {
            return Err(
                "configuration not validated: read it with config::load or config::parse".into(),
            );
        }
        let routes: Vec<Route> = cfg
            .built
            .routes
            .iter()
            .map(|r| Route::new(r, &rewriter))
            .collect();
        let links_in_use = routes
            .iter()
            .flat_map(|r| r.post.iter().chain(&r.shadow))
            .any(|m| m.uses_identity_links());
        let mut forward: Vec<HeaderName> = FORWARDED_REQUEST_HEADERS
            .iter()
            .map(|h| HeaderName::from_static(h))
            .collect();
        for h in &cfg.upstream.forward_headers {
            let n = HeaderName::from_bytes(h.as_bytes()).map_err(|e| format!("{h}: {e}"))?;
            if !forward.contains(&n) {
                forward.push(n);
            }
        }
        Ok(Gateway {
            routes,
            name: cfg.gateway_name.clone(),
            name_header: http::HeaderValue::from_str(&crate::headers::sanitize_header_value(
                &cfg.gateway_name,
            ))
            .map_err(|_| "gateway_name is not a valid header value".to_string())?,
            identity,
            rewriter,
            trusted_proxies: cfg.built.trusted_proxies.clone(),
            limits: cfg.limits,
            retries: cfg.upstream.retries,
            forward,
            auth_mode: auth_cfg.mode,
            auth,
            smart: auth_cfg.smart.clone(),
            audit,
            connector,
            bulk: crate::bulk::Bulk::new(&cfg.bulk, &cfg.built.bulk)?,
            trail: cfg
                .audit
                .as_ref()
                .map(|a| crate::audit::Audit::new(a, &cfg.built.audit)),
            glass: cfg
                .break_the_glass
                .as_ref()
                .map(|g| crate::audit::glass::Glass::new(g, &cfg.built.glass)),
            events: event_queue.clone(),
            event_queue,
            links: Arc::new(Directory::new(cfg.identity_links.clone())),
            links_in_use,
            access_log: cfg.logging.access_log,
            health: Health::default(),
            http,
            upstream,
        })
    }

    /// The route whose prefix the path is under (whole segments only).
    pub fn route_for(&self, path: &str) -> Option<usize> {
        self.routes
            .iter()
            .enumerate()
            .filter(|(_, r)| {
                path.starts_with(r.prefix.as_str())
                    && (path.len() == r.prefix.len() || path.as_bytes()[r.prefix.len()] == b'/')
            })
            .max_by_key(|(_, r)| r.prefix.len())
            .map(|(i, _)| i)
    }

    /// A write of `resource_type` succeeded: every cache that may hold what it changed
    /// forgets it, before the client hears back (so its next request sees the change).
    pub fn invalidate(&self, resource_type: &str) {
        self.links.invalidate(resource_type);
        for r in &self.routes {
            for m in r.post.iter().chain(&r.shadow) {
                m.invalidate(resource_type);
            }
        }
    }

    pub fn is_trusted_proxy(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(ip))
    }
}

impl Route {
    /// Takes over a route as validation built it (its modules, public base and roles); only
    /// the public base's encoded forms are new.
    fn new(built: &BuiltRoute, rewriter: &Rewriter) -> Route {
        let public_base = built.public_base.as_ref().map(|u| {
            let s = u.as_string();
            let r = rewriter.replacements(&s);
            (s.into(), r)
        });
        Route {
            prefix: built.prefix.clone(),
            public_base,
            pre: built.pre.clone(),
            post: built.post.clone(),
            shadow: built.shadow.clone(),
            policy: built.policy.clone(),
        }
    }
}
