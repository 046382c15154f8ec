//! Provider selection: examples for each rule, and property tests on the pure
//! selection function.

use std::collections::HashMap;

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use treasury::domain::ConversionDirection;
use treasury::domain::{Currency, Money};
use treasury::providers::health::{AttemptOutcome, TrackRecord, track_records};
use treasury::providers::selection::{RankedProvider, all_in_cost, expected_cost};
use treasury::providers::{
    HealthRule, ProviderRow, ProviderStatus, Quote, QuoteSeen, Rejection, SandboxBehaviour,
    select_providers,
};
use uuid::Uuid;

fn row(name: &str, priority: i32) -> ProviderRow {
    ProviderRow {
        id: Uuid::new_v5(&Uuid::NAMESPACE_OID, name.as_bytes()),
        name: name.to_owned(),
        provider_type: "sandbox".to_owned(),
        priority,
        status: ProviderStatus::Active,
        supports_usdc_to_usd: true,
        supports_usd_to_usdc: true,
        supports_usd_transfer: false,
        min_amount: dec!(100),
        max_amount: dec!(1000000),
        daily_volume_limit: None,
        daily_volume_used: dec!(0),
        success_count: 0,
        failure_count: 0,
        fee_percentage: dec!(0.001),
        fee_fixed: dec!(0),
        spread_bps: dec!(5),
        credentials_ref: None,
        base_url: None,
    }
}

/// Each row's counters taken as its recent track record (what selection judges).
fn recent(rows: &[ProviderRow]) -> HashMap<Uuid, TrackRecord> {
    rows.iter()
        .map(|r| {
            let record = TrackRecord {
                successes: r.success_count,
                failures: r.failure_count,
            };
            (r.id, record)
        })
        .collect()
}

fn names(eligible: &[RankedProvider]) -> Vec<&str> {
    eligible.iter().map(|p| p.row.name.as_str()).collect()
}

const USDC_TO_USD: ConversionDirection = ConversionDirection::UsdcToUsd;

#[test]
fn priority_wins_then_cost_then_name() {
    let mut cheap_but_second = row("Cheap", 2);
    cheap_but_second.fee_percentage = dec!(0);
    cheap_but_second.spread_bps = dec!(0);
    let mut pricey = row("Pricey", 1);
    pricey.fee_percentage = dec!(0.002);
    let mut thrifty = row("Thrifty", 1);
    thrifty.fee_percentage = dec!(0.0005);
    let twin_b = row("Twin B", 3);
    let twin_a = row("Twin A", 3);
    let candidates = [cheap_but_second, pricey, thrifty, twin_b, twin_a];
    let s = select_providers(
        &candidates,
        USDC_TO_USD,
        dec!(10000),
        &HashMap::new(),
        &recent(&candidates),
        &HealthRule::default(),
    );
    assert_eq!(
        names(&s.eligible),
        ["Thrifty", "Pricey", "Cheap", "Twin A", "Twin B"]
    );
    assert!(s.rejected.is_empty());
    // cost = 10000 × 0.0005 + 0 + 10000 × 5 / 10000 = 10
    assert_eq!(s.eligible[0].expected_cost, dec!(10));
    assert!(
        s.summary()
            .starts_with("chose Thrifty (priority 1, cost 10); fallback: Pricey"),
        "{}",
        s.summary()
    );
}

