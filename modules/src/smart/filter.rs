//! The scope filter: the gateway adds it to the post chain of every caller whose scopes narrow
//! (`patient/` scopes, v2 granular scopes), whether or not the route configures a data filter —
//! the narrowing is a property of the token. It keeps what comes back and what is written
//! inside what the scopes grant, with the data filters' machinery (`filter.rs` to remove what
//! is denied, `compartment::owners` / `Ownership` to judge whose data a resource is, the
//! participant write rules for `patient/` writes):
//!
//! * a returned resource is visible when some scope granting the request's permission on its
//!   type selects it: its query (if any) matches it, and for a `patient/` scope the token's
//!   patient context is one of its owners (`compartment::owners`, every CompartmentDefinition
//!   path) — a compartment type that is nobody's data is not the patient's either; a type
//!   outside the compartment (Organization, Medication) is judged by ParticipantFilter's rule;
//! * a denied read and a read of nothing (404, 410) get the same 404, whatever exists;
//!   searchsets lose the denied entries (included ones too) without a notice;
//! * writes are judged before they are sent: `patient/` grants by the participant rules with the
//!   token's patient; query grants by the body (create, update) and the current version (update,
//!   delete) matching the query. A patch, a conditional write, or a batch entry granted only by a
//!   query cannot be checked that way and is refused.

use super::{ClinicalScope, Perm, Perms, ScopeContext, ScopeSet};
use crate::builtin::participant_filter::writes::judge_compartment_write;
use crate::builtin::participant_filter::{allowed, judged_status};
use crate::compartment::in_compartment;
use crate::filter::{self, Judge, Ownership, Style};
use crate::identity::{valid_id, Identity};
use crate::processor::{
    BodyAccess, Context, ModuleError, PostOutcome, PostProcess, Request, Response,
};
use crate::request::{classify, classify_bundle, FhirRequest, Interaction};
use async_trait::async_trait;
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;

pub struct ScopeFilter {
    scopes: ScopeSet,
    /// The patient of `patient/` scopes (empty without a patient context: they grant nothing).
    patient: Arc<BTreeSet<String>>,
    /// Some scope has a query: resources are read whole, not cut to their owners.
    queries: bool,
    style: Style,
}

const RULE: &str = "patient/ scopes reach only the patient's own data";

impl ScopeFilter {
    pub const NAME: &'static str = "SMART scopes";

    /// The filter for this caller, when its scopes narrow what they grant and no unrestricted
    /// `user/` or `system/` scope on every type grants the same anyway.
    pub fn for_identity(id: &Identity) -> Option<ScopeFilter> {
        let scopes = ScopeSet::from_strings(&id.scopes);
        let mut wide = Perms::default();
        for s in scopes
            .scopes
            .iter()
            .filter(|s| !s.narrows() && s.resource_type.is_none())
        {
            wide = union(wide, s.perms);
        }
        let narrows = scopes.scopes.iter().any(|s| {
            s.narrows()
                && s.query.as_ref().is_none_or(super::ScopeQuery::is_supported)
                && union(wide, s.perms) != wide
        });
        if !narrows {
            return None;
        }
        Some(ScopeFilter {
            queries: scopes.scopes.iter().any(|s| s.restricted),
            patient: Arc::new(id.patient_context().into_iter().collect()),
            scopes,
            style: Style {
                module: Self::NAME,
                // A denied read and an absent one must not differ (no existence oracle).
                hide_existence: true,
                stub: false,
                reason: "outside what the token's scopes grant",
            },
        })
    }

    /// Whether some scope granting one of `perms` on its type selects `r`.
    fn visible(&self, r: &Value, perms: &[Perm], ownership: &Ownership) -> bool {
        // The server's notices in a searchset carry no resource of anyone's.
        r.get("resourceType").and_then(Value::as_str) == Some("OperationOutcome")
            || self.selecting(r, perms, ownership).is_some()
    }

