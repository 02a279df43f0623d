//! Liveness and readiness state, and the background task that keeps it current.

use crate::gateway::Gateway;
use async_trait::async_trait;
use log::{info, warn};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
pub struct Health {
    upstream_ok: AtomicBool,
    draining: AtomicBool,
    /// Keep-alive connections are closed after their answer (draining or upgrading).
    closing: AtomicBool,
}

impl Health {
    /// `None` when ready, else why not.
    pub fn not_ready_reason(&self, gw: &Gateway) -> Option<&'static str> {
        if self.draining.load(Ordering::Relaxed) {
            Some("draining")
        } else if !self.upstream_ok.load(Ordering::Relaxed) {
            Some("FHIR server unreachable")
        } else if !gw.identity.is_ready() {
            Some("no credential for the FHIR server")
        } else if !gw.auth.is_ready() {
            Some("token signing keys not loaded")
        } else {
            None
        }
    }

    /// Whether keep-alive connections should close after their answer.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed) || self.draining.load(Ordering::Relaxed)
    }

    /// An upgrade: connections move to the new process, readiness unchanged.
    pub fn set_closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

/// Loads and refreshes the issuers' signing keys: retried every `retry_secs` until loaded,
/// then refreshed every `refresh_secs`.
pub struct JwksTask {
    pub gateway: Arc<Gateway>,
}

#[async_trait]
impl BackgroundService for JwksTask {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let auth = &self.gateway.auth;
        if auth.issuers.is_empty() || auth.mode != crate::config::AuthMode::Jwt {
            return;
        }
        let retry = Duration::from_secs(auth.jwks.retry_secs);
        let refresh = Duration::from_secs(auth.jwks.refresh_secs);
        let mut last_full = std::time::Instant::now();
        auth.refresh(true).await;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = shutdown.changed() => return,
            }
            let due = last_full.elapsed() >= refresh;
            if due {
                last_full = std::time::Instant::now();
            }
            auth.refresh(due).await;
        }
    }
}

/// Probes the upstream (DNS + TCP connect) and refreshes the service token on an interval.
pub struct HealthTask {
    pub gateway: Arc<Gateway>,
    pub interval: Duration,
}

#[async_trait]
impl BackgroundService for HealthTask {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let gw = &self.gateway;
        loop {
            let _ = gw.upstream.resolve();
            let connect = Duration::from_millis(gw.upstream.timeouts().connect_ms);
            let ok = matches!(
                tokio::time::timeout(connect, tokio::net::TcpStream::connect(gw.upstream.addr()))
                    .await,
                Ok(Ok(_))
            );
            let was = gw.health.upstream_ok.swap(ok, Ordering::Relaxed);
            if ok != was {
                if ok {
                    info!("FHIR server {} reachable", gw.upstream.base.as_string());
                } else {
                    warn!("FHIR server {} unreachable", gw.upstream.base.as_string());
                }
            }
            gw.identity.refresh_if_due().await;
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = shutdown.changed() => {
                    gw.health.set_draining();
                    info!("shutting down: /readyz now reports draining");
                    return;
                }
            }
        }
    }
}
