//! Reconciliation against the providers (`treasury reconcile --providers`):
//! the buffer held at the providers against the balances they report, and
//! the conversions they executed under the engine's idempotency keys against
//! the jobs that account for them.
//!
//! The comparisons are pure ([`compare_balances`], [`unaccounted_executions`]);
//! [`check_providers`] asks the providers and the database and runs them.

use std::collections::HashMap;

use rust_decimal::Decimal;
use serde::Serialize;
use sqlx::PgPool;
use uuid::Uuid;

use super::Finding;
use crate::domain::{BufferAccount, Currency, JobStatus};
use crate::providers::{ConversionProvider, ExecutedConversion, ProviderState};
use crate::store::{BufferReport, StoreError};

/// The buffers whose money sits at the conversion providers, and in which
/// currency: one row per buffer. `system_buffer_usdc` is an on-chain reserve
/// and `broker_operational` sits at the broker, so neither is compared.
pub const HELD_AT_PROVIDERS: [(BufferAccount, Currency); 1] =
    [(BufferAccount::SystemBufferFiat, Currency::Usd)];

/// What one provider reported for one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportedBalance {
    pub provider: String,
    pub currency: Currency,
    /// The balance, or why the provider could not say.
    pub balance: Result<Decimal, String>,
}

/// One buffer set against what the providers report holding for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalanceComparison {
    pub account: BufferAccount,
    pub currency: Currency,
    pub buffer_balance: Decimal,
    /// Sum over the providers that answered (None when one could not).
    pub reported: Option<Decimal>,
    /// `reported − buffer_balance`.
    pub difference: Option<Decimal>,
}

/// Compares each buffer held at the providers with the sum of the balances
/// they report in its currency. A difference larger than `tolerance` (in the
/// buffer's currency) is a `buffer_balance_mismatch`; a provider that could
/// not report makes the comparison impossible (`provider_balance_unavailable`).
pub fn compare_balances(
    buffers: &[BufferReport],
    reported: &[ReportedBalance],
    tolerance: Decimal,
) -> (Vec<BalanceComparison>, Vec<Finding>) {
    let mut comparisons = Vec::new();
    let mut findings = Vec::new();
    for (account, currency) in HELD_AT_PROVIDERS {
        let Some(buffer) = buffers.iter().find(|b| b.account == account) else {
            continue;
        };
        let mut sum = Some(Decimal::ZERO);
        for r in reported.iter().filter(|r| r.currency == currency) {
            match &r.balance {
                Ok(value) => sum = sum.map(|s| s + value),
                Err(reason) => {
                    sum = None;
                    findings.push(Finding {
                        check: "provider_balance_unavailable",
                        subject: format!("{}:{}", r.provider, currency.code()),
                        detail: format!("{account} cannot be compared: {reason}"),
                    });
                }
            }
        }
        let difference = sum.map(|s| s - buffer.balance);
        if let Some(d) = difference
            && d.abs() > tolerance
        {
            findings.push(Finding {
                check: "buffer_balance_mismatch",
                subject: account.as_str().to_owned(),
                detail: format!(
                    "engine holds {} {}, providers report {} (difference {}, tolerance {})",
                    buffer.balance,
                    currency.code(),
                    sum.unwrap_or_default(),
                    d,
                    tolerance
                ),
            });
        }
        comparisons.push(BalanceComparison {
            account,
            currency,
            buffer_balance: buffer.balance,
            reported: sum,
            difference,
        });
    }
    (comparisons, findings)
}

/// A job as reconciliation sees it: where it was executed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobAtProvider {
    pub provider_name: Option<String>,
    pub status: JobStatus,
}

