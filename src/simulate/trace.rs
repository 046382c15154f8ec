//! Reading and writing flow traces: the deposits and withdrawals a simulation
//! replays, as CSV (`event_id,kind,currency,amount,occurred_at`) or JSON Lines
//! with the same fields, each optionally gzip-compressed (`.gz` on top of
//! `.csv`, `.jsonl` or `.ndjson`).
//!
//! A trace is input data: every row is validated with the domain's own rules
//! ([`Money`] at the currency's scale, amounts greater than zero, RFC 3339
//! times converted to UTC) and a bad row is reported with the file, the line
//! and the column. An `event_id` that is a UUID is used as it is; any other
//! non-empty string is mapped to a UUIDv5 in [`EVENT_ID_NAMESPACE`], so the
//! same trace always gives the same event ids.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use chrono::{DateTime, SecondsFormat, Utc};
use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use rust_decimal::Decimal;
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::domain::{AmountError, Currency, FlowEvent, FlowKind, Money};

/// The CSV header a trace must start with, and the JSON Lines field names.
pub const HEADER: &str = "event_id,kind,currency,amount,occurred_at";

/// The columns of a trace, in header order.
pub const COLUMNS: [&str; 5] = ["event_id", "kind", "currency", "amount", "occurred_at"];

/// Namespace of the UUIDv5 given to an `event_id` that is not itself a UUID.
pub const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5f0c_2a61_8d3e_4b7a_9c14_e6b2_d0a9_7f31);

/// A trace read from a file: its events in time order and the rows skipped.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trace {
    /// Events stably sorted by `occurred_at` (rows with equal times keep file order).
    pub events: Vec<FlowEvent>,
    /// Rows refused, in file order (empty unless read with `skip_bad`).
    pub skipped: Vec<BadRow>,
}

/// One row of a trace that could not become an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// The file, as the caller named it.
    pub file: String,
    /// 1-based line number; in CSV the header is line 1.
    pub line: usize,
    /// The column at fault (`row` when the row as a whole is malformed).
    pub column: String,
    /// What is wrong with the value, quoting it.
    pub reason: String,
}

impl fmt::Display for BadRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} line {}, column {}: {}",
            self.file, self.line, self.column, self.reason
        )
    }
}

/// Why a trace could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The extension names no trace format.
    #[error(
        "{0}: unknown trace format (expected a name ending in .csv, .jsonl or .ndjson, optionally followed by .gz)"
    )]
    UnknownFormat(PathBuf),
    /// The file could not be opened or read.
    #[error("cannot read trace {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file could not be created or written.
    #[error("cannot write trace {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A CSV trace does not start with [`HEADER`].
    #[error("{path} line 1: expected the header \"{HEADER}\", found {found:?}")]
    Header { path: PathBuf, found: String },
    /// A row is invalid (and rows were not being skipped).
    #[error("{0}")]
    BadRow(BadRow),
}

/// The encoding of a trace file, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceFormat {
    /// Comma-separated values with [`HEADER`].
    Csv,
    /// One JSON object per line.
    JsonLines,
}

/// A trace file's format and whether it is gzip-compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceKind {
    /// How rows are encoded.
    pub format: TraceFormat,
    /// Whether the file is gzip-compressed (`.gz`).
    pub gzip: bool,
}

impl TraceKind {
    /// The kind named by `path`'s extension(s), case-insensitively.
    pub fn of(path: &Path) -> Result<TraceKind, TraceError> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let (stem, gzip) = match name.strip_suffix(".gz") {
            Some(stem) => (stem, true),
            None => (name.as_str(), false),
        };
        let format = if stem.ends_with(".csv") {
            TraceFormat::Csv
        } else if stem.ends_with(".jsonl") || stem.ends_with(".ndjson") {
            TraceFormat::JsonLines
        } else {
            return Err(TraceError::UnknownFormat(path.to_path_buf()));
        };
        Ok(TraceKind { format, gzip })
    }
}

