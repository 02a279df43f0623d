//! The R4 Patient CompartmentDefinition as data: which resource types belong to a patient's
//! compartment, through which search parameters, and through which element paths (the
//! parameters' FHIRPath expressions). Membership is decided on parsed, typed references.

use crate::reference::{Resolver, Target};
use serde_json::Value;
use std::collections::BTreeSet;
/// (resource type, search parameters linking it to the patient), from the R4
/// CompartmentDefinition `patient`.
pub const PATIENT_COMPARTMENT: &[(&str, &[&str])] = &[
    ("Account", &["subject"]),
    ("AdverseEvent", &["subject"]),
    ("AllergyIntolerance", &["patient", "recorder", "asserter"]),
    ("Appointment", &["actor"]),
    ("AppointmentResponse", &["actor"]),
    ("AuditEvent", &["patient"]),
    ("Basic", &["patient", "author"]),
    ("BodyStructure", &["patient"]),
    ("CarePlan", &["patient", "performer"]),
    ("CareTeam", &["patient", "participant"]),
    ("ChargeItem", &["subject"]),
    ("Claim", &["patient", "payee"]),
    ("ClaimResponse", &["patient"]),
    ("ClinicalImpression", &["subject"]),
    ("Communication", &["subject", "sender", "recipient"]),
    (
        "CommunicationRequest",
        &["subject", "sender", "recipient", "requester"],
    ),
    ("Composition", &["subject", "author", "attester"]),
    ("Condition", &["patient", "asserter"]),
    ("Consent", &["patient"]),
    (
        "Coverage",
        &["policy-holder", "subscriber", "beneficiary", "payor"],
    ),
    ("CoverageEligibilityRequest", &["patient"]),
    ("CoverageEligibilityResponse", &["patient"]),
    ("DetectedIssue", &["patient"]),
    ("DeviceRequest", &["subject", "performer"]),
    ("DeviceUseStatement", &["subject"]),
    ("DiagnosticReport", &["subject"]),
    ("DocumentManifest", &["subject", "author", "recipient"]),
    ("DocumentReference", &["subject", "author"]),
    ("Encounter", &["patient"]),
    ("EnrollmentRequest", &["subject"]),
    ("EpisodeOfCare", &["patient"]),
    ("ExplanationOfBenefit", &["patient", "payee"]),
    ("FamilyMemberHistory", &["patient"]),
    ("Flag", &["patient"]),
    ("Goal", &["patient"]),
    ("Group", &["member"]),
    ("ImagingStudy", &["patient"]),
    ("Immunization", &["patient"]),
    ("ImmunizationEvaluation", &["patient"]),
    ("ImmunizationRecommendation", &["patient"]),
    ("Invoice", &["subject", "patient", "recipient"]),
    ("List", &["subject", "source"]),
    ("MeasureReport", &["patient"]),
    ("Media", &["subject"]),
    (
        "MedicationAdministration",
        &["patient", "performer", "subject"],
    ),
    ("MedicationDispense", &["subject", "patient", "receiver"]),
    ("MedicationRequest", &["subject"]),
    ("MedicationStatement", &["subject"]),
    ("MolecularSequence", &["patient"]),
    ("NutritionOrder", &["patient"]),
    ("Observation", &["subject", "performer"]),
    ("Patient", &["link"]),
    ("Person", &["patient"]),
    ("Procedure", &["patient", "performer"]),
    ("Provenance", &["patient"]),
    ("QuestionnaireResponse", &["subject", "author"]),
    ("RelatedPerson", &["patient"]),
    ("RequestGroup", &["subject", "participant"]),
    ("ResearchSubject", &["individual"]),
    ("RiskAssessment", &["subject"]),
    ("Schedule", &["actor"]),
    ("ServiceRequest", &["subject", "performer"]),
    ("Specimen", &["subject"]),
    ("SupplyDelivery", &["patient"]),
    ("SupplyRequest", &["requester"]),
    ("VisionPrescription", &["patient"]),
];

/// Every type of the Patient compartment (what `Patient/{id}/$everything` may return).
pub fn patient_compartment_types() -> impl Iterator<Item = &'static str> {
    PATIENT_COMPARTMENT.iter().map(|(t, _)| *t)
}

/// The search parameters linking `resource_type` to a patient, if it is in the compartment.
pub fn patient_params(resource_type: &str) -> Option<&'static [&'static str]> {
    PATIENT_COMPARTMENT
        .iter()
        .find(|(t, _)| *t == resource_type)
        .map(|(_, p)| *p)
}

