//! Conditional writes are no existence oracle (issue 14, spec §9). The search part of a
//! conditional write — `If-None-Exist` on a create, `PUT` / `PATCH` / `DELETE Type?criteria`,
//! and the same inside batch and transaction entries (`ifNoneExist`, conditional URLs) — is
//! answered by the server over every resource, so its outcome (200 vs 201, 412, which resource
//! is updated or deleted) would tell a filtered caller about data they may not see, and could
//! change it.
//!
//! For a caller the route's filters judge (a post module reading whose data a resource is,
//! `BodyAccess::Compartment`, applies to them), the gateway runs the search itself, as the
//! service, lets those filters judge the matches exactly as they would judge the caller's own
//! search, and rewrites the criteria to the visible matches only, `_id=a,b` — so the server
//! still applies its own conditional semantics (200 with the existing resource, 412 for
//! several, its own no-match answer), but over what the caller may see:
//!
//! * `If-None-Exist`: none visible → removed (a plain create); else `_id=<visible>`;
//! * `PUT Type?criteria`: `Type?_id=<visible>`; none visible → `Type?_id=<an id that does not
//!   exist>` (the server's create), or, when the body has an id, `PUT Type/<id>` — only if
//!   that resource does not exist or the caller may see it (no invisible resource is updated);
//! * `PATCH` / `DELETE Type?criteria`: `Type?_id=<visible>`, or the id that does not exist.
//!
//! The answer then depends only on resources the caller may see. A search matching more
//! than `MAX_MATCHES` resources is refused with 412 whatever the caller sees (a bound, not a
//! visible-set answer). Between the gateway's search and the write another client may create
//! or delete a match: the server then sees the criteria `_id=...` and acts on those ids only,
//! so the race can make a create go through or a conditional find nothing, never touch a
//! resource the caller may not see.

use crate::identity::{valid_id, Identity};
use crate::json::At;
use crate::processor::{
    next_link, query_pairs, BodyAccess, Context, ModuleError, PostProcess, Request, Response,
};
use crate::reference::valid_type;
use serde_json::{json, Value};
use std::sync::Arc;

/// More matches than this and the gateway does not judge them one by one: 412.
pub const MAX_MATCHES: usize = 1_000;

/// Search parameters that shape the answer, not the match: dropped from the criteria the
/// gateway searches with (`_summary=count` would otherwise hide every match).
const SHAPING: [&str; 10] = [
    "_summary",
    "_elements",
    "_count",
    "_include",
    "_revinclude",
    "_sort",
    "_total",
    "_contained",
    "_containedType",
    "_format",
];

/// Whether the request may carry a conditional write (cheap, on the request line and headers).
pub fn may_be_conditional(req: &Request) -> bool {
    let path = req.path.trim_matches('/');
    match req.method.as_str() {
        // A batch or transaction may hold conditional entries.
        "POST" if path.is_empty() => true,
        "POST" => valid_type(path) && req.header("if-none-exist").is_some(),
        "PUT" | "PATCH" | "DELETE" => valid_type(path) && !req.query.is_empty(),
        _ => false,
    }
}

/// The request the filters are asked about: a search by this caller.
fn probe(rtype: &str, query: &str) -> Request {
    Request {
        method: "GET".into(),
        path: format!("/{rtype}"),
        query: query.to_string(),
        headers: vec![],
        body: None,
    }
}

/// The route's filters that judge this caller's answers (bypassing callers: none).
fn filters<'a>(
    post: &'a [Arc<dyn PostProcess>],
    caller: Option<&Identity>,
) -> Vec<&'a Arc<dyn PostProcess>> {
    let p = probe("Patient", "");
    post.iter()
        .filter(|m| m.reads() == BodyAccess::Compartment && m.applies(&p, caller))
        .collect()
}

/// Whether a filter of the route judges this caller.
pub fn filtered(post: &[Arc<dyn PostProcess>], caller: Option<&Identity>) -> bool {
    !filters(post, caller).is_empty()
}

