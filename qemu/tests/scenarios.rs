//! End-to-end scenarios beyond the basic lifecycle (see `lifecycle.rs` for how they run).

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{allocate, metalctl};
use metal_lab::{run_in_lab, Deadline, DiskBus, DiskSpec, Firmware, Lab, VmSpec};
use metal_types::{Image, ProvisioningEvent as Ev};

/// Scenarios 2 and 3: a UEFI machine whose NIC has no option ROM, so OVMF's own PXE fetches
/// iPXE from pixie's TFTP and chains to HTTP; the whole lifecycle onto an NVMe disk. Then the
/// installed machine is reset: pixie's script tells iPXE to leave (`exit 1`), the firmware moves
/// on through its boot order to the NVMe disk (systemd-boot, installed by the image's bootloader
/// hook), metal-hammer never starts, and the installed OS phones home again.
#[test]
#[ignore = "end-to-end: needs root, QEMU and scripts/build-lab; run with the e2e nextest profile"]
fn uefi_nvme_lifecycle_and_reboot_from_disk() -> Result<()> {
    run_in_lab(|| async {
        let mut lab = Lab::start(None).await?;
        let (i, seen) = uefi_nvme_installed(&mut lab, "uefi1", 2).await?;
        let id = lab.vms[i].machine_id();
        let mut serial = lab.vms[i].serial_cursor();
        serial.wait_for(&Deadline::new("first boot", Duration::from_secs(60)), "TEST-OS VERIFY PASS", &[]).await?;
        lab.vms[i].reset()?;
        let d = Deadline::new("reboot from disk to Phoned Home", Duration::from_secs(240));
        // OVMF names each boot option it loads; the NVMe disk's must come before the test OS.
        serial.wait_for(&d, "UEFI QEMU NVMe Ctrl", &["METAL-HAMMER stage=boot", "TEST-OS booted"]).await?;
        serial.wait_for(&d, "TEST-OS booted", &["METAL-HAMMER stage=boot"]).await?;
        lab.admin.wait_event(&d, id, Ev::PhonedHome, seen).await?;
        serial.wait_for(&d, "TEST-OS VERIFY PASS", &["TEST-OS VERIFY FAIL"]).await?;
        let m = lab.admin.machine(id).await?;
        ensure!(m.allocation.is_some(), "the machine lost its allocation across the reboot");
        lab.pass();
        Ok(())
    })
}

/// A UEFI machine with an NVMe disk, PXE booted, registered, allocated with the test OS and
/// phoned home with the verifier passing. Returns its index and the timeline position.
async fn uefi_nvme_installed(lab: &mut Lab, name: &str, index: u8) -> Result<(usize, usize)> {
    let image = lab.image("test-os").context("no test-os image")?.id.clone();
    let spec = VmSpec::new(name, index).firmware(Firmware::Uefi).disks(vec![DiskSpec { bus: DiskBus::Nvme, size_mib: 2048 }]);
    let i = lab.add_vm(spec)?;
    let id = lab.vms[i].machine_id();
    let mut serial = lab.vms[i].serial_cursor();
    lab.vms[i].power_on()?;

    let d = Deadline::new("power-on to Waiting", Duration::from_secs(240));
    let mut seen = lab.admin.wait_event(&d, id, Ev::Waiting, 0).await?;
    let m = lab.admin.machine(id).await?;
    let inv = m.inventory.context("no inventory")?;
    ensure!(inv.disks.iter().any(|d| d.name.starts_with("nvme") && d.bus == "nvme"), "no NVMe disk in {:?}", inv.disks);

    allocate(lab, name, &image).await?;
    let d = Deadline::new("allocation to Phoned Home", Duration::from_secs(180));
    seen = lab.admin.wait_event(&d, id, Ev::PhonedHome, seen).await?;
    serial.wait_for(&d, "TEST-OS VERIFY PASS", &["TEST-OS VERIFY FAIL"]).await?;
    Ok((i, seen))
}