#[test]
fn each_rule_rejects_with_its_reason() {
    let mut inactive = row("Inactive", 1);
    inactive.status = ProviderStatus::Inactive;
    let mut degraded = row("Degraded", 1);
    degraded.status = ProviderStatus::Degraded;
    let mut one_way = row("OneWay", 1);
    one_way.supports_usdc_to_usd = false;
    let mut big_only = row("BigOnly", 1);
    big_only.min_amount = dec!(50000);
    let mut small_only = row("SmallOnly", 1);
    small_only.max_amount = dec!(1000);
    let mut capped = row("Capped", 1);
    capped.daily_volume_limit = Some(dec!(20000));
    capped.daily_volume_used = dec!(5000);
    let mut flaky = row("Flaky", 1);
    flaky.success_count = 7;
    flaky.failure_count = 3;
    let fine = row("Fine", 5);
    let candidates = [
        inactive,
        degraded,
        one_way,
        big_only,
        small_only,
        capped.clone(),
        flaky,
        fine,
    ];
    let in_flight = HashMap::from([(capped.id, dec!(6000))]);

    let s = select_providers(
        &candidates,
        USDC_TO_USD,
        dec!(10000),
        &in_flight,
        &recent(&candidates),
        &HealthRule::default(),
    );

    assert_eq!(names(&s.eligible), ["Fine"]);
    let reasons: HashMap<&str, &Vec<Rejection>> = s
        .rejected
        .iter()
        .map(|r| (r.row.name.as_str(), &r.reasons))
        .collect();
    assert_eq!(reasons["Inactive"], &vec![Rejection::Inactive]);
    assert_eq!(reasons["Degraded"], &vec![Rejection::Degraded]);
    assert_eq!(
        reasons["OneWay"],
        &vec![Rejection::DirectionUnsupported {
            direction: USDC_TO_USD
        }]
    );
    assert_eq!(
        reasons["BigOnly"],
        &vec![Rejection::BelowMinimum { min: dec!(50000) }]
    );
    assert_eq!(
        reasons["SmallOnly"],
        &vec![Rejection::AboveMaximum { max: dec!(1000) }]
    );
    // 5000 used + 6000 in flight + 10000 = 21000 > 20000: in-flight jobs count.
    assert_eq!(
        reasons["Capped"],
        &vec![Rejection::DailyCapExceeded {
            limit: dec!(20000),
            used: dec!(5000),
            in_flight: dec!(6000)
        }]
    );
    assert_eq!(
        reasons["Flaky"],
        &vec![Rejection::Unhealthy {
            successes: 7,
            failures: 3
        }]
    );
    assert!(
        s.summary().contains("Capped (daily cap 20000 exceeded"),
        "{}",
        s.summary()
    );
}

#[test]
fn the_cap_is_inclusive_and_only_counts_its_own_in_flight_volume() {
    let mut capped = row("Capped", 1);
    capped.daily_volume_limit = Some(dec!(20000));
    capped.daily_volume_used = dec!(4000);
    let other = Uuid::from_u128(1);
    let in_flight = HashMap::from([(capped.id, dec!(6000)), (other, dec!(1000000))]);
    let s = select_providers(
        &[capped],
        USDC_TO_USD,
        dec!(10000),
        &in_flight,
        &HashMap::new(),
        &HealthRule::default(),
    );
    assert_eq!(
        names(&s.eligible),
        ["Capped"],
        "4000 + 6000 + 10000 = 20000 is within the cap"
    );
}

#[test]
fn health_is_judged_only_after_enough_attempts() {
    let rule = HealthRule::default();
    assert!(rule.is_healthy(0, 9), "fewer than 10 attempts: not judged");
    assert!(rule.is_healthy(8, 2), "exactly 80 % passes");
    assert!(!rule.is_healthy(7, 3));
    assert!(rule.is_healthy(0, 0));
    let strict = HealthRule {
        min_attempts: 1,
        min_success_rate: dec!(0.99),
    };
    assert!(!strict.is_healthy(98, 1));
}

#[test]
fn only_the_recent_record_is_judged_not_the_lifetime_counters() {
    let mut once_bad = row("OnceBad", 1);
    once_bad.success_count = 2;
    once_bad.failure_count = 50;
    let recently_bad = row("RecentlyBad", 1);
    let records = HashMap::from([(
        recently_bad.id,
        TrackRecord {
            successes: 3,
            failures: 7,
        },
    )]);
    let s = select_providers(
        &[once_bad, recently_bad],
        USDC_TO_USD,
        dec!(10000),
        &HashMap::new(),
        &records,
        &HealthRule::default(),
    );
    assert_eq!(names(&s.eligible), ["OnceBad"]);
    assert_eq!(
        s.rejected[0].reasons,
        vec![Rejection::Unhealthy {
            successes: 3,
            failures: 7
        }]
    );
}

#[test]
fn no_candidates_means_no_choice() {
    let s = select_providers(
        &[],
        USDC_TO_USD,
        dec!(1),
        &HashMap::new(),
        &HashMap::new(),
        &HealthRule::default(),
    );
    assert!(s.chosen().is_none());
    assert_eq!(s.summary(), "no eligible provider");
}

// ---- properties ------------------------------------------------------------

fn usdc(value: Decimal) -> Money {
    Money {
        currency: Currency::Usdc,
        value,
    }
}

