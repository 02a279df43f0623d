//! Signing keys of one issuer: discovery, JWKS fetch, cache, rate-limited refetch.

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use log::{info, warn};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How soon an unknown `kid` may try again after a failed fetch.
const FAILED_REFETCH: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyFamily {
    Rsa,
    Ec,
    Other,
}

pub struct Key {
    pub key: DecodingKey,
    /// `alg` the JWK pins, if it does.
    pub alg: Option<Algorithm>,
    pub family: KeyFamily,
}

pub fn family_of(alg: Algorithm) -> KeyFamily {
    use Algorithm::*;
    match alg {
        RS256 | RS384 | RS512 | PS256 | PS384 | PS512 => KeyFamily::Rsa,
        ES256 | ES384 => KeyFamily::Ec,
        _ => KeyFamily::Other,
    }
}

pub struct KeyStore {
    discovery_url: Option<String>,
    configured_jwks_url: Option<String>,
    jwks_url: RwLock<Option<String>>,
    /// The discovery document, for the SMART endpoints.
    pub discovery: RwLock<Option<Value>>,
    keys: RwLock<Arc<HashMap<String, Arc<Key>>>>,
    /// Bumped whenever the set of key ids changes, so validations made with a key that is
    /// gone are not reused from the token cache.
    generation: AtomicU64,
    loaded: AtomicBool,
    /// When the last fetch ended, and whether it succeeded.
    last_fetch: Mutex<Option<(Instant, bool)>>,
    /// The same, for fetches an unknown `kid` triggered: only these are rate-limited, so a
    /// periodic refresh just before a rotation does not hold off the new key.
    last_kid_fetch: Mutex<Option<(Instant, bool)>>,
    fetch_lock: tokio::sync::Mutex<()>,
    min_refetch: Duration,
}

impl KeyStore {
    pub fn new(
        discovery_url: Option<String>,
        jwks_url: Option<String>,
        min_refetch: Duration,
    ) -> KeyStore {
        KeyStore {
            discovery_url,
            jwks_url: RwLock::new(jwks_url.clone()),
            configured_jwks_url: jwks_url,
            discovery: RwLock::new(None),
            keys: RwLock::new(Arc::new(HashMap::new())),
            generation: AtomicU64::new(0),
            loaded: AtomicBool::new(false),
            last_fetch: Mutex::new(None),
            last_kid_fetch: Mutex::new(None),
            fetch_lock: tokio::sync::Mutex::new(()),
            min_refetch,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Relaxed)
    }

    pub fn uses_keys(&self) -> bool {
        self.discovery_url.is_some() || self.configured_jwks_url.is_some()
    }

    pub fn get(&self, kid: Option<&str>, family: KeyFamily) -> Option<Arc<Key>> {
        let keys = self.keys.read().expect("keys lock").clone();
        match kid {
            Some(k) => keys.get(k).cloned(),
            // No kid: acceptable only when exactly one key of the right family exists.
            None => {
                let mut it = keys.values().filter(|k| k.family == family);
                match (it.next(), it.next()) {
                    (Some(k), None) => Some(k.clone()),
                    _ => None,
                }
            }
        }
    }

    /// Refetch for an unknown `kid`, at most once per `min_refetch` (once a second after a
    /// failed one). Returns whether the key set may have changed (a fetch succeeded, by this
    /// call or one it waited for), so the caller should look the key up again.
    pub async fn refetch_for_unknown_kid(&self, http: &reqwest::Client) -> bool {
        let arrived = Instant::now();
        // The lock first: a request arriving while another one's fetch (of a rotated key) is
        // in flight waits for it instead of failing on the old key set.
        let _g = self.fetch_lock.lock().await;
        if let Some((t, true)) = *self.last_fetch.lock().expect("fetch time lock") {
            if t > arrived {
                return true; // fetched while we waited: look again
            }
        }
        if let Some((t, ok)) = *self.last_kid_fetch.lock().expect("fetch time lock") {
            // A failed fetch (the IdP restarting, say) holds off retries only briefly, or a
            // key rotated during the blip would be refused for the whole interval.
            let hold = if ok {
                self.min_refetch
            } else {
                self.min_refetch.min(FAILED_REFETCH)
            };
            if t.elapsed() < hold {
                return false;
            }
        }
        let ok = self.fetch(http).await.is_ok();
        *self.last_kid_fetch.lock().expect("fetch time lock") = Some((Instant::now(), ok));
        ok
    }

    /// Discovery (when configured) and JWKS; replaces the key set on success. Old keys are
    /// dropped: a key removed at the IdP stops being accepted.
    pub async fn fetch(&self, http: &reqwest::Client) -> Result<usize, String> {
        let r = self.fetch_once(http).await;
        *self.last_fetch.lock().expect("fetch time lock") = Some((Instant::now(), r.is_ok()));
        r
    }

    async fn fetch_once(&self, http: &reqwest::Client) -> Result<usize, String> {
        if let Some(d) = &self.discovery_url {
            match get_json(http, d).await {
                Ok(doc) => {
                    if self.configured_jwks_url.is_none() {
                        let uri = doc
                            .get("jwks_uri")
                            .and_then(Value::as_str)
                            .ok_or_else(|| format!("{d}: no jwks_uri"))?;
                        *self.jwks_url.write().expect("url lock") = Some(uri.to_string());
                    }
                    *self.discovery.write().expect("discovery lock") = Some(doc);
                }
                Err(e) if self.configured_jwks_url.is_none() => return Err(e),
                Err(e) => warn!("discovery {d}: {e}"),
            }
        }
        let Some(url) = self.jwks_url.read().expect("url lock").clone() else {
            return Err("no JWKS URL".into());
        };
        let doc = get_json(http, &url).await?;
        self.load(doc).map_err(|e| format!("{url}: {e}"))
    }

    /// Replaces the key set with the keys of a JWKS document.
    pub fn load(&self, doc: Value) -> Result<usize, String> {
        let set: JwkSet = serde_json::from_value(doc).map_err(|e| format!("not a JWK set: {e}"))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
                AlgorithmParameters::EllipticCurve(_) => KeyFamily::Ec,
                // Symmetric or exotic keys published in a JWKS are never trusted.
                _ => continue,
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            let kid = jwk.common.key_id.clone().unwrap_or_default();
            keys.insert(kid, Arc::new(Key { key, alg, family }));
        }
        if keys.is_empty() {
            return Err("no usable signing key".into());
        }
        let n = keys.len();
        {
            let mut cur = self.keys.write().expect("keys lock");
            let same = cur.len() == keys.len() && keys.keys().all(|k| cur.contains_key(k));
            if !same {
                self.generation.fetch_add(1, Ordering::Relaxed);
            }
            *cur = Arc::new(keys);
        }
        if !self.loaded.swap(true, Ordering::Relaxed) {
            info!("signing keys loaded ({n} key(s))");
        }
        Ok(n)
    }
}

async fn get_json(http: &reqwest::Client, url: &str) -> Result<Value, String> {
    let r = http
        .get(url)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("{url}: HTTP {}", r.status()));
    }
    r.json().await.map_err(|e| format!("{url}: {e}"))
}