/// The criteria as the gateway searches with them: shaping parameters dropped, characters a
/// request line may not carry percent-encoded.
fn criteria(raw: &str) -> String {
    let kept: Vec<&str> = raw
        .split('&')
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let k = p.split('=').next().unwrap_or("");
            !SHAPING.contains(&k.split(':').next().unwrap_or(""))
        })
        .collect();
    let mut out = String::with_capacity(raw.len());
    for b in kept.join("&").bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$'()*+,;=:@/?%&".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An id no resource has: criteria that match nothing, so the server gives its own answer
/// for no match.
fn no_match() -> String {
    format!("gw-no-match-{}", uuid::Uuid::new_v4().simple())
}

fn outcome(status: u16, code: &'static str, why: impl std::fmt::Display) -> Response {
    Response::outcome(status, code, format!("conditional write: {why}"))
}

/// The ids of `resources` (all of `rtype`) that the caller's filters keep.
async fn judge(
    post: &[Arc<dyn PostProcess>],
    cx: &Context,
    rtype: &str,
    query: &str,
    resources: Vec<Value>,
) -> Result<Vec<String>, ModuleError> {
    let entries: Vec<Value> = resources
        .into_iter()
        .map(|r| json!({"resource": r, "search": {"mode": "match"}}))
        .collect();
    let mut resp = Response::json(
        200,
        json!({"resourceType": "Bundle", "type": "searchset", "entry": entries}),
    );
    let req = probe(rtype, query);
    for m in filters(post, cx.identity.as_ref()) {
        m.process(&req, &mut resp, cx).await?;
    }
    let body = resp.json_body().cloned().unwrap_or(Value::Null);
    Ok(body
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|e| e.at("/resource/resourceType").and_then(Value::as_str) == Some(rtype))
        .filter_map(|e| e.at("/resource/id").and_then(Value::as_str))
        .map(str::to_string)
        .collect())
}

/// The matches of `rtype?raw` the caller may see; `Err` answers the write (too many).
async fn visible(
    post: &[Arc<dyn PostProcess>],
    cx: &Context,
    rtype: &str,
    raw: &str,
) -> Result<Result<Vec<String>, Response>, ModuleError> {
    let q = criteria(raw);
    let mut found = Vec::new();
    let mut next = Some(format!(
        "{rtype}?{q}{}_count=100",
        if q.is_empty() { "" } else { "&" }
    ));
    while let Some(url) = next.take() {
        let (status, b) = cx.fhir.get_json(&url).await?;
        if status != 200 {
            return Err(ModuleError::Unavailable(format!(
                "the search of a conditional write answered {status}"
            )));
        }
        for e in b
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if matches!(
                e.at("/search/mode").and_then(Value::as_str),
                Some("include") | Some("outcome")
            ) {
                continue;
            }
            match e.get("resource") {
                Some(r) if r.get("resourceType").and_then(Value::as_str) == Some(rtype) => {
                    found.push(r.clone())
                }
                _ => {}
            }
        }
        if found.len() > MAX_MATCHES {
            return Ok(Err(outcome(
                412,
                "multiple-matches",
                format!("the criteria match more than {MAX_MATCHES} resources"),
            )));
        }
        next = next_link(&b);
    }
    Ok(Ok(judge(post, cx, rtype, &q, found).await?))
}

/// What a conditional becomes.
enum Rewritten {
    /// The new `If-None-Exist` / `ifNoneExist` (`None`: removed).
    IfNoneExist(Option<String>),
    /// The new target, below the base (`Observation?_id=a`, `Observation/b`).
    Url(String),
}

enum Kind<'a> {
    Create,
    /// The body: `None` absent, `Some(None)` not JSON.
    Update(Option<Option<&'a Value>>),
    PatchOrDelete,
}

