//! PublishFHIREvent end to end: SEKMET behind the gateway, events on the real tansu broker
//! (consumed and compared), broker outages, a SIGKILLed gateway, and cross-instance cache
//! invalidation through the topic.

mod common;

use common::broker::*;
use common::idp::*;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

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

fn summary(e: &Event) -> (String, String, String, String) {
    let v = &e.value;
    (
        v["action"].as_str().unwrap_or("?").to_string(),
        v["resourcetype"].as_str().unwrap_or("?").to_string(),
        v["id"].as_str().unwrap_or("?").to_string(),
        e.key.clone(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn every_write_shape_publishes_exactly_its_events() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let topic = format!("t-{}", uniq());
    ensure_topic(SHARED_BROKER, &topic);
    // The events are compared in order: one partition.
    assert_eq!(topic_partitions(SHARED_BROKER, &topic), Some(vec![0]));
    let spool = spool_dir();
    let gw = jwt_gateway(&format!(
        "post:\n  - name: PublishFHIREvent\n{}",
        events_yaml(SHARED_BROKER, &topic, &spool)
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
    // The answer to a write goes out as the server's bytes (the event reads a cut-down parse
    // of it): SEKMET's escape stays an escape, its key order stays, as its own read shows.
    let raw = format!(
        r#"{{"resourceType":"Observation","status":"final","code":{{"text":"t\u00e9 {m}"}},"subject":{{"reference":"Patient/{pid}"}}}}"#
    );
    let r = client()
        .post(format!("{}/Observation", gw.base()))
        .bearer_auth(&w)
        .header("Content-Type", "application/fhir+json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let answer = r.text().await.unwrap();
    assert!(answer.contains(r"t\u00e9"), "{answer}");
    let escaped: Value = serde_json::from_str(&answer).unwrap();
    let esc_id = escaped["id"].as_str().unwrap().to_string();
    let direct = client()
        .get(format!("{}/Observation/{esc_id}", sekmet_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(answer, direct);
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
        ("Created", "Observation", esc_id, pk.clone()),
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
    let got = consume(
        SHARED_BROKER,
        &topic,
        expected.len() + 1,
        Duration::from_secs(15),
    );
    let got_s: Vec<_> = got.iter().map(summary).collect();
    let want: Vec<_> = expected
        .iter()
        .map(|(a, t, i, k)| (a.to_string(), t.to_string(), i.clone(), k.clone()))
        .collect();
    assert_eq!(got_s, want, "events on the topic\n{}", gw.log());
    // The predecessor's fields plus who, where from, and the correlation id.
    let (first, cid) = (&got[0].value, &got[0].correlation_id);
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

/// One series of the gateway's metrics (0 when absent).
async fn metric(gw: &Gateway, metrics_port: u16, name: &str) -> f64 {
    metric_value(&metrics_text(metrics_port, gw).await, name)
}

/// Distinct (correlation id, resource id, version) of `Created` events.
fn distinct(events: &[Event]) -> BTreeSet<(String, String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e.correlation_id.clone(),
                e.value["id"].as_str().unwrap_or("").to_string(),
                e.value["version"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_loses_no_event() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let mut broker = Broker::start(free_port(), "events", None);
    let spool = spool_dir();
    let metrics_port = free_port();
    let mut gw = jwt_gateway(&format!(
        "post:\n  - name: PublishFHIREvent\nmetrics:\n  listen: 127.0.0.1:{metrics_port}\n{}",
        events_yaml(&broker.bootstrap(), "events", &spool)
    ))
    .await;
    let w = token("writer-app").await;
    broker.stop();
    let mark = format!("out-{}", uniq());
    let ids = created(
        &gw,
        &write_many(&gw, &w, 1000, 16, &mark).await,
        "a client saw an error while the broker was down",
    );
    assert_eq!(ids.iter().collect::<BTreeSet<_>>().len(), 1000);
    // They wait in the spool, and the metrics say so.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&gw, metrics_port, "fhirgw_events_spool_depth").await < 1000.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(&gw, metrics_port, "fhirgw_events_spool_depth").await,
        1000.0
    );
    assert_eq!(
        metric(&gw, metrics_port, "fhirgw_events_total{stage=\"spooled\"}").await,
        1000.0
    );
    broker.restart();
    let mut all = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while distinct(&all).len() < 1000 && Instant::now() < deadline {
        all = consume(
            &broker.bootstrap(),
            "events",
            100_000,
            Duration::from_secs(3),
        );
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
    while metric(&gw, metrics_port, "fhirgw_events_spool_depth").await > 0.0
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        metric(&gw, metrics_port, "fhirgw_events_spool_depth").await,
        0.0,
        "delivered entries are trimmed"
    );
    assert!(
        metric(
            &gw,
            metrics_port,
            "fhirgw_events_total{stage=\"delivered\"}"
        )
        .await
            >= 1000.0
    );
    assert_eq!(
        metric(
            &gw,
            metrics_port,
            "fhirgw_events_total{stage=\"dropped_queue_full\"}"
        )
        .await,
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
    let mut broker = Broker::start(free_port(), "events", None);
    broker.stop();
    let spool = spool_dir();
    let conf = format!(
        "post:\n  - name: PublishFHIREvent\n{}",
        events_yaml(&broker.bootstrap(), "events", &spool)
    );
    let mut gw = jwt_gateway(&conf).await;
    let w = token("writer-app").await;
    let mark = format!("kill-{}", uniq());
    let ids = created(
        &gw,
        &write_many(&gw, &w, 50, 16, &mark).await,
        "a client saw an error while the broker was down",
    );
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
    let all = consume(&broker.bootstrap(), "events", 50, Duration::from_secs(60));
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
    ensure_topic(SHARED_BROKER, &topic);
    let chain = |spool: &std::path::Path| {
        format!(
            "policy:\n  read: [Reader, Administrator, Practitioner]\n  write: [Writer, Administrator]\npost:\n  - name: PublishFHIREvent\n  - name: ParticipantFilter\n  - name: ConsentOptOut\n    settings: {{category: \"http://loinc.org|59284-0\", cache_ttl_minutes: 30}}\n{}",
            events_yaml(SHARED_BROKER, &topic, spool)
        )
    };
    let (sa, sb) = (spool_dir(), spool_dir());
    let a = jwt_gateway(&chain(&sa)).await;
    let metrics_b = free_port();
    let b = jwt_gateway(&format!(
        "metrics:\n  listen: 127.0.0.1:{metrics_b}\n{}",
        chain(&sb)
    ))
    .await;
    // B's consumer assigns its partition at startup, from the end: wait until it reads.
    wait_consuming(&b, metrics_b, SHARED_BROKER, &topic).await;
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
    ensure_topic(SHARED_BROKER, &topic);
    let spool = spool_dir();
    let conf = format!(
        "post:\n  - name: PublishFHIREvent\n{}",
        events_yaml(SHARED_BROKER, &topic, &spool)
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
    assert!(consume(SHARED_BROKER, &topic, 1, Duration::from_secs(1)).is_empty());
    old.child.kill().unwrap();
    let _ = old.child.wait();
    let got = consume(SHARED_BROKER, &topic, 1, Duration::from_secs(15));
    assert_eq!(got.len(), 1, "{}", new.log());
    assert_eq!(got[0].value["id"], p["id"]);
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
