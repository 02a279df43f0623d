//! TransformBundle (`modules/src/builtin/transform_bundle.rs`): a transaction Bundle POSTed to
//! the base, through `PreProcess::process`, with a fake FHIR server for the conditional
//! searches.
//!
//! Input: byte 0 picks the setting (`conditional_put`) and how the fake server answers a
//! search (no match, one match, two matches, a 404, a non-JSON answer, a failure); the rest
//! is the request body.
//!
//! Invariants: no panic; the module never fails unless the server did; a rewritten body is
//! valid JSON; a transaction comes out as a `batch` with as many entries, each with a valid
//! method and a URL, or is stopped with a 400/412 OperationOutcome that says why; anything
//! else that is not stopped passes byte for byte; nothing is searched for a body that is
//! refused before the searches; every `urn:uuid:` entry turned into a PUT has a valid id and
//! no reference to it is left.
//!
//! Regression: fuzz/regressions/bundle_transform/ (a `urn:uuid:` inside a Reference under a
//! key named `reference`, R4 `Consent.provision.data.reference`; fixed in 7060f32).
#![no_main]

use async_trait::async_trait;
use fhir_gateway_modules::builtin::transform_bundle::{Settings, TransformBundle};
use fhir_gateway_modules::identity::valid_id;
use fhir_gateway_modules::links::Directory;
use fhir_gateway_modules::processor::{
    Body, ClientRequest, Context, EventSink, FhirClient, ModuleError, PreOutcome, PreProcess,
    Request, Response,
};
use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// How the fake server answers every search.
struct FakeServer {
    mode: AtomicU8,
    calls: Mutex<Vec<String>>,
}

#[async_trait]
impl FhirClient for FakeServer {
    async fn send(&self, req: ClientRequest) -> Result<Response, ModuleError> {
        self.calls.lock().unwrap().push(req.path_and_query.clone());
        let bundle = |ids: &[&str]| {
            json!({"resourceType": "Bundle", "type": "searchset", "total": ids.len(),
                "entry": ids.iter().map(|id| json!({"resource": {"id": id}, "search": {"mode": "match"}})).collect::<Vec<_>>()})
        };
        Ok(match self.mode.load(Ordering::Relaxed) % 6 {
            0 => Response::json(200, bundle(&[])),
            1 => Response::json(200, bundle(&["found-1"])),
            2 => Response::json(200, bundle(&["a", "b"])),
            3 => Response::outcome(404, "not-found", "no such type"),
            4 => Response {
                status: 200,
                headers: vec![],
                body: Body::Raw(b"<html>".to_vec()),
            },
            _ => return Err(ModuleError::Failed("connection refused".into())),
        })
    }
}

struct NoEvents;
#[async_trait]
impl EventSink for NoEvents {
    async fn publish(&self, _: &str, _: Value) {}
}

fn setup() -> &'static (Context, Arc<FakeServer>) {
    static S: OnceLock<(Context, Arc<FakeServer>)> = OnceLock::new();
    S.get_or_init(|| {
        let server = Arc::new(FakeServer {
            mode: AtomicU8::new(0),
            calls: Mutex::new(Vec::new()),
        });
        let cx = Context {
            identity: None,
            correlation_id: "fuzz".into(),
            public_base: "https://gw.example/fhir".into(),
            upstream_base: "http://fhir.internal/fhir".into(),
            links: Arc::new(Directory::new(Default::default())),
            fhir: server.clone(),
            events: Arc::new(NoEvents),
        };
        (cx, server)
    })
}

const METHODS: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"];

