//! Installing an OS image onto the machine's disks.
//!
//! [`install`] runs these steps, each reported through [`Progress`] as a [`Stage`]:
//!
//! 1. **partition** — a GPT per layout disk ([`gpt`]: 1 MiB aligned, 512- or 4096-byte logical
//!    sectors, protective MBR), then `BLKRRPART` and a wait for the partition nodes.
//! 2. **mkfs** — `mke2fs`, `mkfs.fat`, `mkswap` with UUIDs generated here ([`layout`]), so fstab
//!    and `root=UUID=` are known without `blkid`.
//! 3. **mount** — the filesystems under `mount_root`, parents first.
//! 4. **stream** — HTTP ([`fetch`], resumed with `Range` after a dropped connection) → SHA-256 →
//!    zstd → tar unpacked into `mount_root` ([`extract`]) or, for `raw.zst`, the whole of
//!    `disks[0]` ([`raw`]). No temporary copy anywhere.
//! 5. **configure** — hostname, hosts, fstab, machine-id, SSH keys, user data, phone-home
//!    credential, install record, networkd ([`configure`]).
//! 6. **bootloader** — the image's own hook, in a chroot (see `docs/images.md`).
//!
//! # Fail closed
//!
//! The digest is compared with the manifest's `sha256` after the last byte and before anything
//! is reported. A mismatch (or any error) returns `Err`: the runtime reports the install as
//! failed and never kexecs. Whatever was written is not left bootable either, in both formats:
//! once an install has begun to write a disk (the tar path's partition step, the raw path's
//! stream), its failure ends — after everything is unmounted — by zeroing through [`Sys`] the
//! first and last MiB of that disk (protective MBR, both GPT copies) and the first MiB of every
//! partition its table named (the filesystems' superblocks; [`fail_closed_ranges`]), then a
//! `sync` and a re-read of the empty table. So neither a firmware falling back to the disk nor a
//! boot loader finds the unverified files or image (an ESP's boot loader included); the next
//! boot is a PXE boot into metal-hammer again, which wipes the disks.
//!
//! # What is left mounted
//!
//! On success the root filesystem stays mounted **read-only** at `mount_root`; everything else
//! (other filesystems, the hook's bind mounts) is unmounted and all is synced. The returned
//! [`BootInfo`] names the kernel and initrd as absolute paths under `mount_root`, so the runtime
//! can `kexec_file_load` them directly; after that it may call [`release`] to unmount the root.
//! On failure nothing this function mounted stays mounted.
//!
//! # Raw images
//!
//! A `raw.zst` image is written to `disks[0]` as it is; steps 1–2 are skipped. The layout must
//! describe the image's partitions and filesystems (same numbers, kinds and mount points): their
//! UUIDs are read from the superblocks, then steps 3, 5 and 6 run as for tar images. The backup
//! GPT is moved to the end of the disk; partitions are not grown.

pub mod configure;
pub mod decode;
pub mod extract;
pub mod fetch;
pub mod gpt;
pub mod layout;
pub mod raw;
pub mod testing;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use metal_types::{BootInfo, FsKind, ImageFormat, InstallInstructions};

use crate::sys::{PartitionSpan, Sys};
use decode::Decoded;
use fetch::{Download, FetchCounters, FetchError, FetchOptions};
use layout::LayoutPlan;

/// The steps of an install, as reported in [`Progress::Stage`]. [`Stage::as_str`] gives the
/// serial-console marker name (`METAL-HAMMER stage=<name> …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Partition,
    Mkfs,
    Mount,
    Stream,
    Configure,
    Bootloader,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Partition => "partition",
            Stage::Mkfs => "mkfs",
            Stage::Mount => "mount",
            Stage::Stream => "stream",
            Stage::Configure => "configure",
            Stage::Bootloader => "bootloader",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageStatus {
    Start,
    Ok,
    Error,
}

impl StageStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Start => "start",
            StageStatus::Ok => "ok",
            StageStatus::Error => "error",
        }
    }
}

