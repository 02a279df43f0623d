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

/// Conditional-read headers: not sent upstream on a read whose answer the route's post chain
/// filters for the caller (`CallIdentity::filtered`), because the server's 304 would confirm to
/// the caller that a resource they may not see exists, and its version. The gateway answers
/// such a caller's `If-None-Match` itself, after the filter (`if_none_match_matches`).
/// `If-Match` and `If-Unmodified-Since` guard writes and are always forwarded.
pub const CONDITIONAL_READ_HEADERS: &[&str] = &["if-none-match", "if-modified-since"];

/// Whether `If-None-Match` values (each a `*` or a list of entity tags) match `etag` by the
/// weak comparison of RFC 9110 §8.8.3.2 (`W/"1"` matches `"1"`), as §13.1.2 asks for a GET.
pub fn if_none_match_matches<'a>(values: impl IntoIterator<Item = &'a str>, etag: &str) -> bool {
    fn opaque(t: &str) -> Option<&str> {
        let t = t.trim();
        let t = t.strip_prefix("W/").unwrap_or(t);
        (t.len() >= 2 && t.starts_with('"') && t.ends_with('"')).then_some(t)
    }
    let Some(current) = opaque(etag) else {
        return false;
    };
    values.into_iter().any(|v| {
        if v.trim() == "*" {
            return true;
        }
        // Entity tags may hold commas: split only outside quotes.
        let mut rest = v;
        loop {
            rest = rest.trim_start_matches(|c: char| c == ',' || c.is_ascii_whitespace());
            if rest.is_empty() {
                return false;
            }
            let start = usize::from(rest.starts_with("W/")) * 2;
            if !rest[start..].starts_with('"') {
                return false;
            }
            let Some(len) = rest[start + 1..].find('"') else {
                return false;
            };
            let tag = &rest[..start + len + 2];
            if opaque(tag) == Some(current) {
                return true;
            }
            rest = &rest[tag.len()..];
        }
    })
}

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
/// The same names, built once: a `&str` name is parsed (and a custom one copied) on every
/// lookup or insert.
pub const REQUEST_ID_NAME: HeaderName = HeaderName::from_static(REQUEST_ID);
pub const MS_REQUEST_ID_NAME: HeaderName = HeaderName::from_static(MS_REQUEST_ID);

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

/// Longest audit header value, in bytes of the encoded form.
pub const MAX_AUDIT_VALUE: usize = 2048;

/// Bytes that an audit value carries percent-encoded (as `%XX` of their UTF-8 bytes): controls
/// (CR, LF, NUL, TAB, DEL: header injection), the space (a receiver trims it at either end),
/// `%` itself (so the encoding is reversible), and every non-ASCII byte (implied by the crate).
const AUDIT_ENCODED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b' ').add(b'%');

