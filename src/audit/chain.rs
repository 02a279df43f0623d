//! The hash chain and its signed checkpoints: each line carries the SHA-256 of the line before
//! it (per instance), so an edited, deleted or moved line breaks the chain; every so often a
//! checkpoint line carries an HMAC over the chain so far, so the chain cannot be rebuilt after
//! an edit without the key.

use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::sign::Signer;
use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// `prev` of an instance's first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const CONTEXT: &[u8] = b"fhir-gateway audit checkpoint v1\n";

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// The hash a following line names as `prev`: SHA-256 of the line's bytes (no newline).
pub fn line_hash(line: &[u8]) -> String {
    // The hasher, not the one-shot `sha256()`: OpenSSL 3 looks the algorithm up on every
    // one-shot call, a fifth of the hash's cost for an audit line.
    let mut h = openssl::sha::Sha256::new();
    h.update(line);
    hex(&h.finish())
}

/// The checkpoint signature: binds the instance, the position and the whole chain before it.
pub fn checkpoint_mac(key: &[u8], instance: &str, seq: u64, prev: &str) -> Option<String> {
    let key = PKey::hmac(key).ok()?;
    mac_with(&key, instance, seq, prev)
}

fn mac_with(key: &PKey<Private>, instance: &str, seq: u64, prev: &str) -> Option<String> {
    let mut s = Signer::new(MessageDigest::sha256(), key).ok()?;
    s.update(CONTEXT).ok()?;
    s.update(instance.as_bytes()).ok()?;
    s.update(b"\n").ok()?;
    s.update(&seq.to_be_bytes()).ok()?;
    s.update(prev.as_bytes()).ok()?;
    s.sign_to_vec().ok().map(|m| hex(&m))
}

/// One instance's chain, as the writer extends it.
pub struct Chain {
    pub instance: String,
    /// The seq of the last line written (`None`: nothing yet).
    pub seq: Option<u64>,
    pub prev: String,
    key: PKey<Private>,
    /// Records since the last checkpoint.
    pub unsigned: u64,
}

impl Chain {
    pub fn new(instance: String, key: &[u8]) -> Result<Chain, String> {
        Ok(Chain {
            instance,
            seq: None,
            prev: GENESIS.to_string(),
            key: PKey::hmac(key).map_err(|e| format!("audit key: {e}"))?,
            unsigned: 0,
        })
    }

    /// Continues after the last complete line of `file`, if it has one.
    pub fn resume(&mut self, file: &Path) -> std::io::Result<()> {
        let Some(last) = last_line(file)? else {
            return Ok(());
        };
        if let Ok(v) = serde_json::from_slice::<Value>(&last) {
            self.seq = v.get("seq").and_then(Value::as_u64);
        }
        self.prev = line_hash(&last);
        Ok(())
    }

    fn next_seq(&mut self) -> u64 {
        let s = self.seq.map_or(0, |s| s + 1);
        self.seq = Some(s);
        s
    }

    fn push(&mut self, line: Value, out: &mut Vec<u8>) {
        let start = out.len();
        // A Value always serialises.
        let _ = serde_json::to_writer(&mut *out, &line);
        self.prev = line_hash(&out[start..]);
        out.push(b'\n');
    }

    /// Appends one record line to `out`.
    pub fn record(&mut self, event: Value, out: &mut Vec<u8>) {
        let raw = serde_json::to_vec(&event).unwrap_or_default();
        self.record_raw(|o| o.extend_from_slice(&raw), out);
    }

    /// Appends one record line whose event `write` serialises straight into `out`.
    pub fn record_raw(&mut self, write: impl FnOnce(&mut Vec<u8>), out: &mut Vec<u8>) {
        let seq = self.next_seq();
        let start = out.len();
        out.extend_from_slice(b"{\"seq\":");
        out.extend_from_slice(seq.to_string().as_bytes());
        out.extend_from_slice(b",\"instance\":");
        let _ = serde_json::to_writer(&mut *out, &self.instance);
        out.extend_from_slice(b",\"prev\":\"");
        out.extend_from_slice(self.prev.as_bytes());
        out.extend_from_slice(b"\",\"event\":");
        write(out);
        out.push(b'}');
        self.prev = line_hash(&out[start..]);
        out.push(b'\n');
        self.unsigned += 1;
    }

    /// Appends a signed checkpoint line to `out`.
    pub fn checkpoint(&mut self, reason: &str, at: &str, out: &mut Vec<u8>) {
        let seq = self.next_seq();
        let mac = mac_with(&self.key, &self.instance, seq, &self.prev).unwrap_or_default();
        let line = json!({"seq": seq, "instance": self.instance, "prev": self.prev,
            "checkpoint": {"reason": reason, "at": at, "records": self.unsigned}, "mac": mac});
        self.unsigned = 0;
        self.push(line, out);
    }
}

/// The last line of `file` that ends with a newline (a torn last write is not a line).
fn last_line(file: &Path) -> std::io::Result<Option<Vec<u8>>> {
    let mut f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let len = f.metadata()?.len();
    let mut window = 64 * 1024u64;
    loop {
        let from = len.saturating_sub(window);
        f.seek(SeekFrom::Start(from))?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail)?;
        let end = match tail.iter().rposition(|&b| b == b'\n') {
            Some(e) => e,
            None if from == 0 => return Ok(None),
            None => {
                window *= 4;
                continue;
            }
        };
        match tail[..end].iter().rposition(|&b| b == b'\n') {
            Some(s) => return Ok(Some(tail[s + 1..end].to_vec())),
            None if from == 0 => return Ok(Some(tail[..end].to_vec())),
            None => window *= 4,
        }
    }
}
