//! R4 Consent provisions, nested, judged for one resource and one caller.
//!
//! The root provision's `type` is the Consent's base (absent: permit, i.e. the Consent
//! withholds nothing by itself); each nested `provision` is an exception to its parent,
//! recursively (a deny inside a permit, a permit inside a deny, ...). A provision applies only
//! when every criterion it states matches; the deepest applying provision decides, and when
//! applying siblings disagree, deny wins.
//!
//! Criteria the gateway can judge: `period` (now), `actor` (the caller and its associations),
//! `data` with meaning `instance` (and the instance itself for `related` / `dependents`, a
//! visible reference to it for `dependents`), `class` in the resource-types system,
//! `securityLabel` (the resource's `meta.security`) and `action` (a read is `access` and
//! `disclose`). Anything else — `code`, `purpose`, `dataPeriod`, `authoredby`, what a
//! `related` instance refers to, a class of another system, an actor that cannot be matched —
//! is *unknown*, and unknowns are settled the safe way: a deny provision with an unknown
//! criterion is taken to apply, a permit provision with one is not. Concretely the resource is
//! withheld when *some* reading of the unknowns makes the Consent deny (`may_deny`).

use crate::json::At;
use crate::reference::{Ref, Resolver, Target};
use serde_json::Value;
use std::collections::BTreeSet;

/// Whether a criterion matches: `No < Unknown < Yes`, so "all criteria" is the minimum and
/// "any of a list" the maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tri {
    No,
    Unknown,
    Yes,
}

/// Nested provisions deeper than this are not read: the last level read denies (fail closed).
const MAX_DEPTH: usize = 16;

const RESOURCE_TYPES: &str = "http://hl7.org/fhir/resource-types";
const CONSENT_ACTION: &str = "http://terminology.hl7.org/CodeSystem/consentaction";

/// Actor types the gateway can recognise a caller as (its Patient, Practitioner, the
/// practitioner's roles and their organisations, RelatedPerson). A Group, CareTeam or Device
/// might contain the caller: unknown.
const ACTOR_TYPES: [&str; 5] = [
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Organization",
    "RelatedPerson",
];

