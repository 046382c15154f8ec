//! The executor against PostgreSQL: commands become jobs exactly once, jobs
//! run at sandbox providers through the status machine, and a completed job
//! has exactly one balanced posting. Each test shows one of the original
//! engine's defects absent (retries that never ran, no fallback, a provider
//! that could not be found again, a ledger that refused fees, provider health
//! and volume never updated) or one of the executor's promises kept (at most
//! one conversion per command at a provider, through a crash).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sqlx::PgPool;
use treasury::clock::SystemClock;
use treasury::codec::records::{encode_command, posting_from_value};
use treasury::codec::{Codec, SchemaKind};
use treasury::domain::{
    BufferAccount, ConversionCommand, ConversionDirection, ConversionJob, ConversionTrigger,
    Currency, EntrySide, JobStatus, LedgerPosting, Money,
};
use treasury::executor::{JobWorker, WorkerSettings};
use treasury::providers::{
    ConversionProvider, ConversionRequest, ProviderConversion, ProviderError, ProviderRegistry,
    Quote, SandboxBehaviour, SandboxProvider,
};
use treasury::store::jobs::JobStore;
use treasury::store::postgres::PgStore;
use treasury::store::{LockMode, OffsetRange, Store, StoreError, TopicPartition};
use uuid::Uuid;

const POSTINGS: &str = "ledger.postings.test";
const GROUP: &str = "executor-test";

// ---------------------------------------------------------------------------
// Providers
// ---------------------------------------------------------------------------

/// Fee 10 bps in the source currency, spread 5 bps, no latency, no failures,
/// completes on the second status poll.
fn behaviour() -> SandboxBehaviour {
    SandboxBehaviour {
        fee_bps: dec!(10),
        spread_bps: dec!(5),
        ..SandboxBehaviour::default()
    }
}

fn sandbox(seed: u64, name: &str) -> SandboxProvider {
    SandboxProvider::new(seed, behaviour()).named(name)
}

/// A sandbox with scripted trouble in front of it.
struct Scripted {
    inner: SandboxProvider,
    /// Initiate calls that fail retryably before reaching the sandbox.
    fail_first: u32,
    /// Initiate calls that reach the sandbox, whose answer is then lost.
    lose_first: u32,
    /// The first initiate reaches the sandbox and then never returns
    /// (the worker dies before it can record the answer).
    hang_first: AtomicBool,
    calls: AtomicU32,
}