/// (resource type, element paths whose references can name the patient): the expressions of
/// the parameters above, every one of them (`Observation.performer`, `Provenance.target`,
/// `Procedure.performer.actor`…), not only `subject`/`patient`.
pub const PATIENT_COMPARTMENT_PATHS: &[(&str, &[&str])] = &[
    ("Account", &["subject"]),
    ("AdverseEvent", &["subject"]),
    ("AllergyIntolerance", &["patient", "recorder", "asserter"]),
    ("Appointment", &["participant.actor"]),
    ("AppointmentResponse", &["actor"]),
    ("AuditEvent", &["agent.who", "entity.what"]),
    ("Basic", &["subject", "author"]),
    ("BodyStructure", &["patient"]),
    ("CarePlan", &["subject", "activity.detail.performer"]),
    ("CareTeam", &["subject", "participant.member"]),
    ("ChargeItem", &["subject"]),
    ("Claim", &["patient", "payee.party"]),
    ("ClaimResponse", &["patient"]),
    ("ClinicalImpression", &["subject"]),
    ("Communication", &["subject", "sender", "recipient"]),
    (
        "CommunicationRequest",
        &["subject", "sender", "recipient", "requester"],
    ),
    ("Composition", &["subject", "author", "attester.party"]),
    ("Condition", &["subject", "asserter"]),
    ("Consent", &["patient"]),
    (
        "Coverage",
        &["policyHolder", "subscriber", "beneficiary", "payor"],
    ),
    ("CoverageEligibilityRequest", &["patient"]),
    ("CoverageEligibilityResponse", &["patient"]),
    ("DetectedIssue", &["patient"]),
    ("DeviceRequest", &["subject", "performer"]),
    ("DeviceUseStatement", &["subject"]),
    ("DiagnosticReport", &["subject"]),
    ("DocumentManifest", &["subject", "author", "recipient"]),
    ("DocumentReference", &["subject", "author"]),
    ("Encounter", &["subject"]),
    ("EnrollmentRequest", &["candidate"]),
    ("EpisodeOfCare", &["patient"]),
    ("ExplanationOfBenefit", &["patient", "payee.party"]),
    ("FamilyMemberHistory", &["patient"]),
    ("Flag", &["subject"]),
    ("Goal", &["subject"]),
    ("Group", &["member.entity"]),
    ("ImagingStudy", &["subject"]),
    ("Immunization", &["patient"]),
    ("ImmunizationEvaluation", &["patient"]),
    ("ImmunizationRecommendation", &["patient"]),
    ("Invoice", &["subject", "recipient"]),
    ("List", &["subject", "source"]),
    ("MeasureReport", &["subject"]),
    ("Media", &["subject"]),
    ("MedicationAdministration", &["subject", "performer.actor"]),
    ("MedicationDispense", &["subject", "receiver"]),
    ("MedicationRequest", &["subject"]),
    ("MedicationStatement", &["subject"]),
    ("MolecularSequence", &["patient"]),
    ("NutritionOrder", &["patient"]),
    ("Observation", &["subject", "performer"]),
    ("Patient", &["link.other"]),
    ("Person", &["link.target"]),
    ("Procedure", &["subject", "performer.actor"]),
    ("Provenance", &["target"]),
    ("QuestionnaireResponse", &["subject", "author"]),
    ("RelatedPerson", &["patient"]),
    ("RequestGroup", &["subject", "action.participant"]),
    ("ResearchSubject", &["individual"]),
    ("RiskAssessment", &["subject"]),
    ("Schedule", &["actor"]),
    ("ServiceRequest", &["subject", "performer"]),
    ("Specimen", &["subject"]),
    ("SupplyDelivery", &["patient"]),
    ("SupplyRequest", &["deliverTo"]),
    ("VisionPrescription", &["patient"]),
];

/// Whether `name`, a resource's top-level element, is one that decides whose data the
/// resource is: its type and id, `meta` (a SUBSETTED tag), `contained` (contained
/// references) and the first step of every patient-compartment path of any type. A filter
/// that reads only these (`BodyAccess::Compartment`) may be handed resources cut down to them.
pub fn decides_owner(name: &str) -> bool {
    static FIELDS: std::sync::LazyLock<std::collections::HashSet<&'static str>> =
        std::sync::LazyLock::new(|| {
            let mut f: std::collections::HashSet<&'static str> =
                ["resourceType", "id", "meta", "contained"].into();
            for (_, paths) in PATIENT_COMPARTMENT_PATHS {
                f.extend(paths.iter().filter_map(|p| p.split('.').next()));
            }
            f
        });
    FIELDS.contains(name)
}