/// Scenario 5: three machines boot together; three allocations land on three machines.
#[test]
#[ignore = "end-to-end: needs root, QEMU and scripts/build-lab; run with the e2e nextest profile"]
fn three_machines_at_once() -> Result<()> {
    run_in_lab(|| async {
        let mut lab = Lab::start(None).await?;
        let image = lab.image("test-os").context("no test-os image")?.id.clone();
        for n in 0..3u8 {
            let i = lab.add_vm(VmSpec::new(&format!("multi{n}"), 10 + n).memory_mib(768))?;
            lab.vms[i].power_on()?;
        }
        let d = Deadline::new("three machines to Waiting", Duration::from_secs(360));
        for vm in &lab.vms {
            lab.admin.wait_event(&d, vm.machine_id(), Ev::Waiting, 0).await?;
        }
        let mut machines = Vec::new();
        for n in 0..3 {
            machines.push(allocate(&lab, &format!("multi-{n}"), &image).await?.machine);
        }
        machines.sort();
        machines.dedup();
        ensure!(machines.len() == 3, "allocations landed on {} distinct machines, not 3", machines.len());
        let err =
            allocate(&lab, "one-too-many", &image).await.err().context("a fourth allocation succeeded with three machines")?;
        ensure!(format!("{err:#}").contains("no_machine_available"), "fourth allocation failed without the clear error: {err:#}");
        let d = Deadline::new("three installs to Phoned Home", Duration::from_secs(360));
        for vm in &lab.vms {
            lab.admin.wait_event(&d, vm.machine_id(), Ev::PhonedHome, 0).await?;
        }
        lab.pass();
        Ok(())
    })
}

/// Scenario 6: an image whose checksum does not match → `Crashed` with the reason, no kexec,
/// and after the tenant frees it the machine is clean and waiting again. Meanwhile the API is
/// killed and restarted while the machine waits, and pixie is restarted while it boots.
#[test]
#[ignore = "end-to-end: needs root, QEMU and scripts/build-lab; run with the e2e nextest profile"]
fn faults_bad_checksum_and_service_restarts() -> Result<()> {
    run_in_lab(|| async {
        let mut lab = Lab::start(None).await?;
        let good = lab.image("test-os").context("no test-os image")?.clone();
        let mut bad: Image = good.clone();
        bad.manifest.version = format!("{}-badsum", good.manifest.version);
        bad.manifest.sha256 = "0".repeat(64);
        bad.id = String::new();
        let (bad, _) = lab.admin.create(&bad).await?;

        let i = lab.add_vm(VmSpec::new("fault1", 3))?;
        let id = lab.vms[i].machine_id();
        let mut serial = lab.vms[i].serial_cursor();
        lab.vms[i].power_on()?;
        // pixie restarted while the machine is in the middle of PXE (it has its DHCP lease; a
        // machine the API does not know yet has no PXE Booting event to wait for).
        let d = Deadline::new("PXE", Duration::from_secs(120));
        let mac = lab.vms[i].mac();
        metal_lab::wait::until(&d, "the machine's DHCP lease from pixie", || async { lab.lease_ip(&mac) }).await?;
        lab.restart_pixie().await?;
        let d = Deadline::new("power-on to Waiting", Duration::from_secs(240));
        let mut seen = lab.admin.wait_event(&d, id, Ev::Waiting, 0).await?;

        // The API crashes while the machine waits; the machine reconnects.
        lab.restart_api(true).await?;
        allocate(&lab, "fault1", &bad.id).await?;
        let d = Deadline::new("bad image to Crashed", Duration::from_secs(180));
        seen = lab.admin.wait_event(&d, id, Ev::Crashed, seen).await?;
        let events = lab.admin.events(id).await?;
        let crash = events.iter().rev().find(|e| e.event == Ev::Crashed).unwrap();
        ensure!(
            crash.message.to_lowercase().contains("checksum") || crash.message.contains("sha256"),
            "Crashed without the reason: {:?}",
            crash.message
        );
        ensure!(!events.iter().any(|e| e.event == Ev::BootingNewKernel), "a bad image reached Booting New Kernel");

        metalctl(&lab, &lab.tenant.token, &["machine", "free", &id.to_string()])?;
        let d = Deadline::new("crash to clean Waiting", Duration::from_secs(240));
        seen = lab.admin.wait_event_past_crashes(&d, id, Ev::MachineReclaim, seen).await?;
        seen = lab.admin.wait_event_past_crashes(&d, id, Ev::Waiting, seen).await?;
        ensure!(!lab.vms[i].serial_tail(400).contains("TEST-OS booted"), "the bad image was booted");
        allocate(&lab, "fault1-good", &good.id).await?;
        let d = Deadline::new("good image to Phoned Home", Duration::from_secs(180));
        lab.admin.wait_event(&d, id, Ev::PhonedHome, seen).await?;
        serial.wait_for(&d, "TEST-OS VERIFY PASS", &["TEST-OS VERIFY FAIL"]).await?;
        lab.pass();
        Ok(())
    })
}

