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

/// Installs the Prometheus recorder and returns its handle for `/metrics`.
pub fn init_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok()
}

/// Sets the gauges that mirror the system of record: each buffer's balance,
/// thresholds and status (one series per status, 1 for the current one), and
/// whether each provider is degraded. Called periodically by `treasury run`.
pub async fn refresh_gauges(
    store: &dyn crate::store::Store,
    jobs: &dyn crate::store::jobs::JobStore,
) -> Result<(), crate::store::StoreError> {
    use crate::domain::BufferStatus;
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
        for status in [
            BufferStatus::CriticalLow,
            BufferStatus::BelowTarget,
            BufferStatus::Healthy,
            BufferStatus::OverCapitalized,
        ] {
            metrics::gauge!("treasury_buffer_status", "account" => account, "status" => status.as_str())
                .set(if buffer.status == status { 1.0 } else { 0.0 });
        }
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
