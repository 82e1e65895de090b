//! QEMU machines of the lab, described by a builder and run under software emulation.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use metal_types::MachineId;

use crate::netns;
use crate::proc::{run, Service};
use crate::wait::LogCursor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS with the NIC's iPXE option ROM: iPXE does the PXE part itself.
    Bios,
    /// OVMF with the NIC's option ROM disabled: the firmware's own PXE fetches `ipxe.efi`
    /// over TFTP, which then chains to HTTP.
    Uefi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    Virtio,
    Nvme,
    Sata,
}

#[derive(Debug, Clone)]
pub struct DiskSpec {
    pub bus: DiskBus,
    pub size_mib: u64,
}

/// Describes one VM. `index` derives its MAC, tap name and UUID, so each VM of a test is
/// distinct and stable across runs.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub name: String,
    pub index: u8,
    pub firmware: Firmware,
    pub memory_mib: u64,
    pub cpus: u32,
    pub disks: Vec<DiskSpec>,
}

impl VmSpec {
    pub fn new(name: &str, index: u8) -> VmSpec {
        VmSpec {
            name: name.to_string(),
            index,
            firmware: Firmware::Bios,
            memory_mib: 1024,
            cpus: 1,
            disks: vec![DiskSpec { bus: DiskBus::Virtio, size_mib: 2048 }],
        }
    }
    pub fn firmware(mut self, fw: Firmware) -> Self {
        self.firmware = fw;
        self
    }
    /// Virtual CPUs (`-smp`); QEMU runs one TCG thread per vCPU.
    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }
    pub fn memory_mib(mut self, m: u64) -> Self {
        self.memory_mib = m;
        self
    }
    pub fn disks(mut self, disks: Vec<DiskSpec>) -> Self {
        self.disks = disks;
        self
    }
    pub fn mac(&self) -> String {
        format!("52:54:00:99:00:{:02x}", self.index)
    }
    pub fn uuid(&self) -> MachineId {
        format!("00000000-0000-4000-8000-0000000099{:02x}", self.index).parse().expect("valid uuid")
    }
    pub fn tap(&self) -> String {
        format!("metaltap{}", self.index)
    }
}

/// A running (or powered-off) VM.
pub struct Vm {
    pub spec: VmSpec,
    pub serial: PathBuf,
    pub monitor: PathBuf,
    pub disk_paths: Vec<PathBuf>,
    dir: PathBuf,
    qemu: Option<Service>,
}

impl Vm {
    /// Creates the tap and the disk files (sparse); does not power on.
    pub fn create(spec: VmSpec, dir: &Path) -> Result<Vm> {
        netns::add_tap(&spec.tap())?;
        let mut disk_paths = Vec::new();
        for (i, d) in spec.disks.iter().enumerate() {
            let p = dir.join(format!("{}-disk{i}.raw", spec.name));
            let f = std::fs::File::create(&p)?;
            f.set_len(d.size_mib * 1024 * 1024)?;
            disk_paths.push(p);
        }
        Ok(Vm {
            serial: dir.join(format!("{}.serial", spec.name)),
            monitor: dir.join(format!("{}.monitor", spec.name)),
            dir: dir.to_path_buf(),
            disk_paths,
            spec,
            qemu: None,
        })
    }

    pub fn machine_id(&self) -> MachineId {
        self.spec.uuid()
    }

    pub fn mac(&self) -> String {
        self.spec.mac()
    }

    /// A cursor at the current end of the serial log: waits see only what comes next.
    pub fn serial_cursor(&self) -> LogCursor {
        LogCursor::new(&self.serial)
    }

