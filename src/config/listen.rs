//! `listen` and `metrics`: where the gateway accepts connections.

use super::Errors;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// `ip:port`.
    pub addr: String,
    /// Downstream TLS; absent = plain HTTP (behind a TLS-terminating load balancer).
    #[serde(default)]
    pub tls: Option<ListenTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenTls {
    pub cert_file: String,
    pub key_file: String,
}

/// Prometheus metrics on their own listener (keep it off the public interface).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `ip:port`, e.g. `127.0.0.1:9091`; absent = no metrics listener.
    #[serde(default)]
    pub listen: Option<String>,
}

/// Checks the listeners and the metrics listener; returns the listen addresses that parse
/// (`auth` refuses some of them in `insecure_dev`).
pub(super) fn validate(
    listen: &[ListenConfig],
    metrics: &MetricsConfig,
    errs: &mut Errors,
) -> Vec<SocketAddr> {
    if listen.is_empty() {
        errs.at(
            &["listen"],
            "listen: at least one listener is required".into(),
        );
    }
    let mut addrs = Vec::new();
    for (i, l) in listen.iter().enumerate() {
        let idx = i.to_string();
        match l.addr.parse::<SocketAddr>() {
            Ok(a) => addrs.push(a),
            Err(_) => errs.at(
                &["listen", &idx, "addr"],
                format!("listen[{i}].addr: {:?} is not an ip:port address", l.addr),
            ),
        }
        if let Some(tls) = &l.tls {
            for (key, file) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
                if !Path::new(file).is_file() {
                    errs.at(
                        &["listen", &idx, "tls", key],
                        format!("listen[{i}].tls.{key}: {file} does not exist"),
                    );
                }
            }
        }
    }

    if let Some(m) = &metrics.listen {
        match m.parse::<SocketAddr>() {
            Ok(a) if addrs.contains(&a) => errs.at(
                &["metrics", "listen"],
                "metrics.listen: same address as a listener".into(),
            ),
            Ok(_) => {}
            Err(_) => errs.at(
                &["metrics", "listen"],
                format!("metrics.listen: {m:?} is not an ip:port address"),
            ),
        }
    }
    addrs
}
