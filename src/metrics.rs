//! Prometheus metrics (default registry, served by `pingora-prometheus` on `metrics.listen`).
//! Labels are bounded: route prefixes, module names, methods and status classes from config
//! or fixed sets — never ids or paths.

use once_cell::sync::Lazy;
use prometheus::{register_histogram_vec, register_int_counter_vec, HistogramVec, IntCounterVec};
use std::time::Duration;

static MODULE_CALLS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "fhirgw_module_calls_total",
        "Processor module runs by outcome (continue, stop, error)",
        &["route", "module", "kind", "outcome"]
    )
    .expect("metric registers once")
});

static MODULE_SECONDS: Lazy<HistogramVec> = Lazy::new(|| {
    register_histogram_vec!(
        "fhirgw_module_seconds",
        "Time spent in a processor module",
        &["route", "module", "kind"],
        vec![0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]
    )
    .expect("metric registers once")
});

static REQUESTS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "fhirgw_requests_total",
        "Requests by route, method and status",
        &["route", "method", "status"]
    )
    .expect("metric registers once")
});

static REQUEST_SECONDS: Lazy<HistogramVec> = Lazy::new(|| {
    register_histogram_vec!(
        "fhirgw_request_seconds",
        "Request duration as seen by the gateway",
        &["route"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]
    )
    .expect("metric registers once")
});

static AUTH_FAILURES: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "fhirgw_auth_failures_total",
        "Requests refused by authentication (401) or authorization (403)",
        &["status"]
    )
    .expect("metric registers once")
});

static AUTH_REASONS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "fhirgw_auth_refusals_total",
        "Refused requests by reason (missing, expired, signature, issuer, audience, tenant, invalid_token, role, scope, links, other)",
        &["status", "reason"]
    )
    .expect("metric registers once")
});

static UPSTREAM_SECONDS: Lazy<HistogramVec> = Lazy::new(|| {
    register_histogram_vec!(
        "fhirgw_upstream_seconds",
        "Time from sending a request to the FHIR server to its response header (streamed and module paths)",
        &["path"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]
    )
    .expect("metric registers once")
});

static UPSTREAM_CONNECTIONS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "fhirgw_upstream_connections_total",
        "Connections used for upstream requests (both roads): reused from the pool or new",
        &["reused"]
    )
    .expect("metric registers once")
});

static BODY_BYTES: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "fhirgw_body_bytes_total",
        "Body bytes received from clients (request) and sent to them (response)",
        &["direction"]
    )
    .expect("metric registers once")
});

/// A refusal's reason, from a bounded set (never the free-text diagnostics).
pub fn refusal(status: u16, diagnostics: Option<&str>) {
    let d = diagnostics.unwrap_or("").to_ascii_lowercase();
    let reason = match status {
        401 if d.is_empty() => "missing",
        401 if d.contains("expired") => "expired",
        401 if d.contains("signature") || d.contains("kid") || d.contains("key") => "signature",
        401 if d.contains("issuer") => "issuer",
        401 if d.contains("audience") => "audience",
        401 if d.contains("tenant") => "tenant",
        401 => "invalid_token",
        403 if d.starts_with("role") => "role",
        403 if d.starts_with("scope") => "scope",
        403 if d.contains("identity links") => "links",
        _ => "other",
    };
    let status = status_label(status);
    AUTH_REASONS.with_label_values(&[status, reason]).inc();
    AUTH_FAILURES.with_label_values(&[status]).inc();
}

/// The per-request series whose labels are fixed, resolved once (a label lookup hashes the
/// labels and takes a lock).
struct Fixed {
    upstream_stream: prometheus::Histogram,
    connection_reused: prometheus::IntCounter,
    connection_new: prometheus::IntCounter,
    body_request: prometheus::IntCounter,
    body_response: prometheus::IntCounter,
}

static FIXED: Lazy<Fixed> = Lazy::new(|| Fixed {
    upstream_stream: UPSTREAM_SECONDS.with_label_values(&["stream"]),
    connection_reused: UPSTREAM_CONNECTIONS.with_label_values(&["true"]),
    connection_new: UPSTREAM_CONNECTIONS.with_label_values(&["false"]),
    body_request: BODY_BYTES.with_label_values(&["request"]),
    body_response: BODY_BYTES.with_label_values(&["response"]),
});

pub fn upstream(path: &str, took: Duration) {
    match path {
        "stream" => FIXED.upstream_stream.observe(took.as_secs_f64()),
        _ => UPSTREAM_SECONDS
            .with_label_values(&[path])
            .observe(took.as_secs_f64()),
    }
}

pub fn upstream_connection(reused: bool) {
    match reused {
        true => FIXED.connection_reused.inc(),
        false => FIXED.connection_new.inc(),
    }
}

pub fn body_bytes(request: u64, response: u64) {
    if request > 0 {
        FIXED.body_request.inc_by(request);
    }
    if response > 0 {
        FIXED.body_response.inc_by(response);
    }
}

pub fn module_call(route: &str, module: &str, kind: &str, outcome: &str, took: Duration) {
    MODULE_CALLS
        .with_label_values(&[route, module, kind, outcome])
        .inc();
    MODULE_SECONDS
        .with_label_values(&[route, module, kind])
        .observe(took.as_secs_f64());
}

/// A status as a label, without formatting one per request.
fn status_label(status: u16) -> &'static str {
    static LABELS: once_cell::sync::Lazy<Vec<String>> =
        once_cell::sync::Lazy::new(|| (0..600).map(|s| s.to_string()).collect());
    match status {
        0 => "aborted",
        s if s < 600 => LABELS[s as usize].as_str(),
        _ => "other",
    }
}

pub fn request(route: &str, method: &str, status: u16, took: Duration) {
    let method = match method {
        "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" => method,
        _ => "other",
    };
    let status = status_label(status);
    REQUESTS.with_label_values(&[route, method, status]).inc();
    REQUEST_SECONDS
        .with_label_values(&[route])
        .observe(took.as_secs_f64());
}

static AUDIT: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "fhirgw_audit_total",
        "Audit trail: records written, write failures (kept and retried), break-the-glass accesses",
        &["what"]
    )
    .expect("metric registers once")
});

pub fn audit_written(n: u64) {
    AUDIT.with_label_values(&["written"]).inc_by(n);
}

pub fn audit_write_failed() {
    AUDIT.with_label_values(&["write_failed"]).inc();
}

pub fn break_the_glass() {
    AUDIT.with_label_values(&["break_the_glass"]).inc();
}

static SHADOW: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "fhirgw_shadow_differences_total",
        "Shadow mode: entries a candidate post module would withhold that the live chain kept (withhold), entries the candidate chain would keep that the live chain withheld (reveal, module \"*\"), candidate failures (error)",
        &["route", "module", "direction"]
    )
    .expect("metric registers once")
});

/// `direction`: `withhold`, `reveal` or `error`.
pub fn shadow(route: &str, module: &str, direction: &str, n: u64) {
    SHADOW
        .with_label_values(&[route, module, direction])
        .inc_by(n);
}
