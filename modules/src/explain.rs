//! Explaining mode (`/manage/explain`): a filter says, resource by resource, why it keeps or
//! withholds what it judges, in its own terms (the relation, the Consent, the scope). Only the
//! explain endpoint asks (`PostProcess::explain`); the normal path never computes a reason.

use crate::filter::resources;
use serde_json::{json, Value};

/// One module's decision on one resource of the answer it received.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// `Type/id`.
    pub resource: String,
    pub kept: bool,
    /// What decided, in a word or two: `general_practitioner`, `encounter_participant`,
    /// `care_team_member`, `self`, `related_person`, `none`, `not_patient_data`, `bypass`,
    /// `consent`, `scope`, ...
    pub relation: String,
    /// The module's particulars (the patient, the Consent id and provision, the scope).
    pub detail: Value,
}

impl Verdict {
    pub fn new(resource: String, kept: bool, relation: &str, detail: Value) -> Verdict {
        Verdict {
            resource,
            kept,
            relation: relation.to_string(),
            detail,
        }
    }

    pub fn to_json(&self, module: &str) -> Value {
        json!({"module": module, "kept": self.kept, "relation": self.relation,
               "detail": self.detail})
    }
}

/// `Type/id` of a resource (`Type/?` without an id).
pub fn reference(r: &Value) -> String {
    format!(
        "{}/{}",
        r.get("resourceType").and_then(Value::as_str).unwrap_or("?"),
        r.get("id").and_then(Value::as_str).unwrap_or("?")
    )
}

/// The resources of an answer a filter judges (as `filter::resources` finds them), by
/// reference, without the OperationOutcome notices a filter adds or a server sends.
pub fn references(body: &Value) -> Vec<String> {
    let mut all = Vec::new();
    resources(body, &mut all);
    all.into_iter()
        .filter(|r| r.get("resourceType").and_then(Value::as_str) != Some("OperationOutcome"))
        .map(reference)
        .collect()
}

/// A verdict per resource of `body`, from `judge`.
pub fn each(body: &Value, mut judge: impl FnMut(&Value) -> Verdict) -> Vec<Verdict> {
    let mut all = Vec::new();
    resources(body, &mut all);
    all.into_iter()
        .filter(|r| r.get("resourceType").and_then(Value::as_str) != Some("OperationOutcome"))
        .map(&mut judge)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_skip_notices_and_enter_nested_bundles() {
        let b = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"resource": {"resourceType": "Observation", "id": "1"}},
            {"resource": {"resourceType": "Bundle", "type": "searchset", "entry": [
                {"resource": {"resourceType": "Patient", "id": "p"}},
                {"resource": {"resourceType": "OperationOutcome"}}]}}]});
        assert_eq!(references(&b), ["Observation/1", "Patient/p"]);
        assert_eq!(
            references(&json!({"resourceType": "Observation", "id": "x"})),
            ["Observation/x"]
        );
        let v = each(&b, |r| {
            Verdict::new(reference(r), true, "none", Value::Null)
        });
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].to_json("M")["module"], "M");
    }
}
