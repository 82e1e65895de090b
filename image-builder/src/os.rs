//! `image-builder os`: OS images as `tar.zst` and, on request, `raw.zst`.
//!
//! The root filesystem comes from mmdebstrap (a Debian suite with a kernel, systemd, OpenSSH and
//! the distribution's initramfs), from a directory, or from a tarball (e.g. `docker export`).
//! It is read into a [`Tree`], adjusted for provisioning (phone-home binary and unit, DHCP on
//! every Ethernet link with systemd-networkd, no baked SSH host keys or machine-id, no logs),
//! and written as a reproducible tar. The raw image is a GPT disk: an ESP (FAT32, systemd-boot,
//! the kernel and initrd) and an ext4 root made by `mke2fs -d` — no root privileges, no loop
//! device — with UUIDs derived from the image name and version.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, UNIX_EPOCH};

use metal_types::{ImageFormat, ImageManifest};
use sha2::{Digest, Sha256};

use crate::archive;
use crate::error::{at, Error, Result};
use crate::tools;
use crate::tree::{Entry, Kind, Tree};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Formats {
    #[value(name = "tar.zst")]
    Tar,
    #[value(name = "raw.zst")]
    Raw,
    #[value(name = "both")]
    Both,
}

#[derive(Debug, Clone, clap::Args)]
pub struct OsArgs {
    /// Debian suite for mmdebstrap.
    #[arg(long, default_value = "bookworm")]
    pub suite: String,
    /// Image name: `<name>-<version>.<format>`.
    #[arg(long, default_value = "debian-12")]
    pub name: String,
    /// Default: today's date (YYYYMMDD).
    #[arg(long)]
    pub version: Option<String>,
    #[arg(long, default_value = "target/lab/images")]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "tar.zst")]
    pub format: Formats,
    /// Debian mirror; default: the first Debian URI in /etc/apt/sources.list(.d).
    #[arg(long)]
    pub mirror: Option<String>,
    #[arg(long, default_value_t = 9)]
    pub zstd_level: i32,
    /// The static phone-home binary, installed as /usr/local/sbin/metal-phone-home.
    #[arg(long)]
    pub phone_home_bin: Option<PathBuf>,
    /// Use this root filesystem directory instead of mmdebstrap (read only).
    #[arg(long, conflicts_with = "from_tar")]
    pub from_dir: Option<PathBuf>,
    /// Use this root filesystem tarball (any compression GNU tar knows) instead of mmdebstrap.
    #[arg(long)]
    pub from_tar: Option<PathBuf>,
    /// Extra Debian packages (comma separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub include: Vec<String>,
    /// Only the suite itself: no `<suite>-updates` and `<suite>-security` (with them the
    /// image has the current point release and security fixes).
    #[arg(long)]
    pub no_updates: bool,
    /// Default kernel command line of the image (metal-hammer adds root=UUID=…).
    #[arg(long, default_value = "console=tty0 console=ttyS0,115200")]
    pub cmdline: String,
    /// Size of the raw image's root partition in MiB; default: content + 25 % + 256 MiB.
    #[arg(long)]
    pub root_size_mib: Option<u64>,
    /// Work directory (removed afterwards unless --keep-work); default: <out>/.work-<name>-<version>.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    #[arg(long)]
    pub keep_work: bool,
}

/// Packages every Debian image gets.
pub const DEBIAN_PACKAGES: &[&str] = &[
    "linux-image-amd64",
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "initramfs-tools",
    "zstd",
    "iproute2",
    "ca-certificates",
    "systemd-boot-efi",
    "less",
    "procps",
];

pub const PHONE_HOME_UNIT: &str = "\
[Unit]
Description=Report to the metal API that this machine runs its installed OS
Wants=network-online.target
# Phoned Home tells the tenant the machine is ready: report once SSH is up.
After=network-online.target ssh.service
ConditionPathExists=/etc/metal/phone-home.json

[Service]
Type=oneshot
ExecStart=/usr/local/sbin/metal-phone-home
RemainAfterExit=yes
StandardOutput=journal+console

[Install]
WantedBy=multi-user.target
";

/// DHCP on every Ethernet link unless metal-hammer writes something more specific
/// (`10-metal.network` sorts first).
pub const DEFAULT_NETWORK: &str = "[Match]\nType=ether\n\n[Network]\nDHCP=yes\n";

/// sshd generates host keys at first boot instead of every machine sharing the build's. Only
/// Ed25519 and ECDSA: an RSA-3072 key takes seconds to generate on a slow first boot (about
/// 9 s in the QEMU lab), and that wait sits between boot and Phoned Home (the phone-home unit
/// waits for sshd). The list is reset so the keys exist before Debian's own `sshd -t` check runs.
pub const SSH_HOSTKEYS_DROPIN: &str = "[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'test -s /etc/ssh/ssh_host_ed25519_key || exec /usr/bin/ssh-keygen -q -t ed25519 -N \"\" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/bin/sh -c 'test -s /etc/ssh/ssh_host_ecdsa_key || exec /usr/bin/ssh-keygen -q -t ecdsa -N \"\" -f /etc/ssh/ssh_host_ecdsa_key'
ExecStartPre=/usr/sbin/sshd -t
";

/// sshd offers exactly the host keys [`SSH_HOSTKEYS_DROPIN`] makes (without it, it would look
/// for an RSA key too and log that it is missing).
pub const SSHD_HOSTKEYS_CONFIG: &str = "HostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n";

