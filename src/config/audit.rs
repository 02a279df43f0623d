//! `audit`: the gateway's own audit trail (`src/audit/`): where it is written, the key that
//! signs its checkpoints, and how often they come.

use super::{Errors, EventsConfig, KafkaConfig};
use serde::Deserialize;
use std::collections::BTreeMap;

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
    /// The most answer bytes the queued records may hold (they keep what each answer showed
    /// until the writer reads it); beyond it requests wait, as for a full queue.
    #[serde(default = "default_max_queue_bytes")]
    pub max_queue_bytes: usize,
    /// Who may read the trail through `/manage/audit`, besides Administrators: `Patient`
    /// lets a patient read who saw their own record ("patient access log").
    #[serde(default)]
    pub patient_access_log: bool,
    /// Also send every line of the file, in order, to a Kafka topic (the production sink).
    #[serde(default)]
    pub kafka: Option<AuditKafka>,
    /// Also send every AuditEvent of the file to the FHIR server, in `batch` Bundles.
    #[serde(default)]
    pub fhir: Option<AuditFhir>,
}

/// `audit.fhir`: the trail's AuditEvents as resources on the FHIR server the gateway fronts.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuditFhir {
    /// AuditEvents per Bundle.
    #[serde(default = "default_fhir_batch")]
    pub batch: usize,
    /// How often new lines are looked for (a full batch is followed by the next at once); a
    /// failed batch waits twice as long each time, up to a minute.
    #[serde(default = "default_fhir_interval")]
    pub interval_ms: u64,
    /// The byte offset of the file sent so far (default: `audit.file` + `.fhir-sent`).
    #[serde(default)]
    pub cursor: Option<String>,
}

/// `audit.kafka`: the topic, and the broker when it is not the events' one.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct AuditKafka {
    pub topic: String,
    /// Default: `events.kafka.bootstrap_servers` (with its connection string and properties).
    #[serde(default)]
    pub bootstrap_servers: Option<String>,
    /// An Event Hubs connection string (only with `bootstrap_servers`).
    #[serde(default)]
    pub connection_string: Option<String>,
    /// librdkafka properties, over the events' ones when their broker is used.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    #[serde(default)]
    pub spool: AuditSpool,
}

/// The audit sink's own spool (never the events' one: two writers, one lock).
#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
pub struct AuditSpool {
    /// Default: `audit-spool` next to `audit.file`.
    #[serde(default)]
    pub dir: Option<String>,
    /// When the spool holds this much, lines wait in the file (never dropped).
    #[serde(default)]
    pub max_bytes: Option<u64>,
    #[serde(default)]
    pub segment_bytes: Option<u64>,
}

