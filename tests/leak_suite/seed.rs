//! The seed: a small hospital written straight into SEKMET (not through the gateway), every
//! resource with a per-run id prefix and a `meta.tag` `urn:leak-suite|<run>` so queries can be
//! scoped to this run's data. Next to each resource the seed keeps its outgoing references as
//! typed keys (`links`), the description the oracle works from.

use crate::harness::{client, sekmet_url};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// `Type/id`.
pub type Key = String;

pub const TAG_SYSTEM: &str = "urn:leak-suite";
pub const CODE_SYSTEM: &str = "urn:leak";
pub const OPT_OUT_CATEGORY: (&str, &str) = ("http://loinc.org", "59284-0");

pub struct Res {
    pub key: Key,
    pub json: Value,
    /// Outgoing references, by element name (`subject`, `performer`, `gp`, `participant`,
    /// `member`, `target`, `patient`, `asserter`, `practitioner`, `organization`, `agent`).
    pub links: Vec<(&'static str, Key)>,
}

/// What the oracle needs to know about a Consent (the JSON is generated from it).
#[derive(Clone)]
pub struct ConsentSpec {
    pub key: Key,
    pub patient: Key,
    pub active: bool,
    pub opt_out_category: bool,
    pub deny: bool,
    pub start: Option<String>,
    pub end: Option<String>,
    pub actors: Vec<Key>,
}

#[derive(Default)]
pub struct Seed {
    pub run: String,
    /// SEKMET's base as seen in absolute references.
    pub sekmet: String,
    names: BTreeMap<String, Key>,
    /// In insertion (dependency) order.
    pub order: Vec<Key>,
    pub res: BTreeMap<Key, Res>,
    pub consents: Vec<ConsentSpec>,
}

pub fn reference(key: &str) -> Value {
    json!({ "reference": key })
}

impl Seed {
    pub fn new(run: &str) -> Seed {
        Seed {
            run: run.to_string(),
            sekmet: sekmet_url().trim_end_matches('/').to_string(),
            ..Default::default()
        }
    }

    /// The key of a named resource (`"A"`, `"oB1"`, ...).
    pub fn k(&self, name: &str) -> Key {
        self.names
            .get(name)
            .unwrap_or_else(|| panic!("no seeded resource named {name}"))
            .clone()
    }

    /// The id of a named resource.
    pub fn id(&self, name: &str) -> String {
        self.k(name).split('/').nth(1).unwrap().to_string()
    }

    /// `_tag=urn:leak-suite|<run>` (URL-encoded).
    pub fn tag_q(&self) -> String {
        format!("_tag={TAG_SYSTEM}%7C{}", self.run)
    }

    pub fn code_q(&self) -> String {
        format!("code={CODE_SYSTEM}%7C{}", self.run)
    }

    pub fn family(&self, letter: &str) -> String {
        format!("Leak{}{letter}", self.run.replace('-', ""))
    }