impl Scripted {
    fn new(inner: SandboxProvider) -> Self {
        Self {
            inner,
            fail_first: 0,
            lose_first: 0,
            hang_first: AtomicBool::new(false),
            calls: AtomicU32::new(0),
        }
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl ConversionProvider for Scripted {
    fn name(&self) -> &str {
        self.inner.name()
    }

    async fn initiate(
        &self,
        request: &ConversionRequest,
    ) -> Result<ProviderConversion, ProviderError> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if n <= self.fail_first {
            return Err(ProviderError::Retryable {
                reason: format!("scripted 503 #{n}"),
                retry_after_ms: None,
            });
        }
        let answer = self.inner.initiate(request).await;
        if self.hang_first.swap(false, Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if n <= self.fail_first + self.lose_first {
            return Err(ProviderError::OutcomeUnknown {
                reason: format!("scripted lost response #{n}"),
            });
        }
        answer
    }

    async fn status(&self, provider_tx_id: &str) -> Result<ProviderConversion, ProviderError> {
        self.inner.status(provider_tx_id).await
    }

    async fn quote(
        &self,
        direction: ConversionDirection,
        amount: Money,
    ) -> Result<Quote, ProviderError> {
        self.inner.quote(direction, amount).await
    }

    async fn balance(&self, currency: Currency) -> Result<Money, ProviderError> {
        self.inner.balance(currency).await
    }

    async fn health_check(&self) -> Result<(), ProviderError> {
        self.inner.health_check().await
    }
}

/// A registry serving the seeded rows (switched to `provider_type = 'sandbox'`)
/// with the given providers, by row name.
fn registry(providers: Vec<(&str, Arc<dyn ConversionProvider>)>) -> ProviderRegistry {
    let by_name: HashMap<String, Arc<dyn ConversionProvider>> = providers
        .into_iter()
        .map(|(name, p)| (name.to_owned(), p))
        .collect();
    let mut registry = ProviderRegistry::new(|_| None);
    registry.register("sandbox", move |row, _env| {
        by_name.get(&row.name).cloned().ok_or_else(|| {
            ProviderError::Configuration(format!("no test provider for {}", row.name))
        })
    });
    registry
}

/// A registry serving `due` as Due and `zerohash` as ZeroHash.
fn due_and_zerohash(
    due: Arc<dyn ConversionProvider>,
    zerohash: &SandboxProvider,
) -> ProviderRegistry {
    registry(vec![("Due", due), ("ZeroHash", Arc::new(zerohash.clone()))])
}

/// Due and ZeroHash served by two independent sandboxes.
fn two_sandboxes() -> (SandboxProvider, SandboxProvider, ProviderRegistry) {
    let due = sandbox(1, "Due");
    let zerohash = sandbox(2, "ZeroHash");
    let registry = due_and_zerohash(Arc::new(due.clone()), &zerohash);
    (due, zerohash, registry)
}

// ---------------------------------------------------------------------------
// Store, worker, commands
// ---------------------------------------------------------------------------

async fn setup(pool: &PgPool) -> Arc<PgStore> {
    sqlx::query("UPDATE conversion_providers SET provider_type = 'sandbox'")
        .execute(pool)
        .await
        .unwrap();
    Arc::new(PgStore::from_pool(pool.clone()))
}

fn settings(owner: &str) -> WorkerSettings {
    WorkerSettings {
        owner: owner.to_owned(),
        postings_topic: POSTINGS.to_owned(),
        max_retries: 3,
        retry_initial: Duration::from_millis(5),
        monitor_interval: Duration::from_secs(60),
        stale_after: chrono::Duration::minutes(30),
        conversion_timeout: chrono::Duration::hours(2),
        lease: Duration::from_secs(60),
        call_timeout: Duration::from_secs(30),
        health_window: chrono::Duration::hours(1),
    }
}

fn worker(store: &Arc<PgStore>, registry: ProviderRegistry, settings: WorkerSettings) -> JobWorker {
    JobWorker::new(
        store.clone(),
        registry,
        Codec::default(),
        settings,
        SystemClock::shared(),
    )
}

/// A USDC → USD refill of `broker_operational`.
fn command(n: u128, amount: Decimal) -> ConversionCommand {
    ConversionCommand {
        command_id: Uuid::from_u128(n),
        direction: ConversionDirection::UsdcToUsd,
        trigger: ConversionTrigger::BufferReplenishment,
        amount: Money::positive(Currency::Usdc, amount).unwrap(),
        source_account: BufferAccount::SystemBufferUsdc,
        destination_account: BufferAccount::BrokerOperational,
        cycle_id: format!("window:test-{n}"),
        created_at: Utc::now(),
    }
}

/// Takes a command in as the intake would; returns the ids of new jobs.
async fn intake(store: &PgStore, cmd: &ConversionCommand) -> Vec<Uuid> {
    JobStore::intake(store, GROUP, &[], &[ConversionJob::from_command(cmd)], &[])
        .await
        .unwrap()
}

async fn new_job(store: &PgStore, cmd: &ConversionCommand) -> Uuid {
    let created = intake(store, cmd).await;
    assert_eq!(created.len(), 1, "one job for a new command");
    created[0]
}

async fn job(store: &PgStore, id: Uuid) -> ConversionJob {
    JobStore::job(store, id).await.unwrap().expect("job exists")
}

/// Runs monitor cycles until the job is final or needs a person.
async fn drive(worker: &JobWorker, store: &PgStore, id: Uuid) -> ConversionJob {
    for _ in 0..20 {
        worker.run_cycle().await.unwrap();
        let j = job(store, id).await;
        if j.status.is_final() || j.status == JobStatus::NeedsReview {
            return j;
        }
    }
    panic!("job {id} did not finish: {:?}", job(store, id).await);
}

// ---------------------------------------------------------------------------
// What the database holds
// ---------------------------------------------------------------------------

async fn balances(pool: &PgPool) -> BTreeMap<String, Decimal> {
    let rows: Vec<(String, Decimal)> =
        sqlx::query_as("SELECT account_type, balance FROM buffer_balances")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter().map(|(a, b)| (a, b.normalize())).collect()
}

#[derive(Debug, Clone, PartialEq)]
struct ProviderStats {
    id: Uuid,
    success: i64,
    failure: i64,
    volume: Decimal,
}

async fn provider(pool: &PgPool, name: &str) -> ProviderStats {
    let (id, success, failure, volume): (Uuid, i64, i64, Decimal) = sqlx::query_as(
        "SELECT id, success_count, failure_count, daily_volume_used
           FROM conversion_providers WHERE name = $1",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .unwrap();
    ProviderStats {
        id,
        success,
        failure,
        volume: volume.normalize(),
    }
}

async fn postings(pool: &PgPool, job: Uuid) -> Vec<LedgerPosting> {
    let rows: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT posting FROM ledger_postings WHERE job_id = $1")
            .bind(job)
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter()
        .map(|v| serde_json::from_value(v).expect("stored posting reads back"))
        .collect()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Postings queued for the ledger topic: (key, payload, headers).
async fn outbox_postings(pool: &PgPool) -> Vec<(Option<String>, Vec<u8>, serde_json::Value)> {
    sqlx::query_as("SELECT message_key, payload, headers FROM outbox WHERE topic = $1 ORDER BY seq")
        .bind(POSTINGS)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The job's statuses in history order, repeats (notes without a status change) dropped.
async fn status_path(pool: &PgPool, job: Uuid) -> Vec<String> {
    let mut path: Vec<String> = sqlx::query_scalar(
        "SELECT to_status FROM conversion_job_history WHERE job_id = $1 ORDER BY id",
    )
    .bind(job)
    .fetch_all(pool)
    .await
    .unwrap();
    path.dedup();
    path
}

async fn selection_reason(pool: &PgPool, job: Uuid) -> String {
    sqlx::query_scalar::<_, Option<String>>(
        "SELECT selection_reason FROM conversion_jobs WHERE id = $1",
    )
    .bind(job)
    .fetch_one(pool)
    .await
    .unwrap()
    .expect("selection reason stored")
}

/// `(incoming, outgoing)` per buffer, as the settlement planner sees them.
async fn in_flight_positions(store: &PgStore) -> BTreeMap<BufferAccount, (Decimal, Decimal)> {
    let mut tx = Store::begin(store, LockMode::Shared).await.unwrap();
    let positions = tx.buffer_positions().await.unwrap();
    tx.commit().await.unwrap();
    positions
        .into_iter()
        .map(|p| (p.account, (p.incoming, p.outgoing)))
        .collect()
}

fn assert_balanced_conversion(
    posting: &LedgerPosting,
    job: &ConversionJob,
    fee: Money,
    destination: Money,
    rate: Decimal,
) {
    posting.check_balanced().expect("balances per currency");
    assert_eq!(posting.idempotency_key, job.id.to_string());
    assert_eq!(posting.job_id, job.id);
    assert_eq!(posting.exchange_rate, rate);
    let find = |account: &str| {
        let found: Vec<_> = posting
            .entries
            .iter()
            .filter(|e| e.account == account)
            .collect();
        assert_eq!(found.len(), 1, "one {account} entry in {posting:?}");
        (found[0].side, found[0].amount)
    };
    assert_eq!(
        find("system_buffer_usdc"),
        (EntrySide::Credit, job.amount),
        "source credited with what was sent"
    );
    assert_eq!(
        find("broker_operational"),
        (EntrySide::Debit, destination),
        "destination debited with what arrived"
    );
    assert_eq!(
        find("conversion_fees_usdc"),
        (EntrySide::Debit, fee),
        "the fee is its own entry"
    );
    assert_eq!(
        find("conversion_clearing_usdc"),
        (
            EntrySide::Debit,
            Money {
                currency: Currency::Usdc,
                value: job.amount.value - fee.value
            }
        )
    );
    assert_eq!(
        find("conversion_clearing_usd"),
        (EntrySide::Credit, destination)
    );
}

// ---------------------------------------------------------------------------
// 1. Happy path
// ---------------------------------------------------------------------------

#[sqlx::test]
async fn a_command_becomes_a_completed_job_with_one_balanced_posting(pool: PgPool) {
    let store = setup(&pool).await;
    let (due, zerohash, registry) = two_sandboxes();
    let w = worker(&store, registry, settings("w1"));
    let before = balances(&pool).await;
    let due_before = provider(&pool, "Due").await;

    let amount = dec!(12345.67);
    let id = new_job(&store, &command(1, amount)).await;
    let done = drive(&w, &store, id).await;

    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(done.provider_name.as_deref(), Some("Due"));
    assert_eq!(done.provider_id, Some(due_before.id));
    let conversion = due
        .conversion_for_key(id)
        .expect("Due saw the job id as key");
    assert_eq!(done.provider_tx_id, Some(conversion.provider_tx_id.clone()));
    assert_eq!(due.initiated_count(), 1);
    assert_eq!(zerohash.initiate_calls(), 0);

    // What the sandbox charged and paid: fee 12.345670 USDC (10 bps),
    // (12345.67 − 12.34567) × 0.9995 = 12327.157667835 → 12327.15 USD.
    let fee = Money::positive(Currency::Usdc, dec!(12.34567)).unwrap();
    let destination = Money::positive(Currency::Usd, dec!(12327.15)).unwrap();
    let rate = dec!(0.9995);
    assert_eq!(
        (
            conversion.fee,
            conversion.destination_amount,
            conversion.rate
        ),
        (fee, destination, rate)
    );
    assert_eq!(done.fee, Some(fee));
    assert_eq!(done.destination_amount, Some(destination));
    assert_eq!(done.exchange_rate, Some(rate));

    // Exactly one posting, balanced per currency, with its fee leg.
    let stored = postings(&pool, id).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM ledger_postings").await,
        1
    );
    let posting = &stored[0];
    assert_balanced_conversion(posting, &done, fee, destination, rate);
    assert_eq!(posting.entries.len(), 5);

    // The same posting is queued for the ledger topic, keyed by the job.
    let queued = outbox_postings(&pool).await;
    assert_eq!(queued.len(), 1);
    let (key, payload, headers) = &queued[0];
    assert_eq!(key.as_deref(), Some(id.to_string().as_str()));
    assert_eq!(headers["idempotency-key"], id.to_string());
    assert_eq!(headers["message-id"], posting.posting_id.to_string());
    let codec = Codec::default();
    let sent = posting_from_value(
        &codec
            .decode_cached(payload, SchemaKind::LedgerPosting)
            .unwrap(),
    )
    .unwrap();
    assert_balanced_conversion(&sent, &done, fee, destination, rate);
    assert_eq!(sent.posting_id, posting.posting_id);
    assert_eq!(sent.entries, posting.entries);

    // Buffers moved by exactly the amounts; the third untouched.
    let after = balances(&pool).await;
    assert_eq!(
        after["system_buffer_usdc"],
        before["system_buffer_usdc"] - amount
    );
    assert_eq!(
        after["broker_operational"],
        before["broker_operational"] + destination.value
    );
    assert_eq!(after["system_buffer_fiat"], before["system_buffer_fiat"]);

    // Provider health and volume are counted.
    let due_after = provider(&pool, "Due").await;
    assert_eq!(due_after.success, due_before.success + 1);
    assert_eq!(due_after.failure, due_before.failure);
    assert_eq!(due_after.volume, due_before.volume + amount);

    // Every step is in the history.
    assert_eq!(
        status_path(&pool, id).await,
        [
            "pending",
            "provider_submitted",
            "provider_processing",
            "provider_completed",
            "ledger_updating",
            "completed"
        ]
    );
    let (processing, completed): (Option<chrono::DateTime<Utc>>, Option<chrono::DateTime<Utc>>) =
        sqlx::query_as("SELECT processing_at, completed_at FROM conversion_jobs WHERE id = $1")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(processing.is_some() && completed.is_some());

    // More cycles change nothing.
    assert_eq!(
        w.run_cycle().await.unwrap(),
        0,
        "a completed job is not leased"
    );
    assert_eq!(postings(&pool, id).await.len(), 1);
    assert_eq!(outbox_postings(&pool).await.len(), 1);
    assert_eq!(balances(&pool).await, after);
}

/// A `usd_transfer` runs at the provider whose row offers transfers (never
/// at a converting provider), and its posting moves USD between the two USD
/// buffers with the fee as its own entry and no clearing account.
#[sqlx::test]
async fn a_usd_transfer_runs_at_the_transfer_provider_and_posts_without_clearing(pool: PgPool) {
    let store = setup(&pool).await;
    sqlx::query(
        "INSERT INTO conversion_providers
             (id, name, provider_type, priority, status, supports_usdc_to_usd,
              supports_usd_to_usdc, supports_usd_transfer, min_conversion_amount,
              max_conversion_amount, fee_percentage, fee_fixed, spread_bps)
         VALUES (gen_random_uuid(), 'Bank transfer', 'sandbox', 3, 'active', FALSE, FALSE, TRUE,
                 100, 1000000, 0, 0.25, 0)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let due = sandbox(1, "Due");
    let zerohash = sandbox(2, "ZeroHash");
    let bank = SandboxProvider::new(
        3,
        SandboxBehaviour {
            fee_fixed: dec!(0.25),
            ..SandboxBehaviour::default()
        },
    )
    .named("Bank transfer");
    let w = worker(
        &store,
        registry(vec![
            ("Due", Arc::new(due.clone())),
            ("ZeroHash", Arc::new(zerohash.clone())),
            ("Bank transfer", Arc::new(bank.clone())),
        ]),
        settings("w1"),
    );
    let before = balances(&pool).await;
    let amount = dec!(25000);
    let transfer = ConversionCommand {
        direction: ConversionDirection::UsdTransfer,
        amount: Money::positive(Currency::Usd, amount).unwrap(),
        source_account: BufferAccount::BrokerOperational,
        destination_account: BufferAccount::SystemBufferFiat,
        ..command(40, amount)
    };
    let id = new_job(&store, &transfer).await;
    let done = drive(&w, &store, id).await;

    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(done.provider_name.as_deref(), Some("Bank transfer"));
    assert_eq!(bank.initiated_count(), 1);
    assert_eq!(due.initiate_calls() + zerohash.initiate_calls(), 0);
    let arrived = Money::positive(Currency::Usd, dec!(24999.75)).unwrap();
    assert_eq!(done.destination_amount, Some(arrived));

    let stored = postings(&pool, id).await;
    assert_eq!(stored.len(), 1);
    let posting = &stored[0];
    posting.check_balanced().expect("balances per currency");
    let lines: Vec<(&str, EntrySide, Decimal)> = posting
        .entries
        .iter()
        .map(|e| (e.account.as_str(), e.side, e.amount.value))
        .collect();
    assert_eq!(
        lines,
        [
            ("broker_operational", EntrySide::Credit, amount),
            ("transfer_fees_usd", EntrySide::Debit, dec!(0.25)),
            ("system_buffer_fiat", EntrySide::Debit, dec!(24999.75)),
        ]
    );
    assert!(
        posting
            .entries
            .iter()
            .all(|e| e.amount.currency == Currency::Usd)
    );

    let after = balances(&pool).await;
    assert_eq!(
        after["broker_operational"],
        before["broker_operational"] - amount
    );
    assert_eq!(
        after["system_buffer_fiat"],
        before["system_buffer_fiat"] + arrived.value
    );
    assert_eq!(after["system_buffer_usdc"], before["system_buffer_usdc"]);
}

// ---------------------------------------------------------------------------
// 2. Retries, then success at the same provider
// ---------------------------------------------------------------------------

#[sqlx::test]
async fn retryable_errors_are_retried_at_the_same_provider(pool: PgPool) {
    let store = setup(&pool).await;
    let due_sandbox = sandbox(1, "Due");
    let zerohash = sandbox(2, "ZeroHash");
    let due = Arc::new(Scripted {
        fail_first: 2,
        ..Scripted::new(due_sandbox.clone())
    });
    let w = worker(
        &store,
        due_and_zerohash(due.clone(), &zerohash),
        settings("w1"),
    );
    let due_before = provider(&pool, "Due").await;

    let id = new_job(&store, &command(2, dec!(5000))).await;
    let done = drive(&w, &store, id).await;

    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(done.provider_name.as_deref(), Some("Due"));
    assert!(done.attempted_providers.is_empty(), "no fallback needed");
    assert_eq!(due.calls(), 3, "two 503s, then accepted");
    assert_eq!(done.retry_count, 2, "the retries are recorded on the job");
    assert_eq!(due_sandbox.initiated_count(), 1, "one conversion at Due");
    assert!(due_sandbox.conversion_for_key(id).is_some());
    assert_eq!(zerohash.initiate_calls(), 0);
    let due_after = provider(&pool, "Due").await;
    assert_eq!(
        (due_after.success, due_after.failure),
        (due_before.success + 1, due_before.failure),
        "a retried call that succeeded is a success"
    );
    assert_eq!(postings(&pool, id).await.len(), 1);
}

/// Due behind a [`Scripted`] wrapper that loses its first `lose_first`
/// answers (Due records the conversion at the first call), ZeroHash as a plain
/// sandbox, and a worker over both.
struct LosingDue {
    due: Arc<Scripted>,
    due_sandbox: SandboxProvider,
    zerohash: SandboxProvider,
    worker: JobWorker,
}

fn due_losing_answers(
    store: &Arc<PgStore>,
    lose_first: u32,
    settings: WorkerSettings,
) -> LosingDue {
    let due_sandbox = sandbox(1, "Due");
    let due = Arc::new(Scripted {
        lose_first,
        ..Scripted::new(due_sandbox.clone())
    });
    let zerohash = sandbox(2, "ZeroHash");
    let worker = worker(store, due_and_zerohash(due.clone(), &zerohash), settings);
    LosingDue {
        due,
        due_sandbox,
        zerohash,
        worker,
    }
}

#[sqlx::test]
async fn a_lost_response_is_retried_with_the_same_key_and_one_conversion(pool: PgPool) {
    let store = setup(&pool).await;
    let LosingDue {
        due_sandbox,
        worker: w,
        ..
    } = due_losing_answers(&store, 2, settings("w1"));

    let id = new_job(&store, &command(3, dec!(5000))).await;
    let done = drive(&w, &store, id).await;

    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(done.provider_name.as_deref(), Some("Due"));
    assert_eq!(due_sandbox.initiate_calls(), 3, "the same key three times");
    assert_eq!(due_sandbox.initiated_count(), 1, "one conversion");
    assert_eq!(
        done.provider_tx_id,
        due_sandbox.conversion_for_key(id).map(|c| c.provider_tx_id)
    );
    assert_eq!(postings(&pool, id).await.len(), 1);
}

// ---------------------------------------------------------------------------
// 3. Retries exhausted: fallback to the next provider
// ---------------------------------------------------------------------------

#[sqlx::test]
async fn a_provider_that_stays_down_falls_back_to_the_next(pool: PgPool) {
    let store = setup(&pool).await;
    // Due quotes (so it is chosen first) but answers every initiate with 503.
    let due_sandbox = sandbox(1, "Due");
    let due = Arc::new(Scripted {
        fail_first: u32::MAX,
        ..Scripted::new(due_sandbox.clone())
    });
    let zerohash = sandbox(2, "ZeroHash");
    let w = worker(
        &store,
        due_and_zerohash(due.clone(), &zerohash),
        settings("w1"),
    );
    let due_before = provider(&pool, "Due").await;
    let zh_before = provider(&pool, "ZeroHash").await;

    let amount = dec!(5000);
    let id = new_job(&store, &command(4, amount)).await;
    let done = drive(&w, &store, id).await;

    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(due.calls(), 4, "1 call + max_retries (3) retries");
    assert_eq!(due_sandbox.initiated_count(), 0);
    assert_eq!(zerohash.initiated_count(), 1);
    assert!(zerohash.conversion_for_key(id).is_some());
    assert_eq!(done.attempted_providers, vec![due_before.id]);
    // The job names the provider that ran it, so it can be found again.
    assert_eq!(done.provider_name.as_deref(), Some("ZeroHash"));
    assert_eq!(done.provider_id, Some(zh_before.id));
    assert_eq!(
        done.provider_tx_id,
        zerohash.conversion_for_key(id).map(|c| c.provider_tx_id)
    );
    assert_eq!(done.retry_count, 3, "three retries at Due");

    let due_after = provider(&pool, "Due").await;
    let zh_after = provider(&pool, "ZeroHash").await;
    assert_eq!(due_after.failure, due_before.failure + 1);
    assert_eq!(due_after.success, due_before.success);
    assert_eq!(due_after.volume, due_before.volume);
    assert_eq!(zh_after.success, zh_before.success + 1);
    assert_eq!(zh_after.volume, zh_before.volume + amount);

    let stored = postings(&pool, id).await;
    assert_eq!(stored.len(), 1);
    stored[0].check_balanced().unwrap();
    assert!(stored[0].description.contains("ZeroHash"));
}

#[sqlx::test]
async fn a_provider_down_when_asked_for_a_quote_is_tried_last(pool: PgPool) {
    let store = setup(&pool).await;
    let (due, zerohash, registry) = two_sandboxes();
    due.set_down(true);
    let w = worker(&store, registry, settings("w1"));

    let id = new_job(&store, &command(60, dec!(5000))).await;
    let done = drive(&w, &store, id).await;

    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(done.provider_name.as_deref(), Some("ZeroHash"));
    assert_eq!(
        due.initiate_calls(),
        0,
        "no call to a provider that gave no quote"
    );
    assert_eq!(zerohash.initiated_count(), 1);
    assert!(
        done.attempted_providers.is_empty(),
        "chosen, not fallen back to"
    );
    let reason = selection_reason(&pool, id).await;
    assert!(
        reason.starts_with("chose ZeroHash (priority 2, quote"),
        "{reason}"
    );
    assert!(reason.contains("Due (priority 1, no quote: "), "{reason}");
}

// ---------------------------------------------------------------------------
// 4. Every provider down: failed, nothing posted
// ---------------------------------------------------------------------------

#[sqlx::test]
async fn with_every_provider_down_the_job_fails_and_nothing_is_posted(pool: PgPool) {
    let store = setup(&pool).await;
    let (due, zerohash, registry) = two_sandboxes();
    due.set_down(true);
    zerohash.set_down(true);
    let w = worker(&store, registry, settings("w1"));
    let before = balances(&pool).await;
    let due_before = provider(&pool, "Due").await;
    let zh_before = provider(&pool, "ZeroHash").await;

    let id = new_job(&store, &command(5, dec!(5000))).await;
    let done = drive(&w, &store, id).await;

    assert_eq!(done.status, JobStatus::Failed, "{done:?}");
    let message = done.error_message.clone().expect("failed with a reason");
    assert!(
        message.contains("Due") && message.contains("ZeroHash"),
        "the error names the providers tried: {message}"
    );
    assert_eq!(done.attempted_providers, vec![due_before.id, zh_before.id]);
    assert_eq!(due.initiate_calls(), 4);
    assert_eq!(zerohash.initiate_calls(), 4);
    assert_eq!(provider(&pool, "Due").await.failure, due_before.failure + 1);
    assert_eq!(
        provider(&pool, "ZeroHash").await.failure,
        zh_before.failure + 1
    );

    assert!(postings(&pool, id).await.is_empty());
    assert_eq!(
        count(&pool, "SELECT count(*) FROM ledger_postings").await,
        0
    );
    assert!(outbox_postings(&pool).await.is_empty());
    assert_eq!(balances(&pool).await, before);
    assert_eq!(
        status_path(&pool, id).await.last().map(String::as_str),
        Some("failed")
    );

    // A failed job is final: no further calls.
    assert_eq!(w.run_cycle().await.unwrap(), 0);
    assert_eq!(due.initiate_calls() + zerohash.initiate_calls(), 8);
}

// ---------------------------------------------------------------------------
// 5. Duplicates and replays: one job, one posting
// ---------------------------------------------------------------------------

#[sqlx::test]
async fn the_same_command_three_times_is_one_job_and_one_posting(pool: PgPool) {
    let store = setup(&pool).await;
    let (due, _zerohash, registry) = two_sandboxes();
    let cmd = command(6, dec!(5000));

    let first = intake(&store, &cmd).await;
    assert_eq!(first.len(), 1);
    assert!(intake(&store, &cmd).await.is_empty());
    assert!(intake(&store, &cmd).await.is_empty());

    // A batch holding it three times, then the same batch replayed (same
    // offsets: refused or empty), then under a new group (a replay from the start).
    let tp = TopicPartition {
        topic: "commands".into(),
        partition: 0,
    };
    let range = OffsetRange {
        tp: tp.clone(),
        first: 0,
        next: 3,
    };
    let triple = vec![ConversionJob::from_command(&cmd); 3];
    let batch = JobStore::intake(&*store, GROUP, std::slice::from_ref(&range), &triple, &[])
        .await
        .unwrap();
    assert!(batch.is_empty(), "the command already has its job");
    match JobStore::intake(&*store, GROUP, std::slice::from_ref(&range), &triple, &[]).await {
        Ok(created) => assert!(created.is_empty()),
        Err(StoreError::OffsetConflict { .. }) => {}
        Err(e) => panic!("unexpected error replaying a batch: {e}"),
    }
    let replay = JobStore::intake(&*store, "another-group", &[range], &triple, &[])
        .await
        .unwrap();
    assert!(replay.is_empty());
    assert_eq!(
        count(&pool, "SELECT count(*) FROM conversion_jobs").await,
        1
    );

    let w = worker(&store, registry, settings("w1"));
    let done = drive(&w, &store, first[0]).await;
    assert_eq!(done.status, JobStatus::Completed);
    assert!(
        intake(&store, &cmd).await.is_empty(),
        "not after completion either"
    );
    w.run_cycle().await.unwrap();
    assert_eq!(due.initiated_count(), 1);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM ledger_postings").await,
        1
    );
    assert_eq!(outbox_postings(&pool).await.len(), 1);
}

#[sqlx::test]
async fn commands_redelivered_and_replayed_through_kafka_make_one_job(pool: PgPool) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use treasury::executor::Intake;
    use treasury::executor::intake::IntakeSettings;

    let Some(brokers) = common::brokers() else {
        return;
    };
    let store = setup(&pool).await;
    let (due, _zerohash, registry) = two_sandboxes();
    let topics = common::unique_topics("executor_jobs");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 1).await;
    let codec = Codec::default();

    // The same command delivered three times, then a bad one.
    let cmd = command(7, dec!(5000));
    let bytes = encode_command(&codec, &cmd).unwrap();
    let producer: FutureProducer = treasury::kafka::idempotent_producer(&base).unwrap();
    for payload in [&bytes[..], &bytes[..], &bytes[..], b"not avro"] {
        producer
            .send(
                FutureRecord::to(&topics.commands).key("k").payload(payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }

    let consume_all = |group: &str| {
        let settings = IntakeSettings {
            group: group.to_owned(),
            commands_topic: topics.commands.clone(),
            dlq_topic: topics.dlq.clone(),
            batch_size: 100,
            batch_max_wait: Duration::from_millis(200),
        };
        let store = store.clone();
        let base = base.clone();
        let pool = pool.clone();
        let codec = codec.clone();
        let group = group.to_owned();
        async move {
            let mut intake = Intake::new(
                &treasury::kafka::consumer_config(&base, &group),
                store.clone(),
                store.clone(),
                codec,
                treasury::clock::SystemClock::shared(),
                settings,
            )
            .unwrap();
            let mut created = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                created.extend(intake.step().await.unwrap());
                let next: Option<i64> = sqlx::query_scalar(
                    "SELECT next_offset FROM consumer_offsets WHERE consumer_group = $1",
                )
                .bind(&group)
                .fetch_optional(&pool)
                .await
                .unwrap();
                if next == Some(4) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "intake did not consume the commands topic"
                );
            }
            created
        }
    };

    let created = consume_all("executor-kafka-a").await;
    assert_eq!(created.len(), 1, "one job for three deliveries");
    let id = created[0];
    assert_eq!(id, ConversionJob::from_command(&cmd).id);
    let dlq = count(
        &pool,
        &format!("SELECT count(*) FROM outbox WHERE topic = '{}'", topics.dlq),
    )
    .await;
    assert_eq!(dlq, 1, "the bad command went to the DLQ");

    let w = worker(&store, registry, settings("w1"));
    assert_eq!(drive(&w, &store, id).await.status, JobStatus::Completed);

    // The topic replayed from the start by a fresh group: nothing new.
    let replayed = consume_all("executor-kafka-b").await;
    assert!(replayed.is_empty(), "replay made jobs: {replayed:?}");
    w.run_cycle().await.unwrap();
    assert_eq!(
        count(&pool, "SELECT count(*) FROM conversion_jobs").await,
        1
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM ledger_postings").await,
        1
    );
    assert_eq!(outbox_postings(&pool).await.len(), 1);
    assert_eq!(due.initiated_count(), 1);
}

// ---------------------------------------------------------------------------
// 6. A worker killed between initiating and recording it
// ---------------------------------------------------------------------------

/// A job whose worker died while Due was executing its call: Due holds the
/// conversion, the job holds Due's name and no answer.
struct CrashedAtDue {
    id: Uuid,
    due_sandbox: SandboxProvider,
    zerohash: SandboxProvider,
    providers: Vec<(&'static str, Arc<dyn ConversionProvider>)>,
}

async fn crash_while_due_executes(store: &Arc<PgStore>, n: u128) -> CrashedAtDue {
    let due_sandbox = sandbox(1, "Due");
    let due = Arc::new(Scripted {
        hang_first: AtomicBool::new(true),
        ..Scripted::new(due_sandbox.clone())
    });
    let zerohash = sandbox(2, "ZeroHash");
    let providers: Vec<(&str, Arc<dyn ConversionProvider>)> =
        vec![("Due", due), ("ZeroHash", Arc::new(zerohash.clone()))];
    let id = new_job(store, &command(n, dec!(5000))).await;

    // The first worker gets the conversion accepted and dies before recording it.
    let first = worker(store, registry(providers.clone()), settings("crashing"));
    let task = tokio::spawn(async move { first.run_cycle().await });
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            let sandbox = due_sandbox.clone();
            async move { sandbox.initiated_count() == 1 }
        })
        .await,
        "the provider saw the call"
    );
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    CrashedAtDue {
        id,
        due_sandbox,
        zerohash,
        providers,
    }
}

