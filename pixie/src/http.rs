//! HTTP: per-machine iPXE scripts (`/ipxe`), the metal-hammer kernel and initrd (`/hammer/*`),
//! the lab's images (`/images/*`), the TFTP root for UEFI HTTP boot (`/boot/*`), `/metrics` and
//! `/healthz`. Static files are served with Range support; paths cannot leave their directory.
//!
//! [`serve`] runs its own HTTP/1.1 connection loop: it reads each request head itself
//! (`httparse`), sends local files under `/hammer/` and `/boot/` with `sendfile(2)` straight from
//! the page cache to the socket, and passes every other request to the axum [`router`] and
//! writes the response. Requests it does not take on (a body, a head it cannot parse, anything
//! but HTTP/1.x) hand the connection to hyper, which first reads the bytes already received.
//!
//! Both paths are bounded by [`HttpLimits`]: connections open at once, the time a request head
//! may take, the time a connection may sit idle or leave an answer untaken, the pauses of a
//! request body. A client on the provisioning network may be hostile; none can hold a
//! connection longer than those allow.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use metal_types::{Arch, BootRequest, MachineId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;
use tower_http::services::{ServeDir, ServeFile};
use tower_http::timeout::TimeoutBody;

use crate::api::{error_chain, DecisionCache, Source};
use crate::config::Mac;
use crate::dhcp::arch_name;
use crate::files::{plain, plan, LocalDir};
use crate::ipxe::{render, ScriptInput};
use crate::metrics::{status_label, Metrics};

pub struct HttpState {
    /// Boot decisions from the API, reused for `http.decision_cache_ms`.
    pub decisions: DecisionCache,
    /// `/hammer/*` from a local directory (zero-copy) or, instead, an upstream URL (memory).
    pub hammer: Option<LocalDir>,
    pub hammer_upstream: Option<crate::files::Upstream>,
    /// `/boot/*`: the TFTP root (zero-copy).
    pub boot: Option<LocalDir>,
    pub partition: String,
    /// Without a trailing slash.
    pub public_url: String,
    pub metrics: Arc<Metrics>,
    pub limits: HttpLimits,
}

/// How much the HTTP server takes on (`http.max_connections`, `http.*_timeout_s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; one more is answered `503` and closed at once.
    pub max_connections: usize,
    /// How long a request head may take to arrive, from its first byte (pixie's loop) or from
    /// when hyper starts waiting for it (which includes the wait on a kept-alive connection).
    pub header_timeout: Duration,
    /// How long a connection may wait for a request, or for the client to take bytes of the
    /// answer; on the hyper path, how long it may make no progress either way.
    pub idle_timeout: Duration,
    /// How long a request body may pause between two pieces (for any handler reading one).
    pub body_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> HttpLimits {
        HttpLimits {
            max_connections: crate::config::DEFAULT_HTTP_MAX_CONNECTIONS,
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
        }
    }
}

/// Parses the `arch` query value: pixie's own names, and iPXE's `${platform}`/`${buildarch}`.
pub fn parse_arch(s: &str) -> Arch {
    match s.trim().to_ascii_lowercase().as_str() {
        "bios_x86" | "bios" | "pcbios" | "i386" => Arch::BiosX86,
        "uefi_x64" | "efi" | "uefi" | "x86_64" | "efi64" => Arch::UefiX64,
        "uefi_x64_http" => Arch::UefiX64Http,
        "uefi_arm64" | "arm64" => Arch::UefiArm64,
        _ => Arch::Unknown,
    }
}

fn script(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], body).into_response()
}

