//! A minimal HTTP/1.1 client over `std::net::TcpStream` for `http://` URLs: enough to `POST`
//! one JSON body to the API from a build machine or a lab, without an async runtime.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crate::error::{Error, Result};

/// `http://host[:port]/path` → (host, port, path).
pub fn parse_url(url: &str) -> Option<(String, u16, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p.parse().ok()?),
        _ => (authority, 80),
    };
    if host.is_empty() {
        return None;
    }
    Some((host.trim_start_matches('[').trim_end_matches(']').to_string(), port, path.to_string()))
}

/// The request bytes of a JSON `POST`.
pub fn encode_post(host: &str, port: u16, path: &str, token: &str, body: &[u8]) -> Vec<u8> {
    encode("POST", host, port, path, token, body)
}

fn encode(method: &str, host: &str, port: u16, path: &str, token: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nAccept: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// Status code and body of a response (`Connection: close`, so the body runs to EOF, or
/// `Transfer-Encoding: chunked`).
pub fn decode_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..head_end]).ok()?;
    let status_line = head.lines().next()?;
    let mut parts = status_line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let code = parts.next()?.parse().ok()?;
    let body = &raw[head_end + 4..];
    let chunked = head.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.trim().eq_ignore_ascii_case("transfer-encoding") && v.trim().eq_ignore_ascii_case("chunked"))
    });
    Some((code, if chunked { dechunk(body)? } else { body.to_vec() }))
}

fn dechunk(mut body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = body.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&body[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(body.get(..size)?);
        body = body.get(size + 2..)?;
    }
}

/// POSTs `body` to `url` with a bearer token; returns the status and the body.
pub fn post_json(url: &str, token: &str, body: &[u8], timeout: Duration) -> Result<(u16, Vec<u8>)> {
    request("POST", url, token, body, timeout)
}

/// GETs `url` with a bearer token; returns the status and the body.
pub fn get(url: &str, token: &str, timeout: Duration) -> Result<(u16, Vec<u8>)> {
    request("GET", url, token, b"", timeout)
}

fn request(method: &str, url: &str, token: &str, body: &[u8], timeout: Duration) -> Result<(u16, Vec<u8>)> {
    let err = |message: String| Error::Http { url: url.to_string(), message };
    let (host, port, path) = parse_url(url).ok_or_else(|| err("only http://host[:port]/path URLs are supported".into()))?;
    let addr = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| err(e.to_string()))?
        .next()
        .ok_or_else(|| err("no address".into()))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| err(format!("connect: {e}")))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| err(e.to_string()))?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| err(e.to_string()))?;
    stream.write_all(&encode(method, &host, port, &path, token, body)).map_err(|e| err(format!("send: {e}")))?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| err(format!("receive: {e}")))?;
    decode_response(&raw).ok_or_else(|| err("malformed HTTP response".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(parse_url("http://10.99.0.1:8080/v1/images"), Some(("10.99.0.1".into(), 8080, "/v1/images".into())));
        assert_eq!(parse_url("http://api"), Some(("api".into(), 80, "/".into())));
        assert_eq!(parse_url("http://[::1]:81/x"), Some(("::1".into(), 81, "/x".into())));
        assert_eq!(parse_url("https://x/"), None);
        assert_eq!(parse_url("http://:80/"), None);
    }

    #[test]
    fn request_and_response() {
        let req = String::from_utf8(encode_post("h", 80, "/p", "tok", b"{}")).unwrap();
        assert!(req.starts_with("POST /p HTTP/1.1\r\n"));
        assert!(req.contains("Authorization: Bearer tok\r\n"));
        assert!(req.ends_with("Content-Length: 2\r\nConnection: close\r\n\r\n{}"));
        assert_eq!(decode_response(b"HTTP/1.1 201 Created\r\nA: b\r\n\r\n{\"x\":1}"), Some((201, b"{\"x\":1}".to_vec())));
        assert_eq!(decode_response(b"garbage"), None);
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n";
        assert_eq!(decode_response(chunked), Some((200, b"{\"a\":1}".to_vec())));
    }
}
