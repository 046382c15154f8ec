//! Shared helpers for integration tests: the real broker from `KAFKA_BROKERS`
//! (started by `.ci/run`), unique topic names per test, producing generated
//! events, and running the aggregator in-process or as a child process.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::PgPool;
use treasury::config::Topics;
use treasury::demo::generator::{EventGenerator, FlowMix, Generated};
use treasury::domain::{FlowEvent, FlowKind, Money};
use treasury::window::{WindowSpec, WindowTallies};

/// The broker address, or None (with a message) when no broker is configured
/// outside CI. In CI (`CI` set) a missing broker is a failure.
pub fn brokers() -> Option<String> {
    match std::env::var("KAFKA_BROKERS") {
        Ok(b) if !b.is_empty() => Some(b),
        _ if std::env::var("CI").is_ok() => panic!("KAFKA_BROKERS must be set in CI"),
        _ => {
            eprintln!(
                "SKIPPED: KAFKA_BROKERS is not set; run `bash .ci/run` to start the nisshi broker"
            );
            None
        }
    }
}

/// Base client config for `brokers`.
pub fn base(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

/// Topic names unique to one test.
pub fn unique_topics(test: &str) -> Topics {
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
    Topics {
        funding: format!("{test}.funding.{suffix}"),
        withdrawals: format!("{test}.withdrawals.{suffix}"),
        commands: format!("{test}.commands.{suffix}"),
        postings: format!("{test}.postings.{suffix}"),
        dlq: format!("{test}.dlq.{suffix}"),
        buffer_alerts: format!("{test}.buffer-alerts.{suffix}"),
    }
}

/// Creates the input topics with `partitions` partitions and the outputs with one.
pub async fn create_topics(base: &ClientConfig, topics: &Topics, partitions: i32) {
    treasury::kafka::ensure_topics(base, &[&topics.funding, &topics.withdrawals], partitions)
        .await
        .expect("create input topics");
    treasury::kafka::ensure_topics(
        base,
        &[
            &topics.commands,
            &topics.postings,
            &topics.dlq,
            &topics.buffer_alerts,
        ],
        1,
    )
    .await
    .expect("create output topics");
}

/// A fixed start for generated event times (historical, so the processing
/// clock never interferes with event time).
pub fn epoch() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, 9, 0, 0).unwrap()
}

/// `n` valid events spread in time order over `span`, with up to 10 s of
/// jitter (well inside the default 30 s grace).
pub fn generate(seed: u64, n: usize, span: chrono::Duration) -> Vec<Generated> {
    let mut generator = EventGenerator::new(seed);
    let step = span / n as i32;
    (0..n)
        .map(|i| {
            let at = epoch() + step * i as i32 + generator.jitter(10_000);
            generator.event(at, FlowMix::default())
        })
        .collect()
}

/// The validated event a generated message carries.
pub fn flow_event(g: &Generated) -> FlowEvent {
    let r = g.record.as_ref().expect("valid generated event");
    FlowEvent {
        event_id: r.event_id,
        kind: g.kind,
        user_id: r.user_id,
        amount: Money::positive(r.currency.parse().unwrap(), r.amount).unwrap(),
        occurred_at: r.occurred_at,
    }
}

/// What the windows must hold if every event counts once in its own window.
pub fn expected_tallies(spec: &WindowSpec, events: &[Generated]) -> WindowTallies {
    let mut tallies = WindowTallies::default();
    for g in events.iter().filter(|g| g.record.is_some()) {
        let event = flow_event(g);
        tallies.add(&event, spec.assign(event.occurred_at, None));
    }
    tallies
}

