//! DHCPv4: what to answer (pure: [`boot_choice`], [`decide`], [`build_reply`], [`destination`])
//! and the socket loop that only moves bytes ([`server`]).

pub mod leases;
pub mod limiter;
pub mod server;
pub mod wire;

use std::net::{Ipv4Addr, SocketAddrV4};

use dhcproto::v4::{self, DhcpOption, Message, Opcode, UnknownOption};
use metal_types::Arch;

use crate::config::{BootConfig, DhcpConfig, DhcpMode, Pool};
use leases::{LeaseTable, Record};
pub use wire::{MsgType, Request, VendorClass};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
/// The PXE boot server port (proxyDHCP requests after the client has an address).
pub const PXE_PORT: u16 = 4011;

/// The name pixie uses for an architecture in URLs and logs (the API's serde name).
pub fn arch_name(arch: Arch) -> &'static str {
    match arch {
        Arch::BiosX86 => "bios_x86",
        Arch::UefiX64 => "uefi_x64",
        Arch::UefiX64Http => "uefi_x64_http",
        Arch::UefiArm64 => "uefi_arm64",
        Arch::Unknown => "unknown",
    }
}

/// What the client should boot next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootChoice {
    /// No boot information (not a network-booting client, or nothing to offer it).
    None { why: String },
    /// Firmware PXE: a file from pixie's TFTP server.
    Tftp { server: Ipv4Addr, file: String, why: &'static str },
    /// UEFI HTTP boot: the URL of an EFI binary; option 60 `HTTPClient` is echoed.
    UefiHttp { url: String },
    /// iPXE: the URL of its per-machine script.
    IpxeScript { url: String },
}

impl BootChoice {
    pub fn file(&self) -> Option<&str> {
        match self {
            BootChoice::None { .. } => None,
            BootChoice::Tftp { file, .. } => Some(file),
            BootChoice::UefiHttp { url } | BootChoice::IpxeScript { url } => Some(url),
        }
    }

    pub fn is_some(&self) -> bool {
        !matches!(self, BootChoice::None { .. })
    }
}

