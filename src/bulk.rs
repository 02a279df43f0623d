//! Bulk Data export (FHIR Bulk Data Access IG 2.0): the status and file URLs the gateway hands
//! out, and the manifest rewrite.
//!
//! The FHIR server's status and file URLs are not `Type/…` paths, so a client may not name them
//! (`/fhir/bulk-status/<id>` is refused). The gateway hands out its own URLs instead,
//! `{public_base}/$bulk-status/<token>` and `{public_base}/$bulk-file/<token>`, where the token
//! carries the server's path and an expiry, and an HMAC-SHA256 over them and the **owner** (the
//! route, issuer, tenant and user who started the export). The owner is not in the token: it is
//! taken from the caller's verified identity when the URL is used, so another caller, a
//! tampered token or an expired one all fail the same check and get the same 404. Nothing is
//! kept in memory, so any instance that shares the key can serve the URL.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::sign::Signer;
use serde_json::Value;

/// Shortest key accepted from configuration (the HMAC-SHA256 output size).
pub const MIN_KEY_BYTES: usize = 32;
/// Longest server path a token carries (status and file paths are short; this bounds the URL).
const MAX_PATH: usize = 2048;
const VERSION: u8 = 1;
const MAC_LEN: usize = 32;
/// Domain separation: these MACs cannot be confused with any other use of the key.
const CONTEXT: &[u8] = b"fhir-gateway bulk-url v1\0";

/// What a handed-out URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The export's status URL (GET polls, DELETE cancels).
    Status,
    /// One output file (GET).
    File,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Status => b's',
            Kind::File => b'f',
        }
    }

    /// The gateway path segment (below the route prefix) of this kind of URL.
    pub fn segment(self) -> &'static str {
        match self {
            Kind::Status => "$bulk-status",
            Kind::File => "$bulk-file",
        }
    }

    /// The kind and token of a path below the route prefix, when it is a handed-out URL.
    pub fn of_path(rest: &str) -> Option<(Kind, &str)> {
        let rest = rest.strip_prefix('/')?;
        [Kind::Status, Kind::File].into_iter().find_map(|k| {
            let tail = rest.strip_prefix(k.segment())?;
            if tail.is_empty() {
                return Some((k, ""));
            }
            tail.strip_prefix('/').map(|t| (k, t))
        })
    }
}

/// The HMAC key that signs handed-out URLs. Its `Debug` never shows the key.
#[derive(Clone)]
pub struct BindingKey(PKey<Private>);

impl std::fmt::Debug for BindingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BindingKey(..)")
    }
}

impl BindingKey {
    /// A key from configuration: at least `MIN_KEY_BYTES` bytes.
    pub fn new(bytes: &[u8]) -> Result<BindingKey, String> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the key has {} bytes; at least {MIN_KEY_BYTES} are needed",
                bytes.len()
            ));
        }
        PKey::hmac(bytes)
            .map(BindingKey)
            .map_err(|e| format!("HMAC key: {e}"))
    }

    /// A fresh random key (when none is configured: URLs then work on this instance only).
    pub fn random() -> Result<BindingKey, String> {
        let mut b = [0u8; 32];
        openssl::rand::rand_bytes(&mut b).map_err(|e| format!("random key: {e}"))?;
        BindingKey::new(&b)
    }

    fn mac(&self, payload: &[u8], owner: &str) -> Option<Vec<u8>> {
        let mut s = Signer::new(MessageDigest::sha256(), &self.0).ok()?;
        // A length prefix keeps payload and owner apart: no shifting bytes between them.
        s.update(CONTEXT).ok()?;
        s.update(&(payload.len() as u64).to_be_bytes()).ok()?;
        s.update(payload).ok()?;
        s.update(owner.as_bytes()).ok()?;
        s.sign_to_vec().ok()
    }

    /// A token for the server path `path` (below the upstream base, with its query if any),
    /// valid until `expires` (Unix seconds), for `owner`. `None` for a path it will not carry.
    pub fn sign(&self, kind: Kind, owner: &str, path: &str, expires: u64) -> Option<String> {
        if path.len() > MAX_PATH || !path.starts_with('/') {
            return None;
        }
        let mut payload = Vec::with_capacity(10 + path.len() + MAC_LEN);
        payload.push(VERSION);
        payload.push(kind.byte());
        payload.extend_from_slice(&expires.to_be_bytes());
        payload.extend_from_slice(path.as_bytes());
        let mac = self.mac(&payload, owner)?;
        payload.extend_from_slice(&mac);
        Some(URL_SAFE_NO_PAD.encode(payload))
    }

    /// The server path a token carries, if it is this kind, unexpired at `now` and signed for
    /// `owner`. Any other token gives `None`, without saying why (the caller answers 404).
    pub fn verify(&self, kind: Kind, owner: &str, token: &str, now: u64) -> Option<String> {
        if token.len() > 4 * (MAX_PATH + 10 + MAC_LEN) / 3 + 4 {
            return None;
        }
        let raw = URL_SAFE_NO_PAD.decode(token).ok()?;
        if raw.len() < 10 + MAC_LEN {
            return None;
        }
        let (payload, mac) = raw.split_at(raw.len() - MAC_LEN);
        let want = self.mac(payload, owner)?;
        // Constant time: the comparison does not tell how much of a forged MAC was right.
        if !openssl::memcmp::eq(&want, mac) {
            return None;
        }
        if payload[0] != VERSION || payload[1] != kind.byte() {
            return None;
        }
        let expires = u64::from_be_bytes(payload[2..10].try_into().ok()?);
        if now > expires {
            return None;
        }
        String::from_utf8(payload[10..].to_vec()).ok()
    }
}

