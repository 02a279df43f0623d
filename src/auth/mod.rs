//! Caller authentication: bearer JWTs from trusted issuers, validated by the gateway itself.
//!
//! Fails closed: a missing or malformed header, an untrusted issuer, an algorithm outside the
//! issuer's list, an unknown key, a bad signature, `exp`/`nbf`/`aud`/tenant mismatches, a
//! missing user id — all deny. An issuer whose keys never loaded denies with 503.

pub mod jwks;
pub mod policy;
#[cfg(test)]
mod tests;

use crate::config::{AuthConfig, AuthMode, ClaimNames, IssuerConfig, JwksConfig, RoleValues};
use fhir_gateway_modules::{Identity, Role};
use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use jwks::{family_of, KeyFamily, KeyStore};
use log::warn;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest bearer token accepted.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No credentials: 401 without an error code.
    Missing,
    /// 401 `invalid_token`.
    Invalid(String),
    /// 503: keys unavailable, cannot decide (and so deny).
    Unavailable(String),
}

pub struct Issuer {
    pub name: String,
    iss: Vec<String>,
    audiences: Vec<String>,
    tenants: Vec<String>,
    algorithms: Vec<Algorithm>,
    secret: Option<DecodingKey>,
    claims: ClaimNames,
    roles: RoleValues,
    pub keys: KeyStore,
}

/// The bytes of a compact JWT (base64url and the dots), as a table: the check runs over every
/// byte of every request's token.
static JWT_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.';
        b += 1;
    }
    t
};

/// A token already verified: who it names, until when, under which key-set generation.
#[derive(Clone)]
struct Verified {
    /// Shared, not cloned, on every hit.
    identity: Arc<Identity>,
    exp: u64,
    issuer: usize,
    generation: u64,
}

pub struct Authenticator {
    pub mode: AuthMode,
    /// Verified tokens by their exact text. A hit re-checks `exp` and the key generation, so
    /// a token never outlives itself or the key that signed it. RS256 verification costs
    /// tens of µs; clients reuse a token for many calls.
    verified: moka::sync::Cache<String, Verified>,
    pub issuers: Vec<Issuer>,
    skew: u64,
    offload: Option<(http::HeaderName, Vec<u8>)>,
    pub jwks: JwksConfig,
    pub http: reqwest::Client,
}

const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
];

const HMAC: &[Algorithm] = &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

impl Issuer {
    fn new(cfg: &IssuerConfig, jwks: &JwksConfig) -> Result<Issuer, String> {
        let algorithms = match &cfg.algorithms {
            Some(list) => list
                .iter()
                .map(|a| a.parse::<Algorithm>().map_err(|_| format!("algorithm {a}")))
                .collect::<Result<Vec<_>, _>>()?,
            None => ASYMMETRIC.to_vec(),
        };
        let has_keys = cfg.discovery_url.is_some() || cfg.jwks_url.is_some();
        let mut algorithms: Vec<Algorithm> = algorithms
            .into_iter()
            .filter(|a| {
                (ASYMMETRIC.contains(a) && (has_keys || cfg.algorithms.is_some()))
                    || (cfg.shared_secret.is_some() && HMAC.contains(a))
            })
            .collect();
        if cfg.shared_secret.is_some() && cfg.algorithms.is_none() {
            algorithms.push(Algorithm::HS256);
        }
        Ok(Issuer {
            name: cfg.name.clone(),
            iss: cfg.issuer.to_vec(),
            audiences: cfg.audiences.clone(),
            tenants: cfg.allowed_tenants.clone(),
            algorithms,
            secret: cfg
                .shared_secret
                .as_ref()
                .map(|s| DecodingKey::from_secret(s.as_bytes())),
            claims: cfg.claims.clone(),
            roles: cfg.roles.clone(),
            keys: KeyStore::new(
                cfg.discovery_url.clone(),
                cfg.jwks_url.clone(),
                Duration::from_secs(jwks.min_refetch_secs),
            ),
        })
    }

