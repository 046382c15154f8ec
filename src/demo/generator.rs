//! A deterministic generator of realistic deposits and withdrawals (and a few
//! malformed messages), for the demo, the tests and the benchmarks.

use chrono::{DateTime, Duration, Utc};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rust_decimal::Decimal;
use uuid::Uuid;

use crate::codec::records::FlowRecord;
use crate::codec::{Codec, SchemaKind, wire};
use crate::domain::FlowKind;

/// One generated message for an input topic.
#[derive(Debug, Clone)]
pub struct Generated {
    pub kind: FlowKind,
    /// The record, when the message is well-formed.
    pub record: Option<FlowRecord>,
    pub bytes: Vec<u8>,
    /// What is wrong with it, for malformed messages.
    pub defect: Option<&'static str>,
}

/// Mix and size of flows (probabilities are for generation, never money).
#[derive(Debug, Clone, Copy)]
pub struct FlowMix {
    /// Share of events in USDC (the rest in USD).
    pub usdc_share: f64,
    /// Share of deposits (the rest are withdrawals).
    pub deposit_share: f64,
    /// Share of large events (5,000 to 25,000); the rest are 10 to `small_max`.
    pub large_share: f64,
    /// Largest whole amount of an ordinary event.
    pub small_max: i64,
}

impl Default for FlowMix {
    fn default() -> Self {
        Self {
            usdc_share: 0.8,
            deposit_share: 0.5,
            large_share: 0.05,
            small_max: 1_500,
        }
    }
}

/// The generator; the same seed gives the same messages.
pub struct EventGenerator {
    rng: ChaCha8Rng,
    codec: Codec,
}

impl EventGenerator {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            codec: Codec::default(),
        }
    }

    fn uuid(&mut self) -> Uuid {
        uuid::Builder::from_random_bytes(self.rng.r#gen()).into_uuid()
    }

    /// A valid event at `at`, with an amount of realistic size.
    pub fn event(&mut self, at: DateTime<Utc>, mix: FlowMix) -> Generated {
        let usdc = self.rng.gen_bool(mix.usdc_share);
        let kind = if self.rng.gen_bool(mix.deposit_share) {
            FlowKind::Deposit
        } else {
            FlowKind::Withdrawal
        };
        let (currency, scale) = if usdc { ("USDC", 6) } else { ("USD", 2) };
        let whole: i64 = if self.rng.gen_bool(mix.large_share) {
            self.rng.gen_range(5_000..25_000)
        } else {
            self.rng.gen_range(10..mix.small_max.max(11))
        };
        let fraction: i64 = self.rng.gen_range(0..10_i64.pow(scale));
        let amount = Decimal::new(whole * 10_i64.pow(scale) + fraction, scale);
        let record = FlowRecord {
            event_id: self.uuid(),
            user_id: self.uuid(),
            currency: currency.into(),
            amount,
            occurred_at: at,
        };
        let bytes = self.encode(kind, &record);
        Generated {
            kind,
            record: Some(record),
            bytes,
            defect: None,
        }
    }

    /// A malformed message of one of five kinds, chosen by `which`.
    pub fn malformed(&mut self, at: DateTime<Utc>, which: usize) -> Generated {
        let kind = FlowKind::Deposit;
        let mut record = FlowRecord {
            event_id: self.uuid(),
            user_id: self.uuid(),
            currency: "USDC".into(),
            amount: Decimal::new(12_345, 2),
            occurred_at: at,
        };
        let (bytes, defect) = match which % 5 {
            0 => ((0..24).map(|_| self.rng.r#gen()).collect(), "garbage bytes"),
            1 => {
                let body = self.encode(kind, &record);
                (
                    wire::frame(9_999, &body[wire::HEADER_LEN..]),
                    "unknown schema id",
                )
            }
            2 => {
                record.amount = Decimal::new(-5_000, 2);
                (self.encode(kind, &record), "negative amount")
            }
            3 => {
                record.currency = "USD".into();
                record.amount = Decimal::new(1_001, 3);
                (
                    self.encode(kind, &record),
                    "USD amount with 3 decimal places",
                )
            }
            _ => {
                record.currency = "EUR".into();
                (self.encode(kind, &record), "unknown currency")
            }
        };
        Generated {
            kind,
            record: None,
            bytes,
            defect: Some(defect),
        }
    }

    /// A number in `0..n`, from the generator's stream.
    pub fn pick(&mut self, n: usize) -> usize {
        self.rng.gen_range(0..n)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.rng.gen_bool(p)
    }

    /// Jitter in `0..max_ms` milliseconds.
    pub fn jitter(&mut self, max_ms: i64) -> Duration {
        Duration::milliseconds(self.rng.gen_range(0..max_ms.max(1)))
    }

    fn encode(&self, kind: FlowKind, record: &FlowRecord) -> Vec<u8> {
        let schema = match kind {
            FlowKind::Deposit => SchemaKind::FundingEvent,
            FlowKind::Withdrawal => SchemaKind::WithdrawalEvent,
        };
        record
            .encode(&self.codec, schema)
            .expect("generated records fit their schema")
    }
}
