//! The gateway's own work for one streamed request, without the network: request head in,
//! upstream request head out, then the FHIR server's response head and a one-chunk body in,
//! the client's head and body out. The same functions the hooks call, in their order; what
//! only a live session has (the client's address, TLS) is given. `benches/hot_path.rs`
//! measures it and `tests/alloc_budget.rs` holds its allocations to a budget. Pingora's own
//! work (parsing, pooling, writing) is not in it.

use super::*;

/// What one `fixed_cost` produced.
#[doc(hidden)]
pub struct Exchange {
    pub upstream_request: RequestHeader,
    pub response: ResponseHeader,
    pub body: Bytes,
}

impl FhirProxy {
    /// One request on a route without modules, as `request_filter`, `upstream_peer`,
    /// `upstream_request_filter`, `upstream_response_filter`, `response_filter`,
    /// `response_body_filter` and `logging` run it (the access-log line is not queued: its
    /// thread formats and writes it). Errors are the ones the hooks would answer with.
    #[doc(hidden)]
    pub async fn fixed_cost(
        &self,
        req: &RequestHeader,
        client_ip: IpAddr,
        mut resp: ResponseHeader,
        body: Bytes,
    ) -> std::result::Result<Exchange, GatewayError> {
        let gw = &self.gw;
        let mut ctx = self.new_ctx();
        // request_filter
        (ctx.correlation_id, ctx.correlation_header) = correlation(req);
        ctx.client_ip = Some(client_ip);
        ctx.source = self.audit_source(req, ctx.client_ip);
        let path = req.uri.path();
        ctx.route = gw
            .route_for(path)
            .ok_or_else(|| GatewayError::NotFound(format!("no route for {path}")))?;
        ctx.routed = true;
        self.admit_head(req, false, &mut ctx)?;
        let route = &gw.routes[ctx.route];
        if gw.auth_mode == AuthMode::Jwt {
            let (identity, request) = self.identify(req, &ctx).await?;
            policy::authorize_with(
                &identity,
                &request,
                gw.smart.scopes_alone_suffice,
                &route.policy,
            )
            .map_err(GatewayError::Forbidden)?;
            ctx.identity = Some(identity);
        }
        self.note_writes(&req.method, &mut ctx);
        ctx.service_auth = gw.identity.authorization().await?;
        ctx.call = Some(self.call_identity(&ctx));
        if !(route.pre.is_empty() && route.post.is_empty())
            || ctx
                .identity
                .as_ref()
                .is_some_and(|id| ScopeFilter::for_identity(id).is_some())
        {
            return Err(GatewayError::Internal(
                "fixed_cost measures a route without modules, for a caller without narrowing scopes".into(),
            ));
        }
        // upstream_peer, upstream_request_filter
        let peer = gw.upstream.peer();
        std::hint::black_box(&peer);
        ctx.attempts += 1;
        let target = self.upstream_target(&ctx);
        let who = ctx.call.as_ref().expect("set above");
        let upstream_request =
            request_head(gw, who, &req.method, &target, req.headers.iter(), None)?;
        // upstream_response_filter, response_filter
        let retry = RetryPolicy::new(&gw.retries).after_status(
            &req.method,
            ctx.attempts,
            resp.status.as_u16(),
            retry::in_map(&resp.headers),
        );
        std::hint::black_box(retry);
        self.prepare_head(&mut ctx, &mut resp, &req.method, req.version)
            .map_err(|e| {
                ctx.error
                    .take()
                    .unwrap_or(GatewayError::Internal(e.to_string()))
            })?;
        // response_body_filter: the whole body as one chunk; then the head gets its length
        // (one_write) when the body was rewritten.
        let mut chunk = Some(body);
        let complete = self.filter_body(&mut chunk, true, &mut ctx).map_err(|e| {
            ctx.error
                .take()
                .unwrap_or(GatewayError::Internal(e.to_string()))
        })?;
        if let Some(n) = complete {
            one_write::set_length(&mut resp, n)
                .map_err(|_| GatewayError::Internal("Content-Length".into()))?;
        }
        let body = chunk.unwrap_or_default();
        // logging
        crate::metrics::request(
            route.prefix.as_str(),
            req.method.as_str(),
            resp.status.as_u16(),
            ctx.start.elapsed(),
        );
        crate::metrics::body_bytes(ctx.body.seen(), body.len() as u64);
        Ok(Exchange {
            upstream_request,
            response: resp,
            body,
        })
    }
}
