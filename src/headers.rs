//! Which headers cross the gateway, and the correlation id.

use http::HeaderName;
use std::sync::atomic::{AtomicU64, Ordering};

/// Request headers forwarded to the FHIR server (besides body framing, which Pingora owns).
/// Everything else, the caller's `Authorization` and `Accept-Encoding` included, is dropped.
pub const FORWARDED_REQUEST_HEADERS: &[&str] = &[
    "accept",
    "accept-language",
    "content-type",
    "prefer",
    "if-match",
    "if-none-match",
    "if-none-exist",
    "if-modified-since",
];

/// Response headers never passed to the client: hop-by-hop ones (Pingora frames the
/// downstream response itself) and ones that describe the upstream's software.
pub const DROPPED_RESPONSE_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "upgrade",
    "server",
    "x-powered-by",
    "x-aspnet-version",
    "x-aspnetmvc-version",
];

/// Prefix of the audit headers; every inbound header carrying it is removed.
pub const AUDIT_PREFIX: &str = "x-ms-azurefhir-audit-";

pub const REQUEST_ID: &str = "x-request-id";
pub const MS_REQUEST_ID: &str = "x-ms-service-request-id";

/// Why a header may not be added to `upstream.forward_headers`, if it may not.
pub fn forbidden_forward_header(name: &str) -> Option<&'static str> {
    let Ok(h) = HeaderName::from_bytes(name.as_bytes()) else {
        return Some("is not a valid header name");
    };
    let n = h.as_str();
    if n.starts_with(AUDIT_PREFIX) {
        return Some("carries the audit prefix: the gateway sets those itself");
    }
    if n.starts_with("x-forwarded-") || n == "forwarded" {
        return Some("is set by the gateway from trusted proxies only");
    }
    match n {
        "authorization" | "proxy-authorization" | "cookie" => {
            Some("carries caller credentials, which never reach the FHIR server")
        }
        "accept-encoding" => Some("is never forwarded: the gateway must read plain bodies"),
        "host" | "content-length" | "transfer-encoding" | "connection" | "keep-alive" | "te"
        | "trailer" | "upgrade" | "proxy-connection" => Some("is managed by the gateway"),
        REQUEST_ID | MS_REQUEST_ID => Some("is the correlation id, set by the gateway"),
        _ => None,
    }
}

/// A value safe to put in a header: visible ASCII and spaces, no CR/LF/NUL, at most 2,048 bytes.
pub fn is_header_safe(v: &str) -> bool {
    v.len() <= 2048 && v.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t')
}

/// Makes an arbitrary (claim) value header-safe: control characters and non-ASCII are
/// replaced by `?` (no header injection), and the value is capped at 2,048 bytes.
pub fn sanitize_header_value(v: &str) -> String {
    let mut out: String = v
        .chars()
        .map(|c| if (' '..='~').contains(&c) { c } else { '?' })
        .collect();
    out.truncate(2048);
    out
}

/// A caller-supplied correlation id is reused when it looks like one.
pub fn valid_correlation_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
}

/// A fresh correlation id in UUID v4 form, without a `getrandom` call per request: a counter
/// through two seeded rounds of a bijective mix per half, so ids do not show how many
/// requests came between them, and repeat no more often than random v4 ids.
pub fn new_correlation_id() -> String {
    static SEED: once_cell::sync::Lazy<[u64; 4]> = once_cell::sync::Lazy::new(|| {
        let (a, b) = uuid::Uuid::new_v4().as_u64_pair();
        let (c, d) = uuid::Uuid::new_v4().as_u64_pair();
        [a, b, c, d]
    });
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let s = *SEED;
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&mix(mix(n ^ s[0]) ^ s[1]).to_be_bytes());
    bytes[8..].copy_from_slice(&mix(mix(n.rotate_left(32) ^ s[2]) ^ s[3]).to_be_bytes());
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// SplitMix64's finaliser: a bijection on u64.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ids_are_uuids_and_do_not_repeat() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..100_000 {
            let id = new_correlation_id();
            let u = uuid::Uuid::parse_str(&id).expect("a UUID");
            assert_eq!(u.get_version_num(), 4);
            assert!(valid_correlation_id(id.as_bytes()));
            assert!(seen.insert(id), "repeated");
        }
    }

    #[test]
    fn forward_list_refuses_credentials_and_audit() {
        assert!(forbidden_forward_header("Authorization").is_some());
        assert!(forbidden_forward_header("X-MS-AZUREFHIR-AUDIT-USERID").is_some());
        assert!(forbidden_forward_header("X-Forwarded-For").is_some());
        assert!(forbidden_forward_header("Accept-Encoding").is_some());
        assert!(forbidden_forward_header("bad header").is_some());
        assert!(forbidden_forward_header("X-Custom-Tenant-Hint").is_none());
    }

    #[test]
    fn header_safety() {
        assert!(is_header_safe("Bearer abc.def"));
        assert!(!is_header_safe("a\r\nX-Evil: 1"));
        assert!(!is_header_safe(&"a".repeat(2049)));
        assert_eq!(sanitize_header_value("a\r\nb\u{e9}"), "a??b?");
        assert_eq!(sanitize_header_value(&"x".repeat(5000)).len(), 2048);
    }

    #[test]
    fn correlation_ids() {
        assert!(valid_correlation_id(b"abc-123_x.y:z"));
        assert!(!valid_correlation_id(b""));
        assert!(!valid_correlation_id(b"a b"));
        assert!(!valid_correlation_id(b"a\r\nb"));
        assert!(!valid_correlation_id(&[b'a'; 129]));
        assert!(valid_correlation_id(new_correlation_id().as_bytes()));
    }
}
