//! SMART scopes that narrow, against the real SEKMET server with IdP-signed tokens: `patient/`
//! scopes hold every request to the patient's compartment (reads, searches without a patient
//! parameter, paging, writes), and v2 granular scopes (`Observation.rs?category=laboratory`)
//! to what their query selects — on a route with no data filter configured: the narrowing is
//! the token's. Data is seeded through the gateway by an Administrator.

mod common;

use common::idp::*;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;

const CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

fn uniq() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn admin() -> String {
    user_token("scopes-admin", &["Administrator"], None)
}

/// A Reader and Writer whose token carries `scope`, for patient `pid`.
fn scoped(scope: &str, pid: &str) -> String {
    let mut c = reader_claims();
    c["roles"] = json!(["Reader", "Writer"]);
    c["scp"] = json!(scope);
    c["fhirUser"] = json!(format!("Patient/{pid}"));
    sign_as_idp(&c)
}

/// `mark` (in `code.text`) lets a search that names no patient stay on this test's data: the
/// shared server holds every other test's Observations too.
fn observation(pid: &str, category: &str, mark: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
        "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}], "text": mark},
        "subject": {"reference": format!("Patient/{pid}")},
        "valueQuantity": {"value": 37.20, "unit": "Cel"}})
}

async fn create(gw: &Gateway, token: &str, body: &Value) -> String {
    let t = body["resourceType"].as_str().unwrap();
    let r = client()
        .post(gw.url(&format!("/fhir/{t}")))
        .bearer_auth(token)
        .header("Content-Type", "application/fhir+json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "seeding a {t}");
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Two patients with a laboratory and a vital-signs Observation each.
struct Seed {
    /// The `code.text` of the seeded Observations.
    mark: String,
    a: String,
    b: String,
    a_lab: String,
    a_vital: String,
    b_lab: String,
    b_vital: String,
}

async fn seed(gw: &Gateway) -> Seed {
    let t = admin();
    let patient = |n: &str| json!({"resourceType": "Patient", "name": [{"family": format!("Scopes{n}{}", uniq())}]});
    let a = create(gw, &t, &patient("A")).await;
    let b = create(gw, &t, &patient("B")).await;
    let mark = format!("scopes-{}", uniq());
    Seed {
        a_lab: create(gw, &t, &observation(&a, "laboratory", &mark)).await,
        a_vital: create(gw, &t, &observation(&a, "vital-signs", &mark)).await,
        b_lab: create(gw, &t, &observation(&b, "laboratory", &mark)).await,
        b_vital: create(gw, &t, &observation(&b, "vital-signs", &mark)).await,
        mark,
        a,
        b,
    }
}

async fn get(gw: &Gateway, token: &str, path_and_query: &str) -> reqwest::Response {
    client()
        .get(gw.url(&format!("/fhir/{path_and_query}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

/// Every `Type/id` of every page, following the gateway's `next` links.
async fn all_pages(gw: &Gateway, token: &str, first: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut url = gw.url(&format!("/fhir/{first}"));
    for _ in 0..500 {
        let r = client().get(&url).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let b: Value = r.json().await.unwrap();
        assert_eq!(b["type"], "searchset");
        for e in b["entry"].as_array().into_iter().flatten() {
            let r = &e["resource"];
            if r["resourceType"] != "OperationOutcome" {
                seen.insert(format!(
                    "{}/{}",
                    r["resourceType"].as_str().unwrap(),
                    r["id"].as_str().unwrap()
                ));
            }
        }
        let next = b["link"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["relation"] == "next")
            .and_then(|l| l["url"].as_str());
        match next {
            Some(n) => {
                assert!(
                    n.starts_with(&gw.base()),
                    "paging stays on the gateway: {n}"
                );
                url = n.to_string();
            }
            None => return seen,
        }
    }
    panic!("more than 500 pages");
}

fn obs(ids: &[&String]) -> BTreeSet<String> {
    ids.iter().map(|i| format!("Observation/{i}")).collect()
}

/// The one answer to a refused, absent or gone read: a 404 OperationOutcome naming nothing.
async fn assert_hidden(r: reqwest::Response, id: &str) -> Value {
    let v = assert_outcome(r, 404, "not-found").await;
    assert!(!v.to_string().contains(id), "{v}");
    let mut v = v;
    // Only the correlation id differs from one answer to the next.
    v["issue"][0]["diagnostics"] = json!(v["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .split(" (correlation id")
        .next());
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn patient_scopes_hold_every_request_to_the_patients_compartment() {
    let gw = jwt_gateway("").await;
    let s = seed(&gw).await;
    let t = scoped("patient/*.rs", &s.a);

    // Reads by id: A's yes; B's and a non-existent one get the same answer.
    let r = get(&gw, &t, &format!("Observation/{}", s.a_lab)).await;
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    // The filter let it through: SEKMET's own bytes.
    let direct = get_text(&format!("{}/Observation/{}", sekmet_url(), s.a_lab)).await;
    assert_eq!(body, direct, "byte-faithful");
    let theirs = assert_hidden(
        get(&gw, &t, &format!("Observation/{}", s.b_lab)).await,
        &s.b_lab,
    )
    .await;
    let nothing = format!("nothing-{}", uniq());
    let absent = assert_hidden(
        get(&gw, &t, &format!("Observation/{nothing}")).await,
        &nothing,
    )
    .await;
    assert_eq!(theirs, absent, "no existence oracle");
    let patient_b = assert_hidden(get(&gw, &t, &format!("Patient/{}", s.b)).await, &s.b).await;
    assert_eq!(patient_b, absent);
    assert_eq!(
        get(&gw, &t, &format!("Patient/{}", s.a)).await.status(),
        200
    );

    // Searches that name no patient: only A's entries, on every page (small pages: paging).
    let mine = obs(&[&s.a_lab, &s.a_vital]);
    assert_eq!(
        all_pages(
            &gw,
            &t,
            &format!("Observation?code:text={}&_count=50", s.mark)
        )
        .await,
        mine
    );
    assert_eq!(
        all_pages(
            &gw,
            &t,
            &format!("Observation?code:text={}&_count=2", s.mark)
        )
        .await,
        mine
    );
    let named = format!(
        "Observation?_id={},{},{},{}",
        s.a_lab, s.a_vital, s.b_lab, s.b_vital
    );
    assert_eq!(all_pages(&gw, &t, &named).await, mine);
    // Included resources are judged too: B's Patient never comes along.
    let with_subjects = all_pages(&gw, &t, &format!("{named}&_include=Observation:subject")).await;
    let mut expected = mine.clone();
    expected.insert(format!("Patient/{}", s.a));
    assert_eq!(with_subjects, expected);
    // Another patient's compartment is empty for A.
    let theirs = all_pages(&gw, &t, &format!("Patient/{}/Observation", s.b)).await;
    assert!(theirs.is_empty(), "{theirs:?}");
    // Only callers whose scopes narrow leave the streaming road.
    let wide = {
        let mut c = reader_claims();
        c["scp"] = json!("user/*.rs");
        sign_as_idp(&c)
    };
    let mut ids = Vec::new();
    for (who, token) in [("admin", admin()), ("wide", wide), ("patient", t.clone())] {
        let rid = format!("scopes-road-{who}-{}", uniq());
        let r = client()
            .get(gw.url(&format!("/fhir/Observation/{}", s.a_lab)))
            .bearer_auth(token)
            .header("X-Request-Id", &rid)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{who}");
        ids.push(rid);
    }
    let roads = roads_taken(&gw, &ids).await;
    let taken: Vec<&str> = ids.iter().map(|i| roads[i].as_str()).collect();
    assert_eq!(taken, ["stream", "stream", "buffered"]);
    // An existence oracle stays refused, before SEKMET.
    let rid = format!("scopes-has-{}", uniq());
    let r = client()
        .get(gw.url("/fhir/Patient?_has:Observation:subject:code=8310-5"))
        .bearer_auth(&t)
        .header("X-Request-Id", &rid)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 403, "forbidden").await;
    assert_sekmet_never_received(&rid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn patient_scopes_write_only_into_the_patients_compartment() {
    let gw = jwt_gateway("").await;
    let s = seed(&gw).await;
    let t = scoped("patient/*.cruds", &s.a);
    let admin = admin();
    let send = |method: reqwest::Method, path: String, body: Option<Value>| {
        let (t, url) = (t.clone(), gw.url(&format!("/fhir/{path}")));
        async move {
            let rid = format!("scopes-w-{}", uniq());
            let mut r = client()
                .request(method, url)
                .bearer_auth(t)
                .header("X-Request-Id", &rid);
            if let Some(b) = body {
                r = r
                    .header("Content-Type", "application/fhir+json")
                    .body(b.to_string());
            }
            (r.send().await.unwrap(), rid)
        }
    };
    // Creating in B's compartment.
    let (r, rid) = send(
        reqwest::Method::POST,
        "Observation".into(),
        Some(observation(&s.b, "laboratory", &s.mark)),
    )
    .await;
    let v = assert_outcome(r, 403, "forbidden").await;
    assert!(v.to_string().contains("SMART scopes"), "{v}");
    assert_sekmet_never_received(&rid).await;
    // Moving B's Observation into A's compartment, deleting B's: answered as a read of it.
    let mut moved = observation(&s.a, "laboratory", &s.mark);
    moved["id"] = json!(s.b_lab);
    let (r, rid) = send(
        reqwest::Method::PUT,
        format!("Observation/{}", s.b_lab),
        Some(moved),
    )
    .await;
    assert_hidden(r, &s.b_lab).await;
    let (r, rid2) = send(
        reqwest::Method::DELETE,
        format!("Observation/{}", s.b_vital),
        None,
    )
    .await;
    assert_hidden(r, &s.b_vital).await;
    for rid in [rid, rid2] {
        let got = sekmet_received_settled(&rid).await;
        assert!(
            got.iter().all(|x| x["method"] == "GET"),
            "only the gateway's own read of the current version: {got:?}"
        );
    }
    // SEKMET still holds B's data as it was.
    let r = get(&gw, &admin, &format!("Observation/{}", s.b_lab)).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["subject"]["reference"], format!("Patient/{}", s.b));
    assert_eq!(
        get(&gw, &admin, &format!("Observation/{}", s.b_vital))
            .await
            .status(),
        200
    );
    let b_now = all_pages(&gw, &admin, &format!("Observation?subject=Patient/{}", s.b)).await;
    assert_eq!(b_now, obs(&[&s.b_lab, &s.b_vital]));
    // A's own compartment is writable.
    let (r, _) = send(
        reqwest::Method::POST,
        "Observation".into(),
        Some(observation(&s.a, "laboratory", &s.mark)),
    )
    .await;
    assert_eq!(r.status(), 201);
    let (r, _) = send(
        reqwest::Method::DELETE,
        format!("Observation/{}", s.a_vital),
        None,
    )
    .await;
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(
        get(&gw, &admin, &format!("Observation/{}", s.a_vital))
            .await
            .status(),
        410
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn granular_scopes_narrow_to_what_their_query_selects() {
    let gw = jwt_gateway("").await;
    let s = seed(&gw).await;
    let t = scoped("patient/Observation.rs?category=laboratory", &s.a);
    // Only A's laboratory Observations, searched with or without a patient.
    assert_eq!(
        all_pages(
            &gw,
            &t,
            &format!("Observation?code:text={}&_count=2", s.mark)
        )
        .await,
        obs(&[&s.a_lab])
    );
    let named = format!(
        "Observation?_id={},{},{},{}",
        s.a_lab, s.a_vital, s.b_lab, s.b_vital
    );
    assert_eq!(all_pages(&gw, &t, &named).await, obs(&[&s.a_lab]));
    assert_eq!(
        get(&gw, &t, &format!("Observation/{}", s.a_lab))
            .await
            .status(),
        200
    );
    let vital = assert_hidden(
        get(&gw, &t, &format!("Observation/{}", s.a_vital)).await,
        &s.a_vital,
    )
    .await;
    let nothing = format!("nothing-{}", uniq());
    assert_eq!(
        vital,
        assert_hidden(
            get(&gw, &t, &format!("Observation/{nothing}")).await,
            &nothing
        )
        .await
    );

    // Scopes on one type are OR'ed; user/ reaches every patient, still by category.
    let both = scoped(
        "patient/Observation.rs?category=laboratory patient/Observation.rs?category=vital-signs",
        &s.a,
    );
    assert_eq!(
        all_pages(&gw, &both, &named).await,
        obs(&[&s.a_lab, &s.a_vital])
    );
    let system = format!("{CATEGORY}%7Cvital-signs");
    let user = scoped(&format!("user/Observation.rs?category={system}"), &s.a);
    assert_eq!(
        all_pages(&gw, &user, &named).await,
        obs(&[&s.a_vital, &s.b_vital])
    );

    // Writes: what is written must be what the query selects.
    let w = scoped("user/Observation.crus?category=laboratory", &s.a);
    let rid = format!("scopes-gw-{}", uniq());
    let r = client()
        .post(gw.url("/fhir/Observation"))
        .bearer_auth(&w)
        .header("X-Request-Id", &rid)
        .header("Content-Type", "application/fhir+json")
        .body(observation(&s.b, "vital-signs", &s.mark).to_string())
        .send()
        .await
        .unwrap();
    assert_outcome(r, 403, "forbidden").await;
    assert_sekmet_never_received(&rid).await;
    let r = client()
        .post(gw.url("/fhir/Observation"))
        .bearer_auth(&w)
        .header("Content-Type", "application/fhir+json")
        .body(observation(&s.b, "laboratory", &s.mark).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    // A query the gateway cannot evaluate exactly grants nothing, and nothing is asked.
    for scope in [
        "patient/Observation.rs?date=gt2020-01-01",
        "patient/Observation.rs?category:not=vital-signs",
        "patient/*.rs?category=laboratory",
    ] {
        let t = scoped(scope, &s.a);
        let rid = format!("scopes-u-{}", uniq());
        let r = client()
            .get(gw.url(&format!("/fhir/Observation/{}", s.a_lab)))
            .bearer_auth(&t)
            .header("X-Request-Id", &rid)
            .send()
            .await
            .unwrap();
        let v = assert_outcome(r, 403, "forbidden").await;
        assert!(v.to_string().contains("no scope grants"), "{scope}: {v}");
        assert_sekmet_never_received(&rid).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_narrowing_holds_on_a_route_with_participant_filter_too() {
    // ParticipantFilter refuses a read of another patient's data with a 403; for a caller whose
    // scopes narrow it still must not differ from a read of nothing.
    let gw = jwt_gateway("post:\n  - name: ParticipantFilter\n").await;
    let s = seed(&gw).await;
    let t = scoped("patient/Observation.rs?category=laboratory", &s.a);
    let theirs = assert_hidden(
        get(&gw, &t, &format!("Observation/{}", s.b_lab)).await,
        &s.b_lab,
    )
    .await;
    let nothing = format!("nothing-{}", uniq());
    let absent = assert_hidden(
        get(&gw, &t, &format!("Observation/{nothing}")).await,
        &nothing,
    )
    .await;
    assert_eq!(theirs, absent);
    let vital = assert_hidden(
        get(&gw, &t, &format!("Observation/{}", s.a_vital)).await,
        &s.a_vital,
    )
    .await;
    assert_eq!(vital, absent);
    assert_eq!(
        all_pages(
            &gw,
            &t,
            &format!("Observation?code:text={}&_count=3", s.mark)
        )
        .await,
        obs(&[&s.a_lab])
    );
}
