//! The invalidation consumer: each instance reads the topic (partitions assigned, from the end)
//! and drops its caches of the resource types other instances wrote.

use super::{client_config, count};
use crate::config::KafkaConfig;
use crate::gateway::Gateway;
use log::{error, info, warn};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::Deserialize;
use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The two places an event names its resource type; nothing else of it is built (every
/// instance reads every event).
#[derive(Deserialize)]
struct TypeOnly<'a> {
    #[serde(borrow, default)]
    resourcetype: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<DataType<'a>>,
}

#[derive(Deserialize)]
struct DataType<'a> {
    #[serde(borrow, default)]
    resourcetype: Option<Cow<'a, str>>,
}

/// The resource type an event (plain or CloudEvents) is about.
pub(super) fn event_type(payload: &[u8]) -> Option<Cow<'_, str>> {
    let e: TypeOnly = serde_json::from_slice(payload).ok()?;
    e.resourcetype.or(e.data.and_then(|d| d.resourcetype))
}

/// Topic → cache invalidation, on a thread of its own (librdkafka polls block).
pub(super) fn consume_loop(k: KafkaConfig, gw: Arc<Gateway>, stop: Arc<AtomicBool>) {
    let mut cfg = client_config(&k);
    // Partitions are assigned, not subscribed: no group join (slow on some brokers), no
    // commits; each instance reads everything from the moment it starts.
    cfg.set("group.id", format!("fhir-gateway-{}", uuid::Uuid::new_v4()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100");
    for key in [
        "enable.idempotence",
        "acks",
        "linger.ms",
        "message.timeout.ms",
    ] {
        cfg.remove(key);
    }
    let mut last_warn: Option<Instant> = None;
    let mut warn_limited = |what: &str| {
        // librdkafka reports every failed reconnect: say it once per 30 s.
        if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            warn!("events: invalidation consumer: {what}");
            last_warn = Some(Instant::now());
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let Some(consumer) = assigned_consumer(&cfg, &k, &stop, &mut warn_limited) else {
            return;
        };
        // The consumer starts at the end of the topic: changes published before it was
        // assigned — while the broker was away, or unreachable since start-up while requests
        // were already served and cached — were not seen. Forget everything cached.
        for t in crate::gateway::CACHED_TYPES {
            gw.invalidate(t);
        }
        while !stop.load(Ordering::Relaxed) {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let Some(payload) = m.payload() else { continue };
                    if let Some(t) = event_type(payload) {
                        gw.invalidate(&t);
                        count("invalidations");
                    }
                }
                Some(Err(e)) => {
                    warn_limited(&e.to_string());
                    if broker_lost(&e) {
                        // A consumer that outlives its broker keeps stale topic ids, and
                        // librdkafka 2.12 crashes (NULL topic name) on a Fetch reply that
                        // names a new leader by a zero topic id, as a restarted tansu sends.
                        // A fresh consumer starts from fresh metadata.
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                None => {}
            }
        }
    }
}

fn broker_lost(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::UnknownTopicOrPartition
                | C::UnknownTopic
                | C::UnknownTopicId
        )
    )
}

/// A new consumer assigned to the end of every partition of the topic, retried every 2 s
/// until the broker answers; `None` on shutdown or when librdkafka refuses the settings.
fn assigned_consumer(
    cfg: &ClientConfig,
    k: &KafkaConfig,
    stop: &AtomicBool,
    warn_limited: &mut impl FnMut(&str),
) -> Option<BaseConsumer> {
    while !stop.load(Ordering::Relaxed) {
        let consumer: BaseConsumer = match cfg.create() {
            Ok(c) => c,
            Err(e) => {
                error!("events: cannot create the invalidation consumer: {e}");
                return None;
            }
        };
        match consumer.fetch_metadata(Some(&k.topic), Duration::from_secs(5)) {
            Ok(md) => {
                let mut tpl = TopicPartitionList::new();
                for t in md.topics().iter().filter(|t| t.name() == k.topic) {
                    for p in t.partitions() {
                        let _ = tpl.add_partition_offset(&k.topic, p.id(), Offset::End);
                    }
                }
                if tpl.count() > 0 && consumer.assign(&tpl).is_ok() {
                    info!(
                        "events: consuming {} partition(s) of {} for cache invalidation",
                        tpl.count(),
                        k.topic
                    );
                    return Some(consumer);
                }
            }
            Err(e) => warn_limited(&format!("topic metadata: {e}")),
        }
        drop(consumer);
        for _ in 0..20 {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    None
}
