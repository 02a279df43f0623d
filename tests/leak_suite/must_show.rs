//! The specific cases, one test each, with plain assertions.

use crate::check::{call, key_of};
use crate::corpus::Body;
use crate::harness::*;
use crate::seed::{deny, reference, ConsentSpec, Key, Seed};
use crate::{main_seed, manage_link};
use serde_json::{json, Value};
use std::collections::BTreeSet;

async fn get(gw: &Gateway, tok: &str, path: &str) -> (u16, Value) {
    call(
        &client(),
        "GET",
        &format!("{}/{path}", gw.base()),
        Some(tok),
        &Body::None,
    )
    .await
}

/// Non-OperationOutcome entry keys.
fn keys(b: &Value) -> BTreeSet<Key> {
    b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["resource"]["resourceType"] != "OperationOutcome")
        .filter_map(|e| key_of(&e["resource"]))
        .collect()
}

fn has_outcome(b: &Value) -> bool {
    b["entry"].as_array().into_iter().flatten().any(|e| {
        e["search"]["mode"] == "outcome" && e["resource"]["resourceType"] == "OperationOutcome"
    })
}

#[track_caller]
fn assert_denied(what: &str, st: u16, b: &Value, status: u16, code: &str) {
    assert_eq!(st, status, "{what}: {b}");
    assert_eq!(b["resourceType"], "OperationOutcome", "{what}: {b}");
    assert_eq!(b["issue"][0]["code"], code, "{what}: {b}");
}

#[track_caller]
fn assert_filtered(what: &str, st: u16, b: &Value) {
    assert_eq!(st, 200, "{what}: {b}");
    assert_eq!(b["resourceType"], "Bundle", "{what}: {b}");
    // Absent, or (whole result on one page) exactly what the caller sees.
    let visible = b["entry"].as_array().map_or(0, |e| {
        e.iter()
            .filter(|e| e["search"]["mode"] != "outcome")
            .count()
    });
    assert!(
        b.get("total").is_none() || b["total"] == visible as u64,
        "{what}: total after removal: {b}"
    );
    assert!(has_outcome(b), "{what}: no outcome entry: {b}");
}

fn patient_token(s: &Seed, letter: &str) -> String {
    user_token(
        &format!("{}-oid-{letter}", s.run),
        &["Patient"],
        Some(&s.k(letter)),
    )
}

fn practitioner_token(s: &Seed, name: &str) -> String {
    user_token(
        &format!("{}-oid-{name}", s.run),
        &["Practitioner"],
        Some(&s.k(name)),
    )
}

fn obs_body(subject: &Key, run: &str) -> Value {
    json!({"status":"final","code":{"coding":[{"system":crate::seed::CODE_SYSTEM,"code":run}]},
           "subject": reference(subject)})
}

