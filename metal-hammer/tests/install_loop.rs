//! Install on real loop devices, as root: GPT, mke2fs/mkfs.fat, mounts, the HTTP stream with
//! its checksum, resume and configuration, checked afterwards with `blkid` and by reading the
//! files back. Every loop device and mount is released on drop, also when a test panics.
//!
//! Run: `cargo test -p metal-hammer --test install_loop` (as root; skipped otherwise).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use metal_hammer::install::testing::{compress, compress_frames, sample_big_file, sample_rootfs_tar, ImageServer};
use metal_hammer::install::{install_with, InstallError, InstallOptions};
use metal_hammer::sys::LinuxSys;
use metal_types::{
    AllocationId, BootInfo, Filesystem, FilesystemLayout, FsKind, GptPartition, GptType, Image, ImageFormat, ImageManifest,
    InstallInstructions, LayoutDisk, MachineId, PhoneHomeConfig,
};

/// A loop device over a sparse file, detached on drop.
struct Loop {
    device: PathBuf,
}

impl Loop {
    fn new(dir: &Path, name: &str, size: u64) -> Loop {
        Loop::with_sector_size(dir, name, size, 512)
    }

    fn with_sector_size(dir: &Path, name: &str, size: u64, sector: u32) -> Loop {
        let file = dir.join(name);
        std::fs::File::create(&file).unwrap().set_len(size).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show", "--partscan", "--sector-size", &sector.to_string()])
            .arg(&file)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Loop { device: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()) }
    }

    fn part(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.device.display()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.device).status();
    }
}

/// Lazily unmounts everything below `dir` on drop, deepest first.
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        for m in mounts_below(&self.0).into_iter().rev() {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let dir = dir.canonicalize().unwrap_or(dir.to_path_buf());
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(PathBuf::from))
        .filter(|m| m.starts_with(&dir))
        .collect()
}

