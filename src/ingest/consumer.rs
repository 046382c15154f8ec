//! The ingest driver: a consumer group on the funding and withdrawal topics
//! that reads in batches, positions every partition at the offset stored in
//! the database (never the group's offsets in Kafka), and commits each batch
//! through [`super::batch::commit_batch`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, ClientContext, Offset};

use super::batch::{BatchContext, BatchOutcome, Consumed, commit_batch, commit_progress};
use super::validate::{Rejection, decode_event};
use crate::codec::{Codec, wire};
use crate::domain::FlowKind;
use crate::shutdown::Shutdown;
use crate::store::{ProgressUpdate, Store, StoreError, TopicPartition};
use crate::window::WindowSpec;

/// Partitions handed to or taken from this consumer since the loop last looked.
#[derive(Default)]
pub struct RebalanceLog {
    assigned: Mutex<Vec<TopicPartition>>,
    revoked: Mutex<Vec<TopicPartition>>,
}

fn partitions_of(list: &rdkafka::TopicPartitionList) -> Vec<TopicPartition> {
    list.elements()
        .iter()
        .map(|e| TopicPartition {
            topic: e.topic().to_owned(),
            partition: e.partition(),
        })
        .collect()
}

impl ClientContext for RebalanceLog {
    /// Reaching the end of a partition is reported as an error by librdkafka;
    /// here it is routine (the consumer is caught up), so it is not logged.
    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end_of_partition {
            tracing::error!(%error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for RebalanceLog {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let parts = partitions_of(list);
                tracing::info!(partitions = ?parts, "partitions assigned");
                self.assigned.lock().expect("rebalance log").extend(parts);
            }
            Rebalance::Revoke(list) => {
                let parts = partitions_of(list);
                tracing::info!(partitions = ?parts, "partitions revoked");
                self.revoked.lock().expect("rebalance log").extend(parts);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// Where the driver expects a partition's next message.
#[derive(Debug, Clone, Copy)]
enum Position {
    /// Nothing stored: take what the broker gives (the beginning).
    Fresh,
    /// The stored next offset; `seeked` once we asked the broker to go there.
    Expect { next: i64, seeked: bool },
}

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

/// The ingest driver.
pub struct Ingest {
    consumer: StreamConsumer<RebalanceLog>,
    store: Arc<dyn Store>,
    codec: Codec,
    settings: IngestSettings,
    positions: HashMap<TopicPartition, Position>,
    assigned: HashSet<TopicPartition>,
    /// Partitions read to their end (librdkafka names only the partition
    /// number at EOF, so every assigned topic's partition of that number is
    /// marked; the next message from one clears it).
    at_end: HashSet<TopicPartition>,
    reported_caught_up: HashSet<TopicPartition>,
    totals: IngestTotals,
}

impl Ingest {
    /// Subscribes to the input topics.
    pub fn new(
        consumer_config: &ClientConfig,
        store: Arc<dyn Store>,
        codec: Codec,
        settings: IngestSettings,
    ) -> Result<Self, KafkaError> {
        let consumer: StreamConsumer<RebalanceLog> =
            consumer_config.create_with_context(RebalanceLog::default())?;
        consumer.subscribe(&[&settings.funding_topic, &settings.withdrawal_topic])?;
        Ok(Self {
            consumer,
            store,
            codec,
            settings,
            positions: HashMap::new(),
            assigned: HashSet::new(),
            at_end: HashSet::new(),
            reported_caught_up: HashSet::new(),
            totals: IngestTotals::default(),
        })
    }

    /// Totals so far.
    pub fn totals(&self) -> &IngestTotals {
        &self.totals
    }

    /// Reads and commits batches until `shutdown`; the batch in hand is
    /// committed before returning, then the consumer leaves the group.
    pub async fn run(mut self, mut shutdown: Shutdown) -> IngestTotals {
        while !shutdown.is_triggered() {
            let result = tokio::select! {
                r = self.step() => r,
                _ = shutdown.triggered() => Ok(()),
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, "ingest batch not committed; partitions will be re-read");
                self.positions.clear();
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        self.consumer.unsubscribe();
        tracing::info!(totals = ?self.totals, "ingest stopped");
        self.totals
    }

    /// Fills one batch and commits it. Cancel-safe up to the commit: messages
    /// read but not committed are simply read again.
    pub async fn step(&mut self) -> Result<(), StoreError> {
        self.apply_rebalances().await?;
        let (messages, caught_up) = self.fill_batch().await?;
        let now = Utc::now();
        if messages.is_empty() {
            let newly: Vec<ProgressUpdate> = caught_up
                .difference(&self.reported_caught_up)
                .map(|tp| ProgressUpdate {
                    tp: tp.clone(),
                    max_event_time: None,
                    caught_up: true,
                    now,
                })
                .collect();
            commit_progress(self.store.as_ref(), &newly).await?;
            self.reported_caught_up.extend(caught_up);
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
                tracing::warn!(%topic, partition, stored, first, "another consumer committed these offsets; re-positioning");
                for m in &messages {
                    self.positions.remove(&m.tp);
                }
                Ok(())
            }
            Err(e) => {
                for m in &messages {
                    self.positions.remove(&m.tp);
                }
                Err(e)
            }
        }
    }

    fn record(
        &mut self,
        outcome: &BatchOutcome,
        messages: &[Consumed],
        caught_up: &HashSet<TopicPartition>,
    ) {
        for m in messages {
            self.positions.insert(
                m.tp.clone(),
                Position::Expect {
                    next: m.offset + 1,
                    seeked: false,
                },
            );
            self.reported_caught_up.remove(&m.tp);
        }
        self.reported_caught_up.extend(caught_up.iter().cloned());
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

    async fn apply_rebalances(&mut self) -> Result<(), StoreError> {
        let context = self.consumer.context();
        let revoked: Vec<_> = std::mem::take(&mut *context.revoked.lock().expect("rebalance log"));
        let assigned: Vec<_> =
            std::mem::take(&mut *context.assigned.lock().expect("rebalance log"));
        for tp in revoked {
            self.positions.remove(&tp);
            self.assigned.remove(&tp);
            self.at_end.remove(&tp);
            self.reported_caught_up.remove(&tp);
        }
        if assigned.is_empty() {
            return Ok(());
        }
        let now = Utc::now();
        let updates: Vec<ProgressUpdate> = assigned
            .iter()
            .map(|tp| ProgressUpdate {
                tp: tp.clone(),
                max_event_time: None,
                caught_up: false,
                now,
            })
            .collect();
        commit_progress(self.store.as_ref(), &updates).await?;
        for tp in assigned {
            self.positions.remove(&tp);
            self.reported_caught_up.remove(&tp);
            self.assigned.insert(tp);
        }
        Ok(())
    }

    async fn fill_batch(&mut self) -> Result<(Vec<Consumed>, HashSet<TopicPartition>), StoreError> {
        let deadline = tokio::time::Instant::now() + self.settings.batch_max_wait;
        let mut messages = Vec::new();
        while messages.len() < self.settings.batch_size {
            let received = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => break,
                Ok(r) => r,
            };
            let message = match received {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(p)) => {
                    let reached: Vec<TopicPartition> = self
                        .assigned
                        .iter()
                        .filter(|tp| tp.partition == p)
                        .cloned()
                        .collect();
                    self.at_end.extend(reached);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka error while consuming; waiting");
                    metrics::counter!("treasury_kafka_errors_total").increment(1);
                    break;
                }
            };
            let tp = TopicPartition {
                topic: message.topic().to_owned(),
                partition: message.partition(),
            };
            let offset = message.offset();
            let key = message.key().map(<[u8]>::to_vec);
            let payload = message.payload().map(<[u8]>::to_vec);
            drop(message);
            self.at_end.remove(&tp);
            if !self.accept_position(&tp, offset).await? {
                continue;
            }
            let kind = if tp.topic == self.settings.funding_topic {
                FlowKind::Deposit
            } else {
                FlowKind::Withdrawal
            };
            let outcome = self.decode(kind, payload.as_deref()).await;
            self.positions.insert(
                tp.clone(),
                Position::Expect {
                    next: offset + 1,
                    seeked: false,
                },
            );
            messages.push(Consumed {
                tp,
                offset,
                key,
                payload,
                outcome,
            });
        }
        Ok((messages, self.at_end.clone()))
    }

    async fn decode(
        &self,
        kind: FlowKind,
        payload: Option<&[u8]>,
    ) -> Result<crate::domain::FlowEvent, Rejection> {
        if let Some(bytes) = payload
            && let Ok((id, _)) = wire::split(bytes)
        {
            self.codec.source().writer_schema(id).await?;
        }
        decode_event(&self.codec, kind, payload, Utc::now())
    }

    /// Whether a message at `offset` is the next one for `tp`; seeks to the
    /// stored offset when the broker delivered from elsewhere.
    async fn accept_position(
        &mut self,
        tp: &TopicPartition,
        offset: i64,
    ) -> Result<bool, StoreError> {
        let position = match self.positions.get(tp) {
            Some(p) => *p,
            None => {
                let stored = self
                    .store
                    .load_offsets(&self.settings.group, std::slice::from_ref(tp))
                    .await?;
                let p = match stored.get(tp) {
                    Some(next) => Position::Expect {
                        next: *next,
                        seeked: false,
                    },
                    None => Position::Fresh,
                };
                self.positions.insert(tp.clone(), p);
                p
            }
        };
        match position {
            Position::Fresh => Ok(true),
            Position::Expect { next, .. } if offset == next => Ok(true),
            Position::Expect { next, .. } if offset < next => Ok(false),
            Position::Expect { next, seeked } => {
                if seeked {
                    tracing::error!(topic = %tp.topic, partition = tp.partition, expected = next, got = offset,
                        "offset gap after seeking; refusing to skip (input topics must not be compacted)");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                } else {
                    tracing::info!(topic = %tp.topic, partition = tp.partition, from = offset, to = next, "seeking to the stored offset");
                }
                if let Err(e) = self.consumer.seek(
                    &tp.topic,
                    tp.partition,
                    Offset::Offset(next),
                    Duration::from_secs(5),
                ) {
                    tracing::warn!(error = %e, "seek failed; will retry");
                    self.positions.remove(tp);
                    return Ok(false);
                }
                self.positions
                    .insert(tp.clone(), Position::Expect { next, seeked: true });
                Ok(false)
            }
        }
    }
}
