//! `treasury demo`: the whole aggregator in one process with no servers.
//! Kafka is librdkafka's in-process mock cluster; state is the in-memory
//! store (NOT durable); a generator produces bursts of deposits and
//! withdrawals, with duplicates, late events and malformed messages; windows
//! are seconds long so a person sees them close.

pub mod generator;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use clap::Args;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::codec::records::{DeadLetter, command_from_value, posting_from_value};
use crate::codec::{Codec, SchemaKind};
use crate::config::Topics;
use crate::domain::{BufferAccount, FlowKind};
use crate::executor::intake::IntakeSettings;
use crate::executor::{Intake, JobWorker, WorkerSettings};
use crate::ingest::{Ingest, IngestSettings};
use crate::providers::sandbox::{SandboxBehaviour, SandboxProvider};
use crate::relay::Relay;
use crate::settlement::{CycleResult, Settlement, SettlementSettings};
use crate::shutdown;
use crate::store::Store;
use crate::store::jobs::JobStore;
use crate::store::memory::MemoryStore;
use crate::window::WindowSpec;
use generator::{EventGenerator, FlowMix};

/// Options of `treasury demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// How long to run before stopping by itself.
    #[arg(long, default_value = "40s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Settlement window length.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub window: Duration,
    /// Events generated per second.
    #[arg(long, default_value_t = 40)]
    pub rate: u32,
    /// Seed of the event generator (same seed, same events).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    println!(
        "Treasury Engine demo — in-process Kafka mock cluster, IN-MEMORY store (not durable)."
    );
    println!(
        "Windows of {}, {} events/s for {}. Ctrl-C stops early.\n",
        humantime::format_duration(args.window),
        args.rate,
        humantime::format_duration(args.duration)
    );
    let cluster = MockCluster::new(1).context("starting the mock cluster")?;
    let topics = Topics::default();
    for (topic, partitions) in [
        (&topics.funding, 3),
        (&topics.withdrawals, 3),
        (&topics.commands, 1),
        (&topics.dlq, 1),
        (&topics.postings, 1),
        (&topics.buffer_alerts, 1),
    ] {
        cluster.create_topic(topic, partitions, 1)?;
    }
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", cluster.bootstrap_servers());

    let store = MemoryStore::default();
    let shared: Arc<dyn Store> = Arc::new(store.clone());
    let codec = Codec::default();
    let spec = WindowSpec::new(args.window, Duration::from_secs(1));
    let (stop, listener) = shutdown::channel();

    let ingest = Ingest::new(
        &crate::kafka::consumer_config(&base, "treasury-demo"),
        shared.clone(),
        codec.clone(),
        crate::clock::SystemClock::shared(),
        IngestSettings {
            group: "treasury-demo".into(),
            funding_topic: topics.funding.clone(),
            withdrawal_topic: topics.withdrawals.clone(),
            dlq_topic: topics.dlq.clone(),
            spec,
            batch_size: 500,
            batch_max_wait: Duration::from_millis(100),
        },
    )?;
    let ingest_task = tokio::spawn(ingest.run(listener.clone()));
    let relay = Relay::new(shared.clone(), crate::kafka::idempotent_producer(&base)?);
    let relay_task = tokio::spawn(relay.run(listener.clone(), Duration::from_millis(100)));
    let watcher_task = tokio::spawn(watch_outputs(
        base.clone(),
        topics.clone(),
        codec.clone(),
        listener.clone(),
    ));
    let registry = crate::providers::registry::ProviderRegistry::standard(
        |_| None,
        Some(SandboxProvider::new(
            args.seed,
            SandboxBehaviour {
                latency_min_ms: 20,
                latency_max_ms: 200,
                retryable_error_probability: 0.2,
                fee_bps: rust_decimal::Decimal::from(10),
                spread_bps: rust_decimal::Decimal::from(5),
                polls_to_complete: 2,
                ..SandboxBehaviour::default()
            },
        )),
    );
    let jobs: Arc<dyn JobStore> = Arc::new(store.clone());
    let intake = Intake::new(
        &crate::kafka::consumer_config(&base, "treasury-demo-executor"),
        shared.clone(),
        jobs.clone(),
        codec.clone(),
        crate::clock::SystemClock::shared(),
        IntakeSettings {
            group: "treasury-demo-executor".into(),
            commands_topic: topics.commands.clone(),
            dlq_topic: topics.dlq.clone(),
            batch_size: 100,
            batch_max_wait: Duration::from_millis(100),
        },
    )?;
    let worker = JobWorker::new(
        jobs,
        registry,
        codec.clone(),
        WorkerSettings {
            owner: "demo".into(),
            postings_topic: topics.postings.clone(),
            max_retries: 3,
            retry_initial: Duration::from_millis(100),
            monitor_interval: Duration::from_millis(500),
            stale_after: chrono::Duration::minutes(30),
            conversion_timeout: chrono::Duration::minutes(30),
            lease: Duration::from_secs(60),
            call_timeout: Duration::from_secs(30),
            health_window: chrono::Duration::hours(1),
        },
        crate::clock::SystemClock::shared(),
    );
    let executor_tasks =
        crate::executor::spawn(crate::executor::ExecutorParts { intake, worker }, &stop);
    let settlement = Settlement::new(
        shared.clone(),
        codec.clone(),
        SettlementSettings {
            spec,
            idle_timeout: chrono::Duration::seconds(2),
            input_topics: vec![topics.funding.clone(), topics.withdrawals.clone()],
            commands_topic: topics.commands.clone(),
            auto_rebalance: true,
            dedup_retention: chrono::Duration::days(7),
            planner: Default::default(),
        },
    )
    .with_buffer_alerts(&topics.buffer_alerts);
    let producer: FutureProducer = crate::kafka::idempotent_producer(&base)?;

    let mut generator = EventGenerator::new(args.seed);
    let started = tokio::time::Instant::now();
    let deadline = started + args.duration;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut produced = Produced::default();
    let mut recent = Vec::new();
    let ctrl_c = shutdown::os_signal();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => { println!("\nCtrl-C: stopping"); break; }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            break;
        }
        let phase = (now - started).as_secs_f64() / args.duration.as_secs_f64();
        let mix = FlowMix {
            usdc_share: 0.85,
            deposit_share: if phase < 0.4 {
                0.25
            } else if phase < 0.7 {
                0.75
            } else {
                0.5
            },
            large_share: 0.01,
            small_max: 400,
        };
        let burst = (args.rate / 4).max(1) as usize * if generator.chance(0.2) { 3 } else { 1 };
        for _ in 0..burst {
            produced
                .send(&producer, &topics, &mut generator, mix, &mut recent, spec)
                .await?;
        }
        for result in settlement.run_cycle(Utc::now()).await? {
            print_cycle(&result);
        }
    }
    // Let the last events through and the windows close.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for result in settlement
        .run_cycle(Utc::now() + chrono::Duration::from_std(args.window * 2)?)
        .await?
    {
        print_cycle(&result);
    }
    stop.trigger();
    let totals = ingest_task.await??;
    let _ = relay_task.await;
    let _ = watcher_task.await;
    for (_, task) in executor_tasks {
        let _ = task.await;
    }

    println!("\n=== summary ===");
    println!(
        "produced: {} valid events, {} duplicates, {} late, {} malformed",
        produced.valid, produced.duplicates, produced.late, produced.malformed
    );
    println!(
        "counted:  {} events ({} late), {} duplicates ignored, {} sent to the DLQ",
        totals.counted, totals.late, totals.duplicates, totals.rejected
    );
    let windows = shared.windows().await?;
    let counted_in_windows: i64 = windows.iter().map(|w| w.event_count).sum();
    println!(
        "windows:  {} ({} closed), holding {} events",
        windows.len(),
        windows.iter().filter(|w| w.closed).count(),
        counted_in_windows
    );
    for w in &windows {
        println!(
            "  {} .. {}  {:>5} events ({:>3} late)  {}",
            w.window_start.format("%H:%M:%S"),
            w.window_end.format("%H:%M:%S"),
            w.event_count,
            w.late_event_count,
            if w.closed { "closed" } else { "open" }
        );
    }
    let commands = shared.planned_commands().await?;
    println!("commands: {} planned", commands.len());
    let all_jobs = store.jobs().await;
    for job in &all_jobs {
        println!(
            "  job {} {} {} via {} → {}{}",
            &job.id.to_string()[..8],
            job.direction,
            job.amount,
            job.provider_name.as_deref().unwrap_or("-"),
            job.status,
            job.destination_amount
                .map(|d| format!(
                    " ({d} received, fee {})",
                    job.fee.map(|f| f.to_string()).unwrap_or_default()
                ))
                .unwrap_or_default()
        );
    }
    let postings = store.postings().await;
    println!(
        "postings: {} (one per completed job, each balanced per currency)",
        postings.len()
    );
    if let Some(p) = postings.first() {
        println!("  example posting:\n{}", serde_json::to_string_pretty(p)?);
    }
    print!(
        "\n{}",
        crate::report::render_status(&shared.buffer_report().await?)
    );
    if totals.counted == produced.valid && counted_in_windows as u64 == produced.valid {
        println!("\nevery valid event counted exactly once");
    } else {
        println!(
            "\nMISMATCH: produced {} valid events, counted {}",
            produced.valid, totals.counted
        );
    }
    Ok(())
}

