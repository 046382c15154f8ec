//! ZeroHash client: request for quote, execute, follow the trade.
//!
//! Flow, as ZeroHash's public documentation describes it:
//!
//! 1. `POST /liquidity/rfq` → a quote (`quote_id`, `price`, expiry);
//! 2. `POST /liquidity/execute` with the `quote_id` → an executed trade; its
//!    `trade_id` is the `provider_tx_id` (never the quote id);
//! 3. `GET /trades/{trade_id}` → `trade_state` (`accepted` → `active` →
//!    `terminated`) and, once terminated, `settlement_state` (`settled` or
//!    `defaulted`).
//!
//! Every request is signed ([`sign`]): `X-SCX-API-KEY`, `X-SCX-SIGNED` =
//! base64(HMAC-SHA256(base64-decoded secret, timestamp + METHOD + path + body)),
//! `X-SCX-TIMESTAMP` (unix seconds) and `X-SCX-PASSPHRASE`. ZeroHash's retry
//! guidance is to resend a request with the same `X-REQUEST-ID`, so the execute
//! call carries the conversion's idempotency key there, and the RFQ a UUID
//! derived from it.
//!
//! Details the documentation leaves open are isolated in
//! [`rfq_request_body`], [`map_rfq`], [`execute_request_body`],
//! [`map_execute`], [`map_trade`] and [`map_balance`], each stating its
//! assumption. One limitation to know: the liquidity API takes no client
//! reference, so whether a retried execute is deduplicated rests on ZeroHash
//! honouring `X-REQUEST-ID`.
//!
//! Reconciliation: for the same reason a trade carries no key of ours (the
//! `X-REQUEST-ID` is not stored on it), so trades cannot be matched to jobs
//! and this client does not implement [`ConversionProvider::executions`].
//!
//! Settings (read by [`ZeroHashConfig::from_env`]):
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `ZEROHASH_BASE_URL` | API base URL (beats the row's `base_url`) | row `base_url`, else `https://api.zerohash.com` |
//! | row `credentials_ref` | name of the variable holding the API key | `ZEROHASH_API_KEY` |
//! | `ZEROHASH_API_SECRET` | base64 signing secret | required |
//! | `ZEROHASH_PASSPHRASE` | API passphrase | required |
//! | `ZEROHASH_PARTICIPANT_CODE` | our participant code | required |
//! | `ZEROHASH_ACCOUNT_LABEL` | account label for RFQs and balances | unset |
//! | `ZEROHASH_USDC_ASSET` | ZeroHash's USDC asset code | `USDC` |
//! | `ZEROHASH_TIMEOUT_MS` | request timeout | 30000 |

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use reqwest::Method;
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{Value, json};
use sha2::Sha256;
use uuid::Uuid;

use super::due::path_segment;
use super::http::{HttpSettings, build_client, send_json};
use super::json::{
    amount_text, decimal_at, optional_str_at, parse_currency, provider_money, str_at,
};
use super::row::{ProviderRow, base_url, optional_env, required_env};
use super::{
    ConversionProvider, ConversionRequest, ProviderConversion, ProviderError, ProviderState, Quote,
};
use crate::domain::{ConversionDirection, Currency, Money};

/// ZeroHash's production API base URL (certification: `https://api.cert.zerohash.com`).
pub const DEFAULT_BASE_URL: &str = "https://api.zerohash.com";

/// The body text signed for requests without a body (GETs).
///
/// Assumption: ZeroHash's reference clients sign `JSON.stringify({})`, i.e.
/// `{}`, for GET requests while sending no body.
pub const GET_SIGNING_BODY: &str = "{}";

/// Namespace for the RFQ's `X-REQUEST-ID` (UUIDv5 of the idempotency key).
const RFQ_REQUEST_NAMESPACE: Uuid = Uuid::from_u128(0x2b7e_1516_28ae_4d2a_a6f7_1588_09cf_4f3c);

/// Where and how to reach ZeroHash.
#[derive(Clone, PartialEq, Eq)]
pub struct ZeroHashConfig {
    /// API base URL.
    pub base_url: String,
    /// `X-SCX-API-KEY`.
    pub api_key: String,
    /// Base64 signing secret.
    pub api_secret: String,
    /// `X-SCX-PASSPHRASE`.
    pub passphrase: String,
    /// Our participant code (RFQ `participant_code`; finds our side of a trade).
    pub participant_code: String,
    /// Account label for RFQs and balances, when the platform uses labels.
    pub account_label: Option<String>,
    /// ZeroHash's asset code for USDC (e.g. `USDC` or `USDC.ETH`).
    pub usdc_asset: String,
    /// Timeouts.
    pub http: HttpSettings,
}

impl fmt::Debug for ZeroHashConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZeroHashConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &"<redacted>")
            .field("api_secret", &"<redacted>")
            .field("passphrase", &"<redacted>")
            .field("participant_code", &self.participant_code)
            .field("account_label", &self.account_label)
            .field("usdc_asset", &self.usdc_asset)
            .field("http", &self.http)
            .finish()
    }
}

