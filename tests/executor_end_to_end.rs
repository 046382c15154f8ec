//! The executor end to end, on the real broker and PostgreSQL (DESIGN promises
//! 2 and 3, issue 4):
//!
//! - events in → windows → commands → jobs → completed at a (sandbox)
//!   provider → one balanced posting per job on `ledger.postings`, buffer
//!   balances moved by exactly the converted amounts; replaying the commands
//!   topic from the start changes nothing;
//! - a real `treasury run --roles executor` process killed with SIGKILL while
//!   its request to create the transfer is in flight at a wiremock "Due" (and
//!   again at random moments while it polls and completes), then restarted:
//!   Due sees one idempotency key, the job completes once with one posting,
//!   the transfer id (not the quote token) is the provider's transaction id,
//!   and the job's history never goes backwards.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chrono::Utc;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sqlx::PgPool;
use treasury::codec::records::{encode_command, posting_from_value};
use treasury::codec::{Codec, SchemaKind};
use treasury::config::Topics;
use treasury::domain::{
    BufferAccount, ConversionCommand, ConversionDirection, ConversionJob, ConversionTrigger,
    Currency, EntrySide, JobStatus, LedgerPosting, Money,
};
use treasury::executor::intake::IntakeSettings;
use treasury::executor::{ExecutorParts, Intake, JobWorker, WorkerSettings};
use treasury::providers::registry::ProviderRegistry;
use treasury::providers::sandbox::{SandboxBehaviour, SandboxProvider};
use treasury::store::jobs::JobStore;
use treasury::store::postgres::PgStore;
use treasury::store::{Store, TopicPartition};
use treasury::window::WindowSpec;
use uuid::Uuid;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

fn spec() -> WindowSpec {
    WindowSpec::new(Duration::from_secs(300), Duration::from_secs(30))
}

