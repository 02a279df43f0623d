//! SMART v2 granular scopes: the query of `patient/Observation.rs?category=laboratory`, and
//! whether a resource matches it.
//!
//! Only what the gateway can evaluate exactly, on the resource alone, is supported: token
//! parameters whose element has the parameter's name on that type (`category`, `code`,
//! `status`, ... — the `TOKENS` table), in the forms `code`, `system|code`, `|code` and
//! `system|`, a comma meaning OR and several parameters AND. Anything else (another parameter,
//! a modifier, an escape, a wildcard type, a system on a plain `code` element) makes the query
//! `Unsupported`, and such a scope grants nothing: evaluating it approximately would widen
//! access.

use crate::compartment::values_at;
use serde_json::Value;

/// What a token parameter's element is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// CodeableConcept (or an array of them): any of its codings.
    Concept,
    /// Coding (or an array).
    Coding,
    /// The primitive `code` (or an array): its system is implied, so only `code` is exact.
    Code,
}

use Kind::*;

/// (type, parameter = element, kind): R4 search parameters whose expression is `Type.param`.
const TOKENS: &[(&str, &[(&str, Kind)])] = &[
    (
        "AllergyIntolerance",
        &[("category", Code), ("type", Code), ("criticality", Code)],
    ),
    (
        "CarePlan",
        &[("category", Concept), ("status", Code), ("intent", Code)],
    ),
    ("CareTeam", &[("category", Concept), ("status", Code)]),
    (
        "Composition",
        &[("category", Concept), ("type", Concept), ("status", Code)],
    ),
    (
        "Condition",
        &[
            ("category", Concept),
            ("code", Concept),
            ("severity", Concept),
        ],
    ),
    ("Consent", &[("category", Concept), ("status", Code)]),
    ("Coverage", &[("type", Concept), ("status", Code)]),
    (
        "DiagnosticReport",
        &[("category", Concept), ("code", Concept), ("status", Code)],
    ),
    (
        "DocumentReference",
        &[("category", Concept), ("type", Concept), ("status", Code)],
    ),
    (
        "Encounter",
        &[("class", Coding), ("type", Concept), ("status", Code)],
    ),
    ("EpisodeOfCare", &[("type", Concept), ("status", Code)]),
    ("Goal", &[("category", Concept)]),
    ("Immunization", &[("status", Code)]),
    ("MedicationAdministration", &[("status", Code)]),
    ("MedicationDispense", &[("type", Concept), ("status", Code)]),
    (
        "MedicationRequest",
        &[
            ("category", Concept),
            ("status", Code),
            ("intent", Code),
            ("priority", Code),
        ],
    ),
    (
        "MedicationStatement",
        &[("category", Concept), ("status", Code)],
    ),
    (
        "Observation",
        &[("category", Concept), ("code", Concept), ("status", Code)],
    ),
    ("Patient", &[("gender", Code)]),
    (
        "Procedure",
        &[("category", Concept), ("code", Concept), ("status", Code)],
    ),
    ("QuestionnaireResponse", &[("status", Code)]),
    (
        "ServiceRequest",
        &[
            ("category", Concept),
            ("code", Concept),
            ("status", Code),
            ("intent", Code),
            ("priority", Code),
        ],
    ),
    ("Specimen", &[("type", Concept), ("status", Code)]),
];

fn kind_of(rtype: &str, param: &str) -> Option<Kind> {
    TOKENS
        .iter()
        .find(|(t, _)| *t == rtype)?
        .1
        .iter()
        .find(|(p, _)| *p == param)
        .map(|(_, k)| *k)
}

