//! Unpacking a rootfs tar stream onto the mounted filesystems.
//!
//! Regular files, directories, symbolic and hard links, device nodes and FIFOs are created with
//! the archive's owner, mode, modification time and `SCHILY.xattr.*` extended attributes
//! (file capabilities, for one). Entries are confined to the root: absolute names are taken as
//! relative, a `..` component is refused, and no entry may be created through a symbolic link the
//! archive made earlier (the target filesystems start empty, so those are the only links there
//! are). Files are opened with `O_NOFOLLOW`.
//!
//! Below the mount points of filesystems without Unix ownership (vfat), failing `chown`/`chmod`
//! is expected and ignored; anywhere else it is an error.
//!
//! Small files (up to 512 KiB) are read into memory here and written by two writer threads
//! while the archive is read on; an entry for a path already created (or for a directory of a
//! queued file), and every hard link, first waits for the writers, so the result is the same as
//! writing in archive order. Bigger files are written here, in blocks of 1 MiB with `O_DIRECT`
//! where the filesystem allows it: their bytes are not copied into the page cache, and nothing
//! of them is left for the write-back at the end.
//!
//! Durability: small files are written through the page cache (no `fsync` per file); the
//! install makes everything durable once at its end, by unmounting the other filesystems,
//! remounting the root read-only and `sync` (each of which writes the filesystems back and
//! flushes the device's cache, which `O_DIRECT` writes may still sit in), before anything is
//! reported.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime};

use tar::EntryType;

use super::raw::{fill, AlignedBuf};

/// Why an archive could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("reading the archive")]
    Read(#[source] io::Error),
    #[error("archive entry {path:?} would land outside the root")]
    Unsafe { path: String },
    #[error("unpacking {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How the unpacked tree looks, for the install report and the benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ExtractStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    pub other: u64,
    /// Bytes of regular file content written.
    pub bytes: u64,
}

/// Options for [`unpack`].
#[derive(Debug, Clone, Default)]
pub struct ExtractOptions {
    /// Paths (relative to the root) below which ownership and mode errors are ignored: the
    /// mount points of vfat filesystems.
    pub lenient: Vec<PathBuf>,
    /// Apply the archive's owners (needs root; on by default when running as root).
    pub same_owner: bool,
}

/// Makes an archive member name a safe relative path: leading `/` and `.` dropped, `..` refused.
pub fn sanitize(name: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in name.components() {
        match c {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return None,
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out)
}

/// Regular files up to this size are read into memory by the unpacking thread and written by
/// the writer threads; bigger ones are streamed by the unpacking thread itself.
const SMALL_FILE: u64 = 512 << 10;
/// Writer threads, and how many files may wait for them (bounds memory: 32 × 512 KiB).
const WRITERS: usize = 2;
const QUEUE: usize = 32;
/// Files at least this big are handed to write-back as soon as they are written.
const WRITEBACK_FROM: u64 = 128 << 10;
/// Big files are written in blocks of this size, with `O_DIRECT` where the filesystem allows
/// it, from a buffer aligned to `DIRECT_ALIGN` (a multiple of every logical block size).
const DIRECT_BLOCK: usize = 1 << 20;
const DIRECT_ALIGN: usize = super::raw::ALIGN;

/// What writing a file needs, shared by the unpacking thread and the writer threads.
struct FileCtx<'a> {
    opts: &'a ExtractOptions,
    /// The process umask, when known (`/proc/self/status`).
    umask: Option<u32>,
    /// Running with effective uid and gid 0: new files are 0:0 already.
    root_creds: bool,
    /// File content bytes written, by every thread.
    written: AtomicU64,
}