impl ZeroHashConfig {
    /// Reads the settings in the module table for `row`. A missing required
    /// variable, or a secret that is not base64, is a
    /// [`ProviderError::Configuration`] error naming the variable.
    pub fn from_env(
        row: &ProviderRow,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ProviderError> {
        let base_url = base_url(env, "ZEROHASH_BASE_URL", row, DEFAULT_BASE_URL);
        let api_secret = required_env(env, "ZEROHASH_API_SECRET")?;
        if BASE64.decode(&api_secret).is_err() {
            return Err(ProviderError::Configuration(
                "environment variable ZEROHASH_API_SECRET is not valid base64".to_owned(),
            ));
        }
        Ok(Self {
            base_url,
            api_key: required_env(env, row.credentials_var("ZEROHASH_API_KEY"))?,
            api_secret,
            passphrase: required_env(env, "ZEROHASH_PASSPHRASE")?,
            participant_code: required_env(env, "ZEROHASH_PARTICIPANT_CODE")?,
            account_label: optional_env(env, "ZEROHASH_ACCOUNT_LABEL"),
            usdc_asset: optional_env(env, "ZEROHASH_USDC_ASSET")
                .unwrap_or_else(|| "USDC".to_owned()),
            http: HttpSettings::from_env("ZEROHASH_TIMEOUT_MS", env)?,
        })
    }
}

/// `X-SCX-SIGNED`: base64(HMAC-SHA256(base64-decode(`secret_b64`),
/// `timestamp` + `method` + `path` + `body`)). `path` includes any query
/// string; `body` is the exact text sent ([`GET_SIGNING_BODY`] for GETs).
/// A secret that is not base64 is a [`ProviderError::Configuration`] error.
pub fn sign(
    secret_b64: &str,
    timestamp: &str,
    method: &str,
    path: &str,
    body: &str,
) -> Result<String, ProviderError> {
    let key = BASE64.decode(secret_b64.trim()).map_err(|e| {
        ProviderError::Configuration(format!("ZeroHash API secret is not valid base64: {e}"))
    })?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key)
        .map_err(|e| ProviderError::Configuration(format!("ZeroHash API secret unusable: {e}")))?;
    mac.update(timestamp.as_bytes());
    mac.update(method.as_bytes());
    mac.update(path.as_bytes());
    mac.update(body.as_bytes());
    Ok(BASE64.encode(mac.finalize().into_bytes()))
}

/// Body of `POST /liquidity/rfq`.
///
/// Assumptions: the instrument is `underlying` = [`ZeroHashConfig::usdc_asset`]
/// quoted in `USD`. USDC→USD is a `sell` of a USDC `quantity`; USD→USDC is a
/// `buy` for a USD `total`. Amounts are decimal strings. `account_label` is
/// sent only when configured.
pub fn rfq_request_body(
    direction: ConversionDirection,
    amount: &Money,
    config: &ZeroHashConfig,
) -> Value {
    let mut body = json!({
        "participant_code": config.participant_code,
        "underlying": config.usdc_asset,
        "quoted_currency": "USD",
    });
    let map = body.as_object_mut().expect("object literal");
    match direction {
        ConversionDirection::UsdcToUsd => {
            map.insert("side".into(), json!("sell"));
            map.insert("quantity".into(), json!(amount_text(amount)));
        }
        ConversionDirection::UsdToUsdc => {
            map.insert("side".into(), json!("buy"));
            map.insert("total".into(), json!(amount_text(amount)));
        }
        // Refused before any body is built (`conversions_only`).
        ConversionDirection::UsdTransfer => {}
    }
    if let Some(label) = &config.account_label {
        map.insert("account_label".into(), json!(label));
    }
    body
}

