//! The module registry: module kinds by name, each with its chain (pre or post) and the factory
//! that builds one from its YAML `settings`.
//!
//! The gateway knows no module by name: it asks a [`Registry`] to build what the YAML lists,
//! and asks the built modules what they do (`PostProcess::uses_identity_links`, ...).
//! [`Registry::builtin`] (in `builtin/mod.rs`) registers the modules of this crate; a crate
//! with its own modules registers them next to the built-in ones:
//!
//! ```
//! use fhir_gateway_modules::{configure, Registry};
//! # use fhir_gateway_modules::builtin::date_sort::DateSort as MyFilter;
//! use std::sync::Arc;
//!
//! let mut registry = Registry::builtin();
//! registry
//!     .register_post("MyFilter", |s| {
//!         Ok(Arc::new(configure("MyFilter", s, MyFilter::new)?))
//!     })
//!     .unwrap();
//! assert!(registry.build_post("MyFilter", &serde_json::Value::Null).is_ok());
//! ```

use crate::processor::{PostProcess, PreProcess};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::sync::Arc;

/// Builds a pre-processor from its YAML `settings` (`Null` when the YAML has none).
pub type PreFactory = fn(&Value) -> Result<Arc<dyn PreProcess>, String>;

/// Builds a post-processor from its YAML `settings`.
pub type PostFactory = fn(&Value) -> Result<Arc<dyn PostProcess>, String>;

/// A registered module kind: the chain it belongs in, and how to build it.
#[derive(Clone, Copy)]
pub enum Factory {
    Pre(PreFactory),
    Post(PostFactory),
}

/// The module kinds a gateway can build, by name, in registration order (the order of the
/// `known:` list in errors).
#[derive(Clone, Default)]
pub struct Registry {
    kinds: Vec<(String, Factory)>,
}

impl Registry {
    /// A registry without any module.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a module kind. A name is registered once, whatever its kind: the YAML names a
    /// module by its name alone.
    pub fn register(&mut self, name: &str, factory: Factory) -> Result<&mut Registry, String> {
        if self.kinds.iter().any(|(n, _)| n == name) {
            return Err(format!("module {name:?} is already registered"));
        }
        self.kinds.push((name.to_string(), factory));
        Ok(self)
    }

    /// `register(name, Factory::Pre(factory))`.
    pub fn register_pre(
        &mut self,
        name: &str,
        factory: PreFactory,
    ) -> Result<&mut Registry, String> {
        self.register(name, Factory::Pre(factory))
    }

    /// `register(name, Factory::Post(factory))`.
    pub fn register_post(
        &mut self,
        name: &str,
        factory: PostFactory,
    ) -> Result<&mut Registry, String> {
        self.register(name, Factory::Post(factory))
    }

    fn factory(&self, name: &str) -> Option<Factory> {
        self.kinds.iter().find(|(n, _)| n == name).map(|(_, f)| *f)
    }

    /// Names of the registered pre-processors, in registration order.
    pub fn pre_names(&self) -> Vec<&str> {
        self.names(|f| matches!(f, Factory::Pre(_)))
    }

    /// Names of the registered post-processors, in registration order.
    pub fn post_names(&self) -> Vec<&str> {
        self.names(|f| matches!(f, Factory::Post(_)))
    }

