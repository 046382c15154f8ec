//! What a batch of events adds to each window: buffer flows and gross
//! conversion demand, summed exactly.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

use super::Assignment;
use crate::domain::{BufferAccount, ConversionDirection, FlowEvent};

/// Money into and out of one buffer (both non-negative), with the number
/// of events that took money out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    pub inflow: Decimal,
    pub outflow: Decimal,
    /// Events that took money out of the buffer: a burst of withdrawals
    /// shows in their number before the sum can tell it from one large one.
    pub outflow_events: u64,
}

impl Flow {
    /// Inflow minus outflow.
    pub fn net(&self) -> Decimal {
        self.inflow - self.outflow
    }

    fn add(&mut self, delta: Decimal) {
        if delta >= Decimal::ZERO {
            self.inflow += delta;
        } else {
            self.outflow -= delta;
            self.outflow_events += 1;
        }
    }
}

/// One window's sums.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowTally {
    pub events: u64,
    pub late_events: u64,
    pub flows: BTreeMap<BufferAccount, Flow>,
    /// Gross demand per direction, with the number of events behind it.
    pub demand: BTreeMap<ConversionDirection, (Decimal, u64)>,
}

impl WindowTally {
    /// Counts one event.
    pub fn add(&mut self, event: &FlowEvent, late: bool) {
        self.events += 1;
        if late {
            self.late_events += 1;
        }
        for delta in event.buffer_deltas() {
            self.flows
                .entry(delta.account)
                .or_default()
                .add(delta.delta);
        }
        if let Some((direction, amount)) = event.demand() {
            let entry = self.demand.entry(direction).or_default();
            entry.0 += amount;
            entry.1 += 1;
        }
    }

    /// Adds another tally of the same window.
    pub fn merge(&mut self, other: &WindowTally) {
        self.events += other.events;
        self.late_events += other.late_events;
        for (account, flow) in &other.flows {
            let mine = self.flows.entry(*account).or_default();
            mine.inflow += flow.inflow;
            mine.outflow += flow.outflow;
            mine.outflow_events += flow.outflow_events;
        }
        for (direction, (amount, count)) in &other.demand {
            let mine = self.demand.entry(*direction).or_default();
            mine.0 += *amount;
            mine.1 += *count;
        }
    }

    /// Net flow into `account` (zero if none).
    pub fn net(&self, account: BufferAccount) -> Decimal {
        self.flows.get(&account).map(Flow::net).unwrap_or_default()
    }
}

/// Tallies of several windows, keyed by window start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WindowTallies(pub BTreeMap<DateTime<Utc>, WindowTally>);

impl WindowTallies {
    /// Counts `event` in the window `assignment` names.
    pub fn add(&mut self, event: &FlowEvent, assignment: Assignment) {
        self.0
            .entry(assignment.window_start)
            .or_default()
            .add(event, assignment.late);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds all of `other` into these tallies.
    pub fn merge(&mut self, other: &WindowTallies) {
        for (start, tally) in &other.0 {
            self.0.entry(*start).or_default().merge(tally);
        }
    }
}
