//! The simulator's input and output: traces read and written (errors naming
//! line and column, skipping bad rows, CSV/JSON Lines/gzip round trips), the
//! built-in generators' determinism and shape, and the buffer chart files.

use std::io::Write;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, NaiveDate, TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use treasury::domain::{BufferAccount, ConversionDirection, Currency, FlowEvent, FlowKind, Money};
use treasury::simulate::generate::{Scenario, describe, generate};
use treasury::simulate::plot::{BufferSeries, ConversionMark, PlotError, plot};
use treasury::simulate::trace::{HEADER, TraceError, read_trace, write_trace};
use uuid::Uuid;

fn start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 0, 0, 0).unwrap()
}

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const GOOD: &str = "e-1,deposit,USDC,12.5,2026-03-02T10:00:00Z";

fn csv_with(bad_row: &str) -> String {
    format!("{HEADER}\n{GOOD}\n{GOOD}\n{bad_row}\n{GOOD}\n")
}

fn bad_row_error(name: &str, text: &str) -> (usize, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), name, text);
    match read_trace(&path, false) {
        Err(TraceError::BadRow(row)) => {
            let message = TraceError::BadRow(row.clone()).to_string();
            assert!(message.contains(name), "{message}");
            (row.line, row.column, message)
        }
        other => panic!("expected a bad row, got {other:?}"),
    }
}

#[test]
fn each_bad_csv_value_names_its_line_and_column() {
    let cases = [
        ("e,deposit,USDC,12.3456789,2026-03-02T10:00:00Z", "amount"),
        ("e,deposit,USD,1.001,2026-03-02T10:00:00Z", "amount"),
        ("e,deposit,USD,12,5,2026-03-02T10:00:00Z", "row"),
        ("e,deposit,USD,-4,2026-03-02T10:00:00Z", "amount"),
        ("e,deposit,USD,abc,2026-03-02T10:00:00Z", "amount"),
        ("e,deposit,EUR,1,2026-03-02T10:00:00Z", "currency"),
        ("e,refund,USD,1,2026-03-02T10:00:00Z", "kind"),
        ("e,deposit,USD,1,2026-03-02 10:00", "occurred_at"),
        ("e,deposit,USD,1", "occurred_at"),
        ("e,deposit", "currency"),
        (",deposit,USD,1,2026-03-02T10:00:00Z", "event_id"),
    ];
    for (row, column) in cases {
        let (line, found, message) = bad_row_error("trace.csv", &csv_with(row));
        assert_eq!((line, found.as_str()), (4, column), "{row}: {message}");
        assert!(
            message.contains(&format!("trace.csv line 4, column {column}:")),
            "{message}"
        );
    }
}

#[test]
fn the_scale_error_reads_as_documented() {
    let row = "e,deposit,USDC,12.3456789,2026-03-02T10:00:00Z";
    let (_, _, message) = bad_row_error("trace.csv", &csv_with(row));
    assert!(
        message.ends_with(
            "trace.csv line 4, column amount: \"12.3456789\" has more than 6 decimal places for USDC"
        ),
        "{message}"
    );
}

