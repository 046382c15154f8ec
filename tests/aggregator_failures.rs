//! Failure tests for the aggregator: workers killed with SIGKILL at random
//! moments, workers joining and leaving a consumer group mid-stream, and a
//! broker that goes away for a while. Window sums must stay exact.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use sqlx::PgPool;
use treasury::config::Topics;
use treasury::window::WindowSpec;

fn spec() -> WindowSpec {
    WindowSpec::new(Duration::from_secs(300), Duration::from_secs(30))
}

fn spawn_worker(
    pool: &PgPool,
    brokers: &str,
    topics: &Topics,
    group: &str,
    instance: &str,
    idle_timeout: &str,
) -> Child {
    spawn_worker_with(pool, brokers, topics, group, instance, idle_timeout, &[])
}

/// [`spawn_worker`] with more settings on top.
fn spawn_worker_with(
    pool: &PgPool,
    brokers: &str,
    topics: &Topics,
    group: &str,
    instance: &str,
    idle_timeout: &str,
    extra: &[(&str, String)],
) -> Child {
    let log = std::fs::File::create(std::env::temp_dir().join(format!("{group}-{instance}.log")))
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_treasury"))
        .args(["run", "--roles", "aggregator"])
        .envs(common::child_env(
            &common::database_url(pool),
            brokers,
            topics,
            group,
        ))
        .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
        .env("KAFKA_GROUP_INSTANCE_ID", format!("{group}-{instance}"))
        .env("TREASURY_BATCH_SIZE", "25")
        .env("TREASURY_IDLE_TIMEOUT", idle_timeout)
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn treasury run")
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    panic!("worker did not stop within 30 s of SIGTERM");
}

async fn assert_exact(pool: &PgPool, events: &[treasury::demo::generator::Generated]) {
    let expected = common::expected_tallies(&spec(), events);
    let stored = common::stored_tallies(pool).await;
    assert_eq!(
        expected.0.keys().collect::<Vec<_>>(),
        stored.0.keys().collect::<Vec<_>>()
    );
    for (start, want) in &expected.0 {
        let got = &stored.0[start];
        assert_eq!(
            (got.events, &got.flows, &got.demand),
            (want.events, &want.flows, &want.demand),
            "window {start}"
        );
    }
}

/// Whether every planned command has left the outbox for the commands topic.
async fn outbox_sent(pool: &PgPool) -> bool {
    let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(pool)
        .await
        .unwrap();
    unsent == 0
}

async fn assert_commands_unique(pool: &PgPool, brokers: &str, topics: &Topics) {
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT command_id, cycle_id FROM planned_commands WHERE emitted")
            .fetch_all(pool)
            .await
            .unwrap();
    let planned: BTreeSet<String> = rows.iter().map(|(id, _)| id.to_string()).collect();
    let from_windows = rows
        .iter()
        .filter(|(_, cycle)| cycle.starts_with("window:"))
        .count() as i64;
    assert!(
        rows.iter()
            .all(|(_, cycle)| cycle.starts_with("window:") || cycle.starts_with("watch:")),
        "commands come from window closes and watches: {rows:?}"
    );
    let in_results: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(jsonb_array_length(result->'commands')), 0)::bigint FROM settlement_windows WHERE status = 'closed'",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        from_windows, in_results,
        "each closed window planned its commands once"
    );
    let published: BTreeSet<String> = common::read_all(brokers, &topics.commands, planned.len())
        .await
        .into_iter()
        .map(|(_, h)| h["message-id"].clone())
        .collect();
    assert_eq!(
        published, planned,
        "the commands topic holds exactly the planned commands (by id)"
    );
}

/// Starts a worker of `group` and SIGKILLs it at a random moment after it
/// has counted something, again and again, until `(mid_stream, most)`:
/// that many kills landed mid-stream, or that many kills in all, or all
/// `total` events are counted (the moments are seeded by `total`, so a run
/// repeats). Returns (kills, mid-stream kills).
async fn kill_at_random_moments(
    pool: &PgPool,
    brokers: &str,
    topics: &Topics,
    group: &str,
    total: i64,
    (mid_stream, most): (u32, u32),
    extra: &[(&str, String)],
) -> (u32, u32) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(total as u64);
    let (mut kills, mut mid_stream_kills) = (0, 0);
    while mid_stream_kills < mid_stream && kills < most {
        let before = common::counted(pool).await;
        if before == total {
            break;
        }
        let mut worker = spawn_worker_with(pool, brokers, topics, group, "w", "2s", extra);
        common::wait_until(Duration::from_secs(30), || async {
            common::counted(pool).await > before
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..100))).await;
        worker.kill().expect("SIGKILL");
        worker.wait().unwrap();
        kills += 1;
        let after = common::counted(pool).await;
        if after > before && after < total {
            mid_stream_kills += 1;
        }
        eprintln!("kill {kills}: {before} → {after} events counted");
    }
    (kills, mid_stream_kills)
}

