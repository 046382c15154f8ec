//! What a simulated month is judged on, measured on the buffers' actual
//! balances: time below minimum, below zero and above maximum (per buffer and
//! for "any buffer"), idle capital, breaches and how long they took to heal.
//!
//! Balances are piecewise constant between simulation steps, so each
//! [`Metrics::observe`] call (made before a change) credits the time since
//! the last one to the state the buffers were in.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

use super::scenario::BufferSetup;
use crate::domain::BufferAccount;

/// Seconds spent in each condition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Exposure {
    pub below_min_seconds: i64,
    pub below_zero_seconds: i64,
    pub above_max_seconds: i64,
}

/// The running measurement.
#[derive(Debug, Clone)]
pub struct Metrics {
    setups: BTreeMap<BufferAccount, BufferSetup>,
    last: DateTime<Utc>,
    pub start: DateTime<Utc>,
    pub per_buffer: BTreeMap<BufferAccount, Exposure>,
    pub any: Exposure,
    /// Σ over buffers of capital above the minimum × seconds.
    pub idle_capital_seconds: Decimal,
    /// Lowest actual balance each buffer reached.
    pub lowest: BTreeMap<BufferAccount, Decimal>,
    breach_since: BTreeMap<BufferAccount, DateTime<Utc>>,
    /// Durations of healed breaches below the minimum, in seconds.
    pub recoveries: Vec<i64>,
    /// When the last breach (of any buffer) healed.
    pub last_recovery: Option<DateTime<Utc>>,
}

impl Metrics {
    pub fn new(setups: &BTreeMap<BufferAccount, BufferSetup>, start: DateTime<Utc>) -> Self {
        Self {
            setups: setups.clone(),
            last: start,
            start,
            per_buffer: setups.keys().map(|a| (*a, Exposure::default())).collect(),
            any: Exposure::default(),
            idle_capital_seconds: Decimal::ZERO,
            lowest: setups.iter().map(|(a, s)| (*a, s.start)).collect(),
            breach_since: BTreeMap::new(),
            recoveries: Vec::new(),
            last_recovery: None,
        }
    }

    /// Credits the time from the last observation to `now` to `balances`
    /// (the balances that held over that time).
    pub fn observe(&mut self, now: DateTime<Utc>, balances: &BTreeMap<BufferAccount, Decimal>) {
        let seconds = (now - self.last).num_seconds();
        if seconds <= 0 {
            return;
        }
        self.last = now;
        let (mut low, mut negative, mut high) = (false, false, false);
        for (account, setup) in &self.setups {
            let balance = balances.get(account).copied().unwrap_or_default();
            let t = setup.thresholds;
            let exposure = self.per_buffer.entry(*account).or_default();
            if balance < t.min() {
                exposure.below_min_seconds += seconds;
                low = true;
            }
            if balance < Decimal::ZERO {
                exposure.below_zero_seconds += seconds;
                negative = true;
            }
            if balance > t.max() {
                exposure.above_max_seconds += seconds;
                high = true;
            }
            let idle = (balance - t.min()).max(Decimal::ZERO);
            self.idle_capital_seconds = self
                .idle_capital_seconds
                .saturating_add(idle * Decimal::from(seconds));
        }
        self.any.below_min_seconds += i64::from(low) * seconds;
        self.any.below_zero_seconds += i64::from(negative) * seconds;
        self.any.above_max_seconds += i64::from(high) * seconds;
    }

    /// Notes breaches starting or healing after a change at `now`.
    pub fn after_change(
        &mut self,
        now: DateTime<Utc>,
        balances: &BTreeMap<BufferAccount, Decimal>,
    ) {
        for (account, setup) in &self.setups {
            let balance = balances.get(account).copied().unwrap_or_default();
            let lowest = self.lowest.entry(*account).or_insert(balance);
            *lowest = (*lowest).min(balance);
            let below = balance < setup.thresholds.min();
            match (below, self.breach_since.get(account).copied()) {
                (true, None) => {
                    self.breach_since.insert(*account, now);
                }
                (false, Some(since)) => {
                    self.breach_since.remove(account);
                    self.recoveries.push((now - since).num_seconds());
                    self.last_recovery = Some(now);
                }
                _ => {}
            }
        }
    }

    /// Whether some buffer is below its minimum now.
    pub fn in_breach(&self) -> bool {
        !self.breach_since.is_empty()
    }

    /// Seconds observed so far.
    pub fn elapsed_seconds(&self) -> i64 {
        (self.last - self.start).num_seconds()
    }
}

/// The `q`-quantile (nearest rank) of `values`, in minutes.
pub fn quantile_minutes(values: &[i64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1] as f64 / 60.0)
}
