//! Reading provider JSON without ever rounding money.
//!
//! `serde_json` (as this crate builds it) turns a JSON number such as
//! `1000.10` into an `f64`, which cannot hold most decimal fractions exactly.
//! [`parse_lossless`] therefore rewrites every bare number literal into a JSON
//! string holding the same text *before* parsing, so `1000.10` arrives as the
//! string `"1000.10"` and [`decimal_at`] turns it into exactly `1000.10`.
//! Providers that already send amounts as strings are unaffected.
//!
//! A consequence worth knowing: in the parsed [`Value`] (and so in
//! `ProviderConversion::raw`) every number is a string with its original text.
//! Nothing is lost; only the JSON type changes.

use std::str::FromStr;

use rust_decimal::Decimal;
use serde_json::Value;

use super::ProviderError;
use crate::domain::{Currency, Money};

/// Parses a JSON document, keeping every number literal as a string with its
/// exact original text (see the module documentation).
///
/// Fails with the parser's message when the bytes are not UTF-8 JSON.
pub fn parse_lossless(bytes: &[u8]) -> Result<Value, String> {
    let mut out = Vec::with_capacity(bytes.len() + 32);
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                out.push(b);
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len()
                    && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                {
                    i += 1;
                }
                out.push(b'"');
                out.extend_from_slice(&bytes[start..i]);
                out.push(b'"');
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    serde_json::from_slice(&out).map_err(|e| e.to_string())
}

/// Parses decimal text exactly: plain (`"49985.123456"`) or scientific
/// (`"1.5e3"`). More than 28 significant digits is refused, never rounded.
pub fn parse_decimal(text: &str) -> Option<Decimal> {
    let text = text.trim();
    Decimal::from_str_exact(text)
        .ok()
        .or_else(|| Decimal::from_scientific(text).ok())
}

/// The decimal at JSON `pointer` (RFC 6901, e.g. `/destination/amount`), or
/// `None` when the field is missing or `null`.
///
/// A present field that is not an exact decimal is a
/// [`ProviderError::Protocol`] error naming the field.
pub fn optional_decimal_at(body: &Value, pointer: &str) -> Result<Option<Decimal>, ProviderError> {
    match body.pointer(pointer) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) => parse_decimal(s).map(Some).ok_or_else(|| {
            ProviderError::Protocol(format!("field {pointer} is not a decimal: {s:?}"))
        }),
        Some(other) => Err(ProviderError::Protocol(format!(
            "field {pointer} is not a decimal: {other}"
        ))),
    }
}

/// The decimal at JSON `pointer`; missing, `null` or malformed is a
/// [`ProviderError::Protocol`] error naming the field.
pub fn decimal_at(body: &Value, pointer: &str) -> Result<Decimal, ProviderError> {
    optional_decimal_at(body, pointer)?
        .ok_or_else(|| ProviderError::Protocol(format!("missing decimal field {pointer}")))
}

/// The non-empty string at JSON `pointer`; anything else is a
/// [`ProviderError::Protocol`] error naming the field.
pub fn str_at<'a>(body: &'a Value, pointer: &str) -> Result<&'a str, ProviderError> {
    match body.pointer(pointer) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(other) => Err(ProviderError::Protocol(format!(
            "field {pointer} is not a non-empty string: {other}"
        ))),
        None => Err(ProviderError::Protocol(format!("missing field {pointer}"))),
    }
}

/// The string at JSON `pointer`, or `None` when missing, `null` or not a string.
pub fn optional_str_at<'a>(body: &'a Value, pointer: &str) -> Option<&'a str> {
    body.pointer(pointer).and_then(Value::as_str)
}

/// A currency code as providers write it: `USD`, `usdc`, or a networked
/// USDC asset such as `USDC.ETH`. Anything else is a
/// [`ProviderError::Protocol`] error.
pub fn parse_currency(code: &str) -> Result<Currency, ProviderError> {
    let upper = code.trim().to_ascii_uppercase();
    let base = upper.split(['.', '-', '_']).next().unwrap_or_default();
    Currency::from_str(base)
        .map_err(|_| ProviderError::Protocol(format!("unknown currency {code:?}")))
}

/// Builds an amount a provider reported, refusing (never rounding) a value
/// with more decimal places than `currency` has, or a negative one.
pub fn provider_money(
    currency: Currency,
    value: Decimal,
    what: &str,
) -> Result<Money, ProviderError> {
    if value.is_sign_negative() && !value.is_zero() {
        return Err(ProviderError::Protocol(format!(
            "{what} {value} {currency} is negative"
        )));
    }
    Money::new(currency, value).map_err(|e| ProviderError::Protocol(format!("{what}: {e}")))
}

/// The text an amount is sent to a provider as: the exact value written with
/// the currency's number of decimal places (`1000.1 USD` → `"1000.10"`).
pub fn amount_text(amount: &Money) -> String {
    let mut value = amount.value;
    let scale = amount.currency.scale();
    if value.scale() < scale {
        value.rescale(scale);
    }
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;
    use serde_json::json;

    #[test]
    fn numbers_keep_their_exact_text() {
        let v = parse_lossless(
            br#"{"a": 1000.10, "b": [-0.1, 2e3], "c": "x\"1.5", "d": true, "e": null}"#,
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"a": "1000.10", "b": ["-0.1", "2e3"], "c": "x\"1.5", "d": true, "e": null})
        );
        assert_eq!(decimal_at(&v, "/a").unwrap(), dec!(1000.10));
        assert_eq!(decimal_at(&v, "/a").unwrap().to_string(), "1000.10");
        assert_eq!(decimal_at(&v, "/b/1").unwrap(), dec!(2000));
    }

    #[test]
    fn a_long_fraction_is_exact_not_binary_rounded() {
        let v = parse_lossless(br#"{"rate": 0.99970000000000000001}"#).unwrap();
        assert_eq!(
            decimal_at(&v, "/rate").unwrap(),
            dec!(0.99970000000000000001)
        );
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(parse_lossless(b"<html>oops</html>").is_err());
        assert!(parse_lossless(b"{\"a\": 12abc}").is_err());
        let v = json!({"a": "twelve"});
        assert!(matches!(
            decimal_at(&v, "/a"),
            Err(ProviderError::Protocol(_))
        ));
        assert!(matches!(
            decimal_at(&v, "/missing"),
            Err(ProviderError::Protocol(_))
        ));
    }

    #[test]
    fn amounts_are_written_with_the_currency_scale() {
        let usd = Money::new(Currency::Usd, dec!(1000.1)).unwrap();
        assert_eq!(amount_text(&usd), "1000.10");
        let usdc = Money::new(Currency::Usdc, dec!(5.000001)).unwrap();
        assert_eq!(amount_text(&usdc), "5.000001");
    }

    #[test]
    fn currencies_parse_with_network_suffixes() {
        assert_eq!(parse_currency("USDC.ETH").unwrap(), Currency::Usdc);
        assert_eq!(parse_currency("usd").unwrap(), Currency::Usd);
        assert!(parse_currency("EUR").is_err());
    }

    #[test]
    fn provider_money_refuses_excess_precision() {
        assert!(provider_money(Currency::Usd, dec!(1.001), "fee").is_err());
        assert!(provider_money(Currency::Usd, dec!(-1), "fee").is_err());
        assert_eq!(
            provider_money(Currency::Usd, dec!(1.10), "fee")
                .unwrap()
                .value,
            dec!(1.1)
        );
    }
}