const ESP_MIB: u64 = 256;
/// 1980-01-02: the earliest time a FAT directory entry holds (with a day of margin for time zones).
const FAT_EPOCH: u64 = 315_619_200;
const GPT_ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const GPT_LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// A UUID derived from a seed: the same image name, version and role give the same UUID.
pub fn derived_uuid(seed: &str) -> String {
    let h = Sha256::digest(seed.as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!("{}-{}-{}-{}-{}", &x[..8], &x[8..12], &x[12..16], &x[16..20], &x[20..])
}

/// The first Debian mirror in deb822 `.sources` files or one-line `sources.list` entries
/// (security and updates suites skipped).
pub fn mirror_from_sources(files: &[(String, String)]) -> Option<String> {
    for (name, text) in files {
        if name.ends_with(".sources") {
            for stanza in text.split("\n\n") {
                let field = |k: &str| stanza.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
                let enabled = field("Enabled:").is_none_or(|v| v != "no");
                let debs = field("Types:").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
                let suites = field("Suites:").unwrap_or("");
                if enabled && debs && !suites.contains("security") {
                    if let Some(uri) = field("URIs:").and_then(|u| u.split_whitespace().next()) {
                        return Some(uri.to_string());
                    }
                }
            }
        } else {
            for line in text.lines() {
                let mut w = line.split_whitespace().filter(|w| !w.starts_with('['));
                if w.next() == Some("deb") {
                    if let (Some(uri), Some(suite)) = (w.next(), w.next()) {
                        if !suite.contains("security") && !suite.contains("updates") {
                            return Some(uri.to_string());
                        }
                    }
                }
            }
        }
    }
    None
}

fn default_mirror() -> Option<String> {
    let mut files = Vec::new();
    if let Ok(t) = fs::read_to_string("/etc/apt/sources.list") {
        files.push(("sources.list".to_string(), t));
    }
    if let Ok(dir) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut names: Vec<PathBuf> = dir.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        names.sort();
        for p in names {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("").to_string();
            if name.ends_with(".sources") || name.ends_with(".list") {
                if let Ok(t) = fs::read_to_string(&p) {
                    files.push((name, t));
                }
            }
        }
    }
    mirror_from_sources(&files)
}

/// mmdebstrap's mirror arguments: the suite, and its updates and security suites when asked
/// (the security archive is `<mirror>-security` for deb.debian.org-style mirrors).
pub fn sources(suite: &str, mirror: &str, updates: bool) -> Vec<String> {
    let mirror = mirror.trim_end_matches('/');
    let mut out = vec![format!("deb {mirror} {suite} main")];
    if updates && mirror.ends_with("/debian") {
        out.push(format!("deb {mirror} {suite}-updates main"));
        out.push(format!("deb {mirror}-security {suite}-security main"));
    }
    out
}

/// Kernel and initrd inside a root tree: `boot/vmlinuz-<v>` (highest) with
/// `boot/initrd.img-<v>`, or `boot/vmlinuz` with `boot/initrd.img`.
pub fn find_kernel(tree: &Tree) -> Option<(String, String)> {
    let is_file = |p: &str| matches!(tree.get(p), Some(Entry { kind: Kind::File { .. }, .. }));
    let mut versioned: Vec<&str> =
        tree.children("boot").into_iter().filter(|p| p.starts_with("boot/vmlinuz-") && is_file(p)).collect();
    versioned.sort_by(|a, b| version_cmp(a, b));
    if let Some(kernel) = versioned.last() {
        let v = &kernel["boot/vmlinuz-".len()..];
        let initrd = format!("boot/initrd.img-{v}");
        return Some((kernel.to_string(), if is_file(&initrd) { initrd } else { String::new() }));
    }
    if is_file("boot/vmlinuz") {
        let initrd = if is_file("boot/initrd.img") { "boot/initrd.img".to_string() } else { String::new() };
        return Some(("boot/vmlinuz".to_string(), initrd));
    }
    None
}

/// Compares version-like strings by their numeric runs (`6.1.0-9` < `6.1.0-10`).
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<Result<u64, String>> {
        let mut out = Vec::new();
        let mut cur = String::new();
        for c in s.chars() {
            if !cur.is_empty() && (c.is_ascii_digit() != cur.chars().next().unwrap().is_ascii_digit()) {
                out.push(cur.parse().map_err(|_| cur.clone()));
                cur.clear();
            }
            cur.push(c);
        }
        if !cur.is_empty() {
            out.push(cur.parse().map_err(|_| cur.clone()));
        }
        out
    }
    parts(a).cmp(&parts(b))
}

pub const BOOTLOADER_HOOK: &str = include_str!("os/bootloader-hook.sh");
pub const SYSTEMD_BOOT_EFI: &str = "usr/lib/systemd/boot/efi/systemd-bootx64.efi";

/// How the image boots, for the bootloader hook.
pub struct Boot<'a> {
    pub title: &'a str,
    pub kernel: &'a str,
    pub initrd: &'a str,
    pub cmdline: &'a str,
}

/// The bootloader hook for an image; `None` when a value would break the shell script.
pub fn bootloader_hook(boot: &Boot) -> Option<String> {
    let safe = |v: &str| !v.contains(['"', '$', '`', '\\', '\n']);
    if ![boot.title, boot.kernel, boot.initrd, boot.cmdline].iter().all(|v| safe(v)) {
        return None;
    }
    Some(
        BOOTLOADER_HOOK
            .replace("@KERNEL@", boot.kernel)
            .replace("@INITRD@", boot.initrd)
            .replace("@CMDLINE@", boot.cmdline)
            .replace("@TITLE@", boot.title),
    )
}

