//! The head of every request the gateway sends to the FHIR server, on both roads: the
//! streaming proxy (`upstream_request_filter`) and the gateway's own client (the module path,
//! the modules' calls). A fresh header: of the client's headers only the allow-list
//! (`Gateway::forward`) crosses, whatever else was sent; then the gateway's own: `Host` (the
//! upstream's authority), the body length, the service credential, the correlation id and the
//! audit headers.

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::headers::{CONDITIONAL_READ_HEADERS, REQUEST_ID};
use http::{HeaderName, HeaderValue, Method};
use pingora::http::RequestHeader;

/// Who a call to the FHIR server is made for.
#[derive(Clone, Debug)]
pub struct CallIdentity {
    /// The gateway's own credential for the FHIR server (`Authorization`), if it has one.
    pub service_auth: Option<HeaderValue>,
    /// The caller's audit headers, values already header-safe.
    pub audit: Vec<(bytes::Bytes, HeaderValue)>,
    /// The request's correlation id (built once per request, shared by every head).
    pub correlation_header: HeaderValue,
    /// The public base the caller used, so links the gateway handed out map back.
    pub public_base: std::sync::Arc<str>,
    /// The route's post chain filters what this caller sees: a GET or HEAD goes without its
    /// conditional-read headers (`headers::CONDITIONAL_READ_HEADERS`), so the server answers
    /// with the resource and the filter decides, never a 304 that confirms it exists.
    pub filtered: bool,
}

