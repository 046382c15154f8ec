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
