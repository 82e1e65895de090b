//! QEMU machines PXE booting through pixie, with the real metal-api deciding what they boot:
//! iPXE (QEMU's BIOS option ROM) and OVMF's own UEFI PXE (NIC option ROM disabled: firmware
//! DHCP → TFTP `snponly.efi` → iPXE DHCP → HTTP script). Both end in a Linux kernel and a tiny
//! initramfs that prints a marker and its command line. Root only; `cargo test -p pixie --test
//! netns_qemu`. Needs the `metal-api` binary (`cargo build -p metal-api`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const MARKER: &str = "PIXIE-TEST-INITRD booted";

fn find_kernel() -> PathBuf {
    if let Some(k) = std::env::var_os("PIXIE_TEST_KERNEL") {
        return PathBuf::from(k);
    }
    for dir in ["/var/cache/metal/kernel", "/tmp/setup/k"] {
        let candidates = glob_vmlinuz(Path::new(dir));
        if let Some(k) = candidates.into_iter().next() {
            return k;
        }
    }
    panic!("no kernel found: set PIXIE_TEST_KERNEL or extract linux-image-amd64 into /var/cache/metal/kernel/<version>/");
}

fn glob_vmlinuz(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && p.components().count() < dir.components().count() + 3 {
                stack.push(p);
            } else if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")) {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn metal_api_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug/metal-api");
    assert!(p.exists(), "{} is missing: cargo build -p metal-api", p.display());
    p
}

/// A newc initramfs: static busybox, `/dev/console`, and an `/init` that prints the marker and
/// the kernel command line, then powers off.
fn build_initrd(dir: &Path) -> PathBuf {
    let root = dir.join("initrd-root");
    for d in ["bin", "dev", "proc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    run(Command::new("mknod").arg(root.join("dev/console")).args(["c", "5", "1"]));
    let init = root.join("init");
    std::fs::write(
        &init,
        format!(
            "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n/bin/busybox echo \"{MARKER}\"\n\
             /bin/busybox echo \"CMDLINE $(/bin/busybox cat /proc/cmdline)\"\n/bin/busybox poweroff -f\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = dir.join("hammer/initrd.img");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    run(Command::new("sh").arg("-c").arg(format!(
        "cd {} && find . | cpio -o -H newc --quiet > {}",
        root.display(),
        out.display()
    )));
    out
}

struct Lab {
    ns: Netns,
    dir: tempfile::TempDir,
    _api: Proc,
    pixie: Proc,
}

