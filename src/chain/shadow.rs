//! Shadow mode: a route's candidate post modules (`shadow:`) judge a copy of the answer the live
//! chain judged, after the client's answer is settled and apart from it (a spawned task), so
//! nothing they do reaches the client: not their edits, not their errors, not their time.
//! What differs is counted (`fhirgw_shadow_differences_total{route, module, direction}`) and
//! logged at info with the correlation id and the resource ids, never a body:
//!
//! * `withhold`: entries a candidate module removed that the live chain kept (the module that
//!   removed them is named);
//! * `reveal`: entries the candidate chain kept that the live chain withheld (`module="*"`:
//!   keeping is the whole chain's doing);
//! * `error`: a candidate module failed (counted once; the rest of the candidate chain is
//!   not run).

use crate::metrics;
use fhir_gateway_modules::explain::references;
use fhir_gateway_modules::processor::{Context, PostOutcome, PostProcess, Request, Response};
use log::info;
use std::collections::BTreeSet;
use std::sync::Arc;

/// What the candidate chain would have done differently.
#[derive(Debug, Default, PartialEq)]
pub struct Differences {
    /// (module, entries it withheld that the live chain kept).
    pub withhold: Vec<(&'static str, Vec<String>)>,
    /// Entries the candidate chain kept that the live chain withheld.
    pub reveal: Vec<String>,
    /// (module, its error).
    pub error: Option<(&'static str, String)>,
}

fn refs(r: &Response) -> BTreeSet<String> {
    r.json_body()
        .map(references)
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// Runs the candidate chain on `copy` (the answer as the live chain received it) and compares
/// with `live_kept` (the entries of the live chain's answer).
pub async fn evaluate(
    modules: &[Arc<dyn PostProcess>],
    req: &Request,
    mut copy: Response,
    live_kept: &BTreeSet<String>,
    cx: &Context,
) -> Differences {
    let original = refs(&copy);
    let mut d = Differences::default();
    for m in modules {
        if !m.applies(req, cx.identity.as_ref()) {
            continue;
        }
        let before = refs(&copy);
        let out = m.process(req, &mut copy, cx).await;
        let after = refs(&copy);
        let withheld: Vec<String> = before
            .difference(&after)
            .filter(|r| live_kept.contains(*r))
            .cloned()
            .collect();
        if !withheld.is_empty() {
            d.withhold.push((m.name(), withheld));
        }
        match out {
            Ok(PostOutcome::Continue) => {}
            Ok(PostOutcome::Stop) => break,
            Ok(PostOutcome::StopWithoutResponse) => {
                d.error = Some((m.name(), "stopped without a response".into()));
                return d;
            }
            Err(e) => {
                d.error = Some((m.name(), e.to_string()));
                return d;
            }
        }
    }
    let kept = refs(&copy);
    d.reveal = original
        .iter()
        .filter(|r| !live_kept.contains(*r) && kept.contains(*r))
        .cloned()
        .collect();
    d
}

/// Counts and logs the differences.
pub fn record(route: &str, correlation_id: &str, d: &Differences) {
    for (module, ids) in &d.withhold {
        metrics::shadow(route, module, "withhold", ids.len() as u64);
        info!(
            "shadow {route}: {module} would withhold {} entries the live chain kept: {} (correlation id {correlation_id})",
            ids.len(),
            ids.join(", ")
        );
    }
    if !d.reveal.is_empty() {
        metrics::shadow(route, "*", "reveal", d.reveal.len() as u64);
        info!(
            "shadow {route}: the candidate chain would keep {} entries the live chain withheld: {} (correlation id {correlation_id})",
            d.reveal.len(),
            d.reveal.join(", ")
        );
    }
    if let Some((module, e)) = &d.error {
        metrics::shadow(route, module, "error", 1);
        info!(
            "shadow {route}: {module} failed (not answered): {e} (correlation id {correlation_id})"
        );
    }
}

/// Starts the candidate chain on a copy of the answer; the live answer (`live`) is only read
/// for which entries it kept. Returns at once.
pub fn spawn(
    route: &str,
    modules: Vec<Arc<dyn PostProcess>>,
    req: &Request,
    copy: Response,
    live: &Response,
    cx: &Context,
) {
    let live_kept = refs(live);
    let (route, req, cx) = (route.to_string(), req.clone(), cx.clone());
    tokio::spawn(async move {
        let d = evaluate(&modules, &req, copy, &live_kept, &cx).await;
        record(&route, &cx.correlation_id, &d);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use fhir_gateway_modules::processor::{Body, ModuleError};
    use serde_json::{json, Value};

    /// Removes the Observations whose id is listed; fails when told to.
    struct Drop(&'static str, Vec<&'static str>, bool);

    #[async_trait]
    impl PostProcess for Drop {
        fn name(&self) -> &'static str {
            self.0
        }
        async fn process(
            &self,
            _req: &Request,
            resp: &mut Response,
            _cx: &Context,
        ) -> Result<PostOutcome, ModuleError> {
            if self.2 {
                return Err(ModuleError::Unavailable("lookup down".into()));
            }
            if let Body::Json(b) = &mut resp.body {
                let e = b["entry"].as_array_mut().unwrap();
                e.retain(|e| !self.1.contains(&e["resource"]["id"].as_str().unwrap_or("")));
            }
            Ok(PostOutcome::Continue)
        }
    }

    fn answer(ids: &[&str]) -> Response {
        Response::json(
            200,
            json!({"resourceType": "Bundle", "type": "searchset", "entry": ids.iter().map(|i|
                json!({"resource": {"resourceType": "Observation", "id": i}})).collect::<Vec<Value>>()}),
        )
    }

    fn req() -> Request {
        Request {
            method: "GET".into(),
            path: "/Observation".into(),
            query: String::new(),
            headers: vec![],
            body: None,
        }
    }

    #[tokio::test]
    async fn both_directions_are_told_apart_by_module() {
        let cx = crate::chain::tests::cx();
        // Live kept 1, 2, 3 of 1..4 (withheld 4).
        let live: BTreeSet<String> = ["1", "2", "3"]
            .iter()
            .map(|i| format!("Observation/{i}"))
            .collect();
        let chain: Vec<Arc<dyn PostProcess>> = vec![
            Arc::new(Drop("A", vec!["2"], false)),
            Arc::new(Drop("B", vec!["3"], false)),
        ];
        let d = evaluate(&chain, &req(), answer(&["1", "2", "3", "4"]), &live, &cx).await;
        assert_eq!(
            d.withhold,
            vec![
                ("A", vec!["Observation/2".to_string()]),
                ("B", vec!["Observation/3".to_string()])
            ]
        );
        assert_eq!(d.reveal, vec!["Observation/4".to_string()]);
        assert_eq!(d.error, None);
    }

    #[tokio::test]
    async fn a_failing_candidate_is_an_error_not_an_answer() {
        let cx = crate::chain::tests::cx();
        let live: BTreeSet<String> = BTreeSet::from(["Observation/1".to_string()]);
        let chain: Vec<Arc<dyn PostProcess>> = vec![Arc::new(Drop("A", vec![], true))];
        let d = evaluate(&chain, &req(), answer(&["1"]), &live, &cx).await;
        assert_eq!(d.error, Some(("A", "lookup down".to_string())));
        assert!(d.withhold.is_empty() && d.reveal.is_empty());
    }
}
