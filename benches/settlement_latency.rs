//! Settlement latency: with a steady input rate, how long after a window's
//! end + grace its conversion command is on the commands topic, and how long
//! after that the executor has its `conversion_jobs` row.
//!
//! Run with the nisshi broker and PostgreSQL up (`bash .ci/run` starts both):
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres KAFKA_BROKERS=127.0.0.1:19092 \
//!     cargo bench --bench settlement_latency
//! ```
//!
//! Optional: `BENCH_RATE` (events per second, default 1000; 200 when run by
//! `cargo test`), `BENCH_WINDOWS` (windows measured, default 20; 2 under
//! `cargo test`), `BENCH_WARMUP_WINDOWS` (whole windows left out after the
//! input starts, default 1; 0 under `cargo test`), `BENCH_PARTITIONS`
//! (partitions per input topic, default 4). The engine's own settings apply
//! as in `treasury run`; the bench's defaults are
//! `TREASURY_SCHEDULER_INTERVAL=10s` (3s under `cargo test`),
//! `TREASURY_WINDOW_GRACE=1s` and `TREASURY_PLANNER_WATCH_INTERVAL=0s`, so
//! every command comes from a window close (cycle id `window:<start>`), and
//! `TREASURY_PLANNER_URGENT_PIECES=1`, so each close's refill is one command
//! (the buffer's band is 2,000 wide, and the default three pieces of a band
//! would cut a window's 40,000 into some sixty).
//!
//! The engine runs in this process, wired as `treasury run` wires it (the
//! aggregator's ingest, settlement and relay, and the executor's intake and
//! job worker, on the system clock), against a scratch database
//! (`treasury_lat_<random>`) and fresh topics. A producer sends valid USDC
//! deposits and withdrawals (more withdrawals than deposits) with event time =
//! now at the steady rate. The USDC buffer's minimum sits just below its
//! balance, so each window's net outflow takes it below the minimum and its
//! close plans a USD→USDC refill; the seeded providers are served by the
//! sandbox with no daily volume cap.
//!
//! Measured, all on the machine's one system clock (the engine's clock and
//! PostgreSQL's `now()` read the same clock):
//! 1. close → topic: a consumer of the commands topic (its own group, fetch
//!    wait 10 ms) notes when each command arrives, minus its window's end +
//!    grace; per window, its last command.
//! 2. topic → job: a poll of `conversion_jobs` every 10 ms notes when each
//!    command's job row is first visible (committed), minus the command's
//!    arrival.
//!
//! The split of (1) comes from the outbox row: `created_at` is the start of
//! the settlement transaction that planned the command.
//!
//! The scratch database and topics are removed at the end, also after a
//! failure or Ctrl-C.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use futures::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use treasury::clock::SystemClock;
use treasury::codec::Codec;
use treasury::config::Config;
use treasury::demo::generator::{EventGenerator, FlowMix};
use treasury::domain::FlowKind;
use treasury::health::Health;
use treasury::providers::registry::ProviderRegistry;
use treasury::providers::sandbox::{SandboxBehaviour, SandboxProvider};
use treasury::store::Store;
use treasury::store::jobs::JobStore;
use treasury::store::postgres::PgStore;
use treasury::window::WindowSpec;

#[path = "support/mod.rs"]
mod support;
use support::{SharedCreated, cpu_model, env_number, lock, mem_total, nproc, redacted_server};

/// Seed of the event generator.
const SEED: u64 = 20_261_211;
/// How often the producer sends the events due so far.
const PRODUCE_TICK: Duration = Duration::from_millis(10);
/// How often `conversion_jobs` is read for new rows.
const JOB_POLL: Duration = Duration::from_millis(10);
/// Longest wait past the last measured window's end + grace.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// What the run is asked to do.
#[derive(Debug, Clone)]
struct Settings {
    database_url: String,
    brokers: String,
    rate: u64,
    windows: usize,
    warmup_windows: usize,
    partitions: i32,
    measuring: bool,
}

