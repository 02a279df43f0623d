//! The one YAML file: its structs, `${ENV}` expansion, and validation with YAML line numbers.
//!
//! These are plain data; the runtime objects (`Gateway`, `Upstream`, `ServiceIdentity`) are
//! built from them in their own modules once the whole file has been validated.

mod locate;
#[cfg(test)]
mod tests;

use pingora_core::server::configuration::ServerConf;
use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

pub use locate::line_of;

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
}

/// `events:`. With `kafka` set, events go queue → spool → broker; without, to `file`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// JSON lines, one event each (the default sink when no broker is configured).
    #[serde(default = "default_events_file")]
    pub file: String,
    #[serde(default)]
    pub kafka: Option<KafkaConfig>,
    /// Events waiting between the request path and the spool writer. When full, an event is
    /// dropped with an error log and `fhirgw_events_total{stage="dropped_queue_full"}`.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// How long a write's response waits for room in a full queue before its event is
    /// dropped (backpressure: under overload writes slow down instead of losing events).
    #[serde(default = "default_queue_full_wait_ms")]
    pub queue_full_wait_ms: u64,
    #[serde(default)]
    pub spool: SpoolSettings,
}

fn default_events_file() -> String {
    "events.jsonl".into()
}

fn default_queue() -> usize {
    10_000
}

fn default_queue_full_wait_ms() -> u64 {
    10_000
}

impl EventsConfig {
    /// Makes the file and spool paths absolute against `base`.
    pub fn absolutize(&mut self, base: &Path) {
        for p in [&mut self.file, &mut self.spool.dir] {
            if Path::new(p.as_str()).is_relative() {
                *p = base.join(p.as_str()).to_string_lossy().into_owned();
            }
        }
    }
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            file: default_events_file(),
            kafka: None,
            queue_capacity: default_queue(),
            queue_full_wait_ms: default_queue_full_wait_ms(),
            spool: SpoolSettings::default(),
        }
    }
}

/// The broker: Azure Event Hubs' Kafka endpoint in production, any Kafka-protocol broker.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `<namespace>.servicebus.windows.net:9093` for Event Hubs.
    pub bootstrap_servers: String,
    pub topic: String,
    /// An Event Hubs connection string: sets SASL_SSL / PLAIN with `$ConnectionString`.
    #[serde(default)]
    pub connection_string: Option<String>,
    /// Any librdkafka property, passed through (last word over the defaults).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// Consume the topic to drop consent/link caches when another instance saw a write.
    #[serde(default = "default_true")]
    pub invalidate_caches: bool,
}

/// The local durable spool between the queue and the broker.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SpoolSettings {
    #[serde(default = "default_spool_dir")]
    pub dir: String,
    /// `always` (fsync every event), `never`, or a number of milliseconds between fsyncs.
    #[serde(default = "default_spool_fsync")]
    pub fsync: String,
    /// When the spool holds this much, new events are dropped with an error log and
    /// `fhirgw_events_total{stage="dropped_spool_full"}`.
    #[serde(default = "default_spool_max")]
    pub max_bytes: u64,
    #[serde(default = "default_segment")]
    pub segment_bytes: u64,
}

fn default_spool_dir() -> String {
    "spool".into()
}
fn default_spool_fsync() -> String {
    "100".into()
}
fn default_spool_max() -> u64 {
    1 << 30
}
fn default_segment() -> u64 {
    16 << 20
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            dir: default_spool_dir(),
            fsync: default_spool_fsync(),
            max_bytes: default_spool_max(),
            segment_bytes: default_segment(),
        }
    }
}

impl SpoolSettings {
    pub fn fsync(&self) -> Result<crate::events::spool::Fsync, String> {
        use crate::events::spool::Fsync;
        match self.fsync.as_str() {
            "always" => Ok(Fsync::Always),
            "never" => Ok(Fsync::Never),
            ms => ms
                .parse::<u64>()
                .ok()
                .filter(|m| *m > 0)
                .map(Fsync::EveryMs)
                .ok_or_else(|| {
                    format!("events.spool.fsync: {ms:?} is not always, never or milliseconds")
                }),
        }
    }
}

/// Prometheus metrics on their own listener (keep it off the public interface).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `ip:port`, e.g. `127.0.0.1:9091`; absent = no metrics listener.
    #[serde(default)]
    pub listen: Option<String>,
}

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

fn default_true() -> bool {
    true
}

