//! `treasury simulate --recommend`: the buffer thresholds with the least
//! total cost over a trace that keep every buffer above zero, found by
//! running the engine's own policy ([`EnginePolicy`], the planner the live
//! settlement cycle calls) on candidate worlds.
//!
//! **Knobs.** Per buffer: `min_threshold`, `target_threshold`,
//! `max_threshold` and `conversion_batch_size`, always with `0 < min <
//! target < max` and `batch_size > 0` (the `buffer_thresholds` CHECK
//! constraints). A candidate's opening balance moves with its target (the
//! current start × candidate target / current target), so with the
//! scenario default — opening balances at the targets — every candidate
//! opens at its own target.
//!
//! **Cost.** `conversion_cost + capital_cost`, summed over the evaluation
//! runs. Every flow moves money between two buffers at par and the engine
//! only converts between them, so the capital the three buffers hold over a
//! run is their opening capital (less the costs paid, a few hundredths of a
//! percent): `capital_cost = opportunity_cost_rate × Σ opening balances ×
//! duration / 365 days`. The report's own `opportunity_cost` prices only
//! capital above each buffer's minimum; it is shown, but it cannot be the
//! objective, since raising a minimum would make it smaller while the same
//! money sits in the same buffer.
//!
//! **Feasible.** In every evaluation run: no invariant broken (the run is
//! strict: no opposite conversions in a cycle, no source planned below its
//! minimum, value conserved), 0 minutes with any buffer below zero; and the
//! minutes with some buffer below its minimum, averaged over the runs, no
//! more than the current thresholds' (or `--recommend-max-below-min`): a
//! recommendation raises no more `CRITICAL_LOW` alerts than today.
//! Candidates are ranked by (runs that broke an invariant, seconds below
//! zero, seconds below minimum over the bound, total cost), so from an
//! infeasible start the search first heads for feasibility.
//!
//! **Runs.** A set of thresholds that survives one seed only is a bad
//! recommendation, so each candidate runs on the trace with `--seed`, plus
//! `--recommend-seeds K` (2) more runs: for a generated trace, the
//! generator's next seeds (`seed + 1` ...), each with its own provider seed;
//! for a trace file, the same trace with faults from
//! [`super::compare::with_faults`] (failures, lost answers, a two-hour
//! outage) drawn from `seed + 1` ....
//!
//! **Search.** Pattern search over multiplicative steps, deterministic: in
//! each pass, buffer by buffer, the neighbours of the best thresholds so far
//! — the whole buffer (all four knobs), min, target, max and batch size each
//! ÷ step and × step, rounded to three significant digits, invalid ones and
//! ones already run dropped — are run two at a time ([`CHUNK`]; every run of
//! both a job for the threads); the first pair whose best ranks strictly
//! better than the incumbent replaces it, and the neighbours are drawn again
//! around it, until none improves. While a feasible incumbent is in hand, a
//! candidate that goes below zero (or breaks an invariant) on the first run
//! runs no further. Steps are ×2, ×1.5, ×1.25, ×1.1 (one a pass,
//! `--recommend-passes`), and the search stops when
//! `--recommend-evaluations` candidates (60) have run. Results are collected
//! by index and ties keep the earlier candidate, so the same inputs give the
//! same recommendation whatever the threads do or how many there are.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde::Serialize;

use super::invariants::Violation;
use super::parallel::map_in_order;
use super::policies::EnginePolicy;
use super::report::{PolicyReport, policy_table};
use super::run::{RunOptions, run};
use super::scenario::World;
use crate::domain::{BufferAccount, FlowEvent, Thresholds};
use crate::planner::PlannerSettings;

/// One buffer's knobs, as `buffer_thresholds` stores them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Levels {
    pub min: Decimal,
    pub target: Decimal,
    pub max: Decimal,
    pub batch_size: Decimal,
}

