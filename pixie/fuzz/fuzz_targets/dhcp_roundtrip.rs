//! DHCP request bytes: decode → encode → decode keeps the client facts, nothing panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    pixie::dhcp::wire::check_roundtrip(data);
});
