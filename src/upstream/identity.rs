//! The gateway's own identity towards the FHIR server: none, a static bearer, OAuth2 client
//! credentials, or Azure managed identity. Tokens are cached and refreshed before they expire;
//! a failed refresh keeps the old token while it is still valid; without a token the request
//! fails with 503 — never an empty or missing bearer where one is configured.

use crate::config::{ClientAuthMethod, IdentityConfig};
use crate::error::GatewayError;
use http::HeaderValue;
use log::{info, warn};
use serde_json::Value;
use std::sync::RwLock;
use std::time::{Duration, Instant};

/// After a failed fetch, callers without a valid token fail fast for this long instead of
/// each hammering the token endpoint.
const FAILURE_BACKOFF: Duration = Duration::from_secs(1);

pub enum ServiceIdentity {
    None,
    Static(HeaderValue),
    OAuth(Box<TokenSource>),
}

enum Fetch {
    ClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: String,
        scope: Option<String>,
        resource: Option<String>,
        auth_method: ClientAuthMethod,
    },
    ManagedIdentity {
        imds_url: String,
        resource: String,
        client_id: Option<String>,
    },
}

#[derive(Clone)]
struct Cached {
    header: HeaderValue,
    expires: Instant,
    /// When to fetch a new one: `expires - margin`, the margin capped at half the lifetime so
    /// short-lived tokens (5 minutes) are not refetched on every call.
    refresh_at: Instant,
}

pub struct TokenSource {
    fetch: Fetch,
    margin: Duration,
    http: reqwest::Client,
    cached: RwLock<Option<Cached>>,
    last_failure: RwLock<Option<Instant>>,
    refresh: tokio::sync::Mutex<()>,
}

impl ServiceIdentity {
    pub fn new(cfg: &IdentityConfig, http: reqwest::Client) -> Result<ServiceIdentity, String> {
        Ok(match cfg.clone() {
            IdentityConfig::None => ServiceIdentity::None,
            IdentityConfig::StaticBearer { token } => ServiceIdentity::Static(
                HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                    .map_err(|_| "upstream.identity.token is not header-safe".to_string())?,
            ),
            IdentityConfig::ClientCredentials {
                token_url,
                client_id,
                client_secret,
                scope,
                resource,
                auth_method,
                refresh_margin_secs,
            } => ServiceIdentity::OAuth(Box::new(TokenSource::new(
                Fetch::ClientCredentials {
                    token_url,
                    client_id,
                    client_secret,
                    scope,
                    resource,
                    auth_method,
                },
                refresh_margin_secs,
                http,
            ))),
            IdentityConfig::ManagedIdentity {
                imds_url,
                resource,
                client_id,
                refresh_margin_secs,
            } => ServiceIdentity::OAuth(Box::new(TokenSource::new(
                Fetch::ManagedIdentity {
                    imds_url,
                    resource,
                    client_id,
                },
                refresh_margin_secs,
                http,
            ))),
        })
    }

    /// The `Authorization` value for the next upstream call (`None` = send none).
    pub async fn authorization(&self) -> Result<Option<HeaderValue>, GatewayError> {
        match self {
            ServiceIdentity::None => Ok(None),
            ServiceIdentity::Static(h) => Ok(Some(h.clone())),
            ServiceIdentity::OAuth(src) => src.get().await.map(Some),
        }
    }

    /// Whether a call made now would carry a valid credential (for `/readyz`).
    pub fn is_ready(&self) -> bool {
        match self {
            ServiceIdentity::OAuth(src) => src.valid_token().is_some(),
            _ => true,
        }
    }

    /// Background refresh: keeps the cached token fresh so requests never wait on the IdP.
    pub async fn refresh_if_due(&self) {
        if let ServiceIdentity::OAuth(src) = self {
            if src.fresh_token().is_none() {
                let _ = src.get().await;
            }
        }
    }
}

impl TokenSource {
    fn new(fetch: Fetch, margin_secs: u64, http: reqwest::Client) -> TokenSource {
        TokenSource {
            fetch,
            margin: Duration::from_secs(margin_secs),
            http,
            cached: RwLock::new(None),
            last_failure: RwLock::new(None),
            refresh: tokio::sync::Mutex::new(()),
        }
    }

    /// A token that does not need refreshing yet.
    fn fresh_token(&self) -> Option<HeaderValue> {
        let c = self.cached.read().expect("token lock");
        c.as_ref()
            .filter(|c| Instant::now() < c.refresh_at)
            .map(|c| c.header.clone())
    }

    /// A token that has not expired (possibly due for refresh).
    fn valid_token(&self) -> Option<HeaderValue> {
        let c = self.cached.read().expect("token lock");
        c.as_ref()
            .filter(|c| Instant::now() < c.expires)
            .map(|c| c.header.clone())
    }