/// Lets the dead worker's lease on `id` lapse now.
async fn expire_lease(pool: &PgPool, id: Uuid) {
    sqlx::query(
        "UPDATE conversion_jobs SET lease_until = now() - interval '1 second' WHERE id = $1",
    )
    .bind(id)
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test]
async fn a_crash_after_initiating_repeats_the_call_with_the_same_key(pool: PgPool) {
    let store = setup(&pool).await;
    let CrashedAtDue {
        id,
        due_sandbox,
        zerohash,
        providers,
    } = crash_while_due_executes(&store, 8).await;

    let stranded = job(&store, id).await;
    assert_eq!(stranded.status, JobStatus::Pending);
    assert_eq!(
        stranded.provider_name.as_deref(),
        Some("Due"),
        "the choice was stored before the call"
    );
    assert!(stranded.provider_tx_id.is_none());

    // Another worker waits for the dead one's lease, then takes over.
    let second = worker(&store, registry(providers), settings("restarted"));
    assert_eq!(
        second.run_cycle().await.unwrap(),
        0,
        "the lease still holds"
    );
    expire_lease(&pool, id).await;
    let done = drive(&second, &store, id).await;

    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(done.provider_name.as_deref(), Some("Due"));
    assert_eq!(due_sandbox.initiate_calls(), 2, "the same key twice");
    assert_eq!(due_sandbox.initiated_count(), 1, "one conversion");
    let conversion = due_sandbox.conversion_for_key(id).unwrap();
    assert_eq!(done.provider_tx_id, Some(conversion.provider_tx_id));
    assert_eq!(zerohash.initiate_calls(), 0, "no fallback: Due had it");
    assert_eq!(postings(&pool, id).await.len(), 1);
    assert_eq!(outbox_postings(&pool).await.len(), 1);
    let completions = count(
        &pool,
        &format!(
            "SELECT count(*) FROM conversion_job_history WHERE job_id = '{id}' AND to_status = 'completed'"
        ),
    )
    .await;
    assert_eq!(completions, 1, "completed once");
    assert_eq!(provider(&pool, "Due").await.success, 1);
}

