//! pixie's HTTP connection loop on loopback: local files by `sendfile(2)` (whole, ranged, HEAD,
//! 404, traversal), keep-alive with file and router requests mixed on one connection, a request
//! with a body handed to hyper, a client that goes away in the middle of a body, slow and silent
//! clients on both paths closed after the (here short) timeouts, and the connection limit.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use pixie::api::{ApiClient, DecisionCache};
use pixie::files::{Layout, LocalDir};
use pixie::http::{HttpLimits, HttpState, StaticDirs};
use pixie::metrics::Metrics;

struct Server {
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    _dir: tempfile::TempDir,
    hammer_data: Vec<u8>,
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ (i / 251) as u8).collect()
}

/// pixie's HTTP side on 127.0.0.1 with `/hammer` and `/boot` in a temp dir; no API listens.
fn start() -> Server {
    start_with(HttpLimits::default())
}

fn start_with(limits: HttpLimits) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let hammer = dir.path().join("hammer");
    let boot = dir.path().join("boot");
    std::fs::create_dir_all(hammer.join("sub")).unwrap();
    std::fs::create_dir_all(boot.join("efi")).unwrap();
    let hammer_data = pattern(3_000_000);
    std::fs::write(hammer.join("initrd.img"), &hammer_data).unwrap();
    std::fs::write(hammer.join("empty"), b"").unwrap();
    std::fs::write(boot.join("efi/snponly.efi"), b"efi-binary").unwrap();
    std::fs::write(dir.path().join("secret"), b"secret").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), hammer.join("escape")).unwrap();
    let metrics = Arc::new(Metrics::default());
    let state = Arc::new(HttpState {
        decisions: DecisionCache::new(
            ApiClient::new("http://127.0.0.1:9", "t", Duration::from_millis(500)),
            Duration::from_secs(1),
        ),
        hammer: Some(LocalDir::new(&hammer, Layout::Flat)),
        hammer_upstream: None,
        boot: Some(LocalDir::new(&boot, Layout::Tree)),
        partition: "lab".into(),
        public_url: "http://127.0.0.1:1".into(),
        metrics: metrics.clone(),
        limits,
    });
    let dirs = StaticDirs { images: None };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            pixie::http::serve(listener, state, &dirs, std::future::pending()).await;
        });
    });
    let addr = rx.recv().unwrap();
    Server { addr, metrics, _dir: dir, hammer_data }
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

/// Reads one response; `head_only` for the answer to HEAD (no body despite the length).
fn read_answer(r: &mut BufReader<TcpStream>, head_only: bool) -> Answer {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status: u16 = line.split_whitespace().nth(1).unwrap_or_else(|| panic!("status line {line:?}")).parse().unwrap();
    let mut headers = vec![];
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').unwrap();
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    let mut a = Answer { status, headers, body: vec![] };
    if head_only {
        return a;
    }
    if let Some(len) = a.header("content-length") {
        let mut body = vec![0; len.parse().unwrap()];
        r.read_exact(&mut body).unwrap();
        a.body = body;
    } else if a.header("transfer-encoding") == Some("chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            a.body.extend_from_slice(&chunk[..n]);
        }
    }
    a
}

fn ask(r: &mut BufReader<TcpStream>, request: &str) -> Answer {
    r.get_mut().write_all(request.as_bytes()).unwrap();
    read_answer(r, request.starts_with("HEAD "))
}

fn get(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nhost: t\r\n{extra}\r\n")
}

