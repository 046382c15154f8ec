//! Property tests of the pure windowing and planning logic.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use treasury::domain::{
    BufferAccount, ConversionDirection, ConversionTrigger, Currency, FlowEvent, FlowKind, Money,
    Thresholds,
};
use treasury::planner::{AmountLimits, BufferPosition, PlanInput, plan, split};
use treasury::window::{WindowSpec, WindowTallies};

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap()
}

fn event_strategy() -> impl Strategy<Value = FlowEvent> {
    (
        any::<bool>(),
        any::<bool>(),
        1i64..5_000_000_000,
        0i64..7_200_000,
        any::<u128>(),
    )
        .prop_map(|(deposit, usdc, units, offset_ms, id)| {
            let currency = if usdc { Currency::Usdc } else { Currency::Usd };
            FlowEvent {
                event_id: uuid::Uuid::from_u128(id),
                kind: if deposit {
                    FlowKind::Deposit
                } else {
                    FlowKind::Withdrawal
                },
                user_id: uuid::Uuid::from_u128(id ^ 1),
                amount: Money::positive(currency, Decimal::new(units, currency.scale())).unwrap(),
                occurred_at: t0() + Duration::milliseconds(offset_ms),
            }
        })
}

fn spec() -> WindowSpec {
    WindowSpec::new(
        std::time::Duration::from_secs(300),
        std::time::Duration::from_secs(30),
    )
}

proptest! {
    #[test]
    fn window_sums_conserve_every_delta(events in prop::collection::vec(event_strategy(), 0..300),
                                        closed_minutes in prop::option::of(0i64..120)) {
        let next_open = closed_minutes.map(|m| spec().window_start(t0() + Duration::minutes(m)));
        let mut tallies = WindowTallies::default();
        let mut expected: BTreeMap<BufferAccount, Decimal> = BTreeMap::new();
        let mut demand: BTreeMap<ConversionDirection, Decimal> = BTreeMap::new();
        for e in &events {
            let a = spec().assign(e.occurred_at, next_open);
            // An event counts in its own window unless that window is closed;
            // then in the first open one. Never before the first open window.
            if let Some(open) = next_open {
                prop_assert!(a.window_start >= open);
                prop_assert_eq!(a.late, spec().window_start(e.occurred_at) < open);
            }
            if !a.late {
                prop_assert!(a.window_start <= e.occurred_at && e.occurred_at < spec().window_end(a.window_start));
            }
            tallies.add(e, a);
            for d in e.buffer_deltas() {
                *expected.entry(d.account).or_default() += d.delta;
            }
            if let Some((dir, amount)) = e.demand() {
                *demand.entry(dir).or_default() += amount;
            }
        }
        let counted: u64 = tallies.0.values().map(|t| t.events).sum();
        prop_assert_eq!(counted, events.len() as u64, "every event in exactly one window");
        for account in BufferAccount::ALL {
            let sum: Decimal = tallies.0.values().map(|t| t.net(account)).sum();
            prop_assert_eq!(sum, expected.get(&account).copied().unwrap_or_default());
        }
        for (dir, amount) in demand {
            let sum: Decimal = tallies.0.values().filter_map(|t| t.demand.get(&dir)).map(|(a, _)| *a).sum();
            prop_assert_eq!(sum, amount);
        }
    }
}

fn position_strategy(account: BufferAccount) -> impl Strategy<Value = BufferPosition> {
    let (min, target, max, batch) = match account {
        BufferAccount::SystemBufferUsdc => (10_000, 50_000, 100_000, 20_000),
        BufferAccount::SystemBufferFiat => (20_000, 100_000, 200_000, 50_000),
        BufferAccount::BrokerOperational => (50_000, 200_000, 500_000, 100_000),
    };
    let scale = account.currency().scale();
    (-50_000_000i64..80_000_000, 0i64..50_000, 0i64..50_000).prop_map(move |(cents, inc, out)| {
        BufferPosition {
            account,
            thresholds: Thresholds::new(
                Decimal::from(min),
                Decimal::from(target),
                Decimal::from(max),
            )
            .unwrap(),
            batch_size: Decimal::from(batch),
            balance: Decimal::new(cents, 2).round_dp(scale),
            incoming: Decimal::from(inc),
            outgoing: Decimal::from(out),
        }
    })
}