// ---------------------------------------------------------------------------
// 6b. No fallback from a provider that may have executed the conversion
// ---------------------------------------------------------------------------

#[sqlx::test]
async fn a_provider_that_may_have_executed_is_never_swapped_for_another(pool: PgPool) {
    let store = setup(&pool).await;
    // Every answer of the first cycle (1 call + 3 retries) and one more is
    // lost, although Due recorded the conversion at the first call.
    let LosingDue {
        due,
        due_sandbox,
        zerohash,
        worker: w,
    } = due_losing_answers(&store, 5, settings("w1"));
    let before = balances(&pool).await;
    let id = new_job(&store, &command(9, dec!(5000))).await;

    w.run_cycle().await.unwrap();
    let held = job(&store, id).await;
    assert_eq!(held.status, JobStatus::Pending, "{held:?}");
    assert_eq!(held.provider_name.as_deref(), Some("Due"), "held at Due");
    assert!(
        held.attempted_providers.is_empty(),
        "Due is not given up on"
    );
    assert_eq!(due.calls(), 4);
    assert_eq!(due_sandbox.initiated_count(), 1, "Due has the conversion");
    assert_eq!(
        zerohash.initiate_calls(),
        0,
        "never sent to a second provider"
    );
    assert!(
        status_path(&pool, id).await.iter().all(|s| s == "pending"),
        "still pending"
    );
    assert_eq!(balances(&pool).await, before);

    // Next cycle: the same key again; Due answers on the second call of it.
    let done = drive(&w, &store, id).await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(due.calls(), 6);
    assert_eq!(due_sandbox.initiated_count(), 1, "one conversion, ever");
    assert_eq!(
        done.provider_tx_id,
        due_sandbox.conversion_for_key(id).map(|c| c.provider_tx_id)
    );
    assert_eq!(zerohash.initiate_calls(), 0);
    assert_eq!(postings(&pool, id).await.len(), 1);
}

