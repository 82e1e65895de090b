//! Resolving a [`FilesystemLayout`] against the machine's disks, and the filesystem plan: which
//! partition gets which filesystem, UUID, label and mount point.
//!
//! UUIDs are generated here, before `mkfs`, and passed to the tools, so `/etc/fstab` and the
//! kernel command line are known without asking `blkid` afterwards.

use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

use metal_types::{FilesystemLayout, FsKind, GptPartition};
use uuid::Uuid;

use super::gpt::partition_device;

/// A layout disk with the machine device it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskPlan {
    pub device: PathBuf,
    pub partitions: Vec<GptPartition>,
}

/// One filesystem to make (or, for raw images, to find) and mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsPlan {
    /// The partition's device node, e.g. `/dev/vda2`.
    pub device: PathBuf,
    pub kind: FsKind,
    /// Mount point in the installed OS; `None` for swap, and for a filesystem that is only made
    /// (it is not mounted during the install and not listed in fstab).
    pub mount: Option<String>,
    pub label: Option<String>,
    /// fstab options (`defaults` when the layout gives none).
    pub options: String,
    /// As it appears after `UUID=` in fstab: a hyphenated lower-case UUID for ext4 and swap,
    /// `ABCD-1234` for vfat.
    pub uuid: String,
}

/// The whole plan of one layout on one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutPlan {
    pub disks: Vec<DiskPlan>,
    pub filesystems: Vec<FsPlan>,
}

impl LayoutPlan {
    /// The root filesystem (validated to exist).
    pub fn root(&self) -> &FsPlan {
        self.filesystems.iter().find(|f| f.mount.as_deref() == Some("/")).expect("validated by resolve")
    }

    /// Filesystems with a mount point, parents before children (`/` first).
    pub fn mount_order(&self) -> Vec<&FsPlan> {
        let mut v: Vec<&FsPlan> = self.filesystems.iter().filter(|f| f.mount.is_some()).collect();
        v.sort_by_key(|f| {
            let m = f.mount.as_deref().unwrap_or_default();
            (Path::new(m).components().count(), m.to_string())
        });
        v
    }
}

/// Maps a layout device name to a machine disk: `first` is `disks[0]`; an explicit `/dev/…` name
/// must be one of `disks`.
fn machine_disk(name: &str, disks: &[PathBuf]) -> Result<PathBuf, String> {
    if name == "first" {
        return disks.first().cloned().ok_or_else(|| "no disk given for layout device `first`".to_string());
    }
    let p = Path::new(name);
    if disks.iter().any(|d| d == p) {
        Ok(p.to_path_buf())
    } else {
        Err(format!("layout names disk {name}, which is not among the disks given ({})", list(disks)))
    }
}

