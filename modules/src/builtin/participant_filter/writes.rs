//! ParticipantFilter on the request side (pitfall 21): a participant may write only data of the
//! patients they may see. The response side cannot undo a write, so every write from a caller
//! the filter does not bypass is judged before it is sent, by the same owners (`owners()`) and
//! visible set the reads use:
//!
//! * create / update: every patient the body's compartment references name must be visible,
//!   and none may be unresolvable;
//! * update / patch / delete: the current version (read through `cx.fhir`) is judged the same
//!   way; a resource the caller may not even read is refused as a read would be (404 with
//!   `hide_existence`); a missing one is a create (PUT), else left to the server (answered
//!   404 by the gateway with `hide_existence`, like a hidden one);
//! * patch: no operation may touch an element that decides the owner
//!   (`compartment::decides_owner`); a patch that is neither JSON Patch nor FHIRPath Patch in
//!   JSON cannot be checked and is refused;
//! * batch / transaction: each write entry is judged the same way;
//! * conditional update / patch / delete reach this check as the gateway resolved them
//!   (`crate::conditional`): `_id=<ids the caller may see>`, each id judged as above; any
//!   other conditional (which resources it changes is the server's search) is refused.
//!
//! The same rules serve the scope filter (`smart::filter`) for `patient/` scopes, with the
//! token's patient as the visible set (`judge_compartment_write`).
//!
//! Who is judged: a caller the filter does not bypass who is a participant — holds a
//! participant role, or is one in the FHIR server (`fhirUser`, an identity link). A Writer
//! that is nobody (a service writing for others) is not: it sees no patient data, and what
//! it may write is the route policy's decision, as before.

use super::ParticipantFilter;
use crate::compartment::{decides_owner, in_compartment, owners, Owners};
use crate::filter::{self, Style};
use crate::identity::{valid_id, Role};
use crate::json::At;
use crate::links::Participant;
use crate::processor::{Context, ModuleError, Request, Response};
use crate::reference::{valid_type, Resolver};
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Methods whose requests change data.
pub(super) fn is_write_method(m: &str) -> bool {
    matches!(m, "POST" | "PUT" | "PATCH" | "DELETE")
}

/// One write: the request itself, or one entry of a batch / transaction.
struct Write<'a> {
    method: &'a str,
    /// Below the FHIR base, without slashes at the ends (`Observation/1`, `Observation`, ``).
    path: &'a str,
    /// The query (a type-level PUT / PATCH / DELETE with one is conditional).
    query: &'a str,
    body: Option<Body>,
}

enum Body {
    Json(Value),
    /// Present but not JSON (XML, a Binary patch in a Bundle, garbage).
    Opaque,
}

/// Who refuses, and the rule every refusal of patient data names.
#[derive(Clone, Copy)]
struct Voice<'a> {
    style: &'a Style,
    rule: &'static str,
}

impl Voice<'_> {
    fn refuse(&self, why: impl std::fmt::Display) -> Response {
        Response::outcome(403, "forbidden", format!("{}: {why}", self.style.module))
    }

    fn outside(&self, what: impl std::fmt::Display) -> Response {
        self.refuse(format!("{}: {what}", self.rule))
    }
}

const PARTICIPANT_RULE: &str =
    "a participant writes only data of the patients they take part in the care of";

/// Whose patients' data the caller may see: the participant filter's lookup, or a set fixed
/// by the token (the patient of `patient/` scopes).
enum Source<'a> {
    Participant(&'a ParticipantFilter, Option<Participant>),
    Fixed(Arc<BTreeSet<String>>),
}

/// Judges one request, with the visible set computed at most once.
struct Judge<'a> {
    voice: Voice<'a>,
    source: Source<'a>,
    cx: &'a Context,
    resolver: Resolver,
    visible: Option<Arc<BTreeSet<String>>>,
}