    /// The first scope granting one of `perms` on `r`'s type that selects `r`.
    fn selecting(
        &self,
        r: &Value,
        perms: &[Perm],
        ownership: &Ownership,
    ) -> Option<&ClinicalScope> {
        let t = r.get("resourceType").and_then(Value::as_str)?;
        let mut owners = None;
        self.scopes
            .scopes
            .iter()
            .filter(|s| perms.iter().any(|p| s.grants(t, *p)))
            .find(|s| {
                s.query.as_ref().is_none_or(|q| q.matches(r))
                    && (s.context != ScopeContext::Patient || {
                        let o = owners.get_or_insert_with(|| ownership.owners(r));
                        // A compartment type must be the patient's; other types (Organization,
                        // Medication...) as ParticipantFilter judges them.
                        if in_compartment(t) {
                            o.patients.iter().any(|p| self.patient.contains(p))
                        } else {
                            allowed(o, &self.patient)
                        }
                    })
            })
    }

    /// The one answer to a read refused, absent or gone, with the correlation id every
    /// gateway-made OperationOutcome carries.
    fn denied(&self, cx: &Context) -> Response {
        Response::outcome(
            404,
            "not-found",
            format!("resource not found (correlation id {})", cx.correlation_id),
        )
    }

    fn refuse(&self, why: impl std::fmt::Display) -> Response {
        Response::outcome(403, "forbidden", format!("{}: {why}", Self::NAME))
    }

    /// One create, update, patch or delete.
    async fn one_write(
        &self,
        c: &FhirRequest,
        req: &Request,
        cx: &Context,
    ) -> Result<Option<Response>, ModuleError> {
        let (Some(t), Some(need)) = (c.resource_type.as_deref(), c.needs.first()) else {
            return Ok(Some(self.refuse("not a write the gateway can check")));
        };
        let grants: Vec<&ClinicalScope> = self.scopes.granting(Some(t), need.perm).collect();
        if grants.iter().any(|s| !s.narrows()) {
            return Ok(None);
        }
        let mut compartment: Option<Option<Response>> = None;
        let mut refusal = None;
        for s in grants {
            if s.context == ScopeContext::Patient {
                if compartment.is_none() {
                    compartment = Some(if self.patient.is_empty() {
                        Some(self.refuse("patient/ scopes need a patient context"))
                    } else {
                        judge_compartment_write(req, cx, &self.style, RULE, self.patient.clone())
                            .await?
                    });
                }
                if let Some(Some(no)) = &compartment {
                    refusal = Some(no.clone());
                    continue;
                }
            }
            match &s.query {
                None => return Ok(None),
                Some(q) => match self.query_write(c, t, q, req, cx).await? {
                    None => return Ok(None),
                    Some(no) => refusal = Some(no),
                },
            }
        }
        Ok(Some(refusal.unwrap_or_else(|| {
            self.refuse(format!("no scope grants this write on {t}"))
        })))
    }

    /// A write granted by a scope with a query: what is written, and what it replaces or
    /// deletes, must be what the query selects.
    async fn query_write(
        &self,
        c: &FhirRequest,
        t: &str,
        q: &super::ScopeQuery,
        req: &Request,
        cx: &Context,
    ) -> Result<Option<Response>, ModuleError> {
        let outside = |what: &str| {
            self.refuse(format!(
                "{what} is outside what the scope's query selects ({t})"
            ))
        };
        let conditional = !c.params.is_empty();
        if c.interaction == Interaction::Patch || conditional {
            return Ok(Some(self.refuse(
                "a patch or a conditional write cannot be checked against a scope's query",
            )));
        }
        if matches!(c.interaction, Interaction::Create | Interaction::Update) {
            match req.json() {
                Some(Ok(v)) if v.get("resourceType").and_then(Value::as_str) == Some(t) => {
                    if !q.matches(&v) {
                        return Ok(Some(outside("the resource written")));
                    }
                }
                _ => return Ok(Some(self.refuse(format!("a {t} in JSON is needed")))),
            }
        }
        let Some(id) = c.id.as_deref().filter(|id| valid_id(id)) else {
            return Ok(None);
        };
        let (status, current) = cx.fhir.get_json(&format!("{t}/{id}")).await?;
        match status {
            200 if q.matches(&current) => Ok(None),
            // Not readable under this scope: answered as a read would be.
            200 => Ok(Some(filter::denied_response(&self.style))),
            404 | 410 if c.interaction == Interaction::Update => Ok(None),
            404 | 410 => Ok(Some(filter::denied_response(&self.style))),
            s => Err(ModuleError::Unavailable(format!(
                "reading {t}/{id} before a write answered {s}"
            ))),
        }
    }

