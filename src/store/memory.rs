//! An in-memory store with the same interface and seeds as PostgreSQL, for the
//! embedded demo. NOT DURABLE: everything is lost when the process exits.
//! Each transaction works on a copy of the state and swaps it in on commit,
//! so a dropped transaction changes nothing, as in PostgreSQL.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

use super::jobs::{JobStore, JobUpdate, Lease, LeasedJob, Outcome};
use super::operator::{self, OperatorAction, OperatorOutcome};
use super::{
    BufferReport, EventRef, LockMode, OffsetRange, OutboxMessage, PlannedCommand, PlanningRecords,
    ProgressUpdate, Store, StoreError, StoreTx, TopicPartition, WindowRecord,
};
use crate::domain::{
    BufferAccount, BufferStatus, ConversionDirection, ConversionJob, JobStatus, LedgerPosting,
    Thresholds,
};
use crate::planner::{AmountLimits, BufferPosition, InFlight};
use crate::providers::ProviderRow;
use crate::providers::health::AttemptOutcome;
use crate::window::{PartitionProgress, WindowTallies, WindowTally};

#[derive(Debug, Clone)]
struct WindowRow {
    end: DateTime<Utc>,
    tally: WindowTally,
    closed: bool,
    result: Option<serde_json::Value>,
}

#[derive(Debug, Clone)]
struct State {
    offsets: BTreeMap<(String, TopicPartition), i64>,
    progress: BTreeMap<TopicPartition, PartitionProgress>,
    /// Counted event ids and when they were counted.
    processed: HashMap<Uuid, DateTime<Utc>>,
    /// Outbox messages a relay has claimed, until when (as in PostgreSQL).
    claimed: HashMap<Uuid, DateTime<Utc>>,
    windows: BTreeMap<DateTime<Utc>, WindowRow>,
    next_window_start: Option<DateTime<Utc>>,
    paused: bool,
    buffers: BTreeMap<BufferAccount, (Thresholds, Decimal, Decimal)>,
    planned: Vec<PlannedCommand>,
    outbox: Vec<(OutboxMessage, bool)>,
    triggers: Vec<(i64, Option<serde_json::Value>)>,
    jobs: BTreeMap<Uuid, MemoryJob>,
    providers: Vec<ProviderRow>,
    postings: BTreeMap<Uuid, LedgerPosting>,
    /// One outcome per (job, provider).
    outcomes: BTreeMap<(Uuid, Uuid), AttemptOutcome>,
    announced: BTreeMap<BufferAccount, BufferStatus>,
}

#[derive(Debug, Clone)]
struct MemoryJob {
    job: ConversionJob,
    /// Owner and expiry (at the callers' clock).
    lease: Option<(String, DateTime<Utc>)>,
    /// Incremented on every new lease (the fencing token).
    epoch: i64,
    history: Vec<(Option<JobStatus>, JobStatus, String)>,
    /// When the job completed (its posting's time).
    completed_at: Option<DateTime<Utc>>,
}

impl MemoryJob {
    /// Unfinished and not waiting for a person.
    fn drivable(&self) -> bool {
        !self.job.status.is_final() && self.job.status != JobStatus::NeedsReview
    }

    /// Nobody holds an unexpired lease at `now`.
    fn lease_free(&self, now: DateTime<Utc>) -> bool {
        self.lease.as_ref().is_none_or(|(_, until)| *until <= now)
    }

    /// Extends `lease` to `now + by` if it is the job's current, unexpired lease.
    fn extend(&mut self, lease: &Lease, now: DateTime<Utc>, by: std::time::Duration) -> bool {
        if !self.fenced(lease, now) {
            return false;
        }
        self.lease = Some((lease.owner.clone(), now + chrono_duration(by)));
        true
    }

    /// `lease` is the job's current, unexpired lease at `now`.
    fn fenced(&self, lease: &Lease, now: DateTime<Utc>) -> bool {
        self.epoch == lease.epoch
            && self
                .lease
                .as_ref()
                .is_some_and(|(who, until)| *who == lease.owner && *until > now)
    }
}