impl Judge<'_> {
    async fn visible(&mut self) -> Result<Arc<BTreeSet<String>>, ModuleError> {
        if let Some(v) = &self.visible {
            return Ok(v.clone());
        }
        let v = match &self.source {
            Source::Participant(f, who) => f.visible(who.clone(), self.cx).await?,
            Source::Fixed(v) => v.clone(),
        };
        self.visible = Some(v.clone());
        Ok(v)
    }

    fn refuse(&self, why: impl std::fmt::Display) -> Response {
        self.voice.refuse(why)
    }

    fn denied(&self) -> Response {
        filter::denied_response(self.voice.style)
    }

    /// `patient/` scopes reach a compartment type only inside the patient's compartment: a
    /// resource of such a type that is nobody's is not theirs either.
    fn compartment_only(&self, rtype: &str) -> bool {
        matches!(self.source, Source::Fixed(_)) && in_compartment(rtype)
    }

    /// Write rule: every owner visible, none unknown (a read needs only one visible owner,
    /// but a write puts data into every owner's compartment).
    async fn may_write(&mut self, o: &Owners, rtype: &str) -> Result<bool, ModuleError> {
        if !o.is_patient_data() {
            return Ok(!self.compartment_only(rtype));
        }
        if o.unknown {
            return Ok(false);
        }
        let visible = self.visible().await?;
        Ok(o.patients.iter().all(|p| visible.contains(p)))
    }

    async fn judge(&mut self, w: &Write<'_>) -> Result<Option<Response>, ModuleError> {
        let segs: Vec<&str> = if w.path.is_empty() {
            vec![]
        } else {
            w.path.split('/').collect()
        };
        match (w.method, segs.as_slice()) {
            ("POST", []) => self.bundle(w).await,
            // Searches and operations do not write a resource of the caller's.
            ("POST", _) if segs.last() == Some(&"_search") || w.path.contains('$') => Ok(None),
            ("POST", [t]) => self.body(w, t).await,
            // What the gateway makes of a conditional (`conditional.rs`): the resources named
            // by `_id` alone, each judged as if named in the path (a missing one is no match).
            ("PUT" | "PATCH" | "DELETE", [t]) => match crate::conditional::ids_only(w.query) {
                Some(ids) if valid_type(t) => {
                    for id in &ids {
                        if let Some(no) = self.existing(t, id, true).await? {
                            return Ok(Some(no));
                        }
                    }
                    match w.method {
                        "PUT" => self.body(w, t).await,
                        "PATCH" => Ok(patch(w, self.voice)),
                        _ => Ok(None),
                    }
                }
                _ => Ok(Some(self.refuse(
                    "conditional updates, patches and deletes are not accepted from participants \
                     unless the gateway resolved them (which resources they change is not checked)",
                ))),
            },
            (m, [t, id]) if valid_type(t) && valid_id(id) => {
                if let Some(no) = self.existing(t, id, m == "PUT").await? {
                    return Ok(Some(no));
                }
                match m {
                    "PUT" => self.body(w, t).await,
                    "PATCH" => Ok(patch(w, self.voice)),
                    _ => Ok(None),
                }
            }
            _ => Ok(Some(self.refuse(format!(
                "{} /{} is not a write the gateway can check for a participant",
                w.method, w.path
            )))),
        }
    }

    /// Create or update: the resource written.
    async fn body(&mut self, w: &Write<'_>, rtype: &str) -> Result<Option<Response>, ModuleError> {
        let v = match &w.body {
            Some(Body::Json(v)) => v,
            Some(Body::Opaque) => return Ok(Some(self.refuse(
                "a participant's writes are checked as FHIR JSON only: send application/fhir+json",
            ))),
            None => return Ok(Some(self.refuse("a create or update needs a resource"))),
        };
        if v.get("resourceType").and_then(Value::as_str) != Some(rtype) {
            return Ok(Some(
                self.refuse(format!("the resource written is not a {rtype}")),
            ));
        }
        let o = owners(v, &self.resolver);
        if self.may_write(&o, rtype).await? {
            return Ok(None);
        }
        Ok(Some(self.voice.outside(format!(
            "the {rtype} written names a patient outside them"
        ))))
    }

    /// Update, patch, delete: the resource as it is now decides. `Ok(None)` also when it does
    /// not exist (a PUT creates it: its body alone is judged).
    async fn existing(
        &mut self,
        rtype: &str,
        id: &str,
        put: bool,
    ) -> Result<Option<Response>, ModuleError> {
        let (status, current) = self.cx.fhir.get_json(&format!("{rtype}/{id}")).await?;
        match status {
            200 => {}
            // With hide_existence a patch or delete of nothing answers as one of a hidden
            // resource does (a server's 204 for deleting nothing would tell the two apart).
            404 | 410 if !put && self.voice.style.hide_existence => return Ok(Some(self.denied())),
            404 | 410 => return Ok(None),
            s => {
                return Err(ModuleError::Unavailable(format!(
                    "reading {rtype}/{id} before a write answered {s}"
                )))
            }
        }
        let o = owners(&current, &self.resolver);
        if !o.is_patient_data() && !self.compartment_only(rtype) {
            return Ok(None);
        }
        let visible = self.visible().await?;
        let sees = if self.compartment_only(rtype) {
            o.patients.iter().any(|p| visible.contains(p))
        } else {
            super::allowed(&o, &visible)
        };
        if !sees {
            // Not even readable: answered as a read would be (no existence confirmed).
            return Ok(Some(self.denied()));
        }
        if self.may_write(&o, rtype).await? {
            return Ok(None);
        }
        Ok(Some(self.voice.outside(format!(
            "{rtype}/{id} also belongs to a patient outside them"
        ))))
    }

    /// Every write entry of a batch or transaction, judged as if sent alone.
    async fn bundle(&mut self, w: &Write<'_>) -> Result<Option<Response>, ModuleError> {
        let Some(Body::Json(b)) = &w.body else {
            return Ok(Some(
                self.refuse("a batch or transaction is checked as JSON only"),
            ));
        };
        let entries = b
            .get("entry")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let bases = [self.cx.public_base.clone(), self.cx.upstream_base.clone()];
        for (i, e) in entries.iter().enumerate() {
            let method = e.at("/request/method").and_then(Value::as_str);
            let url = e.at("/request/url").and_then(Value::as_str);
            let (Some(method), Some(url)) = (method, url) else {
                return Ok(Some(self.refuse(format!(
                    "Bundle entry {i} has no request method and url"
                ))));
            };
            if !is_write_method(method) {
                continue;
            }
            // Relative, or absolute on this server (the gateway's public base or the server's).
            let url = bases
                .iter()
                .find_map(|b| url.strip_prefix(b.trim_end_matches('/')))
                .unwrap_or(url);
            if url.contains("://") {
                return Ok(Some(
                    self.refuse(format!("Bundle entry {i}: {url} is not on this server")),
                ));
            }
            // With a query, a type-level PUT / PATCH / DELETE is conditional.
            let (path, query) = url.split_once('?').unwrap_or((url, ""));
            let path = path.trim_matches('/');
            if path.is_empty() {
                return Ok(Some(self.refuse(format!(
                    "Bundle entry {i}: a Bundle inside a Bundle is not accepted from participants"
                ))));
            }
            let body = e.get("resource").map(|r| {
                // A patch entry's Binary holds base64 the gateway does not decode.
                if r.get("resourceType").and_then(Value::as_str) == Some("Binary")
                    && method == "PATCH"
                {
                    Body::Opaque
                } else {
                    Body::Json(r.clone())
                }
            });
            let entry = Write {
                method,
                path,
                query,
                body,
            };
            if let Some(mut no) = Box::pin(self.judge(&entry)).await? {
                add_entry(&mut no, i);
                return Ok(Some(no));
            }
        }
        Ok(None)
    }
}

