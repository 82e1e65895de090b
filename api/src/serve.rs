//! The HTTP(S) server: the accept loop, TLS, the limits on slow and idle clients, and
//! graceful shutdown.
//!
//! HTTP/1.1 only (hyper), over plain TCP or TLS (rustls with ring; ALPN `http/1.1`). The
//! provisioning network is hostile, so no client may hold a connection, or a slot of the
//! server, for longer than the protocol needs:
//!
//! | phase of a connection | limit |
//! |---|---|
//! | TLS handshake | [`Limits::tls_handshake_timeout`] from the accept |
//! | reading a request head | [`Limits::header_read_timeout`] from the accept (or from the first byte after an idle period) |
//! | reading a request body | [`Limits::body_read_timeout`] from the end of its head |
//! | handling (the route's own time: a long-poll waits up to 60 s) | none |
//! | sending a response | closed when no byte goes out for [`Limits::idle_timeout`] |
//! | idle between requests (keep-alive) | [`Limits::idle_timeout`] |
//!
//! At most [`Limits::max_connections`] connections are open at once; beyond that the loop
//! stops accepting, so new connections wait in the kernel's backlog until a slot is free.
//!
//! Shutdown: the loop stops accepting; idle connections close at once, in-flight requests
//! finish (parked long-polls end with 204 through `App::begin_shutdown`), and every phase
//! above stays bounded meanwhile; the returned future completes when the last connection is
//! gone.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use hyper::body::{Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

/// Timeouts and the connection limit of the server (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    /// At least 1.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_read_timeout: Duration::from_secs(30),
            tls_handshake_timeout: Duration::from_secs(10),
            max_connections: 4096,
        }
    }
}

/// The server's certificate chain (leaf first) and private key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} holds no certificate (expected PEM `-----BEGIN CERTIFICATE-----` blocks, the server's first)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} is not valid PEM: {detail}", path.display())]
    Pem { path: PathBuf, detail: String },
    #[error("{} holds no private key (expected a PEM PKCS#8, PKCS#1 or SEC1 key)", path.display())]
    NoKey { path: PathBuf },
    #[error("the key {} does not match the certificate {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate {} with the key {} is not usable: {detail}", cert.display(), key.display())]
    Unusable { cert: PathBuf, key: PathBuf, detail: String },
}