impl State {
    /// One outcome per job and provider (a later one replaces it), and the
    /// provider's lifetime counters.
    fn record_outcome(&mut self, job: Uuid, outcome: Outcome, now: DateTime<Utc>) {
        self.outcomes.insert(
            (job, outcome.provider),
            AttemptOutcome {
                provider: outcome.provider,
                at: now,
                succeeded: outcome.succeeded,
            },
        );
        if let Some(p) = self.providers.iter_mut().find(|p| p.id == outcome.provider) {
            if outcome.succeeded {
                p.success_count += 1;
            } else {
                p.failure_count += 1;
            }
        }
    }
}

/// A lease length as a chrono duration (lengths beyond chrono's range are a day).
fn chrono_duration(d: std::time::Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or_else(|_| chrono::Duration::days(1))
}

impl State {
    /// The migrations' seeds ([`super::seeds`]): thresholds, opening
    /// balances at target, and the seeded providers, served by the sandbox
    /// (`provider_type = 'sandbox'`: the demo runs no real provider).
    fn seeded() -> Self {
        let buffers = super::seeds::buffers()
            .expect("the migration's buffer seeds read (checked by the store tests)")
            .into_iter()
            .map(|b| {
                (
                    b.account,
                    (b.thresholds, b.batch_size, b.thresholds.target()),
                )
            })
            .collect();
        let providers = super::seeds::providers()
            .expect("the migration's provider seeds read (checked by the store tests)")
            .into_iter()
            .map(|row| ProviderRow {
                provider_type: "sandbox".into(),
                ..row
            })
            .collect();
        Self {
            offsets: BTreeMap::new(),
            progress: BTreeMap::new(),
            processed: HashMap::new(),
            claimed: HashMap::new(),
            windows: BTreeMap::new(),
            next_window_start: None,
            paused: false,
            buffers,
            planned: Vec::new(),
            outbox: Vec::new(),
            triggers: Vec::new(),
            jobs: BTreeMap::new(),
            providers,
            postings: BTreeMap::new(),
            outcomes: BTreeMap::new(),
            announced: BTreeMap::new(),
        }
    }
}

impl State {
    /// Whether the command's job has reached a final status.
    fn command_settled(&self, command: Uuid) -> bool {
        self.jobs
            .values()
            .any(|j| j.job.command_id == command && j.job.status.is_final())
    }
}

/// The in-memory store (demo only; not durable).
#[derive(Clone)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            state: Arc::new(Mutex::new(State::seeded())),
        }
    }
}

impl MemoryStore {
    /// Sets a buffer's balance (demo scenarios start some buffers low).
    pub async fn set_balance(&self, account: BufferAccount, balance: Decimal) {
        if let Some(buffer) = self.state.lock().await.buffers.get_mut(&account) {
            buffer.2 = balance;
        }
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn begin(&self, _mode: LockMode) -> Result<Box<dyn StoreTx>, StoreError> {
        let guard = self.state.clone().lock_owned().await;
        let work = guard.clone();
        Ok(Box::new(MemoryTx { guard, work }))
    }

    async fn load_offsets(
        &self,
        group: &str,
        partitions: &[TopicPartition],
    ) -> Result<BTreeMap<TopicPartition, i64>, StoreError> {
        let state = self.state.lock().await;
        Ok(partitions
            .iter()
            .filter_map(|tp| {
                state
                    .offsets
                    .get(&(group.to_owned(), tp.clone()))
                    .map(|o| (tp.clone(), *o))
            })
            .collect())
    }

    async fn outbox_pending(&self, limit: i64) -> Result<Vec<OutboxMessage>, StoreError> {
        // Claims the messages for 30 s, as PostgreSQL does: another relay
        // skips them meanwhile and takes them over if this one never marks them.
        let mut state = self.state.lock().await;
        let now = Utc::now();
        let State {
            outbox, claimed, ..
        } = &mut *state;
        let pending: Vec<OutboxMessage> = outbox
            .iter()
            .filter(|(m, sent)| !sent && claimed.get(&m.id).is_none_or(|until| *until < now))
            .take(limit.max(0) as usize)
            .map(|(m, _)| m.clone())
            .collect();
        for m in &pending {
            claimed.insert(m.id, now + chrono::Duration::seconds(30));
        }
        Ok(pending)
    }

    async fn mark_sent(&self, ids: &[Uuid]) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        for (message, sent) in state.outbox.iter_mut() {
            if ids.contains(&message.id) {
                *sent = true;
            }
        }
        Ok(())
    }

