//! `image-builder test-os`: a small OS for the fast end-to-end tests.
//!
//! The root filesystem holds busybox (with its applet links), the Debian kernel and a busybox
//! initramfs in `/boot`, `/sbin/init` (a shell script), the phone-home binary and the verifier
//! `metal-verify`, which compares what metal-hammer wrote (hostname, SSH key, fstab UUID, user
//! data) with the `expect` object in the user data and prints `TEST-OS VERIFY PASS` or
//! `TEST-OS VERIFY FAIL reason=…`. The format of that user data is in `docs/images.md`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use metal_types::{ImageFormat, ImageManifest};

use crate::archive;
use crate::cpio;
use crate::error::{at, Error, Result};
use crate::hammer;
use crate::kmod::KernelDir;
use crate::tools;
use crate::tree::Tree;

pub const NAME: &str = "test-os";
/// Kernel command line of the test OS (metal-hammer adds `root=UUID=…`).
pub const CMDLINE: &str = "console=ttyS0 panic=10";

/// What the test OS's initramfs loads: QEMU's disks and NICs, a few common real ones, ext4.
pub const INITRD_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "nvme",
    "ahci",
    "sd_mod",
    "e1000",
    "e1000e",
    "ext4",
    "crc32c_generic",
];

pub const INITRD_INIT: &str = include_str!("testos/initrd-init.sh");
pub const INIT: &str = include_str!("testos/init.sh");
pub const VERIFY: &str = include_str!("testos/verify.sh");
pub const UDHCPC_SCRIPT: &str = include_str!("testos/udhcpc.sh");

pub struct TestOsOptions {
    pub kernel_dir: PathBuf,
    pub phone_home_bin: PathBuf,
    pub out: PathBuf,
    pub version: String,
    pub zstd_level: i32,
    pub busybox: PathBuf,
}

/// Adds busybox at `bin/busybox` and a link for each applet (`busybox --list-full`), except
/// the paths in `skip`.
pub fn add_busybox(tree: &mut Tree, busybox: &Path, skip: &[&str]) -> Result<()> {
    if !tools::is_static(busybox)? {
        return Err(Error::Invalid(format!("{} is not static: install busybox-static", busybox.display())));
    }
    tree.host_file("bin/busybox", 0o755, busybox)?;
    let out = tools::run(Command::new(busybox).arg("--list-full"))?;
    for applet in String::from_utf8_lossy(&out.stdout).lines().map(str::trim) {
        if applet.is_empty() || applet == "bin/busybox" || skip.contains(&applet) {
            continue;
        }
        tree.symlink(applet, "/bin/busybox")?;
    }
    Ok(())
}

/// The initramfs of the test OS; returns the tree.
pub fn initrd_tree(kernel: &KernelDir, busybox: &Path) -> Result<Tree> {
    let mut tree = Tree::new();
    hammer::add_skeleton(&mut tree)?;
    tree.dir("newroot", 0o755)?;
    add_busybox(&mut tree, busybox, &["linuxrc", "sbin/init"])?;
    let names: Vec<String> = INITRD_MODULES.iter().map(|s| s.to_string()).collect();
    let order = hammer::add_modules(&mut tree, kernel, &names, true)?;
    let mut list = order.join("\n");
    list.push('\n');
    tree.bytes(&format!("lib/modules/{}/load.list", kernel.version), 0o644, list)?;
    tree.bytes("init", 0o755, INITRD_INIT)?;
    Ok(tree)
}

