//! Events of successful writes, on their way out — never on the request path:
//!
//! PublishFHIREvent → [`Events::publish`] (a bounded in-memory queue, `try_send`) → the spool
//! writer thread (appends to the durable [`spool`]) → the producer loop (rdkafka, idempotent,
//! in order; acknowledges the spool only after the broker confirmed). A broker outage only
//! grows the spool; a restart replays it. Without a broker, events go to a JSON-lines file.
//!
//! Each instance also consumes the topic (partitions assigned, from the end) and drops its
//! consent/link caches when another instance saw a write (cross-instance invalidation).
//!
//! Everything that talks to the broker is created in [`EventsTask`], a Pingora background
//! service, so it exists after the daemon fork.

pub mod spool;

use crate::config::{EventsConfig, KafkaConfig};
use crate::gateway::Gateway;
use async_trait::async_trait;
use fhir_gateway_modules::processor::EventSink;
use log::{error, info, warn};
use once_cell::sync::Lazy;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus::{
    register_histogram, register_int_counter_vec, register_int_gauge, Histogram, IntCounterVec,
    IntGauge,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use serde_json::Value;
use spool::{Record, Spool, SpoolConfig, SpoolError};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// One event between the module and the spool.
struct Queued {
    key: String,
    event: Value,
}

/// The sink lent to modules: a bounded queue in front of the background writer.
pub struct Events {
    cfg: EventsConfig,
    tx: SyncSender<Queued>,
    rx: Mutex<Option<Receiver<Queued>>>,
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

/// The spool settings, and whether the writer commits in groups: `fsync: always` means "durable
/// before the writer takes the next events", one fsync per batch drained from the queue rather
/// than per event (the request path never waits for it either way).
fn spool_config(cfg: &EventsConfig) -> Result<(SpoolConfig, bool), String> {
    let fsync = cfg.spool.fsync()?;
    let group = fsync == spool::Fsync::Always;
    Ok((
        SpoolConfig {
            dir: PathBuf::from(&cfg.spool.dir),
            // Closed segments are still synced when they roll over.
            fsync: if group {
                spool::Fsync::EveryMs(1000)
            } else {
                fsync
            },
            max_bytes: cfg.spool.max_bytes,
            segment_bytes: cfg.spool.segment_bytes,
        },
        group,
    ))
}

/// The spool payload: the enqueue time (for the delivery latency), the correlation id (a Kafka
/// header, without parsing the event again), then the event.
fn encode(q: &Queued) -> Vec<u8> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let cid = q
        .event
        .get("correlationid")
        .or_else(|| q.event.pointer("/data/correlationid"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let cid = &cid.as_bytes()[..cid.len().min(u16::MAX as usize)];
    let mut out = now.to_be_bytes().to_vec();
    out.extend((cid.len() as u16).to_be_bytes());
    out.extend(cid);
    out.extend(serde_json::to_vec(&q.event).expect("JSON serialises"));
    out
}

/// (enqueue time, correlation id, event JSON).
fn decode(payload: &[u8]) -> (u64, &[u8], &[u8]) {
    if payload.len() < 10 {
        return (0, b"", payload);
    }
    let t = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
    let n = u16::from_be_bytes(payload[8..10].try_into().expect("2 bytes")) as usize;
    match payload.get(10 + n) {
        Some(b'{') => (t, &payload[10..10 + n], &payload[10 + n..]),
        // An entry spooled before the correlation id was stored: time, then the event.
        _ => (t, b"", &payload[8..]),
    }
}

fn since_ms(t: u64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    now.saturating_sub(t) as f64 / 1000.0
}

/// Queue → JSON lines (no broker configured).
fn file_writer(path: PathBuf, rx: Receiver<Queued>, stop: Arc<AtomicBool>) {
    // Opened at the first event: a gateway that never publishes leaves no file behind.
    let mut file: Option<std::io::BufWriter<std::fs::File>> = None;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(q) => {
                if file.is_none() {
                    match std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                    {
                        Ok(f) => file = Some(std::io::BufWriter::new(f)),
                        Err(e) => {
                            count("dropped_file");
                            error!("event LOST: events file {}: {e}", path.display());
                            continue;
                        }
                    }
                }
                let f = file.as_mut().expect("opened above");
                let line = serde_json::to_string(&q.event).expect("JSON serialises");
                if let Err(e) = writeln!(f, "{line}").and_then(|_| f.flush()) {
                    count("dropped_file");
                    error!("event LOST: events file {}: {e}", path.display());
                    continue;
                }
                count("written_file");
            }
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::Relaxed) => return,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Queue → spool, in batches: everything waiting is appended, then (group commit) synced once,
/// then the producer is woken.
fn spool_writer(
    spool: Arc<Spool>,
    rx: Receiver<Queued>,
    wake: Arc<tokio::sync::Notify>,
    group_commit: bool,
) {
    loop {
        let first = match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(q) => q,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // Linger a moment so a busy gateway spools (and wakes the producer) once per batch,
        // not once per event: the wake-ups, not the work, were the cost under load.
        std::thread::sleep(Duration::from_millis(2));
        let mut appended = 0;
        for q in std::iter::once(first).chain(rx.try_iter().take(4095)) {
            match spool.append(&Record {
                key: q.key.clone(),
                payload: encode(&q),
            }) {
                Ok(_) => appended += 1,
                Err(SpoolError::Full { bytes, max_bytes }) => {
                    count("dropped_spool_full");
                    error!(
                        "event LOST: the spool is full ({bytes} of {max_bytes} bytes; is the broker down?): key={}",
                        q.key
                    );
                }
                Err(e) => {
                    count("dropped_spool_error");
                    error!("event LOST: spool: {e}: key={}", q.key);
                }
            }
        }
        if group_commit && appended > 0 {
            if let Err(e) = spool.sync() {
                error!("events: spool fsync failed: {e}");
            }
        }
        if appended > 0 {
            EVENTS.with_label_values(&["spooled"]).inc_by(appended);
            SPOOL_DEPTH.set(spool.depth() as i64);
            wake.notify_one();
        }
    }
}

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
async fn produce_loop(k: KafkaConfig, spool: Arc<Spool>, wake: Arc<tokio::sync::Notify>) {
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

/// The resource type an event (plain or CloudEvents) is about.
fn event_type(v: &Value) -> Option<&str> {
    v.get("resourcetype")
        .or_else(|| v.pointer("/data/resourcetype"))
        .and_then(Value::as_str)
}

/// Topic → cache invalidation, on a thread of its own (librdkafka polls block).
fn consume_loop(k: KafkaConfig, gw: Arc<Gateway>, stop: Arc<AtomicBool>) {
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
    let mut first = true;
    while !stop.load(Ordering::Relaxed) {
        let Some(consumer) = assigned_consumer(&cfg, &k, &stop, &mut warn_limited) else {
            return;
        };
        if !first {
            // Changes published while we were away were not seen: forget everything cached.
            for t in crate::gateway::CACHED_TYPES {
                gw.invalidate(t);
            }
        }
        first = false;
        while !stop.load(Ordering::Relaxed) {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    let Some(payload) = m.payload() else { continue };
                    if let Ok(v) = serde_json::from_slice::<Value>(payload) {
                        if let Some(t) = event_type(&v) {
                            gw.invalidate(t);
                            count("invalidations");
                        }
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

/// Takes the spool directory's lock (`flock` on `<dir>/lock`), waiting while another
/// process holds it. `None` on shutdown or when the directory cannot be used.
async fn lock_spool(dir: &str, shutdown: &mut ShutdownWatch) -> Option<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    if let Err(e) = std::fs::create_dir_all(dir) {
        error!("events: spool directory {dir}: {e}; events will be LOST");
        return None;
    }
    let path = std::path::Path::new(dir).join("lock");
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            error!("events: {}: {e}; events will be LOST", path.display());
            return None;
        }
    };
    let mut said = false;
    loop {
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Some(file);
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
        produce_loop(k, spool, wake).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kafka(cs: Option<&str>, props: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: "ns.servicebus.windows.net:9093".into(),
            topic: "fhir-events".into(),
            connection_string: cs.map(str::to_string),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            invalidate_caches: true,
        }
    }

    #[test]
    fn event_hubs_settings_and_pass_through() {
        let c = client_config(&kafka(Some("Endpoint=sb://ns/;SharedAccessKey=x"), &[]));
        assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(c.get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(c.get("sasl.username"), Some("$ConnectionString"));
        assert_eq!(
            c.get("sasl.password"),
            Some("Endpoint=sb://ns/;SharedAccessKey=x")
        );
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("acks"), Some("all"));
        let c = client_config(&kafka(None, &[("linger.ms", "20"), ("client.id", "gw-1")]));
        assert_eq!(
            c.get("security.protocol"),
            None,
            "plaintext without a connection string"
        );
        assert_eq!(
            c.get("linger.ms"),
            Some("20"),
            "the operator has the last word"
        );
        assert_eq!(c.get("client.id"), Some("gw-1"));
    }

    #[test]
    fn spool_payload_round_trip_and_event_types() {
        let q = Queued {
            key: "Patient/1".into(),
            event: json!({"action": "Created", "resourcetype": "Consent"}),
        };
        let enc = encode(&q);
        let (t, cid, body) = decode(&enc);
        assert_eq!(cid, b"");
        assert!(t > 1_700_000_000_000, "enqueue time in ms");
        assert_eq!(serde_json::from_slice::<Value>(body).unwrap(), q.event);
        let q2 = Queued {
            key: "k".into(),
            event: json!({"correlationid": "c-1", "id": "x"}),
        };
        let enc = encode(&q2);
        let (_, cid, body) = decode(&enc);
        assert_eq!(cid, b"c-1");
        assert_eq!(serde_json::from_slice::<Value>(body).unwrap(), q2.event);
        // The earlier layout (time, event) still reads.
        let mut old = 7u64.to_be_bytes().to_vec();
        old.extend(br#"{"id":"y"}"#);
        assert_eq!(decode(&old), (7, &b""[..], &br#"{"id":"y"}"#[..]));
        assert_eq!(event_type(&q.event), Some("Consent"));
        let ce = json!({"specversion": "1.0", "data": {"resourcetype": "CareTeam"}});
        assert_eq!(event_type(&ce), Some("CareTeam"));
        assert_eq!(event_type(&json!({})), None);
    }

    #[tokio::test]
    async fn a_full_queue_holds_the_write_then_drops_with_a_count() {
        let cfg = EventsConfig {
            queue_capacity: 2,
            queue_full_wait_ms: 50,
            ..Default::default()
        };
        let ev = Arc::new(Events::new(&cfg));
        let rx = ev.rx.lock().unwrap().take().unwrap();
        let dropped = || EVENTS.with_label_values(&["dropped_queue_full"]).get();
        let before = dropped();
        // A writer that frees room within the wait: nothing is lost.
        ev.publish("k", json!({"n": 0})).await;
        ev.publish("k", json!({"n": 1})).await;
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let first = rx.recv().unwrap();
            (first, rx)
        });
        ev.publish("k", json!({"n": 2})).await;
        let (first, rx) = reader.join().unwrap();
        assert_eq!(first.event["n"], 0);
        assert_eq!(dropped(), before);
        // No room for longer than the wait: dropped, counted.
        ev.publish("k", json!({"n": 3})).await;
        assert_eq!(dropped() - before, 1);
        let left: Vec<_> = rx
            .try_iter()
            .map(|q| q.event["n"].as_i64().unwrap())
            .collect();
        assert_eq!(left, vec![1, 2]);
    }
}
