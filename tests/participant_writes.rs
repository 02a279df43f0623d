//! Pitfall 21 against SEKMET: a participant allowed to write cannot create, update, patch or
//! delete data of a patient they may not see, nor move a resource into another patient's
//! compartment; refusals reach the server with nothing but the read of the current version,
//! and own writes (a patient's, a practitioner's for their patient, an Administrator's) work.

mod common;

use common::idp::*;
use common::*;
use serde_json::{json, Value};

fn obs(id: &str, subject: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
           "code": {"text": "pitfall 21"}, "subject": {"reference": subject}})
}

/// One request through the gateway: status, JSON body, correlation id.
async fn send(
    gw: &Gateway,
    method: &str,
    path: &str,
    token: &str,
    body: Option<(&str, Value)>,
) -> (u16, Value, String) {
    let rid = format!("pw-{}", uniq());
    let mut rq = client()
        .request(method.parse().unwrap(), format!("{}/{path}", gw.base()))
        .bearer_auth(token)
        .header("X-Request-Id", &rid);
    if let Some((ct, b)) = body {
        rq = rq.header("Content-Type", ct).body(b.to_string());
    }
    let r = rq.send().await.unwrap();
    let st = r.status().as_u16();
    let text = r.text().await.unwrap();
    (st, serde_json::from_str(&text).unwrap_or(Value::Null), rid)
}

fn json_body(v: Value) -> Option<(&'static str, Value)> {
    Some(("application/fhir+json", v))
}

/// A refusal: 403 naming the module and `says`, and SEKMET got no write for it (at most the
/// gateway's read of the current version).
async fn refused(what: &str, (st, b, rid): (u16, Value, String), says: &str) {
    assert_eq!(st, 403, "{what}: {b}");
    assert_eq!(b["resourceType"], "OperationOutcome", "{what}: {b}");
    let d = b["issue"][0]["diagnostics"].as_str().unwrap_or("");
    assert!(d.starts_with("ParticipantFilter: "), "{what}: {d}");
    assert!(d.contains(says), "{what}: {d}");
    let got = sekmet_received_settled(&rid).await;
    assert!(
        got.iter().all(|r| r["method"] == "GET"),
        "{what}: a write reached SEKMET: {got:?}"
    );
}

