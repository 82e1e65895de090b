//! HTTP helpers shared by the services that serve files (pixie, image-builder's server).

/// `%XX` escapes decoded, strictly: `None` for an escape that is cut short or not hexadecimal,
/// and for a result that is not UTF-8. What the decoded text may contain is the caller's rule.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            // Two hex digits exactly (`from_str_radix` alone would take a sign: `%+1`).
            let hex = b.get(i + 1..i + 3).filter(|h| h.iter().all(u8::is_ascii_hexdigit))?;
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A `Range` request header against a file of a known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// No range, or one to ignore: send the whole file (200).
    Full,
    /// Bytes `start..=end`, clamped to the file (206).
    Part { start: u64, end: u64 },
    /// A range that starts past the end, or an empty suffix (416).
    Unsatisfiable,
}

/// Parses the value of a `Range` header (or none) for a file of `len` bytes. One `bytes=` range
/// only (RFC 9110 14.1.2): several ranges, another unit or a malformed value mean the whole file,
/// as the RFC allows a server to answer. Numbers are plain digits (no sign).
pub fn parse_range(value: Option<&str>, len: u64) -> ByteRange {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return ByteRange::Full;
    };
    let Some((a, b)) = spec.split_once('-') else {
        return ByteRange::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| if !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) { s.parse::<u64>().ok() } else { None };
    match (a.is_empty(), b.is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => match num(b) {
            Some(0) => ByteRange::Unsatisfiable,
            Some(_) if len == 0 => ByteRange::Unsatisfiable,
            Some(n) => ByteRange::Part { start: len.saturating_sub(n), end: len - 1 },
            None => ByteRange::Full,
        },
        // bytes=a-
        (false, true) => match num(a) {
            Some(start) if start >= len => ByteRange::Unsatisfiable,
            Some(start) => ByteRange::Part { start, end: len - 1 },
            None => ByteRange::Full,
        },
        // bytes=a-b
        (false, false) => match (num(a), num(b)) {
            (Some(start), Some(end)) if start <= end && start >= len => ByteRange::Unsatisfiable,
            (Some(start), Some(end)) if start <= end => ByteRange::Part { start, end: end.min(len - 1) },
            _ => ByteRange::Full,
        },
        (true, true) => ByteRange::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_range, percent_decode, ByteRange};

    #[test]
    fn ranges() {
        use ByteRange::*;
        assert_eq!(parse_range(None, 100), Full);
        assert_eq!(parse_range(Some("bytes=0-9"), 100), Part { start: 0, end: 9 });
        assert_eq!(parse_range(Some("bytes=10-"), 100), Part { start: 10, end: 99 });
        assert_eq!(parse_range(Some("bytes=90-200"), 100), Part { start: 90, end: 99 });
        assert_eq!(parse_range(Some("bytes=99-99"), 100), Part { start: 99, end: 99 });
        assert_eq!(parse_range(Some("bytes=-10"), 100), Part { start: 90, end: 99 });
        assert_eq!(parse_range(Some("bytes=-1000"), 100), Part { start: 0, end: 99 });
        assert_eq!(parse_range(Some("bytes=90-"), 100), Part { start: 90, end: 99 });
        assert_eq!(parse_range(Some("bytes=50-5000"), 100), Part { start: 50, end: 99 });
        assert_eq!(parse_range(Some(" bytes= 0 - 9 "), 100), Part { start: 0, end: 9 });
        assert_eq!(parse_range(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=100-200"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-5"), 0), Unsatisfiable);
        // Malformed or multiple ranges, or another unit: ignored.
        for v in [
            "bytes=5-4",
            "bytes=150-120",
            "bytes=a-b",
            "bytes=x-1",
            "bytes=-",
            "bytes=1-2,4-5",
            "bytes=0-1,5-6",
            "bytes=9-1",
            "items=0-1",
            "bytes=+1-2",
            "bytes=1-+2",
            "bytes 0-1",
        ] {
            assert_eq!(parse_range(Some(v), 100), Full, "{v:?}");
        }
    }

    #[test]
    fn escapes_decode_and_bad_ones_are_refused() {
        assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("plain").as_deref(), Some("plain"));
        assert_eq!(percent_decode("%c3%a9").as_deref(), Some("é"));
        for bad in ["%", "%2", "%zz", "a%+1", "%ff"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }
}
