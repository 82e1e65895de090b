//! Wiping disks before a machine joins the warm pool, and again when it comes back.
//!
//! Every disk is wiped in its own thread. Per disk the strongest method the device supports
//! runs over the whole device: on NVMe a Format NVM with secure erase (crypto erase when
//! offered) or a Sanitize; else secure discard (`BLKSECDISCARD`), else discard (`BLKDISCARD`),
//! else overwriting with zeros (`BLKZEROOUT`). A discard is checked by reading 64 blocks spread
//! over the device: a device that accepted it but kept the data is overwritten after all (and
//! reported as `overwrite`), and so is one where any of those blocks cannot be read back (an
//! unverified discard counts as a failed one; if the overwrite fails too, the wipe fails). Whatever ran, the first and last MiB (MBR, both
//! GPT copies, the superblocks of ext4/xfs/vfat/swap/LVM/mdraid/ZFS labels) and the btrfs
//! superblock mirrors are then zeroed, so no partition table or filesystem signature survives.
//! A failed wipe is an error for the whole call: a machine with an unwiped disk must not be
//! offered to the next tenant.

use std::path::{Path, PathBuf};
use std::time::Instant;

use metal_types::DiskWipe;

use crate::nvme;
use crate::sys::Sys;

pub const MIB: u64 = 1 << 20;

/// One disk to wipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WipeTarget {
    pub path: PathBuf,
    pub size_bytes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    NvmeSanitize,
    NvmeFormat,
    SecureDiscard,
    Discard,
    Overwrite,
}

impl Method {
    /// The names [`DiskWipe::method`] uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::NvmeSanitize => "nvme-sanitize",
            Method::NvmeFormat => "nvme-format",
            Method::SecureDiscard => "secure-discard",
            Method::Discard => "discard",
            Method::Overwrite => "overwrite",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WipeError {
    #[error("refusing to wipe {0}: not PID 1 of the initramfs and the device was not named with --device")]
    NotAllowed(PathBuf),
    #[error("wiping {device} with {method} failed")]
    Method { device: PathBuf, method: &'static str, source: std::io::Error },
    #[error("writing a canary to {device} at offset {offset} failed")]
    Canary { device: PathBuf, offset: u64, source: std::io::Error },
    #[error("clearing signatures on {device} at offset {offset} failed")]
    Signatures { device: PathBuf, offset: u64, source: std::io::Error },
    #[error("{failed} of {total} disks failed to wipe; first: {first}")]
    Some { failed: usize, total: usize, first: Box<WipeError> },
}

/// Errors that mean "this device cannot do that", as opposed to "it tried and failed".
pub fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL))
}

/// Ranges to zero whatever the method: first and last MiB, and the btrfs superblock mirrors
/// at 64 MiB and 256 GiB when the disk reaches that far.
pub fn signature_ranges(size: u64) -> Vec<(u64, u64)> {
    let head = size.min(MIB);
    let mut out = vec![(0, head)];
    if size > MIB {
        let tail_start = size.saturating_sub(MIB).max(head);
        out.push((tail_start, size - tail_start));
    }
    for mirror in [64 * MIB, 256 * 1024 * MIB] {
        if mirror + 4096 <= size.saturating_sub(MIB) {
            out.push((mirror, 4096));
        }
    }
    out
}

