//! The lease table (in memory, no I/O) and its journal on disk.
//!
//! The journal is one JSON object per line, appended (and written through to the kernel) before
//! the ACK that it records leaves pixie, so a restarted pixie knows every address it acknowledged
//! and hands out no duplicate. At start the journal is replayed (a torn last line is ignored) and
//! rewritten compactly: written to a temporary file, fsynced, renamed over the old one.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Mac, Pool};

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
    pub fn pick(&mut self, pool: &Pool, mac: Mac, reservation: Option<Ipv4Addr>, requested: Option<Ipv4Addr>, now: u64) -> Option<Ipv4Addr> {
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
    #[error("lease journal {path}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// The append-only lease journal.
pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    /// Replays `path` into `table`, compacts it and opens it for appending.
    pub fn open(path: &Path, table: &mut LeaseTable, now: u64) -> Result<(Journal, usize), JournalError> {
        let io = |source| JournalError::Io { path: path.to_path_buf(), source };
        let mut skipped = 0;
        match File::open(path) {
            Ok(f) => {
                for line in BufReader::new(f).lines() {
                    let line = line.map_err(io)?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<Record>(&line) {
                        Ok(r) => table.apply(&r),
                        Err(_) => skipped += 1,
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
        }
        let tmp = path.with_extension("tmp");
        {
            let mut f = File::create(&tmp).map_err(io)?;
            let mut text = String::new();
            for r in table.snapshot(now) {
                text.push_str(&serde_json::to_string(&r).expect("a lease record serializes"));
                text.push('\n');
            }
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        Ok((Journal { path: path.to_path_buf(), file }, skipped))
    }

    /// Appends records in one write.
    pub fn append(&mut self, records: &[Record]) -> Result<(), JournalError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r).expect("a lease record serializes"));
            text.push('\n');
        }
        self.file
            .write_all(text.as_bytes())
            .map_err(|source| JournalError::Io { path: self.path.clone(), source })
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