/// Reads a trace. Without `skip_bad` the first bad row is an error; with it,
/// bad rows are listed in [`Trace::skipped`] and the rest are read. A missing
/// or wrong header and an unreadable file are errors either way.
pub fn read_trace(path: &Path, skip_bad: bool) -> Result<Trace, TraceError> {
    let kind = TraceKind::of(path)?;
    let file = File::open(path).map_err(|source| read_error(path, source))?;
    let input: Box<dyn Read> = if kind.gzip {
        Box::new(MultiGzDecoder::new(BufReader::with_capacity(1 << 16, file)))
    } else {
        Box::new(file)
    };
    let mut sink = RowSink::new(path, skip_bad);
    match kind.format {
        TraceFormat::Csv => read_csv(input, &mut sink)?,
        TraceFormat::JsonLines => read_json_lines(input, &mut sink)?,
    }
    Ok(sink.finish())
}

/// Writes `events` to `path` in the format its name chooses (see [`TraceKind`]).
/// Reading the file back gives the same events.
pub fn write_trace(path: &Path, events: &[FlowEvent]) -> Result<(), TraceError> {
    let kind = TraceKind::of(path)?;
    let file = File::create(path).map_err(|source| write_error(path, source))?;
    let result = if kind.gzip {
        let encoder = GzEncoder::new(file, Compression::fast());
        let mut out = BufWriter::with_capacity(1 << 16, encoder);
        write_rows(&mut out, kind.format, events)
            .and_then(|()| out.into_inner().map_err(|e| e.into_error()))
            .and_then(GzEncoder::finish)
            .map(drop)
    } else {
        let mut out = BufWriter::with_capacity(1 << 16, file);
        write_rows(&mut out, kind.format, events).and_then(|()| out.flush())
    };
    result.map_err(|source| write_error(path, source))
}

fn read_error(path: &Path, source: io::Error) -> TraceError {
    TraceError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn write_error(path: &Path, source: io::Error) -> TraceError {
    TraceError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn write_rows(out: &mut impl Write, format: TraceFormat, events: &[FlowEvent]) -> io::Result<()> {
    if format == TraceFormat::Csv {
        writeln!(out, "{HEADER}")?;
    }
    for event in events {
        let time = event
            .occurred_at
            .to_rfc3339_opts(SecondsFormat::AutoSi, true);
        let amount = event.amount.value.normalize();
        let (id, kind, currency) = (
            event.event_id,
            event.kind.as_str(),
            event.amount.currency.code(),
        );
        match format {
            TraceFormat::Csv => writeln!(out, "{id},{kind},{currency},{amount},{time}")?,
            TraceFormat::JsonLines => writeln!(
                out,
                r#"{{"event_id":"{id}","kind":"{kind}","currency":"{currency}","amount":"{amount}","occurred_at":"{time}"}}"#
            )?,
        }
    }
    Ok(())
}

/// Collects parsed rows, stopping at the first bad one unless skipping.
struct RowSink {
    file: String,
    skip_bad: bool,
    trace: Trace,
}

impl RowSink {
    fn new(path: &Path, skip_bad: bool) -> Self {
        Self {
            file: path.display().to_string(),
            skip_bad,
            trace: Trace::default(),
        }
    }

    fn accept(&mut self, line: usize, row: Result<FlowEvent, RowFault>) -> Result<(), TraceError> {
        match row {
            Ok(event) => self.trace.events.push(event),
            Err(fault) => {
                let bad = BadRow {
                    file: self.file.clone(),
                    line,
                    column: fault.column.to_owned(),
                    reason: fault.reason,
                };
                if !self.skip_bad {
                    return Err(TraceError::BadRow(bad));
                }
                self.trace.skipped.push(bad);
            }
        }
        Ok(())
    }

    fn finish(mut self) -> Trace {
        self.trace.events.sort_by_key(|e| e.occurred_at);
        self.trace
    }
}

/// What is wrong with one row: the column and why.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RowFault {
    column: &'static str,
    reason: String,
}

impl RowFault {
    fn new(column: &'static str, reason: String) -> Self {
        Self { column, reason }
    }
}

fn read_csv(input: Box<dyn Read>, sink: &mut RowSink) -> Result<(), TraceError> {
    let path = PathBuf::from(&sink.file);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .buffer_capacity(1 << 16)
        .from_reader(input);
    let mut record = csv::ByteRecord::new();
    check_header(&mut reader, &mut record, &path)?;
    loop {
        let more = reader
            .read_byte_record(&mut record)
            .map_err(|e| read_error(&path, csv_io(e)))?;
        if !more {
            return Ok(());
        }
        let line = record.position().map_or(0, |p| p.line() as usize);
        sink.accept(line, csv_event(&record))?;
    }
}

fn check_header(
    reader: &mut csv::Reader<Box<dyn Read>>,
    record: &mut csv::ByteRecord,
    path: &Path,
) -> Result<(), TraceError> {
    let present = reader
        .read_byte_record(record)
        .map_err(|e| read_error(path, csv_io(e)))?;
    let found: Vec<String> = if present {
        record
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect()
    } else {
        Vec::new()
    };
    let first = found.first().map(|f| f.trim_start_matches('\u{feff}'));
    let matches = found.len() == COLUMNS.len()
        && first == Some(COLUMNS[0])
        && found.iter().zip(COLUMNS).skip(1).all(|(f, c)| f == c);
    if matches {
        Ok(())
    } else {
        Err(TraceError::Header {
            path: path.to_path_buf(),
            found: found.join(","),
        })
    }
}

fn csv_io(error: csv::Error) -> io::Error {
    match error.into_kind() {
        csv::ErrorKind::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, format!("{other:?}")),
    }
}

