//! The gateway in front of the real SEKMET FHIR R4 server: CRUD, paging, bundles, XML, header
//! hygiene — asserting on status, body bytes, every header, and what SEKMET recorded.

mod common;

use common::raw::raw_request;
use common::*;
use serde_json::{json, Value};
use std::collections::HashSet;

const FHIR_JSON: &str = "application/fhir+json";

#[tokio::test(flavor = "multi_thread")]
async fn crud_round_trip_with_rewritten_location() {
    let gw = Gateway::in_front_of_sekmet().await;
    let c = client();
    let family = format!("Crud{}", uniq());

    // Create.
    let r = c
        .post(format!("{}/Patient", gw.base()))
        .header("Content-Type", FHIR_JSON)
        .body(json!({"resourceType":"Patient","name":[{"family":family}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    assert!(loc.starts_with(&format!("{}/Patient/", gw.base())), "{loc}");
    assert!(loc.ends_with("/_history/1"), "{loc}");
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    assert_no_upstream_address(&headers, &body, &sekmet_url());
    let created: Value = serde_json::from_slice(&body).unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(loc.contains(&id));

    // Read it back through the Location the gateway gave us (minus the version).
    let read_url = loc.split("/_history").next().unwrap().to_string();
    let r = c.get(&read_url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with(FHIR_JSON));
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["name"][0]["family"], family.as_str());

    // Update.
    let r = c
        .put(&read_url)
        .header("Content-Type", FHIR_JSON)
        .body(
            json!({"resourceType":"Patient","id":id,"name":[{"family":family}],"gender":"female"})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["meta"]["versionId"], "2");
    assert_eq!(p["gender"], "female");

    // Delete, then read → 410 from the server, passed through.
    let r = c.delete(&read_url).send().await.unwrap();
    assert!(r.status() == 200 || r.status() == 204, "{}", r.status());
    let r = c.get(&read_url).send().await.unwrap();
    assert_eq!(r.status(), 410);
}

#[tokio::test(flavor = "multi_thread")]
async fn paging_through_every_next_link_never_names_the_upstream() {
    let gw = Gateway::in_front_of_sekmet().await;
    let c = client();
    let family = format!("Page{}", uniq());
    let mut created = HashSet::new();
    for i in 0..8 {
        let r = c
            .post(format!("{}/Patient", gw.base()))
            .header("Content-Type", FHIR_JSON)
            .body(json!({"resourceType":"Patient","name":[{"family":family,"given":[format!("G{i}")]}]}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let v: Value = r.json().await.unwrap();
        created.insert(v["id"].as_str().unwrap().to_string());
    }

    let mut url = format!("{}/Patient?family={family}&_count=3", gw.base());
    let mut seen = HashSet::new();
    let mut pages = 0;
    loop {
        pages += 1;
        assert!(pages < 10, "paging does not end");
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let headers = r.headers().clone();
        let body = r.bytes().await.unwrap();
        assert_no_upstream_address(&headers, &body, &sekmet_url());
        let b: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(b["total"], 8);
        for e in b["entry"].as_array().unwrap() {
            let full = e["fullUrl"].as_str().unwrap();
            assert!(
                full.starts_with(&format!("{}/Patient/", gw.base())),
                "{full}"
            );
            seen.insert(e["resource"]["id"].as_str().unwrap().to_string());
        }
        for l in b["link"].as_array().unwrap() {
            assert!(l["url"].as_str().unwrap().starts_with(&gw.base()), "{l}");
        }
        match b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        {
            Some(next) => url = next["url"].as_str().unwrap().to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created);
}

#[tokio::test(flavor = "multi_thread")]
async fn transaction_and_batch_pass_through_intact() {
    let gw = Gateway::in_front_of_sekmet().await;
    let c = client();
    let family = format!("Tx{}", uniq());
    let tx = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
             "resource": {"resourceType":"Patient","name":[{"family":family}]},
             "request": {"method":"POST","url":"Patient"}},
            {"fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
             "resource": {"resourceType":"Observation","status":"final",
                          "code":{"text":"heart rate"},
                          "subject":{"reference":"urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a"}},
             "request": {"method":"POST","url":"Observation"}}
        ]
    });
    let r = c
        .post(gw.base())
        .header("Content-Type", FHIR_JSON)
        .body(tx.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    assert_no_upstream_address(&headers, &body, &sekmet_url());
    let b: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(b["type"], "transaction-response");
    let locs: Vec<String> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["location"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(locs.len(), 2);
    // The Observation, read back through the gateway, references the new Patient.
    let obs_path = locs[1].trim_start_matches(&format!("{}/", gw.base()));
    let obs_path = obs_path.split("/_history").next().unwrap();
    let patient_ref = locs[0]
        .trim_start_matches(&format!("{}/", gw.base()))
        .split("/_history")
        .next()
        .unwrap()
        .to_string();
    let o: Value = c
        .get(format!("{}/{obs_path}", gw.base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(o["subject"]["reference"], patient_ref.as_str());

    // A batch with a read, a create, and a miss: per-entry statuses come back untouched.
    let batch = json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": [
            {"request": {"method":"GET","url": patient_ref}},
            {"resource": {"resourceType":"Patient","name":[{"family":family}]},
             "request": {"method":"POST","url":"Patient"}},
            {"request": {"method":"GET","url":"Patient/does-not-exist-xyz"}}
        ]
    });
    let r = c
        .post(gw.base())
        .header("Content-Type", FHIR_JSON)
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    assert_no_upstream_address(&headers, &body, &sekmet_url());
    let b: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(b["type"], "batch-response");
    let statuses: Vec<&str> = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert!(statuses[0].starts_with("200"), "{statuses:?}");
    assert!(statuses[1].starts_with("201"), "{statuses:?}");
    assert!(statuses[2].starts_with("404"), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn xml_passes_through_with_rewritten_urls() {
    let gw = Gateway::in_front_of_sekmet().await;
    let c = client();
    let family = format!("Xml{}", uniq());
    let r = c
        .post(format!("{}/Patient", gw.base()))
        .header("Content-Type", FHIR_JSON)
        .body(json!({"resourceType":"Patient","name":[{"family":family}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = c
        .get(format!("{}/Patient?family={family}&_format=xml", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ct.starts_with("application/fhir+xml"), "{ct}");
    let headers = r.headers().clone();
    let body = r.text().await.unwrap();
    assert_no_upstream_address(&headers, body.as_bytes(), &sekmet_url());
    assert!(body.contains("<Bundle"), "{body}");
    assert!(
        body.contains(&format!("<fullUrl value=\"{}/Patient/", gw.base())),
        "{body}"
    );
    assert!(body.contains(&family));
}

#[tokio::test(flavor = "multi_thread")]
async fn caller_credentials_and_spoofed_headers_never_reach_sekmet() {
    let gw = Gateway::in_front_of_sekmet().await;
    let rid = format!("test-{}", uniq());
    let r = client()
        .get(format!("{}/Patient?_count=1", gw.base()))
        .header("Authorization", "Bearer caller-token-must-not-leak")
        .header("Accept-Encoding", "gzip, br")
        .header("Cookie", "session=abc")
        .header("X-MS-AZUREFHIR-AUDIT-USERID", "spoofed-user")
        .header("X-MS-AZUREFHIR-AUDIT-PROXY", "spoofed-proxy")
        .header("X-MS-AZUREFHIR-AUDIT-SOURCE", "6.6.6.6")
        .header("X-Forwarded-For", "6.6.6.6")
        .header("X-Custom", "not-allowed")
        .header("Prefer", "handling=lenient")
        .header("X-Request-Id", &rid)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], rid.as_str());

    let rec = sekmet_received(&rid);
    assert_eq!(rec.len(), 1, "{rec:?}");
    let h = rec[0]["headers"].as_object().unwrap();
    for absent in [
        "authorization",
        "accept-encoding",
        "cookie",
        "x-forwarded-for",
        "x-custom",
        "x-ms-azurefhir-audit-userid",
    ] {
        assert!(!h.contains_key(absent), "{absent} reached SEKMET: {h:?}");
    }
    assert_eq!(h["x-ms-azurefhir-audit-proxy"], "fhir-gateway");
    assert_eq!(h["x-ms-azurefhir-audit-source"], "127.0.0.1");
    assert_eq!(h["prefer"], "handling=lenient");
    assert_eq!(h["host"], "127.0.0.1:8090");
    assert_eq!(rec[0]["url"], "/fhir/Patient?_count=1");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_correlation_id_is_replaced() {
    let gw = Gateway::in_front_of_sekmet().await;
    let r = client()
        .get(format!("{}/metadata", gw.base()))
        .header("X-Request-Id", "has spaces and \"quotes\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rid = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(rid, "has spaces and \"quotes\"");
    assert_eq!(rid.len(), 36, "a fresh uuid: {rid}");
    let rec = sekmet_received(&rid);
    assert_eq!(rec.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn long_query_strings_pass_and_longer_ones_get_414() {
    let gw = Gateway::in_front_of_sekmet().await;
    let c = client();
    // 16 KB of query reaches SEKMET (continuation tokens are long).
    let name = "a".repeat(16 * 1024 - "family=".len());
    let rid = format!("q-{}", uniq());
    let r = c
        .get(format!("{}/Patient?family={name}", gw.base()))
        .header("X-Request-Id", &rid)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["total"], 0);
    let rec = sekmet_received(&rid);
    assert_eq!(
        rec[0]["url"].as_str().unwrap().len(),
        "/fhir/Patient?".len() + 16 * 1024
    );

    let rid = format!("q-{}", uniq());
    let r = c
        .get(format!("{}/Patient?family={name}aa", gw.base()))
        .header("X-Request-Id", &rid)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 414, "too-costly").await;
    assert_sekmet_never_received(&rid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_outside_the_api_and_hostile_paths_are_refused() {
    let gw = Gateway::in_front_of_sekmet().await;
    let c = client();
    // /manage exists, but never without JWT auth and an Administrator.
    assert_outcome(
        c.get(gw.url("/manage/links")).send().await.unwrap(),
        403,
        "forbidden",
    )
    .await;
    assert_outcome(
        c.get(gw.url("/managex")).send().await.unwrap(),
        404,
        "not-found",
    )
    .await;
    assert_outcome(
        c.get(gw.url("/fhirx/Patient")).send().await.unwrap(),
        404,
        "not-found",
    )
    .await;
    assert_outcome(c.get(gw.url("/")).send().await.unwrap(), 404, "not-found").await;
    // Raw request lines: an HTTP client would normalise these before sending.
    for bad in [
        "/fhir/..%2fmanage",
        "/fhir/Patient/%2e%2e/x",
        "/fhir/Patient/../../manage",
        "/fhir/Patient%2F1",
        "/fhir//Patient",
        "/fhir/Patient%5c1",
    ] {
        let rid = format!("p-{}", uniq());
        let req = format!("GET {bad} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-Id: {rid}\r\nConnection: close\r\n\r\n");
        let (code, text) = raw_request(gw.port, req.as_bytes()).await;
        assert_eq!(code, 400, "{bad}: {text}");
        assert!(text.contains("\"code\":\"invalid\""), "{bad}: {text}");
        assert_sekmet_never_received(&rid).await;
    }
    // An absolute-form request line cannot redirect the gateway elsewhere.
    let rid = format!("p-{}", uniq());
    let req = format!("GET http://evil.example/fhir/metadata HTTP/1.1\r\nHost: evil.example\r\nX-Request-Id: {rid}\r\nConnection: close\r\n\r\n");
    let (code, _) = raw_request(gw.port, req.as_bytes()).await;
    assert_eq!(code, 200);
    assert_eq!(
        sekmet_received(&rid)[0]["headers"]["host"],
        "127.0.0.1:8090"
    );
    let r = c
        .request(reqwest::Method::OPTIONS, format!("{}/Patient", gw.base()))
        .send()
        .await
        .unwrap();
    assert_outcome(r, 405, "not-supported").await;
    // Health endpoints answer without auth.
    let r = c.get(gw.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = c.get(gw.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_request_bodies_get_413_and_nothing_is_written() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let gw = Gateway::start(&format!(
        "upstream:\n  url: {}\nauth:\n  mode: insecure_dev\nlimits:\n  max_request_body_bytes: 2048\n",
        sekmet_url()
    ))
    .await;
    let family = format!("Big{}", uniq());
    let rid = format!("b-{}", uniq());
    let big = json!({"resourceType":"Patient","name":[{"family":family,"text":"x".repeat(4096)}]})
        .to_string();
    let r = client()
        .post(format!("{}/Patient", gw.base()))
        .header("Content-Type", FHIR_JSON)
        .header("X-Request-Id", &rid)
        .body(big)
        .send()
        .await
        .unwrap();
    assert_outcome(r, 413, "too-costly").await;
    assert_sekmet_never_received(&rid).await;
    // And nothing was created.
    let r = client()
        .get(format!("{}/Patient?family={family}", gw.base()))
        .send()
        .await
        .unwrap();
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["total"], 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn configured_public_base_url_is_used_in_responses() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let gw = Gateway::start(&format!(
        "public_base_url: https://fhir.hospital.example/api/fhir/\nupstream:\n  url: {}/\nauth:\n  mode: insecure_dev\n",
        sekmet_url()
    ))
    .await;
    let r = client()
        .post(format!("{}/Patient", gw.base()))
        .header("Content-Type", FHIR_JSON)
        .body(json!({"resourceType":"Patient","name":[{"family":"Pub"}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let loc = r.headers()["location"].to_str().unwrap();
    assert!(
        loc.starts_with("https://fhir.hospital.example/api/fhir/Patient/"),
        "{loc}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_host_is_believed_only_from_trusted_proxies() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let family = format!("Fwd{}", uniq());
    let create = |base: String| {
        let family = family.clone();
        async move {
            client()
                .post(format!("{base}/Patient"))
                .header("Content-Type", FHIR_JSON)
                .header("X-Forwarded-Host", "lb.hospital.example")
                .header("X-Forwarded-Proto", "https")
                .body(json!({"resourceType":"Patient","name":[{"family":family}]}).to_string())
                .send()
                .await
                .unwrap()
        }
    };
    // Untrusted (no trusted_proxies): the Host the client used.
    let gw = Gateway::in_front_of_sekmet().await;
    let r = create(gw.base()).await;
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    assert!(loc.starts_with(&gw.base()), "{loc}");
    drop(gw);
    // Trusted loopback proxy: the forwarded scheme and host.
    let gw = Gateway::start(&format!(
        "trusted_proxies: [127.0.0.1]\nupstream:\n  url: {}\nauth:\n  mode: insecure_dev\n",
        sekmet_url()
    ))
    .await;
    let r = create(gw.base()).await;
    let loc = r.headers()["location"].to_str().unwrap();
    assert!(
        loc.starts_with("https://lb.hospital.example/fhir/Patient/"),
        "{loc}"
    );
}
