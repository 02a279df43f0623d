//! fhir-gateway: a secure gateway for FHIR servers, on Cloudflare Pingora.

pub mod audit;
pub mod auth;
pub mod bulk;
pub mod chain;
pub mod config;
pub mod error;
pub mod events;
pub mod faithful;
pub mod gateway;
pub mod headers;
pub mod health;
pub mod metrics;
pub mod net;
pub mod proxy;
pub mod rewrite;
pub mod upstream;

pub use error::GatewayError;
pub use gateway::Gateway;
