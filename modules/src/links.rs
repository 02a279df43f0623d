//! Who a caller *is* in the FHIR server: the `fhirUser` claim, else an identity link.
//!
//! Links live in the FHIR server itself — an `identifier` `{system: <configured>, value:
//! "<tid>/<oid>"}` on the linked Patient, Practitioner or RelatedPerson — so every gateway
//! instance shares them without a database of its own. Resolutions are cached for a short TTL;
//! a link written through this instance, or a write of a linkable type, drops the cache.

use crate::identity::{valid_id, Identity};
use crate::processor::{next_link, ClientRequest, FhirClient, ModuleError, Response};
use crate::reference::{valid_type, Ref};
use moka::sync::Cache;
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

/// The resource types a caller can be.
pub const LINK_TYPES: [&str; 3] = ["Patient", "Practitioner", "RelatedPerson"];

/// A caller's own FHIR resource.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Participant {
    Patient(String),
    Practitioner(String),
    RelatedPerson(String),
}

impl Participant {
    pub fn from_ref(r: &Ref) -> Option<Participant> {
        let id = r.id.clone();
        Some(match r.rtype.as_str() {
            "Patient" => Participant::Patient(id),
            "Practitioner" => Participant::Practitioner(id),
            "RelatedPerson" => Participant::RelatedPerson(id),
            _ => return None,
        })
    }

    pub fn reference(&self) -> Ref {
        match self {
            Participant::Patient(id) => Ref::new("Patient", id),
            Participant::Practitioner(id) => Ref::new("Practitioner", id),
            Participant::RelatedPerson(id) => Ref::new("RelatedPerson", id),
        }
    }
}

/// `identity_links:` in the gateway's YAML.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LinkSettings {
    /// Identifier system of link identifiers on the linked resources.
    #[serde(default = "default_system")]
    pub system: String,
    /// How long a resolution is reused (0: every request asks the server).
    #[serde(default = "default_ttl")]
    pub cache_ttl_secs: u64,
}

fn default_system() -> String {
    "urn:fhir-gateway:identity-link".into()
}

fn default_ttl() -> u64 {
    60
}

impl Default for LinkSettings {
    fn default() -> Self {
        LinkSettings {
            system: default_system(),
            cache_ttl_secs: default_ttl(),
        }
    }
}

impl LinkSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.system.is_empty() || self.system.contains(['|', ',', '$', '\\', ' ']) {
            return Err(format!(
                "identity_links.system {:?} must be a non-empty URI without | , $ \\ or spaces",
                self.system
            ));
        }
        Ok(())
    }
}