async fn ipxe(State(st): State<Arc<HttpState>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(mac) = q.get("mac").and_then(|m| m.parse::<Mac>().ok()) else {
        st.metrics.boot_decisions.inc(["bad_request"]);
        return (StatusCode::BAD_REQUEST, "mac query parameter missing or not a MAC address\n").into_response();
    };
    // An unknown or unexpanded (`${uuid}`) UUID is left out; the API matches by MAC then.
    let uuid = q.get("uuid").and_then(|u| u.parse::<MachineId>().ok());
    let arch = q.get("arch").map(|a| parse_arch(a)).unwrap_or(Arch::Unknown);
    let attempt: u32 = q.get("attempt").and_then(|a| a.parse().ok()).unwrap_or(0).min(1000);
    let mut retry_url = format!("{}/ipxe?mac={mac}", st.public_url);
    if let Some(u) = uuid {
        retry_url.push_str(&format!("&uuid={u}"));
    }
    retry_url.push_str(&format!("&arch={}&attempt={}", arch_name(arch), attempt + 1));
    let req = BootRequest { partition: st.partition.clone(), mac: mac.to_string(), uuid, arch };
    let (answer, source) = st.decisions.decide(&req).await;
    let via = match source {
        Source::Api => "api",
        Source::Shared => "shared",
    };
    st.metrics.boot_decision_source.inc([via]);
    match answer {
        Ok(decision) => {
            let what = match &decision {
                metal_types::BootDecision::Hammer { .. } => "hammer",
                metal_types::BootDecision::LocalDisk => "local_disk",
            };
            st.metrics.boot_decisions.inc([what]);
            tracing::info!(%mac, uuid = ?uuid.map(|u| u.to_string()), arch = arch_name(arch), decision = what, via, attempt, "iPXE script");
            script(render(&ScriptInput::Decision { decision: &decision, arch, retry_url: &retry_url, attempt }))
        }
        Err(e) => {
            st.metrics.boot_decisions.inc(["retry"]);
            let reason = error_chain(&*e);
            tracing::warn!(%mac, arch = arch_name(arch), attempt, error = %reason, "no boot decision: iPXE told to retry");
            script(render(&ScriptInput::Retry { reason: &reason, retry_url: &retry_url, attempt }))
        }
    }
}

/// `/hammer/<name>` for what the zero-copy path leaves to axum: upstream files from memory; a
/// local file (a request that came with a body, say) streamed by tower-http.
async fn hammer(State(st): State<Arc<HttpState>>, Path(name): Path<String>, req: Request) -> Response {
    match (&st.hammer, &st.hammer_upstream) {
        (Some(dir), _) => stream_local(dir, &name, req).await,
        (None, Some(up)) => up.serve(&name, req.headers()).await,
        (None, None) => (StatusCode::NOT_FOUND, "no hammer_dir or hammer_url configured\n").into_response(),
    }
}

/// `/boot/<path>` for what the zero-copy path leaves to axum, streamed by tower-http.
async fn boot(State(st): State<Arc<HttpState>>, req: Request) -> Response {
    let rel = req.uri().path().strip_prefix("/boot/").unwrap_or("").to_string();
    match &st.boot {
        Some(dir) => stream_local(dir, &rel, req).await,
        None => (StatusCode::NOT_FOUND, "no TFTP root configured\n").into_response(),
    }
}

/// A local file through tower-http's `ServeFile` (Range and HEAD included), after the same
/// path checks as the zero-copy path.
async fn stream_local(dir: &LocalDir, rel: &str, req: Request) -> Response {
    match dir.resolve(rel) {
        Ok(path) => ServeFile::new(path).oneshot(req).await.unwrap_or_else(|e| match e {}).into_response(),
        Err(status) => (status, "not found\n").into_response(),
    }
}

