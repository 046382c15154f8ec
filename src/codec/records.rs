//! The engine's records as Avro values, one pair of functions per schema.

use apache_avro::types::Value;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use super::values::{
    RecordFields, decimal_from_avro, decimal_to_avro, string_from_avro, timestamp_from_avro,
    timestamp_to_avro, uuid_from_avro,
};
use super::{Codec, CodecError, SchemaKind};
use crate::domain::{
    BufferAccount, ConversionCommand, ConversionDirection, ConversionTrigger, Currency, EntrySide,
    LedgerEntry, LedgerPosting, Money,
};

/// Scale of every money field on the wire (USDC's, the finer of the two).
pub const AMOUNT_SCALE: u32 = 6;
/// Scale of exchange rates on the wire.
pub const RATE_SCALE: u32 = 10;

/// A deposit or withdrawal as it is on the wire, before validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowRecord {
    pub event_id: Uuid,
    pub user_id: Uuid,
    pub currency: String,
    pub amount: Decimal,
    pub occurred_at: DateTime<Utc>,
}

impl FlowRecord {
    /// Encodes as a funding (`FundingEvent`) or withdrawal (`WithdrawalEvent`) message.
    pub fn encode(&self, codec: &Codec, kind: SchemaKind) -> Result<Vec<u8>, CodecError> {
        let value = Value::Record(vec![
            ("event_id".into(), Value::Uuid(self.event_id)),
            ("user_id".into(), Value::Uuid(self.user_id)),
            ("currency".into(), Value::String(self.currency.clone())),
            (
                "amount".into(),
                decimal_to_avro("amount", self.amount, AMOUNT_SCALE)?,
            ),
            ("occurred_at".into(), timestamp_to_avro(self.occurred_at)),
        ]);
        codec.encode(kind, value)
    }

    /// Reads a decoded funding or withdrawal value.
    pub fn from_value(value: &Value) -> Result<Self, CodecError> {
        let fields = RecordFields::of(value)?;
        Ok(Self {
            event_id: uuid_from_avro("event_id", fields.get("event_id")?)?,
            user_id: uuid_from_avro("user_id", fields.get("user_id")?)?,
            currency: string_from_avro("currency", fields.get("currency")?)?,
            amount: decimal_from_avro("amount", fields.get("amount")?, AMOUNT_SCALE)?,
            occurred_at: timestamp_from_avro("occurred_at", fields.get("occurred_at")?)?,
        })
    }
}

