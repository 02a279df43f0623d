//! Nested R4 Consent provisions against SEKMET (issue 14): the root provision's type is the
//! base and nested provisions are exceptions to it, judged per resource and per caller. A
//! permit with a nested deny for one practitioner and one period withholds the patient's data
//! from that practitioner only (an expired nested deny withholds nothing); a deny with a nested
//! permit for one data reference shows that one resource and nothing else. Searches and reads
//! through the gateway, with IdP-signed tokens, both filters on the route.

mod common;

use common::idp::*;
use common::*;
use serde_json::{json, Value};

fn consent(id: &str, patient: &str, provision: Value) -> Value {
    json!({"resourceType": "Consent", "id": id, "status": "active",
           "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                 "code": "patient-privacy"}]},
           "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
           "patient": {"reference": format!("Patient/{patient}")},
           "provision": provision})
}

fn actor(r: &str) -> Value {
    json!({"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "PRCP"}]},
           "reference": {"reference": r}})
}

/// A patient with two Observations, both practitioners of record, and the Consent.
async fn seed(run: &str, tag: &str, doctors: &[&str], provision: impl Fn(&str) -> Value) -> String {
    let p = format!("{run}-{tag}");
    put_direct(
        &format!("Patient/{p}"),
        json!({"resourceType": "Patient", "id": p,
               "generalPractitioner": doctors.iter()
                   .map(|d| json!({"reference": format!("Practitioner/{d}")})).collect::<Vec<_>>()}),
    )
    .await;
    for n in ["1", "2"] {
        put_direct(
            &format!("Observation/{p}-o{n}"),
            json!({"resourceType": "Observation", "id": format!("{p}-o{n}"), "status": "final",
                   "code": {"text": "consent provisions"},
                   "subject": {"reference": format!("Patient/{p}")}}),
        )
        .await;
    }
    put_direct(
        &format!("Consent/{p}-c"),
        consent(&format!("{p}-c"), &p, provision(&p)),
    )
    .await;
    p
}

/// The ids a search returns (matches only, sorted), and whether it says it was filtered.
async fn search(gw: &Gateway, tok: &str, q: &str) -> (Vec<String>, bool) {
    let r = client()
        .get(format!("{}/{q}", gw.base()))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{q}");
    let b: Value = r.json().await.unwrap();
    let entries = b["entry"].as_array().cloned().unwrap_or_default();
    let mut ids: Vec<String> = entries
        .iter()
        .filter(|e| e["search"]["mode"] != "outcome")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let notice = entries.iter().any(|e| {
        e["search"]["mode"] == "outcome"
            && e["resource"]["issue"][0]["diagnostics"]
                .as_str()
                .unwrap_or("")
                .starts_with("ConsentOptOut: ")
    });
    (ids, notice)
}

/// A read: the status, and for a refusal the module that refused.
async fn read(gw: &Gateway, tok: &str, key: &str) -> (u16, String) {
    let r = client()
        .get(format!("{}/{key}", gw.base()))
        .bearer_auth(tok)
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let b: Value = r.json().await.unwrap();
    if st == 200 {
        assert_eq!(b["id"], key.split('/').nth(1).unwrap(), "{key}");
        return (st, String::new());
    }
    assert_eq!(b["resourceType"], "OperationOutcome", "{key}: {b}");
    (
        st,
        b["issue"][0]["diagnostics"]
            .as_str()
            .unwrap_or("")
            .to_string(),
    )
}

