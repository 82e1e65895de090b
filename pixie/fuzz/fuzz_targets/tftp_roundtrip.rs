//! TFTP packet bytes: decode → encode → decode is the identity, nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pixie::tftp::codec::check_roundtrip(data);
});