#[derive(Default)]
struct Produced {
    valid: u64,
    duplicates: u64,
    late: u64,
    malformed: u64,
    sent: u64,
}

impl Produced {
    async fn send(
        &mut self,
        producer: &FutureProducer,
        topics: &Topics,
        generator: &mut EventGenerator,
        mix: FlowMix,
        recent: &mut Vec<(FlowKind, Vec<u8>, String)>,
        spec: WindowSpec,
    ) -> anyhow::Result<()> {
        self.sent += 1;
        let now = Utc::now();
        let (kind, bytes, key) = if self.sent.is_multiple_of(97) {
            self.malformed += 1;
            let m = generator.malformed(now, (self.sent / 97) as usize);
            (m.kind, m.bytes, format!("malformed-{}", self.sent))
        } else if self.sent.is_multiple_of(41) && !recent.is_empty() {
            self.duplicates += 1;
            let i = generator.pick(recent.len());
            recent[i].clone()
        } else {
            let late = self.sent.is_multiple_of(53);
            let at = if late {
                self.late += 1;
                now - spec.length * 3
            } else {
                now - generator.jitter(400)
            };
            let g = generator.event(at, mix);
            self.valid += 1;
            let key = g
                .record
                .as_ref()
                .map(|r| r.user_id.to_string())
                .unwrap_or_default();
            let entry = (g.kind, g.bytes, key);
            if recent.len() >= 200 {
                recent.remove(0);
            }
            recent.push(entry.clone());
            entry
        };
        let topic = match kind {
            FlowKind::Deposit => &topics.funding,
            FlowKind::Withdrawal => &topics.withdrawals,
        };
        producer
            .send(
                FutureRecord::to(topic).key(&key).payload(&bytes),
                Duration::from_secs(5),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("producing to the mock cluster: {e}"))?;
        Ok(())
    }
}

