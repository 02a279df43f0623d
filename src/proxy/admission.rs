//! Admission: everything `request_filter` checks before a request may go upstream, in order
//! (framing, header limits, method, path, query, body size and media type, public base,
//! authentication, classification, policy, service credential).

use super::*;

/// How an admitted request continues.
pub(super) enum Admit {
    /// Through Pingora, streaming.
    Proxy,
    /// The gateway read the body: it makes the upstream call itself.
    Buffered(Bytes),
}

/// Methods of the FHIR REST API.
pub(super) fn is_fhir_method(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    )
}

/// `Connection` may name hop-by-hop headers: at most 9 names, each an HTTP token (so no
/// pseudo-header), none of them a header the proxy vouches for (`Host`, `X-Forwarded-*`).
fn connection_nominations(req: &RequestHeader) -> std::result::Result<(), GatewayError> {
    let refuse = |why: &str| {
        Err(GatewayError::BadRequest(format!(
            "Connection header: {why}"
        )))
    };
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    let mut count = 0;
    for name in req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
    {
        count += 1;
        if count >= 10 {
            return refuse("too many nominated headers");
        }
        if !name.iter().all(tchar) {
            return refuse("a nominated header is not a header name");
        }
        let lower = name.to_ascii_lowercase();
        if matches!(
            lower.as_slice(),
            b"host" | b"x-forwarded-for" | b"x-forwarded-host" | b"x-forwarded-proto"
        ) {
            return refuse("a protected header is nominated");
        }
    }
    Ok(())
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
    // The two digits after each '%' (fewer at the end), compared without copying the path.
    let escapes = || {
        memchr::memchr_iter(b'%', rest).map(|i| rest.get(i + 1..i + 3).unwrap_or(&rest[i + 1..]))
    };
    if escapes().any(|esc| {
        [&b"2f"[..], b"5c", b"2e", b"00", b"25", b"3b"]
            .iter()
            .any(|bad| esc.eq_ignore_ascii_case(bad))
    }) {
        return Err("encoded '/', '\\', '.', '%', ';' or NUL in the path");
    }
    // Escapes of bytes >= 0x80: FHIR paths are ASCII, and overlong UTF-8 (`%c0%ae`) decodes
    // to '.' or '/' on lenient servers.
    if escapes().any(|esc| {
        esc.first()
            .is_some_and(|c| b"89abcdef".contains(&c.to_ascii_lowercase()))
    }) {
        return Err("percent-encoded non-ASCII bytes in the path");
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

impl FhirProxy {
    /// The client address to audit: the TCP peer, unless it is a trusted proxy, then the
    /// right-most `X-Forwarded-For` hop that is not itself a trusted proxy.
    pub(super) fn audit_source(&self, req: &RequestHeader, peer: Option<IpAddr>) -> Option<String> {
        let peer = peer?;
        if !self.gw.is_trusted_proxy(peer) {
            return Some(peer.to_string());
        }
        let hops: Vec<String> = req
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
    pub(super) async fn admit(
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
        let tls = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .is_some();
        self.admit_head(session.req_header(), tls, ctx)?;
        if let Some((kind, token)) = crate::bulk::Kind::of_path(&ctx.rest) {
            let token = token.to_string();
            return self.admit_handed_out(session, ctx, kind, &token).await;
        }
        if !ctx.metadata {
            bulk::check_server_path(&ctx.rest)?;
        }
        let route = &gw.routes[ctx.route];

        // Anonymous by design: the CapabilityStatement (SMART apps read it before they have
        // a token).
        let anonymous = ctx.metadata;
        let mut admit = Admit::Proxy;
        let mut guard = false;
        if gw.auth_mode == AuthMode::Jwt && !anonymous {
            let (identity, request) = self.identify(session.req_header(), ctx).await?;
            let scopes_alone = gw.smart.scopes_alone_suffice;
            if request.interaction == Interaction::Bundle {
                // A batch is authorised entry by entry, so its body must be read first.
                let body = self.read_body(session, &mut ctx.body).await?;
                let bundle: Value = serde_json::from_slice(&body)
                    .map_err(|e| GatewayError::BadRequest(format!("invalid JSON Bundle: {e}")))?;
                let base = self.public_base_of(ctx);
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
                if request.interaction == Interaction::Operation("$export".into()) {
                    self.admit_export(session.req_header(), ctx, Some(&identity))?;
                }
            }
            guard = gw.links_in_use && !identity.has(Role::Administrator) && !request.is_read;
            // The policy granted narrowed scopes on the understanding that this filter judges
            // what comes back and what is written: set with the identity, never apart.
            ctx.scopes =
                ScopeFilter::for_identity(&identity).map(|f| Arc::new(f) as Arc<dyn PostProcess>);
            self.break_the_glass(session.req_header(), &identity, request.is_read, ctx)
                .await?;
            ctx.identity = Some(identity);
        } else if !anonymous && ctx.rest.rsplit('/').next() == Some("$export") {
            // No classification without authentication: the kick-off is known by its path.
            self.admit_export(session.req_header(), ctx, None)?;
        }
        self.note_writes(&method, ctx);
        ctx.service_auth = gw.identity.authorization().await?;
        ctx.call = Some(self.call_identity(ctx));
        if ctx.body.checks_json() && matches!(admit, Admit::Proxy) {
            // A JSON body is checked whole before anything goes upstream (Pingora sends the
            // head before the body): then the gateway's upstream client sends it.
            admit = Admit::Buffered(self.read_body(session, &mut ctx.body).await?);
        }
        if guard {
            admit = self.guard_links(session, ctx, &method, admit).await?;
        }

        if matches!(admit, Admit::Proxy) && matches!(method, Method::PUT | Method::DELETE) {
            // Keep up to 64 KiB of the body so a 429/503 can be retried.
            session.enable_retry_buffering();
        }
        Ok(admit)
    }

    /// The checks that need only the request head (and whether it came over TLS): header
    /// limits, `Connection` nominations, UTF-8 of forwarded values, method, path, query, what
    /// the body will be, and the public base. Sets `ctx.rest`, `ctx.query`, `ctx.public_base`.
    pub(super) fn admit_head(
        &self,
        req: &RequestHeader,
        tls: bool,
        ctx: &mut Ctx,
    ) -> std::result::Result<(), GatewayError> {
        let gw = &self.gw;
        let method = &req.method;
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
        // Pingora's proxy refuses some `Connection` nominations before it builds the upstream
        // request; the buffered road never reaches that code, so the rule is applied here,
        // once, for both.
        connection_nominations(req)?;
        // What crosses to the FHIR server is text: a value that is not UTF-8 is refused on
        // both roads (modules see headers as strings and could not pass it on).
        if let Some(name) = gw.forward.iter().find(|n| {
            req.headers
                .get_all(*n)
                .iter()
                .any(|v| std::str::from_utf8(v.as_bytes()).is_err())
        }) {
            return Err(GatewayError::BadRequest(format!(
                "header {name} is not valid UTF-8"
            )));
        }
        if !is_fhir_method(method) {
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

        // One body guard for both roads: what the head declares now, the bytes as they come.
        ctx.body.admit(req, rest.as_bytes())?;

        // Public base for rewriting: configured, or from the Host the caller used.
        if route.public_base.is_none() {
            let d = self.derived_public_base(req, tls, ctx.client_ip, ctx.route)?;
            ctx.public_base = Some(PublicBase::Derived(d));
        } else {
            ctx.public_base = Some(PublicBase::Configured);
        }
        ctx.rest = rest;
        ctx.query = query;
        Ok(())
    }

    /// The caller (a verified token) and what the request is (interaction, type, compartment).
    pub(super) async fn identify(
        &self,
        req: &RequestHeader,
        ctx: &Ctx,
    ) -> std::result::Result<
        (Arc<Identity>, fhir_gateway_modules::request::FhirRequest),
        GatewayError,
    > {
        let identity = self
            .gw
            .auth
            .authenticate(&req.headers, ctx.query.as_deref())
            .await
            .map_err(GatewayError::from)?;
        let query = ctx
            .query
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default();
        let request = classify(req.method.as_str(), &ctx.rest, &query)
            .map_err(|e| GatewayError::BadRequest(format!("not a FHIR request: {e}")))?;
        Ok((identity, request))
    }

    /// Resource types a write changes: their caches are dropped once it succeeds.
    pub(super) fn note_writes(&self, method: &Method, ctx: &mut Ctx) {
        if !matches!(*method, Method::GET | Method::HEAD) {
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
    }

    /// Reads the whole request body through the request's body guard (size, UTF-8, depth).
    pub(super) async fn read_body(
        &self,
        session: &mut Session,
        guard: &mut BodyGuard,
    ) -> std::result::Result<Bytes, GatewayError> {
        let mut buf = Vec::new();
        loop {
            match session.read_request_body().await {
                Ok(Some(chunk)) => {
                    guard.feed(&chunk, false)?;
                    buf.extend_from_slice(&chunk);
                }
                Ok(None) => {
                    guard.feed(&[], true)?;
                    return Ok(Bytes::from(buf));
                }
                Err(e) => {
                    return Err(GatewayError::BadRequest(format!(
                        "could not read the request body: {}",
                        e.etype().as_str()
                    )))
                }
            }
        }
    }
}
