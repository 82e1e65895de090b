//! DHCPv4 bytes ⇄ [`Request`]: a structural check in front of `dhcproto`'s decoder, and the
//! client facts pixie decides on, pulled out of the decoded message. No I/O.
//!
//! `dhcproto` trusts some option lengths (`debug_assert`s and `len - n` on fixed-size options, and
//! `chaddr()` slices by `hlen`), so [`decode`] walks the option area itself first and refuses a
//! packet whose structure lies, before `dhcproto` ever sees it.
//!
//! `dhcproto` also stops reading options at the first one it cannot decode, silently dropping the
//! rest, and cannot write every option it reads back in a form it reads again (option 81 with the
//! E flag clear: read as DNS wire form, written as text). So only the options pixie reads
//! ([`READ_OPTIONS`]) reach it; the others are handed over as PAD, and a packet in which one of
//! the read options does not decode is refused rather than decided on with facts missing.

use std::net::Ipv4Addr;

use dhcproto::v4::{self, DhcpOption, Message, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use metal_types::{Arch, MachineId};

use metal_types::Mac;

/// Smallest BOOTP message: 236 fixed bytes + the 4-byte magic cookie.
pub const MIN_LEN: usize = 240;
const MAGIC: [u8; 4] = [99, 130, 83, 99];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("packet of {0} bytes is shorter than a DHCP header")]
    Short(usize),
    #[error("not a BOOTREQUEST (op {0})")]
    NotRequest(u8),
    #[error("magic cookie missing")]
    NoMagic,
    #[error("hardware address length {0} is larger than 16")]
    BadHlen(u8),
    #[error("option {code} runs past the end of the packet")]
    Truncated { code: u8 },
    #[error("option {code} has length {len}, which is invalid for it")]
    BadLength { code: u8, len: u8 },
    #[error("dhcproto: {0}")]
    Decode(String),
    #[error("no message type (option 53)")]
    NoMessageType,
    #[error("not an Ethernet client (htype {htype}, hlen {hlen})")]
    NotEthernet { htype: u8, hlen: u8 },
}

/// The options [`Request::from_message`] reads: message type, requested address, server id,
/// vendor class, architecture, user class, machine id, relay agent information, host name.
pub const READ_OPTIONS: [u8; 9] = [53, 50, 54, 60, 93, 77, 97, 82, 12];

/// Walks the TLV option area: every option fits in the packet and the options `dhcproto` decodes
/// with a fixed size have that size. Stops at END; PAD is skipped. Returns the [`READ_OPTIONS`]
/// codes present, and turns every other option into PAD.
fn check_options(mut opts: &mut [u8]) -> Result<Vec<u8>, WireError> {
    let mut prev = 0u8;
    let mut read = Vec::new();
    while let Some((&code, _)) = opts.split_first() {
        match code {
            0 => {
                prev = 0;
                opts = &mut opts[1..];
                continue;
            }
            255 => return Ok(read),
            _ => {}
        }
        let len = *opts.get(1).ok_or(WireError::Truncated { code })?;
        if opts.len() - 2 < usize::from(len) {
            return Err(WireError::Truncated { code });
        }
        let ok = match code {
            80 => len == 0,
            94 => len == 3,
            81 => len >= 3,
            151 => len >= 1,
            152..=155 => len == 4,
            53 | 46 | 116 | 52 | 156 | 157 => len == 1,
            93 => len >= 2 && len % 2 == 0,
            1 | 16 | 28 | 32 | 50 | 54 | 118 | 150 => len == 4,
            _ => true,
        };
        // dhcproto joins consecutive instances of one code (RFC 3396); for the fixed-size codes
        // that would make a length it does not expect.
        let fixed_size =
            matches!(code, 80 | 94 | 81 | 151..=157 | 53 | 46 | 116 | 52 | 93 | 1 | 16 | 28 | 32 | 50 | 54 | 118 | 150);
        if !ok || (code == prev && fixed_size) {
            return Err(WireError::BadLength { code, len });
        }
        prev = code;
        let (this, rest) = std::mem::take(&mut opts).split_at_mut(2 + usize::from(len));
        if READ_OPTIONS.contains(&code) {
            if !read.contains(&code) {
                read.push(code);
            }
        } else {
            this.fill(0);
        }
        opts = rest;
    }
    Ok(read)
}