/// Percent-encodes a search parameter value (everything but unreserved characters).
pub fn pct(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `Patient/123` or an absolute URL ending in it (`fhirUser` may name any base: the IdP
/// knows the server by its public URL).
pub fn parse_fhir_user(s: &str) -> Option<Ref> {
    let path = s.split(['?', '#']).next()?;
    let segs: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let n = segs.len();
    let (t, id) = if n >= 4 && segs[n - 2] == "_history" {
        (segs[n - 4], segs[n - 3])
    } else if n >= 2 {
        (segs[n - 2], segs[n - 1])
    } else {
        return None;
    };
    (valid_type(t) && valid_id(id)).then(|| Ref::new(t, id))
}

/// One link, as `/manage` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub tenant: Option<String>,
    pub oid: String,
    pub reference: String,
}

impl Link {
    fn json(&self) -> Value {
        json!({"tenant": self.tenant, "oid": self.oid, "reference": self.reference})
    }
}

/// Link value of a tenant + object id.
pub fn link_value(tenant: Option<&str>, oid: &str) -> String {
    match tenant {
        Some(t) if !t.is_empty() => format!("{t}/{oid}"),
        _ => oid.to_string(),
    }
}

fn unavailable(what: &str, status: u16) -> ModuleError {
    ModuleError::Unavailable(format!("identity link lookup ({what}) answered {status}"))
}

pub struct Directory {
    settings: LinkSettings,
    cache: Cache<String, Option<Ref>>,
}

impl Directory {
    pub fn new(settings: LinkSettings) -> Directory {
        let ttl = Duration::from_secs(settings.cache_ttl_secs.max(1));
        Directory {
            settings,
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
        }
    }

    pub fn settings(&self) -> &LinkSettings {
        &self.settings
    }

    /// The caller's own resource: `fhirUser` first, else a link; `None` when neither names a
    /// Patient, Practitioner or RelatedPerson. Lookup failure is an error (fail closed).
    pub async fn resolve(
        &self,
        id: &Identity,
        fhir: &dyn FhirClient,
    ) -> Result<Option<Participant>, ModuleError> {
        if let Some(fu) = id.fhir_user.as_deref().filter(|f| !f.is_empty()) {
            // A claim we cannot read names nobody: no patient data rather than a guess.
            return Ok(parse_fhir_user(fu).and_then(|r| Participant::from_ref(&r)));
        }
        // A SMART launch patient without fhirUser: the caller acts for that patient only.
        if let Some(p) = id.patient_context() {
            return Ok(Some(Participant::Patient(p)));
        }
        if id.user_id.is_empty() {
            return Ok(None);
        }
        let value = link_value(id.tenant.as_deref(), &id.user_id);
        if self.settings.cache_ttl_secs > 0 {
            if let Some(hit) = self.cache.get(&value) {
                return Ok(hit.as_ref().and_then(Participant::from_ref));
            }
        }
        let found = self.lookup(fhir, &value).await?;
        if self.settings.cache_ttl_secs > 0 {
            self.cache.insert(value, found.clone());
        }
        Ok(found.as_ref().and_then(Participant::from_ref))
    }

    /// Asks the server which resource carries the link `value` (never cached).
    async fn lookup(&self, fhir: &dyn FhirClient, value: &str) -> Result<Option<Ref>, ModuleError> {
        let q = format!(
            "identifier={}|{}&_elements=identifier&_count=2",
            pct(&self.settings.system),
            pct(value)
        );
        let paths: Vec<String> = LINK_TYPES.iter().map(|t| format!("{t}?{q}")).collect();
        let answers = futures::future::join_all(paths.iter().map(|p| fhir.get_json(p))).await;
        let mut found = Vec::new();
        for (t, a) in LINK_TYPES.iter().zip(answers) {
            let (status, b) = a?;
            if status != 200 {
                return Err(unavailable(t, status));
            }
            for e in b
                .get("entry")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let r = &e["resource"];
                if r.get("resourceType").and_then(Value::as_str) != Some(t) {
                    continue;
                }
                // Check the identifier ourselves: a server with loose token matching must
                // not make one user another.
                let exact = self.link_values(r).any(|v| v == value);
                if let (true, Some(id)) = (exact, r.get("id").and_then(Value::as_str)) {
                    if valid_id(id) {
                        found.push(Ref::new(t, id));
                    }
                }
            }
        }
        match found.len() {
            0 => Ok(None),
            1 => Ok(found.pop()),
            _ => Err(ModuleError::Failed(format!(
                "identity {value} is linked to more than one resource ({}); fix it with /manage",
                found
                    .iter()
                    .map(Ref::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    fn link_values<'a>(&'a self, r: &'a Value) -> impl Iterator<Item = &'a str> + 'a {
        r.get("identifier")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|i| {
                i.get("system").and_then(Value::as_str) == Some(self.settings.system.as_str())
            })
            .filter_map(|i| i.get("value").and_then(Value::as_str))
    }

    /// A write of a linkable type may have added or removed a link identifier.
    pub fn invalidate(&self, rtype: &str) {
        if LINK_TYPES.contains(&rtype) {
            self.cache.invalidate_all();
        }
    }

    // ---- the /manage API (Administrator only; the gateway checks the role) ----

    /// `find`: candidates of a type by name.
    pub async fn find(&self, fhir: &dyn FhirClient, rtype: &str, name: &str) -> Response {
        if !LINK_TYPES.contains(&rtype) {
            return Response::outcome(
                400,
                "invalid",
                format!("type must be one of {}", LINK_TYPES.join(", ")),
            );
        }
        if name.trim().is_empty() || name.len() > 200 {
            return Response::outcome(400, "invalid", "name is required (at most 200 bytes)");
        }
        let path = format!("{rtype}?name={}&_count=50", pct(name.trim()));
        let (status, b) = match fhir.get_json(&path).await {
            Ok(a) => a,
            Err(e) => return Response::outcome(503, "transient", e.to_string()),
        };
        if status != 200 {
            return Response::outcome(502, "transient", format!("search answered {status}"));
        }
        let candidates: Vec<Value> = b
            .get("entry")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let r = &e["resource"];
                let id = r.get("id")?.as_str()?;
                Some(json!({
                    "reference": format!("{rtype}/{id}"),
                    "display": display_name(r),
                    "birthDate": r.get("birthDate"),
                    "linked": self.link_values(r).collect::<Vec<_>>(),
                }))
            })
            .collect();
        Response::json(200, json!({ "candidates": candidates }))
    }

    /// `list`: every link, all pages of every linkable type.
    pub async fn list(&self, fhir: &dyn FhirClient) -> Response {
        let mut links = Vec::new();
        for t in LINK_TYPES {
            let mut next = Some(format!(
                "{t}?identifier={}%7C&_elements=identifier&_count=200",
                pct(&self.settings.system)
            ));
            let mut pages = 0;
            while let Some(url) = next.take() {
                pages += 1;
                if pages > 500 {
                    return Response::outcome(500, "too-costly", "more than 500 pages of links");
                }
                let (status, b) = match fhir.get_json(&url).await {
                    Ok(a) => a,
                    Err(e) => return Response::outcome(503, "transient", e.to_string()),
                };
                if status != 200 {
                    return Response::outcome(
                        502,
                        "transient",
                        format!("search answered {status}"),
                    );
                }
                for e in b
                    .get("entry")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let r = &e["resource"];
                    let Some(id) = r.get("id").and_then(Value::as_str) else {
                        continue;
                    };
                    for v in self.link_values(r) {
                        let (tenant, oid) = match v.split_once('/') {
                            Some((t, o)) => (Some(t.to_string()), o.to_string()),
                            None => (None, v.to_string()),
                        };
                        links.push(
                            Link {
                                tenant,
                                oid,
                                reference: format!("{t}/{id}"),
                            }
                            .json(),
                        );
                    }
                }
                next = next_link(&b);
            }
        }
        Response::json(200, json!({ "links": links }))
    }

    fn check(&self, link: &Link) -> Result<Ref, Response> {
        let bad = |s: &str| {
            s.is_empty()
                || s.len() > 256
                || s.contains(['|', ',', '$', '\\', '/'])
                || s.chars().any(char::is_control)
        };
        if bad(&link.oid) || link.tenant.as_deref().is_some_and(bad) {
            return Err(Response::outcome(
                400,
                "invalid",
                "tenant and oid must be 1-256 characters without | , $ \\ / or control characters",
            ));
        }
        match parse_fhir_user(&link.reference) {
            Some(r)
                if LINK_TYPES.contains(&r.rtype.as_str()) && link.reference == r.to_string() =>
            {
                Ok(r)
            }
            _ => Err(Response::outcome(
                400,
                "invalid",
                format!(
                    "reference must be <Type>/<id> with Type one of {}",
                    LINK_TYPES.join(", ")
                ),
            )),
        }
    }

    /// Reads a resource and its version for an optimistic update.
    async fn read(
        &self,
        fhir: &dyn FhirClient,
        r: &Ref,
    ) -> Result<(Value, Option<String>), Response> {
        let resp = fhir
            .send(ClientRequest::get(r.to_string()))
            .await
            .map_err(|e| Response::outcome(503, "transient", e.to_string()))?;
        match (resp.status, resp.json_body()) {
            (200, Some(v)) => {
                let etag = resp.header("etag").map(str::to_string);
                Ok((v.clone(), etag))
            }
            (404 | 410, _) => Err(Response::outcome(
                404,
                "not-found",
                format!("{r} does not exist"),
            )),
            (s, _) => Err(Response::outcome(
                502,
                "transient",
                format!("reading {r} answered {s}"),
            )),
        }
    }

    async fn write(
        &self,
        fhir: &dyn FhirClient,
        r: &Ref,
        body: &Value,
        etag: Option<String>,
    ) -> Result<(), Response> {
        let mut headers = vec![(
            "content-type".to_string(),
            "application/fhir+json".to_string(),
        )];
        if let Some(e) = etag {
            // Another writer in between makes this a 412, never a lost update.
            headers.push(("if-match".into(), e));
        }
        let resp = fhir
            .send(ClientRequest {
                method: "PUT".into(),
                path_and_query: r.to_string(),
                headers,
                body: Some(serde_json::to_vec(body).expect("JSON serialises")),
            })
            .await
            .map_err(|e| Response::outcome(503, "transient", e.to_string()))?;
        match resp.status {
            200 | 201 => Ok(()),
            409 | 412 => Err(Response::outcome(
                409,
                "conflict",
                format!("{r} changed while linking; try again"),
            )),
            s => Err(Response::outcome(
                502,
                "transient",
                format!("updating {r} answered {s}"),
            )),
        }
    }

    /// `link`: puts the link identifier on the resource (409 if the identity is linked
    /// elsewhere; idempotent when it is already linked there).
    pub async fn link(&self, fhir: &dyn FhirClient, link: &Link) -> Response {
        let target = match self.check(link) {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        let value = link_value(link.tenant.as_deref(), &link.oid);
        match self.lookup(fhir, &value).await {
            Ok(Some(existing)) if existing == target => {
                return Response::json(200, link.json());
            }
            Ok(Some(existing)) => {
                return Response::outcome(
                    409,
                    "conflict",
                    format!("this identity is already linked to {existing}; unlink it first"),
                )
            }
            Ok(None) => {}
            Err(e) => return Response::outcome(503, "transient", e.to_string()),
        }
        let (mut res, etag) = match self.read(fhir, &target).await {
            Ok(x) => x,
            Err(resp) => return resp,
        };
        let ids = res
            .as_object_mut()
            .expect("a resource is an object")
            .entry("identifier")
            .or_insert_with(|| Value::Array(Vec::new()));
        let Some(ids) = ids.as_array_mut() else {
            return Response::outcome(502, "invalid", format!("{target}.identifier is not a list"));
        };
        ids.push(json!({"use": "secondary", "system": self.settings.system, "value": value}));
        if let Err(resp) = self.write(fhir, &target, &res, etag).await {
            return resp;
        }
        self.cache.invalidate(&value);
        Response::json(201, link.json())
    }

    /// `unlink`: removes the link identifier (404 when the identity is not linked there).
    pub async fn unlink(&self, fhir: &dyn FhirClient, link: &Link) -> Response {
        let target = match self.check(link) {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        let value = link_value(link.tenant.as_deref(), &link.oid);
        let (mut res, etag) = match self.read(fhir, &target).await {
            Ok(x) => x,
            Err(resp) => return resp,
        };
        let system = self.settings.system.clone();
        let Some(ids) = res.get_mut("identifier").and_then(Value::as_array_mut) else {
            return Response::outcome(404, "not-found", format!("{target} carries no link"));
        };
        let before = ids.len();
        ids.retain(|i| {
            !(i.get("system").and_then(Value::as_str) == Some(system.as_str())
                && i.get("value").and_then(Value::as_str) == Some(value.as_str()))
        });
        if ids.len() == before {
            return Response::outcome(
                404,
                "not-found",
                format!("this identity is not linked to {target}"),
            );
        }
        if ids.is_empty() {
            res.as_object_mut()
                .expect("object")
                .shift_remove("identifier");
        }
        if let Err(resp) = self.write(fhir, &target, &res, etag).await {
            return resp;
        }
        self.cache.invalidate(&value);
        Response::json(200, link.json())
    }
}

/// `given family` of the first name, or its text.
fn display_name(r: &Value) -> Value {
    let Some(n) = r
        .get("name")
        .and_then(Value::as_array)
        .and_then(|n| n.first())
    else {
        return Value::Null;
    };
    if let Some(t) = n.get("text").and_then(Value::as_str) {
        return Value::String(t.to_string());
    }
    let mut parts: Vec<&str> = n
        .get("given")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if let Some(f) = n.get("family").and_then(Value::as_str) {
        parts.push(f);
    }
    Value::String(parts.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::ScriptedClient;

    fn searchset(entries: Vec<Value>) -> Value {
        json!({"resourceType": "Bundle", "type": "searchset",
               "entry": entries.into_iter().map(|r| json!({"resource": r})).collect::<Vec<_>>()})
    }

    fn caller(fhir_user: Option<&str>) -> Identity {
        Identity {
            user_id: "oid-1".into(),
            tenant: Some("tid-1".into()),
            fhir_user: fhir_user.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn fhir_user_forms() {
        assert_eq!(parse_fhir_user("Patient/1"), Some(Ref::new("Patient", "1")));
        assert_eq!(
            parse_fhir_user("https://fhir.example/r4/Practitioner/p-2/_history/3"),
            Some(Ref::new("Practitioner", "p-2"))
        );
        assert_eq!(parse_fhir_user("Patient"), None);
        assert_eq!(parse_fhir_user("Patient/a b"), None);
        assert_eq!(pct("a|b/c d"), "a%7Cb%2Fc%20d");
    }

    #[tokio::test]
    async fn fhir_user_wins_without_lookups() {
        let d = Directory::new(LinkSettings::default());
        let client = ScriptedClient::new(vec![]);
        let who = d.resolve(&caller(Some("Practitioner/9")), &client).await;
        assert_eq!(who, Ok(Some(Participant::Practitioner("9".into()))));
        let who = d.resolve(&caller(Some("Organization/9")), &client).await;
        assert_eq!(who, Ok(None));
        assert!(client.calls().is_empty());
    }

    #[tokio::test]
    async fn links_are_looked_up_once_then_cached() {
        let d = Directory::new(LinkSettings::default());
        let linked = json!({"resourceType": "Practitioner", "id": "pr-1", "identifier": [
            {"system": "urn:fhir-gateway:identity-link", "value": "tid-1/oid-1"}]});
        let client = ScriptedClient::by_url(vec![
            ("Patient?", 200, searchset(vec![])),
            ("Practitioner?", 200, searchset(vec![linked])),
            ("RelatedPerson?", 200, searchset(vec![])),
        ]);
        for _ in 0..3 {
            let who = d.resolve(&caller(None), &client).await;
            assert_eq!(who, Ok(Some(Participant::Practitioner("pr-1".into()))));
        }
        let calls = client.calls();
        assert_eq!(calls.len(), 3, "one lookup per type, then the cache");
        assert!(calls[0].contains("identifier=urn%3Afhir-gateway%3Aidentity-link|tid-1%2Foid-1"));
        d.invalidate("Practitioner");
        d.resolve(&caller(None), &client).await.unwrap();
        assert_eq!(client.calls().len(), 6);
    }

    #[tokio::test]
    async fn loose_matches_and_duplicates_fail_closed() {
        let d = Directory::new(LinkSettings::default());
        // The server matched, but the identifier is not exactly ours: not a link.
        let loose = json!({"resourceType": "Patient", "id": "p", "identifier": [
            {"system": "urn:fhir-gateway:identity-link", "value": "TID-1/OID-1"}]});
        let client = ScriptedClient::by_url(vec![
            ("Patient?", 200, searchset(vec![loose])),
            ("Practitioner?", 200, searchset(vec![])),
            ("RelatedPerson?", 200, searchset(vec![])),
        ]);
        assert_eq!(d.resolve(&caller(None), &client).await, Ok(None));

        let d = Directory::new(LinkSettings::default());
        let a = json!({"resourceType": "Patient", "id": "a", "identifier": [
            {"system": "urn:fhir-gateway:identity-link", "value": "tid-1/oid-1"}]});
        let b = json!({"resourceType": "Patient", "id": "b", "identifier": [
            {"system": "urn:fhir-gateway:identity-link", "value": "tid-1/oid-1"}]});
        let client = ScriptedClient::by_url(vec![
            ("Patient?", 200, searchset(vec![a, b])),
            ("Practitioner?", 200, searchset(vec![])),
            ("RelatedPerson?", 200, searchset(vec![])),
        ]);
        assert!(matches!(
            d.resolve(&caller(None), &client).await,
            Err(ModuleError::Failed(_))
        ));

        let d = Directory::new(LinkSettings::default());
        let client =
            ScriptedClient::by_url(vec![("", 503, json!({"resourceType": "OperationOutcome"}))]);
        assert!(matches!(
            d.resolve(&caller(None), &client).await,
            Err(ModuleError::Unavailable(_))
        ));
    }
}
