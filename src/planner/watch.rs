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
    /// Events per buffer in the open windows that took money out of it.
    pub open_outflow_events: BTreeMap<BufferAccount, u64>,
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
/// The fewest withdrawals that can make a surge: a handful of events is
/// within what chance gives a calm minute, and a flow that comes in short
/// active stretches after idle hours (where the look-back's mean count is
/// low) would otherwise look like one at every start.
const SURGE_MIN_EVENTS: u64 = 12;

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
        let mut open_outflow_events: BTreeMap<BufferAccount, u64> = BTreeMap::new();
        let mut earliest: Option<DateTime<Utc>> = None;
        for (start, tally) in tallies {
            if start > now {
                continue;
            }
            earliest = Some(earliest.map_or(start, |e: DateTime<Utc>| e.min(start)));
            for (account, flow) in &tally.flows {
                *open_flows.entry(*account).or_default() += flow.net();
                *open_outflow_events.entry(*account).or_default() += flow.outflow_events;
            }
        }
        let start = earliest.unwrap_or(now);
        Self {
            open_flows,
            open_outflow_events,
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
    /// (`stats` are per `window`, scaled by √(elapsed / window)).
    ///
    /// A single large withdrawal is not a rate, so the drain is judged over
    /// at least three minutes ([`BURST_MIN_ELAPSED`]), unless the number of
    /// withdrawals already says it is one: more than the recent mean count
    /// over the time elapsed plus `z` of its Poisson spread
    /// ([`Self::withdrawals_surge`]). Then the drain is judged over the time
    /// elapsed (at least a minute), and a burst shows a minute or two sooner.
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
        let beyond_spread = |over: Duration| {
            let share = share_of(over, window);
            let expected = (-stats.mean).max(Decimal::ZERO).saturating_mul(share);
            let spread = z
                .saturating_mul(stats.std_dev)
                .saturating_mul(share.sqrt().unwrap_or(Decimal::ONE));
            drain > expected.saturating_add(spread)
        };
        beyond_spread(self.elapsed.max(BURST_MIN_ELAPSED))
            || (self.withdrawals_surge(account, stats.outflow_events, window, z)
                && beyond_spread(self.elapsed.max(WATCH_MIN_ELAPSED)))
    }

    /// Whether more events took money out of `account` in the open windows
    /// than `per_window`, its recent mean count per `window`, explains over
    /// the time elapsed (at least a minute) by more than `z` times the
    /// Poisson spread √λ, and at least [`SURGE_MIN_EVENTS`] of them.
    pub fn withdrawals_surge(
        &self,
        account: BufferAccount,
        per_window: Decimal,
        window: Duration,
        z: Decimal,
    ) -> bool {
        let count = self.open_outflow_events.get(&account).copied().unwrap_or(0);
        if count < SURGE_MIN_EVENTS {
            return false;
        }
        let share = share_of(self.elapsed.max(WATCH_MIN_ELAPSED), window);
        let expected = per_window.max(Decimal::ZERO).saturating_mul(share);
        let spread = z.saturating_mul(expected.sqrt().unwrap_or_default());
        Decimal::from(count) > expected.saturating_add(spread)
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

/// `over` as a fraction of `window`.
fn share_of(over: Duration, window: Duration) -> Decimal {
    Decimal::from(over.num_milliseconds()) / Decimal::from(window.num_milliseconds().max(1))
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
            open_outflow_events: BTreeMap::new(),
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

    /// Net flow per 5-minute window: mean −500, σ 4,000, with
    /// `withdrawals` events taking money out per window.
    fn history(withdrawals: Decimal) -> FlowStats {
        FlowStats {
            mean: dec!(-500),
            std_dev: dec!(4000),
            recent_mean: dec!(-500),
            outflow_events: withdrawals,
            windows: 288,
        }
    }

    #[test]
    fn a_burst_is_a_drain_beyond_the_spread_of_recent_flows_over_three_minutes() {
        let (window, z) = (Duration::minutes(5), dec!(4));
        let stats = history(Decimal::ZERO);
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
    fn many_withdrawals_make_a_burst_before_three_minutes_have_passed() {
        let (window, z) = (Duration::minutes(5), dec!(4));
        let stats = history(dec!(10));
        let usdc = BufferAccount::SystemBufferUsdc;
        let with_count = |flow: Decimal, minutes: i64, count: u64| Watch {
            open_outflow_events: BTreeMap::from([(usdc, count)]),
            ..watch(flow, minutes)
        };
        // Ten withdrawals a window are usual (none, with no history).
        let surge = |minutes: i64, count: u64, per_window: Decimal| {
            with_count(dec!(-1), minutes, count).withdrawals_surge(usdc, per_window, window, z)
        };
        // Two minutes in (share 0.4): 4 withdrawals expected, spread 4·√4 = 8.
        assert!(surge(2, 13, dec!(10)));
        assert!(!surge(2, 12, dec!(10)));
        // One minute in (share 0.2): 2 expected, spread 4·√2 ≈ 5.7, but at
        // least twelve withdrawals make a surge, history or not.
        assert!(!surge(1, 11, dec!(10)));
        assert!(surge(1, 12, dec!(10)));
        assert!(surge(1, 12, Decimal::ZERO));
        assert!(!surge(1, 11, Decimal::ZERO));
        // A surge lets the drain be judged over the two minutes elapsed:
        // 200 expected + 4·4000·√0.4 ≈ 10,319 (over three minutes, 12,694).
        assert!(with_count(dec!(-11000), 2, 13).bursting(usdc, stats, window, z));
        assert!(!with_count(dec!(-11000), 2, 12).bursting(usdc, stats, window, z));
        assert!(
            !with_count(dec!(-10000), 2, 40).bursting(usdc, stats, window, z),
            "many small withdrawals within the spread of the sum are no burst"
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
