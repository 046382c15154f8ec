//! The simulated world: buffers, providers and costs, read from a scenario
//! TOML file. Every key is optional; the defaults are the migrations' seeds
//! (thresholds, batch sizes, the two providers' limits and fees) with opening
//! balances at the targets, so an empty file simulates a fresh installation.
//!
//! ```toml
//! cycle = "5m"                    # settlement window
//! opportunity_cost_rate = "0.05"  # per year, for idle capital
//! capital_scale = "1.0"           # multiplies every min/target/max/batch_size/start
//! [buffers]
//! system_buffer_usdc = { min = "10000", target = "50000", max = "100000", batch_size = "20000", start = "50000" }
//! [[providers]]                   # when given, the providers listed here are the only ones
//! name = "Due"
//! fee_bps = "10"
//! spread_bps = "5"
//! fixed_fee = "1.00"
//! min_amount = "100"
//! max_amount = "500000"
//! daily_limit = "5000000"
//! latency_median = "4m"
//! latency_p99 = "25m"
//! failure_rate = "0.01"
//! [[providers]]                   # a USD transfer rail between the two USD buffers
//! name = "Bank transfer"
//! supports_usd_transfer = true    # converts nothing unless supports_usd_to_usdc/usdc_to_usd say so
//! fixed_fee = "0.25"
//! latency_median = "2m"
//! latency_p99 = "15m"
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rust_decimal::Decimal;
use rust_decimal_macros::dec;
use serde::Deserialize;
use uuid::Uuid;

use crate::domain::{BufferAccount, Thresholds};
use crate::providers::{ProviderRow, ProviderStatus};

/// Why a scenario could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("scenario {path}: {message}")]
    Parse { path: String, message: String },
    #[error("scenario: {0}")]
    Invalid(String),
}

/// One buffer's setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferSetup {
    pub thresholds: Thresholds,
    /// Non-urgent top-ups smaller than this wait (`conversion_batch_size`).
    pub batch_size: Decimal,
    /// Opening balance.
    pub start: Decimal,
}

/// How a simulated provider behaves beyond its row (probabilities are
/// simulation parameters, never money).
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderModel {
    /// Median time from initiation to completion.
    pub latency_median: Duration,
    /// 99th percentile of that time (latency is lognormal through both).
    pub latency_p99: Duration,
    /// Chance that an accepted conversion ends failed (the money comes back).
    pub failure_rate: f64,
    /// Chance that the answer to an initiate call is lost after the provider
    /// executed it (the executor holds and asks again with the same key).
    pub lost_answer_rate: f64,
    /// Stretches of time, from the trace's start, in which every call fails.
    pub outages: Vec<(Duration, Duration)>,
}

impl Default for ProviderModel {
    fn default() -> Self {
        Self {
            latency_median: Duration::from_secs(4 * 60),
            latency_p99: Duration::from_secs(25 * 60),
            failure_rate: 0.0,
            lost_answer_rate: 0.0,
            outages: Vec::new(),
        }
    }
}

/// A simulated provider: its `conversion_providers` row and its behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct SimProvider {
    pub row: ProviderRow,
    pub model: ProviderModel,
}

/// Everything the simulation runs in.
#[derive(Debug, Clone, PartialEq)]
pub struct World {
    /// Settlement window length.
    pub cycle: Duration,
    /// Grace for late events before a window closes.
    pub grace: Duration,
    /// Executor monitor cycle: how often job status is polled.
    pub monitor: Duration,
    /// Yearly opportunity cost of idle capital, as a fraction.
    pub opportunity_cost_rate: Decimal,
    pub buffers: BTreeMap<BufferAccount, BufferSetup>,
    pub providers: Vec<SimProvider>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    cycle: Option<String>,
    grace: Option<String>,
    monitor: Option<String>,
    opportunity_cost_rate: Option<Decimal>,
    capital_scale: Option<Decimal>,
    #[serde(default)]
    buffers: BTreeMap<String, BufferFile>,
    providers: Option<Vec<ProviderFile>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BufferFile {
    min: Option<Decimal>,
    target: Option<Decimal>,
    max: Option<Decimal>,
    batch_size: Option<Decimal>,
    start: Option<Decimal>,
}

/// A probability written as a number or as a string (`0.01` or `"0.01"`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Number {
    Float(f64),
    Text(String),
}

