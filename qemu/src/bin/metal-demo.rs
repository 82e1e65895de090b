//! The demo: one QEMU machine provisioned end to end on the embedded defaults (SQLite), with
//! the provisioning timeline shown as it happens. Run through `scripts/demo` (as root).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use metal_lab::services::{PARTITION, PROJECT, SIZE};
use metal_lab::{run_in_lab, Deadline, Lab, VmSpec};
use metal_types::{Allocation, AllocationRequest, MachineEvent, ProvisioningEvent as Ev};

#[derive(Parser)]
#[command(about = "Provision a QEMU machine end to end and keep it running until Ctrl-C")]
struct Args {
    /// Image name to install (default: debian-12 when built, else test-os).
    #[arg(long)]
    image: Option<String>,
    /// Where the lab keeps logs, disks and the SSH key.
    #[arg(long, default_value = "/tmp/metal-demo")]
    dir: PathBuf,
    /// Memory of the machine in MiB.
    #[arg(long, default_value_t = 2048)]
    memory_mib: u64,
    /// Virtual CPUs of the machine (QEMU runs one emulation thread per vCPU).
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Stop after the machine phoned home instead of waiting for Ctrl-C.
    #[arg(long)]
    no_wait: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    run_in_lab(|| demo(args))
}

async fn demo(args: Args) -> Result<()> {
    let started = Instant::now();
    println!("==> starting the lab: network namespace, radvd, metal-api (SQLite, HTTPS with a CA made for this lab), pixie");
    let mut lab = Lab::start(Some(&args.dir)).await?;
    let image = match &args.image {
        Some(n) => lab.image(n).with_context(|| format!("no image named {n} was built (scripts/build-lab)"))?,
        None => lab.image("debian-12").or_else(|| lab.image("test-os")).context("no image built")?,
    }
    .clone();
    println!(
        "    API {}  pixie {}  image {} ({} MB compressed)",
        metal_lab::services::api_url(),
        metal_lab::services::pixie_url(),
        image.id,
        image.manifest.compressed_size / 1_000_000
    );

    let key = args.dir.join("id_ed25519");
    let status = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-C", "metal-demo", "-f"]).arg(&key).status();
    let pubkey = match status {
        Ok(s) if s.success() => std::fs::read_to_string(key.with_extension("pub"))?.trim().to_string(),
        _ => {
            println!("    (ssh-keygen not found: the machine gets no SSH key)");
            String::new()
        }
    };

    let i = lab.add_vm(VmSpec::new("demo1", 1).cpus(args.cpus).memory_mib(args.memory_mib))?;
    let id = lab.vms[i].machine_id();
    println!("==> powering on machine {id} (BIOS, PXE); serial console: {}", lab.vms[i].serial.display());
    lab.vms[i].power_on()?;
    let mut timeline = Timeline::new(started, lab.vms[i].serial.clone());

    let d = Deadline::new("power-on to Waiting", Duration::from_secs(300));
    follow(&lab, &mut timeline, id, Ev::Waiting, &d).await?;
    let waiting_at = started.elapsed();

    println!("==> allocating it: hostname demo1, image {}", image.id);
    let req = AllocationRequest {
        project: PROJECT.into(),
        partition: PARTITION.into(),
        size: Some(SIZE.into()),
        machine: None,
        image: image.id.clone(),
        hostname: "demo1".into(),
        layout: None,
        ssh_keys: if pubkey.is_empty() { vec![] } else { vec![pubkey] },
        user_data: serde_json::json!({"expect": {"hostname": "demo1"}}).to_string(),
        idempotency_key: Some("metal-demo".into()),
    };
    let t_alloc = Instant::now();
    let alloc: Allocation = lab.tenant.allocate(&req).await?.allocation;
    println!("    allocation {} on machine {}", alloc.id, alloc.machine);
    let d = Deadline::new("allocation to Phoned Home", Duration::from_secs(600));
    follow(&lab, &mut timeline, id, Ev::PhonedHome, &d).await?;
    let to_phone_home = t_alloc.elapsed();

    println!();
    println!("==> machine {id} is running {}", image.id);
    println!("    power-on → Waiting:        {:>6.1} s", waiting_at.as_secs_f64());
    println!("    allocation → Phoned Home:  {:>6.1} s", to_phone_home.as_secs_f64());
    let ip = lab.lease_ip(&lab.vms[i].spec.mac());
    let me = std::process::id();
    println!("    reach it from the lab namespace (in another shell, as root):");
    if let Some(ip) = ip {
        println!("      nsenter --net=/proc/{me}/ns/net ssh -i {} -o StrictHostKeyChecking=no root@{ip}", key.display());
    }
    let ca = lab.ca_file().map(|c| format!("METALCTL_CA_FILE={} ", c.display())).unwrap_or_default();
    println!(
        "      {ca}nsenter --net=/proc/{me}/ns/net {} --api-url {} --token {} machine ls",
        lab.paths.bin("metalctl").display(),
        metal_lab::services::api_url(),
        lab.admin_token
    );
    println!("    serial console: tail -f {}", lab.vms[i].serial.display());
    lab.pass();
    if !args.no_wait {
        println!("==> press Ctrl-C to stop the machine and clean up");
        tokio::signal::ctrl_c().await?;
        println!("==> cleaning up");
    }
    Ok(())
}

