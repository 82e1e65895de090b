//! The TFTP server: the listening socket only reads requests; every transfer runs in its own
//! task with its own socket (a new TID, connected to the client), with windowed sending
//! (RFC 7440), retransmission on timeout and a retry limit. Transfers are admitted within
//! limits ([`super::admission`]: in total, per client address, one per client port and file),
//! a client's `timeout` is granted up to `tftp.max_timeout_s`, and no transfer runs longer than
//! `tftp.max_session_s`, so clients that never acknowledge cannot pin pixie's descriptors.

use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::timeout;

use super::admission::Admission;
use super::codec::{self, code, Limits, Packet, Rq};
use super::{resolve, PathError};
use crate::config::TftpConfig;
use crate::metrics::Metrics;

pub struct TftpServer {
    root: PathBuf,
    symlink_targets: Vec<PathBuf>,
    limits: Limits,
    retries: u32,
    max_session: Duration,
    admission: Mutex<Admission>,
    metrics: Arc<Metrics>,
}

/// One admitted transfer; gives its place back when dropped (also when the task panics).
struct Slot {
    server: Arc<TftpServer>,
    peer: SocketAddr,
    file: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.server.admission.lock().unwrap_or_else(|e| e.into_inner()).release(self.peer, &self.file);
        self.server.metrics.tftp_active.dec();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TftpStartError {
    #[error("TFTP root {path}")]
    Root { path: PathBuf, source: io::Error },
    #[error("binding TFTP on {addr}")]
    Bind { addr: SocketAddr, source: io::Error },
}

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    NotFound,
    Denied,
    OptionsRefused,
    Aborted,
    TimedOut,
    /// Ran longer than `tftp.max_session_s`.
    Expired,
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NotFound => "not_found",
            Outcome::Denied => "denied",
            Outcome::OptionsRefused => "options_refused",
            Outcome::Aborted => "aborted",
            Outcome::TimedOut => "timed_out",
            Outcome::Expired => "expired",
            Outcome::Failed => "failed",
        }
    }
}

impl TftpServer {
    pub fn new(cfg: &TftpConfig, metrics: Arc<Metrics>) -> Result<TftpServer, TftpStartError> {
        let root = cfg.root.canonicalize().map_err(|source| TftpStartError::Root { path: cfg.root.clone(), source })?;
        let symlink_targets = cfg.symlink_targets.iter().filter_map(|p| p.canonicalize().ok()).collect();
        Ok(TftpServer {
            root,
            symlink_targets,
            limits: Limits { max_blksize: cfg.max_blksize, max_windowsize: cfg.max_windowsize, max_timeout: cfg.max_timeout },
            retries: cfg.retries,
            max_session: cfg.max_session,
            admission: Mutex::new(Admission::new(cfg.max_transfers, cfg.max_transfers_per_client)),
            metrics,
        })
    }

