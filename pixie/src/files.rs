//! The metal-hammer kernel and initrd, served from memory.
//!
//! Every booting machine fetches the same two files, often many machines at once. They are read
//! once into reference-counted buffers and handed to the socket without further copies in pixie;
//! a file that changes on disk (length or mtime) is read again on the next request. Single byte
//! ranges are honoured (`206`), several ranges get the whole file (`200`, as RFC 9110 allows), an
//! unsatisfiable range gets `416`. Names are one path segment of `[A-Za-z0-9._-]`, not starting
//! with a dot, and must resolve inside the directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

/// Files larger than this are not cached (they would be images, not a kernel or initrd).
pub const MAX_CACHED: u64 = 1 << 30;

#[derive(Clone)]
struct Cached {
    len: u64,
    mtime: Option<SystemTime>,
    data: Bytes,
}

pub struct MemDir {
    root: PathBuf,
    cache: Mutex<HashMap<String, Cached>>,
}

/// A parsed `Range` header against a file of `len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeReq {
    Full,
    Part { start: u64, end: u64 },
    Unsatisfiable,
}

/// Parses one `bytes=` range (RFC 9110 14.1); anything else means the whole file.
pub fn parse_range(value: Option<&str>, len: u64) -> RangeReq {
    let Some(v) = value else { return RangeReq::Full };
    let Some(spec) = v.trim().strip_prefix("bytes=") else { return RangeReq::Full };
    if spec.contains(',') {
        return RangeReq::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else { return RangeReq::Full };
    let (a, b) = (a.trim(), b.trim());
    let (start, end) = match (a.is_empty(), b.is_empty()) {
        (true, true) => return RangeReq::Full,
        (true, false) => {
            let Ok(n) = b.parse::<u64>() else { return RangeReq::Full };
            if n == 0 || len == 0 {
                return RangeReq::Unsatisfiable;
            }
            (len.saturating_sub(n), len - 1)
        }
        (false, _) => {
            let Ok(s) = a.parse::<u64>() else { return RangeReq::Full };
            let e = if b.is_empty() {
                len.saturating_sub(1)
            } else {
                match b.parse::<u64>() {
                    Ok(e) if e >= s => e.min(len.saturating_sub(1)),
                    _ => return RangeReq::Full,
                }
            };
            if s >= len {
                return RangeReq::Unsatisfiable;
            }
            (s, e)
        }
    };
    RangeReq::Part { start, end }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl MemDir {
    pub fn new(root: &Path) -> MemDir {
        MemDir { root: root.canonicalize().unwrap_or_else(|_| root.to_path_buf()), cache: Mutex::new(HashMap::new()) }
    }

    fn load(&self, name: &str) -> Result<Cached, StatusCode> {
        if !valid_name(name) {
            return Err(StatusCode::NOT_FOUND);
        }
        let path = self.root.join(name).canonicalize().map_err(|_| StatusCode::NOT_FOUND)?;
        if !path.starts_with(&self.root) {
            return Err(StatusCode::NOT_FOUND);
        }
        let meta = std::fs::metadata(&path).map_err(|_| StatusCode::NOT_FOUND)?;
        if !meta.is_file() {
            return Err(StatusCode::NOT_FOUND);
        }
        if meta.len() > MAX_CACHED {
            return Err(StatusCode::PAYLOAD_TOO_LARGE);
        }
        let mtime = meta.modified().ok();
        if let Some(c) = self.cache.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            if c.len == meta.len() && c.mtime == mtime {
                return Ok(c.clone());
            }
        }
        let data = Bytes::from(std::fs::read(&path).map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?);
        let c = Cached { len: data.len() as u64, mtime, data };
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), c.clone());
        Ok(c)
    }

    /// Answers `GET <prefix>/<name>` (and HEAD, whose body axum drops).
    pub fn serve(&self, name: &str, headers: &HeaderMap) -> Response {
        match self.load(name) {
            Ok(c) => respond(c.data, headers),
            Err(status) => (status, "not found\n").into_response(),
        }
    }
}

/// A whole file or the one range asked for.
pub fn respond(data: Bytes, headers: &HeaderMap) -> Response {
    let len = data.len() as u64;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let mut resp = match parse_range(range, len) {
        RangeReq::Full => {
            let mut r = Response::new(Body::from(data));
            r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            r
        }
        RangeReq::Part { start, end } => {
            let mut r = Response::new(Body::from(data.slice(start as usize..=end as usize)));
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = r.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            r
        }
        RangeReq::Unsatisfiable => {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            r
        }
    };
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    resp
}

/// The kernel and initrd fetched from an upstream URL (`http.hammer_url`) and kept in memory for
/// `ttl`; one fetch at a time, so a hundred machines booting at once cause one download.
pub struct Upstream {
    base: String,
    http: reqwest::Client,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Instant, Bytes)>>,
    fetching: tokio::sync::Mutex<()>,
}