/// Checks the structure, then decodes with `dhcproto`.
pub fn decode(buf: &[u8]) -> Result<Message, WireError> {
    if buf.len() < MIN_LEN {
        return Err(WireError::Short(buf.len()));
    }
    if buf[0] != 1 {
        return Err(WireError::NotRequest(buf[0]));
    }
    if buf[2] > 16 {
        return Err(WireError::BadHlen(buf[2]));
    }
    if buf[236..240] != MAGIC {
        return Err(WireError::NoMagic);
    }
    let mut pkt = buf.to_vec();
    let read = check_options(&mut pkt[240..])?;
    let msg = Message::decode(&mut Decoder::new(&pkt)).map_err(|e| WireError::Decode(e.to_string()))?;
    if let Some(code) = read.into_iter().find(|&c| msg.opts().get(OptionCode::from(c)).is_none()) {
        return Err(WireError::Decode(format!("option {code} does not decode")));
    }
    Ok(msg)
}

/// Encodes a reply, padded to the 300-byte BOOTP minimum some old clients insist on.
pub fn encode(msg: &Message) -> Vec<u8> {
    let mut buf = Vec::with_capacity(576);
    let mut e = Encoder::new(&mut buf);
    // Encoding into a Vec cannot run out of room; an error here is a bug in what we built.
    if let Err(err) = msg.encode(&mut e) {
        tracing::error!(error = %err, "encoding a DHCP reply failed");
        return Vec::new();
    }
    if buf.len() < 300 {
        buf.resize(300, 0);
    }
    buf
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsgType {
    Discover,
    Request,
    Decline,
    Release,
    Inform,
    Other(u8),
}

impl MsgType {
    pub fn as_str(&self) -> &'static str {
        match self {
            MsgType::Discover => "discover",
            MsgType::Request => "request",
            MsgType::Decline => "decline",
            MsgType::Release => "release",
            MsgType::Inform => "inform",
            MsgType::Other(_) => "other",
        }
    }
}

/// Option 60 as far as booting is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VendorClass {
    None,
    /// `PXEClient…`: firmware PXE (or iPXE, which also says PXEClient).
    PxeClient,
    /// `HTTPClient…`: UEFI HTTP boot.
    HttpClient,
}

/// What pixie needs from a client's DHCP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub msg_type: MsgType,
    pub xid: u32,
    pub broadcast: bool,
    pub ciaddr: Ipv4Addr,
    pub giaddr: Ipv4Addr,
    pub mac: Mac,
    pub requested_ip: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
    pub vendor_class: VendorClass,
    /// Option 93, first entry (dhcproto keeps only the first).
    pub arch_code: Option<u16>,
    pub arch: Arch,
    /// Option 77 says `iPXE`.
    pub is_ipxe: bool,
    /// Option 97 (type 0 + 16 bytes, first three fields little-endian as in EFI and iPXE).
    pub uuid: Option<MachineId>,
    /// Option 97 as sent, echoed to PXE clients in proxy mode.
    pub client_machine_id: Option<Vec<u8>>,
    pub relay_info: Option<v4::relay::RelayAgentInformation>,
    pub hostname: Option<String>,
}

/// Reads option 77: iPXE sends the bare string `iPXE`; RFC 3004 clients send length-prefixed
/// class names. Both forms are recognised.
fn user_class_has_ipxe(data: &[u8]) -> bool {
    if data == b"iPXE" {
        return true;
    }
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        if len == 0 || tail.len() < len {
            return false;
        }
        if &tail[..len] == b"iPXE" {
            return true;
        }
        rest = &tail[len..];
    }
    false
}

