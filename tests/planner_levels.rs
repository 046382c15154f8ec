//! The planner's levels: in a watch while a buffer bursts (what
//! `burst_top_up` changes), and at a window close with `forecast_horizon` on
//! (the same hours of the day before size a refill and a sweep), with
//! `relay_reserve` on (USDC kept ready for the fiat buffer), and with money
//! in flight for longer than the lead time (no longer relied on); a surge of
//! withdrawals seen as a burst before its sum is; and the pieces a refill
//! comes in when a buffer lives on money in flight.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use treasury::domain::{BufferAccount, Thresholds};
use treasury::planner::{
    BufferPosition, FlowHistory, FlowStats, InFlight, PlanInput, PlannerSettings, Watch, plan,
};
use treasury::simulate::scenario::provider_row;

const USDC: BufferAccount = BufferAccount::SystemBufferUsdc;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 14, 3, 0).unwrap()
}

fn position(account: BufferAccount, balance: Decimal, incoming: Decimal) -> BufferPosition {
    let (min, target, max, batch) = match account {
        USDC => (dec!(10000), dec!(50000), dec!(100000), dec!(20000)),
        BufferAccount::SystemBufferFiat => (dec!(20000), dec!(100000), dec!(200000), dec!(50000)),
        BufferAccount::BrokerOperational => (dec!(50000), dec!(200000), dec!(500000), dec!(100000)),
    };
    BufferPosition {
        account,
        thresholds: Thresholds::new(min, target, max).unwrap(),
        batch_size: batch,
        balance,
        incoming,
        outgoing: Decimal::ZERO,
    }
}

/// USDC at `usdc_balance` (with `incoming`), fiat at its target, the broker
/// 200,000 above its; calm flows (σ 1,000 a window) over a day of windows
/// whose nets are `nets`; a 15-minute lead.
fn base_input(
    usdc_balance: Decimal,
    incoming: Decimal,
    nets: BTreeMap<BufferAccount, Vec<Decimal>>,
    settings: PlannerSettings,
) -> PlanInput {
    let calm = FlowStats {
        mean: Decimal::ZERO,
        std_dev: dec!(1000),
        recent_mean: Decimal::ZERO,
        outflow_events: Decimal::ZERO,
        windows: 288,
    };
    PlanInput {
        cycle_id: "cycle-14:03".into(),
        now: now(),
        positions: vec![
            position(USDC, usdc_balance, incoming),
            position(BufferAccount::SystemBufferFiat, dec!(100000), Decimal::ZERO),
            position(
                BufferAccount::BrokerOperational,
                dec!(400000),
                Decimal::ZERO,
            ),
        ],
        in_flight: if incoming > Decimal::ZERO {
            vec![InFlight {
                destination: USDC,
                amount: incoming,
                since: now() - Duration::minutes(2),
            }]
        } else {
            Vec::new()
        },
        providers: vec![provider_row("P", 1)],
        window: Duration::minutes(5),
        history: FlowHistory {
            flows: BufferAccount::ALL.into_iter().map(|a| (a, calm)).collect(),
            lead_time_p95: Some(Duration::minutes(15)),
            cycle: Duration::minutes(5),
            nets,
        },
        settings,
        watch: None,
    }
}

/// USDC drained by 20,000 in the three minutes of the open window after a
/// calm day (σ 1,000 a window: a burst), holding `balance` with `incoming`
/// on its way; the broker holds plenty.
fn input(balance: Decimal, incoming: Decimal, burst_top_up: bool) -> PlanInput {
    // Balances as of the last close: the watch adds the open window's drain.
    let settings = PlannerSettings {
        burst_top_up,
        ..PlannerSettings::default()
    };
    PlanInput {
        watch: Some(Watch {
            open_flows: BTreeMap::from([(USDC, dec!(-20000))]),
            open_outflow_events: BTreeMap::new(),
            elapsed: Duration::minutes(3),
            until_close: Duration::minutes(2) + Duration::seconds(30),
        }),
        ..base_input(balance + dec!(20000), incoming, BTreeMap::new(), settings)
    }
}

/// What the plan sends to the USDC buffer.
fn refill(input: &PlanInput) -> Decimal {
    refills(input).iter().sum()
}