#[sqlx::test]
async fn a_provider_silent_past_the_conversion_timeout_hands_the_job_to_a_person(pool: PgPool) {
    let store = setup(&pool).await;
    let LosingDue {
        due,
        due_sandbox,
        zerohash,
        worker: w,
    } = due_losing_answers(
        &store,
        u32::MAX,
        WorkerSettings {
            conversion_timeout: chrono::Duration::zero(),
            ..settings("w1")
        },
    );
    let before = balances(&pool).await;
    let id = new_job(&store, &command(10, dec!(5000))).await;

    let done = drive(&w, &store, id).await;
    assert_eq!(done.status, JobStatus::NeedsReview, "{done:?}");
    let why = done.error_message.clone().unwrap();
    assert!(
        why.contains("Due") && why.contains(&id.to_string()),
        "the reason names the provider and the key to look for: {why}"
    );
    assert_eq!(due_sandbox.initiated_count(), 1);
    assert_eq!(zerohash.initiate_calls(), 0, "no second conversion");
    assert!(postings(&pool, id).await.is_empty());
    assert_eq!(balances(&pool).await, before);
    assert_eq!(
        status_path(&pool, id).await.last().map(String::as_str),
        Some("needs_review")
    );
    // Nothing more happens without a person.
    w.run_cycle().await.unwrap();
    assert_eq!(due.calls(), 4);
}

