//! The module road (issue 13): a request whose post chain applies is answered by the gateway's
//! own client, which must reach the FHIR server exactly as the streaming proxy does — through
//! Pingora's connector with the proxy's peer: the configured SNI and CA list, every timeout
//! (read, write, total), and a pooled connection reused from one call to the next.

mod common;

use common::tls::{unrelated_ca, TlsSekmet};
use common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The tag SamplePostProcess adds on `/buffered`: proof that the module road answered.
const TAG_SYSTEM: &str = "urn:module-road-test";

/// A gateway in front of `upstream` with `upstream_extra` under `upstream:` (indented two
/// spaces), `extra` at the top level, and a `/buffered` route whose post chain applies to
/// every GET and POST.
async fn gateway(upstream: &str, upstream_extra: &str, extra: &str) -> Gateway {
    Gateway::start(&format!(
        "upstream:\n  url: {upstream}\n{upstream_extra}auth:\n  mode: insecure_dev\n{extra}\
         routes:\n  - prefix: /buffered\n    post:\n      - name: SamplePostProcess\n        settings: {{system: \"{TAG_SYSTEM}\", code: buffered}}\n"
    ))
    .await
}

fn tagged(v: &Value) -> bool {
    v["meta"]["tag"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t["system"] == TAG_SYSTEM))
}

