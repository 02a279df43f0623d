//! Segment files `<first seq, 20 digits>.seg`: their names, the scan that verifies their frames
//! on opening, and the `*.corrupt` names damaged files are set aside under.

use super::frame::{decode_body, header};
use super::{FIXED, HEADER, MAX_RECORD_BYTES, SEGMENT_EXT};
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub(super) struct Segment {
    pub(super) first: u64,
    pub(super) path: PathBuf,
    /// Byte offset of each record.
    pub(super) offsets: Vec<u64>,
    pub(super) size: u64,
}

impl Segment {
    /// One past the last sequence number.
    pub(super) fn end(&self) -> u64 {
        self.first + self.offsets.len() as u64
    }
}

pub(super) fn segment_name(first: u64) -> String {
    format!("{first:020}.{SEGMENT_EXT}")
}

pub(super) fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".seg")?;
    (stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()))
        .then(|| stem.parse().ok())
        .flatten()
}

#[cfg(unix)]
pub(super) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
pub(super) fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// A free `<path>.corrupt[.n]` name.
pub(super) fn quarantine_name(path: &Path) -> PathBuf {
    let base = format!("{}.corrupt", path.display());
    let mut p = PathBuf::from(&base);
    let mut n = 1;
    while p.exists() {
        p = PathBuf::from(format!("{base}.{n}"));
        n += 1;
    }
    p
}

/// What scanning a segment found.
pub(super) enum Scan {
    /// Every frame good to the end of the file.
    Clean,
    /// A bad frame at `offset` that reaches the end of the file (or is followed by zeros only).
    Torn { offset: u64, why: String },
    /// A bad frame at `offset` with data after it.
    Corrupt { offset: u64, why: String },
}

/// Verifies every frame of a segment; fills `seg.offsets` and `seg.size` with the good prefix.
pub(super) fn scan(seg: &mut Segment) -> io::Result<Scan> {
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
