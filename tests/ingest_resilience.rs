//! The worker on a real broker and PostgreSQL when the input is hostile or
//! the process restarts: a poison event among good ones is refused and the
//! good ones after it are counted; a restarted consumer fetches from the
//! stored offset, not from the start of the partition; and a task that
//! cannot go on stops the process with a non-zero exit.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use chrono::TimeZone;
use sqlx::PgPool;
use treasury::codec::records::FlowRecord;
use treasury::codec::{Codec, SchemaKind};
use treasury::consumer::GroupConsumer;
use treasury::demo::generator::Generated;
use treasury::domain::FlowKind;
use treasury::store::TopicPartition;
use treasury::window::WindowSpec;

fn spec() -> WindowSpec {
    WindowSpec::new(Duration::from_secs(300), Duration::from_secs(30))
}

/// A well-formed deposit dated 1600: valid Avro, a time no window code
/// handled before (it panicked the ingest task).
fn poison() -> Generated {
    let record = FlowRecord {
        event_id: uuid::Uuid::from_u128(0x1600),
        user_id: uuid::Uuid::from_u128(0x1601),
        currency: "USD".into(),
        amount: rust_decimal::Decimal::new(10_000, 2),
        occurred_at: chrono::Utc.with_ymd_and_hms(1600, 1, 1, 0, 0, 0).unwrap(),
    };
    Generated {
        kind: FlowKind::Deposit,
        bytes: record
            .encode(&Codec::default(), SchemaKind::FundingEvent)
            .unwrap(),
        record: None,
        defect: Some("dated 1600"),
    }
}

#[sqlx::test]
async fn a_poison_event_is_refused_and_the_good_ones_after_it_are_counted(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("poison");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 1).await;
    let good = common::generate(91, 400, chrono::Duration::minutes(20));
    let mut messages: Vec<Generated> = good[..200].to_vec();
    messages.push(poison());
    messages.extend_from_slice(&good[200..]);
    common::produce(&base, &topics, &messages).await;

    let settled = common::run_aggregator(
        &pool,
        &brokers,
        &topics,
        "poison",
        spec(),
        Duration::from_secs(90),
        || async { common::counted(&pool).await == 400 },
    )
    .await;
    assert!(
        settled,
        "counted {} of the 400 good events",
        common::counted(&pool).await
    );
    assert_eq!(
        common::stored_tallies(&pool).await,
        common::expected_tallies(&spec(), &good),
        "every good event in its own window, once"
    );
    let dlq = common::read_all(&brokers, &topics.dlq, 1).await;
    assert_eq!(dlq.len(), 1, "the poison event, and only it, is refused");
    let headers = &dlq[0].1;
    assert_eq!(
        headers.get("dlq-error-kind").map(String::as_str),
        Some("ancient_timestamp")
    );
    assert!(headers["dlq-reason"].contains("1600-01-01"), "{headers:?}");
}

#[sqlx::test]
async fn a_restarted_consumer_first_fetches_the_stored_offset(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("restart");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 2).await;
    let events = common::generate(92, 600, chrono::Duration::minutes(20));
    common::produce(&base, &topics, &events[..400]).await;
    let counted = common::run_aggregator(
        &pool,
        &brokers,
        &topics,
        "restart",
        spec(),
        Duration::from_secs(90),
        || async { common::counted(&pool).await == 400 },
    )
    .await;
    assert!(counted, "first run counted the first 400");
    common::produce(&base, &topics, &events[400..]).await;

    let store = common::pg_store(&pool);
    let partitions: Vec<TopicPartition> = [&topics.funding, &topics.withdrawals]
        .iter()
        .flat_map(|topic| {
            (0..2).map(|partition| TopicPartition {
                topic: (*topic).clone(),
                partition,
            })
        })
        .collect();
    let stored = store.load_offsets("restart", &partitions).await.unwrap();
    assert_eq!(stored.len(), 4, "every partition has a stored offset");
    assert!(stored.values().all(|next| *next > 0));

    let mut consumer = GroupConsumer::new(
        &treasury::kafka::consumer_config(&base, "restart"),
        &[&topics.funding, &topics.withdrawals],
        store,
        "restart",
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut read = 0;
    while consumer.first_fetched().len() < 4 && tokio::time::Instant::now() < deadline {
        consumer.take_rebalances().await.unwrap();
        read += consumer
            .next_batch(500, Duration::from_millis(200))
            .await
            .unwrap()
            .len();
    }
    assert_eq!(
        consumer
            .first_fetched()
            .clone()
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>(),
        stored,
        "each partition's first fetched offset is its stored offset"
    );
    assert!(read <= 200, "only the 200 new events were read, not {read}");
    consumer.close();
}

