//! What the executor keeps in the system of record: conversion jobs (with
//! their audit history), providers' rows and recent outcomes, and the
//! completion of a job with its ledger posting — each operation one
//! transaction.
//!
//! Leases and fencing: a worker drives a job only under a [`Lease`], taken
//! with [`JobStore::lease_job`] (which reloads the job and increments its
//! lease epoch). Every write of a leased job carries the lease and is refused
//! unless the job's owner and epoch are still the lease's and the lease has
//! not expired at the caller's `now` (its clock's reading; the stores never
//! read their own clock for leases). A worker whose write is refused has lost
//! the job and stops.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use super::{OffsetRange, OutboxMessage, StoreError};
use crate::domain::{ConversionJob, JobStatus, LedgerPosting};
use crate::providers::ProviderRow;
use crate::providers::health::AttemptOutcome;

/// The right to drive one job: its owner and the epoch the job was leased at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job: Uuid,
    pub owner: String,
    /// Incremented on every new lease of the job; writes with an older epoch
    /// are refused (a fencing token).
    pub epoch: i64,
}

/// A job as it was at the moment it was leased, with the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedJob {
    pub job: ConversionJob,
    pub lease: Lease,
}

/// How the job's attempt at a provider ended, recorded with a job write (one
/// outcome per job and provider, for the provider's health).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub provider: Uuid,
    pub succeeded: bool,
}

/// A change to a leased job, applied only under its lease and if the job is
/// still in `from`.
#[derive(Debug, Clone)]
pub struct JobUpdate<'a> {
    /// The lease the change is made under.
    pub lease: &'a Lease,
    /// The driver's clock reading: the lease must not have expired by then.
    pub now: DateTime<Utc>,
    /// The job as it should be stored.
    pub job: &'a ConversionJob,
    /// The status the caller read; the update is refused if it changed.
    pub from: JobStatus,
    /// What happened, for the history.
    pub note: &'a str,
    /// The provider's response, stored for audit.
    pub provider_response: Option<serde_json::Value>,
    /// Why the provider was chosen.
    pub selection_reason: Option<String>,
    /// How the job's attempt at a provider ended, if it did.
    pub outcome: Option<Outcome>,
}

/// The executor's store.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Commits an intake batch: the consumed offsets, one job per new command
    /// (a command that already has a job is skipped), and DLQ records.
    /// Returns the ids of the jobs created.
    async fn intake(
        &self,
        group: &str,
        ranges: &[OffsetRange],
        jobs: &[ConversionJob],
        dead_letters: &[OutboxMessage],
    ) -> Result<Vec<Uuid>, StoreError>;

    /// Up to `limit` unfinished jobs (not waiting for a person) that nobody
    /// holds an unexpired lease on at `now`, oldest first.
    async fn open_jobs(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<Uuid>, StoreError>;

    /// Leases `job` to `owner` until `now + lease` if it is unfinished, not
    /// waiting for a person and nobody holds an unexpired lease on it;
    /// increments its epoch and returns it as stored now. None: not leased.
    async fn lease_job(
        &self,
        job: Uuid,
        owner: &str,
        now: DateTime<Utc>,
        lease: std::time::Duration,
    ) -> Result<Option<LeasedJob>, StoreError>;

    /// Extends an unexpired lease to `now + lease`; false if it is no longer
    /// held (expired, or taken by another worker).
    async fn renew(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        extend: std::time::Duration,
    ) -> Result<bool, StoreError>;

    /// Gives a lease back (nothing happens if it is no longer held).
    async fn release(&self, lease: &Lease) -> Result<(), StoreError>;

    /// Records, under an unexpired lease, that the job's provider is being
    /// called now (so a later worker holds instead of choosing again), and
    /// extends the lease to `now + extend`. False if the lease is lost: the
    /// call must not be made.
    async fn record_call(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        extend: std::time::Duration,
    ) -> Result<bool, StoreError>;

    /// Every provider row.
    async fn providers(&self) -> Result<Vec<ProviderRow>, StoreError>;

    /// Outcomes of job attempts known after `since`, oldest first.
    async fn provider_outcomes(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<AttemptOutcome>, StoreError>;

    /// Today's volume of unfinished jobs per provider.
    async fn in_flight_by_provider(&self) -> Result<HashMap<Uuid, Decimal>, StoreError>;

    /// Stores a job change; false if the lease is lost or the job was no
    /// longer in `update.from`.
    async fn update_job(&self, update: JobUpdate<'_>) -> Result<bool, StoreError>;

    /// Completes a `provider_completed` job under its lease in one
    /// transaction: status through `ledger_updating` to `completed`, buffer
    /// balances moved, the posting stored (once per job, ever) and queued for
    /// the ledger topic, and the provider's success and daily volume counted.
    /// False if the lease is lost or the job is no longer `provider_completed`.
    async fn complete_job(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        job: &ConversionJob,
        posting: &LedgerPosting,
        message: &OutboxMessage,
    ) -> Result<bool, StoreError>;

    /// A job by id.
    async fn job(&self, id: Uuid) -> Result<Option<ConversionJob>, StoreError>;

    /// Applies an operator's decision to a job in one transaction, if the job
    /// state machine allows it ([`super::operator::decide`]), with a history row.
    /// An operator holds no lease: the change ends any lease on the job and
    /// increments its epoch, so a worker that held it is fenced off (its next
    /// write or renewal is refused) and the next worker reloads the job.
    async fn operator_change(
        &self,
        id: Uuid,
        action: &super::operator::OperatorAction,
    ) -> Result<super::operator::OperatorOutcome, StoreError>;
}
