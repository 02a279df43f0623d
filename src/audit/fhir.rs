//! `audit.fhir`: the trail's AuditEvents as resources on the FHIR server the gateway fronts, in
//! `batch` Bundles.
//!
//! Like the Kafka sink it follows the file, the source of truth, from a durable byte offset
//! (`audit.fhir.cursor`) that moves only past lines the server took (or refused for good). Each
//! record becomes `PUT AuditEvent/fgw-<instance>-<seq>` with the line's event as it is, only
//! its `id` added: a re-sent batch (a crash before the cursor moved, a batch half taken) lands
//! on the same resources instead of adding copies. Checkpoint lines are not AuditEvents and are
//! passed over; the file (and `audit verify`) keeps the chain.
//!
//! The calls take the gateway's one road to the FHIR server (`GatewayFhirClient`: the pooled
//! connector, TLS, timeouts, the service identity), with the proxy's own audit header and a
//! correlation id of their own.

use super::chain::hex;
use super::follow::{read_position, write_position, Follow};
use crate::config::AuditFhirSink;
use crate::gateway::Gateway;
use crate::upstream::client::{CallIdentity, GatewayFhirClient};
use async_trait::async_trait;
use fhir_gateway_modules::processor::ClientRequest;
use log::{error, info, warn};
use once_cell::sync::Lazy;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use prometheus::{register_int_counter_vec, register_int_gauge, IntCounterVec, IntGauge};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

static STAGE: Lazy<IntCounterVec> = Lazy::new(|| {
    register_int_counter_vec!(
        "fhirgw_audit_fhir_total",
        "Audit records on their way to the FHIR server by stage: sent (the server took it; a re-sent one counts again), rejected (the server refused it for good: it stays in the file only), unreadable (a line that is no record), failed (a batch that must be sent again)",
        &["stage"]
    )
    .expect("metric registers once")
});

static UNSENT: Lazy<IntGauge> = Lazy::new(|| {
    register_int_gauge!(
        "fhirgw_audit_fhir_unsent_bytes",
        "Bytes of the audit file not yet sent to the FHIR server"
    )
    .expect("metric registers once")
});

/// Read from the file per round; grows for a longer line.
const CHUNK: usize = 1 << 20;
/// The longest wait after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The resource id of record `seq` of `instance`: `fgw-<instance>-<seq>`, or with 16 hex
/// digits of the instance's SHA-256 when its name is no FHIR id (`_`) or too long for one.
pub fn resource_id(instance: &str, seq: u64) -> String {
    let fits = !instance.is_empty()
        && instance.len() <= 38
        && instance
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if fits {
        format!("fgw-{instance}-{seq}")
    } else {
        let mut h = openssl::sha::Sha256::new();
        h.update(instance.as_bytes());
        format!("fgw-{}-{seq}", &hex(&h.finish())[..16])
    }
}

/// A line of the file, as far as this sink reads it.
#[derive(Deserialize)]
struct Line<'a> {
    seq: u64,
    #[serde(borrow)]
    instance: Cow<'a, str>,
    /// Absent on checkpoint lines.
    #[serde(borrow, default)]
    event: Option<&'a RawValue>,
}

/// One Bundle and where its entries' lines are in the file.
struct Batch {
    body: Vec<u8>,
    /// Per entry: where its line starts, and its seq (for the log).
    entries: Vec<(u64, u64)>,
    /// Where the lines looked at end (checkpoints after the last entry included).
    end: u64,
}

