//! The decision policies the simulator compares: the engine's own planner
//! (the very function the live settlement cycle calls) and three baselines —
//! per-event conversion, the original engine's rule, and a Miller–Orr band.
//!
//! A policy sees what the live engine would see at a settlement: the book
//! balances with what is in flight, the provider rows, the recent windows'
//! flows and the recent jobs' completion times. It answers with commands.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, Utc};
use rust_decimal::{Decimal, MathematicalOps, RoundingStrategy};

use crate::domain::{
    BufferAccount, ConversionCommand, ConversionDirection, ConversionTrigger, FlowEvent, Money,
};
use crate::planner::routing::Movement;
use crate::planner::{self, BufferPosition, FlowHistory, InFlight, PlanInput, PlannerSettings};
use crate::providers::ProviderRow;
use crate::window::WindowTally;

/// What a policy sees at one settlement.
#[derive(Debug, Clone)]
pub struct CycleView<'a> {
    pub cycle_id: String,
    pub now: DateTime<Utc>,
    /// Book balances with in-flight conversions, one per buffer.
    pub positions: Vec<BufferPosition>,
    /// The conversions in flight, with when each started.
    pub in_flight: Vec<InFlight>,
    pub providers: &'a [ProviderRow],
    /// The latest closed windows, oldest first.
    pub recent: &'a [WindowTally],
    /// How long recent jobs took from command to completion, oldest first.
    pub lead_times: &'a [Duration],
    /// The settlement window length.
    pub cycle: Duration,
    /// Set for a watch between window closes: what the open windows counted.
    pub watch: Option<planner::Watch>,
}

/// How many closed windows a policy is shown unless it asks otherwise (a
/// day of 5-minute windows).
pub const HISTORY_WINDOWS: usize = 288;

/// A way of deciding conversions.
pub trait Policy {
    /// The name in reports.
    fn name(&self) -> &'static str;
    /// Commands for one settlement.
    fn on_cycle(&mut self, view: &CycleView<'_>) -> Vec<ConversionCommand>;
    /// Commands for one event, for policies that act per event.
    fn on_event(&mut self, _event: &FlowEvent, _now: DateTime<Utc>) -> Vec<ConversionCommand> {
        Vec::new()
    }
    /// How often it wants to look between window closes (None: only at closes).
    fn watch_interval(&self) -> Option<Duration> {
        None
    }
    /// Commands between window closes; the view's balances include the open
    /// windows' flows.
    fn on_watch(&mut self, _view: &CycleView<'_>) -> Vec<ConversionCommand> {
        Vec::new()
    }
    /// Whether its conversions bypass provider limits (a hypothetical baseline).
    fn ignores_limits(&self) -> bool {
        false
    }
    /// How many of the latest closed windows each view holds.
    fn history_windows(&self) -> usize {
        HISTORY_WINDOWS
    }
}

/// The engine's planner, exactly as the live settlement cycle runs it.
#[derive(Debug, Clone, Default)]
pub struct EnginePolicy {
    pub settings: PlannerSettings,
}

impl Policy for EnginePolicy {
    fn name(&self) -> &'static str {
        "engine"
    }

    fn on_cycle(&mut self, view: &CycleView<'_>) -> Vec<ConversionCommand> {
        let input = PlanInput {
            cycle_id: view.cycle_id.clone(),
            now: view.now,
            positions: view.positions.clone(),
            in_flight: view.in_flight.clone(),
            providers: view.providers.to_vec(),
            window: view.cycle,
            history: FlowHistory::from_windows(view.recent, view.lead_times, view.cycle),
            settings: self.settings,
            watch: view.watch.clone(),
        };
        planner::plan(&input).commands
    }

    fn watch_interval(&self) -> Option<Duration> {
        (self.settings.watch_interval > Duration::zero()).then_some(self.settings.watch_interval)
    }

    fn on_watch(&mut self, view: &CycleView<'_>) -> Vec<ConversionCommand> {
        self.on_cycle(view)
    }

    /// The planner's look-back, as the live cycle reads it from the store.
    fn history_windows(&self) -> usize {
        self.settings.lookback_windows as usize
    }
}