/// Produces messages keyed by user, to the topic of their kind.
pub async fn produce(base: &ClientConfig, topics: &Topics, messages: &[Generated]) {
    let producer: FutureProducer = treasury::kafka::idempotent_producer(base).expect("producer");
    for chunk in messages.chunks(2_000) {
        let sends = chunk.iter().map(|g| {
            let topic = match g.kind {
                FlowKind::Deposit => &topics.funding,
                FlowKind::Withdrawal => &topics.withdrawals,
            };
            let key = g
                .record
                .as_ref()
                .map(|r| r.user_id.to_string())
                .unwrap_or_else(|| "malformed".into());
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
            result.expect("produce");
        }
    }
}

/// Reads every message currently on `topic` (from the beginning), with headers.
pub async fn read_all(
    brokers: &str,
    topic: &str,
    expect_at_least: usize,
) -> Vec<(Vec<u8>, BTreeMap<String, String>)> {
    let consumer: StreamConsumer = base(brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let quiet = Duration::from_secs(if expect_at_least == 0 { 3 } else { 2 });
    loop {
        let wait = if out.len() >= expect_at_least {
            quiet
        } else {
            deadline - tokio::time::Instant::now()
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default())
                                        .into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((m.payload().unwrap_or_default().to_vec(), headers));
            }
            Ok(Err(_)) => {}
            Err(_) => break,
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    out
}

/// The URL of the database behind `pool` (the per-test database of `#[sqlx::test]`).
pub fn database_url(pool: &PgPool) -> String {
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let db = pool
        .connect_options()
        .get_database()
        .expect("test pool names its database")
        .to_owned();
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let server = match base[after_scheme..].find('/') {
        Some(slash) => &base[..after_scheme + slash],
        None => base.as_str(),
    };
    format!("{server}/{db}")
}

/// Number of events counted so far.
pub async fn counted(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM processed_events")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Waits until `done` holds or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, mut done: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if done().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// Environment for a child `treasury run` process.
pub fn child_env(
    database_url: &str,
    brokers: &str,
    topics: &Topics,
    group: &str,
) -> Vec<(String, String)> {
    [
        ("DATABASE_URL", database_url.to_owned()),
        ("KAFKA_BROKERS", brokers.to_owned()),
        ("TREASURY_TOPIC_FUNDING", topics.funding.clone()),
        ("TREASURY_TOPIC_WITHDRAWALS", topics.withdrawals.clone()),
        ("TREASURY_TOPIC_COMMANDS", topics.commands.clone()),
        ("TREASURY_TOPIC_POSTINGS", topics.postings.clone()),
        ("TREASURY_TOPIC_DLQ", topics.dlq.clone()),
        ("TREASURY_TOPIC_BUFFER_ALERTS", topics.buffer_alerts.clone()),
        ("TREASURY_AGGREGATOR_GROUP", group.to_owned()),
        ("TREASURY_EXECUTOR_GROUP", format!("{group}-executor")),
        ("TREASURY_HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("TREASURY_BATCH_SIZE", "250".to_owned()),
        ("TREASURY_IDLE_TIMEOUT", "2s".to_owned()),
        ("RUST_LOG", "warn".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Shared-ownership store over a test pool.
pub fn pg_store(pool: &PgPool) -> Arc<dyn treasury::store::Store> {
    Arc::new(treasury::store::postgres::PgStore::from_pool(pool.clone()))
}

/// Runs the aggregator (ingest, settlement every 100 ms, relay) in this process
/// until `done` holds or `limit` passes; returns whether `done` held.
pub async fn run_aggregator<F, Fut>(
    pool: &PgPool,
    brokers: &str,
    topics: &Topics,
    group: &str,
    spec: WindowSpec,
    limit: Duration,
    done: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    use treasury::ingest::{Ingest, IngestSettings};
    use treasury::relay::Relay;
    use treasury::settlement::{Settlement, SettlementSettings};

    let store = pg_store(pool);
    let codec = treasury::codec::Codec::default();
    let base = base(brokers);
    let (stop, listener) = treasury::shutdown::channel();
    let ingest = Ingest::new(
        &treasury::kafka::consumer_config(&base, group),
        store.clone(),
        codec.clone(),
        treasury::clock::SystemClock::shared(),
        IngestSettings {
            group: group.to_owned(),
            funding_topic: topics.funding.clone(),
            withdrawal_topic: topics.withdrawals.clone(),
            dlq_topic: topics.dlq.clone(),
            spec,
            batch_size: 500,
            batch_max_wait: Duration::from_millis(100),
        },
    )
    .expect("ingest");
    let settlement = Settlement::new(
        store.clone(),
        codec.clone(),
        SettlementSettings {
            spec,
            idle_timeout: chrono::Duration::seconds(2),
            input_topics: vec![topics.funding.clone(), topics.withdrawals.clone()],
            commands_topic: topics.commands.clone(),
            auto_rebalance: true,
            dedup_retention: chrono::Duration::days(7),
            planner: Default::default(),
        },
    );
    let relay = Relay::new(
        store,
        treasury::kafka::idempotent_producer(&base).expect("producer"),
    );
    let tasks = vec![
        tokio::spawn({
            let l = listener.clone();
            async move {
                ingest.run(l).await.expect("ingest");
            }
        }),
        tokio::spawn(settlement.run(listener.clone(), Duration::from_millis(100))),
        tokio::spawn(relay.run(listener, Duration::from_millis(50))),
    ];
    let held = wait_until(limit, done).await;
    stop.trigger();
    for t in tasks {
        t.await.expect("aggregator task");
    }
    held
}

/// Whether every window is closed and `n` events are counted.
pub async fn all_settled(pool: &PgPool, n: i64) -> bool {
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM settlement_windows WHERE status = 'open'")
            .fetch_one(pool)
            .await
            .unwrap();
    let windows: i64 = sqlx::query_scalar("SELECT count(*) FROM settlement_windows")
        .fetch_one(pool)
        .await
        .unwrap();
    counted(pool).await == n && open == 0 && windows > 0
}

/// Window sums as stored: start → (events, late, flows, demand).
pub async fn stored_tallies(pool: &PgPool) -> WindowTallies {
    let store = treasury::store::postgres::PgStore::from_pool(pool.clone());
    let mut tallies = WindowTallies::default();
    let mut tx = treasury::store::Store::begin(&store, treasury::store::LockMode::Shared)
        .await
        .unwrap();
    let starts: Vec<DateTime<Utc>> = sqlx::query_scalar(
        "SELECT window_start FROM settlement_windows WHERE event_count > 0 ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    for start in starts {
        tallies
            .0
            .insert(start, tx.window_tally(start).await.unwrap());
    }
    tallies
}
