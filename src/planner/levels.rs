//! Each buffer's trigger level and return point: when to refill, and to what.
//!
//! A refill takes a lead time `T` to land: the providers' observed 95th
//! percentile from command to completion (the configured default until jobs
//! have completed), plus one window for the decision itself. Over `n = T /
//! window` windows a buffer whose net flow per window has mean `μ` and
//! standard deviation `σ` over the look-back (and mean `μ₃` over the last
//! three windows, where a burst shows first) is expected to lose
//! `drain = max(0, −min(μ, μ₃))·n`, and rarely more than `z·σ·√n` beyond
//! that (`z` is `TREASURY_PLANNER_SAFETY_FACTOR`). So:
//!
//! - **trigger** = `min + drain + z·σ·√n`, at most `target`: below it
//!   (projected, in-flight included) the buffer is refilled. Until the
//!   look-back holds a closed window there is no flow to measure, and the
//!   configured batch rule (`target − batch_size`) sets it instead;
//! - **return point** = `max(target, trigger + batch_size) + drain`, at most
//!   `max`: a refill brings the projected balance there, so that after the
//!   drain expected while it travels the next one is still a batch away;
//! - **ceiling** = `max`: above it the buffer sweeps its excess;
//! - **sweep point** = `max − batch_size` while the buffer's latest windows
//!   still bring money in (`μ₃ > 0`), `max − batch_size/2` once they no
//!   longer do ([`sweep_room`]), at least the return point: a sweep brings
//!   the projected balance down to it.
//!
//! The risk sets when a buffer is refilled, the batch size how much moves:
//! every conversion pays 15 bps or so of its amount, so money moved further
//! than the risk asks for (refilled early, or swept far below the maximum)
//! tends to come back at the next swing of the flows, paying twice. On a
//! month of `normal` flows at twice the seeded capital, dropping the batch
//! rule as a trigger floor and sweeping to a batch below the maximum (rather
//! than to the return point) cut the conversion cost from 2.75–3.29× the
//! simulator's lower bound to 2.26–2.87× (seeds 1–20). A sweep at the top of
//! a swing (the inflow over) takes half a batch: a full one there is money
//! the next fall has to bring back. On the same month that cut the mean
//! cost at twice the capital by 1.4 % (at most 2.98× the bound instead of
//! 3.01×) and left fewer conversions at one and a half times (at most
//! 0.96 % of per-event's instead of 0.99 %); sweeping half a batch below
//! the maximum while the inflow still runs too took more than 1 % there.
//!
//! With `TREASURY_PLANNER_FORECAST_HORIZON` set (off by default), the same
//! hours of the day before stretch both points
//! ([`BufferLevels::with_day_ahead`]): a refill brings the buffer to at
//! least its trigger plus the deepest fall those hours took (at most a batch
//! below `max`), a sweep down to at most `max` less the highest rise they
//! took (never below the return point). Daily swings then move in fewer,
//! larger conversions; the trigger, and so the risk, is unchanged.
//!
//! With `TREASURY_PLANNER_RELAY_RESERVE` set to `k` (off, 0, by default)
//! and no provider offering `usd_transfer`, the USDC buffer, which a fiat
//! refill then passes through, keeps `k` times what system_buffer_fiat is
//! expected to lose over one conversion's lead time on top of its own
//! trigger ([`BufferLevels::with_relay_reserve`]): a withdrawal burst on the
//! fiat buffer is refilled in one conversion from money already there,
//! instead of two in a row. (broker_operational's drain is not counted:
//! counting it too held more USDC and left fewer seeds clean in the
//! simulator.)
//!
//! `min`, `target` and `max` stay hard limits: the trigger never falls below
//! `min`, the return point and sweep point never pass `max`.
//!
//! `T` counts twice for a USD buffer when no provider offers `usd_transfer`
//! ([`refill_hops`]): its refill may have to pass through the USDC buffer,
//! one conversion after the other. In a watch between window closes, a
//! buffer draining fast enough to cross its minimum before a refill lands
//! takes the drain observed in the open windows (over `T`) when it is the
//! larger ([`BufferLevels::with_observed_drain`]), and its return point is
//! at least that drain above its minimum; when the drain is a burst (beyond
//! the spread of its recent flows, or sooner when the number of its
//! withdrawals already says so, [`crate::planner::Watch::bursting`]), the
//! trigger rises to `min + drain` too, a batch below the return point
//! ([`BufferLevels::in_burst`]); if what it holds, money in flight toward
//! it not counted, would not [outlast](crate::planner::Watch::outlasts)
//! the lead time at that drain, the trigger rises to the return point
//! ([`BufferLevels::topped_up_every_watch`]). A buffer projected less than its
//! drain above its minimum is [urgent](BufferLevels::urgent): givers then
//! give down to their own trigger, and its refill is cut into pieces (see
//! the planner).

