//! The one YAML file: its structs, `${ENV}` expansion, and validation with YAML line numbers.
//!
//! Each section has its own file with its types and its checks; this one holds the top level
//! and calls them. The sections are plain data, plus what validation had to build or parse
//! anyway (`Built`: the modules, public bases, roles, proxy networks), which the runtime takes
//! over; the other runtime objects (`Gateway`, `Upstream`, `ServiceIdentity`) are built from
//! the data in their own modules once the whole file has been validated.

mod audit;
mod auth;
mod bulk;
mod events;
mod glass;
mod limits;
mod listen;
mod load;
mod locate;
mod routes;
mod server;
#[cfg(test)]
mod tests;
mod upstream;

use crate::net::IpNet;
use fhir_gateway_modules::builtin::Registry;
use serde::Deserialize;

pub use audit::{
    AuditConfig, AuditFhir, AuditFhirSink, AuditKafka, AuditSink, AuditSpool, BuiltAudit,
};
pub use auth::{
    AuditHeaderNames, AuthConfig, AuthMode, ClaimNames, IssuerConfig, JwksConfig, OffloadConfig,
    OneOrMany, RoleValues, SmartConfig,
};
pub use bulk::{BuiltBulk, BulkConfig};
pub use events::{EventsConfig, KafkaConfig, SpoolSettings};
pub use glass::{BuiltGlass, GlassConfig};
pub use limits::LimitsConfig;
pub use listen::{ListenConfig, ListenTls, MetricsConfig};
pub use load::{expand_env, load, parse, parse_with, ConfigError, ConfigErrors};
pub use locate::line_of;
pub use routes::{BuiltRoute, ModuleConfig, RolePolicyConfig, RouteConfig};
pub use server::{log_level, HealthConfig, LoggingConfig};
pub use upstream::{
    ClientAuthMethod, IdentityConfig, RetryConfig, TimeoutsConfig, UpstreamConfig, UpstreamTls,
};

#[cfg(test)]
use load::newline_line;

/// The whole configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Pingora's own server settings (threads, grace periods, pid file, upgrade socket...),
    /// read by `server_conf()`. Pingora ignores keys it does not know; see docs/configuration.md.
    #[serde(default)]
    pub pingora: serde_yaml::Value,
    /// Downstream listeners.
    pub listen: Vec<ListenConfig>,
    /// Public path prefix of the FHIR API.
    #[serde(default = "default_prefix")]
    pub fhir_prefix: String,
    /// Public base URL (`https://fhir.example.org/fhir`); when absent it is built per request
    /// from the scheme and `Host` (or `X-Forwarded-*` from trusted proxies).
    #[serde(default)]
    pub public_base_url: Option<String>,
    /// Name sent as `X-MS-AZUREFHIR-AUDIT-PROXY` and shown in diagnostics.
    #[serde(default = "default_name")]
    pub gateway_name: String,
    /// Peers (IP or CIDR) whose `X-Forwarded-For/-Host/-Proto` are believed.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Caller authentication. Required: there is no silent default.
    pub auth: Option<AuthConfig>,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Pre-processors of the main route (`fhir_prefix`), in order.
    #[serde(default)]
    pub pre: Vec<ModuleConfig>,
    /// Post-processors of the main route, in order.
    #[serde(default)]
    pub post: Vec<ModuleConfig>,
    /// Candidate post-processors of the main route, evaluated on a copy of the answer and
    /// never enforced (shadow mode, `chain/shadow.rs`).
    #[serde(default)]
    pub shadow: Vec<ModuleConfig>,
    /// Role policy of the main route.
    #[serde(default)]
    pub policy: RolePolicyConfig,
    /// Where callers' identity links live in the FHIR server (ParticipantFilter,
    /// ConsentOptOut, `/manage`).
    #[serde(default)]
    pub identity_links: fhir_gateway_modules::links::LinkSettings,
    /// Where PublishFHIREvent's events go: Kafka / Event Hubs (through a durable spool), or
    /// a JSON-lines file when no broker is configured.
    #[serde(default)]
    pub events: EventsConfig,
    /// More public prefixes in front of the same FHIR server, each with its own chains and
    /// role policy (e.g. `/research/fhir` for analytics).
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Bulk Data export: who may start one, and the key binding its URLs to the caller.
    #[serde(default)]
    pub bulk: BulkConfig,
    /// The audit trail of what each caller was shown (off when absent).
    #[serde(default)]
    pub audit: Option<AuditConfig>,
    /// Emergency access past the data filters, always audited with its reason.
    #[serde(default)]
    pub break_the_glass: Option<GlassConfig>,
    /// What validation parsed and built from the above; empty until `load` or `parse`
    /// accepted the file.
    #[serde(skip)]
    pub built: Built,
}

