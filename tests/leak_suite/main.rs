//! Data-level security suite: the ParticipantFilter and ConsentOptOut modules against the real
//! SEKMET server and real IdP-signed tokens.
//!
//! * `seed.rs`: a per-run hospital written straight into SEKMET (unique ids and `meta.tag`).
//! * `oracle.rs`: who may see what, computed from the seed description alone.
//! * `corpus.rs`: ~90 requests from pitfalls 7–20, each with its unfiltered result.
//! * `check.rs`: calibration against SEKMET, then the judge (foreign / missing / contract).
//! * `must_show.rs`: the specific cases, one test each.
//!
//! Run: `cargo test --test leak_suite -- --nocapture` (peers: `scripts/peers.sh start sekmet oidc`).

#[path = "../common/mod.rs"]
mod common;

mod check;
mod corpus;
mod harness;
mod must_show;
mod oracle;
mod seed;

use check::{Judge, Tally};
use harness::*;
use oracle::{Oracle, Who};
use seed::Seed;
use serde_json::{json, Value};
use tokio::sync::OnceCell;

static MAIN_SEED: OnceCell<Seed> = OnceCell::const_new();

/// The corpus seed, written once per test process.
pub async fn main_seed() -> &'static Seed {
    MAIN_SEED
        .get_or_init(|| async {
            require_peer(&format!("{}/metadata", sekmet_url())).await;
            let s = seed::describe_main(&seed::new_run("lk"));
            s.put_all().await;
            eprintln!(
                "leak_suite: seeded run {} ({} resources)",
                s.run,
                s.res.len()
            );
            s
        })
        .await
}

