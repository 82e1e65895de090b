//! The DHCP socket loop: receive, [`Handler::handle`] (decode, decide, persist, encode), send.
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
use std::time::{SystemTime, UNIX_EPOCH};

use metal_types::PxeEvent;
use nix::sys::socket::{self, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn};

use super::leases::{Journal, LeaseTable};
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
    pub fn new(cfg: Arc<DhcpConfig>, partition: String, events: EventQueue, metrics: Arc<Metrics>) -> Result<Handler, StartError> {
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
        Ok(Handler { cfg, partition, leases: Mutex::new(Leases { table, journal }), events, metrics })
    }

    /// One packet in, at most one packet out. Never panics on input.
    pub fn handle(&self, buf: &[u8], src: SocketAddrV4, port: u16) -> Option<Outgoing> {
        let msg = match wire::decode(buf) {
            Ok(m) => m,
            Err(e) => {
                self.metrics.inc("pixie_dhcp_invalid_total", &[("reason", invalid_label(&e))]);
                tracing::debug!(%src, error = %e, len = buf.len(), "malformed DHCP packet dropped");
                return None;
            }
        };
        let req = match Request::from_message(&msg) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.inc("pixie_dhcp_invalid_total", &[("reason", invalid_label(&e))]);
                tracing::debug!(%src, error = %e, "DHCP packet dropped");
                return None;
            }
        };
        let decision = {
            let mut l = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            let (d, rec) = decide(&req, port, &self.cfg, &mut l.table, now_s());
            if let (Some(rec), Some(j)) = (rec, l.journal.as_mut()) {
                if let Err(e) = j.append(&[rec]) {
                    // Acknowledging a lease we could not persist could hand it out twice later.
                    tracing::error!(error = %crate::api::error_chain(&e), mac = %req.mac, "lease not persisted: no reply sent");
                    self.metrics.inc("pixie_dhcp_packets_total", &[("type", req.msg_type.as_str()), ("decision", "journal_error")]);
                    return None;
                }
            }
            d
        };
        self.metrics.inc("pixie_dhcp_packets_total", &[("type", req.msg_type.as_str()), ("decision", decision.label())]);
        self.log(&req, &decision, port);
        if req.msg_type == MsgType::Discover && req.is_pxe() {
            self.report(&req, &decision);
        }
        let Decision::Reply(reply) = decision else { return None };
        let out = build_reply(&msg, &req, &reply, &self.cfg);
        Some(Outgoing { bytes: wire::encode(&out), dest: destination(&req, &reply, src, port), mac: req.mac })
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
        let message = match d {
            Decision::Reply(r) => format!("DHCP {} offered {}", req.msg_type.as_str(), r.boot.file().unwrap_or("no boot file")),
            Decision::Silent { why } => format!("DHCP {} not answered: {why}", req.msg_type.as_str()),
        };
        self.events.send(PxeEvent { partition: self.partition.clone(), mac: req.mac.to_string(), uuid: req.uuid, arch: req.arch, message });
    }

    fn send(&self, sock: &UdpSocket, out: &Outgoing) {
        let broadcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, CLIENT_PORT);
        let to = match out.dest {
            Dest::Broadcast => broadcast,
            Dest::Unicast(a) => a,
            Dest::UnicastToChaddr(ip) => match set_arp(sock, &self.cfg.interface, ip, out.mac) {
                Ok(()) => SocketAddrV4::new(ip, CLIENT_PORT),
                Err(e) => {
                    tracing::debug!(error = %e, %ip, "static ARP entry failed, broadcasting instead");
                    broadcast
                }
            },
        };
        if let Err(e) = sock.send_to(&out.bytes, to) {
            tracing::warn!(error = %e, %to, "sending DHCP reply failed");
        }
    }

    /// Serves one socket until it fails.
    pub fn serve(&self, sock: UdpSocket, port: u16) -> io::Error {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, src) = match sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return e,
            };
            let SocketAddr::V4(src) = src else { continue };
            if let Some(out) = self.handle(&buf[..n], src, port) {
                self.send(&sock, &out);
            }
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
