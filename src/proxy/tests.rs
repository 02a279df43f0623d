use super::response::is_rewritable;
use super::*;

#[test]
fn paths_that_could_escape_the_base_are_rejected() {
    for ok in [
        &b""[..],
        b"/",
        b"/Patient/123",
        b"/Patient/123/_history/2",
        b"/Patient/$everything",
        b"/_search",
        b"/Patient/a-b.c",
        b"/Observation/%41",
    ] {
        assert!(check_path(ok).is_ok(), "{}", String::from_utf8_lossy(ok));
    }
    for bad in [
        &b"/../manage"[..],
        b"/Patient/..",
        b"/./Patient",
        b"/..%2fmanage",
        b"/%2e%2e/x",
        b"/Patient%2F1",
        b"/a\\b",
        b"/a b",
        b"/a%00",
        b"//Patient",
        b"/Patient\r\n",
        b"/..%252fmanage",
        b"/%252e%252e/manage",
        b"/..;/manage",
        b"/Patient/..%3b/x",
        b"/%c0%ae%c0%ae/manage",
        b"/..%c0%af",
        b"/%e0%80%ae",
        b"/..%C1%9C",
        b"/Patient/\xc3\xa9",
    ] {
        assert!(check_path(bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
}

#[test]
fn authorities() {
    assert!(valid_authority("gw.example.org"));
    assert!(valid_authority("127.0.0.1:8080"));
    assert!(valid_authority("[::1]:8080"));
    assert!(!valid_authority(""));
    assert!(!valid_authority("evil.com/\"}"));
    assert!(!valid_authority("a b"));
    assert!(valid_authority("[::1]"));
    assert!(valid_authority("localhost"));
    assert!(!valid_authority("127.0.0.1:http"));
    assert!(!valid_authority("127.0.0.1:80:80"));
    assert!(!valid_authority("127.0.0.1:"));
    assert!(!valid_authority(":80"));
    assert!(!valid_authority("[::1]x"));
    assert!(!valid_authority("[]:80"));
    assert!(!valid_authority("127.0.0.1:123456"));
}

#[test]
fn rewritable_content_types() {
    assert!(is_rewritable(Some(b"application/fhir+json; charset=utf-8")));
    assert!(is_rewritable(Some(b"application/fhir+xml")));
    assert!(is_rewritable(Some(b"application/json")));
    assert!(is_rewritable(Some(b"text/html")));
    assert!(is_rewritable(Some(b"application/fhir+ndjson")));
    assert!(is_rewritable(None));
    assert!(!is_rewritable(Some(b"application/pdf")));
    assert!(!is_rewritable(Some(b"image/png")));
    assert!(!is_rewritable(Some(b"application/octet-stream")));
}
