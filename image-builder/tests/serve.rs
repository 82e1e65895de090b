//! `image-builder serve` as a real process on 127.0.0.1:0, spoken to over plain `TcpStream`s:
//! full GET, a Range request, HEAD, traversal attempts (`..`, `%2e%2e`, a symlink leading out),
//! a missing file.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

struct Server {
    child: Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `<tmp>/images/` is served; `<tmp>/secret` lies outside it.
fn start(content: &[u8]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::write(images.join("test-os-1.tar.zst"), content).unwrap();
    std::fs::write(dir.path().join("secret"), b"SECRET-OUTSIDE").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), images.join("escape")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_image-builder"))
        .arg("serve")
        .arg("--dir")
        .arg(&images)
        .args(["--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start image-builder serve");
    let mut server = Server { child, addr: String::new(), dir };
    let stderr = server.child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("no `serving … on http://…` line on stderr");
        if let Some((_, addr)) = line.split_once(" on http://") {
            assert!(line.starts_with("serving "), "{line}");
            server.addr = addr.trim().to_string();
            break;
        }
    }
    assert!(!server.addr.ends_with(":0"), "real port printed: {}", server.addr);
    server
}

struct Response {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

fn request(addr: &str, method: &str, target: &str, extra: &str) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "{method} {target} HTTP/1.1\r\nHost: {addr}\r\n{extra}\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8(raw[..end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    Response { status, headers, body: raw[end + 4..].to_vec() }
}

fn content() -> Vec<u8> {
    // 200 KiB of varied bytes: more than one socket buffer.
    (0..200 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

#[test]
fn serves_files_ranges_and_head() {
    let data = content();
    let srv = start(&data);
    let len = data.len();

    let r = request(&srv.addr, "GET", "/test-os-1.tar.zst", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-length"], len.to_string());
    assert!(r.body == data, "full body equals the file");

    let r = request(&srv.addr, "GET", "/test-os-1.tar.zst", "Range: bytes=1000-1999\r\n");
    assert_eq!(r.status, 206);
    assert_eq!(r.headers["content-range"], format!("bytes 1000-1999/{len}"));
    assert_eq!(r.headers["content-length"], "1000");
    assert!(r.body == data[1000..2000]);

    let r = request(&srv.addr, "GET", "/test-os-1.tar.zst", &format!("Range: bytes={}-\r\n", len - 10));
    assert_eq!(r.status, 206);
    assert!(r.body == data[len - 10..]);

    let r = request(&srv.addr, "GET", "/test-os-1.tar.zst", &format!("Range: bytes={len}-\r\n"));
    assert_eq!(r.status, 416);
    assert_eq!(r.headers["content-range"], format!("bytes */{len}"));

    let r = request(&srv.addr, "HEAD", "/test-os-1.tar.zst", "");
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-length"], len.to_string());
    assert!(r.body.is_empty(), "HEAD has no body");

    let r = request(&srv.addr, "GET", "/missing.tar.zst", "");
    assert_eq!(r.status, 404);

    let r = request(&srv.addr, "POST", "/test-os-1.tar.zst", "");
    assert_eq!(r.status, 405);
}

#[test]
fn traversal_is_refused() {
    let srv = start(b"image");
    assert!(srv.dir.path().join("secret").is_file());
    for target in [
        "/../secret",
        "/%2e%2e/secret",
        "/%2E%2E%2fsecret",
        "/./../secret",
        "/escape",
        &format!("/{}", srv.dir.path().join("secret").display()),
    ] {
        let r = request(&srv.addr, "GET", target, "");
        assert!(matches!(r.status, 403 | 404), "{target}: {}", r.status);
        assert!(!String::from_utf8_lossy(&r.body).contains("SECRET"), "{target}");
    }
    let mut s = TcpStream::connect(&srv.addr).unwrap();
    s.write_all(b"garbage\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 400 "), "{raw}");
}
