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
        let event = |id: u128, offset| EventRef {
            event_id: Uuid::from_u128(id),
            tp: tp(0),
            offset,
            window_start: t0(),
        };
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
        tx.commit().await.unwrap();
        assert_eq!(
            store.planned_commands().await.unwrap(),
            vec![planned],
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
