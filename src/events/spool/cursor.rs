//! The cursor file `ack`: the first sequence number not yet delivered, with its crc32, replaced
//! atomically.

use super::frame::{crc32, invalid};
use super::segment::sync_dir;
use super::{CURSOR, CURSOR_TMP};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::Path;

pub(super) fn read_cursor(dir: &Path) -> io::Result<Option<u64>> {
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

pub(super) fn write_cursor(dir: &Path, first_pending: u64, durable: bool) -> io::Result<()> {
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
