//! Conditional writes resolved over what the caller may see, against a scripted server.

use super::*;
use crate::builtin::consent_opt_out::ConsentOptOut;
use crate::builtin::participant_filter::ParticipantFilter;
use crate::identity::Role;
use crate::testing::{context_with, req, ScriptedClient};

fn chain() -> Vec<Arc<dyn PostProcess>> {
    vec![
        Arc::new(ParticipantFilter::new(serde_json::from_value(json!({})).unwrap()).unwrap()),
        Arc::new(
            ConsentOptOut::new(
                serde_json::from_value(json!({"category": "http://loinc.org|59284-0"})).unwrap(),
            )
            .unwrap(),
        ),
    ]
}

fn obs(id: &str, p: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "subject": {"reference": format!("Patient/{p}")}})
}

fn found(rs: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "searchset",
           "entry": rs.into_iter().map(|r| json!({"resource": r, "search": {"mode": "match"}})).collect::<Vec<_>>()})
}

/// Patient/12's Observations `mine`, `mine2`; Patient/99's `theirs`.
fn server() -> ScriptedClient {
    ScriptedClient::by_url(vec![
        (
            "Observation?identifier=both",
            200,
            found(vec![obs("mine", "12"), obs("theirs", "99")]),
        ),
        (
            "Observation?identifier=theirs",
            200,
            found(vec![obs("theirs", "99")]),
        ),
        (
            "Observation?identifier=two",
            200,
            found(vec![obs("mine", "12"), obs("mine2", "12")]),
        ),
        ("Observation?identifier=none", 200, found(vec![])),
        ("Observation/theirs", 200, obs("theirs", "99")),
        (
            "Observation/fresh",
            404,
            json!({"resourceType": "OperationOutcome"}),
        ),
        ("Consent?", 200, found(vec![])),
    ])
}

fn patient() -> Identity {
    Identity {
        user_id: "u".into(),
        roles: vec![Role::Patient, Role::Writer],
        fhir_user: Some("Patient/12".into()),
        ..Default::default()
    }
}

async fn run(mut r: Request) -> (Request, Option<Response>, Vec<String>) {
    let (mut cx, client) = context_with(server());
    cx.identity = Some(patient());
    let out = resolve(&chain(), &mut r, &cx).await.unwrap();
    (r, out, client.calls())
}

#[tokio::test]
async fn if_none_exist_sees_only_visible_matches() {
    let create = |crit: &str| {
        let mut r = req("POST", "/Observation", "", Some(obs("", "12")));
        r.headers.push(("if-none-exist".into(), crit.into()));
        r
    };
    // Another patient's match is as if nothing matched: a plain create.
    let (r, out, calls) = run(create("identifier=theirs")).await;
    assert!(out.is_none());
    assert_eq!(r.header("if-none-exist"), None);
    assert!(calls[0].starts_with("GET Observation?identifier=theirs&_count=100"));
    let (r, _, _) = run(create("identifier=none")).await;
    assert_eq!(r.header("if-none-exist"), None);
    // Visible matches are named by id: the server answers 200 (one) or 412 (several).
    let (r, _, _) = run(create("identifier=both")).await;
    assert_eq!(r.header("if-none-exist"), Some("_id=mine"));
    let (r, _, _) = run(create("identifier=two&_summary=count")).await;
    assert_eq!(r.header("if-none-exist"), Some("_id=mine,mine2"));
}

