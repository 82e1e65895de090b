//! DHCP server replies as metal-hammer's client reads them: nothing panics, a reply is taken
//! only for our transaction id and MAC, and a lease that parses is carried again, unchanged,
//! by a reply built from it.
#![no_main]

use std::net::Ipv4Addr;

use dhcproto::v4::{DhcpOption, Message, Opcode};
use dhcproto::{Encodable, Encoder};
use libfuzzer_sys::fuzz_target;
use metal_hammer::dhcp::{parse_reply, Lease};

/// A reply that says exactly `lease` (the mask from the prefix, the first router only).
fn reply_for(kind: dhcproto::v4::MessageType, lease: &Lease, xid: u32, mac: [u8; 6]) -> Vec<u8> {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(xid, z, lease.address, z, z, &mac);
    m.set_opcode(Opcode::BootReply);
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    let mask = if lease.prefix_len == 0 { 0 } else { u32::MAX << (32 - u32::from(lease.prefix_len)) };
    o.insert(DhcpOption::SubnetMask(Ipv4Addr::from(mask)));
    if let Some(r) = lease.router {
        o.insert(DhcpOption::Router(vec![r]));
    }
    if !lease.dns.is_empty() {
        o.insert(DhcpOption::DomainNameServer(lease.dns.clone()));
    }
    if let Some(d) = &lease.domain {
        o.insert(DhcpOption::DomainName(d.clone()));
    }
    o.insert(DhcpOption::ServerIdentifier(lease.server));
    o.insert(DhcpOption::AddressLeaseTime(lease.lease_seconds));
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).expect("a reply built from a lease encodes");
    buf
}

fuzz_target!(|data: &[u8]| {
    // The transaction id and MAC the packet itself carries, so the matching path is reached;
    // other ones for the packet's own bytes when it is too short to carry them.
    let xid = data.get(4..8).map_or(7, |b| u32::from_be_bytes(b.try_into().unwrap()));
    let mac: [u8; 6] = data.get(28..34).map_or([2, 0, 0, 0, 0, 1], |b| b.try_into().unwrap());
    let Some((kind, lease)) = parse_reply(data, xid, mac) else { return };
    assert!(parse_reply(data, xid ^ 1, mac).is_none(), "a reply for another transaction was taken");
    let mut other = mac;
    other[5] ^= 1;
    assert!(parse_reply(data, xid, other).is_none(), "a reply for another MAC was taken");
    assert!(lease.prefix_len <= 32, "prefix length {}", lease.prefix_len);

    // dhcproto leaves out empty options when encoding: an empty domain comes back as none.
    let mut expected = lease.clone();
    if expected.domain.as_deref() == Some("") {
        expected.domain = None;
    }
    let again = parse_reply(&reply_for(kind, &expected, xid, mac), xid, mac).expect("a reply built from a parsed lease parses");
    assert_eq!(again, (kind, expected), "the lease changed when carried again");
});
