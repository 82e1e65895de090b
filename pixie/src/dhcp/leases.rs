//! The lease table (in memory, no I/O) and its journal on disk.
//!
//! The journal is one JSON object per line, appended and fsynced before the ACK that it records
//! leaves pixie (one fsync for a group of ACKs under load), so a restarted pixie knows every
//! address it acknowledged and hands out no duplicate. A write torn by a full disk is cut off
//! again at once, so the next record does not land behind a partial line. At start the journal
//! is replayed (a torn or garbled line is skipped) and rewritten compactly, and again while
//! running once it has grown to [`COMPACT_FACTOR`] times its compacted size: written to a
//! temporary file, fsynced, renamed over the old one, the directory fsynced.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Pool;
use metal_types::Mac;

/// How long an offered address stays set aside for the client it was offered to.
pub const OFFER_HOLD_S: u64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Offered,
    Bound,
    Released,
    Declined,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// `None` for a declined address (someone else answers ARP for it).
    pub mac: Option<Mac>,
    pub state: State,
    /// Unix seconds.
    pub until: u64,
}

/// One journal line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub mac: Option<String>,
    pub state: State,
    pub until: u64,
}

#[derive(Debug, Default)]
pub struct LeaseTable {
    by_ip: HashMap<Ipv4Addr, Entry>,
    by_mac: HashMap<Mac, Ipv4Addr>,
    /// Addresses reserved for one MAC; never given to another.
    reserved: HashMap<Ipv4Addr, Mac>,
    /// Never handed out: the server itself, routers, DNS servers.
    blocked: HashSet<Ipv4Addr>,
    /// Where the next free-address scan starts, per pool start address.
    cursor: HashMap<Ipv4Addr, u32>,
}

impl LeaseTable {
    pub fn new(reserved: HashMap<Ipv4Addr, Mac>, blocked: HashSet<Ipv4Addr>) -> LeaseTable {
        LeaseTable { reserved, blocked, ..Default::default() }
    }

    pub fn get(&self, ip: Ipv4Addr) -> Option<&Entry> {
        self.by_ip.get(&ip)
    }

    pub fn bound_count(&self, now: u64) -> usize {
        self.by_ip.values().filter(|e| e.state == State::Bound && e.until > now).count()
    }

    /// Whether `ip` may be given to `mac` now.
    pub fn available_for(&self, ip: Ipv4Addr, mac: Mac, now: u64) -> bool {
        if self.blocked.contains(&ip) {
            return false;
        }
        if let Some(owner) = self.reserved.get(&ip) {
            if *owner != mac {
                return false;
            }
        }
        match self.by_ip.get(&ip) {
            None => true,
            Some(e) if e.state == State::Declined => e.until <= now,
            Some(e) if e.mac == Some(mac) => true,
            Some(e) => e.until <= now || e.state == State::Released,
        }
    }

    /// The address to offer `mac` from `pool`: its reservation, its current lease, the address it
    /// asks for, or the next free one.
    pub fn pick(
        &mut self,
        pool: &Pool,
        mac: Mac,
        reservation: Option<Ipv4Addr>,
        requested: Option<Ipv4Addr>,
        now: u64,
    ) -> Option<Ipv4Addr> {
        if let Some(ip) = reservation {
            return self.available_for(ip, mac, now).then_some(ip);
        }
        if let Some(&ip) = self.by_mac.get(&mac) {
            if pool.in_range(ip) && self.available_for(ip, mac, now) {
                return Some(ip);
            }
        }
        if let Some(ip) = requested {
            if pool.in_range(ip) && self.available_for(ip, mac, now) {
                return Some(ip);
            }
        }
        let (start, end) = (u32::from(pool.start), u32::from(pool.end));
        let size = end - start + 1;
        let cursor = self.cursor.entry(pool.start).or_insert(0);
        for i in 0..size {
            let off = (*cursor + i) % size;
            let ip = Ipv4Addr::from(start + off);
            if self.blocked.contains(&ip) || self.reserved.contains_key(&ip) {
                continue;
            }
            let free = match self.by_ip.get(&ip) {
                None => true,
                Some(e) if e.state == State::Declined => e.until <= now,
                Some(e) => e.mac == Some(mac) || e.until <= now || e.state == State::Released,
            };
            if free {
                *cursor = (off + 1) % size;
                return Some(ip);
            }
        }
        None
    }

