//! The FHIR client the gateway lends to processor modules, and uses itself for requests it
//! must buffer. It takes the streaming proxy's road to the FHIR server: Pingora's connector
//! (`Gateway::connector`, one per gateway, pooled) with the proxy's own peer
//! (`Upstream::peer`: the resolved address, SNI, CA list, verify flags, every timeout), the
//! request head of `head::request_head` and the retry rules of `retry::RetryPolicy`. Every
//! call carries the gateway's service credential, the caller's audit headers and correlation
//! id. It only ever calls the configured FHIR server: an absolute URL elsewhere is refused (no
//! SSRF through `next` links).

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::headers::DROPPED_RESPONSE_HEADERS;
use crate::upstream::head::request_head;
use crate::upstream::retry::{RetryPolicy, MAX_FRESH_CONNECTION_TRIES};
use async_trait::async_trait;
use bytes::Bytes;
use fhir_gateway_modules::processor::{Body, ClientRequest, FhirClient, ModuleError, Response};
use http::{HeaderName, HeaderValue, Method};
use pingora::http::RequestHeader;
use pingora_core::protocols::http::client::HttpSession;
use pingora_core::upstreams::peer::Peer;
use pingora_core::{Error, ErrorType};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::upstream::head::CallIdentity;

/// Request bodies are written in pieces of this size, each within `write_ms` (as the proxy
/// writes the pieces it receives).
const WRITE_CHUNK: usize = 64 * 1024;

pub struct GatewayFhirClient {
    pub gw: Arc<Gateway>,
    pub call: CallIdentity,
}

impl GatewayFhirClient {
    /// The upstream request target (`/fhir/Patient?x=1`) for a path below the FHIR base, or
    /// an absolute URL of the server (in its own or the gateway's public form). The path
    /// stays below the base (no `..`, no encoded slashes); a fragment is dropped; bytes a
    /// request line cannot carry in the query are percent-encoded.
    pub fn upstream_target(&self, p: &str) -> Result<String, ModuleError> {
        let refuse = |why: &str| ModuleError::Failed(format!("refusing to call {p:?}: {why}"));
        let rest: String = if p.starts_with("http://") || p.starts_with("https://") {
            let public = self.call.public_base.trim_end_matches('/');
            let spellings = self.gw.upstream.base.spellings();
            let under = |prefix: &str| {
                p.strip_prefix(prefix)
                    .filter(|r| r.is_empty() || r.starts_with('/') || r.starts_with('?'))
            };
            spellings
                .iter()
                .map(String::as_str)
                .chain(std::iter::once(public))
                .find_map(under)
                .ok_or_else(|| refuse("not the FHIR server"))?
                .to_string()
        } else {
            let rel = p.trim_start_matches('/');
            if rel.is_empty() || rel.starts_with('?') {
                rel.to_string()
            } else {
                format!("/{rel}")
            }
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (rest, None),
        };
        crate::proxy::check_path(path.as_bytes()).map_err(refuse)?;
        let mut target = self.gw.upstream.path_for(path);
        if let Some(q) = query {
            target.push('?');
            encode_query(q, &mut target);
        }
        Ok(target)
    }
}

