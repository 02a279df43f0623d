//! The durable event spool: an append-only log of records in a directory, between the bounded
//! in-memory queue and the Kafka producer. Events accumulate here while the broker is away and
//! drain in order when it is back; a restart replays what was not delivered. Delivery is at
//! least once: a record is gone only after `ack`.
//!
//! # On disk
//!
//! - **Segments** `<first seq, 20 digits>.seg`: records back to back. A new segment starts when
//!   the current one would grow past `segment_bytes` (a record larger than that gets a segment of
//!   its own).
//! - **Record frame** (little-endian): `u32 len | u32 crc32 | u64 seq | u32 key_len | key | payload`;
//!   `len` counts the bytes after the crc, the CRC-32 (IEEE) covers them. The sequence number in
//!   the frame must match its place (segment name + index), so a misplaced record is caught too.
//!   A frame's body is at most [`MAX_RECORD_BYTES`].
//! - **Cursor** `ack`: the first sequence number not yet delivered (`u64` + its crc32), replaced
//!   atomically (`ack.tmp`, fsync, rename, fsync of the directory).
//!
//! Sequence numbers start at 1 and are contiguous. One process per directory: `Spool` itself
//! takes no lock; the gateway's events task holds `flock` on `<dir>/lock` before opening it
//! (`lock_spool` in `events/mod.rs`), so a second process waits. Give each gateway instance its
//! own directory.
//!
//! # Opening (replay)
//!
//! Segments are scanned in order and every frame verified. Pending = every record at or after
//! the cursor. Segments entirely before the cursor are deleted. Then:
//! - **Torn tail** — the last segment ends in an incomplete frame, or in one that fails its check
//!   and reaches the end of the file, or in zeros (a crash mid-write, a file extended without its
//!   data after a power loss): cut off (`set_len`) with a warning; `Recovery::torn_bytes`.
//! - **Corruption anywhere else** (a bad frame followed by more data, a gap or overlap between
//!   segments, a torn non-last segment): replay **stops at that point**, with an error logged.
//!   The records before it are pending; the damaged segment is copied to `<name>.corrupt` and cut
//!   at the bad frame, later segments are renamed `<name>.corrupt`. Nothing is deleted — the files
//!   stay for an operator — but nothing after the damage is replayed: its frames can no longer be
//!   trusted to be what was written, and sequence numbers stay contiguous. `Recovery::corrupt` /
//!   `quarantined` say so (for a metric).
//! - An unreadable cursor replays every record on disk (`Recovery::cursor_reset`, a warning):
//!   duplicates rather than losses.
//!
//! # Fsync
//!
//! - `Always`: `fdatasync` after every append, before `append` returns (power-loss durable), and
//!   of the directory when a segment is created; the cursor is fsynced.
//! - `EveryMs(n)`: a background thread (`spool-fsync`) syncs the current segment at most every
//!   `n` ms when something was written; a segment is synced when it is closed; `Drop` syncs. A
//!   power loss may lose the last `n` ms; a process crash loses nothing (the data is in the page
//!   cache). The cursor too is written (durably) by that thread, at most every `n` ms, and on
//!   `Drop`: a crash may send up to `n` ms of delivered events again (duplicates, never a gap).
//! - `Never`: the OS decides (no fsync at all, cursor included).
//!
//! # Limits
//!
//! `max_bytes` bounds the bytes of the segment files (acknowledged records of a partly delivered
//! segment count until the whole segment is delivered; keep `segment_bytes` well below
//! `max_bytes`). An append that would pass it is refused with [`SpoolError::Full`] — the caller
//! decides (count, log, keep it in memory, refuse); the spool never drops silently. A record that
//! could never fit is [`SpoolError::TooLarge`].
//!
//! Memory: 8 bytes per record on disk (the offsets index).
//!
//! # Source files
//!
//! `frame.rs` (CRC-32, the record frame), `segment.rs` (segment files: names, scan, quarantine),
//! `cursor.rs` (the `ack` file), `open.rs` (opening and replay), `writer.rs` (append, rollover),
//! `reader.rs` (read and acknowledge), `tests.rs`.

mod cursor;
mod frame;
mod open;
mod reader;
mod segment;
#[cfg(test)]
mod tests;
mod writer;

pub use frame::crc32;

use segment::Segment;
use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// The largest frame body (seq, key length, key, payload) accepted or replayed.
pub const MAX_RECORD_BYTES: u32 = 64 * 1024 * 1024;

/// `u32 len` + `u32 crc`.
const HEADER: u64 = 8;
/// `u64 seq` + `u32 key_len`.
const FIXED: u64 = 12;
const CURSOR: &str = "ack";
const CURSOR_TMP: &str = "ack.tmp";
const SEGMENT_EXT: &str = "seg";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// After every append.
    Always,
    /// At most every so many milliseconds, by a background thread.
    EveryMs(u64),
    /// Never: the OS decides.
    Never,
}