    fn set(&mut self, ip: Ipv4Addr, entry: Entry) {
        if let Some(old) = self.by_ip.insert(ip, entry) {
            if let Some(m) = old.mac {
                if entry.mac != Some(m) && self.by_mac.get(&m) == Some(&ip) {
                    self.by_mac.remove(&m);
                }
            }
        }
        if let Some(m) = entry.mac {
            if let Some(prev) = self.by_mac.insert(m, ip) {
                if prev != ip {
                    // One address per client: the old one goes back to the pool.
                    if let Some(e) = self.by_ip.get(&prev) {
                        if e.mac == Some(m) && e.state != State::Bound {
                            self.by_ip.remove(&prev);
                        }
                    }
                }
            }
        }
    }

    /// Holds `ip` for `mac` while the client decides; a bound lease stays bound.
    pub fn offer(&mut self, ip: Ipv4Addr, mac: Mac, now: u64) {
        if let Some(e) = self.by_ip.get(&ip) {
            if e.mac == Some(mac) && e.state == State::Bound && e.until > now {
                return;
            }
        }
        self.set(ip, Entry { mac: Some(mac), state: State::Offered, until: now + OFFER_HOLD_S });
    }

    /// Drops an offer the client turned down (it chose another server).
    pub fn forget_offer(&mut self, mac: Mac) {
        if let Some(&ip) = self.by_mac.get(&mac) {
            if self.by_ip.get(&ip).is_some_and(|e| e.state == State::Offered) {
                self.by_ip.remove(&ip);
                self.by_mac.remove(&mac);
            }
        }
    }

    pub fn bind(&mut self, ip: Ipv4Addr, mac: Mac, until: u64) -> Record {
        self.set(ip, Entry { mac: Some(mac), state: State::Bound, until });
        Record { ip, mac: Some(mac.to_string()), state: State::Bound, until }
    }

    /// The client gives its address back; only its owner can.
    pub fn release(&mut self, ip: Ipv4Addr, mac: Mac) -> Option<Record> {
        let e = self.by_ip.get(&ip)?;
        if e.mac != Some(mac) {
            return None;
        }
        self.by_ip.remove(&ip);
        self.by_mac.remove(&mac);
        Some(Record { ip, mac: Some(mac.to_string()), state: State::Released, until: 0 })
    }

    /// The client found `ip` in use by someone else: nobody gets it until `until`.
    pub fn decline(&mut self, ip: Ipv4Addr, mac: Mac, until: u64) -> Option<Record> {
        match self.by_ip.get(&ip) {
            Some(e) if e.mac == Some(mac) => {}
            _ => return None,
        }
        self.by_mac.remove(&mac);
        self.by_ip.insert(ip, Entry { mac: None, state: State::Declined, until });
        Some(Record { ip, mac: None, state: State::Declined, until })
    }

    /// Replays one journal line.
    pub fn apply(&mut self, r: &Record) {
        let mac = r.mac.as_deref().and_then(|m| m.parse::<Mac>().ok());
        match r.state {
            State::Bound | State::Offered => {
                if let Some(mac) = mac {
                    self.set(r.ip, Entry { mac: Some(mac), state: State::Bound, until: r.until });
                }
            }
            State::Released => {
                if let Some(mac) = mac {
                    self.release(r.ip, mac);
                } else {
                    self.by_ip.remove(&r.ip);
                }
            }
            State::Declined => {
                if let Some(e) = self.by_ip.get(&r.ip) {
                    if let Some(m) = e.mac {
                        self.by_mac.remove(&m);
                    }
                }
                self.by_ip.insert(r.ip, Entry { mac: None, state: State::Declined, until: r.until });
            }
        }
    }

