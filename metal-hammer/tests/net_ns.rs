//! Network integration tests inside a private network namespace (root only; skipped
//! otherwise): a real DHCP exchange with dnsmasq over a veth pair, the resulting address,
//! route and resolv.conf, a scripted pair of servers of which one NAKs what the other leases,
//! and LLDP frames heard on the veth.
//!
//! Each test unshares the network namespace of its own thread, so everything it creates
//! vanishes with the thread; dnsmasq is killed on drop.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use metal_hammer::{dhcp, lldp, net, netlink::Netlink};

fn sh(args: &[&str]) {
    let st = Command::new(args[0]).args(&args[1..]).status().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(st.success(), "{args:?} failed");
}

/// Runs `f` on a thread in a fresh network namespace with a veth pair `mh0` (ours, MAC
/// 52:54:00:12:34:56) ↔ `mh1` (the "switch" side, 10.88.0.1/24), both up.
fn in_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
        sh(&["ip", "link", "add", "mh0", "address", "52:54:00:12:34:56", "type", "veth", "peer", "name", "mh1"]);
        sh(&["ip", "addr", "add", "10.88.0.1/24", "dev", "mh1"]);
        sh(&["ip", "link", "set", "mh1", "up"]);
        sh(&["ip", "link", "set", "lo", "up"]);
        f()
    })
    .join()
    .unwrap()
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// On a thread in a fresh namespace ("the machine"), gets `mh0` (MAC 52:54:00:12:34:56) whose
/// veth peer `mh1` (10.88.0.1/24) lives in a second fresh namespace ("the switch") with dnsmasq
/// serving DHCP on it, and runs `f(dnsmasq log path)`. Two namespaces, because in one the
/// server's address would be picked as the source of our DISCOVER and dropped as martian.
fn with_dnsmasq<T: Send + 'static>(state: std::path::PathBuf, f: impl FnOnce(&std::path::Path) -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: unshare/gettid affect/query only this thread.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
        let machine_ns = format!("/proc/{}/task/{}/ns/net", std::process::id(), unsafe { libc::gettid() });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let log_path = state.join("dnsmasq.log");
        let log = log_path.clone();
        let server = std::thread::spawn(move || {
            // SAFETY: as above.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
            sh(&["ip", "link", "add", "mh0", "address", "52:54:00:12:34:56", "type", "veth", "peer", "name", "mh1"]);
            sh(&["ip", "link", "set", "mh0", "netns", &machine_ns]);
            sh(&["ip", "addr", "add", "10.88.0.1/24", "dev", "mh1"]);
            sh(&["ip", "link", "set", "mh1", "up"]);
            let _dnsmasq = KillOnDrop(
                Command::new("dnsmasq")
                    .args([
                        "--no-daemon",
                        "--conf-file=/dev/null",
                        "--port=0",
                        "--interface=mh1",
                        "--bind-interfaces",
                        "--log-dhcp",
                    ])
                    .args([
                        "--dhcp-range=10.88.0.100,10.88.0.110,255.255.255.0,2m",
                        "--dhcp-option=3,10.88.0.1",
                        "--dhcp-option=6,10.88.0.53",
                    ])
                    .arg(format!("--dhcp-leasefile={}", state.join("leases").display()))
                    .arg(format!("--log-facility={}", log.display()))
                    .arg("--pid-file")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("dnsmasq"),
            );
            std::thread::sleep(Duration::from_millis(300));
            ready_tx.send(()).unwrap();
            let _ = stop_rx.recv();
        });
        ready_rx.recv().expect("server namespace ready");
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&log_path)));
        drop(stop_tx);
        server.join().unwrap();
        out.unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
    .join()
    .unwrap()
}

