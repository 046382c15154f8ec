//! [`JobStore`] on PostgreSQL.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::jobs::{JobStore, JobUpdate, Lease, LeasedJob, Outcome};
use super::operator::{self, OperatorAction, OperatorOutcome};
use super::postgres::PgStore;
use super::{OffsetRange, OutboxMessage, StoreError, StoreTx};
use crate::domain::{ConversionJob, Currency, JobStatus, LedgerPosting, Money};
use crate::providers::health::AttemptOutcome;
use crate::providers::{ProviderRow, ProviderStatus};

const JOB_COLUMNS: &str =
    "id, idempotency_key, direction, trigger_reason, status, amount, source_account,
    source_currency, destination_account, destination_currency, destination_amount, exchange_rate,
    fees_amount, fees_currency, provider_id, provider_name, provider_tx_id, attempted_providers,
    retry_count, error_message, created_at, submitted_at, stale_flagged_at, provider_called_at";

/// Unfinished jobs that are not waiting for a person: the ones workers drive.
const DRIVABLE: &str = "status NOT IN ('completed', 'failed', 'cancelled', 'needs_review')";

/// The fence every write of a leased job passes: `$owner`, `$epoch` and `$now`
/// are the lease's owner and epoch and the writer's clock reading.
fn fence(owner: usize, epoch: usize, now: usize) -> String {
    format!("lease_owner = ${owner} AND lease_epoch = ${epoch} AND lease_until > ${now}")
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn parse<T: std::str::FromStr>(text: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(corrupt)
}

fn money(currency: Option<String>, value: Option<Decimal>) -> Result<Option<Money>, StoreError> {
    match (currency, value) {
        (Some(c), Some(v)) => Ok(Some(Money {
            currency: parse::<Currency>(&c)?,
            value: v.normalize(),
        })),
        _ => Ok(None),
    }
}

fn job_from_row(r: &PgRow) -> Result<ConversionJob, StoreError> {
    Ok(ConversionJob {
        id: r.get("id"),
        command_id: parse(r.get::<&str, _>("idempotency_key"))?,
        direction: parse(r.get::<&str, _>("direction"))?,
        trigger: parse(r.get::<&str, _>("trigger_reason"))?,
        amount: Money {
            currency: parse(r.get::<&str, _>("source_currency"))?,
            value: r.get::<Decimal, _>("amount").normalize(),
        },
        source_account: parse(r.get::<&str, _>("source_account"))?,
        destination_account: parse(r.get::<&str, _>("destination_account"))?,
        status: parse(r.get::<&str, _>("status"))?,
        provider_id: r.get("provider_id"),
        provider_name: r.get("provider_name"),
        provider_tx_id: r.get("provider_tx_id"),
        attempted_providers: r.get("attempted_providers"),
        destination_amount: money(
            Some(r.get("destination_currency")),
            r.get("destination_amount"),
        )?,
        fee: money(r.get("fees_currency"), r.get("fees_amount"))?,
        exchange_rate: r
            .get::<Option<Decimal>, _>("exchange_rate")
            .map(|d| d.normalize()),
        retry_count: r.get("retry_count"),
        error_message: r.get("error_message"),
        created_at: r.get("created_at"),
        submitted_at: r.get("submitted_at"),
        stale_flagged_at: r.get("stale_flagged_at"),
        provider_called_at: r.get("provider_called_at"),
    })
}

pub(super) fn provider_from_row(r: &PgRow) -> Result<ProviderRow, StoreError> {
    Ok(ProviderRow {
        id: r.get("id"),
        name: r.get("name"),
        provider_type: r.get("provider_type"),
        priority: r.get("priority"),
        status: parse::<ProviderStatus>(r.get::<&str, _>("status"))?,
        supports_usdc_to_usd: r.get("supports_usdc_to_usd"),
        supports_usd_to_usdc: r.get("supports_usd_to_usdc"),
        supports_usd_transfer: r.get("supports_usd_transfer"),
        min_amount: r.get::<Decimal, _>("min_conversion_amount").normalize(),
        max_amount: r.get::<Decimal, _>("max_conversion_amount").normalize(),
        daily_volume_limit: r
            .get::<Option<Decimal>, _>("daily_volume_limit")
            .map(|d| d.normalize()),
        daily_volume_used: r.get::<Decimal, _>("daily_volume_used").normalize(),
        success_count: r.get("success_count"),
        failure_count: r.get("failure_count"),
        fee_percentage: r.get::<Decimal, _>("fee_percentage").normalize(),
        fee_fixed: r.get::<Decimal, _>("fee_fixed").normalize(),
        spread_bps: r.get::<Decimal, _>("spread_bps").normalize(),
        credentials_ref: r.get("credentials_ref"),
        base_url: r.get("base_url"),
    })
}

async fn history(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    job: Uuid,
    from: Option<JobStatus>,
    to: JobStatus,
    note: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO conversion_job_history (job_id, from_status, to_status, note) VALUES ($1, $2, $3, $4)",
    )
    .bind(job)
    .bind(from.map(JobStatus::as_str))
    .bind(to.as_str())
    .bind(note)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn set_status(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    job: Uuid,
    from: JobStatus,
    to: JobStatus,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let column = status_timestamp(to);
    let sql = format!(
        "UPDATE conversion_jobs SET status = $3, updated_at = $4{}
          WHERE id = $1 AND status = $2",
        column
            .map(|c| format!(", {c} = COALESCE({c}, $4)"))
            .unwrap_or_default()
    );
    let done = sqlx::query(&sql)
        .bind(job)
        .bind(from.as_str())
        .bind(to.as_str())
        .bind(now)
        .execute(&mut **tx)
        .await?
        .rows_affected()
        == 1;
    Ok(done)
}

/// Records how `job`'s attempt at a provider ended: one outcome per job and
/// provider (a later one replaces it), and the provider's lifetime counters.
async fn record_outcome(
    tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
    job: Uuid,
    outcome: Outcome,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO provider_attempt_outcomes (job_id, provider_id, succeeded, decided_at)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (job_id, provider_id) DO UPDATE SET succeeded = $3, decided_at = $4",
    )
    .bind(job)
    .bind(outcome.provider)
    .bind(outcome.succeeded)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let counters = if outcome.succeeded {
        "success_count = success_count + 1, last_success_at = $2"
    } else {
        "failure_count = failure_count + 1, last_failure_at = $2"
    };
    sqlx::query(&format!(
        "UPDATE conversion_providers SET {counters}, updated_at = $2 WHERE id = $1"
    ))
    .bind(outcome.provider)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The column that records when a job reached `status`.
fn status_timestamp(status: JobStatus) -> Option<&'static str> {
    match status {
        JobStatus::Pending => None,
        JobStatus::ProviderSubmitted => Some("submitted_at"),
        JobStatus::ProviderProcessing => Some("processing_at"),
        JobStatus::ProviderCompleted => Some("provider_completed_at"),
        JobStatus::LedgerUpdating => Some("ledger_updating_at"),
        JobStatus::Completed => Some("completed_at"),
        JobStatus::Failed => Some("failed_at"),
        JobStatus::Cancelled => Some("cancelled_at"),
        JobStatus::NeedsReview => Some("needs_review_at"),
    }
}