    async fn buffer_report(&self) -> Result<Vec<BufferReport>, StoreError> {
        let state = self.state.lock().await;
        Ok(state
            .buffers
            .iter()
            .map(|(account, (t, _, balance))| BufferReport {
                account: *account,
                currency: account.currency().code().into(),
                balance: *balance,
                min: t.min(),
                target: t.target(),
                max: t.max(),
                status: t.status(*balance),
                amount_to_target: (t.target() - *balance).max(Decimal::ZERO),
            })
            .collect())
    }

    async fn windows(&self) -> Result<Vec<WindowRecord>, StoreError> {
        let state = self.state.lock().await;
        Ok(state
            .windows
            .iter()
            .map(|(start, w)| WindowRecord {
                window_start: *start,
                window_end: w.end,
                event_count: w.tally.events as i64,
                late_event_count: w.tally.late_events as i64,
                closed: w.closed,
                flows: w
                    .tally
                    .flows
                    .iter()
                    .map(|(a, f)| (*a, (f.inflow, f.outflow)))
                    .collect(),
                demand: w.tally.demand.iter().map(|(d, (a, _))| (*d, *a)).collect(),
                result: w.result.clone(),
            })
            .collect())
    }

    async fn planned_commands(&self) -> Result<Vec<PlannedCommand>, StoreError> {
        Ok(self.state.lock().await.planned.clone())
    }

    async fn request_trigger(&self, _requested_by: &str) -> Result<i64, StoreError> {
        let mut state = self.state.lock().await;
        let id = state.triggers.len() as i64 + 1;
        state.triggers.push((id, None));
        Ok(id)
    }

    async fn purge_processed(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut state = self.state.lock().await;
        let count = state.processed.len();
        state.processed.retain(|_, at| *at >= before);
        Ok((count - state.processed.len()) as u64)
    }

    async fn set_offsets(
        &self,
        group: &str,
        offsets: &BTreeMap<TopicPartition, i64>,
    ) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        for (tp, offset) in offsets {
            state
                .offsets
                .insert((group.to_owned(), tp.clone()), *offset);
        }
        Ok(())
    }

    async fn jobs_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let state = self.state.lock().await;
        Ok(JobStatus::ALL
            .map(|status| {
                let n = state
                    .jobs
                    .values()
                    .filter(|j| j.job.status == status)
                    .count();
                (status, n as i64)
            })
            .to_vec())
    }
}

struct MemoryTx {
    guard: OwnedMutexGuard<State>,
    work: State,
}

#[async_trait]
impl StoreTx for MemoryTx {
    async fn advance_offsets(
        &mut self,
        group: &str,
        ranges: &[OffsetRange],
    ) -> Result<(), StoreError> {
        for range in ranges {
            let key = (group.to_owned(), range.tp.clone());
            if let Some(stored) = self.work.offsets.get(&key)
                && *stored > range.first
            {
                return Err(StoreError::OffsetConflict {
                    topic: range.tp.topic.clone(),
                    partition: range.tp.partition,
                    stored: *stored,
                    first: range.first,
                });
            }
            self.work.offsets.insert(key, range.next);
        }
        Ok(())
    }

    async fn claim_events(&mut self, events: &[EventRef]) -> Result<HashSet<Uuid>, StoreError> {
        Ok(events
            .iter()
            .filter(|e| {
                let new = !self.work.processed.contains_key(&e.event_id);
                if new {
                    self.work.processed.insert(e.event_id, Utc::now());
                }
                new
            })
            .map(|e| e.event_id)
            .collect())
    }

