//! Running a corpus request for one caller and judging the answer against the oracle; and the
//! calibration of the corpus against SEKMET directly (no gateway) before that.

use crate::corpus::{Body, Expect, Req};
use crate::oracle::Oracle;
use crate::seed::{Key, Seed};
use serde_json::Value;
use std::collections::BTreeSet;

/// Per-caller counts.
#[derive(Default, Debug)]
pub struct Tally {
    pub caller: String,
    pub requests: usize,
    /// Resources returned (entries that are not OperationOutcomes, plus single reads).
    pub returned: usize,
    /// Returned though the caller may not see them (or not seeded by this run at all).
    pub foreign: usize,
    /// Visible to the caller, matching the request, and not returned.
    pub missing: usize,
    pub leaks: Vec<String>,
    pub misses: Vec<String>,
    /// Contract violations that are neither (status codes, `total`, outcome entries...).
    pub problems: Vec<String>,
}

pub async fn call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: &Body,
) -> (u16, Value) {
    let mut rb = match method {
        "GET" => http.get(url),
        "POST" => http.post(url),
        m => panic!("method {m}"),
    };
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    rb = rb.header("Accept", "application/fhir+json");
    rb = match body {
        Body::None => rb,
        Body::Form(f) => rb
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(f.clone()),
        Body::Json(v) => rb
            .header("Content-Type", "application/fhir+json")
            .body(v.to_string()),
    };
    let r = rb
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

pub fn key_of(res: &Value) -> Option<Key> {
    Some(format!(
        "{}/{}",
        res["resourceType"].as_str()?,
        res["id"].as_str()?
    ))
}

fn next_link(b: &Value) -> Option<String> {
    b["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")
        .and_then(|l| l["url"].as_str())
        .map(str::to_string)
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 300 {
        format!("{}…", &s[..300])
    } else {
        s
    }
}

/// Entries of a set of Bundle pages.
#[derive(Default)]
pub struct Seen {
    pub matches: Vec<Key>,
    pub includes: Vec<Key>,
    pub outcome: bool,
    pub totals: Vec<u64>,
}

impl Seen {
    pub fn add_page(&mut self, b: &Value) {
        if let Some(t) = b["total"].as_u64() {
            self.totals.push(t);
        }
        for e in b["entry"].as_array().into_iter().flatten() {
            let res = &e["resource"];
            if res["resourceType"] == "OperationOutcome" {
                if e["search"]["mode"] == "outcome" {
                    self.outcome = true;
                }
                continue;
            }
            let Some(k) = key_of(res) else { continue };
            if e["search"]["mode"] == "include" {
                self.includes.push(k);
            } else {
                self.matches.push(k);
            }
        }
    }

    pub fn all(&self) -> BTreeSet<Key> {
        self.matches
            .iter()
            .chain(self.includes.iter())
            .cloned()
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Calibration: the corpus's expectations against SEKMET itself (a suite bug if they differ).

pub async fn calibrate(seed: &Seed, req: &Req) -> Result<Req, String> {
    let http = crate::harness::client();
    let url = if req.path.is_empty() {
        seed.sekmet.clone()
    } else {
        format!("{}/{}", seed.sekmet, req.path)
    };
    let (status, body) = call(&http, req.method, &url, None, &req.body).await;
    let what = format!("{} {} «{}»", req.method, req.path, req.label);
    if status != 200 {
        return Err(format!("{what}: SEKMET said {status} {}", short(&body)));
    }
    let mut out = req.clone();
    match &req.expect {
        Expect::Read(k) => {
            if key_of(&body).as_ref() != Some(k) {
                return Err(format!("{what}: expected {k}, got {}", short(&body)));
            }
        }
        Expect::Bundle { matches, .. } | Expect::AdminNext { matches } => {
            let empty = BTreeSet::new();
            let includes = match &req.expect {
                Expect::Bundle { includes, .. } => includes,
                _ => &empty,
            };
            let seen = direct_pages(&http, body).await;
            compare(&what, &seen, matches, includes)?;
        }
        Expect::Page { of, .. } => {
            let seen = direct_pages(&http, body).await;
            let got: BTreeSet<Key> = seen.matches.iter().cloned().collect();
            if !got.is_subset(of) || got.is_empty() || !seen.includes.is_empty() {
                return Err(format!(
                    "{what}: page {got:?} not a non-empty subset of {of:?}"
                ));
            }
            out.expect = Expect::Page {
                of: of.clone(),
                matches: got,
            };
        }
        Expect::Count { matches } => {
            if body["total"].as_u64() != Some(matches.len() as u64) {
                return Err(format!(
                    "{what}: total {} != {}",
                    body["total"],
                    matches.len()
                ));
            }
        }
        Expect::Batch(exps) => {
            let entries = body["entry"].as_array().cloned().unwrap_or_default();
            if entries.len() != exps.len() {
                return Err(format!("{what}: {} entries", entries.len()));
            }
            for (i, (e, x)) in entries.iter().zip(exps).enumerate() {
                let res = &e["resource"];
                match x {
                    Expect::Read(k) => {
                        if key_of(res).as_ref() != Some(k) {
                            return Err(format!("{what}: entry {i} {}", short(e)));
                        }
                    }
                    Expect::Bundle { matches, includes } => {
                        let mut seen = Seen::default();
                        seen.add_page(res);
                        compare(&format!("{what} entry {i}"), &seen, matches, includes)?;
                    }
                    _ => unreachable!(),
                }
            }
        }
    }
    Ok(out)
}

async fn direct_pages(http: &reqwest::Client, first: Value) -> Seen {
    let mut seen = Seen::default();
    let mut page = first;
    for _ in 0..30 {
        seen.add_page(&page);
        let Some(next) = next_link(&page) else { break };
        let (st, b) = call(http, "GET", &next, None, &Body::None).await;
        assert_eq!(st, 200, "SEKMET next page {next}");
        page = b;
    }
    seen
}

fn compare(
    what: &str,
    seen: &Seen,
    matches: &BTreeSet<Key>,
    includes: &BTreeSet<Key>,
) -> Result<(), String> {
    let m: BTreeSet<Key> = seen.matches.iter().cloned().collect();
    let i: BTreeSet<Key> = seen.includes.iter().cloned().collect();
    if &m != matches || &i != includes {
        return Err(format!(
            "{what}: SEKMET matches {m:?} includes {i:?}; declared matches {matches:?} includes {includes:?}"
        ));
    }
    if let Some(t) = seen.totals.first() {
        if *t != matches.len() as u64 {
            return Err(format!("{what}: SEKMET total {t} != {}", matches.len()));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Judging the gateway's answers.

pub struct Judge<'a> {
    pub http: reqwest::Client,
    /// The gateway's public FHIR base.
    pub base: String,
    pub oracle: Oracle<'a>,
    pub token: String,
    pub admin_token: String,
    /// Expected status of a denied single read (403, or 404 with hide_existence).
    pub denied_status: u16,
}

impl Judge<'_> {
    fn url(&self, path: &str) -> String {
        if path.is_empty() {
            self.base.clone()
        } else {
            format!("{}/{path}", self.base)
        }
    }

    pub async fn run(&self, req: &Req, t: &mut Tally) {
        t.requests += 1;
        let what = format!("{} {} «{}»", req.method, req.path, req.label);
        match &req.expect {
            Expect::Read(k) => {
                let (st, b) = call(
                    &self.http,
                    req.method,
                    &self.url(&req.path),
                    Some(&self.token),
                    &req.body,
                )
                .await;
                self.judge_read(&what, st, &b, k, t);
            }
            Expect::Bundle { matches, includes } => {
                let (st, b) = call(
                    &self.http,
                    req.method,
                    &self.url(&req.path),
                    Some(&self.token),
                    &req.body,
                )
                .await;
                let pages = self.pages(&what, st, b, t).await;
                let universe: BTreeSet<Key> = matches.union(includes).cloned().collect();
                self.judge_bundle(
                    &what,
                    &pages,
                    matches,
                    includes,
                    &universe,
                    matches.len(),
                    t,
                );
            }
            Expect::Count { matches } => {
                let (st, b) = call(
                    &self.http,
                    req.method,
                    &self.url(&req.path),
                    Some(&self.token),
                    &req.body,
                )
                .await;
                self.judge_count(&what, st, &b, matches, t);
            }
            Expect::Batch(exps) => {
                let (st, b) = call(
                    &self.http,
                    req.method,
                    &self.url(&req.path),
                    Some(&self.token),
                    &req.body,
                )
                .await;
                self.judge_batch(&what, st, &b, exps, t);
            }
            Expect::AdminNext { matches } => {
                let (st, b) = call(
                    &self.http,
                    "GET",
                    &self.url(&req.path),
                    Some(&self.admin_token),
                    &Body::None,
                )
                .await;
                if st != 200 {
                    t.problems
                        .push(format!("{what}: admin's first page {st} {}", short(&b)));
                    return;
                }
                let mut first = Seen::default();
                first.add_page(&b);
                let Some(next) = next_link(&b) else {
                    t.problems
                        .push(format!("{what}: admin's first page has no next link"));
                    return;
                };
                if !next.starts_with(&self.base) {
                    t.problems
                        .push(format!("{what}: next link {next} is not the gateway's"));
                    return;
                }
                let rest: BTreeSet<Key> = matches
                    .iter()
                    .filter(|k| !first.matches.contains(k))
                    .cloned()
                    .collect();
                let (st, b) = call(&self.http, "GET", &next, Some(&self.token), &Body::None).await;
                let what = format!("{what} → next {next}");
                let pages = self.pages(&what, st, b, t).await;
                self.judge_bundle(
                    &what,
                    &pages,
                    &rest,
                    &BTreeSet::new(),
                    matches,
                    matches.len(),
                    t,
                );
            }
            Expect::Page { of, matches } => {
                assert!(!matches.is_empty(), "{what}: not calibrated");
                let (st, b) = call(
                    &self.http,
                    req.method,
                    &self.url(&req.path),
                    Some(&self.token),
                    &req.body,
                )
                .await;
                let pages = self.pages(&what, st, b, t).await;
                self.judge_bundle(&what, &pages, matches, &BTreeSet::new(), of, of.len(), t);
            }
        }
    }

    fn judge_read(&self, what: &str, st: u16, b: &Value, k: &Key, t: &mut Tally) {
        let visible = self.oracle.visible(k);
        if st == 200 {
            t.returned += 1;
            let got = key_of(b);
            if got.as_ref() != Some(k) {
                t.problems
                    .push(format!("{what}: 200 with {got:?}, expected {k}"));
            }
            if !visible {
                t.foreign += 1;
                t.leaks.push(format!("{what}: 200 with {k}"));
            }
        } else {
            self.judge_denied(what, st, b, t);
            if visible {
                t.missing += 1;
                t.misses
                    .push(format!("{what}: {st} for visible {k}: {}", short(b)));
            }
        }
    }

    /// A denial: the configured status, an OperationOutcome with the right code.
    fn judge_denied(&self, what: &str, st: u16, b: &Value, t: &mut Tally) {
        let code = if self.denied_status == 404 {
            "not-found"
        } else {
            "forbidden"
        };
        if st != self.denied_status
            || b["resourceType"] != "OperationOutcome"
            || b["issue"][0]["code"] != code
        {
            t.problems.push(format!(
                "{what}: denial is {st} {} (want {} OperationOutcome {code})",
                short(b),
                self.denied_status
            ));
        }
    }

    /// Follows `next` links (as this caller) from a first answer; each page must be a Bundle.
    async fn pages(&self, what: &str, st: u16, first: Value, t: &mut Tally) -> Vec<Value> {
        let mut pages = vec![];
        let (mut st, mut page) = (st, first);
        for _ in 0..30 {
            if st != 200 || page["resourceType"] != "Bundle" {
                t.problems
                    .push(format!("{what}: page answered {st} {}", short(&page)));
                break;
            }
            let next = next_link(&page);
            pages.push(page);
            let Some(next) = next else { break };
            if !next.starts_with(&self.base) {
                t.problems
                    .push(format!("{what}: next link {next} is not the gateway's"));
                break;
            }
            (st, page) = call(&self.http, "GET", &next, Some(&self.token), &Body::None).await;
        }
        pages
    }

    /// `expected_*`: what these pages hold without filtering; `universe`: every resource of the
    /// whole search (for the `total` rule), `universe_matches`: how many of them are matches.
    #[allow(clippy::too_many_arguments)]
    fn judge_bundle(
        &self,
        what: &str,
        pages: &[Value],
        expected_matches: &BTreeSet<Key>,
        expected_includes: &BTreeSet<Key>,
        universe: &BTreeSet<Key>,
        universe_matches: usize,
        t: &mut Tally,
    ) {
        let mut seen = Seen::default();
        for p in pages {
            seen.add_page(p);
        }
        for k in seen.matches.iter().chain(seen.includes.iter()) {
            t.returned += 1;
            if !self.oracle.seed.res.contains_key(k) {
                t.foreign += 1;
                t.leaks
                    .push(format!("{what}: returned {k}, not seeded by this run"));
            } else if !self.oracle.visible(k) {
                t.foreign += 1;
                t.leaks.push(format!(
                    "{what}: returned {k} (compartment of {:?})",
                    crate::oracle::owners(self.oracle.seed, k)
                ));
            }
        }
        let got = seen.all();
        let expected: BTreeSet<Key> = expected_matches.union(expected_includes).cloned().collect();
        for k in &expected {
            if self.oracle.visible(k) && !got.contains(k) {
                t.missing += 1;
                t.misses.push(format!("{what}: missing {k}"));
            }
        }
        if pages.is_empty() {
            return;
        }
        let removed_here = expected.iter().any(|k| !self.oracle.visible(k));
        let removed_any = universe.iter().any(|k| !self.oracle.visible(k));
        // FHIR allows `search.mode` entries in searchsets only: a filtered history Bundle
        // says nothing (its `total` is still dropped, checked below).
        let searchset = pages.iter().all(|p| p["type"] == "searchset");
        if removed_here && searchset && !seen.outcome {
            t.problems.push(format!(
                "{what}: entries were removed but no search.mode=outcome OperationOutcome entry"
            ));
        }
        // After a removal `total` may only say what this caller sees, and only when the whole
        // result is on one page (otherwise it could count hidden matches on other pages).
        let visible_matches = seen.matches.len() as u64;
        for total in &seen.totals {
            if removed_any {
                if pages.len() > 1 || *total != visible_matches {
                    t.problems.push(format!(
                        "{what}: total {total} after removal (visible matches {visible_matches}, pages {}, unfiltered {universe_matches})",
                        pages.len()
                    ));
                }
            } else if *total != universe_matches as u64 {
                t.problems.push(format!(
                    "{what}: total {total}, expected {universe_matches}"
                ));
            }
        }
    }

    fn judge_count(&self, what: &str, st: u16, b: &Value, matches: &BTreeSet<Key>, t: &mut Tally) {
        let vis = matches.iter().filter(|k| self.oracle.visible(k)).count();
        let all = matches.len();
        if st != 200 {
            if vis == all {
                t.problems
                    .push(format!("{what}: {st} {} for an unfiltered count", short(b)));
            } else {
                self.judge_denied(what, st, b, t);
            }
            return;
        }
        let mut seen = Seen::default();
        seen.add_page(b);
        if !seen.matches.is_empty() || !seen.includes.is_empty() {
            t.problems.push(format!(
                "{what}: _summary=count with entries {:?}",
                seen.all()
            ));
        }
        match b["total"].as_u64() {
            None if vis == all => t
                .problems
                .push(format!("{what}: no total though nothing is hidden ({all})")),
            None => {}
            Some(n) if n as usize == vis => {}
            Some(n) if n as usize > vis => {
                t.foreign += n as usize - vis;
                t.leaks.push(format!(
                    "{what}: total {n} but the caller may see {vis} of {all}"
                ));
            }
            Some(n) => {
                t.missing += vis - n as usize;
                t.misses
                    .push(format!("{what}: total {n} but the caller may see {vis}"));
            }
        }
    }

    fn judge_batch(&self, what: &str, st: u16, b: &Value, exps: &[Expect], t: &mut Tally) {
        let entries = b["entry"].as_array().cloned().unwrap_or_default();
        if st != 200 || b["type"] != "batch-response" || entries.len() != exps.len() {
            t.problems.push(format!(
                "{what}: {st} with {} entries: {}",
                entries.len(),
                short(b)
            ));
            for x in exps {
                if let Expect::Read(k) = x {
                    if self.oracle.visible(k) {
                        t.missing += 1;
                        t.misses.push(format!("{what}: batch failed, {k} missing"));
                    }
                }
            }
        }
        for (i, (e, x)) in entries.iter().zip(exps).enumerate() {
            let w = format!("{what} entry {i}");
            let status = e["response"]["status"].as_str().unwrap_or("");
            let res = &e["resource"];
            match x {
                Expect::Read(k) => {
                    let visible = self.oracle.visible(k);
                    if status.starts_with("200") {
                        t.returned += 1;
                        if key_of(res).as_ref() != Some(k) {
                            t.problems.push(format!("{w}: 200 with {}", short(res)));
                        }
                        if !visible {
                            t.foreign += 1;
                            t.leaks.push(format!("{w}: 200 with {k}"));
                        }
                    } else {
                        let want = self.denied_status.to_string();
                        if !status.starts_with(&want)
                            || !(res.is_null() || res["resourceType"] == "OperationOutcome")
                        {
                            t.problems.push(format!(
                                "{w}: denied entry is {status:?} {} (want {want}, no resource)",
                                short(e)
                            ));
                            if res["resourceType"] != "OperationOutcome" && !res.is_null() {
                                if let Some(rk) = key_of(res) {
                                    t.returned += 1;
                                    if !visible {
                                        t.foreign += 1;
                                        t.leaks.push(format!("{w}: {status} but carries {rk}"));
                                    }
                                }
                            }
                        }
                        if visible {
                            t.missing += 1;
                            t.misses.push(format!("{w}: {status} for visible {k}"));
                        }
                    }
                }
                Expect::Bundle { matches, includes } => {
                    if !status.starts_with("200") || res["resourceType"] != "Bundle" {
                        t.problems.push(format!("{w}: {status} {}", short(e)));
                    }
                    let universe: BTreeSet<Key> = matches.union(includes).cloned().collect();
                    self.judge_bundle(
                        &w,
                        std::slice::from_ref(res),
                        matches,
                        includes,
                        &universe,
                        matches.len(),
                        t,
                    );
                }
                _ => unreachable!(),
            }
        }
    }
}
