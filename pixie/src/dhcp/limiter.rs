//! At most one `PXE Booting` event per MAC per interval (pure; the clock is passed in).
//!
//! The provisioning network is hostile: anyone on it can send DISCOVERs for any MAC as fast as
//! the link allows. pixie still answers every one (a machine that retries must boot), but only
//! the first of each interval becomes an event for the API; the rest are counted as suppressed.
//! A real machine's PXE DISCOVER and its iPXE DISCOVER a few seconds later are one boot for the
//! API anyway (a `PXE Booting` after a `PXE Booting` changes nothing there).
//!
//! Memory is bounded: the limiter remembers at most `capacity` MACs. Entries leave in the order
//! they were allowed, when their interval is over or, when a flood of distinct MACs fills the
//! table, oldest first; each call does constant work on average. Forgetting a MAC early only
//! lets its next event through sooner; distinct-MAC floods are bounded further down by the
//! event queue, which drops what it cannot hold.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use metal_types::Mac;

/// How many MACs the limiter remembers by default: far more than one partition boots within
/// one interval.
pub const DEFAULT_CAPACITY: usize = 16_384;

#[derive(Debug)]
pub struct EventLimiter {
    interval: Duration,
    capacity: usize,
    /// When each remembered MAC last had an event allowed.
    last: HashMap<Mac, Instant>,
    /// The same entries in the order they were allowed (oldest first).
    order: VecDeque<(Instant, Mac)>,
}

impl EventLimiter {
    /// `interval` zero lets every event through (and remembers nothing).
    pub fn new(interval: Duration, capacity: usize) -> EventLimiter {
        EventLimiter { interval, capacity: capacity.max(1), last: HashMap::new(), order: VecDeque::new() }
    }

    /// Whether an event for `mac` may go out at `now`; if so, it is remembered.
    pub fn allow(&mut self, mac: Mac, now: Instant) -> bool {
        if self.interval.is_zero() {
            return true;
        }
        // Forget entries whose interval is over. Callers on several threads may pass instants
        // slightly out of order; an entry is only dropped from `last` if it is the one queued.
        while let Some(&(at, m)) = self.order.front() {
            if now.saturating_duration_since(at) < self.interval {
                break;
            }
            self.forget_front(at, m);
        }
        if let Some(at) = self.last.get(&mac) {
            if now.saturating_duration_since(*at) < self.interval {
                return false;
            }
        }
        self.last.insert(mac, now);
        self.order.push_back((now, mac));
        while self.order.len() > self.capacity {
            let (at, m) = self.order[0];
            self.forget_front(at, m);
        }
        true
    }

    fn forget_front(&mut self, at: Instant, mac: Mac) {
        self.order.pop_front();
        if self.last.get(&mac) == Some(&at) {
            self.last.remove(&mac);
        }
    }

    /// How many MACs are remembered now.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u32) -> Mac {
        let b = n.to_be_bytes();
        Mac([2, 0, b[0], b[1], b[2], b[3]])
    }

    #[test]
    fn one_event_per_mac_per_interval() {
        let t0 = Instant::now();
        let s = |ms: u64| t0 + Duration::from_millis(ms);
        let mut l = EventLimiter::new(Duration::from_secs(5), 100);
        assert!(l.allow(mac(1), s(0)));
        for ms in (1..5000).step_by(7) {
            assert!(!l.allow(mac(1), s(ms)), "at {ms} ms");
        }
        assert!(l.allow(mac(2), s(100)), "another MAC is not held back");
        assert!(l.allow(mac(1), s(5000)), "the next interval");
        assert!(!l.allow(mac(1), s(9999)));
        assert!(l.allow(mac(2), s(5100)));
        assert!(l.allow(mac(1), s(10_000)));
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_distinct_macs() {
        let t0 = Instant::now();
        let mut l = EventLimiter::new(Duration::from_secs(5), 1000);
        for n in 0..100_000 {
            assert!(l.allow(mac(n), t0 + Duration::from_micros(u64::from(n))));
            assert!(l.len() <= 1000 && l.order.len() <= 1000);
        }
        // The newest are still remembered, the oldest were forgotten early.
        assert!(!l.allow(mac(99_999), t0 + Duration::from_millis(200)));
        assert!(l.allow(mac(0), t0 + Duration::from_millis(200)));
        // Once the interval is over, everything is forgotten.
        assert!(l.allow(mac(7), t0 + Duration::from_secs(60)));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn out_of_order_instants_and_zero_interval() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let mut l = EventLimiter::new(Duration::from_secs(5), 10);
        assert!(l.allow(mac(1), t0));
        assert!(!l.allow(mac(1), t0 - Duration::from_millis(5)), "a slightly older instant is inside the interval");
        let mut off = EventLimiter::new(Duration::ZERO, 10);
        assert!((0..100).all(|_| off.allow(mac(1), t0)));
        assert!(off.is_empty());
    }
}
