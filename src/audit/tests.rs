use super::chain::{line_hash, Chain, GENESIS};
use super::event::{named_patients, patients_of, Record, Shown};
use super::verify::verify;
use bytes::Bytes;
use fhir_gateway_modules::{Identity, Role};
use serde_json::{json, Value};

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

/// A trail of `n` records with a checkpoint after every 4, as lines.
fn trail(n: usize) -> Vec<String> {
    let mut chain = Chain::new("gw-a".into(), KEY).unwrap();
    let mut out = Vec::new();
    chain.checkpoint("start", "2026-12-07T00:00:00.000Z", &mut out);
    for i in 0..n {
        chain.record(json!({"resourceType": "AuditEvent", "n": i}), &mut out);
        if (i + 1) % 4 == 0 {
            chain.checkpoint("count", "2026-12-07T00:00:01.000Z", &mut out);
        }
    }
    String::from_utf8(out)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn check(lines: &[String], key: &[u8]) -> super::verify::Report {
    let text = lines.join("\n") + "\n";
    verify(std::io::Cursor::new(text.into_bytes()), key).unwrap()
}

fn findings(lines: &[String]) -> Vec<String> {
    check(lines, KEY)
        .findings
        .into_iter()
        .map(|(n, w)| format!("{n}: {w}"))
        .collect()
}

#[test]
fn an_intact_trail_verifies_and_each_line_names_the_hash_of_the_one_before() {
    let lines = trail(10);
    let r = check(&lines, KEY);
    assert!(r.is_clean(), "{:?}", r.findings);
    assert_eq!(r.records, 10);
    assert_eq!(r.checkpoints, 3);
    assert_eq!(
        r.unsigned_tail, 2,
        "records 8 and 9 come after the last checkpoint"
    );
    let first: Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["prev"], GENESIS);
    for w in lines.windows(2) {
        let next: Value = serde_json::from_str(&w[1]).unwrap();
        assert_eq!(next["prev"], line_hash(w[0].as_bytes()));
    }
}

#[test]
fn a_deleted_an_edited_and_a_reordered_record_are_each_found() {
    let lines = trail(10);
    // Line 4 (seq 3) deleted.
    let mut deleted = lines.clone();
    deleted.remove(3);
    let f = findings(&deleted);
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(
        f[0].contains("record 3 missing before seq 4: deleted"),
        "{f:?}"
    );

    // Line 3 (seq 2) edited in place.
    let mut edited = lines.clone();
    edited[2] = edited[2].replace("\"n\":1", "\"n\":7");
    let f = findings(&edited);
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(f[0].starts_with("3: gw-a: seq 2 does not hash"), "{f:?}");

    // Lines 3 and 4 swapped.
    let mut moved = lines.clone();
    moved.swap(2, 3);
    let f = findings(&moved);
    assert!(
        f.iter()
            .any(|x| x.contains("seq 2 comes after seq 3: records reordered")),
        "{f:?}"
    );
    assert!(!f.iter().any(|x| x.contains("deleted")), "{f:?}");

    // A torn or garbage line.
    let mut torn = lines.clone();
    torn[5] = "{\"seq\":5,\"inst".into();
    assert!(findings(&torn)
        .iter()
        .any(|x| x.contains("not a JSON record")));
}

#[test]
fn a_chain_rebuilt_after_an_edit_fails_at_the_next_checkpoint() {
    let lines = trail(10);
    // The attacker edits seq 2 and recomputes every later prev: the chain links again, but
    // the checkpoints after the edit were signed over the old chain.
    let mut forged: Vec<String> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let mut v: Value = serde_json::from_str(l).unwrap();
        if i == 2 {
            v["event"]["n"] = json!(99);
        }
        if let Some(prev) = forged.last() {
            v["prev"] = json!(line_hash(prev.as_bytes()));
        }
        forged.push(serde_json::to_string(&v).unwrap());
    }
    let f = findings(&forged);
    assert!(
        f.iter()
            .any(|x| x.contains("checkpoint seq 5 is not signed by this key")),
        "{f:?}"
    );
    assert!(
        !f.iter().any(|x| x.contains("checkpoint seq 0")),
        "before the edit: {f:?}"
    );
    // The right trail with another key: every checkpoint fails.
    let r = check(&lines, b"another key, another key, another key");
    assert_eq!(r.findings.len(), 3);
}

