//! LLDP frames as metal-hammer's listener reads them: nothing panics, a neighbour always has a
//! chassis and a port id, and a neighbour sent again (ids as locally assigned text) reads back
//! the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metal_hammer::lldp::{parse_frame, ETHERTYPE_LLDP, LLDP_MULTICAST};

fn tlv(out: &mut Vec<u8>, t: u8, value: &[u8]) {
    out.extend_from_slice(&((u16::from(t) << 9) | value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
}

/// TLV values are at most 511 bytes; ids carry a subtype byte in front.
fn fits(s: &str, subtype: bool) -> bool {
    s.len() + usize::from(subtype) <= 511
}

fuzz_target!(|data: &[u8]| {
    let Some(n) = parse_frame("eth0", data) else { return };
    assert_eq!(n.interface, "eth0");
    assert!(!n.chassis_id.is_empty() && !n.port_id.is_empty(), "neighbour without ids: {n:?}");
    for s in [&n.chassis_id, &n.port_id, &n.system_name] {
        assert!(!s.ends_with('\0'), "trailing NUL kept: {s:?}");
    }
    if !(fits(&n.chassis_id, true) && fits(&n.port_id, true) && fits(&n.system_name, false)) {
        return; // lossy UTF-8 made a text longer than one TLV can carry
    }
    let mut f = LLDP_MULTICAST.to_vec();
    f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1]);
    f.extend_from_slice(&ETHERTYPE_LLDP.to_be_bytes());
    // Subtype 7: locally assigned, read as text.
    tlv(&mut f, 1, &[&[7u8][..], n.chassis_id.as_bytes()].concat());
    tlv(&mut f, 2, &[&[7u8][..], n.port_id.as_bytes()].concat());
    tlv(&mut f, 3, &[0, 120]);
    if !n.system_name.is_empty() {
        tlv(&mut f, 5, n.system_name.as_bytes());
    }
    tlv(&mut f, 0, &[]);
    assert_eq!(parse_frame("eth0", &f).as_ref(), Some(&n), "neighbour changed when sent again");
});
