//! The whole request path, hook by hook (see docs/architecture.md):
//!
//! 1. `request_filter`: correlation id, routing (`/healthz`, `/readyz`, the FHIR prefix, 404
//!    for the rest), request checks (method, path, query and body limits), caller
//!    authentication, the service credential for the upstream call.
//! 2. `upstream_peer`: the FHIR server, with every timeout set; waits out a retry delay.
//! 3. `upstream_request_filter`: a fresh upstream request built from an allow-list of
//!    headers (the caller's `Authorization` and `Accept-Encoding` never cross), the service
//!    credential, correlation id and audit headers.
//! 4. `request_body_filter`: counts the streamed body against the limit.
//! 5. `upstream_response_filter`: 429/503 on idempotent requests become retries.
//! 6. `response_filter`: headers cleaned and rewritten; text bodies marked for rewriting.
//! 7. `response_body_filter`: streaming rewrite of the upstream base URL.
//! 8. `fail_to_proxy`: every failure becomes an OperationOutcome.
//! 9. `logging`: one access-log line.

mod json_guard;
mod manage;
#[cfg(test)]
mod tests;

use crate::auth::{policy, AuthError};
use crate::chain::{self, PreResult};
use crate::config::AuthMode;
use crate::error::GatewayError;
use crate::gateway::{Gateway, CACHED_TYPES};
use crate::headers::{self, DROPPED_RESPONSE_HEADERS, MS_REQUEST_ID, REQUEST_ID};
use crate::rewrite::{Replacements, StreamRewrite};
use crate::upstream::client::{CallIdentity, GatewayFhirClient};
use async_trait::async_trait;
use bytes::Bytes;
use fhir_gateway_modules::processor::FhirClient;
use fhir_gateway_modules::processor::{
    Body as ModBody, ClientRequest, Context, Request as ModRequest, Response as ModResponse,
};
use fhir_gateway_modules::request::{classify, classify_bundle, Interaction};
use fhir_gateway_modules::{Identity, Role};
use http::{HeaderValue, Method};
use log::{info, warn};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::{Error, ErrorSource, ErrorType, Result};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct FhirProxy {
    pub gw: Arc<Gateway>,
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    correlation_id: String,
    /// Path below the public prefix (`/Patient/1`, or `""` for the base) and raw query.
    rest: String,
    query: Option<Vec<u8>>,
    client_ip: Option<IpAddr>,
    /// Index into `Gateway::routes`, valid when `routed`.
    route: usize,
    routed: bool,
    /// The client as audited: the peer, or the first untrusted hop of `X-Forwarded-For`
    /// when the peer is a trusted proxy.
    source: Option<String>,
    identity: Option<Identity>,
    /// `/metadata`: the CapabilityStatement gets its `rest[].security` set.
    metadata: bool,
    /// Whole-body buffer for responses the gateway transforms (not plain rewriting).
    buffer: Option<Vec<u8>>,
    /// Public base this caller sees (depends on Host unless configured).
    public_base: Option<PublicBase>,
    service_auth: Option<HeaderValue>,
    attempts: u32,
    retry_delay: Option<Duration>,
    request_body_bytes: u64,
    rewrite: Option<StreamRewrite>,
    upstream_status: Option<u16>,
    /// The error to render when a hook fails with one of ours.
    error: Option<GatewayError>,
    /// Resource types this request writes: their caches are dropped once it succeeds.
    written: Vec<String>,
    /// When the streamed request went upstream (for the upstream latency).
    upstream_sent: Option<Instant>,
    /// Time to the FHIR server's response header, for the access log.
    upstream_ms: Option<u128>,
    /// The client left before the module path answered (logged as 499).
    client_gone: bool,
    /// A JSON write body streamed upstream is checked on its way.
    json_guard: Option<json_guard::JsonGuard>,
}

/// Resolves when the client closes its side of the connection (read side at EOF or reset).
/// Bytes of a pipelined next request are kept for it (pipelining is on), not treated as a
/// close.
async fn client_gone(session: &mut Session) {
    loop {
        if session
            .downstream_session
            .read_body_or_idle(true)
            .await
            .is_err()
        {
            return;
        }
    }
}

/// How an admitted request continues.
enum Admit {
    /// Through Pingora, streaming.
    Proxy,
    /// The gateway read the body: it makes the upstream call itself.
    Buffered(Bytes),
}

enum PublicBase {
    Configured,
    /// Built from the request (Host / trusted X-Forwarded-*): the base and its encoded forms.
    Derived(String, Replacements),
}

impl Ctx {
    fn fail(&mut self, e: GatewayError) -> Box<Error> {
        let status = e.status();
        let msg = e.to_string();
        self.error = Some(e);
        Error::explain(ErrorType::HTTPStatus(status), msg)
    }
}

/// A module's own OperationOutcome carries the correlation id too, like every gateway error.
fn tag_outcome(r: &mut ModResponse, correlation_id: &str) {
    let Some(body) = r.json_body_mut() else {
        return;
    };
    if body.get("resourceType").and_then(Value::as_str) != Some("OperationOutcome") {
        return;
    }
    if let Some(issues) = body.get_mut("issue").and_then(Value::as_array_mut) {
        for i in issues {
            let d = i
                .get("diagnostics")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            i["diagnostics"] = json!(format!("{d} (correlation id {correlation_id})")
                .trim_start()
                .to_string());
        }
    }
}

/// Methods of the FHIR REST API.
fn is_fhir_method(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// Methods retried on connect failure, 429 and 503. Never POST or PATCH.
fn is_retryable_method(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::PUT | Method::DELETE
    )
}

/// Rejects paths that could escape the upstream base once the server decodes them.
pub fn check_path(rest: &[u8]) -> std::result::Result<(), &'static str> {
    if rest.iter().any(|&b| b < 0x21 || b == 0x7f || b == b'\\') {
        return Err("control characters, spaces or backslashes in the path");
    }
    if rest.iter().any(|&b| b >= 0x80 || b == b';') {
        // `;` path parameters (`..;/`) are stripped by some servers before resolving `..`.
        return Err("non-ASCII bytes or ';' in the path");
    }
    let lower = rest.to_ascii_lowercase();
    for bad in [&b"%2f"[..], b"%5c", b"%2e", b"%00", b"%25", b"%3b"] {
        if memchr::memmem::find(&lower, bad).is_some() {
            return Err("encoded '/', '\\', '.', '%', ';' or NUL in the path");
        }
    }
    // Escapes of bytes >= 0x80: FHIR paths are ASCII, and overlong UTF-8 (`%c0%ae`) decodes
    // to '.' or '/' on lenient servers.
    for i in memchr::memchr_iter(b'%', &lower) {
        if lower.get(i + 1).is_some_and(|c| b"89abcdef".contains(c)) {
            return Err("percent-encoded non-ASCII bytes in the path");
        }
    }
    if rest
        .split(|&b| b == b'/')
        .skip(1)
        .any(|seg| seg == b"." || seg == b"..")
    {
        return Err("'.' or '..' path segments");
    }
    if memchr::memmem::find(rest, b"//").is_some() {
        return Err("empty path segment");
    }
    Ok(())
}