/// The command for `movement`, the `sequence`-th of its direction in `cycle_id`.
fn command(
    cycle_id: &str,
    sequence: u32,
    now: DateTime<Utc>,
    movement: Movement,
) -> Option<ConversionCommand> {
    let currency = movement.direction.source_currency();
    let value = movement
        .amount
        .round_dp_with_strategy(currency.scale(), RoundingStrategy::AwayFromZero);
    Some(ConversionCommand {
        command_id: ConversionCommand::derive_id(cycle_id, movement.direction, sequence),
        direction: movement.direction,
        trigger: movement.trigger,
        amount: Money::positive(currency, value).ok()?,
        source_account: movement.source,
        destination_account: movement.destination,
        cycle_id: cycle_id.to_owned(),
        created_at: now,
    })
}

/// A movement from `source` to `destination`, if their currencies differ.
fn movement(
    source: BufferAccount,
    destination: BufferAccount,
    amount: Decimal,
    trigger: ConversionTrigger,
) -> Option<Movement> {
    Some(Movement {
        source,
        destination,
        amount,
        trigger,
        direction: ConversionDirection::between(source, destination)?,
    })
}

/// Every USDC event converted on its own, the moment it happens: the cost a
/// platform pays with no netting at all.
#[derive(Debug, Clone, Default)]
pub struct PerEventPolicy;

impl Policy for PerEventPolicy {
    fn name(&self) -> &'static str {
        "per-event"
    }

    fn on_cycle(&mut self, _view: &CycleView<'_>) -> Vec<ConversionCommand> {
        Vec::new()
    }

    fn on_event(&mut self, event: &FlowEvent, now: DateTime<Utc>) -> Vec<ConversionCommand> {
        let Some((direction, amount)) = event.demand() else {
            return Vec::new();
        };
        let (source, destination) = match direction {
            ConversionDirection::UsdcToUsd => (
                BufferAccount::SystemBufferUsdc,
                BufferAccount::BrokerOperational,
            ),
            ConversionDirection::UsdToUsdc => (
                BufferAccount::BrokerOperational,
                BufferAccount::SystemBufferUsdc,
            ),
            ConversionDirection::UsdTransfer => return Vec::new(),
        };
        let cycle_id = format!("event:{}", event.event_id);
        movement(
            source,
            destination,
            amount,
            ConversionTrigger::BufferReplenishment,
        )
        .and_then(|m| command(&cycle_id, 0, now, m))
        .into_iter()
        .collect()
    }

    fn ignores_limits(&self) -> bool {
        true
    }
}

impl PerEventPolicy {
    /// How many conversions it starts on `events`: one per event that
    /// moves USDC against USD, whatever the balances.
    pub fn commands_for(events: &[FlowEvent]) -> u64 {
        let mut policy = Self;
        events
            .iter()
            .map(|e| policy.on_event(e, e.occurred_at).len() as u64)
            .sum()
    }
}

/// The original engine's rule: every cycle, each buffer whose balance is
/// below its minimum is refilled to its target — the USDC buffer from
/// `system_buffer_fiat`, the USD buffers from the USDC buffer — with
/// conversions in flight not counted.
#[derive(Debug, Clone, Default)]
pub struct OriginalRulePolicy;

impl Policy for OriginalRulePolicy {
    fn name(&self) -> &'static str {
        "original-rule"
    }

    fn on_cycle(&mut self, view: &CycleView<'_>) -> Vec<ConversionCommand> {
        let mut commands = Vec::new();
        for p in &view.positions {
            if p.balance >= p.thresholds.min() {
                continue;
            }
            let source = match p.account {
                BufferAccount::SystemBufferUsdc => BufferAccount::SystemBufferFiat,
                _ => BufferAccount::SystemBufferUsdc,
            };
            let Some(m) = movement(
                source,
                p.account,
                p.thresholds.target() - p.balance,
                ConversionTrigger::Emergency,
            ) else {
                continue;
            };
            let sequence = commands.len() as u32;
            commands.extend(command(&view.cycle_id, sequence, view.now, m));
        }
        commands
    }
}

