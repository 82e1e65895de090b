//! The API's clock. Every timestamp the API stores or compares (event receive times, liveliness,
//! reclaim deadlines, token and image expiry) comes from one [`Clock`], passed in through
//! [`crate::Config`], so tests drive time instead of sleeping through it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Milliseconds since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::now_ms()
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock at `ms`.
    pub fn at(ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicI64::new(ms)))
    }

    /// Moves the clock forward by `ms`.
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn set(&self, ms: i64) {
        self.0.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A shared clock, as [`crate::Config`] carries it (the system clock by default).
#[derive(Clone)]
pub struct ClockRef(pub Arc<dyn Clock>);

impl ClockRef {
    pub fn now_ms(&self) -> i64 {
        self.0.now_ms()
    }
}

impl Default for ClockRef {
    fn default() -> Self {
        ClockRef(Arc::new(SystemClock))
    }
}

impl std::fmt::Debug for ClockRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Clock(now={})", self.now_ms())
    }
}

impl<C: Clock> From<Arc<C>> for ClockRef {
    fn from(c: Arc<C>) -> ClockRef {
        ClockRef(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::at(1_000);
        let r: ClockRef = c.clone().into();
        assert_eq!(r.now_ms(), 1_000);
        c.advance(500);
        assert_eq!(r.now_ms(), 1_500);
        c.set(7);
        assert_eq!(r.now_ms(), 7);
        assert!(ClockRef::default().now_ms() > 1_700_000_000_000);
    }
}
