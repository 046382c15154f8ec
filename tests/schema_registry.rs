//! The Schema Registry is the authority when configured: input ids are
//! resolved there (never by the engine's local ids), the engine registers
//! its output schemas and writes the registry's ids, and a registry outage
//! dead-letters nothing. Against a registry-compatible server whose ids 1..6
//! (every local id) hold other teams' schemas, the real broker and PostgreSQL.

mod common;
#[path = "common/registry.rs"]
mod registry;

use std::time::Duration;

use apache_avro::types::Value;
use chrono::TimeZone;
use registry::TestRegistry;
use rust_decimal::Decimal;
use sqlx::PgPool;
use treasury::alerts::BufferAlert;
use treasury::codec::alert::{buffer_alert_from_value, encode_buffer_alert};
use treasury::codec::records::{DeadLetter, FlowRecord, encode_command};
use treasury::codec::{Codec, CodecError, SchemaKind, wire};
use treasury::config::{Config, Topics};
use treasury::domain::{
    BufferAccount, BufferStatus, ConversionCommand, ConversionDirection, ConversionTrigger,
    Currency, Money, Thresholds,
};
use treasury::ingest::{Ingest, IngestSettings};
use treasury::window::WindowSpec;

fn config(registry: &TestRegistry, topics: &Topics, extra: &[(&str, &str)]) -> Config {
    let mut vars = vec![
        ("SCHEMA_REGISTRY_URL".to_owned(), registry.url.clone()),
        ("TREASURY_TOPIC_FUNDING".to_owned(), topics.funding.clone()),
        (
            "TREASURY_TOPIC_WITHDRAWALS".to_owned(),
            topics.withdrawals.clone(),
        ),
        (
            "TREASURY_TOPIC_COMMANDS".to_owned(),
            topics.commands.clone(),
        ),
        (
            "TREASURY_TOPIC_POSTINGS".to_owned(),
            topics.postings.clone(),
        ),
        ("TREASURY_TOPIC_DLQ".to_owned(), topics.dlq.clone()),
        (
            "TREASURY_TOPIC_BUFFER_ALERTS".to_owned(),
            topics.buffer_alerts.clone(),
        ),
    ];
    vars.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Config::from_vars(vars).expect("config")
}

/// Decodes a framed output the way any Confluent consumer does: the schema
/// for the id in the frame, from the registry.
fn read_through_registry(registry: &TestRegistry, bytes: &[u8]) -> (u32, Value) {
    let (id, mut body) = wire::split(bytes).expect("wire format");
    let text = registry.schema(id).expect("the registry knows the id");
    let schema = apache_avro::Schema::parse_str(&text).expect("registry schema");
    let value = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
        .build()
        .expect("reader")
        .read_value(&mut body)
        .expect("decodes");
    assert!(body.is_empty(), "no bytes left over");
    (id, value)
}

fn field<'a>(value: &'a Value, name: &str) -> &'a Value {
    let Value::Record(fields) = value else {
        panic!("not a record: {value:?}")
    };
    &fields.iter().find(|(k, _)| k == name).expect(name).1
}

fn flow(i: u128) -> FlowRecord {
    FlowRecord {
        event_id: uuid::Uuid::from_u128(0xfeed_0000 + i),
        user_id: uuid::Uuid::from_u128(0xbeef),
        currency: "USDC".into(),
        amount: Decimal::new(1_000_000 + i as i64, 6),
        occurred_at: chrono::Utc.with_ymd_and_hms(2026, 1, 5, 9, 0, 0).unwrap()
            + chrono::Duration::seconds(i as i64),
    }
}

/// A producer's message: the body our schema writes, framed with `id`.
fn framed(record: &FlowRecord, kind: SchemaKind, id: u32) -> Vec<u8> {
    let local = record.encode(&Codec::default(), kind).expect("encodes");
    wire::frame(id, &local[wire::HEADER_LEN..])
}

