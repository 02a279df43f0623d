use super::*;
use crate::identity::Identity;
use crate::processor::Body;
use crate::testing::{context, req, MemorySink};
use serde_json::json;
use std::sync::Arc;

fn module(cloudevents: bool) -> PublishFhirEvent {
    PublishFhirEvent::new(Settings {
        cloudevents,
        source: None,
        ce_type_prefix: default_prefix(),
    })
    .unwrap()
}

fn resp(status: u16, headers: &[(&str, &str)], body: Option<Value>) -> Response {
    Response {
        status,
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        body: body.map_or(Body::None, Body::Json),
    }
}

/// Runs the module (checking `applies` first) and returns what it published.
async fn run(m: &PublishFhirEvent, rq: &Request, mut rs: Response) -> Vec<(String, Value)> {
    let sink = Arc::new(MemorySink::default());
    let mut cx = context();
    cx.correlation_id = "corr-1".into();
    cx.identity = Some(Identity {
        user_id: "oid-7".into(),
        tenant: Some("tid-1".into()),
        ..Default::default()
    });
    cx.events = sink.clone();
    assert!(m.applies(rq, None), "{} {} must apply", rq.method, rq.path);
    let before = rs.clone();
    let out = m.process(rq, &mut rs, &cx).await.unwrap();
    assert!(matches!(out, PostOutcome::Continue));
    assert_eq!(rs, before, "the response is never changed");
    let got = sink.0.lock().unwrap().clone();
    got
}

async fn publish(rq: Request, rs: Response) -> Vec<(String, Value)> {
    run(&module(false), &rq, rs).await
}

#[tokio::test]
async fn create_returns_the_resource() {
    let got = publish(
        req(
            "POST",
            "/Patient",
            "",
            Some(json!({"resourceType": "Patient"})),
        ),
        resp(
            201,
            &[(
                "location",
                "http://fhir.internal/fhir/Patient/p1/_history/1",
            )],
            Some(json!({"resourceType": "Patient", "id": "p1",
                "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00.000+00:00"}})),
        ),
    )
    .await;
    assert_eq!(got.len(), 1);
    let (key, e) = &got[0];
    assert_eq!(key, "Patient/p1", "a Patient is its own compartment owner");
    assert_eq!(
        e,
        &json!({"action": "Created", "resourcetype": "Patient", "id": "p1", "version": "1",
            "lastupdated": "2024-05-01T10:00:00.000+00:00", "source": "https://gw.example/fhir",
            "tenant": "tid-1", "user": "oid-7", "correlationid": "corr-1",
            "patient": "Patient/p1"})
    );
}

#[tokio::test]
async fn update_and_put_as_create() {
    let body = json!({"resourceType": "Organization", "id": "o1", "meta": {"versionId": "4"}});
    let got = publish(
        req("PUT", "/Organization/o1", "", Some(body.clone())),
        resp(200, &[("etag", "W/\"4\"")], Some(body.clone())),
    )
    .await;
    assert_eq!(got.len(), 1);
    let (key, e) = &got[0];
    assert_eq!(key, "Organization/o1", "no patient: type/id");
    assert_eq!(e["action"], "Updated");
    assert_eq!(e["version"], "4");
    assert_eq!(e["patient"], Value::Null);
    assert!(e["lastupdated"].is_string(), "falls back to now");

    let got = publish(
        req("PUT", "/Organization/o2", "", Some(body.clone())),
        resp(201, &[("etag", "W/\"1\"")], None),
    )
    .await;
    assert_eq!(got[0].1["action"], "Created", "PUT that created");
    assert_eq!(got[0].1["id"], "o2", "the path names the instance");
    assert_eq!(got[0].1["version"], "1", "from the ETag");
}