fn csv_event(record: &csv::ByteRecord) -> Result<FlowEvent, RowFault> {
    if record.len() > COLUMNS.len() {
        return Err(RowFault::new(
            "row",
            format!(
                "has {} fields, expected {} ({HEADER})",
                record.len(),
                COLUMNS.len()
            ),
        ));
    }
    let mut fields: [Option<Cow<'_, str>>; 5] = Default::default();
    for (i, (slot, raw)) in fields.iter_mut().zip(record.iter()).enumerate() {
        let text = std::str::from_utf8(raw)
            .map_err(|_| RowFault::new(COLUMNS[i], "is not valid UTF-8".to_owned()))?;
        *slot = Some(Cow::Borrowed(text));
    }
    parse_fields(&fields)
}

fn read_json_lines(input: Box<dyn Read>, sink: &mut RowSink) -> Result<(), TraceError> {
    let path = PathBuf::from(&sink.file);
    let mut reader = BufReader::with_capacity(1 << 16, input);
    let mut buf = Vec::with_capacity(256);
    let mut line = 0;
    loop {
        buf.clear();
        let read = reader
            .read_until(b'\n', &mut buf)
            .map_err(|source| read_error(&path, source))?;
        if read == 0 {
            return Ok(());
        }
        line += 1;
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        sink.accept(line, json_event(&buf))?;
    }
}

/// One JSON Lines record, each field kept as its raw JSON text so that a
/// numeric amount is read exactly from its digits.
#[derive(Deserialize)]
struct JsonRow<'a> {
    #[serde(borrow)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow)]
    kind: Option<&'a RawValue>,
    #[serde(borrow)]
    currency: Option<&'a RawValue>,
    #[serde(borrow)]
    amount: Option<&'a RawValue>,
    #[serde(borrow)]
    occurred_at: Option<&'a RawValue>,
}

fn json_event(bytes: &[u8]) -> Result<FlowEvent, RowFault> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| RowFault::new("row", "is not valid UTF-8".to_owned()))?;
    let row: JsonRow<'_> = serde_json::from_str(text.trim())
        .map_err(|e| RowFault::new("row", format!("is not a JSON object of trace fields: {e}")))?;
    let raws = [
        row.event_id,
        row.kind,
        row.currency,
        row.amount,
        row.occurred_at,
    ];
    let mut fields: [Option<Cow<'_, str>>; 5] = Default::default();
    for (i, (slot, raw)) in fields.iter_mut().zip(raws).enumerate() {
        if let Some(raw) = raw {
            *slot = Some(json_text(raw, COLUMNS[i])?);
        }
    }
    parse_fields(&fields)
}

/// The text of a JSON field: a string's contents, or (for `amount` only) a
/// number's literal digits.
fn json_text<'a>(raw: &'a RawValue, column: &'static str) -> Result<Cow<'a, str>, RowFault> {
    let text = raw.get();
    if let Some(inner) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        if !inner.contains('\\') {
            return Ok(Cow::Borrowed(inner));
        }
        return serde_json::from_str::<String>(text)
            .map(Cow::Owned)
            .map_err(|e| RowFault::new(column, format!("{text} is not a valid string: {e}")));
    }
    let numeric = text.starts_with(|c: char| c == '-' || c.is_ascii_digit());
    if column == "amount" && numeric {
        return Ok(Cow::Borrowed(text));
    }
    Err(RowFault::new(column, format!("{text} is not a string")))
}

