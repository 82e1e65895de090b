//! Boots what image-builder builds in QEMU (TCG) and reads the serial console line by line
//! against one deadline per phase: the metal-hammer initramfs reaches `/init` (with the real
//! metal-hammer: its modules and network stages succeed); the test OS
//! verifies a correct configuration (PASS), rejects a wrong one (FAIL), and phones home to a
//! server on loopback (reached through QEMU's guestfwd; the guest network is `restrict=on`).

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::Qemu;
use image_builder::{hammer, testos};

const ROOT_UUID: &str = "5b0c6f1e-7a2d-4c3b-9e8f-0123456789ab";
const MACHINE: &str = "0e3b3a52-3f5e-4b8e-a0a5-6b0c3f9d2e11";
const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMetalTestKey tenant@example";

fn test_os() -> &'static (tempfile::TempDir, PathBuf) {
    static T: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let opts = testos::TestOsOptions {
            kernel_dir: common::kernel().root,
            phone_home_bin: common::phone_home_bin(),
            out: dir.path().to_path_buf(),
            version: "boot".into(),
            zstd_level: 3,
            busybox: "/usr/bin/busybox".into(),
        };
        let (file, _) = testos::build(&opts).unwrap();
        (dir, file)
    })
}

#[test]
fn hammer_initramfs_boots_to_init() {
    let dir = tempfile::tempdir().unwrap();
    let (init, marker) = common::hammer_init();
    let opts = hammer::HammerOptions {
        kernel_dir: common::kernel().root,
        hammer_bin: init,
        out: dir.path().to_path_buf(),
        extra_modules: vec![],
        zstd_level: 3,
        ca_files: vec![],
    };
    hammer::build(&opts).unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let args: Vec<String> = [
        "-kernel",
        &p("vmlinuz"),
        "-initrd",
        &p("initrd.img"),
        // An API address nothing answers on: metal-hammer gets through modules and network.
        "-append",
        "console=ttyS0 panic=-1 metal.api=http://10.0.2.2:9 metal.token=t metal.partition=lab",
        "-netdev",
        "user,id=n,restrict=on",
        "-device",
        "virtio-net-pci,netdev=n",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = Qemu::start(&args);
    let deadline = Instant::now() + Duration::from_secs(240);
    vm.wait_for("Run /init as init process", deadline);
    vm.wait_for(marker, deadline);
    if marker.starts_with("METAL-HAMMER") {
        // The real runtime: the modules it needs are in the initramfs, and virtio_net brings up
        // the network (QEMU's user-mode DHCP).
        vm.wait_for("METAL-HAMMER stage=modules status=ok", deadline);
        vm.wait_for("METAL-HAMMER stage=network status=ok", deadline);
    }
}

/// What metal-hammer would write into the installed test OS.
struct Provision<'a> {
    hostname: &'a str,
    expect_hostname: &'a str,
    phone_home_url: &'a str,
}

/// Extracts the test OS onto a fresh ext4 image with `provision` applied; returns the image.
fn disk(dir: &Path, provision: &Provision) -> PathBuf {
    let root = dir.join("root");
    fs::create_dir_all(&root).unwrap();
    let st = Command::new("tar").arg("--zstd").arg("-xf").arg(&test_os().1).arg("-C").arg(&root).status().unwrap();
    assert!(st.success());
    fs::write(root.join("etc/hostname"), format!("{}\n", provision.hostname)).unwrap();
    fs::write(root.join("etc/fstab"), format!("UUID={ROOT_UUID} / ext4 defaults 0 1\n")).unwrap();
    fs::create_dir_all(root.join("root/.ssh")).unwrap();
    fs::write(root.join("root/.ssh/authorized_keys"), format!("{KEY}\n")).unwrap();
    fs::write(
        root.join("etc/metal/userdata"),
        format!(
            "{{\"expect\": {{\"hostname\": \"{}\", \"ssh_key\": \"{KEY}\", \"userdata_marker\": \"marker-42\"}}}}\n",
            provision.expect_hostname
        ),
    )
    .unwrap();
    fs::write(
        root.join("etc/metal/phone-home.json"),
        format!("{{\"url\": \"{}\", \"token\": \"ph-token\", \"machine\": \"{MACHINE}\"}}\n", provision.phone_home_url),
    )
    .unwrap();
    let img = dir.join("disk.img");
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-U", ROOT_UUID, "-d"])
        .arg(&root)
        .arg(&img)
        .arg("96M")
        .output()
        .unwrap();
    assert!(out.status.success(), "mke2fs: {}", String::from_utf8_lossy(&out.stderr));
    img
}

