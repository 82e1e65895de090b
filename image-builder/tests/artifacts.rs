//! Builds the metal-hammer initramfs and the test OS from the kernel cache and checks what is
//! inside: `/init`, modules with all their dependencies, consistent `modules.dep`/`modules.alias`,
//! tools that run with their libraries, manifest and checksum, byte-for-byte reproducibility.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use image_builder::cpio::{self, Member};
use image_builder::{archive, hammer, kmod, testos};

/// Levels used in tests: reproducibility does not depend on the level, and level 3 is fast in
/// an unoptimised build.
const LEVEL: i32 = 3;

struct Built {
    _dir: tempfile::TempDir,
    hammer: PathBuf,
    test_os: PathBuf,
    test_os_manifest: metal_types::ImageManifest,
}

fn build_hammer(out: &Path) {
    let (init, _) = common::hammer_init();
    let opts = hammer::HammerOptions {
        kernel_dir: common::kernel().root,
        hammer_bin: init,
        out: out.to_path_buf(),
        extra_modules: vec![],
        zstd_level: LEVEL,
        ca_files: vec![],
    };
    hammer::build(&opts).expect("hammer build");
}

fn test_os_options(out: &Path) -> testos::TestOsOptions {
    testos::TestOsOptions {
        kernel_dir: common::kernel().root,
        phone_home_bin: common::phone_home_bin(),
        out: out.to_path_buf(),
        version: "7".into(),
        zstd_level: LEVEL,
        busybox: "/usr/bin/busybox".into(),
    }
}

fn build_test_os(out: &Path) -> (PathBuf, metal_types::ImageManifest) {
    testos::build(&test_os_options(out)).expect("test-os build")
}

fn built() -> &'static Built {
    static B: OnceLock<Built> = OnceLock::new();
    B.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        build_hammer(&dir.path().join("hammer"));
        let (test_os, test_os_manifest) = build_test_os(&dir.path().join("images"));
        Built { hammer: dir.path().join("hammer"), test_os, test_os_manifest, _dir: dir }
    })
}

fn by_name(members: &[Member]) -> BTreeMap<&str, &Member> {
    members.iter().map(|m| (m.name.as_str(), m)).collect()
}

/// Checks modules.dep/modules.alias in an archive against the modules it holds; returns the
/// module names.
fn check_modules(files: &BTreeMap<&str, &Member>, version: &str) -> BTreeSet<String> {
    let base = format!("lib/modules/{version}");
    let dep = String::from_utf8(files[format!("{base}/modules.dep").as_str()].data.clone()).unwrap();
    let index = kmod::ModuleIndex::parse(&dep, "").unwrap();
    let in_archive: BTreeSet<&str> =
        files.keys().filter_map(|n| n.strip_prefix(&format!("{base}/"))).filter(|n| n.ends_with(".ko")).collect();
    for (module, deps) in &index.deps {
        assert!(in_archive.contains(module.as_str()), "modules.dep names {module}, not in the archive");
        for d in deps {
            assert!(in_archive.contains(d.as_str()), "{module} needs {d}, not in the archive");
        }
    }
    for m in &in_archive {
        assert!(index.deps.contains_key(*m), "{m} is in the archive but not in modules.dep");
    }
    // Every dependency the full kernel's modules.dep lists is included.
    let full = kmod::ModuleIndex::load(&common::kernel().modules_dir()).unwrap();
    for m in &in_archive {
        for d in &full.deps[*m] {
            assert!(in_archive.contains(d.as_str()), "{m} needs {d} (full modules.dep), missing");
        }
    }
    let names: BTreeSet<String> = index.by_name.keys().cloned().collect();
    let alias = String::from_utf8(files[format!("{base}/modules.alias").as_str()].data.clone()).unwrap();
    let mut alias_lines = 0;
    for line in alias.lines().filter(|l| l.starts_with("alias ")) {
        let module = line.split_whitespace().nth(2).unwrap();
        assert!(names.contains(module), "modules.alias names {module}, not included");
        alias_lines += 1;
    }
    assert!(alias_lines > 100, "only {alias_lines} aliases");
    names
}

