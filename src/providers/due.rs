//! Due (due.network) client.
//!
//! Flow, as Due's public API reference describes it (`https://api.due.network`,
//! paths under `/v1`, `Authorization: Bearer <key>`, optional `Due-Account-Id`):
//!
//! 1. `POST /v1/transfers/quote` with a source and destination rail, currency
//!    and amount → a quote whose `token` identifies it (quotes expire in ~2 min);
//! 2. `POST /v1/transfers` with that token and our recipient → a **transfer**,
//!    whose `id` is the `provider_tx_id` (never the quote token: the original
//!    engine stored the quote id and so could never see a conversion finish);
//! 3. `GET /v1/transfers/{id}` → the transfer's `status`.
//!
//! Details Due's documentation does not pin down are isolated in the mapping
//! functions [`quote_request_body`], [`transfer_request_body`], [`map_quote`]
//! and [`map_transfer`], each stating its assumption.
//!
//! Reconciliation: the `Idempotency-Key` travels only as a request header, and
//! Due's public reference documents no way to list transfers by it, so this
//! client does not implement [`ConversionProvider::executions`] (`treasury
//! reconcile --providers` says so; check Due's dashboard for transfers whose
//! job is not `completed`).
//!
//! Settings (read by [`DueConfig::from_env`]):
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `DUE_BASE_URL` | API base URL (beats the row's `base_url`) | row `base_url`, else `https://api.due.network` |
//! | row `credentials_ref` | name of the variable holding the API key | `DUE_API_KEY` |
//! | `DUE_ACCOUNT_ID` | sent as `Due-Account-Id` when set | unset |
//! | `DUE_USD_RECIPIENT_ID` | Due recipient receiving USD (our bank account) | required |
//! | `DUE_USDC_RECIPIENT_ID` | Due recipient receiving USDC (our wallet) | required |
//! | `DUE_USD_RAIL` | rail for the USD side | `ach` |
//! | `DUE_USDC_RAIL` | rail for the USDC side | `ethereum` |
//! | `DUE_TIMEOUT_MS` | request timeout | 30000 |

use std::fmt;

use async_trait::async_trait;
use reqwest::Method;
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{Value, json};

use super::http::{HttpSettings, build_client, send_json};
use super::json::{
    amount_text, decimal_at, optional_decimal_at, parse_currency, provider_money, str_at,
};
use super::row::{ProviderRow, base_url, optional_env, required_env};
use super::{
    ConversionProvider, ConversionRequest, ProviderConversion, ProviderError, ProviderState, Quote,
};
use crate::domain::{ConversionDirection, Currency, Money};

/// Due's production API base URL.
pub const DEFAULT_BASE_URL: &str = "https://api.due.network";

/// Where and how to reach Due.
#[derive(Clone, PartialEq, Eq)]
pub struct DueConfig {
    /// API base URL without the `/v1` suffix.
    pub base_url: String,
    /// Bearer API key.
    pub api_key: String,
    /// Sent as `Due-Account-Id` when set.
    pub account_id: Option<String>,
    /// Rail of the USD side (e.g. `ach`, `wire`).
    pub usd_rail: String,
    /// Rail of the USDC side (e.g. `ethereum`, `polygon`).
    pub usdc_rail: String,
    /// Due recipient id that receives USD.
    pub usd_recipient_id: String,
    /// Due recipient id that receives USDC.
    pub usdc_recipient_id: String,
    /// Timeouts.
    pub http: HttpSettings,
}

impl fmt::Debug for DueConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DueConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &"<redacted>")
            .field("account_id", &self.account_id)
            .field("usd_rail", &self.usd_rail)
            .field("usdc_rail", &self.usdc_rail)
            .field("usd_recipient_id", &self.usd_recipient_id)
            .field("usdc_recipient_id", &self.usdc_recipient_id)
            .field("http", &self.http)
            .finish()
    }
}