async fn rewrite(
    post: &[Arc<dyn PostProcess>],
    cx: &Context,
    rtype: &str,
    raw: &str,
    kind: Kind<'_>,
) -> Result<Result<Rewritten, Response>, ModuleError> {
    let ids = match visible(post, cx, rtype, raw).await? {
        Ok(ids) => ids,
        Err(no) => return Ok(Err(no)),
    };
    let by_id = |ids: &[String]| format!("{rtype}?_id={}", ids.join(","));
    Ok(Ok(match kind {
        Kind::Create if ids.is_empty() => Rewritten::IfNoneExist(None),
        Kind::Create => Rewritten::IfNoneExist(Some(format!("_id={}", ids.join(",")))),
        Kind::Update(body) if ids.is_empty() => {
            let id = match body {
                Some(None) => {
                    return Ok(Err(outcome(
                        415,
                        "not-supported",
                        "a filtered caller's conditional update is checked as FHIR JSON only",
                    )))
                }
                Some(Some(v)) => v.get("id").and_then(Value::as_str),
                None => None,
            };
            match id {
                None => Rewritten::Url(by_id(&[no_match()])),
                Some(id) if !valid_id(id) => Rewritten::Url(by_id(&[no_match()])),
                // No match and an id: the server would update-as-create that id. Only when it
                // does not exist or the caller may see it.
                Some(id) => {
                    let (status, current) = cx.fhir.get_json(&format!("{rtype}/{id}")).await?;
                    match status {
                        404 | 410 => {}
                        200 if judge(post, cx, rtype, "", vec![current]).await?.len() == 1 => {}
                        200 => {
                            return Ok(Err(outcome(
                                403,
                                "forbidden",
                                format!("{rtype}/{id} is not a resource the caller may see"),
                            )))
                        }
                        s => {
                            return Err(ModuleError::Unavailable(format!(
                                "reading {rtype}/{id} before a conditional update answered {s}"
                            )))
                        }
                    }
                    Rewritten::Url(format!("{rtype}/{id}"))
                }
            }
        }
        Kind::Update(_) | Kind::PatchOrDelete if ids.is_empty() => {
            Rewritten::Url(by_id(&[no_match()]))
        }
        Kind::Update(_) | Kind::PatchOrDelete => Rewritten::Url(by_id(&ids)),
    }))
}

/// Resolves every conditional part of the request for a filtered caller (see the module
/// notes), rewriting `req`; `Some` answers instead (412, 415, 403) and nothing is sent.
pub async fn resolve(
    post: &[Arc<dyn PostProcess>],
    req: &mut Request,
    cx: &Context,
) -> Result<Option<Response>, ModuleError> {
    let path = req.path.trim_matches('/').to_string();
    match req.method.as_str() {
        "POST" if path.is_empty() => bundle(post, req, cx).await,
        "POST" if valid_type(&path) => {
            let Some(raw) = req.header("if-none-exist").map(str::to_string) else {
                return Ok(None);
            };
            match rewrite(post, cx, &path, &raw, Kind::Create).await? {
                Err(no) => Ok(Some(no)),
                Ok(Rewritten::IfNoneExist(v)) => {
                    req.headers
                        .retain(|(k, _)| !k.eq_ignore_ascii_case("if-none-exist"));
                    if let Some(v) = v {
                        req.headers.push(("if-none-exist".into(), v));
                    }
                    Ok(None)
                }
                Ok(Rewritten::Url(_)) => unreachable!("a create keeps its URL"),
            }
        }
        "PUT" | "PATCH" | "DELETE" if valid_type(&path) && !req.query.is_empty() => {
            let raw = req.query.clone();
            let parsed = req.json();
            let kind = match req.method.as_str() {
                "PUT" => Kind::Update(parsed.as_ref().map(|r| r.as_ref().ok())),
                _ => Kind::PatchOrDelete,
            };
            match rewrite(post, cx, &path, &raw, kind).await? {
                Err(no) => Ok(Some(no)),
                Ok(Rewritten::Url(u)) => {
                    let (p, q) = u.split_once('?').unwrap_or((&u, ""));
                    req.path = format!("/{p}");
                    req.query = q.to_string();
                    Ok(None)
                }
                Ok(Rewritten::IfNoneExist(_)) => unreachable!("only creates have If-None-Exist"),
            }
        }
        _ => Ok(None),
    }
}

