//! Break-the-glass sessions: a caller in a configured role who gives a reason (the configured
//! header) reads past the configured data filters for a while. Every such request is audited
//! with the reason; a session's start is logged, counted and published as an event for the
//! privacy officer; `/manage/glass` lists the sessions in force on this instance.

use crate::config::{BuiltGlass, GlassConfig};
use fhir_gateway_modules::{Identity, Role};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Glass {
    pub roles: Vec<Role>,
    pub header: http::HeaderName,
    pub bypass: Vec<String>,
    ttl: Duration,
    sessions: Mutex<HashMap<String, Session>>,
}

#[derive(Clone, Debug)]
struct Session {
    user: String,
    tenant: Option<String>,
    reason: String,
    started: jiff::Timestamp,
    until: Instant,
    requests: u64,
}

/// What a request asked of the glass.
#[derive(Debug, PartialEq)]
pub enum Asked {
    /// Not in a session: the filters apply.
    No,
    /// Served past the filters under this reason; `true` when this request opened the session.
    Yes(String, bool),
    /// Refused: the reason why.
    Refused(String),
}

fn key(id: &Identity) -> String {
    format!(
        "{}|{}|{}",
        id.issuer,
        id.tenant.as_deref().unwrap_or(""),
        id.user_id
    )
}

impl Glass {
    pub fn new(cfg: &GlassConfig, built: &BuiltGlass) -> Glass {
        Glass {
            roles: built.roles.clone(),
            header: http::HeaderName::from_bytes(cfg.header.as_bytes())
                .unwrap_or(http::HeaderName::from_static("x-break-the-glass")),
            bypass: cfg.bypass.clone(),
            ttl: Duration::from_secs(cfg.minutes * 60),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// `reason`: the header's value, if the request carried it.
    pub fn ask(&self, id: &Identity, reason: Option<&str>) -> Asked {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        sessions.retain(|_, s| s.until > now);
        let k = key(id);
        let Some(reason) = reason else {
            return match sessions.get_mut(&k) {
                Some(s) => {
                    s.requests += 1;
                    Asked::Yes(s.reason.clone(), false)
                }
                None => Asked::No,
            };
        };
        let reason = reason.trim();
        if reason.is_empty() {
            return Asked::Refused(
                "break-the-glass needs a reason: the header's value says why".into(),
            );
        }
        if !self.roles.iter().any(|r| id.has(*r)) {
            return Asked::Refused(format!(
                "break-the-glass is for {}",
                self.roles
                    .iter()
                    .map(|r| r.name())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ));
        }
        let reason: String = reason.chars().take(500).collect();
        let opened = sessions.get(&k).is_none_or(|s| s.reason != reason);
        let s = sessions.entry(k).or_insert_with(|| Session {
            user: id.user_id.clone(),
            tenant: id.tenant.clone(),
            reason: reason.clone(),
            started: jiff::Timestamp::now(),
            until: now,
            requests: 0,
        });
        if opened {
            s.reason = reason.clone();
            s.started = jiff::Timestamp::now();
        }
        s.until = now + self.ttl;
        s.requests += 1;
        Asked::Yes(reason, opened)
    }

    /// The sessions in force, for `/manage/glass`.
    pub fn list(&self) -> Value {
        let now = Instant::now();
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let list: Vec<Value> = sessions
            .values()
            .filter(|s| s.until > now)
            .map(|s| {
                json!({"user": s.user, "tenant": s.tenant, "reason": s.reason,
                       "started": format!("{:.0}", s.started),
                       "expires_in_secs": s.until.saturating_duration_since(now).as_secs(),
                       "requests": s.requests})
            })
            .collect();
        json!({"sessions": list})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glass() -> Glass {
        let cfg: GlassConfig = serde_yaml::from_str("roles: [Practitioner]\nminutes: 1\n").unwrap();
        Glass::new(
            &cfg,
            &BuiltGlass {
                roles: vec![Role::Practitioner],
            },
        )
    }

    fn who(role: Role) -> Identity {
        Identity {
            issuer: "i".into(),
            user_id: "u".into(),
            roles: vec![role],
            ..Default::default()
        }
    }

    #[test]
    fn a_reason_opens_a_session_that_later_requests_ride_on() {
        let g = glass();
        let dr = who(Role::Practitioner);
        assert_eq!(g.ask(&dr, None), Asked::No);
        assert!(
            matches!(g.ask(&dr, Some("  ")), Asked::Refused(r) if r.contains("needs a reason"))
        );
        assert_eq!(g.ask(&dr, None), Asked::No, "a refusal opens nothing");
        assert_eq!(
            g.ask(&dr, Some(" unconscious patient ")),
            Asked::Yes("unconscious patient".into(), true)
        );
        assert_eq!(
            g.ask(&dr, None),
            Asked::Yes("unconscious patient".into(), false)
        );
        assert_eq!(
            g.ask(&dr, Some("unconscious patient")),
            Asked::Yes("unconscious patient".into(), false)
        );
        let list = g.list();
        assert_eq!(list["sessions"][0]["requests"], 3);
        assert!(
            matches!(g.ask(&who(Role::Reader), Some("why not")), Asked::Refused(r) if r.contains("Practitioner"))
        );
        let mut other = dr.clone();
        other.user_id = "someone else".into();
        assert_eq!(g.ask(&other, None), Asked::No, "a session is its caller's");
    }
}
