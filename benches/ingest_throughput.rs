//! Ingest throughput: how many events per second the aggregator's ingest
//! counts into PostgreSQL, next to what the broker can deliver and what a
//! naive one-transaction-per-event consumer manages.
//!
//! Run with the nisshi broker and PostgreSQL up (`bash .ci/run` starts both):
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres KAFKA_BROKERS=127.0.0.1:19092 \
//!     cargo bench --bench ingest_throughput
//! ```
//!
//! Optional: `BENCH_EVENTS` (default 50000; 2000 when run by `cargo test`), `BENCH_PARTITIONS` (default 4),
//! `BENCH_BATCH` (engine batch size, default 1000), `BENCH_BASELINE_EVENTS`
//! (events the naive baseline processes before its rate is extrapolated,
//! default min(N, 10000)), `BENCH_WORKERS` (engine workers in one group, or
//! a list such as `1,2` to run the engine once per count; default 1).
//!
//! One run produces N generated, valid, time-ordered events to fresh funding
//! and withdrawal topics, then reads them three times, each with a new
//! consumer group, and writes their rows once more without Kafka:
//! (a) broker ceiling: a plain rdkafka consumer that only touches each payload;
//! (b) baseline: decode + one PostgreSQL transaction per event (claim the event
//!     id, upsert the window's sums, store the offset);
//! (c) engine: `treasury::ingest::Ingest`, batched, on its own scratch database
//!     (with several workers: as many `Ingest`s in one group, summed);
//! (d) pg ceiling: the rows the engine's batches write, by a plain sqlx
//!     client in batches of the engine's size, no Kafka, no decoding
//!     (see `pg_ceiling`).
//!
//! Scratch databases (`treasury_bench_<random>_*`) and topics are removed at
//! the end, also after a failure or Ctrl-C.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chrono::{DateTime, TimeZone, Utc};
use futures::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rust_decimal::Decimal;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use treasury::codec::Codec;
use treasury::demo::generator::{EventGenerator, FlowMix, Generated};
use treasury::domain::FlowKind;
use treasury::ingest::{Ingest, IngestSettings, decode_event};
use treasury::store::Store;
use treasury::store::postgres::PgStore;
use treasury::window::WindowSpec;

#[path = "support/mod.rs"]
mod support;
use support::{
    SharedCreated, cpu_model, env_number, lock, mem_total, non_empty_env, nproc, redacted_server,
};

#[path = "ingest_throughput/pg_ceiling.rs"]
mod pg_ceiling;

/// Longest a consumer may go without progress before the run is abandoned.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// The engine's default `TREASURY_BATCH_MAX_WAIT`.
const BATCH_MAX_WAIT: Duration = Duration::from_millis(100);
/// Event-time spacing of the generated events.
const EVENT_SPACING_MS: i64 = 100;
/// Seed of the event generator (same seed, same events).
const SEED: u64 = 20_261_125;

/// What the run is asked to do.
#[derive(Debug, Clone)]
struct Settings {
    database_url: String,
    brokers: String,
    events: usize,
    partitions: i32,
    batch: usize,
    baseline_events: usize,
    /// Engine runs: workers in the group, one run per entry.
    workers: Vec<usize>,
}

/// One consumer's measurement.
struct Measured {
    /// Events read (and, except for the ceiling, committed).
    events: u64,
    /// From subscribing until the last event: includes the group join.
    total: Duration,
    /// Events after the first delivery (ceiling) or first commit (baseline,
    /// engine), and the time they took: excludes the group join.
    steady_events: u64,
    steady: Duration,
}

impl Measured {
    fn rate(&self) -> f64 {
        per_second(self.events, self.total)
    }

    /// The rate once messages flow; the total rate when too few events came
    /// after the first delivery to time.
    fn steady_rate(&self) -> f64 {
        if self.steady_events == 0 || self.steady.is_zero() {
            self.rate()
        } else {
            per_second(self.steady_events, self.steady)
        }
    }
}

fn per_second(events: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs > 0.0 {
        events as f64 / secs
    } else {
        f64::INFINITY
    }
}

