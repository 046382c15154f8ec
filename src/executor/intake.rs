//! Command intake: one job per command, exactly once. A redelivered or
//! replayed command finds its job already there (unique on the command id).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::codec::records::command_from_value;
use crate::codec::{Codec, SchemaKind, wire};
use crate::consumer::{GroupConsumer, RawMessage, offset_ranges};
use crate::dlq::{Refused, dead_letter};
use crate::domain::ConversionJob;
use crate::shutdown::Shutdown;
use crate::store::jobs::JobStore;
use crate::store::{Store, StoreError};

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
                Err(reason) => dead_letters.push(dead_letter(
                    &self.codec,
                    &self.settings.dlq_topic,
                    Refused {
                        tp: &m.tp,
                        offset: m.offset,
                        key: m.key.as_deref(),
                        payload: m.payload.as_deref(),
                        reason: &reason,
                        error_kind: "invalid_command",
                    },
                    Utc::now(),
                )?),
            }
        }
        let ranges = offset_ranges(messages.iter().map(|m| (&m.tp, m.offset)));
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
        if crate::domain::ConversionDirection::between(
            command.source_account,
            command.destination_account,
        ) != Some(command.direction)
        {
            return Err(format!(
                "{} from {} to {} is not a conversion between their currencies",
                command.direction, command.source_account, command.destination_account
            ));
        }
        Ok(ConversionJob::from_command(&command))
    }
}
