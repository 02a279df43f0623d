use super::*;
use crate::testing::{context_with, ScriptedClient};

fn req(body: Value) -> Request {
    Request {
        method: "POST".into(),
        path: "".into(),
        query: String::new(),
        headers: vec![],
        body: Some(serde_json::to_vec(&body).unwrap()),
    }
}

fn patient(id: &str, version: &str, family: &str) -> Value {
    json!({"resourceType":"Patient","id":id,"name":[{"family":family}],
           "meta":{"versionId":version,"lastUpdated":"2026-01-01T00:00:00Z","tag":[{"code":"t"}]}})
}

fn entry(method: &str, url: &str) -> Value {
    json!({"request":{"method":method,"url":url}})
}

#[test]
fn targets_and_versions() {
    assert_eq!(target_of("Patient/1").as_deref(), Some("Patient/1"));
    assert_eq!(target_of("/Patient/1").as_deref(), Some("Patient/1"));
    assert_eq!(target_of("Patient?_id=1").as_deref(), Some("Patient/1"));
    assert_eq!(target_of("Patient?_id=1&name=x"), None);
    assert_eq!(target_of("Patient?identifier=x"), None);
    assert_eq!(target_of("Patient"), None);
    assert_eq!(target_of("Patient/1/_history/2"), None);
    assert_eq!(version_of("W/\"3\""), "3");
    assert_eq!(version_of("\"3\""), "3");
}

#[tokio::test]
async fn pin_reads_each_target_once_and_pins_its_version() {
    let client = ScriptedClient::by_url(vec![
        ("Patient/there", 200, patient("there", "4", "A")),
        (
            "Patient/gone",
            410,
            json!({"resourceType":"OperationOutcome"}),
        ),
        (
            "Patient/none",
            404,
            json!({"resourceType":"OperationOutcome"}),
        ),
    ]);
    let (cx, client) = context_with(client);
    let mut entries = vec![
        entry("PUT", "Patient/there"),
        entry("PUT", "Patient/gone"),
        entry("DELETE", "Patient/none"),
        entry("PUT", "Patient/fresh"),
        entry("PUT", "Patient?identifier=x"),
        entry("POST", "Patient"),
        entry("GET", "Patient/there"),
    ];
    let fresh = HashSet::from(["Patient/fresh".to_string()]);
    let refused = pin(&mut entries, &fresh, &Caps::default(), &cx)
        .await
        .unwrap();
    assert!(refused.is_none(), "{refused:?}");
    assert_eq!(entries[0]["request"]["ifMatch"], "W/\"4\"");
    for (i, e) in entries.iter().enumerate().skip(1) {
        assert!(e["request"].get("ifMatch").is_none(), "entry {i}");
    }
    assert_eq!(
        client.calls(),
        ["GET Patient/there", "GET Patient/gone", "GET Patient/none"]
    );
}

#[tokio::test]
async fn pin_refuses_what_could_not_be_undone() {
    let there = || ScriptedClient::by_url(vec![("Patient/p", 200, patient("p", "2", "A"))]);
    let cases: Vec<(Vec<Value>, Caps, u16, &str)> = vec![
        (
            vec![entry("DELETE", "Patient?identifier=x")],
            Caps::default(),
            400,
            "conditional DELETE",
        ),
        (
            vec![entry("PATCH", "Patient?identifier=x")],
            Caps::default(),
            400,
            "conditional PATCH",
        ),
        (
            vec![entry("PUT", "Patient/p"), entry("DELETE", "Patient/p")],
            Caps::default(),
            400,
            "more than one entry",
        ),
        (
            vec![json!({"request":{"method":"PUT","url":"Patient/p","ifMatch":"W/\"1\""}})],
            Caps::default(),
            412,
            "version 2",
        ),
        (
            vec![entry("PUT", "Patient/p")],
            Caps {
                transaction: false,
                no_vread: ["Patient".to_string()].into(),
            },
            400,
            "no vread",
        ),
    ];
    for (mut entries, caps, status, says) in cases {
        let (cx, _) = context_with(there());
        let r = pin(&mut entries, &HashSet::new(), &caps, &cx)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{says}: not refused"));
        assert_eq!(r.status, status, "{says}");
        let d = r.json_body().unwrap()["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(d.contains(says), "{d}");
    }
    // A client's If-Match equal to the current version is kept.
    let (cx, _) = context_with(there());
    let mut ok = vec![json!({"request":{"method":"PUT","url":"Patient/p","ifMatch":"W/\"2\""}})];
    assert!(pin(&mut ok, &HashSet::new(), &Caps::default(), &cx)
        .await
        .unwrap()
        .is_none());
    // A read that fails is no pass: the transaction is not sent.
    let (cx, _) = context_with(ScriptedClient::by_url(vec![("Patient/p", 503, json!({}))]));
    let mut e = vec![entry("PUT", "Patient/p")];
    assert!(matches!(
        pin(&mut e, &HashSet::new(), &Caps::default(), &cx).await,
        Err(ModuleError::Unavailable(_))
    ));
}

fn tx() -> Request {
    req(
        json!({"resourceType":"Bundle","type":"transaction","entry":[
            {"request":{"method":"POST","url":"Patient"}},
            {"request":{"method":"PUT","url":"Patient/old"}},
            {"request":{"method":"DELETE","url":"Patient/dead"}},
            {"request":{"method":"DELETE","url":"Patient/missing"}}
        ]}),
    )
}

fn batch() -> Request {
    req(json!({"resourceType":"Bundle","type":"batch","entry":[
        {"request":{"method":"PUT","url":"Patient/new-uuid"}},
        {"request":{"method":"PUT","url":"Patient/old","ifMatch":"W/\"1\""}},
        {"request":{"method":"DELETE","url":"Patient/dead","ifMatch":"W/\"7\""}},
        {"request":{"method":"DELETE","url":"Patient/missing"}}
    ]}))
}

fn answered(last: &str) -> Response {
    Response::json(
        200,
        json!({"resourceType":"Bundle","type":"batch-response","entry":[
            {"response":{"status":"201 Created","location":"http://fhir.internal/fhir/Patient/new-uuid/_history/1","etag":"W/\"1\""}},
            {"response":{"status":"200 OK","location":"http://fhir.internal/fhir/Patient/old/_history/2","etag":"W/\"2\""}},
            {"response":{"status":"204 No Content"}},
            {"response":{"status":last,"outcome":{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"not-found","diagnostics":"Patient/missing is not known"}]}}}
        ]}),
    )
}