#[test]
fn files_whole_ranged_head_and_refused() {
    let s = start();
    let mut c = connect(s.addr);
    let a = ask(&mut c, &get("/hammer/initrd.img", ""));
    assert_eq!(a.status, 200);
    assert_eq!(a.header("accept-ranges"), Some("bytes"));
    assert!(a.body == s.hammer_data, "whole file");
    let a = ask(&mut c, &get("/hammer/initrd.img", "range: bytes=1000-1999\r\n"));
    assert_eq!(a.status, 206);
    assert_eq!(a.header("content-range"), Some("bytes 1000-1999/3000000"));
    assert_eq!(a.body, &s.hammer_data[1000..2000]);
    let a = ask(&mut c, &get("/hammer/initrd.img?x=1", "range: bytes=-10\r\n"));
    assert_eq!((a.status, a.body.as_slice()), (206, &s.hammer_data[2_999_990..]));
    let a = ask(&mut c, "HEAD /hammer/initrd.img HTTP/1.1\r\nhost: t\r\n\r\n");
    assert_eq!((a.status, a.header("content-length")), (200, Some("3000000")));
    let a = ask(&mut c, "HEAD /hammer/initrd.img HTTP/1.1\r\nrange: bytes=10-19\r\n\r\n");
    assert_eq!((a.status, a.header("content-length"), a.header("content-range")), (206, Some("10"), Some("bytes 10-19/3000000")));
    let a = ask(&mut c, &get("/hammer/initrd.img", "range: bytes=3000000-\r\n"));
    assert_eq!((a.status, a.header("content-range")), (416, Some("bytes */3000000")));
    let a = ask(&mut c, &get("/hammer/empty", ""));
    assert_eq!((a.status, a.body.len()), (200, 0));
    let a = ask(&mut c, &get("/boot/efi/snponly.efi", ""));
    assert_eq!((a.status, a.body.as_slice()), (200, &b"efi-binary"[..]));
    for bad in [
        "/hammer/missing",
        "/hammer/../secret",
        "/hammer/..%2fsecret",
        "/hammer/escape",
        "/hammer/sub",
        "/hammer/",
        "/boot/../secret",
        "/boot/efi/../../secret",
        "/boot/%2e%2e/secret",
        "/boot/efi",
    ] {
        let a = ask(&mut c, &get(bad, ""));
        assert_eq!(a.status, 404, "{bad}");
        assert!(!a.body.starts_with(b"secret"), "{bad}");
    }
    let (m, _) = s.metrics.render();
    assert!(m.contains("pixie_http_requests_total{route=\"hammer\",status=\"206\"} 3"), "{m}");
    assert!(m.contains("pixie_http_requests_total{route=\"hammer\",status=\"416\"} 1"), "{m}");
    assert!(m.contains("pixie_http_requests_total{route=\"boot\",status=\"404\"} 4"), "{m}");
}

#[test]
fn keep_alive_mixes_files_router_and_pipelined_requests() {
    let s = start();
    let mut c = connect(s.addr);
    // Three requests in one write: the loop answers them in order.
    let pipelined =
        format!("{}{}{}", get("/healthz", ""), get("/hammer/initrd.img", "range: bytes=0-4\r\n"), get("/metrics", ""));
    c.get_mut().write_all(pipelined.as_bytes()).unwrap();
    let a = read_answer(&mut c, false);
    assert_eq!((a.status, a.body.as_slice()), (200, &b"ok\n"[..]));
    let a = read_answer(&mut c, false);
    assert_eq!((a.status, a.body.as_slice()), (206, &s.hammer_data[..5]));
    let a = read_answer(&mut c, false);
    assert!(String::from_utf8_lossy(&a.body).contains("route=\"healthz\""), "the router's requests are counted");
    // No API: the script tells iPXE to retry; then a file again on the same connection.
    let a = ask(&mut c, &get("/ipxe?mac=52:54:00:00:00:01&arch=bios_x86", ""));
    assert_eq!(a.status, 200);
    assert!(String::from_utf8_lossy(&a.body).contains("chain --replace"), "{}", String::from_utf8_lossy(&a.body));
    let a = ask(&mut c, &get("/ipxe?mac=nope", ""));
    assert_eq!(a.status, 400);
    let a = ask(&mut c, "HEAD /healthz HTTP/1.1\r\n\r\n");
    assert_eq!(a.status, 200);
    let a = ask(&mut c, &get("/hammer/initrd.img", ""));
    assert!(a.status == 200 && a.body == s.hammer_data);
    // `connection: close` is honoured: answer, then end of stream.
    let a = ask(&mut c, &get("/hammer/initrd.img", "range: bytes=0-0\r\nconnection: close\r\n"));
    assert_eq!((a.status, a.header("connection")), (206, Some("close")));
    let mut rest = vec![];
    assert_eq!(c.read_to_end(&mut rest).unwrap(), 0, "closed after the answer");
}

