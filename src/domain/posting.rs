//! Double-entry ledger postings. A posting balances per currency: for each
//! currency, debits equal credits. A conversion's cross-currency leg goes
//! through a clearing account in each currency; fees are their own entries.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::amount::Money;
use super::currency::Currency;

/// Debit or credit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntrySide {
    Debit,
    Credit,
}

/// One line of a posting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Ledger account name, e.g. `system_buffer_usdc` or `conversion_clearing_usd`.
    pub account: String,
    pub side: EntrySide,
    /// Always positive; the side says which way it moves.
    pub amount: Money,
    pub memo: String,
}

/// A set of entries that post together, idempotent on `idempotency_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerPosting {
    pub posting_id: Uuid,
    /// The conversion job id: one posting set per job, ever.
    pub idempotency_key: String,
    pub job_id: Uuid,
    pub description: String,
    /// Destination units per source unit, as executed.
    #[serde(with = "rust_decimal::serde::str")]
    pub exchange_rate: Decimal,
    pub entries: Vec<LedgerEntry>,
    pub posted_at: DateTime<Utc>,
}

/// Why a posting does not balance.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PostingError {
    #[error("posting has no entries")]
    Empty,
    #[error("entry amounts must be positive (account {0})")]
    NonPositiveEntry(String),
    #[error("{currency} totals overflow")]
    Overflow { currency: Currency },
    #[error("{currency} does not balance: debits {debits}, credits {credits}")]
    Unbalanced {
        currency: Currency,
        debits: Decimal,
        credits: Decimal,
    },
}

impl LedgerPosting {
    /// Checks that every entry is positive and that, per currency, debits equal credits.
    pub fn check_balanced(&self) -> Result<(), PostingError> {
        if self.entries.is_empty() {
            return Err(PostingError::Empty);
        }
        let mut totals: BTreeMap<Currency, (Decimal, Decimal)> = BTreeMap::new();
        for entry in &self.entries {
            if entry.amount.value <= Decimal::ZERO
                || entry.amount.value > super::amount::MAX_MAGNITUDE
            {
                return Err(PostingError::NonPositiveEntry(entry.account.clone()));
            }
            let currency = entry.amount.currency;
            let total = totals.entry(currency).or_default();
            let side = match entry.side {
                EntrySide::Debit => &mut total.0,
                EntrySide::Credit => &mut total.1,
            };
            *side = side
                .checked_add(entry.amount.value)
                .filter(|v| v.abs() <= super::amount::MAX_MAGNITUDE)
                .ok_or(PostingError::Overflow { currency })?;
        }
        for (currency, (debits, credits)) in totals {
            if debits != credits {
                return Err(PostingError::Unbalanced {
                    currency,
                    debits,
                    credits,
                });
            }
        }
        Ok(())
    }
}
