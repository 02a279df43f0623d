//! Processor traits and built-in modules of fhir-gateway.
//!
//! This crate is pure logic: it knows nothing of Pingora or Kafka. The gateway hands modules
//! what they need through small traits (a FHIR client, an event sink), so each module can be
//! tested on its own. The processor chain itself arrives with its own issue; today the crate
//! holds the shared OperationOutcome renderer.

pub mod outcome;

pub use outcome::{operation_outcome, outcome_bytes, Issue, Severity};
