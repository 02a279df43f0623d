use super::*;
use crate::testing::{context_with, ScriptedClient};
use serde_json::json;

fn filter(s: Value) -> ParticipantFilter {
    ParticipantFilter::new(serde_json::from_value(s).unwrap()).unwrap()
}

fn caller(roles: &[Role], fhir_user: &str) -> Identity {
    Identity {
        user_id: "u".into(),
        roles: roles.to_vec(),
        fhir_user: (!fhir_user.is_empty()).then(|| fhir_user.to_string()),
        ..Default::default()
    }
}

fn get(path: &str, query: &str) -> Request {
    Request {
        method: "GET".into(),
        path: path.into(),
        query: query.into(),
        headers: vec![],
        body: None,
    }
}

fn entry(r: Value) -> Value {
    json!({"resource": r, "search": {"mode": "match"}})
}

fn obs(id: &str, subject: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "subject": {"reference": subject}})
}

fn searchset(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "searchset", "total": entries.len(),
           "entry": entries.into_iter().map(entry).collect::<Vec<_>>()})
}

fn ids(resp: &Response) -> Vec<String> {
    resp.json_body().unwrap()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] != "outcome")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect()
}

async fn run(
    f: &ParticipantFilter,
    id: Identity,
    client: ScriptedClient,
    req: Request,
    body: Value,
) -> (Response, Arc<ScriptedClient>) {
    let (mut cx, client) = context_with(client);
    cx.identity = Some(id);
    let mut resp = Response::json(200, body);
    f.process(&req, &mut resp, &cx).await.unwrap();
    (resp, client)
}

#[tokio::test]
async fn patient_sees_own_compartment_only() {
    let f = filter(json!({}));
    let body = searchset(vec![
        obs("1", "Patient/12"),
        obs("2", "Patient/123"),
        obs("3", "http://fhir.internal/fhir/Patient/12/_history/4"),
        obs("4", "https://elsewhere.example/fhir/Patient/12"),
        json!({"resourceType": "Organization", "id": "o"}),
    ]);
    let (resp, client) = run(
        &f,
        caller(&[Role::Patient], "Patient/12"),
        ScriptedClient::new(vec![]),
        get("/Observation", ""),
        body,
    )
    .await;
    assert_eq!(ids(&resp), ["1", "3", "o"]);
    assert_eq!(
        resp.json_body().unwrap()["total"],
        3,
        "what the caller sees"
    );
    assert!(client.calls().is_empty(), "a patient needs no lookups");
}

#[tokio::test]
async fn single_reads_deny_with_403_or_404() {
    let f = filter(json!({}));
    let (resp, _) = run(
        &f,
        caller(&[Role::Patient], "Patient/12"),
        ScriptedClient::new(vec![]),
        get("/Observation/2", ""),
        obs("2", "Patient/123"),
    )
    .await;
    assert_eq!(resp.status, 403);
    let f = filter(json!({"hide_existence": true}));
    let (resp, _) = run(
        &f,
        caller(&[Role::Patient], "Patient/12"),
        ScriptedClient::new(vec![]),
        get("/Observation/2", ""),
        obs("2", "Patient/123"),
    )
    .await;
    assert_eq!(resp.status, 404);
}

