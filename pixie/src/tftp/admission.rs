//! Which read requests may start a transfer (pure, no I/O).
//!
//! Every transfer holds a socket, an open file and a task until it ends, and a client that
//! never acknowledges keeps them for the whole retransmission schedule. So the server admits at
//! most `max_total` transfers at once, at most `max_per_client` from one address, and one per
//! (client address and port, file): an RRQ repeated while its transfer runs is a retransmission
//! that the running transfer answers already. What is refused is dropped without an answer: a
//! real client sends its RRQ again after its own timeout and gets a slot once one is free, a
//! TFTP ERROR would end its boot attempt instead, and silence gives a spoofed source nothing.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

/// Why an RRQ was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The same client port already has a transfer of this file running.
    Duplicate,
    /// This client address has `max_per_client` transfers running.
    ClientLimit,
    /// `max_total` transfers are running.
    Limit,
}

impl Refusal {
    /// The `reason` label of `pixie_tftp_refused_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Duplicate => "duplicate",
            Refusal::ClientLimit => "client_limit",
            Refusal::Limit => "limit",
        }
    }
}

/// The running transfers, by client and file.
#[derive(Debug)]
pub struct Admission {
    max_total: usize,
    max_per_client: usize,
    running: HashSet<(SocketAddr, String)>,
    per_client: HashMap<IpAddr, usize>,
}

impl Admission {
    pub fn new(max_total: usize, max_per_client: usize) -> Admission {
        Admission { max_total, max_per_client, running: HashSet::new(), per_client: HashMap::new() }
    }

    /// Admits a transfer of `file` to `peer`, or says why not. Every admitted transfer must be
    /// [`Admission::release`]d when it ends.
    pub fn admit(&mut self, peer: SocketAddr, file: &str) -> Result<(), Refusal> {
        let key = (peer, file.to_string());
        if self.running.contains(&key) {
            return Err(Refusal::Duplicate);
        }
        let mine = self.per_client.get(&peer.ip()).copied().unwrap_or(0);
        if mine >= self.max_per_client {
            return Err(Refusal::ClientLimit);
        }
        if self.running.len() >= self.max_total {
            return Err(Refusal::Limit);
        }
        self.running.insert(key);
        *self.per_client.entry(peer.ip()).or_insert(0) += 1;
        Ok(())
    }

    pub fn release(&mut self, peer: SocketAddr, file: &str) {
        if !self.running.remove(&(peer, file.to_string())) {
            return;
        }
        if let Some(n) = self.per_client.get_mut(&peer.ip()) {
            *n -= 1;
            if *n == 0 {
                self.per_client.remove(&peer.ip());
            }
        }
    }

    /// Transfers running now.
    pub fn running(&self) -> usize {
        self.running.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, ip], port))
    }

    #[test]
    fn duplicates_per_client_and_total_limits() {
        let mut a = Admission::new(5, 3);
        a.admit(peer(1, 1000), "undionly.kpxe").unwrap();
        assert_eq!(a.admit(peer(1, 1000), "undionly.kpxe"), Err(Refusal::Duplicate));
        a.admit(peer(1, 1000), "snponly.efi").expect("another file on the same port is another transfer");
        a.admit(peer(1, 1001), "undionly.kpxe").unwrap();
        assert_eq!(a.admit(peer(1, 1002), "undionly.kpxe"), Err(Refusal::ClientLimit));
        a.admit(peer(2, 1000), "undionly.kpxe").expect("another address has its own share");
        a.admit(peer(3, 1000), "undionly.kpxe").unwrap();
        assert_eq!(a.admit(peer(4, 1000), "undionly.kpxe"), Err(Refusal::Limit));
        assert_eq!(a.running(), 5);
        a.release(peer(1, 1000), "undionly.kpxe");
        a.release(peer(1, 1000), "undionly.kpxe"); // twice: no effect
        assert_eq!(a.running(), 4);
        a.admit(peer(1, 1002), "undionly.kpxe").expect("a slot of this client was released");
        assert_eq!(a.admit(peer(4, 1000), "undionly.kpxe"), Err(Refusal::Limit));
        for (ip, port, f) in [
            (1, 1000, "snponly.efi"),
            (1, 1001, "undionly.kpxe"),
            (1, 1002, "undionly.kpxe"),
            (2, 1000, "undionly.kpxe"),
            (3, 1000, "undionly.kpxe"),
        ] {
            a.release(peer(ip, port), f);
        }
        assert_eq!(a.running(), 0);
        assert!(a.per_client.is_empty(), "no entry left behind: {:?}", a.per_client);
    }
}