/// A Miller–Orr band per buffer: lower limit L (the minimum), return point
/// Z = L + (3·b·σ²/4·i)^(1/3), upper limit H = 3Z − 2L, with b the cost of
/// one conversion of a batch at the cheapest provider, σ² the variance of the
/// buffer's net flow per cycle over the recent windows, and i the opportunity
/// cost per cycle. Below L the buffer is refilled to Z; above H it gives
/// down to Z. Refills come from the other currency's buffer furthest above
/// its own return point.
#[derive(Debug, Clone)]
pub struct BandPolicy {
    /// Yearly opportunity cost of idle capital.
    pub opportunity_cost_rate: Decimal,
    /// Batch sizes per buffer (the size a conversion cost is quoted for).
    pub batch_sizes: BTreeMap<BufferAccount, Decimal>,
}

/// One buffer's band.
#[derive(Debug, Clone, Copy)]
struct Band {
    low: Decimal,
    ret: Decimal,
    high: Decimal,
}

impl BandPolicy {
    fn band(&self, view: &CycleView<'_>, p: &BufferPosition) -> Band {
        let nets: Vec<Decimal> = view.recent.iter().map(|t| t.net(p.account)).collect();
        let variance = planner::variance(&nets);
        let batch = self
            .batch_sizes
            .get(&p.account)
            .copied()
            .unwrap_or_default();
        let b = view
            .providers
            .iter()
            .filter(|r| r.converts())
            .map(|r| {
                r.fee_fixed + batch * (r.fee_percentage + r.spread_bps / Decimal::from(10_000))
            })
            .min()
            .unwrap_or(Decimal::ONE)
            .max(Decimal::new(1, 2));
        let cycles_per_year =
            Decimal::from(365 * 86_400) / Decimal::from(view.cycle.num_seconds().max(1));
        let i = (self.opportunity_cost_rate / cycles_per_year).max(Decimal::new(1, 12));
        let spread = (Decimal::from(3) * b * variance / (Decimal::from(4) * i))
            .checked_powd(Decimal::ONE / Decimal::from(3))
            .unwrap_or_default();
        let low = p.thresholds.min();
        let ret = low + spread;
        Band {
            low,
            ret,
            high: Decimal::from(3) * ret - Decimal::from(2) * low,
        }
    }
}

impl Policy for BandPolicy {
    fn name(&self) -> &'static str {
        "band"
    }

    fn on_cycle(&mut self, view: &CycleView<'_>) -> Vec<ConversionCommand> {
        let bands: BTreeMap<BufferAccount, Band> = view
            .positions
            .iter()
            .map(|p| (p.account, self.band(view, p)))
            .collect();
        let level: BTreeMap<BufferAccount, Decimal> = view
            .positions
            .iter()
            .map(|p| (p.account, p.projected()))
            .collect();
        let mut commands = Vec::new();
        for p in &view.positions {
            let band = bands[&p.account];
            let x = level[&p.account];
            let (amount, source, destination) = if x < band.low {
                let source = view
                    .positions
                    .iter()
                    .filter(|q| q.account.currency() != p.account.currency())
                    .max_by_key(|q| level[&q.account] - bands[&q.account].ret)
                    .map(|q| q.account);
                (band.ret - x, source, Some(p.account))
            } else if x > band.high {
                let destination = view
                    .positions
                    .iter()
                    .filter(|q| q.account.currency() != p.account.currency())
                    .min_by_key(|q| level[&q.account] - bands[&q.account].ret)
                    .map(|q| q.account);
                (x - band.ret, Some(p.account), destination)
            } else {
                continue;
            };
            let (Some(source), Some(destination)) = (source, destination) else {
                continue;
            };
            let Some(m) = movement(
                source,
                destination,
                amount,
                ConversionTrigger::BufferReplenishment,
            ) else {
                continue;
            };
            let sequence = commands.len() as u32;
            commands.extend(command(&view.cycle_id, sequence, view.now, m));
        }
        commands
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_engine_policy_is_shown_its_own_look_back_and_the_others_a_day() {
        let settings = PlannerSettings {
            lookback_windows: 96,
            ..PlannerSettings::default()
        };
        assert_eq!(EnginePolicy { settings }.history_windows(), 96);
        assert_eq!(
            EnginePolicy::default().history_windows(),
            PlannerSettings::default().lookback_windows as usize
        );
        assert_eq!(PerEventPolicy.history_windows(), HISTORY_WINDOWS);
    }
}
