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

mod access_log;
mod admission;
mod audit;
mod body_guard;
mod buffered;
mod bulk;
mod exchange;
mod explain;
#[doc(hidden)]
pub mod fixed;
mod head_chain;
mod links_guard;
mod local;
mod manage;
mod one_write;
mod plan;
mod public_base;
mod respond;
mod response;
#[cfg(test)]
mod tests;

pub use admission::check_path;
use admission::*;
use body_guard::BodyGuard;
use buffered::*;
use bulk::BulkStep;
use public_base::*;

use crate::auth::policy;
use crate::chain::{self, PreResult};
use crate::config::AuthMode;
use crate::error::GatewayError;
use crate::gateway::{Gateway, CACHED_TYPES};
use crate::headers::{self, DROPPED_RESPONSE_HEADERS, REQUEST_ID};
use crate::rewrite::{Replacements, StreamRewrite};
use crate::upstream::client::{CallIdentity, Fetched, GatewayFhirClient};
use crate::upstream::head::request_head;
use crate::upstream::retry::{self, RetryPolicy};
use async_trait::async_trait;
use bytes::Bytes;
use fhir_gateway_modules::processor::{
    Body as ModBody, ClientRequest, Context, Request as ModRequest, Response as ModResponse,
};
use fhir_gateway_modules::processor::{FhirClient, PostProcess};
use fhir_gateway_modules::request::{classify, classify_bundle, Interaction};
use fhir_gateway_modules::smart::filter::ScopeFilter;
use fhir_gateway_modules::{Identity, Role};
use http::{HeaderValue, Method};
use log::warn;
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
    bases: BaseCache,
}

impl FhirProxy {
    pub fn new(gw: Arc<Gateway>) -> FhirProxy {
        let bases = BaseCache::new(gw.routes.len());
        FhirProxy { gw, bases }
    }
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    correlation_id: String,
    /// The same as a header value, shared by every head that carries it.
    correlation_header: HeaderValue,
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
    identity: Option<Arc<Identity>>,
    /// `/metadata`: the CapabilityStatement gets its `rest[].security` set.
    metadata: bool,
    /// Whole-body buffer for responses the gateway transforms (not plain rewriting).
    buffer: Option<Vec<u8>>,
    /// Public base this caller sees (depends on Host unless configured).
    public_base: Option<PublicBase>,
    service_auth: Option<HeaderValue>,
    attempts: u32,
    /// How the FHIR server's answer came: `stream` (Pingora proxied it), `buffered` (the
    /// gateway's client, for a module chain) or `-` (not asked). In the access log.
    road: &'static str,
    retry_delay: Option<Duration>,
    /// The request body's guard (size, media type, UTF-8, depth) and byte count.
    body: BodyGuard,
    rewrite: Option<StreamRewrite>,
    /// Bytes of the rewritten body emitted so far (its `Content-Length` when it fits one write).
    body_out: usize,
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
    /// Who upstream calls are made for, once admitted (both roads' request heads).
    call: Option<CallIdentity>,
    /// The FHIR server's `Content-Length` on the buffered road (a HEAD answer's).
    upstream_length: Option<u64>,
    /// A streamed request whose post chain reads headers only: the request its modules see,
    /// until they ran on the response head (`head_chain.rs`).
    head_chain: Option<ModRequest>,
    /// Bulk Data: a kick-off, or a handed-out status or file URL.
    bulk: BulkStep,
    /// The audit trail: a streamed answer's body as sent, and a buffered one's.
    tee: Option<audit::Tee>,
    answered: std::sync::OnceLock<crate::audit::Shown>,
    /// The break-the-glass reason this request was served under.
    glass: Option<String>,
    /// The scope filter of a caller whose scopes narrow (`patient/`, granular): added to the
    /// route's post chain for this request, so the answer takes the buffered road.
    scopes: Option<Arc<dyn PostProcess>>,
}

impl FhirProxy {
    /// The request target on the FHIR server: its base path, the path below the public
    /// prefix, the query.
    fn upstream_target(&self, ctx: &Ctx) -> Vec<u8> {
        let mut target = self.gw.upstream.path_for(&ctx.rest).into_bytes();
        if let Some(q) = &ctx.query {
            target.push(b'?');
            target.extend_from_slice(q);
        }
        target
    }
}

/// The request's correlation id: the caller's (`X-Request-Id`, `X-MS-Request-Id`) when it
/// looks like one, else a fresh one; as text and as a header value.
fn correlation(req: &RequestHeader) -> (String, HeaderValue) {
    let given = [&headers::REQUEST_ID_NAME, &headers::MS_REQUEST_ID_NAME]
        .into_iter()
        .filter_map(|h| req.headers.get(h))
        .find(|v| headers::valid_correlation_id(v.as_bytes()));
    match given {
        // Valid ids are ASCII.
        Some(v) => (
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
            v.clone(),
        ),
        None => {
            let id = headers::new_correlation_id();
            let v = HeaderValue::from_str(&id).expect("a UUID is a header value");
            (id, v)
        }
    }
}

