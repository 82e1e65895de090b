//! `image-builder serve`: a small static file server for the lab. It serves the files of one
//! directory over HTTP/1.1 (`GET` and `HEAD`, `Content-Length`, one `Range: bytes=a-b`, `a-` or
//! `-n` per request), one thread per connection, `Connection: close` after every answer.
//!
//! Nothing outside the directory is reachable: the request target is percent-decoded and split
//! into segments by the pure [`parse_target`] (a `..` segment is refused, empty and `.` segments
//! are dropped, so `//etc/passwd` is `etc/passwd` below the directory), and the file found is
//! canonicalized and must still lie below the canonical directory (no symlinks leading out).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{at, Error, Result};
use metal_types::url::{parse_range, ByteRange};

/// The longest request line or header line accepted, and the most header lines.
const MAX_LINE: u64 = 8192;
const MAX_HEADERS: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
}

/// A parsed request line: the method and the file's path relative to the served directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLine {
    pub method: Method,
    pub path: PathBuf,
}

/// Why a request is refused before any file is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    BadRequest,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    VersionNotSupported,
}

impl Reject {
    pub fn status(self) -> (u16, &'static str) {
        match self {
            Reject::BadRequest => (400, "Bad Request"),
            Reject::Forbidden => (403, "Forbidden"),
            Reject::NotFound => (404, "Not Found"),
            Reject::MethodNotAllowed => (405, "Method Not Allowed"),
            Reject::VersionNotSupported => (505, "HTTP Version Not Supported"),
        }
    }
}

/// `GET /path HTTP/1.1` → method and relative path.
pub fn parse_request_line(line: &str) -> Result<RequestLine, Reject> {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(Reject::BadRequest);
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(Reject::BadRequest);
    }
    match version.strip_prefix("HTTP/") {
        Some("1.0" | "1.1") => {}
        Some(v) if v.len() == 3 && v.as_bytes()[1] == b'.' && v.bytes().filter(u8::is_ascii_digit).count() == 2 => {
            return Err(Reject::VersionNotSupported)
        }
        _ => return Err(Reject::BadRequest),
    }
    let path = parse_target(target)?;
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => return Err(Reject::MethodNotAllowed),
    };
    Ok(RequestLine { method, path })
}

/// A request target (`/a/b%20c?x` or `http://host/a`) → the relative path `a/b c`. `..` anywhere
/// (also percent-encoded, also as `..%2f`) is [`Reject::Forbidden`]; a NUL byte, a bad escape or
/// non-UTF-8 is [`Reject::BadRequest`]; the empty path (`/`) is [`Reject::NotFound`].
pub fn parse_target(target: &str) -> Result<PathBuf, Reject> {
    let target = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map(|i| &rest[i..]).unwrap_or("/"),
        None => target,
    };
    if !target.starts_with('/') {
        return Err(Reject::BadRequest);
    }
    let target = target.split(['?', '#']).next().unwrap_or("");
    let decoded = metal_types::url::percent_decode(target).ok_or(Reject::BadRequest)?;
    if decoded.contains('\0') {
        return Err(Reject::BadRequest);
    }
    let mut path = PathBuf::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => return Err(Reject::Forbidden),
            s => path.push(s),
        }
    }
    if path.as_os_str().is_empty() {
        return Err(Reject::NotFound);
    }
    Ok(path)
}

/// Binds `listen`, prints `serving DIR on http://ADDR` on stderr and serves `dir` until killed.
pub fn serve(dir: &Path, listen: &str) -> Result<()> {
    let root = dir.canonicalize().map_err(at(dir))?;
    if !root.is_dir() {
        return Err(Error::Invalid(format!("{} is not a directory", dir.display())));
    }
    let listener = TcpListener::bind(listen).map_err(|e| Error::Invalid(format!("cannot listen on {listen}: {e}")))?;
    let addr = listener.local_addr().map_err(|e| Error::Invalid(format!("cannot listen on {listen}: {e}")))?;
    eprintln!("serving {} on http://{addr}", dir.display());
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let root = root.clone();
        std::thread::spawn(move || {
            if let Err(e) = handle(stream, &root) {
                tracing::debug!("connection: {e}");
            }
        });
    }
    Ok(())
}

fn read_line(r: &mut impl BufRead) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    r.take(MAX_LINE).read_until(b'\n', &mut buf)?;
    if !buf.ends_with(b"\n") {
        return Ok(None);
    }
    buf.pop();
    if buf.ends_with(b"\r") {
        buf.pop();
    }
    Ok(String::from_utf8(buf).ok())
}

