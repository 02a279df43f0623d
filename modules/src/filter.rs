//! Removing what a caller may not see from a response, shared by ParticipantFilter and
//! ConsentOptOut. Denied Bundle entries are removed (not stubbed: stubs leak ids), `total` is
//! dropped unless it provably counts only what the caller sees, and a searchset says that it
//! was filtered; a denied single resource becomes a 403 (or 404 with `hide_existence`).

use crate::compartment::{owners, patient_paths, Owners};
use crate::identity::valid_id;
use crate::json::At;
use crate::processor::{Body, Context, ModuleError, Request, Response};
use crate::reference::{valid_type, Ref, Resolver};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// How a module reports what it removed.
#[derive(Clone, Debug)]
pub struct Style {
    pub module: &'static str,
    /// 404 instead of 403 for a denied read, and no "filtered" notice in searchsets (the
    /// notice itself tells that something exists).
    pub hide_existence: bool,
    /// The predecessor's compatibility form: a denied entry is replaced by an
    /// OperationOutcome entry (without the id) instead of vanishing.
    pub stub: bool,
    /// Why, for diagnostics (`the patient has withheld access`).
    pub reason: &'static str,
}

/// Every resource of a body that the filters judge: the body itself unless it is a Bundle,
/// and the resources of its entries (nested Bundles' entries too, e.g. a batch-response
/// holding searchsets).
pub fn resources<'a>(body: &'a Value, out: &mut Vec<&'a Value>) {
    if body.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        out.push(body);
        return;
    }
    for e in body
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(r) = e.get("resource") {
            resources(r, out);
        }
    }
}

/// The type of a Bundle entry that has no resource (a deleted version in a history Bundle).
fn entry_type(e: &Value) -> Option<&str> {
    let url = e.at("/request/url").and_then(Value::as_str)?;
    let path = url.split('?').next()?;
    path.split('/')
        .filter(|s| !s.is_empty())
        .rev()
        .find(|s| valid_type(s) && *s != "_history")
}

/// A search match (not an `_include`d resource, not an OperationOutcome notice).
fn is_match(e: &Value) -> bool {
    !matches!(
        e.at("/search/mode").and_then(Value::as_str),
        Some("include") | Some("outcome")
    )
}

/// Whether a resource-less entry of this type may be patient data.
pub fn may_be_patient_data(rtype: Option<&str>) -> bool {
    rtype.is_none_or(|t| t == "Patient" || patient_paths(t).is_some())
}

