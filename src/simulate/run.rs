//! One simulated run: a trace, a world and a policy on a simulated clock.
//!
//! Time moves from one thing to the next — an event, a window closing
//! (window end + grace, as the live watermark allows), a provider finishing,
//! an executor poll — and nothing reads a real clock. Events count in windows
//! through the engine's [`WindowSpec::assign`] and [`WindowTally`]; a closing
//! window moves the book balances by its net flows, exactly as the live
//! settlement does; the policy decides; the [`SimExecutor`] carries commands
//! out. After every step the invariants are checked; a violation stops the
//! run with the step, the seed and the state.

use std::collections::{BTreeMap, HashSet, VecDeque};

use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use super::executor::{Balances, SimExecutor};
use super::invariants::{self, Violation};
use super::metrics::{Metrics, quantile_minutes};
use super::policies::{CycleView, Policy};
use super::report::{BufferOutcome, PolicyReport};
use super::scenario::World;
use crate::domain::{BufferAccount, ConversionCommand, ConversionDirection, FlowEvent};
use crate::planner::{self, BufferPosition};
use crate::window::{WindowSpec, WindowTally};

/// How to run.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub seed: u64,
    /// Stop at the first violation of a decision invariant (opposite
    /// conversions in one cycle, a source planned below its minimum). The
    /// money invariants (conservation, balanced postings, at most one
    /// execution, each event once) always stop the run.
    pub strict: bool,
    /// Keep every balance change for the plot.
    pub record: bool,
}

/// A conversion as the plot marks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversion {
    pub at: DateTime<Utc>,
    pub direction: ConversionDirection,
    pub amount: Decimal,
    pub source: BufferAccount,
    pub destination: BufferAccount,
}

/// What a run leaves behind.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub report: PolicyReport,
    /// Each buffer's actual balance after every change (when recorded).
    pub balances: BTreeMap<BufferAccount, Vec<(DateTime<Utc>, Decimal)>>,
    /// Every conversion started.
    pub conversions: Vec<Conversion>,
}

/// How many recent lead times the policy is shown.
const LEAD_TIMES: usize = 50;
/// How long after the last event the run goes on, so conversions land.
const TAIL: Duration = Duration::hours(2);

struct Run<'a> {
    world: &'a World,
    spec: WindowSpec,
    options: RunOptions,
    policy_name: &'static str,
    balances: Balances,
    /// Start capital plus every event's buffer deltas.
    expected_value: Decimal,
    executor: SimExecutor,
    metrics: Metrics,
    seen: HashSet<Uuid>,
    counted: u64,
    tallies: BTreeMap<DateTime<Utc>, WindowTally>,
    next_open: Option<DateTime<Utc>>,
    recent: VecDeque<WindowTally>,
    /// How many closed windows `recent` keeps (the policy's own look-back).
    history_windows: usize,
    lead_times: VecDeque<Duration>,
    report: PolicyReport,
    outcome_balances: BTreeMap<BufferAccount, Vec<(DateTime<Utc>, Decimal)>>,
    conversions: Vec<Conversion>,
    step: u64,
}

