//! The settlement planner: projects every buffer (balance plus in-flight
//! conversions) against its thresholds and decides which conversions to run.
//!
//! Rules, in order:
//! - A buffer projected below its minimum is refilled to its target
//!   (`emergency`). A buffer below target by at least its
//!   `conversion_batch_size` is topped up to target (`buffer_replenishment`);
//!   smaller gaps wait, so flows net over several windows into few conversions.
//! - Routing: `system_buffer_usdc` is refilled from `system_buffer_fiat`
//!   (`usd_to_usdc`); the USD buffers from `system_buffer_usdc` (`usdc_to_usd`).
//! - A source is never taken below its own minimum; a buffer that itself needs
//!   refilling has nothing to give, so opposite conversions never both run.
//! - Amounts respect the providers' smallest minimum and are split into pieces
//!   no larger than the largest maximum.
//! - Emergencies first, then larger deficits; ties by account. Each command's
//!   id derives from (cycle, direction, sequence): same inputs, same commands.
//!
//! Pure: the settlement cycle reads the inputs from the store and writes the
//! result back.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::Serialize;

use crate::domain::{
    BufferAccount, BufferStatus, ConversionCommand, ConversionDirection, ConversionTrigger, Money,
    Thresholds,
};

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

/// The range of single conversion amounts the active providers accept in a direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AmountLimits {
    pub min: Decimal,
    pub max: Decimal,
}

/// Everything one planning cycle looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanInput {
    pub cycle_id: String,
    pub now: DateTime<Utc>,
    pub positions: Vec<BufferPosition>,
    /// Per direction; a direction no active provider supports is absent.
    pub limits: BTreeMap<ConversionDirection, AmountLimits>,
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
}

struct Need {
    account: BufferAccount,
    trigger: ConversionTrigger,
    deficit: Decimal,
}

/// Plans the conversions for one cycle.
pub fn plan(input: &PlanInput) -> Plan {
    let mut projected: BTreeMap<BufferAccount, Decimal> = input
        .positions
        .iter()
        .map(|p| (p.account, p.projected()))
        .collect();
    let position = |account: BufferAccount| input.positions.iter().find(|p| p.account == account);
    let status_of = |projected: &BTreeMap<BufferAccount, Decimal>| {
        input
            .positions
            .iter()
            .map(|p| (p.account, p.thresholds.status(projected[&p.account])))
            .collect::<BTreeMap<_, _>>()
    };
    let status_before = status_of(&projected);

    let mut needs: Vec<Need> = input
        .positions
        .iter()
        .filter_map(|p| {
            let level = p.projected();
            let deficit = p.thresholds.target() - level;
            if level < p.thresholds.min() {
                Some(Need {
                    account: p.account,
                    trigger: ConversionTrigger::Emergency,
                    deficit,
                })
            } else if deficit > Decimal::ZERO && deficit >= p.batch_size {
                Some(Need {
                    account: p.account,
                    trigger: ConversionTrigger::BufferReplenishment,
                    deficit,
                })
            } else {
                None
            }
        })
        .collect();
    needs.sort_by(|a, b| {
        let urgency = |n: &Need| n.trigger != ConversionTrigger::Emergency;
        urgency(a)
            .cmp(&urgency(b))
            .then(b.deficit.cmp(&a.deficit))
            .then(a.account.cmp(&b.account))
    });

    let mut commands = Vec::new();
    let mut notes = Vec::new();
    let mut sequence: BTreeMap<ConversionDirection, u32> = BTreeMap::new();
    for need in needs {
        let direction = ConversionDirection::refilling(need.account);
        let source = ConversionDirection::source_for(need.account);
        let currency = direction.source_currency();
        let scale = currency.scale();
        let Some(limits) = input.limits.get(&direction) else {
            notes.push(PlanNote {
                account: need.account,
                note: format!("no active provider supports {direction}"),
            });
            continue;
        };
        let Some(source_position) = position(source) else {
            continue;
        };
        let available = (projected[&source] - source_position.thresholds.min())
            .round_dp_with_strategy(scale, RoundingStrategy::ToZero);
        let wanted = need
            .deficit
            .round_dp_with_strategy(scale, RoundingStrategy::AwayFromZero);
        let mut amount = wanted.min(available);
        if amount < limits.min {
            if available >= limits.min {
                amount = limits.min;
            } else {
                notes.push(PlanNote {
                    account: need.account,
                    note: format!(
                        "needs {wanted} {currency} but {source} can give {} without going below its minimum (provider minimum {})",
                        available.max(Decimal::ZERO),
                        limits.min
                    ),
                });
                continue;
            }
        }
        if amount < wanted {
            notes.push(PlanNote {
                account: need.account,
                note: format!(
                    "refilled {amount} of {wanted} {currency}: {source} is at its minimum"
                ),
            });
        }
        for piece in split(amount, limits, scale) {
            let seq = sequence.entry(direction).or_insert(0);
            commands.push(ConversionCommand {
                command_id: ConversionCommand::derive_id(&input.cycle_id, direction, *seq),
                direction,
                trigger: need.trigger,
                amount: Money {
                    currency,
                    value: piece,
                },
                source_account: source,
                destination_account: need.account,
                cycle_id: input.cycle_id.clone(),
                created_at: input.now,
            });
            *seq += 1;
        }
        *projected.get_mut(&source).expect("source has a position") -= amount;
        *projected
            .get_mut(&need.account)
            .expect("need comes from a position") += amount;
    }
    Plan {
        commands,
        notes,
        status_before,
        status_after: status_of(&projected),
    }
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
