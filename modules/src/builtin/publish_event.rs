//! PublishFHIREvent (post, non-blocking): every successful write becomes an event.
//!
//! What is a write, and what it publishes (one event per written resource):
//!
//! | request | status | action |
//! |---|---|---|
//! | POST `/{Type}` (create) | 201 | `Created` (a conditional create answered 200 wrote nothing: no event) |
//! | PUT `/{Type}/{id}`, PUT `/{Type}?criteria` | 201 | `Created` (update-as-create) |
//! | PUT, PATCH (instance or conditional) | 200, 204 | `Updated` (PATCH 201 too) |
//! | DELETE `/{Type}/{id}`, DELETE `/{Type}?criteria` | 200, 204 | `Deleted` |
//! | POST a batch/transaction Bundle to the base | 200 | one event per entry of the `batch-response` / `transaction-response` whose `response.status` is 200, 201 or 204 and whose request was a write (same table) |
//!
//! Nothing else publishes: reads, searches (POST `_search` included), operations (`$...`),
//! history, non-2xx answers, and Bundle entries that failed or were reads. `applies()` looks at the
//! method and path only (no body needed), so reads keep streaming.
//!
//! Where the identity comes from, first found wins:
//! - type: the request path (or the Bundle entry's `request.url`); inferred entries (below) take it
//!   from the resource or the location;
//! - id: the path for instance requests (`/Patient/1`), else the returned resource (`id`), else
//!   `Location` (then `Content-Location`) — `<base>/Type/id/_history/v`, absolute (our public or
//!   the server's base; another base only when the type it shows is the one written) or relative;
//! - version: the returned resource's `meta.versionId`, else `ETag` (`W/"3"`), else the
//!   `_history/v` of the location;
//! - lastupdated: `meta.lastUpdated`, else `Last-Modified` (an HTTP date, turned into an instant)
//!   or the entry's `response.lastModified`, else the time the gateway saw the answer;
//! - `Prefer: return=minimal` (no body) and `return=OperationOutcome` therefore work through
//!   `Location`/`ETag`; a returned body of another type (an OperationOutcome) is ignored.
//!
//! A write whose id cannot be learned (a conditional delete answered 204 without `Location`,
//! or a server that says nothing) still publishes — with `"id": null` and `"criteria":
//! "Type?query"` when the request had criteria — so consumers (cache invalidation of other
//! gateway instances among them) learn that the type changed.
//!
//! Bundles: the response entries are paired with the request entries by position (FHIR R4
//! requires batch/transaction responses in request order) when the request body is there and has
//! as many entries — the gateway reads it whenever a post module applies, so this is the normal
//! case. Without it (or if the counts differ) the action is inferred from the response entry
//! alone: `201` → `Created`; `200` with a `location` → `Updated`; anything else is skipped (a
//! delete cannot be told from a read without the request, and has no identity in the response).
//!
//! Event JSON (the predecessor's fields, then ours; every field always present, `null` when
//! unknown):
//! `{"action":"Created|Updated|Deleted","resourcetype","id","version","lastupdated","source",
//! "tenant","user","correlationid","patient"}` (+ `"criteria"` only for unidentified
//! conditional writes). `source` is the `source` setting, else the route's public base; `user`
//! the caller's `oid`/`sub`; `patient` the compartment owner as `Patient/<id>`: a Patient is its
//! own; otherwise `compartment::owners()` of the written resource (the returned one, else the one
//! sent in a create/update, with `urn:uuid:` references of a transaction resolved through the
//! locations of the other entries); several owners → the first in sorted order (ids compare as
//! strings); none, or only unresolvable references → `null`. Deletes know the patient only for
//! Patient itself, or when the server returns the deleted resource (usually there is no body).
//!
//! Kafka key: the patient reference when known (one patient's events stay ordered), else
//! `<type>/<id>`, else `<type>`.
//!
//! With `cloudevents: true` each event is wrapped in a CloudEvents 1.0 structured envelope:
//! `{"specversion":"1.0","id":<unique>,"source","type":"<prefix>.created|updated|deleted",
//! "subject":"<type>/<id>","time":<lastupdated>,"datacontenttype":"application/json",
//! "data":<event>}`. The id is a random UUID-formatted value, not `<correlationid>-<n>`: the
//! correlation id may come from the caller and repeat, and consumers deduplicate on
//! (`source`, `id`). It is fixed when the event is made, so a redelivered event keeps its id.
//!
//! Publishing never changes the response and never fails it: `process` always continues.
//! `cx.events.publish` must not block (the gateway's sink queues).

