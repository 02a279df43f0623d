//! The processor chain and the request-side modules against the real SEKMET server:
//! TransformBundle, EverythingPatient, DateSort, and the samples.

mod common;

use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;

async fn gateway_with(chains: &str) -> Gateway {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    Gateway::start(&format!(
        "upstream:\n  url: {}\nauth:\n  mode: insecure_dev\n{chains}",
        sekmet_url()
    ))
    .await
}

/// Direct to SEKMET (setup and oracle, not under test).
async fn direct_post(path: &str, body: &Value) -> Value {
    let r = client()
        .post(format!("{}/{path}", sekmet_url()))
        .header("Content-Type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "setup POST {path}: {}", r.status());
    r.json().await.unwrap()
}

async fn direct_get(path: &str) -> Value {
    let r = client()
        .get(format!("{}/{path}", sekmet_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "setup GET {path}");
    r.json().await.unwrap()
}

async fn count(path: &str) -> u64 {
    direct_get(path).await["total"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn transform_bundle_turns_a_transaction_into_a_batch_that_keeps_references() {
    let gw = gateway_with("pre:\n  - name: TransformBundle\n    settings: {mode: always}\n").await;
    let mark = uniq();
    // An existing Patient the conditional create will match.
    direct_post(
        "Patient",
        &json!({"resourceType":"Patient","identifier":[{"system":"urn:test:mrn","value":format!("{mark}-existing")}]}),
    )
    .await;
    let tx = json!({"resourceType":"Bundle","type":"transaction","entry":[
        {"fullUrl":"urn:uuid:5f3c6f1e-1111-4c7b-9d2a-000000000001",
         "resource":{"resourceType":"Patient","name":[{"family":format!("Tb{mark}")}]},
         "request":{"method":"POST","url":"Patient"}},
        {"fullUrl":"urn:uuid:5f3c6f1e-1111-4c7b-9d2a-000000000002",
         "resource":{"resourceType":"Patient","identifier":[{"system":"urn:test:mrn","value":format!("{mark}-existing")}]},
         "request":{"method":"POST","url":"Patient","ifNoneExist":format!("identifier=urn:test:mrn|{mark}-existing")}},
        {"fullUrl":"urn:uuid:5f3c6f1e-1111-4c7b-9d2a-000000000003",
         "resource":{"resourceType":"Observation","status":"final","code":{"text":format!("obs-{mark}")},
                     "subject":{"reference":"urn:uuid:5f3c6f1e-1111-4c7b-9d2a-000000000001"},
                     "performer":[{"reference":"urn:uuid:5f3c6f1e-1111-4c7b-9d2a-000000000002"}]},
         "request":{"method":"POST","url":"Observation"}}
    ]});
    let rid = format!("tb-{mark}");
    let r = client()
        .post(gw.base())
        .header("Content-Type", "application/fhir+json")
        .header("X-Request-Id", &rid)
        .body(tx.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    assert_no_upstream_address(&headers, &body, &sekmet_url());
    let resp: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(resp["type"], "transaction-response", "the client's meaning");

    // What SEKMET received: a batch of PUTs, the conditional create resolved to a read.
    let rec = sekmet_received(&rid);
    let sent = rec
        .iter()
        .find(|x| x["method"] == "POST" && x["url"] == "/fhir")
        .expect("the batch");
    let sent: Value = serde_json::from_str(sent["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["type"], "batch");
    assert_eq!(sent["entry"][0]["request"]["method"], "PUT");
    // The create stays a create: a fresh id, not the client's UUID.
    let new_id = sent["entry"][0]["request"]["url"]
        .as_str()
        .unwrap()
        .strip_prefix("Patient/")
        .unwrap()
        .to_string();
    assert_ne!(new_id, "5f3c6f1e-1111-4c7b-9d2a-000000000001");
    assert_eq!(sent["entry"][1]["request"]["method"], "GET");
    assert!(
        rec.iter().any(|x| x["url"]
            .as_str()
            .unwrap()
            .starts_with("/fhir/Patient?identifier=")),
        "the condition was searched"
    );

    // Read back at SEKMET: the Observation references the new Patient and the existing one.
    let existing = direct_get(&format!("Patient?identifier=urn:test:mrn|{mark}-existing")).await;
    assert_eq!(
        existing["total"], 1,
        "the conditional create made no duplicate"
    );
    let existing_id = existing["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let obs = direct_get(&format!("Observation?code:text=obs-{mark}")).await;
    let o = &obs["entry"][0]["resource"];
    assert_eq!(
        o["subject"]["reference"],
        format!("Patient/{new_id}").as_str()
    );
    assert_eq!(
        o["performer"][0]["reference"],
        format!("Patient/{existing_id}").as_str()
    );
    direct_get(&format!("Patient/{new_id}")).await;
}

async fn post_bundle(gw: &Gateway, bundle: &Value, rid: &str) -> (u16, Value) {
    let r = client()
        .post(gw.base())
        .header("Content-Type", "application/fhir+json")
        .header("X-Request-Id", rid)
        .body(bundle.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A transaction that creates a Patient under `uuid`, family `family`; `then` entries after it.
fn create_tx(uuid: &str, family: &str, then: &[Value]) -> Value {
    let mut entries = vec![json!({"fullUrl": format!("urn:uuid:{uuid}"),
        "resource": {"resourceType": "Patient", "name": [{"family": family}]},
        "request": {"method": "POST", "url": "Patient"}})];
    entries.extend(then.iter().cloned());
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

/// Issue 14: TransformBundle keeps a transaction's meaning. `auto` (the default) leaves it to
/// SEKMET, which runs transactions: atomic, and a create is a create. `always` converts, and a
/// converted create gets a fresh id, so a reused or guessed `urn:uuid` never overwrites.
#[tokio::test(flavor = "multi_thread")]
async fn transactions_stay_atomic_and_creates_stay_creates() {
    let auto = gateway_with("pre:\n  - name: TransformBundle\n").await;
    let mark = uniq();
    let uuid = uuid::Uuid::new_v4().to_string();
    // Two transactions reusing one urn:uuid: two Patients.
    for i in 0..2 {
        let rid = format!("tx-auto-{mark}-{i}");
        let (status, body) =
            post_bundle(&auto, &create_tx(&uuid, &format!("Re{mark}"), &[]), &rid).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["type"], "transaction-response");
        let sent = sekmet_received(&rid);
        let sent = sent
            .iter()
            .find(|x| x["url"] == "/fhir")
            .expect("the transaction");
        let sent: Value = serde_json::from_str(sent["body"].as_str().unwrap()).unwrap();
        assert_eq!(sent["type"], "transaction", "passed as sent");
    }
    assert_eq!(count(&format!("Patient?family=Re{mark}")).await, 2);
    // A failing entry: the server's 4xx, and nothing of the transaction is written.
    let bad_put = json!({"resource": {"resourceType": "Patient", "id": "not-this-one"},
                         "request": {"method": "PUT", "url": format!("Patient/other-{mark}")}});
    let (status, body) = post_bundle(
        &auto,
        &create_tx(
            &uuid::Uuid::new_v4().to_string(),
            &format!("Fail{mark}"),
            &[bad_put],
        ),
        &format!("tx-fail-{mark}"),
    )
    .await;
    assert!((400..500).contains(&status), "{status} {body}");
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    assert_eq!(
        count(&format!("Patient?family=Fail{mark}")).await,
        0,
        "nothing written"
    );

    // Converted: still two Patients for a reused urn:uuid, neither under the client's UUID.
    let always =
        gateway_with("pre:\n  - name: TransformBundle\n    settings: {mode: always}\n").await;
    for i in 0..2 {
        let (status, body) = post_bundle(
            &always,
            &create_tx(&uuid, &format!("Al{mark}"), &[]),
            &format!("tx-al-{mark}-{i}"),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let made = direct_get(&format!("Patient?family=Al{mark}")).await;
    assert_eq!(made["total"], 2);
    for e in made["entry"].as_array().unwrap() {
        assert_ne!(e["resource"]["id"], uuid.as_str());
    }
    // A urn:uuid naming an existing resource (another patient's) does not overwrite it.
    let victim = format!("victim-{mark}");
    let r = client()
        .put(format!("{}/Patient/{victim}", sekmet_url()))
        .header("Content-Type", "application/fhir+json")
        .body(
            json!({"resourceType": "Patient", "id": victim, "name": [{"family": "Victim"}]})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let attack = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": format!("urn:uuid:{victim}"),
         "resource": {"resourceType": "Patient", "id": victim, "name": [{"family": format!("Attacker{mark}")}]},
         "request": {"method": "POST", "url": "Patient"}}]});
    let (status, body) = post_bundle(&always, &attack, &format!("tx-attack-{mark}")).await;
    assert_eq!(status, 200, "{body}");
    let v = direct_get(&format!("Patient/{victim}")).await;
    assert_eq!(v["name"][0]["family"], "Victim", "not overwritten");
    assert_eq!(v["meta"]["versionId"], "1");
    assert_eq!(
        count(&format!("Patient?family=Attacker{mark}")).await,
        1,
        "created anew"
    );
}

/// Issue 14: a converted transaction (`always`) is still all or nothing. The server runs it as
/// a batch; when an entry fails, the gateway deletes what the others created and restores what
/// they updated or deleted, and answers the failing entry's 4xx naming it.
#[tokio::test(flavor = "multi_thread")]
async fn a_converted_transaction_with_a_failing_entry_leaves_nothing_written() {
    let gw = gateway_with("pre:\n  - name: TransformBundle\n    settings: {mode: always}\n").await;
    let mark = uniq();
    let (keep, doomed) = (format!("keep-{mark}"), format!("doomed-{mark}"));
    put_direct(
        &format!("Patient/{keep}"),
        &json!({"resourceType":"Patient","id":keep,"name":[{"family":"Keep"}],"active":true}),
    )
    .await;
    put_direct(
        &format!("Patient/{doomed}"),
        &json!({"resourceType":"Patient","id":doomed,"name":[{"family":"Doomed"}]}),
    )
    .await;
    let update = json!({"resource":{"resourceType":"Patient","id":keep,"name":[{"family":"Changed"}]},
                        "request":{"method":"PUT","url":format!("Patient/{keep}")}});
    let delete = json!({"request":{"method":"DELETE","url":format!("Patient/{doomed}")}});
    // SEKMET refuses this entry: its id does not match its URL.
    let failing = json!({"resource":{"resourceType":"Patient","id":"not-this-one"},
                         "request":{"method":"PUT","url":format!("Patient/other-{mark}")}});
    let tx = create_tx(
        &uuid::Uuid::new_v4().to_string(),
        &format!("New{mark}"),
        &[update.clone(), delete.clone(), failing],
    );
    let rid = format!("tx-undo-{mark}");
    let (status, body) = post_bundle(&gw, &tx, &rid).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    let d = body["issue"][0]["diagnostics"].as_str().unwrap();
    assert!(d.contains("entry 3 (PUT Patient/other-"), "{d}");
    assert!(d.contains("3 written entries undone"), "{d}");

    // SEKMET ran the batch (pinned to the versions found) and then the undo.
    let rec = sekmet_received(&rid);
    let batch = rec
        .iter()
        .find(|x| x["method"] == "POST" && x["url"] == "/fhir")
        .expect("the batch");
    let batch: Value = serde_json::from_str(batch["body"].as_str().unwrap()).unwrap();
    assert_eq!(batch["type"], "batch");
    assert_eq!(batch["entry"][1]["request"]["ifMatch"], "W/\"1\"");
    assert_eq!(batch["entry"][2]["request"]["ifMatch"], "W/\"1\"");
    let created = batch["entry"][0]["request"]["url"].as_str().unwrap();
    assert!(
        rec.iter()
            .any(|x| x["method"] == "DELETE" && x["url"] == format!("/fhir/{created}")),
        "the create was undone: {rec:?}"
    );

    // Read back: nothing of the transaction remains.
    assert_eq!(count(&format!("Patient?family=New{mark}")).await, 0);
    let k = direct_get(&format!("Patient/{keep}")).await;
    assert_eq!(k["name"][0]["family"], "Keep", "update undone: {k}");
    assert_eq!(k["active"], true);
    assert_eq!(k["meta"]["versionId"], "3", "restored as a new version");
    let g = direct_get(&format!("Patient/{doomed}")).await;
    assert_eq!(g["name"][0]["family"], "Doomed", "delete undone: {g}");

    // The same entries without the failing one: a transaction-response, all of it written.
    let tx = create_tx(
        &uuid::Uuid::new_v4().to_string(),
        &format!("New{mark}"),
        &[update, delete],
    );
    let (status, body) = post_bundle(&gw, &tx, &format!("tx-ok-{mark}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["type"], "transaction-response");
    let statuses: Vec<&str> = body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert!(statuses[0].starts_with("201"), "{statuses:?}");
    assert!(statuses[1].starts_with("200"), "{statuses:?}");
    assert_eq!(count(&format!("Patient?family=New{mark}")).await, 1);
    let k = direct_get(&format!("Patient/{keep}")).await;
    assert_eq!(k["name"][0]["family"], "Changed");
    let r = client()
        .get(format!("{}/Patient/{doomed}", sekmet_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 410, "deleted");
}

#[tokio::test(flavor = "multi_thread")]
async fn ambiguous_conditions_are_412_and_malformed_bundles_400_with_nothing_written() {
    let gw = gateway_with("pre:\n  - name: TransformBundle\n    settings: {mode: always}\n").await;
    let mark = uniq();
    for _ in 0..2 {
        direct_post(
            "Patient",
            &json!({"resourceType":"Patient","identifier":[{"system":"urn:test:dup","value":mark}]}),
        )
        .await;
    }
    let tx = json!({"resourceType":"Bundle","type":"transaction","entry":[
        {"fullUrl":"urn:uuid:aaaaaaaa-2222-4c7b-9d2a-000000000001",
         "resource":{"resourceType":"Patient","name":[{"family":format!("Amb{mark}")}]},
         "request":{"method":"POST","url":"Patient"}},
        {"resource":{"resourceType":"Patient"},
         "request":{"method":"POST","url":"Patient","ifNoneExist":format!("identifier=urn:test:dup|{mark}")}}
    ]});
    let r = client()
        .post(gw.base())
        .header("Content-Type", "application/fhir+json")
        .body(tx.to_string())
        .send()
        .await
        .unwrap();
    let v = assert_outcome(r, 412, "multiple-matches").await;
    assert!(
        v["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("entry 1"),
        "{v}"
    );
    assert_eq!(
        count(&format!("Patient?family=Amb{mark}")).await,
        0,
        "nothing written"
    );

    for (what, body) in [
        ("bad JSON", "{\"resourceType\":\"Bundle\",".to_string()),
        (
            "entry without request",
            json!({"resourceType":"Bundle","type":"transaction","entry":[{"resource":{"resourceType":"Patient","name":[{"family":format!("Bad{mark}")}]}}]}).to_string(),
        ),
    ] {
        let rid = format!("bad-{}", uniq());
        let r = client()
            .post(gw.base())
            .header("Content-Type", "application/fhir+json")
            .header("X-Request-Id", &rid)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_outcome(r, 400, "invalid").await;
        assert_sekmet_never_received(&rid).await;
        let _ = what;
    }
    assert_eq!(
        count(&format!("Patient?family=Bad{mark}")).await,
        0,
        "nothing written"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn everything_patient_matches_the_servers_own_everything_and_passes_the_post_chain() {
    let gw = gateway_with(
        "pre:\n  - name: EverythingPatient\n    settings: {max: 5000, concurrency: 8}\npost:\n  - name: SamplePostProcess\n    settings: {system: \"urn:fhir-gateway:test\", code: everything}\n",
    )
    .await;
    // A patient with a visit, loaded from the committed carebundle sample (ids renamed to be
    // unique per run so other runs' data does not mix in).
    let mark = uniq();
    let raw = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fhir/mixed-7-0000.json"
    ))
    .unwrap();
    let bundle: Value =
        serde_json::from_str(&raw.replace("urn:uuid:", &format!("urn:uuid:{mark}-"))).unwrap();
    let resp = direct_post("", &bundle).await;
    let pid = resp["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["location"].as_str().unwrap())
        .find(|l| l.starts_with("Patient/") || l.contains("/Patient/"))
        .map(|l| {
            l.split("Patient/")
                .nth(1)
                .unwrap()
                .split('/')
                .next()
                .unwrap()
                .to_string()
        })
        .expect("a Patient in the sample");

    let ids = |b: &Value| -> BTreeSet<String> {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["search"]["mode"] != "outcome")
            .map(|e| {
                format!(
                    "{}/{}",
                    e["resource"]["resourceType"].as_str().unwrap(),
                    e["resource"]["id"].as_str().unwrap()
                )
            })
            .collect()
    };
    let native = direct_get(&format!("Patient/{pid}/$everything")).await;
    let r = client()
        .get(format!("{}/Patient/{pid}/$everything", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    assert_no_upstream_address(&headers, &body, &sekmet_url());
    let ours: Value = serde_json::from_slice(&body).unwrap();
    let (a, b) = (ids(&ours), ids(&native));
    assert!(a.len() > 10, "a real compartment: {}", a.len());
    assert_eq!(a, b, "same resources as SEKMET's own $everything");
    // The post chain ran on the module's answer.
    for e in ours["entry"].as_array().unwrap() {
        assert_eq!(e["resource"]["meta"]["tag"][0]["code"], "everything", "{e}");
        assert!(e["fullUrl"].as_str().unwrap().starts_with(&gw.base()));
    }
    // A missing patient is a 404.
    let r = client()
        .get(format!(
            "{}/Patient/does-not-exist-{mark}/$everything",
            gw.base()
        ))
        .send()
        .await
        .unwrap();
    assert_outcome(r, 404, "not-found").await;
}

async fn seed_observations(pid: &str, dates: &[Option<&str>]) {
    for (i, d) in dates.iter().enumerate() {
        let mut o = json!({"resourceType":"Observation","status":"final","code":{"text":format!("seq-{i}")},"subject":{"reference":format!("Patient/{pid}")}});
        if let Some(d) = d {
            o["effectiveDateTime"] = json!(d);
        }
        direct_post("Observation", &o).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn date_sort_merges_every_page_in_order_without_next() {
    let gw = gateway_with("post:\n  - name: DateSort\n    settings: {max: 5000}\n").await;
    let p = direct_post("Patient", &json!({"resourceType":"Patient"})).await;
    let pid = p["id"].as_str().unwrap().to_string();
    let dates = [
        Some("2021-03-01"),
        Some("2019-01-01T10:00:00Z"),
        None,
        Some("2023-07-15T08:30:00+02:00"),
        Some("2020"),
        Some("2022-12-31"),
        Some("2019-01-01T09:00:00Z"),
    ];
    seed_observations(&pid, &dates).await;
    for (sort, desc) in [("date", false), ("-date", true)] {
        let r = client()
            .get(format!(
                "{}/Observation?subject=Patient/{pid}&_sort={sort}&_count=2",
                gw.base()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let headers = r.headers().clone();
        let body = r.bytes().await.unwrap();
        assert_no_upstream_address(&headers, &body, &sekmet_url());
        let b: Value = serde_json::from_slice(&body).unwrap();
        let got: Vec<Option<String>> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                e["resource"]["effectiveDateTime"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(got.len(), 7, "every page merged: {got:?}");
        let mut expected = vec![
            "2019-01-01T09:00:00Z",
            "2019-01-01T10:00:00Z",
            "2020",
            "2021-03-01",
            "2022-12-31",
            "2023-07-15T08:30:00+02:00",
        ];
        if desc {
            expected.reverse();
        }
        let mut expected: Vec<Option<String>> =
            expected.into_iter().map(|s| Some(s.to_string())).collect();
        expected.push(None); // missing dates last
        assert_eq!(got, expected, "{sort}");
        assert!(b["link"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["relation"] != "next"));
        assert_eq!(b["total"], 7);
    }
    // Over the max: cut, with a warning entry.
    drop(gw);
    let gw = gateway_with("post:\n  - name: DateSort\n    settings: {max: 4}\n").await;
    let b: Value = client()
        .get(format!(
            "{}/Observation?subject=Patient/{pid}&_sort=date&_count=2",
            gw.base()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let e = b["entry"].as_array().unwrap();
    assert_eq!(e.len(), 5);
    assert_eq!(e[4]["search"]["mode"], "outcome");
    assert_eq!(e[4]["resource"]["issue"][0]["severity"], "warning");
    assert!(b.get("total").is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pre_module_rewrites_the_query_seen_by_sekmet_and_streaming_stays_on() {
    let gw =
        gateway_with("pre:\n  - name: SamplePreProcess\n    settings: {default_count: 7}\n").await;
    let rid = format!("cnt-{}", uniq());
    let r = client()
        .get(format!("{}/Patient?name=zz", gw.base()))
        .header("X-Request-Id", &rid)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // No module needs the body: the answer streamed (the access log names the road).
    assert_eq!(road_of(&gw, &rid).await, "stream");
    let rec = sekmet_received(&rid);
    assert_eq!(rec[0]["url"], "/fhir/Patient?name=zz&_count=7");
    let rid = format!("cnt-{}", uniq());
    client()
        .get(format!("{}/Patient?_count=3", gw.base()))
        .header("X-Request-Id", &rid)
        .send()
        .await
        .unwrap();
    assert_eq!(
        sekmet_received(&rid)[0]["url"],
        "/fhir/Patient?_count=3",
        "left alone"
    );
}

/// A headers-only post module (ResponseHeaders) keeps the answer streaming and changes its
/// head; next to a module that needs the body, the buffered answer gets the same head.
#[tokio::test(flavor = "multi_thread")]
async fn a_headers_only_module_changes_streamed_and_buffered_heads_alike() {
    let headers = "  - name: ResponseHeaders\n    settings:\n      set: {Cache-Control: no-store, X-Content-Type-Options: nosniff}\n      remove: [Vary]\n";
    let direct = client()
        .get(format!("{}/metadata", sekmet_url()))
        .send()
        .await
        .unwrap();
    assert!(direct.headers().get("vary").is_some(), "SEKMET sends Vary");
    let streamed = gateway_with(&format!("post:\n{headers}")).await;
    let buffered = gateway_with(&format!(
        "post:\n{headers}  - name: SamplePostProcess\n    settings: {{system: 'urn:t', code: c}}\n"
    ))
    .await;
    for (gw, road) in [(&streamed, "stream"), (&buffered, "buffered")] {
        let rid = format!("hdr-{}", uniq());
        let r = client()
            .get(format!("{}/Patient?_count=2", gw.base()))
            .header("X-Request-Id", &rid)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{road}");
        let h = r.headers();
        assert_eq!(h["cache-control"], "no-store", "{road}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{road}");
        assert!(h.get("vary").is_none(), "{road}: removed");
        assert_eq!(
            h["x-request-id"],
            rid.as_str(),
            "{road}: the gateway's own stay"
        );
        assert!(
            h["content-type"].to_str().unwrap().contains("fhir+json"),
            "{road}"
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["resourceType"], "Bundle", "{road}");
        assert_eq!(road_of(gw, &rid).await, road);
        // SEKMET saw the read as sent: the module works on the answer only.
        assert_eq!(sekmet_received(&rid)[0]["url"], "/fhir/Patient?_count=2");
    }
    // A write body is read whole on every route: the head is changed on that road too.
    let rid = format!("hdr-{}", uniq());
    let r = client()
        .post(format!("{}/Patient", streamed.base()))
        .header("X-Request-Id", &rid)
        .header("Content-Type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","name":[{"family":"Headers"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["cache-control"], "no-store");
    assert!(
        r.headers().get("location").is_some(),
        "the server's own stay"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn module_metrics_are_exported() {
    let mport = free_port();
    let gw = gateway_with(&format!(
        "metrics:\n  listen: 127.0.0.1:{mport}\npre:\n  - name: SamplePreProcess\npost:\n  - name: SamplePostProcess\n    settings: {{system: \"urn:t\", code: m}}\n"
    ))
    .await;
    let r = client()
        .get(format!("{}/Patient?name=metrics", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["resourceType"], "Bundle");
    let text = client()
        .get(format!("http://127.0.0.1:{mport}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains(r#"fhirgw_module_calls_total{kind="pre",module="SamplePreProcess",outcome="continue",route="/fhir"} 1"#), "{text}");
    assert!(text.contains(r#"module="SamplePostProcess""#), "{text}");
    assert!(text.contains("fhirgw_requests_total"), "{text}");
}