fn suffix() -> String {
    Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// Buffer balances by account.
async fn balances(pool: &PgPool) -> BTreeMap<String, Decimal> {
    sqlx::query_as::<_, (String, Decimal)>("SELECT account_type, balance FROM buffer_balances")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Where a status sits on the way to `completed` (final failures last).
fn rank(status: &str) -> u8 {
    match status {
        "pending" => 0,
        "provider_submitted" => 1,
        "provider_processing" => 2,
        "provider_completed" => 3,
        "ledger_updating" => 4,
        "completed" => 5,
        "needs_review" => 6,
        "failed" | "cancelled" => 7,
        other => panic!("unknown job status {other:?}"),
    }
}

/// The job's stored history is one unbroken chain that never moves backwards
/// and ends in `completed`.
async fn assert_history_forward(pool: &PgPool, job: Uuid) -> Vec<(Option<String>, String)> {
    let history: Vec<(Option<String>, String)> = sqlx::query_as(
        "SELECT from_status, to_status FROM conversion_job_history WHERE job_id = $1 ORDER BY id",
    )
    .bind(job)
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        history.first().map(|h| (h.0.as_deref(), h.1.as_str())),
        Some((None, "pending")),
        "the job starts pending: {history:?}"
    );
    for pair in history.windows(2) {
        let (previous, next) = (&pair[0], &pair[1]);
        assert_eq!(
            next.0.as_deref(),
            Some(previous.1.as_str()),
            "each change starts where the last ended: {history:?}"
        );
        assert!(
            rank(&next.1) >= rank(&previous.1),
            "status went backwards {} → {}: {history:?}",
            previous.1,
            next.1
        );
    }
    assert_eq!(
        history.last().map(|h| h.1.as_str()),
        Some("completed"),
        "{history:?}"
    );
    history
}

/// Decodes every posting on the postings topic (waiting for at least `n`).
async fn postings_on_topic(
    brokers: &str,
    topics: &Topics,
    n: usize,
) -> Vec<(LedgerPosting, BTreeMap<String, String>)> {
    let codec = Codec::default();
    common::read_all(brokers, &topics.postings, n)
        .await
        .into_iter()
        .map(|(bytes, headers)| {
            let value = codec
                .decode_cached(&bytes, SchemaKind::LedgerPosting)
                .expect("a posting decodes");
            (
                posting_from_value(&value).expect("a posting reads"),
                headers,
            )
        })
        .collect()
}

/// The posting says what the job did: the source credited with the amount
/// sent, the destination debited with what arrived, the fee as its own entry,
/// balanced per currency, keyed by the job id.
fn assert_posting_matches(posting: &LedgerPosting, job: &ConversionJob) {
    posting
        .check_balanced()
        .unwrap_or_else(|e| panic!("posting of job {} does not balance: {e}", job.id));
    assert_eq!(posting.job_id, job.id);
    assert_eq!(posting.idempotency_key, job.id.to_string());
    let destination = job.destination_amount.expect("completed job has amounts");
    let fee = job.fee.expect("completed job has a fee");
    let find = |account: &str, side: EntrySide| {
        posting
            .entries
            .iter()
            .filter(|e| e.account == account && e.side == side)
            .map(|e| e.amount)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        find(job.source_account.as_str(), EntrySide::Credit),
        vec![job.amount],
        "source credited with the amount sent"
    );
    assert_eq!(
        find(job.destination_account.as_str(), EntrySide::Debit),
        vec![destination],
        "destination debited with what arrived"
    );
    let fee_account = format!(
        "conversion_fees_{}",
        fee.currency.code().to_ascii_lowercase()
    );
    if fee.value > Decimal::ZERO {
        assert_eq!(find(&fee_account, EntrySide::Debit), vec![fee], "fee leg");
    } else {
        assert!(find(&fee_account, EntrySide::Debit).is_empty());
    }
    assert_eq!(Some(posting.exchange_rate), job.exchange_rate);
}

fn intake(pool: &PgPool, brokers: &str, topics: &Topics, group: &str) -> Intake {
    let store: Arc<dyn Store> = common::pg_store(pool);
    let jobs: Arc<dyn JobStore> = Arc::new(PgStore::from_pool(pool.clone()));
    Intake::new(
        &treasury::kafka::consumer_config(&common::base(brokers), group),
        store,
        jobs,
        Codec::default(),
        treasury::clock::SystemClock::shared(),
        IntakeSettings {
            group: group.to_owned(),
            commands_topic: topics.commands.clone(),
            dlq_topic: topics.dlq.clone(),
            batch_size: 100,
            batch_max_wait: Duration::from_millis(100),
        },
    )
    .expect("intake")
}

fn worker(pool: &PgPool, topics: &Topics, registry: ProviderRegistry) -> JobWorker {
    JobWorker::new(
        Arc::new(PgStore::from_pool(pool.clone())),
        registry,
        Codec::default(),
        WorkerSettings {
            owner: format!("e2e-{}", suffix()),
            postings_topic: topics.postings.clone(),
            max_retries: 3,
            retry_initial: Duration::from_millis(50),
            monitor_interval: Duration::from_millis(200),
            stale_after: chrono::Duration::minutes(30),
            conversion_timeout: chrono::Duration::minutes(30),
            lease: std::time::Duration::from_secs(60),
            call_timeout: std::time::Duration::from_secs(30),
            health_window: chrono::Duration::hours(1),
        },
        treasury::clock::SystemClock::shared(),
    )
}

/// Every emitted command has a completed job and nothing waits in the outbox.
async fn all_jobs_completed(pool: &PgPool, commands: i64) -> bool {
    let jobs = count(pool, "SELECT count(*) FROM conversion_jobs").await;
    let completed = count(
        pool,
        "SELECT count(*) FROM conversion_jobs WHERE status = 'completed'",
    )
    .await;
    let unsent = count(pool, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await;
    jobs == commands && completed == commands && unsent == 0
}

#[sqlx::test]
async fn events_become_completed_jobs_with_one_balanced_posting_each_even_on_replay(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let started = std::time::Instant::now();
    let topics = common::unique_topics("e2e");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 2).await;
    let group = format!("e2e-{}", suffix());
    let exec_group = format!("{group}-executor");

    // The USDC buffer starts below its minimum (10,000) and the broker's cash
    // below its own (50,000): the windows plan refills in both directions.
    // Every provider row is served by one sandbox with a fee and a spread, so
    // the postings carry a fee leg.
    sqlx::query(
        "UPDATE buffer_balances SET balance = CASE account_type
            WHEN 'system_buffer_usdc' THEN 5000 WHEN 'broker_operational' THEN 30000
            ELSE balance END",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE conversion_providers SET provider_type = 'sandbox'")
        .execute(&pool)
        .await
        .unwrap();

    let events = common::generate(41, 600, chrono::Duration::minutes(20));
    common::produce(&base, &topics, &events).await;
    let settled = common::run_aggregator(
        &pool,
        &brokers,
        &topics,
        &group,
        spec(),
        Duration::from_secs(120),
        || common::all_settled(&pool, 600),
    )
    .await;
    assert!(settled, "all events counted and every window closed");
    let after_flows = balances(&pool).await;
    let commands: Vec<(Uuid, String, String, String, Decimal)> = sqlx::query_as(
        "SELECT command_id, direction, source_account, destination_account, amount
           FROM planned_commands WHERE emitted ORDER BY created_at",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for (direction, destination) in [
        ("usd_to_usdc", "system_buffer_usdc"),
        ("usdc_to_usd", "broker_operational"),
    ] {
        assert!(
            commands
                .iter()
                .any(|c| c.1 == direction && c.3 == destination),
            "{destination} gets a {direction} refill: {commands:?}"
        );
    }
    let n = commands.len();

    // The executor, in this process: intake, worker and relay.
    let sandbox = SandboxProvider::new(
        41,
        SandboxBehaviour {
            fee_bps: dec!(10),
            fee_fixed: dec!(1.5),
            spread_bps: dec!(5),
            polls_to_complete: 2,
            ..SandboxBehaviour::default()
        },
    );
    let registry = ProviderRegistry::standard(|_| None, Some(sandbox.clone()));
    let (stop, listener) = treasury::shutdown::channel();
    let mut tasks = treasury::executor::spawn(
        ExecutorParts {
            intake: intake(&pool, &brokers, &topics, &exec_group),
            worker: worker(&pool, &topics, registry.clone()),
        },
        &stop,
    );
    let relay = treasury::relay::Relay::new(
        common::pg_store(&pool),
        treasury::kafka::idempotent_producer(&base).expect("producer"),
    );
    tasks.push((
        "relay",
        tokio::spawn(async move {
            relay.run(listener, Duration::from_millis(50)).await;
            Ok(())
        }),
    ));
    let done = common::wait_until(Duration::from_secs(120), || {
        all_jobs_completed(&pool, n as i64)
    })
    .await;
    stop.trigger();
    for (name, task) in tasks {
        task.await
            .expect("executor task")
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(
        done,
        "every command became a completed job: {} jobs, {} completed, of {n}",
        count(&pool, "SELECT count(*) FROM conversion_jobs").await,
        count(
            &pool,
            "SELECT count(*) FROM conversion_jobs WHERE status = 'completed'"
        )
        .await
    );
    assert_eq!(
        sandbox.initiated_count(),
        n as u64,
        "the provider saw one conversion per command"
    );

    // One job per command, each with exactly one stored posting.
    let job_store = PgStore::from_pool(pool.clone());
    let mut jobs = BTreeMap::new();
    for (command_id, direction, source, destination, amount) in &commands {
        let id: Uuid =
            sqlx::query_scalar("SELECT id FROM conversion_jobs WHERE idempotency_key = $1")
                .bind(command_id.to_string())
                .fetch_one(&pool)
                .await
                .unwrap();
        let job = job_store.job(id).await.unwrap().unwrap();
        assert_eq!(job.status, JobStatus::Completed);
        assert_eq!(
            (
                job.direction.as_str(),
                job.source_account.as_str(),
                job.destination_account.as_str(),
                job.amount.value
            ),
            (
                direction.as_str(),
                source.as_str(),
                destination.as_str(),
                *amount
            ),
            "the job is the command"
        );
        assert_eq!(
            job.provider_tx_id,
            Some(
                sandbox
                    .conversion_for_key(job.id)
                    .expect("the sandbox saw the job's key")
                    .provider_tx_id
            )
        );
        assert_history_forward(&pool, id).await;
        jobs.insert(id, job);
    }
    assert_eq!(jobs.len(), n);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM ledger_postings").await,
        n as i64,
        "one stored posting per completed job"
    );

    // Exactly one posting per job on the topic, balanced, keyed by the job.
    let on_topic = postings_on_topic(&brokers, &topics, n).await;
    assert_eq!(
        on_topic.len(),
        n,
        "one message per job on the postings topic"
    );
    let mut seen = BTreeSet::new();
    for (posting, headers) in &on_topic {
        let job = jobs
            .get(&posting.job_id)
            .unwrap_or_else(|| panic!("posting for an unknown job {}", posting.job_id));
        assert!(seen.insert(posting.job_id), "a second posting for one job");
        assert_posting_matches(posting, job);
        assert_eq!(headers["message-id"], posting.posting_id.to_string());
        assert_eq!(headers["idempotency-key"], job.id.to_string());
    }

    // Balances moved by exactly the converted amounts, from where the
    // window flows left them.
    let mut expected = after_flows.clone();
    for job in jobs.values() {
        *expected
            .get_mut(job.source_account.as_str())
            .expect("source buffer") -= job.amount.value;
        *expected
            .get_mut(job.destination_account.as_str())
            .expect("destination buffer") += job.destination_amount.unwrap().value;
    }
    let after_jobs = balances(&pool).await;
    assert_eq!(
        after_jobs, expected,
        "balances moved by exactly the amounts"
    );

    // Replay the commands topic from the start: no new job, no new posting.
    let store = common::pg_store(&pool);
    let tp = TopicPartition {
        topic: topics.commands.clone(),
        partition: 0,
    };
    let end = store
        .load_offsets(&exec_group, std::slice::from_ref(&tp))
        .await
        .unwrap()[&tp];
    assert!(end >= n as i64, "intake consumed every command");
    store
        .set_offsets(&exec_group, &BTreeMap::from([(tp.clone(), 0)]))
        .await
        .unwrap();
    let mut replay = intake(&pool, &brokers, &topics, &exec_group);
    let mut created = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut replayed = false;
    while !replayed && tokio::time::Instant::now() < deadline {
        created.extend(replay.step().await.expect("replay batch commits"));
        replayed = store
            .load_offsets(&exec_group, std::slice::from_ref(&tp))
            .await
            .unwrap()
            .get(&tp)
            == Some(&end);
    }
    assert!(replayed, "the replay read the commands topic to its end");
    assert!(created.is_empty(), "a replay creates no job: {created:?}");
    let leased = worker(&pool, &topics, registry)
        .run_cycle()
        .await
        .expect("worker cycle");
    assert_eq!(leased, 0, "nothing left to drive");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM conversion_jobs").await,
        n as i64
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM ledger_postings").await,
        n as i64
    );
    let queued_postings: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic = $1")
        .bind(&topics.postings)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued_postings, n as i64, "no posting queued twice");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await,
        0
    );
    assert_eq!(balances(&pool).await, after_jobs, "balances untouched");
    assert_eq!(sandbox.initiated_count(), n as u64);
    assert_eq!(
        postings_on_topic(&brokers, &topics, n).await.len(),
        n,
        "still one posting per job on the topic"
    );
    eprintln!(
        "{n} commands → {n} completed jobs and postings; replay added none ({:.1?})",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// SIGKILL with a real child process and a wiremock Due.

const DUE_KEY: &str = "due-e2e-key";
const QUOTE_TOKEN: &str = "qt_e2e.quote-token";
const TRANSFER_ID: &str = "tr_e2e_5f1c0a9d";

fn raw(body: String) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_raw(body.into_bytes(), "application/json")
}

