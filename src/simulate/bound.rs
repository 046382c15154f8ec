//! A lower bound on what any policy could achieve: the fewest conversions
//! and the least cost with instant, unlimited conversions.
//!
//! Events move money between buffers at par, so the total capital is fixed
//! and only its split between currencies needs conversions. Every buffer
//! must stay within its min..max, so the USDC balance lives in the band
//! `[max(min_usdc, capital − max_fiat − max_broker), min(max_usdc, capital −
//! min_fiat − min_broker)]`. Following the USDC flow path (as if USD moved
//! between the two USD buffers at no cost):
//!
//! - the least volume any policy must convert is that of a lazy tracker that
//!   converts only what is needed the moment the band's edge is crossed;
//! - the fewest conversions any policy needs: between two conversions the
//!   USDC balance follows the flows alone, so each stretch between
//!   conversions must be one whose flows, added up from its start, never
//!   span more than the band (and the first must stay in the band from the
//!   opening balance). Cutting the trace greedily into the longest such
//!   stretches gives the fewest of them, since any part of a stretch that
//!   fits also fits: one conversion starts each stretch after the first. (A
//!   tracker that jumps to the band's opposite edge at each crossing is not
//!   a bound: the next event in the other direction crosses again.)
//!
//! Without a transfer rail (no provider supports `usd_transfer`), USD cannot
//! move between the two USD buffers without conversions: every conversion
//! has exactly one of them on its USD side, so the two are also bounded
//! each on its own band, and the conversions touching system_buffer_fiat
//! plus those touching broker_operational are at least the sum of their own
//! bounds (volume and count alike). The bound takes the larger of the USDC
//! path's figure and that sum; with a transfer rail it keeps the USDC
//! path's alone (transfers are not conversions).
//!
//! Every policy converts at least that volume and at least that many times,
//! so `volume × cheapest proportional rate + count × cheapest fixed fee` is
//! below the cost of any policy.

use rust_decimal::Decimal;

use super::report::LowerBound;
use super::scenario::{BufferSetup, World};
use crate::domain::{BufferAccount, FlowEvent};

/// The lower bound for `events` in `world`.
pub fn lower_bound(world: &World, events: &[FlowEvent]) -> LowerBound {
    let setup = |a: BufferAccount| world.buffers.get(&a).copied();
    let (Some(usdc), Some(fiat), Some(broker)) = (
        setup(BufferAccount::SystemBufferUsdc),
        setup(BufferAccount::SystemBufferFiat),
        setup(BufferAccount::BrokerOperational),
    ) else {
        return LowerBound::default();
    };
    let capital = world.start_capital();
    let usd =
        |f: fn(&crate::domain::Thresholds) -> Decimal| f(&fiat.thresholds) + f(&broker.thresholds);
    let low = usdc.thresholds.min().max(capital - usd(|t| t.max()));
    let high = usdc
        .thresholds
        .max()
        .min(capital - usd(|t| t.min()))
        .max(low);
    let deltas = |account: BufferAccount| {
        events.iter().map(move |event| {
            event
                .buffer_deltas()
                .iter()
                .filter(|d| d.account == account)
                .map(|d| d.delta)
                .sum::<Decimal>()
        })
    };
    let (mut volume, mut count) = band_needs(
        usdc.start,
        low,
        high,
        deltas(BufferAccount::SystemBufferUsdc),
    );
    let transfer_rail = world.providers.iter().any(|p| p.row.supports_usd_transfer);
    if !transfer_rail {
        let own = |account: BufferAccount, setup: BufferSetup| {
            let t = setup.thresholds;
            band_needs(setup.start, t.min(), t.max(), deltas(account))
        };
        let (fiat_volume, fiat_count) = own(BufferAccount::SystemBufferFiat, fiat);
        let (broker_volume, broker_count) = own(BufferAccount::BrokerOperational, broker);
        volume = volume.max(fiat_volume + broker_volume);
        count = count.max(fiat_count + broker_count);
    }
    let bps = Decimal::from(10_000);
    let converting = || world.providers.iter().filter(|p| p.row.converts());
    let rate = converting()
        .map(|p| p.row.fee_percentage + p.row.spread_bps / bps)
        .min()
        .unwrap_or_default();
    let fixed = converting()
        .map(|p| p.row.fee_fixed)
        .min()
        .unwrap_or_default();
    LowerBound {
        policy: "lower-bound".into(),
        conversions: count,
        conversion_volume: volume,
        conversion_cost: (volume * rate + Decimal::from(count) * fixed).round_dp(2),
    }
}

