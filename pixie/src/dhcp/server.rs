//! The DHCP socket loop: receive, [`Handler::handle`] (decode, decide, persist, encode), send.
//! Packets already waiting are taken as one group (up to [`GROUP`]): their lease records are
//! appended, one fsync makes them durable, and only then do their ACKs leave; answers that
//! record nothing (OFFER, NAK, proxy replies) go out before the fsync. `PXE Booting` events go
//! to the API at most once per MAC per `dhcp.pxe_event_interval_s` ([`super::limiter`]).
//!
//! Each socket (port 67, and port 4011 in proxy mode) gets its own OS thread with blocking I/O:
//! a DHCP exchange is a few microseconds of work, and a plain thread keeps it off the async
//! runtime. Sockets are bound to the configured interface with `SO_BINDTODEVICE`, so pixie can
//! never answer a packet that arrived anywhere else.

use std::collections::HashSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use metal_types::PxeEvent;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

use super::leases::{Journal, LeaseTable};
use super::limiter::{self, EventLimiter};
use super::{build_reply, decide, destination, wire, BootChoice, Decision, Dest, Request, CLIENT_PORT};
use crate::api::EventQueue;
use crate::config::{DhcpConfig, DhcpMode, Mac};
use crate::dhcp::{arch_name, MsgType, PXE_PORT, SERVER_PORT};
use crate::metrics::Metrics;

pub fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A UDP socket on `port` bound to `interface` that may send broadcasts.
pub fn bind_udp(interface: &str, addr: SocketAddrV4) -> io::Result<UdpSocket> {
    let fd = socket::socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    socket::setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    socket::setsockopt(&fd, sockopt::Broadcast, &true)?;
    // Room for bursts (thousands of clients powering on at once); beyond rmem_max needs root.
    if socket::setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20)).is_err() {
        let _ = socket::setsockopt(&fd, sockopt::RcvBuf, &(4 << 20));
    }
    socket::setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(interface))
        .map_err(|e| io::Error::other(format!("SO_BINDTODEVICE {interface}: {e}")))?;
    socket::bind(fd.as_raw_fd(), &SockaddrIn::from(addr))?;
    Ok(UdpSocket::from(fd))
}

const ATF_COM: libc::c_int = 0x02;

