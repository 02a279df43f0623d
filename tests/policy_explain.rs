//! Policy explain and shadow mode (issue 16) against the real SEKMET server with IdP-signed
//! tokens: `/manage/explain` names the rule and the relation that decided each entry, and
//! shadow candidates are counted and logged without changing a byte of what the client gets.

mod common;

use common::idp::*;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Patients A (general practitioner: dr), B (nobody), C (general practitioner dr, an Encounter
/// with dr, and an active opt-out Consent); one Observation each.
struct World {
    m: String,
    dr: String,
    consent: String,
}

impl World {
    async fn seed() -> World {
        let m = format!("px{}", uniq());
        let dr = format!("{m}-dr");
        put_direct(
            &format!("Practitioner/{dr}"),
            json!({"resourceType": "Practitioner", "id": dr}),
        )
        .await;
        let gp = json!([{"reference": format!("Practitioner/{dr}")}]);
        for (p, with_gp) in [("a", true), ("b", false), ("c", true)] {
            let id = format!("{m}-{p}");
            let mut pat = json!({"resourceType": "Patient", "id": id});
            if with_gp {
                pat["generalPractitioner"] = gp.clone();
            }
            put_direct(&format!("Patient/{id}"), pat).await;
            let o = format!("{m}-o{p}");
            put_direct(
                &format!("Observation/{o}"),
                json!({"resourceType": "Observation", "id": o, "status": "final",
                       "code": {"text": format!("secret-{m}")},
                       "subject": {"reference": format!("Patient/{id}")}}),
            )
            .await;
        }
        put_direct(
            &format!("Encounter/{m}-ec"),
            json!({"resourceType": "Encounter", "id": format!("{m}-ec"), "status": "finished",
                   "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                   "subject": {"reference": format!("Patient/{m}-c")},
                   "participant": [{"individual": {"reference": format!("Practitioner/{dr}")}}]}),
        )
        .await;
        let consent = format!("{m}-cc");
        put_direct(
            &format!("Consent/{consent}"),
            json!({"resourceType": "Consent", "id": consent, "status": "active",
                   "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                                         "code": "patient-privacy"}]},
                   "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
                   "patient": {"reference": format!("Patient/{m}-c")},
                   "provision": {"type": "deny"}}),
        )
        .await;
        World { m, dr, consent }
    }

    fn obs(&self, p: &str) -> String {
        format!("Observation/{}-o{p}", self.m)
    }

    fn search(&self) -> String {
        format!("Observation?_id={m}-oa,{m}-ob,{m}-oc", m = self.m)
    }

    fn dr_claims(&self) -> Value {
        json!({"iss": IDP, "oid": format!("oid-{}", self.dr), "tid": TENANT_A,
               "roles": ["Practitioner"], "fhirUser": format!("Practitioner/{}", self.dr)})
    }

    fn dr_token(&self) -> String {
        user_token(
            &format!("oid-{}", self.dr),
            &["Practitioner"],
            Some(&format!("Practitioner/{}", self.dr)),
        )
    }
}

const FILTERS: &str = "  - name: ParticipantFilter\n    settings: {cache_ttl_secs: 30}\n  - name: ConsentOptOut\n    settings: {category: \"http://loinc.org|59284-0\", cache_ttl_minutes: 1}\n";

async fn explain(gw: &Gateway, token: &str, ask: Value) -> (u16, Value) {
    let r = client()
        .post(gw.url("/manage/explain"))
        .bearer_auth(token)
        .header("Content-Type", "application/json")
        .body(ask.to_string())
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    (st, r.json().await.unwrap_or(Value::Null))
}

fn entry<'a>(report: &'a Value, resource: &str) -> &'a Value {
    report["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries: {report}"))
        .iter()
        .find(|e| e["resource"] == resource)
        .unwrap_or_else(|| panic!("{resource} not in {report}"))
}