    fn command(&self) -> Result<Command> {
        let s = &self.spec;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-machine", "q35", "-cpu", "max", "-nodefaults", "-no-user-config"]);
        cmd.args(["-m", &s.memory_mib.to_string(), "-smp", &s.cpus.to_string()]);
        cmd.args(["-uuid", &s.uuid().to_string(), "-name", &s.name]);
        cmd.args(["-display", "none", "-vga", "none"]);
        cmd.arg("-serial").arg(format!("file:{}", self.serial.display()));
        cmd.arg("-monitor").arg(format!("unix:{},server,nowait", self.monitor.display()));
        cmd.args(["-netdev", &format!("tap,id=n0,ifname={},script=no,downscript=no", s.tap())]);
        let nic = format!("virtio-net-pci,netdev=n0,mac={},bootindex=1", s.mac());
        match s.firmware {
            Firmware::Bios => {
                // Like a real server's BIOS, start over when nothing booted (say, iPXE found
                // pixie restarting) instead of halting.
                cmd.args(["-boot", "reboot-timeout=2000"]);
                cmd.args(["-device", &nic]);
            }
            Firmware::Uefi => {
                // The firmware's own PXE, no iPXE ROM on the NIC.
                cmd.args(["-device", &format!("{nic},romfile=")]);
                let vars = self.dir.join(format!("{}-OVMF_VARS.fd", s.name));
                if !vars.exists() {
                    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).context("copy OVMF vars (package ovmf)")?;
                }
                cmd.args(["-drive", "if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd"]);
                cmd.arg("-drive").arg(format!("if=pflash,format=raw,unit=1,file={}", vars.display()));
                // The lab network is IPv4: without this OVMF also tries PXE over IPv6 (waiting
                // for a DHCPv6 answer that never comes) before it falls through to the disk.
                cmd.args(["-fw_cfg", "name=opt/org.tianocore/IPv6PXESupport,string=n"]);
            }
        }
        let mut sata_bus = false;
        for (i, (d, p)) in s.disks.iter().zip(&self.disk_paths).enumerate() {
            let id = format!("d{i}");
            cmd.arg("-drive")
                .arg(format!("file={},if=none,id={id},format=raw,cache=unsafe,discard=unmap,detect-zeroes=unmap", p.display()));
            let serial = format!("LAB{:02x}D{i}", s.index);
            let dev = match d.bus {
                DiskBus::Virtio => format!("virtio-blk-pci,drive={id},serial={serial},bootindex={}", i + 2),
                DiskBus::Nvme => format!("nvme,drive={id},serial={serial},bootindex={}", i + 2),
                DiskBus::Sata => {
                    if !sata_bus {
                        cmd.args(["-device", "ahci,id=ahci0"]);
                        sata_bus = true;
                    }
                    format!("ide-hd,drive={id},bus=ahci0.{i},serial={serial},bootindex={}", i + 2)
                }
            };
            cmd.args(["-device", &dev]);
        }
        Ok(cmd)
    }

    /// Starts QEMU (power on).
    pub fn power_on(&mut self) -> Result<()> {
        if self.qemu.as_mut().is_some_and(|q| q.is_running()) {
            return Ok(());
        }
        let cmd = self.command()?;
        let log = self.dir.join(format!("{}.qemu.log", self.spec.name));
        self.qemu = Some(Service::spawn(&format!("qemu {}", self.spec.name), cmd, &log)?);
        Ok(())
    }

    /// Stops QEMU at once (pulls the plug).
    pub fn power_off(&mut self) {
        if let Some(mut q) = self.qemu.take() {
            q.kill();
        }
    }

    /// Sends a command to the QEMU monitor and returns its answer.
    pub fn monitor(&self, command: &str) -> Result<String> {
        let mut s = UnixStream::connect(&self.monitor).with_context(|| format!("connect to monitor of {}", self.spec.name))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(s.try_clone()?);
        let mut banner = String::new();
        reader.read_line(&mut banner)?; // "QEMU x.y monitor - type 'help' …"
        writeln!(s, "{command}")?;
        let mut out = String::new();
        // The monitor echoes the command and prints "(qemu) " prompts; read what is there.
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap_or(0) > 0 {
            out.push_str(&line);
            line.clear();
            if out.matches("(qemu)").count() >= 2 {
                break;
            }
        }
        Ok(out)
    }

    /// Hard reset through the monitor (the lab's power cycle).
    pub fn reset(&self) -> Result<()> {
        self.monitor("system_reset")?;
        Ok(())
    }

    /// The last `lines` lines of the serial console.
    pub fn serial_tail(&self, lines: usize) -> String {
        crate::proc::tail_file(&self.serial, lines)
    }

    /// Reads a disk region from the host side (for checks such as "the old data is gone").
    pub fn read_disk(&self, disk: usize, offset: u64, len: usize) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&self.disk_paths[disk])?;
        f.seek(SeekFrom::Start(offset))?;
        let mut buf = vec![0; len];
        f.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Writes into a disk from the host side while the VM is off (e.g. a pattern to be wiped).
    pub fn write_disk(&self, disk: usize, offset: u64, data: &[u8]) -> Result<()> {
        use std::io::{Seek, SeekFrom};
        if self.qemu.is_some() {
            bail!("write_disk while {} is powered on", self.spec.name);
        }
        let mut f = std::fs::OpenOptions::new().write(true).open(&self.disk_paths[disk])?;
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(data)?;
        Ok(())
    }
}

/// Checks that QEMU and the firmware are installed.
pub fn check_host() -> Result<()> {
    run(Command::new("qemu-system-x86_64").arg("--version")).context("qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    for f in ["/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/lib/ipxe/ipxe.efi", "/usr/lib/ipxe/undionly.kpxe"] {
        if !Path::new(f).exists() {
            bail!("{f} is missing (Debian packages ovmf and ipxe; scripts/setup installs them)");
        }
    }
    Ok(())
}
