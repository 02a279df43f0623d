//! Test doubles for module unit tests: a FHIR client that answers from a script and records
//! what it was asked, an event sink that keeps what it got, and requests as modules see them.

use crate::processor::{
    Body, ClientRequest, Context, EventSink, FhirClient, ModuleError, Request, Response,
};
use async_trait::async_trait;
use serde_json::Value;
use std::sync::{Arc, Mutex};

pub struct ScriptedClient {
    answers: Mutex<Vec<(u16, Value)>>,
    calls: Mutex<Vec<String>>,
    /// Answer by URL prefix instead of in order, when set.
    by_url: Vec<(String, u16, Value)>,
}

impl ScriptedClient {
    pub fn new(answers: Vec<(u16, Value)>) -> ScriptedClient {
        ScriptedClient {
            answers: Mutex::new(answers.into_iter().rev().collect()),
            calls: Mutex::new(Vec::new()),
            by_url: Vec::new(),
        }
    }

    pub fn by_url(map: Vec<(&str, u16, Value)>) -> ScriptedClient {
        ScriptedClient {
            answers: Mutex::new(Vec::new()),
            calls: Mutex::new(Vec::new()),
            by_url: map
                .into_iter()
                .map(|(u, s, v)| (u.to_string(), s, v))
                .collect(),
        }
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait]
impl FhirClient for ScriptedClient {
    async fn send(&self, req: ClientRequest) -> Result<Response, ModuleError> {
        self.calls
            .lock()
            .unwrap()
            .push(format!("{} {}", req.method, req.path_and_query));
        if !self.by_url.is_empty() {
            // Longest matching prefix wins.
            let hit = self
                .by_url
                .iter()
                .filter(|(u, _, _)| req.path_and_query.starts_with(u.as_str()))
                .max_by_key(|(u, _, _)| u.len());
            return match hit {
                Some((_, s, v)) => Ok(Response::json(*s, v.clone())),
                None => Ok(Response::json(
                    200,
                    serde_json::json!({"resourceType":"Bundle","type":"searchset","total":0,"entry":[]}),
                )),
            };
        }
        match self.answers.lock().unwrap().pop() {
            Some((s, v)) => Ok(Response {
                status: s,
                headers: vec![],
                body: Body::Json(v),
            }),
            None => Err(ModuleError::Failed("script exhausted".into())),
        }
    }
}

#[derive(Default)]
pub struct MemorySink(pub Mutex<Vec<(String, Value)>>);

#[async_trait::async_trait]
impl EventSink for MemorySink {
    async fn publish(&self, key: &str, event: Value) {
        self.0.lock().unwrap().push((key.to_string(), event));
    }
}

pub fn context_with(client: ScriptedClient) -> (Context, Arc<ScriptedClient>) {
    let client = Arc::new(client);
    (
        Context {
            identity: None,
            correlation_id: "test".into(),
            public_base: "https://gw.example/fhir".into(),
            upstream_base: "http://fhir.internal/fhir".into(),
            links: Arc::new(crate::links::Directory::new(Default::default())),
            fhir: client.clone(),
            events: Arc::new(MemorySink::default()),
        },
        client,
    )
}

pub fn context() -> Context {
    context_with(ScriptedClient::new(vec![])).0
}

/// A request below the route's prefix, no headers, the body (if any) as compact JSON.
pub fn req(method: &str, path: &str, query: &str, body: Option<Value>) -> Request {
    Request {
        method: method.into(),
        path: path.into(),
        query: query.into(),
        headers: vec![],
        body: body.map(|b| serde_json::to_vec(&b).unwrap()),
    }
}