/// The system part of a token.
#[derive(Clone, Debug, PartialEq, Eq)]
enum System {
    /// `code`: any system.
    Any,
    /// `|code`: no system.
    Absent,
    /// `system|...`.
    Is(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Token {
    system: System,
    /// `None` for `system|` (any code of the system).
    code: Option<String>,
}

/// One parameter of a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    element: String,
    kind: Kind,
    /// OR'ed.
    any_of: Vec<Token>,
}

/// A scope's query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScopeQuery {
    /// Every parameter must match (AND), each by one of its values (OR).
    Tokens(Vec<Param>),
    /// Not evaluated exactly by the gateway (the reason): the scope grants nothing.
    Unsupported(String),
}

impl ScopeQuery {
    /// Parses the query of a scope on `rtype` (`None`: a wildcard type).
    pub fn parse(rtype: Option<&str>, q: &str) -> ScopeQuery {
        match parse(rtype, q) {
            Ok(p) => ScopeQuery::Tokens(p),
            Err(why) => ScopeQuery::Unsupported(why),
        }
    }

    pub fn is_supported(&self) -> bool {
        matches!(self, ScopeQuery::Tokens(_))
    }

    /// Whether `resource` is one the query selects (an unsupported query selects nothing).
    pub fn matches(&self, resource: &Value) -> bool {
        let ScopeQuery::Tokens(params) = self else {
            return false;
        };
        params.iter().all(|p| {
            values_at(resource, &p.element)
                .into_iter()
                .any(|v| p.any_of.iter().any(|t| token_matches(p.kind, t, v)))
        })
    }
}

fn token_matches(kind: Kind, t: &Token, v: &Value) -> bool {
    let coding = |c: &Value| {
        let code_ok = t
            .code
            .as_deref()
            .is_none_or(|want| c.get("code").and_then(Value::as_str) == Some(want));
        let system = c.get("system").and_then(Value::as_str);
        let system_ok = match &t.system {
            System::Any => true,
            System::Absent => system.is_none(),
            System::Is(s) => system == Some(s.as_str()),
        };
        code_ok && system_ok
    };
    match kind {
        Code => t.code.is_some() && v.as_str() == t.code.as_deref(),
        Coding => v.is_object() && coding(v),
        Concept => v
            .get("coding")
            .and_then(Value::as_array)
            .is_some_and(|cs| cs.iter().any(coding)),
    }
}

fn parse(rtype: Option<&str>, q: &str) -> Result<Vec<Param>, String> {
    let Some(rtype) = rtype else {
        return Err("a query on a wildcard type is not evaluated".into());
    };
    let mut params = Vec::new();
    for pair in q.split('&') {
        let (name, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("{pair:?} has no value"))?;
        let name = decode(name)?;
        let value = decode(value)?;
        let kind = kind_of(rtype, &name).ok_or_else(|| {
            format!("{rtype}?{name}: only token parameters naming their element are evaluated")
        })?;
        if value.is_empty() || value.contains('\\') || value.contains('$') {
            return Err(format!(
                "{name}={value:?}: empty or escaped values are not evaluated"
            ));
        }
        let mut any_of = Vec::new();
        for v in value.split(',') {
            let token = match v.split_once('|') {
                None => Token {
                    system: System::Any,
                    code: Some(v.to_string()),
                },
                Some((s, c)) if c.contains('|') || (s.is_empty() && c.is_empty()) => {
                    return Err(format!("{name}={v:?} is not a token"))
                }
                Some((s, c)) => Token {
                    system: if s.is_empty() {
                        System::Absent
                    } else {
                        System::Is(s.to_string())
                    },
                    code: (!c.is_empty()).then(|| c.to_string()),
                },
            };
            if token.code.as_deref() == Some("") {
                return Err(format!("{name}: an empty code"));
            }
            if kind == Code && token.system != System::Any {
                return Err(format!(
                    "{rtype}.{name} is a code: its system is implied, so {v:?} is not evaluated"
                ));
            }
            any_of.push(token);
        }
        params.push(Param {
            element: name,
            kind,
            any_of,
        });
    }
    Ok(params)
}

