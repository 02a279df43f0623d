//! `bulk`: Bulk Data export — who may start one, and the key that binds the status and file
//! URLs the gateway hands out to the caller who started it (`src/bulk.rs`).

use super::Errors;
use crate::auth::policy::role_by_name;
use crate::bulk::{BindingKey, MIN_KEY_BYTES};
use fhir_gateway_modules::Role;
use serde::Deserialize;

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct BulkConfig {
    /// Roles that may start an export (`$export` at system, `Patient`, `Group/{id}`). Empty:
    /// nobody.
    pub export_roles: Vec<String>,
    /// A file holding the HMAC key (at least 32 bytes, readable only by the service) that
    /// signs handed-out URLs. Every instance behind one load balancer needs the same key;
    /// without one, each process makes a random key at start.
    pub binding_key_file: Option<String>,
    /// How long a handed-out status or file URL works, seconds.
    pub url_lifetime_secs: u64,
}

impl Default for BulkConfig {
    fn default() -> Self {
        BulkConfig {
            export_roles: vec!["Administrator".into()],
            binding_key_file: None,
            url_lifetime_secs: 24 * 3600,
        }
    }
}

/// What validation built from the section.
#[derive(Debug, Default)]
pub struct BuiltBulk {
    pub export_roles: Vec<Role>,
    /// `None` when no key file is configured.
    pub key: Option<BindingKey>,
}

/// Reads the key file: it must exist, be readable only by its owner (it is a secret) and hold
/// at least `MIN_KEY_BYTES` bytes (surrounding whitespace, e.g. a final newline, is not key).
pub(super) fn read_key(path: &str) -> Result<BindingKey, String> {
    BindingKey::new(&read_secret(path)?)
}

/// A secret key file: it must exist, be readable only by its owner and hold at least
/// `MIN_KEY_BYTES` bytes (surrounding whitespace is not key).
pub(super) fn read_secret(path: &str) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{path}: {e}"))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{path}: readable by others than its owner (mode {:o}); chmod 600",
            meta.permissions().mode() & 0o777
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let key = bytes.trim_ascii();
    if key.len() < MIN_KEY_BYTES {
        return Err(format!(
            "{path}: the key has {} bytes; at least {MIN_KEY_BYTES} are needed",
            key.len()
        ));
    }
    Ok(key.to_vec())
}

pub(super) fn validate(cfg: &BulkConfig, errs: &mut Errors) -> BuiltBulk {
    let mut built = BuiltBulk::default();
    for (i, n) in cfg.export_roles.iter().enumerate() {
        match role_by_name(n) {
            Some(r) => built.export_roles.push(r),
            None => errs.at(
                &["bulk", "export_roles", &i.to_string()],
                format!("bulk.export_roles: unknown role {n:?}"),
            ),
        }
    }
    if let Some(path) = &cfg.binding_key_file {
        match read_key(path) {
            Ok(k) => built.key = Some(k),
            Err(e) => errs.at(
                &["bulk", "binding_key_file"],
                format!("bulk.binding_key_file: {e}"),
            ),
        }
    }
    if !(60..=30 * 24 * 3600).contains(&cfg.url_lifetime_secs) {
        errs.at(
            &["bulk", "url_lifetime_secs"],
            "bulk.url_lifetime_secs: must be between 60 and 2592000 (30 days)".into(),
        );
    }
    built
}