    /// Serves requests arriving on `sock` until it fails.
    pub async fn serve(self: Arc<Self>, sock: UdpSocket) -> io::Error {
        let local_ip = match sock.local_addr() {
            Ok(a) => a.ip(),
            Err(e) => return e,
        };
        tracing::info!(listen = ?sock.local_addr().ok(), root = %self.root.display(), "TFTP listening");
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors from earlier sends surface here on Linux; they are not fatal.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return e,
            };
            match codec::decode(&buf[..n]) {
                Ok(Packet::Rrq(rq)) => {
                    let admitted = self.admission.lock().unwrap_or_else(|e| e.into_inner()).admit(peer, &rq.filename);
                    if let Err(why) = admitted {
                        self.metrics.tftp_refused.inc([why.label()]);
                        tracing::debug!(%peer, file = %rq.filename, reason = why.label(), "TFTP read request dropped");
                        continue;
                    }
                    self.metrics.tftp_active.inc();
                    let slot = Slot { server: self.clone(), peer, file: rq.filename.clone() };
                    let me = self.clone();
                    tokio::spawn(async move {
                        let _slot = slot;
                        let filename = rq.filename.clone();
                        let outcome = timeout(me.max_session, me.transfer(local_ip, peer, rq)).await.unwrap_or(Outcome::Expired);
                        me.metrics.tftp_transfers.inc([outcome.label()]);
                        match outcome {
                            Outcome::Ok => tracing::info!(%peer, file = %filename, "TFTP transfer complete"),
                            Outcome::OptionsRefused => {
                                tracing::debug!(%peer, file = %filename, "client took the OACK's tsize and ended the transfer (UEFI habit)")
                            }
                            other => tracing::info!(%peer, file = %filename, result = other.label(), "TFTP transfer ended"),
                        }
                    });
                }
                Ok(Packet::Wrq(rq)) => {
                    self.metrics.tftp_transfers.inc(["write_refused"]);
                    tracing::info!(%peer, file = %rq.filename, "TFTP write refused (read-only server)");
                    let _ = sock.send_to(&codec::error(code::ACCESS_VIOLATION, "read-only server"), peer).await;
                }
                Ok(other) => {
                    tracing::debug!(%peer, packet = ?packet_kind(&other), "TFTP packet for no transfer ignored");
                }
                Err(e) => {
                    self.metrics.tftp_transfers.inc(["malformed"]);
                    tracing::info!(%peer, error = %e, len = n, "malformed TFTP request ignored");
                }
            }
        }
    }

    async fn transfer(&self, local_ip: std::net::IpAddr, peer: SocketAddr, rq: Rq) -> Outcome {
        let sock = match UdpSocket::bind(SocketAddr::new(local_ip, 0)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "no socket for a TFTP transfer");
                return Outcome::Failed;
            }
        };
        if sock.connect(peer).await.is_err() {
            return Outcome::Failed;
        }
        let mode = rq.mode.to_ascii_lowercase();
        if mode != "octet" && mode != "netascii" {
            let _ = sock.send(&codec::error(code::ILLEGAL_OPERATION, "only octet mode")).await;
            return Outcome::Denied;
        }
        let path = match resolve(&self.root, &self.symlink_targets, &rq.filename) {
            Ok(p) => p,
            Err(e) => {
                let (c, outcome) = match e {
                    PathError::NotFound(_) | PathError::NotAFile(_) => (code::FILE_NOT_FOUND, Outcome::NotFound),
                    PathError::Escapes(_) | PathError::BadChar(_) => (code::ACCESS_VIOLATION, Outcome::Denied),
                };
                tracing::info!(%peer, error = %e, "TFTP request refused");
                let _ = sock.send(&codec::error(c, &e.to_string())).await;
                return outcome;
            }
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(_) => {
                let _ = sock.send(&codec::error(code::FILE_NOT_FOUND, "cannot open file")).await;
                return Outcome::NotFound;
            }
        };
        let size = match file.metadata() {
            Ok(m) => m.len(),
            Err(_) => return Outcome::Failed,
        };
        let neg = codec::negotiate(&rq.options, size, &self.limits);
        tracing::debug!(%peer, file = %rq.filename, size, blksize = neg.blksize, windowsize = neg.windowsize, "TFTP transfer starts");
        let mut rbuf = vec![0u8; 1024];
        if !neg.oack.is_empty() {
            let oack = codec::encode(&Packet::Oack { options: neg.oack.clone() });
            let mut tries = 0;
            loop {
                if sock.send(&oack).await.is_err() {
                    return Outcome::Failed;
                }
                match timeout(neg.timeout, sock.recv(&mut rbuf)).await {
                    Err(_) => {
                        tries += 1;
                        if tries > self.retries {
                            return Outcome::TimedOut;
                        }
                    }
                    Ok(Err(_)) => return Outcome::Aborted,
                    Ok(Ok(n)) => match codec::decode(&rbuf[..n]) {
                        Ok(Packet::Ack { block: 0 }) => break,
                        Ok(Packet::Error { code: code::OPTION_REFUSED, .. }) => return Outcome::OptionsRefused,
                        Ok(Packet::Error { code: 0, .. }) if rq.options.iter().any(|(k, _)| k.eq_ignore_ascii_case("tsize")) => {
                            return Outcome::OptionsRefused
                        }
                        Ok(Packet::Error { .. }) => return Outcome::Aborted,
                        _ => {}
                    },
                }
            }
        }
        let blk = u64::from(neg.blksize);
        let last = size / blk + 1; // the last block is shorter than blksize, maybe empty
        let window = u64::from(neg.windowsize);
        let mut base: u64 = 1;
        let mut tries = 0;
        let mut pkt = Vec::with_capacity(neg.blksize as usize + 4);
        let mut wbuf = Vec::new();
        let mut gso_segment =
            if window > 1 && (blk as usize + 4) * 2 <= GSO_MAX_BYTES { enable_gso(&sock, blk as usize + 4) } else { None };
        let mut sent_bytes = 0u64;
        loop {
            let end = (base + window - 1).min(last);
            // One read for the whole window, then one datagram per block.
            let first_off = (base - 1) * blk;
            let wlen = size.saturating_sub(first_off).min((end - base + 1) * blk) as usize;
            wbuf.resize(wlen, 0);
            if let Err(e) = read_exact_at(&file, &mut wbuf, first_off) {
                tracing::warn!(error = %e, path = %path.display(), "TFTP read failed");
                let _ = sock.send(&codec::error(code::NOT_DEFINED, "read error")).await;
                return Outcome::Failed;
            }
            // With UDP GSO the window's datagrams (all 4 + blksize bytes, only the file's last
            // one shorter) leave in as few sends as possible; without it, one send per block.
            let per_send = if gso_segment.is_some() { (GSO_MAX_BYTES / (blk as usize + 4)).max(1) as u64 } else { 1 };
            let mut b = base;
            while b <= end {
                let upto = (b + per_send - 1).min(end);
                pkt.clear();
                for blkno in b..=upto {
                    let rel = ((blkno - base) * blk) as usize;
                    let len = wlen.saturating_sub(rel).min(blk as usize);
                    codec::encode_data_header(&mut pkt, blkno as u16);
                    pkt.extend_from_slice(&wbuf[rel..rel + len]);
                    sent_bytes += len as u64;
                }
                if let Err(e) = sock.send(&pkt).await {
                    if e.kind() == io::ErrorKind::ConnectionRefused {
                        return Outcome::Aborted;
                    }
                    if gso_segment.is_some() && upto > b {
                        // GSO refused at send time (e.g. a device without it): per-block from now on.
                        tracing::debug!(error = %e, "UDP GSO send failed; falling back to one send per block");
                        gso_segment = None;
                        disable_gso(&sock);
                        break;
                    }
                }
                b = upto + 1;
            }
            // Wait for an ACK inside this window; older duplicates are ignored (no Sorcerer's
            // Apprentice), a timeout resends the window from the first unacknowledged block.
            let acked = loop {
                match timeout(neg.timeout, sock.recv(&mut rbuf)).await {
                    Err(_) => break None,
                    Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => return Outcome::Aborted,
                    Ok(Err(_)) => return Outcome::Failed,
                    Ok(Ok(n)) => match codec::decode(&rbuf[..n]) {
                        Ok(Packet::Ack { block }) => {
                            if let Some(a) = (base - 1..=end).rev().find(|a| *a as u16 == block) {
                                break Some(a);
                            }
                        }
                        Ok(Packet::Error { .. }) => return Outcome::Aborted,
                        _ => {}
                    },
                }
            };
            match acked {
                None => {
                    tries += 1;
                    if tries > self.retries {
                        return Outcome::TimedOut;
                    }
                }
                Some(a) => {
                    if a >= base {
                        tries = 0;
                    }
                    if a == last {
                        self.metrics.tftp_bytes.inc_by(sent_bytes);
                        return Outcome::Ok;
                    }
                    base = a + 1;
                }
            }
        }
    }
}

