//! Static files: the metal-hammer kernel and initrd (`/hammer/*`) and the TFTP root (`/boot/*`).
//!
//! Local files are opened per request and sent by the zero-copy path in [`crate::http`]
//! (`sendfile(2)`: page cache to socket); this module decides what to send: [`LocalDir::open`]
//! resolves a request path to an open file, [`plan`] turns a file length and a `Range` header into
//! the response head and the byte range of the body. Single byte ranges are honoured (`206`),
//! several ranges get the whole file (`200`, as RFC 9110 allows), an unsatisfiable range gets
//! `416`. A `/hammer` name is one path segment of `[A-Za-z0-9._-]`, not starting with a dot, that
//! resolves inside the directory; a `/boot` path may have directories but no `.` or `..` segment.
//!
//! A kernel and initrd fetched from an upstream URL ([`Upstream`]) are kept in memory instead.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use metal_types::url::{parse_range, ByteRange};

/// Upstream files larger than this are not kept in memory (they would be images).
pub const MAX_CACHED: u64 = 1 << 30;

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// How request paths map into a [`LocalDir`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One name (`/hammer/<name>`), which must resolve inside the directory (symlinks included).
    Flat,
    /// A relative path (`/boot/<dir>/<name>`), percent-decoded, without `.`, `..` or empty
    /// segments, that resolves inside the directory or one of [`LocalDir::allow`]'s (Debian's
    /// iPXE files in a TFTP root are symlinks into `/boot`, as for TFTP's `symlink_targets`).
    Tree,
}

/// A local directory served by the zero-copy path.
#[derive(Debug, Clone)]
pub struct LocalDir {
    root: PathBuf,
    layout: Layout,
    /// Directories outside `root` that symlinks in it may lead into.
    allowed: Vec<PathBuf>,
}

/// A regular file opened for one response.
#[derive(Debug)]
pub struct OpenFile {
    pub file: File,
    pub len: u64,
}

/// `%XX` decoded; `None` for a bad escape or a decoded NUL or backslash.
fn percent_decode(s: &str) -> Option<String> {
    metal_types::url::percent_decode(s).filter(|s| !s.contains(['\0', '\\']))
}

impl LocalDir {
    pub fn new(root: &Path, layout: Layout) -> LocalDir {
        LocalDir { root: root.canonicalize().unwrap_or_else(|_| root.to_path_buf()), layout, allowed: vec![] }
    }

    /// Lets symlinks in the directory lead into `dirs` too.
    pub fn allow(mut self, dirs: &[PathBuf]) -> LocalDir {
        self.allowed = dirs.iter().map(|d| d.canonicalize().unwrap_or_else(|_| d.clone())).collect();
        self
    }

    fn inside(&self, path: &Path) -> bool {
        path.starts_with(&self.root) || self.allowed.iter().any(|d| path.starts_with(d))
    }

    /// The file for `rel`, the request path after the prefix and its slash (query removed).
    /// Every refusal is `404`, so a probe learns nothing about what exists outside.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, StatusCode> {
        match self.layout {
            Layout::Flat => {
                if !valid_name(rel) {
                    return Err(StatusCode::NOT_FOUND);
                }
                let path = self.root.join(rel).canonicalize().map_err(|_| StatusCode::NOT_FOUND)?;
                if !self.inside(&path) {
                    return Err(StatusCode::NOT_FOUND);
                }
                Ok(path)
            }
            Layout::Tree => {
                let rel = percent_decode(rel).ok_or(StatusCode::NOT_FOUND)?;
                let mut path = self.root.clone();
                for seg in rel.split('/') {
                    if seg.is_empty() || seg == "." || seg == ".." {
                        return Err(StatusCode::NOT_FOUND);
                    }
                    path.push(seg);
                }
                let path = path.canonicalize().map_err(|_| StatusCode::NOT_FOUND)?;
                if !self.inside(&path) {
                    return Err(StatusCode::NOT_FOUND);
                }
                Ok(path)
            }
        }
    }

    /// Opens the file for `rel` (see [`LocalDir::resolve`]); directories and devices are `404`.
    pub fn open(&self, rel: &str) -> Result<OpenFile, StatusCode> {
        let path = self.resolve(rel)?;
        // O_NONBLOCK: opening a FIFO someone left in the directory must not hang the server.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|_| StatusCode::NOT_FOUND)?;
        let meta = file.metadata().map_err(|_| StatusCode::NOT_FOUND)?;
        if !meta.is_file() {
            return Err(StatusCode::NOT_FOUND);
        }
        Ok(OpenFile { file, len: meta.len() })
    }

    /// Answers through axum, reading the file into memory: for the requests the zero-copy path
    /// hands over (a GET with a body, say).
    pub async fn serve_buffered(&self, rel: &str, headers: &HeaderMap) -> Response {
        let read = match self.resolve(rel) {
            Ok(path) => tokio::fs::read(path).await.map_err(|_| StatusCode::NOT_FOUND),
            Err(s) => Err(s),
        };
        match read {
            Ok(data) => respond(Bytes::from(data), headers),
            Err(status) => (status, "not found\n").into_response(),
        }
    }
}

/// The response to a static-file request, before the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub status: u16,
    /// The whole head, status line to the empty line.
    pub head: String,
    /// Offset and length of the file bytes that follow the head (`None` for HEAD and `416`).
    pub body: Option<(u64, u64)>,
}

