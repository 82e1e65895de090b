//! Wire types shared by every part of the stack.
//!
//! The API (`api/`), the boot service (`pixie/`), the in-machine agent (`metal-hammer/`) and the
//! image builder (`image-builder/`) all speak JSON over HTTP. Every request and response body they
//! exchange is defined here, once, so the parts cannot drift apart. This crate does no I/O.
//!
//! With the `openapi` feature every type also implements `utoipa::ToSchema`, which the API uses
//! to generate its OpenAPI document.

pub mod catalog;
pub mod cmdline;
pub mod event;
pub mod ids;
pub mod mac;
pub mod url;

pub use catalog::CatalogObject;
pub use event::{Liveliness, ProvisioningEvent};
pub use ids::{AllocationId, ImageId, MachineId, ParseIdError};
pub use mac::{Mac, ParseMacError};

use serde::{Deserialize, Serialize};

#[cfg(feature = "openapi")]
use utoipa::ToSchema;

/// The HTTP header that carries every token: `Authorization: Bearer <token>`.
pub const AUTH_HEADER: &str = "authorization";

/// The serial-console marker prefix every stage of metal-hammer prints, e.g.
/// `METAL-HAMMER stage=register status=ok`.
pub const HAMMER_MARKER: &str = "METAL-HAMMER";

// ---------------------------------------------------------------------------------------------
// Catalog: partitions, sizes, images, filesystem layouts, projects
// ---------------------------------------------------------------------------------------------

/// A partition is one network segment with its own pixie: where machines PXE boot, and what
/// they boot while they are not allocated (the metal-hammer kernel and initramfs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Partition {
    /// Short name, e.g. `lab` or `fra-1`.
    pub id: String,
    #[serde(default)]
    pub description: String,
    pub boot: PartitionBoot,
}

/// What a machine of this partition boots while it is not running a tenant OS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PartitionBoot {
    /// URL of the metal-hammer kernel (usually served by pixie).
    pub kernel_url: String,
    /// URL of the metal-hammer initramfs.
    pub initrd_url: String,
    /// Extra kernel command line, e.g. `console=ttyS0`. The API appends `metal.*` parameters.
    #[serde(default)]
    pub cmdline: String,
    /// The API URL as machines in this partition reach it; put on the kernel command line.
    pub api_url: String,
}

/// A machine size: a machine matches a size when every constraint holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Size {
    pub id: String,
    #[serde(default)]
    pub description: String,
    pub constraints: Vec<SizeConstraint>,
}

/// One inclusive range on one property of the hardware.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SizeConstraint {
    pub kind: ConstraintKind,
    pub min: u64,
    pub max: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ConstraintKind {
    /// CPU cores (physical), summed over sockets.
    Cores,
    /// Memory in bytes.
    Memory,
    /// Total storage in bytes, summed over all disks.
    Storage,
}

/// Uncompressed bytes per zstd frame of an OS image as image-builder writes it (the last frame
/// may be shorter): independent frames that metal-hammer can decompress on several cores.
pub const IMAGE_FRAME: usize = 8 << 20;

/// Format of an OS image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub enum ImageFormat {
    /// A zstd-compressed tar of a root filesystem, extracted onto the layout's filesystems.
    #[serde(rename = "tar.zst")]
    TarZst,
    /// A zstd-compressed raw disk image written to the first disk as it is.
    #[serde(rename = "raw.zst")]
    RawZst,
}

impl ImageFormat {
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::TarZst => "tar.zst",
            ImageFormat::RawZst => "raw.zst",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ImageClassification {
    Preview,
    #[default]
    Supported,
    Deprecated,
}

/// The manifest image-builder writes next to every image (`<name>-<version>.<format>.json`),
/// and the body of `POST /v1/images` (plus `url`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    /// `debian-12`, `test-os`.
    pub name: String,
    /// `20261124` or `20261124.1`; images with the same name sort by version.
    pub version: String,
    /// Free text, e.g. `Debian GNU/Linux 12 (bookworm)`.
    #[serde(default)]
    pub os: String,
    pub format: ImageFormat,
    /// Size of the compressed file in bytes.
    pub compressed_size: u64,
    /// Size after decompression in bytes.
    pub uncompressed_size: u64,
    /// Lower-case hex SHA-256 of the compressed file, as downloaded.
    pub sha256: String,
    /// Kernel inside the image, relative to its root, e.g. `boot/vmlinuz`.
    pub kernel: String,
    /// Initrd inside the image, relative to its root; empty when there is none.
    #[serde(default)]
    pub initrd: String,
    /// Default kernel command line, without `root=` (metal-hammer adds `root=UUID=…`).
    #[serde(default)]
    pub cmdline: String,
    /// Installed packages (`name version`), when known.
    #[serde(default)]
    pub packages: Vec<String>,
}