/// The upstream request head for `method target`.
///
/// `target` is the request target already mapped onto the upstream base (`/fhir/Patient?x`).
/// `client_headers` are the caller's (or a module's) headers: those named in `gw.forward`
/// cross, every value of them, in the order given; all others are dropped. `content_length`
/// is the length of the body that follows, `None` for no `Content-Length` header (no body, or
/// a body the caller frames otherwise).
///
/// The streaming proxy calls it with the downstream header:
/// `request_head(&gw, &who, &down.method, &target, down.headers.iter(), length)`.
pub fn request_head<'h>(
    gw: &Gateway,
    who: &CallIdentity,
    method: &Method,
    target: &[u8],
    client_headers: impl IntoIterator<Item = (&'h HeaderName, &'h HeaderValue)>,
    content_length: Option<u64>,
) -> Result<RequestHeader, GatewayError> {
    let bad = |what: &str| GatewayError::Internal(format!("upstream request: {what}"));
    // No case map: names go out lower-case, one allocation less per header (HTTP names are
    // case-insensitive).
    let mut up = RequestHeader::build_no_case(
        method.clone(),
        target,
        Some(gw.forward.len() + who.audit.len() + 5),
    )
    .map_err(|_| bad("invalid request target"))?;
    let conditional_read_dropped = who.filtered && matches!(*method, Method::GET | Method::HEAD);
    for (name, value) in client_headers {
        if conditional_read_dropped && CONDITIONAL_READ_HEADERS.contains(&name.as_str()) {
            continue;
        }
        if gw.forward.contains(name) {
            up.append_header(name.clone(), value.clone())
                .map_err(|_| bad("invalid forwarded header"))?;
        }
    }
    if let Some(n) = content_length {
        up.insert_header(http::header::CONTENT_LENGTH, HeaderValue::from(n))
            .map_err(|_| bad("Content-Length"))?;
    }
    up.insert_header(http::header::HOST, gw.upstream.host().clone())
        .map_err(|_| bad("Host"))?;
    if let Some(a) = &who.service_auth {
        up.insert_header(http::header::AUTHORIZATION, a.clone())
            .map_err(|_| bad("Authorization"))?;
    }
    up.insert_header(REQUEST_ID, who.correlation_header.clone())
        .map_err(|_| bad("correlation id"))?;
    for (name, value) in &who.audit {
        up.insert_header(name.clone(), value.clone())
            .map_err(|_| bad("audit header"))?;
    }
    Ok(up)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn gateway() -> Gateway {
        let cfg = config::parse(
            "listen:\n  - addr: 127.0.0.1:18080\nupstream:\n  url: http://127.0.0.1:8090/fhir\n  forward_headers: [x-tenant-hint]\nauth:\n  mode: insecure_dev\n",
            &|_| None,
        )
        .expect("config");
        Gateway::new(&cfg).expect("gateway")
    }

    fn who() -> CallIdentity {
        CallIdentity {
            service_auth: Some(HeaderValue::from_static("Bearer service")),
            audit: vec![(
                bytes::Bytes::from_static(b"x-ms-azurefhir-audit-userid"),
                HeaderValue::from_static("alice"),
            )],
            correlation_header: HeaderValue::from_static("corr-1"),
            public_base: "http://gw/fhir".into(),
            filtered: false,
        }
    }

    fn values<'a>(h: &'a RequestHeader, name: &str) -> Vec<&'a str> {
        h.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect()
    }

    #[test]
    fn only_allow_listed_headers_cross_with_every_value() {
        let gw = gateway();
        let mut client = http::HeaderMap::new();
        client.append("accept", HeaderValue::from_static("application/fhir+json"));
        client.append("prefer", HeaderValue::from_static("return=minimal"));
        client.append("prefer", HeaderValue::from_static("handling=strict"));
        client.append("x-tenant-hint", HeaderValue::from_static("t1"));
        client.append("authorization", HeaderValue::from_static("Bearer caller"));
        client.append("cookie", HeaderValue::from_static("session=1"));
        client.append("accept-encoding", HeaderValue::from_static("gzip"));
        client.append("host", HeaderValue::from_static("evil.example"));
        client.append("x-request-id", HeaderValue::from_static("spoofed"));
        client.append(
            "x-ms-azurefhir-audit-userid",
            HeaderValue::from_static("mallory"),
        );
        client.append("content-length", HeaderValue::from_static("999"));
        let h = request_head(
            &gw,
            &who(),
            &Method::PUT,
            b"/fhir/Patient/1?x=y",
            client.iter(),
            Some(12),
        )
        .unwrap();
        assert_eq!(h.method, Method::PUT);
        assert_eq!(h.raw_path(), b"/fhir/Patient/1?x=y");
        assert_eq!(values(&h, "accept"), ["application/fhir+json"]);
        assert_eq!(values(&h, "prefer"), ["return=minimal", "handling=strict"]);
        assert_eq!(values(&h, "x-tenant-hint"), ["t1"]);
        assert_eq!(values(&h, "authorization"), ["Bearer service"]);
        assert_eq!(values(&h, "host"), ["127.0.0.1:8090"]);
        assert_eq!(values(&h, "x-request-id"), ["corr-1"]);
        assert_eq!(values(&h, "x-ms-azurefhir-audit-userid"), ["alice"]);
        assert_eq!(values(&h, "content-length"), ["12"]);
        assert!(h.headers.get("cookie").is_none());
        assert!(h.headers.get("accept-encoding").is_none());
    }

    fn conditional(h: &mut http::HeaderMap) {
        h.append("if-none-match", HeaderValue::from_static("W/\"1\""));
        h.append(
            "if-modified-since",
            HeaderValue::from_static("Mon, 07 Dec 2026 12:00:00 GMT"),
        );
        h.append("if-match", HeaderValue::from_static("W/\"1\""));
        h.append("accept", HeaderValue::from_static("application/fhir+json"));
    }

    #[test]
    fn a_filtered_callers_reads_go_without_conditional_read_headers() {
        let gw = gateway();
        let mut client = http::HeaderMap::new();
        conditional(&mut client);
        let mut filtered = who();
        filtered.filtered = true;
        let target = b"/fhir/Observation/1";
        for method in [Method::GET, Method::HEAD] {
            let h = request_head(&gw, &filtered, &method, target, client.iter(), None).unwrap();
            assert!(h.headers.get("if-none-match").is_none(), "{method}");
            assert!(h.headers.get("if-modified-since").is_none(), "{method}");
            assert_eq!(values(&h, "accept"), ["application/fhir+json"]);
            // Not a read header: forwarded (a HEAD/GET with If-Match is the server's to judge).
            assert_eq!(values(&h, "if-match"), ["W/\"1\""]);
            // The same read for a caller the chain does not filter: everything crosses.
            let h = request_head(&gw, &who(), &method, target, client.iter(), None).unwrap();
            assert_eq!(values(&h, "if-none-match"), ["W/\"1\""], "{method}");
            assert_eq!(
                values(&h, "if-modified-since"),
                ["Mon, 07 Dec 2026 12:00:00 GMT"]
            );
        }
        // Writes keep their preconditions, filtered or not.
        for method in [Method::PUT, Method::PATCH, Method::DELETE, Method::POST] {
            let h = request_head(&gw, &filtered, &method, target, client.iter(), Some(2)).unwrap();
            assert_eq!(values(&h, "if-none-match"), ["W/\"1\""], "{method}");
            assert_eq!(values(&h, "if-match"), ["W/\"1\""], "{method}");
            assert_eq!(
                values(&h, "if-modified-since"),
                ["Mon, 07 Dec 2026 12:00:00 GMT"],
                "{method}"
            );
        }
    }

    #[test]
    fn no_credential_no_length_no_client_headers() {
        let gw = gateway();
        let mut w = who();
        w.service_auth = None;
        let none: [(&HeaderName, &HeaderValue); 0] = [];
        let h = request_head(&gw, &w, &Method::GET, b"/fhir/metadata", none, None).unwrap();
        assert!(h.headers.get("authorization").is_none());
        assert!(h.headers.get("content-length").is_none());
        assert!(h.headers.get("accept").is_none(), "no default Accept here");
        assert_eq!(values(&h, "host"), ["127.0.0.1:8090"]);
        assert_eq!(values(&h, "x-request-id"), ["corr-1"]);
    }
}
