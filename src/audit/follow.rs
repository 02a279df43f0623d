//! What the sinks share to follow the audit file: a durable byte offset ("sent up to here") and
//! reading whole lines from it. The file is the source of truth; a sink only ever moves its
//! offset past lines it has handed on, so a crash re-sends and never skips.

use log::{error, info, warn};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where a sink is in the trail: a byte offset into one file, named by its inode (a file moved
/// aside by log rotation keeps its inode; the new file at the path has another).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Position {
    pub offset: u64,
    pub ino: Option<u64>,
}

/// The position kept at `path` (`<offset> <inode>`; a bare offset from before inodes were
/// kept). Absent is the start; unreadable too (a re-send from the start, which the sinks
/// tolerate, rather than a gap).
pub(super) fn read_position(path: &Path) -> Position {
    let Ok(s) = std::fs::read_to_string(path) else {
        return Position::default();
    };
    let mut parts = s.split_ascii_whitespace();
    let offset = parts.next().and_then(|o| o.parse().ok());
    let ino = parts.next().and_then(|i| i.parse().ok());
    match offset {
        Some(offset) => Position { offset, ino },
        None => {
            warn!(
                "audit: {} unreadable; the file is sent again from the start",
                path.display()
            );
            Position::default()
        }
    }
}

/// Replaces the position at `path` durably: a temporary file, synced, renamed, the directory
/// synced.
pub(super) fn write_position(path: &Path, pos: Position) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = File::create(&tmp)?;
    match pos.ino {
        Some(ino) => writeln!(f, "{} {ino}", pos.offset)?,
        None => writeln!(f, "{}", pos.offset)?,
    }
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// The trail as a sink reads it. The file being read stays open, so one moved aside (log
/// rotation: `mv`, logrotate without `copytruncate`) is read to its end before the new file at
/// the path is taken from its start; a file rotated while the gateway was down is found again
/// by its inode in the same directory. A file that got shorter (truncated in place) is read
/// again from its start, said loudly.
pub(super) struct Follow {
    path: PathBuf,
    sink: &'static str,
    held: Option<(File, u64)>,
    pub pos: Position,
    /// Take a new file at the path only once it was seen there at two looks: a writer that
    /// opened the old file just before the move finishes its batch there first. Not needed
    /// when the writer and the sink take turns on one thread.
    settle: bool,
    seen_new: Option<u64>,
}

impl Follow {
    pub(super) fn new(path: &Path, sink: &'static str, pos: Position, settle: bool) -> Follow {
        Follow {
            path: path.to_path_buf(),
            sink,
            held: None,
            pos,
            settle,
            seen_new: None,
        }
    }

    /// Looks at the trail (rotation, truncation) and gives the length of the file to read
    /// from `pos.offset` on; `None` when there is none yet (or it cannot be read: said).
    pub(super) fn look(&mut self) -> Option<u64> {
        let at_path = std::fs::metadata(&self.path).ok().map(|m| m.ino());
        if self.held.is_none() {
            self.held = self.open(at_path?);
        }
        let (f, ino) = self.held.as_ref()?;
        let ino = *ino;
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.pos.offset {
            error!(
                "audit: {} is shorter ({len} bytes) than what the {} took ({}): truncated? sending it from the start",
                self.path.display(),
                self.sink,
                self.pos.offset
            );
            self.pos.offset = 0;
        }
        let rotated = at_path.filter(|p| *p != ino);
        if let (Some(new), true) = (rotated, self.pos.offset >= len) {
            // The old file is read to its end: the new one is next.
            if !self.settle || self.seen_new == Some(new) {
                info!(
                    "audit: {}: {} was moved aside (rotated) and read to its end; the new file is taken from its start",
                    self.sink,
                    self.path.display()
                );
                self.seen_new = None;
                self.pos = Position::default();
                self.held = self.open(new);
            } else {
                self.seen_new = Some(new);
            }
        }
        let (f, _) = self.held.as_ref()?;
        f.metadata().map(|m| m.len()).ok()
    }

    /// Whole lines of the file `look` chose, from `pos.offset` up to `len` (see `read_lines`).
    pub(super) fn read(
        &mut self,
        len: u64,
        want: usize,
        buf: &mut Vec<u8>,
    ) -> std::io::Result<Option<usize>> {
        match self.held.as_mut() {
            Some((f, _)) => read_lines(f, self.pos.offset, len, want, buf),
            None => Ok(None),
        }
    }

    /// Opens what to read: the file the position names (at the path, or moved aside in the
    /// same directory), else the file at the path from its start.
    fn open(&mut self, at_path: u64) -> Option<(File, u64)> {
        let want = self.pos.ino.unwrap_or(at_path);
        let found = if want == at_path {
            Some(self.path.clone())
        } else {
            self.moved_aside(want)
        };
        let path = match found {
            Some(p) => {
                if p != self.path {
                    info!(
                        "audit: {}: continuing in {} (the file it was reading, moved aside) before {}",
                        self.sink,
                        p.display(),
                        self.path.display()
                    );
                }
                p
            }
            None => {
                warn!(
                    "audit: {}: the file it was reading is no longer in {} (rotated and removed while the gateway was not running?): its lines after byte {} were not sent by this sink; {} is taken from its start",
                    self.sink,
                    self.path.parent().unwrap_or(Path::new("/")).display(),
                    self.pos.offset,
                    self.path.display()
                );
                self.pos = Position::default();
                self.path.clone()
            }
        };
        match File::open(&path).and_then(|f| f.metadata().map(|m| (f, m.ino()))) {
            Ok((f, ino)) => {
                self.pos.ino = Some(ino);
                Some((f, ino))
            }
            Err(e) => {
                error!("audit: {} reading {}: {e}", self.sink, path.display());
                None
            }
        }
    }

