//! `treasury status`: the buffer table from `v_buffer_status`, then the jobs in
//! flight with why each one waits.

mod common;

use std::process::Command;

use sqlx::PgPool;

fn status(pool: &PgPool, args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_treasury"))
        .arg("status")
        .args(args)
        .env("DATABASE_URL", common::database_url(pool))
        .env("RUST_LOG", "warn")
        .output()
        .expect("run treasury status");
    assert!(
        output.status.success(),
        "status {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[sqlx::test]
async fn status_lists_buffers_and_jobs_in_flight_with_why_they_wait(pool: PgPool) {
    let held = uuid::Uuid::from_u128(7);
    let done = uuid::Uuid::from_u128(8);
    for (id, status, note) in [
        (
            held,
            "pending",
            "Due: provider outcome unknown (it may have acted on the request): timeout",
        ),
        (done, "completed", "-"),
    ] {
        sqlx::query(
            "INSERT INTO conversion_jobs (id, idempotency_key, direction, trigger_reason, status, amount,
                source_account, source_currency, source_amount, destination_account, destination_currency,
                provider_name, error_message)
             VALUES ($1, $1::text, 'usdc_to_usd', 'emergency', $2, 25000, 'system_buffer_usdc', 'USDC',
                     25000, 'broker_operational', 'USD', 'Due', $3)",
        )
        .bind(id)
        .bind(status)
        .bind(note)
        .execute(&pool)
        .await
        .unwrap();
    }

    let table = status(&pool, &[]);
    for account in [
        "system_buffer_usdc",
        "system_buffer_fiat",
        "broker_operational",
    ] {
        assert!(table.contains(account), "{account} in\n{table}");
    }
    let job_lines: Vec<&str> = table
        .lines()
        .filter(|l| l.contains("00000000-0000-0000-0000-00000000000"))
        .collect();
    assert_eq!(job_lines.len(), 1, "only the job in flight:\n{table}");
    let line = job_lines[0];
    assert!(
        line.starts_with(&held.to_string())
            && line.contains("pending")
            && line.contains("25000")
            && line.contains("Due")
            && line.contains("outcome unknown"),
        "{line}"
    );

    let json: serde_json::Value = serde_json::from_str(&status(&pool, &["--json"])).unwrap();
    let jobs = json["active_jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["id"], held.to_string());
    assert!(jobs[0]["note"].as_str().unwrap().contains("may have acted"));
    assert_eq!(json["buffers"].as_array().unwrap().len(), 3);
}
