//! The API's transport under slow and hostile clients, and TLS (issue 11, findings 6 and 9):
//! a real server on 127.0.0.1:0, raw TCP clients that stop half-way, reqwest over HTTPS with a
//! CA generated per test, and PostgreSQL over TLS.

mod common;

use std::time::{Duration, Instant};

use common::*;
use metal_api::serve::{Limits, TlsFiles};
use metal_client::ca::TestCa;
use metal_client::http::{self as client_http, Options};
use metal_client::tls::{self, Roots};
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest any assertion below waits for the server to act; well above every shortened
/// timeout, so a loaded machine does not make the tests flaky.
const PATIENCE: Duration = Duration::from_secs(10);

fn short(tweak: impl FnOnce(&mut Limits)) -> impl FnOnce(&mut metal_api::Config) {
    move |c| {
        let mut l = Limits {
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(30),
            max_connections: 64,
        };
        tweak(&mut l);
        c.limits = l;
    }
}

/// Reads until the server closes the connection (EOF or reset) and returns what came and when,
/// or `None` if it is still open after `PATIENCE`.
async fn until_closed(s: &mut TcpStream) -> Option<(Vec<u8>, Instant)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((got, Instant::now())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// One whole response (headers and a `Content-Length` body) on a kept-alive connection.
async fn read_response(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize =
                head.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse().unwrap()).unwrap_or(0);
            if got.len() >= end + 4 + len {
                return Some(String::from_utf8_lossy(&got).into_owned());
            }
        }
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) | Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: metal\r\n\r\n";

/// Finding 9: a client that sends half a request head held its connection (and a slot of
/// the server) forever.
#[tokio::test]
async fn a_half_sent_request_head_is_disconnected_after_the_header_timeout() {
    let db = Db::sqlite();
    let mut api = Api::start_with(&db, short(|l| l.header_read_timeout = Duration::from_secs(1))).await;
    let addr = api.running.as_ref().unwrap().addr;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let sent = Instant::now();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: metal\r\n").await.unwrap();
    let (_, closed) = until_closed(&mut s).await.expect("the server still holds a half-sent request head open");
    assert!(closed - sent >= Duration::from_millis(900), "closed after {:?}, before the header timeout", closed - sent);

    // A client that sends nothing at all is cut off the same way.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    until_closed(&mut silent).await.expect("the server still holds a silent connection open");
    // Whole requests are served as before.
    assert_eq!(api.call(reqwest::Method::GET, "/healthz", None, None).await.0, StatusCode::OK);
    api.stop().await;
}

/// Finding 9: an idle keep-alive connection stayed open forever.
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let db = Db::sqlite();
    let mut api = Api::start_with(&db, short(|l| l.idle_timeout = Duration::from_secs(2))).await;
    let mut s = TcpStream::connect(api.running.as_ref().unwrap().addr).await.unwrap();
    s.write_all(HEALTHZ).await.unwrap();
    let r = read_response(&mut s, PATIENCE).await.expect("an answer");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let idle_since = Instant::now();
    // Still usable while not idle for long: a second request on the same connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.write_all(HEALTHZ).await.unwrap();
    assert!(read_response(&mut s, PATIENCE).await.expect("a second answer").starts_with("HTTP/1.1 200"));
    let idle_since = idle_since.max(Instant::now());
    let (_, closed) = until_closed(&mut s).await.expect("the server keeps an idle keep-alive connection open");
    assert!(closed - idle_since >= Duration::from_millis(1800), "closed after {:?} idle", closed - idle_since);
    api.stop().await;
}

