//! `fhir-gateway audit verify FILE --key-file K`: walks each instance's chain and reports
//! deleted records (a gap in `seq`), edited ones (a `prev` that does not match the line
//! before), reordered ones (`seq` going back), lines that are not records, and checkpoints
//! whose signature does not match (the chain was rebuilt after an edit, or another key).
//!
//! Read from a topic (`audit verify --topic`), a line may come twice: the sink delivers at
//! least once. With [`Options::resends`] a line byte-identical to one already seen (same
//! instance and seq, same hash) is counted as a re-send and otherwise ignored; a different
//! line with a seen seq is still an insertion. A file never holds re-sends: there it is off.

use super::chain::{checkpoint_mac, line_hash, GENESIS};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::BufRead;

#[derive(Debug, Default)]
pub struct Report {
    pub records: u64,
    pub checkpoints: u64,
    /// `(line number, what is wrong)`, 1-based lines.
    pub findings: Vec<(usize, String)>,
    /// Records after each instance's last valid checkpoint: protected by the chain alone.
    pub unsigned_tail: u64,
    /// Byte-identical re-sends skipped (only with [`Options::resends`]).
    pub resends: u64,
    /// Per instance: (lines, the highest seq).
    pub instances: BTreeMap<String, (u64, u64)>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Options {
    /// Accept byte-identical re-sends of a line (a topic: at-least-once delivery).
    pub resends: bool,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }
}

/// One line of an instance's chain.
struct Line {
    n: usize,
    seq: u64,
    prev: String,
    hash: String,
    checkpoint: Option<bool>,
}

pub fn verify(input: impl BufRead, key: &[u8]) -> std::io::Result<Report> {
    verify_with(input, key, Options::default())
}

pub fn verify_with(input: impl BufRead, key: &[u8], opts: Options) -> std::io::Result<Report> {
    let mut report = Report::default();
    let mut chains: BTreeMap<String, Vec<Line>> = BTreeMap::new();
    for (i, line) in input.split(b'\n').enumerate() {
        let n = i + 1;
        let line = line?;
        if line.is_empty() {
            continue;
        }
        let Ok(rec) = serde_json::from_slice::<Value>(&line) else {
            report
                .findings
                .push((n, "not a JSON record: edited or torn".into()));
            continue;
        };
        let (Some(instance), Some(seq), Some(prev)) = (
            rec.get("instance").and_then(Value::as_str),
            rec.get("seq").and_then(Value::as_u64),
            rec.get("prev").and_then(Value::as_str),
        ) else {
            report
                .findings
                .push((n, "a record without instance, seq or prev: edited".into()));
            continue;
        };
        let checkpoint = rec.get("checkpoint").map(|_| {
            let mac = rec.get("mac").and_then(Value::as_str).unwrap_or("");
            checkpoint_mac(key, instance, seq, prev).as_deref() == Some(mac)
        });
        chains.entry(instance.to_string()).or_default().push(Line {
            n,
            seq,
            prev: prev.to_string(),
            hash: line_hash(&line),
            checkpoint,
        });
    }
    for (instance, lines) in &chains {
        check_chain(instance, lines, opts, &mut report);
    }
    report.findings.sort();
    Ok(report)
}

/// Judges one instance's lines: by `seq`, so that one moved line is one finding.
fn check_chain(instance: &str, lines: &[Line], opts: Options, report: &mut Report) {
    let mut by_seq: BTreeMap<u64, &Line> = BTreeMap::new();
    let mut highest: Option<u64> = None;
    for l in lines {
        if opts.resends && by_seq.get(&l.seq).is_some_and(|seen| seen.hash == l.hash) {
            report.resends += 1;
            continue;
        }
        if let Some(h) = highest.filter(|h| l.seq < *h) {
            report.findings.push((
                l.n,
                format!(
                    "{instance}: seq {} comes after seq {h}: records reordered",
                    l.seq
                ),
            ));
        }
        highest = highest.max(Some(l.seq));
        if by_seq.insert(l.seq, l).is_some() {
            report.findings.push((
                l.n,
                format!("{instance}: seq {} appears twice: inserted", l.seq),
            ));
        }
        match l.checkpoint {
            Some(true) => report.checkpoints += 1,
            Some(false) => {
                report.checkpoints += 1;
                report.findings.push((
                    l.n,
                    format!("{instance}: checkpoint seq {} is not signed by this key: the chain before it was rebuilt (records changed) or the key differs", l.seq),
                ));
            }
            None => report.records += 1,
        }
    }
    let mut expected: Option<u64> = None;
    let mut unsigned = 0;
    for (seq, l) in &by_seq {
        match expected {
            Some(e) if *seq > e => {
                let missing = if *seq == e + 1 {
                    format!("record {e}")
                } else {
                    format!("records {e}..={}", seq - 1)
                };
                report.findings.push((
                    l.n,
                    format!("{instance}: {missing} missing before seq {seq}: deleted"),
                ));
            }
            Some(_) => match by_seq.get(&(seq - 1)) {
                Some(before) if before.hash != l.prev => report.findings.push((
                    before.n,
                    format!(
                        "{instance}: seq {} does not hash to the prev of seq {seq}: edited",
                        seq - 1
                    ),
                )),
                _ => {}
            },
            None if *seq == 0 && l.prev != GENESIS => report.findings.push((
                l.n,
                format!("{instance}: the first record's prev was edited"),
            )),
            None => {}
        }
        expected = Some(seq + 1);
        match l.checkpoint {
            Some(true) => unsigned = 0,
            Some(false) => {}
            None => unsigned += 1,
        }
    }
    report.unsigned_tail += unsigned;
    let last = by_seq.keys().next_back().copied().unwrap_or(0);
    report
        .instances
        .insert(instance.to_string(), (by_seq.len() as u64, last));
}
