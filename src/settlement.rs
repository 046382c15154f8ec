//! The settlement cycle: closes every window the watermark has passed (in
//! order, empty ones too, so an idle system still settles), applies each
//! window's net flows to the buffers, asks the planner what to convert, and
//! records the result and the commands, all in one exclusive transaction.
//! Operator triggers are handled in the same cycle.
//!
//! Between window closes the cycle also *watches*: at most once per
//! `TREASURY_PLANNER_WATCH_INTERVAL` it plans again with the flows already
//! counted in the open windows added to each balance (they have moved real
//! money, though the book settles them only at the close). A burst that
//! drains a buffer is then answered within the watch interval instead of at
//! the window's end plus grace. A watch records commands only when the
//! planner finds something to do; its cycle id is `watch:<time>`, and what
//! it planned is in flight for every later cycle, so nothing is planned
//! twice. `treasury simulate` runs the same watch on its clock.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::json;

use crate::clock::{SharedClock, SystemClock};
use crate::codec::Codec;
use crate::codec::records::encode_command;
use crate::domain::{BufferAccount, ConversionCommand};
use crate::planner::{FlowHistory, Plan, PlanInput, PlannerSettings, Watch, fill_windows, plan};
use crate::shutdown::Shutdown;
use crate::store::{LockMode, OutboxMessage, PlannedCommand, Store, StoreError, StoreTx};
use crate::window::{
    SettlementWake, WindowSpec, WindowTally, global_watermark, last_closable, settlement_wake,
};

/// Most windows closed in one cycle (the rest close in the next one).
const MAX_WINDOWS_PER_CYCLE: usize = 500;

/// Settings of the settlement cycle.
#[derive(Clone)]
pub struct SettlementSettings {
    pub spec: WindowSpec,
    pub idle_timeout: chrono::Duration,
    pub input_topics: Vec<String>,
    pub commands_topic: String,
    pub auto_rebalance: bool,
    /// Event ids are kept this long for duplicate detection (`TREASURY_DEDUP_RETENTION`).
    pub dedup_retention: chrono::Duration,
    /// The planner's rule.
    pub planner: PlannerSettings,
}

/// One closed window or handled trigger, as the cycle reports it.
#[derive(Debug, Clone, Serialize)]
pub struct CycleResult {
    pub cycle_id: String,
    pub tally_events: u64,
    pub late_events: u64,
    pub plan: Plan,
    pub emitted: bool,
}

/// Runs settlement cycles.
#[derive(Clone)]
pub struct Settlement {
    store: Arc<dyn Store>,
    codec: Codec,
    settings: SettlementSettings,
    /// Where buffer status crossings are announced (none: not announced).
    buffer_alerts_topic: Option<String>,
    /// Where the settlement loop reads "now".
    clock: SharedClock,
    /// When this process last watched between window closes.
    last_watch: Arc<std::sync::Mutex<Option<DateTime<Utc>>>>,
    /// Notified after a cycle that wrote to the outbox commits.
    outbox_waker: Option<Arc<Notify>>,
    /// Notified when the input moves on (an ingest batch committed).
    progress: Option<Arc<Notify>>,
}

/// Where a cycle left the windows.
#[derive(Debug, Clone, Copy, Default)]
struct Position {
    /// Windows starting here and later are open (None: no watermark yet).
    next_open: Option<DateTime<Utc>>,
    /// The global watermark the cycle saw.
    watermark: Option<DateTime<Utc>>,
}

impl Settlement {
    pub fn new(store: Arc<dyn Store>, codec: Codec, settings: SettlementSettings) -> Self {
        Self {
            store,
            codec,
            settings,
            buffer_alerts_topic: None,
            clock: SystemClock::shared(),
            last_watch: Arc::default(),
            outbox_waker: None,
            progress: None,
        }
    }

    /// Notifies `waker` (the outbox relay's) as soon as a cycle that closed
    /// a window or handled a trigger has committed, so that its commands
    /// are published at once.
    pub fn waking_relay(mut self, waker: Arc<Notify>) -> Self {
        self.outbox_waker = Some(waker);
        self
    }

