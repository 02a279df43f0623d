//! `audit.kafka`: every line of the audit file, byte for byte and in order, to a Kafka topic.
//!
//! The file stays the source of truth. The writer thread, after each batch it wrote and
//! synced, hands the lines the sink has not taken yet to a durable spool (the events' one, in
//! a directory of its own) and remembers how far into the file it got (`fed`, a byte offset
//! replaced atomically after the spool is synced). The events' producer loop drains the spool
//! to the topic, acknowledging only what the broker confirmed. So a broker outage grows the
//! spool, a full spool leaves the lines waiting in the file (never dropped: they are taken
//! when there is room), and a restart continues from `fed`. A crash between the spool's sync
//! and `fed` sends those lines again, byte-identical; so does a re-sent suffix after a failed
//! delivery. `audit verify --topic` accepts such byte-identical re-sends and counts them.

use super::follow::{read_position, write_position, Follow};
use crate::config::AuditSink;
use crate::events::payload::encode_raw;
use crate::events::producer::{produce_loop, Lane, Message};
use crate::events::spool::{Fsync, Record, Spool, SpoolConfig, SpoolError};
use log::{error, info};
use once_cell::sync::Lazy;
use prometheus::{
    register_histogram, register_int_counter_vec, register_int_gauge, Histogram, IntCounterVec,
    IntGauge,
};
use rdkafka::message::OwnedHeaders;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

static SINK: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "fhirgw_audit_sink_total",
        "Audit lines on their way to audit.kafka by stage: spooled, delivered (confirmed by the broker; a re-sent line counts again), failed (a delivery attempt), producer_reset, spool_full (a batch left waiting in the file: the spool is full), too_large (a line that can never fit the spool: not sent)",
        &["stage"]
    )
    .expect("metric registers once")
});

static BACKLOG: Lazy<IntGauge> = Lazy::new(|| {
    register_int_gauge!(
        "fhirgw_audit_sink_backlog",
        "Audit lines in the sink's spool not yet confirmed by the broker"
    )
    .expect("metric registers once")
});

static UNSPOOLED: Lazy<IntGauge> = Lazy::new(|| {
    register_int_gauge!(
        "fhirgw_audit_sink_unspooled_bytes",
        "Bytes of the audit file not yet taken by the sink's spool (a full or locked spool)"
    )
    .expect("metric registers once")
});

static DELIVERY: Lazy<Histogram> = Lazy::new(|| {
    register_histogram!(
        "fhirgw_audit_sink_delivery_seconds",
        "Time from an audit line entering the sink's spool to the broker confirming it",
        vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 600.0]
    )
    .expect("metric registers once")
});

const FED: &str = "audit.fed";
/// Read from the file at most this much per spool round (more when one line is longer).
const CHUNK: usize = 4 << 20;
/// At most this much per `feed`: catching up a long file must not hold the writer (and, through
/// its queue, the requests) for long; the 1 s tick takes the rest.
const BUDGET: u64 = 16 << 20;

/// An audit line as a message: the line itself, no headers (the key is the instance).
fn line_message(payload: &[u8]) -> Message<'_> {
    // As `encode_raw` wrote it: the time, an empty correlation id, the line.
    let t = payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_be_bytes);
    (
        t,
        payload.get(10..).unwrap_or_default(),
        OwnedHeaders::new(),
    )
}

/// What can be checked before the daemon forks: librdkafka takes the properties and the spool
/// directory can be made.
pub fn check(sink: &AuditSink) -> Result<(), String> {
    crate::events::client_config(&sink.kafka)
        .create::<rdkafka::producer::BaseProducer>()
        .map_err(|e| format!("audit.kafka: {e}"))?;
    std::fs::create_dir_all(&sink.spool_dir)
        .map_err(|e| format!("audit.kafka.spool.dir {}: {e}", sink.spool_dir))
}

struct Open {
    spool: Arc<Spool>,
    /// Held for the process's life: one process per spool.
    _lock: File,
    /// How far into the trail the spool took it (`audit.fed`).
    follow: Follow,
    wake: Arc<tokio::sync::Notify>,
}

/// The writer thread's side of the sink: file → spool.
pub(super) struct Feeder {
    cfg: AuditSink,
    instance: String,
    open: Option<Open>,
    /// Said once per state, not per round (a stuck spool is retried every second).
    said_locked: bool,
    /// The spool refused (full, or a disk error) since the last line it took.
    said_full: bool,
}

impl Feeder {
    pub(super) fn new(cfg: AuditSink, instance: String) -> Feeder {
        Feeder {
            cfg,
            instance,
            open: None,
            said_locked: false,
            said_full: false,
        }
    }