async fn metrics(State(st): State<Arc<HttpState>>) -> Response {
    let (text, content_type) = st.metrics.render();
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

async fn count(State(st): State<Arc<HttpState>>, req: Request, next: Next) -> Response {
    let route: &'static str = match req.uri().path().trim_start_matches('/').split('/').next().unwrap_or("") {
        "ipxe" => "ipxe",
        "hammer" => "hammer",
        "images" => "images",
        "boot" => "boot",
        "metrics" => "metrics",
        "healthz" => "healthz",
        _ => "other",
    };
    // A handler that reads the body gets an error when it pauses longer than the limit.
    let req = req.map(|b| Body::new(TimeoutBody::new(st.limits.body_timeout, b)));
    let resp = next.run(req).await;
    st.metrics.http_requests.inc([route, status_label(resp.status().as_u16())]);
    resp
}

/// Directories the axum router serves from disk with tower-http's `ServeDir`.
#[derive(Debug, Clone, Default)]
pub struct StaticDirs {
    pub images: Option<PathBuf>,
}

pub fn router(state: Arc<HttpState>, dirs: &StaticDirs) -> Router {
    let mut r = Router::new()
        .route("/ipxe", get(ipxe))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/hammer/{name}", get(hammer))
        .route("/boot/{*path}", get(boot));
    if let Some(d) = &dirs.images {
        r = r.nest_service("/images", ServeDir::new(d));
    }
    r.layer(middleware::from_fn_with_state(state.clone(), count)).with_state(state)
}

// ---------------------------------------------------------------------------------------------
// The connection loop.
// ---------------------------------------------------------------------------------------------

/// A request head larger than this is refused (hyper answers it with `431`).
const MAX_HEAD: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// What the loop needs from one request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The request target as sent (origin form: path and query).
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor: u8,
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the head, request line to the empty line.
    pub len: usize,
}

impl Head {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_slice())
    }

    /// Whether the connection stays open after the answer (HTTP/1.1 unless `close`; HTTP/1.0
    /// connections are closed, the simple and always-correct answer).
    pub fn keep_alive(&self) -> bool {
        let close = self
            .header("connection")
            .is_some_and(|v| String::from_utf8_lossy(v).split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        self.minor == 1 && !close
    }

    /// Whether a body follows the head (then the request goes to hyper, which can read it).
    pub fn has_body(&self) -> bool {
        self.header("transfer-encoding").is_some()
            || self.header("content-length").is_some_and(|v| v.iter().any(|b| *b != b'0' && !b.is_ascii_whitespace()))
    }

    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split(['?', '#']).next().unwrap_or("")
    }
}

/// The result of reading a request head from the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Complete(Head),
    /// More bytes needed.
    Partial,
    /// Not an HTTP/1.x head this loop takes on.
    Other,
}

/// Parses a request head (pure; `buf` holds the bytes received so far).
pub fn parse_head(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let (Some(method), Some(target), Some(minor)) = (req.method, req.path, req.version) else { return Parsed::Other };
            if !target.starts_with('/') || minor > 1 {
                return Parsed::Other;
            }
            let headers = req.headers.iter().map(|h| (h.name.to_string(), h.value.to_vec())).collect();
            Parsed::Complete(Head { method: method.to_string(), target: target.to_string(), minor, headers, len })
        }
        Ok(httparse::Status::Partial) if buf.len() <= MAX_HEAD => Parsed::Partial,
        _ => Parsed::Other,
    }
}

/// The answer to a connection over `http.max_connections`, written without reading the request.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nretry-after: 1\r\nconnection: close\r\n\r\n";

/// Serves HTTP on `listener` until `shutdown` resolves (connections then open are dropped).
///
/// At most `limits.max_connections` connections are served at once. One more is accepted,
/// answered `503` (if its socket takes the bytes at once) and closed, and counted in
/// `pixie_http_connections_refused_total`: a client learns at once that pixie is busy (iPXE's
/// scripts retry a failed download), where leaving it in the kernel's accept queue would keep
/// it waiting with no answer.
pub async fn serve(listener: TcpListener, state: Arc<HttpState>, dirs: &StaticDirs, shutdown: impl Future<Output = ()>) {
    let app = router(state.clone(), dirs);
    let permits = Arc::new(Semaphore::new(state.limits.max_connections));
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "HTTP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            state.metrics.http_connections_refused.inc();
            tracing::debug!(max = state.limits.max_connections, "HTTP connection refused: http.max_connections are open");
            let _ = stream.try_write(BUSY);
            continue;
        };
        let _ = stream.set_nodelay(true);
        state.metrics.http_connections.inc();
        let open = Open { _permit: permit, metrics: state.metrics.clone() };
        tokio::spawn(connection(stream, state.clone(), app.clone(), open));
    }
}

