//! A consumer-group member whose read positions come from the database, not
//! from the group's offsets in Kafka. Every stage that consumes (ingest, the
//! executor's command intake) reads through it; what a stage does with a
//! batch, and committing the new offsets with its work, is the stage's own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};

use crate::codec::CodecError;
use crate::health::ConsumerState;
use crate::store::{Store, StoreError, TopicPartition};

/// Why a stage's batch was not committed.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A writer schema could not be fetched because the registry is down.
    #[error(transparent)]
    Registry(CodecError),
}

impl ConsumeError {
    /// Whether something is down (retry and hold) rather than broken (stop).
    pub fn is_transient(&self) -> bool {
        match self {
            ConsumeError::Store(e) => e.is_transient(),
            ConsumeError::Registry(e) => e.is_transient(),
        }
    }

    /// What is down, for the metric label and the log.
    pub fn dependency(&self) -> &'static str {
        match self {
            ConsumeError::Store(_) => "database",
            ConsumeError::Registry(_) => "schema_registry",
        }
    }
}

/// Partitions handed to or taken from this consumer since the loop last
/// looked. An assignment is not applied in the rebalance callback: the loop
/// reads the partitions' stored offsets from the database (async) and then
/// assigns them at those offsets, so the broker's first fetch is already at
/// the stored position (librdkafka waits for the assign call meanwhile).
#[derive(Default)]
pub struct RebalanceLog {
    /// Partitions handed to us, not assigned yet.
    pending: Mutex<Vec<TopicPartition>>,
    revoked: Mutex<Vec<TopicPartition>>,
}

fn partitions_of(list: &TopicPartitionList) -> Vec<TopicPartition> {
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
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        list: &mut TopicPartitionList,
    ) {
        let parts = partitions_of(list);
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                tracing::info!(partitions = ?parts, "partitions assigned; positioning them at their stored offsets");
                self.pending.lock().expect("rebalance log").extend(parts);
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = ?parts, "partitions revoked");
                self.pending
                    .lock()
                    .expect("rebalance log")
                    .retain(|tp| !parts.contains(tp));
                let result = if cooperative {
                    consumer.incremental_unassign(list)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "could not give up revoked partitions");
                }
                self.revoked.lock().expect("rebalance log").extend(parts);
            }
            other => {
                tracing::warn!(error = ?other, "rebalance error; giving up the assignment");
                self.pending.lock().expect("rebalance log").clear();
                let _ = consumer.unassign();
            }
        }
    }
}

/// Where the consumer expects a partition's next message.
#[derive(Debug, Clone, Copy)]
enum Position {
    /// Nothing stored: take what the broker gives (the beginning).
    Fresh,
    /// The stored next offset; `seeked` once the broker was asked to go there.
    Expect { next: i64, seeked: bool },
}

/// One message as read, owned.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub tp: TopicPartition,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

/// Partition changes since the last call to [`GroupConsumer::take_rebalances`].
#[derive(Debug, Default)]
pub struct Rebalanced {
    pub assigned: Vec<TopicPartition>,
    pub revoked: Vec<TopicPartition>,
}

/// The consumer.
pub struct GroupConsumer {
    consumer: StreamConsumer<RebalanceLog>,
    store: Arc<dyn Store>,
    group: String,
    topics: Vec<String>,
    positions: HashMap<TopicPartition, Position>,
    assigned: HashSet<TopicPartition>,
    /// Partitions read to their end (librdkafka names only the partition
    /// number at EOF, so every assigned topic's partition of that number is
    /// marked; the next message from one clears it).
    at_end: HashSet<TopicPartition>,
    first_fetched: HashMap<TopicPartition, i64>,
    /// Forgotten partitions to seek back before the next read.
    rewind: HashSet<TopicPartition>,
}

