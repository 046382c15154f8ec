//! Runs the engine's policy and the baselines over one trace and puts them
//! side by side with the lower bound. Policies run on separate threads; each
//! run is deterministic, so the comparison is too.

use super::bound::lower_bound;
use super::invariants::Violation;
use super::policies::{BandPolicy, EnginePolicy, OriginalRulePolicy, PerEventPolicy, Policy};
use super::report::Comparison;
use super::run::{RunOptions, RunOutcome, run};
use super::scenario::World;
use crate::domain::FlowEvent;
use crate::planner::PlannerSettings;

/// The engine's run (kept whole, for the plot) and the comparison.
#[derive(Debug, Clone)]
pub struct Compared {
    pub comparison: Comparison,
    pub engine: RunOutcome,
}

/// The policies of a comparison, the engine's first.
pub fn policies(world: &World, settings: PlannerSettings) -> Vec<Box<dyn Policy + Send>> {
    vec![
        Box::new(EnginePolicy { settings }),
        Box::new(BandPolicy {
            opportunity_cost_rate: world.opportunity_cost_rate,
            batch_sizes: world
                .buffers
                .iter()
                .map(|(a, b)| (*a, b.batch_size))
                .collect(),
        }),
        Box::new(OriginalRulePolicy),
        Box::new(PerEventPolicy),
    ]
}

/// Runs every policy over `events` in `world`.
pub fn compare(
    world: &World,
    events: &[FlowEvent],
    trace: &str,
    seed: u64,
    settings: PlannerSettings,
    strict: bool,
) -> Result<Compared, Violation> {
    let mut policies = policies(world, settings);
    let outcomes: Vec<Result<RunOutcome, Violation>> = std::thread::scope(|scope| {
        let handles: Vec<_> = policies
            .iter_mut()
            .enumerate()
            .map(|(i, policy)| {
                scope.spawn(move || {
                    let options = RunOptions {
                        seed,
                        // Baselines are measured, not held to the engine's promises.
                        strict: strict && i == 0,
                        record: i == 0,
                    };
                    run(world, events, policy.as_mut(), options)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    let mut outcomes = outcomes.into_iter().collect::<Result<Vec<_>, _>>()?;
    let engine = outcomes.remove(0);
    let mut reports = vec![engine.report.clone()];
    reports.extend(outcomes.into_iter().map(|o| o.report));
    Ok(Compared {
        comparison: Comparison {
            trace: trace.to_owned(),
            events: events.len(),
            seed,
            policies: reports,
            lower_bound: lower_bound(world, events),
        },
        engine,
    })
}

/// `world` with faults drawn from `seed`: every provider fails 2 % of its
/// conversions and loses 5 % of its answers, and one provider is down for
/// two hours on a day chosen by the seed.
pub fn with_faults(world: &World, seed: u64) -> World {
    let mut world = world.clone();
    let count = world.providers.len().max(1) as u64;
    let down = (seed % count) as usize;
    let day = 1 + (seed / count) % 25;
    for (i, provider) in world.providers.iter_mut().enumerate() {
        provider.model.failure_rate = provider.model.failure_rate.max(0.02);
        provider.model.lost_answer_rate = provider.model.lost_answer_rate.max(0.05);
        if i == down {
            let from = std::time::Duration::from_secs(day * 86_400 + 10 * 3_600);
            provider
                .model
                .outages
                .push((from, from + std::time::Duration::from_secs(2 * 3_600)));
        }
    }
    world
}

/// The engine's run alone, strict, with faults from `seed`.
pub fn engine_only(
    world: &World,
    events: &[FlowEvent],
    seed: u64,
    settings: PlannerSettings,
) -> Result<RunOutcome, Violation> {
    let mut policy = EnginePolicy { settings };
    run(
        world,
        events,
        &mut policy,
        RunOptions {
            seed,
            strict: true,
            record: false,
        },
    )
}
