//! Reconciliation against PostgreSQL: a clean book has no findings; each kind
//! of discrepancy is found and named.

use chrono::{Duration, Utc};
use sqlx::PgPool;
use treasury::reconcile::{Tolerances, check};

fn tolerances() -> Tolerances {
    Tolerances {
        at_provider: Duration::minutes(30),
        in_transit: Duration::minutes(5),
    }
}

async fn job(pool: &PgPool, n: u128, status: &str, age_minutes: i64) -> uuid::Uuid {
    let id = uuid::Uuid::from_u128(n);
    sqlx::query(
        "INSERT INTO conversion_jobs (id, idempotency_key, direction, trigger_reason, status, amount,
            source_account, source_currency, source_amount, destination_account, destination_currency,
            provider_name, submitted_at, updated_at, completed_at, created_at)
         VALUES ($1, $1::text, 'usdc_to_usd', 'manual', $2, 500, 'system_buffer_usdc', 'USDC', 500,
                 'broker_operational', 'USD', 'Due', now() - make_interval(mins => $3),
                 now() - make_interval(mins => $3), now(), now() - make_interval(mins => $3))",
    )
    .bind(id)
    .bind(status)
    .bind(age_minutes as i32)
    .execute(pool)
    .await
    .unwrap();
    id
}

#[sqlx::test]
async fn a_clean_book_has_no_findings_and_each_discrepancy_is_named(pool: PgPool) {
    assert!(
        check(&pool, Utc::now(), tolerances())
            .await
            .unwrap()
            .is_empty()
    );

    let posted = job(&pool, 1, "completed", 1).await;
    sqlx::query("INSERT INTO ledger_postings (posting_id, job_id, posting) VALUES ($1, $2, '{}')")
        .bind(uuid::Uuid::from_u128(100))
        .bind(posted)
        .execute(&pool)
        .await
        .unwrap();
    job(&pool, 2, "provider_processing", 10).await;
    job(&pool, 9, "pending", 1).await;
    assert!(
        check(&pool, Utc::now(), tolerances())
            .await
            .unwrap()
            .is_empty(),
        "a posted job and young jobs at a provider are fine"
    );

    let unposted = job(&pool, 3, "completed", 1).await;
    let stuck = job(&pool, 4, "provider_submitted", 45).await;
    let review = job(&pool, 5, "needs_review", 60).await;
    let before_ledger = job(&pool, 6, "provider_completed", 20).await;
    let held = job(&pool, 8, "pending", 20).await;
    let orphan_posting_job = job(&pool, 7, "failed", 1).await;
    sqlx::query("INSERT INTO ledger_postings (posting_id, job_id, posting) VALUES ($1, $2, '{}')")
        .bind(uuid::Uuid::from_u128(101))
        .bind(orphan_posting_job)
        .execute(&pool)
        .await
        .unwrap();
    let command = uuid::Uuid::from_u128(200);
    sqlx::query(
        "INSERT INTO planned_commands (command_id, cycle_id, direction, trigger_reason, currency, amount,
            source_account, destination_account, emitted, created_at)
         VALUES ($1, 'window:x', 'usd_to_usdc', 'emergency', 'USD', 1000, 'system_buffer_fiat',
                 'system_buffer_usdc', TRUE, now() - INTERVAL '1 hour')",
    )
    .bind(command)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox (id, topic, payload, created_at) VALUES ($1, 'ledger.postings', 'x', now() - INTERVAL '1 hour')",
    )
    .bind(uuid::Uuid::from_u128(300))
    .execute(&pool)
    .await
    .unwrap();

    let mut found: Vec<(&str, String)> = check(&pool, Utc::now(), tolerances())
        .await
        .unwrap()
        .into_iter()
        .map(|f| (f.check, f.subject))
        .collect();
    found.sort();
    let mut expected = vec![
        ("completed_job_without_posting", unposted.to_string()),
        ("job_stuck_at_provider", stuck.to_string()),
        ("job_needs_review", review.to_string()),
        ("job_held_at_provider", held.to_string()),
        ("job_stuck_before_ledger", before_ledger.to_string()),
        (
            "posting_without_completed_job",
            uuid::Uuid::from_u128(101).to_string(),
        ),
        ("command_without_job", command.to_string()),
        (
            "outbox_not_published",
            uuid::Uuid::from_u128(300).to_string(),
        ),
    ];
    expected.sort();
    assert_eq!(found, expected);
}
