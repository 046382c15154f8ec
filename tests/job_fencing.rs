//! Executor workers sharing one database: a job is driven only under an
//! unexpired, fenced lease, so a command is executed at one provider even
//! when a worker is slow, its lease lapses and a provider's status changes;
//! and provider health counts one outcome per job attempt over a sliding
//! window, so held jobs do not make a working provider look unhealthy.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use sqlx::PgPool;
use tokio::sync::watch;
use treasury::clock::{ManualClock, SharedClock, SystemClock};
use treasury::codec::Codec;
use treasury::domain::{
    BufferAccount, ConversionCommand, ConversionDirection, ConversionJob, ConversionTrigger,
    Currency, JobStatus, Money,
};
use treasury::executor::{JobWorker, WorkerSettings};
use treasury::providers::{
    ConversionProvider, ConversionRequest, ProviderConversion, ProviderError, ProviderRegistry,
    Quote, SandboxBehaviour, SandboxProvider,
};
use treasury::store::jobs::JobStore;
use treasury::store::postgres::PgStore;
use uuid::Uuid;

/// A sandbox with scripted trouble for chosen keys: a *gated* key's first
/// initiate call executes the conversion and then waits until the test
/// opens the gate (a slow answer); a key with answers to *lose* executes
/// and reports an unknown outcome that many times.
#[derive(Clone)]
struct Scripted {
    inner: SandboxProvider,
    gates: Arc<Mutex<HashMap<Uuid, watch::Sender<bool>>>>,
    calls: Arc<Mutex<HashMap<Uuid, u32>>>,
    lose: Arc<Mutex<HashMap<Uuid, u32>>>,
}

impl Scripted {
    fn new(inner: SandboxProvider) -> Self {
        Self {
            inner,
            gates: Arc::default(),
            calls: Arc::default(),
            lose: Arc::default(),
        }
    }

    fn close(&self, key: Uuid) {
        self.gates
            .lock()
            .unwrap()
            .insert(key, watch::channel(false).0);
    }

    fn open(&self, key: Uuid) {
        if let Some(gate) = self.gates.lock().unwrap().get(&key) {
            gate.send_replace(true);
        }
    }

