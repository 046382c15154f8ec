//! The simulated executor and its providers: commands become jobs, jobs go to
//! the provider [`select_providers`] ranks and the quotes choose
//! ([`by_quotes`](crate::providers::Selection::by_quotes)), run for a latency
//! drawn from the provider's model, complete (or fail, or lose their answer, or meet an
//! outage) and, once the executor has seen the completion at its next monitor
//! poll, post through the engine's own [`ledger::posting_for`], whose
//! [`ledger::buffer_movements`] move the engine's book balances.
//!
//! Two balances are kept apart, as in life: the *actual* money in each buffer
//! (the source pays when the provider accepts, the destination is paid when
//! the provider completes) and the engine's *book* (moved by postings, as the
//! production store does at completion).
//!
//! The provider's side keeps one record per idempotency key, so asking again
//! after a lost answer returns the same conversion: the simulation counts
//! executions per command and an invariant checks that none completes twice.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use chrono::{DateTime, Duration, Utc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rust_decimal::Decimal;
use uuid::Uuid;

use super::scenario::{ProviderModel, SimProvider};
use crate::domain::{BufferAccount, ConversionCommand, ConversionJob, JobStatus, Money};
use crate::ledger::{self, Settlement};
use crate::providers::health::{AttemptOutcome, track_records};
use crate::providers::selection::{HealthRule, select_providers};
use crate::providers::{Quote, SandboxBehaviour};

/// Money as it really is and as the engine books it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Balances {
    /// What each buffer actually holds.
    pub actual: BTreeMap<BufferAccount, Decimal>,
    /// What the engine's store says each buffer holds.
    pub book: BTreeMap<BufferAccount, Decimal>,
    /// Sent to providers and not yet delivered or returned (source units, at par).
    pub in_transit: Decimal,
    /// Fees and spread paid so far (source units, at par).
    pub costs: Decimal,
    /// The fee part of `costs`.
    pub fees: Decimal,
}

/// One conversion as a provider recorded it.
#[derive(Debug, Clone)]
struct Execution {
    provider: usize,
    fails: bool,
    fee: Money,
    destination: Money,
    rate: Decimal,
    finished: bool,
}

/// A job and where the simulated executor is with it.
#[derive(Debug, Clone)]
pub struct SimJob {
    pub job: ConversionJob,
    /// When the command reached the executor.
    pub started_at: DateTime<Utc>,
    /// When the job reached a final status.
    pub ended_at: Option<DateTime<Utc>>,
    /// Provider index the current attempt runs at.
    provider: Option<usize>,
    /// Whether the executor knows the provider accepted the current attempt.
    accepted: bool,
    /// Initiate calls made at the current provider.
    calls: u32,
}

/// The window provider health is judged over (the live default).
const HEALTH_WINDOW: Duration = Duration::hours(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// A provider finishes a conversion (money moves for real).
    ProviderFinishes { job: usize },
    /// The executor drives a job: initiates, or polls at a monitor tick.
    ExecutorDrives { job: usize },
}

/// What happened to jobs during one advance, for the metrics.
#[derive(Debug, Default)]
pub struct Outcomes {
    /// Jobs that completed and posted, with the cost they paid.
    pub completed: Vec<(usize, Decimal)>,
    /// Jobs that ended failed.
    pub failed: Vec<usize>,
}

/// The simulated executor.
pub struct SimExecutor {
    providers: Vec<SimProvider>,
    health: HealthRule,
    monitor: Duration,
    max_retries: u32,
    rng: ChaCha8Rng,
    /// The trace's start: provider outages are offsets from it.
    origin: DateTime<Utc>,
    pub jobs: Vec<SimJob>,
    /// Jobs not final, by index.
    active: std::collections::BTreeSet<usize>,
    by_command: HashMap<Uuid, usize>,
    /// Per job, the provider-side records (at most one per provider).
    executions: Vec<Vec<Execution>>,
    queue: BinaryHeap<Reverse<(DateTime<Utc>, u64, Step)>>,
    seq: u64,
    /// Day whose volumes the rows count.
    day: chrono::NaiveDate,
    /// Whether provider limits (min/max/cap) are ignored (per-event baseline).
    ignore_limits: bool,
    /// One outcome per finished job attempt, for provider health.
    outcomes: Vec<AttemptOutcome>,
}

