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
use serde_json::{json, Map, Value};
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

    /// The event JSON (the predecessor's fields plus ours), before any envelope.
    pub fn event(&self, w: &Write, cx: &Context) -> Value {
        let source = self.source.as_deref().unwrap_or(&cx.public_base);
        let mut e = json!({
            "action": w.action.name(),
            "resourcetype": w.rtype,
            "id": w.id,
            "version": w.version,
            "lastupdated": w.last_updated,
            "source": source,
            "tenant": cx.identity.as_ref().and_then(|i| i.tenant.clone()),
            "user": cx.identity.as_ref().map(|i| i.user_id.clone()),
            "correlationid": cx.correlation_id,
            "patient": w.patient,
        });
        if let (Some(c), Some(o)) = (&w.criteria, e.as_object_mut()) {
            o.insert("criteria".into(), Value::String(c.clone()));
        }
        e
    }

    fn envelope(&self, w: &Write, event: Value, cx: &Context) -> Value {
        let source = self.source.as_deref().unwrap_or(&cx.public_base);
        let mut o = Map::new();
        o.insert("specversion".into(), json!("1.0"));
        o.insert("id".into(), Value::String(unique_id()));
        o.insert("source".into(), json!(source));
        o.insert(
            "type".into(),
            Value::String(format!("{}.{}", self.ce_type_prefix, w.action.ce_suffix())),
        );
        o.insert("subject".into(), Value::String(w.subject()));
        if let Some(t) = &w.last_updated {
            o.insert("time".into(), json!(t));
        }
        o.insert("datacontenttype".into(), json!("application/json"));
        o.insert("data".into(), event);
        Value::Object(o)
    }
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
        crate::processor::BodyAccess::Read
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
            let event = self.event(&w, cx);
            let event = if self.cloudevents {
                self.envelope(&w, event, cx)
            } else {
                event
            };
            cx.events.publish(&w.key(), event).await;
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
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::processor::Body;
    use crate::testing::{context, MemorySink};
    use std::sync::Arc;

    fn module(cloudevents: bool) -> PublishFhirEvent {
        PublishFhirEvent::new(Settings {
            cloudevents,
            source: None,
            ce_type_prefix: default_prefix(),
        })
        .unwrap()
    }

    fn req(method: &str, path: &str, query: &str, body: Option<Value>) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            headers: vec![],
            body: body.map(|b| serde_json::to_vec(&b).unwrap()),
        }
    }

    fn resp(status: u16, headers: &[(&str, &str)], body: Option<Value>) -> Response {
        Response {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.map_or(Body::None, Body::Json),
        }
    }

    /// Runs the module (checking `applies` first) and returns what it published.
    async fn run(m: &PublishFhirEvent, rq: &Request, mut rs: Response) -> Vec<(String, Value)> {
        let sink = Arc::new(MemorySink::default());
        let mut cx = context();
        cx.correlation_id = "corr-1".into();
        cx.identity = Some(Identity {
            user_id: "oid-7".into(),
            tenant: Some("tid-1".into()),
            ..Default::default()
        });
        cx.events = sink.clone();
        assert!(m.applies(rq, None), "{} {} must apply", rq.method, rq.path);
        let before = rs.clone();
        let out = m.process(rq, &mut rs, &cx).await.unwrap();
        assert!(matches!(out, PostOutcome::Continue));
        assert_eq!(rs, before, "the response is never changed");
        let got = sink.0.lock().unwrap().clone();
        got
    }

    async fn publish(rq: Request, rs: Response) -> Vec<(String, Value)> {
        run(&module(false), &rq, rs).await
    }

    #[tokio::test]
    async fn create_returns_the_resource() {
        let got = publish(
            req(
                "POST",
                "/Patient",
                "",
                Some(json!({"resourceType": "Patient"})),
            ),
            resp(
                201,
                &[(
                    "location",
                    "http://fhir.internal/fhir/Patient/p1/_history/1",
                )],
                Some(json!({"resourceType": "Patient", "id": "p1",
                    "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00.000+00:00"}})),
            ),
        )
        .await;
        assert_eq!(got.len(), 1);
        let (key, e) = &got[0];
        assert_eq!(key, "Patient/p1", "a Patient is its own compartment owner");
        assert_eq!(
            e,
            &json!({"action": "Created", "resourcetype": "Patient", "id": "p1", "version": "1",
                "lastupdated": "2024-05-01T10:00:00.000+00:00", "source": "https://gw.example/fhir",
                "tenant": "tid-1", "user": "oid-7", "correlationid": "corr-1",
                "patient": "Patient/p1"})
        );
    }

    #[tokio::test]
    async fn update_and_put_as_create() {
        let body = json!({"resourceType": "Organization", "id": "o1", "meta": {"versionId": "4"}});
        let got = publish(
            req("PUT", "/Organization/o1", "", Some(body.clone())),
            resp(200, &[("etag", "W/\"4\"")], Some(body.clone())),
        )
        .await;
        assert_eq!(got.len(), 1);
        let (key, e) = &got[0];
        assert_eq!(key, "Organization/o1", "no patient: type/id");
        assert_eq!(e["action"], "Updated");
        assert_eq!(e["version"], "4");
        assert_eq!(e["patient"], Value::Null);
        assert!(e["lastupdated"].is_string(), "falls back to now");

        let got = publish(
            req("PUT", "/Organization/o2", "", Some(body.clone())),
            resp(201, &[("etag", "W/\"1\"")], None),
        )
        .await;
        assert_eq!(got[0].1["action"], "Created", "PUT that created");
        assert_eq!(got[0].1["id"], "o2", "the path names the instance");
        assert_eq!(got[0].1["version"], "1", "from the ETag");
    }

    #[tokio::test]
    async fn patch_is_an_update() {
        let got = publish(
            req(
                "PATCH",
                "/Observation/ob1",
                "",
                Some(json!([{"op": "replace", "path": "/status", "value": "final"}])),
            ),
            resp(
                200,
                &[("etag", "W/\"3\"")],
                Some(json!({"resourceType": "Observation", "id": "ob1",
                    "meta": {"versionId": "3"}, "subject": {"reference": "Patient/x"}})),
            ),
        )
        .await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "Patient/x");
        assert_eq!(got[0].1["action"], "Updated");
        assert_eq!(got[0].1["version"], "3");
    }

    #[tokio::test]
    async fn delete_takes_the_id_from_the_path() {
        for status in [200, 204] {
            let body = (status == 200).then(|| {
                json!({"resourceType": "OperationOutcome", "issue": [{"severity": "information",
                    "code": "informational", "diagnostics": "deleted"}]})
            });
            let got = publish(
                req("DELETE", "/Observation/ob1", "", None),
                resp(
                    status,
                    &[
                        ("etag", "W/\"5\""),
                        ("last-modified", "Wed, 01 May 2024 10:00:00 GMT"),
                    ],
                    body,
                ),
            )
            .await;
            assert_eq!(got.len(), 1, "{status}");
            let (key, e) = &got[0];
            assert_eq!(key, "Observation/ob1");
            assert_eq!(e["action"], "Deleted");
            assert_eq!(e["resourcetype"], "Observation");
            assert_eq!(e["id"], "ob1");
            assert_eq!(e["version"], "5");
            assert_eq!(e["lastupdated"], "2024-05-01T10:00:00Z");
            assert_eq!(e["patient"], Value::Null);
        }
        let got = publish(req("DELETE", "/Patient/p9", "", None), resp(204, &[], None)).await;
        assert_eq!(got[0].0, "Patient/p9");
        assert_eq!(got[0].1["version"], Value::Null);
        // A server that returns the deleted resource: its owner is known.
        let got = publish(
            req("DELETE", "/Observation/ob2", "", None),
            resp(
                200,
                &[],
                Some(json!({"resourceType": "Observation", "id": "ob2",
                    "subject": {"reference": "Patient/z"}})),
            ),
        )
        .await;
        assert_eq!(got[0].0, "Patient/z");
        assert_eq!(got[0].1["action"], "Deleted");
    }

    #[tokio::test]
    async fn conditional_forms() {
        // Conditional update: the identity comes from the returned body.
        let got = publish(
            req(
                "PUT",
                "/Observation",
                "identifier=urn:x|1",
                Some(json!({"resourceType": "Observation", "subject": {"reference": "Patient/a"}})),
            ),
            resp(
                200,
                &[],
                Some(json!({"resourceType": "Observation", "id": "ob7",
                    "meta": {"versionId": "2"}, "subject": {"reference": "Patient/a"}})),
            ),
        )
        .await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "Patient/a");
        assert_eq!(got[0].1["id"], "ob7");
        assert_eq!(got[0].1["action"], "Updated");
        assert!(got[0].1.get("criteria").is_none());

        // Conditional create through PUT, return=minimal: Location + ETag; the patient from
        // the resource that was sent.
        let got = publish(
            req(
                "PUT",
                "/Observation",
                "identifier=urn:x|2",
                Some(json!({"resourceType": "Observation", "subject": {"reference": "Patient/b"}})),
            ),
            resp(
                201,
                &[
                    ("location", "Observation/ob8/_history/1"),
                    ("etag", "W/\"1\""),
                ],
                None,
            ),
        )
        .await;
        assert_eq!(got[0].0, "Patient/b");
        assert_eq!(got[0].1["action"], "Created");
        assert_eq!(got[0].1["id"], "ob8");

        // Conditional delete with nothing to identify the resource: still published.
        let got = publish(
            req("DELETE", "/Observation", "identifier=urn:x|3", None),
            resp(204, &[], None),
        )
        .await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "Observation");
        assert_eq!(got[0].1["id"], Value::Null);
        assert_eq!(got[0].1["criteria"], "Observation?identifier=urn:x|3");

        // ... and with a Location it is identified.
        let got = publish(
            req("DELETE", "/Observation", "identifier=urn:x|3", None),
            resp(
                200,
                &[("location", "https://gw.example/fhir/Observation/ob9")],
                None,
            ),
        )
        .await;
        assert_eq!(got[0].1["id"], "ob9");
        assert!(got[0].1.get("criteria").is_none());
    }

    #[tokio::test]
    async fn return_minimal_create_uses_location_and_etag() {
        let got = publish(
            req(
                "POST",
                "/Observation",
                "",
                Some(json!({"resourceType": "Observation",
                    "subject": {"reference": "https://gw.example/fhir/Patient/x"}})),
            ),
            resp(
                201,
                &[
                    (
                        "location",
                        "http://fhir.internal/fhir/Observation/ob1/_history/3",
                    ),
                    ("etag", "W/\"3\""),
                    ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ],
                None,
            ),
        )
        .await;
        assert_eq!(got.len(), 1);
        let (key, e) = &got[0];
        assert_eq!(key, "Patient/x");
        assert_eq!(e["action"], "Created");
        assert_eq!(e["resourcetype"], "Observation");
        assert_eq!(e["id"], "ob1");
        assert_eq!(e["version"], "3");
        assert_eq!(e["lastupdated"], "1994-11-06T08:49:37Z");

        // return=OperationOutcome: the body is ignored, the Location (relative) counts.
        let got = publish(
            req("POST", "/Encounter", "", None),
            resp(
                201,
                &[("location", "Encounter/e1/_history/1")],
                Some(json!({"resourceType": "OperationOutcome", "id": "nope", "issue": []})),
            ),
        )
        .await;
        assert_eq!(got[0].1["id"], "e1");
        assert_eq!(got[0].1["version"], "1");
        assert_eq!(got[0].0, "Encounter/e1");
    }

    #[tokio::test]
    async fn batch_with_a_delete_pairs_entries_with_the_request() {
        let request = json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"request": {"method": "POST", "url": "Observation"},
             "resource": {"resourceType": "Observation", "subject": {"reference": "Patient/x"}}},
            {"request": {"method": "GET", "url": "Patient/x"}},
            {"request": {"method": "DELETE", "url": "Observation/old"}},
            {"request": {"method": "PUT", "url": "https://gw.example/fhir/Patient/x"},
             "resource": {"resourceType": "Patient", "id": "x"}},
            {"request": {"method": "POST", "url": "Observation"},
             "resource": {"resourceType": "Observation"}},
            {"request": {"method": "POST", "url": "Patient/_search"}},
            {"request": {"method": "POST", "url": "Patient/x/$everything"}}
        ]});
        let response = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"response": {"status": "201 Created", "location": "Observation/n1/_history/1",
                          "etag": "W/\"1\"", "lastModified": "2024-05-01T10:00:00Z"}},
            {"resource": {"resourceType": "Patient", "id": "x"},
             "response": {"status": "200 OK", "etag": "W/\"2\""}},
            {"response": {"status": "204 No Content"}},
            {"resource": {"resourceType": "Patient", "id": "x", "meta": {"versionId": "3"}},
             "response": {"status": "200 OK", "location": "Patient/x/_history/3"}},
            {"response": {"status": "400 Bad Request",
                          "outcome": {"resourceType": "OperationOutcome"}}},
            {"resource": {"resourceType": "Bundle", "type": "searchset"},
             "response": {"status": "200 OK"}},
            {"resource": {"resourceType": "Bundle", "type": "searchset"},
             "response": {"status": "200 OK"}}
        ]});
        let got = publish(
            req("POST", "", "", Some(request)),
            resp(200, &[], Some(response)),
        )
        .await;
        let summary: Vec<(String, String, String)> = got
            .iter()
            .map(|(k, e)| {
                (
                    k.clone(),
                    e["action"].as_str().unwrap().to_string(),
                    format!("{}/{}", e["resourcetype"], e["id"]),
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (
                    "Patient/x".into(),
                    "Created".into(),
                    "\"Observation\"/\"n1\"".into()
                ),
                (
                    "Observation/old".into(),
                    "Deleted".into(),
                    "\"Observation\"/\"old\"".into()
                ),
                (
                    "Patient/x".into(),
                    "Updated".into(),
                    "\"Patient\"/\"x\"".into()
                ),
            ]
        );
        assert_eq!(got[0].1["version"], "1");
        assert_eq!(got[0].1["lastupdated"], "2024-05-01T10:00:00Z");
        assert_eq!(got[2].1["version"], "3");
    }

    #[tokio::test]
    async fn transaction_response_resolves_references_between_entries() {
        let request = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111",
             "request": {"method": "POST", "url": "Patient"},
             "resource": {"resourceType": "Patient"}},
            {"request": {"method": "POST", "url": "Observation"},
             "resource": {"resourceType": "Observation",
                          "subject": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"}}},
            {"request": {"method": "DELETE", "url": "Observation?identifier=urn:x|9"}}
        ]});
        let response = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created",
                          "location": "http://fhir.internal/fhir/Patient/np/_history/1"}},
            {"response": {"status": "201 Created", "location": "Observation/no/_history/1"}},
            {"response": {"status": "204 No Content"}}
        ]});
        let got = publish(
            req("POST", "/", "", Some(request)),
            resp(200, &[], Some(response)),
        )
        .await;
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].0, "Patient/np");
        assert_eq!(got[0].1["action"], "Created");
        assert_eq!(
            got[1].0, "Patient/np",
            "urn:uuid resolved through the location"
        );
        assert_eq!(got[1].1["id"], "no");
        assert_eq!(got[1].1["patient"], "Patient/np");
        assert_eq!(got[2].1["action"], "Deleted");
        assert_eq!(got[2].1["criteria"], "Observation?identifier=urn:x|9");
        assert_eq!(got[2].0, "Observation");
    }

    #[tokio::test]
    async fn bundle_without_the_request_is_inferred() {
        let response = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"response": {"status": "201 Created", "location": "Observation/a/_history/1"}},
            {"resource": {"resourceType": "Observation", "id": "b", "meta": {"versionId": "2"},
                          "subject": {"reference": "Patient/q"}},
             "response": {"status": "200 OK", "location": "Observation/b/_history/2"}},
            {"resource": {"resourceType": "Patient", "id": "r"}, "response": {"status": "200 OK"}},
            {"response": {"status": "204 No Content"}},
            {"response": {"status": "201"}}
        ]});
        let got = publish(req("POST", "", "", None), resp(200, &[], Some(response))).await;
        let ids: Vec<(&str, &str, &str)> = got
            .iter()
            .map(|(k, e)| {
                (
                    k.as_str(),
                    e["action"].as_str().unwrap(),
                    e["id"].as_str().unwrap_or("-"),
                )
            })
            .collect();
        // 200 without location (a read) and 204 (a delete, unknowable) are skipped; a 201 with
        // neither resource nor location has no type: skipped.
        assert_eq!(
            ids,
            [
                ("Observation/a", "Created", "a"),
                ("Patient/q", "Updated", "b")
            ]
        );
    }

    #[tokio::test]
    async fn failed_writes_publish_nothing() {
        let m = module(false);
        for (method, path, status) in [
            ("POST", "/Patient", 400),
            ("PUT", "/Patient/1", 412),
            ("DELETE", "/Patient/1", 404),
            ("PATCH", "/Patient/1", 422),
            ("POST", "/Patient", 500),
            ("POST", "/Patient", 200), // conditional create that matched: nothing written
            ("DELETE", "/Patient/1", 202),
        ] {
            let got = run(
                &m,
                &req(method, path, "", None),
                resp(
                    status,
                    &[("location", "Patient/1/_history/1")],
                    Some(json!({"resourceType": "OperationOutcome", "issue": []})),
                ),
            )
            .await;
            assert!(got.is_empty(), "{method} {path} {status}: {got:?}");
        }
        // A failed batch (4xx on the whole Bundle).
        let got = run(
            &m,
            &req("POST", "", "", None),
            resp(
                400,
                &[],
                Some(json!({"resourceType": "OperationOutcome", "issue": []})),
            ),
        )
        .await;
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn reads_searches_and_operations_do_not_apply() {
        let m = module(false);
        for (method, path) in [
            ("GET", "/Patient/1"),
            ("HEAD", "/Patient/1"),
            ("GET", "/Patient"),
            ("GET", ""),
            ("POST", "/Patient/_search"),
            ("POST", "/_search"),
            ("POST", "/Patient/1/$everything"),
            ("POST", "/$export"),
            ("POST", "/Patient/$validate"),
            ("POST", "/Observation/1/$meta-add"),
            ("GET", "/Patient/1/_history/2"),
            ("POST", "/Patient/1/Observation/_search"),
            ("PUT", "/Patient"),
            ("DELETE", "/metadata"),
        ] {
            assert!(
                !m.applies(&req(method, path, "", None), None),
                "{method} {path}"
            );
        }
        for (method, path, query) in [
            ("POST", "/Patient", ""),
            ("PUT", "/Patient/1", ""),
            ("PUT", "/Patient", "identifier=x"),
            ("PATCH", "/Patient/1", ""),
            ("DELETE", "/Patient/1", ""),
            ("DELETE", "/Patient", "identifier=x"),
            ("POST", "", ""),
            ("POST", "/", ""),
        ] {
            assert!(
                m.applies(&req(method, path, query, None), None),
                "{method} {path}"
            );
        }
        // Even if called, an operation's answer publishes nothing.
        let sink = Arc::new(MemorySink::default());
        let mut cx = context();
        cx.events = sink.clone();
        let mut r = resp(
            200,
            &[],
            Some(json!({"resourceType": "Parameters", "id": "p"})),
        );
        m.process(&req("POST", "/Patient/$validate", "", None), &mut r, &cx)
            .await
            .unwrap();
        m.process(&req("POST", "/Patient/_search", "", None), &mut r, &cx)
            .await
            .unwrap();
        assert!(sink.0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn keyed_by_the_patient() {
        let obs = json!({"resourceType": "Observation", "id": "o1", "meta": {"versionId": "1"},
            "subject": {"reference": "Patient/x"}});
        let got = publish(
            req("POST", "/Observation", "", Some(obs.clone())),
            resp(201, &[], Some(obs)),
        )
        .await;
        assert_eq!(got[0].0, "Patient/x");
        assert_eq!(got[0].1["patient"], "Patient/x");

        // Several owners: the first in sorted order.
        let obs = json!({"resourceType": "Observation", "id": "o2",
            "subject": {"reference": "Patient/zed"},
            "performer": [{"reference": "http://fhir.internal/fhir/Patient/abe"}]});
        let got = publish(
            req("PUT", "/Observation/o2", "", None),
            resp(200, &[], Some(obs)),
        )
        .await;
        assert_eq!(got[0].0, "Patient/abe");

        // Unresolvable owner (another server): no patient, keyed by type/id.
        let obs = json!({"resourceType": "Observation", "id": "o3",
            "subject": {"reference": "https://elsewhere/fhir/Patient/1"}});
        let got = publish(
            req("PUT", "/Observation/o3", "", None),
            resp(200, &[], Some(obs)),
        )
        .await;
        assert_eq!(got[0].0, "Observation/o3");
        assert_eq!(got[0].1["patient"], Value::Null);

        // A Patient with links is still its own owner.
        let p = json!({"resourceType": "Patient", "id": "p9",
            "link": [{"other": {"reference": "Patient/a0"}, "type": "seealso"}]});
        let got = publish(req("PUT", "/Patient/p9", "", None), resp(200, &[], Some(p))).await;
        assert_eq!(got[0].0, "Patient/p9");
    }

    #[tokio::test]
    async fn cloudevents_envelope() {
        let m = PublishFhirEvent::new(Settings {
            cloudevents: true,
            source: Some("urn:gw:test".into()),
            ce_type_prefix: "org.example.fhir.".into(),
        })
        .unwrap();
        let obs = json!({"resourceType": "Observation", "id": "o1",
            "meta": {"versionId": "1", "lastUpdated": "2024-05-01T10:00:00Z"},
            "subject": {"reference": "Patient/x"}});
        let rq = req("POST", "/Observation", "", None);
        let a = run(&m, &rq, resp(201, &[], Some(obs.clone()))).await;
        let b = run(&m, &rq, resp(201, &[], Some(obs))).await;
        let (key, ce) = &a[0];
        assert_eq!(key, "Patient/x");
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["source"], "urn:gw:test");
        assert_eq!(ce["type"], "org.example.fhir.created");
        assert_eq!(ce["subject"], "Observation/o1");
        assert_eq!(ce["time"], "2024-05-01T10:00:00Z");
        assert_eq!(ce["datacontenttype"], "application/json");
        assert_eq!(ce["data"]["action"], "Created");
        assert_eq!(ce["data"]["source"], "urn:gw:test");
        assert_eq!(ce["data"]["correlationid"], "corr-1");
        let id = ce["id"].as_str().unwrap();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, b[0].1["id"].as_str().unwrap(), "ids are unique");

        let d = run(
            &m,
            &req("DELETE", "/Observation/o1", "", None),
            resp(204, &[], None),
        )
        .await;
        assert_eq!(d[0].1["type"], "org.example.fhir.deleted");
    }

    #[test]
    fn settings_and_registry() {
        use crate::builtin::build_post;
        assert!(build_post("PublishFHIREvent", &Value::Null).is_ok());
        assert!(build_post(
            "PublishFHIREvent",
            &json!({"cloudevents": true, "source": "urn:x", "ce_type_prefix": "a.b"})
        )
        .is_ok());
        let e = build_post("PublishFHIREvent", &json!({"cloud_events": true}))
            .err()
            .unwrap();
        assert!(e.contains("unknown field"), "{e}");
        assert!(build_post("PublishFHIREvent", &json!({"source": " "})).is_err());
        assert!(build_post("PublishFHIREvent", &json!({"ce_type_prefix": ""})).is_err());
    }

    #[test]
    fn locations_etags_and_dates() {
        let r = Resolver::new(&["https://gw.example/fhir", "http://fhir.internal/fhir/"]);
        let v =
            |s: &str, e: Option<&str>| parse_location(s, &r, e).map(|(r, v)| (r.to_string(), v));
        assert_eq!(
            v("Patient/1/_history/2", None),
            Some(("Patient/1".into(), Some("2".into())))
        );
        assert_eq!(v("Patient/1", None), Some(("Patient/1".into(), None)));
        assert_eq!(
            v("http://fhir.internal/fhir/Patient/1/_history/2", None),
            Some(("Patient/1".into(), Some("2".into())))
        );
        assert_eq!(
            v("https://gw.example/fhir/Patient/1?x=1", None),
            Some(("Patient/1".into(), None))
        );
        // Another base: only when it names the type written.
        assert_eq!(
            v(
                "https://node-3:8080/fhir/Patient/1/_history/2",
                Some("Patient")
            ),
            Some(("Patient/1".into(), Some("2".into())))
        );
        assert_eq!(
            v("https://node-3:8080/fhir/Patient/1", Some("Observation")),
            None
        );
        assert_eq!(v("https://node-3:8080/fhir/Patient/1", None), None);
        assert_eq!(
            v("/fhir/Patient/1/_history/7", Some("Patient")),
            Some(("Patient/1".into(), Some("7".into())))
        );
        assert_eq!(v("Patient/1/extra", None), None);
        assert_eq!(v("patient/1", None), None);
        assert_eq!(v("Patient/bad id", None), None);
        assert_eq!(v("", None), None);

        assert_eq!(parse_etag("W/\"3\"").as_deref(), Some("3"));
        assert_eq!(parse_etag("\"abc-1\"").as_deref(), Some("abc-1"));
        assert_eq!(parse_etag("3"), None);
        assert_eq!(parse_etag("W/\"\""), None);

        assert_eq!(
            http_date_to_instant("Sun, 06 Nov 1994 08:49:37 GMT").as_deref(),
            Some("1994-11-06T08:49:37Z")
        );
        assert_eq!(http_date_to_instant("Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(http_date_to_instant("Sun, 06 Foo 1994 08:49:37 GMT"), None);

        assert_eq!(
            instant(UNIX_EPOCH + std::time::Duration::from_millis(951_782_400_123)),
            "2000-02-29T00:00:00.123Z"
        );
        assert_eq!(instant(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            instant(UNIX_EPOCH + std::time::Duration::from_secs(1_735_689_599)),
            "2024-12-31T23:59:59.000Z"
        );
    }

    #[test]
    fn entry_statuses() {
        let s = |x: &str| entry_status(&json!({"response": {"status": x}}));
        assert_eq!(s("201 Created"), Some(201));
        assert_eq!(s("204"), Some(204));
        assert_eq!(s("2001"), None);
        assert_eq!(s("OK"), None);
    }

    #[tokio::test]
    async fn a_delete_is_keyed_by_the_patient_of_its_last_version() {
        let (mut cx, client) =
            crate::testing::context_with(crate::testing::ScriptedClient::by_url(vec![(
                "Observation/o9/_history",
                200,
                json!({"resourceType": "Bundle", "type": "history", "entry": [
                {"request": {"method": "DELETE", "url": "Observation/o9"}},
                {"resource": {"resourceType": "Observation", "id": "o9",
                              "subject": {"reference": "Patient/p7"}}}]}),
            )]));
        let sink = std::sync::Arc::new(crate::testing::MemorySink::default());
        cx.events = sink.clone();
        let m = module(false);
        let rq = req("DELETE", "/Observation/o9", "", None);
        let mut rs = resp(204, &[], None);
        m.process(&rq, &mut rs, &cx).await.unwrap();
        let got = sink.0.lock().unwrap().clone();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "Patient/p7");
        assert_eq!(got[0].1["patient"], "Patient/p7");
        assert_eq!(got[0].1["action"], "Deleted");
        assert_eq!(client.calls(), ["GET Observation/o9/_history?_count=5"]);
    }
}
