//! A simulated metal-hammer (feature `sim`): one machine speaking the agent contract over the
//! typed client the way metal-hammer and the installed OS do — pixie's PXE event and boot
//! decision, registration with the enrolment token from the kernel command line, events, the
//! wipe report, long-polls, the install report and the phone home. The API's tests, metalctl's
//! tests and the scale simulator (`metal-sim`) all drive machines through it.

use std::time::{Duration, Instant};

use crate::api::{Client, ClientError};
use metal_types::{
    cmdline, Arch, BootDecision, BootInfo, BootRequest, Cpu, Disk, DiskWipe, Dmi, EventBatch, EventReport, InstallInstructions,
    InstallReport, Inventory, MachineId, Nic, PhoneHome, ProvisioningEvent, PxeEvent, RegisterRequest, RegisterResponse,
    WipeReport,
};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Api(#[from] ClientError),
    #[error("the boot decision is not metal-hammer: {0}")]
    NotHammer(String),
    #[error("no metal.token on the command line {0:?}")]
    NoToken(String),
    #[error("the agent has not registered yet")]
    NotRegistered,
    #[error("no allocation for machine {machine} within {within:?}")]
    NoAllocation { machine: MachineId, within: Duration },
}

pub type Result<T> = std::result::Result<T, SimError>;

/// Milliseconds since the Unix epoch, the agent's clock.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The machine number `n` as a UUID (`6b1f2c3d-0000-4000-8000-<n>`), stable across runs.
pub fn machine_id(n: u32) -> MachineId {
    MachineId(uuid::Uuid::from_u128(0x6b1f_2c3d_0000_4000_8000_0000_0000_0000 + u128::from(n)))
}

/// The MAC of machine `n`: `52:54:00:` and `n` in the last three octets.
pub fn mac(n: u32) -> String {
    format!("52:54:00:{:02x}:{:02x}:{:02x}", (n >> 16) & 0xff, (n >> 8) & 0xff, n & 0xff)
}

/// A small VM's inventory: 2 cores, 2 GiB, one 10 GiB virtio disk, one NIC.
pub fn inventory(uuid: MachineId, mac: &str) -> Inventory {
    Inventory {
        uuid,
        cpus: vec![Cpu { model: "QEMU Virtual CPU".into(), cores: 2, threads: 2 }],
        memory_bytes: 2 << 30,
        disks: vec![Disk {
            name: "vda".into(),
            size_bytes: 10 << 30,
            model: "QEMU HARDDISK".into(),
            serial: format!("disk-{uuid}"),
            rotational: false,
            logical_sector_size: 512,
            physical_sector_size: 512,
            bus: "virtio".into(),
            ..Default::default()
        }],
        nics: vec![Nic { name: "eth0".into(), mac: mac.into(), driver: "virtio_net".into(), speed_mbps: None, carrier: true }],
        dmi: Dmi {
            sys_vendor: "QEMU".into(),
            product_name: "Standard PC (i440FX + PIIX, 1996)".into(),
            product_serial: format!("serial-{uuid}"),
            ..Default::default()
        },
        lldp: vec![],
    }
}

/// One simulated machine.
pub struct SimAgent {
    pub inventory: Inventory,
    pub partition: String,
    /// The machine credential, once registered.
    pub credential: String,
    api: Client,
    agent: Option<Client>,
}

impl SimAgent {
    /// Machine `n` of [`machine_id`]/[`mac`] with [`inventory`], in `partition`, talking to the
    /// API of `api` (its token is not used: the agent has its own).
    pub fn new(api: &Client, partition: &str, n: u32) -> SimAgent {
        let mut inv = inventory(machine_id(n), &mac(n));
        inv.disks[0].serial = format!("disk-{n}");
        inv.dmi.product_serial = format!("serial-{n}");
        SimAgent::with_inventory(api, partition, inv)
    }

    pub fn with_inventory(api: &Client, partition: &str, inventory: Inventory) -> SimAgent {
        SimAgent { inventory, partition: partition.into(), credential: String::new(), api: api.with_token(""), agent: None }
    }

    /// An agent that registered earlier (its credential kept by the caller).
    pub fn with_credential(mut self, credential: impl Into<String>) -> SimAgent {
        self.credential = credential.into();
        self.agent = Some(self.api.with_token(self.credential.clone()));
        self
    }

    pub fn id(&self) -> MachineId {
        self.inventory.uuid
    }

    pub fn mac(&self) -> &str {
        &self.inventory.nics[0].mac
    }

    /// The client with the machine credential.
    pub fn agent(&self) -> Result<&Client> {
        self.agent.as_ref().ok_or(SimError::NotRegistered)
    }

    /// What pixie does when the machine PXE boots: report the sighting, ask for the decision.
    pub async fn pxe_boot(&self, pixie: &Client) -> Result<BootDecision> {
        self.pxe_event(pixie).await?;
        let req =
            BootRequest { partition: self.partition.clone(), mac: self.mac().into(), uuid: Some(self.id()), arch: Arch::BiosX86 };
        Ok(pixie.boot_decide(&req).await?)
    }

