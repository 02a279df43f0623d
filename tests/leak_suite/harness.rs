//! The few helpers of `tests/common` this suite needs, copied (that module belongs to another
//! engineer and may change under us): spawn the gateway binary, tokens from the real IdP and
//! tokens signed with the IdP's own key.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const SEKMET: &str = "http://127.0.0.1:8090/fhir";
pub const IDP: &str = "http://127.0.0.1:9400";
pub const TENANT_A: &str = "11111111-1111-1111-1111-111111111111";
pub const TENANT_B: &str = "22222222-2222-2222-2222-222222222222";
pub const AUDIENCE: &str = "api://fhir-gateway";
/// Identifier system the gateway puts on linked resources.
pub const LINK_SYSTEM: &str = "urn:fhir-gateway:identity-link";

pub fn sekmet_url() -> String {
    std::env::var("SEKMET_URL").unwrap_or_else(|_| SEKMET.to_string())
}

fn peers_dir() -> PathBuf {
    std::env::var("PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/peers"))
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

pub async fn require_peer(url: &str) {
    let ok = client()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .is_ok();
    assert!(
        ok,
        "peer {url} is not running: start the peers with `scripts/peers.sh start sekmet oidc`"
    );
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running gateway process; killed on drop.
pub struct Gateway {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl Gateway {
    /// `body` is the YAML after the `listen:` section.
    pub async fn start(body: &str) -> Gateway {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("fgw-leak-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("gw.yaml");
        let yaml = format!(
            "pingora:\n  threads: 2\n  grace_period_seconds: 0\n  graceful_shutdown_timeout_seconds: 1\n  pid_file: {d}/gw.pid\n  upgrade_sock: {d}/upgrade.sock\nlisten:\n  - addr: 127.0.0.1:{port}\n{body}",
            d = dir.display()
        );
        std::fs::write(&conf, yaml).unwrap();
        let log = std::fs::File::create(dir.join("gw.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_fhir-gateway"))
            .arg("-c")
            .arg(&conf)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn gateway");
        let gw = Gateway { port, child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = client().get(gw.url("/healthz")).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not start:\n{}",
                gw.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        gw
    }

    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}/fhir", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gw.log")).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The standard `auth:` section for the real IdP, tenants A and B allowed.
pub fn jwt_auth_yaml(idp: &str) -> String {
    format!(
        "auth:\n  mode: jwt\n  jwks:\n    min_refetch_secs: 1\n    retry_secs: 1\n  issuers:\n    - name: hospital\n      issuer: {idp}\n      discovery_url: {idp}/.well-known/openid-configuration\n      audiences: [\"{AUDIENCE}\"]\n      allowed_tenants: [\"{TENANT_A}\", \"{TENANT_B}\"]\n"
    )
}

/// The gateway configuration under test: both data-level filters, the participant roles may
/// read. `participant_extra`: more ParticipantFilter settings, e.g. `, relations: [...]`.
pub fn filters_yaml_with(hide_existence: bool, participant_extra: &str) -> String {
    format!(
        "upstream:\n  url: {up}\nidentity_links:\n  system: {LINK_SYSTEM}\n  cache_ttl_secs: 30\npolicy:\n  read: [Reader, Administrator, Patient, Practitioner, RelatedPerson]\n  write: [Writer, Administrator]\npost:\n  - name: ParticipantFilter\n    settings: {{hide_existence: {hide_existence}, cache_ttl_secs: 30{participant_extra}}}\n  - name: ConsentOptOut\n    settings: {{category: \"http://loinc.org|59284-0\", cache_ttl_minutes: 5, hide_existence: {hide_existence}}}\n{auth}",
        up = sekmet_url(),
        auth = jwt_auth_yaml(IDP)
    )
}

/// A gateway with both filters in front of SEKMET, JWT auth against the real IdP, ready.
pub async fn filtered_gateway(hide_existence: bool) -> Gateway {
    filtered_gateway_with(hide_existence, "").await
}

pub async fn filtered_gateway_with(hide_existence: bool, participant_extra: &str) -> Gateway {
    require_peer(&format!("{IDP}/.well-known/openid-configuration")).await;
    require_peer(&format!("{}/metadata", sekmet_url())).await;
    let gw = Gateway::start(&filters_yaml_with(hide_existence, participant_extra)).await;
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

/// A client-credentials token from the real IdP (`reader-app` → `reader-secret`).
pub async fn token(client_id: &str) -> String {
    let secret = format!("{}-secret", client_id.trim_end_matches("-app"));
    let r = reqwest::Client::new()
        .post(format!("{IDP}/token"))
        .basic_auth(client_id, Some(secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("IdP token endpoint");
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 200, "token for {client_id}: {v}");
    v["access_token"].as_str().unwrap().to_string()
}

fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap()
}

/// The claims of a JWT (no verification: to read what the IdP put in its own tokens).
pub fn claims_of(token: &str) -> Value {
    serde_json::from_slice(&unb64(token.split('.').nth(1).unwrap())).unwrap()
}

fn bn(s: &str) -> openssl::bn::BigNum {
    openssl::bn::BigNum::from_slice(&unb64(s)).unwrap()
}

fn private_pem(jwk: &Value) -> Vec<u8> {
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

/// Signs `claims` with the IdP's own key and kid (read from the key file the peer persists).
pub fn sign_as_idp(claims: &Value) -> String {
    let keys = peers_dir().join("oidc/keys.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&keys).unwrap()).unwrap();
    let jwk = v["keys"][0].clone();
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

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token as the IdP would issue it for a user: `oid` in tenant A, `roles`, optional `fhirUser`.
pub fn user_token(oid: &str, roles: &[&str], fhir_user: Option<&str>) -> String {
    let now = now_secs();
    let mut c = json!({
        "iss": IDP, "aud": AUDIENCE, "exp": now + 600, "iat": now, "sub": oid,
        "client_id": "leak-suite", "azp": "leak-suite", "roles": roles,
        "upn": format!("{oid}@example.org"), "oid": oid, "tid": TENANT_A
    });
    if let Some(f) = fhir_user {
        c["fhirUser"] = json!(f);
    }
    sign_as_idp(&c)
}
