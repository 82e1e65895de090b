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

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
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
    RereadPartitions { device: PathBuf },
    RunInChroot { root: PathBuf, program: String, args: Vec<String> },
    WriteAt { device: PathBuf, offset: u64, len: usize },
    NvmeIdentify { device: PathBuf },
    NvmeFormat { device: PathBuf, nsid: u32, lbaf: u8, ses: u8 },
    NvmeSanitize { device: PathBuf, action: u8 },
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
    /// Reads `len` bytes at `offset` (not destructive; the wipe uses it to check that a
    /// discard really cleared the device). Reads through the page cache, which discard and
    /// zero-out invalidate for their range.
    fn read_at(&self, device: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        File::open(device)?.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
    /// Writes `data` at `offset` and waits for it to reach the device (`fdatasync`). The wipe
    /// plants canaries with it before a discard.
    fn write_at(&self, device: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new().write(true).open(device)?;
        f.write_all_at(data, offset)?;
        f.sync_data()
    }
    /// NVMe Identify of a namespace block device: what it can erase. `ENOTTY` when not NVMe.
    fn nvme_identify(&self, device: &Path) -> io::Result<crate::nvme::NvmeInfo> {
        let _ = device;
        Err(io::Error::from_raw_os_error(libc::ENOTTY))
    }
    /// NVMe Format NVM of namespace `nsid` with LBA format `lbaf` and secure-erase setting `ses`.
    fn nvme_format(&self, device: &Path, nsid: u32, lbaf: u8, ses: u8) -> io::Result<()> {
        let _ = (device, nsid, lbaf, ses);
        Err(io::Error::from_raw_os_error(libc::ENOTTY))
    }
    /// NVMe Sanitize of the controller behind `device`, waited for until it completes.
    fn nvme_sanitize(&self, device: &Path, action: crate::nvme::SanitizeAction) -> io::Result<()> {
        let _ = (device, action);
        Err(io::Error::from_raw_os_error(libc::ENOTTY))
    }
    /// Makes the kernel use the partition table just written to `disk`: `BLKRRPART` (retried
    /// while the device is busy), then `BLKPG_ADD_PARTITION` for any partition of `parts` the
    /// kernel did not find itself (a kernel without a GPT parser), then waits up to 10 s for
    /// every partition's device node. Does nothing for a regular (image) file.
    fn reread_partitions(&self, disk: &Path, parts: &[PartitionSpan]) -> io::Result<()> {
        reread_partitions_and_wait(disk, parts)
    }
    /// Runs `program` (a path inside `root`) with `root` as its root directory and `/` as its
    /// working directory (`chroot(2)` in the child; the initramfs has no `chroot` program), with
    /// a standard `PATH`. Like [`Sys::run`]: a non-zero exit is an error carrying stderr.
    fn run_in_chroot(&self, root: &Path, program: &str, args: &[&str]) -> io::Result<()> {
        run_in_chroot(root, program, args)
    }
}

type CallPredicate = Box<dyn Fn(&Call) -> bool + Send + Sync>;
type ReadPredicate = Box<dyn Fn(&Path, u64) -> bool + Send + Sync>;

/// Records every call; fails the calls that `fail_on` matches.
#[derive(Default)]
pub struct RecordingSys {
    calls: Mutex<Vec<Call>>,
    fail_on: Mutex<Option<(i32, CallPredicate)>>,
    nvme: Mutex<Option<crate::nvme::NvmeInfo>>,
    dirty: Mutex<Option<Vec<u8>>>,
    read_fails: Mutex<Option<ReadPredicate>>,
}

impl RecordingSys {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every call for which `pred` is true fail with `EIO` (it is still recorded).
    pub fn fail_when(&self, pred: impl Fn(&Call) -> bool + Send + Sync + 'static) {
        self.fail_with(libc::EIO, pred);
    }