/// Runs `policy` over `events` (sorted by time) in `world`.
pub fn run(
    world: &World,
    events: &[FlowEvent],
    policy: &mut dyn Policy,
    options: RunOptions,
) -> Result<RunOutcome, Violation> {
    let Some(first) = events.first() else {
        return Ok(RunOutcome {
            report: PolicyReport::named(policy.name()),
            balances: BTreeMap::new(),
            conversions: Vec::new(),
        });
    };
    let origin = first.occurred_at;
    let end = events.last().map_or(origin, |e| e.occurred_at) + TAIL;
    let spec = WindowSpec::new(world.cycle, world.grace);
    let start: BTreeMap<BufferAccount, Decimal> =
        world.buffers.iter().map(|(a, b)| (*a, b.start)).collect();
    let history_windows = policy.history_windows();
    let mut run = Run {
        world,
        spec,
        options,
        policy_name: policy.name(),
        balances: Balances {
            actual: start.clone(),
            book: start.clone(),
            ..Balances::default()
        },
        expected_value: world.start_capital(),
        executor: SimExecutor::new(
            world.providers.clone(),
            world.monitor,
            options.seed,
            origin,
            policy.ignores_limits(),
        ),
        metrics: Metrics::new(&world.buffers, origin),
        seen: HashSet::with_capacity(events.len()),
        counted: 0,
        tallies: BTreeMap::new(),
        next_open: None,
        recent: VecDeque::with_capacity(history_windows + 1),
        history_windows,
        lead_times: VecDeque::with_capacity(LEAD_TIMES + 1),
        report: PolicyReport::named(policy.name()),
        outcome_balances: start
            .iter()
            .map(|(a, b)| (*a, vec![(origin, *b)]))
            .collect(),
        conversions: Vec::new(),
        step: 0,
    };
    let mut next_close = spec.window_end(spec.window_start(origin)) + spec.grace;
    let watch = policy.watch_interval();
    let mut next_watch = watch.map(|w| origin + w);
    let mut next_event = 0;
    loop {
        let event_at = events.get(next_event).map(|e| e.occurred_at);
        let executor_at = run.executor.next_at();
        let now = [event_at, executor_at, Some(next_close), next_watch]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_close);
        if now > end {
            break;
        }
        run.step += 1;
        run.metrics.observe(now, &run.balances.actual);
        if executor_at == Some(now) {
            run.advance_executor(now)?;
        } else if now == next_close {
            let window = next_close - spec.grace - spec.length;
            run.close_window(window, now, policy)?;
            next_close += spec.length;
            if let (Some(at), Some(w)) = (next_watch, watch)
                && at == now
            {
                next_watch = Some(at + w);
            }
        } else if let (Some(at), Some(w)) = (next_watch, watch)
            && at == now
        {
            run.watch(now, policy)?;
            next_watch = Some(at + w);
        } else if let Some(event) = events.get(next_event) {
            next_event += 1;
            run.count_event(event, now, policy)?;
        }
        run.after_step(now)?;
    }
    run.metrics.observe(end, &run.balances.actual);
    Ok(run.finish(end))
}