use chrono::Duration;
use rust_decimal::{Decimal, MathematicalOps};
use serde::{Deserialize, Serialize};

use super::history::{DayAhead, FlowStats};
use super::{BufferPosition, PlannerSettings};
use crate::domain::{BufferAccount, Currency, Thresholds};

/// How many conversions a refill of `account` may pass through: a USD
/// buffer's refill goes through USDC (two) when no provider offers
/// `usd_transfer` and the USDC buffer has nothing to spare, so its lead
/// time counts twice.
pub fn refill_hops(account: BufferAccount, transfers: bool) -> i32 {
    if account.currency() == Currency::Usd && !transfers {
        2
    } else {
        1
    }
}

/// When and how far one buffer is refilled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferLevels {
    /// Projected below this, the buffer is refilled.
    pub trigger: Decimal,
    /// A refill brings the projected balance up to this; a sweep down to it.
    pub return_point: Decimal,
    /// Above this the buffer sweeps its excess to others.
    pub ceiling: Decimal,
    /// A sweep brings the projected balance down to this (zero in levels
    /// stored before it existed).
    #[serde(default)]
    pub sweep_point: Decimal,
    /// What the buffer is expected to lose while a refill travels.
    pub drain: Decimal,
    /// Windows a refill is expected to take, decision included.
    pub lead_windows: u32,
}

impl BufferLevels {
    /// The levels with a drain observed between window closes (a watch):
    /// the expected loss is at least `observed`, and a refill brings the
    /// buffer at least that far above its minimum (never past its maximum).
    pub fn with_observed_drain(self, observed: Decimal, thresholds: &Thresholds) -> Self {
        let drain = self.drain.max(observed);
        let return_point = self
            .return_point
            .max(thresholds.min().saturating_add(observed))
            .min(thresholds.max());
        Self {
            drain,
            return_point,
            sweep_point: self.sweep_point.max(return_point),
            ..self
        }
    }

    /// The levels of a buffer in a burst (a drain beyond what its flows'
    /// spread explains, see [`crate::planner::Watch::bursting`]): projected
    /// less than its drain above `min`, it needs money now, so the trigger
    /// rises to `min + drain`, but stays a batch below the return point, so
    /// that a burst is met by refills of a batch or more rather than by a
    /// sliver every minute.
    pub fn in_burst(self, min: Decimal, batch_size: Decimal) -> Self {
        let wanted = min.saturating_add(self.drain);
        let room = self.return_point.saturating_sub(batch_size);
        Self {
            trigger: self.trigger.max(wanted.min(room)),
            ..self
        }
    }

    /// The levels of a bursting buffer that cannot [outlast](crate::planner::Watch::outlasts)
    /// the lead time on what it holds: the trigger rises to the return
    /// point, so every watch tops it up to there until the burst passes,
    /// instead of letting refills in flight stand in for money a batch at a
    /// time.
    pub fn topped_up_every_watch(self) -> Self {
        Self {
            trigger: self.trigger.max(self.return_point),
            ..self
        }
    }

    /// The levels of the USDC buffer when it relays refills to the fiat
    /// buffer (no provider offers `usd_transfer`): its trigger also holds
    /// `reserve`, what the fiat buffer is expected to lose over one
    /// conversion's lead time, so its refill can leave at once while the
    /// USDC buffer's own refill travels. At most `target`; the return point
    /// and sweep point stay at or above the trigger.
    pub fn with_relay_reserve(self, reserve: Decimal, target: Decimal) -> Self {
        let trigger = self
            .trigger
            .max(self.trigger.saturating_add(reserve).min(target));
        let return_point = self.return_point.max(trigger);
        Self {
            trigger,
            return_point,
            sweep_point: self.sweep_point.max(return_point),
            ..self
        }
    }

