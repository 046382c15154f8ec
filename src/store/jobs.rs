//! What the executor keeps in the system of record: conversion jobs (with
//! their audit history), providers' rows and statistics, and the completion
//! of a job with its ledger posting — each operation one transaction.

use std::collections::HashMap;

use async_trait::async_trait;
use rust_decimal::Decimal;
use uuid::Uuid;

use super::{OffsetRange, OutboxMessage, StoreError};
use crate::domain::{ConversionJob, JobStatus, LedgerPosting};
use crate::providers::ProviderRow;

/// A change to a job, applied only if the job is still in `from`.
#[derive(Debug, Clone)]
pub struct JobUpdate<'a> {
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

    /// Leases up to `limit` unfinished jobs (not waiting for a person) to
    /// `owner`: no other worker drives them until the lease ends.
    async fn lease_jobs(
        &self,
        owner: &str,
        lease: std::time::Duration,
        limit: i64,
    ) -> Result<Vec<ConversionJob>, StoreError>;

    /// Extends `owner`'s lease on `job`; false if the lease is no longer its own.
    async fn renew(
        &self,
        owner: &str,
        job: Uuid,
        lease: std::time::Duration,
    ) -> Result<bool, StoreError>;

    /// Gives a lease back.
    async fn release(&self, owner: &str, job: Uuid) -> Result<(), StoreError>;

    /// Every provider row.
    async fn providers(&self) -> Result<Vec<ProviderRow>, StoreError>;

    /// Today's volume of unfinished jobs per provider.
    async fn in_flight_by_provider(&self) -> Result<HashMap<Uuid, Decimal>, StoreError>;

    /// Stores a job change; false if the job was no longer in `update.from`.
    async fn update_job(&self, update: JobUpdate<'_>) -> Result<bool, StoreError>;

    /// Counts a provider's failure (successes are counted at completion).
    async fn record_provider_failure(&self, provider: Uuid) -> Result<(), StoreError>;

    /// Completes a `provider_completed` job in one transaction: status through
    /// `ledger_updating` to `completed`, buffer balances moved, the posting
    /// stored (once per job, ever) and queued for the ledger topic, and the
    /// provider's success and daily volume counted. False if already done.
    async fn complete_job(
        &self,
        job: &ConversionJob,
        posting: &LedgerPosting,
        message: &OutboxMessage,
    ) -> Result<bool, StoreError>;

    /// A job by id.
    async fn job(&self, id: Uuid) -> Result<Option<ConversionJob>, StoreError>;

    /// Applies an operator's decision to a job in one transaction, if the job
    /// state machine allows it ([`super::operator::decide`]), with a history row.
    async fn operator_change(
        &self,
        id: Uuid,
        action: &super::operator::OperatorAction,
    ) -> Result<super::operator::OperatorOutcome, StoreError>;
}