#[tokio::test]
async fn conditional_updates_patches_and_deletes_touch_only_visible_matches() {
    let (r, out, _) = run(req(
        "PUT",
        "/Observation",
        "identifier=both",
        Some(obs("", "12")),
    ))
    .await;
    assert!(out.is_none());
    assert_eq!(
        (r.path.as_str(), r.query.as_str()),
        ("/Observation", "_id=mine")
    );
    // Only another patient's match, no id: criteria that match nothing (the server creates).
    let (r, _, _) = run(req(
        "PUT",
        "/Observation",
        "identifier=theirs",
        Some(obs("", "12")),
    ))
    .await;
    assert!(r.query.starts_with("_id=gw-no-match-"), "{}", r.query);
    assert_eq!(ids_only(&r.query).map(|v| v.len()), Some(1));
    // ... with an id: an update of that id, only if it is absent or visible.
    let (r, out, _) = run(req(
        "PUT",
        "/Observation",
        "identifier=none",
        Some(obs("fresh", "12")),
    ))
    .await;
    assert!(out.is_none());
    assert_eq!(
        (r.path.as_str(), r.query.as_str()),
        ("/Observation/fresh", "")
    );
    let (_, out, _) = run(req(
        "PUT",
        "/Observation",
        "identifier=theirs",
        Some(obs("theirs", "12")),
    ))
    .await;
    assert_eq!(out.unwrap().status, 403);
    for m in ["PATCH", "DELETE"] {
        let (r, _, _) = run(req(m, "/Observation", "identifier=theirs", None)).await;
        assert!(r.query.starts_with("_id=gw-no-match-"), "{m}: {}", r.query);
        let (r, _, _) = run(req(m, "/Observation", "identifier=two", None)).await;
        assert_eq!(r.query, "_id=mine,mine2", "{m}");
    }
}

#[tokio::test]
async fn bundle_entries_are_rewritten_the_same_way() {
    let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": obs("", "12"), "request": {"method": "POST", "url": "Observation",
         "ifNoneExist": "identifier=theirs"}},
        {"resource": obs("", "12"), "request": {"method": "POST", "url": "Observation",
         "ifNoneExist": "identifier=both"}},
        {"resource": obs("", "12"), "request": {"method": "PUT",
         "url": "https://gw.example/fhir/Observation?identifier=both"}},
        {"request": {"method": "DELETE", "url": "Observation?identifier=theirs"}},
        {"request": {"method": "GET", "url": "Observation?identifier=theirs"}}]});
    let (r, out, _) = run(req("POST", "/", "", Some(b))).await;
    assert!(out.is_none());
    let v: Value = serde_json::from_slice(r.body.as_deref().unwrap()).unwrap();
    assert!(v["entry"][0]["request"].get("ifNoneExist").is_none());
    assert_eq!(v["entry"][1]["request"]["ifNoneExist"], "_id=mine");
    assert_eq!(v["entry"][2]["request"]["url"], "Observation?_id=mine");
    assert!(v["entry"][3]["request"]["url"]
        .as_str()
        .unwrap()
        .starts_with("Observation?_id=gw-no-match-"));
    assert_eq!(
        v["entry"][4]["request"]["url"],
        "Observation?identifier=theirs"
    );
    // A refusal names its entry.
    let b = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": obs("theirs", "12"), "request": {"method": "PUT",
         "url": "Observation?identifier=theirs"}}]});
    let (_, out, _) = run(req("POST", "/", "", Some(b))).await;
    let out = out.unwrap();
    assert_eq!(out.status, 403);
    assert!(out.json_body().unwrap()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .ends_with("(Bundle entry 0)"));
}

#[test]
fn who_is_filtered_and_what_is_conditional() {
    let admin = Identity {
        roles: vec![Role::Administrator],
        ..Default::default()
    };
    assert!(filtered(&chain(), Some(&patient())));
    assert!(!filtered(&chain(), Some(&admin)));
    assert!(!filtered(&[], Some(&patient())));
    let mut c = req("POST", "/Observation", "", None);
    assert!(!may_be_conditional(&c));
    c.headers
        .push(("if-none-exist".into(), "identifier=x".into()));
    assert!(may_be_conditional(&c));
    assert!(may_be_conditional(&req(
        "DELETE",
        "/Observation",
        "code=x",
        None
    )));
    assert!(!may_be_conditional(&req(
        "DELETE",
        "/Observation/1",
        "",
        None
    )));
    assert!(may_be_conditional(&req("POST", "/", "", None)));
    assert_eq!(
        criteria("identifier=urn:x|1&_count=1&_summary=count&_include=Observation:subject"),
        "identifier=urn:x%7C1"
    );
    assert_eq!(ids_only("_id=a,b"), Some(vec!["a".into(), "b".into()]));
    assert_eq!(ids_only("_id=a&code=x"), None);
    assert_eq!(ids_only("identifier=a"), None);
}
