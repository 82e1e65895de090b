//! The pixie binary on loopback under a TFTP flood: 300 read requests asking `timeout 255`
//! from 300 source ports of one address (127.0.0.2), none of which ever acknowledges, then a
//! real client (`atftp`, from 127.0.0.1) that must get its file within seconds. pixie starts
//! with a soft descriptor limit of 256 (as under a service manager's default), which each
//! stalled transfer used to eat two of, for up to 255 s × (retries + 1).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{wait_until, write_pattern, Proc};

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.1 200").then_some(out)
}

fn rrq(file: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![0, 1];
    for s in [file, "octet"].into_iter().chain(opts.iter().flat_map(|(k, v)| [*k, *v])) {
        b.extend_from_slice(s.as_bytes());
        b.push(0);
    }
    b
}

#[test]
fn a_flood_of_stalled_rrqs_does_not_starve_a_real_client() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tftp");
    std::fs::create_dir(&root).unwrap();
    let data = write_pattern(&root.join("undionly.kpxe"), 100_000);
    let (tftp, http) = (free_udp_port(), free_tcp_port());
    let conf = dir.path().join("pixie.toml");
    std::fs::write(
        &conf,
        format!(
            "partition = \"lab\"\n[api]\nurl = \"http://127.0.0.1:9\"\ntoken = \"t\"\n[tftp]\nlisten = \"127.0.0.1:{tftp}\"\nroot = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\npublic_url = \"http://127.0.0.1:{http}\"\n",
            root.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new(common::pixie_bin());
    cmd.arg("--config").arg(&conf).env("RUST_LOG", "info");
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            lim.rlim_cur = 256;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut pixie = Proc::spawn("pixie", cmd, &dir.path().join("pixie.log"));
    wait_until("pixie /healthz", Duration::from_secs(20), || {
        assert!(pixie.alive(), "pixie exited:\n{}", pixie.log_text());
        http_get(http, "/healthz").is_some()
    });

    // The flood: bounded (300 packets, one per socket), and the sockets stay open and silent,
    // so pixie's transfers get neither an ACK nor an ICMP error back.
    let server = SocketAddr::from(([127, 0, 0, 1], tftp));
    let hostile: Vec<UdpSocket> = (0..300).map(|_| UdpSocket::bind("127.0.0.2:0").unwrap()).collect();
    let flood = rrq("undionly.kpxe", &[("timeout", "255"), ("blksize", "1468")]);
    for s in &hostile {
        s.send_to(&flood, server).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));

    let out = dir.path().join("fetched");
    let started = Instant::now();
    let atftp = Command::new("timeout")
        .args(["15", "atftp", "--get", "-r", "undionly.kpxe", "-l"])
        .arg(&out)
        .args(["127.0.0.1", &tftp.to_string()])
        .output()
        .unwrap();
    let took = started.elapsed();
    assert!(
        atftp.status.success(),
        "atftp got nothing within {took:?} during the flood: {}{}\npixie:\n{}",
        String::from_utf8_lossy(&atftp.stdout),
        String::from_utf8_lossy(&atftp.stderr),
        tail(&pixie.log_text())
    );
    assert_eq!(std::fs::read(&out).unwrap(), data);
    assert!(took < Duration::from_secs(8), "atftp needed {took:?}");
    assert!(pixie.alive());

    let metrics = http_get(http, "/metrics").expect("/metrics");
    let value = |key: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} missing in\n{metrics}"))
    };
    // Some of the burst may have overflowed the socket's receive buffer; of the rest, at most
    // tftp.max_transfers_per_client (32) run and the others were dropped.
    let refused = value("pixie_tftp_refused_total{reason=\"client_limit\"}");
    assert!(refused >= 150, "only {refused} of 300 flood requests refused\n{metrics}");
    assert!(value("pixie_tftp_transfers_active ") <= 32, "{metrics}");
    assert!(value("process_max_fds") > 256, "the soft descriptor limit was not raised\n{metrics}");
    drop(hostile);
}

fn tail(log: &str) -> String {
    log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}
