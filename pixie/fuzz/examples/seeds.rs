//! Writes the seed corpus (`corpus/<target>/`) from the packets pixie's unit tests use:
//! `cargo run --example seeds` in this folder. The files are checked in; run it again only
//! when a seed should be added.

use std::net::Ipv4Addr;
use std::path::Path;

use dhcproto::v4::{self, fqdn, relay, DhcpOption, Flags, Message, MessageType, Opcode};
use dhcproto::{Encodable, Encoder, Name};
use pixie::tftp::codec::{encode, Packet, Rq};

fn client(ty: MessageType, mac: [u8; 6]) -> Message {
    let z = Ipv4Addr::UNSPECIFIED;
    let mut m = Message::new_with_id(0x1234_5678, z, z, z, z, &mac);
    m.set_opcode(Opcode::BootRequest);
    m.set_flags(Flags::default().set_broadcast());
    m.opts_mut().insert(DhcpOption::MessageType(ty));
    m
}

fn bytes(m: &Message) -> Vec<u8> {
    let mut buf = Vec::new();
    m.encode(&mut Encoder::new(&mut buf)).expect("seed encodes");
    buf
}

fn guid() -> Vec<u8> {
    let mut g = vec![0u8];
    g.extend_from_slice(&uuid::Uuid::parse_str("6b1f2c3d-0102-4304-8506-0708090a0b0c").unwrap().to_bytes_le());
    g
}

fn write(dir: &Path, name: &str, data: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), data).unwrap();
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    let dhcp = root.join("dhcp_roundtrip");
    // iPXE's DISCOVER: PXEClient, arch 0, user class iPXE, machine id.
    let mut m = client(MessageType::Discover, mac);
    m.opts_mut().insert(DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()));
    m.opts_mut().insert(DhcpOption::ClientSystemArchitecture(0u16.into()));
    m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
    m.opts_mut().insert(DhcpOption::ClientMachineIdentifier(guid()));
    write(&dhcp, "ipxe-discover", &bytes(&m));
    // OVMF's PXE REQUEST: UEFI x64, network interface id, requested address and server id.
    let mut m = client(MessageType::Request, mac);
    m.opts_mut().insert(DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007:UNDI:003016".to_vec()));
    m.opts_mut().insert(DhcpOption::ClientSystemArchitecture(7u16.into()));
    m.opts_mut().insert(DhcpOption::ClientNetworkInterface(1, 3, 16));
    m.opts_mut().insert(DhcpOption::ClientMachineIdentifier(guid()));
    m.opts_mut().insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 99, 0, 150)));
    m.opts_mut().insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 99, 0, 1)));
    m.opts_mut().insert(DhcpOption::MaxMessageSize(1472));
    write(&dhcp, "uefi-pxe-request", &bytes(&m));
    // UEFI HTTP boot through a relay (giaddr, option 82).
    let mut m = client(MessageType::Discover, [2, 0, 0, 0, 0, 1]);
    m.set_giaddr(Ipv4Addr::new(10, 98, 0, 1));
    m.opts_mut().insert(DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016:UNDI:003001".to_vec()));
    m.opts_mut().insert(DhcpOption::ClientSystemArchitecture(16u16.into()));
    let mut r = relay::RelayAgentInformation::default();
    r.insert(relay::RelayInfo::AgentCircuitId(b"eth0:7".to_vec()));
    r.insert(relay::RelayInfo::AgentRemoteId(b"leaf-01".to_vec()));
    m.opts_mut().insert(DhcpOption::RelayAgentInformation(r));
    write(&dhcp, "http-boot-relayed-discover", &bytes(&m));
    // An installed OS renewing: ciaddr, hostname, client id, FQDN in wire form (E flag), rapid commit.
    let mut m = client(MessageType::Request, [2, 0, 0, 0, 0, 2]);
    m.set_ciaddr(Ipv4Addr::new(10, 99, 0, 151));
    m.set_flags(Flags::default());
    m.opts_mut().insert(DhcpOption::Hostname("machine-1".into()));
    m.opts_mut().insert(DhcpOption::ClientIdentifier(vec![1, 2, 0, 0, 0, 0, 2]));
    let name = Name::from_ascii("machine-1.lab.example.").unwrap();
    m.opts_mut().insert(DhcpOption::ClientFQDN(fqdn::ClientFQDN::new(fqdn::FqdnFlags::default().set_e(true).set_s(true), name)));
    m.opts_mut().insert(DhcpOption::ParameterRequestList(vec![v4::OptionCode::SubnetMask, v4::OptionCode::Router, v4::OptionCode::DomainNameServer]));
    m.opts_mut().insert(DhcpOption::RapidCommit);
    write(&dhcp, "renew-with-fqdn", &bytes(&m));
    // RELEASE and an unknown message type.
    write(&dhcp, "release", &bytes(&client(MessageType::Release, mac)));
    write(&dhcp, "unknown-type", &bytes(&client(MessageType::Unknown(42), mac)));

    let tftp = root.join("tftp_roundtrip");
    let opts = |v: &[(&str, &str)]| v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect::<Vec<_>>();
    let packets = [
        ("rrq-undionly", Packet::Rrq(Rq { filename: "undionly.kpxe".into(), mode: "octet".into(), options: opts(&[("tsize", "0"), ("blksize", "1468")]) })),
        ("rrq-ipxe-efi-window", Packet::Rrq(Rq { filename: "ipxe.efi".into(), mode: "octet".into(), options: opts(&[("blksize", "1468"), ("windowsize", "4"), ("timeout", "1")]) })),
        ("wrq", Packet::Wrq(Rq { filename: "x".into(), mode: "netascii".into(), options: vec![] })),
        ("data", Packet::Data { block: 7, data: vec![1, 2, 3] }),
        ("ack", Packet::Ack { block: 0 }),
        ("error-option-refused", Packet::Error { code: 8, message: "User aborted the transfer".into() }),
        ("oack", Packet::Oack { options: opts(&[("blksize", "1468"), ("tsize", "1048576")]) }),
    ];
    for (name, p) in packets {
        write(&tftp, name, &encode(&p));
    }
    println!("seeds written to {}", root.display());
}
