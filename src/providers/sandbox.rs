//! A deterministic simulated provider for the demo, the simulator and tests.
//!
//! Every random choice is drawn from a ChaCha RNG seeded with
//! SHA-256(seed, idempotency key, purpose, attempt number), so the same seed and
//! the same calls give the same results, whatever order different conversions
//! are driven in and however many threads drive them.
//!
//! Behaviour (see [`SandboxBehaviour`]): a latency range; a fee of
//! `fee_bps` plus `fee_fixed`, charged in the source currency; a rate of
//! `1 − spread_bps / 10000` destination units per source unit; probabilities of
//! a retryable error on initiate (nothing recorded), of a lost response
//! (recorded, but the caller sees [`ProviderError::OutcomeUnknown`]), of a refusal (final
//! error), of a conversion that ends `Failed`, and of a retryable error on a
//! status poll; and how many `status` polls a conversion needs to finish.
//!
//! Idempotent on the idempotency key: initiating again with the same key
//! returns the same conversion and is counted once. Clones share state.
//!
//! Amounts on completion, exact and in this order:
//! `fee = round_half_away_from_zero(amount × fee_bps / 10000 + fee_fixed, source scale)`,
//! `destination = round_toward_zero((amount − fee) × rate, destination scale)`
//! (truncation: the simulated provider, like real ones, never pays out a
//! fraction of a cent it does not have).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rust_decimal::{Decimal, RoundingStrategy};
use rust_decimal_macros::dec;
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::row::ProviderRow;
use super::{
    ConversionProvider, ConversionRequest, ExecutedConversion, ProviderConversion, ProviderError,
    ProviderState, Quote,
};
use crate::domain::{ConversionDirection, Currency, Money};

/// Namespace for sandbox transaction ids (UUIDv5 over seed and key).
const SANDBOX_TX_NAMESPACE: Uuid = Uuid::from_u128(0x5a4d_b0c5_1e3f_4a2b_9c8d_7e6f_5a4b_3c2d);

/// How the sandbox behaves. Probabilities are clamped into `[0, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxBehaviour {
    /// Smallest simulated latency per call, in milliseconds.
    pub latency_min_ms: u64,
    /// Largest simulated latency per call, in milliseconds (inclusive).
    pub latency_max_ms: u64,
    /// Proportional fee in basis points of the amount (source currency).
    pub fee_bps: Decimal,
    /// Fixed fee per conversion (source currency).
    pub fee_fixed: Decimal,
    /// Spread in basis points: the rate is `1 − spread_bps / 10000`.
    pub spread_bps: Decimal,
    /// Chance that an initiate call fails retryably before anything is recorded.
    pub retryable_error_probability: f64,
    /// Chance that a new conversion is recorded but the response is lost
    /// (the caller sees an unknown outcome; a retry returns the conversion).
    pub lost_response_probability: f64,
    /// Chance that a new conversion is refused with a final error.
    pub refusal_probability: f64,
    /// Chance that an accepted conversion ends `Failed` instead of `Completed`.
    pub failure_probability: f64,
    /// Chance that a status poll fails retryably.
    pub status_error_probability: f64,
    /// Status polls before a conversion reaches its end (0: it is already
    /// finished when `initiate` returns).
    pub polls_to_complete: u32,
    /// What the sandbox holds in each currency before any conversion
    /// ([`ConversionProvider::balance`] adds what it received and subtracts what it sent).
    pub opening_balance: Decimal,
}

impl Default for SandboxBehaviour {
    /// No latency, no fee, no spread, no failures, completes on the second poll.
    fn default() -> Self {
        Self {
            latency_min_ms: 0,
            latency_max_ms: 0,
            fee_bps: Decimal::ZERO,
            fee_fixed: Decimal::ZERO,
            spread_bps: Decimal::ZERO,
            retryable_error_probability: 0.0,
            lost_response_probability: 0.0,
            refusal_probability: 0.0,
            failure_probability: 0.0,
            status_error_probability: 0.0,
            polls_to_complete: 2,
            opening_balance: dec!(10_000_000),
        }
    }
}

impl SandboxBehaviour {
    /// The default behaviour with a row's fee (`fee_percentage` as a fraction →
    /// bps), fixed fee and spread.
    pub fn from_row(row: &ProviderRow) -> Self {
        Self {
            fee_bps: row.fee_percentage * Decimal::from(10_000),
            fee_fixed: row.fee_fixed,
            spread_bps: row.spread_bps,
            ..Self::default()
        }
    }

    /// Destination units per source unit.
    pub fn rate(&self) -> Decimal {
        Decimal::ONE - self.spread_bps / Decimal::from(10_000)
    }