/// The metadata of one archive entry.
struct Meta {
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// A small file for a writer thread.
struct FileJob {
    rel: PathBuf,
    dst: PathBuf,
    data: Vec<u8>,
    meta: Meta,
}

/// Writer-thread bookkeeping: files queued or being written, and the first error.
#[derive(Default)]
struct Shared {
    inflight: Mutex<usize>,
    idle: Condvar,
    error: Mutex<Option<ExtractError>>,
}

impl Shared {
    fn done(&self) {
        let mut n = self.inflight.lock().unwrap();
        *n -= 1;
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    fn wait_idle(&self) {
        let mut n = self.inflight.lock().unwrap();
        while *n > 0 {
            n = self.idle.wait(n).unwrap();
        }
    }

    fn take_error(&self) -> Result<(), ExtractError> {
        match self.error.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl FileCtx<'_> {
    fn is_lenient(&self, rel: &Path) -> bool {
        self.opts.lenient.iter().any(|l| rel.starts_with(l))
    }

    /// Ownership/mode errors are fatal except on filesystems that cannot store them.
    fn meta_result(&self, rel: &Path, r: io::Result<()>) -> io::Result<()> {
        match r {
            Err(e) if self.is_lenient(rel) && matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOTSUP | libc::EINVAL)) => {
                Ok(())
            }
            r => r,
        }
    }

    /// Creates `dst` with `mode` (less set-id bits and the umask); `true` when the file is
    /// new. An existing file is truncated instead (and keeps its old mode for now).
    fn create(&self, dst: &Path, mode: u32) -> io::Result<(File, bool)> {
        let new = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o777)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(dst);
        match new {
            Ok(f) => Ok((f, true)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(dst)
                .map(|f| (f, false)),
            Err(e) => Err(e),
        }
    }

    /// Opens a regular file for writing, replacing a symlink or an empty directory in its way.
    fn open_file(&self, rel: &Path, dst: &Path, mode: u32) -> Result<(File, bool), ExtractError> {
        let wrap = |source: io::Error| ExtractError::Write { path: rel.to_path_buf(), source };
        match with_parents(dst, || self.create(dst, mode)) {
            Ok(f) => Ok(f),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::EISDIR)) => {
                if fs::symlink_metadata(dst).map(|m| m.is_dir()).unwrap_or(false) {
                    fs::remove_dir(dst).map_err(wrap)?;
                } else {
                    fs::remove_file(dst).map_err(wrap)?;
                }
                self.create(dst, mode).map_err(wrap)
            }
            Err(e) => Err(wrap(e)),
        }
    }

    /// Owner, mode, extended attributes and mtime of a file just written.
    fn finish_file(&self, f: &File, rel: &Path, dst: &Path, fresh: bool, size: u64, m: &Meta) -> Result<(), ExtractError> {
        if size >= WRITEBACK_FROM {
            // Start writing a big file back now (without waiting), so the disk works while the
            // rest of the image streams instead of all at the final sync.
            // SAFETY: plain syscall on an open descriptor.
            unsafe { libc::sync_file_range(std::os::fd::AsRawFd::as_raw_fd(f), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        }
        let wrap = |source: io::Error| ExtractError::Write { path: rel.to_path_buf(), source };
        // A file we just created is already root's (no directory is set-group-ID while we
        // unpack: directory modes are applied at the end) and has its mode unless the umask
        // took bits away or it has set-id/sticky bits: skip what is done.
        if self.opts.same_owner && !(fresh && m.uid == 0 && m.gid == 0 && self.root_creds) {
            let r = std::os::unix::fs::fchown(f, Some(m.uid as u32), Some(m.gid as u32));
            self.meta_result(rel, r).map_err(wrap)?;
        }
        if !(fresh && m.mode & 0o7000 == 0 && self.umask.is_some_and(|u| m.mode & u == 0)) {
            // After chown, which clears set-id bits.
            let r = f.set_permissions(fs::Permissions::from_mode(m.mode));
            self.meta_result(rel, r).map_err(wrap)?;
        }
        for (name, value) in &m.xattrs {
            self.meta_result(rel, lsetxattr(dst, name, value)).map_err(wrap)?;
        }
        let r = f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(m.mtime));
        self.meta_result(rel, r).map_err(wrap)
    }

    fn write_job(&self, job: FileJob) -> Result<(), ExtractError> {
        let (mut f, fresh) = self.open_file(&job.rel, &job.dst, job.meta.mode)?;
        f.write_all(&job.data).map_err(|source| ExtractError::Write { path: job.rel.clone(), source })?;
        self.finish_file(&f, &job.rel, &job.dst, fresh, job.data.len() as u64, &job.meta)?;
        self.written.fetch_add(job.data.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// A writer thread: takes files until the queue closes; after an error it only empties the
/// queue (the unpacking thread sees the error and stops).
fn writer(ctx: &FileCtx<'_>, shared: &Shared, rx: &Mutex<Receiver<FileJob>>) {
    loop {
        let job = match rx.lock().unwrap().recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        if shared.error.lock().unwrap().is_none() {
            if let Err(e) = ctx.write_job(job) {
                shared.error.lock().unwrap().get_or_insert(e);
            }
        }
        shared.done();
    }
}

struct Unpacker<'a> {
    root: &'a Path,
    ctx: &'a FileCtx<'a>,
    shared: &'a Shared,
    queue: Option<SyncSender<FileJob>>,
    symlinks: HashSet<PathBuf>,
    /// Every path created so far: an entry for one of them again waits for the writers first.
    seen: HashSet<PathBuf>,
    /// Directories whose mode and mtime are set at the end (adding entries changes the mtime,
    /// and a read-only mode would not stop root anyway).
    dirs: Vec<(PathBuf, u32, u64)>,
    stats: ExtractStats,
    /// Big files pass through it, page-aligned for `O_DIRECT`.
    buf: AlignedBuf,
    progress: &'a mut dyn FnMut(u64),
    reported: u64,
}

/// Switches `O_DIRECT` on or off for an open file (`EINVAL` where the filesystem has none).
fn set_direct(f: &File, on: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    cvt(flags)?;
    let flags = if on { flags | libc::O_DIRECT } else { flags & !libc::O_DIRECT };
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) })
}