/// Picks the boot file from option 60, 77 and 93.
pub fn boot_choice(req: &Request, boot: &BootConfig) -> BootChoice {
    if req.is_ipxe {
        let mut url = format!("{}?mac={}", boot.ipxe_script_url, req.mac);
        if let Some(u) = req.uuid {
            url.push_str(&format!("&uuid={u}"));
        }
        url.push_str(&format!("&arch={}", arch_name(req.arch)));
        return BootChoice::IpxeScript { url };
    }
    match req.vendor_class {
        VendorClass::None => {
            BootChoice::None { why: "not a PXE client (no option 60 PXEClient/HTTPClient, no iPXE user class)".into() }
        }
        VendorClass::HttpClient => BootChoice::UefiHttp { url: boot.uefi_http_url.clone() },
        VendorClass::PxeClient => {
            let tftp = |file: &str, why| BootChoice::Tftp { server: boot.tftp_server, file: file.to_string(), why };
            match req.arch_code {
                None => tftp(&boot.bios_file, "PXE client without option 93: legacy BIOS"),
                Some(0) => tftp(&boot.bios_file, "option 93 = 0: legacy BIOS"),
                Some(7) | Some(9) => tftp(&boot.uefi_file, "option 93 = 7/9: x86-64 UEFI"),
                Some(16) => tftp(&boot.uefi_file, "option 93 = 16 over PXE: x86-64 UEFI"),
                Some(11) => match &boot.uefi_arm64_file {
                    Some(f) => tftp(f, "option 93 = 11: ARM64 UEFI"),
                    None => BootChoice::None { why: "option 93 = 11 (ARM64 UEFI) but no dhcp.boot.uefi_arm64 file".into() },
                },
                Some(n) => BootChoice::None { why: format!("no boot file for option 93 = {n}") },
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyKind {
    Offer,
    Ack,
    Nak,
}

impl ReplyKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ReplyKind::Offer => "offer",
            ReplyKind::Ack => "ack",
            ReplyKind::Nak => "nak",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub kind: ReplyKind,
    /// `0.0.0.0` in proxy mode, for INFORM and NAK.
    pub yiaddr: Ipv4Addr,
    /// The pool whose options (mask, router, DNS, lease time) go into the reply.
    pub pool: Option<usize>,
    /// Whether lease-time options are sent (not for INFORM or proxy replies).
    pub lease: bool,
    pub boot: BootChoice,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nothing is sent back.
    Silent {
        why: String,
    },
    Reply(Reply),
}

impl Decision {
    fn silent(why: impl Into<String>) -> Decision {
        Decision::Silent { why: why.into() }
    }
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Silent { .. } => "silent",
            Decision::Reply(r) => r.kind.as_str(),
        }
    }
}

/// Which pool serves a client: by giaddr when relayed, else the one holding `server_ip`.
pub fn select_pool(req: &Request, cfg: &DhcpConfig) -> Option<usize> {
    let link = if req.giaddr.is_unspecified() { cfg.server_ip } else { req.giaddr };
    cfg.pools.iter().position(|p| p.contains(link))
}

/// Decides the answer to one message. The lease table is the only state; journal records for
/// what must be persisted before the reply goes out are returned alongside.
pub fn decide(req: &Request, port: u16, cfg: &DhcpConfig, table: &mut LeaseTable, now: u64) -> (Decision, Option<Record>) {
    match cfg.mode {
        DhcpMode::Proxy => (decide_proxy(req, port, cfg), None),
        DhcpMode::Server => decide_server(req, cfg, table, now),
    }
}

fn decide_proxy(req: &Request, port: u16, cfg: &DhcpConfig) -> Decision {
    if !req.is_pxe() {
        return Decision::silent("proxy mode: not a PXE client");
    }
    let boot = boot_choice(req, &cfg.boot);
    if !boot.is_some() {
        let BootChoice::None { why } = boot else { unreachable!() };
        return Decision::silent(format!("proxy mode: {why}"));
    }
    let reply = |kind, why: &str| {
        Decision::Reply(Reply {
            kind,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            pool: None,
            lease: false,
            boot: boot.clone(),
            why: why.into(),
        })
    };
    match (port, req.msg_type) {
        (PXE_PORT, MsgType::Request | MsgType::Inform) => reply(ReplyKind::Ack, "proxyDHCP boot server request (port 4011)"),
        (PXE_PORT, _) => Decision::silent("proxy mode: only REQUEST/INFORM on port 4011"),
        (_, MsgType::Discover) => reply(ReplyKind::Offer, "proxyDHCP offer: boot information only"),
        (_, MsgType::Request) if req.server_id == Some(cfg.server_ip) => {
            reply(ReplyKind::Ack, "proxyDHCP request addressed to pixie")
        }
        (_, MsgType::Inform) => reply(ReplyKind::Ack, "proxyDHCP inform"),
        (_, t) => Decision::silent(format!("proxy mode: {} is for the address server", t.as_str())),
    }
}

fn decide_server(req: &Request, cfg: &DhcpConfig, table: &mut LeaseTable, now: u64) -> (Decision, Option<Record>) {
    let Some(pool_idx) = select_pool(req, cfg) else {
        return (
            Decision::silent(format!(
                "no pool for link {}",
                if req.giaddr.is_unspecified() { cfg.server_ip } else { req.giaddr }
            )),
            None,
        );
    };
    let pool = &cfg.pools[pool_idx];
    let reservation = cfg.reservations.get(&req.mac).map(|r| r.ip).filter(|ip| pool.contains(*ip));
    let boot = boot_choice(req, &cfg.boot);
    let lease_s = pool.lease_time.as_secs();
    let reply = |kind, yiaddr, lease, why: String| {
        Decision::Reply(Reply { kind, yiaddr, pool: Some(pool_idx), lease, boot: boot.clone(), why })
    };
    let nak = |why: String| {
        Decision::Reply(Reply {
            kind: ReplyKind::Nak,
            yiaddr: Ipv4Addr::UNSPECIFIED,
            pool: Some(pool_idx),
            lease: false,
            boot: BootChoice::None { why: "NAK".into() },
            why,
        })
    };
    match req.msg_type {
        MsgType::Discover => match table.pick(pool, req.mac, reservation, req.requested_ip, now) {
            None if reservation.is_some() => (Decision::silent("reserved address is in use by another client"), None),
            None => (Decision::silent("pool exhausted"), None),
            Some(ip) => {
                table.offer(ip, req.mac, now);
                let why = if reservation == Some(ip) { "reservation" } else { "pool" };
                (reply(ReplyKind::Offer, ip, true, why.into()), None)
            }
        },
        MsgType::Request => {
            let ip = match (req.server_id, req.requested_ip, req.ciaddr) {
                (Some(sid), _, _) if sid != cfg.server_ip => {
                    table.forget_offer(req.mac);
                    return (Decision::silent(format!("client chose server {sid}")), None);
                }
                (Some(_), Some(ip), _) => ip,
                (Some(_), None, c) if !c.is_unspecified() => c,
                (None, _, c) if !c.is_unspecified() => c,
                (None, Some(ip), _) => ip,
                _ => return (Decision::silent("REQUEST without an address"), None),
            };
            if !pool.contains(ip) {
                return (nak(format!("{ip} is not on subnet {}/{}", pool.network, pool.prefix)), None);
            }
            if let Some(r) = reservation {
                if r != ip {
                    return (nak(format!("client has reservation {r}, asked for {ip}")), None);
                }
            } else if !pool.in_range(ip) {
                return (nak(format!("{ip} is outside the pool")), None);
            }
            if !table.available_for(ip, req.mac, now) {
                return (nak(format!("{ip} is leased to another client")), None);
            }
            let rec = table.bind(ip, req.mac, now + lease_s);
            (reply(ReplyKind::Ack, ip, true, "lease bound".into()), Some(rec))
        }
        MsgType::Decline => {
            if req.server_id.is_some_and(|s| s != cfg.server_ip) {
                return (Decision::silent("DECLINE for another server"), None);
            }
            let Some(ip) = req.requested_ip else {
                return (Decision::silent("DECLINE without option 50"), None);
            };
            let rec = table.decline(ip, req.mac, now + lease_s);
            let why = if rec.is_some() {
                format!("{ip} declined: held back for {lease_s} s")
            } else {
                format!("DECLINE of {ip}, not leased to this client")
            };
            (Decision::silent(why), rec)
        }
        MsgType::Release => {
            let rec = table.release(req.ciaddr, req.mac);
            let why = if rec.is_some() {
                format!("{} released", req.ciaddr)
            } else {
                format!("RELEASE of {}, not leased to this client", req.ciaddr)
            };
            (Decision::silent(why), rec)
        }
        MsgType::Inform => (reply(ReplyKind::Ack, Ipv4Addr::UNSPECIFIED, false, "INFORM: options only".into()), None),
        MsgType::Other(t) => (Decision::silent(format!("message type {t} is not handled")), None),
    }
}

/// iPXE's encapsulated option 175 with setting 176 (`no-pxedhcp`) = 1: do not wait for proxyDHCP.
pub const IPXE_NO_PXEDHCP: [u8; 3] = [176, 1, 1];
/// PXE vendor option 43: discovery control (6) = 8, "boot from the file name, no discovery".
pub const PXE_VENDOR_BOOTFILE_ONLY: [u8; 4] = [6, 1, 8, 255];

/// Builds the reply message for a decision.
pub fn build_reply(msg: &Message, req: &Request, reply: &Reply, cfg: &DhcpConfig) -> Message {
    let mut m = Message::new_with_id(
        req.xid,
        if reply.kind == ReplyKind::Ack { req.ciaddr } else { Ipv4Addr::UNSPECIFIED },
        reply.yiaddr,
        Ipv4Addr::UNSPECIFIED,
        req.giaddr,
        &req.mac.0,
    );
    m.set_opcode(Opcode::BootReply);
    m.set_flags(msg.flags());
    let opts = m.opts_mut();
    opts.insert(DhcpOption::MessageType(match reply.kind {
        ReplyKind::Offer => v4::MessageType::Offer,
        ReplyKind::Ack => v4::MessageType::Ack,
        ReplyKind::Nak => v4::MessageType::Nak,
    }));
    opts.insert(DhcpOption::ServerIdentifier(cfg.server_ip));
    if let Some(r) = &req.relay_info {
        opts.insert(DhcpOption::RelayAgentInformation(r.clone()));
    }
    if reply.kind == ReplyKind::Nak {
        opts.insert(DhcpOption::Message(reply.why.clone()));
        return m;
    }
    if let Some(pool) = reply.pool.and_then(|i| cfg.pools.get(i)) {
        add_pool_options(&mut m, pool, reply.lease);
        if let Some(name) = cfg.reservations.get(&req.mac).and_then(|r| r.hostname.clone()) {
            m.opts_mut().insert(DhcpOption::Hostname(name));
        }
    }
    let proxy = cfg.mode == DhcpMode::Proxy;
    match &reply.boot {
        BootChoice::None { .. } => {}
        BootChoice::Tftp { server, file, .. } => {
            m.set_siaddr(*server);
            m.set_fname_str(file);
            // No option 60 here in server mode: with `PXEClient` but no option 43 EDK2 (OVMF)
            // takes the offer for a BINL one and asks port 4011 for the file instead of using it.
            let opts = m.opts_mut();
            opts.insert(DhcpOption::TFTPServerName(server.to_string().into_bytes()));
            opts.insert(DhcpOption::BootfileName(file.clone().into_bytes()));
        }
        BootChoice::UefiHttp { url } => {
            if url.len() < 128 {
                m.set_fname_str(url);
            }
            let opts = m.opts_mut();
            opts.insert(DhcpOption::ClassIdentifier(b"HTTPClient".to_vec()));
            opts.insert(DhcpOption::BootfileName(url.clone().into_bytes()));
        }
        BootChoice::IpxeScript { url } => {
            if url.len() < 128 {
                m.set_fname_str(url);
            }
            let opts = m.opts_mut();
            opts.insert(DhcpOption::BootfileName(url.clone().into_bytes()));
            opts.insert(DhcpOption::Unknown(UnknownOption::new(175.into(), IPXE_NO_PXEDHCP.to_vec())));
        }
    }
    if proxy {
        let opts = m.opts_mut();
        if !matches!(reply.boot, BootChoice::UefiHttp { .. }) {
            opts.insert(DhcpOption::ClassIdentifier(b"PXEClient".to_vec()));
            opts.insert(DhcpOption::VendorExtensions(PXE_VENDOR_BOOTFILE_ONLY.to_vec()));
        }
        if let Some(id) = &req.client_machine_id {
            opts.insert(DhcpOption::ClientMachineIdentifier(id.clone()));
        }
    }
    m
}

fn add_pool_options(m: &mut Message, pool: &Pool, lease: bool) {
    let opts = m.opts_mut();
    opts.insert(DhcpOption::SubnetMask(pool.netmask()));
    opts.insert(DhcpOption::BroadcastAddr(pool.broadcast()));
    if let Some(r) = pool.router {
        opts.insert(DhcpOption::Router(vec![r]));
    }
    if !pool.dns.is_empty() {
        opts.insert(DhcpOption::DomainNameServer(pool.dns.clone()));
    }
    if let Some(d) = &pool.domain {
        opts.insert(DhcpOption::DomainName(d.clone()));
    }
    if lease {
        let secs = u32::try_from(pool.lease_time.as_secs()).unwrap_or(u32::MAX);
        opts.insert(DhcpOption::AddressLeaseTime(secs));
        opts.insert(DhcpOption::Renewal(secs / 2));
        opts.insert(DhcpOption::Rebinding(secs / 8 * 7));
    }
}

/// Where a reply goes (RFC 2131 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// 255.255.255.255:68 on the interface.
    Broadcast,
    Unicast(SocketAddrV4),
    /// To the client's new address before it answers ARP: needs a static ARP entry first.
    UnicastToChaddr(Ipv4Addr),
}

