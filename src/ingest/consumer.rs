//! The ingest driver: reads the funding and withdrawal topics in batches
//! through a [`GroupConsumer`] (positions from the database, never the
//! group's offsets in Kafka), decodes them, and commits each batch through
//! [`super::batch::commit_batch`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;

use super::batch::{BatchContext, BatchOutcome, Consumed, commit_batch, commit_progress};
use super::validate::{Rejection, decode_event};
use crate::clock::SharedClock;
use crate::codec::{Codec, CodecError, wire};
use crate::consumer::{ConsumeError, GroupConsumer, RawMessage};
use crate::domain::{FlowEvent, FlowKind};
use crate::health::{ConsumerState, Health};
use crate::retry::{self, Backoff};
use crate::shutdown::Shutdown;
use crate::store::{LockMode, ProgressUpdate, Store, StoreError, TopicPartition};
use crate::window::WindowSpec;

/// Settings of the ingest driver.
#[derive(Clone)]
pub struct IngestSettings {
    pub group: String,
    pub funding_topic: String,
    pub withdrawal_topic: String,
    pub dlq_topic: String,
    pub spec: WindowSpec,
    pub batch_size: usize,
    pub batch_max_wait: Duration,
}

/// Running totals, for logs, the demo and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestTotals {
    pub counted: u64,
    pub duplicates: u64,
    pub late: u64,
    pub rejected: u64,
    pub batches: u64,
}

/// How often a consumer at the end of its partitions says so again; a
/// partition whose report is older than `TREASURY_IDLE_TIMEOUT` no longer
/// counts as idle (see [`crate::window::PartitionProgress::is_idle`]).
pub const CAUGHT_UP_HEARTBEAT: Duration = Duration::from_secs(1);

/// How often the input topics' partitions are listed again (partitions
/// added to a topic hold settlement back from then on).
pub const PARTITION_REFRESH: Duration = Duration::from_secs(60);

/// How long one metadata request may take.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a batch was not committed.
pub type IngestError = ConsumeError;

/// The ingest driver.
pub struct Ingest {
    consumer: GroupConsumer,
    store: Arc<dyn Store>,
    codec: Codec,
    clock: SharedClock,
    settings: IngestSettings,
    health: Health,
    reported_caught_up: HashSet<TopicPartition>,
    last_report: DateTime<Utc>,
    /// When every input partition was last registered with settlement.
    partitions_registered_at: Option<DateTime<Utc>>,
    totals: IngestTotals,
}

impl Ingest {
    /// Subscribes to the input topics.
    pub fn new(
        consumer_config: &ClientConfig,
        store: Arc<dyn Store>,
        codec: Codec,
        clock: SharedClock,
        settings: IngestSettings,
    ) -> Result<Self, KafkaError> {
        let consumer = GroupConsumer::new(
            consumer_config,
            &[&settings.funding_topic, &settings.withdrawal_topic],
            store.clone(),
            &settings.group,
        )?;
        let last_report = clock.now();
        Ok(Self {
            consumer,
            store,
            codec,
            clock,
            settings,
            health: Health::default(),
            reported_caught_up: HashSet::new(),
            last_report,
            partitions_registered_at: None,
            totals: IngestTotals::default(),
        })
    }

    /// Reports this consumer's state to `health` (for `/readyz`).
    pub fn reporting_to(mut self, health: Health) -> Self {
        health.consumer(HEALTH_NAME, ConsumerState::Starting);
        retry::register_series(HEALTH_NAME);
        self.health = health;
        self
    }

    /// Totals so far.
    pub fn totals(&self) -> &IngestTotals {
        &self.totals
    }

