//! Wiring for `treasury run`: builds the roles' tasks from the configuration
//! and runs them until SIGTERM/SIGINT, then stops them in order. A task that
//! ends on its own (an error, a panic) stops the process with a non-zero
//! exit, so that the orchestrator restarts it instead of leaving a process
//! that answers health checks and does nothing.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::clock::{SharedClock, SystemClock};
use crate::codec::{Codec, RegisteredOutput, RegistryClient, SchemaKind, SchemaSource};
use crate::config::Config;
use crate::health::Health;
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

/// A role's task, named for logs and `/readyz`; it ends with an error when
/// it cannot go on.
pub type NamedTask = (&'static str, tokio::task::JoinHandle<anyhow::Result<()>>);

/// The codec for this configuration: the local schemas, or with a Schema
/// Registry configured, the registry as the only authority on ids.
pub fn codec_for(config: &Config) -> anyhow::Result<Codec> {
    match &config.schema_registry {
        Some(settings) => {
            let client = RegistryClient::new(settings)?;
            Ok(Codec::new(SchemaSource::with_registry(
                client,
                settings.subject_name_strategy,
                settings.auto_register,
            )))
        }
        None => Ok(Codec::default()),
    }
}

/// The engine's outputs and the topics they are written to.
pub fn outputs(config: &Config) -> [(SchemaKind, &str); 4] {
    [
        (
            SchemaKind::ConversionCommand,
            config.topics.commands.as_str(),
        ),
        (SchemaKind::LedgerPosting, config.topics.postings.as_str()),
        (SchemaKind::DeadLetter, config.topics.dlq.as_str()),
        (
            SchemaKind::BufferAlert,
            config.topics.buffer_alerts.as_str(),
        ),
    ]
}

/// Gives the output schemas their registry ids before anything is written,
/// waiting (with a growing pause) while the registry is unavailable, and
/// logs each subject and id. A refusal (a schema the registry will not
/// register, or one not registered with `SCHEMA_REGISTRY_AUTO_REGISTER=false`)
/// stops start-up.
pub async fn register_outputs(
    codec: &Codec,
    config: &Config,
    shutdown: &mut Shutdown,
) -> anyhow::Result<Vec<RegisteredOutput>> {
    let mut backoff = crate::retry::Backoff::default();
    loop {
        match codec.source().register_outputs(&outputs(config)).await {
            Ok(registered) => {
                for r in &registered {
                    tracing::info!(schema = ?r.kind, subject = %r.subject, id = r.id,
                        "output schema registered");
                }
                return Ok(registered);
            }
            Err(e) if e.is_transient() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay,
                    "schema registry unavailable; waiting before writing anything");
                metrics::counter!("treasury_schema_registry_unavailable_total").increment(1);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.triggered() => anyhow::bail!("stopped while waiting for the schema registry"),
                }
            }
            Err(e) => {
                return Err(e).context("registering the output schemas (SCHEMA_REGISTRY_*)");
            }
        }
    }
}

/// The window spec for this configuration.
pub fn window_spec(config: &Config) -> WindowSpec {
    WindowSpec::new(config.scheduler_interval, config.window_grace)
}

/// The longest settlement sleeps between cycles (it wakes sooner when the
/// next window can close, see [`crate::window::settlement_wake`]).
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

/// Spawns the aggregator's tasks on `store`: `TREASURY_INGEST_WORKERS` ingest
/// consumers in one group (`ingest`, `ingest-2`, …), settlement and the relay.
pub fn spawn_aggregator(
    config: &Config,
    store: Arc<dyn Store>,
    codec: Codec,
    clock: SharedClock,
    health: &Health,
    shutdown: &shutdown::ShutdownTrigger,
) -> anyhow::Result<Vec<NamedTask>> {
    let base = kafka::base_config(config);
    // Settlement closes a window as soon as the ingest has moved the
    // watermark past it, and the relay publishes as soon as it has committed.
    let progress = Arc::new(tokio::sync::Notify::new());
    let mut tasks: Vec<NamedTask> = Vec::new();
    for index in 0..config.ingest_workers {
        let name = crate::ingest::worker_name(index).with_context(|| {
            format!(
                "TREASURY_INGEST_WORKERS: at most {}",
                crate::ingest::MAX_WORKERS
            )
        })?;
        let ingest = Ingest::new(
            &kafka::member_config(&base, &config.aggregator_group, index),
            store.clone(),
            codec.clone(),
            clock.clone(),
            ingest_settings(config),
        )
        .with_context(|| format!("creating the aggregator consumer {name}"))?
        .named(name)
        .reporting_to(health.clone())
        .notifying(progress.clone());
        let stop: Shutdown = shutdown.subscribe();
        tasks.push((
            name,
            tokio::spawn(async move {
                ingest.run(stop).await?;
                Ok(())
            }),
        ));
    }
    let producer = kafka::idempotent_producer(&base).context("creating the outbox producer")?;
    let relay = Relay::new(store.clone(), producer);
    let settlement = Settlement::new(store, codec, settlement_settings(config))
        .with_buffer_alerts(&config.topics.buffer_alerts)
        .with_clock(clock)
        .waking_relay(relay.waker())
        .woken_by_progress(progress);
    let tick = settlement_tick(config);
    let settle_stop = shutdown.subscribe();
    let relay_stop = shutdown.subscribe();
    tasks.push((
        "settlement",
        tokio::spawn(async move {
            settlement.run(settle_stop, tick).await;
            Ok(())
        }),
    ));
    tasks.push(("aggregator-relay", spawn_relay(relay, relay_stop)));
    Ok(tasks)
}