use crate::compartment;
use crate::identity::valid_id;
use crate::processor::{Context, ModuleError, PostOutcome, PostProcess, Request, Response};
use crate::reference::{valid_type, Ref, Resolver};
use crate::request::{classify, Interaction};
use crate::Identity;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

fn default_prefix() -> String {
    "org.hl7.fhir.resource".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Wrap each event in a CloudEvents 1.0 envelope.
    #[serde(default)]
    pub cloudevents: bool,
    /// The event's `source` (and the CloudEvents `source`); default: the route's public base.
    #[serde(default)]
    pub source: Option<String>,
    /// CloudEvents `type` prefix; `.created`, `.updated` or `.deleted` is appended.
    #[serde(default = "default_prefix")]
    pub ce_type_prefix: String,
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Created,
    Updated,
    Deleted,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Created => "Created",
            Action::Updated => "Updated",
            Action::Deleted => "Deleted",
        }
    }

    fn ce_suffix(self) -> &'static str {
        match self {
            Action::Created => "created",
            Action::Updated => "updated",
            Action::Deleted => "deleted",
        }
    }
}

/// One written resource, as extracted from the exchange (before rendering).
#[derive(Clone, Debug, PartialEq)]
pub struct Write {
    pub action: Action,
    pub rtype: String,
    pub id: Option<String>,
    pub version: Option<String>,
    /// An instant (`2024-05-01T10:00:00Z`).
    pub last_updated: Option<String>,
    /// `Patient/<id>`.
    pub patient: Option<String>,
    /// `Type?query` of a conditional write whose id stayed unknown.
    pub criteria: Option<String>,
}

impl Write {
    /// The Kafka key: the patient, else `Type/id`, else `Type`.
    pub fn key(&self) -> String {
        if let Some(p) = &self.patient {
            return p.clone();
        }
        self.subject()
    }

    fn subject(&self) -> String {
        match &self.id {
            Some(id) => format!("{}/{}", self.rtype, id),
            None => self.rtype.clone(),
        }
    }
}

pub struct PublishFhirEvent {
    cloudevents: bool,
    source: Option<String>,
    ce_type_prefix: String,
}

impl PublishFhirEvent {
    pub const NAME: &'static str = "PublishFHIREvent";

    pub fn new(s: Settings) -> Result<Self, String> {
        if s.source.as_deref().is_some_and(|x| x.trim().is_empty()) {
            return Err("source must be non-empty when given".into());
        }
        let prefix = s.ce_type_prefix.trim_end_matches('.').to_string();
        if prefix.is_empty() {
            return Err("ce_type_prefix must be non-empty".into());
        }
        Ok(PublishFhirEvent {
            cloudevents: s.cloudevents,
            source: s.source,
            ce_type_prefix: prefix,
        })
    }

