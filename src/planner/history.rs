//! What the recent past says about the next few cycles: each buffer's net
//! flow per cycle (mean and standard deviation over the latest closed
//! windows) and how long conversions take to land (the 95th percentile of
//! recent jobs from command to completion).
//!
//! Pure: the settlement cycle reads the windows and job times from the store,
//! the simulator from its own run; both build the history here.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use rust_decimal::{Decimal, MathematicalOps};
use serde::Serialize;

use crate::domain::BufferAccount;
use crate::window::WindowTally;

/// Windows that make up the "recent" flow a burst shows in.
pub const RECENT_WINDOWS: usize = 3;

/// One buffer's recent flow, per settlement cycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FlowStats {
    /// Mean net flow per cycle (negative: the buffer drains).
    pub mean: Decimal,
    /// Standard deviation of the net flow per cycle.
    pub std_dev: Decimal,
    /// Mean net flow per cycle over the latest few windows (a burst shows
    /// here first).
    pub recent_mean: Decimal,
    /// Mean number of events per cycle that took money out.
    pub outflow_events: Decimal,
    /// Windows the figures come from.
    pub windows: usize,
}

/// The recent past, as the planner uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FlowHistory {
    pub flows: BTreeMap<BufferAccount, FlowStats>,
    /// 95th percentile of recent jobs' time from command to completion, if
    /// any job completed recently.
    pub lead_time_p95: Option<Duration>,
    /// The settlement window length the flows are per.
    #[serde(skip)]
    pub cycle: Duration,
    /// Each buffer's net flow per closed window, oldest first (what the
    /// [day-ahead forecast](Self::day_ahead) reads).
    #[serde(skip)]
    pub nets: BTreeMap<BufferAccount, Vec<Decimal>>,
}

/// What the same hours of the day before say the next hours hold for a
/// buffer: the deepest it fell below where it started and the highest it
/// rose above (both zero or more).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DayAhead {
    pub fall: Decimal,
    pub rise: Decimal,
}

/// The mean of `values` (zero for none).
pub fn mean(values: &[Decimal]) -> Decimal {
    if values.is_empty() {
        return Decimal::ZERO;
    }
    values.iter().sum::<Decimal>() / Decimal::from(values.len() as u64)
}

/// The population variance of `values` (zero for fewer than two).
pub fn variance(values: &[Decimal]) -> Decimal {
    if values.len() < 2 {
        return Decimal::ZERO;
    }
    let n = Decimal::from(values.len() as u64);
    let mean = mean(values);
    values
        .iter()
        .map(|v| {
            let d = *v - mean;
            d.checked_mul(d).unwrap_or(Decimal::MAX)
        })
        .fold(Decimal::ZERO, |acc, x| acc.saturating_add(x))
        / n
}

/// The `q`-quantile (0..=1, nearest rank) of `durations`.
pub fn quantile(durations: &[Duration], q: Decimal) -> Option<Duration> {
    if durations.is_empty() {
        return None;
    }
    let mut sorted = durations.to_vec();
    sorted.sort();
    let rank = (q * Decimal::from(sorted.len() as u64)).ceil();
    let index = usize::try_from(rank.mantissa()).unwrap_or(usize::MAX);
    let index = index.saturating_sub(1).min(sorted.len() - 1);
    Some(sorted[index])
}

/// The windows from `from` to `to` (both window starts, inclusive) in order,
/// with each window absent from `closed` (no events) as an empty tally. At
/// most the windows since the earliest one in `closed` are returned: a fresh
/// installation's quiet past is not evidence of calm.
pub fn fill_windows(
    closed: &BTreeMap<DateTime<Utc>, WindowTally>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    length: Duration,
) -> Vec<WindowTally> {
    let Some(first) = closed.keys().next().copied() else {
        return Vec::new();
    };
    if length <= Duration::zero() {
        return Vec::new();
    }
    let mut start = from.max(first);
    let mut out = Vec::new();
    while start <= to {
        out.push(closed.get(&start).cloned().unwrap_or_default());
        start += length;
    }
    out
}

