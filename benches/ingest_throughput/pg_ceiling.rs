//! (d) The database's own limit: the rows an engine batch writes (event ids
//! with their windows, window sums, offsets, partition progress), written by
//! a plain sqlx client with no Kafka and no decoding, one transaction per
//! batch of the engine's size, with `synchronous_commit` as the server has it.
//!
//! Two bulk paths for `processed_events`, each on its own fresh database:
//! `unnest` arrays with `ON CONFLICT DO NOTHING RETURNING` (what the engine
//! needs to tell fresh ids from duplicates) and binary `COPY` (no conflict
//! handling: the fastest way in, an upper bound). Everything else goes in one
//! statement. The faster of the two is the ceiling.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use sqlx::PgPool;
use treasury::codec::Codec;
use treasury::demo::generator::Generated;
use treasury::domain::FlowKind;
use treasury::ingest::decode_event;
use treasury::window::{WindowSpec, WindowTallies};
use uuid::Uuid;

/// How `processed_events` is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdPath {
    /// `INSERT … SELECT FROM UNNEST(…) ON CONFLICT DO NOTHING RETURNING`.
    Unnest,
    /// `COPY … FROM STDIN (FORMAT binary)`.
    Copy,
}

impl IdPath {
    pub fn label(self) -> &'static str {
        match self {
            IdPath::Unnest => "unnest + ON CONFLICT",
            IdPath::Copy => "binary COPY",
        }
    }
}

/// One batch's rows, as columns.
pub struct Batch {
    ids: Vec<Uuid>,
    topics: Vec<String>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    windows: Vec<DateTime<Utc>>,
    tallies: WindowTallies,
    /// Per partition: (topic, partition, next offset, max event time).
    progress: Vec<(String, i32, i64, DateTime<Utc>)>,
}

/// The engine's batches for `events`: same ids, windows and sums; partitions
/// are dealt round-robin per topic (the rows' shape, not the producer's
/// hashing, is what matters here).
pub fn batches(
    events: &[Generated],
    topics: [&str; 2],
    partitions: i32,
    batch: usize,
    spec: &WindowSpec,
) -> anyhow::Result<Vec<Batch>> {
    let codec = Codec::default();
    let now = Utc::now();
    let mut next_offset: BTreeMap<(usize, i32), i64> = BTreeMap::new();
    let mut dealt = [0_i64; 2];
    let mut out = Vec::new();
    for chunk in events.chunks(batch) {
        let mut b = Batch {
            ids: Vec::with_capacity(chunk.len()),
            topics: Vec::with_capacity(chunk.len()),
            partitions: Vec::with_capacity(chunk.len()),
            offsets: Vec::with_capacity(chunk.len()),
            windows: Vec::with_capacity(chunk.len()),
            tallies: WindowTallies::default(),
            progress: Vec::new(),
        };
        let mut progress: BTreeMap<(usize, i32), (i64, DateTime<Utc>)> = BTreeMap::new();
        for g in chunk {
            let t = usize::from(g.kind == FlowKind::Withdrawal);
            let event = decode_event(&codec, g.kind, Some(&g.bytes), now)
                .map_err(|r| anyhow::anyhow!("pg ceiling: a generated event is refused: {r}"))?;
            let partition = (dealt[t] % i64::from(partitions)) as i32;
            dealt[t] += 1;
            let offset = next_offset.entry((t, partition)).or_insert(0);
            let assignment = spec.assign(event.occurred_at, None);
            b.ids.push(event.event_id);
            b.topics.push(topics[t].to_owned());
            b.partitions.push(partition);
            b.offsets.push(*offset);
            b.windows.push(assignment.window_start);
            b.tallies.add(&event, assignment);
            let p = progress
                .entry((t, partition))
                .or_insert((0, event.occurred_at));
            p.0 = *offset + 1;
            p.1 = p.1.max(event.occurred_at);
            *offset += 1;
        }
        b.progress = progress
            .into_iter()
            .map(|((t, partition), (next, at))| (topics[t].to_owned(), partition, next, at))
            .collect();
        out.push(b);
    }
    Ok(out)
}

/// Writes every batch, one transaction each; returns the time it took.
pub async fn write_all(
    pool: &PgPool,
    batches: &[Batch],
    path: IdPath,
    spec: &WindowSpec,
    group: &str,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for batch in batches {
        let mut tx = pool.begin().await?;
        match path {
            IdPath::Unnest => {
                let claimed: Vec<Uuid> = sqlx::query_scalar(
                    "INSERT INTO processed_events (event_id, source_topic, partition, \"offset\", window_start)
                     SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::int[], $4::bigint[], $5::timestamptz[])
                     ON CONFLICT (event_id) DO NOTHING
                     RETURNING event_id",
                )
                .bind(&batch.ids)
                .bind(&batch.topics)
                .bind(&batch.partitions)
                .bind(&batch.offsets)
                .bind(&batch.windows)
                .fetch_all(&mut *tx)
                .await?;
                anyhow::ensure!(
                    claimed.len() == batch.ids.len(),
                    "pg ceiling: ids not fresh"
                );
            }
            IdPath::Copy => {
                let mut copy = tx
                    .copy_in_raw(
                        "COPY processed_events (event_id, source_topic, partition, \"offset\", window_start)
                         FROM STDIN (FORMAT binary)",
                    )
                    .await?;
                copy.send(binary_rows(batch)).await?;
                let rows = copy.finish().await?;
                anyhow::ensure!(
                    rows == batch.ids.len() as u64,
                    "pg ceiling: COPY wrote {rows} rows"
                );
            }
        }
        write_sums(&mut tx, batch, spec, group).await?;
        tx.commit().await?;
    }
    Ok(started.elapsed())
}