impl Settings {
    fn from_env(database_url: String, brokers: String) -> anyhow::Result<Self> {
        // `cargo bench` passes `--bench`; under `cargo test --all-targets` the
        // binary runs as a quick smoke test of the same code: short windows,
        // a low rate, two windows.
        let measuring = std::env::args().any(|a| a == "--bench");
        let rate: u64 = env_number("BENCH_RATE", if measuring { 1_000 } else { 200 })?;
        let windows: usize = env_number("BENCH_WINDOWS", if measuring { 20 } else { 2 })?;
        let warmup_windows: usize =
            env_number("BENCH_WARMUP_WINDOWS", if measuring { 1 } else { 0 })?;
        let partitions: i32 = env_number("BENCH_PARTITIONS", 4)?;
        if rate == 0 || windows == 0 || partitions <= 0 {
            bail!("BENCH_RATE, BENCH_WINDOWS and BENCH_PARTITIONS must be positive");
        }
        Ok(Self {
            database_url,
            brokers,
            rate,
            windows,
            warmup_windows,
            partitions,
            measuring,
        })
    }
}

fn how_to_start() {
    println!(
        "settlement_latency: SKIPPED (exit 0) — DATABASE_URL and KAFKA_BROKERS must both be set.\n\
         \n\
         Start the services with `bash .ci/run`, or by hand (see /work/shared/KAFKA.md):\n\
         \n\
         \x20   nisshi broker --listener-url tcp://127.0.0.1:19092 \\\n\
         \x20                 --advertised-listener-url tcp://127.0.0.1:19092 \\\n\
         \x20                 --storage-engine memory://nisshi/ &\n\
         \n\
         and run:\n\
         \n\
         \x20   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\\n\
         \x20   KAFKA_BROKERS=127.0.0.1:19092 cargo bench --bench settlement_latency\n\
         \n\
         DATABASE_URL names any database on the server; the bench creates and drops its own\n\
         scratch database (treasury_lat_<random>) through the server's `postgres` database."
    );
}

#[tokio::main]
async fn main() -> ExitCode {
    support::bench_main("settlement_latency", how_to_start, Settings::from_env, run).await
}

