//! ParticipantFilter explaining itself: for each resource, whose data it is and how the caller
//! relates to that patient (general practitioner, encounter participant, care-team member,
//! self, related person, none). Judged with the same owners and the same relation searches as
//! `process`, but the relations are looked up apart (uncached), which only explaining pays for.

use super::{allowed, judged_status, ParticipantFilter, Relation};
use crate::explain::{self, Verdict};
use crate::filter::Ownership;
use crate::links::Participant;
use crate::processor::{Body, Context, ModuleError, Request, Response};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

impl Relation {
    pub fn name(self) -> &'static str {
        match self {
            Relation::GeneralPractitioner => "general_practitioner",
            Relation::EncounterParticipant => "encounter_participant",
            Relation::CareTeamMember => "care_team_member",
        }
    }
}

/// How the caller relates to each patient they may see.
type Relations = BTreeMap<String, Vec<&'static str>>;

impl ParticipantFilter {
    async fn caller_relations(
        &self,
        who: &Option<Participant>,
        cx: &Context,
    ) -> Result<Relations, ModuleError> {
        let mut out: Relations = BTreeMap::new();
        match who {
            Some(Participant::Patient(p)) => {
                out.insert(p.clone(), vec!["self"]);
            }
            Some(Participant::RelatedPerson(r)) => {
                for p in self.related_to(r, cx).await?.iter() {
                    out.insert(p.clone(), vec!["related_person"]);
                }
            }
            Some(Participant::Practitioner(p)) => {
                for (rel, ids) in self.relations_of(p, cx).await? {
                    for id in ids {
                        let names = out.entry(id).or_default();
                        if !names.contains(&rel.name()) {
                            names.push(rel.name());
                        }
                    }
                }
            }
            None => {}
        }
        Ok(out)
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
        if let Some(id) = cx.identity.as_ref().filter(|id| self.bypasses(id)) {
            let roles: Vec<&str> = self
                .bypass
                .iter()
                .filter(|r| id.has(**r))
                .map(|r| r.name())
                .collect();
            return Ok(explain::each(body, |r| {
                Verdict::new(
                    explain::reference(r),
                    true,
                    "bypass",
                    json!({"roles": roles}),
                )
            }));
        }
        if !judged_status(req, resp.status) {
            return Ok(vec![]);
        }
        let who = match &cx.identity {
            Some(id) => cx.links.resolve(id, cx.fhir.as_ref()).await?,
            None => None,
        };
        let relations = self.caller_relations(&who, cx).await?;
        let visible: BTreeSet<String> = relations.keys().cloned().collect();
        let ownership = Ownership::prepare(body, &req.query, cx).await?;
        let caller = who.as_ref().map(|w| w.reference().to_string());
        Ok(explain::each(body, |r| {
            judge(r, &ownership, &visible, &relations, caller.as_deref())
        }))
    }
}

fn judge(
    r: &Value,
    ownership: &Ownership,
    visible: &BTreeSet<String>,
    relations: &Relations,
    caller: Option<&str>,
) -> Verdict {
    let o = ownership.owners(r);
    let kept = allowed(&o, visible);
    let me = explain::reference(r);
    if !o.is_patient_data() {
        return Verdict::new(me, kept, "not_patient_data", json!({"caller": caller}));
    }
    // The first patient the caller relates to decides (any one suffices, as in `allowed`).
    for p in &o.patients {
        if let Some(names) = relations.get(p) {
            return Verdict::new(
                me,
                kept,
                names[0],
                json!({"patient": format!("Patient/{p}"), "relations": names, "caller": caller}),
            );
        }
    }
    let patients: Vec<String> = o.patients.iter().map(|p| format!("Patient/{p}")).collect();
    Verdict::new(
        me,
        kept,
        "none",
        json!({"patients": patients, "unresolvable_reference": o.unknown, "caller": caller}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, Role};
    use crate::testing::{context_with, ScriptedClient};

    fn searchset(entries: &[(&str, &str)]) -> Value {
        json!({"resourceType": "Bundle", "type": "searchset", "entry": entries.iter().map(|(id, s)|
            json!({"resource": {"resourceType": "Observation", "id": id,
                                "subject": {"reference": s}}, "search": {"mode": "match"}})
        ).collect::<Vec<_>>()})
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

    #[tokio::test]
    async fn a_patient_is_self_and_others_are_none() {
        let f = ParticipantFilter::new(serde_json::from_value(json!({})).unwrap()).unwrap();
        let (mut cx, _) = context_with(ScriptedClient::new(vec![]));
        cx.identity = Some(Identity {
            user_id: "u".into(),
            roles: vec![Role::Patient],
            fhir_user: Some("Patient/a".into()),
            ..Default::default()
        });
        let resp = Response::json(200, searchset(&[("1", "Patient/a"), ("2", "Patient/b")]));
        let v = f.explain_answer(&get(), &resp, &cx).await.unwrap();
        assert_eq!((v[0].kept, v[0].relation.as_str()), (true, "self"), "{v:?}");
        assert_eq!(v[0].detail["patient"], "Patient/a");
        assert_eq!((v[1].kept, v[1].relation.as_str()), (false, "none"));
        assert_eq!(v[1].detail["patients"], json!(["Patient/b"]));
    }

    #[tokio::test]
    async fn a_bypassing_role_is_named() {
        let f = ParticipantFilter::new(serde_json::from_value(json!({})).unwrap()).unwrap();
        let (mut cx, client) = context_with(ScriptedClient::new(vec![]));
        cx.identity = Some(Identity {
            user_id: "u".into(),
            roles: vec![Role::Administrator],
            ..Default::default()
        });
        let resp = Response::json(200, searchset(&[("1", "Patient/a")]));
        let v = f.explain_answer(&get(), &resp, &cx).await.unwrap();
        assert_eq!(v[0].relation, "bypass");
        assert_eq!(v[0].detail["roles"], json!(["Administrator"]));
        assert!(client.calls().is_empty(), "no lookups for a bypass");
    }
}