/// Finding 9: a client that sends its headers and then trickles (or withholds) the body.
#[tokio::test]
async fn a_withheld_request_body_ends_after_the_body_timeout() {
    let db = Db::sqlite();
    let mut api = Api::start_with(&db, short(|l| l.body_read_timeout = Duration::from_secs(1))).await;
    let mut s = TcpStream::connect(api.running.as_ref().unwrap().addr).await.unwrap();
    let head = format!(
        "POST /v1/projects HTTP/1.1\r\nHost: metal\r\nAuthorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"id\":"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let (answer, _) = until_closed(&mut s).await.expect("the server waits forever for a body that never comes");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 4"), "{answer}");
    let (st, v) = api.get("/v1/projects", ADMIN).await;
    assert_eq!((st, v), (StatusCode::OK, serde_json::json!([])), "nothing was created");
    api.stop().await;
}

/// Finding 9: connections were accepted without bound. Beyond the limit they wait (in the
/// kernel's backlog) and are served once a slot is free.
#[tokio::test]
async fn connections_beyond_the_limit_wait_until_a_slot_is_free() {
    let db = Db::sqlite();
    let mut api = Api::start_with(&db, short(|l| l.max_connections = 2)).await;
    let addr = api.running.as_ref().unwrap().addr;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(HEALTHZ).await.unwrap();
        assert!(read_response(&mut s, PATIENCE).await.expect("served within the limit").starts_with("HTTP/1.1 200"));
        held.push(s); // kept alive, idle
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    third.write_all(HEALTHZ).await.unwrap();
    assert_eq!(
        read_response(&mut third, Duration::from_millis(1500)).await,
        None,
        "a third connection was served beyond the limit of 2"
    );
    drop(held.pop());
    let r = read_response(&mut third, PATIENCE).await.expect("the waiting connection is served once a slot is free");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    api.stop().await;
}

/// The long-poll is server time, not a slow client: it outlives every client timeout, and the
/// connection is reused afterwards.
#[tokio::test]
async fn a_long_poll_outlives_the_header_idle_and_body_timeouts() {
    let db = Db::sqlite();
    let mut api = Api::start_with(
        &db,
        short(|l| {
            l.header_read_timeout = Duration::from_secs(1);
            l.idle_timeout = Duration::from_secs(1);
            l.body_read_timeout = Duration::from_secs(1);
        }),
    )
    .await;
    let cat = api.catalog().await;
    let mut agent = Agent::new(1);
    agent.join_pool(&api, &cat.pixie).await;
    let mut s = TcpStream::connect(api.running.as_ref().unwrap().addr).await.unwrap();
    let wait =
        format!("GET /v1/agent/wait?timeout_s=3 HTTP/1.1\r\nHost: metal\r\nAuthorization: Bearer {}\r\n\r\n", agent.credential);
    let started = Instant::now();
    s.write_all(wait.as_bytes()).await.unwrap();
    let r = read_response(&mut s, PATIENCE).await.expect("the long-poll answers");
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    assert!(started.elapsed() >= Duration::from_millis(2900), "answered after {:?}", started.elapsed());
    s.write_all(HEALTHZ).await.unwrap();
    assert!(read_response(&mut s, PATIENCE).await.expect("the connection is reused").starts_with("HTTP/1.1 200"));
    api.stop().await;
}

/// A per-test CA and a server certificate for 127.0.0.1 and localhost, as files.
struct Certs {
    dir: tempfile::TempDir,
    ca: TestCa,
}

impl Certs {
    fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::generate("metal-api test CA").unwrap();
        ca.write_server_files(dir.path(), "server", &["127.0.0.1", "localhost"]).unwrap();
        Certs { dir, ca }
    }
    fn files(&self) -> TlsFiles {
        TlsFiles { cert: self.dir.path().join("server.pem"), key: self.dir.path().join("server.key") }
    }
    fn roots(&self) -> Roots {
        Roots::Only(tls::parse_ca_pem("ca.pem".as_ref(), self.ca.cert_pem.as_bytes()).unwrap())
    }
}

#[tokio::test]
async fn https_with_a_generated_ca_and_a_clear_error_without_it() {
    let certs = Certs::new();
    let db = Db::sqlite();
    let files = certs.files();
    let mut api = Api::start_with(&db, |c| c.tls = Some(files)).await;
    let running = api.running.as_ref().unwrap();
    assert!(running.is_https());
    let base = running.base_url();
    assert_eq!(base, format!("https://{}", running.addr));

    let trusting = client_http::client(&Options::new(certs.roots()).timeout(PATIENCE)).unwrap();
    let r = trusting.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = trusting.get(format!("{base}/v1/projects")).bearer_auth(ADMIN).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let other = TestCa::generate("not the API's CA").unwrap();
    let other = Roots::Only(tls::parse_ca_pem("other.pem".as_ref(), other.cert_pem.as_bytes()).unwrap());
    for roots in [other, Roots::Platform] {
        let c = client_http::client(&Options::new(roots.clone()).timeout(PATIENCE)).unwrap();
        let err = c.get(format!("{base}/healthz")).send().await.unwrap_err();
        assert!(client_http::is_tls_error(&err), "{err:?}");
        assert!(format!("{err:?}").contains("UnknownIssuer"), "{err:?}");
    }

    // Plain HTTP to the HTTPS port is refused, not served.
    let mut s = TcpStream::connect(api.running.as_ref().unwrap().addr).await.unwrap();
    s.write_all(HEALTHZ).await.unwrap();
    let (answer, _) = until_closed(&mut s).await.expect("closed");
    assert!(!String::from_utf8_lossy(&answer).contains("200 OK"));
    api.stop().await;
}

