//! The processor chain's contract: what a pre-processor (request side) and a post-processor
//! (response side) see, what they may answer, and the two services the gateway lends them —
//! a FHIR client for calls to the server and an event sink.
//!
//! Semantics (the predecessor's, kept): modules run in configured order, each sees the previous
//! one's result. A pre-processor may stop the chain with a response: the upstream call is then
//! skipped and that response still passes the post chain, unless it is a direct reply. Stopping
//! without a response, or failing, is a 500 OperationOutcome naming the module — never a pass.

use crate::identity::Identity;
use async_trait::async_trait;
use serde_json::Value;
use std::fmt;
use std::sync::Arc;

/// A request as the chain sees it. `path` is below the route prefix (`/Patient/1`, `""`).
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Raw query string, without `?`.
    pub query: String,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    /// The body, read only when some module declared it needs it (or the gateway did).
    pub body: Option<Vec<u8>>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if there is one and it parses.
    pub fn json(&self) -> Option<Result<Value, String>> {
        self.body
            .as_ref()
            .filter(|b| !b.is_empty())
            .map(|b| serde_json::from_slice(b).map_err(|e| format!("invalid JSON: {e}")))
    }
}

/// A response as the chain sees it: the body parsed once (JSON) and serialised once.
#[derive(Clone, Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    /// Lower-case names; hop-by-hop and framing headers are not here.
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    None,
    /// A FHIR JSON body, parsed.
    Json(Value),
    /// Anything else, untouched by modules.
    Raw(Vec<u8>),
}

impl Response {
    pub fn json(status: u16, body: Value) -> Response {
        Response {
            status,
            headers: vec![("content-type".into(), "application/fhir+json".into())],
            body: Body::Json(body),
        }
    }

    /// An OperationOutcome response (`code` from the FHIR issue-type value set).
    pub fn outcome(status: u16, code: &'static str, diagnostics: impl Into<String>) -> Response {
        let sev = if status >= 500 {
            crate::Severity::Fatal
        } else {
            crate::Severity::Error
        };
        Response::json(
            status,
            crate::operation_outcome(&[crate::Issue {
                severity: sev,
                code,
                diagnostics: diagnostics.into(),
            }]),
        )
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        let name = name.to_ascii_lowercase();
        self.headers.retain(|(k, _)| *k != name);
        self.headers.push((name, value.into()));
    }

    pub fn json_body(&self) -> Option<&Value> {
        match &self.body {
            Body::Json(v) => Some(v),
            _ => None,
        }
    }

    pub fn json_body_mut(&mut self) -> Option<&mut Value> {
        match &mut self.body {
            Body::Json(v) => Some(v),
            _ => None,
        }
    }
}

/// What a pre-processor decided.
#[derive(Debug)]
pub enum PreOutcome {
    /// Go on (the request may have been changed in place).
    Continue,
    /// Skip the upstream call; this response still goes through the post chain.
    Stop(Response),
    /// Skip the upstream call and the post chain: answer with this.
    Reply(Response),
    /// Stop without a response: a 500 naming the module (a module bug, never a pass).
    StopWithoutResponse,
}

/// What a post-processor decided.
#[derive(Debug)]
pub enum PostOutcome {
    /// Go on (the response may have been changed in place).
    Continue,
    /// Answer with the response as it is now; later post modules do not run.
    Stop,
    /// Stop without a response: a 500 naming the module.
    StopWithoutResponse,
}

/// A module failure, rendered as an OperationOutcome naming the module. A module that means a
/// client error answers with `PreOutcome::Stop(Response::outcome(4xx, ...))` instead.
#[derive(Debug, Clone, PartialEq)]
pub enum ModuleError {
    /// Something broke (upstream unreachable, unexpected data): 500, fail closed.
    Failed(String),
    /// A dependency needed for a security decision is down: 503, fail closed.
    Unavailable(String),
}

impl fmt::Display for ModuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModuleError::Failed(m) | ModuleError::Unavailable(m) => f.write_str(m),
        }
    }
}