    /// Only the sighting pixie reports for a PXE request.
    pub async fn pxe_event(&self, pixie: &Client) -> Result<()> {
        let ev = PxeEvent {
            partition: self.partition.clone(),
            mac: self.mac().into(),
            uuid: Some(self.id()),
            arch: Arch::BiosX86,
            message: "simulated PXE boot".into(),
        };
        Ok(pixie.pxe_event(&ev).await?)
    }

    /// Boots metal-hammer from `decision` and registers with the enrolment token of its command
    /// line; then reports `Preparing` and `Registering` as metal-hammer does (it queues them
    /// before it has a credential).
    pub async fn register(&mut self, decision: &BootDecision) -> Result<RegisterResponse> {
        let BootDecision::Hammer { cmdline, .. } = decision else { return Err(SimError::NotHammer(format!("{decision:?}"))) };
        let token = cmdline::split(cmdline)
            .into_iter()
            .find(|(k, _)| k == "metal.token")
            .map(|(_, v)| v)
            .ok_or_else(|| SimError::NoToken(cmdline.clone()))?;
        let req = RegisterRequest { partition: self.partition.clone(), inventory: self.inventory.clone() };
        let resp = self.api.with_token(token).register(&req).await?;
        self.credential = resp.credential.clone();
        self.agent = Some(self.api.with_token(resp.credential.clone()));
        self.events(&[(ProvisioningEvent::Preparing, "sim"), (ProvisioningEvent::Registering, "sim")]).await?;
        Ok(resp)
    }

    pub async fn events(&self, events: &[(ProvisioningEvent, &str)]) -> Result<()> {
        let now = now_ms();
        let batch = EventBatch {
            events: events.iter().map(|(event, m)| EventReport { event: *event, time_ms: now, message: m.to_string() }).collect(),
        };
        Ok(self.agent()?.events(&batch).await?)
    }

    /// A wipe report for the one disk.
    pub async fn wipe(&self) -> Result<()> {
        let report = WipeReport { disks: vec![DiskWipe { disk: "vda".into(), method: "discard".into(), duration_ms: 12 }] };
        Ok(self.agent()?.wipe_report(&report).await?)
    }

    /// PXE boot → register → wipe → `Waiting`.
    pub async fn join_pool(&mut self, pixie: &Client) -> Result<RegisterResponse> {
        let d = self.pxe_boot(pixie).await?;
        let r = self.register(&d).await?;
        self.wipe().await?;
        self.events(&[(ProvisioningEvent::Waiting, "disks wiped, waiting for an allocation")]).await?;
        Ok(r)
    }

    /// One long-poll: `Some` with instructions, `None` when it ended without (every poll is a
    /// heartbeat).
    pub async fn wait(&self, timeout_s: u64) -> Result<Option<InstallInstructions>> {
        Ok(self.agent()?.wait(timeout_s).await?)
    }

    /// Long-polls (2 s each) until the machine is allocated or `within` passed.
    pub async fn wait_for_allocation(&self, within: Duration) -> Result<InstallInstructions> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(ins) = self.wait(2).await? {
                return Ok(ins);
            }
        }
        Err(SimError::NoAllocation { machine: self.id(), within })
    }

    /// Installs as metal-hammer would (`Installing`, the install report, `Booting New Kernel`).
    pub async fn install(&self, ins: &InstallInstructions) -> Result<()> {
        self.events(&[(ProvisioningEvent::Installing, &format!("image {}", ins.image.id))]).await?;
        let report = InstallReport {
            allocation: ins.allocation,
            success: true,
            message: String::new(),
            boot: Some(BootInfo {
                root_uuid: "0b4e7d1c-9a7e-4a44-a3a0-5b0c8a3f9d11".into(),
                kernel: "/boot/vmlinuz".into(),
                initrd: "/boot/initrd.img".into(),
                cmdline: "console=ttyS0".into(),
            }),
        };
        self.agent()?.install_report(&report).await?;
        self.events(&[(ProvisioningEvent::BootingNewKernel, "kexec")]).await
    }

    /// The installed OS phoning home with the allocation's token. The instructions' URL names
    /// the API as the partition's machines reach it; the simulator uses only the token and the
    /// API it talks to.
    pub async fn phone_home(&self, ins: &InstallInstructions) -> Result<()> {
        let ph = PhoneHome { machine: self.id(), time_ms: now_ms(), message: "booted".into() };
        Ok(self.api.with_token(ins.phone_home.token.clone()).phone_home(&ph).await?)
    }

    pub async fn install_and_phone_home(&self, ins: &InstallInstructions) -> Result<()> {
        self.install(ins).await?;
        self.phone_home(ins).await
    }
}