    /// Loses the answers to the next `n` calls for `key`.
    fn losing(self, key: Uuid, n: u32) -> Self {
        self.lose.lock().unwrap().insert(key, n);
        self
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
        let key = request.idempotency_key;
        let answer = self.inner.initiate(request).await;
        let first = {
            let mut calls = self.calls.lock().unwrap();
            let n = calls.entry(key).or_insert(0);
            *n += 1;
            *n == 1
        };
        let gate = first
            .then(|| self.gates.lock().unwrap().get(&key).map(|g| g.subscribe()))
            .flatten();
        if let Some(mut gate) = gate {
            let _ = gate.wait_for(|open| *open).await;
        }
        let lost = self
            .lose
            .lock()
            .unwrap()
            .get_mut(&key)
            .and_then(|n| n.checked_sub(1).map(|left| *n = left))
            .is_some();
        if lost {
            return Err(ProviderError::OutcomeUnknown {
                reason: "scripted lost answer".into(),
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
        postings_topic: "ledger.postings.fencing".to_owned(),
        max_retries: 3,
        retry_initial: Duration::from_millis(5),
        monitor_interval: Duration::from_secs(60),
        stale_after: chrono::Duration::minutes(30),
        conversion_timeout: chrono::Duration::hours(2),
        lease: LEASE,
        call_timeout: Duration::from_secs(30),
        health_window: chrono::Duration::hours(1),
    }
}

const LEASE: Duration = Duration::from_secs(60);

fn worker(
    store: &Arc<PgStore>,
    registry: ProviderRegistry,
    settings: WorkerSettings,
    clock: SharedClock,
) -> JobWorker {
    JobWorker::new(store.clone(), registry, Codec::default(), settings, clock)
}

fn command(n: u128, amount: Decimal) -> ConversionCommand {
    ConversionCommand {
        command_id: Uuid::from_u128(n),
        direction: ConversionDirection::UsdcToUsd,
        trigger: ConversionTrigger::BufferReplenishment,
        amount: Money::positive(Currency::Usdc, amount).unwrap(),
        source_account: BufferAccount::SystemBufferUsdc,
        destination_account: BufferAccount::BrokerOperational,
        cycle_id: format!("window:fencing-{n}"),
        created_at: Utc::now(),
    }
}

async fn new_job(store: &PgStore, n: u128) -> Uuid {
    let job = ConversionJob::from_command(&command(n, dec!(5000)));
    let created = JobStore::intake(store, "fencing", &[], std::slice::from_ref(&job), &[])
        .await
        .unwrap();
    assert_eq!(created, vec![job.id]);
    job.id
}

async fn job(store: &PgStore, id: Uuid) -> ConversionJob {
    JobStore::job(store, id).await.unwrap().expect("job exists")
}

async fn count(pool: &PgPool, sql: &str, job: Uuid) -> i64 {
    sqlx::query_scalar(sql)
        .bind(job)
        .fetch_one(pool)
        .await
        .unwrap()
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

/// The providers at which a conversion for `key` was executed.
fn executed_at(key: Uuid, providers: &[&SandboxProvider]) -> Vec<String> {
    providers
        .iter()
        .filter(|p| p.conversion_for_key(key).is_some())
        .map(|p| p.name().to_owned())
        .collect()
}

/// The scenario seen with two pods: pod A takes a batch of jobs and is slow
/// on the first; the lease of the second lapses and pod B drives it at Due,
/// whose answer is slow too; an operator sets Due inactive; pod A reaches its
/// copy of the second job. That job must stay at Due, and pod A must not
/// call any provider for it.
#[sqlx::test]
async fn a_lapsed_lease_never_executes_a_command_at_a_second_provider(pool: PgPool) {
    let store = setup(&pool).await;
    let due_sandbox = sandbox(1, "Due");
    let zerohash = sandbox(2, "ZeroHash");
    let due = Scripted::new(due_sandbox.clone());
    let providers = || {
        registry(vec![
            ("Due", Arc::new(due.clone()) as Arc<dyn ConversionProvider>),
            ("ZeroHash", Arc::new(zerohash.clone())),
        ])
    };
    let first = new_job(&store, 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let second = new_job(&store, 2).await;
    due.close(first);
    due.close(second);

    // Pod A reaches the first job; Due executes it and answers slowly.
    let pod_a = worker(
        &store,
        providers(),
        settings("pod-a"),
        SystemClock::shared(),
    );
    let a = tokio::spawn(async move { pod_a.run_cycle().await });
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            let due = due_sandbox.clone();
            async move { due.conversion_for_key(first).is_some() }
        })
        .await,
        "Due saw pod A's call for the first job"
    );

    // Time passes: any lease on the second job that was not renewed lapses.
    sqlx::query("UPDATE conversion_jobs SET lease_until = now() - interval '1 second' WHERE id = $1 AND lease_until IS NOT NULL")
        .bind(second)
        .execute(&pool)
        .await
        .unwrap();

    // Pod B drives the second job: Due executes it, its answer is slow.
    let pod_b = worker(
        &store,
        providers(),
        settings("pod-b"),
        SystemClock::shared(),
    );
    let b = tokio::spawn(async move { pod_b.run_cycle().await });
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            let due = due_sandbox.clone();
            async move { due.conversion_for_key(second).is_some() }
        })
        .await,
        "Due saw pod B's call for the second job"
    );

    // An operator takes Due out of selection; pod A's first answer arrives.
    sqlx::query("UPDATE conversion_providers SET status = 'inactive' WHERE name = 'Due'")
        .execute(&pool)
        .await
        .unwrap();
    due.open(first);
    tokio::time::timeout(Duration::from_secs(20), a)
        .await
        .expect("pod A finishes its cycle")
        .unwrap()
        .unwrap();
    due.open(second);
    tokio::time::timeout(Duration::from_secs(20), b)
        .await
        .expect("pod B finishes its cycle")
        .unwrap()
        .unwrap();

    for key in [first, second] {
        assert_eq!(
            executed_at(key, &[&due_sandbox, &zerohash]),
            vec!["Due".to_owned()],
            "job {key} executed at exactly one provider"
        );
    }
    assert_eq!(zerohash.initiate_calls(), 0, "nothing was sent to ZeroHash");
    let held = job(&store, second).await;
    assert_eq!(held.provider_name.as_deref(), Some("Due"), "{held:?}");
}

