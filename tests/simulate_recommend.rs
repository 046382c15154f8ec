//! `treasury simulate --recommend` on a short generated trace: the
//! recommendation keeps every buffer above zero, costs no more than the
//! current thresholds when those are feasible, is written as the right
//! `UPDATE buffer_thresholds` statements, and is the same for the same inputs.

use chrono::Duration;
use rust_decimal_macros::dec;
use treasury::domain::FlowEvent;
use treasury::planner::PlannerSettings;
use treasury::simulate::cli::generated_start;
use treasury::simulate::generate::{Scenario, generate};
use treasury::simulate::recommend::{Budget, Case, Recommendation, search};
use treasury::simulate::scenario::World;

const COSTLY: &str = include_str!("scenarios/provider-costs.toml");

fn first_days(events: Vec<FlowEvent>, days: i64) -> Vec<FlowEvent> {
    let end = generated_start() + Duration::days(days);
    events.into_iter().filter(|e| e.occurred_at < end).collect()
}

fn case(seed: u64) -> Case {
    Case {
        label: format!("normal, 2 days, seed {seed}"),
        seed,
        faults: false,
        events: first_days(generate(Scenario::Normal, seed, generated_start()), 2),
    }
}

fn recommend(world: &World, cases: &[Case]) -> Recommendation {
    let budget = Budget {
        evaluations: 8,
        passes: 2,
        threads: 2,
        max_below_min: None,
    };
    search(world, cases, PlannerSettings::default(), budget, &|| {})
}

#[test]
fn an_over_capitalized_world_gets_cheaper_thresholds_that_stay_above_zero() {
    // Three times the seeded capital: idle money the search should give back.
    let world = World::from_toml(COSTLY, Some(dec!(3))).expect("the scenario parses");
    let cases = [case(3), case(4)];
    let rec = recommend(&world, &cases);

    let trace = rec.recommended.cases[0]
        .report
        .as_ref()
        .expect("the recommendation broke no invariant on the trace");
    assert_eq!(trace.minutes_below_zero, 0.0);
    assert_eq!(rec.recommended.minutes_below_zero, 0.0);
    assert_eq!(rec.recommended.violations, 0);
    assert!(rec.recommended.feasible);
    if rec.current.feasible {
        assert!(
            rec.recommended.total_cost <= rec.current.total_cost,
            "{} > {}",
            rec.recommended.total_cost,
            rec.current.total_cost
        );
    }
    assert!(rec.recommended.total_cost < rec.current.total_cost);
    assert!(rec.evaluations <= 8);

    // One statement per changed buffer, carrying the recommended values.
    let changed: Vec<_> = rec
        .recommended
        .thresholds
        .iter()
        .filter(|(a, l)| rec.current.thresholds.get(a) != Some(l))
        .collect();
    assert!(!changed.is_empty());
    assert_eq!(rec.updates.len(), changed.len());
    for ((account, l), sql) in changed.iter().zip(&rec.updates) {
        assert!(l.min < l.target && l.target < l.max && l.batch_size > dec!(0));
        assert!(sql.starts_with("UPDATE buffer_thresholds SET "), "{sql}");
        for column in [
            format!("min_threshold = {},", l.min.normalize()),
            format!("target_threshold = {},", l.target.normalize()),
            format!("max_threshold = {},", l.max.normalize()),
            format!("conversion_batch_size = {},", l.batch_size.normalize()),
            "updated_at = now()".to_owned(),
            format!("WHERE account_type = '{}';", account.as_str()),
        ] {
            assert!(sql.contains(&column), "{sql} lacks {column}");
        }
    }
    let text = rec.text();
    assert!(text.contains("CURRENT") && text.contains("RECOMMENDED"));
    assert!(text.contains(&rec.updates[0]));

    let json = rec.to_json();
    assert_eq!(json["updates"][0], serde_json::json!(rec.updates[0]));
    assert_eq!(json["recommended"]["minutes_below_zero"], 0.0);

    // The same inputs give the same recommendation, byte for byte.
    let again = recommend(&world, &cases);
    assert_eq!(
        serde_json::to_string(&rec.to_json()).unwrap(),
        serde_json::to_string(&again.to_json()).unwrap()
    );
}
