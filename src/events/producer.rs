//! The producer loop: spool → broker, in order, acknowledging the spool only after the broker
//! confirmed; a new producer when the broker lost its state.

use super::payload::{decode, since_ms};
use super::spool::Spool;
use super::{client_config, count, DELIVERY_SECONDS, SPOOL_DEPTH};
use crate::config::KafkaConfig;
use log::{error, warn};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use std::sync::Arc;
use std::time::Duration;

fn new_producer(k: &KafkaConfig) -> Option<FutureProducer> {
    match client_config(k).create::<FutureProducer>() {
        Ok(p) => Some(p),
        Err(e) => {
            error!("events: cannot create the Kafka producer: {e}");
            None
        }
    }
}

/// Spool → broker, in order, acknowledging only what the broker confirmed.
/// It runs until the process ends, graceful shutdown included: requests still in flight
/// publish, and what is not confirmed stays in the spool for the next start.
pub(super) async fn produce_loop(
    k: KafkaConfig,
    spool: Arc<Spool>,
    wake: Arc<tokio::sync::Notify>,
) {
    let mut producer = new_producer(&k);
    let mut backoff = Duration::from_millis(200);
    let mut failed_rounds = 0u32;
    loop {
        let Some(p) = producer.as_ref() else {
            tokio::time::sleep(Duration::from_secs(5)).await;
            producer = new_producer(&k);
            continue;
        };
        let batch = match spool.read_from(spool.first_pending(), 500) {
            Ok(b) => b,
            Err(e) => {
                error!("events: reading the spool: {e}");
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
        let sends = batch.iter().map(|(_, rec)| {
            let (_, cid, json) = decode(&rec.payload);
            let cid = std::str::from_utf8(cid).unwrap_or("");
            let mut headers = OwnedHeaders::new().insert(Header {
                key: "correlationid",
                value: Some(cid),
            });
            if json.starts_with(b"{\"data\"")
                && memchr::memmem::find(json, b"\"specversion\"").is_some()
            {
                // Structured-mode CloudEvents (Kafka protocol binding).
                headers = headers.insert(Header {
                    key: "content-type",
                    value: Some("application/cloudevents+json; charset=UTF-8"),
                });
            }
            p.send(
                FutureRecord::to(&k.topic)
                    .key(&rec.key)
                    .payload(json)
                    .headers(headers),
                Timeout::After(Duration::from_secs(5)),
            )
        });
        let results = futures::future::join_all(sends).await;
        // Acknowledge the confirmed prefix; what follows a failure is sent again (at least
        // once: a consumer may see duplicates, never a gap).
        let mut confirmed = None;
        let mut failed = None;
        for ((seq, rec), r) in batch.iter().zip(results) {
            match r {
                Ok(_) if failed.is_none() => {
                    confirmed = Some(*seq);
                    count("delivered");
                    DELIVERY_SECONDS.observe(since_ms(decode(&rec.payload).0));
                }
                Ok(_) => {}
                Err((e, _)) => {
                    count("failed");
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(seq) = confirmed {
            if let Err(e) = spool.ack(seq) {
                // Delivered events are not sent again (the spool moved on in memory); only
                // a restart before the cursor is written would replay them. Do not spin.
                error!("events: acknowledging the spool: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            SPOOL_DEPTH.set(spool.depth() as i64);
        }
        match failed {
            None => {
                backoff = Duration::from_millis(200);
                failed_rounds = 0;
            }
            Some(e) => {
                failed_rounds += 1;
                warn!(
                    "events: the broker did not take {} event(s) ({e}); {} wait in the spool, retrying in {:?}",
                    batch.len(),
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
                        "events: creating a new producer ({})",
                        if fenced {
                            "the broker refused its producer state"
                        } else {
                            "two rounds failed in a row"
                        }
                    );
                    count("producer_reset");
                    producer = new_producer(&k);
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
