//! The built-in modules and the registry that builds them from YAML (`name` + settings).

pub mod consent_opt_out;
pub mod date_sort;
pub mod everything_patient;
pub mod participant_filter;
pub mod publish_event;
pub mod sample_post;
pub mod sample_pre;
pub mod transform_bundle;

use crate::processor::{PostProcess, PreProcess};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::sync::Arc;

/// Prefixes a module's own settings error with its name.
fn named<T>(name: &str, r: Result<T, String>) -> Result<T, String> {
    r.map_err(|e| format!("{name}: {e}"))
}

fn settings<T: DeserializeOwned>(name: &str, v: &Value) -> Result<T, String> {
    let v = if v.is_null() {
        Value::Object(Default::default())
    } else {
        v.clone()
    };
    serde_json::from_value(v).map_err(|e| format!("{name}: {e}"))
}

/// Names of the pre-processors this build knows.
pub const PRE: &[&str] = &[
    sample_pre::SamplePreProcess::NAME,
    transform_bundle::TransformBundle::NAME,
    everything_patient::EverythingPatient::NAME,
];

/// Names of the post-processors this build knows.
pub const POST: &[&str] = &[
    sample_post::SamplePostProcess::NAME,
    date_sort::DateSort::NAME,
    participant_filter::ParticipantFilter::NAME,
    consent_opt_out::ConsentOptOut::NAME,
    publish_event::PublishFhirEvent::NAME,
];

/// Builds a pre-processor; unknown names and bad settings are errors (the gateway then
/// refuses to start).
pub fn build_pre(name: &str, s: &Value) -> Result<Arc<dyn PreProcess>, String> {
    Ok(match name {
        sample_pre::SamplePreProcess::NAME => Arc::new(named(
            name,
            sample_pre::SamplePreProcess::new(settings(name, s)?),
        )?),
        transform_bundle::TransformBundle::NAME => Arc::new(named(
            name,
            transform_bundle::TransformBundle::new(settings(name, s)?),
        )?),
        everything_patient::EverythingPatient::NAME => Arc::new(named(
            name,
            everything_patient::EverythingPatient::new(settings(name, s)?),
        )?),
        other => {
            return Err(if POST.contains(&other) {
                format!("{other} is a post-processor, not a pre-processor")
            } else {
                format!(
                    "unknown pre-processor {other:?} (known: {})",
                    PRE.join(", ")
                )
            })
        }
    })
}

/// Builds a post-processor.
pub fn build_post(name: &str, s: &Value) -> Result<Arc<dyn PostProcess>, String> {
    Ok(match name {
        sample_post::SamplePostProcess::NAME => Arc::new(named(
            name,
            sample_post::SamplePostProcess::new(settings(name, s)?),
        )?),
        date_sort::DateSort::NAME => {
            Arc::new(named(name, date_sort::DateSort::new(settings(name, s)?))?)
        }
        participant_filter::ParticipantFilter::NAME => Arc::new(named(
            name,
            participant_filter::ParticipantFilter::new(settings(name, s)?),
        )?),
        consent_opt_out::ConsentOptOut::NAME => Arc::new(named(
            name,
            consent_opt_out::ConsentOptOut::new(settings(name, s)?),
        )?),
        publish_event::PublishFhirEvent::NAME => Arc::new(named(
            name,
            publish_event::PublishFhirEvent::new(settings(name, s)?),
        )?),
        other => {
            return Err(if PRE.contains(&other) {
                format!("{other} is a pre-processor, not a post-processor")
            } else {
                format!(
                    "unknown post-processor {other:?} (known: {})",
                    POST.join(", ")
                )
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn registry_validates_names_and_settings() {
        assert!(build_pre("TransformBundle", &Value::Null).is_ok());
        assert!(build_pre("SamplePreProcess", &json!({"default_count": 10})).is_ok());
        let e = build_pre("SamplePreProcess", &json!({"default_cont": 10}))
            .err()
            .unwrap();
        assert!(e.contains("unknown field"), "{e}");
        assert!(build_pre("SamplePreProcess", &json!({"default_count": 0})).is_err());
        assert!(build_pre("Nope", &Value::Null)
            .err()
            .unwrap()
            .contains("unknown pre-processor"));
        assert!(build_pre("DateSort", &Value::Null)
            .err()
            .unwrap()
            .contains("is a post-processor"));
        assert!(build_post("DateSort", &json!({"max": 10})).is_ok());
        assert!(
            build_post("SamplePostProcess", &Value::Null).is_err(),
            "system and code required"
        );
    }
}
