//! Issue 16, the production sink: the audit trail's lines on a Kafka topic (the real tansu
//! broker), byte for byte and in the file's order; `audit verify --topic` passes on it and
//! catches an edited, a deleted and an inserted line in a tampered copy; a broker stopped
//! mid-workload (and a gateway SIGKILLed meanwhile) loses nothing and duplicates nothing.

mod common;

use common::broker::*;
use common::idp::*;
use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Trail {
    dir: PathBuf,
    file: PathBuf,
    key: PathBuf,
}

impl Trail {
    fn new() -> Trail {
        let (dir, file, key) = audit_trail_dir("audit-kafka");
        Trail { file, key, dir }
    }

    fn yaml(&self, bootstrap: &str, topic: &str, metrics_port: u16) -> String {
        format!(
            "metrics:\n  listen: 127.0.0.1:{metrics_port}\naudit:\n  file: {}\n  key_file: {}\n  instance: gw-test\n  checkpoint_every: 7\n  kafka:\n    bootstrap_servers: {bootstrap}\n    topic: {topic}\n    spool:\n      dir: {}\n",
            self.file.display(),
            self.key.display(),
            self.dir.join("spool").display()
        )
    }

    /// The file's complete lines, in order.
    fn lines(&self) -> Vec<Vec<u8>> {
        let b = std::fs::read(&self.file).unwrap_or_default();
        let end = b.iter().rposition(|&c| c == b'\n').map_or(0, |e| e + 1);
        b[..end]
            .split(|&c| c == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    }
}

impl Drop for Trail {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every message of `topic` as (key, value), partition by partition, once at least `want`
/// arrived and the topic was quiet for 1.5 s (late re-sends count too), or at `within`.
fn topic_lines(
    bootstrap: &str,
    topic: &str,
    want: usize,
    within: Duration,
) -> Vec<(String, Vec<u8>)> {
    let c = consumer_from_beginning(bootstrap, topic);
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    let mut last = Instant::now();
    while Instant::now() < deadline
        && !(out.len() >= want && last.elapsed() > Duration::from_millis(1500))
    {
        if let Some(Ok(m)) = rdkafka::consumer::BaseConsumer::poll(&c, Duration::from_millis(200)) {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            out.push((key, m.payload().unwrap_or_default().to_vec()));
            last = Instant::now();
        }
    }
    out
}

fn produce(bootstrap: &str, topic: &str, lines: &[Vec<u8>]) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    for l in lines {
        p.send(BaseRecord::to(topic).key("gw-test").payload(l))
            .map_err(|(e, _)| e)
            .unwrap();
        p.poll(Duration::from_millis(0));
    }
    p.flush(Duration::from_secs(10)).unwrap();
}

fn verify_topic(bootstrap: &str, topic: &str, key: &Path) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-gateway"))
        .args([
            "audit",
            "verify",
            "--topic",
            topic,
            "--bootstrap",
            bootstrap,
            "--from-beginning",
        ])
        .arg("--key-file")
        .arg(key)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

async fn metric(gw: &Gateway, port: u16, name: &str) -> f64 {
    metric_value(&metrics_text(port, gw).await, name)
}

/// Waits until the writer has nothing more to write and the sink's spool is drained.
async fn settle(gw: &Gateway, port: u16, trail: &Trail) -> usize {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = trail.lines().len();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = trail.lines().len();
        let backlog = metric(gw, port, "fhirgw_audit_sink_backlog").await;
        if now == n && backlog == 0.0 {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the sink did not drain: backlog {backlog}\n{}",
            gw.log()
        );
        n = now;
    }
}

