//! The Confluent wire format codec: every schema round-trips exactly, framing
//! and body errors are typed, arbitrary bytes never panic, and a writer schema
//! with a new optional field decodes into the same record.

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use treasury::alerts::BufferAlert;
use treasury::codec::alert::{buffer_alert_from_value, encode_buffer_alert};
use treasury::codec::records::{
    DeadLetter, FlowRecord, command_from_value, encode_command, encode_posting, posting_from_value,
};
use treasury::codec::wire::{self, FramingError};
use treasury::codec::{Codec, CodecError, SchemaKind, SchemaSource};
use treasury::domain::{
    BufferAccount, BufferStatus, ConversionCommand, ConversionDirection, ConversionTrigger,
    Currency, EntrySide, LedgerEntry, LedgerPosting, Money, Thresholds,
};
use uuid::Uuid;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn at(millis: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(millis).unwrap()
}

/// The decoded decimal must be the same number written the same (shortest) way.
fn assert_exact(decoded: Decimal, original: Decimal) {
    assert_eq!(decoded, original);
    assert_eq!(decoded.to_string(), original.normalize().to_string());
}

fn sample_flow() -> FlowRecord {
    FlowRecord {
        event_id: Uuid::from_u128(0x1111_2222_3333_4444_5555_6666_7777_8888),
        user_id: Uuid::from_u128(0x9999_aaaa_bbbb_cccc_dddd_eeee_ffff_0000),
        currency: "USDC".into(),
        amount: Decimal::new(12_345_678_901, 6),
        occurred_at: at(1_717_171_717_171),
    }
}

fn sample_command() -> ConversionCommand {
    let direction = ConversionDirection::UsdToUsdc;
    ConversionCommand {
        command_id: ConversionCommand::derive_id("w-42", direction, 0),
        direction,
        trigger: ConversionTrigger::BufferReplenishment,
        amount: Money::positive(Currency::Usd, Decimal::new(4_000_001, 2)).unwrap(),
        source_account: BufferAccount::SystemBufferFiat,
        destination_account: BufferAccount::SystemBufferUsdc,
        cycle_id: "w-42".into(),
        created_at: at(1_717_171_800_000),
    }
}

fn sample_posting() -> LedgerPosting {
    let line = |account: &str, side, currency, value| LedgerEntry {
        account: account.into(),
        side,
        amount: Money { currency, value },
        memo: format!("{account} line"),
    };
    LedgerPosting {
        posting_id: Uuid::from_u128(7),
        idempotency_key: Uuid::from_u128(8).to_string(),
        job_id: Uuid::from_u128(8),
        description: "1000 USDC -> 998.50 USD, fee 1.50 USD".into(),
        exchange_rate: Decimal::new(9_985_000_001, 10),
        entries: vec![
            line(
                "conversion_clearing_usdc",
                EntrySide::Debit,
                Currency::Usdc,
                Decimal::new(1000_000001, 6),
            ),
            line(
                "system_buffer_usdc",
                EntrySide::Credit,
                Currency::Usdc,
                Decimal::new(1000_000001, 6),
            ),
            line(
                "system_buffer_fiat",
                EntrySide::Debit,
                Currency::Usd,
                Decimal::new(99850, 2),
            ),
            line(
                "conversion_fees",
                EntrySide::Debit,
                Currency::Usd,
                Decimal::new(150, 2),
            ),
            line(
                "conversion_clearing_usd",
                EntrySide::Credit,
                Currency::Usd,
                Decimal::new(1000, 0),
            ),
        ],
        posted_at: at(1_717_171_900_123),
    }
}

fn sample_dead_letter() -> DeadLetter {
    DeadLetter {
        source_topic: "funding.events".into(),
        source_partition: 3,
        source_offset: 9_876_543_210,
        reason: "amount 1.001 USD has 3 decimal places".into(),
        error_kind: "validation".into(),
        original_key: Some(b"user-1".to_vec()),
        original_value: Some(vec![0, 0, 0, 0, 1, 0xde, 0xad]),
        rejected_at: at(1_717_172_000_000),
    }
}

fn sample_alert() -> BufferAlert {
    BufferAlert {
        alert_id: BufferAlert::derive_id(
            "window:2024-05-31T16:10:00Z",
            BufferAccount::SystemBufferUsdc,
        ),
        account: BufferAccount::SystemBufferUsdc,
        from: BufferStatus::Healthy,
        to: BufferStatus::CriticalLow,
        balance: Decimal::new(9_999_123_456, 6),
        thresholds: Thresholds::new(
            Decimal::new(10_000, 0),
            Decimal::new(50_000, 0),
            Decimal::new(100_000, 0),
        )
        .unwrap(),
        cycle_id: "window:2024-05-31T16:10:00Z".into(),
        window_start: at(1_717_171_800_000),
        window_end: at(1_717_172_100_000),
        occurred_at: at(1_717_172_100_000),
    }
}