/// Wipes one disk; returns how and how long.
pub fn wipe_disk(sys: &dyn Sys, target: &WipeTarget) -> Result<DiskWipe, WipeError> {
    let start = Instant::now();
    let dev = &target.path;
    let size = target.size_bytes;
    let mut method = match nvme_erase(sys, dev)? {
        Some(m) => m,
        None => discard_or_overwrite(sys, dev, size)?,
    };
    // A discard the device accepted but ignored (thin provisioning, a hypervisor with
    // discard=ignore, TRIM without read-zero) leaves the old data readable: the canaries
    // planted before it tell, and then the whole disk is overwritten; so it is when a canary
    // cannot be read back, since then nothing tells.
    if matches!(method, Method::SecureDiscard | Method::Discard) {
        if let Some((offset, why)) = unverified_discard(sys, dev, size) {
            crate::log!("{}: {why} at offset {offset} after {}; overwriting the whole disk", dev.display(), method.as_str());
            sys.zero_range(dev, 0, size).map_err(method_err(dev, Method::Overwrite))?;
            method = Method::Overwrite;
        }
    }
    for (offset, len) in signature_ranges(size) {
        sys.zero_range(dev, offset, len).map_err(|source| WipeError::Signatures { device: dev.clone(), offset, source })?;
    }
    // Drop the kernel's view of the old partitions (their device nodes go away). Not fatal:
    // the disk itself is clean; devices without partitions (loop without partscan) say EINVAL.
    if let Err(e) = sys.reread_partitions(dev, &[]) {
        if !is_unsupported(&e) {
            crate::log!("{}: re-reading the (now empty) partition table: {e}", dev.display());
        }
    }
    Ok(DiskWipe {
        disk: dev.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| dev.display().to_string()),
        method: method.as_str().to_string(),
        duration_ms: start.elapsed().as_millis() as u64,
    })
}

/// Where canaries go and are read back: 64 blocks of 4 KiB spread evenly over the device.
pub fn sample_offsets(size: u64) -> Vec<u64> {
    const BLOCK: u64 = 4096;
    if size < BLOCK {
        return Vec::new();
    }
    let last = size / BLOCK - 1;
    let mut v: Vec<u64> = (0..64u64).map(|i| (last * i / 63) * BLOCK).collect();
    v.dedup();
    v
}

/// The first canary offset that does not read back as zeros, or cannot be read back at all
/// (then the discard is not verified either), and which of the two it was.
fn unverified_discard(sys: &dyn Sys, dev: &Path, size: u64) -> Option<(u64, String)> {
    sample_offsets(size).into_iter().find_map(|off| match sys.read_at(dev, off, 4096) {
        Ok(b) if b.iter().all(|&x| x == 0) => None,
        Ok(_) => Some((off, "data left".to_string())),
        Err(e) => Some((off, format!("canary unreadable ({e})"))),
    })
}

fn method_err(dev: &Path, method: Method) -> impl FnOnce(std::io::Error) -> WipeError + '_ {
    move |source| WipeError::Method { device: dev.to_path_buf(), method: method.as_str(), source }
}

/// NVMe namespaces (`nvme*` device names): Format NVM or Sanitize when the controller offers
/// one. `None` when the device is not NVMe or offers neither (then discard/overwrite runs).
fn nvme_erase(sys: &dyn Sys, dev: &Path) -> Result<Option<Method>, WipeError> {
    let is_nvme = dev.file_name().is_some_and(|n| n.to_string_lossy().starts_with("nvme"));
    if !is_nvme {
        return Ok(None);
    }
    let info = match sys.nvme_identify(dev) {
        Ok(info) => info,
        Err(e) if is_unsupported(&e) => return Ok(None),
        Err(e) => {
            crate::log!("{}: NVMe identify failed ({e}); wiping by discard/overwrite", dev.display());
            return Ok(None);
        }
    };
    match nvme::choose(&info) {
        Some(nvme::NvmeErase::Format { ses }) => {
            sys.nvme_format(dev, info.nsid, info.lbaf, ses).map_err(method_err(dev, Method::NvmeFormat))?;
            Ok(Some(Method::NvmeFormat))
        }
        Some(nvme::NvmeErase::Sanitize(action)) => {
            sys.nvme_sanitize(dev, action).map_err(method_err(dev, Method::NvmeSanitize))?;
            Ok(Some(Method::NvmeSanitize))
        }
        None => Ok(None),
    }
}

/// What the canaries contain: anything but zeros.
pub const CANARY: &[u8; 16] = b"METAL-CANARY-01\n";