    /// A batch or transaction: `patient/` grants judge every write entry by the participant
    /// rules; an entry granted only by a query is refused (sent alone, it is checked).
    async fn bundle_write(
        &self,
        req: &Request,
        cx: &Context,
    ) -> Result<Option<Response>, ModuleError> {
        let Some(Ok(b)) = req.json() else {
            return Ok(Some(
                self.refuse("a batch or transaction is checked as JSON only"),
            ));
        };
        let entries = match classify_bundle(&b, &cx.public_base) {
            Ok(e) => e,
            Err(e) => return Ok(Some(self.refuse(e))),
        };
        let mut compartment = false;
        for (i, e) in entries.iter().enumerate() {
            if e.is_read {
                continue;
            }
            for need in &e.needs {
                let t = match &need.types {
                    crate::request::Types::Some(t) if t.len() == 1 => t[0].as_str(),
                    _ => {
                        return Ok(Some(self.refuse(format!(
                            "Bundle entry {i} is not a write the gateway can check"
                        ))))
                    }
                };
                let grants: Vec<&ClinicalScope> =
                    self.scopes.granting(Some(t), need.perm).collect();
                if grants.iter().any(|s| !s.narrows()) {
                    continue;
                }
                if grants
                    .iter()
                    .any(|s| s.context == ScopeContext::Patient && s.query.is_none())
                {
                    compartment = true;
                    continue;
                }
                return Ok(Some(self.refuse(format!(
                    "Bundle entry {i}: a write granted only by a scope's query is checked only \
                     when sent alone"
                ))));
            }
        }
        if !compartment {
            return Ok(None);
        }
        if self.patient.is_empty() {
            return Ok(Some(self.refuse("patient/ scopes need a patient context")));
        }
        judge_compartment_write(req, cx, &self.style, RULE, self.patient.clone()).await
    }
}

/// A scope as an explanation names it (`patient/Observation.rs`, its query in brief).
fn describe(s: &ClinicalScope) -> String {
    let ctx = match s.context {
        ScopeContext::Patient => "patient",
        ScopeContext::User => "user",
        ScopeContext::System => "system",
    };
    let p = s.perms;
    let letters: String = [
        (p.create, 'c'),
        (p.read, 'r'),
        (p.update, 'u'),
        (p.delete, 'd'),
        (p.search, 's'),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, l)| *l)
    .collect();
    let t = s.resource_type.as_deref().unwrap_or("*");
    match &s.query {
        Some(q) => format!("{ctx}/{t}.{letters} (query {q:?})"),
        None => format!("{ctx}/{t}.{letters}"),
    }
}

fn union(a: Perms, b: Perms) -> Perms {
    Perms {
        create: a.create || b.create,
        read: a.read || b.read,
        update: a.update || b.update,
        delete: a.delete || b.delete,
        search: a.search || b.search,
    }
}

/// The permissions a returned resource is judged by: those the request needed (read, search).
fn judged_perms(c: Option<&FhirRequest>) -> Vec<Perm> {
    let mut v: Vec<Perm> = c
        .into_iter()
        .flat_map(|c| c.needs.iter().map(|n| n.perm))
        .filter(|p| matches!(p, Perm::Read | Perm::Search))
        .collect();
    v.dedup();
    if v.is_empty() {
        // A batch's answers, a write's echo: either.
        v = vec![Perm::Read, Perm::Search];
    }
    v
}

