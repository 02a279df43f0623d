//! ConsentOptOut as a whole: lookups, caching, per-resource verdicts through `process`.

use super::*;
use crate::testing::{context_with, ScriptedClient};
use serde_json::json;

const CAT: &str = "http://loinc.org|59284-0";

fn module() -> ConsentOptOut {
    ConsentOptOut::new(serde_json::from_value(json!({"category": CAT})).unwrap()).unwrap()
}

fn consent(patient: &str, period: Value, actors: &[&str]) -> Value {
    json!({"resourceType": "Consent", "id": format!("c-{patient}"), "status": "active",
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "provision": {"type": "deny", "period": period,
            "actor": actors.iter().map(|a| json!({"role": {"text": "x"}, "reference": {"reference": a}})).collect::<Vec<_>>()}})
}

fn bundle(rs: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "searchset",
           "entry": rs.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()})
}

fn obs(id: &str, p: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "subject": {"reference": format!("Patient/{p}")}})
}

fn who(fhir_user: &str) -> Identity {
    Identity {
        user_id: "u".into(),
        roles: vec![Role::Practitioner],
        fhir_user: Some(fhir_user.into()),
        ..Default::default()
    }
}

fn get() -> Request {
    Request {
        method: "GET".into(),
        path: "/Observation".into(),
        query: String::new(),
        headers: vec![],
        body: None,
    }
}

async fn ids_for(
    m: &ConsentOptOut,
    caller: Identity,
    client: ScriptedClient,
    body: Value,
) -> Vec<String> {
    let (mut cx, _) = context_with(client);
    cx.identity = Some(caller);
    let mut resp = Response::json(200, body);
    m.process(&get(), &mut resp, &cx).await.unwrap();
    resp.json_body().unwrap()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["search"]["mode"] != "outcome")
        .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn dates_and_periods() {
    assert_eq!(fhir_time("1970-01-01", false), Some(0));
    assert_eq!(fhir_time("1970-01-01", true), Some(86_399));
    assert_eq!(fhir_time("1970", true), Some(365 * 86_400 - 1));
    assert_eq!(fhir_time("1970-02", true), Some(59 * 86_400 - 1));
    assert_eq!(
        fhir_time("2000-02-29T12:00:00+02:00", false),
        fhir_time("2000-02-29T10:00:00Z", false)
    );
    assert_eq!(
        fhir_time("2024-06-01T00:00:00.123Z", false),
        Some(1_717_200_000)
    );
    for bad in [
        "",
        "20x4",
        "2024-13",
        "2023-02-29",
        "2024-01-01T25:00:00Z",
        "2024-01-01T10:00:00",
    ] {
        assert_eq!(fhir_time(bad, false), None, "{bad}");
    }
    let r = Resolver::new(&["http://fhir.internal/fhir"]);
    let p = provision::read(
        &json!({"type": "deny", "period": {"start": "1970-01-01T00:01:40Z"}}),
        &r,
        true,
    );
    let o = obs("a", "A");
    let caller = BTreeSet::new();
    for (now, applies) in [(99, false), (100, true), (i64::MAX, true)] {
        let s = Subject {
            resource: &o,
            subsetted: false,
            caller: &caller,
            now,
            resolver: &r,
        };
        assert_eq!(p.may_deny(&s), applies, "{now}");
    }
}

#[test]
fn consents_are_read_as_r4() {
    let r = Resolver::new(&["http://fhir.internal/fhir"]);
    let c = consent("A", json!({"start": "2020-01-01"}), &["Practitioner/p2"]);
    let o = rule(&c, "A", CAT, &r).unwrap();
    assert_eq!(
        o.root.actors,
        [provision::Actor::Is(Ref::new("Practitioner", "p2"))]
    );
    assert_eq!((o.root.permit, o.root.end), (false, None));
    // Other patient, other category, inactive: not A's Consents.
    assert!(rule(&c, "B", CAT, &r).is_none());
    assert!(rule(&c, "A", "http://loinc.org|00000-0", &r).is_none());
    let mut inactive = c.clone();
    inactive["status"] = json!("inactive");
    assert!(rule(&inactive, "A", CAT, &r).is_none());
    // A permit is read (its nested provisions may deny) and withholds nothing itself.
    let mut permit = c.clone();
    permit["provision"]["type"] = json!("permit");
    assert!(rule(&permit, "A", CAT, &r).unwrap().root.permit);
    // The predecessor's `actors` field does not exist in R4: no actor → everyone.
    let mut old = consent("A", json!({}), &[]);
    old["provision"]["actors"] = json!([{"reference": {"reference": "Practitioner/x"}}]);
    assert!(rule(&old, "A", CAT, &r).unwrap().root.actors.is_empty());
}