fn spawn_relay(relay: Relay, stop: Shutdown) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move {
        relay.run(stop, Duration::from_millis(200)).await;
        Ok(())
    })
}

/// `treasury run`: the chosen roles against PostgreSQL and Kafka. Returns an
/// error (the process exits non-zero) when a task ends on its own.
pub async fn run(config: Config, roles: &[Role]) -> anyhow::Result<()> {
    let url = config.require_database_url()?;
    let store = PgStore::connect(url)
        .await
        .context("connecting to PostgreSQL")?;
    store.migrate().await.context("applying migrations")?;
    let metrics = crate::telemetry::init_metrics();
    let pg = store.clone();
    // One clock for every driver: ingest, intake, the job worker and its timings.
    let clock = SystemClock::shared();
    let jobs: Arc<dyn crate::store::jobs::JobStore> = Arc::new(crate::telemetry::jobs::Timed::new(
        Arc::new(store.clone()),
        clock.clone(),
    ));
    let jobs_for_gauges = jobs.clone();
    let store: Arc<dyn Store> = Arc::new(store);
    let health = Health::default();
    let provider_names: Vec<String> = jobs
        .providers()
        .await
        .context("reading conversion_providers")?
        .into_iter()
        .map(|p| p.name)
        .collect();
    crate::telemetry::register_series(&provider_names);
    let (trigger, _) = shutdown::channel();
    let codec = codec_for(&config)?;
    let mut registering = trigger.subscribe();
    tokio::select! {
        registered = register_outputs(&codec, &config, &mut registering) => { registered?; }
        _ = shutdown::os_signal() => return Ok(()),
    }
    let mut tasks: Vec<NamedTask> = Vec::new();
    if roles.contains(&Role::Aggregator) {
        tasks.extend(spawn_aggregator(
            &config,
            store.clone(),
            codec.clone(),
            clock.clone(),
            &health,
            &trigger,
        )?);
    }
    let mut wake_executor = None;
    if roles.contains(&Role::Executor) {
        let registry = crate::providers::registry::ProviderRegistry::from_process_env(None);
        let mut parts = crate::executor::build(
            &config,
            store.clone(),
            jobs,
            codec.clone(),
            clock.clone(),
            registry,
        )?;
        parts.intake = parts.intake.reporting_to(health.clone());
        wake_executor = Some(parts.worker.waker());
        tasks.extend(crate::executor::spawn(parts, &trigger));
        if !roles.contains(&Role::Aggregator) {
            // The executor publishes postings and DLQ records through the outbox too.
            let base = kafka::base_config(&config);
            let producer =
                kafka::idempotent_producer(&base).context("creating the outbox producer")?;
            let relay = Relay::new(store.clone(), producer);
            tasks.push(("executor-relay", spawn_relay(relay, trigger.subscribe())));
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
            .set(last.unwrap_or_else(|| clock.now()).timestamp() as f64);
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
    let lag_stop = trigger.subscribe();
    tasks.push((
        "consumer-lag",
        tokio::spawn(async move {
            lag.run(lag_stop, Duration::from_secs(5)).await;
            Ok(())
        }),
    ));
    let gauges_stop = trigger.subscribe();
    let gauges_store = store.clone();
    tasks.push((
        "gauges",
        tokio::spawn(async move {
            refresh_gauges_until(gauges_store, jobs_for_gauges, gauges_stop).await;
            Ok(())
        }),
    ));
    for (name, _) in &tasks {
        health.task_running(name);
    }
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
        health: health.clone(),
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
    let outcome = supervise(tasks, &health, &trigger).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    outcome
}

/// Waits for SIGTERM/SIGINT or for a task to end on its own, whichever comes
/// first; then stops every task (the batch in hand is finished). A task that
/// ended on its own, with an error, a panic or nothing, is an error.
pub async fn supervise(
    tasks: Vec<NamedTask>,
    health: &Health,
    trigger: &shutdown::ShutdownTrigger,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut running: futures::stream::FuturesUnordered<_> = tasks
        .into_iter()
        .map(|(name, handle)| async move { (name, handle.await) })
        .collect();
    let died = tokio::select! {
        _ = shutdown::os_signal() => None,
        Some((name, ended)) = running.next() => Some((name, ended)),
    };
    let failure = died.map(|(name, ended)| {
        let reason = match ended {
            Ok(Ok(())) => "ended without being asked to".to_owned(),
            Ok(Err(e)) => format!("failed: {e:#}"),
            Err(e) if e.is_panic() => format!("panicked: {}", panic_message(e)),
            Err(e) => format!("was cancelled: {e}"),
        };
        tracing::error!(task = name, %reason, "a task stopped; the process exits so that it is restarted");
        health.task_ended(name, &reason);
        anyhow::anyhow!("task {name} {reason}")
    });
    if failure.is_none() {
        tracing::info!("shutdown requested; finishing the batch in hand");
    }
    trigger.trigger();
    let stop_all = async {
        while let Some((name, ended)) = running.next().await {
            match ended {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(task = name, error = %e, "task ended with an error while stopping")
                }
                Err(e) => tracing::warn!(task = name, error = %e, "task panicked while stopping"),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(25), stop_all)
        .await
        .is_err()
    {
        tracing::warn!(
            "tasks did not stop within 25s; exiting anyway (uncommitted work is re-read on restart)"
        );
    }
    failure.map_or(Ok(()), Err)
}

fn panic_message(e: tokio::task::JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
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
