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
        if !self.gw.access_log || !log::log_enabled!(target: "access", log::Level::Info) {
            return;
        }
        let req = session.req_header();
        let identity = ctx.identity.take();
        let (user, tenant) = match identity {
            Some(i) => (Some(i.user_id), i.tenant),
            None => (None, None),
        };
        Line {
            source: ctx.source.take(),
            method: req.method.clone(),
            // Path only: queries can hold patient data (names, birth dates).
            path: req.uri.path().to_string(),
            status,
            upstream_status: ctx.upstream_status,
            attempts: ctx.attempts,
            road: ctx.road,
            ms: ctx.start.elapsed().as_millis(),
            upstream_ms: ctx.upstream_ms,
            id: std::mem::take(&mut ctx.correlation_id),
            user,
            tenant,
            error: match (&ctx.error, e) {
                (Some(ge), _) => Some(ge.to_string()),
                (None, Some(e)) => Some(e.etype().as_str().to_string()),
                _ => None,
            },
        }
        .send();
    }
}

/// One access-log line's fields. The worker thread only moves them into the queue; the
/// access-log thread formats and writes the line (the logger's own format, level and
/// target), so a request pays neither.
struct Line {
    source: Option<String>,
    method: Method,
    path: String,
    status: u16,
    upstream_status: Option<u16>,
    attempts: u32,
    road: &'static str,
    ms: u128,
    upstream_ms: Option<u128>,
    id: String,
    user: Option<String>,
    tenant: Option<String>,
    error: Option<String>,
}

/// Lines waiting for the access-log thread.
const QUEUE: usize = 8192;

static LINES: once_cell::sync::Lazy<Option<std::sync::mpsc::SyncSender<Line>>> =
    once_cell::sync::Lazy::new(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Line>(QUEUE);
        // Started at the first request, after Pingora's daemon fork.
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || rx.into_iter().for_each(|l| l.write()))
            .ok()?;
        Some(tx)
    });

impl Line {
    /// Queues the line; when the queue is full (or the thread is gone) it is written here,
    /// never dropped.
    fn send(self) {
        let Some(tx) = LINES.as_ref() else {
            return self.write();
        };
        if let Err(
            std::sync::mpsc::TrySendError::Full(l) | std::sync::mpsc::TrySendError::Disconnected(l),
        ) = tx.try_send(self)
        {
            l.write();
        }
    }

    fn write(self) {
        let dash = || "-".to_string();
        info!(
            target: "access",
            "{} {} {} status={} upstream_status={} attempts={} road={} ms={} upstream_ms={} id={} user={} tenant={}{}",
            self.source.as_deref().unwrap_or("-"),
            self.method,
            self.path,
            self.status,
            self.upstream_status.map_or_else(dash, |s| s.to_string()),
            self.attempts,
            self.road,
            self.ms,
            self.upstream_ms.map_or_else(dash, |m| m.to_string()),
            self.id,
            self.user.as_deref().unwrap_or("-"),
            self.tenant.as_deref().unwrap_or("-"),
            match self.error {
                Some(e) => format!(" error=\"{e}\""),
                None => String::new(),
            }
        );
    }
}
