//! `/manage`: identity links for Administrators (find, link, unlink, list), as JSON, and
//! `explain` (`explain.rs`).
//!
//! The links live in the FHIR server (an identifier on the linked resource), so every gateway
//! instance sees them; the calls go upstream with the gateway's service identity and the
//! administrator's audit headers.

use super::{tag_outcome, Ctx, FhirProxy};
use crate::config::AuthMode;
use crate::error::GatewayError;
use fhir_gateway_modules::links::Link;
use fhir_gateway_modules::processor::Response as ModResponse;
use fhir_gateway_modules::Role;
use http::Method;
use pingora::prelude::*;
use pingora::proxy::Session;

/// Decodes one `application/x-www-form-urlencoded` value.
fn decode(v: &str) -> Option<String> {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

pub(super) fn param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == name)
        .and_then(|(_, v)| decode(v))
}

impl FhirProxy {
    pub(super) async fn manage(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        match self.manage_inner(session, ctx).await {
            Ok(mut r) => {
                tag_outcome(&mut r, &ctx.correlation_id);
                match self.write_module_response(session, ctx, r, None).await {
                    Ok(()) => Ok(true),
                    Err(e) => self.respond_error(session, ctx, e).await,
                }
            }
            Err(e) => self.respond_error(session, ctx, e).await,
        }
    }

    async fn manage_inner(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<ModResponse, GatewayError> {
        let gw = self.gw.clone();
        if gw.auth_mode != AuthMode::Jwt {
            return Err(GatewayError::Forbidden(
                "/manage needs auth.mode jwt and an Administrator token".into(),
            ));
        }
        let identity = gw
            .auth
            .authenticate(&session.req_header().headers, None)
            .await
            .map_err(GatewayError::from)?;
        let req = session.req_header();
        if req.uri.path().trim_end_matches('/') == "/manage/audit" {
            if req.method != Method::GET {
                return Err(GatewayError::MethodNotAllowed(
                    "/manage/audit answers GET".into(),
                ));
            }
            let query = req.uri.query().unwrap_or("").to_string();
            ctx.identity = Some(identity);
            ctx.service_auth = gw.identity.authorization().await?;
            return self.audit_query(ctx, &query).await;
        }
        if !identity.has(Role::Administrator) {
            return Err(GatewayError::Forbidden(
                "role: /manage needs Administrator".into(),
            ));
        }
        ctx.identity = Some(identity);
        ctx.service_auth = gw.identity.authorization().await?;
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().trim_end_matches('/').to_string();
        let query = req.uri.query().unwrap_or("").to_string();
        let client = self.client_for(ctx);
        let links = &gw.links;
        Ok(match (method, path.as_str()) {
            (Method::GET, "/manage/find") => {
                let t = param(&query, "type").unwrap_or_else(|| "Patient".into());
                let name = param(&query, "name").unwrap_or_default();
                links.find(&client, &t, &name).await
            }
            (Method::GET, "/manage/links") => links.list(&client).await,
            (Method::GET, "/manage/glass") => self.glass_sessions()?,
            (Method::POST, "/manage/explain") => self.explain(session, ctx).await?,
            (Method::POST, "/manage/link") | (Method::POST, "/manage/unlink") => {
                let body = self.read_body(session, &mut ctx.body).await?;
                if body.len() > 16 * 1024 {
                    return Err(GatewayError::RequestTooLarge(16 * 1024));
                }
                let link: Link = serde_json::from_slice(&body).map_err(|e| {
                    GatewayError::BadRequest(format!(
                        "expected {{\"tenant\", \"oid\", \"reference\"}}: {e}"
                    ))
                })?;
                let r = if path == "/manage/link" {
                    links.link(&client, &link).await
                } else {
                    links.unlink(&client, &link).await
                };
                if (200..300).contains(&r.status) && gw.event_queue.has_broker() {
                    // Other instances drop their link caches when they see it.
                    if let Some((t, id)) = link.reference.split_once('/') {
                        let who = ctx.identity.as_deref();
                        gw.events
                            .publish(
                                &link.reference,
                                serde_json::json!({
                                    "action": "Updated", "resourcetype": t, "id": id,
                                    "version": null, "lastupdated": null, "source": "/manage",
                                    "tenant": who.and_then(|i| i.tenant.clone()),
                                    "user": who.map(|i| i.user_id.clone()),
                                    "correlationid": ctx.correlation_id, "patient": null,
                                }),
                            )
                            .await;
                    }
                }
                r
            }
            (
                _,
                "/manage/find" | "/manage/links" | "/manage/link" | "/manage/unlink"
                | "/manage/explain",
            ) => {
                return Err(GatewayError::MethodNotAllowed(format!(
                    "{path}: find and links answer GET, link, unlink and explain answer POST"
                )))
            }
            _ => {
                return Err(GatewayError::NotFound(format!(
                    "{path}: /manage has find, links, link, unlink, glass, explain and audit"
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            param("type=Patient&name=van+der%20Berg", "name").as_deref(),
            Some("van der Berg")
        );
        assert_eq!(param("name=%ZZ", "name"), None);
        assert_eq!(param("a=1", "name"), None);
    }
}