/// Says which Bundle entry a refusal is about.
fn add_entry(r: &mut Response, i: usize) {
    if let Some(d) = r
        .json_body_mut()
        .and_then(|b| b.pointer_mut("/issue/0/diagnostics"))
    {
        if let Some(s) = d.as_str() {
            *d = Value::String(format!("{s} (Bundle entry {i})"));
        }
    }
}

/// A patch may not touch what decides whose data the resource is.
fn patch(w: &Write<'_>, voice: Voice<'_>) -> Option<Response> {
    let touched = |what: &str| {
        voice.outside(format!(
            "a participant's patch may not change {what}, which decides whose data the \
             resource is"
        ))
    };
    let unreadable = || {
        voice.refuse(
            "a participant's patch must be JSON Patch or FHIRPath Patch (Parameters) in JSON; \
             this one cannot be checked",
        )
    };
    match &w.body {
        Some(Body::Json(Value::Array(ops))) => {
            for op in ops {
                let Some(kind) = op.get("op").and_then(Value::as_str) else {
                    return Some(unreadable());
                };
                if kind == "test" {
                    continue;
                }
                for key in ["path", "from"] {
                    let Some(p) = op.get(key) else { continue };
                    let Some(p) = p.as_str() else {
                        return Some(unreadable());
                    };
                    match pointer_head(p) {
                        None => return Some(touched("the whole resource")),
                        Some(head) if decides_owner(&head) => {
                            return Some(touched(&format!("/{head}")))
                        }
                        Some(_) => {}
                    }
                }
            }
            None
        }
        Some(Body::Json(v))
            if v.get("resourceType").and_then(Value::as_str) == Some("Parameters") =>
        {
            let rtype = w.path.split('/').next().unwrap_or("");
            for p in v
                .get("parameter")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if p.get("name").and_then(Value::as_str) != Some("operation") {
                    return Some(unreadable());
                }
                let part = |name: &str| {
                    p.get("part")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .find(|x| x.get("name").and_then(Value::as_str) == Some(name))
                };
                let text = |name: &str| {
                    part(name).and_then(|x| {
                        ["valueString", "valueCode"]
                            .iter()
                            .find_map(|k| x.get(*k).and_then(Value::as_str))
                    })
                };
                let Some(path) = text("path") else {
                    return Some(unreadable());
                };
                let head = match fhirpath_head(path, rtype) {
                    Err(()) => return Some(unreadable()),
                    Ok(Some(h)) => h,
                    // At the root, the element added is `name`.
                    Ok(None) => match text("name") {
                        Some(n) => n.to_string(),
                        None => return Some(touched("the whole resource")),
                    },
                };
                if decides_owner(&head) {
                    return Some(touched(&head));
                }
            }
            None
        }
        _ => Some(unreadable()),
    }
}