#[test]
fn each_bad_json_value_names_its_line_and_column() {
    let good = r#"{"event_id":"a","kind":"deposit","currency":"USD","amount":"1","occurred_at":"2026-03-02T10:00:00Z"}"#;
    let cases = [
        (
            r#"{"event_id":"a","kind":"deposit","currency":"USD","amount":1.001,"occurred_at":"2026-03-02T10:00:00Z"}"#,
            "amount",
        ),
        (
            r#"{"event_id":"a","kind":"deposit","currency":"usd","amount":"1","occurred_at":"2026-03-02T10:00:00Z"}"#,
            "currency",
        ),
        (
            r#"{"event_id":"a","kind":"deposit","currency":"USD","occurred_at":"2026-03-02T10:00:00Z"}"#,
            "amount",
        ),
        (r#"{"event_id":"a","kind":"deposit""#, "row"),
    ];
    for (row, column) in cases {
        let text = format!("{good}\n\n{row}\n{good}\n");
        let (line, found, message) = bad_row_error("trace.jsonl", &text);
        assert_eq!((line, found.as_str()), (3, column), "{message}");
    }
}

#[test]
fn a_wrong_or_missing_header_names_the_expected_one() {
    let dir = tempfile::tempdir().unwrap();
    for text in [
        format!("{GOOD}\n"),
        "event_id,kind,currency,amount\n".to_owned(),
        String::new(),
    ] {
        let path = write_file(dir.path(), "headless.csv", &text);
        let error = read_trace(&path, true).unwrap_err();
        assert!(matches!(error, TraceError::Header { .. }), "{error:?}");
        assert!(error.to_string().contains(HEADER), "{error}");
        assert!(error.to_string().contains("headless.csv line 1"), "{error}");
    }
}

#[test]
fn an_unreadable_file_names_its_path() {
    let error = read_trace(Path::new("/nonexistent/dir/trace.csv"), false).unwrap_err();
    assert!(
        error.to_string().contains("/nonexistent/dir/trace.csv"),
        "{error}"
    );
    let error = read_trace(Path::new("trace.txt"), false).unwrap_err();
    assert!(matches!(error, TraceError::UnknownFormat(_)), "{error}");
}

#[test]
fn skip_bad_lists_bad_rows_and_keeps_the_rest_in_time_order() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "{HEADER}\n\
         late,withdrawal,USD,3.50,2026-03-02T12:00:00Z\n\
         bad,deposit,USD,1.001,2026-03-02T11:00:00Z\n\
         early,deposit,USDC,0.000001,2026-03-02T12:00:00+02:00\n\
         worse,deposit,XYZ,1,2026-03-02T11:00:00Z\n"
    );
    let path = write_file(dir.path(), "mixed.csv", &text);
    let trace = read_trace(&path, true).unwrap();
    let lines: Vec<(usize, &str)> = trace
        .skipped
        .iter()
        .map(|b| (b.line, b.column.as_str()))
        .collect();
    assert_eq!(lines, vec![(3, "amount"), (5, "currency")]);
    let amounts: Vec<Decimal> = trace.events.iter().map(|e| e.amount.value).collect();
    assert_eq!(amounts, vec![dec!(0.000001), dec!(3.50)]);
    assert!(matches!(
        read_trace(&path, false),
        Err(TraceError::BadRow(row)) if row.line == 3
    ));
}

#[test]
fn equal_times_keep_file_order() {
    let dir = tempfile::tempdir().unwrap();
    let rows: String = (0..20)
        .map(|i| format!("id-{i},deposit,USD,{},2026-03-02T10:00:00Z\n", i + 1))
        .collect();
    let path = write_file(dir.path(), "ties.csv", &format!("{HEADER}\n{rows}"));
    let trace = read_trace(&path, false).unwrap();
    let amounts: Vec<Decimal> = trace.events.iter().map(|e| e.amount.value).collect();
    assert_eq!(amounts, (1..=20).map(Decimal::from).collect::<Vec<_>>());
}

#[test]
fn a_generated_month_round_trips_through_every_format() {
    let events = generate(Scenario::Quiet, 11, start());
    let dir = tempfile::tempdir().unwrap();
    for name in ["t.csv", "t.jsonl", "t.ndjson", "t.csv.gz", "t.jsonl.gz"] {
        let path = dir.path().join(name);
        write_trace(&path, &events).unwrap();
        let trace = read_trace(&path, false).unwrap();
        assert!(trace.skipped.is_empty(), "{name}");
        assert_eq!(trace.events, events, "{name}");
        let again = dir.path().join(format!("again-{name}"));
        write_trace(&again, &trace.events).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&again).unwrap(),
            "{name}"
        );
    }
}

#[test]
fn gzip_files_are_really_compressed() {
    let events = generate(Scenario::Quiet, 12, start());
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("t.csv");
    let packed = dir.path().join("t.csv.gz");
    write_trace(&plain, &events).unwrap();
    write_trace(&packed, &events).unwrap();
    let bytes = std::fs::read(&packed).unwrap();
    assert_eq!(&bytes[..2], &[0x1f, 0x8b]);
    assert!(bytes.len() * 2 < std::fs::metadata(&plain).unwrap().len() as usize);
}

#[test]
fn a_hand_written_gzip_trace_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hand.csv.gz");
    let file = std::fs::File::create(&path).unwrap();
    let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    write!(encoder, "{HEADER}\n{GOOD}\n").unwrap();
    encoder.finish().unwrap();
    let trace = read_trace(&path, false).unwrap();
    assert_eq!(trace.events.len(), 1);
    assert_eq!(
        trace.events[0].amount,
        Money::new(Currency::Usdc, dec!(12.5)).unwrap()
    );
}

#[test]
fn the_same_seed_gives_the_same_events_and_another_seed_others() {
    for scenario in Scenario::ALL {
        let a = generate(scenario, 42, start());
        let b = generate(scenario, 42, start());
        let c = generate(scenario, 43, start());
        assert_eq!(a, b, "{scenario}");
        assert_ne!(a, c, "{scenario}");
        assert!(a.windows(2).all(|w| w[0].occurred_at <= w[1].occurred_at));
    }
}

