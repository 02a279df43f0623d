//! Tokens from the real OIDC provider (client credentials), and tokens signed with its own key
//! (read from its key file) for the cases it will not issue: expired, not yet valid, forged
//! claims.

use super::*;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

pub const TENANT_A: &str = "11111111-1111-1111-1111-111111111111";
pub const TENANT_B: &str = "22222222-2222-2222-2222-222222222222";
pub const AUDIENCE: &str = "api://fhir-gateway";

/// A client-credentials token for one of the IdP's clients (`reader-app` → `reader-secret`).
pub async fn token_from(
    idp: &str,
    client: &str,
    scope: Option<&str>,
    resource: Option<&str>,
) -> String {
    let secret = format!("{}-secret", client.trim_end_matches("-app"));
    let mut form = vec![("grant_type", "client_credentials")];
    if let Some(s) = scope {
        form.push(("scope", s));
    }
    if let Some(r) = resource {
        form.push(("resource", r));
    }
    let r = super::client()
        .post(format!("{idp}/token"))
        .basic_auth(client, Some(secret))
        .form(&form)
        .send()
        .await
        .expect("IdP token endpoint");
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "token for {client}: {v}");
    v["access_token"].as_str().unwrap().to_string()
}

pub async fn token(client: &str) -> String {
    token_from(IDP, client, None, None).await
}

pub async fn token_with_scope(client: &str, scope: &str) -> String {
    token_from(IDP, client, Some(scope), None).await
}

pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

pub fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

pub fn claims_of(token: &str) -> Value {
    serde_json::from_slice(&unb64(token.split('.').nth(1).unwrap())).unwrap()
}

/// The IdP's private signing JWK (from the key file the test peer persists).
pub fn idp_private_jwk(keys_file: &std::path::Path) -> Value {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(keys_file).unwrap()).unwrap();
    v["keys"][0].clone()
}

pub fn default_keys_file() -> PathBuf {
    peers_dir().join("oidc/keys.json")
}

fn bn(s: &str) -> openssl::bn::BigNum {
    openssl::bn::BigNum::from_slice(&unb64(s)).unwrap()
}

/// PEM of an RSA private JWK.
pub fn private_pem(jwk: &Value) -> Vec<u8> {
    let g = |k: &str| bn(jwk[k].as_str().unwrap());
    let rsa = openssl::rsa::Rsa::from_private_components(
        g("n"),
        g("e"),
        g("d"),
        g("p"),
        g("q"),
        g("dp"),
        g("dq"),
        g("qi"),
    )
    .unwrap();
    rsa.private_key_to_pem().unwrap()
}

/// PEM of the public half (what a key-confusion attacker would use as an HMAC secret).
pub fn public_pem(jwk: &Value) -> Vec<u8> {
    let rsa = openssl::rsa::Rsa::from_public_components(
        bn(jwk["n"].as_str().unwrap()),
        bn(jwk["e"].as_str().unwrap()),
    )
    .unwrap();
    rsa.public_key_to_pem().unwrap()
}

/// Signs `claims` with the IdP's own key and kid.
pub fn sign_as_idp(claims: &Value) -> String {
    let jwk = idp_private_jwk(&default_keys_file());
    let mut h = Header::new(Algorithm::RS256);
    h.kid = jwk["kid"].as_str().map(str::to_string);
    h.typ = Some("at+jwt".into());
    jsonwebtoken::encode(
        &h,
        claims,
        &EncodingKey::from_rsa_pem(&private_pem(&jwk)).unwrap(),
    )
    .unwrap()
}

/// Claims like the IdP's for `reader-app`, valid for five minutes.
pub fn reader_claims() -> Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    serde_json::json!({
        "iss": IDP, "aud": AUDIENCE, "exp": now + 300, "iat": now, "sub": "reader-app",
        "client_id": "reader-app", "azp": "reader-app", "roles": ["Reader"],
        "upn": "reader-app@example.org", "oid": "oid-reader-app", "tid": TENANT_A
    })
}

