//! The built-in modules: [`Registry::builtin`] registers them (the registry itself is
//! `registry.rs`, re-exported here so `builtin::{configure, Registry}` keep working), and
//! [`build_pre`]/[`build_post`] build one of them by name.

pub mod consent_opt_out;
pub mod date_sort;
pub mod everything_patient;
pub mod participant_filter;
pub mod publish_event;
pub mod response_headers;
pub mod sample_post;
pub mod sample_pre;
pub mod transform_bundle;

pub use crate::registry::{configure, Factory, PostFactory, PreFactory, Registry};

use crate::processor::{PostProcess, PreProcess};
use serde_json::Value;
use std::sync::Arc;

impl Registry {
    /// The modules of this crate.
    pub fn builtin() -> Registry {
        // Each built-in module has `NAME` and `new(Settings) -> Result<Self, String>`.
        macro_rules! add {
            ($r:ident.$register:ident, $m:ty) => {
                $r.$register(<$m>::NAME, |s| {
                    Ok(Arc::new(configure(<$m>::NAME, s, <$m>::new)?))
                })
                .expect("built-in names are distinct")
            };
        }
        let mut r = Registry::new();
        add!(r.register_pre, sample_pre::SamplePreProcess);
        add!(r.register_pre, transform_bundle::TransformBundle);
        add!(r.register_pre, everything_patient::EverythingPatient);
        add!(r.register_post, sample_post::SamplePostProcess);
        add!(r.register_post, date_sort::DateSort);
        add!(r.register_post, participant_filter::ParticipantFilter);
        add!(r.register_post, consent_opt_out::ConsentOptOut);
        add!(r.register_post, publish_event::PublishFhirEvent);
        add!(r.register_post, response_headers::ResponseHeaders);
        r
    }
}

/// [`Registry::builtin`]`().build_pre(..)`, for code that needs only the built-in modules.
pub fn build_pre(name: &str, s: &Value) -> Result<Arc<dyn PreProcess>, String> {
    Registry::builtin().build_pre(name, s)
}

/// [`Registry::builtin`]`().build_post(..)`.
pub fn build_post(name: &str, s: &Value) -> Result<Arc<dyn PostProcess>, String> {
    Registry::builtin().build_post(name, s)
}
