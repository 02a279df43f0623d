//! What the sinks share to follow the audit file: a durable byte offset ("sent up to here") and
//! reading whole lines from it. The file is the source of truth; a sink only ever moves its
//! offset past lines it has handed on, so a crash re-sends and never skips.

use log::{error, warn};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// The offset kept at `path`; absent is 0, and so is unreadable (a re-send from the start,
/// which the sinks tolerate, rather than a gap).
pub(super) fn read_offset(path: &Path) -> u64 {
    match std::fs::read_to_string(path) {
        Ok(s) => s.trim().parse().unwrap_or_else(|_| {
            warn!(
                "audit: {} unreadable; the file is sent again from the start",
                path.display()
            );
            0
        }),
        Err(_) => 0,
    }
}

/// Replaces the offset at `path` durably: a temporary file, synced, renamed, the directory
/// synced.
pub(super) fn write_offset(path: &Path, offset: u64) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut f = File::create(&tmp)?;
    writeln!(f, "{offset}")?;
    f.sync_data()?;
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// Opens the file to read from `*offset` on, with its length. A file shorter than the offset
/// was replaced or truncated: it is sent again from the start (said loudly). `None`: no file
/// yet, or it cannot be read (said).
pub(super) fn open_at(file: &Path, offset: &mut u64, sink: &str) -> Option<(File, u64)> {
    let f = match File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            error!("audit: {sink} reading {}: {e}", file.display());
            return None;
        }
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len < *offset {
        error!(
            "audit: {} is shorter ({len} bytes) than what the {sink} took ({offset}): replaced or truncated? sending it from the start",
            file.display()
        );
        *offset = 0;
    }
    Some((f, len))
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
        assert_eq!(read_offset(&off), 0);
        write_offset(&off, 1234).unwrap();
        assert_eq!(read_offset(&off), 1234);
        std::fs::write(&off, "garbage").unwrap();
        assert_eq!(read_offset(&off), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
