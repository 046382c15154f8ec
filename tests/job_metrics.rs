//! The job metrics with the fenced worker: a job the worker drives to its
//! posting through the [`Timed`] job store is observed once in
//! `treasury_job_duration_seconds`, its provider calls are counted in
//! `treasury_provider_requests_total`, an operator's cancellation is timed
//! too, and `treasury_jobs{status}` counts the stored jobs.
//!
//! Its own test binary: it installs the process's metrics recorder.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rust_decimal_macros::dec;
use treasury::clock::SystemClock;
use treasury::codec::Codec;
use treasury::domain::{
    BufferAccount, ConversionCommand, ConversionDirection, ConversionJob, ConversionTrigger,
    Currency, JobStatus, Money,
};
use treasury::executor::{JobWorker, WorkerSettings};
use treasury::providers::{ProviderRegistry, SandboxBehaviour, SandboxProvider};
use treasury::store::jobs::JobStore;
use treasury::store::memory::MemoryStore;
use treasury::store::operator::{OperatorAction, OperatorOutcome};
use treasury::telemetry::jobs::Timed;
use uuid::Uuid;

fn job(n: u128) -> ConversionJob {
    ConversionJob::from_command(&ConversionCommand {
        command_id: Uuid::from_u128(n),
        direction: ConversionDirection::UsdcToUsd,
        trigger: ConversionTrigger::Manual,
        amount: Money::positive(Currency::Usdc, dec!(5000)).unwrap(),
        source_account: BufferAccount::SystemBufferUsdc,
        destination_account: BufferAccount::BrokerOperational,
        cycle_id: "manual".into(),
        created_at: Utc::now(),
    })
}

/// The value of the sample `name{labels}` (labels in any order).
fn sample(exposition: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (series_name, rest) = series.split_once('{').unwrap_or((series, "}"));
        let all = labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        (series_name == name && all).then(|| value.parse().ok())?
    })
}

#[tokio::test]
async fn the_fenced_worker_feeds_the_job_metrics() {
    let handle = treasury::telemetry::init_metrics().expect("the recorder installs");
    let memory = MemoryStore::default();
    let clock = SystemClock::shared();
    let jobs: Arc<dyn JobStore> = Arc::new(Timed::new(Arc::new(memory.clone()), clock.clone()));
    let sandbox = SandboxProvider::new(7, SandboxBehaviour::default());
    let worker = JobWorker::new(
        jobs.clone(),
        ProviderRegistry::standard(|_| None, Some(sandbox)),
        Codec::default(),
        WorkerSettings {
            owner: "metrics".into(),
            postings_topic: "ledger.postings".into(),
            max_retries: 3,
            retry_initial: Duration::from_millis(5),
            monitor_interval: Duration::from_secs(60),
            stale_after: chrono::Duration::minutes(30),
            conversion_timeout: chrono::Duration::hours(2),
            lease: Duration::from_secs(60),
            call_timeout: Duration::from_secs(30),
            health_window: chrono::Duration::hours(1),
        },
        clock,
    );

    let driven = job(1);
    let cancelled = job(2);
    let created = jobs
        .intake("g", &[], &[driven.clone(), cancelled.clone()], &[])
        .await
        .unwrap();
    assert_eq!(created.len(), 2);
    assert!(matches!(
        jobs.operator_change(cancelled.id, &OperatorAction::Cancel)
            .await
            .unwrap(),
        OperatorOutcome::Done { .. }
    ));

    let mut done = None;
    for _ in 0..50 {
        worker.run_cycle().await.unwrap();
        let stored = jobs.job(driven.id).await.unwrap().unwrap();
        if stored.status.is_final() {
            done = Some(stored);
            break;
        }
    }
    let done = done.expect("the worker finishes the job");
    assert_eq!(done.status, JobStatus::Completed, "{done:?}");
    let provider = done.provider_name.clone().expect("executed at a provider");

    treasury::telemetry::refresh_gauges(&memory, jobs.as_ref())
        .await
        .unwrap();
    let exposition = handle.render();
    let direction = ("direction", "usdc_to_usd");
    assert_eq!(
        sample(
            &exposition,
            "treasury_job_duration_seconds_count",
            &[direction, ("provider", &provider)]
        ),
        Some(1.0),
        "the completed job is timed once:\n{exposition}"
    );
    assert_eq!(
        sample(
            &exposition,
            "treasury_job_duration_seconds_count",
            &[direction, ("provider", "none")]
        ),
        Some(1.0),
        "the cancelled job is timed once:\n{exposition}"
    );
    let initiated = sample(
        &exposition,
        "treasury_provider_requests_total",
        &[
            ("provider", &provider),
            ("call", "initiate"),
            ("outcome", "success"),
        ],
    );
    assert_eq!(
        initiated,
        Some(1.0),
        "one initiate call at {provider}:\n{exposition}"
    );
    let polled = sample(
        &exposition,
        "treasury_provider_requests_total",
        &[
            ("provider", &provider),
            ("call", "status"),
            ("outcome", "success"),
        ],
    );
    assert!(
        polled.is_some_and(|n| n >= 1.0),
        "its status polls are counted:\n{exposition}"
    );
    for (status, count) in [("completed", 1.0), ("cancelled", 1.0), ("pending", 0.0)] {
        assert_eq!(
            sample(&exposition, "treasury_jobs", &[("status", status)]),
            Some(count),
            "treasury_jobs{{status=\"{status}\"}}:\n{exposition}"
        );
    }
}
