//! One contract for both stores: every check here runs against PostgreSQL
//! (a database per test) and the in-memory store, through the `Store` /
//! `StoreTx` interface only. The seeds are compared between the two
//! directly: the in-memory store reads them from the migration.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal_macros::dec;
use sqlx::PgPool;
use treasury::domain::{
    BufferAccount, BufferStatus, ConversionCommand, ConversionDirection, ConversionJob,
    ConversionTrigger, JobStatus, Money,
};
use treasury::planner::InFlight;
use treasury::store::jobs::JobStore;
use treasury::store::memory::MemoryStore;
use treasury::store::operator::{OperatorAction, OperatorOutcome};
use treasury::store::postgres::PgStore;
use treasury::store::{
    EventRef, LockMode, OffsetRange, OutboxMessage, PlannedCommand, Store, StoreError,
    TopicPartition,
};
use uuid::Uuid;

/// Both stores, fresh.
async fn stores(pool: &PgPool) -> Vec<(&'static str, Arc<dyn Store>, Arc<dyn JobStore>)> {
    let pg = PgStore::from_pool(pool.clone());
    let memory = MemoryStore::default();
    vec![
        ("postgres", Arc::new(pg.clone()), Arc::new(pg)),
        ("memory", Arc::new(memory.clone()), Arc::new(memory)),
    ]
}

fn tp(partition: i32) -> TopicPartition {
    TopicPartition {
        topic: "funding".into(),
        partition,
    }
}

/// Event `id` read at `offset` of partition 0, in the window at `t0`.
fn event(id: u128, offset: i64) -> EventRef {
    EventRef {
        event_id: Uuid::from_u128(id),
        tp: tp(0),
        offset,
        window_start: t0(),
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 3, 12, 0, 0).unwrap()
}

fn command(n: u128) -> ConversionCommand {
    ConversionCommand {
        command_id: Uuid::from_u128(n),
        direction: ConversionDirection::UsdcToUsd,
        trigger: ConversionTrigger::Manual,
        amount: Money::positive(treasury::domain::Currency::Usdc, dec!(1500)).unwrap(),
        source_account: BufferAccount::SystemBufferUsdc,
        destination_account: BufferAccount::SystemBufferFiat,
        cycle_id: format!("contract:{n}"),
        created_at: t0(),
    }
}

fn message(n: u128) -> OutboxMessage {
    OutboxMessage {
        id: Uuid::from_u128(n),
        topic: "out".into(),
        key: Some(format!("k{n}")),
        payload: vec![1, 2, 3],
        headers: vec![("message-id".into(), n.to_string())],
    }
}

#[sqlx::test]
async fn both_stores_start_from_the_migrations_seeds(pool: PgPool) {
    let [(_, pg, pg_jobs), (_, memory, memory_jobs)] =
        <[_; 2]>::try_from(stores(&pool).await).ok().unwrap();
    assert_eq!(
        pg.buffer_report().await.unwrap(),
        memory.buffer_report().await.unwrap()
    );
    // The demo serves every provider from the sandbox; everything else is the row.
    let mut rows = pg_jobs.providers().await.unwrap();
    for row in &mut rows {
        row.provider_type = "sandbox".into();
    }
    assert_eq!(rows, memory_jobs.providers().await.unwrap());
    let limits = |store: Arc<dyn Store>| async move {
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        (
            tx.amount_limits().await.unwrap(),
            tx.buffer_positions().await.unwrap(),
        )
    };
    assert_eq!(limits(pg.clone()).await, limits(memory.clone()).await);
    assert_eq!(
        pg.jobs_by_status().await.unwrap(),
        memory.jobs_by_status().await.unwrap()
    );
    assert!(
        pg.jobs_by_status()
            .await
            .unwrap()
            .iter()
            .all(|(_, n)| *n == 0)
    );
    assert_eq!(
        pg.jobs_by_status().await.unwrap().len(),
        JobStatus::ALL.len()
    );
}