fn parsed<T: std::str::FromStr>(field: &'static str, value: &Value) -> Result<T, CodecError>
where
    T::Err: std::fmt::Display,
{
    let text = string_from_avro(field, value)?;
    text.parse().map_err(|e: T::Err| CodecError::Field {
        field,
        reason: e.to_string(),
    })
}

/// Encodes a conversion command.
pub fn encode_command(codec: &Codec, command: &ConversionCommand) -> Result<Vec<u8>, CodecError> {
    let value = Value::Record(vec![
        ("command_id".into(), Value::Uuid(command.command_id)),
        (
            "direction".into(),
            Value::String(command.direction.as_str().into()),
        ),
        (
            "trigger".into(),
            Value::String(command.trigger.as_str().into()),
        ),
        (
            "currency".into(),
            Value::String(command.amount.currency.code().into()),
        ),
        (
            "amount".into(),
            decimal_to_avro("amount", command.amount.value, AMOUNT_SCALE)?,
        ),
        (
            "source_account".into(),
            Value::String(command.source_account.as_str().into()),
        ),
        (
            "destination_account".into(),
            Value::String(command.destination_account.as_str().into()),
        ),
        ("cycle_id".into(), Value::String(command.cycle_id.clone())),
        ("created_at".into(), timestamp_to_avro(command.created_at)),
    ]);
    codec.encode(SchemaKind::ConversionCommand, value)
}

/// Reads a decoded conversion command; amounts are checked against the currency's scale.
pub fn command_from_value(value: &Value) -> Result<ConversionCommand, CodecError> {
    let fields = RecordFields::of(value)?;
    let currency: Currency = parsed("currency", fields.get("currency")?)?;
    let amount = decimal_from_avro("amount", fields.get("amount")?, AMOUNT_SCALE)?;
    let amount = Money::positive(currency, amount).map_err(|e| CodecError::Field {
        field: "amount",
        reason: e.to_string(),
    })?;
    let direction: ConversionDirection = parsed("direction", fields.get("direction")?)?;
    if direction.source_currency() != currency {
        return Err(CodecError::Field {
            field: "currency",
            reason: format!("{currency} is not the source currency of {direction}"),
        });
    }
    Ok(ConversionCommand {
        command_id: uuid_from_avro("command_id", fields.get("command_id")?)?,
        direction,
        trigger: parsed::<ConversionTrigger>("trigger", fields.get("trigger")?)?,
        amount,
        source_account: parsed::<BufferAccount>("source_account", fields.get("source_account")?)?,
        destination_account: parsed::<BufferAccount>(
            "destination_account",
            fields.get("destination_account")?,
        )?,
        cycle_id: string_from_avro("cycle_id", fields.get("cycle_id")?)?,
        created_at: timestamp_from_avro("created_at", fields.get("created_at")?)?,
    })
}

/// Encodes a ledger posting.
pub fn encode_posting(codec: &Codec, posting: &LedgerPosting) -> Result<Vec<u8>, CodecError> {
    let entries = posting
        .entries
        .iter()
        .map(|entry| {
            Ok(Value::Record(vec![
                ("account".into(), Value::String(entry.account.clone())),
                (
                    "side".into(),
                    Value::String(
                        match entry.side {
                            EntrySide::Debit => "debit",
                            EntrySide::Credit => "credit",
                        }
                        .into(),
                    ),
                ),
                (
                    "currency".into(),
                    Value::String(entry.amount.currency.code().into()),
                ),
                (
                    "amount".into(),
                    decimal_to_avro("entries.amount", entry.amount.value, AMOUNT_SCALE)?,
                ),
                ("memo".into(), Value::String(entry.memo.clone())),
            ]))
        })
        .collect::<Result<Vec<_>, CodecError>>()?;
    let value = Value::Record(vec![
        ("posting_id".into(), Value::Uuid(posting.posting_id)),
        (
            "idempotency_key".into(),
            Value::String(posting.idempotency_key.clone()),
        ),
        ("job_id".into(), Value::Uuid(posting.job_id)),
        (
            "description".into(),
            Value::String(posting.description.clone()),
        ),
        (
            "exchange_rate".into(),
            decimal_to_avro("exchange_rate", posting.exchange_rate, RATE_SCALE)?,
        ),
        ("entries".into(), Value::Array(entries)),
        ("posted_at".into(), timestamp_to_avro(posting.posted_at)),
    ]);
    codec.encode(SchemaKind::LedgerPosting, value)
}

/// Reads a decoded ledger posting.
pub fn posting_from_value(value: &Value) -> Result<LedgerPosting, CodecError> {
    let fields = RecordFields::of(value)?;
    let Value::Array(items) = fields.get("entries")? else {
        return Err(CodecError::Field {
            field: "entries",
            reason: "expected an array".into(),
        });
    };
    let entries = items
        .iter()
        .map(|item| {
            let f = RecordFields::of(item)?;
            let currency: Currency = parsed("entries.currency", f.get("currency")?)?;
            let side = match string_from_avro("entries.side", f.get("side")?)?.as_str() {
                "debit" => EntrySide::Debit,
                "credit" => EntrySide::Credit,
                other => {
                    return Err(CodecError::Field {
                        field: "entries.side",
                        reason: format!("{other:?} is neither debit nor credit"),
                    });
                }
            };
            Ok(LedgerEntry {
                account: string_from_avro("entries.account", f.get("account")?)?,
                side,
                amount: Money {
                    currency,
                    value: decimal_from_avro("entries.amount", f.get("amount")?, AMOUNT_SCALE)?,
                },
                memo: string_from_avro("entries.memo", f.get("memo")?)?,
            })
        })
        .collect::<Result<Vec<_>, CodecError>>()?;
    Ok(LedgerPosting {
        posting_id: uuid_from_avro("posting_id", fields.get("posting_id")?)?,
        idempotency_key: string_from_avro("idempotency_key", fields.get("idempotency_key")?)?,
        job_id: uuid_from_avro("job_id", fields.get("job_id")?)?,
        description: string_from_avro("description", fields.get("description")?)?,
        exchange_rate: decimal_from_avro(
            "exchange_rate",
            fields.get("exchange_rate")?,
            RATE_SCALE,
        )?,
        entries,
        posted_at: timestamp_from_avro("posted_at", fields.get("posted_at")?)?,
    })
}

/// An input message the engine rejected, with where it came from and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub reason: String,
    pub error_kind: String,
    pub original_key: Option<Vec<u8>>,
    pub original_value: Option<Vec<u8>>,
    pub rejected_at: DateTime<Utc>,
}

