//! The one error type of the gateway; every variant renders as a FHIR OperationOutcome.

use fhir_gateway_modules::{outcome_bytes, Severity};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    /// 400 `invalid`: a request the gateway will not forward.
    BadRequest(String),
    /// 401 `login`: no credentials (`None`) or invalid ones (`Some(reason)`).
    Unauthorized(Option<String>),
    /// 403 `forbidden`: authenticated, not allowed; the failed rule.
    Forbidden(String),
    /// 404 `not-found`: outside every route.
    NotFound(String),
    /// 405 `not-supported`.
    MethodNotAllowed(String),
    /// 413 `too-costly`: request body over the limit.
    RequestTooLarge(u64),
    /// 414 `too-costly`: query string over the limit.
    QueryTooLong(usize),
    /// 415 `not-supported`.
    UnsupportedMediaType(String),
    /// 408 `timeout`: the client was too slow sending its request.
    RequestTimeout(String),
    /// 431 `too-costly`: request headers over the limit (count or bytes).
    HeadersTooLarge(String),
    /// 502 `transient`: upstream refused, reset, or answered garbage.
    UpstreamUnavailable(String),
    /// 504 `timeout`.
    UpstreamTimeout(String),
    /// 502 `too-costly`: a response too large to buffer for a module.
    ResponseTooLarge(usize),
    /// 503 `transient`: no credential for the FHIR server.
    ServiceIdentity(String),
    /// 503 `transient`: not ready or draining.
    NotReady(String),
    /// 500 `exception` (503 `transient` when `unavailable`): a processor module failed or
    /// stopped the chain without a response.
    Module {
        module: String,
        message: String,
        unavailable: bool,
    },
    /// 500 `exception`.
    Internal(String),
    /// 499 (nginx's "client closed request"; never sent, only logged): the client left
    /// before the answer was ready.
    ClientGone,
}

impl GatewayError {
    pub fn status(&self) -> u16 {
        use GatewayError::*;
        match self {
            BadRequest(_) => 400,
            Unauthorized(_) => 401,
            Forbidden(_) => 403,
            NotFound(_) => 404,
            MethodNotAllowed(_) => 405,
            RequestTooLarge(_) => 413,
            QueryTooLong(_) => 414,
            UnsupportedMediaType(_) => 415,
            RequestTimeout(_) => 408,
            HeadersTooLarge(_) => 431,
            UpstreamUnavailable(_) | ResponseTooLarge(_) => 502,
            ServiceIdentity(_) | NotReady(_) => 503,
            UpstreamTimeout(_) => 504,
            Module {
                unavailable: true, ..
            } => 503,
            Module { .. } => 500,
            Internal(_) => 500,
            ClientGone => 499,
        }
    }

    /// FHIR `issue-type` code.
    pub fn code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            BadRequest(_) => "invalid",
            Unauthorized(_) => "login",
            Forbidden(_) => "forbidden",
            NotFound(_) => "not-found",
            MethodNotAllowed(_) | UnsupportedMediaType(_) => "not-supported",
            RequestTooLarge(_) | QueryTooLong(_) | ResponseTooLarge(_) | HeadersTooLarge(_) => {
                "too-costly"
            }
            RequestTimeout(_) => "timeout",
            UpstreamUnavailable(_) | ServiceIdentity(_) | NotReady(_) => "transient",
            UpstreamTimeout(_) => "timeout",
            Module {
                unavailable: true, ..
            } => "transient",
            Module { .. } => "exception",
            Internal(_) => "exception",
            ClientGone => "incomplete",
        }
    }

    /// OperationOutcome JSON with the correlation id in the diagnostics.
    pub fn to_outcome(&self, correlation_id: &str) -> Vec<u8> {
        let severity = if self.status() >= 500 {
            Severity::Fatal
        } else {
            Severity::Error
        };
        outcome_bytes(
            severity,
            self.code(),
            &format!("{self} (correlation id {correlation_id})"),
        )
    }
}

impl fmt::Display for GatewayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use GatewayError::*;
        match self {
            BadRequest(m)
            | NotFound(m)
            | MethodNotAllowed(m)
            | UnsupportedMediaType(m)
            | RequestTimeout(m)
            | HeadersTooLarge(m) => f.write_str(m),
            Unauthorized(None) => {
                f.write_str("authentication required: send 'Authorization: Bearer <token>'")
            }
            Unauthorized(Some(why)) => write!(f, "invalid token: {why}"),
            Forbidden(rule) => write!(f, "forbidden by {rule}"),
            RequestTooLarge(max) => write!(f, "request body larger than {max} bytes"),
            QueryTooLong(max) => write!(f, "query string longer than {max} bytes"),
            UpstreamUnavailable(m) => write!(f, "FHIR server unavailable: {m}"),
            UpstreamTimeout(m) => write!(f, "FHIR server timed out: {m}"),
            ResponseTooLarge(max) => {
                write!(
                    f,
                    "FHIR server response larger than {max} bytes cannot be processed"
                )
            }
            ServiceIdentity(m) => write!(f, "upstream credential unavailable: {m}"),
            NotReady(m) => write!(f, "gateway not ready: {m}"),
            Module {
                module, message, ..
            } => write!(f, "module {module}: {message}"),
            Internal(m) => write!(f, "internal error: {m}"),
            ClientGone => f.write_str("the client closed the connection before the answer"),
        }
    }
}

impl std::error::Error for GatewayError {}

/// A failed authentication: no or bad credentials are 401; an unreachable key source is 503,
/// never a pass.
impl From<crate::auth::AuthError> for GatewayError {
    fn from(e: crate::auth::AuthError) -> Self {
        use crate::auth::AuthError;
        match e {
            AuthError::Missing => GatewayError::Unauthorized(None),
            AuthError::Invalid(why) => GatewayError::Unauthorized(Some(why)),
            AuthError::Unavailable(why) => GatewayError::NotReady(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes() {
        let e = GatewayError::UpstreamTimeout("read".into());
        assert_eq!((e.status(), e.code()), (504, "timeout"));
        let v: serde_json::Value = serde_json::from_slice(&e.to_outcome("abc")).unwrap();
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(v["issue"][0]["code"], "timeout");
        assert!(v["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("correlation id abc"));
        assert_eq!(GatewayError::ResponseTooLarge(1).status(), 502);
        assert_eq!(GatewayError::RequestTooLarge(1).status(), 413);
    }
}