#[test]
fn a_bursting_buffer_living_on_money_in_flight_is_topped_up_to_its_return_point() {
    // 40,000 held, 45,000 in flight: projected 85,000. The drain (about 6,667
    // a minute) over the 15-minute lead takes the return point to max
    // (100,000); the burst trigger stays a batch below it, at 80,000.
    let waits = input(dec!(40000), dec!(45000), false);
    let levels = plan(&waits).levels[&USDC];
    assert_eq!(levels.return_point, dec!(100000));
    assert_eq!(levels.trigger, dec!(80000));
    assert_eq!(
        refill(&waits),
        Decimal::ZERO,
        "off: 85,000 projected is above the trigger"
    );
    // What it holds lasts 6 of the lead's 15 minutes: with the top-up on,
    // the watch brings it to the return point now.
    let topped = input(dec!(40000), dec!(45000), true);
    assert_eq!(plan(&topped).levels[&USDC].trigger, dec!(100000));
    assert_eq!(refill(&topped), dec!(15000));
}

#[test]
fn a_bursting_buffer_that_holds_the_lead_times_drain_keeps_the_burst_trigger() {
    // 110,000 held, nothing in flight: less the ~100,000 the lead time
    // drains, the minimum is still there.
    let held = input(dec!(110000), Decimal::ZERO, true);
    let planned = plan(&held);
    assert_eq!(
        planned.levels[&USDC].trigger,
        dec!(80000),
        "the burst trigger, not the top-up"
    );
    assert_eq!(refill(&held), Decimal::ZERO);
}

/// USDC at `balance` after a day of 5-minute windows whose first two hours
/// (the same hours as the next two, a day before) moved it by `per_window`
/// each, at a window close.
fn close_input(balance: Decimal, per_window: Decimal, horizon: Duration) -> PlanInput {
    let mut usdc_nets = vec![per_window; 24];
    usdc_nets.extend(vec![Decimal::ZERO; 264]);
    let nets = BufferAccount::ALL
        .into_iter()
        .map(|a| {
            let n = if a == USDC {
                usdc_nets.clone()
            } else {
                vec![Decimal::ZERO; 288]
            };
            (a, n)
        })
        .collect();
    let settings = PlannerSettings {
        forecast_horizon: horizon,
        ..PlannerSettings::default()
    };
    base_input(balance, Decimal::ZERO, nets, settings)
}

/// USDC the plan moves into the USDC buffer (positive) or out of it (negative).
fn usdc_moved(input: &PlanInput) -> Decimal {
    plan(input)
        .commands
        .iter()
        .map(|c| {
            if c.destination_account == USDC {
                c.amount.value
            } else if c.source_account == USDC {
                -c.amount.value
            } else {
                Decimal::ZERO
            }
        })
        .sum()
}

#[test]
fn a_refill_before_the_hours_that_drained_it_a_day_ago_covers_that_fall() {
    // Trigger 14,000 (min + 2σ√4); return point 50,000 (target) off.
    let off = close_input(dec!(12000), dec!(-2000), Duration::zero());
    assert_eq!(usdc_moved(&off), dec!(38000));
    // The next two hours fell by 48,000 a day ago: refilled to 14,000 + 48,000.
    let on = close_input(dec!(12000), dec!(-2000), Duration::hours(2));
    assert_eq!(plan(&on).levels[&USDC].return_point, dec!(62000));
    assert_eq!(usdc_moved(&on), dec!(50000));
    // A horizon shorter than the fall sees only its part of it.
    let short = close_input(dec!(12000), dec!(-2000), Duration::hours(1));
    assert_eq!(
        usdc_moved(&short),
        dec!(38000),
        "24,000 ahead: the target is higher"
    );
    // Hours that rose a day ago do not stretch a refill.
    let rising = close_input(dec!(12000), dec!(2000), Duration::hours(2));
    assert_eq!(usdc_moved(&rising), dec!(38000));
}

#[test]
fn a_sweep_before_the_hours_that_filled_it_a_day_ago_leaves_room_for_them() {
    // Above max (100,000), the latest windows calm (the inflow was a day
    // ago): swept to half a batch below it off.
    let off = close_input(dec!(130000), dec!(2000), Duration::zero());
    assert_eq!(usdc_moved(&off), dec!(-40000));
    // 48,000 came in over the same two hours a day ago: swept to 52,000.
    let on = close_input(dec!(130000), dec!(2000), Duration::hours(2));
    assert_eq!(plan(&on).levels[&USDC].sweep_point, dec!(52000));
    assert_eq!(usdc_moved(&on), dec!(-78000));
    // Never below the return point, however much came in.
    let flood = close_input(dec!(130000), dec!(20000), Duration::hours(2));
    assert_eq!(usdc_moved(&flood), dec!(-80000));
}