fn outcome(code: &str, severity: &str, diagnostics: String) -> Value {
    json!({"resourceType": "OperationOutcome",
           "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]})
}

/// What the caller decides for each resource (`true` = deny) and for resource-less entries
/// (given their type).
pub struct Judge<'a> {
    pub deny: &'a mut dyn FnMut(&Value) -> bool,
    pub deny_resourceless: &'a mut dyn FnMut(Option<&str>) -> bool,
}

/// Filters a Bundle in place; returns how many entries were removed or replaced.
fn filter_bundle(b: &mut Value, style: &Style, judge: &mut Judge) -> usize {
    let kind = b
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let mut none = Vec::new();
    let entries = match b.get_mut("entry").and_then(Value::as_array_mut) {
        Some(e) => e,
        // `_summary=count`: no entries, but a `total` to judge.
        None => &mut none,
    };
    let mut removed = 0;
    if kind == "batch-response" || kind == "transaction-response" {
        // Positions answer the request's entries: keep them, empty the denied ones.
        for e in entries.iter_mut() {
            let Some(r) = e.get_mut("resource") else {
                continue;
            };
            if r.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
                removed += filter_bundle(r, style, judge);
                continue;
            }
            if (judge.deny)(r) {
                removed += 1;
                if let Some(resp) = e
                    .get_mut("response")
                    .filter(|r| r.get("location").is_some())
                {
                    // A write's result: it happened, so its status and location stay true;
                    // only the resource is withheld.
                    resp["outcome"] = outcome(
                        "suppressed",
                        "information",
                        format!(
                            "{}: the result is not shown: {}",
                            style.module, style.reason
                        ),
                    );
                    e.as_object_mut().expect("entry").shift_remove("resource");
                    continue;
                }
                let status = if style.hide_existence {
                    "404 Not Found"
                } else {
                    "403 Forbidden"
                };
                let code = if style.hide_existence {
                    "not-found"
                } else {
                    "forbidden"
                };
                *e = json!({"response": {"status": status, "outcome":
                    outcome(code, "error", format!("{}: {}", style.module, style.reason))}});
            }
        }
        return removed;
    }
    let orig_matches = entries.iter().filter(|e| is_match(e)).count() as u64;
    let mut kept = Vec::with_capacity(entries.len());
    for mut e in entries.drain(..) {
        let denied = match e.get_mut("resource") {
            Some(r) if r.get("resourceType").and_then(Value::as_str) == Some("Bundle") => {
                removed += filter_bundle(r, style, judge);
                false
            }
            Some(r) => (judge.deny)(r),
            None => (judge.deny_resourceless)(entry_type(&e)),
        };
        if !denied {
            kept.push(e);
            continue;
        }
        removed += 1;
        if style.stub {
            kept.push(json!({
                "resource": outcome("suppressed", "information",
                    format!("{}: an entry was removed: {}", style.module, style.reason)),
                "search": {"mode": "outcome"}}));
        }
    }
    *entries = kept;
    // `total` counts what the server matched, the caller's invisible matches included. When
    // the server says the whole result is on this page it becomes what the caller sees;
    // otherwise (more pages, or no entries at all as with `_summary=count`) it goes: "0" next
    // to "absent" would tell a caller whether something they may not see matched.
    let matches = entries.iter().filter(|e| is_match(e)).count() as u64;
    let o = b.as_object_mut().expect("a Bundle is an object");
    if let Some(total) = o.get("total").and_then(Value::as_u64) {
        if total == orig_matches && matches > 0 {
            o.insert("total".into(), Value::from(matches));
        } else {
            o.shift_remove("total");
        }
    } else {
        o.shift_remove("total");
    }
    if removed > 0 && kind == "searchset" && !style.hide_existence && !style.stub {
        let notice = json!({
            "resource": outcome("suppressed", "information", format!(
                "{}: results were filtered: {}", style.module, style.reason)),
            "search": {"mode": "outcome"}});
        o.entry("entry")
            .or_insert_with(|| Value::Array(Vec::new()))
            .as_array_mut()
            .expect("entry is an array")
            .push(notice);
    }
    removed
}

/// What `apply` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// The body was examined; this many entries were removed or replaced.
    Filtered(usize),
    /// A single resource was denied: the response is now a 403/404 OperationOutcome.
    Denied,
}

/// Is this request a write whose answer echoes the written resource (create, update, patch)?
/// Its result is withheld, never turned into a 403: the write did happen.
pub fn is_write(req: &Request) -> bool {
    match req.method.as_str() {
        "PUT" | "PATCH" => true,
        // POST to the base is a batch or transaction: judged entry by entry.
        "POST" => {
            !req.path.trim_matches('/').is_empty()
                && !req.path.ends_with("/_search")
                && !req.path.contains('$')
        }
        _ => false,
    }
}

/// Applies the caller's verdicts to a 2xx JSON response.
pub fn apply(resp: &mut Response, style: &Style, write: bool, judge: &mut Judge) -> Applied {
    let Body::Json(body) = &mut resp.body else {
        return Applied::Filtered(0);
    };
    if body.get("resourceType").and_then(Value::as_str) == Some("Bundle") && !write {
        return Applied::Filtered(filter_bundle(body, style, judge));
    }
    if !(judge.deny)(body) {
        return Applied::Filtered(0);
    }
    if write {
        resp.body = Body::Json(outcome(
            "suppressed",
            "information",
            format!(
                "{}: the write succeeded; its result is not shown: {}",
                style.module, style.reason
            ),
        ));
        return Applied::Filtered(1);
    }
    *resp = denied_response(style);
    Applied::Denied
}

/// The answer to a denied read.
pub fn denied_response(style: &Style) -> Response {
    if style.hide_existence {
        Response::outcome(404, "not-found", "resource not found")
    } else {
        Response::outcome(
            403,
            "forbidden",
            format!("{}: {}", style.module, style.reason),
        )
    }
}

