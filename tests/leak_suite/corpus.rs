//! The request corpus (pitfalls 7–20), each request with what SEKMET returns for it without any
//! filtering, computed from the seed description in plain Rust (and checked against SEKMET
//! directly before the gateway is asked: see `check::calibrate`).

use crate::seed::{Key, Seed, CODE_SYSTEM, TAG_SYSTEM};
use serde_json::{json, Value};
use std::collections::BTreeSet;

#[derive(Clone, Debug)]
pub enum Body {
    None,
    Form(String),
    Json(Value),
}

#[derive(Clone, Debug)]
pub enum Expect {
    /// A single resource (read, vread).
    Read(Key),
    /// A Bundle (searchset, history, $everything) over all its pages: `matches` are the
    /// `search.mode: match` entries (what `total` counts), `includes` the included ones.
    Bundle {
        matches: BTreeSet<Key>,
        includes: BTreeSet<Key>,
    },
    /// `_summary=count`: a Bundle with `total` only.
    Count { matches: BTreeSet<Key> },
    /// A batch of GETs, one expectation per entry.
    Batch(Vec<Expect>),
    /// The caller fetches the `next` link an Administrator got for this search (a page URL
    /// handed to another user); `matches` are all matches of the search.
    AdminNext { matches: BTreeSet<Key> },
    /// A search from an offset on (all following pages), over `of`: which of them SEKMET puts
    /// there is its ordering, so calibration fixes `matches` (checking it is a subset of `of`).
    /// `total`, if any, counts all of `of`.
    Page {
        of: BTreeSet<Key>,
        matches: BTreeSet<Key>,
    },
}

#[derive(Clone, Debug)]
pub struct Req {
    pub label: String,
    pub method: &'static str,
    /// Below the FHIR base, no leading slash ("" for the base itself).
    pub path: String,
    pub body: Body,
    pub expect: Expect,
}

fn get(label: &str, path: String, expect: Expect) -> Req {
    Req {
        label: label.to_string(),
        method: "GET",
        path,
        body: Body::None,
        expect,
    }
}

fn bundle(matches: BTreeSet<Key>) -> Expect {
    Expect::Bundle {
        matches,
        includes: BTreeSet::new(),
    }
}

fn set<I: IntoIterator<Item = Key>>(i: I) -> BTreeSet<Key> {
    i.into_iter().collect()
}