/// `lines` without byte-identical repeats of an earlier line, and how many were dropped.
fn dedup(lines: &[Vec<u8>]) -> (Vec<Vec<u8>>, usize) {
    let mut seen = std::collections::HashSet::new();
    let out: Vec<Vec<u8>> = lines
        .iter()
        .filter(|l| seen.insert(l.to_vec()))
        .cloned()
        .collect();
    let dups = lines.len() - out.len();
    (out, dups)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_topic_holds_the_files_lines_verify_passes_and_a_tampered_copy_fails() {
    let topic = format!("audit-{}", uniq());
    ensure_topic(SHARED_BROKER, &topic);
    let trail = Trail::new();
    let port = free_port();
    let gw = jwt_gateway(&trail.yaml(SHARED_BROKER, &topic, port)).await;
    let w = token("writer-app").await;
    created(
        &gw,
        &write_many(&gw, &w, 120, 8, "audit-sink").await,
        "writes",
    );
    // A patient read twice, for the "who saw patient X" recipe.
    let patient = format!("ak-{}", uniq());
    let r = client()
        .put(format!("{}/Patient/{patient}", sekmet_url()))
        .header("Content-Type", "application/fhir+json")
        .body(serde_json::json!({"resourceType": "Patient", "id": patient}).to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let reader = token("reader-app").await;
    for _ in 0..2 {
        let r = client()
            .get(format!("{}/Patient/{patient}", gw.base()))
            .bearer_auth(&reader)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        // Read whole: a client that hangs up early was not shown the patient.
        assert!(r.text().await.unwrap().contains(&patient));
    }
    let n = settle(&gw, port, &trail).await;
    let file = trail.lines();
    assert!(n >= 120 + 120 / 7, "records and checkpoints: {n}");
    let got = topic_lines(SHARED_BROKER, &topic, file.len(), Duration::from_secs(30));
    assert!(got.iter().all(|(k, _)| k == "gw-test"), "key = instance");
    let values: Vec<Vec<u8>> = got.into_iter().map(|(_, v)| v).collect();
    assert_eq!(
        values.len(),
        file.len(),
        "one message per line, no re-sends on a healthy broker"
    );
    assert!(
        values == file,
        "the topic holds exactly the file's lines, in order"
    );
    assert!(
        metric(&gw, port, "fhirgw_audit_sink_total{stage=\"delivered\"}").await
            >= file.len() as f64
    );

    let (code, out) = verify_topic(SHARED_BROKER, &topic, &trail.key);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("instance gw-test: {} line(s)", file.len())),
        "{} lines in the file: {out}",
        file.len()
    );

    // The documented recipe: the topic loaded into SQLite, then who saw the patient.
    let db = trail.dir.join("audit.db");
    let out = std::process::Command::new(peers_dir().join("kafka-venv/bin/python"))
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/audit-topic-to-sqlite.py"
        ))
        .args(["--bootstrap", SHARED_BROKER, "--topic", &topic, "--db"])
        .arg(&db)
        .args(["--who-saw", &format!("Patient/{patient}")])
        .output()
        .unwrap();
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("who saw Patient/{patient}: {rows:?}");
    let in_file: Vec<String> = file
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .filter(|l| l.contains(&patient))
        .collect();
    assert_eq!(
        rows.len(),
        2,
        "{rows:?}\n{}\n{in_file:#?}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        rows.iter()
            .all(|r| r["interaction"] == "read" && r["instance"] == "gw-test"),
        "{rows:?}"
    );
    assert!(
        rows.iter().all(|r| r["user_id"]
            .as_str()
            .is_some_and(|u| u.contains("reader-app"))),
        "{rows:?}"
    );

    // A tampered copy on a second topic: line 10 edited, line 20 deleted, line 30 put again
    // with different bytes (an insertion), and a byte-identical re-send (tolerated).
    let copy = format!("{topic}-tampered");
    ensure_topic(SHARED_BROKER, &copy);
    let mut bad = file.clone();
    let edited =
        String::from_utf8(bad[10].clone())
            .unwrap()
            .replacen("Observation", "Obsxrvation", 1);
    assert_ne!(
        edited.as_bytes(),
        &bad[10][..],
        "line 10 names an Observation"
    );
    bad[10] = edited.into_bytes();
    bad.remove(20);
    let mut forged = String::from_utf8(bad[30].clone()).unwrap();
    forged = forged.replacen("\"instance\"", "\"x\":1,\"instance\"", 1);
    bad.insert(31, forged.into_bytes());
    bad.insert(40, bad[39].clone());
    produce(SHARED_BROKER, &copy, &bad);
    let (code, out) = verify_topic(SHARED_BROKER, &copy, &trail.key);
    eprintln!("verify of the tampered copy:\n{out}");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("does not hash to the prev of seq 11: edited"),
        "{out}"
    );
    assert!(
        out.contains("record 20 missing before seq 21: deleted"),
        "{out}"
    );
    assert!(out.contains("appears twice: inserted"), "{out}");
    assert!(out.contains("1 byte-identical re-send(s) ignored"), "{out}");
    assert!(
        out.contains(&format!("{copy}[0]@")),
        "findings name partition and offset: {out}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_stopped_mid_workload_and_a_killed_gateway_lose_and_duplicate_nothing() {
    let topic = "audit";
    let mut broker = Broker::start(free_port(), topic, None);
    let trail = Trail::new();
    let port = free_port();
    let conf = trail.yaml(&broker.bootstrap(), topic, port);
    let mut gw = jwt_gateway(&conf).await;
    let w = token("writer-app").await;
    created(
        &gw,
        &write_many(&gw, &w, 40, 8, "before").await,
        "before the outage",
    );
    let n = settle(&gw, port, &trail).await;
    let before: Vec<Vec<u8>> = topic_lines(&broker.bootstrap(), topic, n, Duration::from_secs(30))
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(before, trail.lines(), "delivered before the outage");

    // The broker is in memory: what it held is gone with it; what the gateway had not
    // delivered must come after its restart.
    broker.stop();
    created(
        &gw,
        &write_many(&gw, &w, 150, 8, "during").await,
        "during the outage",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&gw, port, "fhirgw_audit_sink_backlog").await < 150.0 {
        assert!(
            Instant::now() < deadline,
            "the lines wait in the spool\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A restart meanwhile: the next process continues from the spool and the file.
    gw.child.kill().unwrap();
    let _ = gw.child.wait();
    let gw = jwt_gateway(&conf).await;
    created(
        &gw,
        &write_many(&gw, &w, 60, 8, "after-kill").await,
        "after the kill",
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.restart();
    let n = settle(&gw, port, &trail).await;
    let file = trail.lines();
    assert_eq!(n, file.len());
    let after: Vec<Vec<u8>> = topic_lines(
        &broker.bootstrap(),
        topic,
        file.len() - before.len(),
        Duration::from_secs(60),
    )
    .into_iter()
    .map(|(_, v)| v)
    .collect();
    let mut all = before.clone();
    all.extend(after.iter().cloned());
    let (unique, dups) = dedup(&all);
    assert!(
        unique == file,
        "what the broker held before and after its restart is the file, in order: {} unique of {} lines, {dups} re-sends\n{}",
        unique.len(),
        file.len(),
        gw.log()
    );
    eprintln!(
        "outage: {} lines, {} on the topics, {dups} byte-identical re-sends",
        file.len(),
        all.len()
    );

    // What the broker ever held, on one topic: verify passes (re-sends tolerated).
    let whole = "audit-whole";
    ensure_topic(&broker.bootstrap(), whole);
    produce(&broker.bootstrap(), whole, &all);
    let (code, out) = verify_topic(&broker.bootstrap(), whole, &trail.key);
    assert_eq!(code, 0, "{out}");
    assert!(gw.log().contains("audit: sink spool"), "{}", gw.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_spool_leaves_the_lines_in_the_file_and_they_all_arrive_later() {
    let topic = "audit";
    let mut broker = Broker::start(free_port(), topic, None);
    broker.stop();
    let trail = Trail::new();
    let port = free_port();
    // Room for a few lines only: most of the outage's lines must wait in the file.
    let conf = trail.yaml(&broker.bootstrap(), topic, port).replace(
        "    spool:\n",
        "    spool:\n      max_bytes: 20000\n      segment_bytes: 5000\n",
    );
    let gw = jwt_gateway(&conf).await;
    let w = token("writer-app").await;
    created(
        &gw,
        &write_many(&gw, &w, 100, 8, "full").await,
        "a full spool",
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&gw, port, "fhirgw_audit_sink_unspooled_bytes").await == 0.0 {
        assert!(
            Instant::now() < deadline,
            "lines wait in the file\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(metric(&gw, port, "fhirgw_audit_sink_total{stage=\"spool_full\"}").await > 0.0);
    assert!(gw.log().contains("the sink spool is full"), "{}", gw.log());
    broker.restart();
    let n = settle(&gw, port, &trail).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&gw, port, "fhirgw_audit_sink_unspooled_bytes").await > 0.0 {
        assert!(Instant::now() < deadline, "the file drains\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let n = settle(&gw, port, &trail).await.max(n);
    let file = trail.lines();
    assert_eq!(n, file.len());
    let got: Vec<Vec<u8>> = topic_lines(
        &broker.bootstrap(),
        topic,
        file.len(),
        Duration::from_secs(60),
    )
    .into_iter()
    .map(|(_, v)| v)
    .collect();
    let (unique, dups) = dedup(&got);
    assert!(
        unique == file,
        "every line of the file, in order: {} unique of {}, {dups} re-sends\n{}",
        unique.len(),
        file.len(),
        gw.log()
    );
    // Nothing was delivered before the outage: the broker's own topic holds the whole chain.
    let (code, out) = verify_topic(&broker.bootstrap(), topic, &trail.key);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn config_check_refuses_an_audit_topic_without_a_broker() {
    let trail = Trail::new();
    let base = format!(
        "listen:\n  - addr: 127.0.0.1:1\nupstream:\n  url: http://127.0.0.1:8090/fhir\nauth:\n  mode: insecure_dev\naudit:\n  file: {}\n  key_file: {}\n  kafka:\n    topic: a\n",
        trail.file.display(),
        trail.key.display()
    );
    let (code, _, err) = check_config(&base, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("audit.kafka: needs bootstrap_servers"),
        "{err}"
    );
    // The events' broker is shared when the section names none.
    let shared = format!("{base}events:\n  kafka:\n    bootstrap_servers: 127.0.0.1:19092\n    topic: e\n    invalidate_caches: false\n  spool:\n    dir: {}\n", trail.dir.join("ev").display());
    let (code, out, err) = check_config(&shared, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let bad = base.replace(
        "    topic: a\n",
        "    topic: a\n    bootstrap_servers: 127.0.0.1:19092\n    properties: {lingr.ms: \"5\"}\n",
    );
    let (code, _, err) = check_config(&bad, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("audit.kafka") && err.contains("lingr.ms"),
        "{err}"
    );
}