/// A request a module makes to the FHIR server. `path_and_query` is below the FHIR base
/// (`Patient/1`, `Observation?patient=1`) or a full URL the server handed out (a `next` link,
/// in the gateway's public form or the server's).
#[derive(Clone, Debug, PartialEq)]
pub struct ClientRequest {
    pub method: String,
    pub path_and_query: String,
    pub headers: Vec<(String, String)>,
    pub body: Option<Vec<u8>>,
}

impl ClientRequest {
    pub fn get(path_and_query: impl Into<String>) -> ClientRequest {
        ClientRequest {
            method: "GET".into(),
            path_and_query: path_and_query.into(),
            headers: Vec::new(),
            body: None,
        }
    }
}

/// The FHIR server, as the gateway lends it to modules: pooled, with the gateway's service
/// identity and the caller's audit headers and correlation id on every call.
#[async_trait]
pub trait FhirClient: Send + Sync {
    /// Sends a request; the response body is parsed when it is JSON. URLs in it are the
    /// server's own (modules compare references; the gateway rewrites what goes out).
    async fn send(&self, req: ClientRequest) -> Result<Response, ModuleError>;

    /// GET returning the status and JSON body (any status); an answer without JSON is an error.
    async fn get_json(&self, path_and_query: &str) -> Result<(u16, Value), ModuleError> {
        let r = self.send(ClientRequest::get(path_and_query)).await?;
        match r.body {
            Body::Json(v) => Ok((r.status, v)),
            _ => Err(ModuleError::Failed(format!(
                "GET {path_and_query}: answered {} without a JSON body",
                r.status
            ))),
        }
    }
}

/// Where events go (the Kafka producer, a file, or nowhere). Waits only when its queue is
/// full: a slower write beats a lost event.
#[async_trait]
pub trait EventSink: Send + Sync {
    async fn publish(&self, key: &str, event: Value);

    /// An event its module wrote as JSON (an object) itself, with its correlation id: a sink
    /// that stores bytes needs no tree. By default it is parsed and published as a tree.
    async fn publish_json(&self, key: &str, json: Vec<u8>, _correlation_id: &str) {
        match serde_json::from_slice(&json) {
            Ok(v) => self.publish(key, v).await,
            Err(e) => debug_assert!(false, "an event that is not JSON: {e}"),
        }
    }
}

/// Everything a module may use for one request.
#[derive(Clone)]
pub struct Context {
    pub identity: Option<Identity>,
    pub correlation_id: String,
    /// Public FHIR base of the route the caller used (`https://gw.example/fhir`).
    pub public_base: String,
    /// The FHIR server's own base: absolute references in its answers use it.
    pub upstream_base: String,
    /// Who callers are in the FHIR server (`fhirUser`, else identity links).
    pub links: Arc<crate::links::Directory>,
    pub fhir: Arc<dyn FhirClient>,
    pub events: Arc<dyn EventSink>,
}

#[async_trait]
pub trait PreProcess: Send + Sync {
    fn name(&self) -> &'static str;

    /// Whether this module wants the request body (then the gateway reads it whole).
    fn needs_body(&self) -> bool {
        false
    }

    /// Cheap check: does this module do anything for this request, from this caller (`None`
    /// without authentication)? Modules that do not apply cost nothing, and do not force
    /// buffering.
    fn applies(&self, _req: &Request, _caller: Option<&Identity>) -> bool {
        true
    }

    async fn process(&self, req: &mut Request, cx: &Context) -> Result<PreOutcome, ModuleError>;

    /// Cheap check: may this module have to finish its work on the server's answer
    /// (`finish`)? The gateway then keeps the request as the caller sent it.
    fn finishes(&self) -> bool {
        false
    }

    /// Runs after the upstream call, before the post chain, when this module applied and the
    /// chain continued: `original` is the request as the caller sent it, `sent` as it went to
    /// the server. A module that changed what a request means (TransformBundle: a transaction
    /// sent as a batch) gives the answer that meaning back here.
    async fn finish(
        &self,
        _original: &Request,
        _sent: &Request,
        _resp: &mut Response,
        _cx: &Context,
    ) -> Result<(), ModuleError> {
        Ok(())
    }
}

