//! The system of record. Every stage does its work inside one [`StoreTx`]:
//! the offsets it consumed, the state it changed and the messages it will
//! send commit together or not at all.
//!
//! Two implementations share this interface: [`postgres::PgStore`] (durable,
//! production) and [`memory::MemoryStore`] (the embedded demo; NOT durable).

pub mod jobs;
pub mod memory;
pub mod operator;
pub mod postgres;
mod postgres_batch;
mod postgres_jobs;
pub mod seeds;

use std::collections::{BTreeMap, HashSet};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use uuid::Uuid;

use crate::domain::{
    BufferAccount, BufferStatus, ConversionCommand, ConversionDirection, JobStatus,
};
use crate::planner::{AmountLimits, BufferPosition, InFlight};
use crate::window::{PartitionProgress, WindowTallies, WindowTally};

/// What can go wrong talking to the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    /// Another consumer already committed past these offsets (a rebalance
    /// handed the partition over); the batch must be dropped and re-read.
    #[error("offsets for {topic}[{partition}] moved: stored {stored}, batch starts at {first}")]
    OffsetConflict {
        topic: String,
        partition: i32,
        stored: i64,
        first: i64,
    },
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// [`StoreTx::claim_new_events`] met an id seen before: the transaction
    /// is void, and the batch is to be written again with each id checked.
    #[error("an event id of the batch was seen before")]
    SeenBefore,
}

impl StoreError {
    /// Whether retrying may succeed: the database unreachable, restarting,
    /// overloaded, or a lost race between transactions. A missing table, a
    /// constraint or invalid stored data is not transient: retrying changes
    /// nothing, and the process should stop and say so.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    // Connection exception, insufficient resources, operator
                    // intervention (shutdown, cancel), system error; and
                    // serialization failure or deadlock.
                    ["08", "53", "57", "58"].iter().any(|c| code.starts_with(c))
                        || code == "40001"
                        || code == "40P01"
                }),
                _ => false,
            },
            StoreError::OffsetConflict { .. } => true,
            StoreError::Migration(_) | StoreError::Corrupt(_) | StoreError::SeenBefore => false,
        }
    }
}

/// How a transaction coordinates with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Ingest batches: run side by side.
    Shared,
    /// Settlement: alone, so no batch adds to a window while it closes.
    Exclusive,
}

/// A partition of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

/// The offsets a batch consumed from one partition: `first..next`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetRange {
    pub tp: TopicPartition,
    pub first: i64,
    pub next: i64,
}

/// An input partition's progress to record with a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgressUpdate {
    pub tp: TopicPartition,
    /// Largest event time in the batch for this partition.
    pub max_event_time: Option<DateTime<Utc>>,
    /// Whether the consumer has reached the end of the partition.
    pub caught_up: bool,
    pub now: DateTime<Utc>,
}

impl ProgressUpdate {
    /// One update per partition, in first-seen order: a partition named more
    /// than once counts as its last report (caught up or not, at its time)
    /// with the greatest event time of all. A rebalance that revokes and
    /// hands back the same partition names it twice.
    pub fn merged(updates: &[ProgressUpdate]) -> Vec<ProgressUpdate> {
        let mut merged: Vec<ProgressUpdate> = Vec::with_capacity(updates.len());
        let mut index: std::collections::HashMap<&TopicPartition, usize> =
            std::collections::HashMap::with_capacity(updates.len());
        for u in updates {
            match index.get(&u.tp) {
                Some(&i) => {
                    let m = &mut merged[i];
                    m.max_event_time = m.max_event_time.max(u.max_event_time);
                    m.caught_up = u.caught_up;
                    m.now = u.now;
                }
                None => {
                    index.insert(&u.tp, merged.len());
                    merged.push(u.clone());
                }
            }
        }
        merged
    }
}

/// A counted event's id and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventRef {
    pub event_id: Uuid,
    pub tp: TopicPartition,
    pub offset: i64,
    pub window_start: DateTime<Utc>,
}

/// A message to publish, written with the state change that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxMessage {
    /// Deterministic id, also sent as the `message-id` header.
    pub id: Uuid,
    pub topic: String,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// A window's settled result, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WindowRecord {
    pub window_start: DateTime<Utc>,
    pub window_end: DateTime<Utc>,
    pub event_count: i64,
    pub late_event_count: i64,
    pub closed: bool,
    pub flows: BTreeMap<BufferAccount, (Decimal, Decimal)>,
    pub demand: BTreeMap<ConversionDirection, Decimal>,
    pub result: Option<serde_json::Value>,
}

