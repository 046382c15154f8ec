//! The aggregator against the real broker and PostgreSQL: exact window sums,
//! duplicates, late events, poison messages and replays (DESIGN promises 1, 3, 4).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use sqlx::PgPool;
use treasury::codec::records::DeadLetter;
use treasury::codec::{Codec, SchemaKind};
use treasury::store::Store;
use treasury::window::WindowSpec;

fn spec() -> WindowSpec {
    WindowSpec::new(Duration::from_secs(300), Duration::from_secs(30))
}

/// Zero late events expected: tallies compare exactly, counts too.
fn assert_same_tallies(
    expected: &treasury::window::WindowTallies,
    stored: &treasury::window::WindowTallies,
) {
    assert_eq!(
        expected.0.keys().collect::<Vec<_>>(),
        stored.0.keys().collect::<Vec<_>>(),
        "the same windows"
    );
    for (start, want) in &expected.0 {
        let got = &stored.0[start];
        assert_eq!(got.events, want.events, "event count of window {start}");
        assert_eq!(got.flows, want.flows, "flows of window {start}");
        assert_eq!(got.demand, want.demand, "demand of window {start}");
    }
}

#[sqlx::test]
async fn twenty_thousand_events_give_exact_window_sums(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("sums");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 4).await;
    let events = common::generate(11, 20_000, chrono::Duration::hours(2));
    common::produce(&base, &topics, &events).await;

    let settled = common::run_aggregator(
        &pool,
        &brokers,
        &topics,
        "sums",
        spec(),
        Duration::from_secs(180),
        || common::all_settled(&pool, 20_000),
    )
    .await;
    assert!(settled, "all 20k events counted and every window closed");

    let stored = common::stored_tallies(&pool).await;
    assert_same_tallies(&common::expected_tallies(&spec(), &events), &stored);
    let late: i64 =
        sqlx::query_scalar("SELECT sum(late_event_count)::bigint FROM settlement_windows")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        late, 0,
        "events in time order within the grace are never late"
    );

    let planned = PgStoreExt(&pool).emitted_command_ids().await;
    let published = common::read_all(&brokers, &topics.commands, planned.len()).await;
    let published_ids: BTreeSet<String> = published
        .iter()
        .map(|(_, headers)| headers["message-id"].clone())
        .collect();
    assert_eq!(
        published_ids, planned,
        "every planned command published, under its own id"
    );
}

