//! The command line: `treasury run | demo | simulate | migrate | status | trigger | replay | reconcile | convert | config`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::runtime::{self, Role};
use crate::store::postgres::PgStore;
use crate::store::{Store, TopicPartition};
use crate::{demo, kafka};

/// Treasury Engine: keeps the USDC and USD buffers funded by netting deposit
/// and withdrawal flows from Kafka into a few conversions.
///
/// Configuration comes from the environment (see `treasury config`).
#[derive(Debug, Parser)]
#[command(name = "treasury", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the engine against PostgreSQL (DATABASE_URL) and Kafka (KAFKA_BROKERS)
    /// until SIGTERM/SIGINT.
    Run {
        /// Roles to run; all by default.
        #[arg(long, value_delimiter = ',', default_values = ["aggregator", "executor"])]
        roles: Vec<Role>,
    },
    /// Run the whole pipeline in this process with no servers: an in-process
    /// Kafka mock cluster, an in-memory (NOT durable) store, generated events
    /// and short windows. Stops by itself, or on Ctrl-C.
    Demo(demo::DemoArgs),
    /// Run the engine's own decisions (windows, planner, provider selection,
    /// postings) on a simulated clock over a month of flows, beside
    /// baselines and a lower bound. No servers needed.
    Simulate(crate::simulate::cli::SimulateArgs),
    /// Apply the database migrations (safe to run twice).
    Migrate,
    /// Print each buffer's balance, thresholds and status (from v_buffer_status).
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running aggregator for an immediate settlement cycle. The request
    /// is stored in the database; the aggregator handles it on its next tick.
    Trigger {
        /// Wait until the aggregator has handled it and print the plan.
        #[arg(long)]
        wait: bool,
    },
    /// Rewind the aggregator's stored offsets on the input topics. Stop the
    /// aggregators first; on restart they re-read from there. Already counted
    /// events are recognised by id and change nothing.
    Replay(ReplayArgs),
    /// Check the books: every completed job has one posting and every posting a
    /// completed job, no job is stuck, every emitted command became a job,
    /// nothing waits in the outbox, and (with --providers) what each provider
    /// reports holding. Exits 1 when anything is found.
    Reconcile {
        /// Also ask each active provider for its balances.
        #[arg(long)]
        providers: bool,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Queue one conversion by hand (emergency override), like
    /// `POST /v1/conversions`: checked against the buffers and the providers'
    /// limits, sent to the executor with trigger `manual`.
    Convert(ConvertArgs),
    /// Print the effective configuration with secrets masked.
    Config,
}

/// `treasury convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// usdc_to_usd or usd_to_usdc.
    #[arg(long)]
    direction: crate::domain::ConversionDirection,
    /// Amount in the direction's source currency.
    #[arg(long)]
    amount: rust_decimal::Decimal,
    /// The same key again returns the same command instead of a second one.
    #[arg(long)]
    idempotency_key: String,
    /// Why, for the audit trail.
    #[arg(long)]
    reason: String,
    /// Buffer to debit (default: the direction's usual source).
    #[arg(long)]
    source_account: Option<crate::domain::BufferAccount>,
    /// Buffer to credit (default: the direction's usual destination).
    #[arg(long)]
    destination_account: Option<crate::domain::BufferAccount>,
    /// Take the source below its minimum anyway.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct ReplayArgs {
    /// From the first offset still on the broker.
    #[arg(long)]
    from_beginning: bool,
    /// From the first message at or after this time (RFC 3339).
    #[arg(long)]
    from_time: Option<DateTime<Utc>>,
    /// From this offset in every partition.
    #[arg(long)]
    from_offset: Option<i64>,
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Demo(args) = cli.command {
        return demo::run(args).await;
    }
    let config = Config::from_env()?;
    if let Command::Simulate(args) = cli.command {
        return crate::simulate::cli::run(args, config.planner);
    }
    match cli.command {
        Command::Run { roles } => runtime::run(config, &roles).await,
        Command::Demo(_) | Command::Simulate(_) => unreachable!("handled above"),
        Command::Migrate => {
            let store = connect(&config).await?;
            store.migrate().await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Status { json } => {
            let store = connect(&config).await?;
            let report = store.buffer_report().await?;
            let jobs = active_jobs(&store).await?;
            let levels = latest_levels(&store).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "buffers": report,
                        "levels": levels,
                        "active_jobs": jobs,
                    }))?
                );
            } else {
                print!("{}", crate::report::render_status(&report));
                print!("\n{}", crate::report::render_levels(&levels));
                print!("\n{}", render_jobs(&jobs));
            }
            Ok(())
        }
        Command::Trigger { wait } => trigger(&config, wait).await,
        Command::Replay(args) => replay(&config, args).await,
        Command::Reconcile { providers, json } => reconcile(&config, providers, json).await,
        Command::Convert(args) => convert(&config, args).await,
        Command::Config => {
            println!("{}", serde_json::to_string_pretty(&config.masked())?);
            Ok(())
        }
    }
}

