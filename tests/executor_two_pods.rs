//! Two `treasury run --roles executor` processes on one database, against two
//! recording fake providers (Due's API, served twice) that answer the call
//! that moves money slowly; the first provider is set inactive while jobs
//! are in flight there. Checked at the providers' side: every job was
//! executed at exactly one provider, the one the job names, and has one
//! posting.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
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
use uuid::Uuid;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const JOBS: u128 = 12;

fn transfer(id: &str, status: &str) -> ResponseTemplate {
    let body = format!(
        r#"{{
            "id": "{id}",
            "status": "{status}",
            "source": {{"currency": "USDC", "rail": "ethereum", "amount": "25000.000000",
                        "fee": "10.000000", "totalFee": "12.345678"}},
            "destination": {{"currency": "USD", "rail": "ach", "amount": "24980.15"}},
            "fxRate": 0.9997,
            "createdAt": "2026-01-05T09:00:01Z"
        }}"#
    );
    ResponseTemplate::new(200).set_body_raw(body.into_bytes(), "application/json")
}

/// `POST /v1/transfers`: one transfer per idempotency key, answered after 1.5 s.
struct CreateTransfer;

impl Respond for CreateTransfer {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let key = request
            .headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        transfer(&format!("tr_{key}"), "awaiting_funds").set_delay(Duration::from_millis(1500))
    }
}

/// `GET /v1/transfers/{id}`: processed.
struct TransferStatus;

impl Respond for TransferStatus {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id = request.url.path().trim_start_matches("/v1/transfers/");
        transfer(id, "payment_processed")
    }
}

/// A fake provider speaking Due's API.
async fn fake_due() -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/transfers/quote"))
        .respond_with(ResponseTemplate::new(200).set_body_raw(
            r#"{"token": "qt_fake", "source": {"rail": "ethereum", "currency": "USDC",
                "amount": "25000.000000", "fee": "10.000000"},
                "destination": {"rail": "ach", "currency": "USD", "amount": "24980.15"},
                "fxRate": 0.9997, "expiresAt": "2099-01-01T00:02:00Z"}"#,
            "application/json",
        ))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/transfers"))
        .respond_with(CreateTransfer)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path_regex("^/v1/transfers/tr_.+$"))
        .respond_with(TransferStatus)
        .mount(&server)
        .await;
    server
}

/// The idempotency keys of the transfers a fake provider was asked for.
async fn executed_keys(server: &MockServer) -> BTreeSet<Uuid> {
    server
        .received_requests()
        .await
        .expect("recording is on")
        .into_iter()
        .filter(|r| r.method.as_str() == "POST" && r.url.path() == "/v1/transfers")
        .filter_map(|r| {
            r.headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .and_then(|k| k.parse().ok())
        })
        .collect()
}

fn spawn_pod(pool: &PgPool, brokers: &str, name: &str) -> Child {
    let topics = common::unique_topics("twopods");
    let log = std::env::temp_dir().join(format!("two-pods-{name}-{}.log", Uuid::new_v4()));
    eprintln!("{name} logs to {}", log.display());
    let log = std::fs::File::create(&log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_treasury"))
        .args(["run", "--roles", "executor"])
        .envs(common::child_env(
            &common::database_url(pool),
            brokers,
            &topics,
            &format!("twopods-{name}"),
        ))
        .env("TREASURY_MONITOR_INTERVAL", "1s")
        .env("DUE_API_KEY", "fake-key")
        .env("DUE_USD_RECIPIENT_ID", "rcp_usd_bank")
        .env("DUE_USDC_RECIPIENT_ID", "rcp_usdc_wallet")
        .env("RUST_LOG", "info")
        .env_remove("DUE_BASE_URL")
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn treasury run --roles executor")
}

fn stop(child: &mut Child) {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    for _ in 0..300 {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    panic!("executor did not stop within 30 s of SIGTERM");
}

async fn completed(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM conversion_jobs WHERE status = 'completed'")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn two_executor_processes_execute_every_job_at_exactly_one_provider(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let first = fake_due().await;
    let second = fake_due().await;
    // The seeded rows, both served by Due's client at their own base URL.
    for (name, server) in [("Due", &first), ("ZeroHash", &second)] {
        sqlx::query(
            "UPDATE conversion_providers SET provider_type = 'due', status = 'active',
                    credentials_ref = NULL, base_url = $2 WHERE name = $1",
        )
        .bind(name)
        .bind(server.uri())
        .execute(&pool)
        .await
        .unwrap();
    }
    let store = PgStore::from_pool(pool.clone());
    let jobs: Vec<ConversionJob> = (0..JOBS)
        .map(|n| {
            ConversionJob::from_command(&ConversionCommand {
                command_id: Uuid::from_u128(0x7770 + n),
                direction: ConversionDirection::UsdcToUsd,
                trigger: ConversionTrigger::Manual,
                amount: Money::new(Currency::Usdc, dec!(25000)).unwrap(),
                source_account: BufferAccount::SystemBufferUsdc,
                destination_account: BufferAccount::SystemBufferFiat,
                cycle_id: format!("two-pods-{n}"),
                created_at: Utc::now(),
            })
        })
        .collect();
    store.intake("two-pods", &[], &jobs, &[]).await.unwrap();

    let mut pods = [
        spawn_pod(&pool, &brokers, "a"),
        spawn_pod(&pool, &brokers, "b"),
    ];
    // Once the first provider has some jobs in hand, an operator sets it
    // inactive: those jobs stay there, the rest go to the second.
    assert!(
        common::wait_until(Duration::from_secs(60), || {
            let first = &first;
            async move { executed_keys(first).await.len() >= 3 }
        })
        .await,
        "the first provider was called"
    );
    sqlx::query("UPDATE conversion_providers SET status = 'inactive' WHERE name = 'Due'")
        .execute(&pool)
        .await
        .unwrap();
    let all_done = common::wait_until(Duration::from_secs(120), || {
        let pool = pool.clone();
        async move { completed(&pool).await == JOBS as i64 }
    })
    .await;
    for pod in &mut pods {
        stop(pod);
    }
    assert!(
        all_done,
        "{} of {JOBS} jobs completed",
        completed(&pool).await
    );

    let at_first = executed_keys(&first).await;
    let at_second = executed_keys(&second).await;
    assert!(
        !at_first.is_empty() && !at_second.is_empty(),
        "both providers took jobs"
    );
    let named: BTreeMap<Uuid, String> =
        sqlx::query_as("SELECT id, provider_name FROM conversion_jobs")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    for job in &jobs {
        let at: Vec<&str> = [("Due", &at_first), ("ZeroHash", &at_second)]
            .into_iter()
            .filter(|(_, keys)| keys.contains(&job.id))
            .map(|(name, _)| name)
            .collect();
        assert_eq!(
            at,
            vec![named[&job.id].as_str()],
            "job {} executed at one provider",
            job.id
        );
    }
    let postings: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_postings")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(postings, JOBS as i64, "one posting per job");
}
