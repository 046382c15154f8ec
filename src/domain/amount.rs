//! Money amounts. `Amount<C>` carries its currency in its type, so adding USD
//! to USDC does not compile; `Money` is the same value with the currency known
//! only at run time (as it arrives in an event) and refuses to mix currencies.

use std::fmt;
use std::marker::PhantomData;
use std::ops::{Add, Neg, Sub};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::currency::{Currency, CurrencyUnit, Usd, Usdc};

/// Why a decimal could not become an amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("{currency} amount {value} has {scale} decimal places; at most {max} allowed")]
    TooPrecise {
        currency: Currency,
        value: Decimal,
        scale: u32,
        max: u32,
    },
    #[error("amount {0} must be greater than zero")]
    NotPositive(Decimal),
    #[error("currency mismatch: {left} and {right} cannot be combined")]
    CurrencyMismatch { left: Currency, right: Currency },
    #[error("amount {0} is beyond the largest supported magnitude (10^18)")]
    OutOfRange(Decimal),
    #[error("amount overflow")]
    Overflow,
}

/// The largest magnitude an amount may have. With at most six decimal places
/// this keeps every sum of amounts exact inside `Decimal`'s 28 digits.
pub const MAX_MAGNITUDE: Decimal = Decimal::from_parts(0xa764_0000, 0x0de0_b6b3, 0, false, 0);

fn in_range(value: Decimal) -> bool {
    value.abs() <= MAX_MAGNITUDE
}

/// An exact amount of currency `C` (may be negative: a balance or a delta).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Amount<C: CurrencyUnit> {
    value: Decimal,
    unit: PhantomData<C>,
}

/// Amount in US dollars.
pub type UsdAmount = Amount<Usd>;
/// Amount in USDC.
pub type UsdcAmount = Amount<Usdc>;

impl<C: CurrencyUnit> Amount<C> {
    /// Zero of this currency.
    pub const ZERO: Self = Self {
        value: Decimal::ZERO,
        unit: PhantomData,
    };

    /// Parses a decimal into an amount, refusing more decimal places than the currency has.
    pub fn new(value: Decimal) -> Result<Self, AmountError> {
        let value = value.normalize();
        if !in_range(value) {
            return Err(AmountError::OutOfRange(value));
        }
        if value.scale() > C::SCALE {
            return Err(AmountError::TooPrecise {
                currency: C::CURRENCY,
                value,
                scale: value.scale(),
                max: C::SCALE,
            });
        }
        Ok(Self {
            value,
            unit: PhantomData,
        })
    }

    /// Like [`Amount::new`], and also requires the amount to be greater than zero.
    pub fn positive(value: Decimal) -> Result<Self, AmountError> {
        let amount = Self::new(value)?;
        if amount.value <= Decimal::ZERO {
            return Err(AmountError::NotPositive(value));
        }
        Ok(amount)
    }

    /// The exact decimal value.
    pub fn value(self) -> Decimal {
        self.value
    }

    /// The currency this amount is in.
    pub fn currency(self) -> Currency {
        C::CURRENCY
    }

    /// Adds, returning `None` when the sum leaves the supported range.
    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.value
            .checked_add(other.value)
            .filter(|v| in_range(*v))
            .map(Self::raw)
    }

    /// Subtracts, returning `None` when the difference leaves the supported range.
    pub fn checked_sub(self, other: Self) -> Option<Self> {
        self.value
            .checked_sub(other.value)
            .filter(|v| in_range(*v))
            .map(Self::raw)
    }

    /// The smaller of two amounts.
    pub fn min(self, other: Self) -> Self {
        if self <= other { self } else { other }
    }

    /// The same value as a run-time-typed [`Money`].
    pub fn to_money(self) -> Money {
        Money {
            currency: C::CURRENCY,
            value: self.value,
        }
    }

    fn raw(value: Decimal) -> Self {
        Self {
            value,
            unit: PhantomData,
        }
    }
}

impl<C: CurrencyUnit> PartialOrd for Amount<C> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<C: CurrencyUnit> Ord for Amount<C> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.value.cmp(&other.value)
    }
}

impl<C: CurrencyUnit> Add for Amount<C> {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        self.checked_add(other)
            .expect("sum beyond the supported 10^18; use checked_add where that can happen")
    }
}

