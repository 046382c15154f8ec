//! The planner in a watch while a buffer bursts: what `burst_top_up` changes.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use treasury::domain::{BufferAccount, Thresholds};
use treasury::planner::{
    BufferPosition, FlowHistory, FlowStats, PlanInput, PlannerSettings, Watch, plan,
};
use treasury::simulate::scenario::provider_row;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 2, 14, 3, 0).unwrap()
}

fn position(account: BufferAccount, balance: Decimal, incoming: Decimal) -> BufferPosition {
    let (min, target, max, batch) = match account {
        BufferAccount::SystemBufferUsdc => (dec!(10000), dec!(50000), dec!(100000), dec!(20000)),
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

/// USDC drained by 20,000 in the three minutes of the open window after a
/// calm day (σ 1,000 a window: a burst), holding `balance` with `incoming`
/// on its way; the broker holds plenty.
fn input(balance: Decimal, incoming: Decimal, burst_top_up: bool) -> PlanInput {
    let usdc = BufferAccount::SystemBufferUsdc;
    let calm = FlowStats {
        mean: Decimal::ZERO,
        std_dev: dec!(1000),
        recent_mean: Decimal::ZERO,
        windows: 288,
    };
    PlanInput {
        cycle_id: "watch-14:03".into(),
        now: now(),
        // Balances as of the last close: the watch adds the open window's drain.
        positions: vec![
            position(usdc, balance + dec!(20000), incoming),
            position(BufferAccount::SystemBufferFiat, dec!(100000), Decimal::ZERO),
            position(
                BufferAccount::BrokerOperational,
                dec!(400000),
                Decimal::ZERO,
            ),
        ],
        providers: vec![provider_row("P", 1)],
        window: Duration::minutes(5),
        history: FlowHistory {
            flows: BufferAccount::ALL.into_iter().map(|a| (a, calm)).collect(),
            lead_time_p95: Some(Duration::minutes(15)),
            cycle: Duration::minutes(5),
        },
        settings: PlannerSettings {
            burst_top_up,
            ..PlannerSettings::default()
        },
        watch: Some(Watch {
            open_flows: BTreeMap::from([(usdc, dec!(-20000))]),
            elapsed: Duration::minutes(3),
            until_close: Duration::minutes(2) + Duration::seconds(30),
        }),
    }
}

/// What the plan sends to the USDC buffer.
fn refill(input: &PlanInput) -> Decimal {
    plan(input)
        .commands
        .iter()
        .filter(|c| c.destination_account == BufferAccount::SystemBufferUsdc)
        .map(|c| c.amount.value)
        .sum()
}

#[test]
fn a_bursting_buffer_living_on_money_in_flight_is_topped_up_to_its_return_point() {
    // 40,000 held, 45,000 in flight: projected 85,000. The drain (about 6,667
    // a minute) over the 15-minute lead takes the return point to max
    // (100,000); the burst trigger stays a batch below it, at 80,000.
    let waits = input(dec!(40000), dec!(45000), false);
    let levels = plan(&waits).levels[&BufferAccount::SystemBufferUsdc];
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
    assert_eq!(
        plan(&topped).levels[&BufferAccount::SystemBufferUsdc].trigger,
        dec!(100000)
    );
    assert_eq!(refill(&topped), dec!(15000));
}

#[test]
fn a_bursting_buffer_that_holds_the_lead_times_drain_keeps_the_burst_trigger() {
    // 110,000 held, nothing in flight: less the ~100,000 the lead time
    // drains, the minimum is still there.
    let held = input(dec!(110000), Decimal::ZERO, true);
    let planned = plan(&held);
    assert_eq!(
        planned.levels[&BufferAccount::SystemBufferUsdc].trigger,
        dec!(80000),
        "the burst trigger, not the top-up"
    );
    assert_eq!(refill(&held), Decimal::ZERO);
}
