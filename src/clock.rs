//! The one source of "now" for every driver.
//!
//! Decision code never reads a clock: it takes `now` as an argument. Drivers
//! (the Kafka consumers, the settlement loop, the executor) hold a [`Clock`]
//! and pass its reading down, so the same decisions run live on the system
//! clock and in `treasury simulate` on a simulated one.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// Where a driver reads the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> DateTime<Utc>;
}

/// A shared clock handle, as drivers hold it.
pub type SharedClock = Arc<dyn Clock>;

/// The process's wall clock (UTC).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

impl SystemClock {
    /// A shared handle to the wall clock.
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock)
    }
}

/// A clock that moves only when told to: simulated time and tests.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: DateTime<Utc>) -> Self {
        Self {
            now: Mutex::new(start),
        }
    }

    /// Moves the clock to `at` (never backwards: an earlier time is ignored).
    pub fn set(&self, at: DateTime<Utc>) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        if at > *now {
            *now = at;
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: chrono::Duration) {
        let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn manual_clock_moves_forward_only() {
        let start = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let clock = ManualClock::new(start);
        clock.advance(chrono::Duration::minutes(5));
        assert_eq!(clock.now(), start + chrono::Duration::minutes(5));
        clock.set(start);
        assert_eq!(clock.now(), start + chrono::Duration::minutes(5));
        clock.set(start + chrono::Duration::hours(1));
        assert_eq!(clock.now(), start + chrono::Duration::hours(1));
    }
}
