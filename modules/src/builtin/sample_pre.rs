//! SamplePreProcess — the smallest useful pre-processor, and the template for custom ones
//! (see docs/modules.md): gives searches a page size when the caller set none, by rewriting
//! the query.
//!
//! Settings: `default_count` (1..=1000, default 50).

use crate::processor::{query_pairs, Context, ModuleError, PreOutcome, PreProcess, Request};
use crate::Identity;
use async_trait::async_trait;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default = "default_count")]
    pub default_count: u32,
}

fn default_count() -> u32 {
    50
}

pub struct SamplePreProcess {
    count: u32,
}

impl SamplePreProcess {
    pub const NAME: &'static str = "SamplePreProcess";

    pub fn new(s: Settings) -> Result<Self, String> {
        if !(1..=1000).contains(&s.default_count) {
            return Err("default_count must be 1..=1000".into());
        }
        Ok(SamplePreProcess {
            count: s.default_count,
        })
    }
}

/// `/Type` (a type-level search by GET).
fn is_type_search(req: &Request) -> bool {
    let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
    req.method == "GET"
        && segs.len() == 1
        && segs[0]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_uppercase())
}

#[async_trait]
impl PreProcess for SamplePreProcess {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn applies(&self, req: &Request, _caller: Option<&Identity>) -> bool {
        is_type_search(req) && !query_pairs(&req.query).any(|(k, _)| k == "_count")
    }

    async fn process(&self, req: &mut Request, _cx: &Context) -> Result<PreOutcome, ModuleError> {
        if !req.query.is_empty() {
            req.query.push('&');
        }
        req.query.push_str(&format!("_count={}", self.count));
        Ok(PreOutcome::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::context;

    fn req(method: &str, path: &str, query: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            headers: vec![],
            body: None,
        }
    }

    #[tokio::test]
    async fn adds_count_to_searches_without_one() {
        let m = SamplePreProcess::new(Settings { default_count: 7 }).unwrap();
        let mut r = req("GET", "/Observation", "code=x");
        assert!(m.applies(&r, None));
        m.process(&mut r, &context()).await.unwrap();
        assert_eq!(r.query, "code=x&_count=7");
        assert!(!m.applies(&req("GET", "/Observation", "_count=2"), None));
        assert!(!m.applies(&req("GET", "/Observation/1", ""), None));
        assert!(!m.applies(&req("POST", "/Observation", ""), None));
        assert!(SamplePreProcess::new(Settings { default_count: 0 }).is_err());
    }
}
