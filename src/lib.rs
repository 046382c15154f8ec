//! Treasury Engine: keeps the USDC and USD buffer accounts funded by netting
//! deposit and withdrawal flows from Kafka into a few conversions.
//!
//! The pipeline, one module per stage:
//! [`ingest`] → [`window`] → [`planner`] (driven by [`settlement`]) → [`relay`]
//! → executor → ledger. [`domain`] holds the types that parse; [`store`] is the
//! system of record (PostgreSQL, or in memory for the demo); [`codec`] speaks
//! Avro in the Confluent wire format.

pub mod alerts;
pub mod cli;
pub mod clock;
pub mod codec;
pub mod config;
pub mod consumer;
pub mod demo;
pub mod dlq;
pub mod domain;
pub mod executor;
pub mod health;
pub mod http;
pub mod ingest;
pub mod kafka;
pub mod ledger;
pub mod manual;
pub mod planner;
pub mod providers;
pub mod reconcile;
pub mod relay;
pub mod report;
pub mod retry;
pub mod runtime;
pub mod settlement;
pub mod shutdown;
pub mod simulate;
pub mod store;
pub mod telemetry;
pub mod window;