fn print_cycle(result: &CycleResult) {
    let statuses: Vec<String> = BufferAccount::ALL
        .iter()
        .filter_map(|a| {
            let before = result.plan.status_before.get(a)?;
            let after = result.plan.status_after.get(a)?;
            Some(if before == after {
                format!("{a}={before}")
            } else {
                format!("{a}={before}→{after}")
            })
        })
        .collect();
    println!(
        "[{}] closed: {} events ({} late) | {}",
        result.cycle_id,
        result.tally_events,
        result.late_events,
        statuses.join(" ")
    );
    for c in &result.plan.commands {
        println!(
            "    command {} {} {} {} → {} ({})",
            &c.command_id.to_string()[..8],
            c.direction,
            c.amount,
            c.source_account,
            c.destination_account,
            c.trigger.as_str()
        );
    }
    for note in &result.plan.notes {
        println!("    note: {}: {}", note.account, note.note);
    }
}

/// Prints what the engine publishes: commands and DLQ records.
async fn watch_outputs(
    base: ClientConfig,
    topics: Topics,
    codec: Codec,
    mut stop: shutdown::Shutdown,
) {
    let consumer: StreamConsumer = match base
        .clone()
        .set("group.id", "treasury-demo-watcher")
        .set("auto.offset.reset", "earliest")
        .create()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("output watcher unavailable: {e}");
            return;
        }
    };
    if consumer
        .subscribe(&[&topics.commands, &topics.dlq, &topics.buffer_alerts])
        .is_err()
    {
        return;
    }
    let mut seen = HashSet::new();
    loop {
        let message = tokio::select! {
            m = consumer.recv() => m,
            _ = stop.triggered() => break,
        };
        let Ok(message) = message else { continue };
        let Some(payload) = message.payload() else {
            continue;
        };
        if message.topic() == topics.postings {
            if let Ok(value) = codec.decode_cached(payload, SchemaKind::LedgerPosting)
                && let Ok(posting) = posting_from_value(&value)
            {
                println!(
                    "    posted on {}: {} ({} entries, rate {})",
                    topics.postings,
                    posting.description,
                    posting.entries.len(),
                    posting.exchange_rate
                );
            }
        } else if message.topic() == topics.buffer_alerts {
            if let Ok(value) = codec.decode_cached(payload, SchemaKind::BufferAlert)
                && let Ok(alert) = crate::codec::alert::buffer_alert_from_value(&value)
            {
                println!(
                    "    ALERT {}: {} → {} at {}",
                    alert.account, alert.from, alert.to, alert.balance
                );
            }
        } else if message.topic() == topics.dlq {
            if let Ok(value) = codec.decode_cached(payload, SchemaKind::DeadLetter)
                && let Ok(dl) = DeadLetter::from_value(&value)
            {
                println!(
                    "    DLQ  {}[{}]@{}: {}",
                    dl.source_topic, dl.source_partition, dl.source_offset, dl.reason
                );
            }
        } else if let Ok(value) = codec.decode_cached(payload, SchemaKind::ConversionCommand)
            && let Ok(command) = command_from_value(&value)
            && seen.insert(command.command_id)
        {
            println!(
                "    published on {}: command {} {} {}",
                topics.commands,
                &command.command_id.to_string()[..8],
                command.direction,
                command.amount
            );
        }
    }
}