/// Appends `q`, percent-encoding what a request line cannot carry (controls, space,
/// non-ASCII) and the characters URL parsers escape in queries (`"`, `<`, `>`, `` ` ``).
fn encode_query(q: &str, out: &mut String) {
    for &b in q.as_bytes() {
        if b <= b' ' || b >= 0x7f || b"\"<>`".contains(&b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
}

/// Why one attempt failed, as far as retrying cares.
enum Failure {
    /// No connection (refused, timed out, TLS failure): nothing reached the server.
    Connect(GatewayError),
    /// The exchange failed before a response header arrived; `error` is Pingora's, to ask
    /// whether it may be repeated on another connection.
    Exchange {
        rendered: GatewayError,
        error: Box<Error>,
        reused: bool,
    },
    /// Never retried: a failure once the response had started, or before anything was sent.
    Final(GatewayError),
}

/// What a failed connection attempt becomes (both roads).
pub(crate) fn connect_error(e: &Error) -> GatewayError {
    match e.etype() {
        ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => {
            GatewayError::UpstreamTimeout("connect timed out".into())
        }
        ErrorType::ConnectRefused => {
            GatewayError::UpstreamUnavailable("connection failed: refused".into())
        }
        t => GatewayError::UpstreamUnavailable(format!("connection failed: {}", t.as_str())),
    }
}

/// Errors Pingora raises while it sets up a connection (TCP, TLS).
pub(crate) fn is_connect_error(t: &ErrorType) -> bool {
    use ErrorType::*;
    matches!(
        t,
        ConnectTimedout
            | ConnectRefused
            | ConnectNoRoute
            | ConnectError
            | BindError
            | SocketError
            | TLSHandshakeFailure
            | TLSHandshakeTimedout
            | InvalidCert
            | HandshakeError
    )
}

/// What a failure on an established connection becomes (both roads).
pub(crate) fn exchange_error(e: &Error) -> GatewayError {
    match e.etype() {
        ErrorType::ReadTimedout => {
            GatewayError::UpstreamTimeout("no response within the read timeout".into())
        }
        ErrorType::WriteTimedout => GatewayError::UpstreamTimeout("request write timed out".into()),
        t => GatewayError::UpstreamUnavailable(format!("request failed: {}", t.as_str())),
    }
}

#[async_trait]
impl FhirClient for GatewayFhirClient {
    async fn send(&self, req: ClientRequest) -> Result<Response, ModuleError> {
        self.call_as(req, Caller::Module)
            .await
            .map(Fetched::into_response)
            .map_err(|e| match e {
                GatewayError::UpstreamTimeout(_) | GatewayError::UpstreamUnavailable(_) => {
                    ModuleError::Unavailable(e.to_string())
                }
                other => ModuleError::Failed(other.to_string()),
            })
    }
}

/// The FHIR server's answer as it came: hop-by-hop and framing headers removed, the body's
/// bytes untouched (the gateway parses them only when a module needs the tree).
pub struct Fetched {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// The server's `Content-Length` (a HEAD answer's length is the GET's, with no body).
    pub length: Option<u64>,
    /// Attempts it took (retries included).
    pub attempts: u32,
}

impl Fetched {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// A JSON content type.
    pub fn is_json(&self) -> bool {
        self.header("content-type")
            .is_some_and(|v| v.to_ascii_lowercase().contains("json"))
    }

    /// As modules see it, with a body already parsed (e.g. cut down for filters).
    pub fn into_parsed(self, body: serde_json::Value) -> Response {
        Response {
            status: self.status,
            headers: self.headers,
            body: Body::Json(body),
        }
    }

    /// As modules see it: the body parsed when it is JSON.
    pub fn into_response(self) -> Response {
        let body = if self.body.is_empty() {
            Body::None
        } else if self.is_json() {
            match serde_json::from_slice(&self.body) {
                Ok(v) => Body::Json(v),
                Err(_) => Body::Raw(self.body.to_vec()),
            }
        } else {
            Body::Raw(self.body.to_vec())
        };
        Response {
            status: self.status,
            headers: self.headers,
            body,
        }
    }
}

/// Whose request the client sends: a module's own call, or the caller's on the buffered road.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Caller {
    Module,
    Client,
}

/// A request ready to send, as often as the retry policy allows.
struct Prepared {
    method: Method,
    head: RequestHeader,
    body: Option<Bytes>,
}

impl GatewayFhirClient {
    /// A call to the FHIR server with the proxy path's retry rules (`RetryPolicy`): only
    /// GET/HEAD/PUT/DELETE, on a failed connection or a 429/503, honouring `Retry-After` /
    /// `x-ms-retry-after-ms` up to `max_delay_ms` (a longer wait goes back to the client);
    /// a pooled connection the server had closed is replaced at once. POST and PATCH: once.
    /// All of it within `upstream.timeouts.total_ms`.
    ///
    /// This is the caller's own request on the buffered road: its head is what the streaming
    /// road would send.
    pub async fn call(&self, req: ClientRequest) -> Result<Fetched, GatewayError> {
        self.call_as(req, Caller::Client).await
    }

    async fn call_as(&self, req: ClientRequest, who: Caller) -> Result<Fetched, GatewayError> {
        let total = Duration::from_millis(self.gw.upstream.timeouts().total_ms);
        match tokio::time::timeout(total, self.call_with_retries(req, who)).await {
            Ok(r) => r,
            // Dropping the attempt drops its connection: nothing half-read goes back to the pool.
            Err(_) => Err(GatewayError::UpstreamTimeout(format!(
                "no complete answer within the total timeout ({} ms)",
                total.as_millis()
            ))),
        }
    }

    async fn call_with_retries(
        &self,
        req: ClientRequest,
        who: Caller,
    ) -> Result<Fetched, GatewayError> {
        let p = self.prepare(req, who)?;
        let policy = RetryPolicy::new(&self.gw.retries);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let wait = match self.attempt(&p).await {
                Ok(mut resp) => {
                    let header = |n: &str| resp.header(n);
                    match policy.after_status(&p.method, attempt, resp.status, header) {
                        Some(d) => d,
                        None => {
                            resp.attempts = attempt;
                            return Ok(resp);
                        }
                    }
                }
                Err(Failure::Connect(e)) => {
                    match policy.after_connect_failure(&p.method, attempt) {
                        Some(d) => d,
                        None => return Err(e),
                    }
                }
                Err(Failure::Exchange {
                    rendered,
                    error,
                    reused,
                }) => {
                    if attempt < MAX_FRESH_CONNECTION_TRIES
                        && policy.on_another_connection(&p.method, &error, reused)
                    {
                        Duration::ZERO
                    } else {
                        return Err(rendered);
                    }
                }
                Err(Failure::Final(e)) => return Err(e),
            };
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }

    /// Checks and maps the module's request once: method, target, headers, body length.
    fn prepare(&self, req: ClientRequest, who: Caller) -> Result<Prepared, GatewayError> {
        let method = Method::from_bytes(req.method.as_bytes()).map_err(|_| {
            GatewayError::Internal(format!("a module asked for method {:?}", req.method))
        })?;
        let target = self
            .upstream_target(&req.path_and_query)
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::with_capacity(req.headers.len());
        for (k, v) in &req.headers {
            // A name that is not one cannot be on the allow-list.
            let Ok(name) = HeaderName::from_bytes(k.as_bytes()) else {
                continue;
            };
            let value = HeaderValue::from_str(v)
                .map_err(|_| GatewayError::Internal(format!("header {k}: not a valid value")))?;
            headers.push((name, value));
        }
        // Framed as the streaming road frames it: a length for a body, and for the methods
        // that carry one; none for an empty GET, HEAD or DELETE.
        let body = req.body.map(Bytes::from).filter(|b| !b.is_empty());
        let length = match &body {
            Some(b) => Some(b.len() as u64),
            None if matches!(method, Method::POST | Method::PUT | Method::PATCH) => Some(0),
            None => None,
        };
        let mut head = request_head(
            &self.gw,
            &self.call,
            &method,
            target.as_bytes(),
            headers.iter().map(|(n, v)| (n, v)),
            length,
        )?;
        // Modules read FHIR JSON unless they ask for something else; a caller's request goes
        // as the caller sent it.
        if who == Caller::Module && !head.headers.contains_key(http::header::ACCEPT) {
            head.insert_header(http::header::ACCEPT, "application/fhir+json")
                .map_err(|_| GatewayError::Internal("Accept".into()))?;
        }
        Ok(Prepared { method, head, body })
    }

    /// One exchange with the FHIR server on a pooled or new connection; the connection goes
    /// back to the pool only when the response was read to its end.
    async fn attempt(&self, p: &Prepared) -> Result<Fetched, Failure> {
        let gw = &self.gw;
        let peer = gw.upstream.peer();
        let sent = Instant::now();
        let (mut session, reused) = gw
            .connector
            .get_http_session(&peer)
            .await
            .map_err(|e| Failure::Connect(connect_error(&e)))?;
        crate::metrics::upstream_connection(reused);
        session.set_read_timeout(peer.options.read_timeout);
        session.set_write_timeout(peer.options.write_timeout);
        let exchange = |error: Box<Error>| Failure::Exchange {
            rendered: exchange_error(&error),
            error,
            reused,
        };
        session
            .write_request_header(Box::new(p.head.clone()))
            .await
            .map_err(exchange)?;
        if let Some(body) = &p.body {
            let mut at = 0;
            while at < body.len() {
                let end = (at + WRITE_CHUNK).min(body.len());
                session
                    .write_request_body(body.slice(at..end), end == body.len())
                    .await
                    .map_err(exchange)?;
                at = end;
            }
        }
        session.finish_request_body().await.map_err(exchange)?;
        read_response_header(&mut session).await.map_err(exchange)?;
        crate::metrics::upstream("client", sent.elapsed());
        let head = session
            .response_header()
            .ok_or_else(|| Failure::Final(GatewayError::Internal("no response header".into())))?;
        let status = head.status.as_u16();
        let headers: Vec<(String, String)> = head
            .headers
            .iter()
            .filter(|(k, _)| {
                !DROPPED_RESPONSE_HEADERS.contains(&k.as_str())
                    && *k != http::header::CONTENT_LENGTH
                    && *k != http::header::TRANSFER_ENCODING
            })
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let cap = gw.limits.max_buffered_response_bytes;
        let announced = head
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        if announced.is_some_and(|n| n > cap as u64) {
            // Not worth reading: the connection is dropped, not pooled.
            return Err(Failure::Final(GatewayError::ResponseTooLarge(cap)));
        }
        let mut body = Vec::with_capacity(announced.unwrap_or(0) as usize);
        while let Some(chunk) = session
            .read_response_body()
            .await
            .map_err(|e| Failure::Final(exchange_error(&e)))?
        {
            if body.len() + chunk.len() > cap {
                return Err(Failure::Final(GatewayError::ResponseTooLarge(cap)));
            }
            body.extend_from_slice(&chunk);
        }
        gw.connector
            .release_http_session(session, &peer, peer.idle_timeout())
            .await;
        Ok(Fetched {
            status,
            headers,
            body: Bytes::from(body),
            length: announced,
            attempts: 1,
        })
    }
}

/// Reads the final response header: HTTP/1 informational answers (`100 Continue`) are
/// skipped; HTTP/2 delivers the final one.
async fn read_response_header(session: &mut HttpSession) -> pingora_core::Result<()> {
    loop {
        session.read_response_header().await?;
        let informational = session
            .response_header()
            .is_some_and(|h| h.status.is_informational() && h.status.as_u16() != 101);
        if !(informational && session.as_http1().is_some()) {
            return Ok(());
        }
    }
}
