//! Real clients against the real pixie binary, inside network namespaces these tests create
//! (root only; every namespace and process is removed on drop). Select them with
//! `cargo test -p pixie --test netns` (all are named `netns_*`).

mod common;

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use dhcproto::v4::{self, DhcpOption, Flags, Message, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};

/// A server namespace (pixie on `vs`, 10.99.0.1/24) linked to a client namespace (`vc`).
struct Pair {
    server: Netns,
    client: Netns,
    dir: tempfile::TempDir,
}

fn pair(tag: &str) -> Pair {
    let server = Netns::new(&format!("{tag}s"));
    let client = Netns::new(&format!("{tag}c"));
    veth(&server, "vs", &client, "vc");
    server.ip(&format!("addr add {SERVER_IP}/24 dev vs"));
    Pair { server, client, dir: tempfile::tempdir().unwrap() }
}

fn encode(m: &Message) -> Vec<u8> {
    let mut b = Vec::new();
    m.encode(&mut Encoder::new(&mut b)).unwrap();
    b
}

fn client_msg(ty: v4::MessageType, mac: [u8; 6]) -> Message {
    let mut m = Message::new(Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED, &mac);
    m.set_opcode(Opcode::BootRequest);
    m.set_flags(Flags::default().set_broadcast());
    m.opts_mut().insert(DhcpOption::MessageType(ty));
    m
}

fn pxe_discover(mac: [u8; 6], arch: u16) -> Message {
    let mut m = client_msg(v4::MessageType::Discover, mac);
    m.opts_mut().insert(DhcpOption::ClassIdentifier(format!("PXEClient:Arch:{arch:05}:UNDI:003016").into_bytes()));
    m.opts_mut().insert(DhcpOption::ClientSystemArchitecture(arch.into()));
    m
}

/// Sends `packets` from `sock` to `to`, then collects DHCP replies matching `xid` for `wait`.
fn exchange(sock: &UdpSocket, packets: &[Vec<u8>], to: SocketAddr, xid: u32, wait: Duration) -> Vec<(Message, SocketAddr)> {
    for p in packets {
        sock.send_to(p, to).unwrap();
    }
    let end = Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 1500];
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        let Ok((n, from)) = sock.recv_from(&mut buf) else { break };
        if let Ok(m) = Message::decode(&mut Decoder::new(&buf[..n])) {
            if m.xid() == xid && m.opcode() == Opcode::BootReply {
                out.push((m, from));
            }
        }
    }
    out
}

fn client_socket(port: u16) -> UdpSocket {
    pixie::dhcp::server::bind_udp("vc", SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)).unwrap()
}

fn bcast(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::BROADCAST, port))
}

fn metrics(ns: &Netns) -> String {
    run(ns.cmd("curl").args(["-sf", "-m", "2", &format!("http://{SERVER_IP}:8081/metrics")]))
}

fn udhcpc(ns: &Netns, dir: &std::path::Path, extra: &[&str]) -> Option<String> {
    let out = dir.join("udhcpc.env");
    let _ = std::fs::remove_file(&out);
    let script = dir.join("udhcpc.sh");
    std::fs::write(&script, format!("#!/bin/sh\n[ \"$1\" = bound ] && env > {}\nexit 0\n", out.display())).unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let status = ns
        .cmd("busybox")
        .args(["udhcpc", "-i", "vc", "-f", "-q", "-n", "-t", "4", "-T", "1", "-s"])
        .arg(&script)
        .args(extra)
        .output()
        .unwrap();
    if !status.status.success() {
        return None;
    }
    std::fs::read_to_string(out).ok()
}

fn env_var<'a>(env: &'a str, key: &str) -> &'a str {
    env.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("{key} missing in\n{env}"))
}