pub fn build(s: &Seed) -> Vec<Req> {
    let tag = s.tag_q();
    let code = s.code_q();
    let obs = s.of_type("Observation");
    let patients = s.of_type("Patient");
    let k = |n: &str| s.k(n);
    let id = |n: &str| s.id(n);
    let subject_is = |p: &str| s.with_link("Observation", "subject", &k(p));
    let mut v = vec![];

    // --- reads and vreads (pitfalls 10, 12)
    for n in [
        "A", "F", "B", "E", "G", "oA1", "oA2", "oA3", "oB1", "oF1", "oF2", "oN", "P1", "MED", "O1",
        "ROLE2", "RP", "csE", "csAexp", "pvF2", "ctA", "ctB", "prC", "condC", "encB",
    ] {
        v.push(get(&format!("read {n}"), k(n), Expect::Read(k(n))));
    }
    for n in ["oA1", "oF1", "A", "F"] {
        v.push(get(
            &format!("vread {n}"),
            format!("{}/_history/1", k(n)),
            Expect::Read(k(n)),
        ));
    }

    // --- searches by subject / patient, 12 vs 123 (pitfall 12)
    v.push(get(
        "Observation?subject=Patient/<run>-12",
        format!("Observation?subject={}", k("A")),
        bundle(subject_is("A")),
    ));
    v.push(get(
        "Observation?subject=Patient/<run>-123",
        format!("Observation?subject={}", k("F")),
        bundle(subject_is("F")),
    ));
    v.push(get(
        "Observation?patient=B",
        format!("Observation?patient={}", id("B")),
        bundle(subject_is("B")),
    ));
    v.push(get(
        "Observation?performer=Patient/A",
        format!("Observation?performer={}", k("A")),
        bundle(s.with_link("Observation", "performer", &k("A"))),
    ));
    v.push(get(
        "Condition?patient=C",
        format!("Condition?patient={}", id("C")),
        bundle(s.with_link("Condition", "subject", &k("C"))),
    ));
    v.push(get(
        "Provenance?patient=F",
        format!("Provenance?patient={}", id("F")),
        bundle(s.with_link("Provenance", "target", &k("F"))),
    ));
    v.push(get(
        "Encounter?participant=P2",
        format!("Encounter?participant={}", k("P2")),
        bundle(s.with_link("Encounter", "participant", &k("P2"))),
    ));
    v.push(get(
        "Patient?general-practitioner=P1",
        format!("Patient?general-practitioner={}&{tag}", k("P1")),
        bundle(s.with_link("Patient", "gp", &k("P1"))),
    ));
    v.push(get(
        "Consent?patient=E&category&status=active",
        format!(
            "Consent?patient={}&category=http://loinc.org%7C59284-0&status=active",
            id("E")
        ),
        bundle(set([k("csE")])),
    ));

    // --- compartment searches (pitfall 16)
    for p in ["A", "F", "B"] {
        v.push(get(
            &format!("Patient/{p}/Observation"),
            format!("{}/Observation", k(p)),
            bundle(
                obs.iter()
                    .filter(|o| crate::oracle::owners(s, o).contains(&k(p)))
                    .cloned()
                    .collect(),
            ),
        ));
    }
    v.push(get(
        "Patient/C/Condition",
        format!("{}/Condition", k("C")),
        bundle(s.with_link("Condition", "subject", &k("C"))),
    ));

    // --- every type of the run, by tag
    for t in [
        "Observation",
        "Patient",
        "Condition",
        "Procedure",
        "Encounter",
        "CareTeam",
        "Provenance",
        "RelatedPerson",
        "Consent",
        "Practitioner",
        "PractitionerRole",
        "Organization",
        "Medication",
    ] {
        v.push(get(
            &format!("{t}?_tag"),
            format!("{t}?{tag}"),
            bundle(s.of_type(t)),
        ));
    }
    v.push(get(
        "Observation?code",
        format!("Observation?{code}"),
        bundle(obs.clone()),
    ));

    // --- _include / _revinclude (pitfall 8)
    let mut inc = BTreeSet::new();
    for o in &obs {
        inc.extend(s.linked(o, "subject"));
        inc.extend(s.linked(o, "performer"));
    }
    v.push(get(
        "Observation?_include=performer,subject",
        format!("Observation?{code}&_include=Observation:performer&_include=Observation:subject"),
        Expect::Bundle {
            matches: obs.clone(),
            includes: inc,
        },
    ));
    let revinc = |targets: &BTreeSet<Key>| -> BTreeSet<Key> {
        s.of_type("Provenance")
            .into_iter()
            .filter(|p| s.linked(p, "target").iter().any(|t| targets.contains(t)))
            .collect()
    };
    v.push(get(
        "Observation?_revinclude=Provenance:target",
        format!("Observation?{code}&_revinclude=Provenance:target"),
        Expect::Bundle {
            matches: obs.clone(),
            includes: revinc(&obs),
        },
    ));
    let ob1 = set([k("oB1")]);
    v.push(get(
        "Observation?_id=oB1&_revinclude=Provenance:target",
        format!(
            "Observation?_id={}&_revinclude=Provenance:target",
            id("oB1")
        ),
        Expect::Bundle {
            matches: ob1.clone(),
            includes: revinc(&ob1),
        },
    ));
    v.push(get(
        "Patient?_tag&_revinclude=Provenance:target",
        format!("Patient?{tag}&_revinclude=Provenance:target"),
        Expect::Bundle {
            matches: patients.clone(),
            includes: revinc(&patients),
        },
    ));

    // --- existence oracles: _has and chaining (pitfall 9)
    let with_obs: BTreeSet<Key> = obs.iter().flat_map(|o| s.linked(o, "subject")).collect();
    v.push(get(
        "Patient?_has:Observation:subject:code",
        format!("Patient?_has:Observation:subject:{code}"),
        bundle(with_obs),
    ));
    v.push(get(
        "Observation?subject.name=<run family>",
        format!("Observation?subject.name={}", s.family("")),
        bundle(
            obs.iter()
                .filter(|o| !s.linked(o, "subject").is_empty())
                .cloned()
                .collect(),
        ),
    ));
    v.push(get(
        "Observation?subject.name=<B>",
        format!("Observation?subject.name={}", s.family("B")),
        bundle(subject_is("B")),
    ));

    // --- _elements / _summary strip the fields a filter looks at (pitfall 17)
    v.push(get(
        "Observation?_elements=id",
        format!("Observation?{tag}&_elements=id"),
        bundle(obs.clone()),
    ));
    v.push(get(
        "Observation?_summary=true",
        format!("Observation?{tag}&_summary=true"),
        bundle(obs.clone()),
    ));
    v.push(get(
        "Observation?_summary=count",
        format!("Observation?{tag}&_summary=count"),
        Expect::Count {
            matches: obs.clone(),
        },
    ));
    v.push(get(
        "Patient?_has&_summary=count",
        format!(
            "Patient?_has:Observation:subject:{code}&_id={}&_summary=count",
            id("F")
        ),
        Expect::Count {
            matches: set([k("F")]),
        },
    ));

    // --- POST _search (pitfall 11)
    v.push(Req {
        label: "POST Observation/_search".into(),
        method: "POST",
        path: "Observation/_search".into(),
        body: Body::Form(format!("code={CODE_SYSTEM}|{}", s.run)),
        expect: bundle(obs.clone()),
    });
    v.push(Req {
        label: "POST Patient/_search".into(),
        method: "POST",
        path: "Patient/_search".into(),
        body: Body::Form(format!("_tag={TAG_SYSTEM}|{}", s.run)),
        expect: bundle(patients.clone()),
    });

    // --- batch of GETs (pitfall 11)
    let entries: Vec<(String, Expect)> = vec![
        (format!("Observation?{code}"), bundle(obs.clone())),
        (k("F"), Expect::Read(k("F"))),
        (k("A"), Expect::Read(k("A"))),
        (format!("Condition?{tag}"), bundle(s.of_type("Condition"))),
        (k("oN"), Expect::Read(k("oN"))),
        (k("oB1"), Expect::Read(k("oB1"))),
    ];
    v.push(Req {
        label: "batch of GETs".into(),
        method: "POST",
        path: String::new(),
        body: Body::Json(json!({"resourceType":"Bundle","type":"batch",
            "entry": entries.iter().map(|(u, _)| json!({"request":{"method":"GET","url":u}})).collect::<Vec<_>>()})),
        expect: Expect::Batch(entries.into_iter().map(|(_, e)| e).collect()),
    });

    // --- history
    for n in ["oB1", "oF1", "A"] {
        v.push(get(
            &format!("history {n}"),
            format!("{}/_history", k(n)),
            bundle(set([k(n)])),
        ));
    }

    // --- $everything (pitfall 16): the Patient and its compartment; SEKMET's own operation
    // (calibrated: it leaves CareTeam out and adds referenced non-patient resources).
    for p in ["A", "F", "D", "G"] {
        v.push(get(
            &format!("Patient/{p}/$everything"),
            format!("{}/$everything", k(p)),
            bundle(everything(s, &k(p))),
        ));
    }

    // --- paging (pitfalls 14, 15)
    v.push(get(
        "Observation?code&_count=2 (all pages)",
        format!("Observation?{code}&_count=2"),
        bundle(obs.clone()),
    ));
    v.push(get(
        "Observation?_tag&_count=3&_offset=3 (offset page)",
        format!("Observation?{tag}&_count=3&_offset=3"),
        Expect::Page {
            of: obs.clone(),
            matches: BTreeSet::new(),
        },
    ));
    v.push(get(
        "admin's next link of Observation?code&_count=2",
        format!("Observation?{code}&_count=2"),
        Expect::AdminNext {
            matches: obs.clone(),
        },
    ));
    v.push(get(
        "admin's next link of Patient?_tag&_count=2",
        format!("Patient?{tag}&_count=2"),
        Expect::AdminNext {
            matches: patients.clone(),
        },
    ));
    v
}

/// What SEKMET's `Patient/{id}/$everything` returns for a seeded patient (calibrated): the
/// Patient, every resource of its compartment except CareTeam (SEKMET has no CareTeam search
/// parameters), and whatever those reference, one hop (other patients' Patient resources too),
/// except Consent actors.
pub fn everything(s: &Seed, patient: &Key) -> BTreeSet<Key> {
    let mut out = BTreeSet::from([patient.clone()]);
    for key in s.res.keys() {
        if crate::oracle::ty(key) != "CareTeam" && crate::oracle::owners(s, key).contains(patient) {
            out.insert(key.clone());
        }
    }
    let mut refs = BTreeSet::new();
    for key in &out {
        for (path, t) in &s.res[key].links {
            if *path != "actor" {
                refs.insert(t.clone());
            }
        }
    }
    out.extend(refs);
    out
}