async fn produce_raw(brokers: &str, topic: &str, payloads: &[Vec<u8>]) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer =
        treasury::kafka::idempotent_producer(&common::base(brokers)).expect("producer");
    for payload in payloads {
        producer
            .send(
                FutureRecord::<str, _>::to(topic).payload(payload),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }
}

async fn dead_letters_queued(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE topic LIKE '%.dlq.%'")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[sqlx::test]
async fn registry_ids_are_read_and_written_and_an_outage_dead_letters_nothing(pool: PgPool) {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("registry");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 2).await;
    let registry = TestRegistry::start().await;
    // A third-party producer registered the engine's input schemas.
    let funding_id = registry.add(
        &format!("{}-value", topics.funding),
        SchemaKind::FundingEvent.source(),
    );
    let withdrawal_id = registry.add(
        &format!("{}-value", topics.withdrawals),
        SchemaKind::WithdrawalEvent.source(),
    );
    assert!(funding_id > 6 && withdrawal_id > 6);

    let config = config(&registry, &topics, &[]);
    let codec = treasury::runtime::codec_for(&config).expect("codec");
    let (_trigger, mut listener) = treasury::shutdown::channel();
    let registered = treasury::runtime::register_outputs(&codec, &config, &mut listener)
        .await
        .expect("outputs registered");
    for r in &registered {
        eprintln!(
            "registered {:?} as subject {} id {}",
            r.kind, r.subject, r.id
        );
    }
    let subjects = registry.subjects();
    for (kind, topic) in treasury::runtime::outputs(&config) {
        let r = registered
            .iter()
            .find(|r| r.kind == kind)
            .expect("registered");
        assert_eq!(r.subject, format!("{topic}-value"), "TopicNameStrategy");
        assert_eq!(subjects.get(&r.subject), Some(&r.id));
        assert!(r.id > 6, "{kind:?} got id {}, not a local id", r.id);
    }

    // The registry is down while events arrive: 10 deposits and 10
    // withdrawals under the registry's ids, and one message framed with the
    // engine's local FundingEvent id 1, which this registry gives to another
    // team's schema.
    registry.set_down(true);
    let deposits: Vec<Vec<u8>> = (0..10)
        .map(|i| framed(&flow(i), SchemaKind::FundingEvent, funding_id))
        .chain(std::iter::once(framed(
            &flow(99),
            SchemaKind::FundingEvent,
            SchemaKind::FundingEvent.local_id(),
        )))
        .collect();
    let withdrawals: Vec<Vec<u8>> = (10..20)
        .map(|i| framed(&flow(i), SchemaKind::WithdrawalEvent, withdrawal_id))
        .collect();
    produce_raw(&brokers, &topics.funding, &deposits).await;
    produce_raw(&brokers, &topics.withdrawals, &withdrawals).await;

    let store = common::pg_store(&pool);
    let (stop, listener) = treasury::shutdown::channel();
    let ingest = Ingest::new(
        &treasury::kafka::consumer_config(&base, "registry"),
        store.clone(),
        codec.clone(),
        treasury::clock::SystemClock::shared(),
        IngestSettings {
            group: "registry".into(),
            funding_topic: topics.funding.clone(),
            withdrawal_topic: topics.withdrawals.clone(),
            dlq_topic: topics.dlq.clone(),
            spec: WindowSpec::new(Duration::from_secs(300), Duration::from_secs(30)),
            batch_size: 100,
            batch_max_wait: Duration::from_millis(50),
        },
    )
    .expect("ingest");
    let task = tokio::spawn(ingest.run(listener));
    let relay = treasury::relay::Relay::new(
        store,
        treasury::kafka::idempotent_producer(&base).expect("producer"),
    );
    let (relay_stop, relay_listener) = treasury::shutdown::channel();
    let relay_task = tokio::spawn(relay.run(relay_listener, Duration::from_millis(50)));

    let asked = common::wait_until(Duration::from_secs(30), || async {
        registry
            .requests()
            .iter()
            .any(|r| r.starts_with("GET /schemas/ids/"))
    })
    .await;
    assert!(asked, "ingest asked the registry");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        common::counted(&pool).await,
        0,
        "nothing counted while down"
    );
    assert_eq!(
        dead_letters_queued(&pool).await,
        0,
        "nothing dead-lettered while the registry is down"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM consumer_offsets")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "no offset committed past the held messages");

    registry.set_down(false);
    let all = common::wait_until(Duration::from_secs(60), || async {
        common::counted(&pool).await == 20 && dead_letters_queued(&pool).await == 1
    })
    .await;
    let dlq = common::read_all(&brokers, &topics.dlq, 1).await;
    stop.trigger();
    let totals = task.await.unwrap().expect("ingest ends cleanly");
    relay_stop.trigger();
    relay_task.await.unwrap();
    assert!(
        all,
        "counted {} of 20, {} dead letters",
        common::counted(&pool).await,
        dead_letters_queued(&pool).await
    );
    assert_eq!(totals.counted, 20, "each event counted once");
    assert_eq!(totals.rejected, 1);

    // The dead letter is framed with the registry's DLQ id and reads back
    // through the registry like any Confluent consumer would read it.
    assert_eq!(dlq.len(), 1);
    let dlq_id = registered
        .iter()
        .find(|r| r.kind == SchemaKind::DeadLetter)
        .unwrap()
        .id;
    let (id, value) = read_through_registry(&registry, &dlq[0].0);
    assert_eq!(id, dlq_id);
    assert_eq!(
        field(&value, "source_topic"),
        &Value::String(topics.funding.clone())
    );
    let record = DeadLetter::from_value(&value).expect("a DLQ record");
    assert_eq!(record.original_value.as_deref(), Some(&deposits[10][..]));
    assert!(
        record.reason.contains("cannot be read"),
        "the local id was resolved at the registry: {}",
        record.reason
    );

    // Commands are written with the registry's id too.
    let direction = ConversionDirection::UsdToUsdc;
    let command = ConversionCommand {
        command_id: ConversionCommand::derive_id("w-1", direction, 0),
        direction,
        trigger: ConversionTrigger::BufferReplenishment,
        amount: Money::positive(Currency::Usd, Decimal::new(4_000_001, 2)).unwrap(),
        source_account: BufferAccount::SystemBufferFiat,
        destination_account: BufferAccount::SystemBufferUsdc,
        cycle_id: "w-1".into(),
        created_at: chrono::Utc::now(),
    };
    let bytes = encode_command(&codec, &command).unwrap();
    let (id, value) = read_through_registry(&registry, &bytes);
    assert_eq!(
        id,
        registered
            .iter()
            .find(|r| r.kind == SchemaKind::ConversionCommand)
            .unwrap()
            .id
    );
    assert_eq!(
        field(&value, "cycle_id"),
        &Value::String("w-1".into()),
        "a registry-aware consumer reads the command"
    );

    // And buffer alerts, under the subject of their own topic.
    let window_start = chrono::Utc.with_ymd_and_hms(2026, 1, 5, 9, 0, 0).unwrap();
    let alert = BufferAlert {
        alert_id: BufferAlert::derive_id("w-1", BufferAccount::SystemBufferUsdc),
        account: BufferAccount::SystemBufferUsdc,
        from: BufferStatus::Healthy,
        to: BufferStatus::CriticalLow,
        balance: Decimal::new(1_000, 0),
        thresholds: Thresholds::new(
            Decimal::new(10_000, 0),
            Decimal::new(50_000, 0),
            Decimal::new(100_000, 0),
        )
        .unwrap(),
        cycle_id: "w-1".into(),
        window_start,
        window_end: window_start + chrono::Duration::minutes(5),
        occurred_at: window_start + chrono::Duration::minutes(5),
    };
    let alert_output = registered
        .iter()
        .find(|r| r.kind == SchemaKind::BufferAlert)
        .expect("buffer alerts registered");
    assert_eq!(
        alert_output.subject,
        format!("{}-value", topics.buffer_alerts)
    );
    let bytes = encode_buffer_alert(&codec, &alert).unwrap();
    let (id, value) = read_through_registry(&registry, &bytes);
    assert_eq!(id, alert_output.id);
    assert_eq!(
        buffer_alert_from_value(&value).expect("a buffer alert"),
        alert,
        "a registry-aware consumer reads the alert"
    );
}

