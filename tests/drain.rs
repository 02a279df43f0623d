//! Graceful drain on SIGTERM: /readyz fails first, a request already in flight finishes,
//! keep-alive connections are closed politely (`Connection: close`), and the process exits
//! within the grace periods.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_before_it_stops() {
    // An upstream that answers slowly, so a request is in flight when the signal arrives.
    let up = ScriptedUpstream::start(|r, _| {
        if r.target.contains("slow") {
            Reply::Delay(
                Duration::from_millis(1500),
                Box::new(Reply::json(
                    200,
                    r#"{"resourceType":"Patient","id":"slow"}"#,
                )),
            )
        } else {
            Reply::json(200, r#"{"resourceType":"Patient","id":"fast"}"#)
        }
    })
    .await;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("fgw-drain-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("gw.yaml");
    std::fs::write(
        &conf,
        format!(
            "pingora:\n  threads: 2\n  grace_period_seconds: 2\n  graceful_shutdown_timeout_seconds: 2\n  pid_file: {d}/gw.pid\n  upgrade_sock: {d}/upgrade.sock\nlisten:\n  - addr: 127.0.0.1:{port}\nupstream:\n  url: {}\nauth:\n  mode: insecure_dev\nhealth:\n  upstream_check_interval_ms: 200\n  drain_seconds: 2\n",
            up.base(),
            d = dir.display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fhir-gateway"))
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("gw.log")).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = c.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = c
        .get(format!("{base}/fhir/Patient/fast"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_ne!(
        r.headers().get("connection").map(|v| v.to_str().unwrap()),
        Some("close"),
        "keep-alive while serving"
    );
    r.bytes().await.unwrap();

    let in_flight = {
        let c = c.clone();
        let url = format!("{base}/fhir/Patient/slow");
        tokio::spawn(async move { c.get(url).send().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t0 = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Readiness fails first, while requests are still answered.
    let r = c.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.text().await.unwrap().contains("draining"));
    let r = c
        .get(format!("{base}/fhir/Patient/fast"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers().get("connection").map(|v| v.to_str().unwrap()),
        Some("close"),
        "draining: the connection is closed after the answer"
    );
    // The request that was in flight completes.
    let slow = in_flight
        .await
        .unwrap()
        .expect("in-flight request answered");
    assert_eq!(slow.status(), 200);
    assert!(slow.text().await.unwrap().contains("slow"));

    // And the process goes away within grace + shutdown timeout (+ slack).
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status:?}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(9),
            "still running after the grace periods"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}
