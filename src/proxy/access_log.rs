//! After every request: request metrics and one access-log line (no query strings: they can
//! hold patient data; never the token).

use super::*;

impl FhirProxy {
    /// Metrics for every request, and the access-log line.
    pub(super) async fn log_request(
        &self,
        session: &mut Session,
        e: Option<&Error>,
        ctx: &mut Ctx,
    ) {
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
        crate::metrics::body_bytes(ctx.body.seen(), session.body_bytes_sent() as u64);
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
