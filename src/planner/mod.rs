//! The settlement planner: from every buffer's position (balance plus
//! in-flight conversions), its thresholds and the recent flows, the
//! conversions of one cycle.
//!
//! - [`levels`]: each buffer's trigger level and return point, from the
//!   observed flow volatility and the providers' observed lead time, within
//!   the configured min/target/max.
//! - [`routing`]: who pays whom — any buffer holding more than it needs
//!   gives (USD from either USD buffer, USDC to either), a buffer that needs
//!   gives nothing, money in flight toward a buffer is not spendable, a
//!   buffer above its max sweeps its excess, one direction per cycle.
//! - [`Watch`]: between window closes, the open windows' flows; a watch plans
//!   only when some buffer is draining too fast to wait for the close.
//! - Here: amounts fitted to the active providers (smallest minimum, daily
//!   capacity left), cut into pieces by [`pieces_for`] (sized to the provider
//!   whose limits make the move cheapest, so a maximum that binds at the
//!   cheaper provider splits the amount there instead of sending all of it to
//!   a dearer one; a refill into an urgent buffer, or into one living on
//!   money in flight, is cut further by [`urgent_pieces`]), and commands
//!   with ids derived from (cycle, direction, sequence): the same inputs
//!   always give the same commands, so a replay plans nothing new.
//!
//! Money in flight toward a buffer counts in its projected balance while
//! the conversion is within the lead time; an overdue one
//! ([`without_overdue`]) is awaited but not relied on.
//!
//! Pure: the live settlement cycle and `treasury simulate` build a
//! [`PlanInput`] and call [`plan`]; nothing here reads a clock or a store.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;

mod history;
pub mod levels;
pub mod routing;
mod watch;

pub use history::{DayAhead, FlowHistory, FlowStats, fill_windows, quantile, variance};
pub use levels::{BufferLevels, levels as buffer_levels, refill_hops};
pub use watch::Watch;

use crate::domain::{
    BufferAccount, BufferStatus, ConversionCommand, ConversionDirection, ConversionTrigger, Money,
    Thresholds,
};
use crate::providers::{ProviderRow, ProviderStatus};

/// What the planner knows about one buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BufferPosition {
    pub account: BufferAccount,
    pub thresholds: Thresholds,
    /// Non-urgent top-ups smaller than this wait for more demand.
    pub batch_size: Decimal,
    pub balance: Decimal,
    /// Conversions planned or running that will credit this buffer.
    pub incoming: Decimal,
    /// Conversions planned or running that will debit this buffer.
    pub outgoing: Decimal,
}

impl BufferPosition {
    /// Balance plus what is in flight.
    pub fn projected(&self) -> Decimal {
        self.balance + self.incoming - self.outgoing
    }
}

/// A conversion planned or running toward a buffer, and when it was
/// planned (the command's time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InFlight {
    pub destination: BufferAccount,
    /// In the source currency, as `BufferPosition::incoming` counts it.
    pub amount: Decimal,
    pub since: DateTime<Utc>,
}

/// `positions` with the money in flight toward each buffer for longer than
/// `lead` taken out of `incoming`: a conversion slower than the lead time
/// the planner plans with is still awaited (and still not spendable by
/// anyone), but no longer relied on, so a buffer waiting on it is refilled
/// as if it might not come. One slow conversion then costs a buffer a
/// refill (and perhaps a sweep when it lands), not its money.
pub fn without_overdue(
    positions: &[BufferPosition],
    in_flight: &[InFlight],
    now: DateTime<Utc>,
    lead: chrono::Duration,
) -> Vec<BufferPosition> {
    positions
        .iter()
        .map(|p| {
            let overdue: Decimal = in_flight
                .iter()
                .filter(|f| f.destination == p.account && now - f.since > lead)
                .map(|f| f.amount)
                .sum();
            BufferPosition {
                incoming: (p.incoming - overdue).max(Decimal::ZERO),
                ..*p
            }
        })
        .collect()
}

/// The range of single conversion amounts the active providers accept in a direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AmountLimits {
    pub min: Decimal,
    pub max: Decimal,
}

/// Every (direction, provider) pair an active provider offers.
fn active_offers(
    providers: &[ProviderRow],
) -> impl Iterator<Item = (ConversionDirection, &ProviderRow)> {
    providers
        .iter()
        .filter(|r| r.status == ProviderStatus::Active)
        .flat_map(|row| {
            ConversionDirection::ALL
                .into_iter()
                .filter(|d| row.supports(*d))
                .map(move |d| (d, row))
        })
}

