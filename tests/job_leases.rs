//! The job lease contract, the same for PostgreSQL and the in-memory store:
//! one worker holds a job at a time, until its lease expires at the caller's
//! clock; every new lease has a newer epoch; every write carries the lease
//! and is refused once it has lapsed or been taken over (fencing); a job
//! attempt's outcome is kept once per job and provider.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal_macros::dec;
use sqlx::PgPool;
use treasury::domain::{
    BufferAccount, ConversionCommand, ConversionDirection, ConversionJob, ConversionTrigger,
    Currency, JobStatus, Money,
};
use treasury::store::jobs::{JobStore, JobUpdate, Lease, Outcome};
use treasury::store::memory::MemoryStore;
use treasury::store::operator::{OperatorAction, OperatorOutcome};
use treasury::store::postgres::PgStore;
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(60);

/// Runs a contract check against both stores.
macro_rules! both_stores {
    ($check:ident) => {
        mod $check {
            use super::*;

            #[sqlx::test]
            async fn postgres(pool: PgPool) {
                super::$check(&PgStore::from_pool(pool)).await;
            }

            #[tokio::test]
            async fn memory() {
                super::$check(&MemoryStore::default()).await;
            }
        }
    };
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap()
}

fn at(seconds: i64) -> DateTime<Utc> {
    t0() + chrono::Duration::seconds(seconds)
}

async fn new_job(store: &dyn JobStore, n: u128) -> ConversionJob {
    let job = ConversionJob::from_command(&ConversionCommand {
        command_id: Uuid::from_u128(n),
        direction: ConversionDirection::UsdcToUsd,
        trigger: ConversionTrigger::Manual,
        amount: Money::positive(Currency::Usdc, dec!(1000)).unwrap(),
        source_account: BufferAccount::SystemBufferUsdc,
        destination_account: BufferAccount::BrokerOperational,
        cycle_id: "manual".into(),
        created_at: Utc::now(),
    });
    let created = store
        .intake("g", &[], std::slice::from_ref(&job), &[])
        .await
        .unwrap();
    assert_eq!(created, vec![job.id]);
    store.job(job.id).await.unwrap().expect("stored")
}

/// A note-only write of `job` under `lease` at `now`.
async fn touch(
    store: &dyn JobStore,
    lease: &Lease,
    job: &ConversionJob,
    now: DateTime<Utc>,
) -> bool {
    store
        .update_job(JobUpdate {
            lease,
            now,
            job,
            from: job.status,
            note: "touched",
            provider_response: None,
            selection_reason: None,
            outcome: None,
        })
        .await
        .unwrap()
}

both_stores!(one_worker_holds_a_job_until_its_lease_expires);
async fn one_worker_holds_a_job_until_its_lease_expires(store: &dyn JobStore) {
    let job = new_job(store, 1).await;
    assert_eq!(store.open_jobs(at(0), 10).await.unwrap(), vec![job.id]);

    let a = store
        .lease_job(job.id, "a", at(0), LEASE)
        .await
        .unwrap()
        .expect("free");
    assert_eq!(a.job, job, "the lease returns the job as stored");
    assert!(
        store.open_jobs(at(1), 10).await.unwrap().is_empty(),
        "held by a"
    );
    assert!(
        store
            .lease_job(job.id, "b", at(1), LEASE)
            .await
            .unwrap()
            .is_none()
    );
    let forged = Lease {
        owner: "b".into(),
        ..a.lease.clone()
    };
    assert!(
        !store.renew(&forged, at(1), LEASE).await.unwrap(),
        "b cannot renew a's lease"
    );

    assert!(store.renew(&a.lease, at(30), LEASE).await.unwrap());
    assert!(
        store
            .lease_job(job.id, "b", at(89), LEASE)
            .await
            .unwrap()
            .is_none(),
        "renewed to 90 s"
    );
    assert_eq!(
        store.open_jobs(at(90), 10).await.unwrap(),
        vec![job.id],
        "expired at 90 s"
    );
    assert!(
        !store.renew(&a.lease, at(91), LEASE).await.unwrap(),
        "an expired lease is not renewed"
    );

    let b = store
        .lease_job(job.id, "b", at(91), LEASE)
        .await
        .unwrap()
        .expect("expired: free");
    assert!(
        b.lease.epoch > a.lease.epoch,
        "a new lease has a newer epoch"
    );
    // a's release after b took the job changes nothing.
    store.release(&a.lease).await.unwrap();
    assert!(
        store
            .lease_job(job.id, "c", at(92), LEASE)
            .await
            .unwrap()
            .is_none(),
        "still b's"
    );
    store.release(&b.lease).await.unwrap();
    let c = store
        .lease_job(job.id, "c", at(92), LEASE)
        .await
        .unwrap()
        .expect("released");
    assert!(c.lease.epoch > b.lease.epoch);
}

