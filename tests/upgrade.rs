//! Zero-downtime upgrade, as systemd's ExecReload runs it: the new binary starts with `-u -d`
//! (its `-d` parent returns once the child is up: `daemon_wait_for_ready`), then the old one
//! gets SIGQUIT and hands over its listening sockets. Clients keep going: 0 failed requests.

mod common;

use common::*;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn pid_in(file: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_under_load_drops_nothing() {
    let up =
        ScriptedUpstream::start(|_, _| Reply::json(200, r#"{"resourceType":"Patient","id":"1"}"#))
            .await;
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("fgw-upgrade-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("gw.pid");
    let conf = dir.join("gw.yaml");
    std::fs::write(
        &conf,
        format!(
            "pingora:\n  threads: 2\n  daemon_wait_for_ready: true\n  grace_period_seconds: 1\n  graceful_shutdown_timeout_seconds: 1\n  pid_file: {}\n  upgrade_sock: {}/upgrade.sock\n  error_log: {}/error.log\nlisten:\n  - addr: 127.0.0.1:{port}\nupstream:\n  url: {}\nauth:\n  mode: insecure_dev\nlogging:\n  access_log: false\n",
            pid_file.display(),
            dir.display(),
            dir.display(),
            up.base()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_fhir-gateway");
    // Start: `-d` returns once the daemon is ready (not before, not 600 s later).
    let t = Instant::now();
    let st = Command::new(bin)
        .args(["-d", "-c"])
        .arg(&conf)
        .status()
        .unwrap();
    assert!(st.success(), "start");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "-d waited {:?}",
        t.elapsed()
    );
    let old = pid_in(&pid_file).expect("pid file");
    let url = format!("http://127.0.0.1:{port}/fhir/Patient/1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while client()
        .get(&url)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .ok()
        != Some(200)
    {
        assert!(Instant::now() < deadline, "never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Load: 8 clients with keep-alive, nonstop.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let c = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let good = match c.get(&url).send().await {
                    Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                    _ => false,
                };
                if good {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // ExecReload: the new binary with -u -d, then SIGQUIT to the old one.
    let t = Instant::now();
    let st = Command::new(bin)
        .args(["-u", "-d", "-c"])
        .arg(&conf)
        .status()
        .unwrap();
    assert!(st.success(), "upgrade start");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "-u -d waited {:?}",
        t.elapsed()
    );
    let quit = Command::new("kill")
        .args(["-QUIT", &old.to_string()])
        .status()
        .unwrap();
    assert!(quit.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(old) {
        assert!(Instant::now() < deadline, "old process still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let new = pid_in(&pid_file).expect("pid file rewritten");
    assert_ne!(new, old);
    assert!(alive(new), "the new process serves");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("upgrade under load: {ok} requests answered, {failed} failed");
    assert!(ok > 100, "load ran: {ok}");
    assert_eq!(failed, 0, "requests failed during the upgrade");
    assert_eq!(
        client().get(&url).send().await.unwrap().status(),
        200,
        "served by the new process"
    );
    let _ = Command::new("kill")
        .args(["-INT", &new.to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(new) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}
