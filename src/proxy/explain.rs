//! `POST /manage/explain` (Administrators): why a request would be allowed or refused, and why
//! each entry of its answer would be kept or withheld, for a caller the administrator names by
//! their claims. The authorization is replayed with the route's policy; an allowed GET is sent
//! to the FHIR server through the gateway's client (with the administrator's audit headers),
//! and the route's post modules (then the caller's scope filter) run on the answer in order,
//! each first explaining what it receives (`PostProcess::explain`). Nothing is written, and
//! nothing of this reaches the normal path.

use super::*;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainRequest {
    method: String,
    /// Below the FHIR base: `Observation?code=x`.
    path: String,
    /// The claims of the caller to explain for (`roles`, `fhirUser`, `scp`, `tid`, `oid`, ...).
    #[serde(rename = "as")]
    claims: Value,
    /// The route's prefix (default: the main route).
    #[serde(default)]
    route: Option<String>,
}

/// `Observation?code=x` → (`/Observation`, `code=x`).
fn split_target(path: &str) -> (String, String) {
    let (p, q) = path.split_once('?').unwrap_or((path, ""));
    let p = p.trim_start_matches('/');
    let rest = if p.is_empty() {
        String::new()
    } else {
        format!("/{p}")
    };
    (rest, q.to_string())
}

/// What granted an allowed request: the route's roles the caller has, and its scopes.
fn granted(
    who: &Identity,
    req: &fhir_gateway_modules::request::FhirRequest,
    route: &crate::gateway::Route,
) -> String {
    let roles = if req.is_read {
        &route.policy.read
    } else {
        &route.policy.write
    };
    let had: Vec<&str> = roles
        .iter()
        .filter(|r| who.has(**r))
        .map(|r| r.name())
        .collect();
    let what = if req.is_read { "read" } else { "write" };
    let mut s = if had.is_empty() {
        format!("scopes alone: no role of the route's {what} policy")
    } else {
        format!("role: {} may {what} on {}", had.join(", "), route.prefix)
    };
    if !who.scopes.is_empty() {
        s.push_str(&format!("; scopes as a ceiling: {}", who.scopes.join(" ")));
    }
    s
}

fn refs(resp: &ModResponse) -> Vec<String> {
    resp.json_body()
        .map(fhir_gateway_modules::explain::references)
        .unwrap_or_default()
}

