//! Manual conversions against real PostgreSQL: `POST /v1/conversions` behind
//! the bearer token (201, then 200 for the same key; 4xx with the reason for
//! a refusal), `treasury convert` from the command line, and one manual
//! conversion carried through the broker and a sandbox provider to its
//! ledger posting.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde_json::{Value, json};
use sqlx::PgPool;
use treasury::codec::Codec;
use treasury::config::Topics;
use treasury::executor::intake::IntakeSettings;
use treasury::executor::{ExecutorParts, Intake, JobWorker, WorkerSettings};
use treasury::http::conversions::ManualConversions;
use treasury::http::{AppState, router};
use treasury::providers::registry::ProviderRegistry;
use treasury::providers::sandbox::{SandboxBehaviour, SandboxProvider};
use treasury::store::jobs::JobStore;
use treasury::store::postgres::PgStore;
use uuid::Uuid;

const TOKEN: &str = "ops-token";

async fn serve(pool: &PgPool, commands_topic: &str) -> String {
    let store = PgStore::from_pool(pool.clone());
    let app = router(AppState {
        store: Arc::new(store.clone()),
        pg: Some(store),
        metrics: None,
        admin_token: Some(TOKEN.to_owned()),
        wake_executor: None,
        env: Arc::new(|_: &str| None),
        conversions: Some(ManualConversions {
            codec: Codec::default(),
            commands_topic: commands_topic.to_owned(),
        }),
        health: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

async fn post(base: &str, token: Option<&str>, body: &Value) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/v1/conversions"))
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

fn request(key: &str, amount: &str) -> Value {
    json!({
        "direction": "usdc_to_usd",
        "amount": amount,
        "idempotency_key": key,
        "reason": "fiat buffer drained by a bank run",
    })
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[sqlx::test]
async fn the_same_key_returns_the_same_command_and_refusals_say_why(pool: PgPool) {
    let base = serve(&pool, "commands").await;

    let (status, body) = post(&base, None, &request("k1", "5000")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("unauthorized"))
    );

    let (status, first) = post(&base, Some(TOKEN), &request("k1", "5000")).await;
    assert_eq!(status, 201, "{first}");
    let command = &first["command"];
    assert_eq!(command["trigger"], "manual");
    assert_eq!(command["source_account"], "system_buffer_usdc");
    assert_eq!(command["destination_account"], "system_buffer_fiat");
    assert_eq!(command["amount"]["value"], "5000");
    let (status, again) = post(&base, Some(TOKEN), &request("k1", "5000.00")).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["command"], first["command"], "the same command");

    let (status, body) = post(&base, Some(TOKEN), &request("k1", "6000")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (409, Some("idempotency_key_reused"))
    );

    // One planned command, one outbox message with the reason, nothing else.
    let id: Uuid = command["command_id"].as_str().unwrap().parse().unwrap();
    let (trigger, emitted): (String, bool) = sqlx::query_as(
        "SELECT trigger_reason, emitted FROM planned_commands WHERE command_id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((trigger.as_str(), emitted), ("manual", true));
    assert_eq!(
        count(&pool, "SELECT count(*) FROM planned_commands").await,
        1
    );
    let headers: Value =
        sqlx::query_scalar("SELECT headers FROM outbox WHERE id = $1 AND topic = 'commands'")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        headers["manual-reason"],
        "fiat buffer drained by a bank run"
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM outbox").await, 1);

    // Refusals: scale, provider limits, missing reason, wrong account, bad JSON.
    for (body, code) in [
        (request("k2", "10.0000001"), "bad_amount"),
        (request("k3", "50"), "outside_provider_limits"),
        (
            json!({"direction": "usdc_to_usd", "amount": "500", "idempotency_key": "k4", "reason": ""}),
            "reason_required",
        ),
        (
            json!({"direction": "usdc_to_usd", "amount": "500", "idempotency_key": "k5",
                   "reason": "r", "destination_account": "system_buffer_usdc"}),
            "wrong_account",
        ),
        (
            json!({"direction": "sideways", "amount": "1"}),
            "bad_request",
        ),
    ] {
        let (status, answer) = post(&base, Some(TOKEN), &body).await;
        assert!((400..500).contains(&status), "{body} → {status} {answer}");
        assert_eq!(answer["error"], code, "{body} → {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM planned_commands").await,
        1
    );
}

#[sqlx::test]
async fn the_source_stays_above_its_minimum_unless_forced_with_a_reason(pool: PgPool) {
    let base = serve(&pool, "commands").await;
    // The USDC buffer holds 50,000 (target) with a 5,000 conversion in flight
    // out of it already: 45,000 projected, minimum 10,000.
    let (status, _) = post(&base, Some(TOKEN), &request("first", "5000")).await;
    assert_eq!(status, 201);
    let (status, refused) = post(&base, Some(TOKEN), &request("second", "35000.01")).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (422, Some("source_below_minimum")),
        "{refused}"
    );
    assert!(
        refused["message"].as_str().unwrap().contains("9999.99"),
        "{refused}"
    );
    let mut forced = request("second", "35000.01");
    forced["force"] = json!(true);
    let (status, accepted) = post(&base, Some(TOKEN), &forced).await;
    assert_eq!(status, 201, "{accepted}");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM planned_commands").await,
        2
    );
}

#[sqlx::test]
async fn treasury_convert_queues_the_same_command_once(pool: PgPool) {
    let run = |key: &str| {
        Command::new(env!("CARGO_BIN_EXE_treasury"))
            .args([
                "convert",
                "--direction",
                "usd_to_usdc",
                "--amount",
                "2500.50",
                "--idempotency-key",
                key,
                "--reason",
                "USDC reserve low before a launch",
            ])
            .env("DATABASE_URL", common::database_url(&pool))
            .env("TREASURY_TOPIC_COMMANDS", "cli-commands")
            .output()
            .expect("run treasury convert")
    };
    let first = run("cli-1");
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let printed = |output: &std::process::Output, start: &str| {
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .any(|l| l.starts_with(start))
    };
    assert!(printed(&first, "queued command"), "{first:?}");
    let again = run("cli-1");
    assert!(again.status.success());
    assert!(printed(&again, "already queued"), "{again:?}");
    let rows: Vec<(String, String, Decimal, String)> = sqlx::query_as(
        "SELECT c.trigger_reason, c.source_account, c.amount, o.topic
           FROM planned_commands c JOIN outbox o ON o.id = c.command_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![(
            "manual".to_owned(),
            "system_buffer_fiat".to_owned(),
            dec!(2500.50),
            "cli-commands".to_owned()
        )]
    );
    let refused = run("");
    assert!(!refused.status.success(), "an empty key is refused");
}

fn executor(
    pool: &PgPool,
    brokers: &str,
    topics: &Topics,
    registry: ProviderRegistry,
) -> ExecutorParts {
    let group = format!("manual-exec-{}", &Uuid::new_v4().simple().to_string()[..8]);
    let jobs: Arc<dyn JobStore> = Arc::new(PgStore::from_pool(pool.clone()));
    let clock = treasury::clock::SystemClock::shared();
    let intake = Intake::new(
        &treasury::kafka::consumer_config(&common::base(brokers), &group),
        common::pg_store(pool),
        jobs,
        Codec::default(),
        clock.clone(),
        IntakeSettings {
            group: group.clone(),
            commands_topic: topics.commands.clone(),
            dlq_topic: topics.dlq.clone(),
            batch_size: 100,
            batch_max_wait: Duration::from_millis(100),
        },
    )
    .expect("intake");
    let worker = JobWorker::new(
        Arc::new(PgStore::from_pool(pool.clone())),
        registry,
        Codec::default(),
        WorkerSettings {
            owner: group,
            postings_topic: topics.postings.clone(),
            max_retries: 3,
            retry_initial: Duration::from_millis(50),
            monitor_interval: Duration::from_millis(200),
            stale_after: chrono::Duration::minutes(30),
            conversion_timeout: chrono::Duration::minutes(30),
            lease: Duration::from_secs(60),
            call_timeout: Duration::from_secs(30),
            health_window: chrono::Duration::hours(1),
        },
        clock,
    );
    ExecutorParts { intake, worker }
}

#[sqlx::test]
async fn a_manual_conversion_reaches_its_ledger_posting(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("manual");
    let base_config = common::base(&brokers);
    common::create_topics(&base_config, &topics, 1).await;
    sqlx::query("UPDATE conversion_providers SET provider_type = 'sandbox'")
        .execute(&pool)
        .await
        .unwrap();
    let sandbox = SandboxProvider::new(7, SandboxBehaviour::default());
    let registry = ProviderRegistry::standard(|_| None, Some(sandbox.clone()));

    let base = serve(&pool, &topics.commands).await;
    let (status, body) = post(&base, Some(TOKEN), &request("to-the-ledger", "5000")).await;
    assert_eq!(status, 201, "{body}");
    let command_id: Uuid = body["command"]["command_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let (stop, listener) = treasury::shutdown::channel();
    let mut tasks = treasury::executor::spawn(executor(&pool, &brokers, &topics, registry), &stop);
    let relay = treasury::relay::Relay::new(
        common::pg_store(&pool),
        treasury::kafka::idempotent_producer(&base_config).expect("producer"),
    );
    tasks.push((
        "relay",
        tokio::spawn(async move {
            relay.run(listener, Duration::from_millis(50)).await;
            Ok(())
        }),
    ));
    let posted = common::wait_until(Duration::from_secs(90), || async {
        count(
            &pool,
            "SELECT count(*) FROM ledger_postings p JOIN conversion_jobs j ON j.id = p.job_id
              WHERE j.status = 'completed' AND j.trigger_reason = 'manual'",
        )
        .await
            == 1
    })
    .await;
    stop.trigger();
    for (name, task) in tasks {
        task.await
            .expect("executor task")
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(posted, "the manual conversion completed with one posting");
    let (key, trigger, amount): (String, String, Decimal) =
        sqlx::query_as("SELECT idempotency_key, trigger_reason, amount FROM conversion_jobs")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (key, trigger.as_str(), amount),
        (command_id.to_string(), "manual", dec!(5000))
    );
    assert_eq!(sandbox.initiated_count(), 1);
    let usdc: Decimal = sqlx::query_scalar(
        "SELECT balance FROM buffer_balances WHERE account_type = 'system_buffer_usdc'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(usdc, dec!(45000), "the source buffer paid the 5,000 USDC");
}
