//! An HTTPS upstream: a real SEKMET instance serving TLS with a certificate from a test CA.
//! With the CA configured the gateway proxies (and rewrites the https base); without it,
//! verification fails closed with a 502 — never a silent plaintext or unverified call.

mod common;

use common::*;
use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::pkey::PKey;
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A CA and a server certificate for `localhost` / 127.0.0.1 signed by it, as PEM files.
fn make_certs(
    dir: &std::path::Path,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let name = |cn: &str| {
        let mut b = X509NameBuilder::new().unwrap();
        b.append_entry_by_text("CN", cn).unwrap();
        b.build()
    };
    let ca_key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut ca = X509::builder().unwrap();
    ca.set_version(2).unwrap();
    ca.set_serial_number(&BigNum::from_u32(1).unwrap().to_asn1_integer().unwrap())
        .unwrap();
    ca.set_subject_name(&name("fhir-gateway test CA")).unwrap();
    ca.set_issuer_name(&name("fhir-gateway test CA")).unwrap();
    ca.set_pubkey(&ca_key).unwrap();
    ca.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    ca.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    ca.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
        .unwrap();
    ca.sign(&ca_key, MessageDigest::sha256()).unwrap();
    let ca = ca.build();

    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut srv = X509::builder().unwrap();
    srv.set_version(2).unwrap();
    srv.set_serial_number(&BigNum::from_u32(2).unwrap().to_asn1_integer().unwrap())
        .unwrap();
    srv.set_subject_name(&name("localhost")).unwrap();
    srv.set_issuer_name(ca.subject_name()).unwrap();
    srv.set_pubkey(&key).unwrap();
    srv.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    srv.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    let san = SubjectAlternativeName::new()
        .dns("localhost")
        .ip("127.0.0.1")
        .build(&srv.x509v3_context(Some(&ca), None))
        .unwrap();
    srv.append_extension(san).unwrap();
    srv.sign(&ca_key, MessageDigest::sha256()).unwrap();
    let srv = srv.build();

    let (ca_p, crt_p, key_p) = (
        dir.join("ca.pem"),
        dir.join("server.crt"),
        dir.join("server.key"),
    );
    std::fs::write(&ca_p, ca.to_pem().unwrap()).unwrap();
    std::fs::write(&crt_p, srv.to_pem().unwrap()).unwrap();
    std::fs::write(&key_p, key.private_key_to_pem_pkcs8().unwrap()).unwrap();
    (ca_p, crt_p, key_p)
}

struct TlsSekmet(Child);

impl Drop for TlsSekmet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn https_upstream_is_verified_against_the_configured_ca() {
    let sekmet = peers_dir().join("sekmet-venv/bin/sekmet");
    assert!(sekmet.exists(), "run scripts/peers.sh install");
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("fgw-tls-{}-{port}", std::process::id()));
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let (ca, crt, key) = make_certs(&dir);
    let settings = dir.join("settings.yaml");
    std::fs::write(
        &settings,
        format!(
            "host: 127.0.0.1\nport: {port}\nbase_url: https://localhost:{port}/fhir\ndata_dir: {}\nvalidation: {{inbound: strict}}\nsimulator: {{enabled: false}}\nlog_inbound: false\ntls_certfile: {}\ntls_keyfile: {}\n",
            dir.join("data").display(),
            crt.display(),
            key.display()
        ),
    )
    .unwrap();
    let _server = TlsSekmet(
        Command::new(&sekmet)
            .args(["serve", "-c"])
            .arg(&settings)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ca_pem = std::fs::read(&ca).unwrap();
    let direct = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while direct
        .get(format!("https://localhost:{port}/fhir/metadata"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "TLS SEKMET did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
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
    let _ = std::fs::remove_dir_all(&dir);
}
