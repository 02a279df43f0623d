//! Issue 16, the FHIR-server sink (`audit.fhir`): every AuditEvent of the trail becomes an
//! `AuditEvent` resource on the FHIR server, in `batch` Bundles sent with the gateway's own
//! identity. Against SEKMET's bearer-checking instance: each record is there, as written, and
//! "who saw patient X" is a FHIR search. Against a scripted server: a failed batch and a
//! half-taken one lose nothing and repeat only what must be repeated.

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Trail {
    dir: PathBuf,
    file: PathBuf,
    key: PathBuf,
    instance: String,
}

impl Trail {
    fn new() -> Trail {
        let (dir, file, key) = audit_trail_dir("audit-fhir");
        Trail {
            file,
            key,
            dir,
            // SEKMET keeps its data between tests: ids of this run's own.
            instance: format!("gw-{}", uniq()),
        }
    }

    fn yaml(&self, metrics_port: u16) -> String {
        format!(
            "metrics:\n  listen: 127.0.0.1:{metrics_port}\naudit:\n  file: {}\n  key_file: {}\n  instance: {}\n  checkpoint_every: 4\n  fhir:\n    batch: 3\n    interval_ms: 200\n",
            self.file.display(),
            self.key.display(),
            self.instance,
        )
    }

    /// The sink's position: `<offset> <inode>`.
    fn cursor(&self) -> u64 {
        std::fs::read_to_string(format!("{}.fhir-sent", self.file.display()))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    fn cursor_inode(&self) -> Option<u64> {
        std::fs::read_to_string(format!("{}.fhir-sent", self.file.display()))
            .ok()?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    fn len(&self) -> u64 {
        std::fs::metadata(&self.file).map_or(0, |m| m.len())
    }

    /// The file's lines as trees.
    fn lines(&self) -> Vec<Value> {
        lines_of(&self.file)
    }

    /// Waits until the sink has sent the whole file and the writer wrote nothing more.
    async fn settle(&self, gw: &Gateway) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let len = self.len();
            tokio::time::sleep(Duration::from_millis(700)).await;
            if len > 0 && self.cursor() == len && self.len() == len {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the FHIR sink did not catch up: {} of {} bytes\n{}",
                self.cursor(),
                self.len(),
                gw.log()
            );
        }
    }
}

