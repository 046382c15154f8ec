//! The outbox relay: publishes messages that were committed to the outbox,
//! with an idempotent producer, then marks them sent. A crash between the two
//! sends a message again with the same `message-id`; consumers deduplicate.
//! It polls the outbox when idle, and a writer in the same process can wake
//! it right after its transaction commits ([`Relay::waker`]).

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Notify;

use crate::shutdown::Shutdown;
use crate::store::{OutboxMessage, Store, StoreError};

/// Errors the relay reports (and retries).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("publish to {topic} failed: {error}")]
    Publish { topic: String, error: String },
}

/// Publishes the outbox.
pub struct Relay {
    store: Arc<dyn Store>,
    producer: FutureProducer,
    batch: i64,
    wake: Arc<Notify>,
}

impl Relay {
    pub fn new(store: Arc<dyn Store>, producer: FutureProducer) -> Self {
        Self {
            store,
            producer,
            batch: 500,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Notifying this makes the relay read the outbox before its idle pause
    /// ends (a notification while it is publishing is kept for after).
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    /// Publishes one batch of pending messages; returns how many were sent.
    pub async fn publish_pending(&self) -> Result<usize, RelayError> {
        let pending = self.store.outbox_pending(self.batch).await?;
        if pending.is_empty() {
            return Ok(0);
        }
        let deliveries = pending.iter().map(|m| self.send(m));
        let mut sent = Vec::with_capacity(pending.len());
        let mut first_error = None;
        for (message, result) in pending.iter().zip(join_all(deliveries).await) {
            match result {
                Ok(()) => sent.push(message.id),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        self.store.mark_sent(&sent).await?;
        metrics::counter!("treasury_outbox_published_total").increment(sent.len() as u64);
        match first_error {
            Some(e) => Err(e),
            None => Ok(sent.len()),
        }
    }

    async fn send(&self, message: &OutboxMessage) -> Result<(), RelayError> {
        let mut headers = OwnedHeaders::new();
        for (key, value) in &message.headers {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut record = FutureRecord::to(&message.topic)
            .payload(&message.payload)
            .headers(headers);
        if let Some(key) = &message.key {
            record = record.key(key);
        }
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map(|_| ())
            .map_err(|(error, _)| RelayError::Publish {
                topic: message.topic.clone(),
                error: error.to_string(),
            })
    }

    /// Publishes until shutdown, polling every `idle` when there is nothing
    /// to send, or sooner when woken.
    pub async fn run(self, mut shutdown: Shutdown, idle: Duration) {
        while !shutdown.is_triggered() {
            match self.publish_pending().await {
                Ok(n) if n > 0 => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "outbox relay will retry"),
            }
            tokio::select! {
                _ = tokio::time::sleep(idle) => {}
                _ = self.wake.notified() => {}
                _ = shutdown.triggered() => {}
            }
        }
        if let Err(e) = self.publish_pending().await {
            tracing::warn!(error = %e, "outbox not fully published at shutdown; the next start sends it");
        }
    }
}
