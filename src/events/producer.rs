//! The producer loop: spool → broker, in order, acknowledging the spool only after the broker
//! confirmed; a new producer when the broker lost its state. One policy for every spooled
//! stream: the events and the audit trail's Kafka sink each run it as a [`Lane`].

use super::client_config;
use super::payload::{decode, now_ms, seconds_between};
use super::spool::Spool;
use crate::config::KafkaConfig;
use log::{error, warn};
use prometheus::{Histogram, IntCounterVec, IntGauge};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use std::sync::Arc;
use std::time::Duration;

/// What differs between the spooled streams: the name in logs, the metrics, and how a spool
/// payload becomes a message (enqueue time in ms, value, headers).
pub(crate) struct Lane {
    pub name: &'static str,
    /// What one record is, in logs ("event(s)", "line(s)").
    pub what: &'static str,
    /// Stages `delivered`, `failed`, `producer_reset`.
    pub counter: &'static IntCounterVec,
    /// Records in the spool not yet confirmed.
    pub depth: &'static IntGauge,
    pub delivery: &'static Histogram,
    pub message: fn(&[u8]) -> Message<'_>,
}

/// A spool payload as a message: when it was spooled (ms since the epoch), value, headers.
pub(crate) type Message<'a> = (u64, &'a [u8], OwnedHeaders);

impl Lane {
    fn count(&self, stage: &str) {
        self.count_by(stage, 1);
    }

    fn count_by(&self, stage: &str, n: u64) {
        if n > 0 {
            self.counter.with_label_values(&[stage]).inc_by(n);
        }
    }
}

/// An event: the correlation id as a header, and the CloudEvents content type when it is one.
pub(crate) fn event_message(payload: &[u8]) -> Message<'_> {
    let (t, cid, json) = decode(payload);
    let cid = std::str::from_utf8(cid).unwrap_or("");
    let mut headers = OwnedHeaders::new().insert(Header {
        key: "correlationid",
        value: Some(cid),
    });
    if json.starts_with(b"{\"data\"") && memchr::memmem::find(json, b"\"specversion\"").is_some() {
        // Structured-mode CloudEvents (Kafka protocol binding).
        headers = headers.insert(Header {
            key: "content-type",
            value: Some("application/cloudevents+json; charset=UTF-8"),
        });
    }
    (t, json, headers)
}

fn new_producer(k: &KafkaConfig, lane: &Lane) -> Option<FutureProducer> {
    match client_config(k).create::<FutureProducer>() {
        Ok(p) => Some(p),
        Err(e) => {
            error!("{}: cannot create the Kafka producer: {e}", lane.name);
            None
        }
    }
}

/// Spool → broker, in order, acknowledging only what the broker confirmed.
/// It runs until the process ends, graceful shutdown included: requests still in flight
/// publish, and what is not confirmed stays in the spool for the next start.
pub(crate) async fn produce_loop(
    lane: Lane,
    k: KafkaConfig,
    spool: Arc<Spool>,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut producer = new_producer(&k, &lane);
    let mut backoff = Duration::from_millis(200);
    let mut failed_rounds = 0u32;
    loop {
        let Some(p) = producer.as_ref() else {
            tokio::time::sleep(Duration::from_secs(5)).await;
            producer = new_producer(&k, &lane);
            continue;
        };
        let batch = match spool.read_from(spool.first_pending(), 500) {
            Ok(b) => b,
            Err(e) => {
                error!("{}: reading the spool: {e}", lane.name);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                _ = wake.notified() => {
                    // As librdkafka's linger.ms: let a batch gather.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            continue;
        }
        // When each was spooled, for the delivery histogram (read once: a message's headers
        // are built in librdkafka's memory, not twice per message).
        let mut spooled_at = Vec::with_capacity(batch.len());
        let sends = batch.iter().map(|(_, rec)| {
            let (t, value, headers) = (lane.message)(&rec.payload);
            spooled_at.push(t);
            p.send(
                FutureRecord::to(&k.topic)
                    .key(&rec.key)
                    .payload(value)
                    .headers(headers),
                Timeout::After(Duration::from_secs(5)),
            )
        });
        let results = futures::future::join_all(sends).await;
        // Acknowledge the confirmed prefix; what follows a failure is sent again (at least
        // once: a consumer may see duplicates, never a gap).
        let mut confirmed = None;
        let mut failed = None;
        let (mut delivered, mut failures) = (0, 0);
        let now = now_ms();
        for (((seq, _), r), t) in batch.iter().zip(results).zip(spooled_at) {
            match r {
                Ok(_) if failed.is_none() => {
                    confirmed = Some(*seq);
                    delivered += 1;
                    lane.delivery.observe(seconds_between(t, now));
                }
                Ok(_) => {}
                Err((e, _)) => {
                    failures += 1;
                    failed.get_or_insert(e);
                }
            }
        }
        // Once per batch: a labelled counter is a lookup.
        lane.count_by("delivered", delivered);
        lane.count_by("failed", failures);
        if let Some(seq) = confirmed {
            if let Err(e) = spool.ack(seq) {
                // Delivered events are not sent again (the spool moved on in memory); only
                // a restart before the cursor is written would replay them. Do not spin.
                error!("{}: acknowledging the spool: {e}", lane.name);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            lane.depth.set(spool.depth() as i64);
        }
        match failed {
            None => {
                backoff = Duration::from_millis(200);
                failed_rounds = 0;
            }
            Some(e) => {
                failed_rounds += 1;
                warn!(
                    "{}: the broker did not take {} {} ({e}); {} wait in the spool, retrying in {:?}",
                    lane.name,
                    batch.len(),
                    lane.what,
                    spool.depth(),
                    backoff
                );
                // An idempotent producer whose broker lost its state (a restart of an
                // in-memory broker, a failover) can stay fenced or time out for good while
                // the broker itself is fine: a new producer gets a new producer id. What the
                // old one had in flight is still in the spool and is sent again.
                let fenced = p.client().fatal_error().is_some() || producer_state_lost(&e);
                if fenced || failed_rounds >= 2 {
                    warn!(
                        "{}: creating a new producer ({})",
                        lane.name,
                        if fenced {
                            "the broker refused its producer state"
                        } else {
                            "two rounds failed in a row"
                        }
                    );
                    lane.count("producer_reset");
                    producer = new_producer(&k, &lane);
                    failed_rounds = 0;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Errors that mean the broker no longer knows (or accepts) this producer's id and sequence.
fn producer_state_lost(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::ProducerFenced
                | C::InvalidProducerEpoch
                | C::UnknownProducerId
                | C::OutOfOrderSequenceNumber
                | C::InvalidProducerIdMapping
                | C::Unknown
        )
    )
}
