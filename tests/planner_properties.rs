//! Property tests of the pure windowing and planning logic.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use rust_decimal::Decimal;
use treasury::domain::{
    BufferAccount, ConversionDirection, ConversionTrigger, Currency, FlowEvent, FlowKind, Money,
    Thresholds,
};
use treasury::planner::{
    AmountLimits, BufferPosition, FlowHistory, FlowStats, InFlight, PlanInput, PlannerSettings,
    pieces_for, plan, split, urgent_pieces, without_overdue,
};
use treasury::providers::selection::expected_cost;
use treasury::providers::{ProviderRow, ProviderStatus};
use treasury::simulate::invariants::check_plan;
use treasury::simulate::scenario::provider_row;
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
        prop::collection::vec((-200_000i64..200_000, 0i64..100_000), 3),
        prop::option::of(0i64..7_200),
        any::<bool>(),
        prop::option::of((0i64..=86_400, prop::collection::vec(-50_000i64..50_000, 3))),
        0u32..=8,
        prop::collection::vec(0i64..7_200, 3),
    )
        .prop_map(
            |(
                a,
                b,
                c,
                min,
                span,
                cycle,
                flows,
                lead_seconds,
                transfers,
                forecast,
                halves,
                ages,
            )| {
                let provider = ProviderRow {
                    min_amount: Decimal::from(min),
                    max_amount: Decimal::from(min + span),
                    supports_usd_transfer: transfers,
                    ..provider_row("P", 1)
                };
                let mut history = FlowHistory::default();
                for (account, (mean, sd)) in BufferAccount::ALL.into_iter().zip(flows) {
                    history.flows.insert(
                        account,
                        FlowStats {
                            mean: Decimal::from(mean),
                            std_dev: Decimal::from(sd),
                            recent_mean: Decimal::from(mean / 2),
                            outflow_events: Decimal::ZERO,
                            windows: 288,
                        },
                    );
                }
                history.lead_time_p95 = lead_seconds.map(Duration::seconds);
                history.cycle = Duration::minutes(5);
                let mut settings = PlannerSettings {
                    relay_reserve: Decimal::from(halves) / Decimal::TWO,
                    ..PlannerSettings::default()
                };
                if let Some((horizon, steps)) = forecast {
                    settings.forecast_horizon = Duration::seconds(horizon);
                    for (account, step) in BufferAccount::ALL.into_iter().zip(steps) {
                        let nets = (0..288i64)
                            .map(|i| Decimal::from(step * (i % 7 - 3)))
                            .collect();
                        history.nets.insert(account, nets);
                    }
                }
                let positions = vec![a, b, c];
                // Each buffer's incoming as one conversion, planned `age` seconds ago.
                let in_flight = positions
                    .iter()
                    .zip(ages)
                    .filter(|(p, _)| p.incoming > Decimal::ZERO)
                    .map(|(p, age)| InFlight {
                        destination: p.account,
                        amount: p.incoming,
                        since: t0() - Duration::seconds(age),
                    })
                    .collect();
                PlanInput {
                    cycle_id: format!("window:{cycle}"),
                    now: t0(),
                    positions,
                    in_flight,
                    providers: vec![provider],
                    window: Duration::minutes(5),
                    history,
                    settings,
                    watch: None,
                }
            },
        )
}

