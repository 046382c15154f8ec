//! Provider selection: which providers may run a conversion, in which order.
//!
//! [`select_providers`] is pure: it sees only the rows, the conversion, the
//! volume already in flight and each provider's recent track record (see
//! [`super::health`]), so it can be driven by property tests and the
//! simulator. The rules, in the order they are reported:
//!
//! 1. status `active` (`inactive` and `degraded` are skipped);
//! 2. the row supports the direction;
//! 3. `min_amount <= amount <= max_amount`;
//! 4. daily cap: `daily_volume_used + in_flight + amount <= daily_volume_limit`
//!    (no limit → no cap);
//! 5. health: once the provider's recent track record (the job attempts it
//!    finished within the health window, [`super::health::track_records`])
//!    has `min_attempts` outcomes, its success rate must be at least
//!    `min_success_rate` (default 10 attempts, 80 %). The lifetime counters
//!    on the row are not judged, so a provider recovers when it does.
//!
//! Eligible providers are ordered by priority (lower first), then expected cost
//! ([`expected_cost`], lower first), then name, then id: the first is the choice,
//! the rest are the fallback order.
//!
//! With quotes ([`Selection::by_quotes`], what the executor does before every
//! choice): each eligible provider is asked for a price for the amount, and
//! the lowest all-in cost ([`all_in_cost`]: fee and spread as quoted, valued
//! at par) wins; equal prices keep the order above, and a provider that gave
//! no quote (down, or no quote API) comes after every provider that did. The
//! quotes compared are part of [`Selection::summary`], which the job stores
//! as its `selection_reason`.

use std::collections::HashMap;
use std::fmt;

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde::Serialize;
use uuid::Uuid;

use super::Quote;
use super::health::TrackRecord;
use super::row::{ProviderRow, ProviderStatus};
use crate::domain::ConversionDirection;

/// When a provider's track record makes it ineligible.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HealthRule {
    /// Below this many finished attempts the success rate is not judged.
    pub min_attempts: u64,
    /// Lowest acceptable `success / (success + failure)`, as a fraction.
    pub min_success_rate: Decimal,
}

impl Default for HealthRule {
    /// The original engine's rule: at least 80 % once 10 attempts exist.
    fn default() -> Self {
        Self {
            min_attempts: 10,
            min_success_rate: dec!(0.80),
        }
    }
}

impl HealthRule {
    /// Whether `successes` out of `successes + failures` passes the rule.
    pub fn is_healthy(&self, successes: i64, failures: i64) -> bool {
        let successes = successes.max(0);
        let attempts = successes.saturating_add(failures.max(0));
        if (attempts as u64) < self.min_attempts || attempts == 0 {
            return true;
        }
        // success / attempts >= rate  ⇔  success >= rate * attempts (exact).
        Decimal::from(successes) >= self.min_success_rate * Decimal::from(attempts)
    }
}

/// Why a provider cannot take a conversion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Rejection {
    /// Status is `inactive`.
    Inactive,
    /// Status is `degraded`.
    Degraded,
    /// The row does not support the direction.
    DirectionUnsupported {
        /// The direction asked for.
        direction: ConversionDirection,
    },
    /// The amount is below the provider's minimum.
    BelowMinimum {
        /// The provider's minimum.
        min: Decimal,
    },
    /// The amount is above the provider's maximum.
    AboveMaximum {
        /// The provider's maximum.
        max: Decimal,
    },
    /// Today's volume, with jobs in flight and this amount, would pass the cap.
    DailyCapExceeded {
        /// The provider's daily limit.
        limit: Decimal,
        /// Volume of jobs that ended today.
        used: Decimal,
        /// Volume of this provider's jobs still in flight.
        in_flight: Decimal,
    },
    /// The recent success rate is below the health rule.
    Unhealthy {
        /// Job attempts that completed within the health window.
        successes: i64,
        /// Job attempts that did not, within the health window.
        failures: i64,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Inactive => f.write_str("inactive"),
            Rejection::Degraded => f.write_str("degraded"),
            Rejection::DirectionUnsupported { direction } => {
                write!(f, "does not support {direction}")
            }
            Rejection::BelowMinimum { min } => write!(f, "below minimum {min}"),
            Rejection::AboveMaximum { max } => write!(f, "above maximum {max}"),
            Rejection::DailyCapExceeded {
                limit,
                used,
                in_flight,
            } => write!(
                f,
                "daily cap {limit} exceeded (used {used}, in flight {in_flight})"
            ),
            Rejection::Unhealthy {
                successes,
                failures,
            } => write!(f, "unhealthy ({successes} succeeded, {failures} failed)"),
        }
    }
}

