//! EverythingPatient (pre) — `GET Patient/{id}/$everything` for servers without it: the Patient
//! plus every resource of its compartment (R4 CompartmentDefinition: every type, every linking
//! parameter), types searched in parallel with bounded concurrency, all pages, up to `max`
//! resources (an OperationOutcome warning entry when cut). A missing patient is a 404. The
//! result is a stop-with-response, so the post chain (the security filters) still runs on it.
//!
//! As the FHIR operation defines it, resources referenced from the compartment (the
//! Practitioner of an Observation, an Organization, a Medication...) are added too — except
//! other Patients, which never come in through a reference.
//!
//! Searches are sent with `Prefer: handling=strict`: a server that does not know a linking
//! parameter must refuse it, not ignore it and return every resource of the type.
//!
//! Settings: `max` (5000), `concurrency` (8), `include_referenced` (true), `pass_through`
//! (false: let the server answer).

use crate::compartment::PATIENT_COMPARTMENT;
use crate::identity::valid_id;
use crate::processor::{
    next_link, ClientRequest, Context, ModuleError, PreOutcome, PreProcess, Request, Response,
};
use crate::Identity;
use async_trait::async_trait;
use futures::stream::{self, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashSet;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default = "default_max")]
    pub max: usize,
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    #[serde(default)]
    pub pass_through: bool,
    #[serde(default = "yes")]
    pub include_referenced: bool,
}

fn yes() -> bool {
    true
}

fn default_max() -> usize {
    5000
}
fn default_concurrency() -> usize {
    8
}

pub struct EverythingPatient {
    max: usize,
    concurrency: usize,
    pass_through: bool,
    include_referenced: bool,
}

impl EverythingPatient {
    pub const NAME: &'static str = "EverythingPatient";

    pub fn new(s: Settings) -> Result<Self, String> {
        if s.max == 0 || s.max > 100_000 {
            return Err("max must be 1..=100000".into());
        }
        if s.concurrency == 0 || s.concurrency > 64 {
            return Err("concurrency must be 1..=64".into());
        }
        Ok(EverythingPatient {
            max: s.max,
            concurrency: s.concurrency,
            pass_through: s.pass_through,
            include_referenced: s.include_referenced,
        })
    }
}

fn patient_id(req: &Request) -> Option<&str> {
    let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
    match segs.as_slice() {
        ["Patient", id, "$everything"] if req.method == "GET" => Some(id),
        _ => None,
    }
}

/// Relative `Type/id` references anywhere in a resource (absolute and contained ones are left:
/// they are not this server's, or already inside).
fn references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                if k == "reference" {
                    if let Some(r) = c.as_str() {
                        let mut parts = r.split('/');
                        if let (Some(t), Some(id), None) =
                            (parts.next(), parts.next(), parts.next())
                        {
                            if t.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                                && valid_id(id)
                            {
                                out.push(format!("{t}/{id}"));
                            }
                        }
                    }
                } else {
                    references(c, out);
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| references(c, out)),
        _ => {}
    }
}

/// Every resource one search returns, all pages; `None` when the server refused the
/// parameter (400), so this link does not exist there.
async fn search_all(
    cx: &Context,
    first: String,
    cap: usize,
) -> Result<Option<Vec<Value>>, ModuleError> {
    let mut out = Vec::new();
    let mut url = first;
    for _ in 0..10_000 {
        let mut req = ClientRequest::get(url.clone());
        req.headers
            .push(("prefer".into(), "handling=strict".into()));
        let r = cx.fhir.send(req).await?;
        if r.status == 400 && out.is_empty() {
            return Ok(None);
        }
        let body = match (r.status, r.body) {
            (200, crate::processor::Body::Json(v)) => v,
            (s, _) => {
                return Err(ModuleError::Failed(format!(
                    "$everything: {url} answered {s}"
                )))
            }
        };
        for e in body
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let mode = e
                .get("search")
                .and_then(|s| s.get("mode"))
                .and_then(Value::as_str)
                .unwrap_or("match");
            if mode == "match" {
                if let Some(res) = e.get("resource") {
                    out.push(res.clone());
                }
            }
        }
        if out.len() > cap {
            break;
        }
        match next_link(&body) {
            Some(n) => url = n,
            None => return Ok(Some(out)),
        }
    }
    Ok(Some(out))
}