impl ImageManifest {
    /// The image id: `<name>-<version>`.
    pub fn id(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }
}

/// An image in the API's catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Image {
    /// `<name>-<version>`, e.g. `debian-12-20261124`. Set by the API from the manifest.
    #[serde(default)]
    pub id: String,
    /// Where machines download the image from.
    pub url: String,
    #[serde(default)]
    pub classification: ImageClassification,
    /// RFC 3339; after it the image cannot be allocated any more.
    #[serde(default)]
    pub expires_at: Option<String>,
    #[serde(flatten)]
    pub manifest: ImageManifest,
}

/// Type of a GPT partition in a filesystem layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum GptType {
    /// EFI system partition.
    Efi,
    /// Linux filesystem data.
    Linux,
    /// Linux swap.
    Swap,
    /// BIOS boot partition (for GRUB on BIOS/GPT).
    BiosBoot,
}

/// One GPT partition of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GptPartition {
    /// Partition number, 1-based.
    pub number: u32,
    pub label: String,
    /// Size in MiB; 0 means "the rest of the disk" (only for the last partition).
    pub size_mib: u64,
    #[serde(rename = "type")]
    pub gpt_type: GptType,
}

/// One disk of a layout. `device` names the disk in the machine: `/dev/vda`, `/dev/nvme0n1`,
/// or `first` for the first (by kernel name order) non-removable disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LayoutDisk {
    pub device: String,
    pub partitions: Vec<GptPartition>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FsKind {
    Ext4,
    Vfat,
    Swap,
}

/// A filesystem on a partition of a layout disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Filesystem {
    /// `<disk device>` + partition number, written as `first:2` or `/dev/vda:2`.
    pub source: String,
    pub kind: FsKind,
    /// Mount point in the installed OS (`/`, `/boot/efi`); none for swap.
    #[serde(default)]
    pub mount: Option<String>,
    #[serde(default)]
    pub label: Option<String>,
    /// Extra mount options for fstab (default `defaults`).
    #[serde(default)]
    pub options: Option<String>,
}

/// How disks are partitioned and formatted for an allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FilesystemLayout {
    pub id: String,
    #[serde(default)]
    pub description: String,
    pub disks: Vec<LayoutDisk>,
    pub filesystems: Vec<Filesystem>,
    /// Sizes this layout may be used with; empty means all.
    #[serde(default)]
    pub sizes: Vec<String>,
    /// Image name prefixes this layout may be used with (`debian`, `test-os`); empty means all.
    #[serde(default)]
    pub images: Vec<String>,
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Project {
    pub id: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TokenRole {
    /// Operators: everything.
    Admin,
    /// Tenants: only their project's allocations.
    Tenant,
    /// A pixie instance: boot decisions and PXE events.
    Pixie,
}

/// Who a stored token speaks for: the three roles [`TokenRole`] issues, a machine's credential
/// (from registering) and an allocation's phone-home token (from the install instructions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Tenant,
    Pixie,
    Machine,
    PhoneHome,
}

impl Role {
    pub const ALL: [Role; 5] = [Role::Admin, Role::Tenant, Role::Pixie, Role::Machine, Role::PhoneHome];

