//! Appending: a record framed onto the current segment, a new segment when it would grow past
//! `segment_bytes`, the fsync policy.

use super::frame::{encode, frame_len};
use super::segment::{segment_name, sync_dir, Segment};
use super::{Fsync, Inner, Record, Spool, SpoolError, HEADER, MAX_RECORD_BYTES};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};

impl Spool {
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
}
