//! The proxy's side of the audit trail (`src/audit/`): what the client was sent is kept (as
//! references to the body bytes, no copy) while the answer streams or is written, the record is
//! queued after the request, and `/manage/audit` answers "who saw patient X".

use super::{Ctx, FhirProxy};
use crate::audit::glass::Asked;
use crate::audit::{Record, Shown};
use crate::error::GatewayError;
use bytes::Bytes;
use fhir_gateway_modules::links::Participant;
use fhir_gateway_modules::processor::Response as ModResponse;
use fhir_gateway_modules::{Identity, Role};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde_json::json;

/// The body bytes an answer sent, kept for the audit record.
#[derive(Debug, Default)]
pub(super) struct Tee {
    chunks: Vec<Bytes>,
    bytes: usize,
    ndjson: bool,
    too_large: bool,
}

/// Whether an answer with this content type holds FHIR resources worth auditing.
fn kind(content_type: Option<&[u8]>) -> Option<bool> {
    let ct = content_type?;
    let has = |needle: &[u8]| {
        ct.windows(needle.len())
            .any(|w| w.eq_ignore_ascii_case(needle))
    };
    if has(b"ndjson") {
        Some(true)
    } else if has(b"json") {
        Some(false)
    } else {
        None
    }
}

impl FhirProxy {
    /// On a streamed answer's head: keep its body if it may show patient data.
    pub(super) fn audit_head(&self, ctx: &mut Ctx, resp: &ResponseHeader, head_only: bool) {
        if self.gw.trail.is_none() || head_only || !resp.status.is_success() {
            return;
        }
        let ct = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| v.as_bytes());
        if let Some(ndjson) = kind(ct) {
            ctx.tee = Some(Tee {
                ndjson,
                ..Tee::default()
            });
        }
    }

    /// Each chunk as sent to the client (after rewriting).
    pub(super) fn audit_chunk(&self, ctx: &mut Ctx, body: &Option<Bytes>) {
        let (Some(tee), Some(b)) = (ctx.tee.as_mut(), body) else {
            return;
        };
        if b.is_empty() || tee.too_large {
            return;
        }
        let max = self.gw.trail.as_ref().map_or(0, |t| t.max_body_bytes);
        tee.bytes += b.len();
        if tee.bytes > max {
            tee.too_large = true;
            tee.chunks = Vec::new();
        } else {
            tee.chunks.push(b.clone());
        }
    }

    /// A buffered answer, written whole.
    pub(super) fn audit_answer(
        &self,
        ctx: &Ctx,
        status: u16,
        headers: &[(String, String)],
        body: &Bytes,
    ) {
        if self.gw.trail.is_none() || !(200..300).contains(&status) || body.is_empty() {
            return;
        }
        let ct = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_bytes());
        if let Some(ndjson) = kind(ct) {
            let _ = ctx.answered.set(Shown::Body {
                chunks: vec![body.clone()],
                ndjson,
            });
        }
    }

    /// A buffered answer's tree, as serialised for the client.
    pub(super) fn audit_tree(&self, ctx: &Ctx, status: u16, tree: &serde_json::Value) {
        if self.gw.trail.is_none() || !(200..300).contains(&status) {
            return;
        }
        let public = self.public_base_of(ctx);
        let upstream = self.gw.upstream.base.as_string();
        let mut patients = std::collections::BTreeSet::new();
        let unknown = crate::audit::event::judge_tree(tree, &[&public, &upstream], &mut patients);
        let _ = ctx.answered.set(Shown::Patients { patients, unknown });
    }

    /// Queues the request's audit record (after it was answered).
    pub(super) async fn audit_request(&self, session: &Session, ctx: &mut Ctx, status: u16) {
        let Some(trail) = &self.gw.trail else { return };
        let req = session.req_header();
        let path = req.uri.path();
        if !ctx.routed && !path.starts_with("/manage") {
            return; // health probes and unknown paths: no patient data, no caller
        }
        let shown = match (ctx.answered.take(), ctx.tee.take()) {
            (Some(shown), _) => shown,
            (None, Some(t)) if t.too_large => Shown::TooLarge,
            (None, Some(t)) if !t.chunks.is_empty() => Shown::Body {
                chunks: t.chunks,
                ndjson: t.ndjson,
            },
            _ => Shown::Nothing,
        };
        let reason = ctx.glass.take();
        let public_base = ctx.routed.then(|| self.public_base_of(ctx));
        trail
            .record(Record {
                at: jiff::Timestamp::now(),
                method: req.method.as_str().to_string(),
                path: path.to_string(),
                rest: ctx.routed.then(|| std::mem::take(&mut ctx.rest)),
                query: req.uri.query().map(str::to_string),
                status,
                identity: ctx.identity.take(),
                source: ctx.source.take(),
                correlation_id: std::mem::take(&mut ctx.correlation_id),
                public_base,
                shown,
                error: ctx.error.as_ref().map(|e| e.to_string()),
                reason,
            })
            .await;
    }

    /// Break-the-glass: a reason header opens (or renews) a session for a caller in the
    /// configured roles; reads in a session skip the configured filters (`ctx.glass`). Writes
    /// stay filtered. A reason-less or role-less ask is refused, never silently ignored.
    pub(super) async fn break_the_glass(
        &self,
        req: &pingora::http::RequestHeader,
        identity: &Identity,
        is_read: bool,
        ctx: &mut Ctx,
    ) -> Result<(), GatewayError> {
        let Some(glass) = &self.gw.glass else {
            return Ok(());
        };
        let reason = match req.headers.get(&glass.header) {
            Some(v) => Some(v.to_str().map_err(|_| {
                GatewayError::BadRequest(format!("{}: not a readable reason", glass.header))
            })?),
            None => None,
        };
        match glass.ask(identity, reason) {
            Asked::No => Ok(()),
            Asked::Refused(why) => Err(GatewayError::Forbidden(why)),
            Asked::Yes(reason, opened) => {
                if opened {
                    log::warn!(
                        "break-the-glass: user {} (tenant {}) opened a session: {reason:?} (request {})",
                        identity.user_id,
                        identity.tenant.as_deref().unwrap_or("-"),
                        ctx.correlation_id
                    );
                    self.gw
                        .events
                        .publish(
                            &format!("break-the-glass/{}", identity.user_id),
                            json!({"action": "BreakTheGlass", "resourcetype": null, "id": null,
                                   "user": identity.user_id, "tenant": identity.tenant,
                                   "reason": reason, "correlationid": ctx.correlation_id,
                                   "source": "break_the_glass"}),
                        )
                        .await;
                }
                if is_read {
                    crate::metrics::break_the_glass();
                    ctx.glass = Some(reason);
                }
                Ok(())
            }
        }
    }

    /// `GET /manage/glass`: the break-the-glass sessions in force on this instance.
    pub(super) fn glass_sessions(&self) -> Result<ModResponse, GatewayError> {
        match &self.gw.glass {
            Some(g) => Ok(ModResponse::json(200, g.list())),
            None => Err(GatewayError::NotFound(
                "/manage/glass: break_the_glass is not configured".into(),
            )),
        }
    }

    /// Whether the caller is `patient` (`Patient/<id>`): `fhirUser`, the SMART patient, or an
    /// identity link.
    async fn is_patient(
        &self,
        ctx: &Ctx,
        identity: &Identity,
        patient: &str,
    ) -> Result<bool, GatewayError> {
        let client = self.client_for(ctx);
        let me = self
            .gw
            .links
            .resolve(identity, &client)
            .await
            .map_err(|e| GatewayError::UpstreamUnavailable(format!("who the caller is: {e}")))?;
        Ok(matches!(me, Some(Participant::Patient(p)) if format!("Patient/{p}") == patient))
    }

    /// `GET /manage/audit?patient=Patient/X[&since=<instant>][&_count=n]`: the AuditEvents
    /// naming that patient, as a searchset. Administrators ask for anyone; a patient for
    /// their own record only, when `audit.patient_access_log` allows it.
    pub(super) async fn audit_query(
        &self,
        ctx: &Ctx,
        query: &str,
    ) -> Result<ModResponse, GatewayError> {
        let Some(identity) = ctx.identity.as_deref() else {
            return Err(GatewayError::Unauthorized(None));
        };
        let Some(trail) = &self.gw.trail else {
            return Err(GatewayError::NotFound(
                "/manage/audit: no audit trail is configured (audit.file)".into(),
            ));
        };
        let param = |name: &str| super::manage::param(query, name);
        let Some(patient) = param("patient") else {
            return Err(GatewayError::BadRequest(
                "/manage/audit needs patient=Patient/<id>".into(),
            ));
        };
        let patient = if patient.starts_with("Patient/") {
            patient
        } else {
            format!("Patient/{patient}")
        };
        let allowed = identity.has(Role::Administrator)
            || (trail.patient_access_log
                && identity.has(Role::Patient)
                && self.is_patient(ctx, identity, &patient).await?);
        if !allowed {
            return Err(GatewayError::Forbidden(
                "role: /manage/audit needs Administrator (or, with audit.patient_access_log, the patient themself)".into(),
            ));
        }
        let since = param("since");
        if since
            .as_deref()
            .is_some_and(|s| s.parse::<jiff::Timestamp>().is_err())
        {
            return Err(GatewayError::BadRequest(
                "since: an RFC 3339 instant (2026-12-07T10:00:00Z)".into(),
            ));
        }
        let since =
            since.map(|s| format!("{:.3}", s.parse::<jiff::Timestamp>().unwrap_or_default()));
        let limit = param("_count")
            .and_then(|c| c.parse().ok())
            .unwrap_or(1000usize)
            .clamp(1, 10_000);
        trail.flush().await;
        let file = trail.file.clone();
        let found = tokio::task::spawn_blocking(move || {
            crate::audit::who_saw(&file, &patient, since.as_deref(), limit)
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("audit query: {e}")))?
        .map_err(|e| GatewayError::Internal(format!("reading the audit trail: {e}")))?;
        let entries: Vec<_> = found
            .into_iter()
            .map(|ev| json!({"resource": ev}))
            .collect();
        Ok(ModResponse::json(
            200,
            json!({"resourceType": "Bundle", "type": "searchset", "total": entries.len(), "entry": entries}),
        ))
    }
}
