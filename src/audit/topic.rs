//! `fhir-gateway audit verify --topic T --bootstrap B --key-file K`: reads every partition of
//! the topic from its beginning to the end it had when the command started, and feeds the
//! message values, one line each, to the same `verify` as a file, accepting byte-identical
//! re-sends (the sink delivers at least once). Findings name `topic[partition]@offset`.

use super::verify::{verify_with, Options, Report};
use crate::config::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufReader, Read};
use std::time::{Duration, Instant};

/// How the command reaches the broker.
pub struct Source {
    pub bootstrap: String,
    pub topic: String,
    pub connection_string: Option<String>,
    pub properties: BTreeMap<String, String>,
}

/// A partition read to its end when the command started.
struct Part {
    id: i32,
    high: i64,
}

/// Message values as lines, partition after partition, remembering where each line came from.
struct TopicReader {
    consumer: BaseConsumer,
    topic: String,
    parts: VecDeque<Part>,
    current: Option<Part>,
    /// The current partition's watermark was reached.
    reached: bool,
    buf: Vec<u8>,
    pos: usize,
    /// `(partition, offset)` of each line, in order (line n is `lines[n - 1]`).
    lines: Vec<(i32, i64)>,
}

const QUIET: Duration = Duration::from_secs(30);
/// How long a partition must stay quiet past its watermark to be at its end.
const SETTLE: Duration = Duration::from_secs(2);

impl TopicReader {
    /// The next message of the current partition, or of the next one; `None` at the end.
    fn next_message(&mut self) -> std::io::Result<Option<()>> {
        loop {
            if self.current.is_none() {
                let Some(p) = self.parts.pop_front() else {
                    return Ok(None);
                };
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&self.topic, p.id, Offset::Beginning)
                    .and_then(|_| self.consumer.assign(&tpl))
                    .map_err(std::io::Error::other)?;
                self.current = Some(p);
            }
            let Some(p) = self.current.as_ref() else {
                continue;
            };
            let (id, high) = (p.id, p.high);
            let last = Instant::now();
            loop {
                match self.consumer.poll(Duration::from_millis(200)) {
                    Some(Ok(m)) if m.partition() == id => {
                        let value = m.payload().unwrap_or_default();
                        self.buf.clear();
                        self.pos = 0;
                        self.buf.extend_from_slice(value);
                        self.buf.push(b'\n');
                        let n = value.iter().filter(|&&b| b == b'\n').count() + 1;
                        self.lines.extend(std::iter::repeat_n((id, m.offset()), n));
                        if m.offset() + 1 >= high {
                            self.reached = true;
                        }
                        return Ok(Some(()));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(std::io::Error::other(e)),
                    // Past the watermark and quiet: the end (a broker may report the
                    // watermark late, so what follows it is read too).
                    None if self.reached && last.elapsed() > SETTLE => {
                        self.current = None;
                        self.reached = false;
                        break;
                    }
                    None if !self.reached && last.elapsed() > QUIET => {
                        return Err(std::io::Error::other(format!(
                            "{}[{id}]: nothing read for {}s before offset {high}",
                            self.topic,
                            QUIET.as_secs()
                        )))
                    }
                    None => {}
                }
            }
        }
    }
}

impl Read for TopicReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.buf.len() && self.next_message()?.is_none() {
            return Ok(0);
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Verifies the topic; findings' line numbers are resolved to `topic[partition]@offset`.
pub fn verify_topic(src: &Source, key: &[u8]) -> Result<(Report, Vec<String>), String> {
    let k = KafkaConfig {
        bootstrap_servers: src.bootstrap.clone(),
        topic: src.topic.clone(),
        connection_string: src.connection_string.clone(),
        properties: src.properties.clone(),
        invalidate_caches: false,
    };
    let mut c = crate::events::client_config(&k);
    // Producer-only settings would only make librdkafka warn.
    for p in [
        "enable.idempotence",
        "acks",
        "linger.ms",
        "message.timeout.ms",
    ] {
        c.remove(p);
    }
    let consumer: BaseConsumer = c
        .set("group.id", format!("audit-verify-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| format!("{}: {e}", src.bootstrap))?;
    let md = consumer
        .fetch_metadata(Some(&src.topic), Duration::from_secs(10))
        .map_err(|e| format!("{}: {e}", src.bootstrap))?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == src.topic)
        .filter(|t| t.error().is_none() && !t.partitions().is_empty())
        .ok_or_else(|| format!("{}: no topic {}", src.bootstrap, src.topic))?;
    let mut parts = VecDeque::new();
    for p in t.partitions() {
        let (low, high) = consumer
            .fetch_watermarks(&src.topic, p.id(), Duration::from_secs(10))
            .map_err(|e| format!("{}[{}]: {e}", src.topic, p.id()))?;
        if low > 0 {
            // Retention already removed the chain's start: verify reports it missing.
            eprintln!(
                "{}[{}]: starts at offset {low} (older messages are gone: retention?)",
                src.topic,
                p.id()
            );
        }
        if high > low {
            parts.push_back(Part { id: p.id(), high });
        }
    }
    parts.make_contiguous().sort_by_key(|p| p.id);
    let mut reader = BufReader::new(TopicReader {
        consumer,
        topic: src.topic.clone(),
        parts,
        current: None,
        reached: false,
        buf: Vec::new(),
        pos: 0,
        lines: Vec::new(),
    });
    let report = verify_with(&mut reader, key, Options { resends: true })
        .map_err(|e| format!("reading {}: {e}", src.topic))?;
    let lines = &reader.get_ref().lines;
    let at = report
        .findings
        .iter()
        .map(|(n, _)| match lines.get(n.wrapping_sub(1)) {
            Some((p, o)) => format!("{}[{p}]@{o}", src.topic),
            None => format!("{}:{n}", src.topic),
        })
        .collect();
    Ok((report, at))
}

/// The command's output: each finding where it is, one line per instance, the summary.
pub fn print(name: &str, report: &Report, at: &[String]) {
    for ((_, what), at) in report.findings.iter().zip(at) {
        println!("{at}: {what}");
    }
    for (instance, (lines, last)) in &report.instances {
        let bad = report
            .findings
            .iter()
            .filter(|(_, w)| w.starts_with(&format!("{instance}: ")))
            .count();
        println!("{name}: instance {instance}: {lines} line(s) up to seq {last}, {bad} finding(s)");
    }
    let resends = if report.resends > 0 {
        format!(", {} byte-identical re-send(s) ignored", report.resends)
    } else {
        String::new()
    };
    println!(
        "{name}: {} records, {} checkpoints, {} finding(s){resends}; {} record(s) after the last valid checkpoint (protected by the chain only)",
        report.records,
        report.checkpoints,
        report.findings.len(),
        report.unsigned_tail
    );
}
