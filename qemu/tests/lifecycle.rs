//! End-to-end scenarios in QEMU: real firmware, the Debian kernel, our services.
//!
//! These need root, QEMU and the lab artifacts (`scripts/build-lab`); they run in the nextest
//! profile `e2e` (see `.config/nextest.toml`) and are ignored by plain `cargo test`.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{allocate, metalctl, OLD_DATA};
use metal_lab::services::SIZE;
use metal_lab::{run_in_lab, Deadline, Lab, VmSpec};
use metal_types::{Machine, ProvisioningEvent as Ev};

/// Scenarios 1 and 4: a BIOS machine PXE boots into metal-hammer, registers with the right
/// inventory, wipes its disk, waits; is allocated with the test OS, installs it, kexecs, phones
/// home, and the verifier inside the OS passes. Then it is freed, power-cycled, wiped again
/// (the tenant's data is gone), waits again, and a second allocation installs another image.
#[test]
#[ignore = "end-to-end: needs root, QEMU and scripts/build-lab; run with the e2e nextest profile"]
fn bios_lifecycle_and_reclaim() -> Result<()> {
    run_in_lab(|| async {
        let mut lab = Lab::start(None).await?;
        let image = lab.image("test-os").context("no test-os image in target/lab/images")?.id.clone();
        let i = lab.add_vm(VmSpec::new("bios1", 1))?;
        lab.vms[i].write_disk(0, 100 << 20, OLD_DATA)?;
        let id = lab.vms[i].machine_id();
        let mut serial = lab.vms[i].serial_cursor();
        lab.vms[i].power_on()?;

        // Power-on → Waiting.
        let d = Deadline::new("power-on to Waiting", Duration::from_secs(180));
        serial.wait_for(&d, "METAL-HAMMER stage=register status=ok", &["status=error"]).await?;
        let mut seen = lab.admin.wait_event(&d, id, Ev::Waiting, 0).await?;
        let m: Machine = lab.admin.machine(id).await?;
        let inv = m.inventory.as_ref().context("registered machine has no inventory")?;
        ensure!(inv.uuid == id, "inventory uuid {} != {id}", inv.uuid);
        ensure!(
            inv.nics.iter().any(|n| n.mac == lab.vms[i].spec.mac()),
            "NIC {} not in inventory {:?}",
            lab.vms[i].spec.mac(),
            inv.nics
        );
        ensure!(inv.disks.iter().any(|d| d.size_bytes == 2048 << 20), "2 GiB disk not in inventory {:?}", inv.disks);
        ensure!(m.size == SIZE, "machine matched size {:?}, expected {SIZE}", m.size);
        ensure!(lab.vms[i].read_disk(0, 100 << 20, OLD_DATA.len())? != OLD_DATA, "old data survived the wipe");

        // Allocation → Phoned Home, verified inside the OS.
        let alloc = allocate(&lab, "bios1-a", &image).await?;
        ensure!(alloc.machine == id, "allocated {} instead of the only machine {id}", alloc.machine);
        let d = Deadline::new("allocation to Phoned Home", Duration::from_secs(150));
        seen = lab.admin.wait_event(&d, id, Ev::Installing, seen).await?;
        seen = lab.admin.wait_event(&d, id, Ev::BootingNewKernel, seen).await?;
        serial.wait_for(&d, "TEST-OS booted", &["METAL-HAMMER stage=fatal"]).await?;
        serial.wait_for(&d, "PHONE-HOME status=ok", &["PHONE-HOME status=error"]).await?;
        seen = lab.admin.wait_event(&d, id, Ev::PhonedHome, seen).await?;
        serial.wait_for(&d, "TEST-OS VERIFY PASS", &["TEST-OS VERIFY FAIL"]).await?;

        // Release → power cycle → wiped → Waiting → a second allocation.
        metalctl(&lab, &lab.tenant.token, &["machine", "free", &id.to_string()])?;
        seen = lab.admin.wait_event(&Deadline::new("free", Duration::from_secs(10)), id, Ev::MachineReclaim, seen).await?;
        lab.vms[i].reset()?;
        let d = Deadline::new("reclaim to Waiting", Duration::from_secs(180));
        serial.wait_for(&d, "METAL-HAMMER stage=wipe status=ok", &["status=error"]).await?;
        seen = lab.admin.wait_event(&d, id, Ev::Waiting, seen).await?;
        // ext4 magic 0xEF53 sits 0x38 bytes into the superblock, 1 KiB into the root partition.
        let root_fs = lab.vms[i].read_disk(0, (65 << 20) + 1024 + 0x38, 2)?;
        ensure!(root_fs != [0x53, 0xef], "the ext4 superblock of the tenant's root survived the reclaim wipe");

        // Reinstall with another image: any other test-os version build-lab made.
        let other = lab
            .images
            .iter()
            .find(|i| i.manifest.name == "test-os" && i.id != image)
            .context("only one test-os version built")?
            .id
            .clone();
        let alloc2 = allocate(&lab, "bios1-b", &other).await?;
        ensure!(alloc2.id != alloc.id, "second allocation reused the first one's id");
        ensure!(alloc2.image == other, "second allocation got image {}, asked for {other}", alloc2.image);
        let d = Deadline::new("second allocation to Phoned Home", Duration::from_secs(150));
        lab.admin.wait_event(&d, id, Ev::PhonedHome, seen).await?;
        serial.wait_for(&d, "TEST-OS VERIFY PASS", &["TEST-OS VERIFY FAIL"]).await?;
        lab.pass();
        Ok(())
    })
}
