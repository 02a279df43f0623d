//! The sink lent to modules: a bounded in-memory queue in front of the background writer. A
//! full queue holds the write (backpressure) for `events.queue_full_wait_ms`, then drops the
//! event with a count.

use super::count;
use crate::config::EventsConfig;
use async_trait::async_trait;
use fhir_gateway_modules::processor::EventSink;
use log::error;
use serde_json::Value;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One event between the module and the spool.
pub(super) struct Queued {
    pub(super) key: String,
    pub(super) event: Value,
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
        count("produced");
        let mut q = Queued {
            key: key.to_string(),
            event,
        };
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