impl Settings {
    fn from_env(database_url: String, brokers: String) -> anyhow::Result<Self> {
        // `cargo bench` passes `--bench`; under `cargo test --all-targets` the
        // binary runs as a quick smoke test of the same code on fewer events.
        let measuring = std::env::args().any(|a| a == "--bench");
        let events: usize = env_number("BENCH_EVENTS", if measuring { 50_000 } else { 2_000 })?;
        let partitions: i32 = env_number("BENCH_PARTITIONS", 4)?;
        let batch: usize = env_number("BENCH_BATCH", 1_000)?;
        let baseline_events: usize = env_number("BENCH_BASELINE_EVENTS", events.min(10_000))?;
        let workers = match non_empty_env("BENCH_WORKERS") {
            None => vec![1],
            Some(list) => list
                .split(',')
                .map(|w| {
                    w.trim().parse::<usize>().map_err(|e| {
                        anyhow::anyhow!("BENCH_WORKERS={list:?} is not a list of counts: {e}")
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        };
        if workers.is_empty() || workers.contains(&0) {
            bail!("BENCH_WORKERS must name positive worker counts");
        }
        if events == 0 || partitions <= 0 || batch == 0 || baseline_events == 0 {
            bail!(
                "BENCH_EVENTS, BENCH_PARTITIONS, BENCH_BATCH and BENCH_BASELINE_EVENTS must be positive"
            );
        }
        Ok(Self {
            database_url,
            brokers,
            events,
            partitions,
            batch,
            baseline_events: baseline_events.min(events),
            workers,
        })
    }
}

fn how_to_start() {
    println!(
        "ingest_throughput: SKIPPED (exit 0) — DATABASE_URL and KAFKA_BROKERS must both be set.\n\
         \n\
         Start the services with `bash .ci/run` (starts PostgreSQL and the nisshi broker, then\n\
         runs the test suite), or by hand (see /work/shared/KAFKA.md):\n\
         \n\
         \x20   nisshi broker --listener-url tcp://127.0.0.1:19092 \\\n\
         \x20                 --advertised-listener-url tcp://127.0.0.1:19092 \\\n\
         \x20                 --storage-engine memory://nisshi/ &\n\
         \n\
         and run:\n\
         \n\
         \x20   DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\\n\
         \x20   KAFKA_BROKERS=127.0.0.1:19092 cargo bench --bench ingest_throughput\n\
         \n\
         DATABASE_URL names any database on the server; the bench creates and drops its own\n\
         scratch databases (treasury_bench_<random>_*) through the server's `postgres` database."
    );
}

#[tokio::main]
async fn main() -> ExitCode {
    support::bench_main("ingest_throughput", how_to_start, Settings::from_env, run).await
}

async fn run(
    settings: Settings,
    admin: PgConnectOptions,
    created: SharedCreated,
) -> anyhow::Result<()> {
    let (admin_pool, pg_version) = support::connect_admin(&admin).await?;

    println!("ingest_throughput — Treasury Engine ingest bench");
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
        "workload:  N = {} events, {} partitions per topic, engine batch {} (max wait {} ms)",
        settings.events,
        settings.partitions,
        settings.batch,
        BATCH_MAX_WAIT.as_millis()
    );

    // 1. Topics and events.
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let funding = format!("bench.funding.{suffix}");
    let withdrawals = format!("bench.withdrawals.{suffix}");
    let dlq = format!("bench.dlq.{suffix}");
    let base = treasury::kafka::client_config(&settings.brokers, &BTreeMap::new());
    lock(&created)
        .topics
        .extend([funding.clone(), withdrawals.clone(), dlq.clone()]);
    treasury::kafka::ensure_topics(&base, &[&funding, &withdrawals], settings.partitions)
        .await
        .context("creating the input topics")?;
    treasury::kafka::ensure_topics(&base, &[&dlq], 1)
        .await
        .context("creating the DLQ topic")?;

    let events = generate(settings.events);
    let deposits = events
        .iter()
        .filter(|g| g.kind == FlowKind::Deposit)
        .count();
    let payload_bytes: usize = events.iter().map(|g| g.bytes.len()).sum();
    let started = Instant::now();
    produce(&base, &funding, &withdrawals, &events).await?;
    let produced_in = started.elapsed();
    println!(
        "produced:  {} events ({} deposits → {funding}, {} withdrawals → {withdrawals}; \
         {} payload bytes) in {:.2} s = {} events/s (idempotent producer, acks=all)",
        events.len(),
        deposits,
        events.len() - deposits,
        payload_bytes,
        produced_in.as_secs_f64(),
        rate_text(per_second(events.len() as u64, produced_in)),
    );
    let topics = [funding.as_str(), withdrawals.as_str()];
    let spec = WindowSpec::new(Duration::from_secs(300), Duration::from_secs(30));
    let pg_batches =
        pg_ceiling::batches(&events, topics, settings.partitions, settings.batch, &spec)?;
    drop(events);

    // 2a. Ceiling.
    println!("\n(a) ceiling: plain consumer …");
    let ceiling = ceiling(&base, &topics, settings.events as u64).await?;
    println!(
        "    read {} messages in {:.2} s",
        ceiling.events,
        ceiling.total.as_secs_f64()
    );

    // 2b. Baseline.
    println!(
        "(b) baseline: one transaction per event, {} of {} events …",
        settings.baseline_events, settings.events
    );
    let baseline_store = scratch_database(&admin_pool, &admin, "baseline", &created).await?;
    let baseline = baseline(
        &base,
        &topics,
        &funding,
        baseline_store.pool(),
        &spec,
        settings.baseline_events as u64,
    )
    .await?;
    let baseline_rows = processed_events(baseline_store.pool()).await?;
    baseline_store.pool().close().await;
    if baseline_rows != baseline.events {
        bail!(
            "baseline: processed_events holds {baseline_rows} rows, expected {}",
            baseline.events
        );
    }
    println!(
        "    committed {} events in {:.2} s (processed_events: {baseline_rows} rows)",
        baseline.events,
        baseline.total.as_secs_f64()
    );

    // 2c. Engine, once per worker count.
    let mut engines = Vec::new();
    for &workers in &settings.workers {
        println!(
            "(c) engine: treasury::ingest::Ingest, batch {}, {workers} worker(s) in one group …",
            settings.batch
        );
        let engine_store = scratch_database(&admin_pool, &admin, "engine", &created).await?;
        let run = engine(
            &base,
            &funding,
            &withdrawals,
            &dlq,
            engine_store.clone(),
            spec,
            &settings,
            workers,
        )
        .await?;
        let engine_rows = processed_events(engine_store.pool()).await?;
        engine_store.pool().close().await;
        if engine_rows != settings.events as u64 {
            bail!(
                "engine: processed_events holds {engine_rows} rows, expected {}",
                settings.events
            );
        }
        println!(
            "    counted {} events in {:.2} s, {} batch commits, per worker {:?} (processed_events: {engine_rows} rows)",
            run.measured.events,
            run.measured.total.as_secs_f64(),
            run.batches,
            run.per_worker,
        );
        engines.push((workers, run.measured));
    }

    // 2d. The database's ceiling.
    println!(
        "(d) pg ceiling: the engine's rows by a plain sqlx client, {} batches of {} …",
        pg_batches.len(),
        settings.batch
    );
    let mut pg = Vec::new();
    for path in [pg_ceiling::IdPath::Unnest, pg_ceiling::IdPath::Copy] {
        let store = scratch_database(&admin_pool, &admin, "pg", &created).await?;
        let took =
            pg_ceiling::write_all(store.pool(), &pg_batches, path, &spec, &new_group("pg")).await?;
        let rows = processed_events(store.pool()).await?;
        store.pool().close().await;
        if rows != settings.events as u64 {
            bail!(
                "pg ceiling: processed_events holds {rows} rows, expected {}",
                settings.events
            );
        }
        println!(
            "    {}: {rows} rows in {:.2} s",
            path.label(),
            took.as_secs_f64()
        );
        pg.push((
            path,
            Measured {
                events: rows,
                total: took,
                steady_events: rows,
                steady: took,
            },
        ));
    }
    admin_pool.close().await;

    report(&settings, &ceiling, &baseline, &engines, &pg);
    Ok(())
}

/// N valid events, time-ordered, 100 ms apart in event time from a fixed
/// historical start (5-minute windows hold about 3000 each).
fn generate(n: usize) -> Vec<Generated> {
    let start: DateTime<Utc> = Utc
        .with_ymd_and_hms(2026, 1, 5, 9, 0, 0)
        .single()
        .expect("a valid date");
    let mut generator = EventGenerator::new(SEED);
    (0..n)
        .map(|i| {
            let at = start + chrono::Duration::milliseconds(EVENT_SPACING_MS * i as i64);
            generator.event(at, FlowMix::default())
        })
        .collect()
}

/// Produces every event (keyed by user) to its kind's topic and waits for
/// every delivery report.
async fn produce(
    base: &ClientConfig,
    funding: &str,
    withdrawals: &str,
    events: &[Generated],
) -> anyhow::Result<()> {
    let producer: FutureProducer =
        treasury::kafka::idempotent_producer(base).context("creating the producer")?;
    for chunk in events.chunks(5_000) {
        let sends = chunk.iter().map(|g| {
            let topic = match g.kind {
                FlowKind::Deposit => funding,
                FlowKind::Withdrawal => withdrawals,
            };
            let key = g
                .record
                .as_ref()
                .map(|r| r.user_id.to_string())
                .unwrap_or_default();
            let producer = &producer;
            async move {
                producer
                    .send(
                        FutureRecord::to(topic).key(&key).payload(&g.bytes),
                        Duration::from_secs(30),
                    )
                    .await
                    .map(|_| ())
                    .map_err(|(e, _)| e)
            }
        });
        for result in join_all(sends).await {
            result.context("producing an event")?;
        }
    }
    Ok(())
}

/// A consumer in a new group that starts from the beginning and commits nothing.
fn plain_consumer(
    base: &ClientConfig,
    group: &str,
    topics: &[&str],
) -> anyhow::Result<StreamConsumer> {
    let consumer: StreamConsumer = base
        .clone()
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()
        .context("creating a consumer")?;
    consumer.subscribe(topics).context("subscribing")?;
    Ok(consumer)
}

fn new_group(role: &str) -> String {
    format!("bench-{role}-{}", uuid::Uuid::new_v4().simple())
}

/// (a) Reads `n` messages and only touches each payload's length.
async fn ceiling(base: &ClientConfig, topics: &[&str], n: u64) -> anyhow::Result<Measured> {
    let started = Instant::now();
    let consumer = plain_consumer(base, &new_group("ceiling"), topics)?;
    let mut read = 0_u64;
    let mut bytes = 0_usize;
    let mut first: Option<Instant> = None;
    while read < n {
        let message = match tokio::time::timeout(STALL_LIMIT, consumer.recv()).await {
            Err(_) => bail!("ceiling: no message for {STALL_LIMIT:?} after {read} of {n}"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "ceiling consumer error");
                continue;
            }
            Ok(Ok(m)) => m,
        };
        bytes += message.payload().map_or(0, <[u8]>::len);
        read += 1;
        first.get_or_insert_with(Instant::now);
    }
    let ended = Instant::now();
    std::hint::black_box(bytes);
    let first = first.unwrap_or(ended);
    Ok(Measured {
        events: read,
        total: ended - started,
        steady_events: read.saturating_sub(1),
        steady: ended - first,
    })
}

/// (b) Decodes each message and commits it alone: claim the event id, add it
/// to its window's sums, store the next offset — one transaction per event.
async fn baseline(
    base: &ClientConfig,
    topics: &[&str],
    funding: &str,
    pool: &PgPool,
    spec: &WindowSpec,
    n: u64,
) -> anyhow::Result<Measured> {
    let group = new_group("baseline");
    let codec = Codec::default();
    let started = Instant::now();
    let consumer = plain_consumer(base, &group, topics)?;
    let mut done = 0_u64;
    let mut first: Option<Instant> = None;
    while done < n {
        let message = match tokio::time::timeout(STALL_LIMIT, consumer.recv()).await {
            Err(_) => bail!("baseline: no message for {STALL_LIMIT:?} after {done} of {n}"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "baseline consumer error");
                continue;
            }
            Ok(Ok(m)) => m,
        };
        let topic = message.topic().to_owned();
        let partition = message.partition();
        let offset = message.offset();
        let kind = if topic == funding {
            FlowKind::Deposit
        } else {
            FlowKind::Withdrawal
        };
        let event = decode_event(&codec, kind, message.payload(), Utc::now())
            .map_err(|r| anyhow::anyhow!("baseline: {topic}/{partition}@{offset} refused: {r}"))?;
        drop(message);

        let window_start = spec.window_start(event.occurred_at);
        let mut tx = pool.begin().await?;
        let claimed = sqlx::query(
            "INSERT INTO processed_events (event_id, source_topic, partition, \"offset\", window_start)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(event.event_id)
        .bind(&topic)
        .bind(partition)
        .bind(offset)
        .bind(window_start)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if claimed {
            sqlx::query(
                "INSERT INTO settlement_windows (window_start, window_end, event_count)
                 VALUES ($1, $2, 1)
                 ON CONFLICT (window_start) DO UPDATE SET
                    event_count = settlement_windows.event_count + 1",
            )
            .bind(window_start)
            .bind(spec.window_end(window_start))
            .execute(&mut *tx)
            .await?;
            for delta in event.buffer_deltas() {
                let (inflow, outflow) = if delta.delta >= Decimal::ZERO {
                    (delta.delta, Decimal::ZERO)
                } else {
                    (Decimal::ZERO, -delta.delta)
                };
                sqlx::query(
                    "INSERT INTO window_flows (window_start, account_type, inflow, outflow, outflow_events)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (window_start, account_type) DO UPDATE SET
                        inflow = window_flows.inflow + EXCLUDED.inflow,
                        outflow = window_flows.outflow + EXCLUDED.outflow,
                        outflow_events = window_flows.outflow_events + EXCLUDED.outflow_events",
                )
                .bind(window_start)
                .bind(delta.account.as_str())
                .bind(inflow)
                .bind(outflow)
                .bind(i64::from(outflow > Decimal::ZERO))
                .execute(&mut *tx)
                .await?;
            }
            if let Some((direction, amount)) = event.demand() {
                sqlx::query(
                    "INSERT INTO window_demand (window_start, direction, amount, event_count)
                     VALUES ($1, $2, $3, 1)
                     ON CONFLICT (window_start, direction) DO UPDATE SET
                        amount = window_demand.amount + EXCLUDED.amount,
                        event_count = window_demand.event_count + 1",
                )
                .bind(window_start)
                .bind(direction.as_str())
                .bind(amount)
                .execute(&mut *tx)
                .await?;
            }
        }
        sqlx::query(
            "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (consumer_group, topic, partition)
             DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
        )
        .bind(&group)
        .bind(&topic)
        .bind(partition)
        .bind(offset + 1)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        done += 1;
        first.get_or_insert_with(Instant::now);
    }
    let ended = Instant::now();
    let first = first.unwrap_or(ended);
    Ok(Measured {
        events: done,
        total: ended - started,
        steady_events: done.saturating_sub(1),
        steady: ended - first,
    })
}

/// One engine run.
struct EngineRun {
    measured: Measured,
    batches: u64,
    per_worker: Vec<u64>,
}

/// (c) Runs `workers` engine ingests in one new group, each stepping on its
/// own task, until together they have counted every event.
#[allow(clippy::too_many_arguments)]
async fn engine(
    base: &ClientConfig,
    funding: &str,
    withdrawals: &str,
    dlq: &str,
    store: PgStore,
    spec: WindowSpec,
    settings: &Settings,
    workers: usize,
) -> anyhow::Result<EngineRun> {
    let group = new_group("engine");
    let n = settings.events as u64;
    let store: Arc<dyn Store> = Arc::new(store);
    let counted = Arc::new(AtomicU64::new(0));
    let first: Arc<Mutex<Option<(Instant, u64)>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let mut ingest = Ingest::new(
            &treasury::kafka::consumer_config(base, &group),
            store.clone(),
            Codec::default(),
            treasury::clock::SystemClock::shared(),
            IngestSettings {
                group: group.clone(),
                funding_topic: funding.to_owned(),
                withdrawal_topic: withdrawals.to_owned(),
                dlq_topic: dlq.to_owned(),
                spec,
                batch_size: settings.batch,
                batch_max_wait: BATCH_MAX_WAIT,
            },
        )
        .context("creating the ingest consumer")?;
        let counted = counted.clone();
        let first = first.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = 0_u64;
            let mut last_progress = Instant::now();
            loop {
                ingest.step().await.context("engine: ingest step")?;
                let totals = ingest.totals();
                if totals.rejected > 0 || totals.duplicates > 0 {
                    bail!(
                        "engine: unexpected totals {totals:?} (every generated event is valid and unique)"
                    );
                }
                let new = totals.counted - mine;
                mine = totals.counted;
                let all = if new > 0 {
                    last_progress = Instant::now();
                    let all = counted.fetch_add(new, Ordering::SeqCst) + new;
                    lock_first(&first).get_or_insert((Instant::now(), all));
                    all
                } else {
                    counted.load(Ordering::SeqCst)
                };
                if all >= n {
                    break;
                }
                if last_progress.elapsed() > STALL_LIMIT {
                    bail!("engine: no progress for {STALL_LIMIT:?} after {all} of {n}");
                }
            }
            let ended = Instant::now();
            let totals = ingest.totals().clone();
            drop(ingest);
            Ok((ended, totals))
        }));
    }
    let mut ended = started;
    let mut batches = 0;
    let mut per_worker = Vec::new();
    for task in join_all(tasks).await {
        let (at, totals) = task.context("an engine worker panicked")??;
        ended = ended.max(at);
        batches += totals.batches;
        per_worker.push(totals.counted);
    }
    let events: u64 = per_worker.iter().sum();
    let (first_at, first_counted) = lock_first(&first).unwrap_or((ended, events));
    Ok(EngineRun {
        measured: Measured {
            events,
            total: ended - started,
            steady_events: events - first_counted,
            steady: ended - first_at,
        },
        batches,
        per_worker,
    })
}

