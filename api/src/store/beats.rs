//! Heartbeats, kept in memory and written in groups.
//!
//! Every parked `wait` of a machine is a sign of life, and 10,000 parked machines beat a few
//! hundred times a second. Written one transaction each, that is a few hundred fsyncs a second
//! on SQLite, queued in front of every allocation. Instead a beat is recorded here (a map insert)
//! and written with the others of the same second: by the flusher every [`Beats::interval`], and
//! on SQLite also inside every group-commit allocation transaction, so the allocator always sees
//! every beat it was sent. Reads of a machine overlay the beat not yet written, so the API never
//! shows an older `last_seen` than it was told. A beat is the time it arrived (by the store's
//! clock), not the time it was written; writing never moves `last_seen_ms` backwards.
//!
//! What a crash loses: the beats of the last interval, i.e. a machine may look up to one
//! interval less recently alive after a restart — well inside `dead_after`, and its next `wait`
//! beats again.

use super::Result;
use metal_types::MachineId;
use sqlx::AnyConnection;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Beats not written yet.
pub struct Beats {
    pending: Mutex<HashMap<MachineId, i64>>,
    interval: Duration,
}

/// Rows per UPDATE statement (two parameters each, well below both backends' limits).
const CHUNK: usize = 500;

impl Beats {
    pub fn new(interval: Duration) -> Beats {
        Beats { pending: Mutex::new(HashMap::new()), interval }
    }

    /// How often the flusher writes.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Records that `id` was heard from at `at_ms`.
    pub fn record(&self, id: MachineId, at_ms: i64) {
        merge(&mut self.pending.lock().expect("beats lock"), id, at_ms);
    }

    /// The beat of `id` not written yet, if any.
    pub fn pending(&self, id: MachineId) -> Option<i64> {
        self.pending.lock().expect("beats lock").get(&id).copied()
    }

    /// `stored` (the row's `last_seen_ms`) with the beat not written yet on top.
    pub fn overlay(&self, id: MachineId, stored: Option<i64>) -> Option<i64> {
        match (stored, self.pending(id)) {
            (Some(s), Some(p)) => Some(s.max(p)),
            (s, p) => s.or(p),
        }
    }

    /// Takes every pending beat, to be written; give them back with [`Beats::restore`] if the
    /// write fails.
    pub fn take(&self) -> Vec<(MachineId, i64)> {
        let mut v: Vec<_> = std::mem::take(&mut *self.pending.lock().expect("beats lock")).into_iter().collect();
        // One order for every writer: concurrent flushes of two PostgreSQL replicas lock rows in
        // the same order and cannot deadlock each other.
        v.sort_unstable_by_key(|(id, _)| id.0);
        v
    }

    /// Puts beats whose write failed back (newer ones recorded meanwhile win).
    pub fn restore(&self, beats: Vec<(MachineId, i64)>) {
        let mut p = self.pending.lock().expect("beats lock");
        for (id, at) in beats {
            merge(&mut p, id, at);
        }
    }

    pub fn len(&self) -> usize {
        self.pending.lock().expect("beats lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The newer of the pending beat and `at_ms`.
fn merge(pending: &mut HashMap<MachineId, i64>, id: MachineId, at_ms: i64) {
    let e = pending.entry(id).or_insert(at_ms);
    *e = (*e).max(at_ms);
}

/// Writes `beats` inside `c`'s transaction: one statement per [`CHUNK`] machines, and a row's
/// `last_seen_ms` only ever moves forward (a registration or report may have written a newer
/// one meanwhile). Machines deleted meanwhile are skipped.
pub async fn write(c: &mut AnyConnection, beats: &[(MachineId, i64)]) -> Result<()> {
    for chunk in beats.chunks(CHUNK) {
        let values: Vec<String> = (0..chunk.len()).map(|i| format!("(${}, CAST(${} AS BIGINT))", 2 * i + 1, 2 * i + 2)).collect();
        // VALUES names its columns column1, column2 on both SQLite and PostgreSQL.
        let sql = format!(
            "UPDATE machines SET last_seen_ms = v.column2 FROM (VALUES {}) AS v \
             WHERE machines.id = v.column1 AND (machines.last_seen_ms IS NULL OR machines.last_seen_ms < v.column2)",
            values.join(", ")
        );
        let mut q = sqlx::query(&sql);
        for (id, at) in chunk {
            q = q.bind(id.to_string()).bind(*at);
        }
        q.execute(&mut *c).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> MachineId {
        MachineId(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn a_beat_only_moves_forward_and_overlays_the_stored_value() {
        let b = Beats::new(Duration::from_secs(1));
        b.record(id(1), 100);
        b.record(id(1), 90);
        assert_eq!(b.pending(id(1)), Some(100));
        assert_eq!(b.overlay(id(1), Some(120)), Some(120));
        assert_eq!(b.overlay(id(1), Some(50)), Some(100));
        assert_eq!(b.overlay(id(1), None), Some(100));
        assert_eq!(b.overlay(id(2), Some(7)), Some(7));
        assert_eq!(b.overlay(id(2), None), None);
    }

    #[test]
    fn taken_beats_are_sorted_and_a_failed_write_gives_them_back_without_losing_newer_ones() {
        let b = Beats::new(Duration::from_secs(1));
        b.record(id(3), 30);
        b.record(id(1), 10);
        let taken = b.take();
        assert_eq!(taken, vec![(id(1), 10), (id(3), 30)]);
        assert!(b.is_empty());
        b.record(id(1), 15);
        b.restore(taken);
        assert_eq!(b.pending(id(1)), Some(15));
        assert_eq!(b.pending(id(3)), Some(30));
    }
}
