//! Appending: records framed onto the current segment (a batch in one write), a new segment
//! when the next record would grow it past `segment_bytes`, the fsync policy.

use super::frame::{encode_into, frame_len};
use super::segment::{segment_name, sync_dir, Segment};
use super::{Fsync, Inner, Record, Spool, SpoolError, HEADER, MAX_RECORD_BYTES};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};

/// Frames waiting for one write to the current segment.
#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    /// Each frame's start in `buf`, and its record's index in the results.
    frames: Vec<(u64, usize)>,
}

impl Spool {
    /// Appends a record; returns its sequence number. Durable on return with `Fsync::Always`.
    pub fn append(&self, r: &Record) -> Result<u64, SpoolError> {
        self.append_all(std::slice::from_ref(r))
            .pop()
            .unwrap_or_else(|| Err(SpoolError::Io(io::Error::other("no result"))))
    }

    /// Appends records in order, each admitted on its own (one may be refused and the next
    /// taken), with one write per segment they land in: a batch from the queue costs one
    /// syscall, not one per record. One result per record, in order. Durable on return with
    /// `Fsync::Always`.
    pub fn append_all(&self, records: &[Record]) -> Vec<Result<u64, SpoolError>> {
        let cfg = &self.shared.cfg;
        let mut out = Vec::with_capacity(records.len());
        let mut g = self.shared.lock();
        let inner = &mut *g;
        let mut p = Pending::default();
        for r in records {
            let len = frame_len(r);
            if len - HEADER > MAX_RECORD_BYTES as u64 || len > cfg.max_bytes {
                out.push(Err(SpoolError::TooLarge {
                    len,
                    max: cfg.max_bytes.min(HEADER + MAX_RECORD_BYTES as u64),
                }));
                continue;
            }
            if let Some(why) = &inner.broken {
                out.push(Err(SpoolError::Io(io::Error::other(format!(
                    "spool unusable until reopened: {why}"
                )))));
                continue;
            }
            let held = inner.bytes + p.buf.len() as u64;
            if held + len > cfg.max_bytes {
                out.push(Err(SpoolError::Full {
                    bytes: held,
                    max_bytes: cfg.max_bytes,
                }));
                continue;
            }
            let roll = match (&inner.active, inner.segments.back()) {
                (Some(_), Some(s)) => {
                    let size = s.size + p.buf.len() as u64;
                    size > 0 && size + len > cfg.segment_bytes
                }
                _ => true,
            };
            if roll {
                self.write_pending(inner, &mut p, &mut out);
                if let Err(e) = self.roll(inner) {
                    out.push(Err(SpoolError::Io(e)));
                    continue;
                }
            }
            let seq = inner.next_seq + p.frames.len() as u64;
            p.frames.push((p.buf.len() as u64, out.len()));
            encode_into(&mut p.buf, seq, r);
            // Provisional: `write_pending` replaces it if the write fails.
            out.push(Ok(seq));
        }
        self.write_pending(inner, &mut p, &mut out);
        out
    }

    /// Writes the pending frames to the current segment and indexes them; a failed write is
    /// undone (its records get the error), a failed fsync leaves the spool refusing appends.
    fn write_pending(
        &self,
        inner: &mut Inner,
        p: &mut Pending,
        out: &mut [Result<u64, SpoolError>],
    ) {
        if p.frames.is_empty() {
            return;
        }
        if let Err(e) = self.write_frames(inner, p) {
            for &(_, i) in &p.frames {
                out[i] = Err(SpoolError::Io(io::Error::new(e.kind(), e.to_string())));
            }
        }
        p.buf.clear();
        p.frames.clear();
    }

    fn write_frames(&self, inner: &mut Inner, p: &Pending) -> io::Result<()> {
        let (Some(file), Some(seg)) = (inner.active.as_mut(), inner.segments.back_mut()) else {
            return Err(io::Error::other("no active segment"));
        };
        let at = seg.size;
        if let Err(e) = file.write_all(&p.buf) {
            // Undo a partial write so the index and the file agree.
            if let Err(e2) = file.set_len(at) {
                inner.broken = Some(format!("write failed ({e}) and could not be undone ({e2})"));
            }
            return Err(e);
        }
        seg.offsets
            .extend(p.frames.iter().map(|&(start, _)| at + start));
        let len = p.buf.len() as u64;
        seg.size += len;
        inner.bytes += len;
        inner.next_seq += p.frames.len() as u64;
        inner.dirty = true;
        if self.shared.cfg.fsync == Fsync::Always {
            if let Err(e) = file.sync_data() {
                inner.broken = Some(format!("fsync failed ({e})"));
                return Err(e);
            }
            inner.dirty = false;
        }
        Ok(())
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
}