#[test]
fn hammer_initramfs_has_init_modules_tools_and_certificates() {
    let b = built();
    let initrd = b.hammer.join("initrd.img");
    let size = fs::metadata(&initrd).unwrap().len();
    assert!(size < 40 << 20, "initrd.img is {size} bytes, over 40 MiB");
    assert!(fs::metadata(b.hammer.join("vmlinuz")).unwrap().len() > 1 << 20);
    let cpio_bytes = common::zstd_decode(&initrd);
    let members = cpio::list(&cpio_bytes).unwrap();
    let files = by_name(&members);

    let init = files["init"];
    assert_eq!(init.mode, 0o100755);
    assert!(init.data.starts_with(b"\x7fELF"));
    assert_eq!(files["dev/console"].mode & 0o170000, 0o020000);
    assert_eq!(files["dev/console"].rdev, (5, 1));
    assert_eq!(files["dev/null"].rdev, (1, 3));
    for d in ["proc", "sys", "dev", "run", "tmp", "mnt"] {
        assert_eq!(files[d].mode & 0o170000, 0o040000, "{d}");
    }
    assert!(members.iter().all(|m| m.mtime == 0 && m.uid == 0 && m.gid == 0));
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "entries are sorted");

    let modules = check_modules(&files, &common::kernel().version);
    for m in [
        "virtio_pci",
        "virtio_blk",
        "virtio_net",
        "virtio_scsi",
        "nvme",
        "ahci",
        "ata_piix",
        "sd_mod",
        "e1000",
        "e1000e",
        "igb",
        "ixgbe",
        "i40e",
        "ice",
        "mlx5_core",
        "bnxt_en",
        "tg3",
        "r8169",
        "ext4",
        "vfat",
        "jbd2",
        "crc32c_generic",
        "nls_cp437",
    ] {
        assert!(modules.contains(m), "module {m} missing");
    }

    for tool in [
        "usr/sbin/mke2fs",
        "usr/sbin/mkfs.fat",
        "usr/sbin/mkswap",
        "lib64/ld-linux-x86-64.so.2",
        "etc/mke2fs.conf",
        "etc/ssl/certs/ca-certificates.crt",
    ] {
        assert!(files.contains_key(tool), "{tool} missing");
    }
    assert_eq!(files["usr/sbin/mkfs.ext4"].data, b"mke2fs");

    // The tools run inside the initramfs with only what it carries.
    if metal_testkit::require(metal_testkit::is_root(), "running the initramfs tools in a chroot needs root") {
        let root = tempfile::tempdir().unwrap();
        common::extract_cpio(&members, root.path());
        for (tool, arg) in [("/usr/sbin/mke2fs", "-V"), ("/usr/sbin/mkfs.fat", "--help"), ("/usr/sbin/mkswap", "--version")] {
            let out = Command::new("chroot").arg(root.path()).arg(tool).arg(arg).output().unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(!text.contains("error while loading shared libraries") && !text.contains("No such file"), "{tool}: {text}");
        }
        let out = Command::new("chroot")
            .arg(root.path())
            .args(["/usr/sbin/mkfs.ext4", "-q", "-F", "/tmp/fs.img", "8M"])
            .output()
            .unwrap();
        assert!(out.status.success(), "mkfs.ext4 in the initramfs: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn hammer_build_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    build_hammer(dir.path());
    let a = fs::read(built().hammer.join("initrd.img")).unwrap();
    let b = fs::read(dir.path().join("initrd.img")).unwrap();
    assert!(a == b, "two initramfs builds differ");
    assert_eq!(fs::read(built().hammer.join("vmlinuz")).unwrap(), fs::read(dir.path().join("vmlinuz")).unwrap());
}

#[test]
fn test_os_manifest_checksum_and_contents() {
    let b = built();
    let m = &b.test_os_manifest;
    assert_eq!(b.test_os.file_name().unwrap(), "test-os-7.tar.zst");
    assert_eq!(m.id(), "test-os-7");
    assert_eq!(m.sha256, archive::sha256_file(&b.test_os).unwrap());
    assert_eq!(m.compressed_size, fs::metadata(&b.test_os).unwrap().len());
    let on_disk = archive::read_manifest(&b.test_os.with_file_name("test-os-7.tar.zst.json")).unwrap();
    assert_eq!(&on_disk, m);
    let sums = fs::read_to_string(b.test_os.with_file_name("test-os-7.tar.zst.sha256")).unwrap();
    assert_eq!(sums, format!("{}  test-os-7.tar.zst\n", m.sha256));
    assert_eq!(
        (m.kernel.as_str(), m.initrd.as_str(), m.cmdline.as_str()),
        ("boot/vmlinuz", "boot/initrd.img", "console=ttyS0 panic=10")
    );

    let tar_bytes = common::zstd_decode(&b.test_os);
    assert_eq!(tar_bytes.len() as u64, m.uncompressed_size);
    let mut entries = BTreeMap::new();
    let mut ar = tar::Archive::new(tar_bytes.as_slice());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().trim_end_matches('/').to_string();
        assert_eq!(e.header().mtime().unwrap(), 0, "{path}");
        assert_eq!(e.header().username().unwrap(), Some(""), "{path}");
        let link = e.link_name().unwrap().map(|l| l.to_string_lossy().into_owned());
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        entries.insert(path, (e.header().mode().unwrap(), link, data));
    }
    for p in [
        "sbin/init",
        "usr/local/sbin/metal-phone-home",
        "usr/local/sbin/metal-verify",
        "bin/busybox",
        "boot/vmlinuz",
        "boot/initrd.img",
        "etc/udhcpc/default.script",
    ] {
        let (mode, _, data) = entries.get(p).unwrap_or_else(|| panic!("{p} missing"));
        assert!(!data.is_empty(), "{p} empty");
        if p != "boot/vmlinuz" && p != "boot/initrd.img" {
            assert_eq!(mode & 0o111, 0o111, "{p} not executable");
        }
    }
    assert_eq!(entries["bin/sh"].1.as_deref(), Some("/bin/busybox"));
    assert_eq!(entries["etc/machine-id"].2, b"");
    assert!(String::from_utf8_lossy(&entries["sbin/init"].2).contains("TEST-OS booted"));

    // The initramfs inside: /init, and modules listed in an order insmod accepts.
    let initrd = zstd::decode_all(entries["boot/initrd.img"].2.as_slice()).unwrap();
    let members = cpio::list(&initrd).unwrap();
    let files = by_name(&members);
    assert!(String::from_utf8_lossy(&files["init"].data).contains("switch_root"));
    let version = common::kernel().version;
    check_modules(&files, &version);
    let list = String::from_utf8(files[format!("lib/modules/{version}/load.list").as_str()].data.clone()).unwrap();
    let dep = String::from_utf8(files[format!("lib/modules/{version}/modules.dep").as_str()].data.clone()).unwrap();
    let index = kmod::ModuleIndex::parse(&dep, "").unwrap();
    let order: Vec<&str> = list.lines().collect();
    for (i, m) in order.iter().enumerate() {
        for d in &index.deps[*m] {
            let at = order.iter().position(|o| o == d).unwrap_or_else(|| panic!("{d} not in load.list"));
            assert!(at < i, "{m} loads before its dependency {d}");
        }
    }
    let names: BTreeSet<String> = order.iter().map(|m| kmod::module_name(m)).collect();
    for m in ["virtio_blk", "virtio_net", "virtio_pci", "ext4", "crc32c_generic"] {
        assert!(names.contains(m), "{m} not loaded by the test OS initramfs");
    }
}