/// The engine's configuration: the bench's defaults, then the process's
/// `TREASURY_*` and `KAFKA_*` settings, then the bench's own topics and
/// groups (the store is handed to the engine directly).
fn engine_config(settings: &Settings, topics: &Topics) -> anyhow::Result<Config> {
    let window = if settings.measuring { "10s" } else { "3s" };
    let mut vars: BTreeMap<String, String> = [
        ("TREASURY_SCHEDULER_INTERVAL", window),
        ("TREASURY_WINDOW_GRACE", "1s"),
        ("TREASURY_PLANNER_WATCH_INTERVAL", "0s"),
        ("TREASURY_PLANNER_URGENT_PIECES", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    vars.extend(
        std::env::vars().filter(|(k, _)| k.starts_with("TREASURY_") || k.starts_with("KAFKA_")),
    );
    let suffix = &topics.suffix;
    for (k, v) in [
        ("KAFKA_BROKERS", settings.brokers.clone()),
        ("TREASURY_TOPIC_FUNDING", topics.funding.clone()),
        ("TREASURY_TOPIC_WITHDRAWALS", topics.withdrawals.clone()),
        ("TREASURY_TOPIC_COMMANDS", topics.commands.clone()),
        ("TREASURY_TOPIC_POSTINGS", topics.postings.clone()),
        ("TREASURY_TOPIC_DLQ", topics.dlq.clone()),
        ("TREASURY_TOPIC_BUFFER_ALERTS", topics.alerts.clone()),
        ("TREASURY_AGGREGATOR_GROUP", format!("lat-agg-{suffix}")),
        ("TREASURY_EXECUTOR_GROUP", format!("lat-exec-{suffix}")),
    ] {
        vars.insert(k.to_owned(), v);
    }
    Config::from_vars(vars).map_err(|e| anyhow::anyhow!("engine configuration: {e}"))
}

/// The run's topics.
struct Topics {
    suffix: String,
    funding: String,
    withdrawals: String,
    commands: String,
    postings: String,
    dlq: String,
    alerts: String,
}

impl Topics {
    fn new() -> Self {
        let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let name = |role: &str| format!("lat.{role}.{suffix}");
        Self {
            funding: name("funding"),
            withdrawals: name("withdrawals"),
            commands: name("commands"),
            postings: name("postings"),
            dlq: name("dlq"),
            alerts: name("alerts"),
            suffix,
        }
    }

    fn all(&self) -> [&str; 6] {
        [
            &self.funding,
            &self.withdrawals,
            &self.commands,
            &self.postings,
            &self.dlq,
            &self.alerts,
        ]
    }
}

/// A command as the topic's consumer saw it.
#[derive(Debug, Clone)]
struct Arrival {
    command_id: String,
    window_start: DateTime<Utc>,
    at: DateTime<Utc>,
}

/// A job row as the poll saw it.
#[derive(Debug, Clone, Copy)]
struct JobSeen {
    visible_at: DateTime<Utc>,
    created_at: DateTime<Utc>,
}

async fn run(
    settings: Settings,
    admin: PgConnectOptions,
    created: SharedCreated,
) -> anyhow::Result<()> {
    let (admin_pool, pg_version) = support::connect_admin(&admin).await?;

    // 1. Scratch database, set so that every window's close plans a refill.
    let name = format!(
        "treasury_lat_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(&admin_pool)
        .await
        .with_context(|| format!("creating database {name}"))?;
    lock(&created).databases.push(name.clone());
    admin_pool.close().await;
    let options = admin.clone().database(&name);
    let pool = PgPoolOptions::new()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.clone())
        .await
        .with_context(|| format!("connecting to {name}"))?;
    let store = PgStore::from_pool(pool.clone());
    store
        .migrate()
        .await
        .with_context(|| format!("migrating {name}"))?;
    prepare(&pool).await?;

    // 2. Topics and the engine's configuration.
    let topics = Topics::new();
    lock(&created)
        .topics
        .extend(topics.all().iter().map(|t| (*t).to_owned()));
    let base = treasury::kafka::client_config(&settings.brokers, &BTreeMap::new());
    treasury::kafka::ensure_topics(
        &base,
        &[&topics.funding, &topics.withdrawals],
        settings.partitions,
    )
    .await
    .context("creating the input topics")?;
    treasury::kafka::ensure_topics(
        &base,
        &[
            &topics.commands,
            &topics.postings,
            &topics.dlq,
            &topics.alerts,
        ],
        1,
    )
    .await
    .context("creating the output topics")?;
    let config = engine_config(&settings, &topics)?;
    let spec = treasury::runtime::window_spec(&config);

    println!("settlement_latency — Treasury Engine settlement latency bench");
    println!(
        "machine:   nproc {}, {}, {} RAM",
        nproc(),
        cpu_model(),
        mem_total()
    );
    println!(
        "services:  PostgreSQL {pg_version} at {}; Kafka (nisshi) at {}",
        redacted_server(&settings.database_url),
        settings.brokers
    );
    println!(
        "workload:  {} events/s (event time = now), {} partitions per input topic; window {}, \
         grace {}, settlement tick {:?}, planner watch {}; {} windows measured after {} warm-up",
        settings.rate,
        settings.partitions,
        humantime::format_duration(config.scheduler_interval),
        humantime::format_duration(config.window_grace),
        treasury::runtime::settlement_tick(&config),
        match config.planner.watch_interval.to_std() {
            Ok(d) if !d.is_zero() => humantime::format_duration(d).to_string(),
            _ => "off".to_owned(),
        },
        settings.windows,
        settings.warmup_windows,
    );

    // 3. The observers: the commands topic and the jobs table.
    let stop_observers = Arc::new(AtomicBool::new(false));
    let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
    let watcher = watch_commands(
        &base,
        &topics.commands,
        arrivals.clone(),
        stop_observers.clone(),
    )?;
    let jobs_seen: Arc<Mutex<HashMap<String, JobSeen>>> = Arc::default();
    let poller = tokio::spawn(poll_jobs(
        pool.clone(),
        jobs_seen.clone(),
        stop_observers.clone(),
    ));

    // 4. The engine, wired as `treasury run` wires it.
    let (trigger, _) = treasury::shutdown::channel();
    let engine = spawn_engine(&config, store.clone(), &trigger)?;
    wait_for_ingest(&pool, settings.partitions * 2).await?;

    // 5. Steady input, event time = now.
    let produced = Arc::new(AtomicU64::new(0));
    let failed_sends = Arc::new(AtomicU64::new(0));
    let stop_producer = Arc::new(AtomicBool::new(false));
    let started = Utc::now();
    let producer = tokio::spawn(produce(
        base.clone(),
        topics.funding.clone(),
        topics.withdrawals.clone(),
        settings.rate,
        produced.clone(),
        failed_sends.clone(),
        stop_producer.clone(),
    ));

    // The windows measured: whole windows after the input started, past the warm-up.
    let length = spec.length;
    let first = spec.window_start(started) + length * (1 + settings.warmup_windows as i32);
    let measured: Vec<DateTime<Utc>> = (0..settings.windows)
        .map(|i| first + length * i as i32)
        .collect();
    let last_due = spec.window_end(*measured.last().expect("at least one window")) + spec.grace;
    println!(
        "input:     from {}; measuring windows {} … {} (last end + grace {})",
        started.format("%H:%M:%S%.3f"),
        first.format("%H:%M:%S"),
        measured.last().expect("a window").format("%H:%M:%S"),
        last_due.format("%H:%M:%S"),
    );

    // 6. Wait until every measured window's commands and jobs are in.
    let give_up = last_due + chrono::Duration::from_std(SETTLE_LIMIT)?;
    let mut reported = BTreeSet::new();
    loop {
        let done = {
            let arrivals = lock(&arrivals);
            let jobs = lock(&jobs_seen);
            let with_command: BTreeSet<DateTime<Utc>> = arrivals
                .iter()
                .filter(|a| measured.contains(&a.window_start))
                .map(|a| a.window_start)
                .collect();
            for start in &with_command {
                if reported.insert(*start) && settings.measuring {
                    let due = spec.window_end(*start) + spec.grace;
                    let first = arrivals
                        .iter()
                        .filter(|a| a.window_start == *start)
                        .map(|a| a.at)
                        .min()
                        .unwrap_or(due);
                    println!(
                        "           window {}: command on the topic {:.0} ms after end + grace ({} of {})",
                        start.format("%H:%M:%S"),
                        millis(first - due),
                        reported.len(),
                        measured.len()
                    );
                }
            }
            with_command.len() == measured.len()
                && arrivals
                    .iter()
                    .filter(|a| measured.contains(&a.window_start))
                    .all(|a| jobs.contains_key(&a.command_id))
        };
        if done && Utc::now() > last_due {
            break;
        }
        if Utc::now() > give_up {
            stop_producer.store(true, Ordering::SeqCst);
            bail!(
                "not every measured window had its command and job {SETTLE_LIMIT:?} after the last \
                 window's end + grace: windows with a command {} of {} (is the buffer setup still \
                 planning a refill at every close?)",
                reported.len(),
                measured.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 7. Stop the input, the engine and the observers.
    stop_producer.store(true, Ordering::SeqCst);
    producer.await.context("the producer panicked")??;
    trigger.trigger();
    for (name, handle) in engine {
        match tokio::time::timeout(Duration::from_secs(30), handle).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => bail!("engine task {name} failed: {e:#}"),
            Ok(Err(e)) => bail!("engine task {name} panicked: {e}"),
            Err(_) => bail!("engine task {name} did not stop within 30 s"),
        }
    }
    // Every job's command reaches the watcher too (it reads on its own).
    let draining = Instant::now();
    while draining.elapsed() < Duration::from_secs(10) {
        let arrived: BTreeSet<String> = lock(&arrivals)
            .iter()
            .map(|a| a.command_id.clone())
            .collect();
        if lock(&jobs_seen).keys().all(|k| arrived.contains(k)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_observers.store(true, Ordering::SeqCst);
    watcher.await.context("the commands watcher panicked")??;
    poller.await.context("the jobs poller panicked")??;
    let sent = produced.load(Ordering::SeqCst);
    let failed = failed_sends.load(Ordering::SeqCst);
    if failed > 0 {
        bail!("{failed} of {sent} events were not delivered to the broker");
    }
    let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events")
        .fetch_one(&pool)
        .await?;
    let elapsed = (Utc::now() - started).to_std().unwrap_or_default();

    // 8. Figures.
    let arrivals = lock(&arrivals).clone();
    let jobs = lock(&jobs_seen).clone();
    let outbox = outbox_created(&pool).await?;
    pool.close().await;
    check_once(&arrivals, &jobs)?;
    let figures = Figures::new(&spec, &measured, &arrivals, &jobs, &outbox)?;
    println!(
        "produced:  {sent} events in {:.1} s ({:.0} events/s); counted {counted}",
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
    );
    figures.report(&settings, &config);
    Ok(())
}

/// Buffers and providers so that every window's close plans one refill: the
/// USDC buffer's minimum is just below its balance (the window's net USDC
/// withdrawals take it under) and its maximum just above (a refill brings it
/// back no further, so the next window needs one again), the USD buffers
/// hold plenty to give, and every provider row is served by the sandbox with
/// no daily cap.
async fn prepare(pool: &PgPool) -> anyhow::Result<()> {
    for sql in [
        "UPDATE buffer_balances SET balance = CASE account_type
             WHEN 'system_buffer_usdc' THEN 100000000 ELSE 1000000000 END",
        "UPDATE buffer_thresholds SET min_threshold = 99999000, target_threshold = 100000000,
             max_threshold = 100001000, conversion_batch_size = 1
             WHERE account_type = 'system_buffer_usdc'",
        "UPDATE buffer_thresholds SET min_threshold = 1000, target_threshold = 2000,
             max_threshold = 1000000000000, conversion_batch_size = 1
             WHERE account_type <> 'system_buffer_usdc'",
        "UPDATE conversion_providers SET provider_type = 'sandbox', daily_volume_limit = NULL",
    ] {
        sqlx::query(sql)
            .execute(pool)
            .await
            .with_context(|| format!("preparing the database: {sql}"))?;
    }
    Ok(())
}

/// The aggregator's and the executor's tasks, built by the engine's own
/// wiring (`treasury run` adds the HTTP server, gauges and signal handling).
fn spawn_engine(
    config: &Config,
    store: PgStore,
    trigger: &treasury::shutdown::ShutdownTrigger,
) -> anyhow::Result<Vec<treasury::runtime::NamedTask>> {
    let clock = SystemClock::shared();
    let jobs: Arc<dyn JobStore> = Arc::new(treasury::telemetry::jobs::Timed::new(
        Arc::new(store.clone()),
        clock.clone(),
    ));
    let store: Arc<dyn Store> = Arc::new(store);
    let codec = Codec::default();
    let health = Health::default();
    let mut tasks = treasury::runtime::spawn_aggregator(
        config,
        store.clone(),
        codec.clone(),
        clock.clone(),
        &health,
        trigger,
    )?;
    let registry = ProviderRegistry::standard(
        |_| None,
        Some(SandboxProvider::new(SEED, SandboxBehaviour::default())),
    );
    let parts = treasury::executor::build(config, store, jobs, codec, clock, registry)?;
    tasks.extend(treasury::executor::spawn(parts, trigger));
    Ok(tasks)
}

/// Waits until the ingest has every input partition and has read it to the end.
async fn wait_for_ingest(pool: &PgPool, partitions: i32) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let ready: i64 =
            sqlx::query_scalar("SELECT count(*) FROM partition_progress WHERE caught_up")
                .fetch_one(pool)
                .await?;
        if ready >= i64::from(partitions) {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the engine's ingest did not report its {partitions} partitions within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `rate` events a second, each stamped with the time it is sent,
/// until told to stop; counts deliveries that failed.
async fn produce(
    base: ClientConfig,
    funding: String,
    withdrawals: String,
    rate: u64,
    produced: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let producer: FutureProducer =
        treasury::kafka::idempotent_producer(&base).context("creating the producer")?;
    let mut generator = EventGenerator::new(SEED);
    // USDC only, small amounts, 30 % deposits: every window drains the USDC buffer.
    let mix = FlowMix {
        usdc_share: 1.0,
        deposit_share: 0.3,
        large_share: 0.0,
        small_max: 11,
    };
    let began = Instant::now();
    let mut sent = 0_u64;
    let mut deliveries = Vec::new();
    let mut tick = tokio::time::interval(PRODUCE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let due = (began.elapsed().as_secs_f64() * rate as f64) as u64;
        let now = Utc::now();
        for _ in sent..due {
            let event = generator.event(now, mix);
            let topic = match event.kind {
                FlowKind::Deposit => &funding,
                FlowKind::Withdrawal => &withdrawals,
            };
            let key = event
                .record
                .as_ref()
                .map(|r| r.user_id.to_string())
                .unwrap_or_default();
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(&event.bytes)) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => {
                    tracing::warn!(error = %e, "event not queued");
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
        produced.fetch_add(due - sent, Ordering::SeqCst);
        sent = due;
        if deliveries.len() >= 1_000 {
            let batch = std::mem::take(&mut deliveries);
            let failed = failed.clone();
            tokio::spawn(async move {
                let bad = join_all(batch)
                    .await
                    .into_iter()
                    .filter(|d| !matches!(d, Ok(Ok(_))))
                    .count();
                failed.fetch_add(bad as u64, Ordering::SeqCst);
            });
        }
    }
    let bad = join_all(deliveries)
        .await
        .into_iter()
        .filter(|d| !matches!(d, Ok(Ok(_))))
        .count();
    failed.fetch_add(bad as u64, Ordering::SeqCst);
    Ok(())
}

/// Notes the arrival time of every command on the commands topic.
fn watch_commands(
    base: &ClientConfig,
    topic: &str,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let consumer: StreamConsumer = base
        .clone()
        .set(
            "group.id",
            format!("lat-watch-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .context("creating the commands consumer")?;
    consumer.subscribe(&[topic]).context("subscribing")?;
    Ok(tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            let message =
                match tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await {
                    Err(_) => continue,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "commands consumer error");
                        continue;
                    }
                    Ok(Ok(m)) => m,
                };
            let at = Utc::now();
            let header = |name: &str| {
                message.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == name)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                })
            };
            let (Some(command_id), Some(cycle_id)) = (header("message-id"), header("cycle-id"))
            else {
                bail!("a command without message-id or cycle-id headers");
            };
            let Some(start) = cycle_id.strip_prefix("window:") else {
                bail!("command {command_id} comes from cycle {cycle_id}, not a window close");
            };
            let window_start = DateTime::parse_from_rfc3339(start)
                .with_context(|| format!("cycle id {cycle_id}"))?
                .with_timezone(&Utc);
            lock(&arrivals).push(Arrival {
                command_id,
                window_start,
                at,
            });
        }
        Ok(())
    }))
}

/// Notes when each job row first becomes visible, and its `created_at`.
async fn poll_jobs(
    pool: PgPool,
    seen: Arc<Mutex<HashMap<String, JobSeen>>>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(JOB_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let rows: Vec<(String, DateTime<Utc>)> =
            sqlx::query_as("SELECT idempotency_key, created_at FROM conversion_jobs")
                .fetch_all(&pool)
                .await?;
        let visible_at = Utc::now();
        let mut seen = lock(&seen);
        for (key, created_at) in rows {
            seen.entry(key).or_insert(JobSeen {
                visible_at,
                created_at,
            });
        }
    }
    Ok(())
}

/// When each command's outbox row was written (the settlement transaction's start).
async fn outbox_created(pool: &PgPool) -> anyhow::Result<HashMap<String, DateTime<Utc>>> {
    let rows: Vec<(uuid::Uuid, DateTime<Utc>)> =
        sqlx::query_as("SELECT id, created_at FROM outbox")
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(id, at)| (id.to_string(), at))
        .collect())
}