/// The first element a JSON Pointer names (`/performer/0` → `performer`); `None` for the root.
fn pointer_head(p: &str) -> Option<String> {
    let rest = p.strip_prefix('/')?;
    let head = rest.split('/').next().unwrap_or("");
    Some(head.replace("~1", "/").replace("~0", "~"))
}

/// The first element of a FHIRPath Patch path (`Observation.subject.reference` → `subject`);
/// `Ok(None)` for the resource itself; `Err` for what cannot be read as a plain element path
/// (a function such as `where(...)`, a variable, another type's name).
fn fhirpath_head(path: &str, rtype: &str) -> Result<Option<String>, ()> {
    let path = path.trim();
    let rest = if path == rtype {
        return Ok(None);
    } else {
        path.strip_prefix(rtype)
            .and_then(|r| r.strip_prefix('.'))
            .unwrap_or(path)
    };
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(rest.len());
    let (head, after) = rest.split_at(end);
    // Element names start lower-case; a type name or function call is not read.
    if !head.starts_with(|c: char| c.is_ascii_lowercase())
        || !(after.is_empty() || after.starts_with('.') || after.starts_with('['))
    {
        return Err(());
    }
    Ok(Some(head.to_string()))
}

impl ParticipantFilter {
    /// The request-side rule for writes (see the module's notes): `Some` refuses the write.
    pub(super) async fn judge_write(
        &self,
        req: &Request,
        cx: &Context,
    ) -> Result<Option<Response>, ModuleError> {
        let who = match &cx.identity {
            Some(id) => cx.links.resolve(id, cx.fhir.as_ref()).await?,
            None => None,
        };
        let participant_role = cx.identity.as_ref().is_some_and(|id| {
            [Role::Patient, Role::Practitioner, Role::RelatedPerson]
                .into_iter()
                .any(|r| id.has(r))
        });
        if who.is_none() && !participant_role {
            return Ok(None);
        }
        let voice = Voice {
            style: &self.style,
            rule: PARTICIPANT_RULE,
        };
        judge(req, cx, voice, Source::Participant(self, who)).await
    }
}