#[test]
fn buffer_alert_round_trips_exactly() {
    let codec = Codec::default();
    let bytes = encode_buffer_alert(&codec, &sample_alert()).unwrap();
    let value = codec
        .decode_cached(&bytes, SchemaKind::BufferAlert)
        .unwrap();
    assert_eq!(buffer_alert_from_value(&value).unwrap(), sample_alert());
}

/// One valid framed message per schema, with the kind it was written as.
fn valid_messages(codec: &Codec) -> Vec<(SchemaKind, Vec<u8>)> {
    vec![
        (
            SchemaKind::FundingEvent,
            sample_flow()
                .encode(codec, SchemaKind::FundingEvent)
                .unwrap(),
        ),
        (
            SchemaKind::WithdrawalEvent,
            sample_flow()
                .encode(codec, SchemaKind::WithdrawalEvent)
                .unwrap(),
        ),
        (
            SchemaKind::ConversionCommand,
            encode_command(codec, &sample_command()).unwrap(),
        ),
        (
            SchemaKind::LedgerPosting,
            encode_posting(codec, &sample_posting()).unwrap(),
        ),
        (
            SchemaKind::DeadLetter,
            sample_dead_letter().encode(codec).unwrap(),
        ),
        (
            SchemaKind::BufferAlert,
            encode_buffer_alert(codec, &sample_alert()).unwrap(),
        ),
    ]
}

/// Reads a decoded value with the record function for `kind`; must not panic.
fn read_record(kind: SchemaKind, value: &Value) -> Result<(), CodecError> {
    match kind {
        SchemaKind::FundingEvent | SchemaKind::WithdrawalEvent => {
            FlowRecord::from_value(value).map(drop)
        }
        SchemaKind::ConversionCommand => command_from_value(value).map(drop),
        SchemaKind::LedgerPosting => posting_from_value(value).map(drop),
        SchemaKind::DeadLetter => DeadLetter::from_value(value).map(drop),
        SchemaKind::BufferAlert => buffer_alert_from_value(value).map(drop),
    }
}

// ------------------------------------------------------------------ schemas