#[test]
fn dhcp_lease_from_dnsmasq_configures_the_interface() {
    if !metal_testkit::require(
        metal_testkit::is_root() && Command::new("dnsmasq").arg("--version").output().is_ok(),
        "needs root and dnsmasq",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (lease, routes, addrs, log) = with_dnsmasq(root.clone(), move |log_path| {
        let mut nl = Netlink::open().unwrap();
        nl.link_up(net::ifindex("lo").unwrap()).unwrap();
        nl.link_up(net::ifindex("mh0").unwrap()).unwrap();
        let uuid: uuid::Uuid = "6b1f2c3d-0000-4000-8000-00000000000a".parse().unwrap();
        let lease = dhcp::obtain_lease("mh0", [0x52, 0x54, 0, 0x12, 0x34, 0x56], &uuid, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("{e}; dnsmasq log:\n{}", std::fs::read_to_string(log_path).unwrap_or_default()));
        net::configure(&mut nl, &root, "mh0", &lease).expect("configure");
        let renewed =
            dhcp::renew_lease("mh0", [0x52, 0x54, 0, 0x12, 0x34, 0x56], &uuid, &lease, Duration::from_secs(10)).expect("renew");
        assert_eq!(renewed.address, lease.address, "renewal keeps the address");
        let routes = String::from_utf8(Command::new("ip").args(["-4", "route"]).output().unwrap().stdout).unwrap();
        let addrs = String::from_utf8(Command::new("ip").args(["-4", "addr", "show", "mh0"]).output().unwrap().stdout).unwrap();
        (lease, routes, addrs, std::fs::read_to_string(log_path).unwrap_or_default())
    });
    assert!((100..=110).contains(&lease.address.octets()[3]), "{lease:?}");
    assert_eq!(lease.prefix_len, 24);
    assert_eq!(lease.router, Some(Ipv4Addr::new(10, 88, 0, 1)));
    assert_eq!(lease.dns, vec![Ipv4Addr::new(10, 88, 0, 53)]);
    assert_eq!(lease.server, Ipv4Addr::new(10, 88, 0, 1));
    assert!(routes.contains("default via 10.88.0.1 dev mh0"), "{routes}");
    assert!(addrs.contains(&format!("{}/24", lease.address)), "{addrs}");
    assert_eq!(std::fs::read_to_string(dir.path().join("etc/resolv.conf")).unwrap(), "nameserver 10.88.0.53\n");
    assert!(log.contains("vendor class: metal-hammer"), "dnsmasq saw option 60:\n{log}");
    assert!(log.contains("DHCPACK(mh1)"), "{log}");
}

/// A scripted DHCP "network" on `mh1` in the switch namespace: the real server 10.88.0.1 offers
/// 10.88.0.150; every REQUEST first gets a NAK from a second server 10.88.0.66 and then the real
/// server's answer: an ACK, or a NAK when `own_nak` is set.
fn scripted_servers(sock: &std::net::UdpSocket, stop: &std::sync::atomic::AtomicBool, own_nak: &std::sync::atomic::AtomicBool) {
    use dhcproto::v4::{DhcpOption, Message, MessageType, Opcode};
    use dhcproto::{Decodable, Decoder, Encodable, Encoder};
    use std::sync::atomic::Ordering;
    let reply = |req: &Message, kind: MessageType, server: Ipv4Addr| {
        let yiaddr = if kind == MessageType::Nak { Ipv4Addr::UNSPECIFIED } else { Ipv4Addr::new(10, 88, 0, 150) };
        let mut m = Message::new_with_id(
            req.xid(),
            Ipv4Addr::UNSPECIFIED,
            yiaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            req.chaddr(),
        );
        m.set_opcode(Opcode::BootReply);
        m.set_flags(req.flags());
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(server));
        if kind != MessageType::Nak {
            o.insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
            o.insert(DhcpOption::AddressLeaseTime(120));
        }
        let mut buf = Vec::new();
        m.encode(&mut Encoder::new(&mut buf)).unwrap();
        sock.send_to(&buf, (Ipv4Addr::BROADCAST, 68)).unwrap();
    };
    let mut buf = [0u8; 1500];
    while !stop.load(Ordering::SeqCst) {
        let Ok((n, _)) = sock.recv_from(&mut buf) else { continue };
        let Ok(req) = Message::decode(&mut Decoder::new(&buf[..n])) else { continue };
        match req.opts().msg_type() {
            Some(MessageType::Discover) => reply(&req, MessageType::Offer, Ipv4Addr::new(10, 88, 0, 1)),
            Some(MessageType::Request) => {
                reply(&req, MessageType::Nak, Ipv4Addr::new(10, 88, 0, 66));
                let kind = if own_nak.load(Ordering::SeqCst) { MessageType::Nak } else { MessageType::Ack };
                reply(&req, kind, Ipv4Addr::new(10, 88, 0, 1));
            }
            _ => {}
        }
    }
}

