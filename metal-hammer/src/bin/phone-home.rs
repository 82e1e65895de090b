//! `phone-home`: the piece of every OS image we build that tells the API "this machine booted
//! its installed OS" (`Phoned Home`).
//!
//! It reads `/etc/metal/phone-home.json` (`metal_types::PhoneHomeConfig`, written by
//! metal-hammer), POSTs a `metal_types::PhoneHome` body to its `url` with
//! `Authorization: Bearer <token>`, and retries with back-off (1 s, 2 s, 4 s, … at most 15 s
//! apart) until the retry window closes (120 s by default). It prints
//! `PHONE-HOME status=ok` or `PHONE-HOME status=error reason=<what> …` to stdout and, when
//! stdout is not already the console, to `/dev/console`. Exit status 0 on success, 1 otherwise.
//!
//! Options: `--config PATH`, `--timeout-secs N` (the retry window; also taken from
//! `metal.phone_home_timeout_s=N` on the kernel command line), `--message TEXT`, `--ca PATH`
//! (default `/etc/metal/ca.pem`, which metal-hammer writes: the CAs it trusted itself).
//!
//! Only the standard library does I/O here (plus serde for the JSON and rustls with ring for
//! TLS): a static musl binary with a minimal HTTP/1.1 client for `http://` and `https://` URLs.
//! An `https://` URL is verified against the `--ca` bundle and nothing else; a missing or broken
//! bundle, or a certificate it does not vouch for, fails at once (retrying cannot help).

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metal_types::{PhoneHome, PhoneHomeConfig};

const DEFAULT_CONFIG: &str = "/etc/metal/phone-home.json";
const DEFAULT_CA: &str = "/etc/metal/ca.pem";
const DEFAULT_WINDOW: Duration = Duration::from_secs(120);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