impl Levels {
    /// Whether the levels pass the table's CHECK constraints:
    /// `0 < min < target < max` and `batch_size > 0`.
    pub fn is_valid(&self) -> bool {
        Decimal::ZERO < self.min
            && self.min < self.target
            && self.target < self.max
            && self.batch_size > Decimal::ZERO
            && Thresholds::new(self.min, self.target, self.max).is_ok()
    }
}

/// Every buffer's knobs.
pub type Knobs = BTreeMap<BufferAccount, Levels>;

/// The knobs of `world`.
pub fn knobs(world: &World) -> Knobs {
    world
        .buffers
        .iter()
        .map(|(account, setup)| {
            (
                *account,
                Levels {
                    min: setup.thresholds.min(),
                    target: setup.thresholds.target(),
                    max: setup.thresholds.max(),
                    batch_size: setup.batch_size,
                },
            )
        })
        .collect()
}

/// `world` with `knobs`; each opening balance moves with its target.
/// Buffers absent from `knobs`, or with invalid levels, keep their setup.
pub fn apply(world: &World, knobs: &Knobs) -> World {
    let mut out = world.clone();
    for (account, setup) in out.buffers.iter_mut() {
        let Some(levels) = knobs.get(account) else {
            continue;
        };
        let Ok(thresholds) = Thresholds::new(levels.min, levels.target, levels.max) else {
            continue;
        };
        let old_target = setup.thresholds.target();
        if old_target > Decimal::ZERO {
            setup.start = (setup.start * levels.target / old_target)
                .round_dp(account.currency().scale())
                .normalize();
        }
        setup.thresholds = thresholds;
        setup.batch_size = levels.batch_size;
    }
    out
}

/// `value` rounded to three significant digits (at least 0.01).
pub fn round_nice(value: Decimal) -> Decimal {
    if value <= Decimal::ZERO {
        return Decimal::ZERO;
    }
    let mut unit = Decimal::ONE;
    while value / unit >= dec!(1000) {
        unit *= Decimal::TEN;
    }
    while value / unit < dec!(100) && unit > dec!(0.01) {
        unit /= Decimal::TEN;
    }
    ((value / unit).round() * unit).normalize()
}

/// Candidates evaluated together (their runs in parallel) before the
/// search looks for an improvement; fixed, so that the number of cores never
/// changes the recommendation.
pub const CHUNK: usize = 2;

/// The steps of the passes, largest first.
pub const STEPS: [Decimal; 4] = [dec!(2), dec!(1.5), dec!(1.25), dec!(1.1)];

/// The neighbours of `knobs` for `account` at `step`: the whole buffer, then
/// min, target, max and batch size, each × step and ÷ step, rounded to three
/// significant digits; invalid and unchanged ones dropped, each once.
pub fn neighbours(knobs: &Knobs, account: BufferAccount, step: Decimal) -> Vec<Knobs> {
    let Some(base) = knobs.get(&account).copied() else {
        return Vec::new();
    };
    let up = |v: Decimal| round_nice(v * step);
    let down = |v: Decimal| round_nice(v / step);
    let scaled = |f: &dyn Fn(Decimal) -> Decimal| Levels {
        min: f(base.min),
        target: f(base.target),
        max: f(base.max),
        batch_size: f(base.batch_size),
    };
    let moves = [
        scaled(&down),
        scaled(&up),
        Levels {
            min: down(base.min),
            ..base
        },
        Levels {
            min: up(base.min),
            ..base
        },
        Levels {
            target: down(base.target),
            ..base
        },
        Levels {
            target: up(base.target),
            ..base
        },
        Levels {
            max: down(base.max),
            ..base
        },
        Levels {
            max: up(base.max),
            ..base
        },
        Levels {
            batch_size: down(base.batch_size),
            ..base
        },
        Levels {
            batch_size: up(base.batch_size),
            ..base
        },
    ];
    let mut seen = BTreeSet::new();
    moves
        .into_iter()
        .filter(|l| l.is_valid() && *l != base && seen.insert(*l))
        .map(|l| {
            let mut k = knobs.clone();
            k.insert(account, l);
            k
        })
        .collect()
}

