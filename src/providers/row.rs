//! A `conversion_providers` row as the engine reads it, and the settings
//! lookups the provider implementations share. Plain data: the pure
//! selection and the HTTP clients both depend on this, never on each other.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::ProviderError;
use crate::domain::ConversionDirection;

/// A provider's operational status, as in `conversion_providers.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderStatus {
    /// Takes new conversions.
    Active,
    /// Switched off by an operator; takes nothing.
    Inactive,
    /// Known to be unhealthy; skipped by selection until it recovers.
    Degraded,
}

impl ProviderStatus {
    /// The database spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            ProviderStatus::Active => "active",
            ProviderStatus::Inactive => "inactive",
            ProviderStatus::Degraded => "degraded",
        }
    }
}

impl fmt::Display for ProviderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The text did not name a provider status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown provider status {0:?} (expected active, inactive or degraded)")]
pub struct UnknownProviderStatus(pub String);

impl FromStr for ProviderStatus {
    type Err = UnknownProviderStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "active" => Ok(ProviderStatus::Active),
            "inactive" => Ok(ProviderStatus::Inactive),
            "degraded" => Ok(ProviderStatus::Degraded),
            other => Err(UnknownProviderStatus(other.to_owned())),
        }
    }
}

/// The fields of a `conversion_providers` row the engine needs.
///
/// Amounts (`min_amount`, `max_amount`, daily volumes, `fee_fixed`) are in the
/// conversion's source currency units. `fee_percentage` is a fraction
/// (`0.001` = 0.1 %), `spread_bps` is in basis points (`5` = 0.05 %).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderRow {
    /// `conversion_providers.id`.
    pub id: Uuid,
    /// Unique display name, e.g. `Due`; what [`ConversionProvider::name`] returns.
    pub name: String,
    /// Which implementation to build: `due`, `zerohash`, `sandbox`, …
    pub provider_type: String,
    /// Lower is preferred.
    pub priority: i32,
    /// Operational status.
    pub status: ProviderStatus,
    /// Whether it converts USDC into USD.
    pub supports_usdc_to_usd: bool,
    /// Whether it converts USD into USDC.
    pub supports_usd_to_usdc: bool,
    /// Whether it moves USD between the two USD buffers (`usd_transfer`).
    #[serde(default)]
    pub supports_usd_transfer: bool,
    /// Smallest amount it accepts (`min_conversion_amount`).
    pub min_amount: Decimal,
    /// Largest amount it accepts (`max_conversion_amount`).
    pub max_amount: Decimal,
    /// Most it may convert per day; `None` is unlimited.
    pub daily_volume_limit: Option<Decimal>,
    /// Converted so far today (jobs that ended), excluding jobs in flight.
    pub daily_volume_used: Decimal,
    /// Conversions that completed.
    pub success_count: i64,
    /// Conversions that failed.
    pub failure_count: i64,
    /// Fee as a fraction of the amount.
    pub fee_percentage: Decimal,
    /// Fixed fee per conversion.
    pub fee_fixed: Decimal,
    /// Expected exchange spread in basis points.
    pub spread_bps: Decimal,
    /// Name of the environment variable holding the API key (never the key).
    pub credentials_ref: Option<String>,
    /// `conversion_providers.base_url`: overrides the implementation's default
    /// API base URL (an environment setting such as `DUE_BASE_URL` wins over it).
    pub base_url: Option<String>,
}

impl ProviderRow {
    /// Whether the row says it converts in `direction`.
    pub fn supports(&self, direction: ConversionDirection) -> bool {
        match direction {
            ConversionDirection::UsdcToUsd => self.supports_usdc_to_usd,
            ConversionDirection::UsdToUsdc => self.supports_usd_to_usdc,
            ConversionDirection::UsdTransfer => self.supports_usd_transfer,
        }
    }

    /// Whether the row converts in either direction (a transfer-only row does not).
    pub fn converts(&self) -> bool {
        self.supports_usdc_to_usd || self.supports_usd_to_usdc
    }

    /// The environment variable named by `credentials_ref`, or `default` when
    /// the row names none.
    pub fn credentials_var<'a>(&'a self, default: &'a str) -> &'a str {
        self.credentials_ref
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .unwrap_or(default)
    }
}

/// Reads a required setting: unset or blank is a
/// [`ProviderError::Configuration`] error naming the variable.
pub fn required_env(
    env: &dyn Fn(&str) -> Option<String>,
    var: &str,
) -> Result<String, ProviderError> {
    env(var)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            ProviderError::Configuration(format!("environment variable {var} is not set"))
        })
}

/// The API base URL: the environment variable `var`, else the row's
/// `base_url`, else the implementation's `default`.
pub fn base_url(
    env: &dyn Fn(&str) -> Option<String>,
    var: &str,
    row: &ProviderRow,
    default: &str,
) -> String {
    optional_env(env, var)
        .or_else(|| row.base_url.clone().filter(|u| !u.trim().is_empty()))
        .unwrap_or_else(|| default.to_owned())
}

/// Reads an optional setting (unset or blank is `None`).
pub fn optional_env(env: &dyn Fn(&str) -> Option<String>, var: &str) -> Option<String> {
    env(var)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}
