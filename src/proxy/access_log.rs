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
        if self.gw.access_log && log::log_enabled!(target: "access", log::Level::Info) {
            self.access_line(session, e, ctx, status);
        }
        // Last: the record takes the identity and the ids the line copied.
        self.audit_request(session, ctx, status).await;
    }

    fn access_line(&self, session: &Session, e: Option<&Error>, ctx: &mut Ctx, status: u16) {
        let req = session.req_header();
        let (user, tenant) = match &ctx.identity {
            Some(i) => (Some(i.user_id.clone()), i.tenant.clone()),
            None => (None, None),
        };
        // The audit record, when there is a trail, takes these after the line.
        let audited = self.gw.trail.is_some();
        Line {
            source: if audited {
                ctx.source.clone()
            } else {
                ctx.source.take()
            },
            method: req.method.clone(),
            // Path only: queries can hold patient data (names, birth dates).
            path: req.uri.path().to_string(),
            status,
            upstream_status: ctx.upstream_status,
            attempts: ctx.attempts,
            road: ctx.road,
            ms: ctx.start.elapsed().as_millis(),
            upstream_ms: ctx.upstream_ms,
            id: if audited {
                ctx.correlation_id.clone()
            } else {
                std::mem::take(&mut ctx.correlation_id)
            },
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
/// access-log thread formats the lines and writes them in batches, so a request pays neither
/// the formatting nor a write, nor a wake-up of that thread.
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
/// How long the access-log thread lets lines gather after a batch: under load it wakes about
/// this often, whatever the request rate; idle, it sleeps until the next line.
const GATHER: Duration = Duration::from_millis(20);

static LINES: once_cell::sync::Lazy<Option<std::sync::mpsc::SyncSender<Line>>> =
    once_cell::sync::Lazy::new(|| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Line>(QUEUE);
        // Started at the first request, after Pingora's daemon fork.
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_batches(rx))
            .ok()?;
        Some(tx)
    });

/// The access-log thread: blocks for a first line, takes whatever else is queued, writes it
/// all with one write, then sleeps `GATHER` before looking again (a sender only wakes this
/// thread when it is blocked, i.e. when the log was idle).
fn write_batches(rx: std::sync::mpsc::Receiver<Line>) {
    let mut out = String::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(line) = next {
            // Re-checked per batch: RUST_LOG may silence the target.
            if log::log_enabled!(target: "access", log::Level::Info) {
                line.format(&mut out, jiff::Timestamp::now());
            }
            next = rx.try_recv().ok();
        }
        write_out(&mut out);
        std::thread::sleep(GATHER);
    }
}

fn write_out(out: &mut String) {
    use std::io::Write;
    if !out.is_empty() {
        let _ = std::io::stderr().lock().write_all(out.as_bytes());
        out.clear();
    }
}

impl Line {
    /// Queues the line; when the queue is full (or the thread is gone) it is written here,
    /// never dropped.
    fn send(self) {
        let Some(tx) = LINES.as_ref() else {
            return self.write_now();
        };
        if let Err(
            std::sync::mpsc::TrySendError::Full(l) | std::sync::mpsc::TrySendError::Disconnected(l),
        ) = tx.try_send(self)
        {
            l.write_now();
        }
    }

    fn write_now(self) {
        let mut out = String::new();
        self.format(&mut out, jiff::Timestamp::now());
        write_out(&mut out);
    }

    /// One line, in the logger's own layout (`[<UTC time> INFO  access] ...`), so access
    /// lines and the other log lines read alike.
    fn format(self, out: &mut String, now: jiff::Timestamp) {
        use std::fmt::Write;
        let dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
        let _ = writeln!(
            out,
            "[{:.0} INFO  access] {} {} {} status={} upstream_status={} attempts={} road={} ms={} upstream_ms={} id={} user={} tenant={}{}",
            now,
            self.source.as_deref().unwrap_or("-"),
            self.method,
            self.path,
            self.status,
            dash(self.upstream_status.map(|s| s.to_string())),
            self.attempts,
            self.road,
            self.ms,
            dash(self.upstream_ms.map(|m| m.to_string())),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_reads_like_the_loggers_own() {
        let line = Line {
            source: Some("10.0.0.4".into()),
            method: Method::GET,
            path: "/fhir/Patient/1".into(),
            status: 200,
            upstream_status: Some(200),
            attempts: 1,
            road: "stream",
            ms: 4,
            upstream_ms: None,
            id: "abc".into(),
            user: None,
            tenant: Some("t1".into()),
            error: Some("x".into()),
        };
        let mut out = String::new();
        let at: jiff::Timestamp = "2026-11-27T21:58:39.123Z".parse().unwrap();
        line.format(&mut out, at);
        assert_eq!(
            out,
            "[2026-11-27T21:58:39Z INFO  access] 10.0.0.4 GET /fhir/Patient/1 status=200 upstream_status=200 attempts=1 road=stream ms=4 upstream_ms=- id=abc user=- tenant=t1 error=\"x\"\n"
        );
    }
}