/// Writes `data`, which starts at an offset of the file and an address that are multiples of
/// [`DIRECT_ALIGN`]: its whole blocks with `O_DIRECT` while `direct`, the rest through the page
/// cache (`direct` is false afterwards unless `data` was whole blocks).
fn write_blocks(f: &mut File, data: &[u8], direct: &mut bool) -> io::Result<()> {
    let aligned = if *direct { data.len() / DIRECT_ALIGN * DIRECT_ALIGN } else { 0 };
    let rest = write_maybe_direct(f, &data[..aligned], direct)?;
    if *direct && aligned < data.len() {
        set_direct(f, false)?;
        *direct = false;
    }
    f.write_all(&data[aligned - rest..])
}

/// Writes `data` (whole aligned blocks) to `f`, with `O_DIRECT` while `direct`; when the
/// kernel refuses a direct write (`EINVAL`: a device with bigger blocks than [`DIRECT_ALIGN`],
/// a short write that left the rest unaligned), `direct` turns false and the bytes not yet
/// written are returned as a count, for the caller to write through the page cache.
fn write_maybe_direct(f: &mut File, data: &[u8], direct: &mut bool) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        match f.write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if *direct && e.raw_os_error() == Some(libc::EINVAL) => {
                set_direct(f, false)?;
                *direct = false;
                return Ok(data.len() - done);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(0)
}

/// The process umask, read without changing it.
fn current_umask() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn lchown(p: &Path, uid: u64, gid: u64) -> io::Result<()> {
    let c = cstr(p)?;
    // SAFETY: c is a valid NUL-terminated path for the duration of the call.
    cvt(unsafe { libc::lchown(c.as_ptr(), uid as libc::uid_t, gid as libc::gid_t) })
}