    async fn get(&self) -> Result<HeaderValue, GatewayError> {
        if let Some(t) = self.fresh_token() {
            return Ok(t);
        }
        let in_backoff = self
            .last_failure
            .read()
            .expect("failure lock")
            .is_some_and(|t| t.elapsed() < FAILURE_BACKOFF);
        if in_backoff {
            return self.valid_token().ok_or_else(unavailable);
        }
        // One fetch at a time; the others wait for its result.
        let _guard = self.refresh.lock().await;
        if let Some(t) = self.fresh_token() {
            return Ok(t);
        }
        match self.fetch_token().await {
            Ok((token, ttl)) => {
                let header = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
                    GatewayError::ServiceIdentity("token is not header-safe".into())
                })?;
                let now = Instant::now();
                *self.cached.write().expect("token lock") = Some(Cached {
                    header: header.clone(),
                    expires: now + ttl,
                    refresh_at: now + ttl - self.margin.min(ttl / 2),
                });
                *self.last_failure.write().expect("failure lock") = None;
                info!(
                    "upstream service token refreshed, valid for {}s",
                    ttl.as_secs()
                );
                Ok(header)
            }
            Err(e) => {
                *self.last_failure.write().expect("failure lock") = Some(Instant::now());
                match self.valid_token() {
                    Some(t) => {
                        warn!("upstream token refresh failed, keeping the current token: {e}");
                        Ok(t)
                    }
                    None => {
                        warn!("upstream token unavailable: {e}");
                        Err(unavailable())
                    }
                }
            }
        }
    }

    async fn fetch_token(&self) -> Result<(String, Duration), String> {
        let resp = match &self.fetch {
            Fetch::ClientCredentials {
                token_url,
                client_id,
                client_secret,
                scope,
                resource,
                auth_method,
            } => {
                let mut form: Vec<(&str, &str)> = vec![("grant_type", "client_credentials")];
                if let Some(s) = scope {
                    form.push(("scope", s));
                }
                if let Some(r) = resource {
                    form.push(("resource", r));
                }
                let mut req = self.http.post(token_url);
                match auth_method {
                    ClientAuthMethod::Basic => {
                        req =
                            req.basic_auth(form_encode(client_id), Some(form_encode(client_secret)))
                    }
                    ClientAuthMethod::Post => {
                        form.push(("client_id", client_id));
                        form.push(("client_secret", client_secret));
                    }
                }
                req.form(&form).send().await
            }
            Fetch::ManagedIdentity {
                imds_url,
                resource,
                client_id,
            } => {
                let mut q: Vec<(&str, &str)> =
                    vec![("api-version", "2018-02-01"), ("resource", resource)];
                if let Some(c) = client_id {
                    q.push(("client_id", c));
                }
                self.http
                    .get(imds_url)
                    .header("Metadata", "true")
                    .query(&q)
                    .send()
                    .await
            }
        }
        .map_err(|e| format!("token endpoint unreachable: {e}"))?;
        let status = resp.status();
        let body: Value = resp
            .json()
            .await
            .map_err(|e| format!("token endpoint answered {status} without JSON: {e}"))?;
        if !status.is_success() {
            let err = body
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            return Err(format!("token endpoint answered {status}: {err}"));
        }
        parse_token_response(&body)
    }
}

fn unavailable() -> GatewayError {
    GatewayError::ServiceIdentity("the gateway has no valid credential for the FHIR server".into())
}

/// RFC 6749 §2.3.1: client id and secret are form-encoded before Basic encoding.
fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else if b == b' ' {
            out.push('+');
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `access_token` plus its lifetime. Entra v1 and IMDS send `expires_in` as a string.
pub fn parse_token_response(body: &Value) -> Result<(String, Duration), String> {
    let token = body
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.trim().is_empty())
        .ok_or("token response has no access_token")?;
    let secs = match body.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .ok_or("token response has no usable expires_in")?;
    if secs == 0 {
        return Err("token response says the token has already expired".into());
    }
    Ok((token.trim().to_string(), Duration::from_secs(secs)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn token_response_forms() {
        let (t, d) =
            parse_token_response(&json!({"access_token":"abc","expires_in":3599})).unwrap();
        assert_eq!((t.as_str(), d.as_secs()), ("abc", 3599));
        let (_, d) =
            parse_token_response(&json!({"access_token":"abc","expires_in":"3599"})).unwrap();
        assert_eq!(d.as_secs(), 3599);
        assert!(parse_token_response(&json!({"access_token":"","expires_in":10})).is_err());
        assert!(parse_token_response(&json!({"expires_in":10})).is_err());
        assert!(parse_token_response(&json!({"access_token":"a"})).is_err());
    }

    #[test]
    fn basic_credentials_are_form_encoded() {
        assert_eq!(form_encode("a b:c/d"), "a+b%3Ac%2Fd");
        assert_eq!(form_encode("plain-id_1.x~"), "plain-id_1.x~");
    }

    #[tokio::test]
    async fn no_token_endpoint_means_503_not_an_empty_bearer() {
        let id = ServiceIdentity::new(
            &IdentityConfig::ClientCredentials {
                token_url: "http://127.0.0.1:9/token".into(),
                client_id: "c".into(),
                client_secret: "s".into(),
                scope: Some("x/.default".into()),
                resource: None,
                auth_method: ClientAuthMethod::Basic,
                refresh_margin_secs: 60,
            },
            reqwest::Client::new(),
        )
        .unwrap();
        let err = id.authorization().await.unwrap_err();
        assert_eq!(err.status(), 503);
        assert!(!id.is_ready());
        // Inside the back-off window the answer is immediate and the same.
        assert_eq!(id.authorization().await.unwrap_err().status(), 503);
    }
}
