//! Provider health over a sliding window: a provider's track record is the
//! outcomes of the job attempts it finished within the last `window` (the
//! `TREASURY_PROVIDER_HEALTH_WINDOW` setting), one outcome per job attempt.
//!
//! Pure: the caller loads the outcomes (the store keeps one per job and
//! provider, so a job held at a provider for many monitor cycles counts at
//! most once) and passes `now`. Old failures leave the window, so a provider
//! excluded as unhealthy is judged again on what it does now: its status
//! recovers when the provider does.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// How one job attempt at a provider ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AttemptOutcome {
    /// The provider.
    pub provider: Uuid,
    /// When the outcome was known.
    pub at: DateTime<Utc>,
    /// Completed (true), or failed, refused, given up on or timed out (false).
    pub succeeded: bool,
}

/// A provider's recent successes and failures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TrackRecord {
    /// Job attempts that completed.
    pub successes: i64,
    /// Job attempts that did not.
    pub failures: i64,
}

impl TrackRecord {
    /// Every outcome counted.
    pub fn attempts(&self) -> i64 {
        self.successes.saturating_add(self.failures)
    }
}

/// Each provider's record over the `window` that ends at `now`: the
/// outcomes with `now - window < at`. Outcomes a little ahead of `now` (a
/// peer's clock) count; providers without outcomes are absent (no record).
pub fn track_records(
    outcomes: &[AttemptOutcome],
    now: DateTime<Utc>,
    window: chrono::Duration,
) -> HashMap<Uuid, TrackRecord> {
    let since = now - window;
    let mut records: HashMap<Uuid, TrackRecord> = HashMap::new();
    for outcome in outcomes.iter().filter(|o| o.at > since) {
        let record = records.entry(outcome.provider).or_default();
        if outcome.succeeded {
            record.successes += 1;
        } else {
            record.failures += 1;
        }
    }
    records
}
