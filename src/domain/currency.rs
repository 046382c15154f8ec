//! Currencies the engine moves, and the compile-time markers that keep
//! amounts of different currencies from being mixed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A currency the engine knows, as it appears on the wire and in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Currency {
    Usd,
    Usdc,
}

impl Currency {
    /// Decimal places an amount of this currency may carry (USD cents, USDC micro-units).
    pub const fn scale(self) -> u32 {
        match self {
            Currency::Usd => Usd::SCALE,
            Currency::Usdc => Usdc::SCALE,
        }
    }

    /// The ISO-like code used on the wire and in the database.
    pub const fn code(self) -> &'static str {
        match self {
            Currency::Usd => Usd::CODE,
            Currency::Usdc => Usdc::CODE,
        }
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// The text did not name a currency the engine supports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown currency {0:?} (expected USD or USDC)")]
pub struct UnknownCurrency(pub String);

impl FromStr for Currency {
    type Err = UnknownCurrency;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "USD" => Ok(Currency::Usd),
            "USDC" => Ok(Currency::Usdc),
            other => Err(UnknownCurrency(other.to_owned())),
        }
    }
}

/// A currency known at compile time; `Amount<C>` is parameterised by one.
pub trait CurrencyUnit:
    Copy + Clone + fmt::Debug + PartialEq + Eq + Send + Sync + Default + 'static
{
    const CURRENCY: Currency;
    const CODE: &'static str;
    const SCALE: u32;
}

/// United States dollars, to the cent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Usd;

/// Circle's USD Coin, to six decimal places.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Usdc;

impl CurrencyUnit for Usd {
    const CURRENCY: Currency = Currency::Usd;
    const CODE: &'static str = "USD";
    const SCALE: u32 = 2;
}

impl CurrencyUnit for Usdc {
    const CURRENCY: Currency = Currency::Usdc;
    const CODE: &'static str = "USDC";
    const SCALE: u32 = 6;
}
