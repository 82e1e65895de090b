//! image-builder: everything a machine boots.
//!
//! - [`kernel`]: Debian's kernel, extracted into a cache with `modules.dep`/`modules.alias`.
//! - [`hammer`]: the metal-hammer initramfs (newc cpio, zstd) and its kernel.
//! - [`testos`]: the small busybox test OS with the phone-home piece and a verifier.
//! - [`os`]: Debian images by mmdebstrap, or images from a directory or tarball, as `tar.zst`
//!   and `raw.zst` (GPT, ESP + ext4, systemd-boot).
//! - [`filler`]: generated filler files that make big test images for memory and size benchmarks.
//! - [`publish`]: registering a built image in the API's catalog.
//! - [`serve`]: serving a directory of images over HTTP for the lab.
//!
//! Every archive is reproducible: the [`tree::Tree`] keeps entries sorted, the [`cpio`] and
//! [`archive`] writers use fixed mtimes and numeric owners, and compression uses fixed zstd
//! parameters. Every image gets a manifest (`metal_types::ImageManifest`) and a `sha256sum` file.

pub mod archive;
pub mod cpio;
pub mod error;
pub mod filler;
pub mod hammer;
pub mod http;
pub mod kernel;
pub mod kmod;
pub mod os;
pub mod publish;
pub mod serve;
pub mod testos;
pub mod tools;
pub mod tree;

pub use error::{Error, Result};

/// Today's date as `YYYYMMDD` (UTC): the default image version.
pub fn today() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    format!("{y:04}{m:02}{d:02}")
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn civil_dates() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_416), (2025, 11, 24));
        assert_eq!(super::civil_from_days(11_016), (2000, 2, 29));
    }
}