#[sqlx::test]
async fn a_job_resumed_after_a_crash_stays_with_its_provider_through_an_outage(pool: PgPool) {
    let store = setup(&pool).await;
    // The first worker dies while Due is executing its call.
    let CrashedAtDue {
        id,
        due_sandbox,
        zerohash,
        providers,
    } = crash_while_due_executes(&store, 11).await;
    expire_lease(&pool, id).await;

    // Due is then down (503: nothing done). The call before the crash may have
    // executed, so the job must not move to ZeroHash.
    due_sandbox.set_down(true);
    let second = worker(&store, registry(providers), settings("restarted"));
    second.run_cycle().await.unwrap();
    let held = job(&store, id).await;
    assert_eq!(held.status, JobStatus::Pending);
    assert_eq!(held.provider_name.as_deref(), Some("Due"));
    assert_eq!(zerohash.initiate_calls(), 0);

    due_sandbox.set_down(false);
    let done = drive(&second, &store, id).await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(
        due_sandbox.initiated_count(),
        1,
        "the conversion from before the crash"
    );
    assert_eq!(zerohash.initiate_calls(), 0);
    assert_eq!(postings(&pool, id).await.len(), 1);
}

// ---------------------------------------------------------------------------
// 7. Stale flag, then timeout to needs_review
// ---------------------------------------------------------------------------