    /// As stored and as shown: `admin`, `tenant`, `pixie`, `machine`, `phone_home`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Tenant => "tenant",
            Role::Pixie => "pixie",
            Role::Machine => "machine",
            Role::PhoneHome => "phone_home",
        }
    }

    /// The prefix of its tokens: `adm_…`, `ten_…`, `pix_…`, `mch_…`, `phh_…`.
    pub fn prefix(self) -> &'static str {
        match self {
            Role::Admin => "adm",
            Role::Tenant => "ten",
            Role::Pixie => "pix",
            Role::Machine => "mch",
            Role::PhoneHome => "phh",
        }
    }

    /// Long-lived roles an operator creates and revokes (`POST`/`DELETE /v1/tokens`).
    pub fn issued(self) -> Option<TokenRole> {
        match self {
            Role::Admin => Some(TokenRole::Admin),
            Role::Tenant => Some(TokenRole::Tenant),
            Role::Pixie => Some(TokenRole::Pixie),
            Role::Machine | Role::PhoneHome => None,
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| format!("{s:?} is not a token role"))
    }
}

impl From<TokenRole> for Role {
    fn from(r: TokenRole) -> Role {
        match r {
            TokenRole::Admin => Role::Admin,
            TokenRole::Tenant => Role::Tenant,
            TokenRole::Pixie => Role::Pixie,
        }
    }
}

/// `POST /v1/tokens` (admin only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    pub role: TokenRole,
    /// Required for tenant tokens.
    #[serde(default)]
    pub project: Option<String>,
    #[serde(default)]
    pub description: String,
    /// The token stops working this many seconds after it is made; none: until revoked.
    #[serde(default)]
    pub expires_in_s: Option<u64>,
}

/// The token is shown once; the API keeps only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TokenResponse {
    pub id: String,
    pub token: String,
    pub role: TokenRole,
    pub project: Option<String>,
    /// RFC 3339; none: until revoked.
    #[serde(default)]
    pub expires_at: Option<String>,
}

/// A token as `GET /v1/tokens` lists it: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct TokenInfo {
    pub id: String,
    pub role: TokenRole,
    pub project: Option<String>,
    pub description: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339; none: until revoked.
    pub expires_at: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Hardware inventory (metal-hammer → API)
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Inventory {
    /// SMBIOS system UUID, lower case; the machine's identity.
    pub uuid: MachineId,
    pub cpus: Vec<Cpu>,
    /// Usable memory in bytes.
    pub memory_bytes: u64,
    pub disks: Vec<Disk>,
    pub nics: Vec<Nic>,
    pub dmi: Dmi,
    #[serde(default)]
    pub lldp: Vec<LldpNeighbor>,
}

impl Inventory {
    pub fn cores(&self) -> u64 {
        self.cpus.iter().map(|c| u64::from(c.cores)).sum()
    }
    pub fn storage_bytes(&self) -> u64 {
        self.disks.iter().map(|d| d.size_bytes).sum()
    }
}

/// One CPU socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Cpu {
    pub model: String,
    pub cores: u32,
    pub threads: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Disk {
    /// Kernel name, e.g. `vda`, `nvme0n1`, `sda`.
    pub name: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub serial: String,
    #[serde(default)]
    pub wwn: String,
    pub rotational: bool,
    pub logical_sector_size: u32,
    pub physical_sector_size: u32,
    /// `virtio`, `nvme`, `sata`, `scsi`, `usb`, …
    #[serde(default)]
    pub bus: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Nic {
    pub name: String,
    /// Lower case, colon separated.
    pub mac: String,
    #[serde(default)]
    pub driver: String,
    /// Mbit/s, when the link reports it.
    #[serde(default)]
    pub speed_mbps: Option<u32>,
    pub carrier: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Dmi {
    pub sys_vendor: String,
    pub product_name: String,
    pub product_serial: String,
    pub board_vendor: String,
    pub board_name: String,
    pub bios_vendor: String,
    pub bios_version: String,
    pub bios_date: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct LldpNeighbor {
    /// Our interface that heard it.
    pub interface: String,
    pub chassis_id: String,
    pub port_id: String,
    #[serde(default)]
    pub system_name: String,
}

// ---------------------------------------------------------------------------------------------
// Agent contract (metal-hammer ↔ API)
// ---------------------------------------------------------------------------------------------

/// `POST /v1/agent/register`, authenticated with the enrolment token from the kernel command
/// line (`Authorization: Bearer <enrolment token>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub partition: String,
    pub inventory: Inventory,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct RegisterResponse {
    pub machine: MachineId,
    /// Size the machine matched, or `unknown`.
    pub size: String,
    /// Credential bound to this machine's UUID; kept in memory only.
    pub credential: String,
}

/// One provisioning event as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventReport {
    pub event: ProvisioningEvent,
    /// Agent's clock, milliseconds since the Unix epoch.
    pub time_ms: i64,
    #[serde(default)]
    pub message: String,
}

/// `POST /v1/agent/events` with the machine credential: a batch, applied in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct EventBatch {
    pub events: Vec<EventReport>,
}

/// `POST /v1/agent/wipe-report`: how each disk was wiped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WipeReport {
    pub disks: Vec<DiskWipe>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskWipe {
    pub disk: String,
    /// `nvme-format`, `nvme-sanitize`, `secure-discard`, `discard`, `overwrite`.
    pub method: String,
    pub duration_ms: u64,
}

/// What `GET /v1/agent/wait?timeout_s=N` returns with 200 once the machine is allocated
/// (204 No Content when the timeout passed with no allocation: wait again). Every call counts
/// as an `Alive` heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct InstallInstructions {
    pub allocation: AllocationId,
    pub hostname: String,
    pub image: Image,
    pub layout: FilesystemLayout,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// Opaque to us; written to `/etc/metal/userdata` in the installed OS.
    #[serde(default)]
    pub user_data: String,
    pub phone_home: PhoneHomeConfig,
}

