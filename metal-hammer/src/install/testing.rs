//! A small HTTP/1.1 file server for the install tests and benchmarks: serves one byte buffer
//! at every path, honours `Range: bytes=<n>-`, and can be told to cut connections mid-body.
//! It binds 127.0.0.1 on an ephemeral port and runs a thread per connection.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the server does; change it while it runs.
#[derive(Debug, Default)]
pub struct ServerBehaviour {
    /// Cut each of the next `cuts` responses after this many body bytes.
    pub cut_after: AtomicU64,
    pub cuts: AtomicU64,
    /// Answer Range requests with the whole file (200), as some servers do.
    pub ignore_range: AtomicBool,
}

pub struct ImageServer {
    pub port: u16,
    pub behaviour: Arc<ServerBehaviour>,
    /// The `Range` header of every request, `None` when absent.
    pub ranges: Arc<Mutex<Vec<Option<String>>>>,
}

impl ImageServer {
    pub fn start(body: Vec<u8>) -> std::io::Result<ImageServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let body = Arc::new(body);
        let behaviour = Arc::new(ServerBehaviour::default());
        let ranges = Arc::new(Mutex::new(Vec::new()));
        let (b, r) = (behaviour.clone(), ranges.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (body, b, r) = (body.clone(), b.clone(), r.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &body, &b, &r);
                });
            }
        });
        Ok(ImageServer { port, behaviour, ranges })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{}", self.port, path.trim_start_matches('/'))
    }

    /// Cuts the next `times` responses after `after` body bytes.
    pub fn cut(&self, after: u64, times: u64) {
        self.behaviour.cut_after.store(after, Ordering::SeqCst);
        self.behaviour.cuts.store(times, Ordering::SeqCst);
    }
}

fn serve(stream: TcpStream, body: &[u8], b: &ServerBehaviour, ranges: &Mutex<Vec<Option<String>>>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut range = None;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("range") {
                    range = Some(v.trim().to_string());
                }
            }
        }
        ranges.lock().unwrap().push(range.clone());
        let start = range
            .as_deref()
            .filter(|_| !b.ignore_range.load(Ordering::SeqCst))
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok());
        let (status, from) = match start {
            Some(s) if s > body.len() => {
                write!(out, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n")?;
                continue;
            }
            Some(s) => {
                (format!("206 Partial Content\r\nContent-Range: bytes {s}-{}/{}", body.len().saturating_sub(1), body.len()), s)
            }
            None => ("200 OK".to_string(), 0),
        };
        let rest = &body[from..];
        write!(out, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n\r\n", rest.len())?;
        let cut = b.cuts.load(Ordering::SeqCst) > 0 && b.cuts.fetch_sub(1, Ordering::SeqCst) > 0;
        if cut {
            let n = (b.cut_after.load(Ordering::SeqCst) as usize).min(rest.len());
            out.write_all(&rest[..n])?;
            out.flush()?;
            let _ = out.shutdown(std::net::Shutdown::Both);
            return Ok(());
        }
        out.write_all(rest)?;
        out.flush()?;
    }
}

/// A small root filesystem as a tar stream: directories with modes, a kernel behind a symlink,
/// an initrd, an executable, a hard link, a setuid file, a file on the ESP and one large file
/// that spans many chunks.
pub fn sample_rootfs_tar() -> Vec<u8> {
    fn h(kind: tar::EntryType, size: u64, mode: u32, uid: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1_700_000_000);
        h
    }
    use tar::EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};
    let mut b = tar::Builder::new(Vec::new());
    for (dir, mode) in [
        ("./", 0o755),
        ("./boot/", 0o755),
        ("./boot/efi/", 0o700),
        ("./boot/efi/EFI/", 0o700),
        ("./boot/efi/EFI/BOOT/", 0o700),
        ("./etc/", 0o755),
        ("./etc/systemd/", 0o755),
        ("./usr/", 0o755),
        ("./usr/bin/", 0o755),
        ("./root/", 0o700),
        ("./tmp/", 0o1777),
        ("./home/", 0o755),
        ("./home/user/", 0o750),
    ] {
        b.append_data(&mut h(D, 0, mode, 0), dir, std::io::empty()).unwrap();
    }
    let files: [(&str, &[u8], u32, u64); 7] = [
        ("./boot/vmlinuz-6.1.0-test", b"not really a kernel", 0o644, 0),
        ("./boot/initrd.img-6.1.0-test", b"not really an initrd", 0o644, 0),
        ("./boot/efi/EFI/BOOT/BOOTX64.EFI", b"MZ efi binary", 0o644, 0),
        ("./etc/os-release", b"NAME=\"Test OS\"\nID=test-os\n", 0o644, 0),
        ("./usr/bin/tool", b"#!/bin/sh\necho tool\n", 0o755, 0),
        ("./usr/bin/su", b"setuid", 0o4755, 0),
        ("./home/user/notes", b"owned by 1000", 0o640, 1000),
    ];
    for (name, data, mode, uid) in files {
        b.append_data(&mut h(F, data.len() as u64, mode, uid), name, data).unwrap();
    }
    b.append_link(&mut h(S, 0, 0o777, 0), "./boot/vmlinuz", "vmlinuz-6.1.0-test").unwrap();
    b.append_link(&mut h(S, 0, 0o777, 0), "./boot/initrd.img", "/boot/initrd.img-6.1.0-test").unwrap();
    b.append_link(&mut h(L, 0, 0o755, 0), "./usr/bin/tool-again", "./usr/bin/tool").unwrap();
    let big = sample_big_file();
    b.append_data(&mut h(F, big.len() as u64, 0o644, 0), "./usr/big.bin", &big[..]).unwrap();
    b.into_inner().unwrap()
}

/// Three MiB of deterministic, moderately compressible bytes.
pub fn sample_big_file() -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..3 << 20)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if i % 7 == 0 {
                (x & 0xff) as u8
            } else {
                (i % 251) as u8
            }
        })
        .collect()
}

/// zstd at level 3 as independent frames of `frame` bytes each, with content size and
/// checksum (as image-builder writes OS images), and the SHA-256 of the compressed bytes.
pub fn compress_frames(data: &[u8], frame: usize) -> (Vec<u8>, String) {
    use sha2::Digest;
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true)).unwrap();
    let mut z = Vec::new();
    for chunk in data.chunks(frame.max(1)) {
        z.extend(c.compress(chunk).unwrap());
    }
    let sha = hex::encode(sha2::Sha256::digest(&z));
    (z, sha)
}

/// zstd at level 3, and the lower-case hex SHA-256 of the compressed bytes.
pub fn compress(data: &[u8]) -> (Vec<u8>, String) {
    use sha2::Digest;
    let z = zstd::encode_all(data, 3).unwrap();
    let sha = hex::encode(sha2::Sha256::digest(&z));
    (z, sha)
}
