//! Reading pending records for the producer, and acknowledging what the broker confirmed
//! (the cursor moves, delivered segments are deleted).

use super::cursor::write_cursor;
use super::frame::{decode_body, header, invalid};
use super::{Fsync, Record, Spool};
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};

impl Spool {
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
        // Under `EveryMs` the flusher writes the cursor with its next sync: two fsyncs and a
        // rename per delivered batch were the spool's largest cost under load.
        let persisted = match cfg.fsync {
            Fsync::EveryMs(_) => {
                inner.cursor_due = Some(upto_seq + 1);
                Ok(())
            }
            _ => write_cursor(&cfg.dir, upto_seq + 1, durable),
        };
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
}