#[test]
fn the_chain_resumes_after_the_last_complete_line() {
    let dir = std::env::temp_dir().join(format!("fhirgw-audit-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("audit.jsonl");
    let first = trail(3);
    std::fs::write(&file, first.join("\n") + "\n").unwrap();
    let mut chain = Chain::new("gw-a".into(), KEY).unwrap();
    chain.resume(&file).unwrap();
    let mut out = Vec::new();
    chain.record(json!({"n": "after restart"}), &mut out);
    let mut all = first.clone();
    all.extend(String::from_utf8(out).unwrap().lines().map(str::to_string));
    let r = check(&all, KEY);
    assert!(r.is_clean(), "{:?}", r.findings);
    let last: Value = serde_json::from_str(all.last().unwrap()).unwrap();
    assert_eq!(last["seq"], 4);
    std::fs::remove_dir_all(dir).unwrap();
}

fn bundle(entries: Vec<Value>) -> Bytes {
    let e: Vec<Value> = entries
        .into_iter()
        .map(|r| json!({"resource": r}))
        .collect();
    Bytes::from(json!({"resourceType": "Bundle", "type": "searchset", "entry": e}).to_string())
}

#[test]
fn the_patients_shown_are_the_compartment_owners_of_what_was_sent() {
    let body = bundle(vec![
        json!({"resourceType": "Patient", "id": "p1"}),
        json!({"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p2"},
               "performer": [{"reference": "https://gw.example/fhir/Patient/p3"}]}),
        // Not patient data.
        json!({"resourceType": "Practitioner", "id": "d1"}),
        json!({"resourceType": "Observation", "id": "o2", "focus": [{"reference": "Patient/not-owner"}]}),
    ]);
    // Split anywhere: the chunks are joined before parsing.
    let chunks = vec![body.slice(..17), body.slice(17..)];
    let (p, unknown) = patients_of(&chunks, false, Some("https://gw.example/fhir"));
    assert_eq!(p.into_iter().collect::<Vec<_>>(), ["p1", "p2", "p3"]);
    assert!(!unknown);
    let nd = Bytes::from(
        "{\"resourceType\":\"Patient\",\"id\":\"a\"}\n{\"resourceType\":\"Condition\",\"subject\":{\"reference\":\"Patient/b\"}}\n",
    );
    let (p, unknown) = patients_of(&[nd], true, None);
    assert_eq!(p.into_iter().collect::<Vec<_>>(), ["a", "b"]);
    assert!(!unknown);
    let (_, unknown) = patients_of(&[Bytes::from_static(b"{not json")], false, None);
    assert!(unknown, "what cannot be read is not reported as nobody");
}

#[test]
fn an_audit_event_names_who_what_the_patients_and_never_a_token() {
    let rec = Record {
        at: "2026-12-07T10:00:00.5Z".parse().unwrap(),
        method: "GET".into(),
        path: "/fhir/Observation".into(),
        rest: Some("/Observation".into()),
        query: Some("code=1234&access_token=SECRET&patient=p2".into()),
        status: 200,
        identity: Some(
            Identity {
                issuer: "entra".into(),
                user_id: "oid-1".into(),
                tenant: Some("tid-1".into()),
                upn: Some("dr@example.org".into()),
                roles: vec![Role::Practitioner],
                client_id: Some("app-1".into()),
                ..Default::default()
            }
            .into(),
        ),
        source: Some("10.1.2.3".into()),
        correlation_id: "req-1".into(),
        public_base: Some("https://gw.example/fhir".into()),
        shown: Shown::Body {
            chunks: vec![bundle(vec![
                json!({"resourceType": "Observation", "subject": {"reference": "Patient/p2"}}),
            ])],
            ndjson: false,
        },
        error: None,
        reason: None,
    };
    let ev = rec.to_event("gw-a");
    let text = ev.to_string();
    assert!(!text.contains("SECRET"), "{text}");
    assert_eq!(ev["subtype"][0]["code"], "search-type");
    assert_eq!(ev["action"], "R");
    assert_eq!(ev["outcome"], "0");
    assert_eq!(ev["recorded"], "2026-12-07T10:00:00.500Z");
    assert_eq!(ev["agent"][0]["who"]["identifier"]["value"], "oid-1");
    assert_eq!(ev["agent"][0]["altId"], "dr@example.org");
    assert_eq!(ev["agent"][0]["network"]["address"], "10.1.2.3");
    assert_eq!(
        ev["agent"][0]["role"][0]["coding"][0]["code"],
        "Practitioner"
    );
    assert_eq!(ev["agent"][1]["who"]["identifier"]["value"], "app-1");
    assert_eq!(named_patients(&ev).collect::<Vec<_>>(), ["Patient/p2"]);
    let q = ev["entity"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|e| e["query"].as_str())
        .unwrap();
    use base64::Engine;
    let q = base64::engine::general_purpose::STANDARD.decode(q).unwrap();
    assert_eq!(String::from_utf8(q).unwrap(), "code=1234&patient=p2");
    assert!(text.contains("req-1"));
}

#[test]
fn a_topic_read_accepts_byte_identical_re_sends_and_nothing_else() {
    use super::verify::{verify_with, Options};
    let lines = trail(10);
    let topic = |ls: &[String]| {
        let text = ls.join("\n") + "\n";
        verify_with(
            std::io::Cursor::new(text.into_bytes()),
            KEY,
            Options { resends: true },
        )
        .unwrap()
    };
    // A re-sent suffix after a failed delivery: 0..=7, then 5..=7 again, then the rest.
    let mut resent = lines[..8].to_vec();
    resent.extend_from_slice(&lines[5..]);
    let r = topic(&resent);
    assert!(r.is_clean(), "{:?}", r.findings);
    assert_eq!(r.resends, 3);
    assert_eq!(r.records, 10);
    assert_eq!(
        r.instances["gw-a"],
        (lines.len() as u64, lines.len() as u64 - 1)
    );
    // The same in a file is an insertion: the file writer never re-sends.
    assert!(findings(&resent)
        .iter()
        .any(|f| f.contains("appears twice")));
    // A repeated seq with other bytes is not a re-send.
    let mut forged = lines.clone();
    forged.insert(4, forged[3].replace("\"n\":", "\"x\":0,\"n\":"));
    let r = topic(&forged);
    assert!(
        r.findings
            .iter()
            .any(|(_, f)| f.contains("appears twice: inserted")),
        "{:?}",
        r.findings
    );
    assert_eq!(r.resends, 0);
}

fn record_showing(body: Bytes) -> Record {
    Record {
        at: "2026-12-07T10:00:00Z".parse().unwrap(),
        method: "GET".into(),
        path: "/fhir/Patient".into(),
        rest: Some("/Patient".into()),
        query: None,
        status: 200,
        identity: None,
        source: None,
        correlation_id: "req".into(),
        public_base: None,
        shown: Shown::Body {
            chunks: vec![body],
            ndjson: false,
        },
        error: None,
        reason: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_answers_are_bounded_in_bytes_and_every_record_is_written() {
    let dir = std::env::temp_dir().join(format!("fhirgw-audit-q-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("audit.jsonl");
    let cfg: crate::config::AuditConfig = serde_yaml::from_str(&format!(
        "file: {}\nkey_file: unused\ninstance: q\nmax_body_bytes: 1048576\nmax_queue_bytes: 1048576\n",
        file.display()
    ))
    .unwrap();
    let built = crate::config::BuiltAudit {
        key: KEY.to_vec(),
        ..Default::default()
    };
    let audit = super::Audit::new(&cfg, &built);
    // 12 answers of 300 KB: three times what the queue may hold at once, so recording waits
    // for the writer to give bytes back; it must neither deadlock nor lose a record.
    let patient = format!(
        "{{\"resourceType\":\"Patient\",\"id\":\"p1\",\"text\":{{\"div\":\"{}\"}}}}",
        "x".repeat(300_000)
    );
    let body = Bytes::from(patient);
    for _ in 0..12 {
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            audit.record(record_showing(body.clone())),
        )
        .await
        .expect("the writer gives the bytes back");
    }
    audit.flush().await;
    assert_eq!(audit.held.available_permits(), audit.held_kib as usize);
    let text = std::fs::read_to_string(&file).unwrap();
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("event").is_some())
        .collect();
    assert_eq!(events.len(), 12);
    assert!(events
        .iter()
        .all(|v| named_patients(&v["event"]).eq(["Patient/p1"])));
    assert!(check(&text.lines().map(str::to_string).collect::<Vec<_>>(), KEY).is_clean());
    let _ = std::fs::remove_dir_all(dir);
}
