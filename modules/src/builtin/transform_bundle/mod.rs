//! TransformBundle (pre) — for FHIR servers without transactions: a `transaction` Bundle POSTed
//! to the base becomes a `batch` the server can run, with the transaction's references kept.
//!
//! `mode` decides when: `auto` (the default) converts only when the server's CapabilityStatement
//! does not list the `transaction` interaction (read on first use, then every
//! `capability_ttl_secs`; a server whose statement cannot be read gets the transaction as sent:
//! it runs it or refuses it whole, never half); `always` converts; `never` does not.
//!
//! Converting:
//! 1. Conditional entries (`ifNoneExist` creates, conditional PUT URLs) are resolved by
//!    searching the server: more than one match → 412 naming the entry, nothing written; one
//!    match → the entry targets the existing resource and references to its `fullUrl` follow;
//!    none → unchanged.
//! 2. `type` becomes `batch`. A create (POST) with a `urn:uuid:` fullUrl stays a create: it
//!    becomes `PUT <Type>/<fresh id>`, the id a new random UUID, never the client's UUID or
//!    `resource.id` (a reused or guessed UUID would otherwise overwrite an existing resource).
//!    A PUT with a `urn:uuid:` fullUrl keeps its id (resource.id or the UUID).
//! 3. Every `reference` pointing at a `urn:uuid:` of the bundle becomes `<Type>/<id>`.
//!
//! 4. Atomicity (`atomic.rs`): every resource may appear once; each update, patch and delete
//!    is pinned to the version it found (`ifMatch`), read just before. The answer is the
//!    transaction's: all entries succeeded → a `transaction-response` with the server's own
//!    statuses; one failed → the gateway undoes what the others wrote (deletes what they
//!    created, restores by version what they updated or deleted) and answers the failing
//!    entry's 4xx with an OperationOutcome naming it. A server that keeps no versions of a
//!    type (no `vread`) cannot have updates of it undone: such a transaction is refused.
//!    Limits: a writer between the pin and the undo (the undo is itself pinned and reports
//!    what it could not restore, 500); a restored resource has a new version, and history
//!    shows the undone one.
//!
//! A malformed bundle (bad JSON, an entry without `request`) is a 400 in every mode; nothing is
//! sent upstream.
//!
//! Settings: `mode` (`auto`), `capability_ttl_secs` (300), `conditional_put` (use
//! `<Type>?_id=<id>`; default false).

mod atomic;

use crate::processor::{Context, ModuleError, PreOutcome, PreProcess, Request, Response};
use crate::Identity;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// When a transaction is turned into a batch.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Only when the server does not run transactions itself.
    #[default]
    Auto,
    Always,
    Never,
}

fn default_ttl() -> u64 {
    300
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub conditional_put: bool,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_ttl")]
    pub capability_ttl_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            conditional_put: false,
            mode: Mode::Auto,
            capability_ttl_secs: default_ttl(),
        }
    }
}

pub struct TransformBundle {
    conditional_put: bool,
    mode: Mode,
    ttl: Duration,
    /// What the server's CapabilityStatement says, and when that was read.
    caps: Mutex<Option<(Instant, Arc<Caps>)>>,
}

/// What the gateway needs to know of the server's CapabilityStatement.
#[derive(Debug, Default)]
pub(crate) struct Caps {
    pub transaction: bool,
    /// Types it lists without `vread`: their updates cannot be undone.
    pub no_vread: BTreeSet<String>,
}

impl TransformBundle {
    pub const NAME: &'static str = "TransformBundle";

    pub fn new(s: Settings) -> Result<Self, String> {
        if !(1..=86_400).contains(&s.capability_ttl_secs) {
            return Err("capability_ttl_secs must be 1..=86400".into());
        }
        Ok(TransformBundle {
            conditional_put: s.conditional_put,
            mode: s.mode,
            ttl: Duration::from_secs(s.capability_ttl_secs),
            caps: Mutex::new(None),
        })
    }

