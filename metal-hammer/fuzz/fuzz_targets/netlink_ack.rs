//! rtnetlink replies as metal-hammer reads them: nothing panics on any bytes; the requests it
//! builds are well formed (lengths add up) and never read as an acknowledgement; and an
//! acknowledgement behind them is found, with its errno, 0 exactly when the kernel said 0.
#![no_main]

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use metal_hammer::netlink::{add_addr_msg, default_route_msg, link_up_msg, parse_ack};

fn u32_at(data: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = data.get(at + i).copied().unwrap_or(0);
    }
    u32::from_ne_bytes(b)
}

/// One `nlmsghdr` after another, each as long as it says.
fn assert_well_formed(msg: &[u8]) {
    let len = u32::from_ne_bytes(msg[0..4].try_into().unwrap()) as usize;
    assert_eq!(len, msg.len(), "nlmsg_len says {len}, message has {}", msg.len());
    assert_eq!(len % 4, 0, "message not padded to 4 bytes");
}

fuzz_target!(|data: &[u8]| {
    // Any bytes, for any sequence number: no panic.
    let seq = u32_at(data, 0);
    let _ = parse_ack(data.get(4..).unwrap_or(&[]), seq);
    let _ = parse_ack(data, seq);

    // The requests built from values taken from the input.
    let ifindex = u32_at(data, 4) as i32;
    let address = Ipv4Addr::from(u32_at(data, 8));
    let gateway = Ipv4Addr::from(u32_at(data, 12));
    let prefix_len = (u32_at(data, 16) % 33) as u8;
    let errno_field = u32_at(data, 20) as i32;
    let requests = [link_up_msg(ifindex, seq), add_addr_msg(ifindex, address, prefix_len, seq), default_route_msg(ifindex, gateway, seq)];
    let mut stream = Vec::new();
    for r in &requests {
        assert_well_formed(r);
        assert_eq!(parse_ack(r, seq), None, "a request read as an acknowledgement");
        stream.extend_from_slice(r);
    }
    // NLMSG_ERROR: header, error field, then the request it answers (here its header).
    let mut ack = Vec::new();
    ack.extend_from_slice(&36u32.to_ne_bytes());
    ack.extend_from_slice(&2u16.to_ne_bytes());
    ack.extend_from_slice(&0u16.to_ne_bytes());
    ack.extend_from_slice(&seq.to_ne_bytes());
    ack.extend_from_slice(&0u32.to_ne_bytes());
    ack.extend_from_slice(&errno_field.to_ne_bytes());
    ack.extend_from_slice(&requests[0][..16]);
    assert_eq!(parse_ack(&ack, seq.wrapping_add(1)), None, "an acknowledgement for another request was taken");
    stream.extend_from_slice(&ack);
    let got = parse_ack(&stream, seq).expect("the acknowledgement behind the requests is found");
    assert_eq!(got == 0, errno_field == 0, "errno field {errno_field} read as {got}");
    if errno_field < 0 {
        // i32::MIN has no negation; it reads as the largest errno.
        assert_eq!(got, errno_field.checked_neg().unwrap_or(i32::MAX), "errno field {errno_field}");
    }
});
