//! The conversion job's status machine. Only the transitions listed in
//! [`JobStatus::can_become`] are legal; everything else is an error.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a conversion job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Pending,
    ProviderSubmitted,
    ProviderProcessing,
    ProviderCompleted,
    LedgerUpdating,
    Completed,
    Failed,
    Cancelled,
    /// The provider did not answer within `TREASURY_CONVERSION_TIMEOUT`, or
    /// refused after a call it may have acted on went unanswered: money may
    /// have moved, so a person must look before anything else happens.
    NeedsReview,
}

impl JobStatus {
    /// Every status, for exhaustive checks.
    pub const ALL: [JobStatus; 9] = [
        JobStatus::Pending,
        JobStatus::ProviderSubmitted,
        JobStatus::ProviderProcessing,
        JobStatus::ProviderCompleted,
        JobStatus::LedgerUpdating,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Cancelled,
        JobStatus::NeedsReview,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::ProviderSubmitted => "provider_submitted",
            JobStatus::ProviderProcessing => "provider_processing",
            JobStatus::ProviderCompleted => "provider_completed",
            JobStatus::LedgerUpdating => "ledger_updating",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::NeedsReview => "needs_review",
        }
    }

    /// `completed`, `failed` and `cancelled` never change again.
    pub const fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Cancelled
        )
    }

    /// Whether money may be at the provider (counts as in flight for planning).
    pub const fn is_in_flight(self) -> bool {
        !self.is_final()
    }

    /// The legal transitions.
    pub const fn can_become(self, next: JobStatus) -> bool {
        use JobStatus::*;
        matches!(
            (self, next),
            (Pending, ProviderSubmitted)
                | (Pending, Failed)
                | (Pending, Cancelled)
                | (Pending, NeedsReview)
                | (ProviderSubmitted, ProviderProcessing)
                | (ProviderSubmitted, ProviderCompleted)
                | (ProviderSubmitted, Failed)
                | (ProviderSubmitted, NeedsReview)
                | (ProviderProcessing, ProviderCompleted)
                | (ProviderProcessing, Failed)
                | (ProviderProcessing, NeedsReview)
                | (ProviderCompleted, LedgerUpdating)
                | (LedgerUpdating, Completed)
                | (NeedsReview, ProviderProcessing)
                | (NeedsReview, ProviderCompleted)
                | (NeedsReview, Failed)
                | (NeedsReview, Cancelled)
        )
    }

    /// Moves to `next` or explains why it may not.
    pub fn transition(self, next: JobStatus) -> Result<JobStatus, IllegalTransition> {
        if self.can_become(next) {
            Ok(next)
        } else {
            Err(IllegalTransition {
                from: self,
                to: next,
            })
        }
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text did not name a job status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown job status {0:?}")]
pub struct UnknownJobStatus(pub String);

impl FromStr for JobStatus {
    type Err = UnknownJobStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL
            .into_iter()
            .find(|j| j.as_str() == s)
            .ok_or_else(|| UnknownJobStatus(s.to_owned()))
    }
}

/// A status change the machine forbids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal job transition {from} -> {to}")]
pub struct IllegalTransition {
    pub from: JobStatus,
    pub to: JobStatus,
}

/// A conversion job: one command executed at a provider, followed to its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversionJob {
    pub id: uuid::Uuid,
    /// The command id; at most one job per command.
    pub command_id: uuid::Uuid,
    pub direction: super::ConversionDirection,
    pub trigger: super::ConversionTrigger,
    /// Amount sent, in the source currency.
    pub amount: super::Money,
    pub source_account: super::BufferAccount,
    pub destination_account: super::BufferAccount,
    pub status: JobStatus,
    pub provider_id: Option<uuid::Uuid>,
    pub provider_name: Option<String>,
    /// The provider's id for the conversion (set once it accepted it).
    pub provider_tx_id: Option<String>,
    /// Providers already tried and given up on, in order.
    pub attempted_providers: Vec<uuid::Uuid>,
    pub destination_amount: Option<super::Money>,
    pub fee: Option<super::Money>,
    pub exchange_rate: Option<rust_decimal::Decimal>,
    pub retry_count: i32,
    pub error_message: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub submitted_at: Option<chrono::DateTime<chrono::Utc>>,
    pub stale_flagged_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When `provider_id` was last called for this job, recorded under the
    /// worker's lease before the call (None: chosen, never called). A worker
    /// that takes the job over and finds it set holds at that provider.
    pub provider_called_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl ConversionJob {
    /// The job for a command. Its id derives from the command id, so the
    /// same command always names the same job.
    pub fn from_command(command: &super::ConversionCommand) -> Self {
        const JOB_ID_NAMESPACE: uuid::Uuid =
            uuid::Uuid::from_u128(0x0b3c_5d7e_9f10_4a2b_8c4d_6e8f_a0b1_c2d3);
        Self {
            id: uuid::Uuid::new_v5(&JOB_ID_NAMESPACE, command.command_id.as_bytes()),
            command_id: command.command_id,
            direction: command.direction,
            trigger: command.trigger,
            amount: command.amount,
            source_account: command.source_account,
            destination_account: command.destination_account,
            status: JobStatus::Pending,
            provider_id: None,
            provider_name: None,
            provider_tx_id: None,
            attempted_providers: Vec::new(),
            destination_amount: None,
            fee: None,
            exchange_rate: None,
            retry_count: 0,
            error_message: None,
            created_at: command.created_at,
            submitted_at: None,
            stale_flagged_at: None,
            provider_called_at: None,
        }
    }
}