/// Written to `/etc/metal/phone-home.json` in the installed OS; the OS's phone-home piece
/// `POST`s to `url` with `Authorization: Bearer <token>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PhoneHomeConfig {
    /// Full URL, e.g. `http://10.99.0.1:8080/v1/agent/phone-home`.
    pub url: String,
    pub token: String,
    pub machine: MachineId,
}

/// `POST /v1/agent/install-report` with the machine credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct InstallReport {
    pub allocation: AllocationId,
    pub success: bool,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub boot: Option<BootInfo>,
}

/// How the installed OS boots (kept by the API, shown to operators).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BootInfo {
    pub root_uuid: String,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
}

/// `POST /v1/agent/phone-home` body, sent by the installed OS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PhoneHome {
    pub machine: MachineId,
    /// Agent's clock, milliseconds since the Unix epoch.
    pub time_ms: i64,
    #[serde(default)]
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Boot decisions (pixie ↔ API)
// ---------------------------------------------------------------------------------------------

/// Client architecture from DHCP option 93 (RFC 4578 and IANA's registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// 0: x86 BIOS.
    BiosX86,
    /// 7 or 9: x86-64 UEFI.
    UefiX64,
    /// 16: x86-64 UEFI HTTP boot.
    UefiX64Http,
    /// 11: ARM64 UEFI.
    UefiArm64,
    Unknown,
}

impl Arch {
    pub fn from_option93(code: u16) -> Arch {
        match code {
            0 => Arch::BiosX86,
            7 | 9 => Arch::UefiX64,
            16 => Arch::UefiX64Http,
            11 => Arch::UefiArm64,
            _ => Arch::Unknown,
        }
    }
}

/// `POST /v1/boot/decide` with a pixie token: pixie asks what a machine boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct BootRequest {
    pub partition: String,
    /// Lower case, colon separated.
    pub mac: String,
    /// From DHCP option 97 or iPXE's `${uuid}`, when the client sent one.
    #[serde(default)]
    pub uuid: Option<MachineId>,
    pub arch: Arch,
}

/// The API's answer to `POST /v1/boot/decide`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum BootDecision {
    /// Boot metal-hammer. `cmdline` already carries `metal.api=… metal.token=…` and the rest.
    Hammer { kernel_url: String, initrd_url: String, cmdline: String },
    /// The machine runs an installed OS that phoned home: boot from the local disk.
    LocalDisk,
}

/// `POST /v1/boot/pxe-event` with a pixie token: pixie saw a PXE request from this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PxeEvent {
    pub partition: String,
    pub mac: String,
    #[serde(default)]
    pub uuid: Option<MachineId>,
    pub arch: Arch,
    #[serde(default)]
    pub message: String,
}

// ---------------------------------------------------------------------------------------------
// Machines and allocations (operators and tenants ↔ API)
// ---------------------------------------------------------------------------------------------