#[sqlx::test]
async fn sigkill_at_random_moments_loses_and_doubles_nothing(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("kill");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 4).await;
    let events = common::generate(21, 20_000, chrono::Duration::hours(2));
    common::produce(&base, &topics, &events).await;

    // Each worker is killed at a random moment after it has started counting,
    // so every kill lands mid-stream (between or inside batch transactions).
    let (kills, mid_stream_kills) =
        kill_at_random_moments(&pool, &brokers, &topics, "kill", 20_000, (12, 30), &[]).await;
    assert!(
        mid_stream_kills >= 10,
        "only {mid_stream_kills} kills landed mid-stream"
    );
    let mut worker = spawn_worker(&pool, &brokers, &topics, "kill", "w", "2s");
    let settled = common::wait_until(Duration::from_secs(240), || async {
        common::all_settled(&pool, 20_000).await && outbox_sent(&pool).await
    })
    .await;
    let status = terminate(&mut worker);
    assert!(
        settled,
        "all events counted after {kills} kills; counted {}",
        common::counted(&pool).await
    );
    assert!(status.success(), "SIGTERM gives a clean exit, got {status}");
    assert_exact(&pool, &events).await;
    assert_commands_unique(&pool, &brokers, &topics).await;
}

/// A process running two ingest consumers in the group
/// (`TREASURY_INGEST_WORKERS=2`, with static membership, so each needs its
/// own instance id), killed at random moments and then left to finish:
/// every event counts once, every command is planned and published once, and
/// `/readyz` names both consumers, each holding partitions.
#[sqlx::test]
async fn two_ingest_workers_in_one_process_killed_at_random_count_each_event_once(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("pair");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 4).await;
    let events = common::generate(23, 12_000, chrono::Duration::hours(2));
    common::produce(&base, &topics, &events).await;
    let two = ("TREASURY_INGEST_WORKERS", "2".to_owned());

    let (kills, mid_stream_kills) = kill_at_random_moments(
        &pool,
        &brokers,
        &topics,
        "pair",
        12_000,
        (6, 20),
        std::slice::from_ref(&two),
    )
    .await;
    assert!(
        mid_stream_kills >= 4,
        "only {mid_stream_kills} kills landed mid-stream"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let extra = [
        two.clone(),
        ("TREASURY_HTTP_ADDR", format!("127.0.0.1:{port}")),
    ];
    let mut worker = spawn_worker_with(&pool, &brokers, &topics, "pair", "w", "2s", &extra);
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let both_assigned = common::wait_until(Duration::from_secs(60), || async {
        let Ok(response) = reqwest::get(&readyz).await else {
            return false;
        };
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        ["ingest", "ingest-2"].iter().all(|name| {
            let consumer = &body["consumers"][name];
            consumer["state"] == "assigned" && consumer["partitions"].as_u64() > Some(0)
        })
    })
    .await;
    let settled = common::wait_until(Duration::from_secs(240), || async {
        common::all_settled(&pool, 12_000).await && outbox_sent(&pool).await
    })
    .await;
    let status = terminate(&mut worker);
    assert!(
        both_assigned,
        "/readyz names ingest and ingest-2, each holding partitions"
    );
    assert!(
        settled,
        "all events counted after {kills} kills; counted {}",
        common::counted(&pool).await
    );
    assert!(status.success(), "SIGTERM gives a clean exit, got {status}");
    assert_exact(&pool, &events).await;
    assert_commands_unique(&pool, &brokers, &topics).await;
}

/// Long enough that no partition counts as idle while the test is still
/// producing: an idle partition's watermark moves to the wall clock, which
/// would close the (historical) windows early and count the rest as late.
const GROUP_IDLE_TIMEOUT: &str = "20s";