/// Each buffer's trigger level and return point as the latest settlement set them.
async fn latest_levels(
    store: &PgStore,
) -> anyhow::Result<BTreeMap<String, crate::planner::BufferLevels>> {
    let levels: Option<serde_json::Value> = sqlx::query_scalar(
        "SELECT result->'levels' FROM settlement_windows
          WHERE status = 'closed' AND result ? 'levels'
          ORDER BY window_start DESC LIMIT 1",
    )
    .fetch_optional(store.pool())
    .await?
    .flatten();
    Ok(levels
        .map(serde_json::from_value)
        .transpose()
        .context("settlement_windows.result levels")?
        .unwrap_or_default())
}

async fn connect(config: &Config) -> anyhow::Result<PgStore> {
    PgStore::connect(config.require_database_url()?)
        .await
        .context("connecting to PostgreSQL (DATABASE_URL)")
}

/// A conversion job that is not final, from `v_active_conversion_jobs`.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct ActiveJob {
    pub id: uuid::Uuid,
    pub direction: String,
    pub trigger_reason: String,
    pub status: String,
    pub amount: rust_decimal::Decimal,
    pub provider_name: Option<String>,
    pub provider_tx_id: Option<String>,
    pub created_at: DateTime<Utc>,
    /// The job's last error: why it waits (held at a provider whose outcome
    /// is unknown, retried, or in `needs_review`).
    pub note: Option<String>,
}

async fn active_jobs(store: &PgStore) -> anyhow::Result<Vec<ActiveJob>> {
    Ok(sqlx::query_as(
        "SELECT v.id, v.direction, v.trigger_reason, v.status, v.amount, v.provider_name,
                v.provider_tx_id, v.created_at, j.error_message AS note
           FROM v_active_conversion_jobs v JOIN conversion_jobs j USING (id)
          ORDER BY v.created_at",
    )
    .fetch_all(store.pool())
    .await?)
}

/// The jobs-in-flight table printed by `treasury status`.
pub fn render_jobs(jobs: &[ActiveJob]) -> String {
    if jobs.is_empty() {
        return "no conversion jobs in flight\n".into();
    }
    let mut out = format!(
        "{:<36} {:<12} {:<20} {:>16} {:<12} {:<20} {}\n",
        "JOB", "DIRECTION", "STATUS", "AMOUNT", "PROVIDER", "CREATED", "NOTE"
    );
    for j in jobs {
        let note = j.note.as_deref().map_or_else(
            || "-".to_owned(),
            |n| {
                let mut short: String = n.chars().take(80).collect();
                if n.chars().count() > 80 {
                    short.push('…');
                }
                short
            },
        );
        out.push_str(&format!(
            "{:<36} {:<12} {:<20} {:>16} {:<12} {:<20} {}\n",
            j.id,
            j.direction,
            j.status,
            j.amount.normalize().to_string(),
            j.provider_name.as_deref().unwrap_or("-"),
            j.created_at.format("%Y-%m-%d %H:%M:%S"),
            note
        ));
    }
    out
}

async fn reconcile(config: &Config, providers: bool, json: bool) -> anyhow::Result<()> {
    let store = connect(config).await?;
    let tolerances = crate::reconcile::Tolerances {
        at_provider: chrono::Duration::from_std(config.stale_after)?,
        in_transit: chrono::Duration::minutes(5),
    };
    let mut findings = crate::reconcile::check(store.pool(), Utc::now(), tolerances).await?;
    let mut report = None;
    if providers {
        use crate::store::jobs::JobStore;
        let registry = crate::providers::registry::ProviderRegistry::from_process_env(None);
        let mut built = Vec::new();
        for row in store.providers().await? {
            if row.status != crate::providers::ProviderStatus::Active {
                continue;
            }
            match registry.build(&row) {
                Ok(p) => built.push(p),
                Err(e) => findings.push(crate::reconcile::Finding {
                    check: "provider_not_configured",
                    subject: row.name.clone(),
                    detail: e.to_string(),
                }),
            }
        }
        let providers: Vec<&dyn crate::providers::ConversionProvider> =
            built.iter().map(|p| p.as_ref()).collect();
        let checked = crate::reconcile::providers::check_providers(
            store.pool(),
            &store.buffer_report().await?,
            &providers,
            config.reconcile_tolerance,
        )
        .await?;
        findings.extend(checked.findings.iter().cloned());
        report = Some(checked);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "findings": findings,
                "provider_balances": report.as_ref().map(|r| &r.balances),
                "balance_comparisons": report.as_ref().map(|r| &r.comparisons),
                "executions_not_listed": report.as_ref().map(|r| &r.executions_not_listed),
            }))?
        );
    } else {
        for f in &findings {
            println!("{:<32} {}  {}", f.check, f.subject, f.detail);
        }
        if let Some(report) = &report {
            print!("{}", crate::reconcile::providers::render(report));
        }
        if findings.is_empty() {
            println!("books reconcile: no findings");
        }
    }
    if findings.is_empty() {
        Ok(())
    } else {
        bail!("{} reconciliation finding(s)", findings.len())
    }
}