#[sqlx::test]
async fn duplicates_count_once_and_late_events_count_in_the_next_open_window(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("dups");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 2).await;
    let events = common::generate(12, 1_000, chrono::Duration::minutes(30));
    common::produce(&base, &topics, &events).await;
    // Every tenth event again, at new offsets.
    let again: Vec<_> = events.iter().step_by(10).cloned().collect();
    common::produce(&base, &topics, &again).await;
    assert!(
        common::run_aggregator(
            &pool,
            &brokers,
            &topics,
            "dups",
            spec(),
            Duration::from_secs(90),
            || { common::all_settled(&pool, 1_000) }
        )
        .await
    );
    assert_same_tallies(
        &common::expected_tallies(&spec(), &events),
        &common::stored_tallies(&pool).await,
    );

    // An event from a closed window arrives after settlement: it counts, late,
    // in the first open window.
    let next_open: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT next_window_start FROM settlement_state")
            .fetch_one(&pool)
            .await
            .unwrap();
    let late = common::generate(13, 1, chrono::Duration::minutes(1));
    common::produce(&base, &topics, &late).await;
    assert!(
        common::run_aggregator(
            &pool,
            &brokers,
            &topics,
            "dups",
            spec(),
            Duration::from_secs(60),
            || async { common::counted(&pool).await == 1_001 }
        )
        .await
    );
    let (window, late_count): (chrono::DateTime<chrono::Utc>, i64) = sqlx::query_as(
        "SELECT window_start, late_event_count FROM settlement_windows WHERE late_event_count > 0",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(late_count, 1);
    assert!(
        window >= next_open,
        "the late event counts in an open window, not its closed own one"
    );
    let counted_in: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT window_start FROM processed_events WHERE event_id = $1")
            .bind(common::flow_event(&late[0]).event_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(counted_in, window, "and exactly there");
    let late_event = common::flow_event(&late[0]);
    assert!(late_event.occurred_at < window, "it was late");
}

#[sqlx::test]
async fn poison_messages_reach_the_dlq_with_their_reasons(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("poison");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 1).await;
    let mut generator = treasury::demo::generator::EventGenerator::new(5);
    let good = common::generate(14, 20, chrono::Duration::minutes(4));
    let mut messages = Vec::new();
    for (i, g) in good.iter().enumerate() {
        messages.push(g.clone());
        if i < 5 {
            messages.push(generator.malformed(common::epoch(), i));
        }
    }
    common::produce(&base, &topics, &messages).await;
    assert!(
        common::run_aggregator(
            &pool,
            &brokers,
            &topics,
            "poison",
            spec(),
            Duration::from_secs(60),
            || { common::all_settled(&pool, 20) }
        )
        .await
    );
    assert_same_tallies(
        &common::expected_tallies(&spec(), &good),
        &common::stored_tallies(&pool).await,
    );

    let dlq = common::read_all(&brokers, &topics.dlq, 5).await;
    assert_eq!(dlq.len(), 5, "each poison message reaches the DLQ once");
    let codec = Codec::default();
    let mut kinds = BTreeSet::new();
    for (payload, headers) in &dlq {
        let record = DeadLetter::from_value(
            &codec
                .decode_cached(payload, SchemaKind::DeadLetter)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(headers["dlq-reason"], record.reason);
        assert_eq!(record.source_topic, topics.funding);
        assert!(
            messages
                .iter()
                .any(|m| Some(&m.bytes) == record.original_value.as_ref()),
            "the original bytes are kept"
        );
        kinds.insert(record.error_kind);
    }
    assert_eq!(
        kinds,
        [
            "decode",
            "unknown_schema",
            "invalid_amount",
            "unknown_currency"
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        "garbage, unknown schema id, negative amount and wrong scale, unknown currency"
    );
}

#[sqlx::test]
async fn replay_from_the_beginning_changes_no_window_and_emits_no_command(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("replay");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 2).await;
    let events = common::generate(15, 2_000, chrono::Duration::minutes(40));
    common::produce(&base, &topics, &events).await;
    assert!(
        common::run_aggregator(
            &pool,
            &brokers,
            &topics,
            "replay",
            spec(),
            Duration::from_secs(90),
            || { common::all_settled(&pool, 2_000) }
        )
        .await
    );
    let windows_before = snapshot(&pool).await;
    let commands_before = PgStoreExt(&pool).emitted_command_ids().await;
    let outbox_before: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();

    // Rewind every stored offset to 0 and run again.
    let store = treasury::store::postgres::PgStore::from_pool(pool.clone());
    let offsets = store
        .load_offsets(
            "replay",
            &(0..2)
                .flat_map(|p| {
                    [&topics.funding, &topics.withdrawals].map(|t| {
                        treasury::store::TopicPartition {
                            topic: t.clone(),
                            partition: p,
                        }
                    })
                })
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    assert_eq!(offsets.len(), 4);
    store
        .set_offsets(
            "replay",
            &offsets.keys().map(|tp| (tp.clone(), 0)).collect(),
        )
        .await
        .unwrap();
    let reread = common::run_aggregator(
        &pool,
        &brokers,
        &topics,
        "replay",
        spec(),
        Duration::from_secs(90),
        || async {
            let restored = store
                .load_offsets("replay", &offsets.keys().cloned().collect::<Vec<_>>())
                .await
                .unwrap();
            restored == offsets
        },
    )
    .await;
    assert!(
        reread,
        "the replay read every partition back to where it was"
    );
    assert_eq!(snapshot(&pool).await, windows_before, "no window changed");
    assert_eq!(
        PgStoreExt(&pool).emitted_command_ids().await,
        commands_before,
        "no new command"
    );
    let outbox_after: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outbox_after, outbox_before, "nothing new to publish");
}

async fn snapshot(
    pool: &PgPool,
) -> Vec<(
    chrono::DateTime<chrono::Utc>,
    i64,
    i64,
    Option<serde_json::Value>,
)> {
    sqlx::query_as("SELECT window_start, event_count, late_event_count, result FROM settlement_windows WHERE event_count > 0 ORDER BY 1")
        .fetch_all(pool)
        .await
        .unwrap()
}

struct PgStoreExt<'a>(&'a PgPool);

impl PgStoreExt<'_> {
    async fn emitted_command_ids(&self) -> BTreeSet<String> {
        sqlx::query_scalar::<_, uuid::Uuid>("SELECT command_id FROM planned_commands WHERE emitted")
            .fetch_all(self.0)
            .await
            .unwrap()
            .into_iter()
            .map(|id| id.to_string())
            .collect()
    }
}

