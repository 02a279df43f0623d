//! Identity links are identifiers in the FHIR server that only `/manage` may write: writes that
//! name the link system are refused unless they keep exactly the links the resource has.

use super::*;

/// Finds identifiers of the link `system` in a JSON tree (`found` also when the system is
/// named some other way, e.g. a JSON Patch value); collects their values.
pub(super) fn link_values(
    v: &Value,
    system: &str,
    found: &mut bool,
    values: &mut BTreeSet<String>,
) {
    match v {
        Value::String(s) if s == system => *found = true,
        Value::Array(a) => a.iter().for_each(|x| link_values(x, system, found, values)),
        Value::Object(o) => {
            if o.get("system").and_then(Value::as_str) == Some(system) {
                *found = true;
                values.insert(
                    o.get("value")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                );
            }
            o.values()
                .for_each(|x| link_values(x, system, found, values));
        }
        _ => {}
    }
}

impl FhirProxy {
    /// Identity links are identifiers in the FHIR server: only `/manage` (Administrators)
    /// may write them. A write that names the link system is refused, unless it is a PUT
    /// that keeps exactly the links the resource already has (an ordinary update).
    pub(super) async fn guard_links(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        method: &Method,
        admit: Admit,
    ) -> std::result::Result<Admit, GatewayError> {
        let body = match admit {
            Admit::Buffered(b) => b,
            Admit::Proxy => self.read_body(session, &mut ctx.body).await?,
        };
        let system = self.gw.links.settings().system.clone();
        let mentioned = |b: &[u8]| -> Option<BTreeSet<String>> {
            match serde_json::from_slice::<Value>(b) {
                Ok(v) => {
                    let mut found = false;
                    let mut values = BTreeSet::new();
                    link_values(&v, &system, &mut found, &mut values);
                    found.then_some(values)
                }
                // Not JSON (XML, garbage): the text itself.
                Err(_) => memchr::memmem::find(b, system.as_bytes()).map(|_| BTreeSet::new()),
            }
        };
        let Some(new_links) = mentioned(&body) else {
            return Ok(Admit::Buffered(body));
        };
        let refused = || {
            GatewayError::Forbidden(
                "identity links are written through /manage by an Administrator".into(),
            )
        };
        let rest = ctx.rest.trim_start_matches('/');
        let single = rest.split('/').count() == 2 && ctx.query.is_none();
        if *method != Method::PUT || !single || new_links.is_empty() {
            return Err(refused());
        }
        // The links this resource has now: the update may keep them, not add any.
        let client = self.client_for(ctx);
        let (status, current) = client
            .get_json(rest)
            .await
            .map_err(|e| GatewayError::UpstreamUnavailable(e.to_string()))?;
        let mut found = false;
        let mut old_links = BTreeSet::new();
        if status == 200 {
            link_values(&current, &system, &mut found, &mut old_links);
        }
        if new_links.is_subset(&old_links) {
            Ok(Admit::Buffered(body))
        } else {
            Err(refused())
        }
    }
}
