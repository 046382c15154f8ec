//! The settlement cycle against PostgreSQL: in-flight conversions are counted
//! (no new command every cycle while a buffer stays low), two instances never
//! settle a window twice, operator triggers, and auto-rebalance switched off —
//! the original engine's defects, each shown absent.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal_macros::dec;
use sqlx::PgPool;
use treasury::codec::Codec;
use treasury::domain::{Currency, FlowEvent, FlowKind, Money};
use treasury::planner::PlannerSettings;
use treasury::settlement::{Settlement, SettlementSettings};
use treasury::store::postgres::PgStore;
use treasury::store::{LockMode, ProgressUpdate, Store, TopicPartition};
use treasury::window::{Assignment, WindowSpec, WindowTallies};

fn spec() -> WindowSpec {
    WindowSpec::new(Duration::from_secs(300), Duration::from_secs(30))
}

fn t(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 2, 2, 10, 0, 0).unwrap() + chrono::Duration::minutes(minutes)
}

/// Settlement as these tests drive it: at window closes and triggers only
/// (the watch between closes has its own test).
fn settlement(pool: &PgPool, auto_rebalance: bool) -> Settlement {
    settlement_with(
        pool,
        auto_rebalance,
        PlannerSettings {
            watch_interval: chrono::Duration::zero(),
            // One command per refill: these tests count commands across
            // cycles and instances, not the pieces of an urgent refill.
            urgent_pieces: 1,
            ..PlannerSettings::default()
        },
    )
}

fn settlement_with(pool: &PgPool, auto_rebalance: bool, planner: PlannerSettings) -> Settlement {
    Settlement::new(
        Arc::new(PgStore::from_pool(pool.clone())),
        Codec::default(),
        SettlementSettings {
            spec: spec(),
            idle_timeout: chrono::Duration::seconds(30),
            input_topics: vec!["funding".into()],
            commands_topic: "commands".into(),
            auto_rebalance,
            dedup_retention: chrono::Duration::days(7),
            planner,
        },
    )
}

/// The first cycle of a fresh system opens the window holding the watermark;
/// windows close from the next cycle on.
async fn start_clock(pool: &PgPool) {
    progress_to(pool, t(1)).await;
    let opened = settlement(pool, true).run_cycle(t(1)).await.unwrap();
    assert!(opened.is_empty(), "nothing closes on the first cycle");
}

