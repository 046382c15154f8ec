//! The job worker: a thin driver around the job policy
//! ([`super::policy`]). Each monitor cycle it lists the open jobs, and for
//! each one takes a lease right before driving it (which reloads the job and
//! increments its lease epoch), asks the policy what to do, does it (a
//! provider call, a stored step) and asks again, until the job waits or ends.
//!
//! Every write of a job is fenced: it carries the lease and is refused once
//! the lease has lapsed or another worker has taken the job (a newer epoch).
//! A refused write stops the worker on that job at once. Before each provider
//! call the worker records the call under its lease (which also extends the
//! lease); if that is refused, no call is made. So a worker that lost its
//! lease makes no further call and no write, and a worker that takes a job
//! over sees every earlier call and holds at that provider instead of
//! choosing another. The lease is renewed in the background while a job is
//! driven; each provider call is bounded by `call_timeout` (shorter than the
//! lease), and a call that outlasts it leaves the outcome unknown.
//!
//! Time comes from one [`SharedClock`]; lease expiry, stale flags and
//! timeouts compare against its readings (passed into the store), never a
//! database clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use uuid::Uuid;

use super::policy::{self, CallError, Calls, Decision, Input, JobFacts, PolicySettings, Review};
use crate::clock::SharedClock;
use crate::codec::Codec;
use crate::codec::records::encode_posting;
use crate::domain::{ConversionJob, JobStatus};
use crate::ledger::{self, Settlement};
use crate::providers::health::track_records;
use crate::providers::selection::{HealthRule, Selection, select_providers};
use crate::providers::{
    ConversionProvider, ConversionRequest, ProviderConversion, ProviderError, ProviderState, Quote,
};
use crate::providers::{ProviderRegistry, ProviderRow};
use crate::shutdown::Shutdown;
use crate::store::jobs::{JobStore, JobUpdate, Lease, Outcome};
use crate::store::{OutboxMessage, StoreError};

/// Settings of the worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// This worker's lease owner name.
    pub owner: String,
    pub postings_topic: String,
    pub max_retries: u32,
    /// First backoff interval (doubles per retry, up to 16 times it).
    pub retry_initial: Duration,
    pub monitor_interval: Duration,
    pub stale_after: chrono::Duration,
    pub conversion_timeout: chrono::Duration,
    /// How long a job lease lasts; renewed every third of it while the job
    /// is driven.
    pub lease: Duration,
    /// Longest wait for one provider call; keep it below `lease`.
    pub call_timeout: Duration,
    /// The window provider health is judged over.
    pub health_window: chrono::Duration,
}

impl WorkerSettings {
    /// The job policy's part of the settings.
    pub fn policy(&self) -> PolicySettings {
        PolicySettings {
            max_retries: self.max_retries,
            retry_initial: self.retry_initial,
            retry_max: self.retry_initial.saturating_mul(16),
            stale_after: self.stale_after,
            conversion_timeout: self.conversion_timeout,
        }
    }
}

/// Drives jobs.
pub struct JobWorker {
    jobs: Arc<dyn JobStore>,
    registry: ProviderRegistry,
    built: Mutex<HashMap<Uuid, Arc<dyn ConversionProvider>>>,
    codec: Codec,
    settings: WorkerSettings,
    clock: SharedClock,
    wake: Arc<Notify>,
}

/// What just happened to the job being driven (owned; the policy's
/// [`Input`] borrows it).
enum Happened {
    Nothing,
    Initiated(Result<ProviderConversion, ProviderError>),
    Polled(Result<ProviderConversion, ProviderError>),
}

impl Happened {
    fn input(&self) -> Input<'_> {
        fn answer(
            r: &Result<ProviderConversion, ProviderError>,
        ) -> Result<&ProviderState, CallError> {
            match r {
                Ok(c) => Ok(&c.state),
                Err(e) => Err(CallError::of(e)),
            }
        }
        match self {
            Happened::Nothing => Input::Nothing,
            Happened::Initiated(r) => Input::Initiated(answer(r)),
            Happened::Polled(r) => Input::Polled(answer(r)),
        }
    }
}

/// How driving a job ended.
enum Driven {
    /// Waiting on its provider until the next cycle; whether it is stale.
    Waiting { stale: bool },
    /// Final, with a person, or no longer this worker's.
    Done,
}

