//! ResponseHeaders — sets and removes response headers, e.g. `Cache-Control: no-store` so no
//! browser or shared cache keeps patient data. It reads and changes headers only
//! (`BodyAccess::Headers`): on a route where nothing else needs the body the answer still
//! streams, and the module runs on the response head.
//!
//! Settings: `set` (name → value, replacing any value the server sent) and `remove` (names);
//! at least one. Names the gateway owns are refused at start: the framing (`Content-Length`,
//! `Transfer-Encoding`, hop-by-hop), what the body's rewriting and filtering rely on
//! (`Content-Type`, `Content-Encoding`, `ETag`, `Location`, `Content-Location`) and the
//! correlation id.

use crate::processor::{
    BodyAccess, Context, ModuleError, PostOutcome, PostProcess, Request, Response,
};
use crate::Identity;
use async_trait::async_trait;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Headers this module may not touch (lower case).
const OWNED: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "content-type",
    "content-encoding",
    "etag",
    "location",
    "content-location",
    "x-request-id",
];

pub struct ResponseHeaders {
    /// Lower-case name and value.
    set: Vec<(String, String)>,
    remove: Vec<String>,
}

/// RFC 9110 §5.6.2 `token`.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Visible ASCII, spaces and tabs inside (no CR/LF: no header injection from the config).
fn valid_value(v: &str) -> bool {
    v.len() <= 4096 && v == v.trim() && v.bytes().all(|b| (0x20..0x7f).contains(&b) || b == b'\t')
}

impl ResponseHeaders {
    pub const NAME: &'static str = "ResponseHeaders";

    pub fn new(s: Settings) -> Result<Self, String> {
        if s.set.is_empty() && s.remove.is_empty() {
            return Err("set or remove at least one header".into());
        }
        let check = |n: &str| {
            let l = n.to_ascii_lowercase();
            if !valid_name(n) {
                return Err(format!("{n:?} is not a header name"));
            }
            if OWNED.contains(&l.as_str()) {
                return Err(format!("{n} is the gateway's own and cannot be changed"));
            }
            Ok(l)
        };
        let mut set = Vec::new();
        for (n, v) in &s.set {
            let l = check(n)?;
            if !valid_value(v) {
                return Err(format!(
                    "the value of {n} must be visible ASCII on one line"
                ));
            }
            set.push((l, v.clone()));
        }
        let mut remove = Vec::new();
        for n in &s.remove {
            let l = check(n)?;
            if set.iter().any(|(k, _)| *k == l) {
                return Err(format!("{n} is both set and removed"));
            }
            remove.push(l);
        }
        Ok(ResponseHeaders { set, remove })
    }
}

#[async_trait]
impl PostProcess for ResponseHeaders {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn applies(&self, _req: &Request, _caller: Option<&Identity>) -> bool {
        true
    }

    fn reads(&self) -> BodyAccess {
        BodyAccess::Headers
    }

    async fn process(
        &self,
        _req: &Request,
        resp: &mut Response,
        _cx: &Context,
    ) -> Result<PostOutcome, ModuleError> {
        resp.headers.retain(|(k, _)| {
            let k = k.to_ascii_lowercase();
            !self.remove.contains(&k) && !self.set.iter().any(|(s, _)| *s == k)
        });
        resp.headers.extend(self.set.iter().cloned());
        Ok(PostOutcome::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::processor::Body;
    use crate::testing::context;
    use serde_json::json;

    fn module(s: serde_json::Value) -> Result<ResponseHeaders, String> {
        crate::registry::configure(ResponseHeaders::NAME, &s, ResponseHeaders::new)
    }

    #[tokio::test]
    async fn sets_replaces_and_removes_and_leaves_the_rest() {
        let m = module(
            json!({"set": {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
                              "remove": ["X-Powered-By"]}),
        )
        .unwrap();
        let req = Request {
            method: "GET".into(),
            path: "/Patient/1".into(),
            query: String::new(),
            headers: vec![],
            body: None,
        };
        let mut r = Response {
            status: 200,
            headers: vec![
                ("Content-Type".into(), "application/fhir+json".into()),
                ("cache-control".into(), "max-age=600".into()),
                ("X-Powered-By".into(), "HAPI".into()),
                ("ETag".into(), "W/\"2\"".into()),
            ],
            body: Body::None,
        };
        m.process(&req, &mut r, &context()).await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            r.headers,
            vec![
                (
                    "Content-Type".to_string(),
                    "application/fhir+json".to_string()
                ),
                ("ETag".into(), "W/\"2\"".into()),
                ("cache-control".into(), "no-store".into()),
                ("x-content-type-options".into(), "nosniff".into()),
            ]
        );
        assert_eq!(m.reads(), BodyAccess::Headers);
    }

    #[test]
    fn refuses_what_the_gateway_owns_and_bad_headers() {
        for bad in [
            json!({}),
            json!({"set": {"Content-Length": "1"}}),
            json!({"set": {"transfer-encoding": "chunked"}}),
            json!({"remove": ["ETag"]}),
            json!({"remove": ["X-Request-Id"]}),
            json!({"set": {"Content-Type": "text/plain"}}),
            json!({"set": {"X-A": "a\r\nX-Evil: 1"}}),
            json!({"set": {"Bad Name": "1"}}),
            json!({"set": {"X-A": "1"}, "remove": ["x-a"]}),
            json!({"set": {"X-A": "é"}}),
            json!({"sett": {"X-A": "1"}}),
        ] {
            assert!(module(bad.clone()).is_err(), "{bad}");
        }
        assert!(module(json!({"set": {"Cache-Control": "no-store, private"}})).is_ok());
    }
}
