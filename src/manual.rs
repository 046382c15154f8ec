//! Manual conversions: an operator asks for one conversion by hand (the
//! original engine's emergency override), through `POST /v1/conversions` or
//! `treasury convert`. The request is checked like any planned command and
//! queued for the executor through the outbox, with trigger `manual`.
//!
//! [`command_for`] is the pure check (request, buffers, provider limits →
//! command or refusal); [`submit`] records it in one exclusive transaction,
//! so it never races a settlement cycle. The command id derives from the
//! caller's idempotency key: the same request again returns the same command.

use std::collections::BTreeMap;

use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::Codec;
use crate::codec::records::encode_command;
use crate::domain::{
    BufferAccount, ConversionCommand, ConversionDirection, ConversionTrigger, Money,
};
use crate::planner::{AmountLimits, BufferPosition};
use crate::store::{LockMode, OutboxMessage, PlannedCommand, Store, StoreError};

/// Namespace of manual command ids: UUIDv5 over the idempotency key.
const MANUAL_ID_NAMESPACE: Uuid = Uuid::from_u128(0x9a41_c7e2_35d8_4f06_b1e9_6c0d_2f7a_84b3);

/// Longest idempotency key accepted.
const MAX_KEY_LEN: usize = 200;

/// What an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct ManualRequest {
    pub direction: ConversionDirection,
    /// In the direction's source currency.
    pub amount: Decimal,
    /// Defaults to the direction's usual source (`system_buffer_fiat` for
    /// `usd_to_usdc`, `system_buffer_usdc` for `usdc_to_usd`).
    #[serde(default)]
    pub source_account: Option<BufferAccount>,
    /// Defaults to `system_buffer_usdc` for `usd_to_usdc` and
    /// `system_buffer_fiat` for `usdc_to_usd`.
    #[serde(default)]
    pub destination_account: Option<BufferAccount>,
    /// The caller's key: the same key always names the same command.
    pub idempotency_key: String,
    /// Why, for the audit trail (required).
    pub reason: String,
    /// Take the source below its minimum anyway.
    #[serde(default)]
    pub force: bool,
}

/// Why a manual conversion is refused. Each says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("idempotency_key must be 1 to {MAX_KEY_LEN} characters")]
    BadKey,
    #[error("reason must not be empty: say why the conversion is run by hand")]
    NoReason,
    #[error("amount: {0}")]
    BadAmount(String),
    #[error("{account} holds {held}, but a {direction} conversion {side} {expected}")]
    WrongAccount {
        account: BufferAccount,
        held: crate::domain::Currency,
        direction: ConversionDirection,
        side: &'static str,
        expected: crate::domain::Currency,
    },
    #[error("source and destination are both {0}")]
    SameAccount(BufferAccount),
    #[error("no active provider converts {0}")]
    NoProvider(ConversionDirection),
    #[error(
        "amount {amount} is outside what the active providers accept for {direction} ({min} to {max})"
    )]
    OutsideLimits {
        direction: ConversionDirection,
        amount: Decimal,
        min: Decimal,
        max: Decimal,
    },
    #[error(
        "{account} would fall to {projected}, below its minimum {min} (counting conversions in flight); \
         send \"force\": true with the reason to run it anyway"
    )]
    BelowMinimum {
        account: BufferAccount,
        projected: Decimal,
        min: Decimal,
    },
    #[error("idempotency key {key:?} was already used for a different conversion ({existing})")]
    KeyReused { key: String, existing: String },
}

impl Refusal {
    /// A short machine-readable code.
    pub const fn code(&self) -> &'static str {
        match self {
            Refusal::BadKey => "bad_idempotency_key",
            Refusal::NoReason => "reason_required",
            Refusal::BadAmount(_) => "bad_amount",
            Refusal::WrongAccount { .. } => "wrong_account",
            Refusal::SameAccount(_) => "same_account",
            Refusal::NoProvider(_) => "no_provider",
            Refusal::OutsideLimits { .. } => "outside_provider_limits",
            Refusal::BelowMinimum { .. } => "source_below_minimum",
            Refusal::KeyReused { .. } => "idempotency_key_reused",
        }
    }
}

