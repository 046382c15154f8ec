//! Conversions between Avro values and the engine's field types: decimals as
//! big-endian two's-complement unscaled integers, uuids, timestamps.

use apache_avro::types::Value;
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use super::CodecError;

fn field_error(field: &'static str, reason: impl Into<String>) -> CodecError {
    CodecError::Field {
        field,
        reason: reason.into(),
    }
}

/// Encodes `value` as an Avro decimal with `scale` decimal places.
pub fn decimal_to_avro(
    field: &'static str,
    value: Decimal,
    scale: u32,
) -> Result<Value, CodecError> {
    let normalized = value.normalize();
    if normalized.scale() > scale {
        return Err(field_error(
            field,
            format!("{value} has more than {scale} decimal places"),
        ));
    }
    let mut rescaled = normalized;
    rescaled.rescale(scale);
    if rescaled.scale() != scale || rescaled.mantissa().unsigned_abs() >= 10u128.pow(28) {
        return Err(field_error(
            field,
            format!("{value} does not fit a decimal of precision 28 and scale {scale}"),
        ));
    }
    let unscaled = rescaled.mantissa();
    let bytes = unscaled.to_be_bytes();
    let sign_byte = if unscaled < 0 { 0xff } else { 0x00 };
    let mut start = 0;
    while start < bytes.len() - 1
        && bytes[start] == sign_byte
        && (bytes[start + 1] & 0x80) == (sign_byte & 0x80)
    {
        start += 1;
    }
    Ok(Value::Decimal(apache_avro::Decimal::from(
        bytes[start..].to_vec(),
    )))
}

/// Reads an Avro decimal with `scale` decimal places.
pub fn decimal_from_avro(
    field: &'static str,
    value: &Value,
    scale: u32,
) -> Result<Decimal, CodecError> {
    let bytes: Vec<u8> = match value {
        Value::Decimal(d) => {
            Vec::<u8>::try_from(d).map_err(|e| field_error(field, e.to_string()))?
        }
        Value::Bytes(b) => b.clone(),
        other => {
            return Err(field_error(
                field,
                format!("expected decimal, got {other:?}"),
            ));
        }
    };
    if bytes.is_empty() || bytes.len() > 16 {
        return Err(field_error(
            field,
            format!("decimal of {} bytes is out of range", bytes.len()),
        ));
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0x00 };
    let mut wide = [fill; 16];
    wide[16 - bytes.len()..].copy_from_slice(&bytes);
    let unscaled = i128::from_be_bytes(wide);
    Decimal::try_from_i128_with_scale(unscaled, scale)
        .map(|d| d.normalize())
        .map_err(|e| field_error(field, e.to_string()))
}

/// Reads a uuid carried as an Avro string (with or without the uuid logical type).
pub fn uuid_from_avro(field: &'static str, value: &Value) -> Result<Uuid, CodecError> {
    match value {
        Value::Uuid(u) => Ok(*u),
        Value::String(s) => {
            Uuid::parse_str(s).map_err(|e| field_error(field, format!("{s:?} is not a uuid: {e}")))
        }
        other => Err(field_error(field, format!("expected uuid, got {other:?}"))),
    }
}

/// Reads a string field.
pub fn string_from_avro(field: &'static str, value: &Value) -> Result<String, CodecError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Enum(_, s) => Ok(s.clone()),
        other => Err(field_error(
            field,
            format!("expected string, got {other:?}"),
        )),
    }
}

/// Reads a `timestamp-millis` (or plain long) as a UTC time.
pub fn timestamp_from_avro(
    field: &'static str,
    value: &Value,
) -> Result<DateTime<Utc>, CodecError> {
    let millis = match value {
        Value::TimestampMillis(ms) | Value::Long(ms) => *ms,
        other => {
            return Err(field_error(
                field,
                format!("expected timestamp-millis, got {other:?}"),
            ));
        }
    };
    Utc.timestamp_millis_opt(millis)
        .single()
        .ok_or_else(|| field_error(field, format!("{millis} ms is not a valid time")))
}

/// A `timestamp-millis` value.
pub fn timestamp_to_avro(at: DateTime<Utc>) -> Value {
    Value::TimestampMillis(at.timestamp_millis())
}

/// The fields of a decoded record, by name.
pub struct RecordFields<'a>(Vec<(&'a str, &'a Value)>);

impl<'a> RecordFields<'a> {
    /// Views `value` as a record.
    pub fn of(value: &'a Value) -> Result<Self, CodecError> {
        match value {
            Value::Record(fields) => {
                Ok(Self(fields.iter().map(|(k, v)| (k.as_str(), v)).collect()))
            }
            other => Err(field_error(
                "<record>",
                format!("expected a record, got {other:?}"),
            )),
        }
    }

    /// The named field, or an error naming it.
    pub fn get(&self, field: &'static str) -> Result<&'a Value, CodecError> {
        self.0
            .iter()
            .find(|(k, _)| *k == field)
            .map(|(_, v)| *v)
            .ok_or_else(|| field_error(field, "missing"))
    }
}
