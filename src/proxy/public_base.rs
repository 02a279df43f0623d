//! The public base a caller sees: configured per route, or derived from the scheme and `Host`
//! (trusted `X-Forwarded-*`) and cached per authority with its encoded forms.

use super::*;

pub(super) enum PublicBase {
    Configured,
    /// Built from the request (Host / trusted X-Forwarded-*): the base and its encoded forms.
    Derived(String, Replacements),
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
    pub(super) fn public_base_string(&self, ctx: &Ctx) -> String {
        let route = &self.gw.routes[ctx.route];
        match (&route.public_base, &ctx.public_base) {
            (Some((b, _)), _) => b.clone(),
            (None, Some(PublicBase::Derived(b, _))) => b.clone(),
            _ => route.prefix.clone(),
        }
    }

    /// `scheme://host/prefix` as this caller addressed the gateway.
    pub(super) fn derived_public_base(
        &self,
        session: &Session,
        client_ip: Option<IpAddr>,
        prefix: &str,
    ) -> std::result::Result<String, GatewayError> {
        let req = session.req_header();
        let trusted = client_ip.is_some_and(|ip| self.gw.is_trusted_proxy(ip));
        let header = |name: &str| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(',').next().unwrap_or("").trim().to_string())
        };
        let tls = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .is_some();
        let mut scheme = if tls { "https" } else { "http" }.to_string();
        let mut host = header("host").or_else(|| req.uri.authority().map(|a| a.to_string()));
        if trusted {
            if let Some(p) = header("x-forwarded-proto") {
                if p == "http" || p == "https" {
                    scheme = p;
                }
            }
            if let Some(h) = header("x-forwarded-host") {
                host = Some(h);
            }
        }
        let host = host.ok_or_else(|| GatewayError::BadRequest("no Host header".into()))?;
        if !valid_authority(&host) {
            return Err(GatewayError::BadRequest("invalid Host header".into()));
        }
        Ok(format!("{scheme}://{host}{prefix}"))
    }

    pub(super) fn replacements<'a>(&'a self, ctx: &'a Ctx) -> Option<&'a Replacements> {
        match ctx.public_base.as_ref()? {
            PublicBase::Configured => self.gw.routes[ctx.route]
                .public_base
                .as_ref()
                .map(|(_, r)| r),
            PublicBase::Derived(_, r) => Some(r),
        }
    }
}
