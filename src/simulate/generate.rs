//! Built-in flow generators for `treasury simulate --generate`: a month of
//! deposits and withdrawals shaped like a retail platform's, deterministic
//! for a seed (a [`ChaCha8Rng`] seeded with it drives every draw, so the same
//! seed and start give the same events, byte for byte).
//!
//! Events come from a non-homogeneous Poisson process with per-minute rates:
//! each minute, each stream (deposit or withdrawal × USDC or USD) draws a
//! Poisson count from its rate and places the events uniformly (to the
//! millisecond) inside the minute. Rates, shares and probabilities are `f64`
//! (they are not money); each amount becomes an exact [`Decimal`] in cents.
//!
//! Base flows (every scenario):
//! - **Intensity**: [`BASE_RATE`] events a minute on a weekday, shaped by the
//!   UTC hour as `1 + a·cos(2π(h − 14)/24)` with `a = 2/3`, so the 14:00 peak
//!   is [`DIURNAL_PEAK_TO_TROUGH`] (5) times the 02:00 trough; Saturdays and
//!   Sundays run at [`WEEKEND_FACTOR`] (0.6) of that. Over 30 days this is
//!   about 150,000 events.
//! - **Direction**: the deposit share is `0.5 − 0.25·sin(2π(h − 14)/24)`:
//!   up to 75 % deposits in the morning, 75 % withdrawals in the evening. The
//!   swing is orthogonal to the intensity curve, so flows net to zero over
//!   each day in expectation.
//! - **Currency**: [`USDC_SHARE`] (60 %) of events are USDC, the rest USD.
//! - **Amounts**: lognormal with median [`AMOUNT_MEDIAN`] (300) and log-sd
//!   [`AMOUNT_SIGMA`] (1.1, mean ≈ 550, a heavy tail), capped at
//!   [`AMOUNT_CAP`] (250,000), rounded to the cent (USDC too), at least 0.01.
//!
//! Scenarios:
//! - [`Scenario::Normal`]: 30 days of base flows plus 3 to 5 bursts, each on
//!   a different random day at a random time, of [`BURST_MINUTES`] (30)
//!   minutes during which withdrawals (both currencies) run at
//!   [`BURST_FACTOR`] (10) times their rate.
//! - [`Scenario::BankRun`]: 30 days of base flows without bursts (so the run
//!   is the one shock) and, from 12:00 UTC on day 15 (start + 14 days, at the
//!   start's date) for [`RUN_HOURS`] (6) hours, an extra stream of USDC
//!   withdrawals expected to total [`RUN_TOTAL`] (200,000 USDC: four times the
//!   seeded USDC target), amounts lognormal with median 500 and log-sd 0.8,
//!   capped at 10,000. Then back to normal.
//! - [`Scenario::Quiet`]: 30 days in which flows only happen in short active
//!   periods of 15 to 60 minutes separated by idle stretches of 3 to 10 hours
//!   with no events at all (roughly a tenth of `normal`'s events); inside
//!   an active period the base rates apply.
//! - [`Scenario::Drift`]: `normal` (bursts included), except that for the
//!   second week (days 8 to 14) deposit rates are [`DRIFT_FACTOR`] (1.3)
//!   times their base, so deposits exceed withdrawals by about 30 % that week.

use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, Timelike, Utc, Weekday};
use rand::seq::index;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rust_decimal::Decimal;
use uuid::{Builder, Uuid};

use crate::domain::{Currency, FlowEvent, FlowKind, Money};

/// Days every scenario spans.
pub const DAYS: i64 = 30;
/// Events per minute on a weekday, averaged over the day.
pub const BASE_RATE: f64 = 3.9;
/// Ratio of the busiest hour's intensity to the quietest's.
pub const DIURNAL_PEAK_TO_TROUGH: f64 = 5.0;
/// UTC hour of the busiest intensity.
pub const PEAK_HOUR: f64 = 14.0;
/// Intensity on Saturdays and Sundays, relative to weekdays.
pub const WEEKEND_FACTOR: f64 = 0.6;
/// Largest swing of the deposit share away from one half (morning up, evening down).
pub const DEPOSIT_SWING: f64 = 0.25;
/// Share of events in USDC.
pub const USDC_SHARE: f64 = 0.6;
/// Median event amount.
pub const AMOUNT_MEDIAN: f64 = 300.0;
/// Standard deviation of the amount's logarithm.
pub const AMOUNT_SIGMA: f64 = 1.1;
/// Largest single event.
pub const AMOUNT_CAP: f64 = 250_000.0;
/// Length of a withdrawal burst in `normal` and `drift`.
pub const BURST_MINUTES: i64 = 30;
/// Withdrawal intensity during a burst, relative to its base.
pub const BURST_FACTOR: f64 = 10.0;
/// Length of the run in `bank-run`.
pub const RUN_HOURS: i64 = 6;
/// Expected USDC withdrawn by the run, on top of the base flows.
pub const RUN_TOTAL: f64 = 200_000.0;
/// Deposit intensity during the inflow week of `drift`, relative to its base.
pub const DRIFT_FACTOR: f64 = 1.3;