#[test]
fn test_os_with_filler_is_named_sized_and_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let filler = testos::Filler { name: "test-os-big".into(), bytes: 6 << 20, seed: 3 };
    let build = |out: &Path| testos::build_with(&test_os_options(out), Some(&filler)).expect("test-os build with filler");
    let (file, m) = build(&dir.path().join("a"));
    assert_eq!(file.file_name().unwrap(), "test-os-big-7.tar.zst");
    assert_eq!((m.name.as_str(), m.id()), ("test-os-big", "test-os-big-7".to_string()));
    assert_eq!(m.sha256, archive::sha256_file(&file).unwrap());
    assert_eq!(archive::read_manifest(&file.with_file_name("test-os-big-7.tar.zst.json")).unwrap(), m);
    // The filler comes on top of the plain test OS, and the OS itself is all there.
    assert!(m.uncompressed_size > built().test_os_manifest.uncompressed_size + (6 << 20));
    let tar_bytes = common::zstd_decode(&file);
    let mut filler_bytes = 0;
    let mut paths = BTreeSet::new();
    for e in tar::Archive::new(tar_bytes.as_slice()).entries().unwrap() {
        let e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().trim_end_matches('/').to_string();
        if path.starts_with("opt/filler/") && e.header().entry_type().is_file() {
            filler_bytes += e.header().size().unwrap();
        }
        paths.insert(path);
    }
    assert_eq!(filler_bytes, 6 << 20);
    for p in
        ["sbin/init", "usr/local/sbin/metal-verify", "usr/local/sbin/metal-phone-home", "boot/vmlinuz", "opt/filler/big/000.bin"]
    {
        assert!(paths.contains(p), "{p} missing");
    }
    let (again, m2) = build(&dir.path().join("b"));
    assert_eq!(m2, m);
    assert!(fs::read(&again).unwrap() == fs::read(&file).unwrap(), "two filler builds differ");
}

