//! Repeated warnings, rate-limited with a count: a condition that repeats (etcd unreachable
//! while a feed retries every few hundred milliseconds, accepts failing at the descriptor
//! limit) is logged when it starts, then at most once per interval with the number of
//! repeats not logged in between, and the log stays readable and bounded however long it
//! lasts. One [`Throttle`] per repeating condition, owned by the loop that retries (no lock):
//! the feeds' retry warnings, the listener's failed accepts.

use std::time::{Duration, Instant};

/// The rate limit of one repeating warning.
#[derive(Debug)]
pub struct Throttle {
    /// Shortest time between two logged occurrences.
    every: Duration,
    /// When an occurrence was last logged (`None`: the condition is new).
    last: Option<Instant>,
    /// Occurrences not logged since then.
    suppressed: u64,
}

impl Throttle {
    /// A throttle logging at most once per `every`.
    pub const fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// One occurrence now: `Some(n)` when it is to be logged, `n` being the occurrences
    /// suppressed since the last one logged; `None` when it is suppressed (and counted).
    pub fn allow(&mut self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(at) if now.duration_since(at) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }

    /// The condition is over: the next occurrence is logged at once. Returns the
    /// occurrences suppressed and not reported yet.
    pub fn reset(&mut self) -> u64 {
        self.last = None;
        std::mem::take(&mut self.suppressed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_logged_then_once_per_interval_with_the_count() {
        let mut t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.allow_at(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(t.allow_at(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(t.allow_at(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(t.allow_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(t.reset(), 1);
        assert_eq!(t.allow_at(t0 + Duration::from_secs(12)), Some(0));
    }
}