pub fn destination(req: &Request, reply: &Reply, src: SocketAddrV4, port: u16) -> Dest {
    if port == PXE_PORT {
        return Dest::Unicast(src);
    }
    if !req.giaddr.is_unspecified() {
        return Dest::Unicast(SocketAddrV4::new(req.giaddr, SERVER_PORT));
    }
    if reply.kind == ReplyKind::Nak {
        return Dest::Broadcast;
    }
    if !req.ciaddr.is_unspecified() {
        return Dest::Unicast(SocketAddrV4::new(req.ciaddr, CLIENT_PORT));
    }
    if req.broadcast || reply.yiaddr.is_unspecified() {
        return Dest::Broadcast;
    }
    Dest::UnicastToChaddr(reply.yiaddr)
}

#[cfg(test)]
mod tests {
    use super::wire::tests::{bytes, client_msg};
    use super::*;
    use crate::config::{Config, Mac};
    use dhcproto::v4::{Flags, OptionCode};
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
reservations = [{ mac = "52:54:00:00:00:50", ip = "10.99.0.50", hostname = "fixed" }]
[dhcp.pool]
subnet = "10.99.0.0/24"
start = "10.99.0.100"
end = "10.99.0.101"
router = "10.99.0.1"
dns = ["10.99.0.1"]
domain = "lab"
[[dhcp.pools]]
subnet = "10.50.0.0/24"
start = "10.50.0.10"
end = "10.50.0.20"
[http]
listen = "10.99.0.1:8081"
public_url = "http://10.99.0.1:8081"
"#;

