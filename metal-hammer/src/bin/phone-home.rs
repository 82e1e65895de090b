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
//! `metal.phone_home_timeout_s=N` on the kernel command line), `--message TEXT`.
//!
//! Only the standard library does I/O here (plus serde for the JSON): a static musl binary of a
//! few hundred KiB with a minimal HTTP/1.1 client for `http://` URLs.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use metal_types::{PhoneHome, PhoneHomeConfig};

const DEFAULT_CONFIG: &str = "/etc/metal/phone-home.json";
const DEFAULT_WINDOW: Duration = Duration::from_secs(120);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

struct Options {
    config: String,
    window: Option<Duration>,
    message: String,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut opts = Options { config: DEFAULT_CONFIG.to_string(), window: None, message: "phone-home".to_string() };
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
            "-h" | "--help" => {
                return Err("usage: phone-home [--config PATH] [--timeout-secs N] [--message TEXT]".to_string())
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
    let stdout_rdev = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .and_then(|fd| fs::File::from(fd).metadata().ok())
        .map(|m| m.rdev());
    let console_rdev = fs::metadata("/dev/console").ok().map(|m| m.rdev());
    let stdout_is_console = matches!((stdout_rdev, console_rdev), (Some(a), Some(b)) if a == b && a != 0);
    if !stdout_is_console {
        if let Ok(mut console) = fs::OpenOptions::new().write(true).open("/dev/console") {
            let _ = writeln!(console, "{line}");
        }
    }
}

/// `http://host[:port]/path` → (host, port, path).
fn parse_url(url: &str) -> Option<(String, u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (authority, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| (host.to_string(), port, path.to_string()))
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

fn post(url: &str, token: &str, body: &[u8], timeout: Duration) -> Attempt {
    let Some((host, port, path)) = parse_url(url) else {
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
    if let Err(e) = stream.write_all(&request) {
        return Attempt::Retry(format!("send error=\"{e}\""));
    }
    let mut response = Vec::new();
    if let Err(e) = stream.read_to_end(&mut response) {
        if response.is_empty() {
            return Attempt::Retry(format!("receive error=\"{e}\""));
        }
    }
    match status_code(&response) {
        Some(code) if (200..300).contains(&code) => Attempt::Done,
        Some(code) if code >= 500 || code == 408 || code == 429 => Attempt::Retry(format!("http-status code={code}")),
        Some(code) => Attempt::Fatal(format!("http-status code={code}")),
        None => Attempt::Retry("malformed-response".to_string()),
    }
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
    let deadline = Instant::now() + window;
    let mut backoff = Duration::from_secs(1);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let body = PhoneHome { machine: config.machine, time_ms: now_ms(), message: opts.message.clone() };
        let body = serde_json::to_vec(&body).map_err(|e| format!("encode error=\"{e}\""))?;
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = ATTEMPT_TIMEOUT.min(left).max(Duration::from_millis(500));
        match post(&config.url, &config.token, &body, timeout) {
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

    #[test]
    fn urls() {
        assert_eq!(parse_url("http://10.99.0.1:8080/v1/agent/phone-home"), Some(("10.99.0.1".into(), 8080, "/v1/agent/phone-home".into())));
        assert_eq!(parse_url("http://api/x"), Some(("api".into(), 80, "/x".into())));
        assert_eq!(parse_url("https://api/x"), None);
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
        assert!(matches!(post(&url, "tok", b"{\"a\":1}", Duration::from_secs(5)), Attempt::Done));
        let req = server.join().unwrap();
        assert!(req.starts_with("POST /v1/agent/phone-home HTTP/1.1\r\n"));
        assert!(req.contains("Authorization: Bearer tok\r\n"));
    }
}
