//! The settlement watermark: how far event time has progressed across every
//! input partition, and which windows that lets close.

use chrono::{DateTime, Duration, Utc};

use super::WindowSpec;

/// One input partition's progress, as the store keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionProgress {
    /// Largest event time counted from the partition (None: nothing yet).
    pub watermark: Option<DateTime<Utc>>,
    /// Since when the consumer has been at the end of the partition, if it is.
    pub caught_up_since: Option<DateTime<Utc>>,
}

impl PartitionProgress {
    /// A partition that has been caught up for `idle_timeout` has nothing to
    /// say about event time and stops holding settlement back.
    pub fn is_idle(&self, now: DateTime<Utc>, idle_timeout: Duration) -> bool {
        self.caught_up_since
            .is_some_and(|since| now - since >= idle_timeout)
    }
}

/// The global watermark: the least event-time progress over partitions that
/// are not idle. A partition with work left and no event yet holds everything
/// back (its watermark is unknown); when every partition is idle, event time
/// follows the processing clock, so an idle system still closes windows.
/// With no partition known yet (no consumer assigned) nothing may close.
pub fn global_watermark(
    partitions: &[PartitionProgress],
    now: DateTime<Utc>,
    idle_timeout: Duration,
) -> Option<DateTime<Utc>> {
    if partitions.is_empty() {
        return None;
    }
    let mut active = partitions
        .iter()
        .filter(|p| !p.is_idle(now, idle_timeout))
        .peekable();
    if active.peek().is_none() {
        return Some(now);
    }
    let mut least: Option<DateTime<Utc>> = None;
    for partition in active {
        let mark = partition.watermark?;
        least = Some(least.map_or(mark, |l| l.min(mark)));
    }
    least
}

/// Start of the latest window the watermark lets close (its end plus grace
/// is at or before the watermark).
pub fn last_closable(spec: &WindowSpec, watermark: DateTime<Utc>) -> DateTime<Utc> {
    spec.window_start(watermark - spec.grace) - spec.length
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    #[test]
    fn an_idle_partition_does_not_hold_settlement_back() {
        let busy = PartitionProgress {
            watermark: Some(at(1_000)),
            caught_up_since: None,
        };
        let quiet = PartitionProgress {
            watermark: Some(at(10)),
            caught_up_since: Some(at(1_900)),
        };
        let idle = Duration::seconds(60);
        assert_eq!(
            global_watermark(&[busy, quiet], at(1_920), idle),
            Some(at(10))
        );
        assert_eq!(
            global_watermark(&[busy, quiet], at(2_000), idle),
            Some(at(1_000))
        );
    }
}