/// One buffer for `treasury status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BufferReport {
    pub account: BufferAccount,
    pub currency: String,
    pub balance: Decimal,
    pub min: Decimal,
    pub target: Decimal,
    pub max: Decimal,
    pub status: BufferStatus,
    pub amount_to_target: Decimal,
}

/// A planned command as the planner recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedCommand {
    pub command: ConversionCommand,
    /// False when auto-rebalance was off: planned and shown, never sent.
    pub emitted: bool,
}

/// Opens transactions and serves read-only reports.
#[async_trait]
pub trait Store: Send + Sync {
    /// Begins a transaction.
    async fn begin(&self, mode: LockMode) -> Result<Box<dyn StoreTx>, StoreError>;
    /// Stored next offsets for `partitions` of `group` (absent: never consumed).
    async fn load_offsets(
        &self,
        group: &str,
        partitions: &[TopicPartition],
    ) -> Result<BTreeMap<TopicPartition, i64>, StoreError>;
    /// Up to `limit` unsent outbox messages, oldest first, claimed for a short
    /// while so that other relays skip them.
    async fn outbox_pending(&self, limit: i64) -> Result<Vec<OutboxMessage>, StoreError>;
    /// Marks outbox messages as published.
    async fn mark_sent(&self, ids: &[Uuid]) -> Result<(), StoreError>;
    /// Buffers with thresholds and statuses.
    async fn buffer_report(&self) -> Result<Vec<BufferReport>, StoreError>;
    /// All windows, oldest first.
    async fn windows(&self) -> Result<Vec<WindowRecord>, StoreError>;
    /// All planned commands, oldest first.
    async fn planned_commands(&self) -> Result<Vec<PlannedCommand>, StoreError>;
    /// Asks the running aggregator for an immediate settlement cycle.
    async fn request_trigger(&self, requested_by: &str) -> Result<i64, StoreError>;
    /// Forgets processed event ids counted before `before` (duplicate-detection
    /// retention); returns how many were removed.
    async fn purge_processed(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
    /// Overwrites the stored next offsets of `group` (replay).
    async fn set_offsets(
        &self,
        group: &str,
        offsets: &BTreeMap<TopicPartition, i64>,
    ) -> Result<(), StoreError>;
    /// How many conversion jobs are in each status: every status, in
    /// [`JobStatus::ALL`] order, 0 when none.
    async fn jobs_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError>;
}

/// One unit of work. Dropping it without [`StoreTx::commit`] rolls back.
#[async_trait]
pub trait StoreTx: Send {
    // --- ingest ---
    /// Advances stored offsets; fails with [`StoreError::OffsetConflict`] if
    /// another consumer has already committed past a range's start.
    async fn advance_offsets(
        &mut self,
        group: &str,
        ranges: &[OffsetRange],
    ) -> Result<(), StoreError>;
    /// Records event ids; returns those not seen before (the rest are duplicates).
    async fn claim_events(&mut self, events: &[EventRef]) -> Result<HashSet<Uuid>, StoreError>;
    /// Records event ids expected to be new, by the store's fastest path.
    /// May fail with [`StoreError::SeenBefore`] when one was seen before,
    /// leaving the transaction void; otherwise as [`Self::claim_events`].
    async fn claim_new_events(&mut self, events: &[EventRef]) -> Result<HashSet<Uuid>, StoreError> {
        self.claim_events(events).await
    }
    /// Advances the offsets as [`Self::advance_offsets`] and reads the
    /// window clock as [`Self::next_window_start`]: how an ingest batch
    /// starts (one round trip on PostgreSQL).
    async fn start_batch(
        &mut self,
        group: &str,
        ranges: &[OffsetRange],
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        self.advance_offsets(group, ranges).await?;
        self.next_window_start().await
    }
    /// Adds a batch's sums as [`Self::add_tallies`] and records its
    /// partitions' progress as [`Self::record_progress`] (one round trip on
    /// PostgreSQL).
    async fn add_batch_sums(
        &mut self,
        tallies: &WindowTallies,
        length: chrono::Duration,
        updates: &[ProgressUpdate],
    ) -> Result<(), StoreError> {
        self.add_tallies(tallies, length).await?;
        self.record_progress(updates).await
    }
    /// Adds a batch's sums to its windows.
    async fn add_tallies(
        &mut self,
        tallies: &WindowTallies,
        length: chrono::Duration,
    ) -> Result<(), StoreError>;
    /// Records input partitions' progress.
    /// A partition may appear more than once in `updates`; it is recorded as
    /// [`ProgressUpdate::merged`] says.
    async fn record_progress(&mut self, updates: &[ProgressUpdate]) -> Result<(), StoreError>;
    /// Makes sure every partition in `partitions` is known to settlement, with
    /// no progress yet if it has none; partitions already known are left as
    /// they are. A known partition that nobody has read holds settlement back.
    async fn register_partitions(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<(), StoreError>;
    /// Queues messages for the relay.
    async fn enqueue(&mut self, messages: &[OutboxMessage]) -> Result<(), StoreError>;

    // --- settlement ---
    /// Windows starting before this are closed (None: none closed yet).
    async fn next_window_start(&mut self) -> Result<Option<DateTime<Utc>>, StoreError>;
    async fn set_next_window_start(&mut self, start: DateTime<Utc>) -> Result<(), StoreError>;
    /// Starts of the open windows that have counted events, oldest first.
    async fn open_windows(&mut self) -> Result<Vec<DateTime<Utc>>, StoreError>;
    /// Progress of every known partition of `topics`.
    async fn partition_progress(
        &mut self,
        topics: &[String],
    ) -> Result<Vec<PartitionProgress>, StoreError>;
    /// The sums counted in one window.
    async fn window_tally(&mut self, start: DateTime<Utc>) -> Result<WindowTally, StoreError>;
    /// Moves buffer balances by a closing window's net flows.
    async fn apply_flows(&mut self, tally: &WindowTally) -> Result<(), StoreError>;
    /// Balances, thresholds and in-flight conversions of every buffer.
    async fn buffer_positions(&mut self) -> Result<Vec<BufferPosition>, StoreError>;
    /// The conversions `buffer_positions` counts as incoming (emitted
    /// commands whose jobs have not ended), each with its command's time.
    async fn in_flight(&mut self) -> Result<Vec<InFlight>, StoreError>;
    /// Amount limits of the active providers, per direction.
    async fn amount_limits(
        &mut self,
    ) -> Result<BTreeMap<ConversionDirection, AmountLimits>, StoreError>;
    /// Whether an operator paused auto-rebalance.
    async fn auto_rebalance_paused(&mut self) -> Result<bool, StoreError>;
    /// Marks a window closed with its result.
    async fn close_window(
        &mut self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        watermark: DateTime<Utc>,
        result: &serde_json::Value,
    ) -> Result<(), StoreError>;
    /// Records planned commands (they count as in flight from now on).
    async fn record_commands(&mut self, commands: &[PlannedCommand]) -> Result<(), StoreError>;
    /// Operator trigger requests not handled yet.
    async fn pending_triggers(&mut self) -> Result<Vec<i64>, StoreError>;
    async fn finish_trigger(
        &mut self,
        id: i64,
        result: &serde_json::Value,
    ) -> Result<(), StoreError>;

    /// What the planner reads from the past: every provider row, the closed
    /// windows starting at or after `since`, and the lead times of jobs
    /// completed since then.
    async fn planning_records(
        &mut self,
        since: DateTime<Utc>,
    ) -> Result<PlanningRecords, StoreError>;
    /// A recorded command by id.
    async fn planned_command(&mut self, id: Uuid) -> Result<Option<PlannedCommand>, StoreError>;
    /// The status last announced on the buffer-alerts topic, per buffer.
    async fn announced_statuses(
        &mut self,
    ) -> Result<BTreeMap<BufferAccount, BufferStatus>, StoreError>;
    /// Records the statuses just announced (or confirmed).
    async fn record_announced(
        &mut self,
        statuses: &BTreeMap<BufferAccount, BufferStatus>,
    ) -> Result<(), StoreError>;

    /// Commits everything done in this transaction.
    async fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// What the planner reads from the past, in the settlement transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanningRecords {
    /// Every provider row.
    pub providers: Vec<crate::providers::ProviderRow>,
    /// Closed windows by start (a window without events is absent).
    pub windows: BTreeMap<DateTime<Utc>, WindowTally>,
    /// Command-to-completion time of each recently completed job, oldest first.
    pub lead_times: Vec<chrono::Duration>,
}