/// Adjusts a root tree for provisioning; returns notes on what was done.
pub fn customize(tree: &mut Tree, phone_home: Option<&Path>, boot: Option<&Boot>) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    let systemd = ["lib/systemd/systemd", "usr/lib/systemd/systemd"].iter().any(|p| tree.get(p).is_some());
    if let Some(boot) = boot.filter(|_| tree.get(SYSTEMD_BOOT_EFI).is_some()) {
        let hook = bootloader_hook(boot)
            .ok_or_else(|| Error::Invalid("kernel path, initrd path or command line has a quote, $, ` or \\ in it".into()))?;
        tree.bytes("usr/local/sbin/metal-bootloader-hook", 0o755, hook)?;
        notes.push("metal-bootloader-hook (systemd-boot on the ESP at install)".to_string());
    }
    if let Some(bin) = phone_home {
        if !tools::is_static(bin)? {
            return Err(Error::Invalid(format!("{} is not static; build the musl phone-home", bin.display())));
        }
        tree.host_file("usr/local/sbin/metal-phone-home", 0o755, bin)?;
        if systemd {
            tree.bytes("etc/systemd/system/metal-phone-home.service", 0o644, PHONE_HOME_UNIT)?;
            tree.symlink(
                "etc/systemd/system/multi-user.target.wants/metal-phone-home.service",
                "/etc/systemd/system/metal-phone-home.service",
            )?;
            notes.push("phone-home binary and metal-phone-home.service".to_string());
        } else {
            notes.push("phone-home binary (no systemd: start it from the OS's init)".to_string());
        }
    }
    tree.dir("etc/metal", 0o755)?;
    if systemd {
        tree.bytes("etc/systemd/network/99-metal-default.network", 0o644, DEFAULT_NETWORK)?;
        let networkd = ["lib/systemd/system/systemd-networkd.service", "usr/lib/systemd/system/systemd-networkd.service"]
            .into_iter()
            .find(|p| tree.get(p).is_some());
        if let Some(unit) = networkd {
            let target = format!("/{unit}");
            tree.symlink("etc/systemd/system/multi-user.target.wants/systemd-networkd.service", &target)?;
            tree.symlink("etc/systemd/system/dbus-org.freedesktop.network1.service", &target)?;
            tree.symlink(
                "etc/systemd/system/sockets.target.wants/systemd-networkd.socket",
                &target.replace(".service", ".socket"),
            )?;
            let wait = target.replace("systemd-networkd.service", "systemd-networkd-wait-online.service");
            tree.symlink("etc/systemd/system/network-online.target.wants/systemd-networkd-wait-online.service", &wait)?;
            notes.push("systemd-networkd enabled, DHCP on every Ethernet link".to_string());
        }
    }
    let removed_keys = tree.remove_where(|p| p.starts_with("etc/ssh/ssh_host_"));
    if tree.get("etc/ssh/sshd_config").is_some() && systemd {
        tree.bytes("etc/systemd/system/ssh.service.d/metal-hostkeys.conf", 0o644, SSH_HOSTKEYS_DROPIN)?;
        tree.bytes("etc/ssh/sshd_config.d/metal-hostkeys.conf", 0o644, SSHD_HOSTKEYS_CONFIG)?;
        notes.push(format!("{removed_keys} SSH host key files removed; Ed25519 and ECDSA keys generated at first boot"));
    }
    // mmdebstrap copies the build host's name and resolver; neither belongs in an image.
    if tree.get("etc/hostname").is_some() {
        tree.bytes("etc/hostname", 0o644, "localhost\n")?;
    }
    if matches!(tree.get("etc/resolv.conf"), Some(Entry { kind: Kind::File { .. }, .. })) {
        tree.bytes("etc/resolv.conf", 0o644, "")?;
    }
    if tree.get("etc/machine-id").is_some() {
        tree.bytes("etc/machine-id", 0o444, "")?;
    }
    tree.remove_where(|p| p == "var/lib/dbus/machine-id");
    // Build-time logs and caches: they differ on every build and help no machine.
    let logs = tree.remove_where(|p| {
        (p.starts_with("var/log/") && (p.ends_with(".log") || p.ends_with(".xz") || p.ends_with(".gz")))
            || p == "var/cache/ldconfig/aux-cache"
            || (p.starts_with("var/cache/apt/") && p.ends_with(".bin"))
            || (p.starts_with("var/lib/apt/lists/") && p != "var/lib/apt/lists/partial" && p != "var/lib/apt/lists/lock")
            || p.starts_with("tmp/")
            || p.starts_with("var/tmp/")
    });
    if logs > 0 {
        notes.push(format!("{logs} log/cache entries removed"));
    }
    Ok(notes)
}

fn os_release(rootfs: &Path) -> Option<String> {
    for p in ["etc/os-release", "usr/lib/os-release"] {
        if let Ok(text) = fs::read_to_string(rootfs.join(p)) {
            if let Some(v) = text.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")) {
                return Some(v.trim_matches('"').to_string());
            }
        }
    }
    None
}

