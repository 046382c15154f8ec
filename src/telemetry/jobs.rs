//! `treasury_job_duration_seconds{direction, provider}`: from the command to
//! the job's final status, observed where the executor stores that status.
//! [`Timed`] wraps the executor's [`JobStore`] and forwards every call; only
//! a write that took effect and left the job final is observed.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::clock::SharedClock;
use crate::domain::{ConversionJob, LedgerPosting};
use crate::providers::ProviderRow;
use crate::store::jobs::{JobStore, JobUpdate};
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

    async fn lease_jobs(
        &self,
        owner: &str,
        lease: std::time::Duration,
        limit: i64,
    ) -> Result<Vec<ConversionJob>, StoreError> {
        self.inner.lease_jobs(owner, lease, limit).await
    }

    async fn renew(
        &self,
        owner: &str,
        job: Uuid,
        lease: std::time::Duration,
    ) -> Result<bool, StoreError> {
        self.inner.renew(owner, job, lease).await
    }

    async fn release(&self, owner: &str, job: Uuid) -> Result<(), StoreError> {
        self.inner.release(owner, job).await
    }

    async fn providers(&self) -> Result<Vec<ProviderRow>, StoreError> {
        self.inner.providers().await
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

    async fn record_provider_failure(&self, provider: Uuid) -> Result<(), StoreError> {
        self.inner.record_provider_failure(provider).await
    }

    async fn complete_job(
        &self,
        job: &ConversionJob,
        posting: &LedgerPosting,
        message: &OutboxMessage,
    ) -> Result<bool, StoreError> {
        let done = self.inner.complete_job(job, posting, message).await?;
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