#[sqlx::test]
async fn a_conversion_without_an_answer_is_flagged_stale_then_handed_to_a_person(pool: PgPool) {
    let store = setup(&pool).await;
    let due = SandboxProvider::new(
        1,
        SandboxBehaviour {
            polls_to_complete: u32::MAX,
            ..behaviour()
        },
    )
    .named("Due");
    let w = worker(
        &store,
        registry(vec![
            ("Due", Arc::new(due.clone())),
            ("ZeroHash", Arc::new(sandbox(2, "ZeroHash"))),
        ]),
        WorkerSettings {
            stale_after: chrono::Duration::minutes(30),
            conversion_timeout: chrono::Duration::hours(2),
            ..settings("w1")
        },
    );
    let before = balances(&pool).await;
    let id = new_job(&store, &command(9, dec!(5000))).await;
    w.run_cycle().await.unwrap();
    w.run_cycle().await.unwrap();
    let waiting = job(&store, id).await;
    assert_eq!(waiting.status, JobStatus::ProviderProcessing);
    assert!(
        waiting.stale_flagged_at.is_none(),
        "young jobs are not stale"
    );

    let age = |minutes: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "UPDATE conversion_jobs SET submitted_at = now() - make_interval(mins => $2) WHERE id = $1",
            )
            .bind(id)
            .bind(minutes as i32)
            .execute(&pool)
            .await
            .unwrap();
        }
    };

    // Older than stale_after: flagged, still waiting on the provider.
    age(31).await;
    w.run_cycle().await.unwrap();
    let stale = job(&store, id).await;
    assert_eq!(stale.status, JobStatus::ProviderProcessing);
    let flagged = stale.stale_flagged_at.expect("flagged stale");
    let in_view = count(
        &pool,
        &format!("SELECT count(*) FROM v_stale_conversion_jobs WHERE id = '{id}'"),
    )
    .await;
    assert_eq!(in_view, 1);
    // Flagged once.
    w.run_cycle().await.unwrap();
    assert_eq!(job(&store, id).await.stale_flagged_at, Some(flagged));

    // Older than the conversion timeout: a person decides.
    age(121).await;
    w.run_cycle().await.unwrap();
    let review = job(&store, id).await;
    assert_eq!(review.status, JobStatus::NeedsReview);
    assert!(
        review
            .error_message
            .as_deref()
            .is_some_and(|m| m.contains("no final answer")),
        "{review:?}"
    );

    // Never retried automatically, nothing posted.
    assert_eq!(
        w.run_cycle().await.unwrap(),
        0,
        "needs_review is not leased"
    );
    assert_eq!(due.initiate_calls(), 1);
    assert_eq!(due.initiated_count(), 1);
    assert!(postings(&pool, id).await.is_empty());
    assert!(outbox_postings(&pool).await.is_empty());
    assert_eq!(balances(&pool).await, before);
    assert_eq!(
        status_path(&pool, id).await,
        [
            "pending",
            "provider_submitted",
            "provider_processing",
            "needs_review"
        ]
    );
}

// ---------------------------------------------------------------------------
// 8. The provider fails the conversion
// ---------------------------------------------------------------------------

#[sqlx::test]
async fn a_conversion_failed_at_the_provider_fails_the_job_and_leaves_flight(pool: PgPool) {
    let store = setup(&pool).await;
    let due = SandboxProvider::new(
        1,
        SandboxBehaviour {
            failure_probability: 1.0,
            ..behaviour()
        },
    )
    .named("Due");
    let zerohash = sandbox(2, "ZeroHash");
    let w = worker(
        &store,
        due_and_zerohash(Arc::new(due.clone()), &zerohash),
        settings("w1"),
    );
    let before = balances(&pool).await;
    let due_before = provider(&pool, "Due").await;

    let amount = dec!(5000);
    let cmd = command(10, amount);
    sqlx::query(
        "INSERT INTO planned_commands (command_id, cycle_id, direction, trigger_reason, currency,
            amount, source_account, destination_account, emitted, created_at)
         VALUES ($1, $2, 'usdc_to_usd', 'buffer_replenishment', 'USDC', $3,
                 'system_buffer_usdc', 'broker_operational', TRUE, now())",
    )
    .bind(cmd.command_id)
    .bind(&cmd.cycle_id)
    .bind(amount)
    .execute(&pool)
    .await
    .unwrap();
    let id = new_job(&store, &cmd).await;
    let flying = in_flight_positions(&store).await;
    assert_eq!(flying[&BufferAccount::BrokerOperational].0, amount);
    assert_eq!(flying[&BufferAccount::SystemBufferUsdc].1, amount);

    let done = drive(&w, &store, id).await;

    assert_eq!(done.status, JobStatus::Failed, "{done:?}");
    assert!(done.error_message.is_some());
    assert_eq!(due.initiated_count(), 1);
    assert_eq!(
        zerohash.initiate_calls(),
        0,
        "money may have been refused, not retried elsewhere"
    );
    let due_after = provider(&pool, "Due").await;
    assert_eq!(due_after.failure, due_before.failure + 1);
    assert_eq!(due_after.success, due_before.success);
    assert_eq!(due_after.volume, due_before.volume);
    assert!(postings(&pool, id).await.is_empty());
    assert!(outbox_postings(&pool).await.is_empty());
    assert_eq!(balances(&pool).await, before);

    let settled = in_flight_positions(&store).await;
    for (account, (incoming, outgoing)) in &settled {
        assert_eq!(
            (*incoming, *outgoing),
            (Decimal::ZERO, Decimal::ZERO),
            "{account} still counts the failed conversion"
        );
    }
    assert_eq!(
        count(&pool, "SELECT count(*) FROM v_active_conversion_jobs").await,
        0
    );
}