#[test]
fn a_nak_from_another_server_neither_ends_the_request_nor_the_renewal() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    if !metal_testkit::require(metal_testkit::is_root(), "needs root") {
        return;
    }
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let (stop, own_nak) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (obtained, renewed, refused) = std::thread::spawn(move || {
        // SAFETY: unshare/gettid affect/query only this thread.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
        let machine_ns = format!("/proc/{}/task/{}/ns/net", std::process::id(), unsafe { libc::gettid() });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (s, o) = (stop.clone(), own_nak.clone());
        let server = std::thread::spawn(move || {
            // SAFETY: as above.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare(CLONE_NEWNET)");
            sh(&["ip", "link", "add", "mh0", "address", "52:54:00:12:34:56", "type", "veth", "peer", "name", "mh1"]);
            sh(&["ip", "link", "set", "mh0", "netns", &machine_ns]);
            sh(&["ip", "addr", "add", "10.88.0.1/24", "dev", "mh1"]);
            sh(&["ip", "link", "set", "mh1", "up"]);
            let sock = std::net::UdpSocket::bind("0.0.0.0:67").unwrap();
            sock.set_broadcast(true).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let dev = b"mh1";
            // SAFETY: setsockopt with a valid buffer of the given length on an open socket.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&sock),
                    libc::SOL_SOCKET,
                    libc::SO_BINDTODEVICE,
                    dev.as_ptr().cast(),
                    dev.len() as u32,
                )
            };
            assert_eq!(rc, 0, "SO_BINDTODEVICE");
            ready_tx.send(()).unwrap();
            scripted_servers(&sock, &s, &o);
        });
        ready_rx.recv().expect("server namespace ready");
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut nl = Netlink::open().unwrap();
            nl.link_up(net::ifindex("mh0").unwrap()).unwrap();
            let uuid = uuid::Uuid::nil();
            let obtained = dhcp::obtain_lease("mh0", mac, &uuid, Duration::from_secs(10));
            let renewed = obtained.as_ref().ok().map(|l| dhcp::renew_lease("mh0", mac, &uuid, l, Duration::from_secs(10)));
            own_nak.store(true, Ordering::SeqCst);
            let refused = obtained.as_ref().ok().map(|l| dhcp::renew_lease("mh0", mac, &uuid, l, Duration::from_secs(10)));
            (
                obtained.map_err(|e| e.to_string()),
                renewed.map(|r| r.map_err(|e| e.to_string())),
                refused.map(|r| r.map_err(|e| e.to_string())),
            )
        }));
        stop.store(true, Ordering::SeqCst);
        server.join().unwrap();
        out.unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
    .join()
    .unwrap();
    let lease = obtained.expect("the request is answered by the server whose offer was taken, despite the other server's NAK");
    assert_eq!((lease.address, lease.server), (Ipv4Addr::new(10, 88, 0, 150), Ipv4Addr::new(10, 88, 0, 1)));
    let renewed = renewed.unwrap().expect("the renewal is answered by the leasing server, despite the other server's NAK");
    assert_eq!(renewed.address, lease.address);
    // The leasing server's own NAK still ends the renewal.
    assert_eq!(refused.unwrap().unwrap_err(), "DHCP server 10.88.0.1 refused the address on mh0 (NAK)");
}

#[test]
fn no_server_means_no_offer_within_the_timeout() {
    if !metal_testkit::require(metal_testkit::is_root(), "needs root") {
        return;
    }
    let err = in_netns(|| {
        let mut nl = Netlink::open().unwrap();
        nl.link_up(net::ifindex("mh0").unwrap()).unwrap();
        let start = std::time::Instant::now();
        let r = dhcp::obtain_lease("mh0", [0x52, 0x54, 0, 0x12, 0x34, 0x56], &uuid::Uuid::nil(), Duration::from_millis(1500));
        assert!(start.elapsed() < Duration::from_secs(3));
        r.unwrap_err().to_string()
    });
    assert_eq!(err, "no DHCP offer on mh0");
}

#[test]
fn lldp_frames_on_a_veth_are_heard() {
    if !metal_testkit::require(metal_testkit::is_root(), "needs root") {
        return;
    }
    let heard = in_netns(|| {
        sh(&["ip", "link", "set", "mh0", "up"]);
        let ifindex = net::ifindex("mh0").unwrap();
        let sender = std::thread::spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            send_lldp("mh1");
        });
        let heard = lldp::listen(&[("mh0".into(), ifindex)], Duration::from_secs(2)).unwrap();
        sender.join().unwrap();
        heard
    });
    assert_eq!(heard.len(), 1, "{heard:?}");
    assert_eq!(heard[0].interface, "mh0");
    assert_eq!(heard[0].chassis_id, "02:00:00:00:00:01");
    assert_eq!(heard[0].port_id, "swp7");
    assert_eq!(heard[0].system_name, "leaf-1");
}

/// Sends one LLDP frame out of `iface` with a raw AF_PACKET socket (the thread shares the
/// namespace of its parent test thread because it was spawned after unshare).
fn send_lldp(iface: &str) {
    let tlv = |t: u16, v: &[u8]| {
        let mut o = ((t << 9) | v.len() as u16).to_be_bytes().to_vec();
        o.extend_from_slice(v);
        o
    };
    let mut frame = lldp::LLDP_MULTICAST.to_vec();
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&lldp::ETHERTYPE_LLDP.to_be_bytes());
    frame.extend(tlv(1, &[4, 0x02, 0, 0, 0, 0, 1]));
    frame.extend(tlv(2, b"\x05swp7"));
    frame.extend(tlv(3, &[0, 120]));
    frame.extend(tlv(5, b"leaf-1"));
    frame.extend(tlv(0, &[]));
    // SAFETY: raw socket calls with valid buffers; the fd is closed at the end.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, (lldp::ETHERTYPE_LLDP.to_be()) as i32);
        assert!(fd >= 0, "packet socket");
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = lldp::ETHERTYPE_LLDP.to_be();
        addr.sll_ifindex = net::ifindex(iface).unwrap();
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&lldp::LLDP_MULTICAST);
        let n = libc::sendto(
            fd,
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(n as usize, frame.len(), "sendto: {}", std::io::Error::last_os_error());
        libc::close(fd);
    }
}
