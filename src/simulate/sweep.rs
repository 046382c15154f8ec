//! The engine over many seeds as generated (no faults injected): one row per
//! seed with what the planner's goals are stated in — conversions and their
//! share of the per-event baseline's, cost and its ratio to the lower bound,
//! minutes below min and below zero, opposite cycles and unfunded commands —
//! and the totals over the seeds (`treasury simulate --seeds A..B --sweep`).

use std::fmt::Write as _;

use rust_decimal::Decimal;
use serde::Serialize;

use super::bound::lower_bound;
use super::compare::engine_only;
use super::invariants::Violation;
use super::parallel::map_in_order;
use super::policies::PerEventPolicy;
use super::scenario::World;
use crate::domain::FlowEvent;
use crate::planner::PlannerSettings;

/// The engine's figures on one seed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeedRow {
    pub seed: u64,
    pub conversions: u64,
    /// Conversions the per-event baseline starts on the same trace.
    pub per_event_conversions: u64,
    pub conversion_cost: Decimal,
    /// The simulator's lower bound on the same trace.
    pub lower_bound_cost: Decimal,
    pub minutes_below_min: f64,
    pub minutes_below_zero: f64,
    pub opposite_conversion_cycles: u64,
    pub unfunded_commands: u64,
}

impl SeedRow {
    /// The engine's conversions as a percentage of the per-event
    /// baseline's (zero when that has none).
    pub fn conversion_share(&self) -> Decimal {
        if self.per_event_conversions == 0 {
            Decimal::ZERO
        } else {
            Decimal::from(self.conversions) * Decimal::ONE_HUNDRED
                / Decimal::from(self.per_event_conversions)
        }
    }

    /// The cost over the lower bound's (zero when the bound is zero).
    pub fn cost_ratio(&self) -> Decimal {
        if self.lower_bound_cost.is_zero() {
            Decimal::ZERO
        } else {
            self.conversion_cost / self.lower_bound_cost
        }
    }
}

/// Runs the engine on every seed of `seeds`, each on the trace `events_for`
/// gives it, on `threads` threads; rows in seed order. The first invariant
/// broken stops the sweep and names its seed.
pub fn sweep(
    world: &World,
    seeds: &[u64],
    events_for: &(dyn Fn(u64) -> Vec<FlowEvent> + Sync),
    settings: PlannerSettings,
    threads: usize,
) -> Result<Vec<SeedRow>, (u64, Violation)> {
    let rows = map_in_order(seeds, threads, &|&seed| {
        let events = events_for(seed);
        engine_only(world, &events, seed, settings)
            .map(|outcome| {
                let r = outcome.report;
                SeedRow {
                    seed,
                    conversions: r.conversions,
                    per_event_conversions: PerEventPolicy::commands_for(&events),
                    conversion_cost: r.conversion_cost,
                    lower_bound_cost: lower_bound(world, &events).conversion_cost,
                    minutes_below_min: r.minutes_below_min,
                    minutes_below_zero: r.minutes_below_zero,
                    opposite_conversion_cycles: r.opposite_conversion_cycles,
                    unfunded_commands: r.unfunded_commands,
                }
            })
            .map_err(|v| (seed, v))
    });
    let mut rows = rows.into_iter().flatten().collect::<Result<Vec<_>, _>>()?;
    rows.sort_by_key(|r| r.seed);
    Ok(rows)
}

/// The totals over a sweep's rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepSummary {
    pub seeds: usize,
    /// Seeds with no minute below zero.
    pub clean_seeds: usize,
    pub minutes_below_zero: f64,
    pub minutes_below_min: f64,
    /// The most minutes below min on one seed.
    pub worst_minutes_below_min: f64,
    pub fewest_conversions: u64,
    pub most_conversions: u64,
    /// The largest share of the per-event baseline's conversions on one
    /// seed, in percent.
    pub worst_conversion_share: Decimal,
    pub mean_cost: Decimal,
    pub worst_cost_ratio: Decimal,
    pub opposite_conversion_cycles: u64,
    pub unfunded_commands: u64,
}

/// The totals of `rows`.
pub fn summary(rows: &[SeedRow]) -> SweepSummary {
    let cost: Decimal = rows.iter().map(|r| r.conversion_cost).sum();
    SweepSummary {
        seeds: rows.len(),
        clean_seeds: rows.iter().filter(|r| r.minutes_below_zero == 0.0).count(),
        minutes_below_zero: rows.iter().map(|r| r.minutes_below_zero).sum(),
        minutes_below_min: rows.iter().map(|r| r.minutes_below_min).sum(),
        worst_minutes_below_min: rows.iter().map(|r| r.minutes_below_min).fold(0.0, f64::max),
        fewest_conversions: rows.iter().map(|r| r.conversions).min().unwrap_or(0),
        most_conversions: rows.iter().map(|r| r.conversions).max().unwrap_or(0),
        worst_conversion_share: rows
            .iter()
            .map(SeedRow::conversion_share)
            .max()
            .unwrap_or_default(),
        mean_cost: if rows.is_empty() {
            Decimal::ZERO
        } else {
            cost / Decimal::from(rows.len())
        },
        worst_cost_ratio: rows
            .iter()
            .map(SeedRow::cost_ratio)
            .max()
            .unwrap_or_default(),
        opposite_conversion_cycles: rows.iter().map(|r| r.opposite_conversion_cycles).sum(),
        unfunded_commands: rows.iter().map(|r| r.unfunded_commands).sum(),
    }
}

/// The terminal table: one row per seed, then the totals.
pub fn table(title: &str, rows: &[SeedRow]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    let _ = writeln!(
        out,
        "{:>5} {:>6} {:>6} {:>12} {:>12} {:>7} {:>8} {:>8} {:>8} {:>8}",
        "SEED",
        "CONV",
        "% EVT",
        "COST",
        "LOWER BOUND",
        "RATIO",
        "<MIN m",
        "<0 m",
        "OPPOSITE",
        "UNFUNDED"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:>5} {:>6} {:>6} {:>12} {:>12} {:>7} {:>8.1} {:>8.1} {:>8} {:>8}",
            r.seed,
            r.conversions,
            r.conversion_share().round_dp(2).to_string(),
            r.conversion_cost.round_dp(2).to_string(),
            r.lower_bound_cost.round_dp(2).to_string(),
            r.cost_ratio().round_dp(2).to_string(),
            r.minutes_below_min,
            r.minutes_below_zero,
            r.opposite_conversion_cycles,
            r.unfunded_commands,
        );
    }
    let s = summary(rows);
    let _ = writeln!(
        out,
        "{} seeds: {} with 0 minutes below zero ({:.1} in all); {:.1} minutes below min in all, \
         at most {:.1} on one seed; {}–{} conversions, at most {} % of per-event's; mean cost {}, at most {}× the lower bound; \
         {} opposite cycles, {} unfunded commands",
        s.seeds,
        s.clean_seeds,
        s.minutes_below_zero,
        s.minutes_below_min,
        s.worst_minutes_below_min,
        s.fewest_conversions,
        s.most_conversions,
        s.worst_conversion_share.round_dp(2),
        s.mean_cost.round_dp(2),
        s.worst_cost_ratio.round_dp(2),
        s.opposite_conversion_cycles,
        s.unfunded_commands,
    );
    out
}
