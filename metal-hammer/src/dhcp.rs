//! A small DHCPv4 client: pure packet building and parsing (dhcproto), and one exchange
//! (DISCOVER → OFFER → REQUEST → ACK) over a UDP socket bound to one interface.
//!
//! The client sets the broadcast flag, so servers answer to 255.255.255.255 and the reply
//! reaches a socket on an interface that has no address yet. It identifies itself with the
//! vendor class `metal-hammer` (option 60) and the machine UUID (option 97), which pixie uses.
//!
//! The provisioning network is hostile, so a reply is checked before `dhcproto` decodes it
//! ([`parse_reply`] never panics, whatever the bytes): a BOOTREPLY for Ethernet (`htype` 1,
//! `hlen` 6; `dhcproto` slices `chaddr` by `hlen`), the magic cookie, and every option inside
//! the packet with the length `dhcproto` assumes for it. Whose reply counts is [`accepts`]: an
//! OFFER from any server, but an ACK or NAK only from the server whose offer was taken or whose
//! lease is being renewed (option 54); replies from others are ignored, so another server's NAK
//! cannot take the lease away. (Option 54 is not authentication: a host that forges it is not
//! kept out.)

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use dhcproto::v4::{self, DhcpOption, Flags, Message, MessageType, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

pub const VENDOR_CLASS: &str = "metal-hammer";

/// What the client needs to configure an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub server: Ipv4Addr,
    pub lease_seconds: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    #[error("DHCP socket on {interface}")]
    Socket { interface: String, source: std::io::Error },
    #[error("no DHCP offer on {0}")]
    NoOffer(String),
    #[error("no DHCP acknowledgement on {0}")]
    NoAck(String),
    #[error("DHCP server {server} refused the address on {interface} (NAK)")]
    Nak { interface: String, server: Ipv4Addr },
    #[error("cannot encode DHCP packet: {0}")]
    Encode(String),
}

/// Option 97: type 0 followed by the 16 UUID bytes (RFC 4578).
pub fn client_machine_id(uuid: &uuid::Uuid) -> Vec<u8> {
    let mut v = vec![0u8];
    v.extend_from_slice(uuid.as_bytes());
    v
}

fn base(mac: [u8; 6], xid: u32, uuid: &uuid::Uuid, kind: MessageType) -> Message {
    let mut m = Message::new_with_id(
        xid,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    m.set_flags(Flags::default().set_broadcast());
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(&mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    opts.insert(DhcpOption::ClassIdentifier(VENDOR_CLASS.as_bytes().to_vec()));
    opts.insert(DhcpOption::ClientMachineIdentifier(client_machine_id(uuid)));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::DomainNameServer,
        OptionCode::DomainName,
        OptionCode::AddressLeaseTime,
        OptionCode::ServerIdentifier,
    ]));
    opts.insert(DhcpOption::MaxMessageSize(1500));
    m
}

fn encode(m: &Message) -> Result<Vec<u8>, DhcpError> {
    let mut buf = Vec::with_capacity(576);
    m.encode(&mut Encoder::new(&mut buf)).map_err(|e| DhcpError::Encode(e.to_string()))?;
    Ok(buf)
}

pub fn build_discover(mac: [u8; 6], xid: u32, uuid: &uuid::Uuid) -> Result<Vec<u8>, DhcpError> {
    encode(&base(mac, xid, uuid, MessageType::Discover))
}

pub fn build_request(mac: [u8; 6], xid: u32, uuid: &uuid::Uuid, offer: &Lease) -> Result<Vec<u8>, DhcpError> {
    let mut m = base(mac, xid, uuid, MessageType::Request);
    m.opts_mut().insert(DhcpOption::RequestedIpAddress(offer.address));
    m.opts_mut().insert(DhcpOption::ServerIdentifier(offer.server));
    encode(&m)
}