/// One run every candidate is evaluated on.
#[derive(Debug, Clone)]
pub struct Case {
    /// What the run is, for the report (`trace, seed 1`).
    pub label: String,
    /// Seed of the simulated providers (and of the faults, when injected).
    pub seed: u64,
    /// Whether faults from [`super::compare::with_faults`] are injected.
    pub faults: bool,
    pub events: Vec<FlowEvent>,
}

/// What a search is allowed.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Candidates evaluated at most (the current thresholds not counted).
    pub evaluations: usize,
    /// Passes, one per step of [`STEPS`] (at most its length).
    pub passes: usize,
    /// Threads running candidates.
    pub threads: usize,
    /// Mean minutes below minimum allowed; `None`: the current thresholds'.
    pub max_below_min: Option<f64>,
}

impl Default for Budget {
    fn default() -> Self {
        Self {
            evaluations: 60,
            passes: STEPS.len(),
            threads: 2,
            max_below_min: None,
        }
    }
}

/// One candidate's result on one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub case: String,
    /// The engine's report (`None` when an invariant broke).
    pub report: Option<PolicyReport>,
    /// The broken invariant, if any.
    pub violation: Option<String>,
    pub capital_cost: Decimal,
    pub total_cost: Decimal,
}

/// One candidate, judged over every case.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub thresholds: Knobs,
    /// Σ conversion cost over the cases.
    pub conversion_cost: Decimal,
    /// Σ capital cost over the cases (see the module doc).
    pub capital_cost: Decimal,
    /// conversion cost + capital cost.
    pub total_cost: Decimal,
    /// Σ over the cases of the report's opportunity cost (capital above min).
    pub opportunity_cost_above_min: Decimal,
    pub conversions: u64,
    /// Σ minutes with any buffer below zero.
    pub minutes_below_zero: f64,
    /// Mean over the cases of the minutes with any buffer below its minimum.
    pub minutes_below_min: f64,
    /// Mean over the cases of the minutes with any buffer above its maximum.
    pub minutes_above_max: f64,
    /// Cases in which an invariant broke.
    pub violations: usize,
    /// Whether it meets every constraint (set by the search).
    pub feasible: bool,
    pub cases: Vec<CaseResult>,
}

/// How a candidate ranks: smaller is better.
type Rank = (usize, i64, i64, Decimal);

impl Evaluation {
    fn below_zero_seconds(&self) -> i64 {
        (self.minutes_below_zero * 60.0).round() as i64
    }

    fn rank(&self, max_below_min: f64) -> Rank {
        let excess = ((self.minutes_below_min - max_below_min) * 60.0).round() as i64;
        (
            self.violations,
            self.below_zero_seconds(),
            excess.max(0),
            self.total_cost,
        )
    }

    fn meets(&self, max_below_min: f64) -> bool {
        let (violations, zero, excess, _) = self.rank(max_below_min);
        violations == 0 && zero == 0 && excess == 0
    }
}

/// What the search found.
#[derive(Debug, Clone, Serialize)]
pub struct Recommendation {
    pub current: Evaluation,
    pub recommended: Evaluation,
    /// The `UPDATE buffer_thresholds` statements (buffers whose knobs changed).
    pub updates: Vec<String>,
    /// Candidates evaluated (the current thresholds not counted).
    pub evaluations: usize,
    /// Engine runs made, the current thresholds' included (a candidate that
    /// went below zero on the first run while a feasible one was in hand ran
    /// no further).
    pub runs: usize,
    /// Each accepted move, in order.
    pub moves: Vec<String>,
    /// Runs per candidate and what they are.
    pub cases: Vec<String>,
    /// The bound on mean minutes below minimum that was applied.
    pub max_below_min: f64,
    /// Steps of the passes that ran.
    pub steps: Vec<Decimal>,
}

