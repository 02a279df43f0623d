//! `limits`: the sizes and times the gateway accepts from clients and buffers.

use super::Errors;
use serde::Deserialize;

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest query string accepted (continuation tokens are long).
    pub max_query_bytes: usize,
    /// Largest request body accepted (413 above it).
    pub max_request_body_bytes: u64,
    /// Largest response body a module may buffer (502 `too-costly` above it).
    pub max_buffered_response_bytes: usize,
    /// Idle keep-alive of downstream connections, seconds.
    pub downstream_keepalive_secs: u64,
    /// Most request header bytes (names + values) accepted (431 above it).
    pub max_header_bytes: usize,
    /// Most request header fields accepted (431 above it).
    pub max_headers: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_query_bytes: 16 * 1024,
            max_request_body_bytes: 32 * 1024 * 1024,
            max_buffered_response_bytes: 64 * 1024 * 1024,
            downstream_keepalive_secs: 60,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
        }
    }
}

pub(super) fn validate(lim: &LimitsConfig, errs: &mut Errors) {
    if lim.max_query_bytes < 1024 {
        errs.at(
            &["limits", "max_query_bytes"],
            "limits.max_query_bytes: must be at least 1024".into(),
        );
    }
    if lim.downstream_keepalive_secs == 0 {
        // Pingora reads 0 as "no idle timeout": the trap this setting exists to avoid.
        errs.at(
            &["limits", "downstream_keepalive_secs"],
            "limits.downstream_keepalive_secs: must be > 0".into(),
        );
    }
    if lim.max_buffered_response_bytes < 1024 {
        errs.at(
            &["limits", "max_buffered_response_bytes"],
            "limits.max_buffered_response_bytes: must be at least 1024".into(),
        );
    }
}