fn parse_uuid(data: &[u8]) -> Option<MachineId> {
    if data.len() != 17 || data[0] != 0 {
        return None;
    }
    let bytes: [u8; 16] = data[1..].try_into().ok()?;
    if bytes == [0; 16] || bytes == [0xff; 16] {
        return None;
    }
    Some(MachineId(uuid::Uuid::from_bytes_le(bytes)))
}

impl Request {
    /// The facts of a decoded message; `Err` for messages pixie never answers.
    pub fn from_message(msg: &Message) -> Result<Request, WireError> {
        let htype: u8 = msg.htype().into();
        if htype != 1 || msg.hlen() != 6 {
            return Err(WireError::NotEthernet { htype, hlen: msg.hlen() });
        }
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&msg.chaddr()[..6]);
        let opts = msg.opts();
        let msg_type = match opts.msg_type().ok_or(WireError::NoMessageType)? {
            v4::MessageType::Discover => MsgType::Discover,
            v4::MessageType::Request => MsgType::Request,
            v4::MessageType::Decline => MsgType::Decline,
            v4::MessageType::Release => MsgType::Release,
            v4::MessageType::Inform => MsgType::Inform,
            other => MsgType::Other(u8::from(other)),
        };
        let vendor_class = match opts.get(OptionCode::ClassIdentifier) {
            Some(DhcpOption::ClassIdentifier(v)) if v.starts_with(b"PXEClient") => VendorClass::PxeClient,
            Some(DhcpOption::ClassIdentifier(v)) if v.starts_with(b"HTTPClient") => VendorClass::HttpClient,
            _ => VendorClass::None,
        };
        let arch_code = match opts.get(OptionCode::ClientSystemArchitecture) {
            Some(DhcpOption::ClientSystemArchitecture(a)) => Some(u16::from(*a)),
            _ => None,
        };
        // Empty options carry nothing (and dhcproto drops them when encoding).
        let client_machine_id = match opts.get(OptionCode::ClientMachineIdentifier) {
            Some(DhcpOption::ClientMachineIdentifier(v)) if !v.is_empty() => Some(v.clone()),
            _ => None,
        };
        Ok(Request {
            msg_type,
            xid: msg.xid(),
            broadcast: msg.flags().broadcast(),
            ciaddr: msg.ciaddr(),
            giaddr: msg.giaddr(),
            mac: Mac(mac),
            requested_ip: match opts.get(OptionCode::RequestedIpAddress) {
                Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
                _ => None,
            },
            server_id: match opts.get(OptionCode::ServerIdentifier) {
                Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
                _ => None,
            },
            vendor_class,
            arch_code,
            arch: arch_code.map(Arch::from_option93).unwrap_or(Arch::Unknown),
            is_ipxe: matches!(opts.get(OptionCode::UserClass), Some(DhcpOption::UserClass(v)) if user_class_has_ipxe(v)),
            uuid: client_machine_id.as_deref().and_then(parse_uuid),
            client_machine_id,
            // An empty option 82 carries nothing to echo (and dhcproto cannot re-decode it).
            relay_info: match opts.get(OptionCode::RelayAgentInformation) {
                Some(DhcpOption::RelayAgentInformation(r)) if !r.is_empty() => Some(r.clone()),
                _ => None,
            },
            hostname: match opts.get(OptionCode::Hostname) {
                Some(DhcpOption::Hostname(h)) if !h.is_empty() => Some(h.clone()),
                _ => None,
            },
        })
    }

    /// A client that wants to network boot (firmware PXE, UEFI HTTP boot or iPXE).
    pub fn is_pxe(&self) -> bool {
        self.vendor_class != VendorClass::None || self.is_ipxe
    }
}