const MINUTES_PER_DAY: i64 = 1_440;
const RUN_MEDIAN: f64 = 500.0;
const RUN_SIGMA: f64 = 0.8;
const RUN_CAP: f64 = 10_000.0;
const QUIET_ACTIVE_MINUTES: Range<i64> = 15..61;
const QUIET_IDLE_MINUTES: Range<i64> = 180..601;

/// A built-in flow scenario (see the module documentation for each one's parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// A month of ordinary flows with a few withdrawal bursts.
    Normal,
    /// Ordinary flows with one six-hour run of USDC withdrawals.
    BankRun,
    /// Short active periods separated by long idle stretches.
    Quiet,
    /// Ordinary flows with one week of sustained net inflow.
    Drift,
}

impl Scenario {
    /// Every scenario, in the order help texts list them.
    pub const ALL: [Scenario; 4] = [
        Scenario::Normal,
        Scenario::BankRun,
        Scenario::Quiet,
        Scenario::Drift,
    ];

    /// The name used on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Scenario::Normal => "normal",
            Scenario::BankRun => "bank-run",
            Scenario::Quiet => "quiet",
            Scenario::Drift => "drift",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text did not name a built-in scenario.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scenario {0:?} (expected normal, bank-run, quiet or drift)")]
pub struct UnknownScenario(pub String);

impl FromStr for Scenario {
    type Err = UnknownScenario;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|scenario| scenario.as_str() == s)
            .ok_or_else(|| UnknownScenario(s.to_owned()))
    }
}

/// Generates the events of `scenario` from `start` on, sorted by time; the
/// same `(scenario, seed, start)` always gives the same events.
pub fn generate(scenario: Scenario, seed: u64, start: DateTime<Utc>) -> Vec<FlowEvent> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let plan = Plan::new(scenario, &mut rng);
    sample(&plan, &mut rng, start)
}

/// Where and how a scenario departs from the base flows, in minutes from the start.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    minutes: i64,
    /// Multiplier of every base rate (0 leaves only the run).
    base: f64,
    bursts: Vec<Range<i64>>,
    /// When set, base flows happen only inside these sorted periods.
    active: Option<Vec<Range<i64>>>,
    inflow: Option<Range<i64>>,
    run: Option<Range<i64>>,
}

impl Plan {
    fn new(scenario: Scenario, rng: &mut ChaCha8Rng) -> Plan {
        let minutes = DAYS * MINUTES_PER_DAY;
        let mut plan = Plan {
            minutes,
            base: 1.0,
            bursts: Vec::new(),
            active: None,
            inflow: None,
            run: None,
        };
        match scenario {
            Scenario::Normal => plan.bursts = bursts(rng),
            Scenario::BankRun => plan.run = Some(run_window()),
            Scenario::Quiet => plan.active = Some(active_periods(rng, minutes)),
            Scenario::Drift => {
                plan.bursts = bursts(rng);
                plan.inflow = Some(7 * MINUTES_PER_DAY..14 * MINUTES_PER_DAY);
            }
        }
        plan
    }

    fn is_active(&self, minute: i64) -> bool {
        match &self.active {
            None => true,
            Some(periods) => {
                let next = periods.partition_point(|p| p.end <= minute);
                periods.get(next).is_some_and(|p| p.contains(&minute))
            }
        }
    }

    fn withdrawal_factor(&self, minute: i64) -> f64 {
        if self.bursts.iter().any(|b| b.contains(&minute)) {
            BURST_FACTOR
        } else {
            1.0
        }
    }

    fn deposit_factor(&self, minute: i64) -> f64 {
        match &self.inflow {
            Some(week) if week.contains(&minute) => DRIFT_FACTOR,
            _ => 1.0,
        }
    }

    /// Extra USDC withdrawals a minute from the run.
    fn run_rate(&self, minute: i64) -> f64 {
        match &self.run {
            Some(run) if run.contains(&minute) => {
                let mean = lognormal_mean(RUN_MEDIAN, RUN_SIGMA);
                RUN_TOTAL / (mean * (RUN_HOURS * 60) as f64)
            }
            _ => 0.0,
        }
    }
}