impl DueConfig {
    /// Reads the settings in the module table for `row`. A missing required
    /// variable is a [`ProviderError::Configuration`] error naming it.
    pub fn from_env(
        row: &ProviderRow,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ProviderError> {
        let base_url = base_url(env, "DUE_BASE_URL", row, DEFAULT_BASE_URL);
        Ok(Self {
            base_url,
            api_key: required_env(env, row.credentials_var("DUE_API_KEY"))?,
            account_id: optional_env(env, "DUE_ACCOUNT_ID"),
            usd_rail: optional_env(env, "DUE_USD_RAIL").unwrap_or_else(|| "ach".to_owned()),
            usdc_rail: optional_env(env, "DUE_USDC_RAIL").unwrap_or_else(|| "ethereum".to_owned()),
            usd_recipient_id: required_env(env, "DUE_USD_RECIPIENT_ID")?,
            usdc_recipient_id: required_env(env, "DUE_USDC_RECIPIENT_ID")?,
            http: HttpSettings::from_env("DUE_TIMEOUT_MS", env)?,
        })
    }

    fn rail(&self, currency: Currency) -> &str {
        match currency {
            Currency::Usd => &self.usd_rail,
            Currency::Usdc => &self.usdc_rail,
        }
    }

    fn recipient(&self, currency: Currency) -> &str {
        match currency {
            Currency::Usd => &self.usd_recipient_id,
            Currency::Usdc => &self.usdc_recipient_id,
        }
    }
}

/// Body of `POST /v1/transfers/quote`.
///
/// Assumption (from Due's quote guide): the amount goes on the source side as
/// a decimal string and the destination amount is `"0"` ("specify in source OR
/// destination"); currencies are `USD` / `USDC`; rails come from the config.
pub fn quote_request_body(
    direction: ConversionDirection,
    amount: &Money,
    config: &DueConfig,
) -> Value {
    let source = direction.source_currency();
    let destination = direction.destination_currency();
    json!({
        "source": {
            "rail": config.rail(source),
            "currency": source.code(),
            "amount": amount_text(amount),
        },
        "destination": {
            "rail": config.rail(destination),
            "currency": destination.code(),
            "amount": "0",
        },
    })
}

/// Body of `POST /v1/transfers`.
///
/// Assumptions: `quote` is the quote's `token`; `recipient` is our own
/// recipient for the destination currency (a treasury conversion pays
/// ourselves); the source is funded from our Due account, so no `sender`
/// block is sent (a transfer that needs funding stays `awaiting_funds` and the
/// executor's stale-job rule brings it to a person); `memo` carries the
/// idempotency key so a person can match the transfer to the job.
pub fn transfer_request_body(
    quote_token: &str,
    request: &ConversionRequest,
    config: &DueConfig,
) -> Value {
    json!({
        "quote": quote_token,
        "recipient": config.recipient(request.direction.destination_currency()),
        "memo": format!("treasury {}", request.idempotency_key),
    })
}

/// Reads a quote response into its token and a [`Quote`].
///
/// Assumptions: `fxRate` is destination units per source unit; the fee we pay
/// is the source side's `totalFee` (else `fee`, else zero), in the source
/// currency. Destination-side fees, if any, are taken to be already netted out
/// of the destination amount.
pub fn map_quote(
    body: &Value,
    direction: ConversionDirection,
) -> Result<(String, Quote), ProviderError> {
    let token = str_at(body, "/token")?.to_owned();
    let rate = decimal_at(body, "/fxRate")?;
    let fee = source_fee(body, direction.source_currency())?;
    Ok((token, Quote { rate, fee }))
}

/// Reads a transfer (from create or get) into a [`ProviderConversion`].
///
/// Status mapping (Due's transfer `status` enum, plus generic spellings):
///
/// | Due status | state |
/// |---|---|
/// | `awaiting_funds`, `pending`, `created` | `Submitted` |
/// | `funds_received`, `approved`, `manual_review`, `payment_submitted`, `processing`, `refund_submitted` | `Processing` |
/// | `payment_processed`, `completed` | `Completed` |
/// | `failed`, `canceled`, `cancelled`, `rejected`, `refund_processed`, `expired` | `Failed` |
/// | anything else | [`ProviderError::Protocol`] (never guessed) |
///
/// `refund_submitted` stays `Processing`: money left and is on its way back,
/// so the job is neither done nor safely failed until `refund_processed`.
///
/// On completion: `destination.amount` is what arrived (destination currency),
/// the fee is as in [`map_quote`], and the rate is `fxRate` (or, if absent,
/// destination ÷ (source − fee) to 10 places). Every amount is parsed from its
/// exact text and refused, never rounded, if it has more decimals than the
/// currency allows. `raw` is the transfer as received.
pub fn map_transfer(body: &Value) -> Result<ProviderConversion, ProviderError> {
    let provider_tx_id = str_at(body, "/id")?.to_owned();
    let status = str_at(body, "/status")?.to_ascii_lowercase();
    let state = match status.as_str() {
        "awaiting_funds" | "pending" | "created" => ProviderState::Submitted,
        "funds_received" | "approved" | "manual_review" | "payment_submitted" | "processing"
        | "refund_submitted" => ProviderState::Processing,
        "payment_processed" | "completed" => completed_state(body)?,
        "failed" | "canceled" | "cancelled" | "rejected" | "refund_processed" | "expired" => {
            ProviderState::Failed {
                reason: format!("Due transfer {provider_tx_id} is {status}"),
            }
        }
        other => {
            return Err(ProviderError::Protocol(format!(
                "Due transfer {provider_tx_id} has unknown status {other:?}"
            )));
        }
    };
    Ok(ProviderConversion {
        provider_tx_id,
        state,
        raw: body.clone(),
    })
}

fn completed_state(body: &Value) -> Result<ProviderState, ProviderError> {
    let source_currency = parse_currency(str_at(body, "/source/currency")?)?;
    let destination_currency = parse_currency(str_at(body, "/destination/currency")?)?;
    let destination_amount = provider_money(
        destination_currency,
        decimal_at(body, "/destination/amount")?,
        "Due destination amount",
    )?;
    let fee = source_fee(body, source_currency)?;
    let rate = match optional_decimal_at(body, "/fxRate")? {
        Some(rate) => rate,
        None => {
            let net = decimal_at(body, "/source/amount")? - fee.value;
            if net <= Decimal::ZERO {
                return Err(ProviderError::Protocol(
                    "Due transfer has no fxRate and no positive source amount".to_owned(),
                ));
            }
            (destination_amount.value / net)
                .round_dp_with_strategy(10, RoundingStrategy::MidpointNearestEven)
        }
    };
    Ok(ProviderState::Completed {
        destination_amount,
        fee,
        rate,
    })
}

fn source_fee(body: &Value, currency: Currency) -> Result<Money, ProviderError> {
    let value = match optional_decimal_at(body, "/source/totalFee")? {
        Some(v) => v,
        None => optional_decimal_at(body, "/source/fee")?.unwrap_or(Decimal::ZERO),
    };
    provider_money(currency, value, "Due source fee")
}

/// The Due client.
#[derive(Debug, Clone)]
pub struct DueProvider {
    name: String,
    config: DueConfig,
    client: reqwest::Client,
}

impl DueProvider {
    /// A client reporting `name` (the row's name) with `config`.
    pub fn new(name: impl Into<String>, config: DueConfig) -> Result<Self, ProviderError> {
        let client = build_client(&config.http)?;
        Ok(Self {
            name: name.into(),
            config,
            client,
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &DueConfig {
        &self.config
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let url = format!("{}{path}", self.config.base_url.trim_end_matches('/'));
        let mut builder = self
            .client
            .request(method, url)
            .bearer_auth(&self.config.api_key)
            .header(reqwest::header::ACCEPT, "application/json");
        if let Some(account) = &self.config.account_id {
            builder = builder.header("Due-Account-Id", account);
        }
        builder
    }

    async fn create_quote(
        &self,
        direction: ConversionDirection,
        amount: &Money,
    ) -> Result<(String, Quote, Value), ProviderError> {
        super::conversions_only(&self.name, direction)?;
        let body = quote_request_body(direction, amount, &self.config);
        let response = send_json(
            self.request(Method::POST, "/v1/transfers/quote")
                .json(&body),
        )
        .await?;
        let (token, quote) = map_quote(&response, direction)?;
        Ok((token, quote, response))
    }
}

#[async_trait]
impl ConversionProvider for DueProvider {
    fn name(&self) -> &str {
        &self.name
    }

    /// Quote, then create the transfer from it. The transfer creation carries
    /// `Idempotency-Key: <request.idempotency_key>`; the quote call does not
    /// (a quote moves no money, and reusing the key there could make a server
    /// that keys idempotency on the header alone replay the quote for the
    /// transfer). `raw` is `{"quote": …, "transfer": …}`.
    async fn initiate(
        &self,
        request: &ConversionRequest,
    ) -> Result<ProviderConversion, ProviderError> {
        request.validate()?;
        let (token, _quote, quote_raw) = self
            .create_quote(request.direction, &request.amount)
            .await
            .map_err(ProviderError::for_call_without_effect)?;
        let body = transfer_request_body(&token, request, &self.config);
        let response = send_json(
            self.request(Method::POST, "/v1/transfers")
                .header("Idempotency-Key", request.idempotency_key.to_string())
                .json(&body),
        )
        .await
        .map_err(ProviderError::for_call_with_effect)?;
        // Once Due has given a transfer id, the conversion exists: return it
        // whatever else is odd about the answer, so the job records the id and
        // never starts a second conversion elsewhere.
        let provider_tx_id = str_at(&response, "/id")
            .map_err(ProviderError::for_call_with_effect)?
            .to_owned();
        let state = match map_transfer(&response) {
            Ok(conversion) => conversion.state,
            Err(e) => {
                tracing::error!(provider = %self.name, %provider_tx_id, error = %e,
                    "Due created a transfer this client cannot fully read; following it by status");
                ProviderState::Submitted
            }
        };
        if let Err(e) = check_currencies(&response, request.direction) {
            tracing::error!(provider = %self.name, %provider_tx_id, error = %e,
                "Due created a transfer in unexpected currencies");
        }
        Ok(ProviderConversion {
            provider_tx_id,
            state,
            raw: json!({ "quote": quote_raw, "transfer": response }),
        })
    }

    async fn status(&self, provider_tx_id: &str) -> Result<ProviderConversion, ProviderError> {
        let path = format!("/v1/transfers/{}", path_segment(provider_tx_id)?);
        let response = send_json(self.request(Method::GET, &path)).await?;
        map_transfer(&response)
    }

    async fn quote(
        &self,
        direction: ConversionDirection,
        amount: Money,
    ) -> Result<Quote, ProviderError> {
        let (_, quote, _) = self.create_quote(direction, &amount).await?;
        Ok(quote)
    }

    /// Due's public API describes no account balance endpoint (its wallets are
    /// non-custodial), so this is a final `unsupported` error.
    async fn balance(&self, currency: Currency) -> Result<Money, ProviderError> {
        Err(ProviderError::Final {
            code: "unsupported".to_owned(),
            reason: format!("Due exposes no {currency} balance through its API"),
        })
    }

    /// `GET /v1/channels`: cheap, authenticated, read-only.
    async fn health_check(&self) -> Result<(), ProviderError> {
        send_json(self.request(Method::GET, "/v1/channels"))
            .await
            .map(|_| ())
    }
}

/// The transfer Due created must be the conversion we asked for.
fn check_currencies(body: &Value, direction: ConversionDirection) -> Result<(), ProviderError> {
    for (pointer, expected) in [
        ("/source/currency", direction.source_currency()),
        ("/destination/currency", direction.destination_currency()),
    ] {
        if let Some(code) = body.pointer(pointer).and_then(Value::as_str) {
            let got = parse_currency(code)?;
            if got != expected {
                return Err(ProviderError::Protocol(format!(
                    "Due transfer {pointer} is {got}, expected {expected} for {direction}"
                )));
            }
        }
    }
    Ok(())
}

/// A provider id as one URL path segment (ids are opaque, so refuse anything
/// that could change the path).
pub(crate) fn path_segment(id: &str) -> Result<&str, ProviderError> {
    if id.is_empty()
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        || id == "."
        || id == ".."
    {
        return Err(ProviderError::Final {
            code: "invalid_provider_tx_id".to_owned(),
            reason: format!("{id:?} is not a provider transaction id"),
        });
    }
    Ok(id)
}