fn lsetxattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = cstr(p)?;
    let n = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    // SAFETY: both strings are NUL-terminated and the value slice is valid for its length.
    cvt(unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

fn set_symlink_mtime(p: &Path, mtime: u64) -> io::Result<()> {
    let c = cstr(p)?;
    let t = libc::timespec { tv_sec: mtime as _, tv_nsec: 0 };
    let times = [t, t];
    // SAFETY: valid path and a two-element timespec array, as utimensat requires.
    cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

/// Runs `op`; when it fails because a parent directory is missing (archives need not list
/// every directory), creates the parents (0755, as GNU tar does) and runs it once more.
fn with_parents<T>(dst: &Path, mut op: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    match op() {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dst.parent() {
                fs::DirBuilder::new().recursive(true).mode(0o755).create(parent)?;
            }
            op()
        }
        r => r,
    }
}

/// Removes whatever is at `p` unless it is a directory (tar semantics: a later entry replaces
/// an earlier one).
fn remove_non_dir(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

impl Unpacker<'_> {
    fn through_symlink(&self, rel: &Path) -> bool {
        rel.ancestors().skip(1).any(|a| self.symlinks.contains(a))
    }

    /// Waits until the writer threads are done with everything queued; their first error.
    fn drain(&mut self) -> Result<(), ExtractError> {
        self.shared.wait_idle();
        self.shared.take_error()
    }

    fn report(&mut self) {
        let w = self.ctx.written.load(Ordering::Relaxed);
        if w > self.reported {
            (self.progress)(w - self.reported);
            self.reported = w;
        }
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ExtractError> {
        self.shared.take_error()?;
        self.report();
        let name = entry.path().map_err(ExtractError::Read)?.into_owned();
        let rel = sanitize(&name).ok_or_else(|| ExtractError::Unsafe { path: name.display().to_string() })?;
        if self.through_symlink(&rel) {
            return Err(ExtractError::Unsafe { path: name.display().to_string() });
        }
        let kind = entry.header().entry_type();
        // A path seen before (tar semantics: the later entry wins) or a hard link (its target
        // may still be queued): let the writers finish first.
        if !self.seen.insert(rel.clone()) || kind == EntryType::Link {
            self.drain()?;
        }
        let dst = self.root.join(&rel);
        let wrap = |source: io::Error| ExtractError::Write { path: rel.clone(), source };
        let xattrs = self.xattrs(entry)?;
        let h = entry.header();
        let meta = Meta {
            mode: h.mode().map_err(ExtractError::Read)? & 0o7777,
            uid: h.uid().map_err(ExtractError::Read)?,
            gid: h.gid().map_err(ExtractError::Read)?,
            mtime: h.mtime().unwrap_or(0),
            xattrs,
        };
        let (mode, uid, gid, mtime) = (meta.mode, meta.uid, meta.gid, meta.mtime);
        let ctx = self.ctx;

        match kind {
            EntryType::Directory => {
                // Whether we made it just now (as root: then it is root's already).
                let mut fresh = false;
                if rel.as_os_str().is_empty() {
                    // The root itself ("./"): only its metadata.
                } else {
                    match with_parents(&dst, || fs::create_dir(&dst)) {
                        Ok(()) => fresh = true,
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                            if !fs::symlink_metadata(&dst).map_err(wrap)?.is_dir() {
                                fs::remove_file(&dst).map_err(wrap)?;
                                fs::create_dir(&dst).map_err(wrap)?;
                                fresh = true;
                            }
                        }
                        Err(e) => return Err(wrap(e)),
                    }
                }
                if ctx.opts.same_owner && !(fresh && uid == 0 && gid == 0 && ctx.root_creds) {
                    ctx.meta_result(&rel, lchown(&dst, uid, gid)).map_err(wrap)?;
                }
                for (name, value) in &meta.xattrs {
                    ctx.meta_result(&rel, lsetxattr(&dst, name, value)).map_err(wrap)?;
                }
                self.dirs.push((rel.clone(), mode, mtime));
                self.stats.dirs += 1;
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.symlinks.remove(&rel);
                let size = entry.size();
                match &self.queue {
                    Some(queue) if size <= SMALL_FILE => {
                        let mut data = Vec::with_capacity(size as usize);
                        entry.read_to_end(&mut data).map_err(ExtractError::Read)?;
                        self.stats.bytes += data.len() as u64;
                        // Its directories count as seen: an entry that would replace one of
                        // them (say, by a symlink) waits until this file is written.
                        for a in rel.ancestors().skip(1) {
                            if !self.seen.insert(a.to_path_buf()) {
                                break;
                            }
                        }
                        *self.shared.inflight.lock().unwrap() += 1;
                        let job = FileJob { rel: rel.clone(), dst, data, meta };
                        if queue.send(job).is_err() {
                            self.shared.done();
                            return Err(self.shared.take_error().err().unwrap_or(ExtractError::Write {
                                path: rel,
                                source: io::Error::other("the writer threads are gone"),
                            }));
                        }
                    }
                    _ => {
                        let (mut f, fresh) = ctx.open_file(&rel, &dst, mode)?;
                        let n = self.copy(entry, &mut f, &rel)?;
                        ctx.finish_file(&f, &rel, &dst, fresh, n, &meta)?;
                        self.stats.bytes += n;
                    }
                }
                self.stats.files += 1;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(ExtractError::Read)?
                    .ok_or_else(|| ExtractError::Unsafe { path: name.display().to_string() })?;
                remove_non_dir(&dst).map_err(wrap)?;
                with_parents(&dst, || std::os::unix::fs::symlink(&target, &dst)).map_err(wrap)?;
                // A new symlink made as root is root's already.
                if ctx.opts.same_owner && !(uid == 0 && gid == 0 && ctx.root_creds) {
                    ctx.meta_result(&rel, lchown(&dst, uid, gid)).map_err(wrap)?;
                }
                ctx.meta_result(&rel, set_symlink_mtime(&dst, mtime)).map_err(wrap)?;
                self.symlinks.insert(rel.clone());
                self.stats.symlinks += 1;
            }
            EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(ExtractError::Read)?
                    .ok_or_else(|| ExtractError::Unsafe { path: name.display().to_string() })?;
                let trel = sanitize(&target).ok_or_else(|| ExtractError::Unsafe { path: target.display().to_string() })?;
                if self.through_symlink(&trel) || trel.as_os_str().is_empty() {
                    return Err(ExtractError::Unsafe { path: target.display().to_string() });
                }
                if trel != rel {
                    remove_non_dir(&dst).map_err(wrap)?;
                    with_parents(&dst, || fs::hard_link(self.root.join(&trel), &dst)).map_err(wrap)?;
                }
                self.stats.hardlinks += 1;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let major = h.device_major().map_err(ExtractError::Read)?.unwrap_or(0);
                let minor = h.device_minor().map_err(ExtractError::Read)?.unwrap_or(0);
                let ft = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                remove_non_dir(&dst).map_err(wrap)?;
                let c = cstr(&dst).map_err(wrap)?;
                // SAFETY: valid NUL-terminated path; mknod has no other pointer arguments.
                with_parents(&dst, || cvt(unsafe { libc::mknod(c.as_ptr(), ft | mode, libc::makedev(major, minor)) }))
                    .map_err(wrap)?;
                if ctx.opts.same_owner {
                    ctx.meta_result(&rel, lchown(&dst, uid, gid)).map_err(wrap)?;
                }
                ctx.meta_result(&rel, fs::set_permissions(&dst, fs::Permissions::from_mode(mode))).map_err(wrap)?;
                self.stats.other += 1;
            }
            // PAX/GNU headers are consumed by the tar reader; anything else has no place in a
            // root filesystem.
            _ => {}
        }
        Ok(())
    }

    /// Writes a big file: whole aligned blocks with `O_DIRECT` (no copy into the page cache
    /// and nothing left to write back at the end), the unaligned tail through the page cache.
    /// Where the filesystem refuses `O_DIRECT`, everything goes through the page cache.
    fn copy<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, f: &mut File, rel: &Path) -> Result<u64, ExtractError> {
        let werr = |source: io::Error| ExtractError::Write { path: rel.to_path_buf(), source };
        let mut direct = set_direct(f, true).is_ok();
        let mut total = 0u64;
        loop {
            let buf = self.buf.bytes();
            let filled = fill(entry, buf).map_err(ExtractError::Read)?;
            if filled == 0 {
                break;
            }
            write_blocks(f, &buf[..filled], &mut direct).map_err(werr)?;
            total += filled as u64;
            self.ctx.written.fetch_add(filled as u64, Ordering::Relaxed);
            self.report();
            if filled < DIRECT_BLOCK {
                break;
            }
        }
        Ok(total)
    }

    fn xattrs<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<Vec<(String, Vec<u8>)>, ExtractError> {
        let mut out = Vec::new();
        if let Some(exts) = entry.pax_extensions().map_err(ExtractError::Read)? {
            for ext in exts {
                let ext = ext.map_err(ExtractError::Read)?;
                if let Ok(key) = ext.key() {
                    if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                        out.push((name.to_string(), ext.value_bytes().to_vec()));
                    }
                }
            }
        }
        Ok(out)
    }

    fn finish_dirs(&mut self) -> Result<(), ExtractError> {
        // Children before parents, so setting a child's mtime does not touch the parent's again.
        let dirs = std::mem::take(&mut self.dirs);
        for (rel, mode, mtime) in dirs.iter().rev() {
            let dst = self.root.join(rel);
            let wrap = |source: io::Error| ExtractError::Write { path: rel.clone(), source };
            self.ctx.meta_result(rel, fs::set_permissions(&dst, fs::Permissions::from_mode(*mode))).map_err(wrap)?;
            let f = File::open(&dst).map_err(wrap)?;
            self.ctx.meta_result(rel, f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(*mtime))).map_err(wrap)?;
        }
        Ok(())
    }
}