    fn identity(&self, claims: &Value) -> Result<Identity, AuthError> {
        let c = &self.claims;
        let first = |names: &[String]| -> Option<String> {
            names.iter().find_map(|n| {
                claims
                    .get(n)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            })
        };
        let user_id = first(&c.user_id).ok_or_else(|| {
            AuthError::Invalid(format!(
                "token has none of the user id claims {:?}",
                c.user_id
            ))
        })?;
        let tenant = claims
            .get(&c.tenant)
            .and_then(Value::as_str)
            .map(str::to_string);
        if !self.tenants.is_empty() && !tenant.as_ref().is_some_and(|t| self.tenants.contains(t)) {
            return Err(AuthError::Invalid(format!(
                "tenant {} is not allowed for issuer {}",
                tenant.as_deref().unwrap_or("(none)"),
                self.name
            )));
        }
        let role_values: Vec<String> = match claims.get(&c.roles) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            Some(Value::String(s)) => s.split_whitespace().map(str::to_string).collect(),
            _ => Vec::new(),
        };
        let r = &self.roles;
        let roles = Role::ALL
            .into_iter()
            .filter(|role| {
                let values = match role {
                    Role::Administrator => &r.administrator,
                    Role::Reader => &r.reader,
                    Role::Writer => &r.writer,
                    Role::Patient => &r.patient,
                    Role::Practitioner => &r.practitioner,
                    Role::RelatedPerson => &r.related_person,
                    Role::DataScientist => &r.data_scientist,
                };
                values.iter().any(|v| role_values.contains(v))
            })
            .collect();
        let scopes = c
            .scopes
            .iter()
            .find_map(|n| match claims.get(n) {
                Some(Value::String(s)) => Some(s.split_whitespace().map(str::to_string).collect()),
                Some(Value::Array(a)) => Some(
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Identity {
            issuer: self.name.clone(),
            user_id,
            tenant,
            upn: first(&c.upn),
            roles,
            scopes,
            fhir_user: first(std::slice::from_ref(&c.fhir_user)),
            patient: first(std::slice::from_ref(&c.patient)),
            client_id: first(&c.client_id),
        })
    }
}

impl Authenticator {
    pub fn new(cfg: &AuthConfig, http: reqwest::Client) -> Result<Authenticator, String> {
        Ok(Authenticator {
            mode: cfg.mode,
            issuers: cfg
                .issuers
                .iter()
                .map(|i| Issuer::new(i, &cfg.jwks))
                .collect::<Result<_, _>>()?,
            skew: cfg.clock_skew_secs,
            offload: cfg.offload.as_ref().map(|o| {
                (
                    http::HeaderName::from_bytes(o.header.as_bytes()).expect("validated"),
                    o.secret.as_bytes().to_vec(),
                )
            }),
            jwks: cfg.jwks,
            http,
            verified: moka::sync::Cache::builder()
                .max_capacity(20_000)
                .time_to_live(Duration::from_secs(600))
                .build(),
        })
    }

    /// Every issuer that verifies with published keys has loaded them at least once.
    pub fn is_ready(&self) -> bool {
        self.mode != AuthMode::Jwt
            || self
                .issuers
                .iter()
                .all(|i| !i.keys.uses_keys() || i.keys.is_loaded())
    }

    /// One refresh round for the background task: issuers never loaded are retried, others
    /// refreshed when `due`.
    pub async fn refresh(&self, due: bool) {
        for i in &self.issuers {
            if i.keys.uses_keys() && (due || !i.keys.is_loaded()) {
                if let Err(e) = i.keys.fetch(&self.http).await {
                    warn!("issuer {}: signing keys not refreshed: {e}", i.name);
                }
            }
        }
    }