fn blkid(dev: &Path, tag: &str) -> String {
    let out = Command::new("blkid").args(["-p", "-s", tag, "-o", "value"]).arg(dev).output().unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// This machine's kernel may lack vfat (then the ESP is made but not mounted).
fn vfat_supported() -> bool {
    std::fs::read_to_string("/proc/filesystems").unwrap().lines().any(|l| l.trim_start_matches("nodev").trim() == "vfat")
}

fn layout() -> FilesystemLayout {
    let esp_mount = vfat_supported().then(|| "/boot/efi".to_string());
    FilesystemLayout {
        id: "efi-root".into(),
        description: String::new(),
        disks: vec![LayoutDisk {
            device: "first".into(),
            partitions: vec![
                GptPartition { number: 1, label: "efi".into(), size_mib: 64, gpt_type: GptType::Efi },
                GptPartition { number: 2, label: "root".into(), size_mib: 384, gpt_type: GptType::Linux },
                GptPartition { number: 3, label: "swap".into(), size_mib: 0, gpt_type: GptType::Swap },
            ],
        }],
        filesystems: vec![
            Filesystem {
                source: "first:1".into(),
                kind: FsKind::Vfat,
                mount: esp_mount,
                label: Some("EFI".into()),
                options: Some("umask=0077".into()),
            },
            Filesystem { source: "first:3".into(), kind: FsKind::Swap, mount: None, label: None, options: None },
            Filesystem {
                source: "first:2".into(),
                kind: FsKind::Ext4,
                mount: Some("/".into()),
                label: Some("root".into()),
                options: None,
            },
        ],
        sizes: vec![],
        images: vec![],
    }
}

fn instructions(url: String, sha256: String, size: u64, format: ImageFormat) -> InstallInstructions {
    InstallInstructions {
        allocation: AllocationId::new_random(),
        hostname: "machine-7".into(),
        image: Image {
            id: "test-os-1".into(),
            url,
            classification: Default::default(),
            expires_at: None,
            manifest: ImageManifest {
                name: "test-os".into(),
                version: "1".into(),
                os: "Test OS".into(),
                format,
                compressed_size: size,
                uncompressed_size: 0,
                sha256,
                kernel: "boot/vmlinuz".into(),
                initrd: "boot/initrd.img".into(),
                cmdline: "console=ttyS0".into(),
                packages: vec![],
            },
        },
        layout: layout(),
        ssh_keys: vec!["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITest test@lab".into()],
        user_data: "{\"expect\":{\"hostname\":\"machine-7\"}}".into(),
        phone_home: PhoneHomeConfig {
            url: "http://10.99.0.1:8080/v1/agent/phone-home".into(),
            token: "t0ken".into(),
            machine: MachineId::new_random(),
        },
    }
}

fn opts() -> InstallOptions {
    let mut o = InstallOptions::default();
    o.fetch.initial_backoff = Duration::from_millis(20);
    o.fetch.max_backoff = Duration::from_millis(100);
    o
}

/// Installs the sample tar image onto a fresh loop device and checks the result.
fn install_tar(dir: &Path, cut: Option<(u64, u64)>) -> (Loop, BootInfo, PathBuf) {
    install_tar_with(dir, cut, None)
}

/// [`install_tar`], the image compressed in frames of `frames.0` bytes and decompressed by
/// `frames.1` threads.
fn install_tar_with(dir: &Path, cut: Option<(u64, u64)>, frames: Option<(usize, usize)>) -> (Loop, BootInfo, PathBuf) {
    let disk = Loop::new(dir, "disk.img", 512 << 20);
    let tar = sample_rootfs_tar();
    let (z, sha) = match frames {
        Some((size, _)) => {
            let (z, sha) = compress_frames(&tar, size);
            assert!(z.len() as u64 > 150_000, "the cut lands inside the image");
            (z, sha)
        }
        None => compress(&tar),
    };
    let mut opts = opts();
    opts.decode_workers = frames.map(|(_, workers)| workers);
    let server = ImageServer::start(z.clone()).unwrap();
    if let Some((after, times)) = cut {
        server.cut(after, times);
    }
    let instr = instructions(server.url("test-os-1.tar.zst"), sha, z.len() as u64, ImageFormat::TarZst);
    let root = dir.join("target");
    let boot = install_with(&LinuxSys, &instr, std::slice::from_ref(&disk.device), &root, &opts, &mut |_| {}).expect("install");
    if let Some((_, times)) = cut {
        assert_eq!(server.ranges.lock().unwrap().len() as u64, times + 1, "one request plus one per cut");
    }
    check_installed(&disk, &boot, &root, &instr);
    (disk, boot, root)
}

fn check_installed(disk: &Loop, boot: &BootInfo, root: &Path, instr: &InstallInstructions) {
    use std::os::unix::fs::MetadataExt;
    // Only the root stays mounted, read-only.
    let root = root.canonicalize().unwrap();
    let mounted = mounts_below(&root);
    assert_eq!(mounted, std::slice::from_ref(&root), "{mounted:?}");
    let table = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let line = table.lines().find(|l| l.split(' ').nth(1) == root.to_str()).unwrap().to_string();
    assert!(line.split(' ').nth(3).unwrap().split(',').any(|o| o == "ro"), "{line}");

    // A partition table, and the filesystems where the layout put them (what a failed install
    // must leave none of: `tar_image_with_a_wrong_checksum_leaves_…`).
    assert_eq!(probe_at(&disk.device, 0), "PTTYPE=gpt");
    assert_eq!(probe_at(&disk.device, 1 << 20), "TYPE=vfat");

    // UUIDs as blkid sees them, in fstab and on the command line.
    let root_uuid = blkid(&disk.part(2), "UUID");
    let esp_uuid = blkid(&disk.part(1), "UUID");
    assert_eq!(boot.root_uuid, root_uuid);
    assert_eq!(boot.cmdline, format!("root=UUID={root_uuid} console=ttyS0"));
    let fstab = std::fs::read_to_string(root.join("etc/fstab")).unwrap();
    assert!(fstab.contains(&format!("UUID={root_uuid}\t/\text4\tdefaults\t0\t1")), "{fstab}");
    if vfat_supported() {
        assert!(fstab.contains(&format!("UUID={esp_uuid}\t/boot/efi\tvfat\tumask=0077\t0\t2")), "{fstab}");
    } else {
        assert!(!fstab.contains(&esp_uuid), "{fstab}");
    }
    assert!(fstab.contains(&format!("UUID={}\tnone\tswap\tsw\t0\t0", blkid(&disk.part(3), "UUID"))), "{fstab}");
    assert_eq!(blkid(&disk.part(3), "TYPE"), "swap");
    assert_eq!(blkid(&disk.part(1), "LABEL"), "EFI");
    assert_eq!(blkid(&disk.part(2), "LABEL"), "root");
    assert_eq!(blkid(&disk.part(1), "TYPE"), "vfat");

    // Files, modes, owners, links.
    assert_eq!(boot.kernel, root.join("boot/vmlinuz-6.1.0-test").display().to_string());
    assert_eq!(std::fs::read(&boot.kernel).unwrap(), b"not really a kernel");
    assert_eq!(std::fs::read(root.join("usr/big.bin")).unwrap(), sample_big_file());
    let su = std::fs::metadata(root.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755);
    let notes = std::fs::metadata(root.join("home/user/notes")).unwrap();
    assert_eq!((notes.uid(), notes.gid(), notes.mode() & 0o777), (1000, 1000, 0o640));
    assert_eq!(std::fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777, 0o1777);
    assert_eq!(std::fs::metadata(root.join("usr/bin/tool")).unwrap().nlink(), 2);
    assert_eq!(std::fs::read_link(root.join("boot/vmlinuz")).unwrap(), Path::new("vmlinuz-6.1.0-test"));

    // Configuration.
    assert_eq!(std::fs::read_to_string(root.join("etc/hostname")).unwrap(), format!("{}\n", instr.hostname));
    assert_eq!(std::fs::read_to_string(root.join("root/.ssh/authorized_keys")).unwrap(), format!("{}\n", instr.ssh_keys[0]));
    assert_eq!(std::fs::metadata(root.join("root/.ssh/authorized_keys")).unwrap().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(root.join("root/.ssh")).unwrap().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(root.join("etc/machine-id")).unwrap().len(), 0);
    assert_eq!(std::fs::read_to_string(root.join("etc/metal/userdata")).unwrap(), instr.user_data);
    let ph: PhoneHomeConfig =
        serde_json::from_str(&std::fs::read_to_string(root.join("etc/metal/phone-home.json")).unwrap()).unwrap();
    assert_eq!(ph, instr.phone_home);
    assert!(root.join("etc/systemd/network/10-metal.network").is_file());

    // The ESP got its files (mount it again to look).
    if !vfat_supported() {
        return;
    }
    let esp = root.parent().unwrap().join("esp");
    std::fs::create_dir_all(&esp).unwrap();
    nix::mount::mount(Some(&disk.part(1)), &esp, Some("vfat"), nix::mount::MsFlags::MS_RDONLY, None::<&str>).unwrap();
    let efi = std::fs::read(esp.join("EFI/BOOT/BOOTX64.EFI"));
    nix::mount::umount(&esp).unwrap();
    assert_eq!(efi.unwrap(), b"MZ efi binary");
}

#[test]
fn tar_image_on_a_loop_device() {
    if !metal_testkit::require(metal_testkit::is_root(), "needs root for loop devices") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_path_buf());
    let (_disk, _, _) = install_tar(dir.path(), None);
}

