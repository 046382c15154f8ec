//! The buffer alert record (`schemas/buffer_alert.avsc`).

use apache_avro::types::Value;

use super::records::AMOUNT_SCALE;
use super::values::{
    RecordFields, decimal_from_avro, decimal_to_avro, string_from_avro, timestamp_from_avro,
    timestamp_to_avro, uuid_from_avro,
};
use super::{Codec, CodecError, SchemaKind};
use crate::alerts::BufferAlert;
use crate::domain::{BufferAccount, BufferStatus, Thresholds};

/// Encodes a buffer alert.
pub fn encode_buffer_alert(codec: &Codec, alert: &BufferAlert) -> Result<Vec<u8>, CodecError> {
    let money = |field: &'static str, value| decimal_to_avro(field, value, AMOUNT_SCALE);
    let value = Value::Record(vec![
        ("alert_id".into(), Value::Uuid(alert.alert_id)),
        (
            "account".into(),
            Value::String(alert.account.as_str().into()),
        ),
        (
            "currency".into(),
            Value::String(alert.account.currency().code().into()),
        ),
        (
            "from_status".into(),
            Value::String(alert.from.as_str().into()),
        ),
        ("to_status".into(), Value::String(alert.to.as_str().into())),
        ("balance".into(), money("balance", alert.balance)?),
        (
            "min_threshold".into(),
            money("min_threshold", alert.thresholds.min())?,
        ),
        (
            "target_threshold".into(),
            money("target_threshold", alert.thresholds.target())?,
        ),
        (
            "max_threshold".into(),
            money("max_threshold", alert.thresholds.max())?,
        ),
        ("cycle_id".into(), Value::String(alert.cycle_id.clone())),
        ("window_start".into(), timestamp_to_avro(alert.window_start)),
        ("window_end".into(), timestamp_to_avro(alert.window_end)),
        ("occurred_at".into(), timestamp_to_avro(alert.occurred_at)),
    ]);
    codec.encode(SchemaKind::BufferAlert, value)
}

fn status(field: &'static str, value: &Value) -> Result<BufferStatus, CodecError> {
    let text = string_from_avro(field, value)?;
    text.parse()
        .map_err(|e: crate::domain::UnknownBufferStatus| CodecError::Field {
            field,
            reason: e.to_string(),
        })
}

/// Reads a decoded buffer alert.
pub fn buffer_alert_from_value(value: &Value) -> Result<BufferAlert, CodecError> {
    let fields = RecordFields::of(value)?;
    let money = |field: &'static str| decimal_from_avro(field, fields.get(field)?, AMOUNT_SCALE);
    let account_text = string_from_avro("account", fields.get("account")?)?;
    let account: BufferAccount =
        account_text
            .parse()
            .map_err(|e: crate::domain::UnknownBufferAccount| CodecError::Field {
                field: "account",
                reason: e.to_string(),
            })?;
    let thresholds = Thresholds::new(
        money("min_threshold")?,
        money("target_threshold")?,
        money("max_threshold")?,
    )
    .map_err(|e| CodecError::Field {
        field: "min_threshold",
        reason: e.to_string(),
    })?;
    Ok(BufferAlert {
        alert_id: uuid_from_avro("alert_id", fields.get("alert_id")?)?,
        account,
        from: status("from_status", fields.get("from_status")?)?,
        to: status("to_status", fields.get("to_status")?)?,
        balance: money("balance")?,
        thresholds,
        cycle_id: string_from_avro("cycle_id", fields.get("cycle_id")?)?,
        window_start: timestamp_from_avro("window_start", fields.get("window_start")?)?,
        window_end: timestamp_from_avro("window_end", fields.get("window_end")?)?,
        occurred_at: timestamp_from_avro("occurred_at", fields.get("occurred_at")?)?,
    })
}
