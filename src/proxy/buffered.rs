//! The buffered road: when a module needs the bodies, the gateway reads the request, runs the
//! pre chain, calls the FHIR server through the one upstream client, runs the post chain on the
//! parsed response and writes the result with a length.

use super::exchange::{Exchanged, Origin};
use super::plan::Plan;
use super::*;

/// What the buffered road answers with.
enum Answer {
    /// A module's answer, or the server's after the post chain (with the server's bytes).
    Module(ModResponse, Option<Origin>),
    /// The server's answer that no post module touches: its bytes, only rewritten.
    Server(Fetched),
}

/// Resolves when the client closes its side of the connection (read side at EOF or reset).
/// Bytes of a pipelined next request are kept for it (pipelining is on), not treated as a
/// close.
pub(super) async fn client_gone(session: &mut Session) {
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

/// The request as modules see it: path below the prefix and raw query from `ctx`, no body.
pub(super) fn module_request(
    method: &str,
    ctx: &Ctx,
    headers: Vec<(String, String)>,
) -> ModRequest {
    ModRequest {
        method: method.to_string(),
        path: ctx.rest.clone(),
        query: ctx
            .query
            .as_deref()
            .map(|q| String::from_utf8_lossy(q).into_owned())
            .unwrap_or_default(),
        headers,
        body: None,
    }
}

/// A module's own OperationOutcome carries the correlation id too, like every gateway error.
pub(super) fn tag_outcome(r: &mut ModResponse, correlation_id: &str) {
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

/// Headers a 304 carries from the 200 it stands for (RFC 9110 §15.4.5).
const NOT_MODIFIED_HEADERS: &[&str] = &[
    "etag",
    "last-modified",
    "cache-control",
    "content-location",
    "expires",
    "vary",
];

/// The gateway's own 304 for a filtered caller's conditional GET (its `If-None-Match` was not
/// sent upstream): only when the post chain let the server's 200 through unchanged, so the
/// caller may see exactly that representation, and its `ETag` matches (weak comparison).
fn not_modified(
    req: &ModRequest,
    resp: &ModResponse,
    origin: Option<&Origin>,
) -> Option<ModResponse> {
    if req.method != "GET" || resp.status != 200 {
        return None;
    }
    let unchanged =
        matches!((origin, &resp.body), (Some(o), ModBody::Json(v)) if o.tree.unchanged(v));
    let etag = resp.header("etag")?;
    let asked = req
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("if-none-match"))
        .map(|(_, v)| v.as_str());
    if !unchanged || !headers::if_none_match_matches(asked, etag) {
        return None;
    }
    let mut headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .filter(|(k, _)| {
            NOT_MODIFIED_HEADERS
                .iter()
                .any(|h| k.eq_ignore_ascii_case(h))
        })
        .cloned()
        .collect();
    // The 200 it stands for goes out with a weak ETag (its JSON body is rewritten), so the 304
    // names the same one.
    if !etag.starts_with("W/") {
        let weak = format!("W/{etag}");
        headers.retain(|(k, _)| !k.eq_ignore_ascii_case("etag"));
        headers.push(("etag".into(), weak));
    }
    Some(ModResponse {
        status: 304,
        headers,
        body: ModBody::None,
    })
}

impl FhirProxy {
    /// Audit headers for every upstream call made for this request.
    pub(super) fn audit_headers(&self, ctx: &Ctx) -> Vec<(Bytes, HeaderValue)> {
        let [user, upn, tenant, source, proxy] = &self.gw.audit;
        // Sanitised values are printable ASCII: always valid header values.
        let value = |s: &str| {
            HeaderValue::try_from(headers::sanitize_header_value(s))
                .unwrap_or(HeaderValue::from_static("?"))
        };
        let mut v = Vec::with_capacity(5);
        if let Some(id) = &ctx.identity {
            v.push((user.clone(), value(&id.user_id)));
            if let Some(u) = &id.upn {
                v.push((upn.clone(), value(u)));
            }
            if let Some(t) = &id.tenant {
                v.push((tenant.clone(), value(t)));
            }
        }
        if let Some(s) = &ctx.source {
            v.push((source.clone(), value(s)));
        }
        v.push((proxy.clone(), self.gw.name_header.clone()));
        v
    }

    /// Who every upstream call of this request is made for: service credential, the
    /// caller's audit headers, correlation id (both roads build their heads from it).
    pub(super) fn call_identity(&self, ctx: &Ctx) -> CallIdentity {
        CallIdentity {
            service_auth: ctx.service_auth.clone(),
            audit: self.audit_headers(ctx),
            correlation_header: ctx.correlation_header.clone(),
            public_base: self.public_base_of(ctx),
            // Set once the route's chain is known to apply (`run_modules`).
            filtered: false,
        }
    }

    /// The allow-listed request headers, as modules and the gateway's client see them (names
    /// lower-case; values that are not UTF-8 left out).
    pub(super) fn forwarded_headers(&self, down: &RequestHeader) -> Vec<(String, String)> {
        self.gw
            .forward
            .iter()
            .flat_map(|n| {
                down.headers
                    .get_all(n)
                    .iter()
                    .filter_map(|v| std::str::from_utf8(v.as_bytes()).ok())
                    .map(|v| (n.as_str().to_string(), v.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// What modules see of this request, on either road.
    pub(super) fn module_context(&self, ctx: &Ctx, client: Arc<GatewayFhirClient>) -> Context {
        Context {
            identity: ctx.identity.as_deref().cloned(),
            correlation_id: ctx.correlation_id.clone(),
            public_base: self.public_base_of(ctx).to_string(),
            upstream_base: self.gw.upstream.base.as_string(),
            fhir: client,
            events: self.gw.events.clone(),
            links: self.gw.links.clone(),
        }
    }

    /// The FHIR client for this request.
    pub(super) fn client_for(&self, ctx: &Ctx) -> GatewayFhirClient {
        GatewayFhirClient {
            gw: self.gw.clone(),
            call: ctx.call.clone().unwrap_or_else(|| self.call_identity(ctx)),
        }
    }

    /// Runs the route's chains. `Ok(false)`: nothing needs the bodies, stream through Pingora
    /// (with the path and query the pre chain left). `Ok(true)`: answered here — the request
    /// body was read, the FHIR server called through the gateway's client, the post chain run
    /// over the one parsed response, and the result serialised and rewritten once.
    pub(super) async fn run_modules(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        admit: Admit,
    ) -> std::result::Result<bool, GatewayError> {
        let gw = self.gw.clone();
        let route = &gw.routes[ctx.route];
        // The caller's scope filter, if its scopes narrow: it runs after the route's post
        // chain (so nothing a module adds escapes it) and judges writes first.
        let scope: Vec<Arc<dyn PostProcess>> = ctx.scopes.iter().cloned().collect();
        let no_chain = route.pre.is_empty() && route.post.is_empty() && scope.is_empty();
        if no_chain && matches!(admit, Admit::Proxy) {
            // No chain on this route: nothing to build or ask.
            return Ok(false);
        }
        let down = session.req_header();
        let headers = self.forwarded_headers(down);
        let mut req = module_request(down.method.as_str(), ctx, headers);
        let mut body = match admit {
            Admit::Buffered(b) => Some(b),
            Admit::Proxy => None,
        };
        // Under break-the-glass: the filters its session bypasses.
        let glass = ctx.glass.as_ref().map(|_| match &gw.glass {
            Some(g) => g.bypass.as_slice(),
            None => &[],
        });
        let caller = ctx.identity.as_deref();
        let plan = Plan::new(route, &scope, glass, &req, caller, body.is_some());
        if !plan.buffered && !plan.pre_applies {
            // Headers-only post modules run on the streamed answer's head.
            ctx.head_chain = plan.post_applies.then_some(req);
            return Ok(false);
        }
        if plan.buffered && body.is_none() {
            body = Some(self.read_body(session, &mut ctx.body).await?);
        }
        req.body = body.map(|b| b.to_vec());
        // A module that finishes on the answer compares it with what the caller sent.
        let original = plan.pre_finishes.then(|| req.clone());
        if plan.post_applies {
            // The post chain decides what this caller sees, so the server must not answer a
            // conditional read with a 304 the chain cannot judge (see `CallIdentity::filtered`).
            if ctx.call.is_none() {
                ctx.call = Some(self.call_identity(ctx));
            }
            if let Some(call) = ctx.call.as_mut() {
                call.filtered = true;
            }
        }
        let client = Arc::new(self.client_for(ctx));
        let cx = self.module_context(ctx, client.clone());
        // The work below owns no part of the session, so it can race the client leaving: a
        // buffered exchange (fetches, parsing, filtering, rewriting) stops when nobody is
        // left to answer. Only when the request body was read (or there is none), so the
        // watch cannot swallow body bytes.
        let work = async {
            if plan.conditional {
                if let Some(mut r) =
                    chain::resolve_conditionals(&route.prefix, &plan.post, &mut req, &cx).await?
                {
                    tag_outcome(&mut r, &ctx.correlation_id);
                    return Ok(Some(Answer::Module(r, None)));
                }
            }
            let (mut resp, origin) = match chain::run_pre(&route.prefix, &route.pre, &mut req, &cx)
                .await?
            {
                PreResult::Reply(mut r) => {
                    tag_outcome(&mut r, &ctx.correlation_id);
                    // A direct reply skips the route's post chain, never the scope filter.
                    chain::run_post(&route.prefix, &scope, &req, &mut r, &cx).await?;
                    return Ok(Some(Answer::Module(r, None)));
                }
                PreResult::Stop(mut r) => {
                    tag_outcome(&mut r, &ctx.correlation_id);
                    (r, None)
                }
                PreResult::Continue if !plan.buffered => {
                    // Only the path or query changed: the exchange can still stream.
                    check_path(req.path.as_bytes()).map_err(|why| {
                        GatewayError::Internal(format!("a module produced a bad path: {why}"))
                    })?;
                    self.authorize_final(ctx, &req)?;
                    ctx.rest = req.path.clone();
                    ctx.query = (!req.query.is_empty()).then(|| req.query.clone().into_bytes());
                    ctx.head_chain = plan.post_applies.then(|| req.clone());
                    return Ok(None);
                }
                PreResult::Continue => {
                    self.authorize_final(ctx, &req)?;
                    // What goes upstream is judged, after the pre chain: a refusal is the
                    // answer and the server never sees the write.
                    let judges: Vec<_> = scope.iter().chain(plan.post.iter()).cloned().collect();
                    if let Some(mut refused) =
                        chain::check_writes(&route.prefix, &judges, &req, &cx).await?
                    {
                        tag_outcome(&mut refused, &ctx.correlation_id);
                        return Ok(Some(Answer::Module(refused, None)));
                    }
                    let (mut r, origin) = match self.exchange(ctx, &client, &req, &plan).await? {
                        Exchanged::AsIs(fetched) => return Ok(Some(Answer::Server(fetched))),
                        Exchanged::Parsed(r, origin) => (r, origin),
                    };
                    if let Some(original) = &original {
                        chain::run_finish(&route.prefix, &route.pre, original, &req, &mut r, &cx)
                            .await?;
                    }
                    (r, origin)
                }
            };
            let copy = (!plan.shadow.is_empty()).then(|| resp.clone());
            chain::run_post(&route.prefix, &plan.post, &req, &mut resp, &cx).await?;
            // Also when a route module stopped the chain: what it answered is judged too.
            chain::run_post(&route.prefix, &scope, &req, &mut resp, &cx).await?;
            if let Some(copy) = copy {
                chain::shadow::spawn(&route.prefix, plan.shadow.clone(), &req, copy, &resp, &cx);
            }
            if let Some(not_modified) = not_modified(&req, &resp, origin.as_ref()) {
                return Ok(Some(Answer::Module(not_modified, None)));
            }
            Ok::<_, GatewayError>(Some(Answer::Module(resp, origin)))
        };
        let outcome = if plan.buffered {
            tokio::select! {
                r = work => r,
                _ = client_gone(session) => Err(GatewayError::ClientGone),
            }
        } else {
            work.await
        };
        self.send_answer(session, ctx, outcome).await
    }

    /// Writes what the chains answered. `Ok(false)`: the exchange streams after all (only the
    /// path or query changed); a client that left is logged, not answered.
    async fn send_answer(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        outcome: std::result::Result<Option<Answer>, GatewayError>,
    ) -> std::result::Result<bool, GatewayError> {
        match outcome {
            Ok(Some(Answer::Module(resp, origin))) => {
                self.write_module_response(session, ctx, resp, origin.as_ref())
                    .await?;
                Ok(true)
            }
            Ok(Some(Answer::Server(f))) => {
                let mut body = f.body.clone();
                if ctx.metadata && f.status == 200 && f.is_json() {
                    if let Some(secured) = self.secure_capability_statement(&body) {
                        body = Bytes::from(secured);
                    }
                }
                self.write_answer(session, ctx, f.status, &f.headers, body)
                    .await?;
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
    pub(super) fn authorize_final(
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
            let entries = classify_bundle(&bundle, &self.public_base_of(ctx))
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

    /// Writes a module-road response: the body serialised once, faithfully (the server's
    /// bytes wherever modules changed nothing).
    pub(super) async fn write_module_response(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        resp: ModResponse,
        origin: Option<&Origin>,
    ) -> std::result::Result<(), GatewayError> {
        let mut headers = resp.headers;
        let body = match resp.body {
            ModBody::Json(v) => {
                if !headers
                    .iter()
                    .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
                {
                    headers.push(("content-type".into(), "application/fhir+json".into()));
                }
                let mut out = match origin {
                    Some(o) => o.tree.to_vec(&v, &o.raw),
                    None => {
                        serde_json::to_vec(&v).map_err(|e| GatewayError::Internal(e.to_string()))?
                    }
                };
                if ctx.metadata && resp.status == 200 {
                    if let Some(secured) = self.secure_capability_statement(&out) {
                        out = secured;
                    }
                }
                // The tree just serialised is what the trail reads: no second parse.
                self.audit_tree(ctx, resp.status, &v);
                out
            }
            ModBody::Raw(b) => b,
            ModBody::None => Vec::new(),
        };
        self.write_answer(session, ctx, resp.status, &headers, Bytes::from(body))
            .await
    }

    /// Writes a buffered-road answer with a length, through the one response-head cleaner;
    /// the body is rewritten as bytes.
    pub(super) async fn write_answer(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        status: u16,
        headers: &[(String, String)],
        mut out: Bytes,
    ) -> std::result::Result<(), GatewayError> {
        let invalid = |what: String| GatewayError::Internal(format!("{what} is not valid"));
        let mut h = ResponseHeader::build(status, Some(headers.len() + 3))
            .map_err(|_| invalid(format!("status {status}")))?;
        for (k, v) in headers {
            let k = k.to_ascii_lowercase();
            // The gateway frames the body; the correlation id is this request's.
            if k == "content-length" || k == "transfer-encoding" || k == REQUEST_ID {
                continue;
            }
            let v = HeaderValue::from_str(v).map_err(|_| invalid(format!("header {k}")))?;
            h.append_header(k.clone(), v)
                .map_err(|_| invalid(format!("header {k}")))?;
        }
        let head_only = session.req_header().method == Method::HEAD;
        if self.clean_head(ctx, &mut h, head_only)? {
            if let Some(new) = self
                .replacements(ctx)
                .and_then(|to| self.gw.rewriter.rewrite_all(&out, to))
            {
                out = Bytes::from(new);
            }
        }
        if !head_only {
            self.audit_answer(ctx, status, headers, &out);
        }
        // A HEAD answer has no body: its length is the server's (as on the streaming road).
        let length = match ctx.upstream_length {
            Some(n) if head_only => n,
            _ => out.len() as u64,
        };
        if status != 304 {
            // A 304 has no body, and a length would have to be the 200's (RFC 9110 §8.6).
            let _ = h.insert_header(http::header::CONTENT_LENGTH, length.to_string());
        }
        session
            .write_response_header(Box::new(h), false)
            .await
            .map_err(|_| GatewayError::Internal("client went away".into()))?;
        let body = if head_only { Bytes::new() } else { out };
        session
            .write_response_body(Some(body), true)
            .await
            .map_err(|_| GatewayError::Internal("client went away".into()))?;
        Ok(())
    }
}