#[sqlx::test]
async fn a_task_that_cannot_go_on_stops_the_process_with_a_failure(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("death");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 1).await;
    let events = common::generate(93, 200, chrono::Duration::minutes(10));
    common::produce(&base, &topics, &events[..100]).await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let log_path = std::env::temp_dir().join(format!("{}.log", topics.funding));
    let mut child = Command::new(env!("CARGO_BIN_EXE_treasury"))
        .args(["run", "--roles", "aggregator"])
        .envs(common::child_env(
            &common::database_url(&pool),
            &brokers,
            &topics,
            "death",
        ))
        .env("TREASURY_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log_path).unwrap()))
        .spawn()
        .expect("spawn treasury run");
    let base_url = format!("http://127.0.0.1:{port}");
    let counted = common::wait_until(Duration::from_secs(60), || async {
        common::counted(&pool).await == 100
    })
    .await;
    assert!(counted, "the worker counted the first 100");
    let ready = common::wait_until(Duration::from_secs(20), || async {
        reqwest::get(format!("{base_url}/readyz"))
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(ready, "ready while every task runs");
    let live = reqwest::get(format!("{base_url}/livez")).await.unwrap();
    assert_eq!(live.status(), 200);

    // The database loses a table the ingest needs: not an outage that
    // passes, so retrying is pointless; the process must say so and exit.
    sqlx::query("DROP TABLE processed_events CASCADE")
        .execute(&pool)
        .await
        .unwrap();
    common::produce(&base, &topics, &events[100..]).await;
    let mut status = None;
    for _ in 0..600 {
        if let Some(s) = child.try_wait().unwrap() {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(status) = status else {
        child.kill().unwrap();
        panic!("the process kept running with a dead ingest task");
    };
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(!status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("task ingest failed"), "log:\n{log}");
}

#[sqlx::test]
async fn ingest_reports_progress_on_the_clock_it_is_given(pool: PgPool) {
    use treasury::clock::{Clock, ManualClock};
    use treasury::ingest::{Ingest, IngestSettings};

    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("clock");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 1).await;
    let events = common::generate(94, 50, chrono::Duration::minutes(5));
    common::produce(&base, &topics, &events).await;
    let at = chrono::Utc.with_ymd_and_hms(2031, 3, 1, 0, 0, 0).unwrap();
    let clock = std::sync::Arc::new(ManualClock::new(at));
    let mut ingest = Ingest::new(
        &treasury::kafka::consumer_config(&base, "clock"),
        common::pg_store(&pool),
        Codec::default(),
        clock.clone(),
        IngestSettings {
            group: "clock".into(),
            funding_topic: topics.funding.clone(),
            withdrawal_topic: topics.withdrawals.clone(),
            dlq_topic: topics.dlq.clone(),
            spec: spec(),
            batch_size: 100,
            batch_max_wait: Duration::from_millis(100),
        },
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let caught_up = || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM partition_progress WHERE caught_up AND caught_up_since = $1",
        )
        .bind(at)
        .fetch_one(&pool)
        .await
        .unwrap();
        n == 2
    };
    while !caught_up().await && tokio::time::Instant::now() < deadline {
        ingest.step().await.unwrap();
    }
    assert_eq!(ingest.totals().counted, 50);
    let reported: Vec<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT updated_at FROM partition_progress")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        reported,
        vec![at, at],
        "progress carries the driver's clock"
    );
    assert_eq!(clock.now(), at);
}
