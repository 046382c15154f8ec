//! What the bench binaries share: reading their `BENCH_*` settings, the
//! scratch databases and topics they remove at the end (also after a failure
//! or Ctrl-C), and the machine they report running on.

use std::collections::BTreeMap;
use std::future::Future;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// A number from the environment (`default` when unset or blank).
pub fn env_number<T: FromStr>(name: &str, default: T) -> anyhow::Result<T>
where
    T::Err: std::fmt::Display,
{
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .map_err(|e| anyhow::anyhow!("{name}={v:?} is not a valid number: {e}")),
        _ => Ok(default),
    }
}

/// A variable that is set and not blank.
pub fn non_empty_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Scratch databases and topics to remove at the end, whatever happens.
#[derive(Default)]
pub struct Created {
    pub databases: Vec<String>,
    pub topics: Vec<String>,
}

/// [`Created`], shared with the task that creates them.
pub type SharedCreated = Arc<Mutex<Created>>;

/// The guarded value, also after a panic elsewhere.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A one-connection pool on the server's `postgres` database (where the
/// scratch databases are created and dropped), and the server's version.
pub async fn connect_admin(admin: &PgConnectOptions) -> anyhow::Result<(PgPool, String)> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(admin.clone())
        .await
        .context("connecting to the server's `postgres` database (DATABASE_URL)")?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&pool)
        .await?;
    Ok((pool, version))
}

/// Runs a bench: with `DATABASE_URL` and `KAFKA_BROKERS` set, reads its
/// settings with `settings`, runs `run` (interrupted by Ctrl-C) and then
/// removes what it created; without them prints `how_to_start` and exits 0.
pub async fn bench_main<S, F, Fut>(
    name: &str,
    how_to_start: fn(),
    settings: fn(String, String) -> anyhow::Result<S>,
    run: F,
) -> ExitCode
where
    S: Clone + Send + 'static,
    F: FnOnce(S, PgConnectOptions, SharedCreated) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let (Some(database_url), Some(brokers)) = (
        non_empty_env("DATABASE_URL"),
        non_empty_env("KAFKA_BROKERS"),
    ) else {
        how_to_start();
        return ExitCode::SUCCESS;
    };
    let admin = match PgConnectOptions::from_str(&database_url) {
        Ok(o) => o.database("postgres"),
        Err(e) => {
            eprintln!("{name}: DATABASE_URL is not a PostgreSQL URL: {e}");
            return ExitCode::FAILURE;
        }
    };
    let settings = match settings(database_url, brokers.clone()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            return ExitCode::FAILURE;
        }
    };

    let created: SharedCreated = Arc::default();
    let mut task = tokio::spawn(run(settings, admin.clone(), created.clone()));
    let outcome = tokio::select! {
        joined = &mut task => match joined {
            Ok(result) => result,
            Err(e) => Err(anyhow::anyhow!("the bench panicked: {e}")),
        },
        _ = tokio::signal::ctrl_c() => {
            task.abort();
            let _ = task.await;
            Err(anyhow::anyhow!("interrupted"))
        }
    };
    let cleaned = clean_up(&brokers, admin, &created).await;

    match (outcome, cleaned) {
        (Ok(()), Ok(())) => ExitCode::SUCCESS,
        (outcome, cleaned) => {
            if let Err(e) = outcome {
                eprintln!("{name}: FAILED: {e:#}");
                eprintln!(
                    "(is PostgreSQL reachable at DATABASE_URL and the nisshi broker at KAFKA_BROKERS? \
                     `bash .ci/run` starts both)"
                );
            }
            if let Err(e) = cleaned {
                eprintln!("{name}: cleanup incomplete: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Drops the scratch databases (through `admin`) and deletes the topics.
async fn clean_up(
    brokers: &str,
    admin: PgConnectOptions,
    created: &SharedCreated,
) -> anyhow::Result<()> {
    let (databases, topics) = {
        let mut c = lock(created);
        (
            std::mem::take(&mut c.databases),
            std::mem::take(&mut c.topics),
        )
    };
    let mut failed = Vec::new();
    if !databases.is_empty() {
        match PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(admin)
            .await
        {
            Ok(pool) => {
                for name in &databases {
                    let dropped =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&pool)
                            .await;
                    match dropped {
                        Ok(_) => println!("cleanup:   dropped database {name}"),
                        Err(e) => failed.push(format!("DROP DATABASE {name}: {e}")),
                    }
                }
                pool.close().await;
            }
            Err(e) => failed.push(format!(
                "cannot connect to drop {}: {e}",
                databases.join(", ")
            )),
        }
    }
    if !topics.is_empty() {
        let base = treasury::kafka::client_config(brokers, &BTreeMap::new());
        let deleted = async {
            let admin: AdminClient<DefaultClientContext> = base.create()?;
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
            admin.delete_topics(&names, &options).await
        };
        match tokio::time::timeout(Duration::from_secs(15), deleted).await {
            Ok(Ok(results)) => {
                let refused: Vec<String> = results
                    .into_iter()
                    .filter_map(|r| r.err().map(|(t, code)| format!("{t} ({code:?})")))
                    .collect();
                if refused.is_empty() {
                    println!("cleanup:   deleted topics {}", topics.join(", "));
                } else {
                    eprintln!("note: the broker kept topics {}", refused.join(", "));
                }
            }
            Ok(Err(e)) => eprintln!("note: topics not deleted: {e}"),
            Err(_) => eprintln!("note: topics not deleted: the broker did not answer in 15 s"),
        }
    }
    if !failed.is_empty() {
        bail!("{}", failed.join("; "));
    }
    Ok(())
}

/// Cores available to this process.
pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The CPU's model name, from `/proc/cpuinfo`.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The machine's memory, from `/proc/meminfo`.
pub fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or_else(
            || "unknown".into(),
            |kb| format!("{:.1} GiB", kb as f64 / (1024.0 * 1024.0)),
        )
}

/// The server part of a database URL, without credentials.
pub fn redacted_server(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[after_scheme..];
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host.split(['/', '?']).next().unwrap_or(host);
    format!("{}{host}", &url[..after_scheme])
}