fn input_strategy() -> impl Strategy<Value = PlanInput> {
    (
        position_strategy(BufferAccount::SystemBufferUsdc),
        position_strategy(BufferAccount::SystemBufferFiat),
        position_strategy(BufferAccount::BrokerOperational),
        1u32..1_000,
        1u32..2_000_000,
        0u32..1_000_000,
    )
        .prop_map(|(a, b, c, min, span, cycle)| {
            let limits = AmountLimits {
                min: Decimal::from(min),
                max: Decimal::from(min + span),
            };
            PlanInput {
                cycle_id: format!("window:{cycle}"),
                now: t0(),
                positions: vec![a, b, c],
                limits: BTreeMap::from([
                    (ConversionDirection::UsdcToUsd, limits),
                    (ConversionDirection::UsdToUsdc, limits),
                ]),
            }
        })
}

proptest! {
    #[test]
    fn plans_never_take_a_source_below_its_minimum_and_are_deterministic(input in input_strategy()) {
        let planned = plan(&input);
        prop_assert_eq!(&planned, &plan(&input), "same input, same plan");
        let mut projected: BTreeMap<BufferAccount, Decimal> =
            input.positions.iter().map(|p| (p.account, p.projected())).collect();
        let limits = input.limits[&ConversionDirection::UsdcToUsd];
        for c in &planned.commands {
            prop_assert!(c.amount.value > Decimal::ZERO);
            prop_assert!(c.amount.value <= limits.max, "within the largest provider maximum");
            prop_assert_eq!(c.amount.currency, c.direction.source_currency());
            prop_assert!(c.amount.value.scale() <= c.amount.currency.scale());
            prop_assert_eq!(c.direction, ConversionDirection::refilling(c.destination_account));
            prop_assert_eq!(c.source_account, ConversionDirection::source_for(c.destination_account));
            *projected.get_mut(&c.source_account).unwrap() -= c.amount.value;
            *projected.get_mut(&c.destination_account).unwrap() += c.amount.value;
        }
        for p in &input.positions {
            let sent: Decimal = planned.commands.iter().filter(|c| c.source_account == p.account).map(|c| c.amount.value).sum();
            if sent > Decimal::ZERO {
                prop_assert!(projected[&p.account] >= p.thresholds.min(), "{} left below its minimum", p.account);
            }
            let received = planned.commands.iter().any(|c| c.destination_account == p.account);
            if received {
                let below_min = p.projected() < p.thresholds.min();
                let big_gap = p.thresholds.target() - p.projected() >= p.batch_size;
                prop_assert!(below_min || big_gap, "only buffers that need it are refilled");
                let trigger = planned.commands.iter().find(|c| c.destination_account == p.account).unwrap().trigger;
                prop_assert_eq!(trigger == ConversionTrigger::Emergency, below_min);
            }
        }
        let ids: std::collections::BTreeSet<_> = planned.commands.iter().map(|c| c.command_id).collect();
        prop_assert_eq!(ids.len(), planned.commands.len(), "command ids are distinct");
    }

    #[test]
    fn splitting_keeps_the_exact_total_within_limits(units in 1i64..10_000_000_000, max in 100i64..1_000_000, scale in prop::sample::select(vec![2u32, 6])) {
        let amount = Decimal::new(units, scale);
        let limits = AmountLimits { min: Decimal::ONE, max: Decimal::from(max) };
        let pieces = split(amount, &limits, scale);
        prop_assert_eq!(pieces.iter().copied().sum::<Decimal>(), amount);
        prop_assert!(pieces.iter().all(|p| *p > Decimal::ZERO && *p <= limits.max && p.scale() <= scale));
        let fewest = (amount / limits.max).ceil();
        prop_assert_eq!(Decimal::from(pieces.len()), fewest.max(Decimal::ONE));
    }
}