impl SimExecutor {
    /// An executor over `providers`, drawing every random choice from `seed`.
    pub fn new(
        providers: Vec<SimProvider>,
        monitor: std::time::Duration,
        seed: u64,
        origin: DateTime<Utc>,
        ignore_limits: bool,
    ) -> Self {
        Self {
            providers,
            health: HealthRule::default(),
            monitor: Duration::from_std(monitor).unwrap_or(Duration::minutes(1)),
            max_retries: 3,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_e8ec),
            origin,
            jobs: Vec::new(),
            active: std::collections::BTreeSet::new(),
            by_command: HashMap::new(),
            executions: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            day: origin.date_naive(),
            ignore_limits,
            outcomes: Vec::new(),
        }
    }

    /// The providers' rows as the engine sees them now.
    pub fn rows(&self) -> Vec<crate::providers::ProviderRow> {
        self.providers.iter().map(|p| p.row.clone()).collect()
    }

    fn schedule(&mut self, at: DateTime<Utc>, step: Step) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, step)));
    }

    /// When the next thing happens, if anything is pending.
    pub fn next_at(&self) -> Option<DateTime<Utc>> {
        self.queue.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Takes a command (a second copy of the same command is ignored, as the
    /// production intake does). Returns whether it became a new job.
    pub fn submit(&mut self, command: &ConversionCommand, now: DateTime<Utc>) -> bool {
        if self.by_command.contains_key(&command.command_id) {
            return false;
        }
        let index = self.jobs.len();
        self.by_command.insert(command.command_id, index);
        self.jobs.push(SimJob {
            job: ConversionJob::from_command(command),
            started_at: now,
            ended_at: None,
            provider: None,
            accepted: false,
            calls: 0,
        });
        self.executions.push(Vec::new());
        self.active.insert(index);
        self.schedule(now, Step::ExecutorDrives { job: index });
        true
    }

    /// Jobs not final, as the planner counts them in flight.
    pub fn in_flight(&self) -> impl Iterator<Item = &ConversionJob> {
        self.in_flight_jobs().map(|j| &j.job)
    }

    /// Jobs not final, with when each reached the executor.
    pub fn in_flight_jobs(&self) -> impl Iterator<Item = &SimJob> {
        self.active.iter().map(|i| &self.jobs[*i])
    }

    /// Completed executions per command at providers (an invariant: ≤ 1).
    pub fn completed_executions(&self, job: usize) -> usize {
        self.executions[job]
            .iter()
            .filter(|e| e.finished && !e.fails)
            .count()
    }

    /// Runs everything due at or before `until`.
    pub fn advance(&mut self, until: DateTime<Utc>, balances: &mut Balances) -> Outcomes {
        let mut outcomes = Outcomes::default();
        while let Some(Reverse((at, _, step))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.queue.pop();
            self.roll_day(at);
            match step {
                Step::ProviderFinishes { job } => self.provider_finishes(job, balances),
                Step::ExecutorDrives { job } => self.drive(job, at, balances, &mut outcomes),
            }
        }
        outcomes
    }

    fn roll_day(&mut self, at: DateTime<Utc>) {
        let today = at.date_naive();
        if today != self.day {
            self.day = today;
            for p in &mut self.providers {
                p.row.daily_volume_used = Decimal::ZERO;
            }
        }
    }

    fn down(&self, provider: usize, at: DateTime<Utc>) -> bool {
        let offset = at - self.origin;
        self.providers[provider]
            .model
            .outages
            .iter()
            .any(|(from, to)| {
                let from = Duration::from_std(*from).unwrap_or(Duration::MAX);
                let to = Duration::from_std(*to).unwrap_or(Duration::MAX);
                offset >= from && offset < to
            })
    }

    fn next_monitor_tick(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        at + self.monitor
    }

    /// The executor's step for a job at `now`.
    fn drive(
        &mut self,
        index: usize,
        now: DateTime<Utc>,
        balances: &mut Balances,
        outcomes: &mut Outcomes,
    ) {
        if self.jobs[index].job.status.is_final() {
            return;
        }
        let provider = match self.jobs[index].provider {
            Some(p) => p,
            None => match self.choose(index, now) {
                Some(p) => p,
                None => {
                    self.end(index, JobStatus::Failed, now, "no eligible provider");
                    outcomes.failed.push(index);
                    return;
                }
            },
        };
        if !self.jobs[index].accepted {
            self.initiate(index, provider, now, balances);
            return;
        }
        if self.down(provider, now) {
            let tick = self.next_monitor_tick(now);
            self.schedule(tick, Step::ExecutorDrives { job: index });
            return;
        }
        let Some(execution) = self.executions[index]
            .iter()
            .find(|e| e.provider == provider)
            .cloned()
        else {
            return;
        };
        if !execution.finished {
            let tick = self.next_monitor_tick(now);
            self.schedule(tick, Step::ExecutorDrives { job: index });
        } else if execution.fails {
            // A final failure at this provider: the money came back, so the
            // next provider may run the same command.
            let id = self.providers[provider].row.id;
            self.outcome(provider, now, false);
            let job = &mut self.jobs[index];
            job.job.attempted_providers.push(id);
            job.provider = None;
            job.accepted = false;
            job.calls = 0;
            self.schedule(now, Step::ExecutorDrives { job: index });
        } else {
            self.complete(index, provider, &execution, now, balances, outcomes);
        }
    }

    fn outcome(&mut self, provider: usize, at: DateTime<Utc>, succeeded: bool) {
        let row = &mut self.providers[provider].row;
        if succeeded {
            row.success_count += 1;
        } else {
            row.failure_count += 1;
        }
        self.outcomes.push(AttemptOutcome {
            provider: row.id,
            at,
            succeeded,
        });
    }

    fn choose(&mut self, index: usize, now: DateTime<Utc>) -> Option<usize> {
        let job = &self.jobs[index].job;
        if self.ignore_limits {
            return self
                .providers
                .iter()
                .position(|p| !job.attempted_providers.contains(&p.row.id));
        }
        let candidates: Vec<_> = self
            .providers
            .iter()
            .filter(|p| !job.attempted_providers.contains(&p.row.id))
            .map(|p| p.row.clone())
            .collect();
        let mut in_flight: HashMap<Uuid, Decimal> = HashMap::new();
        for j in self.active.iter().map(|i| &self.jobs[*i]) {
            if let Some(p) = j.provider {
                *in_flight.entry(self.providers[p].row.id).or_default() += j.job.amount.value;
            }
        }
        let since = now - HEALTH_WINDOW;
        self.outcomes.retain(|o| o.at > since);
        let records = track_records(&self.outcomes, now, HEALTH_WINDOW);
        let selection = select_providers(
            &candidates,
            job.direction,
            job.amount.value,
            &in_flight,
            &records,
            &self.health,
        );
        // Every provider quotes as the sandbox does, from its row; one that is
        // down gives no quote, as a live provider would.
        let quotes: HashMap<Uuid, Result<Quote, String>> = selection
            .eligible
            .iter()
            .filter_map(|p| {
                let index = self.providers.iter().position(|s| s.row.id == p.row.id)?;
                let quote = if self.down(index, now) {
                    Err("provider down".to_owned())
                } else {
                    Ok(SandboxBehaviour::from_row(&p.row).quote(&job.amount))
                };
                Some((p.row.id, quote))
            })
            .collect();
        let selection = selection.by_quotes(job.amount.value, &quotes);
        let chosen = selection.chosen()?.row.id;
        let position = self.providers.iter().position(|p| p.row.id == chosen)?;
        let job = &mut self.jobs[index];
        job.provider = Some(position);
        job.job.provider_id = Some(chosen);
        job.job.provider_name = Some(self.providers[position].row.name.clone());
        Some(position)
    }

    fn initiate(
        &mut self,
        index: usize,
        provider: usize,
        now: DateTime<Utc>,
        balances: &mut Balances,
    ) {
        self.jobs[index].calls += 1;
        let existing = self.executions[index]
            .iter()
            .any(|e| e.provider == provider);
        if self.down(provider, now) && existing {
            // It may have executed: hold at this provider and ask again.
            let tick = self.next_monitor_tick(now);
            self.schedule(tick, Step::ExecutorDrives { job: index });
            return;
        }
        if self.down(provider, now) {
            // Nothing reached the provider: retry, then fall back.
            if self.jobs[index].calls > self.max_retries {
                let id = self.providers[provider].row.id;
                self.outcome(provider, now, false);
                let job = &mut self.jobs[index];
                job.job.attempted_providers.push(id);
                job.provider = None;
                job.calls = 0;
            }
            let backoff = Duration::seconds(1 << self.jobs[index].calls.min(10));
            self.schedule(now + backoff, Step::ExecutorDrives { job: index });
            return;
        }
        if !existing {
            let model = self.providers[provider].model.clone();
            let latency = sample_latency(&mut self.rng, &model);
            let fails = self.rng.gen_bool(model.failure_rate);
            let behaviour = SandboxBehaviour::from_row(&self.providers[provider].row);
            let job = &self.jobs[index].job;
            let fee = behaviour.fee_for(&job.amount);
            let destination = behaviour.destination_for(job.direction, &job.amount, &fee);
            self.executions[index].push(Execution {
                provider,
                fails,
                fee,
                destination,
                rate: behaviour.rate(),
                finished: false,
            });
            // The provider took the money.
            *balances.actual.entry(job.source_account).or_default() -= job.amount.value;
            balances.in_transit += job.amount.value;
            self.schedule(now + latency, Step::ProviderFinishes { job: index });
            let lost = self.rng.gen_bool(model.lost_answer_rate);
            if lost {
                // Executed, but the answer never arrived: hold and ask again
                // with the same key at the next monitor tick.
                let tick = self.next_monitor_tick(now);
                self.schedule(tick, Step::ExecutorDrives { job: index });
                return;
            }
        }
        let job = &mut self.jobs[index];
        job.accepted = true;
        job.job.status = JobStatus::ProviderSubmitted;
        job.job.submitted_at.get_or_insert(now);
        let tick = self.next_monitor_tick(now);
        self.schedule(tick, Step::ExecutorDrives { job: index });
    }

    fn provider_finishes(&mut self, index: usize, balances: &mut Balances) {
        let job = self.jobs[index].job.clone();
        let Some(execution) = self.executions[index].iter_mut().find(|e| !e.finished) else {
            return;
        };
        execution.finished = true;
        balances.in_transit -= job.amount.value;
        if execution.fails {
            *balances.actual.entry(job.source_account).or_default() += job.amount.value;
        } else {
            *balances.actual.entry(job.destination_account).or_default() +=
                execution.destination.value;
            balances.costs += job.amount.value - execution.destination.value;
            balances.fees += execution.fee.value;
        }
    }

    fn complete(
        &mut self,
        index: usize,
        provider: usize,
        execution: &Execution,
        now: DateTime<Utc>,
        balances: &mut Balances,
        outcomes: &mut Outcomes,
    ) {
        let settled = Settlement {
            destination_amount: execution.destination,
            fee: execution.fee,
            rate: execution.rate,
        };
        let mut job = self.jobs[index].job.clone();
        job.destination_amount = Some(execution.destination);
        job.fee = Some(execution.fee);
        job.exchange_rate = Some(execution.rate);
        match ledger::posting_for(&job, &settled, now) {
            Ok(posting) => {
                for (account, delta) in ledger::buffer_movements(&posting) {
                    *balances.book.entry(account).or_default() += delta;
                }
                self.outcome(provider, now, true);
                self.providers[provider].row.daily_volume_used += job.amount.value;
                self.jobs[index].job = job;
                self.end(index, JobStatus::Completed, now, "completed");
                outcomes.completed.push((
                    index,
                    self.jobs[index].job.amount.value - execution.destination.value,
                ));
            }
            Err(e) => {
                self.end(index, JobStatus::NeedsReview, now, &e.to_string());
            }
        }
    }

    fn end(&mut self, index: usize, status: JobStatus, now: DateTime<Utc>, note: &str) {
        let job = &mut self.jobs[index];
        job.job.status = status;
        job.job.error_message = Some(note.to_owned());
        if status.is_final() {
            job.ended_at = Some(now);
            self.active.remove(&index);
        }
    }
}

/// A lognormal latency through the model's median and 99th percentile.
fn sample_latency(rng: &mut ChaCha8Rng, model: &ProviderModel) -> Duration {
    const Z99: f64 = 2.326_347_874;
    let median = model.latency_median.as_secs_f64().max(1.0);
    let p99 = model.latency_p99.as_secs_f64().max(median);
    let sigma = (p99.ln() - median.ln()) / Z99;
    // Box–Muller: one standard normal from two uniforms.
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.r#gen();
    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    let seconds = (median.ln() + sigma * z).exp().min(7.0 * 86_400.0);
    Duration::milliseconds((seconds * 1000.0) as i64)
}