fn bursts(rng: &mut ChaCha8Rng) -> Vec<Range<i64>> {
    let count = rng.gen_range(3..=5);
    let mut days: Vec<usize> = index::sample(rng, DAYS as usize, count).into_vec();
    days.sort_unstable();
    days.into_iter()
        .map(|day| {
            let at =
                day as i64 * MINUTES_PER_DAY + rng.gen_range(0..MINUTES_PER_DAY - BURST_MINUTES);
            at..at + BURST_MINUTES
        })
        .collect()
}

fn run_window() -> Range<i64> {
    let at = 14 * MINUTES_PER_DAY + 12 * 60;
    at..at + RUN_HOURS * 60
}

fn active_periods(rng: &mut ChaCha8Rng, minutes: i64) -> Vec<Range<i64>> {
    let mut periods = Vec::new();
    let mut at = rng.gen_range(QUIET_IDLE_MINUTES);
    while at < minutes {
        let end = at + rng.gen_range(QUIET_ACTIVE_MINUTES);
        periods.push(at..end.min(minutes));
        at = end + rng.gen_range(QUIET_IDLE_MINUTES);
    }
    periods
}

/// Expected events per minute of deposits and of withdrawals (both currencies) at one time.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rates {
    deposits: f64,
    withdrawals: f64,
}

/// Base deposit and withdrawal rates (both currencies together) at `at`.
fn base_rates(at: DateTime<Utc>) -> Rates {
    let hour = f64::from(at.hour()) + f64::from(at.minute()) / 60.0;
    let phase = std::f64::consts::TAU * (hour - PEAK_HOUR) / 24.0;
    let swing = (DIURNAL_PEAK_TO_TROUGH - 1.0) / (DIURNAL_PEAK_TO_TROUGH + 1.0);
    let weekday = match at.weekday() {
        Weekday::Sat | Weekday::Sun => WEEKEND_FACTOR,
        _ => 1.0,
    };
    let total = BASE_RATE * weekday * (1.0 + swing * phase.cos());
    let deposit_share = 0.5 - DEPOSIT_SWING * phase.sin();
    Rates {
        deposits: total * deposit_share,
        withdrawals: total * (1.0 - deposit_share),
    }
}

/// Draws every event of `plan`, minute by minute, and sorts them by time.
fn sample(plan: &Plan, rng: &mut ChaCha8Rng, start: DateTime<Utc>) -> Vec<FlowEvent> {
    let mut events = Vec::with_capacity(160_000);
    let base_amounts = Lognormal::new(AMOUNT_MEDIAN, AMOUNT_SIGMA, AMOUNT_CAP);
    let run_amounts = Lognormal::new(RUN_MEDIAN, RUN_SIGMA, RUN_CAP);
    for minute in 0..plan.minutes {
        let at = start + Duration::minutes(minute);
        let base = if plan.is_active(minute) {
            plan.base
        } else {
            0.0
        };
        let rates = base_rates(at);
        let deposits = rates.deposits * base * plan.deposit_factor(minute);
        let withdrawals = rates.withdrawals * base * plan.withdrawal_factor(minute);
        let streams = [
            (FlowKind::Deposit, Currency::Usdc, deposits * USDC_SHARE),
            (
                FlowKind::Withdrawal,
                Currency::Usdc,
                withdrawals * USDC_SHARE,
            ),
            (
                FlowKind::Deposit,
                Currency::Usd,
                deposits * (1.0 - USDC_SHARE),
            ),
            (
                FlowKind::Withdrawal,
                Currency::Usd,
                withdrawals * (1.0 - USDC_SHARE),
            ),
        ];
        let mut minute_draw = MinuteDraw {
            rng: &mut *rng,
            at,
            events: &mut events,
        };
        for (kind, currency, rate) in streams {
            minute_draw.stream(kind, currency, rate, &base_amounts);
        }
        let run = plan.run_rate(minute);
        minute_draw.stream(FlowKind::Withdrawal, Currency::Usdc, run, &run_amounts);
    }
    events.sort_by_key(|e| e.occurred_at);
    events
}

/// Draws the events of one minute into `events`.
struct MinuteDraw<'a> {
    rng: &'a mut ChaCha8Rng,
    at: DateTime<Utc>,
    events: &'a mut Vec<FlowEvent>,
}