/// A worker whose lease lapses while its provider call is in flight: the
/// next worker sees the recorded call and asks the same provider with the
/// same key; when the first worker's answer finally arrives it makes no
/// further provider call and no write.
#[sqlx::test]
async fn a_worker_whose_lease_lapses_mid_call_makes_no_further_call_and_no_write(pool: PgPool) {
    let store = setup(&pool).await;
    let clock = Arc::new(ManualClock::new(Utc::now()));
    let due_sandbox = sandbox(1, "Due");
    let zerohash = sandbox(2, "ZeroHash");
    let due = Scripted::new(due_sandbox.clone());
    let providers = || {
        registry(vec![
            ("Due", Arc::new(due.clone()) as Arc<dyn ConversionProvider>),
            ("ZeroHash", Arc::new(zerohash.clone())),
        ])
    };
    let id = new_job(&store, 3).await;
    due.close(id);

    let slow = worker(&store, providers(), settings("slow"), clock.clone());
    let slow_cycle = tokio::spawn(async move { slow.run_cycle().await });
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            let due = due_sandbox.clone();
            async move { due.conversion_for_key(id).is_some() }
        })
        .await,
        "Due saw the slow worker's call"
    );
    let called = job(&store, id).await;
    assert_eq!(called.provider_name.as_deref(), Some("Due"));
    assert!(
        called.provider_called_at.is_some(),
        "the call was recorded before it was made"
    );

    // The lease runs out on the shared clock; another worker takes the job
    // over and finishes it at Due, with the same key.
    clock.advance(chrono::Duration::seconds(61));
    let next = worker(&store, providers(), settings("next"), clock.clone());
    let done = drive(&next, &store, id).await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(done.provider_name.as_deref(), Some("Due"));
    let history = "SELECT count(*) FROM conversion_job_history WHERE job_id = $1";
    let writes = count(&pool, history, id).await;
    let (initiates, polls) = (due_sandbox.initiate_calls(), due_sandbox.status_calls());
    assert_eq!(initiates, 2, "the same key twice");

    // The slow answer arrives: the slow worker's write is refused and it stops.
    due.open(id);
    let driven = tokio::time::timeout(Duration::from_secs(20), slow_cycle)
        .await
        .expect("the slow worker returns")
        .unwrap()
        .unwrap();
    assert_eq!(driven, 1);
    assert_eq!(
        due_sandbox.initiate_calls(),
        initiates,
        "no further initiate"
    );
    assert_eq!(due_sandbox.status_calls(), polls, "no further poll");
    assert_eq!(count(&pool, history, id).await, writes, "no further write");
    assert_eq!(job(&store, id).await, done);
    assert_eq!(due_sandbox.initiated_count(), 1, "one conversion");
    assert_eq!(zerohash.initiate_calls(), 0);
    let postings = "SELECT count(*) FROM ledger_postings WHERE job_id = $1";
    assert_eq!(count(&pool, postings, id).await, 1);
}

