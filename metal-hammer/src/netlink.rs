//! Just enough rtnetlink to configure one interface: link up, add an IPv4 address, add a
//! default route. Messages are built by pure functions (tested), then sent on a
//! `NETLINK_ROUTE` socket whose acknowledgement is checked.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_DHCP: u8 = 16;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(align4(buf.len()), 0);
}

/// Wraps a payload in an `nlmsghdr`.
fn message(kind: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + payload.len());
    out.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(payload);
    out
}

/// `RTM_NEWLINK` setting `IFF_UP` on `ifindex`.
pub fn link_up_msg(ifindex: i32, seq: u32) -> Vec<u8> {
    let mut p = Vec::new();
    p.push(libc::AF_UNSPEC as u8); // ifi_family
    p.push(0); // pad
    p.extend_from_slice(&0u16.to_ne_bytes()); // ifi_type
    p.extend_from_slice(&ifindex.to_ne_bytes());
    p.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes()); // ifi_flags
    p.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes()); // ifi_change
    message(RTM_NEWLINK, 0, seq, &p)
}

/// `RTM_NEWADDR` for `address/prefix_len` on `ifindex` (replacing an existing one).
pub fn add_addr_msg(ifindex: i32, address: Ipv4Addr, prefix_len: u8, seq: u32) -> Vec<u8> {
    let mut p = vec![libc::AF_INET as u8, prefix_len, 0, RT_SCOPE_UNIVERSE];
    p.extend_from_slice(&(ifindex as u32).to_ne_bytes());
    push_attr(&mut p, IFA_LOCAL, &address.octets());
    push_attr(&mut p, IFA_ADDRESS, &address.octets());
    if prefix_len < 31 {
        let mask = if prefix_len == 0 { 0 } else { u32::MAX << (32 - prefix_len) };
        let bcast = Ipv4Addr::from(u32::from(address) | !mask);
        push_attr(&mut p, IFA_BROADCAST, &bcast.octets());
    }
    message(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, seq, &p)
}

/// `RTM_NEWROUTE`: default route via `gateway` out of `ifindex`.
pub fn default_route_msg(ifindex: i32, gateway: Ipv4Addr, seq: u32) -> Vec<u8> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags(u32)
    let mut p = vec![libc::AF_INET as u8, 0, 0, 0, RT_TABLE_MAIN, RTPROT_DHCP, RT_SCOPE_UNIVERSE, RTN_UNICAST];
    p.extend_from_slice(&0u32.to_ne_bytes());
    push_attr(&mut p, RTA_GATEWAY, &gateway.octets());
    push_attr(&mut p, RTA_OIF, &(ifindex as u32).to_ne_bytes());
    message(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, seq, &p)
}

/// The errno in an `NLMSG_ERROR` reply for `seq` (0 = acknowledged), if `buf` holds one. Never
/// panics, whatever the bytes; an error field of `i32::MIN` reads as errno `i32::MAX`.
pub fn parse_ack(buf: &[u8], seq: u32) -> Option<i32> {
    let mut rest = buf;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < 16 || len > rest.len() {
            return None;
        }
        let kind = u16::from_ne_bytes(rest[4..6].try_into().ok()?);
        let mseq = u32::from_ne_bytes(rest[8..12].try_into().ok()?);
        if kind == NLMSG_ERROR && mseq == seq && len >= 20 {
            return Some(i32::from_ne_bytes(rest[16..20].try_into().ok()?).saturating_neg());
        }
        rest = &rest[align4(len).min(rest.len())..];
    }
    None
}

