//! The three system buffer accounts, their thresholds and the status words
//! operators know from the original engine.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::currency::Currency;

/// One of the system buffer accounts the engine keeps funded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferAccount {
    /// On-chain USDC reserve for instant withdrawals.
    SystemBufferUsdc,
    /// Operational USD held at conversion providers.
    SystemBufferFiat,
    /// Pre-funded cash at the broker.
    BrokerOperational,
}

impl BufferAccount {
    /// Every buffer, in the order reports list them.
    pub const ALL: [BufferAccount; 3] = [
        BufferAccount::SystemBufferUsdc,
        BufferAccount::SystemBufferFiat,
        BufferAccount::BrokerOperational,
    ];

    /// The name used in the database, the API and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            BufferAccount::SystemBufferUsdc => "system_buffer_usdc",
            BufferAccount::SystemBufferFiat => "system_buffer_fiat",
            BufferAccount::BrokerOperational => "broker_operational",
        }
    }

    /// The currency the buffer holds.
    pub const fn currency(self) -> Currency {
        match self {
            BufferAccount::SystemBufferUsdc => Currency::Usdc,
            BufferAccount::SystemBufferFiat | BufferAccount::BrokerOperational => Currency::Usd,
        }
    }
}

impl fmt::Display for BufferAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text did not name a buffer account.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown buffer account {0:?}")]
pub struct UnknownBufferAccount(pub String);

impl FromStr for BufferAccount {
    type Err = UnknownBufferAccount;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BufferAccount::ALL
            .into_iter()
            .find(|a| a.as_str() == s)
            .ok_or_else(|| UnknownBufferAccount(s.to_owned()))
    }
}

/// Where a buffer stands against its thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum BufferStatus {
    /// Below the minimum: alert and replenish urgently.
    CriticalLow,
    /// At or above the minimum but below the target.
    BelowTarget,
    /// Between target and maximum.
    Healthy,
    /// Above the maximum: capital sits idle.
    OverCapitalized,
}

impl BufferStatus {
    /// Every status, lowest first.
    pub const ALL: [BufferStatus; 4] = [
        BufferStatus::CriticalLow,
        BufferStatus::BelowTarget,
        BufferStatus::Healthy,
        BufferStatus::OverCapitalized,
    ];

    /// The status word as stored in `v_buffer_status` and shown to operators.
    pub const fn as_str(self) -> &'static str {
        match self {
            BufferStatus::CriticalLow => "CRITICAL_LOW",
            BufferStatus::BelowTarget => "BELOW_TARGET",
            BufferStatus::Healthy => "HEALTHY",
            BufferStatus::OverCapitalized => "OVER_CAPITALIZED",
        }
    }
}

impl fmt::Display for BufferStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text did not name a buffer status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown buffer status {0:?} (expected CRITICAL_LOW, BELOW_TARGET, HEALTHY or OVER_CAPITALIZED)"
)]
pub struct UnknownBufferStatus(pub String);

impl FromStr for BufferStatus {
    type Err = UnknownBufferStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BufferStatus::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| UnknownBufferStatus(s.to_owned()))
    }
}

/// Thresholds that violate `0 < min <= target <= max`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "thresholds must satisfy 0 < min <= target <= max (got min {min}, target {target}, max {max})"
)]
pub struct InvalidThresholds {
    pub min: Decimal,
    pub target: Decimal,
    pub max: Decimal,
}

/// A buffer's min / target / max levels. A value that exists is ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thresholds {
    min: Decimal,
    target: Decimal,
    max: Decimal,
}

impl Thresholds {
    /// Checks `0 < min <= target <= max`.
    pub fn new(min: Decimal, target: Decimal, max: Decimal) -> Result<Self, InvalidThresholds> {
        if min > Decimal::ZERO && min <= target && target <= max {
            Ok(Self { min, target, max })
        } else {
            Err(InvalidThresholds { min, target, max })
        }
    }

    pub fn min(&self) -> Decimal {
        self.min
    }

    pub fn target(&self) -> Decimal {
        self.target
    }

    pub fn max(&self) -> Decimal {
        self.max
    }

    /// The status of a buffer holding `balance`.
    pub fn status(&self, balance: Decimal) -> BufferStatus {
        if balance < self.min {
            BufferStatus::CriticalLow
        } else if balance < self.target {
            BufferStatus::BelowTarget
        } else if balance <= self.max {
            BufferStatus::Healthy
        } else {
            BufferStatus::OverCapitalized
        }
    }
}