fn default_fhir_batch() -> usize {
    100
}
fn default_fhir_interval() -> u64 {
    1000
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
fn default_max_queue_bytes() -> usize {
    256 << 20
}

/// What validation read: the checkpoint key, and the resolved Kafka sink.
#[derive(Debug, Default)]
pub struct BuiltAudit {
    pub key: Vec<u8>,
    pub sink: Option<AuditSink>,
    pub fhir: Option<AuditFhirSink>,
}

/// `audit.fhir` resolved.
#[derive(Debug, Clone)]
pub struct AuditFhirSink {
    pub batch: usize,
    pub interval: std::time::Duration,
    pub cursor: std::path::PathBuf,
}

/// `audit.kafka` resolved: the broker settings in full, and the spool.
#[derive(Debug, Clone)]
pub struct AuditSink {
    pub kafka: KafkaConfig,
    pub spool_dir: String,
    pub max_bytes: u64,
    pub segment_bytes: u64,
}

pub(super) fn validate(
    cfg: Option<&AuditConfig>,
    events: &EventsConfig,
    errs: &mut Errors,
) -> BuiltAudit {
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
    if cfg.max_queue_bytes < 1 << 20 || cfg.max_queue_bytes < cfg.max_body_bytes {
        errs.at(
            &["audit", "max_queue_bytes"],
            "audit.max_queue_bytes: at least 1 MiB and at least max_body_bytes".into(),
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
    if let Some(k) = &cfg.kafka {
        built.sink = sink(cfg, k, events, errs);
    }
    if let Some(f) = &cfg.fhir {
        built.fhir = fhir_sink(cfg, f, errs);
    }
    built
}

fn fhir_sink(cfg: &AuditConfig, f: &AuditFhir, errs: &mut Errors) -> Option<AuditFhirSink> {
    if !(1..=1000).contains(&f.batch) {
        errs.at(
            &["audit", "fhir", "batch"],
            "audit.fhir.batch: 1..=1000".into(),
        );
    }
    if !(100..=3_600_000).contains(&f.interval_ms) {
        errs.at(
            &["audit", "fhir", "interval_ms"],
            "audit.fhir.interval_ms: 100..=3600000".into(),
        );
    }
    let cursor = match &f.cursor {
        Some(c) => std::path::PathBuf::from(c),
        None => std::path::PathBuf::from(format!("{}.fhir-sent", cfg.file)),
    };
    if !cursor.is_absolute() || !cursor.parent().is_some_and(|d| d.is_dir()) {
        errs.at(
            &["audit", "fhir", "cursor"],
            format!(
                "audit.fhir.cursor: {} must be an absolute path in a directory that exists",
                cursor.display()
            ),
        );
    }
    Some(AuditFhirSink {
        batch: f.batch,
        interval: std::time::Duration::from_millis(f.interval_ms),
        cursor,
    })
}

fn sink(
    cfg: &AuditConfig,
    k: &AuditKafka,
    events: &EventsConfig,
    errs: &mut Errors,
) -> Option<AuditSink> {
    let at = &["audit", "kafka"];
    if k.topic.trim().is_empty() {
        errs.at(at, "audit.kafka.topic: required".into());
    }
    let mut kafka = match (&k.bootstrap_servers, &events.kafka) {
        (Some(b), _) if !b.trim().is_empty() => KafkaConfig {
            bootstrap_servers: b.clone(),
            topic: String::new(),
            connection_string: k.connection_string.clone(),
            properties: BTreeMap::new(),
            invalidate_caches: false,
        },
        (None, Some(e)) if k.connection_string.is_none() => e.clone(),
        (None, Some(_)) => {
            errs.at(
                at,
                "audit.kafka.connection_string: only with audit.kafka.bootstrap_servers".into(),
            );
            return None;
        }
        _ => {
            errs.at(
                at,
                "audit.kafka: needs bootstrap_servers (or an events.kafka broker to share)".into(),
            );
            return None;
        }
    };
    kafka.topic = k.topic.clone();
    kafka.invalidate_caches = false;
    kafka.properties.extend(k.properties.clone());
    // A failed send must not let later lines through before it (a gap the re-send would turn
    // into a reordering): the producer then fails as a whole and the loop makes a new one.
    kafka
        .properties
        .entry("enable.gapless.guarantee".into())
        .or_insert_with(|| "true".into());
    let spool_dir = match &k.spool.dir {
        Some(d) => d.clone(),
        None => std::path::Path::new(&cfg.file)
            .with_file_name("audit-spool")
            .to_string_lossy()
            .into_owned(),
    };
    if !std::path::Path::new(&spool_dir).is_absolute() {
        errs.at(
            &["audit", "kafka", "spool", "dir"],
            "audit.kafka.spool.dir: must be an absolute path".into(),
        );
    }
    if events.kafka.is_some()
        && std::path::Path::new(&spool_dir) == std::path::Path::new(&events.spool.dir)
    {
        errs.at(
            &["audit", "kafka", "spool", "dir"],
            "audit.kafka.spool.dir: must not be events.spool.dir (one spool per stream)".into(),
        );
    }
    let max_bytes = k.spool.max_bytes.unwrap_or(1 << 30);
    let segment_bytes = k.spool.segment_bytes.unwrap_or(16 << 20);
    if segment_bytes == 0 || segment_bytes > max_bytes {
        errs.at(
            &["audit", "kafka", "spool", "segment_bytes"],
            "audit.kafka.spool.segment_bytes: between 1 and max_bytes".into(),
        );
    }
    Some(AuditSink {
        kafka,
        spool_dir,
        max_bytes,
        segment_bytes,
    })
}