fn ids(p: &str, which: &[&str]) -> Vec<String> {
    which.iter().map(|w| format!("{p}-{w}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nested_provisions_withhold_exactly_what_they_say() {
    let run = format!("cp{}", uniq());
    let (d1, d2) = (format!("{run}-d1"), format!("{run}-d2"));
    for d in [&d1, &d2] {
        put_direct(
            &format!("Practitioner/{d}"),
            json!({"resourceType": "Practitioner", "id": d}),
        )
        .await;
    }
    // A: permit, except d2 during a period that includes now; and d1 during one long past.
    let (d1r, d2r) = (format!("Practitioner/{d1}"), format!("Practitioner/{d2}"));
    let a = seed(&run, "a", &[&d1, &d2], |_| {
        json!({"type": "permit", "provision": [
            {"type": "deny", "actor": [actor(&d2r)],
             "period": {"start": "2020-01-01", "end": "2999-12-31"}},
            {"type": "deny", "actor": [actor(&d1r)],
             "period": {"start": "2000-01-01", "end": "2001-01-01"}}]})
    })
    .await;
    // B: deny, except the one Observation o1.
    let b = seed(&run, "b", &[&d1, &d2], |p| {
        json!({"type": "deny", "provision": [{"type": "permit", "data": [
            {"meaning": "instance", "reference": {"reference": format!("Observation/{p}-o1")}}]}]})
    })
    .await;

    let gw = jwt_gateway(
        "policy:\n  read: [Reader, Administrator, Patient, Practitioner]\n  write: [Writer, Administrator]\npost:\n  - name: ParticipantFilter\n    settings: {cache_ttl_secs: 30}\n  - name: ConsentOptOut\n    settings: {category: \"http://loinc.org|59284-0\", cache_ttl_minutes: 5}\n",
    )
    .await;
    let t1 = user_token(&format!("oid-{d1}"), &["Practitioner"], Some(&d1r));
    let t2 = user_token(&format!("oid-{d2}"), &["Practitioner"], Some(&d2r));
    let ta = user_token(
        &format!("oid-{a}"),
        &["Patient"],
        Some(&format!("Patient/{a}")),
    );
    let tb = user_token(
        &format!("oid-{b}"),
        &["Patient"],
        Some(&format!("Patient/{b}")),
    );
    let obs_of = |p: &str| format!("Observation?subject=Patient/{p}&_count=50");

    // Nested deny for d2 in force: d2 sees none of A's data, d1 (expired deny) all of it.
    assert_eq!(
        search(&gw, &t1, &obs_of(&a)).await,
        (ids(&a, &["o1", "o2"]), false)
    );
    assert_eq!(search(&gw, &t2, &obs_of(&a)).await, (vec![], true));
    for key in [format!("Observation/{a}-o1"), format!("Patient/{a}")] {
        assert_eq!(read(&gw, &t1, &key).await.0, 200, "{key}");
        let (st, why) = read(&gw, &t2, &key).await;
        assert_eq!(st, 403, "{key}");
        assert!(why.starts_with("ConsentOptOut: "), "{key}: {why}");
    }
    assert_eq!(
        search(&gw, &ta, &obs_of(&a)).await,
        (ids(&a, &["o1", "o2"]), false)
    );

    // Deny with a nested permit for o1: both practitioners see o1 and nothing else of B's
    // (not o2, not the Patient resource); B sees everything.
    for tok in [&t1, &t2] {
        assert_eq!(
            search(&gw, tok, &obs_of(&b)).await,
            (ids(&b, &["o1"]), true)
        );
        assert_eq!(read(&gw, tok, &format!("Observation/{b}-o1")).await.0, 200);
        for key in [format!("Observation/{b}-o2"), format!("Patient/{b}")] {
            let (st, why) = read(&gw, tok, &key).await;
            assert_eq!(st, 403, "{key}");
            assert!(why.starts_with("ConsentOptOut: "), "{key}: {why}");
        }
    }
    assert_eq!(
        search(&gw, &tb, &obs_of(&b)).await,
        (ids(&b, &["o1", "o2"]), false)
    );
    // One search over both patients: each resource judged by its own patient's Consent.
    let both = format!("Observation?subject=Patient/{a},Patient/{b}&_count=50");
    let mut want = ids(&b, &["o1"]);
    assert_eq!(search(&gw, &t2, &both).await, (want.clone(), true));
    want.extend(ids(&a, &["o1", "o2"]));
    want.sort();
    assert_eq!(search(&gw, &t1, &both).await, (want, true));
}