/// The root filesystem of the test OS, with `initrd` (compressed) as `boot/initrd.img`.
pub fn rootfs_tree(kernel: &KernelDir, busybox: &Path, phone_home: &Path, initrd: Vec<u8>, version: &str) -> Result<Tree> {
    let mut tree = Tree::new();
    hammer::add_skeleton(&mut tree)?;
    tree.dir("root", 0o700)?;
    for d in ["var/log", "home", "etc/metal", "usr/local/bin", "lib/modules"] {
        tree.dir(d, 0o755)?;
    }
    add_busybox(&mut tree, busybox, &["linuxrc", "sbin/init"])?;
    tree.bytes("sbin/init", 0o755, INIT)?;
    tree.bytes("usr/local/sbin/metal-verify", 0o755, VERIFY)?;
    if !tools::is_static(phone_home)? {
        return Err(Error::Invalid(format!(
            "{} is dynamically linked; the test OS has no C library: build it with \
             `cargo build -p metal-hammer --release --target x86_64-unknown-linux-musl --bin phone-home`",
            phone_home.display()
        )));
    }
    tree.host_file("usr/local/sbin/metal-phone-home", 0o755, phone_home)?;
    tree.bytes("etc/udhcpc/default.script", 0o755, UDHCPC_SCRIPT)?;
    tree.bytes("etc/hostname", 0o644, "test-os\n")?;
    tree.bytes("etc/hosts", 0o644, "127.0.0.1 localhost\n::1 localhost\n")?;
    tree.bytes("etc/fstab", 0o644, "# written by metal-hammer at install time\n")?;
    tree.bytes("etc/machine-id", 0o444, "")?;
    tree.bytes("etc/passwd", 0o644, "root:x:0:0:root:/root:/bin/sh\n")?;
    tree.bytes("etc/group", 0o644, "root:x:0:\n")?;
    tree.bytes("etc/shadow", 0o600, "root:*:19000:0:99999:7:::\n")?;
    tree.bytes(
        "etc/os-release",
        0o644,
        format!("NAME=\"metal test OS\"\nID=metal-test-os\nVERSION_ID=\"{version}\"\nPRETTY_NAME=\"metal test OS {version}\"\n"),
    )?;
    tree.host_file("boot/vmlinuz", 0o644, &kernel.vmlinuz())?;
    tree.bytes("boot/initrd.img", 0o644, initrd)?;
    add_uefi_boot(&mut tree, Path::new("/").join(crate::os::SYSTEMD_BOOT_EFI).as_path())?;
    Ok(tree)
}

/// Makes the test OS bootable from its disk under UEFI, the way Debian images are: systemd-boot
/// (from the host's `systemd-boot-efi` package) and the bootloader hook metal-hammer runs at
/// install time. Without systemd-boot on the host the image still installs and kexecs, but a
/// reboot cannot boot it from disk; that is said on stderr.
pub fn add_uefi_boot(tree: &mut Tree, systemd_boot: &Path) -> Result<()> {
    if !systemd_boot.is_file() {
        eprintln!(
            "test-os: {} is missing (Debian package systemd-boot-efi): the image will not boot from its disk",
            systemd_boot.display()
        );
        return Ok(());
    }
    tree.host_file(crate::os::SYSTEMD_BOOT_EFI, 0o644, systemd_boot)?;
    let boot = crate::os::Boot { title: "metal test OS", kernel: "boot/vmlinuz", initrd: "boot/initrd.img", cmdline: CMDLINE };
    let hook =
        crate::os::bootloader_hook(&boot).ok_or_else(|| Error::Invalid("test OS command line is not shell-safe".into()))?;
    tree.bytes("usr/local/sbin/metal-bootloader-hook", 0o755, hook)?;
    Ok(())
}

fn dpkg_version(package: &str) -> Option<String> {
    let out = Command::new("dpkg-query").args(["-W", "-f", "${Version}", package]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string()).filter(|v| !v.is_empty())
}

/// Extra payload for a big test OS (memory and size benchmarks): `bytes` of generated files
/// under `/opt/filler` ([`crate::filler`]), published under its own image `name`.
#[derive(Debug, Clone)]
pub struct Filler {
    pub name: String,
    pub bytes: u64,
    pub seed: u64,
}

/// Builds `<out>/test-os-<version>.tar.zst` with its manifest and checksum file.
pub fn build(opts: &TestOsOptions) -> Result<(PathBuf, ImageManifest)> {
    build_with(opts, None)
}