#[test]
fn the_lowest_quoted_all_in_cost_wins_and_the_reason_names_every_quote() {
    // Priority 1 charges 15 bps + 1.00; priority 2 quotes 10 bps + 1.00,
    // both with a 5 bps spread; the third gives no quote.
    let mut first = row("Due", 1);
    first.fee_percentage = dec!(0.0015);
    first.fee_fixed = dec!(1);
    let mut second = row("ZeroHash", 2);
    second.fee_percentage = dec!(0.0010);
    second.fee_fixed = dec!(1);
    let silent = row("Silent", 0);
    let candidates = [first.clone(), second.clone(), silent.clone()];
    let amount = dec!(100000);
    let s = select_providers(
        &candidates,
        USDC_TO_USD,
        amount,
        &HashMap::new(),
        &recent(&candidates),
        &HealthRule::default(),
    );
    assert_eq!(names(&s.eligible), ["Silent", "Due", "ZeroHash"]);
    let quotes: HashMap<Uuid, Result<Quote, String>> = [
        (
            first.id,
            Ok(SandboxBehaviour::from_row(&first).quote(&usdc(amount))),
        ),
        (
            second.id,
            Ok(SandboxBehaviour::from_row(&second).quote(&usdc(amount))),
        ),
        (silent.id, Err("provider down".to_owned())),
    ]
    .into_iter()
    .collect();
    let s = s.by_quotes(amount, &quotes);
    assert_eq!(names(&s.eligible), ["ZeroHash", "Due", "Silent"]);
    // ZeroHash: fee 100 + 1 = 101; (100000 − 101) × 0.9995 = 99849.0505
    // arrives, so 150.9495 is lost against par.
    assert_eq!(
        s.eligible[0].quote,
        Some(QuoteSeen::Priced {
            rate: dec!(0.9995),
            fee: dec!(101),
            all_in: dec!(150.9495),
        })
    );
    assert_eq!(
        s.summary(),
        "chose ZeroHash (priority 2, quote rate 0.9995 fee 101, all-in cost 150.9495); \
         fallback: Due (priority 1, quote rate 0.9995 fee 151, all-in cost 200.9245), \
         Silent (priority 0, no quote: provider down)"
    );
}

#[test]
fn without_quotes_the_priority_order_stands() {
    let candidates = [row("B", 2), row("A", 1)];
    let s = select_providers(
        &candidates,
        USDC_TO_USD,
        dec!(5000),
        &HashMap::new(),
        &recent(&candidates),
        &HealthRule::default(),
    );
    let s = s.by_quotes(dec!(5000), &HashMap::new());
    assert_eq!(names(&s.eligible), ["A", "B"]);
    assert!(s.summary().contains("A (priority 1, no quote: not asked)"));
}

fn money(max_cents: i64) -> impl Strategy<Value = Decimal> {
    (0..=max_cents).prop_map(|c| Decimal::new(c, 2))
}

fn arb_row(index: usize) -> impl Strategy<Value = ProviderRow> {
    (
        (0..4i32, 0..3u8, any::<bool>(), any::<bool>(), any::<bool>()),
        (
            money(200_000),
            money(20_000_000),
            proptest::option::of(money(30_000_000)),
            money(15_000_000),
        ),
        (0..30i64, 0..30i64),
        (0..=2_000i64, money(2_000), 0..=500i64),
        prop::sample::select(vec!["Alpha", "Beta", "Gamma", "Delta"]),
    )
        .prop_map(
            move |(
                (priority, status, usdc_to_usd, usd_to_usdc, transfer),
                (min, span, limit, used),
                (ok, ko),
                (fee_e6, fixed, spread_e1),
                name,
            )| {
                ProviderRow {
                    id: Uuid::from_u128(index as u128 + 1),
                    name: name.to_owned(),
                    provider_type: "sandbox".to_owned(),
                    priority,
                    status: [
                        ProviderStatus::Active,
                        ProviderStatus::Inactive,
                        ProviderStatus::Degraded,
                    ][usize::from(status % 3)],
                    supports_usdc_to_usd: usdc_to_usd,
                    supports_usd_to_usdc: usd_to_usdc,
                    supports_usd_transfer: transfer,
                    min_amount: min,
                    max_amount: min + span,
                    daily_volume_limit: limit,
                    daily_volume_used: used,
                    success_count: ok,
                    failure_count: ko,
                    fee_percentage: Decimal::new(fee_e6, 6),
                    fee_fixed: fixed,
                    spread_bps: Decimal::new(spread_e1, 1),
                    credentials_ref: None,
                    base_url: None,
                }
            },
        )
}