/// ZeroHash wraps most answers in `{"message": …}`; some examples are bare.
fn unwrap_message(body: &Value) -> &Value {
    match body.get("message") {
        Some(inner) if inner.is_object() => inner,
        _ => body,
    }
}

/// Reads an RFQ answer into its `quote_id` and a [`Quote`].
///
/// Assumptions: `price` is USD per USDC with ZeroHash's spread included, so
/// the fee is zero (in the source currency) and the rate is all-in: `price`
/// for a sell, `1 / price` (10 places, half to even) for a buy.
pub fn map_rfq(
    body: &Value,
    direction: ConversionDirection,
) -> Result<(String, Quote), ProviderError> {
    let message = unwrap_message(body);
    let quote_id = str_at(message, "/quote_id")?.to_owned();
    let price = decimal_at(message, "/price")?;
    if price <= Decimal::ZERO {
        return Err(ProviderError::Protocol(format!(
            "ZeroHash quote price {price} is not positive"
        )));
    }
    let rate = match direction {
        ConversionDirection::UsdcToUsd => price,
        ConversionDirection::UsdTransfer => Decimal::ONE,
        ConversionDirection::UsdToUsdc => {
            (Decimal::ONE / price).round_dp_with_strategy(10, RoundingStrategy::MidpointNearestEven)
        }
    };
    Ok((
        quote_id,
        Quote {
            rate,
            fee: Money::zero(direction.source_currency()),
        },
    ))
}

/// Body of `POST /liquidity/execute`: just the quote to execute.
pub fn execute_request_body(quote_id: &str) -> Value {
    json!({ "quote_id": quote_id })
}

/// Reads an execute answer: the trade exists, settlement is pending.
///
/// Assumption: the answer carries `trade_id` (required; the quote id is never
/// used instead) and `status: "Completed"`, which ZeroHash documents as
/// "executed", not "settled". The state is therefore `Submitted` whatever the
/// status text; [`map_trade`] follows settlement.
pub fn map_execute(body: &Value) -> Result<ProviderConversion, ProviderError> {
    let message = unwrap_message(body);
    let trade_id = str_at(message, "/trade_id")?.to_owned();
    Ok(ProviderConversion {
        provider_tx_id: trade_id,
        state: ProviderState::Submitted,
        raw: body.clone(),
    })
}

/// Reads `GET /trades/{trade_id}` into a [`ProviderConversion`].
///
/// | `trade_state` | `settlement_state` | state |
/// |---|---|---|
/// | `accepted`, `active` | any | `Processing` |
/// | `terminated` | `settled` | `Completed` |
/// | `terminated` | `defaulted` | `Failed` |
/// | anything else | | [`ProviderError::Protocol`] |
///
/// `settlement_state` is read from the trade, else from its parties (all
/// `settled` → settled, any `defaulted` → defaulted).
///
/// On completion, assumptions: each party's `asset` / `amount` is what that
/// party *receives*; our party is the one with our participant code, so what
/// we received is the destination and what the other party received is the
/// source. The fee is zero in the source currency (ZeroHash's spread is in the
/// price) and the rate is the effective one, destination ÷ source, to 10
/// places (half to even). Amounts are exact and refused if over-precise.
pub fn map_trade(
    body: &Value,
    participant_code: &str,
) -> Result<ProviderConversion, ProviderError> {
    let trade = unwrap_message(body);
    let trade_id = str_at(trade, "/trade_id")?.to_owned();
    let trade_state = str_at(trade, "/trade_state")?.to_ascii_lowercase();
    let state = match trade_state.as_str() {
        "accepted" | "active" => ProviderState::Processing,
        "terminated" => match settlement_state(trade).as_deref() {
            Some("settled") => settled_state(trade, participant_code)?,
            Some("defaulted") => ProviderState::Failed {
                reason: format!("ZeroHash trade {trade_id} defaulted"),
            },
            other => {
                return Err(ProviderError::Protocol(format!(
                    "ZeroHash trade {trade_id} is terminated with settlement state {other:?}"
                )));
            }
        },
        other => {
            return Err(ProviderError::Protocol(format!(
                "ZeroHash trade {trade_id} has unknown trade_state {other:?}"
            )));
        }
    };
    Ok(ProviderConversion {
        provider_tx_id: trade_id,
        state,
        raw: body.clone(),
    })
}