/// `POST /v1/allocations`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(deny_unknown_fields)]
pub struct AllocationRequest {
    pub project: String,
    pub partition: String,
    /// Size to pick from; ignored when `machine` is given.
    #[serde(default)]
    pub size: Option<String>,
    /// Ask for this exact machine.
    #[serde(default)]
    pub machine: Option<MachineId>,
    /// An image id (`test-os-20261124`) or name (`test-os`: the newest of that name).
    pub image: String,
    pub hostname: String,
    /// Layout id; default: the first layout that fits the size and image.
    #[serde(default)]
    pub layout: Option<String>,
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    #[serde(default)]
    pub user_data: String,
    /// The same key never allocates twice: a repeat returns the first allocation.
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Allocation {
    pub id: AllocationId,
    pub machine: MachineId,
    pub project: String,
    pub partition: String,
    pub image: String,
    pub hostname: String,
    pub layout: String,
    pub ssh_keys: Vec<String>,
    pub user_data: String,
    /// RFC 3339.
    pub created_at: String,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// A machine as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct Machine {
    pub id: MachineId,
    pub partition: Option<String>,
    pub size: String,
    /// The last provisioning event, if any.
    pub state: Option<ProvisioningEvent>,
    pub liveliness: Liveliness,
    /// A machine that PXE booted again during an install, too often.
    pub crash_loop: bool,
    /// A reclaim that did not reach `Waiting`.
    pub failed_reclaim: bool,
    pub allocation: Option<Allocation>,
    pub inventory: Option<Inventory>,
    pub boot: Option<BootInfo>,
    /// RFC 3339 of the last event or heartbeat.
    pub last_seen: Option<String>,
}

/// Longest event message the API keeps (bytes); a longer one is cut at a character boundary
/// and ends with `[truncated]`.
pub const MAX_EVENT_MESSAGE: usize = 4096;

/// `message` cut to at most [`MAX_EVENT_MESSAGE`] bytes (plus the marker) at a character
/// boundary, ending with `[truncated]` when it was cut.
pub fn bound_message(mut message: String) -> String {
    if message.len() <= MAX_EVENT_MESSAGE {
        return message;
    }
    let mut end = MAX_EVENT_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(" [truncated]");
    message
}

/// Who reported an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    /// metal-hammer on the machine, with its credential.
    #[default]
    Agent,
    /// pixie, from what it saw on the wire (DHCP, TFTP, HTTP): anyone on the provisioning
    /// network can make pixie see anything, so these are sightings, not the machine's word.
    Pixie,
    /// The installed OS, with its allocation's phone-home token.
    PhoneHome,
    /// The API itself (a free, a failed install report).
    Api,
}

/// One event in a machine's timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct MachineEvent {
    pub event: ProvisioningEvent,
    pub message: String,
    /// Agent's clock, RFC 3339.
    pub time: String,
    /// API's receive time, RFC 3339.
    pub received: String,
    /// The event was not allowed after the previous one (kept, flagged).
    pub unexpected: bool,
    #[serde(default)]
    pub source: EventSource,
    /// Kept in the timeline but did not change the machine's state: a PXE boot pixie saw while
    /// metal-hammer on that machine was alive and talking to the API (see docs/events.md).
    #[serde(default)]
    pub ignored: bool,
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Every 4xx/5xx body of the API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(ToSchema))]
pub struct ApiError {
    /// Stable, machine-readable: `not_found`, `no_machine_available`, `conflict`,
    /// `unauthorized`, `forbidden`, `bad_request`, `internal`.
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
            assert_eq!(serde_json::to_value(r).unwrap(), serde_json::Value::String(r.as_str().into()));
            if let Some(t) = r.issued() {
                assert_eq!(Role::from(t), r);
            }
        }
        assert!("enrolment".parse::<Role>().is_err());
    }

    #[test]
    fn messages_are_bounded_at_a_char_boundary() {
        assert_eq!(bound_message("short".into()), "short");
        let exact = "x".repeat(MAX_EVENT_MESSAGE);
        assert_eq!(bound_message(exact.clone()), exact);
        let long = "é".repeat(MAX_EVENT_MESSAGE);
        let cut = bound_message(long);
        assert!(cut.ends_with(" [truncated]"));
        assert!(cut.len() <= MAX_EVENT_MESSAGE + " [truncated]".len());
        assert!(cut.trim_end_matches(" [truncated]").chars().all(|c| c == 'é'));
    }
}
