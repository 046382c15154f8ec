//! The settlement watermark: how far event time has progressed across every
//! input partition, and which windows that lets close.

use chrono::{DateTime, Duration, Utc};

use super::WindowSpec;

/// One input partition's progress, as the store keeps it. The default is a
/// partition known but not yet reported on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartitionProgress {
    /// Largest event time counted from the partition (None: nothing yet).
    pub watermark: Option<DateTime<Utc>>,
    /// Since when the consumer has been at the end of the partition, if it is.
    pub caught_up_since: Option<DateTime<Utc>>,
    /// When the partition's consumer last reported on it. A consumer at the
    /// end of a partition keeps reporting; a report that is not renewed (the
    /// consumer died, or the partition is being handed over) no longer
    /// vouches that nothing is waiting to be read.
    pub reported_at: Option<DateTime<Utc>>,
}

impl PartitionProgress {
    /// A partition whose consumer has been at its end for `idle_timeout`, and
    /// still says so, has nothing to say about event time and stops holding
    /// settlement back.
    pub fn is_idle(&self, now: DateTime<Utc>, idle_timeout: Duration) -> bool {
        let quiet_long_enough = self
            .caught_up_since
            .is_some_and(|since| now - since >= idle_timeout);
        let still_vouched = self.reported_at.is_some_and(|at| now - at < idle_timeout);
        quiet_long_enough && still_vouched
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

/// When the settlement loop runs its next cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettlementWake {
    /// After this long.
    After(std::time::Duration),
    /// When the input moves on (an ingest batch commits), or after this long
    /// at the latest.
    OnProgress(std::time::Duration),
}

/// When to run the next settlement cycle, given that windows starting at
/// `next_open` and later are still open and `watermark` is where event time
/// stood at the last cycle (None: not known yet).
///
/// The next window can close at its end plus grace: the loop sleeps until
/// then, never longer than `tick` (triggers and the watch are looked at every
/// tick). Once that moment has passed on the clock but not yet in event time
/// (the input is read a little behind the clock), the loop waits for the
/// input to move on instead of a whole tick, as long as event time is within
/// one tick of it; further behind (a replay catching up, a partition holding
/// settlement back), every tick is soon enough. With event time already past
/// it (more windows to close than one cycle closes), at once.
pub fn settlement_wake(
    spec: &WindowSpec,
    now: DateTime<Utc>,
    next_open: Option<DateTime<Utc>>,
    watermark: Option<DateTime<Utc>>,
    tick: std::time::Duration,
) -> SettlementWake {
    let Some(next_open) = next_open else {
        return SettlementWake::After(tick);
    };
    let due = spec.window_end(next_open) + spec.grace;
    if watermark.is_some_and(|w| w >= due) {
        return SettlementWake::After(std::time::Duration::ZERO);
    }
    if due > now {
        let until = (due - now).to_std().unwrap_or_default();
        return SettlementWake::After(until.min(tick));
    }
    let close_behind =
        watermark.is_some_and(|w| (due - w).to_std().is_ok_and(|behind| behind <= tick));
    if close_behind {
        SettlementWake::OnProgress(tick)
    } else {
        SettlementWake::After(tick)
    }
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
            reported_at: Some(at(1_990)),
        };
        let quiet = PartitionProgress {
            watermark: Some(at(10)),
            caught_up_since: Some(at(1_900)),
            reported_at: Some(at(1_990)),
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

    #[test]
    fn a_caught_up_partition_nobody_reports_on_holds_settlement_back() {
        // Caught up since 100, last reported at 150; then its consumer died.
        let abandoned = PartitionProgress {
            watermark: Some(at(10)),
            caught_up_since: Some(at(100)),
            reported_at: Some(at(150)),
        };
        let idle = Duration::seconds(60);
        assert!(
            !abandoned.is_idle(at(159), idle),
            "not quiet long enough yet"
        );
        assert!(abandoned.is_idle(at(160), idle));
        assert!(abandoned.is_idle(at(209), idle));
        assert!(
            !abandoned.is_idle(at(210), idle),
            "nobody vouches for it any more"
        );
        assert_eq!(global_watermark(&[abandoned], at(500), idle), Some(at(10)));
    }

    fn wake_spec() -> WindowSpec {
        // Windows of 10 s, grace 1 s: the window at 0 closes at 11.
        WindowSpec::new(
            std::time::Duration::from_secs(10),
            std::time::Duration::from_secs(1),
        )
    }

    const TICK: std::time::Duration = std::time::Duration::from_secs(1);

    fn ms(n: u64) -> std::time::Duration {
        std::time::Duration::from_millis(n)
    }

    #[test]
    fn settlement_sleeps_until_the_next_window_can_close_at_most_a_tick() {
        let spec = wake_spec();
        let wake = |now| settlement_wake(&spec, now, Some(at(0)), Some(at(9)), TICK);
        assert_eq!(wake(at(5)), SettlementWake::After(TICK));
        assert_eq!(
            wake(at(10) + Duration::milliseconds(700)),
            SettlementWake::After(ms(300))
        );
        assert_eq!(
            settlement_wake(&spec, at(3), None, None, TICK),
            SettlementWake::After(TICK),
            "nothing known yet: every tick"
        );
    }

    #[test]
    fn past_the_close_settlement_waits_for_the_input_while_event_time_is_close_behind() {
        let spec = wake_spec();
        let now = at(11) + Duration::milliseconds(50);
        let behind = |w| settlement_wake(&spec, now, Some(at(0)), w, TICK);
        assert_eq!(
            behind(Some(at(10) + Duration::milliseconds(800))),
            SettlementWake::OnProgress(TICK)
        );
        assert_eq!(
            behind(Some(at(5))),
            SettlementWake::After(TICK),
            "far behind (catching up): every tick"
        );
        assert_eq!(behind(None), SettlementWake::After(TICK));
        assert_eq!(
            behind(Some(at(11))),
            SettlementWake::After(std::time::Duration::ZERO),
            "event time has reached it: more to close now"
        );
    }
}
