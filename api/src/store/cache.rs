//! A read-through cache that never keeps a value read before a write it missed.
//!
//! A writer bumps the generation (after its commit) and clears; a reader stores only if the
//! generation did not move while it read the database. Entries older than `ttl` are not used, so
//! writes this process did not make (another replica, an operator in `psql`) show after at most
//! `ttl`. One [`Cache`] per kind of value: the store keeps several, each typed.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

/// The generation and, per key, when the value was stored and the value.
type Entries<V> = (u64, HashMap<String, (Instant, V)>);

pub struct Cache<V> {
    ttl: Duration,
    inner: std::sync::Mutex<Entries<V>>,
}

impl<V: Clone> Cache<V> {
    /// Above this many entries the map is cleared before the next insert.
    const MAX_ENTRIES: usize = 10_000;

    pub fn new(ttl: Duration) -> Cache<V> {
        Cache { ttl, inner: std::sync::Mutex::new((0, HashMap::new())) }
    }

    /// The current generation and the entry for `key` if it is younger than the TTL.
    pub fn get(&self, key: &str) -> (u64, Option<V>) {
        let g = self.inner.lock().expect("cache lock");
        let hit = g.1.get(key).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, v)| v.clone());
        (g.0, hit)
    }

    /// Stores `value` unless a write happened since `generation` was read.
    pub fn put(&self, generation: u64, key: String, value: V) {
        let mut g = self.inner.lock().expect("cache lock");
        if g.0 == generation {
            if g.1.len() >= Self::MAX_ENTRIES {
                g.1.clear();
            }
            g.1.insert(key, (Instant::now(), value));
        }
    }

    /// After a write: nothing read before it is used or stored any more.
    pub fn invalidate(&self) {
        let mut g = self.inner.lock().expect("cache lock");
        g.0 += 1;
        g.1.clear();
    }
}

/// Reads `key` through `cache` when there is one, else straight from `load`.
pub async fn read_through<V, E, F>(cache: Option<&Cache<V>>, key: String, load: F) -> Result<V, E>
where
    V: Clone,
    F: Future<Output = Result<V, E>>,
{
    let Some(c) = cache else { return load.await };
    let (generation, hit) = c.get(&key);
    if let Some(v) = hit {
        return Ok(v);
    }
    let v = load.await?;
    c.put(generation, key, v.clone());
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_drops_values_read_before_a_write() {
        let c = Cache::new(Duration::from_secs(60));
        let (g, hit) = c.get("k");
        assert!(hit.is_none());
        // A writer commits and invalidates while the reader was reading the old value.
        c.invalidate();
        c.put(g, "k".into(), Some("old".to_string()));
        assert!(c.get("k").1.is_none(), "a stale read must not be cached");
        let (g, _) = c.get("k");
        c.put(g, "k".into(), Some("new".to_string()));
        assert_eq!(c.get("k").1, Some(Some("new".to_string())));
        c.invalidate();
        assert!(c.get("k").1.is_none());
    }

    #[test]
    fn cache_entries_expire() {
        let c = Cache::new(Duration::from_millis(50));
        let (g, _) = c.get("k");
        c.put(g, "k".into(), 1u32);
        assert!(c.get("k").1.is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.get("k").1.is_none(), "an entry older than the TTL must be read again");
        let off = Cache::new(Duration::ZERO);
        let (g, _) = off.get("k");
        off.put(g, "k".into(), 1u32);
        assert!(off.get("k").1.is_none(), "TTL 0 caches nothing");
    }

    #[tokio::test]
    async fn read_through_loads_once_and_without_a_cache_always() {
        let c = Cache::new(Duration::from_secs(60));
        let mut loads = 0;
        for _ in 0..3 {
            let v: Result<u32, ()> = read_through(Some(&c), "k".into(), async {
                loads += 1;
                Ok(7)
            })
            .await;
            assert_eq!(v, Ok(7));
        }
        assert_eq!(loads, 1);
        let v: Result<u32, ()> = read_through(None, "k".into(), async { Ok(8) }).await;
        assert_eq!(v, Ok(8));
    }
}