    async fn add_tallies(
        &mut self,
        tallies: &WindowTallies,
        length: chrono::Duration,
    ) -> Result<(), StoreError> {
        for (start, tally) in &tallies.0 {
            self.work
                .windows
                .entry(*start)
                .or_insert_with(|| WindowRow {
                    end: *start + length,
                    tally: WindowTally::default(),
                    closed: false,
                    result: None,
                })
                .tally
                .merge(tally);
        }
        Ok(())
    }

    async fn record_progress(&mut self, updates: &[ProgressUpdate]) -> Result<(), StoreError> {
        for u in &ProgressUpdate::merged(updates) {
            let entry = self.work.progress.entry(u.tp.clone()).or_default();
            entry.reported_at = Some(u.now);
            entry.watermark = entry.watermark.max(u.max_event_time);
            entry.caught_up_since = if u.caught_up {
                entry.caught_up_since.or(Some(u.now))
            } else {
                None
            };
        }
        Ok(())
    }

    async fn register_partitions(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<(), StoreError> {
        for tp in partitions {
            self.work.progress.entry(tp.clone()).or_default();
        }
        Ok(())
    }

    async fn enqueue(&mut self, messages: &[OutboxMessage]) -> Result<(), StoreError> {
        for m in messages {
            if !self.work.outbox.iter().any(|(o, _)| o.id == m.id) {
                self.work.outbox.push((m.clone(), false));
            }
        }
        Ok(())
    }

    async fn next_window_start(&mut self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(self.work.next_window_start)
    }

    async fn set_next_window_start(&mut self, start: DateTime<Utc>) -> Result<(), StoreError> {
        self.work.next_window_start = Some(start);
        Ok(())
    }

    async fn open_windows(&mut self) -> Result<Vec<DateTime<Utc>>, StoreError> {
        Ok(self
            .work
            .windows
            .iter()
            .filter(|(_, w)| !w.closed)
            .map(|(start, _)| *start)
            .collect())
    }

    async fn partition_progress(
        &mut self,
        topics: &[String],
    ) -> Result<Vec<PartitionProgress>, StoreError> {
        Ok(self
            .work
            .progress
            .iter()
            .filter(|(tp, _)| topics.contains(&tp.topic))
            .map(|(_, p)| *p)
            .collect())
    }

    async fn window_tally(&mut self, start: DateTime<Utc>) -> Result<WindowTally, StoreError> {
        Ok(self
            .work
            .windows
            .get(&start)
            .map(|w| w.tally.clone())
            .unwrap_or_default())
    }

    async fn apply_flows(&mut self, tally: &WindowTally) -> Result<(), StoreError> {
        for (account, flow) in &tally.flows {
            if let Some(buffer) = self.work.buffers.get_mut(account) {
                buffer.2 += flow.net();
            }
        }
        Ok(())
    }

    async fn buffer_positions(&mut self) -> Result<Vec<BufferPosition>, StoreError> {
        let in_flight = |pick: &dyn Fn(&PlannedCommand) -> BufferAccount, account| {
            self.work
                .planned
                .iter()
                .filter(|p| p.emitted && !self.work.command_settled(p.command.command_id))
                .filter(|p| pick(p) == account)
                .map(|p| p.command.amount.value)
                .sum::<Decimal>()
        };
        Ok(self
            .work
            .buffers
            .iter()
            .map(|(account, (thresholds, batch, balance))| BufferPosition {
                account: *account,
                thresholds: *thresholds,
                batch_size: *batch,
                balance: *balance,
                incoming: in_flight(&|p| p.command.destination_account, *account),
                outgoing: in_flight(&|p| p.command.source_account, *account),
            })
            .collect())
    }

    async fn in_flight(&mut self) -> Result<Vec<InFlight>, StoreError> {
        let mut in_flight: Vec<(Uuid, InFlight)> = self
            .work
            .planned
            .iter()
            .filter(|p| p.emitted && !self.work.command_settled(p.command.command_id))
            .map(|p| {
                (
                    p.command.command_id,
                    InFlight {
                        destination: p.command.destination_account,
                        amount: p.command.amount.value,
                        since: p.command.created_at,
                    },
                )
            })
            .collect();
        in_flight.sort_by_key(|(id, f)| (f.since, *id));
        Ok(in_flight.into_iter().map(|(_, f)| f).collect())
    }

    async fn planning_records(
        &mut self,
        since: DateTime<Utc>,
    ) -> Result<PlanningRecords, StoreError> {
        let windows = self
            .work
            .windows
            .iter()
            .filter(|(start, row)| row.closed && **start >= since)
            .map(|(start, row)| (*start, row.tally.clone()))
            .collect();
        let mut completed: Vec<_> = self
            .work
            .jobs
            .values()
            .filter_map(|j| Some((j.completed_at?, j.job.created_at)))
            .filter(|(done, _)| *done >= since)
            .collect();
        completed.sort();
        Ok(PlanningRecords {
            providers: self.work.providers.clone(),
            windows,
            lead_times: completed
                .into_iter()
                .map(|(done, created)| done - created)
                .collect(),
        })
    }

    async fn amount_limits(
        &mut self,
    ) -> Result<BTreeMap<ConversionDirection, AmountLimits>, StoreError> {
        Ok(crate::planner::amount_limits(&self.work.providers))
    }

    async fn auto_rebalance_paused(&mut self) -> Result<bool, StoreError> {
        Ok(self.work.paused)
    }

    async fn close_window(
        &mut self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        _watermark: DateTime<Utc>,
        result: &serde_json::Value,
    ) -> Result<(), StoreError> {
        let row = self.work.windows.entry(start).or_insert_with(|| WindowRow {
            end,
            tally: WindowTally::default(),
            closed: false,
            result: None,
        });
        row.end = end;
        row.closed = true;
        row.result = Some(result.clone());
        Ok(())
    }

    async fn record_commands(&mut self, commands: &[PlannedCommand]) -> Result<(), StoreError> {
        for c in commands {
            if !self
                .work
                .planned
                .iter()
                .any(|p| p.command.command_id == c.command.command_id)
            {
                self.work.planned.push(c.clone());
            }
        }
        Ok(())
    }

    async fn pending_triggers(&mut self) -> Result<Vec<i64>, StoreError> {
        Ok(self
            .work
            .triggers
            .iter()
            .filter(|(_, handled)| handled.is_none())
            .map(|(id, _)| *id)
            .collect())
    }

    async fn finish_trigger(
        &mut self,
        id: i64,
        result: &serde_json::Value,
    ) -> Result<(), StoreError> {
        if let Some(t) = self.work.triggers.iter_mut().find(|(i, _)| *i == id) {
            t.1 = Some(result.clone());
        }
        Ok(())
    }

    async fn planned_command(&mut self, id: Uuid) -> Result<Option<PlannedCommand>, StoreError> {
        Ok(self
            .work
            .planned
            .iter()
            .find(|p| p.command.command_id == id)
            .cloned())
    }

    async fn announced_statuses(
        &mut self,
    ) -> Result<BTreeMap<BufferAccount, BufferStatus>, StoreError> {
        Ok(self.work.announced.clone())
    }

    async fn record_announced(
        &mut self,
        statuses: &BTreeMap<BufferAccount, BufferStatus>,
    ) -> Result<(), StoreError> {
        self.work.announced.extend(statuses);
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        let MemoryTx { mut guard, work } = *self;
        *guard = work;
        Ok(())
    }
}

#[async_trait]
impl JobStore for MemoryStore {
    async fn intake(
        &self,
        group: &str,
        ranges: &[OffsetRange],
        jobs: &[ConversionJob],
        dead_letters: &[OutboxMessage],
    ) -> Result<Vec<Uuid>, StoreError> {
        let mut tx = self.begin(LockMode::Shared).await?;
        tx.advance_offsets(group, ranges).await?;
        tx.enqueue(dead_letters).await?;
        // Offsets and jobs commit one after the other here, not atomically as
        // in PostgreSQL: acceptable for the demo, whose state dies with it.
        tx.commit().await?;
        let mut state = self.state.lock().await;
        let mut created = Vec::new();
        for job in jobs {
            if state
                .jobs
                .values()
                .any(|j| j.job.command_id == job.command_id)
            {
                continue;
            }
            state.jobs.insert(
                job.id,
                MemoryJob {
                    job: job.clone(),
                    lease: None,
                    epoch: 0,
                    history: vec![(None, JobStatus::Pending, "created from command".into())],
                    completed_at: None,
                },
            );
            created.push(job.id);
        }
        Ok(created)
    }

