//! Ingest: read deposits and withdrawals from Kafka, refuse bad input to the
//! DLQ, and count each valid event exactly once in its window.

pub mod batch;
pub mod consumer;
pub mod validate;

pub use batch::{BatchOutcome, Consumed, commit_batch};
pub use consumer::{Ingest, IngestSettings, IngestTotals, MAX_WORKERS, worker_name};
pub use validate::{Rejection, decode_event, validate};