/// A renewing REQUEST (RFC 2131 4.3.2): `ciaddr` is our address, no requested-address or
/// server-id option. Sent as a broadcast; only the server that gave the lease is listened to
/// ([`accepts`]). When it stays silent until the lease ran out, the client starts over with
/// DISCOVER (`net::keep_lease`).
pub fn build_renew(mac: [u8; 6], xid: u32, uuid: &uuid::Uuid, address: Ipv4Addr) -> Result<Vec<u8>, DhcpError> {
    let mut m = base(mac, xid, uuid, MessageType::Request);
    m.set_ciaddr(address);
    encode(&m)
}

/// The fixed BOOTP header (236 bytes) and the magic cookie.
const HEADER_LEN: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];

/// Why [`check_reply`] refuses a packet (it is dropped; the names are for tests and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Short,
    NotReply,
    NotEthernet,
    NoMagic,
    /// An option that runs past the end of the packet.
    Truncated(u8),
    /// An option whose length is not the one `dhcproto` decodes it with, or a fixed-size
    /// option that is repeated (`dhcproto` would join the two, RFC 3396).
    BadLength(u8),
}

/// Options `dhcproto` decodes with a fixed length, and that length.
fn fixed_len(code: u8) -> Option<u8> {
    match code {
        80 => Some(0),
        53 | 46 | 52 | 116 | 156 | 157 => Some(1),
        94 => Some(3),
        1 | 2 | 16 | 28 | 32 | 50 | 51 | 54 | 58 | 59 | 118 | 150 | 152..=155 => Some(4),
        _ => None,
    }
}

/// Options `dhcproto` reads a minimum from (it subtracts that from the length).
fn min_len(code: u8) -> u8 {
    match code {
        81 => 3,
        93 => 2,
        151 => 1,
        _ => 0,
    }
}

/// The structural check in front of `dhcproto`'s decoder: a BOOTREPLY from Ethernet hardware
/// (`htype` 1, `hlen` 6), the magic cookie, and an option area in which every option fits and
/// has a length `dhcproto` can take without panicking. Reads only the raw bytes.
pub fn check_reply(bytes: &[u8]) -> Result<(), Refused> {
    if bytes.len() < HEADER_LEN {
        return Err(Refused::Short);
    }
    if bytes[0] != 2 {
        return Err(Refused::NotReply);
    }
    if bytes[1] != 1 || bytes[2] != 6 {
        return Err(Refused::NotEthernet);
    }
    if bytes[236..240] != MAGIC {
        return Err(Refused::NoMagic);
    }
    let mut opts = &bytes[HEADER_LEN..];
    let mut prev = None;
    while let Some((&code, rest)) = opts.split_first() {
        match code {
            0 => {
                prev = None;
                opts = rest;
                continue;
            }
            255 => break,
            _ => {}
        }
        let (&len, rest) = rest.split_first().ok_or(Refused::Truncated(code))?;
        let body = rest.get(..usize::from(len)).ok_or(Refused::Truncated(code))?;
        let fixed = fixed_len(code);
        if fixed.is_some_and(|f| f != len) || len < min_len(code) || (fixed.is_some() && prev == Some(code)) {
            return Err(Refused::BadLength(code));
        }
        prev = Some(code);
        opts = &rest[body.len()..];
    }
    Ok(())
}

/// Parses a server reply meant for us (`xid` and `chaddr` match): its type and lease. `None`
/// for anything else, including any malformed packet ([`check_reply`]); never panics.
pub fn parse_reply(bytes: &[u8], xid: u32, mac: [u8; 6]) -> Option<(MessageType, Lease)> {
    check_reply(bytes).ok()?;
    let m = Message::decode(&mut Decoder::new(bytes)).ok()?;
    if m.opcode() != v4::Opcode::BootReply || m.xid() != xid || m.chaddr() != mac {
        return None;
    }
    let opts = m.opts();
    let kind = opts.msg_type()?;
    let mask = match opts.get(OptionCode::SubnetMask) {
        Some(DhcpOption::SubnetMask(mask)) => *mask,
        _ => Ipv4Addr::new(255, 255, 255, 0),
    };
    let router = match opts.get(OptionCode::Router) {
        Some(DhcpOption::Router(r)) => r.first().copied(),
        _ => None,
    };
    let dns = match opts.get(OptionCode::DomainNameServer) {
        Some(DhcpOption::DomainNameServer(d)) => d.clone(),
        _ => Vec::new(),
    };
    let domain = match opts.get(OptionCode::DomainName) {
        Some(DhcpOption::DomainName(d)) => Some(d.clone()),
        _ => None,
    };
    let server = match opts.get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(s)) => *s,
        _ => m.siaddr(),
    };
    let lease_seconds = match opts.get(OptionCode::AddressLeaseTime) {
        Some(DhcpOption::AddressLeaseTime(t)) => *t,
        _ => 3600,
    };
    let lease =
        Lease { address: m.yiaddr(), prefix_len: u32::from(mask).count_ones() as u8, router, dns, domain, server, lease_seconds };
    Some((kind, lease))
}

