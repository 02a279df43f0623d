//! Hardening (issue 8, part 1): a catalogue of hostile bearer tokens (pitfall 1) and a matrix of
//! spoofed identity, forwarding, correlation and hop-by-hop headers (pitfalls 4–6), sent through
//! the gateway to the real SEKMET server and, for what SEKMET's log cannot show (duplicate header
//! lines, smuggled requests), to a recording upstream.
//!
//! Two trust anchors: the real OIDC provider, and a local JWKS of keys generated here, so the
//! tests can sign exactly the bytes an attacker (or a buggy issuer) would produce: duplicate
//! JSON keys, `crit`, embedded `jwk`, control characters in claims.
//!
//! Every case runs on both roads to the upstream (issue 13): `/fhir`, which Pingora streams,
//! and `/chain`, whose post chain (PublishFHIREvent + ParticipantFilter; every caller here is
//! one the filter judges) makes the gateway call the upstream through its own client. Each
//! road must meet the case's expectation, and the roads must agree: the same status and
//! OperationOutcome, the same challenge, the upstream receiving the case on both roads or on
//! neither, and the same request head there (beyond how the heads differ for a request with no
//! spoof at all, which tests/one_road.rs pins). What SEKMET logged is read once, after all
//! cases, not case by case (one query instead of a marker request and two reads per case).

mod common;

use common::idp::*;
use common::raw::*;
use common::roads::{drop_baseline, road_difference, Answer, Chain, EventsDir, Road};
use common::*;
use openssl::bn::{BigNum, BigNumContext};
use openssl::ec::{EcGroup, EcKey};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::rsa::{Padding, Rsa};
use openssl::sign::{RsaPssSaltlen, Signer};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

const LOCAL_ISS: &str = "https://login.hospital-local.test/tenant-l/v2.0";
/// A second local issuer without a tenant restriction, for claims that carry odd tenants.
const OPEN_ISS: &str = "https://open.hospital-local.test/";
const TENANT_L: &str = "33333333-3333-3333-3333-333333333333";

// ---------------------------------------------------------------------------------------------
// Local keys and raw JWS signing

struct Keys {
    /// Published, JWK pinned to RS256.
    k1: PKey<Private>,
    /// Published, no `alg` in its JWK.
    k2: PKey<Private>,
    /// Published P-256 key.
    ec1: PKey<Private>,
    /// Never published.
    rogue: PKey<Private>,
    rogue_ec: PKey<Private>,
    jwks: Value,
}

fn rsa_key() -> PKey<Private> {
    PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap()
}

fn ec_key() -> PKey<Private> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap();
    PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
}

fn rsa_jwk(k: &PKey<Private>, kid: &str, alg: Option<&str>) -> Value {
    let rsa = k.rsa().unwrap();
    let mut j = json!({"kty": "RSA", "use": "sig", "kid": kid,
        "n": b64(&rsa.n().to_vec()), "e": b64(&rsa.e().to_vec())});
    if let Some(a) = alg {
        j["alg"] = json!(a);
    }
    j
}

fn ec_jwk(k: &PKey<Private>, kid: &str) -> Value {
    let ec = k.ec_key().unwrap();
    let mut ctx = BigNumContext::new().unwrap();
    let (mut x, mut y) = (BigNum::new().unwrap(), BigNum::new().unwrap());
    ec.public_key()
        .affine_coordinates(ec.group(), &mut x, &mut y, &mut ctx)
        .unwrap();
    json!({"kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
        "x": b64(&x.to_vec_padded(32).unwrap()), "y": b64(&y.to_vec_padded(32).unwrap())})
}

impl Keys {
    fn generate() -> Keys {
        let (k1, k2, ec1) = (rsa_key(), rsa_key(), ec_key());
        let jwks = json!({"keys": [
            rsa_jwk(&k1, "k1", Some("RS256")),
            rsa_jwk(&k2, "k2", None),
            ec_jwk(&ec1, "ec1"),
        ]});
        Keys {
            k1,
            k2,
            ec1,
            rogue: rsa_key(),
            rogue_ec: ec_key(),
            jwks,
        }
    }
}