/// The amount range per direction over the active providers that support it
/// (the smallest minimum, the largest maximum); a direction none supports is absent.
pub fn amount_limits(
    providers: &[crate::providers::ProviderRow],
) -> BTreeMap<ConversionDirection, AmountLimits> {
    let mut limits: BTreeMap<ConversionDirection, AmountLimits> = BTreeMap::new();
    for (direction, row) in active_offers(providers) {
        limits
            .entry(direction)
            .and_modify(|l| {
                l.min = l.min.min(row.min_amount);
                l.max = l.max.max(row.max_amount);
            })
            .or_insert(AmountLimits {
                min: row.min_amount,
                max: row.max_amount,
            });
    }
    limits
}

/// The planner's tunable rule (see the module doc), with defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlannerSettings {
    /// Standard deviations of flow over the lead time kept as safety stock
    /// above the minimum (`TREASURY_PLANNER_SAFETY_FACTOR`).
    pub safety_factor: Decimal,
    /// Closed windows the flow statistics look back over
    /// (`TREASURY_PLANNER_LOOKBACK_WINDOWS`).
    pub lookback_windows: u32,
    /// Lead time assumed until jobs have completed
    /// (`TREASURY_PLANNER_DEFAULT_LEAD_TIME`).
    #[serde(with = "humantime_chrono")]
    pub default_lead_time: chrono::Duration,
    /// How often, between window closes, the planner looks again with the
    /// open windows' flows counted, so a burst is answered before its window
    /// closes (`TREASURY_PLANNER_WATCH_INTERVAL`; zero turns the watch off).
    #[serde(with = "humantime_chrono")]
    pub watch_interval: chrono::Duration,
    /// A refill into an urgent buffer (expected below its minimum before
    /// money lands), or into one whose holdings (money in flight toward it
    /// not counted) are less than its drain above its minimum, is cut into
    /// pieces of at most this fraction (1/k) of its band above the minimum,
    /// so one slow conversion cannot leave it empty
    /// (`TREASURY_PLANNER_URGENT_PIECES`; 1 keeps refills whole).
    pub urgent_pieces: u32,
    /// Standard deviations beyond its recent flows a buffer's drain in the
    /// open windows must go (over at least three minutes) to count as a
    /// burst, which makes a buffer expected below its minimum before a
    /// refill lands need money at once (`TREASURY_PLANNER_BURST_FACTOR`).
    pub burst_factor: Decimal,
    /// A bursting buffer whose holdings (money in flight not counted) would
    /// not outlast the lead time at the observed drain is topped up to its
    /// return point at every watch, rather than a batch at a time
    /// (`TREASURY_PLANNER_BURST_TOP_UP`, off by default). On its own it
    /// leaves more minutes below zero; together with `urgent_pieces` at 6
    /// it leaves fewer, at the cost of more conversions (see the README's
    /// simulate section).
    pub burst_top_up: bool,
    /// How far ahead the same hours of the day before size refills and
    /// sweeps ([`BufferLevels::with_day_ahead`]; `TREASURY_PLANNER_FORECAST_HORIZON`,
    /// off by default).
    #[serde(with = "humantime_chrono")]
    pub forecast_horizon: chrono::Duration,
    /// With no `usd_transfer` provider, how many times system_buffer_fiat's
    /// expected loss over one conversion's lead time the USDC buffer keeps
    /// above its own trigger for it ([`BufferLevels::with_relay_reserve`];
    /// `TREASURY_PLANNER_RELAY_RESERVE`, 0 = off by default).
    pub relay_reserve: Decimal,
}

impl Default for PlannerSettings {
    fn default() -> Self {
        Self {
            safety_factor: Decimal::from(2),
            lookback_windows: 288,
            default_lead_time: chrono::Duration::minutes(30),
            watch_interval: chrono::Duration::minutes(1),
            urgent_pieces: 3,
            burst_factor: Decimal::from(5),
            burst_top_up: false,
            forecast_horizon: chrono::Duration::zero(),
            relay_reserve: Decimal::ZERO,
        }
    }
}

mod humantime_chrono {
    use serde::Serializer;

    pub fn serialize<S: Serializer>(d: &chrono::Duration, s: S) -> Result<S::Ok, S::Error> {
        let std = d.to_std().unwrap_or_default();
        s.serialize_str(&humantime::format_duration(std).to_string())
    }
}