/// Every command arrived once and has exactly one job.
fn check_once(arrivals: &[Arrival], jobs: &HashMap<String, JobSeen>) -> anyhow::Result<()> {
    let ids: BTreeSet<&str> = arrivals.iter().map(|a| a.command_id.as_str()).collect();
    if ids.len() != arrivals.len() {
        bail!(
            "{} commands arrived {} times: a command was published twice",
            ids.len(),
            arrivals.len()
        );
    }
    if let Some(missing) = ids.iter().find(|id| !jobs.contains_key(**id)) {
        bail!("command {missing} has no conversion_jobs row");
    }
    if jobs.len() != ids.len() {
        bail!(
            "{} jobs for {} commands on the topic",
            jobs.len(),
            ids.len()
        );
    }
    Ok(())
}

/// The measured latencies, in milliseconds.
struct Figures {
    windows: usize,
    commands: usize,
    /// Per window: its last command's arrival − (end + grace).
    close_to_topic: Vec<f64>,
    /// Per window: the settlement transaction's start − (end + grace).
    close_to_cycle: Vec<f64>,
    /// Per window: its last command's arrival − the settlement transaction's start.
    cycle_to_topic: Vec<f64>,
    /// Per command: job row visible − arrival.
    topic_to_job: Vec<f64>,
    /// Per command: job `created_at` (the intake transaction's start) − arrival.
    topic_to_job_created: Vec<f64>,
}