    /// Whether this transaction is turned into a batch, with what is known of the server
    /// (nothing under `always`: updates are then undone if the server allows it).
    async fn converts(&self, cx: &Context) -> Option<Arc<Caps>> {
        match self.mode {
            Mode::Always => Some(Arc::new(Caps::default())),
            Mode::Never => None,
            Mode::Auto => self.caps(cx).await.filter(|c| !c.transaction),
        }
    }

    /// From the server's CapabilityStatement, cached for `ttl`. Unreadable: `None` (the
    /// transaction goes as sent: the server runs it or refuses it whole), not cached.
    async fn caps(&self, cx: &Context) -> Option<Arc<Caps>> {
        if let Some((at, caps)) = &*self.caps.lock().unwrap() {
            if at.elapsed() < self.ttl {
                return Some(caps.clone());
            }
        }
        let caps = match cx.fhir.get_json("metadata").await {
            Ok((200, cs)) => Arc::new(read_caps(&cs)),
            _ => return None,
        };
        *self.caps.lock().unwrap() = Some((Instant::now(), caps.clone()));
        Some(caps)
    }
}

fn codes(v: Option<&Value>) -> impl Iterator<Item = &str> {
    v.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("code").and_then(Value::as_str))
}

/// The system `transaction` interaction, and the types listed without `vread`.
fn read_caps(cs: &Value) -> Caps {
    let mut caps = Caps::default();
    for rest in cs
        .get("rest")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        caps.transaction |= codes(rest.get("interaction")).any(|c| c == "transaction");
        for r in rest
            .get("resource")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(t) = r.get("type").and_then(Value::as_str) {
                if !codes(r.get("interaction")).any(|c| c == "vread") {
                    caps.no_vread.insert(t.to_string());
                }
            }
        }
    }
    caps
}

fn bad(msg: impl Into<String>) -> PreOutcome {
    PreOutcome::Stop(Response::outcome(400, "invalid", msg))
}

fn is_type(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|c| c.is_ascii_uppercase()) && c.all(|c| c.is_ascii_alphanumeric())
}

/// Replaces every `"reference": "<urn>"` found in `refs`, anywhere in the tree.
fn rewrite_references(v: &mut Value, refs: &HashMap<String, String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                match child {
                    Value::String(s) if k == "reference" => {
                        if let Some(new) = refs.get(s.as_str()) {
                            *s = new.clone();
                        }
                    }
                    // Also a `reference` that is itself a Reference (Consent.provision.data).
                    _ => rewrite_references(child, refs),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| rewrite_references(c, refs)),
        _ => {}
    }
}

#[async_trait]
impl PreProcess for TransformBundle {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn needs_body(&self) -> bool {
        true
    }

    fn applies(&self, req: &Request, _caller: Option<&Identity>) -> bool {
        req.method == "POST" && req.path.trim_matches('/').is_empty()
    }

    fn finishes(&self) -> bool {
        self.mode != Mode::Never
    }

    async fn finish(
        &self,
        original: &Request,
        sent: &Request,
        resp: &mut Response,
        cx: &Context,
    ) -> Result<(), ModuleError> {
        atomic::finish(original, sent, resp, cx).await
    }