/// Unpacks the tar stream `reader` into `root`. `progress` is called with the number of bytes
/// of file content written since the last call. Small files are written by [`WRITERS`] threads
/// while this one reads on; the result is the same as writing them in archive order.
pub fn unpack<R: Read>(
    reader: R,
    root: &Path,
    opts: &ExtractOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<ExtractStats, ExtractError> {
    let ctx = FileCtx {
        opts,
        umask: current_umask(),
        root_creds: nix::unistd::geteuid().is_root() && nix::unistd::getegid().as_raw() == 0,
        written: AtomicU64::new(0),
    };
    let shared = Shared::default();
    let (queue, jobs) = sync_channel::<FileJob>(QUEUE);
    let jobs = Mutex::new(jobs);
    std::thread::scope(|scope| {
        for _ in 0..WRITERS {
            scope.spawn(|| writer(&ctx, &shared, &jobs));
        }
        let mut u = Unpacker {
            root,
            ctx: &ctx,
            shared: &shared,
            queue: Some(queue),
            symlinks: HashSet::new(),
            seen: HashSet::new(),
            dirs: Vec::new(),
            stats: ExtractStats::default(),
            buf: AlignedBuf::new(DIRECT_BLOCK / DIRECT_ALIGN),
            progress,
            reported: 0,
        };
        let result = (|| {
            let mut archive = tar::Archive::new(reader);
            for entry in archive.entries().map_err(ExtractError::Read)? {
                let mut entry = entry.map_err(ExtractError::Read)?;
                u.entry(&mut entry)?;
            }
            u.drain()?;
            u.finish_dirs()?;
            u.report();
            Ok(u.stats)
        })();
        // Closing the queue ends the writers (also after an error); the scope joins them.
        drop(u.queue.take());
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn header(kind: EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    /// Builds a tar with raw names (the tar builder refuses `..`, but attackers do not).
    fn raw_tar(entries: &[(&str, EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, data, link) in entries {
            let mut h = header(*kind, data.len() as u64, 0o644);
            let bytes = h.as_old_mut();
            bytes.name[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(l) = link {
                bytes.linkname[..l.len()].copy_from_slice(l.as_bytes());
            }
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend_from_slice(&[0u8; 1024]);
        out
    }

    fn opts() -> ExtractOptions {
        ExtractOptions { lenient: vec![], same_owner: nix::unistd::geteuid().is_root() }
    }

    #[test]
    fn sanitize_names() {
        assert_eq!(sanitize(Path::new("./etc/passwd")), Some(PathBuf::from("etc/passwd")));
        assert_eq!(sanitize(Path::new("/etc/passwd")), Some(PathBuf::from("etc/passwd")));
        assert_eq!(sanitize(Path::new("./")), Some(PathBuf::new()));
        assert_eq!(sanitize(Path::new("a/../../b")), None);
    }

    #[test]
    fn unpacks_files_links_and_modes() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = header(EntryType::Directory, 0, 0o755);
        b.append_data(&mut h, "./", io::empty()).unwrap();
        let mut h = header(EntryType::Directory, 0, 0o750);
        b.append_data(&mut h, "./etc/", io::empty()).unwrap();
        let mut h = header(EntryType::Regular, 5, 0o4755);
        b.append_data(&mut h, "./etc/prog", &b"hello"[..]).unwrap();
        let mut h = header(EntryType::Symlink, 0, 0o777);
        b.append_link(&mut h, "./etc/link", "prog").unwrap();
        let mut h = header(EntryType::Link, 0, 0o644);
        b.append_link(&mut h, "./etc/hard", "./etc/prog").unwrap();
        let mut h = header(EntryType::Regular, 3, 0o600);
        b.append_pax_extensions([("SCHILY.xattr.user.test", &b"v1"[..])]).unwrap();
        b.append_data(&mut h, "./etc/xattr", &b"abc"[..]).unwrap();
        let data = b.into_inner().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let mut seen = 0;
        let stats = unpack(&data[..], dir.path(), &opts(), &mut |n| seen += n).unwrap();
        assert_eq!(stats.files, 2);
        assert_eq!(stats.symlinks, 1);
        assert_eq!(stats.hardlinks, 1);
        assert_eq!(stats.bytes, 8);
        assert_eq!(seen, 8);
        let root = dir.path();
        assert_eq!(fs::read(root.join("etc/prog")).unwrap(), b"hello");
        let m = fs::metadata(root.join("etc/prog")).unwrap();
        if opts().same_owner {
            assert_eq!(m.mode() & 0o7777, 0o4755);
        }
        assert_eq!(m.mtime(), 1_700_000_000);
        assert_eq!(m.nlink(), 2);
        assert_eq!(fs::read_link(root.join("etc/link")).unwrap(), Path::new("prog"));
        assert_eq!(fs::metadata(root.join("etc")).unwrap().mode() & 0o7777, 0o750);
        assert_eq!(fs::metadata(root.join("etc")).unwrap().mtime(), 1_700_000_000);
        // user.* xattrs work on tmpfs and ext4; skip the check where the filesystem refuses.
        if let Ok(v) = xattr_get(&root.join("etc/xattr"), "user.test") {
            assert_eq!(v, b"v1");
        }
    }

    fn xattr_get(p: &Path, name: &str) -> io::Result<Vec<u8>> {
        let c = cstr(p)?;
        let n = CString::new(name).unwrap();
        let mut buf = vec![0u8; 64];
        // SAFETY: valid strings and a buffer of the given length.
        let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(r as usize);
        Ok(buf)
    }

    #[test]
    fn refuses_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        fs::create_dir(&root).unwrap();
        let data = raw_tar(&[("a/../../escape", EntryType::Regular, b"x", None)]);
        assert!(matches!(unpack(&data[..], &root, &opts(), &mut |_| {}), Err(ExtractError::Unsafe { .. })));
        assert!(!dir.path().join("escape").exists());
    }

    #[test]
    fn refuses_writing_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = dir.path();
        let target = outside.path().to_str().unwrap().to_string();
        let data = raw_tar(&[("evil", EntryType::Symlink, b"", Some(&target)), ("evil/file", EntryType::Regular, b"x", None)]);
        assert!(matches!(unpack(&data[..], root, &opts(), &mut |_| {}), Err(ExtractError::Unsafe { .. })));
        assert!(!outside.path().join("file").exists());
    }

    #[test]
    fn a_file_replaces_a_symlink_instead_of_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let target = victim.to_str().unwrap().to_string();
        let data = raw_tar(&[("f", EntryType::Symlink, b"", Some(&target)), ("f", EntryType::Regular, b"new", None)]);
        unpack(&data[..], dir.path(), &opts(), &mut |_| {}).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert_eq!(fs::read(dir.path().join("f")).unwrap(), b"new");
    }

    #[test]
    fn a_symlink_over_the_directory_of_a_queued_file_cannot_redirect_it() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().to_str().unwrap().to_string();
        // "a/b" is written by a writer thread (its directory made on the way); then "a"
        // becomes a symlink out of the root. The file must not end up outside.
        let data = raw_tar(&[("a/b", EntryType::Regular, b"x", None), ("a", EntryType::Symlink, b"", Some(&target))]);
        let r = unpack(&data[..], dir.path(), &opts(), &mut |_| {});
        assert!(!outside.path().join("b").exists());
        // "a" is a directory by then, so the symlink cannot replace it.
        assert!(r.is_err());
        assert_eq!(fs::read(dir.path().join("a/b")).unwrap(), b"x");
    }

    #[test]
    fn many_files_through_the_writer_threads() {
        let mut b = tar::Builder::new(Vec::new());
        for i in 0..500u32 {
            let body = vec![(i % 251) as u8; (i as usize * 97) % 5000];
            let mut h = header(EntryType::Regular, body.len() as u64, 0o640);
            b.append_data(&mut h, format!("d{}/f{i}", i % 7), &body[..]).unwrap();
        }
        // The same path twice: the later entry wins.
        let mut h = header(EntryType::Regular, 3, 0o644);
        b.append_data(&mut h, "d0/f0", &b"new"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut seen = 0;
        let stats = unpack(&data[..], dir.path(), &opts(), &mut |n| seen += n).unwrap();
        assert_eq!(stats.files, 501);
        assert_eq!(seen, stats.bytes);
        for i in 1..500u32 {
            let body = fs::read(dir.path().join(format!("d{}/f{i}", i % 7))).unwrap();
            assert_eq!(body, vec![(i % 251) as u8; (i as usize * 97) % 5000]);
        }
        assert_eq!(fs::read(dir.path().join("d0/f0")).unwrap(), b"new");
    }

    /// Content of `n` bytes that differs at every offset of a block (a misplaced block shows).
    fn pattern(n: usize, seed: u32) -> Vec<u8> {
        (0..n as u32).map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8).collect()
    }

    #[test]
    fn big_files_land_whole_through_o_direct_and_the_page_cache() {
        // Sizes around the big-file threshold, the 1 MiB blocks and the 4 KiB alignment.
        let sizes =
            [SMALL_FILE as usize + 1, DIRECT_BLOCK, DIRECT_BLOCK + 1, 2 * DIRECT_BLOCK + DIRECT_ALIGN, 3 * DIRECT_BLOCK + 123];
        let mut b = tar::Builder::new(Vec::new());
        for (i, n) in sizes.iter().enumerate() {
            let mut h = header(EntryType::Regular, *n as u64, 0o644);
            b.append_data(&mut h, format!("big{i}"), &pattern(*n, i as u32)[..]).unwrap();
        }
        let data = b.into_inner().unwrap();
        // A disk filesystem (O_DIRECT) and, where there is one, tmpfs.
        let mut dirs = vec![tempfile::tempdir().unwrap()];
        if Path::new("/dev/shm").is_dir() {
            dirs.push(tempfile::tempdir_in("/dev/shm").unwrap());
        }
        for dir in &dirs {
            let stats = unpack(&data[..], dir.path(), &opts(), &mut |_| {}).unwrap();
            assert_eq!(stats.bytes, sizes.iter().sum::<usize>() as u64);
            for (i, n) in sizes.iter().enumerate() {
                let got = fs::read(dir.path().join(format!("big{i}"))).unwrap();
                assert!(got == pattern(*n, i as u32), "big{i} ({n} bytes) differs in {}", dir.path().display());
            }
        }
    }

    #[test]
    fn a_refused_direct_write_goes_through_the_page_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&path).unwrap();
        let mut direct = set_direct(&f, true).is_ok();
        let was_direct = direct;
        // One byte into a buffer: misaligned for O_DIRECT wherever it checks alignment.
        let buf = pattern(3 * DIRECT_ALIGN + 1, 7);
        let body = &buf[1..];
        let rest = write_maybe_direct(&mut f, &body[..3 * DIRECT_ALIGN], &mut direct).unwrap();
        if was_direct && !direct {
            assert_eq!(rest, 3 * DIRECT_ALIGN, "a refused write wrote nothing");
        }
        f.write_all(&body[3 * DIRECT_ALIGN - rest..]).unwrap();
        drop(f);
        assert_eq!(fs::read(&path).unwrap(), body);
    }

    #[test]
    fn hardlink_target_may_not_escape() {
        let dir = tempfile::tempdir().unwrap();
        let data = raw_tar(&[("h", EntryType::Link, b"", Some("../../etc/passwd"))]);
        assert!(matches!(unpack(&data[..], dir.path(), &opts(), &mut |_| {}), Err(ExtractError::Unsafe { .. })));
    }
}