/// The runtime half of the `bulk` section.
#[derive(Debug)]
pub struct Bulk {
    pub key: BindingKey,
    /// The key came from configuration (else it is this process's own random key).
    pub shared_key: bool,
    pub export_roles: Vec<fhir_gateway_modules::Role>,
    pub url_lifetime_secs: u64,
}

impl Bulk {
    pub fn new(
        cfg: &crate::config::BulkConfig,
        built: &crate::config::BuiltBulk,
    ) -> Result<Bulk, String> {
        let (key, shared_key) = match &built.key {
            Some(k) => (k.clone(), true),
            None => (BindingKey::random()?, false),
        };
        Ok(Bulk {
            key,
            shared_key,
            export_roles: built.export_roles.clone(),
            url_lifetime_secs: cfg.url_lifetime_secs,
        })
    }
}

/// Rewrites a completion manifest in place: every `output[].url`, `error[].url` and
/// `deleted[].url` through `file_url` (a URL it does not know stays as it is: it is not the
/// FHIR server's), and `request` replaced by `request` (the gateway's own kick-off URL: the
/// server may spell its own address in a way the body rewriter does not know).
/// `access_token`: the files need the caller's token through the gateway.
pub fn rewrite_manifest(
    manifest: &mut Value,
    file_url: impl Fn(&str) -> Option<String>,
    request: String,
    access_token: bool,
) -> Result<(), String> {
    let Some(m) = manifest.as_object_mut() else {
        return Err("the manifest is not a JSON object".into());
    };
    for list in ["output", "error", "deleted"] {
        let Some(items) = m.get_mut(list) else {
            continue;
        };
        let Some(items) = items.as_array_mut() else {
            return Err(format!("manifest {list} is not an array"));
        };
        for item in items {
            if let Some(url) = item.get_mut("url") {
                let new = url.as_str().and_then(&file_url);
                if let Some(new) = new {
                    *url = Value::String(new);
                }
            }
        }
    }
    m.insert("request".into(), Value::String(request));
    if access_token {
        m.insert("requiresAccessToken".into(), Value::Bool(true));
    }
    Ok(())
}

