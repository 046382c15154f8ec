//! Logs and metrics set up in one place.

use tracing_subscriber::EnvFilter;

/// Installs the log subscriber: human-readable by default, JSON when
/// `TREASURY_LOG_FORMAT=json`; level from `RUST_LOG` (default `level`).
pub fn init_logging(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{level},librdkafka=warn,sqlx=warn")));
    let json = std::env::var("TREASURY_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

pub mod jobs;
pub mod lag;

use crate::domain::{BufferAccount, BufferStatus, ConversionDirection, ConversionTrigger};

/// Buckets of `treasury_job_duration_seconds`: 30 s to 4 h.
pub const JOB_DURATION_BUCKETS: [f64; 10] = [
    30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0,
];

/// The DLQ's `error_kind` values, known in advance.
pub const DLQ_ERROR_KINDS: [&str; 7] = [
    "decode",
    "unknown_schema",
    "unknown_currency",
    "invalid_amount",
    "invalid_id",
    "future_timestamp",
    "invalid_command",
];

/// Installs the Prometheus recorder and returns its handle for `/metrics`.
pub fn init_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::Matcher;
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("treasury_job_duration_seconds".into()),
            &JOB_DURATION_BUCKETS,
        )
        .ok()?
        .install_recorder()
        .ok()
}

/// Creates every counter (at 0) and histogram whose labels are known in
/// advance, so that a fresh process exports every series `deploy/` uses and
/// `increase()` sees the first event after a restart. `providers` are the
/// names in `conversion_providers`.
pub fn register_series(providers: &[String]) {
    for name in [
        "treasury_events_counted_total",
        "treasury_events_duplicate_total",
        "treasury_events_late_total",
        "treasury_kafka_errors_total",
        "treasury_outbox_published_total",
        "treasury_jobs_created_total",
        "treasury_jobs_completed_total",
        "treasury_jobs_failed_total",
        "treasury_jobs_needs_review_total",
        "treasury_jobs_held_total",
        "treasury_provider_retries_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for kind in DLQ_ERROR_KINDS {
        metrics::counter!("treasury_dlq_messages_total", "error_kind" => kind).increment(0);
    }
    for direction in ConversionDirection::ALL {
        for trigger in [
            ConversionTrigger::BufferReplenishment,
            ConversionTrigger::ScheduledRebalance,
            ConversionTrigger::Manual,
            ConversionTrigger::Emergency,
        ] {
            metrics::counter!("treasury_commands_planned_total", "direction" => direction.as_str(), "trigger" => trigger.as_str())
                .increment(0);
        }
    }
    for account in BufferAccount::ALL {
        for from in BufferStatus::ALL {
            for to in BufferStatus::ALL.into_iter().filter(|to| *to != from) {
                metrics::counter!(
                    "treasury_buffer_status_changes_total",
                    "account" => account.as_str(),
                    "from" => from.as_str(),
                    "to" => to.as_str()
                )
                .increment(0);
            }
        }
    }
    for provider in providers {
        crate::providers::metered::register(provider);
        for direction in ConversionDirection::ALL {
            let _ = metrics::histogram!("treasury_job_duration_seconds", "direction" => direction.as_str(), "provider" => provider.clone());
        }
    }
    metrics::gauge!("treasury_stale_jobs").increment(0.0);
    metrics::counter!("treasury_schema_registry_unavailable_total").increment(0);
}

/// Sets the gauges that mirror the system of record: each buffer's balance,
/// thresholds and status (one series per status, 1 for the current one), the
/// number of jobs in each status, and whether each provider is degraded. Called periodically by `treasury run`.
pub async fn refresh_gauges(
    store: &dyn crate::store::Store,
    jobs: &dyn crate::store::jobs::JobStore,
) -> Result<(), crate::store::StoreError> {
    for buffer in store.buffer_report().await? {
        let account = buffer.account.as_str();
        let currency = buffer.currency.clone();
        metrics::gauge!("treasury_buffer_balance", "account" => account, "currency" => currency.clone())
            .set(decimal_gauge(buffer.balance));
        for (level, value) in [
            ("min", buffer.min),
            ("target", buffer.target),
            ("max", buffer.max),
        ] {
            metrics::gauge!("treasury_buffer_threshold", "account" => account, "currency" => currency.clone(), "level" => level)
                .set(decimal_gauge(value));
        }
        for status in BufferStatus::ALL {
            metrics::gauge!("treasury_buffer_status", "account" => account, "status" => status.as_str())
                .set(if buffer.status == status { 1.0 } else { 0.0 });
        }
    }
    for (status, count) in store.jobs_by_status().await? {
        metrics::gauge!("treasury_jobs", "status" => status.as_str()).set(count as f64);
    }
    for provider in jobs.providers().await? {
        let degraded = provider.status != crate::providers::ProviderStatus::Active;
        metrics::gauge!("treasury_provider_degraded", "provider" => provider.name)
            .set(if degraded { 1.0 } else { 0.0 });
    }
    Ok(())
}

/// A decimal as a gauge value. Gauges are for dashboards only; money itself
/// is never computed in floating point.
fn decimal_gauge(value: rust_decimal::Decimal) -> f64 {
    use rust_decimal::prelude::ToPrimitive;
    value.to_f64().unwrap_or(f64::NAN)
}