fn corr() -> String {
    format!("module-road-{}", uuid::Uuid::new_v4())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_module_road_sends_the_configured_sni_and_checks_the_certificate_against_it() {
    // The certificate names only fhir.test; the gateway connects to 127.0.0.1.
    let sekmet = TlsSekmet::start(&["fhir.test"], &[], "127.0.0.1").await;
    let upstream = format!("https://127.0.0.1:{}/fhir", sekmet.port);
    let tls = |sni: &str| {
        format!(
            "  tls:\n    ca_file: {}\n    sni: {sni}\n",
            sekmet.pki.ca.display()
        )
    };
    let created: Value = sekmet
        .direct()
        .post(format!("{}/Patient", sekmet.direct_base()))
        .header("Content-Type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","name":[{"family":"Sni"}]}"#)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().expect("created id").to_string();

    // With the right name the buffered read succeeds, and the server saw the gateway's call.
    let gw = gateway(&upstream, &tls("fhir.test"), "").await;
    let id1 = corr();
    let r = client()
        .get(gw.url(&format!("/buffered/Patient/{id}")))
        .header("X-Request-Id", &id1)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    assert_eq!(
        status,
        200,
        "module road with sni fhir.test: {}",
        String::from_utf8_lossy(&body)
    );
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert!(tagged(&v), "the post chain ran: {v}");
    assert_eq!(v["id"], id.as_str());
    assert_no_upstream_address(&headers, &body, &upstream);
    let got = sekmet.received(&id1);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["method"], "GET");
    // The streaming road with the same peer, for comparison.
    let r = client()
        .get(format!("{}/Patient/{id}", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(gw);

    // With a name the certificate does not carry: refused before anything is sent.
    let gw = gateway(&upstream, &tls("wrong.test"), "").await;
    let id2 = corr();
    let r = client()
        .get(gw.url(&format!("/buffered/Patient/{id}")))
        .header("X-Request-Id", &id2)
        .send()
        .await
        .unwrap();
    let h = r.headers().clone();
    let v = assert_outcome(r, 502, "transient").await;
    assert_no_upstream_address(&h, v.to_string().as_bytes(), &upstream);
    sekmet.assert_never_received(&id2).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_module_road_trusts_only_the_configured_ca() {
    let sekmet = TlsSekmet::start(&["localhost"], &["127.0.0.1"], "localhost").await;
    let upstream = format!("https://localhost:{}/fhir", sekmet.port);
    let with_ca = |ca: &std::path::Path| format!("  tls:\n    ca_file: {}\n", ca.display());

    // A CA that did not sign the server's certificate: 502, nothing reaches the server.
    let other = unrelated_ca(&sekmet.dir);
    let gw = gateway(&upstream, &with_ca(&other), "").await;
    let id = corr();
    let r = client()
        .get(gw.url("/buffered/Patient?_count=1"))
        .header("X-Request-Id", &id)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 502, "transient").await;
    sekmet.assert_never_received(&id).await;
    drop(gw);

    // No CA file: the system store does not know the test CA either.
    let gw = gateway(&upstream, "", "").await;
    let id = corr();
    let r = client()
        .get(gw.url("/buffered/Patient?_count=1"))
        .header("X-Request-Id", &id)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 502, "transient").await;
    sekmet.assert_never_received(&id).await;
    drop(gw);

    // The CA that did: the same read goes through the module road.
    let gw = gateway(&upstream, &with_ca(&sekmet.pki.ca), "").await;
    let id = corr();
    let r = client()
        .get(gw.url("/buffered/Patient?_count=1"))
        .header("X-Request-Id", &id)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["resourceType"], "Bundle", "{v}");
    assert_eq!(sekmet.received(&id).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_module_road_gives_up_at_the_read_timeout_and_at_the_total_timeout() {
    let slow = ScriptedUpstream::start(|_, _| {
        Reply::Delay(
            Duration::from_secs(3),
            Box::new(Reply::json(200, r#"{"resourceType":"Patient","id":"1"}"#)),
        )
    })
    .await;
    // read_ms: no response header within 500 ms.
    let gw = gateway(
        &slow.base(),
        "  timeouts:\n    read_ms: 500\n    total_ms: 20000\n",
        "",
    )
    .await;
    let t = Instant::now();
    let r = client()
        .get(gw.url("/buffered/Patient/1"))
        .send()
        .await
        .unwrap();
    let v = assert_outcome(r, 504, "timeout").await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_millis(2500),
        "read timeout after {took:?}: {v}"
    );
    assert_eq!(slow.received().len(), 1, "a read timeout is not retried");
    drop(gw);

    // total_ms: each read is within read_ms, the whole exchange is not.
    let gw = gateway(
        &slow.base(),
        "  timeouts:\n    read_ms: 20000\n    total_ms: 1000\n",
        "",
    )
    .await;
    let t = Instant::now();
    let r = client()
        .get(gw.url("/buffered/Patient/1"))
        .send()
        .await
        .unwrap();
    let v = assert_outcome(r, 504, "timeout").await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1000) && took < Duration::from_millis(2900),
        "total timeout after {took:?}: {v}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_module_road_gives_up_at_the_write_timeout() {
    // The server takes the connection and never reads: a 24 MiB body fills the socket
    // buffers, and the write stalls.
    let up = SilentUpstream::start().await;
    let gw = gateway(
        &up.base(),
        "  timeouts:\n    write_ms: 500\n    read_ms: 20000\n    total_ms: 30000\n",
        "limits:\n  max_request_body_bytes: 50331648\n",
    )
    .await;
    let body = format!(
        r#"{{"resourceType":"Patient","text":{{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>"}}}}"#,
        "x".repeat(24 * 1024 * 1024)
    );
    let t = Instant::now();
    let r = client()
        .post(gw.url("/buffered/Patient"))
        .header("Content-Type", "application/fhir+json")
        .body(body)
        .send()
        .await
        .unwrap();
    let v = assert_outcome(r, 504, "timeout").await;
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "write timeout (500 ms per write) only after {took:?}: {v}"
    );
    assert!(up.connections() >= 1, "the body went to the server");
}

#[tokio::test(flavor = "multi_thread")]
async fn sequential_module_road_reads_reuse_one_pooled_connection() {
    let up = ScriptedUpstream::start(|req, _| {
        let id = req.target.rsplit('/').next().unwrap_or("x").to_string();
        Reply::json(200, &format!(r#"{{"resourceType":"Patient","id":"{id}"}}"#))
    })
    .await;
    let metrics = free_port();
    let gw = gateway(
        &up.base(),
        "",
        &format!("metrics:\n  listen: 127.0.0.1:{metrics}\n"),
    )
    .await;
    let c = client();
    for i in 0..5 {
        let r = c
            .get(gw.url(&format!("/buffered/Patient/p{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        assert!(tagged(&v), "the post chain ran: {v}");
        assert_eq!(v["id"], format!("p{i}"));
    }
    // The server's view: five requests, one connection (health probes connect too, but send
    // nothing, so they are not among the requests).
    let got = up.received();
    assert_eq!(got.len(), 5);
    assert!(
        got.iter().all(|r| r.conn == got[0].conn),
        "requests came on connections {:?}",
        got.iter().map(|r| r.conn).collect::<Vec<_>>()
    );
    // The gateway's view: one new connection, then four from the pool.
    let text = metrics_text(metrics, &gw).await;
    let series = |reused: &str| {
        metric_value(
            &text,
            &format!("fhirgw_upstream_connections_total{{reused=\"{reused}\"}}"),
        )
    };
    assert_eq!(series("false"), 1.0, "{text}");
    assert_eq!(series("true"), 4.0, "{text}");
}