#[test]
fn netns_udhcpc_gets_an_address_and_a_restart_hands_out_no_duplicate() {
    if skip_unless_root("netns_udhcpc") {
        return;
    }
    let p = pair("u");
    let conf = server_config("vs", p.dir.path(), p.dir.path(), "");
    let mut pixie = start_pixie(&p.server, p.dir.path(), &conf, "1");

    p.client.ip("link set vc address 02:00:00:00:00:0a");
    let env = udhcpc(&p.client, p.dir.path(), &[]).unwrap_or_else(|| panic!("udhcpc got no lease\n{}", pixie.log_text()));
    let first: Ipv4Addr = env_var(&env, "ip").parse().unwrap();
    assert!((100..=199).contains(&first.octets()[3]), "{first}");
    assert_eq!(env_var(&env, "subnet"), "255.255.255.0");
    assert_eq!(env_var(&env, "router").trim(), "10.99.0.1");
    assert_eq!(env_var(&env, "dns").trim(), "10.99.0.1");
    assert_eq!(env_var(&env, "domain"), "lab");
    assert_eq!(env_var(&env, "lease"), "3600");
    assert_eq!(env_var(&env, "serverid"), "10.99.0.1");

    // Restart: the journal keeps A's lease, so B asking for the same address gets another one.
    pixie.stop();
    let _pixie = start_pixie(&p.server, p.dir.path(), &conf, "2");
    p.client.ip("link set vc address 02:00:00:00:00:0b");
    let env = udhcpc(&p.client, p.dir.path(), &["-r", &first.to_string()]).expect("second client got no lease");
    let second: Ipv4Addr = env_var(&env, "ip").parse().unwrap();
    assert_ne!(first, second, "a restarted pixie handed out a leased address again");
    p.client.ip("link set vc address 02:00:00:00:00:0a");
    let env = udhcpc(&p.client, p.dir.path(), &[]).expect("first client got no lease after restart");
    assert_eq!(env_var(&env, "ip").parse::<Ipv4Addr>().unwrap(), first, "a client keeps its address");
}