fn transfer_body(status: &str) -> String {
    format!(
        r#"{{
            "id": "{TRANSFER_ID}",
            "ownerId": "acct_treasury",
            "status": "{status}",
            "source": {{"currency": "USDC", "rail": "ethereum", "amount": "25000.000000",
                        "fee": "10.000000", "totalFee": "12.345678"}},
            "destination": {{"currency": "USD", "rail": "ach", "amount": "24980.15"}},
            "fxRate": 0.9997,
            "createdAt": "2026-01-05T09:00:01Z"
        }}"#
    )
}

/// `GET /v1/transfers/{id}`: processing until the test says it completed.
struct TransferStatus {
    completed: Arc<AtomicBool>,
}

impl Respond for TransferStatus {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        if self.completed.load(Ordering::SeqCst) {
            raw(transfer_body("payment_processed"))
        } else {
            raw(transfer_body("payment_submitted"))
        }
    }
}

async fn mount_due(server: &MockServer, completed: Arc<AtomicBool>) {
    Mock::given(method("POST"))
        .and(path("/v1/transfers/quote"))
        .respond_with(raw(format!(
            r#"{{
                "token": "{QUOTE_TOKEN}",
                "source": {{"rail": "ethereum", "currency": "USDC", "amount": "25000.000000",
                            "fee": "10.000000", "totalFee": "12.345678"}},
                "destination": {{"rail": "ach", "currency": "USD", "amount": "24980.15"}},
                "fxRate": 0.9997,
                "expiresAt": "2099-01-01T00:02:00Z"
            }}"#
        )))
        .mount(server)
        .await;
    // Creating the transfer takes 1.5 s: the window in which the worker has
    // asked Due for the conversion but has not yet recorded Due's answer.
    Mock::given(method("POST"))
        .and(path("/v1/transfers"))
        .respond_with(raw(transfer_body("awaiting_funds")).set_delay(Duration::from_millis(1500)))
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/v1/transfers/{TRANSFER_ID}")))
        .respond_with(TransferStatus { completed })
        .mount(server)
        .await;
}

