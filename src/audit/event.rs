//! A request as the worker thread hands it over (`Record`, cheap to make), and the AuditEvent
//! the writer thread builds from it, in the shape of IHE Basic Audit Log Patterns (BALP): who
//! (user, tenant, client, roles, source address), what (interaction, type, query without any
//! token), the outcome, one `entity` per patient whose data the answer held after filtering,
//! and the correlation id.

use bytes::Bytes;
use fhir_gateway_modules::compartment::owners;
use fhir_gateway_modules::filter::resources;
use fhir_gateway_modules::reference::Resolver;
use fhir_gateway_modules::request::{classify, Interaction};
use fhir_gateway_modules::{Identity, Role};
use serde_json::{json, Value};
use std::collections::BTreeSet;

pub const ENTITY_TYPE: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
pub const OBJECT_ROLE: &str = "http://terminology.hl7.org/CodeSystem/object-role";
pub const REQUEST_ID: &str = "urn:fhir-gateway:request-id";

/// What the answer's body showed, as the client got it.
#[derive(Debug, Default)]
pub enum Shown {
    /// No body of patient data (an error, a write with no representation, not JSON).
    #[default]
    Nothing,
    /// The bytes sent to the client (after rewriting and filtering).
    Body { chunks: Vec<Bytes>, ndjson: bool },
    /// Over `max_body_bytes`: the patients are not listed.
    TooLarge,
}

/// One answered request.
#[derive(Debug)]
pub struct Record {
    pub at: jiff::Timestamp,
    pub method: String,
    /// The path as requested.
    pub path: String,
    /// Below the route's prefix, for FHIR requests.
    pub rest: Option<String>,
    pub query: Option<String>,
    pub status: u16,
    pub identity: Option<Identity>,
    pub source: Option<String>,
    pub correlation_id: String,
    pub public_base: Option<String>,
    pub shown: Shown,
    /// Why the gateway refused or failed, when it did.
    pub error: Option<String>,
    /// Break-the-glass reason, when the caller gave one.
    pub reason: Option<String>,
}

/// The patients whose data a body held: every resource's compartment owners. `unknown`: some
/// reference may name a patient that cannot be resolved.
pub fn patients_of(chunks: &[Bytes], ndjson: bool, base: Option<&str>) -> (BTreeSet<String>, bool) {
    let whole: Vec<u8>;
    let raw: &[u8] = match chunks {
        [one] => one,
        many => {
            whole = many.concat();
            &whole
        }
    };
    let mut patients = BTreeSet::new();
    let mut unknown = false;
    let bases: Vec<&str> = base.into_iter().collect();
    let judge = |body: &Value, patients: &mut BTreeSet<String>| {
        let mut resolver = Resolver::new(&bases);
        resolver.learn(body);
        let mut all = Vec::new();
        resources(body, &mut all);
        let mut unknown = false;
        for r in all {
            let o = owners(r, &resolver);
            unknown |= o.unknown;
            patients.extend(o.patients);
        }
        unknown
    };
    if ndjson {
        for line in raw
            .split(|&b| b == b'\n')
            .filter(|l| !l.trim_ascii().is_empty())
        {
            match serde_json::from_slice::<Value>(line) {
                Ok(v) => unknown |= judge(&v, &mut patients),
                Err(_) => unknown = true,
            }
        }
    } else {
        match serde_json::from_slice::<Value>(raw) {
            Ok(v) => unknown |= judge(&v, &mut patients),
            Err(_) => unknown = true,
        }
    }
    (patients, unknown)
}

fn coding(system: &str, code: &str, display: &str) -> Value {
    json!({"system": system, "code": code, "display": display})
}

