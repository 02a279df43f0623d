//! The one retry policy of both roads to the FHIR server (docs/configuration.md, "Retry
//! policy"): which methods may be sent again, after which failures, after how long. Pure: the
//! caller counts its attempts and waits; the streaming proxy asks it from `fail_to_connect`
//! and `upstream_response_filter`, the gateway's own client (`client::GatewayFhirClient`) from
//! its attempt loop.

use crate::config::RetryConfig;
use http::{HeaderMap, Method};
use pingora_core::Error;
use std::time::Duration;

/// `upstream.retries`, as decisions. `attempt` is always the number of attempts made so far,
/// the failed one included: 1 after the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: u32,
    base_delay: Duration,
    max_delay: Duration,
}

/// How many times in all a request may be sent when every failure is a reused pooled
/// connection the server had closed: Pingora's default `max_retries`, which bounds the same
/// retries on the streaming road.
pub const MAX_FRESH_CONNECTION_TRIES: u32 = 16;

impl RetryPolicy {
    pub fn new(cfg: &RetryConfig) -> RetryPolicy {
        RetryPolicy {
            max_attempts: cfg.max_attempts.max(1),
            base_delay: Duration::from_millis(cfg.base_delay_ms),
            max_delay: Duration::from_millis(cfg.max_delay_ms),
        }
    }

    /// GET, HEAD, PUT and DELETE may be sent again; POST and PATCH never (no duplicate
    /// creates), nor anything else.
    pub fn may_retry(method: &Method) -> bool {
        matches!(
            *method,
            Method::GET | Method::HEAD | Method::PUT | Method::DELETE
        )
    }

    /// Attempt `attempt` found no connection (refused, timed out, TLS failure): nothing
    /// reached the server. `Some(delay)`: try again after `delay`; `None`: give up.
    pub fn after_connect_failure(&self, method: &Method, attempt: u32) -> Option<Duration> {
        (Self::may_retry(method) && attempt < self.max_attempts).then_some(self.base_delay)
    }

    /// Attempt `attempt` was answered `status`; `header` looks up a response header by its
    /// (lower-case) name. `Some(delay)`: a 429 or 503 to try again after `delay` (the server's
    /// `x-ms-retry-after-ms`, else its `Retry-After` seconds, else `base_delay_ms`). `None`:
    /// the response goes to the client — any other status, a method never retried, the last
    /// attempt, or a server-requested delay over `max_delay_ms`.
    ///
    /// The caller must also be able to send the request body again (the proxy: not when
    /// Pingora's retry buffer was truncated).
    pub fn after_status<'h>(
        &self,
        method: &Method,
        attempt: u32,
        status: u16,
        header: impl Fn(&str) -> Option<&'h str>,
    ) -> Option<Duration> {
        if !(status == 429 || status == 503)
            || !Self::may_retry(method)
            || attempt >= self.max_attempts
        {
            return None;
        }
        let delay = server_delay(header).unwrap_or(self.base_delay);
        (delay <= self.max_delay).then_some(delay)
    }

    /// An attempt failed after its connection was made, before a response header arrived.
    /// `true`: send it again at once on another connection — Pingora's own rule, kept on
    /// both roads: the error says it is safe to retry when the connection was reused (the
    /// server closed a pooled connection under us), the connection was reused, and the
    /// method may be retried. Such retries are not counted against `max_attempts`; the caller
    /// bounds them with [`MAX_FRESH_CONNECTION_TRIES`] (the proxy: Pingora's `max_retries`).
    pub fn on_another_connection(&self, method: &Method, error: &Error, reused: bool) -> bool {
        let mut retry = error.retry;
        retry.decide_reuse(reused);
        retry.retry() && Self::may_retry(method)
    }
}