both_stores!(writes_need_the_current_unexpired_lease);
async fn writes_need_the_current_unexpired_lease(store: &dyn JobStore) {
    let job = new_job(store, 2).await;
    let a = store
        .lease_job(job.id, "a", at(0), LEASE)
        .await
        .unwrap()
        .unwrap();
    assert!(touch(store, &a.lease, &a.job, at(10)).await);
    assert!(
        !touch(store, &a.lease, &a.job, at(60)).await,
        "expired at 60 s, even unclaimed"
    );

    let b = store
        .lease_job(job.id, "a", at(61), LEASE)
        .await
        .unwrap()
        .unwrap();
    assert!(
        !touch(store, &a.lease, &a.job, at(62)).await,
        "the same owner's old epoch is refused"
    );
    assert!(touch(store, &b.lease, &b.job, at(62)).await);

    // Choosing a provider and recording the call are fenced the same way.
    let provider = store.providers().await.unwrap()[0].clone();
    let mut chosen = b.job.clone();
    chosen.provider_id = Some(provider.id);
    chosen.provider_name = Some(provider.name.clone());
    assert!(touch(store, &b.lease, &chosen, at(63)).await);
    assert!(
        !store.record_call(&a.lease, at(64), LEASE).await.unwrap(),
        "stale epoch: no call"
    );
    assert!(store.record_call(&b.lease, at(64), LEASE).await.unwrap());
    let stored = store.job(job.id).await.unwrap().unwrap();
    assert_eq!(
        stored.provider_called_at,
        Some(at(64)),
        "the call is recorded before it is made"
    );
    assert!(
        store
            .lease_job(job.id, "c", at(64 + 59), LEASE)
            .await
            .unwrap()
            .is_none(),
        "recording the call extended the lease"
    );
    assert!(
        !store
            .record_call(&b.lease, at(64 + 60), LEASE)
            .await
            .unwrap(),
        "lapsed: no call"
    );

    // A later worker sees the earlier call.
    let c = store
        .lease_job(job.id, "c", at(200), LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.job.provider_id, Some(provider.id));
    assert_eq!(c.job.provider_called_at, Some(at(64)));
}

both_stores!(a_job_with_a_person_or_final_is_never_leased);
async fn a_job_with_a_person_or_final_is_never_leased(store: &dyn JobStore) {
    let job = new_job(store, 3).await;
    let a = store
        .lease_job(job.id, "a", at(0), LEASE)
        .await
        .unwrap()
        .unwrap();
    let review = ConversionJob {
        status: JobStatus::NeedsReview,
        ..a.job.clone()
    };
    assert!(
        store
            .update_job(JobUpdate {
                lease: &a.lease,
                now: at(1),
                job: &review,
                from: JobStatus::Pending,
                note: "needs a person",
                provider_response: None,
                selection_reason: None,
                outcome: None,
            })
            .await
            .unwrap()
    );
    store.release(&a.lease).await.unwrap();
    assert!(store.open_jobs(at(2), 10).await.unwrap().is_empty());
    assert!(
        store
            .lease_job(job.id, "b", at(2), LEASE)
            .await
            .unwrap()
            .is_none()
    );
}

