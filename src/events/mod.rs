//! Events of successful writes on their way to Kafka / Event Hubs: the durable spool they
//! wait in (the producer arrives with issue 6).

pub mod spool;