/// The element paths linking `resource_type` to a patient.
pub fn patient_paths(resource_type: &str) -> Option<&'static [&'static str]> {
    PATIENT_COMPARTMENT_PATHS
        .iter()
        .find(|(t, _)| *t == resource_type)
        .map(|(_, p)| *p)
}

/// Whether resources of `resource_type` can be in a patient's compartment.
pub fn in_compartment(resource_type: &str) -> bool {
    resource_type == "Patient" || patient_paths(resource_type).is_some()
}

/// Whose data a resource is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owners {
    /// Ids of the patients whose compartment holds the resource.
    pub patients: BTreeSet<String>,
    /// A compartment path holds a reference that may name a patient but cannot be resolved
    /// (another server, a contained or logical reference): nobody but a bypass role may see it.
    pub unknown: bool,
}

impl Owners {
    /// Patient data: in some patient's compartment (or possibly so).
    pub fn is_patient_data(&self) -> bool {
        self.unknown || !self.patients.is_empty()
    }
}

/// The values at a dotted element path (arrays flattened at every step).
pub fn values_at<'a>(v: &'a Value, path: &str) -> Vec<&'a Value> {
    let segs: Vec<&str> = path.split('.').collect();
    let mut out = Vec::new();
    collect_at(v, &segs, &mut out);
    out
}

fn collect_at<'a>(v: &'a Value, segs: &[&str], out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| collect_at(i, segs, out)),
        _ if segs.is_empty() => out.push(v),
        Value::Object(o) => {
            if let Some(next) = o.get(segs[0]) {
                collect_at(next, &segs[1..], out);
            }
        }
        _ => {}
    }
}