    /// Listens to `progress` (notified by the ingest after each committed
    /// batch) while a window's end plus grace has passed on the clock and
    /// the watermark is about to reach it (see [`settlement_wake`]).
    pub fn woken_by_progress(mut self, progress: Arc<Notify>) -> Self {
        self.progress = Some(progress);
        self
    }

    /// Reads the time from `clock` instead of the system clock.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Announces buffer status crossings on `topic` ([`crate::alerts`]).
    pub fn with_buffer_alerts(mut self, topic: impl Into<String>) -> Self {
        self.buffer_alerts_topic = Some(topic.into());
        self
    }

    /// Closes what can close and handles pending triggers, as of `now`.
    pub async fn run_cycle(&self, now: DateTime<Utc>) -> Result<Vec<CycleResult>, StoreError> {
        Ok(self.cycle(now).await?.0)
    }

    async fn cycle(&self, now: DateTime<Utc>) -> Result<(Vec<CycleResult>, Position), StoreError> {
        let mut tx = self.store.begin(LockMode::Exclusive).await?;
        let mut results = Vec::new();
        let progress = tx.partition_progress(&self.settings.input_topics).await?;
        let watermark = global_watermark(&progress, now, self.settings.idle_timeout);
        let spec = self.settings.spec;
        let mut position = Position {
            next_open: None,
            watermark,
        };
        if let Some(watermark) = watermark {
            let open = tx.open_windows().await?;
            let next_open = match tx.next_window_start().await? {
                Some(next) => next,
                None => open
                    .first()
                    .copied()
                    .unwrap_or_else(|| spec.window_start(watermark)),
            };
            let last = last_closable(&spec, watermark);
            if last >= next_open {
                // Windows with events close one by one; a stretch of empty
                // windows is settled as one (the latest), so an idle system
                // still plans every window length without replaying history.
                let mut to_close: Vec<DateTime<Utc>> = open
                    .into_iter()
                    .filter(|s| *s >= next_open && *s <= last)
                    .take(MAX_WINDOWS_PER_CYCLE)
                    .collect();
                if to_close.len() < MAX_WINDOWS_PER_CYCLE && to_close.last() != Some(&last) {
                    to_close.push(last);
                }
                for start in &to_close {
                    results.push(self.close_window(tx.as_mut(), *start, watermark).await?);
                }
                let closed_up_to = to_close.last().copied().unwrap_or(last);
                let next = spec.window_end(closed_up_to);
                tx.set_next_window_start(next).await?;
                position.next_open = Some(next);
            } else {
                tx.set_next_window_start(next_open).await?;
                position.next_open = Some(next_open);
            }
        }
        for trigger in tx.pending_triggers().await? {
            let cycle_id = format!("trigger:{trigger}");
            let result = self
                .plan_and_record(tx.as_mut(), cycle_id, now, WindowTally::default(), None)
                .await?;
            tx.finish_trigger(
                trigger,
                &serde_json::to_value(&result.plan).unwrap_or_default(),
            )
            .await?;
            results.push(result);
        }
        let closed = results.iter().any(|r| r.cycle_id.starts_with("window:"));
        // A watch only acts: with auto-rebalance off or paused it has
        // nothing to add to what the window closes record.
        if !closed
            && self.settings.auto_rebalance
            && !tx.auto_rebalance_paused().await?
            && self.watch_due(now)
        {
            let mut open = Vec::new();
            for start in tx.open_windows().await? {
                open.push((start, tx.window_tally(start).await?));
            }
            let watch = Watch::at(
                now,
                open.iter().map(|(start, tally)| (*start, tally)),
                self.settings.spec.length,
                self.settings.spec.grace,
            );
            let cycle_id = format!(
                "watch:{}",
                now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            );
            let result = self
                .plan_and_record(
                    tx.as_mut(),
                    cycle_id,
                    now,
                    WindowTally::default(),
                    Some(watch),
                )
                .await?;
            if !result.plan.commands.is_empty() {
                results.push(result);
            }
        }
        tx.commit().await?;
        if !results.is_empty()
            && let Some(waker) = &self.outbox_waker
        {
            waker.notify_one();
        }
        if closed {
            metrics::gauge!("treasury_last_settlement_timestamp_seconds")
                .set(now.timestamp() as f64);
        }
        for result in &results {
            log_result(result);
        }
        Ok((results, position))
    }