impl MinuteDraw<'_> {
    fn stream(&mut self, kind: FlowKind, currency: Currency, rate: f64, amounts: &Lognormal) {
        for _ in 0..poisson(self.rng, rate) {
            let offset = Duration::milliseconds(self.rng.gen_range(0..60_000));
            let event_id = Builder::from_random_bytes(self.rng.r#gen()).into_uuid();
            let value = amounts.cents(self.rng);
            self.events.push(FlowEvent {
                event_id,
                kind,
                user_id: Uuid::nil(),
                amount: Money { currency, value },
                occurred_at: self.at + offset,
            });
        }
    }
}

/// A Poisson draw by Knuth's method (rates here are small: tens a minute at most).
fn poisson(rng: &mut ChaCha8Rng, rate: f64) -> u32 {
    if rate <= 0.0 {
        return 0;
    }
    let limit = (-rate).exp();
    let mut product: f64 = rng.r#gen();
    let mut count = 0;
    while product > limit {
        product *= rng.r#gen::<f64>();
        count += 1;
    }
    count
}

/// A capped lognormal amount distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Lognormal {
    median: f64,
    sigma: f64,
    cap: f64,
}

impl Lognormal {
    fn new(median: f64, sigma: f64, cap: f64) -> Self {
        Self { median, sigma, cap }
    }

    /// One amount, rounded to the cent and at least one cent.
    fn cents(&self, rng: &mut ChaCha8Rng) -> Decimal {
        let x = (self.median * (self.sigma * standard_normal(rng)).exp()).min(self.cap);
        let cents = ((x * 100.0).round() as i64).max(1);
        Decimal::new(cents, 2).normalize()
    }
}

fn lognormal_mean(median: f64, sigma: f64) -> f64 {
    median * (sigma * sigma / 2.0).exp()
}

/// A standard normal draw (Box–Muller).
fn standard_normal(rng: &mut ChaCha8Rng) -> f64 {
    let u: f64 = 1.0 - rng.r#gen::<f64>();
    let v: f64 = rng.r#gen();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Count and total of one kind of event in one currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowTotal {
    /// Deposit or withdrawal.
    pub kind: FlowKind,
    /// The events' currency.
    pub currency: Currency,
    /// How many events.
    pub count: usize,
    /// Their amounts added up, exactly.
    pub total: Decimal,
}

/// What a trace holds, for the report header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceSummary {
    /// Number of events.
    pub count: usize,
    /// Per kind × currency, in the order USDC deposits, USDC withdrawals, USD
    /// deposits, USD withdrawals.
    pub totals: [FlowTotal; 4],
    /// Time of the earliest event.
    pub first: Option<DateTime<Utc>>,
    /// Time of the latest event.
    pub last: Option<DateTime<Utc>>,
}

impl TraceSummary {
    /// The count and total of `kind` events in `currency`.
    pub fn total(&self, kind: FlowKind, currency: Currency) -> FlowTotal {
        self.totals
            .iter()
            .copied()
            .find(|t| t.kind == kind && t.currency == currency)
            .unwrap_or(FlowTotal {
                kind,
                currency,
                count: 0,
                total: Decimal::ZERO,
            })
    }

    /// Deposits minus withdrawals in `currency`.
    pub fn net(&self, currency: Currency) -> Decimal {
        self.total(FlowKind::Deposit, currency).total
            - self.total(FlowKind::Withdrawal, currency).total
    }
}

impl fmt::Display for TraceSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} events", self.count)?;
        if let (Some(first), Some(last)) = (self.first, self.last) {
            write!(f, " from {} to {}", first.to_rfc3339(), last.to_rfc3339())?;
        }
        for t in &self.totals {
            write!(
                f,
                "; {} {}: {} totalling {}",
                t.currency,
                t.kind.as_str(),
                t.count,
                t.total
            )?;
        }
        Ok(())
    }
}

