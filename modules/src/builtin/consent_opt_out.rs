//! ConsentOptOut (post): a patient may withhold their data from everyone, from named actors,
//! or only some of it, with R4 Consents of the configured category (status active). Each
//! Consent's provisions are read as R4 defines them, nested exceptions included
//! (`provision.rs`), and judged for every resource of the answer and the caller: actors are
//! read from `provision.actor[].reference.reference` (the predecessor read a non-existent
//! `actors` and so blocked everyone), periods may be open at either end, and criteria the
//! gateway cannot judge withhold rather than show. Consent lookups that fail deny (503).
//! Administrators bypass; the patient is never blocked from their own data; writes are not
//! blocked.

mod judging;
mod provision;

pub use provision::{Provision, Subject, Tri};

use crate::filter::{self, Judge, Style};
use crate::identity::{Identity, Role};
use crate::json::At;
use crate::links::{pct, Participant};
use crate::processor::{Body, Context, ModuleError, PostOutcome, PostProcess, Request, Response};
use crate::reference::{Ref, Resolver, Target};
use async_trait::async_trait;
use moka::sync::Cache;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn default_ttl() -> u64 {
    5
}

fn default_bypass() -> Vec<String> {
    vec!["Administrator".into()]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Consent category token, `system|code` (e.g. `http://loinc.org|59284-0`).
    pub category: String,
    /// How long Consents and a caller's associations are reused, in minutes (0: no cache).
    #[serde(default = "default_ttl")]
    pub cache_ttl_minutes: u64,
    #[serde(default)]
    pub hide_existence: bool,
    #[serde(default)]
    pub stub_denied: bool,
    #[serde(default = "default_bypass")]
    pub bypass_roles: Vec<String>,
}

/// One Consent of a patient: its root provision and every exception nested in it.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub consent: String,
    pub root: Provision,
}

pub struct ConsentOptOut {
    category: String,
    bypass: Vec<Role>,
    style: Style,
    ttl_minutes: u64,
    /// Patient id → their Consents.
    consents: Cache<String, Arc<Vec<Rule>>>,
    /// Practitioner id → the practitioner, its PractitionerRoles and their Organizations.
    associations: Cache<String, Arc<BTreeSet<Ref>>>,
}

impl ConsentOptOut {
    pub const NAME: &'static str = "ConsentOptOut";

    pub fn new(s: Settings) -> Result<ConsentOptOut, String> {
        match s.category.split_once('|') {
            Some((sys, code)) if !sys.is_empty() && !code.is_empty() && !code.contains('|') => {}
            _ => {
                return Err(format!(
                    "category {:?} must be a token system|code, e.g. http://loinc.org|59284-0",
                    s.category
                ))
            }
        }
        let ttl = Duration::from_secs(s.cache_ttl_minutes.max(1) * 60);
        Ok(ConsentOptOut {
            category: s.category,
            bypass: super::participant_filter::roles(&s.bypass_roles, "bypass_roles")?,
            style: Style {
                module: Self::NAME,
                hide_existence: s.hide_existence,
                stub: s.stub_denied,
                reason: "the patient has withheld access",
            },
            ttl_minutes: s.cache_ttl_minutes,
            consents: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            associations: Cache::builder()
                .max_capacity(50_000)
                .time_to_live(ttl)
                .build(),
        })
    }

    fn bypasses(&self, id: &Identity) -> bool {
        self.bypass.iter().any(|r| id.has(*r))
    }

    /// Every page of a Consent or PractitionerRole search (fail closed above 10,000).
    async fn search_all(&self, cx: &Context, first: String) -> Result<Vec<Value>, ModuleError> {
        filter::lookup_all(cx, first, 10_000, "consent").await
    }

    /// Who the caller counts as when Consents name actors.
    async fn associations(
        &self,
        who: &Option<Participant>,
        cx: &Context,
    ) -> Result<Arc<BTreeSet<Ref>>, ModuleError> {
        let pid = match who {
            None => return Ok(Arc::new(BTreeSet::new())),
            Some(Participant::Practitioner(p)) => p,
            Some(other) => return Ok(Arc::new(BTreeSet::from([other.reference()]))),
        };
        if self.ttl_minutes > 0 {
            if let Some(hit) = self.associations.get(pid) {
                return Ok(hit);
            }
        }
        let roles = self
            .search_all(
                cx,
                format!("PractitionerRole?practitioner=Practitioner/{pid}&_count=200"),
            )
            .await?;
        let resolver = Resolver::new(&[cx.public_base.as_str(), cx.upstream_base.as_str()]);
        let mut set = BTreeSet::from([Ref::new("Practitioner", pid)]);
        let me = Ref::new("Practitioner", pid);
        // Only roles that really are this practitioner's (a server may ignore the parameter).
        let mine = |r: &&Value| {
            matches!(
                r.at("/practitioner/reference").and_then(Value::as_str).map(|s| resolver.parse(s)),
                Some(Target::Local(x)) if x == me
            )
        };
        for r in roles.iter().filter(mine) {
            if let Some(id) = r.get("id").and_then(Value::as_str) {
                set.insert(Ref::new("PractitionerRole", id));
            }
            if let Some(Target::Local(org)) = r
                .at("/organization/reference")
                .and_then(Value::as_str)
                .map(|s| resolver.parse(s))
            {
                set.insert(org);
            }
        }
        let set = Arc::new(set);
        if self.ttl_minutes > 0 {
            self.associations.insert(pid.clone(), set.clone());
        }
        Ok(set)
    }