/// The path and query of an absolute URL, whatever its scheme and authority (`None` if it is
/// not one).
pub fn path_of_url(url: &str) -> Option<&str> {
    let after = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))?;
    Some(match after.find(['/', '?']) {
        Some(i) => &after[i..],
        None => "",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key() -> BindingKey {
        BindingKey::new(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    const ALICE: &str = "/fhir\nhospital\ntenant-a\nalice";

    #[test]
    fn a_token_verifies_for_its_owner_kind_and_time() {
        let k = key();
        let t = k
            .sign(Kind::Status, ALICE, "/bulk-status/42", 1000)
            .unwrap();
        assert!(t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(
            k.verify(Kind::Status, ALICE, &t, 999).as_deref(),
            Some("/bulk-status/42")
        );
        assert_eq!(
            k.verify(Kind::Status, ALICE, &t, 1000).as_deref(),
            Some("/bulk-status/42")
        );
        // Expired, another kind, another owner, another key: all refused alike.
        assert_eq!(k.verify(Kind::Status, ALICE, &t, 1001), None);
        assert_eq!(k.verify(Kind::File, ALICE, &t, 999), None);
        let bob = "/fhir\nhospital\ntenant-a\nbob";
        assert_eq!(k.verify(Kind::Status, bob, &t, 999), None);
        let other_tenant = "/fhir\nhospital\ntenant-b\nalice";
        assert_eq!(k.verify(Kind::Status, other_tenant, &t, 999), None);
        let other = BindingKey::new(b"another key of 32 bytes or more!!").unwrap();
        assert_eq!(other.verify(Kind::Status, ALICE, &t, 999), None);
    }

    #[test]
    fn a_tampered_token_is_refused() {
        let k = key();
        let t = k
            .sign(Kind::File, ALICE, "/bulk-files/42/Patient.ndjson", 1000)
            .unwrap();
        let mut raw = URL_SAFE_NO_PAD.decode(&t).unwrap();
        for i in 0..raw.len() {
            raw[i] ^= 1;
            let bad = URL_SAFE_NO_PAD.encode(&raw);
            assert_eq!(k.verify(Kind::File, ALICE, &bad, 0), None, "byte {i}");
            raw[i] ^= 1;
        }
        // Another path with the old MAC, a later expiry, truncation, garbage.
        let mut moved = raw.clone();
        moved[10 + "/bulk-files/4".len()] = b'3';
        assert_eq!(
            k.verify(Kind::File, ALICE, &URL_SAFE_NO_PAD.encode(&moved), 0),
            None
        );
        assert_eq!(k.verify(Kind::File, ALICE, &t[..t.len() - 2], 0), None);
        assert_eq!(k.verify(Kind::File, ALICE, "", 0), None);
        assert_eq!(k.verify(Kind::File, ALICE, "not base64!", 0), None);
        assert_eq!(k.verify(Kind::File, ALICE, &"A".repeat(10_000), 0), None);
    }

    #[test]
    fn keys_are_checked_and_never_shown() {
        assert!(BindingKey::new(b"short").is_err());
        assert!(BindingKey::new(&[7u8; 31]).is_err());
        let k = BindingKey::new(&[7u8; 32]).unwrap();
        assert_eq!(format!("{k:?}"), "BindingKey(..)");
        let (a, b) = (BindingKey::random().unwrap(), BindingKey::random().unwrap());
        let t = a.sign(Kind::Status, ALICE, "/s", 10).unwrap();
        assert!(a.verify(Kind::Status, ALICE, &t, 0).is_some());
        assert!(b.verify(Kind::Status, ALICE, &t, 0).is_none());
        // Paths a token will not carry.
        assert!(a.sign(Kind::Status, ALICE, "relative", 10).is_none());
        assert!(a
            .sign(
                Kind::Status,
                ALICE,
                &format!("/{}", "x".repeat(MAX_PATH)),
                10
            )
            .is_none());
    }

    #[test]
    fn paths_of_handed_out_urls() {
        assert_eq!(
            Kind::of_path("/$bulk-status/abc"),
            Some((Kind::Status, "abc"))
        );
        assert_eq!(Kind::of_path("/$bulk-file/abc"), Some((Kind::File, "abc")));
        assert_eq!(Kind::of_path("/$bulk-status"), Some((Kind::Status, "")));
        assert_eq!(Kind::of_path("/$bulk-statusx/abc"), None);
        assert_eq!(Kind::of_path("/bulk-status/abc"), None);
        assert_eq!(Kind::of_path("/Patient/$export"), None);
        assert_eq!(path_of_url("http://h:1/fhir/x?y=1"), Some("/fhir/x?y=1"));
        assert_eq!(path_of_url("https://h"), Some(""));
        assert_eq!(path_of_url("/fhir/x"), None);
    }

    #[test]
    fn manifest_urls_and_request_are_replaced() {
        let mut m = json!({
            "transactionTime": "2026-01-01T00:00:00Z",
            "request": "http://localhost:8090/fhir/Patient/$export",
            "requiresAccessToken": false,
            "output": [{"type": "Patient", "url": "http://up/fhir/bulk-files/1/Patient.ndjson", "count": 2}],
            "error": [{"type": "OperationOutcome", "url": "http://up/fhir/bulk-files/1/err.ndjson"}],
            "deleted": [{"type": "Bundle", "url": "https://elsewhere/blob"}]
        });
        let map = |u: &str| {
            u.strip_prefix("http://up/fhir")
                .map(|p| format!("https://gw/fhir/$bulk-file/{}", p.len()))
        };
        rewrite_manifest(&mut m, map, "https://gw/fhir/Patient/$export".into(), true).unwrap();
        assert_eq!(m["request"], "https://gw/fhir/Patient/$export");
        assert_eq!(m["requiresAccessToken"], true);
        assert_eq!(m["output"][0]["url"], "https://gw/fhir/$bulk-file/28");
        assert_eq!(m["output"][0]["count"], 2);
        assert_eq!(m["error"][0]["url"], "https://gw/fhir/$bulk-file/24");
        assert_eq!(m["deleted"][0]["url"], "https://elsewhere/blob");
        assert!(rewrite_manifest(&mut json!([]), map, String::new(), false).is_err());
        assert!(rewrite_manifest(&mut json!({"output": {}}), map, String::new(), false).is_err());
    }
}