#[tokio::test]
async fn patch_is_an_update() {
    let got = publish(
        req(
            "PATCH",
            "/Observation/ob1",
            "",
            Some(json!([{"op": "replace", "path": "/status", "value": "final"}])),
        ),
        resp(
            200,
            &[("etag", "W/\"3\"")],
            Some(json!({"resourceType": "Observation", "id": "ob1",
                "meta": {"versionId": "3"}, "subject": {"reference": "Patient/x"}})),
        ),
    )
    .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "Patient/x");
    assert_eq!(got[0].1["action"], "Updated");
    assert_eq!(got[0].1["version"], "3");
}

#[tokio::test]
async fn delete_takes_the_id_from_the_path() {
    for status in [200, 204] {
        let body = (status == 200).then(|| {
            json!({"resourceType": "OperationOutcome", "issue": [{"severity": "information",
                "code": "informational", "diagnostics": "deleted"}]})
        });
        let got = publish(
            req("DELETE", "/Observation/ob1", "", None),
            resp(
                status,
                &[
                    ("etag", "W/\"5\""),
                    ("last-modified", "Wed, 01 May 2024 10:00:00 GMT"),
                ],
                body,
            ),
        )
        .await;
        assert_eq!(got.len(), 1, "{status}");
        let (key, e) = &got[0];
        assert_eq!(key, "Observation/ob1");
        assert_eq!(e["action"], "Deleted");
        assert_eq!(e["resourcetype"], "Observation");
        assert_eq!(e["id"], "ob1");
        assert_eq!(e["version"], "5");
        assert_eq!(e["lastupdated"], "2024-05-01T10:00:00Z");
        assert_eq!(e["patient"], Value::Null);
    }
    let got = publish(req("DELETE", "/Patient/p9", "", None), resp(204, &[], None)).await;
    assert_eq!(got[0].0, "Patient/p9");
    assert_eq!(got[0].1["version"], Value::Null);
    // A server that returns the deleted resource: its owner is known.
    let got = publish(
        req("DELETE", "/Observation/ob2", "", None),
        resp(
            200,
            &[],
            Some(json!({"resourceType": "Observation", "id": "ob2",
                "subject": {"reference": "Patient/z"}})),
        ),
    )
    .await;
    assert_eq!(got[0].0, "Patient/z");
    assert_eq!(got[0].1["action"], "Deleted");
}

#[tokio::test]
async fn conditional_forms() {
    // Conditional update: the identity comes from the returned body.
    let got = publish(
        req(
            "PUT",
            "/Observation",
            "identifier=urn:x|1",
            Some(json!({"resourceType": "Observation", "subject": {"reference": "Patient/a"}})),
        ),
        resp(
            200,
            &[],
            Some(json!({"resourceType": "Observation", "id": "ob7",
                "meta": {"versionId": "2"}, "subject": {"reference": "Patient/a"}})),
        ),
    )
    .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "Patient/a");
    assert_eq!(got[0].1["id"], "ob7");
    assert_eq!(got[0].1["action"], "Updated");
    assert!(got[0].1.get("criteria").is_none());

    // Conditional create through PUT, return=minimal: Location + ETag; the patient from
    // the resource that was sent.
    let got = publish(
        req(
            "PUT",
            "/Observation",
            "identifier=urn:x|2",
            Some(json!({"resourceType": "Observation", "subject": {"reference": "Patient/b"}})),
        ),
        resp(
            201,
            &[
                ("location", "Observation/ob8/_history/1"),
                ("etag", "W/\"1\""),
            ],
            None,
        ),
    )
    .await;
    assert_eq!(got[0].0, "Patient/b");
    assert_eq!(got[0].1["action"], "Created");
    assert_eq!(got[0].1["id"], "ob8");

    // Conditional delete with nothing to identify the resource: still published.
    let got = publish(
        req("DELETE", "/Observation", "identifier=urn:x|3", None),
        resp(204, &[], None),
    )
    .await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "Observation");
    assert_eq!(got[0].1["id"], Value::Null);
    assert_eq!(got[0].1["criteria"], "Observation?identifier=urn:x|3");

    // ... and with a Location it is identified.
    let got = publish(
        req("DELETE", "/Observation", "identifier=urn:x|3", None),
        resp(
            200,
            &[("location", "https://gw.example/fhir/Observation/ob9")],
            None,
        ),
    )
    .await;
    assert_eq!(got[0].1["id"], "ob9");
    assert!(got[0].1.get("criteria").is_none());
}