proptest! {
    #[test]
    fn plans_are_consistent_funded_and_deterministic(input in input_strategy()) {
        let planned = plan(&input);
        prop_assert_eq!(&planned, &plan(&input), "same input, same plan");
        // Needs are judged on money in flight within the lead time only.
        let lead = input.history.lead_time_p95.unwrap_or(input.settings.default_lead_time);
        let relied = without_overdue(&input.positions, &input.in_flight, input.now, lead);
        for (p, r) in input.positions.iter().zip(&relied) {
            prop_assert!(r.incoming <= p.incoming && r.incoming >= Decimal::ZERO);
            prop_assert_eq!((r.balance, r.outgoing), (p.balance, p.outgoing), "only incoming is discounted");
        }
        let checks = check_plan(&input.positions, &planned.commands);
        prop_assert!(!checks.opposite_directions, "opposite conversions in one cycle: {:?}", planned.commands);
        prop_assert!(checks.below_minimum.is_empty(), "{:?}", checks.below_minimum);
        let limits = &input.providers[0];
        let mut moved: BTreeMap<BufferAccount, Decimal> = BTreeMap::new();
        for c in &planned.commands {
            prop_assert!(c.amount.value >= limits.min_amount && c.amount.value <= limits.max_amount, "within provider limits");
            prop_assert_eq!(c.amount.currency, c.direction.source_currency());
            prop_assert_eq!(c.source_account.currency(), c.direction.source_currency());
            prop_assert_eq!(c.destination_account.currency(), c.direction.destination_currency());
            prop_assert!(c.amount.value.scale() <= c.amount.currency.scale());
            prop_assert_eq!(ConversionDirection::between(c.source_account, c.destination_account), Some(c.direction));
            prop_assert!(c.direction.is_conversion() || limits.supports_usd_transfer,
                "a usd_transfer only when a provider carries transfers out");
            *moved.entry(c.source_account).or_default() -= c.amount.value;
            *moved.entry(c.destination_account).or_default() += c.amount.value;
        }
        prop_assert_eq!(moved.values().copied().sum::<Decimal>(), Decimal::ZERO, "money moves, it is not made");
        for c in &planned.commands {
            prop_assert!(
                !planned.commands.iter().any(|o| o.source_account == c.destination_account),
                "{} both receives and gives", c.destination_account
            );
            let p = relied.iter().find(|p| p.account == c.destination_account).unwrap();
            let l = planned.levels[&p.account];
            prop_assert!(l.trigger >= p.thresholds.min() && l.return_point <= p.thresholds.max(), "hard limits: {:?}", l);
            prop_assert!(l.sweep_point >= l.return_point, "a sweep never goes below the return point: {:?}", l);
            let needs = p.projected() < l.trigger;
            prop_assert!(needs || c.trigger == ConversionTrigger::ScheduledRebalance,
                "only a buffer below its trigger is refilled; others receive sweeps or routed money");
            if c.trigger == ConversionTrigger::Emergency {
                prop_assert!(p.projected() < p.thresholds.min());
            }
        }
        for (account, l) in &planned.levels {
            let p = input.positions.iter().find(|p| p.account == *account).unwrap();
            prop_assert!(l.trigger >= p.thresholds.min() && l.trigger <= p.thresholds.target());
            prop_assert!(l.return_point >= p.thresholds.target() && l.return_point <= p.thresholds.max());
            prop_assert!(l.sweep_point >= l.return_point && l.sweep_point <= p.thresholds.max());
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

    #[test]
    fn urgent_pieces_keep_the_total_and_stay_within_a_kth_of_the_band(
        pieces in proptest::collection::vec(1i64..100_000_000_000, 1..4),
        band_percent in prop::option::of(8i64..500),
        k in 1u32..8,
        min in 1i64..1_000_000,
        scale in prop::sample::select(vec![2u32, 6]),
    ) {
        let pieces: Vec<Decimal> = pieces.iter().map(|u| Decimal::new(*u, scale)).collect();
        // The band as a share of the largest piece (so no piece needs more
        // than 100 cuts), or none.
        let largest = pieces.iter().copied().max().unwrap_or_default();
        let band = band_percent.map_or(Decimal::ZERO, |pc| {
            (largest * Decimal::from(pc) / Decimal::ONE_HUNDRED).round_dp(scale)
        });
        let limits = AmountLimits { min: Decimal::new(min, scale), max: Decimal::MAX };
        let cut = urgent_pieces(&pieces, band, k, &limits, scale);
        prop_assert_eq!(cut.iter().copied().sum::<Decimal>(), pieces.iter().copied().sum::<Decimal>());
        prop_assert!(cut.len() >= pieces.len());
        prop_assert!(cut.iter().all(|p| *p > Decimal::ZERO && p.scale() <= scale));
        // Every piece cut is at least the providers' minimum; one left whole
        // is as it was.
        let split_any = cut.len() > pieces.len();
        if split_any {
            prop_assert!(cut.iter().all(|p| *p >= limits.min || pieces.contains(p)));
        }
        if k > 1 && band > Decimal::ZERO {
            let cap = (band / Decimal::from(k)).round_dp_with_strategy(scale, rust_decimal::RoundingStrategy::ToZero).max(limits.min);
            // A piece larger than the cap is only kept whole when cutting it
            // would make pieces below the minimum; otherwise each piece is
            // at most the cap plus the rounding of one unit per piece.
            let unit = Decimal::new(1, scale) * Decimal::from(cut.len() as u64);
            for p in &cut {
                prop_assert!(*p <= cap + unit || *p < limits.min * Decimal::TWO, "{} over {} (cap {})", p, band, cap);
            }
        } else {
            prop_assert_eq!(cut, pieces);
        }
    }

    #[test]
    fn pieces_go_to_the_provider_whose_limits_make_the_move_cheapest(
        cents in 10_000i64..300_000_000,
        offers in proptest::collection::vec(
            (0u32..40, 0i64..500, 100i64..2_000_000, proptest::option::of(0i64..5_000_000), any::<bool>()),
            0..4),
    ) {
        let amount = Decimal::new(cents, 2);
        let direction = ConversionDirection::UsdcToUsd;
        let rows: Vec<ProviderRow> = offers
            .iter()
            .enumerate()
            .map(|(i, (fee_bps, fixed_cents, max, daily, active))| ProviderRow {
                id: uuid::Uuid::from_u128(i as u128 + 1),
                name: format!("p{i}"),
                provider_type: "sandbox".into(),
                priority: i as i32,
                status: if *active { ProviderStatus::Active } else { ProviderStatus::Inactive },
                supports_usdc_to_usd: true,
                supports_usd_to_usdc: true,
                supports_usd_transfer: false,
                min_amount: Decimal::from(100),
                max_amount: Decimal::from(*max),
                daily_volume_limit: daily.map(Decimal::from),
                daily_volume_used: Decimal::ZERO,
                success_count: 0,
                failure_count: 0,
                fee_percentage: Decimal::new(i64::from(*fee_bps), 4),
                fee_fixed: Decimal::new(*fixed_cents, 2),
                spread_bps: Decimal::from(5),
                credentials_ref: None,
                base_url: None,
            })
            .collect();
        let largest = AmountLimits { min: Decimal::from(100), max: Decimal::from(2_000_000) };
        let pieces = pieces_for(amount, direction, &rows, &largest, 2);
        prop_assert_eq!(pieces.iter().copied().sum::<Decimal>(), amount);
        prop_assert!(pieces.iter().all(|p| *p > Decimal::ZERO));

        // Independently: every active provider that could take the whole
        // amount today, with the move cut at its maximum.
        let cost_at = |row: &ProviderRow, cut: &[Decimal]| cut.iter().map(|p| expected_cost(row, *p)).sum::<Decimal>();
        let fitting: Vec<(&ProviderRow, Vec<Decimal>)> = rows
            .iter()
            .filter(|r| r.status == ProviderStatus::Active)
            .filter(|r| r.daily_volume_limit.is_none_or(|l| l >= amount))
            .filter(|r| amount / r.max_amount <= Decimal::from(100))
            .map(|r| (r, split(amount, &AmountLimits { min: r.min_amount, max: r.max_amount }, 2)))
            .filter(|(r, cut)| cut.iter().all(|p| *p >= r.min_amount && *p <= r.max_amount))
            .collect();
        match fitting.iter().map(|(r, cut)| cost_at(r, cut)).min() {
            None => prop_assert_eq!(pieces, split(amount, &largest, 2)),
            Some(cheapest) => {
                let chosen = fitting.iter().find(|(r, cut)| *cut == pieces && cost_at(r, cut) == cheapest);
                prop_assert!(chosen.is_some(), "{:?} is not the cheapest cut ({})", pieces, cheapest);
            }
        }
    }
}