/// Scenario 7: a real Debian image built by image-builder with debootstrap: provisioned, boots
/// systemd, phones home, and SSH into it works from inside the namespace with the allocated key.
#[test]
#[ignore = "end-to-end: needs root, QEMU and scripts/build-lab with WITH_DEBIAN=1"]
fn debian_image_boots_systemd_and_accepts_ssh() -> Result<()> {
    run_in_lab(|| async {
        let mut lab = Lab::start(None).await?;
        let image = lab.image("debian-12").context("no debian-12 image: scripts/build-lab with WITH_DEBIAN=1")?.id.clone();
        let key = lab.dir.join("id_ed25519");
        let st = std::process::Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status()?;
        ensure!(st.success(), "ssh-keygen failed");
        let pubkey = std::fs::read_to_string(key.with_extension("pub"))?.trim().to_string();
        let i =
            lab.add_vm(VmSpec::new("deb1", 4).memory_mib(2048).disks(vec![DiskSpec { bus: DiskBus::Virtio, size_mib: 4096 }]))?;
        let id = lab.vms[i].machine_id();
        lab.vms[i].power_on()?;
        let d = Deadline::new("power-on to Waiting", Duration::from_secs(240));
        let seen = lab.admin.wait_event(&d, id, Ev::Waiting, 0).await?;
        let req = metal_types::AllocationRequest {
            project: metal_lab::services::PROJECT.into(),
            partition: metal_lab::services::PARTITION.into(),
            size: None,
            machine: Some(id),
            image,
            hostname: "deb1".into(),
            layout: None,
            ssh_keys: vec![pubkey],
            user_data: String::new(),
            idempotency_key: None,
        };
        lab.tenant.allocate(&req).await?;
        let d = Deadline::new("allocation to Phoned Home", Duration::from_secs(300));
        lab.admin.wait_event(&d, id, Ev::PhonedHome, seen).await?;
        let ip = lab.lease_ip(&lab.vms[i].spec.mac()).context("no lease for the machine in pixie's lease file")?;
        let d = Deadline::new("sshd accepting", Duration::from_secs(60));
        let addr: std::net::SocketAddr = format!("{ip}:22").parse()?;
        metal_lab::wait::until(&d, "port 22 of the Debian machine", || async {
            tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())
        })
        .await?;
        let out = std::process::Command::new("ssh")
            .args(["-i"])
            .arg(&key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "BatchMode=yes",
            ])
            .arg(format!("root@{ip}"))
            .args(["cat /etc/hostname; ls /etc/ssh/; systemctl is-system-running --wait || true"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success() && text.contains("deb1"),
            "ssh into the Debian machine failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Host keys made on this machine at first boot (the image carries none), no RSA one.
        ensure!(
            text.contains("ssh_host_ed25519_key.pub")
                && text.contains("ssh_host_ecdsa_key.pub")
                && !text.contains("ssh_host_rsa_key"),
            "unexpected SSH host keys on the machine: {text}"
        );
        lab.pass();
        Ok(())
    })
}
