//! The statements of a consumer batch on PostgreSQL: offsets, event ids,
//! window sums, partition progress and outbox rows, each written with one
//! statement over arrays (`unnest`) whatever the batch holds. A batch costs
//! the same handful of round trips for one partition or twenty, one window
//! or three; the per-row work is PostgreSQL's own.
//!
//! Not here: what a batch means (which events are fresh, which window an
//! event goes to) — that is [`crate::ingest::batch`]; this module only writes.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::postgres::PgArguments;
use sqlx::query::QueryAs;
use sqlx::{PgConnection, Postgres};
use uuid::Uuid;

use super::{EventRef, OffsetRange, OutboxMessage, ProgressUpdate, StoreError};
use crate::window::WindowTallies;

/// The CTEs that lock the group's offset rows of every range ($1 the group;
/// $2–$5 topics, partitions, first and next offsets), find the ranges
/// another consumer already committed past (`conflicts`), and store the new
/// next offsets unless there is one.
macro_rules! offsets_ctes {
    () => {
        "WITH want AS (
             SELECT * FROM UNNEST($2::text[], $3::int[], $4::bigint[], $5::bigint[])
                 AS w(topic, partition, first_offset, next_offset)),
         locked AS (
             SELECT o.topic, o.partition, o.next_offset FROM consumer_offsets o
               JOIN want w ON w.topic = o.topic AND w.partition = o.partition
              WHERE o.consumer_group = $1
              FOR UPDATE OF o),
         conflicts AS (
             SELECT l.topic, l.partition, l.next_offset AS stored, w.first_offset
               FROM locked l JOIN want w ON w.topic = l.topic AND w.partition = l.partition
              WHERE l.next_offset > w.first_offset),
         stored AS (
             INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset)
             SELECT $1, topic, partition, next_offset FROM want
              WHERE NOT EXISTS (SELECT 1 FROM conflicts)
             ON CONFLICT (consumer_group, topic, partition)
             DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now())
         "
    };
}

/// The ranges as the columns `offsets_ctes!` binds.
struct RangeColumns<'a> {
    topics: Vec<&'a str>,
    partitions: Vec<i32>,
    firsts: Vec<i64>,
    nexts: Vec<i64>,
}

impl<'a> RangeColumns<'a> {
    fn of(ranges: &'a [OffsetRange]) -> Self {
        Self {
            topics: ranges.iter().map(|r| r.tp.topic.as_str()).collect(),
            partitions: ranges.iter().map(|r| r.tp.partition).collect(),
            firsts: ranges.iter().map(|r| r.first).collect(),
            nexts: ranges.iter().map(|r| r.next).collect(),
        }
    }

    /// Binds `group` and the columns to a query over `offsets_ctes!`.
    fn bind<'q, O>(
        &'q self,
        group: &'q str,
        query: QueryAs<'q, Postgres, O, PgArguments>,
    ) -> QueryAs<'q, Postgres, O, PgArguments> {
        query
            .bind(group)
            .bind(&self.topics)
            .bind(&self.partitions)
            .bind(&self.firsts)
            .bind(&self.nexts)
    }
}

/// A conflict row: topic, partition, the stored next offset, the batch's first.
type Conflict = (String, i32, i64, i64);

fn refuse(conflict: Option<Conflict>) -> Result<(), StoreError> {
    match conflict {
        Some((topic, partition, stored, first)) => Err(StoreError::OffsetConflict {
            topic,
            partition,
            stored,
            first,
        }),
        None => Ok(()),
    }
}

/// Locks the group's offset rows of every range (latest committed values,
/// whatever this transaction's snapshot), refuses the batch if another
/// consumer already committed past a range's first offset, and stores the
/// new next offsets — one statement. A conflict writes nothing.
pub(super) async fn advance_offsets(
    conn: &mut PgConnection,
    group: &str,
    ranges: &[OffsetRange],
) -> Result<(), StoreError> {
    if ranges.is_empty() {
        return Ok(());
    }
    let c = RangeColumns::of(ranges);
    let conflicts: Vec<Conflict> = c
        .bind(
            group,
            sqlx::query_as(concat!(
                offsets_ctes!(),
                "SELECT topic, partition, stored, first_offset FROM conflicts
                  ORDER BY topic, partition"
            )),
        )
        .fetch_all(&mut *conn)
        .await?;
    refuse(conflicts.into_iter().next())
}