#[sqlx::test]
async fn offsets_move_forward_only_and_replay_overrides_them(pool: PgPool) {
    for (name, store, _) in stores(&pool).await {
        assert!(store.load_offsets("g", &[tp(0)]).await.unwrap().is_empty());
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        tx.advance_offsets(
            "g",
            &[OffsetRange {
                tp: tp(0),
                first: 0,
                next: 10,
            }],
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            store.load_offsets("g", &[tp(0), tp(1)]).await.unwrap(),
            BTreeMap::from([(tp(0), 10)]),
            "{name}"
        );
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        let moved = tx
            .advance_offsets(
                "g",
                &[OffsetRange {
                    tp: tp(0),
                    first: 5,
                    next: 12,
                }],
            )
            .await;
        assert!(
            matches!(
                moved,
                Err(StoreError::OffsetConflict {
                    stored: 10,
                    first: 5,
                    ..
                })
            ),
            "{name}: {moved:?}"
        );
        drop(tx);
        store
            .set_offsets("g", &BTreeMap::from([(tp(0), 3)]))
            .await
            .unwrap();
        assert_eq!(
            store.load_offsets("g", &[tp(0)]).await.unwrap()[&tp(0)],
            3,
            "{name}"
        );
        assert!(
            store
                .load_offsets("other", &[tp(0)])
                .await
                .unwrap()
                .is_empty()
        );
    }
}

#[sqlx::test]
async fn an_event_counts_once_and_a_dropped_transaction_changes_nothing(pool: PgPool) {
    for (name, store, _) in stores(&pool).await {
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        let new = tx.claim_events(&[event(1, 0), event(2, 1)]).await.unwrap();
        drop(tx);
        assert_eq!(new.len(), 2, "{name}");
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        let new = tx.claim_events(&[event(1, 0), event(2, 1)]).await.unwrap();
        assert_eq!(new.len(), 2, "{name}: the dropped claim left nothing");
        tx.commit().await.unwrap();
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        let new = tx.claim_events(&[event(1, 7), event(3, 8)]).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(new, HashSet::from([Uuid::from_u128(3)]), "{name}");
        // Ids counted before the cutoff are forgotten; later ones stay.
        let future = Utc::now() + chrono::Duration::hours(1);
        assert_eq!(
            store
                .purge_processed(Utc::now() - chrono::Duration::hours(1))
                .await
                .unwrap(),
            0,
            "{name}"
        );
        assert_eq!(store.purge_processed(future).await.unwrap(), 3, "{name}");
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        assert_eq!(
            tx.claim_events(&[event(1, 9)]).await.unwrap().len(),
            1,
            "{name}"
        );
    }
}

#[sqlx::test]
async fn a_batch_starts_by_advancing_its_offsets_and_reading_the_window_clock(pool: PgPool) {
    for (name, store, _) in stores(&pool).await {
        let range = |partition, first, next| OffsetRange {
            tp: tp(partition),
            first,
            next,
        };
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        let clock = tx
            .start_batch("g", &[range(0, 0, 10), range(1, 0, 4)])
            .await
            .unwrap();
        assert_eq!(clock, None, "{name}: no window closed yet");
        tx.commit().await.unwrap();
        let mut tx = store.begin(LockMode::Exclusive).await.unwrap();
        tx.set_next_window_start(t0()).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        assert_eq!(
            tx.start_batch("g", &[range(0, 10, 12)]).await.unwrap(),
            Some(t0()),
            "{name}"
        );
        tx.commit().await.unwrap();
        assert_eq!(
            store.load_offsets("g", &[tp(0), tp(1)]).await.unwrap(),
            BTreeMap::from([(tp(0), 12), (tp(1), 4)]),
            "{name}"
        );
        // A range another consumer already committed past refuses the
        // whole batch: the other partition's offset does not move either.
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        let moved = tx
            .start_batch("g", &[range(0, 11, 20), range(1, 4, 9)])
            .await;
        assert!(
            matches!(
                moved,
                Err(StoreError::OffsetConflict {
                    partition: 0,
                    stored: 12,
                    first: 11,
                    ..
                })
            ),
            "{name}: {moved:?}"
        );
        drop(tx);
        assert_eq!(
            store.load_offsets("g", &[tp(0), tp(1)]).await.unwrap(),
            BTreeMap::from([(tp(0), 12), (tp(1), 4)]),
            "{name}"
        );
    }
}

