//! LLDP neighbours: a pure frame parser and a listener on `AF_PACKET` (ethertype 0x88cc).

use std::time::{Duration, Instant};

use metal_types::LldpNeighbor;

pub const ETHERTYPE_LLDP: u16 = 0x88cc;
/// The nearest-bridge multicast address switches send LLDP to.
pub const LLDP_MULTICAST: [u8; 6] = [0x01, 0x80, 0xc2, 0x00, 0x00, 0x0e];

fn mac_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":")
}

/// Chassis and port ids: MAC addresses (subtype 4 for chassis, 3 for port) as `aa:bb:…`,
/// network addresses (5) as dotted IPv4 when they are one, everything else as text.
fn id_string(tlv_type: u8, value: &[u8]) -> String {
    let Some((&subtype, rest)) = value.split_first() else { return String::new() };
    let is_mac = (tlv_type == 1 && subtype == 4) || (tlv_type == 2 && subtype == 3);
    if is_mac && rest.len() == 6 {
        return mac_string(rest);
    }
    if subtype == 5 && rest.len() == 5 && rest[0] == 1 {
        return format!("{}.{}.{}.{}", rest[1], rest[2], rest[3], rest[4]);
    }
    String::from_utf8_lossy(rest).trim_end_matches('\0').to_string()
}

/// Parses an LLDP Ethernet frame (with its 14-byte header). `None` when it is not LLDP or is
/// malformed (a TLV longer than the frame, missing chassis or port id).
pub fn parse_frame(interface: &str, frame: &[u8]) -> Option<LldpNeighbor> {
    if frame.len() < 14 || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_LLDP {
        return None;
    }
    let mut rest = &frame[14..];
    let mut n = LldpNeighbor { interface: interface.to_string(), ..Default::default() };
    while rest.len() >= 2 {
        let header = u16::from_be_bytes([rest[0], rest[1]]);
        let (tlv_type, len) = ((header >> 9) as u8, (header & 0x1ff) as usize);
        let value = rest.get(2..2 + len)?;
        match tlv_type {
            0 => break,
            1 => n.chassis_id = id_string(1, value),
            2 => n.port_id = id_string(2, value),
            5 => n.system_name = String::from_utf8_lossy(value).trim_end_matches('\0').to_string(),
            _ => {}
        }
        rest = &rest[2 + len..];
    }
    (!n.chassis_id.is_empty() && !n.port_id.is_empty()).then_some(n)
}

/// Listens on every interface in `interfaces` (name, ifindex) for `window` and returns the
/// distinct neighbours heard. Errors opening the socket are returned; a quiet network is an
/// empty list.
pub fn listen(interfaces: &[(String, i32)], window: Duration) -> std::io::Result<Vec<LldpNeighbor>> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut out: Vec<LldpNeighbor> = Vec::new();
    if window.is_zero() || interfaces.is_empty() {
        return Ok(out);
    }
    let proto = ETHERTYPE_LLDP.to_be() as libc::c_int;
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    for (_, ifindex) in interfaces {
        // SAFETY: packet_mreq is plain data; zeroed is a valid value.
        let mut mreq: libc::packet_mreq = unsafe { std::mem::zeroed() };
        mreq.mr_ifindex = *ifindex;
        mreq.mr_type = libc::PACKET_MR_MULTICAST as u16;
        mreq.mr_alen = 6;
        mreq.mr_address[..6].copy_from_slice(&LLDP_MULTICAST);
        // SAFETY: the option value points to a packet_mreq of the given size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_ADD_MEMBERSHIP,
                (&mreq as *const libc::packet_mreq).cast(),
                std::mem::size_of::<libc::packet_mreq>() as u32,
            );
        }
    }
    let deadline = Instant::now() + window;
    let mut buf = vec![0u8; 9216];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let tv = libc::timeval { tv_sec: left.as_secs() as _, tv_usec: left.subsec_micros().max(1) as _ };
        // SAFETY: the option value is a timeval of the given size.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        // SAFETY: sockaddr_ll is plain data.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        // SAFETY: buf and from are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                sock.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_ll).cast(),
                &mut from_len,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
        let Some((name, _)) = interfaces.iter().find(|(_, i)| *i == from.sll_ifindex) else { continue };
        if let Some(nb) = parse_frame(name, &buf[..n as usize]) {
            if !out.contains(&nb) {
                out.push(nb);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tlv(t: u8, value: &[u8]) -> Vec<u8> {
        let h = ((t as u16) << 9) | value.len() as u16;
        let mut v = h.to_be_bytes().to_vec();
        v.extend_from_slice(value);
        v
    }

    fn frame(tlvs: &[Vec<u8>]) -> Vec<u8> {
        let mut f = LLDP_MULTICAST.to_vec();
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
        f.extend_from_slice(&ETHERTYPE_LLDP.to_be_bytes());
        for t in tlvs {
            f.extend_from_slice(t);
        }
        f
    }

    #[test]
    fn parses_a_handcrafted_frame() {
        let f = frame(&[
            tlv(1, &[4, 0x00, 0x1b, 0x21, 0xaa, 0xbb, 0xcc]),
            tlv(2, &[5, b'E', b't', b'h', b'1', b'/', b'7']),
            tlv(3, &[0, 120]),
            tlv(5, b"leaf-01.fra"),
            tlv(0, &[]),
        ]);
        let n = parse_frame("eth0", &f).unwrap();
        assert_eq!(
            n,
            LldpNeighbor {
                interface: "eth0".into(),
                chassis_id: "00:1b:21:aa:bb:cc".into(),
                port_id: "Eth1/7".into(),
                system_name: "leaf-01.fra".into()
            }
        );
    }

    #[test]
    fn rejects_truncated_and_foreign_frames() {
        let mut f = frame(&[tlv(1, &[4, 1, 2, 3, 4, 5, 6]), tlv(2, &[3, 1, 2, 3, 4, 5, 6])]);
        assert_eq!(parse_frame("eth0", &f).unwrap().port_id, "01:02:03:04:05:06");
        f.truncate(f.len() - 3);
        assert!(parse_frame("eth0", &f).is_none());
        let mut ip = frame(&[tlv(1, &[4, 1, 2, 3, 4, 5, 6])]);
        ip[12] = 0x08;
        ip[13] = 0x00;
        assert!(parse_frame("eth0", &ip).is_none());
        assert!(parse_frame("eth0", &frame(&[tlv(1, &[4, 1, 2, 3, 4, 5, 6])])).is_none(), "no port id");
    }
}