impl JobWorker {
    pub fn new(
        jobs: Arc<dyn JobStore>,
        registry: ProviderRegistry,
        codec: Codec,
        settings: WorkerSettings,
        clock: SharedClock,
    ) -> Self {
        Self {
            jobs,
            registry,
            built: Mutex::new(HashMap::new()),
            codec,
            settings,
            clock,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Notifying this wakes the worker before its next monitor tick.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Runs monitor cycles until shutdown (a job in hand finishes first).
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

    /// One monitor cycle: every open job nobody else holds is leased, driven
    /// as far as it goes and released, one at a time. Returns how many jobs
    /// this worker drove.
    pub async fn run_cycle(&self) -> Result<usize, StoreError> {
        let open = self.jobs.open_jobs(self.clock.now(), 500).await?;
        let mut driven = 0;
        let mut stale = 0;
        for id in open {
            let leased = self
                .jobs
                .lease_job(
                    id,
                    &self.settings.owner,
                    self.clock.now(),
                    self.settings.lease,
                )
                .await?;
            // Another worker took it since the listing.
            let Some(leased) = leased else { continue };
            driven += 1;
            let lease = leased.lease;
            let renewal = self.keep_leased(lease.clone());
            let result = self.drive(leased.job, &lease).await;
            drop(renewal);
            match result {
                Ok(Driven::Waiting { stale: true }) => stale += 1,
                Ok(_) => {}
                Err(e) => tracing::warn!(job = %id, error = %e, "job step failed; will retry"),
            }
            self.jobs.release(&lease).await?;
        }
        metrics::gauge!("treasury_stale_jobs").set(stale as f64);
        Ok(driven)
    }

    /// Renews `lease` every third of its length until the returned guard is
    /// dropped (also when the cycle's future is) or the lease is lost.
    fn keep_leased(&self, lease: Lease) -> Renewal {
        let jobs = self.jobs.clone();
        let clock = self.clock.clone();
        let length = self.settings.lease;
        Renewal(tokio::spawn(async move {
            loop {
                tokio::time::sleep(length / 3).await;
                match jobs.renew(&lease, clock.now(), length).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(job = %lease.job, epoch = lease.epoch, alert = true,
                            "lease on a job in hand was lost; its next write is refused");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(job = %lease.job, error = %e, "lease renewal failed; retrying")
                    }
                }
            }
        }))
    }

