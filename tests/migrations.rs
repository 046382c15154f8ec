//! Migrations on a real, empty PostgreSQL database: applying them twice is a
//! no-op, and the seeds read back through the operator views.

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sqlx::PgPool;
use treasury::store::Store;
use treasury::store::postgres::{MIGRATOR, PgStore};

#[sqlx::test(migrations = false)]
async fn migrations_apply_to_an_empty_database_and_again_as_a_no_op(pool: PgPool) {
    let store = PgStore::from_pool(pool.clone());
    store.migrate().await.expect("first run");
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, MIGRATOR.iter().count());
    store.migrate().await.expect("second run");
    let again: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(again, applied, "nothing applied twice");
    // Every statement is idempotent on its own too (re-running the SQL by hand).
    for migration in MIGRATOR.iter() {
        sqlx::raw_sql(&migration.sql)
            .execute(&pool)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "migration {} is not safe to run twice: {e}",
                    migration.description
                )
            });
    }
    let thresholds: i64 = sqlx::query_scalar("SELECT count(*) FROM buffer_thresholds")
        .fetch_one(&pool)
        .await
        .unwrap();
    let providers: i64 = sqlx::query_scalar("SELECT count(*) FROM conversion_providers")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((thresholds, providers), (3, 2), "seeds inserted once");
}

/// account, currency, min, target, max, batch size, status, amount to target.
type BufferRow = (
    String,
    String,
    Decimal,
    Decimal,
    Decimal,
    Decimal,
    String,
    Decimal,
);

#[sqlx::test]
async fn seeded_buffers_read_back_through_v_buffer_status(pool: PgPool) {
    let rows: Vec<BufferRow> = sqlx::query_as(
        "SELECT account_type, currency, min_threshold, target_threshold, max_threshold,
                conversion_batch_size, buffer_status, amount_to_target
           FROM v_buffer_status ORDER BY account_type",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let expected = [
        (
            "broker_operational",
            "USD",
            dec!(50000),
            dec!(200000),
            dec!(500000),
            dec!(100000),
        ),
        (
            "system_buffer_fiat",
            "USD",
            dec!(20000),
            dec!(100000),
            dec!(200000),
            dec!(50000),
        ),
        (
            "system_buffer_usdc",
            "USDC",
            dec!(10000),
            dec!(50000),
            dec!(100000),
            dec!(20000),
        ),
    ];
    assert_eq!(rows.len(), 3);
    for (row, want) in rows.iter().zip(expected) {
        assert_eq!(
            (row.0.as_str(), row.1.as_str(), row.2, row.3, row.4, row.5),
            want
        );
        assert_eq!(row.6, "HEALTHY", "opening balances are the targets");
        assert_eq!(row.7, Decimal::ZERO);
    }

    // The view's words follow the balance, with the original engine's boundaries.
    for (balance, status, to_target) in [
        (dec!(9999.999999), "CRITICAL_LOW", dec!(40000.000001)),
        (dec!(10000), "BELOW_TARGET", dec!(40000)),
        (dec!(100000), "HEALTHY", dec!(0)),
        (dec!(100000.000001), "OVER_CAPITALIZED", dec!(0)),
    ] {
        sqlx::query(
            "UPDATE buffer_balances SET balance = $1 WHERE account_type = 'system_buffer_usdc'",
        )
        .bind(balance)
        .execute(&pool)
        .await
        .unwrap();
        let (got, amount): (String, Decimal) = sqlx::query_as(
            "SELECT buffer_status, amount_to_target FROM v_buffer_status WHERE account_type = 'system_buffer_usdc'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(
            (got.as_str(), amount),
            (status, to_target),
            "balance {balance}"
        );
    }
    let report = PgStore::from_pool(pool.clone())
        .buffer_report()
        .await
        .unwrap();
    assert_eq!(report.len(), 3);
}

#[sqlx::test]
async fn thresholds_out_of_order_are_refused_by_the_database(pool: PgPool) {
    let refused = sqlx::query(
        "UPDATE buffer_thresholds SET min_threshold = 60000 WHERE account_type = 'system_buffer_usdc'",
    )
    .execute(&pool)
    .await;
    assert!(refused.is_err(), "min above target violates the CHECK");
}

#[sqlx::test]
async fn seeded_providers_read_back_through_v_provider_health(pool: PgPool) {
    let rows: Vec<(String, String, String, i32, Option<Decimal>)> = sqlx::query_as(
        "SELECT name, provider_type, status, priority, success_rate_pct FROM v_provider_health ORDER BY priority",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            ("Due".into(), "due".into(), "active".into(), 1, None),
            (
                "ZeroHash".into(),
                "zerohash".into(),
                "active".into(),
                2,
                None
            ),
        ]
    );
    let limits: (Decimal, Decimal, bool, bool) = sqlx::query_as(
        "SELECT min_conversion_amount, max_conversion_amount, supports_usdc_to_usd, supports_usd_to_usdc
           FROM conversion_providers WHERE name = 'ZeroHash'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(limits, (dec!(100.00), dec!(1000000.00), true, true));
    sqlx::query(
        "UPDATE conversion_providers SET success_count = 9, failure_count = 1 WHERE name = 'Due'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let rate: Decimal =
        sqlx::query_scalar("SELECT success_rate_pct FROM v_provider_health WHERE name = 'Due'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rate, dec!(90.00));
    let secrets: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.columns
          WHERE table_name = 'conversion_providers' AND column_name ~ '(secret|password|api_key)$'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        secrets, 0,
        "credentials are referenced by name, never stored"
    );
}

#[sqlx::test]
async fn money_columns_are_numeric_never_float(pool: PgPool) {
    let floats: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text FROM information_schema.columns
          WHERE table_schema = 'public' AND data_type IN ('real', 'double precision')",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(floats.is_empty(), "float columns: {floats:?}");
}