#[derive(Clone, Debug)]
pub struct SpoolConfig {
    /// Created if missing.
    pub dir: PathBuf,
    pub fsync: Fsync,
    /// Bound on the segment files' total size.
    pub max_bytes: u64,
    /// A segment is closed when the next record would take it past this.
    pub segment_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The Kafka key.
    pub key: String,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
pub enum SpoolError {
    /// Appending would take the spool past `max_bytes`; nothing was written.
    Full { bytes: u64, max_bytes: u64 },
    /// The record can never fit (`max_bytes`, or [`MAX_RECORD_BYTES`]); nothing was written.
    TooLarge { len: u64, max: u64 },
    /// The disk failed. After a failed fsync (or a failed write that could not be undone) the
    /// spool refuses further appends until it is reopened; the record may or may not be on disk
    /// (at least once: expect it twice rather than never).
    Io(io::Error),
}

impl fmt::Display for SpoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpoolError::Full { bytes, max_bytes } => {
                write!(f, "event spool full ({bytes} of {max_bytes} bytes)")
            }
            SpoolError::TooLarge { len, max } => {
                write!(
                    f,
                    "event of {len} bytes can never fit the spool (max {max})"
                )
            }
            SpoolError::Io(e) => write!(f, "event spool: {e}"),
        }
    }
}

impl std::error::Error for SpoolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpoolError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for SpoolError {
    fn from(e: io::Error) -> Self {
        SpoolError::Io(e)
    }
}

/// What `open` found and repaired.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Pending records found (the depth after opening).
    pub replayed: u64,
    /// Bytes of a torn last record cut off.
    pub torn_bytes: u64,
    /// Where replay stopped on corruption, and why.
    pub corrupt: Option<String>,
    /// Files set aside as `*.corrupt`.
    pub quarantined: Vec<PathBuf>,
    /// The cursor could not be read: every record on disk is pending again.
    pub cursor_reset: bool,
}

struct Inner {
    /// Oldest first; the last one is the one appended to when `active` is set.
    segments: VecDeque<Segment>,
    active: Option<File>,
    next_seq: u64,
    first_pending: u64,
    bytes: u64,
    /// Written since the last fsync.
    dirty: bool,
    /// Set when the files no longer match the index (appends refused until reopened).
    broken: Option<String>,
    /// `Fsync::EveryMs`: an acknowledged position the flusher has yet to write (a crash before
    /// it only replays delivered events: at least once, never a gap).
    cursor_due: Option<u64>,
}

struct Shared {
    cfg: SpoolConfig,
    inner: Mutex<Inner>,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Syncs the current segment if something was written since the last sync (not under the
    /// lock: appends go on meanwhile). A failure makes the spool refuse appends until reopened
    /// (after a failed fsync the kernel may have dropped the data: say so, loudly).
    fn sync_dirty(&self) -> io::Result<()> {
        let f = {
            let mut g = self.lock();
            if !g.dirty {
                return Ok(());
            }
            let Some(f) = g.active.as_ref() else {
                g.dirty = false;
                return Ok(());
            };
            let f = f.try_clone()?;
            g.dirty = false;
            f
        };
        f.sync_data().inspect_err(|e| {
            let mut g = self.lock();
            g.dirty = true;
            g.broken = Some(format!("fsync failed ({e})"));
        })
    }

    /// Writes (durably) the cursor `ack` left to the flusher, if any.
    fn write_due_cursor(&self) -> io::Result<()> {
        let Some(first_pending) = self.lock().cursor_due.take() else {
            return Ok(());
        };
        cursor::write_cursor(&self.cfg.dir, first_pending, true).inspect_err(|_| {
            // Tried again next round, unless a later ack already stands in for it.
            self.lock().cursor_due.get_or_insert(first_pending);
        })
    }
}

/// The durable spool. `Send + Sync`: share it in an `Arc`; every method takes `&self`.
pub struct Spool {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
    recovery: Recovery,
}

impl Spool {
    /// What opening found and repaired.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    pub fn config(&self) -> &SpoolConfig {
        &self.shared.cfg
    }
    /// The first sequence number not yet acknowledged (= the next one to be appended when
    /// nothing is pending).
    pub fn first_pending(&self) -> u64 {
        self.shared.lock().first_pending
    }

    /// The sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.shared.lock().next_seq
    }
    /// Records appended and not yet acknowledged.
    pub fn depth(&self) -> u64 {
        let g = self.shared.lock();
        g.next_seq - g.first_pending
    }

    /// Bytes of the segment files (what `max_bytes` bounds).
    pub fn bytes(&self) -> u64 {
        self.shared.lock().bytes
    }

    /// Syncs what was written (for shutdown with `EveryMs`; a no-op when nothing is unsynced).
    pub fn sync(&self) -> io::Result<()> {
        self.shared.sync_dirty()
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Some(h) = self.flusher.take() {
            *self.shared.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
            self.shared.wake.notify_all();
            let _ = h.join();
        }
        if let Err(e) = self.shared.write_due_cursor() {
            log::error!(
                "event spool {}: final cursor write failed: {e}",
                self.shared.cfg.dir.display()
            );
        }
        if self.shared.cfg.fsync != Fsync::Never {
            if let Err(e) = self.shared.sync_dirty() {
                log::error!(
                    "event spool {}: final fsync failed: {e}",
                    self.shared.cfg.dir.display()
                );
            }
        }
    }
}