    /// The fee for converting `amount`, in its currency, rounded half away
    /// from zero to the currency's scale.
    pub fn fee_for(&self, amount: &Money) -> Money {
        let raw = amount.value * self.fee_bps / Decimal::from(10_000) + self.fee_fixed;
        Money {
            currency: amount.currency,
            value: raw
                .round_dp_with_strategy(
                    amount.currency.scale(),
                    RoundingStrategy::MidpointAwayFromZero,
                )
                .normalize(),
        }
    }

    /// Its price for converting `amount`: [`Self::rate`] and [`Self::fee_for`]
    /// (what the sandbox quotes, and what the simulator's providers quote).
    pub fn quote(&self, amount: &Money) -> Quote {
        Quote {
            rate: self.rate(),
            fee: self.fee_for(amount),
        }
    }

    /// What arrives for `amount` after `fee`: `(amount − fee) × rate`, rounded
    /// toward zero to the destination currency's scale.
    pub fn destination_for(
        &self,
        direction: ConversionDirection,
        amount: &Money,
        fee: &Money,
    ) -> Money {
        let currency = direction.destination_currency();
        let value = ((amount.value - fee.value) * self.rate())
            .round_dp_with_strategy(currency.scale(), RoundingStrategy::ToZero)
            .normalize();
        Money { currency, value }
    }
}

/// One conversion as the sandbox recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConversion {
    /// The sandbox's id for it.
    pub provider_tx_id: String,
    /// The request that created it.
    pub request: ConversionRequest,
    /// Status polls so far.
    pub polls: u32,
    /// Polls it needs before its end.
    pub polls_to_complete: u32,
    /// Whether it is destined to fail.
    pub will_fail: bool,
    /// Fee (source currency).
    pub fee: Money,
    /// Rate (destination per source unit).
    pub rate: Decimal,
    /// What arrives on completion.
    pub destination_amount: Money,
}

impl SandboxConversion {
    fn state(&self) -> ProviderState {
        if self.polls == 0 && self.polls_to_complete > 0 {
            ProviderState::Submitted
        } else if self.polls < self.polls_to_complete {
            ProviderState::Processing
        } else if self.will_fail {
            ProviderState::Failed {
                reason: "sandbox: simulated provider failure".to_owned(),
            }
        } else {
            ProviderState::Completed {
                destination_amount: self.destination_amount,
                fee: self.fee,
                rate: self.rate,
            }
        }
    }

    fn view(&self) -> ProviderConversion {
        let state = self.state();
        ProviderConversion {
            provider_tx_id: self.provider_tx_id.clone(),
            raw: json!({
                "provider": "sandbox",
                "id": self.provider_tx_id,
                "idempotency_key": self.request.idempotency_key,
                "direction": self.request.direction,
                "amount": self.request.amount,
                "polls": self.polls,
                "state": state,
            }),
            state,
        }
    }
}

#[derive(Debug)]
struct State {
    behaviour: SandboxBehaviour,
    down: bool,
    initiate_calls: u64,
    status_calls: u64,
    attempts: HashMap<Uuid, u64>,
    conversions: HashMap<Uuid, SandboxConversion>,
    by_tx_id: HashMap<String, Uuid>,
    /// Keys in creation order.
    order: Vec<Uuid>,
}

/// The deterministic simulated provider. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct SandboxProvider {
    name: Arc<str>,
    seed: u64,
    state: Arc<Mutex<State>>,
}

impl fmt::Debug for SandboxProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxProvider")
            .field("name", &self.name)
            .field("seed", &self.seed)
            .finish_non_exhaustive()
    }
}

impl SandboxProvider {
    /// A sandbox named `sandbox`, drawing every random choice from `seed`.
    pub fn new(seed: u64, behaviour: SandboxBehaviour) -> Self {
        Self {
            name: Arc::from("sandbox"),
            seed,
            state: Arc::new(Mutex::new(State {
                behaviour,
                down: false,
                initiate_calls: 0,
                status_calls: 0,
                attempts: HashMap::new(),
                conversions: HashMap::new(),
                by_tx_id: HashMap::new(),
                order: Vec::new(),
            })),
        }
    }

