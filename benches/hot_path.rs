//! Criterion benchmarks of the per-request work that is ours, not Pingora's: the fixed cost
//! of a small streamed GET (`FhirProxy::fixed_cost`: request head in, upstream head out,
//! response head and a one-chunk body out, no network), JWT verification with cached keys,
//! and the streaming URL rewrite.
//!
//! `cargo bench --bench hot_path` (release profile). Numbers go in the issue notes and
//! load-tests/results; they are never asserted in tests.

use base64::Engine;
use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use fhir_gateway::auth::Authenticator;
use fhir_gateway::config::{AuthConfig, AuthMode, IssuerConfig, OneOrMany};
use fhir_gateway::rewrite::{Rewriter, StreamRewrite};
use fhir_gateway_modules::processor::{
    ClientRequest, Context, EventSink, FhirClient, ModuleError, PostOutcome, PostProcess, Request,
    Response,
};
use http::HeaderMap;
use serde_json::json;

#[path = "../tests/common/fixed.rs"]
mod fixed;

/// One small GET through the gateway's hooks, without the network (see `fixed_cost`).
fn fixed_cost(c: &mut Criterion) {
    let ip: std::net::IpAddr = "10.0.0.4".parse().unwrap();
    let mut g = c.benchmark_group("fixed_cost");
    for (name, jwt) in [("insecure_dev", false), ("jwt_cached_token", true)] {
        let f = fixed::fixture(jwt);
        g.bench_function(name, |b| {
            b.iter_batched(
                || (f.response.clone(), f.body.clone()),
                |(response, body)| {
                    futures::executor::block_on(f.proxy.fixed_cost(&f.request, ip, response, body))
                        .unwrap()
                },
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

fn rsa_issuer() -> (Authenticator, String) {
    let rsa = openssl::rsa::Rsa::generate(2048).unwrap();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwks = json!({"keys":[{
        "kty":"RSA","kid":"bench-1","alg":"RS256","use":"sig",
        "n": b64.encode(rsa.n().to_vec()), "e": b64.encode(rsa.e().to_vec())
    }]});
    let cfg = AuthConfig {
        mode: AuthMode::Jwt,
        clock_skew_secs: 60,
        issuers: vec![IssuerConfig {
            name: "bench".into(),
            issuer: OneOrMany::One("https://idp.bench".into()),
            discovery_url: None,
            jwks_url: Some("http://127.0.0.1:1/jwks".into()),
            audiences: vec!["api://fhir-gateway".into()],
            allowed_tenants: vec!["t1".into()],
            algorithms: None,
            shared_secret: None,
            claims: Default::default(),
            roles: Default::default(),
        }],
        jwks: Default::default(),
        smart: Default::default(),
        offload: None,
        audit_headers: Default::default(),
    };
    let auth = Authenticator::new(&cfg, reqwest::Client::new()).unwrap();
    auth.issuers[0].keys.load(jwks).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = json!({
        "iss":"https://idp.bench","aud":"api://fhir-gateway","exp":now+3600,"iat":now,
        "oid":"user-1","tid":"t1","upn":"ada@hospital.example","roles":["Reader"],
        "scp":"user/*.read patient/Observation.read"
    });
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("bench-1".into());
    let key = jsonwebtoken::EncodingKey::from_rsa_pem(&rsa.private_key_to_pem().unwrap()).unwrap();
    (auth, jsonwebtoken::encode(&h, &claims, &key).unwrap())
}

fn jwt(c: &mut Criterion) {
    let (auth, token) = rsa_issuer();
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    assert!(rt.block_on(auth.authenticate(&headers, None)).is_ok());
    c.bench_function("jwt_rs256_full_verify_cached_keys", |b| {
        b.iter(|| {
            rt.block_on(auth.verify_uncached(black_box(&token)))
                .unwrap()
        })
    });
    c.bench_function("jwt_rs256_authenticate_repeat_token", |b| {
        b.iter(|| {
            rt.block_on(auth.authenticate(black_box(&headers), None))
                .unwrap()
        })
    });
}

fn rewrite(c: &mut Criterion) {
    let up = "http://10.0.0.5:8090/fhir".to_string();
    let rw = Rewriter::new(std::slice::from_ref(&up));
    let to = rw.replacements("https://fhir.hospital.example/fhir");
    // A 100-entry searchset-like body, ~64 KiB, with two URLs per entry.
    let mut body = String::from("{\"resourceType\":\"Bundle\",\"entry\":[");
    for i in 0..100 {
        body.push_str(&format!(
            "{{\"fullUrl\":\"{up}/Observation/{i}\",\"resource\":{{\"resourceType\":\"Observation\",\"id\":\"{i}\",\"subject\":{{\"reference\":\"{up}/Patient/p1\"}},\"valueQuantity\":{{\"value\":72,\"unit\":\"beats/min\",\"system\":\"http://unitsofmeasure.org\"}},\"note\":[{{\"text\":\"{}\"}}]}}}},",
            "x".repeat(420)
        ));
    }
    body.push_str("]}");
    let bytes = Bytes::from(body);
    let mut g = c.benchmark_group("rewrite");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.bench_function("stream_16k_chunks", |b| {
        b.iter(|| {
            let mut s = StreamRewrite::default();
            let mut n = 0;
            for chunk in bytes.chunks(16 * 1024) {
                n += s.push(&rw, &to, Bytes::copy_from_slice(chunk)).len();
            }
            n + s.finish(&rw, &to).len()
        })
    });
    let plain = Bytes::from(
        bytes
            .to_vec()
            .iter()
            .map(|&b| if b == b'h' { b'H' } else { b })
            .collect::<Vec<u8>>(),
    );
    g.bench_function("stream_no_match", |b| {
        b.iter(|| {
            let mut s = StreamRewrite::default();
            let mut n = 0;
            for chunk in plain.chunks(16 * 1024) {
                n += s.push(&rw, &to, Bytes::copy_from_slice(chunk)).len();
            }
            n
        })
    });
    // The module path rewrites a whole buffered body at once: ~1 MB, ~3,200 URLs.
    let big = Bytes::from(bytes.repeat(16));
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.bench_function("rewrite_all_1mb_buffered", |b| {
        b.iter(|| rw.rewrite_all(black_box(&big), &to).map(|v| v.len()))
    });
    g.finish();
}

struct Noop;

#[async_trait::async_trait]
impl PostProcess for Noop {
    fn name(&self) -> &'static str {
        "Noop"
    }
    async fn process(
        &self,
        _r: &Request,
        _p: &mut Response,
        _c: &Context,
    ) -> Result<PostOutcome, ModuleError> {
        Ok(PostOutcome::Continue)
    }
}

struct NoClient;

#[async_trait::async_trait]
impl FhirClient for NoClient {
    async fn send(&self, _r: ClientRequest) -> Result<Response, ModuleError> {
        Err(ModuleError::Failed("none".into()))
    }
}

struct NoSink;
#[async_trait::async_trait]
impl EventSink for NoSink {
    async fn publish(&self, _k: &str, _e: serde_json::Value) {}
}

/// A 1,000-entry searchset: streamed as bytes (no module), through three no-op post modules
/// (parse once, run three, serialise once), and the predecessor's way (each module parsing
/// and serialising the body again).
fn chain(c: &mut Criterion) {
    let up = "http://10.0.0.5:8090/fhir".to_string();
    let rw = Rewriter::new(std::slice::from_ref(&up));
    let to = rw.replacements("https://fhir.hospital.example/fhir");
    let entries: Vec<serde_json::Value> = (0..1000)
        .map(|i| json!({"fullUrl": format!("{up}/Observation/{i}"), "resource": {"resourceType":"Observation","id":i.to_string(),"status":"final","code":{"coding":[{"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}]},"subject":{"reference":"Patient/p1"},"effectiveDateTime":"2024-01-01T10:00:00Z","valueQuantity":{"value":72,"unit":"beats/minute","system":"http://unitsofmeasure.org","code":"/min"}},"search":{"mode":"match"}}))
        .collect();
    let body = serde_json::to_vec(
        &json!({"resourceType":"Bundle","type":"searchset","total":1000,"entry":entries}),
    )
    .unwrap();
    let bytes = Bytes::from(body.clone());
    let modules: Vec<std::sync::Arc<dyn PostProcess>> = vec![
        std::sync::Arc::new(Noop),
        std::sync::Arc::new(Noop),
        std::sync::Arc::new(Noop),
    ];
    let cx = Context {
        identity: None,
        correlation_id: "b".into(),
        public_base: "https://fhir.hospital.example/fhir".into(),
        upstream_base: "http://fhir.internal/fhir".into(),
        links: std::sync::Arc::new(fhir_gateway_modules::links::Directory::new(
            Default::default(),
        )),
        fhir: std::sync::Arc::new(NoClient),
        events: std::sync::Arc::new(NoSink),
    };
    let req = Request {
        method: "GET".into(),
        path: "/Observation".into(),
        query: String::new(),
        headers: vec![],
        body: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("searchset_1000");
    g.throughput(Throughput::Bytes(body.len() as u64));
    g.bench_function("no_module_streamed", |b| {
        b.iter(|| {
            let mut s = StreamRewrite::default();
            let mut n = 0;
            for chunk in bytes.chunks(16 * 1024) {
                n += s.push(&rw, &to, Bytes::copy_from_slice(chunk)).len();
            }
            n + s.finish(&rw, &to).len()
        })
    });
    g.bench_function("three_noop_post_modules_one_parse", |b| {
        b.iter(|| {
            let v: serde_json::Value = serde_json::from_slice(black_box(&body)).unwrap();
            let mut resp = Response::json(200, v);
            rt.block_on(fhir_gateway::chain::run_post(
                "/fhir", &modules, &req, &mut resp, &cx,
            ))
            .unwrap();
            let out = serde_json::to_vec(resp.json_body().unwrap()).unwrap();
            rw.rewrite_all(&out, &to).map_or(out.len(), |o| o.len())
        })
    });
    g.bench_function("three_modules_each_parsing_again", |b| {
        b.iter(|| {
            let mut cur = black_box(body.clone());
            for _ in 0..3 {
                let v: serde_json::Value = serde_json::from_slice(&cur).unwrap();
                cur = serde_json::to_vec(&v).unwrap();
            }
            rw.rewrite_all(&cur, &to).map_or(cur.len(), |o| o.len())
        })
    });
    g.finish();
}

/// Answers the filters' relation and consent lookups, counting them.
struct Directory {
    calls: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl FhirClient for Directory {
    async fn send(&self, r: ClientRequest) -> Result<Response, ModuleError> {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = r.path_and_query;
        let entries: Vec<serde_json::Value> = if p.starts_with("Patient?") {
            (0..20)
                .map(|i| {
                    json!({"resource": {"resourceType": "Patient", "id": format!("p{i}"),
                        "generalPractitioner": [{"reference": "Practitioner/dr"}]}})
                })
                .collect()
        } else {
            vec![]
        };
        Ok(Response::json(
            200,
            json!({"resourceType": "Bundle", "type": "searchset", "entry": entries}),
        ))
    }
}

/// ParticipantFilter + ConsentOptOut over a 100-entry searchset (20 patients of the caller,
/// 10 entries of others) with warm caches: the cost per request, and no lookups at all.
fn data_filters(c: &mut Criterion) {
    use fhir_gateway_modules::builtin::{build_post, consent_opt_out, participant_filter};
    let pf = build_post(participant_filter::ParticipantFilter::NAME, &json!({})).unwrap();
    let co = build_post(
        consent_opt_out::ConsentOptOut::NAME,
        &json!({"category": "http://loinc.org|59284-0"}),
    )
    .unwrap();
    let client = std::sync::Arc::new(Directory {
        calls: Default::default(),
    });
    let cx = Context {
        identity: Some(fhir_gateway_modules::Identity {
            user_id: "u".into(),
            roles: vec![fhir_gateway_modules::Role::Practitioner],
            fhir_user: Some("Practitioner/dr".into()),
            ..Default::default()
        }),
        correlation_id: "b".into(),
        public_base: "https://fhir.hospital.example/fhir".into(),
        upstream_base: "http://10.0.0.5:8090/fhir".into(),
        links: std::sync::Arc::new(fhir_gateway_modules::links::Directory::new(
            Default::default(),
        )),
        fhir: client.clone(),
        events: std::sync::Arc::new(NoSink),
    };
    let entries: Vec<serde_json::Value> = (0..100)
        .map(|i| {
            let p = if i < 90 { format!("p{}", i % 20) } else { format!("other{i}") };
            json!({"fullUrl": format!("http://10.0.0.5:8090/fhir/Observation/o{i}"),
                   "resource": {"resourceType": "Observation", "id": format!("o{i}"), "status": "final",
                                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                                "subject": {"reference": format!("Patient/{p}")},
                                "performer": [{"reference": "Practitioner/dr"}],
                                "effectiveDateTime": "2024-01-01T10:00:00Z",
                                "valueQuantity": {"value": 72, "unit": "/min"}},
                   "search": {"mode": "match"}})
        })
        .collect();
    let body =
        json!({"resourceType": "Bundle", "type": "searchset", "total": 100, "entry": entries});
    let req = Request {
        method: "GET".into(),
        path: "/Observation".into(),
        query: "code=8867-4&_count=100".into(),
        headers: vec![],
        body: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let run = |resp: &mut Response| {
        rt.block_on(async {
            pf.process(&req, resp, &cx).await.unwrap();
            co.process(&req, resp, &cx).await.unwrap();
        })
    };
    // Warm the caches; then every request must be answered without a lookup.
    let mut first = Response::json(200, body.clone());
    run(&mut first);
    let kept = first.json_body().unwrap()["entry"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(
        kept, 91,
        "90 of the caller's patients + the filtered notice"
    );
    let warm = client.calls.load(std::sync::atomic::Ordering::Relaxed);
    c.bench_function(
        "participant+consent filters, 100-entry searchset, warm",
        |b| {
            b.iter_batched(
                || Response::json(200, body.clone()),
                |mut resp| {
                    run(&mut resp);
                    resp
                },
                criterion::BatchSize::SmallInput,
            )
        },
    );
    let after = client.calls.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "lookups while warming: {warm}; lookups during the benchmark: {}",
        after - warm
    );
    assert_eq!(after, warm, "a warm cache makes no upstream call");
}

/// A P2-shaped searchset (load-tests p2): 100 Observations of ~1.9 KB, every 5th another
/// patient's, URLs absolute at the upstream, decimals as the server wrote them.
pub fn p2_searchset() -> Vec<u8> {
    let base = "http://10.0.0.5:8090/fhir";
    let note = "Home monitoring device reading transmitted through the patient portal and reviewed by the care team.";
    let entries: Vec<String> = (0..100)
        .map(|i| {
            let p = if i % 5 != 0 { format!("p{}", i % 20) } else { format!("other{i}") };
            let r = format!(
                r#"{{"resourceType":"Observation","id":"obs-{i:05}","meta":{{"versionId":"1","lastUpdated":"2024-06-01T10:00:00.000+00:00","source":"{base}/Device/monitor-1","profile":["http://hl7.org/fhir/StructureDefinition/vitalsigns"]}},"text":{{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\"><p><b>Body temperature</b>: 37.20 Cel</p><p>{note}</p></div>"}},"identifier":[{{"system":"urn:ietf:rfc:3986","value":"urn:uuid:5b1d{i:028x}"}}],"status":"final","category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs","display":"Vital Signs"}}]}}],"code":{{"coding":[{{"system":"http://loinc.org","code":"8310-5","display":"Body temperature"}}],"text":"Body temperature"}},"subject":{{"reference":"Patient/{p}"}},"encounter":{{"reference":"{base}/Encounter/enc-{p}-{i}"}},"effectiveDateTime":"2024-01-01T08:00:00+01:00","issued":"2024-01-01T08:00:00+01:00","performer":[{{"reference":"{base}/Practitioner/dr","display":"Dr. Example 1"}}],"valueQuantity":{{"value":37.20,"unit":"Cel","system":"http://unitsofmeasure.org","code":"Cel"}},"interpretation":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation","code":"N","display":"Normal"}}]}}],"referenceRange":[{{"low":{{"value":36.0,"unit":"Cel","system":"http://unitsofmeasure.org","code":"Cel"}},"high":{{"value":38.0,"unit":"Cel","system":"http://unitsofmeasure.org","code":"Cel"}},"text":"normal range"}}],"device":{{"reference":"{base}/Device/monitor-1"}},"note":[{{"text":"{note}"}}]}}"#
            );
            format!(r#"{{"fullUrl":"{base}/Observation/obs-{i:05}","resource":{r},"search":{{"mode":"match"}}}}"#)
        })
        .collect();
    format!(
        r#"{{"resourceType":"Bundle","id":"bench","meta":{{"lastUpdated":"2024-06-30T12:00:00.000+00:00"}},"type":"searchset","total":240,"link":[{{"relation":"self","url":"{base}/Observation?_count=100"}},{{"relation":"next","url":"{base}/Observation?_count=100&_getpages=x&_getpagesoffset=100"}}],"entry":[{}]}}"#,
        entries.join(",")
    )
    .into_bytes()
}

/// The buffered road's stages for a P2 answer, one by one (where the ms per MB go).
fn p2_stages(c: &mut Criterion) {
    let raw = p2_searchset();
    let mut g = c.benchmark_group("p2_stages");
    g.throughput(Throughput::Bytes(raw.len() as u64));
    g.bench_function("parse_value", |b| {
        b.iter(|| serde_json::from_slice::<serde_json::Value>(black_box(&raw)).unwrap())
    });
    let tree: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    g.bench_function("clone_value", |b| b.iter(|| black_box(&tree).clone()));
    g.bench_function("eq_value", |b| {
        let other = tree.clone();
        b.iter(|| black_box(&tree) == black_box(&other))
    });
    let mut edited = tree.clone();
    let e = edited["entry"].as_array_mut().unwrap();
    e.retain(|x| {
        !x["resource"]["subject"]["reference"]
            .as_str()
            .unwrap()
            .contains("other")
    });
    edited.as_object_mut().unwrap().shift_remove("total");
    g.bench_function("faithful_to_vec_filtered", |b| {
        b.iter(|| fhir_gateway::faithful::to_vec(black_box(&edited), &tree, &raw))
    });
    // The two ways the buffered road prepares, filters (one entry in five removed) and writes
    // a P2 answer, without the modules' own work.
    let drop_others = |v: &mut serde_json::Value| {
        v["entry"].as_array_mut().unwrap().retain(|x| {
            !x["resource"]["subject"]["reference"]
                .as_str()
                .unwrap()
                .contains("other")
        });
        v.as_object_mut().unwrap().shift_remove("total");
    };
    g.bench_function("whole_parse_clone_filter_write", |b| {
        b.iter(|| {
            let orig: serde_json::Value = serde_json::from_slice(black_box(&raw)).unwrap();
            let mut out = orig.clone();
            drop_others(&mut out);
            fhir_gateway::faithful::to_vec(&out, &orig, &raw)
        })
    });
    g.bench_function("cut_parse_clone_filter_write", |b| {
        b.iter(|| {
            let cut = fhir_gateway::faithful::parse_cut(
                black_box(&raw),
                fhir_gateway_modules::compartment::decides_owner,
            )
            .unwrap();
            let mut out = cut.tree.clone();
            drop_others(&mut out);
            cut.to_vec(&out, &raw)
        })
    });
    g.bench_function("rawvalue_scan", |b| {
        b.iter(|| {
            let top: std::collections::HashMap<&str, &serde_json::value::RawValue> =
                serde_json::from_slice(black_box(&raw)).unwrap();
            let e: Vec<&serde_json::value::RawValue> =
                serde_json::from_str(top["entry"].get()).unwrap();
            e.len()
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    fixed_cost,
    jwt,
    rewrite,
    chain,
    data_filters,
    p2_stages
);
criterion_main!(benches);