    fn names(&self, kind: fn(&Factory) -> bool) -> Vec<&str> {
        self.kinds
            .iter()
            .filter(|(_, f)| kind(f))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    /// Builds a pre-processor; an unknown name, a post-processor's name and bad settings are
    /// errors (the gateway then refuses to start).
    pub fn build_pre(&self, name: &str, settings: &Value) -> Result<Arc<dyn PreProcess>, String> {
        match self.factory(name) {
            Some(Factory::Pre(build)) => build(settings),
            Some(Factory::Post(_)) => {
                Err(format!("{name} is a post-processor, not a pre-processor"))
            }
            None => Err(format!(
                "unknown pre-processor {name:?} (known: {})",
                self.pre_names().join(", ")
            )),
        }
    }

    /// Builds a post-processor.
    pub fn build_post(&self, name: &str, settings: &Value) -> Result<Arc<dyn PostProcess>, String> {
        match self.factory(name) {
            Some(Factory::Post(build)) => build(settings),
            Some(Factory::Pre(_)) => {
                Err(format!("{name} is a pre-processor, not a post-processor"))
            }
            None => Err(format!(
                "unknown post-processor {name:?} (known: {})",
                self.post_names().join(", ")
            )),
        }
    }
}

/// For factories: reads `settings` (absent = `{}`) as the module's settings type `S` and calls
/// its constructor. Both kinds of error are prefixed with the module's `name`, which is how
/// `-t` reports them (`post[0]: DateSort: max must be ...`).
pub fn configure<S: DeserializeOwned, M>(
    name: &str,
    settings: &Value,
    new: impl FnOnce(S) -> Result<M, String>,
) -> Result<M, String> {
    let v = if settings.is_null() {
        Value::Object(Default::default())
    } else {
        settings.clone()
    };
    let s = serde_json::from_value(v).map_err(|e| format!("{name}: {e}"))?;
    new(s).map_err(|e| format!("{name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::builtin::{build_post, build_pre, date_sort, sample_pre};
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

    #[test]
    fn known_lists_follow_registration_order() {
        let r = Registry::builtin();
        assert_eq!(
            r.build_pre("Nope", &Value::Null).err().unwrap(),
            "unknown pre-processor \"Nope\" (known: SamplePreProcess, TransformBundle, EverythingPatient)"
        );
        assert_eq!(
            r.build_post("Nope", &Value::Null).err().unwrap(),
            "unknown post-processor \"Nope\" (known: SamplePostProcess, DateSort, ParticipantFilter, ConsentOptOut, PublishFHIREvent, ResponseHeaders)"
        );
        assert_eq!(
            r.build_post("TransformBundle", &Value::Null).err().unwrap(),
            "TransformBundle is a pre-processor, not a post-processor"
        );
        let e = r.build_post("DateSort", &json!({"max": 0})).err().unwrap();
        assert!(e.starts_with("DateSort: "), "{e}");
    }

    #[test]
    fn another_crate_registers_its_own_module() {
        let mut r = Registry::builtin();
        r.register_post("Sorted", |s| {
            Ok(Arc::new(configure("Sorted", s, date_sort::DateSort::new)?))
        })
        .unwrap();
        assert!(r.build_post("Sorted", &json!({"max": 10})).is_ok());
        assert_eq!(
            r.build_post("Sorted", &json!({"maxx": 10})).err().unwrap()[..8],
            *"Sorted: "
        );
        assert!(r
            .build_pre("Sorted", &Value::Null)
            .err()
            .unwrap()
            .contains("is a post-processor"));
        assert!(r.post_names().ends_with(&["Sorted"]));
        // One name, one module: the YAML cannot tell two apart.
        let again: PreFactory = |s| {
            Ok(Arc::new(configure(
                "DateSort",
                s,
                sample_pre::SamplePreProcess::new,
            )?))
        };
        assert!(r.register_pre("DateSort", again).is_err());
    }

    #[test]
    fn modules_declare_what_the_gateway_must_know() {
        let r = Registry::builtin();
        let links = |n: &str, s: Value| r.build_post(n, &s).unwrap().uses_identity_links();
        let scoped = |n: &str, s: Value| r.build_post(n, &s).unwrap().scopes_data_to_the_caller();
        assert!(links("ParticipantFilter", Value::Null));
        assert!(scoped("ParticipantFilter", Value::Null));
        let consent = json!({"category": "http://loinc.org|59284-0"});
        assert!(links("ConsentOptOut", consent.clone()));
        assert!(!scoped("ConsentOptOut", consent));
        assert!(!links("DateSort", Value::Null));
        assert!(!scoped("PublishFHIREvent", Value::Null));
    }
}