#[tokio::test]
async fn return_minimal_create_uses_location_and_etag() {
    let got = publish(
        req(
            "POST",
            "/Observation",
            "",
            Some(json!({"resourceType": "Observation",
                "subject": {"reference": "https://gw.example/fhir/Patient/x"}})),
        ),
        resp(
            201,
            &[
                (
                    "location",
                    "http://fhir.internal/fhir/Observation/ob1/_history/3",
                ),
                ("etag", "W/\"3\""),
                ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
            ],
            None,
        ),
    )
    .await;
    assert_eq!(got.len(), 1);
    let (key, e) = &got[0];
    assert_eq!(key, "Patient/x");
    assert_eq!(e["action"], "Created");
    assert_eq!(e["resourcetype"], "Observation");
    assert_eq!(e["id"], "ob1");
    assert_eq!(e["version"], "3");
    assert_eq!(e["lastupdated"], "1994-11-06T08:49:37Z");

    // return=OperationOutcome: the body is ignored, the Location (relative) counts.
    let got = publish(
        req("POST", "/Encounter", "", None),
        resp(
            201,
            &[("location", "Encounter/e1/_history/1")],
            Some(json!({"resourceType": "OperationOutcome", "id": "nope", "issue": []})),
        ),
    )
    .await;
    assert_eq!(got[0].1["id"], "e1");
    assert_eq!(got[0].1["version"], "1");
    assert_eq!(got[0].0, "Encounter/e1");
}

#[tokio::test]
async fn batch_with_a_delete_pairs_entries_with_the_request() {
    let request = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "POST", "url": "Observation"},
         "resource": {"resourceType": "Observation", "subject": {"reference": "Patient/x"}}},
        {"request": {"method": "GET", "url": "Patient/x"}},
        {"request": {"method": "DELETE", "url": "Observation/old"}},
        {"request": {"method": "PUT", "url": "https://gw.example/fhir/Patient/x"},
         "resource": {"resourceType": "Patient", "id": "x"}},
        {"request": {"method": "POST", "url": "Observation"},
         "resource": {"resourceType": "Observation"}},
        {"request": {"method": "POST", "url": "Patient/_search"}},
        {"request": {"method": "POST", "url": "Patient/x/$everything"}}
    ]});
    let response = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
        {"response": {"status": "201 Created", "location": "Observation/n1/_history/1",
                      "etag": "W/\"1\"", "lastModified": "2024-05-01T10:00:00Z"}},
        {"resource": {"resourceType": "Patient", "id": "x"},
         "response": {"status": "200 OK", "etag": "W/\"2\""}},
        {"response": {"status": "204 No Content"}},
        {"resource": {"resourceType": "Patient", "id": "x", "meta": {"versionId": "3"}},
         "response": {"status": "200 OK", "location": "Patient/x/_history/3"}},
        {"response": {"status": "400 Bad Request",
                      "outcome": {"resourceType": "OperationOutcome"}}},
        {"resource": {"resourceType": "Bundle", "type": "searchset"},
         "response": {"status": "200 OK"}},
        {"resource": {"resourceType": "Bundle", "type": "searchset"},
         "response": {"status": "200 OK"}}
    ]});
    let got = publish(
        req("POST", "", "", Some(request)),
        resp(200, &[], Some(response)),
    )
    .await;
    let summary: Vec<(String, String, String)> = got
        .iter()
        .map(|(k, e)| {
            (
                k.clone(),
                e["action"].as_str().unwrap().to_string(),
                format!("{}/{}", e["resourcetype"], e["id"]),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "Patient/x".into(),
                "Created".into(),
                "\"Observation\"/\"n1\"".into()
            ),
            (
                "Observation/old".into(),
                "Deleted".into(),
                "\"Observation\"/\"old\"".into()
            ),
            (
                "Patient/x".into(),
                "Updated".into(),
                "\"Patient\"/\"x\"".into()
            ),
        ]
    );
    assert_eq!(got[0].1["version"], "1");
    assert_eq!(got[0].1["lastupdated"], "2024-05-01T10:00:00Z");
    assert_eq!(got[2].1["version"], "3");
}

