//! The image stream decoder (metal-hammer's `install::decode::Decoded`), both ways:
//! - any bytes as an image: no panic, and whatever it yields without an error is exactly what
//!   libzstd's streaming decoder yields for them (with or without a frame-parallel worker);
//! - the input as an image's content, written as image-builder writes images (sized frames with
//!   checksums, a skippable frame, an unsized frame): decodes to exactly the input.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use metal_hammer::install::decode::Decoded;

fn decode(bytes: &[u8], workers: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    Decoded::start_with(std::io::Cursor::new(bytes.to_vec()), 1, workers)?.read_to_end(&mut out)?;
    Ok(out)
}

fn sized_frame(data: &[u8]) -> Vec<u8> {
    let mut c = zstd::bulk::Compressor::new(1).unwrap();
    c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true)).unwrap();
    c.compress(data).unwrap()
}

fn unsized_frame(data: &[u8]) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
    e.include_contentsize(false).unwrap();
    std::io::Write::write_all(&mut e, data).unwrap();
    e.finish().unwrap()
}

fuzz_target!(|data: &[u8]| {
    // Any bytes as an image. libzstd caps its output here too, so a tiny input cannot make
    // either side write gigabytes.
    // (libzstd calls no input at all an incomplete frame; an empty image is empty.)
    let reference = if data.is_empty() { Ok(Vec::new()) } else { zstd::stream::decode_all(data) };
    // Every decoder start costs a few 1 MiB blocks; one per input, the path by the length.
    let workers = data.len() % 2;
    if let Ok(out) = decode(data, workers) {
        match &reference {
            Ok(r) => assert!(&out == r, "{workers} workers: {} bytes decoded, libzstd gives {}", out.len(), r.len()),
            Err(e) => panic!("{workers} workers: decoded {} bytes where libzstd fails ({e})", out.len()),
        }
    }

    // The input as content.
    let (a, b) = data.split_at(data.len() / 2);
    let mut image = sized_frame(a);
    image.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
    image.extend_from_slice(&3u32.to_le_bytes());
    image.extend_from_slice(b"pad");
    image.extend_from_slice(&sized_frame(b));
    image.extend_from_slice(&unsized_frame(a));
    let mut expected = data.to_vec();
    expected.extend_from_slice(a);
    // One worker: the sized frames are collected and handed over, the unsized one streamed.
    let out = decode(&image, 1).unwrap_or_else(|e| panic!("image of {} bytes does not decode: {e}", data.len()));
    assert!(out == expected, "content changed ({} bytes in, {} out)", expected.len(), out.len());
});