fn default_prefix() -> String {
    "/fhir".into()
}
fn default_name() -> String {
    "fhir-gateway".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// `ip:port`.
    pub addr: String,
    /// Downstream TLS; absent = plain HTTP (behind a TLS-terminating load balancer).
    #[serde(default)]
    pub tls: Option<ListenTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenTls {
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the FHIR server, with or without trailing slash.
    pub url: String,
    #[serde(default)]
    pub tls: UpstreamTls,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Idle keep-alive connections kept to the FHIR server (per gateway process).
    #[serde(default = "default_pool")]
    pub pool_size: usize,
    #[serde(default)]
    pub retries: RetryConfig,
    /// Request headers forwarded in addition to the built-in allow-list.
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// How the gateway authenticates itself to the FHIR server.
    #[serde(default)]
    pub identity: IdentityConfig,
}

fn default_pool() -> usize {
    128
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTls {
    /// PEM bundle of CAs trusted for the FHIR server; absent = the system store.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Certificate and host name verification. Only `insecure_dev` may turn it off.
    #[serde(default = "yes")]
    pub verify: bool,
    /// SNI / expected host name; default = the URL's host.
    #[serde(default)]
    pub sni: Option<String>,
}

impl Default for UpstreamTls {
    fn default() -> Self {
        UpstreamTls {
            ca_file: None,
            verify: true,
            sni: None,
        }
    }
}

fn yes() -> bool {
    true
}

/// Upstream timeouts in milliseconds.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// TCP connect.
    pub connect_ms: u64,
    /// TLS handshake, on top of `connect_ms` (connection setup may take both).
    pub tls_handshake_ms: u64,
    /// Longest wait for any single read (response header or body chunk).
    pub read_ms: u64,
    /// Longest wait for any single write of the request.
    pub write_ms: u64,
    /// Whole exchange, counted from the request's arrival; checked between response body
    /// chunks (the per-read `read_ms` bounds waits for headers), and as the total timeout of
    /// calls the gateway makes itself.
    pub total_ms: u64,
    /// Idle pooled connection lifetime.
    pub idle_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            connect_ms: 2_000,
            tls_handshake_ms: 5_000,
            read_ms: 30_000,
            write_ms: 30_000,
            total_ms: 300_000,
            idle_ms: 60_000,
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts in all (1 = no retry). Only GET/HEAD/PUT/DELETE are ever retried.
    pub max_attempts: u32,
    /// Delay before a retry when the server gave no `Retry-After`.
    pub base_delay_ms: u64,
    /// A `Retry-After` longer than this is not waited for: the 429/503 goes to the client.
    pub max_delay_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: 3,
            base_delay_ms: 100,
            max_delay_ms: 2_000,
        }
    }
}

/// The gateway's own identity towards the FHIR server.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum IdentityConfig {
    /// No `Authorization` upstream (a FHIR server on a private network).
    #[default]
    None,
    /// A fixed bearer token (usually `${ENV_VAR}`).
    StaticBearer { token: String },
    /// OAuth2 client credentials (Entra ID v1 `resource` or v2 `scope`, or any IdP).
    ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: String,
        #[serde(default)]
        scope: Option<String>,
        #[serde(default)]
        resource: Option<String>,
        /// `basic` (RFC 6749 default) or `post` (credentials in the form body).
        #[serde(default)]
        auth_method: ClientAuthMethod,
        #[serde(default = "default_margin")]
        refresh_margin_secs: u64,
    },
    /// Azure managed identity through the instance metadata service.
    ManagedIdentity {
        #[serde(default = "default_imds")]
        imds_url: String,
        resource: String,
        /// User-assigned identity; absent = the system-assigned one.
        #[serde(default)]
        client_id: Option<String>,
        #[serde(default = "default_margin")]
        refresh_margin_secs: u64,
    },
}

#[derive(Debug, Deserialize, Default, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuthMethod {
    #[default]
    Basic,
    Post,
}

fn default_margin() -> u64 {
    300
}
fn default_imds() -> String {
    "http://169.254.169.254/metadata/identity/oauth2/token".into()
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest query string accepted (continuation tokens are long).
    pub max_query_bytes: usize,
    /// Largest request body accepted (413 above it).
    pub max_request_body_bytes: u64,
    /// Largest response body a module may buffer (502 `too-costly` above it).
    pub max_buffered_response_bytes: usize,
    /// Idle keep-alive of downstream connections, seconds.
    pub downstream_keepalive_secs: u64,
    /// Most request header bytes (names + values) accepted (431 above it).
    pub max_header_bytes: usize,
    /// Most request header fields accepted (431 above it).
    pub max_headers: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_query_bytes: 16 * 1024,
            max_request_body_bytes: 32 * 1024 * 1024,
            max_buffered_response_bytes: 64 * 1024 * 1024,
            downstream_keepalive_secs: 60,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Tolerance for `exp` / `nbf`, seconds.
    #[serde(default = "default_skew")]
    pub clock_skew_secs: u64,
    /// Trusted token issuers (one per tenant or IdP). Required for `jwt`.
    #[serde(default)]
    pub issuers: Vec<IssuerConfig>,
    #[serde(default)]
    pub jwks: JwksConfig,
    #[serde(default)]
    pub smart: SmartConfig,
    /// Auth offload: a front API gateway already validated the token. Requests must then prove
    /// they came through it; the token's claims are still read (and `iss`/`aud`/`exp` checked).
    #[serde(default)]
    pub offload: Option<OffloadConfig>,
    /// Names of the audit headers sent upstream.
    #[serde(default)]
    pub audit_headers: AuditHeaderNames,
}

