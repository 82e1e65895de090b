//! zstd frame headers as metal-hammer's image decoder reads them: nothing panics; the answer
//! depends only on the header's own bytes (a shorter buffer asks for more, never for fewer than
//! it has, and never answers differently); a content size agrees with libzstd's.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metal_hammer::install::decode::{parse_header, FrameHeader};

/// The longest frame header: magic, descriptor, window, 4-byte dictionary id, 8-byte size.
const MAX_HEADER: usize = 18;
const ZSTD_MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();

fuzz_target!(|data: &[u8]| {
    let full = parse_header(data);
    // How many bytes the answer rests on.
    let rests_on = match &full {
        Ok(Ok(FrameHeader::Zstd { header_len, .. })) => {
            assert!(*header_len <= data.len().min(MAX_HEADER), "header of {header_len} bytes from {}", data.len());
            *header_len
        }
        Ok(Ok(FrameHeader::Skippable { total })) => {
            assert!(*total >= 8, "skippable frame of {total} bytes");
            8
        }
        Ok(Err(need)) => {
            assert!(*need > data.len() && *need <= MAX_HEADER, "asks for {need} bytes, has {}", data.len());
            data.len()
        }
        Err(_) => data.len().min(MAX_HEADER),
    };
    for k in 0..=data.len().min(MAX_HEADER) {
        let part = parse_header(&data[..k]);
        if k >= rests_on && full.is_ok() {
            assert_eq!(part.as_ref().ok(), full.as_ref().ok(), "{k} bytes answer differently than {}", data.len());
        } else if k < rests_on {
            match part {
                Ok(Err(need)) => assert!(need > k, "{k} bytes: asks for {need}"),
                Ok(Ok(h)) => panic!("{k} bytes already give {h:?}, the whole buffer {full:?}"),
                Err(_) => assert!(full.is_err(), "{k} bytes are refused, the whole buffer is not"),
            }
        }
    }
    // libzstd's own reading of the content size, where it has one (for a frame of the current
    // format: libzstd also reads the legacy v0.x formats, which images never use and we refuse).
    if !data.starts_with(&ZSTD_MAGIC) {
        return;
    }
    if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(data) {
        match full {
            Ok(Ok(FrameHeader::Zstd { content_size, .. })) => assert_eq!(content_size, Some(size), "libzstd reads a content size of {size}"),
            other => panic!("libzstd reads a frame of {size} bytes, we read {other:?}"),
        }
    }
});
