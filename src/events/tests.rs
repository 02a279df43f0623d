use super::consumer::event_type;
use super::payload::{decode, encode};
use super::queue::Queued;
use super::*;
use fhir_gateway_modules::processor::EventSink;
use serde_json::json;
use serde_json::Value;

fn kafka(cs: Option<&str>, props: &[(&str, &str)]) -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: "ns.servicebus.windows.net:9093".into(),
        topic: "fhir-events".into(),
        connection_string: cs.map(str::to_string),
        properties: props
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        invalidate_caches: true,
    }
}

#[test]
fn event_hubs_settings_and_pass_through() {
    let c = client_config(&kafka(Some("Endpoint=sb://ns/;SharedAccessKey=x"), &[]));
    assert_eq!(c.get("security.protocol"), Some("SASL_SSL"));
    assert_eq!(c.get("sasl.mechanism"), Some("PLAIN"));
    assert_eq!(c.get("sasl.username"), Some("$ConnectionString"));
    assert_eq!(
        c.get("sasl.password"),
        Some("Endpoint=sb://ns/;SharedAccessKey=x")
    );
    assert_eq!(c.get("enable.idempotence"), Some("true"));
    assert_eq!(c.get("acks"), Some("all"));
    let c = client_config(&kafka(None, &[("linger.ms", "20"), ("client.id", "gw-1")]));
    assert_eq!(
        c.get("security.protocol"),
        None,
        "plaintext without a connection string"
    );
    assert_eq!(
        c.get("linger.ms"),
        Some("20"),
        "the operator has the last word"
    );
    assert_eq!(c.get("client.id"), Some("gw-1"));
}

#[test]
fn spool_payload_round_trip_and_event_types() {
    let event = json!({"action": "Created", "resourcetype": "Consent"});
    let q = Queued::of("Patient/1", &event);
    let enc = encode(&q);
    let (t, cid, body) = decode(&enc);
    assert_eq!(cid, b"");
    assert!(t > 1_700_000_000_000, "enqueue time in ms");
    assert_eq!(serde_json::from_slice::<Value>(body).unwrap(), event);
    let event2 = json!({"correlationid": "c-1", "id": "x"});
    let q2 = Queued::of("k", &event2);
    let enc = encode(&q2);
    let (_, cid, body) = decode(&enc);
    assert_eq!(cid, b"c-1");
    assert_eq!(serde_json::from_slice::<Value>(body).unwrap(), event2);
    // In a CloudEvents envelope, the correlation id is the data's.
    let ce = Queued::of(
        "k",
        &json!({"specversion": "1.0", "data": {"correlationid": "c-2"}}),
    );
    assert_eq!(decode(&encode(&ce)).1, b"c-2");
    // The earlier layout (time, event) still reads.
    let mut old = 7u64.to_be_bytes().to_vec();
    old.extend(br#"{"id":"y"}"#);
    assert_eq!(decode(&old), (7, &b""[..], &br#"{"id":"y"}"#[..]));
    let ty = |v: &Value| event_type(&serde_json::to_vec(v).unwrap()).map(|t| t.into_owned());
    assert_eq!(ty(&event).as_deref(), Some("Consent"));
    let ce = json!({"specversion": "1.0", "data": {"resourcetype": "CareTeam"}});
    assert_eq!(ty(&ce).as_deref(), Some("CareTeam"));
    assert_eq!(ty(&json!({})), None);
    assert_eq!(ty(&json!({"resourcetype": null, "id": "x"})), None);
    assert_eq!(event_type(b"not json"), None);
}

#[tokio::test]
async fn a_full_queue_holds_the_write_then_drops_with_a_count() {
    let cfg = EventsConfig {
        queue_capacity: 2,
        queue_full_wait_ms: 50,
        ..Default::default()
    };
    let ev = Arc::new(Events::new(&cfg));
    let rx = ev.rx.lock().unwrap().take().unwrap();
    let dropped = || EVENTS.with_label_values(&["dropped_queue_full"]).get();
    let before = dropped();
    // A writer that frees room within the wait: nothing is lost.
    ev.publish("k", json!({"n": 0})).await;
    ev.publish("k", json!({"n": 1})).await;
    let reader = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        let first = rx.recv().unwrap();
        (first, rx)
    });
    ev.publish("k", json!({"n": 2})).await;
    let (first, rx) = reader.join().unwrap();
    let n = |q: &Queued| serde_json::from_slice::<Value>(&q.json).unwrap()["n"].as_i64();
    assert_eq!(n(&first), Some(0));
    assert_eq!(dropped(), before);
    // No room for longer than the wait: dropped, counted.
    ev.publish("k", json!({"n": 3})).await;
    assert_eq!(dropped() - before, 1);
    let left: Vec<_> = rx.try_iter().map(|q| n(&q).unwrap()).collect();
    assert_eq!(left, vec![1, 2]);
}
