//! The simulator's report: one row per policy, the lower bound beside them,
//! as a terminal table or as JSON (one object per policy, keys named as the
//! metrics).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;

/// How one buffer fared.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BufferOutcome {
    pub minutes_below_min: f64,
    pub minutes_below_zero: f64,
    pub minutes_above_max: f64,
    /// Lowest actual balance reached.
    pub lowest: Decimal,
    pub final_balance: Decimal,
}

/// How one policy fared over the trace.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PolicyReport {
    pub policy: String,
    /// Conversions completed at providers.
    pub conversions: u64,
    /// Commands the policy issued.
    pub commands: u64,
    /// USD transfers between the two USD buffers completed (not conversions).
    pub transfers: u64,
    /// Source amount converted, at par.
    pub conversion_volume: Decimal,
    /// Fees, spread and fixed fees paid to providers, at par: conversions and
    /// transfers (the latter also in `transfer_cost`).
    pub conversion_cost: Decimal,
    /// The part of `conversion_cost` paid for transfers.
    pub transfer_cost: Decimal,
    /// The fee part of the cost.
    pub fees: Decimal,
    /// Source amount converted per route (`source->destination`).
    pub volume_by_route: BTreeMap<String, Decimal>,
    /// Minutes with any buffer below its minimum.
    pub minutes_below_min: f64,
    /// Minutes with any buffer below zero.
    pub minutes_below_zero: f64,
    /// Minutes with any buffer above its maximum.
    pub minutes_above_max: f64,
    /// Events whose paying buffer held less than the event needed.
    pub unpaid_events: u64,
    /// Time-weighted capital above the buffers' minimums.
    pub idle_capital: Decimal,
    /// What that idle capital cost at the scenario's rate.
    pub opportunity_cost: Decimal,
    /// Conversions started while another one to the same buffer was in flight.
    pub overlapping_conversions: u64,
    /// Stretches of some buffer below its minimum.
    pub breaches: u64,
    pub recovery_p50_minutes: Option<f64>,
    pub recovery_p99_minutes: Option<f64>,
    /// Cycles that planned conversions in both directions.
    pub opposite_conversion_cycles: u64,
    /// Commands that take their source below its minimum, counting only money
    /// that is there (never conversions still in flight toward it).
    pub unfunded_commands: u64,
    /// Jobs that ended failed (no provider could take them).
    pub failed_jobs: u64,
    /// Events counted in closed windows.
    pub counted_events: u64,
    /// Whether a buffer was below its minimum when the run ended.
    pub in_breach_at_end: bool,
    /// When the last breach healed.
    pub last_recovery: Option<DateTime<Utc>>,
    pub simulated_until: DateTime<Utc>,
    pub buffers: BTreeMap<String, BufferOutcome>,
}

impl PolicyReport {
    /// An empty report for `policy`.
    pub fn named(policy: &str) -> Self {
        Self {
            policy: policy.to_owned(),
            ..Self::default()
        }
    }
}

/// The fewest conversions and least cost any policy could achieve with
/// instant, unlimited conversions (see [`super::bound`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LowerBound {
    pub policy: String,
    pub conversions: u64,
    pub conversion_volume: Decimal,
    pub conversion_cost: Decimal,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub trace: String,
    pub events: usize,
    pub seed: u64,
    pub policies: Vec<PolicyReport>,
    pub lower_bound: LowerBound,
}

impl Comparison {
    /// One JSON object per policy (the lower bound last), in an array.
    pub fn to_json(&self) -> serde_json::Value {
        let mut rows: Vec<serde_json::Value> = self
            .policies
            .iter()
            .map(|p| serde_json::to_value(p).unwrap_or_default())
            .collect();
        rows.push(serde_json::to_value(&self.lower_bound).unwrap_or_default());
        serde_json::json!({
            "trace": self.trace,
            "events": self.events,
            "seed": self.seed,
            "policies": rows,
        })
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} ({} events, seed {})",
            self.trace, self.events, self.seed
        );
        write_policy_rows(&mut out, &self.policies);
        let b = &self.lower_bound;
        let _ = writeln!(
            out,
            "{:<14} {:>7} {:>6} {:>12} {:>8} {:>8} {:>8} {:>7} {:>12} {:>10} {:>6} {:>9} {:>9} {:>8}",
            b.policy,
            b.conversions,
            "-",
            b.conversion_cost.round_dp(2).to_string(),
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            "-",
            "-"
        );
        out
    }
}

/// The table's header and one row per report, as [`Comparison::table`] prints them.
fn write_policy_rows(out: &mut String, policies: &[PolicyReport]) {
    let _ = writeln!(
        out,
        "{:<14} {:>7} {:>6} {:>12} {:>8} {:>8} {:>8} {:>7} {:>12} {:>10} {:>6} {:>9} {:>9} {:>8}",
        "POLICY",
        "CONV",
        "XFER",
        "COST",
        "<MIN m",
        "<0 m",
        ">MAX m",
        "UNPAID",
        "IDLE CAP",
        "OPP COST",
        "OVERL",
        "REC p50",
        "REC p99",
        "OPPOSITE"
    );
    let opt = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |m| format!("{m:.1}"));
    for p in policies {
        let _ = writeln!(
            out,
            "{:<14} {:>7} {:>6} {:>12} {:>8.1} {:>8.1} {:>8.1} {:>7} {:>12} {:>10} {:>6} {:>9} {:>9} {:>8}",
            p.policy,
            p.conversions,
            p.transfers,
            p.conversion_cost.round_dp(2).to_string(),
            p.minutes_below_min,
            p.minutes_below_zero,
            p.minutes_above_max,
            p.unpaid_events,
            p.idle_capital.round_dp(0).to_string(),
            p.opportunity_cost.round_dp(2).to_string(),
            p.overlapping_conversions,
            opt(p.recovery_p50_minutes),
            opt(p.recovery_p99_minutes),
            p.opposite_conversion_cycles,
        );
    }
}

/// A table of `policies` alone (no lower bound) under `title`, in the
/// columns of [`Comparison::table`].
pub fn policy_table(title: &str, policies: &[PolicyReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{title}");
    write_policy_rows(&mut out, policies);
    out
}
