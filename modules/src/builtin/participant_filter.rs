//! ParticipantFilter (post): a patient sees their own data, a practitioner the data of the
//! patients they are of record for, a RelatedPerson the data of their patient. Everything in a
//! patient's compartment (every CompartmentDefinition path, typed references) is judged, in
//! every read shape: reads, searches, POST `_search`, batch responses, includes, history,
//! `$everything`, paging links (a page URL is just a search, filtered for whoever fetches it).
//!
//! Administrator and the global roles bypass. A caller who is nobody in the FHIR server (no
//! `fhirUser`, no link) sees no patient data. Lookups fail closed (503).

mod explain;
pub(crate) mod writes;

use crate::compartment::{values_at, Owners};
use crate::filter::{self, Judge, Ownership, Style};
use crate::identity::{valid_id, Identity, Role};
use crate::json::At;
use crate::links::{pct, Participant};
use crate::processor::{Context, ModuleError, PostOutcome, PostProcess, Request, Response};
use crate::reference::{Ref, Resolver, Target};
use async_trait::async_trait;
use moka::sync::Cache;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

/// How a practitioner comes to be "of record" for a patient.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Relation {
    /// `Patient.generalPractitioner` names the practitioner (or one of their roles).
    GeneralPractitioner,
    /// The practitioner is `Encounter.participant.individual` of one of the patient's
    /// Encounters.
    EncounterParticipant,
    /// The practitioner is `CareTeam.participant.member` of a CareTeam of the patient.
    CareTeamMember,
}

fn all_relations() -> Vec<Relation> {
    vec![
        Relation::GeneralPractitioner,
        Relation::EncounterParticipant,
        Relation::CareTeamMember,
    ]
}

fn default_bypass() -> Vec<String> {
    vec!["Administrator".into(), "DataScientist".into()]
}

fn default_ttl() -> u64 {
    60
}

fn default_max_related() -> usize {
    50_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default = "all_relations")]
    pub relations: Vec<Relation>,
    /// 404 instead of 403 for a denied read, no "filtered" notice, 410 → 404.
    #[serde(default)]
    pub hide_existence: bool,
    /// The predecessor's stub entries instead of removal (ids are never kept).
    #[serde(default)]
    pub stub_denied: bool,
    /// How long a practitioner's patient list / a RelatedPerson's patient is reused.
    #[serde(default = "default_ttl")]
    pub cache_ttl_secs: u64,
    #[serde(default = "default_bypass")]
    pub bypass_roles: Vec<String>,
    /// Upper bound on the resources one relation search may return for a practitioner
    /// (fail closed above it).
    #[serde(default = "default_max_related")]
    pub max_related: usize,
}

pub struct ParticipantFilter {
    relations: Vec<Relation>,
    bypass: Vec<Role>,
    style: Style,
    ttl: u64,
    max_related: usize,
    /// Practitioner id → ids of the patients they are of record for.
    practitioners: Cache<String, Arc<BTreeSet<String>>>,
    /// RelatedPerson id → the patient ids it is linked to.
    related: Cache<String, Arc<BTreeSet<String>>>,
}

pub(crate) fn roles(names: &[String], what: &str) -> Result<Vec<Role>, String> {
    names
        .iter()
        .map(|n| {
            Role::ALL
                .into_iter()
                .find(|r| r.name() == n)
                .ok_or_else(|| format!("{what}: unknown role {n:?}"))
        })
        .collect()
}

fn cache(ttl: u64) -> Cache<String, Arc<BTreeSet<String>>> {
    Cache::builder()
        .max_capacity(50_000)
        .time_to_live(Duration::from_secs(ttl.max(1)))
        .build()
}

impl ParticipantFilter {
    pub const NAME: &'static str = "ParticipantFilter";

    pub fn new(s: Settings) -> Result<ParticipantFilter, String> {
        if s.relations.is_empty() {
            return Err("relations: at least one relation is needed".into());
        }
        if s.max_related == 0 {
            return Err("max_related must be at least 1".into());
        }
        let mut relations = s.relations;
        relations.sort();
        relations.dedup();
        Ok(ParticipantFilter {
            relations,
            bypass: roles(&s.bypass_roles, "bypass_roles")?,
            style: Style {
                module: Self::NAME,
                hide_existence: s.hide_existence,
                stub: s.stub_denied,
                reason: "the caller is not a participant in this patient's care",
            },
            ttl: s.cache_ttl_secs,
            max_related: s.max_related,
            practitioners: cache(s.cache_ttl_secs),
            related: cache(s.cache_ttl_secs),
        })
    }

    fn bypasses(&self, id: &Identity) -> bool {
        self.bypass.iter().any(|r| id.has(*r))
    }

    /// Every page of a relation search; fail closed above `max_related`.
    async fn search_all(&self, cx: &Context, first: String) -> Result<Vec<Value>, ModuleError> {
        filter::lookup_all(cx, first, self.max_related, "relation").await
    }