impl GroupConsumer {
    /// Joins `group` (set in `config`) and subscribes to `topics`.
    pub fn new(
        config: &ClientConfig,
        topics: &[&str],
        store: Arc<dyn Store>,
        group: &str,
    ) -> Result<Self, KafkaError> {
        let consumer: StreamConsumer<RebalanceLog> =
            config.create_with_context(RebalanceLog::default())?;
        consumer.subscribe(topics)?;
        Ok(Self {
            consumer,
            store,
            group: group.to_owned(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            positions: HashMap::new(),
            assigned: HashSet::new(),
            at_end: HashSet::new(),
            first_fetched: HashMap::new(),
            rewind: HashSet::new(),
        })
    }

    /// Applies and returns the partition changes since the last call. Newly
    /// handed partitions are assigned at their stored offsets (from the
    /// beginning when nothing is stored); if the offsets cannot be read, the
    /// assignment stays pending and the error is returned (nothing is read
    /// from those partitions meanwhile).
    pub async fn take_rebalances(&mut self) -> Result<Rebalanced, StoreError> {
        let pending: Vec<_> = std::mem::take(
            &mut *self
                .consumer
                .context()
                .pending
                .lock()
                .expect("rebalance log"),
        );
        let stored = if pending.is_empty() {
            BTreeMap::new()
        } else {
            match self.store.load_offsets(&self.group, &pending).await {
                Ok(stored) => stored,
                Err(e) => {
                    self.keep_pending(pending);
                    return Err(e);
                }
            }
        };
        let revoked: Vec<_> = std::mem::take(
            &mut *self
                .consumer
                .context()
                .revoked
                .lock()
                .expect("rebalance log"),
        );
        for tp in &revoked {
            self.positions.remove(tp);
            self.assigned.remove(tp);
            self.at_end.remove(tp);
            self.first_fetched.remove(tp);
            self.rewind.remove(tp);
        }
        if pending.is_empty() {
            return Ok(Rebalanced {
                assigned: Vec::new(),
                revoked,
            });
        }
        let mut list = TopicPartitionList::new();
        for tp in &pending {
            let offset = stored
                .get(tp)
                .map_or(Offset::Beginning, |next| Offset::Offset(*next));
            if let Err(e) = list.add_partition_offset(&tp.topic, tp.partition, offset) {
                tracing::warn!(error = %e, topic = %tp.topic, partition = tp.partition, "bad partition offset");
            }
        }
        let assigned = match self.consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => self.consumer.incremental_assign(&list),
            _ => self.consumer.assign(&list),
        };
        if let Err(e) = assigned {
            tracing::warn!(error = %e, "assigning partitions failed; will retry");
            self.keep_pending(pending);
            return Ok(Rebalanced {
                assigned: Vec::new(),
                revoked,
            });
        }
        for tp in &pending {
            let position = match stored.get(tp) {
                Some(next) => {
                    tracing::info!(topic = %tp.topic, partition = tp.partition, offset = next,
                        "partition positioned at its stored offset");
                    Position::Expect {
                        next: *next,
                        seeked: true,
                    }
                }
                None => Position::Fresh,
            };
            self.positions.insert(tp.clone(), position);
            self.assigned.insert(tp.clone());
            self.first_fetched.remove(tp);
        }
        Ok(Rebalanced {
            assigned: pending,
            revoked,
        })
    }

    fn keep_pending(&self, pending: Vec<TopicPartition>) {
        let mut queue = self
            .consumer
            .context()
            .pending
            .lock()
            .expect("rebalance log");
        let newer = std::mem::take(&mut *queue);
        *queue = pending;
        queue.extend(newer);
    }

    /// The first offset the broker delivered from each partition since it
    /// was assigned (what positioning on assignment is judged by).
    pub fn first_fetched(&self) -> &HashMap<TopicPartition, i64> {
        &self.first_fetched
    }