/// The patients whose compartment holds `resource` (per the CompartmentDefinition, every path).
pub fn owners(resource: &Value, resolver: &Resolver) -> Owners {
    let mut o = Owners::default();
    let Some(rtype) = resource.get("resourceType").and_then(Value::as_str) else {
        return o;
    };
    if rtype == "Patient" {
        match resource.get("id").and_then(Value::as_str) {
            Some(id) if crate::identity::valid_id(id) => {
                o.patients.insert(id.to_string());
            }
            _ => o.unknown = true,
        }
    }
    let Some(paths) = patient_paths(rtype) else {
        return o;
    };
    let mut refs = Vec::new();
    for p in paths {
        let segs: Vec<&str> = p.split('.').collect();
        collect_at(resource, &segs, &mut refs);
    }
    for r in refs {
        let Some(obj) = r.as_object() else { continue };
        let declared = obj.get("type").and_then(Value::as_str);
        match obj.get("reference").and_then(Value::as_str) {
            Some(text) => match resolver.parse(text) {
                Target::Local(r) if r.is("Patient") => {
                    o.patients.insert(r.id);
                }
                Target::Local(_) => {}
                Target::Contained(id) => {
                    let ty = resource
                        .get("contained")
                        .and_then(Value::as_array)
                        .and_then(|c| {
                            c.iter()
                                .find(|x| x.get("id").and_then(Value::as_str) == Some(&id))
                        })
                        .and_then(|x| x.get("resourceType"))
                        .and_then(Value::as_str);
                    if ty.is_none_or(|t| t == "Patient") {
                        o.unknown = true;
                    }
                }
                Target::Other(Some(t)) if t != "Patient" => {}
                Target::Other(_) | Target::Urn(_) => o.unknown = true,
            },
            // A logical reference (identifier only) that may be a patient.
            None if obj.contains_key("identifier") && declared.is_none_or(|t| t == "Patient") => {
                o.unknown = true;
            }
            None => {}
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compartment_lookup() {
        assert_eq!(
            patient_params("Observation"),
            Some(&["subject", "performer"][..])
        );
        assert_eq!(patient_params("Provenance"), Some(&["patient"][..]));
        assert_eq!(patient_params("Organization"), None);
        assert_eq!(patient_compartment_types().count(), 66);
        let mut sorted: Vec<_> = patient_compartment_types().collect();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 66, "no duplicates");
    }

    #[test]
    fn every_compartment_type_has_paths() {
        for t in patient_compartment_types() {
            assert!(patient_paths(t).is_some(), "{t}");
        }
        assert_eq!(PATIENT_COMPARTMENT_PATHS.len(), PATIENT_COMPARTMENT.len());
    }

    /// A resource cut down to `decides_owner`'s elements has the same owners as the whole one,
    /// for every type and path (and contained and subsetted cases).
    #[test]
    fn a_resource_cut_to_the_owner_elements_has_the_same_owners() {
        let cut = |v: &Value| {
            let mut c = v.clone();
            c.as_object_mut().unwrap().retain(|k, _| decides_owner(k));
            c
        };
        for (t, paths) in PATIENT_COMPARTMENT_PATHS {
            for (i, p) in paths.iter().enumerate() {
                let mut v = serde_json::json!({"resourceType": t, "id": format!("r{i}"),
                    "text": {"div": "<div>Patient/zz</div>"}, "note": [{"text": "x"}]});
                let mut at = &mut v;
                for seg in p.split('.') {
                    at = &mut at[seg];
                }
                *at = serde_json::json!({"reference": format!("Patient/p-{t}-{i}")});
                let whole = owners_of(v.clone());
                assert!(whole.patients.contains(&format!("p-{t}-{i}")), "{t}.{p}");
                assert_eq!(owners_of(cut(&v)), whole, "{t}.{p}");
                assert!(cut(&v).get("text").is_none());
            }
        }
        let contained = serde_json::json!({"resourceType": "Observation", "id": "o",
            "contained": [{"resourceType": "Patient", "id": "c"}],
            "subject": {"reference": "#c"}, "valueString": "x"});
        assert!(owners_of(contained.clone()).unknown);
        assert_eq!(owners_of(cut(&contained)), owners_of(contained));
        assert!(decides_owner("meta"), "a SUBSETTED tag is read from meta");
    }

    fn owners_of(v: serde_json::Value) -> Owners {
        owners(&v, &Resolver::new(&["https://gw/fhir", "http://up/fhir"]))
    }

    fn ids(o: &Owners) -> Vec<&str> {
        o.patients.iter().map(String::as_str).collect()
    }

    #[test]
    fn every_path_counts() {
        let o = owners_of(serde_json::json!({"resourceType": "Observation",
            "subject": {"reference": "Patient/B"},
            "performer": [{"reference": "http://up/fhir/Patient/A/_history/3"},
                          {"reference": "Practitioner/P"}]}));
        assert_eq!(ids(&o), ["A", "B"]);
        assert!(!o.unknown);
        let o = owners_of(serde_json::json!({"resourceType": "Provenance",
            "target": [{"reference": "Observation/1"}, {"reference": "Patient/12"}]}));
        assert_eq!(ids(&o), ["12"]);
        let o = owners_of(serde_json::json!({"resourceType": "Procedure",
            "subject": {"reference": "Group/g"},
            "performer": [{"actor": {"reference": "Patient/123"}}]}));
        assert_eq!(ids(&o), ["123"]);
        let o = owners_of(serde_json::json!({"resourceType": "CareTeam",
            "participant": [{"member": {"reference": "Patient/7"}}]}));
        assert_eq!(ids(&o), ["7"]);
        let o = owners_of(serde_json::json!({"resourceType": "Patient", "id": "9",
            "link": [{"other": {"reference": "Patient/10"}}]}));
        assert_eq!(ids(&o), ["10", "9"]);
    }

    #[test]
    fn non_patient_data_and_unresolvable_references() {
        assert!(
            !owners_of(serde_json::json!({"resourceType": "Organization", "id": "o"}))
                .is_patient_data()
        );
        let o = owners_of(serde_json::json!({"resourceType": "Observation",
            "subject": {"reference": "Device/d"}}));
        assert!(!o.is_patient_data());
        for r in [
            serde_json::json!({"reference": "https://elsewhere/fhir/Patient/1"}),
            serde_json::json!({"reference": "#p"}),
            serde_json::json!({"reference": "urn:uuid:unknown"}),
            serde_json::json!({"reference": "Patient?identifier=x|1"}),
            serde_json::json!({"identifier": {"system": "mrn", "value": "1"}}),
            serde_json::json!({"type": "Patient", "identifier": {"value": "1"}}),
        ] {
            let o = owners_of(serde_json::json!({"resourceType": "Observation",
                "subject": r, "contained": [{"resourceType": "Patient", "id": "p"}]}));
            assert!(o.unknown, "{o:?}");
        }
        let o = owners_of(serde_json::json!({"resourceType": "Observation",
            "subject": {"reference": "#d"}, "contained": [{"resourceType": "Device", "id": "d"}]}));
        assert!(!o.is_patient_data());
    }
}
