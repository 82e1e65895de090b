//! The image download: an HTTP GET on its own thread, hashed as it arrives, resumed with
//! `Range: bytes=<n>-` after a dropped connection, handed to the caller as one continuous
//! [`Read`] stream.
//!
//! The download thread runs a small current-thread tokio runtime of its own, so [`Download`]
//! works the same whether the caller is a plain thread or a `spawn_blocking` task. It computes
//! the SHA-256 over exactly the bytes it passes on, in order; a resumed request continues the
//! same hash, so the digest is that of the whole file however often the connection dropped.
//! Backpressure comes from a bounded channel: the network is read only as fast as the image is
//! written.

use std::collections::VecDeque;
use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// How the download behaves on a bad network.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Consecutive attempts without any new byte before giving up (the first request counts).
    pub max_attempts: u32,
    /// Wait before the first retry; doubles per failed attempt up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// A connection that delivers nothing for this long is dropped and resumed.
    pub idle_timeout: Duration,
    /// Chunks buffered between the download thread and the writer.
    pub channel_depth: usize,
    /// Trusted for `https://` image URLs (metal-hammer passes what it trusts for the API).
    pub roots: metal_client::tls::Roots,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            max_attempts: 8,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            channel_depth: 16,
            roots: metal_client::tls::Roots::default(),
        }
    }
}

/// Why a download failed for good.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("GET {url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("GET {url}: gave up after {attempts} attempts at byte {offset}")]
    GaveUp {
        url: String,
        attempts: u32,
        offset: u64,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("GET {url}: the server sent {got} bytes, the manifest says {expected}")]
    Length { url: String, expected: u64, got: u64 },
    #[error("GET {url}: the server resumed at the wrong offset ({got}, wanted {wanted})")]
    BadResume { url: String, wanted: u64, got: String },
    #[error("cannot start the download: {0}")]
    Setup(String),
}

/// Counters the download thread updates; read them for progress.
#[derive(Debug, Default)]
pub struct FetchCounters {
    /// Bytes received and hashed so far.
    pub received: AtomicU64,
    /// Connections dropped and resumed.
    pub resumes: AtomicU64,
    /// Set when the reader is gone: the download thread stops at its next chance.
    pub cancelled: AtomicBool,
}

enum Msg {
    /// Network reads as they came (no copy), together at least [`COALESCE`] bytes.
    Data(Vec<Bytes>),
    Done([u8; 32]),
    Failed(FetchError),
}

/// The downloaded file as a [`Read`] stream. It ends (returns 0) only when every byte of the
/// file arrived; [`Download::finish`] then returns the SHA-256 of those bytes.
pub struct Download {
    rx: Receiver<Msg>,
    /// Received, not yet read; the front chunk is never empty.
    chunks: VecDeque<Bytes>,
    digest: Option<[u8; 32]>,
    failed: bool,
    error: Option<FetchError>,
    thread: Option<JoinHandle<()>>,
    pub counters: Arc<FetchCounters>,
}

