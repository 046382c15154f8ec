//! The executor's job policy: given where a job stands, what just happened to
//! it and the time, what the worker does next.
//!
//! Pure and synchronous: no IO, no clock, no randomness. [`decide`] takes the
//! job's [`JobFacts`], this lease's [`Calls`] at the job's provider, one
//! [`Input`] and `now`, and returns a [`Decision`]. The worker
//! (`executor/worker.rs`) is a driver around it: it carries out the decision
//! (a provider call, a stored step), turns the result into the next input and
//! asks again. `treasury simulate` drives the same function on simulated time.
//!
//! The rules:
//! - A job at no provider chooses one; a provider that answered only "nothing
//!   done" errors (after `max_retries` retries with exponential backoff) or a
//!   final refusal is given up on and the job falls back to the next one.
//! - **Sticky**: a job whose call at a provider may have been acted on (an
//!   unknown outcome in this lease, or a call recorded by an earlier lease
//!   whose answer was never stored) is *held* there: the same call with the
//!   same idempotency key is repeated each monitor cycle, never moved to
//!   another provider. A final refusal while held, or the conversion timeout
//!   since the command, hands it to a person (`needs_review`).
//! - At a provider, the job follows the provider's state; a job with no final
//!   answer is flagged stale after `stale_after` and handed to a person after
//!   `conversion_timeout` since it was submitted.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::domain::{ConversionJob, JobStatus};
use crate::providers::{ProviderError, ProviderState};

/// What the policy is tuned by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicySettings {
    /// Retries of a retryable error at one provider within one lease.
    pub max_retries: u32,
    /// First backoff delay; doubles per retry.
    pub retry_initial: Duration,
    /// Longest backoff delay.
    pub retry_max: Duration,
    /// A job at a provider this long after submission is flagged stale.
    pub stale_after: chrono::Duration,
    /// After this (since submission, or since the command for a held job)
    /// the job goes to a person.
    pub conversion_timeout: chrono::Duration,
}

/// What the policy reads of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobFacts {
    pub status: JobStatus,
    /// A provider is chosen for the job.
    pub provider_chosen: bool,
    /// A call at the chosen provider was recorded by an earlier lease and its
    /// answer never stored: the provider may hold the conversion.
    pub called_before: bool,
    /// The provider's transaction id is known.
    pub provider_tx_known: bool,
    pub created_at: DateTime<Utc>,
    pub submitted_at: Option<DateTime<Utc>>,
    pub stale_flagged: bool,
}

impl JobFacts {
    /// The facts of a job as stored (read when it was leased).
    pub fn of(job: &ConversionJob) -> Self {
        Self {
            status: job.status,
            provider_chosen: job.provider_id.is_some(),
            called_before: job.provider_id.is_some() && job.provider_called_at.is_some(),
            provider_tx_known: job.provider_tx_id.is_some(),
            created_at: job.created_at,
            submitted_at: job.submitted_at,
            stale_flagged: job.stale_flagged_at.is_some(),
        }
    }
}

/// What a failed provider call says about the provider's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallError {
    /// Nothing was done (refused connection, 503, 408, 429); the same call may
    /// succeed later. `retry_after` is the provider's suggested wait.
    NothingDone { retry_after: Option<Duration> },
    /// The provider may have acted (timeout after sending, a connection lost
    /// mid-answer, 500/502/504, an unreadable answer to a call that moves
    /// money, a call that outlasted its time budget). Repeating the same call
    /// is safe; another provider is not.
    OutcomeUnknown,
    /// A definite refusal (4xx, misconfiguration): repeating cannot help.
    Refused,
}

impl CallError {
    /// Classifies a provider error.
    pub fn of(error: &ProviderError) -> Self {
        match error {
            ProviderError::Retryable { retry_after_ms, .. } => CallError::NothingDone {
                retry_after: retry_after_ms.map(Duration::from_millis),
            },
            ProviderError::OutcomeUnknown { .. } => CallError::OutcomeUnknown,
            ProviderError::Final { .. }
            | ProviderError::Protocol(_)
            | ProviderError::Configuration(_) => CallError::Refused,
        }
    }