/// A token as the IdP would issue it for a user: `oid` in tenant A, `roles`, optional `fhirUser`,
/// valid for ten minutes.
pub fn user_token(oid: &str, roles: &[&str], fhir_user: Option<&str>) -> String {
    let now = now_secs();
    let mut c = serde_json::json!({
        "iss": IDP, "aud": AUDIENCE, "exp": now + 600, "iat": now, "sub": oid,
        "client_id": "leak-suite", "azp": "leak-suite", "roles": roles,
        "upn": format!("{oid}@example.org"), "oid": oid, "tid": TENANT_A
    });
    if let Some(f) = fhir_user {
        c["fhirUser"] = serde_json::json!(f);
    }
    sign_as_idp(&c)
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The standard `auth:` section for the real IdP on `idp`, tenants A and B allowed.
pub fn jwt_auth_yaml(idp: &str) -> String {
    format!(
        "auth:\n  mode: jwt\n  jwks:\n    min_refetch_secs: 1\n    retry_secs: 1\n  issuers:\n    - name: hospital\n      issuer: {idp}\n      discovery_url: {idp}/.well-known/openid-configuration\n      audiences: [\"{AUDIENCE}\"]\n      allowed_tenants: [\"{TENANT_A}\", \"{TENANT_B}\"]\n"
    )
}

/// A gateway in front of SEKMET with real JWT auth against the shared IdP, ready (keys loaded).
pub async fn jwt_gateway(extra: &str) -> Gateway {
    require_peer(&format!("{IDP}/.well-known/openid-configuration")).await;
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let gw = Gateway::start(&format!(
        "upstream:\n  url: {}\n{extra}{}",
        sekmet_url(),
        jwt_auth_yaml(IDP)
    ))
    .await;
    wait_ready(&gw).await;
    gw
}

pub async fn wait_ready(gw: &Gateway) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = client().get(gw.url("/readyz")).send().await.unwrap();
        if r.status() == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gateway never ready:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An OIDC provider of the test's own (the same package and script as the shared one), for
/// tests that stop it or rotate its key without disturbing the others. Killed on drop.
pub struct PrivateIdp {
    child: Child,
    pub port: u16,
    /// Its key file: delete it before a restart to rotate the key.
    pub keys: PathBuf,
    log: PathBuf,
}

impl PrivateIdp {
    /// Starts it on `port` with the key file `keys` (created when missing) and waits until its
    /// discovery document answers.
    pub async fn start(port: u16, keys: PathBuf) -> PrivateIdp {
        let dir = peers_dir().join("oidc");
        assert!(
            dir.join("node_modules/oidc-provider").exists(),
            "{}: run scripts/peers.sh install",
            dir.display()
        );
        let log = std::env::temp_dir().join(format!(
            "fgw-idp-{}-{port}-{}.log",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new("node")
            .arg("idp.mjs")
            .current_dir(&dir)
            .env("PORT", port.to_string())
            .env("ISSUER", format!("http://127.0.0.1:{port}"))
            .env("KEYS_FILE", &keys)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("node");
        let mut idp = PrivateIdp {
            child,
            port,
            keys,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let r = client()
                .get(format!("{}/.well-known/openid-configuration", idp.url()))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            // Its own discovery document (not some other listener's answer on that port).
            if let Ok(r) = r {
                if r.status() == 200 {
                    let v: Value = r.json().await.unwrap_or_default();
                    assert_eq!(v["issuer"], idp.url(), "another server answers on {port}");
                    break;
                }
            }
            let exited = idp.child.try_wait().ok().flatten();
            assert!(
                Instant::now() < deadline && exited.is_none(),
                "private IdP did not start on {port} (exited: {exited:?}):\n{}",
                std::fs::read_to_string(&idp.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        idp
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops it (waits for the process: its port is free afterwards).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateIdp {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The `kid` in a JWT's header.
pub fn kid_of(token: &str) -> String {
    let h: Value = serde_json::from_slice(&unb64(token.split('.').next().unwrap())).unwrap();
    h["kid"].as_str().unwrap().to_string()
}