    fn cfg(mode: &str) -> DhcpConfig {
        let text = if mode == "proxy" {
            CONF.replace("mode = \"server\"", "mode = \"proxy\"").split("reservations").next().unwrap().to_string()
                + "[http]\nlisten = \"10.99.0.1:8081\"\npublic_url = \"http://10.99.0.1:8081\"\n"
        } else {
            CONF.to_string()
        };
        Config::from_toml(Path::new("t.toml"), &text).unwrap().dhcp.unwrap()
    }

    fn table(c: &DhcpConfig) -> LeaseTable {
        let reserved = c.reservations.iter().map(|(m, r)| (r.ip, *m)).collect();
        LeaseTable::new(reserved, [c.server_ip].into_iter().collect())
    }

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn req(m: &Message) -> Request {
        Request::from_message(&wire::decode(&bytes(m)).unwrap()).unwrap()
    }

    fn pxe(ty: v4::MessageType, arch: u16, ipxe: bool) -> Message {
        let mut m = client_msg(ty, MAC);
        m.opts_mut().insert(DhcpOption::ClassIdentifier(format!("PXEClient:Arch:{arch:05}:UNDI:002001").into_bytes()));
        m.opts_mut().insert(DhcpOption::ClientSystemArchitecture(arch.into()));
        if ipxe {
            m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        }
        m
    }

