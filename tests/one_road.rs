//! The two roads to the FHIR server are one policy: a route that streams through Pingora and a
//! route whose chain buffers (PublishFHIREvent + ParticipantFilter) refuse the same hostile
//! bodies the same way, nothing of them reaching the server; and a buffered answer keeps the
//! server's bytes (key order, decimal text, escapes) wherever no module changed them.

mod common;

use common::roads::{self, Chain, EventsDir, Road};
use common::*;
use serde_json::Value;

/// `/fhir` streams (no modules); `/chain` buffers every write and every read (no caller is
/// bypassed in insecure_dev).
fn two_roads_yaml(upstream: &str, dir: &std::path::Path) -> String {
    format!(
        "upstream:\n  url: {upstream}\nauth:\n  mode: insecure_dev\n{}",
        roads::two_roads_yaml(dir, Chain::Filters)
    )
}

/// (name, content type, content encoding, body, status, issue code)
type Hostile = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Vec<u8>,
    u16,
    &'static str,
);

#[tokio::test(flavor = "multi_thread")]
async fn hostile_bodies_get_the_same_outcome_on_both_roads_and_never_reach_the_server() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let events = EventsDir::new();
    let gw = Gateway::start(&two_roads_yaml(&sekmet_url(), &events.path)).await;
    let deep = format!(
        "{{\"resourceType\":\"Patient\",\"extension\":{}1{}}}",
        "[".repeat(101),
        "]".repeat(101)
    );
    let cases: Vec<Hostile> = vec![
        (
            "invalid UTF-8 in a string",
            "application/fhir+json",
            None,
            b"{\"resourceType\":\"Patient\",\"name\":[{\"family\":\"\xff\"}]}".to_vec(),
            400,
            "invalid",
        ),
        (
            "random bytes as JSON",
            "application/fhir+json",
            None,
            (0..512u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
            400,
            "invalid",
        ),
        (
            "JSON nested 101 deep",
            "application/fhir+json",
            None,
            deep.into_bytes(),
            400,
            "invalid",
        ),
        (
            "a Patient as text/plain",
            "text/plain",
            None,
            br#"{"resourceType":"Patient"}"#.to_vec(),
            415,
            "not-supported",
        ),
        (
            "a gzip-encoded body",
            "application/fhir+json",
            Some("gzip"),
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00".to_vec(),
            415,
            "not-supported",
        ),
    ];
    let mut bodies = Vec::new();
    for (name, ct, ce, body, status, code) in &cases {
        let mut outcomes = Vec::new();
        for road in Road::BOTH.map(Road::prefix) {
            let id = format!("oneroad-{}", uniq());
            let mut rq = client()
                .post(gw.url(&format!("{road}/Patient")))
                .header("Content-Type", *ct)
                .header("X-Request-Id", &id)
                .body(body.clone());
            if let Some(ce) = ce {
                rq = rq.header("Content-Encoding", *ce);
            }
            let r = rq.send().await.unwrap();
            let got = r.status().as_u16();
            assert_eq!(got, *status, "{name} on {road}");
            let oo = assert_outcome(r, *status, code).await;
            let diag = oo["issue"][0]["diagnostics"].as_str().unwrap().to_string();
            // The same words apart from the correlation id.
            outcomes.push(diag.replace(&id, "<id>"));
            assert_sekmet_never_received(&id).await;
        }
        assert_eq!(
            outcomes[0], outcomes[1],
            "{name}: the two roads answer alike"
        );
        bodies.push(outcomes[0].clone());
    }
    // The buffered road published nothing for refused writes.
    let published = events.events();
    assert!(
        published.is_empty(),
        "events of refused writes: {published}"
    );
    assert_eq!(bodies.len(), cases.len());
}

/// A resource whose bytes a re-serialisation would change: key order (`id` first), decimal
/// text, big numbers, exponents, escapes.
const ORGANIZATION: &str = r#"{"id":"o1","resourceType":"Organization","name":"H\u00f4pital \/ \"Sud\"","extension":[{"url":"urn:x","valueDecimal":37.20},{"url":"urn:y","valueDecimal":123456789012345678901234567890.000},{"url":"urn:z","valueDecimal":-0.0},{"url":"urn:e","valueDecimal":1.50E+3}]}"#;