/// A UDP socket on port 68 of one interface that may send broadcasts.
fn client_socket(interface: &str) -> std::io::Result<UdpSocket> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2), checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own from here on.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let set = |level, name, ptr: *const libc::c_void, len: usize| {
        // SAFETY: ptr points to `len` valid bytes for the duration of the call.
        let rc = unsafe { libc::setsockopt(fd, level, name, ptr, len as libc::socklen_t) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    let one_ptr = (&one as *const libc::c_int).cast();
    set(libc::SOL_SOCKET, libc::SO_REUSEADDR, one_ptr, std::mem::size_of::<libc::c_int>())?;
    set(libc::SOL_SOCKET, libc::SO_BROADCAST, one_ptr, std::mem::size_of::<libc::c_int>())?;
    set(libc::SOL_SOCKET, libc::SO_BINDTODEVICE, interface.as_ptr().cast(), interface.len())?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4::CLIENT_PORT.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: addr is a valid sockaddr_in of the given length.
    let rc = unsafe {
        libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

/// What the client waits for in one exchange, and from whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// DISCOVER sent: an OFFER, from any server.
    Offer,
    /// REQUEST sent for the offer of this server, or to renew a lease it gave: its ACK or NAK.
    AckFrom(Ipv4Addr),
}

/// Whether a parsed reply ends the wait: an OFFER from anyone while discovering (a NAK
/// means nothing then); an ACK or NAK only from the server we wait for, named by its server
/// identifier (option 54; `siaddr` when a server leaves it out, see [`parse_reply`]).
pub fn accepts(waiting: Waiting, kind: MessageType, lease: &Lease) -> bool {
    match waiting {
        Waiting::Offer => kind == MessageType::Offer,
        Waiting::AckFrom(server) => matches!(kind, MessageType::Ack | MessageType::Nak) && lease.server == server,
    }
}

/// Sends `packet` every second until a reply that [`accepts`] takes comes or `timeout`
/// passes. Other replies are logged and ignored.
fn exchange(
    sock: &UdpSocket,
    packet: &[u8],
    xid: u32,
    mac: [u8; 6],
    waiting: Waiting,
    timeout: Duration,
) -> std::io::Result<Option<(MessageType, Lease)>> {
    let dest = SocketAddrV4::new(Ipv4Addr::BROADCAST, v4::SERVER_PORT);
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
    let mut logged = false;
    while Instant::now() < deadline {
        sock.send_to(packet, dest)?;
        let resend = (Instant::now() + Duration::from_secs(1)).min(deadline);
        loop {
            let left = resend.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left))?;
            match sock.recv_from(&mut buf) {
                Ok((n, _)) => {
                    if let Some((kind, lease)) = parse_reply(&buf[..n], xid, mac) {
                        if accepts(waiting, kind, &lease) {
                            return Ok(Some((kind, lease)));
                        }
                        // Once per exchange: a flood of foreign replies must not flood the console.
                        if kind != MessageType::Offer && !logged {
                            logged = true;
                            crate::log!("DHCP: ignoring a {kind:?} from {} while waiting for {waiting:?}", lease.server);
                        }
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(None)
}

/// One DISCOVER/OFFER/REQUEST/ACK on `interface`, waiting at most `timeout` for each answer.
pub fn obtain_lease(interface: &str, mac: [u8; 6], uuid: &uuid::Uuid, timeout: Duration) -> Result<Lease, DhcpError> {
    let sock_err = |source| DhcpError::Socket { interface: interface.to_string(), source };
    let sock = client_socket(interface).map_err(sock_err)?;
    let xid: u32 = rand_xid(mac);
    let discover = build_discover(mac, xid, uuid)?;
    let offer = match exchange(&sock, &discover, xid, mac, Waiting::Offer, timeout).map_err(sock_err)? {
        Some((MessageType::Offer, lease)) => lease,
        _ => return Err(DhcpError::NoOffer(interface.to_string())),
    };
    let request = build_request(mac, xid, uuid, &offer)?;
    match exchange(&sock, &request, xid, mac, Waiting::AckFrom(offer.server), timeout).map_err(sock_err)? {
        Some((MessageType::Ack, mut lease)) => {
            if lease.address.is_unspecified() {
                lease.address = offer.address;
            }
            Ok(lease)
        }
        Some((_, _)) => Err(DhcpError::Nak { interface: interface.to_string(), server: offer.server }),
        None => Err(DhcpError::NoAck(interface.to_string())),
    }
}

/// Renews `lease` on `interface`: the new lease on an ACK from the server that gave it, an
/// error on its NAK or on silence (replies from other servers are ignored).
pub fn renew_lease(
    interface: &str,
    mac: [u8; 6],
    uuid: &uuid::Uuid,
    lease: &Lease,
    timeout: Duration,
) -> Result<Lease, DhcpError> {
    let sock_err = |source| DhcpError::Socket { interface: interface.to_string(), source };
    let sock = client_socket(interface).map_err(sock_err)?;
    let xid = rand_xid(mac);
    let packet = build_renew(mac, xid, uuid, lease.address)?;
    match exchange(&sock, &packet, xid, mac, Waiting::AckFrom(lease.server), timeout).map_err(sock_err)? {
        Some((MessageType::Ack, mut new)) => {
            if new.address.is_unspecified() {
                new.address = lease.address;
            }
            Ok(new)
        }
        Some(_) => Err(DhcpError::Nak { interface: interface.to_string(), server: lease.server }),
        None => Err(DhcpError::NoAck(interface.to_string())),
    }
}

/// A transaction id that differs per interface and per attempt.
fn rand_xid(mac: [u8; 6]) -> u32 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let m = u32::from_be_bytes([mac[2], mac[3], mac[4], mac[5]]);
    m ^ t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(16)
}

/// `52:54:00:ab:cd:ef` → bytes.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = s.split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().ok()?;
    parts.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];

    fn uuid() -> uuid::Uuid {
        "6b1f2c3d-0000-4000-8000-00000000000a".parse().unwrap()
    }

    #[test]
    fn discover_carries_vendor_class_uuid_and_broadcast_flag() {
        let bytes = build_discover(MAC, 0x1234_5678, &uuid()).unwrap();
        let m = Message::decode(&mut Decoder::new(&bytes)).unwrap();
        assert_eq!(m.xid(), 0x1234_5678);
        assert!(m.flags().broadcast());
        assert_eq!(&m.chaddr()[..6], &MAC);
        assert_eq!(m.opts().msg_type(), Some(MessageType::Discover));
        assert_eq!(m.opts().get(OptionCode::ClassIdentifier), Some(&DhcpOption::ClassIdentifier(b"metal-hammer".to_vec())));
        match m.opts().get(OptionCode::ClientMachineIdentifier) {
            Some(DhcpOption::ClientMachineIdentifier(v)) => {
                assert_eq!(v.len(), 17);
                assert_eq!(v[0], 0);
                assert_eq!(&v[1..], uuid().as_bytes());
            }
            other => panic!("option 97: {other:?}"),
        }
    }

    fn server_reply(kind: MessageType, xid: u32, mac: [u8; 6]) -> Vec<u8> {
        let mut m = Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(10, 99, 0, 150),
            Ipv4Addr::new(10, 99, 0, 1),
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.set_opcode(v4::Opcode::BootReply);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        o.insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 99, 0, 1)]));
        o.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::new(10, 99, 0, 2)]));
        o.insert(DhcpOption::DomainName("lab.example".into()));
        o.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 99, 0, 1)));
        o.insert(DhcpOption::AddressLeaseTime(600));
        encode(&m).unwrap()
    }

    #[test]
    fn parses_an_offer_and_builds_the_matching_request() {
        let (kind, lease) = parse_reply(&server_reply(MessageType::Offer, 7, MAC), 7, MAC).unwrap();
        assert_eq!(kind, MessageType::Offer);
        assert_eq!(
            lease,
            Lease {
                address: Ipv4Addr::new(10, 99, 0, 150),
                prefix_len: 24,
                router: Some(Ipv4Addr::new(10, 99, 0, 1)),
                dns: vec![Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::new(10, 99, 0, 2)],
                domain: Some("lab.example".into()),
                server: Ipv4Addr::new(10, 99, 0, 1),
                lease_seconds: 600,
            }
        );
        let req = Message::decode(&mut Decoder::new(&build_request(MAC, 7, &uuid(), &lease).unwrap())).unwrap();
        assert_eq!(req.opts().msg_type(), Some(MessageType::Request));
        assert_eq!(req.opts().get(OptionCode::RequestedIpAddress), Some(&DhcpOption::RequestedIpAddress(lease.address)));
        assert_eq!(req.opts().get(OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(lease.server)));
    }

    #[test]
    fn renew_fills_ciaddr_and_omits_server_id() {
        let bytes = build_renew(MAC, 9, &uuid(), Ipv4Addr::new(10, 99, 0, 150)).unwrap();
        let m = Message::decode(&mut Decoder::new(&bytes)).unwrap();
        assert_eq!(m.opts().msg_type(), Some(MessageType::Request));
        assert_eq!(m.ciaddr(), Ipv4Addr::new(10, 99, 0, 150));
        assert!(m.opts().get(OptionCode::ServerIdentifier).is_none());
        assert!(m.opts().get(OptionCode::RequestedIpAddress).is_none());
        assert!(m.opts().get(OptionCode::ClassIdentifier).is_some());
    }

    #[test]
    fn ignores_replies_for_others_and_garbage() {
        assert!(parse_reply(&server_reply(MessageType::Offer, 7, MAC), 8, MAC).is_none(), "other xid");
        assert!(parse_reply(&server_reply(MessageType::Offer, 7, [1, 2, 3, 4, 5, 6]), 7, MAC).is_none(), "other mac");
        assert!(parse_reply(&build_discover(MAC, 7, &uuid()).unwrap(), 7, MAC).is_none(), "a request, not a reply");
        assert!(parse_reply(&[0u8; 20], 7, MAC).is_none());
        assert_eq!(parse_mac("52:54:00:AB:cd:ef"), Some(MAC));
        assert_eq!(parse_mac("52:54:00"), None);
    }

    #[test]
    fn a_hardware_address_length_other_than_ethernet_is_refused_without_panicking() {
        let good = server_reply(MessageType::Ack, 7, MAC);
        assert!(parse_reply(&good, 7, MAC).is_some());
        for hlen in (0..=255u8).filter(|&h| h != 6) {
            let mut bad = good.clone();
            bad[2] = hlen;
            assert!(parse_reply(&bad, 7, MAC).is_none(), "hlen {hlen}");
        }
        for htype in (0..=255u8).filter(|&t| t != 1) {
            let mut bad = good.clone();
            bad[1] = htype;
            assert!(parse_reply(&bad, 7, MAC).is_none(), "htype {htype}");
        }
    }

    #[test]
    fn option_lengths_that_dhcproto_trusts_are_refused_without_panicking() {
        // Option 81 (client FQDN) of length 1 and option 151 (status code) of length 0: dhcproto
        // computes `len - 3` / `len - 1` on them; 80 (rapid commit) must be empty; 53 and 54
        // repeated would be joined into an invalid length.
        for opt in [
            &[81u8, 1, 0][..],
            &[151, 0],
            &[80, 1, 0],
            &[94, 1, 1],
            &[152, 1, 0],
            &[53, 1, 5, 53, 1, 5],
            &[54, 4, 10, 99, 0, 1, 54, 4, 10, 99, 0, 1],
        ] {
            let mut bytes = server_reply(MessageType::Ack, 7, MAC);
            let end = bytes.iter().rposition(|&b| b == 255).unwrap();
            bytes.splice(end..end, opt.iter().copied());
            assert!(parse_reply(&bytes, 7, MAC).is_none(), "{opt:?}");
        }
    }

    fn lease_from(server: [u8; 4]) -> Lease {
        Lease {
            address: Ipv4Addr::new(10, 99, 0, 150),
            prefix_len: 24,
            router: None,
            dns: vec![],
            domain: None,
            server: server.into(),
            lease_seconds: 600,
        }
    }

    #[test]
    fn only_the_server_of_the_offer_or_lease_may_ack_or_nak() {
        let ours = Waiting::AckFrom(Ipv4Addr::new(10, 99, 0, 1));
        assert!(accepts(ours, MessageType::Ack, &lease_from([10, 99, 0, 1])));
        assert!(accepts(ours, MessageType::Nak, &lease_from([10, 99, 0, 1])));
        assert!(!accepts(ours, MessageType::Nak, &lease_from([10, 99, 0, 66])), "a NAK from another server");
        assert!(!accepts(ours, MessageType::Ack, &lease_from([10, 99, 0, 66])), "an ACK from another server");
        assert!(!accepts(ours, MessageType::Offer, &lease_from([10, 99, 0, 1])));
    }

    #[test]
    fn offers_come_from_anyone_and_a_nak_does_not_end_the_discover() {
        assert!(accepts(Waiting::Offer, MessageType::Offer, &lease_from([10, 99, 0, 1])));
        assert!(accepts(Waiting::Offer, MessageType::Offer, &lease_from([10, 99, 0, 66])));
        assert!(!accepts(Waiting::Offer, MessageType::Nak, &lease_from([10, 99, 0, 66])));
        assert!(!accepts(Waiting::Offer, MessageType::Ack, &lease_from([10, 99, 0, 1])));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn parse_reply_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..700), xid in proptest::prelude::any::<u32>()) {
            let _ = parse_reply(&bytes, xid, MAC);
        }

        /// A valid header followed by any option area, with the message type and our server
        /// id up front so `dhcproto` decodes every option that follows.
        #[test]
        fn parse_reply_never_panics_on_arbitrary_options(
            tlvs in proptest::collection::vec((proptest::prelude::any::<u8>(), proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20)), 0..12),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..16),
        ) {
            let mut bytes = server_reply(MessageType::Ack, 7, MAC)[..HEADER_LEN].to_vec();
            bytes.extend_from_slice(&[53, 1, 5, 54, 4, 10, 99, 0, 1]);
            for (code, body) in tlvs {
                bytes.push(code);
                bytes.push(body.len() as u8);
                bytes.extend_from_slice(&body);
            }
            bytes.extend_from_slice(&tail);
            let _ = parse_reply(&bytes, 7, MAC);
        }

        /// A valid reply with bytes flipped, inserted into or cut out of the header and the
        /// options: never a panic, and anything accepted is a reply for us.
        #[test]
        fn parse_reply_never_panics_on_mutated_replies(
            kind in proptest::sample::select(vec![MessageType::Offer, MessageType::Ack, MessageType::Nak]),
            edits in proptest::collection::vec((proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>(), 0u8..3), 1..12),
        ) {
            let mut bytes = server_reply(kind, 7, MAC);
            for (at, byte, op) in edits {
                let i = at.index(bytes.len());
                match op {
                    0 => bytes[i] = byte,
                    1 => bytes.insert(i, byte),
                    _ => { bytes.remove(i); }
                }
                if bytes.is_empty() {
                    break;
                }
            }
            if parse_reply(&bytes, 7, MAC).is_some() {
                proptest::prop_assert_eq!(bytes[0], 2);
                proptest::prop_assert_eq!(&bytes[28..34], &MAC[..]);
            }
        }
    }
}