fn default_skew() -> u64 {
    60
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// OIDC/JWT bearer tokens from the configured issuers.
    Jwt,
    /// No caller authentication, for local development only: refuses non-loopback listeners.
    InsecureDev,
}

/// A string or a list of strings.
#[derive(Debug, Deserialize, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// A name for logs and diagnostics.
    pub name: String,
    /// Accepted `iss` values (Entra: list both the v1 `https://sts.windows.net/{tid}/` and
    /// the v2 `https://login.microsoftonline.com/{tid}/v2.0` forms).
    pub issuer: OneOrMany,
    /// OIDC discovery document; gives the JWKS URL (and the SMART endpoints).
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// JWKS URL; overrides the one from discovery.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Accepted `aud` values.
    pub audiences: Vec<String>,
    /// Accepted tenant ids (`tid`); empty = any tenant of this issuer.
    #[serde(default)]
    pub allowed_tenants: Vec<String>,
    /// Accepted algorithms; default every asymmetric one (RS*, PS*, ES*).
    #[serde(default)]
    pub algorithms: Option<Vec<String>>,
    /// Enables HS256/384/512 for this issuer only. Never needed for Entra ID.
    #[serde(default)]
    pub shared_secret: Option<String>,
    #[serde(default)]
    pub claims: ClaimNames,
    #[serde(default)]
    pub roles: RoleValues,
}

/// Which claims carry what.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimNames {
    /// User id, first present wins.
    pub user_id: Vec<String>,
    pub tenant: String,
    /// UPN, first present wins.
    pub upn: Vec<String>,
    pub roles: String,
    /// Scopes (string or array), first present wins.
    pub scopes: Vec<String>,
    pub fhir_user: String,
    pub patient: String,
    /// Client application id, first present wins.
    pub client_id: Vec<String>,
}

impl Default for ClaimNames {
    fn default() -> Self {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect();
        ClaimNames {
            user_id: v(&["oid", "sub"]),
            tenant: "tid".into(),
            upn: v(&["upn", "preferred_username", "unique_name", "email"]),
            roles: "roles".into(),
            scopes: v(&["scp", "scope"]),
            fhir_user: "fhirUser".into(),
            patient: "patient".into(),
            client_id: v(&["azp", "appid", "client_id"]),
        }
    }
}

/// The role values that map to each application role.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct RoleValues {
    pub administrator: Vec<String>,
    pub reader: Vec<String>,
    pub writer: Vec<String>,
    pub patient: Vec<String>,
    pub practitioner: Vec<String>,
    pub related_person: Vec<String>,
    pub data_scientist: Vec<String>,
}