both_stores!(one_outcome_per_job_and_provider);
async fn one_outcome_per_job_and_provider(store: &dyn JobStore) {
    let provider = store.providers().await.unwrap()[0].id;
    let job = new_job(store, 4).await;
    let a = store
        .lease_job(job.id, "a", at(0), LEASE)
        .await
        .unwrap()
        .unwrap();
    for (seconds, succeeded) in [(1, false), (2, false), (3, true)] {
        assert!(
            store
                .update_job(JobUpdate {
                    lease: &a.lease,
                    now: at(seconds),
                    job: &a.job,
                    from: JobStatus::Pending,
                    note: "outcome",
                    provider_response: None,
                    selection_reason: None,
                    outcome: Some(Outcome {
                        provider,
                        succeeded
                    }),
                })
                .await
                .unwrap()
        );
    }
    let outcomes = store.provider_outcomes(at(-1)).await.unwrap();
    assert_eq!(
        outcomes.len(),
        1,
        "one outcome per job attempt: {outcomes:?}"
    );
    assert_eq!(
        (outcomes[0].provider, outcomes[0].at, outcomes[0].succeeded),
        (provider, at(3), true)
    );
    assert!(
        store.provider_outcomes(at(3)).await.unwrap().is_empty(),
        "only after `since`"
    );
}

both_stores!(an_operator_change_fences_off_the_lease_holder);
async fn an_operator_change_fences_off_the_lease_holder(store: &dyn JobStore) {
    // Cancelled while a worker holds it (pending, no provider chosen yet).
    let job = new_job(store, 5).await;
    let a = store
        .lease_job(job.id, "a", at(0), LEASE)
        .await
        .unwrap()
        .unwrap();
    let cancelled = store
        .operator_change(job.id, &OperatorAction::Cancel)
        .await
        .unwrap();
    assert!(
        matches!(&cancelled, OperatorOutcome::Done { job, from: JobStatus::Pending } if job.status == JobStatus::Cancelled),
        "{cancelled:?}"
    );
    assert!(
        !store.renew(&a.lease, at(1), LEASE).await.unwrap(),
        "the holder's lease ended with the operator's change"
    );
    assert!(!touch(store, &a.lease, &a.job, at(1)).await);
    let mut chosen = a.job.clone();
    chosen.provider_id = Some(store.providers().await.unwrap()[0].id);
    assert!(!touch(store, &a.lease, &chosen, at(1)).await);
    assert!(
        !store.record_call(&a.lease, at(1), LEASE).await.unwrap(),
        "no call for a cancelled job"
    );
    assert!(store.open_jobs(at(1), 10).await.unwrap().is_empty());
    assert_eq!(
        store.job(job.id).await.unwrap().map(|j| j.status),
        Some(JobStatus::Cancelled)
    );

    // Resolved by hand while the worker that sent it to review still holds
    // its lease: the next worker takes it at once, under a newer epoch.
    let job = new_job(store, 6).await;
    let a = store
        .lease_job(job.id, "a", at(0), LEASE)
        .await
        .unwrap()
        .unwrap();
    let review = ConversionJob {
        status: JobStatus::NeedsReview,
        ..a.job.clone()
    };
    assert!(
        store
            .update_job(JobUpdate {
                lease: &a.lease,
                now: at(1),
                job: &review,
                from: JobStatus::Pending,
                note: "needs a person",
                provider_response: None,
                selection_reason: None,
                outcome: None,
            })
            .await
            .unwrap()
    );
    let resolved = store
        .operator_change(
            job.id,
            &OperatorAction::Completed {
                destination_amount: Money::positive(Currency::Usd, dec!(998)).unwrap(),
                fee: Money::positive(Currency::Usdc, dec!(1)).unwrap(),
                rate: dec!(0.999),
                provider_tx_id: Some("tx-6".into()),
            },
        )
        .await
        .unwrap();
    assert!(
        matches!(&resolved, OperatorOutcome::Done { job, from: JobStatus::NeedsReview } if job.status == JobStatus::ProviderCompleted),
        "{resolved:?}"
    );
    let completed = store.job(job.id).await.unwrap().unwrap();
    assert_eq!(completed.status, JobStatus::ProviderCompleted);
    assert!(
        !touch(store, &a.lease, &completed, at(2)).await,
        "the old holder's writes are refused"
    );
    assert!(!store.renew(&a.lease, at(2), LEASE).await.unwrap());
    assert_eq!(
        store.open_jobs(at(2), 10).await.unwrap(),
        vec![job.id],
        "free for the next cycle"
    );
    let b = store
        .lease_job(job.id, "b", at(2), LEASE)
        .await
        .unwrap()
        .expect("free");
    assert!(b.lease.epoch > a.lease.epoch);
    assert_eq!(b.job, completed);
    assert!(touch(store, &b.lease, &b.job, at(3)).await);
}
