//! A direct reader for deposits and withdrawals written with the engine's
//! own `FundingEvent` / `WithdrawalEvent` schema: the five fields straight
//! from the Avro body into a [`FlowRecord`], with no generic `Value` tree
//! (no field-name strings, no per-field allocations besides the currency).
//!
//! Only the happy path: anything this reader does not take as plainly valid
//! (another writer schema, a bad uuid, an odd decimal, trailing bytes, …)
//! returns `None`, and the caller reads the message the generic way, which
//! gives the error its usual words. So for every message the outcome is the
//! generic reader's.

use chrono::{TimeZone, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use super::records::{AMOUNT_SCALE, FlowRecord};

/// Reads a body written with the flow schema: `event_id` and `user_id`
/// (uuid strings), `currency` (string), `amount` (decimal bytes, scale
/// [`AMOUNT_SCALE`]), `occurred_at` (timestamp-millis).
pub(super) fn read_flow(body: &[u8]) -> Option<FlowRecord> {
    let mut r = Reader(body);
    let event_id = Uuid::parse_str(r.str()?).ok()?;
    let user_id = Uuid::parse_str(r.str()?).ok()?;
    let currency = r.str()?.to_owned();
    let amount = decimal(r.bytes()?)?;
    let occurred_at = Utc.timestamp_millis_opt(r.long()?).single()?;
    if !r.0.is_empty() {
        return None;
    }
    Some(FlowRecord {
        event_id,
        user_id,
        currency,
        amount,
        occurred_at,
    })
}

/// Big-endian two's-complement unscaled value, as `decimal_from_avro` reads it.
fn decimal(bytes: &[u8]) -> Option<Decimal> {
    if bytes.is_empty() || bytes.len() > 16 {
        return None;
    }
    let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0x00 };
    let mut wide = [fill; 16];
    wide[16 - bytes.len()..].copy_from_slice(bytes);
    Decimal::try_from_i128_with_scale(i128::from_be_bytes(wide), AMOUNT_SCALE)
        .ok()
        .map(|d| d.normalize())
}

/// The rest of an Avro body.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// A zig-zag varint `long` (at most 10 bytes).
    fn long(&mut self) -> Option<i64> {
        let mut value: u64 = 0;
        for (i, byte) in self.0.iter().enumerate().take(10) {
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return Some((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        None
    }

    /// Length-prefixed bytes.
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.long()?).ok()?;
        if len > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(head)
    }

    /// A length-prefixed UTF-8 string.
    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Codec, SchemaKind, wire};

    fn record(amount: &str) -> FlowRecord {
        FlowRecord {
            event_id: Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0),
            user_id: Uuid::from_u128(42),
            currency: "USDC".into(),
            amount: amount.parse().unwrap(),
            occurred_at: Utc.timestamp_millis_opt(1_767_603_600_123).unwrap(),
        }
    }

    #[test]
    fn reads_what_the_generic_reader_reads() {
        let codec = Codec::default();
        for kind in [SchemaKind::FundingEvent, SchemaKind::WithdrawalEvent] {
            for amount in ["0.000001", "1", "250.5", "999999999.123456", "-3.25"] {
                let bytes = record(amount).encode(&codec, kind).unwrap();
                let (_, body) = wire::split(&bytes).unwrap();
                let generic =
                    FlowRecord::from_value(&codec.decode_cached(&bytes, kind).unwrap()).unwrap();
                assert_eq!(read_flow(body), Some(generic));
            }
        }
    }

    #[test]
    fn leaves_anything_odd_to_the_generic_reader() {
        let codec = Codec::default();
        let bytes = record("10")
            .encode(&codec, SchemaKind::FundingEvent)
            .unwrap();
        let (_, body) = wire::split(&bytes).unwrap();
        let mut trailing = body.to_vec();
        trailing.push(0);
        assert_eq!(read_flow(&trailing), None);
        for cut in 0..body.len() {
            assert_eq!(read_flow(&body[..cut]), None, "cut at {cut}");
        }
        let mut not_a_uuid = body.to_vec();
        not_a_uuid[1] = b'z';
        assert_eq!(read_flow(&not_a_uuid), None);
    }
}