/// The least volume and the fewest conversions that keep a balance opening
/// at `opening` within `[low, high]` under `deltas`: the lazy tracker's
/// volume and the greedy cut's count (see the module doc).
fn band_needs(
    opening: Decimal,
    low: Decimal,
    high: Decimal,
    deltas: impl Iterator<Item = Decimal>,
) -> (Decimal, u64) {
    let mut lazy = opening;
    let mut volume = Decimal::ZERO;
    let mut stretches = Stretches::new(opening, low, high);
    for delta in deltas {
        lazy += delta;
        if lazy < low {
            volume += low - lazy;
            lazy = low;
        } else if lazy > high {
            volume += lazy - high;
            lazy = high;
        }
        stretches.add(delta);
    }
    (volume, stretches.conversions)
}

/// The greedy cut of a balance's flows into the longest stretches that fit the
/// band `[low, high]` without a conversion (see the module doc).
#[derive(Debug, Clone, Copy)]
struct Stretches {
    low: Decimal,
    high: Decimal,
    /// The flows added up since the current stretch began.
    sum: Decimal,
    /// Their lowest and highest running sums (zero included: the balance
    /// the stretch starts at must be in the band too).
    lowest: Decimal,
    highest: Decimal,
    /// The balance the first stretch starts at; `None` once a conversion
    /// has set it freely.
    opening: Option<Decimal>,
    /// Conversions so far: one at the start of each stretch after the first.
    conversions: u64,
}

impl Stretches {
    fn new(opening: Decimal, low: Decimal, high: Decimal) -> Self {
        Self {
            low,
            high,
            sum: Decimal::ZERO,
            lowest: Decimal::ZERO,
            highest: Decimal::ZERO,
            opening: Some(opening),
            conversions: 0,
        }
    }

    /// Whether a stretch whose running sums span `lowest..=highest` can
    /// stay in the band.
    fn fits(&self, lowest: Decimal, highest: Decimal) -> bool {
        match self.opening {
            Some(start) => start + lowest >= self.low && start + highest <= self.high,
            None => highest - lowest <= self.high - self.low,
        }
    }

    fn add(&mut self, delta: Decimal) {
        let sum = self.sum + delta;
        let (lowest, highest) = (self.lowest.min(sum), self.highest.max(sum));
        if self.fits(lowest, highest) {
            (self.sum, self.lowest, self.highest) = (sum, lowest, highest);
            return;
        }
        // A conversion just before this event starts a new stretch at a
        // balance of its choosing.
        self.conversions += 1;
        self.opening = None;
        (self.sum, self.lowest, self.highest) =
            (delta, delta.min(Decimal::ZERO), delta.max(Decimal::ZERO));
        if !self.fits(self.lowest, self.highest) {
            // One event larger than the band: a conversion right after it too.
            self.conversions += 1;
            (self.sum, self.lowest, self.highest) = (Decimal::ZERO, Decimal::ZERO, Decimal::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn count(opening: Decimal, deltas: &[Decimal]) -> u64 {
        let mut s = Stretches::new(opening, dec!(10), dec!(100));
        for d in deltas {
            s.add(*d);
        }
        s.conversions
    }

    #[test]
    fn flows_inside_the_band_need_no_conversion() {
        assert_eq!(count(dec!(50), &[dec!(40), dec!(-80), dec!(30)]), 0);
    }

    #[test]
    fn a_zigzag_wider_than_the_band_needs_one_conversion_per_band_width_of_drift() {
        // From 50, falling by 30 a step: out of the band at the second step
        // (−10). The next stretch may start anywhere and span 90.
        let falling: Vec<Decimal> = vec![dec!(-30); 7];
        // Running sums −30..−210: stretches [−30] fits from 50, then
        // {−30,−30,−30} span 90, then {−30,−30,−30}: two conversions.
        assert_eq!(count(dec!(50), &falling), 2);
        // Small moves back and forth after a conversion cost nothing more,
        // where jumping to the band's opposite edge would cross again.
        let mut zigzag = falling.clone();
        zigzag.extend([dec!(1), dec!(-1), dec!(1), dec!(-1)]);
        assert_eq!(count(dec!(50), &zigzag), 2);
    }

    #[test]
    fn the_lazy_tracker_converts_only_what_crosses_the_band() {
        let (volume, count) = band_needs(
            dec!(50),
            dec!(10),
            dec!(100),
            [dec!(-30), dec!(-30), dec!(-30), dec!(70), dec!(60)].into_iter(),
        );
        // 50 → 20 → −10 (20 in, at 10) → −20 (30 in, at 10) → 80 → 140 (40 out).
        assert_eq!(volume, dec!(90));
        // From 50 the running sums reach −10 at the second event: a cut. The
        // next stretch's sums (−30, −60, 10, then 70) span 130 > 90 at the
        // last event: a second cut.
        assert_eq!(count, 2);
    }

    #[test]
    fn one_event_larger_than_the_band_forces_conversions_around_it() {
        assert_eq!(count(dec!(50), &[dec!(-200)]), 2);
        assert_eq!(count(dec!(50), &[dec!(-200), dec!(5), dec!(-5)]), 2);
    }
}