    /// The levels stretched by a [day-ahead forecast](super::FlowHistory::day_ahead):
    /// a refill brings the buffer far enough above its trigger to meet the
    /// fall the same hours took a day before (at most a batch below the
    /// maximum), and a sweep leaves room for the rise they took; neither
    /// point moves the other way.
    pub fn with_day_ahead(
        self,
        ahead: DayAhead,
        thresholds: &Thresholds,
        batch_size: Decimal,
    ) -> Self {
        let cap = thresholds.max().saturating_sub(batch_size);
        let return_point = self
            .return_point
            .max(self.trigger.saturating_add(ahead.fall).min(cap));
        let sweep_point = self
            .sweep_point
            .min(thresholds.max().saturating_sub(ahead.rise))
            .max(return_point);
        Self {
            return_point,
            sweep_point,
            ..self
        }
    }

    /// Whether a buffer projected at `projected` is expected below `min`
    /// before a refill planned now could land.
    pub fn urgent(&self, projected: Decimal, min: Decimal) -> bool {
        projected - self.drain < min
    }

    /// Whether a buffer projected at `projected` needs money (below its
    /// trigger) and is [urgent](Self::urgent).
    pub fn urgent_need(&self, projected: Decimal, min: Decimal) -> bool {
        projected < self.trigger && self.urgent(projected, min)
    }
}

/// The windows a refill takes: the lead time in windows, rounded up, plus one.
pub fn lead_windows(lead_time: Duration, window: Duration) -> u32 {
    let window_ms = window.num_milliseconds().max(1);
    let lead_ms = lead_time.num_milliseconds().max(0);
    let windows = (lead_ms + window_ms - 1) / window_ms;
    u32::try_from(windows).unwrap_or(u32::MAX).saturating_add(1)
}

/// How far below its maximum a sweep brings a buffer: a batch while its
/// latest windows still bring money in (so the next sweep is a batch away),
/// half a batch once they no longer do (the rise is over, and what a sweep
/// takes below the maximum then tends to come back at the turn of the
/// flows, paying twice).
pub fn sweep_room(stats: FlowStats, batch_size: Decimal) -> Decimal {
    if stats.recent_mean > Decimal::ZERO {
        batch_size
    } else {
        batch_size / Decimal::TWO
    }
}

