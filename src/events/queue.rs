//! The sink lent to modules: a bounded in-memory queue in front of the background writer. A
//! full queue holds the write (backpressure) for `events.queue_full_wait_ms`, then drops the
//! event with a count.

use super::count;
use crate::config::EventsConfig;
use async_trait::async_trait;
use fhir_gateway_modules::json::At;
use fhir_gateway_modules::processor::EventSink;
use log::error;
use serde_json::Value;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One event between the module and the spool: its JSON as it will be sent, written on the
/// request's side, so the writer thread only copies bytes.
pub(super) struct Queued {
    pub(super) key: String,
    pub(super) json: Vec<u8>,
    /// A Kafka header (the trace), kept beside the JSON so nothing parses it again.
    pub(super) correlation_id: String,
}

impl Queued {
    /// A tree's event: its correlation id is `correlationid`, or `data.correlationid` in a
    /// CloudEvents envelope.
    pub(super) fn of(key: &str, event: &Value) -> Queued {
        let cid = event
            .get("correlationid")
            .or_else(|| event.at("/data/correlationid"))
            .and_then(Value::as_str)
            .unwrap_or("");
        Queued {
            key: key.to_string(),
            json: serde_json::to_vec(event).expect("JSON serialises"),
            correlation_id: cid.to_string(),
        }
    }
}

/// The sink lent to modules: a bounded queue in front of the background writer.
pub struct Events {
    pub(super) cfg: EventsConfig,
    tx: SyncSender<Queued>,
    pub(super) rx: Mutex<Option<Receiver<Queued>>>,
}

impl Events {
    pub fn new(cfg: &EventsConfig) -> Events {
        let (tx, rx) = sync_channel(cfg.queue_capacity.max(1));
        Events {
            cfg: cfg.clone(),
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Events {
    /// Whether events reach other instances (a broker is configured).
    pub fn has_broker(&self) -> bool {
        self.cfg.kafka.is_some()
    }
}

#[async_trait]
impl EventSink for Events {
    async fn publish(&self, key: &str, event: Value) {
        self.enqueue(Queued::of(key, &event)).await
    }

    async fn publish_json(&self, key: &str, json: Vec<u8>, correlation_id: &str) {
        self.enqueue(Queued {
            key: key.to_string(),
            json,
            correlation_id: correlation_id.to_string(),
        })
        .await
    }
}

impl Events {
    async fn enqueue(&self, mut q: Queued) {
        count("produced");
        let deadline = Instant::now() + Duration::from_millis(self.cfg.queue_full_wait_ms);
        let mut waited = false;
        loop {
            match self.tx.try_send(q) {
                Ok(()) => return,
                // The writer is behind: hold this write's response (backpressure) rather
                // than drop its event. Polling is fine, it only happens under overload.
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    if !waited {
                        count("queue_full_waits");
                        waited = true;
                    }
                    q = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(e) => return self.lost(e),
            }
        }
    }
}

impl Events {
    fn lost(&self, e: TrySendError<Queued>) {
        match e {
            TrySendError::Full(q) => {
                count("dropped_queue_full");
                error!(
                    "event LOST: the event queue stayed full for {} ms ({} events; raise events.queue_capacity or check the spool disk): key={}",
                    self.cfg.queue_full_wait_ms, self.cfg.queue_capacity, q.key
                );
            }
            TrySendError::Disconnected(q) => {
                count("dropped_no_writer");
                error!("event LOST: the event writer is not running: key={}", q.key);
            }
        }
    }
}
