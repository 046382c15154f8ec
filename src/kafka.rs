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

/// The consumer settings of a process's `index`th member (from 0) of
/// `group` when it runs several (`TREASURY_INGEST_WORKERS`): past the first,
/// a static member id (`group.instance.id`, from `KAFKA_GROUP_INSTANCE_ID`)
/// gets `-2`, `-3`, … appended, since two members with one id fence each other.
pub fn member_config(base: &ClientConfig, group: &str, index: usize) -> ClientConfig {
    let mut config = consumer_config(base, group);
    if index > 0
        && let Some(id) = config.get("group.instance.id").map(str::to_owned)
    {
        config.set("group.instance.id", format!("{id}-{}", index + 1));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_member_past_the_first_gets_its_own_static_id() {
        let mut base = ClientConfig::new();
        base.set("group.instance.id", "treasury-aggregator-7f9c");
        let ids: Vec<_> = (0..3)
            .map(|i| {
                member_config(&base, "g", i)
                    .get("group.instance.id")
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(
            ids,
            [
                Some("treasury-aggregator-7f9c".to_owned()),
                Some("treasury-aggregator-7f9c-2".to_owned()),
                Some("treasury-aggregator-7f9c-3".to_owned()),
            ]
        );
        let dynamic = member_config(&ClientConfig::new(), "g", 1);
        assert_eq!(
            dynamic.get("group.instance.id"),
            None,
            "no static id: none invented"
        );
        assert_eq!(dynamic.get("group.id"), Some("g"));
    }
}