    /// Adds a resource: `body` without resourceType/id/meta.
    pub fn add(
        &mut self,
        name: &str,
        ty: &str,
        suffix: &str,
        body: Value,
        links: Vec<(&'static str, Key)>,
    ) -> Key {
        let id = format!("{}-{suffix}", self.run);
        let key = format!("{ty}/{id}");
        let mut m = Map::new();
        m.insert("resourceType".into(), json!(ty));
        m.insert("id".into(), json!(id));
        m.insert(
            "meta".into(),
            json!({"tag":[{"system":TAG_SYSTEM,"code":self.run}]}),
        );
        if let Value::Object(b) = body {
            m.extend(b);
        }
        assert!(
            self.names.insert(name.to_string(), key.clone()).is_none(),
            "duplicate name {name}"
        );
        self.order.push(key.clone());
        self.res.insert(
            key.clone(),
            Res {
                key: key.clone(),
                json: Value::Object(m),
                links,
            },
        );
        key
    }

    /// Adds an opt-out style Consent (category LOINC 59284-0 unless `opt_out_category` is false).
    pub fn consent(&mut self, name: &str, suffix: &str, spec: ConsentSpec) -> Key {
        let mut provision = Map::new();
        provision.insert(
            "type".into(),
            json!(if spec.deny { "deny" } else { "permit" }),
        );
        if spec.start.is_some() || spec.end.is_some() {
            let mut p = Map::new();
            if let Some(s) = &spec.start {
                p.insert("start".into(), json!(s));
            }
            if let Some(e) = &spec.end {
                p.insert("end".into(), json!(e));
            }
            provision.insert("period".into(), Value::Object(p));
        }
        if !spec.actors.is_empty() {
            provision.insert(
                "actor".into(),
                Value::Array(
                    spec.actors
                        .iter()
                        .map(|a| {
                            json!({"role":{"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ParticipationType","code":"PRCP"}]},
                                   "reference":reference(a)})
                        })
                        .collect(),
                ),
            );
        }
        let category = if spec.opt_out_category {
            OPT_OUT_CATEGORY
        } else {
            ("http://loinc.org", "64292-6")
        };
        let body = json!({
            "status": if spec.active { "active" } else { "inactive" },
            "scope": {"coding":[{"system":"http://terminology.hl7.org/CodeSystem/consentscope","code":"patient-privacy"}]},
            "category": [{"coding":[{"system":category.0,"code":category.1}]}],
            "patient": reference(&spec.patient),
            "policyRule": {"coding":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"OPTOUT"}]},
            "provision": Value::Object(provision),
        });
        let mut links = vec![("patient", spec.patient.clone())];
        for a in &spec.actors {
            links.push(("actor", a.clone()));
        }
        let key = self.add(name, "Consent", suffix, body, links);
        self.consents.push(ConsentSpec {
            key: key.clone(),
            ..spec
        });
        key
    }

    pub fn of_type(&self, ty: &str) -> BTreeSet<Key> {
        self.res
            .keys()
            .filter(|k| k.split('/').next() == Some(ty))
            .cloned()
            .collect()
    }

    /// Targets of `key`'s links named `path`.
    pub fn linked(&self, key: &str, path: &str) -> Vec<Key> {
        self.res[key]
            .links
            .iter()
            .filter(|(p, _)| *p == path)
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// Resources of type `ty` with a link `path` → `target`.
    pub fn with_link(&self, ty: &str, path: &str, target: &str) -> BTreeSet<Key> {
        self.of_type(ty)
            .into_iter()
            .filter(|k| self.linked(k, path).iter().any(|t| t == target))
            .collect()
    }

    /// Writes every resource to SEKMET with `PUT Type/id` (creates with that id).
    pub async fn put_all(&self) {
        let http = client();
        for key in &self.order {
            let r = http
                .put(format!("{}/{key}", self.sekmet))
                .header("Content-Type", "application/fhir+json")
                .body(self.res[key].json.to_string())
                .send()
                .await
                .unwrap();
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            assert!(
                status.is_success(),
                "seeding {key} at SEKMET: {status} {text}"
            );
        }
    }
}

fn consent_spec(patient: &Key) -> ConsentSpec {
    ConsentSpec {
        key: String::new(),
        patient: patient.clone(),
        active: true,
        opt_out_category: true,
        deny: true,
        start: None,
        end: None,
        actors: vec![],
    }
}

/// A deny Consent of `patient` (active, opt-out category, no period, no actor); adjust fields.
pub fn deny(patient: &Key) -> ConsentSpec {
    consent_spec(patient)
}