fn settlement_state(trade: &Value) -> Option<String> {
    if let Some(s) = optional_str_at(trade, "/settlement_state") {
        return Some(s.to_ascii_lowercase());
    }
    let states: Vec<String> = trade
        .get("parties")?
        .as_array()?
        .iter()
        .filter_map(|p| p.get("settlement_state").and_then(Value::as_str))
        .map(str::to_ascii_lowercase)
        .collect();
    if states.iter().any(|s| s == "defaulted") {
        Some("defaulted".to_owned())
    } else if !states.is_empty() && states.iter().all(|s| s == "settled") {
        Some("settled".to_owned())
    } else {
        None
    }
}

fn settled_state(trade: &Value, participant_code: &str) -> Result<ProviderState, ProviderError> {
    let parties = trade
        .get("parties")
        .and_then(Value::as_array)
        .ok_or_else(|| ProviderError::Protocol("ZeroHash trade has no parties".to_owned()))?;
    let ours = parties
        .iter()
        .position(|p| p.get("participant_code").and_then(Value::as_str) == Some(participant_code))
        .ok_or_else(|| {
            ProviderError::Protocol(format!(
                "ZeroHash trade has no party with our participant code {participant_code}"
            ))
        })?;
    let theirs = parties
        .iter()
        .enumerate()
        .find(|(i, _)| *i != ours)
        .map(|(_, p)| p)
        .ok_or_else(|| ProviderError::Protocol("ZeroHash trade has only one party".to_owned()))?;
    let ours = &parties[ours];
    let destination_currency = parse_currency(str_at(ours, "/asset")?)?;
    let source_currency = parse_currency(str_at(theirs, "/asset")?)?;
    if destination_currency == source_currency {
        return Err(ProviderError::Protocol(format!(
            "ZeroHash trade parties both receive {source_currency}"
        )));
    }
    let destination_amount = provider_money(
        destination_currency,
        decimal_at(ours, "/amount")?,
        "ZeroHash amount received",
    )?;
    let source_amount = decimal_at(theirs, "/amount")?;
    if source_amount <= Decimal::ZERO {
        return Err(ProviderError::Protocol(
            "ZeroHash trade source amount is not positive".to_owned(),
        ));
    }
    let rate = (destination_amount.value / source_amount)
        .round_dp_with_strategy(10, RoundingStrategy::MidpointNearestEven);
    Ok(ProviderState::Completed {
        destination_amount,
        fee: Money::zero(source_currency),
        rate,
    })
}

/// Reads `GET /accounts` into our balance in `currency`.
///
/// Assumptions: the answer is `{"message": [{"asset", "account_type",
/// "account_label", "balance"}, …]}`; we sum `balance` over accounts in the
/// currency (USDC matches networked codes such as `USDC.ETH`) whose
/// `account_type` is `available` (when given) and whose label matches the
/// configured one (when configured).
pub fn map_balance(
    body: &Value,
    currency: Currency,
    account_label: Option<&str>,
) -> Result<Money, ProviderError> {
    let accounts = body
        .get("message")
        .unwrap_or(body)
        .as_array()
        .ok_or_else(|| {
            ProviderError::Protocol("ZeroHash accounts answer is not a list".to_owned())
        })?;
    let mut total = Decimal::ZERO;
    for account in accounts {
        let Some(asset) = account.get("asset").and_then(Value::as_str) else {
            continue;
        };
        if parse_currency(asset).ok() != Some(currency) {
            continue;
        }
        let kind = account.get("account_type").and_then(Value::as_str);
        if kind.is_some_and(|k| !k.eq_ignore_ascii_case("available")) {
            continue;
        }
        let label = account.get("account_label").and_then(Value::as_str);
        if account_label.is_some_and(|wanted| label != Some(wanted)) {
            continue;
        }
        total += decimal_at(account, "/balance")?;
    }
    Ok(Money {
        currency,
        value: total.normalize(),
    })
}

/// The ZeroHash client.
#[derive(Clone)]
pub struct ZeroHashProvider {
    name: String,
    config: ZeroHashConfig,
    client: reqwest::Client,
    clock: Arc<dyn Fn() -> i64 + Send + Sync>,
}

