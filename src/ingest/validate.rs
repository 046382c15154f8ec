//! Decoding and validation of one input message: a valid deposit or
//! withdrawal, or a [`Rejection`] saying why not (which goes to the DLQ).

use chrono::{DateTime, Duration, Utc};

use crate::codec::records::FlowRecord;
use crate::codec::{Codec, CodecError, SchemaKind};
use crate::domain::{Currency, FlowEvent, FlowKind, Money};

/// Events further in the future than this are refused.
pub const MAX_FUTURE_SKEW: Duration = Duration::hours(1);

/// Events before this (the Unix epoch) are refused: no deposit or withdrawal
/// happened then, and every later time can be windowed and stored.
pub const EARLIEST_EVENT_TIME: DateTime<Utc> = DateTime::UNIX_EPOCH;

/// Why an input message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("cannot decode: {0}")]
    Decode(#[from] CodecError),
    #[error("message has no value")]
    Empty,
    #[error("unknown currency {0:?}")]
    UnknownCurrency(String),
    #[error("invalid amount: {0}")]
    Amount(String),
    #[error("invalid id: {0}")]
    Id(&'static str),
    #[error("event time {at} is more than {max_skew_minutes} minutes in the future")]
    FromTheFuture {
        at: DateTime<Utc>,
        max_skew_minutes: i64,
    },
    #[error("event time {0} is before {EARLIEST_EVENT_TIME}")]
    TooOld(DateTime<Utc>),
}

impl Rejection {
    /// Machine-readable class of the rejection (DLQ `error_kind`, metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            Rejection::Decode(CodecError::UnknownSchemaId(_)) => "unknown_schema",
            Rejection::Decode(_) | Rejection::Empty => "decode",
            Rejection::UnknownCurrency(_) => "unknown_currency",
            Rejection::Amount(_) => "invalid_amount",
            Rejection::Id(_) => "invalid_id",
            Rejection::FromTheFuture { .. } => "future_timestamp",
            Rejection::TooOld(_) => "ancient_timestamp",
        }
    }
}

/// The reader schema for messages on a topic of `kind`.
pub fn schema_for(kind: FlowKind) -> SchemaKind {
    match kind {
        FlowKind::Deposit => SchemaKind::FundingEvent,
        FlowKind::Withdrawal => SchemaKind::WithdrawalEvent,
    }
}

/// Decodes (schemas already cached) and validates one message.
pub fn decode_event(
    codec: &Codec,
    kind: FlowKind,
    payload: Option<&[u8]>,
    now: DateTime<Utc>,
) -> Result<FlowEvent, Rejection> {
    let bytes = payload.ok_or(Rejection::Empty)?;
    let schema = schema_for(kind);
    let record = match codec.read_flow_cached(bytes, schema) {
        Some(record) => record,
        None => FlowRecord::from_value(&codec.decode_cached(bytes, schema)?)?,
    };
    validate(kind, record, now)
}

/// Checks a decoded record: known currency, positive amount at the currency's
/// scale, non-nil ids, a time not absurdly far in the future.
pub fn validate(
    kind: FlowKind,
    record: FlowRecord,
    now: DateTime<Utc>,
) -> Result<FlowEvent, Rejection> {
    let currency: Currency = record
        .currency
        .parse()
        .map_err(|_| Rejection::UnknownCurrency(record.currency.clone()))?;
    let amount =
        Money::positive(currency, record.amount).map_err(|e| Rejection::Amount(e.to_string()))?;
    if record.event_id.is_nil() {
        return Err(Rejection::Id("event_id is the nil uuid"));
    }
    if record.user_id.is_nil() {
        return Err(Rejection::Id("user_id is the nil uuid"));
    }
    if record.occurred_at < EARLIEST_EVENT_TIME {
        return Err(Rejection::TooOld(record.occurred_at));
    }
    if record.occurred_at > now + MAX_FUTURE_SKEW {
        return Err(Rejection::FromTheFuture {
            at: record.occurred_at,
            max_skew_minutes: MAX_FUTURE_SKEW.num_minutes(),
        });
    }
    Ok(FlowEvent {
        event_id: record.event_id,
        kind,
        user_id: record.user_id,
        amount,
        occurred_at: record.occurred_at,
    })
}
