//! The watch between window closes: the flows the open windows have counted
//! so far, and whether they make waiting for the close too late.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use rust_decimal::{Decimal, MathematicalOps};

use super::{BufferPosition, FlowStats};
use crate::domain::BufferAccount;
use crate::window::WindowTally;

/// A watch between window closes: what the open windows have counted so far.
///
/// The flows of windows still open have moved real money, though the book
/// settles them only at the close. A watch plans on the balances with them
/// counted, and only when waiting is expected to be too late: when some
/// buffer, draining at the open windows' rate until the close and then for
/// the lead time a refill takes, would be below its minimum before money
/// planned at the close could land. Otherwise the close decides, as usual.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Watch {
    /// Net flow per buffer counted in the open windows.
    pub open_flows: BTreeMap<BufferAccount, Decimal>,
    /// Since the earliest open window started.
    pub elapsed: Duration,
    /// Until that window closes (its end plus grace).
    pub until_close: Duration,
}

/// The shortest stretch a watch extrapolates a drain rate from.
const WATCH_MIN_ELAPSED: Duration = Duration::minutes(1);
/// The shortest stretch a drain is judged a burst over: a single large
/// withdrawal in the first minute of a window is not a rate.
const BURST_MIN_ELAPSED: Duration = Duration::minutes(3);

impl Watch {
    /// The watch at `now` over the open windows' `tallies` (keyed by window
    /// start), with windows of `length` closing `grace` after their end.
    pub fn at<'a>(
        now: DateTime<Utc>,
        tallies: impl IntoIterator<Item = (DateTime<Utc>, &'a WindowTally)>,
        length: Duration,
        grace: Duration,
    ) -> Self {
        let mut open_flows: BTreeMap<BufferAccount, Decimal> = BTreeMap::new();
        let mut earliest: Option<DateTime<Utc>> = None;
        for (start, tally) in tallies {
            if start > now {
                continue;
            }
            earliest = Some(earliest.map_or(start, |e: DateTime<Utc>| e.min(start)));
            for (account, flow) in &tally.flows {
                *open_flows.entry(*account).or_default() += flow.net();
            }
        }
        let start = earliest.unwrap_or(now);
        Self {
            open_flows,
            elapsed: now - start,
            until_close: (start + length + grace - now).max(Duration::zero()),
        }
    }

    /// `positions` with the open windows' flows added to each balance.
    pub fn positions(&self, positions: &[BufferPosition]) -> Vec<BufferPosition> {
        positions
            .iter()
            .map(|p| BufferPosition {
                balance: p.balance + self.open_flows.get(&p.account).copied().unwrap_or_default(),
                ..*p
            })
            .collect()
    }

    /// Whether some buffer of `now_positions` (open flows counted) is
    /// expected below its minimum before a refill planned at the close lands.
    pub fn must_act(
        &self,
        now_positions: &[BufferPosition],
        lead_time: impl Fn(BufferAccount) -> Duration,
    ) -> bool {
        now_positions
            .iter()
            .any(|p| self.expected_before_refill(p, lead_time(p.account)) < p.thresholds.min())
    }

    /// What `position` (open flows counted) is expected to hold when a
    /// refill planned at the close would land, draining at the open windows' rate.
    pub fn expected_before_refill(
        &self,
        position: &BufferPosition,
        lead_time: Duration,
    ) -> Decimal {
        let ahead = self.until_close + lead_time;
        position.projected() - self.drain_over(position.account, ahead)
    }

    /// Whether what `position` holds now (open flows counted, less what is
    /// already leaving, money in flight toward it not counted) outlasts
    /// `lead_time` at the open windows' drain rate without crossing its
    /// minimum. A buffer that does not is living on its refills in flight:
    /// if one of them is slow, it runs dry before the next one planned lands.
    pub fn outlasts(&self, position: &BufferPosition, lead_time: Duration) -> bool {
        let held = position.balance - position.outgoing;
        held - self.drain_over(position.account, lead_time) >= position.thresholds.min()
    }

    /// Whether `account` drains in the open windows faster than its recent
    /// flows explain: the drain so far exceeds what the mean flow would
    /// take over the time elapsed by more than `z` standard deviations
    /// (`stats` are per `window`, scaled by √(elapsed / window)). A single
    /// large withdrawal in a calm window stays within the spread; a burst
    /// leaves it within a minute or two.
    pub fn bursting(
        &self,
        account: BufferAccount,
        stats: FlowStats,
        window: Duration,
        z: Decimal,
    ) -> bool {
        let drain = self.drained(account);
        if drain.is_zero() {
            return false;
        }
        let share = Decimal::from(self.elapsed.max(BURST_MIN_ELAPSED).num_milliseconds())
            / Decimal::from(window.num_milliseconds().max(1));
        let expected = (-stats.mean).max(Decimal::ZERO).saturating_mul(share);
        let spread = z
            .saturating_mul(stats.std_dev)
            .saturating_mul(share.sqrt().unwrap_or(Decimal::ONE));
        drain > expected.saturating_add(spread)
    }

    /// What `account` is expected to lose over `ahead` at the open windows' rate.
    pub fn drain_over(&self, account: BufferAccount, ahead: Duration) -> Decimal {
        let elapsed_ms = Decimal::from(self.elapsed.max(WATCH_MIN_ELAPSED).num_milliseconds());
        let ahead_ms = Decimal::from(ahead.num_milliseconds().max(0));
        (self.drained(account) / elapsed_ms).saturating_mul(ahead_ms)
    }