impl fmt::Debug for ZeroHashProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZeroHashProvider")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ZeroHashProvider {
    /// A client reporting `name` (the row's name) with `config`, stamping
    /// requests with the system clock.
    pub fn new(name: impl Into<String>, config: ZeroHashConfig) -> Result<Self, ProviderError> {
        BASE64.decode(config.api_secret.trim()).map_err(|_| {
            ProviderError::Configuration("ZeroHash API secret is not valid base64".to_owned())
        })?;
        let client = build_client(&config.http)?;
        Ok(Self {
            name: name.into(),
            config,
            client,
            clock: Arc::new(|| chrono::Utc::now().timestamp()),
        })
    }

    /// The same client with another source of unix-second timestamps (tests).
    pub fn with_clock(mut self, clock: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// The settings in use.
    pub fn config(&self) -> &ZeroHashConfig {
        &self.config
    }

    fn signed(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        request_id: Option<Uuid>,
    ) -> Result<reqwest::RequestBuilder, ProviderError> {
        let text = body.map(Value::to_string);
        let signing_body = text.as_deref().unwrap_or(GET_SIGNING_BODY);
        let timestamp = (self.clock)().to_string();
        let signature = sign(
            &self.config.api_secret,
            &timestamp,
            method.as_str(),
            path,
            signing_body,
        )?;
        let url = format!("{}{path}", self.config.base_url.trim_end_matches('/'));
        let mut builder = self
            .client
            .request(method, url)
            .header(reqwest::header::ACCEPT, "application/json")
            .header("X-SCX-API-KEY", &self.config.api_key)
            .header("X-SCX-SIGNED", signature)
            .header("X-SCX-TIMESTAMP", timestamp)
            .header("X-SCX-PASSPHRASE", &self.config.passphrase);
        if let Some(id) = request_id {
            builder = builder.header("X-REQUEST-ID", id.to_string());
        }
        if let Some(text) = text {
            builder = builder
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(text);
        }
        Ok(builder)
    }

    async fn rfq(
        &self,
        direction: ConversionDirection,
        amount: &Money,
        request_id: Option<Uuid>,
    ) -> Result<(String, Quote), ProviderError> {
        super::conversions_only(&self.name, direction)?;
        let body = rfq_request_body(direction, amount, &self.config);
        let response =
            send_json(self.signed(Method::POST, "/liquidity/rfq", Some(&body), request_id)?)
                .await?;
        map_rfq(&response, direction)
    }
}

#[async_trait]
impl ConversionProvider for ZeroHashProvider {
    fn name(&self) -> &str {
        &self.name
    }

    /// RFQ, then execute the quote. The execute call's `X-REQUEST-ID` is the
    /// idempotency key; the RFQ's is a UUIDv5 of it. The state is `Submitted`
    /// (executed, not yet settled); `raw` is the execute answer.
    async fn initiate(
        &self,
        request: &ConversionRequest,
    ) -> Result<ProviderConversion, ProviderError> {
        request.validate()?;
        let key = request.idempotency_key;
        let rfq_id = Uuid::new_v5(&RFQ_REQUEST_NAMESPACE, key.as_bytes());
        let (quote_id, _) = self
            .rfq(request.direction, &request.amount, Some(rfq_id))
            .await
            .map_err(ProviderError::for_call_without_effect)?;
        let body = execute_request_body(&quote_id);
        let response =
            send_json(self.signed(Method::POST, "/liquidity/execute", Some(&body), Some(key))?)
                .await
                .map_err(ProviderError::for_call_with_effect)?;
        map_execute(&response).map_err(ProviderError::for_call_with_effect)
    }

    async fn status(&self, provider_tx_id: &str) -> Result<ProviderConversion, ProviderError> {
        let path = format!("/trades/{}", path_segment(provider_tx_id)?);
        let response = send_json(self.signed(Method::GET, &path, None, None)?).await?;
        map_trade(&response, &self.config.participant_code)
    }

    async fn quote(
        &self,
        direction: ConversionDirection,
        amount: Money,
    ) -> Result<Quote, ProviderError> {
        self.rfq(direction, &amount, None)
            .await
            .map(|(_, quote)| quote)
    }

    async fn balance(&self, currency: Currency) -> Result<Money, ProviderError> {
        let response = send_json(self.signed(Method::GET, "/accounts", None, None)?).await?;
        map_balance(&response, currency, self.config.account_label.as_deref())
    }

    /// A signed `GET /accounts`: proves reachability and valid credentials.
    async fn health_check(&self) -> Result<(), ProviderError> {
        send_json(self.signed(Method::GET, "/accounts", None, None)?)
            .await
            .map(|_| ())
    }
}