/// The fuzz and property-test oracle: whatever `buf` is, decoding never panics, and a message
/// that decodes re-encodes into one that decodes to the same client facts.
pub fn check_roundtrip(buf: &[u8]) {
    let Ok(first) = decode(buf) else { return };
    let facts = Request::from_message(&first);
    let mut again = Vec::new();
    first.encode(&mut Encoder::new(&mut again)).expect("a decoded message re-encodes");
    let second = decode(&again).unwrap_or_else(|e| panic!("re-encoded message does not decode: {e}"));
    assert_eq!(facts, Request::from_message(&second), "client facts changed in the round trip");
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use dhcproto::v4::{Flags, Opcode};

    /// A client message as QEMU's iPXE or a PXE ROM would send it.
    pub fn client_msg(ty: v4::MessageType, mac: [u8; 6]) -> Message {
        let mut m = Message::new_with_id(
            0x1234_5678,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.set_opcode(Opcode::BootRequest);
        m.set_flags(Flags::default().set_broadcast());
        m.opts_mut().insert(DhcpOption::MessageType(ty));
        m
    }

    pub fn bytes(m: &Message) -> Vec<u8> {
        let mut buf = Vec::new();
        m.encode(&mut Encoder::new(&mut buf)).unwrap();
        buf
    }

    #[test]
    fn decodes_an_ipxe_discover() {
        let mut m = client_msg(v4::MessageType::Discover, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        m.opts_mut().insert(DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()));
        m.opts_mut().insert(DhcpOption::ClientSystemArchitecture(0u16.into()));
        m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        let mut guid = vec![0u8];
        guid.extend_from_slice(&uuid::Uuid::parse_str("6b1f2c3d-0102-4304-8506-0708090a0b0c").unwrap().to_bytes_le());
        m.opts_mut().insert(DhcpOption::ClientMachineIdentifier(guid));
        let r = Request::from_message(&decode(&bytes(&m)).unwrap()).unwrap();
        assert_eq!(r.msg_type, MsgType::Discover);
        assert_eq!(r.mac.to_string(), "52:54:00:12:34:56");
        assert_eq!(r.vendor_class, VendorClass::PxeClient);
        assert_eq!(r.arch, Arch::BiosX86);
        assert!(r.is_ipxe && r.broadcast && r.is_pxe());
        assert_eq!(r.uuid.unwrap().to_string(), "6b1f2c3d-0102-4304-8506-0708090a0b0c");
    }

    #[test]
    fn user_class_forms() {
        assert!(user_class_has_ipxe(b"iPXE"));
        assert!(user_class_has_ipxe(b"\x03foo\x04iPXE"));
        assert!(!user_class_has_ipxe(b"\x09iPXE"));
        assert!(!user_class_has_ipxe(b"gPXE"));
    }

    #[test]
    fn lying_packets_are_refused() {
        let good = bytes(&client_msg(v4::MessageType::Discover, [2, 0, 0, 0, 0, 1]));
        assert!(decode(&good).is_ok());
        assert_eq!(decode(&good[..100]), Err(WireError::Short(100)));
        let mut bad = good.clone();
        bad[2] = 200; // hlen
        assert_eq!(decode(&bad), Err(WireError::BadHlen(200)));
        let mut bad = good.clone();
        bad[0] = 2;
        assert_eq!(decode(&bad), Err(WireError::NotRequest(2)));
        let mut bad = good[..240].to_vec();
        bad.extend_from_slice(&[53, 1, 1, 12, 40, b'x']); // hostname says 40 bytes, has 1
        assert_eq!(decode(&bad), Err(WireError::Truncated { code: 12 }));
        let mut bad = good[..240].to_vec();
        bad.extend_from_slice(&[53, 1, 1, 80, 1, 0, 255]); // rapid commit with a length
        assert_eq!(decode(&bad), Err(WireError::BadLength { code: 80, len: 1 }));
        let mut bad = good[..240].to_vec();
        bad.extend_from_slice(&[53, 1, 1, 81, 0, 255]); // FQDN without flags
        assert_eq!(decode(&bad), Err(WireError::BadLength { code: 81, len: 0 }));
        let mut bad = good[..240].to_vec();
        bad.extend_from_slice(&[53, 1, 1, 93, 1, 0, 255]);
        assert!(decode(&bad).is_err());
        let mut bad = good[..240].to_vec();
        bad.extend_from_slice(&[12, 2, 0xc3, 0x28, 53, 1, 1, 255]); // host name not UTF-8: dhcproto stops there
        assert_eq!(decode(&bad), Err(WireError::Decode("option 12 does not decode".into())));
        let mut bad = good.clone();
        bad[236] = 0;
        assert_eq!(decode(&bad), Err(WireError::NoMagic));
    }

    /// Found by the `dhcp_roundtrip` fuzz target: option 81 with the E flag clear and a name in
    /// DNS wire form, followed by bytes after its root label. dhcproto read the name as wire
    /// form, wrote it back as text, and the re-encoded packet lost its message type.
    #[test]
    fn fqdn_without_e_flag_round_trips() {
        let mut pkt = bytes(&client_msg(v4::MessageType::Request, [2, 0, 0, 0, 0, 2]))[..240].to_vec();
        pkt.extend_from_slice(b"\x51\x1a\x99\xff\xff\x09machine-1\x03la\x00\x00\x00\x027\x03\x01\x03le");
        pkt.extend_from_slice(
            b"\x00\x0c\x09machine-1\x35\x01\x03\x3d\x07\x01\x02\x00\x00\x00\x00\x02\x37\x03\x01\x03\x06\x50\x00\xff",
        );
        let r = Request::from_message(&decode(&pkt).unwrap()).unwrap();
        assert_eq!((r.msg_type, r.hostname.as_deref()), (MsgType::Request, Some("machine-1")));
        check_roundtrip(&pkt);
    }

    /// RFC 4702 allows the name in option 81 as plain text (E flag clear). dhcproto failed on it
    /// and dropped every option after it, so this client lost its message type and vendor class.
    #[test]
    fn ascii_fqdn_does_not_refuse_the_packet() {
        let mut pkt = bytes(&client_msg(v4::MessageType::Discover, [2, 0, 0, 0, 0, 3]))[..240].to_vec();
        pkt.extend_from_slice(&[81, 11, 0, 0, 0]);
        pkt.extend_from_slice(b"host.lab");
        pkt.extend_from_slice(&[53, 1, 1, 60, 9]);
        pkt.extend_from_slice(b"PXEClient");
        pkt.push(255);
        let r = Request::from_message(&decode(&pkt).unwrap()).unwrap();
        assert_eq!((r.msg_type, r.vendor_class), (MsgType::Discover, VendorClass::PxeClient));
        check_roundtrip(&pkt);
    }

    #[test]
    fn unknown_message_type_is_other() {
        let m = client_msg(v4::MessageType::Unknown(42), [2, 0, 0, 0, 0, 1]);
        let r = Request::from_message(&decode(&bytes(&m)).unwrap()).unwrap();
        assert_eq!(r.msg_type, MsgType::Other(42));
    }
}

#[cfg(test)]
pub(crate) mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// A BOOTREQUEST header with a valid magic cookie, then arbitrary option TLVs.
    pub(crate) fn packet() -> impl Strategy<Value = Vec<u8>> {
        let opt = (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40), any::<bool>());
        (any::<[u8; 236]>(), proptest::collection::vec(opt, 0..20), any::<bool>()).prop_map(|(hdr, opts, lie)| {
            let mut b = hdr.to_vec();
            b[0] = 1;
            b[1] = 1;
            b[2] = 6;
            b.extend_from_slice(&MAGIC);
            b.extend_from_slice(&[53, 1, 1]);
            for (code, data, lying) in opts {
                b.push(code);
                let len = if lie && lying { data.len() as u8 + 7 } else { data.len() as u8 };
                b.push(len);
                b.extend_from_slice(&data);
            }
            b.push(255);
            b
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            check_roundtrip(&buf);
        }

        #[test]
        fn structured_packets_round_trip(buf in packet()) {
            check_roundtrip(&buf);
        }
    }
}
