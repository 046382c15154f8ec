//! Configuration from the environment: documented defaults, an error naming
//! the variable for every malformed value, `KAFKA_*` passthrough and masking.

use std::time::Duration;

use treasury::config::{Config, ConfigError};

fn load(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_vars(vars.iter().map(|&(k, v)| (k, v)))
}

fn minutes(n: u64) -> Duration {
    Duration::from_secs(60 * n)
}

#[test]
fn defaults_are_the_documented_ones() {
    let config = load(&[]).unwrap();
    assert_eq!(config.scheduler_interval, minutes(5));
    assert_eq!(config.monitor_interval, minutes(1));
    assert_eq!(config.conversion_timeout, minutes(30));
    assert_eq!(config.max_retries, 3);
    assert_eq!(config.provider_health_window, minutes(60));
    let shown = serde_json::to_value(config.masked()).unwrap();
    assert_eq!(
        shown["provider_health_window"], "1h",
        "`treasury config` shows it"
    );
    assert!(config.enable_auto_rebalance);
    assert_eq!(config.topics.funding, "funding.events");
    assert_eq!(config.topics.withdrawals, "withdrawal.events");
    assert_eq!(config.topics.commands, "treasury.conversion-commands");
    assert_eq!(config.topics.postings, "ledger.postings");
    assert_eq!(config.topics.dlq, "treasury.dlq");
    assert_eq!(config.database_url, None);
    assert_eq!(config.schema_registry, None);
    assert!(config.kafka_settings.is_empty());
    assert!(config.batch_size >= 1);
}

#[test]
fn documented_values_written_out_give_the_defaults() {
    let explicit = load(&[
        ("TREASURY_SCHEDULER_INTERVAL", "5m"),
        ("TREASURY_MONITOR_INTERVAL", "1m"),
        ("TREASURY_CONVERSION_TIMEOUT", "30m"),
        ("TREASURY_MAX_RETRIES", "3"),
        ("TREASURY_ENABLE_AUTO_REBALANCE", "true"),
        ("TREASURY_TOPIC_FUNDING", "funding.events"),
        ("TREASURY_TOPIC_WITHDRAWALS", "withdrawal.events"),
        ("TREASURY_TOPIC_COMMANDS", "treasury.conversion-commands"),
        ("TREASURY_TOPIC_POSTINGS", "ledger.postings"),
        ("TREASURY_TOPIC_DLQ", "treasury.dlq"),
    ])
    .unwrap();
    assert_eq!(explicit, load(&[]).unwrap());
}

#[test]
fn valid_overrides_are_taken() {
    let config = load(&[
        ("TREASURY_SCHEDULER_INTERVAL", "90s"),
        ("TREASURY_MONITOR_INTERVAL", "15s"),
        ("TREASURY_CONVERSION_TIMEOUT", "1h"),
        ("TREASURY_MAX_RETRIES", "0"),
        ("TREASURY_ENABLE_AUTO_REBALANCE", "false"),
        ("TREASURY_TOPIC_DLQ", "ops_treasury-dlq.v2"),
        ("TREASURY_BATCH_SIZE", "1"),
        ("SCHEMA_REGISTRY_URL", "https://registry.internal:8081"),
        ("TREASURY_HTTP_ADDR", "127.0.0.1:9000"),
    ])
    .unwrap();
    assert_eq!(config.scheduler_interval, Duration::from_secs(90));
    assert_eq!(config.monitor_interval, Duration::from_secs(15));
    assert_eq!(config.conversion_timeout, minutes(60));
    assert_eq!(config.max_retries, 0);
    assert!(!config.enable_auto_rebalance);
    assert_eq!(config.topics.dlq, "ops_treasury-dlq.v2");
    assert_eq!(config.batch_size, 1);
    assert_eq!(
        config.schema_registry.map(|r| r.url).as_deref(),
        Some("https://registry.internal:8081")
    );
    assert_eq!(config.http_addr, "127.0.0.1:9000");
    assert_eq!(
        load(&[("TREASURY_MAX_RETRIES", "20")]).unwrap().max_retries,
        20
    );
}

