//! The pause before retrying something that is down: doubling from a
//! quarter second up to half a minute, back to the start after a success;
//! and how a consumer says it holds its partitions meanwhile.

use std::time::Duration;

use crate::health::{ConsumerState, Health};
use crate::shutdown::Shutdown;

const FIRST: Duration = Duration::from_millis(250);
const LONGEST: Duration = Duration::from_secs(30);

/// Consecutive failures so far, and the pause they call for.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The pause before the next attempt; each call doubles it, up to 30 s.
    pub fn next_delay(&mut self) -> Duration {
        let delay = FIRST
            .saturating_mul(2u32.saturating_pow(self.failures))
            .min(LONGEST);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Whether the last attempt failed.
    pub fn is_retrying(&self) -> bool {
        self.failures > 0
    }

    /// After a success: the next failure pauses briefly again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A consumer holds its partitions because `dependency` is down: says so
/// (log, `treasury_consumer_held_total` and `treasury_consumer_held`, its
/// `/readyz` state) and waits the next pause, or until shutdown.
pub async fn hold(
    consumer: &'static str,
    dependency: &'static str,
    error: &(dyn std::fmt::Display + Sync),
    backoff: &mut Backoff,
    health: &Health,
    shutdown: &mut Shutdown,
) {
    let delay = backoff.next_delay();
    tracing::warn!(consumer, dependency, %error, retry_in = ?delay,
        "holding the partitions until this is back; the batch will be read again, nothing is dead-lettered");
    metrics::counter!("treasury_consumer_held_total", "consumer" => consumer, "dependency" => dependency)
        .increment(1);
    metrics::gauge!("treasury_consumer_held", "consumer" => consumer).set(1.0);
    health.consumer(
        consumer,
        ConsumerState::Held {
            reason: format!("{dependency}: {error}"),
        },
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.triggered() => {}
    }
}

/// Exports `consumer`'s hold series from start-up (not held, never held), so
/// that rules and dashboards see them before the first outage.
pub fn register_series(consumer: &'static str) {
    metrics::gauge!("treasury_consumer_held", "consumer" => consumer).set(0.0);
    for dependency in ["database", "schema_registry"] {
        metrics::counter!("treasury_consumer_held_total", "consumer" => consumer, "dependency" => dependency)
            .increment(0);
    }
}

/// A held consumer committed a batch again.
pub fn resumed(consumer: &'static str, backoff: &mut Backoff) {
    if backoff.is_retrying() {
        tracing::info!(consumer, "resumed");
        metrics::gauge!("treasury_consumer_held", "consumer" => consumer).set(0.0);
    }
    backoff.reset();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_start_over_after_a_success() {
        let mut backoff = Backoff::default();
        let pauses: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert_eq!(pauses[0], Duration::from_millis(250));
        assert_eq!(pauses[1], Duration::from_millis(500));
        assert_eq!(pauses[3], Duration::from_secs(2));
        assert_eq!(pauses[9], Duration::from_secs(30));
        assert!(backoff.is_retrying());
        backoff.reset();
        assert!(!backoff.is_retrying());
        assert_eq!(backoff.next_delay(), Duration::from_millis(250));
    }
}