    async fn close_window(
        &self,
        tx: &mut dyn StoreTx,
        start: DateTime<Utc>,
        watermark: DateTime<Utc>,
    ) -> Result<CycleResult, StoreError> {
        let end = self.settings.spec.window_end(start);
        let tally = tx.window_tally(start).await?;
        let before = balances(tx).await?;
        tx.apply_flows(&tally).await?;
        if let Some(topic) = &self.buffer_alerts_topic {
            let window = crate::alerts::AlertWindow {
                cycle_id: WindowSpec::cycle_id(start),
                start,
                end,
            };
            crate::alerts::announce(tx, &self.codec, topic, &window, &before).await?;
        }
        let result = self
            .plan_and_record(tx, WindowSpec::cycle_id(start), end, tally.clone(), None)
            .await?;
        let after = balances(tx).await?;
        let record = json!({
            "cycle_id": result.cycle_id,
            "events": tally.events,
            "late_events": tally.late_events,
            "flows": tally.flows.iter().map(|(a, f)| (a.as_str(), json!({"inflow": f.inflow, "outflow": f.outflow, "outflow_events": f.outflow_events, "net": f.net()}))).collect::<BTreeMap<_, _>>(),
            "demand": tally.demand.iter().map(|(d, (amount, count))| (d.as_str(), json!({"amount": amount, "events": count}))).collect::<BTreeMap<_, _>>(),
            "balances_before": result_balances(&before),
            "balances_after": result_balances(&after),
            "status_before": result.plan.status_before,
            "status_after": result.plan.status_after,
            "commands": result.plan.commands,
            "notes": result.plan.notes,
            "levels": result.plan.levels.iter().map(|(a, l)| (a.as_str(), l)).collect::<BTreeMap<_, _>>(),
            "emitted": result.emitted,
        });
        tx.close_window(start, end, watermark, &record).await?;
        Ok(result)
    }

    /// Whether a watch is due at `now` (and, if so, marks it done).
    fn watch_due(&self, now: DateTime<Utc>) -> bool {
        let interval = self.settings.planner.watch_interval;
        if interval <= chrono::Duration::zero() {
            return false;
        }
        let mut last = self
            .last_watch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match *last {
            Some(at) if now - at < interval => false,
            _ => {
                *last = Some(now);
                true
            }
        }
    }

    /// Plans one cycle and records it (`watch`: a watch between closes).
    async fn plan_and_record(
        &self,
        tx: &mut dyn StoreTx,
        cycle_id: String,
        at: DateTime<Utc>,
        tally: WindowTally,
        watch: Option<Watch>,
    ) -> Result<CycleResult, StoreError> {
        let settings = self.settings.planner;
        let lookback = self.settings.spec.length * settings.lookback_windows as i32;
        let current = self
            .settings
            .spec
            .window_start(at - self.settings.spec.length);
        let since = current - lookback + self.settings.spec.length;
        let mut records = tx.planning_records(since).await?;
        if tally.events > 0 || !tally.flows.is_empty() {
            records.windows.insert(current, tally.clone());
        }
        let recent = fill_windows(&records.windows, since, current, self.settings.spec.length);
        let input = PlanInput {
            cycle_id: cycle_id.clone(),
            now: at,
            positions: tx.buffer_positions().await?,
            in_flight: tx.in_flight().await?,
            providers: records.providers,
            window: self.settings.spec.length,
            history: FlowHistory::from_windows(
                &recent,
                &records.lead_times,
                self.settings.spec.length,
            ),
            settings,
            watch,
        };
        let planned = plan(&input);
        let emitted = self.settings.auto_rebalance && !tx.auto_rebalance_paused().await?;
        let records: Vec<PlannedCommand> = planned
            .commands
            .iter()
            .map(|command| PlannedCommand {
                command: command.clone(),
                emitted,
            })
            .collect();
        tx.record_commands(&records).await?;
        if emitted {
            let messages = planned
                .commands
                .iter()
                .map(|c| self.command_message(c))
                .collect::<Result<Vec<_>, _>>()?;
            tx.enqueue(&messages).await?;
        }
        Ok(CycleResult {
            cycle_id,
            tally_events: tally.events,
            late_events: tally.late_events,
            plan: planned,
            emitted,
        })
    }