#[tokio::test]
async fn transaction_response_resolves_references_between_entries() {
    let request = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
         "request": {"method": "POST", "url": "Patient"},
         "resource": {"resourceType": "Patient"}},
        {"request": {"method": "POST", "url": "Observation"},
         "resource": {"resourceType": "Observation",
                      "subject": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"}}},
        {"request": {"method": "DELETE", "url": "Observation?identifier=urn:x|9"}}
    ]});
    let response = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "201 Created",
                      "location": "http://fhir.internal/fhir/Patient/np/_history/1"}},
        {"response": {"status": "201 Created", "location": "Observation/no/_history/1"}},
        {"response": {"status": "204 No Content"}}
    ]});
    let got = publish(
        req("POST", "/", "", Some(request)),
        resp(200, &[], Some(response)),
    )
    .await;
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].0, "Patient/np");
    assert_eq!(got[0].1["action"], "Created");
    assert_eq!(
        got[1].0, "Patient/np",
        "urn:uuid resolved through the location"
    );
    assert_eq!(got[1].1["id"], "no");
    assert_eq!(got[1].1["patient"], "Patient/np");
    assert_eq!(got[2].1["action"], "Deleted");
    assert_eq!(got[2].1["criteria"], "Observation?identifier=urn:x|9");
    assert_eq!(got[2].0, "Observation");
}