#[tokio::test]
async fn named_actor_blocks_only_that_actor() {
    let m = module();
    let client = || {
        ScriptedClient::by_url(vec![
            (
                "Consent?patient=Patient/A",
                200,
                bundle(vec![consent(
                    "A",
                    json!({"start": "2020-01-01"}),
                    &["Practitioner/p2"],
                )]),
            ),
            ("Consent?patient=Patient/B", 200, bundle(vec![])),
            ("PractitionerRole?", 200, bundle(vec![])),
        ])
    };
    let body = bundle(vec![obs("a", "A"), obs("b", "B")]);
    assert_eq!(
        ids_for(&m, who("Practitioner/p2"), client(), body.clone()).await,
        ["b"]
    );
    assert_eq!(
        ids_for(&m, who("Practitioner/p1"), client(), body).await,
        ["a", "b"]
    );
}

#[tokio::test]
async fn no_actor_blocks_everyone_but_the_patient() {
    let m = module();
    let client = || {
        ScriptedClient::by_url(vec![
            (
                "Consent?patient=Patient/A",
                200,
                bundle(vec![consent("A", json!({"end": "2999"}), &[])]),
            ),
            ("PractitionerRole?", 200, bundle(vec![])),
        ])
    };
    let body = bundle(vec![obs("a", "A")]);
    assert!(ids_for(&m, who("Practitioner/p1"), client(), body.clone())
        .await
        .is_empty());
    assert_eq!(ids_for(&m, who("Patient/A"), client(), body).await, ["a"]);
}

#[tokio::test]
async fn organisation_of_a_role_is_an_actor_and_expired_consents_do_not_count() {
    let m = module();
    let client = || {
        ScriptedClient::by_url(vec![
            (
                "Consent?patient=Patient/A",
                200,
                bundle(vec![consent("A", json!({}), &["Organization/org1"])]),
            ),
            (
                "Consent?patient=Patient/B",
                200,
                bundle(vec![consent("B", json!({"end": "2001-01-01"}), &[])]),
            ),
            (
                "PractitionerRole?",
                200,
                bundle(vec![
                    json!({"resourceType": "PractitionerRole", "id": "r",
                           "practitioner": {"reference": "Practitioner/p1"},
                           "organization": {"reference": "Organization/org1"}}),
                    // Someone else's role, answered by a server that ignored the search.
                    json!({"resourceType": "PractitionerRole", "id": "r2",
                           "practitioner": {"reference": "Practitioner/p2"},
                           "organization": {"reference": "Organization/org2"}}),
                ]),
            ),
        ])
    };
    let body = bundle(vec![obs("a", "A"), obs("b", "B")]);
    assert_eq!(
        ids_for(&m, who("Practitioner/p1"), client(), body).await,
        ["b"]
    );
}

#[tokio::test]
async fn nested_provisions_judge_each_resource() {
    let m = module();
    let mut c = consent("A", json!({}), &[]);
    c["provision"]["provision"] = json!([{"type": "permit", "data": [
        {"meaning": "instance", "reference": {"reference": "Observation/shared"}}]}]);
    let mut d = consent("B", json!({}), &[]);
    d["id"] = json!("c-B");
    d["provision"] = json!({"type": "permit", "provision": [{"type": "deny",
        "actor": [{"reference": {"reference": "Practitioner/p2"}}],
        "period": {"start": "2020-01-01", "end": "2999-12-31"}}]});
    let client = || {
        ScriptedClient::by_url(vec![
            ("Consent?patient=Patient/A", 200, bundle(vec![c.clone()])),
            ("Consent?patient=Patient/B", 200, bundle(vec![d.clone()])),
            ("PractitionerRole?", 200, bundle(vec![])),
        ])
    };
    let body = bundle(vec![obs("shared", "A"), obs("a", "A"), obs("b", "B")]);
    assert_eq!(
        ids_for(&m, who("Practitioner/p1"), client(), body.clone()).await,
        ["shared", "b"]
    );
    assert_eq!(
        ids_for(&m, who("Practitioner/p2"), client(), body.clone()).await,
        ["shared"]
    );
    assert_eq!(
        ids_for(&m, who("Patient/A"), client(), body).await,
        ["shared", "a", "b"]
    );
}

#[tokio::test]
async fn cached_until_a_consent_is_written() {
    let m = module();
    let (mut cx, client) = context_with(ScriptedClient::by_url(vec![
        ("Consent?", 200, bundle(vec![])),
        ("PractitionerRole?", 200, bundle(vec![])),
    ]));
    cx.identity = Some(who("Practitioner/p1"));
    for _ in 0..3 {
        let mut resp = Response::json(200, bundle(vec![obs("a", "A")]));
        m.process(&get(), &mut resp, &cx).await.unwrap();
    }
    assert_eq!(client.calls().len(), 2, "{:?}", client.calls());
    m.invalidate("Consent");
    let mut resp = Response::json(200, bundle(vec![obs("a", "A")]));
    m.process(&get(), &mut resp, &cx).await.unwrap();
    assert_eq!(client.calls().len(), 3);
}

#[tokio::test]
async fn lookup_failure_denies() {
    let m = module();
    let (mut cx, _) = context_with(ScriptedClient::by_url(vec![("", 500, json!({}))]));
    cx.identity = Some(who("Patient/Z"));
    let mut resp = Response::json(200, obs("a", "A"));
    assert!(matches!(
        m.process(&get(), &mut resp, &cx).await,
        Err(ModuleError::Unavailable(_))
    ));
}