/// Prints the machine's events as they arrive until `until` is seen.
async fn follow(lab: &Lab, tl: &mut Timeline, id: metal_types::MachineId, until: Ev, d: &Deadline) -> Result<()> {
    loop {
        tl.print_progress();
        let events = lab.admin.events(id).await.unwrap_or_default();
        for e in events.iter().skip(tl.printed) {
            tl.print(e);
        }
        tl.printed = events.len();
        if let Some(e) = events.iter().rev().find(|e| e.event == Ev::Crashed) {
            anyhow::bail!("machine crashed: {}", e.message);
        }
        if events.iter().any(|e| e.event == until) && tl.seen(until) {
            return Ok(());
        }
        if d.expired() {
            anyhow::bail!("timed out in phase {:?}\n{}", d.phase, lab.report());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

struct Timeline {
    started: Instant,
    printed: usize,
    counts: HashMap<Ev, usize>,
    last: Option<Instant>,
    serial: PathBuf,
    serial_offset: usize,
}

impl Timeline {
    fn new(started: Instant, serial: PathBuf) -> Timeline {
        Timeline { started, printed: 0, counts: HashMap::new(), last: None, serial, serial_offset: 0 }
    }

    /// Prints metal-hammer's stage markers and install progress from the serial console.
    fn print_progress(&mut self) {
        let bytes = std::fs::read(&self.serial).unwrap_or_default();
        if bytes.len() <= self.serial_offset {
            return;
        }
        let text = String::from_utf8_lossy(&bytes[self.serial_offset..]).into_owned();
        let Some(end) = text.rfind('\n') else { return };
        self.serial_offset += end + 1;
        for line in text[..end].lines() {
            if let Some(i) = line.find("METAL-HAMMER stage=").or_else(|| line.find("metal-hammer: stream:")) {
                println!("    {:>7.1} s               | {}", self.started.elapsed().as_secs_f64(), line[i..].trim());
            }
        }
    }
    fn print(&mut self, e: &MachineEvent) {
        let now = Instant::now();
        let delta = self.last.map(|l| now - l).unwrap_or_default();
        self.last = Some(now);
        *self.counts.entry(e.event).or_default() += 1;
        let flag = if e.unexpected { "  (unexpected)" } else { "" };
        println!(
            "    {:>7.1} s  (+{:>5.1} s)  {:<20} {}{flag}",
            self.started.elapsed().as_secs_f64(),
            delta.as_secs_f64(),
            e.event.as_str(),
            e.message
        );
    }
    fn seen(&self, ev: Ev) -> bool {
        self.counts.get(&ev).copied().unwrap_or(0) > 0
    }
}
