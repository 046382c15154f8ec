//! `treasury_consumer_lag_messages{group, topic, partition}`: for each
//! consumer group of the roles this process runs, the partition's high
//! watermark minus the group's next offset as stored in PostgreSQL (the
//! engine's positions live there, not in Kafka's group offsets).
//!
//! Both sides are shared state, so every pod reports the same value for
//! every partition of the group (not only those it owns); the alert rules and
//! the dashboard take `max` per partition before summing, like the other
//! database gauges.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::shutdown::Shutdown;
use crate::store::{Store, TopicPartition};

/// How long one broker request may take.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// What went wrong measuring lag.
#[derive(Debug, thiserror::Error)]
pub enum LagError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("lag task stopped: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A consumer group and the topics it reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupTopics {
    pub group: String,
    pub topics: Vec<String>,
}

/// Measures the lag of some consumer groups.
#[derive(Clone)]
pub struct LagGauge {
    consumer: Arc<BaseConsumer>,
    store: Arc<dyn Store>,
    groups: Vec<GroupTopics>,
}

impl LagGauge {
    /// A gauge over `groups`, asking the brokers of `base`.
    pub fn new(
        base: &ClientConfig,
        store: Arc<dyn Store>,
        groups: Vec<GroupTopics>,
    ) -> Result<Self, LagError> {
        Ok(Self {
            consumer: Arc::new(base.create()?),
            store,
            groups,
        })
    }

    /// Sets the gauge for every partition of every group's topics.
    pub async fn refresh(&self) -> Result<(), LagError> {
        for group in &self.groups {
            let consumer = self.consumer.clone();
            let topics = group.topics.clone();
            let ends =
                tokio::task::spawn_blocking(move || high_watermarks(&consumer, &topics)).await??;
            let partitions: Vec<TopicPartition> =
                ends.iter().map(|(tp, _, _)| tp.clone()).collect();
            let stored = self.store.load_offsets(&group.group, &partitions).await?;
            for (tp, low, high) in ends {
                let next = stored.get(&tp).copied().unwrap_or(low);
                metrics::gauge!(
                    "treasury_consumer_lag_messages",
                    "group" => group.group.clone(),
                    "topic" => tp.topic.clone(),
                    "partition" => tp.partition.to_string()
                )
                .set((high - next).max(0) as f64);
            }
        }
        Ok(())
    }

    /// Refreshes every `every` until shutdown.
    pub async fn run(self, mut shutdown: Shutdown, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.triggered() => break,
            }
            if let Err(e) = self.refresh().await {
                tracing::warn!(error = %e, "consumer lag not measured");
            }
        }
    }
}

/// Each partition of `topics` with its low and high watermarks.
fn high_watermarks(
    consumer: &BaseConsumer,
    topics: &[String],
) -> Result<Vec<(TopicPartition, i64, i64)>, LagError> {
    let mut out = Vec::new();
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), BROKER_TIMEOUT)?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (low, high) = consumer.fetch_watermarks(topic, p.id(), BROKER_TIMEOUT)?;
                out.push((
                    TopicPartition {
                        topic: topic.clone(),
                        partition: p.id(),
                    },
                    low,
                    high,
                ));
            }
        }
    }
    Ok(out)
}