    /// What `account` has lost in the open windows (zero when it gained).
    fn drained(&self, account: BufferAccount) -> Decimal {
        let flow = self.open_flows.get(&account).copied().unwrap_or_default();
        (-flow).max(Decimal::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Thresholds;
    use chrono::TimeZone;
    use rust_decimal_macros::dec;

    fn usdc(balance: Decimal) -> BufferPosition {
        BufferPosition {
            account: BufferAccount::SystemBufferUsdc,
            thresholds: Thresholds::new(dec!(10000), dec!(50000), dec!(100000)).unwrap(),
            batch_size: dec!(20000),
            balance,
            incoming: Decimal::ZERO,
            outgoing: Decimal::ZERO,
        }
    }

    fn watch(flow: Decimal, elapsed_minutes: i64) -> Watch {
        Watch {
            open_flows: BTreeMap::from([(BufferAccount::SystemBufferUsdc, flow)]),
            elapsed: Duration::minutes(elapsed_minutes),
            until_close: Duration::minutes(5) - Duration::minutes(elapsed_minutes)
                + Duration::seconds(30),
        }
    }

    #[test]
    fn a_fast_drain_acts_and_a_calm_window_waits() {
        let lead = Duration::minutes(10);
        // 20,000 out in 2 minutes: 10,000 a minute for 3.5 + 10 more minutes.
        let fast = watch(dec!(-20000), 2);
        let now = fast.positions(&[usdc(dec!(50000))]);
        assert_eq!(now[0].balance, dec!(30000));
        assert!(fast.must_act(&now, |_| lead));
        // 2,000 out in 2 minutes: 30,000 stays far above the minimum.
        let calm = watch(dec!(-2000), 2);
        assert!(!calm.must_act(&calm.positions(&[usdc(dec!(50000))]), |_| lead));
        // Already below the minimum with money arriving: act.
        let arriving = watch(dec!(500), 2);
        assert!(arriving.must_act(&arriving.positions(&[usdc(dec!(9000))]), |_| lead));
    }

    #[test]
    fn only_money_held_counts_toward_outlasting_the_lead_time() {
        let lead = Duration::minutes(10);
        // 10,000 a minute out over 2 minutes: 100,000 over the lead time.
        let burst = watch(dec!(-20000), 2);
        let held = burst.positions(&[usdc(dec!(131000))]);
        assert!(burst.outlasts(&held[0], lead), "111,000 − 100,000 ≥ 10,000");
        let thin = BufferPosition {
            incoming: dec!(90000),
            ..burst.positions(&[usdc(dec!(60000))])[0]
        };
        assert_eq!(thin.projected(), dec!(130000));
        assert!(
            !burst.outlasts(&thin, lead),
            "money in flight does not count: 40,000 − 100,000 < 10,000"
        );
        let leaving = BufferPosition {
            outgoing: dec!(6000),
            ..held[0]
        };
        assert!(!burst.outlasts(&leaving, lead), "what is leaving is gone");
        let calm = watch(dec!(2000), 2);
        assert!(calm.outlasts(&calm.positions(&[usdc(dec!(12000))])[0], lead));
    }

    #[test]
    fn a_burst_is_a_drain_beyond_the_spread_of_recent_flows_over_three_minutes() {
        let window = Duration::minutes(5);
        let z = dec!(4);
        // Net flow per 5-minute window: mean −500, σ 4,000.
        let stats = FlowStats {
            mean: dec!(-500),
            std_dev: dec!(4000),
            recent_mean: dec!(-500),
            windows: 288,
        };
        let bursting = |flow: Decimal, minutes: i64| {
            watch(flow, minutes).bursting(BufferAccount::SystemBufferUsdc, stats, window, z)
        };
        // Over 3 minutes (share 0.6): 300 expected + 4·4000·√0.6 ≈ 12,694.
        assert!(bursting(dec!(-13000), 3));
        assert!(!bursting(dec!(-12000), 3));
        // One minute in, the drain is judged over three: a single large
        // withdrawal is not a rate.
        assert!(!bursting(dec!(-12000), 1));
        // Over the whole window (share 1): 500 + 16,000.
        assert!(!bursting(dec!(-16000), 5));
        assert!(bursting(dec!(-17000), 5));
        assert!(!bursting(dec!(20000), 3), "money coming in is no burst");
        let calm_history = FlowStats::default();
        assert!(
            watch(dec!(-1), 3).bursting(BufferAccount::SystemBufferUsdc, calm_history, window, z),
            "with no spread measured, any drain is beyond it"
        );
    }

    #[test]
    fn open_windows_in_the_future_are_ignored_and_the_earliest_sets_the_clock() {
        let t0 = Utc.with_ymd_and_hms(2026, 1, 5, 10, 0, 0).unwrap();
        let tally = WindowTally::default();
        let w = Watch::at(
            t0 + Duration::minutes(7),
            [
                (t0, &tally),
                (t0 + Duration::minutes(5), &tally),
                (t0 + Duration::minutes(10), &tally),
            ],
            Duration::minutes(5),
            Duration::seconds(30),
        );
        assert_eq!(w.elapsed, Duration::minutes(7));
        assert_eq!(w.until_close, Duration::zero());
    }
}