fn boot_test_os(dir: &Path, provision: &Provision, extra_netdev: &str) -> Qemu {
    let img = disk(dir, provision);
    let root = dir.join("root");
    let args: Vec<String> = vec![
        "-kernel".into(),
        root.join("boot/vmlinuz").display().to_string(),
        "-initrd".into(),
        root.join("boot/initrd.img").display().to_string(),
        "-append".into(),
        format!("{} root=UUID={ROOT_UUID} metal.phone_home_timeout_s=3", testos::CMDLINE),
        "-drive".into(),
        format!("file={},format=raw,if=virtio", img.display()),
        "-netdev".into(),
        format!("user,id=n,restrict=on{extra_netdev}"),
        "-device".into(),
        "virtio-net-pci,netdev=n".into(),
    ];
    Qemu::start(&args)
}

#[test]
fn test_os_verifies_a_correct_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let p = Provision { hostname: "web-1", expect_hostname: "web-1", phone_home_url: "http://10.0.2.2:9/v1/agent/phone-home" };
    let mut vm = boot_test_os(dir.path(), &p, "");
    let deadline = Instant::now() + Duration::from_secs(240);
    vm.wait_for("TEST-OS booted", deadline);
    // Nothing listens: phone-home gives up after its (shortened) retry window.
    vm.wait_for("PHONE-HOME status=error", deadline);
    vm.wait_for("TEST-OS userdata_marker=marker-42", deadline);
    let line = vm.wait_for_any(&["TEST-OS VERIFY PASS", "TEST-OS VERIFY FAIL"], deadline);
    assert!(line.contains("TEST-OS VERIFY PASS"), "{line}\n{}", vm.log.join("\n"));
}

#[test]
fn test_os_rejects_a_wrong_hostname() {
    let dir = tempfile::tempdir().unwrap();
    let p = Provision { hostname: "web-2", expect_hostname: "web-1", phone_home_url: "http://10.0.2.2:9/v1/agent/phone-home" };
    let mut vm = boot_test_os(dir.path(), &p, "");
    let deadline = Instant::now() + Duration::from_secs(240);
    let line = vm.wait_for_any(&["TEST-OS VERIFY PASS", "TEST-OS VERIFY FAIL"], deadline);
    assert!(line.contains("TEST-OS VERIFY FAIL reason=hostname expected=web-1 got=web-2"), "{line}");
}

#[test]
fn test_os_phones_home() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
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
    let dir = tempfile::tempdir().unwrap();
    let p =
        Provision { hostname: "web-1", expect_hostname: "web-1", phone_home_url: "http://10.0.2.100:8080/v1/agent/phone-home" };
    let mut vm = boot_test_os(dir.path(), &p, &format!(",guestfwd=tcp:10.0.2.100:8080-tcp:127.0.0.1:{port}"));
    let deadline = Instant::now() + Duration::from_secs(240);
    let line = vm.wait_for_any(&["PHONE-HOME status="], deadline);
    assert!(line.contains("PHONE-HOME status=ok"), "{line}\n{}", vm.log.join("\n"));
    let request = server.join().unwrap();
    assert!(request.starts_with("POST /v1/agent/phone-home HTTP/1.1\r\n"), "{request}");
    assert!(request.contains("Authorization: Bearer ph-token\r\n"), "{request}");
    let body: metal_types::PhoneHome = serde_json::from_str(request.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body.machine.to_string(), MACHINE);
    vm.wait_for("TEST-OS VERIFY PASS", deadline);
}
