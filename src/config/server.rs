//! The process: `pingora` (Pingora's own server settings), `logging`, `health`.

use super::{Errors, GatewayConfig};
use pingora_core::server::configuration::ServerConf;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`; `RUST_LOG` overrides it.
    pub level: String,
    /// One line per request at `info`.
    pub access_log: bool,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
            access_log: true,
        }
    }
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// How often the upstream is probed (TCP connect) for `/readyz`.
    pub upstream_check_interval_ms: u64,
    /// On SIGTERM, how long `/readyz` answers 503 ("draining") while the gateway still
    /// accepts and serves, so load balancers stop sending before the listener closes. Then
    /// Pingora's grace periods apply. A second SIGTERM or a SIGINT cuts it short.
    pub drain_seconds: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            upstream_check_interval_ms: 5_000,
            drain_seconds: 5,
        }
    }
}

impl GatewayConfig {
    /// Pingora's `ServerConf` with our defaults where the file says nothing: one worker thread
    /// per core (Pingora's default is 1) and grace periods that fit systemd's stop timeout
    /// (Pingora's are 300 s + 5 s).
    pub fn server_conf(&self) -> Result<ServerConf, String> {
        let mut v = match &self.pingora {
            serde_yaml::Value::Null => serde_yaml::Value::Mapping(Default::default()),
            m @ serde_yaml::Value::Mapping(_) => m.clone(),
            _ => return Err("must be a mapping".into()),
        };
        let m = v.as_mapping_mut().expect("mapping");
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for (k, default) in [
            ("threads", cores as u64),
            ("grace_period_seconds", 10),
            ("graceful_shutdown_timeout_seconds", 5),
        ] {
            let key = serde_yaml::Value::String(k.into());
            if !m.contains_key(&key) {
                m.insert(key, serde_yaml::Value::Number(default.into()));
            }
        }
        let mut sc: ServerConf = serde_yaml::from_value(v).map_err(|e| e.to_string())?;
        sc.upstream_keepalive_pool_size = self.upstream.pool_size;
        Ok(sc)
    }
}

pub fn log_level(s: &str) -> Option<log::LevelFilter> {
    match s {
        "error" => Some(log::LevelFilter::Error),
        "warn" => Some(log::LevelFilter::Warn),
        "info" => Some(log::LevelFilter::Info),
        "debug" => Some(log::LevelFilter::Debug),
        "trace" => Some(log::LevelFilter::Trace),
        _ => None,
    }
}

pub(super) fn validate(cfg: &GatewayConfig, errs: &mut Errors) {
    if log_level(&cfg.logging.level).is_none() {
        errs.at(
            &["logging", "level"],
            format!(
                "logging.level: {:?} is not error|warn|info|debug|trace",
                cfg.logging.level
            ),
        );
    }
    if cfg.health.upstream_check_interval_ms < 100 {
        errs.at(
            &["health", "upstream_check_interval_ms"],
            "health.upstream_check_interval_ms: must be at least 100".into(),
        );
    }
    match cfg.server_conf() {
        Ok(sc) if sc.threads == 0 => errs.at(
            &["pingora", "threads"],
            "pingora.threads: must be > 0".into(),
        ),
        Ok(_) => {}
        Err(e) => errs.at(&["pingora"], format!("pingora: {e}")),
    }
    // Pingora ignores keys it does not know; a misspelt grace period would silently become
    // 300 s and systemd would SIGKILL the gateway. Refuse them here.
    if let serde_yaml::Value::Mapping(m) = &cfg.pingora {
        let known = serde_yaml::to_value(ServerConf::default()).unwrap_or_default();
        let known = known.as_mapping().cloned().unwrap_or_default();
        for k in m.keys() {
            if !known.contains_key(k) {
                let name = k.as_str().unwrap_or("?");
                errs.at(&["pingora", name], format!("pingora: unknown key {name:?}"));
            }
        }
    }
}