/// Capital cost of `world` over a run that lasted `seconds`.
fn capital_cost(world: &World, seconds: i64) -> Decimal {
    (world.start_capital() * world.opportunity_cost_rate * Decimal::from(seconds.max(0))
        / Decimal::from(365 * 86_400))
    .round_dp(2)
}

fn run_case(
    world: &World,
    case: &Case,
    settings: PlannerSettings,
) -> Result<PolicyReport, Violation> {
    let world = if case.faults {
        super::compare::with_faults(world, case.seed)
    } else {
        world.clone()
    };
    let mut policy = EnginePolicy { settings };
    run(
        &world,
        &case.events,
        &mut policy,
        RunOptions {
            seed: case.seed,
            strict: true,
            record: false,
        },
    )
    .map(|o| o.report)
}

fn judge(knobs: &Knobs, cases: &[Case], results: Vec<CaseResult>) -> Evaluation {
    let n = cases.len().max(1) as f64;
    let reports: Vec<&PolicyReport> = results.iter().filter_map(|r| r.report.as_ref()).collect();
    let sum_dec = |f: &dyn Fn(&PolicyReport) -> Decimal| reports.iter().map(|r| f(r)).sum();
    let sum_f = |f: &dyn Fn(&PolicyReport) -> f64| reports.iter().map(|r| f(r)).sum::<f64>();
    let conversion_cost: Decimal = sum_dec(&|r| r.conversion_cost);
    let capital_cost: Decimal = results.iter().map(|r| r.capital_cost).sum();
    Evaluation {
        thresholds: knobs.clone(),
        conversion_cost,
        capital_cost,
        total_cost: conversion_cost + capital_cost,
        opportunity_cost_above_min: sum_dec(&|r| r.opportunity_cost),
        conversions: reports.iter().map(|r| r.conversions).sum(),
        minutes_below_zero: sum_f(&|r| r.minutes_below_zero),
        minutes_below_min: sum_f(&|r| r.minutes_below_min) / n,
        minutes_above_max: sum_f(&|r| r.minutes_above_max) / n,
        violations: results.iter().filter(|r| r.violation.is_some()).count(),
        feasible: false,
        cases: results,
    }
}

/// Every candidate's results on every case, in the candidates' order,
/// `threads` runs at a time; `tick` is called after each run.
fn run_all(
    world: &World,
    candidates: &[Knobs],
    cases: &[Case],
    settings: PlannerSettings,
    threads: usize,
    tick: &(dyn Fn() + Sync),
) -> Vec<Vec<CaseResult>> {
    if cases.is_empty() {
        return vec![Vec::new(); candidates.len()];
    }
    let worlds: Vec<World> = candidates.iter().map(|k| apply(world, k)).collect();
    let jobs: Vec<(usize, usize)> = (0..worlds.len())
        .flat_map(|w| (0..cases.len()).map(move |c| (w, c)))
        .collect();
    let results = map_in_order(&jobs, threads, &|&(w, c)| {
        let (w, c) = (&worlds[w], &cases[c]);
        let result = match run_case(w, c, settings) {
            Ok(report) => {
                let seconds = c.events.first().map_or(0, |first| {
                    (report.simulated_until - first.occurred_at).num_seconds()
                });
                let capital = capital_cost(w, seconds);
                CaseResult {
                    case: c.label.clone(),
                    total_cost: report.conversion_cost + capital,
                    capital_cost: capital,
                    report: Some(report),
                    violation: None,
                }
            }
            Err(v) => CaseResult {
                case: c.label.clone(),
                report: None,
                violation: Some(v.to_string()),
                capital_cost: Decimal::ZERO,
                total_cost: Decimal::ZERO,
            },
        };
        tick();
        result
    });
    let mut slots = results.into_iter();
    candidates
        .iter()
        .map(|_| {
            slots
                .by_ref()
                .take(cases.len())
                .map(|r| {
                    r.unwrap_or_else(|| CaseResult {
                        case: String::new(),
                        report: None,
                        violation: Some("the run did not finish".into()),
                        capital_cost: Decimal::ZERO,
                        total_cost: Decimal::ZERO,
                    })
                })
                .collect()
        })
        .collect()
}