fn list(disks: &[PathBuf]) -> String {
    disks.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// A random UUID in the form fstab uses for `kind`.
pub fn new_fs_uuid(kind: FsKind) -> String {
    let u = Uuid::new_v4();
    match kind {
        FsKind::Vfat => {
            let b = u.as_bytes();
            let id = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            vfat_uuid(id)
        }
        _ => u.hyphenated().to_string(),
    }
}

/// fstab/blkid form of a FAT volume id: `0xabcd1234` → `ABCD-1234`.
pub fn vfat_uuid(volume_id: u32) -> String {
    format!("{:04X}-{:04X}", volume_id >> 16, volume_id & 0xffff)
}

/// Checks `layout` and maps it onto `disks`, generating a UUID per filesystem.
pub fn resolve(layout: &FilesystemLayout, disks: &[PathBuf]) -> Result<LayoutPlan, String> {
    let mut out_disks: Vec<DiskPlan> = Vec::new();
    for d in &layout.disks {
        let device = machine_disk(&d.device, disks)?;
        if out_disks.iter().any(|o| o.device == device) {
            return Err(format!("disk {} appears twice in layout {}", device.display(), layout.id));
        }
        out_disks.push(DiskPlan { device, partitions: d.partitions.clone() });
    }
    let mut filesystems = Vec::new();
    let mut mounts = HashSet::new();
    let mut sources = HashSet::new();
    for fs in &layout.filesystems {
        let (disk_name, number) = fs
            .source
            .rsplit_once(':')
            .and_then(|(d, n)| n.parse::<u32>().ok().map(|n| (d, n)))
            .ok_or_else(|| format!("filesystem source {:?} is not `<disk>:<partition number>`", fs.source))?;
        let device = machine_disk(disk_name, disks)?;
        let disk = out_disks
            .iter()
            .find(|d| d.device == device)
            .ok_or_else(|| format!("filesystem {} is on disk {disk_name}, which the layout does not partition", fs.source))?;
        if !disk.partitions.iter().any(|p| p.number == number) {
            return Err(format!("filesystem {}: disk {disk_name} has no partition {number}", fs.source));
        }
        if !sources.insert((device.clone(), number)) {
            return Err(format!("two filesystems on {}", fs.source));
        }
        if fs.mount.is_some() && fs.kind == FsKind::Swap {
            return Err(format!("swap on {} cannot have a mount point", fs.source));
        }
        if let Some(m) = &fs.mount {
            let p = Path::new(m);
            if !p.is_absolute() || p.components().any(|c| matches!(c, Component::ParentDir | Component::CurDir)) {
                return Err(format!("mount point {m:?} must be an absolute path without `.` or `..`"));
            }
            if !mounts.insert(p.components().collect::<PathBuf>()) {
                return Err(format!("mount point {m} appears twice"));
            }
            if m == "/" && fs.kind != FsKind::Ext4 {
                return Err("the root filesystem must be ext4".into());
            }
        }
        let label = match (&fs.label, fs.kind) {
            (Some(l), FsKind::Vfat) => {
                let l = l.to_ascii_uppercase();
                if l.len() > 11 || !l.is_ascii() {
                    return Err(format!("vfat label {l:?} is longer than 11 ASCII characters"));
                }
                Some(l)
            }
            (Some(l), _) if l.len() > 16 => return Err(format!("label {l:?} is longer than 16 bytes")),
            (l, _) => l.clone(),
        };
        filesystems.push(FsPlan {
            device: partition_device(&device, number),
            kind: fs.kind,
            mount: fs.mount.clone(),
            label,
            options: fs.options.clone().filter(|o| !o.trim().is_empty()).unwrap_or_else(|| "defaults".into()),
            uuid: new_fs_uuid(fs.kind),
        });
    }
    if !mounts.contains(Path::new("/")) {
        return Err(format!("layout {} has no root (`/`) filesystem", layout.id));
    }
    Ok(LayoutPlan { disks: out_disks, filesystems })
}

/// The program and arguments that make `fs` with its planned UUID and label.
pub fn mkfs_command(fs: &FsPlan) -> (&'static str, Vec<String>) {
    let dev = fs.device.display().to_string();
    let mut args: Vec<String> = Vec::new();
    let program = match fs.kind {
        FsKind::Ext4 => {
            // lazy_journal_init: the journal is not zeroed (a fifth of mke2fs's time on a small
            // disk, far more on a big one). Stale journal blocks of an earlier filesystem on the
            // disk cannot be replayed: journal blocks carry checksums seeded with the UUID
            // (metadata_csum, the ext4 default), and the UUID is new for every install.
            args.extend(
                ["-t", "ext4", "-F", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1", "-U", &fs.uuid].map(String::from),
            );
            "mke2fs"
        }
        FsKind::Vfat => {
            args.extend(["-F", "32", "-i", &fs.uuid.replace('-', "")].map(String::from));
            "mkfs.fat"
        }
        FsKind::Swap => {
            args.extend(["-U", &fs.uuid].map(String::from));
            "mkswap"
        }
    };
    if let Some(l) = &fs.label {
        args.push(if fs.kind == FsKind::Vfat { "-n" } else { "-L" }.into());
        args.push(l.clone());
    }
    args.push(dev);
    (program, args)
}

/// An absolute path for a tool: PID 1 starts without `PATH`, and `execvp`'s default search path
/// has no `sbin`. Looks in `PATH`, then the usual directories; falls back to the bare name.
pub fn find_tool(name: &str) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found.map(|p| p.display().to_string()).unwrap_or_else(|| name.to_string())
}

/// The fstab file system type of `kind`.
pub fn fstype(kind: FsKind) -> &'static str {
    match kind {
        FsKind::Ext4 => "ext4",
        FsKind::Vfat => "vfat",
        FsKind::Swap => "swap",
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use metal_types::{Filesystem, GptType, LayoutDisk};

    pub fn efi_root_layout() -> FilesystemLayout {
        FilesystemLayout {
            id: "efi-root".into(),
            description: String::new(),
            disks: vec![LayoutDisk {
                device: "first".into(),
                partitions: vec![
                    GptPartition { number: 1, label: "efi".into(), size_mib: 64, gpt_type: GptType::Efi },
                    GptPartition { number: 2, label: "root".into(), size_mib: 0, gpt_type: GptType::Linux },
                ],
            }],
            filesystems: vec![
                Filesystem {
                    source: "first:1".into(),
                    kind: FsKind::Vfat,
                    mount: Some("/boot/efi".into()),
                    label: Some("efi".into()),
                    options: None,
                },
                Filesystem {
                    source: "first:2".into(),
                    kind: FsKind::Ext4,
                    mount: Some("/".into()),
                    label: Some("root".into()),
                    options: Some("errors=remount-ro".into()),
                },
            ],
            sizes: vec![],
            images: vec![],
        }
    }

    #[test]
    fn resolves_first_and_orders_mounts() {
        let plan = resolve(&efi_root_layout(), &[PathBuf::from("/dev/nvme0n1")]).unwrap();
        assert_eq!(plan.disks[0].device, Path::new("/dev/nvme0n1"));
        assert_eq!(plan.root().device, Path::new("/dev/nvme0n1p2"));
        let order: Vec<_> = plan.mount_order().iter().map(|f| f.mount.clone().unwrap()).collect();
        assert_eq!(order, ["/", "/boot/efi"]);
        let esp = &plan.filesystems[0];
        assert_eq!(esp.label.as_deref(), Some("EFI"));
        assert_eq!(esp.options, "defaults");
        assert_eq!(esp.uuid.len(), 9);
        assert_eq!(plan.root().options, "errors=remount-ro");
        assert!(Uuid::parse_str(&plan.root().uuid).is_ok());
    }

    #[test]
    fn explicit_disk_must_be_given() {
        let mut l = efi_root_layout();
        l.disks[0].device = "/dev/sdb".into();
        for f in &mut l.filesystems {
            f.source = f.source.replace("first", "/dev/sdb");
        }
        assert!(resolve(&l, &[PathBuf::from("/dev/sda")]).unwrap_err().contains("not among"));
        let plan = resolve(&l, &[PathBuf::from("/dev/sda"), PathBuf::from("/dev/sdb")]).unwrap();
        assert_eq!(plan.root().device, Path::new("/dev/sdb2"));
    }

    #[test]
    fn rejects_broken_layouts() {
        let disks = [PathBuf::from("/dev/vda")];
        let mut l = efi_root_layout();
        l.filesystems[1].mount = Some("/srv".into());
        assert!(resolve(&l, &disks).unwrap_err().contains("no root"));
        let mut l = efi_root_layout();
        l.filesystems[0].source = "first:3".into();
        assert!(resolve(&l, &disks).unwrap_err().contains("no partition 3"));
        let mut l = efi_root_layout();
        l.filesystems[0].source = "first:2".into();
        assert!(resolve(&l, &disks).unwrap_err().contains("two filesystems"));
        let mut l = efi_root_layout();
        l.filesystems[0].mount = Some("/boot/../etc".into());
        assert!(resolve(&l, &disks).is_err());
        let mut l = efi_root_layout();
        l.filesystems[1].kind = FsKind::Vfat;
        assert!(resolve(&l, &disks).unwrap_err().contains("must be ext4"));
        assert!(resolve(&efi_root_layout(), &[]).unwrap_err().contains("no disk"));
    }

    #[test]
    fn mkfs_commands_carry_uuid_and_label() {
        let plan = resolve(&efi_root_layout(), &[PathBuf::from("/dev/vda")]).unwrap();
        let (prog, args) = mkfs_command(plan.root());
        assert_eq!(prog, "mke2fs");
        let uuid = plan.root().uuid.clone();
        assert_eq!(
            args,
            ["-t", "ext4", "-F", "-q", "-E", "lazy_itable_init=1,lazy_journal_init=1", "-U", &uuid, "-L", "root", "/dev/vda2"]
        );
        let (prog, args) = mkfs_command(&plan.filesystems[0]);
        assert_eq!(prog, "mkfs.fat");
        let volid = plan.filesystems[0].uuid.replace('-', "");
        assert_eq!(args, ["-F", "32", "-i", &volid, "-n", "EFI", "/dev/vda1"]);
        assert_eq!(vfat_uuid(0xabcd1234), "ABCD-1234");
    }
}
