//! A batch committed on either store counts each event once, whatever the
//! batch expected of its ids: a batch holding an id seen before, written
//! the fast way (ids expected new), falls back to checking each id and
//! counts the rest exactly once, with its offsets and window sums.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::{TimeZone, Utc};
use sqlx::PgPool;
use treasury::codec::Codec;
use treasury::ingest::batch::{BatchContext, Consumed, ExpectedIds, commit_batch};
use treasury::store::memory::MemoryStore;
use treasury::store::postgres::PgStore;
use treasury::store::{Store, TopicPartition};
use treasury::window::WindowSpec;

fn consumed(g: &treasury::demo::generator::Generated, offset: i64) -> Consumed {
    Consumed {
        tp: TopicPartition {
            topic: "funding".into(),
            partition: 0,
        },
        offset,
        key: None,
        payload: None,
        outcome: Ok(common::flow_event(g)),
    }
}

#[sqlx::test]
async fn a_partly_replayed_batch_written_the_fast_way_counts_each_event_once(pool: PgPool) {
    replayed_in_part(pool, ExpectedIds::New).await;
}

#[sqlx::test]
async fn a_partly_replayed_batch_checked_id_by_id_counts_each_event_once(pool: PgPool) {
    replayed_in_part(pool, ExpectedIds::SomeSeen).await;
}

async fn replayed_in_part(pool: PgPool, expected: ExpectedIds) {
    let events: Vec<_> = common::generate(7, 6, chrono::Duration::minutes(2))
        .into_iter()
        .filter(|g| g.record.is_some())
        .collect();
    assert!(events.len() >= 4, "the generator gave too few valid events");
    let spec = WindowSpec::new(
        std::time::Duration::from_secs(300),
        std::time::Duration::from_secs(30),
    );
    let codec = Codec::default();
    let caught_up = HashSet::new();
    let stores: Vec<(&str, Arc<dyn Store>)> = vec![
        ("memory", Arc::new(MemoryStore::default())),
        ("postgres", Arc::new(PgStore::from_pool(pool))),
    ];
    for (name, store) in stores {
        let ctx = BatchContext {
            store: store.as_ref(),
            codec: &codec,
            group: "g",
            spec: &spec,
            dlq_topic: "dlq",
            caught_up: &caught_up,
            now: Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap(),
            expected: ExpectedIds::New,
        };
        // The first two events, committed once.
        let first: Vec<Consumed> = events[..2]
            .iter()
            .enumerate()
            .map(|(i, g)| consumed(g, i as i64))
            .collect();
        let outcome = commit_batch(&ctx, &first).await.unwrap();
        assert_eq!((outcome.counted, outcome.duplicates), (2, 0), "{name}");
        // The next batch re-sends the second event (a producer's retry)
        // among new ones.
        let second: Vec<Consumed> = [&events[1], &events[2], &events[3]]
            .iter()
            .enumerate()
            .map(|(i, g)| consumed(g, 2 + i as i64))
            .collect();
        let ctx = BatchContext { expected, ..ctx };
        let outcome = commit_batch(&ctx, &second).await.unwrap();
        assert_eq!(
            (outcome.counted, outcome.duplicates),
            (2, 1),
            "{name}, {expected:?}"
        );
        assert_eq!(ExpectedIds::after(&outcome), ExpectedIds::SomeSeen);
        let tp = TopicPartition {
            topic: "funding".into(),
            partition: 0,
        };
        assert_eq!(
            store
                .load_offsets("g", std::slice::from_ref(&tp))
                .await
                .unwrap(),
            BTreeMap::from([(tp, 5)]),
            "{name}, {expected:?}"
        );
        let counted: i64 = store
            .windows()
            .await
            .unwrap()
            .iter()
            .map(|w| w.event_count)
            .sum();
        assert_eq!(counted, 4, "{name}, {expected:?}: four distinct events");
    }
}
