//! SamplePostProcess — the smallest useful post-processor, and the template for custom ones
//! (see docs/modules.md): tags every returned resource (`meta.tag`), working on the response
//! tree the gateway parsed once.
//!
//! Settings: `system` and `code` of the tag (both required).

use crate::processor::{Context, ModuleError, PostOutcome, PostProcess, Request, Response};
use crate::Identity;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub system: String,
    pub code: String,
}

pub struct SamplePostProcess {
    tag: Value,
}

impl SamplePostProcess {
    pub const NAME: &'static str = "SamplePostProcess";

    pub fn new(s: Settings) -> Result<Self, String> {
        if s.system.is_empty() || s.code.is_empty() {
            return Err("system and code must be non-empty".into());
        }
        Ok(SamplePostProcess {
            tag: json!({"system": s.system, "code": s.code}),
        })
    }

    fn tag(&self, resource: &mut Value) {
        let Some(obj) = resource.as_object_mut() else {
            return;
        };
        let meta = obj.entry("meta").or_insert_with(|| json!({}));
        if let Some(m) = meta.as_object_mut() {
            let tags = m.entry("tag").or_insert_with(|| json!([]));
            if let Some(t) = tags.as_array_mut() {
                if !t.contains(&self.tag) {
                    t.push(self.tag.clone());
                }
            }
        }
    }
}

#[async_trait]
impl PostProcess for SamplePostProcess {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn applies(&self, req: &Request, _caller: Option<&Identity>) -> bool {
        req.method == "GET" || req.method == "POST"
    }

    async fn process(
        &self,
        _req: &Request,
        resp: &mut Response,
        _cx: &Context,
    ) -> Result<PostOutcome, ModuleError> {
        if !(200..300).contains(&resp.status) {
            return Ok(PostOutcome::Continue);
        }
        let Some(body) = resp.json_body_mut() else {
            return Ok(PostOutcome::Continue);
        };
        if body.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
            if let Some(entries) = body.get_mut("entry").and_then(Value::as_array_mut) {
                for e in entries {
                    if let Some(r) = e.get_mut("resource") {
                        self.tag(r);
                    }
                }
            }
        } else if body.get("resourceType").is_some() {
            self.tag(body);
        }
        Ok(PostOutcome::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::context;

    #[tokio::test]
    async fn tags_resources_and_bundle_entries_once() {
        let m = SamplePostProcess::new(Settings {
            system: "urn:s".into(),
            code: "c".into(),
        })
        .unwrap();
        let req = Request {
            method: "GET".into(),
            path: "/Patient".into(),
            query: String::new(),
            headers: vec![],
            body: None,
        };
        let mut r = Response::json(
            200,
            json!({"resourceType":"Bundle","entry":[{"resource":{"resourceType":"Patient"}},{"resource":{"resourceType":"Patient","meta":{"tag":[{"system":"urn:s","code":"c"}]}}}]}),
        );
        m.process(&req, &mut r, &context()).await.unwrap();
        let b = r.json_body().unwrap();
        assert_eq!(b["entry"][0]["resource"]["meta"]["tag"][0]["code"], "c");
        assert_eq!(
            b["entry"][1]["resource"]["meta"]["tag"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        let mut err = Response::outcome(404, "not-found", "x");
        m.process(&req, &mut err, &context()).await.unwrap();
        assert!(
            err.json_body().unwrap().get("meta").is_none(),
            "errors untouched"
        );
    }
}