#[tokio::test]
async fn subjects_follow_the_strategy_lookups_never_register_and_credentials_are_sent() {
    let registry = TestRegistry::start().await;
    registry.require_auth("svc:s3cret");
    let topics = common::unique_topics("subjects");

    // Wrong credentials: the registry refuses; that is an outage, not a bad message.
    let wrong = config(
        &registry,
        &topics,
        &[("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "svc:wrong")],
    );
    let codec = treasury::runtime::codec_for(&wrong).unwrap();
    let refused = codec
        .source()
        .register_outputs(&treasury::runtime::outputs(&wrong))
        .await;
    assert!(
        matches!(&refused, Err(e) if e.is_transient()),
        "{refused:?}"
    );

    // Lookup only, by record name: not there yet → a final error naming the cure.
    let lookup = config(
        &registry,
        &topics,
        &[
            ("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "svc:s3cret"),
            ("SCHEMA_REGISTRY_AUTO_REGISTER", "false"),
            (
                "SCHEMA_REGISTRY_SUBJECT_NAME_STRATEGY",
                "io.confluent.kafka.serializers.subject.RecordNameStrategy",
            ),
        ],
    );
    let codec = treasury::runtime::codec_for(&lookup).unwrap();
    let missing = codec
        .source()
        .register_outputs(&treasury::runtime::outputs(&lookup))
        .await;
    match &missing {
        Err(e @ CodecError::Registry(reason)) => {
            assert!(!e.is_transient());
            assert!(reason.contains("SCHEMA_REGISTRY_AUTO_REGISTER"), "{reason}");
        }
        other => panic!("expected a final registry error, got {other:?}"),
    }
    assert!(
        registry
            .subjects()
            .keys()
            .all(|s| s.starts_with("foreign-")),
        "a lookup registers nothing"
    );
    let mut ids = Vec::new();
    for kind in [
        SchemaKind::ConversionCommand,
        SchemaKind::LedgerPosting,
        SchemaKind::DeadLetter,
        SchemaKind::BufferAlert,
    ] {
        ids.push(registry.add(&kind.full_name(), kind.source()));
    }
    let found = codec
        .source()
        .register_outputs(&treasury::runtime::outputs(&lookup))
        .await
        .expect("found by lookup");
    assert_eq!(
        found.iter().map(|r| r.id).collect::<Vec<_>>(),
        ids,
        "the ids the registry holds"
    );
    assert_eq!(found[0].subject, "io.treasury.v1.ConversionCommand");

    // TopicRecordNameStrategy, registering.
    let topic_record = config(
        &registry,
        &topics,
        &[
            ("SCHEMA_REGISTRY_BASIC_AUTH_USER_INFO", "svc:s3cret"),
            (
                "SCHEMA_REGISTRY_SUBJECT_NAME_STRATEGY",
                "TopicRecordNameStrategy",
            ),
        ],
    );
    let codec = treasury::runtime::codec_for(&topic_record).unwrap();
    let registered = codec
        .source()
        .register_outputs(&treasury::runtime::outputs(&topic_record))
        .await
        .unwrap();
    assert_eq!(
        registered[2].subject,
        format!("{}-io.treasury.v1.DeadLetter", topics.dlq)
    );
    assert_eq!(registered[2].id, ids[2], "same schema, same id");
    assert_eq!(
        registry.subjects().get(&registered[2].subject),
        Some(&ids[2])
    );

    // Nothing listening: unavailable, retried.
    let closed = treasury::codec::RegistryClient::new(&treasury::codec::RegistrySettings::new(
        "http://127.0.0.1:9",
    ))
    .unwrap();
    assert!(closed.schema_by_id(101).await.unwrap_err().is_transient());
}

#[test]
fn a_missing_tls_file_fails_at_start_naming_the_setting() {
    let mut settings = treasury::codec::RegistrySettings::new("https://registry.internal");
    settings.ssl_ca_location = Some("/nonexistent/ca.pem".into());
    let error = treasury::codec::RegistryClient::new(&settings)
        .err()
        .expect("refused");
    assert!(
        error
            .to_string()
            .contains("SCHEMA_REGISTRY_SSL_CA_LOCATION"),
        "{error}"
    );
}

#[sqlx::test]
async fn the_command_intake_holds_commands_while_the_registry_is_down(pool: PgPool) {
    use treasury::executor::Intake;
    use treasury::executor::intake::IntakeSettings;
    use treasury::store::jobs::JobStore;

    let Some(brokers) = common::brokers() else {
        return;
    };
    let topics = common::unique_topics("intake_registry");
    let base = common::base(&brokers);
    common::create_topics(&base, &topics, 1).await;
    let registry = TestRegistry::start().await;
    let config = config(&registry, &topics, &[]);
    // The aggregator registered the command schema and wrote a command.
    let writer = treasury::runtime::codec_for(&config).unwrap();
    let (_trigger, mut listener) = treasury::shutdown::channel();
    treasury::runtime::register_outputs(&writer, &config, &mut listener)
        .await
        .unwrap();
    let direction = ConversionDirection::UsdcToUsd;
    let command = ConversionCommand {
        command_id: ConversionCommand::derive_id("w-7", direction, 0),
        direction,
        trigger: ConversionTrigger::BufferReplenishment,
        amount: Money::positive(Currency::Usdc, Decimal::new(25_000, 0)).unwrap(),
        source_account: BufferAccount::SystemBufferUsdc,
        destination_account: BufferAccount::SystemBufferFiat,
        cycle_id: "w-7".into(),
        created_at: chrono::Utc::now(),
    };
    produce_raw(
        &brokers,
        &topics.commands,
        &[encode_command(&writer, &command).unwrap()],
    )
    .await;

    // The executor starts while the registry is down.
    registry.set_down(true);
    let store = common::pg_store(&pool);
    let jobs: std::sync::Arc<dyn JobStore> =
        std::sync::Arc::new(treasury::store::postgres::PgStore::from_pool(pool.clone()));
    let mut intake = Intake::new(
        &treasury::kafka::consumer_config(&base, "intake-registry"),
        store,
        jobs,
        treasury::runtime::codec_for(&config).unwrap(),
        treasury::clock::SystemClock::shared(),
        IntakeSettings {
            group: "intake-registry".into(),
            commands_topic: topics.commands.clone(),
            dlq_topic: topics.dlq.clone(),
            batch_size: 100,
            batch_max_wait: Duration::from_millis(100),
        },
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut held = 0;
    while held < 3 && tokio::time::Instant::now() < deadline {
        match intake.step().await {
            Err(e) => {
                assert!(e.is_transient(), "{e}");
                held += 1;
            }
            Ok(created) => assert!(created.is_empty()),
        }
    }
    assert_eq!(held, 3, "the command was read and held, three times");
    assert_eq!(dead_letters_queued(&pool).await, 0, "nothing dead-lettered");

    registry.set_down(false);
    let mut created = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while created.is_empty() && tokio::time::Instant::now() < deadline {
        created.extend(intake.step().await.expect("registry is back"));
    }
    assert_eq!(
        created.len(),
        1,
        "one job for the command once the registry is back"
    );
    assert_eq!(dead_letters_queued(&pool).await, 0);
}
