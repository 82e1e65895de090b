//! Writes the seed corpus (`corpus/<target>/`) from the packets, frames and values
//! metal-hammer's unit tests use: `cargo run --example seeds` in this folder. The files are
//! checked in; run it again only when a seed should be added.

use std::net::Ipv4Addr;
use std::path::Path;

use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode};
use dhcproto::{Encodable, Encoder};
use metal_hammer::lldp::{ETHERTYPE_LLDP, LLDP_MULTICAST};
use metal_hammer::netlink::{add_addr_msg, link_up_msg};

/// EEXIST, as the kernel answers an RTM_NEWADDR for an address that is there already.
const EEXIST: i32 = 17;
const MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];

fn write(root: &Path, target: &str, name: &str, data: &[u8]) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn server_reply(kind: MessageType, xid: u32, full: bool) -> Vec<u8> {
    let mut m = Message::new_with_id(xid, Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(10, 99, 0, 150), Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::UNSPECIFIED, &MAC);
    m.set_opcode(Opcode::BootReply);
    let o = m.opts_mut();
    o.insert(DhcpOption::MessageType(kind));
    if full {
        o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        o.insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 99, 0, 1)]));
        o.insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(10, 99, 0, 1), Ipv4Addr::new(10, 99, 0, 2)]));
        o.insert(DhcpOption::DomainName("lab.example".into()));
        o.insert(DhcpOption::AddressLeaseTime(600));
    }
    o.insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 99, 0, 1)));
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).unwrap();
    buf
}

fn tlv(t: u8, value: &[u8]) -> Vec<u8> {
    let mut v = ((u16::from(t) << 9) | value.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(value);
    v
}

fn lldp(tlvs: &[Vec<u8>]) -> Vec<u8> {
    let mut f = LLDP_MULTICAST.to_vec();
    f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f.extend_from_slice(&ETHERTYPE_LLDP.to_be_bytes());
    for t in tlvs {
        f.extend_from_slice(t);
    }
    f
}

fn ack(seq: u32, errno: i32) -> Vec<u8> {
    let mut a = Vec::new();
    a.extend_from_slice(&36u32.to_ne_bytes());
    a.extend_from_slice(&2u16.to_ne_bytes());
    a.extend_from_slice(&0u16.to_ne_bytes());
    a.extend_from_slice(&seq.to_ne_bytes());
    a.extend_from_slice(&0u32.to_ne_bytes());
    a.extend_from_slice(&(-errno).to_ne_bytes());
    a.extend_from_slice(&[0u8; 16]);
    a
}

fn sized_frame(data: &[u8]) -> Vec<u8> {
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true)).unwrap();
    c.compress(data).unwrap()
}

fn unsized_frame(data: &[u8]) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    e.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut e, data).unwrap();
    e.finish().unwrap()
}

fn skippable(data: &[u8]) -> Vec<u8> {
    let mut s = 0x184D_2A50u32.to_le_bytes().to_vec();
    s.extend_from_slice(&(data.len() as u32).to_le_bytes());
    s.extend_from_slice(data);
    s
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");

    write(&root, "dhcp_reply", "offer", &server_reply(MessageType::Offer, 7, true));
    write(&root, "dhcp_reply", "ack", &server_reply(MessageType::Ack, 0x1234_5678, true));
    write(&root, "dhcp_reply", "nak", &server_reply(MessageType::Nak, 9, false));

    let chassis_mac = tlv(1, &[4, 0x00, 0x1b, 0x21, 0xaa, 0xbb, 0xcc]);
    write(&root, "lldp_frame", "switch-port-name", &lldp(&[chassis_mac.clone(), tlv(2, b"\x05Eth1/7"), tlv(3, &[0, 120]), tlv(5, b"leaf-01.fra"), tlv(0, &[])]));
    write(&root, "lldp_frame", "port-mac", &lldp(&[chassis_mac, tlv(2, &[3, 1, 2, 3, 4, 5, 6]), tlv(3, &[0, 120]), tlv(0, &[])]));
    write(&root, "lldp_frame", "chassis-ipv4", &lldp(&[tlv(1, &[5, 1, 10, 0, 0, 1]), tlv(2, b"\x07swp1"), tlv(3, &[0, 120])]));

    // netlink_ack reads its first four bytes as the sequence number it looks for.
    let mut s = 5u32.to_ne_bytes().to_vec();
    s.extend_from_slice(&ack(5, EEXIST));
    write(&root, "netlink_ack", "eexist", &s);
    let mut s = 3u32.to_ne_bytes().to_vec();
    s.extend_from_slice(&link_up_msg(2, 3));
    s.extend_from_slice(&add_addr_msg(2, Ipv4Addr::new(10, 99, 0, 150), 24, 3));
    s.extend_from_slice(&ack(3, 0));
    write(&root, "netlink_ack", "requests-then-ack", &s);

    let lines = [
        ("pixie", "console=ttyS0 quiet metal.api=http://10.99.0.1:8080 metal.token=enr_abc123 metal.partition=lab metal.lldp=3 panic=10"),
        ("tunables", "metal.api=https://api.example/ metal.token=t metal.partition=p metal.reboot_delay_s=5 metal.dhcp_timeout_s=0 metal.register_timeout_s=30 metal.wait_timeout_s=999"),
        ("quotes", r#"a=1 b="x y" c root=UUID=0b1c quiet"#),
    ];
    for (name, line) in lines {
        write(&root, "cmdline", name, line.as_bytes());
    }

    let content: Vec<u8> = (0..600u32).map(|i| (i % 251) as u8).collect();
    let sized = sized_frame(&content);
    let tiny = sized_frame(b"hello");
    let streamed = unsized_frame(&content);
    let skip = skippable(b"metal");
    for (name, frame) in [("sized", &sized), ("single-segment", &tiny), ("unsized", &streamed), ("skippable", &skip)] {
        write(&root, "frame_header", name, &frame[..frame.len().min(18)]);
    }
    let mut two = sized.clone();
    two.extend_from_slice(&skip);
    two.extend_from_slice(&tiny);
    write(&root, "image_decode", "frames-and-skippable", &two);
    write(&root, "image_decode", "unsized", &streamed);
    write(&root, "image_decode", "content", b"image content, not compressed");

    let paths = [
        ("relative", "./etc/passwd"),
        ("absolute", "/etc/passwd"),
        ("root", "./"),
        ("parent-escape", "a/../../b"),
        ("kernel-link", "boot/vmlinuz"),
        ("through-links", "usr/lib/x/back/etc/abs/../vmlinuz"),
        ("loop", "ping/x"),
    ];
    for (name, p) in paths {
        write(&root, "tar_path", name, p.as_bytes());
    }
    println!("seeds written to {}", root.display());
}
