//! The leak suite's own helpers, on top of `tests/common` (the gateway process, peers, IdP
//! tokens and tokens signed with the IdP's key).

pub use crate::common::idp::{
    claims_of, jwt_auth_yaml, now_secs, token, user_token, wait_ready, TENANT_A,
};
pub use crate::common::{client, require_peer, sekmet_url, Gateway, IDP};

/// The identifier system of identity links in the configuration under test.
pub const LINK_SYSTEM: &str = "urn:fhir-gateway:identity-link";

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