/// Request body media types the FHIR REST API takes (besides raw content for Binary).
fn fhir_media_type(m: &str) -> bool {
    matches!(
        m,
        "application/fhir+json"
            | "application/json"
            | "application/json+fhir"
            | "application/fhir+xml"
            | "application/xml"
            | "application/xml+fhir"
            | "text/xml"
            | "application/json-patch+json"
            | "application/x-www-form-urlencoded"
            | "application/fhir+ndjson"
            | "application/x-ndjson"
    )
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

/// `Retry-After` seconds or `x-ms-retry-after-ms`.
fn retry_after(h: &ResponseHeader) -> Option<Duration> {
    if let Some(ms) = h
        .headers
        .get("x-ms-retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some(Duration::from_millis(ms));
    }
    h.headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Content types whose bodies are rewritten. Binary payloads (a PDF in a `Binary`) are
/// passed untouched: changing their bytes would corrupt them.
fn is_rewritable(content_type: Option<&[u8]>) -> bool {
    let Some(ct) = content_type else {
        return true;
    };
    let ct = ct.to_ascii_lowercase();
    let ct = ct.split(|&b| b == b';').next().unwrap_or(&[]);
    let ct = ct.trim_ascii();
    ct.starts_with(b"text/")
        || ct.ends_with(b"json")
        || ct.ends_with(b"xml")
        || ct == b"application/x-ndjson"
        || ct == b"application/fhir+ndjson"
}

/// Finds identifiers of the link `system` in a JSON tree (`found` also when the system is
/// named some other way, e.g. a JSON Patch value); collects their values.
fn link_values(v: &Value, system: &str, found: &mut bool, values: &mut BTreeSet<String>) {
    match v {
        Value::String(s) if s == system => *found = true,
        Value::Array(a) => a.iter().for_each(|x| link_values(x, system, found, values)),
        Value::Object(o) => {
            if o.get("system").and_then(Value::as_str) == Some(system) {
                *found = true;
                values.insert(
                    o.get("value")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                );
            }
            o.values()
                .for_each(|x| link_values(x, system, found, values));
        }
        _ => {}
    }
}

impl FhirProxy {
    /// Writes a complete response from the gateway itself, keeping the connection alive.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        status: u16,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<bool> {
        self.respond_with(session, ctx, status, content_type, body, None)
            .await
    }

    async fn respond_with(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        status: u16,
        content_type: &str,
        body: Vec<u8>,
        www_authenticate: Option<String>,
    ) -> Result<bool> {
        let mut h = ResponseHeader::build(status, Some(5))?;
        if let Some(c) = www_authenticate {
            h.insert_header(http::header::WWW_AUTHENTICATE, c)?;
        }
        h.insert_header(http::header::CONTENT_TYPE, content_type)?;
        h.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        h.insert_header(REQUEST_ID, ctx.correlation_id.as_str())?;
        h.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        let head_only = session.req_header().method == Method::HEAD;
        session.write_response_header(Box::new(h), false).await?;
        let body = if head_only {
            Bytes::new()
        } else {
            Bytes::from(body)
        };
        session.write_response_body(Some(body), true).await?;
        Ok(true)
    }

    async fn respond_error(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        e: GatewayError,
    ) -> Result<bool> {
        let body = e.to_outcome(&ctx.correlation_id);
        let status = e.status();
        let challenge = match &e {
            GatewayError::Unauthorized(None) => Some(format!("Bearer realm=\"{}\"", self.gw.name)),
            GatewayError::Unauthorized(Some(_)) => Some(format!(
                "Bearer realm=\"{}\", error=\"invalid_token\"",
                self.gw.name
            )),
            _ => None,
        };
        ctx.error = Some(e);
        self.respond_with(
            session,
            ctx,
            status,
            "application/fhir+json",
            body,
            challenge,
        )
        .await
    }

    /// The client address to audit: the TCP peer, unless it is a trusted proxy, then the
    /// right-most `X-Forwarded-For` hop that is not itself a trusted proxy.
    fn audit_source(&self, session: &Session, peer: Option<IpAddr>) -> Option<String> {
        let peer = peer?;
        if !self.gw.is_trusted_proxy(peer) {
            return Some(peer.to_string());
        }
        let hops: Vec<String> = session
            .req_header()
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|h| h.trim().to_string())
            .collect();
        // Right to left: skip our own proxies; the first other hop is the client. A hop that
        // is not an IP address cannot be audited as one.
        for hop in hops.iter().rev() {
            match hop.parse::<IpAddr>() {
                Ok(ip) if self.gw.is_trusted_proxy(ip) => continue,
                Ok(ip) => return Some(ip.to_string()),
                Err(_) => return Some("unknown".into()),
            }
        }
        Some(peer.to_string())
    }

    /// Everything `request_filter` checks before the request may go upstream.
    async fn admit(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<Admit, GatewayError> {
        let gw = &self.gw;
        let req = session.req_header();
        let method = req.method.clone();
        // Request smuggling: a message with both framings is refused, and its connection
        // is not reused (RFC 9112 §6.1).
        if req.headers.contains_key(http::header::CONTENT_LENGTH)
            && req.headers.contains_key(http::header::TRANSFER_ENCODING)
        {
            session.set_keepalive(None);
            return Err(GatewayError::BadRequest(
                "both Content-Length and Transfer-Encoding".into(),
            ));
        }
        let req = session.req_header();
        let header_bytes: usize = req
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        if req.headers.len() > gw.limits.max_headers {
            return Err(GatewayError::HeadersTooLarge(format!(
                "more than {} request header fields",
                gw.limits.max_headers
            )));
        }
        if header_bytes > gw.limits.max_header_bytes {
            return Err(GatewayError::HeadersTooLarge(format!(
                "request headers larger than {} bytes",
                gw.limits.max_header_bytes
            )));
        }
        if !is_fhir_method(&method) {
            return Err(GatewayError::MethodNotAllowed(format!(
                "method {method} is not part of the FHIR REST API"
            )));
        }
        // Absolute-form request lines (`GET http://host/fhir/...`) are reduced to their path:
        // the authority a client names never chooses where the gateway connects.
        let abs_form;
        let raw = if req.raw_path().starts_with(b"/") {
            req.raw_path()
        } else {
            abs_form = req
                .uri
                .path_and_query()
                .map(|p| p.as_str().as_bytes().to_vec())
                .unwrap_or_default();
            &abs_form
        };
        let (path, query) = match memchr::memchr(b'?', raw) {
            Some(q) => (&raw[..q], Some(&raw[q + 1..])),
            None => (raw, None),
        };
        let route = &gw.routes[ctx.route];
        let rest = &path[route.prefix.len()..];
        check_path(rest)
            .map_err(|why| GatewayError::BadRequest(format!("rejected path: {why}")))?;
        if let Some(q) = query {
            if q.len() > gw.limits.max_query_bytes {
                return Err(GatewayError::QueryTooLong(gw.limits.max_query_bytes));
            }
            if q.iter().any(|&b| b < 0x21 || b == 0x7f) {
                return Err(GatewayError::BadRequest(
                    "control characters or spaces in the query string".into(),
                ));
            }
        }
        let rest = String::from_utf8(rest.to_vec())
            .map_err(|_| GatewayError::BadRequest("path is not UTF-8".into()))?;
        let query = query.map(|q| q.to_vec());

        if let Some(cl) = req.headers.get(http::header::CONTENT_LENGTH) {
            let n = cl
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or_else(|| GatewayError::BadRequest("invalid Content-Length".into()))?;
            if n > gw.limits.max_request_body_bytes {
                return Err(GatewayError::RequestTooLarge(
                    gw.limits.max_request_body_bytes,
                ));
            }
        }
        let has_body = req.headers.contains_key(http::header::TRANSFER_ENCODING)
            || req
                .headers
                .get(http::header::CONTENT_LENGTH)
                .is_some_and(|v| v.as_bytes() != b"0");
        if has_body && matches!(method, Method::POST | Method::PUT | Method::PATCH) {
            // A FHIR body says what it is; only Binary takes raw content.
            let binary = rest.split('/').nth(1) == Some("Binary");
            let media = req
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| {
                    v.split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                });
            if !binary && !media.as_deref().is_some_and(fhir_media_type) {
                return Err(GatewayError::UnsupportedMediaType(format!(
                    "Content-Type {} is not a FHIR format (application/fhir+json, application/fhir+xml, JSON Patch, or a form for _search)",
                    media.as_deref().unwrap_or("(none)")
                )));
            }
            if !binary && media.as_deref().is_some_and(|m| m.contains("json")) {
                ctx.json_guard = Some(json_guard::JsonGuard::default());
            }
        }
        if let Some(ce) = req.headers.get(http::header::CONTENT_ENCODING) {
            if !ce.as_bytes().eq_ignore_ascii_case(b"identity") {
                return Err(GatewayError::UnsupportedMediaType(
                    "compressed request bodies are not accepted".into(),
                ));
            }
        }

        // Public base for rewriting: configured, or from the Host the caller used.
        if route.public_base.is_none() {
            let base = self.derived_public_base(session, ctx.client_ip, &route.prefix)?;
            let r = gw.rewriter.replacements(&base);
            ctx.public_base = Some(PublicBase::Derived(base, r));
        } else {
            ctx.public_base = Some(PublicBase::Configured);
        }
        ctx.rest = rest;
        ctx.query = query;

        // Anonymous by design: the CapabilityStatement (SMART apps read it before they have
        // a token).
        let anonymous = ctx.metadata;
        let mut admit = Admit::Proxy;
        let mut guard = false;
        if gw.auth_mode == AuthMode::Jwt && !anonymous {
            let req = session.req_header();
            let identity = gw
                .auth
                .authenticate(&req.headers, ctx.query.as_deref())
                .await
                .map_err(|e| match e {
                    AuthError::Missing => GatewayError::Unauthorized(None),
                    AuthError::Invalid(why) => GatewayError::Unauthorized(Some(why)),
                    AuthError::Unavailable(why) => GatewayError::NotReady(why),
                })?;
            let query = ctx
                .query
                .as_deref()
                .map(|q| String::from_utf8_lossy(q).into_owned())
                .unwrap_or_default();
            let request = classify(method.as_str(), &ctx.rest, &query)
                .map_err(|e| GatewayError::BadRequest(format!("not a FHIR request: {e}")))?;
            let scopes_alone = gw.smart.scopes_alone_suffice;
            if request.interaction == Interaction::Bundle {
                // A batch is authorised entry by entry, so its body must be read first.
                let body = self.read_body(session).await?;
                let bundle: Value = serde_json::from_slice(&body)
                    .map_err(|e| GatewayError::BadRequest(format!("invalid JSON Bundle: {e}")))?;
                let base = self.public_base_string(ctx);
                let entries = classify_bundle(&bundle, &base).map_err(GatewayError::BadRequest)?;
                if entries.is_empty()
                    && !route
                        .policy
                        .read
                        .iter()
                        .chain(&route.policy.write)
                        .any(|r| identity.has(*r))
                {
                    return Err(GatewayError::Forbidden(
                        "role: an empty Bundle still needs a role this route grants".into(),
                    ));
                }
                for (i, entry) in entries.iter().enumerate() {
                    policy::authorize_with(&identity, entry, scopes_alone, &route.policy).map_err(
                        |rule| GatewayError::Forbidden(format!("{rule} (Bundle entry {i})")),
                    )?;
                }
                admit = Admit::Buffered(body);
            } else {
                policy::authorize_with(&identity, &request, scopes_alone, &route.policy)
                    .map_err(GatewayError::Forbidden)?;
            }
            guard = gw.links_in_use && !identity.has(Role::Administrator) && !request.is_read;
            ctx.identity = Some(identity);
        }

        if !matches!(method, Method::GET | Method::HEAD) {
            let q = ctx
                .query
                .as_deref()
                .map(|q| String::from_utf8_lossy(q).into_owned())
                .unwrap_or_default();
            ctx.written = match classify(method.as_str(), &ctx.rest, &q) {
                // Which types a Bundle writes is in its entries: drop every cache.
                Ok(r) if r.interaction == Interaction::Bundle => {
                    CACHED_TYPES.iter().map(|t| t.to_string()).collect()
                }
                Ok(r) if !r.is_read => r.resource_type.into_iter().collect(),
                _ => Vec::new(),
            };
        }

        ctx.service_auth = gw.identity.authorization().await?;
        if guard {
            admit = self.guard_links(session, ctx, &method, admit).await?;
        }

        if matches!(admit, Admit::Proxy) && matches!(method, Method::PUT | Method::DELETE) {
            // Keep up to 64 KiB of the body so a 429/503 can be retried.
            session.enable_retry_buffering();
        }
        Ok(admit)
    }

    /// Identity links are identifiers in the FHIR server: only `/manage` (Administrators)
    /// may write them. A write that names the link system is refused, unless it is a PUT
    /// that keeps exactly the links the resource already has (an ordinary update).
    async fn guard_links(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        method: &Method,
        admit: Admit,
    ) -> std::result::Result<Admit, GatewayError> {
        let body = match admit {
            Admit::Buffered(b) => b,
            Admit::Proxy => self.read_body(session).await?,
        };
        let system = self.gw.links.settings().system.clone();
        let mentioned = |b: &[u8]| -> Option<BTreeSet<String>> {
            match serde_json::from_slice::<Value>(b) {
                Ok(v) => {
                    let mut found = false;
                    let mut values = BTreeSet::new();
                    link_values(&v, &system, &mut found, &mut values);
                    found.then_some(values)
                }
                // Not JSON (XML, garbage): the text itself.
                Err(_) => memchr::memmem::find(b, system.as_bytes()).map(|_| BTreeSet::new()),
            }
        };
        let Some(new_links) = mentioned(&body) else {
            return Ok(Admit::Buffered(body));
        };
        let refused = || {
            GatewayError::Forbidden(
                "identity links are written through /manage by an Administrator".into(),
            )
        };
        let rest = ctx.rest.trim_start_matches('/');
        let single = rest.split('/').count() == 2 && ctx.query.is_none();
        if *method != Method::PUT || !single || new_links.is_empty() {
            return Err(refused());
        }
        // The links this resource has now: the update may keep them, not add any.
        let client = self.client_for(ctx);
        let (status, current) = client
            .get_json(rest)
            .await
            .map_err(|e| GatewayError::UpstreamUnavailable(e.to_string()))?;
        let mut found = false;
        let mut old_links = BTreeSet::new();
        if status == 200 {
            link_values(&current, &system, &mut found, &mut old_links);
        }
        if new_links.is_subset(&old_links) {
            Ok(Admit::Buffered(body))
        } else {
            Err(refused())
        }
    }

    /// Reads the whole request body, within the limit.
    async fn read_body(&self, session: &mut Session) -> std::result::Result<Bytes, GatewayError> {
        let max = self.gw.limits.max_request_body_bytes;
        let mut buf = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    if (buf.len() + chunk.len()) as u64 > max {
                        return Err(GatewayError::RequestTooLarge(max));
                    }
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(Bytes::from(buf)),
                Err(e) => {
                    return Err(GatewayError::BadRequest(format!(
                        "could not read the request body: {}",
                        e.etype().as_str()
                    )))
                }
            }
        }
    }

    fn public_base_string(&self, ctx: &Ctx) -> String {
        let route = &self.gw.routes[ctx.route];
        match (&route.public_base, &ctx.public_base) {
            (Some((b, _)), _) => b.clone(),
            (None, Some(PublicBase::Derived(b, _))) => b.clone(),
            _ => route.prefix.clone(),
        }
    }

    /// Audit headers for every upstream call made for this request.
    fn audit_headers(&self, ctx: &Ctx) -> Vec<(http::HeaderName, String)> {
        let [user, upn, tenant, source, proxy] = &self.gw.audit;
        let mut v = Vec::with_capacity(5);
        if let Some(id) = &ctx.identity {
            v.push((user.clone(), headers::sanitize_header_value(&id.user_id)));
            if let Some(u) = &id.upn {
                v.push((upn.clone(), headers::sanitize_header_value(u)));
            }
            if let Some(t) = &id.tenant {
                v.push((tenant.clone(), headers::sanitize_header_value(t)));
            }
        }
        if let Some(s) = &ctx.source {
            v.push((source.clone(), s.clone()));
        }
        v.push((proxy.clone(), self.gw.name.clone()));
        v
    }

    /// The FHIR client for this request: service identity, the caller's audit headers.
    fn client_for(&self, ctx: &Ctx) -> GatewayFhirClient {
        GatewayFhirClient {
            gw: self.gw.clone(),
            call: CallIdentity {
                service_auth: ctx.service_auth.clone(),
                audit: self.audit_headers(ctx),
                correlation_id: ctx.correlation_id.clone(),
                public_base: self.public_base_string(ctx),
            },
        }
    }

    /// Runs the route's chains. `Ok(false)`: nothing needs the bodies, stream through Pingora
    /// (with the path and query the pre chain left). `Ok(true)`: answered here — the request
    /// body was read, the FHIR server called through the gateway's client, the post chain run
    /// over the one parsed response, and the result serialised and rewritten once.
    async fn run_modules(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        admit: Admit,
    ) -> std::result::Result<bool, GatewayError> {
        let gw = self.gw.clone();
        let route = &gw.routes[ctx.route];
        let down = session.req_header();
        let headers: Vec<(String, String)> = gw
            .forward
            .iter()
            .flat_map(|n| {
                down.headers
                    .get_all(n)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .map(|v| (n.as_str().to_string(), v.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut req = ModRequest {
            method: down.method.as_str().to_string(),
            path: ctx.rest.clone(),
            query: ctx
                .query
                .as_deref()
                .map(|q| String::from_utf8_lossy(q).into_owned())
                .unwrap_or_default(),
            headers,
            body: None,
        };
        let mut body = match admit {
            Admit::Buffered(b) => Some(b),
            Admit::Proxy => None,
        };
        let pre_applies = route.pre.iter().any(|m| m.applies(&req));
        let pre_needs_body = route.pre.iter().any(|m| m.applies(&req) && m.needs_body());
        let post_applies = route.post.iter().any(|m| m.applies(&req));
        let buffered = body.is_some() || pre_needs_body || post_applies;
        if !buffered && !pre_applies {
            return Ok(false);
        }
        if buffered && body.is_none() {
            body = Some(self.read_body(session).await?);
        }
        req.body = body.map(|b| b.to_vec());
        ctx.request_body_bytes += req.body.as_ref().map_or(0, |b| b.len() as u64);
        let client = Arc::new(self.client_for(ctx));
        let cx = Context {
            identity: ctx.identity.clone(),
            correlation_id: ctx.correlation_id.clone(),
            public_base: self.public_base_string(ctx),
            upstream_base: gw.upstream.base.as_string(),
            fhir: client.clone(),
            events: gw.events.clone(),
            links: gw.links.clone(),
        };
        // The work below owns no part of the session, so it can race the client leaving: a
        // buffered exchange (fetches, parsing, filtering, rewriting) stops when nobody is
        // left to answer. Only when the request body was read (or there is none), so the
        // watch cannot swallow body bytes.
        let work = async {
            let mut resp = match chain::run_pre(&route.prefix, &route.pre, &mut req, &cx).await? {
                PreResult::Reply(mut r) => {
                    tag_outcome(&mut r, &ctx.correlation_id);
                    return Ok(Some(r));
                }
                PreResult::Stop(mut r) => {
                    tag_outcome(&mut r, &ctx.correlation_id);
                    r
                }
                PreResult::Continue if !buffered => {
                    // Only the path or query changed: the exchange can still stream.
                    check_path(req.path.as_bytes()).map_err(|why| {
                        GatewayError::Internal(format!("a module produced a bad path: {why}"))
                    })?;
                    self.authorize_final(ctx, &req)?;
                    ctx.rest = req.path.clone();
                    ctx.query = (!req.query.is_empty()).then(|| req.query.clone().into_bytes());
                    return Ok(None);
                }
                PreResult::Continue => {
                    self.authorize_final(ctx, &req)?;
                    let mut target = req.path.clone();
                    if !req.query.is_empty() {
                        target.push('?');
                        target.push_str(&req.query);
                    }
                    ctx.attempts += 1;
                    let sent = Instant::now();
                    let r = client
                        .call(ClientRequest {
                            method: req.method.clone(),
                            path_and_query: target,
                            headers: req.headers.clone(),
                            body: req.body.clone(),
                        })
                        .await?;
                    ctx.upstream_status = Some(r.status);
                    ctx.upstream_ms = Some(sent.elapsed().as_millis());
                    if (200..300).contains(&r.status) {
                        ctx.written.iter().for_each(|t| gw.invalidate(t));
                    }
                    r
                }
            };
            chain::run_post(&route.prefix, &route.post, &req, &mut resp, &cx).await?;
            Ok::<_, GatewayError>(Some(resp))
        };
        let outcome = if buffered {
            tokio::select! {
                r = work => r,
                _ = client_gone(session) => Err(GatewayError::ClientGone),
            }
        } else {
            work.await
        };
        match outcome {
            Ok(Some(resp)) => {
                self.write_module_response(session, ctx, resp).await?;
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(GatewayError::ClientGone) => {
                ctx.client_gone = true;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }

    /// What goes upstream is authorised, not only what the caller sent: a pre module that
    /// changed the path, query or a Bundle (TransformBundle) is checked again.
    fn authorize_final(
        &self,
        ctx: &Ctx,
        req: &ModRequest,
    ) -> std::result::Result<(), GatewayError> {
        let Some(identity) = &ctx.identity else {
            return Ok(());
        };
        let route = &self.gw.routes[ctx.route];
        let alone = self.gw.smart.scopes_alone_suffice;
        let request = classify(&req.method, &req.path, &req.query).map_err(|e| {
            GatewayError::Internal(format!("a module produced a request that is not FHIR: {e}"))
        })?;
        if request.interaction == Interaction::Bundle {
            let Some(Ok(bundle)) = req.json() else {
                return Err(GatewayError::BadRequest("a Bundle body is required".into()));
            };
            let entries = classify_bundle(&bundle, &self.public_base_string(ctx))
                .map_err(GatewayError::BadRequest)?;
            for (i, entry) in entries.iter().enumerate() {
                policy::authorize_with(identity, entry, alone, &route.policy).map_err(|rule| {
                    GatewayError::Forbidden(format!("{rule} (Bundle entry {i}, as sent upstream)"))
                })?;
            }
            Ok(())
        } else {
            policy::authorize_with(identity, &request, alone, &route.policy)
                .map_err(|rule| GatewayError::Forbidden(format!("{rule} (as sent upstream)")))
        }
    }

    /// Serialises a module-path response once, rewrites it, and writes it with a length.
    async fn write_module_response(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        resp: ModResponse,
    ) -> std::result::Result<(), GatewayError> {
        let gw = &self.gw;
        let to = self.replacements(ctx).cloned();
        let mut h = ResponseHeader::build(resp.status, Some(resp.headers.len() + 3))
            .map_err(|_| GatewayError::Internal(format!("status {}", resp.status)))?;
        let mut has_ct = false;
        for (k, v) in &resp.headers {
            let k = k.to_ascii_lowercase();
            if DROPPED_RESPONSE_HEADERS.contains(&k.as_str())
                || k == "content-length"
                || k == "transfer-encoding"
                || k == REQUEST_ID
            {
                continue;
            }
            has_ct |= k == "content-type";
            let v = match to
                .as_ref()
                .and_then(|to| gw.rewriter.rewrite_all(v.as_bytes(), to))
            {
                Some(new) => new,
                None => v.clone().into_bytes(),
            };
            let v = HeaderValue::from_bytes(&v)
                .map_err(|_| GatewayError::Internal(format!("header {k} is not valid")))?;
            let _ = h.append_header(k, v);
        }
        let (mut out, rewritable) = match resp.body {
            ModBody::Json(v) => {
                if !has_ct {
                    let _ = h.insert_header(http::header::CONTENT_TYPE, "application/fhir+json");
                }
                let mut out =
                    serde_json::to_vec(&v).map_err(|e| GatewayError::Internal(e.to_string()))?;
                if ctx.metadata && resp.status == 200 {
                    if let Some(secured) = self.secure_capability_statement(&out) {
                        out = secured;
                    }
                }
                (out, true)
            }
            ModBody::Raw(b) => {
                let ct = resp
                    .headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                    .map(|(_, v)| v.as_bytes().to_vec());
                (b, is_rewritable(ct.as_deref()))
            }
            ModBody::None => (Vec::new(), false),
        };
        if rewritable {
            if let Some(new) = to.as_ref().and_then(|to| gw.rewriter.rewrite_all(&out, to)) {
                out = new;
            }
        }
        if let Some(etag) = h.headers.get(http::header::ETAG).cloned() {
            if !etag.as_bytes().starts_with(b"W/") {
                let weak = [b"W/", etag.as_bytes()].concat();
                if let Ok(w) = HeaderValue::from_bytes(&weak) {
                    let _ = h.insert_header(http::header::ETAG, w);
                }
            }
        }
        let _ = h.insert_header(http::header::CONTENT_LENGTH, out.len().to_string());
        let _ = h.insert_header(REQUEST_ID, ctx.correlation_id.as_str());
        let head_only = session.req_header().method == Method::HEAD;
        session
            .write_response_header(Box::new(h), false)
            .await
            .map_err(|_| GatewayError::Internal("client went away".into()))?;
        let body = if head_only {
            Bytes::new()
        } else {
            Bytes::from(out)
        };
        session
            .write_response_body(Some(body), true)
            .await
            .map_err(|_| GatewayError::Internal("client went away".into()))?;
        Ok(())
    }

    /// `/.well-known/smart-configuration` from the IdP's discovery document.
    fn smart_configuration(&self) -> std::result::Result<Vec<u8>, GatewayError> {
        let gw = &self.gw;
        let issuer = gw
            .auth
            .smart_issuer(gw.smart.issuer.as_deref())
            .ok_or_else(|| GatewayError::NotFound("no OAuth issuer configured".into()))?;
        let disc = issuer
            .keys
            .discovery
            .read()
            .expect("discovery lock")
            .clone()
            .ok_or_else(|| {
                GatewayError::NotReady(
                    "the identity provider's discovery document is not loaded".into(),
                )
            })?;
        let pick = |k: &str| disc.get(k).cloned().unwrap_or(Value::Null);
        let mut doc = json!({
            "issuer": pick("issuer"),
            "jwks_uri": pick("jwks_uri"),
            "authorization_endpoint": pick("authorization_endpoint"),
            "token_endpoint": pick("token_endpoint"),
            "token_endpoint_auth_methods_supported": pick("token_endpoint_auth_methods_supported"),
            "grant_types_supported": pick("grant_types_supported"),
            "scopes_supported": pick("scopes_supported"),
            "response_types_supported": pick("response_types_supported"),
            "code_challenge_methods_supported": ["S256"],
            // What the gateway enforces; override with auth.smart.configuration to match the IdP.
            "capabilities": [
                "launch-standalone", "client-public", "client-confidential-symmetric",
                "permission-patient", "permission-user", "permission-v1", "permission-v2"
            ]
        });
        let obj = doc.as_object_mut().expect("object");
        obj.retain(|_, v| !v.is_null());
        for (k, v) in &gw.smart.configuration {
            obj.insert(k.clone(), v.clone());
        }
        Ok(serde_json::to_vec(&doc).expect("serialises"))
    }

    /// Sets `rest[].security` of a CapabilityStatement to our OAuth endpoints.
    fn secure_capability_statement(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut cs: Value = serde_json::from_slice(body).ok()?;
        if cs.get("resourceType").and_then(Value::as_str) != Some("CapabilityStatement") {
            return None;
        }
        let gw = &self.gw;
        if gw.auth_mode != AuthMode::Jwt {
            return None;
        }
        // Without the IdP's endpoints there is nothing true to advertise.
        let disc = gw
            .auth
            .smart_issuer(gw.smart.issuer.as_deref())
            .and_then(|i| i.keys.discovery.read().expect("discovery lock").clone())?;
        let disc = Some(disc);
        let mut uris = Vec::new();
        for (name, key) in [
            ("token", "token_endpoint"),
            ("authorize", "authorization_endpoint"),
        ] {
            if let Some(u) = disc
                .as_ref()
                .and_then(|d| d.get(key))
                .and_then(Value::as_str)
            {
                uris.push(json!({"url": name, "valueUri": u}));
            }
        }
        let security = json!({
            "cors": true,
            "service": [{"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                "code": "SMART-on-FHIR"
            }]}],
            "extension": [{
                "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                "extension": uris
            }]
        });
        if let Some(rest) = cs.get_mut("rest").and_then(Value::as_array_mut) {
            for r in rest {
                if let Some(o) = r.as_object_mut() {
                    o.insert("security".into(), security.clone());
                }
            }
        }
        serde_json::to_vec(&cs).ok()
    }

    /// `scheme://host/prefix` as this caller addressed the gateway.
    fn derived_public_base(
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

    fn replacements<'a>(&'a self, ctx: &'a Ctx) -> Option<&'a Replacements> {
        match ctx.public_base.as_ref()? {
            PublicBase::Configured => self.gw.routes[ctx.route]
                .public_base
                .as_ref()
                .map(|(_, r)| r),
            PublicBase::Derived(_, r) => Some(r),
        }
    }

    fn classify(&self, e: &Error) -> GatewayError {
        use ErrorType::*;
        match e.etype() {
            ConnectTimedout => GatewayError::UpstreamTimeout("connect timed out".into()),
            ReadTimedout if *e.esource() == ErrorSource::Downstream => {
                GatewayError::RequestTimeout("the client did not send its request in time".into())
            }
            ReadTimedout => {
                GatewayError::UpstreamTimeout("no response within the read timeout".into())
            }
            WriteTimedout => GatewayError::UpstreamTimeout("request write timed out".into()),
            ConnectRefused => GatewayError::UpstreamUnavailable("connection refused".into()),
            HTTPStatus(c) => GatewayError::UpstreamUnavailable(format!("status {c}")),
            _ if *e.esource() == ErrorSource::Upstream => {
                GatewayError::UpstreamUnavailable(e.etype().as_str().to_string())
            }
            _ if *e.esource() == ErrorSource::Downstream => {
                GatewayError::BadRequest(format!("malformed request: {}", e.etype().as_str()))
            }
            _ => GatewayError::Internal(e.etype().as_str().to_string()),
        }
    }
}

#[async_trait]
impl ProxyHttp for FhirProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            correlation_id: String::new(),
            rest: String::new(),
            query: None,
            client_ip: None,
            route: 0,
            routed: false,
            source: None,
            identity: None,
            metadata: false,
            buffer: None,
            public_base: None,
            service_auth: None,
            attempts: 0,
            retry_delay: None,
            request_body_bytes: 0,
            rewrite: None,
            upstream_status: None,
            error: None,
            written: Vec::new(),
            upstream_sent: None,
            upstream_ms: None,
            client_gone: false,
            json_guard: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.start = Instant::now();
        // RFC 9112 §9.3.2: a request pipelined behind this one waits for it, instead of
        // failing this one (Pingora's default treats early bytes as a protocol error), and
        // `client_gone` can tell a pipelined request from a close.
        session.downstream_session.set_pipelining_enabled(true);
        let req = session.req_header();
        ctx.correlation_id = [REQUEST_ID, MS_REQUEST_ID]
            .iter()
            .filter_map(|h| req.headers.get(*h))
            .find(|v| headers::valid_correlation_id(v.as_bytes()))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .unwrap_or_else(headers::new_correlation_id);
        ctx.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.source = self.audit_source(session, ctx.client_ip);
        if self.gw.health.is_closing() {
            // Shutting down or upgrading: answer, then close, so the client's next request
            // opens a connection to a live instance (or the new process) instead of failing.
            session.set_keepalive(None);
        } else if session.downstream_session.get_keepalive().is_some() {
            // Only where HTTP allows it: HTTP/1.0 without keep-alive and `Connection: close`
            // stay closing (Pingora decided that from the request).
            session.set_keepalive(Some(self.gw.limits.downstream_keepalive_secs));
        }

        let path = session.req_header().uri.path().to_string();
        let route = self.gw.route_for(&path);
        let probe_method = matches!(session.req_header().method, Method::GET | Method::HEAD);
        match path.as_str() {
            "/healthz" | "/readyz" if !probe_method => {
                return self
                    .respond_error(
                        session,
                        ctx,
                        GatewayError::MethodNotAllowed(
                            "health endpoints answer GET and HEAD".into(),
                        ),
                    )
                    .await
            }
            "/healthz" => {
                return self
                    .respond(
                        session,
                        ctx,
                        200,
                        "application/json",
                        br#"{"status":"ok"}"#.to_vec(),
                    )
                    .await
            }
            "/readyz" => {
                return match self.gw.health.not_ready_reason(&self.gw) {
                    None => {
                        self.respond(
                            session,
                            ctx,
                            200,
                            "application/json",
                            br#"{"status":"ready"}"#.to_vec(),
                        )
                        .await
                    }
                    Some(why) => {
                        self.respond_error(session, ctx, GatewayError::NotReady(why.into()))
                            .await
                    }
                };
            }
            p if p == "/manage" || p.starts_with("/manage/") => {
                return self.manage(session, ctx).await;
            }
            _ if route.is_some() => {}
            _ => {
                return self
                    .respond_error(
                        session,
                        ctx,
                        GatewayError::NotFound(format!("no route for {path}")),
                    )
                    .await
            }
        }

        ctx.route = route.expect("matched above");
        ctx.routed = true;
        let rest = &path[self.gw.routes[ctx.route].prefix.len()..];
        let get = matches!(session.req_header().method, Method::GET | Method::HEAD);
        if rest == "/.well-known/smart-configuration" && get {
            return match self.smart_configuration() {
                Ok(body) => {
                    self.respond(session, ctx, 200, "application/json", body)
                        .await
                }
                Err(e) => self.respond_error(session, ctx, e).await,
            };
        }
        ctx.metadata = rest == "/metadata" && get;

        let admit = match self.admit(session, ctx).await {
            Ok(a) => a,
            Err(e) => return self.respond_error(session, ctx, e).await,
        };
        match self.run_modules(session, ctx, admit).await {
            Ok(answered) => Ok(answered),
            Err(e) => {
                if session.response_written().is_some() {
                    return Err(ctx.fail(e));
                }
                self.respond_error(session, ctx, e).await
            }
        }
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        if let Some(d) = ctx.retry_delay.take() {
            tokio::time::sleep(d).await;
        }
        ctx.attempts += 1;
        Ok(Box::new(self.gw.upstream.peer()))
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the server, but POST/PATCH are still never retried (spec).
        let retry = is_retryable_method(&session.req_header().method)
            && ctx.attempts < self.gw.retries.max_attempts;
        if retry {
            ctx.retry_delay = Some(Duration::from_millis(self.gw.retries.base_delay_ms));
        }
        e.set_retry(retry);
        e
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora_core::protocols::Digest>,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        crate::metrics::upstream_connection(reused);
        Ok(())
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let gw = &self.gw;
        ctx.upstream_sent = Some(Instant::now());
        let down = session.req_header();
        let mut target = gw.upstream.path_for(&ctx.rest).into_bytes();
        if let Some(q) = &ctx.query {
            target.push(b'?');
            target.extend_from_slice(q);
        }
        // A fresh header: only what is allowed crosses, whatever the caller sent.
        let mut up =
            RequestHeader::build(down.method.clone(), &target, Some(gw.forward.len() + 10))?;
        for name in &gw.forward {
            for v in down.headers.get_all(name) {
                up.append_header(name.clone(), v.clone())?;
            }
        }
        if down.headers.get(http::header::TRANSFER_ENCODING).is_none() {
            if let Some(cl) = down.headers.get(http::header::CONTENT_LENGTH) {
                up.insert_header(http::header::CONTENT_LENGTH, cl.clone())?;
            }
        }
        up.insert_header(http::header::HOST, gw.upstream.base.authority())?;
        if let Some(a) = &ctx.service_auth {
            up.insert_header(http::header::AUTHORIZATION, a.clone())?;
        }
        up.insert_header(REQUEST_ID, ctx.correlation_id.as_str())?;
        for (k, v) in self.audit_headers(ctx) {
            up.insert_header(k, v)?;
        }
        *upstream_request = up;
        Ok(())
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(b) = body {
            ctx.request_body_bytes += b.len() as u64;
            let max = self.gw.limits.max_request_body_bytes;
            if ctx.request_body_bytes > max {
                return Err(ctx.fail(GatewayError::RequestTooLarge(max)));
            }
        }
        if let Some(g) = ctx.json_guard.as_mut() {
            let chunk = body.as_deref().unwrap_or_default();
            if let Err(why) = g.feed(chunk, end_of_stream) {
                // Failing here drops the upstream connection before the body is complete:
                // the server writes nothing.
                session.set_keepalive(None);
                return Err(ctx.fail(GatewayError::BadRequest(why.into())));
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        if (status == 429 || status == 503)
            && is_retryable_method(&session.req_header().method)
            && ctx.attempts < self.gw.retries.max_attempts
            && !session.as_ref().retry_buffer_truncated()
        {
            let delay = retry_after(upstream_response)
                .unwrap_or(Duration::from_millis(self.gw.retries.base_delay_ms));
            if delay <= Duration::from_millis(self.gw.retries.max_delay_ms) {
                ctx.retry_delay = Some(delay);
                let mut e =
                    Error::explain(ErrorType::HTTPStatus(status), "upstream asked to retry");
                e.set_retry(true);
                return Err(e);
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        ctx.upstream_status = Some(resp.status.as_u16());
        if let Some(t) = ctx.upstream_sent.take() {
            crate::metrics::upstream("stream", t.elapsed());
            ctx.upstream_ms = Some(t.elapsed().as_millis());
        }
        if resp.status.is_success() {
            ctx.written.iter().for_each(|t| self.gw.invalidate(t));
        }
        for h in DROPPED_RESPONSE_HEADERS {
            resp.remove_header(*h);
        }
        let Some(to) = self.replacements(ctx).cloned() else {
            return Ok(());
        };
        // Any header may name the upstream (Location, Content-Location, Link, custom ones).
        let mut rewritten = Vec::new();
        for (name, value) in resp.headers.iter() {
            if let Some(v) = self.gw.rewriter.rewrite_all(value.as_bytes(), &to) {
                rewritten.push((name.clone(), v));
            }
        }
        for (name, v) in rewritten {
            let v = HeaderValue::from_bytes(&v)
                .map_err(|_| ctx.fail(GatewayError::Internal("rewritten header invalid".into())))?;
            resp.insert_header(name, v)?;
        }
        resp.insert_header(REQUEST_ID, ctx.correlation_id.as_str())?;

        let status = resp.status.as_u16();
        let has_body = session.req_header().method != Method::HEAD
            && status != 204
            && status != 304
            && !(100..200).contains(&status);
        let ct = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes().to_vec());
        if has_body && is_rewritable(ct.as_deref()) {
            if let Some(ce) = resp.headers.get(http::header::CONTENT_ENCODING) {
                if !ce.as_bytes().eq_ignore_ascii_case(b"identity") {
                    // We asked for a plain body; a compressed one cannot be checked for the
                    // upstream address, so it does not go out.
                    return Err(ctx.fail(GatewayError::UpstreamUnavailable(
                        "compressed response body despite no Accept-Encoding".into(),
                    )));
                }
            }
            // The body length changes: re-frame as chunked.
            resp.remove_header(&http::header::CONTENT_LENGTH);
            if session.req_header().version == http::Version::HTTP_11 {
                resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
            }
            if let Some(etag) = resp.headers.get(http::header::ETAG) {
                if !etag.as_bytes().starts_with(b"W/") {
                    let weak = [b"W/", etag.as_bytes()].concat();
                    resp.insert_header(
                        http::header::ETAG,
                        HeaderValue::from_bytes(&weak)
                            .map_err(|_| ctx.fail(GatewayError::Internal("ETag".into())))?,
                    )?;
                }
            }
            let json = ct.as_deref().is_some_and(|c| {
                let c = c.to_ascii_lowercase();
                memchr::memmem::find(&c, b"json").is_some()
            });
            if ctx.metadata && json && status == 200 {
                ctx.buffer = Some(Vec::new());
            } else {
                ctx.rewrite = Some(StreamRewrite::default());
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        let total = Duration::from_millis(self.gw.upstream.timeouts().total_ms);
        if ctx.start.elapsed() > total && !end_of_stream {
            return Err(ctx.fail(GatewayError::UpstreamTimeout(
                "response exceeded the total timeout".into(),
            )));
        }
        if let Some(buf) = ctx.buffer.as_mut() {
            if let Some(chunk) = body.take() {
                let cap = self.gw.limits.max_buffered_response_bytes;
                if buf.len() + chunk.len() > cap {
                    return Err(ctx.fail(GatewayError::ResponseTooLarge(cap)));
                }
                buf.extend_from_slice(&chunk);
            }
            if end_of_stream {
                let whole = ctx.buffer.take().unwrap_or_default();
                let transformed = self.secure_capability_statement(&whole).unwrap_or(whole);
                let out = match self.replacements(ctx) {
                    Some(to) => self
                        .gw
                        .rewriter
                        .rewrite_all(&transformed, to)
                        .unwrap_or(transformed),
                    None => transformed,
                };
                *body = Some(Bytes::from(out));
            } else {
                *body = Some(Bytes::new());
            }
            return Ok(None);
        }
        if ctx.rewrite.is_none() {
            return Ok(None);
        }
        let to = match self.replacements(ctx) {
            Some(r) => r.clone(),
            None => return Ok(None),
        };
        let rw = ctx.rewrite.as_mut().expect("checked above");
        let mut out = match body.take() {
            Some(chunk) => rw.push(&self.gw.rewriter, &to, chunk),
            None => Bytes::new(),
        };
        if end_of_stream {
            let tail = rw.finish(&self.gw.rewriter, &to);
            if !tail.is_empty() {
                out = if out.is_empty() {
                    tail
                } else {
                    Bytes::from([out.as_ref(), tail.as_ref()].concat())
                };
            }
        }
        *body = Some(out);
        Ok(None)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let ge = ctx.error.take().unwrap_or_else(|| {
            if *e.etype() == ErrorType::ReadTimedout && !session.downstream_session.is_body_done() {
                // The server was still waiting for the rest of the body: the client stalled.
                GatewayError::RequestTimeout(
                    "the client did not send its request body in time".into(),
                )
            } else {
                self.classify(e)
            }
        });
        let downstream_dead = *e.esource() == ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
            );
        let code = if downstream_dead || session.response_written().is_some() {
            // Nothing sensible can be written any more.
            0
        } else {
            let status = ge.status();
            let body = ge.to_outcome(&ctx.correlation_id);
            // The connection is not reused after a failed proxy (its request body may be half
            // read): say so, or a client reusing it loses its next request.
            session.set_keepalive(None);
            if let Err(we) = self
                .respond(session, ctx, status, "application/fhir+json", body)
                .await
            {
                warn!("could not send error response: {we}");
            }
            status
        };
        ctx.error = Some(ge);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, _e: &Error) -> bool {
        // Our own rejections are logged once by `logging`.
        ctx.error.as_ref().is_some_and(|e| e.status() < 500)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(if ctx.client_gone { 499 } else { 0 });
        let route = match ctx.routed {
            true => self.gw.routes[ctx.route].prefix.as_str(),
            // Health probes and requests outside every route.
            false => "-",
        };
        crate::metrics::request(
            route,
            session.req_header().method.as_str(),
            status,
            ctx.start.elapsed(),
        );
        match &ctx.error {
            Some(GatewayError::Unauthorized(why)) => crate::metrics::refusal(401, why.as_deref()),
            Some(GatewayError::Forbidden(why)) => crate::metrics::refusal(403, Some(why)),
            _ => {}
        }
        crate::metrics::body_bytes(ctx.request_body_bytes, session.body_bytes_sent() as u64);
        if !self.gw.access_log {
            return;
        }
        let req = session.req_header();
        // Path only: queries can hold patient data (names, birth dates).
        info!(
            target: "access",
            "{} {} {} status={} upstream_status={} attempts={} ms={} upstream_ms={} id={} user={} tenant={}{}",
            ctx.source.as_deref().unwrap_or("-"),
            req.method,
            req.uri.path(),
            status,
            ctx.upstream_status.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            ctx.attempts,
            ctx.start.elapsed().as_millis(),
            ctx.upstream_ms.map(|m| m.to_string()).unwrap_or_else(|| "-".into()),
            ctx.correlation_id,
            ctx.identity.as_ref().map_or("-", |i| i.user_id.as_str()),
            ctx.identity.as_ref().and_then(|i| i.tenant.as_deref()).unwrap_or("-"),
            match (&ctx.error, e) {
                (Some(ge), _) => format!(" error=\"{ge}\""),
                (None, Some(e)) => format!(" error=\"{}\"", e.etype().as_str()),
                _ => String::new(),
            }
        );
    }
}
