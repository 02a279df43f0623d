//! The oracle: who may see which seeded resource, computed from the seed description alone
//! (the test's own compartment table, its own "of record" relations and its own reading of the
//! Consents), never from gateway or module code.

use crate::seed::{Key, Seed};
use std::collections::BTreeSet;

/// Who is calling, as far as the data filters are concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Who {
    /// Administrator: bypasses both filters.
    Admin,
    Patient(Key),
    Practitioner(Key),
    RelatedPerson(Key),
    /// A Reader with neither fhirUser nor a link: no patient data at all.
    Nobody,
}

/// Elements that put a resource in the compartment of the Patient they reference (R4 Patient
/// CompartmentDefinition, for the types this suite seeds; element names as in `Res::links`).
fn compartment_paths(ty: &str) -> &'static [&'static str] {
    match ty {
        "Observation" => &["subject", "performer"],
        "Encounter" => &["subject"],
        "Condition" => &["subject", "asserter"],
        "Procedure" => &["subject", "performer"],
        "CareTeam" => &["subject", "member"],
        "Provenance" => &["target"],
        "RelatedPerson" => &["patient"],
        "Consent" => &["patient"],
        _ => &[],
    }
}

pub fn ty(key: &str) -> &str {
    key.split('/').next().unwrap()
}

/// The patients whose compartment holds `key` (empty: not patient data).
pub fn owners(seed: &Seed, key: &str) -> BTreeSet<Key> {
    if ty(key) == "Patient" {
        return BTreeSet::from([key.to_string()]);
    }
    let paths = compartment_paths(ty(key));
    seed.res[key]
        .links
        .iter()
        .filter(|(p, t)| paths.contains(p) && ty(t) == "Patient")
        .map(|(_, t)| t.clone())
        .collect()
}

pub const ALL_RELATIONS: &[&str] = &[
    "general_practitioner",
    "encounter_participant",
    "care_team_member",
];

/// Patients a practitioner is of record for, through the configured relations: general
/// practitioner, participant of one of the patient's Encounters, member of one of the
/// patient's CareTeams.
pub fn of_record(seed: &Seed, practitioner: &str, relations: &[&str]) -> BTreeSet<Key> {
    let mut out = BTreeSet::new();
    if relations.contains(&"general_practitioner") {
        out.extend(seed.with_link("Patient", "gp", practitioner));
    }
    for (rel, ty, path) in [
        ("encounter_participant", "Encounter", "participant"),
        ("care_team_member", "CareTeam", "member"),
    ] {
        if relations.contains(&rel) {
            for k in seed.with_link(ty, path, practitioner) {
                out.extend(seed.linked(&k, "subject"));
            }
        }
    }
    out
}

/// What a caller is, for Consent actors: the Practitioner, its PractitionerRoles and their
/// Organizations; the RelatedPerson.
fn associations(seed: &Seed, who: &Who) -> BTreeSet<Key> {
    match who {
        Who::Practitioner(p) => {
            let mut out = BTreeSet::from([p.clone()]);
            for role in seed.with_link("PractitionerRole", "practitioner", p) {
                out.extend(seed.linked(&role, "organization"));
                out.insert(role);
            }
            out
        }
        Who::RelatedPerson(r) => BTreeSet::from([r.clone()]),
        Who::Patient(p) => BTreeSet::from([p.clone()]),
        _ => BTreeSet::new(),
    }
}

/// Today as `YYYY-MM-DD` (UTC).
pub fn today() -> String {
    let days = (crate::harness::now_secs() / 86_400) as i64;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}")
}

/// Does an in-force opt-out of `patient` deny this caller?
pub fn consent_denies(seed: &Seed, who: &Who, patient: &str) -> bool {
    if *who == Who::Admin {
        return false;
    }
    let now = today();
    let assoc = associations(seed, who);
    seed.consents.iter().any(|c| {
        let in_force = c.active
            && c.opt_out_category
            && c.deny
            && c.patient == patient
            && c.start.as_deref().is_none_or(|s| s <= now.as_str())
            && c.end.as_deref().is_none_or(|e| e >= now.as_str());
        if !in_force {
            return false;
        }
        if c.actors.is_empty() {
            *who != Who::Patient(patient.to_string())
        } else {
            c.actors.iter().any(|a| assoc.contains(a))
        }
    })
}

/// Patients whose data the caller may see (None: everything).
pub fn allowed_patients(seed: &Seed, who: &Who, relations: &[&str]) -> Option<BTreeSet<Key>> {
    let candidates: BTreeSet<Key> = match who {
        Who::Admin => return None,
        Who::Patient(p) => BTreeSet::from([p.clone()]),
        Who::Practitioner(p) => of_record(seed, p, relations),
        Who::RelatedPerson(r) => seed.linked(r, "patient").into_iter().collect(),
        Who::Nobody => BTreeSet::new(),
    };
    Some(
        candidates
            .into_iter()
            .filter(|p| !consent_denies(seed, who, p))
            .collect(),
    )
}

pub struct Oracle<'a> {
    pub seed: &'a Seed,
    allowed: Option<BTreeSet<Key>>,
}

impl<'a> Oracle<'a> {
    pub fn with_relations(seed: &'a Seed, who: Who, relations: &[&str]) -> Oracle<'a> {
        let allowed = allowed_patients(seed, &who, relations);
        Oracle { seed, allowed }
    }

    /// May the caller see this seeded resource? Non-patient data: yes; patient data: iff the
    /// caller may see at least one of the patients whose compartment holds it.
    pub fn visible(&self, key: &str) -> bool {
        let Some(allowed) = &self.allowed else {
            return true;
        };
        let owners = owners(self.seed, key);
        owners.is_empty() || owners.iter().any(|p| allowed.contains(p))
    }

    pub fn allowed(&self) -> Option<&BTreeSet<Key>> {
        self.allowed.as_ref()
    }
}