/// One open connection: its place under `http.max_connections` and the gauge, given back on drop.
struct Open {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.metrics.http_connections.dec();
    }
}

fn timed_out(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what)
}

/// Waits until the socket takes more bytes, at most `idle`.
async fn writable(stream: &TcpStream, idle: Duration) -> io::Result<()> {
    match tokio::time::timeout(idle, stream.writable()).await {
        Ok(r) => r,
        Err(_) => Err(timed_out("client took no data")),
    }
}

/// Writes all of `data`; fails when the client takes nothing for `idle`.
async fn write_all(stream: &mut TcpStream, mut data: &[u8], idle: Duration) -> io::Result<()> {
    while !data.is_empty() {
        match tokio::time::timeout(idle, stream.write(data)).await {
            Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(timed_out("client took no data")),
        }
    }
    Ok(())
}

/// One connection: requests in order until the client closes, asks to close, errs, or keeps
/// pixie waiting: `idle_timeout` for a request to start (and for the client to take bytes of
/// an answer), `header_timeout` from a head's first byte to its end.
async fn connection(mut stream: TcpStream, st: Arc<HttpState>, app: Router, open: Open) {
    let limits = st.limits;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let mut head_started: Option<Instant> = None;
        let head = loop {
            if !buf.is_empty() {
                head_started.get_or_insert_with(Instant::now);
                match parse_head(&buf) {
                    Parsed::Complete(h) => break h,
                    Parsed::Partial => {}
                    Parsed::Other => return hand_to_hyper(stream, buf.freeze(), app, &st, open).await,
                }
            }
            let (wait, phase) = match head_started {
                None => (limits.idle_timeout, "idle"),
                Some(t) => (limits.header_timeout.saturating_sub(t.elapsed()), "head"),
            };
            match tokio::time::timeout(wait, stream.read_buf(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => return,
                Ok(Ok(_)) => {}
                Err(_) => {
                    st.metrics.http_timeouts.inc([phase]);
                    tracing::debug!(
                        phase,
                        waited_ms = wait.as_millis() as u64,
                        "HTTP connection idle or head incomplete: closed"
                    );
                    return;
                }
            }
        };
        if head.has_body() {
            return hand_to_hyper(stream, buf.freeze(), app, &st, open).await;
        }
        buf.advance(head.len);
        let keep_alive = head.keep_alive();
        let result = match static_file(&st, &head) {
            Some((dir, route, rel)) => {
                send_file(&mut stream, &st.metrics, dir, route, rel, &head, keep_alive, limits.idle_timeout).await
            }
            None => answer_with_router(&mut stream, &app, &head, keep_alive, limits.idle_timeout).await,
        };
        if let Err(e) = result {
            if e.kind() == io::ErrorKind::TimedOut {
                st.metrics.http_timeouts.inc(["write"]);
            }
            tracing::debug!(target = %head.target, error = %e, "HTTP connection ended while answering");
            return;
        }
        if !keep_alive {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// The local directory, metrics route and relative path when `head` asks for a local file.
fn static_file<'a>(st: &'a HttpState, head: &'a Head) -> Option<(&'a LocalDir, &'static str, &'a str)> {
    if head.method != "GET" && head.method != "HEAD" {
        return None;
    }
    let path = head.path();
    if let (Some(rel), Some(dir)) = (path.strip_prefix("/hammer/"), &st.hammer) {
        return Some((dir, "hammer", rel));
    }
    if let (Some(rel), Some(dir)) = (path.strip_prefix("/boot/"), &st.boot) {
        return Some((dir, "boot", rel));
    }
    None
}

/// Answers a GET or HEAD of a local file: the head, then the bytes by `sendfile(2)`.
#[allow(clippy::too_many_arguments)]
async fn send_file(
    stream: &mut TcpStream,
    metrics: &Metrics,
    dir: &LocalDir,
    route: &'static str,
    rel: &str,
    head: &Head,
    keep_alive: bool,
    idle: Duration,
) -> io::Result<()> {
    let head_only = head.method == "HEAD";
    let file = match dir.open(rel) {
        Ok(f) => f,
        Err(_) => {
            metrics.http_requests.inc([route, "404"]);
            return write_all(stream, plain(404, "Not Found", "not found\n", head_only, keep_alive).as_bytes(), idle).await;
        }
    };
    let range = head.header("range").and_then(|v| std::str::from_utf8(v).ok());
    let p = plan(range, file.len, head_only, keep_alive);
    metrics.http_requests.inc([route, status_label(p.status)]);
    send_head(stream, p.head.as_bytes(), p.body.is_some(), idle).await?;
    if let Some((offset, len)) = p.body {
        sendfile_all(stream, &file.file, offset, len, idle).await?;
    }
    Ok(())
}

/// Writes the response head; with `more`, flagged `MSG_MORE` so it leaves in one segment with
/// the first file bytes.
async fn send_head(stream: &TcpStream, mut head: &[u8], more: bool, idle: Duration) -> io::Result<()> {
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    while !head.is_empty() {
        writable(stream, idle).await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            // SAFETY: the pointer and length describe `head`, which outlives the call.
            let n = unsafe { libc::send(stream.as_raw_fd(), head.as_ptr().cast(), head.len(), flags) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match sent {
            Ok(n) => head = &head[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends `len` bytes of `file` from `offset` with `sendfile(2)`, waiting for socket space in
/// between. A file that shrinks under it ends the connection (the length is already promised).
async fn sendfile_all(stream: &TcpStream, file: &std::fs::File, mut offset: u64, len: u64, idle: Duration) -> io::Result<()> {
    let end = offset + len;
    while offset < end {
        writable(stream, idle).await?;
        let chunk = (end - offset).min(1 << 30) as usize;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let mut off = offset as libc::off64_t;
            // SAFETY: both descriptors are open for the call; `off` is a valid pointer.
            let n = unsafe { libc::sendfile64(stream.as_raw_fd(), file.as_raw_fd(), &mut off, chunk) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as u64)
            }
        });
        match sent {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while being sent")),
            Ok(n) => offset += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Responses up to this size are written in one piece with their head.
const SMALL_BODY: u64 = 64 * 1024;

/// Passes a bodiless request to the router and writes its response (length-delimited, or
/// chunked when the length is unknown).
async fn answer_with_router(
    stream: &mut TcpStream,
    app: &Router,
    head: &Head,
    keep_alive: bool,
    idle: Duration,
) -> io::Result<()> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut req = Request::builder()
        .method(Method::from_bytes(head.method.as_bytes()).map_err(|_| bad("method"))?)
        .uri(head.target.as_str())
        .version(if head.minor == 0 { axum::http::Version::HTTP_10 } else { axum::http::Version::HTTP_11 })
        .body(Body::empty())
        .map_err(|_| bad("request target"))?;
    for (name, value) in &head.headers {
        let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(value)) else {
            return Err(bad("header"));
        };
        req.headers_mut().append(n, v);
    }
    let resp = app.clone().oneshot(req).await.unwrap_or_else(|e| match e {});
    let (parts, mut body) = resp.into_parts();
    let head_only = head.method == "HEAD";
    let length = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    // 1xx, 204 and 304 have no body at all; HTTP/1.0 clients get an unknown length as
    // "until close" (their connections close anyway), HTTP/1.1 clients get it chunked.
    let no_body = head_only
        || parts.status.is_informational()
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED;
    let chunked = length.is_none() && !no_body && head.minor == 1;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(
        format!("HTTP/1.1 {} {}\r\n", parts.status.as_u16(), parts.status.canonical_reason().unwrap_or("")).as_bytes(),
    );
    for (name, value) in &parts.headers {
        if name == header::CONNECTION || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if no_body {
        return write_all(stream, &out, idle).await;
    }
    if length.is_some_and(|l| l <= SMALL_BODY) {
        // A script or a metrics page: one write, one segment.
        let data = body.collect().await.map_err(|e| io::Error::other(e.to_string()))?.to_bytes();
        out.extend_from_slice(&data);
        return write_all(stream, &out, idle).await;
    }
    write_all(stream, &out, idle).await?;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| io::Error::other(e.to_string()))?;
        let Ok(data) = frame.into_data() else { continue };
        if data.is_empty() {
            continue;
        }
        if chunked {
            write_all(stream, format!("{:x}\r\n", data.len()).as_bytes(), idle).await?;
            write_all(stream, &data, idle).await?;
            write_all(stream, b"\r\n", idle).await?;
        } else {
            write_all(stream, &data, idle).await?;
        }
    }
    if chunked {
        write_all(stream, b"0\r\n\r\n", idle).await?;
    }
    Ok(())
}

/// The rest of the connection goes to hyper, which first reads `pre` (the bytes already read).
/// hyper closes it when a request head takes longer than `header_timeout` (counted from when
/// hyper starts waiting for it, so this also ends an idle kept-alive connection), and [`Replay`]
/// when the connection makes no progress either way for `idle_timeout`.
async fn hand_to_hyper(stream: TcpStream, pre: Bytes, app: Router, st: &HttpState, open: Open) {
    let limits = st.limits;
    let replay = Replay {
        pre,
        stream,
        idle: limits.idle_timeout,
        deadline: Box::pin(tokio::time::sleep(limits.idle_timeout)),
        writing: false,
        fired: false,
        metrics: st.metrics.clone(),
    };
    let io = hyper_util::rt::TokioIo::new(replay);
    let svc = hyper_util::service::TowerToHyperService::new(app);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(io, svc);
    if let Err(e) = conn.await {
        if e.is_timeout() {
            st.metrics.http_timeouts.inc(["head"]);
        }
        tracing::debug!(error = %e, "HTTP connection (hyper) ended with an error");
    }
    drop(open);
}

/// A stream that yields `pre` before reading from the socket, and fails a read or write that
/// has waited for `idle` since the connection last moved a byte either way (hyper has no such
/// timeout of its own: a client that stops sending a body or stops taking an answer would
/// otherwise hold the connection forever).
struct Replay {
    pre: Bytes,
    stream: TcpStream,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// A write is waiting for the client: a stall now is the client not taking the answer.
    writing: bool,
    /// The stall was counted already.
    fired: bool,
    metrics: Arc<Metrics>,
}

impl Replay {
    fn progress(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }

    /// Called while an operation is pending: fails it once the deadline has passed.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                if !self.fired {
                    self.fired = true;
                    self.metrics.http_timeouts.inc([if self.writing { "write" } else { "idle" }]);
                }
                Poll::Ready(Err(timed_out("HTTP connection made no progress")))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn done<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>, write: bool) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                if write {
                    self.writing = false;
                }
                self.progress();
                Poll::Ready(r)
            }
            Poll::Pending => {
                if write {
                    self.writing = true;
                }
                self.stalled(cx)
            }
        }
    }
}

impl AsyncRead for Replay {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.done(r, cx, false)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.done(r, cx, true)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.done(r, cx, true)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Flushing a TCP stream moves no bytes: not progress.
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
