//! The executor: turns conversion commands into jobs (exactly once per
//! command), runs each job at a provider and follows it to the end, then
//! posts balanced ledger entries with the job's completion.
//!
//! - [`intake`] consumes `treasury.conversion-commands` like the aggregator
//!   consumes its inputs: offsets, new jobs and DLQ records in one transaction.
//! - [`policy`] (pure) decides each job's next step: retry with backoff,
//!   hold at a provider whose outcome is unknown, fall back, fail, poll,
//!   flag stale, `needs_review`, complete.
//! - [`worker`] is its driver: it leases one job at a time (fenced writes,
//!   see [`crate::store::jobs`]), calls providers with the job id as
//!   idempotency key, and stores each step, completion with the posting
//!   included.

pub mod intake;
pub mod policy;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

pub use intake::Intake;
pub use worker::{JobWorker, WorkerSettings};

use crate::clock::SharedClock;
use crate::codec::Codec;
use crate::config::Config;
use crate::providers::registry::ProviderRegistry;
use crate::shutdown::ShutdownTrigger;
use crate::store::Store;
use crate::store::jobs::JobStore;

/// Worker settings from the configuration.
///
/// A job lease lasts twice the monitor interval, at least 60 s, and is
/// renewed every third of that while the job is driven; one provider call
/// may take at most half a lease.
pub fn worker_settings(config: &Config, owner: String) -> WorkerSettings {
    let lease = config.monitor_interval.max(Duration::from_secs(30)) * 2;
    WorkerSettings {
        owner,
        postings_topic: config.topics.postings.clone(),
        max_retries: config.max_retries,
        retry_initial: Duration::from_millis(500),
        monitor_interval: config.monitor_interval,
        stale_after: chrono::Duration::from_std(config.stale_after).expect("stale_after fits"),
        conversion_timeout: chrono::Duration::from_std(config.conversion_timeout)
            .expect("conversion timeout fits"),
        lease,
        call_timeout: lease / 2,
        health_window: chrono::Duration::from_std(config.provider_health_window)
            .expect("health window fits"),
    }
}

/// Everything the executor's two tasks share.
pub struct ExecutorParts {
    pub intake: Intake,
    pub worker: JobWorker,
}

/// Spawns the executor's tasks, named: command intake and the job worker.
pub fn spawn(parts: ExecutorParts, shutdown: &ShutdownTrigger) -> Vec<crate::runtime::NamedTask> {
    let ExecutorParts { intake, worker } = parts;
    let wake = worker.waker();
    let intake_stop = shutdown.subscribe();
    let worker_stop = shutdown.subscribe();
    vec![
        (
            "executor-intake",
            tokio::spawn(async move { Ok(intake.run(intake_stop, wake).await?) }),
        ),
        (
            "executor-worker",
            tokio::spawn(async move {
                worker.run(worker_stop).await;
                Ok(())
            }),
        ),
    ]
}

/// Builds the executor from the configuration; intake and worker both run
/// on `clock`.
pub fn build(
    config: &Config,
    store: Arc<dyn Store>,
    jobs: Arc<dyn JobStore>,
    codec: Codec,
    clock: SharedClock,
    registry: ProviderRegistry,
) -> anyhow::Result<ExecutorParts> {
    let base = crate::kafka::base_config(config);
    let intake = Intake::new(
        &crate::kafka::consumer_config(&base, &config.executor_group),
        store,
        jobs.clone(),
        codec.clone(),
        clock.clone(),
        intake::IntakeSettings {
            group: config.executor_group.clone(),
            commands_topic: config.topics.commands.clone(),
            dlq_topic: config.topics.dlq.clone(),
            batch_size: config.batch_size.min(500),
            batch_max_wait: config.batch_max_wait,
        },
    )?;
    let owner = format!(
        "{}-{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "treasury".into()),
        uuid::Uuid::new_v4().simple()
    );
    let worker = JobWorker::new(jobs, registry, codec, worker_settings(config, owner), clock);
    Ok(ExecutorParts { intake, worker })
}