fn lock_first(
    first: &Mutex<Option<(Instant, u64)>>,
) -> std::sync::MutexGuard<'_, Option<(Instant, u64)>> {
    first
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Creates a scratch database, remembers it for cleanup, and migrates it.
async fn scratch_database(
    admin_pool: &PgPool,
    admin: &PgConnectOptions,
    role: &str,
    created: &SharedCreated,
) -> anyhow::Result<PgStore> {
    let name = format!(
        "treasury_bench_{}_{role}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    sqlx::query(&format!("CREATE DATABASE \"{name}\""))
        .execute(admin_pool)
        .await
        .with_context(|| format!("creating database {name}"))?;
    lock(created).databases.push(name.clone());
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(admin.clone().database(&name))
        .await
        .with_context(|| format!("connecting to {name}"))?;
    let store = PgStore::from_pool(pool);
    store
        .migrate()
        .await
        .with_context(|| format!("migrating {name}"))?;
    Ok(store)
}

async fn processed_events(pool: &PgPool) -> anyhow::Result<u64> {
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(rows)?)
}

fn report(
    settings: &Settings,
    ceiling: &Measured,
    baseline: &Measured,
    engines: &[(usize, Measured)],
    pg: &[(pg_ceiling::IdPath, Measured)],
) {
    let extrapolated = settings.baseline_events < settings.events;
    let mut rows: Vec<(String, &Measured, &str)> = vec![
        ("(a) broker ceiling: plain consumer".into(), ceiling, ""),
        (
            "(b) baseline: 1 PG transaction/event".into(),
            baseline,
            if extrapolated { " *" } else { "" },
        ),
    ];
    for (workers, m) in engines {
        let name = if *workers == 1 {
            "(c) engine: Ingest, batched".to_owned()
        } else {
            format!("(c) engine: {workers} workers, sum")
        };
        rows.push((name, m, ""));
    }
    for (path, m) in pg {
        rows.push((format!("(d) pg ceiling: {}", path.label()), m, ""));
    }
    println!();
    println!(
        "{:<40} {:>8} {:>9} {:>14} {:>14}",
        "consumer", "events", "wall s", "events/s", "events/s"
    );
    println!(
        "{:<40} {:>8} {:>9} {:>14} {:>14}",
        "", "", "", "(incl. join)", "(steady)"
    );
    for (name, m, mark) in rows {
        println!(
            "{:<40} {:>8} {:>9.2} {:>14} {:>14}",
            name,
            format!("{}{mark}", m.events),
            m.total.as_secs_f64(),
            rate_text(m.rate()),
            rate_text(m.steady_rate()),
        );
    }
    println!();
    let pg_ceiling = pg
        .iter()
        .map(|(_, m)| m.steady_rate())
        .fold(0.0_f64, f64::max);
    for (workers, engine) in engines {
        let vs_baseline = engine.steady_rate() / baseline.steady_rate();
        let vs_ceiling = engine.steady_rate() / ceiling.steady_rate();
        let vs_pg = engine.steady_rate() / pg_ceiling;
        println!("engine ({workers} worker(s)):");
        println!(
            "  engine / baseline      = {vs_baseline:.1}x   (incl. join: {:.1}x)",
            engine.rate() / baseline.rate()
        );
        println!(
            "  engine / broker ceiling = {vs_ceiling:.3}   ({:.1}% of the broker read rate; incl. join: {:.3})",
            vs_ceiling * 100.0,
            engine.rate() / ceiling.rate()
        );
        println!(
            "  engine / pg ceiling    = {vs_pg:.3}   (pg ceiling = the faster of (d): {} events/s)",
            rate_text(pg_ceiling)
        );
    }
    if extrapolated {
        println!(
            "* baseline measured on the first {} of {} events; its rate is extrapolated to all N \
             (≈ {:.1} s for {} events at the steady rate)",
            baseline.events,
            settings.events,
            settings.events as f64 / baseline.steady_rate(),
            settings.events
        );
    }
    println!(
        "steady = clock from the first message read (a), first event committed (b), first batch \
         committed (c), first batch written (d) — leaves out the consumer-group join; ratios use \
         steady rates."
    );
}

fn rate_text(rate: f64) -> String {
    if !rate.is_finite() {
        return "n/a".into();
    }
    let whole = rate.round() as u64;
    let digits = whole.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}