#[sqlx::test]
async fn workers_joining_and_leaving_the_group_give_the_single_worker_sums(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("group");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 6).await;
    let events = common::generate(22, 12_000, chrono::Duration::hours(1));
    common::produce(&base, &topics, &events[..6_000]).await;

    let mut first = spawn_worker(&pool, &brokers, &topics, "group", "a", GROUP_IDLE_TIMEOUT);
    let mut second = spawn_worker(&pool, &brokers, &topics, "group", "b", GROUP_IDLE_TIMEOUT);
    tokio::time::sleep(Duration::from_secs(3)).await;
    common::produce(&base, &topics, &events[6_000..]).await;
    let mut third = spawn_worker(&pool, &brokers, &topics, "group", "c", GROUP_IDLE_TIMEOUT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        terminate(&mut first).success(),
        "a leaving worker exits cleanly"
    );
    let settled = common::wait_until(Duration::from_secs(180), || {
        common::all_settled(&pool, 12_000)
    })
    .await;
    let (s2, s3) = (terminate(&mut second), terminate(&mut third));
    assert!(settled, "counted {}", common::counted(&pool).await);
    assert!(s2.success() && s3.success());
    assert_exact(&pool, &events).await;
    assert_commands_unique(&pool, &brokers, &topics).await;
}

#[sqlx::test]
async fn a_broker_outage_delays_but_loses_and_doubles_nothing(pool: PgPool) {
    use rdkafka::mocking::MockCluster;
    use treasury::ingest::{Ingest, IngestSettings};

    let cluster = MockCluster::new(1).unwrap();
    let topics = common::unique_topics("outage");
    for t in [
        &topics.funding,
        &topics.withdrawals,
        &topics.dlq,
        &topics.commands,
    ] {
        cluster.create_topic(t, 2, 1).unwrap();
    }
    let brokers = cluster.bootstrap_servers();
    let base = common::base(&brokers);
    let events = common::generate(23, 3_000, chrono::Duration::minutes(30));
    common::produce(&base, &topics, &events[..1_500]).await;

    let store = common::pg_store(&pool);
    let (stop, listener) = treasury::shutdown::channel();
    let ingest = Ingest::new(
        &treasury::kafka::consumer_config(&base, "outage"),
        store.clone(),
        treasury::codec::Codec::default(),
        treasury::clock::SystemClock::shared(),
        IngestSettings {
            group: "outage".into(),
            funding_topic: topics.funding.clone(),
            withdrawal_topic: topics.withdrawals.clone(),
            dlq_topic: topics.dlq.clone(),
            spec: spec(),
            batch_size: 100,
            batch_max_wait: Duration::from_millis(50),
        },
    )
    .unwrap();
    let task = tokio::spawn(ingest.run(listener));
    assert!(
        common::wait_until(Duration::from_secs(60), || async {
            common::counted(&pool).await > 0
        })
        .await
    );

    cluster.broker_down(1).unwrap();
    let during = common::counted(&pool).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.broker_up(1).unwrap();
    common::produce(&base, &topics, &events[1_500..]).await;
    let all = common::wait_until(Duration::from_secs(120), || async {
        common::counted(&pool).await == 3_000
    })
    .await;
    stop.trigger();
    let totals = task.await.unwrap().expect("ingest ends cleanly");
    assert!(
        all,
        "counted {} of 3000 (had {during} when the broker went down)",
        common::counted(&pool).await
    );
    assert_eq!(
        totals.counted, 3_000,
        "each event counted once by this worker"
    );
    assert_eq!(totals.duplicates, 0);

    let settlement = treasury::settlement::Settlement::new(
        Arc::clone(&store),
        treasury::codec::Codec::default(),
        treasury::settlement::SettlementSettings {
            spec: spec(),
            idle_timeout: chrono::Duration::seconds(1),
            input_topics: vec![topics.funding.clone(), topics.withdrawals.clone()],
            commands_topic: topics.commands.clone(),
            auto_rebalance: true,
            dedup_retention: chrono::Duration::days(7),
            planner: Default::default(),
        },
    );
    settlement
        .run_cycle(chrono::Utc::now() + chrono::Duration::minutes(1))
        .await
        .unwrap();
    assert_exact(&pool, &events).await;
}