/// A TCP connection that never starts its TLS handshake is cut off after the handshake timeout.
#[tokio::test]
async fn a_stalled_tls_handshake_is_disconnected() {
    let certs = Certs::new();
    let db = Db::sqlite();
    let files = certs.files();
    let mut api = Api::start_with(&db, |c| {
        short(|l| l.tls_handshake_timeout = Duration::from_secs(1))(c);
        c.tls = Some(files);
    })
    .await;
    let mut s = TcpStream::connect(api.running.as_ref().unwrap().addr).await.unwrap();
    let started = Instant::now();
    s.write_all(&[0x16, 0x03, 0x01]).await.unwrap(); // the start of a ClientHello, then nothing
    let (_, closed) = until_closed(&mut s).await.expect("the server waits forever for a TLS handshake");
    assert!(closed - started >= Duration::from_millis(900));
    api.stop().await;
}

#[tokio::test]
async fn broken_tls_files_fail_the_start_naming_the_file() {
    let certs = Certs::new();
    let db = Db::sqlite();
    let dir = certs.dir.path();
    std::fs::write(dir.join("garbage.pem"), "not a certificate\n").unwrap();
    let other = TestCa::generate("x").unwrap().server_cert(&["127.0.0.1"]).unwrap();
    std::fs::write(dir.join("other.key"), other.key_pem).unwrap();
    let cases = [
        (dir.join("missing.pem"), dir.join("server.key"), "missing.pem"),
        (dir.join("garbage.pem"), dir.join("server.key"), "garbage.pem"),
        (dir.join("server.pem"), dir.join("missing.key"), "missing.key"),
        (dir.join("server.pem"), dir.join("server.pem"), "server.pem"),
        (dir.join("server.pem"), dir.join("other.key"), "does not match"),
    ];
    for (cert, key, needle) in cases {
        let config = metal_api::Config {
            db: db.url.clone(),
            admin_token: Some(ADMIN.into()),
            tls: Some(TlsFiles { cert: cert.clone(), key: key.clone() }),
            ..Default::default()
        };
        let err = match metal_api::start(config, "127.0.0.1:0").await {
            Ok(r) => {
                r.stop().await;
                panic!("{} + {} started", cert.display(), key.display());
            }
            Err(e) => format!("{:#}", anyhow::Error::from(e)),
        };
        assert!(err.contains(needle), "{} + {}: {err}", cert.display(), key.display());
    }
}

/// The test PostgreSQL's CA (scripts/test makes one and points the cluster at a certificate
/// it signed for 127.0.0.1 and localhost), or `None` with a notice; in a run that must run
/// everything a missing one fails (`metal_testkit::require`).
fn postgres_ca() -> Option<std::path::PathBuf> {
    let ca = std::env::var_os("METAL_TEST_POSTGRES_CA");
    let what = "the PostgreSQL TLS tests need METAL_TEST_POSTGRES_CA (scripts/test and api/scripts/with-postgres set it)";
    metal_testkit::require(ca.is_some(), what).then(|| ca.unwrap_or_default().into())
}

fn with_params(url: &str, params: &str) -> String {
    format!("{url}{}{params}", if url.contains('?') { '&' } else { '?' })
}

#[tokio::test]
async fn postgres_over_tls_verify_full_against_the_ca_and_require() {
    let Some(db) = Db::postgres().await else { return };
    let Some(ca) = postgres_ca() else { return };
    for params in [format!("sslmode=verify-full&sslrootcert={}", ca.display()), "sslmode=require".to_string()] {
        let url = with_params(&db.url, &params);
        let mut api = Api::start_with(&db, |c| c.db = url.clone()).await;
        let (s, _) = api.post("/v1/projects", ADMIN, serde_json::json!({"id": format!("p-{}", params.len())})).await;
        assert_eq!(s, StatusCode::CREATED, "{params}");
        api.stop().await;
    }
}

#[tokio::test]
async fn postgres_verify_full_against_a_wrong_ca_fails_clearly() {
    let Some(db) = Db::postgres().await else { return };
    if postgres_ca().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("wrong-ca.pem");
    std::fs::write(&wrong, TestCa::generate("not the database's CA").unwrap().cert_pem).unwrap();
    let config = metal_api::Config {
        db: with_params(&db.url, &format!("sslmode=verify-full&sslrootcert={}", wrong.display())),
        admin_token: Some(ADMIN.into()),
        ..Default::default()
    };
    let err = match metal_api::start(config, "127.0.0.1:0").await {
        Ok(r) => {
            r.stop().await;
            panic!("the API connected to PostgreSQL through a certificate its CA did not sign");
        }
        Err(e) => format!("{:#}", anyhow::Error::from(e)),
    };
    assert!(err.contains("UnknownIssuer") || err.to_lowercase().contains("certificate"), "{err}");
}