/// Everything one planning cycle looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanInput {
    pub cycle_id: String,
    pub now: DateTime<Utc>,
    pub positions: Vec<BufferPosition>,
    /// The conversions counted in the positions' `incoming`, with their
    /// times ([`without_overdue`]).
    pub in_flight: Vec<InFlight>,
    /// Every provider row (the planner uses the active ones' limits and costs).
    pub providers: Vec<ProviderRow>,
    /// The settlement window length (flows are per window).
    pub window: chrono::Duration,
    /// Recent flows and lead times.
    pub history: FlowHistory,
    pub settings: PlannerSettings,
    /// Set for a watch between window closes (None: a close or a trigger).
    pub watch: Option<Watch>,
}

/// A buffer the planner looked at and did not (fully) refill, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanNote {
    pub account: BufferAccount,
    pub note: String,
}

/// The planner's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub commands: Vec<ConversionCommand>,
    pub notes: Vec<PlanNote>,
    /// Projected status of each buffer before and after the planned conversions.
    pub status_before: BTreeMap<BufferAccount, BufferStatus>,
    pub status_after: BTreeMap<BufferAccount, BufferStatus>,
    /// Each buffer's trigger level and return point this cycle.
    pub levels: BTreeMap<BufferAccount, BufferLevels>,
}

/// Plans the conversions for one cycle.
pub fn plan(input: &PlanInput) -> Plan {
    let lead = input
        .history
        .lead_time_p95
        .unwrap_or(input.settings.default_lead_time);
    let relied = without_overdue(&input.positions, &input.in_flight, input.now, lead);
    let watched;
    let positions: &[BufferPosition] = match &input.watch {
        None => &relied,
        Some(watch) => {
            watched = watch.positions(&relied);
            &watched
        }
    };
    let limits = amount_limits(&input.providers);
    let transfers = limits.contains_key(&ConversionDirection::UsdTransfer);
    let lead_of = |account: BufferAccount| lead * refill_hops(account, transfers);
    let mut levels: BTreeMap<BufferAccount, BufferLevels> = positions
        .iter()
        .map(|p| {
            let stats = input.history.stats(p.account);
            let ahead = input
                .history
                .day_ahead(p.account, input.settings.forecast_horizon);
            (
                p.account,
                buffer_levels(p, stats, lead_of(p.account), input.window, &input.settings)
                    .with_day_ahead(ahead, &p.thresholds, p.batch_size),
            )
        })
        .collect();
    if !transfers && input.settings.relay_reserve > Decimal::ZERO {
        let fiat = BufferAccount::SystemBufferFiat;
        let one_hop = levels
            .get(&fiat)
            .map(|l| l.drain / Decimal::from(refill_hops(fiat, transfers)))
            .unwrap_or_default();
        let usdc = BufferAccount::SystemBufferUsdc;
        if let (Some(l), Some(p)) = (
            levels.get_mut(&usdc),
            positions.iter().find(|p| p.account == usdc),
        ) {
            *l = l.with_relay_reserve(
                one_hop * input.settings.relay_reserve,
                p.thresholds.target(),
            );
        }
    }
    if let Some(watch) = &input.watch
        && !watch.must_act(positions, lead_of)
    {
        let status: BTreeMap<BufferAccount, BufferStatus> = positions
            .iter()
            .map(|p| (p.account, p.thresholds.status(p.projected())))
            .collect();
        return Plan {
            commands: Vec::new(),
            notes: Vec::new(),
            status_before: status.clone(),
            status_after: status,
            levels,
        };
    }
    // Buffers whose refill is cut into pieces: urgent ones, and those
    // living on money in flight (what they hold is less than their drain
    // above their minimum), so one slow conversion cannot leave them empty.
    let mut in_pieces: Vec<BufferAccount> = Vec::new();
    if let Some(watch) = &input.watch {
        for p in positions {
            let lead = lead_of(p.account);
            if watch.expected_before_refill(p, lead) >= p.thresholds.min() {
                continue;
            }
            in_pieces.push(p.account);
            let bursting = watch.bursting(
                p.account,
                input.history.stats(p.account),
                input.window,
                input.settings.burst_factor,
            );
            if let Some(l) = levels.get_mut(&p.account) {
                *l = l.with_observed_drain(watch.drain_over(p.account, lead), &p.thresholds);
                if bursting {
                    *l = l.in_burst(p.thresholds.min(), p.batch_size);
                    if input.settings.burst_top_up && !watch.outlasts(p, lead) {
                        *l = l.topped_up_every_watch();
                    }
                }
            }
        }
    }
    for p in positions {
        if let Some(l) = levels.get(&p.account)
            && (l.urgent_need(p.projected(), p.thresholds.min())
                || l.urgent(p.balance - p.outgoing, p.thresholds.min()))
            && !in_pieces.contains(&p.account)
        {
            in_pieces.push(p.account);
        }
    }
    let (movements, mut notes) = routing::route(positions, &levels, transfers);
    let capacity = daily_capacity(&input.providers);
    let mut commands = Vec::new();
    let mut sequence: BTreeMap<ConversionDirection, u32> = BTreeMap::new();
    let mut used: BTreeMap<ConversionDirection, Decimal> = BTreeMap::new();
    let mut moved: BTreeMap<BufferAccount, Decimal> = BTreeMap::new();
    for m in merge(&movements) {
        let currency = m.direction.source_currency();
        let Some(limit) = limits.get(&m.direction) else {
            notes.push(PlanNote {
                account: m.destination,
                note: format!("no active provider supports {}", m.direction),
            });
            continue;
        };
        let left = capacity
            .get(&m.direction)
            .copied()
            .flatten()
            .map(|c| c - used.get(&m.direction).copied().unwrap_or_default());
        let mut amount = m.amount;
        if let Some(left) = left
            && amount > left
        {
            notes.push(PlanNote {
                account: m.destination,
                note: format!(
                    "{} {amount} {currency} capped at the {left} the providers can still convert today",
                    m.direction
                ),
            });
            amount = left.max(Decimal::ZERO);
        }
        if amount < limit.min {
            notes.push(PlanNote {
                account: m.destination,
                note: format!(
                    "{} of {amount} {currency} from {} waits: below the providers' minimum {}",
                    m.direction, m.source, limit.min
                ),
            });
            continue;
        }
        *used.entry(m.direction).or_default() += amount;
        *moved.entry(m.source).or_default() -= amount;
        *moved.entry(m.destination).or_default() += amount;
        let mut pieces = pieces_for(
            amount,
            m.direction,
            &input.providers,
            limit,
            currency.scale(),
        );
        if in_pieces.contains(&m.destination)
            && let (Some(l), Some(d)) = (
                levels.get(&m.destination),
                positions.iter().find(|p| p.account == m.destination),
            )
        {
            let band = (l.return_point - d.thresholds.min()).max(Decimal::ZERO);
            pieces = urgent_pieces(
                &pieces,
                band,
                input.settings.urgent_pieces,
                limit,
                currency.scale(),
            );
        }
        for piece in pieces {
            let seq = sequence.entry(m.direction).or_insert(0);
            let Ok(money) = Money::positive(currency, piece) else {
                continue;
            };
            commands.push(ConversionCommand {
                command_id: ConversionCommand::derive_id(&input.cycle_id, m.direction, *seq),
                direction: m.direction,
                trigger: m.trigger,
                amount: money,
                source_account: m.source,
                destination_account: m.destination,
                cycle_id: input.cycle_id.clone(),
                created_at: input.now,
            });
            *seq += 1;
        }
    }
    let status = |delta: &BTreeMap<BufferAccount, Decimal>| {
        positions
            .iter()
            .map(|p| {
                let level = p.projected() + delta.get(&p.account).copied().unwrap_or_default();
                (p.account, p.thresholds.status(level))
            })
            .collect::<BTreeMap<_, _>>()
    };
    Plan {
        commands,
        notes,
        status_before: status(&BTreeMap::new()),
        status_after: status(&moved),
        levels,
    }
}