/// Fiat draining 3,000 a window; USDC at `usdc_balance`; no transfer
/// provider unless `transfers`.
fn fiat_draining(usdc_balance: Decimal, relay_reserve: Decimal, transfers: bool) -> PlanInput {
    let mut input = base_input(
        usdc_balance,
        Decimal::ZERO,
        BTreeMap::new(),
        PlannerSettings {
            relay_reserve,
            ..PlannerSettings::default()
        },
    );
    input.history.flows.insert(
        BufferAccount::SystemBufferFiat,
        FlowStats {
            mean: dec!(-3000),
            std_dev: dec!(1000),
            recent_mean: dec!(-3000),
            outflow_events: Decimal::ZERO,
            windows: 288,
        },
    );
    input.providers[0].supports_usd_transfer = transfers;
    input
}

/// With no transfer provider a fiat refill passes through USDC: the relay
/// reserve raises USDC's trigger by the fiat buffer's loss over one
/// conversion's lead time, so USDC between the two triggers is refilled with
/// it and not without; with transfers it changes nothing.
#[test]
fn the_relay_reserve_keeps_usdc_ready_for_the_fiat_buffer() {
    let fiat_one_hop = |input: &PlanInput| -> Decimal {
        plan(input).levels[&BufferAccount::SystemBufferFiat].drain / dec!(2)
    };
    let off = plan(&fiat_draining(dec!(40000), Decimal::ZERO, false)).levels[&USDC];
    let on_input = fiat_draining(dec!(40000), Decimal::ONE, false);
    let on = plan(&on_input).levels[&USDC];
    let reserve = fiat_one_hop(&on_input);
    assert!(reserve > Decimal::ZERO, "fiat drains over its lead time");
    assert_eq!(on.trigger, (off.trigger + reserve).min(dec!(50000)));
    assert!(on.trigger > off.trigger);

    let between = ((off.trigger + on.trigger) / dec!(2)).round_dp(6);
    assert_eq!(
        refill(&fiat_draining(between, Decimal::ZERO, false)),
        Decimal::ZERO
    );
    assert!(refill(&fiat_draining(between, Decimal::ONE, false)) > Decimal::ZERO);

    let with_transfers = plan(&fiat_draining(dec!(40000), Decimal::ONE, true)).levels[&USDC];
    let without = plan(&fiat_draining(dec!(40000), Decimal::ZERO, true)).levels[&USDC];
    assert_eq!(with_transfers, without);
}

#[test]
fn money_in_flight_longer_than_the_lead_time_is_awaited_but_not_relied_on() {
    // USDC holds 3,000 (min 10,000; trigger 14,000: min + 2·σ·√4 on calm
    // flows) with 40,000 on its way; the lead time is 15 minutes.
    let waiting = |minutes: i64| PlanInput {
        in_flight: vec![InFlight {
            destination: USDC,
            amount: dec!(40000),
            since: now() - Duration::minutes(minutes),
        }],
        ..base_input(
            dec!(3000),
            dec!(40000),
            BTreeMap::new(),
            PlannerSettings::default(),
        )
    };
    assert_eq!(
        refill(&waiting(10)),
        Decimal::ZERO,
        "within the lead time the conversion counts: projected 43,000"
    );
    let overdue = waiting(16);
    assert_eq!(
        refill(&overdue),
        dec!(47000),
        "overdue: refilled from 3,000 to the target as if it might not come"
    );
    let planned = plan(&overdue);
    assert!(
        planned.commands.iter().all(|c| c.source_account != USDC),
        "money in flight toward a buffer is never spent by it"
    );
    // Two conversions on their way: only the overdue one is discounted.
    let both = PlanInput {
        in_flight: vec![
            InFlight {
                destination: USDC,
                amount: dec!(30000),
                since: now() - Duration::minutes(20),
            },
            InFlight {
                destination: USDC,
                amount: dec!(10000),
                since: now() - Duration::minutes(1),
            },
        ],
        ..overdue
    };
    assert_eq!(
        refill(&both),
        dec!(37000),
        "3,000 held and 10,000 on time: 37,000 to the target"
    );
}