/// Deposits minus withdrawals, and their sum, per UTC day.
fn daily_net_and_gross(events: &[FlowEvent]) -> Vec<(NaiveDate, Decimal, Decimal)> {
    let mut days: Vec<(NaiveDate, Decimal, Decimal)> = Vec::new();
    for event in events {
        let day = event.occurred_at.date_naive();
        if days.last().is_none_or(|(d, _, _)| *d != day) {
            days.push((day, Decimal::ZERO, Decimal::ZERO));
        }
        if let Some((_, net, gross)) = days.last_mut() {
            let value = event.amount.value;
            *gross += value;
            *net += match event.kind {
                FlowKind::Deposit => value,
                FlowKind::Withdrawal => -value,
            };
        }
    }
    days
}

#[test]
fn normal_has_the_documented_shape() {
    let events = generate(Scenario::Normal, 7, start());
    assert!(
        (120_000..=180_000).contains(&events.len()),
        "{}",
        events.len()
    );
    let usdc = events
        .iter()
        .filter(|e| e.amount.currency == Currency::Usdc)
        .count() as f64
        / events.len() as f64;
    assert!((0.55..=0.65).contains(&usdc), "USDC share {usdc}");
    let span = events.last().unwrap().occurred_at - events[0].occurred_at;
    assert!(span > Duration::days(29) && span <= Duration::days(30));
    let days = daily_net_and_gross(&events);
    let ratios: Vec<Decimal> = days.iter().map(|(_, n, g)| n.abs() / g).collect();
    let small = ratios.iter().filter(|r| **r < dec!(0.08)).count();
    assert!(small >= 24, "daily |net|/gross: {ratios:?}");
    assert!(ratios.iter().all(|r| *r < dec!(0.3)), "{ratios:?}");
    assert!(events.iter().all(|e| e.amount.value > Decimal::ZERO
        && e.amount.value <= dec!(250000)
        && e.amount.value.scale() <= 2));
}

#[test]
fn mornings_bring_deposits_and_evenings_withdrawals() {
    let events = generate(Scenario::Normal, 8, start());
    let count = |kind: FlowKind, hours: std::ops::Range<u32>| {
        events
            .iter()
            .filter(|e| e.kind == kind && hours.contains(&chrono::Timelike::hour(&e.occurred_at)))
            .count() as f64
    };
    assert!(count(FlowKind::Deposit, 6..12) > 1.5 * count(FlowKind::Withdrawal, 6..12));
    assert!(count(FlowKind::Withdrawal, 16..22) > 1.5 * count(FlowKind::Deposit, 16..22));
}

#[test]
fn the_bank_run_withdraws_heavily_for_six_hours() {
    let events = generate(Scenario::BankRun, 9, start());
    let run_start = start() + Duration::days(14) + Duration::hours(12);
    let usdc_net = |from: DateTime<Utc>| -> Decimal {
        events
            .iter()
            .filter(|e| e.amount.currency == Currency::Usdc)
            .filter(|e| e.occurred_at >= from && e.occurred_at < from + Duration::hours(6))
            .map(|e| match e.kind {
                FlowKind::Deposit => e.amount.value,
                FlowKind::Withdrawal => -e.amount.value,
            })
            .sum()
    };
    let run = usdc_net(run_start);
    let same_hours_a_week_before = usdc_net(run_start - Duration::days(7));
    let extra = same_hours_a_week_before - run;
    assert!(
        extra > dec!(100000),
        "run {run}, week before {same_hours_a_week_before}"
    );
}

#[test]
fn drift_has_a_week_of_net_inflow() {
    let events = generate(Scenario::Drift, 10, start());
    let summary = |from: i64| {
        let begin = start() + Duration::days(from);
        let week: Vec<FlowEvent> = events
            .iter()
            .filter(|e| e.occurred_at >= begin && e.occurred_at < begin + Duration::days(7))
            .cloned()
            .collect();
        let s = describe(&week);
        let total = |kind| s.total(kind, Currency::Usdc).total + s.total(kind, Currency::Usd).total;
        total(FlowKind::Deposit) / total(FlowKind::Withdrawal)
    };
    let inflow_week = summary(7);
    assert!(
        inflow_week > dec!(1.15) && inflow_week < dec!(1.5),
        "{inflow_week}"
    );
    let later_week = summary(21);
    assert!(later_week < dec!(1.1), "{later_week}");
}