fn handle(stream: TcpStream, root: &Path) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(300)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    let Some(line) = read_line(&mut reader)? else {
        return error(&mut out, Reject::BadRequest, false);
    };
    let mut range = None;
    let mut headers = 0;
    loop {
        let Some(h) = read_line(&mut reader)? else {
            return error(&mut out, Reject::BadRequest, false);
        };
        if h.is_empty() {
            break;
        }
        headers += 1;
        let Some((name, value)) = h.split_once(':') else {
            return error(&mut out, Reject::BadRequest, false);
        };
        if headers > MAX_HEADERS {
            return error(&mut out, Reject::BadRequest, false);
        }
        if name.eq_ignore_ascii_case("range") {
            range = Some(value.trim().to_string());
        }
    }
    let req = match parse_request_line(&line) {
        Ok(r) => r,
        Err(r) => return error(&mut out, r, line.starts_with("HEAD ")),
    };
    let head = req.method == Method::Head;
    // Symlinks may point anywhere: the real path must still be below the root.
    let file = match root.join(&req.path).canonicalize() {
        Ok(p) if !p.starts_with(root) => return error(&mut out, Reject::Forbidden, head),
        Ok(p) if p.is_file() => p,
        _ => return error(&mut out, Reject::NotFound, head),
    };
    let mut f = match File::open(&file) {
        Ok(f) => f,
        Err(_) => return error(&mut out, Reject::NotFound, head),
    };
    let len = f.metadata()?.len();
    let ctype = if file.extension().is_some_and(|e| e == "json") { "application/json" } else { "application/octet-stream" };
    let (start, count) = match parse_range(range.as_deref(), len) {
        ByteRange::Full => {
            write!(out, "HTTP/1.1 200 OK\r\n")?;
            (0, len)
        }
        ByteRange::Part { start, end } => {
            write!(out, "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{end}/{len}\r\n")?;
            (start, end - start + 1)
        }
        ByteRange::Unsatisfiable => {
            let body = "range not satisfiable\n";
            write!(
                out,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Type: text/plain\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            if !head {
                out.write_all(body.as_bytes())?;
            }
            return out.flush();
        }
    };
    write!(out, "Content-Type: {ctype}\r\nContent-Length: {count}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n")?;
    if !head {
        f.seek(SeekFrom::Start(start))?;
        io::copy(&mut f.take(count), &mut out)?;
    }
    out.flush()
}

fn error(out: &mut TcpStream, r: Reject, head: bool) -> io::Result<()> {
    let (code, reason) = r.status();
    let body = format!("{code} {reason}\n");
    write!(out, "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n", body.len())?;
    if r == Reject::MethodNotAllowed {
        write!(out, "Allow: GET, HEAD\r\n")?;
    }
    write!(out, "Connection: close\r\n\r\n")?;
    if !head {
        out.write_all(body.as_bytes())?;
    }
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(target: &str) -> Result<RequestLine, Reject> {
        parse_request_line(&format!("GET {target} HTTP/1.1"))
    }

    #[test]
    fn request_lines() {
        assert_eq!(get("/a.tar.zst"), Ok(RequestLine { method: Method::Get, path: "a.tar.zst".into() }));
        assert_eq!(parse_request_line("HEAD /x/y HTTP/1.0").unwrap(), RequestLine { method: Method::Head, path: "x/y".into() });
        assert_eq!(get("/b%20c.json?v=1#f").unwrap().path, PathBuf::from("b c.json"));
        assert_eq!(get("http://10.99.0.1:8090/img").unwrap().path, PathBuf::from("img"));
        assert_eq!(parse_request_line("POST /a HTTP/1.1"), Err(Reject::MethodNotAllowed));
        assert_eq!(parse_request_line("GET /a HTTP/2.0"), Err(Reject::VersionNotSupported));
        for bad in
            ["", "GET", "GET /a", "GET /a HTTP/1.1 x", "GET  /a HTTP/1.1", "GET a HTTP/1.1", "GET /a FTP/1.0", "G=T /a HTTP/1.1"]
        {
            assert_eq!(parse_request_line(bad), Err(Reject::BadRequest), "{bad:?}");
        }
        for bad in ["/%zz", "/%2", "/a%00b", "/%ff"] {
            assert_eq!(get(bad), Err(Reject::BadRequest), "{bad:?}");
        }
        assert_eq!(get("/"), Err(Reject::NotFound));
        assert_eq!(get("/./"), Err(Reject::NotFound));
    }

    #[test]
    fn traversal_refused() {
        for t in [
            "/..",
            "/../etc/passwd",
            "/a/../../x",
            "/a/..",
            "/%2e%2e/x",
            "/%2E%2E/x",
            "/.%2e/x",
            "/a/..%2fb",
            "/a%2f..%2f..%2fx",
            "http://h/../x",
        ] {
            assert_eq!(get(t), Err(Reject::Forbidden), "{t:?}");
        }
        // Absolute paths stay below the served directory.
        for t in ["//etc/passwd", "/%2fetc/passwd", "/.//etc/passwd"] {
            assert_eq!(get(t).unwrap().path, PathBuf::from("etc/passwd"), "{t:?}");
        }
        // Names that merely contain dots are files.
        assert_eq!(get("/a..b/...").unwrap().path, PathBuf::from("a..b/..."));
        assert!(get("/a/b").unwrap().path.is_relative());
    }
}
