//! `events`: where PublishFHIREvent's events go (queue → spool → Kafka, or a file).

use super::Errors;
use serde::Deserialize;
use std::path::Path;

/// `events:`. With `kafka` set, events go queue → spool → broker; without, to `file`.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct EventsConfig {
    /// JSON lines, one event each (the default sink when no broker is configured).
    #[serde(default = "default_events_file")]
    pub file: String,
    #[serde(default)]
    pub kafka: Option<KafkaConfig>,
    /// Events waiting between the request path and the spool writer. When full, an event is
    /// dropped with an error log and `fhirgw_events_total{stage="dropped_queue_full"}`.
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// How long a write's response waits for room in a full queue before its event is
    /// dropped (backpressure: under overload writes slow down instead of losing events).
    #[serde(default = "default_queue_full_wait_ms")]
    pub queue_full_wait_ms: u64,
    #[serde(default)]
    pub spool: SpoolSettings,
}

fn default_events_file() -> String {
    "events.jsonl".into()
}

fn default_queue() -> usize {
    10_000
}

fn default_queue_full_wait_ms() -> u64 {
    10_000
}

impl EventsConfig {
    /// Makes the file and spool paths absolute against `base`.
    pub fn absolutize(&mut self, base: &Path) {
        for p in [&mut self.file, &mut self.spool.dir] {
            if Path::new(p.as_str()).is_relative() {
                *p = base.join(p.as_str()).to_string_lossy().into_owned();
            }
        }
    }
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            file: default_events_file(),
            kafka: None,
            queue_capacity: default_queue(),
            queue_full_wait_ms: default_queue_full_wait_ms(),
            spool: SpoolSettings::default(),
        }
    }
}

/// The broker: Azure Event Hubs' Kafka endpoint in production, any Kafka-protocol broker.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `<namespace>.servicebus.windows.net:9093` for Event Hubs.
    pub bootstrap_servers: String,
    pub topic: String,
    /// An Event Hubs connection string: sets SASL_SSL / PLAIN with `$ConnectionString`.
    #[serde(default)]
    pub connection_string: Option<String>,
    /// Any librdkafka property, passed through (last word over the defaults).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// Consume the topic to drop consent/link caches when another instance saw a write.
    #[serde(default = "default_true")]
    pub invalidate_caches: bool,
}

/// The local durable spool between the queue and the broker.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SpoolSettings {
    #[serde(default = "default_spool_dir")]
    pub dir: String,
    /// `always` (fsync every event), `never`, or a number of milliseconds between fsyncs.
    #[serde(default = "default_spool_fsync")]
    pub fsync: String,
    /// When the spool holds this much, new events are dropped with an error log and
    /// `fhirgw_events_total{stage="dropped_spool_full"}`.
    #[serde(default = "default_spool_max")]
    pub max_bytes: u64,
    #[serde(default = "default_segment")]
    pub segment_bytes: u64,
}

fn default_spool_dir() -> String {
    "spool".into()
}
fn default_spool_fsync() -> String {
    "100".into()
}
fn default_spool_max() -> u64 {
    1 << 30
}
fn default_segment() -> u64 {
    16 << 20
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            dir: default_spool_dir(),
            fsync: default_spool_fsync(),
            max_bytes: default_spool_max(),
            segment_bytes: default_segment(),
        }
    }
}

impl SpoolSettings {
    pub fn fsync(&self) -> Result<crate::events::spool::Fsync, String> {
        use crate::events::spool::Fsync;
        match self.fsync.as_str() {
            "always" => Ok(Fsync::Always),
            "never" => Ok(Fsync::Never),
            ms => ms
                .parse::<u64>()
                .ok()
                .filter(|m| *m > 0)
                .map(Fsync::EveryMs)
                .ok_or_else(|| {
                    format!("events.spool.fsync: {ms:?} is not always, never or milliseconds")
                }),
        }
    }
}

fn default_true() -> bool {
    true
}

pub(super) fn validate(events: &EventsConfig, errs: &mut Errors) {
    if let Err(e) = events.spool.fsync() {
        errs.at(&["events", "spool", "fsync"], e);
    }
    if events.queue_capacity == 0 {
        errs.at(
            &["events", "queue_capacity"],
            "events.queue_capacity must be at least 1".into(),
        );
    }
    if events.spool.segment_bytes == 0 || events.spool.segment_bytes > events.spool.max_bytes {
        errs.at(
            &["events", "spool", "segment_bytes"],
            "events.spool.segment_bytes must be between 1 and max_bytes".into(),
        );
    }
    if let Some(k) = &events.kafka {
        if k.bootstrap_servers.trim().is_empty() || k.topic.trim().is_empty() {
            errs.at(
                &["events", "kafka"],
                "events.kafka needs bootstrap_servers and topic".into(),
            );
        }
    }
}