    /// The file of inode `ino` in the trail's directory, if it is still there.
    fn moved_aside(&self, ino: u64) -> Option<PathBuf> {
        let dir = self.path.parent()?;
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .find(|e| e.metadata().is_ok_and(|m| m.is_file() && m.ino() == ino))
            .map(|e| e.path())
    }
}

/// Reads about `want` bytes of `f` from `from` (more when one line is longer), up to `len`,
/// into `buf`, and returns where its complete lines end (the last newline). `None`: no
/// complete line there (a torn last write is not a line yet).
pub(super) fn read_lines(
    f: &mut File,
    from: u64,
    len: u64,
    want: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<usize>> {
    let left = len.saturating_sub(from);
    let mut want = want.max(1);
    loop {
        let n = left.min(want as u64) as usize;
        buf.resize(n, 0);
        f.seek(SeekFrom::Start(from))?;
        f.read_exact(buf)?;
        match buf.iter().rposition(|&b| b == b'\n') {
            Some(end) => return Ok(Some(end)),
            None if n as u64 == left => return Ok(None),
            None => want *= 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_whole_and_a_long_one_grows_the_read() {
        let dir = std::env::temp_dir().join(format!("fgw-follow-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, b"aa\nbbbbbbbbbb\ncc").unwrap();
        let mut f = File::open(&p).unwrap();
        let mut buf = Vec::new();
        // 4 bytes hold "aa\nb": the lines end at 2.
        assert_eq!(read_lines(&mut f, 0, 16, 4, &mut buf).unwrap(), Some(2));
        // From "bbbb…", 4 bytes hold no newline: the read grows to the whole line.
        assert_eq!(read_lines(&mut f, 3, 16, 4, &mut buf).unwrap(), Some(10));
        assert_eq!(&buf[..10], b"bbbbbbbbbb");
        // "cc" has no newline yet: torn.
        assert_eq!(read_lines(&mut f, 14, 16, 4, &mut buf).unwrap(), None);

        let off = dir.join("off");
        assert_eq!(read_position(&off), Position::default());
        let p = Position {
            offset: 1234,
            ino: Some(99),
        };
        write_position(&off, p).unwrap();
        assert_eq!(read_position(&off), p);
        // Before inodes were kept: the offset alone.
        std::fs::write(&off, "77\n").unwrap();
        assert_eq!(read_position(&off).offset, 77);
        assert_eq!(read_position(&off).ino, None);
        std::fs::write(&off, "garbage").unwrap();
        assert_eq!(read_position(&off), Position::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
mod rotation {
    use super::*;

    /// Reads every whole line `f` has now, advancing its position.
    fn drain(f: &mut Follow) -> Vec<String> {
        let mut out = Vec::new();
        let Some(len) = f.look() else { return out };
        let mut buf = Vec::new();
        while let Ok(Some(end)) = f.read(len, 1024, &mut buf) {
            for l in buf[..end].split(|&b| b == b'\n') {
                out.push(String::from_utf8_lossy(l).into_owned());
            }
            f.pos.offset += end as u64 + 1;
            if f.pos.offset >= len {
                break;
            }
        }
        out
    }

    fn append(p: &Path, s: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap();
        f.write_all(s.as_bytes()).unwrap();
    }

    #[test]
    fn a_rotated_file_is_read_to_its_end_then_the_new_one_from_its_start() {
        let dir = std::env::temp_dir().join(format!("fgw-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let trail = dir.join("audit.jsonl");
        append(&trail, "a1\na2\n");
        let mut f = Follow::new(&trail, "test", Position::default(), false);
        assert_eq!(drain(&mut f), ["a1", "a2"]);
        // A batch lands in the old file, then it is moved aside and a new one starts.
        append(&trail, "a3\n");
        std::fs::rename(&trail, dir.join("audit.jsonl.1")).unwrap();
        append(&trail, "b1\n");
        assert_eq!(drain(&mut f), ["a3"], "the old file first, to its end");
        assert_eq!(drain(&mut f), ["b1"], "then the new one from its start");
        let at_b1 = f.pos;

        // Settling (a sink on its own thread): the new file is taken at the second look.
        append(&trail, "b2\n");
        std::fs::rename(&trail, dir.join("audit.jsonl.2")).unwrap();
        append(&trail, "c1\n");
        let mut g = Follow::new(&trail, "test", at_b1, true);
        assert_eq!(
            drain(&mut g),
            ["b2"],
            "after a restart, the file the position names is found moved aside by its inode"
        );
        assert_eq!(drain(&mut g), Vec::<String>::new(), "first look: waits");
        assert_eq!(drain(&mut g), ["c1"], "second look: the new file");

        // Truncated in place: read again from the start.
        std::fs::write(&trail, "").unwrap();
        append(&trail, "d\n");
        assert_eq!(drain(&mut g), ["d"]);

        // The file the position names is gone: the one at the path, from its start.
        let gone = Position {
            offset: 99,
            ino: Some(u64::MAX),
        };
        let mut h = Follow::new(&trail, "test", gone, false);
        assert_eq!(drain(&mut h), ["d"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