fn packages(rootfs: &Path) -> Vec<String> {
    let admin = rootfs.join("var/lib/dpkg");
    if !admin.join("status").is_file() {
        return Vec::new();
    }
    let out = Command::new("dpkg-query")
        .arg(format!("--admindir={}", admin.display()))
        .args(["-W", "-f", "${Package} ${Version}\\n"])
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let mut v: Vec<String> = String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect();
            v.sort();
            v
        }
        _ => Vec::new(),
    }
}

/// Run in the new root after the packages are in: the kernel modules compressed with zstd
/// (kmod loads `.ko.zst`; Debian's 6.1 kernel ships about 400 MB of uncompressed modules, well
/// over half of the image, which every install would otherwise write), the module index and the
/// initramfs made again, and the initramfs checked for the disk drivers it must carry.
const COMPRESS_MODULES: &str = "find /lib/modules -name \"*.ko\" -print0 | xargs -0 -r -n 256 -P 2 zstd -q --rm -9; \
    for d in /lib/modules/*/; do depmod -a \"$(basename \"$d\")\"; done; \
    update-initramfs -u -k all; \
    for i in /boot/initrd.img-*; do for m in virtio_blk nvme ahci ext4; do \
    lsinitramfs \"$i\" | grep -q \"/$m.ko\" || { echo \"$i lacks $m\" >&2; exit 1; }; done; done";

fn mmdebstrap(args: &OsArgs, rootfs: &Path) -> Result<()> {
    let mmdebstrap = tools::require("mmdebstrap", "mmdebstrap")?;
    let mirror = match &args.mirror {
        Some(m) => m.clone(),
        None => default_mirror()
            .ok_or_else(|| Error::Invalid("no Debian mirror in /etc/apt/sources.list(.d): pass --mirror URL".into()))?,
    };
    let packages: Vec<String> = DEBIAN_PACKAGES.iter().map(|s| s.to_string()).chain(args.include.iter().cloned()).collect();
    eprintln!("os: mmdebstrap {} from {mirror} with {} (several minutes)…", args.suite, packages.join(","));
    let mut cmd = Command::new(mmdebstrap);
    cmd.args(["--variant=apt", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", packages.join(",")))
        // The distribution's initramfs: MODULES=most (the default) keeps virtio/nvme/ahci in it.
        .arg("--essential-hook=mkdir -p \"$1/etc/initramfs-tools/conf.d\" && echo MODULES=most > \"$1/etc/initramfs-tools/conf.d/metal.conf\"")
        .arg(format!("--customize-hook=chroot \"$1\" sh -ec '{COMPRESS_MODULES}'"))
        .arg(&args.suite)
        .arg(rootfs)
        .args(sources(&args.suite, &mirror, !args.no_updates))
        .env("SOURCE_DATE_EPOCH", archive::source_date_epoch().to_string());
    let started = Instant::now();
    tools::run_writing(&mut cmd, rootfs)?;
    eprintln!("os: mmdebstrap done in {:.0?}", started.elapsed());
    Ok(())
}

/// Builds the image(s); returns the written image files.
pub fn build(args: &OsArgs) -> Result<Vec<PathBuf>> {
    let started = Instant::now();
    let version = args.version.clone().unwrap_or_else(crate::today);
    let id = format!("{}-{version}", args.name);
    fs::create_dir_all(&args.out).map_err(at(&args.out))?;
    let work = args.work_dir.clone().unwrap_or_else(|| args.out.join(format!(".work-{id}")));
    if work.exists() {
        fs::remove_dir_all(&work).map_err(at(&work))?;
    }
    fs::create_dir_all(&work).map_err(at(&work))?;
    let want_tar = args.format != Formats::Raw;
    let want_raw = args.format != Formats::Tar;

    let result = (|| {
        let rootfs = match (&args.from_dir, &args.from_tar) {
            (Some(dir), _) => dir.clone(),
            (None, Some(tarball)) => {
                let dir = work.join("rootfs");
                fs::create_dir_all(&dir).map_err(at(&dir))?;
                eprintln!("os: extracting {}…", tarball.display());
                let tar = tools::require("tar", "tar")?;
                tools::run_writing(Command::new(tar).arg("--numeric-owner").arg("-xpf").arg(tarball).arg("-C").arg(&dir), &dir)?;
                dir
            }
            (None, None) => {
                let dir = work.join("rootfs");
                mmdebstrap(args, &dir)?;
                dir
            }
        };
        eprintln!("os: reading {}…", rootfs.display());
        let mut tree = Tree::from_dir(&rootfs)?;
        let (kernel, initrd) = find_kernel(&tree).ok_or_else(|| {
            Error::Invalid(format!(
                "no kernel in {} (boot/vmlinuz-<version> or boot/vmlinuz): install one in the root filesystem",
                rootfs.display()
            ))
        })?;
        let os = os_release(&rootfs).unwrap_or_default();
        let title = if os.is_empty() { id.clone() } else { os.clone() };
        let boot = Boot { title: &title, kernel: &kernel, initrd: &initrd, cmdline: &args.cmdline };
        let notes = customize(&mut tree, args.phone_home_bin.as_deref(), Some(&boot))?;
        for n in notes {
            eprintln!("os: {n}");
        }
        let pkgs = packages(&rootfs);
        let mtime = archive::source_date_epoch();

        let tar_path = if want_tar { args.out.join(format!("{id}.tar.zst")) } else { work.join(format!("{id}.tar.zst")) };
        eprintln!(
            "os: writing {} ({} entries, {} MiB of files, zstd -{})…",
            tar_path.display(),
            tree.len(),
            tree.file_bytes() >> 20,
            args.zstd_level
        );
        let written = archive::write_image_zst(&tar_path, args.zstd_level, "tar", |w| archive::write_tar(&tree, w, mtime))?;
        let manifest = |format: ImageFormat, w: &archive::Written| ImageManifest {
            name: args.name.clone(),
            version: version.clone(),
            os: os.clone(),
            format,
            compressed_size: w.compressed_size,
            uncompressed_size: w.uncompressed_size,
            sha256: w.sha256.clone(),
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            cmdline: args.cmdline.clone(),
            packages: pkgs.clone(),
        };
        let mut outputs = Vec::new();
        if want_tar {
            archive::write_manifest(&tar_path, &manifest(ImageFormat::TarZst, &written))?;
            report(&tar_path, &written);
            outputs.push(tar_path.clone());
        }
        if want_raw {
            let raw_path = args.out.join(format!("{id}.raw.zst"));
            let raw = RawSpec {
                id: &id,
                kernel: &kernel,
                initrd: &initrd,
                cmdline: &args.cmdline,
                root_size_mib: args.root_size_mib,
                level: args.zstd_level,
                mtime,
            };
            let w = build_raw(&tar_path, &work, &raw_path, &raw)?;
            archive::write_manifest(&raw_path, &manifest(ImageFormat::RawZst, &w))?;
            report(&raw_path, &w);
            outputs.push(raw_path);
        }
        Ok(outputs)
    })();
    if !args.keep_work {
        let _ = fs::remove_dir_all(&work);
    }
    let outputs = result?;
    eprintln!("os: {id} done in {:.0?}", started.elapsed());
    Ok(outputs)
}

fn report(path: &Path, w: &archive::Written) {
    eprintln!(
        "os: {} — {:.1} MiB ({:.1} MiB uncompressed), sha256 {}",
        path.display(),
        w.compressed_size as f64 / 1048576.0,
        w.uncompressed_size as f64 / 1048576.0,
        w.sha256
    );
}

/// Inputs of a raw disk image.
pub struct RawSpec<'a> {
    pub id: &'a str,
    pub kernel: &'a str,
    pub initrd: &'a str,
    pub cmdline: &'a str,
    pub root_size_mib: Option<u64>,
    pub level: i32,
    pub mtime: u64,
}

fn dir_bytes(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d)? {
            let e = e?;
            let m = fs::symlink_metadata(e.path())?;
            if m.is_dir() {
                stack.push(e.path());
            }
            total += m.len().div_ceil(4096) * 4096;
        }
    }
    Ok(total)
}

