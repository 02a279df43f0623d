//! What ConsentOptOut judges an answer with (owners, the caller's associations, each patient's
//! Consents), shared by `process` and by explaining, so an explanation is the decision itself:
//! `deny` for the normal path, `explain` (the Consent and the provision that decided) only
//! when asked.

use super::{now, ConsentOptOut, Provision, Rule, Subject, Tri};
use crate::explain::{self, Verdict};
use crate::filter::{self, Ownership};
use crate::links::Participant;
use crate::processor::{Body, Context, ModuleError, Request, Response};
use crate::reference::{Ref, Resolver};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub(super) struct Judging {
    ownership: Ownership,
    rules: BTreeMap<String, Arc<Vec<Rule>>>,
    caller: Arc<BTreeSet<Ref>>,
    /// The caller's own patient id: never kept from their own data.
    me: Option<String>,
    now: i64,
    resolver: Resolver,
    query: String,
}

impl ConsentOptOut {
    /// `None`: no patient's data but the caller's own in the answer, nothing to judge.
    pub(super) async fn judging(
        &self,
        req: &Request,
        body: &Value,
        cx: &Context,
    ) -> Result<Option<Judging>, ModuleError> {
        let ownership = Ownership::prepare(body, &req.query, cx).await?;
        // Every patient whose data is in the answer.
        let mut patients = BTreeSet::new();
        let mut all = Vec::new();
        filter::resources(body, &mut all);
        for r in all {
            patients.extend(ownership.owners(r).patients);
        }
        let who = match &cx.identity {
            Some(id) => cx.links.resolve(id, cx.fhir.as_ref()).await?,
            None => None,
        };
        let me = match &who {
            Some(Participant::Patient(p)) => Some(p.clone()),
            _ => None,
        };
        // The patient is never kept from their own data.
        if let Some(me) = &me {
            patients.remove(me);
        }
        if patients.is_empty() {
            return Ok(None);
        }
        let caller = self.associations(&who, cx).await?;
        let mut rules: BTreeMap<String, Arc<Vec<Rule>>> = BTreeMap::new();
        let list: Vec<String> = patients.into_iter().collect();
        for chunk in list.chunks(8) {
            let got = futures::future::join_all(chunk.iter().map(|p| self.rules(p, cx))).await;
            for (p, g) in chunk.iter().zip(got) {
                rules.insert(p.clone(), g?);
            }
        }
        Ok(Some(Judging {
            ownership,
            rules,
            caller,
            me,
            now: now(),
            resolver: Resolver::new(&[cx.public_base.as_str(), cx.upstream_base.as_str()]),
            query: req.query.clone(),
        }))
    }

    pub(super) async fn explain_answer(
        &self,
        req: &Request,
        resp: &Response,
        cx: &Context,
    ) -> Result<Vec<Verdict>, ModuleError> {
        let Body::Json(body) = &resp.body else {
            return Ok(vec![]);
        };
        if cx.identity.as_ref().is_some_and(|id| self.bypasses(id)) {
            return Ok(explain::each(body, |r| {
                Verdict::new(explain::reference(r), true, "bypass", Value::Null)
            }));
        }
        if !super::super::participant_filter::judged_status(req, resp.status) {
            return Ok(vec![]);
        }
        Ok(match self.judging(req, body, cx).await? {
            None => explain::each(body, |r| {
                Verdict::new(
                    explain::reference(r),
                    true,
                    "no_consent_to_judge",
                    json!({"why": "no other patient's data"}),
                )
            }),
            Some(j) => explain::each(body, |r| j.explain(r)),
        })
    }
}

impl Judging {
    fn subject<'a>(&'a self, r: &'a Value) -> Subject<'a> {
        Subject {
            resource: r,
            subsetted: filter::is_subsetted(r, &self.query),
            caller: &self.caller,
            now: self.now,
            resolver: &self.resolver,
        }
    }

    /// Judged per resource: a Consent may withhold only some of a patient's data.
    pub(super) fn deny(&self, r: &Value) -> bool {
        let subject = self.subject(r);
        self.ownership.owners(r).patients.iter().any(|p| {
            self.me.as_deref() != Some(p.as_str())
                && match self.rules.get(p) {
                    Some(list) => list.iter().any(|c| c.root.may_deny(&subject)),
                    // Not looked up (cannot happen): fail closed.
                    None => true,
                }
        })
    }