#[sqlx::test]
async fn ids_expected_new_are_claimed_whole_or_refused_whole(pool: PgPool) {
    for (name, store, _) in stores(&pool).await {
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        let new = tx
            .claim_new_events(&[event(1, 0), event(2, 1)])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(new.len(), 2, "{name}");
        // One seen before: either the store says so (and its transaction is
        // void), or it counts only the new one, as `claim_events` would.
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        match tx.claim_new_events(&[event(3, 2), event(2, 3)]).await {
            Err(StoreError::SeenBefore) => drop(tx),
            Ok(new) => {
                assert_eq!(new, HashSet::from([Uuid::from_u128(3)]), "{name}");
                drop(tx);
            }
            Err(e) => panic!("{name}: {e}"),
        }
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        let new = tx.claim_events(&[event(3, 2), event(2, 3)]).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            new,
            HashSet::from([Uuid::from_u128(3)]),
            "{name}: the refused claim left nothing behind"
        );
    }
}

#[sqlx::test]
async fn two_transactions_claiming_the_same_event_count_it_once(pool: PgPool) {
    for (name, store, _) in stores(&pool).await {
        let claim = |store: Arc<dyn Store>| async move {
            let mut tx = store.begin(LockMode::Shared).await.unwrap();
            let new = tx
                .claim_events(&[EventRef {
                    event_id: Uuid::from_u128(42),
                    tp: tp(0),
                    offset: 0,
                    window_start: t0(),
                }])
                .await
                .unwrap();
            tx.commit().await.unwrap();
            new.len()
        };
        let (a, b) = tokio::join!(
            tokio::spawn(claim(store.clone())),
            tokio::spawn(claim(store.clone()))
        );
        assert_eq!(a.unwrap() + b.unwrap(), 1, "{name}");
    }
}

#[sqlx::test]
async fn the_outbox_keeps_one_copy_and_claims_what_it_hands_out(pool: PgPool) {
    for (name, store, _) in stores(&pool).await {
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        tx.enqueue(&[message(1), message(2)]).await.unwrap();
        tx.enqueue(&[message(1)]).await.unwrap();
        tx.commit().await.unwrap();
        let pending = store.outbox_pending(10).await.unwrap();
        assert_eq!(pending, vec![message(1), message(2)], "{name}");
        assert!(
            store.outbox_pending(10).await.unwrap().is_empty(),
            "{name}: claimed messages are not handed out twice"
        );
        store.mark_sent(&[Uuid::from_u128(1)]).await.unwrap();
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        tx.enqueue(&[message(3)]).await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            store.outbox_pending(10).await.unwrap(),
            vec![message(3)],
            "{name}"
        );
    }
}

#[sqlx::test]
async fn planned_commands_are_recorded_once_and_count_in_flight(pool: PgPool) {
    for (name, store, _) in stores(&pool).await {
        let mut tx = store.begin(LockMode::Exclusive).await.unwrap();
        assert_eq!(tx.planned_command(Uuid::from_u128(7)).await.unwrap(), None);
        let planned = PlannedCommand {
            command: command(7),
            emitted: true,
        };
        tx.record_commands(std::slice::from_ref(&planned))
            .await
            .unwrap();
        tx.record_commands(std::slice::from_ref(&planned))
            .await
            .unwrap();
        assert_eq!(
            tx.planned_command(Uuid::from_u128(7)).await.unwrap(),
            Some(planned.clone()),
            "{name}"
        );
        let positions = tx.buffer_positions().await.unwrap();
        let usdc = positions
            .iter()
            .find(|p| p.account == BufferAccount::SystemBufferUsdc)
            .unwrap();
        let fiat = positions
            .iter()
            .find(|p| p.account == BufferAccount::SystemBufferFiat)
            .unwrap();
        assert_eq!(
            (usdc.outgoing, fiat.incoming),
            (dec!(1500), dec!(1500)),
            "{name}"
        );
        // A command recorded but not sent (auto-rebalance off) is not in flight.
        let held_back = PlannedCommand {
            command: ConversionCommand {
                created_at: t0() + chrono::Duration::minutes(5),
                ..command(8)
            },
            emitted: false,
        };
        tx.record_commands(std::slice::from_ref(&held_back))
            .await
            .unwrap();
        assert_eq!(
            tx.in_flight().await.unwrap(),
            vec![InFlight {
                destination: BufferAccount::SystemBufferFiat,
                amount: dec!(1500),
                since: t0(),
            }],
            "{name}: what incoming counts, with the command's time"
        );
        tx.commit().await.unwrap();
        assert_eq!(
            store.planned_commands().await.unwrap(),
            vec![planned, held_back],
            "{name}"
        );
    }
}