/// One input partition whose event time has reached `at` and that keeps going.
async fn progress_to(pool: &PgPool, at: DateTime<Utc>) {
    let store = PgStore::from_pool(pool.clone());
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

async fn set_balance(pool: &PgPool, account: &str, balance: rust_decimal::Decimal) {
    sqlx::query("UPDATE buffer_balances SET balance = $2 WHERE account_type = $1")
        .bind(account)
        .bind(balance)
        .execute(pool)
        .await
        .unwrap();
}

async fn planned(pool: &PgPool) -> Vec<(uuid::Uuid, String, rust_decimal::Decimal, bool)> {
    sqlx::query_as("SELECT command_id, direction, amount, emitted FROM planned_commands ORDER BY created_at, command_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn finish_job(pool: &PgPool, command_id: uuid::Uuid, status: &str) {
    sqlx::query(
        "INSERT INTO conversion_jobs (id, idempotency_key, direction, trigger_reason, status, amount,
            source_account, source_currency, source_amount, destination_account, destination_currency)
         VALUES ($1, $1::text, 'usd_to_usdc', 'emergency', $2, 1, 'system_buffer_fiat', 'USD', 1,
                 'system_buffer_usdc', 'USDC')",
    )
    .bind(command_id)
    .bind(status)
    .execute(pool)
    .await
    .unwrap();
}

/// Counts USDC withdrawals totalling `total` into the window starting at `window`.
async fn withdraw_usdc(
    pool: &PgPool,
    window: DateTime<Utc>,
    at: DateTime<Utc>,
    total: rust_decimal::Decimal,
) {
    let store = PgStore::from_pool(pool.clone());
    let mut tx = store.begin(LockMode::Shared).await.unwrap();
    let mut tallies = WindowTallies::default();
    tallies.add(
        &FlowEvent {
            event_id: uuid::Uuid::new_v4(),
            kind: FlowKind::Withdrawal,
            user_id: uuid::Uuid::from_u128(7),
            amount: Money::positive(Currency::Usdc, total).unwrap(),
            occurred_at: at,
        },
        Assignment {
            window_start: window,
            late: false,
        },
    );
    tx.add_tallies(&tallies, chrono::Duration::minutes(5))
        .await
        .unwrap();
    tx.commit().await.unwrap();
}

#[sqlx::test]
async fn a_burst_in_an_open_window_is_answered_before_the_window_closes(pool: PgPool) {
    let planner = PlannerSettings {
        urgent_pieces: 1,
        ..PlannerSettings::default()
    };
    assert_eq!(planner.watch_interval, chrono::Duration::minutes(1));
    let settle = settlement_with(&pool, true, planner);
    progress_to(&pool, t(1)).await;
    assert!(
        settle.run_cycle(t(1)).await.unwrap().is_empty(),
        "buffers at target: the watch plans nothing"
    );
    // 45,000 USDC leaves system_buffer_usdc (target 50,000, min 10,000)
    // three minutes into the window 10:00–10:05, which closes at 10:05:30.
    withdraw_usdc(&pool, t(0), t(3), dec!(45000)).await;
    progress_to(&pool, t(4)).await;
    let watched = settle.run_cycle(t(4)).await.unwrap();
    let commands = planned(&pool).await;
    assert_eq!(commands.len(), 1, "the watch refills at once: {watched:?}");
    assert_eq!(commands[0].1, "usd_to_usdc");
    assert!(
        commands[0].2 >= dec!(45000),
        "back to at least the target: {}",
        commands[0].2
    );
    assert!(watched[0].cycle_id.starts_with("watch:"));
    assert!(watched[0].emitted);
    // Within the watch interval nothing runs again; after it, the refill in
    // flight is counted and nothing new is planned.
    progress_to(&pool, t(5)).await;
    assert!(
        settle
            .run_cycle(t(4) + chrono::Duration::seconds(30))
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        settle
            .run_cycle(t(5) + chrono::Duration::seconds(1))
            .await
            .unwrap()
            .is_empty()
    );
    // The window's close settles the flows and plans nothing twice.
    progress_to(&pool, t(6)).await;
    let closed = settle.run_cycle(t(6)).await.unwrap();
    assert!(closed.iter().any(|r| r.cycle_id.starts_with("window:")));
    assert_eq!(
        planned(&pool).await.len(),
        1,
        "the close counts the watch's refill"
    );
    let balance: rust_decimal::Decimal = sqlx::query_scalar(
        "SELECT balance FROM buffer_balances WHERE account_type = 'system_buffer_usdc'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        balance,
        dec!(5000),
        "the book settles the withdrawal once, at the close"
    );
}

#[sqlx::test]
async fn a_low_buffer_gets_one_command_not_one_per_cycle(pool: PgPool) {
    set_balance(&pool, "system_buffer_usdc", dec!(5000)).await;
    let settle = settlement(&pool, true);
    start_clock(&pool).await;
    progress_to(&pool, t(6)).await;
    let first = settle.run_cycle(t(6)).await.unwrap();
    let commands = planned(&pool).await;
    assert_eq!(commands.len(), 1, "one refill planned: {first:?}");
    let (id, direction, amount, emitted) = commands[0].clone();
    assert_eq!(
        (direction.as_str(), amount, emitted),
        ("usd_to_usdc", dec!(45000), true)
    );

    // Later cycles while the conversion is in flight: nothing new.
    for minutes in [11, 16, 21] {
        progress_to(&pool, t(minutes)).await;
        settle.run_cycle(t(minutes)).await.unwrap();
    }
    assert_eq!(
        planned(&pool).await.len(),
        1,
        "in-flight conversions are counted"
    );
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outbox, 1);

    // The job fails: the buffer is still low, so the next cycle plans again, under a new id.
    finish_job(&pool, id, "failed").await;
    progress_to(&pool, t(26)).await;
    settle.run_cycle(t(26)).await.unwrap();
    let after_failure = planned(&pool).await;
    assert_eq!(after_failure.len(), 2);
    assert_ne!(
        after_failure[1].0, id,
        "a new command, not the failed one again"
    );
}

#[sqlx::test]
async fn two_instances_never_settle_a_window_twice(pool: PgPool) {
    set_balance(&pool, "system_buffer_usdc", dec!(5000)).await;
    start_clock(&pool).await;
    progress_to(&pool, t(60)).await;
    let (a, b) = (settlement(&pool, true), settlement(&pool, true));
    let runs = (0..6).map(|i| {
        let s = if i % 2 == 0 { a.clone() } else { b.clone() };
        tokio::spawn(async move { s.run_cycle(t(60)).await.unwrap() })
    });
    let mut cycles = Vec::new();
    for r in runs {
        cycles.extend(r.await.unwrap().into_iter().map(|c| c.cycle_id));
    }
    let unique: std::collections::BTreeSet<_> = cycles.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        cycles.len(),
        "no window closed twice: {cycles:?}"
    );
    assert_eq!(
        planned(&pool).await.len(),
        1,
        "one command between both instances"
    );
}

