//! The writer thread: queue → spool (in batches, then the producer is woken), or queue → a
//! JSON-lines file when no broker is configured.

use super::payload::encode;
use super::queue::Queued;
use super::spool::{self, Record, Spool, SpoolConfig, SpoolError};
use super::{count, EVENTS, SPOOL_DEPTH};
use crate::config::EventsConfig;
use log::error;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

/// The spool settings, and whether the writer commits in groups: `fsync: always` means "durable
/// before the writer takes the next events", one fsync per batch drained from the queue rather
/// than per event (the request path never waits for it either way).
pub(super) fn spool_config(cfg: &EventsConfig) -> Result<(SpoolConfig, bool), String> {
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
/// Queue → JSON lines (no broker configured).
pub(super) fn file_writer(path: PathBuf, rx: Receiver<Queued>, stop: Arc<AtomicBool>) {
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
                if let Err(e) = f
                    .write_all(&q.json)
                    .and_then(|_| f.write_all(b"\n"))
                    .and_then(|_| f.flush())
                {
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
pub(super) fn spool_writer(
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
        // One write for the batch: a syscall per event was the spool's largest cost.
        let records: Vec<Record> = std::iter::once(first)
            .chain(rx.try_iter().take(4095))
            .map(|q| Record {
                payload: encode(&q),
                key: q.key,
            })
            .collect();
        let mut appended = 0;
        for (r, q) in spool.append_all(&records).into_iter().zip(&records) {
            match r {
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
