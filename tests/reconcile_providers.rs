//! `treasury reconcile --providers` against real PostgreSQL and sandbox
//! providers: an execution planted at a provider with no completed job there
//! is reported (also when the job completed at another provider: one command
//! executed twice), an execution its job accounts for is not, and the buffer
//! held at the providers is compared with their balances within a tolerance.

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sqlx::PgPool;
use treasury::domain::{ConversionDirection, Currency, Money};
use treasury::providers::sandbox::{SandboxBehaviour, SandboxProvider};
use treasury::providers::{ConversionProvider, ConversionRequest};
use treasury::reconcile::providers::{ProviderReport, check_providers};
use treasury::store::Store;
use treasury::store::postgres::PgStore;
use uuid::Uuid;

fn sandbox(name: &str, opening_balance: Decimal) -> SandboxProvider {
    SandboxProvider::new(
        3,
        SandboxBehaviour {
            polls_to_complete: 0,
            opening_balance,
            ..SandboxBehaviour::default()
        },
    )
    .named(name)
}

async fn execute(provider: &SandboxProvider, key: Uuid, amount: Decimal) {
    provider
        .initiate(&ConversionRequest {
            idempotency_key: key,
            direction: ConversionDirection::UsdToUsdc,
            amount: Money::positive(Currency::Usd, amount).unwrap(),
        })
        .await
        .expect("the sandbox executes");
}

async fn insert_job(pool: &PgPool, id: Uuid, provider: &str, status: &str) {
    sqlx::query(
        "INSERT INTO conversion_jobs (id, idempotency_key, direction, trigger_reason, status, amount,
            source_account, source_currency, source_amount, destination_account, destination_currency,
            provider_name)
         VALUES ($1, $1::text, 'usd_to_usdc', 'emergency', $2, 1000, 'system_buffer_fiat', 'USD', 1000,
                 'system_buffer_usdc', 'USDC', $3)",
    )
    .bind(id)
    .bind(status)
    .bind(provider)
    .execute(pool)
    .await
    .unwrap();
}

async fn reconcile(
    pool: &PgPool,
    providers: &[&SandboxProvider],
    tolerance: Decimal,
) -> ProviderReport {
    let store = PgStore::from_pool(pool.clone());
    let buffers = store.buffer_report().await.unwrap();
    let providers: Vec<&dyn ConversionProvider> = providers
        .iter()
        .map(|p| *p as &dyn ConversionProvider)
        .collect();
    check_providers(pool, &buffers, &providers, tolerance)
        .await
        .unwrap()
}

fn executions_found(report: &ProviderReport) -> Vec<&str> {
    report
        .findings
        .iter()
        .filter(|f| f.check == "provider_execution_without_job")
        .map(|f| f.subject.as_str())
        .collect()
}

#[sqlx::test]
async fn executions_no_completed_job_accounts_for_are_reported(pool: PgPool) {
    let due = sandbox("Due", dec!(100000));
    let zerohash = sandbox("ZeroHash", Decimal::ZERO);

    // Accounted for: the job completed at Due.
    let completed = Uuid::new_v4();
    insert_job(&pool, completed, "Due", "completed").await;
    execute(&due, completed, dec!(1000)).await;
    // Accounted for: still in flight at Due (the monitor cycle follows it).
    let in_flight = Uuid::new_v4();
    insert_job(&pool, in_flight, "Due", "provider_processing").await;
    execute(&due, in_flight, dec!(1000)).await;
    // Planted: executed at Due under a key no job has.
    let planted = Uuid::new_v4();
    execute(&due, planted, dec!(2500)).await;
    // One command executed twice: the job completed at ZeroHash, Due ran it too.
    let twice = Uuid::new_v4();
    insert_job(&pool, twice, "ZeroHash", "completed").await;
    execute(&zerohash, twice, dec!(1000)).await;
    execute(&due, twice, dec!(1000)).await;

    let report = reconcile(&pool, &[&due, &zerohash], dec!(1000000)).await;
    let found = executions_found(&report);
    let tx = |key: Uuid| {
        format!(
            "Due:{}",
            due.conversion_for_key(key).unwrap().provider_tx_id
        )
    };
    assert_eq!(found.len(), 2, "{:#?}", report.findings);
    assert!(found.contains(&tx(planted).as_str()), "{found:?}");
    assert!(found.contains(&tx(twice).as_str()), "{found:?}");
    let twice_finding = report
        .findings
        .iter()
        .find(|f| f.subject == tx(twice))
        .unwrap();
    assert!(
        twice_finding.detail.contains("completed at ZeroHash"),
        "{twice_finding:?}"
    );
    assert!(report.executions_not_listed.is_empty());
}

#[sqlx::test]
async fn the_fiat_buffer_is_compared_with_the_providers_balances(pool: PgPool) {
    // The seeded fiat buffer holds 100,000 USD (its target).
    let due = sandbox("Due", dec!(60000));
    let zerohash = sandbox("ZeroHash", dec!(40000.50));
    let report = reconcile(&pool, &[&due, &zerohash], dec!(1.00)).await;
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert_eq!(report.comparisons.len(), 1);
    assert_eq!(report.comparisons[0].reported, Some(dec!(100000.50)));
    assert_eq!(report.comparisons[0].difference, Some(dec!(0.50)));

    let short = sandbox("ZeroHash", dec!(39990));
    let report = reconcile(&pool, &[&due, &short], dec!(1.00)).await;
    let mismatches: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.check == "buffer_balance_mismatch")
        .collect();
    assert_eq!(mismatches.len(), 1, "{:#?}", report.findings);
    assert_eq!(mismatches[0].subject, "system_buffer_fiat");
    assert!(mismatches[0].detail.contains("-10"), "{:?}", mismatches[0]);

    // A provider that cannot answer makes the comparison impossible, and says so.
    short.set_down(true);
    let report = reconcile(&pool, &[&due, &short], dec!(1.00)).await;
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.check == "provider_balance_unavailable"),
        "{:#?}",
        report.findings
    );
    assert!(
        !report
            .findings
            .iter()
            .any(|f| f.check == "buffer_balance_mismatch")
    );
}

#[sqlx::test]
async fn treasury_reconcile_providers_reports_a_mismatch_and_exits_1(pool: PgPool) {
    // Both seeded rows served by sandboxes: each reports its opening balance
    // (10,000,000 USD) against a fiat buffer of 100,000.
    sqlx::query("UPDATE conversion_providers SET provider_type = 'sandbox'")
        .execute(&pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL");
    let db = pool.connect_options().get_database().unwrap().to_owned();
    let server = &base[..base.rfind('/').unwrap()];
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_treasury"))
        .args(["reconcile", "--providers", "--json"])
        .env("DATABASE_URL", format!("{server}/{db}"))
        .env("TREASURY_RECONCILE_TOLERANCE", "5.00")
        .env("RUST_LOG", "error")
        .output()
        .expect("run treasury reconcile");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&stdout[stdout.find('{').unwrap()..]).expect("JSON on stdout");
    let mismatch = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == "buffer_balance_mismatch")
        .unwrap_or_else(|| panic!("{json:#}"));
    assert_eq!(mismatch["subject"], "system_buffer_fiat");
    assert!(
        mismatch["detail"]
            .as_str()
            .unwrap()
            .contains("tolerance 5.00"),
        "{mismatch}"
    );
    assert_eq!(
        json["balance_comparisons"][0]["reported"],
        serde_json::json!("20000000")
    );
    assert!(json["executions_not_listed"].as_array().unwrap().is_empty());
}
