//! A spool record's payload: the enqueue time, the correlation id, then the event JSON.

use super::queue::Queued;

/// The spool payload: the enqueue time (for the delivery latency), the correlation id (a Kafka
/// header, without parsing the event again), then the event.
pub(super) fn encode(q: &Queued) -> Vec<u8> {
    let cid = &q.correlation_id.as_bytes()[..q.correlation_id.len().min(u16::MAX as usize)];
    let mut out = Vec::with_capacity(10 + cid.len() + q.json.len());
    out.extend(now_ms().to_be_bytes());
    out.extend((cid.len() as u16).to_be_bytes());
    out.extend(cid);
    out.extend(&q.json);
    out
}

/// A payload that is not an event (an audit line): the enqueue time, an empty correlation id,
/// then `value` as is.
pub(crate) fn encode_raw(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + value.len());
    out.extend(now_ms().to_be_bytes());
    out.extend(0u16.to_be_bytes());
    out.extend(value);
    out
}

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// (enqueue time, correlation id, event JSON).
pub(crate) fn decode(payload: &[u8]) -> (u64, &[u8], &[u8]) {
    if payload.len() < 10 {
        return (0, b"", payload);
    }
    let t = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
    let n = u16::from_be_bytes(payload[8..10].try_into().expect("2 bytes")) as usize;
    match payload.get(10 + n) {
        Some(b'{') => (t, &payload[10..10 + n], &payload[10 + n..]),
        // An entry spooled before the correlation id was stored: time, then the event.
        _ => (t, b"", &payload[8..]),
    }
}

/// Seconds from `t` (ms since the epoch) to `now` (the same).
pub(super) fn seconds_between(t: u64, now: u64) -> f64 {
    now.saturating_sub(t) as f64 / 1000.0
}