/// Links `tid`/`oid` to `reference` through the gateway's /manage API (admin token).
pub async fn manage_link(gw: &Gateway, admin: &str, oid: &str, reference: &str) -> (u16, Value) {
    let r = client()
        .post(gw.url("/manage/link"))
        .bearer_auth(admin)
        .json(&json!({"tenant": TENANT_A, "oid": oid, "reference": reference}))
        .send()
        .await
        .unwrap();
    let st = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (
        st,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

struct CallerSpec {
    name: &'static str,
    who: Who,
    token: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn corpus_every_caller_sees_exactly_what_the_oracle_allows() {
    run_corpus(oracle::ALL_RELATIONS).await;
}

/// The same corpus with `relations: [general_practitioner, encounter_participant]`: CareTeam
/// membership no longer makes anyone of record (P3 sees no patient data).
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn corpus_without_the_care_team_relation() {
    run_corpus(&["general_practitioner", "encounter_participant"]).await;
}

async fn run_corpus(relations: &'static [&'static str]) {
    let s = main_seed().await;
    require_peer(&format!("{IDP}/.well-known/openid-configuration")).await;

    // 1. The corpus against SEKMET itself: the declared results must be what SEKMET returns.
    let mut corpus = vec![];
    let mut calib = vec![];
    for req in corpus::build(s) {
        match check::calibrate(s, &req).await {
            Ok(r) => corpus.push(r),
            Err(e) => calib.push(e),
        }
    }
    assert!(
        calib.is_empty(),
        "SUITE BUG (oracle calibration against SEKMET, no gateway involved):\n{}",
        calib.join("\n")
    );

    // 2. The gateway; P1 becomes a user through an identity link.
    let extra = if relations == oracle::ALL_RELATIONS {
        String::new()
    } else {
        format!(", relations: [{}]", relations.join(", "))
    };
    let gw = filtered_gateway_with(false, &extra).await;
    let admin = token("admin-app").await;
    let p1_oid = format!("{}-oid-p1", s.run);
    // Both corpus tests link the same oid to the same resource: linking again is idempotent,
    // and two links at once are optimistic writers, one of which gets 409 "try again".
    let mut attempt = 0;
    let (st, body) = loop {
        let (st, body) = manage_link(&gw, &admin, &p1_oid, &s.k("P1")).await;
        attempt += 1;
        if st != 409 || attempt == 5 {
            break (st, body);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert!(
        st == 201 || st == 200,
        "POST /manage/link P1: {st} {body}\n{}",
        gw.log()
    );
    assert_eq!(body["reference"], s.k("P1").as_str(), "{body}");
    // The link lives in SEKMET, on P1, and the run's tag survived the write.
    let (_, p1) = check::call(
        &client(),
        "GET",
        &format!("{}/{}", s.sekmet, s.k("P1")),
        None,
        &corpus::Body::None,
    )
    .await;
    let want = format!("{TENANT_A}/{p1_oid}");
    assert!(
        p1["identifier"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["system"] == LINK_SYSTEM && i["value"] == want.as_str()),
        "link identifier on P1: {p1}"
    );
    assert!(
        p1["meta"]["tag"].to_string().contains(&s.run),
        "the link write dropped P1's meta.tag: {p1}"
    );

    // The real reader-app: other test suites sharing this SEKMET may have linked its oid to
    // some resource. Linked or not, it is of record for none of this run's patients, so for
    // this run's data it is "nobody" either way; say so when it is linked.
    let reader_app = token("reader-app").await;
    let reader_oid = claims_of(&reader_app)["oid"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let r = client()
        .get(gw.url("/manage/links"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "GET /manage/links");
    let links: Value = r.json().await.unwrap();
    for l in links["links"].as_array().into_iter().flatten() {
        if l["oid"] == reader_oid.as_str() {
            eprintln!(
                "note: reader-app's oid {reader_oid} is linked to {} (not by this suite); \
                 no patient of this run has that resource of record",
                l["reference"]
            );
        }
    }

    let pt = |p: &str| format!("Patient/{}", s.id(p));
    let callers = vec![
        CallerSpec {
            name: "patient A (fhirUser)",
            who: Who::Patient(s.k("A")),
            token: user_token(&format!("{}-oid-a", s.run), &["Patient"], Some(&pt("A"))),
        },
        CallerSpec {
            name: "practitioner P1 (link, GP)",
            who: Who::Practitioner(s.k("P1")),
            token: user_token(&p1_oid, &["Practitioner"], None),
        },
        CallerSpec {
            name: "practitioner P2 (encounter)",
            who: Who::Practitioner(s.k("P2")),
            token: user_token(
                &format!("{}-oid-p2", s.run),
                &["Practitioner"],
                Some(&s.k("P2")),
            ),
        },
        CallerSpec {
            name: "practitioner P3 (care team)",
            who: Who::Practitioner(s.k("P3")),
            token: user_token(
                &format!("{}-oid-p3", s.run),
                &["Practitioner"],
                Some(&s.k("P3")),
            ),
        },
        CallerSpec {
            name: "practitioner P4 (of nobody)",
            who: Who::Practitioner(s.k("P4")),
            token: user_token(
                &format!("{}-oid-p4", s.run),
                &["Practitioner"],
                Some(&s.k("P4")),
            ),
        },
        CallerSpec {
            name: "related person of D (abs.)",
            who: Who::RelatedPerson(s.k("RP")),
            token: user_token(
                &format!("{}-oid-rp", s.run),
                &["RelatedPerson"],
                Some(&format!("{}/{}", gw.base(), s.k("RP"))),
            ),
        },
        CallerSpec {
            name: "reader-app (IdP token)",
            who: Who::Nobody,
            token: reader_app.clone(),
        },
        CallerSpec {
            name: "reader (fresh oid, no link)",
            who: Who::Nobody,
            token: user_token(&format!("{}-oid-reader", s.run), &["Reader"], None),
        },
        CallerSpec {
            name: "admin-app",
            who: Who::Admin,
            token: admin.clone(),
        },
    ];

    // 3. Every request for every caller, callers in parallel.
    let corpus = std::sync::Arc::new(corpus);
    let mut set = tokio::task::JoinSet::new();
    for (i, c) in callers.into_iter().enumerate() {
        let corpus = corpus.clone();
        let base = gw.base();
        let admin = admin.clone();
        set.spawn(async move {
            let judge = Judge {
                http: client(),
                base,
                oracle: Oracle::with_relations(s, c.who.clone(), relations),
                token: c.token,
                admin_token: admin,
                denied_status: 403,
            };
            let mut t = Tally {
                caller: c.name.to_string(),
                ..Default::default()
            };
            for req in corpus.iter() {
                judge.run(req, &mut t).await;
            }
            (i, t, judge.oracle.allowed().cloned())
        });
    }
    let mut tallies = vec![];
    while let Some(r) = set.join_next().await {
        tallies.push(r.unwrap());
    }
    tallies.sort_by_key(|(i, _, _)| *i);

    // 4. The summary table, the details, the verdict.
    eprintln!(
        "\nleak_suite run {} (relations {relations:?}): {} requests per caller\n{:<30} {:>8} {:>8} {:>8} {:>8} {:>9}  may see patients",
        s.run,
        corpus.len(),
        "caller",
        "requests",
        "returned",
        "foreign",
        "missing",
        "contract"
    );
    let mut failed = false;
    for (_, t, allowed) in &tallies {
        let allowed = match allowed {
            None => "all".to_string(),
            Some(a) => a
                .iter()
                .map(|k| k.rsplit('-').next().unwrap().to_uppercase())
                .collect::<Vec<_>>()
                .join(","),
        };
        eprintln!(
            "{:<30} {:>8} {:>8} {:>8} {:>8} {:>9}  {{{allowed}}}",
            t.caller,
            t.requests,
            t.returned,
            t.foreign,
            t.missing,
            t.problems.len()
        );
        failed |= t.foreign > 0 || t.missing > 0 || !t.problems.is_empty();
    }
    let total = |f: fn(&Tally) -> usize| tallies.iter().map(|(_, t, _)| f(t)).sum::<usize>();
    eprintln!(
        "{:<30} {:>8} {:>8} {:>8} {:>8}",
        "TOTAL",
        total(|t| t.requests),
        total(|t| t.returned),
        total(|t| t.foreign),
        total(|t| t.missing)
    );
    for (_, t, _) in &tallies {
        for (kind, list) in [
            ("LEAK", &t.leaks),
            ("MISSING", &t.misses),
            ("CONTRACT", &t.problems),
        ] {
            for line in list.iter().take(40) {
                eprintln!("{kind} [{}] {line}", t.caller);
            }
            if list.len() > 40 {
                eprintln!("{kind} [{}] … {} more", t.caller, list.len() - 40);
            }
        }
    }
    assert!(
        !failed,
        "the gateway returned foreign data, withheld allowed data or broke the contract (see above)"
    );
}