fn series(account: BufferAccount, scale: i64) -> BufferSeries {
    let balance = (0..8_000)
        .map(|i| {
            let swing = Decimal::from((i * 37) % 1_000 - 500) * Decimal::from(scale);
            (
                start() + Duration::minutes(5 * i),
                Decimal::from(50_000) + swing,
            )
        })
        .collect();
    let conversions = (0..6)
        .map(|i| ConversionMark {
            at: start() + Duration::days(4 * i),
            direction: ConversionDirection::UsdToUsdc,
            amount: dec!(20000),
            incoming: i % 2 == 0,
        })
        .collect();
    BufferSeries {
        account,
        min: dec!(10000),
        target: dec!(50000),
        max: dec!(100000),
        balance,
        conversions,
    }
}

fn three_buffers() -> Vec<BufferSeries> {
    BufferAccount::ALL
        .into_iter()
        .zip([10, 40, 120])
        .map(|(account, scale)| series(account, scale))
        .collect()
}

#[test]
fn the_chart_is_a_png_of_the_documented_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffers.png");
    plot(&path, "normal, seed 1", &three_buffers()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&bytes[12..16], b"IHDR");
    let width = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    let height = u32::from_be_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    assert_eq!((width, height), (1600, 1200));
    assert!(bytes.len() > 20_000, "{} bytes", bytes.len());
}

#[test]
fn the_chart_is_an_svg_naming_the_three_buffers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("buffers.svg");
    plot(&path, "bank-run, seed 2", &three_buffers()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with("<svg"), "{}", &text[..80.min(text.len())]);
    assert!(text.trim_end().ends_with("</svg>"));
    for account in BufferAccount::ALL {
        assert!(text.contains(account.as_str()), "{account}");
    }
    assert!(text.contains("bank-run, seed 2"));
}

#[test]
fn other_image_formats_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let error = plot(&dir.path().join("b.jpg"), "x", &three_buffers()).unwrap_err();
    assert!(matches!(error, PlotError::UnknownFormat(_)), "{error}");
}

fn arbitrary_event() -> impl Strategy<Value = FlowEvent> {
    let currency = prop_oneof![Just(Currency::Usd), Just(Currency::Usdc)];
    let kind = prop_oneof![Just(FlowKind::Deposit), Just(FlowKind::Withdrawal)];
    (
        any::<u128>(),
        kind,
        currency,
        1i64..=i64::MAX / 8,
        -2_000_000_000i64..4_000_000_000,
        0u32..1_000_000_000,
    )
        .prop_map(|(id, kind, currency, units, seconds, nanos)| {
            let value = Decimal::new(units, currency.scale()).normalize();
            FlowEvent {
                event_id: Uuid::from_u128(id),
                kind,
                user_id: Uuid::nil(),
                amount: Money { currency, value },
                occurred_at: DateTime::from_timestamp(seconds, nanos).unwrap_or_default(),
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_valid_events_survive_a_write_and_a_read(
        mut events in prop::collection::vec(arbitrary_event(), 0..40),
        extension in prop_oneof![Just("csv"), Just("jsonl"), Just("csv.gz"), Just("ndjson.gz")],
    ) {
        events.sort_by_key(|e| e.occurred_at);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("p.{extension}"));
        write_trace(&path, &events).unwrap();
        let trace = read_trace(&path, false).unwrap();
        prop_assert!(trace.skipped.is_empty());
        prop_assert_eq!(trace.events, events);
    }
}

/// `--seeds A..B --sweep` on a trace file: one row per seed (the same trace,
/// each seed's own provider draws) and the totals, as JSON; without
/// `--seeds` the flag is refused by name.
#[test]
fn the_sweep_prints_a_row_per_seed_and_needs_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let day: Vec<FlowEvent> = generate(Scenario::Normal, 3, start())
        .into_iter()
        .filter(|e| e.occurred_at < start() + Duration::hours(12))
        .collect();
    let path = dir.path().join("day.csv");
    write_trace(&path, &day).unwrap();
    let treasury = || std::process::Command::new(env!("CARGO_BIN_EXE_treasury"));
    let out = treasury()
        .args(["simulate", "--trace"])
        .arg(&path)
        .args([
            "--capital-scale",
            "1.5",
            "--seeds",
            "4..6",
            "--sweep",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let seeds: Vec<u64> = json["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds, vec![4, 5, 6]);
    assert_eq!(json["summary"]["seeds"], 3);
    let most = json["seeds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["conversions"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(json["summary"]["most_conversions"].as_u64(), Some(most));
    assert!(most > 0, "half a day of flows needs some conversions");

    let refused = treasury()
        .args(["simulate", "--trace"])
        .arg(&path)
        .arg("--sweep")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--seeds"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
