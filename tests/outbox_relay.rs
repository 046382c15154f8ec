//! The outbox relay against the real broker: rows committed to the outbox are
//! published with their `message-id`, marked sent, and two relays running
//! side by side share the rows instead of each publishing all of them.

mod common;

use std::collections::BTreeSet;

use sqlx::PgPool;
use treasury::relay::Relay;
use treasury::store::{LockMode, OutboxMessage};

#[sqlx::test]
async fn two_relays_publish_every_row_once(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let base = common::base(&brokers);
    let topic = format!("outbox.{}", uuid::Uuid::new_v4().simple());
    treasury::kafka::ensure_topics(&base, &[&topic], 1)
        .await
        .unwrap();
    let store = common::pg_store(&pool);
    let messages: Vec<OutboxMessage> = (0..300u128)
        .map(|i| OutboxMessage {
            id: uuid::Uuid::from_u128(i + 1),
            topic: topic.clone(),
            key: Some(format!("k{i}")),
            payload: format!("payload {i}").into_bytes(),
            headers: vec![(
                "message-id".into(),
                uuid::Uuid::from_u128(i + 1).to_string(),
            )],
        })
        .collect();
    let mut tx = store.begin(LockMode::Shared).await.unwrap();
    tx.enqueue(&messages).await.unwrap();
    tx.enqueue(&messages[..10]).await.unwrap();
    tx.commit().await.unwrap();

    let relays: Vec<Relay> = (0..2)
        .map(|_| {
            Relay::new(
                store.clone(),
                treasury::kafka::idempotent_producer(&base).unwrap(),
            )
        })
        .collect();
    let (a, b) = tokio::join!(relays[0].publish_pending(), relays[1].publish_pending());
    let (a, b) = (a.unwrap(), b.unwrap());
    while relays[0].publish_pending().await.unwrap() > 0 {}
    assert!(a + b <= 300, "no row published by both relays ({a} + {b})");

    let unsent: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE sent_at IS NULL")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(unsent, 0);
    let published = common::read_all(&brokers, &topic, 300).await;
    assert_eq!(
        published.len(),
        300,
        "each row once (an enqueued duplicate id is one row)"
    );
    let ids: BTreeSet<String> = published
        .iter()
        .map(|(_, h)| h["message-id"].clone())
        .collect();
    assert_eq!(ids.len(), 300);
}

/// A relay pausing an hour between polls publishes a row committed during
/// its pause as soon as the writer wakes it.
#[sqlx::test]
async fn a_woken_relay_publishes_without_waiting_for_its_pause(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let base = common::base(&brokers);
    let topic = format!("outbox.{}", uuid::Uuid::new_v4().simple());
    treasury::kafka::ensure_topics(&base, &[&topic], 1)
        .await
        .unwrap();
    let store = common::pg_store(&pool);
    let relay = Relay::new(
        store.clone(),
        treasury::kafka::idempotent_producer(&base).unwrap(),
    );
    let waker = relay.waker();
    let (trigger, listener) = treasury::shutdown::channel();
    let running = tokio::spawn(relay.run(listener, std::time::Duration::from_secs(3600)));

    let id = uuid::Uuid::new_v4();
    let mut tx = store.begin(LockMode::Shared).await.unwrap();
    tx.enqueue(&[OutboxMessage {
        id,
        topic: topic.clone(),
        key: None,
        payload: b"woken".to_vec(),
        headers: vec![("message-id".into(), id.to_string())],
    }])
    .await
    .unwrap();
    tx.commit().await.unwrap();
    waker.notify_one();

    let published = common::read_all(&brokers, &topic, 1).await;
    assert_eq!(
        published.len(),
        1,
        "published while the relay's pause lasts"
    );
    assert_eq!(published[0].1["message-id"], id.to_string());
    trigger.trigger();
    running.await.unwrap();
}