/// Makes an arbitrary (claim) value header-safe and keeps it distinct: every byte outside
/// visible ASCII, and `%`, is percent-encoded (`josé` → `jos%C3%A9`, `jos?` stays `jos?`,
/// `50%` → `50%25`), so two different values never give the same header, and the header
/// decodes back to the claim with any URL decoder. The result is visible ASCII only, cut at
/// 2,048 bytes on a character boundary (never inside an escape, nor between the escapes of one
/// character, so it still decodes to UTF-8); only such long values can collide.
pub fn sanitize_header_value(v: &str) -> String {
    // The common case (an oid, a UPN) needs no escape: one copy, no per-character work.
    if v.len() <= MAX_AUDIT_VALUE && v.bytes().all(|b| (0x21..0x7f).contains(&b) && b != b'%') {
        return v.to_string();
    }
    let mut out = String::with_capacity(v.len().min(MAX_AUDIT_VALUE));
    let mut buf = [0u8; 4];
    for c in v.chars() {
        let encoded = percent_encoding::utf8_percent_encode(c.encode_utf8(&mut buf), AUDIT_ENCODED);
        if out.len() + encoded.clone().map(str::len).sum::<usize>() > MAX_AUDIT_VALUE {
            break;
        }
        out.extend(encoded);
    }
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
    }

    /// The percent-decoding of an audit value, as a consumer would read it.
    fn decoded(v: &str) -> String {
        percent_encoding::percent_decode_str(v)
            .decode_utf8()
            .unwrap()
            .into_owned()
    }

    fn assert_audit_safe(v: &str) {
        assert!(v.len() <= MAX_AUDIT_VALUE, "{} bytes", v.len());
        assert!(v.bytes().all(|b| (0x21..0x7f).contains(&b)), "{v:?}");
        assert!(http::HeaderValue::from_str(v).is_ok(), "{v:?}");
    }

    #[test]
    fn audit_values_are_distinct_and_header_safe() {
        let cases = [
            ("jos\u{e9}", "jos%C3%A9"),
            ("jos?", "jos?"),
            ("jos%C3%A9", "jos%25C3%25A9"),
            ("50%", "50%25"),
            ("a\r\nX-Evil: 1", "a%0D%0AX-Evil:%201"),
            ("nul\u{0}tab\tdel\u{7f}", "nul%00tab%09del%7F"),
            (" padded ", "%20padded%20"),
            ("\u{202e}rtl", "%E2%80%AErtl"),
            ("oid-123@example.org", "oid-123@example.org"),
            ("", ""),
        ];
        let mut seen = std::collections::HashSet::new();
        for (claim, header) in cases {
            let v = sanitize_header_value(claim);
            assert_eq!(v, header, "{claim:?}");
            assert_audit_safe(&v);
            assert_eq!(decoded(&v), claim, "reversible");
            assert!(seen.insert(v), "{claim:?} collides");
        }
    }

    #[test]
    fn long_audit_values_are_cut_between_escapes() {
        assert_eq!(sanitize_header_value(&"x".repeat(5000)), "x".repeat(2048));
        // 2,047 visible bytes, then an escape that does not fit: left out whole.
        let v = sanitize_header_value(&format!("{}\u{e9}tail", "x".repeat(2047)));
        assert_eq!(v, "x".repeat(2047));
        // Every cut position against two-byte characters (six bytes encoded): never a partial
        // `%X`, never half a character.
        for pad in 2036..2048 {
            let v = sanitize_header_value(&format!("{}{}", "y".repeat(pad), "\u{e9}".repeat(10)));
            assert_audit_safe(&v);
            let tail = v.trim_start_matches('y');
            assert_eq!(tail.len() % 6, 0, "pad {pad}: {tail}");
            assert!(v.len() > MAX_AUDIT_VALUE - 6, "pad {pad}: cut early");
            assert!(decoded(&v).starts_with(&"y".repeat(pad)), "pad {pad}");
        }
        // Non-ASCII all the way: whole characters, at most 2,048 bytes.
        let v = sanitize_header_value(&"\u{e9}".repeat(2000));
        assert_eq!(v.len(), 2046);
        assert_audit_safe(&v);
        assert_eq!(decoded(&v), "\u{e9}".repeat(341));
    }

    #[test]
    fn if_none_match_uses_the_weak_comparison() {
        let m = |v: &str, etag: &str| if_none_match_matches([v], etag);
        assert!(m(r#"W/"1""#, r#"W/"1""#));
        assert!(m(r#""1""#, r#"W/"1""#));
        assert!(m(r#"W/"1""#, r#""1""#));
        assert!(m(r#"W/"0", W/"1""#, r#"W/"1""#));
        assert!(m(r#""a,b", "c""#, r#""c""#));
        assert!(m(r#""a,b""#, r#"W/"a,b""#));
        assert!(m("*", r#"W/"7""#));
        assert!(!m(r#"W/"2""#, r#"W/"1""#));
        assert!(!m(r#"W/"1"#, r#"W/"1""#), "unterminated");
        assert!(!m("1", r#"W/"1""#), "not quoted");
        assert!(!m(r#""a,b""#, r#""a""#));
        assert!(!m(r#"W/"1""#, "no-etag"));
        assert!(if_none_match_matches([r#""x""#, r#"W/"1""#], r#""1""#));
        assert!(!if_none_match_matches([], r#""1""#));
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