impl FlowHistory {
    /// The history from the latest closed windows (oldest first) and the
    /// latest jobs' lead times.
    pub fn from_windows(windows: &[WindowTally], lead_times: &[Duration], cycle: Duration) -> Self {
        let nets: BTreeMap<BufferAccount, Vec<Decimal>> = BufferAccount::ALL
            .into_iter()
            .map(|account| (account, windows.iter().map(|w| w.net(account)).collect()))
            .collect();
        let flows = nets
            .iter()
            .map(|(account, nets)| {
                let account = *account;
                let std_dev = variance(nets).sqrt().unwrap_or_default();
                let recent = &nets[nets.len().saturating_sub(RECENT_WINDOWS)..];
                let outflow_events: Vec<Decimal> = windows
                    .iter()
                    .map(|w| Decimal::from(w.flows.get(&account).map_or(0, |f| f.outflow_events)))
                    .collect();
                (
                    account,
                    FlowStats {
                        mean: mean(nets),
                        std_dev,
                        recent_mean: mean(recent),
                        outflow_events: mean(&outflow_events),
                        windows: nets.len(),
                    },
                )
            })
            .collect();
        Self {
            flows,
            lead_time_p95: quantile(lead_times, Decimal::new(95, 2)),
            cycle,
            nets,
        }
    }

    /// The flows of the `horizon` ahead as the same hours a day before ran
    /// them: the windows starting a day before the next one to close, up to
    /// `horizon`, summed in order. Zero when the history holds less than a
    /// day, or `horizon` is zero.
    pub fn day_ahead(&self, account: BufferAccount, horizon: Duration) -> DayAhead {
        let cycle_ms = self.cycle.num_milliseconds();
        let Some(nets) = self.nets.get(&account) else {
            return DayAhead::default();
        };
        if cycle_ms <= 0 || horizon <= Duration::zero() {
            return DayAhead::default();
        }
        let day = usize::try_from(Duration::days(1).num_milliseconds() / cycle_ms).unwrap_or(0);
        let ahead = usize::try_from(horizon.num_milliseconds() / cycle_ms).unwrap_or(0);
        if day == 0 || nets.len() < day {
            return DayAhead::default();
        }
        let start = nets.len() - day;
        let mut level = Decimal::ZERO;
        let mut out = DayAhead::default();
        for net in nets[start..].iter().take(ahead) {
            level = level.saturating_add(*net);
            out.fall = out.fall.max(-level);
            out.rise = out.rise.max(level);
        }
        out
    }

    /// The figures for one buffer (zeros with no history).
    pub fn stats(&self, account: BufferAccount) -> FlowStats {
        self.flows.get(&account).copied().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn variance_and_quantile() {
        assert_eq!(variance(&[dec!(1), dec!(3)]), dec!(1));
        assert_eq!(variance(&[dec!(5)]), Decimal::ZERO);
        let d: Vec<Duration> = (1..=100).map(Duration::seconds).collect();
        assert_eq!(quantile(&d, dec!(0.95)), Some(Duration::seconds(95)));
        assert_eq!(quantile(&d, dec!(1)), Some(Duration::seconds(100)));
        assert_eq!(quantile(&[], dec!(0.5)), None);
    }

    fn tally(nets: &[Decimal]) -> FlowHistory {
        FlowHistory {
            cycle: Duration::hours(6),
            nets: BTreeMap::from([(BufferAccount::SystemBufferUsdc, nets.to_vec())]),
            ..FlowHistory::default()
        }
    }

    #[test]
    fn the_day_ahead_reads_the_same_hours_a_day_before() {
        let usdc = BufferAccount::SystemBufferUsdc;
        // Four 6-hour windows make a day: the next 12 hours are windows 0 and 1.
        let h = tally(&[dec!(-30), dec!(10), dec!(50), dec!(-70)]);
        assert_eq!(
            h.day_ahead(usdc, Duration::hours(12)),
            DayAhead {
                fall: dec!(30),
                rise: Decimal::ZERO
            }
        );
        assert_eq!(
            h.day_ahead(usdc, Duration::hours(18)),
            DayAhead {
                fall: dec!(30),
                rise: dec!(30)
            }
        );
        // Longer history: the day before the next window is the oldest but one.
        let h = tally(&[dec!(999), dec!(-30), dec!(10), dec!(50), dec!(-70)]);
        assert_eq!(h.day_ahead(usdc, Duration::hours(6)).fall, dec!(30));
        // Less than a day of history, no horizon, or another buffer: nothing.
        assert_eq!(
            tally(&[dec!(-30), dec!(10), dec!(50)]).day_ahead(usdc, Duration::hours(12)),
            DayAhead::default()
        );
        assert_eq!(h.day_ahead(usdc, Duration::zero()), DayAhead::default());
        assert_eq!(
            h.day_ahead(BufferAccount::SystemBufferFiat, Duration::hours(12)),
            DayAhead::default()
        );
    }
}
