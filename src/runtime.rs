//! Wiring for `treasury run`: builds the roles' tasks from the configuration
//! and runs them until SIGTERM/SIGINT, then stops them in order.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::codec::{Codec, SchemaSource};
use crate::config::Config;
use crate::ingest::{Ingest, IngestSettings};
use crate::relay::Relay;
use crate::settlement::{Settlement, SettlementSettings};
use crate::shutdown::{self, Shutdown};
use crate::store::Store;
use crate::store::postgres::PgStore;
use crate::window::WindowSpec;
use crate::{http, kafka};

/// Which parts of the pipeline this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Ingest, windows, planner and outbox relay.
    Aggregator,
    /// Conversion commands → provider jobs → ledger postings.
    Executor,
}

/// The codec for this configuration (local schemas, plus the registry if set).
pub fn codec_for(config: &Config) -> Codec {
    match &config.schema_registry_url {
        Some(url) => Codec::new(SchemaSource::with_registry(url)),
        None => Codec::default(),
    }
}

/// The window spec for this configuration.
pub fn window_spec(config: &Config) -> WindowSpec {
    WindowSpec::new(config.scheduler_interval, config.window_grace)
}

/// How often settlement checks whether a window can close.
pub fn settlement_tick(config: &Config) -> Duration {
    (config.scheduler_interval / 10).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// The aggregator's settings from the configuration.
pub fn ingest_settings(config: &Config) -> IngestSettings {
    IngestSettings {
        group: config.aggregator_group.clone(),
        funding_topic: config.topics.funding.clone(),
        withdrawal_topic: config.topics.withdrawals.clone(),
        dlq_topic: config.topics.dlq.clone(),
        spec: window_spec(config),
        batch_size: config.batch_size,
        batch_max_wait: config.batch_max_wait,
    }
}

/// The settlement settings from the configuration.
pub fn settlement_settings(config: &Config) -> SettlementSettings {
    SettlementSettings {
        spec: window_spec(config),
        idle_timeout: chrono::Duration::from_std(config.idle_timeout).expect("idle timeout fits"),
        input_topics: vec![
            config.topics.funding.clone(),
            config.topics.withdrawals.clone(),
        ],
        commands_topic: config.topics.commands.clone(),
        auto_rebalance: config.enable_auto_rebalance,
        dedup_retention: chrono::Duration::from_std(config.dedup_retention)
            .expect("retention fits"),
        planner: config.planner,
    }
}

/// Spawns the aggregator's tasks (ingest, settlement, relay) on `store`.
pub fn spawn_aggregator(
    config: &Config,
    store: Arc<dyn Store>,
    codec: Codec,
    shutdown: &shutdown::ShutdownTrigger,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let base = kafka::base_config(config);
    let ingest = Ingest::new(
        &kafka::consumer_config(&base, &config.aggregator_group),
        store.clone(),
        codec.clone(),
        ingest_settings(config),
    )
    .context("creating the aggregator consumer")?;
    let producer = kafka::idempotent_producer(&base).context("creating the outbox producer")?;
    let relay = Relay::new(store.clone(), producer);
    let settlement = Settlement::new(store, codec, settlement_settings(config))
        .with_buffer_alerts(&config.topics.buffer_alerts);
    let tick = settlement_tick(config);
    let ingest_stop: Shutdown = shutdown.subscribe();
    let settle_stop = shutdown.subscribe();
    let relay_stop = shutdown.subscribe();
    Ok(vec![
        tokio::spawn(async move {
            ingest.run(ingest_stop).await;
        }),
        tokio::spawn(settlement.run(settle_stop, tick)),
        tokio::spawn(relay.run(relay_stop, Duration::from_millis(200))),
    ])
}

/// `treasury run`: the chosen roles against PostgreSQL and Kafka.
pub async fn run(config: Config, roles: &[Role]) -> anyhow::Result<()> {
    let url = config.require_database_url()?;
    let store = PgStore::connect(url)
        .await
        .context("connecting to PostgreSQL")?;
    store.migrate().await.context("applying migrations")?;
    let metrics = crate::telemetry::init_metrics();
    let pg = store.clone();
    let jobs: Arc<dyn crate::store::jobs::JobStore> = Arc::new(crate::telemetry::jobs::Timed::new(
        Arc::new(store.clone()),
        crate::clock::SystemClock::shared(),
    ));
    let jobs_for_gauges = jobs.clone();
    let store: Arc<dyn Store> = Arc::new(store);
    let provider_names: Vec<String> = jobs
        .providers()
        .await
        .context("reading conversion_providers")?
        .into_iter()
        .map(|p| p.name)
        .collect();
    crate::telemetry::register_series(&provider_names);
    let codec = codec_for(&config);
    let (trigger, _) = shutdown::channel();
    let mut tasks = Vec::new();
    if roles.contains(&Role::Aggregator) {
        tasks.extend(spawn_aggregator(
            &config,
            store.clone(),
            codec.clone(),
            &trigger,
        )?);
    }
    let mut wake_executor = None;
    if roles.contains(&Role::Executor) {
        let registry = crate::providers::registry::ProviderRegistry::from_process_env(None);
        let parts = crate::executor::build(&config, store.clone(), jobs, codec.clone(), registry)?;
        wake_executor = Some(parts.worker.waker());
        tasks.extend(crate::executor::spawn(parts, &trigger));
        if !roles.contains(&Role::Aggregator) {
            // The executor publishes postings and DLQ records through the outbox too.
            let base = kafka::base_config(&config);
            let producer =
                kafka::idempotent_producer(&base).context("creating the outbox producer")?;
            let relay = Relay::new(store.clone(), producer);
            tasks.push(tokio::spawn(
                relay.run(trigger.subscribe(), Duration::from_millis(200)),
            ));
        }
    }
    metrics::gauge!("treasury_settlement_interval_seconds")
        .set(config.scheduler_interval.as_secs_f64());
    if roles.contains(&Role::Aggregator) {
        // Until this process closes a window: the last one closed, or (none
        // ever) the start, so the stall alert counts from here.
        let last: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT max(closed_at) FROM settlement_windows")
                .fetch_one(pg.pool())
                .await
                .context("reading the last settlement")?;
        metrics::gauge!("treasury_last_settlement_timestamp_seconds")
            .set(last.unwrap_or_else(chrono::Utc::now).timestamp() as f64);
    }
    if let Err(e) = crate::telemetry::refresh_gauges(store.as_ref(), jobs_for_gauges.as_ref()).await
    {
        tracing::warn!(error = %e, "gauges not refreshed");
    }
    let lag = crate::telemetry::lag::LagGauge::new(
        &kafka::base_config(&config),
        store.clone(),
        lag_groups(&config, roles),
    )
    .context("creating the consumer lag client")?;
    if let Err(e) = lag.refresh().await {
        tracing::warn!(error = %e, "consumer lag not measured");
    }
    tasks.push(tokio::spawn(
        lag.run(trigger.subscribe(), Duration::from_secs(5)),
    ));
    tasks.push(tokio::spawn(refresh_gauges_until(
        store.clone(),
        jobs_for_gauges,
        trigger.subscribe(),
    )));
    let http_stop = trigger.subscribe();
    let app = http::router(http::AppState {
        store: store.clone(),
        pg: Some(pg),
        wake_executor,
        env: Arc::new(|var: &str| std::env::var(var).ok()),
        metrics,
        admin_token: config.admin_token.clone(),
        conversions: Some(http::conversions::ManualConversions {
            codec: codec.clone(),
            commands_topic: config.topics.commands.clone(),
        }),
    });
    let listener = tokio::net::TcpListener::bind(&config.http_addr)
        .await
        .with_context(|| format!("binding TREASURY_HTTP_ADDR={}", config.http_addr))?;
    tracing::info!(addr = %config.http_addr, roles = ?roles, "treasury engine running");
    let server = tokio::spawn(async move {
        let mut stop = http_stop;
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.triggered().await })
            .await;
    });
    shutdown::os_signal().await;
    tracing::info!("shutdown requested; finishing the batch in hand");
    trigger.trigger();
    let stop_all = async {
        for task in tasks {
            let _ = task.await;
        }
        let _ = server.await;
    };
    if tokio::time::timeout(Duration::from_secs(25), stop_all)
        .await
        .is_err()
    {
        tracing::warn!(
            "tasks did not stop within 25s; exiting anyway (uncommitted work is re-read on restart)"
        );
    }
    Ok(())
}

/// The consumer groups of `roles` and the topics each reads.
fn lag_groups(config: &Config, roles: &[Role]) -> Vec<crate::telemetry::lag::GroupTopics> {
    use crate::telemetry::lag::GroupTopics;
    let mut groups = Vec::new();
    if roles.contains(&Role::Aggregator) {
        groups.push(GroupTopics {
            group: config.aggregator_group.clone(),
            topics: vec![
                config.topics.funding.clone(),
                config.topics.withdrawals.clone(),
            ],
        });
    }
    if roles.contains(&Role::Executor) {
        groups.push(GroupTopics {
            group: config.executor_group.clone(),
            topics: vec![config.topics.commands.clone()],
        });
    }
    groups
}

/// Refreshes the database-backed gauges every 15 s until shutdown.
async fn refresh_gauges_until(
    store: Arc<dyn Store>,
    jobs: Arc<dyn crate::store::jobs::JobStore>,
    mut shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(15));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.triggered() => break,
        }
        if let Err(e) = crate::telemetry::refresh_gauges(store.as_ref(), jobs.as_ref()).await {
            tracing::warn!(error = %e, "gauges not refreshed");
        }
    }
}
