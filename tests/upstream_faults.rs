//! Upstream failures a real server will not produce on demand: refused connections, slow
//! answers, 429/503 with Retry-After, a 50 MB body, compressed bodies, URLs in odd headers.

mod common;

use common::raw::raw_request;
use common::*;
use std::time::{Duration, Instant};

fn conf(upstream: &str, extra: &str) -> String {
    format!("upstream:\n  url: {upstream}\n{extra}auth:\n  mode: insecure_dev\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_down_is_a_502_operation_outcome_before_the_connect_timeout() {
    let dead = free_port(); // nothing listens here
    let gw = Gateway::start(&conf(
        &format!("http://127.0.0.1:{dead}/fhir"),
        "  timeouts:\n    connect_ms: 2000\n  retries:\n    max_attempts: 2\n    base_delay_ms: 10\n",
    ))
    .await;
    let t = Instant::now();
    let r = client()
        .get(format!("{}/Patient/1", gw.base()))
        .send()
        .await
        .unwrap();
    let v = assert_outcome(r, 502, "transient").await;
    assert!(
        t.elapsed() < Duration::from_millis(2000),
        "refused is not a timeout"
    );
    assert!(
        v["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{v}"
    );
    // POST gets the same answer (never retried, nothing to duplicate).
    let r = client()
        .post(format!("{}/Patient", gw.base()))
        .header("Content-Type", "application/fhir+json")
        .body("{\"resourceType\":\"Patient\"}")
        .send()
        .await
        .unwrap();
    assert_outcome(r, 502, "transient").await;
    // Readiness reports the dead upstream.
    let r = client().get(gw.url("/readyz")).send().await.unwrap();
    assert_outcome(r, 503, "transient").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_upstream_is_a_504_at_the_read_timeout() {
    let up = ScriptedUpstream::start(|_, _| {
        Reply::Delay(Duration::from_secs(5), Box::new(Reply::json(200, "{}")))
    })
    .await;
    let gw = Gateway::start(&conf(
        &up.base(),
        "  timeouts:\n    read_ms: 500\n  retries:\n    max_attempts: 1\n",
    ))
    .await;
    let t = Instant::now();
    let r = client()
        .get(format!("{}/Patient/1", gw.base()))
        .send()
        .await
        .unwrap();
    assert_outcome(r, 504, "timeout").await;
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idempotent_requests_are_retried_on_503_with_retry_after() {
    let up = ScriptedUpstream::start(|req, _| {
        // The first GET fails; every POST fails.
        let seen_get = req.method == "GET" && req.target.ends_with("/second");
        if req.method == "POST" || !seen_get {
            Reply::Full {
                status: 503,
                headers: vec![
                    ("Content-Type".into(), "application/fhir+json".into()),
                    ("Retry-After".into(), "0".into()),
                ],
                body: br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"transient"}]}"#.to_vec(),
            }
        } else {
            Reply::json(200, r#"{"resourceType":"Patient","id":"1"}"#)
        }
    })
    .await;
    let gw = Gateway::start(&conf(
        &up.base(),
        "  retries:\n    max_attempts: 3\n    base_delay_ms: 10\n",
    ))
    .await;
    // GET: three attempts, all 503 → the server's own 503 body reaches the client.
    let r = client()
        .get(format!("{}/Patient/first", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["issue"][0]["code"], "transient");
    assert_eq!(up.received().len(), 3, "GET tried max_attempts times");

    // POST: exactly one attempt, never a duplicate create.
    let r = client()
        .post(format!("{}/Patient", gw.base()))
        .header("Content-Type", "application/fhir+json")
        .body("{\"resourceType\":\"Patient\"}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let posts = up.received().iter().filter(|r| r.method == "POST").count();
    assert_eq!(posts, 1, "POST is never retried");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_that_succeeds_is_invisible_to_the_client() {
    let up = ScriptedUpstream::start(|_, n| {
        if n == 0 {
            Reply::Full {
                status: 429,
                headers: vec![("x-ms-retry-after-ms".into(), "50".into())],
                body: vec![],
            }
        } else {
            Reply::json(200, r#"{"resourceType":"Patient","id":"p1"}"#)
        }
    })
    .await;
    let gw = Gateway::start(&conf(&up.base(), "")).await;
    let r = client()
        .put(format!("{}/Patient/p1", gw.base()))
        .header("Content-Type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","id":"p1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = up.received();
    assert_eq!(got.len(), 2);
    // The replayed PUT carries the same body.
    assert_eq!(got[1].body, got[0].body);
    assert_eq!(got[1].body, br#"{"resourceType":"Patient","id":"p1"}"#);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_retry_after_is_not_waited_for() {
    let up = ScriptedUpstream::start(|_, _| Reply::Full {
        status: 429,
        headers: vec![("Retry-After".into(), "120".into())],
        body: vec![],
    })
    .await;
    let gw = Gateway::start(&conf(&up.base(), "  retries:\n    max_delay_ms: 1000\n")).await;
    let r = client()
        .get(format!("{}/Patient", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "120");
    assert_eq!(up.received().len(), 1);
}

/// A scripted upstream whose replies may name its own base URL (known only once it is bound).
async fn self_aware_upstream(
    reply: impl Fn(&Recorded, &str) -> Reply + Send + Sync + 'static,
) -> ScriptedUpstream {
    let holder = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let h = holder.clone();
    let up = ScriptedUpstream::start(move |req, _| {
        let base = h.lock().unwrap().clone();
        reply(req, &base)
    })
    .await;
    *holder.lock().unwrap() = up.base();
    up
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_megabytes_stream_through_with_flat_memory() {
    let up = self_aware_upstream(|_, base| {
        // 64 KiB chunks full of URLs naming the upstream; 800 chunks = 50 MiB.
        let pattern = format!("{{\"fullUrl\":\"{base}/Observation/1\"}},");
        let mut chunk = Vec::with_capacity(65536);
        while chunk.len() + pattern.len() < 65536 {
            chunk.extend_from_slice(pattern.as_bytes());
        }
        chunk.resize(65536, b' ');
        Reply::Stream {
            status: 200,
            content_type: "application/fhir+ndjson".into(),
            chunk,
            count: 800,
        }
    })
    .await;
    let gw = Gateway::start(&conf(&up.base(), "")).await;
    let _ = client().get(gw.url("/healthz")).send().await.unwrap();
    let before = proc_status_kib(gw.pid(), "VmRSS:");

    let mut r = client()
        .get(format!("{}/Observation", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let upstream_needle = up.addr.to_string();
    let public = format!("http://127.0.0.1:{}/fhir/Observation/1", gw.port);
    let (mut total, mut rewritten) = (0usize, 0usize);
    // Scan with a carry shorter than one URL, so a URL split across chunks is seen once.
    let mut carry: Vec<u8> = Vec::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        total += chunk.len();
        let mut data = std::mem::take(&mut carry);
        data.extend_from_slice(&chunk);
        let text = String::from_utf8_lossy(&data);
        assert!(!text.contains(&upstream_needle), "upstream address leaked");
        rewritten += text.matches(&public).count();
        carry = data[data.len().saturating_sub(public.len() - 1)..].to_vec();
    }
    let hwm = proc_status_kib(gw.pid(), "VmHWM:");
    assert!(total >= 50 * 1024 * 1024, "whole body arrived: {total}");
    // Every URL the upstream sent came out rewritten: count them as the upstream built them.
    let upstream_pattern_len = format!("{{\"fullUrl\":\"{}/Observation/1\"}},", up.base()).len();
    let per_chunk = (65536 - 1) / upstream_pattern_len;
    assert_eq!(rewritten, 800 * per_chunk, "URLs rewritten");
    // Streaming: the peak stays far below the body size.
    assert!(
        hwm < before + 24 * 1024,
        "gateway memory grew from {before} KiB to a peak of {hwm} KiB for a 50 MiB body"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_header_naming_the_upstream_is_rewritten() {
    let up = self_aware_upstream(|_, b| Reply::Full {
        status: 201,
        headers: vec![
            ("Content-Type".into(), "application/fhir+json".into()),
            ("Location".into(), format!("{b}/Patient/1/_history/1")),
            ("Content-Location".into(), format!("{b}/Patient/1")),
            ("Link".into(), format!("<{b}/Patient?page=2>; rel=\"next\"")),
            ("X-Progress-Url".into(), format!("{b}/_operations/export/1")),
            ("ETag".into(), "\"strong\"".into()),
            ("Server".into(), "SecretServer/1.2".into()),
            ("X-Powered-By".into(), "Python".into()),
        ],
        body: format!(r#"{{"a":"{b}/x","b":"{}/y"}}"#, b.replace('/', "\\/")).into_bytes(),
    })
    .await;
    let gw = Gateway::start(&conf(&up.base(), "")).await;
    let r = client()
        .get(format!("{}/Patient/1", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let h = r.headers().clone();
    let g = gw.base();
    assert_eq!(h["location"], format!("{g}/Patient/1/_history/1").as_str());
    assert_eq!(h["content-location"], format!("{g}/Patient/1").as_str());
    assert_eq!(
        h["link"],
        format!("<{g}/Patient?page=2>; rel=\"next\"").as_str()
    );
    assert_eq!(
        h["x-progress-url"],
        format!("{g}/_operations/export/1").as_str()
    );
    assert_eq!(
        h["etag"], "W/\"strong\"",
        "body changed, so the ETag is weak"
    );
    assert!(h.get("server").is_none_or(|s| s != "SecretServer/1.2"));
    assert!(h.get("x-powered-by").is_none());
    let body = r.bytes().await.unwrap();
    assert_no_upstream_address(&h, &body, &up.base());
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["a"], format!("{g}/x").as_str());
    assert_eq!(v["b"], format!("{g}/y").as_str());
}

#[tokio::test(flavor = "multi_thread")]
async fn binary_bodies_pass_untouched_and_compressed_text_is_refused() {
    let up = self_aware_upstream(|req, b| {
        if req.target.ends_with("/pdf") {
            Reply::Full {
                status: 200,
                headers: vec![("Content-Type".into(), "application/pdf".into())],
                body: format!("%PDF-1.4 {b}").into_bytes(),
            }
        } else {
            Reply::Full {
                status: 200,
                headers: vec![
                    ("Content-Type".into(), "application/fhir+json".into()),
                    ("Content-Encoding".into(), "gzip".into()),
                ],
                body: vec![0x1f, 0x8b, 0, 0],
            }
        }
    })
    .await;
    let gw = Gateway::start(&conf(&up.base(), "")).await;
    let r = client()
        .get(format!("{}/Binary/pdf", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        format!("%PDF-1.4 {}", up.base()).len().to_string().as_str()
    );
    assert_eq!(r.text().await.unwrap(), format!("%PDF-1.4 {}", up.base()));
    let r = client()
        .get(format!("{}/Patient/gz", gw.base()))
        .send()
        .await
        .unwrap();
    assert_outcome(r, 502, "transient").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_module_path_retries_like_the_proxy_path() {
    // A post module applies (the body is buffered and the gateway calls the server itself):
    // the same retry rules hold.
    let up = ScriptedUpstream::start(|req, n| {
        if req.method == "POST" || n == 0 {
            Reply::Full {
                status: 503,
                headers: vec![("x-ms-retry-after-ms".into(), "20".into())],
                body: vec![],
            }
        } else {
            Reply::json(200, r#"{"resourceType":"Patient","id":"p1"}"#)
        }
    })
    .await;
    // Events to a temp file, not the working directory.
    let events = std::env::temp_dir().join(format!("fgw-retry-events-{}.jsonl", free_port()));
    let gw = Gateway::start(&format!(
        "{}post:\n  - name: PublishFHIREvent\nevents:\n  file: {}\n",
        conf(
            &up.base(),
            "  retries:\n    max_attempts: 3\n    base_delay_ms: 10\n"
        ),
        events.display()
    ))
    .await;
    let r = client()
        .put(format!("{}/Patient/p1", gw.base()))
        .header("Content-Type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","id":"p1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", gw.log());
    let got = up.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].body, got[0].body, "the PUT is replayed whole");
    let r = client()
        .post(format!("{}/Patient", gw.base()))
        .header("Content-Type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let posts = up.received().iter().filter(|r| r.method == "POST").count();
    assert_eq!(posts, 1, "POST is never retried");
    let _ = std::fs::remove_file(events);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_module_path_stops_when_the_client_leaves() {
    use tokio::io::AsyncWriteExt;
    let up = ScriptedUpstream::start(|_, _| {
        Reply::Delay(
            Duration::from_secs(3),
            Box::new(Reply::json(
                200,
                r#"{"resourceType":"Bundle","type":"searchset","entry":[]}"#,
            )),
        )
    })
    .await;
    let gw = Gateway::start(&conf(
        &up.base(),
        "post:\n  - name: DateSort\n    settings: {max: 100}\n",
    ))
    .await;
    let id = "left-before-the-answer-1";
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", gw.port))
        .await
        .unwrap();
    s.write_all(
        format!(
            "GET /fhir/Observation?_sort=date HTTP/1.1\r\nHost: x\r\nX-Request-Id: {id}\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // Wait until the gateway is waiting on the FHIR server, then leave.
    let deadline = Instant::now() + Duration::from_secs(10);
    while up.received().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(s);
    // The exchange is abandoned (logged as 499), not finished for nobody.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let log = gw.log();
        if let Some(l) = log.lines().find(|l| l.contains(&format!("id={id}"))) {
            break l.to_string();
        }
        assert!(Instant::now() < deadline, "no access log line\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(line.contains("status=499"), "{line}");
    assert_eq!(up.received().len(), 1);
    // And the gateway is fine.
    let r = client().get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order() {
    let up = ScriptedUpstream::start(|r, _| {
        let id = &r.target[r.target.len() - 1..];
        let body = if r.target.contains("Observation") {
            format!(r#"{{"resourceType":"Bundle","id":"{id}","type":"searchset","entry":[]}}"#)
        } else {
            format!(r#"{{"resourceType":"Patient","id":"{id}"}}"#)
        };
        Reply::Delay(
            Duration::from_millis(300),
            Box::new(Reply::json(200, &body)),
        )
    })
    .await;
    let streamed = ("", "/fhir/Patient/");
    let module = (
        "post:\n  - name: DateSort\n    settings: {max: 100}\n",
        "/fhir/Observation?_sort=date&_id=",
    );
    for (post, path) in [streamed, module] {
        let gw = Gateway::start(&conf(&up.base(), post)).await;
        // Both requests in one write: the second arrives while the first is upstream.
        let (_, text) = raw_request(
            gw.port,
            format!(
                "GET {path}a HTTP/1.1\r\nHost: x\r\n\r\nGET {path}b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(
            text.matches("HTTP/1.1 200").count(),
            2,
            "both answered ({path}):\n{text}"
        );
        let (a, b) = (text.find(r#""id":"a""#), text.find(r#""id":"b""#));
        assert!(a.is_some() && b.is_some() && a < b, "in order:\n{text}");
    }
}