/// The response head for a file of `len` bytes and the `Range` header `range`; `head_only` for
/// HEAD (same headers, no body); `keep_alive` false adds `connection: close`.
pub fn plan(range: Option<&str>, len: u64, head_only: bool, keep_alive: bool) -> Plan {
    let (status, reason, offset, count) = match parse_range(range, len) {
        ByteRange::Full => (200, "OK", 0, len),
        ByteRange::Part { start, end } => (206, "Partial Content", start, end - start + 1),
        ByteRange::Unsatisfiable => (416, "Range Not Satisfiable", 0, 0),
    };
    let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
    let _ = write!(head, "content-length: {count}\r\naccept-ranges: bytes\r\n");
    if status == 200 || status == 206 {
        head.push_str("content-type: application/octet-stream\r\n");
    }
    match status {
        206 => {
            let _ = write!(head, "content-range: bytes {offset}-{}/{len}\r\n", offset + count - 1);
        }
        416 => {
            let _ = write!(head, "content-range: bytes */{len}\r\n");
        }
        _ => {}
    }
    if !keep_alive {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    let body = (status != 416 && !head_only && count > 0).then_some((offset, count));
    Plan { status, head, body }
}

/// A short plain-text answer (`404` and the like) with its body, for the zero-copy path.
pub fn plain(status: u16, reason: &str, text: &str, head_only: bool, keep_alive: bool) -> String {
    let mut out =
        format!("HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n", text.len());
    if !keep_alive {
        out.push_str("connection: close\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(text);
    }
    out
}

/// A whole file or the one range asked for.
pub fn respond(data: Bytes, headers: &HeaderMap) -> Response {
    let len = data.len() as u64;
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let mut resp = match parse_range(range, len) {
        ByteRange::Full => {
            let mut r = Response::new(Body::from(data));
            r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
            r
        }
        ByteRange::Part { start, end } => {
            let mut r = Response::new(Body::from(data.slice(start as usize..=end as usize)));
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = r.headers_mut();
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                h.insert(header::CONTENT_RANGE, v);
            }
            r
        }
        ByteRange::Unsatisfiable => {
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
            http: metal_client::http::client(&metal_client::http::Options::default().connect_timeout(Duration::from_secs(5)))
                .expect("static HTTP client settings"),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
                    if name == "vmlinuz" {
                        Ok(vec![7u8; 1000])
                    } else {
                        Err(StatusCode::NOT_FOUND)
                    }
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
    fn flat_names_stay_inside_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("hammer");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("vmlinuz"), b"kernel-1").unwrap();
        std::fs::write(root.join(".hidden"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("out")).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        let d = LocalDir::new(&root, Layout::Flat);
        for bad in ["", ".hidden", "..", "a/b", "../secret", "..%2fsecret", "%2e%2e", "out", "sub", "missing"] {
            assert_eq!(d.open(bad).err(), Some(StatusCode::NOT_FOUND), "{bad}");
        }
        let f = d.open("vmlinuz").unwrap();
        assert_eq!(f.len, 8);
        std::fs::write(root.join("vmlinuz"), b"kernel-22").unwrap();
        assert_eq!(d.open("vmlinuz").unwrap().len, 9, "every request sees the file as it is now");
    }

    #[test]
    fn tree_paths_are_decoded_and_refuse_dot_segments() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("efi")).unwrap();
        std::fs::write(dir.path().join("efi/snp only.efi"), b"efi").unwrap();
        std::fs::write(dir.path().join("undionly.kpxe"), b"bios").unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("ipxe.efi"), b"ipxe").unwrap();
        std::os::unix::fs::symlink(outside.path().join("ipxe.efi"), dir.path().join("ipxe.efi")).unwrap();
        assert_eq!(
            LocalDir::new(dir.path(), Layout::Tree).open("ipxe.efi").err(),
            Some(StatusCode::NOT_FOUND),
            "symlink out of the root"
        );
        let d = LocalDir::new(dir.path(), Layout::Tree).allow(&[outside.path().to_path_buf()]);
        assert_eq!(d.open("ipxe.efi").unwrap().len, 4, "symlink into an allowed directory");
        assert_eq!(d.open("undionly.kpxe").unwrap().len, 4);
        assert_eq!(d.open("efi/snp%20only.efi").unwrap().len, 3);
        for bad in [
            "",
            "efi",
            "efi/",
            "../etc/passwd",
            "efi/../undionly.kpxe",
            "%2e%2e/x",
            "..%2fetc",
            "./undionly.kpxe",
            "a%00b",
            "%zz",
            "a%5cb",
        ] {
            assert_eq!(d.open(bad).err(), Some(StatusCode::NOT_FOUND), "{bad}");
        }
    }

    #[test]
    fn plans_whole_ranged_head_and_unsatisfiable_answers() {
        let p = plan(None, 100, false, true);
        assert_eq!((p.status, p.body), (200, Some((0, 100))));
        assert!(p.head.starts_with("HTTP/1.1 200 OK\r\n") && p.head.ends_with("\r\n\r\n"), "{}", p.head);
        assert!(p.head.contains("content-length: 100\r\n") && !p.head.contains("connection"), "{}", p.head);
        let p = plan(Some("bytes=10-19"), 100, false, false);
        assert_eq!((p.status, p.body), (206, Some((10, 10))));
        assert!(p.head.contains("content-range: bytes 10-19/100\r\n") && p.head.contains("content-length: 10\r\n"), "{}", p.head);
        assert!(p.head.contains("connection: close\r\n"), "{}", p.head);
        let p = plan(Some("bytes=-10"), 100, true, true);
        assert_eq!((p.status, p.body), (206, None), "HEAD: the headers of the GET, no body");
        assert!(p.head.contains("content-range: bytes 90-99/100\r\n"), "{}", p.head);
        let p = plan(Some("bytes=100-"), 100, false, true);
        assert_eq!((p.status, p.body), (416, None));
        assert!(p.head.contains("content-range: bytes */100\r\n") && p.head.contains("content-length: 0\r\n"), "{}", p.head);
        assert_eq!(plan(None, 0, false, true).body, None, "an empty file has no body to send");
    }
}
