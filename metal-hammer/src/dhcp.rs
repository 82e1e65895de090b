//! A small DHCPv4 client: pure packet building and parsing (dhcproto), and one exchange
//! (DISCOVER → OFFER → REQUEST → ACK) over a UDP socket bound to one interface.
//!
//! The client sets the broadcast flag, so servers answer to 255.255.255.255 and the reply
//! reaches a socket on an interface that has no address yet. It identifies itself with the
//! vendor class `metal-hammer` (option 60) and the machine UUID (option 97), which pixie uses.

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
    let mut m = Message::new_with_id(xid, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &mac);
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
/// server-id option. Sent as a broadcast, so any server can answer (rebinding as well).
pub fn build_renew(mac: [u8; 6], xid: u32, uuid: &uuid::Uuid, address: Ipv4Addr) -> Result<Vec<u8>, DhcpError> {
    let mut m = base(mac, xid, uuid, MessageType::Request);
    m.set_ciaddr(address);
    encode(&m)
}

/// Parses a server reply meant for us (`xid` and `chaddr` match): its type and lease.
pub fn parse_reply(bytes: &[u8], xid: u32, mac: [u8; 6]) -> Option<(MessageType, Lease)> {
    let m = Message::decode(&mut Decoder::new(bytes)).ok()?;
    if m.opcode() != v4::Opcode::BootReply || m.xid() != xid || m.chaddr().get(..6) != Some(&mac[..]) {
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
    let lease = Lease {
        address: m.yiaddr(),
        prefix_len: u32::from(mask).count_ones() as u8,
        router,
        dns,
        domain,
        server,
        lease_seconds,
    };
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
    let rc = unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_in).cast(), std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

/// Sends `packet` every second until a reply of one of the `want` types (or a NAK) comes or
/// `timeout` passes.
fn exchange(sock: &UdpSocket, packet: &[u8], xid: u32, mac: [u8; 6], want: MessageType, timeout: Duration) -> std::io::Result<Option<(MessageType, Lease)>> {
    let dest = SocketAddrV4::new(Ipv4Addr::BROADCAST, v4::SERVER_PORT);
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 1500];
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
                        if kind == want || kind == MessageType::Nak {
                            return Ok(Some((kind, lease)));
                        }
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) => {}
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
    let offer = match exchange(&sock, &discover, xid, mac, MessageType::Offer, timeout).map_err(sock_err)? {
        Some((MessageType::Offer, lease)) => lease,
        _ => return Err(DhcpError::NoOffer(interface.to_string())),
    };
    let request = build_request(mac, xid, uuid, &offer)?;
    match exchange(&sock, &request, xid, mac, MessageType::Ack, timeout).map_err(sock_err)? {
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

/// Renews `lease` on `interface`: the new lease on ACK, an error on NAK or silence.
pub fn renew_lease(interface: &str, mac: [u8; 6], uuid: &uuid::Uuid, lease: &Lease, timeout: Duration) -> Result<Lease, DhcpError> {
    let sock_err = |source| DhcpError::Socket { interface: interface.to_string(), source };
    let sock = client_socket(interface).map_err(sock_err)?;
    let xid = rand_xid(mac);
    let packet = build_renew(mac, xid, uuid, lease.address)?;
    match exchange(&sock, &packet, xid, mac, MessageType::Ack, timeout).map_err(sock_err)? {
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
        let mut m = Message::new_with_id(xid, Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(10, 99, 0, 150), Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::UNSPECIFIED, &mac);
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
}
