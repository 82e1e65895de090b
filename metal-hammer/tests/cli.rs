//! The `metal-hammer` binary's subcommands on this machine: `inventory` reads only, `wipe`
//! works on a loop device (root only; skipped otherwise) and refuses without `--device`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_metal-hammer");
const MIB: u64 = 1 << 20;

#[test]
fn inventory_prints_valid_json_and_touches_nothing() {
    let mounts_before = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let out = Command::new(BIN).arg("inventory").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let inv: metal_types::Inventory = serde_json::from_slice(&out.stdout).expect("inventory JSON");
    assert!(!inv.uuid.0.is_nil());
    assert!(inv.cores() >= 1);
    assert!(inv.memory_bytes > 0);
    // Same disks as /sys/block minus virtual devices.
    let mut expected: Vec<String> = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !metal_hammer::inventory::is_virtual_block(n))
        .filter(|n| std::fs::read_to_string(format!("/sys/block/{n}/size")).map(|s| s.trim() != "0").unwrap_or(false))
        .collect();
    expected.sort();
    let got: Vec<String> = inv.disks.iter().map(|d| d.name.clone()).collect();
    assert_eq!(got, expected);
    assert_eq!(std::fs::read_to_string("/proc/self/mounts").unwrap(), mounts_before, "mounted nothing");
}

#[test]
fn wipe_without_devices_is_refused() {
    let out = Command::new(BIN).arg("wipe").output().unwrap();
    assert!(!out.status.success());
    let out = Command::new(BIN).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "no flow unless PID 1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("only as PID 1"));
}

/// A loop device over a sparse file, detached on drop.
struct Loop {
    dev: PathBuf,
    _dir: tempfile::TempDir,
}

impl Loop {
    fn new(size: u64) -> Loop {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        let out = Command::new("losetup").args(["-f", "--show"]).arg(&img).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Loop { dev: PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()), _dir: dir }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn write_at(dev: &Path, offset: u64, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new().write(true).open(dev).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn read_at(dev: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(dev).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn wipe_clears_a_loop_device_with_gpt_filesystem_and_data() {
    if !metal_testkit::require(metal_testkit::is_root(), "needs root for loop devices") {
        return;
    }
    let size = 96 * MIB;
    let lo = Loop::new(size);
    // A GPT with two partitions, an ext4 on the whole device's second partition region and a
    // data pattern all over: everything must be gone afterwards.
    let mut sfdisk = Command::new("sfdisk")
        .args(["--quiet", "--wipe", "never"])
        .arg(&lo.dev)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    sfdisk.stdin.take().unwrap().write_all(b"label: gpt\n,32M,L\n,,L\n").unwrap();
    assert!(sfdisk.wait().unwrap().success());
    let pattern: Vec<u8> = b"METAL-OLD-DATA!!".repeat(4096);
    for off in [40 * MIB, 64 * MIB, size - 3 * MIB] {
        write_at(&lo.dev, off, &pattern);
    }
    let blkid = Command::new("blkid").arg("-p").arg(&lo.dev).output().unwrap();
    assert!(
        String::from_utf8_lossy(&blkid.stdout).contains("PTTYPE=\"gpt\""),
        "GPT before: {}",
        String::from_utf8_lossy(&blkid.stdout)
    );

    let out = Command::new(BIN).args(["wipe", "--device"]).arg(&lo.dev).output().unwrap();
    assert!(out.status.success(), "wipe: {}", String::from_utf8_lossy(&out.stderr));
    let report: metal_types::WipeReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report.disks.len(), 1);
    assert_eq!(report.disks[0].disk, lo.dev.file_name().unwrap().to_string_lossy());
    assert!(["secure-discard", "discard", "overwrite"].contains(&report.disks[0].method.as_str()), "{report:?}");

    assert!(read_at(&lo.dev, 0, MIB as usize).iter().all(|&b| b == 0), "first MiB (MBR + primary GPT) zero");
    assert!(read_at(&lo.dev, size - MIB, MIB as usize).iter().all(|&b| b == 0), "last MiB (backup GPT) zero");
    for off in [40 * MIB, 64 * MIB, size - 3 * MIB] {
        assert!(read_at(&lo.dev, off, pattern.len()).iter().all(|&b| b == 0), "old data at {off} gone");
    }
    let blkid = Command::new("blkid").arg("-p").arg(&lo.dev).output().unwrap();
    assert!(!blkid.status.success(), "blkid finds nothing: {}", String::from_utf8_lossy(&blkid.stdout));
    let wipefs = Command::new("wipefs").arg("--no-act").arg(&lo.dev).output().unwrap();
    assert!(wipefs.stdout.is_empty(), "wipefs finds no signature: {}", String::from_utf8_lossy(&wipefs.stdout));
}
