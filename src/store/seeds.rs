//! The seed rows of the migrations (thresholds and providers), read from the
//! migration's own `INSERT … VALUES` statements, so the in-memory store starts
//! from exactly what PostgreSQL starts from and a change to a seed is made
//! once, in the migration.
//!
//! The reader understands what the seed statements use and nothing more:
//! a column list, tuples of quoted strings, numbers, `TRUE`/`FALSE`/`NULL`.

use std::collections::BTreeMap;
use std::str::FromStr;

use rust_decimal::Decimal;
use uuid::Uuid;

use crate::domain::{BufferAccount, Thresholds};
use crate::providers::{ProviderRow, ProviderStatus};

/// The migration holding the seeds.
const CORE_MIGRATION: &str = include_str!("../../migrations/20261125000001_treasury_core.sql");

/// A seed statement the reader cannot follow: the migration and this reader
/// disagree, which the store tests catch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seed rows of {table}: {reason}")]
pub struct SeedError {
    pub table: String,
    pub reason: String,
}

/// One seeded buffer: thresholds and `conversion_batch_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSeed {
    pub account: BufferAccount,
    pub thresholds: Thresholds,
    pub batch_size: Decimal,
}

/// The seeded buffers, in the migration's order.
pub fn buffers() -> Result<Vec<BufferSeed>, SeedError> {
    let table = "buffer_thresholds";
    rows(CORE_MIGRATION, table)?
        .iter()
        .map(|row| {
            let field = Field { table, row };
            let thresholds = Thresholds::new(
                field.parse("min_threshold")?,
                field.parse("target_threshold")?,
                field.parse("max_threshold")?,
            )
            .map_err(|e| field.error(e))?;
            Ok(BufferSeed {
                account: field.parse("account_type")?,
                thresholds,
                batch_size: field.parse("conversion_batch_size")?,
            })
        })
        .collect()
}

/// The seeded providers, in the migration's order, with no volume or
/// counts yet (columns the statement leaves out take the table's defaults).
pub fn providers() -> Result<Vec<ProviderRow>, SeedError> {
    let table = "conversion_providers";
    rows(CORE_MIGRATION, table)?
        .iter()
        .map(|row| {
            let field = Field { table, row };
            Ok(ProviderRow {
                id: field.parse::<Uuid>("id")?,
                name: field.text("name")?.to_owned(),
                provider_type: field.text("provider_type")?.to_owned(),
                priority: field.parse("priority")?,
                status: field.parse::<ProviderStatus>("status")?,
                supports_usdc_to_usd: field.boolean("supports_usdc_to_usd")?,
                supports_usd_to_usdc: field.boolean("supports_usd_to_usdc")?,
                supports_usd_transfer: false,
                min_amount: field.parse("min_conversion_amount")?,
                max_amount: field.parse("max_conversion_amount")?,
                daily_volume_limit: field.optional("daily_volume_limit")?,
                daily_volume_used: Decimal::ZERO,
                success_count: 0,
                failure_count: 0,
                fee_percentage: field.parse("fee_percentage")?,
                fee_fixed: field.parse("fee_fixed")?,
                spread_bps: field.parse("spread_bps")?,
                credentials_ref: field.optional_text("credentials_ref")?,
                base_url: field.optional_text("base_url")?,
            })
        })
        .collect()
}

/// A literal as written: `None` for `NULL`, the text of a quoted string
/// without its quotes, or the bare token.
type Row = BTreeMap<String, Option<String>>;

struct Field<'a> {
    table: &'a str,
    row: &'a Row,
}

impl Field<'_> {
    fn error(&self, reason: impl std::fmt::Display) -> SeedError {
        SeedError {
            table: self.table.to_owned(),
            reason: reason.to_string(),
        }
    }

    fn raw(&self, column: &str) -> Result<Option<&str>, SeedError> {
        self.row
            .get(column)
            .map(|v| v.as_deref())
            .ok_or_else(|| self.error(format!("no column {column}")))
    }

    fn text(&self, column: &str) -> Result<&str, SeedError> {
        self.raw(column)?
            .ok_or_else(|| self.error(format!("{column} is NULL")))
    }

    fn optional_text(&self, column: &str) -> Result<Option<String>, SeedError> {
        match self.row.get(column) {
            None => Ok(None),
            Some(v) => Ok(v.clone()),
        }
    }

    fn parse<T: FromStr>(&self, column: &str) -> Result<T, SeedError>
    where
        T::Err: std::fmt::Display,
    {
        let text = self.text(column)?;
        text.parse()
            .map_err(|e: T::Err| self.error(format!("{column} = {text:?}: {e}")))
    }

    fn optional(&self, column: &str) -> Result<Option<Decimal>, SeedError> {
        match self.raw(column)? {
            None => Ok(None),
            Some(_) => self.parse(column).map(Some),
        }
    }

    fn boolean(&self, column: &str) -> Result<bool, SeedError> {
        match self.text(column)?.to_ascii_uppercase().as_str() {
            "TRUE" => Ok(true),
            "FALSE" => Ok(false),
            other => Err(self.error(format!("{column} = {other:?} is not TRUE or FALSE"))),
        }
    }
}

