//! Conversion providers: the [`ConversionProvider`] trait, the registry that
//! builds providers from `conversion_providers` rows by `provider_type`, and
//! the shipped implementations (Due, ZeroHash, and a deterministic sandbox).
//!
//! A new provider is one implementation of the trait, one registration in
//! [`registry`], and one row in `conversion_providers`.
//!
//! Layout: [`http`] and [`json`] are the shared plumbing (timeouts, status →
//! [`ProviderError`] mapping, exact decimal parsing); [`due`], [`zerohash`] and
//! [`sandbox`] implement [`ConversionProvider`]; [`registry`] builds them from
//! [`row::ProviderRow`]s; [`selection`] is the pure choice of providers
//! for a conversion.

#![warn(missing_docs)]

pub mod due;
pub mod health;
pub mod http;
pub mod json;
pub mod metered;
pub mod registry;
pub mod row;
pub mod sandbox;
pub mod selection;
pub mod zerohash;

pub use registry::ProviderRegistry;
pub use row::{ProviderRow, ProviderStatus};
pub use sandbox::{SandboxBehaviour, SandboxProvider};
pub use selection::{HealthRule, QuoteSeen, Rejection, Selection, select_providers};

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
    /// Which way to convert.
    pub direction: ConversionDirection,
    /// How much to convert, in the direction's source currency.
    pub amount: Money,
}

impl ConversionRequest {
    /// Checks what every provider needs before it talks to anyone: the amount
    /// is in the direction's source currency and greater than zero.
    ///
    /// A violation is [`ProviderError::Final`] with code `invalid_request`:
    /// sending the same request again cannot succeed.
    pub fn validate(&self) -> Result<(), ProviderError> {
        let expected = self.direction.source_currency();
        if self.amount.currency != expected {
            return Err(ProviderError::Final {
                code: "invalid_request".to_owned(),
                reason: format!(
                    "{} conversion must be given {expected}, got {}",
                    self.direction, self.amount
                ),
            });
        }
        if self.amount.value <= Decimal::ZERO {
            return Err(ProviderError::Final {
                code: "invalid_request".to_owned(),
                reason: format!("amount {} must be greater than zero", self.amount),
            });
        }
        Ok(())
    }
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
        /// What arrived, in the destination currency.
        destination_amount: Money,
        /// What the provider charged (the shipped providers report it in the
        /// source currency; ZeroHash's is zero because its spread is in the rate).
        fee: Money,
        /// Destination units per source unit.
        rate: Decimal,
    },
    /// The provider gave up; no money moved.
    Failed {
        /// The provider's explanation.
        reason: String,
    },
}

/// A provider's view of one conversion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProviderConversion {
    /// The provider's own id for the conversion (never a quote id).
    pub provider_tx_id: String,
    /// Where it stands.
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

/// Refuses a `usd_transfer` at a provider that only converts (its row must
/// not offer transfers; this guards a row that says it does by mistake).
pub fn conversions_only(
    provider: &str,
    direction: ConversionDirection,
) -> Result<(), ProviderError> {
    if direction.is_conversion() {
        Ok(())
    } else {
        Err(ProviderError::Final {
            code: "unsupported_direction".to_owned(),
            reason: format!(
                "{provider} converts between USD and USDC; it does not carry out {direction}"
            ),
        })
    }
}

/// What went wrong talking to a provider.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// Worth trying again later (5xx, timeout, rate limit, connection).
    #[error("retryable provider error: {reason}")]
    Retryable {
        /// What happened.
        reason: String,
        /// Provider-suggested wait (e.g. `Retry-After`), in milliseconds.
        retry_after_ms: Option<u64>,
    },
    /// The request may have reached the provider but no usable answer came
    /// back (timed out after sending, connection lost mid-request, HTTP 500,
    /// 502 or 504). Repeating the call with the same idempotency key is safe;
    /// moving the conversion to another provider is not, because this one may
    /// have executed it.
    #[error("provider outcome unknown (it may have acted on the request): {reason}")]
    OutcomeUnknown {
        /// What happened.
        reason: String,
    },
    /// Trying again will not help (4xx, refused, unsupported).
    #[error("provider refused: {reason} (code {code})")]
    Final {
        /// The provider's error code, or `http_<status>` when it gave none.
        code: String,
        /// What happened.
        reason: String,
    },
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
        matches!(
            self,
            ProviderError::Retryable { .. } | ProviderError::OutcomeUnknown { .. }
        )
    }

    /// Whether the provider may have acted on the request even though the call
    /// failed. Clients report an unreadable answer to a call that moves money
    /// as [`ProviderError::OutcomeUnknown`] too (see [`Self::for_call_with_effect`]).
    pub fn may_have_acted(&self) -> bool {
        matches!(self, ProviderError::OutcomeUnknown { .. })
    }

    /// The same failure, for a call that moves money (creating a transfer,
    /// executing a trade): an answer that cannot be read leaves the outcome
    /// unknown.
    pub fn for_call_with_effect(self) -> Self {
        match self {
            ProviderError::Protocol(reason) => ProviderError::OutcomeUnknown {
                reason: format!("unreadable answer: {reason}"),
            },
            other => other,
        }
    }

    /// The same failure, for a call that moves no money (a quote or RFQ): its
    /// unknown outcome is only a retryable error.
    pub fn for_call_without_effect(self) -> Self {
        match self {
            ProviderError::OutcomeUnknown { reason } => ProviderError::Retryable {
                reason,
                retry_after_ms: None,
            },
            other => other,
        }
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
    /// Every conversion the provider executed for us, each under the
    /// idempotency key it was initiated with (reconciliation: an execution
    /// no completed job accounts for is money moved that the books miss).
    /// `Ok(None)` when the provider's API cannot list them by key: the
    /// default, and Due's and ZeroHash's (see their modules).
    async fn executions(&self) -> Result<Option<Vec<ExecutedConversion>>, ProviderError> {
        Ok(None)
    }
}

/// A conversion a provider reports having executed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExecutedConversion {
    /// The key it was initiated with: a job id, for the engine's conversions.
    pub idempotency_key: Uuid,
    /// The provider's own id for it.
    pub provider_tx_id: String,
    /// Which way it converted.
    pub direction: ConversionDirection,
    /// What it took, in the direction's source currency.
    pub amount: Money,
    /// Where it stands at the provider.
    pub state: ProviderState,
}