#[async_trait]
impl PostProcess for ScopeFilter {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn applies(&self, req: &Request, _caller: Option<&Identity>) -> bool {
        req.method != "DELETE"
    }

    async fn process(
        &self,
        req: &Request,
        resp: &mut Response,
        cx: &Context,
    ) -> Result<PostOutcome, ModuleError> {
        let c = classify(&req.method, &req.path, &req.query).ok();
        let instance_read = c.as_ref().is_some_and(|c| {
            matches!(c.interaction, Interaction::Read | Interaction::VRead)
                || (c.interaction == Interaction::History && c.id.is_some())
        });
        if instance_read && matches!(resp.status, 403 | 404 | 410) {
            // Refused elsewhere, absent or deleted: one answer (no existence oracle).
            *resp = self.denied(cx);
            return Ok(PostOutcome::Stop);
        }
        let judged = match filter::judged_or_done(req, resp, cx, Self::NAME).await {
            Ok(j) => j,
            Err(end) => return Ok(end),
        };
        let ownership = match (&judged, &resp.body) {
            (filter::Judged::Fetched(v), _) => Ownership::prepare(v, &req.query, cx).await?,
            (_, crate::processor::Body::Json(v)) => Ownership::prepare(v, &req.query, cx).await?,
            _ => return Ok(PostOutcome::Continue),
        };
        let perms = judged_perms(c.as_ref());
        let mut deny = |r: &Value| !self.visible(r, &perms, &ownership);
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
            filter::Applied::Denied => {
                *resp = self.denied(cx);
                PostOutcome::Stop
            }
            filter::Applied::Filtered(_) => PostOutcome::Continue,
        })
    }

    fn checks_write(&self, req: &Request, _caller: Option<&Identity>) -> bool {
        matches!(req.method.as_str(), "POST" | "PUT" | "PATCH" | "DELETE")
    }

    async fn check_write(
        &self,
        req: &Request,
        cx: &Context,
    ) -> Result<Option<Response>, ModuleError> {
        let Ok(c) = classify(&req.method, &req.path, &req.query) else {
            return Ok(Some(self.refuse("not a FHIR request")));
        };
        match c.interaction {
            Interaction::Bundle => self.bundle_write(req, cx).await,
            Interaction::Create
            | Interaction::Update
            | Interaction::Patch
            | Interaction::Delete => self.one_write(&c, req, cx).await,
            // Searches and read-only operations write nothing (the policy refuses the others).
            _ => Ok(None),
        }
    }

    async fn explain(
        &self,
        req: &Request,
        resp: &Response,
        cx: &Context,
    ) -> Result<Option<Vec<crate::explain::Verdict>>, ModuleError> {
        use crate::explain::{each, reference, Verdict};
        let crate::processor::Body::Json(body) = &resp.body else {
            return Ok(Some(vec![]));
        };
        if !judged_status(req, resp.status) {
            return Ok(Some(vec![]));
        }
        let c = classify(&req.method, &req.path, &req.query).ok();
        let perms = judged_perms(c.as_ref());
        let ownership = Ownership::prepare(body, &req.query, cx).await?;
        Ok(Some(each(body, |r| {
            match self.selecting(r, &perms, &ownership) {
                Some(s) => Verdict::new(
                    reference(r),
                    true,
                    "scope",
                    serde_json::json!({"scope": describe(s)}),
                ),
                None => Verdict::new(
                    reference(r),
                    false,
                    "scope",
                    serde_json::json!({"scope": null,
                        "why": "no scope of the token selects it"}),
                ),
            }
        })))
    }

    /// Queries read elements beyond those deciding the owner.
    fn reads(&self) -> BodyAccess {
        if self.queries {
            BodyAccess::Whole
        } else {
            BodyAccess::Compartment
        }
    }
}

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
