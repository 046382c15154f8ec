//! Building providers from `conversion_providers` rows.
//!
//! The caller loads the rows (this module never touches the database) and asks
//! a [`ProviderRegistry`] to [`build`](ProviderRegistry::build) each one. The
//! registry maps a row's `provider_type` to a constructor, so a new provider is
//! one implementation of [`ConversionProvider`], one
//! [`register`](ProviderRegistry::register) call, and one row.
//!
//! Settings and secrets come from an environment lookup given to the registry
//! (the process environment in production, a map in tests); rows only name
//! environment variables (`credentials_ref`), never hold secrets.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::due::{DueConfig, DueProvider};
use super::sandbox::{SandboxBehaviour, SandboxProvider};
use super::zerohash::{ZeroHashConfig, ZeroHashProvider};
use super::{ConversionProvider, ProviderError};
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
        }
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

/// Looks a setting up by name (the process environment, or a map in tests).
pub type EnvLookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Builds one provider from its row, reading settings through the lookup.
pub type ProviderFactory = Arc<
    dyn Fn(
            &ProviderRow,
            &dyn Fn(&str) -> Option<String>,
        ) -> Result<Arc<dyn ConversionProvider>, ProviderError>
        + Send
        + Sync,
>;

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

/// Maps `provider_type` strings to constructors.
#[derive(Clone)]
pub struct ProviderRegistry {
    env: EnvLookup,
    factories: BTreeMap<String, ProviderFactory>,
}

impl fmt::Debug for ProviderRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderRegistry")
            .field("provider_types", &self.provider_types())
            .finish_non_exhaustive()
    }
}

impl ProviderRegistry {
    /// An empty registry reading settings through `env`.
    pub fn new(env: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        Self {
            env: Arc::new(env),
            factories: BTreeMap::new(),
        }
    }

    /// The shipped providers: `due`, `zerohash` and `sandbox`.
    ///
    /// `sandbox`: when `sandbox` is given, every `sandbox` row is served by a
    /// clone of it (clones share state, so a test or the demo can inspect what
    /// the provider saw), named after the row. Otherwise each `sandbox` row gets
    /// its own deterministic sandbox, seeded from `SANDBOX_SEED` (default: the
    /// row id) with the row's fee and spread, and kept for the registry's life
    /// so that building the same row twice gives the same conversions.
    pub fn standard(
        env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
        sandbox: Option<SandboxProvider>,
    ) -> Self {
        let mut registry = Self::new(env);
        registry.register("due", |row, env| {
            let config = DueConfig::from_env(row, env)?;
            Ok(Arc::new(DueProvider::new(row.name.clone(), config)?)
                as Arc<dyn ConversionProvider>)
        });
        registry.register("zerohash", |row, env| {
            let config = ZeroHashConfig::from_env(row, env)?;
            Ok(Arc::new(ZeroHashProvider::new(row.name.clone(), config)?)
                as Arc<dyn ConversionProvider>)
        });
        let built: Arc<Mutex<HashMap<Uuid, SandboxProvider>>> = Arc::default();
        registry.register("sandbox", move |row, env| {
            let provider = match &sandbox {
                Some(shared) => shared.named(row.name.clone()),
                None => {
                    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(existing) = built.get(&row.id) {
                        existing.named(row.name.clone())
                    } else {
                        let seed = match optional_env(env, "SANDBOX_SEED") {
                            Some(text) => text.parse::<u64>().map_err(|_| {
                                ProviderError::Configuration(format!(
                                    "SANDBOX_SEED={text:?} is not an unsigned integer"
                                ))
                            })?,
                            None => row.id.as_u64_pair().0 ^ row.id.as_u64_pair().1,
                        };
                        let provider = SandboxProvider::new(seed, SandboxBehaviour::from_row(row))
                            .named(row.name.clone());
                        built.insert(row.id, provider.clone());
                        provider
                    }
                }
            };
            Ok(Arc::new(provider) as Arc<dyn ConversionProvider>)
        });
        registry
    }

    /// [`ProviderRegistry::standard`] reading the process environment.
    pub fn from_process_env(sandbox: Option<SandboxProvider>) -> Self {
        Self::standard(|var| std::env::var(var).ok(), sandbox)
    }

    /// Registers (or replaces) the constructor for `provider_type`
    /// (matched case-insensitively).
    pub fn register(
        &mut self,
        provider_type: &str,
        factory: impl Fn(
            &ProviderRow,
            &dyn Fn(&str) -> Option<String>,
        ) -> Result<Arc<dyn ConversionProvider>, ProviderError>
        + Send
        + Sync
        + 'static,
    ) -> &mut Self {
        self.factories
            .insert(normalise(provider_type), Arc::new(factory));
        self
    }

    /// The registered provider types, sorted.
    pub fn provider_types(&self) -> Vec<&str> {
        self.factories.keys().map(String::as_str).collect()
    }

    /// Builds the provider a row describes. An unregistered `provider_type`,
    /// or a setting or credential its constructor needs, is a
    /// [`ProviderError::Configuration`] error naming the type or variable.
    pub fn build(&self, row: &ProviderRow) -> Result<Arc<dyn ConversionProvider>, ProviderError> {
        let key = normalise(&row.provider_type);
        let factory = self.factories.get(&key).ok_or_else(|| {
            ProviderError::Configuration(format!(
                "provider {:?} has unknown provider_type {:?} (registered: {})",
                row.name,
                row.provider_type,
                self.provider_types().join(", ")
            ))
        })?;
        let env = &*self.env;
        factory(row, env).map_err(|e| match e {
            ProviderError::Configuration(msg) => {
                ProviderError::Configuration(format!("provider {:?}: {msg}", row.name))
            }
            other => other,
        })
    }
}

fn normalise(provider_type: &str) -> String {
    provider_type.trim().to_ascii_lowercase()
}