/// A success: the status, and SEKMET received the write itself.
fn written(what: &str, (st, b, rid): &(u16, Value, String), status: u16, method: &str) {
    assert_eq!(*st, status, "{what}: {b}");
    let got = sekmet_received(rid);
    assert!(
        got.iter().any(|r| r["method"] == method),
        "{what}: SEKMET got {got:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn participants_write_only_for_patients_they_may_see() {
    let m = format!("pw{}", uniq());
    let (a, b, dr) = (format!("{m}-a"), format!("{m}-b"), format!("{m}-dr"));
    put_direct(
        &format!("Practitioner/{dr}"),
        json!({"resourceType": "Practitioner", "id": dr}),
    )
    .await;
    put_direct(
        &format!("Patient/{a}"),
        json!({"resourceType": "Patient", "id": a,
               "generalPractitioner": [{"reference": format!("Practitioner/{dr}")}]}),
    )
    .await;
    put_direct(
        &format!("Patient/{b}"),
        json!({"resourceType": "Patient", "id": b}),
    )
    .await;
    let (oa, ob) = (format!("{m}-oa"), format!("{m}-ob"));
    put_direct(
        &format!("Observation/{oa}"),
        obs(&oa, &format!("Patient/{a}")),
    )
    .await;
    put_direct(
        &format!("Observation/{ob}"),
        obs(&ob, &format!("Patient/{b}")),
    )
    .await;

    let gw = jwt_gateway(
        "policy:\n  read: [Reader, Administrator, Patient, Practitioner]\n  write: [Writer, Administrator, Patient, Practitioner]\npost:\n  - name: ParticipantFilter\n    settings: {cache_ttl_secs: 30}\n",
    )
    .await;
    let pa = user_token(
        &format!("oid-{a}"),
        &["Patient"],
        Some(&format!("Patient/{a}")),
    );
    let doc = user_token(
        &format!("oid-{dr}"),
        &["Practitioner"],
        Some(&format!("Practitioner/{dr}")),
    );
    let admin = token("admin-app").await;
    let pat_a = format!("Patient/{a}");
    let pat_b = format!("Patient/{b}");

    // 1. A body naming another patient.
    let new = format!("{m}-new");
    refused(
        "patient PUTs an Observation for another patient",
        send(
            &gw,
            "PUT",
            &format!("Observation/{new}"),
            &pa,
            json_body(obs(&new, &pat_b)),
        )
        .await,
        "names a patient outside them",
    )
    .await;
    assert_eq!(get_direct(&format!("Observation/{new}")).await.0, 404);
    refused(
        "patient POSTs an Observation for another patient",
        send(&gw, "POST", "Observation", &pa, json_body(obs("x", &pat_b))).await,
        "names a patient outside them",
    )
    .await;

    // 2. The existing owner decides: B's Observation, re-labelled as A's.
    refused(
        "patient PUTs over another patient's Observation",
        send(
            &gw,
            "PUT",
            &format!("Observation/{ob}"),
            &pa,
            json_body(obs(&ob, &pat_a)),
        )
        .await,
        "not a participant in this patient's care",
    )
    .await;
    refused(
        "patient PATCHes another patient's Observation",
        send(
            &gw,
            "PATCH",
            &format!("Observation/{ob}"),
            &pa,
            Some((
                "application/json-patch+json",
                json!([{"op": "replace", "path": "/status", "value": "amended"}]),
            )),
        )
        .await,
        "not a participant",
    )
    .await;
    refused(
        "patient DELETEs another patient's Observation",
        send(&gw, "DELETE", &format!("Observation/{ob}"), &pa, None).await,
        "not a participant",
    )
    .await;
    let (st, still) = get_direct(&format!("Observation/{ob}")).await;
    assert_eq!(st, 200);
    assert_eq!(still["subject"]["reference"], pat_b.as_str());
    assert_eq!(still["status"], "final");

    // 3. A patch moving own data into another compartment.
    refused(
        "patient JSON-Patches /subject of their own Observation",
        send(
            &gw,
            "PATCH",
            &format!("Observation/{oa}"),
            &pa,
            Some((
                "application/json-patch+json",
                json!([{"op": "replace", "path": "/subject/reference", "value": pat_b}]),
            )),
        )
        .await,
        "may not change /subject",
    )
    .await;
    assert_eq!(
        get_direct(&format!("Observation/{oa}")).await.1["subject"]["reference"],
        pat_a.as_str()
    );

    // 4. A transaction with one bad entry: nothing of it is written.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": obs(&format!("{m}-t1"), &pat_a), "request": {"method": "PUT", "url": format!("Observation/{m}-t1")}},
        {"resource": obs(&format!("{m}-t2"), &pat_b), "request": {"method": "PUT", "url": format!("Observation/{m}-t2")}}]});
    refused(
        "patient's transaction with an entry for another patient",
        send(&gw, "POST", "", &pa, json_body(tx)).await,
        "(Bundle entry 1)",
    )
    .await;
    assert_eq!(get_direct(&format!("Observation/{m}-t1")).await.0, 404);

    // 5. Own writes work.
    let mut mine = obs(&oa, &pat_a);
    mine["status"] = json!("amended");
    let r = send(
        &gw,
        "PUT",
        &format!("Observation/{oa}"),
        &pa,
        json_body(mine),
    )
    .await;
    written("patient updates their own Observation", &r, 200, "PUT");
    let r = send(
        &gw,
        "PATCH",
        &format!("Observation/{oa}"),
        &pa,
        Some((
            "application/json-patch+json",
            json!([{"op": "replace", "path": "/status", "value": "corrected"}]),
        )),
    )
    .await;
    written("patient patches their own Observation", &r, 200, "PATCH");
    assert_eq!(
        get_direct(&format!("Observation/{oa}")).await.1["status"],
        "corrected"
    );
    let r = send(&gw, "POST", "Observation", &pa, json_body(obs("x", &pat_a))).await;
    written("patient creates their own Observation", &r, 201, "POST");
    let own = format!("{m}-own");
    let r = send(
        &gw,
        "PUT",
        &format!("Observation/{own}"),
        &pa,
        json_body(obs(&own, &pat_a)),
    )
    .await;
    written(
        "patient creates their own Observation by PUT",
        &r,
        201,
        "PUT",
    );
    let r = send(&gw, "DELETE", &format!("Observation/{own}"), &pa, None).await;
    assert!([200, 204].contains(&r.0), "{r:?}");
    written("patient deletes their own Observation", &r, r.0, "DELETE");

    // 6. A practitioner: for their patient yes, for a stranger no.
    let r = send(
        &gw,
        "POST",
        "Observation",
        &doc,
        json_body(obs("x", &pat_a)),
    )
    .await;
    written("practitioner writes for their patient", &r, 201, "POST");
    refused(
        "practitioner writes for a stranger",
        send(
            &gw,
            "POST",
            "Observation",
            &doc,
            json_body(obs("x", &pat_b)),
        )
        .await,
        "names a patient outside them",
    )
    .await;
    refused(
        "practitioner deletes a stranger's Observation",
        send(&gw, "DELETE", &format!("Observation/{ob}"), &doc, None).await,
        "not a participant",
    )
    .await;

    // 7. Administrators are not participants' writes.
    let mut moved = obs(&ob, &pat_a);
    moved["status"] = json!("amended");
    let r = send(
        &gw,
        "PUT",
        &format!("Observation/{ob}"),
        &admin,
        json_body(moved),
    )
    .await;
    written("Administrator updates anything", &r, 200, "PUT");
    assert_eq!(
        get_direct(&format!("Observation/{ob}")).await.1["subject"]["reference"],
        pat_a.as_str()
    );
}