/// `_elements` / `_summary` make the server drop the fields filters look at (pitfall 17):
/// was this resource cut, by its tag or by the request?
pub fn is_subsetted(resource: &Value, query: &str) -> bool {
    let tagged = resource
        .at("/meta/tag")
        .and_then(Value::as_array)
        .is_some_and(|tags| {
            tags.iter()
                .any(|t| t.get("code").and_then(Value::as_str) == Some("SUBSETTED"))
        });
    tagged
        || crate::processor::query_pairs(query).any(|(k, v)| {
            k == "_elements" || k == "_contained" || (k == "_summary" && v != "false")
        })
}

/// Owners of the resources of one response, full versions fetched for subsetted ones.
pub struct Ownership {
    resolver: Resolver,
    query: String,
    /// Owners computed from the full version of subsetted resources.
    full: HashMap<Ref, Owners>,
}

impl Ownership {
    /// Learns the body's `fullUrl`s and fetches (in `_id` batches) the full version of every
    /// subsetted resource that may be patient data: `_elements=id` must not hide `subject`.
    pub async fn prepare(
        body: &Value,
        query: &str,
        cx: &Context,
    ) -> Result<Ownership, ModuleError> {
        let mut resolver = Resolver::new(&[cx.public_base.as_str(), cx.upstream_base.as_str()]);
        resolver.learn(body);
        let mut all = Vec::new();
        resources(body, &mut all);
        let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for r in all {
            let (Some(t), Some(id)) = (
                r.get("resourceType").and_then(Value::as_str),
                r.get("id").and_then(Value::as_str),
            ) else {
                continue;
            };
            if may_be_patient_data(Some(t)) && is_subsetted(r, query) && valid_id(id) {
                wanted
                    .entry(t.to_string())
                    .or_default()
                    .insert(id.to_string());
            }
        }
        let mut full = HashMap::new();
        for (t, ids) in wanted {
            let ids: Vec<&String> = ids.iter().collect();
            for chunk in ids.chunks(50) {
                let list: Vec<&str> = chunk.iter().map(|s| s.as_str()).collect();
                let path = format!("{t}?_id={}&_count={}", list.join(","), chunk.len());
                let (status, b) = cx.fhir.get_json(&path).await?;
                if status != 200 {
                    return Err(ModuleError::Unavailable(format!(
                        "fetching the full version of subsetted {t} answered {status}"
                    )));
                }
                for e in b
                    .get("entry")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let r = &e["resource"];
                    if let (Some(rt), Some(id)) = (
                        r.get("resourceType").and_then(Value::as_str),
                        r.get("id").and_then(Value::as_str),
                    ) {
                        if rt == t && !is_subsetted(r, "") {
                            full.insert(Ref::new(rt, id), owners(r, &resolver));
                        }
                    }
                }
            }
        }
        Ok(Ownership {
            resolver,
            query: query.to_string(),
            full,
        })
    }

    /// Whose data `r` is. A subsetted resource whose full version could not be read counts
    /// as unknown (denied to all but bypass roles).
    pub fn owners(&self, r: &Value) -> Owners {
        let t = r.get("resourceType").and_then(Value::as_str);
        if may_be_patient_data(t) && is_subsetted(r, &self.query) {
            let key = Ref::new(
                t.unwrap_or(""),
                r.get("id").and_then(Value::as_str).unwrap_or(""),
            );
            return self.full.get(&key).cloned().unwrap_or(Owners {
                unknown: true,
                ..Default::default()
            });
        }
        owners(r, &self.resolver)
    }
}

/// Where the body a filter judges is.
pub enum Judged {
    /// The response's own JSON body.
    InPlace,
    /// HEAD: the GET of the same URL (a HEAD's 200 vs 404 would otherwise tell who exists).
    Fetched(Value),
    /// Nothing to judge (no body).
    Nothing,
}

/// A create answers with what the caller just wrote; everything else is judged.
pub(crate) fn judged_status(req: &Request, status: u16) -> bool {
    (200..300).contains(&status) && !(status == 201 && req.method == "POST")
}

/// What a data filter's `process` judges, or how it ends without judging: an answer that is
/// not judged goes on as it is; a 2xx body filters cannot read is replaced by `judged_body`'s
/// answer (a withheld write echo is still a success: later modules, events, run).
pub async fn judged_or_done(
    req: &Request,
    resp: &mut Response,
    cx: &Context,
    module: &str,
) -> Result<Judged, crate::processor::PostOutcome> {
    use crate::processor::PostOutcome;
    if !judged_status(req, resp.status) {
        return Err(PostOutcome::Continue);
    }
    judged_body(req, resp, cx, module).await.map_err(|answer| {
        let write = (200..300).contains(&answer.status);
        *resp = answer;
        if write {
            PostOutcome::Continue
        } else {
            PostOutcome::Stop
        }
    })
}

