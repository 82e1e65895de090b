//! `image-builder kernel` on an empty cache: downloads the real linux-image package that
//! linux-image-amd64 depends on from the configured Debian mirror, extracts it, generates
//! modules.dep/modules.alias; a second run does nothing. Also the binary's errors for a missing
//! kernel and a missing phone-home binary (a missing tool: unit test in tools.rs).

mod common;

use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use image_builder::kernel;

#[test]
fn fresh_cache_then_idempotent() {
    let cache = tempfile::tempdir().unwrap();
    let k = kernel::ensure(cache.path(), "linux-image-amd64").expect("download and extract the kernel");
    assert_eq!(k.root, cache.path().join("kernel").join(&k.version));
    assert!(k.vmlinuz().is_file());
    let dep = fs::read_to_string(k.modules_dir().join("modules.dep")).unwrap();
    assert!(dep.lines().any(|l| l.starts_with("kernel/drivers/net/virtio_net.ko:")), "virtio_net not in modules.dep");
    let alias = fs::read_to_string(k.modules_dir().join("modules.alias")).unwrap();
    assert!(alias.lines().any(|l| l.starts_with("alias virtio:d00000001v") && l.ends_with(" virtio_net")));
    assert!(k.package().unwrap().starts_with(&format!("linux-image-{} ", k.version)));
    let leftovers: Vec<_> = fs::read_dir(cache.path().join("kernel")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, [std::ffi::OsString::from(&k.version)], "work directories left behind");

    let stamp = fs::metadata(k.modules_dir().join("modules.dep")).unwrap().modified().unwrap();
    let started = Instant::now();
    let again = kernel::ensure(cache.path(), "linux-image-amd64").unwrap();
    assert_eq!(again, k);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        fs::metadata(k.modules_dir().join("modules.dep")).unwrap().modified().unwrap(),
        stamp,
        "second run redid the work"
    );
}

fn image_builder() -> Command {
    Command::new(env!("CARGO_BIN_EXE_image-builder"))
}

#[test]
fn cli_errors_say_what_to_do() {
    let empty = tempfile::tempdir().unwrap();
    let out = image_builder()
        .args(["hammer", "--hammer-bin", "/bin/true", "--kernel-dir"])
        .arg(empty.path())
        .arg("--out")
        .arg(empty.path().join("o"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("image-builder kernel --cache"), "{err}");

    let out = image_builder()
        .args(["test-os", "--phone-home-bin", "/nonexistent/phone-home", "--kernel-dir"])
        .arg(common::kernel().root)
        .arg("--out")
        .arg(empty.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cargo build -p metal-hammer --release --target x86_64-unknown-linux-musl --bin phone-home"), "{err}");
}
