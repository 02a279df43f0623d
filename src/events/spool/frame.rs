//! Bytes on disk: the CRC-32 and the record frame (`u32 len | u32 crc32 | u64 seq | u32 key_len |
//! key | payload`, little-endian).

use super::{Record, FIXED, HEADER};
use std::io;

/// CRC-32 (IEEE 802.3), the checksum of frames and the cursor: crc32fast's, which uses the
/// CPU's carry-less multiply (a byte-at-a-time table cost about 2 µs per KiB, paid twice per
/// event: on append and on read-back).
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

// ---------------------------------------------------------------------------------------------
// Frames.

pub(super) fn frame_len(r: &Record) -> u64 {
    HEADER + FIXED + r.key.len() as u64 + r.payload.len() as u64
}

/// Appends `r`'s frame to `buf`.
pub(super) fn encode_into(buf: &mut Vec<u8>, seq: u64, r: &Record) {
    let body = FIXED as usize + r.key.len() + r.payload.len();
    let start = buf.len();
    buf.reserve(HEADER as usize + body);
    buf.extend_from_slice(&(body as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&(r.key.len() as u32).to_le_bytes());
    buf.extend_from_slice(r.key.as_bytes());
    buf.extend_from_slice(&r.payload);
    let crc = crc32(&buf[start + HEADER as usize..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

#[cfg(test)]
pub(super) fn encode(seq: u64, r: &Record) -> Vec<u8> {
    let mut v = Vec::new();
    encode_into(&mut v, seq, r);
    v
}

/// Checks a frame body against its crc; returns (seq, record).
pub(super) fn decode_body(crc: u32, body: &[u8]) -> Result<(u64, Record), &'static str> {
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

pub(super) fn header(h: &[u8; 8]) -> (u32, u32) {
    (
        u32::from_le_bytes([h[0], h[1], h[2], h[3]]),
        u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
    )
}

pub(super) fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}
