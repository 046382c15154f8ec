//! The job worker: leases unfinished jobs and drives each through the status
//! machine. Every step is stored before the next one starts, and the provider
//! is always called with the job id as idempotency key, so a worker killed at
//! any point and restarted repeats at most a call the provider deduplicates.
//!
//! - `pending`: choose a provider (stored on the job *before* calling it),
//!   initiate, retrying retryable errors with exponential backoff up to
//!   `TREASURY_MAX_RETRIES`, then fall back to the next provider; with none
//!   left the job is `failed`. Fallback happens only when the provider cannot
//!   have acted on the job: if any call went unanswered (a timeout after
//!   sending, HTTP 500/502/504, an unreadable answer) or an earlier worker
//!   called it before dying, the job is *held* at that provider and the same
//!   call (same idempotency key) is repeated each monitor cycle until it
//!   answers; a final refusal, or `TREASURY_CONVERSION_TIMEOUT` since the
//!   command, hands it to a person (`needs_review`). A command is never
//!   executed at two providers.
//! - `provider_submitted` / `provider_processing`: poll once per monitor
//!   cycle; flag stale after `TREASURY_STALE_AFTER`; after
//!   `TREASURY_CONVERSION_TIMEOUT` move to `needs_review` (money may have
//!   moved: a person decides, nothing is retried automatically).
//! - `provider_completed`: post the ledger entries and complete, in one transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backoff::ExponentialBackoff;
use chrono::Utc;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::codec::Codec;
use crate::codec::records::encode_posting;
use crate::domain::{ConversionJob, JobStatus};
use crate::ledger::{self, Settlement};
use crate::providers::selection::{HealthRule, select_providers};
use crate::providers::{
    ConversionProvider, ConversionRequest, ProviderConversion, ProviderError, ProviderState,
};
use crate::providers::{ProviderRegistry, ProviderRow};
use crate::shutdown::Shutdown;
use crate::store::jobs::{JobStore, JobUpdate};
use crate::store::{OutboxMessage, StoreError};

/// Settings of the worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// This worker's lease owner name.
    pub owner: String,
    pub postings_topic: String,
    pub max_retries: u32,
    /// First backoff interval (doubles per retry).
    pub retry_initial: Duration,
    pub monitor_interval: Duration,
    pub stale_after: chrono::Duration,
    pub conversion_timeout: chrono::Duration,
}

/// Drives jobs.
pub struct JobWorker {
    jobs: Arc<dyn JobStore>,
    registry: ProviderRegistry,
    built: Mutex<HashMap<Uuid, Arc<dyn ConversionProvider>>>,
    codec: Codec,
    settings: WorkerSettings,
    wake: Arc<Notify>,
}

/// Why the initiate calls at one provider gave up.
struct InitiateFailure {
    /// The last error.
    error: ProviderError,
    /// Calls made.
    attempts: u32,
    /// Whether any of the calls may have been acted on by the provider.
    may_have_acted: bool,
}

/// What a step did to a job.
enum Progress {
    /// Moved on; drive it again now.
    Moved,
    /// Waiting on the provider; look again next monitor cycle.
    Waiting,
    /// Nothing more to do (final, or needs a person).
    Done,
}