fn set_mtime(path: &Path, mtime: u64) -> Result<()> {
    let f = File::options().write(true).open(path).map_err(at(path))?;
    f.set_modified(UNIX_EPOCH + Duration::from_secs(mtime)).map_err(at(path))
}

/// The sfdisk script of the raw image's GPT.
pub fn gpt_script(id: &str, esp_sectors: u64, root_sectors: u64) -> String {
    let esp_start = 2048;
    format!(
        "label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\n\n\
         start={esp_start}, size={esp_sectors}, type={GPT_ESP}, uuid={}, name=\"ESP\"\n\
         start={}, size={root_sectors}, type={GPT_LINUX}, uuid={}, name=\"root\"\n",
        derived_uuid(&format!("{id}/disk")),
        derived_uuid(&format!("{id}/esp-part")),
        esp_start + esp_sectors,
        derived_uuid(&format!("{id}/root-part")),
    )
}

/// Builds `<id>.raw.zst` from the image's tar: GPT, ESP with systemd-boot, ext4 root.
pub fn build_raw(tar_path: &Path, work: &Path, out: &Path, spec: &RawSpec) -> Result<archive::Written> {
    let mke2fs = tools::require("mke2fs", "e2fsprogs")?;
    let mkfs_fat = tools::require("mkfs.fat", "dosfstools")?;
    let mmd = tools::require("mmd", "mtools")?;
    let mcopy = tools::require("mcopy", "mtools")?;
    let sfdisk = tools::require("sfdisk", "fdisk")?;
    let tar = tools::require("tar", "tar")?;

    let staging = work.join("raw-root");
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(at(&staging))?;
    }
    fs::create_dir_all(&staging).map_err(at(&staging))?;
    eprintln!("raw: unpacking the root filesystem…");
    tools::run_writing(
        Command::new(&tar).args(["--numeric-owner", "--zstd", "-xpf"]).arg(tar_path).arg("-C").arg(&staging),
        &staging,
    )?;

    let root_uuid = derived_uuid(&format!("{}/root", spec.id));
    let esp_serial = &derived_uuid(&format!("{}/esp", spec.id)).replace('-', "")[..8];
    let esp_uuid = format!("{}-{}", esp_serial[..4].to_uppercase(), esp_serial[4..].to_uppercase());
    let fstab = format!(
        "# written by image-builder for the raw image\nUUID={root_uuid} / ext4 errors=remount-ro 0 1\nUUID={esp_uuid} /boot/efi vfat umask=0077,nofail 0 2\n"
    );
    let fstab_path = staging.join("etc/fstab");
    if staging.join("etc").is_dir() {
        fs::write(&fstab_path, fstab).map_err(at(&fstab_path))?;
        set_mtime(&fstab_path, spec.mtime)?;
    }
    fs::create_dir_all(staging.join("boot/efi")).map_err(at(&staging))?;

    // ESP: systemd-boot as the removable-media loader, one entry, kernel and initrd.
    let sdboot = [
        staging.join("usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
        PathBuf::from("/usr/lib/systemd/boot/efi/systemd-bootx64.efi"),
    ]
    .into_iter()
    .find(|p| p.is_file())
    .ok_or_else(|| Error::MissingTool { tool: "systemd-bootx64.efi".into(), package: "systemd-boot-efi".into() })?;
    let esp_files = work.join("esp-files");
    fs::create_dir_all(&esp_files).map_err(at(&esp_files))?;
    let loader_conf = esp_files.join("loader.conf");
    fs::write(&loader_conf, "default metal.conf\ntimeout 0\nconsole-mode keep\n").map_err(at(&loader_conf))?;
    let entry = esp_files.join("metal.conf");
    let mut entry_text = format!("title {}\nlinux /vmlinuz\n", spec.id);
    if !spec.initrd.is_empty() {
        entry_text.push_str("initrd /initrd.img\n");
    }
    entry_text.push_str(&format!("options root=UUID={root_uuid} rw {}\n", spec.cmdline));
    fs::write(&entry, entry_text).map_err(at(&entry))?;
    let sdboot_copy = esp_files.join("BOOTX64.EFI");
    fs::copy(&sdboot, &sdboot_copy).map_err(at(&sdboot_copy))?;
    // FAT cannot store times before 1980: clamp, or mtools writes nonsense dates.
    let fat_time = spec.mtime.max(FAT_EPOCH);
    let kernel_copy = esp_files.join("vmlinuz");
    fs::copy(staging.join(spec.kernel), &kernel_copy).map_err(at(&kernel_copy))?;
    let initrd_copy = esp_files.join("initrd.img");
    if !spec.initrd.is_empty() {
        fs::copy(staging.join(spec.initrd), &initrd_copy).map_err(at(&initrd_copy))?;
    }
    for p in [&loader_conf, &entry, &sdboot_copy, &kernel_copy] {
        set_mtime(p, fat_time)?;
    }
    if !spec.initrd.is_empty() {
        set_mtime(&initrd_copy, fat_time)?;
    }
    let esp_img = work.join("esp.img");
    let _ = fs::remove_file(&esp_img);
    tools::run_writing(
        Command::new(mkfs_fat)
            .args(["-F", "32", "-n", "ESP", "-i", esp_serial, "--invariant", "-C"])
            .arg(&esp_img)
            .arg((ESP_MIB * 1024).to_string()),
        &esp_img,
    )?;
    // --invariant fixes every time-based field but also the volume id (1234-ABCD): put ours
    // into the boot sector and its backup (FAT32 BPB offset 0x43, sector 6).
    set_fat_volume_id(&esp_img, u32::from_str_radix(esp_serial, 16).unwrap_or(0))?;
    let mtools_env = |c: &mut Command| {
        c.env("MTOOLS_SKIP_CHECK", "1").env("SOURCE_DATE_EPOCH", fat_time.to_string());
    };
    let mut c = Command::new(&mmd);
    c.arg("-i").arg(&esp_img).args(["::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"]);
    mtools_env(&mut c);
    tools::run(&mut c)?;
    let mut copies: Vec<(PathBuf, &str)> = vec![
        (sdboot_copy, "::/EFI/BOOT/BOOTX64.EFI"),
        (loader_conf, "::/loader/loader.conf"),
        (entry, "::/loader/entries/metal.conf"),
        (kernel_copy, "::/vmlinuz"),
    ];
    if !spec.initrd.is_empty() {
        copies.push((initrd_copy, "::/initrd.img"));
    }
    for (src, dest) in copies {
        let mut c = Command::new(&mcopy);
        c.arg("-m").arg("-i").arg(&esp_img).arg(&src).arg(dest);
        mtools_env(&mut c);
        tools::run_writing(&mut c, &esp_img).map_err(|e| match e {
            Error::Command { stderr, .. } if stderr.contains("Disk full") => {
                Error::Invalid(format!("the {ESP_MIB} MiB ESP cannot hold the kernel and initrd ({})", src.display()))
            }
            e => e,
        })?;
    }

    // Root: ext4 straight from the directory, fixed UUID, hash seed and time.
    let content = dir_bytes(&staging).map_err(at(&staging))?;
    let root_mib = spec.root_size_mib.unwrap_or((content + content / 4) / 1048576 + 256);
    let root_img = work.join("root.img");
    let _ = fs::remove_file(&root_img);
    eprintln!("raw: ext4 root of {root_mib} MiB from {} MiB of files (mke2fs -d)…", content >> 20);
    tools::run_writing(
        Command::new(mke2fs)
            .args(["-q", "-F", "-t", "ext4", "-L", "root", "-U", &root_uuid])
            .arg("-E")
            .arg(format!("hash_seed={root_uuid},lazy_itable_init=0,lazy_journal_init=0"))
            .arg("-d")
            .arg(&staging)
            .arg(&root_img)
            .arg(format!("{root_mib}M"))
            .env("E2FSPROGS_FAKE_TIME", spec.mtime.max(1).to_string()),
        &root_img,
    )
    .map_err(|e| match e {
        Error::Command { stderr, .. } if stderr.contains("Could not allocate block") || stderr.contains("No free space") => {
            Error::Invalid(format!(
                "a {root_mib} MiB root filesystem cannot hold the {} MiB of files: pass a larger --root-size-mib",
                content >> 20
            ))
        }
        e => e,
    })?;
    fix_inode_times(&root_img, &staging, work, spec.mtime)?;
    fs::remove_dir_all(&staging).map_err(at(&staging))?;

    // The disk: 1 MiB for the GPT, the ESP, the root, 1 MiB for the backup GPT.
    let esp_sectors = ESP_MIB * 2048;
    let root_sectors = root_mib * 2048;
    let disk_bytes = (2048 + esp_sectors + root_sectors + 2048) * 512;
    let disk = work.join("disk.raw");
    {
        let f = File::create(&disk).map_err(at(&disk))?;
        f.set_len(disk_bytes).map_err(at(&disk))?;
    }
    let script = gpt_script(spec.id, esp_sectors, root_sectors);
    let mut child = Command::new(&sfdisk)
        .args(["--no-reread", "--no-tell-kernel", "-q", "--wipe", "always"])
        .arg(&disk)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(at(&sfdisk))?;
    child.stdin.take().unwrap().write_all(script.as_bytes()).map_err(at(&sfdisk))?;
    let sf = child.wait_with_output().map_err(at(&sfdisk))?;
    if !sf.status.success() {
        return Err(Error::Command {
            command: "sfdisk".into(),
            status: sf.status.to_string(),
            stderr: String::from_utf8_lossy(&sf.stderr).into(),
        });
    }
    copy_into(&esp_img, &disk, 2048 * 512)?;
    copy_into(&root_img, &disk, (2048 + esp_sectors) * 512)?;
    let _ = fs::remove_file(&esp_img);
    let _ = fs::remove_file(&root_img);

    eprintln!("raw: compressing {} MiB disk…", disk_bytes >> 20);
    let written = archive::write_image_zst(out, spec.level, "raw", |w| {
        let mut f = File::open(&disk)?;
        io::copy(&mut f, w).map(|_| ())
    })?;
    let _ = fs::remove_file(&disk);
    Ok(written)
}