    async fn open_jobs(&self, now: DateTime<Utc>, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        let state = self.state.lock().await;
        let mut open: Vec<&MemoryJob> = state
            .jobs
            .values()
            .filter(|j| j.drivable() && j.lease_free(now))
            .collect();
        open.sort_by_key(|j| (j.job.created_at, j.job.id));
        Ok(open
            .into_iter()
            .take(limit.max(0) as usize)
            .map(|j| j.job.id)
            .collect())
    }

    async fn lease_job(
        &self,
        job: Uuid,
        owner: &str,
        now: DateTime<Utc>,
        lease: std::time::Duration,
    ) -> Result<Option<LeasedJob>, StoreError> {
        let mut state = self.state.lock().await;
        let Some(entry) = state.jobs.get_mut(&job) else {
            return Ok(None);
        };
        if !entry.drivable() || !entry.lease_free(now) {
            return Ok(None);
        }
        entry.epoch += 1;
        entry.lease = Some((owner.to_owned(), now + chrono_duration(lease)));
        Ok(Some(LeasedJob {
            job: entry.job.clone(),
            lease: Lease {
                job,
                owner: owner.to_owned(),
                epoch: entry.epoch,
            },
        }))
    }

    async fn renew(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        extend: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let mut state = self.state.lock().await;
        Ok(state
            .jobs
            .get_mut(&lease.job)
            .is_some_and(|entry| entry.extend(lease, now, extend)))
    }