/// [`advance_offsets`] and the window clock (`settlement_state`'s
/// `next_window_start`) in one statement: the clock rides on every row, with
/// the conflicts (if any) left-joined to it.
pub(super) async fn start_batch(
    conn: &mut PgConnection,
    group: &str,
    ranges: &[OffsetRange],
) -> Result<Option<DateTime<Utc>>, StoreError> {
    let c = RangeColumns::of(ranges);
    type Row = (
        Option<DateTime<Utc>>,
        Option<String>,
        Option<i32>,
        Option<i64>,
        Option<i64>,
    );
    let rows: Vec<Row> = c
        .bind(
            group,
            sqlx::query_as(concat!(
                offsets_ctes!(),
                "SELECT s.next_window_start, c.topic, c.partition, c.stored, c.first_offset
                   FROM settlement_state s LEFT JOIN conflicts c ON TRUE
                  WHERE s.id = 1
                  ORDER BY c.topic, c.partition"
            )),
        )
        .fetch_all(&mut *conn)
        .await?;
    let Some((clock, ..)) = rows.first().cloned() else {
        return Err(StoreError::Corrupt("settlement_state has no row".into()));
    };
    let conflict = rows
        .into_iter()
        .find_map(|(_, topic, partition, stored, first)| {
            Some((topic?, partition?, stored?, first?))
        });
    refuse(conflict)?;
    Ok(clock)
}

/// Usually none was seen before, and binary `COPY` writes them with about
/// a third less of the database's time than an insert that checks each
/// for a conflict. If one is already there (a duplicate or a replay), the
/// unique index refuses the `COPY`, which voids the transaction:
/// [`StoreError::SeenBefore`] says to write the batch again with
/// `claim_events`. No savepoint: it would cost a round trip and a
/// subtransaction on every batch for the rare one that needs it.
pub(super) async fn claim_new_events(
    conn: &mut PgConnection,
    events: &[EventRef],
) -> Result<HashSet<Uuid>, StoreError> {
    if events.is_empty() {
        return Ok(HashSet::new());
    }
    match copy_events(conn, events).await {
        Ok(()) => Ok(events.iter().map(|e| e.event_id).collect()),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(UNIQUE_VIOLATION) => {
            Err(StoreError::SeenBefore)
        }
        Err(e) => Err(e.into()),
    }
}

/// SQLSTATE of a unique index refusing a row.
const UNIQUE_VIOLATION: &str = "23505";

/// `COPY`s every event's `processed_events` row; fails whole if any id is
/// already there.
async fn copy_events(conn: &mut PgConnection, events: &[EventRef]) -> Result<(), sqlx::Error> {
    let mut copy = conn
        .copy_in_raw(
            "COPY processed_events (event_id, source_topic, partition, \"offset\", window_start)
             FROM STDIN (FORMAT binary)",
        )
        .await?;
    copy.send(binary_rows(events)).await?;
    copy.finish().await?;
    Ok(())
}

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 UTC).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The events' rows in PostgreSQL's binary `COPY` format.
fn binary_rows(events: &[EventRef]) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = Vec::with_capacity(21 + events.len() * 90);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0_i32.to_be_bytes()); // flags
    out.extend_from_slice(&0_i32.to_be_bytes()); // header extension length
    for e in events {
        out.extend_from_slice(&5_i16.to_be_bytes());
        field(&mut out, e.event_id.as_bytes());
        field(&mut out, e.tp.topic.as_bytes());
        field(&mut out, &e.tp.partition.to_be_bytes());
        field(&mut out, &e.offset.to_be_bytes());
        let micros = e.window_start.timestamp_micros() - PG_EPOCH_MICROS;
        field(&mut out, &micros.to_be_bytes());
    }
    out.extend_from_slice(&(-1_i16).to_be_bytes());
    out
}