/// Every malformed value the configuration must refuse, by variable.
const MALFORMED: &[(&str, &str)] = &[
    ("TREASURY_SCHEDULER_INTERVAL", "5"),
    ("TREASURY_SCHEDULER_INTERVAL", "five minutes"),
    ("TREASURY_SCHEDULER_INTERVAL", "-5m"),
    ("TREASURY_SCHEDULER_INTERVAL", "0s"),
    ("TREASURY_SCHEDULER_INTERVAL", "5 parsecs"),
    ("TREASURY_SCHEDULER_INTERVAL", "5m30"),
    ("TREASURY_SCHEDULER_INTERVAL", "500ms"),
    ("TREASURY_MONITOR_INTERVAL", "1"),
    ("TREASURY_MONITOR_INTERVAL", "soon"),
    ("TREASURY_MONITOR_INTERVAL", "0m"),
    ("TREASURY_MONITOR_INTERVAL", "1.5.m"),
    ("TREASURY_CONVERSION_TIMEOUT", "30"),
    ("TREASURY_CONVERSION_TIMEOUT", "thirty minutes"),
    ("TREASURY_CONVERSION_TIMEOUT", "-30m"),
    ("TREASURY_CONVERSION_TIMEOUT", "0h"),
    ("TREASURY_MAX_RETRIES", "abc"),
    ("TREASURY_MAX_RETRIES", "-1"),
    ("TREASURY_MAX_RETRIES", "999"),
    ("TREASURY_MAX_RETRIES", "21"),
    ("TREASURY_MAX_RETRIES", "3.0"),
    ("TREASURY_ENABLE_AUTO_REBALANCE", "maybe"),
    ("TREASURY_ENABLE_AUTO_REBALANCE", "tru"),
    ("TREASURY_ENABLE_AUTO_REBALANCE", "2"),
    ("TREASURY_TOPIC_FUNDING", "funding events"),
    ("TREASURY_TOPIC_FUNDING", "funding/events"),
    ("TREASURY_TOPIC_WITHDRAWALS", "withdrawal:events"),
    ("TREASURY_TOPIC_COMMANDS", "commandes-ü"),
    ("TREASURY_TOPIC_POSTINGS", "ledger*"),
    ("TREASURY_TOPIC_DLQ", "dlq#1"),
    ("SCHEMA_REGISTRY_URL", "ftp://x"),
    ("SCHEMA_REGISTRY_URL", "registry:8081"),
    ("TREASURY_HTTP_ADDR", "nope"),
    ("TREASURY_HTTP_ADDR", "0.0.0.0"),
    ("TREASURY_HTTP_ADDR", "0.0.0.0:99999"),
    ("TREASURY_BATCH_SIZE", "0"),
    ("TREASURY_BATCH_SIZE", "-5"),
    ("TREASURY_BATCH_SIZE", "many"),
    ("TREASURY_STALE_AFTER", "later"),
    ("TREASURY_PROVIDER_HEALTH_WINDOW", "a while"),
    ("TREASURY_PROVIDER_HEALTH_WINDOW", "0s"),
    ("TREASURY_WINDOW_GRACE", "30"),
    ("TREASURY_IDLE_TIMEOUT", "idle"),
    ("TREASURY_DEDUP_RETENTION", "forever"),
    ("TREASURY_BATCH_MAX_WAIT", "100"),
    ("TREASURY_INGEST_WORKERS", "0"),
    ("TREASURY_INGEST_WORKERS", "9"),
    ("TREASURY_INGEST_WORKERS", "two"),
];