#[async_trait]
impl PreProcess for EverythingPatient {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn applies(&self, req: &Request, _caller: Option<&Identity>) -> bool {
        !self.pass_through && patient_id(req).is_some()
    }

    async fn process(&self, req: &mut Request, cx: &Context) -> Result<PreOutcome, ModuleError> {
        let Some(id) = patient_id(req).map(str::to_string) else {
            return Ok(PreOutcome::Continue);
        };
        if !valid_id(&id) {
            return Ok(PreOutcome::Stop(Response::outcome(
                400,
                "invalid",
                format!("{id:?} is not a FHIR id"),
            )));
        }
        let patient = cx
            .fhir
            .send(ClientRequest::get(format!("Patient/{id}")))
            .await?;
        match patient.status {
            200 => {}
            404 | 410 => {
                return Ok(PreOutcome::Stop(Response::outcome(
                    404,
                    "not-found",
                    format!("Patient/{id} not found"),
                )))
            }
            s => {
                return Err(ModuleError::Failed(format!(
                    "$everything: Patient/{id} answered {s}"
                )))
            }
        }
        let patient = patient
            .json_body()
            .cloned()
            .ok_or_else(|| ModuleError::Failed("Patient is not JSON".into()))?;

        let searches: Vec<(usize, String)> = PATIENT_COMPARTMENT
            .iter()
            .enumerate()
            .flat_map(|(i, (ty, params))| {
                let id = id.clone();
                params
                    .iter()
                    .map(move |p| (i, format!("{ty}?{p}=Patient/{id}&_count=100")))
            })
            .collect();
        let cap = self.max + 1;
        let results: Vec<(usize, Result<Option<Vec<Value>>, ModuleError>)> = stream::iter(searches)
            .map(|(i, url)| async move { (i, search_all(cx, url, cap).await) })
            .buffered(self.concurrency)
            .collect()
            .await;

        let mut seen: HashSet<String> = HashSet::new();
        seen.insert(format!("Patient/{id}"));
        let mut resources = vec![patient];
        let mut truncated = false;
        for (_, r) in results {
            for res in r?.unwrap_or_default() {
                let key = format!(
                    "{}/{}",
                    res.get("resourceType")
                        .and_then(Value::as_str)
                        .unwrap_or(""),
                    res.get("id").and_then(Value::as_str).unwrap_or("")
                );
                if !seen.insert(key) {
                    continue;
                }
                if resources.len() >= self.max {
                    truncated = true;
                    break;
                }
                resources.push(res);
            }
        }
        if self.include_referenced && !truncated {
            let mut wanted = Vec::new();
            for r in &resources {
                references(r, &mut wanted);
            }
            wanted.retain(|k| !k.starts_with("Patient/") && !seen.contains(k));
            wanted.sort();
            wanted.dedup();
            let fetched: Vec<Result<crate::processor::Response, ModuleError>> =
                stream::iter(wanted)
                    .map(|k| async move { cx.fhir.send(ClientRequest::get(k)).await })
                    .buffered(self.concurrency)
                    .collect()
                    .await;
            for f in fetched {
                let f = f?;
                // A dangling reference is the data's problem, not a reason to fail.
                if f.status != 200 {
                    continue;
                }
                if let Some(res) = f.json_body() {
                    if resources.len() >= self.max {
                        truncated = true;
                        break;
                    }
                    resources.push(res.clone());
                }
            }
        }
        let n = resources.len();
        let mut entries: Vec<Value> = resources
            .into_iter()
            .map(|r| {
                let full = format!(
                    "{}/{}/{}",
                    cx.public_base,
                    r.get("resourceType").and_then(Value::as_str).unwrap_or(""),
                    r.get("id").and_then(Value::as_str).unwrap_or("")
                );
                json!({"fullUrl": full, "resource": r, "search": {"mode": "match"}})
            })
            .collect();
        let mut bundle = json!({"resourceType": "Bundle", "type": "searchset"});
        if truncated {
            entries.push(json!({
                "resource": {"resourceType":"OperationOutcome","issue":[{"severity":"warning","code":"too-costly",
                    "diagnostics": format!("$everything returned the first {n} resources only (max {})", self.max)}]},
                "search": {"mode": "outcome"}
            }));
        } else {
            bundle["total"] = json!(n);
        }
        bundle["entry"] = Value::Array(entries);
        Ok(PreOutcome::Stop(Response::json(200, bundle)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{context_with, ScriptedClient};

    fn req(path: &str) -> Request {
        Request {
            method: "GET".into(),
            path: path.into(),
            query: String::new(),
            headers: vec![],
            body: None,
        }
    }

    fn set(entries: Vec<Value>) -> Value {
        json!({"resourceType":"Bundle","type":"searchset","entry": entries.into_iter().map(|r| json!({"resource": r, "search":{"mode":"match"}})).collect::<Vec<_>>()})
    }

    #[tokio::test]
    async fn collects_the_compartment_dedupes_and_caps() {
        let m = EverythingPatient::new(Settings {
            max: 3,
            concurrency: 4,
            pass_through: false,
            include_referenced: true,
        })
        .unwrap();
        let client = ScriptedClient::by_url(vec![
            (
                "Patient/p1",
                200,
                json!({"resourceType":"Patient","id":"p1"}),
            ),
            (
                "Observation?subject=Patient/p1",
                200,
                set(vec![json!({"resourceType":"Observation","id":"o1"})]),
            ),
            // Same Observation through another link: counted once.
            (
                "Observation?performer=Patient/p1",
                200,
                set(vec![json!({"resourceType":"Observation","id":"o1"})]),
            ),
            (
                "Encounter?patient=Patient/p1",
                200,
                set(vec![
                    json!({"resourceType":"Encounter","id":"e1"}),
                    json!({"resourceType":"Encounter","id":"e2"}),
                ]),
            ),
            (
                "Account?subject=",
                400,
                json!({"resourceType":"OperationOutcome"}),
            ),
        ]);
        let (cx, client) = context_with(client);
        let out = m
            .process(&mut req("/Patient/p1/$everything"), &cx)
            .await
            .unwrap();
        let PreOutcome::Stop(resp) = out else {
            panic!("{out:?}")
        };
        let b = resp.json_body().unwrap();
        let e = b["entry"].as_array().unwrap();
        assert_eq!(e[0]["resource"]["id"], "p1");
        assert_eq!(e.len(), 4, "3 resources + the warning");
        assert_eq!(e[3]["search"]["mode"], "outcome");
        assert!(b.get("total").is_none());
        // Compartment order: Encounter comes before Observation, which the cap cut off.
        assert_eq!(e[1]["fullUrl"], "https://gw.example/fhir/Encounter/e1");
        assert_eq!(e[2]["resource"]["id"], "e2");
        assert!(client
            .calls()
            .iter()
            .any(|c| c.starts_with("GET VisionPrescription?patient=Patient/p1")));
    }

    #[tokio::test]
    async fn missing_patient_is_404() {
        let m = EverythingPatient::new(Settings {
            max: 10,
            concurrency: 2,
            pass_through: false,
            include_referenced: true,
        })
        .unwrap();
        let (cx, client) = context_with(ScriptedClient::by_url(vec![(
            "Patient/nope",
            404,
            json!({"resourceType":"OperationOutcome"}),
        )]));
        let out = m
            .process(&mut req("/Patient/nope/$everything"), &cx)
            .await
            .unwrap();
        assert!(matches!(out, PreOutcome::Stop(r) if r.status == 404));
        assert_eq!(client.calls().len(), 1);
        assert!(!m.applies(&req("/Patient/p1"), None));
        let pt = EverythingPatient::new(Settings {
            max: 10,
            concurrency: 2,
            pass_through: true,
            include_referenced: true,
        })
        .unwrap();
        assert!(!pt.applies(&req("/Patient/p1/$everything"), None));
    }
}