#[test]
fn http_1_0_gets_one_answer_and_a_close() {
    let s = start();
    let mut c = connect(s.addr);
    let a = ask(&mut c, "GET /boot/efi/snponly.efi HTTP/1.0\r\n\r\n");
    assert_eq!((a.status, a.body.as_slice()), (200, &b"efi-binary"[..]));
    let mut rest = vec![];
    assert_eq!(c.read_to_end(&mut rest).unwrap(), 0);
}

#[test]
fn a_request_with_a_body_goes_to_hyper_and_the_connection_goes_on() {
    let s = start();
    let mut c = connect(s.addr);
    let a = ask(&mut c, "POST /hammer/initrd.img HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello");
    assert_eq!(a.status, 405);
    let a = ask(&mut c, &get("/hammer/initrd.img", "range: bytes=5-9\r\n"));
    assert_eq!((a.status, a.body.as_slice()), (206, &s.hammer_data[5..10]), "hyper serves the rest of the connection");
    let a = ask(&mut c, &get("/healthz", ""));
    assert_eq!(a.status, 200);
    let mut c = connect(s.addr);
    let a = ask(&mut c, "GET / HTTP/1.1\r\nbad header line\r\n\r\n");
    assert_eq!(a.status, 400, "a head httparse refuses is answered by hyper");
}