/// Valid settings for every variable, so the error can only come from the bad one.
const OTHERWISE_VALID: &[(&str, &str)] = &[
    ("TREASURY_SCHEDULER_INTERVAL", "5m"),
    ("TREASURY_MONITOR_INTERVAL", "1m"),
    ("TREASURY_CONVERSION_TIMEOUT", "30m"),
    ("TREASURY_STALE_AFTER", "30m"),
    ("TREASURY_PROVIDER_HEALTH_WINDOW", "1h"),
    ("TREASURY_MAX_RETRIES", "3"),
    ("TREASURY_ENABLE_AUTO_REBALANCE", "true"),
    ("TREASURY_WINDOW_GRACE", "30s"),
    ("TREASURY_IDLE_TIMEOUT", "30s"),
    ("TREASURY_DEDUP_RETENTION", "7d"),
    ("TREASURY_BATCH_SIZE", "500"),
    ("TREASURY_BATCH_MAX_WAIT", "100ms"),
    ("TREASURY_INGEST_WORKERS", "2"),
    ("TREASURY_TOPIC_FUNDING", "funding.events"),
    ("TREASURY_TOPIC_WITHDRAWALS", "withdrawal.events"),
    ("TREASURY_TOPIC_COMMANDS", "treasury.conversion-commands"),
    ("TREASURY_TOPIC_POSTINGS", "ledger.postings"),
    ("TREASURY_TOPIC_DLQ", "treasury.dlq"),
    ("SCHEMA_REGISTRY_URL", "http://127.0.0.1:8081"),
    ("TREASURY_HTTP_ADDR", "0.0.0.0:8080"),
    (
        "DATABASE_URL",
        "postgres://treasury@127.0.0.1:5432/treasury",
    ),
    ("KAFKA_BROKERS", "127.0.0.1:9092"),
];

#[test]
fn otherwise_valid_settings_load() {
    load(OTHERWISE_VALID).unwrap();
}

/// Values that look plausible but cannot work: Kafka refuses the topic names
/// "." and ".." (`InvalidTopicException`), and a URL needs a host.
const SUBTLY_MALFORMED: &[(&str, &str)] = &[
    ("TREASURY_TOPIC_DLQ", "."),
    ("TREASURY_TOPIC_FUNDING", ".."),
    ("SCHEMA_REGISTRY_URL", "http://"),
    ("SCHEMA_REGISTRY_URL", "https://"),
];

#[test]
fn each_malformed_variable_gives_an_error_that_names_it() {
    check_refused(MALFORMED);
}

#[test]
fn reserved_topic_names_and_hostless_urls_are_refused_at_start() {
    check_refused(SUBTLY_MALFORMED);
}