async fn requests(server: &MockServer, verb: &str, at: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .expect("recording is on")
        .into_iter()
        .filter(|r| r.method.as_str() == verb && r.url.path() == at)
        .collect()
}

struct Executor {
    pool: PgPool,
    brokers: String,
    topics: Topics,
    group: String,
    due_url: String,
    starts: usize,
}

impl Executor {
    fn spawn(&mut self) -> Child {
        self.starts += 1;
        let log = std::env::temp_dir().join(format!("{}-{}.log", self.group, self.starts));
        eprintln!("executor start {} (log {})", self.starts, log.display());
        let log = std::fs::File::create(&log).unwrap();
        Command::new(env!("CARGO_BIN_EXE_treasury"))
            .args(["run", "--roles", "executor"])
            .envs(common::child_env(
                &common::database_url(&self.pool),
                &self.brokers,
                &self.topics,
                &self.group,
            ))
            .env("TREASURY_MONITOR_INTERVAL", "1s")
            .env("KAFKA_SESSION_TIMEOUT_MS", "6000")
            .env(
                "KAFKA_GROUP_INSTANCE_ID",
                format!("{}-executor", self.group),
            )
            .env("DUE_BASE_URL", &self.due_url)
            .env("DUE_API_KEY", DUE_KEY)
            .env("DUE_ACCOUNT_ID", "acct_treasury")
            .env("DUE_USD_RECIPIENT_ID", "rcp_usd_bank")
            .env("DUE_USDC_RECIPIENT_ID", "rcp_usdc_wallet")
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn treasury run --roles executor")
    }

