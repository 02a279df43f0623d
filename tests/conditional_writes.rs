//! Conditional writes are no existence oracle (issue 14, spec §9) against SEKMET: for a caller
//! the route's filters judge, the gateway runs the search part of `If-None-Exist`, a
//! conditional PUT / DELETE and their transaction forms itself, keeps the matches the caller
//! may see and sends the server `_id=<those>` (or no criteria at all). A patient whose
//! criteria match only another patient's Observation gets the same answer as when nothing
//! matches, SEKMET never receives the criteria, and the other patient's Observation stays as
//! it was (same version). A caller's own matches still dedupe, and an unfiltered Writer's
//! conditional create reaches SEKMET unchanged and dedupes there.

mod common;

use common::idp::*;
use common::*;
use serde_json::{json, Value};

const SYS: &str = "urn:test:conditional-writes";

fn obs(subject: &str, ident: &str, status: &str) -> Value {
    json!({"resourceType": "Observation", "status": status, "code": {"text": "conditional writes"},
           "identifier": [{"system": SYS, "value": ident}],
           "subject": {"reference": subject}})
}

/// What SEKMET holds for an identifier: (id, version, status, subject) of every match.
async fn held(ident: &str) -> Vec<(String, String, String, String)> {
    let r = client()
        .get(format!(
            "{}/Observation?identifier={SYS}|{ident}&_count=50",
            sekmet_url()
        ))
        .send()
        .await
        .unwrap();
    let b: Value = r.json().await.unwrap();
    let mut out: Vec<_> = b["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let r = &e["resource"];
            (
                r["id"].as_str().unwrap().to_string(),
                r["meta"]["versionId"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
                r["subject"]["reference"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// One request through the gateway: status, JSON body, correlation id.
async fn send(
    gw: &Gateway,
    method: &str,
    path: &str,
    tok: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (u16, Value, String) {
    let rid = format!("cw-{}", uniq());
    let mut rq = client()
        .request(method.parse().unwrap(), format!("{}/{path}", gw.base()))
        .bearer_auth(tok)
        .header("X-Request-Id", &rid);
    for (k, v) in headers {
        rq = rq.header(*k, *v);
    }
    if let Some(b) = body {
        rq = rq
            .header("Content-Type", "application/fhir+json")
            .body(b.to_string());
    }
    let r = rq.send().await.unwrap();
    let st = r.status().as_u16();
    let text = r.text().await.unwrap();
    (st, serde_json::from_str(&text).unwrap_or(Value::Null), rid)
}

/// The writes SEKMET received for a correlation id: (method, url, If-None-Exist).
fn writes_received(rid: &str) -> Vec<(String, String, Option<String>)> {
    sekmet_received(rid)
        .iter()
        .filter(|r| r["method"] != "GET")
        .map(|r| {
            (
                r["method"].as_str().unwrap_or("").to_string(),
                r["url"].as_str().unwrap_or("").to_string(),
                r["headers"]["if-none-exist"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// A created Observation's answer: 201, an Observation of `subject`, and its id.
fn created(what: &str, (st, b, _): &(u16, Value, String), subject: &str) -> String {
    assert_eq!(*st, 201, "{what}: {b}");
    assert_eq!(b["resourceType"], "Observation", "{what}: {b}");
    assert_eq!(b["subject"]["reference"], subject, "{what}: {b}");
    b["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_filtered_callers_conditional_writes_see_only_what_they_may_see() {
    let run = format!("cw{}", uniq());
    let (a, b) = (format!("{run}-a"), format!("{run}-b"));
    for p in [&a, &b] {
        put_direct(
            &format!("Patient/{p}"),
            json!({"resourceType": "Patient", "id": p}),
        )
        .await;
    }
    let (pa, pb) = (format!("Patient/{a}"), format!("Patient/{b}"));
    // B's Observation carries the identifier A will probe for; A has one of her own.
    let (secret, mine, nothing) = (
        format!("{run}-secret"),
        format!("{run}-mine"),
        format!("{run}-nothing"),
    );
    let ob = format!("{run}-ob");
    put_direct(&format!("Observation/{ob}"), {
        let mut o = obs(&pb, &secret, "final");
        o["id"] = json!(ob);
        o
    })
    .await;
    let oa = format!("{run}-oa");
    put_direct(&format!("Observation/{oa}"), {
        let mut o = obs(&pa, &mine, "final");
        o["id"] = json!(oa);
        o
    })
    .await;
    // What A writes never carries the probed identifiers: every probe matches B's alone.
    let made = format!("{run}-made");
    let b_before = held(&secret).await;
    assert_eq!(
        b_before,
        [(ob.clone(), "1".into(), "final".into(), pb.clone())]
    );

    let gw = jwt_gateway(
        "policy:\n  read: [Reader, Administrator, Patient]\n  write: [Writer, Administrator, Patient]\npost:\n  - name: ParticipantFilter\n    settings: {cache_ttl_secs: 30}\n  - name: ConsentOptOut\n    settings: {category: \"http://loinc.org|59284-0\"}\n",
    )
    .await;
    let ta = user_token(&format!("oid-{a}"), &["Patient"], Some(&pa));
    let ine = |ident: &str| format!("identifier={SYS}|{ident}");

    // If-None-Exist matching only B's Observation answers as one matching nothing: 201, a new
    // Observation of A's; SEKMET got a plain create (no criteria) and B's is unchanged.
    let hidden = send(
        &gw,
        "POST",
        "Observation",
        &ta,
        &[("If-None-Exist", &ine(&secret))],
        Some(obs(&pa, &made, "final")),
    )
    .await;
    let none = send(
        &gw,
        "POST",
        "Observation",
        &ta,
        &[("If-None-Exist", &ine(&nothing))],
        Some(obs(&pa, &made, "final")),
    )
    .await;
    let new_hidden = created("If-None-Exist on B's", &hidden, &pa);
    created("If-None-Exist on nothing", &none, &pa);
    assert_ne!(new_hidden, ob);
    for (what, r) in [("B's", &hidden), ("nothing", &none)] {
        let w = writes_received(&r.2);
        assert_eq!(w.len(), 1, "{what}: {w:?}");
        assert_eq!(w[0].0, "POST", "{what}: {w:?}");
        assert_eq!(w[0].2, None, "{what}: SEKMET got the criteria: {w:?}");
    }
    // The same keys in both answers (what differs is only the new resource's own values).
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&hidden.1), keys(&none.1));

    // A's own match still dedupes: 200 with her Observation, sent as `_id=<it>`.
    let own = send(
        &gw,
        "POST",
        "Observation",
        &ta,
        &[("If-None-Exist", &ine(&mine))],
        Some(obs(&pa, &mine, "final")),
    )
    .await;
    assert_eq!(own.0, 200, "{}", own.1);
    assert_eq!(own.1["id"], oa.as_str());
    let w = writes_received(&own.2);
    assert_eq!(
        w[0].2.as_deref(),
        Some(format!("_id={oa}").as_str()),
        "{w:?}"
    );

    // Conditional PUT matching only B's: a create, never an update of B's.
    let put_hidden = send(
        &gw,
        "PUT",
        &format!("Observation?{}", ine(&secret)),
        &ta,
        &[],
        Some(obs(&pa, &made, "amended")),
    )
    .await;
    let put_none = send(
        &gw,
        "PUT",
        &format!("Observation?{}", ine(&nothing)),
        &ta,
        &[],
        Some(obs(&pa, &made, "amended")),
    )
    .await;
    created("conditional PUT on B's", &put_hidden, &pa);
    created("conditional PUT on nothing", &put_none, &pa);
    assert_eq!(keys(&put_hidden.1), keys(&put_none.1));
    // ... and on A's own: her Observation updated in place.
    let put_own = send(
        &gw,
        "PUT",
        &format!("Observation?{}", ine(&mine)),
        &ta,
        &[],
        Some(obs(&pa, &mine, "amended")),
    )
    .await;
    assert_eq!(put_own.0, 200, "{}", put_own.1);
    assert_eq!(put_own.1["id"], oa.as_str());
    assert_eq!(
        held(&mine).await,
        [(oa.clone(), "2".into(), "amended".into(), pa.clone())]
    );

    // Conditional DELETE matching only B's: the server's answer for no match, nothing deleted.
    let del_hidden = send(
        &gw,
        "DELETE",
        &format!("Observation?{}", ine(&secret)),
        &ta,
        &[],
        None,
    )
    .await;
    let del_none = send(
        &gw,
        "DELETE",
        &format!("Observation?{}", ine(&nothing)),
        &ta,
        &[],
        None,
    )
    .await;
    assert_eq!((del_hidden.0, &del_hidden.1), (del_none.0, &del_none.1));

    // The same inside a transaction: ifNoneExist and a conditional PUT on B's identifier.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:0d9f6a52-8d43-4c55-9c67-0c1d3f0b1a01", "resource": obs(&pa, &made, "final"),
         "request": {"method": "POST", "url": "Observation", "ifNoneExist": ine(&secret)}},
        {"resource": obs(&pa, &made, "amended"),
         "request": {"method": "PUT", "url": format!("Observation?{}", ine(&secret))}}]});
    let (st, body, _) = send(&gw, "POST", "", &ta, &[], Some(tx)).await;
    assert_eq!(st, 200, "{body}");
    let statuses: Vec<&str> = body["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert!(
        statuses.iter().all(|s| s.starts_with("201")),
        "{statuses:?}"
    );

    // B's Observation: still the only match, version 1, final, B's — whatever A sent.
    assert_eq!(held(&secret).await, b_before);
    assert!(held(&nothing).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unfiltered_writers_conditional_create_dedupes_at_the_server() {
    let run = format!("cw{}", uniq());
    let p = format!("{run}-p");
    put_direct(
        &format!("Patient/{p}"),
        json!({"resourceType": "Patient", "id": p}),
    )
    .await;
    let ident = format!("{run}-once");
    // No filter on this route: the Writer's request reaches SEKMET as sent.
    let gw =
        jwt_gateway("policy:\n  read: [Reader, Administrator]\n  write: [Writer, Administrator]\n")
            .await;
    let tw = token("writer-app").await;
    let crit = format!("identifier={SYS}|{ident}");
    let body = obs(&format!("Patient/{p}"), &ident, "final");
    let first = send(
        &gw,
        "POST",
        "Observation",
        &tw,
        &[("If-None-Exist", &crit)],
        Some(body.clone()),
    )
    .await;
    let id = created("first conditional create", &first, &format!("Patient/{p}"));
    let second = send(
        &gw,
        "POST",
        "Observation",
        &tw,
        &[("If-None-Exist", &crit)],
        Some(body),
    )
    .await;
    assert_eq!(second.0, 200, "{}", second.1);
    assert_eq!(second.1["id"], id.as_str());
    let w = writes_received(&second.2);
    assert_eq!(w.len(), 1, "{w:?}");
    assert_eq!(w[0].2.as_deref(), Some(crit.as_str()), "{w:?}");
    assert_eq!(held(&ident).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn matches_a_consent_withholds_are_no_matches_either() {
    let run = format!("cw{}", uniq());
    let (p, d) = (format!("{run}-p"), format!("{run}-d"));
    put_direct(
        &format!("Practitioner/{d}"),
        json!({"resourceType": "Practitioner", "id": d}),
    )
    .await;
    put_direct(
        &format!("Patient/{p}"),
        json!({"resourceType": "Patient", "id": p,
               "generalPractitioner": [{"reference": format!("Practitioner/{d}")}]}),
    )
    .await;
    let (pp, dr) = (format!("Patient/{p}"), format!("Practitioner/{d}"));
    let ident = format!("{run}-withheld");
    let o = format!("{run}-o");
    put_direct(&format!("Observation/{o}"), {
        let mut v = obs(&pp, &ident, "final");
        v["id"] = json!(o);
        v
    })
    .await;
    // The patient withholds everything from this practitioner of record.
    put_direct(
        &format!("Consent/{run}-c"),
        json!({"resourceType": "Consent", "id": format!("{run}-c"), "status": "active",
               "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                     "code": "patient-privacy"}]},
               "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
               "patient": {"reference": pp},
               "provision": {"type": "permit", "provision": [
                   {"type": "deny", "actor": [{"reference": {"reference": dr},
                       "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                            "code": "PRCP"}]}}]}]}}),
    )
    .await;
    let before = held(&ident).await;
    assert_eq!(before.len(), 1);

    let gw = jwt_gateway(
        "policy:\n  read: [Reader, Administrator, Practitioner]\n  write: [Writer, Administrator, Practitioner]\npost:\n  - name: ParticipantFilter\n    settings: {cache_ttl_secs: 30}\n  - name: ConsentOptOut\n    settings: {category: \"http://loinc.org|59284-0\"}\n",
    )
    .await;
    let td = user_token(&format!("oid-{d}"), &["Practitioner"], Some(&dr));
    let crit = format!("identifier={SYS}|{ident}");
    let made = format!("{run}-made");
    // ParticipantFilter alone would let the practitioner see it; the Consent does not.
    let put = send(
        &gw,
        "PUT",
        &format!("Observation?{crit}"),
        &td,
        &[],
        Some(obs(&pp, &made, "amended")),
    )
    .await;
    assert_eq!(put.0, 201, "{}", put.1);
    let create = send(
        &gw,
        "POST",
        "Observation",
        &td,
        &[("If-None-Exist", &crit)],
        Some(obs(&pp, &made, "final")),
    )
    .await;
    assert_eq!(create.0, 201, "{}", create.1);
    assert_eq!(writes_received(&create.2)[0].2, None);
    assert_eq!(held(&ident).await, before);
    assert_eq!(held(&made).await.len(), 2);
}
