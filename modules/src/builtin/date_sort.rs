//! DateSort (post) — `_sort=date` / `_sort=-date` for servers that cannot sort these types:
//! follows every `next` link (through the gateway's client, with the caller's audit headers)
//! up to `max` matches, merges, sorts (stable; missing dates last) and answers one searchset
//! without `next`. When `max` cuts the result, an OperationOutcome warning entry says so —
//! never silent.
//!
//! Dates: Observation and DiagnosticReport `effectiveDateTime` (else `effectivePeriod.start`);
//! Encounter, CarePlan, CareTeam, EpisodeOfCare `period.start`; Claim `created`.
//!
//! Settings: `max` (default 5000).

use crate::processor::{
    next_link, query_pairs, Body, Context, ModuleError, PostOutcome, PostProcess, Request, Response,
};
use crate::Identity;
use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default = "default_max")]
    pub max: usize,
}

fn default_max() -> usize {
    5000
}

pub struct DateSort {
    max: usize,
}

impl DateSort {
    pub const NAME: &'static str = "DateSort";

    pub fn new(s: Settings) -> Result<Self, String> {
        if s.max == 0 || s.max > 100_000 {
            return Err("max must be 1..=100000".into());
        }
        Ok(DateSort { max: s.max })
    }
}

const TYPES: &[&str] = &[
    "Observation",
    "DiagnosticReport",
    "Encounter",
    "CarePlan",
    "CareTeam",
    "EpisodeOfCare",
    "Claim",
];

/// `Some(descending)` when the request asks for a date sort this module handles.
fn date_sort(req: &Request) -> Option<bool> {
    let t = req.path.trim_matches('/');
    let search = (req.method == "GET" && !t.contains('/'))
        || (req.method == "POST" && t.ends_with("/_search") && t.matches('/').count() == 1);
    let ty = t.split('/').next().unwrap_or("");
    if !search || !TYPES.contains(&ty) {
        return None;
    }
    query_pairs(&req.query).find_map(|(k, v)| match (k, v) {
        ("_sort", "date") => Some(false),
        ("_sort", "-date") | ("_sort", "%2Ddate") => Some(true),
        _ => None,
    })
}

/// The date a resource sorts by.
fn date_of(r: &Value) -> Option<&str> {
    fn s(v: Option<&Value>) -> Option<&str> {
        v.and_then(Value::as_str)
    }
    match r.get("resourceType").and_then(Value::as_str)? {
        "Observation" | "DiagnosticReport" => s(r.get("effectiveDateTime"))
            .or_else(|| s(r.get("effectivePeriod").and_then(|p| p.get("start")))),
        "Encounter" | "CarePlan" | "CareTeam" | "EpisodeOfCare" => {
            s(r.get("period").and_then(|p| p.get("start")))
        }
        "Claim" => s(r.get("created")),
        _ => None,
    }
}