/// Counts and totals `events` (in any order).
pub fn describe(events: &[FlowEvent]) -> TraceSummary {
    let slot = |kind, currency| FlowTotal {
        kind,
        currency,
        count: 0,
        total: Decimal::ZERO,
    };
    let mut totals = [
        slot(FlowKind::Deposit, Currency::Usdc),
        slot(FlowKind::Withdrawal, Currency::Usdc),
        slot(FlowKind::Deposit, Currency::Usd),
        slot(FlowKind::Withdrawal, Currency::Usd),
    ];
    for event in events {
        if let Some(t) = totals
            .iter_mut()
            .find(|t| t.kind == event.kind && t.currency == event.amount.currency)
        {
            t.count += 1;
            t.total += event.amount.value;
        }
    }
    TraceSummary {
        count: events.len(),
        totals,
        first: events.iter().map(|e| e.occurred_at).min(),
        last: events.iter().map(|e| e.occurred_at).max(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn start() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, 0, 0, 0).unwrap()
    }

    #[test]
    fn scenario_names_round_trip() {
        for scenario in Scenario::ALL {
            assert_eq!(scenario.to_string().parse::<Scenario>(), Ok(scenario));
        }
        assert!("Normal".parse::<Scenario>().is_err());
    }

    #[test]
    fn the_intensity_peak_is_five_times_the_trough() {
        let at = |h| start() + Duration::hours(h);
        let total = |r: Rates| r.deposits + r.withdrawals;
        let ratio = total(base_rates(at(14))) / total(base_rates(at(2)));
        assert!((ratio - 5.0).abs() < 1e-9, "{ratio}");
        assert!(base_rates(at(8)).deposits > base_rates(at(8)).withdrawals);
        assert!(base_rates(at(20)).deposits < base_rates(at(20)).withdrawals);
        let saturday = total(base_rates(at(5 * 24 + 14)));
        assert!((saturday / total(base_rates(at(14))) - WEEKEND_FACTOR).abs() < 1e-9);
    }

    #[test]
    fn poisson_draws_average_their_rate() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 20_000;
        let sum: u32 = (0..n).map(|_| poisson(&mut rng, 3.5)).sum();
        let mean = f64::from(sum) / f64::from(n);
        assert!((mean - 3.5).abs() < 0.1, "{mean}");
        assert_eq!(poisson(&mut rng, 0.0), 0);
    }

    #[test]
    fn amounts_are_cents_within_the_cap() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let dist = Lognormal::new(AMOUNT_MEDIAN, AMOUNT_SIGMA, 1_000.0);
        for _ in 0..10_000 {
            let v = dist.cents(&mut rng);
            assert!(v > Decimal::ZERO && v <= Decimal::from(1_000) && v.scale() <= 2);
        }
    }

    #[test]
    fn normal_has_three_to_five_half_hour_bursts_on_distinct_days() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let plan = Plan::new(Scenario::Normal, &mut rng);
        assert!((3..=5).contains(&plan.bursts.len()));
        let days: Vec<i64> = plan
            .bursts
            .iter()
            .map(|b| b.start / MINUTES_PER_DAY)
            .collect();
        assert!(days.windows(2).all(|w| w[0] < w[1]));
        assert!(plan.bursts.iter().all(|b| b.end - b.start == BURST_MINUTES));
    }

    #[test]
    fn the_run_alone_withdraws_about_its_total() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut plan = Plan::new(Scenario::BankRun, &mut rng);
        plan.base = 0.0;
        let events = sample(&plan, &mut rng, start());
        let total: Decimal = events.iter().map(|e| e.amount.value).sum();
        assert!(
            events
                .iter()
                .all(|e| e.kind == FlowKind::Withdrawal && e.amount.currency == Currency::Usdc)
        );
        assert!(
            total > Decimal::from(150_000) && total < Decimal::from(250_000),
            "{total}"
        );
    }

    #[test]
    fn quiet_has_idle_stretches_of_hours() {
        let events = generate(Scenario::Quiet, 5, start());
        let gaps = events
            .windows(2)
            .filter(|w| w[1].occurred_at - w[0].occurred_at >= Duration::hours(3))
            .count();
        assert!(gaps > 40, "{gaps} gaps");
        assert!(
            events.len() > 5_000 && events.len() < 40_000,
            "{}",
            events.len()
        );
    }

    #[test]
    fn describe_counts_and_totals_each_kind_and_currency() {
        let events = generate(Scenario::Quiet, 6, start());
        let summary = describe(&events);
        assert_eq!(summary.count, events.len());
        assert_eq!(
            summary.totals.iter().map(|t| t.count).sum::<usize>(),
            events.len()
        );
        assert_eq!(summary.first, events.first().map(|e| e.occurred_at));
        assert_eq!(summary.last, events.last().map(|e| e.occurred_at));
        let usd: Decimal = events
            .iter()
            .filter(|e| e.amount.currency == Currency::Usd)
            .map(|e| match e.kind {
                FlowKind::Deposit => e.amount.value,
                FlowKind::Withdrawal => -e.amount.value,
            })
            .sum();
        assert_eq!(summary.net(Currency::Usd), usd);
        assert_eq!(describe(&[]).first, None);
    }
}