#[test]
fn netns_perfdhcp_dora_exchanges_complete() {
    if skip_unless_root("netns_perfdhcp") {
        return;
    }
    let p = pair("p");
    p.client.ip("addr add 10.99.0.2/24 dev vc");
    let conf = server_config("vs", p.dir.path(), p.dir.path(), "")
        .replace("10.99.0.0/24", "10.99.0.0/16")
        .replace("10.99.0.199", "10.99.250.250");
    let pixie = start_pixie(&p.server, p.dir.path(), &conf.replace("debug", "info"), "1");
    // perfdhcp acts as a relay (giaddr = 10.99.0.2): this also exercises pixie's relay path.
    let out = p
        .client
        .cmd("perfdhcp")
        // -W: wait 0.5 s for the last answers; an ACK leaves only after the lease journal's fsync.
        .args(["-4", "-l", "10.99.0.2", "-r", "500", "-n", "2000", "-R", "2000", "-p", "10", "-W", "500000", "10.99.0.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let count = |label: &str| -> Vec<u64> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix(label))
            .filter_map(|v| v.split_whitespace().next()?.parse().ok())
            .collect()
    };
    let sent = count("sent packets:");
    let received = count("received packets:");
    assert_eq!(
        sent.len(),
        2,
        "perfdhcp output:\n{text}\npixie:\n{}",
        pixie.log_text().lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    assert!(sent[0] >= 2000 && sent[1] >= 1990, "{text}");
    // Every DISCOVER and REQUEST answered.
    for (s, r) in sent.iter().zip(&received) {
        assert!(r * 1000 >= s * 999, "more than 0.1% dropped:\n{text}");
    }
    let m = metrics(&p.server);
    assert!(m.contains("pixie_dhcp_packets_total{type=\"request\",decision=\"ack\"}"), "{m}");
}

#[test]
fn netns_relay_gets_unicast_replies_with_option_82() {
    if skip_unless_root("netns_relay") {
        return;
    }
    let p = pair("r");
    p.client.ip("addr add 10.99.0.2/24 dev vc");
    let conf = server_config("vs", p.dir.path(), p.dir.path(), "");
    let _pixie = start_pixie(&p.server, p.dir.path(), &conf, "1");
    let replies = p.client.enter(|| {
        let sock = client_socket(67);
        let mut m = pxe_discover([2, 0, 0, 0, 0, 0x82], 0);
        m.set_giaddr(Ipv4Addr::new(10, 99, 0, 2));
        m.set_hops(1);
        let mut info = v4::relay::RelayAgentInformation::default();
        info.insert(v4::relay::RelayInfo::AgentCircuitId(b"rack1-port7".to_vec()));
        m.opts_mut().insert(DhcpOption::RelayAgentInformation(info));
        exchange(&sock, &[encode(&m)], SocketAddr::from((SERVER_IP, 67)), m.xid(), Duration::from_secs(2))
    });
    assert_eq!(replies.len(), 1, "{replies:?}");
    let (offer, from) = &replies[0];
    assert_eq!(from.ip(), std::net::IpAddr::V4(SERVER_IP));
    assert_eq!(offer.giaddr(), Ipv4Addr::new(10, 99, 0, 2));
    assert_eq!(offer.fname(), Some(&b"undionly.kpxe\0"[..]));
    let Some(DhcpOption::RelayAgentInformation(info)) = offer.opts().get(OptionCode::RelayAgentInformation) else {
        panic!("option 82 not echoed: {offer:?}")
    };
    assert_eq!(
        info.get(v4::relay::RelayCode::AgentCircuitId),
        Some(&v4::relay::RelayInfo::AgentCircuitId(b"rack1-port7".to_vec()))
    );
}

/// Bad DHCP packets of every kind; pixie drops them and answers the good one after them.
fn bad_dhcp_packets() -> Vec<Vec<u8>> {
    let good = encode(&client_msg(v4::MessageType::Discover, [2, 0, 0, 0, 0, 0xbb]));
    let mut v: Vec<Vec<u8>> = vec![vec![], vec![1; 10], good[..239].to_vec()];
    let with_opts = |opts: &[u8]| {
        let mut b = good[..240].to_vec();
        b.extend_from_slice(opts);
        b
    };
    let mut hlen = good.clone();
    hlen[2] = 200;
    v.push(hlen);
    v.push(with_opts(&[53, 1, 1, 12, 200, b'a', b'b', b'c'])); // hostname length lies
    v.push(with_opts(&[53, 0, 255])); // message type without a value
    v.push(with_opts(&[53, 1, 99, 255])); // unknown message type
    v.push(with_opts(&[53, 1, 1, 80, 4, 0, 0, 0, 0, 255])); // rapid commit with a length
    v.push(with_opts(&[53, 1, 1, 94, 5, 1, 2, 3, 4, 5, 255]));
    v.push(with_opts(&[53, 1, 1, 81, 0, 255]));
    v.push(with_opts(&[53, 1, 1, 93, 1, 0, 255]));
    v.push(with_opts(&[53, 1, 1, 82, 5, 1, 200, 0, 0, 0, 255])); // option 82 sub-option lies
    let mut big = with_opts(&[53, 1, 1]);
    big.extend(std::iter::repeat_n(0xfe, 3000));
    v.push(big);
    let mut x: u32 = 7;
    for _ in 0..200 {
        let mut b = good.clone();
        for _ in 0..8 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let i = (x as usize >> 8) % b.len();
            b[i] = (x >> 24) as u8;
        }
        v.push(b);
    }
    v
}

#[test]
fn netns_bad_packets_are_dropped_and_servers_keep_serving() {
    if skip_unless_root("netns_bad_packets") {
        return;
    }
    let p = pair("b");
    p.client.ip("addr add 10.99.0.2/24 dev vc");
    let root = p.dir.path().join("tftp");
    std::fs::create_dir(&root).unwrap();
    let data = write_pattern(&root.join("file.bin"), 100_000);
    let conf = server_config("vs", p.dir.path(), &root, "");
    let mut pixie = start_pixie(&p.server, p.dir.path(), &conf, "1");
    let replies = p.client.enter(|| {
        let sock = client_socket(68);
        let good = pxe_discover([2, 0, 0, 0, 0, 0xcc], 7);
        // In bursts, with pauses, so that the test measures pixie and not socket buffers.
        for chunk in bad_dhcp_packets().chunks(20) {
            for p in chunk {
                sock.send_to(p, bcast(67)).unwrap();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(200));
        exchange(&sock, &[encode(&good)], bcast(67), good.xid(), Duration::from_secs(2))
    });
    assert!(pixie.alive(), "pixie died:\n{}", pixie.log_text());
    assert_eq!(replies.len(), 1, "the good DISCOVER after the bad ones was not answered\n{}", pixie.log_text());
    assert_eq!(replies[0].0.opts().msg_type(), Some(v4::MessageType::Offer));
    let m = metrics(&p.server);
    assert!(m.contains("pixie_dhcp_invalid_total{reason=\"truncated_option\"}"), "{m}");
    assert!(m.contains("pixie_dhcp_invalid_total{reason=\"bad_hlen\"}"), "{m}");
    assert!(m.contains("pixie_dhcp_packets_total{type=\"other\",decision=\"silent\"}"), "{m}");

    // TFTP: garbage, escapes, writes, absurd options; then a normal fetch still works.
    let answers = p.client.enter(move || {
        let sock = UdpSocket::bind("10.99.0.2:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let srv = SocketAddr::from((SERVER_IP, 69));
        for junk in [
            &b""[..],
            b"\x00",
            b"\x00\x01",
            b"\x00\x01x",
            b"\x00\x07abc\x00",
            b"\x00\x03\x00\x01data",
            b"\x00\x01f\x00octet\x00blksize\x00",
        ] {
            sock.send_to(junk, srv).unwrap();
        }
        let mut errors = Vec::new();
        for rq in [
            &b"\x00\x01../../../../etc/passwd\x00octet\x00"[..],
            b"\x00\x01/etc/passwd\x00octet\x00",
            b"\x00\x02upload.bin\x00octet\x00",
            b"\x00\x01file.bin\x00mail\x00",
        ] {
            sock.send_to(rq, srv).unwrap();
            let mut buf = [0u8; 600];
            let (n, _) = sock.recv_from(&mut buf).expect("no TFTP error answer");
            errors.push(pixie::tftp::codec::decode(&buf[..n]).unwrap());
        }
        errors
    });
    use pixie::tftp::codec::{code, Packet};
    let codes: Vec<u16> = answers.iter().map(|p| if let Packet::Error { code, .. } = p { *code } else { 999 }).collect();
    assert_eq!(codes, vec![code::ACCESS_VIOLATION, code::FILE_NOT_FOUND, code::ACCESS_VIOLATION, code::ILLEGAL_OPERATION]);
    let out = p.dir.path().join("fetched.bin");
    run(p
        .client
        .cmd("curl")
        .args(["-sf", "-m", "20", "--tftp-blksize", "65464"])
        .arg("-o")
        .arg(&out)
        .arg(format!("tftp://{SERVER_IP}/file.bin")));
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert!(pixie.alive());
}

#[test]
fn netns_tftp_atftp_and_curl_with_every_option() {
    if skip_unless_root("netns_tftp") {
        return;
    }
    let p = pair("t");
    p.client.ip("addr add 10.99.0.2/24 dev vc");
    let root = p.dir.path().join("tftp");
    std::fs::create_dir(&root).unwrap();
    let small = write_pattern(&root.join("small.bin"), 1_000_000);
    let large = write_pattern(&root.join("large.bin"), 5 * 1024 * 1024 + 17);
    let conf = server_config("vs", p.dir.path(), &root, "");
    let pixie = start_pixie(&p.server, p.dir.path(), &conf, "1");
    let fetch_atftp = |file: &str, opts: &[&str], n: usize| {
        let out = p.dir.path().join(format!("atftp-{n}.bin"));
        let mut c = p.client.cmd("atftp");
        c.args(["--get", "-r", file, "-l"]).arg(&out);
        for o in opts {
            c.args(["--option", o]);
        }
        c.arg(SERVER_IP.to_string());
        run(&mut c);
        std::fs::read(&out).unwrap()
    };
    assert_eq!(fetch_atftp("small.bin", &[], 1), small);
    assert_eq!(fetch_atftp("small.bin", &["blksize 1468", "tsize 0", "timeout 2"], 2), small);
    assert_eq!(fetch_atftp("large.bin", &["blksize 1468", "windowsize 16"], 3), large);
    assert_eq!(fetch_atftp("large.bin", &["blksize 65464", "windowsize 999999"], 4), large);
    // curl, several at once.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let out = p.dir.path().join(format!("curl-{i}.bin"));
            let child = p
                .client
                .cmd("curl")
                .args(["-sf", "-m", "60", "--tftp-blksize", "1468"])
                .arg("-o")
                .arg(&out)
                .arg(format!("tftp://{SERVER_IP}/large.bin"))
                .spawn()
                .unwrap();
            (child, out)
        })
        .collect();
    for (mut child, out) in handles {
        assert!(child.wait().unwrap().success(), "{}", pixie.log_text());
        assert_eq!(std::fs::read(&out).unwrap(), large);
    }
    let m = metrics(&p.server);
    assert!(m.contains("pixie_tftp_transfers_total{result=\"ok\"}"), "{m}");
}

#[test]
fn netns_http_serves_ranges_and_a_retry_script_when_the_api_is_down() {
    if skip_unless_root("netns_http") {
        return;
    }
    let p = pair("h");
    p.client.ip("addr add 10.99.0.2/24 dev vc");
    let root = p.dir.path().join("files");
    std::fs::create_dir(&root).unwrap();
    let data = write_pattern(&root.join("initrd.img"), 300_000);
    let conf = server_config("vs", p.dir.path(), &root, "");
    let _pixie = start_pixie(&p.server, p.dir.path(), &conf, "1");
    let base = format!("http://{SERVER_IP}:8081");
    let part = p.dir.path().join("part");
    run(p.client.cmd("curl").args(["-sf", "-r", "1000-1999", &format!("{base}/hammer/initrd.img")]).arg("-o").arg(&part));
    assert_eq!(std::fs::read(&part).unwrap(), &data[1000..2000]);
    let full = p.dir.path().join("full");
    run(p.client.cmd("curl").args(["-sf", &format!("{base}/hammer/initrd.img"), "-o"]).arg(&full));
    assert_eq!(std::fs::read(&full).unwrap(), data);
    let status = run(p.client.cmd("curl").args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &format!("{base}/hammer/..%2f..%2fetc%2fpasswd"),
    ]));
    assert!(status == "404" || status == "400", "traversal answered {status}");
    // No API listens: the script says why and chains the same URL again, with a back-off.
    let script =
        run(p.client.cmd("curl").args(["-sf", "-m", "5", &format!("{base}/ipxe?mac=52:54:00:12:34:56&arch=bios_x86&attempt=3")]));
    assert!(script.starts_with("#!ipxe\n"), "{script}");
    assert!(script.contains("sleep 16"), "{script}");
    assert!(script.contains(&format!("chain --replace {base}/ipxe?mac=52:54:00:12:34:56&arch=bios_x86&attempt=4")), "{script}");
    assert!(!script.lines().any(|l| l.starts_with("kernel") || l.starts_with("boot") || l.starts_with("sanboot")), "{script}");
    let bad = run(p.client.cmd("curl").args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("{base}/ipxe?mac=nope")]));
    assert_eq!(bad, "400");
    let m = metrics(&p.server);
    assert!(m.contains("pixie_boot_decisions_total{outcome=\"retry\"} 1"), "{m}");
    assert!(m.contains("pixie_http_requests_total{route=\"hammer\",status=\"206\"} 1"), "{m}");
}

