//! `image-builder os` from a directory and a tarball (the test OS's root filesystem): tar.zst and
//! raw.zst with manifests, byte-for-byte reproducible, and the raw disk boots in QEMU under
//! UEFI (OVMF → systemd-boot → kernel → the verifier's PASS). The Debian build (mmdebstrap, a
//! few minutes plus a UEFI boot of systemd) is `#[ignore]`d: run it with `--ignored`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Qemu;
use image_builder::os::{self, Formats, OsArgs};
use image_builder::{archive, testos};
use metal_types::ImageFormat;

const OVMF: &str = "/usr/share/ovmf/OVMF.fd";

fn args(out: &Path, name: &str) -> OsArgs {
    OsArgs {
        suite: "bookworm".into(),
        name: name.into(),
        version: Some("3".into()),
        out: out.to_path_buf(),
        format: Formats::Both,
        mirror: None,
        zstd_level: 3,
        phone_home_bin: None,
        from_dir: None,
        from_tar: None,
        include: vec![],
        no_updates: false,
        cmdline: testos::CMDLINE.into(),
        root_size_mib: None,
        work_dir: None,
        keep_work: false,
    }
}

/// The test OS's tar, and its root extracted with user data for the verifier added.
fn source() -> &'static (tempfile::TempDir, PathBuf, PathBuf) {
    static S: OnceLock<(tempfile::TempDir, PathBuf, PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let opts = testos::TestOsOptions {
            kernel_dir: common::kernel().root,
            phone_home_bin: common::phone_home_bin(),
            out: dir.path().to_path_buf(),
            version: "src".into(),
            zstd_level: 3,
            busybox: "/usr/bin/busybox".into(),
        };
        let (tar, _) = testos::build(&opts).unwrap();
        let root = dir.path().join("root");
        fs::create_dir_all(&root).unwrap();
        assert!(Command::new("tar").arg("--zstd").arg("-xpf").arg(&tar).arg("-C").arg(&root).status().unwrap().success());
        // `os` resets the hostname to localhost; the raw image's fstab names its root by UUID.
        fs::write(
            root.join("etc/metal/userdata"),
            "{\"expect\": {\"hostname\": \"localhost\", \"userdata_marker\": \"raw-disk\"}}\n",
        )
        .unwrap();
        (dir, tar, root)
    })
}

fn build_from_dir(out: &Path) -> Vec<PathBuf> {
    let mut a = args(out, "test-os-disk");
    a.from_dir = Some(source().2.clone());
    os::build(&a).expect("os build")
}

#[test]
fn from_dir_gives_tar_and_raw_with_manifests() {
    let out = tempfile::tempdir().unwrap();
    let files = build_from_dir(out.path());
    assert_eq!(files, [out.path().join("test-os-disk-3.tar.zst"), out.path().join("test-os-disk-3.raw.zst")]);
    for (file, format) in files.iter().zip([ImageFormat::TarZst, ImageFormat::RawZst]) {
        let name = file.file_name().unwrap().to_str().unwrap();
        let m = archive::read_manifest(&file.with_file_name(format!("{name}.json"))).unwrap();
        assert_eq!(m.format, format);
        assert_eq!(m.sha256, archive::sha256_file(file).unwrap());
        assert_eq!(m.compressed_size, fs::metadata(file).unwrap().len());
        assert_eq!((m.kernel.as_str(), m.initrd.as_str()), ("boot/vmlinuz", "boot/initrd.img"));
        assert_eq!(m.os, "metal test OS src");
        let sums = fs::read_to_string(file.with_file_name(format!("{name}.sha256"))).unwrap();
        assert_eq!(sums, format!("{}  {name}\n", m.sha256));
        assert_eq!(common::zstd_decode(file).len() as u64, m.uncompressed_size);
    }
    // The raw disk: GPT with the ESP and the root.
    let raw = out.path().join("disk.raw");
    fs::write(&raw, common::zstd_decode(&files[1])).unwrap();
    let table = Command::new("sfdisk").arg("-d").arg(&raw).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B") && table.contains("name=\"ESP\""), "{table}");
    assert!(table.contains("type=0FC63DAF-8483-4772-8E79-3D69D8477DE4") && table.contains("name=\"root\""), "{table}");
}

#[test]
fn os_images_are_reproducible() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let fa = build_from_dir(a.path());
    let fb = build_from_dir(b.path());
    for (x, y) in fa.iter().zip(&fb) {
        assert!(
            fs::read(x).unwrap() == fs::read(y).unwrap(),
            "{} differs between builds",
            x.file_name().unwrap().to_string_lossy()
        );
    }
}

#[test]
fn from_tar_adjusts_the_tree() {
    let out = tempfile::tempdir().unwrap();
    let mut a = args(out.path(), "from-tar");
    a.from_tar = Some(source().1.clone());
    a.format = Formats::Tar;
    let files = os::build(&a).unwrap();
    assert_eq!(files.len(), 1);
    let tar = common::zstd_decode(&files[0]);
    let mut ar = tar::Archive::new(tar.as_slice());
    let mut hostname = None;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_str() == Some("etc/hostname") {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            hostname = Some(s);
        }
    }
    assert_eq!(hostname.as_deref(), Some("localhost\n"));
    assert!(!out.path().join(".work-from-tar-3").exists(), "work directory left behind");
}