    fn reply_of(d: &Decision) -> &Reply {
        match d {
            Decision::Reply(r) => r,
            Decision::Silent { why } => panic!("expected a reply, got silence: {why}"),
        }
    }

    #[test]
    fn boot_choice_by_client_kind() {
        let c = cfg("server");
        let bios = boot_choice(&req(&pxe(v4::MessageType::Discover, 0, false)), &c.boot);
        assert_eq!(bios.file(), Some("undionly.kpxe"));
        let efi = boot_choice(&req(&pxe(v4::MessageType::Discover, 7, false)), &c.boot);
        assert_eq!(efi.file(), Some("snponly.efi"));
        assert_eq!(boot_choice(&req(&pxe(v4::MessageType::Discover, 9, false)), &c.boot).file(), Some("snponly.efi"));
        assert!(!boot_choice(&req(&pxe(v4::MessageType::Discover, 11, false)), &c.boot).is_some());
        assert!(!boot_choice(&req(&pxe(v4::MessageType::Discover, 99, false)), &c.boot).is_some());
        let ipxe = boot_choice(&req(&pxe(v4::MessageType::Discover, 0, true)), &c.boot);
        assert_eq!(ipxe.file(), Some("http://10.99.0.1:8081/ipxe?mac=52:54:00:12:34:56&arch=bios_x86"));
        let mut http = client_msg(v4::MessageType::Discover, MAC);
        http.opts_mut().insert(DhcpOption::ClassIdentifier(b"HTTPClient:Arch:00016".to_vec()));
        http.opts_mut().insert(DhcpOption::ClientSystemArchitecture(16u16.into()));
        assert_eq!(
            boot_choice(&req(&http), &c.boot),
            BootChoice::UefiHttp { url: "http://10.99.0.1:8081/boot/snponly.efi".into() }
        );
        let plain = client_msg(v4::MessageType::Discover, MAC);
        assert!(!boot_choice(&req(&plain), &c.boot).is_some());
    }

    #[test]
    fn ipxe_url_carries_the_uuid() {
        let c = cfg("server");
        let mut m = pxe(v4::MessageType::Discover, 7, true);
        let mut guid = vec![0u8];
        guid.extend_from_slice(&uuid::Uuid::parse_str("00112233-4455-6677-8899-aabbccddeeff").unwrap().to_bytes_le());
        m.opts_mut().insert(DhcpOption::ClientMachineIdentifier(guid));
        assert_eq!(
            boot_choice(&req(&m), &c.boot).file(),
            Some("http://10.99.0.1:8081/ipxe?mac=52:54:00:12:34:56&uuid=00112233-4455-6677-8899-aabbccddeeff&arch=uefi_x64")
        );
    }

    #[test]
    fn server_dora_with_ipxe_options() {
        let c = cfg("server");
        let mut t = table(&c);
        let discover = pxe(v4::MessageType::Discover, 0, true);
        let r = req(&discover);
        let (d, rec) = decide(&r, SERVER_PORT, &c, &mut t, 1000);
        assert!(rec.is_none());
        let offer = reply_of(&d);
        assert_eq!(offer.kind, ReplyKind::Offer);
        assert_eq!(offer.yiaddr, Ipv4Addr::new(10, 99, 0, 100));
        let msg = build_reply(&discover, &r, offer, &c);
        let back = wire_reply(&msg);
        assert_eq!(back.opts().msg_type(), Some(v4::MessageType::Offer));
        assert_eq!(back.yiaddr(), Ipv4Addr::new(10, 99, 0, 100));
        let o = back.opts();
        assert_eq!(o.get(OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(c.server_ip)));
        assert_eq!(o.get(OptionCode::AddressLeaseTime), Some(&DhcpOption::AddressLeaseTime(3600)));
        assert_eq!(o.get(OptionCode::Router), Some(&DhcpOption::Router(vec![Ipv4Addr::new(10, 99, 0, 1)])));
        assert_eq!(o.get(OptionCode::DomainName), Some(&DhcpOption::DomainName("lab".into())));
        assert_eq!(o.get(OptionCode::Unknown(175)), Some(&DhcpOption::Unknown(UnknownOption::new(175.into(), vec![176, 1, 1]))));
        assert!(
            matches!(o.get(OptionCode::BootfileName), Some(DhcpOption::BootfileName(f)) if f.starts_with(b"http://10.99.0.1:8081/ipxe?mac="))
        );
        assert_eq!(destination(&r, offer, "0.0.0.0:68".parse().unwrap(), SERVER_PORT), Dest::Broadcast);

        let mut request = pxe(v4::MessageType::Request, 0, true);
        request.opts_mut().insert(DhcpOption::ServerIdentifier(c.server_ip));
        request.opts_mut().insert(DhcpOption::RequestedIpAddress(offer.yiaddr));
        let (d, rec) = decide(&req(&request), SERVER_PORT, &c, &mut t, 1001);
        let ack = reply_of(&d);
        assert_eq!((ack.kind, ack.yiaddr), (ReplyKind::Ack, Ipv4Addr::new(10, 99, 0, 100)));
        assert_eq!(rec.unwrap().until, 1001 + 3600);

        // Another client gets another address; a third finds the pool exhausted.
        let mut other = client_msg(v4::MessageType::Discover, [2, 0, 0, 0, 0, 2]);
        other.set_flags(Flags::default());
        let r2 = req(&other);
        let (d, _) = decide(&r2, SERVER_PORT, &c, &mut t, 1002);
        let o2 = reply_of(&d);
        assert_eq!(o2.yiaddr, Ipv4Addr::new(10, 99, 0, 101));
        assert!(!o2.boot.is_some(), "plain clients get no boot file");
        assert_eq!(destination(&r2, o2, "0.0.0.0:68".parse().unwrap(), SERVER_PORT), Dest::UnicastToChaddr(o2.yiaddr));
        let (d, _) = decide(&req(&client_msg(v4::MessageType::Discover, [2, 0, 0, 0, 0, 3])), SERVER_PORT, &c, &mut t, 1003);
        assert_eq!(d, Decision::Silent { why: "pool exhausted".into() });
    }