// ---------------------------------------------------------------------------
// 9. Provider selection from the database
// ---------------------------------------------------------------------------

async fn set_due(pool: &PgPool, assignment: &str) {
    sqlx::query(&format!(
        "UPDATE conversion_providers SET {assignment} WHERE name = 'Due'"
    ))
    .execute(pool)
    .await
    .unwrap();
}

#[sqlx::test]
async fn an_amount_above_dues_maximum_goes_to_zerohash(pool: PgPool) {
    let store = setup(&pool).await;
    let (due, zerohash, registry) = two_sandboxes();
    set_due(&pool, "max_conversion_amount = 1000").await;
    let w = worker(&store, registry, settings("w1"));

    let small = new_job(&store, &command(11, dec!(900))).await;
    let large = new_job(&store, &command(12, dec!(5000))).await;
    let small_done = drive(&w, &store, small).await;
    let large_done = drive(&w, &store, large).await;

    assert_eq!(small_done.provider_name.as_deref(), Some("Due"));
    assert_eq!(large_done.provider_name.as_deref(), Some("ZeroHash"));
    assert_eq!(large_done.status, JobStatus::Completed);
    assert!(due.conversion_for_key(large).is_none());
    assert!(zerohash.conversion_for_key(large).is_some());
    assert!(
        large_done.attempted_providers.is_empty(),
        "chosen, not fallen back to"
    );
    let reason = selection_reason(&pool, large).await;
    assert!(reason.contains("chose ZeroHash"), "{reason}");
    assert!(reason.contains("Due (above maximum 1000)"), "{reason}");
    let reason = selection_reason(&pool, small).await;
    assert!(reason.starts_with("chose Due"), "{reason}");
    assert!(reason.contains("fallback: ZeroHash"), "{reason}");
}

#[sqlx::test]
async fn dues_daily_cap_counts_jobs_in_flight(pool: PgPool) {
    let store = setup(&pool).await;
    // Due never finishes, so its first job stays in flight.
    let due = SandboxProvider::new(
        1,
        SandboxBehaviour {
            polls_to_complete: u32::MAX,
            ..behaviour()
        },
    )
    .named("Due");
    let zerohash = sandbox(2, "ZeroHash");
    let w = worker(
        &store,
        due_and_zerohash(Arc::new(due.clone()), &zerohash),
        settings("w1"),
    );
    set_due(
        &pool,
        "daily_volume_limit = 30000, daily_volume_used = 5000",
    )
    .await;

    let first = new_job(&store, &command(13, dec!(20000))).await;
    w.run_cycle().await.unwrap();
    let flying = job(&store, first).await;
    assert_eq!(flying.provider_name.as_deref(), Some("Due"));
    assert!(
        matches!(
            flying.status,
            JobStatus::ProviderSubmitted | JobStatus::ProviderProcessing
        ),
        "{flying:?}"
    );

    // 5000 used + 20000 in flight + 6000 > 30000.
    let second = new_job(&store, &command(14, dec!(6000))).await;
    w.run_cycle().await.unwrap();
    let routed = job(&store, second).await;
    assert_eq!(
        routed.provider_name.as_deref(),
        Some("ZeroHash"),
        "{routed:?}"
    );
    assert!(due.conversion_for_key(second).is_none());
    let reason = selection_reason(&pool, second).await;
    assert!(reason.contains("chose ZeroHash"), "{reason}");
    assert!(
        reason.contains("Due (daily cap 30000 exceeded (used 5000, in flight 20000))"),
        "{reason}"
    );

    // 5000 + 20000 + 5000 fits exactly.
    let third = new_job(&store, &command(15, dec!(5000))).await;
    w.run_cycle().await.unwrap();
    assert_eq!(
        job(&store, third).await.provider_name.as_deref(),
        Some("Due")
    );
}

#[sqlx::test]
async fn a_degraded_provider_is_skipped(pool: PgPool) {
    let store = setup(&pool).await;
    let (due, zerohash, registry) = two_sandboxes();
    set_due(&pool, "status = 'degraded'").await;
    let w = worker(&store, registry, settings("w1"));

    let id = new_job(&store, &command(16, dec!(5000))).await;
    let done = drive(&w, &store, id).await;

    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(done.provider_name.as_deref(), Some("ZeroHash"));
    assert_eq!(due.initiate_calls(), 0);
    assert_eq!(zerohash.initiated_count(), 1);
    let reason = selection_reason(&pool, id).await;
    assert!(reason.contains("chose ZeroHash"), "{reason}");
    assert!(reason.contains("Due (degraded)"), "{reason}");
}

#[sqlx::test]
async fn the_provider_quoting_the_lowest_all_in_cost_gets_the_job(pool: PgPool) {
    let store = setup(&pool).await;
    // Due (priority 1) quotes 10 bps; ZeroHash (priority 2) quotes 2 bps.
    let due = sandbox(1, "Due");
    let zerohash = SandboxProvider::new(
        2,
        SandboxBehaviour {
            fee_bps: dec!(2),
            ..behaviour()
        },
    )
    .named("ZeroHash");
    let w = worker(
        &store,
        due_and_zerohash(Arc::new(due.clone()), &zerohash),
        settings("w1"),
    );

    let id = new_job(&store, &command(17, dec!(10000))).await;
    let done = drive(&w, &store, id).await;

    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(done.provider_name.as_deref(), Some("ZeroHash"));
    assert!(due.conversion_for_key(id).is_none());
    // ZeroHash: fee 2, (10000 − 2) × 0.9995 arrives: 6.999 lost at par;
    // Due: fee 10, (10000 − 10) × 0.9995 arrives: 14.995.
    let reason = selection_reason(&pool, id).await;
    assert!(
        reason.starts_with(
            "chose ZeroHash (priority 2, quote rate 0.9995 fee 2, all-in cost 6.999); \
             fallback: Due (priority 1, quote rate 0.9995 fee 10, all-in cost 14.995)"
        ),
        "{reason}"
    );
}