#[tokio::test]
async fn bundle_without_the_request_is_inferred() {
    let response = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
        {"response": {"status": "201 Created", "location": "Observation/a/_history/1"}},
        {"resource": {"resourceType": "Observation", "id": "b", "meta": {"versionId": "2"},
                      "subject": {"reference": "Patient/q"}},
         "response": {"status": "200 OK", "location": "Observation/b/_history/2"}},
        {"resource": {"resourceType": "Patient", "id": "r"}, "response": {"status": "200 OK"}},
        {"response": {"status": "204 No Content"}},
        {"response": {"status": "201"}}
    ]});
    let got = publish(req("POST", "", "", None), resp(200, &[], Some(response))).await;
    let ids: Vec<(&str, &str, &str)> = got
        .iter()
        .map(|(k, e)| {
            (
                k.as_str(),
                e["action"].as_str().unwrap(),
                e["id"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    // 200 without location (a read) and 204 (a delete, unknowable) are skipped; a 201 with
    // neither resource nor location has no type: skipped.
    assert_eq!(
        ids,
        [
            ("Observation/a", "Created", "a"),
            ("Patient/q", "Updated", "b")
        ]
    );
}

#[tokio::test]
async fn failed_writes_publish_nothing() {
    let m = module(false);
    for (method, path, status) in [
        ("POST", "/Patient", 400),
        ("PUT", "/Patient/1", 412),
        ("DELETE", "/Patient/1", 404),
        ("PATCH", "/Patient/1", 422),
        ("POST", "/Patient", 500),
        ("POST", "/Patient", 200), // conditional create that matched: nothing written
        ("DELETE", "/Patient/1", 202),
    ] {
        let got = run(
            &m,
            &req(method, path, "", None),
            resp(
                status,
                &[("location", "Patient/1/_history/1")],
                Some(json!({"resourceType": "OperationOutcome", "issue": []})),
            ),
        )
        .await;
        assert!(got.is_empty(), "{method} {path} {status}: {got:?}");
    }
    // A failed batch (4xx on the whole Bundle).
    let got = run(
        &m,
        &req("POST", "", "", None),
        resp(
            400,
            &[],
            Some(json!({"resourceType": "OperationOutcome", "issue": []})),
        ),
    )
    .await;
    assert!(got.is_empty());
}

#[tokio::test]
async fn reads_searches_and_operations_do_not_apply() {
    let m = module(false);
    for (method, path) in [
        ("GET", "/Patient/1"),
        ("HEAD", "/Patient/1"),
        ("GET", "/Patient"),
        ("GET", ""),
        ("POST", "/Patient/_search"),
        ("POST", "/_search"),
        ("POST", "/Patient/1/$everything"),
        ("POST", "/$export"),
        ("POST", "/Patient/$validate"),
        ("POST", "/Observation/1/$meta-add"),
        ("GET", "/Patient/1/_history/2"),
        ("POST", "/Patient/1/Observation/_search"),
        ("PUT", "/Patient"),
        ("DELETE", "/metadata"),
    ] {
        assert!(
            !m.applies(&req(method, path, "", None), None),
            "{method} {path}"
        );
    }
    for (method, path, query) in [
        ("POST", "/Patient", ""),
        ("PUT", "/Patient/1", ""),
        ("PUT", "/Patient", "identifier=x"),
        ("PATCH", "/Patient/1", ""),
        ("DELETE", "/Patient/1", ""),
        ("DELETE", "/Patient", "identifier=x"),
        ("POST", "", ""),
        ("POST", "/", ""),
    ] {
        assert!(
            m.applies(&req(method, path, query, None), None),
            "{method} {path}"
        );
    }
    // Even if called, an operation's answer publishes nothing.
    let sink = Arc::new(MemorySink::default());
    let mut cx = context();
    cx.events = sink.clone();
    let mut r = resp(
        200,
        &[],
        Some(json!({"resourceType": "Parameters", "id": "p"})),
    );
    m.process(&req("POST", "/Patient/$validate", "", None), &mut r, &cx)
        .await
        .unwrap();
    m.process(&req("POST", "/Patient/_search", "", None), &mut r, &cx)
        .await
        .unwrap();
    assert!(sink.0.lock().unwrap().is_empty());
}

#[tokio::test]
async fn keyed_by_the_patient() {
    let obs = json!({"resourceType": "Observation", "id": "o1", "meta": {"versionId": "1"},
        "subject": {"reference": "Patient/x"}});
    let got = publish(
        req("POST", "/Observation", "", Some(obs.clone())),
        resp(201, &[], Some(obs)),
    )
    .await;
    assert_eq!(got[0].0, "Patient/x");
    assert_eq!(got[0].1["patient"], "Patient/x");

    // Several owners: the first in sorted order.
    let obs = json!({"resourceType": "Observation", "id": "o2",
        "subject": {"reference": "Patient/zed"},
        "performer": [{"reference": "http://fhir.internal/fhir/Patient/abe"}]});
    let got = publish(
        req("PUT", "/Observation/o2", "", None),
        resp(200, &[], Some(obs)),
    )
    .await;
    assert_eq!(got[0].0, "Patient/abe");

    // Unresolvable owner (another server): no patient, keyed by type/id.
    let obs = json!({"resourceType": "Observation", "id": "o3",
        "subject": {"reference": "https://elsewhere/fhir/Patient/1"}});
    let got = publish(
        req("PUT", "/Observation/o3", "", None),
        resp(200, &[], Some(obs)),
    )
    .await;
    assert_eq!(got[0].0, "Observation/o3");
    assert_eq!(got[0].1["patient"], Value::Null);

    // A Patient with links is still its own owner.
    let p = json!({"resourceType": "Patient", "id": "p9",
        "link": [{"other": {"reference": "Patient/a0"}, "type": "seealso"}]});
    let got = publish(req("PUT", "/Patient/p9", "", None), resp(200, &[], Some(p))).await;
    assert_eq!(got[0].0, "Patient/p9");
}

#[tokio::test]
async fn cloudevents_envelope() {
    let m = PublishFhirEvent::new(Settings {
        cloudevents: true,
        source: Some("urn:gw:test".into()),
        ce_type_prefix: "org.example.fhir.".into(),
    })
    .unwrap();
    let obs = json!({"resourceType": "Observation", "id": "o1",
        "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00Z"},
        "subject": {"reference": "Patient/x"}});
    let rq = req("POST", "/Observation", "", None);
    let a = run(&m, &rq, resp(201, &[], Some(obs.clone()))).await;
    let b = run(&m, &rq, resp(201, &[], Some(obs))).await;
    let (key, ce) = &a[0];
    assert_eq!(key, "Patient/x");
    assert_eq!(ce["specversion"], "1.0");
    assert_eq!(ce["source"], "urn:gw:test");
    assert_eq!(ce["type"], "org.example.fhir.created");
    assert_eq!(ce["subject"], "Observation/o1");
    assert_eq!(ce["time"], "2024-05-01T10:00:00Z");
    assert_eq!(ce["datacontenttype"], "application/json");
    assert_eq!(ce["data"]["action"], "Created");
    assert_eq!(ce["data"]["source"], "urn:gw:test");
    assert_eq!(ce["data"]["correlationid"], "corr-1");
    let id = ce["id"].as_str().unwrap();
    assert_eq!(id.len(), 36);
    assert_eq!(&id[14..15], "4");
    assert_ne!(id, b[0].1["id"].as_str().unwrap(), "ids are unique");

    let d = run(
        &m,
        &req("DELETE", "/Observation/o1", "", None),
        resp(204, &[], None),
    )
    .await;
    assert_eq!(d[0].1["type"], "org.example.fhir.deleted");
}

#[test]
fn settings_and_registry() {
    use crate::builtin::build_post;
    assert!(build_post("PublishFHIREvent", &Value::Null).is_ok());
    assert!(build_post(
        "PublishFHIREvent",
        &json!({"cloudevents": true, "source": "urn:x", "ce_type_prefix": "a.b"})
    )
    .is_ok());
    let e = build_post("PublishFHIREvent", &json!({"cloud_events": true}))
        .err()
        .unwrap();
    assert!(e.contains("unknown field"), "{e}");
    assert!(build_post("PublishFHIREvent", &json!({"source": " "})).is_err());
    assert!(build_post("PublishFHIREvent", &json!({"ce_type_prefix": ""})).is_err());
}

#[test]
fn locations_etags_and_dates() {
    let r = Resolver::new(&["https://gw.example/fhir", "http://fhir.internal/fhir/"]);
    let v = |s: &str, e: Option<&str>| parse_location(s, &r, e).map(|(r, v)| (r.to_string(), v));
    assert_eq!(
        v("Patient/1/_history/2", None),
        Some(("Patient/1".into(), Some("2".into())))
    );
    assert_eq!(v("Patient/1", None), Some(("Patient/1".into(), None)));
    assert_eq!(
        v("http://fhir.internal/fhir/Patient/1/_history/2", None),
        Some(("Patient/1".into(), Some("2".into())))
    );
    assert_eq!(
        v("https://gw.example/fhir/Patient/1?x=1", None),
        Some(("Patient/1".into(), None))
    );
    // Another base: only when it names the type written.
    assert_eq!(
        v(
            "https://node-3:8080/fhir/Patient/1/_history/2",
            Some("Patient")
        ),
        Some(("Patient/1".into(), Some("2".into())))
    );
    assert_eq!(
        v("https://node-3:8080/fhir/Patient/1", Some("Observation")),
        None
    );
    assert_eq!(v("https://node-3:8080/fhir/Patient/1", None), None);
    assert_eq!(
        v("/fhir/Patient/1/_history/7", Some("Patient")),
        Some(("Patient/1".into(), Some("7".into())))
    );
    assert_eq!(v("Patient/1/extra", None), None);
    assert_eq!(v("patient/1", None), None);
    assert_eq!(v("Patient/bad id", None), None);
    assert_eq!(v("", None), None);

    assert_eq!(parse_etag("W/\"3\"").as_deref(), Some("3"));
    assert_eq!(parse_etag("\"abc-1\"").as_deref(), Some("abc-1"));
    assert_eq!(parse_etag("3"), None);
    assert_eq!(parse_etag("W/\"\""), None);

    assert_eq!(
        http_date_to_instant("Sun, 06 Nov 1994 08:49:37 GMT").as_deref(),
        Some("1994-11-06T08:49:37Z")
    );
    assert_eq!(http_date_to_instant("Sunday, 06-Nov-94 08:49:37 GMT"), None);
    assert_eq!(http_date_to_instant("Sun, 06 Foo 1994 08:49:37 GMT"), None);

    assert_eq!(
        instant(UNIX_EPOCH + std::time::Duration::from_millis(951_782_400_123)),
        "2000-02-29T00:00:00.123Z"
    );
    assert_eq!(instant(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    assert_eq!(
        instant(UNIX_EPOCH + std::time::Duration::from_secs(1_735_689_599)),
        "2024-12-31T23:59:59.000Z"
    );
}

#[test]
fn entry_statuses() {
    let s = |x: &str| entry_status(&json!({"response": {"status": x}}));
    assert_eq!(s("201 Created"), Some(201));
    assert_eq!(s("204"), Some(204));
    assert_eq!(s("2001"), None);
    assert_eq!(s("OK"), None);
}

#[tokio::test]
async fn a_delete_is_keyed_by_the_patient_of_its_last_version() {
    let (mut cx, client) =
        crate::testing::context_with(crate::testing::ScriptedClient::by_url(vec![(
            "Observation/o9/_history",
            200,
            json!({"resourceType": "Bundle", "type": "history", "entry": [
            {"request": {"method": "DELETE", "url": "Observation/o9"}},
            {"resource": {"resourceType": "Observation", "id": "o9",
                          "subject": {"reference": "Patient/p7"}}}]}),
        )]));
    let sink = std::sync::Arc::new(crate::testing::MemorySink::default());
    cx.events = sink.clone();
    let m = module(false);
    let rq = req("DELETE", "/Observation/o9", "", None);
    let mut rs = resp(204, &[], None);
    m.process(&rq, &mut rs, &cx).await.unwrap();
    let got = sink.0.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "Patient/p7");
    assert_eq!(got[0].1["patient"], "Patient/p7");
    assert_eq!(got[0].1["action"], "Deleted");
    assert_eq!(client.calls(), ["GET Observation/o9/_history?_count=5"]);
}

#[test]
fn the_event_is_written_in_its_key_order_with_nulls_and_escapes() {
    let mut cx = context();
    cx.correlation_id = "corr \"1\"".into();
    let w = Write {
        action: Action::Updated,
        rtype: "Observation".into(),
        id: Some("o1".into()),
        version: None,
        last_updated: Some("2024-05-01T10:00:00Z".into()),
        patient: None,
        criteria: Some("Observation?code=a\\b".into()),
    };
    let plain = module(false).event_json(&w, &cx);
    assert_eq!(
        std::str::from_utf8(&plain).unwrap(),
        r#"{"action":"Updated","resourcetype":"Observation","id":"o1","version":null,"lastupdated":"2024-05-01T10:00:00Z","source":"https://gw.example/fhir","tenant":null,"user":null,"correlationid":"corr \"1\"","patient":null,"criteria":"Observation?code=a\\b"}"#
    );
    let ce = module(true).event_json(&w, &cx);
    let text = std::str::from_utf8(&ce).unwrap();
    let v: Value = serde_json::from_slice(&ce).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "specversion",
            "id",
            "source",
            "type",
            "subject",
            "time",
            "datacontenttype",
            "data"
        ]
    );
    assert!(text.ends_with(&format!(
        ",\"data\":{}}}",
        std::str::from_utf8(&plain).unwrap()
    )));
    assert_eq!(v["type"], "org.hl7.fhir.resource.updated");
}
