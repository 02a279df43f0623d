//! Processor traits and built-in modules of fhir-gateway.
//!
//! This crate is pure logic: it knows nothing of Pingora or Kafka. The gateway hands modules
//! what they need through small traits (a FHIR client, an event sink), so each module can be
//! tested on its own. Today it holds the shared vocabulary: OperationOutcome rendering, the
//! caller's identity, SMART scopes, FHIR request classification and the Patient compartment.

pub mod builtin;
pub mod compartment;
pub mod conditional;
pub mod explain;
pub mod filter;
pub mod identity;
pub mod json;
pub mod links;
pub mod outcome;
pub mod processor;
pub mod reference;
pub mod registry;
pub mod request;
pub mod smart;
#[cfg(test)]
pub(crate) mod testing;

pub use identity::{Identity, Role};
pub use outcome::{operation_outcome, outcome_bytes, Issue, Severity};
pub use registry::{configure, Registry};