#[test]
fn schemas_parse_have_distinct_ids_and_document_every_field() {
    let mut ids: Vec<u32> = SchemaKind::ALL.iter().map(|k| k.local_id()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), SchemaKind::ALL.len(), "local ids are distinct");
    for kind in SchemaKind::ALL {
        let parsed = Schema::parse_str(kind.source()).unwrap();
        assert_eq!(&parsed, kind.schema());
        let json: serde_json::Value = serde_json::from_str(kind.source()).unwrap();
        let mut stack = vec![&json];
        while let Some(node) = stack.pop() {
            if let Some(fields) = node.get("fields").and_then(|f| f.as_array()) {
                for field in fields {
                    assert!(
                        field.get("doc").and_then(|d| d.as_str()).is_some(),
                        "{kind:?}: field {} has no doc",
                        field["name"]
                    );
                    stack.push(&field["type"]);
                    if let Some(items) = field["type"].get("items") {
                        stack.push(items);
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------- round trips

#[tokio::test]
async fn every_schema_round_trips_through_the_wire_format() {
    let codec = Codec::default();

    for kind in [SchemaKind::FundingEvent, SchemaKind::WithdrawalEvent] {
        let record = sample_flow();
        let bytes = record.encode(&codec, kind).unwrap();
        let value = codec.decode(&bytes, kind).await.unwrap();
        let decoded = FlowRecord::from_value(&value).unwrap();
        assert_eq!(decoded, record);
        assert_exact(decoded.amount, record.amount);
    }

    let command = sample_command();
    let bytes = encode_command(&codec, &command).unwrap();
    let decoded = command_from_value(
        &codec
            .decode(&bytes, SchemaKind::ConversionCommand)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(decoded, command);
    assert_exact(decoded.amount.value, command.amount.value);

    let posting = sample_posting();
    let bytes = encode_posting(&codec, &posting).unwrap();
    let decoded = posting_from_value(
        &codec
            .decode(&bytes, SchemaKind::LedgerPosting)
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(decoded, posting);
    assert_exact(decoded.exchange_rate, posting.exchange_rate);
    for (d, p) in decoded.entries.iter().zip(&posting.entries) {
        assert_exact(d.amount.value, p.amount.value);
        assert_eq!(d.amount.currency, p.amount.currency);
    }
    assert_eq!(decoded.check_balanced(), Ok(()));

    for dead in [
        sample_dead_letter(),
        DeadLetter {
            original_key: None,
            original_value: None,
            ..sample_dead_letter()
        },
        DeadLetter {
            original_key: Some(vec![]),
            original_value: None,
            ..sample_dead_letter()
        },
    ] {
        let bytes = dead.encode(&codec).unwrap();
        let value = codec.decode(&bytes, SchemaKind::DeadLetter).await.unwrap();
        assert_eq!(DeadLetter::from_value(&value).unwrap(), dead);
    }
}

#[tokio::test]
async fn decode_and_decode_cached_agree() {
    let codec = Codec::default();
    for (kind, bytes) in valid_messages(&codec) {
        let fresh = Codec::default();
        let cached_first = fresh.decode_cached(&bytes, kind).unwrap();
        assert_eq!(codec.decode(&bytes, kind).await.unwrap(), cached_first);
        // Second decode hits the reader cache and still gives the same value.
        assert_eq!(fresh.decode_cached(&bytes, kind).unwrap(), cached_first);
    }
}

#[test]
fn header_is_magic_zero_then_the_local_id_big_endian() {
    let codec = Codec::default();
    for (kind, bytes) in valid_messages(&codec) {
        assert!(bytes.len() > wire::HEADER_LEN);
        assert_eq!(bytes[0], 0, "{kind:?}");
        assert_eq!(&bytes[1..5], &kind.local_id().to_be_bytes(), "{kind:?}");
        let (id, body) = wire::split(&bytes).unwrap();
        assert_eq!(id, kind.local_id());
        assert_eq!(wire::frame(id, body), bytes);
    }
    assert_eq!(
        wire::frame(0x0a0b_0c0d, &[9]),
        vec![0, 0x0a, 0x0b, 0x0c, 0x0d, 9]
    );
    assert_eq!(wire::frame(101, &[]), vec![0, 0, 0, 0, 101]);
}

/// Avro decimal bytes: minimal big-endian two's complement of the unscaled value.
fn avro_decimal_bytes(unscaled: i128) -> Vec<u8> {
    let bytes = unscaled.to_be_bytes();
    let mut start = 0;
    while start < 15 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        let redundant = (b == 0x00 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0);
        if !redundant {
            break;
        }
        start += 1;
    }
    bytes[start..].to_vec()
}

#[test]
fn decimals_are_written_as_unscaled_integers_at_the_schema_scale() {
    // Encode a funding event and decode its body with plain apache-avro: the
    // amount must be the unscaled value at scale 6 (12.5 → 12_500_000).
    let codec = Codec::default();
    let record = FlowRecord {
        amount: Decimal::new(125, 1),
        ..sample_flow()
    };
    let bytes = record.encode(&codec, SchemaKind::FundingEvent).unwrap();
    let mut body = &bytes[5..];
    let value = GenericDatumReader::builder(SchemaKind::FundingEvent.schema())
        .build()
        .unwrap()
        .read_value(&mut body)
        .unwrap();
    assert!(body.is_empty());
    let Value::Record(fields) = value else {
        panic!("not a record")
    };
    let amount = &fields.iter().find(|(k, _)| k == "amount").unwrap().1;
    let Value::Decimal(d) = amount else {
        panic!("amount is {amount:?}")
    };
    assert_eq!(
        Vec::<u8>::try_from(d).unwrap(),
        avro_decimal_bytes(12_500_000)
    );
}

// ------------------------------------------------------------ typed errors

#[tokio::test]
async fn unknown_schema_id_is_a_typed_error() {
    let codec = Codec::default();
    let body = &sample_flow()
        .encode(&codec, SchemaKind::FundingEvent)
        .unwrap()[5..];
    for id in [0u32, 7, 99, 101, 0xffff_ffff] {
        let bytes = wire::frame(id, body);
        for kind in SchemaKind::ALL {
            assert_eq!(
                codec.decode_cached(&bytes, kind),
                Err(CodecError::UnknownSchemaId(id))
            );
            assert_eq!(
                codec.decode(&bytes, kind).await,
                Err(CodecError::UnknownSchemaId(id))
            );
        }
    }
}

#[tokio::test]
async fn wrong_magic_byte_and_short_messages_are_framing_errors() {
    let codec = Codec::default();
    for (kind, bytes) in valid_messages(&codec) {
        for magic in [1u8, 0x7f, 0x80, 0xff] {
            let mut wrong = bytes.clone();
            wrong[0] = magic;
            assert_eq!(
                codec.decode_cached(&wrong, kind),
                Err(CodecError::Framing(FramingError::WrongMagic(magic)))
            );
            assert_eq!(
                codec.decode(&wrong, kind).await,
                Err(CodecError::Framing(FramingError::WrongMagic(magic)))
            );
        }
        for len in 0..wire::HEADER_LEN {
            assert_eq!(
                codec.decode_cached(&bytes[..len], kind),
                Err(CodecError::Framing(FramingError::TooShort(len)))
            );
        }
    }
}

#[tokio::test]
async fn every_truncation_of_a_body_is_a_corrupt_body() {
    let codec = Codec::default();
    for (kind, bytes) in valid_messages(&codec) {
        for len in wire::HEADER_LEN..bytes.len() {
            let result = codec.decode_cached(&bytes[..len], kind);
            assert!(
                matches!(&result, Err(CodecError::CorruptBody { id, .. }) if *id == kind.local_id()),
                "{kind:?} cut to {len} of {} bytes: {result:?}",
                bytes.len()
            );
            assert_eq!(codec.decode(&bytes[..len], kind).await, result);
        }
    }
}

#[test]
fn trailing_garbage_is_reported_with_its_length() {
    let codec = Codec::default();
    for (kind, bytes) in valid_messages(&codec) {
        for garbage in [&[0u8][..], &[1, 2, 3], &[0xff; 17]] {
            let mut longer = bytes.clone();
            longer.extend_from_slice(garbage);
            assert_eq!(
                codec.decode_cached(&longer, kind),
                Err(CodecError::TrailingBytes {
                    id: kind.local_id(),
                    trailing: garbage.len()
                })
            );
        }
    }
}

#[test]
fn decimals_that_do_not_fit_the_schema_are_refused_not_corrupted() {
    let codec = Codec::default();
    // More decimals than the wire scale: an error, not a rounded amount.
    let too_fine = FlowRecord {
        amount: Decimal::new(1, 7),
        ..sample_flow()
    };
    assert!(matches!(
        too_fine.encode(&codec, SchemaKind::FundingEvent),
        Err(CodecError::Field {
            field: "amount",
            ..
        })
    ));
    // 10^23 is a valid Decimal but needs 30 digits at scale 6 (the schema
    // allows precision 28): it must be refused or survive exactly.
    let huge = FlowRecord {
        amount: Decimal::from_i128_with_scale(10i128.pow(23), 0),
        ..sample_flow()
    };
    if let Ok(bytes) = huge.encode(&codec, SchemaKind::FundingEvent) {
        let decoded = FlowRecord::from_value(
            &codec
                .decode_cached(&bytes, SchemaKind::FundingEvent)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            decoded.amount, huge.amount,
            "encoded 10^23 without error but it decodes as {}",
            decoded.amount
        );
    }
}

#[test]
fn command_with_a_currency_that_is_not_the_source_is_a_field_error() {
    let codec = Codec::default();
    let mut command = sample_command();
    command.amount = Money::positive(Currency::Usdc, Decimal::new(1, 0)).unwrap();
    let bytes = encode_command(&codec, &command).unwrap();
    let value = codec
        .decode_cached(&bytes, SchemaKind::ConversionCommand)
        .unwrap();
    assert!(matches!(
        command_from_value(&value),
        Err(CodecError::Field {
            field: "currency",
            ..
        })
    ));
}

#[test]
fn a_value_that_does_not_match_the_schema_is_an_encode_error() {
    let codec = Codec::default();
    let result = codec.encode(
        SchemaKind::FundingEvent,
        Value::Record(vec![("event_id".into(), Value::Int(1))]),
    );
    assert!(matches!(
        result,
        Err(CodecError::Encode {
            kind: SchemaKind::FundingEvent,
            ..
        })
    ));
}

// ------------------------------------------------------------- properties

fn flow_record() -> impl Strategy<Value = FlowRecord> {
    (
        any::<u128>(),
        any::<u128>(),
        prop_oneof![
            Just("USD".to_string()),
            Just("USDC".to_string()),
            "\\PC{0,6}"
        ],
        // Anything within the schema's precision 28 at scale 6.
        -(10i128.pow(22) - 1)..10i128.pow(22),
        0u32..=6,
        -2_208_988_800_000i64..=4_102_444_800_000,
    )
        .prop_map(|(e, u, currency, mantissa, scale, ms)| FlowRecord {
            event_id: Uuid::from_u128(e),
            user_id: Uuid::from_u128(u),
            currency,
            amount: Decimal::from_i128_with_scale(mantissa, scale),
            occurred_at: at(ms),
        })
}

fn command() -> impl Strategy<Value = ConversionCommand> {
    (
        any::<u128>(),
        any::<bool>(),
        0usize..4,
        1i64..=1_000_000_000_000_000,
        0u32..=6,
        0usize..3,
        0usize..3,
        "\\PC{0,20}",
        0i64..=4_102_444_800_000,
    )
        .prop_map(|(id, usdc, trig, mantissa, scale, src, dst, cycle, ms)| {
            let direction = if usdc {
                ConversionDirection::UsdcToUsd
            } else {
                ConversionDirection::UsdToUsdc
            };
            let currency = direction.source_currency();
            ConversionCommand {
                command_id: Uuid::from_u128(id),
                direction,
                trigger: [
                    ConversionTrigger::BufferReplenishment,
                    ConversionTrigger::ScheduledRebalance,
                    ConversionTrigger::Manual,
                    ConversionTrigger::Emergency,
                ][trig],
                amount: Money::positive(
                    currency,
                    Decimal::new(mantissa, scale.min(currency.scale())),
                )
                .unwrap(),
                source_account: BufferAccount::ALL[src],
                destination_account: BufferAccount::ALL[dst],
                cycle_id: cycle,
                created_at: at(ms),
            }
        })
}

fn ledger_entry() -> impl Strategy<Value = LedgerEntry> {
    (
        "[a-z_]{1,24}",
        any::<bool>(),
        any::<bool>(),
        1i64..=1_000_000_000_000_000,
        0u32..=6,
        "\\PC{0,16}",
    )
        .prop_map(|(account, debit, usdc, mantissa, scale, memo)| {
            let currency = if usdc { Currency::Usdc } else { Currency::Usd };
            LedgerEntry {
                account,
                side: if debit {
                    EntrySide::Debit
                } else {
                    EntrySide::Credit
                },
                amount: Money::positive(
                    currency,
                    Decimal::new(mantissa, scale.min(currency.scale())),
                )
                .unwrap(),
                memo,
            }
        })
}

fn posting() -> impl Strategy<Value = LedgerPosting> {
    (
        any::<u128>(),
        any::<u128>(),
        "\\PC{0,16}",
        1i64..=100_000_000_000_000,
        0u32..=10,
        prop::collection::vec(ledger_entry(), 0..8),
        0i64..=4_102_444_800_000,
    )
        .prop_map(
            |(pid, jid, description, rate, rate_scale, entries, ms)| LedgerPosting {
                posting_id: Uuid::from_u128(pid),
                idempotency_key: Uuid::from_u128(jid).to_string(),
                job_id: Uuid::from_u128(jid),
                description,
                exchange_rate: Decimal::new(rate, rate_scale),
                entries,
                posted_at: at(ms),
            },
        )
}

fn dead_letter() -> impl Strategy<Value = DeadLetter> {
    (
        "[a-z.\\-_]{1,30}",
        any::<i32>(),
        any::<i64>(),
        "\\PC{0,40}",
        "[a-z_]{0,12}",
        prop::option::of(prop::collection::vec(any::<u8>(), 0..32)),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
        0i64..=4_102_444_800_000,
    )
        .prop_map(
            |(topic, partition, offset, reason, kind, key, value, ms)| DeadLetter {
                source_topic: topic,
                source_partition: partition,
                source_offset: offset,
                reason,
                error_kind: kind,
                original_key: key,
                original_value: value,
                rejected_at: at(ms),
            },
        )
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn flow_records_round_trip_exactly(record in flow_record(), withdrawal in any::<bool>()) {
        let codec = Codec::default();
        let kind = if withdrawal { SchemaKind::WithdrawalEvent } else { SchemaKind::FundingEvent };
        let bytes = record.encode(&codec, kind).unwrap();
        let mut header = vec![0u8];
        header.extend_from_slice(&kind.local_id().to_be_bytes());
        prop_assert_eq!(&bytes[..5], &header[..]);
        let decoded = FlowRecord::from_value(&codec.decode_cached(&bytes, kind).unwrap()).unwrap();
        prop_assert_eq!(decoded.amount.to_string(), record.amount.normalize().to_string());
        prop_assert_eq!(decoded, record);
    }

    #[test]
    fn any_decimal_either_round_trips_or_is_refused(
        mantissa in -((1i128 << 96) - 1)..=((1i128 << 96) - 1),
        scale in 0u32..=28,
    ) {
        let codec = Codec::default();
        let record = FlowRecord { amount: Decimal::from_i128_with_scale(mantissa, scale), ..sample_flow() };
        if let Ok(bytes) = record.encode(&codec, SchemaKind::FundingEvent) {
            let decoded = FlowRecord::from_value(&codec.decode_cached(&bytes, SchemaKind::FundingEvent).unwrap()).unwrap();
            prop_assert_eq!(decoded.amount, record.amount, "encoded without error but decoded differently");
        }
    }

    #[test]
    fn commands_round_trip_exactly(command in command()) {
        let codec = Codec::default();
        let bytes = encode_command(&codec, &command).unwrap();
        let decoded = command_from_value(&codec.decode_cached(&bytes, SchemaKind::ConversionCommand).unwrap()).unwrap();
        prop_assert_eq!(decoded.amount.value.to_string(), command.amount.value.normalize().to_string());
        prop_assert_eq!(decoded, command);
    }

    #[test]
    fn postings_round_trip_exactly(posting in posting()) {
        let codec = Codec::default();
        let bytes = encode_posting(&codec, &posting).unwrap();
        let decoded = posting_from_value(&codec.decode_cached(&bytes, SchemaKind::LedgerPosting).unwrap()).unwrap();
        prop_assert_eq!(decoded.exchange_rate.to_string(), posting.exchange_rate.normalize().to_string());
        for (d, p) in decoded.entries.iter().zip(&posting.entries) {
            prop_assert_eq!(d.amount.value.to_string(), p.amount.value.normalize().to_string());
        }
        prop_assert_eq!(decoded, posting);
    }

    #[test]
    fn dead_letters_round_trip_byte_for_byte(dead in dead_letter()) {
        let codec = Codec::default();
        let bytes = dead.encode(&codec).unwrap();
        let decoded = DeadLetter::from_value(&codec.decode_cached(&bytes, SchemaKind::DeadLetter).unwrap()).unwrap();
        prop_assert_eq!(decoded, dead);
    }
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..96)) {
        let codec = Codec::default();
        for kind in SchemaKind::ALL {
            if let Ok(value) = codec.decode_cached(&bytes, kind) {
                let _ = read_record(kind, &value);
            }
        }
    }

    #[test]
    fn arbitrary_bodies_after_a_valid_header_never_panic(
        id_choice in 0usize..7,
        body in prop::collection::vec(any::<u8>(), 0..128),
    ) {
        let codec = Codec::default();
        let id = match id_choice {
            5 => 0,
            6 => 77,
            n => SchemaKind::ALL[n].local_id(),
        };
        let bytes = wire::frame(id, &body);
        for kind in SchemaKind::ALL {
            match codec.decode_cached(&bytes, kind) {
                Ok(value) => { let _ = read_record(kind, &value); }
                Err(CodecError::Framing(e)) => prop_assert!(false, "valid header refused: {}", e),
                Err(_) => {}
            }
        }
    }

    #[test]
    fn mutated_valid_messages_never_panic(
        which in 0usize..5,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
    ) {
        let codec = Codec::default();
        let (written_as, mut bytes) = valid_messages(&codec).swap_remove(which);
        for (pos, byte, op) in edits {
            let i = wire::HEADER_LEN + pos.index(bytes.len() - wire::HEADER_LEN + 1);
            match op {
                0 if i < bytes.len() => bytes[i] = byte,
                1 => bytes.insert(i, byte),
                _ if i < bytes.len() => { bytes.remove(i); }
                _ => bytes.push(byte),
            }
        }
        for kind in SchemaKind::ALL {
            if let Ok(value) = codec.decode_cached(&bytes, kind) {
                let _ = read_record(kind, &value);
            }
        }
        let _ = written_as;
    }
}

// ---------------------------------------------------------- schema evolution

/// The funding schema with an optional `channel` field appended (or, with
/// `in_the_middle`, inserted before `amount`).
fn funding_v2(in_the_middle: bool) -> Schema {
    Schema::parse_str(&funding_v2_json(in_the_middle)).unwrap()
}

fn funding_v2_json(in_the_middle: bool) -> String {
    let mut json: serde_json::Value =
        serde_json::from_str(SchemaKind::FundingEvent.source()).unwrap();
    let channel = serde_json::json!({
        "name": "channel",
        "type": ["null", "string"],
        "default": null,
        "doc": "Where the deposit came from (added in v2)."
    });
    let fields = json["fields"].as_array_mut().unwrap();
    if in_the_middle {
        let pos = fields.iter().position(|f| f["name"] == "amount").unwrap();
        fields.insert(pos, channel);
    } else {
        fields.push(channel);
    }
    json.to_string()
}

/// How the hand-built record writes its decimal bytes.
#[derive(Clone, Copy, Debug)]
enum DecimalBytes {
    /// Shortest two's complement, as Java's `BigInteger.toByteArray()` and
    /// every Confluent producer write it.
    Minimal,
    /// Sign-extended to 16 bytes (also valid Avro).
    SignExtended,
}

/// A v2 funding record built by hand, in the writer schema's field order.
fn v2_value(
    record: &FlowRecord,
    channel: Option<&str>,
    in_the_middle: bool,
    decimal: DecimalBytes,
) -> Value {
    let channel = (
        "channel".to_string(),
        match channel {
            Some(c) => Value::Union(1, Box::new(Value::String(c.into()))),
            None => Value::Union(0, Box::new(Value::Null)),
        },
    );
    let unscaled = {
        let mut d = record.amount;
        d.rescale(6);
        assert_eq!(d.scale(), 6);
        d.mantissa()
    };
    let amount_bytes = match decimal {
        DecimalBytes::Minimal => avro_decimal_bytes(unscaled),
        DecimalBytes::SignExtended => unscaled.to_be_bytes().to_vec(),
    };
    let mut fields = vec![
        ("event_id".to_string(), Value::Uuid(record.event_id)),
        ("user_id".to_string(), Value::Uuid(record.user_id)),
        (
            "currency".to_string(),
            Value::String(record.currency.clone()),
        ),
        (
            "amount".to_string(),
            Value::Decimal(apache_avro::Decimal::from(amount_bytes)),
        ),
        (
            "occurred_at".to_string(),
            Value::TimestampMillis(record.occurred_at.timestamp_millis()),
        ),
    ];
    if in_the_middle {
        fields.insert(3, channel);
    } else {
        fields.push(channel);
    }
    Value::Record(fields)
}

/// Writes a v2 record under `id` and checks it decodes as the funding event.
async fn check_v2_decodes(id: u32, in_the_middle: bool, decimal: DecimalBytes) {
    let v2 = funding_v2(in_the_middle);
    let source = SchemaSource::embedded();
    source.register(id, v2.clone());
    let codec = Codec::new(source);

    for channel in [Some("mobile"), None] {
        let record = FlowRecord {
            amount: Decimal::new(-987_654_321, 4),
            ..sample_flow()
        };
        let body = GenericDatumWriter::builder(&v2)
            .build()
            .unwrap()
            .write_value_to_vec(v2_value(&record, channel, in_the_middle, decimal))
            .unwrap();
        let bytes = wire::frame(id, &body);
        assert_eq!(&bytes[..5], &[0, 0, 0, 0, id as u8]);

        let value = codec
            .decode(&bytes, SchemaKind::FundingEvent)
            .await
            .unwrap_or_else(|e| {
                panic!("v2 (id {id}, {decimal:?} decimal, channel {channel:?}): {e}")
            });
        let Value::Record(fields) = &value else {
            panic!("not a record: {value:?}")
        };
        let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["event_id", "user_id", "currency", "amount", "occurred_at"],
            "read with the reader's fields only"
        );
        let decoded = FlowRecord::from_value(&value).unwrap();
        assert_eq!(decoded, record, "id {id}, channel {channel:?}");
        assert_exact(decoded.amount, record.amount);
        assert_eq!(
            codec.decode_cached(&bytes, SchemaKind::FundingEvent),
            Ok(value)
        );
    }
}

#[tokio::test]
async fn a_writer_with_a_new_optional_field_decodes_as_the_funding_event() {
    // As a Confluent producer would write it: shortest decimal bytes.
    check_v2_decodes(101, false, DecimalBytes::Minimal).await;
    check_v2_decodes(102, true, DecimalBytes::Minimal).await;
}

#[tokio::test]
async fn a_writer_with_a_new_optional_field_and_wide_decimals_decodes() {
    // The same evolution with 16-byte decimals: isolates schema resolution
    // from the decimal length.
    check_v2_decodes(111, false, DecimalBytes::SignExtended).await;
    check_v2_decodes(112, true, DecimalBytes::SignExtended).await;
}

#[tokio::test]
async fn the_same_schema_under_another_id_decodes() {
    // What a Schema Registry gives: the funding schema, unchanged, under its
    // own id. The engine's own encoding of a 12,345.678901 USDC deposit must read back.
    let source = SchemaSource::embedded();
    source.register(
        104,
        Schema::parse_str(SchemaKind::FundingEvent.source()).unwrap(),
    );
    let codec = Codec::new(source);
    let record = sample_flow();
    let local = record.encode(&codec, SchemaKind::FundingEvent).unwrap();
    let bytes = wire::frame(104, &local[5..]);
    let result = codec.decode(&bytes, SchemaKind::FundingEvent).await;
    let decoded = FlowRecord::from_value(&result.unwrap()).unwrap();
    assert_eq!(decoded, record);
}

#[tokio::test]
async fn a_writer_missing_a_required_field_is_a_typed_error() {
    let mut json: serde_json::Value =
        serde_json::from_str(SchemaKind::FundingEvent.source()).unwrap();
    json["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "occurred_at");
    let writer = Schema::parse_str(&json.to_string()).unwrap();
    let source = SchemaSource::embedded();
    source.register(103, writer.clone());
    let codec = Codec::new(source);
    let body = GenericDatumWriter::builder(&writer)
        .build()
        .unwrap()
        .write_value_to_vec(Value::Record(vec![
            ("event_id".into(), Value::Uuid(Uuid::from_u128(1))),
            ("user_id".into(), Value::Uuid(Uuid::from_u128(2))),
            ("currency".into(), Value::String("USD".into())),
            (
                "amount".into(),
                Value::Decimal(apache_avro::Decimal::from(avro_decimal_bytes(1_000_000))),
            ),
        ]))
        .unwrap();
    let result = codec
        .decode(&wire::frame(103, &body), SchemaKind::FundingEvent)
        .await;
    assert!(
        matches!(
            &result,
            Err(CodecError::Incompatible {
                id: 103,
                reader: SchemaKind::FundingEvent,
                ..
            }) | Err(CodecError::CorruptBody { id: 103, .. })
        ),
        "{result:?}"
    );
}

// ----------------------------------------------------------- schema registry

#[tokio::test]
async fn registry_schemas_are_fetched_once_and_missing_ids_and_outages_are_typed() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    let server = MockServer::start().await;
    // The registry knows the funding schema, unchanged, as id 201.
    Mock::given(method("GET"))
        .and(path("/schemas/ids/201"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(serde_json::json!({ "schema": SchemaKind::FundingEvent.source() })),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/schemas/ids/202"))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/schemas/ids/203"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&server)
        .await;

    let client = treasury::codec::RegistryClient::new(&treasury::codec::RegistrySettings::new(
        &server.uri(),
    ))
    .unwrap();
    let codec = Codec::new(SchemaSource::with_registry(
        client,
        treasury::codec::SubjectNameStrategy::TopicNameStrategy,
        true,
    ));
    let record = sample_flow();
    let local = record
        .encode(&Codec::default(), SchemaKind::FundingEvent)
        .unwrap();
    let body = &local[5..];
    let bytes = wire::frame(201, body);
    assert_eq!(
        codec.decode_cached(&bytes, SchemaKind::FundingEvent),
        Err(CodecError::UnknownSchemaId(201)),
        "decode_cached does no IO"
    );
    assert_eq!(
        codec
            .decode(&wire::frame(202, body), SchemaKind::FundingEvent)
            .await,
        Err(CodecError::UnknownSchemaId(202))
    );
    let outage = codec
        .decode(&wire::frame(203, body), SchemaKind::FundingEvent)
        .await;
    assert!(
        matches!(&outage, Err(e @ CodecError::RegistryUnavailable(_)) if e.is_transient()),
        "a registry error is an outage, not a bad message: {outage:?}"
    );
    // With a registry, the local ids mean nothing: id 1 is asked there too
    // (no mock answers it, so it is not a schema the registry knows).
    assert!(
        codec
            .decode(&local, SchemaKind::FundingEvent)
            .await
            .is_err()
    );

    let mut results = Vec::new();
    for _ in 0..3 {
        results.push(codec.decode(&bytes, SchemaKind::FundingEvent).await);
    }
    server.verify().await; // id 201 was fetched exactly once
    for result in results {
        let value = result.expect("a message written with the registry's funding schema");
        assert_eq!(FlowRecord::from_value(&value).unwrap(), record);
    }
}