#[test]
fn test_os_build_is_reproducible() {
    let dir = tempfile::tempdir().unwrap();
    let (file, manifest) = build_test_os(dir.path());
    assert_eq!(manifest, built().test_os_manifest);
    assert!(fs::read(&file).unwrap() == fs::read(&built().test_os).unwrap(), "two test OS builds differ");
}

#[test]
fn missing_kernel_says_how_to_get_it() {
    let dir = tempfile::tempdir().unwrap();
    let opts = hammer::HammerOptions {
        kernel_dir: dir.path().to_path_buf(),
        hammer_bin: "/bin/true".into(),
        out: dir.path().join("o"),
        extra_modules: vec![],
        zstd_level: 1,
        ca_files: vec![],
    };
    let err = hammer::build(&opts).unwrap_err().to_string();
    assert!(err.contains("image-builder kernel --cache"), "{err}");
}

/// A full disk is reported with the path being written.
#[test]
fn full_disk_names_the_path() {
    if !metal_testkit::require(metal_testkit::is_root(), "mounting a small tmpfs needs root") {
        return;
    }
    struct Mount(tempfile::TempDir);
    impl Drop for Mount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.0.path()).status();
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let st = Command::new("mount").args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"]).arg(dir.path()).status().unwrap();
    assert!(st.success());
    let mount = Mount(dir);
    let (init, _) = common::hammer_init();
    let out = mount.0.path().join("hammer");
    let opts = hammer::HammerOptions {
        kernel_dir: common::kernel().root,
        hammer_bin: init,
        out: out.clone(),
        extra_modules: vec![],
        zstd_level: 1,
        ca_files: vec![],
    };
    let err = hammer::build(&opts).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, image_builder::Error::NoSpace { .. }), "{text}");
    assert!(text.contains(&out.join("initrd.img").display().to_string()), "{text}");
    assert!(!out.join("initrd.img.partial").exists(), "partial file left behind");
}
