//! Ledger postings for completed conversions. Double entry, balanced per
//! currency: the source buffer is credited with what left it, the destination
//! buffer debited with what arrived; a conversion clearing account in each
//! currency carries the cross-currency leg, and the fee is its own entry.
//!
//! For `usdc_to_usd` of S USDC with fee F USDC, arriving as D USD:
//!
//! | account                    | debit    | credit |
//! |----------------------------|----------|--------|
//! | system_buffer_usdc         |          | S USDC |
//! | conversion_clearing_usdc   | S−F USDC |        |
//! | conversion_fees_usdc       | F USDC   |        |
//! | destination buffer         | D USD    |        |
//! | conversion_clearing_usd    |          | D USD  |
//!
//! A `usd_transfer` of S USD with fee F USD, arriving as D = S − F USD,
//! changes no currency and so needs no clearing account:
//!
//! | account                    | debit    | credit |
//! |----------------------------|----------|--------|
//! | source USD buffer          |          | S USD  |
//! | transfer_fees_usd          | F USD    |        |
//! | destination USD buffer     | D USD    |        |
//!
//! (a transfer that delivers anything but S − F keeps the clearing lines,
//! so the difference stays visible).
//!
//! Pure: the executor writes the posting with the job's completion.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::domain::{
    BufferAccount, ConversionDirection, ConversionJob, Currency, EntrySide, LedgerEntry,
    LedgerPosting, Money, PostingError,
};

/// Namespace of posting ids: UUIDv5 over the job id (one posting set per job).
const POSTING_ID_NAMESPACE: Uuid = Uuid::from_u128(0x9d2e_4f61_7a83_4b95_a6c7_d8e9_f0a1_b2c3);

/// What the provider reported at completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    pub destination_amount: Money,
    /// In the source currency.
    pub fee: Money,
    pub rate: Decimal,
}

/// Why a posting could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error("destination amount is in {got}, the conversion delivers {want}")]
    WrongDestinationCurrency { got: Currency, want: Currency },
    #[error("fee is in {got}, fees are charged in the source currency {want}")]
    WrongFeeCurrency { got: Currency, want: Currency },
    #[error("fee {fee} is not below the amount sent {amount}")]
    FeeTooLarge { fee: Decimal, amount: Decimal },
    #[error("destination amount must be positive, got {0}")]
    NothingArrived(Decimal),
    #[error(transparent)]
    Unbalanced(#[from] PostingError),
}

fn clearing(currency: Currency) -> String {
    format!(
        "conversion_clearing_{}",
        currency.code().to_ascii_lowercase()
    )
}

fn fees(direction: ConversionDirection, currency: Currency) -> String {
    let kind = if direction.is_conversion() {
        "conversion"
    } else {
        "transfer"
    };
    format!("{kind}_fees_{}", currency.code().to_ascii_lowercase())
}

/// The posting for a completed job, checked to balance per currency.
pub fn posting_for(
    job: &ConversionJob,
    settled: &Settlement,
    posted_at: DateTime<Utc>,
) -> Result<LedgerPosting, LedgerError> {
    let source = job.direction.source_currency();
    let destination = job.direction.destination_currency();
    if settled.destination_amount.currency != destination {
        return Err(LedgerError::WrongDestinationCurrency {
            got: settled.destination_amount.currency,
            want: destination,
        });
    }
    if settled.fee.currency != source {
        return Err(LedgerError::WrongFeeCurrency {
            got: settled.fee.currency,
            want: source,
        });
    }
    if settled.fee.value < Decimal::ZERO || settled.fee.value >= job.amount.value {
        return Err(LedgerError::FeeTooLarge {
            fee: settled.fee.value,
            amount: job.amount.value,
        });
    }
    if settled.destination_amount.value <= Decimal::ZERO {
        return Err(LedgerError::NothingArrived(
            settled.destination_amount.value,
        ));
    }
    let line = |account: String, side, amount: Money, memo: &str| LedgerEntry {
        account,
        side,
        amount,
        memo: memo.to_owned(),
    };
    let converted = Money {
        currency: source,
        value: job.amount.value - settled.fee.value,
    };
    let cleared = job.direction.is_conversion() || converted != settled.destination_amount;
    let mut entries = vec![line(
        job.source_account.as_str().into(),
        EntrySide::Credit,
        job.amount,
        "sent to the provider",
    )];
    if cleared {
        entries.push(line(
            clearing(source),
            EntrySide::Debit,
            converted,
            "converted at the provider",
        ));
    }
    if settled.fee.value > Decimal::ZERO {
        entries.push(line(
            fees(job.direction, source),
            EntrySide::Debit,
            settled.fee,
            "provider fee",
        ));
    }
    entries.push(line(
        job.destination_account.as_str().into(),
        EntrySide::Debit,
        settled.destination_amount,
        "received from the provider",
    ));
    if cleared {
        entries.push(line(
            clearing(destination),
            EntrySide::Credit,
            settled.destination_amount,
            "converted at the provider",
        ));
    }
    let posting = LedgerPosting {
        posting_id: Uuid::new_v5(&POSTING_ID_NAMESPACE, job.id.as_bytes()),
        idempotency_key: job.id.to_string(),
        job_id: job.id,
        description: format!(
            "{} {} → {} {} ({}) via {}",
            job.amount,
            job.source_account,
            settled.destination_amount,
            job.destination_account,
            job.direction,
            job.provider_name.as_deref().unwrap_or("unknown provider")
        ),
        exchange_rate: settled.rate,
        entries,
        posted_at,
    };
    posting.check_balanced()?;
    Ok(posting)
}