/// Secure discard, else discard, else overwrite with zeros, over the whole device. Canaries
/// are planted first at the [`sample_offsets`], so an ignored discard shows.
fn discard_or_overwrite(sys: &dyn Sys, dev: &Path, size: u64) -> Result<Method, WipeError> {
    let canary = CANARY.repeat(4096 / CANARY.len());
    for off in sample_offsets(size) {
        sys.write_at(dev, off, &canary).map_err(|source| WipeError::Canary { device: dev.to_path_buf(), offset: off, source })?;
    }
    match sys.discard(dev, 0, size, true) {
        Ok(()) => Ok(Method::SecureDiscard),
        Err(e) if is_unsupported(&e) => match sys.discard(dev, 0, size, false) {
            Ok(()) => Ok(Method::Discard),
            Err(e) if is_unsupported(&e) => {
                sys.zero_range(dev, 0, size).map_err(method_err(dev, Method::Overwrite))?;
                Ok(Method::Overwrite)
            }
            Err(e) => Err(method_err(dev, Method::Discard)(e)),
        },
        Err(e) => Err(method_err(dev, Method::SecureDiscard)(e)),
    }
}

/// Wipes every disk in parallel. All disks are attempted even when one fails; any failure
/// fails the call.
pub fn wipe_all(sys: &dyn Sys, targets: &[WipeTarget]) -> Result<Vec<DiskWipe>, WipeError> {
    let results: Vec<Result<DiskWipe, WipeError>> = std::thread::scope(|s| {
        let handles: Vec<_> = targets.iter().map(|t| s.spawn(move || wipe_disk(sys, t))).collect();
        handles.into_iter().map(|h| h.join().expect("wipe thread panicked")).collect()
    });
    let total = results.len();
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(w) => ok.push(w),
            Err(e) => errors.push(e),
        }
    }
    match errors.len() {
        0 => Ok(ok),
        1 => Err(errors.remove(0)),
        failed => Err(WipeError::Some { failed, total, first: Box::new(errors.remove(0)) }),
    }
}