/// Finds the body to judge. `Err` answers a 2xx body filters cannot read (fail closed).
pub async fn judged_body(
    req: &Request,
    resp: &Response,
    cx: &Context,
    module: &str,
) -> Result<Judged, Response> {
    match &resp.body {
        Body::Json(_) => Ok(Judged::InPlace),
        Body::None if req.method == "HEAD" => {
            let mut path = req.path.trim_start_matches('/').to_string();
            if !req.query.is_empty() {
                path.push('?');
                path.push_str(&req.query);
            }
            match cx.fhir.get_json(&path).await {
                Ok((200, v)) => Ok(Judged::Fetched(v)),
                Ok((s, _)) => Err(Response::outcome(
                    503,
                    "transient",
                    format!("{module}: could not check a HEAD answer (GET answered {s})"),
                )),
                Err(e) => Err(Response::outcome(
                    503,
                    "transient",
                    format!("{module}: {e}"),
                )),
            }
        }
        Body::None => Ok(Judged::Nothing),
        // A write happened; its non-JSON echo is withheld rather than refused.
        Body::Raw(_) if is_write(req) => {
            let mut r = Response {
                status: resp.status,
                headers: resp.headers.clone(),
                body: Body::Json(outcome(
                    "suppressed",
                    "information",
                    format!("{module}: the write succeeded; its non-JSON result is not shown"),
                )),
            };
            r.set_header("content-type", "application/fhir+json");
            Err(r)
        }
        Body::Raw(_) => Err(Response::outcome(
            406,
            "not-supported",
            format!("{module} checks JSON only: ask for application/fhir+json"),
        )),
    }
}

/// Judges the response (or, for HEAD, the fetched body standing in for it).
pub fn apply_judged(
    resp: &mut Response,
    judged: Judged,
    style: &Style,
    write: bool,
    judge: &mut Judge,
) -> Applied {
    match judged {
        Judged::InPlace => apply(resp, style, write, judge),
        Judged::Fetched(v) => {
            let mut stand_in = Response::json(200, v);
            let a = apply(&mut stand_in, style, false, judge);
            if a == Applied::Denied {
                *resp = stand_in;
                resp.body = Body::None;
            }
            a
        }
        Judged::Nothing => Applied::Filtered(0),
    }
}

