//! Conversion providers: the [`ConversionProvider`] trait, the registry that
//! builds providers from `conversion_providers` rows by `provider_type`, and
//! the shipped implementations (Due, ZeroHash, and a deterministic sandbox).
//!
//! A new provider is one implementation of the trait, one registration in
//! [`registry`], and one row in `conversion_providers`.

use async_trait::async_trait;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::domain::{ConversionDirection, Currency, Money};

/// A request to convert `amount` (in the direction's source currency).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConversionRequest {
    /// The conversion job id; providers must treat a repeated key as the same
    /// conversion (never a second one).
    pub idempotency_key: Uuid,
    pub direction: ConversionDirection,
    pub amount: Money,
}

/// Where a conversion stands at the provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ProviderState {
    /// Accepted, not started.
    Submitted,
    /// Being executed.
    Processing,
    /// Done: what arrived, what it cost, at what rate (destination per source unit).
    Completed {
        destination_amount: Money,
        fee: Money,
        rate: Decimal,
    },
    /// The provider gave up; no money moved.
    Failed { reason: String },
}

/// A provider's view of one conversion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProviderConversion {
    /// The provider's own id for the conversion (never a quote id).
    pub provider_tx_id: String,
    pub state: ProviderState,
    /// The provider's response as received, stored on the job for audit.
    pub raw: serde_json::Value,
}

/// A provider's price for a conversion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quote {
    /// Destination units per source unit.
    pub rate: Decimal,
    /// Fee in the source currency.
    pub fee: Money,
}

/// What went wrong talking to a provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Worth trying again later (5xx, timeout, rate limit, connection).
    #[error("retryable provider error: {reason}")]
    Retryable {
        reason: String,
        /// Provider-suggested wait (e.g. `Retry-After`), in milliseconds.
        retry_after_ms: Option<u64>,
    },
    /// Trying again will not help (4xx, refused, unsupported).
    #[error("provider refused: {reason} (code {code})")]
    Final { code: String, reason: String },
    /// The provider answered something this client cannot read.
    #[error("unreadable provider response: {0}")]
    Protocol(String),
    /// Missing credentials or settings for this provider.
    #[error("provider not configured: {0}")]
    Configuration(String),
}

impl ProviderError {
    /// Whether the same call may succeed if repeated.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ProviderError::Retryable { .. })
    }
}

/// A conversion provider.
#[async_trait]
pub trait ConversionProvider: Send + Sync {
    /// The provider's name, as in `conversion_providers.name`.
    fn name(&self) -> &str;
    /// Starts a conversion; idempotent on `request.idempotency_key`.
    async fn initiate(
        &self,
        request: &ConversionRequest,
    ) -> Result<ProviderConversion, ProviderError>;
    /// The current state of a conversion started earlier.
    async fn status(&self, provider_tx_id: &str) -> Result<ProviderConversion, ProviderError>;
    /// A price for converting `amount` in `direction`.
    async fn quote(
        &self,
        direction: ConversionDirection,
        amount: Money,
    ) -> Result<Quote, ProviderError>;
    /// The balance the provider holds for us in `currency` (reconciliation).
    async fn balance(&self, currency: Currency) -> Result<Money, ProviderError>;
    /// Whether the provider is reachable and accepting work.
    async fn health_check(&self) -> Result<(), ProviderError>;
}