    /// SIGKILL, then let the dead worker's job lease run out. The lease
    /// (twice the monitor interval, at least 60 s) exists so that two live
    /// workers never drive one job; its expiry is only a matter of time, so
    /// the test moves it to now instead of waiting a minute.
    async fn kill(&self, child: &mut Child, job: Uuid) {
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        sqlx::query("UPDATE conversion_jobs SET lease_until = now() WHERE id = $1")
            .bind(job)
            .execute(&self.pool)
            .await
            .unwrap();
    }
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    panic!("executor did not stop within 30 s of SIGTERM");
}

async fn job_state(pool: &PgPool, job: Uuid) -> Option<(String, Option<String>, Option<Uuid>)> {
    sqlx::query_as("SELECT status, provider_tx_id, provider_id FROM conversion_jobs WHERE id = $1")
        .bind(job)
        .fetch_optional(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn sigkill_between_initiating_and_recording_executes_one_conversion(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let started = std::time::Instant::now();
    let seed: u64 = std::env::var("EXECUTOR_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("kill moments drawn from EXECUTOR_KILL_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let topics = common::unique_topics("exkill");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 1).await;

    let server = MockServer::start().await;
    let completed = Arc::new(AtomicBool::new(false));
    mount_due(&server, completed.clone()).await;

    // Due is the only provider that can take the job.
    sqlx::query("UPDATE conversion_providers SET provider_type = 'due', status = 'active' WHERE name = 'Due'")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("UPDATE conversion_providers SET status = 'inactive' WHERE name = 'ZeroHash'")
        .execute(&pool)
        .await
        .unwrap();
    let due_id: Uuid = sqlx::query_scalar("SELECT id FROM conversion_providers WHERE name = 'Due'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let before = balances(&pool).await;

    // One command, delivered three times.
    let command = ConversionCommand {
        command_id: Uuid::new_v4(),
        direction: ConversionDirection::UsdcToUsd,
        trigger: ConversionTrigger::Manual,
        amount: Money::new(Currency::Usdc, dec!(25000)).unwrap(),
        source_account: BufferAccount::SystemBufferUsdc,
        destination_account: BufferAccount::SystemBufferFiat,
        cycle_id: format!("e2e-kill-{}", suffix()),
        created_at: Utc::now(),
    };
    let job_id = ConversionJob::from_command(&command).id;
    let payload = encode_command(&Codec::default(), &command).unwrap();
    let producer: rdkafka::producer::FutureProducer =
        treasury::kafka::idempotent_producer(&base).expect("producer");
    for _ in 0..3 {
        producer
            .send(
                rdkafka::producer::FutureRecord::to(&topics.commands)
                    .key(&command.command_id.to_string())
                    .payload(&payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce the command");
    }

    let mut executor = Executor {
        pool: pool.clone(),
        brokers: brokers.clone(),
        topics: topics.clone(),
        group: format!("exkill-{}", suffix()),
        due_url: server.uri(),
        starts: 0,
    };

    // Kill 1: while Due is creating the transfer (the request has arrived,
    // its answer has not): the job must still be pending with no transaction id.
    let mut child = executor.spawn();
    let arrived = common::wait_until(Duration::from_secs(60), || async {
        !requests(&server, "POST", "/v1/transfers").await.is_empty()
    })
    .await;
    assert!(arrived, "the executor asked Due for the transfer");
    tokio::time::sleep(Duration::from_millis(rng.gen_range(50..700))).await;
    assert_eq!(
        requests(&server, "POST", "/v1/transfers").await.len(),
        1,
        "still inside the first response delay"
    );
    executor.kill(&mut child, job_id).await;
    let at_kill = job_state(&pool, job_id).await.expect("the job exists");
    assert_eq!(
        at_kill,
        ("pending".to_owned(), None, Some(due_id)),
        "killed between initiating at Due and recording it (provider chosen and stored first)"
    );

    // Kill 2: at a random moment while the job is followed at Due.
    let mut child = executor.spawn();
    let following = common::wait_until(Duration::from_secs(60), || async {
        matches!(job_state(&pool, job_id).await, Some((s, _, _))
            if s == "provider_submitted" || s == "provider_processing")
    })
    .await;
    assert!(
        following,
        "after the restart the job reached Due's transfer"
    );
    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..2500))).await;
    executor.kill(&mut child, job_id).await;
    eprintln!("kill 2 with the job {:?}", job_state(&pool, job_id).await);

    // Kill 3: Due reports completion; kill at a random moment around the
    // poll that sees it, the completion transaction, or just after.
    let mut child = executor.spawn();
    let polls = requests(&server, "GET", &format!("/v1/transfers/{TRANSFER_ID}"))
        .await
        .len();
    let polling = common::wait_until(Duration::from_secs(60), || async {
        requests(&server, "GET", &format!("/v1/transfers/{TRANSFER_ID}"))
            .await
            .len()
            > polls
    })
    .await;
    assert!(polling, "the restarted executor polls Due");
    completed.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(rng.gen_range(0..2000))).await;
    executor.kill(&mut child, job_id).await;
    eprintln!("kill 3 with the job {:?}", job_state(&pool, job_id).await);

    // The last start finishes the job and publishes its posting.
    let mut child = executor.spawn();
    let done = common::wait_until(Duration::from_secs(60), || async {
        matches!(job_state(&pool, job_id).await, Some((s, _, _)) if s == "completed")
            && count(&pool, "SELECT count(*) FROM outbox WHERE sent_at IS NULL").await == 0
    })
    .await;
    let on_topic = postings_on_topic(&brokers, &topics, 1).await;
    let status = terminate(&mut child);
    assert!(
        done,
        "the job completed after {} starts: {:?}",
        executor.starts,
        job_state(&pool, job_id).await
    );
    assert!(status.success(), "SIGTERM gives a clean exit, got {status}");

    // Due saw one conversion: every transfer creation carried the job id.
    let creations = requests(&server, "POST", "/v1/transfers").await;
    let keys: BTreeSet<String> = creations
        .iter()
        .map(|r| {
            r.headers
                .get("idempotency-key")
                .expect("transfer creation carries an Idempotency-Key")
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from([job_id.to_string()]),
        "one idempotency key, the job id, on every transfer creation"
    );
    assert_eq!(
        creations.len(),
        2,
        "the transfer was asked for again only after the kill that lost its answer"
    );
    for r in &creations {
        let body: serde_json::Value = r.body_json().unwrap();
        assert_eq!(body["quote"], QUOTE_TOKEN);
        assert_eq!(body["recipient"], "rcp_usd_bank");
    }

    // One job, completed once, with Due's transfer id and exact amounts.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM conversion_jobs").await,
        1,
        "three deliveries of one command make one job"
    );
    let job = PgStore::from_pool(pool.clone())
        .job(job_id)
        .await
        .unwrap()
        .expect("the job");
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(job.provider_id, Some(due_id));
    assert_eq!(job.provider_name.as_deref(), Some("Due"));
    assert_eq!(job.provider_tx_id.as_deref(), Some(TRANSFER_ID));
    assert_ne!(job.provider_tx_id.as_deref(), Some(QUOTE_TOKEN));
    assert_eq!(
        job.destination_amount,
        Some(Money::new(Currency::Usd, dec!(24980.15)).unwrap())
    );
    assert_eq!(
        job.fee,
        Some(Money::new(Currency::Usdc, dec!(12.345678)).unwrap())
    );
    assert_eq!(job.exchange_rate, Some(dec!(0.9997)));
    let history = assert_history_forward(&pool, job_id).await;
    eprintln!("history: {history:?}");
    let completions = history.iter().filter(|h| h.1 == "completed").count();
    assert_eq!(completions, 1, "completed once");

    let stored: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT posting FROM ledger_postings WHERE job_id = $1")
            .bind(job_id)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 1, "exactly one posting set for the job");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM ledger_postings").await,
        1
    );
    let stored: LedgerPosting = serde_json::from_value(stored[0].clone()).unwrap();
    assert_posting_matches(&stored, &job);

    // On the topic: one posting (a relay killed between sending and marking
    // may resend it under the same message id, which consumers deduplicate).
    let ids: BTreeSet<String> = on_topic
        .iter()
        .map(|(_, h)| h["message-id"].clone())
        .collect();
    assert_eq!(ids, BTreeSet::from([stored.posting_id.to_string()]));
    for (posting, _) in &on_topic {
        assert_eq!(
            (
                posting.posting_id,
                &posting.idempotency_key,
                &posting.entries,
                posting.exchange_rate
            ),
            (
                stored.posting_id,
                &stored.idempotency_key,
                &stored.entries,
                stored.exchange_rate
            ),
            "the published posting is the stored one"
        );
    }

    // Balances moved once, by exactly the amounts Due reported.
    let after = balances(&pool).await;
    assert_eq!(
        after["system_buffer_usdc"],
        before["system_buffer_usdc"] - dec!(25000)
    );
    assert_eq!(
        after["system_buffer_fiat"],
        before["system_buffer_fiat"] + dec!(24980.15)
    );
    assert_eq!(after["broker_operational"], before["broker_operational"]);
    let (successes, volume): (i64, Decimal) = sqlx::query_as(
        "SELECT success_count, daily_volume_used FROM conversion_providers WHERE id = $1",
    )
    .bind(due_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (successes, volume),
        (1, dec!(25000)),
        "Due's success and volume counted once"
    );
    eprintln!(
        "{} starts, {} transfer creations with one key; done in {:.1?}",
        executor.starts,
        creations.len(),
        started.elapsed()
    );
}