impl Default for RoleValues {
    fn default() -> Self {
        let v = |s: &str| vec![s.to_string()];
        RoleValues {
            administrator: v("Administrator"),
            reader: v("Reader"),
            writer: v("Writer"),
            patient: v("Patient"),
            practitioner: v("Practitioner"),
            related_person: v("RelatedPerson"),
            data_scientist: v("DataScientist"),
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields, default)]
pub struct JwksConfig {
    /// Regular refresh of every issuer's keys.
    pub refresh_secs: u64,
    /// An unknown `kid` triggers a refetch at most this often (per issuer).
    pub min_refetch_secs: u64,
    /// Retry interval while an issuer's keys have never loaded.
    pub retry_secs: u64,
    /// Timeout of one discovery or JWKS fetch.
    pub timeout_ms: u64,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            refresh_secs: 3600,
            min_refetch_secs: 10,
            retry_secs: 2,
            timeout_ms: 5000,
        }
    }
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SmartConfig {
    /// When true, a token with clinical scopes is authorised by its scopes alone (SMART apps
    /// without app roles). Default false: scopes only narrow what roles allow.
    pub scopes_alone_suffice: bool,
    /// Issuer (by `name`) whose endpoints `/.well-known/smart-configuration` and the
    /// CapabilityStatement advertise; default the first.
    pub issuer: Option<String>,
    /// Fields merged over the generated smart-configuration document.
    pub configuration: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct OffloadConfig {
    /// Header the front gateway adds, e.g. `X-Gateway-Proof`.
    pub header: String,
    /// Its value (a `${ENV}` secret). Compared in constant time.
    pub secret: String,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct AuditHeaderNames {
    pub user_id: String,
    pub upn: String,
    pub tenant: String,
    pub source: String,
    pub proxy: String,
}

impl Default for AuditHeaderNames {
    fn default() -> Self {
        AuditHeaderNames {
            user_id: "X-MS-AZUREFHIR-AUDIT-USERID".into(),
            upn: "X-MS-AZUREFHIR-AUDIT-UPN".into(),
            tenant: "X-MS-AZUREFHIR-AUDIT-TENANT".into(),
            source: "X-MS-AZUREFHIR-AUDIT-SOURCE".into(),
            proxy: "X-MS-AZUREFHIR-AUDIT-PROXY".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`; `RUST_LOG` overrides it.
    pub level: String,
    /// One line per request at `info`.
    pub access_log: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            access_log: true,
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often the upstream is probed (TCP connect) for `/readyz`.
    pub upstream_check_interval_ms: u64,
    /// On SIGTERM, how long `/readyz` answers 503 ("draining") while the gateway still
    /// accepts and serves, so load balancers stop sending before the listener closes. Then
    /// Pingora's grace periods apply. A second SIGTERM or a SIGINT cuts it short.
    pub drain_seconds: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            upstream_check_interval_ms: 5_000,
            drain_seconds: 5,
        }
    }
}

/// One problem in the configuration, with the YAML line it concerns when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

/// Every problem found, so `-t` can print them all at once.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads, expands, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<GatewayConfig, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            line: None,
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })?;
    parse(&text, &|name| std::env::var(name).ok())
}

/// Parses configuration text; `env` resolves `${NAME}` references.
pub fn parse(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<GatewayConfig, ConfigErrors> {
    let expanded = expand_env(text, env).map_err(ConfigErrors)?;
    let cfg: GatewayConfig = serde_yaml::from_str(&expanded).map_err(|e| {
        let line = e.location().map(|l| newline_line(&expanded, l.line()));
        ConfigErrors(vec![ConfigError {
            line,
            message: e.to_string(),
        }])
    })?;
    let errors = validate(&cfg, text);
    if errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// YAML also breaks lines at a lone CR, NEL, LS and PS, but editors (and `-t`'s `file:line`)
/// count only LF: maps YAML line `yaml_line` of `text` to the LF-counted line it starts on, so an
/// error never names a line past the end of the file.
fn newline_line(text: &str, yaml_line: usize) -> usize {
    let (mut yaml, mut lf) = (1, 1);
    let mut chars = text.chars().peekable();
    while yaml < yaml_line {
        match chars.next() {
            None => break,
            Some('\n') => lf += 1,
            Some('\r') if chars.peek() == Some(&'\n') => {
                chars.next();
                lf += 1;
            }
            Some('\r' | '\u{85}' | '\u{2028}' | '\u{2029}') => {}
            Some(_) => continue,
        }
        yaml += 1;
    }
    lf
}

/// Replaces `${NAME}` with the environment's value, line by line so line numbers stay true.
/// `$${` writes a literal `${`. Comment lines are left alone. A value with a line break is
/// refused: it would change the YAML structure around it.
pub fn expand_env(
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, Vec<ConfigError>> {
    let mut out = String::with_capacity(text.len());
    let mut errors = Vec::new();
    for (i, line) in text.split_inclusive('\n').enumerate() {
        let lineno = i + 1;
        if line.trim_start().starts_with('#') || !line.contains("${") {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(pos) = rest.find("${") {
            if pos > 0 && rest.as_bytes()[pos - 1] == b'$' {
                out.push_str(&rest[..pos - 1]);
                out.push_str("${");
                rest = &rest[pos + 2..];
                continue;
            }
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 2..];
            let Some(end) = after.find('}') else {
                errors.push(ConfigError {
                    line: Some(lineno),
                    message: "unterminated ${...} reference".into(),
                });
                rest = "";
                break;
            };
            let name = &after[..end];
            let valid =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            match (valid, env(name)) {
                (false, _) => errors.push(ConfigError {
                    line: Some(lineno),
                    message: format!("invalid environment variable name {name:?}"),
                }),
                (true, None) => errors.push(ConfigError {
                    line: Some(lineno),
                    message: format!("environment variable {name} is not set"),
                }),
                (true, Some(v)) if v.contains(['\n', '\r']) => errors.push(ConfigError {
                    line: Some(lineno),
                    message: format!("environment variable {name} contains a line break"),
                }),
                (true, Some(v)) => out.push_str(&v),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Checks what serde cannot: values, combinations, and the fail-closed rules.
fn validate(cfg: &GatewayConfig, text: &str) -> Vec<ConfigError> {
    let mut errs = Vec::new();
    let mut err = |path: &[&str], message: String| {
        errs.push(ConfigError {
            line: line_of(text, path),
            message,
        })
    };

    if cfg.listen.is_empty() {
        err(
            &["listen"],
            "listen: at least one listener is required".into(),
        );
    }
    let mut addrs = Vec::new();
    for (i, l) in cfg.listen.iter().enumerate() {
        let idx = i.to_string();
        match l.addr.parse::<SocketAddr>() {
            Ok(a) => addrs.push(a),
            Err(_) => err(
                &["listen", &idx, "addr"],
                format!("listen[{i}].addr: {:?} is not an ip:port address", l.addr),
            ),
        }
        if let Some(tls) = &l.tls {
            for (key, file) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
                if !Path::new(file).is_file() {
                    err(
                        &["listen", &idx, "tls", key],
                        format!("listen[{i}].tls.{key}: {file} does not exist"),
                    );
                }
            }
        }
    }

    if let Some(m) = &cfg.metrics.listen {
        match m.parse::<SocketAddr>() {
            Ok(a) if addrs.contains(&a) => err(
                &["metrics", "listen"],
                "metrics.listen: same address as a listener".into(),
            ),
            Ok(_) => {}
            Err(_) => err(
                &["metrics", "listen"],
                format!("metrics.listen: {m:?} is not an ip:port address"),
            ),
        }
    }
    if !is_valid_prefix(&cfg.fhir_prefix) {
        err(
            &["fhir_prefix"],
            format!(
                "fhir_prefix: {:?} must start with '/', not end with '/', and hold only URL path characters",
                cfg.fhir_prefix
            ),
        );
    }
    if let Some(p) = &cfg.public_base_url {
        if let Err(e) = crate::upstream::BaseUrl::parse(p) {
            err(&["public_base_url"], format!("public_base_url: {e}"));
        }
    }
    validate_chains(&[], &cfg.pre, &cfg.post, &cfg.policy, &mut err);
    if let Err(e) = cfg.identity_links.validate() {
        err(&["identity_links", "system"], e);
    }
    if let Err(e) = cfg.events.spool.fsync() {
        err(&["events", "spool", "fsync"], e);
    }
    if cfg.events.queue_capacity == 0 {
        err(
            &["events", "queue_capacity"],
            "events.queue_capacity must be at least 1".into(),
        );
    }
    if cfg.events.spool.segment_bytes == 0
        || cfg.events.spool.segment_bytes > cfg.events.spool.max_bytes
    {
        err(
            &["events", "spool", "segment_bytes"],
            "events.spool.segment_bytes must be between 1 and max_bytes".into(),
        );
    }
    if let Some(k) = &cfg.events.kafka {
        if k.bootstrap_servers.trim().is_empty() || k.topic.trim().is_empty() {
            err(
                &["events", "kafka"],
                "events.kafka needs bootstrap_servers and topic".into(),
            );
        }
    }
    let mut prefixes = vec![cfg.fhir_prefix.clone()];
    for (i, r) in cfg.routes.iter().enumerate() {
        let idx = i.to_string();
        if !is_valid_prefix(&r.prefix) {
            err(
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
            err(
                &["routes", &idx, "prefix"],
                format!("routes[{i}].prefix: {:?} overlaps another route", r.prefix),
            );
        }
        prefixes.push(r.prefix.clone());
        if let Some(p) = &r.public_base_url {
            if let Err(e) = crate::upstream::BaseUrl::parse(p) {
                err(
                    &["routes", &idx, "public_base_url"],
                    format!("routes[{i}].public_base_url: {e}"),
                );
            }
        }
        validate_chains(&["routes", &idx], &r.pre, &r.post, &r.policy, &mut err);
    }
    for (i, p) in cfg.trusted_proxies.iter().enumerate() {
        if crate::net::IpNet::parse(p).is_none() {
            err(
                &["trusted_proxies", &i.to_string()],
                format!("trusted_proxies[{i}]: {p:?} is not an IP address or CIDR"),
            );
        }
    }
    if !crate::headers::is_header_safe(&cfg.gateway_name) || cfg.gateway_name.is_empty() {
        err(
            &["gateway_name"],
            "gateway_name: must be a non-empty printable header value".into(),
        );
    }

    let up = &cfg.upstream;
    match crate::upstream::BaseUrl::parse(&up.url) {
        Ok(_) => {}
        Err(e) => err(&["upstream", "url"], format!("upstream.url: {e}")),
    }
    if let Some(ca) = &up.tls.ca_file {
        if !Path::new(ca).is_file() {
            err(
                &["upstream", "tls", "ca_file"],
                format!("upstream.tls.ca_file: {ca} does not exist"),
            );
        }
    }
    let t = &up.timeouts;
    for (key, v) in [
        ("connect_ms", t.connect_ms),
        ("tls_handshake_ms", t.tls_handshake_ms),
        ("read_ms", t.read_ms),
        ("write_ms", t.write_ms),
        ("total_ms", t.total_ms),
        ("idle_ms", t.idle_ms),
    ] {
        if v == 0 {
            err(
                &["upstream", "timeouts", key],
                format!("upstream.timeouts.{key}: must be > 0 (there is no 'no timeout')"),
            );
        }
    }
    if up.retries.max_attempts == 0 || up.retries.max_attempts > 10 {
        err(
            &["upstream", "retries", "max_attempts"],
            "upstream.retries.max_attempts: must be 1..=10".into(),
        );
    }
    let mut reserved: Vec<String> = Vec::new();
    if let Some(a) = &cfg.auth {
        let h = &a.audit_headers;
        reserved.extend(
            [&h.user_id, &h.upn, &h.tenant, &h.source, &h.proxy].map(|s| s.to_ascii_lowercase()),
        );
        if let Some(o) = &a.offload {
            reserved.push(o.header.to_ascii_lowercase());
        }
    }
    for (i, h) in up.forward_headers.iter().enumerate() {
        let why = crate::headers::forbidden_forward_header(h).or_else(|| {
            reserved
                .contains(&h.to_ascii_lowercase())
                .then_some("is an audit or offload-proof header: never forwarded from the client")
        });
        if let Some(why) = why {
            err(
                &["upstream", "forward_headers", &i.to_string()],
                format!("upstream.forward_headers[{i}]: {h:?} {why}"),
            );
        }
    }
    match &up.identity {
        IdentityConfig::None => {}
        IdentityConfig::StaticBearer { token } => {
            if token.trim().is_empty() || !crate::headers::is_header_safe(token) {
                err(
                    &["upstream", "identity", "token"],
                    "upstream.identity.token: empty or not header-safe".into(),
                );
            }
        }
        IdentityConfig::ClientCredentials {
            token_url,
            client_id,
            client_secret,
            scope,
            resource,
            ..
        } => {
            if let Err(e) = check_http_url(token_url) {
                err(
                    &["upstream", "identity", "token_url"],
                    format!("upstream.identity.token_url: {e}"),
                );
            } else if !is_https_or_loopback(token_url) {
                err(
                    &["upstream", "identity", "token_url"],
                    "upstream.identity.token_url: the client secret must travel over https (http only on loopback)".into(),
                );
            }
            if client_id.is_empty() {
                err(
                    &["upstream", "identity", "client_id"],
                    "upstream.identity.client_id: required".into(),
                );
            }
            if client_secret.is_empty() {
                err(
                    &["upstream", "identity", "client_secret"],
                    "upstream.identity.client_secret: required".into(),
                );
            }
            if scope.is_none() == resource.is_none() {
                err(
                    &["upstream", "identity"],
                    "upstream.identity: give exactly one of scope (Entra v2) or resource (Entra v1)"
                        .into(),
                );
            }
        }
        IdentityConfig::ManagedIdentity {
            imds_url, resource, ..
        } => {
            if let Err(e) = check_http_url(imds_url) {
                err(
                    &["upstream", "identity", "imds_url"],
                    format!("upstream.identity.imds_url: {e}"),
                );
            }
            if resource.is_empty() {
                err(
                    &["upstream", "identity", "resource"],
                    "upstream.identity.resource: required".into(),
                );
            }
        }
    }

    let lim = &cfg.limits;
    if lim.max_query_bytes < 1024 {
        err(
            &["limits", "max_query_bytes"],
            "limits.max_query_bytes: must be at least 1024".into(),
        );
    }
    if lim.downstream_keepalive_secs == 0 {
        // Pingora reads 0 as "no idle timeout": the trap this setting exists to avoid.
        err(
            &["limits", "downstream_keepalive_secs"],
            "limits.downstream_keepalive_secs: must be > 0".into(),
        );
    }
    if lim.max_buffered_response_bytes < 1024 {
        err(
            &["limits", "max_buffered_response_bytes"],
            "limits.max_buffered_response_bytes: must be at least 1024".into(),
        );
    }

    match &cfg.auth {
        None => err(
            &["auth"],
            "auth: required (there is no default; insecure_dev is for loopback development only)"
                .into(),
        ),
        Some(a) => {
            validate_auth(a, &mut err);
            if a.mode == AuthMode::InsecureDev {
                for a in &addrs {
                    if !a.ip().is_loopback() {
                        err(
                            &["auth", "mode"],
                            format!(
                                "auth.mode: insecure_dev refuses to listen on non-loopback address {a}"
                            ),
                        );
                    }
                }
            }
        }
    }
    if !up.tls.verify && cfg.auth.as_ref().map(|a| a.mode) != Some(AuthMode::InsecureDev) {
        err(
            &["upstream", "tls", "verify"],
            "upstream.tls.verify: false is only allowed with auth.mode insecure_dev".into(),
        );
    }

    if log_level(&cfg.logging.level).is_none() {
        err(
            &["logging", "level"],
            format!(
                "logging.level: {:?} is not error|warn|info|debug|trace",
                cfg.logging.level
            ),
        );
    }
    if cfg.health.upstream_check_interval_ms < 100 {
        err(
            &["health", "upstream_check_interval_ms"],
            "health.upstream_check_interval_ms: must be at least 100".into(),
        );
    }
    match cfg.server_conf() {
        Ok(sc) if sc.threads == 0 => err(
            &["pingora", "threads"],
            "pingora.threads: must be > 0".into(),
        ),
        Ok(_) => {}
        Err(e) => err(&["pingora"], format!("pingora: {e}")),
    }
    // Pingora ignores keys it does not know; a misspelt grace period would silently become
    // 300 s and systemd would SIGKILL the gateway. Refuse them here.
    if let serde_yaml::Value::Mapping(m) = &cfg.pingora {
        let known = serde_yaml::to_value(ServerConf::default()).unwrap_or_default();
        let known = known.as_mapping().cloned().unwrap_or_default();
        for k in m.keys() {
            if !known.contains_key(k) {
                let name = k.as_str().unwrap_or("?");
                err(&["pingora", name], format!("pingora: unknown key {name:?}"));
            }
        }
    }
    errs
}

impl GatewayConfig {
    /// Pingora's `ServerConf` with our defaults where the file says nothing: one worker thread
    /// per core (Pingora's default is 1) and grace periods that fit systemd's stop timeout
    /// (Pingora's are 300 s + 5 s).
    pub fn server_conf(&self) -> Result<ServerConf, String> {
        let mut v = match &self.pingora {
            serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
            m @ serde_yaml::Value::Mapping(_) => m.clone(),
            _ => return Err("must be a mapping".into()),
        };
        let m = v.as_mapping_mut().expect("mapping");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for (k, default) in [
            ("threads", cores as u64),
            ("grace_period_seconds", 10),
            ("graceful_shutdown_timeout_seconds", 5),
        ] {
            let key = serde_yaml::Value::String(k.into());
            if !m.contains_key(&key) {
                m.insert(key, serde_yaml::Value::Number(default.into()));
            }
        }
        let mut sc: ServerConf = serde_yaml::from_value(v).map_err(|e| e.to_string())?;
        sc.upstream_keepalive_pool_size = self.upstream.pool_size;
        Ok(sc)
    }
}

/// Builds every module once, so `-t` reports unknown names and bad settings with their line.
fn validate_chains(
    at: &[&str],
    pre: &[ModuleConfig],
    post: &[ModuleConfig],
    policy: &RolePolicyConfig,
    err: &mut dyn FnMut(&[&str], String),
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
                err(&path, format!("{label}{list}[{i}]: {e}"));
            }
        }
    }
    for (k, roles) in [("read", &policy.read), ("write", &policy.write)] {
        for r in roles {
            if crate::auth::policy::role_by_name(r).is_none() {
                let mut path: Vec<&str> = at.to_vec();
                path.extend(["policy", k]);
                err(&path, format!("{label}policy.{k}: unknown role {r:?}"));
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
            err(
                &path,
                format!(
                    "{label}policy grants the participant role {r} but the post chain has no ParticipantFilter: they would see every patient"
                ),
            );
            break;
        }
    }
}

fn validate_auth(a: &AuthConfig, err: &mut dyn FnMut(&[&str], String)) {
    if a.mode == AuthMode::Jwt && a.issuers.is_empty() {
        err(
            &["auth", "issuers"],
            "auth.issuers: jwt mode needs at least one trusted issuer".into(),
        );
    }
    let mut names = std::collections::HashSet::new();
    for (i, iss) in a.issuers.iter().enumerate() {
        let idx = i.to_string();
        let at = |k: &'static str| -> Vec<String> {
            vec!["auth".into(), "issuers".into(), idx.clone(), k.into()]
        };
        let mut e = |k: &'static str, m: String| {
            let p = at(k);
            let p: Vec<&str> = p.iter().map(String::as_str).collect();
            err(&p, format!("auth.issuers[{i}].{k}: {m}"));
        };
        if !names.insert(iss.name.clone()) || iss.name.is_empty() {
            e("name", "must be non-empty and unique".into());
        }
        let issuers = iss.issuer.to_vec();
        if issuers.is_empty() || issuers.iter().any(|s| s.is_empty()) {
            e("issuer", "at least one non-empty issuer value".into());
        }
        if iss.audiences.is_empty() || iss.audiences.iter().any(|s| s.is_empty()) {
            e(
                "audiences",
                "at least one audience is required (tokens for other APIs must not pass)".into(),
            );
        }
        for (k, u) in [
            ("discovery_url", &iss.discovery_url),
            ("jwks_url", &iss.jwks_url),
        ] {
            if let Some(u) = u {
                if let Err(m) = check_http_url(u) {
                    e(k, m);
                }
            }
        }
        let algs = iss.algorithms.clone().unwrap_or_default();
        let wants_hs = algs.iter().any(|a| a.starts_with("HS"));
        const SUPPORTED: &[&str] = &[
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "HS256",
            "HS384", "HS512",
        ];
        for a in &algs {
            if !SUPPORTED.contains(&a.as_str()) {
                e(
                    "algorithms",
                    format!(
                        "{a:?} is not supported (RS*, PS*, ES256/384, HS* with a shared_secret)"
                    ),
                );
            }
        }
        for (k, u) in [
            ("discovery_url", &iss.discovery_url),
            ("jwks_url", &iss.jwks_url),
        ] {
            if let Some(u) = u {
                if !is_https_or_loopback(u) {
                    e(
                        k,
                        format!("{u:?}: signing keys must come over https (http only on loopback)"),
                    );
                }
            }
        }
        if iss.discovery_url.is_none() && iss.jwks_url.is_none() && iss.shared_secret.is_none() {
            e(
                "jwks_url",
                "give discovery_url or jwks_url (or a shared_secret)".into(),
            );
        }
        match &iss.shared_secret {
            Some(s) if s.len() < 32 => e("shared_secret", "must be at least 32 bytes".into()),
            None if wants_hs => e("algorithms", "HS* algorithms need a shared_secret".into()),
            _ => {}
        }
    }
    if let Some(name) = &a.smart.issuer {
        if !a.issuers.iter().any(|i| &i.name == name) {
            err(
                &["auth", "smart", "issuer"],
                format!("auth.smart.issuer: no issuer named {name:?}"),
            );
        }
    }
    if a.mode != AuthMode::Jwt && (!a.issuers.is_empty() || a.offload.is_some()) {
        err(
            &["auth", "mode"],
            "auth.mode: issuers and offload are only used with mode jwt".into(),
        );
    }
    if let Some(o) = &a.offload {
        if http::HeaderName::from_bytes(o.header.as_bytes()).is_err() {
            err(
                &["auth", "offload", "header"],
                "auth.offload.header: not a header name".into(),
            );
        }
        if o.secret.len() < 16 {
            err(
                &["auth", "offload", "secret"],
                "auth.offload.secret: must be at least 16 bytes".into(),
            );
        }
    }
    let h = &a.audit_headers;
    for (k, v) in [
        ("user_id", &h.user_id),
        ("upn", &h.upn),
        ("tenant", &h.tenant),
        ("source", &h.source),
        ("proxy", &h.proxy),
    ] {
        if http::HeaderName::from_bytes(v.as_bytes()).is_err() {
            err(
                &["auth", "audit_headers", k],
                format!("auth.audit_headers.{k}: {v:?} is not a header name"),
            );
        }
    }
    if a.jwks.min_refetch_secs == 0
        || a.jwks.retry_secs == 0
        || a.jwks.refresh_secs == 0
        || a.jwks.timeout_ms == 0
    {
        err(
            &["auth", "jwks"],
            "auth.jwks: every interval must be > 0".into(),
        );
    }
}

pub fn log_level(s: &str) -> Option<log::LevelFilter> {
    match s {
        "error" => Some(log::LevelFilter::Error),
        "warn" => Some(log::LevelFilter::Warn),
        "info" => Some(log::LevelFilter::Info),
        "debug" => Some(log::LevelFilter::Debug),
        "trace" => Some(log::LevelFilter::Trace),
        _ => None,
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