#[test]
fn a_client_leaving_mid_body_does_not_disturb_others() {
    let s = start();
    // Big enough that the body cannot fit in the socket buffers at once.
    let big = s._dir.path().join("hammer/big");
    let data = pattern(64 << 20);
    std::fs::write(&big, &data).unwrap();
    for _ in 0..4 {
        let mut c = connect(s.addr);
        c.get_mut().write_all(get("/hammer/big", "").as_bytes()).unwrap();
        let mut first = vec![0; 100_000];
        c.read_exact(&mut first).unwrap();
        drop(c);
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut c = connect(s.addr);
    let a = ask(&mut c, &get("/hammer/big", ""));
    assert!(a.status == 200 && a.body == data, "a whole body after the others left");
    assert_eq!(s.metrics.http_requests.get(["hammer", "200"]), 5);
}

/// The server counts a closed connection just after the client sees it closed.
fn eventually(cond: impl Fn() -> bool, what: impl Fn() -> String) {
    for _ in 0..100 {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("never came true:\n{}", what());
}

fn short_timeouts() -> HttpLimits {
    HttpLimits { header_timeout: Duration::from_secs(1), idle_timeout: Duration::from_secs(1), ..HttpLimits::default() }
}

/// Sends `bytes`, then waits (at most 10 s) for pixie to close the connection; returns how long
/// that took and what came back.
fn closed_after(addr: SocketAddr, bytes: &[u8]) -> (Duration, Vec<u8>) {
    let mut c = connect(addr);
    c.get_mut().write_all(bytes).unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    loop {
        let mut b = [0u8; 4096];
        match c.get_mut().read(&mut b) {
            Ok(0) => return (started.elapsed(), got),
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (started.elapsed(), got),
            Err(e) => panic!("still open after {:?} ({e}); got {:?}", started.elapsed(), String::from_utf8_lossy(&got)),
        }
    }
}

#[test]
fn the_hyper_path_closes_idle_and_half_sent_connections() {
    // hyper's header timeout comes before the idle timeout of the connection.
    let s = start_with(HttpLimits { idle_timeout: Duration::from_secs(3), ..short_timeouts() });
    let post = "POST /healthz HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello";
    // Idle after a request that was handed to hyper.
    let (took, got) = closed_after(s.addr, post.as_bytes());
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 405"), "{}", String::from_utf8_lossy(&got));
    assert!(took < Duration::from_millis(2500), "idle hyper connection closed after {took:?}");
    // The next request with a body, half sent: its head stops in the middle.
    let (took, _) = closed_after(s.addr, format!("{post}POST /healthz HTTP/1.1\r\ncontent-length: 5\r\n").as_bytes());
    assert!(took < Duration::from_millis(2500), "half-sent request closed after {took:?}");
    // A head over 16 KiB goes to hyper unfinished.
    let big = format!("GET /healthz HTTP/1.1\r\nx-pad: {}\r\n", "a".repeat(17 * 1024));
    let (took, _) = closed_after(s.addr, big.as_bytes());
    assert!(took < Duration::from_millis(2500), "unfinished 17 KiB head closed after {took:?}");
    eventually(|| s.metrics.http_timeouts.get(["head"]) == 3, || s.metrics.render().0);
}

#[test]
fn pixies_own_loop_closes_a_head_that_trickles_in() {
    let s = start_with(short_timeouts());
    let mut c = connect(s.addr).into_inner();
    // One byte every 200 ms for 5 s: every read is quick, the head never ends.
    let started = std::time::Instant::now();
    for b in b"GET /healthz HTTP/1.1\r\nx-slow: abcdefghijklmnopqrstuvwxyz".iter() {
        if c.write_all(&[*b]).is_err() || started.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut b = [0u8; 64];
    match c.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the trickled head was still being read after {:?}: {other:?}", started.elapsed()),
    }
    eventually(|| s.metrics.http_timeouts.get(["head"]) == 1, || s.metrics.render().0);
}

#[test]
fn a_client_that_stops_reading_on_the_hyper_path_is_dropped() {
    let s = start_with(short_timeouts());
    let big = s._dir.path().join("hammer/big");
    std::fs::write(&big, pattern(64 << 20)).unwrap();
    let mut c = connect(s.addr);
    // A request with a body first, so the file comes from hyper (tower-http's ServeFile).
    let req = format!("POST /healthz HTTP/1.1\r\ncontent-length: 1\r\n\r\nx{}", get("/hammer/big", ""));
    c.get_mut().write_all(req.as_bytes()).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match c.get_mut().read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
    assert!(total < 64 << 20, "a client that took nothing for 4 s still got the whole 64 MiB");
    eventually(|| s.metrics.http_timeouts.get(["write"]) == 1, || s.metrics.render().0);
}

#[test]
fn connections_beyond_the_limit_are_refused_and_the_others_work() {
    let s = start_with(HttpLimits { max_connections: 4, ..HttpLimits::default() });
    let mut open: Vec<_> = (0..4).map(|_| connect(s.addr)).collect();
    // Each of the four is being served (answered) before the fifth comes.
    for c in &mut open {
        assert_eq!(ask(c, &get("/healthz", "")).status, 200);
    }
    for _ in 0..3 {
        let (took, got) = closed_after(s.addr, get("/healthz", "").as_bytes());
        let text = String::from_utf8_lossy(&got);
        assert!(got.is_empty() || text.starts_with("HTTP/1.1 503"), "{text}");
        assert!(took < Duration::from_secs(2), "refused after {took:?}");
    }
    assert_eq!(s.metrics.http_connections_refused.get(), 3);
    assert_eq!(ask(&mut open[2], &get("/healthz", "")).status, 200, "connections under the limit keep working");
    // One leaves: a new one is taken again.
    drop(open.pop());
    let mut served = false;
    for _ in 0..50 {
        let mut c = connect(s.addr);
        c.get_mut().write_all(get("/healthz", "").as_bytes()).unwrap();
        let mut line = String::new();
        if c.read_line(&mut line).is_ok() && line.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served, "no connection served after one of the four closed");
}
