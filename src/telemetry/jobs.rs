//! `treasury_job_duration_seconds{direction, provider}`: from the command to
//! the job's final status, observed where the executor stores that status.
//! [`Timed`] wraps the executor's [`JobStore`] and forwards every call; only
//! a write that took effect and left the job final is observed.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::clock::SharedClock;
use crate::domain::{ConversionJob, LedgerPosting};
use crate::providers::ProviderRow;
use crate::providers::health::AttemptOutcome;
use crate::store::jobs::{JobStore, JobUpdate, Lease, LeasedJob};
use crate::store::operator::{OperatorAction, OperatorOutcome};
use crate::store::{OffsetRange, OutboxMessage, StoreError};

/// A [`JobStore`] that times jobs as they end.
pub struct Timed {
    inner: Arc<dyn JobStore>,
    clock: SharedClock,
}

impl Timed {
    /// Wraps `inner`; `clock` says when a job ended.
    pub fn new(inner: Arc<dyn JobStore>, clock: SharedClock) -> Self {
        Self { inner, clock }
    }

    fn observe(&self, job: &ConversionJob) {
        let seconds = (self.clock.now() - job.created_at)
            .to_std()
            .unwrap_or_default()
            .as_secs_f64();
        metrics::histogram!(
            "treasury_job_duration_seconds",
            "direction" => job.direction.as_str(),
            "provider" => job.provider_name.clone().unwrap_or_else(|| "none".to_owned())
        )
        .record(seconds);
    }
}

#[async_trait]
impl JobStore for Timed {
    async fn intake(
        &self,
        group: &str,
        ranges: &[OffsetRange],
        jobs: &[ConversionJob],
        dead_letters: &[OutboxMessage],
    ) -> Result<Vec<Uuid>, StoreError> {
        self.inner.intake(group, ranges, jobs, dead_letters).await
    }

    async fn open_jobs(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        self.inner.open_jobs(now, limit).await
    }

    async fn lease_job(
        &self,
        job: Uuid,
        owner: &str,
        now: DateTime<Utc>,
        lease: std::time::Duration,
    ) -> Result<Option<LeasedJob>, StoreError> {
        self.inner.lease_job(job, owner, now, lease).await
    }

    async fn renew(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        extend: std::time::Duration,
    ) -> Result<bool, StoreError> {
        self.inner.renew(lease, now, extend).await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        self.inner.release(lease).await
    }

    async fn record_call(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        extend: std::time::Duration,
    ) -> Result<bool, StoreError> {
        self.inner.record_call(lease, now, extend).await
    }

    async fn providers(&self) -> Result<Vec<ProviderRow>, StoreError> {
        self.inner.providers().await
    }

    async fn provider_outcomes(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<AttemptOutcome>, StoreError> {
        self.inner.provider_outcomes(since).await
    }

    async fn in_flight_by_provider(&self) -> Result<HashMap<Uuid, Decimal>, StoreError> {
        self.inner.in_flight_by_provider().await
    }

    async fn update_job(&self, update: JobUpdate<'_>) -> Result<bool, StoreError> {
        let job = update.job.clone();
        let stored = self.inner.update_job(update).await?;
        if stored && job.status.is_final() {
            self.observe(&job);
        }
        Ok(stored)
    }

    async fn complete_job(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        job: &ConversionJob,
        posting: &LedgerPosting,
        message: &OutboxMessage,
    ) -> Result<bool, StoreError> {
        let done = self
            .inner
            .complete_job(lease, now, job, posting, message)
            .await?;
        if done {
            self.observe(job);
        }
        Ok(done)
    }

    async fn job(&self, id: Uuid) -> Result<Option<ConversionJob>, StoreError> {
        self.inner.job(id).await
    }

    async fn operator_change(
        &self,
        id: Uuid,
        action: &OperatorAction,
    ) -> Result<OperatorOutcome, StoreError> {
        let outcome = self.inner.operator_change(id, action).await?;
        if let OperatorOutcome::Done { job, .. } = &outcome
            && job.status.is_final()
        {
            self.observe(job);
        }
        Ok(outcome)
    }
}
