//! `treasury simulate`: arguments and the report it prints.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use chrono::{DateTime, TimeZone, Utc};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rust_decimal::Decimal;

use super::compare::{Compared, compare, engine_only, with_faults};
use super::generate::{Scenario, generate};
use super::plot::{BufferSeries, ConversionMark, plot};
use super::recommend::{Budget, Case, search};
use super::scenario::World;
use super::sweep::{summary, sweep, table};
use super::trace::{read_trace, write_trace};
use crate::domain::FlowEvent;
use crate::planner::PlannerSettings;

/// Arguments of `treasury simulate`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["trace", "generate"])))]
pub struct SimulateArgs {
    /// A trace to backtest: CSV (`event_id,kind,currency,amount,occurred_at`)
    /// or JSON Lines with the same fields; `.gz` accepted.
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Count and list bad trace rows instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// A built-in flow generator: normal, bank-run, quiet or drift.
    #[arg(long, value_name = "SCENARIO")]
    pub generate: Option<Scenario>,
    /// Seed of the generator and of the simulated providers.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Run the engine over many seeds with faults injected (provider
    /// failures, lost answers, an outage) and name every seed whose
    /// invariants fail, e.g. `--seeds 1..200` (with `--sweep`: as generated,
    /// one row of figures per seed).
    #[arg(long, value_name = "A..B", value_parser = parse_seeds)]
    pub seeds: Option<RangeInclusive<u64>>,
    /// Write the generated (or read) trace to this file (CSV or JSON Lines, `.gz` too).
    #[arg(long, value_name = "FILE")]
    pub export_trace: Option<PathBuf>,
    /// The world: buffers, providers, costs (TOML; every key optional).
    #[arg(long, value_name = "FILE.toml")]
    pub scenario: Option<PathBuf>,
    /// Multiplies every min/target/max/batch size/opening balance (overrides the file).
    #[arg(long, value_name = "K")]
    pub capital_scale: Option<Decimal>,
    /// Print JSON (one object per policy) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Draw each buffer's balance against its band, with conversions marked (.png or .svg).
    #[arg(long, value_name = "FILE")]
    pub plot: Option<PathBuf>,
    /// Measure decision invariants instead of stopping at the first violation.
    #[arg(long)]
    pub keep_going: bool,
    /// With `--seeds`: run the engine on each seed with no faults injected
    /// and print one row per seed (conversions, cost against the lower
    /// bound, minutes below min and below zero) and the totals.
    #[arg(long, requires = "seeds", conflicts_with_all = ["plot", "export_trace"])]
    pub sweep: bool,
    /// Search min/target/max/batch size per buffer for the least total cost
    /// (conversions + capital) with 0 minutes below zero, and print the
    /// `UPDATE buffer_thresholds` statements with the current and
    /// recommended runs side by side.
    #[arg(long, conflicts_with_all = ["seeds", "plot", "keep_going"])]
    pub recommend: bool,
    /// Candidates the search may evaluate (each runs the trace and the extra seeds).
    #[arg(long, value_name = "N", default_value_t = 60, requires = "recommend")]
    pub recommend_evaluations: usize,
    /// Extra runs per candidate: the generator's next seeds, or for a trace
    /// file the same trace with faults injected from the next seeds.
    #[arg(long, value_name = "K", default_value_t = 2, requires = "recommend")]
    pub recommend_seeds: u64,
    /// Search passes, one per step (x2, x1.5, x1.25, x1.1).
    #[arg(long, value_name = "P", default_value_t = 4, requires = "recommend")]
    pub recommend_passes: usize,
    /// Mean minutes below min a recommendation may have (default: the current thresholds').
    #[arg(long, value_name = "MINUTES", requires = "recommend")]
    pub recommend_max_below_min: Option<f64>,
}