/// Movements with the same source, destination and direction as one, with
/// the most urgent trigger among them, in the order they were first planned.
fn merge(movements: &[routing::Movement]) -> Vec<routing::Movement> {
    let mut merged: Vec<routing::Movement> = Vec::new();
    for m in movements {
        match merged
            .iter_mut()
            .find(|x| x.source == m.source && x.destination == m.destination)
        {
            Some(x) => {
                x.amount += m.amount;
                if m.trigger == ConversionTrigger::Emergency {
                    x.trigger = m.trigger;
                }
            }
            None => merged.push(*m),
        }
    }
    merged
}

/// What the active providers can still convert today per direction (None:
/// some provider has no daily cap).
pub fn daily_capacity(providers: &[ProviderRow]) -> BTreeMap<ConversionDirection, Option<Decimal>> {
    let mut capacity: BTreeMap<ConversionDirection, Option<Decimal>> = BTreeMap::new();
    for (direction, row) in active_offers(providers) {
        let left = row
            .daily_volume_limit
            .map(|l| (l - row.daily_volume_used).max(Decimal::ZERO));
        let entry = capacity.entry(direction).or_insert(Some(Decimal::ZERO));
        *entry = match (*entry, left) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
    }
    capacity
}

/// A provider whose maximum would cut one move into more pieces than this is
/// not priced for it (its limits do not fit the move).
const MAX_PIECES_AT_ONE_PROVIDER: u32 = 100;