fn arb_rows() -> impl Strategy<Value = Vec<ProviderRow>> {
    (0..8usize).prop_flat_map(|n| (0..n).map(arb_row).collect::<Vec<_>>())
}

fn arb_direction() -> impl Strategy<Value = ConversionDirection> {
    prop_oneof![
        Just(ConversionDirection::UsdcToUsd),
        Just(ConversionDirection::UsdToUsdc),
        Just(ConversionDirection::UsdTransfer)
    ]
}

/// The rules, written out again independently of the implementation.
fn allowed(
    row: &ProviderRow,
    direction: ConversionDirection,
    amount: Decimal,
    in_flight: Decimal,
) -> bool {
    let attempts = row.success_count + row.failure_count;
    let healthy = attempts < 10
        || Decimal::from(row.success_count) * dec!(100) >= Decimal::from(attempts) * dec!(80);
    let direction_ok = match direction {
        ConversionDirection::UsdcToUsd => row.supports_usdc_to_usd,
        ConversionDirection::UsdToUsdc => row.supports_usd_to_usdc,
        ConversionDirection::UsdTransfer => row.supports_usd_transfer,
    };
    row.status == ProviderStatus::Active
        && direction_ok
        && row.min_amount <= amount
        && amount <= row.max_amount
        && row
            .daily_volume_limit
            .is_none_or(|l| row.daily_volume_used + in_flight + amount <= l)
        && healthy
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn selection_obeys_every_rule_and_orders_by_priority_then_cost(
        rows in arb_rows(),
        direction in arb_direction(),
        amount in money(2_000_000).prop_filter("positive", |a| *a > Decimal::ZERO),
        flying in proptest::collection::vec(money(5_000_000), 8),
    ) {
        let in_flight: HashMap<Uuid, Decimal> = rows.iter().zip(&flying).map(|(r, f)| (r.id, *f)).collect();
        let s = select_providers(&rows, direction, amount, &in_flight, &recent(&rows), &HealthRule::default());

        // Every candidate lands in exactly one list.
        prop_assert_eq!(s.eligible.len() + s.rejected.len(), rows.len());

        // Every returned provider satisfies all constraints; every other one breaks at least one.
        for row in &rows {
            let ok = allowed(row, direction, amount, in_flight[&row.id]);
            let listed = s.eligible.iter().any(|p| p.row.id == row.id);
            prop_assert_eq!(ok, listed, "row {:?}", row);
            if !ok {
                let rejected = s.rejected.iter().find(|r| r.row.id == row.id);
                prop_assert!(rejected.is_some_and(|r| !r.reasons.is_empty()));
            }
        }

        // Ordered by (priority, expected cost), and the cost is the documented formula.
        for p in &s.eligible {
            let cost = amount * p.row.fee_percentage + p.row.fee_fixed + amount * p.row.spread_bps / dec!(10000);
            prop_assert_eq!(p.expected_cost, cost);
            prop_assert_eq!(p.expected_cost, expected_cost(&p.row, amount));
        }
        for pair in s.eligible.windows(2) {
            let a = (pair[0].row.priority, pair[0].expected_cost);
            let b = (pair[1].row.priority, pair[1].expected_cost);
            prop_assert!(a <= b, "{:?} before {:?}", a, b);
        }
    }

    #[test]
    fn quotes_rank_by_all_in_cost_then_the_order_without_them(
        rows in arb_rows(),
        amount in money(2_000_000).prop_filter("positive", |a| *a > Decimal::ZERO),
        prices in proptest::collection::vec(
            proptest::option::of((9_900u32..=10_000, 0..500_000i64)), 8),
    ) {
        let direction = ConversionDirection::UsdcToUsd;
        let s = select_providers(&rows, direction, amount, &HashMap::new(), &recent(&rows), &HealthRule::default());
        let before: Vec<Uuid> = s.eligible.iter().map(|p| p.row.id).collect();
        let quotes: HashMap<Uuid, Result<Quote, String>> = rows
            .iter()
            .zip(&prices)
            .map(|(r, price)| {
                let quote = match price {
                    Some((rate, fee)) => Ok(Quote {
                        rate: Decimal::new(i64::from(*rate), 4),
                        fee: usdc(Decimal::new(*fee, 2)),
                    }),
                    None => Err("down".to_owned()),
                };
                (r.id, quote)
            })
            .collect();
        let ranked = s.clone().by_quotes(amount, &quotes);
        let after: Vec<Uuid> = ranked.eligible.iter().map(|p| p.row.id).collect();

        // The same providers, only reordered; the rejected list is untouched.
        let mut a = before.clone();
        let mut b = after.clone();
        a.sort();
        b.sort();
        prop_assert_eq!(a, b);
        prop_assert_eq!(&ranked.rejected, &s.rejected);

        // Priced before unpriced, priced by all-in cost, ties and the
        // unpriced in the order they had.
        let key = |p: &RankedProvider| {
            let all_in = p.quote.as_ref().and_then(QuoteSeen::all_in);
            let place = before.iter().position(|id| *id == p.row.id).unwrap();
            (all_in.is_none(), all_in, place)
        };
        for pair in ranked.eligible.windows(2) {
            prop_assert!(key(&pair[0]) < key(&pair[1]));
        }
        for p in &ranked.eligible {
            match (&quotes[&p.row.id], &p.quote) {
                (Ok(q), Some(QuoteSeen::Priced { all_in, .. })) => {
                    prop_assert_eq!(*all_in, amount - (amount - q.fee.value) * q.rate);
                    prop_assert_eq!(*all_in, all_in_cost(amount, q));
                }
                (Err(_), Some(QuoteSeen::Failed { .. })) => {}
                other => prop_assert!(false, "quote not carried: {:?}", other),
            }
        }
    }

    #[test]
    fn selection_is_deterministic_and_independent_of_input_order(
        rows in arb_rows(),
        direction in arb_direction(),
        amount in money(2_000_000).prop_filter("positive", |a| *a > Decimal::ZERO),
        flying in proptest::collection::vec(money(5_000_000), 8),
        rotate in 0..8usize,
    ) {
        let in_flight: HashMap<Uuid, Decimal> = rows.iter().zip(&flying).map(|(r, f)| (r.id, *f)).collect();
        let rule = HealthRule::default();
        let records = recent(&rows);
        let first = select_providers(&rows, direction, amount, &in_flight, &records, &rule);
        let second = select_providers(&rows, direction, amount, &in_flight, &records, &rule);
        prop_assert_eq!(&first, &second);

        let mut shuffled = rows.clone();
        if !shuffled.is_empty() {
            let k = rotate % shuffled.len();
            shuffled.rotate_left(k);
            shuffled.reverse();
        }
        let reordered = select_providers(&shuffled, direction, amount, &in_flight, &records, &rule);
        prop_assert_eq!(first.eligible, reordered.eligible);
    }
}