/// Evaluates `candidates` against an incumbent, every run of every candidate
/// a job for the `threads`: first on the first case alone; while the
/// incumbent is feasible, a candidate that broke an
/// invariant or went below zero there cannot beat it and runs no further
/// (it is judged on that case alone); the others run the remaining cases.
fn screen(
    world: &World,
    candidates: &[Knobs],
    cases: &[Case],
    settings: PlannerSettings,
    threads: usize,
    incumbent_feasible: bool,
    tick: &(dyn Fn() + Sync),
) -> Vec<Evaluation> {
    let (first, rest) = cases.split_at(cases.len().min(1));
    let mut results = run_all(world, candidates, first, settings, threads, tick);
    let survivors: Vec<usize> = (0..candidates.len())
        .filter(|i| {
            !incumbent_feasible
                || results[*i].iter().all(|r| {
                    r.report
                        .as_ref()
                        .is_some_and(|report| report.minutes_below_zero == 0.0)
                })
        })
        .collect();
    let chosen: Vec<Knobs> = survivors.iter().map(|i| candidates[*i].clone()).collect();
    let more = run_all(world, &chosen, rest, settings, threads, tick);
    for (i, extra) in survivors.iter().zip(more) {
        results[*i].extend(extra);
    }
    results
        .into_iter()
        .zip(candidates)
        .map(|(r, k)| {
            let judged_on = if r.len() == cases.len() { cases } else { first };
            judge(k, judged_on, r)
        })
        .collect()
}

/// Searches the thresholds of `world` over `cases` (see the module doc).
/// `tick` is called after every run, for a progress bar.
pub fn search(
    world: &World,
    cases: &[Case],
    settings: PlannerSettings,
    budget: Budget,
    tick: &(dyn Fn() + Sync),
) -> Recommendation {
    let start = knobs(world);
    let mut current = screen(
        world,
        std::slice::from_ref(&start),
        cases,
        settings,
        budget.threads,
        false,
        tick,
    )
    .remove(0);
    let bound = budget
        .max_below_min
        .unwrap_or(current.minutes_below_min)
        .max(0.0);
    current.feasible = current.meets(bound);
    let mut best = current.clone();
    let mut tried: BTreeSet<Vec<Levels>> = BTreeSet::new();
    tried.insert(start.values().copied().collect());
    let mut evaluations = 0;
    let mut runs = cases.len();
    let mut moves = Vec::new();
    let mut steps = Vec::new();
    'passes: for step in STEPS.iter().take(budget.passes.max(1)) {
        steps.push(*step);
        for account in world.buffers.keys() {
            loop {
                let left = budget.evaluations.saturating_sub(evaluations);
                if left == 0 {
                    break 'passes;
                }
                let candidates: Vec<Knobs> = neighbours(&best.thresholds, *account, *step)
                    .into_iter()
                    .filter(|k| !tried.contains(&k.values().copied().collect::<Vec<_>>()))
                    .take(left)
                    .collect();
                if candidates.is_empty() {
                    break;
                }
                // First improvement, CHUNK candidates at a time: the best of
                // a chunk that beats the incumbent replaces it and the
                // neighbours are drawn again around it.
                let before = best.clone();
                for chunk in candidates.chunks(CHUNK) {
                    evaluations += chunk.len();
                    tried.extend(
                        chunk
                            .iter()
                            .map(|k| k.values().copied().collect::<Vec<_>>()),
                    );
                    let evaluated = screen(
                        world,
                        chunk,
                        cases,
                        settings,
                        budget.threads,
                        best.meets(bound),
                        tick,
                    );
                    runs += evaluated.iter().map(|e| e.cases.len()).sum::<usize>();
                    for e in evaluated {
                        if e.rank(bound) < best.rank(bound) {
                            best = e;
                        }
                    }
                    if best.thresholds != before.thresholds {
                        break;
                    }
                }
                if best.thresholds == before.thresholds {
                    break;
                }
                moves.push(format!(
                    "x{step} {account}: {} (total cost {} -> {}, minutes below zero {:.1} -> {:.1})",
                    describe(&before.thresholds[account], &best.thresholds[account]),
                    before.total_cost.round_dp(2),
                    best.total_cost.round_dp(2),
                    before.minutes_below_zero,
                    best.minutes_below_zero
                ));
            }
        }
    }
    best.feasible = best.meets(bound);
    let updates = update_statements(&current.thresholds, &best.thresholds);
    Recommendation {
        current,
        recommended: best,
        updates,
        evaluations,
        runs,
        moves,
        cases: cases.iter().map(|c| c.label.clone()).collect(),
        max_below_min: bound,
        steps,
    }
}