impl FhirProxy {
    pub(super) async fn explain(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<ModResponse, GatewayError> {
        let body = self.read_body(session, &mut ctx.body).await?;
        if body.len() > 64 * 1024 {
            return Err(GatewayError::RequestTooLarge(64 * 1024));
        }
        let ask: ExplainRequest = serde_json::from_slice(&body).map_err(|e| {
            GatewayError::BadRequest(format!(
                "expected {{\"method\", \"path\", \"as\": {{claims}}, \"route\"?}}: {e}"
            ))
        })?;
        let gw = self.gw.clone();
        let idx = match &ask.route {
            None => 0,
            Some(p) => gw
                .routes
                .iter()
                .position(|r| &r.prefix == p)
                .ok_or_else(|| {
                    GatewayError::BadRequest(format!("route {p:?} is not configured"))
                })?,
        };
        ctx.route = idx;
        let route = &gw.routes[idx];
        let (rest, query) = split_target(&ask.path);
        check_path(rest.as_bytes())
            .map_err(|why| GatewayError::BadRequest(format!("path: {why}")))?;
        let method = ask.method.to_ascii_uppercase();
        let fr = classify(&method, &rest, &query).map_err(GatewayError::BadRequest)?;
        if fr.interaction == Interaction::Bundle {
            return Err(GatewayError::BadRequest(
                "a batch or transaction is authorised entry by entry: explain its entries one by one".into(),
            ));
        }
        let who = gw
            .auth
            .identity_from_claims(&ask.claims)
            .map_err(|e| match e {
                crate::auth::AuthError::Invalid(m) => GatewayError::BadRequest(format!("as: {m}")),
                other => GatewayError::from(other),
            })?;
        let mut report = json!({
            "request": {"method": method, "path": ask.path, "route": route.prefix},
            "as": {"user": who.user_id, "roles": who.roles.iter().map(|r| r.name()).collect::<Vec<_>>(),
                   "fhirUser": who.fhir_user, "scopes": who.scopes, "tenant": who.tenant},
        });
        let alone = gw.smart.scopes_alone_suffice;
        if let Err(rule) = policy::authorize_with(&who, &fr, alone, &route.policy) {
            report["authorization"] = json!({"decision": "deny", "rule": rule, "status": 403});
            return Ok(ModResponse::json(200, report));
        }
        report["authorization"] = json!({"decision": "allow", "rule": granted(&who, &fr, route)});
        if method != "GET" {
            report["replayed"] = json!(false);
            report["why_not_replayed"] = json!("only GET is replayed: explaining never writes");
            return Ok(ModResponse::json(200, report));
        }
        ctx.service_auth = gw.identity.authorization().await?;
        let mut call = self.call_identity(ctx);
        // Filtered: a conditional read must not come back a 304 the filters cannot judge.
        call.filtered = true;
        let client = Arc::new(GatewayFhirClient {
            gw: gw.clone(),
            call,
        });
        let mut cx = self.module_context(ctx, client.clone());
        cx.identity = Some(who.clone());
        let target = if query.is_empty() {
            rest.trim_start_matches('/').to_string()
        } else {
            format!("{}?{query}", rest.trim_start_matches('/'))
        };
        let mut resp =
            client
                .send(ClientRequest::get(target))
                .await
                .map_err(|e| GatewayError::Module {
                    module: "explain".into(),
                    message: e.to_string(),
                    unavailable: matches!(
                        e,
                        fhir_gateway_modules::processor::ModuleError::Unavailable(_)
                    ),
                })?;
        report["replayed"] = json!(true);
        report["upstream_status"] = json!(resp.status);
        let req = ModRequest {
            method: method.clone(),
            path: rest,
            query,
            headers: vec![],
            body: None,
        };
        let original = refs(&resp);
        let route_chain: Vec<Arc<dyn PostProcess>> = route
            .post
            .iter()
            .filter(|m| m.applies(&req, Some(&who)))
            .cloned()
            .collect();
        let scope: Vec<Arc<dyn PostProcess>> = ScopeFilter::for_identity(&who)
            .map(|f| Arc::new(f) as Arc<dyn PostProcess>)
            .into_iter()
            .filter(|m| m.applies(&req, Some(&who)))
            .collect();
        let mut steps = Vec::new();
        let mut decisions: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut withheld_by: BTreeMap<String, &'static str> = BTreeMap::new();
        // The scope filter runs also when a route module stopped (as on the normal path).
        'chains: for chain in [&route_chain, &scope] {
            for m in chain {
                let before: BTreeSet<String> = refs(&resp).into_iter().collect();
                match m.explain(&req, &resp, &cx).await {
                    Ok(Some(vs)) => {
                        for v in vs {
                            decisions
                                .entry(v.resource.clone())
                                .or_default()
                                .push(v.to_json(m.name()));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        steps.push(
                            json!({"module": m.name(), "outcome": "error", "error": e.to_string()}),
                        );
                        report["error"] = json!(format!("{}: {e}", m.name()));
                        break 'chains;
                    }
                }
                let out = m.process(&req, &mut resp, &cx).await;
                let outcome = match &out {
                    Ok(fhir_gateway_modules::processor::PostOutcome::Continue) => "continue",
                    Ok(fhir_gateway_modules::processor::PostOutcome::Stop) => "stop",
                    _ => "error",
                };
                steps.push(json!({"module": m.name(), "outcome": outcome}));
                let after: BTreeSet<String> = refs(&resp).into_iter().collect();
                for r in before.difference(&after) {
                    withheld_by.entry(r.clone()).or_insert(m.name());
                }
                if let Err(e) = out {
                    report["error"] = json!(format!("{}: {e}", m.name()));
                    break 'chains;
                }
                if outcome != "continue" {
                    break;
                }
            }
        }
        let kept: BTreeSet<String> = refs(&resp).into_iter().collect();
        let mut seen = BTreeSet::new();
        let entries: Vec<Value> = original
            .into_iter()
            .filter(|r| seen.insert(r.clone()))
            .map(|r| {
                json!({"resource": r, "kept": kept.contains(&r),
                       "withheld_by": withheld_by.get(&r),
                       "decisions": decisions.remove(&r).unwrap_or_default()})
            })
            .collect();
        report["modules"] = json!(steps);
        report["status"] = json!(resp.status);
        report["entries"] = json!(entries);
        Ok(ModResponse::json(200, report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_split_below_the_base() {
        assert_eq!(
            split_target("Observation?code=x"),
            ("/Observation".into(), "code=x".into())
        );
        assert_eq!(
            split_target("/Patient/1"),
            ("/Patient/1".into(), String::new())
        );
        assert_eq!(split_target(""), (String::new(), String::new()));
    }
}