/// An eligible provider with what it is expected to cost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RankedProvider {
    /// The provider's row.
    pub row: ProviderRow,
    /// [`expected_cost`] for the amount.
    pub expected_cost: Decimal,
    /// The provider's price for the amount, when it was asked
    /// ([`Selection::by_quotes`]).
    pub quote: Option<QuoteSeen>,
}

/// What a provider answered when asked for a price.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "quote", rename_all = "snake_case")]
pub enum QuoteSeen {
    /// A price.
    Priced {
        /// Destination units per source unit.
        rate: Decimal,
        /// Fee, in the source currency.
        fee: Decimal,
        /// [`all_in_cost`] of the amount at this price.
        all_in: Decimal,
    },
    /// No price (the provider is down, refused, or has no quote API).
    Failed {
        /// Why.
        error: String,
    },
}

impl QuoteSeen {
    /// The all-in cost, if priced.
    pub fn all_in(&self) -> Option<Decimal> {
        match self {
            QuoteSeen::Priced { all_in, .. } => Some(*all_in),
            QuoteSeen::Failed { .. } => None,
        }
    }
}

/// What converting `amount` at `quote` costs, in source units, valued at par
/// (one USDC = one USD, the peg both buffers are kept at): what leaves the
/// source minus what arrives, `amount − (amount − fee) × rate`. A cost too
/// large to represent is `Decimal::MAX`.
pub fn all_in_cost(amount: Decimal, quote: &Quote) -> Decimal {
    amount
        .checked_sub(quote.fee.value)
        .and_then(|net| net.checked_mul(quote.rate))
        .and_then(|arrives| amount.checked_sub(arrives))
        .unwrap_or(Decimal::MAX)
}

/// A provider that may not take the conversion, with every rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RejectedProvider {
    /// The provider's row.
    pub row: ProviderRow,
    /// Every broken rule, in rule order (never empty).
    pub reasons: Vec<Rejection>,
}

/// The outcome of [`select_providers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Selection {
    /// Eligible providers, best first: the choice, then the fallback order.
    pub eligible: Vec<RankedProvider>,
    /// Ineligible providers, in the order they were given.
    pub rejected: Vec<RejectedProvider>,
}

impl Selection {
    /// The best eligible provider, if any.
    pub fn chosen(&self) -> Option<&RankedProvider> {
        self.eligible.first()
    }

    /// Ranks the eligible providers by their quotes for `amount`: lowest
    /// [`all_in_cost`] first, equal prices in the order they had, providers
    /// without a quote (an error, or missing from `quotes`) after all that
    /// gave one, in the order they had. Deterministic.
    pub fn by_quotes(
        mut self,
        amount: Decimal,
        quotes: &HashMap<Uuid, Result<Quote, String>>,
    ) -> Selection {
        for p in &mut self.eligible {
            p.quote = Some(match quotes.get(&p.row.id) {
                Some(Ok(q)) => QuoteSeen::Priced {
                    rate: q.rate,
                    fee: q.fee.value,
                    all_in: all_in_cost(amount, q),
                },
                Some(Err(error)) => QuoteSeen::Failed {
                    error: error.clone(),
                },
                None => QuoteSeen::Failed {
                    error: "not asked".to_owned(),
                },
            });
        }
        // A stable sort: equal keys keep the priority order.
        self.eligible.sort_by_key(|p| {
            let all_in = p.quote.as_ref().and_then(QuoteSeen::all_in);
            (all_in.is_none(), all_in)
        });
        self
    }

    /// A one-line account of the choice, for logs and
    /// `conversion_jobs.selection_reason`, e.g.
    /// `chose Due (priority 1, cost 1.5); fallback: ZeroHash (priority 2, cost 2); rejected: Old (inactive)`.
    pub fn summary(&self) -> String {
        let ranked = |p: &RankedProvider| match &p.quote {
            None => format!(
                "{} (priority {}, cost {})",
                p.row.name,
                p.row.priority,
                p.expected_cost.normalize()
            ),
            Some(QuoteSeen::Priced { rate, fee, all_in }) => format!(
                "{} (priority {}, quote rate {} fee {}, all-in cost {})",
                p.row.name,
                p.row.priority,
                rate.normalize(),
                fee.normalize(),
                all_in.normalize()
            ),
            Some(QuoteSeen::Failed { error }) => format!(
                "{} (priority {}, no quote: {error})",
                p.row.name, p.row.priority
            ),
        };
        let mut parts = Vec::new();
        match self.eligible.split_first() {
            Some((first, rest)) => {
                parts.push(format!("chose {}", ranked(first)));
                if !rest.is_empty() {
                    let rest: Vec<_> = rest.iter().map(ranked).collect();
                    parts.push(format!("fallback: {}", rest.join(", ")));
                }
            }
            None => parts.push("no eligible provider".to_owned()),
        }
        if !self.rejected.is_empty() {
            let rejected: Vec<_> = self
                .rejected
                .iter()
                .map(|r| {
                    let reasons: Vec<_> = r.reasons.iter().map(ToString::to_string).collect();
                    format!("{} ({})", r.row.name, reasons.join(", "))
                })
                .collect();
            parts.push(format!("rejected: {}", rejected.join("; ")));
        }
        parts.join("; ")
    }
}

