//! Property tests for the domain model: exact money, thresholds, the job
//! status machine, balanced postings, the flow table and command ids.
//!
//! Oracles are independent of the code under test: sums are checked against
//! integer arithmetic on minor units (i128), the job machine against a list of
//! legal transitions written out below, the flow table against the design brief.

use std::collections::{BTreeMap, HashSet};

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use proptest::sample::Index;
use rust_decimal::Decimal;
use treasury::domain::amount::MAX_MAGNITUDE;
use treasury::domain::{
    Amount, AmountError, BufferAccount, BufferStatus, ConversionCommand, ConversionDirection,
    Currency, CurrencyUnit, EntrySide, FLOW_TABLE, FlowEvent, FlowKind, JobStatus, LedgerEntry,
    LedgerPosting, Money, PostingError, Thresholds, Usd, UsdAmount, Usdc, UsdcAmount,
};
use uuid::Uuid;

/// Largest mantissa a `rust_decimal::Decimal` can hold (2^96 - 1).
const DECIMAL_MAX_MANTISSA: i128 = (1i128 << 96) - 1;

/// Proptest settings: no regression files written next to the tests.
fn config() -> ProptestConfig {
    ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn pow10(exp: u32) -> i128 {
    10i128.pow(exp)
}

/// `mantissa × 10^-scale` expressed in units of `10^-unit_scale` (unit_scale >= scale).
fn to_units(mantissa: i128, scale: u32, unit_scale: u32) -> i128 {
    mantissa * pow10(unit_scale - scale)
}

/// The exact value `units × 10^-unit_scale` reduced to its shortest form, or
/// `None` when no `Decimal` can hold it exactly.
fn exact_decimal(units: i128, unit_scale: u32) -> Option<Decimal> {
    let (mut mantissa, mut scale) = (units, unit_scale);
    while scale > 0 && mantissa % 10 == 0 {
        mantissa /= 10;
        scale -= 1;
    }
    if mantissa.abs() > DECIMAL_MAX_MANTISSA {
        return None;
    }
    Some(Decimal::from_i128_with_scale(mantissa, scale))
}

/// A realistic amount (up to 10^15 minor units of either sign) as (mantissa, scale).
fn amount_parts(max_scale: u32) -> impl Strategy<Value = (i64, u32)> {
    (
        -1_000_000_000_000_000i64..=1_000_000_000_000_000i64,
        0..=max_scale,
    )
}

/// Any amount a `Decimal` can hold at a scale the currency allows, as (mantissa, scale).
fn extreme_amount_parts(max_scale: u32) -> impl Strategy<Value = (i128, u32)> {
    (-DECIMAL_MAX_MANTISSA..=DECIMAL_MAX_MANTISSA, 0..=max_scale)
}

/// Sums `parts` with `Amount<C>::checked_add` and compares with the integer oracle.
fn check_typed_sum<C: CurrencyUnit>(parts: &[(i64, u32)]) -> Result<(), TestCaseError> {
    let mut total = Amount::<C>::ZERO;
    let mut units = 0i128;
    for &(mantissa, scale) in parts {
        let amount = Amount::<C>::new(Decimal::new(mantissa, scale))
            .map_err(|e| TestCaseError::fail(format!("valid amount rejected: {e}")))?;
        prop_assert_eq!(amount.currency(), C::CURRENCY);
        total = total
            .checked_add(amount)
            .ok_or_else(|| TestCaseError::fail("overflow at realistic magnitudes"))?;
        units += to_units(mantissa.into(), scale, C::SCALE);
        prop_assert_eq!(total.currency(), C::CURRENCY);
        prop_assert!(
            total.value().scale() <= C::SCALE,
            "sum {} has more than {} decimals",
            total.value(),
            C::SCALE
        );
    }
    let expected = exact_decimal(units, C::SCALE).expect("realistic sums fit a Decimal");
    prop_assert_eq!(total.value(), expected);

    // Subtracting every part again returns exactly to zero.
    let mut back = total;
    for &(mantissa, scale) in parts.iter().rev() {
        back = back
            .checked_sub(Amount::<C>::new(Decimal::new(mantissa, scale)).unwrap())
            .ok_or_else(|| TestCaseError::fail("overflow subtracting"))?;
        prop_assert!(back.value().scale() <= C::SCALE);
    }
    prop_assert_eq!(back.value(), Decimal::ZERO);
    prop_assert_eq!(back, Amount::<C>::ZERO);
    Ok(())
}

/// `checked_add` of two amounts either gives the exact sum or `None`; it never
/// rounds. Checked against the integer oracle, at any magnitude a `Decimal` holds.
fn check_add_is_exact_or_none<C: CurrencyUnit>(
    a: (i128, u32),
    b: (i128, u32),
) -> Result<(), TestCaseError> {
    let (da, db) = (
        Decimal::from_i128_with_scale(a.0, a.1),
        Decimal::from_i128_with_scale(b.0, b.1),
    );
    // Amounts beyond 10^18 are refused outright (so every sum stays exact).
    let (x, y) = match (Amount::<C>::new(da), Amount::<C>::new(db)) {
        (Ok(x), Ok(y)) => (x, y),
        (x, y) => {
            for (d, r) in [(da, x.is_err()), (db, y.is_err())] {
                prop_assert_eq!(r, d.abs() > MAX_MAGNITUDE, "{} refused iff beyond 10^18", d);
            }
            return Ok(());
        }
    };
    let units = to_units(a.0, a.1, C::SCALE) + to_units(b.0, b.1, C::SCALE);
    let exact = exact_decimal(units, C::SCALE).filter(|e| e.abs() <= MAX_MAGNITUDE);
    match (x.checked_add(y), exact) {
        (Some(sum), Some(exact)) => prop_assert_eq!(sum.value(), exact),
        (None, None) => {}
        (Some(sum), None) => prop_assert!(
            false,
            "{x} + {y} returned {sum}, but the exact sum is beyond the supported range"
        ),
        (None, Some(exact)) => prop_assert!(false, "{x} + {y} = {exact} but checked_add gave None"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn usd_sums_are_exact_and_stay_in_cents(parts in prop::collection::vec(amount_parts(2), 1..20)) {
        check_typed_sum::<Usd>(&parts)?;
    }

    #[test]
    fn usdc_sums_are_exact_and_stay_in_micro_units(parts in prop::collection::vec(amount_parts(6), 1..20)) {
        check_typed_sum::<Usdc>(&parts)?;
    }

    #[test]
    fn money_sums_keep_currency_and_are_exact(
        usd in prop::collection::vec(amount_parts(2), 1..12),
        usdc in prop::collection::vec(amount_parts(6), 1..12),
    ) {
        for (currency, parts) in [(Currency::Usd, &usd), (Currency::Usdc, &usdc)] {
            let mut total = Money::zero(currency);
            let mut units = 0i128;
            for &(mantissa, scale) in parts {
                let money = Money::new(currency, Decimal::new(mantissa, scale)).unwrap();
                total = total.checked_add(money).unwrap();
                units += to_units(mantissa.into(), scale, currency.scale());
                prop_assert_eq!(total.currency, currency);
                prop_assert!(total.value.scale() <= currency.scale());
            }
            prop_assert_eq!(total.value, exact_decimal(units, currency.scale()).unwrap());
            let round_trip = total.checked_sub(total).unwrap();
            prop_assert_eq!(round_trip, Money::zero(currency));
        }
    }

    #[test]
    fn usd_checked_add_never_rounds_at_any_magnitude(
        a in extreme_amount_parts(2),
        b in extreme_amount_parts(2),
    ) {
        check_add_is_exact_or_none::<Usd>(a, b)?;
    }

    #[test]
    fn usdc_checked_add_never_rounds_at_any_magnitude(
        a in extreme_amount_parts(6),
        b in extreme_amount_parts(6),
    ) {
        check_add_is_exact_or_none::<Usdc>(a, b)?;
    }

    #[test]
    fn usd_rejects_three_or_more_decimals(
        mantissa in any::<i64>().prop_filter("last digit nonzero", |m| m % 10 != 0),
        scale in 3u32..=28,
    ) {
        let value = Decimal::new(mantissa, scale);
        let expected = AmountError::TooPrecise { currency: Currency::Usd, value, scale, max: 2 };
        prop_assert_eq!(UsdAmount::new(value), Err(expected.clone()));
        prop_assert_eq!(UsdAmount::positive(value), Err(expected.clone()));
        prop_assert_eq!(Money::new(Currency::Usd, value), Err(expected.clone()));
        prop_assert_eq!(Money::positive(Currency::Usd, value), Err(expected));
        // The same value is fine in USDC when it has at most 6 decimals.
        prop_assert_eq!(UsdcAmount::new(value).is_ok(), scale <= 6);
    }

    #[test]
    fn usdc_rejects_seven_or_more_decimals(
        mantissa in any::<i64>().prop_filter("last digit nonzero", |m| m % 10 != 0),
        scale in 7u32..=28,
    ) {
        let value = Decimal::new(mantissa, scale);
        let expected = AmountError::TooPrecise { currency: Currency::Usdc, value, scale, max: 6 };
        prop_assert_eq!(UsdcAmount::new(value), Err(expected.clone()));
        prop_assert_eq!(Money::new(Currency::Usdc, value), Err(expected));
        prop_assert!(UsdAmount::new(value).is_err());
    }

    #[test]
    fn trailing_zeros_are_not_precision(
        mantissa in -1_000_000_000i64..=1_000_000_000,
        scale in 0u32..=6,
        zeros in 0u32..=9,
    ) {
        // mantissa × 10^zeros at scale + zeros is the same number written longer.
        let long = Decimal::new(mantissa * 10i64.pow(zeros), scale + zeros);
        let usdc = UsdcAmount::new(long).unwrap();
        prop_assert_eq!(usdc.value(), Decimal::new(mantissa, scale));
        prop_assert!(usdc.value().scale() <= 6);
        if scale <= 2 {
            let usd = UsdAmount::new(long).unwrap();
            prop_assert_eq!(usd.value(), Decimal::new(mantissa, scale));
            prop_assert!(usd.value().scale() <= 2);
        }
    }

    #[test]
    fn positive_accepts_exactly_values_above_zero(mantissa in -1_000_000i64..=1_000_000, scale in 0u32..=2) {
        let value = Decimal::new(mantissa, scale);
        prop_assert_eq!(UsdAmount::positive(value).is_ok(), mantissa > 0);
        prop_assert_eq!(UsdcAmount::positive(value).is_ok(), mantissa > 0);
        prop_assert_eq!(Money::positive(Currency::Usd, value).is_ok(), mantissa > 0);
        if mantissa <= 0 {
            prop_assert_eq!(UsdAmount::positive(value), Err(AmountError::NotPositive(value)));
        }
    }

    #[test]
    fn money_never_mixes_currencies(
        (m1, s1) in amount_parts(2),
        (m2, s2) in amount_parts(2),
        usd_first in any::<bool>(),
    ) {
        let usd = Money::new(Currency::Usd, Decimal::new(m1, s1)).unwrap();
        let usdc = Money::new(Currency::Usdc, Decimal::new(m2, s2)).unwrap();
        let (left, right) = if usd_first { (usd, usdc) } else { (usdc, usd) };
        let mismatch = AmountError::CurrencyMismatch { left: left.currency, right: right.currency };
        prop_assert_eq!(left.checked_add(right), Err(mismatch.clone()));
        prop_assert_eq!(left.checked_sub(right), Err(mismatch));
        prop_assert!(
            matches!(usd.typed::<Usdc>(), Err(AmountError::CurrencyMismatch { .. })),
            "USD money typed as USDC"
        );
        prop_assert!(
            matches!(usdc.typed::<Usd>(), Err(AmountError::CurrencyMismatch { .. })),
            "USDC money typed as USD"
        );
        prop_assert_eq!(usd.typed::<Usd>().unwrap().value(), usd.value);
        prop_assert_eq!(usdc.typed::<Usdc>().unwrap().value(), usdc.value);
        prop_assert_eq!(usd.typed::<Usd>().unwrap().to_money(), usd);
    }

    #[test]
    fn typed_rechecks_the_scale(mantissa in 1i64..1_000_000_000, scale in 3u32..=6) {
        // Built as USDC-precise money but labelled USD by hand: typed() must refuse it.
        let forged = Money { currency: Currency::Usd, value: Decimal::new(mantissa * 10 + 1, scale) };
        prop_assert!(
            matches!(forged.typed::<Usd>(), Err(AmountError::TooPrecise { .. })),
            "{} accepted as USD",
            forged.value
        );
    }
}

#[test]
fn checked_add_does_not_round_a_cent_away() {
    // At the largest supported magnitude one more cent is an overflow, never
    // a silently rounded sum; beyond it amounts are refused.
    let big = UsdAmount::new(MAX_MAGNITUDE).unwrap();
    let cent = UsdAmount::new(Decimal::new(1, 2)).unwrap();
    assert_eq!(big.checked_add(cent), None);
    assert_eq!(
        big.checked_sub(cent).map(|a| a.value()),
        Some(MAX_MAGNITUDE - Decimal::new(1, 2))
    );
    assert!(matches!(
        UsdAmount::new(Decimal::from_i128_with_scale(pow10(28), 0)),
        Err(AmountError::OutOfRange(_))
    ));
}

// ---------------------------------------------------------------- thresholds

fn status_rank(status: BufferStatus) -> u8 {
    match status {
        BufferStatus::CriticalLow => 0,
        BufferStatus::BelowTarget => 1,
        BufferStatus::Healthy => 2,
        BufferStatus::OverCapitalized => 3,
    }
}

/// The documented meaning of each status, written independently of the code.
fn expected_status(min: Decimal, target: Decimal, max: Decimal, balance: Decimal) -> BufferStatus {
    if balance < min {
        BufferStatus::CriticalLow
    } else if balance < target {
        BufferStatus::BelowTarget
    } else if balance > max {
        BufferStatus::OverCapitalized
    } else {
        BufferStatus::Healthy
    }
}

/// A strictly ordered-or-equal positive triple at up to 6 decimals.
fn valid_thresholds() -> impl Strategy<Value = (Decimal, Decimal, Decimal)> {
    (
        1i64..=1_000_000_000_000,
        0i64..=1_000_000_000_000,
        0i64..=1_000_000_000_000,
        0u32..=6,
        any::<bool>(),
    )
        .prop_map(|(min, up1, up2, scale, collapse)| {
            // Equal thresholds are legal (min <= target <= max); exercise them often.
            let (up1, up2) = if collapse {
                (up1 % 2, up2 % 2)
            } else {
                (up1, up2)
            };
            let min = Decimal::new(min, scale);
            let target = min + Decimal::new(up1, scale);
            let max = target + Decimal::new(up2, scale);
            (min, target, max)
        })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn thresholds_accept_exactly_ordered_positive_triples(
        a in -3i64..=8, b in -3i64..=8, c in -3i64..=8, scale in 0u32..=6,
    ) {
        let (min, target, max) = (Decimal::new(a, scale), Decimal::new(b, scale), Decimal::new(c, scale));
        let legal = a > 0 && a <= b && b <= c;
        match Thresholds::new(min, target, max) {
            Ok(t) => {
                prop_assert!(legal, "accepted {min} / {target} / {max}");
                prop_assert_eq!((t.min(), t.target(), t.max()), (min, target, max));
            }
            Err(e) => {
                prop_assert!(!legal, "rejected {min} / {target} / {max}: {e}");
                prop_assert_eq!((e.min, e.target, e.max), (min, target, max));
            }
        }
    }

    #[test]
    fn status_matches_its_definition_and_is_monotone(
        (min, target, max) in valid_thresholds(),
        b1 in -2_000_000_000_000i64..=4_000_000_000_000,
        b2 in -2_000_000_000_000i64..=4_000_000_000_000,
        scale in 0u32..=6,
    ) {
        let t = Thresholds::new(min, target, max).unwrap();
        let (x, y) = (Decimal::new(b1.min(b2), scale), Decimal::new(b1.max(b2), scale));
        prop_assert_eq!(t.status(x), expected_status(min, target, max, x));
        prop_assert_eq!(t.status(y), expected_status(min, target, max, y));
        prop_assert!(status_rank(t.status(x)) <= status_rank(t.status(y)), "{x} <= {y} but status went down");
    }

    #[test]
    fn status_boundaries_are_exact((min, target, max) in valid_thresholds()) {
        let t = Thresholds::new(min, target, max).unwrap();
        let micro = Decimal::new(1, 6);
        prop_assert_eq!(t.status(min - micro), BufferStatus::CriticalLow);
        prop_assert_eq!(t.status(Decimal::ZERO), BufferStatus::CriticalLow);
        let at_min = if min < target { BufferStatus::BelowTarget } else { BufferStatus::Healthy };
        prop_assert_eq!(t.status(min), at_min);
        if target - min > micro {
            prop_assert_eq!(t.status(target - micro), BufferStatus::BelowTarget);
        }
        prop_assert_eq!(t.status(target), BufferStatus::Healthy);
        prop_assert_eq!(t.status(max), BufferStatus::Healthy, "max itself is still healthy");
        prop_assert_eq!(t.status(max + micro), BufferStatus::OverCapitalized);
    }
}

#[test]
fn seeded_usdc_thresholds_read_as_the_original_engine_did() {
    let d = |n: i64| Decimal::new(n, 0);
    let t = Thresholds::new(d(10_000), d(50_000), d(100_000)).unwrap();
    assert_eq!(t.status(Decimal::new(999_999, 2)).as_str(), "CRITICAL_LOW");
    assert_eq!(t.status(d(10_000)).as_str(), "BELOW_TARGET");
    assert_eq!(
        t.status(Decimal::new(4_999_999, 2)).as_str(),
        "BELOW_TARGET"
    );
    assert_eq!(t.status(d(50_000)).as_str(), "HEALTHY");
    assert_eq!(t.status(d(100_000)).as_str(), "HEALTHY");
    assert_eq!(
        t.status(Decimal::new(10_000_000_001, 5)).as_str(),
        "OVER_CAPITALIZED"
    );
    assert!(
        Thresholds::new(d(0), d(1), d(2)).is_err(),
        "min must be > 0"
    );
    assert!(Thresholds::new(d(2), d(1), d(3)).is_err());
    assert!(Thresholds::new(d(1), d(3), d(2)).is_err());
}

// ------------------------------------------------------------ job statuses

/// The legal transitions, written out by hand.
///
/// From issue 2: `pending → provider_submitted → provider_processing →
/// provider_completed → ledger_updating → completed`, plus `failed` and
/// `cancelled`; `completed`, `failed`, `cancelled` are final. How far into the
/// chain `failed`/`cancelled` are reachable is the engine's choice, documented
/// in src/domain/job.rs and encoded here:
/// - a job can fail while it is pending or at the provider, not once the
///   provider completed (the money has moved: the ledger step is retried);
/// - it can be cancelled only before submission (or by a person reviewing it);
/// - a provider may report completion at its first answer
///   (`provider_submitted → provider_completed`).
///
/// `needs_review` (the provider did not answer within the conversion timeout,
/// so a person must look): entered from `provider_submitted` or
/// `provider_processing`, or from `pending` when a provider that may have
/// executed the conversion never answered the initiate call; left to `provider_processing`, `provider_completed`,
/// `failed` or `cancelled`. It is not final.
const LEGAL: &[(&str, &str)] = &[
    ("pending", "provider_submitted"),
    ("pending", "failed"),
    ("pending", "cancelled"),
    ("pending", "needs_review"),
    ("provider_submitted", "provider_processing"),
    ("provider_submitted", "provider_completed"),
    ("provider_submitted", "failed"),
    ("provider_submitted", "needs_review"),
    ("provider_processing", "provider_completed"),
    ("provider_processing", "failed"),
    ("provider_processing", "needs_review"),
    ("provider_completed", "ledger_updating"),
    ("ledger_updating", "completed"),
    ("needs_review", "provider_processing"),
    ("needs_review", "provider_completed"),
    ("needs_review", "failed"),
    ("needs_review", "cancelled"),
];

const FINAL: [&str; 3] = ["completed", "failed", "cancelled"];

const STATUS_NAMES: [&str; 9] = [
    "pending",
    "provider_submitted",
    "provider_processing",
    "provider_completed",
    "ledger_updating",
    "completed",
    "failed",
    "cancelled",
    "needs_review",
];

fn legal(from: JobStatus, to: JobStatus) -> bool {
    LEGAL.contains(&(from.as_str(), to.as_str()))
}

#[test]
fn job_status_names_are_the_documented_ones() {
    let names: Vec<&str> = JobStatus::ALL.iter().map(|s| s.as_str()).collect();
    let mut sorted_names = names.clone();
    sorted_names.sort_unstable();
    let mut expected = STATUS_NAMES.to_vec();
    expected.sort_unstable();
    assert_eq!(
        sorted_names, expected,
        "JobStatus::ALL is exactly the 9 statuses"
    );
    for status in JobStatus::ALL {
        assert_eq!(status.as_str().parse::<JobStatus>().unwrap(), status);
        assert_eq!(status.to_string(), status.as_str());
    }
    assert!("PENDING".parse::<JobStatus>().is_err());
    assert!("".parse::<JobStatus>().is_err());
}

#[test]
fn transition_succeeds_exactly_for_the_legal_pairs() {
    for from in JobStatus::ALL {
        for to in JobStatus::ALL {
            let expected = legal(from, to);
            assert_eq!(from.can_become(to), expected, "can_become {from} -> {to}");
            match from.transition(to) {
                Ok(next) => {
                    assert!(expected, "illegal {from} -> {to} was accepted");
                    assert_eq!(next, to);
                }
                Err(e) => {
                    assert!(!expected, "legal {from} -> {to} was refused");
                    assert_eq!((e.from, e.to), (from, to));
                    let text = e.to_string();
                    assert!(
                        text.contains(from.as_str()) && text.contains(to.as_str()),
                        "{text}"
                    );
                }
            }
        }
    }
    // Every pair in the hand-written list names real statuses.
    for (from, to) in LEGAL {
        assert!(from.parse::<JobStatus>().is_ok() && to.parse::<JobStatus>().is_ok());
    }
}

#[test]
fn final_states_are_exactly_completed_failed_cancelled_and_never_move() {
    for status in JobStatus::ALL {
        let is_final = FINAL.contains(&status.as_str());
        assert_eq!(status.is_final(), is_final, "{status}");
        assert_eq!(status.is_in_flight(), !is_final, "{status}");
        if is_final {
            for to in JobStatus::ALL {
                assert!(status.transition(to).is_err(), "{status} -> {to}");
            }
        }
    }
    assert!(!JobStatus::NeedsReview.is_final());
}

#[test]
fn every_status_is_reachable_from_pending_and_can_reach_a_final_state() {
    let reachable_from = |start: JobStatus| {
        let mut seen = HashSet::from([start]);
        let mut frontier = vec![start];
        while let Some(s) = frontier.pop() {
            for next in JobStatus::ALL {
                if s.transition(next).is_ok() && seen.insert(next) {
                    frontier.push(next);
                }
            }
        }
        seen
    };
    let from_pending = reachable_from(JobStatus::Pending);
    for status in JobStatus::ALL {
        assert!(from_pending.contains(&status), "{status} unreachable");
        if !status.is_final() {
            assert!(
                reachable_from(status).iter().any(|s| s.is_final()),
                "{status} can never finish"
            );
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_walks_only_take_legal_steps(choices in prop::collection::vec(0usize..9, 1..60)) {
        let mut state = JobStatus::Pending;
        let mut path = vec![state];
        for choice in choices {
            let next = JobStatus::ALL[choice];
            let was_final = state.is_final();
            match state.transition(next) {
                Ok(moved) => {
                    prop_assert!(legal(state, next), "took illegal step {} -> {}", state, next);
                    prop_assert!(!was_final, "left final state {}", state);
                    state = moved;
                    path.push(state);
                }
                Err(_) => prop_assert!(!legal(state, next), "refused legal step {} -> {}", state, next),
            }
        }
        for pair in path.windows(2) {
            prop_assert!(legal(pair[0], pair[1]));
        }
        if state == JobStatus::Completed {
            // Completion always goes through the provider and then the ledger.
            let n = path.len();
            prop_assert_eq!(&path[n - 3..], &[JobStatus::ProviderCompleted, JobStatus::LedgerUpdating, JobStatus::Completed]);
            // It starts at the provider, or with a person who found it there.
            prop_assert!(
                matches!(path[1], JobStatus::ProviderSubmitted | JobStatus::NeedsReview),
                "completed without the provider: {:?}", path
            );
        }
    }
}

// ------------------------------------------------------------------ postings

fn entry(account: &str, side: EntrySide, currency: Currency, value: Decimal) -> LedgerEntry {
    LedgerEntry {
        account: account.into(),
        side,
        amount: Money { currency, value },
        memo: format!("{account} {side:?}"),
    }
}

fn posting(entries: Vec<LedgerEntry>) -> LedgerPosting {
    LedgerPosting {
        posting_id: Uuid::from_u128(1),
        idempotency_key: "job-1".into(),
        job_id: Uuid::from_u128(2),
        description: "test".into(),
        exchange_rate: Decimal::ONE,
        entries,
        posted_at: Utc.timestamp_millis_opt(1_700_000_000_000).unwrap(),
    }
}

/// Entries that balance in `currency`: one debit per part, and credits that
/// regroup the same parts (consecutive runs cut where `cuts` says).
fn balanced_entries(
    currency: Currency,
    parts: &[(u64, u32)],
    cuts: &[bool],
    mirror: bool,
) -> Vec<LedgerEntry> {
    let (debit, credit) = if mirror {
        (EntrySide::Credit, EntrySide::Debit)
    } else {
        (EntrySide::Debit, EntrySide::Credit)
    };
    let mut entries = Vec::new();
    let mut run = Decimal::ZERO;
    for (i, &(mantissa, scale)) in parts.iter().enumerate() {
        let value = Decimal::new(mantissa as i64, scale);
        entries.push(entry(
            &format!("{currency}_source_{i}"),
            debit,
            currency,
            value,
        ));
        run += value;
        if cuts.get(i).copied().unwrap_or(false) || i + 1 == parts.len() {
            entries.push(entry(
                &format!("{currency}_sink_{i}"),
                credit,
                currency,
                run,
            ));
            run = Decimal::ZERO;
        }
    }
    entries
}

fn positive_parts(max_scale: u32) -> impl Strategy<Value = Vec<(u64, u32)>> {
    prop::collection::vec((1u64..=1_000_000_000_000, 0..=max_scale), 1..6)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn balanced_postings_pass_in_any_order(
        usd in positive_parts(2),
        usdc in positive_parts(6),
        cuts in prop::collection::vec(any::<bool>(), 6),
        which in 0u8..3,
        mirror in any::<bool>(),
        rotate in any::<Index>(),
    ) {
        let mut entries = Vec::new();
        if which != 1 {
            entries.extend(balanced_entries(Currency::Usd, &usd, &cuts, mirror));
        }
        if which != 0 {
            entries.extend(balanced_entries(Currency::Usdc, &usdc, &cuts, !mirror));
        }
        let k = rotate.index(entries.len());
        entries.rotate_left(k);
        prop_assert_eq!(posting(entries).check_balanced(), Ok(()));
    }

    #[test]
    fn perturbing_one_entry_by_any_nonzero_amount_fails(
        usd in positive_parts(2),
        usdc in positive_parts(6),
        cuts in prop::collection::vec(any::<bool>(), 6),
        target in any::<Index>(),
        delta in (-1_000_000_000_000i64..=1_000_000_000_000).prop_filter("nonzero", |d| *d != 0),
        delta_scale in 0u32..=6,
    ) {
        let mut entries = balanced_entries(Currency::Usd, &usd, &cuts, false);
        entries.extend(balanced_entries(Currency::Usdc, &usdc, &cuts, false));
        prop_assert_eq!(posting(entries.clone()).check_balanced(), Ok(()));

        let i = target.index(entries.len());
        let currency = entries[i].amount.currency;
        // A perturbation the currency can express (USD: cents at most).
        let delta = Decimal::new(delta, delta_scale.min(currency.scale()));
        let perturbed = entries[i].amount.value + delta;
        entries[i].amount.value = perturbed;
        let result = posting(entries.clone()).check_balanced();
        if perturbed <= Decimal::ZERO {
            prop_assert_eq!(result, Err(PostingError::NonPositiveEntry(entries[i].account.clone())));
        } else {
            let is_unbalanced_in_currency = matches!(
                result,
                Err(PostingError::Unbalanced { currency: c, .. }) if c == currency
            );
            prop_assert!(is_unbalanced_in_currency, "got {:?}", result);
        }
    }

    #[test]
    fn unbalanced_error_reports_the_true_totals(
        debits in positive_parts(2),
        credits in positive_parts(2),
    ) {
        let mut entries = Vec::new();
        let (mut d, mut c) = (0i128, 0i128);
        for (i, &(m, s)) in debits.iter().enumerate() {
            entries.push(entry(&format!("d{i}"), EntrySide::Debit, Currency::Usd, Decimal::new(m as i64, s)));
            d += to_units(m.into(), s, 2);
        }
        for (i, &(m, s)) in credits.iter().enumerate() {
            entries.push(entry(&format!("c{i}"), EntrySide::Credit, Currency::Usd, Decimal::new(m as i64, s)));
            c += to_units(m.into(), s, 2);
        }
        let result = posting(entries).check_balanced();
        if d == c {
            prop_assert_eq!(result, Ok(()));
        } else {
            prop_assert_eq!(result, Err(PostingError::Unbalanced {
                currency: Currency::Usd,
                debits: exact_decimal(d, 2).unwrap(),
                credits: exact_decimal(c, 2).unwrap(),
            }));
        }
    }

    #[test]
    fn equal_numbers_in_different_currencies_do_not_balance(m in 1i64..=1_000_000_000_000, s in 0u32..=2) {
        // The original engine's defect: debits = credits summed across currencies.
        let value = Decimal::new(m, s);
        let entries = vec![
            entry("system_buffer_fiat", EntrySide::Debit, Currency::Usd, value),
            entry("system_buffer_usdc", EntrySide::Credit, Currency::Usdc, value),
        ];
        let result = posting(entries).check_balanced();
        prop_assert!(matches!(result, Err(PostingError::Unbalanced { .. })), "got {:?}", result);
    }
}

#[test]
fn a_conversion_with_a_fee_balances_per_currency() {
    let d = |m: i64, s: u32| Decimal::new(m, s);
    // 1,000 USDC converted to 998.50 USD plus a 1.50 USD fee, via clearing accounts.
    let entries = vec![
        entry(
            "conversion_clearing_usdc",
            EntrySide::Debit,
            Currency::Usdc,
            d(1000, 0),
        ),
        entry(
            "system_buffer_usdc",
            EntrySide::Credit,
            Currency::Usdc,
            d(1000, 0),
        ),
        entry(
            "system_buffer_fiat",
            EntrySide::Debit,
            Currency::Usd,
            d(99850, 2),
        ),
        entry(
            "conversion_fees",
            EntrySide::Debit,
            Currency::Usd,
            d(150, 2),
        ),
        entry(
            "conversion_clearing_usd",
            EntrySide::Credit,
            Currency::Usd,
            d(1000, 0),
        ),
    ];
    assert_eq!(posting(entries).check_balanced(), Ok(()));
}

#[test]
fn empty_zero_and_negative_entries_are_rejected() {
    assert_eq!(posting(vec![]).check_balanced(), Err(PostingError::Empty));
    let zero = vec![
        entry("a", EntrySide::Debit, Currency::Usd, Decimal::ZERO),
        entry("b", EntrySide::Credit, Currency::Usd, Decimal::ZERO),
    ];
    assert_eq!(
        posting(zero).check_balanced(),
        Err(PostingError::NonPositiveEntry("a".into()))
    );
    // A negative debit and a negative credit "balance" numerically but are refused.
    let negative = vec![
        entry("a", EntrySide::Debit, Currency::Usd, Decimal::new(-5, 0)),
        entry("b", EntrySide::Credit, Currency::Usd, Decimal::new(-5, 0)),
    ];
    assert_eq!(
        posting(negative).check_balanced(),
        Err(PostingError::NonPositiveEntry("a".into()))
    );
}

#[test]
fn balance_check_is_exact_at_extreme_magnitudes() {
    // Debits 10^18 + 0.01 USD, credits 10^18 USD: off by a cent. Whether the
    // check reports the imbalance or the overflow, it must not pass or panic.
    let big = MAX_MAGNITUDE;
    let entries = vec![
        entry("a", EntrySide::Debit, Currency::Usd, big),
        entry("b", EntrySide::Debit, Currency::Usd, Decimal::new(1, 2)),
        entry("c", EntrySide::Credit, Currency::Usd, big),
    ];
    assert!(Money::new(Currency::Usd, big).is_ok());
    let result = std::panic::catch_unwind(|| posting(entries).check_balanced());
    match result {
        Ok(Ok(())) => panic!("a posting off by 0.01 USD passed check_balanced"),
        Ok(Err(_)) => {}
        Err(_) => panic!("check_balanced panicked instead of returning an error"),
    }
}

#[test]
fn balance_check_does_not_panic_when_totals_exceed_a_decimal() {
    // Entries built by hand beyond any Decimal sum: an error, never a panic
    // (which would take the worker down) and never a pass on rounded totals.
    let half = Decimal::from_i128_with_scale(5 * pow10(28), 0);
    assert!(
        Money::positive(Currency::Usd, half).is_err(),
        "refused as an amount"
    );
    let entries = vec![
        entry("a", EntrySide::Debit, Currency::Usd, half),
        entry("b", EntrySide::Debit, Currency::Usd, half),
        entry("c", EntrySide::Credit, Currency::Usd, half),
        entry("d", EntrySide::Credit, Currency::Usd, half),
    ];
    let result = std::panic::catch_unwind(|| posting(entries).check_balanced());
    assert!(
        matches!(result, Ok(Err(_))),
        "check_balanced must refuse, not panic or pass"
    );
}

// ---------------------------------------------------------------- flow table

/// What the design brief says each event does: (primary buffer, sign of its
/// delta, counterpart buffer, conversion demand).
fn expected_flow(
    kind: FlowKind,
    currency: Currency,
) -> (
    BufferAccount,
    i32,
    BufferAccount,
    Option<ConversionDirection>,
) {
    match (kind, currency) {
        (FlowKind::Deposit, Currency::Usdc) => (
            BufferAccount::SystemBufferUsdc,
            1,
            BufferAccount::BrokerOperational,
            Some(ConversionDirection::UsdcToUsd),
        ),
        (FlowKind::Withdrawal, Currency::Usdc) => (
            BufferAccount::SystemBufferUsdc,
            -1,
            BufferAccount::BrokerOperational,
            Some(ConversionDirection::UsdToUsdc),
        ),
        (FlowKind::Deposit, Currency::Usd) => (
            BufferAccount::SystemBufferFiat,
            1,
            BufferAccount::BrokerOperational,
            None,
        ),
        (FlowKind::Withdrawal, Currency::Usd) => (
            BufferAccount::SystemBufferFiat,
            -1,
            BufferAccount::BrokerOperational,
            None,
        ),
    }
}

fn flow_event(kind: FlowKind, currency: Currency, value: Decimal, id: u128) -> FlowEvent {
    FlowEvent {
        event_id: Uuid::from_u128(id),
        kind,
        user_id: Uuid::from_u128(id ^ 0xabcdef),
        amount: Money::positive(currency, value).unwrap(),
        occurred_at: Utc.timestamp_millis_opt(1_700_000_000_000).unwrap(),
    }
}

#[test]
fn flow_table_has_one_row_per_kind_and_currency_as_designed() {
    assert_eq!(FLOW_TABLE.len(), 4);
    for kind in [FlowKind::Deposit, FlowKind::Withdrawal] {
        for currency in [Currency::Usd, Currency::Usdc] {
            let rows: Vec<_> = FLOW_TABLE
                .iter()
                .filter(|(k, c, _)| *k == kind && *c == currency)
                .collect();
            assert_eq!(rows.len(), 1, "{kind:?} {currency:?}");
            let (primary, _, counterpart, demand) = expected_flow(kind, currency);
            let effect = rows[0].2;
            assert_eq!(effect.primary, primary, "{kind:?} {currency:?}");
            assert_eq!(effect.counterpart, counterpart, "{kind:?} {currency:?}");
            assert_eq!(effect.demand, demand, "{kind:?} {currency:?}");
            assert_eq!(
                primary.currency(),
                currency,
                "money lands in its own currency"
            );
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn buffer_deltas_sum_to_zero_and_demand_follows_the_table(
        deposit in any::<bool>(),
        usdc in any::<bool>(),
        mantissa in 1i64..=1_000_000_000_000_000,
        scale in 0u32..=6,
        id in any::<u128>(),
    ) {
        let kind = if deposit { FlowKind::Deposit } else { FlowKind::Withdrawal };
        let currency = if usdc { Currency::Usdc } else { Currency::Usd };
        let value = Decimal::new(mantissa, scale.min(currency.scale()));
        let event = flow_event(kind, currency, value, id);
        let (primary, sign, counterpart, demand) = expected_flow(kind, currency);

        let deltas = event.buffer_deltas();
        prop_assert_eq!(deltas[0].account, primary);
        prop_assert_eq!(deltas[0].delta, value * Decimal::from(sign));
        prop_assert_eq!(deltas[1].account, counterpart);
        for d in &deltas {
            prop_assert!(
                d.delta.scale() <= d.account.currency().scale(),
                "{} moved by {}: more decimals than its currency has", d.account, d.delta
            );
        }
        // The counterpart moves the other way at par, to its own currency's
        // scale: exact when the currencies' scales allow, else the nearest
        // cent (half to even).
        let at_par = -value * Decimal::from(sign);
        let gap = (deltas[1].delta - at_par).abs();
        let half_unit = Decimal::new(5, counterpart.currency().scale() + 1);
        prop_assert!(gap <= half_unit, "{} is not {} at par", deltas[1].delta, at_par);
        if currency.scale() <= counterpart.currency().scale() {
            prop_assert_eq!(gap, Decimal::ZERO, "same precision: exact");
        }

        prop_assert_eq!(event.demand(), demand.map(|dir| (dir, value)));
        if let Some(direction) = demand {
            // The demand refills the buffer the event drains.
            let drained = deltas.iter().find(|d| d.delta < Decimal::ZERO).unwrap().account;
            prop_assert_eq!(direction, ConversionDirection::refilling(drained));
        }
    }

    #[test]
    fn opposite_flows_of_equal_size_cancel(
        usdc in any::<bool>(),
        mantissa in 1i64..=1_000_000_000_000_000,
        scale in 0u32..=6,
    ) {
        let currency = if usdc { Currency::Usdc } else { Currency::Usd };
        let value = Decimal::new(mantissa, scale.min(currency.scale()));
        let mut per_account: BTreeMap<BufferAccount, Decimal> = BTreeMap::new();
        for (i, kind) in [FlowKind::Deposit, FlowKind::Withdrawal].into_iter().enumerate() {
            for d in flow_event(kind, currency, value, i as u128).buffer_deltas() {
                *per_account.entry(d.account).or_default() += d.delta;
            }
        }
        for (account, net) in per_account {
            prop_assert_eq!(net, Decimal::ZERO, "{} did not net to zero", account);
        }
        let dep = flow_event(FlowKind::Deposit, currency, value, 1).demand();
        let wd = flow_event(FlowKind::Withdrawal, currency, value, 2).demand();
        match (dep, wd) {
            (Some((a, x)), Some((b, y))) => {
                prop_assert!(usdc);
                prop_assert_ne!(a, b, "opposite flows create opposite demand");
                prop_assert_eq!(x, y);
            }
            (None, None) => prop_assert!(!usdc),
            other => prop_assert!(false, "asymmetric demand {:?}", other),
        }
    }
}

// ---------------------------------------------------------------- command ids

fn direction(b: bool) -> ConversionDirection {
    if b {
        ConversionDirection::UsdcToUsd
    } else {
        ConversionDirection::UsdToUsdc
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn derive_id_is_deterministic(cycle in ".{0,40}", dir in any::<bool>(), seq in any::<u32>()) {
        let a = ConversionCommand::derive_id(&cycle, direction(dir), seq);
        let b = ConversionCommand::derive_id(&cycle.clone(), direction(dir), seq);
        prop_assert_eq!(a, b);
        prop_assert!(!a.is_nil());
    }

    #[test]
    fn derive_id_differs_for_different_inputs(
        // A tiny alphabet with the separator and digits makes near-collisions likely.
        c1 in "[a1|_ u]{0,8}",
        c2 in "[a1|_ u]{0,8}",
        d1 in any::<bool>(),
        d2 in any::<bool>(),
        s1 in 0u32..12,
        s2 in 0u32..12,
    ) {
        let a = ConversionCommand::derive_id(&c1, direction(d1), s1);
        let b = ConversionCommand::derive_id(&c2, direction(d2), s2);
        prop_assert_eq!(a == b, (c1.as_str(), d1, s1) == (c2.as_str(), d2, s2));
    }
}

#[test]
fn derive_id_has_no_collisions_over_a_grid() {
    // Cycle ids that embed the separator, directions and numbers.
    let cycles = [
        "",
        "w1",
        "w1|usdc_to_usd",
        "w1|usdc_to_usd|1",
        "w1|usd_to_usdc|1",
        "w1|",
        "|w1",
        "2024-01-01T00:00:00Z",
        "2024-01-01T00:05:00Z",
        "trigger-7",
        "1",
        "11",
    ];
    let mut seen = HashSet::new();
    for cycle in cycles {
        for dir in [
            ConversionDirection::UsdcToUsd,
            ConversionDirection::UsdToUsdc,
        ] {
            for seq in (0..50).chain([u32::MAX]) {
                let id = ConversionCommand::derive_id(cycle, dir, seq);
                assert!(seen.insert(id), "collision at ({cycle:?}, {dir}, {seq})");
            }
        }
    }
}