#[sqlx::test]
async fn triggers_and_announced_statuses_round_trip(pool: PgPool) {
    for (name, store, _) in stores(&pool).await {
        let id = store.request_trigger("contract").await.unwrap();
        let mut tx = store.begin(LockMode::Exclusive).await.unwrap();
        assert_eq!(tx.pending_triggers().await.unwrap(), vec![id], "{name}");
        tx.finish_trigger(id, &serde_json::json!({"ok": true}))
            .await
            .unwrap();
        assert!(tx.announced_statuses().await.unwrap().is_empty(), "{name}");
        let statuses = BTreeMap::from([
            (BufferAccount::SystemBufferUsdc, BufferStatus::CriticalLow),
            (BufferAccount::SystemBufferFiat, BufferStatus::Healthy),
        ]);
        tx.record_announced(&statuses).await.unwrap();
        tx.commit().await.unwrap();
        let mut tx = store.begin(LockMode::Exclusive).await.unwrap();
        assert!(tx.pending_triggers().await.unwrap().is_empty(), "{name}");
        assert_eq!(tx.announced_statuses().await.unwrap(), statuses, "{name}");
        tx.record_announced(&BTreeMap::from([(
            BufferAccount::SystemBufferUsdc,
            BufferStatus::BelowTarget,
        )]))
        .await
        .unwrap();
        assert_eq!(
            tx.announced_statuses().await.unwrap()[&BufferAccount::SystemBufferUsdc],
            BufferStatus::BelowTarget,
            "{name}"
        );
    }
}