/// A FHIR date/dateTime/instant as seconds since 0000-03-01 UTC (for ordering only); partial
/// dates sort at their start. `None` when it does not parse.
pub fn sort_key(d: &str) -> Option<i64> {
    let b = d.as_bytes();
    let num = |s: usize, n: usize| -> Option<i64> {
        let part = d.get(s..s + n)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let year = num(0, 4)?;
    let month = if b.len() >= 7 { num(5, 2)? } else { 1 };
    let day = if b.len() >= 10 { num(8, 2)? } else { 1 };
    let (mut h, mut mi, mut sec, mut off) = (0, 0, 0, 0i64);
    if b.len() > 10 {
        if b[10] != b'T' {
            return None;
        }
        h = num(11, 2)?;
        mi = num(14, 2)?;
        sec = num(17, 2)?;
        let mut i = 19;
        if b.get(i) == Some(&b'.') {
            i += 1;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
        }
        match b.get(i) {
            Some(b'Z') => {}
            Some(&c) if c == b'+' || c == b'-' => {
                let oh = num(i + 1, 2)?;
                let om = num(i + 4, 2)?;
                off = (oh * 3600 + om * 60) * if c == b'+' { 1 } else { -1 };
            }
            _ => return None,
        }
    }
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe;
    Some(days * 86_400 + h * 3600 + mi * 60 + sec - off)
}

#[async_trait]
impl PostProcess for DateSort {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn applies(&self, req: &Request, _caller: Option<&Identity>) -> bool {
        date_sort(req).is_some()
    }

    async fn process(
        &self,
        req: &Request,
        resp: &mut Response,
        cx: &Context,
    ) -> Result<PostOutcome, ModuleError> {
        let Some(desc) = date_sort(req) else {
            return Ok(PostOutcome::Continue);
        };
        let first = match resp.json_body() {
            Some(b)
                if resp.status == 200
                    && b.get("type").and_then(Value::as_str) == Some("searchset") =>
            {
                b.clone()
            }
            _ => return Ok(PostOutcome::Continue),
        };
        let mut matches: Vec<Value> = Vec::new();
        let mut includes: Vec<Value> = Vec::new();
        let mut page = first.clone();
        let mut truncated = false;
        let mut pages = 0;
        loop {
            pages += 1;
            for e in page
                .get("entry")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
            {
                let mode = e
                    .get("search")
                    .and_then(|s| s.get("mode"))
                    .and_then(Value::as_str)
                    .unwrap_or("match");
                match mode {
                    "match" => {
                        if matches.len() >= self.max {
                            truncated = true;
                        } else {
                            matches.push(e);
                        }
                    }
                    "outcome" => {}
                    _ => includes.push(e),
                }
            }
            if truncated {
                break;
            }
            let Some(next) = next_link(&page) else { break };
            if pages > 10_000 {
                return Err(ModuleError::Failed("DateSort: paging does not end".into()));
            }
            let (status, body) = cx.fhir.get_json(&next).await?;
            if status != 200 {
                return Err(ModuleError::Failed(format!(
                    "DateSort: next page answered {status}"
                )));
            }
            page = body;
        }
        // Stable sort; missing or unparsable dates last in both directions.
        matches.sort_by(|a, b| {
            let ka = a.get("resource").and_then(date_of).and_then(sort_key);
            let kb = b.get("resource").and_then(date_of).and_then(sort_key);
            match (ka, kb) {
                (Some(x), Some(y)) => {
                    if desc {
                        y.cmp(&x)
                    } else {
                        x.cmp(&y)
                    }
                }
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => std::cmp::Ordering::Equal,
            }
        });
        let n = matches.len();
        let mut entries = matches;
        entries.extend(includes);
        let mut out = first;
        let obj = out.as_object_mut().expect("searchset object");
        if truncated {
            obj.shift_remove("total");
            entries.push(json!({
                "resource": {"resourceType":"OperationOutcome","issue":[{"severity":"warning","code":"too-costly",
                    "diagnostics": format!("DateSort returned the first {n} matches only (max {}); narrow the search", self.max)}]},
                "search": {"mode":"outcome"}
            }));
        } else {
            obj.insert("total".into(), json!(n));
        }
        obj.insert("entry".into(), Value::Array(entries));
        // One page: keep `self`, drop navigation links.
        if let Some(links) = obj.get_mut("link").and_then(Value::as_array_mut) {
            links.retain(|l| l.get("relation").and_then(Value::as_str) == Some("self"));
        }
        resp.body = Body::Json(out);
        Ok(PostOutcome::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{context_with, ScriptedClient};

    fn obs(id: &str, date: Option<&str>) -> Value {
        let mut r = json!({"resourceType":"Observation","id":id});
        if let Some(d) = date {
            r["effectiveDateTime"] = json!(d);
        }
        json!({"fullUrl": format!("http://s/Observation/{id}"), "resource": r, "search": {"mode":"match"}})
    }

    fn page(entries: Vec<Value>, next: Option<&str>) -> Value {
        let mut links = vec![json!({"relation":"self","url":"http://s/Observation?_sort=date"})];
        if let Some(n) = next {
            links.push(json!({"relation":"next","url":n}));
        }
        json!({"resourceType":"Bundle","type":"searchset","total":5,"link":links,"entry":entries})
    }

    fn req(q: &str) -> Request {
        Request {
            method: "GET".into(),
            path: "/Observation".into(),
            query: q.into(),
            headers: vec![],
            body: None,
        }
    }

    #[test]
    fn keys_order_mixed_precision_and_zones() {
        assert!(sort_key("2020").unwrap() < sort_key("2020-01-02").unwrap());
        assert!(
            sort_key("2020-01-02T10:00:00+02:00").unwrap()
                < sort_key("2020-01-02T09:00:00Z").unwrap()
        );
        assert_eq!(
            sort_key("2020-01-02T08:00:00Z"),
            sort_key("2020-01-02T10:00:00+02:00")
        );
        assert!(sort_key("2019-12-31T23:59:59.999Z").unwrap() < sort_key("2020").unwrap());
        assert_eq!(sort_key("garbage"), None);
        assert_eq!(sort_key("2020-13"), None);
    }

    #[tokio::test]
    async fn follows_next_merges_and_sorts_descending() {
        let m = DateSort::new(Settings { max: 100 }).unwrap();
        let r = req("_sort=-date&_count=2");
        assert!(m.applies(&r, None));
        let mut resp = Response::json(
            200,
            page(
                vec![obs("a", Some("2020-01-01")), obs("b", None)],
                Some("http://s/Observation?p=2"),
            ),
        );
        let (cx, client) = context_with(ScriptedClient::new(vec![
            (
                200,
                page(
                    vec![
                        obs("c", Some("2022-05-01")),
                        obs("d", Some("2021-01-01T00:00:00Z")),
                    ],
                    Some("http://s/Observation?p=3"),
                ),
            ),
            (200, page(vec![obs("e", Some("2019"))], None)),
        ]));
        m.process(&r, &mut resp, &cx).await.unwrap();
        assert_eq!(
            client.calls(),
            vec![
                "GET http://s/Observation?p=2",
                "GET http://s/Observation?p=3"
            ]
        );
        let b = resp.json_body().unwrap();
        let ids: Vec<&str> = b["entry"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["resource"]["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            vec!["c", "d", "a", "e", "b"],
            "descending, missing last"
        );
        assert_eq!(b["total"], 5);
        assert!(b["link"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["relation"] != "next"));
    }

    #[tokio::test]
    async fn truncation_is_never_silent() {
        let m = DateSort::new(Settings { max: 2 }).unwrap();
        let r = req("_sort=date");
        let mut resp = Response::json(
            200,
            page(
                vec![
                    obs("a", Some("2020")),
                    obs("b", Some("2019")),
                    obs("c", Some("2018")),
                ],
                Some("http://s/next"),
            ),
        );
        let (cx, client) = context_with(ScriptedClient::new(vec![]));
        m.process(&r, &mut resp, &cx).await.unwrap();
        assert!(
            client.calls().is_empty(),
            "stops paging once max is reached"
        );
        let b = resp.json_body().unwrap();
        let e = b["entry"].as_array().unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0]["resource"]["id"], "b");
        assert_eq!(e[2]["search"]["mode"], "outcome");
        assert_eq!(e[2]["resource"]["issue"][0]["severity"], "warning");
        assert!(b.get("total").is_none());
    }

    #[test]
    fn applies_only_to_date_sorts_on_known_types() {
        let m = DateSort::new(Settings { max: 10 }).unwrap();
        assert!(m.applies(&req("_sort=date"), None));
        assert!(!m.applies(&req("_sort=code"), None));
        assert!(!m.applies(
            &Request {
                path: "/Patient".into(),
                ..req("_sort=date")
            },
            None
        ));
        assert!(!m.applies(
            &Request {
                path: "/Observation/1".into(),
                ..req("_sort=date")
            },
            None
        ));
    }
}