/// Size of a block device (`BLKGETSIZE64`) or of a regular file, in bytes.
pub fn device_size(path: &Path) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    f.seek(SeekFrom::End(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, RecordingSys};

    /// The calls without the canary writes (checked on their own in `canaries_before_discard`).
    fn no_canaries(sys: &RecordingSys) -> Vec<Call> {
        sys.calls().into_iter().filter(|c| !matches!(c, Call::WriteAt { .. })).collect()
    }

    #[test]
    fn canaries_before_discard() {
        let sys = RecordingSys::new();
        wipe_disk(&sys, &target("vda", 100 * MIB)).unwrap();
        let calls = sys.calls();
        let first_discard = calls.iter().position(|c| matches!(c, Call::Discard { .. })).unwrap();
        assert_eq!(first_discard, 64, "64 canaries, then the discard");
        assert_eq!(calls[0], Call::WriteAt { device: "/dev/vda".into(), offset: 0, len: 4096 });
        assert_eq!(calls[63], Call::WriteAt { device: "/dev/vda".into(), offset: 100 * MIB - 4096, len: 4096 });
    }

    fn target(name: &str, size: u64) -> WipeTarget {
        WipeTarget { path: PathBuf::from(format!("/dev/{name}")), size_bytes: size }
    }

    #[test]
    fn secure_discard_then_signatures() {
        let sys = RecordingSys::new();
        let w = wipe_disk(&sys, &target("vda", 100 * MIB)).unwrap();
        assert_eq!(w.method, "secure-discard");
        assert_eq!(w.disk, "vda");
        let dev = PathBuf::from("/dev/vda");
        assert_eq!(
            no_canaries(&sys),
            vec![
                Call::Discard { device: dev.clone(), offset: 0, len: 100 * MIB, secure: true },
                Call::ZeroRange { device: dev.clone(), offset: 0, len: MIB },
                Call::ZeroRange { device: dev.clone(), offset: 99 * MIB, len: MIB },
                Call::ZeroRange { device: dev.clone(), offset: 64 * MIB, len: 4096 },
                Call::RereadPartitions { device: dev },
            ]
        );
    }

    #[test]
    fn falls_back_to_discard_then_overwrite() {
        let sys = RecordingSys::new();
        sys.fail_with(libc::EOPNOTSUPP, |c| matches!(c, Call::Discard { secure: true, .. }));
        assert_eq!(wipe_disk(&sys, &target("loop0", 8 * MIB)).unwrap().method, "discard");

        let sys = RecordingSys::new();
        sys.fail_with(libc::EOPNOTSUPP, |c| matches!(c, Call::Discard { .. }));
        let w = wipe_disk(&sys, &target("sda", 8 * MIB)).unwrap();
        assert_eq!(w.method, "overwrite");
        let calls = no_canaries(&sys);
        assert!(matches!(calls[0], Call::Discard { secure: true, .. }));
        assert!(matches!(calls[1], Call::Discard { secure: false, .. }));
        assert_eq!(calls[2], Call::ZeroRange { device: "/dev/sda".into(), offset: 0, len: 8 * MIB });
        assert_eq!(calls.len(), 6, "{calls:?}");
        assert_eq!(calls[5], Call::RereadPartitions { device: "/dev/sda".into() });
    }

    #[test]
    fn a_real_failure_is_an_error_not_a_fallback() {
        let sys = RecordingSys::new();
        sys.fail_when(|c| matches!(c, Call::Discard { secure: true, .. }));
        let err = wipe_disk(&sys, &target("vda", 8 * MIB)).unwrap_err();
        assert!(matches!(err, WipeError::Method { method: "secure-discard", .. }), "{err}");
        assert_eq!(no_canaries(&sys).len(), 1, "nothing after a failed method");

        let sys = RecordingSys::new();
        sys.fail_when(|c| matches!(c, Call::ZeroRange { offset, .. } if *offset > 0));
        assert!(matches!(wipe_disk(&sys, &target("vda", 8 * MIB)), Err(WipeError::Signatures { .. })));
    }

    #[test]
    fn all_disks_are_attempted_and_one_failure_fails_the_call() {
        let sys = RecordingSys::new();
        sys.fail_when(|c| matches!(c, Call::Discard { device, .. } if device.ends_with("vdb")));
        let err = wipe_all(&sys, &[target("vda", 4 * MIB), target("vdb", 4 * MIB), target("vdc", 4 * MIB)]).unwrap_err();
        assert!(err.to_string().contains("vdb"), "{err}");
        let calls = no_canaries(&sys);
        for d in ["/dev/vda", "/dev/vdc"] {
            assert!(calls.contains(&Call::ZeroRange { device: d.into(), offset: 3 * MIB, len: MIB }), "{d} fully wiped");
        }
        let ok = wipe_all(&RecordingSys::new(), &[target("vda", 4 * MIB), target("vdb", 4 * MIB)]).unwrap();
        assert_eq!(ok.len(), 2);
    }

    #[test]
    fn nvme_format_when_supported_sanitize_else_discard() {
        use crate::nvme::NvmeInfo;
        let dev = PathBuf::from("/dev/nvme0n1");
        let sys = RecordingSys::new();
        sys.set_nvme(NvmeInfo { nsid: 1, lbaf: 2, format: true, format_crypto: true, ..Default::default() });
        assert_eq!(wipe_disk(&sys, &target("nvme0n1", 8 * MIB)).unwrap().method, "nvme-format");
        let calls = no_canaries(&sys);
        assert_eq!(calls[0], Call::NvmeIdentify { device: dev.clone() });
        assert_eq!(calls[1], Call::NvmeFormat { device: dev.clone(), nsid: 1, lbaf: 2, ses: crate::nvme::SES_CRYPTO });
        assert_eq!(
            calls[2],
            Call::ZeroRange { device: dev.clone(), offset: 0, len: MIB },
            "signatures cleared after a format too"
        );

        let sys = RecordingSys::new();
        sys.set_nvme(NvmeInfo { nsid: 1, sanitize_block: true, ..Default::default() });
        assert_eq!(wipe_disk(&sys, &target("nvme0n1", 8 * MIB)).unwrap().method, "nvme-sanitize");
        assert_eq!(no_canaries(&sys)[1], Call::NvmeSanitize { device: dev.clone(), action: 2 });

        // Neither offered (or not NVMe after all): discard.
        let sys = RecordingSys::new();
        sys.set_nvme(NvmeInfo { nsid: 1, ..Default::default() });
        assert_eq!(wipe_disk(&sys, &target("nvme0n1", 8 * MIB)).unwrap().method, "secure-discard");
        let sys = RecordingSys::new();
        assert_eq!(wipe_disk(&sys, &target("nvme0n1", 8 * MIB)).unwrap().method, "secure-discard");

        // A format that fails is an error, not a silent fallback.
        let sys = RecordingSys::new();
        sys.set_nvme(NvmeInfo { nsid: 1, format: true, ..Default::default() });
        sys.fail_when(|c| matches!(c, Call::NvmeFormat { .. }));
        assert!(matches!(wipe_disk(&sys, &target("nvme0n1", 8 * MIB)), Err(WipeError::Method { method: "nvme-format", .. })));
    }

    #[test]
    fn a_discard_that_left_data_behind_becomes_an_overwrite() {
        let sys = RecordingSys::new();
        sys.set_read_byte(0x5a);
        let w = wipe_disk(&sys, &target("sda", 8 * MIB)).unwrap();
        assert_eq!(w.method, "overwrite");
        let calls = no_canaries(&sys);
        assert!(matches!(calls[0], Call::Discard { secure: true, .. }));
        assert_eq!(calls[1], Call::ZeroRange { device: "/dev/sda".into(), offset: 0, len: 8 * MIB });
        // NVMe format is trusted (the controller erased); no sampling there.
        let sys = RecordingSys::new();
        sys.set_read_byte(0x5a);
        sys.set_nvme(crate::nvme::NvmeInfo { nsid: 1, format: true, ..Default::default() });
        assert_eq!(wipe_disk(&sys, &target("nvme0n1", 8 * MIB)).unwrap().method, "nvme-format");
    }

    #[test]
    fn a_canary_that_cannot_be_read_back_after_a_discard_means_overwrite() {
        // One unreadable canary (the last one) is enough: the discard is not verified.
        let sys = RecordingSys::new();
        sys.fail_reads_when(|_, offset| offset == 8 * MIB - 4096);
        let w = wipe_disk(&sys, &target("sda", 8 * MIB)).unwrap();
        assert_eq!(w.method, "overwrite");
        let calls = no_canaries(&sys);
        assert!(matches!(calls[0], Call::Discard { secure: true, .. }));
        assert_eq!(calls[1], Call::ZeroRange { device: "/dev/sda".into(), offset: 0, len: 8 * MIB });

        // When that overwrite fails as well, the wipe fails.
        let sys = RecordingSys::new();
        sys.fail_reads_when(|_, _| true);
        sys.fail_when(|c| matches!(c, Call::ZeroRange { offset: 0, len, .. } if *len == 8 * MIB));
        let err = wipe_disk(&sys, &target("sda", 8 * MIB)).unwrap_err();
        assert!(matches!(err, WipeError::Method { method: "overwrite", .. }), "{err}");
    }

    #[test]
    fn samples_spread_over_the_whole_device() {
        let s = sample_offsets(100 * MIB);
        assert_eq!(s.len(), 64);
        assert_eq!(s[0], 0);
        assert_eq!(*s.last().unwrap(), 100 * MIB - 4096);
        assert!(s.iter().all(|o| o % 4096 == 0));
        assert_eq!(sample_offsets(8192), vec![0, 4096]);
        assert!(sample_offsets(100).is_empty());
    }

    #[test]
    fn signature_ranges_for_small_and_large_disks() {
        assert_eq!(signature_ranges(512 * 1024), vec![(0, 512 * 1024)]);
        assert_eq!(signature_ranges(3 * MIB / 2), vec![(0, MIB), (MIB, MIB / 2)]);
        let big = signature_ranges(512 * 1024 * MIB);
        assert!(big.contains(&(256 * 1024 * MIB, 4096)));
        assert!(big.contains(&(512 * 1024 * MIB - MIB, MIB)));
    }
}
