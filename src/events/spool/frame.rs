//! Bytes on disk: the CRC-32 and the record frame (`u32 len | u32 crc32 | u64 seq | u32 key_len |
//! key | payload`, little-endian).

use super::{Record, FIXED, HEADER};
use std::io;

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

pub(super) fn frame_len(r: &Record) -> u64 {
    HEADER + FIXED + r.key.len() as u64 + r.payload.len() as u64
}

pub(super) fn encode(seq: u64, r: &Record) -> Vec<u8> {
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