/// What a posting does to the buffer balances: one signed change per buffer
/// entry (a debit is money that arrived in the buffer, a credit money that
/// left it). Clearing and fee accounts are not buffers and are left out.
pub fn buffer_movements(posting: &LedgerPosting) -> Vec<(BufferAccount, Decimal)> {
    posting
        .entries
        .iter()
        .filter_map(|entry| {
            let account: BufferAccount = entry.account.parse().ok()?;
            let delta = match entry.side {
                EntrySide::Debit => entry.amount.value,
                EntrySide::Credit => -entry.amount.value,
            };
            Some((account, delta))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{BufferAccount, ConversionCommand, ConversionDirection, ConversionTrigger};
    use rust_decimal_macros::dec;

    fn job() -> ConversionJob {
        ConversionJob::from_command(&ConversionCommand {
            command_id: Uuid::from_u128(7),
            direction: ConversionDirection::UsdcToUsd,
            trigger: ConversionTrigger::Emergency,
            amount: Money::positive(Currency::Usdc, dec!(50000)).unwrap(),
            source_account: BufferAccount::SystemBufferUsdc,
            destination_account: BufferAccount::BrokerOperational,
            cycle_id: "window:x".into(),
            created_at: Utc::now(),
        })
    }

    #[test]
    fn a_conversion_with_a_fee_balances_per_currency() {
        let settled = Settlement {
            destination_amount: Money::positive(Currency::Usd, dec!(49947.50)).unwrap(),
            fee: Money::positive(Currency::Usdc, dec!(50)).unwrap(),
            rate: dec!(0.99995),
        };
        let posting = posting_for(&job(), &settled, Utc::now()).unwrap();
        assert_eq!(posting.entries.len(), 5, "fee has its own entry");
        assert_eq!(posting.idempotency_key, job().id.to_string());
        assert_eq!(
            posting,
            posting_for(&job(), &settled, posting.posted_at).unwrap()
        );
    }

    #[test]
    fn a_posting_moves_the_source_down_and_the_destination_up() {
        let settled = Settlement {
            destination_amount: Money::positive(Currency::Usd, dec!(49947.50)).unwrap(),
            fee: Money::positive(Currency::Usdc, dec!(50)).unwrap(),
            rate: dec!(0.99995),
        };
        let posting = posting_for(&job(), &settled, Utc::now()).unwrap();
        assert_eq!(
            buffer_movements(&posting),
            vec![
                (BufferAccount::SystemBufferUsdc, dec!(-50000)),
                (BufferAccount::BrokerOperational, dec!(49947.50)),
            ]
        );
    }

    #[test]
    fn a_fee_in_the_wrong_currency_is_refused() {
        let settled = Settlement {
            destination_amount: Money::positive(Currency::Usd, dec!(49947.50)).unwrap(),
            fee: Money::positive(Currency::Usd, dec!(50)).unwrap(),
            rate: dec!(1),
        };
        assert!(matches!(
            posting_for(&job(), &settled, Utc::now()),
            Err(LedgerError::WrongFeeCurrency { .. })
        ));
    }
}