    /// What a compacted journal holds: bound leases and declines that have not expired.
    pub fn snapshot(&self, now: u64) -> Vec<Record> {
        let mut v: Vec<Record> = self
            .by_ip
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Bound | State::Declined) && e.until > now)
            .map(|(ip, e)| Record { ip: *ip, mac: e.mac.map(|m| m.to_string()), state: e.state, until: e.until })
            .collect();
        v.sort_by_key(|r| u32::from(r.ip));
        v
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("lease journal {path}: {what}")]
    Io { path: PathBuf, what: &'static str, source: io::Error },
    #[error("lease journal {path}: an earlier write could not be undone; no lease is recorded until the journal is rewritten (check the disk)")]
    Broken { path: PathBuf },
}

/// What the journal does to its file, so that unit tests can record the order of writes and
/// syncs or make them fail; [`FileStorage`] is the real one.
pub trait Storage: Send {
    /// Appends `bytes` at the end of the journal (one `write`, continued while it is short).
    fn append(&mut self, bytes: &[u8]) -> io::Result<()>;
    /// Makes everything appended so far durable (`fdatasync`).
    fn sync(&mut self) -> io::Result<()>;
    /// Cuts the journal back to `len` bytes (a torn append is taken back this way).
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    /// Replaces the journal with `bytes`, durably: a temporary file beside it is written and
    /// fsynced, renamed over the journal, the directory is fsynced (so the rename survives a
    /// crash), and the new file is opened for appending.
    fn replace(&mut self, bytes: &[u8]) -> io::Result<()>;
}

/// The journal as a file: appends through `O_APPEND`, durable with `fdatasync`.
pub struct FileStorage {
    path: PathBuf,
    /// `None` until the first [`Storage::replace`], and after a replace that failed half way.
    file: Option<File>,
}

impl FileStorage {
    pub fn new(path: &Path) -> FileStorage {
        FileStorage { path: path.to_path_buf(), file: None }
    }

    fn file(&mut self) -> io::Result<&mut File> {
        self.file.as_mut().ok_or_else(|| io::Error::other("the journal file is not open after a failed rewrite"))
    }
}

impl Storage for FileStorage {
    fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file()?.write_all(bytes)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file()?.sync_data()
    }

    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.file()?.set_len(len)
    }

    fn replace(&mut self, bytes: &[u8]) -> io::Result<()> {
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir)?;
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        // From here on the old descriptor may name a file that is no longer the journal.
        self.file = None;
        std::fs::rename(&tmp, &self.path)?;
        File::open(&dir)?.sync_all()?;
        self.file = Some(OpenOptions::new().append(true).open(&self.path)?);
        Ok(())
    }
}

/// A compaction starts once the journal holds this many times the records it had right after
/// the last one (and at least [`COMPACT_FLOOR`] times that many), so rewriting costs a constant
/// amount per append on average and the file stays within a few times the live table.
pub const COMPACT_FACTOR: usize = 4;
pub const COMPACT_FLOOR: usize = 256;

/// The append-only lease journal. Records are appended by [`Journal::append`] and made durable
/// by [`Journal::sync`]; the DHCP loop syncs once for a group of packets and sends their ACKs
/// only after that. A torn append (the disk full, say) is cut off again at once, so the next
/// record never lands behind a partial line.
pub struct Journal {
    path: PathBuf,
    storage: Box<dyn Storage>,
    /// Bytes of whole records in the file.
    len: u64,
    /// Records in the file.
    lines: usize,
    /// Records right after the last compaction.
    base: usize,
    unsynced: bool,
    /// A torn append could not be cut off, or a sync failed: the file is not trusted until the
    /// next [`Journal::compact`] rewrites it.
    broken: bool,
}

fn render(records: &[Record]) -> String {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).expect("a lease record serializes"));
        text.push('\n');
    }
    text
}