/// What [`submit`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ManualError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A recorded manual conversion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Submitted {
    pub command: ConversionCommand,
    /// False when the key had been used before (the stored command is returned).
    pub created: bool,
}

/// The command id for an idempotency key.
pub fn command_id(idempotency_key: &str) -> Uuid {
    Uuid::new_v5(&MANUAL_ID_NAMESPACE, idempotency_key.as_bytes())
}

/// The usual accounts of a direction: (source, destination).
pub const fn default_accounts(direction: ConversionDirection) -> (BufferAccount, BufferAccount) {
    match direction {
        ConversionDirection::UsdToUsdc => (
            BufferAccount::SystemBufferFiat,
            BufferAccount::SystemBufferUsdc,
        ),
        ConversionDirection::UsdcToUsd => (
            BufferAccount::SystemBufferUsdc,
            BufferAccount::SystemBufferFiat,
        ),
        ConversionDirection::UsdTransfer => (
            BufferAccount::BrokerOperational,
            BufferAccount::SystemBufferFiat,
        ),
    }
}

/// Checks `request` against the buffers and the active providers' limits as
/// of `now` and builds its command.
pub fn command_for(
    request: &ManualRequest,
    positions: &[BufferPosition],
    limits: &BTreeMap<ConversionDirection, AmountLimits>,
    now: DateTime<Utc>,
) -> Result<ConversionCommand, Refusal> {
    let key = request.idempotency_key.trim();
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(Refusal::BadKey);
    }
    if request.reason.trim().is_empty() {
        return Err(Refusal::NoReason);
    }
    let direction = request.direction;
    let amount = Money::positive(direction.source_currency(), request.amount)
        .map_err(|e| Refusal::BadAmount(e.to_string()))?;
    let (default_source, default_destination) = default_accounts(direction);
    let source = request.source_account.unwrap_or(default_source);
    let destination = request.destination_account.unwrap_or(default_destination);
    for (account, side, expected) in [
        (source, "pays from", direction.source_currency()),
        (destination, "pays into", direction.destination_currency()),
    ] {
        if account.currency() != expected {
            return Err(Refusal::WrongAccount {
                account,
                held: account.currency(),
                direction,
                side,
                expected,
            });
        }
    }
    if source == destination {
        return Err(Refusal::SameAccount(source));
    }
    let limit = limits
        .get(&direction)
        .ok_or(Refusal::NoProvider(direction))?;
    if amount.value < limit.min || amount.value > limit.max {
        return Err(Refusal::OutsideLimits {
            direction,
            amount: amount.value,
            min: limit.min,
            max: limit.max,
        });
    }
    if let Some(position) = positions.iter().find(|p| p.account == source) {
        let projected = position.projected() - amount.value;
        if projected < position.thresholds.min() && !request.force {
            return Err(Refusal::BelowMinimum {
                account: source,
                projected,
                min: position.thresholds.min(),
            });
        }
    }
    Ok(ConversionCommand {
        command_id: command_id(key),
        direction,
        trigger: ConversionTrigger::Manual,
        amount,
        source_account: source,
        destination_account: destination,
        cycle_id: format!("manual:{key}"),
        // Milliseconds, as on the wire: the stored command and the one
        // returned now are the same.
        created_at: now.trunc_subsecs(3),
    })
}

/// Whether a stored command is what `request` asks for.
fn same_conversion(stored: &ConversionCommand, request: &ManualRequest) -> bool {
    let (source, destination) = default_accounts(request.direction);
    stored.direction == request.direction
        && stored.amount.value == request.amount.normalize()
        && stored.source_account == request.source_account.unwrap_or(source)
        && stored.destination_account == request.destination_account.unwrap_or(destination)
}