/// Adds a static ARP entry so a reply can be unicast to a client that has no address yet.
fn set_arp(sock: &UdpSocket, interface: &str, ip: Ipv4Addr, mac: Mac) -> io::Result<()> {
    // SAFETY: arpreq is plain old data; zeroed is a valid value for every field.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in fits in sockaddr (both 16 bytes) and both are plain old data.
    unsafe { std::ptr::write(&mut req.arp_pa as *mut libc::sockaddr as *mut libc::sockaddr_in, sin) };
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in req.arp_ha.sa_data.iter_mut().zip(mac.0) {
        *d = s as libc::c_char;
    }
    req.arp_flags = ATF_COM;
    for (d, s) in req.arp_dev.iter_mut().zip(interface.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCSARP reads one arpreq, which lives for the duration of the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSARP, &req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

struct Leases {
    table: LeaseTable,
    journal: Option<Journal>,
}

/// Everything one DHCP packet needs; shared by the socket threads.
pub struct Handler {
    cfg: Arc<DhcpConfig>,
    partition: String,
    leases: Mutex<Leases>,
    events: EventQueue,
    /// At most one `PXE Booting` event per MAC per `dhcp.pxe_event_interval_s`.
    pxe_limiter: Mutex<EventLimiter>,
    metrics: Arc<Metrics>,
}

/// The answer to one packet: bytes and where they go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub bytes: Vec<u8>,
    pub dest: Dest,
    pub mac: Mac,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Journal(#[from] super::leases::JournalError),
    #[error("binding DHCP port {port} on {interface}")]
    Bind { interface: String, port: u16, source: io::Error },
}

impl Handler {
    /// Loads the lease journal (server mode) and builds the handler.
    pub fn new(
        cfg: Arc<DhcpConfig>,
        partition: String,
        events: EventQueue,
        metrics: Arc<Metrics>,
    ) -> Result<Handler, StartError> {
        let reserved = cfg.reservations.iter().map(|(m, r)| (r.ip, *m)).collect();
        let mut blocked: HashSet<Ipv4Addr> = [cfg.server_ip, cfg.boot.tftp_server].into_iter().collect();
        for p in &cfg.pools {
            blocked.extend(p.router);
            blocked.extend(p.dns.iter().copied());
        }
        let mut table = LeaseTable::new(reserved, blocked);
        let journal = match (&cfg.lease_file, cfg.mode) {
            (Some(path), DhcpMode::Server) => {
                let (j, skipped) = Journal::open(path, &mut table, now_s())?;
                tracing::info!(path = %path.display(), bound = table.bound_count(now_s()), skipped, "lease journal loaded");
                Some(j)
            }
            (None, DhcpMode::Server) => {
                tracing::warn!("dhcp.lease_file is not set: leases live in memory only and a restart forgets them");
                None
            }
            _ => None,
        };
        let pxe_limiter = Mutex::new(EventLimiter::new(cfg.pxe_event_interval, limiter::DEFAULT_CAPACITY));
        Ok(Handler { cfg, partition, leases: Mutex::new(Leases { table, journal }), events, pxe_limiter, metrics })
    }

    /// One packet in, at most one packet out, its lease record (if any) durable first. Never
    /// panics on input.
    pub fn handle(&self, buf: &[u8], src: SocketAddrV4, port: u16) -> Option<Outgoing> {
        let mut out = Vec::with_capacity(1);
        self.handle_group([(buf, src)], port, &mut out);
        out.pop()
    }

    /// Answers a group of packets into `out`: each is decoded, decided and its lease record
    /// appended to the journal; then the journal is synced once (or compacted, when it has
    /// grown), and only then are the answers that depend on it added. An ACK whose record is
    /// not durable is never returned; other answers (OFFER, NAK, proxy replies) wait for nothing.
    pub fn handle_group<'a>(
        &self,
        packets: impl IntoIterator<Item = (&'a [u8], SocketAddrV4)>,
        port: u16,
        out: &mut Vec<Outgoing>,
    ) {
        let mut waiting = Vec::new();
        if self.decide_group(packets, port, out, &mut waiting) && self.commit(waiting.len()) {
            out.append(&mut waiting);
        }
    }

    /// Decides every packet: answers that need nothing durable go to `now`, answers whose
    /// lease record was appended to `waiting`. Returns whether anything was appended (then
    /// [`Handler::commit`] must run before `waiting` is sent).
    fn decide_group<'a>(
        &self,
        packets: impl IntoIterator<Item = (&'a [u8], SocketAddrV4)>,
        port: u16,
        now: &mut Vec<Outgoing>,
        waiting: &mut Vec<Outgoing>,
    ) -> bool {
        let mut appended = false;
        for (buf, src) in packets {
            let (o, journaled) = self.one(buf, src, port);
            appended |= journaled;
            match (o, journaled) {
                (Some(o), true) => waiting.push(o),
                (Some(o), false) => now.push(o),
                (None, _) => {}
            }
        }
        appended
    }

    /// Makes the records appended since the last commit durable: a compaction when one is
    /// due, one sync otherwise. On failure the `waiting` answers of the group must not be sent.
    fn commit(&self, waiting: usize) -> bool {
        let mut l = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let Leases { table, journal } = &mut *l;
        let Some(j) = journal.as_mut() else { return true };
        let durable = if j.needs_compaction() {
            let lines = j.lines();
            j.compact(table, now_s()).map(|()| {
                self.metrics.dhcp_journal_compactions.inc();
                tracing::info!(before = lines, after = j.lines(), "lease journal compacted");
            })
        } else {
            j.sync().map(|synced| {
                if synced {
                    self.metrics.dhcp_journal_syncs.inc();
                }
            })
        };
        match durable {
            Ok(()) => true,
            Err(e) => {
                // Acknowledging a lease we could not persist could hand it out twice later.
                tracing::error!(error = %crate::api::error_chain(&e), dropped = waiting, "lease journal not durable: ACKs not sent");
                self.metrics.dhcp_packets.add(["request", "journal_error"], waiting as u64);
                false
            }
        }
    }

    /// Decides one packet and appends its lease record (not yet synced); the flag says whether
    /// the journal was written to (so the answer waits for it, and the group must commit).
    fn one(&self, buf: &[u8], src: SocketAddrV4, port: u16) -> (Option<Outgoing>, bool) {
        let msg = match wire::decode(buf) {
            Ok(m) => m,
            Err(e) => {
                self.metrics.dhcp_invalid.inc([invalid_label(&e)]);
                tracing::debug!(%src, error = %e, len = buf.len(), "malformed DHCP packet dropped");
                return (None, false);
            }
        };
        let req = match Request::from_message(&msg) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.dhcp_invalid.inc([invalid_label(&e)]);
                tracing::debug!(%src, error = %e, "DHCP packet dropped");
                return (None, false);
            }
        };
        let (decision, journaled) = {
            let mut l = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            let (d, rec) = decide(&req, port, &self.cfg, &mut l.table, now_s());
            let mut journaled = false;
            if let (Some(rec), Some(j)) = (rec, l.journal.as_mut()) {
                if let Err(e) = j.append(&[rec]) {
                    // Acknowledging a lease we could not persist could hand it out twice later.
                    tracing::error!(error = %crate::api::error_chain(&e), mac = %req.mac, "lease not persisted: no reply sent");
                    self.metrics.dhcp_packets.inc([req.msg_type.as_str(), "journal_error"]);
                    // The group still commits: that rewrites a journal the failure left broken.
                    return (None, true);
                }
                journaled = true;
            }
            (d, journaled)
        };
        self.metrics.dhcp_packets.inc([req.msg_type.as_str(), decision.label()]);
        self.log(&req, &decision, port);
        if req.msg_type == MsgType::Discover && req.is_pxe() {
            self.report(&req, &decision);
        }
        let Decision::Reply(reply) = decision else { return (None, journaled) };
        let out = build_reply(&msg, &req, &reply, &self.cfg);
        (Some(Outgoing { bytes: wire::encode(&out), dest: destination(&req, &reply, src, port), mac: req.mac }), journaled)
    }

    fn log(&self, req: &Request, d: &Decision, port: u16) {
        let arch = arch_name(req.arch);
        let ty = req.msg_type.as_str();
        match d {
            Decision::Silent { why } => {
                tracing::info!(mac = %req.mac, arch, msg = ty, port, decision = "silent", why = %why, "dhcp")
            }
            Decision::Reply(r) => {
                let boot = r.boot.file().unwrap_or("-");
                let boot_why = match &r.boot {
                    BootChoice::None { why } => why.as_str(),
                    BootChoice::Tftp { why, .. } => why,
                    BootChoice::UefiHttp { .. } => "option 60 HTTPClient: UEFI HTTP boot",
                    BootChoice::IpxeScript { .. } => "user class iPXE: per-machine script",
                };
                tracing::info!(
                    mac = %req.mac, arch, msg = ty, port, decision = r.kind.as_str(), yiaddr = %r.yiaddr,
                    boot, boot_why, why = %r.why, "dhcp"
                )
            }
        }
    }

    fn report(&self, req: &Request, d: &Decision) {
        if !self.pxe_limiter.lock().unwrap_or_else(|e| e.into_inner()).allow(req.mac, Instant::now()) {
            self.metrics.pxe_events.inc(["suppressed"]);
            return;
        }
        let message = match d {
            Decision::Reply(r) => format!("DHCP {} offered {}", req.msg_type.as_str(), r.boot.file().unwrap_or("no boot file")),
            Decision::Silent { why } => format!("DHCP {} not answered: {why}", req.msg_type.as_str()),
        };
        self.events.send(PxeEvent {
            partition: self.partition.clone(),
            mac: req.mac.to_string(),
            uuid: req.uuid,
            arch: req.arch,
            message,
        });
    }

    /// Serves one socket until it fails.
    pub fn serve(&self, sock: UdpSocket, port: u16) -> io::Error {
        self.serve_on(&mut UdpTransport { sock, interface: self.cfg.interface.clone() }, port)
    }

    /// The loop: wait for a packet, take every further one already waiting (up to [`GROUP`]),
    /// decide them, send the answers that need nothing durable, sync the journal once for the
    /// group, send the ACKs; until `t` fails.
    pub fn serve_on(&self, t: &mut impl Transport, port: u16) -> io::Error {
        let mut bufs = vec![vec![0u8; 4096]; GROUP];
        let mut got: Vec<(usize, SocketAddrV4)> = Vec::with_capacity(GROUP);
        let (mut now, mut waiting) = (Vec::with_capacity(GROUP), Vec::with_capacity(GROUP));
        loop {
            got.clear();
            match t.recv(&mut bufs[0]) {
                Ok(x) => got.push(x),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return e,
            }
            while got.len() < GROUP {
                match t.try_recv(&mut bufs[got.len()]) {
                    Ok(Some(x)) => got.push(x),
                    Ok(None) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                }
            }
            now.clear();
            waiting.clear();
            let appended =
                self.decide_group(got.iter().zip(&bufs).map(|(&(n, src), b)| (&b[..n], src)), port, &mut now, &mut waiting);
            for o in &now {
                t.send(o);
            }
            if appended && self.commit(waiting.len()) {
                for o in &waiting {
                    t.send(o);
                }
            }
        }
    }
}

