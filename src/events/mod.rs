//! Events of successful writes, on their way out — never on the request path:
//!
//! PublishFHIREvent → [`Events::publish`](Events#method.publish) (a bounded in-memory queue,
//! `try_send`) → the spool writer thread (appends to the durable [`spool`]) → the producer loop
//! (rdkafka, idempotent, in order; acknowledges the spool only after the broker confirmed). A
//! broker outage only grows the spool; a restart replays it. Without a broker, events go to a
//! JSON-lines file.
//!
//! Each instance also consumes the topic (partitions assigned, from the end) and drops its
//! consent/link caches when another instance saw a write (cross-instance invalidation).
//!
//! Everything that talks to the broker is created in [`EventsTask`], a Pingora background
//! service, so it exists after the daemon fork.
//!
//! Source files: `queue.rs` (the sink modules publish to), `payload.rs` (what a spool record
//! holds), `writer.rs` (queue → spool, or → JSON-lines file), `producer.rs` (spool → broker),
//! `consumer.rs` (topic → cache invalidation), [`spool`] (the durable log), `tests.rs`.

mod consumer;
pub(crate) mod payload;
pub(crate) mod producer;
mod queue;
pub mod spool;
#[cfg(test)]
mod tests;
mod writer;

pub use queue::Events;

use crate::config::{EventsConfig, KafkaConfig};
use crate::gateway::Gateway;
use async_trait::async_trait;
use consumer::consume_loop;
use log::{error, info};
use once_cell::sync::Lazy;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use producer::produce_loop;
use prometheus::{
    register_histogram, register_int_counter_vec, register_int_gauge, Histogram, IntCounterVec,
    IntGauge,
};
use rdkafka::config::ClientConfig;
use spool::Spool;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use writer::{file_writer, spool_config, spool_writer};

static EVENTS: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "fhirgw_events_total",
        "Events by stage: produced (queued by a module), spooled, delivered, failed (a delivery attempt), queue_full_waits (a write held because the queue was full), dropped_queue_full (still full after events.queue_full_wait_ms), dropped_no_writer, dropped_spool_full, dropped_spool_error, dropped_file, written_file, invalidations, producer_reset (a new producer after the broker lost its state)",
        &["stage"]
    )
    .expect("metric registers once")
});

static SPOOL_DEPTH: Lazy<IntGauge> = Lazy::new(|| {
    register_int_gauge!(
        "fhirgw_events_spool_depth",
        "Events in the spool not yet confirmed by the broker"
    )
    .expect("metric registers once")
});

static DELIVERY_SECONDS: Lazy<Histogram> = Lazy::new(|| {
    register_histogram!(
        "fhirgw_events_delivery_seconds",
        "Time from the module publishing an event to the broker confirming it",
        vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0]
    )
    .expect("metric registers once")
});

fn count(stage: &str) {
    EVENTS.with_label_values(&[stage]).inc();
}
/// What can be checked before the daemon forks: librdkafka accepts the properties (a
/// misspelt one would otherwise only show as a producer that never starts), and the spool
/// directory can be created.
pub fn check(cfg: &EventsConfig) -> Result<(), String> {
    let Some(k) = &cfg.kafka else {
        return Ok(());
    };
    // Creating and dropping a client before the fork is safe: its threads end with it.
    client_config(k)
        .create::<rdkafka::producer::BaseProducer>()
        .map_err(|e| format!("events.kafka: {e}"))?;
    std::fs::create_dir_all(&cfg.spool.dir)
        .map_err(|e| format!("events.spool.dir {}: {e}", cfg.spool.dir))?;
    Ok(())
}

/// The background service that owns the writer, the producer and the consumer.
pub struct EventsTask {
    pub gateway: Arc<Gateway>,
    pub events: Arc<Events>,
}