/// Validates the five fields of a row (in [`COLUMNS`] order) into an event.
fn parse_fields(fields: &[Option<Cow<'_, str>>; 5]) -> Result<FlowEvent, RowFault> {
    let field = |i: usize| -> Result<&str, RowFault> {
        match fields[i].as_deref() {
            Some(text) => Ok(text),
            None => Err(RowFault::new(COLUMNS[i], "is missing".to_owned())),
        }
    };
    let event_id = parse_event_id(field(0)?)?;
    let kind = parse_kind(field(1)?)?;
    let currency = parse_currency(field(2)?)?;
    let amount = parse_amount_field(field(3)?, currency)?;
    let occurred_at = parse_time(field(4)?)?;
    Ok(FlowEvent {
        event_id,
        kind,
        user_id: Uuid::nil(),
        amount,
        occurred_at,
    })
}

/// The event id: the UUID itself, or a UUIDv5 of any other non-empty string.
pub fn event_id_from(text: &str) -> Option<Uuid> {
    if text.is_empty() {
        return None;
    }
    Some(
        Uuid::try_parse(text)
            .unwrap_or_else(|_| Uuid::new_v5(&EVENT_ID_NAMESPACE, text.as_bytes())),
    )
}

fn parse_event_id(text: &str) -> Result<Uuid, RowFault> {
    event_id_from(text).ok_or_else(|| RowFault::new("event_id", "is empty".to_owned()))
}

fn parse_kind(text: &str) -> Result<FlowKind, RowFault> {
    match text {
        "deposit" => Ok(FlowKind::Deposit),
        "withdrawal" => Ok(FlowKind::Withdrawal),
        other => Err(RowFault::new(
            "kind",
            format!("{other:?} is not a kind (expected deposit or withdrawal)"),
        )),
    }
}

fn parse_currency(text: &str) -> Result<Currency, RowFault> {
    Currency::from_str(text).map_err(|_| {
        RowFault::new(
            "currency",
            format!("{text:?} is not a currency (expected USD or USDC)"),
        )
    })
}

/// Parses an amount exactly: plain decimal digits only (no exponent, sign,
/// separators or spaces), at most the currency's decimal places, above zero.
pub fn parse_amount(text: &str, currency: Currency) -> Result<Money, String> {
    let plain = !text.is_empty()
        && text.bytes().filter(|b| *b == b'.').count() <= 1
        && text.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && text.bytes().any(|b| b.is_ascii_digit());
    if !plain {
        let reason = if text.starts_with('-') {
            "is not greater than zero"
        } else {
            "is not a plain decimal number"
        };
        return Err(format!("{text:?} {reason}"));
    }
    let value = Decimal::from_str_exact(text)
        .map_err(|_| format!("{text:?} has more digits than an amount can hold"))?;
    Money::positive(currency, value).map_err(|e| amount_reason(text, e))
}

fn amount_reason(text: &str, error: AmountError) -> String {
    match error {
        AmountError::TooPrecise { currency, max, .. } => {
            format!("{text:?} has more than {max} decimal places for {currency}")
        }
        AmountError::NotPositive(_) => format!("{text:?} is not greater than zero"),
        AmountError::OutOfRange(_) => {
            format!("{text:?} is beyond the largest supported amount (10^18)")
        }
        other => format!("{text:?}: {other}"),
    }
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, RowFault> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            RowFault::new(
                "occurred_at",
                format!("{text:?} is not an RFC 3339 time ({e})"),
            )
        })
}