fn optional_bytes(bytes: &Option<Vec<u8>>) -> Value {
    match bytes {
        Some(b) => Value::Union(1, Box::new(Value::Bytes(b.clone()))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

fn bytes_from_union(field: &'static str, value: &Value) -> Result<Option<Vec<u8>>, CodecError> {
    match value {
        Value::Union(_, inner) => bytes_from_union(field, inner),
        Value::Null => Ok(None),
        Value::Bytes(b) => Ok(Some(b.clone())),
        other => Err(CodecError::Field {
            field,
            reason: format!("expected bytes or null, got {other:?}"),
        }),
    }
}

impl DeadLetter {
    /// Encodes the DLQ record.
    pub fn encode(&self, codec: &Codec) -> Result<Vec<u8>, CodecError> {
        let value = Value::Record(vec![
            (
                "source_topic".into(),
                Value::String(self.source_topic.clone()),
            ),
            ("source_partition".into(), Value::Int(self.source_partition)),
            ("source_offset".into(), Value::Long(self.source_offset)),
            ("reason".into(), Value::String(self.reason.clone())),
            ("error_kind".into(), Value::String(self.error_kind.clone())),
            ("original_key".into(), optional_bytes(&self.original_key)),
            (
                "original_value".into(),
                optional_bytes(&self.original_value),
            ),
            ("rejected_at".into(), timestamp_to_avro(self.rejected_at)),
        ]);
        codec.encode(SchemaKind::DeadLetter, value)
    }

    /// Reads a decoded DLQ record.
    pub fn from_value(value: &Value) -> Result<Self, CodecError> {
        let fields = RecordFields::of(value)?;
        let partition = match fields.get("source_partition")? {
            Value::Int(p) => *p,
            other => {
                return Err(CodecError::Field {
                    field: "source_partition",
                    reason: format!("expected int, got {other:?}"),
                });
            }
        };
        let offset = match fields.get("source_offset")? {
            Value::Long(o) => *o,
            other => {
                return Err(CodecError::Field {
                    field: "source_offset",
                    reason: format!("expected long, got {other:?}"),
                });
            }
        };
        Ok(Self {
            source_topic: string_from_avro("source_topic", fields.get("source_topic")?)?,
            source_partition: partition,
            source_offset: offset,
            reason: string_from_avro("reason", fields.get("reason")?)?,
            error_kind: string_from_avro("error_kind", fields.get("error_kind")?)?,
            original_key: bytes_from_union("original_key", fields.get("original_key")?)?,
            original_value: bytes_from_union("original_value", fields.get("original_value")?)?,
            rejected_at: timestamp_from_avro("rejected_at", fields.get("rejected_at")?)?,
        })
    }
}