#[tokio::test]
async fn all_succeeded_is_a_transaction_response_and_nothing_else_is_called() {
    let (cx, client) = context_with(ScriptedClient::new(vec![]));
    let mut resp = answered("204 No Content");
    let before = resp.clone();
    finish(&tx(), &batch(), &mut resp, &cx).await.unwrap();
    assert_eq!(resp.status, 200);
    let b = resp.json_body().unwrap();
    assert_eq!(b["type"], "transaction-response");
    assert_eq!(b["entry"], before.json_body().unwrap()["entry"]);
    assert!(client.calls().is_empty());
}

#[tokio::test]
async fn a_failed_entry_undoes_the_others_last_first() {
    let client = ScriptedClient::by_url(vec![
        ("Patient/new-uuid", 204, json!({})),
        ("Patient/old/_history/1", 200, patient("old", "1", "Before")),
        ("Patient/old", 200, patient("old", "3", "Before")),
        ("Patient/dead/_history/7", 200, patient("dead", "7", "Dead")),
        ("Patient/dead", 201, patient("dead", "9", "Dead")),
    ]);
    let (cx, client) = context_with(client);
    let mut resp = answered("404 Not Found");
    finish(&tx(), &batch(), &mut resp, &cx).await.unwrap();
    assert_eq!(resp.status, 404);
    let d = resp.json_body().unwrap()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(d.contains("entry 3 (DELETE Patient/missing)"), "{d}");
    assert!(d.contains("Patient/missing is not known"), "{d}");
    assert!(d.contains("3 written entries undone"), "{d}");
    assert!(
        resp.header("etag").is_none(),
        "the batch's headers are not the answer's"
    );
    assert_eq!(
        client.calls(),
        [
            "GET Patient/dead/_history/7",
            "PUT Patient/dead",
            "GET Patient/old/_history/1",
            "PUT Patient/old",
            "DELETE Patient/new-uuid",
        ]
    );
}

#[tokio::test]
async fn an_undo_that_fails_is_a_500_naming_what_remains() {
    let client = ScriptedClient::by_url(vec![
        ("Patient/new-uuid", 204, json!({})),
        ("Patient/old/_history/1", 200, patient("old", "1", "Before")),
        // Someone wrote after the batch: the pinned undo is refused, not forced.
        (
            "Patient/old",
            412,
            json!({"resourceType":"OperationOutcome"}),
        ),
        (
            "Patient/dead/_history/7",
            404,
            json!({"resourceType":"OperationOutcome"}),
        ),
    ]);
    let (cx, _) = context_with(client);
    let mut resp = answered("404 Not Found");
    finish(&tx(), &batch(), &mut resp, &cx).await.unwrap();
    assert_eq!(resp.status, 500);
    let d = resp.json_body().unwrap()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        d.contains("restoring Patient/old to version 1 answered 412"),
        "{d}"
    );
    assert!(
        d.contains("reading Patient/dead version 7 answered 404"),
        "{d}"
    );
    assert!(d.contains("those changes remain"), "{d}");
}

#[tokio::test]
async fn unconverted_or_refused_whole_passes_as_is() {
    let (cx, client) = context_with(ScriptedClient::new(vec![]));
    // A client's own batch is not a transaction.
    let mut resp = answered("404 Not Found");
    let before = resp.clone();
    finish(&batch(), &batch(), &mut resp, &cx).await.unwrap();
    assert_eq!(resp, before);
    // A transaction sent as a transaction.
    let mut resp = answered("404 Not Found");
    finish(&tx(), &tx(), &mut resp, &cx).await.unwrap();
    assert_eq!(resp, before);
    // The server refused the whole batch: nothing was written.
    let mut refused = Response::outcome(400, "invalid", "bad bundle");
    let before = refused.clone();
    finish(&tx(), &batch(), &mut refused, &cx).await.unwrap();
    assert_eq!(refused, before);
    assert!(client.calls().is_empty());
    // An answer that does not match the batch entry for entry is an error, never a pass.
    let mut short = Response::json(
        200,
        json!({"resourceType":"Bundle","type":"batch-response","entry":[]}),
    );
    assert!(finish(&tx(), &batch(), &mut short, &cx).await.is_err());
}
