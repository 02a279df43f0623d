//! Conditional reads are no existence oracle (issue 14, pitfall 26, spec §9): a caller whose
//! answers the route's post chain filters never gets the FHIR server's 304 for a resource the
//! filter would refuse. The gateway drops `If-None-Match` / `If-Modified-Since` from such a
//! caller's read, lets the filter judge the server's 200, and answers the 304 itself when the
//! caller may see the resource. Callers the chain does not filter are proxied unchanged.
//! Against the real SEKMET server and IdP-signed tokens.

mod common;

use common::idp::*;
use common::*;
use serde_json::{json, Value};

/// Two patients with one Observation each, written straight into SEKMET (version 1 each).
struct Seed {
    a: String,
    obs_a: String,
    obs_b: String,
}

async fn seed() -> Seed {
    let run = format!("cr-{}", uniq());
    let (a, b) = (format!("{run}-a"), format!("{run}-b"));
    let put = |key: String, body: Value| async move {
        let r = client()
            .put(format!("{}/{key}", sekmet_url()))
            .header("Content-Type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "seeding {key}: {}", r.status());
    };
    for p in [&a, &b] {
        put(
            format!("Patient/{p}"),
            json!({"resourceType":"Patient","id":p,"name":[{"family":run}]}),
        )
        .await;
        put(
            format!("Observation/{p}-obs"),
            json!({"resourceType":"Observation","id":format!("{p}-obs"),"status":"final",
                   "code":{"text":"heart rate"},"subject":{"reference":format!("Patient/{p}")},
                   "valueQuantity":{"value":72.0}}),
        )
        .await;
    }
    Seed {
        obs_a: format!("Observation/{a}-obs"),
        obs_b: format!("Observation/{b}-obs"),
        a,
    }
}

/// The participant filters on the main route; Patient may read.
async fn filtered_gateway() -> Gateway {
    jwt_gateway(
        "policy:\n  read: [Reader, Administrator, Patient]\n  write: [Writer, Administrator]\npost:\n  - name: ParticipantFilter\n  - name: ConsentOptOut\n    settings: {category: \"http://loinc.org|59284-0\"}\n",
    )
    .await
}

/// A GET through the gateway with extra headers: (status, headers, body, correlation id).
async fn get(
    gw: &Gateway,
    tok: &str,
    key: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String, String) {
    let rid = format!("cr-{}", uniq());
    let mut rb = client()
        .get(format!("{}/{key}", gw.base()))
        .bearer_auth(tok)
        .header("X-Request-Id", &rid);
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    let r = rb.send().await.unwrap();
    let (status, h) = (r.status().as_u16(), r.headers().clone());
    (status, h, r.text().await.unwrap(), rid)
}

/// The headers SEKMET received for the read of `key` under correlation id `rid` (ParticipantFilter
/// may make lookups of its own under the same id).
fn sekmet_read_headers(rid: &str, key: &str) -> serde_json::Map<String, Value> {
    let rec = sekmet_received(rid);
    let read = rec
        .iter()
        .find(|r| r["method"] == "GET" && r["url"].as_str().unwrap_or("").ends_with(key))
        .unwrap_or_else(|| panic!("SEKMET did not receive GET {key} for {rid}: {rec:?}"));
    read["headers"].as_object().unwrap().clone()
}

const CONDITIONAL_SETS: [&[(&str, &str)]; 4] = [
    &[("If-None-Match", "W/\"1\"")],
    &[("If-None-Match", "*")],
    &[("If-Modified-Since", "Mon, 01 Jan 2024 00:00:00 GMT")],
    &[
        ("If-None-Match", "W/\"0\", W/\"1\""),
        ("If-Modified-Since", "Mon, 01 Jan 2024 00:00:00 GMT"),
    ],
];

#[tokio::test(flavor = "multi_thread")]
async fn a_hidden_resource_is_refused_alike_with_or_without_conditional_headers() {
    let s = seed().await;
    // The oracle exists at the server: asked directly, SEKMET confirms B's Observation with a 304.
    let direct = client()
        .get(format!("{}/{}", sekmet_url(), s.obs_b))
        .header("If-None-Match", "W/\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(
        direct.status(),
        304,
        "SEKMET itself answers the conditional read"
    );

    let gw = filtered_gateway().await;
    let ta = user_token(
        &format!("{}-oid", s.a),
        &["Patient"],
        Some(&format!("Patient/{}", s.a)),
    );
    let (status, _, body, rid) = get(&gw, &ta, &s.obs_b, &[]).await;
    assert_eq!(status, 403, "A may not see B's Observation: {body}");
    let plain: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(plain["resourceType"], "OperationOutcome", "{plain}");
    let plain = body.replace(&rid, "<id>");

    for set in CONDITIONAL_SETS {
        let (status, h, body, rid) = get(&gw, &ta, &s.obs_b, set).await;
        assert_eq!(status, 403, "{set:?}: {body}");
        assert_eq!(
            body.replace(&rid, "<id>"),
            plain,
            "{set:?}: the same OperationOutcome as without the header"
        );
        assert!(h.get("etag").is_none(), "{set:?}: no ETag on the refusal");
        let got = sekmet_read_headers(&rid, &s.obs_b);
        for name in ["if-none-match", "if-modified-since"] {
            assert!(
                !got.contains_key(name),
                "{set:?}: SEKMET received {name}: {got:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_visible_resource_gets_the_gateways_own_304() {
    let s = seed().await;
    let gw = filtered_gateway().await;
    let ta = user_token(
        &format!("{}-oid", s.a),
        &["Patient"],
        Some(&format!("Patient/{}", s.a)),
    );
    let (status, h, body, _) = get(&gw, &ta, &s.obs_a, &[]).await;
    assert_eq!(status, 200, "A reads their own Observation: {body}");
    let etag = h["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, "W/\"1\"");

    // Its ETag, the strong spelling of it (weak comparison), any.
    for ask in [etag.as_str(), "\"1\"", "*"] {
        let (status, h, body, rid) = get(&gw, &ta, &s.obs_a, &[("If-None-Match", ask)]).await;
        assert_eq!(status, 304, "If-None-Match {ask}: {body}");
        assert!(body.is_empty(), "a 304 has no body: {body}");
        assert_eq!(h["etag"], etag.as_str(), "If-None-Match {ask}");
        assert_eq!(h["x-request-id"], rid.as_str());
        assert!(h.get("content-type").is_none(), "{h:?}");
        let got = sekmet_read_headers(&rid, &s.obs_a);
        assert!(!got.contains_key("if-none-match"), "{ask}: {got:?}");
    }
    // A stale ETag: the resource, as without the header.
    let (status, h, body, _) = get(&gw, &ta, &s.obs_a, &[("If-None-Match", "W/\"0\"")]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(h["etag"], etag.as_str());
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["id"], format!("{}-obs", s.a));
    // If-Modified-Since alone is not evaluated by the gateway: the resource comes back whole.
    let (status, _, body, rid) = get(
        &gw,
        &ta,
        &s.obs_a,
        &[("If-Modified-Since", "Fri, 01 Jan 2100 00:00:00 GMT")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(!sekmet_read_headers(&rid, &s.obs_a).contains_key("if-modified-since"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_administrators_conditional_read_is_forwarded_unchanged() {
    let s = seed().await;
    let gw = filtered_gateway().await;
    let admin = token("admin-app").await;
    let (status, h, body, rid) = get(
        &gw,
        &admin,
        &s.obs_b,
        &[
            ("If-None-Match", "W/\"1\""),
            ("If-Modified-Since", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ],
    )
    .await;
    assert_eq!(
        status, 304,
        "SEKMET's own 304 reaches the Administrator: {body}"
    );
    assert!(body.is_empty());
    assert_eq!(h["etag"], "W/\"1\"");
    let got = sekmet_read_headers(&rid, &s.obs_b);
    assert_eq!(got["if-none-match"], "W/\"1\"", "{got:?}");
    assert_eq!(got["if-modified-since"], "Mon, 01 Jan 2024 00:00:00 GMT");
    assert_eq!(
        road_of(&gw, &rid).await,
        "stream",
        "the filters bypass the Administrator"
    );
}