/// What changed from `from` to `to`: `min 15000 -> 30000, batch_size ...`.
pub fn describe(from: &Levels, to: &Levels) -> String {
    [
        ("min", from.min, to.min),
        ("target", from.target, to.target),
        ("max", from.max, to.max),
        ("batch_size", from.batch_size, to.batch_size),
    ]
    .iter()
    .filter(|(_, a, b)| a != b)
    .map(|(name, a, b)| format!("{name} {} -> {}", a.normalize(), b.normalize()))
    .collect::<Vec<_>>()
    .join(", ")
}

/// The `UPDATE buffer_thresholds` statement for each buffer whose knobs
/// differ between `current` and `recommended`.
pub fn update_statements(current: &Knobs, recommended: &Knobs) -> Vec<String> {
    recommended
        .iter()
        .filter(|(account, levels)| current.get(account) != Some(levels))
        .map(|(account, l)| {
            format!(
                "UPDATE buffer_thresholds SET min_threshold = {}, target_threshold = {}, \
                 max_threshold = {}, conversion_batch_size = {}, updated_at = now() \
                 WHERE account_type = '{}';",
                l.min.normalize(),
                l.target.normalize(),
                l.max.normalize(),
                l.batch_size.normalize(),
                account.as_str()
            )
        })
        .collect()
}