    /// Every partition of the subscribed topics, whoever is assigned them,
    /// from the broker's metadata. A topic the broker does not know (yet) has
    /// none; any other metadata error is returned.
    pub fn topic_partitions(&self, timeout: Duration) -> Result<Vec<TopicPartition>, KafkaError> {
        let mut all = Vec::new();
        for topic in &self.topics {
            let metadata = self.consumer.fetch_metadata(Some(topic), timeout)?;
            for t in metadata.topics() {
                match t.error() {
                    None => all.extend(t.partitions().iter().map(|p| TopicPartition {
                        topic: t.name().to_owned(),
                        partition: p.id(),
                    })),
                    Some(
                        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
                    ) => {
                        tracing::warn!(topic = %t.name(), "input topic does not exist yet");
                    }
                    Some(code) => {
                        return Err(KafkaError::MetadataFetch(RDKafkaErrorCode::from(code)));
                    }
                }
            }
        }
        Ok(all)
    }

    /// Assigned partitions, or waiting for an assignment (for `/readyz`).
    pub fn state(&self) -> ConsumerState {
        match self.assigned.len() {
            0 => ConsumerState::WaitingForAssignment,
            partitions => ConsumerState::Assigned { partitions },
        }
    }

    /// Partitions currently assigned to this consumer.
    pub fn assigned(&self) -> &HashSet<TopicPartition> {
        &self.assigned
    }

    /// Partitions currently read to their end.
    pub fn at_end(&self) -> &HashSet<TopicPartition> {
        &self.at_end
    }