    /// Reads and commits batches until `shutdown`; the batch in hand is
    /// committed before returning (a step waits at most `batch_max_wait` for
    /// messages), then the consumer leaves the group.
    ///
    /// When something is down (database, registry) the batch is dropped and
    /// read again from the stored offsets after a growing pause: the
    /// partitions are held, nothing is dead-lettered or skipped. Any other
    /// failure ends the run with the error (the process exits and restarts).
    pub async fn run(mut self, mut shutdown: Shutdown) -> Result<IngestTotals, IngestError> {
        let mut backoff = Backoff::default();
        while !shutdown.is_triggered() {
            let committed = self.totals.batches;
            match self.step().await {
                // Only a committed batch shows that what was down is back.
                Ok(()) if self.totals.batches == committed => {}
                Ok(()) => retry::resumed(HEALTH_NAME, &mut backoff),
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
                    tracing::error!(error = %e, "ingest cannot go on");
                    self.consumer.close();
                    return Err(e);
                }
            }
        }
        // Hand the partitions over honestly: no longer vouched for as caught up.
        let leaving: Vec<TopicPartition> = self.consumer.assigned().iter().cloned().collect();
        if let Err(e) = self.release(&leaving).await {
            tracing::warn!(error = %e, "could not record the hand-over of partitions");
        }
        self.consumer.close();
        tracing::info!(totals = ?self.totals, "ingest stopped");
        Ok(self.totals)
    }

    /// Fills one batch and commits it. Messages read but not committed are
    /// read again from the stored offsets.
    pub async fn step(&mut self) -> Result<(), IngestError> {
        if !self.register_partitions().await? {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(());
        }
        self.apply_rebalances().await?;
        let raw = self
            .consumer
            .next_batch(self.settings.batch_size, self.settings.batch_max_wait)
            .await?;
        let now = self.clock.now();
        let messages = self
            .decode_all(raw, now)
            .await
            .map_err(ConsumeError::Registry)?;
        let caught_up = self.consumer.at_end().clone();
        if messages.is_empty() {
            let newly = !caught_up.is_subset(&self.reported_caught_up);
            if newly || self.since(self.last_report) >= CAUGHT_UP_HEARTBEAT {
                let reports: Vec<ProgressUpdate> = caught_up
                    .iter()
                    .map(|tp| ProgressUpdate {
                        tp: tp.clone(),
                        max_event_time: None,
                        caught_up: true,
                        now,
                    })
                    .collect();
                commit_progress(self.store.as_ref(), &reports).await?;
                self.reported_caught_up = caught_up;
                self.last_report = now;
            }
            return Ok(());
        }
        let ctx = BatchContext {
            store: self.store.as_ref(),
            codec: &self.codec,
            group: &self.settings.group,
            spec: &self.settings.spec,
            dlq_topic: &self.settings.dlq_topic,
            caught_up: &caught_up,
            now,
        };
        match commit_batch(&ctx, &messages).await {
            Ok(outcome) => {
                self.record(&outcome, &messages, &caught_up);
                Ok(())
            }
            Err(StoreError::OffsetConflict {
                topic,
                partition,
                stored,
                first,
            }) => {
                tracing::warn!(%topic, partition, stored, first,
                    "another consumer committed these offsets; re-positioning");
                self.consumer.forget(messages.iter().map(|m| &m.tp));
                Ok(())
            }
            Err(e) => {
                self.consumer.forget(messages.iter().map(|m| &m.tp));
                Err(e.into())
            }
        }
    }

    /// How long ago `at` was, on this driver's clock (zero if in the future).
    fn since(&self, at: DateTime<Utc>) -> Duration {
        (self.clock.now() - at).to_std().unwrap_or_default()
    }

    fn record(
        &mut self,
        outcome: &BatchOutcome,
        messages: &[Consumed],
        caught_up: &HashSet<TopicPartition>,
    ) {
        for m in messages {
            self.reported_caught_up.remove(&m.tp);
        }
        self.reported_caught_up.extend(caught_up.iter().cloned());
        self.last_report = self.clock.now();
        self.totals.counted += outcome.counted;
        self.totals.duplicates += outcome.duplicates;
        self.totals.late += outcome.late;
        self.totals.rejected += outcome.rejected;
        self.totals.batches += 1;
        metrics::counter!("treasury_events_counted_total").increment(outcome.counted);
        metrics::counter!("treasury_events_duplicate_total").increment(outcome.duplicates);
        metrics::counter!("treasury_events_late_total").increment(outcome.late);
        if outcome.late > 0 {
            tracing::info!(
                late = outcome.late,
                "late events counted in the first open window"
            );
        }
        tracing::debug!(
            counted = outcome.counted,
            duplicates = outcome.duplicates,
            rejected = outcome.rejected,
            messages = messages.len(),
            "batch committed"
        );
    }

    /// Registers every partition of the input topics with settlement, so a
    /// partition that no consumer has read yet (assigned to a peer that has
    /// not started, or to nobody) holds settlement back instead of being
    /// overlooked. Nothing is counted before the first registration succeeds;
    /// afterwards it is refreshed every [`PARTITION_REFRESH`] to pick up added
    /// partitions, and a failed refresh is only logged. Returns whether the
    /// partitions have been registered at least once.
    async fn register_partitions(&mut self) -> Result<bool, StoreError> {
        if self
            .partitions_registered_at
            .is_some_and(|at| self.since(at) < PARTITION_REFRESH)
        {
            return Ok(true);
        }
        let first = self.partitions_registered_at.is_none();
        let partitions = match self.consumer.topic_partitions(METADATA_TIMEOUT) {
            Ok(p) => p,
            Err(e) if first => {
                tracing::warn!(error = %e, "cannot list the input partitions yet; waiting before counting anything");
                return Ok(false);
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not refresh the input partitions; keeping the known ones");
                self.partitions_registered_at = Some(self.clock.now());
                return Ok(true);
            }
        };
        let mut tx = self.store.begin(LockMode::Shared).await?;
        tx.register_partitions(&partitions).await?;
        tx.commit().await?;
        if first {
            tracing::info!(
                partitions = partitions.len(),
                "input partitions registered with settlement"
            );
        }
        self.partitions_registered_at = Some(self.clock.now());
        Ok(true)
    }

    /// Newly assigned and revoked partitions are recorded as not caught up:
    /// they hold settlement back until their (new) consumer has read them.
    async fn apply_rebalances(&mut self) -> Result<(), StoreError> {
        let changes = self.consumer.take_rebalances().await?;
        self.health.consumer(HEALTH_NAME, self.consumer.state());
        let moved: Vec<TopicPartition> = changes
            .revoked
            .iter()
            .chain(&changes.assigned)
            .cloned()
            .collect();
        self.release(&moved).await
    }

    /// Records `partitions` as not caught up.
    async fn release(&mut self, partitions: &[TopicPartition]) -> Result<(), StoreError> {
        for tp in partitions {
            self.reported_caught_up.remove(tp);
        }
        let now = self.clock.now();
        let updates: Vec<ProgressUpdate> = partitions
            .iter()
            .map(|tp| ProgressUpdate {
                tp: tp.clone(),
                max_event_time: None,
                caught_up: false,
                now,
            })
            .collect();
        commit_progress(self.store.as_ref(), &updates).await
    }

    /// Decodes and validates `messages`. Fails (and nothing of the batch
    /// may be committed) when a writer schema cannot be fetched because the
    /// registry is down: that says nothing about the message.
    async fn decode_all(
        &self,
        messages: Vec<RawMessage>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Consumed>, CodecError> {
        let mut decoded = Vec::with_capacity(messages.len());
        for m in messages {
            let kind = if m.tp.topic == self.settings.funding_topic {
                FlowKind::Deposit
            } else {
                FlowKind::Withdrawal
            };
            let outcome = self.decode(kind, m.payload.as_deref(), now).await?;
            decoded.push(Consumed {
                tp: m.tp,
                offset: m.offset,
                key: m.key,
                payload: m.payload,
                outcome,
            });
        }
        Ok(decoded)
    }

    async fn decode(
        &self,
        kind: FlowKind,
        payload: Option<&[u8]>,
        now: DateTime<Utc>,
    ) -> Result<Result<FlowEvent, Rejection>, CodecError> {
        if let Some(bytes) = payload
            && let Ok((id, _)) = wire::split(bytes)
            && let Err(e) = self.codec.source().writer_schema(id).await
        {
            return if e.is_transient() {
                Err(e)
            } else {
                Ok(Err(Rejection::Decode(e)))
            };
        }
        Ok(decode_event(&self.codec, kind, payload, now))
    }
}

/// The name this consumer reports under in `/readyz`.
pub const HEALTH_NAME: &str = "ingest";