/// What a post module reads of a response body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyAccess {
    /// Anything; it may edit anything.
    Whole,
    /// The status and headers only; it may change headers, never the status or the body.
    /// Where no other module needs the body, the answer streams and the module runs on the
    /// response head (it sees `Body::None`).
    Headers,
    /// Only what decides whose data each resource is (`compartment::decides_owner`), and it
    /// only removes or replaces whole entries (or the whole answer). The gateway may then parse
    /// a Bundle's resources cut down to those elements and write every entry kept as the
    /// server's own bytes.
    Compartment,
    /// Anything, and it changes nothing: neither the status, the headers nor the body. The
    /// gateway then sends the server's bytes as they came and keeps no copy of the tree to
    /// compare with (an observer).
    Read,
    /// Only what decides whose data each resource is (as `Compartment`), and it changes
    /// nothing (as `Read`): the gateway may parse the answer cut down to those elements, a
    /// single resource too, and sends the server's bytes (PublishFHIREvent).
    ReadOwners,
}

#[async_trait]
pub trait PostProcess: Send + Sync {
    fn name(&self) -> &'static str;

    /// Cheap check on the request and the caller alone (before the upstream call): may this
    /// module act on the response? When no post module applies, the response streams
    /// untouched: a caller a filter bypasses never has the response buffered.
    fn applies(&self, _req: &Request, _caller: Option<&Identity>) -> bool {
        true
    }

    async fn process(
        &self,
        req: &Request,
        resp: &mut Response,
        cx: &Context,
    ) -> Result<PostOutcome, ModuleError>;

    /// Cheap check, like `applies`: does this module judge this request before it is sent
    /// (`check_write`)? Such a request takes the buffered road, its body read whole, whatever
    /// its method (a DELETE too).
    fn checks_write(&self, _req: &Request, _caller: Option<&Identity>) -> bool {
        false
    }

    /// Judges a write as it will go upstream (after the pre chain, before the server is
    /// called): `Some` refuses it with that answer, and nothing is sent. The response side
    /// cannot undo a write, so a filter that limits what the caller sees limits here what the
    /// caller may change.
    async fn check_write(
        &self,
        _req: &Request,
        _cx: &Context,
    ) -> Result<Option<Response>, ModuleError> {
        Ok(None)
    }

    /// Explaining mode (`/manage/explain` only, never the normal path): why each resource of
    /// `resp` — the answer as this module receives it — is kept or withheld, judged as
    /// `process` judges it. `None`: the module does not explain (it withholds nothing by
    /// itself, or does not say why).
    async fn explain(
        &self,
        _req: &Request,
        _resp: &Response,
        _cx: &Context,
    ) -> Result<Option<Vec<crate::explain::Verdict>>, ModuleError> {
        Ok(None)
    }

    /// What it reads of the body; `Compartment` lets the gateway skip parsing the rest.
    fn reads(&self) -> BodyAccess {
        BodyAccess::Whole
    }

    /// A write of `resource_type` went through a gateway (this one, or another instance as
    /// the event stream tells): drop whatever cached data it may have changed.
    fn invalidate(&self, _resource_type: &str) {}

    /// Whether this module decides on callers' identity links (`identity_links`, `/manage`).
    /// When any configured module does, the gateway guards the link identifiers: a write by
    /// anyone but an Administrator that changes them is refused (a caller could otherwise link
    /// itself to someone else's data).
    fn uses_identity_links(&self) -> bool {
        false
    }

    /// Whether this module limits the response to the data the caller may see as a
    /// participant (Patient, Practitioner, RelatedPerson): a route's policy may grant those
    /// roles only when its post chain has such a module, or they would see every patient.
    fn scopes_data_to_the_caller(&self) -> bool {
        false
    }
}

/// Splits `a=1&b=2` into pairs (no decoding: modules compare parameter names).
pub fn query_pairs(q: &str) -> impl Iterator<Item = (&str, &str)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// The `next` paging link of a searchset Bundle.
pub fn next_link(bundle: &Value) -> Option<String> {
    bundle
        .get("link")?
        .as_array()?
        .iter()
        .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))?
        .get("url")?
        .as_str()
        .map(str::to_string)
}