/// With `hide_existence`, a write to a resource the caller may not read does not confirm it
/// exists: the same 404 as a resource that does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hidden_resources_are_not_confirmed_by_writes() {
    let m = format!("pw{}", uniq());
    let (a, b) = (format!("{m}-a"), format!("{m}-b"));
    for p in [&a, &b] {
        put_direct(
            &format!("Patient/{p}"),
            json!({"resourceType": "Patient", "id": p}),
        )
        .await;
    }
    let ob = format!("{m}-ob");
    put_direct(
        &format!("Observation/{ob}"),
        obs(&ob, &format!("Patient/{b}")),
    )
    .await;
    let gw = jwt_gateway(
        "policy:\n  read: [Reader, Administrator, Patient]\n  write: [Writer, Administrator, Patient]\npost:\n  - name: ParticipantFilter\n    settings: {hide_existence: true}\n",
    )
    .await;
    let pa = user_token(
        &format!("oid-{a}"),
        &["Patient"],
        Some(&format!("Patient/{a}")),
    );
    let (st, body, rid) = send(&gw, "DELETE", &format!("Observation/{ob}"), &pa, None).await;
    assert_eq!(st, 404, "{body}");
    assert_eq!(
        body["issue"][0]["diagnostics"]
            .as_str()
            .map(|d| d.starts_with("resource not found")),
        Some(true),
        "{body}"
    );
    let got = sekmet_received_settled(&rid).await;
    assert!(got.iter().all(|r| r["method"] == "GET"), "{got:?}");
    assert_eq!(get_direct(&format!("Observation/{ob}")).await.0, 200);
    let (st, none, _) = send(&gw, "DELETE", &format!("Observation/{m}-none"), &pa, None).await;
    assert_eq!(st, 404, "a resource that does not exist: the same answer");
    assert_eq!(none["issue"][0]["code"], body["issue"][0]["code"]);
}