/// A provider slower than the lease renewal: the worker keeps its lease
/// for the whole call, a second worker trying all along never gets the job,
/// and setting the provider inactive meanwhile does not move the job; new
/// jobs go to the other provider.
#[sqlx::test]
async fn a_provider_slower_than_the_lease_renewal_keeps_its_job_through_a_status_change(
    pool: PgPool,
) {
    let store = setup(&pool).await;
    let due = SandboxProvider::new(
        1,
        SandboxBehaviour {
            latency_min_ms: 3000,
            latency_max_ms: 3000,
            // Finished when it answers: pod A holds the job until it is
            // completed, so pod B never has a legitimate turn.
            polls_to_complete: 0,
            ..behaviour()
        },
    )
    .named("Due");
    let zerohash = sandbox(2, "ZeroHash");
    let providers = || {
        registry(vec![
            ("Due", Arc::new(due.clone()) as Arc<dyn ConversionProvider>),
            ("ZeroHash", Arc::new(zerohash.clone())),
        ])
    };
    // Leases of 2 s, renewed every 667 ms; each Due call takes 3 s.
    let short = |owner| WorkerSettings {
        lease: Duration::from_secs(2),
        call_timeout: Duration::from_secs(10),
        ..settings(owner)
    };
    let first = new_job(&store, 4).await;

    let a = worker(&store, providers(), short("pod-a"), SystemClock::shared());
    let a_cycle = tokio::spawn(async move { a.run_cycle().await });
    let b = worker(&store, providers(), short("pod-b"), SystemClock::shared());
    assert!(
        common::wait_until(Duration::from_secs(10), || {
            let due = due.clone();
            async move { due.conversion_for_key(first).is_some() }
        })
        .await,
        "pod A called Due"
    );
    sqlx::query("UPDATE conversion_providers SET status = 'inactive' WHERE name = 'Due'")
        .execute(&pool)
        .await
        .unwrap();
    let mut b_tries = 0;
    while !a_cycle.is_finished() {
        assert_eq!(b.run_cycle().await.unwrap(), 0, "pod A holds the job");
        b_tries += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a_cycle.await.unwrap().unwrap();
    assert!(
        b_tries >= 10,
        "pod B tried throughout the slow calls ({b_tries})"
    );

    let done = drive(&b, &store, first).await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(
        done.provider_name.as_deref(),
        Some("Due"),
        "sticky through the status change"
    );
    let second = new_job(&store, 5).await;
    let other = drive(&b, &store, second).await;
    assert_eq!(other.provider_name.as_deref(), Some("ZeroHash"));
    for (key, at) in [(first, "Due"), (second, "ZeroHash")] {
        assert_eq!(executed_at(key, &[&due, &zerohash]), vec![at.to_owned()]);
    }
    assert_eq!(due.initiate_calls(), 1, "one call: the lease never lapsed");
}

/// A job held at a provider (its call went unanswered) stays there when the
/// provider is set inactive and looks unhealthy: the same call is repeated
/// until the provider answers.
#[sqlx::test]
async fn a_held_job_stays_at_its_provider_when_it_is_set_inactive_or_unhealthy(pool: PgPool) {
    let store = setup(&pool).await;
    let due_sandbox = sandbox(1, "Due");
    let zerohash = sandbox(2, "ZeroHash");
    let id = new_job(&store, 6).await;
    let due = Arc::new(Scripted::new(due_sandbox.clone()).losing(id, 4));
    let w = worker(
        &store,
        registry(vec![("Due", due), ("ZeroHash", Arc::new(zerohash.clone()))]),
        settings("w"),
        SystemClock::shared(),
    );
    w.run_cycle().await.unwrap();
    let held = job(&store, id).await;
    assert_eq!(
        (held.status, held.provider_name.as_deref()),
        (JobStatus::Pending, Some("Due"))
    );

    sqlx::query("UPDATE conversion_providers SET status = 'inactive' WHERE name = 'Due'")
        .execute(&pool)
        .await
        .unwrap();
    plant_outcomes(&pool, &store, "Due", 0, 10, chrono::Duration::minutes(1)).await;
    let done = drive(&w, &store, id).await;
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    assert_eq!(done.provider_name.as_deref(), Some("Due"));
    assert_eq!(due_sandbox.initiated_count(), 1);
    assert_eq!(zerohash.initiate_calls(), 0, "never moved to ZeroHash");
}

// ---------------------------------------------------------------------------
// Provider health
// ---------------------------------------------------------------------------

/// Stores `successes` and `failures` job attempts at `provider`, `age` ago,
/// each for a job of its own (finished, so no worker drives it).
async fn plant_outcomes(
    pool: &PgPool,
    store: &PgStore,
    provider: &str,
    successes: u32,
    failures: u32,
    age: chrono::Duration,
) {
    for n in 0..successes + failures {
        let id = new_job(store, Uuid::new_v4().as_u128()).await;
        sqlx::query("UPDATE conversion_jobs SET status = 'failed' WHERE id = $1")
            .bind(id)
            .execute(pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO provider_attempt_outcomes (job_id, provider_id, succeeded, decided_at)
             SELECT $1, id, $3, $4 FROM conversion_providers WHERE name = $2",
        )
        .bind(id)
        .bind(provider)
        .bind(n < successes)
        .bind(Utc::now() - age)
        .execute(pool)
        .await
        .unwrap();
    }
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

/// One job held at Due for a dozen monitor cycles while Due completes ten
/// others: Due's record is ten successes and no failure, so it keeps being
/// chosen. (Counting a failure per held cycle made Due "unhealthy" while its
/// own record showed only successes.)
#[sqlx::test]
async fn held_jobs_do_not_lower_a_providers_health(pool: PgPool) {
    let store = setup(&pool).await;
    let due_sandbox = sandbox(1, "Due");
    let zerohash = sandbox(2, "ZeroHash");
    let held = new_job(&store, 7).await;
    let due = Arc::new(Scripted::new(due_sandbox.clone()).losing(held, u32::MAX));
    let w = worker(
        &store,
        registry(vec![("Due", due), ("ZeroHash", Arc::new(zerohash.clone()))]),
        settings("w"),
        SystemClock::shared(),
    );
    for n in 0..12u128 {
        let other = (n < 10).then_some(n);
        let id = match other {
            Some(n) => Some(new_job(&store, 100 + n).await),
            None => None,
        };
        for _ in 0..3 {
            w.run_cycle().await.unwrap();
        }
        if let Some(id) = id {
            assert_eq!(job(&store, id).await.status, JobStatus::Completed);
        }
        let still = job(&store, held).await;
        assert_eq!(
            (still.status, still.provider_name.as_deref()),
            (JobStatus::Pending, Some("Due"))
        );
    }
    let (success, failure): (i64, i64) = sqlx::query_as(
        "SELECT successes_last_hour, failures_last_hour FROM v_provider_recent_health
          WHERE name = 'Due'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (success, failure),
        (10, 0),
        "one outcome per job attempt; held ones none yet"
    );
    let lifetime: (i64, i64) = sqlx::query_as(
        "SELECT success_count, failure_count FROM conversion_providers WHERE name = 'Due'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(lifetime, (10, 0));

    let next = new_job(&store, 200).await;
    let done = drive(&w, &store, next).await;
    assert_eq!(done.provider_name.as_deref(), Some("Due"), "still healthy");
    assert_eq!(zerohash.initiate_calls(), 0);
    assert_eq!(
        executed_at(held, &[&due_sandbox, &zerohash]),
        vec!["Due".to_owned()]
    );
}

/// Health is judged over the window: 7 failures in 10 recent attempts make
/// Due ineligible; the same record older than the window is forgotten, so
/// Due is chosen again once it has recovered.
#[sqlx::test]
async fn an_unhealthy_provider_is_skipped_and_recovers_when_its_failures_age_out(pool: PgPool) {
    let store = setup(&pool).await;
    let due = sandbox(1, "Due");
    let zerohash = sandbox(2, "ZeroHash");
    let w = worker(
        &store,
        registry(vec![
            ("Due", Arc::new(due.clone()) as Arc<dyn ConversionProvider>),
            ("ZeroHash", Arc::new(zerohash.clone())),
        ]),
        settings("w"),
        SystemClock::shared(),
    );
    plant_outcomes(&pool, &store, "Due", 3, 7, chrono::Duration::minutes(59)).await;
    let first = new_job(&store, 300).await;
    let done = drive(&w, &store, first).await;
    assert_eq!(done.provider_name.as_deref(), Some("ZeroHash"));
    let reason = selection_reason(&pool, first).await;
    assert!(
        reason.contains("Due (unhealthy (3 succeeded, 7 failed))"),
        "{reason}"
    );

    // An hour later those attempts are outside the window.
    sqlx::query(
        "UPDATE provider_attempt_outcomes SET decided_at = decided_at - interval '2 minutes'",
    )
    .execute(&pool)
    .await
    .unwrap();
    let second = new_job(&store, 301).await;
    let done = drive(&w, &store, second).await;
    assert_eq!(done.provider_name.as_deref(), Some("Due"), "recovered");
    assert_eq!(due.initiated_count(), 1);
}