impl Number {
    fn value(&self, field: &str) -> Result<f64, ScenarioError> {
        match self {
            Number::Float(f) => Ok(*f),
            Number::Text(t) => t
                .trim()
                .parse()
                .map_err(|e| ScenarioError::Invalid(format!("{field} = {t:?}: {e}"))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderFile {
    name: String,
    priority: Option<i32>,
    fee_bps: Option<Decimal>,
    spread_bps: Option<Decimal>,
    fixed_fee: Option<Decimal>,
    min_amount: Option<Decimal>,
    max_amount: Option<Decimal>,
    daily_limit: Option<Decimal>,
    latency_median: Option<String>,
    latency_p99: Option<String>,
    failure_rate: Option<Number>,
    lost_answer_rate: Option<Number>,
    /// `["2d12h..2d14h", ...]`: offsets from the trace's start.
    #[serde(default)]
    outages: Vec<String>,
    supports_usdc_to_usd: Option<bool>,
    supports_usd_to_usdc: Option<bool>,
    supports_usd_transfer: Option<bool>,
}

/// The seeded thresholds and batch sizes (`migrations/…_treasury_core.sql`).
fn seeded_buffers() -> BTreeMap<BufferAccount, BufferSetup> {
    let setup = |min, target, max, batch| BufferSetup {
        thresholds: Thresholds::new(min, target, max).expect("seeded thresholds are ordered"),
        batch_size: batch,
        start: target,
    };
    BTreeMap::from([
        (
            BufferAccount::SystemBufferUsdc,
            setup(dec!(10000), dec!(50000), dec!(100000), dec!(20000)),
        ),
        (
            BufferAccount::SystemBufferFiat,
            setup(dec!(20000), dec!(100000), dec!(200000), dec!(50000)),
        ),
        (
            BufferAccount::BrokerOperational,
            setup(dec!(50000), dec!(200000), dec!(500000), dec!(100000)),
        ),
    ])
}

/// A provider row as the seeds write it, active in both directions.
pub fn provider_row(name: &str, priority: i32) -> ProviderRow {
    ProviderRow {
        id: Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("simulated provider {name}").as_bytes(),
        ),
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
        daily_volume_used: Decimal::ZERO,
        success_count: 0,
        failure_count: 0,
        fee_percentage: Decimal::ZERO,
        fee_fixed: Decimal::ZERO,
        spread_bps: Decimal::ZERO,
        credentials_ref: None,
        base_url: None,
    }
}

/// The seeded providers: Due (priority 1, 10 bps, 100 to 500,000, 5,000,000 a
/// day) and ZeroHash (priority 2, 15 bps, 100 to 1,000,000, 10,000,000 a day),
/// both with a 5 bps spread and no fixed fee.
fn seeded_providers() -> Vec<SimProvider> {
    let due = ProviderRow {
        max_amount: dec!(500000),
        daily_volume_limit: Some(dec!(5000000)),
        fee_percentage: dec!(0.001),
        spread_bps: dec!(5),
        ..provider_row("Due", 1)
    };
    let zerohash = ProviderRow {
        max_amount: dec!(1000000),
        daily_volume_limit: Some(dec!(10000000)),
        fee_percentage: dec!(0.0015),
        spread_bps: dec!(5),
        ..provider_row("ZeroHash", 2)
    };
    [due, zerohash]
        .into_iter()
        .map(|row| SimProvider {
            row,
            model: ProviderModel::default(),
        })
        .collect()
}

impl Default for World {
    fn default() -> Self {
        Self {
            cycle: Duration::from_secs(300),
            grace: Duration::from_secs(30),
            monitor: Duration::from_secs(60),
            opportunity_cost_rate: dec!(0.05),
            buffers: seeded_buffers(),
            providers: seeded_providers(),
        }
    }
}

fn duration(field: &str, text: &str) -> Result<Duration, ScenarioError> {
    humantime::parse_duration(text.trim())
        .map_err(|e| ScenarioError::Invalid(format!("{field} = {text:?}: {e}")))
}

fn probability(field: &str, p: f64) -> Result<f64, ScenarioError> {
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(ScenarioError::Invalid(format!(
            "{field} = {p}: a probability must be between 0 and 1"
        )))
    }
}

impl World {
    /// Reads a scenario file; `capital_scale`, when given, overrides the file's.
    pub fn from_file(path: &Path, capital_scale: Option<Decimal>) -> Result<Self, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text, capital_scale).map_err(|e| match e {
            ScenarioError::Invalid(message) => ScenarioError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Reads a scenario from TOML text.
    pub fn from_toml(text: &str, capital_scale: Option<Decimal>) -> Result<Self, ScenarioError> {
        let file: ScenarioFile =
            toml::from_str(text).map_err(|e| ScenarioError::Invalid(e.to_string()))?;
        let mut world = World::default();
        if let Some(c) = &file.cycle {
            world.cycle = duration("cycle", c)?;
        }
        if let Some(g) = &file.grace {
            world.grace = duration("grace", g)?;
        }
        if let Some(m) = &file.monitor {
            world.monitor = duration("monitor", m)?;
        }
        if world.cycle < Duration::from_secs(1) || world.monitor < Duration::from_secs(1) {
            return Err(ScenarioError::Invalid(
                "cycle and monitor must be at least 1s".into(),
            ));
        }
        if let Some(rate) = file.opportunity_cost_rate {
            if rate < Decimal::ZERO {
                return Err(ScenarioError::Invalid(format!(
                    "opportunity_cost_rate = {rate}: must not be negative"
                )));
            }
            world.opportunity_cost_rate = rate;
        }
        for (name, b) in &file.buffers {
            let account: BufferAccount = name
                .parse()
                .map_err(|e| ScenarioError::Invalid(format!("[buffers] {name}: {e}")))?;
            let seed = world.buffers[&account];
            let t = seed.thresholds;
            let thresholds = Thresholds::new(
                b.min.unwrap_or(t.min()),
                b.target.unwrap_or(t.target()),
                b.max.unwrap_or(t.max()),
            )
            .map_err(|e| ScenarioError::Invalid(format!("[buffers] {name}: {e}")))?;
            let batch_size = b.batch_size.unwrap_or(seed.batch_size);
            if batch_size < Decimal::ZERO {
                return Err(ScenarioError::Invalid(format!(
                    "[buffers] {name}: batch_size must not be negative"
                )));
            }
            world.buffers.insert(
                account,
                BufferSetup {
                    thresholds,
                    batch_size,
                    start: b.start.unwrap_or(thresholds.target()),
                },
            );
        }
        if let Some(providers) = file.providers {
            if providers.is_empty() {
                return Err(ScenarioError::Invalid(
                    "[[providers]] lists no provider".into(),
                ));
            }
            world.providers = providers
                .into_iter()
                .enumerate()
                .map(|(i, p)| provider(p, i as i32 + 1))
                .collect::<Result<_, _>>()?;
        }
        let scale = capital_scale.or(file.capital_scale);
        if let Some(scale) = scale {
            world = world.scaled(scale)?;
        }
        Ok(world)
    }

    /// The world with every min/target/max/batch size/opening balance times `k`.
    pub fn scaled(mut self, k: Decimal) -> Result<Self, ScenarioError> {
        if k <= Decimal::ZERO {
            return Err(ScenarioError::Invalid(format!(
                "capital_scale = {k}: must be positive"
            )));
        }
        for (account, setup) in self.buffers.iter_mut() {
            let scale = account.currency().scale();
            let s = |v: Decimal| (v * k).round_dp(scale);
            let t = setup.thresholds;
            setup.thresholds = Thresholds::new(s(t.min()), s(t.target()), s(t.max()))
                .map_err(|e| ScenarioError::Invalid(format!("{account} scaled by {k}: {e}")))?;
            setup.batch_size = s(setup.batch_size);
            setup.start = s(setup.start);
        }
        Ok(self)
    }

    /// Total opening capital at par.
    pub fn start_capital(&self) -> Decimal {
        self.buffers.values().map(|b| b.start).sum()
    }
}

fn provider(p: ProviderFile, default_priority: i32) -> Result<SimProvider, ScenarioError> {
    let field = |f: &str| format!("[[providers]] {}: {f}", p.name);
    let bps = Decimal::from(10_000);
    // A transfer provider converts only when its entry says so.
    let transfers = p.supports_usd_transfer.unwrap_or(false);
    let row = ProviderRow {
        min_amount: p.min_amount.unwrap_or(dec!(100)),
        max_amount: p.max_amount.unwrap_or(dec!(1000000)),
        daily_volume_limit: p.daily_limit,
        fee_percentage: p.fee_bps.unwrap_or_default() / bps,
        fee_fixed: p.fixed_fee.unwrap_or_default(),
        spread_bps: p.spread_bps.unwrap_or_default(),
        supports_usdc_to_usd: p.supports_usdc_to_usd.unwrap_or(!transfers),
        supports_usd_to_usdc: p.supports_usd_to_usdc.unwrap_or(!transfers),
        supports_usd_transfer: transfers,
        ..provider_row(&p.name, p.priority.unwrap_or(default_priority))
    };
    if row.min_amount <= Decimal::ZERO || row.min_amount > row.max_amount {
        return Err(ScenarioError::Invalid(field(
            "min_amount must be positive and at most max_amount",
        )));
    }
    if [row.fee_percentage, row.fee_fixed, row.spread_bps]
        .iter()
        .any(|v| *v < Decimal::ZERO)
    {
        return Err(ScenarioError::Invalid(field("fees must not be negative")));
    }
    let mut model = ProviderModel::default();
    if let Some(m) = &p.latency_median {
        model.latency_median = duration(&field("latency_median"), m)?;
    }
    if let Some(q) = &p.latency_p99 {
        model.latency_p99 = duration(&field("latency_p99"), q)?;
    }
    if model.latency_p99 < model.latency_median {
        return Err(ScenarioError::Invalid(field(
            "latency_p99 must be at least latency_median",
        )));
    }
    if let Some(f) = &p.failure_rate {
        let name = field("failure_rate");
        model.failure_rate = probability(&name, f.value(&name)?)?;
    }
    if let Some(l) = &p.lost_answer_rate {
        let name = field("lost_answer_rate");
        model.lost_answer_rate = probability(&name, l.value(&name)?)?;
    }
    for outage in &p.outages {
        let (from, to) = outage.split_once("..").ok_or_else(|| {
            ScenarioError::Invalid(field(&format!("outage {outage:?}: expected FROM..TO")))
        })?;
        let (from, to) = (
            duration(&field("outages"), from)?,
            duration(&field("outages"), to)?,
        );
        if to <= from {
            return Err(ScenarioError::Invalid(field(&format!(
                "outage {outage:?} ends before it starts"
            ))));
        }
        model.outages.push((from, to));
    }
    Ok(SimProvider { row, model })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_scenario_is_the_seeds() {
        let world = World::from_toml("", None).unwrap();
        assert_eq!(world, World::default());
        assert_eq!(world.start_capital(), dec!(350000));
        assert_eq!(world.providers.len(), 2);
    }

    #[test]
    fn capital_scale_multiplies_every_level_and_the_command_line_wins() {
        let world = World::from_toml("capital_scale = \"2\"", Some(dec!(1.5))).unwrap();
        let usdc = world.buffers[&BufferAccount::SystemBufferUsdc];
        assert_eq!(usdc.thresholds.min(), dec!(15000));
        assert_eq!(usdc.thresholds.max(), dec!(150000));
        assert_eq!(usdc.batch_size, dec!(30000));
        assert_eq!(usdc.start, dec!(75000));
    }

    #[test]
    fn the_issue_example_parses() {
        let world = World::from_toml(
            r#"
cycle = "5m"
opportunity_cost_rate = "0.05"
[buffers]
system_buffer_usdc = { min = "10000", target = "50000", max = "100000", batch_size = "20000", start = "50000" }
[[providers]]
name = "Due"
fee_bps = "10"
spread_bps = "5"
fixed_fee = "1.00"
min_amount = "100"
max_amount = "500000"
daily_limit = "5000000"
latency_median = "4m"
latency_p99 = "25m"
failure_rate = "0.01"
outages = ["2d..2d2h"]
"#,
            None,
        )
        .unwrap();
        assert_eq!(world.providers.len(), 1);
        let due = &world.providers[0];
        assert_eq!(due.row.fee_percentage, dec!(0.001));
        assert_eq!(due.row.fee_fixed, dec!(1.00));
        assert_eq!(due.model.outages.len(), 1);
    }

    #[test]
    fn bad_settings_are_named() {
        for (text, needle) in [
            ("cycle = \"soon\"", "cycle"),
            (
                "[buffers]\nsystem_buffer_usdc = { min = \"5\", target = \"1\" }",
                "system_buffer_usdc",
            ),
            ("[buffers]\nnope = {}", "nope"),
            (
                "[[providers]]\nname = \"X\"\nfailure_rate = 2.0",
                "failure_rate",
            ),
            ("capital_scale = \"-1\"", "capital_scale"),
            ("unknown_key = 1", "unknown_key"),
        ] {
            let err = World::from_toml(text, None).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