    #[test]
    fn server_mode_uefi_pxe_offer_is_a_plain_dhcp_offer_with_a_boot_file() {
        let c = cfg("server");
        let mut t = table(&c);
        let discover = pxe(v4::MessageType::Discover, 7, false);
        let r = req(&discover);
        let (d, _) = decide(&r, SERVER_PORT, &c, &mut t, 0);
        let msg = wire_reply(&build_reply(&discover, &r, reply_of(&d), &c));
        assert_eq!(msg.siaddr(), c.server_ip);
        assert_eq!(msg.fname(), Some(&b"snponly.efi\0"[..]));
        assert_eq!(msg.opts().get(OptionCode::BootfileName), Some(&DhcpOption::BootfileName(b"snponly.efi".to_vec())));
        // OVMF would take PXEClient without option 43 for a BINL offer and ask port 4011.
        assert!(msg.opts().get(OptionCode::ClassIdentifier).is_none());
        assert!(msg.opts().get(OptionCode::VendorExtensions).is_none());
    }

    fn wire_reply(m: &Message) -> Message {
        use dhcproto::{Decodable, Decoder};
        let b = wire::encode(m);
        assert!(b.len() >= 300);
        Message::decode(&mut Decoder::new(&b)).unwrap()
    }

    #[test]
    fn request_for_a_taken_or_foreign_address_is_naked() {
        let c = cfg("server");
        let mut t = table(&c);
        t.bind(Ipv4Addr::new(10, 99, 0, 100), Mac([2, 0, 0, 0, 0, 9]), 99_999);
        for (ip, needle) in [
            (Ipv4Addr::new(10, 99, 0, 100), "leased to another"),
            (Ipv4Addr::new(192, 168, 1, 5), "not on subnet"),
            (Ipv4Addr::new(10, 99, 0, 7), "outside the pool"),
        ] {
            let mut m = client_msg(v4::MessageType::Request, MAC);
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
            let (d, rec) = decide(&req(&m), SERVER_PORT, &c, &mut t, 10);
            let r = reply_of(&d);
            assert_eq!(r.kind, ReplyKind::Nak, "{ip}");
            assert!(r.why.contains(needle), "{ip}: {}", r.why);
            assert!(rec.is_none());
            assert_eq!(destination(&req(&m), r, "0.0.0.0:68".parse().unwrap(), SERVER_PORT), Dest::Broadcast);
        }
    }