enum Sig<'a> {
    Rs256(&'a PKey<Private>),
    Ps256(&'a PKey<Private>),
    Es256(&'a PKey<Private>),
    Hmac(MessageDigest, &'a [u8]),
    Empty,
}

/// A compact JWS over the exact header and payload bytes given.
fn jws(header: &str, payload: &str, sig: Sig) -> String {
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let s = match sig {
        Sig::Rs256(k) | Sig::Ps256(k) => {
            let mut s = Signer::new(MessageDigest::sha256(), k).unwrap();
            if matches!(sig, Sig::Ps256(_)) {
                s.set_rsa_padding(Padding::PKCS1_PSS).unwrap();
                s.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH).unwrap();
            }
            s.update(input.as_bytes()).unwrap();
            s.sign_to_vec().unwrap()
        }
        Sig::Es256(k) => {
            // JWS wants r || s, not DER.
            let digest = openssl::sha::sha256(input.as_bytes());
            let es = EcdsaSig::sign(&digest, &k.ec_key().unwrap()).unwrap();
            [
                es.r().to_vec_padded(32).unwrap(),
                es.s().to_vec_padded(32).unwrap(),
            ]
            .concat()
        }
        Sig::Hmac(md, secret) => {
            let key = PKey::hmac(secret).unwrap();
            let mut s = Signer::new(md, &key).unwrap();
            s.update(input.as_bytes()).unwrap();
            s.sign_to_vec().unwrap()
        }
        Sig::Empty => Vec::new(),
    };
    format!("{input}.{}", b64(&s))
}

fn sign(header: &Value, claims: &Value, sig: Sig) -> String {
    jws(&header.to_string(), &claims.to_string(), sig)
}

fn rs256_header(kid: &str) -> Value {
    json!({"alg": "RS256", "typ": "JWT", "kid": kid})
}

fn local_claims() -> Value {
    let now = now_secs();
    json!({"iss": LOCAL_ISS, "aud": AUDIENCE, "exp": now + 300, "nbf": now - 10, "iat": now,
        "sub": "local-reader", "oid": "oid-local-reader", "tid": TENANT_L,
        "upn": "local-reader@hospital-local.test", "roles": ["Reader"], "azp": "local-app"})
}

/// `local_claims` with one change, signed by k1 under its kid.
fn k1_with(k: &Keys, f: impl FnOnce(&mut Value)) -> String {
    let mut c = local_claims();
    f(&mut c);
    sign(&rs256_header("k1"), &c, Sig::Rs256(&k.k1))
}

fn remove(c: &mut Value, key: &str) {
    c.as_object_mut().unwrap().remove(key);
}

/// Claims JSON with a duplicated key, written by hand (serde_json would merge them): the
/// first value is the good one, the lexically last (the one RFC 7519 §4 lets a parser keep)
/// is hostile.
fn claims_with_duplicate(key: &str, last: Value) -> String {
    let c = local_claims();
    let body = c.to_string();
    let inner = body.strip_suffix('}').unwrap();
    format!("{inner},\"{key}\":{last}}}")
}

// ---------------------------------------------------------------------------------------------
// Gateway with two trust anchors

/// Serves the local JWKS; the recorder shows every fetch.
async fn jwks_server(k: &Keys) -> ScriptedUpstream {
    let body = k.jwks.to_string().into_bytes();
    ScriptedUpstream::start(move |_, _| Reply::Full {
        status: 200,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.clone(),
    })
    .await
}

/// `events` holds the buffered road's events file (see the file's notes).
async fn gateway(upstream: &str, jwks: &ScriptedUpstream, events: &EventsDir) -> Gateway {
    require_peer(&format!("{IDP}/.well-known/openid-configuration")).await;
    // The shared IdP issuer (tenants A and B), plus two issuers trusting the local JWKS.
    let local = format!(
        r#"    - name: local
      issuer: {LOCAL_ISS}
      jwks_url: http://{a}/keys
      audiences: ["{AUDIENCE}"]
      allowed_tenants: ["{TENANT_L}"]
    - name: local-open
      issuer: {OPEN_ISS}
      jwks_url: http://{a}/keys
      audiences: ["{AUDIENCE}"]
"#,
        a = jwks.addr
    );
    let gw = Gateway::start(&format!(
        "upstream:\n  url: {upstream}\n{}{local}{}",
        jwt_auth_yaml(IDP),
        events.yaml(Chain::Filters)
    ))
    .await;
    wait_ready(&gw).await;
    gw
}

/// A listener that only counts connections: anything the gateway fetched from a URL a token
/// named (`jku`, `x5u`) would show up here.
async fn tripwire() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((_sock, _)) = l.accept().await {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    (addr, hits)
}

/// Whether a gateway-made error is a proper one: OperationOutcome JSON with `code`, the
/// correlation id in the header and the diagnostics, and no echo of the token.
fn outcome_ok(
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    code: &str,
    rid: &str,
    token_tail: Option<&str>,
) -> Result<(), String> {
    let h = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(n))
            .map(|(_, v)| v.as_str())
    };
    let ct = h("content-type").unwrap_or("");
    if !ct.starts_with("application/fhir+json") {
        return Err(format!("{status}: content-type {ct:?}"));
    }
    if h("x-request-id") != Some(rid) {
        return Err(format!("x-request-id {:?}, sent {rid}", h("x-request-id")));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("body not JSON: {e}"))?;
    if v["resourceType"] != "OperationOutcome" || v["issue"][0]["code"] != code {
        return Err(format!("not an OperationOutcome with code {code}: {v}"));
    }
    let diag = v["issue"][0]["diagnostics"].as_str().unwrap_or("");
    if !diag.contains(rid) {
        return Err(format!("diagnostics lack the correlation id: {diag}"));
    }
    if let Some(t) = token_tail {
        if String::from_utf8_lossy(body).contains(t) {
            return Err("the token is echoed in the body".into());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A. Token catalogue

#[derive(Clone, Copy, PartialEq, Debug)]
enum Expect {
    /// Positive control: 200 and SEKMET got it exactly once.
    Accept,
    /// 401 OperationOutcome `login` with a Bearer challenge.
    Unauthorized,
    /// 403 OperationOutcome `forbidden`: valid token, not allowed.
    Forbidden,
    /// Too large for a normal answer: 401/431 OperationOutcome, or the HTTP layer's refusal
    /// or a close — never a pass, never a crash.
    Oversize,
}

struct Case {
    name: String,
    /// Authorization header values, as bytes (0, 1 or 2 of them).
    auth: Vec<Vec<u8>>,
    /// Appended to `/Patient?_count=1`.
    query: String,
    expect: Expect,
}

fn case(name: &str, value: impl Into<Vec<u8>>, expect: Expect) -> Case {
    Case {
        name: name.into(),
        auth: vec![value.into()],
        query: String::new(),
        expect,
    }
}

fn bearer_case(name: &str, token: &str) -> Case {
    case(name, format!("Bearer {token}"), Expect::Unauthorized)
}

fn catalogue(k: &Keys, idp_good: &str, trip: SocketAddr) -> Vec<Case> {
    use Expect::*;
    let good = k1_with(k, |_| {});
    let parts: Vec<&str> = good.split('.').collect();
    let (h64, p64, s64) = (parts[0], parts[1], parts[2]);
    let lc = local_claims().to_string();
    let mut cases = vec![
        case(
            "control: real IdP token",
            format!("Bearer {idp_good}"),
            Accept,
        ),
        case(
            "control: local token signed by k1",
            format!("Bearer {good}"),
            Accept,
        ),
        case(
            "control: local token signed by k2 (JWK without alg)",
            format!(
                "Bearer {}",
                sign(&rs256_header("k2"), &local_claims(), Sig::Rs256(&k.k2))
            ),
            Accept,
        ),
        // gateway.md §2: `typ` is not required to be JWT (RFC 9068 says at+jwt).
        case(
            "control: typ \"weird\"",
            format!(
                "Bearer {}",
                sign(
                    &json!({"alg": "RS256", "typ": "weird", "kid": "k1"}),
                    &local_claims(),
                    Sig::Rs256(&k.k1)
                )
            ),
            Accept,
        ),
    ];
    let mut add = |name: &str, token: String| cases.push(bearer_case(name, &token));

    // alg none, several spellings, with and without the original signature.
    for alg in ["none", "None", "NONE", "nOnE"] {
        let h = json!({"alg": alg, "typ": "JWT", "kid": "k1"}).to_string();
        add(
            &format!("alg {alg}, empty signature"),
            jws(&h, &lc, Sig::Empty),
        );
    }
    add(
        "alg none, original k1 signature kept",
        format!("{}.{p64}.{s64}", b64(br#"{"alg":"none","kid":"k1"}"#)),
    );

    // Key confusion: HMAC keyed with the published RSA key, in every form an attacker has.
    let rsa = k.k1.rsa().unwrap();
    let pem = k.k1.public_key_to_pem().unwrap();
    let secrets: Vec<(&str, Vec<u8>)> = vec![
        ("SPKI PEM", pem.clone()),
        (
            "SPKI PEM without final newline",
            pem[..pem.len() - 1].to_vec(),
        ),
        ("PKCS#1 PEM", rsa.public_key_to_pem_pkcs1().unwrap()),
        ("SPKI DER", k.k1.public_key_to_der().unwrap()),
        ("PKCS#1 DER", rsa.public_key_to_der_pkcs1().unwrap()),
        ("JWK JSON", k.jwks["keys"][0].to_string().into_bytes()),
        ("modulus bytes", rsa.n().to_vec()),
    ];
    let hs = json!({"alg": "HS256", "typ": "JWT", "kid": "k1"}).to_string();
    for (what, secret) in &secrets {
        add(
            &format!("HS256 keyed with k1's {what}"),
            jws(&hs, &lc, Sig::Hmac(MessageDigest::sha256(), secret)),
        );
    }
    add(
        "HS512 keyed with k1's SPKI PEM",
        jws(
            &json!({"alg": "HS512", "kid": "k1"}).to_string(),
            &lc,
            Sig::Hmac(MessageDigest::sha512(), &pem),
        ),
    );

    // Keys and kids.
    add(
        "unknown kid, rogue key",
        sign(
            &rs256_header("kid-nobody-published"),
            &local_claims(),
            Sig::Rs256(&k.rogue),
        ),
    );
    add(
        "no kid while two RSA keys are published",
        sign(&json!({"alg": "RS256"}), &local_claims(), Sig::Rs256(&k.k1)),
    );
    add(
        "kid k2, signed by k1",
        sign(&rs256_header("k2"), &local_claims(), Sig::Rs256(&k.k1)),
    );
    add(
        "kid path traversal, rogue key",
        sign(
            &rs256_header("../../../../dev/null"),
            &local_claims(),
            Sig::Rs256(&k.rogue),
        ),
    );
    add(
        "empty kid, signed by k1",
        sign(&rs256_header(""), &local_claims(), Sig::Rs256(&k.k1)),
    );
    add(
        "kid is a number",
        sign(
            &json!({"alg": "RS256", "kid": 1}),
            &local_claims(),
            Sig::Rs256(&k.k1),
        ),
    );
    add(
        "rogue key under kid k1",
        sign(&rs256_header("k1"), &local_claims(), Sig::Rs256(&k.rogue)),
    );
    add(
        "local claims signed by the real IdP key",
        sign_as_idp(&local_claims()),
    );
    add("IdP claims signed by k1 under the IdP's kid", {
        let kid = idp_private_jwk(&default_keys_file())["kid"].clone();
        sign(
            &json!({"alg": "RS256", "kid": kid}),
            &reader_claims(),
            Sig::Rs256(&k.k1),
        )
    });
    add(
        "IdP claims signed by k1 under kid k1",
        sign(&rs256_header("k1"), &reader_claims(), Sig::Rs256(&k.k1)),
    );

    // Tampering: the signature no longer covers what is sent.
    let mut admin = local_claims();
    admin["roles"] = json!(["Administrator", "Writer"]);
    add(
        "tampered payload (roles), k1 signature kept",
        format!("{h64}.{}.{s64}", b64(admin.to_string().as_bytes())),
    );
    let mut other = local_claims();
    other["oid"] = json!("oid-someone-else");
    add(
        "tampered payload (oid), k1 signature kept",
        format!("{h64}.{}.{s64}", b64(other.to_string().as_bytes())),
    );
    add(
        "tampered header (typ), k1 signature kept",
        format!(
            "{}.{p64}.{s64}",
            b64(br#"{"alg":"RS256","typ":"at+jwt","kid":"k1"}"#)
        ),
    );
    add("signature stripped (a.b.)", format!("{h64}.{p64}."));
    add(
        "signature truncated",
        format!("{h64}.{p64}.{}", &s64[..s64.len() - 4]),
    );
    let other_sig = k1_with(k, |c| c["sub"] = json!("another"));
    add(
        "signature of another k1 token spliced in",
        format!("{h64}.{p64}.{}", other_sig.split('.').nth(2).unwrap()),
    );

    // Claims.
    let now = now_secs();
    add(
        "expired an hour ago",
        k1_with(k, |c| c["exp"] = json!(now - 3600)),
    );
    add(
        "expired beyond the 60 s skew",
        k1_with(k, |c| c["exp"] = json!(now - 120)),
    );
    add(
        "nbf an hour ahead",
        k1_with(k, |c| c["nbf"] = json!(now + 3600)),
    );
    add(
        "wrong iss",
        k1_with(k, |c| {
            c["iss"] = json!("https://evil.example/tenant-l/v2.0")
        }),
    );
    add(
        "iss with a trailing slash",
        k1_with(k, |c| c["iss"] = json!(format!("{LOCAL_ISS}/"))),
    );
    add(
        "iss with a case change",
        k1_with(k, |c| c["iss"] = json!(LOCAL_ISS.replace("login", "LOGIN"))),
    );
    add(
        "iss without its configured trailing slash",
        k1_with(k, |c| c["iss"] = json!(OPEN_ISS.trim_end_matches('/'))),
    );
    add(
        "wrong aud",
        k1_with(k, |c| c["aud"] = json!("api://another-api")),
    );
    add(
        "aud array without ours",
        k1_with(k, |c| c["aud"] = json!(["api://a", "api://b"])),
    );
    add(
        "aud with a case change",
        k1_with(k, |c| c["aud"] = json!(AUDIENCE.to_uppercase())),
    );
    add("no exp", k1_with(k, |c| remove(c, "exp")));
    add(
        "exp as a string",
        k1_with(k, |c| c["exp"] = json!((now + 300).to_string())),
    );
    add("no aud", k1_with(k, |c| remove(c, "aud")));
    add("no iss", k1_with(k, |c| remove(c, "iss")));
    add(
        "neither oid nor sub",
        k1_with(k, |c| {
            remove(c, "oid");
            remove(c, "sub");
        }),
    );
    add(
        "empty oid, no sub",
        k1_with(k, |c| {
            c["oid"] = json!("");
            remove(c, "sub");
        }),
    );
    add(
        "numeric oid, no sub",
        k1_with(k, |c| {
            c["oid"] = json!(12345);
            remove(c, "sub");
        }),
    );
    add(
        "tenant not allowed",
        k1_with(k, |c| c["tid"] = json!(TENANT_B)),
    );
    add("no tenant", k1_with(k, |c| remove(c, "tid")));
    add(
        "tenant as an array",
        k1_with(k, |c| c["tid"] = json!([TENANT_L])),
    );

    // Unicode tricks.
    add(
        "homoglyph issuer (Cyrillic o)",
        k1_with(k, |c| {
            c["iss"] = json!(LOCAL_ISS.replace("hospital-local", "h\u{043e}spital-l\u{043e}cal"))
        }),
    );
    add(
        "RTL override in iss",
        k1_with(k, |c| c["iss"] = json!(format!("{LOCAL_ISS}\u{202e}"))),
    );
    add(
        "NUL byte in iss",
        k1_with(k, |c| c["iss"] = json!(format!("{LOCAL_ISS}\u{0}"))),
    );
    add(
        "NUL byte in aud",
        k1_with(k, |c| c["aud"] = json!(format!("{AUDIENCE}\u{0}.evil"))),
    );
    add(
        "RTL override in tid",
        k1_with(k, |c| c["tid"] = json!(format!("{TENANT_L}\u{202e}"))),
    );
    add(
        "fullwidth audience",
        k1_with(k, |c| c["aud"] = json!("\u{ff41}pi://fhir-gateway")),
    );

    // Duplicate JSON keys: the last value is hostile (RFC 7515 §4 / RFC 7519 §4: reject or
    // keep the lexically last).
    add(
        "duplicate alg in the header (RS256 then none)",
        jws(
            r#"{"alg":"RS256","kid":"k1","alg":"none"}"#,
            &lc,
            Sig::Rs256(&k.k1),
        ),
    );
    add(
        "duplicate kid in the header (k1 then unknown)",
        jws(
            r#"{"alg":"RS256","kid":"k1","kid":"nobody"}"#,
            &lc,
            Sig::Rs256(&k.k1),
        ),
    );
    for (key, last) in [
        ("iss", json!("https://evil.example/")),
        ("aud", json!("api://another-api")),
        ("exp", json!(now - 3600)),
        ("tid", json!(TENANT_B)),
    ] {
        add(
            &format!("duplicate {key} in the payload (hostile last)"),
            jws(
                &rs256_header("k1").to_string(),
                &claims_with_duplicate(key, last),
                Sig::Rs256(&k.k1),
            ),
        );
    }

    // Structure and encoding.
    add("two segments", format!("{h64}.{p64}"));
    add("four segments", format!("{good}.{s64}"));
    add(
        "five segments (JWE shape)",
        format!("{h64}.{p64}.{s64}.{s64}.{s64}"),
    );
    add("one segment", p64.to_string());
    add("only dots", "..".into());
    add(
        "padded segments ('=')",
        good.split('.')
            .map(|s| format!("{s}{}", "=".repeat((4 - s.len() % 4) % 4)))
            .collect::<Vec<_>>()
            .join("."),
    );
    let std_alpha = {
        // Re-signed until the signature has a character that differs between alphabets.
        let mut t = good.clone();
        let mut n = 0;
        while !t.contains(['-', '_']) {
            n += 1;
            t = k1_with(k, |c| c["jti"] = json!(n));
        }
        t.replace('-', "+").replace('_', "/")
    };
    add("standard base64 alphabet ('+' '/')", std_alpha);
    add("space inside the token", format!("{h64}.{p64} .{s64}"));
    add("tab inside the token", format!("{h64}.{p64}\t.{s64}"));
    add("invalid character '*'", format!("{h64}.{p64}*.{s64}"));
    add("percent-encoded dot", format!("{h64}%2E{p64}.{s64}"));
    add(
        "payload segment of impossible length (4n+1)",
        format!("{h64}.{p64}A.{s64}"),
    );
    cases.push(case(
        "non-UTF-8 bytes inside the token",
        [
            format!("Bearer {h64}.").into_bytes(),
            vec![0xff, 0xfe, 0xc3, 0x28],
            format!("{p64}.{s64}").into_bytes(),
        ]
        .concat(),
        Unauthorized,
    ));

    // Size and depth.
    cases.push(case(
        "100 KB token",
        format!("Bearer {h64}.{}.{s64}", "A".repeat(100 * 1024)),
        Oversize,
    ));
    cases.push(case(
        "1 MiB token",
        format!("Bearer {h64}.{}.{s64}", "A".repeat(1024 * 1024)),
        Oversize,
    ));
    // ~67 KB: over the token (16 KB) and header (32 KB) limits, so refused by size (401 or
    // 431) before any JSON parsing; the next two cases reach the parsers.
    let deep = jws(
        &rs256_header("k1").to_string(),
        &format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000)),
        Sig::Rs256(&k.k1),
    );
    cases.push(case(
        "payload nested 10,000 levels deep",
        format!("Bearer {deep}"),
        Oversize,
    ));
    let mut add = |name: &str, token: String| cases.push(bearer_case(name, &token));
    add(
        "payload nested 5,000 arrays deep (within the size limit)",
        jws(
            &rs256_header("k1").to_string(),
            &format!("{}{}", "[".repeat(5_000), "]".repeat(5_000)),
            Sig::Rs256(&k.k1),
        ),
    );
    add(
        "header nested 5,000 arrays deep",
        jws(
            &format!(
                r#"{{"alg":"RS256","kid":"k1","x":{}{}}}"#,
                "[".repeat(5_000),
                "]".repeat(5_000)
            ),
            &lc,
            Sig::Rs256(&k.k1),
        ),
    );

    // Header parameters that must never widen trust.
    add(
        "crit names an unknown extension",
        sign(
            &json!({"alg": "RS256", "kid": "k1", "crit": ["urn:example:must-understand"],
                "urn:example:must-understand": true}),
            &local_claims(),
            Sig::Rs256(&k.k1),
        ),
    );
    let trip_url = format!("http://{trip}");
    add(
        "jku to an attacker's JWKS, rogue key, new kid",
        sign(
            &json!({"alg": "RS256", "kid": "attacker-1", "jku": format!("{trip_url}/jwks.json")}),
            &local_claims(),
            Sig::Rs256(&k.rogue),
        ),
    );
    add(
        "jku to an attacker's JWKS, rogue key, kid k1",
        sign(
            &json!({"alg": "RS256", "kid": "k1", "jku": format!("{trip_url}/jwks.json")}),
            &local_claims(),
            Sig::Rs256(&k.rogue),
        ),
    );
    add(
        "x5u to an attacker's certificate, rogue key",
        sign(
            &json!({"alg": "RS256", "kid": "attacker-2", "x5u": format!("{trip_url}/cert.pem")}),
            &local_claims(),
            Sig::Rs256(&k.rogue),
        ),
    );
    add(
        "embedded jwk (rogue public key), no kid",
        sign(
            &json!({"alg": "RS256", "jwk": rsa_jwk(&k.rogue, "attacker-3", None)}),
            &local_claims(),
            Sig::Rs256(&k.rogue),
        ),
    );
    add(
        "embedded jwk (rogue public key), kid k1",
        sign(
            &json!({"alg": "RS256", "kid": "k1", "jwk": rsa_jwk(&k.rogue, "k1", None)}),
            &local_claims(),
            Sig::Rs256(&k.rogue),
        ),
    );
    add(
        "typ is a number",
        sign(
            &json!({"alg": "RS256", "typ": 7, "kid": "k1"}),
            &local_claims(),
            Sig::Rs256(&k.k1),
        ),
    );
    add(
        "typ is an object",
        sign(
            &json!({"alg": "RS256", "typ": {"JWT": true}, "kid": "k1"}),
            &local_claims(),
            Sig::Rs256(&k.k1),
        ),
    );

    // Algorithm games.
    add(
        "alg \"RS256 \" (trailing space)",
        jws(r#"{"alg":"RS256 ","kid":"k1"}"#, &lc, Sig::Rs256(&k.k1)),
    );
    add(
        "alg \"rs256\" (lower case)",
        jws(r#"{"alg":"rs256","kid":"k1"}"#, &lc, Sig::Rs256(&k.k1)),
    );
    add(
        "PS256 with k1, whose JWK pins RS256",
        sign(
            &json!({"alg": "PS256", "kid": "k1"}),
            &local_claims(),
            Sig::Ps256(&k.k1),
        ),
    );
    add(
        "ES256 under RSA kid k1",
        sign(
            &json!({"alg": "ES256", "kid": "k1"}),
            &local_claims(),
            Sig::Es256(&k.rogue_ec),
        ),
    );
    add(
        "RS256 under EC kid ec1",
        sign(
            &json!({"alg": "RS256", "kid": "ec1"}),
            &local_claims(),
            Sig::Rs256(&k.k1),
        ),
    );
    add(
        "ES256 under kid ec1, rogue EC key",
        sign(
            &json!({"alg": "ES256", "kid": "ec1"}),
            &local_claims(),
            Sig::Es256(&k.rogue_ec),
        ),
    );
    add(
        "EdDSA (not accepted for the issuer)",
        format!("{}.{p64}.{s64}", b64(br#"{"alg":"EdDSA","kid":"k1"}"#)),
    );
    add(
        "HS256 with an arbitrary secret",
        jws(&hs, &lc, Sig::Hmac(MessageDigest::sha256(), b"secret")),
    );

    // Authorization header shapes.
    cases.push(case("empty bearer", "Bearer ", Unauthorized));
    cases.push(case("scheme only, no space", "Bearer", Unauthorized));
    cases.push(case(
        "two spaces after Bearer",
        format!("Bearer  {good}"),
        Unauthorized,
    ));
    cases.push(case(
        "tab after Bearer",
        format!("Bearer\t{good}"),
        Unauthorized,
    ));
    // The scheme is case-insensitive (RFC 7235 §2.1, RFC 6750; issue 14), although
    // pitfalls.md #1 once listed lowercase `bearer` among the refusals: the token decides.
    cases.push(case(
        "lowercase scheme 'bearer' (RFC 7235: accepted)",
        format!("bearer {good}"),
        Accept,
    ));
    cases.push(case(
        "upper-case scheme 'BEARER' (RFC 7235: accepted)",
        format!("BEARER {good}"),
        Accept,
    ));
    cases.push(case(
        "lowercase scheme with a forged token",
        format!("bearer {h64}.{}.{s64}", b64(admin.to_string().as_bytes())),
        Unauthorized,
    ));
    cases.push(case(
        "scheme 'Bearers' (another scheme)",
        format!("Bearers {good}"),
        Unauthorized,
    ));
    cases.push(case(
        "comma-joined bearer list",
        format!("Bearer {good}, Bearer {good}"),
        Unauthorized,
    ));
    cases.push(case("DPoP scheme", format!("DPoP {good}"), Unauthorized));
    cases.push(Case {
        name: "two Authorization headers: valid then forged".into(),
        auth: vec![
            format!("Bearer {good}").into_bytes(),
            format!("Bearer {h64}.{}.{s64}", b64(admin.to_string().as_bytes())).into_bytes(),
        ],
        query: String::new(),
        expect: Unauthorized,
    });
    cases.push(Case {
        name: "two Authorization headers: empty then valid".into(),
        auth: vec![b"Bearer x".to_vec(), format!("Bearer {good}").into_bytes()],
        query: String::new(),
        expect: Unauthorized,
    });
    for (name, query, with_header) in [
        (
            "access_token in the query, no header",
            format!("&access_token={good}"),
            false,
        ),
        (
            "ACCESS_TOKEN in the query next to a header",
            format!("&ACCESS_TOKEN={good}"),
            true,
        ),
        (
            "percent-encoded access%5Ftoken in the query, no header",
            format!("&access%5Ftoken={good}"),
            false,
        ),
        (
            "percent-encoded access%5Ftoken in the query next to a header",
            format!("&access%5Ftoken={good}"),
            true,
        ),
        (
            "percent-encoded %61ccess_token in the query next to a header",
            format!("&%61ccess_token={good}"),
            true,
        ),
    ] {
        cases.push(Case {
            name: name.into(),
            auth: if with_header {
                vec![format!("Bearer {good}").into_bytes()]
            } else {
                vec![]
            },
            query,
            expect: Unauthorized,
        });
    }
    cases.push(case(
        "valid token, no role (403)",
        format!("Bearer {}", k1_with(k, |c| c["roles"] = json!([]))),
        Forbidden,
    ));
    cases.push(case(
        "valid token, role value in another case (403)",
        format!(
            "Bearer {}",
            k1_with(k, |c| c["roles"] = json!(["reader", "READER"]))
        ),
        Forbidden,
    ));
    cases.push(case(
        "valid token, Writer only, reading (403)",
        format!("Bearer {}", k1_with(k, |c| c["roles"] = json!(["Writer"]))),
        Forbidden,
    ));
    cases
}

/// The read every case makes, as the upstream sees it (both roads map to the upstream base).
const READ_URL: &str = "/fhir/Patient?_count=1";

/// One case as sent on one road, judged once SEKMET's log has been read.
struct Sent {
    road: Road,
    rid: String,
    /// The last 16 characters of whatever was presented: never echoed back.
    tail: Option<String>,
    /// `None`: the connection closed without a response.
    status: Option<u16>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The request failed, or the gateway stopped answering: a failure as it stands.
    error: Option<String>,
}

impl Sent {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// What must be the same on the other road.
    fn answer(&self, seen: &[Value]) -> Answer {
        let mut a = Answer::new(
            self.road,
            self.status,
            &self.body,
            &self.rid,
            !seen.is_empty(),
        );
        if let Some(w) = self.header("www-authenticate") {
            a.headers
                .push(("www-authenticate".into(), self.road.as_streaming(w)));
        }
        a
    }
}

/// Sends one case on `road`.
async fn send_case(gw: &Gateway, road: Road, c: &Case) -> Sent {
    let rid = format!("tok-{}", uniq());
    let tail = c.auth.first().and_then(|a| {
        let s: Vec<char> = String::from_utf8_lossy(a).chars().collect();
        (s.len() > 40).then(|| s[s.len() - 16..].iter().collect::<String>())
    });
    let mut sent = Sent {
        road,
        rid: rid.clone(),
        tail,
        status: None,
        headers: Vec::new(),
        body: Vec::new(),
        error: None,
    };
    if c.expect == Expect::Oversize {
        let mut req = format!(
            "GET {}/Patient?_count=1 HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nX-Request-Id: {rid}\r\nConnection: close\r\n",
            road.prefix(),
            gw.port
        )
        .into_bytes();
        for a in &c.auth {
            req.extend_from_slice(b"Authorization: ");
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        if let Some(r) = raw_exchange(gw.port, &req).await {
            sent.status = Some(r.status);
            sent.headers = r.headers;
            sent.body = r.body;
        }
        let alive = client().get(gw.url("/healthz")).send().await;
        if !alive.is_ok_and(|r| r.status() == 200) {
            sent.error = Some("the gateway no longer answers /healthz".into());
        }
        return sent;
    }
    let url = format!("{}/Patient?_count=1{}", road.base(gw), c.query);
    let mut rb = client().get(&url).header("X-Request-Id", &rid);
    for a in &c.auth {
        rb = rb.header(
            "Authorization",
            reqwest::header::HeaderValue::from_bytes(a).unwrap(),
        );
    }
    let r = match rb.send().await {
        Ok(r) => r,
        Err(e) => {
            sent.error = Some(format!("request failed: {e}"));
            return sent;
        }
    };
    sent.status = Some(r.status().as_u16());
    sent.headers = r
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    match r.bytes().await {
        Ok(b) => sent.body = b.to_vec(),
        Err(e) => sent.error = Some(e.to_string()),
    }
    sent
}

/// Judges one sent case against what SEKMET logged for it; `Ok` carries a short description
/// of what happened.
fn judge_case(
    c: &Case,
    sent: &Sent,
    seen: &[Value],
    taken: &HashMap<String, String>,
) -> Result<String, String> {
    if let Some(e) = &sent.error {
        return Err(e.clone());
    }
    let (rid, tail) = (&sent.rid, sent.tail.as_deref());
    if c.expect == Expect::Oversize {
        if !seen.is_empty() {
            return Err("SEKMET received it".into());
        }
        return match sent.status {
            None => Ok("connection closed without a response".into()),
            Some(st @ (401 | 431)) => {
                let code = if st == 401 { "login" } else { "too-costly" };
                outcome_ok(st, &sent.headers, &sent.body, code, rid, tail)?;
                Ok(format!("{st} OperationOutcome"))
            }
            // Pingora refuses a request head over 1 MiB itself, before any gateway code runs.
            Some(400) if sent.header("x-request-id").is_none() => Ok(format!(
                "400 from the HTTP layer (no OperationOutcome, body {:?})",
                String::from_utf8_lossy(&sent.body)
            )),
            Some(st) => Err(format!("{st}: {}", String::from_utf8_lossy(&sent.body))),
        };
    }
    let status = sent.status.unwrap_or(0);
    let body = &sent.body;
    if c.expect == Expect::Accept {
        if status != 200 {
            return Err(format!(
                "control refused: {status} {}",
                String::from_utf8_lossy(body)
            ));
        }
        // Besides the read, the buffered road's ParticipantFilter looks the caller up.
        let reads = seen.iter().filter(|r| r["url"] == READ_URL).count();
        let lookups = seen
            .iter()
            .filter(|r| {
                sent.road.identity_lookup(
                    r["method"].as_str().unwrap_or(""),
                    r["url"].as_str().unwrap_or(""),
                )
            })
            .count();
        if reads != 1 || reads + lookups != seen.len() {
            let urls: Vec<&str> = seen
                .iter()
                .map(|r| r["url"].as_str().unwrap_or(""))
                .collect();
            return Err(format!("SEKMET received it {reads} times: {urls:?}"));
        }
        // The road is the road: the access log names the one that answered.
        let road = taken
            .get(&sent.rid)
            .map_or("(no access-log line)", String::as_str);
        if road != sent.road.logged() {
            return Err(format!(
                "not answered by the {} road: road={road}",
                sent.road.name()
            ));
        }
        return Ok("200, reached SEKMET once".into());
    }
    let (want, code) = if c.expect == Expect::Unauthorized {
        (401, "login")
    } else {
        (403, "forbidden")
    };
    let mut problems = Vec::new();
    if status != want {
        let text: String = String::from_utf8_lossy(body).chars().take(300).collect();
        problems.push(format!("status {status} (want {want}): {text}"));
    } else if let Err(e) = outcome_ok(status, &sent.headers, body, code, rid, tail) {
        problems.push(e);
    }
    if want == 401 && status == 401 {
        let www = sent.header("www-authenticate").unwrap_or("");
        if !www.starts_with("Bearer") {
            problems.push(format!("WWW-Authenticate {www:?}"));
        }
        if !c.auth.is_empty() && !www.contains("error=\"invalid_token\"") {
            problems.push(format!("no invalid_token in {www:?}"));
        }
    }
    if !seen.is_empty() {
        let leaked = seen
            .iter()
            .any(|r| tail.is_some_and(|t| r["url"].as_str().unwrap_or("").contains(t)));
        problems.push(if leaked {
            "SEKMET received it, the caller's token in its URL".into()
        } else {
            "SEKMET received it".into()
        });
    }
    if problems.is_empty() {
        Ok(format!("{status} {code}"))
    } else {
        Err(problems.join("; "))
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn token_catalogue_every_hostile_token_is_refused_before_sekmet_on_both_roads() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let keys = Keys::generate();
    let jwks = jwks_server(&keys).await;
    let events = EventsDir::new();
    let mut gw = gateway(&sekmet_url(), &jwks, &events).await;
    let (trip, hits) = tripwire().await;
    let idp_good = token("reader-app").await;
    let mut cases = catalogue(&keys, &idp_good, trip);
    cases.push(bearer_case(
        "real IdP token of a tenant not allowed",
        &token("other-tenant-app").await,
    ));
    cases.push(case(
        "control: ES256 token under kid ec1",
        format!(
            "Bearer {}",
            sign(
                &json!({"alg": "ES256", "kid": "ec1"}),
                &local_claims(),
                Sig::Es256(&keys.ec1)
            )
        ),
        Expect::Accept,
    ));

    // Each case on both roads, one after the other (the tokens stay as fresh on both).
    let mut sent = Vec::new();
    for c in &cases {
        let mut pair = Vec::new();
        for road in Road::BOTH {
            pair.push(send_case(&gw, road, c).await);
        }
        sent.push(pair);
    }
    sekmet_settle().await;
    let ids: Vec<String> = sent.iter().flatten().map(|s| s.rid.clone()).collect();
    let log = sekmet_log(&ids);
    let taken = roads_taken(&gw, &ids).await;

    let mut failures = Vec::new();
    let mut differences = Vec::new();
    let (mut refused, mut accepted_hostile, mut controls) = (0, 0, 0);
    for (c, pair) in cases.iter().zip(&sent) {
        let mut answers = Vec::new();
        for s in pair {
            let seen = log.get(&s.rid).map(Vec::as_slice).unwrap_or_default();
            let label = format!("{} ({} road)", c.name, s.road.name());
            match judge_case(c, s, seen, &taken) {
                Ok(what) => {
                    println!("  ok   {label:<80} {what}");
                    if c.expect == Expect::Accept {
                        controls += 1;
                    } else {
                        refused += 1;
                    }
                }
                Err(why) => {
                    println!("  FAIL {label:<80} {why}");
                    if c.expect != Expect::Accept && why.starts_with("status 200") {
                        accepted_hostile += 1;
                    }
                    failures.push(format!("{label}: {why}"));
                }
            }
            answers.push(s.answer(seen));
        }
        if let Some(d) = road_difference(&c.name, &answers[0], &answers[1]) {
            println!("  DIFF {d}");
            differences.push(d);
        }
    }
    let hostile = cases.iter().filter(|c| c.expect != Expect::Accept).count();
    println!(
        "token catalogue: {hostile} cases on 2 roads, {accepted_hostile} accepted ({refused} refused as expected; {controls} positive controls passed); {} answered differently by the two roads",
        differences.len()
    );

    // Nothing was fetched from a URL a token named; the JWKS was fetched only where configured.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 0, "jku/x5u were followed");
    for r in jwks.received() {
        assert_eq!(r.target, "/keys", "unexpected fetch {r:?}");
    }
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "the gateway exited:\n{}",
        gw.log()
    );
    assert!(
        !gw.log().contains(&idp_good[idp_good.len() - 30..]),
        "a token appears in the log"
    );
    let (f, d) = (failures.len(), differences.len());
    failures.extend(differences);
    assert!(
        failures.is_empty(),
        "{} cases on 2 roads: {f} failed on a road, {d} answered differently by the two roads:\n{}",
        cases.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// B. Header spoofing matrix

const AUDIT: [&str; 5] = [
    "x-ms-azurefhir-audit-userid",
    "x-ms-azurefhir-audit-upn",
    "x-ms-azurefhir-audit-tenant",
    "x-ms-azurefhir-audit-source",
    "x-ms-azurefhir-audit-proxy",
];

/// Everything that may reach the upstream for a plain GET: the forward allow-list
/// (src/headers.rs, gateway.md §3) and the headers the gateway owns.
const ALLOWED_UPSTREAM: &[&str] = &[
    "accept",
    "accept-language",
    "content-type",
    "prefer",
    "if-match",
    "if-none-match",
    "if-none-exist",
    "if-modified-since",
    "content-length",
    "host",
    "x-request-id",
    "x-ms-azurefhir-audit-userid",
    "x-ms-azurefhir-audit-upn",
    "x-ms-azurefhir-audit-tenant",
    "x-ms-azurefhir-audit-source",
    "x-ms-azurefhir-audit-proxy",
];

/// Which line of the base request a spoof replaces.
#[derive(Clone, Copy, PartialEq)]
enum Replaces {
    Nothing,
    Authorization,
    RequestId,
    Host,
}

struct Spoof {
    label: String,
    lines: Vec<u8>,
    replaces: Replaces,
    /// Strings that must appear nowhere upstream.
    needles: Vec<String>,
    /// The case's marker, which must not come back in the caller's response either.
    marker: String,
    /// A refusal (nothing reaches the upstream) is as good as a strip for this one.
    may_refuse: bool,
    /// Host: the caller's own links are built from it by design.
    reflected: bool,
}

/// Header name, value (with the marker), what it replaces, whether refusal is acceptable.
/// Stands for the caller's token in spoofed lines; filled in at send time (tokens expire
/// during a long matrix run).
const TOKEN_SLOT: &str = "@@caller-token@@";

fn spoofed_headers(m: &str) -> Vec<(String, String, Replaces, bool)> {
    let n = Replaces::Nothing;
    let mut v: Vec<(String, String, Replaces, bool)> = [
        ("X-MS-AZUREFHIR-AUDIT-USERID", format!("{m}-user")),
        ("X-MS-AZUREFHIR-AUDIT-UPN", format!("{m}@evil.example")),
        ("X-MS-AZUREFHIR-AUDIT-TENANT", format!("{m}-tenant")),
        ("X-MS-AZUREFHIR-AUDIT-SOURCE", "198.51.100.66".to_string()),
        ("X-MS-AZUREFHIR-AUDIT-PROXY", format!("{m}-proxy")),
        ("X-MS-AZUREFHIR-AUDIT-CLIENTID", format!("{m}-client")),
        ("Proxy-Authorization", format!("Basic {m}")),
        ("Cookie", format!("session={m}")),
        ("X-MS-CLIENT-PRINCIPAL-NAME", format!("{m}@evil.example")),
        ("X-MS-CLIENT-PRINCIPAL-ID", format!("{m}-principal")),
        ("X-Remote-User", format!("{m}-remote")),
        ("X-Forwarded-For", "198.51.100.66".to_string()),
        ("X-Forwarded-Host", format!("{m}.evil.example")),
        ("X-Forwarded-Proto", "https".to_string()),
        ("X-Forwarded-Prefix", format!("/{m}")),
        (
            "Forwarded",
            format!("for=198.51.100.66;host={m}.evil.example;proto=https"),
        ),
        ("X-Real-IP", "198.51.100.66".to_string()),
        ("True-Client-IP", "198.51.100.66".to_string()),
        ("X-Original-URL", format!("/fhir/{m}/Patient")),
        ("X-HTTP-Method-Override", "DELETE".to_string()),
        ("X-Correlation-Id", format!("{m}-correlation")),
        ("X-MS-Service-Request-Id", format!("{m} not a valid id")),
        (
            "Connection",
            format!("X-MS-AZUREFHIR-AUDIT-USERID, X-MS-AZUREFHIR-AUDIT-TENANT, {m}"),
        ),
        ("Keep-Alive", format!("timeout=600, max=1000, {m}")),
        ("TE", format!("trailers, {m}")),
        ("Trailer", format!("X-MS-AZUREFHIR-AUDIT-USERID, {m}")),
        ("Proxy-Connection", format!("keep-alive, {m}")),
    ]
    .into_iter()
    // Pingora reads Connection itself: a value it cannot parse is refused (400), fine too.
    .map(|(k, v)| (k.to_string(), v, n, k == "Connection"))
    .collect();
    // Upgrade alone may be read as an upgrade attempt: refusing it is fine.
    v.push(("Upgrade".into(), format!("{m}/1"), n, true));
    // The caller's own credential: forwarded never, refused when malformed.
    v.push((
        "Authorization".into(),
        format!("Bearer {TOKEN_SLOT}"),
        Replaces::Authorization,
        true,
    ));
    v.push((
        "X-Request-Id".into(),
        format!("{m} bad \"id\""),
        Replaces::RequestId,
        false,
    ));
    v.push((
        "Host".into(),
        format!("{m}.evil.example"),
        Replaces::Host,
        true,
    ));
    v
}

fn mixed_case(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if i % 2 == 0 {
                c.to_ascii_lowercase()
            } else {
                c.to_ascii_uppercase()
            }
        })
        .collect()
}

fn matrix(m_prefix: &str) -> Vec<Spoof> {
    let mut out = Vec::new();
    let probe = spoofed_headers("m");
    for (idx, _) in probe.iter().enumerate() {
        // A marker per header, so a leak names its source.
        let m = format!("{m_prefix}{idx}x");
        let (name, value, replaces, refusable) = spoofed_headers(&m).swap_remove(idx);
        let needles: Vec<String> = if replaces == Replaces::Authorization {
            vec![]
        } else {
            vec![value.clone()]
        }
        .into_iter()
        .chain([m.clone()])
        .chain(
            value
                .contains("198.51.100.66")
                .then(|| "198.51.100.66".to_string()),
        )
        .collect();
        let second = format!("{value}-2");
        let mut variants: Vec<(&str, Vec<u8>, bool)> = vec![
            (
                "as sent",
                format!("{name}: {value}\r\n").into_bytes(),
                false,
            ),
            (
                "lower-case name",
                format!("{}: {value}\r\n", name.to_ascii_lowercase()).into_bytes(),
                false,
            ),
            (
                "upper-case name",
                format!("{}: {value}\r\n", name.to_ascii_uppercase()).into_bytes(),
                false,
            ),
            (
                "mixed-case name",
                format!("{}: {value}\r\n", mixed_case(&name)).into_bytes(),
                false,
            ),
            (
                "duplicated",
                format!("{name}: {value}\r\n{name}: {second}\r\n").into_bytes(),
                true,
            ),
            (
                "padded value",
                format!("{name}: \t  {value} \t \r\n").into_bytes(),
                false,
            ),
            (
                "comma-joined",
                format!("{name}: {value}, {second}\r\n").into_bytes(),
                false,
            ),
            ("empty value", format!("{name}:\r\n").into_bytes(), false),
            (
                "obs-text bytes in the value",
                [format!("{name}: {value}").as_bytes(), b"\xff\xfe\r\n"].concat(),
                false,
            ),
            (
                "obs-fold continuation",
                format!("{name}: {value}\r\n \t{second}\r\n").into_bytes(),
                true,
            ),
            (
                "space before the colon",
                format!("{name} : {value}\r\n").into_bytes(),
                true,
            ),
        ];
        if name.contains('-') {
            variants.push((
                "underscores for dashes",
                format!("{}: {value}\r\n", name.replace('-', "_")).into_bytes(),
                false,
            ));
        }
        for (variant, lines, refusable_variant) in variants {
            out.push(Spoof {
                label: format!("{name} / {variant}"),
                lines,
                replaces,
                needles: needles.clone(),
                marker: m.clone(),
                may_refuse: refusable || refusable_variant,
                reflected: replaces == Replaces::Host,
            });
        }
    }
    // Combinations a single header cannot express.
    let m = format!("{m_prefix}cx");
    // (label, lines, may the gateway refuse it)
    let extra: Vec<(&str, String, bool)> = vec![
        (
            "Connection names every gateway-owned header",
            "Connection: X-MS-AZUREFHIR-AUDIT-USERID, X-MS-AZUREFHIR-AUDIT-UPN, X-MS-AZUREFHIR-AUDIT-TENANT, X-MS-AZUREFHIR-AUDIT-SOURCE, X-MS-AZUREFHIR-AUDIT-PROXY, X-Request-Id\r\n".into(),
            false,
        ),
        // Pingora answers this one with a 400 OperationOutcome: the caller only breaks its own request.
        ("Connection: Host", "Connection: Host\r\n".into(), true),
        ("Connection: Authorization", "Connection: Authorization\r\n".into(), true),
        // Nominations Pingora's proxy refuses before the upstream request (protected names,
        // pseudo-headers, non-tokens, ten or more): refusing is fine, on both roads alike.
        (
            "Connection: X-Forwarded-For (with one)",
            "Connection: X-Forwarded-For\r\nX-Forwarded-For: 198.51.100.66\r\n".into(),
            true,
        ),
        ("Connection: :authority", "Connection: :authority\r\n".into(), true),
        (
            "Connection: a quoted token",
            "Connection: \"X-MS-AZUREFHIR-AUDIT-USERID\"\r\n".into(),
            true,
        ),
        (
            "Connection with ten nominations",
            "Connection: a, b, c, d, e, f, g, h, i, X-MS-AZUREFHIR-AUDIT-USERID\r\n".into(),
            true,
        ),
        (
            "h2c upgrade smuggling",
            "Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n".into(),
            true,
        ),
        (
            "websocket upgrade",
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n".into(),
            true,
        ),
        (
            "TE trailers with a Trailer naming the audit header",
            "TE: trailers\r\nTrailer: X-MS-AZUREFHIR-AUDIT-USERID\r\n".into(),
            false,
        ),
        (
            "every spoof at once",
            spoofed_headers(&m)
                .into_iter()
                .filter(|(_, _, r, _)| *r == Replaces::Nothing)
                .map(|(k, v, _, _)| format!("{k}: {v}\r\n"))
                .collect(),
            true,
        ),
    ];
    for (label, lines, may_refuse) in extra {
        out.push(Spoof {
            label: label.into(),
            lines: lines.into_bytes(),
            replaces: Replaces::Nothing,
            needles: vec![m.clone(), "198.51.100.66".into()],
            marker: m.clone(),
            may_refuse,
            reflected: false,
        });
    }
    out
}

/// Where the gateway sends requests, and how to read what arrived there.
#[derive(Clone, Copy)]
enum Target<'a> {
    Sekmet,
    Recorder(&'a ScriptedUpstream),
}

struct Arrived {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
}

/// SEKMET's traffic log for a batch of correlation ids (`sekmet_log`).
type Log = HashMap<String, Vec<Value>>;

impl Target<'_> {
    fn host(&self) -> String {
        match self {
            Target::Sekmet => sekmet_url().split('/').nth(2).unwrap().to_string(),
            Target::Recorder(u) => u.addr.to_string(),
        }
    }

    /// What arrived upstream for a correlation id: SEKMET's from `log` (`read_log`, after the
    /// requests were sent), the recorder's from its records.
    fn arrived(&self, id: &str, log: &Log) -> Vec<Arrived> {
        match self {
            // SEKMET's log keeps one value per name (the last): the recorder below sees
            // every line.
            Target::Sekmet => log
                .get(id)
                .into_iter()
                .flatten()
                .map(|r| Arrived {
                    method: r["method"].as_str().unwrap_or("").to_string(),
                    url: r["url"].as_str().unwrap_or("").to_string(),
                    headers: r["headers"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                        .collect(),
                })
                .collect(),
            Target::Recorder(u) => u
                .received()
                .into_iter()
                .filter(|r| r.header("x-request-id") == Some(id))
                .map(|r| Arrived {
                    method: r.method.clone(),
                    url: r.target.clone(),
                    headers: r.headers.clone(),
                })
                .collect(),
        }
    }

    /// SEKMET's log for these ids, once it has logged everything answered so far; nothing to
    /// read for the recorder.
    async fn read_log(&self, ids: &[String]) -> Log {
        match self {
            Target::Sekmet => {
                sekmet_settle().await;
                sekmet_log(ids)
            }
            Target::Recorder(_) => Log::new(),
        }
    }

    /// Whether the upstream never got a request: SEKMET has nothing for `id`; the recorder
    /// recorded nothing while it was sent (`recorded`, its count then).
    fn never_received(&self, id: &str, log: &Log, recorded: usize) -> bool {
        match self {
            Target::Sekmet => self.arrived(id, log).is_empty(),
            Target::Recorder(_) => recorded == 0,
        }
    }

    fn count(&self) -> usize {
        match self {
            Target::Sekmet => 0,
            Target::Recorder(u) => u.received().len(),
        }
    }
}

/// The request head as it arrived upstream, for comparing the roads: every line (sorted, so
/// order does not count), the correlation id's value and the route in the URL aside.
fn head_of(road: Road, a: &Arrived) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = a
        .headers
        .iter()
        .map(|(k, v)| {
            let v = if k == "x-request-id" {
                "<id>".to_string()
            } else {
                road.as_streaming(v)
            };
            (format!("upstream {k}"), v)
        })
        .collect();
    h.sort();
    h.push(("upstream target".into(), road.as_streaming(&a.url)));
    h
}

/// What the upstream got must carry only the gateway's values.
fn check_arrived(
    a: &Arrived,
    id: &str,
    host: &str,
    needles: &[String],
    token: &str,
    audit: &[(&str, &str); 5],
) -> Result<(), String> {
    let mut problems = Vec::new();
    let count = |n: &str| a.headers.iter().filter(|(k, _)| k == n).count();
    let get = |n: &str| {
        a.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_str())
    };
    for (name, want) in audit {
        if count(name) != 1 || get(name) != Some(want) {
            let all: Vec<&str> = a
                .headers
                .iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect();
            problems.push(format!("{name} = {all:?}, want [{want:?}]"));
        }
    }
    if count("x-request-id") != 1 || get("x-request-id") != Some(id) {
        problems.push(format!("x-request-id {:?}, want {id}", get("x-request-id")));
    }
    if get("host") != Some(host) {
        problems.push(format!("host {:?}", get("host")));
    }
    for (k, _) in &a.headers {
        if !ALLOWED_UPSTREAM.contains(&k.as_str()) {
            problems.push(format!("header {k} reached the upstream"));
        }
    }
    let tail = &token[token.len() - 24..];
    for (k, v) in a
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain([("(url)", a.url.as_str())])
    {
        let (kl, vl) = (k.to_ascii_lowercase(), v.to_ascii_lowercase());
        for n in needles {
            let n = n.to_ascii_lowercase();
            if kl.contains(&n) || vl.contains(&n) {
                problems.push(format!("spoofed {n:?} reached the upstream in {k}: {v}"));
            }
        }
        if v.contains(tail) {
            problems.push(format!("the caller's token reached the upstream in {k}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn fill_token_slot(req: &[u8], token: &str) -> Vec<u8> {
    let slot = TOKEN_SLOT.as_bytes();
    let mut out = Vec::with_capacity(req.len() + token.len());
    let mut i = 0;
    while i < req.len() {
        if req[i..].starts_with(slot) {
            out.extend_from_slice(token.as_bytes());
            i += slot.len();
        } else {
            out.push(req[i]);
            i += 1;
        }
    }
    out
}

/// One spoof as sent on one road, judged once the upstream's log has been read.
struct SentSpoof {
    road: Road,
    rid: String,
    /// The caller's token it carried (tokens are renewed during a run).
    token: String,
    resp: Option<RawResp>,
    /// The id to look the request up by upstream: the gateway's (in its answer) when it was
    /// answered 200; otherwise ours, or the spoofed value when the spoof replaced our line.
    id: String,
    /// Requests the recorder got while it was sent (SEKMET: 0, its log is read by id).
    recorded: usize,
}

impl SentSpoof {
    fn refused(&self) -> bool {
        self.resp.as_ref().is_none_or(|r| r.status != 200)
    }
}

async fn send_spoof(
    gw: &Gateway,
    target: &Target<'_>,
    road: Road,
    s: &Spoof,
    token: &str,
) -> SentSpoof {
    let rid = format!("spoof-{}", uniq());
    let mut req = format!("GET {}/Patient?_count=1 HTTP/1.1\r\n", road.prefix()).into_bytes();
    if s.replaces != Replaces::Host {
        req.extend_from_slice(format!("Host: 127.0.0.1:{}\r\n", gw.port).as_bytes());
    }
    req.extend_from_slice(b"Connection: close\r\n");
    req.extend_from_slice(&s.lines);
    if s.replaces != Replaces::Authorization {
        req.extend_from_slice(format!("Authorization: Bearer {token}\r\n").as_bytes());
    }
    if s.replaces != Replaces::RequestId {
        req.extend_from_slice(format!("X-Request-Id: {rid}\r\n").as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let req = fill_token_slot(&req, token);
    let before = target.count();
    let resp = raw_exchange(gw.port, &req).await;
    let recorded = target.count() - before;
    let answered = resp.as_ref().filter(|r| r.status == 200);
    let id = match answered {
        Some(r) => r.header("x-request-id").unwrap_or("").to_string(),
        // Malformed X-Request-Id lines: nothing valid to look up by but the spoof itself.
        None if s.replaces == Replaces::RequestId => s.needles[0].clone(),
        None => rid.clone(),
    };
    SentSpoof {
        road,
        rid,
        token: token.to_string(),
        resp,
        id,
        recorded,
    }
}

/// Judges one sent spoof against what arrived upstream. `Ok(Some(..))`: refused, and that is
/// fine for this spoof; `Ok(None)`: forwarded with only the gateway's values.
fn judge_spoof(
    gw: &Gateway,
    target: &Target<'_>,
    s: &Spoof,
    sent: &SentSpoof,
    log: &Log,
    taken: &HashMap<String, String>,
    audit: &[(&str, &str); 5],
) -> Result<Option<String>, String> {
    let resp = &sent.resp;
    if sent.refused() {
        let what = resp
            .as_ref()
            .map(|r| format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
            .unwrap_or_else(|| "closed".into());
        if !s.may_refuse {
            return Err(format!("refused: {what}"));
        }
        if !target.never_received(&sent.id, log, sent.recorded) {
            return Err(format!("refused ({what}) but the upstream received it"));
        }
        if resp.as_ref().is_some_and(|r| r.status >= 500) {
            return Err(format!("server error: {what}"));
        }
        let what: String = what.chars().take(160).collect();
        return Ok(Some(what));
    }
    let r = resp.as_ref().unwrap();
    // The id the gateway used: ours, or a fresh one when the spoof replaced it.
    let id = &sent.id;
    if s.replaces != Replaces::RequestId && *id != sent.rid {
        return Err(format!("response x-request-id {id:?}, sent {}", sent.rid));
    }
    if s.replaces == Replaces::RequestId && (id.len() != 36 || id.contains(' ')) {
        return Err(format!("malformed id not replaced by a fresh one: {id:?}"));
    }
    // The caller's read once; on the buffered road ParticipantFilter's lookups of the caller
    // too, which carry only the gateway's values as well.
    let arrived = target.arrived(id, log);
    let reads = arrived.iter().filter(|a| a.url == READ_URL).count();
    let strays: Vec<&str> = arrived
        .iter()
        .filter(|a| a.url != READ_URL && !sent.road.identity_lookup(&a.method, &a.url))
        .map(|a| a.url.as_str())
        .collect();
    if reads != 1 || !strays.is_empty() {
        return Err(format!(
            "upstream received {reads} reads for {id}, and {strays:?}"
        ));
    }
    for a in &arrived {
        check_arrived(a, id, &target.host(), &s.needles, &sent.token, audit)
            .map_err(|e| format!("{}: {e}", a.url))?;
    }
    // The road is the road: the access log names the one that answered.
    let road = taken.get(id).map_or("(no access-log line)", String::as_str);
    if road != sent.road.logged() {
        return Err(format!(
            "not answered by the {} road: road={road}",
            sent.road.name()
        ));
    }
    // Nor does the caller's response reflect a spoof (links stay on the gateway's base).
    if !s.reflected {
        let text = String::from_utf8_lossy(&r.body).to_ascii_lowercase();
        if text.contains(&s.marker) {
            return Err(format!("response body reflects {:?}", s.marker));
        }
        if let Ok(b) = serde_json::from_slice::<Value>(&r.body) {
            let base = format!("http://127.0.0.1:{}{}", gw.port, sent.road.prefix());
            for l in b["link"].as_array().into_iter().flatten() {
                let u = l["url"].as_str().unwrap_or("");
                if !u.starts_with(&base) {
                    return Err(format!("response link {u} is not on {base}"));
                }
            }
        }
    }
    Ok(None)
}

/// What must be the same on the other road: the answer (a refusal's OperationOutcome), whether
/// the upstream got it, and the head it got.
fn spoof_answer(target: &Target<'_>, sent: &SentSpoof, log: &Log) -> Answer {
    let r = sent.resp.as_ref();
    let arrived = target.arrived(&sent.id, log);
    let reached = if sent.refused() {
        !target.never_received(&sent.id, log, sent.recorded)
    } else {
        !arrived.is_empty()
    };
    let rid = r
        .and_then(|r| r.header("x-request-id"))
        .unwrap_or(&sent.rid);
    let mut a = Answer::new(
        sent.road,
        r.map(|r| r.status),
        r.map_or(&[][..], |r| &r.body[..]),
        rid,
        reached,
    );
    if let Some(read) = arrived.iter().find(|a| a.url == READ_URL) {
        a.headers = head_of(sent.road, read);
    }
    a
}

/// Runs the matrix on both roads, spoof by spoof, then judges every case against what
/// arrived upstream and compares the roads. A control without any spoof goes first: where the
/// roads' request heads differ for it too, that difference is theirs, not the spoof's
/// (`the_upstream_gets_the_same_request_head_on_both_roads` in tests/one_road.rs pins it),
/// and a case is compared beyond it.
async fn run_matrix(gw: &Gateway, target: Target<'_>, what: &str) {
    let audit = [
        (AUDIT[0], "oid-reader-app"),
        (AUDIT[1], "reader-app@example.org"),
        (AUDIT[2], TENANT_A),
        (AUDIT[3], "127.0.0.1"),
        (AUDIT[4], "fhir-gateway"),
    ];
    let mut spoofs = matrix(&format!("spf{}", &uniq()[..6]));
    let control = format!("spf{}ctl", &uniq()[..6]);
    spoofs.insert(
        0,
        Spoof {
            label: "control: no spoofed header".into(),
            lines: Vec::new(),
            replaces: Replaces::Nothing,
            needles: vec![control.clone()],
            marker: control,
            may_refuse: false,
            reflected: false,
        },
    );
    let mut token = common::idp::token("reader-app").await;
    let mut fetched = Instant::now();
    let mut sent = Vec::new();
    for s in &spoofs {
        // IdP tokens live 300 s; a matrix run against SEKMET on a busy machine takes longer.
        if fetched.elapsed() > Duration::from_secs(120) {
            token = common::idp::token("reader-app").await;
            fetched = Instant::now();
        }
        let mut pair = Vec::new();
        for road in Road::BOTH {
            pair.push(send_spoof(gw, &target, road, s, &token).await);
        }
        sent.push(pair);
    }
    let ids: Vec<String> = sent.iter().flatten().map(|s| s.id.clone()).collect();
    let log = target.read_log(&ids).await;
    let taken = roads_taken(gw, &ids).await;
    let (mut stripped, mut refused) = ([0; 2], [0; 2]);
    let mut failures = Vec::new();
    let mut differences = Vec::new();
    let baseline = (
        spoof_answer(&target, &sent[0][0], &log),
        spoof_answer(&target, &sent[0][1], &log),
    );
    if let Some(d) = road_difference(&spoofs[0].label, &baseline.0, &baseline.1) {
        println!(
            "  BASELINE (pinned by one_road's the_upstream_gets_the_same_request_head_on_both_roads; cases are compared beyond it) {d}"
        );
    }
    for (s, pair) in spoofs.iter().zip(&sent) {
        for (k, one) in pair.iter().enumerate() {
            let label = format!("{} ({} road)", s.label, one.road.name());
            match judge_spoof(gw, &target, s, one, &log, &taken, &audit) {
                Ok(how) => {
                    if let Some(what) = how {
                        refused[k] += 1;
                        println!("  refused  {label}: {what}");
                    }
                    stripped[k] += 1;
                }
                Err(e) => {
                    println!("  FAIL     {label}: {e}");
                    failures.push(format!("{label}: {e}"));
                }
            }
        }
        let mut streaming = spoof_answer(&target, &pair[0], &log);
        let mut buffered = spoof_answer(&target, &pair[1], &log);
        drop_baseline((&baseline.0, &baseline.1), &mut streaming, &mut buffered);
        if let Some(d) = road_difference(&s.label, &streaming, &buffered) {
            println!("  DIFF     {d}");
            differences.push(d);
        }
    }
    let n = spoofs.len();
    for (k, road) in Road::BOTH.iter().enumerate() {
        println!(
            "header spoofing matrix ({what}, {} road): {n} cases, {} replaced/stripped ({:.0}%), of which {} refused before reaching the upstream",
            road.name(),
            stripped[k],
            100.0 * stripped[k] as f64 / n as f64,
            refused[k]
        );
    }
    println!(
        "header spoofing matrix ({what}): {} of {n} cases answered differently by the two roads",
        differences.len()
    );
    let (f, d) = (failures.len(), differences.len());
    failures.extend(differences);
    assert!(
        failures.is_empty(),
        "{n} spoofing cases on 2 roads ({what}): {f} failed on a road, {d} answered differently by the two roads:\n{}",
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn header_spoofing_matrix_sekmet_gets_only_the_gateways_values_on_both_roads() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let keys = Keys::generate();
    let jwks = jwks_server(&keys).await;
    let events = EventsDir::new();
    let gw = gateway(&sekmet_url(), &jwks, &events).await;
    run_matrix(&gw, Target::Sekmet, "SEKMET").await;
}

fn empty_bundle() -> Reply {
    Reply::json(
        200,
        r#"{"resourceType":"Bundle","type":"searchset","total":0,"entry":[]}"#,
    )
}

/// SEKMET's log folds duplicate lines into one value; the recorder keeps every line, so a
/// client copy sent next to the gateway's own would show here.
#[tokio::test(flavor = "multi_thread")]
async fn header_spoofing_matrix_every_line_on_the_wire_on_both_roads() {
    let keys = Keys::generate();
    let jwks = jwks_server(&keys).await;
    let up = ScriptedUpstream::start(|_, _| empty_bundle()).await;
    let events = EventsDir::new();
    let gw = gateway(&up.base(), &jwks, &events).await;
    run_matrix(&gw, Target::Recorder(&up), "recorded upstream").await;
}

// ---------------------------------------------------------------------------------------------
// Claims that carry control characters (pitfall 6)

#[tokio::test(flavor = "multi_thread")]
async fn claims_with_control_characters_never_inject_upstream_headers_on_both_roads() {
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let keys = Keys::generate();
    let jwks = jwks_server(&keys).await;
    let up = ScriptedUpstream::start(|_, _| empty_bundle()).await;
    let (events_s, events_r) = (EventsDir::new(), EventsDir::new());
    let to_sekmet = gateway(&sekmet_url(), &jwks, &events_s).await;
    let to_recorder = gateway(&up.base(), &jwks, &events_r).await;

    let long = format!("{}\r\nX-Injected-L: 1", "a".repeat(5000));
    let cases: Vec<(&str, &str, String)> =
        vec![
        ("oid with CRLF", "oid", "oid-x\r\nX-Injected-A: 1".into()),
        (
            "upn with CRLF and a smuggled request",
            "upn",
            "u@example.org\r\nX-Injected-B: 1\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: evil\r\n\r\n"
                .into(),
        ),
        ("tid with LF", "tid", "tenant\nX-Injected-C: 1".into()),
        ("oid with NUL", "oid", "oid\u{0}X-Injected-D: 1".into()),
        ("upn with CR only", "upn", "u@example.org\rX-Injected-E: 1".into()),
        (
            "upn with U+2028 line separator",
            "upn",
            "u@example.org\u{2028}X-Injected-F: 1".into(),
        ),
        ("upn with NEL (U+0085)", "upn", "u@example.org\u{85}X-Injected-G: 1".into()),
        ("upn with RTL override", "upn", "\u{202e}gro.elpmaxe@nimda".into()),
        ("tid with a tab and DEL", "tid", "t\tX-Injected-H:\u{7f}1".into()),
        ("oid of control characters only", "oid", "\r\n".into()),
        ("oid of 5,000 bytes ending in CRLF", "oid", long),
    ];
    // Every case to each upstream on each road; then judged against what arrived.
    struct Sent<'t> {
        label: String,
        claim: &'static str,
        value: String,
        target: Target<'t>,
        road: Road,
        rid: String,
        status: u16,
        body: String,
        /// Requests the recorder got while it was sent (SEKMET: 0).
        recorded: usize,
    }
    let mut sent = Vec::new();
    for (what, claim, value) in &cases {
        let mut c = local_claims();
        c["iss"] = json!(OPEN_ISS);
        c[*claim] = json!(value);
        let t = sign(&rs256_header("k1"), &c, Sig::Rs256(&keys.k1));
        for (gw, target) in [
            (&to_sekmet, Target::Sekmet),
            (&to_recorder, Target::Recorder(&up)),
        ] {
            for road in Road::BOTH {
                let rid = format!("crlf-{}", uniq());
                let before = target.count();
                let r = client()
                    .get(format!("{}/Patient?_count=1", road.base(gw)))
                    .bearer_auth(&t)
                    .header("X-Request-Id", &rid)
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let body = r.text().await.unwrap_or_default();
                let label = format!(
                    "{what} ({}, {} road)",
                    if matches!(target, Target::Sekmet) {
                        "SEKMET"
                    } else {
                        "recorder"
                    },
                    road.name()
                );
                let recorded = target.count() - before;
                sent.push(Sent {
                    label,
                    claim,
                    value: value.clone(),
                    target,
                    road,
                    rid,
                    status,
                    body,
                    recorded,
                });
            }
        }
    }
    sekmet_settle().await;
    let ids: Vec<String> = sent.iter().map(|s| s.rid.clone()).collect();
    let log = sekmet_log(&ids);

    let mut failures = Vec::new();
    let mut differences = Vec::new();
    let mut sanitized = 0;
    let mut refused_n = 0;
    let mut answers: Vec<Answer> = Vec::new();
    for one in &sent {
        let Sent {
            label,
            claim,
            value,
            target,
            road,
            rid,
            status,
            body,
            recorded,
        } = one;
        let (status, recorded) = (*status, *recorded);
        let arrived = target.arrived(rid, &log);
        let audit_name = match *claim {
            "oid" => AUDIT[0],
            "upn" => AUDIT[1],
            _ => AUDIT[2],
        };
        // The caller's read; on the buffered road ParticipantFilter's lookups of the caller
        // come first, and must be as safe.
        let read = arrived.iter().find(|a| a.url == READ_URL);
        let got = read.and_then(|a| {
            a.headers
                .iter()
                .find(|(k, _)| k == audit_name)
                .map(|(_, v)| v.clone())
        });
        let mut answer = Answer::new(
            *road,
            Some(status),
            body.as_bytes(),
            rid,
            !target.never_received(rid, &log, recorded),
        );
        answer.headers.push((
            format!("upstream {audit_name}"),
            got.clone().unwrap_or_default(),
        ));
        answers.push(answer);
        if answers.len() == 2 {
            let b = answers.pop().unwrap();
            let s = answers.pop().unwrap();
            let name = label.replace(" buffered road)", " both roads)");
            if let Some(d) = road_difference(&name, &s, &b) {
                println!("  DIFF {d}");
                differences.push(d);
            }
        }
        if status != 200 {
            // Refusing is allowed; it must be a proper refusal that reached nobody.
            if !matches!(status, 401 | 403) || !target.never_received(rid, &log, recorded) {
                failures.push(format!("{label}: {status} {body}"));
            } else {
                refused_n += 1;
            }
            continue;
        }
        let reads = arrived.iter().filter(|a| a.url == READ_URL).count();
        let lookups = arrived
            .iter()
            .filter(|a| road.identity_lookup(&a.method, &a.url))
            .count();
        if reads != 1 || reads + lookups != arrived.len() {
            let urls: Vec<&str> = arrived.iter().map(|a| a.url.as_str()).collect();
            failures.push(format!("{label}: upstream got {urls:?}"));
            continue;
        }
        let mut problems = Vec::new();
        for (k, v) in arrived.iter().flat_map(|a| &a.headers) {
            if !ALLOWED_UPSTREAM.contains(&k.as_str()) {
                problems.push(format!("header {k}: {v:?} reached the upstream"));
            }
            if AUDIT.contains(&k.as_str())
                && (v.len() > 2048 || !v.bytes().all(|b| (0x20..0x7f).contains(&b)))
            {
                problems.push(format!("{k} is not header-safe: {v:?}"));
            }
        }
        match &got {
            None => problems.push(format!("{audit_name} missing")),
            // The visible prefix survives: the identity is kept, only made safe.
            Some(v) => {
                let visible: String = value
                    .chars()
                    .take_while(|c| (' '..='~').contains(c))
                    .collect();
                if !v.starts_with(&visible[..visible.len().min(2048)]) {
                    problems.push(format!("{audit_name} = {v:?} lost the claim's value"));
                }
            }
        }
        if let Target::Recorder(u) = &target {
            // Those requests, and nothing smuggled behind them.
            if recorded != arrived.len() {
                let all: Vec<String> = u
                    .received()
                    .iter()
                    .filter(|r| r.header("x-request-id") != Some(rid.as_str()))
                    .map(|r| format!("{} {}", r.method, r.target))
                    .collect();
                problems.push(format!(
                    "{recorded} requests reached the upstream for {} (others recorded: {all:?})",
                    arrived.len()
                ));
            }
        }
        if problems.is_empty() {
            sanitized += 1;
            println!(
                "  sanitized {label}: {audit_name} = {:?}",
                got.unwrap_or_default().chars().take(60).collect::<String>()
            );
        } else {
            failures.push(format!("{label}: {}", problems.join("; ")));
        }
    }
    println!(
        "control characters in claims: {} cases x 2 upstreams x 2 roads, {sanitized} sanitized, {refused_n} refused, {} failed, {} answered differently by the two roads",
        cases.len(),
        failures.len(),
        differences.len()
    );
    failures.extend(differences);
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