/// The pieces `amount` is converted in. Each active provider offering
/// `direction` that could take all of it today (daily room left) is priced
/// for the whole move cut to its limits ([`split`] at its maximum, every piece
/// at least its minimum), at [`expected_cost`](crate::providers::selection::expected_cost)
/// per piece; the cheapest such cut wins (ties: fewer pieces, then
/// priority, then name). With no provider able to take it all, the amount is
/// cut at the largest maximum (`limits`), as equal as the scale allows.
/// The pieces always add up to `amount`.
pub fn pieces_for(
    amount: Decimal,
    direction: ConversionDirection,
    providers: &[ProviderRow],
    limits: &AmountLimits,
    scale: u32,
) -> Vec<Decimal> {
    use crate::providers::selection::expected_cost;
    let mut best: Option<(Decimal, usize, i32, &str, Vec<Decimal>)> = None;
    for (_, row) in active_offers(providers).filter(|(d, _)| *d == direction) {
        let room = row.daily_volume_limit.map(|l| l - row.daily_volume_used);
        let too_many = (amount / row.max_amount.max(Decimal::new(1, scale)))
            > Decimal::from(MAX_PIECES_AT_ONE_PROVIDER);
        if row.max_amount <= Decimal::ZERO || too_many || room.is_some_and(|r| r < amount) {
            continue;
        }
        let own = AmountLimits {
            min: row.min_amount,
            max: row.max_amount,
        };
        let cut = split(amount, &own, scale);
        if cut
            .iter()
            .any(|p| *p < row.min_amount || *p > row.max_amount)
        {
            continue;
        }
        let cost = cut
            .iter()
            .try_fold(Decimal::ZERO, |sum, p| {
                sum.checked_add(expected_cost(row, *p))
            })
            .unwrap_or(Decimal::MAX);
        let key = (cost, cut.len(), row.priority, row.name.as_str());
        if best.as_ref().is_none_or(|b| key < (b.0, b.1, b.2, b.3)) {
            best = Some((key.0, key.1, key.2, key.3, cut));
        }
    }
    match best {
        Some((.., cut)) => cut,
        None => split(amount, limits, scale),
    }
}

/// `pieces` cut further so that none is larger than `band / k` (nor smaller
/// than the providers' minimum, nor into more than 100): a refill into an
/// urgent buffer arrives in several conversions with their own latencies,
/// so one slow piece leaves the buffer short by a fraction of its band, not
/// all of it. The pieces still add up to the same amount.
pub fn urgent_pieces(
    pieces: &[Decimal],
    band: Decimal,
    k: u32,
    limits: &AmountLimits,
    scale: u32,
) -> Vec<Decimal> {
    if k <= 1 || band <= Decimal::ZERO {
        return pieces.to_vec();
    }
    let cap = (band / Decimal::from(k))
        .round_dp_with_strategy(scale, RoundingStrategy::ToZero)
        .max(limits.min);
    if cap <= Decimal::ZERO {
        return pieces.to_vec();
    }
    pieces
        .iter()
        .flat_map(|piece| {
            let wanted = (*piece / cap).ceil();
            let most = if limits.min > Decimal::ZERO {
                (*piece / limits.min).floor()
            } else {
                wanted
            };
            let n = wanted
                .min(most)
                .min(Decimal::from(MAX_PIECES_AT_ONE_PROVIDER))
                .max(Decimal::ONE);
            if n <= Decimal::ONE {
                return vec![*piece];
            }
            let each = (*piece / n).round_dp_with_strategy(scale, RoundingStrategy::ToZero);
            let count = u32::try_from(n).unwrap_or(1);
            let mut out = vec![each; count as usize - 1];
            out.push(*piece - each * Decimal::from(count - 1));
            out
        })
        .collect()
}

/// Splits `amount` into the fewest pieces no larger than `limits.max`, as equal
/// as the currency's scale allows (the last may be a little smaller); the
/// pieces add up to `amount` exactly.
pub fn split(amount: Decimal, limits: &AmountLimits, scale: u32) -> Vec<Decimal> {
    if amount <= limits.max {
        return vec![amount];
    }
    let pieces = (amount / limits.max).ceil();
    let count: u32 = pieces.try_into().unwrap_or(u32::MAX);
    let each = (amount / pieces).round_dp_with_strategy(scale, RoundingStrategy::AwayFromZero);
    let mut out = vec![each; count as usize - 1];
    out.push(amount - each * Decimal::from(count - 1));
    out
}