impl PgStore {
    /// Extends an unexpired `lease` to `now + extend` (setting `set` too, for
    /// rows that also match `only`); false if it is no longer held.
    async fn extend_lease(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        extend: std::time::Duration,
        set: &str,
        only: &str,
    ) -> Result<bool, StoreError> {
        let sql = format!(
            "UPDATE conversion_jobs SET lease_until = $4 + make_interval(secs => $5){set}
              WHERE id = $1 AND {} {only}",
            fence(2, 3, 4)
        );
        Ok(sqlx::query(&sql)
            .bind(lease.job)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .bind(now)
            .bind(extend.as_secs_f64())
            .execute(self.pool())
            .await?
            .rows_affected()
            == 1)
    }
}

#[async_trait]
impl JobStore for PgStore {
    async fn intake(
        &self,
        group: &str,
        ranges: &[OffsetRange],
        jobs: &[ConversionJob],
        dead_letters: &[OutboxMessage],
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut tx = self.begin_shared().await?;
        tx.advance_offsets(group, ranges).await?;
        tx.enqueue(dead_letters).await?;
        let mut created = Vec::new();
        for job in jobs {
            let inserted: Option<Uuid> = sqlx::query_scalar(
                "INSERT INTO conversion_jobs (id, idempotency_key, direction, trigger_reason, status, amount,
                        source_account, source_currency, source_amount, destination_account,
                        destination_currency, cycle_id, created_at)
                 VALUES ($1, $2, $3, $4, 'pending', $5, $6, $7, $5, $8, $9, $10, now())
                 ON CONFLICT (idempotency_key) DO NOTHING
                 RETURNING id",
            )
            .bind(job.id)
            .bind(job.command_id.to_string())
            .bind(job.direction.as_str())
            .bind(job.trigger.as_str())
            .bind(job.amount.value)
            .bind(job.source_account.as_str())
            .bind(job.amount.currency.code())
            .bind(job.destination_account.as_str())
            .bind(job.direction.destination_currency().code())
            .bind(format!("command:{}", job.command_id))
            .fetch_optional(tx.pg())
            .await?;
            if let Some(id) = inserted {
                sqlx::query(
                    "INSERT INTO conversion_job_history (job_id, from_status, to_status, note)
                     VALUES ($1, NULL, 'pending', 'created from command')",
                )
                .bind(id)
                .execute(tx.pg())
                .await?;
                created.push(id);
            }
        }
        Box::new(tx).commit().await?;
        Ok(created)
    }

    async fn open_jobs(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        let sql = format!(
            "SELECT id FROM conversion_jobs
              WHERE {DRIVABLE} AND (lease_until IS NULL OR lease_until <= $1)
              ORDER BY created_at, id LIMIT $2"
        );
        Ok(sqlx::query_scalar(&sql)
            .bind(now)
            .bind(limit)
            .fetch_all(self.pool())
            .await?)
    }

    async fn lease_job(
        &self,
        job: Uuid,
        owner: &str,
        now: DateTime<Utc>,
        lease: std::time::Duration,
    ) -> Result<Option<LeasedJob>, StoreError> {
        // Two workers racing for the row: the second UPDATE waits for the
        // first to commit, re-reads the row and finds the lease taken.
        let sql = format!(
            "UPDATE conversion_jobs
                SET lease_owner = $2, lease_until = $3 + make_interval(secs => $4),
                    lease_epoch = lease_epoch + 1
              WHERE id = $1 AND {DRIVABLE} AND (lease_until IS NULL OR lease_until <= $3)
              RETURNING {JOB_COLUMNS}, lease_epoch"
        );
        let row = sqlx::query(&sql)
            .bind(job)
            .bind(owner)
            .bind(now)
            .bind(lease.as_secs_f64())
            .fetch_optional(self.pool())
            .await?;
        row.map(|r| {
            Ok(LeasedJob {
                job: job_from_row(&r)?,
                lease: Lease {
                    job,
                    owner: owner.to_owned(),
                    epoch: r.get("lease_epoch"),
                },
            })
        })
        .transpose()
    }

    async fn renew(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        extend: std::time::Duration,
    ) -> Result<bool, StoreError> {
        self.extend_lease(lease, now, extend, "", "").await
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE conversion_jobs SET lease_owner = NULL, lease_until = NULL
              WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3",
        )
        .bind(lease.job)
        .bind(&lease.owner)
        .bind(lease.epoch)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    async fn record_call(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        extend: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let set = ", provider_called_at = $4";
        let only = "AND status = 'pending' AND provider_id IS NOT NULL";
        self.extend_lease(lease, now, extend, set, only).await
    }

    async fn providers(&self) -> Result<Vec<ProviderRow>, StoreError> {
        sqlx::query(
            "UPDATE conversion_providers SET daily_volume_used = 0, daily_volume_date = CURRENT_DATE
              WHERE daily_volume_date < CURRENT_DATE",
        )
        .execute(self.pool())
        .await?;
        let rows = sqlx::query("SELECT * FROM conversion_providers ORDER BY priority, name")
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(provider_from_row).collect()
    }

    async fn in_flight_by_provider(&self) -> Result<HashMap<Uuid, Decimal>, StoreError> {
        let rows = sqlx::query(
            "SELECT provider_id, sum(amount) AS volume FROM conversion_jobs
              WHERE provider_id IS NOT NULL AND created_at >= CURRENT_DATE
                AND status NOT IN ('completed', 'failed', 'cancelled')
              GROUP BY provider_id",
        )
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get("provider_id"),
                    r.get::<Decimal, _>("volume").normalize(),
                )
            })
            .collect())
    }

    async fn provider_outcomes(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<AttemptOutcome>, StoreError> {
        let rows: Vec<(Uuid, DateTime<Utc>, bool)> = sqlx::query_as(
            "SELECT provider_id, decided_at, succeeded FROM provider_attempt_outcomes
              WHERE decided_at > $1 ORDER BY decided_at",
        )
        .bind(since)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .map(|(provider, at, succeeded)| AttemptOutcome {
                provider,
                at,
                succeeded,
            })
            .collect())
    }

    async fn update_job(&self, update: JobUpdate<'_>) -> Result<bool, StoreError> {
        let job = update.job;
        let lease = update.lease;
        let mut tx = self.pool().begin().await?;
        let sql = format!(
            "UPDATE conversion_jobs SET
                provider_id = $3, provider_name = $4, provider_tx_id = $5, attempted_providers = $6,
                destination_amount = $7, exchange_rate = $8, fees_amount = $9, fees_currency = $10,
                retry_count = $11, error_message = $12, submitted_at = $13, stale_flagged_at = $14,
                provider_response = COALESCE($15, provider_response),
                selection_reason = COALESCE($16, selection_reason),
                provider_called_at = $17, updated_at = $20
              WHERE id = $1 AND status = $2 AND {}",
            fence(18, 19, 20)
        );
        let changed = sqlx::query(&sql)
            .bind(job.id)
            .bind(update.from.as_str())
            .bind(job.provider_id)
            .bind(&job.provider_name)
            .bind(&job.provider_tx_id)
            .bind(&job.attempted_providers)
            .bind(job.destination_amount.map(|m| m.value))
            .bind(job.exchange_rate)
            .bind(job.fee.map(|m| m.value))
            .bind(job.fee.map(|m| m.currency.code()))
            .bind(job.retry_count)
            .bind(&job.error_message)
            .bind(job.submitted_at)
            .bind(job.stale_flagged_at)
            .bind(update.provider_response)
            .bind(update.selection_reason)
            .bind(job.provider_called_at)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .bind(update.now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            == 1;
        if !changed {
            return Ok(false);
        }
        if job.status != update.from {
            update
                .from
                .transition(job.status)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            set_status(&mut tx, job.id, update.from, job.status, update.now).await?;
        }
        history(&mut tx, job.id, Some(update.from), job.status, update.note).await?;
        if let Some(outcome) = update.outcome {
            record_outcome(&mut tx, job.id, outcome, update.now).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn complete_job(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        job: &ConversionJob,
        posting: &LedgerPosting,
        message: &OutboxMessage,
    ) -> Result<bool, StoreError> {
        let destination = job
            .destination_amount
            .ok_or_else(|| corrupt("completing a job with no destination amount"))?;
        let mut tx = self.begin_shared().await?;
        let pg = tx.pg_tx();
        // The row stays locked to this transaction: no lease changes hands
        // until it commits.
        let fenced = format!(
            "SELECT id FROM conversion_jobs WHERE id = $1 AND {} FOR UPDATE",
            fence(2, 3, 4)
        );
        let held: Option<Uuid> = sqlx::query_scalar(&fenced)
            .bind(job.id)
            .bind(&lease.owner)
            .bind(lease.epoch)
            .bind(now)
            .fetch_optional(&mut **pg)
            .await?;
        if held.is_none()
            || !set_status(
                pg,
                job.id,
                JobStatus::ProviderCompleted,
                JobStatus::LedgerUpdating,
                now,
            )
            .await?
        {
            return Ok(false);
        }
        history(
            pg,
            job.id,
            Some(JobStatus::ProviderCompleted),
            JobStatus::LedgerUpdating,
            "posting ledger entries",
        )
        .await?;
        let inserted = sqlx::query(
            "INSERT INTO ledger_postings (posting_id, job_id, posting) VALUES ($1, $2, $3)
             ON CONFLICT (job_id) DO NOTHING",
        )
        .bind(posting.posting_id)
        .bind(job.id)
        .bind(serde_json::to_value(posting).map_err(corrupt)?)
        .execute(&mut **pg)
        .await?
        .rows_affected();
        if inserted != 1 {
            return Err(corrupt(format!("job {} already has a posting", job.id)));
        }
        for (account, delta) in [
            (job.source_account, -job.amount.value),
            (job.destination_account, destination.value),
        ] {
            sqlx::query(
                "UPDATE buffer_balances SET balance = balance + $2, updated_at = now() WHERE account_type = $1",
            )
            .bind(account.as_str())
            .bind(delta)
            .execute(&mut **pg)
            .await?;
        }
        if let Some(provider) = job.provider_id {
            sqlx::query(
                "UPDATE conversion_providers SET daily_volume_used = daily_volume_used + $2 WHERE id = $1",
            )
            .bind(provider)
            .bind(job.amount.value)
            .execute(&mut **pg)
            .await?;
            let outcome = Outcome {
                provider,
                succeeded: true,
            };
            record_outcome(pg, job.id, outcome, now).await?;
        }
        set_status(
            pg,
            job.id,
            JobStatus::LedgerUpdating,
            JobStatus::Completed,
            now,
        )
        .await?;
        history(
            pg,
            job.id,
            Some(JobStatus::LedgerUpdating),
            JobStatus::Completed,
            "ledger posted",
        )
        .await?;
        tx.enqueue(std::slice::from_ref(message)).await?;
        Box::new(tx).commit().await?;
        Ok(true)
    }

    async fn job(&self, id: Uuid) -> Result<Option<ConversionJob>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM conversion_jobs WHERE id = $1");
        sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .as_ref()
            .map(job_from_row)
            .transpose()
    }

    async fn operator_change(
        &self,
        id: Uuid,
        action: &OperatorAction,
    ) -> Result<OperatorOutcome, StoreError> {
        let mut tx = self.pool().begin().await?;
        let sql = format!("SELECT {JOB_COLUMNS} FROM conversion_jobs WHERE id = $1 FOR UPDATE");
        let Some(row) = sqlx::query(&sql).bind(id).fetch_optional(&mut *tx).await? else {
            return Ok(OperatorOutcome::NotFound);
        };
        let job = job_from_row(&row)?;
        let to = match operator::decide(job.status, job.provider_name.as_deref(), action) {
            Ok(to) => to,
            Err(reason) => {
                return Ok(OperatorOutcome::Refused {
                    status: job.status,
                    reason,
                });
            }
        };
        // Not a lease holder: whoever held the job is fenced off.
        let sql = match action {
            OperatorAction::Cancel => {
                "UPDATE conversion_jobs SET status = $2, cancelled_at = now(), updated_at = now(),
                        lease_owner = NULL, lease_until = NULL, lease_epoch = lease_epoch + 1
                  WHERE id = $1"
            }
            OperatorAction::Completed { .. } => {
                "UPDATE conversion_jobs SET status = $2, provider_completed_at = now(),
                        destination_amount = $3, fees_amount = $4, fees_currency = $5,
                        exchange_rate = $6, provider_tx_id = coalesce($7, provider_tx_id),
                        updated_at = now(), lease_owner = NULL, lease_until = NULL,
                        lease_epoch = lease_epoch + 1
                  WHERE id = $1"
            }
            OperatorAction::Failed { .. } => {
                "UPDATE conversion_jobs SET status = $2, failed_at = now(), error_message = $3,
                        updated_at = now(), lease_owner = NULL, lease_until = NULL,
                        lease_epoch = lease_epoch + 1
                  WHERE id = $1"
            }
        };
        let query = sqlx::query(sql).bind(id).bind(to.as_str());
        let query = match action {
            OperatorAction::Cancel => query,
            OperatorAction::Completed {
                destination_amount,
                fee,
                rate,
                provider_tx_id,
            } => query
                .bind(destination_amount.value)
                .bind(fee.value)
                .bind(fee.currency.code())
                .bind(rate.round_dp(crate::codec::records::RATE_SCALE))
                .bind(provider_tx_id.clone().filter(|t| !t.trim().is_empty())),
            OperatorAction::Failed { reason } => query.bind(reason.clone()),
        };
        query.execute(&mut *tx).await?;
        sqlx::query(
            "INSERT INTO conversion_job_history (job_id, from_status, to_status, note) VALUES ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(job.status.as_str())
        .bind(to.as_str())
        .bind(operator::note(action))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(OperatorOutcome::Done {
            job: Box::new(operator::applied(&job, to, action)),
            from: job.status,
        })
    }
}