    #[test]
    fn request_to_another_server_releases_the_offer() {
        let c = cfg("server");
        let mut t = table(&c);
        let (d, _) = decide(&req(&client_msg(v4::MessageType::Discover, MAC)), SERVER_PORT, &c, &mut t, 0);
        let ip = reply_of(&d).yiaddr;
        let mut m = client_msg(v4::MessageType::Request, MAC);
        m.opts_mut().insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 99, 0, 2)));
        m.opts_mut().insert(DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 99, 0, 150)));
        let (d, _) = decide(&req(&m), SERVER_PORT, &c, &mut t, 1);
        assert!(matches!(d, Decision::Silent { .. }));
        assert!(t.available_for(ip, Mac([9; 6]), 1));
    }

    #[test]
    fn reservation_hostname_and_renewal_unicast() {
        let c = cfg("server");
        let mut t = table(&c);
        let mac = [0x52, 0x54, 0, 0, 0, 0x50];
        let discover = client_msg(v4::MessageType::Discover, mac);
        let r = req(&discover);
        let (d, _) = decide(&r, SERVER_PORT, &c, &mut t, 0);
        let offer = reply_of(&d);
        assert_eq!(offer.yiaddr, Ipv4Addr::new(10, 99, 0, 50));
        let msg = build_reply(&discover, &r, offer, &c);
        assert_eq!(msg.opts().get(OptionCode::Hostname), Some(&DhcpOption::Hostname("fixed".into())));
        let mut renew = client_msg(v4::MessageType::Request, mac);
        renew.set_ciaddr(Ipv4Addr::new(10, 99, 0, 50));
        renew.set_flags(Flags::default());
        let rr = req(&renew);
        let (d, _) = decide(&rr, SERVER_PORT, &c, &mut t, 5);
        let ack = reply_of(&d);
        assert_eq!(ack.kind, ReplyKind::Ack);
        assert_eq!(
            destination(&rr, ack, "10.99.0.50:68".parse().unwrap(), SERVER_PORT),
            Dest::Unicast("10.99.0.50:68".parse().unwrap())
        );
        assert_eq!(build_reply(&renew, &rr, ack, &c).ciaddr(), Ipv4Addr::new(10, 99, 0, 50));
    }

    #[test]
    fn relayed_request_uses_the_giaddr_pool_and_echoes_option_82() {
        let c = cfg("server");
        let mut t = table(&c);
        let mut m = client_msg(v4::MessageType::Discover, MAC);
        m.set_giaddr(Ipv4Addr::new(10, 50, 0, 1));
        let mut info = v4::relay::RelayAgentInformation::default();
        info.insert(v4::relay::RelayInfo::AgentCircuitId(b"port7".to_vec()));
        m.opts_mut().insert(DhcpOption::RelayAgentInformation(info.clone()));
        let r = req(&m);
        let (d, _) = decide(&r, SERVER_PORT, &c, &mut t, 0);
        let offer = reply_of(&d);
        assert_eq!(offer.yiaddr, Ipv4Addr::new(10, 50, 0, 10));
        let msg = wire_reply(&build_reply(&m, &r, offer, &c));
        assert_eq!(msg.giaddr(), Ipv4Addr::new(10, 50, 0, 1));
        assert_eq!(msg.opts().get(OptionCode::RelayAgentInformation), Some(&DhcpOption::RelayAgentInformation(info)));
        assert_eq!(
            destination(&r, offer, "10.50.0.1:67".parse().unwrap(), SERVER_PORT),
            Dest::Unicast("10.50.0.1:67".parse().unwrap())
        );
        m.set_giaddr(Ipv4Addr::new(172, 16, 0, 1));
        let (d, _) = decide(&req(&m), SERVER_PORT, &c, &mut t, 0);
        assert!(matches!(d, Decision::Silent { why } if why.contains("no pool")));
    }

    #[test]
    fn decline_release_inform_and_unknown() {
        let c = cfg("server");
        let mut t = table(&c);
        let ip = Ipv4Addr::new(10, 99, 0, 100);
        t.bind(ip, Mac(MAC), 5000);
        let mut decline = client_msg(v4::MessageType::Decline, MAC);
        decline.opts_mut().insert(DhcpOption::RequestedIpAddress(ip));
        decline.opts_mut().insert(DhcpOption::ServerIdentifier(c.server_ip));
        let (d, rec) = decide(&req(&decline), SERVER_PORT, &c, &mut t, 10);
        assert!(matches!(d, Decision::Silent { .. }) && rec.is_some());
        assert!(!t.available_for(ip, Mac(MAC), 10));

        let ip2 = Ipv4Addr::new(10, 99, 0, 101);
        t.bind(ip2, Mac(MAC), 5000);
        let mut release = client_msg(v4::MessageType::Release, MAC);
        release.set_ciaddr(ip2);
        let (_, rec) = decide(&req(&release), SERVER_PORT, &c, &mut t, 10);
        assert_eq!(rec.unwrap().state, leases::State::Released);
        assert!(t.available_for(ip2, Mac([1; 6]), 10));

        let mut inform = client_msg(v4::MessageType::Inform, MAC);
        inform.set_ciaddr(ip2);
        let r = req(&inform);
        let (d, _) = decide(&r, SERVER_PORT, &c, &mut t, 10);
        let ack = reply_of(&d);
        assert_eq!((ack.kind, ack.yiaddr, ack.lease), (ReplyKind::Ack, Ipv4Addr::UNSPECIFIED, false));
        assert!(build_reply(&inform, &r, ack, &c).opts().get(OptionCode::AddressLeaseTime).is_none());

        let (d, _) = decide(&req(&client_msg(v4::MessageType::Unknown(99), MAC)), SERVER_PORT, &c, &mut t, 10);
        assert!(matches!(d, Decision::Silent { .. }));
    }

    #[test]
    fn proxy_mode_answers_only_pxe_clients_and_never_an_address() {
        let c = cfg("proxy");
        assert!(c.pools.is_empty());
        let mut t = table(&c);
        let plain = client_msg(v4::MessageType::Discover, MAC);
        assert!(matches!(decide(&req(&plain), SERVER_PORT, &c, &mut t, 0).0, Decision::Silent { .. }));

        let mut discover = pxe(v4::MessageType::Discover, 7, false);
        let mut guid = vec![0u8];
        guid.extend_from_slice(&[7; 16]);
        discover.opts_mut().insert(DhcpOption::ClientMachineIdentifier(guid.clone()));
        let r = req(&discover);
        let (d, _) = decide(&r, SERVER_PORT, &c, &mut t, 0);
        let offer = reply_of(&d);
        assert_eq!((offer.kind, offer.yiaddr), (ReplyKind::Offer, Ipv4Addr::UNSPECIFIED));
        let msg = wire_reply(&build_reply(&discover, &r, offer, &c));
        assert_eq!(msg.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(msg.siaddr(), c.server_ip);
        assert_eq!(msg.fname(), Some(&b"snponly.efi\0"[..]));
        let o = msg.opts();
        assert_eq!(o.get(OptionCode::ClassIdentifier), Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec())));
        assert_eq!(o.get(OptionCode::ClientMachineIdentifier), Some(&DhcpOption::ClientMachineIdentifier(guid)));
        assert!(o.get(OptionCode::AddressLeaseTime).is_none() && o.get(OptionCode::SubnetMask).is_none());
        assert_eq!(destination(&r, offer, "0.0.0.0:68".parse().unwrap(), SERVER_PORT), Dest::Broadcast);

        // The address server's REQUEST is not ours; the boot-server REQUEST on 4011 is.
        let request = pxe(v4::MessageType::Request, 7, false);
        assert!(matches!(decide(&req(&request), SERVER_PORT, &c, &mut t, 0).0, Decision::Silent { .. }));
        let mut on4011 = pxe(v4::MessageType::Request, 7, false);
        on4011.set_ciaddr(Ipv4Addr::new(10, 99, 0, 150));
        let r = req(&on4011);
        let (d, _) = decide(&r, PXE_PORT, &c, &mut t, 0);
        let ack = reply_of(&d);
        assert_eq!((ack.kind, ack.yiaddr), (ReplyKind::Ack, Ipv4Addr::UNSPECIFIED));
        let src: SocketAddrV4 = "10.99.0.150:4011".parse().unwrap();
        assert_eq!(destination(&r, ack, src, PXE_PORT), Dest::Unicast(src));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use crate::config::Config;
    use proptest::prelude::*;
    use std::path::Path;

    const CONF: &str = r#"