impl<C: CurrencyUnit> Sub for Amount<C> {
    type Output = Self;
    fn sub(self, other: Self) -> Self {
        self.checked_sub(other)
            .expect("sum beyond the supported 10^18; use checked_add where that can happen")
    }
}

impl<C: CurrencyUnit> Neg for Amount<C> {
    type Output = Self;
    fn neg(self) -> Self {
        Self::raw(-self.value)
    }
}

impl<C: CurrencyUnit> fmt::Debug for Amount<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.value, C::CODE)
    }
}

impl<C: CurrencyUnit> fmt::Display for Amount<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.value, C::CODE)
    }
}

/// An exact amount whose currency is known at run time. Arithmetic between two
/// `Money` values of different currencies is an error, never a silent sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub currency: Currency,
    #[serde(with = "rust_decimal::serde::str")]
    pub value: Decimal,
}

impl Money {
    /// Parses a value in `currency`, refusing more decimal places than the currency has.
    pub fn new(currency: Currency, value: Decimal) -> Result<Self, AmountError> {
        match currency {
            Currency::Usd => UsdAmount::new(value).map(|a| a.to_money()),
            Currency::Usdc => UsdcAmount::new(value).map(|a| a.to_money()),
        }
    }

    /// Like [`Money::new`], and also requires the amount to be greater than zero.
    pub fn positive(currency: Currency, value: Decimal) -> Result<Self, AmountError> {
        let money = Self::new(currency, value)?;
        if money.value <= Decimal::ZERO {
            return Err(AmountError::NotPositive(value));
        }
        Ok(money)
    }

    /// Zero in `currency`.
    pub fn zero(currency: Currency) -> Self {
        Self {
            currency,
            value: Decimal::ZERO,
        }
    }

    /// Adds two amounts of the same currency.
    pub fn checked_add(self, other: Money) -> Result<Money, AmountError> {
        self.same_currency(other)?;
        let value = self
            .value
            .checked_add(other.value)
            .filter(|v| in_range(*v))
            .ok_or(AmountError::Overflow)?;
        Ok(Money { value, ..self })
    }

    /// Subtracts an amount of the same currency.
    pub fn checked_sub(self, other: Money) -> Result<Money, AmountError> {
        self.checked_add(other.negate())
    }

    /// The same amount with the opposite sign.
    pub fn negate(self) -> Money {
        Money {
            value: -self.value,
            ..self
        }
    }

    /// Converts into a compile-time-typed amount if the currency matches.
    pub fn typed<C: CurrencyUnit>(self) -> Result<Amount<C>, AmountError> {
        if self.currency != C::CURRENCY {
            return Err(AmountError::CurrencyMismatch {
                left: self.currency,
                right: C::CURRENCY,
            });
        }
        Amount::new(self.value)
    }

    fn same_currency(self, other: Money) -> Result<(), AmountError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(AmountError::CurrencyMismatch {
                left: self.currency,
                right: other.currency,
            })
        }
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.value, self.currency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn usd_rejects_sub_cent_and_usdc_accepts_micro_units() {
        assert!(UsdAmount::new(dec!(1.001)).is_err());
        assert!(
            UsdAmount::new(dec!(1.010)).is_ok(),
            "trailing zeros are not precision"
        );
        assert!(UsdcAmount::new(dec!(1.000001)).is_ok());
        assert!(UsdcAmount::new(dec!(1.0000001)).is_err());
    }

    #[test]
    fn the_magnitude_bound_is_ten_to_the_eighteenth() {
        assert_eq!(MAX_MAGNITUDE, dec!(1_000_000_000_000_000_000));
        assert!(UsdAmount::new(MAX_MAGNITUDE).is_ok());
        assert!(UsdAmount::new(MAX_MAGNITUDE + dec!(0.01)).is_err());
    }

    #[test]
    fn money_refuses_to_mix_currencies() {
        let usd = Money::new(Currency::Usd, dec!(1)).unwrap();
        let usdc = Money::new(Currency::Usdc, dec!(1)).unwrap();
        assert!(matches!(
            usd.checked_add(usdc),
            Err(AmountError::CurrencyMismatch { .. })
        ));
    }
}
