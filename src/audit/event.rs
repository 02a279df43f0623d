//! A request as the worker thread hands it over (`Record`, cheap to make), and the AuditEvent
//! the writer thread builds from it, in the shape of IHE Basic Audit Log Patterns (BALP): who
//! (user, tenant, client, roles, source address), what (interaction, type, query without any
//! token), the outcome, one `entity` per patient whose data the answer held after filtering,
//! and the correlation id.

use bytes::Bytes;
use fhir_gateway_modules::compartment::{decides_owner, owners};
use fhir_gateway_modules::filter::resources;
use fhir_gateway_modules::json::At;
use fhir_gateway_modules::reference::Resolver;
use fhir_gateway_modules::request::{classify, Interaction};
use fhir_gateway_modules::Identity;
use serde_json::Value;
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
    /// A buffered answer's patients, read on the worker from the tree the modules left (what
    /// was serialised for the client): no second parse, and the tree is freed where it was
    /// built (a tree freed by another thread costs the allocator more than reading it here).
    Patients {
        patients: BTreeSet<String>,
        unknown: bool,
    },
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
    pub identity: Option<std::sync::Arc<Identity>>,
    pub source: Option<String>,
    pub correlation_id: String,
    pub public_base: Option<std::sync::Arc<str>>,
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
    let judge = |body: &Value, patients: &mut BTreeSet<String>| judge_tree(body, &bases, patients);
    if ndjson {
        for line in raw
            .split(|&b| b == b'\n')
            .filter(|l| !l.trim_ascii().is_empty())
        {
            match crate::faithful::cut_document(line, decides_owner) {
                Some(v) => unknown |= judge(&v, &mut patients),
                None => unknown = true,
            }
        }
    } else {
        // Only what decides whose data each resource is gets built.
        match crate::faithful::cut_document(raw, decides_owner) {
            Some(v) => unknown |= judge(&v, &mut patients),
            None => unknown = true,
        }
    }
    (patients, unknown)
}

/// Adds the patients whose compartments hold the resources of `body`; `true` when some
/// reference may name a patient that cannot be resolved.
pub fn judge_tree(body: &Value, bases: &[&str], patients: &mut BTreeSet<String>) -> bool {
    let mut resolver = Resolver::new(bases);
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

/// Writes JSON straight into the line: the writer thread builds no tree per record.
struct W<'a>(&'a mut Vec<u8>);

impl W<'_> {
    fn raw(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }

    /// A JSON string, escaped.
    fn str(&mut self, s: &str) {
        // Writing a &str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.0, s);
    }

    /// Codings are the gateway's own constants, which need no escaping: written as they are.
    fn coding(&mut self, system: &'static str, code: &'static str, display: &'static str) {
        debug_assert!([system, code, display]
            .iter()
            .all(|s| !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20)));
        for (key, v) in [
            ("{\"system\":\"", system),
            ("\",\"code\":\"", code),
            ("\",\"display\":\"", display),
        ] {
            self.raw(key);
            self.raw(v);
        }
        self.raw("\"}");
    }

    fn network(&mut self, ip: &Option<String>) {
        if let Some(ip) = ip {
            self.raw(",\"network\":{\"address\":");
            self.str(ip);
            self.raw(",\"type\":\"2\"}");
        }
    }

    fn patients(&mut self, patients: BTreeSet<String>) {
        for p in patients {
            self.raw(",{\"what\":{\"reference\":\"Patient/");
            // A valid FHIR id needs no escaping; written escaped all the same.
            let quoted = serde_json::to_string(&p).unwrap_or_default();
            self.raw(&quoted[1..quoted.len() - 1]);
            self.raw("\"},\"type\":");
            self.coding(ENTITY_TYPE, "1", "Person");
            self.raw(",\"role\":");
            self.coding(OBJECT_ROLE, "1", "Patient");
            self.raw("}");
        }
    }

    fn other(&mut self, description: &str) {
        self.raw(",{\"type\":");
        self.coding(ENTITY_TYPE, "4", "Other");
        self.raw(",\"description\":");
        self.str(description);
        self.raw("}");
    }
}

impl Shown {
    /// About how much memory a queued record holds for its answer: the bytes, or for a tree
    /// a few times what it serialised to.
    pub fn weight(&self) -> usize {
        match self {
            Shown::Body { chunks, .. } => chunks.iter().map(Bytes::len).sum(),
            Shown::Patients { .. } | Shown::TooLarge | Shown::Nothing => 0,
        }
    }
}

impl Record {
    /// The AuditEvent as a tree (tests, tools); the writer uses `write_event`.
    pub fn to_event(&self, instance: &str) -> Value {
        let mut out = Vec::new();
        self.write_event(instance, &mut out);
        serde_json::from_slice(&out).unwrap_or(Value::Null)
    }