/// Every string under a `reference` key, including inside a `reference` that is itself a
/// Reference (R4 `Consent.provision.data.reference`).
fn references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                match (k.as_str(), c) {
                    ("reference", Value::String(s)) => out.push(s.clone()),
                    _ => references(c, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|c| references(c, out)),
        _ => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let (cx, server) = setup();
    let server_mode = sel % 6;
    server.mode.store(server_mode, Ordering::Relaxed);
    server.calls.lock().unwrap().clear();
    let m = TransformBundle::new(Settings {
        conditional_put: sel & 0x80 != 0,
    })
    .unwrap();
    let mut req = Request {
        method: "POST".into(),
        path: "".into(),
        query: String::new(),
        headers: vec![("content-type".into(), "application/fhir+json".into())],
        body: Some(body.to_vec()),
    };
    assert!(m.applies(&req));
    let original = req.clone();
    let input: Option<Value> = serde_json::from_slice(body).ok();
    let is_tx = input.as_ref().is_some_and(|v| {
        v.get("resourceType").and_then(Value::as_str) == Some("Bundle")
            && v.get("type").and_then(Value::as_str) == Some("transaction")
    });

    let outcome = futures::executor::block_on(m.process(&mut req, cx));
    let calls = server.calls.lock().unwrap().clone();
    // Only the searches may fail, and only because the fake server did.
    let outcome = match outcome {
        Err(e) => {
            assert!(
                is_tx && matches!(server_mode, 4 | 5),
                "module failed: {e:?}"
            );
            assert!(!calls.is_empty());
            return;
        }
        Ok(o) => o,
    };
    match outcome {
        PreOutcome::Continue if is_tx => {
            let out: Value = serde_json::from_slice(req.body.as_deref().expect("a body"))
                .expect("the rewritten body is JSON");
            let input = input.unwrap();
            assert_eq!(out["type"], "batch");
            assert_eq!(out["resourceType"], "Bundle");
            let n_in = input
                .get("entry")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            let entries = out["entry"].as_array().expect("entry is an array");
            assert_eq!(entries.len(), n_in);
            let mut refs = Vec::new();
            references(&out["entry"], &mut refs);
            for (e_in, e) in input["entry"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .zip(entries)
            {
                let method = e["request"]["method"].as_str().unwrap_or("");
                assert!(METHODS.contains(&method), "method {method:?}");
                let url = e["request"]["url"].as_str().unwrap_or("");
                assert!(!url.is_empty());
                if method == "POST" || method == "PUT" {
                    let t = e["resource"]["resourceType"].as_str().unwrap_or("");
                    assert_eq!(url.split(['/', '?']).next(), Some(t), "{e}");
                }
                let full = e_in.get("fullUrl").and_then(Value::as_str).unwrap_or("");
                let m_in = e_in["request"]["method"].as_str().unwrap_or("");
                let url_in = e_in["request"]["url"].as_str().unwrap_or("");
                let becomes_put = full.starts_with("urn:uuid:")
                    && e_in.get("resource").is_some()
                    && (m_in == "POST" || (m_in == "PUT" && !url_in.contains('?')));
                if becomes_put && method == "PUT" && !url_in.contains('?') {
                    let id = e["resource"]["id"].as_str().unwrap_or("");
                    assert!(valid_id(id), "PUT with id {id:?}");
                    assert!(!refs.iter().any(|r| r == full), "{full} still referenced");
                }
            }
        }
        PreOutcome::Continue => {
            // Not a transaction (a batch, or no JSON object at all): passed as it came.
            assert_eq!(req, original);
            assert!(calls.is_empty());
        }
        PreOutcome::Stop(resp) => {
            assert!(matches!(resp.status, 400 | 412), "status {}", resp.status);
            let oo = resp.json_body().expect("an OperationOutcome");
            assert_eq!(oo["resourceType"], "OperationOutcome");
            let why = oo["issue"][0]["diagnostics"].as_str().unwrap_or("");
            assert!(!why.is_empty(), "a stop without diagnostics");
            assert_eq!(req.body, original.body, "a stopped request was rewritten");
            if resp.status == 412 {
                assert_eq!(server_mode, 2);
            }
            if !is_tx {
                assert!(calls.is_empty());
            }
        }
        other => panic!("unexpected outcome {other:?}"),
    }
});
