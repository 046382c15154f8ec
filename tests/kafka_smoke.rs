//! The broker `.ci/run` starts is a working Kafka: a message produced with the
//! engine's idempotent producer comes back through a consumer group.

mod common;

use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureRecord;

#[tokio::test]
async fn a_message_produced_to_the_broker_is_consumed_back() {
    let Some(brokers) = common::brokers() else {
        return;
    };
    let base = common::base(&brokers);
    let topic = format!("smoke.{}", uuid::Uuid::new_v4().simple());
    treasury::kafka::ensure_topics(&base, &[&topic], 2)
        .await
        .unwrap();
    let producer = treasury::kafka::idempotent_producer(&base).unwrap();
    let payload = b"treasury smoke test".to_vec();
    producer
        .send(
            FutureRecord::to(&topic).key("k").payload(&payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    let consumer: StreamConsumer =
        treasury::kafka::consumer_config(&base, &format!("smoke-{topic}"))
            .create()
            .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .expect("a message within 30 s");
        if let Ok(m) = m {
            assert_eq!(m.payload(), Some(&payload[..]));
            assert_eq!(m.key(), Some(&b"k"[..]));
            break;
        }
    }
}
