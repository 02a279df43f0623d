//! The audit trail: one AuditEvent per answered request (`event.rs`, IHE BALP shape), naming
//! the patients whose data the client was actually shown, written by its own thread to a
//! JSON-lines file, hash-chained per instance with signed checkpoints (`chain.rs`), checked by
//! `fhir-gateway audit verify` (`verify.rs`) and searched by `/manage/audit` (`who_saw`).
//!
//! Off the hot path: a request only moves its fields (and references to the body bytes it
//! sent) into a bounded queue; the writer parses, formats, hashes and writes in batches. A
//! full queue makes requests wait (backpressure), never drops a record.

pub mod chain;
pub mod event;
pub mod fhir;
mod follow;
pub mod glass;
pub mod sink;
pub mod topic;
pub mod verify;

#[cfg(test)]
mod tests;

use crate::config::{AuditConfig, AuditFhirSink, AuditSink, BuiltAudit};
use chain::Chain;
pub use event::{Record, Shown};
use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

/// Bytes as KiB permits, rounded up.
fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// How long the writer lets records gather after a batch.
const GATHER: Duration = Duration::from_millis(20);

enum Msg {
    /// With its share of `max_queue_bytes`, given back once written.
    Record(Box<Record>, Option<OwnedSemaphorePermit>),
    /// Wait until everything queued before is on disk.
    Flush(std::sync::mpsc::SyncSender<()>),
}

pub struct Audit {
    pub file: PathBuf,
    pub max_body_bytes: usize,
    pub patient_access_log: bool,
    instance: String,
    key: Vec<u8>,
    every: u64,
    secs: u64,
    queue: usize,
    /// `max_queue_bytes` in KiB permits: what queued records may hold of answers.
    held: Arc<Semaphore>,
    held_kib: u32,
    sink: Option<AuditSink>,
    /// `audit.fhir`, sent by its own background service (`fhir::FhirSinkTask`).
    pub fhir: Option<AuditFhirSink>,
    /// Started at the first record, after Pingora's daemon fork (threads do not survive it).
    tx: OnceLock<Option<mpsc::Sender<Msg>>>,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "fhir-gateway".into())
}

impl Audit {
    pub fn new(cfg: &AuditConfig, built: &BuiltAudit) -> Audit {
        let key = &built.key;
        Audit {
            file: PathBuf::from(&cfg.file),
            max_body_bytes: cfg.max_body_bytes,
            patient_access_log: cfg.patient_access_log,
            instance: cfg.instance.clone().unwrap_or_else(host_name),
            key: key.to_vec(),
            every: cfg.checkpoint_every,
            secs: cfg.checkpoint_secs,
            queue: cfg.queue,
            sink: built.sink.clone(),
            fhir: built.fhir.clone(),
            tx: OnceLock::new(),
            held: Arc::new(Semaphore::new(kib(cfg.max_queue_bytes) as usize)),
            held_kib: kib(cfg.max_queue_bytes),
        }
    }

    fn sender(&self) -> Option<&mpsc::Sender<Msg>> {
        self.tx
            .get_or_init(|| {
                let (tx, rx) = mpsc::channel(self.queue);
                let mut chain = match Chain::new(self.instance.clone(), &self.key) {
                    Ok(c) => c,
                    Err(e) => {
                        log::error!("audit: {e}; no audit records will be written");
                        return None;
                    }
                };
                if let Err(e) = chain.resume(&self.file) {
                    log::error!("audit: reading {}: {e}", self.file.display());
                }
                let sink = self
                    .sink
                    .clone()
                    .map(|s| sink::Feeder::new(s, self.instance.clone()));
                let w = Writer {
                    file: self.file.clone(),
                    instance: self.instance.clone(),
                    sink,
                    chain,
                    every: self.every,
                    secs: Duration::from_secs(self.secs),
                };
                std::thread::Builder::new()
                    .name("audit".into())
                    .spawn(move || w.run(rx))
                    .map_err(|e| log::error!("audit: writer thread: {e}"))
                    .ok()?;
                Some(tx)
            })
            .as_ref()
    }

    /// Queues a record; waits while the queue is full.
    pub async fn record(&self, r: Record) {
        match self.sender() {
            Some(tx) => {
                // Held answers are bounded in bytes too: a burst of large ones waits here.
                let need = kib(r.shown.weight()).min(self.held_kib);
                let permit = match need {
                    0 => None,
                    n => self.held.clone().acquire_many_owned(n).await.ok(),
                };
                if tx.send(Msg::Record(Box::new(r), permit)).await.is_err() {
                    log::error!("audit: the writer is gone; a record was not written");
                }
            }
            None => log::error!("audit: no writer; a record was not written"),
        }
    }