#[derive(Clone, Debug, PartialEq)]
pub enum Actor {
    Is(Ref),
    Unknown,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Meaning {
    Instance,
    Related,
    Dependents,
    Other,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Data {
    pub meaning: Meaning,
    /// `None`: a reference the gateway cannot resolve.
    pub target: Option<Ref>,
}

/// One provision and its exceptions.
#[derive(Clone, Debug, PartialEq)]
pub struct Provision {
    pub permit: bool,
    /// Seconds since the epoch; `None` is open.
    pub start: Option<i64>,
    pub end: Option<i64>,
    /// Empty: everyone.
    pub actors: Vec<Actor>,
    pub data: Vec<Data>,
    /// Resource types (`None`: a class the gateway cannot judge).
    pub classes: Vec<Option<String>>,
    /// `(system, code)` security labels.
    pub labels: Vec<(String, String)>,
    /// The `action` criterion, judged once (`None`: not stated).
    pub action: Option<Tri>,
    /// A stated criterion the gateway cannot judge (`code`, `purpose`, `dataPeriod`).
    pub unjudgeable: bool,
    pub provisions: Vec<Provision>,
}

/// What a provision is judged against.
pub struct Subject<'a> {
    pub resource: &'a Value,
    /// The resource was cut (`_elements`, `_summary`): its labels are not all there.
    pub subsetted: bool,
    /// The caller's associations (`ConsentOptOut::associations`).
    pub caller: &'a BTreeSet<Ref>,
    pub now: i64,
    pub resolver: &'a Resolver,
}

fn local(v: Option<&Value>, resolver: &Resolver) -> Option<Ref> {
    match v.and_then(Value::as_str).map(|s| resolver.parse(s)) {
        Some(Target::Local(r)) => Some(r),
        _ => None,
    }
}

fn list<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

fn codings(cc: &Value) -> impl Iterator<Item = (&str, &str)> {
    list(cc, "coding").map(|c| {
        (
            c.get("system").and_then(Value::as_str).unwrap_or(""),
            c.get("code").and_then(Value::as_str).unwrap_or(""),
        )
    })
}

fn stated(v: &Value, key: &str) -> bool {
    match v.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}

/// Reads a provision (`root`: the Consent's own, whose absent type is a permit).
pub fn read(p: &Value, resolver: &Resolver, root: bool) -> Provision {
    read_at(p, resolver, root, 0)
}

fn read_at(p: &Value, resolver: &Resolver, root: bool, depth: usize) -> Provision {
    let permit = match p.get("type").and_then(Value::as_str) {
        Some("permit") => true,
        None if root => true,
        // `deny`, or a type that cannot be read (nested provisions must state one): deny.
        _ => false,
    };
    // An unreadable bound is treated as open: a deny then applies more widely. A permit's
    // unreadable bound is unknown instead (it must not widen a permit).
    let bound = |key: &str, end: bool| -> (Option<i64>, bool) {
        match p.at(&format!("/period/{key}")).and_then(Value::as_str) {
            None => (None, false),
            Some(s) => match super::fhir_time(s, end) {
                Some(t) => (Some(t), false),
                None => (None, true),
            },
        }
    };
    let (start, bad_start) = bound("start", false);
    let (end, bad_end) = bound("end", true);
    let actors = list(p, "actor")
        .map(|a| match local(a.at("/reference/reference"), resolver) {
            Some(r) if ACTOR_TYPES.contains(&r.rtype.as_str()) => Actor::Is(r),
            _ => Actor::Unknown,
        })
        .collect();
    let data = list(p, "data")
        .map(|d| Data {
            meaning: match d.get("meaning").and_then(Value::as_str) {
                Some("instance") => Meaning::Instance,
                Some("related") => Meaning::Related,
                Some("dependents") => Meaning::Dependents,
                _ => Meaning::Other,
            },
            target: local(d.at("/reference/reference"), resolver),
        })
        .collect();
    let classes = list(p, "class")
        .map(|c| {
            (c.get("system").and_then(Value::as_str) == Some(RESOURCE_TYPES))
                .then(|| c.get("code").and_then(Value::as_str).map(str::to_string))
                .flatten()
        })
        .collect();
    let labels = list(p, "securityLabel")
        .map(|c| {
            (
                c.get("system")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                c.get("code")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    let action = stated(p, "action").then(|| {
        list(p, "action")
            .map(|cc| {
                let mut t = if cc.get("coding").is_none() {
                    Tri::Unknown
                } else {
                    Tri::No
                };
                for (sys, code) in codings(cc) {
                    t = t.max(match (sys, code) {
                        // Reading through the gateway: the caller accesses, the holder discloses.
                        (CONSENT_ACTION, "access" | "disclose") => Tri::Yes,
                        (CONSENT_ACTION, "collect" | "correct") => Tri::No,
                        // `use` (what the caller then does) and other systems.
                        _ => Tri::Unknown,
                    });
                }
                t
            })
            .max()
            .unwrap_or(Tri::Unknown)
    });
    let unjudgeable = ["code", "purpose", "dataPeriod"]
        .iter()
        .any(|k| stated(p, k))
        || (permit && (bad_start || bad_end));
    let provisions = if depth + 1 >= MAX_DEPTH {
        if stated(p, "provision") {
            // Exceptions nobody reads: this one decides, as a deny of unknown reach.
            return Provision {
                permit: false,
                start: None,
                end: None,
                actors: vec![],
                data: vec![],
                classes: vec![],
                labels: vec![],
                action: None,
                unjudgeable: true,
                provisions: vec![],
            };
        }
        vec![]
    } else {
        list(p, "provision")
            .map(|c| read_at(c, resolver, false, depth + 1))
            .collect()
    };
    Provision {
        permit,
        start,
        end,
        actors,
        data,
        classes,
        labels,
        action,
        unjudgeable,
        provisions,
    }
}

/// Whether `r` names `target` in a reference the gateway can see.
fn refers_to(r: &Value, target: &Ref, resolver: &Resolver) -> bool {
    match r {
        Value::Object(o) => o.iter().any(|(k, v)| {
            (k == "reference"
                && v.as_str().map(|s| resolver.parse(s)) == Some(Target::Local(target.clone())))
                || refers_to(v, target, resolver)
        }),
        Value::Array(a) => a.iter().any(|v| refers_to(v, target, resolver)),
        _ => false,
    }
}

impl Provision {
    /// Whether every criterion matches (minimum over the stated ones).
    pub fn matches(&self, s: &Subject) -> Tri {
        let mut t = Tri::Yes;
        if self.start.is_some_and(|st| s.now < st) || self.end.is_some_and(|e| s.now > e) {
            return Tri::No;
        }
        if self.unjudgeable {
            t = Tri::Unknown;
        }
        if !self.actors.is_empty() {
            t = t.min(
                self.actors
                    .iter()
                    .map(|a| match a {
                        Actor::Is(r) if s.caller.contains(r) => Tri::Yes,
                        Actor::Is(_) => Tri::No,
                        Actor::Unknown => Tri::Unknown,
                    })
                    .max()
                    .unwrap_or(Tri::Yes),
            );
        }
        let rtype = s.resource.get("resourceType").and_then(Value::as_str);
        let id = s.resource.get("id").and_then(Value::as_str);
        let me = match (rtype, id) {
            (Some(t), Some(i)) => Some(Ref::new(t, i)),
            _ => None,
        };
        if !self.data.is_empty() {
            t = t.min(
                self.data
                    .iter()
                    .map(|d| match (&d.target, &d.meaning) {
                        (None, _) | (_, Meaning::Other) => Tri::Unknown,
                        (Some(x), _) if me.as_ref() == Some(x) => Tri::Yes,
                        (Some(_), Meaning::Instance) => Tri::No,
                        (Some(x), Meaning::Dependents) if refers_to(s.resource, x, s.resolver) => {
                            Tri::Yes
                        }
                        // What the instance refers to, or what refers to it through elements
                        // the gateway does not see.
                        (Some(_), _) => Tri::Unknown,
                    })
                    .max()
                    .unwrap_or(Tri::Yes),
            );
        }
        if !self.classes.is_empty() {
            t = t.min(
                self.classes
                    .iter()
                    .map(|c| match c {
                        Some(c) if Some(c.as_str()) == rtype => Tri::Yes,
                        Some(_) => Tri::No,
                        None => Tri::Unknown,
                    })
                    .max()
                    .unwrap_or(Tri::Yes),
            );
        }
        if !self.labels.is_empty() {
            let has = list(s.resource.get("meta").unwrap_or(&Value::Null), "security").any(|l| {
                let sys = l.get("system").and_then(Value::as_str).unwrap_or("");
                let code = l.get("code").and_then(Value::as_str).unwrap_or("");
                self.labels.iter().any(|(s2, c2)| s2 == sys && c2 == code)
            });
            t = t.min(match (has, s.subsetted) {
                (true, _) => Tri::Yes,
                (false, true) => Tri::Unknown,
                (false, false) => Tri::No,
            });
        }
        if let Some(a) = self.action {
            t = t.min(a);
        }
        t
    }

    /// Whether some reading of the unknowns makes this provision (and its exceptions) deny.
    pub fn may_deny(&self, s: &Subject) -> bool {
        self.matches(s) != Tri::No && self.may_deny_if_applied(s)
    }

    fn may_deny_if_applied(&self, s: &Subject) -> bool {
        self.provisions.iter().any(|c| c.may_deny(s))
            || (!self.permit && !self.provisions.iter().any(|c| c.surely_permits(s)))
    }

    /// Whether this provision applies and permits whatever the unknowns are.
    pub(super) fn surely_permits(&self, s: &Subject) -> bool {
        self.matches(s) == Tri::Yes
            && !self.provisions.iter().any(|c| c.may_deny(s))
            && (self.permit || self.provisions.iter().any(|c| c.surely_permits(s)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NOW: i64 = 1_750_000_000; // June 2025

    fn res() -> Resolver {
        Resolver::new(&["http://fhir.internal/fhir"])
    }

    fn denies(p: &Value, resource: &Value, caller: &[Ref], subsetted: bool) -> bool {
        let r = res();
        let caller: BTreeSet<Ref> = caller.iter().cloned().collect();
        read(p, &r, true).may_deny(&Subject {
            resource,
            subsetted,
            caller: &caller,
            now: NOW,
            resolver: &r,
        })
    }

    fn actor(r: &str) -> Value {
        json!({"reference": {"reference": r}})
    }

    fn obs(id: &str) -> Value {
        json!({"resourceType": "Observation", "id": id, "subject": {"reference": "Patient/A"}})
    }

    #[test]
    fn a_permit_with_a_nested_deny_for_one_practitioner_and_one_period() {
        let p = json!({"type": "permit", "provision": [
            {"type": "deny", "actor": [actor("Practitioner/p2")],
             "period": {"start": "2025-01-01", "end": "2025-12-31"}}]});
        let p2 = [Ref::new("Practitioner", "p2")];
        let p1 = [Ref::new("Practitioner", "p1")];
        assert!(denies(&p, &obs("o1"), &p2, false));
        assert!(!denies(&p, &obs("o1"), &p1, false));
        // Outside the period the base (permit) holds.
        let mut later = p.clone();
        later["provision"][0]["period"] = json!({"start": "2026-01-01"});
        assert!(!denies(&later, &obs("o1"), &p2, false));
        // A root without a type is a permit; with nothing nested it withholds nothing.
        assert!(!denies(&json!({}), &obs("o1"), &p2, false));
    }

    #[test]
    fn a_deny_with_a_nested_permit_for_one_data_reference() {
        let p = json!({"type": "deny", "provision": [
            {"type": "permit", "data": [{"meaning": "instance",
                "reference": {"reference": "Observation/shared"}}]}]});
        let anyone = [Ref::new("Practitioner", "p1")];
        assert!(!denies(&p, &obs("shared"), &anyone, false));
        assert!(denies(&p, &obs("other"), &anyone, false));
        // An absolute reference on the server is the same instance; another type is not.
        let mut abs = p.clone();
        abs["provision"][0]["data"][0]["reference"]["reference"] =
            json!("http://fhir.internal/fhir/Observation/shared/_history/3");
        assert!(!denies(&abs, &obs("shared"), &anyone, false));
        let cond = json!({"resourceType": "Condition", "id": "shared",
                          "subject": {"reference": "Patient/A"}});
        assert!(denies(&p, &cond, &anyone, false));
        // Three levels: deny, permit one instance, but deny it again to p2.
        let mut deep = p.clone();
        deep["provision"][0]["provision"] =
            json!([{"type": "deny", "actor": [actor("Practitioner/p2")]}]);
        assert!(!denies(&deep, &obs("shared"), &anyone, false));
        assert!(denies(
            &deep,
            &obs("shared"),
            &[Ref::new("Practitioner", "p2")],
            false
        ));
    }

    #[test]
    fn unknown_criteria_deny_never_permit() {
        let anyone = [Ref::new("Practitioner", "p1")];
        // A deny for a purpose (the gateway does not know the caller's): applies.
        let purpose = json!({"type": "permit", "provision": [{"type": "deny",
            "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]}]});
        assert!(denies(&purpose, &obs("o"), &anyone, false));
        // A permit for a code inside a deny: cannot be judged, so it does not permit.
        let code = json!({"type": "deny", "provision": [{"type": "permit",
            "code": [{"coding": [{"system": "http://loinc.org", "code": "1-8"}]}]}]});
        assert!(denies(&code, &obs("o"), &anyone, false));
        // A permit whose own criterion is unknown still carries its nested deny.
        let nested = json!({"type": "deny", "provision": [{"type": "permit",
            "purpose": [{"code": "TREAT"}],
            "provision": [{"type": "deny", "actor": [actor("Practitioner/p1")]}]}]});
        assert!(denies(&nested, &obs("o"), &anyone, false));
        // Actors that cannot be matched: a Group, an identifier.
        for a in [
            actor("Group/g"),
            json!({"reference": {"identifier": {"value": "x"}}}),
        ] {
            let p = json!({"type": "permit", "provision": [{"type": "deny", "actor": [a]}]});
            assert!(denies(&p, &obs("o"), &anyone, false));
        }
        // `related` / `dependents`: the instance is known; what else they reach is not
        // (apart from a visible reference to the instance).
        let rel = |meaning: &str| {
            json!({"type": "permit", "provision": [{"type": "deny", "data": [{"meaning": meaning,
                "reference": {"reference": "Encounter/e1"}}]}]})
        };
        let enc =
            json!({"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/A"}});
        assert!(denies(&rel("related"), &enc, &anyone, false));
        assert!(denies(&rel("related"), &obs("o"), &anyone, false));
        assert!(denies(&rel("authoredby"), &obs("o"), &anyone, false));
        let mut dep = obs("o");
        dep["encounter"] = json!({"reference": "Encounter/e1"});
        assert!(denies(&rel("dependents"), &dep, &anyone, false));
        let permit_dep = json!({"type": "deny", "provision": [{"type": "permit", "data": [
            {"meaning": "dependents", "reference": {"reference": "Encounter/e1"}}]}]});
        assert!(!denies(&permit_dep, &dep, &anyone, false));
        assert!(denies(&permit_dep, &obs("o"), &anyone, false));
        // A nested provision without a type denies; an unreadable period bound of a deny is
        // open, of a permit unknown.
        let untyped =
            json!({"type": "permit", "provision": [{"actor": [actor("Practitioner/p1")]}]});
        assert!(denies(&untyped, &obs("o"), &anyone, false));
        let bad_permit = json!({"type": "deny", "provision": [{"type": "permit",
            "period": {"start": "soon"}}]});
        assert!(denies(&bad_permit, &obs("o"), &anyone, false));
        let bad_deny = json!({"type": "deny", "period": {"end": "later"}});
        assert!(denies(&bad_deny, &obs("o"), &anyone, false));
    }

    #[test]
    fn class_labels_and_actions() {
        let anyone = [Ref::new("Practitioner", "p1")];
        let class = json!({"type": "permit", "provision": [{"type": "deny",
            "class": [{"system": RESOURCE_TYPES, "code": "Condition"}]}]});
        assert!(!denies(&class, &obs("o"), &anyone, false));
        let cond =
            json!({"resourceType": "Condition", "id": "c", "subject": {"reference": "Patient/A"}});
        assert!(denies(&class, &cond, &anyone, false));
        let profile = json!({"type": "permit", "provision": [{"type": "deny",
            "class": [{"system": "urn:ietf:bcp:13", "code": "application/hl7-cda+xml"}]}]});
        assert!(denies(&profile, &obs("o"), &anyone, false));

        let label = json!({"type": "permit", "provision": [{"type": "deny", "securityLabel": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]}]});
        let mut restricted = obs("r");
        restricted["meta"] = json!({"security": [
            {"system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality", "code": "R"}]});
        assert!(denies(&label, &restricted, &anyone, false));
        assert!(!denies(&label, &obs("o"), &anyone, false));
        // A subsetted resource may have lost its labels.
        assert!(denies(&label, &obs("o"), &anyone, true));

        let action = |code: &str| {
            json!({"type": "permit", "provision": [{"type": "deny", "action": [
                {"coding": [{"system": CONSENT_ACTION, "code": code}]}]}]})
        };
        assert!(denies(&action("access"), &obs("o"), &anyone, false));
        assert!(denies(&action("disclose"), &obs("o"), &anyone, false));
        assert!(denies(&action("use"), &obs("o"), &anyone, false));
        assert!(!denies(&action("collect"), &obs("o"), &anyone, false));
        // A permit for collecting only does not open a deny to reads.
        let collect = json!({"type": "deny", "provision": [{"type": "permit", "action": [
            {"coding": [{"system": CONSENT_ACTION, "code": "collect"}]}]}]});
        assert!(denies(&collect, &obs("o"), &anyone, false));
    }

    #[test]
    fn siblings_disagreeing_deny_and_depth_is_bounded() {
        let anyone = [Ref::new("Practitioner", "p1")];
        let both = json!({"type": "deny", "provision": [
            {"type": "permit"}, {"type": "deny", "actor": [actor("Practitioner/p1")]}]});
        assert!(denies(&both, &obs("o"), &anyone, false));
        assert!(!denies(
            &both,
            &obs("o"),
            &[Ref::new("Practitioner", "p9")],
            false
        ));
        // Alternating permit/deny far deeper than read: the cut-off level denies.
        let mut p = json!({"type": "permit"});
        for i in 0..40 {
            p = json!({"type": if i % 2 == 0 { "deny" } else { "permit" }, "provision": [p]});
        }
        p["type"] = json!("permit");
        assert!(denies(&p, &obs("o"), &anyone, false));
    }
}