fn lab(tag: &str, tftp_extra: &str) -> Lab {
    let ns = Netns::new(tag);
    ns.ip("link add br0 type bridge");
    ns.ip("link set br0 up");
    ns.ip(&format!("addr add {SERVER_IP}/24 dev br0"));
    ns.ip("tuntap add tap0 mode tap");
    ns.ip("link set tap0 master br0");
    ns.ip("link set tap0 up");
    let dir = tempfile::tempdir().unwrap();
    let hammer = dir.path().join("hammer");
    std::fs::create_dir_all(&hammer).unwrap();
    std::fs::copy(find_kernel(), hammer.join("vmlinuz")).unwrap();
    build_initrd(dir.path());

    let mut api_cmd = ns.cmd(metal_api_bin());
    api_cmd
        .args(["--listen", &format!("{SERVER_IP}:8080"), "--admin-token", "adm_netns_qemu_5f0c2d9e8b7a41c3a6e9d2b8f1c07e4d"])
        .arg("--db")
        .arg(format!("sqlite://{}", dir.path().join("metal.db").display()));
    let mut api = Proc::spawn("metal-api", api_cmd, &dir.path().join("api.log"));
    wait_until("metal-api /healthz", Duration::from_secs(30), || {
        assert!(api.alive(), "metal-api exited:\n{}", api.log_text());
        ns.cmd("curl")
            .args(["-sf", "-m", "1", &format!("http://{SERVER_IP}:8080/healthz")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let partition = serde_json::json!({
        "id": "lab",
        "description": "pixie test",
        "boot": {
            "kernel_url": format!("http://{SERVER_IP}:8081/hammer/vmlinuz"),
            "initrd_url": format!("http://{SERVER_IP}:8081/hammer/initrd.img"),
            "cmdline": "console=ttyS0 panic=-1",
            "api_url": format!("http://{SERVER_IP}:8080"),
        }
    });
    run(ns.cmd("curl").args([
        "-sf",
        "-X",
        "POST",
        "-H",
        "authorization: Bearer adm_netns_qemu_5f0c2d9e8b7a41c3a6e9d2b8f1c07e4d",
        "-H",
        "content-type: application/json",
        "-d",
        &partition.to_string(),
        &format!("http://{SERVER_IP}:8080/v1/partitions"),
    ]));
    let conf = format!(
        r#"partition = "lab"
[api]
url = "http://{SERVER_IP}:8080"
token = "adm_netns_qemu_5f0c2d9e8b7a41c3a6e9d2b8f1c07e4d"
[dhcp]
mode = "server"
interface = "br0"
server_ip = "{SERVER_IP}"
lease_file = "{dir}/leases.json"
[dhcp.pool]
subnet = "10.99.0.0/24"
start = "10.99.0.100"
end = "10.99.0.199"
router = "{SERVER_IP}"
[tftp]
listen = "{SERVER_IP}:69"
root = "/usr/lib/ipxe"
{tftp_extra}
[http]
listen = "{SERVER_IP}:8081"
public_url = "http://{SERVER_IP}:8081"
hammer_dir = "{hammer}"
"#,
        dir = dir.path().display(),
        hammer = hammer.display(),
    );
    let pixie = start_pixie(&ns, dir.path(), &conf, "q");
    Lab { ns, dir, _api: api, pixie }
}

fn boot(lab: &Lab, args: &[&str], timeout: Duration) {
    let serial = lab.dir.path().join("serial.log");
    let mut cmd = lab.ns.cmd("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", "512", "-nographic", "-no-reboot", "-monitor", "none"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"])
        .args(args);
    let mut qemu = Proc::spawn("qemu", cmd, &lab.dir.path().join("qemu.log"));
    let read = || String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
    // The initrd prints the marker, then the command line: wait for that whole line too (with a
    // 200-character enrolment token it can arrive a moment after the marker).
    let done = |t: &str| t.contains(MARKER) && t.split_inclusive('\n').any(|l| l.starts_with("CMDLINE ") && l.ends_with('\n'));
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if done(&read()) {
            break;
        }
        if !qemu.alive() && !read().contains(MARKER) {
            panic!(
                "QEMU exited before the marker\nserial:\n{}\nqemu:\n{}\npixie:\n{}",
                read(),
                qemu.log_text(),
                lab.pixie.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let text = read();
    assert!(text.contains(MARKER), "no `{MARKER}` within {timeout:?}\nserial:\n{text}\npixie:\n{}", lab.pixie.log_text());
    // The command line came from the API's decision: the partition's plus an enrolment token.
    let cmdline = text.lines().find(|l| l.starts_with("CMDLINE ")).unwrap_or_else(|| panic!("no CMDLINE line\n{text}"));
    assert!(
        cmdline.contains("console=ttyS0")
            && cmdline.contains("metal.token=")
            && cmdline.contains("metal.api=http://10.99.0.1:8080"),
        "{cmdline}"
    );
    qemu.stop();
}

#[test]
fn netns_qemu_bios_ipxe_boots_kernel_and_initrd_from_the_api_decision() {
    if skip_unless_root("netns_qemu_bios") {
        return;
    }
    let lab = lab("qb", "");
    boot(&lab, &["-device", "virtio-net-pci,netdev=n0,mac=52:54:00:00:99:01", "-boot", "n"], Duration::from_secs(180));
    let log = lab.pixie.log_text();
    assert!(log.contains("boot_why=\"user class iPXE: per-machine script\""), "{log}");
    assert!(log.contains("decision=\"hammer\""), "{log}");
}

#[test]
fn netns_qemu_ovmf_firmware_pxe_fetches_ipxe_over_tftp_then_chains_to_http() {
    if skip_unless_root("netns_qemu_ovmf") {
        return;
    }
    let code = Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd");
    assert!(code.exists(), "OVMF is missing: apt-get install ovmf");
    // Debian's /usr/lib/ipxe/ipxe.efi links to /boot/ipxe.efi.
    let lab = lab("qu", "symlink_targets = [\"/boot\"]");
    let vars = lab.dir.path().join("vars.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
    boot(
        &lab,
        &[
            "-machine",
            "q35",
            "-drive",
            &format!("if=pflash,format=raw,readonly=on,file={}", code.display()),
            "-drive",
            &format!("if=pflash,format=raw,file={}", vars.display()),
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:00:99:02,romfile=",
            "-boot",
            "n",
        ],
        Duration::from_secs(400),
    );
    let log = lab.pixie.log_text();
    assert!(log.contains("boot=\"snponly.efi\""), "the firmware was not offered snponly.efi\n{log}");
    assert!(log.contains("TFTP transfer complete"), "{log}");
    assert!(log.contains("boot_why=\"user class iPXE: per-machine script\""), "{log}");
}