impl JobWorker {
    pub fn new(
        jobs: Arc<dyn JobStore>,
        registry: ProviderRegistry,
        codec: Codec,
        settings: WorkerSettings,
    ) -> Self {
        Self {
            jobs,
            registry,
            built: Mutex::new(HashMap::new()),
            codec,
            settings,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Notifying this wakes the worker before its next monitor tick.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Runs monitor cycles until shutdown (a cycle in hand finishes first).
    pub async fn run(self, mut shutdown: Shutdown) {
        while !shutdown.is_triggered() {
            if let Err(e) = self.run_cycle().await {
                tracing::warn!(error = %e, "job cycle failed; retrying next cycle");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.monitor_interval) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.triggered() => {}
            }
        }
    }

    /// One monitor cycle: lease unfinished jobs and drive each as far as it goes.
    pub async fn run_cycle(&self) -> Result<usize, StoreError> {
        let lease = self.settings.monitor_interval.max(Duration::from_secs(30)) * 2;
        let leased = self
            .jobs
            .lease_jobs(&self.settings.owner, lease, 50)
            .await?;
        let count = leased.len();
        let mut stale = 0;
        for job in leased {
            let id = job.id;
            // Provider calls with retries can outlast a lease: keep it renewed
            // while this worker drives the job, so no other worker takes it.
            let renewal = self.keep_leased(id, lease);
            let driven = self.drive(job).await;
            renewal.abort();
            match driven {
                Ok(true) => stale += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(job = %id, error = %e, "job step failed; will retry"),
            }
            self.jobs.release(&self.settings.owner, id).await?;
        }
        metrics::gauge!("treasury_stale_jobs").set(stale as f64);
        Ok(count)
    }

    /// Renews the lease on `job` every third of `lease` until aborted.
    fn keep_leased(&self, job: Uuid, lease: Duration) -> tokio::task::JoinHandle<()> {
        let jobs = self.jobs.clone();
        let owner = self.settings.owner.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 3).await;
                match jobs.renew(&owner, job, lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(%job, alert = true, "lease on a job in hand was lost");
                        return;
                    }
                    Err(e) => tracing::warn!(%job, error = %e, "lease renewal failed; retrying"),
                }
            }
        })
    }

    /// Drives one job until it waits or ends; returns whether it is stale.
    async fn drive(&self, mut job: ConversionJob) -> Result<bool, StoreError> {
        loop {
            let progress = match job.status {
                JobStatus::Pending => self.submit(&mut job).await?,
                JobStatus::ProviderSubmitted | JobStatus::ProviderProcessing => {
                    self.poll(&mut job).await?
                }
                JobStatus::ProviderCompleted => self.complete(&mut job).await?,
                JobStatus::LedgerUpdating => {
                    // Completion is one transaction; a job is never left here.
                    tracing::error!(job = %job.id, "job found in ledger_updating");
                    Progress::Done
                }
                _ => Progress::Done,
            };
            match progress {
                Progress::Moved => continue,
                Progress::Waiting => return Ok(job.stale_flagged_at.is_some()),
                Progress::Done => return Ok(false),
            }
        }
    }

    fn provider(&self, row: &ProviderRow) -> Result<Arc<dyn ConversionProvider>, ProviderError> {
        let mut built = self.built.lock().expect("provider cache");
        if let Some(p) = built.get(&row.id) {
            return Ok(p.clone());
        }
        let provider = self.registry.build(row)?;
        built.insert(row.id, provider.clone());
        Ok(provider)
    }

    async fn save(
        &self,
        job: &ConversionJob,
        from: JobStatus,
        note: &str,
        response: Option<serde_json::Value>,
        reason: Option<String>,
    ) -> Result<bool, StoreError> {
        let saved = self
            .jobs
            .update_job(JobUpdate {
                job,
                from,
                note,
                provider_response: response,
                selection_reason: reason,
            })
            .await?;
        if !saved {
            tracing::warn!(job = %job.id, "job changed under this worker; leaving it");
        }
        Ok(saved)
    }

    /// `pending`: pick a provider, record it, initiate (with retries), or fall back.
    async fn submit(&self, job: &mut ConversionJob) -> Result<Progress, StoreError> {
        let rows = self.jobs.providers().await?;
        // Whether a call for this job may already have reached the chosen
        // provider (an earlier worker chose it, maybe called it, and stopped).
        let mut called_before = false;
        let row = match job
            .provider_id
            .and_then(|id| rows.iter().find(|r| r.id == id))
        {
            // Chosen before a crash or a hold: call the same provider again
            // with the same key.
            Some(row) if !job.attempted_providers.contains(&row.id) => {
                called_before = true;
                row.clone()
            }
            _ => {
                let candidates: Vec<ProviderRow> = rows
                    .iter()
                    .filter(|r| !job.attempted_providers.contains(&r.id))
                    .cloned()
                    .collect();
                let in_flight = self.jobs.in_flight_by_provider().await?;
                let selection = select_providers(
                    &candidates,
                    job.direction,
                    job.amount.value,
                    &in_flight,
                    &HealthRule::default(),
                );
                let summary = selection.summary();
                let Some(chosen) = selection.chosen() else {
                    // Name the providers already given up on and the last
                    // error, not only the (possibly empty) remaining candidates.
                    let tried: Vec<&str> = job
                        .attempted_providers
                        .iter()
                        .filter_map(|id| rows.iter().find(|r| r.id == *id))
                        .map(|r| r.name.as_str())
                        .collect();
                    let mut why = format!("no provider left: {summary}");
                    if !tried.is_empty() {
                        why.push_str(&format!("; tried {}", tried.join(", ")));
                    }
                    if let Some(last) = &job.error_message {
                        why.push_str(&format!("; last error: {last}"));
                    }
                    return self.fail(job, why).await;
                };
                let row = chosen.row.clone();
                tracing::info!(job = %job.id, provider = %row.name, reason = %summary, "provider selected");
                job.provider_id = Some(row.id);
                job.provider_name = Some(row.name.clone());
                if !self
                    .save(
                        job,
                        JobStatus::Pending,
                        "provider selected",
                        None,
                        Some(summary),
                    )
                    .await?
                {
                    return Ok(Progress::Done);
                }
                row
            }
        };
        let outcome = match self.provider(&row) {
            Ok(provider) => self.initiate(provider.as_ref(), job).await,
            Err(error) => Err(InitiateFailure {
                error,
                attempts: 0,
                may_have_acted: false,
            }),
        };
        match outcome {
            Ok((conversion, attempts)) => {
                job.retry_count += attempts.saturating_sub(1) as i32;
                job.provider_tx_id = Some(conversion.provider_tx_id.clone());
                job.submitted_at = Some(Utc::now());
                job.status = JobStatus::ProviderSubmitted;
                let note = format!("submitted to {} as {}", row.name, conversion.provider_tx_id);
                if !self
                    .save(
                        job,
                        JobStatus::Pending,
                        &note,
                        Some(conversion.raw.clone()),
                        None,
                    )
                    .await?
                {
                    return Ok(Progress::Done);
                }
                self.apply_state(job, conversion).await
            }
            Err(failure) if called_before || failure.may_have_acted => {
                self.hold(job, &row, failure).await
            }
            Err(InitiateFailure {
                error, attempts, ..
            }) => {
                job.retry_count += attempts.saturating_sub(1) as i32;
                job.attempted_providers.push(row.id);
                job.provider_id = None;
                job.provider_name = None;
                job.error_message = Some(format!("{}: {error}", row.name));
                self.jobs.record_provider_failure(row.id).await?;
                tracing::warn!(job = %job.id, provider = %row.name, %error, attempts,
                    "provider gave up; falling back to the next one");
                let note = format!("{} failed after {attempts} attempts: {error}", row.name);
                if !self
                    .save(job, JobStatus::Pending, &note, None, None)
                    .await?
                {
                    return Ok(Progress::Done);
                }
                Ok(Progress::Moved)
            }
        }
    }

    /// The provider may hold a conversion for this job, so the job stays with
    /// it: a retryable failure waits for the next monitor cycle (the same call,
    /// the same key); a final one, or one past the conversion timeout, goes to
    /// a person.
    async fn hold(
        &self,
        job: &mut ConversionJob,
        row: &ProviderRow,
        failure: InitiateFailure,
    ) -> Result<Progress, StoreError> {
        let InitiateFailure {
            error, attempts, ..
        } = failure;
        job.retry_count += attempts.saturating_sub(1) as i32;
        self.jobs.record_provider_failure(row.id).await?;
        let waited = Utc::now() - job.created_at;
        if !error.is_retryable() || waited >= self.settings.conversion_timeout {
            let why = format!(
                "{} may hold conversion {} (a call went unanswered) but its last answer, {} after the command, was: {error}; \
                 check at {} whether it executed before resolving",
                row.name,
                job.id,
                readable(waited),
                row.name
            );
            return self.needs_review(job, &why).await;
        }
        job.error_message = Some(format!("{}: {error}", row.name));
        metrics::counter!("treasury_jobs_held_total").increment(1);
        tracing::warn!(job = %job.id, provider = %row.name, %error, attempts,
            "provider may have acted without answering; holding the job there (no fallback)");
        let note = format!(
            "held at {}: outcome unknown after {attempts} attempts ({error}); asking again next cycle",
            row.name
        );
        Ok(
            if self
                .save(job, JobStatus::Pending, &note, None, None)
                .await?
            {
                Progress::Waiting
            } else {
                Progress::Done
            },
        )
    }

    /// Initiates with retries on retryable errors; returns the number of
    /// attempts with the conversion, or why it gave up.
    async fn initiate(
        &self,
        provider: &dyn ConversionProvider,
        job: &ConversionJob,
    ) -> Result<(ProviderConversion, u32), InitiateFailure> {
        let request = ConversionRequest {
            idempotency_key: job.id,
            direction: job.direction,
            amount: job.amount,
        };
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let unanswered = std::sync::atomic::AtomicBool::new(false);
        let policy = ExponentialBackoff {
            initial_interval: self.settings.retry_initial,
            max_interval: self.settings.retry_initial * 16,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        let max = self.settings.max_retries + 1;
        let result = backoff::future::retry(policy, || async {
            let n = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let answer = provider.initiate(&request).await;
            if answer.as_ref().is_err_and(ProviderError::may_have_acted) {
                unanswered.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            match answer {
                Ok(c) => Ok(c),
                Err(e) if e.is_retryable() && n < max => {
                    tracing::info!(job = %job.id, attempt = n, error = %e, "retrying provider call");
                    metrics::counter!("treasury_provider_retries_total").increment(1);
                    Err(backoff::Error::transient(e))
                }
                Err(e) => Err(backoff::Error::permanent(e)),
            }
        })
        .await;
        let attempts = attempts.load(std::sync::atomic::Ordering::SeqCst);
        result
            .map(|c| (c, attempts))
            .map_err(|error| InitiateFailure {
                error,
                attempts,
                may_have_acted: unanswered.load(std::sync::atomic::Ordering::SeqCst),
            })
    }

    /// `provider_submitted` / `provider_processing`: ask the provider.
    async fn poll(&self, job: &mut ConversionJob) -> Result<Progress, StoreError> {
        let rows = self.jobs.providers().await?;
        let (Some(row), Some(tx_id)) = (
            job.provider_id
                .and_then(|id| rows.into_iter().find(|r| r.id == id)),
            job.provider_tx_id.clone(),
        ) else {
            return self
                .needs_review(
                    job,
                    "job at a provider without a provider or transaction id",
                )
                .await;
        };
        let polled = match self.provider(&row) {
            Ok(provider) => provider.status(&tx_id).await,
            Err(e) => Err(e),
        };
        match polled {
            Ok(conversion) => {
                let from = job.status;
                let progress = self.apply_state(job, conversion).await?;
                if job.status == from {
                    return self.check_age(job).await;
                }
                Ok(progress)
            }
            Err(e) => {
                tracing::warn!(job = %job.id, provider = %row.name, error = %e, "status poll failed");
                self.check_age(job).await
            }
        }
    }

    /// Moves the job to match the provider's view.
    async fn apply_state(
        &self,
        job: &mut ConversionJob,
        conversion: ProviderConversion,
    ) -> Result<Progress, StoreError> {
        let from = job.status;
        match conversion.state {
            ProviderState::Submitted => Ok(Progress::Waiting),
            ProviderState::Processing if from == JobStatus::ProviderSubmitted => {
                job.status = JobStatus::ProviderProcessing;
                self.saved(job, from, "provider processing", Some(conversion.raw))
                    .await
            }
            ProviderState::Processing => Ok(Progress::Waiting),
            ProviderState::Completed {
                destination_amount,
                fee,
                rate,
            } => {
                job.destination_amount = Some(destination_amount);
                job.fee = Some(fee);
                // Amounts stay exact; the rate is kept at the 10 places the
                // ledger schema and the database carry.
                job.exchange_rate = Some(rate.round_dp_with_strategy(
                    crate::codec::records::RATE_SCALE,
                    rust_decimal::RoundingStrategy::MidpointNearestEven,
                ));
                job.status = JobStatus::ProviderCompleted;
                let note = format!(
                    "provider completed: {destination_amount} received, fee {fee}, rate {rate}"
                );
                self.saved(job, from, &note, Some(conversion.raw)).await
            }
            ProviderState::Failed { reason } => {
                if let Some(p) = job.provider_id {
                    self.jobs.record_provider_failure(p).await?;
                }
                job.error_message = Some(reason.clone());
                job.status = JobStatus::Failed;
                metrics::counter!("treasury_jobs_failed_total").increment(1);
                tracing::error!(job = %job.id, %reason, alert = true, "conversion failed at the provider");
                self.saved(
                    job,
                    from,
                    &format!("provider failed: {reason}"),
                    Some(conversion.raw),
                )
                .await
            }
        }
    }

    async fn saved(
        &self,
        job: &ConversionJob,
        from: JobStatus,
        note: &str,
        response: Option<serde_json::Value>,
    ) -> Result<Progress, StoreError> {
        Ok(if self.save(job, from, note, response, None).await? {
            Progress::Moved
        } else {
            Progress::Done
        })
    }

    /// Flags a job stale, or hands it to a person after the conversion timeout.
    async fn check_age(&self, job: &mut ConversionJob) -> Result<Progress, StoreError> {
        let Some(submitted) = job.submitted_at else {
            return Ok(Progress::Waiting);
        };
        let waited = Utc::now() - submitted;
        if waited >= self.settings.conversion_timeout {
            return self
                .needs_review(job, &format!("no final answer from the provider after {}; check at the provider before acting", readable(waited)))
                .await;
        }
        if waited >= self.settings.stale_after && job.stale_flagged_at.is_none() {
            job.stale_flagged_at = Some(Utc::now());
            tracing::warn!(job = %job.id, provider = ?job.provider_name, %waited, alert = true, "conversion job is stale");
            self.save(job, job.status, "flagged stale", None, None)
                .await?;
        }
        Ok(Progress::Waiting)
    }

    async fn needs_review(
        &self,
        job: &mut ConversionJob,
        why: &str,
    ) -> Result<Progress, StoreError> {
        let from = job.status;
        job.status = JobStatus::NeedsReview;
        job.error_message = Some(why.to_owned());
        metrics::counter!("treasury_jobs_needs_review_total").increment(1);
        tracing::error!(job = %job.id, reason = why, alert = true, "conversion job needs a person");
        self.save(job, from, why, None, None).await?;
        Ok(Progress::Done)
    }

    async fn fail(&self, job: &mut ConversionJob, why: String) -> Result<Progress, StoreError> {
        let from = job.status;
        job.status = JobStatus::Failed;
        job.error_message = Some(why.clone());
        metrics::counter!("treasury_jobs_failed_total").increment(1);
        tracing::error!(job = %job.id, reason = %why, alert = true, "conversion job failed");
        self.save(job, from, &why, None, None).await?;
        Ok(Progress::Done)
    }

    /// `provider_completed`: the posting, balances and completion, in one transaction.
    async fn complete(&self, job: &mut ConversionJob) -> Result<Progress, StoreError> {
        let (Some(destination_amount), Some(fee), Some(rate)) =
            (job.destination_amount, job.fee, job.exchange_rate)
        else {
            tracing::error!(job = %job.id, alert = true, "completed at the provider without amounts");
            return Ok(Progress::Done);
        };
        let settled = Settlement {
            destination_amount,
            fee,
            rate,
        };
        let posting = match ledger::posting_for(job, &settled, Utc::now()) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, alert = true, "ledger posting refused; job left for reconciliation");
                return Ok(Progress::Done);
            }
        };
        let payload = encode_posting(&self.codec, &posting)
            .map_err(|e| StoreError::Corrupt(format!("posting does not encode: {e}")))?;
        let message = OutboxMessage {
            id: posting.posting_id,
            topic: self.settings.postings_topic.clone(),
            key: Some(job.id.to_string()),
            payload,
            headers: vec![
                ("message-id".into(), posting.posting_id.to_string()),
                ("idempotency-key".into(), posting.idempotency_key.clone()),
            ],
        };
        if self.jobs.complete_job(job, &posting, &message).await? {
            job.status = JobStatus::Completed;
            metrics::counter!("treasury_jobs_completed_total").increment(1);
            tracing::info!(job = %job.id, posting = %posting.posting_id, "conversion completed and posted");
        }
        Ok(Progress::Done)
    }
}

/// A duration for people, to the second ("31m 4s").
fn readable(d: chrono::Duration) -> String {
    let seconds = d.num_seconds().max(0).unsigned_abs();
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}