    /// The event's JSON (the predecessor's fields plus ours), in a CloudEvents envelope when
    /// configured: written straight as bytes, no tree (the spool stores them as they are).
    pub fn event_json(&self, w: &Write, cx: &Context) -> Vec<u8> {
        let source = self.source.as_deref().unwrap_or(&cx.public_base);
        let mut out = Vec::with_capacity(512);
        if self.cloudevents {
            out.extend_from_slice(br#"{"specversion":"1.0","id":"#);
            json_str(&mut out, &unique_id());
            out.extend_from_slice(br#","source":"#);
            json_str(&mut out, source);
            out.extend_from_slice(br#","type":"#);
            json_str(
                &mut out,
                &format!("{}.{}", self.ce_type_prefix, w.action.ce_suffix()),
            );
            out.extend_from_slice(br#","subject":"#);
            json_str(&mut out, &w.subject());
            if let Some(t) = &w.last_updated {
                out.extend_from_slice(br#","time":"#);
                json_str(&mut out, t);
            }
            out.extend_from_slice(br#","datacontenttype":"application/json","data":"#);
        }
        let identity = cx.identity.as_ref();
        out.extend_from_slice(br#"{"action":"#);
        json_str(&mut out, w.action.name());
        for (key, value) in [
            (&br#","resourcetype":"#[..], Some(w.rtype.as_str())),
            (br#","id":"#, w.id.as_deref()),
            (br#","version":"#, w.version.as_deref()),
            (br#","lastupdated":"#, w.last_updated.as_deref()),
            (br#","source":"#, Some(source)),
            (br#","tenant":"#, identity.and_then(|i| i.tenant.as_deref())),
            (br#","user":"#, identity.map(|i| i.user_id.as_str())),
            (br#","correlationid":"#, Some(cx.correlation_id.as_str())),
            (br#","patient":"#, w.patient.as_deref()),
        ] {
            out.extend_from_slice(key);
            match value {
                Some(v) => json_str(&mut out, v),
                None => out.extend_from_slice(b"null"),
            }
        }
        if let Some(c) = &w.criteria {
            out.extend_from_slice(br#","criteria":"#);
            json_str(&mut out, c);
        }
        out.push(b'}');
        if self.cloudevents {
            out.push(b'}');
        }
        out
    }
}

/// `s` as a JSON string, escaped.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[async_trait]
impl PostProcess for PublishFhirEvent {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn applies(&self, req: &Request, _caller: Option<&Identity>) -> bool {
        is_write(req)
    }

    fn reads(&self) -> crate::processor::BodyAccess {
        // Type, id, meta and the compartment references: all an event holds.
        crate::processor::BodyAccess::ReadOwners
    }

    async fn process(
        &self,
        req: &Request,
        resp: &mut Response,
        cx: &Context,
    ) -> Result<PostOutcome, ModuleError> {
        let bases = [cx.public_base.as_str(), cx.upstream_base.as_str()];
        for mut w in extract(req, resp, &bases) {
            if w.action == Action::Deleted && w.patient.is_none() {
                // A delete answers without the resource: its last version says whose it was,
                // so the event is keyed like the create and updates before it (one patient's
                // events stay in order on one partition).
                w.patient = deleted_owner(&w, &bases, cx).await;
            }
            let json = self.event_json(&w, cx);
            cx.events
                .publish_json(&w.key(), json, &cx.correlation_id)
                .await;
        }
        Ok(PostOutcome::Continue)
    }
}

/// The patient of a deleted resource, from its last version before the delete (best effort:
/// without it the event is keyed `Type/id`).
async fn deleted_owner(w: &Write, bases: &[&str], cx: &Context) -> Option<String> {
    let id = w.id.as_deref()?;
    crate::compartment::patient_paths(&w.rtype)?;
    let (status, h) = cx
        .fhir
        .get_json(&format!("{}/{id}/_history?_count=5", w.rtype))
        .await
        .ok()?;
    if status != 200 {
        return None;
    }
    let last = h
        .get("entry")?
        .as_array()?
        .iter()
        .find_map(|e| e.get("resource"))?;
    let resolver = crate::reference::Resolver::new(bases);
    let owners = crate::compartment::owners(last, &resolver);
    owners
        .patients
        .iter()
        .next()
        .map(|p| format!("Patient/{p}"))
}

/// A create, update, patch or delete on a type or instance, or a Bundle POSTed to the base —
/// decided on method and path alone.
pub fn is_write(req: &Request) -> bool {
    let m = req.method.to_ascii_uppercase();
    if !matches!(m.as_str(), "POST" | "PUT" | "PATCH" | "DELETE") {
        return false;
    }
    match classify(&m, &req.path, &req.query) {
        Ok(r) => matches!(
            r.interaction,
            Interaction::Create
                | Interaction::Update
                | Interaction::Patch
                | Interaction::Delete
                | Interaction::Bundle
        ),
        Err(_) => false,
    }
}

/// The action a successful answer to a single write means (`None`: nothing was written).
fn decide(interaction: &Interaction, status: u16) -> Option<Action> {
    match (interaction, status) {
        (Interaction::Create, 201) => Some(Action::Created),
        (Interaction::Update, 201) => Some(Action::Created),
        (Interaction::Update, 200 | 204) | (Interaction::Patch, 200 | 201 | 204) => {
            Some(Action::Updated)
        }
        (Interaction::Delete, 200 | 204) => Some(Action::Deleted),
        _ => None,
    }
}

/// Every write the exchange made. `bases`: the public and the server's FHIR base.
pub fn extract(req: &Request, resp: &Response, bases: &[&str]) -> Vec<Write> {
    if !(200..300).contains(&resp.status) {
        return Vec::new();
    }
    let Ok(r) = classify(&req.method, &req.path, &req.query) else {
        return Vec::new();
    };
    let resolver = Resolver::new(bases);
    if r.interaction == Interaction::Bundle {
        return from_bundle(req, resp, resolver);
    }
    let Some(action) = decide(&r.interaction, resp.status) else {
        return Vec::new();
    };
    let Some(rtype) = r.resource_type.as_deref() else {
        return Vec::new();
    };
    // The sent resource is parsed only if the answer does not carry the written one.
    let sent = matches!(r.interaction, Interaction::Create | Interaction::Update).then_some(req);
    let src = Sources {
        action,
        rtype: Some(rtype),
        path_id: r.id.as_deref(),
        criteria: (r.id.is_none() && !req.query.is_empty())
            .then(|| format!("{rtype}?{}", req.query)),
        resource: resp.json_body(),
        sent: Sent::Raw(sent),
        location: resp
            .header("location")
            .or_else(|| resp.header("content-location")),
        etag: resp.header("etag"),
        last_modified: resp.header("last-modified").and_then(http_date_to_instant),
    };
    build(src, &resolver).into_iter().collect()
}

/// What one written resource left behind.
struct Sources<'a> {
    action: Action,
    /// Known from the request; `None` for inferred Bundle entries.
    rtype: Option<&'a str>,
    path_id: Option<&'a str>,
    criteria: Option<String>,
    /// The returned body / the entry's `resource`.
    resource: Option<&'a Value>,
    /// The resource the caller sent (create/update), for the compartment owner.
    sent: Sent<'a>,
    location: Option<&'a str>,
    etag: Option<&'a str>,
    /// Already an instant.
    last_modified: Option<String>,
}

/// The resource a write sent: a Bundle entry's (parsed with the Bundle), or a request body,
/// parsed only when needed.
enum Sent<'a> {
    Parsed(Option<&'a Value>),
    Raw(Option<&'a Request>),
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_str()
}

fn build(s: Sources, resolver: &Resolver) -> Option<Write> {
    let returned_type = s
        .resource
        .and_then(|r| str_at(r, &["resourceType"]))
        .filter(|t| valid_type(t) && *t != "OperationOutcome");
    let location = s
        .location
        .and_then(|l| parse_location(l, resolver, s.rtype));
    let rtype = s
        .rtype
        .or(returned_type)
        .or(location.as_ref().map(|(r, _)| r.rtype.as_str()))?
        .to_string();
    // The returned body counts only when it is the written resource.
    let resource = s.resource.filter(|_| returned_type == Some(rtype.as_str()));
    let location = location.filter(|(r, _)| r.rtype == rtype);
    let id = s
        .path_id
        .map(str::to_string)
        .or_else(|| {
            resource
                .and_then(|r| str_at(r, &["id"]))
                .filter(|i| valid_id(i))
                .map(str::to_string)
        })
        .or_else(|| location.as_ref().map(|(r, _)| r.id.clone()));
    let version = resource
        .and_then(|r| str_at(r, &["meta", "versionId"]))
        .map(str::to_string)
        .or_else(|| s.etag.and_then(parse_etag))
        .or_else(|| location.as_ref().and_then(|(_, v)| v.clone()));
    let last_updated = resource
        .and_then(|r| str_at(r, &["meta", "lastUpdated"]))
        .map(str::to_string)
        .or(s.last_modified)
        .or_else(|| Some(now_instant()));
    let patient = if rtype == "Patient" {
        id.as_ref().map(|i| format!("Patient/{i}"))
    } else {
        let parsed;
        let sent = match (resource, s.sent) {
            (Some(_), _) => None,
            (None, Sent::Parsed(v)) => v,
            (None, Sent::Raw(r)) => {
                parsed = r.and_then(Request::json).and_then(Result::ok);
                parsed.as_ref()
            }
        };
        let sent = sent.filter(|v| str_at(v, &["resourceType"]) == Some(rtype.as_str()));
        resource
            .or(sent)
            .and_then(|r| compartment::owners(r, resolver).patients.into_iter().next())
            .map(|p| format!("Patient/{p}"))
    };
    let criteria = if id.is_none() { s.criteria } else { None };
    Some(Write {
        action: s.action,
        rtype,
        id,
        version,
        last_updated,
        patient,
        criteria,
    })
}

/// The leading status code of a Bundle entry's `response.status` (`"201 Created"` → 201).
fn entry_status(e: &Value) -> Option<u16> {
    let s = str_at(e, &["response", "status"])?.trim();
    let code = s.get(..3)?;
    if s.len() > 3 && !s[3..].starts_with(' ') {
        return None;
    }
    code.parse().ok()
}

/// The request entry's interaction, type, id and criteria (`request.url` relative, or absolute
/// under one of our bases).
fn entry_request(
    e: &Value,
    resolver: &Resolver,
) -> Option<(Interaction, String, Option<String>, String)> {
    let method = str_at(e, &["request", "method"])?;
    let url = str_at(e, &["request", "url"])?;
    let rel = if url.contains("://") {
        resolver.bases.iter().find_map(|b| {
            let b = b.trim_end_matches('/');
            (!b.is_empty())
                .then(|| url.strip_prefix(b).and_then(|r| r.strip_prefix('/')))
                .flatten()
        })?
    } else {
        url
    };
    let (path, query) = rel.split_once('?').unwrap_or((rel, ""));
    let path = format!("/{}", path.trim_start_matches('/'));
    let r = classify(method, &path, query).ok()?;
    Some((r.interaction, r.resource_type?, r.id, query.to_string()))
}

fn from_bundle(req: &Request, resp: &Response, mut resolver: Resolver) -> Vec<Write> {
    let Some(body) = resp.json_body() else {
        return Vec::new();
    };
    if str_at(body, &["resourceType"]) != Some("Bundle")
        || !matches!(
            str_at(body, &["type"]),
            Some("batch-response" | "transaction-response")
        )
    {
        return Vec::new();
    }
    let Some(entries) = body.get("entry").and_then(Value::as_array) else {
        return Vec::new();
    };
    let sent = req.json().and_then(Result::ok);
    let requests = sent
        .as_ref()
        .filter(|b| str_at(b, &["resourceType"]) == Some("Bundle"))
        .and_then(|b| b.get("entry"))
        .and_then(Value::as_array)
        .filter(|r| r.len() == entries.len());
    // Response fullUrls, and the request's `urn:uuid:` fullUrls → the location the server gave,
    // so references between entries of a transaction resolve.
    resolver.learn(body);
    if let Some(reqs) = requests {
        for (q, e) in reqs.iter().zip(entries) {
            let (Some(fu), Some(loc)) = (
                str_at(q, &["fullUrl"]),
                str_at(e, &["response", "location"]),
            ) else {
                continue;
            };
            if let Some((r, _)) = parse_location(loc, &resolver, None) {
                resolver.full_urls.insert(fu.to_string(), r);
            }
        }
    }
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let Some(status) = entry_status(e).filter(|s| matches!(s, 200 | 201 | 204)) else {
            continue;
        };
        let location = str_at(e, &["response", "location"]);
        let resource = e.get("resource");
        let common = |action, rtype, path_id, criteria, sent| Sources {
            action,
            rtype,
            path_id,
            criteria,
            resource,
            sent: Sent::Parsed(sent),
            location,
            etag: str_at(e, &["response", "etag"]),
            last_modified: str_at(e, &["response", "lastModified"]).map(str::to_string),
        };
        let w = match requests {
            Some(reqs) => {
                let q = &reqs[i];
                let Some((interaction, rtype, id, query)) = entry_request(q, &resolver) else {
                    continue;
                };
                let Some(action) = decide(&interaction, status) else {
                    continue;
                };
                let sent = match interaction {
                    Interaction::Create | Interaction::Update => q.get("resource"),
                    _ => None,
                };
                let criteria =
                    (id.is_none() && !query.is_empty()).then(|| format!("{rtype}?{query}"));
                build(
                    common(action, Some(&rtype), id.as_deref(), criteria, sent),
                    &resolver,
                )
            }
            None => {
                let action = match (status, location) {
                    (201, _) => Action::Created,
                    (200, Some(_)) => Action::Updated,
                    _ => continue,
                };
                build(common(action, None, None, None, None), &resolver)
            }
        };
        out.extend(w);
    }
    out
}

/// `Location` of a written resource: `Type/id[/_history/v]`, relative or under one of our bases;
/// under another base only when the type it shows is `expected`. Returns the reference and the
/// version.
pub fn parse_location(
    s: &str,
    resolver: &Resolver,
    expected: Option<&str>,
) -> Option<(Ref, Option<String>)> {
    let s = s.trim();
    let s = s.split(['?', '#']).next().unwrap_or("");
    if s.contains("://") {
        for b in &resolver.bases {
            let b = b.trim_end_matches('/');
            if b.is_empty() {
                continue;
            }
            if let Some(rest) = s.strip_prefix(b).and_then(|r| r.strip_prefix('/')) {
                return relative_versioned(rest);
            }
        }
        // Another spelling of the server's address: the tail, if it names what was written.
        let tail = tail_versioned(s)?;
        return (Some(tail.0.rtype.as_str()) == expected).then_some(tail);
    }
    if let Some(path) = s.strip_prefix('/') {
        // Path-absolute: the tail, under the same condition.
        return relative_versioned(path).or_else(|| {
            let tail = tail_versioned(s)?;
            (Some(tail.0.rtype.as_str()) == expected).then_some(tail)
        });
    }
    relative_versioned(s)
}

/// Exactly `Type/id` or `Type/id/_history/v`.
fn relative_versioned(s: &str) -> Option<(Ref, Option<String>)> {
    let segs: Vec<&str> = s.split('/').collect();
    let (t, id, v) = match segs.as_slice() {
        [t, id] => (*t, *id, None),
        [t, id, "_history", v] if valid_id(v) => (*t, *id, Some(v.to_string())),
        _ => return None,
    };
    (valid_type(t) && valid_id(id)).then(|| (Ref::new(t, id), v))
}

/// The last `Type/id[/_history/v]` of a path.
fn tail_versioned(s: &str) -> Option<(Ref, Option<String>)> {
    let segs: Vec<&str> = s.split('/').filter(|x| !x.is_empty()).collect();
    let n = segs.len();
    if n >= 4 && segs[n - 2] == "_history" {
        if let Some(r) = relative_versioned(&segs[n - 4..].join("/")) {
            return Some(r);
        }
    }
    if n >= 2 {
        return relative_versioned(&segs[n - 2..].join("/"));
    }
    None
}

/// `W/"3"` or `"3"` → `3`.
pub fn parse_etag(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    let v = s.strip_prefix('"')?.strip_suffix('"')?;
    valid_id(v).then(|| v.to_string())
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// An IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) as an instant (`1994-11-06T08:49:37Z`).
pub fn http_date_to_instant(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_dow, day, mon, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let digits = |x: &str, n: usize| x.len() == n && x.bytes().all(|b| b.is_ascii_digit());
    let month = MONTHS.iter().position(|m| m == mon)? + 1;
    let hms: Vec<&str> = time.split(':').collect();
    if !digits(day, 2) || !digits(year, 4) || hms.len() != 3 || !hms.iter().all(|x| digits(x, 2)) {
        return None;
    }
    Some(format!(
        "{year}-{month:02}-{day}T{}:{}:{}Z",
        hms[0], hms[1], hms[2]
    ))
}

/// Days since 1970-01-01 → (year, month, day) (proleptic Gregorian; H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn instant(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (y, m, day) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        d.subsec_millis()
    )
}

fn now_instant() -> String {
    instant(SystemTime::now())
}

/// A random, UUID-formatted (version 4 layout) id: SipHash with a per-process random key over a
/// counter and the clock.
fn unique_id() -> String {
    static SEED: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = SEED.get_or_init(RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let half = |domain: u8| {
        let mut h = seed.build_hasher();
        h.write_u8(domain);
        h.write_u64(n);
        h.write_u128(t);
        h.finish()
    };
    let (a, b) = (half(1), half(2));
    let a = (a & 0xffff_ffff_ffff_0fff) | 0x4000; // version 4
    let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000; // RFC 4122 variant
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

#[cfg(test)]
mod tests;
