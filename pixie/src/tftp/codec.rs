//! TFTP packets (RFC 1350, options RFC 2347) as pure decode/encode, and option negotiation
//! (RFC 2348 blksize, RFC 2349 timeout/tsize, RFC 7440 windowsize). No I/O.

use std::time::Duration;

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// Error codes (RFC 1350, 2347).
pub mod code {
    pub const NOT_DEFINED: u16 = 0;
    pub const FILE_NOT_FOUND: u16 = 1;
    pub const ACCESS_VIOLATION: u16 = 2;
    pub const ILLEGAL_OPERATION: u16 = 4;
    pub const UNKNOWN_TID: u16 = 5;
    /// The client refuses the options (UEFI does this after learning `tsize`).
    pub const OPTION_REFUSED: u16 = 8;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rq {
    pub filename: String,
    pub mode: String,
    /// In the order sent; names as sent (compare case-insensitively).
    pub options: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    Rrq(Rq),
    Wrq(Rq),
    Data { block: u16, data: Vec<u8> },
    Ack { block: u16 },
    Error { code: u16, message: String },
    Oack { options: Vec<(String, String)> },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet shorter than 4 bytes")]
    Short,
    #[error("unknown opcode {0}")]
    Opcode(u16),
    #[error("string field not terminated by NUL")]
    Unterminated,
    #[error("string field is not UTF-8")]
    NotUtf8,
    #[error("option {0:?} has no value")]
    DanglingOption(String),
    #[error("empty file name")]
    EmptyFilename,
}

fn take_str(buf: &[u8]) -> Result<(String, &[u8]), DecodeError> {
    let end = buf.iter().position(|&b| b == 0).ok_or(DecodeError::Unterminated)?;
    let s = std::str::from_utf8(&buf[..end]).map_err(|_| DecodeError::NotUtf8)?;
    Ok((s.to_string(), &buf[end + 1..]))
}

fn take_options(mut buf: &[u8]) -> Result<Vec<(String, String)>, DecodeError> {
    let mut opts = Vec::new();
    while !buf.is_empty() {
        let (name, rest) = take_str(buf)?;
        if rest.is_empty() {
            return Err(DecodeError::DanglingOption(name));
        }
        let (value, rest) = take_str(rest)?;
        opts.push((name, value));
        buf = rest;
    }
    Ok(opts)
}

fn decode_rq(buf: &[u8]) -> Result<Rq, DecodeError> {
    let (filename, rest) = take_str(buf)?;
    if filename.is_empty() {
        return Err(DecodeError::EmptyFilename);
    }
    let (mode, rest) = take_str(rest)?;
    Ok(Rq { filename, mode, options: take_options(rest)? })
}

pub fn decode(buf: &[u8]) -> Result<Packet, DecodeError> {
    if buf.len() < 2 {
        return Err(DecodeError::Short);
    }
    let op = u16::from_be_bytes([buf[0], buf[1]]);
    let body = &buf[2..];
    let u16_at = |b: &[u8]| -> Result<u16, DecodeError> {
        if b.len() < 2 {
            return Err(DecodeError::Short);
        }
        Ok(u16::from_be_bytes([b[0], b[1]]))
    };
    match op {
        OP_RRQ => Ok(Packet::Rrq(decode_rq(body)?)),
        OP_WRQ => Ok(Packet::Wrq(decode_rq(body)?)),
        OP_DATA => Ok(Packet::Data { block: u16_at(body)?, data: body[2..].to_vec() }),
        OP_ACK => Ok(Packet::Ack { block: u16_at(body)? }),
        OP_ERROR => {
            let code = u16_at(body)?;
            // Some clients omit the NUL after the message; accept that.
            let msg = &body[2..];
            let end = msg.iter().position(|&b| b == 0).unwrap_or(msg.len());
            let message = String::from_utf8_lossy(&msg[..end]).into_owned();
            Ok(Packet::Error { code, message })
        }
        OP_OACK => Ok(Packet::Oack { options: take_options(body)? }),
        other => Err(DecodeError::Opcode(other)),
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // A NUL inside would change the packet's structure; such strings are cut there.
    out.extend(s.bytes().take_while(|&b| b != 0));
    out.push(0);
}

pub fn encode(p: &Packet) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    match p {
        Packet::Rrq(rq) | Packet::Wrq(rq) => {
            out.extend_from_slice(&(if matches!(p, Packet::Rrq(_)) { OP_RRQ } else { OP_WRQ }).to_be_bytes());
            put_str(&mut out, &rq.filename);
            put_str(&mut out, &rq.mode);
            for (k, v) in &rq.options {
                put_str(&mut out, k);
                put_str(&mut out, v);
            }
        }
        Packet::Data { block, data } => {
            out.reserve(data.len() + 4);
            encode_data_header(&mut out, *block);
            out.extend_from_slice(data);
        }
        Packet::Ack { block } => {
            out.extend_from_slice(&OP_ACK.to_be_bytes());
            out.extend_from_slice(&block.to_be_bytes());
        }
        Packet::Error { code, message } => {
            out.extend_from_slice(&OP_ERROR.to_be_bytes());
            out.extend_from_slice(&code.to_be_bytes());
            put_str(&mut out, message);
        }
        Packet::Oack { options } => {
            out.extend_from_slice(&OP_OACK.to_be_bytes());
            for (k, v) in options {
                put_str(&mut out, k);
                put_str(&mut out, v);
            }
        }
    }
    out
}

/// The 4-byte DATA header, for building DATA packets in place.
pub fn encode_data_header(out: &mut Vec<u8>, block: u16) {
    out.extend_from_slice(&OP_DATA.to_be_bytes());
    out.extend_from_slice(&block.to_be_bytes());
}

pub fn error(code: u16, message: &str) -> Vec<u8> {
    encode(&Packet::Error { code, message: message.to_string() })
}

/// What the server grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_blksize: u16,
    pub max_windowsize: u16,
    /// The longest retransmission timeout granted. RFC 2349 lets a server only accept the
    /// client's `timeout` as it is or leave it out of the OACK, so a longer one is left out and
    /// [`DEFAULT_TIMEOUT`] applies.
    pub max_timeout: Duration,
}