/// What converting `amount` at `row` is expected to cost, in source units:
/// `amount × fee_percentage + fee_fixed + amount × spread_bps / 10000`.
/// A cost too large to represent is `Decimal::MAX` (ranked last).
pub fn expected_cost(row: &ProviderRow, amount: Decimal) -> Decimal {
    let cost = || -> Option<Decimal> {
        let fee = amount.checked_mul(row.fee_percentage)?;
        let spread = amount
            .checked_mul(row.spread_bps)?
            .checked_div(Decimal::from(10_000))?;
        fee.checked_add(row.fee_fixed)?.checked_add(spread)
    };
    cost().unwrap_or(Decimal::MAX)
}

/// Every rule `row` breaks for this conversion (empty when eligible).
pub fn rejections(
    row: &ProviderRow,
    direction: ConversionDirection,
    amount: Decimal,
    in_flight: Decimal,
    record: TrackRecord,
    health: &HealthRule,
) -> Vec<Rejection> {
    let mut reasons = Vec::new();
    match row.status {
        ProviderStatus::Active => {}
        ProviderStatus::Inactive => reasons.push(Rejection::Inactive),
        ProviderStatus::Degraded => reasons.push(Rejection::Degraded),
    }
    if !row.supports(direction) {
        reasons.push(Rejection::DirectionUnsupported { direction });
    }
    if amount < row.min_amount {
        reasons.push(Rejection::BelowMinimum {
            min: row.min_amount,
        });
    }
    if amount > row.max_amount {
        reasons.push(Rejection::AboveMaximum {
            max: row.max_amount,
        });
    }
    if let Some(limit) = row.daily_volume_limit {
        let projected = row
            .daily_volume_used
            .checked_add(in_flight)
            .and_then(|v| v.checked_add(amount));
        if projected.is_none_or(|total| total > limit) {
            reasons.push(Rejection::DailyCapExceeded {
                limit,
                used: row.daily_volume_used,
                in_flight,
            });
        }
    }
    if !health.is_healthy(record.successes, record.failures) {
        reasons.push(Rejection::Unhealthy {
            successes: record.successes,
            failures: record.failures,
        });
    }
    reasons
}

/// Chooses among `candidates` for converting `amount` (source units) in
/// `direction`. `in_flight` is, per provider id, the volume of that provider's
/// jobs started today and not yet ended (missing = zero); `records` is, per
/// provider id, its recent track record (missing = no outcomes yet). Pure and
/// deterministic: the same inputs always give the same [`Selection`].
pub fn select_providers(
    candidates: &[ProviderRow],
    direction: ConversionDirection,
    amount: Decimal,
    in_flight: &HashMap<Uuid, Decimal>,
    records: &HashMap<Uuid, TrackRecord>,
    health: &HealthRule,
) -> Selection {
    let mut eligible = Vec::new();
    let mut rejected = Vec::new();
    for row in candidates {
        let flying = in_flight.get(&row.id).copied().unwrap_or(Decimal::ZERO);
        let record = records.get(&row.id).copied().unwrap_or_default();
        let reasons = rejections(row, direction, amount, flying, record, health);
        if reasons.is_empty() {
            eligible.push(RankedProvider {
                expected_cost: expected_cost(row, amount),
                row: row.clone(),
                quote: None,
            });
        } else {
            rejected.push(RejectedProvider {
                row: row.clone(),
                reasons,
            });
        }
    }
    eligible.sort_by(|a, b| {
        a.row
            .priority
            .cmp(&b.row.priority)
            .then(a.expected_cost.cmp(&b.expected_cost))
            .then_with(|| a.row.name.cmp(&b.row.name))
            .then_with(|| a.row.id.cmp(&b.row.id))
    });
    Selection { eligible, rejected }
}