#[sqlx::test]
async fn a_quiet_partition_does_not_hold_settlement_back(pool: PgPool) {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("idle");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 3).await;
    // Events only ever reach partition 0 of each topic; partitions 1 and 2 stay quiet.
    // They keep arriving while settlement runs, so partition 0 never goes idle:
    // windows can only close because the quiet partitions are left out.
    let events = common::generate(16, 600, chrono::Duration::minutes(30));
    let producer: FutureProducer = treasury::kafka::idempotent_producer(&base).unwrap();
    let feeder = {
        let topics = topics.clone();
        let events = events.clone();
        tokio::spawn(async move {
            for chunk in events.chunks(10) {
                for g in chunk {
                    let topic = match g.kind {
                        treasury::domain::FlowKind::Deposit => &topics.funding,
                        treasury::domain::FlowKind::Withdrawal => &topics.withdrawals,
                    };
                    producer
                        .send(
                            FutureRecord::<(), _>::to(topic)
                                .partition(0)
                                .payload(&g.bytes),
                            Duration::from_secs(10),
                        )
                        .await
                        .map_err(|(e, _)| e)
                        .unwrap();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let closed_while_busy = common::run_aggregator(
        &pool,
        &brokers,
        &topics,
        "idle",
        spec(),
        Duration::from_secs(60),
        || async {
            let closed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM settlement_windows WHERE status = 'closed' AND event_count > 0",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
            closed >= 2
        },
    )
    .await;
    let still_feeding = !feeder.is_finished();
    feeder.await.unwrap();
    assert!(
        closed_while_busy,
        "windows close although two partitions never receive anything"
    );
    assert!(
        still_feeding,
        "and they closed while events were still arriving on partition 0"
    );
    let late: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(late_event_count), 0)::bigint FROM settlement_windows",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(late, 0, "closing early made no event late");
}

#[sqlx::test]
async fn rebuilding_into_an_empty_database_gives_the_same_windows_and_commands(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("rebuild");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 3).await;
    let events = common::generate(17, 3_000, chrono::Duration::hours(1));
    common::produce(&base, &topics, &events).await;
    let run = || async {
        assert!(
            common::run_aggregator(
                &pool,
                &brokers,
                &topics,
                "rebuild",
                spec(),
                Duration::from_secs(90),
                || { common::all_settled(&pool, 3_000) }
            )
            .await
        );
        let windows = snapshot(&pool).await;
        let commands: Vec<(uuid::Uuid, String, rust_decimal::Decimal)> = sqlx::query_as(
            "SELECT p.command_id, p.cycle_id, p.amount FROM planned_commands p
               JOIN settlement_windows w ON p.cycle_id = 'window:' || to_char(w.window_start AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"')
              WHERE w.event_count > 0 ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        (windows, commands)
    };
    let (windows, commands) = run().await;
    assert!(!commands.is_empty(), "the load plans some conversions");

    // Empty the engine's state, as a new database would be, and read the topics again.
    sqlx::raw_sql(
        "TRUNCATE processed_events, window_flows, window_demand, settlement_windows, consumer_offsets,
                  partition_progress, planned_commands, outbox, settlement_triggers;
         UPDATE settlement_state SET next_window_start = NULL;
         UPDATE buffer_balances b SET balance = t.target_threshold FROM buffer_thresholds t
          WHERE t.account_type = b.account_type;",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (rebuilt_windows, rebuilt_commands) = run().await;
    assert_eq!(
        rebuilt_windows, windows,
        "the same windows, sums and results"
    );
    assert_eq!(
        rebuilt_commands, commands,
        "the same command ids and amounts"
    );
}

/// A partition assigned to a group member that has not counted anything yet
/// (a peer still starting) has no progress of its own; it must hold
/// settlement back, not be overlooked because nobody reported on it.
#[sqlx::test]
async fn partitions_held_by_a_peer_that_has_not_counted_hold_settlement_back(pool: PgPool) {
    use rdkafka::consumer::{Consumer, StreamConsumer};

    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("peer");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 4).await;
    let events = common::generate(24, 2_000, chrono::Duration::minutes(30));
    common::produce(&base, &topics, &events).await;

    // The peer joins the group and keeps its partitions, counting nothing.
    let peer: StreamConsumer = treasury::kafka::consumer_config(&base, "peer")
        .create()
        .unwrap();
    peer.subscribe(&[&topics.funding, &topics.withdrawals])
        .unwrap();
    let peer = tokio::spawn(async move {
        loop {
            let _ = peer.recv().await;
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;

    // This worker reads its share to the end and goes idle (2 s) while the
    // peer's partitions stay unread.
    let closed_any = common::run_aggregator(
        &pool,
        &brokers,
        &topics,
        "peer",
        spec(),
        Duration::from_secs(20),
        || async {
            let closed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM settlement_windows WHERE status = 'closed'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            closed > 0
        },
    )
    .await;
    let counted = common::counted(&pool).await;
    assert!(
        counted > 0 && counted < 2_000,
        "the worker counted only its own share ({counted} of 2000)"
    );
    assert!(
        !closed_any,
        "no window closes while a peer's partitions are unread"
    );

    // The peer leaves; the worker takes everything over and settles exactly.
    peer.abort();
    let _ = peer.await;
    assert!(
        common::run_aggregator(
            &pool,
            &brokers,
            &topics,
            "peer",
            spec(),
            Duration::from_secs(120),
            || common::all_settled(&pool, 2_000),
        )
        .await
    );
    assert_same_tallies(
        &common::expected_tallies(&spec(), &events),
        &common::stored_tallies(&pool).await,
    );
}
