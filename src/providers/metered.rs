//! Counts every provider API call in `treasury_provider_requests_total`
//! `{provider, call, outcome}` by wrapping a [`ConversionProvider`]: the
//! registry hands out wrapped providers, so no caller has to remember.

use std::sync::Arc;

use async_trait::async_trait;

use super::{
    ConversionProvider, ConversionRequest, ExecutedConversion, ProviderConversion, ProviderError,
    Quote,
};
use crate::domain::{ConversionDirection, Currency, Money};

/// The calls counted, as in the `call` label.
pub const CALLS: [&str; 6] = [
    "initiate",
    "status",
    "quote",
    "balance",
    "health_check",
    "executions",
];

/// The outcomes counted, as in the `outcome` label.
pub const OUTCOMES: [&str; 2] = ["success", "failure"];

/// A provider whose calls are counted.
pub struct Metered {
    inner: Arc<dyn ConversionProvider>,
    name: String,
}

impl Metered {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ConversionProvider>) -> Self {
        let name = inner.name().to_owned();
        Self { inner, name }
    }
}

/// Creates the request counters of `provider` at zero, so that the first
/// call shows in `increase()`.
pub fn register(provider: &str) {
    for call in CALLS {
        for outcome in OUTCOMES {
            metrics::counter!("treasury_provider_requests_total", "provider" => provider.to_owned(), "call" => call, "outcome" => outcome)
                .increment(0);
        }
    }
}

fn count<T>(provider: &str, call: &'static str, result: &Result<T, ProviderError>) {
    let outcome = if result.is_ok() { "success" } else { "failure" };
    metrics::counter!("treasury_provider_requests_total", "provider" => provider.to_owned(), "call" => call, "outcome" => outcome)
        .increment(1);
}

#[async_trait]
impl ConversionProvider for Metered {
    fn name(&self) -> &str {
        &self.name
    }

    async fn initiate(
        &self,
        request: &ConversionRequest,
    ) -> Result<ProviderConversion, ProviderError> {
        let result = self.inner.initiate(request).await;
        count(&self.name, "initiate", &result);
        result
    }

    async fn status(&self, provider_tx_id: &str) -> Result<ProviderConversion, ProviderError> {
        let result = self.inner.status(provider_tx_id).await;
        count(&self.name, "status", &result);
        result
    }

    async fn quote(
        &self,
        direction: ConversionDirection,
        amount: Money,
    ) -> Result<Quote, ProviderError> {
        let result = self.inner.quote(direction, amount).await;
        count(&self.name, "quote", &result);
        result
    }

    async fn balance(&self, currency: Currency) -> Result<Money, ProviderError> {
        let result = self.inner.balance(currency).await;
        count(&self.name, "balance", &result);
        result
    }

    async fn health_check(&self) -> Result<(), ProviderError> {
        let result = self.inner.health_check().await;
        count(&self.name, "health_check", &result);
        result
    }

    async fn executions(&self) -> Result<Option<Vec<ExecutedConversion>>, ProviderError> {
        let result = self.inner.executions().await;
        count(&self.name, "executions", &result);
        result
    }
}