/// Values validation had to parse or build to check them, handed to the runtime
/// (`Gateway::new`) so that it does not parse or build them a second time.
#[derive(Debug, Default)]
pub struct Built {
    /// `[0]` is the main route (`fhir_prefix`), then each `routes[]` entry in order.
    pub routes: Vec<BuiltRoute>,
    /// `trusted_proxies`, parsed.
    pub trusted_proxies: Vec<IpNet>,
    /// `bulk`: export roles and the URL binding key.
    pub bulk: BuiltBulk,
    /// `audit`: the checkpoint key.
    pub audit: BuiltAudit,
    /// `break_the_glass`: its roles.
    pub glass: BuiltGlass,
}

fn default_prefix() -> String {
    "/fhir".into()
}
fn default_name() -> String {
    "fhir-gateway".into()
}

/// Validation errors as they are found, each with the line of its key path in the file.
struct Errors<'a> {
    text: &'a str,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn at(&mut self, path: &[&str], message: String) {
        self.list.push(ConfigError {
            line: line_of(self.text, path),
            message,
        });
    }
}

/// Checks what serde cannot: values, combinations, and the fail-closed rules, section by
/// section; `registry` builds the modules. `text` is the file as written, for the lines of the
/// errors.
fn validate(
    cfg: &GatewayConfig,
    text: &str,
    registry: &Registry,
) -> Result<Built, Vec<ConfigError>> {
    let mut errs = Errors {
        text,
        list: Vec::new(),
    };
    let addrs = listen::validate(&cfg.listen, &cfg.metrics, &mut errs);
    let routes = routes::validate(cfg, registry, &mut errs);
    if let Err(e) = cfg.identity_links.validate() {
        errs.at(&["identity_links", "system"], e);
    }
    events::validate(&cfg.events, &mut errs);
    let bulk = bulk::validate(&cfg.bulk, &mut errs);
    let audit = audit::validate(cfg.audit.as_ref(), &cfg.events, &mut errs);
    let glass = glass::validate(cfg.break_the_glass.as_ref(), cfg.audit.is_some(), &mut errs);
    let mut trusted_proxies = Vec::new();
    for (i, p) in cfg.trusted_proxies.iter().enumerate() {
        match IpNet::parse(p) {
            Some(net) => trusted_proxies.push(net),
            None => errs.at(
                &["trusted_proxies", &i.to_string()],
                format!("trusted_proxies[{i}]: {p:?} is not an IP address or CIDR"),
            ),
        }
    }
    if !crate::headers::is_header_safe(&cfg.gateway_name) || cfg.gateway_name.is_empty() {
        errs.at(
            &["gateway_name"],
            "gateway_name: must be a non-empty printable header value".into(),
        );
    }
    upstream::validate(&cfg.upstream, cfg.auth.as_ref(), &mut errs);
    limits::validate(&cfg.limits, &mut errs);
    auth::validate(cfg.auth.as_ref(), &addrs, &mut errs);
    server::validate(cfg, &mut errs);
    if !errs.list.is_empty() {
        return Err(errs.list);
    }
    Ok(Built {
        routes,
        trusted_proxies,
        bulk,
        audit,
        glass,
    })
}

/// https, or http to a loopback host (tests, a sidecar).
pub fn is_https_or_loopback(u: &str) -> bool {
    let Ok(uri) = u.parse::<http::Uri>() else {
        return false;
    };
    match (uri.scheme_str(), uri.host()) {
        (Some("https"), Some(_)) => true,
        (Some("http"), Some(h)) => {
            h == "localhost"
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        _ => false,
    }
}

fn check_http_url(u: &str) -> Result<(), String> {
    let uri: http::Uri = u.parse().map_err(|e| format!("{u:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") if uri.host().is_some() => Ok(()),
        _ => Err(format!("{u:?} is not an http(s) URL")),
    }
}
