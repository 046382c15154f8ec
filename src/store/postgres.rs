//! PostgreSQL, the system of record. Ingest batches hold a shared advisory
//! lock and settlement an exclusive one, so no batch adds to a window while
//! the window closes, and batches from several workers still run side by side.

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{
    BufferReport, EventRef, LockMode, OffsetRange, OutboxMessage, PlannedCommand, PlanningRecords,
    ProgressUpdate, Store, StoreError, StoreTx, TopicPartition, WindowRecord,
};
use crate::domain::{
    BufferAccount, BufferStatus, ConversionCommand, ConversionDirection, ConversionTrigger,
    Currency, JobStatus, Money, Thresholds,
};
use crate::planner::{AmountLimits, BufferPosition, InFlight};
use crate::window::{Flow, PartitionProgress, WindowTallies, WindowTally};

/// The condition on a `planned_commands p` row that makes it a conversion
/// in flight: emitted, and its job (if any) not ended.
macro_rules! in_flight {
    () => {
        "p.emitted AND NOT EXISTS (SELECT 1 FROM conversion_jobs j
                                    WHERE j.idempotency_key = p.command_id::text
                                      AND j.status IN ('completed', 'failed', 'cancelled'))"
    };
}

/// Advisory lock key that orders ingest batches against settlement ("TRSY").
#[cfg(test)]
const SETTLEMENT_LOCK: i64 = 0x5452_5359;

/// Opens a transaction holding the settlement lock shared (ingest batches,
/// job and intake work); the key is `SETTLEMENT_LOCK` (1414681433).
const BEGIN_SHARED: &str = "BEGIN; SELECT pg_advisory_xact_lock_shared(1414681433)";
/// Opens a transaction holding the settlement lock exclusively (settlement).
const BEGIN_EXCLUSIVE: &str = "BEGIN; SELECT pg_advisory_xact_lock(1414681433)";

/// The migrations in `migrations/`, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The PostgreSQL store.
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Connects with a small pool.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await?;
        Ok(Self { pool })
    }

    /// Wraps an existing pool (tests).
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool, for queries outside the store interface (reports, tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// A transaction holding the shared settlement lock (job and intake work).
    pub(super) async fn begin_shared(&self) -> Result<PgTx, StoreError> {
        let tx = self.pool.begin_with(BEGIN_SHARED).await?;
        Ok(PgTx { tx })
    }

    /// Applies pending migrations; a second run is a no-op.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn parse<T: FromStr>(text: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    text.parse().map_err(corrupt)
}

#[async_trait]
impl Store for PgStore {
    async fn begin(&self, mode: LockMode) -> Result<Box<dyn StoreTx>, StoreError> {
        // BEGIN and the lock go in one round trip (one simple query).
        let begin = match mode {
            LockMode::Shared => BEGIN_SHARED,
            LockMode::Exclusive => BEGIN_EXCLUSIVE,
        };
        let tx = self.pool.begin_with(begin).await?;
        Ok(Box::new(PgTx { tx }))
    }

