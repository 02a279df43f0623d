use super::*;
use crate::processor::Body;
use crate::testing::{context_with, req, ScriptedClient};
use serde_json::json;

const LAB: &str = "laboratory";

fn caller(scopes: &[&str]) -> Identity {
    Identity {
        user_id: "u".into(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        fhir_user: Some("Patient/A".into()),
        ..Default::default()
    }
}

fn filter(scopes: &[&str]) -> ScopeFilter {
    ScopeFilter::for_identity(&caller(scopes)).expect("these scopes narrow")
}

fn obs(id: &str, patient: &str, category: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
           "category": [{"coding": [{"system":
               "http://terminology.hl7.org/CodeSystem/observation-category", "code": category}]}],
           "subject": {"reference": format!("Patient/{patient}")}})
}

fn searchset(resources: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "searchset", "total": resources.len(),
           "entry": resources.into_iter().map(|r| json!({"resource": r, "search": {"mode": "match"}}))
               .collect::<Vec<_>>()})
}

async fn run(f: &ScopeFilter, r: &Request, mut resp: Response) -> Response {
    let (mut cx, _) = context_with(ScriptedClient::by_url(vec![]));
    cx.identity = Some(caller(&[]));
    f.process(r, &mut resp, &cx).await.unwrap();
    resp
}

fn ids(resp: &Response) -> Vec<String> {
    resp.json_body().unwrap()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap_or("-").to_string())
        .collect()
}

#[test]
fn which_tokens_get_the_filter() {
    let narrows = |s: &[&str]| ScopeFilter::for_identity(&caller(s)).is_some();
    assert!(narrows(&["patient/*.rs"]));
    assert!(narrows(&["user/Observation.rs?category=laboratory"]));
    assert!(narrows(&["patient/*.rs", "user/Observation.rs"]));
    assert!(!narrows(&["user/*.rs"]));
    assert!(!narrows(&["openid", "fhirUser"]));
    // An unrestricted wildcard granting as much makes the narrowing moot.
    assert!(!narrows(&["patient/*.rs", "user/*.cruds"]));
    assert!(
        narrows(&["patient/*.cruds", "user/*.rs"]),
        "writes still narrowed"
    );
    // A scope that grants nothing narrows nothing.
    assert!(!narrows(&["user/Observation.rs?date=gt2020"]));
}

