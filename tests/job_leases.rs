//! Job leases in PostgreSQL: one worker drives a job at a time; the holder
//! can renew its lease, nobody else can, and an expired lease is free again.

use std::time::Duration;

use chrono::Utc;
use rust_decimal_macros::dec;
use sqlx::PgPool;
use treasury::domain::{
    BufferAccount, ConversionCommand, ConversionDirection, ConversionJob, ConversionTrigger,
    Currency, Money,
};
use treasury::store::jobs::JobStore;
use treasury::store::postgres::PgStore;

#[sqlx::test]
async fn only_the_holder_renews_and_an_expired_lease_is_free_again(pool: PgPool) {
    let store = PgStore::from_pool(pool.clone());
    let job = ConversionJob::from_command(&ConversionCommand {
        command_id: uuid::Uuid::from_u128(77),
        direction: ConversionDirection::UsdcToUsd,
        trigger: ConversionTrigger::Manual,
        amount: Money::positive(Currency::Usdc, dec!(1000)).unwrap(),
        source_account: BufferAccount::SystemBufferUsdc,
        destination_account: BufferAccount::BrokerOperational,
        cycle_id: "manual".into(),
        created_at: Utc::now(),
    });
    store
        .intake("g", &[], std::slice::from_ref(&job), &[])
        .await
        .unwrap();
    let lease = Duration::from_secs(60);

    assert_eq!(store.lease_jobs("a", lease, 10).await.unwrap().len(), 1);
    assert!(
        store.lease_jobs("b", lease, 10).await.unwrap().is_empty(),
        "held by a"
    );
    assert!(
        !store.renew("b", job.id, lease).await.unwrap(),
        "b cannot renew a's lease"
    );

    let before: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT lease_until FROM conversion_jobs WHERE id = $1")
            .bind(job.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        store
            .renew("a", job.id, Duration::from_secs(600))
            .await
            .unwrap()
    );
    let after: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT lease_until FROM conversion_jobs WHERE id = $1")
            .bind(job.id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(after > before, "renewed further out");

    sqlx::query(
        "UPDATE conversion_jobs SET lease_until = now() - INTERVAL '1 second' WHERE id = $1",
    )
    .bind(job.id)
    .execute(&pool)
    .await
    .unwrap();
    assert_eq!(
        store.lease_jobs("b", lease, 10).await.unwrap().len(),
        1,
        "expired: b takes it"
    );
    assert!(
        !store.renew("a", job.id, lease).await.unwrap(),
        "and a's renewal now fails"
    );
}
