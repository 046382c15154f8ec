//! The invariants a simulated run checks after every step, and the
//! violation that stops it.
//!
//! Money invariants (always on; checked in [`super::run`]): value is
//! conserved (buffers + in transit + costs = start + net external flows),
//! every posting balances per currency (the ledger refuses one that does
//! not), no command completes twice at providers, every event counts once.
//! Decision invariants (checked here on each plan): no opposite conversions
//! in one cycle, and no command takes its source below its minimum counting
//! only money that is there (never conversions still in flight toward it).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use crate::domain::{BufferAccount, ConversionCommand};
use crate::planner::BufferPosition;

/// A broken invariant: the step, the seed and the state, to reproduce it.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "invariant violated in policy {policy} at step {step} ({at}), seed {seed}: {what}\nstate: {state}"
)]
pub struct Violation {
    pub step: u64,
    pub at: DateTime<Utc>,
    pub policy: String,
    pub seed: u64,
    pub what: String,
    pub state: String,
}

/// What [`check_plan`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanChecks {
    /// Both conversion directions were planned in the same cycle (a
    /// transfer alongside either is not opposite to it).
    pub opposite_directions: bool,
    /// One line per command that takes its source below its minimum.
    pub below_minimum: Vec<String>,
}

/// Checks one cycle's commands against the positions they were planned on.
pub fn check_plan(positions: &[BufferPosition], commands: &[ConversionCommand]) -> PlanChecks {
    let directions: BTreeSet<_> = commands
        .iter()
        .map(|c| c.direction)
        .filter(|d| d.is_conversion())
        .collect();
    let mut spendable: BTreeMap<BufferAccount, Decimal> = positions
        .iter()
        .map(|p| (p.account, p.balance - p.outgoing))
        .collect();
    let mut below_minimum = Vec::new();
    for command in commands {
        let Some(position) = positions
            .iter()
            .find(|p| p.account == command.source_account)
        else {
            continue;
        };
        let left = spendable.entry(command.source_account).or_default();
        *left -= command.amount.value;
        if *left < position.thresholds.min() {
            below_minimum.push(format!(
                "command {} takes {} {} from {}, leaving {} (minimum {}) not counting {} still in flight toward it",
                command.command_id,
                command.amount,
                command.direction,
                command.source_account,
                left,
                position.thresholds.min(),
                position.incoming
            ));
        }
    }
    PlanChecks {
        opposite_directions: directions.len() > 1,
        below_minimum,
    }
}
