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
use tokio::sync::Notify;

use super::batch::{
    BatchContext, BatchOutcome, Consumed, ExpectedIds, commit_batch, commit_progress,
};
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
    /// The batch read while the previous one committed.
    read_ahead: Option<ReadBatch>,
    /// Notified after each committed batch (settlement listens to it).
    progress: Option<Arc<Notify>>,
    /// What the next batch's event ids are expected to be.
    expected_ids: ExpectedIds,
    /// What this consumer reports under (health, metrics, logs).
    name: &'static str,
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
            read_ahead: None,
            progress: None,
            expected_ids: ExpectedIds::New,
            name: HEALTH_NAME,
        })
    }

    /// Notifies `progress` after each committed batch: the watermark may
    /// have moved, so a window may now close
    /// ([`crate::settlement::Settlement::woken_by_progress`]).
    pub fn notifying(mut self, progress: Arc<Notify>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Names this consumer (default [`HEALTH_NAME`]) for its health entry,
    /// metrics and logs; name it before [`Self::reporting_to`].
    pub fn named(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }

    /// Reports this consumer's state to `health` (for `/readyz`) under its name.
    pub fn reporting_to(mut self, health: Health) -> Self {
        health.consumer(self.name, ConsumerState::Starting);
        retry::register_series(self.name);
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
                Ok(()) => retry::resumed(self.name, &mut backoff),
                Err(e) if e.is_transient() => {
                    self.forget_all();
                    let dependency = e.dependency();
                    retry::hold(
                        self.name,
                        dependency,
                        &e,
                        &mut backoff,
                        &self.health,
                        &mut shutdown,
                    )
                    .await;
                }
                Err(e) => {
                    tracing::error!(consumer = self.name, error = %e, "ingest cannot go on");
                    self.consumer.close();
                    return Err(e);
                }
            }
        }
        // The batch read ahead is committed too, then nothing more is read.
        if let Some(batch) = self.read_ahead.take()
            && let Err(e) = self.commit(batch, false).await
        {
            tracing::warn!(error = %e, "could not commit the last batch read; it is read again");
        }
        // Hand the partitions over honestly: no longer vouched for as caught up.
        let leaving: Vec<TopicPartition> = self.consumer.assigned().iter().cloned().collect();
        if let Err(e) = self.release(&leaving).await {
            tracing::warn!(error = %e, "could not record the hand-over of partitions");
        }
        self.consumer.close();
        tracing::info!(consumer = self.name, totals = ?self.totals, "ingest stopped");
        Ok(self.totals)
    }

    /// Commits one batch and reads the next meanwhile. The batch committed
    /// is the one read ahead by the previous step (or, with none, one read
    /// now); while its transaction runs, the following batch is read and
    /// decoded, so decoding overlaps the database's work. At most one batch
    /// is in flight, and batches commit in the order they were read.
    /// Messages read but not committed are read again from the stored offsets.
    pub async fn step(&mut self) -> Result<(), IngestError> {
        if !self.register_partitions().await? {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Ok(());
        }
        if self.apply_rebalances().await? {
            // Read before the partitions moved: its caught-up marks may name
            // partitions that are no longer ours. Read it again.
            self.drop_read_ahead();
        }
        let batch = match self.read_ahead.take() {
            Some(batch) => batch,
            None => {
                read_batch(&mut self.consumer, &self.codec, &self.clock, &self.settings).await?
            }
        };
        if batch.messages.is_empty() {
            return self.report_caught_up(batch).await;
        }
        self.commit(batch, true).await
    }

    /// Commits `batch`, reading the next one meanwhile when `read_next`.
    async fn commit(&mut self, batch: ReadBatch, read_next: bool) -> Result<(), IngestError> {
        let in_flight = tokio::spawn(commit_owned(
            self.store.clone(),
            self.codec.clone(),
            self.settings.clone(),
            batch,
            self.expected_ids,
        ));
        let next = if read_next {
            Some(read_batch(&mut self.consumer, &self.codec, &self.clock, &self.settings).await)
        } else {
            None
        };
        let (batch, committed) = match in_flight.await {
            Ok(done) => done,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only when the runtime shuts down: nothing is known committed.
            Err(_) => {
                self.consumer.forget_all();
                return Err(StoreError::Database(sqlx::Error::WorkerCrashed).into());
            }
        };
        match committed {
            Ok(outcome) => self.record(&outcome, &batch.messages, &batch.caught_up),
            Err(e) => {
                // The batch read ahead starts where this one ends: both are
                // read again.
                self.consumer.forget(batch.messages.iter().map(|m| &m.tp));
                if let Some(Ok(next)) = &next {
                    self.consumer.forget(next.messages.iter().map(|m| &m.tp));
                }
                return match e {
                    StoreError::OffsetConflict {
                        topic,
                        partition,
                        stored,
                        first,
                    } => {
                        tracing::warn!(%topic, partition, stored, first,
                            "another consumer committed these offsets; re-positioning");
                        Ok(())
                    }
                    e => Err(e.into()),
                };
            }
        }
        match next {
            Some(Ok(next)) => {
                self.read_ahead = Some(next);
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Reports the partitions at their end (when a batch came back empty):
    /// at once for a partition newly there, else every [`CAUGHT_UP_HEARTBEAT`].
    async fn report_caught_up(&mut self, batch: ReadBatch) -> Result<(), IngestError> {
        let ReadBatch { caught_up, now, .. } = batch;
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
        Ok(())
    }

    /// Drops the batch read ahead; its partitions are read again from the
    /// stored offsets.
    fn drop_read_ahead(&mut self) {
        if let Some(batch) = self.read_ahead.take() {
            self.consumer.forget(batch.messages.iter().map(|m| &m.tp));
        }
    }

    /// Forgets every position and the batch read ahead (something was down).
    fn forget_all(&mut self) {
        self.read_ahead = None;
        self.consumer.forget_all();
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
        self.expected_ids = ExpectedIds::after(outcome);
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
        if let Some(progress) = &self.progress {
            progress.notify_one();
        }
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
    /// Returns whether any partition moved.
    async fn apply_rebalances(&mut self) -> Result<bool, StoreError> {
        let changes = self.consumer.take_rebalances().await?;
        self.health.consumer(self.name, self.consumer.state());
        let moved: Vec<TopicPartition> = changes
            .revoked
            .iter()
            .chain(&changes.assigned)
            .cloned()
            .collect();
        self.release(&moved).await?;
        Ok(!moved.is_empty())
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
}

/// The name the first ingest consumer reports under in `/readyz` and in the
/// `consumer` label of its metrics.
pub const HEALTH_NAME: &str = "ingest";

/// Most ingest consumers one process runs (`TREASURY_INGEST_WORKERS`).
pub const MAX_WORKERS: usize = 8;

const WORKER_NAMES: [&str; MAX_WORKERS] = [
    HEALTH_NAME,
    "ingest-2",
    "ingest-3",
    "ingest-4",
    "ingest-5",
    "ingest-6",
    "ingest-7",
    "ingest-8",
];

/// The name of a process's `index`th ingest consumer (from 0): `ingest`,
/// then `ingest-2`, `ingest-3`, …; None past [`MAX_WORKERS`].
pub fn worker_name(index: usize) -> Option<&'static str> {
    WORKER_NAMES.get(index).copied()
}

/// A batch read and decoded, not committed yet.
struct ReadBatch {
    messages: Vec<Consumed>,
    /// Partitions at their end when the batch was read.
    caught_up: HashSet<TopicPartition>,
    /// The driver's clock when the batch was read.
    now: DateTime<Utc>,
}

/// Reads up to a batch of messages and decodes them. When a writer schema
/// cannot be fetched every position is forgotten, so the batch is read again
/// once the registry is back.
async fn read_batch(
    consumer: &mut GroupConsumer,
    codec: &Codec,
    clock: &SharedClock,
    settings: &IngestSettings,
) -> Result<ReadBatch, IngestError> {
    let raw = consumer
        .next_batch(settings.batch_size, settings.batch_max_wait)
        .await?;
    let now = clock.now();
    match decode_all(codec, settings, raw, now).await {
        Ok(messages) => Ok(ReadBatch {
            messages,
            caught_up: consumer.at_end().clone(),
            now,
        }),
        Err(e) => {
            consumer.forget_all();
            Err(ConsumeError::Registry(e))
        }
    }
}

/// Commits `batch` on its own task (so it proceeds while the driver decodes
/// the next one); hands the batch back with the outcome.
async fn commit_owned(
    store: Arc<dyn Store>,
    codec: Codec,
    settings: IngestSettings,
    batch: ReadBatch,
    expected: ExpectedIds,
) -> (ReadBatch, Result<BatchOutcome, StoreError>) {
    let ctx = BatchContext {
        store: store.as_ref(),
        codec: &codec,
        group: &settings.group,
        spec: &settings.spec,
        dlq_topic: &settings.dlq_topic,
        caught_up: &batch.caught_up,
        now: batch.now,
        expected,
    };
    let outcome = commit_batch(&ctx, &batch.messages).await;
    (batch, outcome)
}

/// Messages decoded between two yields to the runtime (see [`decode_all`]).
const DECODE_YIELD_EVERY: usize = 32;

/// Decodes and validates `messages`. Fails (and nothing of the batch may be
/// committed) when a writer schema cannot be fetched because the registry is
/// down: that says nothing about the message.
async fn decode_all(
    codec: &Codec,
    settings: &IngestSettings,
    messages: Vec<RawMessage>,
    now: DateTime<Utc>,
) -> Result<Vec<Consumed>, CodecError> {
    let mut decoded = Vec::with_capacity(messages.len());
    for (i, m) in messages.into_iter().enumerate() {
        // Decoding a batch is a few milliseconds of CPU with no await that
        // waits. The batch committing meanwhile is woken (each of its
        // statements answered) into this worker's LIFO slot, which no other
        // worker may steal: yielding now and then lets it go on at once
        // instead of after the whole batch is decoded.
        if i > 0 && i % DECODE_YIELD_EVERY == 0 {
            tokio::task::yield_now().await;
        }
        let kind = if m.tp.topic == settings.funding_topic {
            FlowKind::Deposit
        } else {
            FlowKind::Withdrawal
        };
        let outcome = decode(codec, kind, m.payload.as_deref(), now).await?;
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
    codec: &Codec,
    kind: FlowKind,
    payload: Option<&[u8]>,
    now: DateTime<Utc>,
) -> Result<Result<FlowEvent, Rejection>, CodecError> {
    if let Some(bytes) = payload
        && let Ok((id, _)) = wire::split(bytes)
        && let Err(e) = codec.source().writer_schema(id).await
    {
        return if e.is_transient() {
            Err(e)
        } else {
            Ok(Err(Rejection::Decode(e)))
        };
    }
    Ok(decode_event(codec, kind, payload, now))
}
