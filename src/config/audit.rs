//! `audit`: the gateway's own audit trail (`src/audit/`): where it is written, the key that
//! signs its checkpoints, and how often they come.

use super::Errors;
use serde::Deserialize;

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// The JSON-lines file this instance appends to (one file per instance: each keeps its own
    /// hash chain). Its directory must exist.
    pub file: String,
    /// A file holding the HMAC key (at least 32 bytes, mode 600) that signs checkpoints; the
    /// same key verifies them (`fhir-gateway audit verify`).
    pub key_file: String,
    /// Names this instance in its records (default: the host name).
    #[serde(default)]
    pub instance: Option<String>,
    /// A signed checkpoint after this many records...
    #[serde(default = "default_every")]
    pub checkpoint_every: u64,
    /// ...or this many seconds, whichever comes first (only when records came).
    #[serde(default = "default_secs")]
    pub checkpoint_secs: u64,
    /// Records waiting for the writer; a full queue makes requests wait, never drops.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// The most of one answer kept to find the patients it showed; a larger answer is
    /// recorded with `patients incomplete`.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Who may read the trail through `/manage/audit`, besides Administrators: `Patient`
    /// lets a patient read who saw their own record ("patient access log").
    #[serde(default)]
    pub patient_access_log: bool,
}

fn default_every() -> u64 {
    1000
}
fn default_secs() -> u64 {
    60
}
fn default_queue() -> usize {
    65_536
}
fn default_max_body() -> usize {
    64 << 20
}

/// What validation read: the checkpoint key.
#[derive(Debug, Default)]
pub struct BuiltAudit {
    pub key: Vec<u8>,
}

pub(super) fn validate(cfg: Option<&AuditConfig>, errs: &mut Errors) -> BuiltAudit {
    let mut built = BuiltAudit::default();
    let Some(cfg) = cfg else {
        return built;
    };
    match super::bulk::read_secret(&cfg.key_file) {
        Ok(k) => built.key = k,
        Err(e) => errs.at(&["audit", "key_file"], format!("audit.key_file: {e}")),
    }
    let file = std::path::Path::new(&cfg.file);
    if !file.is_absolute() {
        errs.at(
            &["audit", "file"],
            "audit.file: must be an absolute path".into(),
        );
    } else if !file.parent().is_some_and(|d| d.is_dir()) {
        errs.at(
            &["audit", "file"],
            format!("audit.file: the directory of {} does not exist", cfg.file),
        );
    }
    if cfg.checkpoint_every == 0 || cfg.checkpoint_secs == 0 {
        errs.at(
            &["audit", "checkpoint_every"],
            "audit.checkpoint_every and checkpoint_secs: must be at least 1".into(),
        );
    }
    if !(16..=1 << 24).contains(&cfg.queue) {
        errs.at(&["audit", "queue"], "audit.queue: 16..=16777216".into());
    }
    if let Some(i) = &cfg.instance {
        if i.is_empty()
            || !i
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            errs.at(
                &["audit", "instance"],
                "audit.instance: letters, digits, '-', '_' and '.' only".into(),
            );
        }
    }
    built
}