    /// `deny` with its reason: the first Consent that withholds and its deciding provision,
    /// else what each Consent of the patients permits.
    pub(super) fn explain(&self, r: &Value) -> Verdict {
        let subject = self.subject(r);
        let me = explain::reference(r);
        let mut considered = Vec::new();
        for p in &self.ownership.owners(r).patients {
            if self.me.as_deref() == Some(p.as_str()) {
                continue;
            }
            let Some(list) = self.rules.get(p) else {
                return Verdict::new(
                    me,
                    false,
                    "consent",
                    json!({"patient": p,
                    "why": "the patient's Consents were not looked up (fail closed)"}),
                );
            };
            for c in list.iter() {
                if let Some(path) = c.root.denying(&subject, "provision") {
                    return Verdict::new(
                        me,
                        false,
                        "consent",
                        json!({"patient": format!("Patient/{p}"),
                               "consent": format!("Consent/{}", c.consent),
                               "provision": path, "decision": "deny"}),
                    );
                }
                considered.push(json!({"patient": format!("Patient/{p}"),
                    "consent": format!("Consent/{}", c.consent),
                    "provision": c.root.permitting(&subject, "provision"),
                    "decision": "permit"}));
            }
        }
        let relation = if considered.is_empty() {
            "no_consent"
        } else {
            "consent"
        };
        Verdict::new(me, true, relation, json!({"consents": considered}))
    }
}

impl Provision {
    /// Explaining `may_deny`: the path of the provision that makes this one deny (`path` is
    /// its own), if some reading of the unknowns does.
    pub fn denying(&self, s: &Subject, path: &str) -> Option<String> {
        if self.matches(s) == Tri::No {
            return None;
        }
        for (i, c) in self.provisions.iter().enumerate() {
            if let Some(p) = c.denying(s, &format!("{path}.provision[{i}]")) {
                return Some(p);
            }
        }
        (!self.permit && !self.provisions.iter().any(|c| c.surely_permits(s)))
            .then(|| path.to_string())
    }

    /// The deepest provision that surely permits (`None`: none applies, the Consent
    /// withholds nothing here).
    pub fn permitting(&self, s: &Subject, path: &str) -> Option<String> {
        if self.matches(s) != Tri::Yes {
            return None;
        }
        for (i, c) in self.provisions.iter().enumerate() {
            if c.surely_permits(s) {
                let child = format!("{path}.provision[{i}]");
                return c.permitting(s, &child).or(Some(child));
            }
        }
        self.permit.then(|| path.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::super::provision::read;
    use super::*;

    #[test]
    fn the_deciding_provision_is_named() {
        let r = Resolver::new(&["http://fhir.internal/fhir"]);
        let obs = json!({"resourceType": "Observation", "id": "o",
                         "subject": {"reference": "Patient/A"}});
        let caller = BTreeSet::from([Ref::new("Practitioner", "dr")]);
        let s = Subject {
            resource: &obs,
            subsetted: false,
            caller: &caller,
            now: 1_750_000_000,
            resolver: &r,
        };
        // A permit with a deny for this practitioner nested in it.
        let p = read(
            &json!({"type": "permit", "provision": [
                {"type": "deny", "actor": [{"reference": {"reference": "Practitioner/other"}}]},
                {"type": "deny", "actor": [{"reference": {"reference": "Practitioner/dr"}}]}]}),
            &r,
            true,
        );
        assert_eq!(
            p.denying(&s, "provision").as_deref(),
            Some("provision.provision[1]")
        );
        assert!(p.may_deny(&s));
        // A deny for everyone with a permit for this practitioner: nothing denies.
        let p = read(
            &json!({"type": "deny", "provision": [
                {"type": "permit", "actor": [{"reference": {"reference": "Practitioner/dr"}}]}]}),
            &r,
            true,
        );
        assert_eq!(p.denying(&s, "provision"), None);
        assert!(!p.may_deny(&s));
        assert_eq!(
            p.permitting(&s, "provision").as_deref(),
            Some("provision.provision[0]")
        );
        // A plain deny: the root decides.
        let p = read(&json!({"type": "deny"}), &r, true);
        assert_eq!(p.denying(&s, "provision").as_deref(), Some("provision"));
    }
}