/// `mke2fs -d` copies atime and ctime from the source directory, and those are the times of
/// our extraction (as is the mtime of what we add: `boot/efi`, `etc/fstab`); set all three to
/// `mtime` on every inode with debugfs so the root is reproducible.
fn fix_inode_times(img: &Path, staging: &Path, work: &Path, mtime: u64) -> Result<()> {
    let debugfs = tools::require("debugfs", "e2fsprogs")?;
    let mut paths = vec![String::from("/")];
    let mut stack = vec![(staging.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for e in fs::read_dir(&dir).map_err(at(&dir))? {
            let e = e.map_err(at(&dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let path = format!("{rel}/{name}");
            if e.file_type().map_err(at(&dir))?.is_dir() {
                stack.push((e.path(), path.clone()));
            }
            paths.push(path);
        }
    }
    paths.sort();
    let mut script = String::new();
    let mut skipped = 0;
    for p in &paths {
        if p.contains('"') || p.contains('\n') {
            skipped += 1;
            continue;
        }
        for field in ["atime", "ctime", "mtime"] {
            script.push_str(&format!("sif \"{p}\" {field} @{mtime}\n"));
        }
    }
    if skipped > 0 {
        eprintln!("raw: {skipped} paths with quotes or newlines keep their build-time atime/ctime");
    }
    let script_path = work.join("debugfs-times");
    fs::write(&script_path, script).map_err(at(&script_path))?;
    eprintln!("raw: fixing the times of {} inodes (debugfs)…", paths.len());
    tools::run(
        Command::new(debugfs).arg("-w").arg("-f").arg(&script_path).arg(img).env("E2FSPROGS_FAKE_TIME", mtime.max(1).to_string()),
    )?;
    Ok(())
}

fn set_fat_volume_id(img: &Path, id: u32) -> Result<()> {
    let mut f = File::options().read(true).write(true).open(img).map_err(at(img))?;
    for sector in [0u64, 6] {
        f.seek(SeekFrom::Start(sector * 512 + 0x43)).map_err(at(img))?;
        f.write_all(&id.to_le_bytes()).map_err(at(img))?;
    }
    f.sync_all().map_err(at(img))
}

/// Copies `src` into `dst` at `offset`, leaving all-zero blocks as holes.
fn copy_into(src: &Path, dst: &Path, offset: u64) -> Result<()> {
    let mut input = File::open(src).map_err(at(src))?;
    let mut output = File::options().write(true).open(dst).map_err(at(dst))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = offset;
    loop {
        let n = input.read(&mut buf).map_err(at(src))?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|b| *b != 0) {
            output.seek(SeekFrom::Start(pos)).map_err(at(dst))?;
            output.write_all(&buf[..n]).map_err(at(dst))?;
        }
        pos += n as u64;
    }
    output.sync_all().map_err(at(dst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_derived_and_well_formed() {
        let a = derived_uuid("debian-12-1/root");
        assert_eq!(a, derived_uuid("debian-12-1/root"));
        assert_ne!(a, derived_uuid("debian-12-2/root"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    #[test]
    fn mirrors() {
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_from_sources(&[("debian.sources".into(), deb822.into())]).as_deref(),
            Some("http://deb.debian.org/debian")
        );
        let list = "# x\ndeb http://security.debian.org/ bookworm-security main\ndeb [arch=amd64] http://ftp.de.debian.org/debian bookworm main\n";
        assert_eq!(
            mirror_from_sources(&[("sources.list".into(), list.into())]).as_deref(),
            Some("http://ftp.de.debian.org/debian")
        );
        assert_eq!(mirror_from_sources(&[]), None);
    }

    #[test]
    fn mmdebstrap_sources() {
        assert_eq!(
            sources("bookworm", "http://deb.debian.org/debian/", true),
            [
                "deb http://deb.debian.org/debian bookworm main",
                "deb http://deb.debian.org/debian bookworm-updates main",
                "deb http://deb.debian.org/debian-security bookworm-security main"
            ]
        );
        assert_eq!(sources("bookworm", "http://m/x", true), ["deb http://m/x bookworm main"]);
    }

    #[test]
    fn kernels_are_found() {
        let mut t = Tree::new();
        t.bytes("boot/vmlinuz-6.1.0-9-amd64", 0o644, b"k".to_vec()).unwrap();
        t.bytes("boot/vmlinuz-6.1.0-10-amd64", 0o644, b"k".to_vec()).unwrap();
        t.bytes("boot/initrd.img-6.1.0-10-amd64", 0o644, b"i".to_vec()).unwrap();
        assert_eq!(find_kernel(&t), Some(("boot/vmlinuz-6.1.0-10-amd64".into(), "boot/initrd.img-6.1.0-10-amd64".into())));
        let mut t = Tree::new();
        t.bytes("boot/vmlinuz", 0o644, b"k".to_vec()).unwrap();
        assert_eq!(find_kernel(&t), Some(("boot/vmlinuz".into(), String::new())));
        assert_eq!(find_kernel(&Tree::new()), None);
    }

    #[test]
    fn customize_systemd_tree() {
        let mut t = Tree::new();
        t.bytes("usr/lib/systemd/systemd", 0o755, b"x".to_vec()).unwrap();
        t.bytes("usr/lib/systemd/system/systemd-networkd.service", 0o644, b"x".to_vec()).unwrap();
        t.bytes("etc/ssh/sshd_config", 0o644, b"x".to_vec()).unwrap();
        t.bytes("etc/ssh/ssh_host_ed25519_key", 0o600, b"secret".to_vec()).unwrap();
        t.bytes("etc/machine-id", 0o444, b"0123456789abcdef0123456789abcdef\n".to_vec()).unwrap();
        t.bytes("var/log/dpkg.log", 0o644, b"x".to_vec()).unwrap();
        t.bytes(SYSTEMD_BOOT_EFI, 0o644, b"efi".to_vec()).unwrap();
        let boot = Boot {
            title: "Debian",
            kernel: "boot/vmlinuz-6.1.0-9-amd64",
            initrd: "boot/initrd.img-6.1.0-9-amd64",
            cmdline: "console=ttyS0",
        };
        customize(&mut t, None, Some(&boot)).unwrap();
        let Kind::File { data: crate::tree::Data::Bytes(hook), .. } =
            &t.get("usr/local/sbin/metal-bootloader-hook").unwrap().kind
        else {
            panic!()
        };
        let hook = String::from_utf8(hook.clone()).unwrap();
        assert!(hook.contains("kernel=\"boot/vmlinuz-6.1.0-9-amd64\"") && !hook.contains('@'), "{hook}");
        assert!(t.get("etc/ssh/ssh_host_ed25519_key").is_none());
        assert!(t.get("etc/systemd/system/ssh.service.d/metal-hostkeys.conf").is_some());
        let Kind::File { data: crate::tree::Data::Bytes(keys), .. } =
            &t.get("etc/ssh/sshd_config.d/metal-hostkeys.conf").unwrap().kind
        else {
            panic!()
        };
        let keys = String::from_utf8(keys.clone()).unwrap();
        assert!(keys.contains("ssh_host_ed25519_key") && !keys.contains("rsa"), "{keys}");
        assert!(!SSH_HOSTKEYS_DROPIN.contains("-A") && SSH_HOSTKEYS_DROPIN.contains("-t ed25519"));
        assert!(matches!(&t.get("etc/machine-id").unwrap().kind, Kind::File { size: 0, .. }));
        assert!(t.get("var/log/dpkg.log").is_none());
        assert_eq!(
            t.get("etc/systemd/system/multi-user.target.wants/systemd-networkd.service").unwrap().kind,
            Kind::Symlink("/usr/lib/systemd/system/systemd-networkd.service".into())
        );
        assert!(t.get("etc/systemd/network/99-metal-default.network").is_some());
    }

    #[test]
    fn hook_refuses_shell_metacharacters() {
        let boot = Boot { title: "x", kernel: "boot/vmlinuz", initrd: "", cmdline: "console=ttyS0 $(reboot)" };
        assert!(bootloader_hook(&boot).is_none());
    }

    #[test]
    fn gpt_script_is_fixed() {
        let s = gpt_script("x-1", 524288, 2048000);
        assert!(s.contains("start=2048, size=524288, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B"));
        assert!(s.contains("start=526336, size=2048000, type=0FC63DAF"));
        assert_eq!(s, gpt_script("x-1", 524288, 2048000));
    }

    #[test]
    fn versions_compare_numerically() {
        assert!(version_cmp("6.1.0-9", "6.1.0-10").is_lt());
        assert!(version_cmp("5.10", "6.1").is_lt());
    }
}
