//! A transaction the server runs as a batch keeps its meaning: all of it or none of it.
//!
//! Before it is sent (`pin`), each resource an update, patch or delete names is read and the
//! entry pinned to the version found (`ifMatch`): that version is what an undo restores, and a
//! writer in between makes the entry fail instead of being overwritten. After the server
//! answered (`finish`), a batch-response whose entries all succeeded becomes the
//! `transaction-response`; otherwise every entry that wrote is undone, last first, each undo
//! pinned to the version the batch made, and the answer is the failing entry's status with an
//! OperationOutcome naming it (500 listing what could not be undone, if anything).

use super::Caps;
use crate::json::At;
use crate::processor::{Body, ClientRequest, Context, ModuleError, Request, Response};
use serde_json::{json, Value};
use std::collections::HashSet;

/// `Type/id` for `Type/id` or `Type?_id=id` (the `conditional_put` form); `None` for any other
/// conditional URL.
fn target_of(url: &str) -> Option<String> {
    let url = url.trim_start_matches('/');
    if let Some((t, q)) = url.split_once('?') {
        let id = q.strip_prefix("_id=").filter(|id| !id.contains('&'))?;
        return Some(format!("{t}/{id}"));
    }
    let mut parts = url.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(t), Some(id), None) if !t.is_empty() && !id.is_empty() => Some(format!("{t}/{id}")),
        _ => None,
    }
}

/// `3` for `W/"3"`, `"3"` or `3`.
fn version_of(etag: &str) -> &str {
    etag.trim_start_matches("W/").trim_matches('"')
}

fn refuse(status: u16, code: &'static str, msg: String) -> Option<Response> {
    Some(Response::outcome(status, code, msg))
}

/// Reads the current version of every resource an update, patch or delete names and pins the
/// entry to it. `Some` refuses the transaction before anything is written.
pub(super) async fn pin(
    entries: &mut [Value],
    fresh: &HashSet<String>,
    caps: &Caps,
    cx: &Context,
) -> Result<Option<Response>, ModuleError> {
    let mut seen = HashSet::new();
    for (i, e) in entries.iter_mut().enumerate() {
        let method = e["request"]["method"].as_str().unwrap_or("").to_string();
        let url = e["request"]["url"].as_str().unwrap_or("").to_string();
        if !matches!(method.as_str(), "PUT" | "PATCH" | "DELETE") {
            continue;
        }
        let Some(target) = target_of(&url) else {
            if method == "PUT" {
                // A conditional update that matched nothing is a create: the answer names it.
                continue;
            }
            return Ok(refuse(
                400,
                "not-supported",
                format!("entry {i}: a conditional {method} ({url}) cannot be undone if another entry fails, so it is refused in a transaction the server does not run itself"),
            ));
        };
        // R4 (transaction processing rules): overlapping identities fail the transaction.
        if !seen.insert(target.clone()) {
            return Ok(refuse(
                400,
                "invalid",
                format!("entry {i}: {target} is changed by more than one entry of the transaction"),
            ));
        }
        if fresh.contains(&target) {
            continue;
        }
        let current = cx.fhir.send(ClientRequest::get(target.clone())).await?;
        match current.status {
            200 => {}
            404 | 410 => continue, // nothing there: an undo deletes what the entry makes
            s => {
                return Err(ModuleError::Unavailable(format!(
                    "reading {target} to pin its version answered {s}"
                )))
            }
        }
        let version = current
            .json_body()
            .and_then(|r| r.at("/meta/versionId"))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                ModuleError::Failed(format!(
                    "{target} has no meta.versionId: the transaction could not be undone"
                ))
            })?
            .to_string();
        let rtype = target.split('/').next().unwrap_or("");
        if caps.no_vread.contains(rtype) {
            return Ok(refuse(
                400,
                "not-supported",
                format!("entry {i}: the server keeps no versions of {rtype} (no vread), so {method} {target} could not be undone if another entry failed"),
            ));
        }
        match e["request"].get("ifMatch").and_then(Value::as_str) {
            Some(theirs) if version_of(theirs) != version => {
                return Ok(refuse(
                    412,
                    "conflict",
                    format!("entry {i}: If-Match {theirs} but {target} is at version {version}; nothing was written"),
                ));
            }
            _ => e["request"]["ifMatch"] = json!(format!("W/\"{version}\"")),
        }
    }
    Ok(None)
}