    /// Makes every call for which `pred` is true fail with `errno` (e.g. `EOPNOTSUPP` to
    /// exercise a fallback).
    pub fn fail_with(&self, errno: i32, pred: impl Fn(&Call) -> bool + Send + Sync + 'static) {
        *self.fail_on.lock().unwrap() = Some((errno, Box::new(pred)));
    }

    /// Makes [`Sys::read_at`] return this byte (repeated) instead of zeros, as a device whose
    /// discard did not clear it would. Reads are not recorded.
    pub fn set_read_byte(&self, byte: u8) {
        *self.dirty.lock().unwrap() = Some(vec![byte]);
    }

    /// Makes [`Sys::read_at`] fail with `EIO` for the `(device, offset)` that `pred` matches, as
    /// a device with unreadable blocks would.
    pub fn fail_reads_when(&self, pred: impl Fn(&Path, u64) -> bool + Send + Sync + 'static) {
        *self.read_fails.lock().unwrap() = Some(Box::new(pred));
    }

    /// Makes [`Sys::nvme_identify`] answer `info` (by default it answers `ENOTTY`: not NVMe).
    pub fn set_nvme(&self, info: crate::nvme::NvmeInfo) {
        *self.nvme.lock().unwrap() = Some(info);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    fn record(&self, call: Call) -> io::Result<()> {
        let fail = self.fail_on.lock().unwrap().as_ref().and_then(|(errno, p)| p(&call).then_some(*errno));
        self.calls.lock().unwrap().push(call);
        match fail {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }
}

impl Sys for RecordingSys {
    fn reread_partitions(&self, disk: &Path, _parts: &[PartitionSpan]) -> io::Result<()> {
        self.record(Call::RereadPartitions { device: disk.into() })
    }
    fn run_in_chroot(&self, root: &Path, program: &str, args: &[&str]) -> io::Result<()> {
        self.record(Call::RunInChroot {
            root: root.into(),
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
        })
    }
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
    fn write_at(&self, device: &Path, offset: u64, data: &[u8]) -> io::Result<()> {
        self.record(Call::WriteAt { device: device.into(), offset, len: data.len() })
    }
    fn read_at(&self, device: &Path, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if self.read_fails.lock().unwrap().as_ref().is_some_and(|p| p(device, offset)) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let byte = self.dirty.lock().unwrap().as_ref().map_or(0, |b| b[0]);
        Ok(vec![byte; len])
    }
    fn nvme_identify(&self, device: &Path) -> io::Result<crate::nvme::NvmeInfo> {
        self.record(Call::NvmeIdentify { device: device.into() })?;
        (*self.nvme.lock().unwrap()).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOTTY))
    }
    fn nvme_format(&self, device: &Path, nsid: u32, lbaf: u8, ses: u8) -> io::Result<()> {
        self.record(Call::NvmeFormat { device: device.into(), nsid, lbaf, ses })
    }
    fn nvme_sanitize(&self, device: &Path, action: crate::nvme::SanitizeAction) -> io::Result<()> {
        self.record(Call::NvmeSanitize { device: device.into(), action: action as u8 })
    }
}

// Block-device ioctls from <linux/fs.h>: `_IO(0x12, n)`.
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKSECDISCARD: libc::c_ulong = 0x127d;
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// `kexec_file_load` flag: no initramfs is passed.
const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 0x4;

/// The real thing: every call is a syscall (or a child process for `run`).
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxSys;