    /// A patient's Consents, every page (cached).
    async fn rules(&self, patient: &str, cx: &Context) -> Result<Arc<Vec<Rule>>, ModuleError> {
        if self.ttl_minutes > 0 {
            if let Some(hit) = self.consents.get(patient) {
                return Ok(hit);
            }
        }
        let found = self
            .search_all(
                cx,
                format!(
                    "Consent?patient=Patient/{patient}&category={}&status=active&_count=100",
                    pct(&self.category).replace("%7C", "|")
                ),
            )
            .await?;
        let resolver = Resolver::new(&[cx.public_base.as_str(), cx.upstream_base.as_str()]);
        let list: Vec<Rule> = found
            .iter()
            .filter_map(|c| rule(c, patient, &self.category, &resolver))
            .collect();
        let list = Arc::new(list);
        if self.ttl_minutes > 0 {
            self.consents.insert(patient.to_string(), list.clone());
        }
        Ok(list)
    }
}

/// A Consent's rule, if it is one of this patient's active Consents of the configured
/// category (checked here too: the search is only a pre-selection).
pub fn rule(c: &Value, patient: &str, category: &str, resolver: &Resolver) -> Option<Rule> {
    if c.get("resourceType").and_then(Value::as_str) != Some("Consent")
        || c.get("status").and_then(Value::as_str) != Some("active")
    {
        return None;
    }
    let (sys, code) = category.split_once('|')?;
    let has_category = c
        .get("category")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .flat_map(|cc| {
            cc.get("coding")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
        })
        .any(|cd| {
            cd.get("system").and_then(Value::as_str) == Some(sys)
                && cd.get("code").and_then(Value::as_str) == Some(code)
        });
    let for_patient = matches!(
        c.at("/patient/reference").and_then(Value::as_str).map(|s| resolver.parse(s)),
        Some(Target::Local(r)) if r.is("Patient") && r.id == patient
    );
    let p = c.get("provision")?;
    if !has_category || !for_patient {
        return None;
    }
    Some(Rule {
        consent: c
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        root: provision::read(p, resolver, true),
    })
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    // Howard Hinnant's days-from-civil algorithm.
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// A FHIR `date` / `dateTime` as seconds since the epoch: the first second it covers, or with
/// `end` the last one (`2025` as an end means through 31 December 2025).
pub fn fhir_time(s: &str, end: bool) -> Option<i64> {
    let num = |a: usize, b: usize| -> Option<i64> {
        let t = s.get(a..b)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let y = num(0, 4)?;
    if s.len() == 4 {
        return Some(if end {
            days_from_civil(y + 1, 1, 1) * 86_400 - 1
        } else {
            days_from_civil(y, 1, 1) * 86_400
        });
    }
    if s.as_bytes().get(4) != Some(&b'-') {
        return None;
    }
    let m = num(5, 7).filter(|m| (1..=12).contains(m))?;
    if s.len() == 7 {
        let last = days_in_month(y, m);
        return Some(if end {
            (days_from_civil(y, m, last) + 1) * 86_400 - 1
        } else {
            days_from_civil(y, m, 1) * 86_400
        });
    }
    if s.as_bytes().get(7) != Some(&b'-') {
        return None;
    }
    let d = num(8, 10).filter(|d| *d >= 1 && *d <= days_in_month(y, m))?;
    let day = days_from_civil(y, m, d) * 86_400;
    if s.len() == 10 {
        return Some(if end { day + 86_399 } else { day });
    }
    if s.as_bytes().get(10) != Some(&b'T') {
        return None;
    }
    let hh = num(11, 13).filter(|h| *h < 24)?;
    let mm = num(14, 16).filter(|m| *m < 60)?;
    let ss = num(17, 19).filter(|x| *x < 61)?;
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "+00:00" | "-00:00" => 0,
        _ if rest.len() == 6 && (rest.starts_with('+') || rest.starts_with('-')) => {
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            let o = oh * 3600 + om * 60;
            if rest.starts_with('+') {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    Some(day + hh * 3600 + mm * 60 + ss - offset)
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[async_trait]
impl PostProcess for ConsentOptOut {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn applies(&self, req: &Request, caller: Option<&Identity>) -> bool {
        // A bypassing caller's response is never buffered.
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
        let judged = match filter::judged_or_done(req, resp, cx, Self::NAME).await {
            Ok(j) => j,
            Err(end) => return Ok(end),
        };
        let body = match (&judged, &resp.body) {
            (filter::Judged::Fetched(v), _) => v,
            (_, Body::Json(v)) => v,
            _ => return Ok(PostOutcome::Continue),
        };
        let Some(judging) = self.judging(req, body, cx).await? else {
            return Ok(PostOutcome::Continue);
        };
        let mut deny = |r: &Value| judging.deny(r);
        let mut deny_gone = |_: Option<&str>| false;
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
            "Consent" => self.consents.invalidate_all(),
            "PractitionerRole" => self.associations.invalidate_all(),
            _ => {}
        }
    }

    /// Whether a Consent's actor is the caller is decided on who the caller is (`fhirUser`,
    /// else their links).
    fn uses_identity_links(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests;