async fn judge(
    req: &Request,
    cx: &Context,
    voice: Voice<'_>,
    source: Source<'_>,
) -> Result<Option<Response>, ModuleError> {
    let body = req.json().map(|r| match r {
        Ok(v) => Body::Json(v),
        Err(_) => Body::Opaque,
    });
    let w = Write {
        method: &req.method,
        path: req.path.trim_matches('/'),
        query: &req.query,
        body,
    };
    let mut judge = Judge {
        voice,
        source,
        cx,
        resolver: Resolver::new(&[cx.public_base.as_str(), cx.upstream_base.as_str()]),
        visible: None,
    };
    judge.judge(&w).await
}

/// The same rules for a caller whose data is fixed by the token (`patient/` scopes: the
/// patient's compartment), refusals worded by `style` and naming `rule`.
pub(crate) async fn judge_compartment_write(
    req: &Request,
    cx: &Context,
    style: &Style,
    rule: &'static str,
    visible: Arc<BTreeSet<String>>,
) -> Result<Option<Response>, ModuleError> {
    judge(req, cx, Voice { style, rule }, Source::Fixed(visible)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, Role};
    use crate::processor::PostProcess;
    use crate::testing::{context_with, ScriptedClient};
    use serde_json::json;

    fn filter(s: Value) -> ParticipantFilter {
        ParticipantFilter::new(serde_json::from_value(s).unwrap()).unwrap()
    }

    fn caller(roles: &[Role], fhir_user: &str) -> Identity {
        Identity {
            user_id: "u".into(),
            roles: roles.to_vec(),
            fhir_user: Some(fhir_user.to_string()),
            ..Default::default()
        }
    }

    fn patient() -> Identity {
        caller(&[Role::Patient, Role::Writer], "Patient/12")
    }

    fn req(method: &str, path: &str, body: Option<Value>) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            query: String::new(),
            headers: vec![],
            body: body.map(|b| b.to_string().into_bytes()),
        }
    }

    fn obs(id: &str, subject: &str) -> Value {
        json!({"resourceType": "Observation", "id": id, "status": "final",
               "subject": {"reference": subject}})
    }

    /// The server: Observation/mine (Patient/12's), Observation/theirs (Patient/99's).
    fn server() -> ScriptedClient {
        ScriptedClient::by_url(vec![
            ("Observation/mine", 200, obs("mine", "Patient/12")),
            ("Observation/theirs", 200, obs("theirs", "Patient/99")),
            (
                "Observation/new",
                404,
                json!({"resourceType": "OperationOutcome"}),
            ),
        ])
    }

    async fn check(
        f: &ParticipantFilter,
        who: Identity,
        r: Request,
    ) -> (Option<Response>, Vec<String>) {
        let (mut cx, client) = context_with(server());
        cx.identity = Some(who);
        let out = f.check_write(&r, &cx).await.unwrap();
        (out, client.calls())
    }

    fn diagnostics(r: &Response) -> String {
        r.json_body().unwrap()["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[tokio::test]
    async fn bodies_naming_another_patient_are_refused() {
        let f = filter(json!({}));
        let (r, _) = check(
            &f,
            patient(),
            req("POST", "/Observation", Some(obs("x", "Patient/99"))),
        )
        .await;
        let r = r.expect("refused");
        assert_eq!(r.status, 403);
        assert!(diagnostics(&r).contains("names a patient outside them"));
        // An absolute reference to this server is the same patient; another server's is unknown.
        for (subject, ok) in [
            ("Patient/12", true),
            ("http://fhir.internal/fhir/Patient/12", true),
            ("https://elsewhere.example/fhir/Patient/12", false),
            ("urn:uuid:0c7b4a8e-0000-4000-8000-000000000000", false),
        ] {
            let (r, _) = check(
                &f,
                patient(),
                req("POST", "/Observation", Some(obs("x", subject))),
            )
            .await;
            assert_eq!(r.is_none(), ok, "{subject}");
        }
        // A second owner outside the visible set is enough.
        let mut two = obs("new", "Patient/12");
        two["performer"] = json!([{"reference": "Patient/99"}]);
        let (r, calls) = check(&f, patient(), req("PUT", "/Observation/new", Some(two))).await;
        assert_eq!(r.unwrap().status, 403);
        assert_eq!(
            calls,
            ["GET Observation/new"],
            "a missing resource is a create"
        );
        // Not patient data: the policy alone decides.
        let (r, _) = check(
            &f,
            patient(),
            req(
                "POST",
                "/Organization",
                Some(json!({"resourceType": "Organization"})),
            ),
        )
        .await;
        assert!(r.is_none());
        // The body must be the URL's type, and JSON.
        let (r, _) = check(
            &f,
            patient(),
            req(
                "POST",
                "/Organization",
                Some(
                    json!({"resourceType": "Observation", "subject": {"reference": "Patient/99"}}),
                ),
            ),
        )
        .await;
        assert_eq!(r.unwrap().status, 403);
        let mut xml = req("POST", "/Observation", None);
        xml.body = Some(b"<Observation/>".to_vec());
        assert_eq!(check(&f, patient(), xml).await.0.unwrap().status, 403);
    }

    #[tokio::test]
    async fn the_existing_owner_decides_updates_patches_and_deletes() {
        let f = filter(json!({}));
        let (r, calls) = check(
            &f,
            patient(),
            req(
                "PUT",
                "/Observation/theirs",
                Some(obs("theirs", "Patient/12")),
            ),
        )
        .await;
        assert_eq!(r.unwrap().status, 403);
        assert_eq!(calls, ["GET Observation/theirs"]);
        for m in ["PATCH", "DELETE"] {
            let body = (m == "PATCH")
                .then(|| json!([{"op": "replace", "path": "/status", "value": "amended"}]));
            let (r, _) = check(&f, patient(), req(m, "/Observation/theirs", body)).await;
            assert_eq!(r.unwrap().status, 403, "{m}");
        }
        // hide_existence: not confirmed to exist.
        let hidden = filter(json!({"hide_existence": true}));
        let (r, _) = check(
            &hidden,
            patient(),
            req("DELETE", "/Observation/theirs", None),
        )
        .await;
        assert_eq!(r.unwrap().status, 404);
        let (r, _) = check(&hidden, patient(), req("DELETE", "/Observation/new", None)).await;
        assert_eq!(r.unwrap().status, 404, "nothing there: the same answer");
        // Own data: allowed.
        let (r, _) = check(
            &f,
            patient(),
            req("PUT", "/Observation/mine", Some(obs("mine", "Patient/12"))),
        )
        .await;
        assert!(r.is_none());
        let (r, _) = check(&f, patient(), req("DELETE", "/Observation/mine", None)).await;
        assert!(r.is_none());
        // Moving own data to someone else: the body decides.
        let (r, _) = check(
            &f,
            patient(),
            req("PUT", "/Observation/mine", Some(obs("mine", "Patient/99"))),
        )
        .await;
        assert_eq!(r.unwrap().status, 403);
        // Conditional writes the gateway did not resolve are refused outright.
        let mut cond = req("DELETE", "/Observation", None);
        cond.query = "subject=Patient/12".into();
        let (r, calls) = check(&f, patient(), cond).await;
        assert!(diagnostics(&r.unwrap()).contains("conditional"));
        assert!(calls.is_empty());
        // Resolved ones (`_id=` alone) are judged id by id; a missing id is no match.
        let by_id = |m: &str, ids: &str, body: Option<Value>| {
            let mut r = req(m, "/Observation", body);
            r.query = format!("_id={ids}");
            r
        };
        let (r, _) = check(&f, patient(), by_id("DELETE", "mine,new", None)).await;
        assert!(r.is_none());
        let (r, _) = check(&f, patient(), by_id("DELETE", "mine,theirs", None)).await;
        assert_eq!(r.unwrap().status, 403);
        let (r, _) = check(
            &f,
            patient(),
            by_id("PUT", "mine", Some(obs("mine", "Patient/99"))),
        )
        .await;
        assert_eq!(r.unwrap().status, 403);
        let (r, _) = check(
            &f,
            patient(),
            by_id("PUT", "new", Some(obs("new", "Patient/12"))),
        )
        .await;
        assert!(r.is_none());
    }

    #[tokio::test]
    async fn a_lookup_failure_fails_closed() {
        let f = filter(json!({}));
        let (mut cx, _) = context_with(ScriptedClient::by_url(vec![(
            "Observation/",
            503,
            json!({"resourceType": "OperationOutcome"}),
        )]));
        cx.identity = Some(patient());
        let r = f
            .check_write(&req("DELETE", "/Observation/mine", None), &cx)
            .await;
        assert!(matches!(r, Err(ModuleError::Unavailable(_))), "{r:?}");
    }

    #[tokio::test]
    async fn patches_may_not_touch_what_decides_the_owner() {
        let f = filter(json!({}));
        let json_patch = |ops: Value| req("PATCH", "/Observation/mine", Some(ops));
        for (ops, ok) in [
            (
                json!([{"op": "replace", "path": "/status", "value": "amended"}]),
                true,
            ),
            (
                json!([{"op": "test", "path": "/subject/reference", "value": "Patient/12"},
                    {"op": "replace", "path": "/status", "value": "amended"}]),
                true,
            ),
            (
                json!([{"op": "replace", "path": "/subject/reference", "value": "Patient/99"}]),
                false,
            ),
            (
                json!([{"op": "add", "path": "/performer/0", "value": {"reference": "Patient/99"}}]),
                false,
            ),
            (
                json!([{"op": "move", "from": "/subject", "path": "/focus"}]),
                false,
            ),
            (
                json!([{"op": "replace", "path": "", "value": obs("mine", "Patient/99")}]),
                false,
            ),
            (json!([{"op": "replace", "path": "/su~1bject"}]), true),
            (json!([{"path": "/status"}]), false),
        ] {
            let (r, _) = check(&f, patient(), json_patch(ops.clone())).await;
            assert_eq!(r.is_none(), ok, "{ops}");
            if let Some(r) = r {
                assert_eq!(r.status, 403);
            }
        }
        let fhirpath = |path: &str, name: Option<&str>| {
            let mut part = vec![
                json!({"name": "type", "valueCode": "add"}),
                json!({"name": "path", "valueString": path}),
            ];
            if let Some(n) = name {
                part.push(json!({"name": "name", "valueString": n}));
            }
            json_patch(json!({"resourceType": "Parameters", "parameter": [
                {"name": "operation", "part": part}]}))
        };
        for (path, name, ok) in [
            ("Observation.note", Some("text"), true),
            ("Observation.subject", None, false),
            ("Observation.performer[0]", None, false),
            ("subject.reference", None, false),
            ("Observation", Some("subject"), false),
            ("Observation", Some("note"), true),
            ("Observation.where(true)", Some("subject"), false),
            ("Resource.subject", None, false),
        ] {
            let (r, _) = check(&f, patient(), fhirpath(path, name)).await;
            assert_eq!(r.is_none(), ok, "{path} {name:?}");
        }
        // A patch format that cannot be read: refused.
        let mut xml = req("PATCH", "/Observation/mine", None);
        xml.body = Some(b"<diff/>".to_vec());
        let (r, _) = check(&f, patient(), xml).await;
        assert!(diagnostics(&r.unwrap()).contains("cannot be checked"));
    }

    #[tokio::test]
    async fn bundles_are_judged_entry_by_entry() {
        let f = filter(json!({}));
        let bundle = |entries: Value| {
            req(
                "POST",
                "",
                Some(json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})),
            )
        };
        let ok = json!([
            {"request": {"method": "GET", "url": "Observation/theirs"}},
            {"resource": obs("x", "Patient/12"), "request": {"method": "POST", "url": "Observation"}},
            {"request": {"method": "DELETE", "url": "http://fhir.internal/fhir/Observation/mine"}}
        ]);
        assert!(check(&f, patient(), bundle(ok)).await.0.is_none());
        let bad = json!([
            {"resource": obs("x", "Patient/12"), "request": {"method": "POST", "url": "Observation"}},
            {"resource": obs("y", "Patient/99"), "request": {"method": "POST", "url": "Observation"}}
        ]);
        let r = check(&f, patient(), bundle(bad)).await.0.unwrap();
        assert_eq!(r.status, 403);
        assert!(
            diagnostics(&r).ends_with("(Bundle entry 1)"),
            "{}",
            diagnostics(&r)
        );
        let binary_patch = json!([{"resource": {"resourceType": "Binary", "data": "W10="},
            "request": {"method": "PATCH", "url": "Observation/mine"}}]);
        assert_eq!(
            check(&f, patient(), bundle(binary_patch))
                .await
                .0
                .unwrap()
                .status,
            403
        );
        let conditional =
            json!([{"request": {"method": "DELETE", "url": "Observation?subject=Patient/99"}}]);
        assert_eq!(
            check(&f, patient(), bundle(conditional))
                .await
                .0
                .unwrap()
                .status,
            403
        );
    }

    #[tokio::test]
    async fn practitioners_write_for_their_patients_and_admins_bypass() {
        let f = filter(json!({"relations": ["general_practitioner"]}));
        let (mut cx, _) = context_with(ScriptedClient::by_url(vec![(
            "Patient?",
            200,
            json!({"resourceType": "Bundle", "entry": [
                {"resource": {"resourceType": "Patient", "id": "A",
                              "generalPractitioner": [{"reference": "Practitioner/p1"}]}}]}),
        )]));
        cx.identity = Some(caller(
            &[Role::Practitioner, Role::Writer],
            "Practitioner/p1",
        ));
        let create = |subject: &str| req("POST", "/Observation", Some(obs("x", subject)));
        assert!(f
            .check_write(&create("Patient/A"), &cx)
            .await
            .unwrap()
            .is_none());
        assert_eq!(
            f.check_write(&create("Patient/B"), &cx)
                .await
                .unwrap()
                .unwrap()
                .status,
            403
        );
        let admin = caller(&[Role::Administrator], "Practitioner/p1");
        assert!(!f.checks_write(&create("Patient/B"), Some(&admin)));
        assert!(f.checks_write(&create("Patient/B"), Some(&patient())));
        assert!(f.checks_write(&req("DELETE", "/Observation/1", None), None));
        // A Writer that is nobody in the FHIR server (a service) is not a participant; one
        // with a participant role but no identity there is, and sees (writes) nothing.
        let nobody = |roles: &[Role]| Identity {
            user_id: "svc".into(),
            roles: roles.to_vec(),
            ..Default::default()
        };
        let (mut cx, _) = context_with(ScriptedClient::by_url(vec![(
            "",
            200,
            json!({"resourceType": "Bundle", "type": "searchset", "entry": []}),
        )]));
        cx.identity = Some(nobody(&[Role::Writer]));
        assert!(f
            .check_write(&create("Patient/B"), &cx)
            .await
            .unwrap()
            .is_none());
        cx.identity = Some(nobody(&[Role::Patient, Role::Writer]));
        assert_eq!(
            f.check_write(&create("Patient/B"), &cx)
                .await
                .unwrap()
                .unwrap()
                .status,
            403
        );
        assert!(!f.checks_write(&req("GET", "/Observation/1", None), None));
    }
}