fn nix_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Issues a `{start, len}` range ioctl on a block device.
fn range_ioctl(device: &Path, request: libc::c_ulong, offset: u64, len: u64) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(device)?;
    let range: [u64; 2] = [offset, len];
    // SAFETY: the ioctls take a pointer to two u64 that outlive the call; the fd is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, range.as_ptr()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Sys for LinuxSys {
    fn mount(&self, source: &str, target: &Path, fstype: &str, flags: u64, data: Option<&str>) -> io::Result<()> {
        let flags = nix::mount::MsFlags::from_bits_retain(flags as libc::c_ulong);
        nix::mount::mount(Some(source), target, Some(fstype), flags, data).map_err(nix_err)
    }

    fn umount(&self, target: &Path) -> io::Result<()> {
        nix::mount::umount(target).map_err(nix_err)
    }

    fn load_module(&self, path: &Path, params: &str) -> io::Result<()> {
        let file = File::open(path)?;
        let params =
            CString::new(params).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "module parameters contain NUL"))?;
        // SAFETY: finit_module(fd, const char *params, int flags); both outlive the call.
        let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EEXIST) {
                return Ok(());
            }
            return Err(err);
        }
        Ok(())
    }

    fn discard(&self, device: &Path, offset: u64, len: u64, secure: bool) -> io::Result<()> {
        range_ioctl(device, if secure { BLKSECDISCARD } else { BLKDISCARD }, offset, len)
    }

    fn zero_range(&self, device: &Path, offset: u64, len: u64) -> io::Result<()> {
        if std::fs::metadata(device)?.file_type().is_block_device() {
            return range_ioctl(device, BLKZEROOUT, offset, len);
        }
        use std::io::{Seek, SeekFrom};
        let mut file = OpenOptions::new().write(true).open(device)?;
        file.seek(SeekFrom::Start(offset))?;
        let zeros = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        file.sync_data()
    }

    fn run(&self, program: &str, args: &[&str]) -> io::Result<()> {
        let out = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .output()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run {program}: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(io::Error::other(format!("{program} {} failed ({}): {}", args.join(" "), out.status, stderr.trim())))
    }

    fn kexec_load(&self, kernel: &Path, initrd: Option<&Path>, cmdline: &str) -> io::Result<()> {
        let kernel = File::open(kernel)?;
        let initrd = initrd.map(File::open).transpose()?;
        let cmdline = CString::new(cmdline).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cmdline contains NUL"))?;
        let bytes = cmdline.as_bytes_with_nul();
        let (initrd_fd, flags) = match &initrd {
            Some(f) => (f.as_raw_fd(), 0),
            None => (-1, KEXEC_FILE_NO_INITRAMFS),
        };
        // SAFETY: kexec_file_load(kernel_fd, initrd_fd, cmdline_len, cmdline, flags); the fds and
        // the NUL-terminated command line outlive the call; the length includes the NUL.
        let rc = unsafe {
            libc::syscall(libc::SYS_kexec_file_load, kernel.as_raw_fd(), initrd_fd, bytes.len(), bytes.as_ptr(), flags)
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn kexec_reboot(&self) -> io::Result<()> {
        nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC).map(|_| ()).map_err(nix_err)
    }

    fn reboot(&self) -> io::Result<()> {
        nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT).map(|_| ()).map_err(nix_err)
    }

    fn sync(&self) {
        nix::unistd::sync();
    }

    fn nvme_identify(&self, device: &Path) -> io::Result<crate::nvme::NvmeInfo> {
        crate::nvme::identify(device)
    }

    fn nvme_format(&self, device: &Path, nsid: u32, lbaf: u8, ses: u8) -> io::Result<()> {
        crate::nvme::format(device, nsid, lbaf, ses, std::time::Duration::from_secs(3600))
    }

    fn nvme_sanitize(&self, device: &Path, action: crate::nvme::SanitizeAction) -> io::Result<()> {
        crate::nvme::sanitize(device, action, std::time::Duration::from_secs(6 * 3600))
    }
}

/// One partition of a table just written, for [`Sys::reread_partitions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionSpan {
    pub number: u32,
    /// Offset and length in bytes.
    pub start: u64,
    pub len: u64,
    /// The device node it gets, e.g. `/dev/vda1`.
    pub node: PathBuf,
}

