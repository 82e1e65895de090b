//! Kernel command lines as metal-hammer reads them (`metal_types::cmdline`, `flow::Tunables`):
//! nothing panics; without quotes the split is the plain whitespace split; values never keep a
//! quote; parameters that parse encode into a line that parses to the same parameters; tunables
//! stay in their ranges.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metal_hammer::flow::Tunables;
use metal_types::cmdline::{split, HammerParams};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    let words = split(line);
    for (_, v) in &words {
        assert!(!v.contains('"'), "value kept a quote: {v:?}");
    }
    if !line.contains('"') {
        let plain: Vec<(String, String)> = line
            .split_whitespace()
            .map(|w| match w.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (w.to_string(), String::new()),
            })
            .collect();
        assert_eq!(words, plain, "split differs from the whitespace split on a line without quotes");
    }

    if let Ok(p) = HammerParams::parse(line) {
        assert!(p.api_url.starts_with("http://") || p.api_url.starts_with("https://"), "api url {:?}", p.api_url);
        assert!(!p.enrolment_token.is_empty() && !p.partition.is_empty());
        if let Ok(encoded) = p.encode() {
            assert_eq!(HammerParams::parse(&encoded).as_ref(), Ok(&p), "parameters changed through {encoded:?}");
        }
    }

    let t = Tunables::parse(line);
    assert!(t.dhcp_timeout.as_secs() >= 1, "dhcp timeout {:?}", t.dhcp_timeout);
    assert!((1..=300).contains(&t.wait_timeout_s), "wait timeout {}", t.wait_timeout_s);
});
