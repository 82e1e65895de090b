//! Provisioning-time benchmark: per phase, the median of several runs, for each image asked
//! for, next to the reference PXE chain (dnsmasq + nginx: iPXE → kernel + a tiny initramfs that
//! prints a marker) measured in the same run on the same machine. Prints a Markdown table.
//! Run through `scripts/bench` (as root).
//!
//! `--memory`: one machine with little RAM (default 1 GiB) installs a big image (default
//! `test-os-2g`, built by `scripts/bench memory`); prints whether it phoned home, the install's
//! duration and throughput, and metal-hammer's peak memory from its `stage=install` marker.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::Parser;
use metal_lab::netns::{self, HOST_IP};
use metal_lab::proc::Service;
use metal_lab::services::{PARTITION, PROJECT};
use metal_lab::{run_in_lab, Deadline, Firmware, Lab, LogCursor, VmSpec};
use metal_types::{AllocationRequest, MachineEvent, ProvisioningEvent as Ev};

#[derive(Parser)]
struct Args {
    /// Runs per configuration.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Images to provision (names); each must be built in target/lab/images.
    #[arg(long, default_value = "test-os")]
    images: Vec<String>,
    /// Virtual CPUs of the provisioned machines and of the reference chain's machine.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Also measure the reference chain (needs dnsmasq and nginx).
    #[arg(long, default_value_t = true)]
    reference: bool,
    /// Run the memory benchmark instead: one small-RAM machine installs --memory-image.
    #[arg(long)]
    memory: bool,
    #[arg(long, default_value = "test-os-2g")]
    memory_image: String,
    /// RAM of the memory benchmark's machine, MiB.
    #[arg(long, default_value_t = 1024)]
    memory_mib: u64,
    /// Its (virtio) disk, MiB.
    #[arg(long, default_value_t = 4096)]
    disk_mib: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.memory {
        let rows = std::thread::scope(|s| s.spawn(|| run_in_lab(|| memory_run(&args))).join().unwrap())?;
        println!("| what | value |\n|---|---|");
        for r in rows {
            println!("{r}");
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    if args.reference {
        for fw in [Firmware::Bios, Firmware::Uefi] {
            let mut t = Vec::new();
            for _ in 0..args.runs {
                t.push(std::thread::scope(|s| s.spawn(|| reference_chain(fw, args.cpus)).join().unwrap())?);
            }
            rows.push(format!(
                "| reference chain dnsmasq + nginx ({fw:?}, {} vCPU): QEMU start → marker | {:.1} s |",
                args.cpus,
                median(&mut t)
            ));
        }
    }
    for image in &args.images {
        let r = std::thread::scope(|s| s.spawn(|| run_in_lab(|| lifecycle_runs(image, args.runs, args.cpus))).join().unwrap())?;
        rows.extend(r);
    }
    println!("| what (median of {} runs) | time |\n|---|---|", args.runs);
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn received_secs(e: &MachineEvent) -> Result<f64> {
    let t = time::OffsetDateTime::parse(&e.received, &time::format_description::well_known::Rfc3339)
        .with_context(|| format!("parse receive time {:?}", e.received))?;
    Ok(t.unix_timestamp_nanos() as f64 / 1e9)
}

fn event_after(events: &[MachineEvent], ev: Ev, after: f64) -> Result<f64> {
    for e in events {
        if e.event == ev {
            let t = received_secs(e)?;
            if t >= after {
                return Ok(t);
            }
        }
    }
    bail!("no {ev} event after {after}")
}

/// Boots one machine per run (fresh lab state per run is not needed: each run is its own VM).
async fn lifecycle_runs(image_name: &str, runs: usize, cpus: u32) -> Result<Vec<String>> {
    let mut lab = Lab::start(None).await?;
    let image = lab.image(image_name).with_context(|| format!("image {image_name} not built"))?.clone();
    let (mut to_wait, mut to_install, mut to_kexec, mut to_home) = (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let i = lab.add_vm(
            VmSpec::new(&format!("bench{run}"), 40 + run as u8)
                .cpus(cpus)
                .memory_mib(2048)
                .disks(vec![metal_lab::DiskSpec { bus: metal_lab::DiskBus::Virtio, size_mib: 4096 }]),
        )?;
        let id = lab.vms[i].machine_id();
        let on = unix_now();
        lab.vms[i].power_on()?;
        let d = Deadline::new("power-on to Waiting", Duration::from_secs(300));
        lab.admin.wait_event(&d, id, Ev::Waiting, 0).await?;
        let req = allocation_request(id, &image.id, &format!("bench{run}"));
        let alloc_at = unix_now();
        lab.tenant.allocate(&req).await?;
        let d = Deadline::new("allocation to Phoned Home", Duration::from_secs(600));
        lab.admin.wait_event(&d, id, Ev::PhonedHome, 0).await?;
        let ev = lab.admin.events(id).await?;
        let waiting = event_after(&ev, Ev::Waiting, on)?;
        let installing = event_after(&ev, Ev::Installing, alloc_at)?;
        let kexec = event_after(&ev, Ev::BootingNewKernel, alloc_at)?;
        let home = event_after(&ev, Ev::PhonedHome, alloc_at)?;
        to_wait.push(waiting - on);
        to_install.push(installing - alloc_at);
        to_kexec.push(kexec - alloc_at);
        to_home.push(home - alloc_at);
        lab.vms[i].power_off();
    }
    lab.pass();
    let size = format!(
        "{}, {:.0} MB compressed / {:.0} MB, {cpus} vCPU",
        image.id,
        image.manifest.compressed_size as f64 / 1e6,
        image.manifest.uncompressed_size as f64 / 1e6
    );
    Ok(vec![
        format!("| {size}: power-on → Waiting (BIOS) | {:.1} s |", median(&mut to_wait)),
        format!("| {size}: allocation → Installing | {:.1} s |", median(&mut to_install)),
        format!("| {size}: allocation → Booting New Kernel | {:.1} s |", median(&mut to_kexec)),
        format!("| {size}: allocation → Phoned Home | {:.1} s |", median(&mut to_home)),
    ])
}

/// `key=value` of a marker line as a number.
fn marker_u64(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// The memory benchmark: one machine with `--memory-mib` of RAM installs `--memory-image`.
async fn memory_run(args: &Args) -> Result<Vec<String>> {
    let mut lab = Lab::start(None).await?;
    let image = lab
        .image(&args.memory_image)
        .with_context(|| format!("image {} not built (scripts/bench memory builds it)", args.memory_image))?
        .clone();
    let disk = metal_lab::DiskSpec { bus: metal_lab::DiskBus::Virtio, size_mib: args.disk_mib };
    let i = lab.add_vm(VmSpec::new("memory", 60).memory_mib(args.memory_mib).disks(vec![disk]))?;
    let id = lab.vms[i].machine_id();
    lab.vms[i].power_on()?;
    let d = Deadline::new("power-on to Waiting", Duration::from_secs(300));
    lab.admin.wait_event(&d, id, Ev::Waiting, 0).await?;
    let hostname = "memory-bench";
    let mut req = allocation_request(id, &image.id, hostname);
    req.user_data = serde_json::json!({ "expect": { "hostname": hostname, "userdata_marker": "memory-bench" } }).to_string();
    let alloc_at = unix_now();
    lab.tenant.allocate(&req).await?;
    // Under TCG on a shared machine a 2 GiB install takes minutes; the serial console fails the
    // wait at once when the kernel runs out of memory.
    let d = Deadline::new("allocation to install marker", Duration::from_secs(3600));
    let fail_on = ["invoked oom-killer", "Out of memory", "Kernel panic", "stage=fatal"];
    let install = LogCursor::new(&lab.vms[i].serial).wait_for(&d, "METAL-HAMMER stage=install status=", &fail_on).await?;
    if !install.contains("status=ok") {
        bail!("install failed: {install}");
    }
    let d = Deadline::new("install to verifier and Phoned Home", Duration::from_secs(600));
    LogCursor::new(&lab.vms[i].serial).wait_for(&d, "TEST-OS VERIFY PASS", &["TEST-OS VERIFY FAIL"]).await?;
    lab.admin.wait_event(&d, id, Ev::PhonedHome, 0).await?;
    let ev = lab.admin.events(id).await?;
    let installing = event_after(&ev, Ev::Installing, alloc_at)?;
    let kexec = event_after(&ev, Ev::BootingNewKernel, alloc_at)?;
    let home = event_after(&ev, Ev::PhonedHome, alloc_at)?;
    lab.vms[i].power_off();
    lab.pass();

    let field = |k: &str| marker_u64(&install, k).with_context(|| format!("no {k} in {install:?}"));
    let (duration_ms, stream_ms, bytes) = (field("duration_ms")?, field("stream_ms")?, field("image_bytes")?);
    let (peak, total, avail_start, avail_min) =
        (field("peak_rss_kib")?, field("mem_total_kib")?, field("mem_available_start_kib")?, field("mem_available_min_kib")?);
    let mib = |kib: u64| kib as f64 / 1024.0;
    let rate = |ms: u64| bytes as f64 / 1e6 / (ms.max(1) as f64 / 1e3);
    let initrd = std::fs::metadata(lab.paths.hammer_dir.join("initrd.img")).map(|m| m.len()).unwrap_or(0);
    Ok(vec![
        format!(
            "| machine | {} MiB RAM (`-m {}`), {} MiB virtio disk, TCG, 1 vCPU |",
            args.memory_mib, args.memory_mib, args.disk_mib
        ),
        format!(
            "| image | {}: {:.1} MiB tar.zst, {:.1} MiB unpacked |",
            image.id,
            image.manifest.compressed_size as f64 / 1048576.0,
            bytes as f64 / 1048576.0
        ),
        format!("| metal-hammer initramfs (in RAM) | {:.1} MiB initrd.img (zstd) |", initrd as f64 / 1048576.0),
        "| result | Phoned Home, verifier PASS |".into(),
        format!(
            "| install (partition → bootloader) | {:.1} s, {:.1} MB/s unpacked |",
            duration_ms as f64 / 1e3,
            rate(duration_ms)
        ),
        format!(
            "| stream (download + SHA-256 + zstd + tar) | {:.1} s, {:.1} MB/s unpacked, {:.1} MB/s compressed |",
            stream_ms as f64 / 1e3,
            rate(stream_ms),
            image.manifest.compressed_size as f64 / 1e6 / (stream_ms.max(1) as f64 / 1e3)
        ),
        format!(
            "| allocation → Installing / Booting New Kernel / Phoned Home | {:.1} s / {:.1} s / {:.1} s |",
            installing - alloc_at,
            kexec - alloc_at,
            home - alloc_at
        ),
        format!("| metal-hammer peak RSS (VmHWM) | {:.1} MiB |", mib(peak)),
        format!("| guest MemTotal | {:.1} MiB |", mib(total)),
        format!(
            "| MemAvailable before install / lowest during install | {:.1} MiB / {:.1} MiB |",
            mib(avail_start),
            mib(avail_min)
        ),
    ])
}

/// A tenant's request for exactly this machine with `image`, defaults otherwise.
fn allocation_request(machine: metal_types::MachineId, image: &str, hostname: &str) -> AllocationRequest {
    AllocationRequest {
        project: PROJECT.into(),
        partition: PARTITION.into(),
        size: None,
        machine: Some(machine),
        image: image.into(),
        hostname: hostname.into(),
        layout: None,
        ssh_keys: vec![],
        user_data: String::new(),
        idempotency_key: None,
    }
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The reference: dnsmasq (DHCP + TFTP) and nginx (HTTP) serving iPXE a kernel and a tiny
/// initramfs whose /init prints a marker and powers off. Seconds from QEMU start to the marker.
fn reference_chain(fw: Firmware, cpus: u32) -> Result<f64> {
    netns::enter_private_netns()?;
    let tmp = tempfile::Builder::new().prefix("metal-ref-").tempdir()?;
    let dir = tmp.path();
    netns::create_bridge()?;
    let _radvd = netns::start_radvd(dir)?;
    // The same Debian kernel metal-hammer boots (scripts/build-lab copies it there).
    let kernel = metal_lab::services::Paths::discover()?.hammer_dir.join("vmlinuz");
    anyhow::ensure!(kernel.exists(), "{} is missing: run scripts/build-lab", kernel.display());
    let www = dir.join("www");
    std::fs::create_dir_all(www.join("root"))?;
    std::fs::copy(&kernel, www.join("vmlinuz"))?;
    tiny_initramfs(&www.join("root"), &www.join("tiny.img"))?;
    std::fs::write(
        www.join("boot.ipxe"),
        format!("#!ipxe\nkernel http://{HOST_IP}/vmlinuz console=ttyS0 quiet initrd=tiny.img\ninitrd --name tiny.img http://{HOST_IP}/tiny.img\nboot\n"),
    )?;
    let tftp = dir.join("tftp");
    std::fs::create_dir_all(&tftp)?;
    std::fs::copy("/usr/lib/ipxe/ipxe.efi", tftp.join("ipxe.efi"))?;
    std::fs::copy("/usr/lib/ipxe/undionly.kpxe", tftp.join("undionly.kpxe"))?;
    let nginx_conf = dir.join("nginx.conf");
    std::fs::write(
        &nginx_conf,
        format!(
            "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/nginx.err;\nevents {{ worker_connections 256; }}\n\
             http {{ access_log off; sendfile on; server {{ listen {HOST_IP}:80; root {w}; }} }}\n",
            d = dir.display(),
            w = www.display()
        ),
    )?;
    let _nginx = Service::spawn(
        "nginx",
        {
            let mut c = Command::new("nginx");
            c.arg("-c").arg(&nginx_conf);
            c
        },
        &dir.join("nginx.log"),
    )?;
    let mut dnsmasq = Command::new("dnsmasq");
    dnsmasq.args([
        "--no-daemon",
        "--interface=metalbr0",
        "--bind-interfaces",
        "--port=0",
        "--dhcp-range=10.99.0.100,10.99.0.199,1h",
    ]);
    dnsmasq.args([
        "--dhcp-userclass=set:ipxe,iPXE",
        &format!("--dhcp-boot=tag:ipxe,http://{HOST_IP}/boot.ipxe"),
        "--dhcp-boot=tag:!ipxe,ipxe.efi",
    ]);
    dnsmasq.args([
        "--enable-tftp",
        &format!("--tftp-root={}", tftp.display()),
        &format!("--dhcp-leasefile={}", dir.join("leases").display()),
    ]);
    let _dnsmasq = Service::spawn("dnsmasq", dnsmasq, &dir.join("dnsmasq.log"))?;
    let ready = Deadline::new("nginx start", Duration::from_secs(10));
    while std::net::TcpStream::connect((HOST_IP, 80)).is_err() {
        if ready.expired() {
            bail!("nginx did not listen on {HOST_IP}:80");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let spec = VmSpec::new("ref", 90).firmware(fw).cpus(cpus).memory_mib(512).disks(vec![]);
    let mut vm = metal_lab::Vm::create(spec, dir)?;
    let start = Instant::now();
    vm.power_on()?;
    let d = Deadline::new("reference chain", Duration::from_secs(120));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(LogCursor::new(&vm.serial).wait_for(&d, "REFERENCE-INITRAMFS-MARKER", &[]))?;
    Ok(start.elapsed().as_secs_f64())
}

fn tiny_initramfs(root: &Path, out: &Path) -> Result<()> {
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy("/usr/bin/busybox", root.join("bin/busybox")).context("busybox-static")?;
    std::fs::write(
        root.join("init"),
        "#!/bin/busybox sh\n/bin/busybox echo REFERENCE-INITRAMFS-MARKER\n/bin/busybox poweroff -f\n",
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755))?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}", root.display(), out.display()))
        .status()?;
    if !status.success() {
        bail!("building the tiny initramfs failed (cpio, gzip)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::marker_u64;

    #[test]
    fn marker_numbers_by_exact_key() {
        let line = "METAL-HAMMER stage=install status=ok duration_ms=88034 stream_ms=85423 peak_rss_kib=30352 mem_available_min_kib=712624";
        assert_eq!(marker_u64(line, "duration_ms"), Some(88034));
        assert_eq!(marker_u64(line, "stream_ms"), Some(85423));
        assert_eq!(marker_u64(line, "peak_rss_kib"), Some(30352));
        assert_eq!(marker_u64(line, "ms"), None);
        assert_eq!(marker_u64(line, "status"), None);
    }
}
