//! The FHIR client the gateway lends to processor modules, and uses itself for requests it
//! must buffer: the pooled `upstream_http` client, the gateway's service credential, the
//! caller's audit headers and correlation id on every call. It only ever calls the configured
//! FHIR server: an absolute URL elsewhere is refused (no SSRF through `next` links).

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::headers::{DROPPED_RESPONSE_HEADERS, REQUEST_ID};
use async_trait::async_trait;
use fhir_gateway_modules::processor::{Body, ClientRequest, FhirClient, ModuleError, Response};
use http::HeaderName;
use std::sync::Arc;
use std::time::Duration;

pub use crate::upstream::head::CallIdentity;

pub struct GatewayFhirClient {
    pub gw: Arc<Gateway>,
    pub call: CallIdentity,
}

impl GatewayFhirClient {
    /// The upstream URL for a path below the FHIR base, or an absolute URL of the server (in
    /// its own or the gateway's public form).
    pub fn upstream_url(&self, p: &str) -> Result<String, ModuleError> {
        let base = self.gw.upstream.base.as_string();
        if p.starts_with("http://") || p.starts_with("https://") {
            for spelling in self.gw.upstream.base.spellings() {
                if let Some(rest) = p.strip_prefix(spelling.as_str()) {
                    if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') {
                        return Ok(format!("{base}{rest}"));
                    }
                }
            }
            let public = self.call.public_base.trim_end_matches('/');
            if let Some(rest) = p.strip_prefix(public) {
                if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') {
                    return Ok(format!("{base}{rest}"));
                }
            }
            return Err(ModuleError::Failed(format!(
                "refusing to call {p:?}: not the FHIR server"
            )));
        }
        let rel = p.trim_start_matches('/');
        // A relative path stays below the FHIR base: no `..`, no encoded slashes.
        let rel_path = rel.split('?').next().unwrap_or("");
        crate::proxy::check_path(format!("/{rel_path}").as_bytes())
            .map_err(|why| ModuleError::Failed(format!("refusing to call {p:?}: {why}")))?;
        Ok(if rel.is_empty() {
            base
        } else if rel.starts_with('?') {
            format!("{base}{rel}")
        } else {
            format!("{base}/{rel}")
        })
    }
}

const CONNECT_FAILED: &str = "connection failed";

/// `x-ms-retry-after-ms`, else `Retry-After` in seconds.
fn retry_after(r: &Response) -> Option<Duration> {
    if let Some(ms) = r
        .header("x-ms-retry-after-ms")
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return Some(Duration::from_millis(ms));
    }
    r.header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

fn failed(e: reqwest::Error) -> GatewayError {
    if e.is_timeout() {
        GatewayError::UpstreamTimeout("no answer in time".into())
    } else if e.is_connect() {
        GatewayError::UpstreamUnavailable(CONNECT_FAILED.into())
    } else {
        GatewayError::UpstreamUnavailable("request failed".into())
    }
}

#[async_trait]
impl FhirClient for GatewayFhirClient {
    async fn send(&self, req: ClientRequest) -> Result<Response, ModuleError> {
        self.call(req).await.map_err(|e| match e {
            GatewayError::UpstreamTimeout(_) | GatewayError::UpstreamUnavailable(_) => {
                ModuleError::Unavailable(e.to_string())
            }
            other => ModuleError::Failed(other.to_string()),
        })
    }
}

impl GatewayFhirClient {
    /// A call to the FHIR server with the proxy path's retry rules: only GET/HEAD/PUT/DELETE,
    /// on a failed connection or a 429/503, honouring `Retry-After` / `x-ms-retry-after-ms` up
    /// to `max_delay_ms` (a longer wait goes back to the client). POST and PATCH: once.
    pub async fn call(&self, req: ClientRequest) -> Result<Response, GatewayError> {
        let r = self.gw.retries;
        let idempotent = matches!(req.method.as_str(), "GET" | "HEAD" | "PUT" | "DELETE");
        let attempts = if idempotent { r.max_attempts.max(1) } else { 1 };
        let mut n = 1;
        loop {
            let out = self.call_once(req.clone()).await;
            if n >= attempts {
                return out;
            }
            let wait = match &out {
                Err(GatewayError::UpstreamUnavailable(m)) if m == CONNECT_FAILED => {
                    Duration::from_millis(r.base_delay_ms)
                }
                Ok(resp) if resp.status == 429 || resp.status == 503 => match retry_after(resp) {
                    Some(d) if d > Duration::from_millis(r.max_delay_ms) => return out,
                    Some(d) => d,
                    None => Duration::from_millis(r.base_delay_ms),
                },
                _ => return out,
            };
            tokio::time::sleep(wait).await;
            n += 1;
        }
    }

    /// One call to the FHIR server, errors as the gateway renders them.
    async fn call_once(&self, req: ClientRequest) -> Result<Response, GatewayError> {
        let gw = &self.gw;
        let url = self
            .upstream_url(&req.path_and_query)
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        let method = reqwest::Method::from_bytes(req.method.as_bytes())
            .map_err(|_| GatewayError::BadRequest(format!("bad method {}", req.method)))?;
        let mut rb = gw.upstream_http.request(method, url);
        let mut has_accept = false;
        for (k, v) in &req.headers {
            // Only what the allow-list forwards: modules cannot smuggle identity headers.
            let Ok(name) = HeaderName::from_bytes(k.as_bytes()) else {
                continue;
            };
            if gw.forward.contains(&name) {
                has_accept |= name == http::header::ACCEPT;
                rb = rb.header(name, v.as_str());
            }
        }
        if !has_accept {
            rb = rb.header(http::header::ACCEPT, "application/fhir+json");
        }
        if let Some(a) = &self.call.service_auth {
            rb = rb.header(http::header::AUTHORIZATION, a.clone());
        }
        rb = rb.header(REQUEST_ID, self.call.correlation_id.as_str());
        for (k, v) in &self.call.audit {
            rb = rb.header(k, v.as_str());
        }
        if let Some(b) = req.body {
            rb = rb.body(b);
        }
        let sent = std::time::Instant::now();
        let mut resp = rb.send().await.map_err(failed)?;
        crate::metrics::upstream("client", sent.elapsed());
        let status = resp.status().as_u16();
        let headers: Vec<(String, String)> = resp
            .headers()
            .iter()
            .filter(|(k, _)| {
                !DROPPED_RESPONSE_HEADERS.contains(&k.as_str())
                    && *k != http::header::CONTENT_LENGTH
                    && *k != http::header::TRANSFER_ENCODING
            })
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let cap = gw.limits.max_buffered_response_bytes;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(failed)? {
            if body.len() + chunk.len() > cap {
                return Err(GatewayError::ResponseTooLarge(cap));
            }
            body.extend_from_slice(&chunk);
        }
        let json = headers
            .iter()
            .any(|(k, v)| k == "content-type" && v.to_ascii_lowercase().contains("json"));
        let body = if body.is_empty() {
            Body::None
        } else if json {
            match serde_json::from_slice(&body) {
                Ok(v) => Body::Json(v),
                Err(_) => Body::Raw(body),
            }
        } else {
            Body::Raw(body)
        };
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// Events go nowhere until a sink is configured (the events issue brings Kafka and files).
pub struct NullSink;

#[async_trait::async_trait]
impl fhir_gateway_modules::processor::EventSink for NullSink {
    async fn publish(&self, _key: &str, _event: serde_json::Value) {}
}