impl Journal {
    /// Replays `path` into `table` (a torn or garbled line is skipped and counted), rewrites it
    /// compactly and opens it for appending.
    pub fn open(path: &Path, table: &mut LeaseTable, now: u64) -> Result<(Journal, usize), JournalError> {
        let io = |what, source| JournalError::Io { path: path.to_path_buf(), what, source };
        let mut skipped = 0;
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).split(b'\n') {
                    let line = line.map_err(|e| io("reading", e))?;
                    if line.iter().all(|b| b.is_ascii_whitespace()) {
                        continue;
                    }
                    match serde_json::from_slice::<Record>(&line) {
                        Ok(r) => table.apply(&r),
                        Err(_) => skipped += 1,
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("opening", e)),
        }
        let mut j = Journal::with_storage(path, Box::new(FileStorage::new(path)));
        j.compact(table, now)?;
        Ok((j, skipped))
    }

    /// A journal on `storage` that starts empty (tests use a recording storage); `path` names
    /// it in errors. Call [`Journal::compact`] to write a table into it.
    pub fn with_storage(path: &Path, storage: Box<dyn Storage>) -> Journal {
        Journal { path: path.to_path_buf(), storage, len: 0, lines: 0, base: 0, unsynced: false, broken: false }
    }

    /// Appends records in one write; not durable before [`Journal::sync`].
    pub fn append(&mut self, records: &[Record]) -> Result<(), JournalError> {
        if records.is_empty() {
            return Ok(());
        }
        if self.broken {
            return Err(JournalError::Broken { path: self.path.clone() });
        }
        let text = render(records);
        if let Err(source) = self.storage.append(text.as_bytes()) {
            // Part of the line may be in the file: cut it off, or the next record would be
            // glued to it and lost at the next replay.
            if let Err(e) = self.storage.truncate(self.len) {
                tracing::error!(path = %self.path.display(), error = %e, "torn lease journal write could not be cut off; rewriting the journal at the next chance");
                self.broken = true;
            }
            return Err(JournalError::Io { path: self.path.clone(), what: "appending", source });
        }
        self.len += text.len() as u64;
        self.lines += records.len();
        self.unsynced = true;
        Ok(())
    }

    /// Makes every appended record durable. Returns whether anything had to be synced.
    pub fn sync(&mut self) -> Result<bool, JournalError> {
        if self.broken {
            return Err(JournalError::Broken { path: self.path.clone() });
        }
        if !self.unsynced {
            return Ok(false);
        }
        if let Err(source) = self.storage.sync() {
            // After a failed fsync the kernel may have dropped the pages: nothing since the last
            // good sync is known to be on disk. The next compaction rewrites the file.
            self.broken = true;
            return Err(JournalError::Io { path: self.path.clone(), what: "syncing", source });
        }
        self.unsynced = false;
        Ok(true)
    }

    /// Whether [`Journal::compact`] is due: the file has grown to [`COMPACT_FACTOR`] times its
    /// size after the last compaction, or it must be rewritten after a failure.
    pub fn needs_compaction(&self) -> bool {
        self.broken || self.lines >= COMPACT_FACTOR * self.base.max(COMPACT_FLOOR)
    }

    /// Rewrites the journal as the table's live leases (bound and declined, not expired). The
    /// result is durable when this returns, so it also stands for a [`Journal::sync`].
    pub fn compact(&mut self, table: &LeaseTable, now: u64) -> Result<(), JournalError> {
        let records = table.snapshot(now);
        let text = render(&records);
        if let Err(source) = self.storage.replace(text.as_bytes()) {
            self.broken = true;
            return Err(JournalError::Io { path: self.path.clone(), what: "rewriting", source });
        }
        self.len = text.len() as u64;
        self.lines = records.len();
        self.base = records.len();
        self.unsynced = false;
        self.broken = false;
        Ok(())
    }

    /// Records in the file now.
    pub fn lines(&self) -> usize {
        self.lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pool() -> Pool {
        Pool {
            network: Ipv4Addr::new(10, 99, 0, 0),
            prefix: 24,
            start: Ipv4Addr::new(10, 99, 0, 100),
            end: Ipv4Addr::new(10, 99, 0, 102),
            router: None,
            dns: vec![],
            domain: None,
            lease_time: Duration::from_secs(3600),
        }
    }

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn distinct_clients_get_distinct_addresses_until_the_pool_is_empty() {
        let mut t = LeaseTable::new(HashMap::new(), HashSet::from([Ipv4Addr::new(10, 99, 0, 101)]));
        let p = pool();
        let a = t.pick(&p, mac(1), None, None, 0).unwrap();
        t.offer(a, mac(1), 0);
        let b = t.pick(&p, mac(2), None, None, 0).unwrap();
        t.offer(b, mac(2), 0);
        assert_ne!(a, b);
        assert_ne!(b, Ipv4Addr::new(10, 99, 0, 101), "blocked address handed out");
        assert_eq!(t.pick(&p, mac(3), None, None, 0), None);
        // The same client gets the same address again.
        assert_eq!(t.pick(&p, mac(1), None, None, 0), Some(a));
        // Offers expire.
        assert!(t.pick(&p, mac(3), None, None, OFFER_HOLD_S + 1).is_some());
    }

    #[test]
    fn reservations_are_kept_for_their_owner() {
        let r = Ipv4Addr::new(10, 99, 0, 100);
        let mut t = LeaseTable::new(HashMap::from([(r, mac(9))]), HashSet::new());
        let p = pool();
        for n in 1..=2 {
            let ip = t.pick(&p, mac(n), None, Some(r), 0).unwrap();
            assert_ne!(ip, r);
            t.offer(ip, mac(n), 0);
        }
        assert_eq!(t.pick(&p, mac(9), Some(r), None, 0), Some(r));
    }

    #[test]
    fn release_and_decline() {
        let mut t = LeaseTable::new(HashMap::new(), HashSet::new());
        let p = pool();
        let ip = t.pick(&p, mac(1), None, None, 0).unwrap();
        t.bind(ip, mac(1), 3600);
        assert!(!t.available_for(ip, mac(2), 10));
        assert!(t.release(ip, mac(2)).is_none(), "only the owner releases");
        assert!(t.release(ip, mac(1)).is_some());
        assert!(t.available_for(ip, mac(2), 10));
        t.bind(ip, mac(2), 3600);
        assert!(t.decline(ip, mac(2), 600).is_some());
        assert!(!t.available_for(ip, mac(2), 10));
        assert!(!t.available_for(ip, mac(3), 10));
        assert!(t.available_for(ip, mac(3), 601));
    }

    /// A storage that keeps the journal's bytes in memory and can tear appends.
    #[derive(Default)]
    struct MemStorage {
        bytes: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        /// Appends write half their bytes and fail.
        tear: bool,
        fail_truncate: bool,
    }

    impl Storage for MemStorage {
        fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
            let mut b = self.bytes.lock().unwrap();
            if self.tear {
                b.extend_from_slice(&bytes[..bytes.len() / 2]);
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            b.extend_from_slice(bytes);
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            if self.fail_truncate {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.bytes.lock().unwrap().truncate(len as usize);
            Ok(())
        }
        fn replace(&mut self, bytes: &[u8]) -> io::Result<()> {
            *self.bytes.lock().unwrap() = bytes.to_vec();
            Ok(())
        }
    }

    fn replay(bytes: &[u8]) -> LeaseTable {
        let mut t = LeaseTable::new(HashMap::new(), HashSet::new());
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(r) = serde_json::from_slice::<Record>(line) {
                t.apply(&r);
            }
        }
        t
    }

    #[test]
    fn a_torn_append_is_cut_off_before_the_next_record() {
        let bytes = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut t = LeaseTable::new(HashMap::new(), HashSet::new());
        let ip = |n| Ipv4Addr::new(10, 99, 0, n);
        let mut j = Journal::with_storage(Path::new("mem"), Box::new(MemStorage { bytes: bytes.clone(), ..Default::default() }));
        j.append(&[t.bind(ip(100), mac(1), 3600)]).unwrap();
        let good = bytes.lock().unwrap().len();
        j.storage = Box::new(MemStorage { bytes: bytes.clone(), tear: true, ..Default::default() });
        assert!(j.append(&[t.bind(ip(101), mac(2), 3600)]).is_err());
        assert_eq!(bytes.lock().unwrap().len(), good, "the torn half line was cut off");
        j.storage = Box::new(MemStorage { bytes: bytes.clone(), ..Default::default() });
        j.append(&[t.bind(ip(102), mac(3), 3600)]).unwrap();
        j.sync().unwrap();
        let replayed = replay(&bytes.lock().unwrap());
        assert_eq!(replayed.get(ip(102)).map(|e| e.mac), Some(Some(mac(3))), "the record after the torn one is whole");
        assert_eq!(replayed.get(ip(100)).map(|e| e.mac), Some(Some(mac(1))));

        // When the cut fails too, nothing more is appended until a rewrite from the table.
        j.storage = Box::new(MemStorage { bytes: bytes.clone(), tear: true, fail_truncate: true });
        assert!(j.append(&[t.bind(ip(103), mac(4), 3600)]).is_err());
        j.storage = Box::new(MemStorage { bytes: bytes.clone(), ..Default::default() });
        assert!(matches!(j.append(&[t.bind(ip(104), mac(5), 3600)]), Err(JournalError::Broken { .. })));
        assert!(matches!(j.sync(), Err(JournalError::Broken { .. })));
        assert!(j.needs_compaction());
        j.compact(&t, 10).unwrap();
        assert!(!j.needs_compaction());
        let replayed = replay(&bytes.lock().unwrap());
        for (n, m) in [(100, 1), (101, 2), (102, 3), (103, 4), (104, 5)] {
            assert_eq!(replayed.get(ip(n)).map(|e| e.mac), Some(Some(mac(m))), "{n}: the rewrite holds every lease of the table");
        }
        j.append(&[t.bind(ip(100), mac(1), 7200)]).unwrap();
    }

    #[test]
    fn compaction_is_due_at_a_multiple_of_the_compacted_size() {
        let mut t = LeaseTable::new(HashMap::new(), HashSet::new());
        let mut j = Journal::with_storage(Path::new("mem"), Box::new(MemStorage::default()));
        j.compact(&t, 0).unwrap();
        let mut appended = 0;
        while !j.needs_compaction() {
            j.append(&[t.bind(Ipv4Addr::new(10, 99, 0, 100), mac(1), 3600)]).unwrap();
            appended += 1;
        }
        assert_eq!(appended, COMPACT_FACTOR * COMPACT_FLOOR, "the floor for a small table");
        j.compact(&t, 0).unwrap();
        assert_eq!(j.lines(), 1);
    }

    #[test]
    fn journal_survives_a_restart_and_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.json");
        let p = pool();
        let ip = {
            let mut t = LeaseTable::new(HashMap::new(), HashSet::new());
            let (mut j, _) = Journal::open(&path, &mut t, 0).unwrap();
            let ip = t.pick(&p, mac(1), None, None, 0).unwrap();
            let rec = t.bind(ip, mac(1), 3600);
            j.append(&[rec]).unwrap();
            ip
        };
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{\"ip\":\"10.9").unwrap();
        let mut t = LeaseTable::new(HashMap::new(), HashSet::new());
        let (_, skipped) = Journal::open(&path, &mut t, 10).unwrap();
        assert_eq!(skipped, 1);
        assert!(!t.available_for(ip, mac(2), 10));
        let other = t.pick(&p, mac(2), None, Some(ip), 10).unwrap();
        assert_ne!(other, ip);
        assert_eq!(t.pick(&p, mac(1), None, None, 10), Some(ip));
    }
}