/// The rows of the first `INSERT INTO table (…) VALUES (…), …` in `sql`.
fn rows(sql: &str, table: &str) -> Result<Vec<Row>, SeedError> {
    let error = |reason: &str| SeedError {
        table: table.to_owned(),
        reason: reason.to_owned(),
    };
    let start = sql
        .find(&format!("INSERT INTO {table}"))
        .ok_or_else(|| error("no INSERT statement"))?;
    let statement = &sql[start..];
    let statement = &statement[..statement.find(';').unwrap_or(statement.len())];
    let open = statement.find('(').ok_or_else(|| error("no column list"))?;
    let close = statement[open..]
        .find(')')
        .map(|i| open + i)
        .ok_or_else(|| error("unclosed column list"))?;
    let columns: Vec<String> = statement[open + 1..close]
        .split(',')
        .map(|c| c.trim().to_owned())
        .collect();
    let rest = &statement[close + 1..];
    let values = rest.find("VALUES").ok_or_else(|| error("no VALUES"))?;
    let tuples = tuples(&rest[values + "VALUES".len()..]).map_err(|e| error(&e))?;
    tuples
        .into_iter()
        .map(|literals| {
            if literals.len() != columns.len() {
                return Err(error(&format!(
                    "a row has {} values for {} columns",
                    literals.len(),
                    columns.len()
                )));
            }
            Ok(columns.iter().cloned().zip(literals).collect())
        })
        .collect()
}

/// The parenthesised tuples at the start of `text` (up to `ON CONFLICT` or
/// the end), each as its literals.
fn tuples(text: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    let mut current: Option<Vec<Option<String>>> = None;
    let mut token = String::new();
    let mut quoted: Option<String> = None;
    while let Some((i, c)) = chars.next() {
        if let Some(q) = quoted.as_mut() {
            if c == '\'' {
                if chars.peek().is_some_and(|(_, n)| *n == '\'') {
                    chars.next();
                    q.push('\'');
                } else {
                    token = format!("'{q}");
                    quoted = None;
                }
            } else {
                q.push(c);
            }
            continue;
        }
        match (c, current.as_mut()) {
            ('(', None) => current = Some(Vec::new()),
            ('\'', Some(_)) => quoted = Some(String::new()),
            (',' | ')', Some(values)) => {
                values.push(literal(token.trim()));
                token.clear();
                if c == ')' {
                    out.extend(current.take());
                }
            }
            (_, Some(_)) => token.push(c),
            (',', None) => {}
            (_, None) if c.is_whitespace() => {}
            (_, None) => {
                if text[i..].starts_with("ON CONFLICT") {
                    break;
                }
                return Err(format!("unexpected {c:?} between rows"));
            }
        }
    }
    if current.is_some() || quoted.is_some() {
        return Err("unterminated row".into());
    }
    Ok(out)
}

/// A literal's value: `None` for NULL, a quoted string's text, else the token.
fn literal(token: &str) -> Option<String> {
    if let Some(text) = token.strip_prefix('\'') {
        Some(text.to_owned())
    } else if token.eq_ignore_ascii_case("NULL") {
        None
    } else {
        Some(token.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    #[test]
    fn the_buffer_seeds_are_the_migrations() {
        let buffers = buffers().unwrap();
        assert_eq!(buffers.len(), 3);
        let usdc = buffers
            .iter()
            .find(|b| b.account == BufferAccount::SystemBufferUsdc)
            .unwrap();
        assert_eq!(
            (
                usdc.thresholds.min(),
                usdc.thresholds.target(),
                usdc.thresholds.max(),
                usdc.batch_size
            ),
            (dec!(10000), dec!(50000), dec!(100000), dec!(20000))
        );
    }

    #[test]
    fn the_provider_seeds_are_the_migrations() {
        let providers = providers().unwrap();
        let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["Due", "ZeroHash"]);
        let due = &providers[0];
        assert_eq!(due.daily_volume_limit, Some(dec!(5000000)));
        assert_eq!(due.credentials_ref.as_deref(), Some("DUE_API_KEY"));
        assert_eq!(due.base_url, None);
        let zerohash = &providers[1];
        assert_eq!(
            (zerohash.priority, zerohash.min_amount, zerohash.max_amount),
            (2, dec!(100), dec!(1000000))
        );
    }

    #[test]
    fn quoted_text_nulls_and_refusals() {
        let sql = "INSERT INTO t (a, b, c) VALUES ('it''s, here', NULL, 1.5), ('x', 'y', 2) ON CONFLICT DO NOTHING;";
        let read = rows(sql, "t").unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[0]["a"].as_deref(), Some("it's, here"));
        assert_eq!(read[0]["b"], None);
        assert_eq!(read[1]["c"].as_deref(), Some("2"));
        assert!(rows("INSERT INTO t (a, b) VALUES (1);", "t").is_err());
        assert!(rows("INSERT INTO t (a) VALUES (1", "t").is_err());
        assert!(rows("SELECT 1;", "t").is_err());
    }
}