    fn command_message(&self, command: &ConversionCommand) -> Result<OutboxMessage, StoreError> {
        let payload = encode_command(&self.codec, command)
            .map_err(|e| StoreError::Corrupt(format!("command does not encode: {e}")))?;
        Ok(OutboxMessage {
            id: command.command_id,
            topic: self.settings.commands_topic.clone(),
            key: Some(command.command_id.to_string()),
            payload,
            headers: vec![
                ("message-id".into(), command.command_id.to_string()),
                ("cycle-id".into(), command.cycle_id.clone()),
                ("direction".into(), command.direction.as_str().into()),
            ],
        })
    }

    /// Runs cycles until shutdown: each as soon as the next window can
    /// close (its end plus grace, and the watermark there), and at least
    /// every `tick` (triggers, the watch, windows the watermark let close).
    /// Event ids past the retention are forgotten at most once a tick.
    pub async fn run(self, mut shutdown: Shutdown, tick: Duration) {
        let mut last_purge: Option<tokio::time::Instant> = None;
        loop {
            let now = self.clock.now();
            let wake = match self.cycle(now).await {
                Ok((_, position)) => settlement_wake(
                    &self.settings.spec,
                    self.clock.now(),
                    position.next_open,
                    position.watermark,
                    tick,
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "settlement cycle failed; retrying next tick");
                    SettlementWake::After(tick)
                }
            };
            if last_purge.is_none_or(|at| at.elapsed() >= tick) {
                last_purge = Some(tokio::time::Instant::now());
                self.purge(now).await;
            }
            let (sleep, on_progress) = match wake {
                SettlementWake::After(d) => (d, None),
                SettlementWake::OnProgress(d) => (d, self.progress.as_deref()),
            };
            let progressed = async {
                match on_progress {
                    Some(progress) => progress.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = progressed => {}
                _ = shutdown.triggered() => break,
            }
        }
    }

    async fn purge(&self, now: DateTime<Utc>) {
        match self
            .store
            .purge_processed(now - self.settings.dedup_retention)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                purged = n,
                "event ids past the duplicate-detection retention forgotten"
            ),
            Err(e) => tracing::warn!(error = %e, "purging old event ids failed"),
        }
    }
}

async fn balances(tx: &mut dyn StoreTx) -> Result<BTreeMap<BufferAccount, Decimal>, StoreError> {
    Ok(tx
        .buffer_positions()
        .await?
        .into_iter()
        .map(|p| (p.account, p.balance))
        .collect())
}

fn result_balances(balances: &BTreeMap<BufferAccount, Decimal>) -> serde_json::Value {
    json!(
        balances
            .iter()
            .map(|(a, b)| (a.as_str(), b.to_string()))
            .collect::<BTreeMap<_, _>>()
    )
}

fn log_result(result: &CycleResult) {
    let commands: Vec<String> = result
        .plan
        .commands
        .iter()
        .map(|c| {
            format!(
                "{} {} {}→{} ({})",
                c.direction,
                c.amount,
                c.source_account,
                c.destination_account,
                c.trigger.as_str()
            )
        })
        .collect();
    tracing::info!(
        cycle = %result.cycle_id,
        events = result.tally_events,
        late = result.late_events,
        status_before = ?result.plan.status_before,
        status_after = ?result.plan.status_after,
        commands = ?commands,
        emitted = result.emitted,
        "settlement cycle"
    );
    for command in &result.plan.commands {
        metrics::counter!("treasury_commands_planned_total", "direction" => command.direction.as_str(), "trigger" => command.trigger.as_str()).increment(1);
    }
}