/// The librdkafka settings: ours, then Event Hubs', then the operator's (last word).
pub fn client_config(k: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.bootstrap_servers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        // Unconfirmed events stay in the spool, so librdkafka need not hold them long: a
        // short timeout makes a stuck producer visible (and replaced) sooner.
        .set("message.timeout.ms", "10000")
        .set("socket.keepalive.enable", "true");
    if let Some(cs) = &k.connection_string {
        // The bundled OpenSSL does not know Debian's CA store; librdkafka finds it.
        c.set("ssl.ca.location", "probe");
        c.set("security.protocol", "SASL_SSL")
            .set("sasl.mechanism", "PLAIN")
            .set("sasl.username", "$ConnectionString")
            .set("sasl.password", cs);
    }
    for (key, v) in &k.properties {
        c.set(key, v);
    }
    c
}

/// Takes the spool directory's lock (`flock` on `<dir>/lock`), waiting while another
/// process holds it. `None` on shutdown or when the directory cannot be used.
async fn lock_spool(dir: &str, shutdown: &mut ShutdownWatch) -> Option<std::fs::File> {
    if let Err(e) = std::fs::create_dir_all(dir) {
        error!("events: spool directory {dir}: {e}; events will be LOST");
        return None;
    }
    let path = std::path::Path::new(dir).join("lock");
    let mut said = false;
    loop {
        match try_lock(&path) {
            Ok(Some(f)) => return Some(f),
            Ok(None) => {}
            Err(e) => {
                error!("events: {}: {e}; events will be LOST", path.display());
                return None;
            }
        }
        if !said {
            info!("events: spool {dir} is in use by another process (an upgrade?); waiting");
            said = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = shutdown.changed() => return None,
        }
    }
}

/// `flock` on `path` without waiting: `None` while another process holds it.
pub(crate) fn try_lock(path: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    use std::os::unix::io::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on a descriptor this function owns; no memory is shared.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    Ok((rc == 0).then_some(file))
}

#[async_trait]
impl BackgroundService for EventsTask {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(rx) = self.events.rx.lock().expect("events lock").take() else {
            return;
        };
        let cfg = self.events.cfg.clone();
        let Some(k) = cfg.kafka.clone() else {
            let path = PathBuf::from(&cfg.file);
            info!(
                "events: no broker configured; events go to {}",
                path.display()
            );
            // Writes until the process ends (requests finishing during a graceful
            // shutdown still publish).
            std::thread::spawn(move || file_writer(path, rx, Arc::new(AtomicBool::new(false))));
            return;
        };
        // One process per spool: during an upgrade (`-u`) the new process waits here, its
        // events queueing in memory, until the old one has drained and exited.
        let _lock = match lock_spool(&cfg.spool.dir, &mut shutdown).await {
            Some(l) => l,
            None => return,
        };
        let (spool_cfg, group_commit) = match spool_config(&cfg) {
            Ok(c) => c,
            Err(e) => {
                error!("events: {e}; events will be LOST");
                return;
            }
        };
        let spool = match Spool::open(spool_cfg) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                error!(
                    "events: cannot open the spool {}: {e}; events will be LOST",
                    cfg.spool.dir
                );
                return;
            }
        };
        let r = spool.recovery();
        info!(
            "events: spool {} opened, {} event(s) to deliver (replayed {}); broker {}, topic {}",
            cfg.spool.dir,
            spool.depth(),
            r.replayed,
            k.bootstrap_servers,
            k.topic
        );
        SPOOL_DEPTH.set(spool.depth() as i64);
        let wake = Arc::new(tokio::sync::Notify::new());
        {
            // The writer is never told to stop: it spools until the process ends.
            let (spool, wake) = (spool.clone(), wake.clone());
            std::thread::spawn(move || spool_writer(spool, rx, wake, group_commit));
        }
        if k.invalidate_caches {
            let stop = Arc::new(AtomicBool::new(false));
            let (k, gw, s) = (k.clone(), self.gateway.clone(), stop.clone());
            std::thread::spawn(move || consume_loop(k, gw, s));
            let mut sd = shutdown.clone();
            tokio::spawn(async move {
                let _ = sd.changed().await;
                stop.store(true, Ordering::Relaxed);
            });
        }
        let lane = producer::Lane {
            name: "events",
            what: "event(s)",
            counter: &EVENTS,
            depth: &SPOOL_DEPTH,
            delivery: &DELIVERY_SECONDS,
            message: producer::event_message,
        };
        produce_loop(lane, k, spool, wake).await;
    }
}