#[test]
fn raw_image_boots_under_uefi() {
    let out = tempfile::tempdir().unwrap();
    let files = build_from_dir(out.path());
    let raw = out.path().join("boot.raw");
    fs::write(&raw, common::zstd_decode(&files[1])).unwrap();
    let args: Vec<String> = vec![
        "-bios".into(),
        OVMF.into(),
        "-drive".into(),
        format!("file={},format=raw,if=virtio", raw.display()),
        "-netdev".into(),
        "user,id=n,restrict=on".into(),
        "-device".into(),
        "virtio-net-pci,netdev=n".into(),
    ];
    let mut vm = Qemu::start(&args);
    let deadline = Instant::now() + Duration::from_secs(240);
    vm.wait_for("TEST-OS booted", deadline);
    let line = vm.wait_for_any(&["TEST-OS VERIFY PASS", "TEST-OS VERIFY FAIL"], deadline);
    assert!(line.contains("PASS"), "{line}\n{}", vm.log.join("\n"));
}

/// Debian bookworm by mmdebstrap as tar.zst and raw.zst; the raw disk boots systemd under UEFI,
/// sshd starts (host keys generated at boot), and the phone-home unit reports to a server on
/// loopback once a `phone-home.json` is put into the root filesystem (with debugfs, no mount).
#[test]
#[ignore = "downloads Debian and builds for minutes: cargo test -p image-builder --test os -- --ignored"]
fn debian_image_builds_and_boots() {
    let out = tempfile::tempdir().unwrap();
    let mut a = args(out.path(), "debian-12");
    a.phone_home_bin = Some(common::phone_home_bin());
    a.cmdline = "console=ttyS0".into();
    let files = os::build(&a).expect("debian build");
    let m = archive::read_manifest(&out.path().join("debian-12-3.tar.zst.json")).unwrap();
    assert!(m.kernel.starts_with("boot/vmlinuz-") && m.initrd.starts_with("boot/initrd.img-"), "{m:?}");
    assert!(m.packages.iter().any(|p| p.starts_with("openssh-server ")));
    assert!(m.os.contains("bookworm"), "{}", m.os);

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        // QEMU's guestfwd connects once, when the machine starts; the guest's request comes
        // through that connection whenever the OS gets to it.
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"}") {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n").unwrap();
        String::from_utf8(got).unwrap()
    });

    let raw = out.path().join("debian.raw");
    let mut disk = common::zstd_decode(&files[1]);
    // The root partition starts after 1 MiB of GPT and the 256 MiB ESP and ends 1 MiB before the end.
    let (start, end) = ((1 + 256) << 20, disk.len() - (1 << 20));
    let root_img = out.path().join("root.img");
    fs::write(&root_img, &disk[start..end]).unwrap();
    let config = out.path().join("phone-home.json");
    fs::write(&config, "{\"url\": \"http://10.0.2.100:8080/v1/agent/phone-home\", \"token\": \"t0k\", \"machine\": \"0e3b3a52-3f5e-4b8e-a0a5-6b0c3f9d2e11\"}\n").unwrap();
    let st = Command::new("debugfs")
        .arg("-w")
        .arg("-R")
        .arg(format!("write {} /etc/metal/phone-home.json", config.display()))
        .arg(&root_img)
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
    disk[start..end].copy_from_slice(&fs::read(&root_img).unwrap());
    fs::write(&raw, disk).unwrap();

    let args: Vec<String> = vec![
        "-m".into(),
        "2048".into(),
        "-bios".into(),
        OVMF.into(),
        "-drive".into(),
        format!("file={},format=raw,if=virtio", raw.display()),
        "-netdev".into(),
        format!("user,id=n,restrict=on,guestfwd=tcp:10.0.2.100:8080-tcp:127.0.0.1:{port}"),
        "-device".into(),
        "virtio-net-pci,netdev=n".into(),
    ];
    let mut vm = Qemu::start(&args);
    let deadline = Instant::now() + Duration::from_secs(600);
    // The login prompt and phone-home come in either order.
    let (mut phoned, mut login) = (false, false);
    while !(phoned && login) {
        // The two can share a console line: `localhost login: PHONE-HOME status=ok …`.
        let line = vm.wait_for_any(&["PHONE-HOME status=", "login:"], deadline);
        if line.contains("PHONE-HOME") {
            assert!(line.contains("PHONE-HOME status=ok"), "{line}");
            phoned = true;
        }
        login |= line.contains("login:");
    }
    assert!(server.join().unwrap().contains("Authorization: Bearer t0k"));
    let log = vm.log.join("\n");
    assert!(!log.contains("Failed to start"), "a unit failed:\n{log}");
}