fn millis(d: chrono::Duration) -> f64 {
    d.num_microseconds()
        .map_or(f64::NAN, |us| us as f64 / 1000.0)
}

impl Figures {
    fn new(
        spec: &WindowSpec,
        measured: &[DateTime<Utc>],
        arrivals: &[Arrival],
        jobs: &HashMap<String, JobSeen>,
        outbox: &HashMap<String, DateTime<Utc>>,
    ) -> anyhow::Result<Self> {
        let mut figures = Figures {
            windows: measured.len(),
            commands: 0,
            close_to_topic: Vec::new(),
            close_to_cycle: Vec::new(),
            cycle_to_topic: Vec::new(),
            topic_to_job: Vec::new(),
            topic_to_job_created: Vec::new(),
        };
        for start in measured {
            let due = spec.window_end(*start) + spec.grace;
            let mine: Vec<&Arrival> = arrivals
                .iter()
                .filter(|a| a.window_start == *start)
                .collect();
            let last = mine
                .iter()
                .max_by_key(|a| a.at)
                .with_context(|| format!("window {start} has no command"))?;
            let cycle = outbox
                .get(&last.command_id)
                .with_context(|| format!("command {} has no outbox row", last.command_id))?;
            figures.close_to_topic.push(millis(last.at - due));
            figures.close_to_cycle.push(millis(*cycle - due));
            figures.cycle_to_topic.push(millis(last.at - *cycle));
            for arrival in mine {
                let job = jobs[&arrival.command_id];
                figures.commands += 1;
                figures
                    .topic_to_job
                    .push(millis(job.visible_at - arrival.at));
                figures
                    .topic_to_job_created
                    .push(millis(job.created_at - arrival.at));
            }
        }
        Ok(figures)
    }