fn class() -> Value {
    json!({"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"AMB"})
}

#[tokio::test(flavor = "multi_thread")]
async fn consent_written_through_the_gateway_applies_on_the_very_next_request() {
    let mut s = Seed::new(&crate::seed::new_run("lc"));
    let q = s.add(
        "Q",
        "Practitioner",
        "q",
        json!({"name":[{"family":"Q"}]}),
        vec![],
    );
    let k = s.add(
        "K",
        "Patient",
        "k",
        json!({"generalPractitioner":[reference(&q)]}),
        vec![("gp", q.clone())],
    );
    let ok = s.add(
        "oK",
        "Observation",
        "ob-k",
        obs_body(&k, &s.run.clone()),
        vec![],
    );
    s.put_all().await;
    let gw = filtered_gateway(false).await;
    let qt = practitioner_token(&s, "Q");
    let kt = patient_token(&s, "K");

    // Before: the GP sees the observation (and the consent cache now holds "no consent").
    let (st, b) = get(&gw, &qt, &ok).await;
    assert_eq!(st, 200, "GP reads before the opt-out: {b}\n{}", gw.log());
    let (st, b) = get(&gw, &qt, &format!("Observation?subject={k}")).await;
    assert_eq!(st, 200, "{b}");
    assert!(keys(&b).contains(&ok), "{b}");

    // A Writer records the opt-out through the gateway.
    let mut tmp = Seed::new(&s.run);
    tmp.consent("c", "cons", deny(&k));
    let mut consent = tmp.res.values().next().unwrap().json.clone();
    consent.as_object_mut().unwrap().remove("id");
    let writer = token("writer-app").await;
    let (st, b) = call(
        &client(),
        "POST",
        &format!("{}/Consent", gw.base()),
        Some(&writer),
        &Body::Json(consent),
    )
    .await;
    assert_eq!(
        st, 201,
        "Writer creates the Consent through the gateway: {b}"
    );

    // The very next request: denied, with the reason.
    let (st, b) = get(&gw, &qt, &ok).await;
    assert_denied("GP reads after the opt-out", st, &b, 403, "forbidden");
    let diag = b["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or("")
        .to_lowercase();
    assert!(
        diag.contains("withh") || diag.contains("consent"),
        "diagnostics say the patient has withheld access: {b}"
    );
    let (st, b) = get(&gw, &qt, &format!("Observation?subject={k}")).await;
    assert_filtered("GP searches after the opt-out", st, &b);
    assert!(!keys(&b).contains(&ok), "{b}");
    let (st, b) = get(&gw, &qt, &k).await;
    assert_denied(
        "GP reads the Patient after the opt-out",
        st,
        &b,
        403,
        "forbidden",
    );

    // The patient and an Administrator still see it; writes are never blocked.
    let (st, b) = get(&gw, &kt, &ok).await;
    assert_eq!(st, 200, "the patient reads their own data: {b}");
    let admin = token("admin-app").await;
    let (st, b) = get(&gw, &admin, &ok).await;
    assert_eq!(st, 200, "admin: {b}");
    let (st, b) = call(
        &client(),
        "POST",
        &format!("{}/Observation", gw.base()),
        Some(&writer),
        &Body::Json({
            let mut o = obs_body(&k, &s.run);
            o["resourceType"] = json!("Observation");
            o
        }),
    )
    .await;
    assert_eq!(
        st, 201,
        "a write for an opted-out patient is not blocked: {b}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn consents_with_only_a_start_or_only_an_end() {
    let mut s = Seed::new(&crate::seed::new_run("ld"));
    let q = s.add(
        "Q",
        "Practitioner",
        "q",
        json!({"name":[{"family":"Q"}]}),
        vec![],
    );
    // (name, start, end, in force)
    let cases = [
        ("S1", Some("2020-01-01"), None, true),
        ("S2", None, Some("2099-12-31T23:59:59+01:00"), true),
        ("S3", None, Some("2021-01-01"), false),
        ("S4", Some("2099-01-01T00:00:00Z"), None, false),
        ("S5", Some("2020-01-01T08:00:00Z"), None, true),
    ];
    for (n, start, end, _) in cases {
        let p = s.add(
            n,
            "Patient",
            &n.to_lowercase(),
            json!({"generalPractitioner":[reference(&q)]}),
            vec![("gp", q.clone())],
        );
        s.consent(
            &format!("c{n}"),
            &format!("cons-{}", n.to_lowercase()),
            ConsentSpec {
                start: start.map(str::to_string),
                end: end.map(str::to_string),
                ..deny(&p)
            },
        );
    }
    s.put_all().await;
    let gw = filtered_gateway(false).await;
    let qt = practitioner_token(&s, "Q");
    for (n, start, end, in_force) in cases {
        let (st, b) = get(&gw, &qt, &s.k(n)).await;
        let what = format!("GP reads {n} (consent start {start:?} end {end:?})");
        if in_force {
            assert_denied(&what, st, &b, 403, "forbidden");
        } else {
            assert_eq!(st, 200, "{what}: {b}\n{}", gw.log());
        }
    }
    let (st, b) = get(&gw, &qt, &format!("Patient?{}", s.tag_q())).await;
    assert_filtered("GP searches the patients", st, &b);
    let want: BTreeSet<Key> = [s.k("S3"), s.k("S4")].into();
    assert_eq!(keys(&b), want, "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_consent_naming_p2_blocks_p2_and_not_p1() {
    let mut s = Seed::new(&crate::seed::new_run("le"));
    let org2 = s.add(
        "ORG2",
        "Organization",
        "org2",
        json!({"name":"Org2"}),
        vec![],
    );
    let q1 = s.add(
        "Q1",
        "Practitioner",
        "q1",
        json!({"name":[{"family":"Q1"}]}),
        vec![],
    );
    let q2 = s.add(
        "Q2",
        "Practitioner",
        "q2",
        json!({"name":[{"family":"Q2"}]}),
        vec![],
    );
    let role2 = s.add(
        "ROLE2",
        "PractitionerRole",
        "role2",
        json!({"practitioner":reference(&q2),"organization":reference(&org2)}),
        vec![],
    );
    // H1..H3 have both as practitioners of record (Q1 GP, Q2 in an Encounter); the consent
    // names Q2 as a Practitioner, through its PractitionerRole, through its Organization.
    // H4 has no consent (Q2 is otherwise of record).
    let actors: [(&str, Option<Key>); 4] = [
        ("H1", Some(q2.clone())),
        ("H2", Some(role2.clone())),
        ("H3", Some(org2.clone())),
        ("H4", None),
    ];
    for (n, actor) in &actors {
        let l = n.to_lowercase();
        let h = s.add(
            n,
            "Patient",
            &l,
            json!({"generalPractitioner":[reference(&q1)]}),
            vec![],
        );
        s.add(
            &format!("enc{n}"),
            "Encounter",
            &format!("enc-{l}"),
            json!({"status":"finished","class":class(),"subject":reference(&h),
                   "participant":[{"individual":reference(&q2)}]}),
            vec![],
        );
        let run = s.run.clone();
        s.add(
            &format!("o{n}"),
            "Observation",
            &format!("ob-{l}"),
            obs_body(&h, &run),
            vec![],
        );
        if let Some(a) = actor {
            s.consent(
                &format!("c{n}"),
                &format!("cons-{l}"),
                ConsentSpec {
                    actors: vec![a.clone()],
                    ..deny(&h)
                },
            );
        }
    }
    s.put_all().await;
    let gw = filtered_gateway(false).await;
    let (t1, t2) = (practitioner_token(&s, "Q1"), practitioner_token(&s, "Q2"));
    for (n, actor) in &actors {
        let o = s.k(&format!("o{n}"));
        let (st, b) = get(&gw, &t1, &o).await;
        assert_eq!(
            st,
            200,
            "Q1 reads {o} (consent actor {actor:?}): {b}\n{}",
            gw.log()
        );
        let (st, b) = get(&gw, &t2, &o).await;
        if actor.is_some() {
            assert_denied(
                &format!("Q2 reads {o} (actor {actor:?})"),
                st,
                &b,
                403,
                "forbidden",
            );
        } else {
            assert_eq!(st, 200, "Q2 reads {o} (no consent): {b}");
        }
    }
    let all_obs = format!("Observation?{}", s.code_q());
    let (st, b) = get(&gw, &t2, &all_obs).await;
    assert_filtered("Q2 searches", st, &b);
    assert_eq!(keys(&b), BTreeSet::from([s.k("oH4")]), "{b}");
    let (st, b) = get(&gw, &t1, &all_obs).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(keys(&b).len(), 4, "Q1 sees all four: {b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn patient_12_is_not_patient_123() {
    let s = main_seed().await;
    let gw = filtered_gateway(false).await;
    let (ta, tf) = (patient_token(s, "A"), patient_token(s, "F"));
    assert!(s.k("A").ends_with("-12") && s.k("F").ends_with("-123"));
    let (st, b) = get(&gw, &ta, &s.k("A")).await;
    assert_eq!(st, 200, "A reads itself: {b}\n{}", gw.log());
    let (st, b) = get(&gw, &ta, &s.k("F")).await;
    assert_denied("A (…-12) reads …-123", st, &b, 403, "forbidden");
    let (st, b) = get(&gw, &tf, &s.k("A")).await;
    assert_denied("F (…-123) reads …-12", st, &b, 403, "forbidden");
    let (st, b) = get(&gw, &ta, &format!("Observation?subject={}", s.k("F"))).await;
    assert_filtered("A searches …-123's observations", st, &b);
    assert!(keys(&b).is_empty(), "{b}");
    // F sees its own, also through an absolute versioned reference.
    let (st, b) = get(&gw, &tf, &format!("Observation?subject={}", s.k("F"))).await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(keys(&b), BTreeSet::from([s.k("oF1"), s.k("oF2")]), "{b}");
    let (st, b) = get(&gw, &tf, &s.k("oF2")).await;
    assert_eq!(st, 200, "absolute versioned subject …-123/_history/1: {b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn observation_performed_by_a_about_b_is_visible_to_a_and_b_not_c() {
    let s = main_seed().await;
    let gw = filtered_gateway(false).await;
    let ob1 = s.k("oB1");
    for (who, ok) in [("A", true), ("B", true), ("C", false)] {
        let (st, b) = get(&gw, &patient_token(s, who), &ob1).await;
        if ok {
            assert_eq!(st, 200, "patient {who} reads {ob1}: {b}\n{}", gw.log());
        } else {
            assert_denied(
                &format!("patient {who} reads {ob1}"),
                st,
                &b,
                403,
                "forbidden",
            );
        }
        let (st, b) = get(
            &gw,
            &patient_token(s, who),
            &format!("Observation?performer={}", s.k("A")),
        )
        .await;
        assert_eq!(st, 200, "{b}");
        assert_eq!(keys(&b).contains(&ob1), ok, "patient {who} searches: {b}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn revinclude_of_another_patients_provenance_is_removed() {
    let s = main_seed().await;
    let gw = filtered_gateway(false).await;
    let path = format!(
        "Observation?_id={}&_revinclude=Provenance:target",
        s.id("oB1")
    );
    let admin = token("admin-app").await;
    let (st, b) = get(&gw, &admin, &path).await;
    assert_eq!(st, 200, "{b}\n{}", gw.log());
    assert_eq!(
        keys(&b),
        BTreeSet::from([s.k("oB1"), s.k("pvF2")]),
        "admin: {b}"
    );
    let (st, b) = get(&gw, &patient_token(s, "A"), &path).await;
    assert_filtered("A with _revinclude", st, &b);
    assert_eq!(keys(&b), BTreeSet::from([s.k("oB1")]), "A: {b}");
    assert!(
        !b.to_string().contains(&s.id("pvF2")),
        "no trace of F's Provenance: {b}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_gets_is_filtered_entry_by_entry() {
    let s = main_seed().await;
    let gw = filtered_gateway(false).await;
    let batch = json!({"resourceType":"Bundle","type":"batch","entry":[
        {"request":{"method":"GET","url":s.k("F")}},
        {"request":{"method":"GET","url":s.k("A")}},
        {"request":{"method":"GET","url":format!("Observation?subject={}", s.k("B"))}},
        {"request":{"method":"GET","url":s.k("oF1")}}
    ]});
    let (st, b) = call(
        &client(),
        "POST",
        &gw.base(),
        Some(&patient_token(s, "A")),
        &Body::Json(batch),
    )
    .await;
    assert_eq!(st, 200, "{b}\n{}", gw.log());
    assert_eq!(b["type"], "batch-response", "{b}");
    let e = b["entry"].as_array().expect("entries");
    assert_eq!(e.len(), 4, "{b}");
    for i in [0, 3] {
        assert!(
            e[i]["response"]["status"]
                .as_str()
                .unwrap_or("")
                .starts_with("403"),
            "entry {i}: {}",
            e[i]
        );
        let r = &e[i]["resource"];
        assert!(
            r.is_null() || r["resourceType"] == "OperationOutcome",
            "entry {i}: {r}"
        );
    }
    assert_eq!(key_of(&e[1]["resource"]), Some(s.k("A")), "{}", e[1]);
    assert_filtered("search inside the batch", 200, &e[2]["resource"]);
    assert_eq!(
        keys(&e[2]["resource"]),
        BTreeSet::from([s.k("oB1")]),
        "{}",
        e[2]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn post_search_is_filtered_like_get() {
    let s = main_seed().await;
    let gw = filtered_gateway(false).await;
    let (st, b) = call(
        &client(),
        "POST",
        &format!("{}/Observation/_search", gw.base()),
        Some(&patient_token(s, "A")),
        &Body::Form(format!("subject={}", s.k("B"))),
    )
    .await;
    assert_filtered("A: POST Observation/_search subject=B", st, &b);
    assert_eq!(keys(&b), BTreeSet::from([s.k("oB1")]), "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_link_fetched_by_another_user_is_filtered_for_that_user() {
    let s = main_seed().await;
    let gw = filtered_gateway(false).await;
    let admin = token("admin-app").await;
    let ta = patient_token(s, "A");
    let path = format!("Observation?{}&_count=2", s.code_q());
    let (st, b) = get(&gw, &admin, &path).await;
    assert_eq!(st, 200, "{b}\n{}", gw.log());
    let first = keys(&b);
    let next = b["link"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
        .and_then(|l| l["url"].as_str())
        .expect("admin's next link")
        .to_string();
    assert!(next.starts_with(&gw.base()), "public next link: {next}");
    let mut got = BTreeSet::new();
    let mut url = next;
    for _ in 0..20 {
        let (st, b) = call(&client(), "GET", &url, Some(&ta), &Body::None).await;
        assert_eq!(st, 200, "A fetches {url}: {b}");
        got.extend(keys(&b));
        match b["link"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
            .and_then(|l| l["url"].as_str())
        {
            Some(n) => url = n.to_string(),
            None => break,
        }
    }
    // A's own, the one performed by A, and the one without a patient (visible to all).
    let mine: BTreeSet<Key> = ["oA1", "oA2", "oA3", "oB1", "oN"]
        .iter()
        .map(|n| s.k(n))
        .collect();
    let foreign: Vec<_> = got.difference(&mine).collect();
    assert!(
        foreign.is_empty(),
        "A got foreign observations through admin's page link: {foreign:?}"
    );
    let want: BTreeSet<Key> = mine.difference(&first).cloned().collect();
    assert_eq!(got, want, "A's observations after admin's first page");

    // And A's own page link handed to P4 (of record for nobody): only non-patient data.
    let (st, b) = get(&gw, &ta, &path).await;
    assert_eq!(st, 200, "{b}");
    if let Some(n) = b["link"]
        .as_array()
        .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
        .and_then(|l| l["url"].as_str())
    {
        let (st, b) = call(
            &client(),
            "GET",
            n,
            Some(&practitioner_token(s, "P4")),
            &Body::None,
        )
        .await;
        assert_eq!(st, 200, "{b}");
        assert!(
            keys(&b).iter().all(|k| *k == s.k("oN")),
            "P4 through A's page link: {b}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hide_existence_gives_404_for_a_foreign_read() {
    let s = main_seed().await;
    let gw = filtered_gateway(true).await;
    let ta = patient_token(s, "A");
    let (st, missing) = get(&gw, &ta, &format!("Patient/{}-nosuch", s.run)).await;
    assert_eq!(
        st,
        404,
        "a patient that does not exist: {missing}\n{}",
        gw.log()
    );
    for n in ["F", "oF1", "B"] {
        let (st, b) = get(&gw, &ta, &s.k(n)).await;
        assert_denied(
            &format!("A reads {n} with hide_existence"),
            st,
            &b,
            404,
            "not-found",
        );
        assert_eq!(
            b["issue"][0]["code"], missing["issue"][0]["code"],
            "same shape as a real 404"
        );
    }
    // Consent denial hides existence too: P1 (GP of E, E opted out for everyone).
    let p1 = user_token(
        &format!("{}-oid-p1fu", s.run),
        &["Practitioner"],
        Some(&s.k("P1")),
    );
    let (st, b) = get(&gw, &p1, &s.k("E")).await;
    assert_denied(
        "P1 reads opted-out E with hide_existence",
        st,
        &b,
        404,
        "not-found",
    );
    let (st, b) = get(&gw, &p1, &s.k("A")).await;
    assert_eq!(st, 200, "P1 reads A: {b}");
    let (st, b) = get(&gw, &ta, &format!("Observation?subject={}", s.k("F"))).await;
    assert_eq!(st, 200, "{b}");
    assert!(keys(&b).is_empty(), "{b}");
    assert!(b.get("total").is_none() || b["total"] == 0, "{b}");
}

#[tokio::test(flavor = "multi_thread")]
async fn total_counts_only_what_the_caller_sees_and_an_outcome_entry_says_so() {
    let s = main_seed().await;
    let gw = filtered_gateway(false).await;
    let path = format!("Observation?{}", s.code_q());
    let (st, b) = get(&gw, &token("admin-app").await, &path).await;
    assert_eq!(st, 200, "{b}\n{}", gw.log());
    assert_eq!(b["total"], 12, "admin: unfiltered total: {b}");
    assert!(!has_outcome(&b), "admin: nothing removed: {b}");
    let (st, b) = get(&gw, &patient_token(s, "A"), &path).await;
    assert_filtered("A", st, &b);
    // A's own, the one performed by A, and the one without a patient (visible to all).
    let mine: BTreeSet<Key> = ["oA1", "oA2", "oA3", "oB1", "oN"]
        .iter()
        .map(|n| s.k(n))
        .collect();
    assert_eq!(keys(&b), mine, "{b}");
    // Removed, not stubbed: every entry is a full resource of A's or the outcome.
    let entries = b["entry"].as_array().unwrap();
    assert_eq!(entries.len(), mine.len() + 1, "{b}");
    let oo = entries
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .unwrap();
    assert!(oo["resource"]["issue"][0]["severity"].is_string(), "{oo}");
    for id in ["oB2", "oC1", "oF1", "oE1"] {
        assert!(!b.to_string().contains(&s.id(id)), "no trace of {id}: {b}");
    }
    // _summary=count says nothing about hidden ones either.
    let (st, b) = get(
        &gw,
        &patient_token(s, "A"),
        &format!("{path}&_summary=count"),
    )
    .await;
    if st == 200 {
        assert!(
            b.get("total").is_none() || b["total"] == 4,
            "count for A: {b}"
        );
    } else {
        assert_denied("A _summary=count", st, &b, 403, "forbidden");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn manage_api_is_admin_only_and_a_link_applies_at_once() {
    let s = main_seed().await;
    let gw = filtered_gateway(false).await;
    let admin = token("admin-app").await;
    let reader = token("reader-app").await;
    let http = client();
    let r = http.get(gw.url("/manage/links")).send().await.unwrap();
    assert_eq!(r.status(), 401, "no token");
    let r = http
        .get(gw.url("/manage/links"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "Reader");
    let r = http
        .get(gw.url(&format!("/manage/find?type=Patient&name={}", s.family("B"))))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["candidates"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["reference"] == s.k("B").as_str()),
        "find: {v}"
    );

    let oid = format!("{}-oid-mgr", s.run);
    let tok = user_token(&oid, &["Practitioner"], None);
    // Before the link: a Practitioner nobody knows sees no patient data.
    let (st, b) = get(&gw, &tok, &s.k("oB2")).await;
    assert_denied("unlinked practitioner", st, &b, 403, "forbidden");
    let (st, b) = manage_link(&gw, &admin, &oid, &format!("Practitioner/{}-nosuch", s.run)).await;
    assert_eq!(st, 404, "link to a missing resource: {b}");
    let (st, b) = manage_link(&gw, &reader, &oid, &s.k("P2")).await;
    assert_eq!(st, 403, "Reader links: {b}");
    let (st, b) = manage_link(&gw, &admin, &oid, &s.k("P2")).await;
    assert_eq!(st, 201, "link: {b}");
    let (st, b) = manage_link(&gw, &admin, &oid, &s.k("P3")).await;
    assert_eq!(st, 409, "the same oid to another resource: {b}");
    let r = http
        .get(gw.url("/manage/links"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert!(
        v["links"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|l| l["oid"] == oid.as_str()
                && l["reference"] == s.k("P2").as_str()
                && l["tenant"] == TENANT_A),
        "links: {v}"
    );
    // At once on this instance: now P2, of record for B.
    let (st, b) = get(&gw, &tok, &s.k("oB2")).await;
    assert_eq!(st, 200, "linked to P2: {b}");
    let (st, b) = get(&gw, &tok, &s.k("oA1")).await;
    assert_denied("linked to P2, reads A's", st, &b, 403, "forbidden");
    let r = http
        .post(gw.url("/manage/unlink"))
        .bearer_auth(&admin)
        .json(&json!({"tenant": TENANT_A, "oid": oid, "reference": s.k("P2")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "unlink");
    let r = http
        .post(gw.url("/manage/unlink"))
        .bearer_auth(&admin)
        .json(&json!({"tenant": TENANT_A, "oid": oid, "reference": s.k("P2")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "unlink twice");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_practitioner_of_record_for_nobody_sees_no_patient_data() {
    // P4 is in no Encounter, no CareTeam and GP of nobody. SEKMET does not know CareTeam's
    // search parameters (it ignores them with a warning and answers every CareTeam), so a
    // relation lookup that trusts the server's filtering makes P4 of record for every patient
    // with any CareTeam.
    let s = main_seed().await;
    let gw = filtered_gateway(false).await;
    let p4 = practitioner_token(s, "P4");
    for n in ["A", "oA1", "B", "oB2", "C", "oC1", "G", "ctA"] {
        let (st, b) = get(&gw, &p4, &s.k(n)).await;
        assert_denied(&format!("P4 reads {n}"), st, &b, 403, "forbidden");
    }
    let (st, b) = get(&gw, &p4, &format!("Observation?{}", s.code_q())).await;
    assert_filtered("P4 searches", st, &b);
    assert_eq!(keys(&b), BTreeSet::from([s.k("oN")]), "{b}");
    // And P3 (member of C's, B's and G's CareTeams) is of record for C, not for A.
    let p3 = practitioner_token(s, "P3");
    let (st, b) = get(&gw, &p3, &s.k("oC1")).await;
    assert_eq!(st, 200, "P3 reads C's: {b}");
    let (st, b) = get(&gw, &p3, &s.k("oA1")).await;
    assert_denied("P3 reads A's", st, &b, 403, "forbidden");
}