/// Claims the ids one by one with `ON CONFLICT DO NOTHING`: those written
/// are the new ones; the unique index decides.
pub(super) async fn claim_events(
    conn: &mut PgConnection,
    events: &[EventRef],
) -> Result<HashSet<Uuid>, StoreError> {
    if events.is_empty() {
        return Ok(HashSet::new());
    }
    let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
    let topics: Vec<&str> = events.iter().map(|e| e.tp.topic.as_str()).collect();
    let partitions: Vec<i32> = events.iter().map(|e| e.tp.partition).collect();
    let offsets: Vec<i64> = events.iter().map(|e| e.offset).collect();
    let windows: Vec<DateTime<Utc>> = events.iter().map(|e| e.window_start).collect();
    let claimed: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO processed_events (event_id, source_topic, partition, \"offset\", window_start)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int[], $4::bigint[], $5::timestamptz[])
         ON CONFLICT (event_id) DO NOTHING
         RETURNING event_id",
    )
    .bind(&ids)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&windows)
    .fetch_all(&mut *conn)
    .await?;
    Ok(claimed.into_iter().collect())
}

/// Window sums as columns, one element per row to upsert.
#[derive(Default)]
struct TallyColumns<'a> {
    starts: Vec<DateTime<Utc>>,
    ends: Vec<DateTime<Utc>>,
    events: Vec<i64>,
    late: Vec<i64>,
    flow_starts: Vec<DateTime<Utc>>,
    flow_accounts: Vec<&'a str>,
    inflows: Vec<Decimal>,
    outflows: Vec<Decimal>,
    outflow_events: Vec<i64>,
    demand_starts: Vec<DateTime<Utc>>,
    demand_directions: Vec<&'a str>,
    demand_amounts: Vec<Decimal>,
    demand_counts: Vec<i64>,
}

impl<'a> TallyColumns<'a> {
    fn of(tallies: &'a WindowTallies, length: chrono::Duration) -> Self {
        let mut c = Self::default();
        for (start, tally) in &tallies.0 {
            c.starts.push(*start);
            c.ends.push(*start + length);
            c.events.push(tally.events as i64);
            c.late.push(tally.late_events as i64);
            for (account, flow) in &tally.flows {
                c.flow_starts.push(*start);
                c.flow_accounts.push(account.as_str());
                c.inflows.push(flow.inflow);
                c.outflows.push(flow.outflow);
                c.outflow_events
                    .push(i64::try_from(flow.outflow_events).unwrap_or(i64::MAX));
            }
            for (direction, (amount, count)) in &tally.demand {
                c.demand_starts.push(*start);
                c.demand_directions.push(direction.as_str());
                c.demand_amounts.push(*amount);
                c.demand_counts.push(*count as i64);
            }
        }
        c
    }
}

/// Adds the batch's sums to its windows, flows and demand.
pub(super) async fn add_tallies(
    conn: &mut PgConnection,
    tallies: &WindowTallies,
    length: chrono::Duration,
) -> Result<(), StoreError> {
    add_batch_sums(conn, tallies, length, &[]).await
}

/// Records the partitions' event-time progress and whether each is caught up.
pub(super) async fn record_progress(
    conn: &mut PgConnection,
    updates: &[ProgressUpdate],
) -> Result<(), StoreError> {
    add_batch_sums(
        conn,
        &WindowTallies::default(),
        chrono::Duration::zero(),
        updates,
    )
    .await
}