/// Percent-decoding (no `+`): what a server would do with the scope's query.
fn decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("{s:?}: a bad percent escape"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CAT: &str = "http://terminology.hl7.org/CodeSystem/observation-category";

    fn obs(system: Option<&str>, code: &str) -> Value {
        let mut coding = json!({"code": code});
        if let Some(s) = system {
            coding["system"] = json!(s);
        }
        json!({"resourceType": "Observation", "status": "final",
               "category": [{"coding": [{"system": "urn:other", "code": "x"}, coding]}]})
    }

    fn q(type_: &str, s: &str) -> ScopeQuery {
        ScopeQuery::parse(Some(type_), s)
    }

    #[test]
    fn token_forms() {
        let lab = obs(Some(CAT), "laboratory");
        let bare = obs(None, "laboratory");
        assert!(q("Observation", "category=laboratory").matches(&lab));
        assert!(q("Observation", "category=laboratory").matches(&bare));
        assert!(!q("Observation", "category=vital-signs").matches(&lab));
        let full = format!("category={CAT}|laboratory");
        assert!(q("Observation", &full).matches(&lab));
        assert!(!q("Observation", &full).matches(&bare));
        assert!(q("Observation", "category=|laboratory").matches(&bare));
        assert!(!q("Observation", "category=|laboratory").matches(&lab));
        let sys = format!("category={CAT}|");
        assert!(q("Observation", &sys).matches(&lab));
        assert!(!q("Observation", &sys).matches(&bare));
        // Percent-encoded, as in a scope claim.
        let enc = "category=http%3A%2F%2Fterminology.hl7.org%2FCodeSystem%2Fobservation-category%7Claboratory";
        assert!(q("Observation", enc).matches(&lab));
    }

    #[test]
    fn comma_is_or_and_ampersand_is_and() {
        let lab = obs(Some(CAT), "laboratory");
        assert!(q("Observation", "category=vital-signs,laboratory").matches(&lab));
        assert!(q("Observation", "category=laboratory&status=final").matches(&lab));
        assert!(!q("Observation", "category=laboratory&status=amended").matches(&lab));
        assert!(q("Observation", "status=final,amended").matches(&lab));
        // No element, no match.
        let none = json!({"resourceType": "Observation"});
        assert!(!q("Observation", "category=laboratory").matches(&none));
    }

    #[test]
    fn coding_and_code_elements() {
        let enc = json!({"resourceType": "Encounter", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"}});
        assert!(q("Encounter", "class=AMB").matches(&enc));
        assert!(!q("Encounter", "class=IMP").matches(&enc));
        assert!(q("Encounter", "status=finished").matches(&enc));
        let allergy =
            json!({"resourceType": "AllergyIntolerance", "category": ["food", "medication"]});
        assert!(q("AllergyIntolerance", "category=medication").matches(&allergy));
        assert!(!q("AllergyIntolerance", "category=biologic").matches(&allergy));
    }

    #[test]
    fn what_cannot_be_evaluated_exactly_is_unsupported() {
        for (t, s) in [
            ("Observation", "patient=123"),
            ("Observation", "category:not=laboratory"),
            ("Observation", "code:below=123"),
            ("Observation", "_tag=x"),
            ("Observation", "date=gt2020"),
            ("Observation", "category="),
            ("Observation", "category"),
            ("Observation", "category=a\\,b"),
            ("Observation", "category=|"),
            ("Observation", "category=a|b|c"),
            (
                "Observation",
                "status=http://hl7.org/fhir/observation-status|final",
            ),
            ("Observation", "category=%zz"),
            ("Organization", "type=prov"),
            ("Observation", "clinical-status=active"),
        ] {
            let parsed = q(t, s);
            assert!(!parsed.is_supported(), "{t}?{s}");
            assert!(!parsed.matches(&obs(Some(CAT), "laboratory")), "{t}?{s}");
        }
        assert!(!ScopeQuery::parse(None, "category=laboratory").is_supported());
    }
}