#[test]
fn netns_proxy_mode_beside_dnsmasq() {
    if skip_unless_root("netns_proxy") {
        return;
    }
    // pixie and dnsmasq on one bridge in the server namespace (dnsmasq in its own namespace,
    // so both can own port 67); the client on a veth into the bridge.
    let server = Netns::new("xs");
    let dns = Netns::new("xd");
    let client = Netns::new("xc");
    let dir = tempfile::tempdir().unwrap();
    server.ip("link add br0 type bridge");
    // With br_netfilter loaded on the host, bridged DHCP replies unicast to a client without an
    // address are dropped by the namespace's netfilter hooks; a lab bridge does not want them.
    let _ = server.cmd("sysctl").args(["-qw", "net.bridge.bridge-nf-call-iptables=0"]).status();
    server.ip("link set br0 up");
    server.ip(&format!("addr add {SERVER_IP}/24 dev br0"));
    veth(&server, "pd", &dns, "vd");
    veth(&server, "pc", &client, "vc");
    server.ip("link set pd master br0");
    server.ip("link set pc master br0");
    dns.ip("addr add 10.99.0.2/24 dev vd");
    let mut dnsmasq_cmd = dns.cmd("dnsmasq");
    dnsmasq_cmd.args([
        "--no-daemon",
        "--port=0",
        "--interface=vd",
        "--bind-interfaces",
        "--dhcp-range=10.99.0.100,10.99.0.199,255.255.255.0,1h",
        "--dhcp-authoritative",
        "--no-resolv",
        "--no-hosts",
        "--log-dhcp",
        "--no-ping",
    ]);
    dnsmasq_cmd.arg(format!("--dhcp-leasefile={}", dir.path().join("dnsmasq.leases").display()));
    dnsmasq_cmd.arg(format!("--pid-file={}", dir.path().join("dnsmasq.pid").display()));
    let mut dnsmasq = Proc::spawn("dnsmasq", dnsmasq_cmd, &dir.path().join("dnsmasq.log"));
    let conf = format!(
        r#"partition = "lab"
[api]
url = "http://{SERVER_IP}:8080"
token = "t"
[dhcp]
mode = "proxy"
interface = "br0"
server_ip = "{SERVER_IP}"
[tftp]
listen = "{SERVER_IP}:69"
root = "{root}"
[http]
listen = "{SERVER_IP}:8081"
public_url = "http://{SERVER_IP}:8081"
"#,
        root = dir.path().display()
    );
    let pixie = start_pixie(&server, dir.path(), &conf, "1");
    wait_until("dnsmasq DHCP sockets", Duration::from_secs(10), || dnsmasq.log_text().contains("sockets bound"));
    assert!(dnsmasq.alive(), "dnsmasq: {}", dnsmasq.log_text());

    // A plain client gets its address from dnsmasq, and pixie stays silent.
    let plain = client.enter(|| {
        let sock = client_socket(68);
        let m = client_msg(v4::MessageType::Discover, [2, 0, 0, 0, 0, 0x11]);
        // Retransmit as real clients do, in case the bridge was not forwarding yet.
        for _ in 0..3 {
            let r = exchange(&sock, &[encode(&m)], bcast(67), m.xid(), Duration::from_secs(2));
            if !r.is_empty() {
                return r;
            }
        }
        vec![]
    });
    assert!(!plain.is_empty(), "no offer for a plain client\n{}\n{}", dnsmasq.log_text(), pixie.log_text());
    assert!(plain.iter().all(|(_, from)| from.ip().to_string() == "10.99.0.2"), "pixie answered a plain client: {plain:?}");

    // A UEFI PXE client: dnsmasq offers an address, pixie offers the boot file and no address.
    let (offers, ack) = client.enter(|| {
        let sock = client_socket(68);
        let m = pxe_discover([2, 0, 0, 0, 0, 0x12], 7);
        let offers = exchange(&sock, &[encode(&m)], bcast(67), m.xid(), Duration::from_secs(2));
        // Then the boot server request on port 4011, from the address dnsmasq offered.
        let yiaddr = offers.iter().map(|(o, _)| o.yiaddr()).find(|a| !a.is_unspecified()).expect("no address offered");
        std::process::Command::new("ip").args(["addr", "add", &format!("{yiaddr}/24"), "dev", "vc"]).status().unwrap();
        let sock2 = UdpSocket::bind((yiaddr, 0)).unwrap();
        let mut req = client_msg(v4::MessageType::Request, [2, 0, 0, 0, 0, 0x12]);
        req.set_ciaddr(yiaddr);
        req.set_flags(Flags::default());
        req.opts_mut().insert(DhcpOption::ClassIdentifier(b"PXEClient:Arch:00007:UNDI:003016".to_vec()));
        req.opts_mut().insert(DhcpOption::ClientSystemArchitecture(7u16.into()));
        let ack = exchange(&sock2, &[encode(&req)], SocketAddr::from((SERVER_IP, 4011)), req.xid(), Duration::from_secs(2));
        (offers, ack)
    });
    let from_pixie: Vec<_> = offers.iter().filter(|(_, f)| f.ip() == std::net::IpAddr::V4(SERVER_IP)).collect();
    let from_dnsmasq: Vec<_> = offers.iter().filter(|(_, f)| f.ip().to_string() == "10.99.0.2").collect();
    assert_eq!(from_dnsmasq.len(), 1, "{offers:?}");
    assert_eq!(from_pixie.len(), 1, "{offers:?}\n{}", pixie.log_text());
    let proxy = &from_pixie[0].0;
    assert_eq!(proxy.yiaddr(), Ipv4Addr::UNSPECIFIED);
    assert_eq!(proxy.fname(), Some(&b"snponly.efi\0"[..]));
    assert_eq!(proxy.opts().get(OptionCode::ClassIdentifier), Some(&DhcpOption::ClassIdentifier(b"PXEClient".to_vec())));
    assert_eq!(ack.len(), 1, "no proxyDHCP ACK on port 4011\n{}", pixie.log_text());
    assert_eq!(ack[0].0.opts().msg_type(), Some(v4::MessageType::Ack));
    assert_eq!(ack[0].0.fname(), Some(&b"snponly.efi\0"[..]));
    assert_eq!(ack[0].0.yiaddr(), Ipv4Addr::UNSPECIFIED);
}