    /// Whether the same call may succeed if repeated.
    pub fn is_retryable(self) -> bool {
        !matches!(self, CallError::Refused)
    }
}

/// This lease's initiate calls at the job's current provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Calls {
    /// Calls answered so far (including failures).
    pub made: u32,
    /// Whether any of them may have been acted on without an answer.
    pub unanswered: bool,
}

impl Calls {
    /// Counts one answered call.
    pub fn record(&mut self, answer: Result<(), CallError>) {
        self.made += 1;
        if answer == Err(CallError::OutcomeUnknown) {
            self.unanswered = true;
        }
    }
}

/// What just happened to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input<'a> {
    /// Nothing yet: the job was just leased, or its last step was stored.
    Nothing,
    /// The provider answered an initiate call (already counted in [`Calls`]).
    /// An accepted call is followed, once recorded, by its state as a
    /// [`Input::Polled`] answer.
    Initiated(Result<&'a ProviderState, CallError>),
    /// The provider answered a status poll.
    Polled(Result<&'a ProviderState, CallError>),
}

/// Why a job goes to a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Review {
    /// Held at a provider that may hold the conversion, and it refused with a
    /// final error (`refused`) or the conversion timeout passed since the
    /// command. `waited` is the time since the command.
    MayHoldConversion {
        waited: chrono::Duration,
        refused: bool,
    },
    /// At a provider with no final answer for the conversion timeout since
    /// submission.
    NoFinalAnswer { waited: chrono::Duration },
    /// At a provider without a provider or transaction id to ask about.
    NothingToAsk,
}

/// What the worker does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Choose a provider among those not given up on (fail if none is left).
    ChooseProvider,
    /// Call initiate at the job's provider after `after` (zero: now), with
    /// the job id as idempotency key; record the call before making it.
    Call { after: Duration },
    /// Record that the provider accepted the conversion (`provider_submitted`).
    RecordSubmitted,
    /// Ask the provider for the conversion's state now.
    Poll,
    /// Record that the provider is executing it (`provider_processing`).
    RecordProcessing,
    /// Record the provider's completion (`provider_completed`) with its amounts.
    RecordCompleted,
    /// Post the ledger entries and complete the job.
    Complete,
    /// The provider failed the conversion: the job is `failed` (no money moved).
    Fail { reason: String },
    /// Give this provider up (it did nothing with the job) and choose the next.
    FallBack,
    /// The provider may hold the conversion: keep the job there and make the
    /// same call again next monitor cycle.
    Hold,
    /// Flag the job stale, then wait for the next monitor cycle.
    FlagStale,
    /// Nothing to do until the next monitor cycle (poll again then).
    PollLater,
    /// A person must look at the job.
    NeedsReview(Review),
    /// Nothing more to do for this job (final, or waiting for a person).
    Stop,
}

impl Decision {
    /// The status the job reaches when the decision is carried out (None: it
    /// keeps its status). [`Decision::Complete`] passes through
    /// `ledger_updating` to `completed`.
    pub fn status_after(&self) -> Option<JobStatus> {
        match self {
            Decision::RecordSubmitted => Some(JobStatus::ProviderSubmitted),
            Decision::RecordProcessing => Some(JobStatus::ProviderProcessing),
            Decision::RecordCompleted => Some(JobStatus::ProviderCompleted),
            Decision::Complete => Some(JobStatus::Completed),
            Decision::Fail { .. } => Some(JobStatus::Failed),
            Decision::NeedsReview(_) => Some(JobStatus::NeedsReview),
            _ => None,
        }
    }
}