/// Says which Bundle entry an answer is about.
fn about_entry(mut r: Response, i: usize) -> Response {
    if let Some(d) = r
        .json_body_mut()
        .and_then(|b| b.pointer_mut("/issue/0/diagnostics"))
    {
        if let Some(s) = d.as_str() {
            *d = Value::String(format!("{s} (Bundle entry {i})"));
        }
    }
    r
}

/// Every conditional entry of a batch or transaction, rewritten in place.
async fn bundle(
    post: &[Arc<dyn PostProcess>],
    req: &mut Request,
    cx: &Context,
) -> Result<Option<Response>, ModuleError> {
    let mut b = match req.json() {
        None => return Ok(None),
        Some(Ok(v)) => v,
        Some(Err(_)) => {
            // Not JSON (XML): the gateway cannot see its conditionals, so it may hold none.
            let raw = req.body.as_deref().unwrap_or_default();
            let holds = |n: &[u8]| raw.windows(n.len()).any(|w| w == n);
            if holds(b"ifNoneExist") || holds(b"?") {
                return Ok(Some(outcome(
                    415,
                    "not-supported",
                    "a filtered caller's batch or transaction with conditional or search \
                     entries is checked as FHIR JSON only",
                )));
            }
            return Ok(None);
        }
    };
    if b.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Ok(None);
    }
    let bases = [cx.public_base.clone(), cx.upstream_base.clone()];
    let mut changed = false;
    let n = b.get("entry").and_then(Value::as_array).map_or(0, Vec::len);
    for i in 0..n {
        let e = &b["entry"][i];
        let method = e.at("/request/method").and_then(Value::as_str);
        let Some(url) = e.at("/request/url").and_then(Value::as_str) else {
            continue;
        };
        let url = bases
            .iter()
            .find_map(|base| url.strip_prefix(base.trim_end_matches('/')))
            .unwrap_or(url)
            .trim_start_matches('/')
            .to_string();
        let (p, q) = url.split_once('?').unwrap_or((&url, ""));
        let p = p.trim_end_matches('/').to_string();
        let q = q.to_string();
        let none_exist = e
            .at("/request/ifNoneExist")
            .and_then(Value::as_str)
            .map(str::to_string);
        let out = match method {
            Some("POST") if valid_type(&p) => match none_exist {
                Some(raw) => rewrite(post, cx, &p, &raw, Kind::Create).await?,
                None => continue,
            },
            Some(m @ ("PUT" | "PATCH" | "DELETE")) if valid_type(&p) && !q.is_empty() => {
                let kind = if m == "PUT" {
                    // A Binary is a patch's base64, not the resource.
                    Kind::Update(
                        e.get("resource")
                            .filter(|r| {
                                r.get("resourceType").and_then(Value::as_str) != Some("Binary")
                            })
                            .map(Some),
                    )
                } else {
                    Kind::PatchOrDelete
                };
                rewrite(post, cx, &p, &q, kind).await?
            }
            _ => continue,
        };
        let request = &mut b["entry"][i]["request"];
        match out {
            Err(no) => return Ok(Some(about_entry(no, i))),
            Ok(Rewritten::IfNoneExist(None)) => {
                if let Some(o) = request.as_object_mut() {
                    o.shift_remove("ifNoneExist");
                }
            }
            Ok(Rewritten::IfNoneExist(Some(v))) => request["ifNoneExist"] = Value::String(v),
            Ok(Rewritten::Url(u)) => request["url"] = Value::String(u),
        }
        changed = true;
    }
    if changed {
        req.body = Some(serde_json::to_vec(&b).map_err(|e| ModuleError::Failed(e.to_string()))?);
    }
    Ok(None)
}

/// The ids a conditional's criteria name when they are exactly `_id=a,b,...` (what the
/// gateway rewrites a filtered caller's conditionals to): such a write is judged as writes of
/// those ids.
pub fn ids_only(query: &str) -> Option<Vec<String>> {
    let mut pairs = query_pairs(query);
    let (k, v) = pairs.next()?;
    if k != "_id" || pairs.next().is_some() {
        return None;
    }
    let ids: Vec<String> = v.split(',').map(str::to_string).collect();
    ids.iter().all(|i| valid_id(i)).then_some(ids)
}

#[cfg(test)]
mod tests;