async fn convert(config: &Config, args: ConvertArgs) -> anyhow::Result<()> {
    let store = connect(config).await?;
    let request = crate::manual::ManualRequest {
        direction: args.direction,
        amount: args.amount,
        source_account: args.source_account,
        destination_account: args.destination_account,
        idempotency_key: args.idempotency_key,
        reason: args.reason,
        force: args.force,
    };
    let codec = runtime::codec_for(config)?;
    // With a Schema Registry the command is written under the registry's id:
    // give the one output this writes its id first (an unavailable registry
    // is an error here, to run again, rather than a wait).
    codec
        .source()
        .register_outputs(&[(
            crate::codec::SchemaKind::ConversionCommand,
            config.topics.commands.as_str(),
        )])
        .await
        .context("registering the conversion command schema (SCHEMA_REGISTRY_*)")?;
    let to = crate::manual::Destination {
        codec: &codec,
        commands_topic: &config.topics.commands,
        requested_by: "cli",
    };
    let submitted = crate::manual::submit(&store, &to, &request, Utc::now()).await?;
    let c = &submitted.command;
    println!(
        "{} command {}: {} {} {}→{} (trigger manual)",
        if submitted.created {
            "queued"
        } else {
            "already queued:"
        },
        c.command_id,
        c.direction,
        c.amount,
        c.source_account,
        c.destination_account
    );
    Ok(())
}

async fn trigger(config: &Config, wait: bool) -> anyhow::Result<()> {
    let store = connect(config).await?;
    let id = store.request_trigger("cli").await?;
    println!("settlement trigger {id} requested");
    if !wait {
        return Ok(());
    }
    for _ in 0..120 {
        let handled: Option<serde_json::Value> = sqlx::query_scalar(
            "SELECT result FROM settlement_triggers WHERE id = $1 AND handled_at IS NOT NULL",
        )
        .bind(id)
        .fetch_optional(store.pool())
        .await?;
        if let Some(result) = handled {
            println!("{}", serde_json::to_string_pretty(&result)?);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("trigger {id} was not handled within 60s: is an aggregator running?")
}

async fn replay(config: &Config, args: ReplayArgs) -> anyhow::Result<()> {
    let store = connect(config).await?;
    let base = kafka::base_config(config);
    let consumer: BaseConsumer =
        kafka::consumer_config(&base, &config.aggregator_group).create()?;
    let timeout = Duration::from_secs(10);
    let mut offsets = BTreeMap::new();
    for topic in [&config.topics.funding, &config.topics.withdrawals] {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        let partitions = metadata
            .topics()
            .first()
            .map(|t| t.partitions().iter().map(|p| p.id()).collect::<Vec<_>>())
            .unwrap_or_default();
        for partition in partitions {
            let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
            let offset = if args.from_beginning {
                low
            } else if let Some(n) = args.from_offset {
                n.clamp(low, high)
            } else if let Some(at) = args.from_time {
                let mut query = TopicPartitionList::new();
                query.add_partition_offset(
                    topic,
                    partition,
                    Offset::Offset(at.timestamp_millis()),
                )?;
                let found = consumer.offsets_for_times(query, timeout)?;
                match found.find_partition(topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => high,
                }
            } else {
                unreachable!("clap requires one replay start")
            };
            offsets.insert(
                TopicPartition {
                    topic: topic.clone(),
                    partition,
                },
                offset,
            );
        }
    }
    store
        .set_offsets(&config.aggregator_group, &offsets)
        .await?;
    for (tp, offset) in &offsets {
        println!("{}[{}] → {}", tp.topic, tp.partition, offset);
    }
    println!("stored offsets rewound; restart the aggregators to replay");
    Ok(())
}
