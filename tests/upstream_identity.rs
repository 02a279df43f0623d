//! The gateway's own identity towards the FHIR server: static bearer against SEKMET's real
//! bearer check, client credentials from the real OIDC provider, managed identity through an
//! IMDS-shaped endpoint. The caller's token never crosses.

mod common;

use common::idp::claims_of;
use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread")]
async fn without_identity_the_callers_token_does_not_open_the_server() {
    require_peer(&format!("{SEKMET_AUTH}/metadata")).await;
    let gw = Gateway::start(&format!(
        "upstream:\n  url: {SEKMET_AUTH}\nauth:\n  mode: insecure_dev\n"
    ))
    .await;
    // Even the exact token SEKMET accepts is dropped when the caller sends it.
    let r = client()
        .get(format!("{}/Patient", gw.base()))
        .header("Authorization", format!("Bearer {SEKMET_AUTH_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap();
    assert_no_upstream_address(&headers, &body, SEKMET_AUTH);
}

#[tokio::test(flavor = "multi_thread")]
async fn static_bearer_from_the_environment_reaches_the_protected_server() {
    require_peer(&format!("{SEKMET_AUTH}/metadata")).await;
    let gw = Gateway::start_env(
        &format!(
            "upstream:\n  url: {SEKMET_AUTH}\n  identity:\n    type: static_bearer\n    token: \"${{GW_UPSTREAM_TOKEN}}\"\nauth:\n  mode: insecure_dev\n"
        ),
        &[("GW_UPSTREAM_TOKEN", SEKMET_AUTH_TOKEN)],
    )
    .await;
    let r = client()
        .get(format!("{}/Patient?_count=1", gw.base()))
        .header("Authorization", "Bearer caller-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["resourceType"], "Bundle");
    // Writes work too.
    let r = client()
        .post(format!("{}/Patient", gw.base()))
        .header("Content-Type", "application/fhir+json")
        .body(json!({"resourceType":"Patient","name":[{"family":"Bearer"}]}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with(&gw.base()));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_credentials_token_from_the_real_idp_is_sent_and_cached() {
    require_peer(&format!("{IDP}/.well-known/openid-configuration")).await;
    let up = ScriptedUpstream::start(|_, _| {
        Reply::json(200, r#"{"resourceType":"Bundle","type":"searchset"}"#)
    })
    .await;
    let gw = Gateway::start(&format!(
        "upstream:\n  url: {}\n  identity:\n    type: client_credentials\n    token_url: {IDP}/token\n    client_id: gateway-service\n    client_secret: gateway-service-secret\n    scope: \"system/*.read\"\nauth:\n  mode: insecure_dev\n",
        up.base()
    ))
    .await;
    for _ in 0..3 {
        let r = client()
            .get(format!("{}/Patient", gw.base()))
            .header("Authorization", "Bearer caller-token-xyz")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let got = up.received();
    assert_eq!(got.len(), 3);
    let auths: Vec<&str> = got
        .iter()
        .map(|r| r.header("authorization").unwrap())
        .collect();
    assert!(
        auths.iter().all(|a| *a == auths[0]),
        "one cached token for all calls"
    );
    let token = auths[0].strip_prefix("Bearer ").unwrap();
    assert!(!token.contains("caller-token"));
    let claims = claims_of(token);
    assert_eq!(claims["iss"], IDP);
    assert_eq!(claims["client_id"], "gateway-service");
    assert_eq!(claims["aud"], "api://fhir-gateway");
    assert!(claims["scope"].as_str().unwrap().contains("system/*.read"));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_client_secret_means_503_and_no_upstream_call() {
    require_peer(&format!("{IDP}/.well-known/openid-configuration")).await;
    let up = ScriptedUpstream::start(|_, _| Reply::json(200, "{}")).await;
    let gw = Gateway::start(&format!(
        "upstream:\n  url: {}\n  identity:\n    type: client_credentials\n    token_url: {IDP}/token\n    client_id: gateway-service\n    client_secret: wrong\n    scope: \"system/*.read\"\nauth:\n  mode: insecure_dev\n",
        up.base()
    ))
    .await;
    let r = client()
        .get(format!("{}/Patient", gw.base()))
        .send()
        .await
        .unwrap();
    assert_outcome(r, 503, "transient").await;
    assert!(up.received().is_empty(), "no call without a credential");
    let r = client().get(gw.url("/readyz")).send().await.unwrap();
    assert_outcome(r, 503, "transient").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn managed_identity_uses_imds_with_metadata_header() {
    let imds_calls = Arc::new(AtomicUsize::new(0));
    let calls = imds_calls.clone();
    let imds = ScriptedUpstream::start(move |req, _| {
        calls.fetch_add(1, Ordering::SeqCst);
        if req.header("metadata") != Some("true") {
            return Reply::json(400, r#"{"error":"bad_request"}"#);
        }
        // IMDS sends expires_in as a string.
        Reply::json(
            200,
            r#"{"access_token":"mi-token-123","expires_in":"3599","token_type":"Bearer","resource":"https://fhir.example"}"#,
        )
    })
    .await;
    let up = ScriptedUpstream::start(|_, _| Reply::json(200, "{}")).await;
    let gw = Gateway::start(&format!(
        "upstream:\n  url: {}\n  identity:\n    type: managed_identity\n    imds_url: http://{}/metadata/identity/oauth2/token\n    resource: https://fhir.example\n    client_id: user-assigned-1\nauth:\n  mode: insecure_dev\n",
        up.base(),
        imds.addr
    ))
    .await;
    for _ in 0..2 {
        let r = client()
            .get(format!("{}/Patient", gw.base()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let got = up.received();
    assert_eq!(got[0].header("authorization"), Some("Bearer mi-token-123"));
    assert_eq!(got[1].header("authorization"), Some("Bearer mi-token-123"));
    assert_eq!(imds_calls.load(Ordering::SeqCst), 1, "token cached");
    let q = &imds.received()[0].target;
    assert!(q.contains("api-version=2018-02-01"), "{q}");
    assert!(q.contains("resource=https%3A%2F%2Ffhir.example"), "{q}");
    assert!(q.contains("client_id=user-assigned-1"), "{q}");
}

#[tokio::test(flavor = "multi_thread")]
async fn entra_v1_resource_form_and_post_auth() {
    // The token endpoint here checks the v1 request shape (resource=, secret in the body).
    let tokens = ScriptedUpstream::start(|req, _| {
        let body = String::from_utf8_lossy(&req.body).into_owned();
        let ok = body.contains("grant_type=client_credentials")
            && body.contains("resource=https%3A%2F%2Fx.azurehealthcareapis.com")
            && body.contains("client_id=app-1")
            && body.contains("client_secret=s%2Bcret")
            && req.header("authorization").is_none();
        if ok {
            Reply::json(
                200,
                r#"{"access_token":"v1-token","expires_in":"3600","expires_on":"1999999999"}"#,
            )
        } else {
            Reply::json(400, r#"{"error":"invalid_request"}"#)
        }
    })
    .await;
    let up = ScriptedUpstream::start(|_, _| Reply::json(200, "{}")).await;
    let gw = Gateway::start(&format!(
        "upstream:\n  url: {}\n  identity:\n    type: client_credentials\n    token_url: http://{}/tenant/oauth2/token\n    client_id: app-1\n    client_secret: s+cret\n    resource: https://x.azurehealthcareapis.com\n    auth_method: post\nauth:\n  mode: insecure_dev\n",
        up.base(),
        tokens.addr
    ))
    .await;
    let r = client()
        .get(format!("{}/Patient", gw.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.received()[0].header("authorization"),
        Some("Bearer v1-token")
    );
}