/// A day of windows with 6 withdrawals each, net flows of mean zero and
/// `std_dev`, the last three of mean `recent_mean`.
fn six_withdrawals_a_window(std_dev: Decimal, recent_mean: Decimal) -> FlowStats {
    FlowStats {
        mean: Decimal::ZERO,
        std_dev,
        recent_mean,
        outflow_events: dec!(6),
        windows: 288,
    }
}

/// USDC drained by 15,000 in the first 90 seconds of the open window, by
/// `withdrawals` events, after a day whose windows each saw 6 withdrawals
/// and a net flow of σ 5,000; 65,000 held at the last close.
fn early_drain(withdrawals: u64) -> PlanInput {
    let mut input = base_input(
        dec!(65000),
        Decimal::ZERO,
        BTreeMap::new(),
        PlannerSettings::default(),
    );
    input
        .history
        .flows
        .insert(USDC, six_withdrawals_a_window(dec!(5000), Decimal::ZERO));
    input.watch = Some(Watch {
        open_flows: BTreeMap::from([(USDC, dec!(-15000))]),
        open_outflow_events: BTreeMap::from([(USDC, withdrawals)]),
        elapsed: Duration::seconds(90),
        until_close: Duration::minutes(3) + Duration::seconds(30),
    });
    input
}

#[test]
fn a_surge_of_withdrawals_is_a_burst_before_one_large_withdrawal_would_be() {
    // Judged over three minutes, 15,000 is within 5σ·√0.6 ≈ 19,365 of a
    // calm window: one withdrawal of 15,000 waits for the calm trigger.
    let one = early_drain(1);
    let waits = plan(&one);
    assert!(waits.levels[&USDC].trigger < dec!(50000));
    assert_eq!(refill(&one), Decimal::ZERO, "{:?}", waits.commands);
    // Thirty withdrawals in 90 seconds, where 1.8 are usual: the drain is
    // judged over the 90 seconds (5σ·√0.3 ≈ 13,693) and is a burst; the
    // trigger rises to a batch below the return point (max) and the
    // buffer is refilled now.
    let surge = early_drain(30);
    let acts = plan(&surge);
    assert_eq!(acts.levels[&USDC].trigger, dec!(80000));
    assert!(refill(&surge) >= dec!(20000), "{:?}", acts.commands);
}

/// At a window close, USDC projected at 44,000 (`held` of it on hand, the
/// rest in flight) while the last windows drained 8,000 each: over the
/// 4-window lead it is expected to lose 32,000, so its trigger is 46,000
/// and its return point 98,000.
fn living_on(held: Decimal) -> PlanInput {
    let mut input = base_input(
        held,
        dec!(44000) - held,
        BTreeMap::new(),
        PlannerSettings::default(),
    );
    input
        .history
        .flows
        .insert(USDC, six_withdrawals_a_window(dec!(1000), dec!(-8000)));
    input
}

/// The amounts of the commands to USDC.
fn refills(input: &PlanInput) -> Vec<Decimal> {
    plan(input)
        .commands
        .iter()
        .filter(|c| c.destination_account == USDC)
        .map(|c| c.amount.value)
        .collect()
}

#[test]
fn a_buffer_living_on_money_in_flight_is_refilled_in_pieces() {
    let all_held = living_on(dec!(44000));
    let levels = plan(&all_held).levels[&USDC];
    assert_eq!(
        (levels.trigger, levels.return_point, levels.drain),
        (dec!(46000), dec!(98000), dec!(32000))
    );
    // 44,000 on hand outlasts the drain (12,000 above the minimum): not
    // urgent, refilled by one conversion.
    assert_eq!(refills(&all_held), vec![dec!(54000)]);
    // 24,000 on hand and 20,000 in flight: the same projection, but what it
    // holds does not outlast the drain. The refill comes in pieces of at
    // most a third of the band (88,000 / 3), so one slow conversion cannot
    // leave it empty.
    let on_flight = refills(&living_on(dec!(24000)));
    assert!(on_flight.len() >= 2, "{on_flight:?}");
    assert!(
        on_flight.iter().all(|a| *a <= dec!(29333.33)),
        "{on_flight:?}"
    );
    assert_eq!(on_flight.iter().sum::<Decimal>(), dec!(54000));
}