#[test]
fn tar_image_resumes_after_dropped_connections() {
    if !metal_testkit::require(metal_testkit::is_root(), "needs root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_path_buf());
    let (_disk, _, _) = install_tar(dir.path(), Some((150_000, 3)));
}

#[test]
fn tar_image_in_frames_decompressed_in_parallel_resumes_after_dropped_connections() {
    if !metal_testkit::require(metal_testkit::is_root(), "needs root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_path_buf());
    // Frames of 256 KiB, two decompression threads, the connection cut three times.
    let (_disk, _, _) = install_tar_with(dir.path(), Some((150_000, 3)), Some((256 << 10, 2)));
}

#[test]
fn corrupted_tar_image_fails_with_checksum_error_and_unmounts() {
    if !metal_testkit::require(metal_testkit::is_root(), "needs root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_path_buf());
    let disk = Loop::new(dir.path(), "disk.img", 512 << 20);
    let (mut z, sha) = compress(&sample_rootfs_tar());
    let at = z.len() * 2 / 3;
    z[at] ^= 0x40;
    let server = ImageServer::start(z.clone()).unwrap();
    let instr = instructions(server.url("bad.tar.zst"), sha, z.len() as u64, ImageFormat::TarZst);
    let root = dir.path().join("target");
    let err = install_with(&LinuxSys, &instr, std::slice::from_ref(&disk.device), &root, &opts(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, InstallError::Checksum { .. }), "{err:?}");
    assert!(mounts_below(dir.path()).is_empty(), "nothing stays mounted after a failed install");
}

/// What `blkid -p` finds on `dev` at byte `offset` (`TYPE=…`, `PTTYPE=…` lines), empty when
/// nothing.
fn probe_at(dev: &Path, offset: u64) -> String {
    let out = Command::new("blkid").args(["-p", "-o", "export", "-O", &offset.to_string()]).arg(dev).output().unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("TYPE=") || l.starts_with("PTTYPE="))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn tar_image_with_a_wrong_checksum_leaves_no_partition_table_and_no_filesystem() {
    use std::os::unix::fs::FileExt;
    if !metal_testkit::require(metal_testkit::is_root(), "needs root for loop devices") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_path_buf());
    let size = 512u64 << 20;
    let disk = Loop::new(dir.path(), "disk.img", size);
    // A good image (the ESP's boot loader and the whole tree unpack) with a manifest that
    // names another digest: the mismatch shows only after the last byte.
    let (z, _) = compress(&sample_rootfs_tar());
    let server = ImageServer::start(z.clone()).unwrap();
    let instr = instructions(server.url("test-os-1.tar.zst"), "ab".repeat(32), z.len() as u64, ImageFormat::TarZst);
    let root = dir.path().join("target");
    let err = install_with(&LinuxSys, &instr, std::slice::from_ref(&disk.device), &root, &opts(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, InstallError::Checksum { .. }), "{err:?}");
    assert!(mounts_below(dir.path()).is_empty(), "nothing stays mounted after a failed install");

    let f = std::fs::File::open(&disk.device).unwrap();
    let zeros = |offset: u64, len: usize| {
        let mut buf = vec![0xffu8; len];
        f.read_exact_at(&mut buf, offset).unwrap();
        buf.iter().all(|b| *b == 0)
    };
    assert!(zeros(0, 1 << 20), "protective MBR and primary GPT cleared");
    assert!(zeros(size - (1 << 20), 1 << 20), "backup GPT cleared");
    assert!(gptman::GPT::read_from(&mut &f, 512).is_err(), "no GPT left");
    assert_eq!(probe_at(&disk.device, 0), "", "blkid finds no partition table");
    // Where the layout put the ESP, the root and the swap: no filesystem left to find.
    let plan = metal_hammer::install::gpt::plan(&instr.layout.disks[0].partitions, size, 512).unwrap();
    assert_eq!(plan.partitions.len(), 3);
    for p in &plan.partitions {
        let at = p.first_lba * 512;
        assert_eq!(probe_at(&disk.device, at), "", "partition {} at {at}", p.number);
        assert!(zeros(at, 1 << 20), "partition {} starts with zeros", p.number);
    }
}

#[test]
fn raw_image_on_a_loop_device() {
    if !metal_testkit::require(metal_testkit::is_root(), "needs root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_path_buf());
    // A real disk image: the tar install onto a loop device, read back whole.
    let (src, src_boot, src_root) = install_tar(dir.path(), None);
    nix::mount::umount(&src_root).unwrap();
    let raw = std::fs::read(&src.device).unwrap();
    drop(src);
    let (z, sha) = compress(&raw);
    drop(raw);
    let server = ImageServer::start(z.clone()).unwrap();
    server.cut(1 << 20, 1);
    let disk = Loop::new(dir.path(), "big.img", 768 << 20);
    let mut instr = instructions(server.url("test-os-1.raw.zst"), sha, z.len() as u64, ImageFormat::RawZst);
    instr.hostname = "raw-machine".into();
    let root = dir.path().join("raw-target");
    let boot =
        install_with(&LinuxSys, &instr, std::slice::from_ref(&disk.device), &root, &opts(), &mut |_| {}).expect("raw install");
    // The filesystems are the image's own, found by their superblocks.
    assert_eq!(boot.root_uuid, src_boot.root_uuid);
    assert_eq!(boot.root_uuid, blkid(&disk.part(2), "UUID"));
    let fstab = std::fs::read_to_string(root.join("etc/fstab")).unwrap();
    assert!(fstab.contains(&format!("UUID={}\tnone\tswap", blkid(&disk.part(3), "UUID"))), "{fstab}");
    assert_eq!(std::fs::read_to_string(root.join("etc/hostname")).unwrap(), "raw-machine\n");
    assert_eq!(std::fs::read(root.join("usr/big.bin")).unwrap(), sample_big_file());
    // The backup GPT moved to the end of the bigger disk.
    let mut f = std::fs::File::open(&disk.device).unwrap();
    let gpt = gptman::GPT::read_from(&mut f, 512).unwrap();
    assert_eq!(gpt.header.backup_lba, (768u64 << 20) / 512 - 1);
    nix::mount::umount(&root).unwrap();
}

#[test]
fn corrupted_raw_image_fails_and_clears_the_partition_table() {
    if !metal_testkit::require(metal_testkit::is_root(), "needs root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_path_buf());
    let disk = Loop::new(dir.path(), "disk.img", 64 << 20);
    // A raw image with a GPT, then one flipped bit.
    let mut img = std::io::Cursor::new(vec![0u8; 32 << 20]);
    let parts = [GptPartition { number: 1, label: "data".into(), size_mib: 8, gpt_type: GptType::Linux }];
    let plan = metal_hammer::install::gpt::plan(&parts, 32 << 20, 512).unwrap();
    metal_hammer::install::gpt::write(&mut img, &plan).unwrap();
    let (mut z, sha) = compress(img.get_ref());
    let last = z.len() - 5;
    z[last] ^= 1;
    let server = ImageServer::start(z.clone()).unwrap();
    let instr = instructions(server.url("bad.raw.zst"), sha, z.len() as u64, ImageFormat::RawZst);
    let err = install_with(&LinuxSys, &instr, std::slice::from_ref(&disk.device), &dir.path().join("t"), &opts(), &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, InstallError::Checksum { .. }), "{err:?}");
    let head = std::fs::read(&disk.device).unwrap();
    assert!(head[..1 << 20].iter().all(|b| *b == 0), "the partition table was cleared");
    assert!(mounts_below(dir.path()).is_empty());
}

#[test]
fn bootloader_hook_runs_in_the_installed_root() {
    if !metal_testkit::require(metal_testkit::is_root() && Path::new("/bin/busybox").exists(), "needs root and /bin/busybox") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_path_buf());
    let disk = Loop::new(dir.path(), "disk.img", 512 << 20);
    // A root with a static busybox and a hook that records what it sees.
    let mut b = tar::Builder::new(Vec::new());
    let busybox = std::fs::read("/bin/busybox").unwrap();
    let mut add = |name: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, name, data).unwrap();
    };
    add("bin/busybox", &busybox, 0o755);
    add("boot/vmlinuz", b"kernel", 0o644);
    add("boot/initrd.img", b"initrd", 0o644);
    let hook = "#!/bin/busybox sh\nset -e\n/bin/busybox echo \"disk=$1 path=$PATH\" > /etc/metal/hook.out\n/bin/busybox grep -o '\"root_uuid\": \"[^\"]*\"' /etc/metal/install.json >> /etc/metal/hook.out\n/bin/busybox test -e /proc/self/mounts && /bin/busybox echo proc >> /etc/metal/hook.out\n/bin/busybox test -e \"$1\" && /bin/busybox echo dev >> /etc/metal/hook.out\n/bin/busybox test -d /sys/block && /bin/busybox echo sys >> /etc/metal/hook.out\n";
    add("usr/local/sbin/metal-bootloader-hook", hook.as_bytes(), 0o755);
    let (z, sha) = compress(&b.into_inner().unwrap());
    let server = ImageServer::start(z.clone()).unwrap();
    let instr = instructions(server.url("hook.tar.zst"), sha, z.len() as u64, ImageFormat::TarZst);
    let root = dir.path().join("target");
    let boot = install_with(&LinuxSys, &instr, std::slice::from_ref(&disk.device), &root, &opts(), &mut |_| {}).expect("install");
    let out = std::fs::read_to_string(root.join("etc/metal/hook.out")).unwrap();
    assert_eq!(
        out,
        format!(
            "disk={} path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\"root_uuid\": \"{}\"\nproc\ndev\nsys\n",
            disk.device.display(),
            boot.root_uuid
        )
    );
    // The bind mounts are gone again; only the root is left.
    assert_eq!(mounts_below(dir.path()), [root.canonicalize().unwrap()]);
}