/// At most this many packets are answered as one group (one journal sync for all of them).
/// Packets are only grouped when they are already waiting, so a lone packet never waits.
pub const GROUP: usize = 64;

/// Where the DHCP loop gets packets and puts answers: a UDP socket ([`UdpTransport`]), or a
/// recording one in unit tests.
pub trait Transport {
    /// Waits for the next packet.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4)>;
    /// The next packet if one is waiting already; never blocks.
    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddrV4)>>;
    /// Sends an answer (failures are logged, not returned: the client asks again).
    fn send(&mut self, out: &Outgoing);
}

/// A DHCP socket bound to its interface.
pub struct UdpTransport {
    pub sock: UdpSocket,
    /// For the static ARP entries of unicast answers.
    pub interface: String,
}

impl Transport for UdpTransport {
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4)> {
        loop {
            if let (n, SocketAddr::V4(src)) = self.sock.recv_from(buf)? {
                return Ok((n, src));
            }
        }
    }

    fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddrV4)>> {
        // SAFETY: an all-zero sockaddr_in is valid; recvfrom writes at most `len` bytes into
        // `buf` and at most `alen` bytes into `addr`, both live for the call.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        let mut alen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let n = unsafe {
            libc::recvfrom(
                self.sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
                (&mut addr as *mut libc::sockaddr_in).cast(),
                &mut alen,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
        }
        if i32::from(addr.sin_family) != libc::AF_INET {
            return Ok(None);
        }
        let src = SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)), u16::from_be(addr.sin_port));
        Ok(Some((n as usize, src)))
    }

    fn send(&mut self, out: &Outgoing) {
        let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT);
        let to = match out.dest {
            Dest::Broadcast => broadcast,
            Dest::Unicast(a) => a,
            Dest::UnicastToChaddr(ip) => match set_arp(&self.sock, &self.interface, ip, out.mac) {
                Ok(()) => SocketAddrV4::new(ip, CLIENT_PORT),
                Err(e) => {
                    tracing::debug!(error = %e, %ip, "static ARP entry failed, broadcasting instead");
                    broadcast
                }
            },
        };
        if let Err(e) = self.sock.send_to(&out.bytes, to) {
            tracing::warn!(error = %e, %to, "sending DHCP reply failed");
        }
    }
}