    async fn release(&self, lease: &Lease) -> Result<(), StoreError> {
        let mut state = self.state.lock().await;
        if let Some(entry) = state.jobs.get_mut(&lease.job)
            && entry.epoch == lease.epoch
            && entry
                .lease
                .as_ref()
                .is_some_and(|(who, _)| *who == lease.owner)
        {
            entry.lease = None;
        }
        Ok(())
    }

    async fn record_call(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        extend: std::time::Duration,
    ) -> Result<bool, StoreError> {
        let mut state = self.state.lock().await;
        let Some(entry) = state.jobs.get_mut(&lease.job) else {
            return Ok(false);
        };
        let callable = entry.job.status == JobStatus::Pending && entry.job.provider_id.is_some();
        if !callable || !entry.extend(lease, now, extend) {
            return Ok(false);
        }
        entry.job.provider_called_at = Some(now);
        Ok(true)
    }

    async fn providers(&self) -> Result<Vec<ProviderRow>, StoreError> {
        Ok(self.state.lock().await.providers.clone())
    }

    async fn provider_outcomes(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<AttemptOutcome>, StoreError> {
        let state = self.state.lock().await;
        let mut outcomes: Vec<AttemptOutcome> = state
            .outcomes
            .values()
            .filter(|o| o.at > since)
            .copied()
            .collect();
        outcomes.sort_by_key(|o| o.at);
        Ok(outcomes)
    }

    async fn in_flight_by_provider(&self) -> Result<HashMap<Uuid, Decimal>, StoreError> {
        let state = self.state.lock().await;
        let mut volume = HashMap::new();
        for entry in state.jobs.values() {
            if let Some(p) = entry.job.provider_id
                && !entry.job.status.is_final()
            {
                *volume.entry(p).or_insert(Decimal::ZERO) += entry.job.amount.value;
            }
        }
        Ok(volume)
    }

    async fn update_job(&self, update: JobUpdate<'_>) -> Result<bool, StoreError> {
        let mut state = self.state.lock().await;
        let Some(entry) = state.jobs.get_mut(&update.job.id) else {
            return Ok(false);
        };
        if entry.job.status != update.from || !entry.fenced(update.lease, update.now) {
            return Ok(false);
        }
        if update.job.status != update.from {
            update
                .from
                .transition(update.job.status)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        }
        entry.job = update.job.clone();
        entry
            .history
            .push((Some(update.from), update.job.status, update.note.to_owned()));
        if let Some(outcome) = update.outcome {
            state.record_outcome(update.job.id, outcome, update.now);
        }
        Ok(true)
    }

    async fn complete_job(
        &self,
        lease: &Lease,
        now: DateTime<Utc>,
        job: &ConversionJob,
        posting: &LedgerPosting,
        message: &OutboxMessage,
    ) -> Result<bool, StoreError> {
        let mut state = self.state.lock().await;
        let destination = job
            .destination_amount
            .ok_or_else(|| StoreError::Corrupt("no destination amount".into()))?;
        let Some(entry) = state.jobs.get_mut(&job.id) else {
            return Ok(false);
        };
        if entry.job.status != JobStatus::ProviderCompleted || !entry.fenced(lease, now) {
            return Ok(false);
        }
        entry.job = ConversionJob {
            status: JobStatus::Completed,
            ..job.clone()
        };
        entry.completed_at = Some(posting.posted_at);
        entry.history.push((
            Some(JobStatus::ProviderCompleted),
            JobStatus::LedgerUpdating,
            "posting ledger entries".into(),
        ));
        entry.history.push((
            Some(JobStatus::LedgerUpdating),
            JobStatus::Completed,
            "ledger posted".into(),
        ));
        if state.postings.insert(job.id, posting.clone()).is_some() {
            return Err(StoreError::Corrupt(format!(
                "job {} already has a posting",
                job.id
            )));
        }
        if let Some(b) = state.buffers.get_mut(&job.source_account) {
            b.2 -= job.amount.value;
        }
        if let Some(b) = state.buffers.get_mut(&job.destination_account) {
            b.2 += destination.value;
        }
        if let Some(provider) = job.provider_id {
            if let Some(p) = state.providers.iter_mut().find(|p| p.id == provider) {
                p.daily_volume_used += job.amount.value;
            }
            let outcome = Outcome {
                provider,
                succeeded: true,
            };
            state.record_outcome(job.id, outcome, now);
        }
        state.outbox.push((message.clone(), false));
        Ok(true)
    }

    async fn job(&self, id: Uuid) -> Result<Option<ConversionJob>, StoreError> {
        Ok(self.state.lock().await.jobs.get(&id).map(|j| j.job.clone()))
    }

    async fn operator_change(
        &self,
        id: Uuid,
        action: &OperatorAction,
    ) -> Result<OperatorOutcome, StoreError> {
        let mut state = self.state.lock().await;
        let Some(entry) = state.jobs.get_mut(&id) else {
            return Ok(OperatorOutcome::NotFound);
        };
        let from = entry.job.status;
        let to = match operator::decide(from, entry.job.provider_name.as_deref(), action) {
            Ok(to) => to,
            Err(reason) => {
                return Ok(OperatorOutcome::Refused {
                    status: from,
                    reason,
                });
            }
        };
        entry.job = operator::applied(&entry.job, to, action);
        entry.history.push((Some(from), to, operator::note(action)));
        // Not a lease holder: whoever held the job is fenced off.
        entry.lease = None;
        entry.epoch += 1;
        Ok(OperatorOutcome::Done {
            job: Box::new(entry.job.clone()),
            from,
        })
    }
}

impl MemoryStore {
    /// Every job, oldest first (demo summary).
    pub async fn jobs(&self) -> Vec<ConversionJob> {
        let mut jobs: Vec<ConversionJob> = self
            .state
            .lock()
            .await
            .jobs
            .values()
            .map(|j| j.job.clone())
            .collect();
        jobs.sort_by_key(|j| j.created_at);
        jobs
    }

    /// Every posting (demo summary).
    pub async fn postings(&self) -> Vec<LedgerPosting> {
        self.state.lock().await.postings.values().cloned().collect()
    }
}
