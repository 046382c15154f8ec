//! Configuration, read once from the environment at start-up. A bad value
//! stops start-up with an error that names the variable and what it accepts.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use crate::planner::PlannerSettings;

/// A setting that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe(self))]
pub struct ConfigError {
    pub variable: String,
    pub value: String,
    pub expected: &'static str,
}

fn describe(e: &ConfigError) -> String {
    if e.value.is_empty() {
        format!("{} is not set: expected {}", e.variable, e.expected)
    } else {
        format!(
            "{}={:?} is invalid: expected {}",
            e.variable, e.value, e.expected
        )
    }
}

/// Topic names the engine reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Topics {
    pub funding: String,
    pub withdrawals: String,
    pub commands: String,
    pub postings: String,
    pub dlq: String,
    /// Buffer status crossings (`TREASURY_TOPIC_BUFFER_ALERTS`).
    pub buffer_alerts: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            funding: "funding.events".into(),
            withdrawals: "withdrawal.events".into(),
            commands: "treasury.conversion-commands".into(),
            postings: "ledger.postings".into(),
            dlq: "treasury.dlq".into(),
            buffer_alerts: "treasury.buffer-alerts".into(),
        }
    }
}

/// The engine's effective configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Config {
    /// Settlement window length (`TREASURY_SCHEDULER_INTERVAL`).
    #[serde(with = "humantime_serde_compat")]
    pub scheduler_interval: Duration,
    /// How often in-flight jobs are polled (`TREASURY_MONITOR_INTERVAL`).
    #[serde(with = "humantime_serde_compat")]
    pub monitor_interval: Duration,
    /// After this a job at a provider needs a person (`TREASURY_CONVERSION_TIMEOUT`).
    #[serde(with = "humantime_serde_compat")]
    pub conversion_timeout: Duration,
    /// After this a job at a provider is flagged stale (`TREASURY_STALE_AFTER`).
    #[serde(with = "humantime_serde_compat")]
    pub stale_after: Duration,
    /// Provider health is judged on the job attempts that ended within this
    /// window (`TREASURY_PROVIDER_HEALTH_WINDOW`).
    #[serde(with = "humantime_serde_compat")]
    pub provider_health_window: Duration,
    /// Retries of a retryable provider error before falling back (`TREASURY_MAX_RETRIES`).
    pub max_retries: u32,
    /// Whether planned conversions are emitted (`TREASURY_ENABLE_AUTO_REBALANCE`).
    pub enable_auto_rebalance: bool,
    /// How long after a window's end its late events are still in time (`TREASURY_WINDOW_GRACE`).
    #[serde(with = "humantime_serde_compat")]
    pub window_grace: Duration,
    /// A caught-up partition quiet this long stops holding settlement back (`TREASURY_IDLE_TIMEOUT`).
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// How long processed event ids are kept for duplicate detection (`TREASURY_DEDUP_RETENTION`).
    #[serde(with = "humantime_serde_compat")]
    pub dedup_retention: Duration,
    /// Most messages committed in one transaction (`TREASURY_BATCH_SIZE`).
    pub batch_size: usize,
    /// Longest wait to fill a batch (`TREASURY_BATCH_MAX_WAIT`).
    #[serde(with = "humantime_serde_compat")]
    pub batch_max_wait: Duration,
    /// Ingest consumers this process runs in the aggregator's group, each
    /// with its own partitions and its own batch in flight
    /// (`TREASURY_INGEST_WORKERS`).
    pub ingest_workers: usize,
    /// PostgreSQL URL (`DATABASE_URL`); shown masked.
    pub database_url: Option<String>,
    /// Bootstrap servers (`KAFKA_BROKERS`).
    pub kafka_brokers: String,
    /// Extra librdkafka settings from `KAFKA_*` (e.g. `KAFKA_SASL_USERNAME` → `sasl.username`).
    pub kafka_settings: BTreeMap<String, String>,
    pub topics: Topics,
    /// Consumer group of the aggregator role (`TREASURY_AGGREGATOR_GROUP`).
    pub aggregator_group: String,
    /// Consumer group of the executor role (`TREASURY_EXECUTOR_GROUP`).
    pub executor_group: String,
    /// Optional Confluent Schema Registry (`SCHEMA_REGISTRY_URL` and the
    /// other `SCHEMA_REGISTRY_*` settings); with one, it is the authority on ids.
    pub schema_registry: Option<crate::codec::RegistrySettings>,
    /// Address of the HTTP server for health, metrics and operator endpoints (`TREASURY_HTTP_ADDR`).
    pub http_addr: String,
    /// Bearer token for operator endpoints (`TREASURY_ADMIN_TOKEN`); shown masked.
    pub admin_token: Option<String>,
    /// The planner's rule (`TREASURY_PLANNER_*`).
    pub planner: PlannerSettings,
    /// Largest difference between a buffer held at the providers and what
    /// they report that reconciliation accepts (`TREASURY_RECONCILE_TOLERANCE`,
    /// in the buffer's currency).
    pub reconcile_tolerance: rust_decimal::Decimal,
}