/// The transfer parameters after option negotiation, and the OACK (empty: no options granted,
/// the transfer starts with DATA 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout: Duration,
    pub oack: Vec<(String, String)>,
}

pub const DEFAULT_BLKSIZE: u16 = 512;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

/// Grants what the client asked for within `limits`. Out-of-range values are clamped
/// (blksize, windowsize) or the option is left out of the OACK (a timeout outside
/// 1..=`max_timeout` s, unparsable values, unknown options), as RFC 2347 and 2349 allow.
pub fn negotiate(options: &[(String, String)], file_size: u64, limits: &Limits) -> Negotiated {
    let mut n = Negotiated { blksize: DEFAULT_BLKSIZE, windowsize: 1, timeout: DEFAULT_TIMEOUT, oack: Vec::new() };
    for (name, value) in options {
        let key = name.to_ascii_lowercase();
        let num = value.trim().parse::<u64>().ok();
        match (key.as_str(), num) {
            ("blksize", Some(v)) if v >= 8 => {
                let b = v.min(65464).min(u64::from(limits.max_blksize)) as u16;
                n.blksize = b;
                n.oack.push((name.clone(), b.to_string()));
            }
            ("windowsize", Some(v)) if v >= 1 => {
                let w = v.min(65535).min(u64::from(limits.max_windowsize)) as u16;
                n.windowsize = w;
                n.oack.push((name.clone(), w.to_string()));
            }
            ("timeout", Some(v)) if (1..=255).contains(&v) && Duration::from_secs(v) <= limits.max_timeout => {
                n.timeout = Duration::from_secs(v);
                n.oack.push((name.clone(), v.to_string()));
            }
            ("tsize", Some(_)) => n.oack.push((name.clone(), file_size.to_string())),
            _ => {}
        }
    }
    n
}

