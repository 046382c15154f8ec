//! Reconciliation: what an auditor and an on-call engineer check. Every
//! completed job has exactly one posting and every posting a completed job;
//! no job is stuck; every emitted command became a job; nothing waits in the
//! outbox; and, on request ([`providers`]), the buffer held at the providers
//! against their balances and their executions against the jobs.

pub mod providers;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::store::StoreError;

/// One discrepancy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// What kind of problem, e.g. `completed_job_without_posting`.
    pub check: &'static str,
    /// The job, command or message it concerns.
    pub subject: String,
    pub detail: String,
}

/// How old things may be before they count as stuck.
#[derive(Debug, Clone, Copy)]
pub struct Tolerances {
    /// A job at a provider longer than this is stuck (`TREASURY_STALE_AFTER`).
    pub at_provider: chrono::Duration,
    /// Emitted commands without a job, unsent outbox rows, jobs between the
    /// provider's completion and the ledger: older than this are stuck.
    pub in_transit: chrono::Duration,
}

/// Runs every database check as of `now`.
pub async fn check(
    pool: &PgPool,
    now: DateTime<Utc>,
    tolerances: Tolerances,
) -> Result<Vec<Finding>, StoreError> {
    let mut findings = Vec::new();
    let mut add = |check: &'static str, rows: Vec<(String, String)>| {
        findings.extend(rows.into_iter().map(|(subject, detail)| Finding {
            check,
            subject,
            detail,
        }));
    };
    add(
        "completed_job_without_posting",
        sqlx::query_as(
            "SELECT j.id::text, 'completed at ' || j.completed_at::text FROM conversion_jobs j
              WHERE j.status = 'completed'
                AND NOT EXISTS (SELECT 1 FROM ledger_postings p WHERE p.job_id = j.id)",
        )
        .fetch_all(pool)
        .await?,
    );
    add(
        "posting_without_completed_job",
        sqlx::query_as(
            "SELECT p.posting_id::text, 'job ' || p.job_id::text || ' is ' || j.status
               FROM ledger_postings p JOIN conversion_jobs j ON j.id = p.job_id
              WHERE j.status <> 'completed'",
        )
        .fetch_all(pool)
        .await?,
    );
    add(
        "job_stuck_at_provider",
        sqlx::query_as(
            "SELECT id::text, status || ' at ' || coalesce(provider_name, '?') || ' since ' || submitted_at::text
               FROM conversion_jobs
              WHERE status IN ('provider_submitted', 'provider_processing') AND submitted_at < $1",
        )
        .bind(now - tolerances.at_provider)
        .fetch_all(pool)
        .await?,
    );
    add(
        "job_held_at_provider",
        sqlx::query_as(
            "SELECT id::text, 'pending at ' || provider_name || ' since ' || created_at::text || ': '
                    || coalesce(error_message, 'no answer yet')
               FROM conversion_jobs
              WHERE status = 'pending' AND provider_name IS NOT NULL AND created_at < $1",
        )
        .bind(now - tolerances.in_transit)
        .fetch_all(pool)
        .await?,
    );
    add(
        "job_needs_review",
        sqlx::query_as(
            "SELECT id::text, coalesce(error_message, 'no message') FROM conversion_jobs WHERE status = 'needs_review'",
        )
        .fetch_all(pool)
        .await?,
    );
    add(
        "job_stuck_before_ledger",
        sqlx::query_as(
            "SELECT id::text, status || ' since ' || updated_at::text FROM conversion_jobs
              WHERE status IN ('provider_completed', 'ledger_updating') AND updated_at < $1",
        )
        .bind(now - tolerances.in_transit)
        .fetch_all(pool)
        .await?,
    );
    add(
        "command_without_job",
        sqlx::query_as(
            "SELECT c.command_id::text, c.direction || ' ' || c.amount::text || ' planned at ' || c.created_at::text
               FROM planned_commands c
              WHERE c.emitted AND c.created_at < $1
                AND NOT EXISTS (SELECT 1 FROM conversion_jobs j WHERE j.idempotency_key = c.command_id::text)",
        )
        .bind(now - tolerances.in_transit)
        .fetch_all(pool)
        .await?,
    );
    add(
        "outbox_not_published",
        sqlx::query_as(
            "SELECT id::text, topic || ' since ' || created_at::text FROM outbox
              WHERE sent_at IS NULL AND created_at < $1",
        )
        .bind(now - tolerances.in_transit)
        .fetch_all(pool)
        .await?,
    );
    Ok(findings)
}