/// A `NETLINK_ROUTE` socket.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    pub fn open() -> std::io::Result<Netlink> {
        // SAFETY: socket(2), checked; ownership taken right after.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is fresh and ours.
        Ok(Netlink { fd: unsafe { OwnedFd::from_raw_fd(fd) }, seq: 1 })
    }

    fn call(&mut self, build: impl FnOnce(u32) -> Vec<u8>) -> std::io::Result<()> {
        self.seq += 1;
        let seq = self.seq;
        let msg = build(seq);
        // SAFETY: sockaddr_nl is plain data; zero = the kernel.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and kernel are valid for the lengths given.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            match parse_ack(&buf[..n as usize], seq) {
                Some(0) => return Ok(()),
                Some(errno) => return Err(std::io::Error::from_raw_os_error(errno)),
                None => continue,
            }
        }
    }

    pub fn link_up(&mut self, ifindex: i32) -> std::io::Result<()> {
        self.call(|seq| link_up_msg(ifindex, seq))
    }

    pub fn add_address(&mut self, ifindex: i32, address: Ipv4Addr, prefix_len: u8) -> std::io::Result<()> {
        self.call(|seq| add_addr_msg(ifindex, address, prefix_len, seq))
    }

    pub fn add_default_route(&mut self, ifindex: i32, gateway: Ipv4Addr) -> std::io::Result<()> {
        self.call(|seq| default_route_msg(ifindex, gateway, seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_consistent_lengths_and_attributes() {
        let m = link_up_msg(3, 9);
        assert_eq!(m.len(), 32);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 32);
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_NEWLINK);
        assert_eq!(i32::from_ne_bytes(m[20..24].try_into().unwrap()), 3);

        let a = add_addr_msg(2, Ipv4Addr::new(10, 99, 0, 150), 24, 1);
        assert_eq!(u32::from_ne_bytes(a[0..4].try_into().unwrap()) as usize, a.len());
        assert_eq!(a[17], 24, "prefix length");
        // three 8-byte attributes after the 8-byte ifaddrmsg
        assert_eq!(a.len(), 16 + 8 + 3 * 8);
        assert_eq!(&a[44..48], &[10, 99, 0, 255], "broadcast");

        let r = default_route_msg(2, Ipv4Addr::new(10, 99, 0, 1), 1);
        assert_eq!(r.len(), 16 + 12 + 8 + 8);
        assert_eq!(&r[32..36], &[10, 99, 0, 1]);
    }

    #[test]
    fn acks_and_errors() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&5u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&(-libc::EEXIST).to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]);
        assert_eq!(parse_ack(&ack, 5), Some(libc::EEXIST));
        assert_eq!(parse_ack(&ack, 6), None);
        ack[16..20].copy_from_slice(&0i32.to_ne_bytes());
        assert_eq!(parse_ack(&ack, 5), Some(0));
        // Found by the `netlink_ack` fuzz target: an error field of i32::MIN has no negation
        // (a panic in builds with overflow checks); it is an error all the same.
        ack[16..20].copy_from_slice(&i32::MIN.to_ne_bytes());
        assert_eq!(parse_ack(&ack, 5), Some(i32::MAX));
    }

    /// Real netlink in a private network namespace (needs root; skipped otherwise).
    #[test]
    fn configures_loopback_in_a_private_namespace() {
        if !metal_testkit::require(metal_testkit::is_root(), "needs root") {
            return;
        }
        let h = std::thread::spawn(|| {
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
            let ok = std::process::Command::new("ip")
                .args(["link", "add", "mh0", "type", "veth", "peer", "name", "mh1"])
                .status()
                .expect("ip")
                .success();
            assert!(ok, "ip link add veth");
            let index = unsafe { libc::if_nametoindex(c"mh0".as_ptr()) } as i32;
            let mut nl = Netlink::open().unwrap();
            nl.link_up(1).unwrap();
            nl.link_up(index).unwrap();
            nl.add_address(index, Ipv4Addr::new(10, 77, 0, 2), 24).unwrap();
            nl.add_address(index, Ipv4Addr::new(10, 77, 0, 2), 24).unwrap(); // replace: idempotent
            nl.add_default_route(index, Ipv4Addr::new(10, 77, 0, 1)).unwrap();
            let routes = std::process::Command::new("ip").args(["-4", "route", "show", "default"]).output().unwrap();
            let sock = std::net::UdpSocket::bind("10.77.0.2:0").unwrap();
            (sock.local_addr().unwrap(), String::from_utf8_lossy(&routes.stdout).into_owned())
        });
        let (addr, routes) = h.join().unwrap();
        assert!(routes.contains("default via 10.77.0.1 dev mh0"), "{routes}");
        assert_eq!(addr.ip(), std::net::IpAddr::V4(Ipv4Addr::new(10, 77, 0, 2)));
    }
}