fn parse_seeds(text: &str) -> Result<RangeInclusive<u64>, String> {
    let (a, b) = text
        .split_once("..")
        .ok_or_else(|| format!("{text:?}: expected A..B, e.g. 1..200"))?;
    let a: u64 = a.trim().parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u64 = b
        .trim()
        .trim_start_matches('=')
        .parse()
        .map_err(|e| format!("{b:?}: {e}"))?;
    if b < a {
        return Err(format!("{text:?}: the range is empty"));
    }
    Ok(a..=b)
}

/// Where generated traces start: a Monday at midnight UTC.
pub fn generated_start() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 5, 0, 0, 0)
        .single()
        .unwrap_or_default()
}

fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Runs `treasury simulate`.
pub fn run(args: SimulateArgs, settings: PlannerSettings) -> anyhow::Result<()> {
    let world = match &args.scenario {
        Some(path) => World::from_file(path, args.capital_scale)?,
        None => match args.capital_scale {
            Some(k) => World::default().scaled(k)?,
            None => World::default(),
        },
    };
    if let Some(seeds) = args.seeds.clone() {
        return run_seeds(&args, &world, seeds, settings);
    }
    let (events, label) = input(&args, args.seed)?;
    if let Some(path) = &args.export_trace {
        write_trace(path, &events)?;
        eprintln!("wrote {} events to {}", events.len(), path.display());
    }
    if args.recommend {
        return run_recommend(&args, &world, events, &label, settings);
    }
    let started = Instant::now();
    let spinner = progress(1, "simulating 4 policies");
    let compared = compare(
        &world,
        &events,
        &label,
        args.seed,
        settings,
        !args.keep_going,
    )?;
    spinner.finish_and_clear();
    let elapsed = started.elapsed();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&compared.comparison.to_json())?
        );
    } else {
        print!("{}", compared.comparison.table());
    }
    if let Some(path) = &args.plot {
        draw(path, &label, &world, &compared)?;
        eprintln!("wrote {}", path.display());
    }
    eprintln!(
        "simulated {} events with 4 policies in {:.1} s",
        events.len(),
        elapsed.as_secs_f64()
    );
    Ok(())
}

fn input(args: &SimulateArgs, seed: u64) -> anyhow::Result<(Vec<FlowEvent>, String)> {
    if let Some(path) = &args.trace {
        let trace = read_trace(path, args.skip_bad)?;
        if !trace.skipped.is_empty() {
            eprintln!("skipped {} bad rows:", trace.skipped.len());
            for row in trace.skipped.iter().take(20) {
                eprintln!("  {row}");
            }
        }
        return Ok((trace.events, path.display().to_string()));
    }
    let Some(scenario) = args.generate else {
        bail!("give --trace FILE or --generate SCENARIO");
    };
    Ok((
        generate(scenario, seed, generated_start()),
        format!("generated {scenario}"),
    ))
}