    /// Drives one leased job until it waits, ends, or the lease is lost.
    async fn drive(&self, mut job: ConversionJob, lease: &Lease) -> Result<Driven, StoreError> {
        let settings = self.settings.policy();
        // A call recorded by an earlier lease whose answer was never stored:
        // the provider may hold the conversion.
        let mut called_before = job.provider_id.is_some() && job.provider_called_at.is_some();
        let mut calls = Calls::default();
        let mut happened = Happened::Nothing;
        loop {
            let facts = JobFacts {
                called_before,
                ..JobFacts::of(&job)
            };
            let decision = policy::decide(
                &facts,
                &calls,
                happened.input(),
                self.clock.now(),
                &settings,
            );
            let last = std::mem::replace(&mut happened, Happened::Nothing);
            let step = match decision {
                Decision::ChooseProvider => self.choose(&mut job, lease).await?,
                Decision::Call { after } => {
                    if !after.is_zero() {
                        metrics::counter!("treasury_provider_retries_total").increment(1);
                        tokio::time::sleep(after).await;
                    }
                    match self.call(&mut job, lease).await? {
                        Some(answer) => {
                            calls.record(answer.as_ref().map(|_| ()).map_err(CallError::of));
                            happened = Happened::Initiated(answer);
                            Step::Next
                        }
                        None => Step::Stop,
                    }
                }
                Decision::RecordSubmitted => {
                    let Happened::Initiated(Ok(conversion)) = last else {
                        unreachable!("the policy records a submission only after an accepted call")
                    };
                    job.retry_count += calls.made.saturating_sub(1) as i32;
                    let step = self.submitted(&mut job, lease, &conversion).await?;
                    happened = Happened::Polled(Ok(conversion));
                    step
                }
                Decision::Poll => {
                    happened = Happened::Polled(self.poll(&job).await);
                    Step::Next
                }
                Decision::RecordProcessing => {
                    let raw = conversion_raw(last);
                    job.status = JobStatus::ProviderProcessing;
                    let change = Change::note("provider processing").response(raw);
                    self.save(lease, &job, JobStatus::ProviderSubmitted, change)
                        .await?
                }
                Decision::RecordCompleted => {
                    let Happened::Polled(Ok(conversion)) = last else {
                        unreachable!(
                            "the policy records completion only after the provider's answer"
                        )
                    };
                    self.provider_completed(&mut job, lease, conversion).await?
                }
                Decision::Complete => {
                    self.complete(&mut job, lease).await?;
                    return Ok(Driven::Done);
                }
                Decision::Fail { reason } => {
                    tracing::error!(job = %job.id, %reason, alert = true, "conversion failed at the provider");
                    let why = format!("provider failed: {reason}");
                    let change = Change::note(&why)
                        .response(conversion_raw(last))
                        .outcome(failed_attempt(&job));
                    self.end(&mut job, lease, JobStatus::Failed, &why, change)
                        .await?;
                    return Ok(Driven::Done);
                }
                Decision::FallBack => {
                    let Happened::Initiated(Err(error)) = last else {
                        unreachable!("the policy falls back only after a failed call")
                    };
                    called_before = false;
                    let made = calls.made;
                    calls = Calls::default();
                    self.fall_back(&mut job, lease, &error, made).await?
                }
                Decision::Hold => {
                    let Happened::Initiated(Err(error)) = last else {
                        unreachable!("the policy holds only after a failed call")
                    };
                    self.hold(&mut job, lease, &error, calls.made).await?;
                    return Ok(Driven::Waiting { stale: false });
                }
                Decision::FlagStale => {
                    job.stale_flagged_at = Some(self.clock.now());
                    tracing::warn!(job = %job.id, provider = ?job.provider_name, alert = true, "conversion job is stale");
                    self.save(lease, &job, job.status, Change::note("flagged stale"))
                        .await?;
                    return Ok(Driven::Waiting { stale: true });
                }
                Decision::PollLater => {
                    if let Happened::Polled(Err(e)) = &last {
                        tracing::warn!(job = %job.id, provider = ?job.provider_name, error = %e, "status poll failed");
                    }
                    return Ok(Driven::Waiting {
                        stale: job.stale_flagged_at.is_some(),
                    });
                }
                Decision::NeedsReview(review) => {
                    let why = review_reason(&job, review, &last);
                    let change = Change::note(&why).outcome(failed_attempt(&job));
                    self.end(&mut job, lease, JobStatus::NeedsReview, &why, change)
                        .await?;
                    return Ok(Driven::Done);
                }
                Decision::Stop => {
                    if job.status == JobStatus::LedgerUpdating {
                        tracing::error!(job = %job.id, "job found in ledger_updating");
                    }
                    return Ok(Driven::Done);
                }
            };
            if let Step::Stop = step {
                return Ok(Driven::Done);
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

    /// The job's provider row and client.
    async fn job_provider(
        &self,
        job: &ConversionJob,
    ) -> Result<(ProviderRow, Arc<dyn ConversionProvider>), ProviderError> {
        let rows = self
            .jobs
            .providers()
            .await
            .map_err(|e| ProviderError::Retryable {
                reason: format!("provider rows unavailable: {e}"),
                retry_after_ms: None,
            })?;
        let row = job
            .provider_id
            .and_then(|id| rows.into_iter().find(|r| r.id == id))
            .ok_or_else(|| {
                ProviderError::Configuration(format!(
                    "the job's provider {:?} has no row",
                    job.provider_name
                ))
            })?;
        let client = self.provider(&row)?;
        Ok((row, client))
    }

    /// Stores `job` (read in status `from`) under the lease, with `change`
    /// for the history; [`Step::Stop`] when the write is refused.
    async fn save(
        &self,
        lease: &Lease,
        job: &ConversionJob,
        from: JobStatus,
        change: Change<'_>,
    ) -> Result<Step, StoreError> {
        let saved = self
            .jobs
            .update_job(JobUpdate {
                lease,
                now: self.clock.now(),
                job,
                from,
                note: change.note,
                provider_response: change.response,
                selection_reason: change.reason,
                outcome: change.outcome,
            })
            .await?;
        if saved {
            Ok(Step::Next)
        } else {
            lost(lease);
            Ok(Step::Stop)
        }
    }

    /// `pending` at no provider: choose one among those not given up on and
    /// record the choice under the lease, or fail with none left.
    async fn choose(&self, job: &mut ConversionJob, lease: &Lease) -> Result<Step, StoreError> {
        let rows = self.jobs.providers().await?;
        let now = self.clock.now();
        let outcomes = self
            .jobs
            .provider_outcomes(now - self.settings.health_window)
            .await?;
        let records = track_records(&outcomes, now, self.settings.health_window);
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
            &records,
            &HealthRule::default(),
        );
        let quotes = self.quotes(&selection, job).await;
        let selection = selection.by_quotes(job.amount.value, &quotes);
        let summary = selection.summary();
        let Some(chosen) = selection.chosen() else {
            // Name the providers already given up on and the last error, not
            // only the (possibly empty) remaining candidates.
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
            tracing::error!(job = %job.id, reason = %why, alert = true, "conversion job failed");
            self.end(job, lease, JobStatus::Failed, &why, Change::note(&why))
                .await?;
            return Ok(Step::Stop);
        };
        tracing::info!(job = %job.id, provider = %chosen.row.name, reason = %summary, "provider selected");
        job.provider_id = Some(chosen.row.id);
        job.provider_name = Some(chosen.row.name.clone());
        job.provider_called_at = None;
        let change = Change::note("provider selected").reason(summary);
        self.save(lease, job, JobStatus::Pending, change).await
    }

    /// Asks every eligible provider for its price for `job`, all at once,
    /// each bounded by `call_timeout`. A quote moves no money, so a failed
    /// one only ranks that provider after those that priced.
    async fn quotes(
        &self,
        selection: &Selection,
        job: &ConversionJob,
    ) -> HashMap<Uuid, Result<Quote, String>> {
        let asks = selection.eligible.iter().map(|p| async move {
            let answer = match self.provider(&p.row) {
                Ok(client) => match tokio::time::timeout(
                    self.settings.call_timeout,
                    client.quote(job.direction, job.amount),
                )
                .await
                {
                    Ok(Ok(quote)) => Ok(quote),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!(
                        "no quote within {}",
                        humantime::format_duration(self.settings.call_timeout)
                    )),
                },
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = &answer {
                tracing::info!(job = %job.id, provider = %p.row.name, error = %e, "no quote");
            }
            (p.row.id, answer)
        });
        futures::future::join_all(asks).await.into_iter().collect()
    }

    /// Records the call under the lease, then calls initiate (bounded by
    /// `call_timeout`). None: the lease is lost and no call was made.
    async fn call(
        &self,
        job: &mut ConversionJob,
        lease: &Lease,
    ) -> Result<Option<Result<ProviderConversion, ProviderError>>, StoreError> {
        let now = self.clock.now();
        if !self
            .jobs
            .record_call(lease, now, self.settings.lease)
            .await?
        {
            lost(lease);
            return Ok(None);
        }
        job.provider_called_at = Some(now);
        let client = match self.job_provider(job).await {
            Ok((_, client)) => client,
            Err(e) => return Ok(Some(Err(e))),
        };
        let request = ConversionRequest {
            idempotency_key: job.id,
            direction: job.direction,
            amount: job.amount,
        };
        let answer =
            match tokio::time::timeout(self.settings.call_timeout, client.initiate(&request)).await
            {
                Ok(answer) => answer,
                Err(_) => Err(ProviderError::OutcomeUnknown {
                    reason: format!(
                        "no answer within {}",
                        humantime::format_duration(self.settings.call_timeout)
                    ),
                }),
            };
        if let Err(e) = &answer {
            tracing::info!(job = %job.id, provider = ?job.provider_name, error = %e, "provider call failed");
        }
        Ok(Some(answer))
    }

    /// Asks the job's provider for the conversion's state (bounded by `call_timeout`).
    async fn poll(&self, job: &ConversionJob) -> Result<ProviderConversion, ProviderError> {
        let (_, client) = self.job_provider(job).await?;
        let tx_id = job.provider_tx_id.clone().unwrap_or_default();
        match tokio::time::timeout(self.settings.call_timeout, client.status(&tx_id)).await {
            Ok(answer) => answer,
            Err(_) => Err(ProviderError::Retryable {
                reason: "status poll timed out".into(),
                retry_after_ms: None,
            }),
        }
    }

    /// The provider accepted the conversion.
    async fn submitted(
        &self,
        job: &mut ConversionJob,
        lease: &Lease,
        conversion: &ProviderConversion,
    ) -> Result<Step, StoreError> {
        job.provider_tx_id = Some(conversion.provider_tx_id.clone());
        job.submitted_at = Some(self.clock.now());
        job.status = JobStatus::ProviderSubmitted;
        let note = format!(
            "submitted to {} as {}",
            job.provider_name.as_deref().unwrap_or("?"),
            conversion.provider_tx_id
        );
        let change = Change::note(&note).response(Some(conversion.raw.clone()));
        self.save(lease, job, JobStatus::Pending, change).await
    }

    async fn provider_completed(
        &self,
        job: &mut ConversionJob,
        lease: &Lease,
        conversion: ProviderConversion,
    ) -> Result<Step, StoreError> {
        let ProviderState::Completed {
            destination_amount,
            fee,
            rate,
        } = conversion.state
        else {
            unreachable!("recorded only for a completed conversion")
        };
        let from = job.status;
        job.destination_amount = Some(destination_amount);
        job.fee = Some(fee);
        // Amounts stay exact; the rate is kept at the 10 places the ledger
        // schema and the database carry.
        job.exchange_rate = Some(rate.round_dp_with_strategy(
            crate::codec::records::RATE_SCALE,
            rust_decimal::RoundingStrategy::MidpointNearestEven,
        ));
        job.status = JobStatus::ProviderCompleted;
        let note =
            format!("provider completed: {destination_amount} received, fee {fee}, rate {rate}");
        self.save(
            lease,
            job,
            from,
            Change::note(&note).response(Some(conversion.raw)),
        )
        .await
    }

    /// The provider did nothing with the job: give it up and choose the next.
    async fn fall_back(
        &self,
        job: &mut ConversionJob,
        lease: &Lease,
        error: &ProviderError,
        calls: u32,
    ) -> Result<Step, StoreError> {
        let name = job.provider_name.clone().unwrap_or_default();
        let outcome = failed_attempt(job);
        job.retry_count += calls.saturating_sub(1) as i32;
        job.attempted_providers.extend(job.provider_id);
        job.provider_id = None;
        job.provider_name = None;
        job.provider_called_at = None;
        job.error_message = Some(format!("{name}: {error}"));
        tracing::warn!(job = %job.id, provider = %name, %error, calls,
            "provider gave up; falling back to the next one");
        let note = format!("{name} failed after {calls} attempts: {error}");
        self.save(
            lease,
            job,
            JobStatus::Pending,
            Change::note(&note).outcome(outcome),
        )
        .await
    }

    /// The provider may hold a conversion for this job, so the job stays
    /// with it: the same call, the same key, next monitor cycle.
    async fn hold(
        &self,
        job: &mut ConversionJob,
        lease: &Lease,
        error: &ProviderError,
        calls: u32,
    ) -> Result<Step, StoreError> {
        let name = job.provider_name.clone().unwrap_or_default();
        job.retry_count += calls.saturating_sub(1) as i32;
        job.error_message = Some(format!("{name}: {error}"));
        metrics::counter!("treasury_jobs_held_total").increment(1);
        tracing::warn!(job = %job.id, provider = %name, %error, calls,
            "provider may have acted without answering; holding the job there (no fallback)");
        let note = format!(
            "held at {name}: outcome unknown after {calls} attempts ({error}); asking again next cycle"
        );
        self.save(lease, job, JobStatus::Pending, Change::note(&note))
            .await
    }

    /// Ends the job's drive in `status` (`failed`, or `needs_review` for a
    /// person), with `why` as its error message and note.
    async fn end(
        &self,
        job: &mut ConversionJob,
        lease: &Lease,
        status: JobStatus,
        why: &str,
        change: Change<'_>,
    ) -> Result<Step, StoreError> {
        let from = job.status;
        job.status = status;
        job.error_message = Some(why.to_owned());
        if status == JobStatus::NeedsReview {
            metrics::counter!("treasury_jobs_needs_review_total").increment(1);
            tracing::error!(job = %job.id, reason = why, alert = true, "conversion job needs a person");
        } else {
            metrics::counter!("treasury_jobs_failed_total").increment(1);
        }
        self.save(
            lease,
            job,
            from,
            Change {
                note: why,
                ..change
            },
        )
        .await
    }

    /// `provider_completed`: the posting, balances and completion, in one transaction.
    async fn complete(&self, job: &mut ConversionJob, lease: &Lease) -> Result<(), StoreError> {
        let (Some(destination_amount), Some(fee), Some(rate)) =
            (job.destination_amount, job.fee, job.exchange_rate)
        else {
            tracing::error!(job = %job.id, alert = true, "completed at the provider without amounts");
            return Ok(());
        };
        let settled = Settlement {
            destination_amount,
            fee,
            rate,
        };
        let now = self.clock.now();
        let posting = match ledger::posting_for(job, &settled, now) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, alert = true, "ledger posting refused; job left for reconciliation");
                return Ok(());
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
        if self
            .jobs
            .complete_job(lease, now, job, &posting, &message)
            .await?
        {
            job.status = JobStatus::Completed;
            metrics::counter!("treasury_jobs_completed_total").increment(1);
            tracing::info!(job = %job.id, posting = %posting.posting_id, "conversion completed and posted");
        } else {
            lost(lease);
        }
        Ok(())
    }
}

/// What a stored step says for the audit trail and provider health.
struct Change<'a> {
    /// The history note.
    note: &'a str,
    /// The provider's answer, kept on the job.
    response: Option<serde_json::Value>,
    /// Why the provider was chosen.
    reason: Option<String>,
    /// How the job's attempt at its provider ended, if it did.
    outcome: Option<Outcome>,
}