    /// Takes the spool (unless another process holds it: an upgrade), and starts the producer.
    fn try_open(&mut self, file: &Path) -> Option<()> {
        let dir = PathBuf::from(&self.cfg.spool_dir);
        let lock = match std::fs::create_dir_all(&dir)
            .and_then(|_| crate::events::try_lock(&dir.join("lock")))
        {
            Ok(Some(l)) => l,
            Ok(None) => {
                if !self.said_locked {
                    info!("audit: sink spool {} is in use by another process (an upgrade?); lines wait in the file", dir.display());
                    self.said_locked = true;
                }
                return None;
            }
            Err(e) => {
                if !self.said_locked {
                    error!(
                        "audit: sink spool {}: {e}; lines wait in the file",
                        dir.display()
                    );
                    self.said_locked = true;
                }
                return None;
            }
        };
        let spool = match Spool::open(SpoolConfig {
            dir: dir.clone(),
            // Synced by the feeder before `fed` moves; the timer only covers the rest.
            fsync: Fsync::EveryMs(1000),
            max_bytes: self.cfg.max_bytes,
            segment_bytes: self.cfg.segment_bytes,
        }) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                error!(
                    "audit: cannot open the sink spool {}: {e}; lines wait in the file",
                    dir.display()
                );
                return None;
            }
        };
        let fed = read_position(&dir.join(FED));
        info!(
            "audit: sink spool {} opened, {} line(s) to deliver, file taken up to byte {}; broker {}, topic {}",
            dir.display(),
            spool.depth(),
            fed.offset,
            self.cfg.kafka.bootstrap_servers,
            self.cfg.kafka.topic
        );
        BACKLOG.set(spool.depth() as i64);
        let wake = Arc::new(tokio::sync::Notify::new());
        let (k, s, w) = (self.cfg.kafka.clone(), spool.clone(), wake.clone());
        std::thread::Builder::new()
            .name("audit-sink".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return error!("audit: sink runtime: {e}"),
                };
                let lane = Lane {
                    name: "audit sink",
                    what: "line(s)",
                    counter: &SINK,
                    depth: &BACKLOG,
                    delivery: &DELIVERY,
                    message: line_message,
                };
                // Until the process ends: what is not confirmed stays in the spool.
                rt.block_on(produce_loop(lane, k, s, w));
            })
            .map_err(|e| error!("audit: sink thread: {e}"))
            .ok()?;
        self.open = Some(Open {
            spool,
            _lock: lock,
            // The writer and the feeder take turns on one thread: no batch can be in flight
            // to a file moved aside.
            follow: Follow::new(file, "sink", fed, false),
            wake,
        });
        Some(())
    }

    /// Moves the lines of `file` after `fed` into the spool, as many as fit.
    pub(super) fn feed(&mut self, file: &Path) {
        if self.open.is_none() && self.try_open(file).is_none() {
            return;
        }
        let Some(o) = self.open.as_mut() else { return };
        let Some(len) = o.follow.look() else {
            return;
        };
        let mut buf = Vec::new();
        let mut appended = 0u64;
        let mut stop = false;
        let start = o.follow.pos;
        while !stop && o.follow.pos.offset < len && o.follow.pos.offset - start.offset < BUDGET {
            let end = match o.follow.read(len, CHUNK, &mut buf) {
                Ok(Some(end)) => end,
                Ok(None) => break,
                Err(e) => {
                    error!("audit: sink reading {}: {e}", file.display());
                    break;
                }
            };
            for line in buf[..end].split(|&b| b == b'\n') {
                if line.is_empty() {
                    o.follow.pos.offset += 1;
                    continue;
                }
                let rec = Record {
                    key: self.instance.clone(),
                    payload: encode_raw(line),
                };
                match o.spool.append(&rec) {
                    Ok(_) => appended += 1,
                    Err(SpoolError::TooLarge { len, max }) => {
                        SINK.with_label_values(&["too_large"]).inc();
                        error!("audit: a line of {len} bytes can never fit the sink spool (max {max}); NOT sent to the topic (it stays in the file)");
                    }
                    Err(SpoolError::Full { bytes, max_bytes }) => {
                        SINK.with_label_values(&["spool_full"]).inc();
                        if !self.said_full {
                            error!("audit: the sink spool is full ({bytes} of {max_bytes} bytes; is the broker down?); lines wait in the file");
                            self.said_full = true;
                        }
                        stop = true;
                        break;
                    }
                    Err(e) => {
                        if !self.said_full {
                            error!("audit: sink spool: {e}; lines wait in the file");
                            self.said_full = true;
                        }
                        stop = true;
                        break;
                    }
                }
                o.follow.pos.offset += line.len() as u64 + 1;
            }
        }
        if appended > 0 {
            self.said_full = false;
            // The lines are on disk before `fed` says so: a crash re-sends, never skips.
            match o.spool.sync() {
                Ok(()) => {
                    if let Err(e) = write_position(&o.spool.config().dir.join(FED), o.follow.pos) {
                        error!("audit: sink {FED}: {e} (lines may be sent again)");
                    }
                }
                Err(e) => error!("audit: sink spool fsync: {e}"),
            }
            SINK.with_label_values(&["spooled"]).inc_by(appended);
            BACKLOG.set(o.spool.depth() as i64);
            o.wake.notify_one();
        } else if o.follow.pos != start {
            let _ = write_position(&o.spool.config().dir.join(FED), o.follow.pos);
        }
        UNSPOOLED.set(len.saturating_sub(o.follow.pos.offset) as i64);
    }
}