/// [`build`], with filler files added to the root filesystem when `filler` is given; the image
/// is then `<out>/<filler.name>-<version>.tar.zst`.
pub fn build_with(opts: &TestOsOptions, filler: Option<&Filler>) -> Result<(PathBuf, ImageManifest)> {
    let name = filler.map_or(NAME, |f| f.name.as_str());
    let started = Instant::now();
    let kernel = KernelDir::open(&opts.kernel_dir)?;
    if !opts.phone_home_bin.is_file() {
        return Err(Error::Invalid(format!(
            "no phone-home binary at {}: build it with `cargo build -p metal-hammer --release --target x86_64-unknown-linux-musl --bin phone-home`",
            opts.phone_home_bin.display()
        )));
    }
    let busybox = if opts.busybox.is_file() { opts.busybox.clone() } else { tools::require("busybox", "busybox-static")? };
    fs::create_dir_all(&opts.out).map_err(at(&opts.out))?;

    eprintln!("test-os: building the initramfs ({})…", kernel.version);
    let initrd = initrd_tree(&kernel, &busybox)?;
    let mut cpio_bytes = Vec::new();
    cpio::write(&initrd, &mut cpio_bytes).map_err(|e| Error::io("initrd.img", e))?;
    let initrd_zst = zstd_bytes(&cpio_bytes, opts.zstd_level)?;

    eprintln!("test-os: building the root filesystem…");
    let mut tree = rootfs_tree(&kernel, &busybox, &opts.phone_home_bin, initrd_zst, &opts.version)?;
    if let Some(f) = filler {
        let n = crate::filler::add(&mut tree, f.bytes, f.seed)?;
        eprintln!("test-os: {n} filler files, {:.1} MiB, under /{}", f.bytes as f64 / 1048576.0, crate::filler::DIR);
    }
    let file = opts.out.join(format!("{name}-{}.{}", opts.version, ImageFormat::TarZst.extension()));
    let mtime = archive::source_date_epoch();
    let written = archive::write_image_zst(&file, opts.zstd_level, name, |w| archive::write_tar(&tree, w, mtime))?;
    let mut packages = vec![kernel.package().unwrap_or_else(|| format!("linux-image-{}", kernel.version))];
    if let Some(v) = dpkg_version("busybox-static") {
        packages.push(format!("busybox-static {v}"));
    }
    let manifest = ImageManifest {
        name: name.into(),
        version: opts.version.clone(),
        os: format!("metal test OS (busybox, Linux {})", kernel.version),
        format: ImageFormat::TarZst,
        compressed_size: written.compressed_size,
        uncompressed_size: written.uncompressed_size,
        sha256: written.sha256.clone(),
        kernel: "boot/vmlinuz".into(),
        initrd: "boot/initrd.img".into(),
        cmdline: CMDLINE.into(),
        packages,
    };
    let manifest_path = archive::write_manifest(&file, &manifest)?;
    eprintln!(
        "test-os: {} ({:.1} MiB, {:.1} MiB unpacked) and {} in {:.1?}",
        file.display(),
        written.compressed_size as f64 / 1048576.0,
        written.uncompressed_size as f64 / 1048576.0,
        manifest_path.display(),
        started.elapsed()
    );
    Ok((file, manifest))
}

/// zstd-compresses a buffer with the fixed parameters of every artifact (checksum on).
pub fn zstd_bytes(data: &[u8], level: i32) -> Result<Vec<u8>> {
    let mut enc = zstd::Encoder::new(Vec::new(), level).map_err(|e| Error::io("zstd", e))?;
    enc.include_checksum(true).map_err(|e| Error::io("zstd", e))?;
    std::io::Write::write_all(&mut enc, data).map_err(|e| Error::io("zstd", e))?;
    enc.finish().map_err(|e| Error::io("zstd", e))
}