/// The executions `provider` reports that no job accounts for: each one's key
/// must name a job that ran at this provider and did not end `failed` or
/// `cancelled` (a job still in flight there is followed by the monitor cycle;
/// a completed one has its posting). Executions the provider reports as
/// failed moved no money and are skipped.
pub fn unaccounted_executions(
    provider: &str,
    executions: &[ExecutedConversion],
    jobs: &HashMap<Uuid, JobAtProvider>,
) -> Vec<Finding> {
    executions
        .iter()
        .filter(|e| !matches!(e.state, ProviderState::Failed { .. }))
        .filter_map(|e| {
            let job = jobs.get(&e.idempotency_key);
            let accounted = job.is_some_and(|j| {
                j.provider_name.as_deref() == Some(provider)
                    && !matches!(j.status, JobStatus::Failed | JobStatus::Cancelled)
            });
            if accounted {
                return None;
            }
            let why = match job {
                None => "no job has this key".to_owned(),
                Some(j) => format!(
                    "job {} is {} at {}",
                    e.idempotency_key,
                    j.status,
                    j.provider_name.as_deref().unwrap_or("no provider")
                ),
            };
            Some(Finding {
                check: "provider_execution_without_job",
                subject: format!("{provider}:{}", e.provider_tx_id),
                detail: format!(
                    "{provider} executed {} {} under key {}: {why}",
                    e.direction, e.amount, e.idempotency_key
                ),
            })
        })
        .collect()
}

/// What the provider checks found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProviderReport {
    pub findings: Vec<Finding>,
    pub balances: Vec<ReportedBalance>,
    pub comparisons: Vec<BalanceComparison>,
    /// Providers that cannot list their executions (checked by hand).
    pub executions_not_listed: Vec<String>,
}

/// Asks every given provider for its balances and executions and checks them
/// against the buffers and the jobs in `pool`.
pub async fn check_providers(
    pool: &PgPool,
    buffers: &[BufferReport],
    providers: &[&dyn ConversionProvider],
    tolerance: Decimal,
) -> Result<ProviderReport, StoreError> {
    let mut report = ProviderReport::default();
    for provider in providers {
        for currency in [Currency::Usd, Currency::Usdc] {
            report.balances.push(ReportedBalance {
                provider: provider.name().to_owned(),
                currency,
                balance: provider
                    .balance(currency)
                    .await
                    .map(|m| m.value)
                    .map_err(|e| e.to_string()),
            });
        }
    }
    let (comparisons, findings) = compare_balances(buffers, &report.balances, tolerance);
    report.comparisons = comparisons;
    report.findings = findings;
    for provider in providers {
        match provider.executions().await {
            Ok(Some(executions)) => {
                let keys: Vec<Uuid> = executions.iter().map(|e| e.idempotency_key).collect();
                let jobs = jobs_by_id(pool, &keys).await?;
                report
                    .findings
                    .extend(unaccounted_executions(provider.name(), &executions, &jobs));
            }
            Ok(None) => report
                .executions_not_listed
                .push(provider.name().to_owned()),
            Err(e) => report.findings.push(Finding {
                check: "provider_executions_unavailable",
                subject: provider.name().to_owned(),
                detail: e.to_string(),
            }),
        }
    }
    Ok(report)
}

async fn jobs_by_id(
    pool: &PgPool,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, JobAtProvider>, StoreError> {
    let rows: Vec<(Uuid, Option<String>, String)> =
        sqlx::query_as("SELECT id, provider_name, status FROM conversion_jobs WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(pool)
            .await?;
    rows.into_iter()
        .map(|(id, provider_name, status)| {
            let status = status
                .parse()
                .map_err(|e: crate::domain::UnknownJobStatus| StoreError::Corrupt(e.to_string()))?;
            Ok((
                id,
                JobAtProvider {
                    provider_name,
                    status,
                },
            ))
        })
        .collect()
}

/// The provider part of `treasury reconcile --providers`, as lines.
pub fn render(report: &ProviderReport) -> String {
    let mut out = String::new();
    for b in &report.balances {
        let shown = match &b.balance {
            Ok(value) => format!("{value} {}", b.currency.code()),
            Err(reason) => format!("unavailable: {reason}"),
        };
        out.push_str(&format!("provider balance  {:<16} {shown}\n", b.provider));
    }
    for c in &report.comparisons {
        let reported = c.reported.map_or_else(|| "?".to_owned(), |r| r.to_string());
        let difference = c
            .difference
            .map_or_else(|| "?".to_owned(), |d| d.to_string());
        out.push_str(&format!(
            "buffer vs providers  {:<20} engine {} {}, providers {reported} (difference {difference})\n",
            c.account.as_str(),
            c.buffer_balance,
            c.currency.code()
        ));
    }
    for name in &report.executions_not_listed {
        out.push_str(&format!(
            "provider executions  {name}: its API cannot list conversions by our key; check them at the provider\n"
        ));
    }
    out
}
