//! `auth`: who callers are (JWT issuers, or no one in `insecure_dev`), and the audit headers
//! that tell the FHIR server.

use super::{check_http_url, is_https_or_loopback, Errors};
use serde::Deserialize;
use std::net::SocketAddr;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// Tolerance for `exp` / `nbf` / `iat`, seconds.
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

/// Checks the section; `addrs` are the listen addresses (`insecure_dev` keeps to loopback).
pub(super) fn validate(auth: Option<&AuthConfig>, addrs: &[SocketAddr], errs: &mut Errors) {
    match auth {
        None => errs.at(
            &["auth"],
            "auth: required (there is no default; insecure_dev is for loopback development only)"
                .into(),
        ),
        Some(a) => {
            validate_auth(a, errs);
            if a.mode == AuthMode::InsecureDev {
                for a in addrs {
                    if !a.ip().is_loopback() {
                        errs.at(
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
}

fn validate_auth(a: &AuthConfig, errs: &mut Errors) {
    if a.mode == AuthMode::Jwt && a.issuers.is_empty() {
        errs.at(
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
            errs.at(&p, format!("auth.issuers[{i}].{k}: {m}"));
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
            errs.at(
                &["auth", "smart", "issuer"],
                format!("auth.smart.issuer: no issuer named {name:?}"),
            );
        }
    }
    if a.mode != AuthMode::Jwt && (!a.issuers.is_empty() || a.offload.is_some()) {
        errs.at(
            &["auth", "mode"],
            "auth.mode: issuers and offload are only used with mode jwt".into(),
        );
    }
    if let Some(o) = &a.offload {
        if http::HeaderName::from_bytes(o.header.as_bytes()).is_err() {
            errs.at(
                &["auth", "offload", "header"],
                "auth.offload.header: not a header name".into(),
            );
        }
        if o.secret.len() < 16 {
            errs.at(
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
            errs.at(
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
        errs.at(
            &["auth", "jwks"],
            "auth.jwks: every interval must be > 0".into(),
        );
    }
}