impl Drop for Trail {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A trail file's lines as trees.
fn lines_of(file: &std::path::Path) -> Vec<Value> {
    std::fs::read(file)
        .unwrap_or_default()
        .split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect()
}

/// The resource ids a Bundle the sink sent PUTs, in order.
fn bundle_ids(body: &[u8]) -> Vec<String> {
    let body: Value = serde_json::from_slice(body).unwrap();
    body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect()
}

/// A gateway in front of the scripted server, with `yaml` (the trail), and `n` reads through it.
async fn scripted_gateway_with_reads(up: &ScriptedUpstream, yaml: &str, n: usize) -> Gateway {
    let gw = Gateway::start(&format!(
        "upstream:\n  url: {}\nauth:\n  mode: insecure_dev\n{yaml}",
        up.base()
    ))
    .await;
    for _ in 0..n {
        let r = client()
            .get(format!("{}/Patient/p1", gw.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    gw
}

impl Trail {
    /// The ids of the records in the file, oldest first.
    fn record_ids(&self) -> Vec<String> {
        self.lines()
            .iter()
            .filter(|l| l.get("event").is_some())
            .map(|l| id_of(&self.instance, l["seq"].as_u64().unwrap()))
            .collect()
    }
}

fn id_of(instance: &str, seq: u64) -> String {
    format!("fgw-{instance}-{seq}")
}

async fn auth_get(url: &str) -> (u16, Value) {
    let r = client()
        .get(url)
        .bearer_auth(SEKMET_AUTH_TOKEN)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_record_is_an_audit_event_on_the_server_as_written_sent_with_the_service_identity() {
    require_peer(&format!("{SEKMET_AUTH}/metadata")).await;
    let trail = Trail::new();
    let mport = free_port();
    let gw = Gateway::start_env(
        &format!(
            "upstream:\n  url: {SEKMET_AUTH}\n  identity:\n    type: static_bearer\n    token: \"${{GW_UPSTREAM_TOKEN}}\"\nauth:\n  mode: insecure_dev\n{}",
            trail.yaml(mport)
        ),
        &[("GW_UPSTREAM_TOKEN", SEKMET_AUTH_TOKEN)],
    )
    .await;

    // A mixed workload: a create, reads, a search, a miss, a refusal.
    let r = client()
        .post(format!("{}/Patient", gw.base()))
        .header("Content-Type", "application/fhir+json")
        .body(json!({"resourceType":"Patient","name":[{"family":"Sink"}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let pid = created["id"].as_str().unwrap().to_string();
    for path in [
        format!("Patient/{pid}"),
        format!("Patient?_id={pid}"),
        format!("Patient/{pid}"),
        "Patient/no-such-patient-here".to_string(),
        "Patient/../metadata".to_string(),
        "metadata".to_string(),
    ] {
        let r = client()
            .get(format!("{}/{path}", gw.base()))
            .header("Authorization", "Bearer caller-token-must-not-cross")
            .send()
            .await
            .unwrap();
        assert!(r.status().as_u16() < 500, "{path}: {}", r.status());
    }
    trail.settle(&gw).await;

    let lines = trail.lines();
    let records: Vec<&Value> = lines.iter().filter(|l| l.get("event").is_some()).collect();
    let checkpoints: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("checkpoint").is_some())
        .collect();
    assert_eq!(records.len(), 7, "{lines:#?}");
    assert!(checkpoints.len() >= 2, "{lines:#?}");
    for rec in &records {
        let seq = rec["seq"].as_u64().unwrap();
        let id = id_of(&trail.instance, seq);
        let (st, mut on_server) = auth_get(&format!("{SEKMET_AUTH}/AuditEvent/{id}")).await;
        assert_eq!(st, 200, "record {seq} is not on the server");
        assert_eq!(on_server["id"], id.as_str());
        let o = on_server.as_object_mut().unwrap();
        o.remove("id");
        o.remove("meta");
        assert_eq!(&on_server, &rec["event"], "record {seq} changed on its way");
    }
    // Checkpoints stay in the file: they are no AuditEvents.
    for c in &checkpoints {
        let id = id_of(&trail.instance, c["seq"].as_u64().unwrap());
        let (st, _) = auth_get(&format!("{SEKMET_AUTH}/AuditEvent/{id}")).await;
        assert_eq!(st, 404, "checkpoint {id} was sent");
    }

    // "Who saw patient X", asked of the FHIR server: the three answers that showed it.
    let (st, found) = auth_get(&format!(
        "{SEKMET_AUTH}/AuditEvent?entity=Patient/{pid}&_count=100"
    ))
    .await;
    assert_eq!(st, 200);
    let mut seen: Vec<String> = found["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect();
    seen.sort();
    let mut want: Vec<String> = records
        .iter()
        .filter(|r| {
            r["event"]["entity"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["what"]["reference"] == format!("Patient/{pid}").as_str())
        })
        .map(|r| id_of(&trail.instance, r["seq"].as_u64().unwrap()))
        .collect();
    want.sort();
    // The create (its answer showed the patient), two reads and the search.
    assert_eq!(want.len(), 4, "{records:#?}");
    assert_eq!(seen, want);

    // What SEKMET received from the sink: batches, with the service token, the proxy's audit
    // header, and nothing of any caller.
    let db = peers_dir().join("sekmet-auth/data/sekmet.db");
    // This run's: SEKMET's log keeps earlier runs' too.
    let ours = format!("\"fgw-{}-", trail.instance);
    let calls: Vec<Value> = traffic_with_prefix(&db, "audit-fhir-", Duration::from_secs(5))
        .into_iter()
        .filter(|c| c["body"].as_str().is_some_and(|b| b.contains(&ours)))
        .collect();
    assert!(!calls.is_empty());
    let mut ids = Vec::new();
    for c in &calls {
        assert_eq!(c["method"], "POST");
        let h = &c["headers"];
        // SEKMET logs the token redacted; that it took the batches (it refuses any other
        // token) is what proves it was the service's.
        assert!(h["authorization"]
            .as_str()
            .is_some_and(|a| a.starts_with("Bearer ")));
        assert_eq!(h["x-ms-azurefhir-audit-proxy"], "fhir-gateway");
        assert!(h.get("x-ms-azurefhir-audit-userid").is_none(), "{h}");
        assert!(c.to_string().find("caller-token").is_none());
        let body: Value = serde_json::from_str(c["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["type"], "batch");
        let entries = body["entry"].as_array().unwrap();
        assert!(entries.len() <= 3);
        for e in entries {
            assert_eq!(e["request"]["method"], "PUT");
            ids.push(e["resource"]["id"].as_str().unwrap().to_string());
        }
    }
    // Each record once: nothing failed, so nothing was sent twice.
    let mut all: Vec<String> = records
        .iter()
        .map(|r| id_of(&trail.instance, r["seq"].as_u64().unwrap()))
        .collect();
    all.sort();
    ids.sort();
    assert_eq!(ids, all);
    let text = metrics_text(mport, &gw).await;
    assert_eq!(metric_value(&text, "fhirgw_audit_fhir_unsent_bytes"), 0.0);
}

/// Entry statuses for the second batch: taken, refused for good, to send again, taken.
const HALF: [&str; 4] = [
    "201 Created",
    "400 Bad Request",
    "500 Internal Server Error",
    "201 Created",
];

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_batch_and_a_half_taken_one_lose_nothing_and_repeat_only_what_must() {
    let batches = Arc::new(AtomicUsize::new(0));
    let b = batches.clone();
    let up = ScriptedUpstream::start(move |req, _| {
        if req.method != "POST" {
            return Reply::json(200, r#"{"resourceType":"Patient","id":"p1"}"#);
        }
        let n = b.fetch_add(1, Ordering::SeqCst);
        let body: Value = serde_json::from_slice(&req.body).unwrap();
        let k = body["entry"].as_array().map_or(0, Vec::len);
        let status = |i: usize| match n {
            1 => HALF.get(i).copied().unwrap_or("201 Created"),
            _ => "201 Created",
        };
        match n {
            0 => Reply::json(503, r#"{"resourceType":"OperationOutcome","issue":[]}"#),
            _ => Reply::json(
                200,
                &json!({"resourceType":"Bundle","type":"batch-response",
                    "entry": (0..k).map(|i| json!({"response":{"status": status(i)}})).collect::<Vec<_>>()})
                .to_string(),
            ),
        }
    })
    .await;
    let trail = Trail::new();
    let mport = free_port();
    // Batches of 4: the second one gets HALF.
    let yaml = trail.yaml(mport).replace("batch: 3", "batch: 4");
    let gw = scripted_gateway_with_reads(&up, &yaml, 10).await;
    trail.settle(&gw).await;

    let sent: Vec<Vec<String>> = up
        .received()
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| {
            assert_eq!(r.target, "/fhir");
            assert_eq!(r.header("prefer"), Some("return=minimal"));
            assert!(r
                .header("content-type")
                .is_some_and(|c| c.starts_with("application/fhir+json")));
            bundle_ids(&r.body)
        })
        .collect();
    assert!(sent.len() >= 3, "{sent:?}");
    // The refused batch is sent again whole; the half-taken one continues at its first entry
    // to send again: the refused entry is not repeated.
    assert_eq!(sent[1], sent[0], "{sent:?}");
    assert_eq!(sent[2][0], sent[1][2], "{sent:?}");
    assert!(!sent[2..].iter().flatten().any(|id| *id == sent[1][1]));
    // Every record arrived (taken or refused for good), none other.
    let records = trail.record_ids();
    assert!(records.len() >= 10);
    let mut arrived: Vec<String> = sent[1..].iter().flatten().cloned().collect();
    arrived.sort();
    arrived.dedup();
    let mut want = records.clone();
    want.sort();
    assert_eq!(arrived, want);
    let text = metrics_text(mport, &gw).await;
    assert_eq!(
        metric_value(&text, "fhirgw_audit_fhir_total{stage=\"rejected\"}"),
        1.0
    );
    assert!(metric_value(&text, "fhirgw_audit_fhir_total{stage=\"failed\"}") >= 2.0);
    assert_eq!(metric_value(&text, "fhirgw_audit_fhir_unsent_bytes"), 0.0);
    let refused_seq = sent[1][1].rsplit('-').next().unwrap();
    gw.log_line(
        &format!("refused record {refused_seq} (400)"),
        Duration::from_secs(5),
    )
    .await;

    // Killed and started again: it continues from its cursor, nothing sent twice.
    drop(gw);
    let before = up.received().iter().filter(|r| r.method == "POST").count();
    let gw = scripted_gateway_with_reads(&up, &yaml, 2).await;
    trail.settle(&gw).await;
    let after: Vec<String> = up
        .received()
        .iter()
        .filter(|r| r.method == "POST")
        .skip(before)
        .flat_map(|r| bundle_ids(&r.body))
        .collect();
    let new: Vec<String> = trail
        .record_ids()
        .into_iter()
        .filter(|id| !records.contains(id))
        .collect();
    assert_eq!(new.len(), 2);
    assert_eq!(after, new);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trail_rotated_mid_stream_reaches_the_server_whole() {
    require_peer(&format!("{SEKMET_AUTH}/metadata")).await;
    let trail = Trail::new();
    let gw = Gateway::start_env(
        &format!(
            "upstream:\n  url: {SEKMET_AUTH}\n  identity:\n    type: static_bearer\n    token: \"${{GW_UPSTREAM_TOKEN}}\"\nauth:\n  mode: insecure_dev\n{}",
            // Slow enough that the sink is behind when the file is moved.
            trail.yaml(free_port()).replace("interval_ms: 200", "interval_ms: 3000")
        ),
        &[("GW_UPSTREAM_TOKEN", SEKMET_AUTH_TOKEN)],
    )
    .await;
    let get = |n: usize| {
        let url = format!("{}/metadata?n={n}", gw.base());
        async move {
            let r = client().get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    // The sink has taken the file once (it holds it open from then on)...
    get(0).await;
    trail.settle(&gw).await;
    // ...and is behind when it is moved.
    for n in 1..3 {
        get(n).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while trail
        .lines()
        .iter()
        .filter(|l| l.get("event").is_some())
        .count()
        < 3
    {
        assert!(
            Instant::now() < deadline,
            "records not written\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        trail.cursor() < trail.len(),
        "the sink is not behind: the test shows nothing"
    );
    // Moved aside as logrotate does (no copytruncate) while the sink is behind; more records
    // then go to a new file.
    let old = trail.dir.join("audit.jsonl.1");
    std::fs::rename(&trail.file, &old).unwrap();
    for n in 3..8 {
        get(n).await;
    }
    let new_inode = || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&trail.file).ok().map(|m| m.ino())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(trail.cursor_inode() == new_inode() && trail.cursor() == trail.len()) {
        assert!(
            Instant::now() < deadline,
            "the sink did not take the new file: cursor {:?} {}, file {:?} {}\n{}",
            trail.cursor_inode(),
            trail.cursor(),
            new_inode(),
            trail.len(),
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut records: Vec<Value> = lines_of(&old);
    records.extend(trail.lines());
    let records: Vec<&Value> = records
        .iter()
        .filter(|l| l.get("event").is_some())
        .collect();
    assert_eq!(records.len(), 8, "{records:#?}");
    for rec in records {
        let id = id_of(&trail.instance, rec["seq"].as_u64().unwrap());
        let (st, _) = auth_get(&format!("{SEKMET_AUTH}/AuditEvent/{id}")).await;
        assert_eq!(st, 200, "{id} is not on the server\n{}", gw.log());
    }
    gw.log_line(
        "was moved aside (rotated) and read to its end",
        Duration::from_secs(1),
    )
    .await;
}

#[test]
fn config_check_refuses_a_bad_fhir_sink() {
    let trail = Trail::new();
    let base = format!(
        "listen:\n  - addr: 127.0.0.1:18099\nupstream:\n  url: http://127.0.0.1:8090/fhir\nauth:\n  mode: insecure_dev\naudit:\n  file: {}\n  key_file: {}\n  fhir:\n",
        trail.file.display(),
        trail.key.display()
    );
    for (extra, says) in [
        ("    batch: 0\n", "audit.fhir.batch"),
        ("    interval_ms: 5\n", "audit.fhir.interval_ms"),
        ("    cursor: relative/cursor\n", "audit.fhir.cursor"),
        ("    cursor: /no/such/dir/cursor\n", "audit.fhir.cursor"),
        ("    topic: x\n", "topic"),
    ] {
        let (code, out, err) = check_config(&format!("{base}{extra}"), &[]);
        assert_ne!(code, 0, "{extra}: accepted\n{out}{err}");
        assert!(format!("{out}{err}").contains(says), "{extra}: {out}{err}");
    }
    let (code, out, err) = check_config(&format!("{base}    batch: 50\n"), &[]);
    assert_eq!(code, 0, "{out}{err}");
}
