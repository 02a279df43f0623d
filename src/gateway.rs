//! The runtime object built from a validated configuration and shared by every request.

use crate::auth::Authenticator;
use crate::config::{AuthMode, GatewayConfig, LimitsConfig, RetryConfig, SmartConfig};
use crate::headers::FORWARDED_REQUEST_HEADERS;
use crate::health::Health;
use crate::net::IpNet;
use crate::rewrite::{Replacements, Rewriter};
use crate::upstream::identity::ServiceIdentity;
use crate::upstream::{BaseUrl, Upstream};
use http::HeaderName;
use std::time::Duration;

pub struct Gateway {
    pub prefix: String,
    /// Configured public base and its encoded forms; `None` = derived per request.
    pub public_base: Option<(String, Replacements)>,
    pub name: String,
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
    /// Audit header names: user id, UPN, tenant, source, proxy.
    pub audit: [HeaderName; 5],
    pub access_log: bool,
    pub health: Health,
    /// Client for calls to identity providers (token endpoint, discovery, JWKS).
    pub http: reqwest::Client,
    /// Client for calls the gateway makes to the FHIR server itself (buffered requests,
    /// modules): the upstream's CA and verification settings, pooled.
    pub upstream_http: reqwest::Client,
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
        let t = &cfg.upstream.timeouts;
        let mut ub = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(t.connect_ms))
            .timeout(Duration::from_millis(t.total_ms))
            .read_timeout(Duration::from_millis(t.read_ms))
            .pool_idle_timeout(Duration::from_millis(t.idle_ms))
            .pool_max_idle_per_host(cfg.upstream.pool_size)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &cfg.upstream.tls.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("{ca}: {e}"))?;
            for cert in
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| format!("{ca}: {e}"))?
            {
                ub = ub.add_root_certificate(cert);
            }
        }
        if !cfg.upstream.tls.verify {
            ub = ub.danger_accept_invalid_certs(true);
        }
        let upstream_http = ub
            .build()
            .map_err(|e| format!("upstream HTTP client: {e}"))?;
        let auth_cfg = cfg.auth.as_ref().ok_or("auth: required")?;
        let auth = Authenticator::new(
            auth_cfg,
            reqwest::Client::builder()
                .timeout(Duration::from_millis(auth_cfg.jwks.timeout_ms))
                .build()
                .map_err(|e| format!("HTTP client: {e}"))?,
        )?;
        let a = &auth_cfg.audit_headers;
        let hn = |s: &str| HeaderName::from_bytes(s.as_bytes()).map_err(|e| format!("{s}: {e}"));
        let audit = [
            hn(&a.user_id)?,
            hn(&a.upn)?,
            hn(&a.tenant)?,
            hn(&a.source)?,
            hn(&a.proxy)?,
        ];
        let rewriter = Rewriter::new(&upstream.base.spellings());
        let public_base = match &cfg.public_base_url {
            Some(p) => {
                let s = BaseUrl::parse(p)?.as_string();
                let r = rewriter.replacements(&s);
                Some((s, r))
            }
            None => None,
        };
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
            prefix: cfg.fhir_prefix.clone(),
            public_base,
            name: cfg.gateway_name.clone(),
            identity,
            rewriter,
            trusted_proxies: cfg
                .trusted_proxies
                .iter()
                .filter_map(|p| IpNet::parse(p))
                .collect(),
            limits: cfg.limits,
            retries: cfg.upstream.retries,
            forward,
            auth_mode: auth_cfg.mode,
            auth,
            smart: auth_cfg.smart.clone(),
            audit,
            upstream_http,
            access_log: cfg.logging.access_log,
            health: Health::default(),
            http,
            upstream,
        })
    }

    pub fn is_trusted_proxy(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(ip))
    }
}