fn run_recommend(
    args: &SimulateArgs,
    world: &World,
    events: Vec<FlowEvent>,
    label: &str,
    settings: PlannerSettings,
) -> anyhow::Result<()> {
    let mut cases = vec![Case {
        label: format!("{label}, seed {}", args.seed),
        seed: args.seed,
        faults: false,
        events,
    }];
    for k in 1..=args.recommend_seeds {
        let seed = args.seed + k;
        cases.push(match args.generate {
            Some(scenario) => Case {
                label: format!("generated {scenario}, seed {seed}"),
                seed,
                faults: false,
                events: generate(scenario, seed, generated_start()),
            },
            None => Case {
                label: format!("{label}, faults from seed {seed}"),
                seed,
                faults: true,
                events: cases[0].events.clone(),
            },
        });
    }
    let budget = Budget {
        evaluations: args.recommend_evaluations,
        passes: args.recommend_passes,
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        max_below_min: args.recommend_max_below_min,
    };
    let started = Instant::now();
    let bar = progress(
        ((budget.evaluations + 1) * cases.len()) as u64,
        "searching thresholds (runs)",
    );
    let recommendation = search(world, &cases, settings, budget, &|| bar.inc(1));
    bar.finish_and_clear();
    let elapsed = started.elapsed();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&recommendation.to_json())?
        );
    } else {
        print!("{}", recommendation.text());
    }
    eprintln!(
        "evaluated {} candidates ({} engine runs) in {:.1} s",
        recommendation.evaluations,
        recommendation.runs,
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// The trace of each seed of `--seeds`: a trace file's is the same for
/// every seed, a generator's is its own.
enum SeededTraces {
    File {
        events: Vec<FlowEvent>,
        label: String,
    },
    Generated(Scenario),
}

impl SeededTraces {
    fn new(args: &SimulateArgs) -> anyhow::Result<Self> {
        if args.trace.is_some() {
            let (events, label) = input(args, 0)?;
            return Ok(Self::File { events, label });
        }
        match args.generate {
            Some(scenario) => Ok(Self::Generated(scenario)),
            None => bail!("give --trace FILE or --generate SCENARIO"),
        }
    }

    fn events(&self, seed: u64) -> Vec<FlowEvent> {
        match self {
            Self::File { events, .. } => events.clone(),
            Self::Generated(scenario) => generate(*scenario, seed, generated_start()),
        }
    }

    fn label(&self) -> String {
        match self {
            Self::File { label, .. } => label.clone(),
            Self::Generated(scenario) => format!("generated {scenario}"),
        }
    }
}

fn run_seeds(
    args: &SimulateArgs,
    world: &World,
    seeds: RangeInclusive<u64>,
    settings: PlannerSettings,
) -> anyhow::Result<()> {
    let traces = SeededTraces::new(args)?;
    if args.sweep {
        return print_sweep(args, world, &traces, seeds.collect(), settings);
    }
    let bar = progress(seeds.clone().count() as u64, "seeds");
    let mut failing = Vec::new();
    for seed in seeds.clone() {
        let events = traces.events(seed);
        if let Err(violation) = engine_only(&with_faults(world, seed), &events, seed, settings) {
            bar.suspend(|| eprintln!("{violation}"));
            failing.push(seed);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let total = seeds.count();
    if failing.is_empty() {
        println!("{total} seeds with faults injected: every invariant held");
        Ok(())
    } else {
        bail!(
            "{} of {total} seeds broke an invariant: {}",
            failing.len(),
            failing
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// `--seeds --sweep`: the engine alone on each seed, no faults, as a table or JSON.
fn print_sweep(
    args: &SimulateArgs,
    world: &World,
    traces: &SeededTraces,
    seeds: Vec<u64>,
    settings: PlannerSettings,
) -> anyhow::Result<()> {
    let events_for = |seed: u64| traces.events(seed);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let started = Instant::now();
    let spinner = progress(1, &format!("the engine over {} seeds", seeds.len()));
    let rows = sweep(world, &seeds, &events_for, settings, threads)
        .map_err(|(seed, violation)| anyhow::anyhow!("seed {seed}: {violation}"))?;
    spinner.finish_and_clear();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "trace": traces.label(),
                "seeds": rows,
                "summary": summary(&rows),
            }))?
        );
    } else {
        print!(
            "{}",
            table(&format!("engine on {}, no faults", traces.label()), &rows)
        );
    }
    eprintln!(
        "simulated {} seeds in {:.1} s",
        rows.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn draw(path: &Path, label: &str, world: &World, compared: &Compared) -> anyhow::Result<()> {
    let series: Vec<BufferSeries> = world
        .buffers
        .iter()
        .map(|(account, setup)| BufferSeries {
            account: *account,
            min: setup.thresholds.min(),
            target: setup.thresholds.target(),
            max: setup.thresholds.max(),
            balance: compared
                .engine
                .balances
                .get(account)
                .cloned()
                .unwrap_or_default(),
            conversions: compared
                .engine
                .conversions
                .iter()
                .filter(|c| c.source == *account || c.destination == *account)
                .map(|c| ConversionMark {
                    at: c.at,
                    direction: c.direction,
                    amount: c.amount,
                    incoming: c.destination == *account,
                })
                .collect(),
        })
        .collect();
    plot(path, &format!("engine policy — {label}"), &series)
        .with_context(|| format!("drawing {}", path.display()))
}
