//! Hermetic checks of token handling with a shared-secret issuer (no network). The RSA/JWKS
//! path is tested against the real OIDC provider in tests/auth_*.rs.

use super::*;
use crate::config::{AuthConfig, OneOrMany};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::json;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test";

fn issuer_cfg() -> IssuerConfig {
    IssuerConfig {
        name: "test".into(),
        issuer: OneOrMany::Many(vec![
            "https://idp.test/a".into(),
            "https://idp.test/a/v2".into(),
        ]),
        discovery_url: None,
        jwks_url: None,
        audiences: vec!["api://fhir".into()],
        allowed_tenants: vec!["t1".into(), "t2".into()],
        algorithms: Some(vec!["HS256".into()]),
        shared_secret: Some(SECRET.into()),
        claims: Default::default(),
        roles: Default::default(),
    }
}

fn auth() -> Authenticator {
    let cfg = AuthConfig {
        mode: AuthMode::Jwt,
        clock_skew_secs: 60,
        issuers: vec![issuer_cfg()],
        jwks: Default::default(),
        smart: Default::default(),
        offload: None,
        audit_headers: Default::default(),
    };
    Authenticator::new(&cfg, reqwest::Client::new()).unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Value {
    json!({
        "iss": "https://idp.test/a", "aud": "api://fhir", "exp": now() + 300, "nbf": now() - 10,
        "oid": "user-1", "tid": "t1", "preferred_username": "ada@hospital.example",
        "roles": ["Reader", "Unknown"], "scp": "patient/Observation.read openid",
        "fhirUser": "Patient/p1", "azp": "app-1"
    })
}

fn token(c: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        c,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn bearer(t: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {t}").parse().unwrap(),
    );
    h
}

async fn check(c: &Value) -> Result<Identity, AuthError> {
    auth()
        .authenticate(&bearer(&token(c)), None)
        .await
        .map(|i| (*i).clone())
}

#[tokio::test]
async fn valid_token_maps_claims() {
    let id = check(&claims()).await.unwrap();
    assert_eq!(id.user_id, "user-1");
    assert_eq!(id.tenant.as_deref(), Some("t1"));
    assert_eq!(id.upn.as_deref(), Some("ada@hospital.example"));
    assert_eq!(id.roles, vec![Role::Reader]);
    assert_eq!(id.scopes, vec!["patient/Observation.read", "openid"]);
    assert_eq!(id.fhir_user.as_deref(), Some("Patient/p1"));
    assert_eq!(id.client_id.as_deref(), Some("app-1"));
    assert_eq!(id.issuer, "test");
    // The second issuer spelling (Entra v1/v2) is accepted too.
    let mut c = claims();
    c["iss"] = json!("https://idp.test/a/v2");
    assert!(check(&c).await.is_ok());
    // sub when there is no oid; scp as an array.
    let mut c = claims();
    c.as_object_mut().unwrap().remove("oid");
    c["sub"] = json!("subject-9");
    c["scp"] = json!(["user/*.read"]);
    let id = check(&c).await.unwrap();
    assert_eq!(id.user_id, "subject-9");
    assert_eq!(id.scopes, vec!["user/*.read"]);
}

#[tokio::test]
async fn every_bad_claim_is_refused() {
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("expired", Box::new(|c| c["exp"] = json!(now() - 120))),
        ("not yet valid", Box::new(|c| c["nbf"] = json!(now() + 600))),
        (
            "wrong iss",
            Box::new(|c| c["iss"] = json!("https://evil.test")),
        ),
        ("wrong aud", Box::new(|c| c["aud"] = json!("api://other"))),
        ("tenant", Box::new(|c| c["tid"] = json!("t9"))),
        (
            "no tenant",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("tid");
            }),
        ),
        (
            "no user",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("oid");
            }),
        ),
        (
            "no exp",
            Box::new(|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
        ),
    ];
    for (what, f) in cases {
        let mut c = claims();
        f(&mut c);
        match check(&c).await {
            Err(AuthError::Invalid(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn iat_in_the_future_beyond_the_skew_is_refused() {
    let with_iat = |iat: Value| {
        let mut c = claims();
        c["iat"] = iat;
        c
    };
    // Within the 60 s skew, in the past, or absent: accepted as before.
    for (what, c) in [
        ("iat now + 30 s", with_iat(json!(now() + 30))),
        ("iat in the past", with_iat(json!(now() - 3600))),
        ("iat fractional", with_iat(json!(now() as f64 - 0.5))),
        ("no iat", claims()),
    ] {
        assert!(check(&c).await.is_ok(), "{what}");
    }
    for (what, c, why) in [
        (
            "iat now + 10 min",
            with_iat(json!(now() + 600)),
            "token issued in the future (iat beyond the allowed clock skew)",
        ),
        (
            "iat now + 61 s",
            with_iat(json!(now() + 65)),
            "token issued in the future (iat beyond the allowed clock skew)",
        ),
        (
            "iat a string",
            with_iat(json!("2020-01-01")),
            "token iat is not a NumericDate",
        ),
    ] {
        assert_eq!(
            check(&c).await,
            Err(AuthError::Invalid(why.into())),
            "{what}"
        );
    }
}

#[tokio::test]
async fn header_shapes() {
    let a = auth();
    let t = token(&claims());
    let mut h = HeaderMap::new();
    assert_eq!(a.authenticate(&h, None).await, Err(AuthError::Missing));
    // The scheme is case-insensitive (RFC 7235 §2.1, RFC 6750).
    for v in [
        format!("bearer {t}"),
        format!("BEARER {t}"),
        format!("bEaReR {t}"),
    ] {
        h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        assert_eq!(
            a.authenticate(&h, None).await.unwrap().user_id,
            "user-1",
            "{v}"
        );
    }
    for v in [
        format!("Bearer Bearer {t}"),
        format!("bearer bearer {t}"),
        "Bearer ".to_string(),
        "bearer".to_string(),
        format!("Basic {t}"),
        format!("DPoP {t}"),
        format!("Bearer{t}"),
        format!("Bearer  {t}"),
        format!("Bearer\t{t}"),
        format!("Bearers {t}"),
        format!("Bearer {t} extra"),
    ] {
        h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        assert!(
            matches!(a.authenticate(&h, None).await, Err(AuthError::Invalid(_))),
            "{v}"
        );
    }
    // Two Authorization headers.
    let mut h = bearer(&t);
    h.append(
        http::header::AUTHORIZATION,
        format!("Bearer {t}").parse().unwrap(),
    );
    assert!(matches!(
        a.authenticate(&h, None).await,
        Err(AuthError::Invalid(_))
    ));
    // A token in the query string is refused even next to a good header.
    let h = bearer(&t);
    assert!(matches!(
        a.authenticate(&h, Some(b"_count=1&access_token=abc")).await,
        Err(AuthError::Invalid(_))
    ));
    assert!(a.authenticate(&h, Some(b"_count=1")).await.is_ok());
}

#[tokio::test]
async fn tampered_and_unsigned_tokens() {
    let t = token(&claims());
    let parts: Vec<&str> = t.split('.').collect();
    // Payload swapped for an admin one, original signature kept.
    let mut c = claims();
    c["roles"] = json!(["Administrator"]);
    let forged_payload = token(&c).split('.').nth(1).unwrap().to_string();
    let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
    assert!(matches!(
        auth().authenticate(&bearer(&tampered), None).await,
        Err(AuthError::Invalid(_))
    ));
    // alg: none.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    assert!(matches!(
        auth().authenticate(&bearer(&none), None).await,
        Err(AuthError::Invalid(_))
    ));
    // An algorithm outside the issuer's list (HS512 with the right secret).
    let hs512 = encode(
        &Header::new(Algorithm::HS512),
        &claims(),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert!(matches!(
        auth().authenticate(&bearer(&hs512), None).await,
        Err(AuthError::Invalid(_))
    ));
}

#[tokio::test]
async fn offload_needs_the_proof_header() {
    let cfg = AuthConfig {
        mode: AuthMode::Jwt,
        clock_skew_secs: 60,
        issuers: vec![issuer_cfg()],
        jwks: Default::default(),
        smart: Default::default(),
        offload: Some(crate::config::OffloadConfig {
            header: "X-Gateway-Proof".into(),
            secret: "front-gateway-secret-1".into(),
        }),
        audit_headers: Default::default(),
    };
    let a = Authenticator::new(&cfg, reqwest::Client::new()).unwrap();
    // Signature not checked in offload mode (the front gateway did), claims still are.
    let unsigned_ok = {
        let t = token(&claims());
        let p: Vec<&str> = t.split('.').collect();
        format!("{}.{}.invalidsig", p[0], p[1])
    };
    let mut h = bearer(&unsigned_ok);
    assert!(
        matches!(a.authenticate(&h, None).await, Err(AuthError::Invalid(_))),
        "no proof"
    );
    h.insert("x-gateway-proof", "wrong".parse().unwrap());
    assert!(
        matches!(a.authenticate(&h, None).await, Err(AuthError::Invalid(_))),
        "bad proof"
    );
    h.insert("x-gateway-proof", "front-gateway-secret-1".parse().unwrap());
    assert_eq!(a.authenticate(&h, None).await.unwrap().user_id, "user-1");
    let mut c = claims();
    c["exp"] = json!(now() - 600);
    let mut h = bearer(&token(&c));
    h.insert("x-gateway-proof", "front-gateway-secret-1".parse().unwrap());
    assert!(
        matches!(a.authenticate(&h, None).await, Err(AuthError::Invalid(_))),
        "expired"
    );
    // Offloaded tokens get the same iat check.
    let mut c = claims();
    c["iat"] = json!(now() + 600);
    let mut h = bearer(&token(&c));
    h.insert("x-gateway-proof", "front-gateway-secret-1".parse().unwrap());
    assert_eq!(
        a.authenticate(&h, None).await,
        Err(AuthError::Invalid(
            "token issued in the future (iat beyond the allowed clock skew)".into()
        )),
        "iat in the future"
    );
}

#[test]
fn query_keys_are_compared_decoded() {
    assert_eq!(super::percent_decoded(b"access%5Ftoken"), b"access_token");
    assert_eq!(super::percent_decoded(b"%61ccess_token"), b"access_token");
    assert_eq!(super::percent_decoded(b"access%255Ftoken"), b"access_token");
    assert_eq!(super::percent_decoded(b"a%zz%4"), b"a%zz%4");
}