impl Ctx {
    fn fail(&mut self, e: GatewayError) -> Box<Error> {
        let status = e.status();
        let msg = e.to_string();
        self.error = Some(e);
        Error::explain(ErrorType::HTTPStatus(status), msg)
    }
}

#[async_trait]
impl ProxyHttp for FhirProxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            correlation_id: String::new(),
            correlation_header: HeaderValue::from_static(""),
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
            road: "-",
            retry_delay: None,
            body: BodyGuard::new(self.gw.limits.max_request_body_bytes),
            rewrite: None,
            body_out: 0,
            upstream_status: None,
            error: None,
            written: Vec::new(),
            upstream_sent: None,
            upstream_ms: None,
            client_gone: false,
            call: None,
            upstream_length: None,
            head_chain: None,
            bulk: BulkStep::None,
            tee: None,
            answered: std::sync::OnceLock::new(),
            glass: None,
            scopes: None,
        }
    }

    fn init_downstream_modules(&self, modules: &mut pingora_core::modules::http::HttpModules) {
        one_write::install(modules);
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.start = Instant::now();
        // RFC 9112 §9.3.2: a request pipelined behind this one waits for it, instead of
        // failing this one (Pingora's default treats early bytes as a protocol error), and
        // `client_gone` can tell a pipelined request from a close.
        session.downstream_session.set_pipelining_enabled(true);
        (ctx.correlation_id, ctx.correlation_header) = correlation(session.req_header());
        ctx.client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.source = self.audit_source(session.req_header(), ctx.client_ip);
        if self.gw.health.is_closing() {
            // Shutting down or upgrading: answer, then close, so the client's next request
            // opens a connection to a live instance (or the new process) instead of failing.
            session.set_keepalive(None);
        } else if session.downstream_session.get_keepalive().is_some() {
            // Only where HTTP allows it: HTTP/1.0 without keep-alive and `Connection: close`
            // stay closing (Pingora decided that from the request).
            session.set_keepalive(Some(self.gw.limits.downstream_keepalive_secs));
        }

        if let Some(answered) = self.local_endpoint(session, ctx).await {
            return answered;
        }

        let admit = match self.admit(session, ctx).await {
            Ok(a) => a,
            Err(e) => return self.respond_error(session, ctx, e).await,
        };
        match ctx.bulk {
            // Handed-out URLs run no module chain: their caller was checked at the kick-off
            // (no caller a post module filters may export).
            BulkStep::Status => {
                return match self.serve_status(session, ctx).await {
                    Ok(()) => Ok(true),
                    Err(e) if session.response_written().is_some() => Err(ctx.fail(e)),
                    Err(e) => self.respond_error(session, ctx, e).await,
                }
            }
            BulkStep::File => return Ok(false),
            BulkStep::None | BulkStep::Kickoff => {}
        }
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
        ctx.road = "stream";
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
        let delay = RetryPolicy::new(&self.gw.retries)
            .after_connect_failure(&session.req_header().method, ctx.attempts);
        ctx.retry_delay = delay;
        e.set_retry(delay.is_some());
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
        ctx.upstream_sent = Some(Instant::now());
        let down = session.req_header();
        let target = self.upstream_target(ctx);
        // A chunked body is re-framed chunked by Pingora; a declared length is kept.
        let length = match down.headers.get(http::header::TRANSFER_ENCODING) {
            Some(_) => None,
            None => down
                .headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.trim().parse().ok()),
        };
        let computed;
        let who = match &ctx.call {
            Some(c) => c,
            None => {
                computed = self.call_identity(ctx);
                &computed
            }
        };
        // A fresh header from the one builder: only what is allowed crosses.
        *upstream_request = request_head(
            &self.gw,
            who,
            &down.method,
            &target,
            down.headers.iter(),
            length,
        )
        .map_err(|e| ctx.fail(e))?;
        Ok(())
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let chunk = body.as_deref().unwrap_or_default();
        if let Err(e) = ctx.body.feed(chunk, end_of_stream) {
            // Failing here drops the upstream connection before the body is complete: the
            // server writes nothing.
            session.set_keepalive(None);
            return Err(ctx.fail(e));
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
        if session.as_ref().retry_buffer_truncated() {
            // The body cannot be sent again.
            return Ok(());
        }
        let delay = RetryPolicy::new(&self.gw.retries).after_status(
            &session.req_header().method,
            ctx.attempts,
            status,
            retry::in_map(&upstream_response.headers),
        );
        if let Some(delay) = delay {
            ctx.retry_delay = Some(delay);
            let mut e = Error::explain(ErrorType::HTTPStatus(status), "upstream asked to retry");
            e.set_retry(true);
            return Err(e);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.response_head(session, resp, ctx).await
    }

    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        self.response_body(session, body, end_of_stream, ctx)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        self.answer_failure(session, e, ctx).await
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, _e: &Error) -> bool {
        // Our own rejections are logged once by `logging`.
        ctx.error.as_ref().is_some_and(|e| e.status() < 500)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        self.log_request(session, e, ctx).await
    }
}
