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
//! Sequence numbers start at 1 and are contiguous. One process per directory (there is no lock
//! file: give each gateway instance its own directory).
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
//!   cache).
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

use std::collections::VecDeque;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

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

// ---------------------------------------------------------------------------------------------
// CRC-32 (IEEE 802.3, reflected, polynomial 0xEDB88320), table-driven.

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

pub fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

// ---------------------------------------------------------------------------------------------
// Frames.

fn frame_len(r: &Record) -> u64 {
    HEADER + FIXED + r.key.len() as u64 + r.payload.len() as u64
}

fn encode(seq: u64, r: &Record) -> Vec<u8> {
    let body = FIXED as usize + r.key.len() + r.payload.len();
    let mut v = Vec::with_capacity(HEADER as usize + body);
    v.extend_from_slice(&(body as u32).to_le_bytes());
    v.extend_from_slice(&[0; 4]);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
    v.extend_from_slice(r.key.as_bytes());
    v.extend_from_slice(&r.payload);
    let crc = crc32(&v[HEADER as usize..]);
    v[4..8].copy_from_slice(&crc.to_le_bytes());
    v
}

/// Checks a frame body against its crc; returns (seq, record).
fn decode_body(crc: u32, body: &[u8]) -> Result<(u64, Record), &'static str> {
    if crc32(body) != crc {
        return Err("checksum mismatch");
    }
    if body.len() < FIXED as usize {
        return Err("frame too short");
    }
    let seq = u64::from_le_bytes(body[0..8].try_into().unwrap_or_default());
    let klen = u32::from_le_bytes(body[8..12].try_into().unwrap_or_default()) as usize;
    let rest = &body[FIXED as usize..];
    if klen > rest.len() {
        return Err("key length past the frame");
    }
    let key = std::str::from_utf8(&rest[..klen]).map_err(|_| "key is not UTF-8")?;
    Ok((
        seq,
        Record {
            key: key.to_string(),
            payload: rest[klen..].to_vec(),
        },
    ))
}