/// Where the command goes and who asked.
#[derive(Clone)]
pub struct Destination<'a> {
    pub codec: &'a Codec,
    pub commands_topic: &'a str,
    /// `http` or `cli`, for the audit trail.
    pub requested_by: &'a str,
}

/// Records `request` as of `now`: a planned command (it counts as in flight
/// from now on) and its message on the commands topic, in one exclusive
/// transaction. A key used before returns the stored command (`created:
/// false`), or [`Refusal::KeyReused`] when it named a different conversion.
pub async fn submit(
    store: &dyn Store,
    to: &Destination<'_>,
    request: &ManualRequest,
    now: DateTime<Utc>,
) -> Result<Submitted, ManualError> {
    let mut tx = store.begin(LockMode::Exclusive).await?;
    let id = command_id(request.idempotency_key.trim());
    if let Some(stored) = tx.planned_command(id).await? {
        if same_conversion(&stored.command, request) {
            return Ok(Submitted {
                command: stored.command,
                created: false,
            });
        }
        let c = &stored.command;
        return Err(Refusal::KeyReused {
            key: request.idempotency_key.clone(),
            existing: format!(
                "{} {} {}→{}",
                c.direction, c.amount, c.source_account, c.destination_account
            ),
        }
        .into());
    }
    let positions = tx.buffer_positions().await?;
    let limits = tx.amount_limits().await?;
    let command = command_for(request, &positions, &limits, now)?;
    let payload = encode_command(to.codec, &command)
        .map_err(|e| StoreError::Corrupt(format!("command does not encode: {e}")))?;
    tx.record_commands(&[PlannedCommand {
        command: command.clone(),
        emitted: true,
    }])
    .await?;
    tx.enqueue(&[OutboxMessage {
        id: command.command_id,
        topic: to.commands_topic.to_owned(),
        key: Some(command.command_id.to_string()),
        payload,
        headers: vec![
            ("message-id".into(), command.command_id.to_string()),
            ("cycle-id".into(), command.cycle_id.clone()),
            ("direction".into(), command.direction.as_str().into()),
            ("manual-reason".into(), request.reason.clone()),
            ("manual-forced".into(), request.force.to_string()),
            ("requested-by".into(), to.requested_by.to_owned()),
        ],
    }])
    .await?;
    tx.commit().await?;
    tracing::warn!(
        command = %command.command_id,
        direction = command.direction.as_str(),
        amount = %command.amount,
        source = command.source_account.as_str(),
        destination = command.destination_account.as_str(),
        reason = %request.reason,
        forced = request.force,
        requested_by = to.requested_by,
        "manual conversion queued"
    );
    metrics::counter!("treasury_commands_planned_total", "direction" => command.direction.as_str(), "trigger" => command.trigger.as_str()).increment(1);
    Ok(Submitted {
        command,
        created: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Thresholds;
    use chrono::TimeZone;
    use rust_decimal_macros::dec;

    fn positions(usdc_balance: Decimal) -> Vec<BufferPosition> {
        let at = |account, balance, min, target, max| BufferPosition {
            account,
            thresholds: Thresholds::new(min, target, max).unwrap(),
            batch_size: dec!(1),
            balance,
            incoming: Decimal::ZERO,
            outgoing: Decimal::ZERO,
        };
        vec![
            at(
                BufferAccount::SystemBufferUsdc,
                usdc_balance,
                dec!(10000),
                dec!(50000),
                dec!(100000),
            ),
            at(
                BufferAccount::SystemBufferFiat,
                dec!(100000),
                dec!(20000),
                dec!(100000),
                dec!(200000),
            ),
        ]
    }

    fn limits() -> BTreeMap<ConversionDirection, AmountLimits> {
        [
            ConversionDirection::UsdcToUsd,
            ConversionDirection::UsdToUsdc,
        ]
        .into_iter()
        .map(|d| {
            (
                d,
                AmountLimits {
                    min: dec!(100),
                    max: dec!(1000000),
                },
            )
        })
        .collect()
    }

    fn request(amount: Decimal) -> ManualRequest {
        ManualRequest {
            direction: ConversionDirection::UsdcToUsd,
            amount,
            source_account: None,
            destination_account: None,
            idempotency_key: "ops-2026-12-01-1".into(),
            reason: "fiat buffer drained by a bank run".into(),
            force: false,
        }
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 1, 11, 0, 0).unwrap()
    }

    #[test]
    fn a_valid_request_becomes_a_manual_command_named_by_its_key() {
        let command = command_for(
            &request(dec!(5000)),
            &positions(dec!(50000)),
            &limits(),
            now(),
        )
        .unwrap();
        assert_eq!(command.trigger, ConversionTrigger::Manual);
        assert_eq!(command.source_account, BufferAccount::SystemBufferUsdc);
        assert_eq!(command.destination_account, BufferAccount::SystemBufferFiat);
        assert_eq!(command.command_id, command_id("ops-2026-12-01-1"));
        assert_ne!(command.command_id, command_id("ops-2026-12-01-2"));
        assert_eq!(command.created_at, now());
        let later = now() + chrono::Duration::nanoseconds(1_234_567);
        let at = command_for(
            &request(dec!(5000)),
            &positions(dec!(50000)),
            &limits(),
            later,
        )
        .unwrap()
        .created_at;
        assert_eq!(at, now() + chrono::Duration::milliseconds(1));
    }

    #[test]
    fn refusals_say_why() {
        let p = positions(dec!(50000));
        let refuse = |r: &ManualRequest| command_for(r, &p, &limits(), now()).unwrap_err();
        assert!(matches!(
            refuse(&request(dec!(1.0000001))),
            Refusal::BadAmount(_)
        ));
        assert!(matches!(refuse(&request(dec!(-5))), Refusal::BadAmount(_)));
        assert!(matches!(
            refuse(&request(dec!(50))),
            Refusal::OutsideLimits { .. }
        ));
        assert!(matches!(
            refuse(&ManualRequest {
                reason: " ".into(),
                ..request(dec!(500))
            }),
            Refusal::NoReason
        ));
        assert!(matches!(
            refuse(&ManualRequest {
                destination_account: Some(BufferAccount::SystemBufferUsdc),
                ..request(dec!(500))
            }),
            Refusal::WrongAccount { .. }
        ));
        assert!(matches!(
            refuse(&ManualRequest {
                idempotency_key: String::new(),
                ..request(dec!(500))
            }),
            Refusal::BadKey
        ));
        let none = BTreeMap::new();
        assert!(matches!(
            command_for(&request(dec!(500)), &p, &none, now()).unwrap_err(),
            Refusal::NoProvider(_)
        ));
    }

    #[test]
    fn the_source_stays_above_its_minimum_unless_forced() {
        // 50,000 − 40,000.01 = 9,999.99 < 10,000.
        let p = positions(dec!(50000));
        let refused = command_for(&request(dec!(40000.01)), &p, &limits(), now()).unwrap_err();
        assert!(
            matches!(refused, Refusal::BelowMinimum { projected, .. } if projected == dec!(9999.99))
        );
        assert!(command_for(&request(dec!(40000)), &p, &limits(), now()).is_ok());
        let forced = ManualRequest {
            force: true,
            ..request(dec!(40000.01))
        };
        assert!(command_for(&forced, &p, &limits(), now()).is_ok());
    }

    #[test]
    fn a_stored_command_matches_the_same_request_only() {
        let command = command_for(
            &request(dec!(5000)),
            &positions(dec!(50000)),
            &limits(),
            now(),
        )
        .unwrap();
        assert!(same_conversion(&command, &request(dec!(5000.00))));
        assert!(!same_conversion(&command, &request(dec!(5001))));
    }
}