/// Largest payload handed to one GSO send (the kernel's limit is 64 KiB minus headers).
const GSO_MAX_BYTES: usize = 60_000;
const UDP_SEGMENT: libc::c_int = 103;

/// Turns on UDP GSO (`UDP_SEGMENT`) for a transfer socket; `None` where the kernel refuses.
fn enable_gso(sock: &UdpSocket, segment: usize) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let seg = libc::c_int::try_from(segment).ok()?;
    // SAFETY: setsockopt reads one c_int from a live stack variable.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&seg as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    (rc == 0).then_some(segment)
}

fn disable_gso(sock: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let zero: libc::c_int = 0;
    // SAFETY: as in enable_gso.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_UDP,
            UDP_SEGMENT,
            (&zero as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn read_exact_at(f: &File, mut buf: &mut [u8], mut off: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match f.read_at(buf, off) {
            Ok(0) => {
                // The file shrank under us: send zeros rather than a wrong length.
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                off += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn packet_kind(p: &Packet) -> &'static str {
    match p {
        Packet::Rrq(_) => "RRQ",
        Packet::Wrq(_) => "WRQ",
        Packet::Data { .. } => "DATA",
        Packet::Ack { .. } => "ACK",
        Packet::Error { .. } => "ERROR",
        Packet::Oack { .. } => "OACK",
    }
}

impl TftpServer {
    /// Whether `file` can be served; logs why not (at start, for the configured boot files).
    pub fn check_file(&self, file: &str) -> bool {
        match resolve(&self.root, &self.symlink_targets, file) {
            Ok(_) => true,
            Err(PathError::Escapes(_)) => {
                tracing::warn!(
                    file, root = %self.root.display(),
                    "boot file is a symlink out of the TFTP root and will be refused: add its target directory to tftp.symlink_targets (Debian: /boot for ipxe.efi) or point the root at real files"
                );
                false
            }
            Err(e) => {
                tracing::warn!(file, root = %self.root.display(), error = %e, "boot file cannot be served over TFTP");
                false
            }
        }
    }
}

/// Starts the server on `cfg.listen` in a background task; `boot_files` are checked and
/// warned about when they cannot be served.
pub async fn start(cfg: &TftpConfig, metrics: Arc<Metrics>, boot_files: &[&str]) -> Result<SocketAddr, TftpStartError> {
    let server = Arc::new(TftpServer::new(cfg, metrics)?);
    for f in boot_files {
        server.check_file(f);
    }
    let sock = UdpSocket::bind(cfg.listen).await.map_err(|source| TftpStartError::Bind { addr: cfg.listen, source })?;
    let addr = sock.local_addr().map_err(|source| TftpStartError::Bind { addr: cfg.listen, source })?;
    tokio::spawn(async move {
        let e = server.serve(sock).await;
        tracing::error!(error = %e, "TFTP socket failed; TFTP stopped");
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn server(root: &std::path::Path) -> (SocketAddr, Arc<Metrics>) {
        server_with(root, |_| {}).await
    }

    async fn server_with(root: &std::path::Path, change: impl FnOnce(&mut TftpConfig)) -> (SocketAddr, Arc<Metrics>) {
        let mut cfg = TftpConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            root: root.to_path_buf(),
            symlink_targets: vec![],
            max_blksize: 65464,
            max_windowsize: 64,
            retries: 3,
            max_transfers: 256,
            max_transfers_per_client: 32,
            max_timeout: Duration::from_secs(5),
            max_session: Duration::from_secs(120),
        };
        change(&mut cfg);
        let m = Arc::new(Metrics::default());
        (start(&cfg, m.clone(), &[]).await.unwrap(), m)
    }

    /// A minimal client: RRQ with options, ACK everything in order, return the bytes.
    async fn fetch(
        addr: SocketAddr,
        file: &str,
        opts: &[(&str, &str)],
        drop_first_of_block: Option<u16>,
    ) -> Result<Vec<u8>, (u16, String)> {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rq = Rq {
            filename: file.into(),
            mode: "octet".into(),
            options: opts.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        };
        sock.send_to(&codec::encode(&Packet::Rrq(rq)), addr).await.unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70000];
        let mut expect: u16 = 1;
        let mut blksize = 512usize;
        let mut window = 1u16;
        let mut dropped = false;
        let mut in_window = 0u16;
        loop {
            let (n, from) = timeout(Duration::from_secs(5), sock.recv_from(&mut buf)).await.expect("server went quiet").unwrap();
            match codec::decode(&buf[..n]).unwrap() {
                Packet::Oack { options } => {
                    for (k, v) in options {
                        match k.as_str() {
                            "blksize" => blksize = v.parse().unwrap(),
                            "windowsize" => window = v.parse().unwrap(),
                            _ => {}
                        }
                    }
                    sock.send_to(&codec::encode(&Packet::Ack { block: 0 }), from).await.unwrap();
                }
                Packet::Data { block, data } => {
                    if Some(block) == drop_first_of_block && !dropped {
                        dropped = true;
                        continue;
                    }
                    if block != expect {
                        continue;
                    }
                    out.extend_from_slice(&data);
                    expect = expect.wrapping_add(1);
                    in_window += 1;
                    let done = data.len() < blksize;
                    if done || in_window == window {
                        in_window = 0;
                        sock.send_to(&codec::encode(&Packet::Ack { block }), from).await.unwrap();
                    }
                    if done {
                        return Ok(out);
                    }
                }
                Packet::Error { code, message } => return Err((code, message)),
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    fn content(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn serves_files_with_every_option() {
        let dir = tempfile::tempdir().unwrap();
        let data = content(200_000);
        std::fs::write(dir.path().join("f.bin"), &data).unwrap();
        std::fs::write(dir.path().join("exact.bin"), content(1024)).unwrap();
        std::fs::write(dir.path().join("empty.bin"), b"").unwrap();
        let (addr, m) = server(dir.path()).await;
        assert_eq!(fetch(addr, "f.bin", &[], None).await.unwrap(), data);
        assert_eq!(fetch(addr, "/f.bin", &[("blksize", "1468"), ("tsize", "0")], None).await.unwrap(), data);
        assert_eq!(fetch(addr, "f.bin", &[("blksize", "1468"), ("windowsize", "16")], None).await.unwrap(), data);
        assert_eq!(
            fetch(addr, "f.bin", &[("blksize", "99999"), ("windowsize", "999999"), ("timeout", "1")], None).await.unwrap(),
            data
        );
        assert_eq!(fetch(addr, "exact.bin", &[], None).await.unwrap(), content(1024));
        assert_eq!(fetch(addr, "empty.bin", &[("tsize", "0")], None).await.unwrap(), b"");
        // A lost DATA packet is resent after the timeout.
        assert_eq!(
            fetch(addr, "f.bin", &[("blksize", "1024"), ("windowsize", "4"), ("timeout", "1")], Some(6)).await.unwrap(),
            data
        );
        wait_metric(&m, "ok", 7).await;
    }

    #[tokio::test]
    async fn refuses_escapes_writes_and_garbage_and_keeps_serving() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), b"hello").unwrap();
        let (addr, _) = server(dir.path()).await;
        assert_eq!(fetch(addr, "../etc/passwd", &[], None).await.unwrap_err().0, code::ACCESS_VIOLATION);
        assert_eq!(fetch(addr, "nope", &[], None).await.unwrap_err().0, code::FILE_NOT_FOUND);
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(b"\x00\x02a\x00octet\x00", addr).await.unwrap();
        let mut buf = [0u8; 600];
        let (n, _) = timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await.unwrap().unwrap();
        assert!(matches!(codec::decode(&buf[..n]), Ok(Packet::Error { code: code::ACCESS_VIOLATION, .. })));
        for junk in [&b""[..], b"\x00", b"\x00\x01abc", b"\x00\x63xx", b"\x00\x04\x00\x01"] {
            sock.send_to(junk, addr).await.unwrap();
        }
        assert_eq!(fetch(addr, "a", &[], None).await.unwrap(), b"hello");
    }

    #[tokio::test]
    async fn uefi_tsize_probe_then_real_request() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ipxe.efi"), content(3000)).unwrap();
        let (addr, m) = server(dir.path()).await;
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rq = Rq {
            filename: "ipxe.efi".into(),
            mode: "octet".into(),
            options: vec![("tsize".into(), "0".into()), ("blksize".into(), "1468".into())],
        };
        sock.send_to(&codec::encode(&Packet::Rrq(rq)), addr).await.unwrap();
        let mut buf = [0u8; 600];
        let (n, from) = sock.recv_from(&mut buf).await.unwrap();
        let Packet::Oack { options } = codec::decode(&buf[..n]).unwrap() else { panic!() };
        assert!(options.contains(&("tsize".to_string(), "3000".to_string())));
        sock.send_to(&codec::error(code::OPTION_REFUSED, "tsize only"), from).await.unwrap();
        assert_eq!(fetch(addr, "ipxe.efi", &[("blksize", "1468")], None).await.unwrap(), content(3000));
        wait_metric(&m, "options_refused", 1).await;
    }

    fn rrq(file: &str, opts: &[(&str, &str)]) -> Vec<u8> {
        codec::encode(&Packet::Rrq(Rq {
            filename: file.into(),
            mode: "octet".into(),
            options: opts.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
        }))
    }

    #[tokio::test]
    async fn a_long_timeout_is_left_out_and_a_repeated_rrq_starts_no_second_transfer() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), content(5000)).unwrap();
        let (addr, m) = server(dir.path()).await;
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let req = rrq("f", &[("timeout", "255"), ("blksize", "1024")]);
        for _ in 0..5 {
            sock.send_to(&req, addr).await.unwrap();
        }
        let mut buf = [0u8; 2048];
        let (n, _) = timeout(Duration::from_secs(2), sock.recv_from(&mut buf)).await.unwrap().unwrap();
        let Packet::Oack { options } = codec::decode(&buf[..n]).unwrap() else { panic!("no OACK") };
        assert_eq!(
            options,
            vec![("blksize".to_string(), "1024".to_string())],
            "timeout 255 is not granted (nor lowered: RFC 2349)"
        );
        for _ in 0..100 {
            if m.tftp_refused.get(["duplicate"]) == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(m.tftp_refused.get(["duplicate"]), 4);
        assert_eq!(m.tftp_active.get(), 1, "one transfer for five copies of one RRQ");
        // Unanswered, that transfer retransmits every second (the default) and then gives up.
        wait_metric_for(&m, "timed_out", 1, Duration::from_secs(12)).await;
        assert_eq!(m.tftp_active.get(), 0);
    }

    #[tokio::test]
    async fn no_transfer_runs_longer_than_max_session() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), content(5000)).unwrap();
        let (addr, m) = server_with(dir.path(), |c| {
            c.retries = 100;
            c.max_session = Duration::from_secs(1);
        })
        .await;
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&rrq("f", &[("timeout", "1")]), addr).await.unwrap();
        // Never acknowledged: 100 retries of 1 s would keep it for 100 s.
        wait_metric_for(&m, "expired", 1, Duration::from_secs(4)).await;
        assert_eq!(m.tftp_active.get(), 0);
    }

    async fn wait_metric_for(m: &Metrics, result: &'static str, at_least: u64, within: Duration) {
        let end = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < end {
            if m.tftp_transfers.get([result]) >= at_least {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("fewer than {at_least} transfers counted as {result} within {within:?}");
    }

    async fn wait_metric(m: &Metrics, result: &'static str, at_least: u64) {
        for _ in 0..100 {
            if m.tftp_transfers.get([result]) >= at_least {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("fewer than {at_least} transfers counted as {result}");
    }
}
