//! Answers the gateway writes itself: complete responses that keep the connection alive, and
//! OperationOutcomes for every error (ours, or Pingora's classified).

use super::*;

impl FhirProxy {
    /// Writes a complete response from the gateway itself, keeping the connection alive.
    pub(super) async fn respond(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        status: u16,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<bool> {
        self.respond_with(session, ctx, status, content_type, body, None)
            .await
    }

    pub(super) async fn respond_with(
        &self,
        session: &mut Session,
        ctx: &Ctx,
        status: u16,
        content_type: &str,
        body: Vec<u8>,
        www_authenticate: Option<String>,
    ) -> Result<bool> {
        let mut h = ResponseHeader::build(status, Some(5))?;
        if let Some(c) = www_authenticate {
            h.insert_header(http::header::WWW_AUTHENTICATE, c)?;
        }
        h.insert_header(http::header::CONTENT_TYPE, content_type)?;
        h.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
        h.insert_header(REQUEST_ID, ctx.correlation_header.clone())?;
        h.insert_header(http::header::CACHE_CONTROL, "no-store")?;
        let head_only = session.req_header().method == Method::HEAD;
        session.write_response_header(Box::new(h), false).await?;
        let body = if head_only {
            Bytes::new()
        } else {
            Bytes::from(body)
        };
        session.write_response_body(Some(body), true).await?;
        Ok(true)
    }

    pub(super) async fn respond_error(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        e: GatewayError,
    ) -> Result<bool> {
        let body = e.to_outcome(&ctx.correlation_id);
        let status = e.status();
        let challenge = match &e {
            GatewayError::Unauthorized(None) => Some(format!("Bearer realm=\"{}\"", self.gw.name)),
            GatewayError::Unauthorized(Some(_)) => Some(format!(
                "Bearer realm=\"{}\", error=\"invalid_token\"",
                self.gw.name
            )),
            _ => None,
        };
        ctx.error = Some(e);
        self.respond_with(
            session,
            ctx,
            status,
            "application/fhir+json",
            body,
            challenge,
        )
        .await
    }

    pub(super) fn classify(&self, e: &Error) -> GatewayError {
        use crate::upstream::client::{connect_error, exchange_error, is_connect_error};
        let source = e.esource();
        match e.etype() {
            ErrorType::ReadTimedout if *source == ErrorSource::Downstream => {
                GatewayError::RequestTimeout("the client did not send its request in time".into())
            }
            ErrorType::HTTPStatus(c) => GatewayError::UpstreamUnavailable(format!("status {c}")),
            // The same words as the gateway's own client for the same failure.
            t if is_connect_error(t) => connect_error(e),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => exchange_error(e),
            _ if *source == ErrorSource::Upstream => exchange_error(e),
            _ if *source == ErrorSource::Downstream => {
                GatewayError::BadRequest(format!("malformed request: {}", e.etype().as_str()))
            }
            _ => GatewayError::Internal(e.etype().as_str().to_string()),
        }
    }

    /// Every failure after `request_filter` (ours or Pingora's) as an OperationOutcome.
    pub(super) async fn answer_failure(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Ctx,
    ) -> FailToProxy {
        let ge = ctx.error.take().unwrap_or_else(|| {
            if *e.etype() == ErrorType::ReadTimedout && !session.downstream_session.is_body_done() {
                // The server was still waiting for the rest of the body: the client stalled.
                GatewayError::RequestTimeout(
                    "the client did not send its request body in time".into(),
                )
            } else {
                self.classify(e)
            }
        });
        let downstream_dead = *e.esource() == ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed
            );
        let code = if downstream_dead || session.response_written().is_some() {
            // Nothing sensible can be written any more.
            0
        } else {
            let status = ge.status();
            let body = ge.to_outcome(&ctx.correlation_id);
            // The connection is not reused after a failed proxy (its request body may be half
            // read): say so, or a client reusing it loses its next request.
            session.set_keepalive(None);
            if let Err(we) = self
                .respond(session, ctx, status, "application/fhir+json", body)
                .await
            {
                warn!("could not send error response: {we}");
            }
            status
        };
        ctx.error = Some(ge);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }
}
