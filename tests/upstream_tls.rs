//! An HTTPS upstream: a real SEKMET instance serving TLS with a certificate from a test CA.
//! With the CA configured the gateway proxies (and rewrites the https base); without it,
//! verification fails closed with a 502 — never a silent plaintext or unverified call.

mod common;

use common::tls::TlsSekmet;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn https_upstream_is_verified_against_the_configured_ca() {
    let sekmet = TlsSekmet::start(&["localhost"], &["127.0.0.1"], "localhost").await;
    let (port, ca) = (sekmet.port, &sekmet.pki.ca);
    let upstream = format!("https://localhost:{port}/fhir");

    // With the CA: proxied, and the https base rewritten everywhere.
    let gw = Gateway::start(&format!(
        "upstream:\n  url: {upstream}\n  tls:\n    ca_file: {}\nauth:\n  mode: insecure_dev\n",
        ca.display()
    ))
    .await;
    let r = client()
        .post(format!("{}/Patient", gw.base()))
        .header("Content-Type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","name":[{"family":"Tls"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with(&gw.base()));
    let r = client()
        .get(format!("{}/Patient?family=Tls", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    assert_no_upstream_address(&headers, &body, &upstream);
    drop(gw);

    // Without it: the system store does not know the test CA, so nothing is proxied.
    let gw = Gateway::start(&format!(
        "upstream:\n  url: {upstream}\nauth:\n  mode: insecure_dev\n"
    ))
    .await;
    let r = client()
        .get(format!("{}/Patient", gw.base()))
        .send()
        .await
        .unwrap();
    assert_outcome(r, 502, "transient").await;
}
