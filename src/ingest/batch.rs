//! One batch of input messages, committed in one store transaction: the
//! consumed offsets, the new event ids, the window sums, the partitions'
//! progress and the DLQ records. A batch is all or nothing.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};

use super::validate::Rejection;
use crate::codec::Codec;
use crate::consumer::offset_ranges;
use crate::dlq::{Refused, dead_letter};
use crate::domain::FlowEvent;
use crate::store::{EventRef, LockMode, ProgressUpdate, Store, StoreError, TopicPartition};
use crate::window::{WindowSpec, WindowTallies};

/// One consumed message, decoded or refused.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub tp: TopicPartition,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub outcome: Result<FlowEvent, Rejection>,
}

/// What committing a batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    pub counted: u64,
    pub duplicates: u64,
    pub late: u64,
    pub rejected: u64,
    pub tallies: WindowTallies,
}

/// Everything a batch commit needs besides the messages.
pub struct BatchContext<'a> {
    pub store: &'a dyn Store,
    pub codec: &'a Codec,
    pub group: &'a str,
    pub spec: &'a WindowSpec,
    pub dlq_topic: &'a str,
    /// Partitions found at their end while filling the batch.
    pub caught_up: &'a HashSet<TopicPartition>,
    pub now: DateTime<Utc>,
    /// Whether the batch's event ids are expected to be new.
    pub expected: ExpectedIds,
}

/// What a batch's event ids are expected to be: it picks the store's way of
/// claiming them. Either way each id counts once; a wrong guess only costs
/// time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedIds {
    /// New (the usual case): written by the fastest path; if one was seen
    /// before after all, the batch is written again with each id checked.
    New,
    /// Some seen before (the last batch held duplicates: a replay).
    SomeSeen,
}

impl ExpectedIds {
    /// What to expect of the batch after one with `outcome`.
    pub fn after(outcome: &BatchOutcome) -> Self {
        if outcome.duplicates > 0 {
            ExpectedIds::SomeSeen
        } else {
            ExpectedIds::New
        }
    }
}

/// Commits `messages` (contiguous per partition) in one transaction.
pub async fn commit_batch(
    ctx: &BatchContext<'_>,
    messages: &[Consumed],
) -> Result<BatchOutcome, StoreError> {
    match write_batch(ctx, messages, ctx.expected).await {
        Err(StoreError::SeenBefore) => write_batch(ctx, messages, ExpectedIds::SomeSeen).await,
        written => written,
    }
}

/// One attempt at [`commit_batch`] in one transaction.
async fn write_batch(
    ctx: &BatchContext<'_>,
    messages: &[Consumed],
    expected: ExpectedIds,
) -> Result<BatchOutcome, StoreError> {
    let mut tx = ctx.store.begin(LockMode::Shared).await?;
    let next_open = tx
        .start_batch(
            ctx.group,
            &offset_ranges(messages.iter().map(|m| (&m.tp, m.offset))),
        )
        .await?;

    let mut outcome = BatchOutcome::default();
    let mut seen_in_batch = HashSet::new();
    let mut candidates = Vec::new();
    let mut refs = Vec::new();
    let mut dead_letters = Vec::new();
    for message in messages {
        match &message.outcome {
            Ok(event) => {
                if !seen_in_batch.insert(event.event_id) {
                    outcome.duplicates += 1;
                    continue;
                }
                let assignment = ctx.spec.assign(event.occurred_at, next_open);
                refs.push(EventRef {
                    event_id: event.event_id,
                    tp: message.tp.clone(),
                    offset: message.offset,
                    window_start: assignment.window_start,
                });
                candidates.push((event, assignment));
            }
            Err(rejection) => {
                outcome.rejected += 1;
                dead_letters.push(dead_letter(
                    ctx.codec,
                    ctx.dlq_topic,
                    Refused {
                        tp: &message.tp,
                        offset: message.offset,
                        key: message.key.as_deref(),
                        payload: message.payload.as_deref(),
                        reason: &rejection.to_string(),
                        error_kind: rejection.kind(),
                    },
                    ctx.now,
                )?);
            }
        }
    }
    let fresh = match expected {
        ExpectedIds::New => tx.claim_new_events(&refs).await?,
        ExpectedIds::SomeSeen => tx.claim_events(&refs).await?,
    };
    for (event, assignment) in candidates {
        if fresh.contains(&event.event_id) {
            outcome.counted += 1;
            outcome.late += u64::from(assignment.late);
            outcome.tallies.add(event, assignment);
        } else {
            outcome.duplicates += 1;
        }
    }
    tx.add_batch_sums(
        &outcome.tallies,
        ctx.spec.length,
        &progress(messages, ctx.caught_up, ctx.now),
    )
    .await?;
    tx.enqueue(&dead_letters).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// Records only progress (no messages): partitions that reached their end.
pub async fn commit_progress(
    store: &dyn Store,
    updates: &[ProgressUpdate],
) -> Result<(), StoreError> {
    if updates.is_empty() {
        return Ok(());
    }
    let mut tx = store.begin(LockMode::Shared).await?;
    tx.record_progress(updates).await?;
    tx.commit().await
}

fn progress(
    messages: &[Consumed],
    caught_up: &HashSet<TopicPartition>,
    now: DateTime<Utc>,
) -> Vec<ProgressUpdate> {
    let mut latest: BTreeMap<TopicPartition, Option<DateTime<Utc>>> = BTreeMap::new();
    for m in messages {
        let event_time = m.outcome.as_ref().ok().map(|e| e.occurred_at);
        let entry = latest.entry(m.tp.clone()).or_default();
        *entry = (*entry).max(event_time);
    }
    for tp in caught_up {
        latest.entry(tp.clone()).or_default();
    }
    latest
        .into_iter()
        .map(|(tp, max_event_time)| ProgressUpdate {
            caught_up: caught_up.contains(&tp),
            tp,
            max_event_time,
            now,
        })
        .collect()
}
