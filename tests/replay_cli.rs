//! `treasury replay` rewinds the aggregator's stored offsets from the broker's
//! own view of the topics: to the first offset, to an offset, or to a time.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use sqlx::PgPool;
use treasury::window::WindowSpec;

fn replay(
    pool: &PgPool,
    brokers: &str,
    topics: &treasury::config::Topics,
    args: &[&str],
) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_treasury"))
        .arg("replay")
        .args(args)
        .envs(common::child_env(
            &common::database_url(pool),
            brokers,
            topics,
            "replaycli",
        ))
        .output()
        .expect("run treasury replay");
    assert!(
        output.status.success(),
        "replay {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

async fn stored(pool: &PgPool) -> BTreeMap<(String, i32), i64> {
    sqlx::query_as::<_, (String, i32, i64)>(
        "SELECT topic, partition, next_offset FROM consumer_offsets WHERE consumer_group = 'replaycli'",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(t, p, o)| ((t, p), o))
    .collect()
}

#[sqlx::test]
async fn replay_rewinds_stored_offsets_to_the_beginning_an_offset_or_a_time(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("replaycli");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 2).await;
    let events = common::generate(31, 400, chrono::Duration::minutes(20));
    common::produce(&base, &topics, &events).await;
    let spec = WindowSpec::new(Duration::from_secs(300), Duration::from_secs(30));
    assert!(
        common::run_aggregator(
            &pool,
            &brokers,
            &topics,
            "replaycli",
            spec,
            Duration::from_secs(60),
            || async { common::counted(&pool).await == 400 }
        )
        .await
    );
    let end = stored(&pool).await;
    assert_eq!(end.len(), 4, "two partitions of two topics");
    assert_eq!(end.values().sum::<i64>(), 400);

    let out = replay(&pool, &brokers, &topics, &["--from-beginning"]);
    assert!(out.contains("rewound"), "{out}");
    assert!(
        stored(&pool).await.values().all(|o| *o == 0),
        "every partition from its first offset"
    );

    replay(&pool, &brokers, &topics, &["--from-offset", "30"]);
    let at_30 = stored(&pool).await;
    for (tp, offset) in &at_30 {
        assert_eq!(
            *offset,
            end[tp].min(30),
            "{tp:?} from offset 30, or its end if shorter"
        );
    }

    // Messages were produced moments ago: a time before them rewinds to the
    // start, a time after them to the end.
    let before = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    replay(&pool, &brokers, &topics, &["--from-time", &before]);
    assert!(stored(&pool).await.values().all(|o| *o == 0));
    let after = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    replay(&pool, &brokers, &topics, &["--from-time", &after]);
    assert_eq!(stored(&pool).await, end);

    // Reading again from the beginning counts nothing twice.
    replay(&pool, &brokers, &topics, &["--from-beginning"]);
    assert!(
        common::run_aggregator(
            &pool,
            &brokers,
            &topics,
            "replaycli",
            spec,
            Duration::from_secs(60),
            || async { stored(&pool).await == end }
        )
        .await
    );
    assert_eq!(common::counted(&pool).await, 400);
}