/// The real [`Sys::reread_partitions`].
pub fn reread_partitions_and_wait(disk: &Path, parts: &[PartitionSpan]) -> io::Result<()> {
    use std::time::{Duration, Instant};
    // From <linux/fs.h> and <linux/blkpg.h>.
    const BLKRRPART: libc::c_ulong = 0x125f;
    const BLKPG: libc::c_ulong = 0x1269;
    const BLKPG_ADD_PARTITION: libc::c_int = 1;
    #[repr(C)]
    struct BlkpgIoctlArg {
        op: libc::c_int,
        flags: libc::c_int,
        datalen: libc::c_int,
        data: *mut libc::c_void,
    }
    #[repr(C)]
    struct BlkpgPartition {
        start: libc::c_longlong,
        length: libc::c_longlong,
        pno: libc::c_int,
        devname: [libc::c_char; 64],
        volname: [libc::c_char; 64],
    }

    let file = File::open(disk)?;
    if !file.metadata()?.file_type().is_block_device() {
        return Ok(());
    }
    let mut tries = 0;
    loop {
        // SAFETY: BLKRRPART takes no argument; the fd is open for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKRRPART as _) };
        if rc == 0 {
            break;
        }
        let err = io::Error::last_os_error();
        tries += 1;
        // Busy while something (a prober, a closing mount) still holds the disk: up to 10 s.
        if err.raw_os_error() != Some(libc::EBUSY) || tries >= 50 {
            return Err(err);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The kernel registers the partitions it parsed in sysfs before BLKRRPART returns.
    for p in parts {
        let name = p.node.file_name().unwrap_or_default();
        if Path::new("/sys/class/block").join(name).exists() {
            continue;
        }
        let mut part =
            BlkpgPartition { start: p.start as _, length: p.len as _, pno: p.number as _, devname: [0; 64], volname: [0; 64] };
        let mut arg = BlkpgIoctlArg {
            op: BLKPG_ADD_PARTITION,
            flags: 0,
            datalen: std::mem::size_of::<BlkpgPartition>() as _,
            data: (&mut part as *mut BlkpgPartition).cast(),
        };
        // SAFETY: BLKPG reads a blkpg_ioctl_arg whose data points at a blkpg_partition; both
        // live on this stack frame for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKPG as _, &mut arg) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(err.kind(), format!("adding partition {} of {}: {err}", p.number, disk.display())));
        }
    }
    drop(file);
    let deadline = Instant::now() + Duration::from_secs(10);
    for p in parts {
        while !p.node.exists() {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} did not appear after re-reading the partition table", p.node.display()),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

/// How long the real [`Sys::run_in_chroot`] lets a program run before it kills it.
pub const CHROOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// The real [`Sys::run_in_chroot`], with [`CHROOT_TIMEOUT`].
pub fn run_in_chroot(root: &Path, program: &str, args: &[&str]) -> io::Result<()> {
    run_in_chroot_timeout(root, program, args, CHROOT_TIMEOUT)
}

/// [`run_in_chroot`] with a deadline: the program runs in a process group of its own, which
/// is killed (`SIGKILL`) when `timeout` passes; that is an error (`TimedOut`).
pub fn run_in_chroot_timeout(root: &Path, program: &str, args: &[&str], timeout: std::time::Duration) -> io::Result<()> {
    use std::io::Read;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let croot = CString::new(root.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "root contains NUL"))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: between fork and exec the closure only makes the chroot, chdir and setpgid system
    // calls (async-signal-safe) on a path prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::chroot(croot.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 || libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child =
        cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("cannot run {program} in {}: {e}", root.display())))?;
    let mut pipe = child.stderr.take().expect("stderr is piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    });
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            // SAFETY: signals the process group the child leads (setpgid above).
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let stderr = reader.join().unwrap_or_default();
    let stderr = String::from_utf8_lossy(&stderr);
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(io::Error::other(format!("{program} {} failed ({s}): {}", args.join(" "), stderr.trim()))),
        None => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{program} {} did not finish within {timeout:?} and was killed: {}", args.join(" "), stderr.trim()),
        )),
    }
}