#[tokio::test]
async fn practitioner_relations_are_read_once_and_cached() {
    let f = filter(json!({}));
    let client = || {
        ScriptedClient::by_url(vec![
            (
                "PractitionerRole?",
                200,
                json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "PractitionerRole", "id": "r1",
                          "practitioner": {"reference": "Practitioner/p1"}}},
            {"resource": {"resourceType": "PractitionerRole", "id": "r9",
                          "practitioner": {"reference": "Practitioner/p9"}}}]}),
            ),
            (
                "Patient?",
                200,
                json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Patient", "id": "A",
                          "generalPractitioner": [{"reference": "PractitionerRole/r1"}]}}]}),
            ),
            (
                "Encounter?",
                200,
                json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Encounter", "id": "e", "subject": {"reference": "Patient/B"},
                          "participant": [{"individual": {"reference": "Practitioner/p1"}}]}}]}),
            ),
            (
                "CareTeam?",
                200,
                json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "CareTeam", "id": "c", "subject": {"reference": "Patient/C"},
                          "participant": [{"member": {"reference": "Practitioner/p1"}}]}},
            // A server that ignored `participant` answers with other teams too.
            {"resource": {"resourceType": "CareTeam", "id": "x", "subject": {"reference": "Patient/D"},
                          "participant": [{"member": {"reference": "Practitioner/p9"}}]}}]}),
            ),
        ])
    };
    let body = searchset(vec![
        obs("a", "Patient/A"),
        obs("b", "Patient/B"),
        obs("c", "Patient/C"),
        obs("d", "Patient/D"),
    ]);
    let (resp, c1) = run(
        &f,
        caller(&[Role::Practitioner], "Practitioner/p1"),
        client(),
        get("/Observation", ""),
        body.clone(),
    )
    .await;
    assert_eq!(ids(&resp), ["a", "b", "c"]);
    let calls = c1.calls();
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert!(
        calls
            .iter()
            .any(|c| c.contains("general-practitioner=Practitioner%2Fp1%2CPractitionerRole%2Fr1")),
        "{calls:?}"
    );
    // Warm cache: no upstream call at all.
    let (resp, c2) = run(
        &f,
        caller(&[Role::Practitioner], "Practitioner/p1"),
        client(),
        get("/Observation", ""),
        body.clone(),
    )
    .await;
    assert_eq!(ids(&resp), ["a", "b", "c"]);
    assert!(c2.calls().is_empty());
    // A CareTeam written through the gateway: asked again.
    f.invalidate("CareTeam");
    let (_, c3) = run(
        &f,
        caller(&[Role::Practitioner], "Practitioner/p1"),
        client(),
        get("/Observation", ""),
        body,
    )
    .await;
    assert_eq!(c3.calls().len(), 4);
}

#[tokio::test]
async fn nobody_sees_no_patient_data_and_admins_bypass() {
    let f = filter(json!({}));
    let body = searchset(vec![
        obs("1", "Patient/12"),
        json!({"resourceType": "Medication", "id": "m"}),
    ]);
    // Nobody: the link lookups find nothing.
    let reader = ScriptedClient::by_url(vec![(
        "",
        200,
        json!({"resourceType": "Bundle", "type": "searchset", "entry": []}),
    )]);
    let (resp, _) = run(
        &f,
        caller(&[Role::Reader], ""),
        reader,
        get("/Observation", ""),
        body.clone(),
    )
    .await;
    assert_eq!(ids(&resp), ["m"]);
    let (resp, c) = run(
        &f,
        caller(&[Role::Administrator], ""),
        ScriptedClient::new(vec![]),
        get("/Observation", ""),
        body,
    )
    .await;
    assert_eq!(ids(&resp), ["1", "m"]);
    assert!(c.calls().is_empty());
}

#[tokio::test]
async fn subsetted_resources_are_judged_on_their_full_version() {
    let f = filter(json!({}));
    let cut = |id: &str| {
        json!({"resourceType": "Observation", "id": id,
        "meta": {"tag": [{"code": "SUBSETTED"}]}})
    };
    let full = ScriptedClient::by_url(vec![(
        "Observation?_id=",
        200,
        json!({"resourceType": "Bundle", "entry": [
        {"resource": obs("1", "Patient/12")}, {"resource": obs("2", "Patient/99")}]}),
    )]);
    let (resp, c) = run(
        &f,
        caller(&[Role::Patient], "Patient/12"),
        full,
        get("/Observation", "_elements=id"),
        searchset(vec![cut("1"), cut("2"), cut("3")]),
    )
    .await;
    assert_eq!(ids(&resp), ["1"], "3 could not be read in full: denied");
    assert_eq!(c.calls(), ["GET Observation?_id=1,2,3&_count=3"]);
}

#[tokio::test]
async fn lookup_failure_fails_closed() {
    let f = filter(json!({}));
    let (mut cx, _) = context_with(ScriptedClient::by_url(vec![(
        "",
        503,
        json!({"resourceType": "OperationOutcome"}),
    )]));
    cx.identity = Some(caller(&[Role::Practitioner], "Practitioner/p1"));
    let mut resp = Response::json(200, searchset(vec![obs("1", "Patient/12")]));
    let r = f.process(&get("/Observation", ""), &mut resp, &cx).await;
    assert!(matches!(r, Err(ModuleError::Unavailable(_))), "{r:?}");
}

#[test]
fn settings_are_checked() {
    assert!(
        ParticipantFilter::new(serde_json::from_value(json!({"relations": []})).unwrap()).is_err()
    );
    assert!(ParticipantFilter::new(
        serde_json::from_value(json!({"bypass_roles": ["Root"]})).unwrap()
    )
    .is_err());
    assert!(serde_json::from_value::<Settings>(json!({"relations": ["friend"]})).is_err());
}