/// Every page of a security lookup (relations, roles, Consents) as the entries' resources.
/// Fails closed: a non-200 page is `Unavailable`, more than `max` resources is `Failed`.
pub async fn lookup_all(
    cx: &Context,
    first: String,
    max: usize,
    what: &str,
) -> Result<Vec<Value>, ModuleError> {
    let mut out = Vec::new();
    let mut next = Some(first);
    while let Some(url) = next.take() {
        let (status, b) = cx.fhir.get_json(&url).await?;
        if status != 200 {
            return Err(ModuleError::Unavailable(format!(
                "{what} lookup answered {status}"
            )));
        }
        for e in b
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if e.at("/search/mode").and_then(Value::as_str) == Some("outcome") {
                continue;
            }
            if let Some(r) = e.get("resource") {
                out.push(r.clone());
            }
        }
        if out.len() > max {
            return Err(ModuleError::Failed(format!(
                "more than {max} resources in a {what} lookup for one caller"
            )));
        }
        next = crate::processor::next_link(&b);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn style() -> Style {
        Style {
            module: "Test",
            hide_existence: false,
            stub: false,
            reason: "not yours",
        }
    }

    fn obs(id: &str) -> Value {
        json!({"fullUrl": format!("http://up/fhir/Observation/{id}"),
               "resource": {"resourceType": "Observation", "id": id}, "search": {"mode": "match"}})
    }

    fn run(body: Value, style: &Style, deny_ids: &[&str]) -> (Response, Applied) {
        let mut resp = Response::json(200, body);
        let mut deny =
            |r: &Value| deny_ids.contains(&r.get("id").and_then(Value::as_str).unwrap_or(""));
        let mut gone = |_: Option<&str>| true;
        let a = apply(
            &mut resp,
            style,
            false,
            &mut Judge {
                deny: &mut deny,
                deny_resourceless: &mut gone,
            },
        );
        (resp, a)
    }

    fn ids(b: &Value) -> Vec<String> {
        b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{}/{}",
                    e["resource"]["resourceType"].as_str().unwrap_or("-"),
                    e["resource"]["id"].as_str().unwrap_or("-")
                )
            })
            .collect()
    }

    #[test]
    fn removal_drops_total_and_says_so() {
        let b = json!({"resourceType": "Bundle", "type": "searchset", "total": 30,
                       "link": [{"relation": "next", "url": "http://up/fhir/Observation?_offset=3"}],
                       "entry": [obs("1"), obs("2"), obs("3")]});
        let (r, a) = run(b, &style(), &["2"]);
        assert_eq!(a, Applied::Filtered(1));
        let b = r.json_body().unwrap();
        assert!(b.get("total").is_none());
        assert_eq!(
            ids(b),
            ["Observation/1", "Observation/3", "OperationOutcome/-"]
        );
        assert_eq!(b["entry"][2]["search"]["mode"], "outcome");
        assert!(!b.to_string().contains("Observation/2"));
    }

    #[test]
    fn total_kept_only_when_provably_right() {
        let b = json!({"resourceType": "Bundle", "type": "searchset", "total": 2,
                       "entry": [obs("1"), obs("2")]});
        let (r, _) = run(b, &style(), &[]);
        assert_eq!(r.json_body().unwrap()["total"], 2);
        // The whole result on one page: what the caller sees.
        let b = json!({"resourceType": "Bundle", "type": "searchset", "total": 3,
                       "entry": [obs("1"), obs("2"), obs("3")]});
        let (r, _) = run(b, &style(), &["2"]);
        assert_eq!(r.json_body().unwrap()["total"], 2);
        // Nothing matched vs. everything removed: the same answer.
        let none = json!({"resourceType": "Bundle", "type": "searchset", "total": 0});
        let all =
            json!({"resourceType": "Bundle", "type": "searchset", "total": 1, "entry": [obs("1")]});
        let mut s = style();
        s.hide_existence = true;
        let (a, _) = run(none, &s, &[]);
        let (b2, _) = run(all, &s, &["1"]);
        assert_eq!(a.json_body().unwrap().get("total"), None);
        assert_eq!(b2.json_body().unwrap().get("total"), None);
        assert_eq!(a.json_body().unwrap().get("entry"), None);
        assert_eq!(b2.json_body().unwrap()["entry"], json!([]));
        // More on other pages: the count could include what the caller may not see.
        let b = json!({"resourceType": "Bundle", "type": "searchset", "total": 9,
                       "link": [{"relation": "next", "url": "http://up/fhir/Observation?_offset=2"}],
                       "entry": [obs("1"), obs("2")]});
        let (r, _) = run(b, &style(), &[]);
        assert!(r.json_body().unwrap().get("total").is_none());
        // `_summary=count`: a number and no entries.
        let b = json!({"resourceType": "Bundle", "type": "searchset", "total": 40});
        let (r, _) = run(b, &style(), &[]);
        assert!(r.json_body().unwrap().get("total").is_none());
    }

    #[test]
    fn hide_existence_and_stub_forms() {
        let b = json!({"resourceType": "Bundle", "type": "searchset",
                       "entry": [obs("1"), obs("2")]});
        let mut s = style();
        s.hide_existence = true;
        let (r, _) = run(b.clone(), &s, &["2"]);
        assert_eq!(ids(r.json_body().unwrap()), ["Observation/1"]);
        let mut s = style();
        s.stub = true;
        let (r, _) = run(b, &s, &["2"]);
        let body = r.json_body().unwrap();
        assert_eq!(ids(body), ["Observation/1", "OperationOutcome/-"]);
        assert!(!body.to_string().contains("Observation/2"));
    }

    #[test]
    fn single_reads_and_batch_responses() {
        let (r, a) = run(
            json!({"resourceType": "Observation", "id": "2"}),
            &style(),
            &["2"],
        );
        assert_eq!((a, r.status), (Applied::Denied, 403));
        let mut s = style();
        s.hide_existence = true;
        let (r, _) = run(
            json!({"resourceType": "Observation", "id": "2"}),
            &s,
            &["2"],
        );
        assert_eq!(r.status, 404);

        let b = json!({"resourceType": "Bundle", "type": "batch-response", "entry": [
            {"resource": {"resourceType": "Observation", "id": "1"}, "response": {"status": "200 OK"}},
            {"resource": {"resourceType": "Observation", "id": "2"}, "response": {"status": "200 OK"}},
            {"resource": {"resourceType": "Bundle", "type": "searchset", "total": 2,
                          "entry": [obs("3"), obs("4")]}, "response": {"status": "200 OK"}}]});
        let (r, a) = run(b, &style(), &["2", "4"]);
        assert_eq!(a, Applied::Filtered(2));
        let b = r.json_body().unwrap();
        assert_eq!(b["entry"][0]["resource"]["id"], "1");
        assert!(b["entry"][1].get("resource").is_none());
        assert_eq!(b["entry"][1]["response"]["status"], "403 Forbidden");
        let inner = &b["entry"][2]["resource"];
        assert_eq!(inner["total"], 1);
        assert_eq!(ids(inner), ["Observation/3", "OperationOutcome/-"]);
    }

    #[test]
    fn history_deletions_are_judged_by_type() {
        let b = json!({"resourceType": "Bundle", "type": "history", "entry": [
            {"request": {"method": "DELETE", "url": "Observation/5"}, "response": {"status": "204"}},
            obs("1")]});
        let (r, a) = run(b, &style(), &[]);
        assert_eq!(a, Applied::Filtered(1));
        assert_eq!(ids(r.json_body().unwrap()), ["Observation/1"]);
        assert!(may_be_patient_data(Some("Observation")));
        assert!(may_be_patient_data(Some("Patient")));
        assert!(!may_be_patient_data(Some("Organization")));
    }

    #[test]
    fn subsetted_by_tag_or_request() {
        let tagged = json!({"resourceType": "Observation",
            "meta": {"tag": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}]}});
        assert!(is_subsetted(&tagged, ""));
        let plain = json!({"resourceType": "Observation"});
        assert!(!is_subsetted(&plain, "code=x"));
        assert!(is_subsetted(&plain, "_elements=id"));
        assert!(is_subsetted(&plain, "_summary=true"));
        assert!(!is_subsetted(&plain, "_summary=false"));
    }

    #[test]
    fn write_results_are_withheld_not_refused() {
        let mut resp = Response::json(200, json!({"resourceType": "Observation", "id": "2"}));
        resp.set_header("location", "http://up/fhir/Observation/2/_history/2");
        let mut deny = |_: &Value| true;
        let mut gone = |_: Option<&str>| true;
        let mut judge = Judge {
            deny: &mut deny,
            deny_resourceless: &mut gone,
        };
        assert_eq!(
            apply(&mut resp, &style(), true, &mut judge),
            Applied::Filtered(1)
        );
        assert_eq!(resp.status, 200, "the write happened");
        assert!(resp.header("location").is_some());
        let b = resp.json_body().unwrap();
        assert_eq!(b["resourceType"], "OperationOutcome");
        assert!(!b.to_string().contains("\"id\":\"2\""));

        let b = json!({"resourceType": "Bundle", "type": "transaction-response", "entry": [
            {"resource": {"resourceType": "Observation", "id": "9"},
             "response": {"status": "201 Created", "location": "Observation/9/_history/1"}}]});
        let (r, _) = run(b, &style(), &["9"]);
        let e = &r.json_body().unwrap()["entry"][0];
        assert!(e.get("resource").is_none());
        assert_eq!(e["response"]["status"], "201 Created");
        assert_eq!(e["response"]["outcome"]["issue"][0]["code"], "suppressed");
        let post = |path: &str| Request {
            method: "POST".into(),
            path: path.into(),
            query: String::new(),
            headers: vec![],
            body: None,
        };
        assert!(is_write(&post("/Observation")));
        assert!(!is_write(&post("/Observation/_search")));
        assert!(!is_write(&post("/Patient/1/$everything")));
        assert!(!is_write(&post("")), "a batch is judged entry by entry");
        assert!(!is_write(&post("/")));
    }
}