fn decision<'a>(e: &'a Value, module: &str) -> &'a Value {
    e["decisions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["module"] == module)
        .unwrap_or_else(|| panic!("no {module} decision in {e}"))
}

/// Ids of the Observations a caller gets through the gateway.
async fn ids_seen(gw: &Gateway, path: &str, token: &str) -> Vec<String> {
    let r = client()
        .get(format!("{}/{path}", gw.base()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    let mut v: Vec<String> = b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["resource"]["resourceType"] == "Observation")
        .map(|e| format!("Observation/{}", e["resource"]["id"].as_str().unwrap()))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_names_the_rule_and_the_relation() {
    let w = World::seed().await;
    let gw = jwt_gateway(&format!(
        "policy:\n  read: [Administrator, Practitioner]\n  write: [Administrator]\npost:\n{FILTERS}"
    ))
    .await;
    let admin = token("admin-app").await;

    // The practitioner: A's by general practitioner, B's by nothing, C's withheld by C's Consent.
    let ask = json!({"method": "GET", "path": w.search(), "as": w.dr_claims()});
    let (st, rep) = explain(&gw, &admin, ask.clone()).await;
    assert_eq!(st, 200, "{rep}");
    assert_eq!(rep["authorization"]["decision"], "allow", "{rep}");
    assert!(
        rep["authorization"]["rule"]
            .as_str()
            .unwrap()
            .contains("Practitioner"),
        "{rep}"
    );
    assert_eq!(rep["upstream_status"], 200);
    assert_eq!(rep["status"], 200);

    let a = entry(&rep, &w.obs("a"));
    assert_eq!(a["kept"], true, "{a}");
    assert_eq!(a["withheld_by"], Value::Null);
    let pf = decision(a, "ParticipantFilter");
    assert_eq!(pf["relation"], "general_practitioner", "{pf}");
    assert_eq!(pf["detail"]["patient"], format!("Patient/{}-a", w.m));
    assert_eq!(decision(a, "ConsentOptOut")["relation"], "no_consent");

    let b = entry(&rep, &w.obs("b"));
    assert_eq!(b["kept"], false, "{b}");
    assert_eq!(b["withheld_by"], "ParticipantFilter");
    let pf = decision(b, "ParticipantFilter");
    assert_eq!(pf["relation"], "none", "{pf}");
    assert_eq!(
        pf["detail"]["patients"],
        json!([format!("Patient/{}-b", w.m)])
    );
    // Withheld first: the next module never saw it.
    assert_eq!(b["decisions"].as_array().unwrap().len(), 1, "{b}");

    let c = entry(&rep, &w.obs("c"));
    assert_eq!(c["kept"], false, "{c}");
    assert_eq!(c["withheld_by"], "ConsentOptOut");
    let pf = decision(c, "ParticipantFilter");
    assert_eq!(pf["kept"], true);
    assert_eq!(
        pf["detail"]["relations"],
        json!(["general_practitioner", "encounter_participant"]),
        "{pf}"
    );
    let co = decision(c, "ConsentOptOut");
    assert_eq!(co["relation"], "consent", "{co}");
    assert_eq!(co["detail"]["consent"], format!("Consent/{}", w.consent));
    assert_eq!(co["detail"]["provision"], "provision");
    assert_eq!(co["detail"]["decision"], "deny");

    // The explanation is what the practitioner really gets.
    assert_eq!(
        ids_seen(&gw, &w.search(), &w.dr_token()).await,
        vec![w.obs("a")]
    );

    // A single read of B's Observation: the whole answer refused, by ParticipantFilter.
    let (_, rep) = explain(
        &gw,
        &admin,
        json!({"method": "GET", "path": w.obs("b"), "as": w.dr_claims()}),
    )
    .await;
    assert_eq!(rep["status"], 403, "{rep}");
    assert_eq!(entry(&rep, &w.obs("b"))["withheld_by"], "ParticipantFilter");

    // A Reader, refused by role: the rule the gateway itself answers with.
    let reader_claims = json!({"iss": IDP, "oid": format!("oid-r-{}", w.m), "tid": TENANT_A,
                               "roles": ["Reader"]});
    let (st, rep) = explain(
        &gw,
        &admin,
        json!({"method": "GET", "path": w.search(), "as": reader_claims}),
    )
    .await;
    assert_eq!(st, 200, "{rep}");
    assert_eq!(rep["authorization"]["decision"], "deny", "{rep}");
    let rule = rep["authorization"]["rule"].as_str().unwrap();
    assert_eq!(
        rule,
        "role: reading (search on Observation) needs Administrator or Practitioner"
    );
    assert!(
        rep.get("entries").is_none(),
        "nothing fetched for a refusal"
    );
    let r = client()
        .get(format!("{}/{}", gw.base(), w.search()))
        .bearer_auth(user_token(&format!("oid-r-{}", w.m), &["Reader"], None))
        .send()
        .await
        .unwrap();
    let oo = assert_outcome(r, 403, "forbidden").await;
    assert!(
        oo["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .starts_with(&format!("forbidden by {rule} (correlation id")),
        "{oo}"
    );

    // Only Administrators explain; a bad request is a 400 OperationOutcome.
    let (st, rep) = explain(&gw, &w.dr_token(), ask).await;
    assert_eq!(st, 403, "{rep}");
    let (st, rep) = explain(&gw, &admin, json!({"method": "GET"})).await;
    assert_eq!(
        (st, rep["resourceType"].as_str()),
        (400, Some("OperationOutcome"))
    );
}

/// The series of `name` whose labels contain each of `labels`.
fn series(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A body with the searchset's own id and timestamp (new on every search) blanked.
fn stable(body: &[u8]) -> Vec<u8> {
    let mut s = String::from_utf8(body.to_vec()).unwrap();
    let v: Value = serde_json::from_slice(body).unwrap();
    for p in ["/id", "/meta/lastUpdated"] {
        if v["resourceType"] == "Bundle" {
            if let Some(x) = v.pointer(p).and_then(Value::as_str) {
                s = s.replacen(x, "-", 1);
            }
        }
    }
    s.into_bytes()
}

async fn raw(gw: &Gateway, prefix: &str, path: &str, token: &str, rid: &str) -> (u16, Vec<u8>) {
    let r = client()
        .get(gw.url(&format!("{prefix}/{path}")))
        .bearer_auth(token)
        .header("X-Request-Id", rid)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.bytes().await.unwrap().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shadow_candidates_are_counted_never_answered() {
    let w = World::seed().await;
    let routes = |shadow: bool| {
        let (main, err, open) = if shadow {
            (
                "shadow:\n  - name: ParticipantFilter\n    settings: {relations: [encounter_participant]}\n  - name: ConsentOptOut\n    settings: {category: \"http://loinc.org|59284-0\"}\n",
                "    shadow:\n      - name: ParticipantFilter\n        settings: {max_related: 1}\n",
                "    shadow:\n      - name: ParticipantFilter\n",
            )
        } else {
            ("", "", "")
        };
        format!(
            "public_base_url: https://gw.example/fhir\npolicy:\n  read: [Administrator, Practitioner]\npost:\n  - name: ParticipantFilter\n    settings: {{cache_ttl_secs: 30}}\n{main}routes:\n  - prefix: /err/fhir\n    public_base_url: https://gw.example/err/fhir\n    policy:\n      read: [Administrator, Practitioner]\n    post:\n      - name: ParticipantFilter\n{err}  - prefix: /open/fhir\n    public_base_url: https://gw.example/open/fhir\n    policy:\n      read: [Administrator, Practitioner]\n    post:\n      - name: ParticipantFilter\n        settings: {{relations: [encounter_participant]}}\n{open}"
        )
    };
    let mport = free_port();
    let live = jwt_gateway(&routes(false)).await;
    let shadowed = jwt_gateway(&format!(
        "metrics:\n  listen: 127.0.0.1:{mport}\n{}",
        routes(true)
    ))
    .await;
    let dr = w.dr_token();

    // The same answers, byte for byte (a searchset's own id and time aside), on both routes.
    let rid = format!("sh-{}", uniq());
    for (prefix, path) in [
        ("/fhir", w.search()),
        ("/fhir", w.obs("a")),
        ("/fhir", w.obs("b")),
        ("/err/fhir", w.search()),
        ("/open/fhir", w.search()),
    ] {
        let (s1, b1) = raw(&live, prefix, &path, &dr, &format!("{rid}-l")).await;
        let (s2, b2) = raw(&shadowed, prefix, &path, &dr, &rid).await;
        assert_eq!(s1, s2, "{prefix}/{path}");
        if path.contains('?') {
            assert_eq!(stable(&b1), stable(&b2), "{prefix}/{path}");
        } else {
            assert_eq!(b1, b2, "{prefix}/{path}");
        }
    }
    assert_eq!(
        ids_seen(&shadowed, &w.search(), &dr).await,
        vec![w.obs("a"), w.obs("c")],
        "the live chain decides: A and C by general practitioner"
    );

    // Counted: per search, the candidate ParticipantFilter (encounters only) withholds A's,
    // the candidate ConsentOptOut C's; nothing the live chain withheld is revealed (B's stays
    // out); the read of A's one more by ParticipantFilter; the read of B's, refused live,
    // nothing. Two searches went through the main route: 2 + 1, and 2.
    let name = "fhirgw_shadow_differences_total";
    let want = [
        (
            [
                "module=\"ParticipantFilter\"",
                "direction=\"withhold\"",
                "route=\"/fhir\"",
            ],
            3.0,
        ),
        (
            [
                "module=\"ConsentOptOut\"",
                "direction=\"withhold\"",
                "route=\"/fhir\"",
            ],
            2.0,
        ),
        (
            [
                "module=\"ParticipantFilter\"",
                "direction=\"error\"",
                "route=\"/err/fhir\"",
            ],
            1.0,
        ),
        // Live: encounters only (C's); the candidate, every relation: A's too.
        (
            [
                "module=\"*\"",
                "direction=\"reveal\"",
                "route=\"/open/fhir\"",
            ],
            1.0,
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = metrics_text(mport, &shadowed).await;
        if want.iter().all(|(l, v)| series(&text, name, l) >= *v) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Settled: nothing more is counted later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let text = metrics_text(mport, &shadowed).await;
    for (l, v) in want {
        assert_eq!(series(&text, name, &l), v, "{l:?}\n{text}");
    }
    assert_eq!(
        series(&text, name, &["direction=\"reveal\"", "route=\"/fhir\""]),
        0.0,
        "{text}"
    );
    shadowed
        .log_line(
            &format!(
                "shadow /open/fhir: the candidate chain would keep 1 entries the live chain withheld: {} (correlation id {rid})",
                w.obs("a")
            ),
            Duration::from_secs(5),
        )
        .await;

    // Logged at info with the correlation id and the ids, never the body.
    let line = shadowed
        .log_line(
            &format!(
                "ConsentOptOut would withhold 1 entries the live chain kept: {}",
                w.obs("c")
            ),
            Duration::from_secs(5),
        )
        .await;
    assert!(line.contains(&rid), "{line}");
    assert!(line.contains("INFO"), "{line}");
    let log = shadowed.log();
    assert!(
        log.contains(&format!(
        "ParticipantFilter would withhold 1 entries the live chain kept: {} (correlation id {rid})",
        w.obs("a")
    )),
        "{log}"
    );
    assert!(
        !log.contains(&format!("secret-{}", w.m)),
        "a body was logged"
    );
    assert!(
        log.contains("shadow /err/fhir: ParticipantFilter failed (not answered)"),
        "{log}"
    );
    // The live gateway has no shadow and says nothing of it.
    assert!(!live.log().contains("shadow "), "{}", live.log());
}