fn t0() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 4, 1, 0, 0, 0).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A track record counts exactly the outcomes inside the window, per
    /// provider; an outcome that leaves the window is forgotten.
    #[test]
    fn track_records_count_exactly_the_outcomes_in_the_window(
        outcomes in proptest::collection::vec((0u128..3, -7200i64..600, any::<bool>()), 0..60),
        window_minutes in 1i64..120,
    ) {
        let outcomes: Vec<AttemptOutcome> = outcomes
            .into_iter()
            .map(|(p, offset, succeeded)| AttemptOutcome {
                provider: Uuid::from_u128(p),
                at: t0() + chrono::Duration::seconds(offset),
                succeeded,
            })
            .collect();
        let window = chrono::Duration::minutes(window_minutes);
        let records = track_records(&outcomes, t0(), window);
        for p in 0..3u128 {
            let id = Uuid::from_u128(p);
            let inside: Vec<&AttemptOutcome> = outcomes
                .iter()
                .filter(|o| o.provider == id && o.at > t0() - window)
                .collect();
            let expected = TrackRecord {
                successes: inside.iter().filter(|o| o.succeeded).count() as i64,
                failures: inside.iter().filter(|o| !o.succeeded).count() as i64,
            };
            prop_assert_eq!(records.get(&id).copied().unwrap_or_default(), expected);
        }
        // Much later, everything has left the window.
        prop_assert!(track_records(&outcomes, t0() + window + chrono::Duration::hours(1), window).is_empty());
    }
}
