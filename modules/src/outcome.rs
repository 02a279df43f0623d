//! FHIR R4 OperationOutcome: the one error body every part of the gateway renders.

use serde_json::{json, Value};

/// `OperationOutcome.issue.severity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// One `OperationOutcome.issue`. `code` is a value of the FHIR `issue-type` value set
/// (`login`, `forbidden`, `not-found`, `transient`, `timeout`, `too-costly`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    pub code: &'static str,
    pub diagnostics: String,
}

/// Builds the JSON of an OperationOutcome. serde_json does the escaping, so diagnostics may
/// carry any text (quotes, control characters) without breaking the body.
pub fn operation_outcome(issues: &[Issue]) -> Value {
    let issues: Vec<Value> = issues
        .iter()
        .map(|i| {
            json!({
                "severity": i.severity.as_str(),
                "code": i.code,
                "diagnostics": i.diagnostics,
            })
        })
        .collect();
    json!({ "resourceType": "OperationOutcome", "issue": issues })
}

/// A single-issue OperationOutcome serialised to bytes.
pub fn outcome_bytes(severity: Severity, code: &'static str, diagnostics: &str) -> Vec<u8> {
    let v = operation_outcome(&[Issue {
        severity,
        code,
        diagnostics: diagnostics.to_string(),
    }]);
    serde_json::to_vec(&v).expect("a JSON value always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_issue_fields() {
        let v: Value = serde_json::from_slice(&outcome_bytes(
            Severity::Error,
            "not-found",
            "no route for /x",
        ))
        .unwrap();
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(v["issue"][0]["severity"], "error");
        assert_eq!(v["issue"][0]["code"], "not-found");
        assert_eq!(v["issue"][0]["diagnostics"], "no route for /x");
    }

    #[test]
    fn escapes_hostile_diagnostics() {
        let evil = "a\"b\\c\n</x>\u{0}";
        let bytes = outcome_bytes(Severity::Fatal, "exception", evil);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["issue"][0]["diagnostics"], evil);
        assert!(!bytes.contains(&b'\n'));
    }
}