    /// Validates the caller's bearer token and returns who they are.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&[u8]>,
    ) -> Result<Arc<Identity>, AuthError> {
        if let Some(q) = query {
            let has_token = q.split(|&b| b == b'&').any(|p| {
                let k = p.split(|&b| b == b'=').next().unwrap_or(&[]);
                // Compared as the FHIR server will read it: `access%5Ftoken` is the same key.
                percent_decoded(k).eq_ignore_ascii_case(b"access_token")
            });
            if has_token {
                return Err(AuthError::Invalid(
                    "tokens in the query string are not accepted".into(),
                ));
            }
        }
        let mut values = headers.get_all(http::header::AUTHORIZATION).iter();
        let value = match (values.next(), values.next()) {
            (None, _) => return Err(AuthError::Missing),
            (Some(v), None) => v.as_bytes(),
            (Some(_), Some(_)) => {
                return Err(AuthError::Invalid(
                    "more than one Authorization header".into(),
                ))
            }
        };
        // RFC 7235 §2.1 / RFC 6750: the scheme is case-insensitive (`bearer`, `BEARER`); one
        // space, then the token. Any other scheme is refused.
        let token = value
            .get(..7)
            .filter(|s| s.eq_ignore_ascii_case(b"Bearer "))
            .map(|_| &value[7..])
            .ok_or_else(|| AuthError::Invalid("Authorization must be 'Bearer <token>'".into()))?;
        if token.is_empty() {
            return Err(AuthError::Invalid("empty bearer token".into()));
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid("bearer token too long".into()));
        }
        if !token.iter().all(|&b| JWT_BYTE[b as usize]) {
            return Err(AuthError::Invalid(
                "bearer token is not a compact JWT".into(),
            ));
        }
        let token = std::str::from_utf8(token).expect("checked ASCII");
        if let Some((name, secret)) = &self.offload {
            let proof = headers.get(name).map(|v| v.as_bytes()).unwrap_or_default();
            if !constant_time_eq(proof, secret) {
                return Err(AuthError::Invalid(
                    "request did not come through the trusted front gateway".into(),
                ));
            }
            return self.offloaded(token).map(Arc::new);
        }
        let now = unix_now();
        if let Some(v) = self.verified.get(token) {
            let current = self.issuers[v.issuer].keys.generation() == v.generation;
            if current && v.exp + self.skew >= now {
                return Ok(v.identity);
            }
            self.verified.invalidate(token);
        }
        let (identity, exp, issuer, generation) = self.verify(token).await?;
        let identity = Arc::new(identity);
        self.verified.insert(
            token.to_string(),
            Verified {
                identity: identity.clone(),
                exp,
                issuer,
                generation,
            },
        );
        Ok(identity)
    }

    fn issuer_of(&self, token: &str) -> Result<(usize, &Issuer, String), AuthError> {
        let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| AuthError::Invalid("malformed token".into()))?;
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| AuthError::Invalid("token has no iss".into()))?;
        let (idx, issuer) = self
            .issuers
            .iter()
            .enumerate()
            .find(|(_, i)| i.iss.iter().any(|x| x == iss))
            .ok_or_else(|| AuthError::Invalid(format!("untrusted issuer {iss:?}")))?;
        Ok((idx, issuer, iss.to_string()))
    }

    /// The identity these claims would give, for `/manage/explain`: mapped (roles, scopes,
    /// `fhirUser`, tenant) by the issuer their `iss` names, else the first issuer. Nothing is
    /// verified: an Administrator names whom to explain for, no token is involved.
    pub fn identity_from_claims(&self, claims: &Value) -> Result<Identity, AuthError> {
        let iss = claims.get("iss").and_then(Value::as_str);
        let issuer = match iss {
            Some(iss) => self
                .issuers
                .iter()
                .find(|i| i.iss.iter().any(|x| x == iss))
                .ok_or_else(|| AuthError::Invalid(format!("untrusted issuer {iss:?}")))?,
            None => self
                .issuers
                .first()
                .ok_or_else(|| AuthError::Invalid("no issuer configured".into()))?,
        };
        issuer.identity(claims)
    }

    /// Verification without the token cache (what a first call costs).
    pub async fn verify_uncached(&self, token: &str) -> Result<Identity, AuthError> {
        self.verify(token).await.map(|v| v.0)
    }

    /// Full verification: (identity, exp, issuer index, key generation used).
    async fn verify(&self, token: &str) -> Result<(Identity, u64, usize, u64), AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token header".into()))?;
        if header.crit.is_some() {
            // RFC 7515 §4.1.11: extensions we do not implement must make the token invalid.
            return Err(AuthError::Invalid(
                "critical header extensions are not supported".into(),
            ));
        }
        let (idx, issuer, iss) = self.issuer_of(token)?;
        let generation = issuer.keys.generation();
        let alg = header.alg;
        if !issuer.algorithms.contains(&alg) {
            return Err(AuthError::Invalid(format!(
                "algorithm {alg:?} not accepted for issuer {}",
                issuer.name
            )));
        }
        let key: DecodingKey =
            if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
                issuer
                    .secret
                    .clone()
                    .ok_or_else(|| AuthError::Invalid("symmetric algorithm not accepted".into()))?
            } else {
                if !issuer.keys.is_loaded() {
                    // Try once now (start-up race, or the IdP was down); still nothing → 503.
                    issuer.keys.refetch_for_unknown_kid(&self.http).await;
                    if !issuer.keys.is_loaded() {
                        return Err(AuthError::Unavailable(format!(
                            "signing keys of issuer {} are unavailable",
                            issuer.name
                        )));
                    }
                }
                let family = family_of(alg);
                let kid = header.kid.as_deref();
                let k = match issuer.keys.get(kid, family) {
                    Some(k) => k,
                    None => {
                        // Keys may have rotated at the IdP: refetch (rate-limited) and retry.
                        issuer.keys.refetch_for_unknown_kid(&self.http).await;
                        issuer.keys.get(kid, family).ok_or_else(|| {
                            AuthError::Invalid(format!(
                                "unknown signing key {:?}",
                                kid.unwrap_or("")
                            ))
                        })?
                    }
                };
                if k.family != family
                    || k.family == KeyFamily::Other
                    || k.alg.is_some_and(|a| a != alg)
                {
                    return Err(AuthError::Invalid(
                        "key does not match the token algorithm".into(),
                    ));
                }
                k.key.clone()
            };
        let mut v = Validation::new(alg);
        v.leeway = self.skew;
        v.validate_nbf = true;
        v.set_issuer(&[iss]);
        v.set_audience(&issuer.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<Value>(token, &key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind::*;
            AuthError::Invalid(
                match e.kind() {
                    ExpiredSignature => "token expired",
                    ImmatureSignature => "token not yet valid",
                    InvalidAudience => "token audience not accepted",
                    InvalidIssuer => "token issuer not accepted",
                    InvalidSignature => "token signature invalid",
                    MissingRequiredClaim(_) => "token lacks exp, iss or aud",
                    _ => "token invalid",
                }
                .into(),
            )
        })?;
        self.check_iat(&data.claims, unix_now())?;
        let exp = data.claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        Ok((issuer.identity(&data.claims)?, exp, idx, generation))
    }

    /// `iat` is optional (RFC 7519 §4.1.6), but a token issued later than now (beyond the clock
    /// skew) was minted by a clock or a signer we should not trust; a present `iat` that is
    /// not a NumericDate is malformed. `jsonwebtoken` checks neither.
    fn check_iat(&self, claims: &Value, now: u64) -> Result<(), AuthError> {
        match claims.get("iat") {
            None => Ok(()),
            Some(v) => match v.as_f64() {
                Some(iat) if iat > (now + self.skew) as f64 => Err(AuthError::Invalid(
                    "token issued in the future (iat beyond the allowed clock skew)".into(),
                )),
                Some(_) => Ok(()),
                None => Err(AuthError::Invalid("token iat is not a NumericDate".into())),
            },
        }
    }

    /// Auth offload: the front gateway verified the signature; we still check what we can.
    fn offloaded(&self, token: &str) -> Result<Identity, AuthError> {
        let (_, issuer, _) = self.issuer_of(token)?;
        let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|_| AuthError::Invalid("malformed token".into()))?;
        let now = unix_now();
        let exp = claims.get("exp").and_then(Value::as_u64);
        if exp.is_none_or(|e| e + self.skew < now) {
            return Err(AuthError::Invalid("token expired".into()));
        }
        if claims
            .get("nbf")
            .and_then(Value::as_u64)
            .is_some_and(|n| n > now + self.skew)
        {
            return Err(AuthError::Invalid("token not yet valid".into()));
        }
        self.check_iat(&claims, now)?;
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => issuer.audiences.iter().any(|x| x == a),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_str)
                .any(|x| issuer.audiences.iter().any(|y| y == x)),
            _ => false,
        };
        if !aud_ok {
            return Err(AuthError::Invalid("token audience not accepted".into()));
        }
        issuer.identity(&claims)
    }

    /// The issuer whose endpoints SMART documents advertise.
    pub fn smart_issuer(&self, name: Option<&str>) -> Option<&Issuer> {
        match name {
            Some(n) => self.issuers.iter().find(|i| i.name == n),
            None => self.issuers.first(),
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `%XX` escapes decoded, repeatedly (a double-encoded key is still the key to someone).
fn percent_decoded(k: &[u8]) -> Vec<u8> {
    let mut cur = k.to_vec();
    for _ in 0..3 {
        let mut out = Vec::with_capacity(cur.len());
        let mut i = 0;
        while i < cur.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            match (
                cur[i],
                cur.get(i + 1).and_then(|&b| hex(b)),
                cur.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (b'%', Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                }
                (b, _, _) => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        if out == cur {
            break;
        }
        cur = out;
    }
    cur
}
