//! Hardware inventory from `/proc` and `/sys`.
//!
//! Every reader takes the root of the tree it reads (`/` in production, a fake tree in tests)
//! and only reads; nothing here writes or needs root, except that `product_uuid` is readable
//! by root only.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use metal_types::{Cpu, Disk, Dmi, Inventory, MachineId, Nic};
use sha2::{Digest, Sha256};

fn read_trim(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn read_u64(path: &Path) -> Option<u64> {
    read_trim(path)?.parse().ok()
}

/// CPUs per socket from `/proc/cpuinfo` text.
pub fn parse_cpuinfo(text: &str) -> Vec<Cpu> {
    // physical id → (model, cores per socket, logical processors seen)
    let mut sockets: BTreeMap<u32, (String, u32, u32)> = BTreeMap::new();
    for block in text.split("\n\n") {
        let mut model = String::new();
        let mut physical = 0u32;
        let mut cores = 0u32;
        let mut is_proc = false;
        for line in block.lines() {
            let Some((k, v)) = line.split_once(':') else { continue };
            let (k, v) = (k.trim(), v.trim());
            match k {
                "processor" => is_proc = true,
                "model name" => model = v.to_string(),
                "physical id" => physical = v.parse().unwrap_or(0),
                "cpu cores" => cores = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        if !is_proc {
            continue;
        }
        let entry = sockets.entry(physical).or_insert_with(|| (model.clone(), cores, 0));
        entry.2 += 1;
        if entry.0.is_empty() {
            entry.0 = model;
        }
    }
    sockets
        .into_values()
        .map(|(model, cores, threads)| Cpu { model, cores: if cores == 0 { threads } else { cores }, threads })
        .collect()
}

/// `MemTotal` in bytes from `/proc/meminfo` text.
pub fn parse_meminfo(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Kernel block-device names that are not disks: loop, RAM disks, zram, device-mapper, CD/DVD,
/// software RAID, network block devices.
pub fn is_virtual_block(name: &str) -> bool {
    ["loop", "ram", "zram", "dm-", "sr", "md", "nbd", "fd"].iter().any(|p| name.starts_with(p))
}

/// Bus from the resolved `/sys/block/<name>` path.
pub fn bus_from_path(path: &str) -> &'static str {
    if path.contains("/usb") {
        "usb"
    } else if path.contains("/nvme") {
        "nvme"
    } else if path.contains("/ata") {
        "sata"
    } else if path.contains("/host") {
        "scsi"
    } else if path.contains("/virtio") {
        "virtio"
    } else if path.contains("/mmc") {
        "mmc"
    } else {
        ""
    }
}

/// One disk from `<sys>/block/<name>`.
pub fn read_disk(sys: &Path, name: &str) -> Option<Disk> {
    let dir = sys.join("block").join(name);
    let sectors = read_u64(&dir.join("size"))?;
    let first = |files: &[&str]| files.iter().find_map(|f| read_trim(&dir.join(f)).filter(|s| !s.is_empty())).unwrap_or_default();
    let real = std::fs::canonicalize(&dir).map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
    Some(Disk {
        name: name.to_string(),
        size_bytes: sectors * 512,
        model: first(&["device/model"]),
        serial: first(&["device/serial", "serial", "device/vpd_pg80"]),
        wwn: first(&["wwid", "device/wwid", "device/wwn"]),
        rotational: read_trim(&dir.join("queue/rotational")).as_deref() == Some("1"),
        logical_sector_size: read_u64(&dir.join("queue/logical_block_size")).unwrap_or(512) as u32,
        physical_sector_size: read_u64(&dir.join("queue/physical_block_size")).unwrap_or(512) as u32,
        bus: bus_from_path(&real).to_string(),
    })
}

/// Disks under `<sys>/block`, sorted by kernel name, without virtual devices (unless named in
/// `include`) and without empty ones (card readers, empty CD drives).
pub fn read_disks(sys: &Path, include: &[String]) -> Vec<Disk> {
    let mut names: Vec<String> = std::fs::read_dir(sys.join("block"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .filter(|n| include.contains(n) || !is_virtual_block(n))
        .filter_map(|n| read_disk(sys, &n))
        .filter(|d| d.size_bytes > 0 || include.contains(&d.name))
        .collect()
}

/// Whether `<sys>/block/<name>/removable` says so.
pub fn is_removable(sys: &Path, name: &str) -> bool {
    read_trim(&sys.join("block").join(name).join("removable")).as_deref() == Some("1")
}

/// Physical NICs under `<sys>/class/net` (those with a `device` link), sorted by name.
pub fn read_nics(sys: &Path) -> Vec<Nic> {
    let base = sys.join("class/net");
    let mut names: Vec<String> = std::fs::read_dir(&base)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
        .into_iter()
        .filter(|n| base.join(n).join("device").exists())
        .map(|name| {
            let dir = base.join(&name);
            let driver = std::fs::read_link(dir.join("device/driver"))
                .ok()
                .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
                .unwrap_or_default();
            let speed = read_trim(&dir.join("speed")).and_then(|s| s.parse::<i64>().ok()).filter(|&s| s > 0).map(|s| s as u32);
            Nic {
                mac: read_trim(&dir.join("address")).unwrap_or_default().to_lowercase(),
                driver,
                speed_mbps: speed,
                carrier: read_trim(&dir.join("carrier")).as_deref() == Some("1"),
                name,
            }
        })
        .collect()
}

/// DMI identity from `<sys>/class/dmi/id`, and the raw `product_uuid` (lower case) if readable.
pub fn read_dmi(sys: &Path) -> (Dmi, Option<String>) {
    let dir = sys.join("class/dmi/id");
    let r = |f: &str| read_trim(&dir.join(f)).unwrap_or_default();
    let dmi = Dmi {
        sys_vendor: r("sys_vendor"),
        product_name: r("product_name"),
        product_serial: r("product_serial"),
        board_vendor: r("board_vendor"),
        board_name: r("board_name"),
        bios_vendor: r("bios_vendor"),
        bios_version: r("bios_version"),
        bios_date: r("bios_date"),
    };
    (dmi, read_trim(&dir.join("product_uuid")).map(|s| s.to_lowercase()))
}

/// The machine id: the SMBIOS UUID when it is a real one; otherwise (no DMI, all zeros, all
/// ones) a stable name-based UUID derived from the lowest NIC MAC, so the machine keeps one
/// identity across boots.
pub fn machine_id(product_uuid: Option<&str>, nics: &[Nic]) -> Option<MachineId> {
    if let Some(id) = product_uuid.and_then(|u| u.parse::<MachineId>().ok()) {
        let bytes = id.0.as_bytes();
        if bytes.iter().any(|&b| b != 0) && bytes.iter().any(|&b| b != 0xff) {
            return Some(id);
        }
    }
    let mac = nics.iter().map(|n| n.mac.as_str()).filter(|m| !m.is_empty() && *m != "00:00:00:00:00:00").min()?;
    let digest = Sha256::digest(format!("metal-hammer machine {mac}").as_bytes());
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    b[6] = (b[6] & 0x0f) | 0x50; // version 5-style (name based)
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    Some(MachineId(uuid::Uuid::from_bytes(b)))
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("no machine identity: no readable SMBIOS product_uuid and no NIC MAC address")]
    NoIdentity,
}

/// The whole inventory (without LLDP, which needs a listening window: see [`crate::lldp`]).
pub fn collect(root: &Path, include_disks: &[String]) -> Result<Inventory, InventoryError> {
    let proc_ = root.join("proc");
    let sys = root.join("sys");
    let cpus = parse_cpuinfo(&std::fs::read_to_string(proc_.join("cpuinfo")).unwrap_or_default());
    let memory_bytes = parse_meminfo(&std::fs::read_to_string(proc_.join("meminfo")).unwrap_or_default());
    let disks = read_disks(&sys, include_disks);
    let nics = read_nics(&sys);
    let (dmi, product_uuid) = read_dmi(&sys);
    let uuid = machine_id(product_uuid.as_deref(), &nics).ok_or(InventoryError::NoIdentity)?;
    Ok(Inventory { uuid, cpus, memory_bytes, disks, nics, dmi, lldp: Vec::new() })
}

/// Device paths of the disks to install onto, in kernel name order, removable media last.
pub fn install_targets(root: &Path, disks: &[Disk]) -> Vec<PathBuf> {
    let sys = root.join("sys");
    let (mut fixed, removable): (Vec<&Disk>, Vec<&Disk>) = disks.iter().partition(|d| !is_removable(&sys, &d.name));
    fixed.extend(removable);
    fixed.iter().map(|d| PathBuf::from("/dev").join(&d.name)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const CPUINFO: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6230\nphysical id\t: 0\nsiblings\t: 4\ncore id\t: 0\ncpu cores\t: 2\n\nprocessor\t: 1\nmodel name\t: Intel(R) Xeon(R) Gold 6230\nphysical id\t: 0\ncpu cores\t: 2\n\nprocessor\t: 2\nmodel name\t: Intel(R) Xeon(R) Gold 6230\nphysical id\t: 1\ncpu cores\t: 2\n\nprocessor\t: 3\nmodel name\t: Intel(R) Xeon(R) Gold 6230\nphysical id\t: 1\ncpu cores\t: 2\n\n";

    fn write(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    #[test]
    fn cpuinfo_groups_sockets() {
        let cpus = parse_cpuinfo(CPUINFO);
        assert_eq!(cpus.len(), 2);
        assert_eq!(cpus[0], Cpu { model: "Intel(R) Xeon(R) Gold 6230".into(), cores: 2, threads: 2 });
        // QEMU TCG without topology: no physical id, no cpu cores.
        let cpus = parse_cpuinfo("processor : 0\nmodel name : QEMU Virtual CPU version 2.5+\n\nprocessor : 1\nmodel name : QEMU Virtual CPU version 2.5+\n");
        assert_eq!(cpus, vec![Cpu { model: "QEMU Virtual CPU version 2.5+".into(), cores: 2, threads: 2 }]);
    }

    #[test]
    fn meminfo_total() {
        assert_eq!(parse_meminfo("MemTotal:        1014552 kB\nMemFree: 1 kB\n"), 1014552 * 1024);
        assert_eq!(parse_meminfo("garbage"), 0);
    }

    /// A fake root with /proc and /sys as the kernel lays them out (devices under
    /// /sys/devices, /sys/block and /sys/class/net entries as symlinks into it).
    fn fake_root() -> tempfile::TempDir {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        write(r, "proc/cpuinfo", CPUINFO);
        write(r, "proc/meminfo", "MemTotal: 2048 kB\n");
        let vda = "sys/devices/pci0000:00/0000:00:04.0/virtio1/block/vda";
        write(r, &format!("{vda}/size"), "2097152\n");
        write(r, &format!("{vda}/serial"), "disk-one\n");
        write(r, &format!("{vda}/queue/rotational"), "1\n");
        write(r, &format!("{vda}/queue/logical_block_size"), "512\n");
        write(r, &format!("{vda}/queue/physical_block_size"), "4096\n");
        write(r, &format!("{vda}/removable"), "0\n");
        let nvme = "sys/devices/pci0000:00/0000:00:05.0/nvme/nvme0/nvme0n1";
        write(r, &format!("{nvme}/size"), "4194304\n");
        write(r, &format!("{nvme}/wwid"), "eui.0011223344556677\n");
        write(r, &format!("{nvme}/device/model"), "QEMU NVMe Ctrl   \n");
        write(r, &format!("{nvme}/device/serial"), "nvme-serial\n");
        write(r, &format!("{nvme}/queue/rotational"), "0\n");
        write(r, &format!("{nvme}/queue/logical_block_size"), "4096\n");
        write(r, &format!("{nvme}/queue/physical_block_size"), "4096\n");
        write(r, "sys/devices/virtual/block/loop0/size", "100\n");
        write(r, "sys/devices/virtual/block/zram0/size", "100\n");
        fs::create_dir_all(r.join("sys/block")).unwrap();
        symlink(r.join(vda), r.join("sys/block/vda")).unwrap();
        symlink(r.join(nvme), r.join("sys/block/nvme0n1")).unwrap();
        symlink(r.join("sys/devices/virtual/block/loop0"), r.join("sys/block/loop0")).unwrap();
        symlink(r.join("sys/devices/virtual/block/zram0"), r.join("sys/block/zram0")).unwrap();
        let eth = "sys/devices/pci0000:00/0000:00:03.0/virtio0/net/eth0";
        write(r, &format!("{eth}/address"), "52:54:00:AB:CD:EF\n");
        write(r, &format!("{eth}/carrier"), "1\n");
        write(r, &format!("{eth}/speed"), "-1\n");
        fs::create_dir_all(r.join("sys/bus/virtio/drivers/virtio_net")).unwrap();
        symlink(r.join("sys/devices/pci0000:00/0000:00:03.0/virtio0"), r.join(format!("{eth}/device"))).unwrap();
        symlink(r.join("sys/bus/virtio/drivers/virtio_net"), r.join("sys/devices/pci0000:00/0000:00:03.0/virtio0/driver"))
            .unwrap();
        write(r, "sys/devices/virtual/net/lo/address", "00:00:00:00:00:00\n");
        fs::create_dir_all(r.join("sys/class/net")).unwrap();
        symlink(r.join(eth), r.join("sys/class/net/eth0")).unwrap();
        symlink(r.join("sys/devices/virtual/net/lo"), r.join("sys/class/net/lo")).unwrap();
        write(r, "sys/class/dmi/id/product_uuid", "6B1F2C3D-0000-4000-8000-00000000000A\n");
        write(r, "sys/class/dmi/id/sys_vendor", "QEMU\n");
        write(r, "sys/class/dmi/id/bios_version", "1.16.2-debian\n");
        dir
    }

    #[test]
    fn inventory_of_a_fake_tree() {
        let root = fake_root();
        let inv = collect(root.path(), &[]).unwrap();
        assert_eq!(inv.uuid.to_string(), "6b1f2c3d-0000-4000-8000-00000000000a");
        assert_eq!(inv.cores(), 4);
        assert_eq!(inv.memory_bytes, 2048 * 1024);
        assert_eq!(inv.disks.len(), 2, "{:?}", inv.disks);
        let nvme = &inv.disks[0];
        assert_eq!((nvme.name.as_str(), nvme.size_bytes, nvme.bus.as_str()), ("nvme0n1", 4194304 * 512, "nvme"));
        assert_eq!(
            (nvme.model.as_str(), nvme.serial.as_str(), nvme.wwn.as_str()),
            ("QEMU NVMe Ctrl", "nvme-serial", "eui.0011223344556677")
        );
        assert_eq!((nvme.logical_sector_size, nvme.rotational), (4096, false));
        let vda = &inv.disks[1];
        assert_eq!(
            (vda.name.as_str(), vda.bus.as_str(), vda.serial.as_str(), vda.rotational),
            ("vda", "virtio", "disk-one", true)
        );
        assert_eq!((vda.logical_sector_size, vda.physical_sector_size), (512, 4096));
        assert_eq!(inv.nics.len(), 1);
        let nic = &inv.nics[0];
        assert_eq!((nic.name.as_str(), nic.mac.as_str(), nic.driver.as_str()), ("eth0", "52:54:00:ab:cd:ef", "virtio_net"));
        assert_eq!((nic.speed_mbps, nic.carrier), (None, true));
        assert_eq!(inv.dmi.sys_vendor, "QEMU");
        assert_eq!(inv.dmi.bios_version, "1.16.2-debian");
        // Named virtual devices are included (tests run on loop devices).
        let with_loop = read_disks(&root.path().join("sys"), &["loop0".into()]);
        assert!(with_loop.iter().any(|d| d.name == "loop0"));
        assert_eq!(install_targets(root.path(), &inv.disks), vec![PathBuf::from("/dev/nvme0n1"), PathBuf::from("/dev/vda")]);
    }

    #[test]
    fn machine_id_falls_back_to_a_stable_mac_derived_uuid() {
        let nics = vec![Nic { name: "eth0".into(), mac: "52:54:00:12:34:56".into(), ..Default::default() }];
        let a = machine_id(Some("00000000-0000-0000-0000-000000000000"), &nics).unwrap();
        let b = machine_id(None, &nics).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.0.get_version_num(), 5);
        assert!(machine_id(None, &[]).is_none());
        let real = machine_id(Some("6b1f2c3d-0000-4000-8000-00000000000a"), &nics).unwrap();
        assert_eq!(real.to_string(), "6b1f2c3d-0000-4000-8000-00000000000a");
    }
}