fn invalid_label(e: &wire::WireError) -> &'static str {
    use wire::WireError as W;
    match e {
        W::Short(_) => "short",
        W::NotRequest(_) => "not_request",
        W::NoMagic => "no_magic",
        W::BadHlen(_) => "bad_hlen",
        W::Truncated { .. } => "truncated_option",
        W::BadLength { .. } => "bad_option_length",
        W::Decode(_) => "decode",
        W::NoMessageType => "no_message_type",
        W::NotEthernet { .. } => "not_ethernet",
    }
}

/// Binds the sockets and starts one thread per socket.
pub fn start(handler: Arc<Handler>) -> Result<(), StartError> {
    let cfg = handler.cfg.clone();
    let mut ports = vec![SERVER_PORT];
    if cfg.mode == DhcpMode::Proxy {
        ports.push(PXE_PORT);
    }
    for port in ports {
        let sock = bind_udp(&cfg.interface, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
            .map_err(|source| StartError::Bind { interface: cfg.interface.clone(), port, source })?;
        tracing::info!(interface = %cfg.interface, port, mode = ?cfg.mode, "DHCP listening");
        let h = handler.clone();
        std::thread::Builder::new()
            .name(format!("dhcp-{port}"))
            .spawn(move || {
                let e = h.serve(sock, port);
                tracing::error!(error = %e, port, "DHCP socket failed; DHCP on this port stopped");
            })
            .map_err(|source| StartError::Bind { interface: cfg.interface.clone(), port, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::dhcp::wire::tests::{bytes, client_msg};
    use dhcproto::v4::{self, DhcpOption};
    use std::path::Path;

    const CONF: &str = r#"
partition = "lab"
[api]
url = "http://10.99.0.1:8080"
token = "t"
[dhcp]
mode = "server"
interface = "metalbr0"
server_ip = "10.99.0.1"
[dhcp.pool]
subnet = "10.99.0.0/24"
start = "10.99.0.100"
end = "10.99.0.199"
[http]
listen = "10.99.0.1:8081"
public_url = "http://10.99.0.1:8081"
"#;

    fn handler(extra_dhcp: &str) -> (Handler, tokio::sync::mpsc::Receiver<PxeEvent>, Arc<Metrics>) {
        let text = CONF.replace("server_ip = \"10.99.0.1\"", &format!("server_ip = \"10.99.0.1\"\n{extra_dhcp}"));
        let cfg = Config::from_toml(Path::new("t.toml"), &text).unwrap().dhcp.unwrap();
        let metrics = Arc::new(Metrics::default());
        let (events, rx) = EventQueue::detached(metrics.clone());
        (Handler::new(Arc::new(cfg), "lab".into(), events, metrics.clone()).unwrap(), rx, metrics)
    }

    fn pxe_discover(mac: [u8; 6], ipxe: bool) -> Vec<u8> {
        let mut m = client_msg(v4::MessageType::Discover, mac);
        m.opts_mut().insert(DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()));
        if ipxe {
            m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        }
        bytes(&m)
    }

    fn drain(rx: &mut tokio::sync::mpsc::Receiver<PxeEvent>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok()).map(|e| e.mac).collect()
    }

    const SRC: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, CLIENT_PORT);

    #[test]
    fn a_flood_of_discovers_for_one_mac_is_answered_but_reported_once() {
        let (h, mut rx, metrics) = handler("");
        let a = [2, 0, 0, 0, 0, 0xa1];
        for i in 0..500 {
            let out = h.handle(&pxe_discover(a, i % 2 == 1), SRC, SERVER_PORT);
            assert!(out.is_some(), "DISCOVER {i} not answered: a machine that retries must still boot");
        }
        assert_eq!(
            drain(&mut rx),
            vec!["02:00:00:00:00:a1"],
            "one PXE Booting event for 500 DISCOVERs (and iPXE DISCOVERs) of one MAC"
        );
        assert_eq!(metrics.pxe_events.get(["suppressed"]), 499);
        assert_eq!(metrics.dhcp_packets.get(["discover", "offer"]), 500);
        let b = [2, 0, 0, 0, 0, 0xb2];
        for _ in 0..10 {
            assert!(h.handle(&pxe_discover(b, false), SRC, SERVER_PORT).is_some());
        }
        assert_eq!(drain(&mut rx), vec!["02:00:00:00:00:b2"], "another MAC still gets its event");
        assert_eq!(metrics.pxe_events.get(["dropped"]), 0);
    }

    fn request(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
        let mut m = client_msg(v4::MessageType::Request, mac);
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        m.opts_mut().insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 99, 0, 1)));
        bytes(&m)
    }

    fn reply(out: &Outgoing) -> v4::Message {
        use dhcproto::Decodable;
        v4::Message::decode(&mut dhcproto::Decoder::new(&out.bytes)).unwrap()
    }

    fn reply_type(out: &Outgoing) -> Option<v4::MessageType> {
        reply(out).opts().msg_type()
    }

    #[test]
    fn the_journal_is_compacted_while_running_and_keeps_every_lease() {
        // A real file; on tmpfs where there is one, so 6,000 fsyncs do not make this slow.
        let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).unwrap();
        let path = dir.path().join("leases.json");
        let (h, _rx, _) = handler(&format!("lease_file = \"{}\"", path.display()));
        let mut leased = Vec::new();
        for n in 0..20u8 {
            let mac = [2, 0, 0, 0, 1, n];
            let offer = h.handle(&pxe_discover(mac, false), SRC, SERVER_PORT).unwrap();
            leased.push((mac, reply(&offer).yiaddr()));
        }
        // 6,000 ACKs (renewals) for 20 live leases.
        let mut sizes = Vec::new();
        for _ in 0..300 {
            for (mac, ip) in &leased {
                let out = h.handle(&request(*mac, *ip), SRC, SERVER_PORT).unwrap();
                assert_eq!(reply_type(&out), Some(v4::MessageType::Ack));
            }
            sizes.push(std::fs::metadata(&path).unwrap().len());
        }
        let biggest = *sizes.iter().max().unwrap();
        assert!(biggest < 150 * 1024, "the journal grew to {biggest} bytes for 20 leases");
        assert!(sizes.windows(2).any(|w| w[1] < w[0]), "the journal never shrank while running: {sizes:?}");
        drop(h);
        let mut table = LeaseTable::new(Default::default(), Default::default());
        Journal::open(&path, &mut table, now_s()).unwrap();
        for (mac, ip) in &leased {
            let e = table.get(*ip).unwrap_or_else(|| panic!("lease {ip} lost"));
            assert_eq!(e.mac, Some(Mac(*mac)));
            assert_eq!(e.state, super::super::leases::State::Bound);
        }
    }

    /// The journal's storage and the transport write into one log, so the test sees the order
    /// of appends, syncs and sends.
    type Log = Arc<Mutex<Vec<String>>>;

    #[derive(Default)]
    struct RecordingStorage {
        log: Log,
        fail_sync: bool,
        /// The first append fails, and so does cutting it off.
        fail_first_append: bool,
    }

    impl super::super::leases::Storage for RecordingStorage {
        fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
            let r: super::super::leases::Record = serde_json::from_slice(bytes.trim_ascii_end()).unwrap();
            self.log.lock().unwrap().push(format!("append {}", r.ip));
            if std::mem::take(&mut self.fail_first_append) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            self.log.lock().unwrap().push("sync".into());
            if self.fail_sync {
                return Err(io::Error::other("EIO"));
            }
            Ok(())
        }
        fn truncate(&mut self, len: u64) -> io::Result<()> {
            self.log.lock().unwrap().push(format!("truncate {len}"));
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
        fn replace(&mut self, _: &[u8]) -> io::Result<()> {
            self.log.lock().unwrap().push("replace".into());
            Ok(())
        }
    }

    /// Hands out bursts of packets (a burst is what is already waiting when the loop looks)
    /// and logs what is sent; ends the loop when out of bursts.
    struct RecordingTransport {
        bursts: std::collections::VecDeque<Vec<Vec<u8>>>,
        current: std::collections::VecDeque<Vec<u8>>,
        log: Log,
    }

    impl Transport for RecordingTransport {
        fn recv(&mut self, buf: &mut [u8]) -> io::Result<(usize, SocketAddrV4)> {
            self.current = self.bursts.pop_front().ok_or_else(|| io::Error::other("no more packets"))?.into();
            Ok(self.try_recv(buf)?.expect("a burst is never empty"))
        }
        fn try_recv(&mut self, buf: &mut [u8]) -> io::Result<Option<(usize, SocketAddrV4)>> {
            Ok(self.current.pop_front().map(|p| {
                buf[..p.len()].copy_from_slice(&p);
                (p.len(), SRC)
            }))
        }
        fn send(&mut self, out: &Outgoing) {
            use dhcproto::Decodable;
            let m = v4::Message::decode(&mut dhcproto::Decoder::new(&out.bytes)).unwrap();
            self.log.lock().unwrap().push(format!("send {:?} {}", m.opts().msg_type().unwrap(), m.yiaddr()));
        }
    }

    fn run_loop(storage: RecordingStorage, bursts: Vec<Vec<Vec<u8>>>) -> (Vec<String>, Arc<Metrics>) {
        let (h, _rx, metrics) = handler("");
        let log = storage.log.clone();
        h.leases.lock().unwrap().journal = Some(Journal::with_storage(Path::new("recorded"), Box::new(storage)));
        let mut t = RecordingTransport { bursts: bursts.into(), current: Default::default(), log: log.clone() };
        let end = h.serve_on(&mut t, SERVER_PORT);
        assert_eq!(end.to_string(), "no more packets");
        let log = log.lock().unwrap().clone();
        (log, metrics)
    }

    fn ip(n: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, n)
    }

    #[test]
    fn the_journal_is_synced_before_the_acks_of_a_group_are_sent() {
        let req = |n: u8| request([2, 0, 0, 0, 2, n], ip(n));
        let (log, metrics) = run_loop(
            RecordingStorage::default(),
            vec![vec![req(101), pxe_discover([2, 0, 0, 0, 3, 1], false), req(102), req(103)], vec![req(104)]],
        );
        assert_eq!(
            log,
            [
                "append 10.99.0.101",
                "append 10.99.0.102",
                "append 10.99.0.103",
                "send Offer 10.99.0.100",
                "sync",
                "send Ack 10.99.0.101",
                "send Ack 10.99.0.102",
                "send Ack 10.99.0.103",
                "append 10.99.0.104",
                "sync",
                "send Ack 10.99.0.104",
            ],
            "one sync per group, before any of its ACKs (the OFFER waits for nothing)"
        );
        assert_eq!(metrics.dhcp_journal_syncs.get(), 2);
    }

    #[test]
    fn a_failed_sync_sends_no_ack_of_its_group() {
        let storage = RecordingStorage { fail_sync: true, ..Default::default() };
        let (log, metrics) =
            run_loop(storage, vec![vec![request([2, 0, 0, 0, 2, 1], ip(101)), pxe_discover([2, 0, 0, 0, 3, 1], false)]]);
        assert_eq!(log, ["append 10.99.0.101", "send Offer 10.99.0.100", "sync"], "the OFFER goes out, the ACK does not");
        assert_eq!(metrics.dhcp_packets.get(["request", "journal_error"]), 1);
    }

    #[test]
    fn a_journal_left_broken_by_a_failed_write_is_rewritten_before_the_next_ack() {
        let storage = RecordingStorage { fail_first_append: true, ..Default::default() };
        let (log, metrics) =
            run_loop(storage, vec![vec![request([2, 0, 0, 0, 2, 1], ip(101))], vec![request([2, 0, 0, 0, 2, 2], ip(102))]]);
        assert_eq!(
            log,
            ["append 10.99.0.101", "truncate 0", "replace", "append 10.99.0.102", "sync", "send Ack 10.99.0.102"],
            "no ACK for the lease that was not written; the journal is rewritten from the table in the same group"
        );
        assert_eq!(metrics.dhcp_packets.get(["request", "journal_error"]), 1);
        assert_eq!(metrics.dhcp_journal_compactions.get(), 1);
    }

    #[test]
    fn an_interval_of_zero_reports_every_discover() {
        let (h, mut rx, _) = handler("pxe_event_interval_s = 0");
        for _ in 0..5 {
            h.handle(&pxe_discover([2, 0, 0, 0, 0, 0xa1], false), SRC, SERVER_PORT).unwrap();
        }
        assert_eq!(drain(&mut rx).len(), 5);
    }
}
