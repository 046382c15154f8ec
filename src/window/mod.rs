//! Event-time tumbling windows: which window an event counts in, what a batch
//! adds to each window, and when the watermark lets a window close.
//!
//! Pure: no clock, no database. The ingest driver and the settlement cycle
//! feed it times and progress read from the store.

mod tally;
mod watermark;

pub use tally::{Flow, WindowTallies, WindowTally};
pub use watermark::{
    PartitionProgress, SettlementWake, global_watermark, last_closable, settlement_wake,
};

use chrono::{DateTime, Duration, Utc};

/// Window length and grace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSpec {
    pub length: Duration,
    pub grace: Duration,
}

/// Where an event counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    pub window_start: DateTime<Utc>,
    /// The event's own window had already closed; it counts in the first open one.
    pub late: bool,
}

impl WindowSpec {
    /// Builds a spec from standard durations.
    pub fn new(length: std::time::Duration, grace: std::time::Duration) -> Self {
        Self {
            length: Duration::from_std(length).expect("window length fits chrono"),
            grace: Duration::from_std(grace).expect("grace fits chrono"),
        }
    }

    /// Start of the window containing `at` (windows are aligned to the Unix
    /// epoch, in whole milliseconds). Total over every time chrono can hold:
    /// a window that would start before the earliest representable time
    /// starts at that time.
    pub fn window_start(&self, at: DateTime<Utc>) -> DateTime<Utc> {
        let length = self.length.num_milliseconds().max(1);
        let ms = at.timestamp_millis();
        DateTime::from_timestamp_millis(ms - ms.rem_euclid(length))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    /// End (exclusive) of the window starting at `start` (the latest
    /// representable time for a window that would end after it).
    pub fn window_end(&self, start: DateTime<Utc>) -> DateTime<Utc> {
        start
            .checked_add_signed(self.length)
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    /// The window an event at `occurred_at` counts in, given that every window
    /// starting before `next_open` is closed. A late event is never dropped:
    /// it counts in the first open window.
    pub fn assign(
        &self,
        occurred_at: DateTime<Utc>,
        next_open: Option<DateTime<Utc>>,
    ) -> Assignment {
        let own = self.window_start(occurred_at);
        match next_open {
            Some(open) if own < open => Assignment {
                window_start: open,
                late: true,
            },
            _ => Assignment {
                window_start: own,
                late: false,
            },
        }
    }

    /// A stable, readable id for the window starting at `start`.
    pub fn cycle_id(start: DateTime<Utc>) -> String {
        format!(
            "window:{}",
            start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )
    }
}

#[cfg(test)]
mod tests {
    use chrono::{DurationRound, TimeZone};

    use super::*;

    fn spec() -> WindowSpec {
        WindowSpec::new(
            std::time::Duration::from_secs(300),
            std::time::Duration::from_secs(30),
        )
    }

    #[test]
    fn windows_align_to_the_epoch_like_truncation_in_the_usual_range() {
        let spec = spec();
        for at in [
            Utc.with_ymd_and_hms(2026, 1, 5, 9, 7, 31).unwrap(),
            Utc.with_ymd_and_hms(1969, 12, 31, 23, 58, 1).unwrap(),
            DateTime::UNIX_EPOCH,
        ] {
            assert_eq!(
                spec.window_start(at),
                at.duration_trunc(spec.length).unwrap()
            );
        }
    }

    #[test]
    fn any_representable_time_has_a_window() {
        let spec = spec();
        for at in [
            DateTime::<Utc>::MIN_UTC,
            DateTime::<Utc>::MAX_UTC,
            Utc.with_ymd_and_hms(1600, 1, 1, 0, 0, 0).unwrap(),
        ] {
            let start = spec.window_start(at);
            assert!(start <= at);
            assert!(spec.window_end(start) >= start);
            assert_eq!(spec.assign(at, None).window_start, start);
        }
    }
}
