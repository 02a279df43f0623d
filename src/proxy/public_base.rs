//! The public base a caller sees: configured per route, or derived from the scheme and `Host`
//! (trusted `X-Forwarded-*`) and cached per authority with its encoded forms.

use super::*;
use std::collections::HashMap;
use std::sync::RwLock;

pub(super) enum PublicBase {
    Configured,
    /// Built from the request (Host / trusted X-Forwarded-*): the base and its encoded forms.
    Derived(Arc<Derived>),
}

pub struct Derived {
    base: Arc<str>,
    replacements: Replacements,
}

/// Authorities remembered per route and scheme. `Host` is the caller's to choose: past this
/// many, a new one is computed for its request and not kept.
const MAX_HOSTS: usize = 64;

/// Derived public bases by route, scheme (http, https) and authority: formatting a base and
/// encoding it four ways is done once per Host, not per request.
#[derive(Default)]
pub struct BaseCache(Vec<[Hosts; 2]>);

type Hosts = RwLock<HashMap<String, Arc<Derived>>>;

impl BaseCache {
    pub fn new(routes: usize) -> BaseCache {
        BaseCache((0..routes).map(|_| Default::default()).collect())
    }
}

/// A `Host` / `X-Forwarded-Host` value safe to build URLs from.
pub(crate) fn valid_authority(h: &str) -> bool {
    if h.is_empty() || h.len() > 255 {
        return false;
    }
    // host [":" port], RFC 9112 §3.2 / RFC 3986 §3.2: the port is digits, once.
    let (host, port) = if let Some(v6) = h.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return false;
        };
        if addr.is_empty()
            || !addr
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b":.".contains(&b))
        {
            return false;
        }
        match after {
            "" => return true,
            p => match p.strip_prefix(':') {
                Some(p) => ("v6", p),
                None => return false,
            },
        }
    } else {
        match h.split_once(':') {
            Some((host, port)) => (host, port),
            None => (h, "0"),
        }
    };
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        && !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
}

impl FhirProxy {
    /// The public base this caller sees (shared: cloning it is a reference count).
    pub(super) fn public_base_of(&self, ctx: &Ctx) -> Arc<str> {
        let route = &self.gw.routes[ctx.route];
        match (&route.public_base, &ctx.public_base) {
            (Some((b, _)), _) => b.clone(),
            (None, Some(PublicBase::Derived(d))) => d.base.clone(),
            _ => route.prefix.as_str().into(),
        }
    }

    /// `scheme://host/prefix` as this caller addressed the gateway, with its encoded forms.
    pub(super) fn derived_public_base(
        &self,
        req: &RequestHeader,
        tls: bool,
        client_ip: Option<IpAddr>,
        route: usize,
    ) -> std::result::Result<Arc<Derived>, GatewayError> {
        let trusted = client_ip.is_some_and(|ip| self.gw.is_trusted_proxy(ip));
        let header = |name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(',').next().unwrap_or("").trim())
        };
        let mut https = tls;
        let mut host = header("host").or_else(|| req.uri.authority().map(|a| a.as_str()));
        if trusted {
            match header("x-forwarded-proto") {
                Some("http") => https = false,
                Some("https") => https = true,
                _ => {}
            }
            if let Some(h) = header("x-forwarded-host") {
                host = Some(h);
            }
        }
        let host = host.ok_or_else(|| GatewayError::BadRequest("no Host header".into()))?;
        let slot: &Hosts = &self.bases.0[route][https as usize];
        if let Some(d) = slot.read().expect("base cache").get(host) {
            return Ok(d.clone());
        }
        if !valid_authority(host) {
            return Err(GatewayError::BadRequest("invalid Host header".into()));
        }
        let scheme = if https { "https" } else { "http" };
        let base = format!("{scheme}://{host}{}", self.gw.routes[route].prefix);
        let d = Arc::new(Derived {
            replacements: self.gw.rewriter.replacements(&base),
            base: base.into(),
        });
        let mut slot = slot.write().expect("base cache");
        if slot.len() < MAX_HOSTS {
            slot.insert(host.to_string(), d.clone());
        }
        Ok(d)
    }

    pub(super) fn replacements<'a>(&'a self, ctx: &'a Ctx) -> Option<&'a Replacements> {
        match ctx.public_base.as_ref()? {
            PublicBase::Configured => self.gw.routes[ctx.route]
                .public_base
                .as_ref()
                .map(|(_, r)| r),
            PublicBase::Derived(d) => Some(&d.replacements),
        }
    }
}
