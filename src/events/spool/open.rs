//! Opening a spool: every segment verified, a torn tail cut off, replay stopped at corruption
//! (see the module docs).

use super::cursor::read_cursor;
use super::segment::{parse_segment_name, quarantine_name, scan, sync_dir, Scan, Segment};
use super::{Fsync, Inner, Recovery, Shared, Spool, SpoolConfig, CURSOR_TMP};
use std::collections::VecDeque;
use std::fs::{self, OpenOptions};
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

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
                cursor_due: None,
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
                            if let Err(e) = s.write_due_cursor() {
                                log::error!(
                                    "event spool {}: writing the cursor: {e}",
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
}