/// The delay a 429/503 asks for: `x-ms-retry-after-ms` (milliseconds) if numeric, else
/// `Retry-After` in seconds if numeric (the HTTP-date form is not understood).
pub fn server_delay<'h>(header: impl Fn(&str) -> Option<&'h str>) -> Option<Duration> {
    if let Some(ms) = header("x-ms-retry-after-ms").and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(Duration::from_millis(ms));
    }
    header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Header lookup in an `http::HeaderMap` (a Pingora `ResponseHeader`'s `headers`), for
/// [`RetryPolicy::after_status`] and [`server_delay`]; values that are not text count as absent.
pub fn in_map<'a>(headers: &'a HeaderMap) -> impl Fn(&str) -> Option<&'a str> + 'a {
    move |name| headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use pingora_core::{ErrorType, RetryType};

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy::new(&RetryConfig {
            max_attempts,
            base_delay_ms: 100,
            max_delay_ms: 2_000,
        })
    }

    fn no_headers(_: &str) -> Option<&'static str> {
        None
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn only_get_head_put_delete_are_ever_retried() {
        for m in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
            assert!(RetryPolicy::may_retry(&m), "{m}");
        }
        for m in [
            Method::POST,
            Method::PATCH,
            Method::OPTIONS,
            Method::TRACE,
            Method::CONNECT,
        ] {
            assert!(!RetryPolicy::may_retry(&m), "{m}");
            let p = policy(3);
            assert_eq!(p.after_connect_failure(&m, 1), None, "{m}");
            assert_eq!(p.after_status(&m, 1, 503, no_headers), None, "{m}");
            let mut e = Error::new(ErrorType::ConnectionClosed);
            e.retry = RetryType::ReusedOnly;
            assert!(!p.on_another_connection(&m, &e, true), "{m}");
        }
    }

    #[test]
    fn a_failed_connect_waits_the_base_delay_until_the_attempts_run_out() {
        let p = policy(3);
        assert_eq!(p.after_connect_failure(&Method::GET, 1), Some(ms(100)));
        assert_eq!(p.after_connect_failure(&Method::DELETE, 2), Some(ms(100)));
        assert_eq!(p.after_connect_failure(&Method::GET, 3), None);
        assert_eq!(p.after_connect_failure(&Method::GET, 4), None);
        assert_eq!(policy(1).after_connect_failure(&Method::GET, 1), None);
        // 0 is refused by the configuration; taken as 1 all the same.
        assert_eq!(policy(0).after_connect_failure(&Method::GET, 1), None);
    }

    #[test]
    fn only_429_and_503_are_retried() {
        let p = policy(3);
        for s in [200, 201, 304, 400, 404, 408, 412, 500, 502, 504] {
            assert_eq!(p.after_status(&Method::GET, 1, s, no_headers), None, "{s}");
        }
        assert_eq!(
            p.after_status(&Method::GET, 1, 429, no_headers),
            Some(ms(100))
        );
        assert_eq!(
            p.after_status(&Method::PUT, 2, 503, no_headers),
            Some(ms(100))
        );
        assert_eq!(p.after_status(&Method::GET, 3, 503, no_headers), None);
    }

    #[test]
    fn the_server_names_the_delay_in_ms_or_seconds() {
        let p = policy(3);
        let h = |pairs: &'static [(&'static str, &'static str)]| {
            move |n: &str| pairs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
        };
        assert_eq!(
            p.after_status(&Method::GET, 1, 429, h(&[("x-ms-retry-after-ms", "50")])),
            Some(ms(50))
        );
        // The millisecond header wins over Retry-After.
        assert_eq!(
            p.after_status(
                &Method::GET,
                1,
                429,
                h(&[("retry-after", "1"), ("x-ms-retry-after-ms", " 250 ")])
            ),
            Some(ms(250))
        );
        assert_eq!(
            p.after_status(&Method::GET, 1, 503, h(&[("retry-after", "2")])),
            Some(ms(2_000))
        );
        assert_eq!(
            p.after_status(&Method::GET, 1, 503, h(&[("retry-after", "0")])),
            Some(ms(0))
        );
        // Not understood: the base delay.
        assert_eq!(
            p.after_status(
                &Method::GET,
                1,
                503,
                h(&[("retry-after", "Wed, 21 Oct 2026 07:28:00 GMT")])
            ),
            Some(ms(100))
        );
        assert_eq!(
            p.after_status(
                &Method::GET,
                1,
                503,
                h(&[("x-ms-retry-after-ms", "soon"), ("retry-after", "1")])
            ),
            Some(ms(1_000))
        );
    }

    #[test]
    fn a_delay_over_max_delay_hands_the_response_to_the_client() {
        let p = policy(3);
        let long = |n: &str| (n == "retry-after").then_some("3");
        assert_eq!(p.after_status(&Method::GET, 1, 429, long), None);
        let edge = |n: &str| (n == "x-ms-retry-after-ms").then_some("2000");
        assert_eq!(p.after_status(&Method::GET, 1, 429, edge), Some(ms(2_000)));
        let over = |n: &str| (n == "x-ms-retry-after-ms").then_some("2001");
        assert_eq!(p.after_status(&Method::GET, 1, 429, over), None);
    }

    #[test]
    fn header_maps_answer_lookups() {
        let mut m = HeaderMap::new();
        m.insert("retry-after", HeaderValue::from_static("1"));
        m.insert(
            "x-ms-retry-after-ms",
            HeaderValue::from_bytes(b"\xff").unwrap(),
        );
        // A value that is not text counts as absent: Retry-After applies.
        assert_eq!(server_delay(in_map(&m)), Some(ms(1_000)));
        assert_eq!(
            policy(2).after_status(&Method::HEAD, 1, 503, in_map(&m)),
            Some(ms(1_000))
        );
        assert_eq!(server_delay(in_map(&HeaderMap::new())), None);
    }

    #[test]
    fn a_closed_pooled_connection_is_retried_on_another_one() {
        let p = policy(1);
        let mut closed = Error::new(ErrorType::ConnectionClosed);
        closed.retry = RetryType::ReusedOnly;
        // Whatever max_attempts says.
        assert!(p.on_another_connection(&Method::GET, &closed, true));
        assert!(p.on_another_connection(&Method::PUT, &closed, true));
        // A fresh connection closed on us: the server means it.
        assert!(!p.on_another_connection(&Method::GET, &closed, false));
        // Errors that are not safe to repeat (a TLS error, a timeout, garbage).
        for t in [
            ErrorType::ReadTimedout,
            ErrorType::InvalidHTTPHeader,
            ErrorType::ReadError,
        ] {
            let e = Error::new(t);
            assert!(!p.on_another_connection(&Method::GET, &e, true));
        }
    }
}