impl<'a> Change<'a> {
    fn note(note: &'a str) -> Self {
        Self {
            note,
            response: None,
            reason: None,
            outcome: None,
        }
    }

    fn response(self, response: Option<serde_json::Value>) -> Self {
        Self { response, ..self }
    }

    fn reason(self, reason: String) -> Self {
        Self {
            reason: Some(reason),
            ..self
        }
    }

    fn outcome(self, outcome: Option<Outcome>) -> Self {
        Self { outcome, ..self }
    }
}

/// Stops renewing a lease when dropped.
struct Renewal(tokio::task::JoinHandle<()>);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether the step's write went through.
enum Step {
    /// Stored (or nothing to store): ask the policy again.
    Next,
    /// Refused, or nothing more to do: stop driving the job.
    Stop,
}

fn lost(lease: &Lease) {
    tracing::warn!(job = %lease.job, owner = %lease.owner, epoch = lease.epoch,
        "job write refused: the lease lapsed, another worker took the job, or it changed; stopping before any further provider call");
}

/// A failed attempt at the job's provider, for its health.
fn failed_attempt(job: &ConversionJob) -> Option<Outcome> {
    job.provider_id.map(|provider| Outcome {
        provider,
        succeeded: false,
    })
}

/// The provider's raw answer carried by the last input, for the audit trail.
fn conversion_raw(last: Happened) -> Option<serde_json::Value> {
    match last {
        Happened::Initiated(Ok(c)) | Happened::Polled(Ok(c)) => Some(c.raw),
        _ => None,
    }
}

/// The message a person reads on a job in `needs_review`.
fn review_reason(job: &ConversionJob, review: Review, last: &Happened) -> String {
    let name = job.provider_name.as_deref().unwrap_or("the provider");
    match review {
        Review::MayHoldConversion { waited, .. } => {
            let error = match last {
                Happened::Initiated(Err(e)) => e.to_string(),
                _ => "no answer".into(),
            };
            format!(
                "{name} may hold conversion {} (a call went unanswered) but its last answer, {} after the command, was: {error}; \
                 check at {name} whether it executed before resolving",
                job.id,
                readable(waited),
            )
        }
        Review::NoFinalAnswer { waited } => format!(
            "no final answer from the provider after {}; check at the provider before acting",
            readable(waited)
        ),
        Review::NothingToAsk => "job at a provider without a provider or transaction id".into(),
    }
}

/// A duration for people, to the second ("31m 4s").
fn readable(d: chrono::Duration) -> String {
    let seconds = d.num_seconds().max(0).unsigned_abs();
    humantime::format_duration(Duration::from_secs(seconds)).to_string()
}