/// Builds the next Bundle from `buf` (complete lines of the file from `from`), at most
/// `max` entries.
fn build(buf: &[u8], from: u64, max: usize) -> Batch {
    let mut body = Vec::with_capacity(buf.len().min(max * 4096) + 256);
    body.extend_from_slice(br#"{"resourceType":"Bundle","type":"batch","entry":["#);
    let mut entries = Vec::new();
    let mut at = from;
    for line in buf.split(|&b| b == b'\n') {
        if entries.len() == max {
            break;
        }
        let start = at;
        at += line.len() as u64 + 1;
        if line.is_empty() {
            continue;
        }
        let l = match serde_json::from_slice::<Line>(line) {
            Ok(l) => l,
            Err(e) => {
                STAGE.with_label_values(&["unreadable"]).inc();
                error!("audit: FHIR sink: the line at byte {start} is no record ({e}); not sent");
                continue;
            }
        };
        let Some(event) = l.event.map(RawValue::get) else {
            continue; // a checkpoint
        };
        let Some(rest) = event.strip_prefix('{') else {
            STAGE.with_label_values(&["unreadable"]).inc();
            error!(
                "audit: FHIR sink: record {} holds no object; not sent",
                l.seq
            );
            continue;
        };
        let id = resource_id(&l.instance, l.seq);
        if !entries.is_empty() {
            body.push(b',');
        }
        // The event as written, its id first: the only change.
        body.extend_from_slice(br#"{"resource":{"id":""#);
        body.extend_from_slice(id.as_bytes());
        body.extend_from_slice(b"\"");
        if !rest.trim_start().starts_with('}') {
            body.push(b',');
        }
        body.extend_from_slice(rest.as_bytes());
        body.extend_from_slice(br#","request":{"method":"PUT","url":"AuditEvent/"#);
        body.extend_from_slice(id.as_bytes());
        body.extend_from_slice(b"\"}}");
        entries.push((start, l.seq));
    }
    body.extend_from_slice(b"]}");
    // Lines after the last entry that are not entries (checkpoints) are passed too; a full
    // batch stops right after its last entry.
    Batch {
        body,
        entries,
        end: at.min(from + buf.len() as u64 + 1),
    }
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    entry: Vec<AnswerEntry>,
}

#[derive(Deserialize)]
struct AnswerEntry {
    response: Option<EntryResponse>,
}

#[derive(Deserialize)]
struct EntryResponse {
    status: String,
}

/// What became of one entry.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    Taken,
    /// Refused for good (a 4xx other than 408/429): sending it again would not help.
    Refused(u16),
    /// Send again (a 5xx, 408, 429, or no status).
    Again,
}

fn fate(status: Option<&str>) -> Fate {
    let code = status
        .and_then(|s| s.split_ascii_whitespace().next())
        .and_then(|c| c.parse::<u16>().ok());
    match code {
        Some(200..=299) => Fate::Taken,
        Some(c @ 400..=499) if c != 408 && c != 429 => Fate::Refused(c),
        _ => Fate::Again,
    }
}

/// Where the cursor may move after `batch` got `fates` (in entry order): past every entry up
/// to the first one to send again; past everything when none is.
fn advance(batch: &Batch, fates: &[Fate]) -> u64 {
    match fates.iter().position(|f| *f == Fate::Again) {
        Some(i) => batch.entries[i].0,
        None => batch.end,
    }
}

pub struct FhirSinkTask {
    pub gateway: Arc<Gateway>,
}

struct Sink {
    gw: Arc<Gateway>,
    cfg: AuditFhirSink,
    /// How far into the trail the server took it.
    follow: Follow,
}

/// One round's result.
enum Round {
    /// Nothing more to send now.
    Idle,
    /// The file holds more after what this round sent: go on at once.
    More,
    Failed,
}

#[async_trait]
impl BackgroundService for FhirSinkTask {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let gw = self.gateway.clone();
        let Some(trail) = gw.trail.as_ref() else {
            return;
        };
        let Some(cfg) = trail.fhir.clone() else {
            return;
        };
        let file = trail.file.clone();
        // One process sends at a time (an upgrade runs two for a while).
        let mut lock_path = cfg.cursor.as_os_str().to_owned();
        lock_path.push(".lock");
        let mut said = false;
        let _lock = loop {
            match crate::events::try_lock(Path::new(&lock_path)) {
                Ok(Some(l)) => break l,
                Ok(None) if !said => {
                    info!("audit: FHIR sink: another process holds {lock_path:?} (an upgrade?); waiting");
                    said = true;
                }
                Err(e) if !said => {
                    error!("audit: FHIR sink: {lock_path:?}: {e}; records wait in the file");
                    said = true;
                }
                _ => {}
            }
            tokio::select! {
                _ = tokio::time::sleep(cfg.interval) => {}
                _ = shutdown.changed() => return,
            }
        };
        let sent = read_position(&cfg.cursor);
        info!(
            "audit: FHIR sink: sending AuditEvents of {} from byte {} to {}",
            file.display(),
            sent.offset,
            gw.upstream.base.as_string()
        );
        // Its own task: a batch the writer began before a rotation may still be landing in
        // the old file when the new one appears, so the switch waits one more look.
        let follow = Follow::new(&file, "FHIR sink", sent, true);
        let mut sink = Sink { gw, cfg, follow };
        let mut wait = sink.cfg.interval;
        loop {
            let pause = match sink.round().await {
                Round::More => Duration::ZERO,
                Round::Idle => {
                    wait = sink.cfg.interval;
                    wait
                }
                Round::Failed => {
                    wait = (wait * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

impl Sink {
    async fn round(&mut self) -> Round {
        let Some(len) = self.follow.look() else {
            return Round::Idle;
        };
        let from = self.follow.pos.offset;
        UNSENT.set(len.saturating_sub(from) as i64);
        if from >= len {
            return Round::Idle;
        }
        let mut buf = Vec::new();
        let want = CHUNK.max(self.cfg.batch * 8192);
        let end = match self.follow.read(len, want, &mut buf) {
            Ok(Some(end)) => end,
            Ok(None) => return Round::Idle,
            Err(e) => {
                error!("audit: FHIR sink reading the trail: {e}");
                return Round::Failed;
            }
        };
        let mut batch = build(&buf[..end], from, self.cfg.batch);
        let fates = if batch.entries.is_empty() {
            Vec::new()
        } else {
            let body = std::mem::take(&mut batch.body);
            match self.send(body, batch.entries.len()).await {
                Ok(f) => f,
                Err(e) => {
                    STAGE.with_label_values(&["failed"]).inc();
                    warn!(
                        "audit: FHIR sink: a batch of {} AuditEvent(s) from record {} failed ({e}); sent again later",
                        batch.entries.len(),
                        batch.entries[0].1
                    );
                    return Round::Failed;
                }
            }
        };
        let mut again = false;
        for (fate, (_, seq)) in fates.iter().zip(&batch.entries) {
            match fate {
                Fate::Taken if !again => STAGE.with_label_values(&["sent"]).inc(),
                Fate::Refused(c) if !again => {
                    STAGE.with_label_values(&["rejected"]).inc();
                    error!("audit: FHIR sink: the server refused record {seq} ({c}); it stays in the file only");
                }
                Fate::Again => again = true,
                _ => {}
            }
        }
        if again {
            STAGE.with_label_values(&["failed"]).inc();
        }
        let to = advance(&batch, &fates);
        if to != from {
            self.follow.pos.offset = to;
            if let Err(e) = write_position(&self.cfg.cursor, self.follow.pos) {
                error!(
                    "audit: FHIR sink: {}: {e} (records may be sent again)",
                    self.cfg.cursor.display()
                );
            }
        }
        UNSENT.set(len.saturating_sub(to) as i64);
        if again {
            Round::Failed
        } else if to < len {
            Round::More
        } else {
            Round::Idle
        }
    }

    /// Sends one Bundle; the fate of each entry, in order.
    async fn send(&self, body: Vec<u8>, n: usize) -> Result<Vec<Fate>, String> {
        let gw = &self.gw;
        let service_auth = gw
            .identity
            .authorization()
            .await
            .map_err(|e| e.to_string())?;
        let correlation = format!("audit-fhir-{}", uuid::Uuid::new_v4());
        let client = GatewayFhirClient {
            gw: gw.clone(),
            call: CallIdentity {
                service_auth,
                // The gateway acts for itself: only the proxy's audit header.
                audit: vec![(gw.audit[4].clone(), gw.name_header.clone())],
                correlation_header: http::HeaderValue::from_str(&correlation)
                    .map_err(|e| e.to_string())?,
                public_base: gw.upstream.base.as_string().into(),
                filtered: false,
            },
        };
        let fetched = client
            .call(ClientRequest {
                method: "POST".into(),
                path_and_query: String::new(),
                headers: vec![
                    ("content-type".into(), "application/fhir+json".into()),
                    ("accept".into(), "application/fhir+json".into()),
                    ("prefer".into(), "return=minimal".into()),
                ],
                body: Some(body),
            })
            .await
            .map_err(|e| e.to_string())?;
        if fetched.status != 200 {
            let text =
                String::from_utf8_lossy(&fetched.body[..fetched.body.len().min(300)]).into_owned();
            return Err(format!("{} {text}", fetched.status));
        }
        let answer: Answer = serde_json::from_slice(&fetched.body)
            .map_err(|e| format!("the batch-response is not one: {e}"))?;
        if answer.entry.len() != n {
            return Err(format!(
                "the batch-response has {} entries for {n}",
                answer.entry.len()
            ));
        }
        Ok(answer
            .entry
            .iter()
            .map(|e| fate(e.response.as_ref().map(|r| r.status.as_str())))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const LINES: &str = concat!(
        r#"{"seq":0,"instance":"gw-1","prev":"0","checkpoint":{"reason":"start"},"mac":"m"}"#,
        "\n",
        r#"{"seq":1,"instance":"gw-1","prev":"a","event":{"resourceType":"AuditEvent","outcome":"0","x":37.20}}"#,
        "\n",
        r#"{"seq":2,"instance":"gw-1","prev":"b","event":{"resourceType":"AuditEvent","outcome":"4"}}"#,
        "\n",
        "not json\n",
        r#"{"seq":3,"instance":"gw-1","prev":"c","checkpoint":{"reason":"count"},"mac":"m"}"#,
        "\n",
    );

    #[test]
    fn a_bundle_puts_each_event_as_written_with_its_id_and_passes_checkpoints() {
        let buf = LINES.trim_end_matches('\n').as_bytes();
        let b = build(buf, 100, 10);
        let v: Value = serde_json::from_slice(&b.body).unwrap();
        assert_eq!(v["type"], "batch");
        let e = v["entry"].as_array().unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0]["request"]["url"], "AuditEvent/fgw-gw-1-1");
        assert_eq!(e[0]["request"]["method"], "PUT");
        assert_eq!(e[0]["resource"]["id"], "fgw-gw-1-1");
        assert_eq!(e[1]["resource"]["outcome"], "4");
        // The event's bytes as written: the decimal keeps its text.
        assert!(std::str::from_utf8(&b.body)
            .unwrap()
            .contains(r#"{"resource":{"id":"fgw-gw-1-1","resourceType":"AuditEvent","outcome":"0","x":37.20},"request""#));
        let first = LINES.find("{\"seq\":1").unwrap() as u64 + 100;
        let second = LINES.find("{\"seq\":2").unwrap() as u64 + 100;
        assert_eq!(b.entries, vec![(first, 1), (second, 2)]);
        // Every line looked at is passed, the last checkpoint too.
        assert_eq!(b.end, 100 + LINES.len() as u64);
    }

    #[test]
    fn a_full_batch_stops_after_its_last_entry() {
        let buf = LINES.trim_end_matches('\n').as_bytes();
        let b = build(buf, 0, 1);
        assert_eq!(b.entries.len(), 1);
        assert_eq!(b.end, LINES.find("{\"seq\":2").unwrap() as u64);
    }

    #[test]
    fn the_cursor_stops_at_the_first_entry_to_send_again() {
        let buf = LINES.trim_end_matches('\n').as_bytes();
        let b = build(buf, 0, 10);
        assert_eq!(advance(&b, &[Fate::Taken, Fate::Taken]), b.end);
        assert_eq!(advance(&b, &[Fate::Refused(400), Fate::Taken]), b.end);
        assert_eq!(advance(&b, &[Fate::Taken, Fate::Again]), b.entries[1].0);
        assert_eq!(advance(&b, &[Fate::Again, Fate::Taken]), b.entries[0].0);
    }

    #[test]
    fn fates_of_statuses() {
        assert_eq!(fate(Some("201 Created")), Fate::Taken);
        assert_eq!(fate(Some("200")), Fate::Taken);
        assert_eq!(fate(Some("400 Bad Request")), Fate::Refused(400));
        assert_eq!(fate(Some("422")), Fate::Refused(422));
        assert_eq!(fate(Some("429 Too Many Requests")), Fate::Again);
        assert_eq!(fate(Some("408")), Fate::Again);
        assert_eq!(fate(Some("503")), Fate::Again);
        assert_eq!(fate(Some("")), Fate::Again);
        assert_eq!(fate(None), Fate::Again);
    }

    #[test]
    fn ids_are_fhir_ids() {
        assert_eq!(resource_id("gw-1", 7), "fgw-gw-1-7");
        let odd = resource_id("gw_1", 7);
        assert!(odd.starts_with("fgw-") && odd.ends_with("-7") && odd.len() == 4 + 16 + 2);
        assert_ne!(odd, resource_id("gw-1", 7));
        let long = resource_id(&"a".repeat(200), u64::MAX);
        assert!(long.len() <= 64, "{long}");
        assert!(long
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
    }
}