struct Options {
    config: String,
    window: Option<Duration>,
    message: String,
    ca: String,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut opts = Options {
        config: DEFAULT_CONFIG.to_string(),
        window: None,
        message: "phone-home".to_string(),
        ca: DEFAULT_CA.to_string(),
    };
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--config" => opts.config = value("--config")?,
            "--timeout-secs" => {
                let v = value("--timeout-secs")?;
                opts.window = Some(Duration::from_secs(v.parse().map_err(|_| format!("bad --timeout-secs {v:?}"))?));
            }
            "--message" => opts.message = value("--message")?,
            "--ca" => opts.ca = value("--ca")?,
            "-h" | "--help" => {
                return Err("usage: phone-home [--config PATH] [--timeout-secs N] [--message TEXT] [--ca PATH]".to_string())
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}

/// `metal.phone_home_timeout_s=N` from a kernel command line.
fn window_from_cmdline(cmdline: &str) -> Option<Duration> {
    cmdline
        .split_whitespace()
        .find_map(|a| a.strip_prefix("metal.phone_home_timeout_s="))
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
}

/// Prints a marker line to stdout and to the console (once, if they are the same device).
fn say(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
    let stdout_rdev =
        std::io::stdout().as_fd().try_clone_to_owned().ok().and_then(|fd| fs::File::from(fd).metadata().ok()).map(|m| m.rdev());
    let console_rdev = fs::metadata("/dev/console").ok().map(|m| m.rdev());
    let stdout_is_console = matches!((stdout_rdev, console_rdev), (Some(a), Some(b)) if a == b && a != 0);
    if !stdout_is_console {
        if let Ok(mut console) = fs::OpenOptions::new().write(true).open("/dev/console") {
            let _ = writeln!(console, "{line}");
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Url {
    tls: bool,
    host: String,
    port: u16,
    path: String,
}

/// `http(s)://host[:port]/path`.
fn parse_url(url: &str) -> Option<Url> {
    let (tls, rest) = match url.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, url.strip_prefix("http://")?),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (authority, if tls { 443 } else { 80 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| Url { tls, host: host.to_string(), port, path: path.to_string() })
}

/// A TLS client config trusting exactly the bundle at `ca`.
fn tls_config(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let certs = metal_client::tls::read_ca_file(ca).map_err(|e| format!("ca error=\"{}\"", chain(&e)))?;
    Ok(Arc::new(metal_client::tls::client_config(&certs)))
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// Status code from the first line of an HTTP/1.x response.
fn status_code(raw: &[u8]) -> Option<u16> {
    let line = raw.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

enum Attempt {
    Done,
    /// Worth retrying (connection trouble, 5xx, 408, 429).
    Retry(String),
    /// Retrying cannot help (bad token, bad request).
    Fatal(String),
}

/// One POST. `tls` is the config for `https://` URLs (`None` for `http://`).
fn post(url: &str, token: &str, body: &[u8], timeout: Duration, tls: Option<&Arc<rustls::ClientConfig>>) -> Attempt {
    let Some(Url { tls: https, host, port, path }) = parse_url(url) else {
        return Attempt::Fatal(format!("unsupported-url url={url}"));
    };
    let addr = match (host.as_str(), port).to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        Ok(None) | Err(_) => return Attempt::Retry(format!("resolve host={host}")),
    };
    let mut stream = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return Attempt::Retry(format!("connect addr={addr} error=\"{e}\"")),
    };
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    let response = if https {
        let Some(config) = tls else { return Attempt::Fatal("https without a CA bundle".to_string()) };
        let name = match rustls::pki_types::ServerName::try_from(host.clone()) {
            Ok(n) => n,
            Err(_) => return Attempt::Fatal(format!("unsupported-url url={url}")),
        };
        let conn = match rustls::ClientConnection::new(config.clone(), name) {
            Ok(c) => c,
            Err(e) => return Attempt::Fatal(format!("tls error=\"{e}\"")),
        };
        exchange(&mut rustls::StreamOwned::new(conn, stream), &request)
    } else {
        exchange(&mut stream, &request)
    };
    let response = match response {
        Ok(r) => r,
        Err((what, e)) => {
            // A certificate the CA bundle does not vouch for will not change by retrying.
            let tls = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
            return match tls {
                Some(t @ (rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)) => {
                    Attempt::Fatal(format!("tls-certificate error=\"{t}\" ca-hint=\"is the API's CA in the --ca bundle?\""))
                }
                _ => Attempt::Retry(format!("{what} error=\"{e}\"")),
            };
        }
    };
    match status_code(&response) {
        Some(code) if (200..300).contains(&code) => Attempt::Done,
        Some(code) if code >= 500 || code == 408 || code == 429 => Attempt::Retry(format!("http-status code={code}")),
        Some(code) => Attempt::Fatal(format!("http-status code={code}")),
        None => Attempt::Retry("malformed-response".to_string()),
    }
}

/// Writes the request and reads the response until the server closes. An error names the
/// step; one after part of the response arrived is ignored (a server may close without TLS
/// close_notify).
fn exchange<S: Read + Write>(stream: &mut S, request: &[u8]) -> Result<Vec<u8>, (&'static str, std::io::Error)> {
    stream.write_all(request).and_then(|()| stream.flush()).map_err(|e| ("send", e))?;
    let mut response = Vec::new();
    if let Err(e) = stream.read_to_end(&mut response) {
        if response.is_empty() {
            return Err(("receive", e));
        }
    }
    Ok(response)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn run(opts: &Options) -> Result<String, String> {
    let text = fs::read(&opts.config).map_err(|e| format!("config path={} error=\"{e}\"", opts.config))?;
    let config: PhoneHomeConfig =
        serde_json::from_slice(&text).map_err(|e| format!("config path={} error=\"{e}\"", opts.config))?;
    let window = opts
        .window
        .or_else(|| fs::read_to_string("/proc/cmdline").ok().and_then(|c| window_from_cmdline(&c)))
        .unwrap_or(DEFAULT_WINDOW);
    let tls = match parse_url(&config.url) {
        Some(u) if u.tls => Some(tls_config(Path::new(&opts.ca))?),
        _ => None,
    };
    let deadline = Instant::now() + window;
    let mut backoff = Duration::from_secs(1);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let body = PhoneHome { machine: config.machine, time_ms: now_ms(), message: opts.message.clone() };
        let body = serde_json::to_vec(&body).map_err(|e| format!("encode error=\"{e}\""))?;
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = ATTEMPT_TIMEOUT.min(left).max(Duration::from_millis(500));
        match post(&config.url, &config.token, &body, timeout, tls.as_ref()) {
            Attempt::Done => return Ok(format!("machine={} attempts={attempts}", config.machine)),
            Attempt::Fatal(why) => return Err(format!("{why} attempts={attempts}")),
            Attempt::Retry(why) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(format!("{why} attempts={attempts} window={}s", window.as_secs()));
                }
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

fn main() -> ExitCode {
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("phone-home: {e}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(detail) => {
            say(&format!("PHONE-HOME status=ok {detail}"));
            ExitCode::SUCCESS
        }
        Err(reason) => {
            say(&format!("PHONE-HOME status=error reason={reason}"));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(tls: bool, host: &str, port: u16, path: &str) -> Option<Url> {
        Some(Url { tls, host: host.into(), port, path: path.into() })
    }

    #[test]
    fn urls() {
        assert_eq!(parse_url("http://10.99.0.1:8080/v1/agent/phone-home"), url(false, "10.99.0.1", 8080, "/v1/agent/phone-home"));
        assert_eq!(parse_url("http://api/x"), url(false, "api", 80, "/x"));
        assert_eq!(parse_url("https://api/x"), url(true, "api", 443, "/x"));
        assert_eq!(parse_url("https://[fd00:99::1]:8080/x"), url(true, "fd00:99::1", 8080, "/x"));
        assert_eq!(parse_url("ftp://api/x"), None);
    }

    #[test]
    fn statuses() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content\r\n\r\n"), Some(204));
        assert_eq!(status_code(b"SSH-2.0-x\r\n"), None);
    }

    #[test]
    fn window_on_the_command_line() {
        assert_eq!(window_from_cmdline("console=ttyS0 metal.phone_home_timeout_s=5 root=UUID=x"), Some(Duration::from_secs(5)));
        assert_eq!(window_from_cmdline("console=ttyS0"), None);
    }

    #[test]
    fn args() {
        let o = parse_args(["--timeout-secs", "3", "--config", "/x.json"].iter().map(|s| s.to_string())).unwrap();
        assert_eq!(o.window, Some(Duration::from_secs(3)));
        assert_eq!(o.config, "/x.json");
        assert!(parse_args(["--bogus"].iter().map(|s| s.to_string())).is_err());
    }

    /// A real round trip against a one-shot HTTP server on loopback.
    #[test]
    fn posts_with_bearer_token() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"}") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").unwrap();
            String::from_utf8(got).unwrap()
        });
        let url = format!("http://127.0.0.1:{port}/v1/agent/phone-home");
        assert!(matches!(post(&url, "tok", b"{\"a\":1}", Duration::from_secs(5), None), Attempt::Done));
        let req = server.join().unwrap();
        assert!(req.starts_with("POST /v1/agent/phone-home HTTP/1.1\r\n"));
        assert!(req.contains("Authorization: Bearer tok\r\n"));
    }

    /// One HTTPS exchange on loopback with a per-test CA: returns what the server received.
    fn https_server(ca: &metal_client::ca::TestCa) -> (u16, std::thread::JoinHandle<String>) {
        use rustls::pki_types::pem::PemObject;
        let cert = ca.server_cert(&["127.0.0.1"]).unwrap();
        let chain =
            rustls::pki_types::CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(metal_client::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (tcp, _) = listener.accept().unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut s = rustls::StreamOwned::new(rustls::ServerConnection::new(Arc::new(config)).unwrap(), tcp);
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !got.windows(4).any(|w| w == b"\r\n\r\n") || !got.ends_with(b"}") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            if !got.is_empty() {
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
                s.conn.send_close_notify();
                let _ = s.flush();
            }
            String::from_utf8_lossy(&got).into_owned()
        });
        (port, server)
    }

    #[test]
    fn posts_over_https_verifying_against_the_ca_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = metal_client::ca::TestCa::generate("phone-home test CA").unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, &ca.cert_pem).unwrap();
        let (port, server) = https_server(&ca);
        let url = format!("https://127.0.0.1:{port}/v1/agent/phone-home");
        let config = tls_config(&ca_file).unwrap();
        assert!(matches!(post(&url, "tok", b"{\"a\":1}", Duration::from_secs(5), Some(&config)), Attempt::Done));
        let req = server.join().unwrap();
        assert!(
            req.starts_with("POST /v1/agent/phone-home HTTP/1.1\r\n") && req.contains("Authorization: Bearer tok\r\n"),
            "{req}"
        );
    }

    #[test]
    fn https_against_another_ca_fails_at_once_and_sends_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let other = dir.path().join("other.pem");
        std::fs::write(&other, metal_client::ca::TestCa::generate("not the API's CA").unwrap().cert_pem).unwrap();
        let (port, server) = https_server(&metal_client::ca::TestCa::generate("the API's CA").unwrap());
        let url = format!("https://127.0.0.1:{port}/v1/agent/phone-home");
        match post(&url, "secret-token", b"{}", Duration::from_secs(5), Some(&tls_config(&other).unwrap())) {
            Attempt::Fatal(why) => assert!(why.contains("tls-certificate") && why.contains("UnknownIssuer"), "{why}"),
            Attempt::Done => panic!("posted to a server the CA does not vouch for"),
            Attempt::Retry(why) => panic!("retry: {why}"),
        }
        assert!(!server.join().unwrap().contains("secret-token"), "the token went out");
        // No bundle at all: a clear error before any connection.
        let err = tls_config(&dir.path().join("missing.pem")).unwrap_err();
        assert!(err.contains("missing.pem"), "{err}");
    }
}