#[test]
fn failing_bootloader_hook_fails_the_install() {
    if !metal_testkit::require(metal_testkit::is_root() && Path::new("/bin/busybox").exists(), "needs root and /bin/busybox") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_path_buf());
    let disk = Loop::new(dir.path(), "disk.img", 512 << 20);
    let mut b = tar::Builder::new(Vec::new());
    let busybox = std::fs::read("/bin/busybox").unwrap();
    for (name, data, mode) in [
        ("bin/busybox", &busybox[..], 0o755),
        ("boot/vmlinuz", &b"kernel"[..], 0o644),
        ("boot/initrd.img", &b"initrd"[..], 0o644),
        ("etc/metal/bootloader-hook", &b"#!/bin/busybox sh\necho grub-install failed >&2\nexit 3\n"[..], 0o755),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, name, data).unwrap();
    }
    let (z, sha) = compress(&b.into_inner().unwrap());
    let server = ImageServer::start(z.clone()).unwrap();
    let instr = instructions(server.url("hook.tar.zst"), sha, z.len() as u64, ImageFormat::TarZst);
    let err = install_with(&LinuxSys, &instr, std::slice::from_ref(&disk.device), &dir.path().join("t"), &opts(), &mut |_| {})
        .unwrap_err();
    assert!(matches!(&err, InstallError::Hook { hook, .. } if hook == "/etc/metal/bootloader-hook"), "{err:?}");
    let chain = format!("{:?}", std::error::Error::source(&err));
    assert!(chain.contains("grub-install failed"), "{chain}");
    assert!(mounts_below(dir.path()).is_empty());
}

