//! Every metric `deploy/` relies on is exported by a fresh engine before any
//! event: a real `treasury run` (aggregator and executor) against the broker
//! and PostgreSQL, scraped once it answers, against every `treasury_*` name
//! in the alert rules and the dashboards.

mod common;

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sqlx::PgPool;

/// Every `treasury_*` name in the alert rules and the dashboards.
fn names_deploy_uses() -> BTreeSet<String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files = vec![format!("{root}/deploy/prometheus/alerts.yml")];
    for entry in std::fs::read_dir(format!("{root}/deploy/grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            files.push(path.display().to_string());
        }
    }
    let mut names = BTreeSet::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("treasury_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            names.insert(tail[..end].to_owned());
            rest = &tail[end..];
        }
    }
    names
}

/// The series names in a Prometheus text exposition.
fn exported_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Engine(Child);

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn scrape(url: &str) -> Option<String> {
    let response = reqwest::get(url).await.ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}

#[sqlx::test]
async fn a_fresh_engine_exports_every_series_deploy_uses(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("metrics");
    common::create_topics(&common::base(&brokers), &topics, 2).await;
    let port = free_port();
    let group = format!("metrics-{}", uuid::Uuid::new_v4().simple());
    let _engine = Engine(
        Command::new(env!("CARGO_BIN_EXE_treasury"))
            .args(["run", "--roles", "aggregator,executor"])
            .envs(common::child_env(
                &common::database_url(&pool),
                &brokers,
                &topics,
                &group,
            ))
            .env("TREASURY_HTTP_ADDR", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .spawn()
            .expect("start treasury run"),
    );
    let url = format!("http://127.0.0.1:{port}/metrics");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let exposition = loop {
        if let Some(text) = scrape(&url).await {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the engine serves /metrics within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let counted: i64 = sqlx::query_scalar("SELECT count(*) FROM processed_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(counted, 0, "scraped before any event");

    let wanted = names_deploy_uses();
    assert!(
        wanted.len() >= 23,
        "deploy/ references {} names: {wanted:?}",
        wanted.len()
    );
    let exported = exported_names(&exposition);
    let missing: Vec<&String> = wanted.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "deploy/ uses series the engine does not export at start-up: {missing:?}\n{exposition}"
    );

    // The label sets the rules and panels select on exist too.
    let mut expected: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("treasury_jobs", vec![("status", "needs_review".into())]),
        (
            "treasury_buffer_status",
            vec![
                ("account", "system_buffer_usdc".into()),
                ("status", "CRITICAL_LOW".into()),
            ],
        ),
        (
            "treasury_dlq_messages_total",
            vec![("error_kind", "decode".into())],
        ),
        (
            "treasury_buffer_status_changes_total",
            vec![
                ("account", "system_buffer_usdc".into()),
                ("from", "HEALTHY".into()),
                ("to", "CRITICAL_LOW".into()),
            ],
        ),
        (
            "treasury_commands_planned_total",
            vec![
                ("direction", "usdc_to_usd".into()),
                ("trigger", "manual".into()),
            ],
        ),
    ];
    for (lag_group, topic) in [
        (group.clone(), topics.funding.clone()),
        (group.clone(), topics.withdrawals.clone()),
        (format!("{group}-executor"), topics.commands.clone()),
    ] {
        expected.push((
            "treasury_consumer_lag_messages",
            vec![
                ("group", lag_group),
                ("topic", topic),
                ("partition", "0".into()),
            ],
        ));
    }
    // A consumer held while the database or the registry is down is visible
    // before the first outage.
    for consumer in ["ingest", "executor-intake"] {
        expected.push((
            "treasury_consumer_held",
            vec![("consumer", consumer.into())],
        ));
        for dependency in ["database", "schema_registry"] {
            expected.push((
                "treasury_consumer_held_total",
                vec![
                    ("consumer", consumer.into()),
                    ("dependency", dependency.into()),
                ],
            ));
        }
    }
    assert!(
        exported.contains("treasury_schema_registry_unavailable_total"),
        "the registry outage counter is exported from start-up:\n{exposition}"
    );
    for provider in ["Due", "ZeroHash"] {
        expected.push((
            "treasury_provider_requests_total",
            vec![
                ("provider", provider.into()),
                ("call", "initiate".into()),
                ("outcome", "success".into()),
            ],
        ));
        expected.push((
            "treasury_job_duration_seconds_bucket",
            vec![
                ("provider", provider.into()),
                ("direction", "usd_to_usdc".into()),
            ],
        ));
    }
    for (name, labels) in &expected {
        assert!(
            has_series(&exposition, name, labels),
            "{name} {labels:?} not exported:\n{exposition}"
        );
    }
}

/// Whether a sample of `name` carries every one of `labels`.
fn has_series(exposition: &str, name: &str, labels: &[(&str, String)]) -> bool {
    exposition.lines().any(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('{'))
            .is_some_and(|rest| {
                labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
            })
    })
}
