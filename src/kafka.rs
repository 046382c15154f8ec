//! Kafka clients built from the configuration: bootstrap servers plus any
//! `KAFKA_*` passthrough settings (security, SASL, ...).

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;

use crate::config::Config;

/// Base client settings shared by every client.
pub fn client_config(
    brokers: &str,
    extra: &std::collections::BTreeMap<String, String>,
) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in extra {
        config.set(key, value);
    }
    config
}

/// Base settings from the engine's configuration.
pub fn base_config(config: &Config) -> ClientConfig {
    client_config(&config.kafka_brokers, &config.kafka_settings)
}

/// An idempotent producer: retries never duplicate or reorder a message.
pub fn idempotent_producer(base: &ClientConfig) -> Result<FutureProducer, KafkaError> {
    base.clone()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .set("linger.ms", "5")
        .create()
}

/// A consumer configured for offsets kept in the database: no auto commit,
/// no offset store, start from the beginning when nothing is stored, and
/// report when a partition has been read to its end. Settings given through
/// `KAFKA_*` (already in `base`) win over these defaults, except the ones the
/// exactly-once design depends on.
pub fn consumer_config(base: &ClientConfig, group: &str) -> ClientConfig {
    let mut config = base.clone();
    for (key, value) in [
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "1000"),
        ("max.poll.interval.ms", "300000"),
        ("isolation.level", "read_committed"),
    ] {
        if config.get(key).is_none() {
            config.set(key, value);
        }
    }
    config
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true");
    config
}

/// Creates `topics` with `partitions` partitions each; existing topics are fine.
pub async fn ensure_topics(
    base: &ClientConfig,
    topics: &[&str],
    partitions: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base.create()?;
    let new: Vec<NewTopic> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::AdminOp(code)).inspect_err(|_| {
                    tracing::error!(%topic, ?code, "topic creation failed");
                });
            }
        }
    }
    Ok(())
}