fn bundle_type(r: &Request) -> Option<String> {
    match r.json()? {
        Ok(b) => b.get("type").and_then(Value::as_str).map(str::to_string),
        Err(_) => None,
    }
}

/// `201` of `201 Created`.
fn status_of(entry: &Value) -> u16 {
    entry
        .at("/response/status")
        .and_then(Value::as_str)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Gives a converted transaction its meaning back (see the module comment).
pub(super) async fn finish(
    original: &Request,
    sent: &Request,
    resp: &mut Response,
    cx: &Context,
) -> Result<(), ModuleError> {
    if bundle_type(original).as_deref() != Some("transaction")
        || bundle_type(sent).as_deref() != Some("batch")
    {
        return Ok(()); // not converted
    }
    let is_batch_response = resp.status == 200
        && resp
            .json_body()
            .and_then(|b| b.get("type"))
            .and_then(Value::as_str)
            == Some("batch-response");
    if !is_batch_response {
        return Ok(()); // the server refused the batch whole: nothing was written
    }
    let Some(Ok(sent)) = sent.json() else {
        return Ok(());
    };
    let Some(Ok(original)) = original.json() else {
        return Ok(());
    };
    let empty = Vec::new();
    let entries = |b: &Value| b.get("entry").and_then(Value::as_array).cloned();
    let sent_entries = entries(&sent).unwrap_or_default();
    let answers = resp.json_body().and_then(entries).unwrap_or_default();
    if sent_entries.len() != answers.len() {
        return Err(ModuleError::Failed(format!(
            "the server answered {} entries for a batch of {}: the transaction's outcome is unknown",
            answers.len(),
            sent_entries.len()
        )));
    }
    let Some(failed) = answers
        .iter()
        .position(|a| !(200..300).contains(&status_of(a)))
    else {
        if let Some(b) = resp.json_body_mut() {
            b["type"] = json!("transaction-response");
        }
        return Ok(());
    };

    let mut undone = 0;
    let mut not_undone = Vec::new();
    for (j, (s, a)) in sent_entries.iter().zip(&answers).enumerate().rev() {
        if !(200..300).contains(&status_of(a)) {
            continue;
        }
        match undo(s, a, cx).await {
            Ok(true) => undone += 1,
            Ok(false) => {}
            Err(why) => not_undone.push(format!("entry {j}: {why}")),
        }
    }

    let orig = original
        .get("entry")
        .and_then(Value::as_array)
        .unwrap_or(&empty)
        .get(failed);
    let what = orig
        .map(|e| {
            format!(
                "{} {}",
                e["request"]["method"].as_str().unwrap_or(""),
                e["request"]["url"].as_str().unwrap_or("")
            )
        })
        .unwrap_or_default();
    let status = status_of(&answers[failed]);
    let line = answers[failed]
        .at("/response/status")
        .and_then(Value::as_str)
        .unwrap_or("");
    let why = server_diagnostics(&answers[failed]);
    if not_undone.is_empty() {
        let code = match status {
            404 | 410 => "not-found",
            409 | 412 => "conflict",
            _ => "processing",
        };
        let status = if (400..600).contains(&status) {
            status
        } else {
            400
        };
        *resp = Response::outcome(
            status,
            code,
            format!("transaction failed at entry {failed} ({what}): {line}{why}; nothing was kept ({undone} written entries undone)"),
        );
    } else {
        log::error!(
            "transaction {} failed at entry {failed} and could not be fully undone: {}",
            cx.correlation_id,
            not_undone.join("; ")
        );
        *resp = Response::outcome(
            500,
            "exception",
            format!("transaction failed at entry {failed} ({what}): {line}{why}; the gateway could not undo every entry written before it ({}): those changes remain", not_undone.join("; ")),
        );
    }
    Ok(())
}

fn server_diagnostics(answer: &Value) -> String {
    let oo = answer
        .at("/response/outcome")
        .or_else(|| answer.get("resource"));
    oo.and_then(|o| o.at("/issue/0/diagnostics"))
        .and_then(Value::as_str)
        .map(|d| format!(" ({d})"))
        .unwrap_or_default()
}

/// The resource an entry wrote, and the version it made: from the URL sent, else from the
/// answer's `location` (`[base/]Type/id/_history/n`).
fn written(sent: &Value, answer: &Value, cx: &Context) -> Option<(String, Option<String>)> {
    let location = answer.at("/response/location").and_then(Value::as_str);
    let from_location = location.map(|l| {
        let l = l
            .strip_prefix(cx.upstream_base.as_str())
            .unwrap_or(l)
            .trim_start_matches('/');
        let (res, version) = match l.split_once("/_history/") {
            Some((r, v)) => (r, Some(v.to_string())),
            None => (l, None),
        };
        (res.to_string(), version)
    });
    let version = answer
        .at("/response/etag")
        .and_then(Value::as_str)
        .map(|e| version_of(e).to_string())
        .or_else(|| from_location.as_ref().and_then(|(_, v)| v.clone()));
    let url = sent["request"]["url"].as_str().unwrap_or("");
    let target = target_of(url)
        .filter(|_| sent["request"]["method"] != "POST")
        .or_else(|| from_location.map(|(r, _)| r))?;
    Some((target, version))
}

/// Undoes one entry that wrote: `Ok(false)` when it changed nothing.
async fn undo(sent: &Value, answer: &Value, cx: &Context) -> Result<bool, String> {
    let method = sent["request"]["method"].as_str().unwrap_or("");
    if !matches!(method, "POST" | "PUT" | "PATCH" | "DELETE") {
        return Ok(false);
    }
    let prior = sent["request"]
        .get("ifMatch")
        .and_then(Value::as_str)
        .map(version_of);
    if method == "DELETE" && prior.is_none() {
        return Ok(false); // it deleted nothing
    }
    let Some((target, made)) = written(sent, answer, cx) else {
        return Err(format!("{method}: the server did not say what it wrote"));
    };
    let mut headers = vec![(
        "content-type".to_string(),
        "application/fhir+json".to_string(),
    )];
    if let Some(v) = &made {
        // A writer after the batch wins; the undo then reports instead of overwriting.
        headers.push(("if-match".into(), format!("W/\"{v}\"")));
    }
    let send =
        |req: ClientRequest| async move { cx.fhir.send(req).await.map_err(|e| e.to_string()) };
    let Some(prior) = prior else {
        let r = send(ClientRequest {
            method: "DELETE".into(),
            path_and_query: target.clone(),
            headers,
            body: None,
        })
        .await?;
        return match r.status {
            200..=299 | 404 | 410 => Ok(true),
            s => Err(format!("deleting {target} answered {s}")),
        };
    };
    let old = send(ClientRequest::get(format!("{target}/_history/{prior}"))).await?;
    let mut resource = match (old.status, old.body) {
        (200, Body::Json(v)) => v,
        (s, _) => return Err(format!("reading {target} version {prior} answered {s}")),
    };
    if let Some(meta) = resource.get_mut("meta").and_then(Value::as_object_mut) {
        meta.shift_remove("versionId");
        meta.shift_remove("lastUpdated");
        if meta.is_empty() {
            resource.as_object_mut().map(|o| o.shift_remove("meta"));
        }
    }
    let body = serde_json::to_vec(&resource).map_err(|e| e.to_string())?;
    let r = send(ClientRequest {
        method: "PUT".into(),
        path_and_query: target.clone(),
        headers,
        body: Some(body),
    })
    .await?;
    match r.status {
        200 | 201 => Ok(true),
        s => Err(format!(
            "restoring {target} to version {prior} answered {s}"
        )),
    }
}

#[cfg(test)]
mod tests;