/// What [`install`] tells its caller while it runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// A step started, finished or failed; `detail` is short `key=value` text for the marker.
    Stage { stage: Stage, status: StageStatus, detail: String },
    /// At most twice a second while the image streams, and once at its end.
    Stream(StreamProgress),
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StreamProgress {
    /// Compressed bytes received (and hashed).
    pub downloaded: u64,
    /// Compressed size from the manifest.
    pub total: u64,
    /// Uncompressed bytes written (file contents for tar, disk bytes for raw).
    pub written: u64,
    /// Average download rate since the stream started, bytes per second.
    pub bytes_per_sec: u64,
    /// Connections dropped and resumed so far.
    pub resumes: u64,
}

/// Why an install failed. The runtime reports the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("invalid install instructions: {0}")]
    Invalid(String),
    #[error("layout does not fit disk {device}")]
    Plan {
        device: PathBuf,
        #[source]
        source: gpt::PlanError,
    },
    #[error("opening disk {device}")]
    OpenDisk {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the partition table of {device}")]
    WriteGpt {
        device: PathBuf,
        #[source]
        source: gptman::Error,
    },
    #[error("re-reading the partition table of {device}")]
    Reread {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("making {kind} on {device}")]
    Mkfs {
        device: PathBuf,
        kind: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("mounting {source_dev} on {target}")]
    Mount {
        source_dev: String,
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("downloading the image")]
    Download(#[source] FetchError),
    #[error("image checksum mismatch: the download has SHA-256 {actual}, the manifest says {expected}")]
    Checksum { expected: String, actual: String },
    #[error("decompressing or reading the image stream")]
    Stream(#[source] io::Error),
    #[error("unpacking the image")]
    Extract(#[source] extract::ExtractError),
    #[error("writing the image to {device}")]
    WriteRaw {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading the filesystem UUID on {device}")]
    ReadUuid {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the image has no usable {what} at {path}")]
    BootFile {
        what: &'static str,
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("writing {} into the installed OS", path.display())]
    Configure {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("running the image's bootloader hook {hook}")]
    Hook {
        hook: String,
        #[source]
        source: io::Error,
    },
    #[error("unmounting {target}")]
    Umount {
        target: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Knobs that tests and benchmarks change; [`install`] uses the defaults.
#[derive(Debug, Clone, Default)]
pub struct InstallOptions {
    pub fetch: FetchOptions,
    /// zstd decompression threads for multi-frame tar images; `None`:
    /// [`decode::default_workers`].
    pub decode_workers: Option<usize>,
    /// The CAs metal-hammer trusts (PEM), written to [`crate::tls::INSTALLED_CA`] for
    /// phone-home; `None` writes no such file.
    pub ca_pem: Option<Vec<u8>>,
}

/// Hook paths inside the image, in the order they are looked for.
pub const BOOTLOADER_HOOKS: [&str; 2] = ["usr/local/sbin/metal-bootloader-hook", "etc/metal/bootloader-hook"];

/// Installs `instr.image` with `instr.layout` onto `disks` (`disks[0]` is the layout's `first`).
/// Blocking; call it from a plain thread or `spawn_blocking`. See the module documentation for
/// the steps, what stays mounted and the fail-closed rule.
pub fn install(
    sys: &dyn Sys,
    instr: &InstallInstructions,
    disks: &[PathBuf],
    mount_root: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<BootInfo, InstallError> {
    install_with(sys, instr, disks, mount_root, &InstallOptions::default(), progress)
}

/// [`install`] with explicit options.
pub fn install_with(
    sys: &dyn Sys,
    instr: &InstallInstructions,
    disks: &[PathBuf],
    mount_root: &Path,
    opts: &InstallOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<BootInfo, InstallError> {
    let manifest = &instr.image.manifest;
    let expected_sha = manifest.sha256.to_ascii_lowercase();
    if expected_sha.len() != 64 || !expected_sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(InstallError::Invalid(format!("image {} has no valid sha256 in its manifest", instr.image.id)));
    }
    if manifest.kernel.trim().is_empty() {
        return Err(InstallError::Invalid(format!("image {} names no kernel", instr.image.id)));
    }
    let mut plan = layout::resolve(&instr.layout, disks).map_err(InstallError::Invalid)?;
    let mut run = Run { sys, mounts: Vec::new(), written: Vec::new(), progress };

    let result = (|| {
        match manifest.format {
            ImageFormat::TarZst => {
                // The download and decompression start now and run ahead while the disks are
                // partitioned and formatted (a core would idle meanwhile), up to PREFETCH_MIB.
                let dl = Download::start(&instr.image.url, manifest.compressed_size, opts.fetch.clone())
                    .map_err(InstallError::Download)?;
                let prefetch = Prefetch {
                    counters: dl.counters.clone(),
                    started: Instant::now(),
                    decoded: Decoded::start_with(dl, PREFETCH_MIB, opts.decode_workers.unwrap_or_else(decode::default_workers))
                        .map_err(InstallError::Stream)?,
                };
                // From here on a failure clears these disks again (see "Fail closed").
                run.written.extend(plan.disks.iter().map(|d| d.device.clone()));
                run.stage(Stage::Partition, || {
                    for d in &plan.disks {
                        partition_disk(sys, d)?;
                    }
                    Ok(format!("disks={}", plan.disks.len()))
                })?;
                run.stage(Stage::Mkfs, || {
                    for fs in &plan.filesystems {
                        let (prog, args) = layout::mkfs_command(fs);
                        let args: Vec<&str> = args.iter().map(String::as_str).collect();
                        sys.run(&layout::find_tool(prog), &args).map_err(|source| InstallError::Mkfs {
                            device: fs.device.clone(),
                            kind: layout::fstype(fs.kind),
                            source,
                        })?;
                    }
                    Ok(format!("filesystems={}", plan.filesystems.len()))
                })?;
                run.mount_all(&plan, mount_root)?;
                run.stream_tar(instr, &plan, mount_root, prefetch, &expected_sha)?;
            }
            ImageFormat::RawZst => {
                run.stream_raw(instr, &mut plan, disks, opts, &expected_sha)?;
                run.mount_all(&plan, mount_root)?;
            }
        }
        let boot = boot_info(instr, &plan, mount_root)?;
        let record = configure::InstallRecord {
            allocation: instr.allocation.to_string(),
            hostname: instr.hostname.clone(),
            image: instr.image.manifest.id(),
            image_url: instr.image.url.clone(),
            image_sha256: expected_sha.clone(),
            layout: instr.layout.id.clone(),
            disks: disks.iter().map(|d| d.display().to_string()).collect(),
            boot: BootInfo {
                root_uuid: boot.root_uuid.clone(),
                kernel: in_os_path(&manifest.kernel),
                initrd: if manifest.initrd.is_empty() { String::new() } else { in_os_path(&manifest.initrd) },
                cmdline: boot.cmdline.clone(),
            },
        };
        run.stage(Stage::Configure, || {
            let mut written = configure::write_all(mount_root, instr, &plan.filesystems, &record)
                .map_err(|(path, source)| InstallError::Configure { path, source })?;
            if let Some(pem) = &opts.ca_pem {
                let rel = PathBuf::from(crate::tls::INSTALLED_CA);
                configure::write_file(mount_root, &rel, pem, 0o644)
                    .map_err(|source| InstallError::Configure { path: rel.clone(), source })?;
                written.push(rel);
            }
            Ok(format!("files={}", written.len()))
        })?;
        run.bootloader_hook(mount_root, disks)?;
        run.finish(&plan, mount_root)?;
        Ok(boot)
    })();
    if result.is_err() {
        run.unmount_all();
        run.clear_written();
    }
    result
}

/// Unmounts the root that a successful [`install`] left mounted (after `kexec_load`, which has
/// read the kernel and initrd into memory).
pub fn release(sys: &dyn Sys, mount_root: &Path) -> io::Result<()> {
    sys.umount(mount_root)
}

fn in_os_path(rel: &str) -> String {
    format!("/{}", rel.trim_start_matches('/'))
}

/// Writes and re-reads the GPT of one disk.
fn partition_disk(sys: &dyn Sys, disk: &layout::DiskPlan) -> Result<(), InstallError> {
    let device = &disk.device;
    let open_err = |source| InstallError::OpenDisk { device: device.clone(), source };
    let mut f = OpenOptions::new().read(true).write(true).open(device).map_err(open_err)?;
    let size = gpt::device_size(&mut f).map_err(open_err)?;
    let ss = gpt::logical_sector_size(&f).map_err(open_err)?;
    let plan = gpt::plan(&disk.partitions, size, ss).map_err(|source| InstallError::Plan { device: device.clone(), source })?;
    gpt::write(&mut f, &plan).map_err(|source| InstallError::WriteGpt { device: device.clone(), source })?;
    f.sync_all().map_err(open_err)?;
    drop(f);
    let spans: Vec<PartitionSpan> = plan
        .partitions
        .iter()
        .map(|p| PartitionSpan {
            number: p.number,
            start: p.first_lba * ss,
            len: p.size_bytes(ss),
            node: gpt::partition_device(device, p.number),
        })
        .collect();
    sys.reread_partitions(device, &spans).map_err(|source| InstallError::Reread { device: device.clone(), source })
}

/// Resolves `rel` inside `root` as if `root` were `/` (symlinks included, absolute ones taken
/// relative to `root`), so the kernel path the image names cannot point outside of it.
pub fn resolve_in_root(root: &Path, rel: &str) -> io::Result<PathBuf> {
    let mut todo: VecDeque<OsString> = Path::new(rel).components().filter_map(normal).collect();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(c) = todo.pop_front() {
        if c == ".." {
            cur.pop();
            continue;
        }
        let cand = cur.join(&c);
        let md = std::fs::symlink_metadata(root.join(&cand))?;
        if md.file_type().is_symlink() {
            hops += 1;
            if hops > 40 {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = std::fs::read_link(root.join(&cand))?;
            if target.is_absolute() {
                cur = PathBuf::new();
            }
            for (i, t) in target.components().filter_map(normal).enumerate() {
                todo.insert(i, t);
            }
        } else {
            cur = cand;
        }
    }
    Ok(root.join(cur))
}

fn normal(c: Component<'_>) -> Option<OsString> {
    match c {
        Component::Normal(n) => Some(n.to_os_string()),
        Component::ParentDir => Some("..".into()),
        _ => None,
    }
}

fn boot_info(instr: &InstallInstructions, plan: &LayoutPlan, mount_root: &Path) -> Result<BootInfo, InstallError> {
    let m = &instr.image.manifest;
    let find = |what: &'static str, rel: &str| -> Result<String, InstallError> {
        let p =
            resolve_in_root(mount_root, rel).map_err(|source| InstallError::BootFile { what, path: rel.to_string(), source })?;
        if !p.is_file() {
            return Err(InstallError::BootFile {
                what,
                path: rel.to_string(),
                source: io::Error::new(io::ErrorKind::InvalidData, "not a regular file"),
            });
        }
        Ok(p.display().to_string())
    };
    let kernel = find("kernel", &m.kernel)?;
    let initrd = if m.initrd.trim().is_empty() { String::new() } else { find("initrd", &m.initrd)? };
    let root_uuid = plan.root().uuid.clone();
    let cmdline = format!("root=UUID={root_uuid} {}", m.cmdline.trim()).trim_end().to_string();
    Ok(BootInfo { root_uuid, kernel, initrd, cmdline })
}

/// MiB that the decompressed image may run ahead of the unpacking while the disks are
/// partitioned and formatted (and during the stream).
const PREFETCH_MIB: usize = 32;

/// A tar image download started before the disks were ready.
struct Prefetch {
    decoded: Decoded<Download>,
    counters: Arc<FetchCounters>,
    started: Instant,
}

/// Throttled stream progress.
struct Reporter<'a> {
    progress: &'a mut dyn FnMut(Progress),
    counters: Arc<FetchCounters>,
    total: u64,
    written: u64,
    started: Instant,
    last: Instant,
}

impl Reporter<'_> {
    fn add(&mut self, n: u64) {
        self.written += n;
        if self.last.elapsed().as_millis() >= 500 {
            self.report();
        }
    }

    fn report(&mut self) {
        self.last = Instant::now();
        let downloaded = self.counters.received.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        (self.progress)(Progress::Stream(StreamProgress {
            downloaded,
            total: self.total,
            written: self.written,
            bytes_per_sec: (downloaded as f64 / secs) as u64,
            resumes: self.counters.resumes.load(Ordering::Relaxed),
        }));
    }
}

/// An install in progress: the seam, what is mounted (in order), the disks it has begun to
/// write (cleared again when it fails), the progress callback.
struct Run<'a> {
    sys: &'a dyn Sys,
    mounts: Vec<PathBuf>,
    written: Vec<PathBuf>,
    progress: &'a mut dyn FnMut(Progress),
}

impl Run<'_> {
    fn emit(&mut self, stage: Stage, status: StageStatus, detail: String) {
        (self.progress)(Progress::Stage { stage, status, detail });
    }

    /// Runs one step between `start` and `ok`/`error` reports.
    fn stage<T>(&mut self, stage: Stage, f: impl FnOnce() -> Result<T, InstallError>) -> Result<T, InstallError>
    where
        T: StageDetail,
    {
        self.emit(stage, StageStatus::Start, String::new());
        match f() {
            Ok(v) => {
                let d = v.detail();
                self.emit(stage, StageStatus::Ok, d);
                Ok(v)
            }
            Err(e) => {
                self.emit(stage, StageStatus::Error, format!("error={:?}", e.to_string()));
                Err(e)
            }
        }
    }

    fn mount(&mut self, source: &str, target: &Path, fstype: &str, flags: u64) -> Result<(), InstallError> {
        self.sys.mount(source, target, fstype, flags, None).map_err(|e| InstallError::Mount {
            source_dev: source.to_string(),
            target: target.to_path_buf(),
            source: e,
        })?;
        self.mounts.push(target.to_path_buf());
        Ok(())
    }

    fn mount_all(&mut self, plan: &LayoutPlan, mount_root: &Path) -> Result<(), InstallError> {
        self.emit(Stage::Mount, StageStatus::Start, String::new());
        let r: Result<(), InstallError> = (|| {
            for fs in plan.mount_order() {
                let m = fs.mount.as_deref().expect("mount_order has mount points");
                let rel = Path::new(m.trim_start_matches('/'));
                let target = mount_root.join(rel);
                let mp_err =
                    |source| InstallError::Mount { source_dev: fs.device.display().to_string(), target: target.clone(), source };
                if rel.as_os_str().is_empty() {
                    std::fs::create_dir_all(mount_root).map_err(mp_err)?;
                } else {
                    configure::check_no_symlinks(mount_root, rel).map_err(mp_err)?;
                    std::fs::create_dir_all(&target).map_err(mp_err)?;
                }
                self.mount(&fs.device.display().to_string(), &target, layout::fstype(fs.kind), 0)?;
            }
            Ok(())
        })();
        match &r {
            Ok(()) => self.emit(Stage::Mount, StageStatus::Ok, format!("mounts={}", self.mounts.len())),
            Err(e) => self.emit(Stage::Mount, StageStatus::Error, format!("error={:?}", e.to_string())),
        }
        r
    }

    /// Unmounts everything, last first; errors are only logged (this is the failure path).
    fn unmount_all(&mut self) {
        while let Some(t) = self.mounts.pop() {
            if let Err(e) = self.sys.umount(&t) {
                tracing::warn!(target = %t.display(), error = %e, "cannot unmount after a failed install");
            }
        }
        self.sys.sync();
    }

    /// The end of a failed install, after [`Run::unmount_all`]: every disk it has begun to write
    /// loses its partition table (both copies) and the start of every partition the table named
    /// ([`fail_closed_ranges`]), so neither firmware nor a bootloader finds the unverified or
    /// half-written tree. Then `sync` and a re-read of the (empty) table. Errors are logged:
    /// this is the failure path, and the next boot wipes the disks anyway.
    fn clear_written(&mut self) {
        for device in std::mem::take(&mut self.written) {
            let (size, partitions) = match table_of(&device) {
                Ok(t) => t,
                Err(e) => {
                    crate::log!("install failed; cannot read {} to clear it: {e}", device.display());
                    continue;
                }
            };
            for (offset, len) in fail_closed_ranges(size, &partitions) {
                if let Err(e) = self.sys.zero_range(&device, offset, len) {
                    crate::log!("install failed; clearing {} at {offset} (+{len}): {e}", device.display());
                }
            }
            self.sys.sync();
            if let Err(e) = self.sys.reread_partitions(&device, &[]) {
                if !crate::wipe::is_unsupported(&e) {
                    crate::log!("install failed; re-reading the cleared table of {}: {e}", device.display());
                }
            }
        }
    }

    fn unmount_to(&mut self, keep: usize) -> Result<(), InstallError> {
        while self.mounts.len() > keep {
            let t = self.mounts.pop().expect("len > keep");
            if let Err(source) = self.sys.umount(&t) {
                self.mounts.push(t.clone());
                return Err(InstallError::Umount { target: t, source });
            }
        }
        Ok(())
    }

    fn stream_tar(
        &mut self,
        instr: &InstallInstructions,
        plan: &LayoutPlan,
        mount_root: &Path,
        prefetch: Prefetch,
        expected: &str,
    ) -> Result<(), InstallError> {
        let m = &instr.image.manifest;
        let lenient = plan
            .filesystems
            .iter()
            .filter(|f| f.kind == FsKind::Vfat)
            .filter_map(|f| f.mount.as_deref())
            .map(|m| PathBuf::from(m.trim_start_matches('/')))
            .collect();
        let eopts = extract::ExtractOptions { lenient, same_owner: nix::unistd::geteuid().is_root() };
        let url = instr.image.url.clone();
        let total = m.compressed_size;
        let progress = &mut *self.progress;
        let mut detail = String::new();
        progress(Progress::Stage { stage: Stage::Stream, status: StageStatus::Start, detail: format!("url={url}") });
        let r = (|| {
            let Prefetch { mut decoded, counters, started } = prefetch;
            let mut rep = Reporter { progress: &mut *progress, counters, total, written: 0, started, last: Instant::now() };
            let unpacked = extract::unpack(&mut decoded, mount_root, &eopts, &mut |n| rep.add(n)).map_err(InstallError::Extract);
            let dl = decoded.into_inner();
            let stats = match unpacked {
                Ok(s) => s,
                Err(e) => return Err(diagnose(e, dl, expected)),
            };
            let digest = dl.finish().map_err(InstallError::Download)?;
            rep.report();
            check_digest(&digest, expected)?;
            detail = format!("files={} bytes={} sha256=ok", stats.files, stats.bytes);
            Ok(())
        })();
        match &r {
            Ok(()) => progress(Progress::Stage { stage: Stage::Stream, status: StageStatus::Ok, detail }),
            Err(e) => progress(Progress::Stage {
                stage: Stage::Stream,
                status: StageStatus::Error,
                detail: format!("error={:?}", e.to_string()),
            }),
        }
        r
    }

    fn stream_raw(
        &mut self,
        instr: &InstallInstructions,
        plan: &mut LayoutPlan,
        disks: &[PathBuf],
        opts: &InstallOptions,
        expected: &str,
    ) -> Result<(), InstallError> {
        let m = &instr.image.manifest;
        let device = disks.first().ok_or_else(|| InstallError::Invalid("no disk for the raw image".into()))?.clone();
        let url = instr.image.url.clone();
        let total = m.compressed_size;
        let fetch = opts.fetch.clone();
        let sys = self.sys;
        let progress = &mut *self.progress;
        progress(Progress::Stage {
            stage: Stage::Stream,
            status: StageStatus::Start,
            detail: format!("url={url} device={}", device.display()),
        });
        self.written.push(device.clone());
        let r: Result<String, InstallError> = (|| {
            let werr = |source| InstallError::WriteRaw { device: device.clone(), source };
            let mut sink = raw::DeviceSink::open(&device).map_err(werr)?;
            let limit = {
                let mut f = std::fs::File::open(&device).map_err(werr)?;
                gpt::device_size(&mut f).map_err(werr)?
            };
            // On failure `clear_written` removes the unverified image's partition table.
            let n = stream_raw_into(&url, total, expected, fetch, &mut sink, limit, &device, &mut *progress)?;
            drop(sink);
            let ss = {
                let f = std::fs::File::open(&device).map_err(werr)?;
                gpt::logical_sector_size(&f).map_err(werr)?
            };
            let spans = raw::relocate_backup_gpt(&device, ss)
                .map_err(|source| InstallError::WriteGpt { device: device.clone(), source })?;
            sys.reread_partitions(&device, &spans).map_err(|source| InstallError::Reread { device: device.clone(), source })?;
            for fs in &mut plan.filesystems {
                fs.uuid = raw::read_fs_uuid(&fs.device, fs.kind)
                    .map_err(|source| InstallError::ReadUuid { device: fs.device.clone(), source })?;
            }
            Ok(format!("bytes={n} sha256=ok"))
        })();
        match r {
            Ok(detail) => {
                progress(Progress::Stage { stage: Stage::Stream, status: StageStatus::Ok, detail });
                Ok(())
            }
            Err(e) => {
                progress(Progress::Stage {
                    stage: Stage::Stream,
                    status: StageStatus::Error,
                    detail: format!("error={:?}", e.to_string()),
                });
                Err(e)
            }
        }
    }

    fn bootloader_hook(&mut self, root: &Path, disks: &[PathBuf]) -> Result<(), InstallError> {
        let hook = BOOTLOADER_HOOKS.iter().find(|h| {
            use std::os::unix::fs::PermissionsExt;
            resolve_in_root(root, h)
                .ok()
                .and_then(|p| std::fs::metadata(p).ok())
                .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        });
        let Some(hook) = hook else {
            return Ok(());
        };
        let hook_in_os = in_os_path(hook);
        self.emit(Stage::Bootloader, StageStatus::Start, format!("hook={hook_in_os}"));
        let keep = self.mounts.len();
        let r = (|| {
            for d in ["dev", "proc", "sys"] {
                let target = root.join(d);
                configure::check_no_symlinks(root, Path::new(d))
                    .and_then(|()| std::fs::create_dir_all(&target))
                    .map_err(|source| InstallError::Mount { source_dev: format!("/{d}"), target: target.clone(), source })?;
                self.mount(&format!("/{d}"), &target, "", libc::MS_BIND)?;
            }
            let disk = disks.first().map(|d| d.display().to_string()).unwrap_or_default();
            self.sys
                .run_in_chroot(root, &hook_in_os, &[&disk])
                .map_err(|source| InstallError::Hook { hook: hook_in_os.clone(), source })?;
            self.unmount_to(keep)
        })();
        match &r {
            Ok(()) => self.emit(Stage::Bootloader, StageStatus::Ok, String::new()),
            Err(e) => self.emit(Stage::Bootloader, StageStatus::Error, format!("error={:?}", e.to_string())),
        }
        r
    }

    /// Unmounts all but the root (each unmount writes its filesystem back), remounts the root
    /// read-only (which writes it back) and forgets it (it stays mounted for the kexec), then
    /// `sync` for the devices' caches.
    fn finish(&mut self, plan: &LayoutPlan, mount_root: &Path) -> Result<(), InstallError> {
        self.unmount_to(1)?;
        let root_dev = plan.root().device.display().to_string();
        self.sys
            .mount(&root_dev, mount_root, "ext4", libc::MS_REMOUNT | libc::MS_RDONLY, None)
            .map_err(|source| InstallError::Mount { source_dev: root_dev, target: mount_root.to_path_buf(), source })?;
        self.sys.sync();
        self.mounts.clear();
        Ok(())
    }
}

/// The raw stream: download → SHA-256 → zstd → `sink` (at most `limit` bytes), made durable,
/// then the digest checked. `Ok` only when every byte arrived, was written, and the digest is
/// `expected`; the number of bytes written. `device` only names the sink in errors.
#[allow(clippy::too_many_arguments)]
pub fn stream_raw_into<S: raw::Sink>(
    url: &str,
    compressed_size: u64,
    expected: &str,
    fetch: FetchOptions,
    sink: &mut S,
    limit: u64,
    device: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<u64, InstallError> {
    let werr = |source| InstallError::WriteRaw { device: device.to_path_buf(), source };
    let dl = Download::start(url, compressed_size, fetch).map_err(InstallError::Download)?;
    let now = Instant::now();
    let mut rep =
        Reporter { progress, counters: dl.counters.clone(), total: compressed_size, written: 0, started: now, last: now };
    let mut decoded = Decoded::start(dl).map_err(InstallError::Stream)?;
    let written = raw::write_raw(&mut decoded, sink, limit, &mut |n| rep.add(n)).map_err(werr);
    let dl = decoded.into_inner();
    let result = match written {
        Ok(n) => dl.finish().map_err(InstallError::Download).and_then(|d| check_digest(&d, expected)).map(|()| n),
        Err(e) => Err(diagnose(e, dl, expected)),
    };
    rep.report();
    result
}

/// What a failed install zeroes on a disk of `size` bytes whose table names `partitions`: the
/// ranges the wipe clears whatever its method ([`crate::wipe::signature_ranges`]: the first MiB
/// with the protective MBR and the primary GPT, the last MiB with the backup GPT, the btrfs
/// mirrors), then the first MiB of every partition (the ext4, vfat and swap superblocks, the
/// vfat backup boot sector), cut to the disk.
pub fn fail_closed_ranges(size: u64, partitions: &[PartitionSpan]) -> Vec<(u64, u64)> {
    let mut out = crate::wipe::signature_ranges(size);
    for p in partitions {
        let len = p.len.min(crate::wipe::MIB).min(size.saturating_sub(p.start));
        if len > 0 {
            out.push((p.start, len));
        }
    }
    out
}

/// The size of `device` and the partitions its GPT names (none when it has no readable GPT).
fn table_of(device: &Path) -> io::Result<(u64, Vec<PartitionSpan>)> {
    let mut f = std::fs::File::open(device)?;
    let size = gpt::device_size(&mut f)?;
    let ss = gpt::logical_sector_size(&f)?;
    Ok((size, raw::read_partitions(&mut f, device, ss).unwrap_or_default()))
}

/// Something that can describe a finished stage in a marker.
trait StageDetail {
    fn detail(&self) -> String;
}

impl StageDetail for String {
    fn detail(&self) -> String {
        self.clone()
    }
}

fn check_digest(digest: &[u8; 32], expected: &str) -> Result<(), InstallError> {
    let actual = hex::encode(digest);
    if actual != expected {
        return Err(InstallError::Checksum { expected: expected.to_string(), actual });
    }
    Ok(())
}

/// A stream that failed half-way: was it the download, corrupt data, or the disk? Reads the
/// rest of the download: a failed download is reported as such, a digest mismatch as a
/// checksum error (corrupt data makes zstd or tar fail before the end), anything else as it was.
fn diagnose(e: InstallError, dl: Download, expected: &str) -> InstallError {
    match dl.finish() {
        Err(fetch) => InstallError::Download(fetch),
        Ok(d) => check_digest(&d, expected).err().unwrap_or(e),
    }
}

#[cfg(test)]
mod tests;