    async fn process(&self, req: &mut Request, cx: &Context) -> Result<PreOutcome, ModuleError> {
        let mut bundle: Value = match req.json() {
            None => return Ok(bad("a transaction needs a Bundle body")),
            Some(Err(e)) => return Ok(bad(format!("Bundle: {e}"))),
            Some(Ok(v)) => v,
        };
        if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return Ok(bad("POST to the base must carry a Bundle"));
        }
        if bundle.get("type").and_then(Value::as_str) != Some("transaction") {
            return Ok(PreOutcome::Continue); // batches pass as they are
        }
        let entries = match bundle.get("entry") {
            None => Vec::new(),
            Some(Value::Array(a)) => a.clone(),
            Some(_) => return Ok(bad("Bundle.entry must be an array")),
        };
        // Validate every entry before anything else: a malformed one means no call at all.
        for (i, e) in entries.iter().enumerate() {
            let Some(r) = e.get("request") else {
                return Ok(bad(format!("entry {i} has no request")));
            };
            let m = r.get("method").and_then(Value::as_str).unwrap_or("");
            if !matches!(m, "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE") {
                return Ok(bad(format!("entry {i}: request.method {m:?} is not valid")));
            }
            if r.get("url")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                return Ok(bad(format!("entry {i}: request.url missing")));
            }
            if matches!(m, "POST" | "PUT") {
                let url_type = r["url"]
                    .as_str()
                    .unwrap_or("")
                    .split(['/', '?'])
                    .next()
                    .unwrap_or("");
                match e
                    .get("resource")
                    .and_then(|r| r.get("resourceType"))
                    .and_then(Value::as_str)
                {
                    // The entry's URL is what was authorised: its resource must be of that type.
                    Some(t) if is_type(t) && t == url_type => {}
                    Some(t) if is_type(t) => {
                        return Ok(bad(format!("entry {i}: a {t} sent to {url_type:?}")));
                    }
                    _ => {
                        return Ok(bad(format!(
                            "entry {i}: {m} needs a resource with a resourceType"
                        )))
                    }
                }
            }
        }

        let Some(caps) = self.converts(cx).await else {
            return Ok(PreOutcome::Continue);
        };
        // Ids this module made up: nothing can exist there, nothing to pin.
        let mut fresh = HashSet::new();
        let mut out = Vec::with_capacity(entries.len());
        // fullUrl (urn:uuid:...) → Type/id, for step 3.
        let mut refs: HashMap<String, String> = HashMap::new();
        for (i, mut e) in entries.into_iter().enumerate() {
            let full_url = e.get("fullUrl").and_then(Value::as_str).map(str::to_string);
            let method = e["request"]["method"].as_str().unwrap_or("").to_string();
            let url = e["request"]["url"].as_str().unwrap_or("").to_string();
            let rtype = e
                .get("resource")
                .and_then(|r| r.get("resourceType"))
                .and_then(Value::as_str)
                .map(str::to_string);

            // Step 1: conditional entries.
            let condition = match (method.as_str(), &rtype) {
                ("POST", Some(t)) => e["request"]
                    .get("ifNoneExist")
                    .and_then(Value::as_str)
                    .map(|q| format!("{t}?{q}")),
                ("PUT", Some(_)) if url.contains('?') => Some(url.clone()),
                _ => None,
            };
            if let Some(search) = condition {
                let (status, found) = cx.fhir.get_json(&search).await?;
                if !(200..300).contains(&status) {
                    return Ok(PreOutcome::Stop(Response::outcome(
                        400,
                        "invalid",
                        format!("entry {i}: the condition {search:?} could not be searched (status {status})"),
                    )));
                }
                let ids: Vec<String> = found
                    .get("entry")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter(|x| {
                                x.get("search")
                                    .and_then(|s| s.get("mode"))
                                    .and_then(Value::as_str)
                                    .unwrap_or("match")
                                    == "match"
                            })
                            .filter_map(|x| {
                                x.get("resource")
                                    .and_then(|r| r.get("id"))
                                    .and_then(Value::as_str)
                            })
                            .map(str::to_string)
                            .collect()
                    })
                    .unwrap_or_default();
                let total = found
                    .get("total")
                    .and_then(Value::as_u64)
                    .unwrap_or(ids.len() as u64);
                if total > 1 || ids.len() > 1 {
                    return Ok(PreOutcome::Stop(Response::outcome(
                        412,
                        "multiple-matches",
                        format!("entry {i}: the condition {search:?} matches more than one resource; nothing was written"),
                    )));
                }
                if let (Some(id), Some(t)) = (ids.first(), &rtype) {
                    let target = format!("{t}/{id}");
                    if let Some(f) = &full_url {
                        refs.insert(f.clone(), target.clone());
                    }
                    if method == "POST" {
                        // Conditional create that matched: nothing to create; reading the
                        // match keeps the response entry at the same index.
                        e["request"] = json!({"method": "GET", "url": target});
                        if let Some(o) = e.as_object_mut() {
                            o.shift_remove("resource");
                        }
                    } else {
                        e["request"] = json!({"method": "PUT", "url": target});
                        e["resource"]["id"] = json!(id);
                    }
                    out.push(e);
                    continue;
                }
            }

            // Step 2: urn:uuid entries with a resource become PUTs with a known id.
            if let (Some(f), Some(t)) = (&full_url, &rtype) {
                if let Some(uuid) = f.strip_prefix("urn:uuid:") {
                    if method == "POST" || (method == "PUT" && !url.contains('?')) {
                        // A create gets a fresh id: the client's UUID (or resource.id) may
                        // name a resource that exists, and a PUT to it would overwrite it.
                        let id = if method == "POST" {
                            let id = uuid::Uuid::new_v4().to_string();
                            fresh.insert(format!("{t}/{id}"));
                            id
                        } else {
                            e["resource"]
                                .get("id")
                                .and_then(Value::as_str)
                                .map(str::to_string)
                                .unwrap_or_else(|| uuid.to_string())
                        };
                        if !crate::identity::valid_id(&id) {
                            return Ok(bad(format!("entry {i}: {id:?} is not a valid FHIR id")));
                        }
                        e["resource"]["id"] = json!(id);
                        let put_url = if self.conditional_put {
                            format!("{t}?_id={id}")
                        } else {
                            format!("{t}/{id}")
                        };
                        e["request"] = json!({"method": "PUT", "url": put_url});
                        refs.insert(f.clone(), format!("{t}/{id}"));
                    }
                }
            }
            out.push(e);
        }

        // Step 4: all or nothing.
        if let Some(refused) = atomic::pin(&mut out, &fresh, &caps, cx).await? {
            return Ok(PreOutcome::Stop(refused));
        }
        // Step 3: references between entries.
        let mut out = Value::Array(out);
        rewrite_references(&mut out, &refs);
        bundle["entry"] = out;
        bundle["type"] = json!("batch");
        req.body =
            Some(serde_json::to_vec(&bundle).map_err(|e| ModuleError::Failed(e.to_string()))?);
        Ok(PreOutcome::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{context_with, ScriptedClient};

    fn req(body: Value) -> Request {
        Request {
            method: "POST".into(),
            path: "".into(),
            query: String::new(),
            headers: vec![],
            body: Some(serde_json::to_vec(&body).unwrap()),
        }
    }

    fn always() -> TransformBundle {
        TransformBundle::new(Settings {
            mode: Mode::Always,
            ..Settings::default()
        })
        .unwrap()
    }

    fn tx(entries: Value) -> Value {
        json!({"resourceType":"Bundle","type":"transaction","entry":entries})
    }

    #[tokio::test]
    async fn urn_uuid_entries_become_puts_and_references_follow() {
        let m = always();
        let mut r = req(tx(json!([
            {"fullUrl":"urn:uuid:aaaaaaaa-0000-0000-0000-000000000001","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}},
            {"fullUrl":"urn:uuid:bbbbbbbb-0000-0000-0000-000000000002","resource":{"resourceType":"Observation","subject":{"reference":"urn:uuid:aaaaaaaa-0000-0000-0000-000000000001"},"hasMember":[{"reference":"urn:uuid:unknown"}]},"request":{"method":"POST","url":"Observation"}},
            {"request":{"method":"DELETE","url":"Patient/old"}},
            // A Reference under a key named `reference` (found by the bundle_transform fuzzer).
            {"resource":{"resourceType":"Consent","provision":{"data":[{"meaning":"instance","reference":{"reference":"urn:uuid:aaaaaaaa-0000-0000-0000-000000000001"}}]}},"request":{"method":"POST","url":"Consent"}}
        ])));
        let old = json!({"resourceType":"Patient","id":"old","meta":{"versionId":"3"}});
        let (cx, client) = context_with(ScriptedClient::by_url(vec![("Patient/old", 200, old)]));
        assert!(matches!(
            m.process(&mut r, &cx).await.unwrap(),
            PreOutcome::Continue
        ));
        // Only the delete's target is read (to pin it): the fresh ids name nothing.
        assert_eq!(client.calls(), ["GET Patient/old"]);
        let b: Value = serde_json::from_slice(r.body.as_ref().unwrap()).unwrap();
        assert_eq!(b["type"], "batch");
        assert_eq!(b["entry"][2]["request"]["ifMatch"], "W/\"3\"");
        // The create stays a create: a fresh id, not the client's UUID.
        let id = b["entry"][0]["resource"]["id"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        assert_ne!(id, "aaaaaaaa-0000-0000-0000-000000000001");
        assert_eq!(b["entry"][0]["request"]["url"], format!("Patient/{id}"));
        assert_eq!(b["entry"][0]["request"]["method"], "PUT");
        assert_eq!(
            b["entry"][1]["resource"]["subject"]["reference"],
            format!("Patient/{id}")
        );
        assert_eq!(
            b["entry"][1]["resource"]["hasMember"][0]["reference"],
            "urn:uuid:unknown"
        );
        assert_eq!(b["entry"][2]["request"]["method"], "DELETE");
        assert_eq!(
            b["entry"][3]["resource"]["provision"]["data"][0]["reference"]["reference"],
            format!("Patient/{id}")
        );
        // Another transaction reusing the same UUID creates another resource.
        let mut again = req(tx(json!([
            {"fullUrl":"urn:uuid:aaaaaaaa-0000-0000-0000-000000000001","resource":{"resourceType":"Patient","id":"victim"},"request":{"method":"POST","url":"Patient"}}
        ])));
        m.process(&mut again, &cx).await.unwrap();
        let b: Value = serde_json::from_slice(again.body.as_ref().unwrap()).unwrap();
        let other = b["entry"][0]["resource"]["id"].as_str().unwrap();
        assert_ne!(other, id);
        assert_ne!(other, "victim", "a create never takes the client's id");
    }

    #[tokio::test]
    async fn auto_converts_only_for_servers_without_transactions_and_caches_what_it_read() {
        let m = TransformBundle::new(Settings::default()).unwrap();
        let body = tx(json!([
            {"fullUrl":"urn:uuid:aaaaaaaa-0000-0000-0000-000000000001","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient"}}
        ]));
        let runs = json!({"resourceType":"CapabilityStatement","rest":[{"mode":"server","interaction":[{"code":"batch"},{"code":"transaction"}]}]});
        let (cx, client) = context_with(ScriptedClient::new(vec![(200, runs)]));
        for _ in 0..2 {
            let mut r = req(body.clone());
            m.process(&mut r, &cx).await.unwrap();
            let b: Value = serde_json::from_slice(r.body.as_ref().unwrap()).unwrap();
            assert_eq!(b["type"], "transaction", "passed as sent");
        }
        assert_eq!(
            client.calls(),
            vec!["GET metadata".to_string()],
            "read once"
        );

        let m = TransformBundle::new(Settings::default()).unwrap();
        let batch_only = json!({"resourceType":"CapabilityStatement","rest":[{"mode":"server","interaction":[{"code":"batch"}]}]});
        let (cx, _) = context_with(ScriptedClient::new(vec![(200, batch_only)]));
        let mut r = req(body.clone());
        m.process(&mut r, &cx).await.unwrap();
        let b: Value = serde_json::from_slice(r.body.as_ref().unwrap()).unwrap();
        assert_eq!(b["type"], "batch");

        // Unreadable: the server gets the transaction as sent (it runs it or refuses it whole).
        let m = TransformBundle::new(Settings::default()).unwrap();
        let (cx, _) = context_with(ScriptedClient::new(vec![(503, json!({}))]));
        let mut r = req(body.clone());
        m.process(&mut r, &cx).await.unwrap();
        let b: Value = serde_json::from_slice(r.body.as_ref().unwrap()).unwrap();
        assert_eq!(b["type"], "transaction");

        let never = TransformBundle::new(Settings {
            mode: Mode::Never,
            ..Settings::default()
        })
        .unwrap();
        let (cx, client) = context_with(ScriptedClient::new(vec![]));
        let mut r = req(body);
        never.process(&mut r, &cx).await.unwrap();
        assert!(client.calls().is_empty());
        assert!(TransformBundle::new(Settings {
            capability_ttl_secs: 0,
            ..Settings::default()
        })
        .is_err());
    }

    #[tokio::test]
    async fn conditional_create_matching_twice_is_412_and_once_reuses() {
        let m = always();
        let two = json!({"resourceType":"Bundle","total":2,"entry":[{"resource":{"id":"a"}},{"resource":{"id":"b"}}]});
        let mut r = req(tx(json!([
            {"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient","ifNoneExist":"identifier=x|1"}}
        ])));
        let (cx, client) = context_with(ScriptedClient::new(vec![(200, two)]));
        match m.process(&mut r, &cx).await.unwrap() {
            PreOutcome::Stop(resp) => {
                assert_eq!(resp.status, 412);
                assert!(resp.json_body().unwrap()["issue"][0]["diagnostics"]
                    .as_str()
                    .unwrap()
                    .contains("entry 0"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            client.calls(),
            vec!["GET Patient?identifier=x|1".to_string()]
        );

        let one = json!({"resourceType":"Bundle","total":1,"entry":[{"resource":{"resourceType":"Patient","id":"p9"}}]});
        let mut r = req(tx(json!([
            {"fullUrl":"urn:uuid:1","resource":{"resourceType":"Patient"},"request":{"method":"POST","url":"Patient","ifNoneExist":"identifier=x|1"}},
            {"resource":{"resourceType":"Observation","subject":{"reference":"urn:uuid:1"}},"request":{"method":"POST","url":"Observation"}}
        ])));
        let (cx, _) = context_with(ScriptedClient::new(vec![(200, one)]));
        assert!(matches!(
            m.process(&mut r, &cx).await.unwrap(),
            PreOutcome::Continue
        ));
        let b: Value = serde_json::from_slice(r.body.as_ref().unwrap()).unwrap();
        assert_eq!(
            b["entry"][0]["request"],
            json!({"method":"GET","url":"Patient/p9"})
        );
        assert_eq!(
            b["entry"][1]["resource"]["subject"]["reference"],
            "Patient/p9"
        );
    }

    #[tokio::test]
    async fn malformed_bundles_are_400_without_calls() {
        let m = TransformBundle::new(Settings::default()).unwrap();
        for body in [
            json!({"resourceType":"Bundle","type":"transaction","entry":[{"resource":{"resourceType":"Patient"}}]}),
            json!({"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"FETCH","url":"Patient"}}]}),
            json!({"resourceType":"Bundle","type":"transaction","entry":[{"request":{"method":"POST","url":"Patient"}}]}),
            json!({"resourceType":"Bundle","type":"transaction","entry":[{"resource":{"resourceType":"Patient"},"request":{"method":"PUT","url":"Observation?code=x"}}]}),
            json!({"resourceType":"Patient"}),
        ] {
            let mut r = req(body.clone());
            let (cx, client) = context_with(ScriptedClient::new(vec![]));
            match m.process(&mut r, &cx).await.unwrap() {
                PreOutcome::Stop(resp) => assert_eq!(resp.status, 400, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
            assert!(client.calls().is_empty());
        }
        let mut r = Request {
            body: Some(b"{not json".to_vec()),
            ..req(json!({}))
        };
        let (cx, _) = context_with(ScriptedClient::new(vec![]));
        assert!(
            matches!(m.process(&mut r, &cx).await.unwrap(), PreOutcome::Stop(x) if x.status == 400)
        );
    }
}