fn check_refused(cases: &[(&str, &str)]) {
    let mut failures = Vec::new();
    for &(variable, value) in cases {
        // Alone, and among otherwise valid settings.
        let alone = load(&[(variable, value)]);
        let mut vars: Vec<(&str, &str)> = OTHERWISE_VALID
            .iter()
            .copied()
            .filter(|(k, _)| *k != variable)
            .collect();
        vars.push((variable, value));
        let among_valid = load(&vars);
        for (how, result) in [("alone", alone), ("among valid settings", among_valid)] {
            match result {
                Ok(_) => failures.push(format!("{variable}={value:?} was accepted ({how})")),
                Err(e) => {
                    let text = e.to_string();
                    if e.variable != variable || !text.contains(variable) {
                        failures.push(format!(
                            "{variable}={value:?}: error names {:?}: {text}",
                            e.variable
                        ));
                    }
                    if e.value != value.trim() || e.expected.is_empty() {
                        failures.push(format!(
                            "{variable}={value:?}: error carries value {:?}, expected {:?}",
                            e.value, e.expected
                        ));
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "malformed settings not reported properly:\n{}",
        failures.join("\n")
    );
}

#[test]
fn error_message_says_what_is_accepted() {
    let e = load(&[("TREASURY_MAX_RETRIES", "abc")]).unwrap_err();
    assert_eq!(e.variable, "TREASURY_MAX_RETRIES");
    assert_eq!(e.value, "abc");
    let text = e.to_string();
    assert!(
        text.contains("TREASURY_MAX_RETRIES") && text.contains("abc"),
        "{text}"
    );
    assert!(text.contains(e.expected), "{text}");

    let e = load(&[("TREASURY_ENABLE_AUTO_REBALANCE", "maybe")]).unwrap_err();
    assert!(e.to_string().contains("true or false"), "{e}");
}

#[test]
fn overlong_topic_names_are_refused() {
    let ok = "t".repeat(249);
    assert_eq!(
        load(&[("TREASURY_TOPIC_POSTINGS", ok.as_str())])
            .unwrap()
            .topics
            .postings,
        ok
    );
    let long = "t".repeat(250);
    let e = load(&[("TREASURY_TOPIC_POSTINGS", long.as_str())]).unwrap_err();
    assert_eq!(e.variable, "TREASURY_TOPIC_POSTINGS");
}

#[test]
fn kafka_settings_pass_through_and_secrets_are_masked() {
    let config = load(&[
        ("KAFKA_BROKERS", "broker-1:9093,broker-2:9093"),
        ("KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        ("KAFKA_SASL_USERNAME", "treasury"),
        ("KAFKA_SASL_PASSWORD", "secret"),
    ])
    .unwrap();
    assert_eq!(config.kafka_brokers, "broker-1:9093,broker-2:9093");
    let settings = &config.kafka_settings;
    assert_eq!(
        settings.get("sasl.password").map(String::as_str),
        Some("secret")
    );
    assert_eq!(
        settings.get("security.protocol").map(String::as_str),
        Some("SASL_SSL")
    );
    assert_eq!(
        settings.get("sasl.mechanism").map(String::as_str),
        Some("SCRAM-SHA-512")
    );
    assert_eq!(
        settings.get("sasl.username").map(String::as_str),
        Some("treasury")
    );
    assert!(
        !settings.contains_key("brokers"),
        "KAFKA_BROKERS is not a librdkafka setting"
    );

    let masked = config.masked();
    assert_eq!(
        masked
            .kafka_settings
            .get("sasl.password")
            .map(String::as_str),
        Some("****")
    );
    assert_eq!(
        masked
            .kafka_settings
            .get("sasl.username")
            .map(String::as_str),
        Some("treasury"),
        "only secrets are masked"
    );
    let shown = serde_json::to_string(&masked).unwrap();
    assert!(!shown.contains("secret"), "{shown}");
    // Masking is for display only: the real configuration keeps the secret.
    assert_eq!(config.kafka_settings["sasl.password"], "secret");
}

#[test]
fn database_url_password_is_masked() {
    let cases = [
        (
            "postgres://treasury:s3cr3t@db.internal:5432/treasury",
            "postgres://treasury:****@db.internal:5432/treasury",
        ),
        (
            "postgresql://treasury:p@ss:w0rd@db/treasury?sslmode=require",
            "postgresql://treasury:****@db/treasury?sslmode=require",
        ),
    ];
    for (url, shown) in cases {
        let config = load(&[("DATABASE_URL", url)]).unwrap();
        assert_eq!(config.database_url.as_deref(), Some(url));
        assert_eq!(config.require_database_url().unwrap(), url);
        let masked = config.masked();
        assert_eq!(masked.database_url.as_deref(), Some(shown));
    }
    // Without a password there is nothing to hide.
    let plain = "postgres://postgres@127.0.0.1:5432/treasury_ci";
    assert_eq!(
        load(&[("DATABASE_URL", plain)])
            .unwrap()
            .masked()
            .database_url
            .as_deref(),
        Some(plain)
    );
}

#[test]
fn database_password_in_the_query_string_is_masked() {
    // sqlx (like libpq) also takes the password as a `password=` parameter.
    let url = "postgres://treasury@db.internal:5432/treasury?password=s3cr3t&sslmode=require";
    let masked = load(&[("DATABASE_URL", url)]).unwrap().masked();
    let shown = masked.database_url.unwrap();
    assert!(!shown.contains("s3cr3t"), "password shown: {shown}");
}

#[test]
fn admin_token_is_masked() {
    let config = load(&[("TREASURY_ADMIN_TOKEN", "tok-123456")]).unwrap();
    assert_eq!(config.admin_token.as_deref(), Some("tok-123456"));
    let shown = serde_json::to_string(&config.masked()).unwrap();
    assert!(!shown.contains("tok-123456"), "{shown}");
}

#[test]
fn missing_database_url_names_the_variable() {
    let e = load(&[]).unwrap().require_database_url().unwrap_err();
    assert_eq!(e.variable, "DATABASE_URL");
    assert!(e.to_string().contains("DATABASE_URL"));
}

#[test]
fn schema_registry_settings_are_read_like_confluent_clients_and_masked() {
    use treasury::codec::SubjectNameStrategy;

    let registry = load(&[
        ("SCHEMA_REGISTRY_URL", "https://registry.internal:8081"),
        ("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "svc:s3cret"),
        ("SCHEMA_REGISTRY_AUTO_REGISTER", "false"),
        (
            "SCHEMA_REGISTRY_SUBJECT_NAME_STRATEGY",
            "io.confluent.kafka.serializers.subject.TopicRecordNameStrategy",
        ),
        ("SCHEMA_REGISTRY_SSL_CA_LOCATION", "/etc/registry/ca.pem"),
    ])
    .unwrap();
    let settings = registry.schema_registry.clone().unwrap();
    assert!(!settings.auto_register);
    assert_eq!(
        settings.subject_name_strategy,
        SubjectNameStrategy::TopicRecordNameStrategy
    );
    assert_eq!(
        settings.ssl_ca_location.as_deref(),
        Some(std::path::Path::new("/etc/registry/ca.pem"))
    );
    let shown = registry.masked().schema_registry.unwrap();
    assert_eq!(shown.basic_auth_user_info.as_deref(), Some("svc:****"));

    let defaults = load(&[("SCHEMA_REGISTRY_URL", "http://localhost:8081")])
        .unwrap()
        .schema_registry
        .unwrap();
    assert!(defaults.auto_register);
    assert_eq!(
        defaults.subject_name_strategy,
        SubjectNameStrategy::TopicNameStrategy
    );

    let error = load(&[
        ("SCHEMA_REGISTRY_URL", "http://localhost:8081"),
        ("SCHEMA_REGISTRY_SUBJECT_NAME_STRATEGY", "ByMood"),
    ])
    .unwrap_err();
    assert_eq!(error.variable, "SCHEMA_REGISTRY_SUBJECT_NAME_STRATEGY");
}

#[test]
fn the_planner_watch_is_turned_off_with_zero() {
    let off = load(&[("TREASURY_PLANNER_WATCH_INTERVAL", "0s")]).unwrap();
    assert_eq!(off.planner.watch_interval, chrono::Duration::zero());
    let every = load(&[("TREASURY_PLANNER_WATCH_INTERVAL", "30s")]).unwrap();
    assert_eq!(every.planner.watch_interval, chrono::Duration::seconds(30));
    let err = load(&[("TREASURY_PLANNER_WATCH_INTERVAL", "soon")]).unwrap_err();
    assert_eq!(err.variable, "TREASURY_PLANNER_WATCH_INTERVAL");
}

#[test]
fn urgent_pieces_default_to_three_and_refuse_zero() {
    assert_eq!(load(&[]).unwrap().planner.urgent_pieces, 3);
    let whole = load(&[("TREASURY_PLANNER_URGENT_PIECES", "1")]).unwrap();
    assert_eq!(whole.planner.urgent_pieces, 1);
    let err = load(&[("TREASURY_PLANNER_URGENT_PIECES", "0")]).unwrap_err();
    assert_eq!(err.variable, "TREASURY_PLANNER_URGENT_PIECES");
}

#[test]
fn the_burst_factor_defaults_to_five_and_refuses_what_is_not_a_number_in_range() {
    assert_eq!(
        load(&[]).unwrap().planner.burst_factor,
        rust_decimal::Decimal::from(5)
    );
    let three = load(&[("TREASURY_PLANNER_BURST_FACTOR", "3")]).unwrap();
    assert_eq!(three.planner.burst_factor, rust_decimal::Decimal::from(3));
    for bad in ["-1", "21", "often"] {
        let err = load(&[("TREASURY_PLANNER_BURST_FACTOR", bad)]).unwrap_err();
        assert_eq!(err.variable, "TREASURY_PLANNER_BURST_FACTOR", "{bad}");
    }
}

#[test]
fn the_burst_top_up_is_off_by_default_and_refuses_what_is_not_a_switch() {
    assert!(!load(&[]).unwrap().planner.burst_top_up);
    let on = load(&[("TREASURY_PLANNER_BURST_TOP_UP", "on")]).unwrap();
    assert!(on.planner.burst_top_up);
    let err = load(&[("TREASURY_PLANNER_BURST_TOP_UP", "sometimes")]).unwrap_err();
    assert_eq!(err.variable, "TREASURY_PLANNER_BURST_TOP_UP");
}

/// The `KEY: value` entries of `deploy/k8s/configmap.yaml`'s data.
fn configmap_settings() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/k8s/configmap.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let data = text.split_once("\ndata:\n").expect("a data: section").1;
    data.lines()
        .filter_map(|line| {
            let (key, rest) = line.strip_prefix("  ")?.split_once(':')?;
            if key.is_empty()
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            {
                return None;
            }
            let rest = rest.trim_start();
            let value = match rest.strip_prefix('"') {
                Some(quoted) => quoted.split_once('"')?.0,
                None => rest.split(" #").next()?.trim(),
            };
            Some((key.to_owned(), value.to_owned()))
        })
        .collect()
}

#[test]
fn the_settings_deploy_ships_load_as_they_are() {
    let shipped = configmap_settings();
    assert!(shipped.len() > 10, "read the configmap: {shipped:?}");
    let config = Config::from_vars(shipped.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .unwrap_or_else(|e| panic!("deploy/k8s/configmap.yaml does not load: {e}"));
    let value = |key: &str| {
        shipped
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        Some(config.ingest_workers.to_string()),
        value("TREASURY_INGEST_WORKERS")
    );
    assert_eq!(
        Some(config.batch_size.to_string()),
        value("TREASURY_BATCH_SIZE")
    );
    assert_eq!(Some(config.kafka_brokers.clone()), value("KAFKA_BROKERS"));
    assert_eq!(
        load(&[]).unwrap().ingest_workers,
        1,
        "one ingest consumer by default"
    );
}

#[test]
fn the_forecast_horizon_is_off_by_default_and_at_most_a_day() {
    assert!(load(&[]).unwrap().planner.forecast_horizon.is_zero());
    let on = load(&[("TREASURY_PLANNER_FORECAST_HORIZON", "8h")]).unwrap();
    assert_eq!(on.planner.forecast_horizon, chrono::Duration::hours(8));
    for bad in ["2d", "soon", "-1h"] {
        let err = load(&[("TREASURY_PLANNER_FORECAST_HORIZON", bad)]).unwrap_err();
        assert_eq!(err.variable, "TREASURY_PLANNER_FORECAST_HORIZON", "{bad}");
    }
}

#[test]
fn the_relay_reserve_is_off_by_default_and_at_most_four() {
    assert!(load(&[]).unwrap().planner.relay_reserve.is_zero());
    let on = load(&[("TREASURY_PLANNER_RELAY_RESERVE", "1.5")]).unwrap();
    assert_eq!(on.planner.relay_reserve, rust_decimal::Decimal::new(15, 1));
    for bad in ["5", "-1", "lots"] {
        let err = load(&[("TREASURY_PLANNER_RELAY_RESERVE", bad)]).unwrap_err();
        assert_eq!(err.variable, "TREASURY_PLANNER_RELAY_RESERVE", "{bad}");
    }
}