fn header(h: &[u8; 8]) -> (u32, u32) {
    (
        u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
        u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
    )
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

// ---------------------------------------------------------------------------------------------
// Files.

fn segment_name(first: u64) -> String {
    format!("{first:020}.{SEGMENT_EXT}")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".seg")?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

fn read_cursor(dir: &Path) -> io::Result<Option<u64>> {
    let mut b = Vec::new();
    match File::open(dir.join(CURSOR)) {
        Ok(mut f) => {
            f.read_to_end(&mut b)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    if b.len() != 12 {
        return Err(invalid(format!("cursor file of {} bytes", b.len())));
    }
    let v: [u8; 8] = b[..8].try_into().unwrap_or_default();
    let crc = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
    if crc32(&v) != crc {
        return Err(invalid("cursor checksum mismatch".into()));
    }
    Ok(Some(u64::from_le_bytes(v)))
}

fn write_cursor(dir: &Path, first_pending: u64, durable: bool) -> io::Result<()> {
    let v = first_pending.to_le_bytes();
    let mut b = v.to_vec();
    b.extend_from_slice(&crc32(&v).to_le_bytes());
    let tmp = dir.join(CURSOR_TMP);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&b)?;
        if durable {
            f.sync_all()?;
        }
    }
    fs::rename(&tmp, dir.join(CURSOR))?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(())
}

/// A free `<path>.corrupt[.n]` name.
fn quarantine_name(path: &Path) -> PathBuf {
    let base = format!("{}.corrupt", path.display());
    let mut p = PathBuf::from(&base);
    let mut n = 1;
    while p.exists() {
        p = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    p
}

// ---------------------------------------------------------------------------------------------
// The spool.

struct Segment {
    first: u64,
    path: PathBuf,
    /// Byte offset of each record.
    offsets: Vec<u64>,
    size: u64,
}

impl Segment {
    /// One past the last sequence number.
    fn end(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }
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
}

/// The durable spool. `Send + Sync`: share it in an `Arc`; every method takes `&self`.
pub struct Spool {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
    recovery: Recovery,
}

/// What scanning a segment found.
enum Scan {
    /// Every frame good to the end of the file.
    Clean,
    /// A bad frame at `offset` that reaches the end of the file (or is followed by zeros only).
    Torn { offset: u64, why: String },
    /// A bad frame at `offset` with data after it.
    Corrupt { offset: u64, why: String },
}

/// Verifies every frame of a segment; fills `seg.offsets` and `seg.size` with the good prefix.
fn scan(seg: &mut Segment) -> io::Result<Scan> {
    let f = File::open(&seg.path)?;
    let file_len = f.metadata()?.len();
    let mut r = BufReader::with_capacity(256 * 1024, f);
    let mut off = 0u64;
    let mut body = Vec::new();
    let bad = |r: &mut BufReader<File>, off: u64, reaches_end: bool, why: String| {
        if reaches_end || zeros_from(r, off).unwrap_or(false) {
            Ok(Scan::Torn { offset: off, why })
        } else {
            Ok(Scan::Corrupt { offset: off, why })
        }
    };
    loop {
        seg.size = off;
        if off == file_len {
            return Ok(Scan::Clean);
        }
        if file_len - off < HEADER {
            return bad(&mut r, off, true, "incomplete frame header".into());
        }
        let mut h = [0u8; 8];
        r.read_exact(&mut h)?;
        let (len, crc) = header(&h);
        if (len as u64) < FIXED || len > MAX_RECORD_BYTES {
            return bad(&mut r, off, false, format!("impossible frame length {len}"));
        }
        let end = off + HEADER + len as u64;
        if end > file_len {
            return bad(&mut r, off, true, "frame cut short".into());
        }
        body.resize(len as usize, 0);
        r.read_exact(&mut body)?;
        let expected = seg.end();
        match decode_body(crc, &body) {
            Ok((seq, _)) if seq == expected => {}
            Ok((seq, _)) => {
                return bad(
                    &mut r,
                    off,
                    end == file_len,
                    format!("sequence {seq} where {expected} belongs"),
                )
            }
            Err(why) => return bad(&mut r, off, end == file_len, why.to_string()),
        }
        seg.offsets.push(off);
        off = end;
    }
}

/// Whether the file holds only zero bytes from `off` on.
fn zeros_from(r: &mut BufReader<File>, off: u64) -> io::Result<bool> {
    r.seek(SeekFrom::Start(off))?;
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
    }
}

impl Spool {
    /// Opens (or creates) the spool in `cfg.dir` and replays it: pending = every record after the
    /// persisted cursor. Repairs a torn tail; stops at corruption (see the module docs).
    pub fn open(cfg: SpoolConfig) -> io::Result<Spool> {
        if cfg.segment_bytes == 0 || cfg.max_bytes == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "spool: segment_bytes and max_bytes must be > 0",
            ));
        }
        if cfg.fsync == Fsync::EveryMs(0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "spool: fsync interval must be > 0 ms (use Always)",
            ));
        }
        fs::create_dir_all(&cfg.dir)?;
        let dir = cfg.dir.clone();
        let durable = cfg.fsync != Fsync::Never;
        let mut rec = Recovery::default();
        let _ = fs::remove_file(dir.join(CURSOR_TMP));

        let cursor = match read_cursor(&dir) {
            Ok(c) => c,
            Err(e) => {
                log::warn!(
                    "event spool {}: cursor unreadable ({e}); every spooled event will be \
                     delivered again",
                    dir.display()
                );
                rec.cursor_reset = true;
                None
            }
        };

        let mut found: Vec<Segment> = Vec::new();
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(first) = name.to_str().and_then(parse_segment_name) else {
                continue;
            };
            if first == 0 {
                continue;
            }
            found.push(Segment {
                first,
                path: entry.path(),
                offsets: Vec::new(),
                size: 0,
            });
        }
        found.sort_by_key(|s| s.first);

        let mut segments: VecDeque<Segment> = VecDeque::new();
        let n = found.len();
        let mut rest = found.into_iter().enumerate();
        while let Some((i, mut seg)) = rest.next() {
            let last = i + 1 == n;
            let file_len = fs::metadata(&seg.path)?.len();
            if file_len == 0 {
                // Created, never written: nothing to keep.
                fs::remove_file(&seg.path)?;
                continue;
            }
            let stop = match segments.back() {
                Some(prev) if prev.end() != seg.first => Some((
                    0,
                    format!(
                        "segment starts at {} where {} belongs",
                        seg.first,
                        prev.end()
                    ),
                )),
                _ => match scan(&mut seg)? {
                    Scan::Clean => None,
                    Scan::Torn { offset, why } if last => {
                        let cut = file_len - offset;
                        log::warn!(
                            "event spool {}: torn last record ({why}); {cut} bytes cut off",
                            seg.path.display()
                        );
                        let f = OpenOptions::new().write(true).open(&seg.path)?;
                        f.set_len(offset)?;
                        if durable {
                            f.sync_all()?;
                        }
                        rec.torn_bytes = cut;
                        None
                    }
                    Scan::Torn { offset, why } | Scan::Corrupt { offset, why } => {
                        Some((offset, why))
                    }
                },
            };
            let Some((offset, why)) = stop else {
                if seg.offsets.is_empty() {
                    fs::remove_file(&seg.path)?;
                } else {
                    segments.push_back(seg);
                }
                continue;
            };
            // Corruption: keep the good prefix, set the rest aside, stop replaying.
            let seq = seg.end();
            let q = quarantine_name(&seg.path);
            if offset == 0 {
                fs::rename(&seg.path, &q)?;
            } else {
                fs::copy(&seg.path, &q)?;
                let f = OpenOptions::new().write(true).open(&seg.path)?;
                f.set_len(offset)?;
                if durable {
                    f.sync_all()?;
                }
                seg.size = offset;
                segments.push_back(seg);
            }
            rec.quarantined.push(q);
            for (_, later) in rest.by_ref() {
                let q = quarantine_name(&later.path);
                fs::rename(&later.path, &q)?;
                rec.quarantined.push(q);
            }
            let msg = format!("at sequence {seq} (offset {offset}): {why}");
            log::error!(
                "event spool {}: corrupt record {msg}; replay stops there, records from it on \
                 are NOT replayed; set aside: {:?}",
                dir.display(),
                rec.quarantined
            );
            rec.corrupt = Some(msg);
            break;
        }
        if durable && (rec.corrupt.is_some() || rec.torn_bytes > 0) {
            sync_dir(&dir)?;
        }

        let disk_first = segments.front().map(|s| s.first);
        let disk_end = segments.back().map(|s| s.end());
        let mut first_pending = match (cursor, disk_first) {
            (Some(c), Some(f)) => c.max(f),
            (Some(c), None) => c,
            (None, Some(f)) => f,
            (None, None) => 1,
        }
        .max(1);
        let next_seq = disk_end.unwrap_or(first_pending).max(first_pending);
        first_pending = first_pending.min(next_seq);
        // Fully delivered segments.
        while segments.front().is_some_and(|s| s.end() <= first_pending) {
            if let Some(s) = segments.pop_front() {
                fs::remove_file(&s.path)?;
            }
        }
        let bytes = segments.iter().map(|s| s.size).sum();
        let active = match segments.back() {
            Some(s) => Some(OpenOptions::new().append(true).open(&s.path)?),
            None => None,
        };
        rec.replayed = next_seq - first_pending;
        if rec.replayed > 0 {
            log::info!(
                "event spool {}: {} undelivered events replayed (sequence {first_pending}..{})",
                dir.display(),
                rec.replayed,
                next_seq - 1
            );
        }

        let shared = Arc::new(Shared {
            cfg,
            inner: Mutex::new(Inner {
                segments,
                active,
                next_seq,
                first_pending,
                bytes,
                dirty: false,
                broken: None,
            }),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let flusher = match shared.cfg.fsync {
            Fsync::EveryMs(ms) => {
                let s = shared.clone();
                let every = Duration::from_millis(ms);
                Some(
                    std::thread::Builder::new()
                        .name("spool-fsync".into())
                        .spawn(move || loop {
                            {
                                let stop = s.stop.lock().unwrap_or_else(|e| e.into_inner());
                                if *stop {
                                    return;
                                }
                                let (stop, _) = s
                                    .wake
                                    .wait_timeout(stop, every)
                                    .unwrap_or_else(|e| e.into_inner());
                                if *stop {
                                    return;
                                }
                            }
                            if let Err(e) = s.sync_dirty() {
                                log::error!(
                                    "event spool {}: fsync failed: {e}",
                                    s.cfg.dir.display()
                                );
                            }
                        })?,
                )
            }
            _ => None,
        };
        Ok(Spool {
            shared,
            flusher,
            recovery: rec,
        })
    }

    /// What opening found and repaired.
    pub fn recovery(&self) -> &Recovery {
        &self.recovery
    }

    pub fn config(&self) -> &SpoolConfig {
        &self.shared.cfg
    }

    /// Appends a record; returns its sequence number. Durable on return with `Fsync::Always`.
    pub fn append(&self, r: &Record) -> Result<u64, SpoolError> {
        let cfg = &self.shared.cfg;
        let len = frame_len(r);
        if len - HEADER > MAX_RECORD_BYTES as u64 || len > cfg.max_bytes {
            return Err(SpoolError::TooLarge {
                len,
                max: cfg.max_bytes.min(HEADER + MAX_RECORD_BYTES as u64),
            });
        }
        let mut g = self.shared.lock();
        let inner = &mut *g;
        if let Some(why) = &inner.broken {
            return Err(SpoolError::Io(io::Error::other(format!(
                "spool unusable until reopened: {why}"
            ))));
        }
        if inner.bytes + len > cfg.max_bytes {
            return Err(SpoolError::Full {
                bytes: inner.bytes,
                max_bytes: cfg.max_bytes,
            });
        }
        let roll = match (&inner.active, inner.segments.back()) {
            (Some(_), Some(s)) => s.size > 0 && s.size + len > cfg.segment_bytes,
            _ => true,
        };
        if roll {
            self.roll(inner)?;
        }
        let seq = inner.next_seq;
        let frame = encode(seq, r);
        let (Some(file), Some(seg)) = (inner.active.as_mut(), inner.segments.back_mut()) else {
            return Err(SpoolError::Io(io::Error::other("no active segment")));
        };
        let at = seg.size;
        if let Err(e) = file.write_all(&frame) {
            // Undo a partial frame so the index and the file agree.
            if let Err(e2) = file.set_len(at) {
                inner.broken = Some(format!("write failed ({e}) and could not be undone ({e2})"));
            }
            return Err(SpoolError::Io(e));
        }
        seg.offsets.push(at);
        seg.size += len;
        inner.bytes += len;
        inner.next_seq += 1;
        inner.dirty = true;
        if cfg.fsync == Fsync::Always {
            if let Err(e) = file.sync_data() {
                inner.broken = Some(format!("fsync failed ({e})"));
                return Err(SpoolError::Io(e));
            }
            inner.dirty = false;
        }
        Ok(seq)
    }

    /// Closes the current segment (synced unless `Never`) and starts one named `next_seq`.
    fn roll(&self, inner: &mut Inner) -> io::Result<()> {
        let cfg = &self.shared.cfg;
        let durable = cfg.fsync != Fsync::Never;
        if let Some(f) = inner.active.take() {
            if durable && inner.dirty {
                if let Err(e) = f.sync_data() {
                    inner.broken = Some(format!("fsync failed ({e})"));
                    return Err(e);
                }
            }
            inner.dirty = false;
        }
        // An empty segment left by an undone write is reused under its name.
        if inner
            .segments
            .back()
            .is_some_and(|s| s.offsets.is_empty() && s.first == inner.next_seq)
        {
            if let Some(s) = inner.segments.pop_back() {
                let _ = fs::remove_file(&s.path);
            }
        }
        let path = cfg.dir.join(segment_name(inner.next_seq));
        let open = || OpenOptions::new().append(true).create_new(true).open(&path);
        let f = match open() {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                log::warn!(
                    "event spool: stale {} not in the index, replaced",
                    path.display()
                );
                fs::remove_file(&path)?;
                open()?
            }
            r => r?,
        };
        if durable {
            sync_dir(&cfg.dir)?;
        }
        inner.segments.push_back(Segment {
            first: inner.next_seq,
            path,
            offsets: Vec::new(),
            size: 0,
        });
        inner.active = Some(f);
        Ok(())
    }

    /// Up to `max` pending records from `seq` on (from `first_pending()` if `seq` is below it),
    /// in order, each checked against its checksum. Reads under the spool's lock (appends wait
    /// meanwhile: keep `max` moderate, a producer batch).
    pub fn read_from(&self, seq: u64, max: usize) -> io::Result<Vec<(u64, Record)>> {
        let g = self.shared.lock();
        let mut seq = seq.max(g.first_pending);
        let mut out = Vec::new();
        if max == 0 || seq >= g.next_seq {
            return Ok(out);
        }
        let start = g.segments.partition_point(|s| s.end() <= seq);
        let mut buf = Vec::new();
        for seg in g.segments.iter().skip(start) {
            let left = max - out.len();
            if left == 0 {
                break;
            }
            seq = seq.max(seg.first);
            let i = (seq - seg.first) as usize;
            let count = seg.offsets.len();
            if i >= count {
                continue;
            }
            let j = count.min(i + left);
            let from = seg.offsets[i];
            let to = if j < count { seg.offsets[j] } else { seg.size };
            let mut f = File::open(&seg.path)?;
            f.seek(SeekFrom::Start(from))?;
            buf.resize((to - from) as usize, 0);
            f.read_exact(&mut buf)?;
            let mut p = 0usize;
            for k in i..j {
                let h: [u8; 8] = buf[p..p + 8].try_into().unwrap_or_default();
                let (len, crc) = header(&h);
                let body = buf.get(p + 8..p + 8 + len as usize).ok_or_else(|| {
                    invalid(format!("{}: frame past its end", seg.path.display()))
                })?;
                let expected = seg.first + k as u64;
                let (s, r) = decode_body(crc, body).map_err(|why| {
                    invalid(format!(
                        "{}: sequence {expected}: {why}",
                        seg.path.display()
                    ))
                })?;
                if s != expected {
                    return Err(invalid(format!(
                        "{}: sequence {s} where {expected} belongs",
                        seg.path.display()
                    )));
                }
                out.push((s, r));
                p += 8 + len as usize;
            }
            seq = seg.end();
        }
        Ok(out)
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

    /// Everything up to `upto_seq` (inclusive) was delivered: persists the cursor (atomically),
    /// then deletes the segments that hold only delivered records (the current one included:
    /// the next append starts a new one). Acknowledging what is already acknowledged is a no-op;
    /// past the last appended record is an `InvalidInput` error. A segment that cannot be
    /// deleted is logged and retried at the next `ack`.
    pub fn ack(&self, upto_seq: u64) -> io::Result<()> {
        let cfg = &self.shared.cfg;
        let mut g = self.shared.lock();
        let inner = &mut *g;
        if upto_seq < inner.first_pending {
            return Ok(());
        }
        if upto_seq >= inner.next_seq {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "ack of {upto_seq}: the last appended record is {}",
                    inner.next_seq - 1
                ),
            ));
        }
        let durable = cfg.fsync != Fsync::Never;
        let persisted = write_cursor(&cfg.dir, upto_seq + 1, durable);
        // In memory regardless: what the broker confirmed is not sent again by this process.
        // If the cursor could not be written (a full disk), deleting the delivered segments
        // below frees the space it needs; a crash before it is written only means those
        // segments' events are not replayed (they are gone), and later ones are (at least
        // once). `open` takes the later of cursor and first segment.
        inner.first_pending = upto_seq + 1;
        while let Some(front) = inner.segments.front() {
            if front.end() > inner.first_pending {
                break;
            }
            if inner.segments.len() == 1 {
                inner.active = None;
                inner.dirty = false;
            }
            match fs::remove_file(&front.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    log::warn!(
                        "event spool: could not delete delivered segment {}: {e}",
                        front.path.display()
                    );
                    break;
                }
            }
            if let Some(s) = inner.segments.pop_front() {
                inner.bytes -= s.size;
            }
        }
        match persisted {
            Ok(()) => Ok(()),
            Err(_) => write_cursor(&cfg.dir, upto_seq + 1, durable),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static N: AtomicU64 = AtomicU64::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir().join(format!(
                "fhir-gateway-spool-{name}-{}-{nanos}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            TempDir(p)
        }

        fn path(&self) -> PathBuf {
            self.0.clone()
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn cfg(dir: &TempDir, segment_bytes: u64, max_bytes: u64) -> SpoolConfig {
        SpoolConfig {
            dir: dir.path(),
            fsync: Fsync::Never,
            max_bytes,
            segment_bytes,
        }
    }

    /// Key "k" + a 10-byte payload: a 31-byte frame.
    fn rec(i: u64) -> Record {
        Record {
            key: "k".into(),
            payload: format!("{i:010}").into_bytes(),
        }
    }
    const REC: u64 = 31;

    fn payloads(v: &[(u64, Record)]) -> Vec<u64> {
        v.iter()
            .map(|(_, r)| {
                String::from_utf8(r.payload.clone())
                    .unwrap()
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    fn seqs(v: &[(u64, Record)]) -> Vec<u64> {
        v.iter().map(|(s, _)| *s).collect()
    }

    fn segment_files(dir: &TempDir) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".seg"))
            .collect();
        v.sort();
        v
    }

    fn seg_path(dir: &TempDir, first: u64) -> PathBuf {
        dir.path().join(segment_name(first))
    }

    #[test]
    fn crc32_known_values() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"a"), 0xE8B7_BE43);
        assert_eq!(frame_len(&rec(1)), REC);
        assert_eq!(encode(1, &rec(1)).len() as u64, REC);
    }

    #[test]
    fn append_and_read_in_order() {
        let d = TempDir::new("order");
        let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
        assert_eq!((s.first_pending(), s.next_seq(), s.depth()), (1, 1, 0));
        for i in 1..=10 {
            assert_eq!(s.append(&rec(i * 100)).unwrap(), i);
        }
        assert_eq!(s.depth(), 10);
        assert_eq!(s.bytes(), 10 * REC);
        let all = s.read_from(1, 100).unwrap();
        assert_eq!(seqs(&all), (1..=10).collect::<Vec<_>>());
        assert_eq!(
            payloads(&all),
            (1..=10).map(|i| i * 100).collect::<Vec<_>>()
        );
        assert_eq!(all[0].1.key, "k");
        assert_eq!(seqs(&s.read_from(4, 3).unwrap()), [4, 5, 6]);
        assert_eq!(seqs(&s.read_from(9, 100).unwrap()), [9, 10]);
        assert!(s.read_from(11, 10).unwrap().is_empty());
        assert!(s.read_from(1, 0).unwrap().is_empty());
        // Empty key and payload, binary payload.
        let odd = Record {
            key: String::new(),
            payload: vec![0, 255, 10, 13],
        };
        let n = s.append(&odd).unwrap();
        assert_eq!(s.read_from(n, 1).unwrap()[0].1, odd);
        // Below the cursor: starts at the first pending.
        s.ack(3).unwrap();
        assert_eq!(seqs(&s.read_from(1, 2).unwrap()), [4, 5]);
    }

    #[test]
    fn segment_rollover() {
        let d = TempDir::new("roll");
        // Two records per segment.
        let s = Spool::open(cfg(&d, 2 * REC, 1 << 30)).unwrap();
        for i in 1..=5 {
            s.append(&rec(i)).unwrap();
        }
        assert_eq!(
            segment_files(&d),
            [segment_name(1), segment_name(3), segment_name(5)]
        );
        assert_eq!(fs::metadata(seg_path(&d, 1)).unwrap().len(), 2 * REC);
        // A record larger than a segment gets one of its own.
        let big = Record {
            key: "big".into(),
            payload: vec![7; 500],
        };
        assert_eq!(s.append(&big).unwrap(), 6);
        assert_eq!(s.append(&rec(7)).unwrap(), 7);
        assert_eq!(
            segment_files(&d),
            [1, 3, 5, 6, 7].map(segment_name).to_vec(),
        );
        let all = s.read_from(1, 100).unwrap();
        assert_eq!(seqs(&all), (1..=7).collect::<Vec<_>>());
        assert_eq!(all[5].1, big);
        assert_eq!(
            seqs(&s.read_from(2, 3).unwrap()),
            [2, 3, 4],
            "across segments"
        );
    }

    #[test]
    fn ack_trims_delivered_segments() {
        let d = TempDir::new("ack");
        let s = Spool::open(cfg(&d, 2 * REC, 1 << 30)).unwrap();
        for i in 1..=5 {
            s.append(&rec(i)).unwrap();
        }
        s.ack(1).unwrap();
        assert_eq!(segment_files(&d).len(), 3, "segment 1 still holds 2");
        assert_eq!(s.bytes(), 5 * REC);
        s.ack(3).unwrap();
        assert_eq!(segment_files(&d), [segment_name(3), segment_name(5)]);
        assert_eq!(s.bytes(), 3 * REC);
        assert_eq!((s.first_pending(), s.depth()), (4, 2));
        s.ack(2).unwrap(); // already acknowledged: no-op
        assert_eq!(s.first_pending(), 4);
        let e = s.ack(6).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // Everything: the current segment goes too.
        s.ack(5).unwrap();
        assert!(segment_files(&d).is_empty());
        assert_eq!((s.bytes(), s.depth(), s.first_pending()), (0, 0, 6));
        assert_eq!(s.append(&rec(6)).unwrap(), 6);
        assert_eq!(segment_files(&d), [segment_name(6)]);
        assert_eq!(payloads(&s.read_from(0, 10).unwrap()), [6]);
        drop(s);
        let s = Spool::open(cfg(&d, 2 * REC, 1 << 30)).unwrap();
        assert_eq!((s.first_pending(), s.next_seq()), (6, 7));
    }

    #[test]
    fn reopen_replays_only_unacked() {
        let d = TempDir::new("reopen");
        let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
        for i in 1..=10 {
            s.append(&rec(i)).unwrap();
        }
        s.ack(4).unwrap();
        drop(s);
        let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
        assert_eq!(s.recovery().replayed, 6);
        assert_eq!(s.recovery().torn_bytes, 0);
        assert!(s.recovery().corrupt.is_none());
        assert_eq!((s.first_pending(), s.depth()), (5, 6));
        assert_eq!(payloads(&s.read_from(0, 100).unwrap()), [5, 6, 7, 8, 9, 10]);
        // Segment 1 (1..3) was deleted; 4..6 kept for 5 and 6.
        assert_eq!(segment_files(&d), [4, 7, 10].map(segment_name).to_vec());
        assert_eq!(s.append(&rec(11)).unwrap(), 11);
        s.ack(10).unwrap();
        drop(s);
        let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
        assert_eq!(payloads(&s.read_from(0, 100).unwrap()), [11]);
        s.ack(11).unwrap();
        drop(s);
        let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
        assert_eq!((s.depth(), s.next_seq(), s.bytes()), (0, 12, 0));
        assert_eq!(s.recovery().replayed, 0);
    }

    #[test]
    fn torn_last_record_is_cut_off() {
        for (case, tail) in [
            ("partial header", encode(4, &rec(4))[..5].to_vec()),
            ("partial body", encode(4, &rec(4))[..20].to_vec()),
            ("bad checksum at the end", {
                let mut f = encode(4, &rec(4));
                let n = f.len();
                f[n - 1] ^= 0x55;
                f
            }),
            ("zeros", vec![0u8; 4096]),
        ] {
            let d = TempDir::new("torn");
            let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
            for i in 1..=3 {
                s.append(&rec(i)).unwrap();
            }
            drop(s);
            let p = seg_path(&d, 1);
            OpenOptions::new()
                .append(true)
                .open(&p)
                .unwrap()
                .write_all(&tail)
                .unwrap();
            let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
            assert_eq!(s.recovery().torn_bytes, tail.len() as u64, "{case}");
            assert!(s.recovery().corrupt.is_none(), "{case}");
            assert_eq!(s.depth(), 3, "{case}");
            assert_eq!(fs::metadata(&p).unwrap().len(), 3 * REC, "{case}");
            assert_eq!(s.append(&rec(4)).unwrap(), 4, "{case}");
            drop(s);
            let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
            assert_eq!(s.recovery().torn_bytes, 0, "{case}");
            assert_eq!(
                payloads(&s.read_from(1, 10).unwrap()),
                [1, 2, 3, 4],
                "{case}"
            );
        }
    }

    #[test]
    fn corruption_in_the_middle_stops_the_replay() {
        let d = TempDir::new("corrupt");
        let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
        for i in 1..=9 {
            s.append(&rec(i)).unwrap();
        }
        drop(s);
        // Record 5 is the second of segment 4: flip a payload byte.
        let p4 = seg_path(&d, 4);
        let mut b = fs::read(&p4).unwrap();
        b[REC as usize + 25] ^= 0x01;
        fs::write(&p4, &b).unwrap();

        let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
        let r = s.recovery().clone();
        let why = r.corrupt.expect("corruption reported");
        assert!(
            why.contains("sequence 5") && why.contains("checksum"),
            "{why}"
        );
        assert_eq!(r.quarantined.len(), 2);
        assert!(r.quarantined[0].ends_with(format!("{}.corrupt", segment_name(4))));
        assert!(r.quarantined[1].ends_with(format!("{}.corrupt", segment_name(7))));
        assert_eq!(
            fs::read(&r.quarantined[0]).unwrap(),
            b,
            "the damaged file is kept whole"
        );
        assert_eq!(s.depth(), 4);
        assert_eq!(payloads(&s.read_from(1, 100).unwrap()), [1, 2, 3, 4]);
        assert_eq!(segment_files(&d), [segment_name(1), segment_name(4)]);
        assert_eq!(s.bytes(), 4 * REC);
        assert_eq!(
            s.append(&rec(50)).unwrap(),
            5,
            "sequence numbers stay contiguous"
        );
        drop(s);
        let s = Spool::open(cfg(&d, 3 * REC, 1 << 30)).unwrap();
        assert!(s.recovery().corrupt.is_none());
        assert_eq!(payloads(&s.read_from(1, 100).unwrap()), [1, 2, 3, 4, 50]);
    }

    #[test]
    fn corruption_inside_the_last_segment_is_not_a_torn_tail() {
        let d = TempDir::new("corrupt-last");
        let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
        for i in 1..=5 {
            s.append(&rec(i)).unwrap();
        }
        drop(s);
        let p = seg_path(&d, 1);
        let mut b = fs::read(&p).unwrap();
        b[REC as usize] = 0xff; // record 2's length: impossible, and data follows
        b[REC as usize + 3] = 0xff;
        fs::write(&p, &b).unwrap();
        let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
        assert!(s.recovery().corrupt.as_deref().unwrap().contains("length"));
        assert_eq!(s.recovery().torn_bytes, 0);
        assert_eq!(s.depth(), 1);
        assert_eq!(fs::metadata(&p).unwrap().len(), REC);
        assert_eq!(fs::read(&s.recovery().quarantined[0]).unwrap(), b);
    }

    #[test]
    fn a_gap_between_segments_stops_the_replay() {
        let d = TempDir::new("gap");
        let s = Spool::open(cfg(&d, 2 * REC, 1 << 30)).unwrap();
        for i in 1..=6 {
            s.append(&rec(i)).unwrap();
        }
        drop(s);
        fs::remove_file(seg_path(&d, 3)).unwrap();
        let s = Spool::open(cfg(&d, 2 * REC, 1 << 30)).unwrap();
        assert!(s
            .recovery()
            .corrupt
            .as_deref()
            .unwrap()
            .contains("segment starts at 5"));
        assert_eq!(payloads(&s.read_from(1, 10).unwrap()), [1, 2]);
        assert_eq!(s.append(&rec(3)).unwrap(), 3);
    }

    #[test]
    fn full_at_max_bytes() {
        let d = TempDir::new("full");
        let s = Spool::open(cfg(&d, 2 * REC, 5 * REC)).unwrap();
        for i in 1..=5 {
            s.append(&rec(i)).unwrap();
        }
        match s.append(&rec(6)) {
            Err(SpoolError::Full { bytes, max_bytes }) => {
                assert_eq!((bytes, max_bytes), (5 * REC, 5 * REC))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!((s.depth(), s.bytes(), s.next_seq()), (5, 5 * REC, 6));
        s.ack(1).unwrap();
        assert!(
            matches!(s.append(&rec(6)), Err(SpoolError::Full { .. })),
            "segment 1 still holds record 2"
        );
        s.ack(2).unwrap();
        assert_eq!(s.append(&rec(6)).unwrap(), 6);
        assert_eq!(s.append(&rec(7)).unwrap(), 7);
        assert!(matches!(s.append(&rec(8)), Err(SpoolError::Full { .. })));
        let huge = Record {
            key: "k".into(),
            payload: vec![1; 1000],
        };
        match s.append(&huge) {
            Err(SpoolError::TooLarge { len, max }) => assert_eq!((len, max), (1021, 5 * REC)),
            other => panic!("{other:?}"),
        }
        assert!(SpoolError::Full {
            bytes: 1,
            max_bytes: 1
        }
        .to_string()
        .contains("full"));
        assert_eq!(payloads(&s.read_from(0, 10).unwrap()), [3, 4, 5, 6, 7]);
    }

    #[test]
    fn concurrent_appends_keep_every_record_once() {
        let d = TempDir::new("threads");
        let s = Arc::new(Spool::open(cfg(&d, 4096, 1 << 30)).unwrap());
        let threads = 8u64;
        let each = 300u64;
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..each {
                        let r = Record {
                            key: format!("t{t}"),
                            payload: format!("{t}:{i}").into_bytes(),
                        };
                        mine.push(s.append(&r).unwrap());
                    }
                    mine
                })
            })
            .collect();
        let mut all_seqs: Vec<u64> = hs.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all_seqs.sort();
        assert_eq!(all_seqs, (1..=threads * each).collect::<Vec<_>>());
        let check = |s: &Spool| {
            let got = s.read_from(1, usize::MAX).unwrap();
            assert_eq!(seqs(&got), (1..=threads * each).collect::<Vec<_>>());
            let mut seen = HashSet::new();
            let mut last = vec![None::<u64>; threads as usize];
            for (_, r) in &got {
                let p = String::from_utf8(r.payload.clone()).unwrap();
                assert!(seen.insert(p.clone()), "duplicate {p}");
                let (t, i) = p.split_once(':').unwrap();
                let (t, i): (usize, u64) = (t.parse().unwrap(), i.parse().unwrap());
                assert_eq!(r.key, format!("t{t}"));
                assert!(last[t].is_none_or(|l| l < i), "thread order kept");
                last[t] = Some(i);
            }
            assert_eq!(seen.len() as u64, threads * each);
        };
        check(&s);
        assert!(segment_files(&d).len() > 1);
        drop(s);
        let s = Spool::open(cfg(&d, 4096, 1 << 30)).unwrap();
        assert!(s.recovery().corrupt.is_none());
        check(&s);
    }

    #[test]
    fn fsync_modes() {
        for mode in [Fsync::Always, Fsync::EveryMs(5), Fsync::Never] {
            let d = TempDir::new("fsync");
            let c = SpoolConfig {
                fsync: mode,
                ..cfg(&d, 2 * REC, 1 << 30)
            };
            let s = Spool::open(c.clone()).unwrap();
            for i in 1..=5 {
                s.append(&rec(i)).unwrap();
            }
            match mode {
                Fsync::Always => assert!(!s.shared.lock().dirty),
                Fsync::EveryMs(_) => {
                    let t = std::time::Instant::now();
                    while s.shared.lock().dirty {
                        assert!(t.elapsed() < Duration::from_secs(5), "flusher never ran");
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                Fsync::Never => assert!(s.shared.lock().dirty),
            }
            s.ack(2).unwrap();
            s.sync().unwrap();
            drop(s); // joins the flusher
            let s = Spool::open(c).unwrap();
            assert_eq!(
                payloads(&s.read_from(0, 10).unwrap()),
                [3, 4, 5],
                "{mode:?}"
            );
        }
    }

    #[test]
    fn unreadable_cursor_replays_everything() {
        let d = TempDir::new("cursor");
        let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
        for i in 1..=4 {
            s.append(&rec(i)).unwrap();
        }
        s.ack(2).unwrap();
        drop(s);
        fs::write(d.path().join(CURSOR), b"garbage").unwrap();
        let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
        assert!(s.recovery().cursor_reset);
        assert_eq!(payloads(&s.read_from(0, 10).unwrap()), [1, 2, 3, 4]);
    }

    #[test]
    fn bad_config_and_foreign_files() {
        let d = TempDir::new("cfg");
        assert!(Spool::open(cfg(&d, 0, 10)).is_err());
        assert!(Spool::open(cfg(&d, 10, 0)).is_err());
        assert!(Spool::open(SpoolConfig {
            fsync: Fsync::EveryMs(0),
            ..cfg(&d, 10, 10)
        })
        .is_err());
        // Created on open; other files and empty segments are harmless.
        let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
        drop(s);
        fs::write(d.path().join("notes.txt"), b"x").unwrap();
        fs::write(seg_path(&d, 1), b"").unwrap();
        let s = Spool::open(cfg(&d, 1 << 20, 1 << 30)).unwrap();
        assert_eq!(s.depth(), 0);
        assert_eq!(s.append(&rec(1)).unwrap(), 1);
        assert!(d.path().join("notes.txt").exists());
    }

    #[test]
    fn spool_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Spool>();
    }
}
