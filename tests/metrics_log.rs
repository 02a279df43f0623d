//! What operators see: the Prometheus metrics on their own listener and the access log line,
//! after real traffic to SEKMET with real IdP tokens.

mod common;

use common::idp::*;
use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_access_log_describe_the_traffic() {
    let port = free_port();
    let gw = jwt_gateway(&format!(
        "metrics:\n  listen: 127.0.0.1:{port}\nlogging:\n  access_log: true\n"
    ))
    .await;
    let c = client();
    let reader = token("reader-app").await;
    let writer = token("writer-app").await;
    // Two reads (the second may reuse the pooled connection), one refusal of each kind.
    for _ in 0..2 {
        let r = c
            .get(format!("{}/Patient?_count=1", gw.base()))
            .bearer_auth(&reader)
            .header("X-Request-Id", "metrics-read-1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!(
        c.get(format!("{}/Patient", gw.base()))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.get(format!("{}/Patient", gw.base()))
            .bearer_auth(&writer)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    // Counted in the logging hook, which runs just after the answer is sent: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let text = loop {
        let text = c
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let role = "fhirgw_auth_refusals_total{reason=\"role\",status=\"403\"}";
        if metric_value(&text, role) >= 1.0 || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        metric_value(
            &text,
            "fhirgw_requests_total{method=\"GET\",route=\"/fhir\",status=\"200\"}"
        ),
        2.0,
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "fhirgw_auth_refusals_total{reason=\"missing\",status=\"401\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &text,
            "fhirgw_auth_refusals_total{reason=\"role\",status=\"403\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(&text, "fhirgw_upstream_seconds_count{path=\"stream\"}"),
        2.0
    );
    let new = metric_value(&text, "fhirgw_upstream_connections_total{reused=\"false\"}");
    let reused = metric_value(&text, "fhirgw_upstream_connections_total{reused=\"true\"}");
    assert_eq!(new + reused, 2.0, "{text}");
    assert!(reused >= 1.0, "the pool is used: {text}");
    assert!(metric_value(&text, "fhirgw_body_bytes_total{direction=\"response\"}") > 100.0);
    assert!(text.contains("fhirgw_request_seconds_bucket"));
    // One access line per request: correlation id, user, tenant, durations, no query string.
    // A background thread writes it after the answer: wait for it.
    let line = gw
        .log_line("id=metrics-read-1", std::time::Duration::from_secs(5))
        .await;
    let log = gw.log();
    let oid = claims_of(&reader)["oid"].as_str().unwrap().to_string();
    assert!(line.contains(&format!("user={oid}")), "{line}");
    assert!(line.contains(&format!("tenant={TENANT_A}")), "{line}");
    assert!(
        line.contains("status=200") && line.contains("upstream_ms="),
        "{line}"
    );
    assert!(!line.contains("_count"), "no query strings in logs: {line}");
    assert!(!log.contains(&reader), "never a token in the logs");
}
