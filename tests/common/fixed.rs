//! The fixture of the fixed per-request cost (`FhirProxy::fixed_cost`), shared by
//! `benches/hot_path.rs` (included with `#[path]`) and `tests/alloc_budget.rs`: a gateway whose
//! upstream is never called, a caller's small GET and the FHIR server's answer to it (a
//! 1.3 KB Patient naming the server's base six times), as in the load test's P1.

use bytes::Bytes;
use fhir_gateway::proxy::FhirProxy;
use pingora::http::{RequestHeader, ResponseHeader};
use std::sync::Arc;

pub const UPSTREAM: &str = "http://127.0.0.1:18090/fhir";

pub struct Fixture {
    pub proxy: FhirProxy,
    pub request: RequestHeader,
    pub response: ResponseHeader,
    pub body: Bytes,
}

/// `jwt`: the caller presents an RS256 token (verified once here, then served from the
/// gateway's token cache, as a client reusing its token is); else `insecure_dev`.
pub fn fixture(jwt: bool) -> Fixture {
    let auth = if jwt {
        "auth:\n  mode: jwt\n  issuers:\n    - name: bench\n      issuer: https://idp.bench\n      jwks_url: http://127.0.0.1:1/jwks\n      audiences: [\"api://fhir-gateway\"]\n      allowed_tenants: [\"t1\"]\n"
    } else {
        "auth:\n  mode: insecure_dev\n"
    };
    let yaml = format!("listen:\n  - addr: 127.0.0.1:18080\nupstream:\n  url: {UPSTREAM}\n{auth}");
    let cfg = fhir_gateway::config::parse(&yaml, &|_| None).expect("config");
    let gw = fhir_gateway::Gateway::new(&cfg).expect("gateway");
    let mut request = RequestHeader::build("GET", b"/fhir/Patient/1", None).unwrap();
    request
        .insert_header("Host", "fhir.hospital.example")
        .unwrap();
    request.insert_header("User-Agent", "wrk").unwrap();
    request
        .insert_header("Accept", "application/fhir+json")
        .unwrap();
    if jwt {
        let token = signed_token(&gw);
        request
            .insert_header("Authorization", format!("Bearer {token}"))
            .unwrap();
    }
    let body = patient();
    let mut response = ResponseHeader::build(200, None).unwrap();
    for (k, v) in [
        ("Server", "nginx/1.22.1"),
        ("Date", "Mon, 07 Dec 2026 05:52:33 GMT"),
        ("Content-Type", "application/fhir+json"),
        ("Last-Modified", "Mon, 07 Dec 2026 05:52:32 GMT"),
        ("Connection", "keep-alive"),
        ("ETag", "\"6b1649a0-4e9\""),
        ("Accept-Ranges", "bytes"),
    ] {
        response.insert_header(k, v).unwrap();
    }
    response
        .insert_header("Content-Length", body.len().to_string())
        .unwrap();
    Fixture {
        proxy: FhirProxy::new(Arc::new(gw)),
        request,
        response,
        body,
    }
}

fn patient() -> Bytes {
    let mut links = String::new();
    for i in 0..5 {
        links.push_str(&format!(
            r#"{{"other":{{"reference":"{UPSTREAM}/Patient/{i}"}},"type":"seealso"}},"#
        ));
    }
    links.pop();
    Bytes::from(format!(
        r#"{{"resourceType":"Patient","id":"1","meta":{{"versionId":"3","lastUpdated":"2026-12-01T10:00:00.000Z","source":"{UPSTREAM}/_source"}},"identifier":[{{"system":"urn:oid:1.2.36.146.595.217.0.1","value":"12345"}}],"active":true,"name":[{{"use":"official","family":"Chalmers","given":["Peter","James"]}}],"gender":"male","birthDate":"1974-12-25","link":[{links}],"text":{{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>"}}}}"#,
        "Peter James Chalmers ".repeat(30)
    ))
}

/// A Reader's RS256 token from a key generated here, whose JWKS the gateway is given.
fn signed_token(gw: &fhir_gateway::Gateway) -> String {
    use base64::Engine;
    let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwks = serde_json::json!({"keys":[{
        "kty":"RSA","kid":"bench-1","alg":"RS256","use":"sig",
        "n": b64.encode(rsa.n().to_vec()), "e": b64.encode(rsa.e().to_vec())
    }]});
    gw.auth.issuers[0].keys.load(jwks).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "iss":"https://idp.bench","aud":"api://fhir-gateway","exp":now+3600,"iat":now,
        "oid":"user-1","tid":"t1","upn":"ada@hospital.example","roles":["Reader"]
    });
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("bench-1".into());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&rsa.private_key_to_pem().unwrap()).unwrap();
    jsonwebtoken::encode(&h, &claims, &key).unwrap()
}