    /// The patients a practitioner is of record for (cached).
    async fn of_record(
        &self,
        pid: &str,
        cx: &Context,
    ) -> Result<Arc<BTreeSet<String>>, ModuleError> {
        if self.ttl > 0 {
            if let Some(hit) = self.practitioners.get(pid) {
                return Ok(hit);
            }
        }
        let mut patients = BTreeSet::new();
        for (_, ids) in self.relations_of(pid, cx).await? {
            patients.extend(ids);
        }
        let patients = Arc::new(patients);
        if self.ttl > 0 {
            self.practitioners.insert(pid.to_string(), patients.clone());
        }
        Ok(patients)
    }

    /// The patients a practitioner is of record for, by configured relation (not cached:
    /// `of_record` caches their union, explaining needs them apart).
    async fn relations_of(
        &self,
        pid: &str,
        cx: &Context,
    ) -> Result<Vec<(Relation, Vec<String>)>, ModuleError> {
        // References may name the practitioner or one of their PractitionerRoles. Every
        // answer is checked here: a server that ignores a search parameter it does not
        // support (SEKMET has none on CareTeam) returns everything, and trusting that would
        // make every practitioner of record for everyone.
        let resolver = Resolver::new(&[cx.public_base.as_str(), cx.upstream_base.as_str()]);
        let practitioner = Ref::new("Practitioner", pid);
        let names = |r: &Value, path: &str, who: &BTreeSet<Ref>| {
            values_at(r, path).into_iter().any(|v| {
                matches!(
                    v.get("reference").and_then(Value::as_str).map(|s| resolver.parse(s)),
                    Some(Target::Local(x)) if who.contains(&x)
                )
            })
        };
        let roles = self
            .search_all(
                cx,
                format!(
                    "PractitionerRole?practitioner=Practitioner/{pid}&_elements=id,practitioner&_count=200"
                ),
            )
            .await?;
        let mut me = BTreeSet::from([practitioner.clone()]);
        me.extend(
            roles
                .iter()
                .filter(|r| names(r, "practitioner", &BTreeSet::from([practitioner.clone()])))
                .filter_map(|r| r.get("id").and_then(Value::as_str))
                .filter(|id| valid_id(id))
                .map(|id| Ref::new("PractitionerRole", id)),
        );
        let who = pct(&me.iter().map(Ref::to_string).collect::<Vec<_>>().join(","));
        let lookups = self.relations.iter().map(|rel| {
            // (search, where the caller must be named, where the patient is; "" = itself)
            let (query, member, patient): (String, &str, &str) = match rel {
                Relation::GeneralPractitioner => (
                    format!(
                        "Patient?general-practitioner={who}&_elements=id,generalPractitioner&_count=1000"
                    ),
                    "generalPractitioner",
                    "",
                ),
                Relation::EncounterParticipant => (
                    format!(
                        "Encounter?participant={who}&_elements=subject,participant&_count=1000"
                    ),
                    "participant.individual",
                    "subject",
                ),
                Relation::CareTeamMember => (
                    format!("CareTeam?participant={who}&_elements=subject,participant&_count=1000"),
                    "participant.member",
                    "subject",
                ),
            };
            let (me, resolver, names, rel) = (&me, &resolver, &names, *rel);
            async move {
                let found = self.search_all(cx, query).await?;
                let mut ids = Vec::new();
                for r in found.iter().filter(|r| names(r, member, me)) {
                    if patient.is_empty() {
                        if r.get("resourceType").and_then(Value::as_str) == Some("Patient") {
                            if let Some(id) = r.get("id").and_then(Value::as_str) {
                                ids.push(id.to_string());
                            }
                        }
                        continue;
                    }
                    for rf in values_at(r, patient) {
                        if let Some(Target::Local(p)) = rf
                            .get("reference")
                            .and_then(Value::as_str)
                            .map(|s| resolver.parse(s))
                        {
                            if p.is("Patient") {
                                ids.push(p.id);
                            }
                        }
                    }
                }
                Ok::<_, ModuleError>((rel, ids))
            }
        });
        futures::future::join_all(lookups)
            .await
            .into_iter()
            .collect()
    }

    /// The patients a RelatedPerson is linked to (cached).
    async fn related_to(
        &self,
        rid: &str,
        cx: &Context,
    ) -> Result<Arc<BTreeSet<String>>, ModuleError> {
        if self.ttl > 0 {
            if let Some(hit) = self.related.get(rid) {
                return Ok(hit);
            }
        }
        let (status, r) = cx.fhir.get_json(&format!("RelatedPerson/{rid}")).await?;
        let mut patients = BTreeSet::new();
        match status {
            200 => {
                let resolver = Resolver::new(&[cx.public_base.as_str(), cx.upstream_base.as_str()]);
                if let Some(Target::Local(p)) = r
                    .at("/patient/reference")
                    .and_then(Value::as_str)
                    .map(|s| resolver.parse(s))
                {
                    if p.is("Patient") {
                        patients.insert(p.id);
                    }
                }
            }
            // Gone: linked to nobody any more.
            404 | 410 => {}
            s => {
                return Err(ModuleError::Unavailable(format!(
                    "reading RelatedPerson/{rid} answered {s}"
                )))
            }
        }
        let patients = Arc::new(patients);
        if self.ttl > 0 {
            self.related.insert(rid.to_string(), patients.clone());
        }
        Ok(patients)
    }