    async fn load_offsets(
        &self,
        group: &str,
        partitions: &[TopicPartition],
    ) -> Result<BTreeMap<TopicPartition, i64>, StoreError> {
        let topics: Vec<&str> = partitions.iter().map(|p| p.topic.as_str()).collect();
        let parts: Vec<i32> = partitions.iter().map(|p| p.partition).collect();
        let rows = sqlx::query(
            "SELECT o.topic, o.partition, o.next_offset
               FROM consumer_offsets o
               JOIN UNNEST($2::text[], $3::int[]) AS want(topic, partition)
                 ON want.topic = o.topic AND want.partition = o.partition
              WHERE o.consumer_group = $1",
        )
        .bind(group)
        .bind(&topics)
        .bind(&parts)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    TopicPartition {
                        topic: r.get("topic"),
                        partition: r.get("partition"),
                    },
                    r.get("next_offset"),
                )
            })
            .collect())
    }

    async fn outbox_pending(&self, limit: i64) -> Result<Vec<OutboxMessage>, StoreError> {
        // Claims the rows for 30 s: another relay skips them meanwhile, and
        // takes them over if this one dies before marking them sent.
        let rows = sqlx::query(
            "UPDATE outbox SET claimed_until = now() + INTERVAL '30 seconds'
              WHERE id IN (SELECT id FROM outbox
                            WHERE sent_at IS NULL AND (claimed_until IS NULL OR claimed_until < now())
                            ORDER BY seq LIMIT $1
                            FOR UPDATE SKIP LOCKED)
              RETURNING id, seq, topic, message_key, payload, headers",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut messages = rows
            .into_iter()
            .map(|r| {
                let headers: serde_json::Value = r.get("headers");
                let headers = headers
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                (
                    r.get::<i64, _>("seq"),
                    OutboxMessage {
                        id: r.get("id"),
                        topic: r.get("topic"),
                        key: r.get("message_key"),
                        payload: r.get("payload"),
                        headers,
                    },
                )
            })
            .collect::<Vec<_>>();
        messages.sort_by_key(|(seq, _)| *seq);
        Ok(messages.into_iter().map(|(_, m)| m).collect())
    }

    async fn mark_sent(&self, ids: &[Uuid]) -> Result<(), StoreError> {
        sqlx::query("UPDATE outbox SET sent_at = now() WHERE id = ANY($1) AND sent_at IS NULL")
            .bind(ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn buffer_report(&self) -> Result<Vec<BufferReport>, StoreError> {
        let rows = sqlx::query(
            "SELECT account_type, currency, current_balance, min_threshold, target_threshold,
                    max_threshold, buffer_status, amount_to_target
               FROM v_buffer_status",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut reports = rows
            .into_iter()
            .map(|r| {
                let status: String = r.get("buffer_status");
                Ok(BufferReport {
                    account: parse(r.get::<&str, _>("account_type"))?,
                    currency: r.get("currency"),
                    balance: r.get::<Decimal, _>("current_balance").normalize(),
                    min: r.get::<Decimal, _>("min_threshold").normalize(),
                    target: r.get::<Decimal, _>("target_threshold").normalize(),
                    max: r.get::<Decimal, _>("max_threshold").normalize(),
                    status: status_from_str(&status)?,
                    amount_to_target: r.get::<Decimal, _>("amount_to_target").normalize(),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        reports.sort_by_key(|r| r.account);
        Ok(reports)
    }

    async fn windows(&self) -> Result<Vec<WindowRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT window_start, window_end, event_count, late_event_count, status, result
               FROM settlement_windows ORDER BY window_start",
        )
        .fetch_all(&self.pool)
        .await?;
        let flows =
            sqlx::query("SELECT window_start, account_type, inflow, outflow FROM window_flows")
                .fetch_all(&self.pool)
                .await?;
        let demand = sqlx::query("SELECT window_start, direction, amount FROM window_demand")
            .fetch_all(&self.pool)
            .await?;
        let mut records: Vec<WindowRecord> = rows
            .into_iter()
            .map(|r| WindowRecord {
                window_start: r.get("window_start"),
                window_end: r.get("window_end"),
                event_count: r.get("event_count"),
                late_event_count: r.get("late_event_count"),
                closed: r.get::<&str, _>("status") == "closed",
                flows: BTreeMap::new(),
                demand: BTreeMap::new(),
                result: r.get("result"),
            })
            .collect();
        for f in flows {
            let start: DateTime<Utc> = f.get("window_start");
            if let Some(w) = records.iter_mut().find(|w| w.window_start == start) {
                w.flows.insert(
                    parse(f.get::<&str, _>("account_type"))?,
                    (
                        f.get::<Decimal, _>("inflow").normalize(),
                        f.get::<Decimal, _>("outflow").normalize(),
                    ),
                );
            }
        }
        for d in demand {
            let start: DateTime<Utc> = d.get("window_start");
            if let Some(w) = records.iter_mut().find(|w| w.window_start == start) {
                w.demand.insert(
                    parse(d.get::<&str, _>("direction"))?,
                    d.get::<Decimal, _>("amount").normalize(),
                );
            }
        }
        Ok(records)
    }

    async fn planned_commands(&self) -> Result<Vec<PlannedCommand>, StoreError> {
        let rows = sqlx::query(
            "SELECT command_id, cycle_id, direction, trigger_reason, currency, amount,
                    source_account, destination_account, emitted, created_at
               FROM planned_commands ORDER BY created_at, cycle_id, direction, command_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|r| planned_from_row(&r)).collect()
    }

    async fn request_trigger(&self, requested_by: &str) -> Result<i64, StoreError> {
        let id = sqlx::query_scalar(
            "INSERT INTO settlement_triggers (requested_by) VALUES ($1) RETURNING id",
        )
        .bind(requested_by)
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    async fn purge_processed(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(sqlx::query(
            "DELETE FROM processed_events WHERE event_id IN (
                SELECT event_id FROM processed_events WHERE processed_at < $1 LIMIT 10000)",
        )
        .bind(before)
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn set_offsets(
        &self,
        group: &str,
        offsets: &BTreeMap<TopicPartition, i64>,
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for (tp, offset) in offsets {
            sqlx::query(
                "INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (consumer_group, topic, partition)
                 DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()",
            )
            .bind(group)
            .bind(&tp.topic)
            .bind(tp.partition)
            .bind(offset)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn jobs_by_status(&self) -> Result<Vec<(JobStatus, i64)>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT status, count(*) FROM conversion_jobs GROUP BY status")
                .fetch_all(&self.pool)
                .await?;
        let mut counts: Vec<(JobStatus, i64)> = JobStatus::ALL.map(|s| (s, 0)).to_vec();
        for (status, n) in rows {
            let status: JobStatus = parse(&status)?;
            if let Some(entry) = counts.iter_mut().find(|(s, _)| *s == status) {
                entry.1 = n;
            }
        }
        Ok(counts)
    }
}

fn status_from_str(s: &str) -> Result<BufferStatus, StoreError> {
    Ok(match s {
        "CRITICAL_LOW" => BufferStatus::CriticalLow,
        "BELOW_TARGET" => BufferStatus::BelowTarget,
        "HEALTHY" => BufferStatus::Healthy,
        "OVER_CAPITALIZED" => BufferStatus::OverCapitalized,
        other => return Err(corrupt(format!("unknown buffer status {other}"))),
    })
}

/// A `window_flows` row's sums.
fn flow_from_row(r: &sqlx::postgres::PgRow) -> Flow {
    Flow {
        inflow: r.get::<Decimal, _>("inflow").normalize(),
        outflow: r.get::<Decimal, _>("outflow").normalize(),
        outflow_events: u64::try_from(r.get::<i64, _>("outflow_events")).unwrap_or(0),
    }
}

fn planned_from_row(r: &sqlx::postgres::PgRow) -> Result<PlannedCommand, StoreError> {
    let currency: Currency = parse(r.get::<&str, _>("currency"))?;
    Ok(PlannedCommand {
        command: ConversionCommand {
            command_id: r.get("command_id"),
            direction: parse(r.get::<&str, _>("direction"))?,
            trigger: parse::<ConversionTrigger>(r.get::<&str, _>("trigger_reason"))?,
            amount: Money {
                currency,
                value: r.get::<Decimal, _>("amount").normalize(),
            },
            source_account: parse(r.get::<&str, _>("source_account"))?,
            destination_account: parse(r.get::<&str, _>("destination_account"))?,
            cycle_id: r.get("cycle_id"),
            created_at: r.get("created_at"),
        },
        emitted: r.get("emitted"),
    })
}

pub(super) struct PgTx {
    tx: Transaction<'static, Postgres>,
}

impl PgTx {
    /// The connection, for queries outside the [`StoreTx`] interface.
    pub(super) fn pg(&mut self) -> &mut sqlx::PgConnection {
        &mut self.tx
    }

    /// The transaction itself.
    pub(super) fn pg_tx(&mut self) -> &mut Transaction<'static, Postgres> {
        &mut self.tx
    }

    /// Every `conversion_providers` row, by priority then name.
    async fn provider_rows(&mut self) -> Result<Vec<crate::providers::ProviderRow>, StoreError> {
        sqlx::query("SELECT * FROM conversion_providers ORDER BY priority, name")
            .fetch_all(&mut *self.tx)
            .await?
            .iter()
            .map(super::postgres_jobs::provider_from_row)
            .collect()
    }
}

#[async_trait]
impl StoreTx for PgTx {
    async fn advance_offsets(
        &mut self,
        group: &str,
        ranges: &[OffsetRange],
    ) -> Result<(), StoreError> {
        super::postgres_batch::advance_offsets(&mut self.tx, group, ranges).await
    }

    async fn claim_events(&mut self, events: &[EventRef]) -> Result<HashSet<Uuid>, StoreError> {
        super::postgres_batch::claim_events(&mut self.tx, events).await
    }

    async fn claim_new_events(&mut self, events: &[EventRef]) -> Result<HashSet<Uuid>, StoreError> {
        super::postgres_batch::claim_new_events(&mut self.tx, events).await
    }

    async fn start_batch(
        &mut self,
        group: &str,
        ranges: &[OffsetRange],
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        super::postgres_batch::start_batch(&mut self.tx, group, ranges).await
    }

    async fn add_batch_sums(
        &mut self,
        tallies: &WindowTallies,
        length: chrono::Duration,
        updates: &[ProgressUpdate],
    ) -> Result<(), StoreError> {
        super::postgres_batch::add_batch_sums(&mut self.tx, tallies, length, updates).await
    }

    async fn add_tallies(
        &mut self,
        tallies: &WindowTallies,
        length: chrono::Duration,
    ) -> Result<(), StoreError> {
        super::postgres_batch::add_tallies(&mut self.tx, tallies, length).await
    }

    async fn record_progress(&mut self, updates: &[ProgressUpdate]) -> Result<(), StoreError> {
        super::postgres_batch::record_progress(&mut self.tx, updates).await
    }

    async fn register_partitions(
        &mut self,
        partitions: &[TopicPartition],
    ) -> Result<(), StoreError> {
        let topics: Vec<&str> = partitions.iter().map(|tp| tp.topic.as_str()).collect();
        let numbers: Vec<i32> = partitions.iter().map(|tp| tp.partition).collect();
        sqlx::query(
            "INSERT INTO partition_progress (topic, partition, watermark, caught_up, caught_up_since, updated_at)
             SELECT t, p, NULL, FALSE, NULL, now() FROM unnest($1::text[], $2::int[]) AS u(t, p)
             ON CONFLICT (topic, partition) DO NOTHING",
        )
        .bind(&topics)
        .bind(&numbers)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn enqueue(&mut self, messages: &[OutboxMessage]) -> Result<(), StoreError> {
        super::postgres_batch::enqueue(&mut self.tx, messages).await
    }

    async fn next_window_start(&mut self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT next_window_start FROM settlement_state WHERE id = 1")
                .fetch_one(&mut *self.tx)
                .await?,
        )
    }

    async fn set_next_window_start(&mut self, start: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE settlement_state SET next_window_start = $1, updated_at = now() WHERE id = 1",
        )
        .bind(start)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn open_windows(&mut self) -> Result<Vec<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT window_start FROM settlement_windows WHERE status = 'open' ORDER BY window_start",
        )
        .fetch_all(&mut *self.tx)
        .await?)
    }

    async fn partition_progress(
        &mut self,
        topics: &[String],
    ) -> Result<Vec<PartitionProgress>, StoreError> {
        let rows = sqlx::query(
            "SELECT watermark, caught_up_since, updated_at FROM partition_progress WHERE topic = ANY($1)",
        )
        .bind(topics)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| PartitionProgress {
                watermark: r.get("watermark"),
                caught_up_since: r.get("caught_up_since"),
                reported_at: r.get("updated_at"),
            })
            .collect())
    }

    async fn window_tally(&mut self, start: DateTime<Utc>) -> Result<WindowTally, StoreError> {
        let mut tally = WindowTally::default();
        if let Some(row) = sqlx::query(
            "SELECT event_count, late_event_count FROM settlement_windows WHERE window_start = $1",
        )
        .bind(start)
        .fetch_optional(&mut *self.tx)
        .await?
        {
            tally.events = row.get::<i64, _>("event_count") as u64;
            tally.late_events = row.get::<i64, _>("late_event_count") as u64;
        }
        for r in sqlx::query(
            "SELECT account_type, inflow, outflow, outflow_events
               FROM window_flows WHERE window_start = $1",
        )
        .bind(start)
        .fetch_all(&mut *self.tx)
        .await?
        {
            tally
                .flows
                .insert(parse(r.get::<&str, _>("account_type"))?, flow_from_row(&r));
        }
        for r in sqlx::query(
            "SELECT direction, amount, event_count FROM window_demand WHERE window_start = $1",
        )
        .bind(start)
        .fetch_all(&mut *self.tx)
        .await?
        {
            tally.demand.insert(
                parse(r.get::<&str, _>("direction"))?,
                (
                    r.get::<Decimal, _>("amount").normalize(),
                    r.get::<i64, _>("event_count") as u64,
                ),
            );
        }
        Ok(tally)
    }

    async fn apply_flows(&mut self, tally: &WindowTally) -> Result<(), StoreError> {
        for (account, flow) in &tally.flows {
            sqlx::query(
                "UPDATE buffer_balances SET balance = balance + $2, updated_at = now() WHERE account_type = $1",
            )
            .bind(account.as_str())
            .bind(flow.net())
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    async fn buffer_positions(&mut self) -> Result<Vec<BufferPosition>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT t.account_type, t.min_threshold, t.target_threshold, t.max_threshold,
                        t.conversion_batch_size, b.balance,
                        COALESCE((SELECT sum(p.amount) FROM planned_commands p
                                   WHERE p.destination_account = t.account_type AND ",
            in_flight!(),
            "), 0) AS incoming,
                        COALESCE((SELECT sum(p.amount) FROM planned_commands p
                                   WHERE p.source_account = t.account_type AND ",
            in_flight!(),
            "), 0) AS outgoing
                   FROM buffer_thresholds t JOIN buffer_balances b USING (account_type)"
        ))
        .fetch_all(&mut *self.tx)
        .await?;
        let mut positions = rows
            .into_iter()
            .map(|r| {
                let account: BufferAccount = parse(r.get::<&str, _>("account_type"))?;
                Ok(BufferPosition {
                    account,
                    thresholds: Thresholds::new(
                        r.get::<Decimal, _>("min_threshold").normalize(),
                        r.get::<Decimal, _>("target_threshold").normalize(),
                        r.get::<Decimal, _>("max_threshold").normalize(),
                    )
                    .map_err(corrupt)?,
                    batch_size: r.get::<Decimal, _>("conversion_batch_size").normalize(),
                    balance: r.get::<Decimal, _>("balance").normalize(),
                    incoming: r.get::<Decimal, _>("incoming").normalize(),
                    outgoing: r.get::<Decimal, _>("outgoing").normalize(),
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        positions.sort_by_key(|p| p.account);
        Ok(positions)
    }

    async fn in_flight(&mut self) -> Result<Vec<InFlight>, StoreError> {
        sqlx::query(concat!(
            "SELECT p.destination_account, p.amount, p.created_at FROM planned_commands p
                  WHERE ",
            in_flight!(),
            " ORDER BY p.created_at, p.command_id"
        ))
        .fetch_all(&mut *self.tx)
        .await?
        .into_iter()
        .map(|r| {
            Ok(InFlight {
                destination: parse(r.get::<&str, _>("destination_account"))?,
                amount: r.get::<Decimal, _>("amount").normalize(),
                since: r.get("created_at"),
            })
        })
        .collect()
    }

    async fn planning_records(
        &mut self,
        since: DateTime<Utc>,
    ) -> Result<PlanningRecords, StoreError> {
        let providers = self.provider_rows().await?;
        let mut windows: BTreeMap<DateTime<Utc>, WindowTally> = BTreeMap::new();
        for r in sqlx::query(
            "SELECT f.window_start, f.account_type, f.inflow, f.outflow, f.outflow_events
               FROM window_flows f JOIN settlement_windows w USING (window_start)
              WHERE w.status = 'closed' AND f.window_start >= $1",
        )
        .bind(since)
        .fetch_all(&mut *self.tx)
        .await?
        {
            windows
                .entry(r.get("window_start"))
                .or_default()
                .flows
                .insert(parse(r.get::<&str, _>("account_type"))?, flow_from_row(&r));
        }
        // From the command's time (the job's intake when the command was
        // not planned here): the age `in_flight()` reports is measured from
        // the same instant, so a conversion is overdue only once it is
        // slower than the conversions before it were.
        let lead_times = sqlx::query(
            "SELECT (EXTRACT(EPOCH FROM j.completed_at - COALESCE(p.created_at, j.created_at))
                     * 1000)::BIGINT AS ms
               FROM conversion_jobs j
               LEFT JOIN planned_commands p
                      ON p.command_id = CASE WHEN j.idempotency_key ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                                             THEN j.idempotency_key::uuid END
              WHERE j.status = 'completed' AND j.completed_at >= $1
              ORDER BY j.completed_at",
        )
        .bind(since)
        .fetch_all(&mut *self.tx)
        .await?
        .iter()
        .map(|r| chrono::Duration::milliseconds(r.get::<Option<i64>, _>("ms").unwrap_or(0).max(0)))
        .collect();
        Ok(PlanningRecords {
            providers,
            windows,
            lead_times,
        })
    }

    async fn amount_limits(
        &mut self,
    ) -> Result<BTreeMap<ConversionDirection, AmountLimits>, StoreError> {
        Ok(crate::planner::amount_limits(&self.provider_rows().await?))
    }

    async fn auto_rebalance_paused(&mut self) -> Result<bool, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT auto_rebalance_paused FROM settlement_state WHERE id = 1")
                .fetch_one(&mut *self.tx)
                .await?,
        )
    }

    async fn close_window(
        &mut self,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        watermark: DateTime<Utc>,
        result: &serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO settlement_windows (window_start, window_end, status, closed_at, watermark, result)
             VALUES ($1, $2, 'closed', now(), $3, $4)
             ON CONFLICT (window_start) DO UPDATE SET
                status = 'closed', closed_at = now(), watermark = EXCLUDED.watermark, result = EXCLUDED.result",
        )
        .bind(start)
        .bind(end)
        .bind(watermark)
        .bind(result)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    async fn record_commands(&mut self, commands: &[PlannedCommand]) -> Result<(), StoreError> {
        for planned in commands {
            let c = &planned.command;
            sqlx::query(
                "INSERT INTO planned_commands (command_id, cycle_id, direction, trigger_reason, currency,
                        amount, source_account, destination_account, emitted, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (command_id) DO NOTHING",
            )
            .bind(c.command_id)
            .bind(&c.cycle_id)
            .bind(c.direction.as_str())
            .bind(c.trigger.as_str())
            .bind(c.amount.currency.code())
            .bind(c.amount.value)
            .bind(c.source_account.as_str())
            .bind(c.destination_account.as_str())
            .bind(planned.emitted)
            .bind(c.created_at)
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    async fn pending_triggers(&mut self) -> Result<Vec<i64>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM settlement_triggers WHERE handled_at IS NULL ORDER BY id",
        )
        .fetch_all(&mut *self.tx)
        .await?)
    }

    async fn finish_trigger(
        &mut self,
        id: i64,
        result: &serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE settlement_triggers SET handled_at = now(), result = $2 WHERE id = $1")
            .bind(id)
            .bind(result)
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    async fn planned_command(&mut self, id: Uuid) -> Result<Option<PlannedCommand>, StoreError> {
        sqlx::query(
            "SELECT command_id, cycle_id, direction, trigger_reason, currency, amount,
                    source_account, destination_account, emitted, created_at
               FROM planned_commands WHERE command_id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *self.tx)
        .await?
        .map(|r| planned_from_row(&r))
        .transpose()
    }

    async fn announced_statuses(
        &mut self,
    ) -> Result<BTreeMap<BufferAccount, BufferStatus>, StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT account_type, status FROM buffer_alert_state")
                .fetch_all(&mut *self.tx)
                .await?;
        rows.iter()
            .map(|(account, status)| Ok((parse(account)?, status_from_str(status)?)))
            .collect()
    }

    async fn record_announced(
        &mut self,
        statuses: &BTreeMap<BufferAccount, BufferStatus>,
    ) -> Result<(), StoreError> {
        for (account, status) in statuses {
            sqlx::query(
                "INSERT INTO buffer_alert_state (account_type, status) VALUES ($1, $2)
                 ON CONFLICT (account_type) DO UPDATE SET status = EXCLUDED.status, updated_at = now()
                 WHERE buffer_alert_state.status <> EXCLUDED.status",
            )
            .bind(account.as_str())
            .bind(status.as_str())
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_begin_statements_take_the_settlement_lock() {
        let key = super::SETTLEMENT_LOCK.to_string();
        assert!(super::BEGIN_SHARED.ends_with(&format!("_shared({key})")));
        assert!(super::BEGIN_EXCLUSIVE.ends_with(&format!("_lock({key})")));
    }
}