    /// Forgets where `tps` stand: before the next read they are sought back
    /// to their stored offsets (after a failed or conflicting commit, or a
    /// batch dropped because something was down), so the messages read but
    /// not committed are read again even if nothing new arrives.
    pub fn forget<'a>(&mut self, tps: impl IntoIterator<Item = &'a TopicPartition>) {
        for tp in tps {
            self.positions.remove(tp);
            if self.assigned.contains(tp) {
                self.rewind.insert(tp.clone());
            }
        }
    }

    /// Forgets every position.
    pub fn forget_all(&mut self) {
        self.positions.clear();
        self.rewind.extend(self.assigned.iter().cloned());
    }

    /// Seeks forgotten partitions back to their stored offset (or, with
    /// nothing stored, to where this assignment began reading).
    async fn rewind_forgotten(&mut self) -> Result<(), StoreError> {
        if self.rewind.is_empty() {
            return Ok(());
        }
        let tps: Vec<TopicPartition> = self.rewind.iter().cloned().collect();
        let stored = self.store.load_offsets(&self.group, &tps).await?;
        for tp in tps {
            self.rewind.remove(&tp);
            let Some(next) = stored.get(&tp).or(self.first_fetched.get(&tp)).copied() else {
                continue;
            };
            match self.consumer.seek(
                &tp.topic,
                tp.partition,
                Offset::Offset(next),
                Duration::from_secs(5),
            ) {
                Ok(()) => {
                    tracing::debug!(topic = %tp.topic, partition = tp.partition, offset = next,
                        "partition sought back to its stored offset");
                    self.positions
                        .insert(tp, Position::Expect { next, seeked: true });
                }
                Err(e) => {
                    // The position stays unknown: the next message from the
                    // partition is positioned as before (seek if it is not
                    // the stored one).
                    tracing::warn!(error = %e, topic = %tp.topic, partition = tp.partition,
                        "seek back failed; repositioning on the next message");
                }
            }
        }
        Ok(())
    }

    /// Leaves the group.
    pub fn close(self) {
        self.consumer.unsubscribe();
    }

    /// Reads up to `max` messages, waiting at most `wait`: only messages at
    /// each partition's stored position, in order.
    pub async fn next_batch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<RawMessage>, StoreError> {
        self.rewind_forgotten().await?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut messages = Vec::new();
        while messages.len() < max {
            let received = match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => break,
                Ok(r) => r,
            };
            let message = match received {
                Ok(m) => m,
                Err(KafkaError::PartitionEOF(p)) => {
                    let candidates: Vec<TopicPartition> = self
                        .assigned
                        .iter()
                        .filter(|tp| tp.partition == p)
                        .cloned()
                        .collect();
                    let reached: Vec<TopicPartition> = if candidates.len() == 1 {
                        candidates
                    } else {
                        candidates
                            .into_iter()
                            .filter(|tp| self.read_to_high_watermark(tp))
                            .collect()
                    };
                    self.at_end.extend(reached);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kafka error while consuming; waiting");
                    metrics::counter!("treasury_kafka_errors_total").increment(1);
                    break;
                }
            };
            let raw = RawMessage {
                tp: TopicPartition {
                    topic: message.topic().to_owned(),
                    partition: message.partition(),
                },
                offset: message.offset(),
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec),
            };
            drop(message);
            self.at_end.remove(&raw.tp);
            self.first_fetched
                .entry(raw.tp.clone())
                .or_insert(raw.offset);
            if self.accept_position(&raw.tp, raw.offset).await? {
                self.positions.insert(
                    raw.tp.clone(),
                    Position::Expect {
                        next: raw.offset + 1,
                        seeked: false,
                    },
                );
                messages.push(raw);
            }
        }
        Ok(messages)
    }

    /// Whether everything librdkafka has seen in `tp` (its high watermark as
    /// of the last fetch response, no broker call) has been handed to us.
    /// librdkafka names only the partition number at the end of a partition;
    /// with several topics this tells which of them reached it: one still
    /// fetching (or not fetched yet) has not.
    fn read_to_high_watermark(&self, tp: &TopicPartition) -> bool {
        let Ok(topic) = std::ffi::CString::new(tp.topic.as_str()) else {
            return false;
        };
        let (mut low, mut high) = (-1_i64, -1_i64);
        // SAFETY: the client pointer is valid for the consumer's lifetime,
        // `topic` is NUL-terminated and outlives the call, and `low`/`high`
        // are valid for writes; the call only reads librdkafka's cache.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_get_watermark_offsets(
                self.consumer.client().native_ptr(),
                topic.as_ptr(),
                tp.partition,
                &mut low,
                &mut high,
            )
        };
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR || high < 0 {
            return false;
        }
        match self.positions.get(tp) {
            Some(Position::Expect { next, .. }) => *next >= high,
            Some(Position::Fresh) => low >= 0 && low == high,
            None => false,
        }
    }

    /// Whether a message at `offset` is the next one for `tp`; seeks to the
    /// stored offset when the broker delivered from elsewhere. Never skips.
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
                    .load_offsets(&self.group, std::slice::from_ref(tp))
                    .await?;
                // Nothing stored: the partition is read from where this
                // assignment began, also when a dropped batch is read again.
                let p = match stored.get(tp).or(self.first_fetched.get(tp)) {
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
            Position::Expect { next, seeked: true } if offset < next => Ok(false),
            Position::Expect { next, seeked } => {
                if seeked {
                    tracing::error!(topic = %tp.topic, partition = tp.partition, expected = next, got = offset,
                        "offset gap after seeking; refusing to skip (input topics must not be compacted)");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                } else {
                    tracing::info!(topic = %tp.topic, partition = tp.partition, from = offset, to = next,
                        "seeking to the stored offset");
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

/// The offset ranges (`first..next` per partition) covered by messages.
pub fn offset_ranges<'a>(
    messages: impl IntoIterator<Item = (&'a TopicPartition, i64)>,
) -> Vec<crate::store::OffsetRange> {
    let mut ranges: std::collections::BTreeMap<TopicPartition, (i64, i64)> =
        std::collections::BTreeMap::new();
    for (tp, offset) in messages {
        let range = ranges.entry(tp.clone()).or_insert((offset, offset));
        range.0 = range.0.min(offset);
        range.1 = range.1.max(offset);
    }
    ranges
        .into_iter()
        .map(|(tp, (first, last))| crate::store::OffsetRange {
            tp,
            first,
            next: last + 1,
        })
        .collect()
}
