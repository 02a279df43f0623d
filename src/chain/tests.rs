//! Chain semantics with purpose-built modules: order, every stop variant, errors.

use super::*;
use async_trait::async_trait;
use fhir_gateway_modules::processor::{Body, ClientRequest, EventSink, FhirClient};
use serde_json::json;
use std::sync::Mutex;

struct NoClient;

#[async_trait]
impl FhirClient for NoClient {
    async fn send(&self, _req: ClientRequest) -> Result<Response, ModuleError> {
        Err(ModuleError::Failed("no server in this test".into()))
    }
}

struct NoSink;
#[async_trait::async_trait]
impl EventSink for NoSink {
    async fn publish(&self, _key: &str, _event: serde_json::Value) {}
}

pub(super) fn cx() -> Context {
    Context {
        identity: None,
        correlation_id: "c1".into(),
        public_base: "https://gw/fhir".into(),
        upstream_base: "http://fhir.internal/fhir".into(),
        links: std::sync::Arc::new(fhir_gateway_modules::links::Directory::new(
            Default::default(),
        )),
        fhir: Arc::new(NoClient),
        events: Arc::new(NoSink),
    }
}

fn req() -> Request {
    Request {
        method: "GET".into(),
        path: "/Patient".into(),
        query: "name=x".into(),
        headers: vec![],
        body: None,
    }
}

#[derive(Clone, Copy)]
enum Act {
    Continue,
    Stop,
    Reply,
    StopEmpty,
    Fail,
}

struct Pre {
    name: &'static str,
    act: Act,
    log: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl PreProcess for Pre {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn process(&self, req: &mut Request, _cx: &Context) -> Result<PreOutcome, ModuleError> {
        self.log
            .lock()
            .unwrap()
            .push(format!("{} saw {}", self.name, req.query));
        req.query.push_str(&format!("&{}=1", self.name));
        Ok(match self.act {
            Act::Continue => PreOutcome::Continue,
            Act::Stop => PreOutcome::Stop(Response::json(200, json!({"by": self.name}))),
            Act::Reply => PreOutcome::Reply(Response::json(202, json!({"by": self.name}))),
            Act::StopEmpty => PreOutcome::StopWithoutResponse,
            Act::Fail => return Err(ModuleError::Failed("boom".into())),
        })
    }
}

struct Post {
    name: &'static str,
    act: Act,
    log: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl PostProcess for Post {
    fn name(&self) -> &'static str {
        self.name
    }
    async fn process(
        &self,
        _req: &Request,
        resp: &mut Response,
        _cx: &Context,
    ) -> Result<PostOutcome, ModuleError> {
        self.log.lock().unwrap().push(self.name.to_string());
        if let Body::Json(v) = &mut resp.body {
            v["seen"] = json!(format!("{}{}", v["seen"].as_str().unwrap_or(""), self.name));
        }
        Ok(match self.act {
            Act::Continue => PostOutcome::Continue,
            Act::Stop | Act::Reply => PostOutcome::Stop,
            Act::StopEmpty => PostOutcome::StopWithoutResponse,
            Act::Fail => return Err(ModuleError::Unavailable("consent store down".into())),
        })
    }
}

fn pres(acts: &[(&'static str, Act)], log: &Arc<Mutex<Vec<String>>>) -> Vec<Arc<dyn PreProcess>> {
    acts.iter()
        .map(|(n, a)| {
            Arc::new(Pre {
                name: n,
                act: *a,
                log: log.clone(),
            }) as Arc<dyn PreProcess>
        })
        .collect()
}

fn posts(acts: &[(&'static str, Act)], log: &Arc<Mutex<Vec<String>>>) -> Vec<Arc<dyn PostProcess>> {
    acts.iter()
        .map(|(n, a)| {
            Arc::new(Post {
                name: n,
                act: *a,
                log: log.clone(),
            }) as Arc<dyn PostProcess>
        })
        .collect()
}

#[tokio::test]
async fn pre_modules_run_in_order_and_see_each_others_changes() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let chain = pres(&[("a", Act::Continue), ("b", Act::Continue)], &log);
    let mut r = req();
    assert!(matches!(
        run_pre("/fhir", &chain, &mut r, &cx()).await.unwrap(),
        PreResult::Continue
    ));
    assert_eq!(
        *log.lock().unwrap(),
        vec!["a saw name=x", "b saw name=x&a=1"]
    );
    assert_eq!(
        r.query, "name=x&a=1&b=1",
        "the query rewrite reaches the upstream call"
    );
}

#[tokio::test]
async fn a_stop_skips_later_pre_modules_and_keeps_its_response() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let chain = pres(&[("a", Act::Stop), ("b", Act::Continue)], &log);
    match run_pre("/fhir", &chain, &mut req(), &cx()).await.unwrap() {
        PreResult::Stop(r) => assert_eq!(r.json_body().unwrap()["by"], "a"),
        other => panic!("{other:?}"),
    }
    assert_eq!(log.lock().unwrap().len(), 1);
    let chain = pres(&[("a", Act::Reply)], &log);
    assert!(
        matches!(run_pre("/fhir", &chain, &mut req(), &cx()).await.unwrap(), PreResult::Reply(r) if r.status == 202)
    );
}

#[tokio::test]
async fn stopping_without_a_response_or_failing_names_the_module() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let e = run_pre(
        "/fhir",
        &pres(&[("ok", Act::Continue), ("silent", Act::StopEmpty)], &log),
        &mut req(),
        &cx(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.status(), 500);
    assert!(e.to_string().contains("module silent"), "{e}");
    let e = run_pre(
        "/fhir",
        &pres(&[("broken", Act::Fail)], &log),
        &mut req(),
        &cx(),
    )
    .await
    .unwrap_err();
    assert_eq!((e.status(), e.code()), (500, "exception"));
    assert!(e.to_outcome("corr-1").windows(6).any(|w| w == b"corr-1"));
    assert!(e.to_string().contains("module broken: boom"));
}

#[tokio::test]
async fn post_modules_share_one_tree_and_can_stop_or_fail_closed() {
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut resp = Response::json(200, json!({"resourceType":"Bundle"}));
    run_post(
        "/fhir",
        &posts(
            &[("x", Act::Continue), ("y", Act::Stop), ("z", Act::Continue)],
            &log,
        ),
        &req(),
        &mut resp,
        &cx(),
    )
    .await
    .unwrap();
    assert_eq!(
        resp.json_body().unwrap()["seen"],
        "xy",
        "z never ran after the stop"
    );
    let e = run_post(
        "/fhir",
        &posts(&[("consent", Act::Fail)], &log),
        &req(),
        &mut resp,
        &cx(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (e.status(), e.code()),
        (503, "transient"),
        "a dependency down denies"
    );
    let e = run_post(
        "/fhir",
        &posts(&[("quiet", Act::StopEmpty)], &log),
        &req(),
        &mut resp,
        &cx(),
    )
    .await
    .unwrap_err();
    assert_eq!(e.status(), 500);
}