#[test]
fn tar_image_on_a_4k_sector_disk() {
    if !metal_testkit::require(metal_testkit::is_root(), "needs root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let _unmount = Unmount(dir.path().to_path_buf());
    let disk = Loop::with_sector_size(dir.path(), "disk4k.img", 1 << 30, 4096);
    let (z, sha) = compress(&sample_rootfs_tar());
    let server = ImageServer::start(z.clone()).unwrap();
    let mut instr = instructions(server.url("test-os-1.tar.zst"), sha, z.len() as u64, ImageFormat::TarZst);
    // FAT32 needs enough clusters: a bigger ESP on 4 KiB sectors.
    instr.layout.disks[0].partitions[0].size_mib = 300;
    instr.layout.disks[0].partitions[1].size_mib = 512;
    let root = dir.path().join("target");
    let boot = install_with(&LinuxSys, &instr, std::slice::from_ref(&disk.device), &root, &opts(), &mut |_| {}).expect("install");
    let mut f = std::fs::File::open(&disk.device).unwrap();
    let gpt = gptman::GPT::read_from(&mut f, 4096).unwrap();
    assert_eq!(gpt.header.first_usable_lba, 6);
    assert_eq!(gpt[1].starting_lba, 256, "1 MiB in 4 KiB sectors");
    assert_eq!(gpt[2].starting_lba, 256 + 300 * 256);
    assert_eq!(boot.root_uuid, blkid(&disk.part(2), "UUID"));
    assert_eq!(blkid(&disk.part(1), "TYPE"), "vfat");
    assert_eq!(std::fs::read(root.join("usr/big.bin")).unwrap(), sample_big_file());
}