/// The next step for a job. Pure: the same arguments always give the same
/// decision.
pub fn decide(
    job: &JobFacts,
    calls: &Calls,
    input: Input<'_>,
    now: DateTime<Utc>,
    settings: &PolicySettings,
) -> Decision {
    let at_provider = matches!(
        job.status,
        JobStatus::ProviderSubmitted | JobStatus::ProviderProcessing
    );
    match input {
        // An answer that does not fit where the job stands (a late answer
        // for a job that moved on) is ignored.
        Input::Nothing => next_step(job),
        Input::Initiated(_) if job.status != JobStatus::Pending || !job.provider_chosen => {
            next_step(job)
        }
        Input::Polled(_) if !at_provider => next_step(job),
        Input::Initiated(Ok(_)) => Decision::RecordSubmitted,
        Input::Initiated(Err(error)) => after_failed_call(job, calls, error, now, settings),
        Input::Polled(answer) => after_poll(job, answer, now, settings),
    }
}

fn next_step(job: &JobFacts) -> Decision {
    match job.status {
        JobStatus::Pending if job.provider_chosen => Decision::Call {
            after: Duration::ZERO,
        },
        JobStatus::Pending => Decision::ChooseProvider,
        JobStatus::ProviderSubmitted | JobStatus::ProviderProcessing => {
            if job.provider_chosen && job.provider_tx_known {
                Decision::Poll
            } else {
                Decision::NeedsReview(Review::NothingToAsk)
            }
        }
        JobStatus::ProviderCompleted => Decision::Complete,
        // Completion is one transaction: a job is never left in
        // `ledger_updating`; final jobs and jobs waiting for a person are
        // not the worker's.
        JobStatus::LedgerUpdating
        | JobStatus::Completed
        | JobStatus::Failed
        | JobStatus::Cancelled
        | JobStatus::NeedsReview => Decision::Stop,
    }
}

fn after_failed_call(
    job: &JobFacts,
    calls: &Calls,
    error: CallError,
    now: DateTime<Utc>,
    settings: &PolicySettings,
) -> Decision {
    if error.is_retryable() && calls.made <= settings.max_retries {
        return Decision::Call {
            after: backoff(calls.made, error, settings),
        };
    }
    if job.called_before || calls.unanswered {
        let waited = now - job.created_at;
        let refused = !error.is_retryable();
        if refused || waited >= settings.conversion_timeout {
            return Decision::NeedsReview(Review::MayHoldConversion { waited, refused });
        }
        return Decision::Hold;
    }
    Decision::FallBack
}

/// The wait before call number `made + 1`: `retry_initial × 2^(made − 1)`,
/// at most `retry_max`, and never less than the provider asked for.
pub fn backoff(made: u32, error: CallError, settings: &PolicySettings) -> Duration {
    let doublings = made.saturating_sub(1).min(20);
    let delay = settings
        .retry_initial
        .saturating_mul(1 << doublings)
        .min(settings.retry_max);
    match error {
        CallError::NothingDone {
            retry_after: Some(asked),
        } => delay.max(asked),
        _ => delay,
    }
}

fn after_poll(
    job: &JobFacts,
    answer: Result<&ProviderState, CallError>,
    now: DateTime<Utc>,
    settings: &PolicySettings,
) -> Decision {
    match answer {
        Ok(ProviderState::Completed { .. }) => Decision::RecordCompleted,
        Ok(ProviderState::Failed { reason }) => Decision::Fail {
            reason: reason.clone(),
        },
        Ok(ProviderState::Processing) if job.status == JobStatus::ProviderSubmitted => {
            Decision::RecordProcessing
        }
        Ok(ProviderState::Processing | ProviderState::Submitted) | Err(_) => {
            check_age(job, now, settings)
        }
    }
}

/// Stale flag, or a person after the conversion timeout, for a job still
/// waiting on its provider.
fn check_age(job: &JobFacts, now: DateTime<Utc>, settings: &PolicySettings) -> Decision {
    let Some(submitted) = job.submitted_at else {
        return Decision::PollLater;
    };
    let waited = now - submitted;
    if waited >= settings.conversion_timeout {
        Decision::NeedsReview(Review::NoFinalAnswer { waited })
    } else if waited >= settings.stale_after && !job.stale_flagged {
        Decision::FlagStale
    } else {
        Decision::PollLater
    }
}