/// Serializes durations as humantime text ("5m").
mod humantime_serde_compat {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

const DURATION: &str = "a duration such as 30s, 5m or 1h";
const DURATION_OR_OFF: &str = "a duration such as 30s, 5m or 1h, or 0s for off";

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads the configuration from `vars` (the environment, or a test's map).
    pub fn from_vars<I, K, V>(vars: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        let env = Vars(&vars);
        let defaults = Topics::default();
        let config = Config {
            scheduler_interval: env.duration("TREASURY_SCHEDULER_INTERVAL", "5m")?,
            monitor_interval: env.duration("TREASURY_MONITOR_INTERVAL", "1m")?,
            conversion_timeout: env.duration("TREASURY_CONVERSION_TIMEOUT", "30m")?,
            stale_after: env.duration("TREASURY_STALE_AFTER", "30m")?,
            provider_health_window: env.duration("TREASURY_PROVIDER_HEALTH_WINDOW", "1h")?,
            max_retries: env.parsed(
                "TREASURY_MAX_RETRIES",
                "3",
                "a whole number 0..=20",
                |n: &u32| *n <= 20,
            )?,
            enable_auto_rebalance: env.boolean("TREASURY_ENABLE_AUTO_REBALANCE", true)?,
            window_grace: env.duration("TREASURY_WINDOW_GRACE", "30s")?,
            idle_timeout: env.duration("TREASURY_IDLE_TIMEOUT", "30s")?,
            dedup_retention: env.duration("TREASURY_DEDUP_RETENTION", "7d")?,
            batch_size: env.parsed(
                "TREASURY_BATCH_SIZE",
                "1000",
                "a whole number 1..=100000",
                |n: &usize| (1..=100_000).contains(n),
            )?,
            batch_max_wait: env.duration("TREASURY_BATCH_MAX_WAIT", "100ms")?,
            ingest_workers: env.parsed(
                "TREASURY_INGEST_WORKERS",
                "1",
                "a whole number 1..=8",
                |n: &usize| (1..=crate::ingest::MAX_WORKERS).contains(n),
            )?,
            database_url: env.text("DATABASE_URL"),
            kafka_brokers: env
                .text("KAFKA_BROKERS")
                .unwrap_or_else(|| "127.0.0.1:9092".into()),
            kafka_settings: env.kafka_passthrough(),
            topics: Topics {
                funding: env.topic("TREASURY_TOPIC_FUNDING", &defaults.funding)?,
                withdrawals: env.topic("TREASURY_TOPIC_WITHDRAWALS", &defaults.withdrawals)?,
                commands: env.topic("TREASURY_TOPIC_COMMANDS", &defaults.commands)?,
                postings: env.topic("TREASURY_TOPIC_POSTINGS", &defaults.postings)?,
                dlq: env.topic("TREASURY_TOPIC_DLQ", &defaults.dlq)?,
                buffer_alerts: env
                    .topic("TREASURY_TOPIC_BUFFER_ALERTS", &defaults.buffer_alerts)?,
            },
            aggregator_group: env
                .text("TREASURY_AGGREGATOR_GROUP")
                .unwrap_or_else(|| "treasury-aggregator".into()),
            executor_group: env
                .text("TREASURY_EXECUTOR_GROUP")
                .unwrap_or_else(|| "treasury-executor".into()),
            schema_registry: env.schema_registry()?,
            http_addr: env.socket_addr("TREASURY_HTTP_ADDR", "0.0.0.0:8080")?,
            admin_token: env.text("TREASURY_ADMIN_TOKEN"),
            planner: PlannerSettings {
                safety_factor: env.parsed(
                    "TREASURY_PLANNER_SAFETY_FACTOR",
                    "2",
                    "a decimal number 0..=10",
                    |z: &rust_decimal::Decimal| {
                        (rust_decimal::Decimal::ZERO..=rust_decimal::Decimal::TEN).contains(z)
                    },
                )?,
                lookback_windows: env.parsed(
                    "TREASURY_PLANNER_LOOKBACK_WINDOWS",
                    "288",
                    "a whole number 1..=10000",
                    |n: &u32| (1..=10_000).contains(n),
                )?,
                default_lead_time: chrono::Duration::from_std(
                    env.duration("TREASURY_PLANNER_DEFAULT_LEAD_TIME", "30m")?,
                )
                .unwrap_or(chrono::Duration::minutes(30)),
                watch_interval: chrono::Duration::from_std(
                    env.duration_or_off("TREASURY_PLANNER_WATCH_INTERVAL", "1m")?,
                )
                .unwrap_or(chrono::Duration::minutes(1)),
                urgent_pieces: env.parsed(
                    "TREASURY_PLANNER_URGENT_PIECES",
                    "3",
                    "a whole number 1..=20",
                    |n: &u32| (1..=20).contains(n),
                )?,
                burst_factor: env.parsed(
                    "TREASURY_PLANNER_BURST_FACTOR",
                    "5",
                    "a decimal number 0..=20",
                    |z: &rust_decimal::Decimal| {
                        (rust_decimal::Decimal::ZERO..=rust_decimal::Decimal::from(20)).contains(z)
                    },
                )?,
                burst_top_up: env.boolean("TREASURY_PLANNER_BURST_TOP_UP", false)?,
                forecast_horizon: chrono::Duration::from_std(
                    env.horizon("TREASURY_PLANNER_FORECAST_HORIZON", "0s")?,
                )
                .unwrap_or_default(),
                relay_reserve: env.parsed(
                    "TREASURY_PLANNER_RELAY_RESERVE",
                    "0",
                    "a decimal number 0..=4",
                    |k: &rust_decimal::Decimal| {
                        (rust_decimal::Decimal::ZERO..=rust_decimal::Decimal::from(4)).contains(k)
                    },
                )?,
            },
            reconcile_tolerance: env.parsed(
                "TREASURY_RECONCILE_TOLERANCE",
                "1.00",
                "a decimal amount of at least 0, such as 1.00",
                |d: &rust_decimal::Decimal| !d.is_sign_negative(),
            )?,
        };
        if config.idle_timeout < Duration::from_secs(2) {
            return Err(ConfigError {
                variable: "TREASURY_IDLE_TIMEOUT".into(),
                value: humantime::format_duration(config.idle_timeout).to_string(),
                expected: "at least 2s (consumers renew their caught-up reports every second)",
            });
        }
        if config.scheduler_interval < Duration::from_secs(1) {
            return Err(ConfigError {
                variable: "TREASURY_SCHEDULER_INTERVAL".into(),
                value: humantime::format_duration(config.scheduler_interval).to_string(),
                expected: "a window of at least 1s",
            });
        }
        Ok(config)
    }

    /// The database URL, or an error naming `DATABASE_URL` when it is unset.
    pub fn require_database_url(&self) -> Result<&str, ConfigError> {
        self.database_url.as_deref().ok_or_else(|| ConfigError {
            variable: "DATABASE_URL".into(),
            value: String::new(),
            expected: "a PostgreSQL URL such as postgres://user@host:5432/treasury",
        })
    }

    /// The configuration with secrets replaced by `****`, for printing.
    pub fn masked(&self) -> Config {
        let mut shown = self.clone();
        shown.database_url = shown.database_url.as_deref().map(mask_url_password);
        shown.admin_token = shown.admin_token.as_ref().map(|_| "****".into());
        if let Some(registry) = shown.schema_registry.as_mut() {
            registry.basic_auth_user_info =
                registry
                    .basic_auth_user_info
                    .as_deref()
                    .map(|info| match info.split_once(':') {
                        Some((user, _)) => format!("{user}:****"),
                        None => "****".into(),
                    });
        }
        for (key, value) in shown.kafka_settings.iter_mut() {
            if key.contains("password") || key.contains("secret") || key.contains("key") {
                *value = "****".into();
            }
        }
        shown
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:****@host/db`, and a
/// `password=` query parameter likewise.
fn mask_url_password(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let base = mask_userinfo_password(base);
    match query {
        None => base,
        Some(q) => {
            let params: Vec<String> = q
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=****"),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
    }
}

fn mask_userinfo_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:****@{host}"),
        None => url.to_owned(),
    }
}

struct Vars<'a>(&'a BTreeMap<String, String>);

impl Vars<'_> {
    fn text(&self, name: &str) -> Option<String> {
        self.0
            .get(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn error(name: &str, value: &str, expected: &'static str) -> ConfigError {
        ConfigError {
            variable: name.into(),
            value: value.into(),
            expected,
        }
    }

    fn duration(&self, name: &str, default: &str) -> Result<Duration, ConfigError> {
        let value = self.text(name).unwrap_or_else(|| default.into());
        match humantime::parse_duration(&value) {
            Ok(d) if !d.is_zero() => Ok(d),
            _ => Err(Self::error(name, &value, DURATION)),
        }
    }

    /// A duration where zero (`0s`) means "off".
    fn duration_or_off(&self, name: &str, default: &str) -> Result<Duration, ConfigError> {
        let value = self.text(name).unwrap_or_else(|| default.into());
        humantime::parse_duration(&value).map_err(|_| Self::error(name, &value, DURATION_OR_OFF))
    }

    /// A duration of at most a day, zero (`0s`) meaning "off".
    fn horizon(&self, name: &str, default: &str) -> Result<Duration, ConfigError> {
        let value = self.text(name).unwrap_or_else(|| default.into());
        match humantime::parse_duration(&value) {
            Ok(d) if d <= Duration::from_secs(86_400) => Ok(d),
            _ => Err(Self::error(
                name,
                &value,
                "a duration of at most 24h such as 8h, or 0s for off",
            )),
        }
    }

    fn parsed<T: std::str::FromStr>(
        &self,
        name: &str,
        default: &str,
        expected: &'static str,
        valid: impl Fn(&T) -> bool,
    ) -> Result<T, ConfigError> {
        let value = self.text(name).unwrap_or_else(|| default.into());
        value
            .parse::<T>()
            .ok()
            .filter(|v| valid(v))
            .ok_or_else(|| Self::error(name, &value, expected))
    }

    fn boolean(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        match self.text(name) {
            None => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(Self::error(name, &v, "true or false")),
            },
        }
    }

    fn topic(&self, name: &str, default: &str) -> Result<String, ConfigError> {
        let value = self.text(name).unwrap_or_else(|| default.into());
        let legal = value.len() <= 249
            && value != "."
            && value != ".."
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if legal {
            Ok(value)
        } else {
            Err(Self::error(
                name,
                &value,
                "a Kafka topic name: letters, digits, '.', '_' or '-', at most 249",
            ))
        }
    }

    fn url(&self, name: &str) -> Result<Option<String>, ConfigError> {
        match self.text(name) {
            None => Ok(None),
            Some(v)
                if ["http://", "https://"].iter().any(|scheme| {
                    v.strip_prefix(scheme)
                        .is_some_and(|host| !host.is_empty() && !host.starts_with('/'))
                }) =>
            {
                Ok(Some(v))
            }
            Some(v) => Err(Self::error(name, &v, "an http:// or https:// URL")),
        }
    }

    /// The `SCHEMA_REGISTRY_*` settings, named like Confluent clients' ones.
    fn schema_registry(&self) -> Result<Option<crate::codec::RegistrySettings>, ConfigError> {
        let Some(url) = self.url("SCHEMA_REGISTRY_URL")? else {
            return Ok(None);
        };
        let path = |name: &str| self.text(name).map(std::path::PathBuf::from);
        Ok(Some(crate::codec::RegistrySettings {
            basic_auth_user_info: self.text("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO"),
            ssl_ca_location: path("SCHEMA_REGISTRY_SSL_CA_LOCATION"),
            ssl_certificate_location: path("SCHEMA_REGISTRY_SSL_CERTIFICATE_LOCATION"),
            ssl_key_location: path("SCHEMA_REGISTRY_SSL_KEY_LOCATION"),
            auto_register: self.boolean("SCHEMA_REGISTRY_AUTO_REGISTER", true)?,
            subject_name_strategy: self.parsed(
                "SCHEMA_REGISTRY_SUBJECT_NAME_STRATEGY",
                "TopicNameStrategy",
                "TopicNameStrategy, RecordNameStrategy or TopicRecordNameStrategy",
                |_| true,
            )?,
            ..crate::codec::RegistrySettings::new(&url)
        }))
    }

    fn socket_addr(&self, name: &str, default: &str) -> Result<String, ConfigError> {
        let value = self.text(name).unwrap_or_else(|| default.into());
        value
            .parse::<std::net::SocketAddr>()
            .map(|_| value.clone())
            .map_err(|_| Self::error(name, &value, "an address such as 0.0.0.0:8080"))
    }

    /// `KAFKA_SASL_MECHANISM=PLAIN` → `sasl.mechanism=PLAIN`; `KAFKA_BROKERS` is not passed through.
    fn kafka_passthrough(&self) -> BTreeMap<String, String> {
        self.0
            .iter()
            .filter_map(|(k, v)| {
                let rest = k.strip_prefix("KAFKA_")?;
                (rest != "BROKERS" && !rest.is_empty())
                    .then(|| (rest.to_ascii_lowercase().replace('_', "."), v.clone()))
            })
            .collect()
    }
}
