//! Command intake: one job per command, exactly once. A redelivered or
//! replayed command finds its job already there (unique on the command id).
//! A command that cannot be read because something is down (the registry,
//! the database) is never dead-lettered: the batch is read again later.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use tokio::sync::Notify;
use uuid::Uuid;

use crate::clock::SharedClock;
use crate::codec::records::command_from_value;
use crate::codec::{Codec, CodecError, SchemaKind, wire};
use crate::consumer::{ConsumeError, GroupConsumer, RawMessage, offset_ranges};
use crate::dlq::{Refused, dead_letter};
use crate::domain::ConversionJob;
use crate::health::{ConsumerState, Health};
use crate::retry::{self, Backoff};
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

/// The name this consumer reports under in `/readyz`.
pub const HEALTH_NAME: &str = "executor-intake";

/// Why a batch was not committed.
pub type IntakeError = ConsumeError;

/// The command consumer.
pub struct Intake {
    consumer: GroupConsumer,
    jobs: Arc<dyn JobStore>,
    codec: Codec,
    clock: SharedClock,
    settings: IntakeSettings,
    health: Health,
    /// Batches committed so far.
    batches: u64,
}

impl Intake {
    pub fn new(
        consumer_config: &ClientConfig,
        store: Arc<dyn Store>,
        jobs: Arc<dyn JobStore>,
        codec: Codec,
        clock: SharedClock,
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
            clock,
            settings,
            health: Health::default(),
            batches: 0,
        })
    }

    /// Reports this consumer's state to `health` (for `/readyz`).
    pub fn reporting_to(mut self, health: Health) -> Self {
        health.consumer(HEALTH_NAME, ConsumerState::Starting);
        retry::register_series(HEALTH_NAME);
        self.health = health;
        self
    }

    /// Commits batches until shutdown; wakes the worker when jobs were
    /// created. Holds the partitions (with a growing pause) while something
    /// is down; ends with the error when something is broken.
    pub async fn run(
        mut self,
        mut shutdown: Shutdown,
        wake: Arc<Notify>,
    ) -> Result<(), IntakeError> {
        let mut backoff = Backoff::default();
        while !shutdown.is_triggered() {
            let committed = self.batches;
            match self.step().await {
                Ok(created) => {
                    if !created.is_empty() {
                        wake.notify_one();
                    }
                    // Only a committed batch shows that what was down is back.
                    if self.batches == committed {
                        continue;
                    }
                    retry::resumed(HEALTH_NAME, &mut backoff);
                }
                Err(e) if e.is_transient() => {
                    self.consumer.forget_all();
                    let dependency = e.dependency();
                    retry::hold(
                        HEALTH_NAME,
                        dependency,
                        &e,
                        &mut backoff,
                        &self.health,
                        &mut shutdown,
                    )
                    .await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "command intake cannot go on");
                    self.consumer.close();
                    return Err(e);
                }
            }
        }
        self.consumer.close();
        Ok(())
    }

    /// Reads one batch and commits it; returns the ids of new jobs.
    pub async fn step(&mut self) -> Result<Vec<Uuid>, IntakeError> {
        self.consumer.take_rebalances().await?;
        self.health.consumer(HEALTH_NAME, self.consumer.state());
        let messages = self
            .consumer
            .next_batch(self.settings.batch_size, self.settings.batch_max_wait)
            .await?;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.clock.now();
        let mut jobs = Vec::new();
        let mut dead_letters = Vec::new();
        for m in &messages {
            let decoded = match self.decode(m).await {
                Ok(decoded) => decoded,
                Err(e) => {
                    self.consumer.forget(messages.iter().map(|m| &m.tp));
                    return Err(ConsumeError::Registry(e));
                }
            };
            match decoded {
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
                    now,
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
                self.batches += 1;
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
                Err(e.into())
            }
        }
    }

    /// The job a command asks for, or why the command is refused; fails
    /// (nothing refused) when the registry cannot be asked now.
    async fn decode(
        &self,
        message: &RawMessage,
    ) -> Result<Result<ConversionJob, String>, CodecError> {
        if let Some(bytes) = message.payload.as_deref()
            && let Ok((id, _)) = wire::split(bytes)
            && let Err(e) = self.codec.source().writer_schema(id).await
        {
            return if e.is_transient() {
                Err(e)
            } else {
                Ok(Err(e.to_string()))
            };
        }
        Ok(self.read_command(message))
    }

    fn read_command(&self, message: &RawMessage) -> Result<ConversionJob, String> {
        let bytes = message.payload.as_deref().ok_or("message has no value")?;
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
                "{} from {} to {} is not a movement between those accounts",
                command.direction, command.source_account, command.destination_account
            ));
        }
        Ok(ConversionJob::from_command(&command))
    }
}
