//! Command intake: one job per command, exactly once. A redelivered or
//! replayed command finds its job already there (unique on the command id).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::codec::records::{DeadLetter, command_from_value};
use crate::codec::{Codec, SchemaKind, wire};
use crate::consumer::{GroupConsumer, RawMessage};
use crate::domain::ConversionJob;
use crate::shutdown::Shutdown;
use crate::store::jobs::JobStore;
use crate::store::{OffsetRange, OutboxMessage, Store, StoreError, TopicPartition};

/// Namespace of the executor's DLQ message ids: UUIDv5 over (topic, partition, offset).
const DLQ_ID_NAMESPACE: Uuid = Uuid::from_u128(0x4e6a_8c0e_2b4d_4f61_8a3c_5e7f_9b1d_3f50);

/// Settings of the intake.
#[derive(Debug, Clone)]
pub struct IntakeSettings {
    pub group: String,
    pub commands_topic: String,
    pub dlq_topic: String,
    pub batch_size: usize,
    pub batch_max_wait: Duration,
}

/// The command consumer.
pub struct Intake {
    consumer: GroupConsumer,
    jobs: Arc<dyn JobStore>,
    codec: Codec,
    settings: IntakeSettings,
}

impl Intake {
    pub fn new(
        consumer_config: &ClientConfig,
        store: Arc<dyn Store>,
        jobs: Arc<dyn JobStore>,
        codec: Codec,
        settings: IntakeSettings,
    ) -> Result<Self, KafkaError> {
        let consumer = GroupConsumer::new(
            consumer_config,
            &[&settings.commands_topic],
            store,
            &settings.group,
        )?;
        Ok(Self {
            consumer,
            jobs,
            codec,
            settings,
        })
    }

    /// Commits batches until shutdown; wakes the worker when jobs were created.
    pub async fn run(mut self, shutdown: Shutdown, wake: Arc<Notify>) {
        while !shutdown.is_triggered() {
            match self.step().await {
                Ok(created) if !created.is_empty() => wake.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "command batch not committed; will re-read");
                    self.consumer.forget_all();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        self.consumer.close();
    }

    /// Reads one batch and commits it; returns the ids of new jobs.
    pub async fn step(&mut self) -> Result<Vec<Uuid>, StoreError> {
        self.consumer.take_rebalances();
        let messages = self
            .consumer
            .next_batch(self.settings.batch_size, self.settings.batch_max_wait)
            .await?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut jobs = Vec::new();
        let mut dead_letters = Vec::new();
        for m in &messages {
            match self.decode(m).await {
                Ok(job) => jobs.push(job),
                Err(reason) => dead_letters.push(self.dead_letter(m, &reason)?),
            }
        }
        let ranges = offset_ranges(&messages);
        match self
            .jobs
            .intake(&self.settings.group, &ranges, &jobs, &dead_letters)
            .await
        {
            Ok(created) => {
                for id in &created {
                    tracing::info!(job = %id, "conversion job created");
                }
                metrics::counter!("treasury_jobs_created_total").increment(created.len() as u64);
                Ok(created)
            }
            Err(StoreError::OffsetConflict { .. }) => {
                self.consumer.forget(messages.iter().map(|m| &m.tp));
                Ok(Vec::new())
            }
            Err(e) => {
                self.consumer.forget(messages.iter().map(|m| &m.tp));
                Err(e)
            }
        }
    }

    async fn decode(&self, message: &RawMessage) -> Result<ConversionJob, String> {
        let bytes = message.payload.as_deref().ok_or("message has no value")?;
        if let Ok((id, _)) = wire::split(bytes) {
            self.codec
                .source()
                .writer_schema(id)
                .await
                .map_err(|e| e.to_string())?;
        }
        let value = self
            .codec
            .decode_cached(bytes, SchemaKind::ConversionCommand)
            .map_err(|e| e.to_string())?;
        let command = command_from_value(&value).map_err(|e| e.to_string())?;
        if command.source_account
            != crate::domain::ConversionDirection::source_for(command.destination_account)
        {
            return Err(format!(
                "{} is not the source that refills {}",
                command.source_account, command.destination_account
            ));
        }
        Ok(ConversionJob::from_command(&command))
    }

    fn dead_letter(&self, message: &RawMessage, reason: &str) -> Result<OutboxMessage, StoreError> {
        tracing::warn!(topic = %message.tp.topic, partition = message.tp.partition,
            offset = message.offset, reason, "conversion command rejected to the DLQ");
        metrics::counter!("treasury_dlq_messages_total", "error_kind" => "invalid_command")
            .increment(1);
        let record = DeadLetter {
            source_topic: message.tp.topic.clone(),
            source_partition: message.tp.partition,
            source_offset: message.offset,
            reason: reason.to_owned(),
            error_kind: "invalid_command".into(),
            original_key: message.key.clone(),
            original_value: message.payload.clone(),
            rejected_at: Utc::now(),
        };
        let payload = record
            .encode(&self.codec)
            .map_err(|e| StoreError::Corrupt(format!("DLQ record does not encode: {e}")))?;
        let id = Uuid::new_v5(
            &DLQ_ID_NAMESPACE,
            format!(
                "{}|{}|{}",
                message.tp.topic, message.tp.partition, message.offset
            )
            .as_bytes(),
        );
        Ok(OutboxMessage {
            id,
            topic: self.settings.dlq_topic.clone(),
            key: None,
            payload,
            headers: vec![
                ("message-id".into(), id.to_string()),
                ("dlq-reason".into(), reason.to_owned()),
                ("dlq-error-kind".into(), "invalid_command".into()),
                ("dlq-source-topic".into(), message.tp.topic.clone()),
                (
                    "dlq-source-partition".into(),
                    message.tp.partition.to_string(),
                ),
                ("dlq-source-offset".into(), message.offset.to_string()),
            ],
        })
    }
}

fn offset_ranges(messages: &[RawMessage]) -> Vec<OffsetRange> {
    let mut ranges: BTreeMap<TopicPartition, (i64, i64)> = BTreeMap::new();
    for m in messages {
        let r = ranges.entry(m.tp.clone()).or_insert((m.offset, m.offset));
        r.0 = r.0.min(m.offset);
        r.1 = r.1.max(m.offset);
    }
    ranges
        .into_iter()
        .map(|(tp, (first, last))| OffsetRange {
            tp,
            first,
            next: last + 1,
        })
        .collect()
}