impl Download {
    /// Starts downloading `url`, which must be `expected_len` bytes long.
    pub fn start(url: &str, expected_len: u64, opts: FetchOptions) -> Result<Download, FetchError> {
        let (tx, rx) = sync_channel(opts.channel_depth.max(1));
        let counters = Arc::new(FetchCounters::default());
        let url = url.to_string();
        let c = counters.clone();
        let thread = std::thread::Builder::new()
            .name("image-download".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Msg::Failed(FetchError::Setup(e.to_string())));
                        return;
                    }
                };
                let msg = match rt.block_on(fetch(&url, expected_len, &opts, &tx, &c)) {
                    Ok(d) => Msg::Done(d),
                    Err(e) => Msg::Failed(e),
                };
                let _ = tx.send(msg);
            })
            .map_err(|e| FetchError::Setup(e.to_string()))?;
        Ok(Download { rx, chunks: VecDeque::new(), digest: None, failed: false, error: None, thread: Some(thread), counters })
    }

    /// After the stream ended: the SHA-256 of every byte received.
    pub fn digest(&self) -> Option<[u8; 32]> {
        self.digest
    }

    /// Reads what is left (an archive can end before its file does: tar's padding, zstd's last
    /// frame), then returns the digest of the whole file, or why the download failed.
    pub fn finish(mut self) -> Result<[u8; 32], FetchError> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match self.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(self.error.take().unwrap_or_else(|| FetchError::Setup(format!("download ended: {e}"))));
                }
            }
        }
        self.digest.ok_or_else(|| FetchError::Setup("download ended without a digest".into()))
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let avail = self.fill_buf()?;
        let n = buf.len().min(avail.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

/// The received bytes themselves, without a copy: zstd reads its input straight from them.
impl BufRead for Download {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.chunks.is_empty() {
            if self.digest.is_some() {
                return Ok(&[]);
            }
            if self.failed {
                return Err(io::Error::other("download failed"));
            }
            match self.rx.recv() {
                Ok(Msg::Data(batch)) => self.chunks.extend(batch.into_iter().filter(|b| !b.is_empty())),
                Ok(Msg::Done(d)) => self.digest = Some(d),
                Ok(Msg::Failed(e)) => {
                    self.failed = true;
                    let err = io::Error::other(e.to_string());
                    self.error = Some(e);
                    return Err(err);
                }
                Err(_) => {
                    self.failed = true;
                    return Err(io::Error::other("download thread ended unexpectedly"));
                }
            }
        }
        Ok(&self.chunks[0])
    }

    fn consume(&mut self, n: usize) {
        if let Some(front) = self.chunks.front_mut() {
            let _ = front.split_to(n.min(front.len()));
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        // The thread ends on its next send (the receiver is gone) or its next retry (cancelled);
        // it is not joined, so a stalled server cannot hold up the caller.
        self.counters.cancelled.store(true, Ordering::SeqCst);
        drop(self.thread.take());
    }
}

/// What went wrong in one attempt; whether to retry is decided by the caller.
enum Attempt {
    Retry(Box<dyn std::error::Error + Send + Sync>),
    Fatal(FetchError),
    /// The reader went away: stop quietly.
    Cancelled,
}

/// Least bytes the download thread hands on at once (less only at the end of a connection).
const COALESCE: usize = 256 << 10;

async fn fetch(
    url: &str,
    expected: u64,
    opts: &FetchOptions,
    tx: &SyncSender<Msg>,
    counters: &FetchCounters,
) -> Result<[u8; 32], FetchError> {
    let client =
        metal_client::http::builder(&metal_client::http::Options::new(opts.roots.clone()).connect_timeout(opts.connect_timeout))
            .map_err(|e| FetchError::Setup(e.to_string()))?
            .no_proxy()
            .build()
            .map_err(|e| FetchError::Setup(e.to_string()))?;
    let mut hasher = Sha256::new();
    let mut offset = 0u64;
    let mut failures = 0u32;
    let mut backoff = opts.initial_backoff;
    loop {
        let before = offset;
        match attempt(&client, url, expected, &mut offset, &mut hasher, opts, tx, counters).await {
            Ok(()) => return Ok(hasher.finalize().into()),
            Err(Attempt::Fatal(e)) => return Err(e),
            Err(Attempt::Cancelled) => return Err(FetchError::Setup("cancelled".into())),
            Err(Attempt::Retry(_)) if counters.cancelled.load(Ordering::SeqCst) => {
                return Err(FetchError::Setup("cancelled".into()));
            }
            Err(Attempt::Retry(e)) => {
                if offset > before {
                    failures = 0;
                    backoff = opts.initial_backoff;
                }
                failures += 1;
                if failures >= opts.max_attempts {
                    return Err(FetchError::GaveUp { url: url.into(), attempts: failures, offset, source: e });
                }
                tracing::warn!(url, offset, error = %e, "image download interrupted; resuming");
                counters.resumes.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(opts.max_backoff);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn attempt(
    client: &reqwest::Client,
    url: &str,
    expected: u64,
    offset: &mut u64,
    hasher: &mut Sha256,
    opts: &FetchOptions,
    tx: &SyncSender<Msg>,
    counters: &FetchCounters,
) -> Result<(), Attempt> {
    let mut req = client.get(url);
    if *offset > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={}-", *offset));
    }
    let mut resp = match tokio::time::timeout(opts.idle_timeout, req.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(Attempt::Retry(e.into())),
        Err(_) => return Err(Attempt::Retry("no response".into())),
    };
    let status = resp.status().as_u16();
    // Bytes to throw away: a server that ignores Range starts again at 0.
    let mut skip = 0u64;
    match status {
        200 => skip = *offset,
        206 if *offset > 0 => {
            let range =
                resp.headers().get(reqwest::header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let start = range.strip_prefix("bytes ").and_then(|r| r.split('-').next()).and_then(|s| s.parse::<u64>().ok());
            if start != Some(*offset) {
                return Err(Attempt::Fatal(FetchError::BadResume { url: url.into(), wanted: *offset, got: range }));
            }
        }
        416 if *offset == expected => return Ok(()),
        s if s >= 500 || s == 408 || s == 429 => return Err(Attempt::Retry(format!("HTTP status {s}").into())),
        s => return Err(Attempt::Fatal(FetchError::Status { url: url.into(), status: s })),
    }
    // Network reads are handed on in batches of at least COALESCE bytes, so the zstd thread
    // wakes once per batch, not once per TCP read; the bytes themselves are not copied.
    let mut pending: Vec<Bytes> = Vec::new();
    let mut pending_len = 0;
    let result = loop {
        let chunk = match tokio::time::timeout(opts.idle_timeout, resp.chunk()).await {
            Ok(Ok(Some(c))) => c,
            Ok(Ok(None)) => break Ok(()),
            Ok(Err(e)) => break Err(Attempt::Retry(e.into())),
            Err(_) => break Err(Attempt::Retry(format!("no data for {:?}", opts.idle_timeout).into())),
        };
        let mut chunk = chunk;
        if skip > 0 {
            let n = skip.min(chunk.len() as u64) as usize;
            let _ = chunk.split_to(n);
            skip -= n as u64;
        }
        if chunk.is_empty() {
            continue;
        }
        if *offset + chunk.len() as u64 > expected {
            break Err(Attempt::Fatal(FetchError::Length { url: url.into(), expected, got: *offset + chunk.len() as u64 }));
        }
        hasher.update(&chunk);
        *offset += chunk.len() as u64;
        counters.received.store(*offset, Ordering::Relaxed);
        pending_len += chunk.len();
        pending.push(chunk);
        if pending_len >= COALESCE {
            pending_len = 0;
            if tx.send(Msg::Data(std::mem::take(&mut pending))).is_err() {
                return Err(Attempt::Cancelled);
            }
        }
    };
    // Everything hashed is passed on, also when the connection broke: the resume starts there.
    if !pending.is_empty() && tx.send(Msg::Data(pending)).is_err() {
        return Err(Attempt::Cancelled);
    }
    result?;
    if *offset < expected {
        return Err(Attempt::Retry(format!("connection ended at byte {} of {expected}", *offset).into()));
    }
    Ok(())
}
