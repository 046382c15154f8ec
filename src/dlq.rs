//! Dead letters: a refused message, kept whole with where it came from and
//! why, as an outbox message for `treasury.dlq` (Avro `DeadLetter` record plus
//! `dlq-*` headers). Its id derives from the source position, so a message
//! refused again after a replay or restart is the same dead letter.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::codec::Codec;
use crate::codec::records::DeadLetter;
use crate::store::{OutboxMessage, StoreError, TopicPartition};

/// Namespace of DLQ message ids: UUIDv5 over (topic, partition, offset).
const DLQ_ID_NAMESPACE: Uuid = Uuid::from_u128(0x2c4e_71a0_5d3b_4f8e_9a61_7b0c_d2e4_f813);

/// A message a stage refused.
#[derive(Debug, Clone, Copy)]
pub struct Refused<'a> {
    pub tp: &'a TopicPartition,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// Why, for a person to read.
    pub reason: &'a str,
    /// Machine-readable class (metric label and `error_kind`).
    pub error_kind: &'a str,
}

/// The DLQ message for `refused`; also logs it and counts it.
pub fn dead_letter(
    codec: &Codec,
    dlq_topic: &str,
    refused: Refused<'_>,
    now: DateTime<Utc>,
) -> Result<OutboxMessage, StoreError> {
    let Refused {
        tp,
        offset,
        key,
        payload,
        reason,
        error_kind,
    } = refused;
    // Text columns and headers cannot hold NUL; the original bytes are kept
    // whole in the record.
    let reason = &reason.replace('\0', "\\0");
    let record = DeadLetter {
        source_topic: tp.topic.clone(),
        source_partition: tp.partition,
        source_offset: offset,
        reason: reason.to_owned(),
        error_kind: error_kind.to_owned(),
        original_key: key.map(<[u8]>::to_vec),
        original_value: payload.map(<[u8]>::to_vec),
        rejected_at: now,
    };
    let encoded = record
        .encode(codec)
        .map_err(|e| StoreError::Corrupt(format!("DLQ record does not encode: {e}")))?;
    let id = Uuid::new_v5(
        &DLQ_ID_NAMESPACE,
        format!("{}|{}|{}", tp.topic, tp.partition, offset).as_bytes(),
    );
    tracing::warn!(topic = %tp.topic, partition = tp.partition, offset, error_kind, reason,
        "message refused to the DLQ");
    metrics::counter!("treasury_dlq_messages_total", "error_kind" => error_kind.to_owned())
        .increment(1);
    Ok(OutboxMessage {
        id,
        topic: dlq_topic.to_owned(),
        key: key.map(|k| String::from_utf8_lossy(k).replace('\0', "\u{fffd}")),
        payload: encoded,
        headers: vec![
            ("message-id".into(), id.to_string()),
            ("dlq-reason".into(), reason.to_owned()),
            ("dlq-error-kind".into(), error_kind.to_owned()),
            ("dlq-source-topic".into(), tp.topic.clone()),
            ("dlq-source-partition".into(), tp.partition.to_string()),
            ("dlq-source-offset".into(), offset.to_string()),
        ],
    })
}