/// Window sums, offsets and progress in one statement.
async fn write_sums(
    conn: &mut sqlx::PgConnection,
    batch: &Batch,
    spec: &WindowSpec,
    group: &str,
) -> anyhow::Result<()> {
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    let mut events = Vec::new();
    let mut late = Vec::new();
    let (mut f_start, mut f_account, mut inflow, mut outflow) = (vec![], vec![], vec![], vec![]);
    let mut outflow_events: Vec<i64> = Vec::new();
    let (mut d_start, mut d_dir, mut d_amount, mut d_count) = (vec![], vec![], vec![], vec![]);
    for (start, tally) in &batch.tallies.0 {
        starts.push(*start);
        ends.push(spec.window_end(*start));
        events.push(tally.events as i64);
        late.push(tally.late_events as i64);
        for (account, flow) in &tally.flows {
            f_start.push(*start);
            f_account.push(account.as_str());
            inflow.push(flow.inflow);
            outflow.push(flow.outflow);
            outflow_events.push(flow.outflow_events as i64);
        }
        for (direction, (amount, count)) in &tally.demand {
            d_start.push(*start);
            d_dir.push(direction.as_str());
            d_amount.push(*amount);
            d_count.push(*count as i64);
        }
    }
    let p_topic: Vec<&str> = batch.progress.iter().map(|p| p.0.as_str()).collect();
    let p_part: Vec<i32> = batch.progress.iter().map(|p| p.1).collect();
    let p_next: Vec<i64> = batch.progress.iter().map(|p| p.2).collect();
    let p_at: Vec<DateTime<Utc>> = batch.progress.iter().map(|p| p.3).collect();
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
         offsets AS (
             INSERT INTO consumer_offsets (consumer_group, topic, partition, next_offset)
             SELECT $13, * FROM UNNEST($14::text[], $15::int[], $16::bigint[])
             ON CONFLICT (consumer_group, topic, partition)
             DO UPDATE SET next_offset = EXCLUDED.next_offset, updated_at = now()
             RETURNING 1),
         progress AS (
             INSERT INTO partition_progress (topic, partition, watermark, caught_up, updated_at)
             SELECT t, p, w, FALSE, now() FROM UNNEST($14::text[], $15::int[], $17::timestamptz[]) AS u(t, p, w)
             ON CONFLICT (topic, partition) DO UPDATE SET
                watermark = GREATEST(partition_progress.watermark, EXCLUDED.watermark),
                caught_up = EXCLUDED.caught_up,
                updated_at = EXCLUDED.updated_at
             RETURNING 1)
         SELECT (SELECT count(*) FROM windows) + (SELECT count(*) FROM flows)
              + (SELECT count(*) FROM demand) + (SELECT count(*) FROM offsets)
              + (SELECT count(*) FROM progress)",
    )
    .bind(&starts)
    .bind(&ends)
    .bind(&events)
    .bind(&late)
    .bind(&f_start)
    .bind(&f_account)
    .bind(&inflow)
    .bind(&outflow)
    .bind(&d_start)
    .bind(&d_dir)
    .bind(&d_amount)
    .bind(&d_count)
    .bind(group)
    .bind(&p_topic)
    .bind(&p_part)
    .bind(&p_next)
    .bind(&p_at)
    .bind(&outflow_events)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The batch's `processed_events` rows in PostgreSQL's binary COPY format.
fn binary_rows(batch: &Batch) -> Vec<u8> {
    let pg_epoch = Utc
        .with_ymd_and_hms(2000, 1, 1, 0, 0, 0)
        .single()
        .expect("a valid date");
    let mut out = Vec::with_capacity(19 + batch.ids.len() * 80 + 2);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0_i32.to_be_bytes()); // flags
    out.extend_from_slice(&0_i32.to_be_bytes()); // header extension
    for i in 0..batch.ids.len() {
        out.extend_from_slice(&5_i16.to_be_bytes());
        field(&mut out, batch.ids[i].as_bytes());
        field(&mut out, batch.topics[i].as_bytes());
        field(&mut out, &batch.partitions[i].to_be_bytes());
        field(&mut out, &batch.offsets[i].to_be_bytes());
        let micros = (batch.windows[i] - pg_epoch)
            .num_microseconds()
            .expect("a window start in range");
        field(&mut out, &micros.to_be_bytes());
    }
    out.extend_from_slice(&(-1_i16).to_be_bytes());
    out
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}