/// The fuzz and property-test oracle: decoding never panics, and decode → encode → decode gives
/// the same packet; option negotiation on any request stays within the RFC limits.
pub fn check_roundtrip(buf: &[u8]) {
    let Ok(first) = decode(buf) else { return };
    let again = encode(&first);
    assert_eq!(decode(&again).as_ref(), Ok(&first), "TFTP packet changed in the round trip");
    if let Packet::Rrq(rq) = &first {
        let n = negotiate(
            &rq.options,
            12345,
            &Limits { max_blksize: 65464, max_windowsize: 64, max_timeout: Duration::from_secs(5) },
        );
        assert!((8..=65464).contains(&n.blksize) && (1..=64).contains(&n.windowsize));
        assert!(n.timeout <= Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn round_trips() {
        let packets = [
            Packet::Rrq(Rq {
                filename: "undionly.kpxe".into(),
                mode: "octet".into(),
                options: opts(&[("tsize", "0"), ("blksize", "1468")]),
            }),
            Packet::Wrq(Rq { filename: "x".into(), mode: "netascii".into(), options: vec![] }),
            Packet::Data { block: 7, data: vec![1, 2, 3] },
            Packet::Data { block: 65535, data: vec![] },
            Packet::Ack { block: 0 },
            Packet::Error { code: 8, message: "User aborted the transfer".into() },
            Packet::Oack { options: opts(&[("blksize", "1468")]) },
        ];
        for p in packets {
            assert_eq!(decode(&encode(&p)).unwrap(), p);
        }
    }

    #[test]
    fn rrq_wire_format() {
        let bytes = b"\x00\x01ipxe.efi\x00octet\x00tsize\x000\x00";
        let p = decode(bytes).unwrap();
        assert_eq!(p, Packet::Rrq(Rq { filename: "ipxe.efi".into(), mode: "octet".into(), options: opts(&[("tsize", "0")]) }));
        assert_eq!(encode(&p), bytes);
    }

    #[test]
    fn bad_packets_are_errors() {
        assert_eq!(decode(b""), Err(DecodeError::Short));
        assert_eq!(decode(b"\x00\x09abc"), Err(DecodeError::Opcode(9)));
        assert_eq!(decode(b"\x00\x01file"), Err(DecodeError::Unterminated));
        assert_eq!(decode(b"\x00\x01file\x00octet"), Err(DecodeError::Unterminated));
        assert_eq!(decode(b"\x00\x01\x00octet\x00"), Err(DecodeError::EmptyFilename));
        assert_eq!(decode(b"\x00\x01f\x00octet\x00blksize\x00"), Err(DecodeError::DanglingOption("blksize".into())));
        assert_eq!(decode(b"\x00\x04\x00"), Err(DecodeError::Short));
        assert_eq!(decode(b"\x00\x01\xff\xfe\x00octet\x00"), Err(DecodeError::NotUtf8));
        // An ERROR without its trailing NUL is still understood.
        assert_eq!(decode(b"\x00\x05\x00\x08abort"), Ok(Packet::Error { code: 8, message: "abort".into() }));
    }

    #[test]
    fn negotiation_clamps_and_ignores() {
        let l = Limits { max_blksize: 65464, max_windowsize: 64, max_timeout: Duration::from_secs(5) };
        let n = negotiate(&opts(&[("BLKSIZE", "1468"), ("tsize", "0"), ("windowsize", "8"), ("timeout", "3")]), 4242, &l);
        assert_eq!((n.blksize, n.windowsize, n.timeout), (1468, 8, Duration::from_secs(3)));
        assert_eq!(n.oack, opts(&[("BLKSIZE", "1468"), ("tsize", "4242"), ("windowsize", "8"), ("timeout", "3")]));

        let n = negotiate(&opts(&[("blksize", "99999999999999999999"), ("windowsize", "100000"), ("timeout", "0")]), 1, &l);
        // The unparsable huge blksize is ignored, windowsize clamped, timeout 0 ignored.
        assert_eq!((n.blksize, n.windowsize, n.timeout), (512, 64, DEFAULT_TIMEOUT));
        assert_eq!(n.oack, opts(&[("windowsize", "64")]));

        // A timeout above the limit is left out (a server may not lower it): the default applies.
        let n = negotiate(&opts(&[("timeout", "255"), ("blksize", "1468")]), 1, &l);
        assert_eq!((n.timeout, n.oack.clone()), (DEFAULT_TIMEOUT, opts(&[("blksize", "1468")])));
        let n = negotiate(&opts(&[("timeout", "5")]), 1, &l);
        assert_eq!((n.timeout, n.oack.clone()), (Duration::from_secs(5), opts(&[("timeout", "5")])));

        let n = negotiate(&opts(&[("blksize", "70000"), ("blksize2", "1"), ("multicast", "")]), 1, &l);
        assert_eq!(n.blksize, 65464);
        let n = negotiate(&opts(&[("blksize", "4")]), 1, &l);
        assert_eq!((n.blksize, n.oack.len()), (512, 0));
        let small = Limits { max_blksize: 1468, max_windowsize: 1, max_timeout: Duration::from_secs(5) };
        let n = negotiate(&opts(&[("blksize", "9000"), ("windowsize", "16")]), 1, &small);
        assert_eq!((n.blksize, n.windowsize), (1468, 1));
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn field() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-zA-Z0-9./_-]{1,20}",
            Just("blksize".to_string()),
            Just("windowsize".to_string()),
            Just("tsize".to_string()),
            "[0-9]{1,25}"
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..200)) {
            check_roundtrip(&buf);
        }

        #[test]
        fn requests_round_trip(file in "[a-zA-Z0-9./_-]{1,40}", opts in proptest::collection::vec((field(), field()), 0..6)) {
            let p = Packet::Rrq(Rq { filename: file, mode: "octet".into(), options: opts });
            let bytes = encode(&p);
            prop_assert_eq!(decode(&bytes), Ok(p));
            check_roundtrip(&bytes);
        }
    }
}