/// The query as audited: parameters that carry a token are dropped.
fn safe_query(q: &str) -> String {
    q.split('&')
        .filter(|p| {
            let name = p.split('=').next().unwrap_or("").to_ascii_lowercase();
            !matches!(name.as_str(), "access_token" | "client_secret" | "id_token")
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// `(subtype code, action)` of a FHIR request.
fn interaction(method: &str, rest: &str, query: &str) -> (String, &'static str, Option<String>) {
    let Ok(r) = classify(method, rest, query) else {
        return ("unknown".into(), "E", None);
    };
    let what = match (&r.resource_type, &r.id) {
        (Some(t), Some(id)) => Some(format!("{t}/{id}")),
        _ => None,
    };
    let (code, action) = match &r.interaction {
        Interaction::Capabilities => ("capabilities".to_string(), "R"),
        Interaction::Read => ("read".into(), "R"),
        Interaction::VRead => ("vread".into(), "R"),
        Interaction::History => ("history".into(), "R"),
        Interaction::Search if r.resource_type.is_some() => ("search-type".into(), "R"),
        Interaction::Search => ("search-system".into(), "R"),
        Interaction::Create => ("create".into(), "C"),
        Interaction::Update => ("update".into(), "U"),
        Interaction::Patch => ("patch".into(), "U"),
        Interaction::Delete => ("delete".into(), "D"),
        Interaction::Operation(o) => (format!("operation:{o}"), "E"),
        Interaction::Bundle => ("batch".into(), "E"),
    };
    (code, action, what)
}

impl Record {
    /// The AuditEvent, built on the writer thread.
    pub fn to_event(&self, instance: &str) -> Value {
        let query = self.query.as_deref().map(safe_query).unwrap_or_default();
        let (subtype, action, what) = match &self.rest {
            Some(rest) => interaction(&self.method, rest, &query),
            None => (format!("gateway:{}", self.path), "E", None),
        };
        let outcome = match self.status {
            200..=399 => "0",
            400..=499 => "4",
            _ => "8",
        };
        let mut agents = Vec::new();
        if let Some(id) = &self.identity {
            let roles: Vec<Value> = id
                .roles
                .iter()
                .map(|r: &Role| json!({"coding": [{"system": "urn:fhir-gateway:role", "code": r.name()}]}))
                .collect();
            let mut user = json!({
                "type": {"coding": [coding("http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "IRCP", "information recipient")]},
                "who": {"identifier": {"system": format!("urn:fhir-gateway:issuer:{}", id.issuer), "value": id.user_id}},
                "requestor": true,
                "role": roles,
            });
            if let Some(t) = &id.tenant {
                user["who"]["identifier"]["assigner"] = json!({"display": t});
            }
            if let Some(upn) = &id.upn {
                user["altId"] = json!(upn);
            }
            if let Some(fu) = &id.fhir_user {
                user["who"]["reference"] = json!(fu);
            }
            if let Some(ip) = &self.source {
                user["network"] = json!({"address": ip, "type": "2"});
            }
            if let Some(r) = &self.reason {
                user["purposeOfUse"] = json!([{"coding": [coding("http://terminology.hl7.org/CodeSystem/v3-ActReason", "BTG", "break the glass")], "text": r}]);
            }
            agents.push(user);
            if let Some(c) = &id.client_id {
                agents.push(json!({
                    "type": {"coding": [coding("http://dicom.nema.org/resources/ontology/DCM", "110150", "Application")]},
                    "who": {"identifier": {"system": "urn:fhir-gateway:client", "value": c}},
                    "requestor": false,
                }));
            }
        } else {
            let mut anon = json!({"who": {"display": "unauthenticated"}, "requestor": true});
            if let Some(ip) = &self.source {
                anon["network"] = json!({"address": ip, "type": "2"});
            }
            agents.push(anon);
        }
        let mut entities = vec![json!({
            "what": {"identifier": {"system": REQUEST_ID, "value": self.correlation_id}},
            "type": coding(ENTITY_TYPE, "4", "Other"),
            "description": format!("{} {}", self.method, self.path),
        })];
        if !query.is_empty() {
            use base64::Engine;
            entities.push(json!({
                "type": coding(ENTITY_TYPE, "2", "System Object"),
                "role": coding(OBJECT_ROLE, "24", "Query"),
                "query": base64::engine::general_purpose::STANDARD.encode(query.as_bytes()),
            }));
        }
        if let Some(w) = what {
            entities.push(json!({"what": {"reference": w}, "type": coding(ENTITY_TYPE, "2", "System Object")}));
        }
        match &self.shown {
            Shown::Body { chunks, ndjson } => {
                let (patients, unknown) = patients_of(chunks, *ndjson, self.public_base.as_deref());
                for p in patients {
                    entities.push(json!({"what": {"reference": format!("Patient/{p}")},
                        "type": coding(ENTITY_TYPE, "1", "Person"),
                        "role": coding(OBJECT_ROLE, "1", "Patient")}));
                }
                if unknown {
                    entities.push(json!({"type": coding(ENTITY_TYPE, "4", "Other"),
                        "description": "patients incomplete: the answer held references that may name patients the gateway cannot resolve"}));
                }
            }
            Shown::TooLarge => entities.push(json!({"type": coding(ENTITY_TYPE, "4", "Other"),
                "description": "patients incomplete: the answer was larger than audit.max_body_bytes"})),
            Shown::Nothing => {}
        }
        let mut ev = json!({
            "resourceType": "AuditEvent",
            "type": coding("http://terminology.hl7.org/CodeSystem/audit-event-type", "rest", "RESTful Operation"),
            "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": subtype}],
            "action": action,
            "recorded": format!("{:.3}", self.at),
            "outcome": outcome,
            "outcomeDesc": match &self.error {
                Some(e) => format!("{} {e}", self.status),
                None => self.status.to_string(),
            },
            "agent": agents,
            "source": {"site": instance, "observer": {"display": "fhir-gateway"},
                       "type": [coding("http://terminology.hl7.org/CodeSystem/security-source-type", "4", "Application Server")]},
            "entity": entities,
        });
        if self.reason.is_some() {
            ev["purposeOfEvent"] = json!([{"coding": [coding("http://terminology.hl7.org/CodeSystem/v3-ActReason", "BTG", "break the glass")]}]);
        }
        ev
    }
}

/// The patients an AuditEvent names (`Patient/<id>` entities with the patient role).
pub fn named_patients(ev: &Value) -> impl Iterator<Item = &str> {
    ev.get("entity")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.pointer("/role/code").and_then(Value::as_str) == Some("1"))
        .filter_map(|e| e.pointer("/what/reference").and_then(Value::as_str))
}