fn parse_amount_field(text: &str, currency: Currency) -> Result<Money, RowFault> {
    parse_amount(text, currency).map_err(|reason| RowFault::new("amount", reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_decimal_macros::dec;

    fn fields(values: [&str; 5]) -> [Option<Cow<'_, str>>; 5] {
        values.map(|v| Some(Cow::Borrowed(v)))
    }

    #[test]
    fn formats_come_from_the_extension() {
        let kind = |p: &str| TraceKind::of(Path::new(p)).ok();
        assert_eq!(
            kind("a.csv"),
            Some(TraceKind {
                format: TraceFormat::Csv,
                gzip: false
            })
        );
        assert_eq!(
            kind("a.NDJSON.gz"),
            Some(TraceKind {
                format: TraceFormat::JsonLines,
                gzip: true
            })
        );
        assert_eq!(
            kind("a.jsonl").map(|k| k.format),
            Some(TraceFormat::JsonLines)
        );
        assert_eq!(kind("a.txt"), None);
        assert_eq!(kind("a.gz"), None);
    }

    #[test]
    fn a_valid_row_becomes_an_event_in_utc() {
        let event = parse_fields(&fields([
            "e-1",
            "withdrawal",
            "USDC",
            "12.345678",
            "2026-03-01T10:00:00+02:00",
        ]))
        .unwrap();
        assert_eq!(event.kind, FlowKind::Withdrawal);
        assert_eq!(event.amount.value, dec!(12.345678));
        assert_eq!(event.occurred_at.to_rfc3339(), "2026-03-01T08:00:00+00:00");
        assert_eq!(event.event_id, Uuid::new_v5(&EVENT_ID_NAMESPACE, b"e-1"));
        assert_eq!(event.user_id, Uuid::nil());
    }

    #[test]
    fn a_uuid_event_id_is_used_as_it_is() {
        let id = "7d444840-9dc0-11d1-b245-5ffdce74fad2";
        assert_eq!(
            event_id_from(id).map(|u| u.to_string()),
            Some(id.to_owned())
        );
        assert_eq!(event_id_from(""), None);
    }

    #[test]
    fn amounts_are_refused_with_the_reason() {
        let usdc = |t: &str| parse_amount(t, Currency::Usdc);
        assert_eq!(
            usdc("12.3456789").unwrap_err(),
            "\"12.3456789\" has more than 6 decimal places for USDC"
        );
        assert!(parse_amount("1.001", Currency::Usd).is_err());
        assert!(parse_amount("1.010", Currency::Usd).is_ok());
        for bad in ["", ".", "1e3", "1,000", "+5", "1.2.3", " 1", "abc"] {
            assert!(usdc(bad).unwrap_err().contains("plain decimal"), "{bad:?}");
        }
        for bad in ["0", "0.000", "-5"] {
            assert!(
                usdc(bad).unwrap_err().contains("greater than zero"),
                "{bad:?}"
            );
        }
        assert!(
            usdc("10000000000000000000")
                .unwrap_err()
                .contains("largest")
        );
    }

    #[test]
    fn the_first_bad_column_is_named() {
        let fault = |v: [&str; 5]| parse_fields(&fields(v)).unwrap_err().column;
        let ok = ["e", "deposit", "USD", "1.00", "2026-01-01T00:00:00Z"];
        assert_eq!(fault(["", ok[1], ok[2], ok[3], ok[4]]), "event_id");
        assert_eq!(fault([ok[0], "Deposit", ok[2], ok[3], ok[4]]), "kind");
        assert_eq!(fault([ok[0], ok[1], "EUR", ok[3], ok[4]]), "currency");
        assert_eq!(fault([ok[0], ok[1], ok[2], "1.001", ok[4]]), "amount");
        assert_eq!(
            fault([ok[0], ok[1], ok[2], ok[3], "2026-01-01"]),
            "occurred_at"
        );
    }

    #[test]
    fn json_amounts_may_be_numbers_read_from_their_digits() {
        let line = br#"{"event_id":"x","kind":"deposit","currency":"USDC","amount":0.1000001,"occurred_at":"2026-01-01T00:00:00Z"}"#;
        assert_eq!(json_event(line).unwrap_err().column, "amount");
        let line = br#"{"event_id":"x","kind":"deposit","currency":"USDC","amount":0.100001,"occurred_at":"2026-01-01T00:00:00Z"}"#;
        assert_eq!(json_event(line).unwrap().amount.value, dec!(0.100001));
    }

    #[test]
    fn json_fields_must_be_strings_and_present() {
        let line = br#"{"event_id":"x","kind":7,"currency":"USDC","amount":"1","occurred_at":"2026-01-01T00:00:00Z"}"#;
        assert_eq!(json_event(line).unwrap_err().column, "kind");
        let line = br#"{"event_id":"x","kind":"deposit","currency":"USDC","amount":"1"}"#;
        assert_eq!(json_event(line).unwrap_err().column, "occurred_at");
        assert_eq!(json_event(b"[1,2]").unwrap_err().column, "row");
        let line = br#"{"event_id":"a\u0062","kind":"deposit","currency":"USD","amount":"1","occurred_at":"2026-01-01T00:00:00Z"}"#;
        let id = json_event(line).unwrap().event_id;
        assert_eq!(id, Uuid::new_v5(&EVENT_ID_NAMESPACE, b"ab"));
    }
}
