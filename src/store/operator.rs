//! What an operator may do to a job by hand (`POST /v1/jobs/{id}/cancel`,
//! `/resolve`), decided by the job state machine: [`decide`] is pure and both
//! stores apply its answer inside the transaction that locks the job, so an
//! operator's change is checked by [`JobStatus::transition`] like any other.

use rust_decimal::Decimal;

use crate::domain::{ConversionJob, JobStatus, Money};

/// An operator's decision on one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorAction {
    /// Nothing was sent, or a person checked the provider and nothing moved.
    Cancel,
    /// A person saw the conversion completed at the provider: the engine
    /// posts it on its next cycle.
    Completed {
        /// Received, in the destination currency.
        destination_amount: Money,
        /// Charged, in the source currency.
        fee: Money,
        /// Destination units per source unit.
        rate: Decimal,
        /// The provider's id, when the job has none yet.
        provider_tx_id: Option<String>,
    },
    /// A person saw it did not happen.
    Failed { reason: String },
}

/// What came of an [`OperatorAction`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorOutcome {
    /// Applied: the job as stored now, and the status it left.
    Done {
        job: Box<ConversionJob>,
        from: JobStatus,
    },
    /// No such job.
    NotFound,
    /// Refused; the job is unchanged.
    Refused { status: JobStatus, reason: String },
}

/// The status `action` takes a job in `status` (held at `provider`, if it
/// has one) to, or why it may not.
pub fn decide(
    status: JobStatus,
    provider: Option<&str>,
    action: &OperatorAction,
) -> Result<JobStatus, String> {
    let to = match action {
        OperatorAction::Cancel => {
            if status == JobStatus::Pending
                && let Some(provider) = provider
            {
                return Err(format!(
                    "pending at {provider}, which may already hold the conversion; \
                     it can be cancelled once it is in needs_review"
                ));
            }
            JobStatus::Cancelled
        }
        OperatorAction::Completed { .. } | OperatorAction::Failed { .. } => {
            if status != JobStatus::NeedsReview {
                return Err(format!(
                    "{status}; only needs_review jobs are resolved by hand"
                ));
            }
            match action {
                OperatorAction::Failed { .. } => JobStatus::Failed,
                _ => JobStatus::ProviderCompleted,
            }
        }
    };
    status.transition(to).map_err(|e| {
        format!("{status}; {e} (only pending jobs with no provider or needs_review jobs can be cancelled)")
    })
}

/// The job after `action` took it to `to`.
pub fn applied(job: &ConversionJob, to: JobStatus, action: &OperatorAction) -> ConversionJob {
    let mut next = job.clone();
    next.status = to;
    match action {
        OperatorAction::Cancel => {}
        OperatorAction::Completed {
            destination_amount,
            fee,
            rate,
            provider_tx_id,
        } => {
            next.destination_amount = Some(*destination_amount);
            next.fee = Some(*fee);
            next.exchange_rate = Some(*rate);
            if let Some(id) = provider_tx_id.as_ref().filter(|t| !t.trim().is_empty()) {
                next.provider_tx_id = Some(id.clone());
            }
        }
        OperatorAction::Failed { reason } => next.error_message = Some(reason.clone()),
    }
    next
}

/// The history note of an applied action.
pub fn note(action: &OperatorAction) -> String {
    match action {
        OperatorAction::Cancel => "cancelled by an operator".into(),
        OperatorAction::Completed {
            destination_amount,
            fee,
            rate,
            ..
        } => format!(
            "resolved by an operator: {destination_amount} received, fee {fee}, rate {rate}"
        ),
        OperatorAction::Failed { reason } => format!("resolved by an operator: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_follows_the_state_machine_and_never_touches_a_held_job() {
        use JobStatus::*;
        assert_eq!(
            decide(Pending, None, &OperatorAction::Cancel),
            Ok(Cancelled)
        );
        assert_eq!(
            decide(NeedsReview, Some("Due"), &OperatorAction::Cancel),
            Ok(Cancelled)
        );
        assert!(decide(Pending, Some("Due"), &OperatorAction::Cancel).is_err());
        for status in [
            ProviderSubmitted,
            ProviderProcessing,
            ProviderCompleted,
            LedgerUpdating,
            Completed,
            Failed,
            Cancelled,
        ] {
            assert!(
                decide(status, Some("Due"), &OperatorAction::Cancel).is_err(),
                "{status}"
            );
        }
    }

    #[test]
    fn only_jobs_in_review_are_resolved() {
        use JobStatus::*;
        let failed = OperatorAction::Failed {
            reason: "nothing at Due".into(),
        };
        assert_eq!(decide(NeedsReview, Some("Due"), &failed), Ok(Failed));
        for status in JobStatus::ALL.into_iter().filter(|s| *s != NeedsReview) {
            assert!(decide(status, Some("Due"), &failed).is_err(), "{status}");
        }
    }
}