    /// A clone (sharing state) that reports `name` from [`ConversionProvider::name`].
    pub fn named(&self, name: impl Into<String>) -> Self {
        Self {
            name: Arc::from(name.into()),
            ..self.clone()
        }
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Simulates a full outage (`true`): every call fails retryably and
    /// nothing is recorded, until set back to `false`.
    pub fn set_down(&self, down: bool) {
        self.lock().down = down;
    }

    /// Replaces the behaviour for calls from now on (conversions already
    /// recorded keep their fee, rate and fate).
    pub fn set_behaviour(&self, behaviour: SandboxBehaviour) {
        self.lock().behaviour = behaviour;
    }

    /// The current behaviour.
    pub fn behaviour(&self) -> SandboxBehaviour {
        self.lock().behaviour.clone()
    }

    /// Every `initiate` call received, including failed and repeated ones.
    pub fn initiate_calls(&self) -> u64 {
        self.lock().initiate_calls
    }

    /// Conversions started: each idempotency key counts once, however often
    /// it was initiated. "The provider saw one conversion" is `initiated_count() == 1`.
    pub fn initiated_count(&self) -> u64 {
        self.lock().conversions.len() as u64
    }

    /// Number of distinct conversions recorded (the same as [`Self::initiated_count`]).
    pub fn conversion_count(&self) -> usize {
        self.lock().conversions.len()
    }

    /// Every `status` call received.
    pub fn status_calls(&self) -> u64 {
        self.lock().status_calls
    }

    /// The recorded conversions, in creation order.
    pub fn conversions(&self) -> Vec<SandboxConversion> {
        let state = self.lock();
        state
            .order
            .iter()
            .filter_map(|k| state.conversions.get(k).cloned())
            .collect()
    }

    /// The conversion recorded for an idempotency key.
    pub fn conversion_for_key(&self, key: Uuid) -> Option<SandboxConversion> {
        self.lock().conversions.get(&key).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rng(&self, key: Uuid, purpose: &str, attempt: u64) -> ChaCha8Rng {
        let mut hasher = Sha256::new();
        hasher.update(self.seed.to_be_bytes());
        hasher.update(key.as_bytes());
        hasher.update(purpose.as_bytes());
        hasher.update(attempt.to_be_bytes());
        ChaCha8Rng::from_seed(hasher.finalize().into())
    }

    fn tx_id(&self, key: Uuid) -> String {
        let mut name = self.seed.to_be_bytes().to_vec();
        name.extend_from_slice(key.as_bytes());
        format!(
            "sbx_{}",
            Uuid::new_v5(&SANDBOX_TX_NAMESPACE, &name).simple()
        )
    }

    fn outage() -> ProviderError {
        ProviderError::Retryable {
            reason: "sandbox: simulated outage".to_owned(),
            retry_after_ms: None,
        }
    }

    fn initiate_now(
        &self,
        request: &ConversionRequest,
    ) -> (Duration, Result<ProviderConversion, ProviderError>) {
        let mut state = self.lock();
        state.initiate_calls += 1;
        let key = request.idempotency_key;
        let attempt = {
            let n = state.attempts.entry(key).or_insert(0);
            *n += 1;
            *n
        };
        let behaviour = state.behaviour.clone();
        let mut rng = self.rng(key, "initiate", attempt);
        let latency = draw_latency(&mut rng, &behaviour);
        if state.down {
            return (latency, Err(Self::outage()));
        }
        if chance(&mut rng, behaviour.retryable_error_probability) {
            return (
                latency,
                Err(ProviderError::Retryable {
                    reason: "sandbox: simulated 503".to_owned(),
                    retry_after_ms: None,
                }),
            );
        }
        if let Some(existing) = state.conversions.get(&key) {
            if existing.request != *request {
                return (
                    latency,
                    Err(ProviderError::Final {
                        code: "idempotency_conflict".to_owned(),
                        reason: format!(
                            "idempotency key {key} was already used for a different conversion"
                        ),
                    }),
                );
            }
            return (latency, Ok(existing.view()));
        }
        if let Err(e) = request.validate() {
            return (latency, Err(e));
        }
        if chance(&mut rng, behaviour.refusal_probability) {
            return (
                latency,
                Err(ProviderError::Final {
                    code: "refused".to_owned(),
                    reason: "sandbox: simulated refusal".to_owned(),
                }),
            );
        }
        let fee = behaviour.fee_for(&request.amount);
        if fee.value >= request.amount.value {
            return (
                latency,
                Err(ProviderError::Final {
                    code: "amount_too_small".to_owned(),
                    reason: format!("fee {fee} is not less than the amount {}", request.amount),
                }),
            );
        }
        // Fates are drawn from the key alone, so they do not depend on how
        // many attempts it took to get the conversion accepted.
        let mut fate = self.rng(key, "fate", 0);
        let will_fail = chance(&mut fate, behaviour.failure_probability);
        let conversion = SandboxConversion {
            provider_tx_id: self.tx_id(key),
            request: request.clone(),
            polls: 0,
            polls_to_complete: behaviour.polls_to_complete,
            will_fail,
            destination_amount: behaviour.destination_for(request.direction, &request.amount, &fee),
            fee,
            rate: behaviour.rate(),
        };
        let view = conversion.view();
        state
            .by_tx_id
            .insert(conversion.provider_tx_id.clone(), key);
        state.conversions.insert(key, conversion);
        state.order.push(key);
        if chance(&mut rng, behaviour.lost_response_probability) {
            return (
                latency,
                Err(ProviderError::OutcomeUnknown {
                    reason: "sandbox: simulated lost response (the conversion was recorded)"
                        .to_owned(),
                }),
            );
        }
        (latency, Ok(view))
    }

    fn status_now(
        &self,
        provider_tx_id: &str,
    ) -> (Duration, Result<ProviderConversion, ProviderError>) {
        let mut state = self.lock();
        state.status_calls += 1;
        let behaviour = state.behaviour.clone();
        let Some(key) = state.by_tx_id.get(provider_tx_id).copied() else {
            return (
                Duration::ZERO,
                Err(ProviderError::Final {
                    code: "not_found".to_owned(),
                    reason: format!("sandbox: no conversion {provider_tx_id:?}"),
                }),
            );
        };
        let down = state.down;
        let Some(conversion) = state.conversions.get_mut(&key) else {
            return (
                Duration::ZERO,
                Err(ProviderError::Protocol(
                    "sandbox: index out of sync".to_owned(),
                )),
            );
        };
        let mut rng = self.rng(key, "status", u64::from(conversion.polls) + 1);
        let latency = draw_latency(&mut rng, &behaviour);
        if down {
            return (latency, Err(Self::outage()));
        }
        if chance(&mut rng, behaviour.status_error_probability) {
            return (
                latency,
                Err(ProviderError::Retryable {
                    reason: "sandbox: simulated status error".to_owned(),
                    retry_after_ms: None,
                }),
            );
        }
        conversion.polls = conversion.polls.saturating_add(1);
        (latency, Ok(conversion.view()))
    }

    fn balance_now(&self, currency: Currency) -> Result<Money, ProviderError> {
        let state = self.lock();
        if state.down {
            return Err(Self::outage());
        }
        let mut value = state.behaviour.opening_balance;
        for conversion in state.conversions.values() {
            if let ProviderState::Completed {
                destination_amount, ..
            } = conversion.state()
            {
                if conversion.request.amount.currency == currency {
                    value -= conversion.request.amount.value;
                }
                if destination_amount.currency == currency {
                    value += destination_amount.value;
                }
            }
        }
        Ok(Money { currency, value })
    }
}

fn chance(rng: &mut ChaCha8Rng, probability: f64) -> bool {
    let p = if probability.is_nan() {
        0.0
    } else {
        probability.clamp(0.0, 1.0)
    };
    // Always draw, so later draws do not depend on whether p was 0 or 1.
    let roll: f64 = rng.r#gen();
    roll < p
}

fn draw_latency(rng: &mut ChaCha8Rng, behaviour: &SandboxBehaviour) -> Duration {
    let lo = behaviour.latency_min_ms.min(behaviour.latency_max_ms);
    let hi = behaviour.latency_min_ms.max(behaviour.latency_max_ms);
    Duration::from_millis(rng.gen_range(lo..=hi))
}

async fn simulate_latency(latency: Duration) {
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
}

#[async_trait]
impl ConversionProvider for SandboxProvider {
    fn name(&self) -> &str {
        &self.name
    }

    async fn initiate(
        &self,
        request: &ConversionRequest,
    ) -> Result<ProviderConversion, ProviderError> {
        let (latency, outcome) = self.initiate_now(request);
        simulate_latency(latency).await;
        outcome
    }

    async fn status(&self, provider_tx_id: &str) -> Result<ProviderConversion, ProviderError> {
        let (latency, outcome) = self.status_now(provider_tx_id);
        simulate_latency(latency).await;
        outcome
    }

    async fn quote(
        &self,
        direction: ConversionDirection,
        amount: Money,
    ) -> Result<Quote, ProviderError> {
        if self.lock().down {
            return Err(Self::outage());
        }
        if amount.currency != direction.source_currency() {
            return Err(ProviderError::Final {
                code: "invalid_request".to_owned(),
                reason: format!(
                    "{direction} needs {}, got {amount}",
                    direction.source_currency()
                ),
            });
        }
        Ok(self.behaviour().quote(&amount))
    }

    async fn balance(&self, currency: Currency) -> Result<Money, ProviderError> {
        self.balance_now(currency)
    }

    async fn health_check(&self) -> Result<(), ProviderError> {
        if self.lock().down {
            Err(Self::outage())
        } else {
            Ok(())
        }
    }

    /// Every recorded conversion, in creation order, in its current state
    /// (listing does not count as a status poll).
    async fn executions(&self) -> Result<Option<Vec<ExecutedConversion>>, ProviderError> {
        if self.lock().down {
            return Err(Self::outage());
        }
        Ok(Some(
            self.conversions()
                .into_iter()
                .map(|c| ExecutedConversion {
                    idempotency_key: c.request.idempotency_key,
                    provider_tx_id: c.provider_tx_id.clone(),
                    direction: c.request.direction,
                    amount: c.request.amount,
                    state: c.state(),
                })
                .collect(),
        ))
    }
}
