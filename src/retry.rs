//! The pause before retrying something that is down: doubling from a
//! quarter second up to half a minute, back to the start after a success.

use std::time::Duration;

const FIRST: Duration = Duration::from_millis(250);
const LONGEST: Duration = Duration::from_secs(30);

/// Consecutive failures so far, and the pause they call for.
#[derive(Debug, Clone, Default)]
pub struct Backoff {
    failures: u32,
}

impl Backoff {
    /// The pause before the next attempt; each call doubles it, up to 30 s.
    pub fn next_delay(&mut self) -> Duration {
        let delay = FIRST
            .saturating_mul(2u32.saturating_pow(self.failures))
            .min(LONGEST);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Whether the last attempt failed.
    pub fn is_retrying(&self) -> bool {
        self.failures > 0
    }

    /// After a success: the next failure pauses briefly again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pauses_double_up_to_the_cap_and_start_over_after_a_success() {
        let mut backoff = Backoff::default();
        let pauses: Vec<Duration> = (0..10).map(|_| backoff.next_delay()).collect();
        assert_eq!(pauses[0], Duration::from_millis(250));
        assert_eq!(pauses[1], Duration::from_millis(500));
        assert_eq!(pauses[3], Duration::from_secs(2));
        assert_eq!(pauses[9], Duration::from_secs(30));
        assert!(backoff.is_retrying());
        backoff.reset();
        assert!(!backoff.is_retrying());
        assert_eq!(backoff.next_delay(), Duration::from_millis(250));
    }
}