impl Run<'_> {
    fn violation(&self, at: DateTime<Utc>, what: String) -> Violation {
        Violation {
            step: self.step,
            at,
            policy: self.policy_name.to_owned(),
            seed: self.options.seed,
            what,
            state: format!(
                "actual {:?}; book {:?}; in transit {}; costs {}",
                self.balances.actual,
                self.balances.book,
                self.balances.in_transit,
                self.balances.costs
            ),
        }
    }

    fn count_event(
        &mut self,
        event: &FlowEvent,
        now: DateTime<Utc>,
        policy: &mut dyn Policy,
    ) -> Result<(), Violation> {
        if !self.seen.insert(event.event_id) {
            return Ok(());
        }
        let deltas = event.buffer_deltas();
        let unpaid = deltas.iter().any(|d| {
            d.delta < Decimal::ZERO
                && self
                    .balances
                    .actual
                    .get(&d.account)
                    .copied()
                    .unwrap_or_default()
                    < -d.delta
        });
        self.report.unpaid_events += u64::from(unpaid);
        for d in deltas {
            *self.balances.actual.entry(d.account).or_default() += d.delta;
            self.expected_value += d.delta;
        }
        let assignment = self.spec.assign(event.occurred_at, self.next_open);
        self.tallies
            .entry(assignment.window_start)
            .or_default()
            .add(event, assignment.late);
        self.counted += 1;
        let commands = policy.on_event(event, now);
        self.submit(&commands, now);
        Ok(())
    }

    fn close_window(
        &mut self,
        window: DateTime<Utc>,
        now: DateTime<Utc>,
        policy: &mut dyn Policy,
    ) -> Result<(), Violation> {
        let tally = self.tallies.remove(&window).unwrap_or_default();
        for (account, flow) in &tally.flows {
            *self.balances.book.entry(*account).or_default() += flow.net();
        }
        self.report.counted_events += tally.events;
        self.next_open = Some(self.spec.window_end(window));
        self.recent.push_back(tally);
        if self.recent.len() > self.history_windows {
            self.recent.pop_front();
        }
        self.decide(
            None,
            WindowSpec::cycle_id(window),
            self.spec.window_end(window),
            now,
            policy,
        )
    }

    /// A watch between window closes: the policy sees the balances with the
    /// open windows' flows counted.
    fn watch(&mut self, now: DateTime<Utc>, policy: &mut dyn Policy) -> Result<(), Violation> {
        let watch = planner::Watch::at(
            now,
            self.tallies.iter().map(|(start, tally)| (*start, tally)),
            self.spec.length,
            self.spec.grace,
        );
        self.decide(
            Some(watch),
            format!(
                "watch:{}",
                now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
            now,
            now,
            policy,
        )
    }

    /// Asks the policy for commands (at a close, or in a watch when `watch`
    /// is set), checks them and submits them.
    fn decide(
        &mut self,
        watch: Option<planner::Watch>,
        cycle_id: String,
        plan_at: DateTime<Utc>,
        now: DateTime<Utc>,
        policy: &mut dyn Policy,
    ) -> Result<(), Violation> {
        let positions = self.positions();
        let providers = self.executor.rows();
        self.recent.make_contiguous();
        self.lead_times.make_contiguous();
        let view = CycleView {
            cycle_id,
            now: plan_at,
            positions: positions.clone(),
            in_flight: self
                .executor
                .in_flight_jobs()
                .map(|j| planner::InFlight {
                    destination: j.job.destination_account,
                    amount: j.job.amount.value,
                    since: j.started_at,
                })
                .collect(),
            providers: &providers,
            recent: self.recent.as_slices().0,
            lead_times: self.lead_times.as_slices().0,
            cycle: self.spec.length,
            watch: watch.clone(),
        };
        let commands = match view.watch {
            Some(_) => policy.on_watch(&view),
            None => policy.on_cycle(&view),
        };
        let held = match &watch {
            Some(w) => w.positions(&positions),
            None => positions,
        };
        let checks = invariants::check_plan(&held, &commands);
        self.report.opposite_conversion_cycles += u64::from(checks.opposite_directions);
        self.report.unfunded_commands += checks.below_minimum.len() as u64;
        if self.options.strict {
            if checks.opposite_directions {
                return Err(self.violation(now, "opposite conversions planned in one cycle".into()));
            }
            if let Some(what) = checks.below_minimum.first() {
                return Err(self.violation(now, what.clone()));
            }
        }
        self.submit(&commands, now);
        Ok(())
    }

    /// Book balances with what is in flight, as the live store reports them.
    fn positions(&self) -> Vec<BufferPosition> {
        self.world
            .buffers
            .iter()
            .map(|(account, setup)| {
                let (incoming, outgoing) = self.executor.in_flight().fold(
                    (Decimal::ZERO, Decimal::ZERO),
                    |(i, o), job| {
                        (
                            i + if job.destination_account == *account {
                                job.amount.value
                            } else {
                                Decimal::ZERO
                            },
                            o + if job.source_account == *account {
                                job.amount.value
                            } else {
                                Decimal::ZERO
                            },
                        )
                    },
                );
                BufferPosition {
                    account: *account,
                    thresholds: setup.thresholds,
                    batch_size: setup.batch_size,
                    balance: self.balances.book.get(account).copied().unwrap_or_default(),
                    incoming,
                    outgoing,
                }
            })
            .collect()
    }

    fn submit(&mut self, commands: &[ConversionCommand], now: DateTime<Utc>) {
        for command in commands {
            self.report.commands += 1;
            let overlapping = self
                .executor
                .in_flight()
                .any(|j| j.destination_account == command.destination_account);
            if self.executor.submit(command, now) {
                self.report.overlapping_conversions += u64::from(overlapping);
                self.conversions.push(Conversion {
                    at: now,
                    direction: command.direction,
                    amount: command.amount.value,
                    source: command.source_account,
                    destination: command.destination_account,
                });
            }
        }
    }

    fn advance_executor(&mut self, now: DateTime<Utc>) -> Result<(), Violation> {
        let outcomes = self.executor.advance(now, &mut self.balances);
        for (index, cost) in outcomes.completed {
            if self.executor.completed_executions(index) > 1 {
                return Err(self.violation(now, format!("job {index} executed twice")));
            }
            let job = &self.executor.jobs[index];
            if job.job.direction.is_conversion() {
                self.report.conversions += 1;
                self.report.conversion_volume += job.job.amount.value;
            } else {
                self.report.transfers += 1;
                self.report.transfer_cost += cost;
            }
            *self
                .report
                .volume_by_route
                .entry(format!(
                    "{}->{}",
                    job.job.source_account, job.job.destination_account
                ))
                .or_default() += job.job.amount.value;
            self.report.conversion_cost += cost;
            self.lead_times.push_back(now - job.started_at);
            if self.lead_times.len() > LEAD_TIMES {
                self.lead_times.pop_front();
            }
        }
        self.report.failed_jobs += outcomes.failed.len() as u64;
        Ok(())
    }

    fn after_step(&mut self, now: DateTime<Utc>) -> Result<(), Violation> {
        self.metrics.after_change(now, &self.balances.actual);
        let held = self.balances.actual.values().sum::<Decimal>()
            + self.balances.in_transit
            + self.balances.costs;
        if held != self.expected_value {
            return Err(self.violation(
                now,
                format!(
                    "value not conserved: buffers + in transit + costs = {held}, start + net flows = {}",
                    self.expected_value
                ),
            ));
        }
        let open: u64 = self.tallies.values().map(|t| t.events).sum();
        if self.report.counted_events + open != self.counted {
            return Err(self.violation(
                now,
                format!(
                    "events counted {} times in windows, {} distinct events seen",
                    self.report.counted_events + open,
                    self.counted
                ),
            ));
        }
        if self.options.record {
            for (account, balance) in &self.balances.actual {
                let track = self.outcome_balances.entry(*account).or_default();
                if track.last().map(|(_, b)| b) != Some(balance) {
                    track.push((now, *balance));
                }
            }
        }
        Ok(())
    }

    fn finish(mut self, end: DateTime<Utc>) -> RunOutcome {
        let m = &self.metrics;
        let minutes = |s: i64| s as f64 / 60.0;
        let r = &mut self.report;
        r.minutes_below_min = minutes(m.any.below_min_seconds);
        r.minutes_below_zero = minutes(m.any.below_zero_seconds);
        r.minutes_above_max = minutes(m.any.above_max_seconds);
        r.buffers = m
            .per_buffer
            .iter()
            .map(|(account, e)| {
                (
                    account.as_str().to_owned(),
                    BufferOutcome {
                        minutes_below_min: minutes(e.below_min_seconds),
                        minutes_below_zero: minutes(e.below_zero_seconds),
                        minutes_above_max: minutes(e.above_max_seconds),
                        lowest: m.lowest.get(account).copied().unwrap_or_default(),
                        final_balance: self
                            .balances
                            .actual
                            .get(account)
                            .copied()
                            .unwrap_or_default(),
                    },
                )
            })
            .collect();
        let seconds = m.elapsed_seconds().max(1);
        r.idle_capital = (m.idle_capital_seconds / Decimal::from(seconds)).round_dp(2);
        r.opportunity_cost = (m.idle_capital_seconds * self.world.opportunity_cost_rate
            / Decimal::from(365 * 86_400))
        .round_dp(2);
        r.breaches = m.recoveries.len() as u64 + u64::from(m.in_breach());
        r.recovery_p50_minutes = quantile_minutes(&m.recoveries, 0.5);
        r.recovery_p99_minutes = quantile_minutes(&m.recoveries, 0.99);
        r.in_breach_at_end = m.in_breach();
        r.last_recovery = m.last_recovery;
        r.fees = self.balances.fees;
        r.simulated_until = end;
        RunOutcome {
            report: self.report,
            balances: self.outcome_balances,
            conversions: self.conversions,
        }
    }
}
