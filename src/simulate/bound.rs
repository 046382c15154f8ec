//! A lower bound on what any policy could achieve: the fewest conversions
//! and the least cost with instant, unlimited conversions.
//!
//! Events move money between buffers at par, so the total capital is fixed
//! and only its split between currencies needs conversions. Every buffer
//! must stay within its min..max, so the USDC balance lives in the band
//! `[max(min_usdc, capital − max_fiat − max_broker), min(max_usdc, capital −
//! min_fiat − min_broker)]`, and USD is assumed to move between the two USD
//! buffers at no cost. Following the USDC flow path:
//!
//! - the least volume any policy must convert is that of a lazy tracker that
//!   converts only what is needed the moment the band's edge is crossed;
//! - the fewest conversions any policy needs is that of a tracker that, at
//!   each crossing, jumps to the band's opposite edge.
//!
//! Every policy converts at least that volume and at least that many times,
//! so `volume × cheapest proportional rate + count × cheapest fixed fee` is
//! below the cost of any policy.

use rust_decimal::Decimal;

use super::report::LowerBound;
use super::scenario::World;
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
    let (mut lazy, mut jumping) = (usdc.start, usdc.start);
    let (mut volume, mut count) = (Decimal::ZERO, 0u64);
    for event in events {
        let delta: Decimal = event
            .buffer_deltas()
            .iter()
            .filter(|d| d.account == BufferAccount::SystemBufferUsdc)
            .map(|d| d.delta)
            .sum();
        lazy += delta;
        if lazy < low {
            volume += low - lazy;
            lazy = low;
        } else if lazy > high {
            volume += lazy - high;
            lazy = high;
        }
        jumping += delta;
        if jumping < low {
            count += 1;
            jumping = high;
        } else if jumping > high {
            count += 1;
            jumping = low;
        }
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