/// The levels of `position` given its recent flow and the lead time.
pub fn levels(
    position: &BufferPosition,
    stats: FlowStats,
    lead_time: Duration,
    window: Duration,
    settings: &PlannerSettings,
) -> BufferLevels {
    let t = position.thresholds;
    let n = lead_windows(lead_time, window);
    let n_dec = Decimal::from(n);
    let drain = (-stats.mean.min(stats.recent_mean))
        .max(Decimal::ZERO)
        .saturating_mul(n_dec);
    let safety = settings
        .safety_factor
        .saturating_mul(stats.std_dev)
        .saturating_mul(n_dec.sqrt().unwrap_or(Decimal::ONE));
    let by_flow = t.min().saturating_add(drain).saturating_add(safety);
    let trigger = if stats.windows == 0 {
        by_flow.max(t.target() - position.batch_size)
    } else {
        by_flow
    }
    .clamp(t.min(), t.target());
    let return_point = t
        .target()
        .max(trigger.saturating_add(position.batch_size))
        .saturating_add(drain)
        .min(t.max());
    BufferLevels {
        trigger,
        return_point,
        ceiling: t.max(),
        sweep_point: t
            .max()
            .saturating_sub(sweep_room(stats, position.batch_size))
            .max(return_point),
        drain,
        lead_windows: n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn position() -> BufferPosition {
        BufferPosition {
            account: BufferAccount::SystemBufferUsdc,
            thresholds: Thresholds::new(dec!(10000), dec!(50000), dec!(100000)).unwrap(),
            batch_size: dec!(20000),
            balance: dec!(50000),
            incoming: Decimal::ZERO,
            outgoing: Decimal::ZERO,
        }
    }

    /// The levels of [`position`] with a 15-minute lead and 5-minute windows.
    fn over_15_minutes(stats: FlowStats) -> BufferLevels {
        over_15_minutes_at(&position(), stats)
    }

    /// The levels of `p` with a 15-minute lead and 5-minute windows.
    fn over_15_minutes_at(p: &BufferPosition, stats: FlowStats) -> BufferLevels {
        levels(
            p,
            stats,
            Duration::minutes(15),
            Duration::minutes(5),
            &PlannerSettings::default(),
        )
    }

    #[test]
    fn a_relay_reserve_raises_the_trigger_up_to_the_target() {
        let base = BufferLevels {
            trigger: dec!(30000),
            return_point: dec!(50000),
            ceiling: dec!(100000),
            sweep_point: dec!(80000),
            drain: dec!(5000),
            lead_windows: 4,
        };
        let some = base.with_relay_reserve(dec!(12000), dec!(50000));
        assert_eq!(some.trigger, dec!(42000));
        assert_eq!(
            (some.return_point, some.sweep_point),
            (dec!(50000), dec!(80000))
        );
        let much = base.with_relay_reserve(dec!(90000), dec!(50000));
        assert_eq!(much.trigger, dec!(50000), "never past the target");
        let above = BufferLevels {
            trigger: dec!(60000),
            ..base
        }
        .with_relay_reserve(dec!(1000), dec!(50000));
        assert_eq!(
            above.trigger,
            dec!(60000),
            "a trigger above the target stays"
        );
        assert_eq!(above.return_point, dec!(60000));
        assert_eq!(base.with_relay_reserve(Decimal::ZERO, dec!(50000)), base);
    }

    #[test]
    fn calm_flows_keep_the_batch_rule() {
        let l = levels(
            &position(),
            FlowStats::default(),
            Duration::minutes(20),
            Duration::minutes(5),
            &PlannerSettings::default(),
        );
        assert_eq!(l.lead_windows, 5);
        assert_eq!(l.trigger, dec!(30000), "no windows yet: the batch rule");
        assert_eq!(l.return_point, dec!(50000));
        assert_eq!(
            l.sweep_point,
            dec!(90000),
            "no inflow seen: half a batch below max"
        );
    }

    #[test]
    fn levels_stored_without_a_sweep_point_still_read() {
        let stored = serde_json::json!({
            "trigger": "30000", "return_point": "50000", "ceiling": "100000",
            "drain": "0", "lead_windows": 5
        });
        let l: BufferLevels = serde_json::from_value(stored).unwrap();
        assert_eq!(l.return_point, dec!(50000));
        assert_eq!(l.sweep_point, Decimal::ZERO);
    }

    #[test]
    fn with_history_the_risk_times_the_refill_and_the_batch_sizes_it() {
        let stats = FlowStats {
            mean: Decimal::ZERO,
            std_dev: dec!(1000),
            recent_mean: Decimal::ZERO,
            outflow_events: Decimal::ZERO,
            windows: 288,
        };
        let l = over_15_minutes(stats);
        // n = 4: 10000 + 2·1000·√4, well below the batch rule's 30000.
        assert_eq!(l.trigger, dec!(14000));
        assert_eq!(
            l.return_point,
            dec!(50000),
            "target: a refill of at least a batch"
        );
        assert_eq!(l.sweep_point, dec!(90000));
    }

    #[test]
    fn a_sweep_takes_a_batch_while_money_flows_in_and_half_a_batch_after() {
        let flowing_in = FlowStats {
            mean: dec!(500),
            std_dev: dec!(1000),
            recent_mean: dec!(3000),
            windows: 288,
            ..FlowStats::default()
        };
        assert_eq!(over_15_minutes(flowing_in).sweep_point, dec!(80000));
        for recent_mean in [Decimal::ZERO, dec!(-3000)] {
            let l = over_15_minutes(FlowStats {
                recent_mean,
                ..flowing_in
            });
            assert_eq!(l.sweep_point, dec!(90000), "recent mean {recent_mean}");
        }
        assert_eq!(sweep_room(flowing_in, dec!(20000)), dec!(20000));
        // Never below the return point, whichever the room.
        let p = BufferPosition {
            batch_size: dec!(80000),
            ..position()
        };
        let l = over_15_minutes_at(&p, FlowStats::default());
        assert_eq!(l.sweep_point, l.return_point.max(dec!(60000)));
    }

    #[test]
    fn volatility_and_drain_raise_the_trigger_within_the_hard_limits() {
        let stats = FlowStats {
            mean: dec!(-2000),
            std_dev: dec!(3000),
            recent_mean: dec!(-1000),
            outflow_events: Decimal::ZERO,
            windows: 288,
        };
        let l = over_15_minutes(stats);
        // n = 4: 10000 + drain 4·2000 + 2·3000·√4 = 30000;
        // the return point adds the drain to target.
        assert_eq!(l.drain, dec!(8000));
        assert_eq!(l.trigger, dec!(30000));
        assert_eq!(l.return_point, dec!(58000));
        let wild = FlowStats {
            std_dev: dec!(30000),
            ..stats
        };
        let l = over_15_minutes(wild);
        assert_eq!(l.trigger, dec!(50000), "never above target");
        assert_eq!(
            l.return_point,
            dec!(78000),
            "a batch above the target when it lands, plus the drain"
        );
    }

    #[test]
    fn an_observed_drain_raises_the_drain_and_the_return_point_up_to_max() {
        let p = position();
        let calm = levels(
            &p,
            FlowStats::default(),
            Duration::minutes(20),
            Duration::minutes(5),
            &PlannerSettings::default(),
        );
        let watched = calm.with_observed_drain(dec!(60000), &p.thresholds);
        assert_eq!(watched.drain, dec!(60000));
        assert_eq!(watched.return_point, dec!(70000), "min + observed drain");
        assert_eq!(watched.trigger, calm.trigger);
        assert!(watched.urgent(dec!(65000), p.thresholds.min()));
        assert!(!calm.urgent(dec!(65000), p.thresholds.min()));
        let huge = calm.with_observed_drain(dec!(500000), &p.thresholds);
        assert_eq!(huge.return_point, dec!(100000), "never past max");
        assert_eq!(
            huge.sweep_point,
            dec!(100000),
            "never below the return point"
        );
        let small = calm.with_observed_drain(dec!(1000), &p.thresholds);
        assert_eq!(
            small.return_point, calm.return_point,
            "a drain the return point already covers leaves it"
        );
    }

    #[test]
    fn in_a_burst_the_trigger_rises_to_the_drain_a_batch_below_the_return_point() {
        let p = position();
        let calm = levels(
            &p,
            FlowStats::default(),
            Duration::minutes(20),
            Duration::minutes(5),
            &PlannerSettings::default(),
        );
        // min 10000, batch 20000, max 100000; the calm trigger is 30,000.
        assert_eq!(calm.trigger, dec!(30000));
        let burst = |drain: Decimal| {
            calm.with_observed_drain(drain, &p.thresholds)
                .in_burst(p.thresholds.min(), p.batch_size)
        };
        // A drain of 60,000: return point 70,000, trigger 50,000 (a batch below).
        let big = burst(dec!(60000));
        assert_eq!((big.trigger, big.return_point), (dec!(50000), dec!(70000)));
        // A drain past the band: the return point stops at max, the trigger a batch below.
        let wild = burst(dec!(200000));
        assert_eq!(
            (wild.trigger, wild.return_point),
            (dec!(80000), dec!(100000))
        );
        // A small drain leaves the trigger where it was (never lowers it).
        let small = burst(dec!(1000));
        assert_eq!(small.trigger, calm.trigger);
        assert!(small.trigger <= small.return_point);
        // Living on refills in flight: topped up to the return point.
        let thin = big.topped_up_every_watch();
        assert_eq!(
            (thin.trigger, thin.return_point),
            (dec!(70000), dec!(70000))
        );
        assert_eq!(thin.drain, big.drain);
    }

    #[test]
    fn a_usd_refill_counts_two_hops_only_without_a_transfer_rail() {
        assert_eq!(refill_hops(BufferAccount::SystemBufferFiat, false), 2);
        assert_eq!(refill_hops(BufferAccount::BrokerOperational, false), 2);
        assert_eq!(refill_hops(BufferAccount::SystemBufferFiat, true), 1);
        assert_eq!(refill_hops(BufferAccount::SystemBufferUsdc, false), 1);
    }

    #[test]
    fn the_day_ahead_stretches_refills_and_sweeps_within_the_band() {
        let t = position().thresholds;
        let calm = over_15_minutes(FlowStats::default());
        let ahead = |fall, rise| calm.with_day_ahead(DayAhead { fall, rise }, &t, dec!(20000));
        // Nothing ahead: unchanged.
        assert_eq!(ahead(Decimal::ZERO, Decimal::ZERO), calm);
        // A fall of 60,000 ahead: refilled to trigger + 60,000, capped a batch below max.
        let fall = ahead(dec!(60000), Decimal::ZERO);
        assert_eq!(
            fall.return_point,
            (calm.trigger + dec!(60000)).min(dec!(80000))
        );
        assert_eq!(fall.trigger, calm.trigger);
        let deep = ahead(dec!(500000), Decimal::ZERO);
        assert_eq!(deep.return_point, dec!(80000));
        assert!(deep.sweep_point >= deep.return_point);
        // A rise of 40,000 ahead: a sweep leaves room for it, never below the return point.
        let rise = ahead(Decimal::ZERO, dec!(40000));
        assert_eq!(rise.sweep_point, dec!(60000).max(calm.return_point));
        assert_eq!(rise.return_point, calm.return_point);
        let flood = ahead(Decimal::ZERO, dec!(1000000));
        assert_eq!(flood.sweep_point, calm.return_point);
    }
}