/// Adds the batch's sums to its windows, flows and demand, and records the
/// partitions' event-time progress and whether each is caught up — one
/// statement (the windows' rows are written before the flows that reference
/// them are checked: foreign keys are checked at the end of the statement).
/// A partition named twice is merged first ([`ProgressUpdate::merged`]): one
/// `INSERT … ON CONFLICT` may not touch a row twice.
pub(super) async fn add_batch_sums(
    conn: &mut PgConnection,
    tallies: &WindowTallies,
    length: chrono::Duration,
    updates: &[ProgressUpdate],
) -> Result<(), StoreError> {
    if tallies.0.is_empty() && updates.is_empty() {
        return Ok(());
    }
    let c = TallyColumns::of(tallies, length);
    let updates = &ProgressUpdate::merged(updates);
    let topics: Vec<&str> = updates.iter().map(|u| u.tp.topic.as_str()).collect();
    let partitions: Vec<i32> = updates.iter().map(|u| u.tp.partition).collect();
    let watermarks: Vec<Option<DateTime<Utc>>> = updates.iter().map(|u| u.max_event_time).collect();
    let caught_up: Vec<bool> = updates.iter().map(|u| u.caught_up).collect();
    let nows: Vec<DateTime<Utc>> = updates.iter().map(|u| u.now).collect();
    sqlx::query(
        "WITH windows AS (
             INSERT INTO settlement_windows (window_start, window_end, event_count, late_event_count)
             SELECT * FROM UNNEST($1::timestamptz[], $2::timestamptz[], $3::bigint[], $4::bigint[])
             ON CONFLICT (window_start) DO UPDATE SET
                event_count = settlement_windows.event_count + EXCLUDED.event_count,
                late_event_count = settlement_windows.late_event_count + EXCLUDED.late_event_count
             RETURNING 1),
         flows AS (
             INSERT INTO window_flows (window_start, account_type, inflow, outflow, outflow_events)
             SELECT * FROM UNNEST($5::timestamptz[], $6::text[], $7::numeric[], $8::numeric[],
                                  $18::bigint[])
             ON CONFLICT (window_start, account_type) DO UPDATE SET
                inflow = window_flows.inflow + EXCLUDED.inflow,
                outflow = window_flows.outflow + EXCLUDED.outflow,
                outflow_events = window_flows.outflow_events + EXCLUDED.outflow_events
             RETURNING 1),
         demand AS (
             INSERT INTO window_demand (window_start, direction, amount, event_count)
             SELECT * FROM UNNEST($9::timestamptz[], $10::text[], $11::numeric[], $12::bigint[])
             ON CONFLICT (window_start, direction) DO UPDATE SET
                amount = window_demand.amount + EXCLUDED.amount,
                event_count = window_demand.event_count + EXCLUDED.event_count
             RETURNING 1),
         progress AS (
             INSERT INTO partition_progress (topic, partition, watermark, caught_up, caught_up_since, updated_at)
             SELECT t, p, w, c, CASE WHEN c THEN n END, n
               FROM UNNEST($13::text[], $14::int[], $15::timestamptz[], $16::bool[], $17::timestamptz[])
                 AS u(t, p, w, c, n)
             ON CONFLICT (topic, partition) DO UPDATE SET
                watermark = GREATEST(partition_progress.watermark, EXCLUDED.watermark),
                caught_up = EXCLUDED.caught_up,
                caught_up_since = CASE
                    WHEN NOT EXCLUDED.caught_up THEN NULL
                    ELSE COALESCE(partition_progress.caught_up_since, EXCLUDED.caught_up_since)
                END,
                updated_at = EXCLUDED.updated_at
             RETURNING 1)
         SELECT (SELECT count(*) FROM windows), (SELECT count(*) FROM flows),
                (SELECT count(*) FROM demand), (SELECT count(*) FROM progress)",
    )
    .bind(&c.starts)
    .bind(&c.ends)
    .bind(&c.events)
    .bind(&c.late)
    .bind(&c.flow_starts)
    .bind(&c.flow_accounts)
    .bind(&c.inflows)
    .bind(&c.outflows)
    .bind(&c.demand_starts)
    .bind(&c.demand_directions)
    .bind(&c.demand_amounts)
    .bind(&c.demand_counts)
    .bind(&topics)
    .bind(&partitions)
    .bind(&watermarks)
    .bind(&caught_up)
    .bind(&nows)
    .bind(&c.outflow_events)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Queues outbox messages (an id already queued is kept as it is) — one
/// statement.
pub(super) async fn enqueue(
    conn: &mut PgConnection,
    messages: &[OutboxMessage],
) -> Result<(), StoreError> {
    if messages.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = messages.iter().map(|m| m.id).collect();
    let topics: Vec<&str> = messages.iter().map(|m| m.topic.as_str()).collect();
    let keys: Vec<Option<&str>> = messages.iter().map(|m| m.key.as_deref()).collect();
    let payloads: Vec<&[u8]> = messages.iter().map(|m| m.payload.as_slice()).collect();
    let headers: Vec<serde_json::Value> = messages
        .iter()
        .map(|m| {
            serde_json::Value::Object(
                m.headers
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect(),
            )
        })
        .collect();
    // WITH ORDINALITY keeps the messages' order in `seq`, as one insert per
    // message did.
    sqlx::query(
        "INSERT INTO outbox (id, topic, message_key, payload, headers)
         SELECT id, topic, message_key, payload, headers
           FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::bytea[], $5::jsonb[])
                WITH ORDINALITY AS m(id, topic, message_key, payload, headers, n)
          ORDER BY n
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&ids)
    .bind(&topics)
    .bind(&keys)
    .bind(&payloads)
    .bind(&headers)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