#[sqlx::test]
async fn an_operator_trigger_runs_a_cycle_at_once(pool: PgPool) {
    let store = PgStore::from_pool(pool.clone());
    set_balance(&pool, "broker_operational", dec!(10000)).await;
    let id = store.request_trigger("test").await.unwrap();
    let results = settlement(&pool, true).run_cycle(t(0)).await.unwrap();
    let trigger = results
        .iter()
        .find(|r| r.cycle_id == format!("trigger:{id}"))
        .expect("trigger handled");
    assert_eq!(trigger.plan.commands.len(), 1);
    assert_eq!(
        trigger.plan.commands[0].destination_account.as_str(),
        "broker_operational"
    );
    let handled: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT handled_at FROM settlement_triggers WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(handled.is_some());
    // A second cycle does not handle it again.
    let again = settlement(&pool, true).run_cycle(t(0)).await.unwrap();
    assert!(again.iter().all(|r| !r.cycle_id.starts_with("trigger:")));
}

#[sqlx::test]
async fn with_auto_rebalance_off_plans_are_recorded_but_nothing_is_sent(pool: PgPool) {
    set_balance(&pool, "system_buffer_usdc", dec!(5000)).await;
    start_clock(&pool).await;
    progress_to(&pool, t(6)).await;
    let results = settlement(&pool, false).run_cycle(t(6)).await.unwrap();
    assert!(
        results
            .iter()
            .any(|r| !r.plan.commands.is_empty() && !r.emitted)
    );
    let commands = planned(&pool).await;
    assert_eq!(commands.len(), 1);
    assert!(!commands[0].3, "recorded as not emitted");
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outbox, 0, "nothing to publish");
}

/// A cycle that closes a window wakes the outbox relay once it has
/// committed; a cycle with nothing to close or plan does not.
#[sqlx::test]
async fn a_closing_cycle_wakes_the_relay(pool: PgPool) {
    use futures::FutureExt;

    start_clock(&pool).await;
    let relay = Arc::new(tokio::sync::Notify::new());
    let settle = settlement(&pool, true).waking_relay(relay.clone());
    progress_to(&pool, t(2)).await;
    assert!(settle.run_cycle(t(2)).await.unwrap().is_empty());
    assert!(
        relay.notified().now_or_never().is_none(),
        "nothing committed for the relay"
    );
    progress_to(&pool, t(6)).await;
    let closed = settle.run_cycle(t(6)).await.unwrap();
    assert!(closed.iter().any(|r| r.cycle_id.starts_with("window:")));
    assert!(
        relay.notified().now_or_never().is_some(),
        "the relay is woken after the close"
    );
}

/// A job's lead time counts from its command's time, as the age of a
/// conversion in flight does: a job taken in late by the executor is not
/// made to look quicker than it was (which would make the next refill in
/// flight look overdue and be planned twice). A job whose command was not
/// planned here counts from its intake.
#[sqlx::test]
async fn lead_times_count_from_the_command_not_the_jobs_intake(pool: PgPool) {
    let planned = uuid::Uuid::from_u128(41);
    let foreign = uuid::Uuid::from_u128(42);
    sqlx::query(
        "INSERT INTO planned_commands (command_id, cycle_id, direction, trigger_reason, currency,
                amount, source_account, destination_account, emitted, created_at)
         VALUES ($1, 'window:lead', 'usd_to_usdc', 'emergency', 'USD', 500,
                 'broker_operational', 'system_buffer_usdc', TRUE, now() - interval '90 seconds')",
    )
    .bind(planned)
    .execute(&pool)
    .await
    .unwrap();
    for (id, key) in [
        (1u128, planned.to_string()),
        (2, foreign.to_string()),
        (3, "manual-7".to_owned()),
    ] {
        sqlx::query(
            "INSERT INTO conversion_jobs (id, idempotency_key, direction, trigger_reason, status, amount,
                source_account, source_currency, source_amount, destination_account, destination_currency,
                created_at, completed_at)
             VALUES ($1, $2, 'usd_to_usdc', 'emergency', 'completed', 500, 'broker_operational', 'USD', 500,
                     'system_buffer_usdc', 'USDC', now() - interval '30 seconds', now())",
        )
        .bind(uuid::Uuid::from_u128(id))
        .bind(key)
        .execute(&pool)
        .await
        .unwrap();
    }
    let store = PgStore::from_pool(pool.clone());
    let mut tx = store.begin(LockMode::Exclusive).await.unwrap();
    let records = tx
        .planning_records(Utc::now() - chrono::Duration::hours(1))
        .await
        .unwrap();
    let mut seconds: Vec<i64> = records.lead_times.iter().map(|d| d.num_seconds()).collect();
    seconds.sort_unstable();
    assert_eq!(seconds, vec![30, 30, 90], "{:?}", records.lead_times);
}
