//! `break_the_glass`: who may bypass the data filters in an emergency, for how long, and how
//! they say why (`src/audit/glass.rs`).

use super::Errors;
use crate::auth::policy::role_by_name;
use fhir_gateway_modules::Role;
use serde::Deserialize;

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct GlassConfig {
    /// Roles that may break the glass (e.g. `[Practitioner]`).
    pub roles: Vec<String>,
    /// How long a session lasts from the last request that gave a reason, minutes.
    #[serde(default = "default_minutes")]
    pub minutes: u64,
    /// The request header carrying the reason; its presence asks for the bypass.
    #[serde(default = "default_header")]
    pub header: String,
    /// The post modules a session bypasses on reads.
    #[serde(default = "default_bypass")]
    pub bypass: Vec<String>,
}

fn default_minutes() -> u64 {
    60
}
fn default_header() -> String {
    "X-Break-The-Glass".into()
}
fn default_bypass() -> Vec<String> {
    vec!["ParticipantFilter".into(), "ConsentOptOut".into()]
}

#[derive(Debug, Default)]
pub struct BuiltGlass {
    pub roles: Vec<Role>,
}

pub(super) fn validate(cfg: Option<&GlassConfig>, audited: bool, errs: &mut Errors) -> BuiltGlass {
    let mut built = BuiltGlass::default();
    let Some(cfg) = cfg else {
        return built;
    };
    if !audited {
        errs.at(
            &["break_the_glass"],
            "break_the_glass: needs the audit trail (audit.file): every bypass is audited with its reason".into(),
        );
    }
    for (i, n) in cfg.roles.iter().enumerate() {
        match role_by_name(n) {
            Some(r) => built.roles.push(r),
            None => errs.at(
                &["break_the_glass", "roles", &i.to_string()],
                format!("break_the_glass.roles: unknown role {n:?}"),
            ),
        }
    }
    if cfg.roles.is_empty() {
        errs.at(
            &["break_the_glass", "roles"],
            "break_the_glass.roles: name at least one role".into(),
        );
    }
    if !(1..=24 * 60).contains(&cfg.minutes) {
        errs.at(
            &["break_the_glass", "minutes"],
            "break_the_glass.minutes: 1..=1440".into(),
        );
    }
    if http::HeaderName::from_bytes(cfg.header.as_bytes()).is_err() {
        errs.at(
            &["break_the_glass", "header"],
            format!(
                "break_the_glass.header: {:?} is not a header name",
                cfg.header
            ),
        );
    }
    built
}