impl Upstream {
    pub fn new(base: &str, ttl: Duration) -> Upstream {
        Upstream {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build().expect("static HTTP client settings"),
            ttl,
            cache: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self, name: &str) -> Option<Bytes> {
        let c = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        c.get(name).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, b)| b.clone())
    }

    pub async fn get(&self, name: &str) -> Result<Bytes, (StatusCode, String)> {
        if !valid_name(name) {
            return Err((StatusCode::NOT_FOUND, "not found".into()));
        }
        if let Some(b) = self.cached(name) {
            return Ok(b);
        }
        let _one = self.fetching.lock().await;
        if let Some(b) = self.cached(name) {
            return Ok(b);
        }
        let url = format!("{}/{name}", self.base);
        let bad = |what: String| {
            tracing::warn!(%url, error = %what, "upstream fetch failed");
            (StatusCode::BAD_GATEWAY, format!("upstream {url}: {what}"))
        };
        let resp = self.http.get(&url).timeout(Duration::from_secs(300)).send().await.map_err(|e| bad(e.to_string()))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Err((StatusCode::NOT_FOUND, "not found".into()));
        }
        if !resp.status().is_success() {
            return Err(bad(format!("status {}", resp.status())));
        }
        if resp.content_length().is_some_and(|l| l > MAX_CACHED) {
            return Err(bad("larger than 1 GiB".into()));
        }
        let data = resp.bytes().await.map_err(|e| bad(e.to_string()))?;
        tracing::info!(%url, bytes = data.len(), "fetched from upstream");
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), (Instant::now(), data.clone()));
        Ok(data)
    }

    pub async fn serve(&self, name: &str, headers: &HeaderMap) -> Response {
        match self.get(name).await {
            Ok(data) => respond(data, headers),
            Err((status, msg)) => (status, format!("{msg}\n")).into_response(),
        }
    }
}

pub type SharedMemDir = Arc<MemDir>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeReq::*;
        assert_eq!(parse_range(None, 100), Full);
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Part { start: 0, end: 9 });
        assert_eq!(parse_range(Some("bytes=90-"), 100), Part { start: 90, end: 99 });
        assert_eq!(parse_range(Some("bytes=-10"), 100), Part { start: 90, end: 99 });
        assert_eq!(parse_range(Some("bytes=-1000"), 100), Part { start: 0, end: 99 });
        assert_eq!(parse_range(Some("bytes=50-5000"), 100), Part { start: 50, end: 99 });
        assert_eq!(parse_range(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-1,5-6"), 100), Full);
        assert_eq!(parse_range(Some("bytes=9-1"), 100), Full);
        assert_eq!(parse_range(Some("items=0-1"), 100), Full);
        assert_eq!(parse_range(Some("bytes=x-1"), 100), Full);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
    }

    #[tokio::test]
    async fn upstream_is_fetched_once_and_served_with_ranges() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let app = axum::Router::new().route(
            "/hammer/{name}",
            axum::routing::get(move |axum::extract::Path(name): axum::extract::Path<String>| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    if name == "vmlinuz" { Ok(vec![7u8; 1000]) } else { Err(StatusCode::NOT_FOUND) }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let up = Upstream::new(&format!("http://{addr}/hammer/"), Duration::from_secs(60));
        assert_eq!(up.get("vmlinuz").await.unwrap().len(), 1000);
        assert_eq!(up.get("vmlinuz").await.unwrap().len(), 1000);
        assert_eq!(hits.load(Ordering::SeqCst), 1, "second request served from memory");
        assert_eq!(up.get("missing").await.unwrap_err().0, StatusCode::NOT_FOUND);
        assert_eq!(up.get("../x").await.unwrap_err().0, StatusCode::NOT_FOUND);
        let mut hm = HeaderMap::new();
        hm.insert(header::RANGE, HeaderValue::from_static("bytes=-10"));
        let r = up.serve("vmlinuz", &hm).await;
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes 990-999/1000");
        let down = Upstream::new("http://127.0.0.1:9", Duration::from_secs(60));
        assert_eq!(down.get("vmlinuz").await.unwrap_err().0, StatusCode::BAD_GATEWAY);
    }

    #[test]
    fn names_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinuz"), b"kernel-1").unwrap();
        std::fs::write(dir.path().join(".hidden"), b"x").unwrap();
        let m = MemDir::new(dir.path());
        for bad in ["", ".hidden", "..", "a/b", "../etc", "%2e%2e"] {
            assert_eq!(m.load(bad).err(), Some(StatusCode::NOT_FOUND), "{bad}");
        }
        assert_eq!(&m.load("vmlinuz").unwrap().data[..], b"kernel-1");
        std::fs::write(dir.path().join("vmlinuz"), b"kernel-22").unwrap();
        assert_eq!(&m.load("vmlinuz").unwrap().data[..], b"kernel-22");
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_static("bytes=7-"));
        let r = m.serve("vmlinuz", &h);
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes 7-8/9");
    }
}
