//! `treasury simulate`: the engine's own decision code — window assignment,
//! the planner, provider selection, ledger postings — run on a simulated
//! clock over a month of flows, against baselines and a lower bound.
//!
//! Nothing here talks to Kafka, PostgreSQL or HTTP, and nothing reads a real
//! clock: a run is a pure function of the trace, the world and the seed.

pub mod bound;
pub mod cli;
pub mod compare;
pub mod executor;
pub mod generate;
pub mod invariants;
pub mod metrics;
pub mod parallel;
pub mod plot;
pub mod policies;
pub mod recommend;
pub mod report;
pub mod run;
pub mod scenario;
pub mod sweep;
pub mod trace;