/// A searchset around it. Organization and Medication are not patient data, so
/// ParticipantFilter keeps them for a caller with no patients; the Observation goes.
fn searchset(base: &str) -> String {
    let b = base;
    [
        r#"{"resourceType":"Bundle","id":"s1","meta":{"lastUpdated":"2026-12-07T01:02:03.450Z"},"type":"searchset","total":3,"#,
        &format!(r#""link":[{{"relation":"self","url":"{b}/Organization?_count=3"}}],"entry":["#),
        &format!(r#"{{"fullUrl":"{b}/Organization/o1","resource":{ORGANIZATION},"search":{{"mode":"match"}}}},"#),
        &format!(r#"{{"fullUrl":"{b}/Observation/x1","resource":{{"resourceType":"Observation","id":"x1","status":"final","code":{{"text":"t"}},"subject":{{"reference":"Patient/p1"}},"valueQuantity":{{"value":38.10}}}},"search":{{"mode":"match"}}}},"#),
        &format!(r#"{{"search":{{"mode":"match"}},"resource":{{"resourceType":"Medication","id":"m1","amount":{{"numerator":{{"value":0.050,"unit":"g"}}}},"code":{{"text":"\ud83d\ude00 caf\u00e9"}}}},"fullUrl":"{b}/Medication/m1"}}"#),
        "]}",
    ]
    .concat()
}

fn entries(body: &str) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct B<'a> {
        #[serde(borrow)]
        entry: Vec<&'a serde_json::value::RawValue>,
    }
    let b: B = serde_json::from_str(body).unwrap();
    b.entry.iter().map(|e| e.get().to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn buffered_reads_and_filtered_searchsets_keep_the_servers_bytes() {
    let up = ScriptedUpstream::start(|r, _| {
        if r.target.contains("/Organization/o1") {
            return Reply::json(200, ORGANIZATION);
        }
        let base = format!("http://{}/fhir", r.header("host").unwrap_or(""));
        Reply::json(200, &searchset(&base))
    })
    .await;
    let events = EventsDir::new();
    let gw = Gateway::start(&two_roads_yaml(&up.base(), &events.path)).await;
    let public = gw.url("/chain");
    let server_set = searchset(&public);
    let server_entries = entries(&server_set);

    // A filtered searchset: the Observation is removed, the others are the server's bytes.
    let r = client()
        .get(gw.url("/chain/Organization?_count=3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    let got = entries(&body);
    assert_eq!(
        got[..2],
        [server_entries[0].clone(), server_entries[2].clone()],
        "kept entries byte-identical (URLs rewritten); got {body}"
    );
    // Then the filter's own note that something was withheld, and nothing else.
    assert_eq!(got.len(), 3, "{body}");
    assert!(got[2].contains(r#""code":"suppressed""#), "{body}");
    // The Bundle around them keeps its key order and text.
    assert!(
        body.starts_with(r#"{"resourceType":"Bundle","id":"s1","meta":{"lastUpdated":"2026-12-07T01:02:03.450Z"},"type":"searchset","#),
        "{body}"
    );
    let link = body.find(r#""link":"#).unwrap();
    assert!(link < body.find(r#""entry":"#).unwrap(), "{body}");

    // A buffered single read nothing changed: the server's bytes exactly.
    let r = client()
        .get(gw.url("/chain/Organization/o1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert_eq!(body, ORGANIZATION);
    // The streaming road is the reference: both roads give the same bytes.
    let streamed = get_text(&gw.url("/fhir/Organization/o1")).await;
    assert_eq!(body, streamed);
}

#[tokio::test(flavor = "multi_thread")]
async fn sekmets_own_escapes_and_key_order_survive_the_buffered_road() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let events = EventsDir::new();
    let gw = Gateway::start(&two_roads_yaml(&sekmet_url(), &events.path)).await;
    let name = format!("Clinique Saint-Éloi — {} / «Nord»", uniq());
    let r = client()
        .post(gw.url("/fhir/Organization"))
        .header("Content-Type", "application/fhir+json")
        .body(serde_json::json!({"resourceType":"Organization","name":name}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    // SEKMET's own bytes, straight from the server.
    let direct = get_text(&format!("{}/Organization/{id}", sekmet_url())).await;
    assert!(
        direct.contains("\\u00c9"),
        "SEKMET escapes non-ASCII: {direct}"
    );
    let buffered = get_text(&gw.url(&format!("/chain/Organization/{id}"))).await;
    let rewritten = direct.replace(&sekmet_url(), &gw.url("/chain"));
    assert_eq!(buffered, rewritten, "the buffered read is SEKMET's bytes");
    // And inside a filtered searchset.
    let set = get_text(&gw.url(&format!("/chain/Organization?_id={id}"))).await;
    let entry = &entries(&set)[0];
    let server_entry =
        &entries(&get_text(&format!("{}/Organization?_id={id}", sekmet_url())).await)[0]
            .replace(&sekmet_url(), &gw.url("/chain"));
    assert_eq!(entry, server_entry);
}

#[tokio::test(flavor = "multi_thread")]
async fn public_bases_are_per_host_even_past_the_cache() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let gw = Gateway::in_front_of_sekmet().await;
    // More authorities than the gateway remembers (64), each asked twice, interleaved.
    for round in 0..2 {
        for i in 0..80 {
            let host = format!("h{i}.example.org:{}", 8000 + i);
            let r = client()
                .get(gw.url("/fhir/Patient?_count=1"))
                .header("Host", &host)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "round {round} host {host}");
            let b: Value = r.json().await.unwrap();
            let link = b["link"][0]["url"].as_str().unwrap();
            assert!(
                link.starts_with(&format!("http://{host}/fhir/")),
                "round {round}: {host} got {link}"
            );
        }
    }
    // An invalid Host is refused whether or not valid ones are cached.
    let r = client()
        .get(gw.url("/fhir/Patient"))
        .header("Host", "evil.example/\"}")
        .send()
        .await
        .unwrap();
    assert_outcome(r, 400, "invalid").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_the_filters_bypass_is_streamed_not_buffered() {
    let mport = free_port();
    let gw = common::idp::jwt_gateway(&format!(
        "metrics:\n  listen: 127.0.0.1:{mport}\npolicy:\n  read: [Reader, Administrator, Patient]\n  write: [Writer, Administrator]\npost:\n  - name: ParticipantFilter\n  - name: ConsentOptOut\n    settings: {{category: \"http://loinc.org|59284-0\"}}\n",
    ))
    .await;
    // Which road answered: the streamed one counts its upstream exchange as `stream`, the
    // buffered one (the gateway's client) as `client`.
    let roads = || async {
        let m = metrics_text(mport, &gw).await;
        (
            metric_value(&m, "fhirgw_upstream_seconds_count{path=\"stream\"}"),
            metric_value(&m, "fhirgw_upstream_seconds_count{path=\"client\"}"),
        )
    };
    let get = |tok: String| {
        let url = format!("{}/Patient?_count=1", gw.base());
        async move {
            let r = client().get(url).bearer_auth(tok).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let b: Value = r.json().await.unwrap();
            assert_eq!(b["resourceType"], "Bundle");
        }
    };
    // An Administrator is bypassed by both filters: Pingora proxies the answer (rewritten on
    // the fly), nothing is buffered or parsed.
    let (s0, c0) = roads().await;
    get(common::idp::token("admin-app").await).await;
    let (s1, c1) = roads().await;
    assert_eq!(
        (s1 - s0, c1 - c0),
        (1.0, 0.0),
        "admin: (streamed, buffered)"
    );
    // A Reader is filtered: the buffered road answers.
    get(common::idp::token("reader-app").await).await;
    let (s2, c2) = roads().await;
    assert!(
        s2 == s1 && c2 > c1,
        "reader: streamed {} buffered {}",
        s2 - s1,
        c2 - c1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn head_answers_and_non_utf8_headers_are_the_same_on_both_roads() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let events = EventsDir::new();
    let gw = Gateway::start(&two_roads_yaml(&sekmet_url(), &events.path)).await;
    let r = client()
        .post(gw.url("/fhir/Organization"))
        .header("Content-Type", "application/fhir+json")
        .body(r#"{"resourceType":"Organization","name":"Head"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // HEAD: the server's length on both roads (no body to measure).
    let mut lengths = Vec::new();
    for road in Road::BOTH.map(Road::prefix) {
        let r = client()
            .head(gw.url(&format!("{road}/Organization/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{road}");
        lengths.push(
            r.headers()
                .get("content-length")
                .map(|v| v.to_str().unwrap().to_string()),
        );
    }
    assert!(
        lengths[0].as_deref().is_some_and(|l| l != "0"),
        "{lengths:?}"
    );
    assert_eq!(lengths[0], lengths[1], "HEAD on both roads");

    // A forwarded header that is not UTF-8: refused alike, nothing at the server.
    for road in Road::BOTH.map(Road::prefix) {
        let rid = format!("oneroad-{}", uniq());
        let r = client()
            .get(gw.url(&format!("{road}/Organization/{id}")))
            .header("X-Request-Id", &rid)
            .header(
                "Prefer",
                reqwest::header::HeaderValue::from_bytes(b"return=\xff\xfe").unwrap(),
            )
            .send()
            .await
            .unwrap();
        let oo = assert_outcome(r, 400, "invalid").await;
        assert!(
            oo.to_string().contains("prefer is not valid UTF-8"),
            "{road}: {oo}"
        );
        assert_sekmet_never_received(&rid).await;
    }
}

/// One request-head builder (issue 13): for the same request, the FHIR server receives the
/// same head on both roads, every line of it (the correlation id's value aside) and the same
/// target. Raw requests, so that nothing but what is written here is sent.
#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_gets_the_same_request_head_on_both_roads() {
    let up = ScriptedUpstream::start(|r, _| match r.method.as_str() {
        "POST" => Reply::json(201, ORGANIZATION),
        // No body where HTTP has none (this upstream would write one).
        "DELETE" | "HEAD" => Reply::Full {
            status: if r.method == "HEAD" { 200 } else { 204 },
            headers: Vec::new(),
            body: Vec::new(),
        },
        _ => Reply::json(200, ORGANIZATION),
    })
    .await;
    let events = EventsDir::new();
    let gw = Gateway::start(&two_roads_yaml(&up.base(), &events.path)).await;
    let json = "Content-Type: application/fhir+json\r\n";
    // (what, method, path below the road, header lines, body)
    let cases: [(&str, &str, &str, &str, &str); 7] = [
        ("a read", "GET", "/Organization/o1", "", ""),
        (
            "a read with the caller's Accept",
            "GET",
            "/Organization/o1",
            "Accept: application/fhir+json\r\n",
            "",
        ),
        ("a search", "GET", "/Organization?name=Sud", "", ""),
        ("a HEAD", "HEAD", "/Organization/o1", "", ""),
        ("a create", "POST", "/Organization", json, ORGANIZATION),
        ("an update", "PUT", "/Organization/o1", json, ORGANIZATION),
        ("a delete", "DELETE", "/Organization/o1", "", ""),
    ];
    let mut differences = Vec::new();
    for (what, method, path, lines, body) in cases {
        let mut got = Vec::new();
        for road in Road::BOTH {
            let rid = format!("head-{}", uniq());
            let length = if body.is_empty() && method != "POST" && method != "PUT" {
                String::new()
            } else {
                format!("Content-Length: {}\r\n", body.len())
            };
            let req = format!(
                "{method} {}{path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Request-Id: {rid}\r\n{lines}{length}Connection: close\r\n\r\n{body}",
                road.prefix(),
                gw.port
            );
            // The status line only (a HEAD answer declares a length it does not send).
            let (status, _) = common::raw::raw_request(gw.port, req.as_bytes()).await;
            // The caller's request (a delete's event may look the resource up after it).
            let head = up
                .received()
                .into_iter()
                .find(|r| r.header("x-request-id") == Some(rid.as_str()) && r.method == method)
                .map(|r| {
                    let mut h: Vec<String> = r
                        .headers
                        .iter()
                        .map(|(k, v)| {
                            let v = if k == "x-request-id" { "<id>" } else { v };
                            format!("{k}: {v}")
                        })
                        .collect();
                    h.sort();
                    h.insert(0, format!("{} {}", r.method, r.target));
                    h
                });
            got.push((status, head));
        }
        let [(s_status, s_head), (b_status, b_head)] = [got[0].clone(), got[1].clone()];
        assert!(s_head.is_some(), "{what}: nothing reached the upstream");
        if s_status != b_status || s_head != b_head {
            let only = |a: &Option<Vec<String>>, b: &Option<Vec<String>>| -> Vec<String> {
                let b = b.clone().unwrap_or_default();
                a.clone()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|l| !b.contains(l))
                    .collect()
            };
            differences.push(format!(
                "{what} ({method} {path}): streaming answered {s_status}, buffered {b_status}; \
                 only on the streaming road's upstream head: {:?}; only on the buffered road's: {:?}",
                only(&s_head, &b_head),
                only(&b_head, &s_head)
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "the roads send the upstream different request heads:\n{}",
        differences.join("\n")
    );
}

/// A `Connection` header is a hop-by-hop matter: whatever it nominates, the request is
/// answered alike on both roads, and reaches the server on both or on neither (issue 13).
/// Pingora's proxy refuses some nominations (protected names, pseudo-headers, tokens that are
/// not tokens, ten or more) before the upstream request; the buffered road does not pass
/// through that code.
#[tokio::test(flavor = "multi_thread")]
async fn connection_nominations_get_the_same_answer_on_both_roads() {
    let up = ScriptedUpstream::start(|_, _| Reply::json(200, ORGANIZATION)).await;
    let events = EventsDir::new();
    let gw = Gateway::start(&two_roads_yaml(&up.base(), &events.path)).await;
    let cases = [
        "keep-alive",
        "X-Request-Id",
        "Host",
        "X-Forwarded-For",
        ":authority",
        "\"X-Request-Id\"",
        "a, b, c, d, e, f, g, h, i, j",
    ];
    let mut differences = Vec::new();
    for nominated in cases {
        let mut got = Vec::new();
        for road in Road::BOTH {
            let rid = format!("conn-{}", uniq());
            let req = format!(
                "GET {}/Organization/o1 HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Request-Id: {rid}\r\nConnection: {nominated}\r\nConnection: close\r\n\r\n",
                road.prefix(),
                gw.port
            );
            // One response, read as soon as it is complete (the connection may stay open).
            let r = common::raw::raw_exchange(gw.port, req.as_bytes()).await;
            let status = r.as_ref().map_or(0, |r| r.status);
            let text = r.map_or(String::new(), |r| {
                String::from_utf8_lossy(&r.body).into_owned()
            });
            let reached = up
                .received()
                .iter()
                .any(|r| r.header("x-request-id") == Some(rid.as_str()));
            let diag = text
                .find("\"diagnostics\"")
                .map(|at| text[at..].replace(&rid, "<id>"))
                .unwrap_or_default();
            got.push((status, reached, diag));
        }
        println!(
            "Connection: {nominated}: streaming {:?} | buffered {:?}",
            got[0], got[1]
        );
        if got[0] != got[1] {
            differences.push(format!(
                "Connection: {nominated}: streaming answered {} ({}), buffered {} ({}) {}",
                got[0].0,
                if got[0].1 {
                    "reached the server"
                } else {
                    "never reached the server"
                },
                got[1].0,
                if got[1].1 {
                    "reached the server"
                } else {
                    "never reached the server"
                },
                got[0].2
            ));
        }
    }
    assert!(
        differences.is_empty(),
        "the roads answer Connection nominations differently:\n{}",
        differences.join("\n")
    );
}

/// A small rewritten answer goes out with its exact length (Pingora then writes head and body
/// in one go, as a plain proxy does); an answer still arriving when its head is ready is
/// framed chunked, never held back. Both are rewritten byte for byte the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_small_rewritten_answer_gets_its_length_and_a_slow_one_is_chunked() {
    let body_for = |base: &str| {
        format!(
            r#"{{"resourceType":"Patient","id":"1","link":[{{"other":{{"reference":"{base}/Patient/2"}}}}],"text":"{}"}}"#,
            "x".repeat(600)
        )
    };
    let up = ScriptedUpstream::start(move |r, _| {
        let base = format!("http://{}/fhir", r.header("host").unwrap_or(""));
        let body = body_for(&base).into_bytes();
        if r.target.contains("slow") {
            Reply::Trickle {
                status: 200,
                content_type: "application/fhir+json".into(),
                body,
                gap: std::time::Duration::from_millis(300),
            }
        } else {
            Reply::Full {
                status: 200,
                headers: vec![("Content-Type".into(), "application/fhir+json".into())],
                body,
            }
        }
    })
    .await;
    let events = EventsDir::new();
    let gw = Gateway::start(&two_roads_yaml(&up.base(), &events.path)).await;
    // The public base comes from the caller's Host: a longer name than the server's.
    let want = body_for(&format!("http://gateway.example:{}/fhir", gw.port));
    assert_ne!(
        want.len(),
        body_for(&up.base()).len(),
        "the rewrite must change the length"
    );
    for (path, framing) in [
        ("/fhir/Patient/1", "length"),
        ("/fhir/Patient/slow", "chunked"),
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: gateway.example:{}\r\nConnection: close\r\n\r\n",
            gw.port
        );
        let r = common::raw::raw_exchange(gw.port, req.as_bytes())
            .await
            .unwrap_or_else(|| panic!("{path}: no answer\n{}", gw.log()));
        assert_eq!(r.status, 200, "{path}");
        let got = (
            r.header("content-length").map(str::to_string),
            r.header("transfer-encoding").map(str::to_string),
        );
        let expected = match framing {
            "length" => (Some(want.len().to_string()), None),
            _ => (None, Some("chunked".to_string())),
        };
        assert_eq!(got, expected, "{path}: (content-length, transfer-encoding)");
        assert_eq!(String::from_utf8_lossy(&r.body), want, "{path}");
    }
}
