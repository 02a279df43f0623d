//! The response side: one cleaner for the response head (dropped headers, URL rewrite, ETag,
//! framing) and the body filter (streaming rewrite, `/metadata`).

use super::*;

/// Content types whose bodies are rewritten. Binary payloads (a PDF in a `Binary`) are
/// passed untouched: changing their bytes would corrupt them.
pub(super) fn is_rewritable(content_type: Option<&[u8]>) -> bool {
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

impl FhirProxy {
    /// One cleaner for the response head, on both roads: hop-by-hop and server-identifying
    /// headers dropped, the upstream base rewritten in every value, `X-Request-Id` set. For a
    /// body the gateway may change (present, text-like) a compressed encoding is refused, the
    /// length removed (the caller frames the body) and a strong ETag weakened, since the
    /// bytes are no longer the server's. Answers whether the body is rewritten.
    pub(super) fn clean_head(
        &self,
        ctx: &Ctx,
        resp: &mut ResponseHeader,
        head_request: bool,
    ) -> std::result::Result<bool, GatewayError> {
        // One pass over the names present (a few) rather than a lookup per dropped name.
        let dropped: Vec<http::HeaderName> = resp
            .headers
            .keys()
            .filter(|n| DROPPED_RESPONSE_HEADERS.contains(&n.as_str()))
            .cloned()
            .collect();
        for h in &dropped {
            resp.remove_header(h);
        }
        // Before the rewrite below: the kick-off's status URL becomes one bound to its caller,
        // not merely the server's URL on the public base.
        self.bind_status_url(ctx, resp)?;
        let invalid = |what: &str| GatewayError::Internal(format!("rewritten {what} is invalid"));
        if let Some(to) = self.replacements(ctx) {
            // Any header may name the upstream (Location, Content-Location, Link, custom ones).
            let mut rewritten = Vec::new();
            for (name, value) in resp.headers.iter() {
                if let Some(v) = self.gw.rewriter.rewrite_all(value.as_bytes(), to) {
                    rewritten.push((name.clone(), v));
                }
            }
            for (name, v) in rewritten {
                let v = HeaderValue::from_bytes(&v).map_err(|_| invalid("header"))?;
                resp.insert_header(name, v).map_err(|_| invalid("header"))?;
            }
        }
        resp.insert_header(REQUEST_ID, ctx.correlation_header.clone())
            .map_err(|_| invalid("X-Request-Id"))?;
        let status = resp.status.as_u16();
        let has_body =
            !head_request && status != 204 && status != 304 && !(100..200).contains(&status);
        let ct = resp.headers.get(http::header::CONTENT_TYPE);
        let can_rewrite = self.replacements(ctx).is_some();
        if !has_body || !can_rewrite || !is_rewritable(ct.map(|v| v.as_bytes())) {
            return Ok(false);
        }
        if let Some(ce) = resp.headers.get(http::header::CONTENT_ENCODING) {
            if !ce.as_bytes().eq_ignore_ascii_case(b"identity") {
                // We asked for a plain body; a compressed one cannot be checked for the
                // upstream address, so it does not go out.
                return Err(GatewayError::UpstreamUnavailable(
                    "compressed response body despite no Accept-Encoding".into(),
                ));
            }
        }
        resp.remove_header(&http::header::CONTENT_LENGTH);
        if let Some(etag) = resp.headers.get(http::header::ETAG) {
            if !etag.as_bytes().starts_with(b"W/") {
                let weak = Bytes::from([b"W/", etag.as_bytes()].concat());
                let weak = HeaderValue::from_maybe_shared(weak).map_err(|_| invalid("ETag"))?;
                resp.insert_header(http::header::ETAG, weak)
                    .map_err(|_| invalid("ETag"))?;
            }
        }
        Ok(true)
    }

    /// Cleans the response head (one cleaner for both roads: see `clean_head`) and decides
    /// how the body is filtered.
    pub(super) async fn response_head(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.head_chain.is_some() {
            self.run_head_chain(ctx, resp)
                .await
                .map_err(|e| ctx.fail(e))?;
        }
        let req = session.req_header();
        self.prepare_head(ctx, resp, &req.method, req.version)
    }

    /// `response_head` for a request of `method` over `version`.
    pub(super) fn prepare_head(
        &self,
        ctx: &mut Ctx,
        resp: &mut ResponseHeader,
        method: &Method,
        version: http::Version,
    ) -> Result<()> {
        ctx.upstream_status = Some(resp.status.as_u16());
        if let Some(t) = ctx.upstream_sent.take() {
            crate::metrics::upstream("stream", t.elapsed());
            ctx.upstream_ms = Some(t.elapsed().as_millis());
        }
        if resp.status.is_success() {
            ctx.written.iter().for_each(|t| self.gw.invalidate(t));
        }
        let head_request = *method == Method::HEAD;
        self.audit_head(ctx, resp, head_request);
        let rewritable = self
            .clean_head(ctx, resp, head_request)
            .map_err(|e| ctx.fail(e))?;
        if rewritable {
            // The body length changes: re-frame as chunked.
            if version == http::Version::HTTP_11 {
                resp.insert_header(
                    http::header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                )?;
            }
            let ct = resp.headers.get(http::header::CONTENT_TYPE);
            let json = ct.is_some_and(|c| {
                c.as_bytes()
                    .windows(4)
                    .any(|w| w.eq_ignore_ascii_case(b"json"))
            });
            let status = resp.status.as_u16();
            if ctx.metadata && json && status == 200 {
                ctx.buffer = Some(Vec::new());
            } else {
                ctx.rewrite = Some(StreamRewrite::default());
            }
        }
        Ok(())
    }

    pub(super) fn response_body(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        if let Some(length) = self.filter_body(body, end_of_stream, ctx)? {
            one_write::body_complete(session, length);
        }
        self.audit_chunk(ctx, body);
        Ok(None)
    }

    /// The body filter: `/metadata` secured whole, other rewritable bodies rewritten as they
    /// stream. `Some(length)` once a rewritten body is complete.
    pub(super) fn filter_body(
        &self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<usize>> {
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
                ctx.body_out = out.len();
                *body = Some(Bytes::from(out));
                return Ok(Some(ctx.body_out));
            }
            *body = Some(Bytes::new());
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
        ctx.body_out += out.len();
        *body = Some(out);
        Ok(end_of_stream.then_some(ctx.body_out))
    }
}
