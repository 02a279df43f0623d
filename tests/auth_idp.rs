//! Identity and access against the real OIDC provider and the real SEKMET server: the role
//! table, the token catalogue (pitfalls 1), audit headers (pitfalls 4–6), tenants, SMART
//! scopes (pitfall 7), and the anonymous SMART discovery endpoints.

mod common;

use common::idp::*;
use common::*;
use serde_json::{json, Value};

/// Creates a Patient directly at SEKMET (setup, not under test) and returns its id.
async fn seed_patient(family: &str) -> String {
    let r = client()
        .post(format!("{}/Patient", sekmet_url()))
        .header("Content-Type", "application/fhir+json")
        .body(json!({"resourceType":"Patient","name":[{"family":family}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

struct Call {
    name: &'static str,
    method: &'static str,
    path: String,
    body: Option<Value>,
}

#[tokio::test(flavor = "multi_thread")]
async fn each_role_can_do_exactly_what_the_policy_allows() {
    let gw = jwt_gateway("").await;
    let pid = seed_patient(&format!("Roles{}", uniq())).await;
    let patient = json!({"resourceType":"Patient","id":pid,"name":[{"family":"Roles"}]});
    let calls = [
        Call {
            name: "read",
            method: "GET",
            path: format!("/Patient/{pid}"),
            body: None,
        },
        Call {
            name: "search",
            method: "GET",
            path: "/Patient?_count=1".into(),
            body: None,
        },
        Call {
            name: "POST _search",
            method: "POST",
            path: "/Patient/_search".into(),
            body: None,
        },
        Call {
            name: "create",
            method: "POST",
            path: "/Patient".into(),
            body: Some(json!({"resourceType":"Patient","name":[{"family":"RoleCreate"}]})),
        },
        Call {
            name: "update",
            method: "PUT",
            path: format!("/Patient/{pid}"),
            body: Some(patient.clone()),
        },
        Call {
            name: "batch of GETs",
            method: "POST",
            path: "".into(),
            body: Some(json!({"resourceType":"Bundle","type":"batch","entry":[
            {"request":{"method":"GET","url":format!("Patient/{pid}")}},
            {"request":{"method":"GET","url":"Patient?_count=1"}}]})),
        },
        Call {
            name: "transaction with a write",
            method: "POST",
            path: "".into(),
            body: Some(
                json!({"resourceType":"Bundle","type":"transaction","entry":[
            {"resource":{"resourceType":"Patient","name":[{"family":"RoleTx"}]},"request":{"method":"POST","url":"Patient"}}]}),
            ),
        },
    ];
    // client → (read, search, POST _search, create, update, batch GETs, tx write)
    let table: &[(&str, [bool; 7])] = &[
        ("admin-app", [true, true, true, true, true, true, true]),
        ("reader-app", [true, true, true, false, false, true, false]),
        ("writer-app", [false, false, false, true, true, false, true]),
        ("readwrite-app", [true, true, true, true, true, true, true]),
        (
            "norole-app",
            [false, false, false, false, false, false, false],
        ),
    ];
    for (client_id, expected) in table {
        let t = token(client_id).await;
        for (call, allowed) in calls.iter().zip(expected.iter()) {
            let rid = format!("role-{}", uniq());
            let mut rb = client()
                .request(
                    call.method.parse().unwrap(),
                    format!("{}{}", gw.base(), call.path),
                )
                .bearer_auth(&t)
                .header("X-Request-Id", &rid);
            if let Some(b) = &call.body {
                rb = rb
                    .header("Content-Type", "application/fhir+json")
                    .body(b.to_string());
            }
            let r = rb.send().await.unwrap();
            let status = r.status().as_u16();
            if *allowed {
                assert!(
                    (200..300).contains(&status),
                    "{client_id} {}: {status}",
                    call.name
                );
                let body = r.bytes().await.unwrap();
                if call.name.starts_with("batch") || call.name.starts_with("transaction") {
                    let b: Value = serde_json::from_slice(&body).unwrap();
                    assert!(b["type"].as_str().unwrap().ends_with("-response"), "{b}");
                    assert!(!String::from_utf8_lossy(&body).contains("127.0.0.1:8090"));
                }
                assert_eq!(
                    sekmet_received(&rid).len(),
                    1,
                    "{client_id} {} reached SEKMET once",
                    call.name
                );
            } else {
                let v = assert_outcome(r, 403, "forbidden").await;
                let diag = v["issue"][0]["diagnostics"].as_str().unwrap();
                assert!(diag.contains("role:"), "names the failed rule: {diag}");
                assert_sekmet_never_received(&rid).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn token_catalogue_every_bad_token_is_a_401() {
    let gw = jwt_gateway("").await;
    let good = token("admin-app").await;
    let parts: Vec<&str> = good.split('.').collect();
    let jwk = idp_private_jwk(&default_keys_file());
    let now = now_secs();

    let mut forged_claims = claims_of(&good);
    forged_claims["roles"] = json!(["Administrator", "Writer"]);
    forged_claims["oid"] = json!("someone-else");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(forged_claims.to_string().as_bytes()),
        parts[2]
    );

    let alg_none = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);

    // Key confusion: HS256 "signed" with the IdP's public key as the HMAC secret.
    let mut hs = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs.kid = jwk["kid"].as_str().map(str::to_string);
    let confused = jsonwebtoken::encode(
        &hs,
        &claims_of(&good),
        &jsonwebtoken::EncodingKey::from_secret(&public_pem(&jwk)),
    )
    .unwrap();

    // Signed by a key the IdP never published, under an unknown kid and under the IdP's kid.
    let rogue = openssl::rsa::Rsa::generate(2048)
        .unwrap()
        .private_key_to_pem()
        .unwrap();
    let rogue_key = jsonwebtoken::EncodingKey::from_rsa_pem(&rogue).unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    h.kid = Some("unknown-kid-123".into());
    let unknown_kid = jsonwebtoken::encode(&h, &reader_claims(), &rogue_key).unwrap();
    h.kid = jwk["kid"].as_str().map(str::to_string);
    let rogue_signed = jsonwebtoken::encode(&h, &reader_claims(), &rogue_key).unwrap();

    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = reader_claims();
        f(&mut c);
        sign_as_idp(&c)
    };
    let expired = with(&|c| {
        c["exp"] = json!(now - 3600);
        c["iat"] = json!(now - 7200);
    });
    let not_yet = with(&|c| c["nbf"] = json!(now + 3600));
    let future_iat = with(&|c| c["iat"] = json!(now + 3600));
    let wrong_iss = with(&|c| c["iss"] = json!("http://127.0.0.1:9999"));
    let wrong_aud_real =
        token_from(IDP, "reader-app", None, Some("https://fhir.example/api")).await;
    let other_tenant = token("other-tenant-app").await;
    let no_exp = with(&|c| {
        c.as_object_mut().unwrap().remove("exp");
    });
    let huge = format!("{}.{}.{}", parts[0], "A".repeat(20_000), parts[2]);

    type Case<'a> = (&'a str, Vec<(&'a str, String)>, String);
    let cases: Vec<Case> = vec![
        ("no Authorization", vec![], String::new()),
        (
            "alg none",
            vec![("Authorization", format!("Bearer {alg_none}"))],
            String::new(),
        ),
        (
            "HS256 with the RSA public key",
            vec![("Authorization", format!("Bearer {confused}"))],
            String::new(),
        ),
        (
            "unknown kid",
            vec![("Authorization", format!("Bearer {unknown_kid}"))],
            String::new(),
        ),
        (
            "signed by a rogue key under the IdP kid",
            vec![("Authorization", format!("Bearer {rogue_signed}"))],
            String::new(),
        ),
        (
            "tampered payload",
            vec![("Authorization", format!("Bearer {tampered}"))],
            String::new(),
        ),
        (
            "expired",
            vec![("Authorization", format!("Bearer {expired}"))],
            String::new(),
        ),
        (
            "not yet valid",
            vec![("Authorization", format!("Bearer {not_yet}"))],
            String::new(),
        ),
        (
            "wrong iss",
            vec![("Authorization", format!("Bearer {wrong_iss}"))],
            String::new(),
        ),
        (
            "wrong aud (real IdP token for another API)",
            vec![("Authorization", format!("Bearer {wrong_aud_real}"))],
            String::new(),
        ),
        (
            "tenant not allowed (real IdP token)",
            vec![("Authorization", format!("Bearer {other_tenant}"))],
            String::new(),
        ),
        (
            "no exp",
            vec![("Authorization", format!("Bearer {no_exp}"))],
            String::new(),
        ),
        (
            "empty bearer",
            vec![("Authorization", "Bearer ".into())],
            String::new(),
        ),
        (
            "Bearer twice",
            vec![("Authorization", format!("Bearer Bearer {good}"))],
            String::new(),
        ),
        (
            "iat in the future beyond the skew",
            vec![("Authorization", format!("Bearer {future_iat}"))],
            String::new(),
        ),
        (
            "another scheme (Token)",
            vec![("Authorization", format!("Token {good}"))],
            String::new(),
        ),
        (
            "two Authorization headers",
            vec![
                ("Authorization", format!("Bearer {good}")),
                ("Authorization", format!("Bearer {good}")),
            ],
            String::new(),
        ),
        (
            "token in the query string",
            vec![],
            format!("&access_token={good}"),
        ),
        (
            "token in the query string next to a header",
            vec![("Authorization", format!("Bearer {good}"))],
            format!("&access_token={good}"),
        ),
        (
            "Basic scheme",
            vec![("Authorization", "Basic YWRtaW46YWRtaW4=".into())],
            String::new(),
        ),
        (
            "oversized token",
            vec![("Authorization", format!("Bearer {huge}"))],
            String::new(),
        ),
    ];
    for (what, headers, query) in cases {
        let rid = format!("tok-{}", uniq());
        let mut rb = client()
            .get(format!("{}/Patient?_count=1{query}", gw.base()))
            .header("X-Request-Id", &rid);
        for (k, v) in &headers {
            rb = rb.header(*k, v);
        }
        let r = rb.send().await.unwrap();
        let www = r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{what}: no WWW-Authenticate"));
        assert!(www.starts_with("Bearer"), "{what}: {www}");
        if !headers.is_empty() || !query.is_empty() {
            assert!(www.contains("error=\"invalid_token\""), "{what}: {www}");
        }
        let v = assert_outcome(r, 401, "login").await;
        let diag = v["issue"][0]["diagnostics"].as_str().unwrap();
        assert!(
            !diag.contains(&good[..40]),
            "{what}: the token is never echoed"
        );
        assert_sekmet_never_received(&rid).await;
    }
    // And the good token works, so the cases above failed for their own reason.
    let r = client()
        .get(format!("{}/Patient?_count=1", gw.base()))
        .bearer_auth(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        !gw.log().contains(&good[good.len() - 30..]),
        "the token never appears in logs"
    );
}

/// RFC 7235 §2.1 / RFC 6750: `bearer` and `BEARER` are the Bearer scheme; the request reaches
/// SEKMET as the caller's, like one sent with `Bearer`.
#[tokio::test(flavor = "multi_thread")]
async fn bearer_scheme_is_case_insensitive() {
    let gw = jwt_gateway("").await;
    let t = token("reader-app").await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEARER"] {
        let rid = format!("scheme-{}", uniq());
        let r = client()
            .get(format!("{}/Patient?_count=1", gw.base()))
            .header("Authorization", format!("{scheme} {t}"))
            .header("X-Request-Id", &rid)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}: {}", r.text().await.unwrap());
        let rec = sekmet_received(&rid);
        assert_eq!(rec.len(), 1, "{scheme}");
        let h = rec[0]["headers"].as_object().unwrap();
        assert_eq!(
            h["x-ms-azurefhir-audit-userid"], "oid-reader-app",
            "{scheme}"
        );
        assert!(!h.contains_key("authorization"), "{scheme}");
    }
    // A scheme that only starts like Bearer is still another scheme.
    for v in [format!("Bearers {t}"), format!("Bearer{t}")] {
        let rid = format!("scheme-{}", uniq());
        let r = client()
            .get(format!("{}/Patient?_count=1", gw.base()))
            .header("Authorization", &v)
            .header("X-Request-Id", &rid)
            .send()
            .await
            .unwrap();
        let o = assert_outcome(r, 401, "login").await;
        assert!(
            o["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains("Authorization must be 'Bearer <token>'"),
            "{o}"
        );
        assert_sekmet_never_received(&rid).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sekmet_receives_real_audit_headers_and_never_client_copies() {
    let gw = jwt_gateway("").await;
    let t = token("reader-app").await;
    let rid = format!("audit-{}", uniq());
    let r = client()
        .get(format!("{}/Patient?_count=1", gw.base()))
        .bearer_auth(&t)
        .header("X-Request-Id", &rid)
        .header("X-MS-AZUREFHIR-AUDIT-USERID", "spoofed-oid")
        .header("X-MS-AZUREFHIR-AUDIT-UPN", "spoofed@evil.example")
        .header("X-MS-AZUREFHIR-AUDIT-TENANT", "spoofed-tenant")
        .header("X-MS-AZUREFHIR-AUDIT-SOURCE", "6.6.6.6")
        .header("X-MS-AZUREFHIR-AUDIT-PROXY", "evil-proxy")
        .header("X-MS-AZUREFHIR-AUDIT-EXTRA", "x")
        .header("X-Forwarded-For", "6.6.6.6")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = sekmet_received(&rid);
    assert_eq!(rec.len(), 1);
    let h = rec[0]["headers"].as_object().unwrap();
    assert_eq!(h["x-ms-azurefhir-audit-userid"], "oid-reader-app");
    assert_eq!(h["x-ms-azurefhir-audit-upn"], "reader-app@example.org");
    assert_eq!(h["x-ms-azurefhir-audit-tenant"], TENANT_A);
    assert_eq!(
        h["x-ms-azurefhir-audit-source"], "127.0.0.1",
        "not the client's X-Forwarded-For"
    );
    assert_eq!(h["x-ms-azurefhir-audit-proxy"], "fhir-gateway");
    assert!(!h.contains_key("x-ms-azurefhir-audit-extra"));
    assert!(
        !h.contains_key("authorization"),
        "the caller's token never reaches SEKMET"
    );

    // Claims with CR/LF cannot inject headers.
    let mut c = reader_claims();
    c["upn"] = json!("ada@example.org\r\nX-Injected: 1");
    c["oid"] = json!("oid\nX-Other: 2");
    let evil = sign_as_idp(&c);
    let rid = format!("audit-{}", uniq());
    let r = client()
        .get(format!("{}/Patient?_count=1", gw.base()))
        .bearer_auth(&evil)
        .header("X-Request-Id", &rid)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = sekmet_received(&rid);
    let h = rec[0]["headers"].as_object().unwrap();
    assert!(
        !h.contains_key("x-injected") && !h.contains_key("x-other"),
        "{h:?}"
    );
    assert_eq!(
        h["x-ms-azurefhir-audit-upn"],
        "ada@example.org%0D%0AX-Injected:%201"
    );
}

/// Audit values are percent-encoded, so two users whose names differ only in characters a
/// header cannot carry stay two users at the FHIR server (the old `?` replacement made
/// `josé` and `jos?` one).
#[tokio::test(flavor = "multi_thread")]
async fn sekmet_tells_apart_users_whose_names_differ_only_in_unsafe_characters() {
    let gw = jwt_gateway("").await;
    let users = [
        ("jos\u{e9}", "jos%C3%A9"),
        ("jos?", "jos?"),
        ("jos%C3%A9", "jos%25C3%25A9"),
        ("jos\u{e9} ", "jos%C3%A9%20"),
    ];
    let mut seen = std::collections::HashMap::new();
    for (name, expected) in users {
        let mut c = reader_claims();
        c["oid"] = json!(format!("oid-{name}"));
        c["upn"] = json!(format!("{name}@example.org"));
        let t = sign_as_idp(&c);
        let rid = format!("audit-enc-{}", uniq());
        let r = client()
            .get(format!("{}/Patient?_count=1", gw.base()))
            .bearer_auth(&t)
            .header("X-Request-Id", &rid)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name:?}");
        let rec = sekmet_received(&rid);
        assert_eq!(rec.len(), 1, "{name:?}");
        let h = rec[0]["headers"].as_object().unwrap();
        let user = h["x-ms-azurefhir-audit-userid"]
            .as_str()
            .unwrap()
            .to_string();
        let upn = h["x-ms-azurefhir-audit-upn"].as_str().unwrap().to_string();
        assert_eq!(user, format!("oid-{expected}"), "{name:?}");
        assert_eq!(upn, format!("{expected}@example.org"), "{name:?}");
        assert!(
            user.bytes()
                .chain(upn.bytes())
                .all(|b| (0x21..0x7f).contains(&b)),
            "{name:?}: {user:?} {upn:?}"
        );
        if let Some(other) = seen.insert(user.clone(), name) {
            panic!("{name:?} and {other:?} reached SEKMET as the same user {user:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_for_is_audited_only_from_trusted_proxies() {
    let gw = jwt_gateway("trusted_proxies: [127.0.0.1]\n").await;
    let t = token("reader-app").await;
    let rid = format!("xff-{}", uniq());
    let r = client()
        .get(format!("{}/Patient?_count=1", gw.base()))
        .bearer_auth(&t)
        .header("X-Request-Id", &rid)
        .header("X-Forwarded-For", "203.0.113.7, 127.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rec = sekmet_received(&rid);
    assert_eq!(
        rec[0]["headers"]["x-ms-azurefhir-audit-source"],
        "203.0.113.7"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn two_tenants_are_served_and_a_third_is_refused() {
    let gw = jwt_gateway("").await;
    for (client_id, status) in [
        ("reader-app", 200),
        ("tenantb-reader-app", 200),
        ("other-tenant-app", 401),
    ] {
        let t = token(client_id).await;
        let r = client()
            .get(format!("{}/Patient?_count=1", gw.base()))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{client_id}");
        if status == 401 {
            let v = assert_outcome(r, 401, "login").await;
            assert!(
                v["issue"][0]["diagnostics"]
                    .as_str()
                    .unwrap()
                    .contains("tenant"),
                "{v}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn smart_scopes_are_a_ceiling_and_patient_scopes_need_a_patient() {
    let gw = jwt_gateway("").await;
    let pid = seed_patient(&format!("Scope{}", uniq())).await;
    // Reader role + user/Observation.read: Observation yes, Patient no.
    let t = token_with_scope("reader-app", "user/*.read").await;
    let r = client()
        .get(format!("{}/Patient/{pid}", gw.base()))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let t = token_with_scope("reader-app", "patient/Observation.read").await;
    // Real IdP token with patient/ scopes but no fhirUser/patient claim: denied, never skipped.
    let rid = format!("scope-{}", uniq());
    let r = client()
        .get(format!("{}/Observation?patient={pid}", gw.base()))
        .bearer_auth(&t)
        .header("X-Request-Id", &rid)
        .send()
        .await
        .unwrap();
    let v = assert_outcome(r, 403, "forbidden").await;
    assert!(
        v["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("patient context"),
        "{v}"
    );
    assert_sekmet_never_received(&rid).await;

    // With a patient context (fhirUser), only that patient's data.
    let mut c = reader_claims();
    c["scp"] = json!("patient/*.read");
    c["fhirUser"] = json!(format!("Patient/{pid}"));
    let pt = sign_as_idp(&c);
    let get = |path: String| {
        let pt = pt.clone();
        async move {
            client()
                .get(path)
                .bearer_auth(pt)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get(format!("{}/Patient/{pid}", gw.base())).await, 200);
    assert_eq!(
        get(format!("{}/Observation?patient={pid}", gw.base())).await,
        200
    );
    assert_eq!(
        get(format!("{}/Patient/{pid}/Observation", gw.base())).await,
        200
    );
    // Requests that do not name the patient are allowed and filtered by the scope filter
    // (tests/smart_scopes.rs): another Patient is the same 404 as no Patient at all.
    let other = seed_patient("Other").await;
    assert_eq!(get(format!("{}/Patient/{other}", gw.base())).await, 404);
    assert_eq!(
        get(format!("{}/Patient/no-such-{}", gw.base(), uniq())).await,
        404
    );
    let everything = client()
        .get(format!("{}/Patient/{other}/$everything", gw.base()))
        .bearer_auth(&pt)
        .send()
        .await
        .unwrap();
    assert_eq!(everything.status(), 200);
    let body = everything.text().await.unwrap();
    assert!(
        !body.contains(&other),
        "another patient's $everything is empty: {body}"
    );
    assert_eq!(get(format!("{}/Observation", gw.base())).await, 200);
    assert_eq!(
        get(format!(
            "{}/Observation?patient={pid}&_revinclude=Provenance:target",
            gw.base()
        ))
        .await,
        200
    );
    assert_eq!(
        get(format!(
            "{}/Patient?_has:Observation:subject:code=x",
            gw.base()
        ))
        .await,
        403,
        "an existence oracle"
    );
    // $everything is checked against every type it returns.
    let mut c = reader_claims();
    c["scp"] = json!("patient/Patient.read patient/Observation.read");
    c["fhirUser"] = json!(format!("Patient/{pid}"));
    let narrow = sign_as_idp(&c);
    let r = client()
        .get(format!("{}/Patient/{pid}/$everything", gw.base()))
        .bearer_auth(&narrow)
        .send()
        .await
        .unwrap();
    let v = assert_outcome(r, 403, "forbidden").await;
    assert!(
        v["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("no scope grants"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_and_smart_configuration_are_anonymous_and_point_at_the_idp() {
    let gw = jwt_gateway("").await;
    let r = client()
        .get(format!("{}/metadata", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    assert_no_upstream_address(&headers, &body, &sekmet_url());
    let cs: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(cs["resourceType"], "CapabilityStatement");
    let sec = &cs["rest"][0]["security"];
    assert_eq!(sec["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let uris = sec["extension"][0]["extension"].as_array().unwrap();
    let token_uri = uris.iter().find(|u| u["url"] == "token").unwrap();
    assert_eq!(token_uri["valueUri"], format!("{IDP}/token").as_str());

    let r = client()
        .get(format!("{}/.well-known/smart-configuration", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sc: Value = r.json().await.unwrap();
    assert_eq!(sc["issuer"], IDP);
    assert_eq!(sc["token_endpoint"], format!("{IDP}/token").as_str());
    assert!(sc["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c == "permission-v2"));
    // Every other FHIR path needs a token.
    let r = client()
        .get(format!("{}/Patient", gw.base()))
        .send()
        .await
        .unwrap();
    assert_outcome(r, 401, "login").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_route_has_its_own_policy_chain_and_prefix() {
    let gw = jwt_gateway(
        "routes:\n  - prefix: /research/fhir\n    policy:\n      read: [Reader, Administrator]\n      write: []\n    post:\n      - name: SamplePostProcess\n        settings: {system: \"urn:fhir-gateway:route\", code: research}\n",
    )
    .await;
    seed_patient(&format!("Route{}", uniq())).await;
    let research = gw.url("/research/fhir");
    let reader = token("reader-app").await;
    let r = client()
        .get(format!("{research}/Patient?_count=2"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    assert_no_upstream_address(&headers, &body, &sekmet_url());
    let b: Value = serde_json::from_slice(&body).unwrap();
    for e in b["entry"].as_array().unwrap() {
        assert!(
            e["fullUrl"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{research}/Patient/")),
            "{e}"
        );
        // Other tests' data may carry tags of their own: ours is among them.
        assert!(
            e["resource"]["meta"]["tag"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["code"] == "research")),
            "{e}"
        );
    }
    for l in b["link"].as_array().unwrap() {
        assert!(
            l["url"].as_str().unwrap().starts_with(&research),
            "the caller stays on its prefix: {l}"
        );
    }
    // No writes on the research route, even for an Administrator; the main route still allows them.
    let body = json!({"resourceType":"Patient","name":[{"family":"RouteWrite"}]}).to_string();
    for client_id in ["writer-app", "admin-app"] {
        let t = token(client_id).await;
        let r = client()
            .post(format!("{research}/Patient"))
            .bearer_auth(&t)
            .header("Content-Type", "application/fhir+json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let v = assert_outcome(r, 403, "forbidden").await;
        assert!(
            v["issue"][0]["diagnostics"]
                .as_str()
                .unwrap()
                .contains("role this route does not grant"),
            "{v}"
        );
    }
    let t = token("writer-app").await;
    let r = client()
        .post(format!("{}/Patient", gw.base()))
        .bearer_auth(&t)
        .header("Content-Type", "application/fhir+json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The main route has no post chain: untagged, streamed. (Its own Patient: other tests'
    // data in the shared SEKMET may carry tags.)
    let r = client()
        .get(format!("{}/Patient?_id={id}", gw.base()))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["entry"][0]["resource"]["id"], id.as_str(), "{b}");
    assert!(
        b["entry"][0]["resource"]["meta"].get("tag").is_none(),
        "{b}"
    );
}
