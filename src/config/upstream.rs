//! `upstream`: the FHIR server, how the gateway reaches it and who it is towards it.

use super::{check_http_url, is_https_or_loopback, AuthConfig, AuthMode, Errors};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Base URL of the FHIR server, with or without trailing slash.
    pub url: String,
    #[serde(default)]
    pub tls: UpstreamTls,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    /// Idle keep-alive connections kept to the FHIR server, per worker thread and per road
    /// (Pingora's rule: each connector's pool holds `pool_size` x threads).
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

/// Checks the section; `auth` names the headers clients may not forward and decides whether
/// certificate verification may be off.
pub(super) fn validate(up: &UpstreamConfig, auth: Option<&AuthConfig>, errs: &mut Errors) {
    match crate::upstream::BaseUrl::parse(&up.url) {
        Ok(_) => {}
        Err(e) => errs.at(&["upstream", "url"], format!("upstream.url: {e}")),
    }
    if let Some(ca) = &up.tls.ca_file {
        if !Path::new(ca).is_file() {
            errs.at(
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
            errs.at(
                &["upstream", "timeouts", key],
                format!("upstream.timeouts.{key}: must be > 0 (there is no 'no timeout')"),
            );
        }
    }
    if up.retries.max_attempts == 0 || up.retries.max_attempts > 10 {
        errs.at(
            &["upstream", "retries", "max_attempts"],
            "upstream.retries.max_attempts: must be 1..=10".into(),
        );
    }
    let mut reserved: Vec<String> = Vec::new();
    if let Some(a) = auth {
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
            errs.at(
                &["upstream", "forward_headers", &i.to_string()],
                format!("upstream.forward_headers[{i}]: {h:?} {why}"),
            );
        }
    }
    match &up.identity {
        IdentityConfig::None => {}
        IdentityConfig::StaticBearer { token } => {
            if token.trim().is_empty() || !crate::headers::is_header_safe(token) {
                errs.at(
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
                errs.at(
                    &["upstream", "identity", "token_url"],
                    format!("upstream.identity.token_url: {e}"),
                );
            } else if !is_https_or_loopback(token_url) {
                errs.at(
                    &["upstream", "identity", "token_url"],
                    "upstream.identity.token_url: the client secret must travel over https (http only on loopback)".into(),
                );
            }
            if client_id.is_empty() {
                errs.at(
                    &["upstream", "identity", "client_id"],
                    "upstream.identity.client_id: required".into(),
                );
            }
            if client_secret.is_empty() {
                errs.at(
                    &["upstream", "identity", "client_secret"],
                    "upstream.identity.client_secret: required".into(),
                );
            }
            if scope.is_none() == resource.is_none() {
                errs.at(
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
                errs.at(
                    &["upstream", "identity", "imds_url"],
                    format!("upstream.identity.imds_url: {e}"),
                );
            }
            if resource.is_empty() {
                errs.at(
                    &["upstream", "identity", "resource"],
                    "upstream.identity.resource: required".into(),
                );
            }
        }
    }
    if !up.tls.verify && auth.map(|a| a.mode) != Some(AuthMode::InsecureDev) {
        errs.at(
            &["upstream", "tls", "verify"],
            "upstream.tls.verify: false is only allowed with auth.mode insecure_dev".into(),
        );
    }
}