partition = "lab"
[api]
url = "http://10.99.0.1:8080"
token = "t"
[dhcp]
mode = "MODE"
interface = "br0"
server_ip = "10.99.0.1"
[http]
listen = "10.99.0.1:8081"
public_url = "http://10.99.0.1:8081"
"#;

    fn cfg(mode: &str) -> DhcpConfig {
        let mut text = CONF.replace("MODE", mode);
        if mode == "server" {
            text = text
                .replace("[http]", "[dhcp.pool]\nsubnet = \"0.0.0.0/1\"\nstart = \"0.0.0.1\"\nend = \"127.255.255.254\"\n[http]");
        }
        Config::from_toml(Path::new("t"), &text).unwrap().dhcp.unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]
        /// Whatever a client sends, deciding and building the reply never panics, and the reply
        /// decodes.
        #[test]
        fn any_request_gets_a_well_formed_reply_or_none(buf in wire::proptests::packet(), port in prop_oneof![Just(SERVER_PORT), Just(PXE_PORT)]) {
            for c in [cfg("server"), cfg("proxy")] {
                let Ok(msg) = wire::decode(&buf) else { continue };
                let Ok(req) = Request::from_message(&msg) else { continue };
                let mut t = LeaseTable::default();
                let (d, _) = decide(&req, port, &c, &mut t, 1000);
                if let Decision::Reply(r) = d {
                    let out = wire::encode(&build_reply(&msg, &req, &r, &c));
                    use dhcproto::{Decodable, Decoder};
                    prop_assert!(Message::decode(&mut Decoder::new(&out)).is_ok());
                    let _ = destination(&req, &r, "0.0.0.0:68".parse().unwrap(), port);
                }
            }
        }
    }
}