/// The main seed of the corpus.
///
/// Patients: A = `<run>-12` (GP P1), F = `<run>-123` (nobody of record: the prefix-collision
/// twin of A), B (Encounter with P2; CareTeam with P3), C (CareTeam with P3), D (RelatedPerson
/// RP), E (GP P1, opted out for everyone), G (GP P1 as an absolute reference, CareTeam with P3,
/// opted out for P3 only). P4 is of record for nobody. Consents: E deny-all with only a start;
/// G deny actor Practitioner/P3 (start and end); B deny actor Organization O3 (P3's role's
/// organisation, no period); not in force: A deny-all expired (only an end), A permit, C deny-all
/// starting in 2099, C inactive deny-all, D deny-all with another category.
pub fn describe_main(run: &str) -> Seed {
    let mut s = Seed::new(run);
    let base = s.sekmet.clone();
    let tag = run.to_string();
    for n in 1..=4 {
        s.add(
            &format!("O{n}"),
            "Organization",
            &format!("o{n}"),
            json!({"name": format!("Org {tag} {n}")}),
            vec![],
        );
    }
    s.add(
        "MED",
        "Medication",
        "med",
        json!({"code":{"text":"leak medication"}}),
        vec![],
    );
    for n in 1..=4 {
        s.add(
            &format!("P{n}"),
            "Practitioner",
            &format!("p{n}"),
            json!({"name":[{"family": format!("Doc{}{n}", tag.replace('-', ""))}]}),
            vec![],
        );
    }
    for n in 1..=4 {
        let (p, o) = (s.k(&format!("P{n}")), s.k(&format!("O{n}")));
        s.add(
            &format!("ROLE{n}"),
            "PractitionerRole",
            &format!("role{n}"),
            json!({"practitioner": reference(&p), "organization": reference(&o)}),
            vec![("practitioner", p), ("organization", o)],
        );
    }
    let p1 = s.k("P1");
    let (p2, p3, p4) = (s.k("P2"), s.k("P3"), s.k("P4"));
    // Patients.
    for (letter, suffix, gp) in [
        ("A", "12", Some(reference(&p1))),
        ("F", "123", None),
        ("B", "b", None),
        ("C", "c", None),
        ("D", "d", None),
        ("E", "e", Some(reference(&p1))),
        ("G", "g", Some(json!({"reference": format!("{base}/{p1}")}))),
    ] {
        let mut body = json!({"name":[{"family": s.family(letter), "given":[letter]}]});
        let mut links = vec![];
        if let Some(g) = gp {
            body["generalPractitioner"] = json!([g]);
            links.push(("gp", p1.clone()));
        }
        s.add(letter, "Patient", suffix, body, links);
    }
    let pk = |s: &Seed, l: &str| s.k(l);
    let (a, b, c, d, e, f, g) = (
        pk(&s, "A"),
        pk(&s, "B"),
        pk(&s, "C"),
        pk(&s, "D"),
        pk(&s, "E"),
        pk(&s, "F"),
        pk(&s, "G"),
    );
    // Encounters.
    let class = json!({"system":"http://terminology.hl7.org/CodeSystem/v3-ActCode","code":"AMB"});
    for (name, suffix, subj, part) in [
        ("encA", "enc-a", &a, Some(&p1)),
        ("encB", "enc-b", &b, Some(&p2)),
        ("encF", "enc-f", &f, None),
    ] {
        let mut body = json!({"status":"finished","class":class,"subject":reference(subj)});
        let mut links = vec![("subject", subj.clone())];
        if let Some(p) = part {
            body["participant"] = json!([{"individual": reference(p)}]);
            links.push(("participant", p.clone()));
        }
        s.add(name, "Encounter", suffix, body, links);
    }
    // Care teams (SEKMET stores CareTeam but does not search it by subject/participant).
    for (name, suffix, subj, members) in [
        ("ctC", "ct-c", &c, vec![p3.clone()]),
        ("ctB", "ct-b", &b, vec![p3.clone()]),
        ("ctG", "ct-g", &g, vec![p3.clone()]),
        ("ctA", "ct-a", &a, vec![p1.clone(), c.clone()]),
    ] {
        let body = json!({"status":"active","subject":reference(subj),
            "participant": members.iter().map(|m| json!({"member": reference(m)})).collect::<Vec<_>>()});
        let mut links = vec![("subject", subj.clone())];
        for m in members {
            links.push(("member", m));
        }
        s.add(name, "CareTeam", suffix, body, links);
    }
    // Observations: (name, suffix, subject as written, subject key, performers as written).
    // (name, id suffix, subject as written and its key, performers)
    type ObsRow<'a> = (&'a str, &'a str, Option<(String, Key)>, Vec<Key>);
    let obs: Vec<ObsRow> = vec![
        (
            "oA1",
            "ob-a1",
            Some((a.clone(), a.clone())),
            vec![p1.clone()],
        ),
        (
            "oA2",
            "ob-a2",
            Some((format!("{base}/{a}"), a.clone())),
            vec![],
        ),
        (
            "oA3",
            "ob-a3",
            Some((format!("{a}/_history/1"), a.clone())),
            vec![],
        ),
        (
            "oB1",
            "ob-b1",
            Some((b.clone(), b.clone())),
            vec![a.clone()],
        ),
        (
            "oB2",
            "ob-b2",
            Some((b.clone(), b.clone())),
            vec![p2.clone()],
        ),
        ("oC1", "ob-c1", Some((c.clone(), c.clone())), vec![]),
        ("oD1", "ob-d1", Some((d.clone(), d.clone())), vec![]),
        ("oE1", "ob-e1", Some((e.clone(), e.clone())), vec![]),
        ("oF1", "ob-f1", Some((f.clone(), f.clone())), vec![]),
        (
            "oF2",
            "ob-f2",
            Some((format!("{base}/{f}/_history/1"), f.clone())),
            vec![],
        ),
        ("oG1", "ob-g1", Some((g.clone(), g.clone())), vec![]),
        ("oN", "ob-n", None, vec![p4.clone()]),
    ];
    for (name, suffix, subject, performers) in obs {
        let mut body = json!({"status":"final",
            "code":{"coding":[{"system":CODE_SYSTEM,"code":tag},{"system":"urn:leak:obs","code":name}]},
            "valueString": format!("{name} value")});
        let mut links = vec![];
        if let Some((written, key)) = subject {
            body["subject"] = json!({ "reference": written });
            links.push(("subject", key));
        }
        if !performers.is_empty() {
            body["performer"] = json!(performers.iter().map(|p| reference(p)).collect::<Vec<_>>());
            for p in performers {
                links.push(("performer", p));
            }
        }
        s.add(name, "Observation", suffix, body, links);
    }
    // Conditions.
    for (name, suffix, subj, asserter) in [
        ("condA", "cond-a", &a, None),
        ("condB", "cond-b", &b, Some(&p2)),
        ("condC", "cond-c", &c, Some(&d)),
        ("condF", "cond-f", &f, None),
    ] {
        let mut body = json!({"code":{"text":"leak condition"},"subject":reference(subj)});
        let mut links = vec![("subject", subj.clone())];
        if let Some(x) = asserter {
            body["asserter"] = reference(x);
            links.push(("asserter", x.clone()));
        }
        s.add(name, "Condition", suffix, body, links);
    }
    // Procedures (performer.actor).
    for (name, suffix, subj, actor) in [("prA", "proc-a", &a, &p1), ("prC", "proc-c", &c, &f)] {
        let body = json!({"status":"completed","code":{"text":"leak procedure"},
            "subject":reference(subj),"performer":[{"actor":reference(actor)}]});
        s.add(
            name,
            "Procedure",
            suffix,
            body,
            vec![("subject", subj.clone()), ("performer", actor.clone())],
        );
    }
    // Provenance: target names the observation and its patient (pvF2: an observation of B,
    // but the Provenance belongs to F).
    let (oa1, ob1, ob2, of1) = (s.k("oA1"), s.k("oB1"), s.k("oB2"), s.k("oF1"));
    for (name, suffix, targets, agent) in [
        ("pvA", "prov-a", vec![oa1, a.clone()], &p1),
        ("pvB", "prov-b", vec![ob2, b.clone()], &p2),
        ("pvF", "prov-f", vec![of1, f.clone()], &p4),
        ("pvF2", "prov-f2", vec![ob1, f.clone()], &p4),
    ] {
        let body = json!({"recorded":"2024-01-01T00:00:00Z",
            "target": targets.iter().map(|t| reference(t)).collect::<Vec<_>>(),
            "agent":[{"who":reference(agent)}]});
        let mut links: Vec<(&'static str, Key)> =
            targets.into_iter().map(|t| ("target", t)).collect();
        links.push(("agent", agent.clone()));
        s.add(name, "Provenance", suffix, body, links);
    }
    s.add(
        "RP",
        "RelatedPerson",
        "rp-d",
        json!({"patient":reference(&d),"name":[{"family":format!("Rel{}", tag.replace('-', ""))}]}),
        vec![("patient", d.clone())],
    );
    // Consents.
    let o3 = s.k("O3");
    let o4 = s.k("O4");
    s.consent(
        "csE",
        "cons-e",
        ConsentSpec {
            start: Some("2020-01-01".into()),
            ..deny(&e)
        },
    );
    s.consent(
        "csG",
        "cons-g",
        ConsentSpec {
            start: Some("2020-01-01".into()),
            end: Some("2099-12-31".into()),
            actors: vec![p3.clone()],
            ..deny(&g)
        },
    );
    s.consent(
        "csB",
        "cons-b",
        ConsentSpec {
            actors: vec![o3],
            ..deny(&b)
        },
    );
    s.consent(
        "csAexp",
        "cons-a-exp",
        ConsentSpec {
            end: Some("2021-01-01".into()),
            ..deny(&a)
        },
    );
    s.consent(
        "csAperm",
        "cons-a-perm",
        ConsentSpec {
            deny: false,
            ..deny(&a)
        },
    );
    s.consent(
        "csCfut",
        "cons-c-fut",
        ConsentSpec {
            start: Some("2099-01-01".into()),
            ..deny(&c)
        },
    );
    s.consent(
        "csCinact",
        "cons-c-inact",
        ConsentSpec {
            active: false,
            ..deny(&c)
        },
    );
    s.consent(
        "csDcat",
        "cons-d-cat",
        ConsentSpec {
            opt_out_category: false,
            ..deny(&d)
        },
    );
    s.consent(
        "csDorg",
        "cons-d-org",
        ConsentSpec {
            actors: vec![o4],
            ..deny(&d)
        },
    );
    s
}

pub fn new_run(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}