/// Reads the certificate chain and key into a rustls server config (ring; TLS 1.2 and 1.3;
/// ALPN `http/1.1`).
pub fn load_tls(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |path: &Path| std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_path_buf(), source });
    let pem = read(&files.cert)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: files.cert.clone(), detail: e.to_string() })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate { path: files.cert.clone() });
    }
    let key = PrivateKeyDer::from_pem_slice(&read(&files.key)?).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey { path: files.key.clone() },
        e => TlsError::Pem { path: files.key.clone(), detail: e.to_string() },
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(metal_client::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => TlsError::Mismatch { cert: files.cert.clone(), key: files.key.clone() },
            e => TlsError::Unusable { cert: files.cert.clone(), key: files.key.clone(), detail: e.to_string() },
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `router` on `listener` until `shutdown` completes, then drains (module
/// documentation). Accept errors (out of file descriptors, aborted handshakes) are logged and
/// retried; it returns only after shutdown.
pub async fn serve(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let slots = Arc::new(Semaphore::new(max));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let limits = Arc::new(limits);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut full_since: Option<Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(s) => s,
            Err(_) => {
                if full_since.is_none() {
                    tracing::warn!(max, "connection limit reached; new connections wait until one closes");
                    full_since = Some(Instant::now());
                }
                tokio::select! {
                    biased;
                    _ = &mut shutdown => break,
                    s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
                }
            }
        };
        if let Some(since) = full_since.take() {
            tracing::info!(waited_ms = since.elapsed().as_millis() as u64, "below the connection limit again");
        }
        let (tcp, peer) = tokio::select! {
            biased;
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let conn = Connection { router: router.clone(), limits: limits.clone(), stop: stop_rx.clone(), peer };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _slot = slot;
            conn.run(tcp, acceptor).await;
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a slot until it is gone.
    let _ = slots.acquire_many(max as u32).await;
    Ok(())
}

struct Connection {
    router: axum::Router,
    limits: Arc<Limits>,
    stop: watch::Receiver<bool>,
    peer: SocketAddr,
}

impl Connection {
    async fn run(mut self, tcp: TcpStream, acceptor: Option<tokio_rustls::TlsAcceptor>) {
        let _ = tcp.set_nodelay(true);
        let Some(acceptor) = acceptor else { return self.http(tcp).await };
        let handshake = tokio::time::timeout(self.limits.tls_handshake_timeout, acceptor.accept(tcp));
        let stream = tokio::select! {
            r = handshake => r,
            _ = self.stop.wait_for(|s| *s) => return,
        };
        match stream {
            Ok(Ok(s)) => self.http(s).await,
            Ok(Err(e)) => tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed"),
            Err(_) => tracing::debug!(peer = %self.peer, timeout = ?self.limits.tls_handshake_timeout, "TLS handshake timed out"),
        }
    }

    async fn http<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static>(mut self, io: IO) {
        let activity = Arc::new(Activity::new());
        let io = hyper_util::rt::TokioIo::new(Watched { inner: io, activity: activity.clone() });
        let (router, a, body_timeout) = (self.router.clone(), activity.clone(), self.limits.body_read_timeout);
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let (router, activity) = (router.clone(), a.clone());
            async move {
                let in_flight = InFlight::begin(activity.clone());
                let req = req.map(|b| Body::new(DeadlineBody::new(b, body_timeout)));
                let resp = match router.oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                activity.set(Phase::Responding);
                Ok::<_, Infallible>(resp.map(|b| Body::new(GuardedBody { inner: b, _in_flight: in_flight })))
            }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        // The header timeout is ours (`Activity`): hyper's would also cut idle keep-alives.
        builder.header_read_timeout(None).keep_alive(true);
        let conn = builder.serve_connection(io, service);
        tokio::pin!(conn);
        let mut stopping = false;
        loop {
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                why = activity.expired(&self.limits) => {
                    tracing::debug!(peer = %self.peer, "closing the connection: {why}");
                    return;
                }
                _ = self.stop.wait_for(|s| *s), if !stopping => {
                    stopping = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Where a connection is, for the timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request head; since the accept or the first byte.
    Head,
    /// The route runs (its own time, no limit); the body has its own deadline.
    Handling,
    /// The response goes out; since the last byte written.
    Responding,
    /// Between requests; since the last response ended.
    Idle,
}

struct ActivityState {
    phase: Phase,
    since: Instant,
    in_flight: usize,
}

/// A connection's phase and since when, updated by the I/O wrapper and the service.
struct Activity {
    state: Mutex<ActivityState>,
    changed: Notify,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            state: Mutex::new(ActivityState { phase: Phase::Head, since: Instant::now(), in_flight: 0 }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, phase: Phase) {
        let mut s = self.lock();
        s.phase = phase;
        s.since = Instant::now();
        drop(s);
        self.changed.notify_waiters();
    }

    /// Bytes came in: an idle connection starts reading a head.
    fn read_some(&self) {
        if self.lock().phase == Phase::Idle {
            self.set(Phase::Head);
        }
    }

    /// Bytes went out: a response makes progress (the waiter re-checks when its timer fires).
    fn wrote_some(&self) {
        let mut s = self.lock();
        if s.phase == Phase::Responding {
            s.since = Instant::now();
        }
    }

    fn deadline(&self, limits: &Limits) -> Option<(Instant, &'static str)> {
        let s = self.lock();
        match s.phase {
            Phase::Head => Some((s.since + limits.header_read_timeout, "no complete request head within the header timeout")),
            Phase::Handling => None,
            Phase::Responding => {
                Some((s.since + limits.idle_timeout, "the client did not read the response within the idle timeout"))
            }
            Phase::Idle => Some((s.since + limits.idle_timeout, "idle for the idle timeout")),
        }
    }

    /// Completes when the current phase outlasts its limit; returns why.
    async fn expired(&self, limits: &Limits) -> &'static str {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.deadline(limits) {
                None => changed.await,
                Some((at, why)) => {
                    if at <= Instant::now() {
                        return why;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = changed => {}
                    }
                }
            }
        }
    }
}

/// One request from the call of the route to the end of its response body.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: Arc<Activity>) -> InFlight {
        activity.lock().in_flight += 1;
        activity.set(Phase::Handling);
        InFlight(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.0.lock();
        s.in_flight -= 1;
        let idle = s.in_flight == 0;
        drop(s);
        if idle {
            self.0.set(Phase::Idle);
        }
    }
}

/// The connection's I/O, telling [`Activity`] when bytes move.
struct Watched<IO> {
    inner: IO,
    activity: Arc<Activity>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read_some();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote_some();
        }
        r
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.wrote_some();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// The request body, failing once the body timeout has passed since its head was read.
struct DeadlineBody {
    inner: Incoming,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
struct BodyTimeout(Duration);

impl DeadlineBody {
    fn new(inner: Incoming, timeout: Duration) -> DeadlineBody {
        let deadline = (!hyper::body::Body::is_end_stream(&inner)).then(|| Box::pin(tokio::time::sleep(timeout)));
        DeadlineBody { inner, deadline, timeout }
    }
}

impl hyper::body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if let Some(d) = this.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Some(Err(BodyTimeout(this.timeout).into())));
            }
        }
        Poll::Pending
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that ends its request's [`InFlight`] when hyper drops it (sent, or the
/// connection is gone).
struct GuardedBody {
    inner: Body,
    _in_flight: InFlight,
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
