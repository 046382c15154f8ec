//! Conversion directions, triggers and the command the planner emits.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::amount::Money;
use super::buffer::BufferAccount;
use super::currency::Currency;

/// Which way money moves: one of the two conversions, or a USD transfer
/// between the two USD buffers (no currency changes hands, so no spread).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversionDirection {
    UsdcToUsd,
    UsdToUsdc,
    /// USD from one USD buffer to the other, carried out by a provider whose
    /// row `supports_usd_transfer`.
    UsdTransfer,
}

impl ConversionDirection {
    /// Every direction, conversions first.
    pub const ALL: [ConversionDirection; 3] = [
        ConversionDirection::UsdcToUsd,
        ConversionDirection::UsdToUsdc,
        ConversionDirection::UsdTransfer,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ConversionDirection::UsdcToUsd => "usdc_to_usd",
            ConversionDirection::UsdToUsdc => "usd_to_usdc",
            ConversionDirection::UsdTransfer => "usd_transfer",
        }
    }

    /// Whether the currency changes (a transfer is not a conversion).
    pub const fn is_conversion(self) -> bool {
        !matches!(self, ConversionDirection::UsdTransfer)
    }

    /// Currency given to the provider.
    pub const fn source_currency(self) -> Currency {
        match self {
            ConversionDirection::UsdcToUsd => Currency::Usdc,
            ConversionDirection::UsdToUsdc | ConversionDirection::UsdTransfer => Currency::Usd,
        }
    }

    /// Currency received from the provider.
    pub const fn destination_currency(self) -> Currency {
        match self {
            ConversionDirection::UsdcToUsd | ConversionDirection::UsdTransfer => Currency::Usd,
            ConversionDirection::UsdToUsdc => Currency::Usdc,
        }
    }

    /// The direction that refills `account`: the USDC buffer from USD, the
    /// USD buffers from USDC.
    pub const fn refilling(account: BufferAccount) -> ConversionDirection {
        match account {
            BufferAccount::SystemBufferUsdc => ConversionDirection::UsdToUsdc,
            BufferAccount::SystemBufferFiat | BufferAccount::BrokerOperational => {
                ConversionDirection::UsdcToUsd
            }
        }
    }

    /// The direction that moves money from `source` to `destination`: a
    /// conversion between currencies, a transfer between the two USD
    /// buffers, None from a buffer to itself.
    pub fn between(source: BufferAccount, destination: BufferAccount) -> Option<Self> {
        match (source.currency(), destination.currency()) {
            (Currency::Usd, Currency::Usdc) => Some(ConversionDirection::UsdToUsdc),
            (Currency::Usdc, Currency::Usd) => Some(ConversionDirection::UsdcToUsd),
            (Currency::Usd, Currency::Usd) if source != destination => {
                Some(ConversionDirection::UsdTransfer)
            }
            _ => None,
        }
    }
}

impl fmt::Display for ConversionDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text did not name a conversion direction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown conversion direction {0:?} (expected usdc_to_usd, usd_to_usdc or usd_transfer)")]
pub struct UnknownDirection(pub String);

impl FromStr for ConversionDirection {
    type Err = UnknownDirection;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "usdc_to_usd" => Ok(ConversionDirection::UsdcToUsd),
            "usd_to_usdc" => Ok(ConversionDirection::UsdToUsdc),
            "usd_transfer" => Ok(ConversionDirection::UsdTransfer),
            other => Err(UnknownDirection(other.to_owned())),
        }
    }
}

/// Why a conversion was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversionTrigger {
    BufferReplenishment,
    ScheduledRebalance,
    Manual,
    Emergency,
}

impl ConversionTrigger {
    pub const fn as_str(self) -> &'static str {
        match self {
            ConversionTrigger::BufferReplenishment => "buffer_replenishment",
            ConversionTrigger::ScheduledRebalance => "scheduled_rebalance",
            ConversionTrigger::Manual => "manual",
            ConversionTrigger::Emergency => "emergency",
        }
    }
}

/// The text did not name a trigger.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown conversion trigger {0:?}")]
pub struct UnknownTrigger(pub String);

impl FromStr for ConversionTrigger {
    type Err = UnknownTrigger;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [
            ConversionTrigger::BufferReplenishment,
            ConversionTrigger::ScheduledRebalance,
            ConversionTrigger::Manual,
            ConversionTrigger::Emergency,
        ]
        .into_iter()
        .find(|t| t.as_str() == s)
        .ok_or_else(|| UnknownTrigger(s.to_owned()))
    }
}

/// Namespace for command ids: UUIDv5 over (cycle, direction, sequence).
const COMMAND_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f1d_2a3c_9b7e_4c55_8e21_0a4b_57c3_d9e1);

/// A planned conversion, sent to the executor on `treasury.conversion-commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversionCommand {
    /// Deterministic: the same cycle and plan always give the same id.
    pub command_id: Uuid,
    pub direction: ConversionDirection,
    pub trigger: ConversionTrigger,
    /// Amount in the source currency.
    pub amount: Money,
    pub source_account: BufferAccount,
    pub destination_account: BufferAccount,
    /// The settlement cycle that planned it (a window id or a trigger id).
    pub cycle_id: String,
    pub created_at: DateTime<Utc>,
}

impl ConversionCommand {
    /// The command id for the `sequence`-th command of `direction` in `cycle_id`.
    pub fn derive_id(cycle_id: &str, direction: ConversionDirection, sequence: u32) -> Uuid {
        let name = format!("{cycle_id}|{}|{sequence}", direction.as_str());
        Uuid::new_v5(&COMMAND_ID_NAMESPACE, name.as_bytes())
    }
}
