//! Input events (deposits and withdrawals) and the one table that says what
//! each kind of event does to the buffers and to conversion demand.

use chrono::{DateTime, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::amount::Money;
use super::buffer::BufferAccount;
use super::conversion::ConversionDirection;
use super::currency::Currency;

/// Whether money came in or went out of the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowKind {
    Deposit,
    Withdrawal,
}

impl FlowKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            FlowKind::Deposit => "deposit",
            FlowKind::Withdrawal => "withdrawal",
        }
    }
}

/// A validated deposit or withdrawal, as the aggregator counts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEvent {
    /// The producer's unique id; duplicates with the same id count once.
    pub event_id: Uuid,
    pub kind: FlowKind,
    pub user_id: Uuid,
    pub amount: Money,
    /// When the money moved (event time, which windows are cut on).
    pub occurred_at: DateTime<Utc>,
}

/// One buffer's change caused by an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferDelta {
    pub account: BufferAccount,
    /// Signed change in the buffer's own currency, at that currency's scale.
    pub delta: Decimal,
}

/// What one row of the flow table says an event does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEffect {
    /// The buffer the money lands in (+) or leaves (−) ...
    pub primary: BufferAccount,
    /// ... and the buffer that carries the other side at par.
    pub counterpart: BufferAccount,
    /// Conversion demand the event creates, if any.
    pub demand: Option<ConversionDirection>,
}

/// The flow table: (kind, currency) → effect. A new event kind is one row.
///
/// - A USDC deposit lands in `system_buffer_usdc` and is credited to the user's
///   brokerage from `broker_operational`: USDC→USD demand.
/// - A USDC withdrawal leaves `system_buffer_usdc` and returns cash to
///   `broker_operational`: USD→USDC demand.
/// - USD deposits and withdrawals move `system_buffer_fiat` against
///   `broker_operational` with no conversion demand.
pub const FLOW_TABLE: [(FlowKind, Currency, FlowEffect); 4] = [
    (
        FlowKind::Deposit,
        Currency::Usdc,
        FlowEffect {
            primary: BufferAccount::SystemBufferUsdc,
            counterpart: BufferAccount::BrokerOperational,
            demand: Some(ConversionDirection::UsdcToUsd),
        },
    ),
    (
        FlowKind::Withdrawal,
        Currency::Usdc,
        FlowEffect {
            primary: BufferAccount::SystemBufferUsdc,
            counterpart: BufferAccount::BrokerOperational,
            demand: Some(ConversionDirection::UsdToUsdc),
        },
    ),
    (
        FlowKind::Deposit,
        Currency::Usd,
        FlowEffect {
            primary: BufferAccount::SystemBufferFiat,
            counterpart: BufferAccount::BrokerOperational,
            demand: None,
        },
    ),
    (
        FlowKind::Withdrawal,
        Currency::Usd,
        FlowEffect {
            primary: BufferAccount::SystemBufferFiat,
            counterpart: BufferAccount::BrokerOperational,
            demand: None,
        },
    ),
];

/// The effect of an event of `kind` in `currency`, from [`FLOW_TABLE`].
pub fn flow_effect(kind: FlowKind, currency: Currency) -> Option<FlowEffect> {
    FLOW_TABLE
        .iter()
        .find(|(k, c, _)| *k == kind && *c == currency)
        .map(|(_, _, effect)| *effect)
}

impl FlowEvent {
    /// The buffer deltas this event causes: the primary buffer gains a deposit
    /// (loses a withdrawal), the counterpart moves the other way at par.
    ///
    /// Each delta is in its buffer's own currency and scale: a USDC amount
    /// carried at par into a USD buffer is rounded to the cent, half to even
    /// (so a deposit and a withdrawal of the same amount cancel exactly). The
    /// two legs of one event then differ by at most half a cent.
    pub fn buffer_deltas(&self) -> [BufferDelta; 2] {
        let effect = flow_effect(self.kind, self.amount.currency)
            .expect("FLOW_TABLE covers every (kind, currency) pair");
        let signed = match self.kind {
            FlowKind::Deposit => self.amount.value,
            FlowKind::Withdrawal => -self.amount.value,
        };
        let at_par = (-signed).round_dp_with_strategy(
            effect.counterpart.currency().scale(),
            RoundingStrategy::MidpointNearestEven,
        );
        [
            BufferDelta {
                account: effect.primary,
                delta: signed,
            },
            BufferDelta {
                account: effect.counterpart,
                delta: at_par,
            },
        ]
    }

    /// The conversion demand this event creates, with its amount.
    pub fn demand(&self) -> Option<(ConversionDirection, Decimal)> {
        flow_effect(self.kind, self.amount.currency)
            .and_then(|e| e.demand)
            .map(|d| (d, self.amount.value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_table_covers_every_kind_and_currency_once() {
        for kind in [FlowKind::Deposit, FlowKind::Withdrawal] {
            for currency in [Currency::Usd, Currency::Usdc] {
                let rows = FLOW_TABLE
                    .iter()
                    .filter(|(k, c, _)| *k == kind && *c == currency)
                    .count();
                assert_eq!(rows, 1, "{kind:?} {currency:?}");
            }
        }
    }
}