    /// Waits until every record queued so far is written (tests, `/manage/audit`).
    pub async fn flush(&self) {
        let Some(tx) = self.sender() else { return };
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if tx.send(Msg::Flush(done)).await.is_ok() {
            let _ = tokio::task::spawn_blocking(move || wait.recv_timeout(Duration::from_secs(10)))
                .await;
        }
    }
}

struct Writer {
    file: PathBuf,
    instance: String,
    /// `audit.kafka`: fed from the file after each batch.
    sink: Option<sink::Feeder>,
    chain: Chain,
    every: u64,
    secs: Duration,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => return log::error!("audit: writer runtime: {e}"),
        };
        let mut out = Vec::with_capacity(64 * 1024);
        let mut last_checkpoint = Instant::now();
        self.chain.checkpoint("start", &now(), &mut out);
        self.write(&mut out);
        // A sink that is behind (a full or locked spool) is retried at least this often.
        let tick = match self.sink {
            Some(_) => self.secs.min(Duration::from_secs(1)),
            None => self.secs,
        };
        rt.block_on(async {
            loop {
                let first = tokio::select! {
                    m = rx.recv() => match m { Some(m) => Some(m), None => break },
                    _ = tokio::time::sleep(tick) => None,
                };
                let mut flushes = Vec::new();
                let mut written = 0;
                let mut next = first;
                while let Some(m) = next {
                    match m {
                        Msg::Record(r, permit) => {
                            let instance = &self.instance;
                            self.chain
                                .record_raw(|o| r.write_event(instance, o), &mut out);
                            drop(r);
                            drop(permit);
                            written += 1;
                            if self.chain.unsigned >= self.every {
                                self.chain.checkpoint("count", &now(), &mut out);
                                last_checkpoint = Instant::now();
                            }
                        }
                        Msg::Flush(done) => flushes.push(done),
                    }
                    next = rx.try_recv().ok();
                }
                if self.chain.unsigned > 0 && last_checkpoint.elapsed() >= self.secs {
                    self.chain.checkpoint("time", &now(), &mut out);
                    last_checkpoint = Instant::now();
                }
                self.write(&mut out);
                crate::metrics::audit_written(written);
                flushes.into_iter().for_each(|d| {
                    let _ = d.send(());
                });
                tokio::time::sleep(GATHER).await;
            }
        });
    }

    /// Appends and syncs: a record the gateway answered for is on disk within a batch.
    fn write(&mut self, out: &mut Vec<u8>) {
        if !out.is_empty() {
            self.append(out);
        }
        // Also after a failed append or an empty batch: the sink may be behind.
        if let Some(s) = self.sink.as_mut() {
            s.feed(&self.file);
        }
    }

    fn append(&self, out: &mut Vec<u8>) {
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)
            .and_then(|mut f| {
                f.write_all(out)?;
                f.sync_data()
            });
        match r {
            Ok(()) => out.clear(),
            // Kept for the next batch, never dropped; the metric and the log say why.
            Err(e) => {
                crate::metrics::audit_write_failed();
                log::error!("audit: writing {}: {e}", self.file.display());
            }
        }
    }
}

fn now() -> String {
    format!("{:.3}", jiff::Timestamp::now())
}

/// The AuditEvents of `file` naming `patient` (`Patient/<id>`), recorded at or after `since`
/// (an RFC 3339 UTC instant; compared as text, as they are written), oldest first.
pub fn who_saw(
    file: &Path,
    patient: &str,
    since: Option<&str>,
    limit: usize,
) -> std::io::Result<Vec<Value>> {
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut found = Vec::new();
    for line in std::io::BufReader::new(f).split(b'\n') {
        let line = line?;
        // Cheap test first: most lines do not name this patient.
        if memchr::memmem::find(&line, patient.as_bytes()).is_none() {
            continue;
        }
        let Ok(mut rec) = serde_json::from_slice::<Value>(&line) else {
            continue;
        };
        let Some(ev) = rec.get_mut("event").map(Value::take) else {
            continue;
        };
        if !event::named_patients(&ev).any(|p| p == patient) {
            continue;
        }
        let recorded = ev.get("recorded").and_then(Value::as_str).unwrap_or("");
        if since.is_some_and(|s| recorded < s) {
            continue;
        }
        found.push(ev);
        if found.len() >= limit {
            break;
        }
    }
    Ok(found)
}