    /// The patients whose data this caller may see.
    async fn visible(
        &self,
        who: Option<Participant>,
        cx: &Context,
    ) -> Result<Arc<BTreeSet<String>>, ModuleError> {
        Ok(match who {
            Some(Participant::Patient(p)) => Arc::new(BTreeSet::from([p])),
            Some(Participant::Practitioner(p)) => self.of_record(&p, cx).await?,
            Some(Participant::RelatedPerson(r)) => self.related_to(&r, cx).await?,
            None => Arc::new(BTreeSet::new()),
        })
    }
}

/// Allowed iff not patient data, or the caller may see one of its patients.
pub(crate) fn allowed(o: &Owners, visible: &BTreeSet<String>) -> bool {
    !o.is_patient_data() || o.patients.iter().any(|p| visible.contains(p))
}

pub(crate) use crate::filter::judged_status;

#[async_trait]
impl PostProcess for ParticipantFilter {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn applies(&self, req: &Request, caller: Option<&Identity>) -> bool {
        // Every answer with a body may hold patient data (a conditional create can answer
        // with an existing resource); only DELETE has nothing to show. A bypassing caller's
        // response is never buffered.
        req.method != "DELETE" && !caller.is_some_and(|id| self.bypasses(id))
    }

    async fn process(
        &self,
        req: &Request,
        resp: &mut Response,
        cx: &Context,
    ) -> Result<PostOutcome, ModuleError> {
        if cx.identity.as_ref().is_some_and(|id| self.bypasses(id)) {
            return Ok(PostOutcome::Continue);
        }
        if self.style.hide_existence && resp.status == 410 {
            // "Deleted" still says "existed".
            *resp = filter::denied_response(&self.style);
            return Ok(PostOutcome::Continue);
        }
        let judged = match filter::judged_or_done(req, resp, cx, Self::NAME).await {
            Ok(j) => j,
            Err(end) => return Ok(end),
        };
        let who = match &cx.identity {
            Some(id) => cx.links.resolve(id, cx.fhir.as_ref()).await?,
            None => None,
        };
        let visible = self.visible(who, cx).await?;
        let ownership = match (&judged, &resp.body) {
            (filter::Judged::Fetched(v), _) => Ownership::prepare(v, &req.query, cx).await?,
            (_, crate::processor::Body::Json(v)) => Ownership::prepare(v, &req.query, cx).await?,
            _ => return Ok(PostOutcome::Continue),
        };
        let mut deny = |r: &Value| !allowed(&ownership.owners(r), &visible);
        let mut deny_gone = |t: Option<&str>| filter::may_be_patient_data(t);
        let applied = filter::apply_judged(
            resp,
            judged,
            &self.style,
            filter::is_write(req),
            &mut Judge {
                deny: &mut deny,
                deny_resourceless: &mut deny_gone,
            },
        );
        Ok(match applied {
            filter::Applied::Denied => PostOutcome::Stop,
            filter::Applied::Filtered(_) => PostOutcome::Continue,
        })
    }

    /// Every write from a caller it filters is judged before it is sent (`writes.rs`).
    fn checks_write(&self, req: &Request, caller: Option<&Identity>) -> bool {
        writes::is_write_method(&req.method) && !caller.is_some_and(|id| self.bypasses(id))
    }

    async fn check_write(
        &self,
        req: &Request,
        cx: &Context,
    ) -> Result<Option<Response>, ModuleError> {
        if cx.identity.as_ref().is_some_and(|id| self.bypasses(id)) {
            return Ok(None);
        }
        self.judge_write(req, cx).await
    }

    async fn explain(
        &self,
        req: &Request,
        resp: &Response,
        cx: &Context,
    ) -> Result<Option<Vec<crate::explain::Verdict>>, ModuleError> {
        self.explain_answer(req, resp, cx).await.map(Some)
    }

    /// It judges resources by their owners alone and removes what it denies.
    fn reads(&self) -> crate::processor::BodyAccess {
        crate::processor::BodyAccess::Compartment
    }

    fn invalidate(&self, resource_type: &str) {
        match resource_type {
            "Patient" | "Encounter" | "CareTeam" | "PractitionerRole" => {
                self.practitioners.invalidate_all()
            }
            "RelatedPerson" => self.related.invalidate_all(),
            _ => {}
        }
    }

    /// Callers without `fhirUser` are found through their links.
    fn uses_identity_links(&self) -> bool {
        true
    }

    /// Participants see only the patients they take part in the care of.
    fn scopes_data_to_the_caller(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