#[sqlx::test]
async fn operator_changes_follow_the_job_state_machine(pool: PgPool) {
    for (name, store, jobs) in stores(&pool).await {
        let job = ConversionJob::from_command(&command(9));
        let created = jobs
            .intake(
                "exec",
                &[OffsetRange {
                    tp: tp(0),
                    first: 0,
                    next: 1,
                }],
                std::slice::from_ref(&job),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(created, vec![job.id], "{name}");
        assert!(matches!(
            jobs.operator_change(Uuid::from_u128(1), &OperatorAction::Cancel)
                .await
                .unwrap(),
            OperatorOutcome::NotFound
        ));
        let refused = jobs
            .operator_change(
                job.id,
                &OperatorAction::Failed {
                    reason: "not in review".into(),
                },
            )
            .await
            .unwrap();
        assert!(
            matches!(
                refused,
                OperatorOutcome::Refused {
                    status: JobStatus::Pending,
                    ..
                }
            ),
            "{name}: {refused:?}"
        );
        let done = jobs
            .operator_change(job.id, &OperatorAction::Cancel)
            .await
            .unwrap();
        assert!(
            matches!(&done, OperatorOutcome::Done { job, from: JobStatus::Pending } if job.status == JobStatus::Cancelled),
            "{name}: {done:?}"
        );
        assert_eq!(
            jobs.job(job.id).await.unwrap().map(|j| j.status),
            Some(JobStatus::Cancelled),
            "{name}"
        );
        assert!(matches!(
            jobs.operator_change(job.id, &OperatorAction::Cancel)
                .await
                .unwrap(),
            OperatorOutcome::Refused {
                status: JobStatus::Cancelled,
                ..
            }
        ));
        let counts: BTreeMap<&str, i64> = store
            .jobs_by_status()
            .await
            .unwrap()
            .into_iter()
            .map(|(s, n)| (s.as_str(), n))
            .collect();
        assert_eq!(counts["cancelled"], 1, "{name}");
        assert_eq!(counts.values().sum::<i64>(), 1, "{name}");
    }
}

/// What a store reports after one window is counted, settled and closed.
#[derive(Debug, PartialEq)]
struct WindowLifecycle {
    /// What settlement makes of the registered, unreported partitions. (The
    /// stores differ on `reported_at` of a partition nobody has reported on:
    /// PostgreSQL gives the registration time, memory none; neither vouches
    /// for the partition, so settlement is held back either way.)
    watermark_before: Option<DateTime<Utc>>,
    watermark_after: Option<DateTime<Utc>>,
    reported: treasury::window::PartitionProgress,
    open: Vec<DateTime<Utc>>,
    tally: treasury::window::WindowTally,
    positions: Vec<treasury::planner::BufferPosition>,
    windows: Vec<treasury::store::WindowRecord>,
    next_start: Option<DateTime<Utc>>,
    open_after: Vec<DateTime<Utc>>,
    paused: bool,
}

async fn window_lifecycle(store: &dyn Store) -> WindowLifecycle {
    use treasury::domain::{FlowEvent, FlowKind};
    use treasury::store::ProgressUpdate;
    use treasury::window::{Assignment, WindowTallies};

    let at = t0() + chrono::Duration::minutes(1);
    let mut tx = store.begin(LockMode::Shared).await.unwrap();
    tx.register_partitions(&[tp(0), tp(1)]).await.unwrap();
    let progress_before = tx.partition_progress(&["funding".into()]).await.unwrap();
    assert_eq!(progress_before.len(), 2);
    let watermark = |progress: &[treasury::window::PartitionProgress]| {
        treasury::window::global_watermark(progress, at, chrono::Duration::seconds(30))
    };
    let watermark_before = watermark(&progress_before);
    tx.record_progress(&[ProgressUpdate {
        tp: tp(0),
        max_event_time: Some(at),
        caught_up: true,
        now: at,
    }])
    .await
    .unwrap();
    // USDC events in the first window, one batch (one add_tallies) each.
    let usdc_batch = |events: &[(u128, FlowKind, rust_decimal::Decimal)]| {
        let mut tallies = WindowTallies::default();
        for (id, kind, amount) in events {
            tallies.add(
                &FlowEvent {
                    event_id: Uuid::from_u128(*id),
                    kind: *kind,
                    user_id: Uuid::from_u128(6),
                    amount: Money::positive(treasury::domain::Currency::Usdc, *amount).unwrap(),
                    occurred_at: at,
                },
                Assignment {
                    window_start: t0(),
                    late: false,
                },
            );
        }
        tallies
    };
    tx.add_tallies(
        &usdc_batch(&[(5, FlowKind::Deposit, dec!(1000.25))]),
        chrono::Duration::minutes(5),
    )
    .await
    .unwrap();
    // Two withdrawals in a later batch add to the same window's flows.
    tx.add_tallies(
        &usdc_batch(&[
            (7, FlowKind::Withdrawal, dec!(100)),
            (8, FlowKind::Withdrawal, dec!(50.5)),
        ]),
        chrono::Duration::minutes(5),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let mut tx = store.begin(LockMode::Exclusive).await.unwrap();
    let progress_after = tx.partition_progress(&["funding".into()]).await.unwrap();
    let watermark_after = watermark(&progress_after);
    let reported = *progress_after
        .iter()
        .find(|p| p.watermark.is_some())
        .expect("the reported partition");
    let open = tx.open_windows().await.unwrap();
    let tally = tx.window_tally(t0()).await.unwrap();
    tx.apply_flows(&tally).await.unwrap();
    let positions = tx.buffer_positions().await.unwrap();
    let end = t0() + chrono::Duration::minutes(5);
    tx.close_window(
        t0(),
        end,
        at,
        &serde_json::json!({"closed": "by the contract"}),
    )
    .await
    .unwrap();
    tx.set_next_window_start(end).await.unwrap();
    let paused = tx.auto_rebalance_paused().await.unwrap();
    tx.commit().await.unwrap();
    let mut tx = store.begin(LockMode::Exclusive).await.unwrap();
    let next_start = tx.next_window_start().await.unwrap();
    let open_after = tx.open_windows().await.unwrap();
    drop(tx);
    WindowLifecycle {
        watermark_before,
        watermark_after,
        reported,
        open,
        tally,
        positions,
        windows: store.windows().await.unwrap(),
        next_start,
        open_after,
        paused,
    }
}

#[sqlx::test]
async fn a_window_is_counted_settled_and_closed_alike(pool: PgPool) {
    let mut seen = Vec::new();
    for (name, store, _) in stores(&pool).await {
        let lifecycle = window_lifecycle(store.as_ref()).await;
        assert_eq!(
            (lifecycle.watermark_before, lifecycle.watermark_after),
            (None, None),
            "{name}: an unread partition holds settlement back"
        );
        assert_eq!(lifecycle.open, vec![t0()], "{name}");
        assert_eq!(lifecycle.tally.events, 3, "{name}");
        let usdc_flow = lifecycle.tally.flows[&BufferAccount::SystemBufferUsdc];
        assert_eq!(
            (
                usdc_flow.inflow,
                usdc_flow.outflow,
                usdc_flow.outflow_events
            ),
            (dec!(1000.25), dec!(150.5), 2),
            "{name}: the withdrawals are counted, not only summed"
        );
        assert!(lifecycle.open_after.is_empty(), "{name}");
        assert_eq!(lifecycle.windows.len(), 1, "{name}");
        assert!(lifecycle.windows[0].closed, "{name}");
        assert_eq!(
            lifecycle.next_start,
            Some(t0() + chrono::Duration::minutes(5)),
            "{name}"
        );
        let usdc = lifecycle
            .positions
            .iter()
            .find(|p| p.account == BufferAccount::SystemBufferUsdc)
            .unwrap();
        assert_eq!(usdc.balance, dec!(50849.75), "{name}");
        seen.push(lifecycle);
    }
    assert_eq!(seen[0], seen[1], "PostgreSQL and memory agree");
}

#[sqlx::test]
async fn a_partition_revoked_and_handed_back_in_one_report_is_recorded_once(pool: PgPool) {
    use treasury::store::ProgressUpdate;

    let report = |partition, max_event_time, caught_up, now| ProgressUpdate {
        tp: tp(partition),
        max_event_time,
        caught_up,
        now,
    };
    let at = t0() + chrono::Duration::minutes(1);
    let later = at + chrono::Duration::seconds(2);
    let mut seen = Vec::new();
    for (name, store, _) in stores(&pool).await {
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        tx.register_partitions(&[tp(0), tp(1)]).await.unwrap();
        tx.record_progress(&[
            report(0, Some(at), true, at),
            report(1, Some(later), true, at),
        ])
        .await
        .unwrap();
        tx.commit().await.unwrap();

        // What a rebalance reports: partition 0 revoked, then handed back,
        // and partition 1 handed back after it was caught up.
        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        tx.record_progress(&[
            report(0, None, false, later),
            report(1, None, false, later),
            report(0, None, false, later),
            report(1, Some(at), true, later),
        ])
        .await
        .unwrap_or_else(|e| panic!("{name}: a partition named twice: {e}"));
        tx.commit().await.unwrap();

        let mut tx = store.begin(LockMode::Shared).await.unwrap();
        let progress = tx.partition_progress(&["funding".into()]).await.unwrap();
        drop(tx);
        assert_eq!(progress.len(), 2, "{name}");
        let mut by_watermark = progress.clone();
        by_watermark.sort_by_key(|p| p.watermark);
        let (first, second) = (by_watermark[0], by_watermark[1]);
        assert_eq!(
            first.watermark,
            Some(at),
            "{name}: event time never goes back"
        );
        assert_eq!(first.caught_up_since, None, "{name}: the last report wins");
        assert_eq!(second.watermark, Some(later), "{name}");
        assert!(second.caught_up_since.is_some(), "{name}");
        assert_eq!(first.reported_at, Some(later), "{name}");
        seen.push(by_watermark);
    }
    assert_eq!(seen[0], seen[1], "PostgreSQL and memory agree");
}