    fn report(&self, settings: &Settings, config: &Config) {
        let rows: [(&str, &Vec<f64>); 5] = [
            (
                "(1) window end + grace → command on topic",
                &self.close_to_topic,
            ),
            (
                "    of which: end + grace → cycle starts",
                &self.close_to_cycle,
            ),
            (
                "    of which: cycle starts → on topic",
                &self.cycle_to_topic,
            ),
            ("(2) command on topic → job row visible", &self.topic_to_job),
            ("    (job created_at − arrival)", &self.topic_to_job_created),
        ];
        println!();
        println!(
            "{:<44} {:>6} {:>9} {:>9} {:>9} {:>9}",
            "latency (ms)", "n", "p50", "p99", "min", "max"
        );
        for (name, values) in rows {
            println!(
                "{:<44} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
                name,
                values.len(),
                percentile(values, 50.0),
                percentile(values, 99.0),
                values.iter().copied().fold(f64::INFINITY, f64::min),
                values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            );
        }
        println!(
            "\n{} windows, {} commands; p99 is the nearest rank (with fewer than 100 samples, the largest).",
            self.windows, self.commands
        );
        println!(
            "summary: settlement_latency rate={}/s window={} grace={} windows={}: \
             close→topic p50 {:.0} ms p99 {:.0} ms; topic→job p50 {:.0} ms p99 {:.0} ms",
            settings.rate,
            humantime::format_duration(config.scheduler_interval),
            humantime::format_duration(config.window_grace),
            self.windows,
            percentile(&self.close_to_topic, 50.0),
            percentile(&self.close_to_topic, 99.0),
            percentile(&self.topic_to_job, 50.0),
            percentile(&self.topic_to_job, 99.0),
        );
    }
}

/// The nearest-rank percentile of `values` (NaN when there are none).
fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