impl Recommendation {
    /// The terminal report: thresholds, statements, and the current and
    /// recommended runs side by side.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} candidates ({} engine runs), each run on: {}",
            self.evaluations,
            self.runs,
            self.cases.join("; ")
        );
        let _ = writeln!(
            out,
            "constraints: no invariant broken, 0 minutes below zero in every run, \
             mean minutes below min <= {:.1}\n",
            self.max_below_min
        );
        let _ = writeln!(
            out,
            "{:<20} {:<12} {:>14} {:>14} {:>14} {:>14}",
            "BUFFER", "", "MIN", "TARGET", "MAX", "BATCH"
        );
        for (account, rec) in &self.recommended.thresholds {
            for (label, l) in [
                ("current", self.current.thresholds.get(account).copied()),
                ("recommended", Some(*rec)),
            ] {
                let Some(l) = l else { continue };
                let _ = writeln!(
                    out,
                    "{:<20} {:<12} {:>14} {:>14} {:>14} {:>14}",
                    if label == "current" {
                        account.as_str()
                    } else {
                        ""
                    },
                    label,
                    l.min.normalize().to_string(),
                    l.target.normalize().to_string(),
                    l.max.normalize().to_string(),
                    l.batch_size.normalize().to_string()
                );
            }
        }
        if !self.moves.is_empty() {
            let _ = writeln!(out, "\nsearch path:");
            for m in &self.moves {
                let _ = writeln!(out, "  {m}");
            }
        }
        out.push('\n');
        if self.updates.is_empty() {
            let _ = writeln!(
                out,
                "-- the current thresholds are the best found: nothing to update"
            );
        } else if !self.recommended.feasible {
            let _ = writeln!(
                out,
                "-- no candidate met the constraints; the least bad one, NOT to apply as is:"
            );
        }
        if !self.updates.is_empty() {
            let _ = writeln!(out, "BEGIN;");
            for u in &self.updates {
                let _ = writeln!(out, "{u}");
            }
            let _ = writeln!(out, "COMMIT;");
        }
        out.push('\n');
        let _ = writeln!(out, "{:<28} {:>14} {:>14}", "", "CURRENT", "RECOMMENDED");
        let (c, r) = (&self.current, &self.recommended);
        let money = |d: Decimal| d.round_dp(2).to_string();
        for (what, a, b) in [
            (
                "conversions",
                c.conversions.to_string(),
                r.conversions.to_string(),
            ),
            (
                "conversion cost",
                money(c.conversion_cost),
                money(r.conversion_cost),
            ),
            ("capital cost", money(c.capital_cost), money(r.capital_cost)),
            ("total cost", money(c.total_cost), money(r.total_cost)),
            (
                "opp. cost above min",
                money(c.opportunity_cost_above_min),
                money(r.opportunity_cost_above_min),
            ),
            (
                "minutes below zero (sum)",
                format!("{:.1}", c.minutes_below_zero),
                format!("{:.1}", r.minutes_below_zero),
            ),
            (
                "minutes below min (mean)",
                format!("{:.1}", c.minutes_below_min),
                format!("{:.1}", r.minutes_below_min),
            ),
            (
                "minutes above max (mean)",
                format!("{:.1}", c.minutes_above_max),
                format!("{:.1}", r.minutes_above_max),
            ),
            (
                "runs breaking an invariant",
                c.violations.to_string(),
                r.violations.to_string(),
            ),
            (
                "meets the constraints",
                c.feasible.to_string(),
                r.feasible.to_string(),
            ),
        ] {
            let _ = writeln!(out, "{what:<28} {a:>14} {b:>14}");
        }
        out.push('\n');
        let mut rows = Vec::new();
        for (i, label) in self.cases.iter().enumerate() {
            for (name, e) in [("current", c), ("recommended", r)] {
                match e.cases.get(i) {
                    Some(CaseResult {
                        report: Some(report),
                        ..
                    }) => rows.push(PolicyReport {
                        policy: format!("{name} #{}", i + 1),
                        ..report.clone()
                    }),
                    Some(CaseResult {
                        violation: Some(v), ..
                    }) => {
                        let _ =
                            writeln!(out, "{name} #{} ({label}) broke an invariant: {v}", i + 1);
                    }
                    _ => {}
                }
            }
        }
        let titles: Vec<String> = self
            .cases
            .iter()
            .enumerate()
            .map(|(i, l)| format!("#{} {l}", i + 1))
            .collect();
        out.push_str(&policy_table(&titles.join("; "), &rows));
        out
    }

    /// The JSON form: thresholds, statements, both evaluations with their
    /// per-run reports.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(min: Decimal, target: Decimal, max: Decimal, batch_size: Decimal) -> Levels {
        Levels {
            min,
            target,
            max,
            batch_size,
        }
    }

    #[test]
    fn round_nice_keeps_three_significant_digits() {
        assert_eq!(round_nice(dec!(10606.6)), dec!(10600));
        assert_eq!(round_nice(dec!(75000)), dec!(75000));
        assert_eq!(round_nice(dec!(1234567)), dec!(1230000));
        assert_eq!(round_nice(dec!(12.345)), dec!(12.3));
        assert_eq!(round_nice(dec!(0.001)), dec!(0));
    }

    #[test]
    fn neighbours_respect_the_table_constraints_and_change_one_buffer() {
        let world = World::default();
        let base = knobs(&world);
        for step in STEPS {
            for account in BufferAccount::ALL {
                let n = neighbours(&base, account, step);
                assert!(!n.is_empty());
                let distinct: BTreeSet<Vec<Levels>> =
                    n.iter().map(|k| k.values().copied().collect()).collect();
                assert_eq!(distinct.len(), n.len(), "each neighbour once");
                for k in &n {
                    for (a, l) in k {
                        assert!(l.is_valid(), "{a}: {l:?}");
                        if *a != account {
                            assert_eq!(*l, base[a], "other buffers untouched");
                        }
                    }
                    assert_ne!(k[&account], base[&account]);
                }
            }
        }
        // Moves that would break the order are dropped, not clamped: of the
        // ten, min x2, target x2, target /2 and max /2 go.
        let mut tight = base.clone();
        let usdc = BufferAccount::SystemBufferUsdc;
        tight.insert(usdc, levels(dec!(10), dec!(15), dec!(20), dec!(5)));
        let n = neighbours(&tight, usdc, dec!(2));
        assert_eq!(n.len(), 6, "{n:?}");
        assert!(n.iter().all(|k| k[&usdc].is_valid()));
    }

    #[test]
    fn neighbours_are_deterministic() {
        let base = knobs(&World::default());
        assert_eq!(
            neighbours(&base, BufferAccount::SystemBufferFiat, dec!(1.5)),
            neighbours(&base, BufferAccount::SystemBufferFiat, dec!(1.5))
        );
    }

    #[test]
    fn apply_moves_the_opening_balance_with_the_target() {
        let world = World::default();
        let mut k = knobs(&world);
        let usdc = BufferAccount::SystemBufferUsdc;
        k.insert(
            usdc,
            levels(dec!(5000), dec!(25000), dec!(60000), dec!(10000)),
        );
        let applied = apply(&world, &k);
        let setup = applied.buffers[&usdc];
        assert_eq!(setup.thresholds.target(), dec!(25000));
        assert_eq!(setup.start, dec!(25000));
        assert_eq!(setup.batch_size, dec!(10000));
        assert_eq!(knobs(&applied), k);
    }

    #[test]
    fn update_statements_name_the_columns_and_only_changed_buffers() {
        let current = knobs(&World::default());
        let mut rec = current.clone();
        rec.insert(
            BufferAccount::BrokerOperational,
            levels(dec!(40000), dec!(150000), dec!(600000), dec!(120000)),
        );
        let sql = update_statements(&current, &rec);
        assert_eq!(
            sql,
            vec![
                "UPDATE buffer_thresholds SET min_threshold = 40000, target_threshold = 150000, \
                 max_threshold = 600000, conversion_batch_size = 120000, updated_at = now() \
                 WHERE account_type = 'broker_operational';"
                    .to_owned()
            ]
        );
    }

    #[test]
    fn ranking_puts_feasibility_before_cost() {
        let e = |violations, below_zero: f64, below_min: f64, cost: Decimal| Evaluation {
            thresholds: Knobs::new(),
            conversion_cost: cost,
            capital_cost: Decimal::ZERO,
            total_cost: cost,
            opportunity_cost_above_min: Decimal::ZERO,
            conversions: 0,
            minutes_below_zero: below_zero,
            minutes_below_min: below_min,
            minutes_above_max: 0.0,
            violations,
            feasible: false,
            cases: Vec::new(),
        };
        let cheap_but_negative = e(0, 1.0, 0.0, dec!(1));
        let dear_but_safe = e(0, 0.0, 0.0, dec!(100));
        let broken = e(1, 0.0, 0.0, dec!(0));
        let alerting = e(0, 0.0, 5.0, dec!(2));
        assert!(dear_but_safe.rank(1.0) < cheap_but_negative.rank(1.0));
        assert!(cheap_but_negative.rank(1.0) < broken.rank(1.0));
        assert!(dear_but_safe.rank(1.0) < alerting.rank(1.0));
        assert!(alerting.meets(5.0) && !alerting.meets(1.0));
        assert!(!cheap_but_negative.meets(100.0));
    }
}