    /// Writes the AuditEvent's JSON to `out`, on the writer thread.
    pub fn write_event(&self, instance: &str, out: &mut Vec<u8>) {
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
        let mut w = W(out);
        w.raw("{\"resourceType\":\"AuditEvent\",\"type\":");
        w.coding(
            "http://terminology.hl7.org/CodeSystem/audit-event-type",
            "rest",
            "RESTful Operation",
        );
        w.raw(",\"subtype\":[{\"system\":\"http://hl7.org/fhir/restful-interaction\",\"code\":");
        w.str(&subtype);
        w.raw("}],\"action\":");
        w.str(action);
        w.raw(",\"recorded\":\"");
        w.raw(&format!("{:.3}", self.at));
        w.raw("\",\"outcome\":");
        w.str(outcome);
        w.raw(",\"outcomeDesc\":");
        match &self.error {
            Some(e) => w.str(&format!("{} {e}", self.status)),
            None => w.str(&self.status.to_string()),
        }
        w.raw(",\"agent\":[");
        match &self.identity {
            Some(id) => {
                w.raw("{\"type\":{\"coding\":[");
                w.coding(
                    "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                    "IRCP",
                    "information recipient",
                );
                w.raw("]},\"who\":{\"identifier\":{\"system\":");
                w.str(&format!("urn:fhir-gateway:issuer:{}", id.issuer));
                w.raw(",\"value\":");
                w.str(&id.user_id);
                if let Some(t) = &id.tenant {
                    w.raw(",\"assigner\":{\"display\":");
                    w.str(t);
                    w.raw("}");
                }
                w.raw("}");
                if let Some(fu) = &id.fhir_user {
                    w.raw(",\"reference\":");
                    w.str(fu);
                }
                w.raw("},\"requestor\":true,\"role\":[");
                for (i, r) in id.roles.iter().enumerate() {
                    w.raw(if i > 0 {
                        ",{\"coding\":[{\"system\":\"urn:fhir-gateway:role\",\"code\":"
                    } else {
                        "{\"coding\":[{\"system\":\"urn:fhir-gateway:role\",\"code\":"
                    });
                    w.str(r.name());
                    w.raw("}]}");
                }
                w.raw("]");
                if let Some(upn) = &id.upn {
                    w.raw(",\"altId\":");
                    w.str(upn);
                }
                w.network(&self.source);
                if let Some(r) = &self.reason {
                    w.raw(",\"purposeOfUse\":[{\"coding\":[");
                    w.coding(
                        "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                        "BTG",
                        "break the glass",
                    );
                    w.raw("],\"text\":");
                    w.str(r);
                    w.raw("}]");
                }
                w.raw("}");
                if let Some(c) = &id.client_id {
                    w.raw(",{\"type\":{\"coding\":[");
                    w.coding(
                        "http://dicom.nema.org/resources/ontology/DCM",
                        "110150",
                        "Application",
                    );
                    w.raw("]},\"who\":{\"identifier\":{\"system\":\"urn:fhir-gateway:client\",\"value\":");
                    w.str(c);
                    w.raw("}},\"requestor\":false}");
                }
            }
            None => {
                w.raw("{\"who\":{\"display\":\"unauthenticated\"},\"requestor\":true");
                w.network(&self.source);
                w.raw("}");
            }
        }
        w.raw("],\"source\":{\"site\":");
        w.str(instance);
        w.raw(",\"observer\":{\"display\":\"fhir-gateway\"},\"type\":[");
        w.coding(
            "http://terminology.hl7.org/CodeSystem/security-source-type",
            "4",
            "Application Server",
        );
        w.raw("]},\"entity\":[{\"what\":{\"identifier\":{\"system\":\"");
        w.raw(REQUEST_ID);
        w.raw("\",\"value\":");
        w.str(&self.correlation_id);
        w.raw("}},\"type\":");
        w.coding(ENTITY_TYPE, "4", "Other");
        w.raw(",\"description\":");
        w.str(&format!("{} {}", self.method, self.path));
        w.raw("}");
        if !query.is_empty() {
            use base64::Engine;
            w.raw(",{\"type\":");
            w.coding(ENTITY_TYPE, "2", "System Object");
            w.raw(",\"role\":");
            w.coding(OBJECT_ROLE, "24", "Query");
            w.raw(",\"query\":\"");
            w.raw(&base64::engine::general_purpose::STANDARD.encode(query.as_bytes()));
            w.raw("\"}");
        }
        if let Some(what) = what {
            w.raw(",{\"what\":{\"reference\":");
            w.str(&what);
            w.raw("},\"type\":");
            w.coding(ENTITY_TYPE, "2", "System Object");
            w.raw("}");
        }
        match &self.shown {
            Shown::Body { chunks, ndjson } => {
                let (patients, unknown) = patients_of(chunks, *ndjson, self.public_base.as_deref());
                w.patients(patients);
                if unknown {
                    w.other("patients incomplete: the answer held references that may name patients the gateway cannot resolve");
                }
            }
            Shown::Patients { patients, unknown } => {
                w.patients(patients.clone());
                if *unknown {
                    w.other("patients incomplete: the answer held references that may name patients the gateway cannot resolve");
                }
            }
            Shown::TooLarge => {
                w.other("patients incomplete: the answer was larger than audit.max_body_bytes")
            }
            Shown::Nothing => {}
        }
        w.raw("]");
        if self.reason.is_some() {
            w.raw(",\"purposeOfEvent\":[{\"coding\":[");
            w.coding(
                "http://terminology.hl7.org/CodeSystem/v3-ActReason",
                "BTG",
                "break the glass",
            );
            w.raw("]}]");
        }
        w.raw("}");
    }
}

/// The patients an AuditEvent names (`Patient/<id>` entities with the patient role).
pub fn named_patients(ev: &Value) -> impl Iterator<Item = &str> {
    ev.get("entity")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.at("/role/code").and_then(Value::as_str) == Some("1"))
        .filter_map(|e| e.at("/what/reference").and_then(Value::as_str))
}