#[tokio::test]
async fn patient_scopes_keep_the_patients_compartment() {
    let f = filter(&["patient/*.rs"]);
    let body = searchset(vec![
        obs("a1", "A", LAB),
        obs("b1", "B", LAB),
        json!({"resourceType": "Organization", "id": "org"}),
        // Nobody's Observation is not in A's compartment either.
        json!({"resourceType": "Observation", "id": "nobody"}),
        obs("a2", "A", "vital-signs"),
    ]);
    let r = run(
        &f,
        &req("GET", "/Observation", "", None),
        Response::json(200, body),
    )
    .await;
    assert_eq!(ids(&r), ["a1", "org", "a2"]);
    assert!(!r.json_body().unwrap().to_string().contains("Patient/B"));
    // A read of B's: the same 404 as a read of nothing.
    let read = req("GET", "/Observation/b1", "", None);
    let denied = run(&f, &read, Response::json(200, obs("b1", "B", LAB))).await;
    let absent = run(
        &f,
        &read,
        Response::outcome(404, "not-found", "Observation/b1 is not known"),
    )
    .await;
    assert_eq!(denied.status, 404);
    assert_eq!(denied, absent);
    let mine = run(
        &f,
        &req("GET", "/Observation/a1", "", None),
        Response::json(200, obs("a1", "A", LAB)),
    )
    .await;
    assert_eq!(mine.status, 200);
    // No patient context: patient/ scopes grant nothing.
    let mut nobody = caller(&["patient/*.rs"]);
    nobody.fhir_user = None;
    let f = ScopeFilter::for_identity(&nobody).unwrap();
    let r = run(
        &f,
        &req("GET", "/Observation/a1", "", None),
        Response::json(200, obs("a1", "A", LAB)),
    )
    .await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn queries_narrow_and_scopes_are_ored() {
    let f = filter(&["patient/Observation.rs?category=laboratory"]);
    assert_eq!(f.reads(), BodyAccess::Whole);
    let body = searchset(vec![
        obs("a1", "A", LAB),
        obs("a2", "A", "vital-signs"),
        obs("b1", "B", LAB),
    ]);
    let r = run(
        &f,
        &req("GET", "/Observation", "", None),
        Response::json(200, body.clone()),
    )
    .await;
    assert_eq!(ids(&r), ["a1"]);
    // Two scopes on the type: either selects.
    let f = filter(&[
        "patient/Observation.rs?category=laboratory",
        "patient/Observation.rs?category=vital-signs",
    ]);
    let r = run(
        &f,
        &req("GET", "/Observation", "", None),
        Response::json(200, body.clone()),
    )
    .await;
    assert_eq!(ids(&r), ["a1", "a2"]);
    // An unrestricted scope on the type makes the query moot (the compartment still holds).
    let f = filter(&[
        "patient/Observation.rs?category=laboratory",
        "patient/Observation.rs",
    ]);
    let r = run(
        &f,
        &req("GET", "/Observation", "", None),
        Response::json(200, body.clone()),
    )
    .await;
    assert_eq!(ids(&r), ["a1", "a2"]);
    // user/ with a query: every patient, only the category.
    let f = filter(&["user/Observation.rs?category=vital-signs"]);
    let r = run(
        &f,
        &req("GET", "/Observation", "", None),
        Response::json(200, body),
    )
    .await;
    assert_eq!(ids(&r), ["a2"]);
    // A type no scope grants is removed (an include of it, say).
    let f = filter(&["patient/Observation.rs"]);
    let body = searchset(vec![
        obs("a1", "A", LAB),
        json!({"resourceType": "Patient", "id": "A"}),
    ]);
    let r = run(
        &f,
        &req("GET", "/Observation", "", None),
        Response::json(200, body),
    )
    .await;
    assert_eq!(ids(&r), ["a1"]);
}

async fn check(f: &ScopeFilter, r: Request, client: ScriptedClient) -> Option<Response> {
    let (mut cx, _) = context_with(client);
    cx.identity = Some(caller(&[]));
    assert!(f.checks_write(&r, None));
    f.check_write(&r, &cx).await.unwrap()
}

#[tokio::test]
async fn patient_writes_stay_in_the_compartment() {
    let f = filter(&["patient/*.cruds"]);
    let none = || ScriptedClient::by_url(vec![]);
    let create = |p: &str| req("POST", "/Observation", "", Some(obs("x", p, LAB)));
    assert!(check(&f, create("A"), none()).await.is_none());
    let no = check(&f, create("B"), none()).await.unwrap();
    assert_eq!(no.status, 403);
    let nobodys = req(
        "POST",
        "/Observation",
        "",
        Some(json!({"resourceType": "Observation"})),
    );
    assert_eq!(check(&f, nobodys, none()).await.unwrap().status, 403);
    let org = req(
        "POST",
        "/Organization",
        "",
        Some(json!({"resourceType": "Organization"})),
    );
    assert!(check(&f, org, none()).await.is_none());
    // Updating or deleting B's: answered as a read of it would be.
    let theirs = || ScriptedClient::by_url(vec![("Observation/b1", 200, obs("b1", "B", LAB))]);
    let put = req("PUT", "/Observation/b1", "", Some(obs("b1", "A", LAB)));
    assert_eq!(check(&f, put, theirs()).await.unwrap().status, 404);
    let del = req("DELETE", "/Observation/b1", "", None);
    assert_eq!(check(&f, del, theirs()).await.unwrap().status, 404);
    // A batch entry writing into B's compartment.
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": obs("x", "B", LAB), "request": {"method": "POST", "url": "Observation"}}]});
    assert_eq!(
        check(&f, req("POST", "", "", Some(bundle)), none())
            .await
            .unwrap()
            .status,
        403
    );
    // A user/ scope on the type lifts it.
    let f = filter(&["patient/*.cruds", "user/Observation.cruds"]);
    assert!(check(&f, create("B"), none()).await.is_none());
}

#[tokio::test]
async fn query_writes_must_match_the_query() {
    let f = filter(&["user/Observation.cruds?category=laboratory"]);
    let none = || ScriptedClient::by_url(vec![]);
    let create = |c: &str| req("POST", "/Observation", "", Some(obs("x", "B", c)));
    assert!(check(&f, create(LAB), none()).await.is_none());
    assert_eq!(
        check(&f, create("vital-signs"), none())
            .await
            .unwrap()
            .status,
        403
    );
    // Updating a vital-signs Observation into a laboratory one: its current version decides.
    let vital =
        || ScriptedClient::by_url(vec![("Observation/v", 200, obs("v", "B", "vital-signs"))]);
    let put = req("PUT", "/Observation/v", "", Some(obs("v", "B", LAB)));
    assert_eq!(check(&f, put, vital()).await.unwrap().status, 404);
    let put = req("PUT", "/Observation/new", "", Some(obs("new", "B", LAB)));
    let absent = ScriptedClient::by_url(vec![("Observation/new", 404, json!({}))]);
    assert!(check(&f, put, absent).await.is_none());
    let patch = req("PATCH", "/Observation/v", "", Some(json!([])));
    assert_eq!(check(&f, patch, vital()).await.unwrap().status, 403);
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": obs("x", "B", LAB), "request": {"method": "POST", "url": "Observation"}}]});
    assert_eq!(
        check(&f, req("POST", "", "", Some(bundle)), none())
            .await
            .unwrap()
            .status,
        403
    );
    // Not JSON, not checked.
    let mut xml = req("POST", "/Observation", "", None);
    xml.body = Some(b"<Observation/>".to_vec());
    assert_eq!(check(&f, xml, none()).await.unwrap().status, 403);
    assert!(matches!(Response::json(200, json!({})).body, Body::Json(_)));
}
