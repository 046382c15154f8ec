//! Buffer alerts fire once per crossing: a settlement that changes a buffer's
//! status queues one record for `treasury.buffer-alerts` (key = account,
//! deterministic id) in its own transaction; cycles that leave it where it is
//! queue nothing; a recovery caused between windows (a conversion landing) is
//! announced by the next settlement. The same on PostgreSQL and in memory.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sqlx::PgPool;
use treasury::alerts::BufferAlert;
use treasury::codec::alert::buffer_alert_from_value;
use treasury::codec::{Codec, SchemaKind};
use treasury::domain::{BufferAccount, BufferStatus};
use treasury::settlement::{Settlement, SettlementSettings};
use treasury::store::memory::MemoryStore;
use treasury::store::postgres::PgStore;
use treasury::store::{LockMode, ProgressUpdate, Store, TopicPartition};
use treasury::window::WindowSpec;

const ALERTS: &str = "alerts";

fn spec() -> WindowSpec {
    WindowSpec::new(Duration::from_secs(300), Duration::from_secs(30))
}

fn t(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 2, 2, 10, 0, 0).unwrap() + chrono::Duration::minutes(minutes)
}

fn settlement(store: Arc<dyn Store>) -> Settlement {
    Settlement::new(
        store,
        Codec::default(),
        SettlementSettings {
            spec: spec(),
            idle_timeout: chrono::Duration::seconds(30),
            input_topics: vec!["funding".into()],
            commands_topic: "commands".into(),
            // Plans are recorded but not sent: only alerts reach the outbox.
            auto_rebalance: false,
            dedup_retention: chrono::Duration::days(7),
            planner: Default::default(),
        },
    )
    .with_buffer_alerts(ALERTS)
}

async fn progress_to(store: &dyn Store, at: DateTime<Utc>) {
    let mut tx = store.begin(LockMode::Shared).await.unwrap();
    tx.record_progress(&[ProgressUpdate {
        tp: TopicPartition {
            topic: "funding".into(),
            partition: 0,
        },
        max_event_time: Some(at),
        caught_up: false,
        now: at,
    }])
    .await
    .unwrap();
    tx.commit().await.unwrap();
}

/// Alerts queued since the last call, decoded, with their keys.
async fn queued_alerts(store: &dyn Store) -> Vec<(BufferAlert, Option<String>)> {
    let codec = Codec::default();
    let pending = store.outbox_pending(100).await.unwrap();
    let ids: Vec<uuid::Uuid> = pending.iter().map(|m| m.id).collect();
    store.mark_sent(&ids).await.unwrap();
    pending
        .into_iter()
        .filter(|m| m.topic == ALERTS)
        .map(|m| {
            let value = codec
                .decode_cached(&m.payload, SchemaKind::BufferAlert)
                .expect("an alert decodes");
            let alert = buffer_alert_from_value(&value).expect("an alert reads");
            assert_eq!(alert.alert_id, m.id, "the message id is the alert id");
            (alert, m.key)
        })
        .collect()
}

/// Runs the scenario on `store`; `set_usdc` moves the USDC buffer's balance
/// the way a completed conversion or an outage would, between windows.
async fn crossings_are_announced_once<F, Fut>(store: Arc<dyn Store>, set_usdc: F)
where
    F: Fn(Decimal) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let settle = settlement(store.clone());
    progress_to(store.as_ref(), t(1)).await;
    settle.run_cycle(t(1)).await.unwrap();
    // Window [0, 5) closes: every buffer at target, nothing to announce.
    progress_to(store.as_ref(), t(6)).await;
    settle.run_cycle(t(6)).await.unwrap();
    assert!(queued_alerts(store.as_ref()).await.is_empty());

    // The USDC buffer drops below its minimum (10,000): one alert at the next close.
    set_usdc(dec!(9000)).await;
    progress_to(store.as_ref(), t(11)).await;
    settle.run_cycle(t(11)).await.unwrap();
    let alerts = queued_alerts(store.as_ref()).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let (alert, key) = &alerts[0];
    assert_eq!(key.as_deref(), Some("system_buffer_usdc"));
    assert_eq!(alert.account, BufferAccount::SystemBufferUsdc);
    assert_eq!(
        (alert.from, alert.to),
        (BufferStatus::Healthy, BufferStatus::CriticalLow)
    );
    assert_eq!(alert.balance, dec!(9000));
    assert_eq!(alert.thresholds.min(), dec!(10000));
    assert_eq!(alert.window_start, t(5));
    assert_eq!(alert.window_end, t(10));
    assert_eq!(
        alert.alert_id,
        BufferAlert::derive_id(&WindowSpec::cycle_id(t(5)), BufferAccount::SystemBufferUsdc)
    );

    // Still low for two more windows: nothing more.
    for minutes in [16, 21] {
        progress_to(store.as_ref(), t(minutes)).await;
        settle.run_cycle(t(minutes)).await.unwrap();
    }
    assert!(queued_alerts(store.as_ref()).await.is_empty());
    // A cycle with no window to close announces nothing either.
    settle.run_cycle(t(21)).await.unwrap();
    assert!(queued_alerts(store.as_ref()).await.is_empty());

    // A refill lands between windows: the next settlement announces the recovery.
    set_usdc(dec!(60000)).await;
    progress_to(store.as_ref(), t(26)).await;
    settle.run_cycle(t(26)).await.unwrap();
    let alerts = queued_alerts(store.as_ref()).await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(
        (alerts[0].0.from, alerts[0].0.to),
        (BufferStatus::CriticalLow, BufferStatus::Healthy)
    );
}

#[sqlx::test]
async fn crossings_are_announced_once_on_postgres(pool: PgPool) {
    let store: Arc<dyn Store> = Arc::new(PgStore::from_pool(pool.clone()));
    crossings_are_announced_once(store, |balance| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "UPDATE buffer_balances SET balance = $1 WHERE account_type = 'system_buffer_usdc'",
            )
            .bind(balance)
            .execute(&pool)
            .await
            .unwrap();
        }
    })
    .await;
}

#[tokio::test]
async fn crossings_are_announced_once_in_memory() {
    let memory = MemoryStore::default();
    let store: Arc<dyn Store> = Arc::new(memory.clone());
    crossings_are_announced_once(store, |balance| {
        let memory = memory.clone();
        async move {
            memory
                .set_balance(BufferAccount::SystemBufferUsdc, balance)
                .await;
        }
    })
    .await;
}
