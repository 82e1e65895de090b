//! The seam between metal-hammer's logic and the kernel.
//!
//! Every privileged or destructive step goes through [`Sys`]: mounting, loading modules,
//! wiping, running filesystem tools, kexec and reboot. [`LinuxSys`] does it for real;
//! [`RecordingSys`] records each call (and can be told to fail one) so unit tests assert the
//! order and flags of destructive steps without root.
//!
//! Partition tables and image bytes are written through ordinary files (`std::fs::File` on a
//! block device or an image file), not through this trait: those writers are tested on loop
//! devices and image files instead.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One call through the seam, as [`RecordingSys`] records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    Mount { source: String, target: PathBuf, fstype: String, flags: u64, data: Option<String> },
    Umount { target: PathBuf },
    LoadModule { path: PathBuf, params: String },
    Discard { device: PathBuf, offset: u64, len: u64, secure: bool },
    ZeroRange { device: PathBuf, offset: u64, len: u64 },
    Run { program: String, args: Vec<String> },
    KexecLoad { kernel: PathBuf, initrd: Option<PathBuf>, cmdline: String },
    KexecReboot,
    Reboot,
    Sync,
}

/// Privileged operations. Implementations must be usable from several threads (disks are
/// wiped in parallel).
pub trait Sys: Send + Sync {
    /// `mount(2)`; `flags` are `MS_*` bits.
    fn mount(&self, source: &str, target: &Path, fstype: &str, flags: u64, data: Option<&str>) -> io::Result<()>;
    fn umount(&self, target: &Path) -> io::Result<()>;
    /// `finit_module(2)` of an uncompressed `.ko`; `EEXIST` counts as success.
    fn load_module(&self, path: &Path, params: &str) -> io::Result<()>;
    /// `BLKDISCARD` (or `BLKSECDISCARD` when `secure`) of a byte range of a block device.
    fn discard(&self, device: &Path, offset: u64, len: u64, secure: bool) -> io::Result<()>;
    /// Writes zeros over a byte range (`BLKZEROOUT` on block devices, plain writes on files).
    fn zero_range(&self, device: &Path, offset: u64, len: u64) -> io::Result<()>;
    /// Runs a program to completion (mke2fs, mkfs.fat, mkswap, nvme, a chroot hook); a non-zero
    /// exit is an error that carries the program's stderr.
    fn run(&self, program: &str, args: &[&str]) -> io::Result<()>;
    /// `kexec_file_load(2)`.
    fn kexec_load(&self, kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> io::Result<()>;
    /// `reboot(LINUX_REBOOT_CMD_KEXEC)`.
    fn kexec_reboot(&self) -> io::Result<()>;
    /// `reboot(LINUX_REBOOT_CMD_RESTART)`.
    fn reboot(&self) -> io::Result<()>;
    /// `sync(2)`.
    fn sync(&self);
}

/// Records every call; fails the calls that `fail_on` matches.
#[derive(Default)]
pub struct RecordingSys {
    calls: Mutex<Vec<Call>>,
    fail_on: Mutex<Option<Box<dyn Fn(&Call) -> bool + Send + Sync>>>,
}

impl RecordingSys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every call for which `pred` is true fail with `EIO` (it is still recorded).
    pub fn fail_when(&self, pred: impl Fn(&Call) -> bool + Send + Sync + 'static) {
        *self.fail_on.lock().unwrap() = Some(Box::new(pred));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, call: Call) -> io::Result<()> {
        let fail = self.fail_on.lock().unwrap().as_ref().is_some_and(|p| p(&call));
        self.calls.lock().unwrap().push(call);
        if fail {
            Err(io::Error::from_raw_os_error(libc::EIO))
        } else {
            Ok(())
        }
    }
}

impl Sys for RecordingSys {
    fn mount(&self, source: &str, target: &Path, fstype: &str, flags: u64, data: Option<&str>) -> io::Result<()> {
        self.record(Call::Mount {
            source: source.into(),
            target: target.into(),
            fstype: fstype.into(),
            flags,
            data: data.map(Into::into),
        })
    }
    fn umount(&self, target: &Path) -> io::Result<()> {
        self.record(Call::Umount { target: target.into() })
    }
    fn load_module(&self, path: &Path, params: &str) -> io::Result<()> {
        self.record(Call::LoadModule { path: path.into(), params: params.into() })
    }
    fn discard(&self, device: &Path, offset: u64, len: u64, secure: bool) -> io::Result<()> {
        self.record(Call::Discard { device: device.into(), offset, len, secure })
    }
    fn zero_range(&self, device: &Path, offset: u64, len: u64) -> io::Result<()> {
        self.record(Call::ZeroRange { device: device.into(), offset, len })
    }
    fn run(&self, program: &str, args: &[&str]) -> io::Result<()> {
        self.record(Call::Run { program: program.into(), args: args.iter().map(|a| a.to_string()).collect() })
    }
    fn kexec_load(&self, kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> io::Result<()> {
        self.record(Call::KexecLoad { kernel: kernel.into(), initrd: initrd.map(Into::into), cmdline: cmdline.into() })
    }
    fn kexec_reboot(&self) -> io::Result<()> {
        self.record(Call::KexecReboot)
    }
    fn reboot(&self) -> io::Result<()> {
        self.record(Call::Reboot)
    }
    fn sync(&self) {
        let _ = self.record(Call::Sync);
    }
}
