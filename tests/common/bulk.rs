//! Bulk Data export through the gateway: kick-off, polling the status URL it hands out, the
//! binding key file, tokens of other callers, and what a handed-out URL carries.

use super::idp::*;
use super::*;

/// A fresh binding key file (32 random bytes as hex, mode 600) and the `bulk:` section naming it.
/// The key files live as long as the gateways reading them, which the test process does not
/// outlive by much: each process clears what processes that have ended left behind.
pub fn bulk_yaml(extra: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_ended_key_dirs);
    let dir = std::env::temp_dir().join(format!("fgw-bulk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("key-{}", uuid::Uuid::new_v4().simple()));
    std::fs::write(&path, uuid::Uuid::new_v4().simple().to_string()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!("bulk:\n  binding_key_file: {}\n{extra}", path.display())
}

fn sweep_ended_key_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("fgw-bulk-") else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !std::path::Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Claims of an Administrator other than `admin-app` (same issuer, `tid`, own `oid`), signed
/// with the IdP's key; `scp` when given.
pub fn admin_claims(oid: &str, tid: &str, scp: Option<&str>) -> Value {
    let mut c = reader_claims();
    c["roles"] = serde_json::json!(["Administrator"]);
    c["oid"] = oid.into();
    c["sub"] = oid.into();
    c["tid"] = tid.into();
    if let Some(s) = scp {
        c["scp"] = s.into();
    }
    c
}

/// `GET <url>` with `Prefer: respond-async` and `Accept: application/fhir+json`, as `token`,
/// with correlation id `id`.
pub async fn kick_off(url: &str, token: &str, id: &str) -> reqwest::Response {
    client()
        .get(url)
        .bearer_auth(token)
        .header("Prefer", "respond-async")
        .header("Accept", "application/fhir+json")
        .header("X-Request-Id", id)
        .send()
        .await
        .unwrap()
}

/// A completed export as the client saw it.
pub struct Polled {
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
    pub manifest: Value,
    /// The headers of a 202 seen while the export ran, if any poll came that early.
    pub running: Option<reqwest::header::HeaderMap>,
}

/// Polls a status URL (as `token`) until it answers 200, within 60 s.
pub async fn poll_until_done(status_url: &str, token: &str) -> Polled {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut running = None;
    loop {
        let r = client()
            .get(status_url)
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            200 => {
                let headers = r.headers().clone();
                let body = r.bytes().await.unwrap().to_vec();
                let manifest = serde_json::from_slice(&body).expect("manifest JSON");
                return Polled {
                    headers,
                    body,
                    manifest,
                    running,
                };
            }
            202 => {
                running.get_or_insert_with(|| r.headers().clone());
            }
            s => panic!("status URL answered {s}: {}", r.text().await.unwrap()),
        }
        assert!(Instant::now() < deadline, "export did not complete in 60 s");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The server path a handed-out URL's token carries (it is signed, not secret): version,
/// kind and expiry first, the MAC last.
pub fn carried_path(handed_out: &str) -> String {
    let token = handed_out.rsplit('/').next().unwrap();
    let raw = unb64(token);
    String::from_utf8(raw[10..raw.len() - 32].to_vec()).unwrap()
}

/// The same URL with one character of its token changed.
pub fn tampered(handed_out: &str) -> String {
    let (head, token) = handed_out.rsplit_once('/').unwrap();
    let mut t: Vec<char> = token.chars().collect();
    let i = t.len() / 2;
    t[i] = if t[i] == 'A' { 'B' } else { 'A' };
    format!("{head}/{}", t.into_iter().collect::<String>())
}
