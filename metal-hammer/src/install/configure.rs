//! What metal-hammer writes into the installed OS (ARCHITECTURE.md, "What metal-hammer writes
//! into an installed OS"): each file's content is rendered by a pure function, then
//! [`write_all`] puts them under the mounted root with their modes.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use metal_types::{BootInfo, FsKind, InstallInstructions};
use serde::{Deserialize, Serialize};

use super::layout::{fstype, FsPlan};

/// `/etc/metal/install.json`: what was installed, from which image, and how it boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallRecord {
    pub allocation: String,
    pub hostname: String,
    /// `<name>-<version>`.
    pub image: String,
    pub image_url: String,
    pub image_sha256: String,
    pub layout: String,
    /// The disks the layout was written to, `first` being the first.
    pub disks: Vec<String>,
    /// Boot info with paths relative to the installed root (`/boot/vmlinuz`), as the installed
    /// OS sees them.
    pub boot: BootInfo,
}

pub fn render_hostname(hostname: &str) -> String {
    format!("{hostname}\n")
}

/// `/etc/hosts` with the machine's name on `127.0.1.1` (the Debian convention).
pub fn render_hosts(hostname: &str) -> String {
    let short = hostname.split('.').next().unwrap_or(hostname);
    let names = if short != hostname { format!("{hostname} {short}") } else { hostname.to_string() };
    format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{names}\n\n::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
    )
}

/// `/etc/fstab` by UUID: the root is checked first (pass 1), other filesystems after (pass 2).
pub fn render_fstab(filesystems: &[FsPlan]) -> String {
    let mut out = String::from("# Written by metal-hammer from the allocation's filesystem layout.\n");
    let mut ordered: Vec<&FsPlan> = filesystems.iter().collect();
    ordered.sort_by_key(|f| (f.mount.is_none(), f.mount.as_deref().map(|m| Path::new(m).components().count())));
    for f in ordered {
        let (mount, pass, options) = match (&f.mount, f.kind) {
            (_, FsKind::Swap) => {
                ("none".to_string(), 0, if f.options == "defaults" { "sw".to_string() } else { f.options.clone() })
            }
            (Some(m), _) if m == "/" => (m.clone(), 1, f.options.clone()),
            (Some(m), _) => (m.clone(), 2, f.options.clone()),
            (None, _) => continue,
        };
        out.push_str(&format!("UUID={}\t{}\t{}\t{}\t0\t{}\n", f.uuid, mount, fstype(f.kind), options, pass));
    }
    out
}

/// systemd-networkd: DHCP (v4 and v6) on every Ethernet link.
pub fn render_networkd() -> String {
    "# Written by metal-hammer: DHCP on every Ethernet link.\n[Match]\nType=ether\n\n[Network]\nDHCP=yes\n".to_string()
}

/// One key per line, surrounding whitespace trimmed, empty entries dropped.
pub fn render_authorized_keys(keys: &[String]) -> String {
    keys.iter().map(|k| k.trim()).filter(|k| !k.is_empty()).map(|k| format!("{k}\n")).collect()
}

pub fn render_phone_home(instr: &InstallInstructions) -> String {
    serde_json::to_string_pretty(&instr.phone_home).expect("serializable") + "\n"
}

pub fn render_install_record(record: &InstallRecord) -> String {
    serde_json::to_string_pretty(record).expect("serializable") + "\n"
}

/// Every file with its content and mode, relative to the installed root.
pub fn files(
    instr: &InstallInstructions,
    filesystems: &[FsPlan],
    record: &InstallRecord,
    systemd: bool,
) -> Vec<(PathBuf, String, u32)> {
    let mut v = vec![
        (PathBuf::from("etc/hostname"), render_hostname(&instr.hostname), 0o644),
        (PathBuf::from("etc/hosts"), render_hosts(&instr.hostname), 0o644),
        (PathBuf::from("etc/fstab"), render_fstab(filesystems), 0o644),
        // Empty: systemd generates a new id on first boot, so clones do not share one.
        (PathBuf::from("etc/machine-id"), String::new(), 0o444),
        (PathBuf::from("root/.ssh/authorized_keys"), render_authorized_keys(&instr.ssh_keys), 0o600),
        (PathBuf::from("etc/metal/userdata"), instr.user_data.clone(), 0o600),
        (PathBuf::from("etc/metal/phone-home.json"), render_phone_home(instr), 0o600),
        (PathBuf::from("etc/metal/install.json"), render_install_record(record), 0o644),
    ];
    if systemd {
        v.push((PathBuf::from("etc/systemd/network/10-metal.network"), render_networkd(), 0o644));
    }
    v
}

/// Fails when any existing component of `rel` under `root` is a symbolic link, so nothing the
/// image contains can redirect our writes outside of it.
pub(crate) fn check_no_symlinks(root: &Path, rel: &Path) -> io::Result<()> {
    let mut p = root.to_path_buf();
    for c in rel.components() {
        match c {
            Component::Normal(c) => p.push(c),
            _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("unexpected path {}", rel.display()))),
        }
        match fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} is a symbolic link in the image", p.display()),
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes one file: parents created (`/root/.ssh` with 0700, others 0755), content replaced,
/// mode set explicitly (not subject to the umask). Not synced one by one: the install remounts
/// the root read-only and syncs at its end.
pub fn write_file(root: &Path, rel: &Path, content: &[u8], mode: u32) -> io::Result<()> {
    check_no_symlinks(root, rel)?;
    let dst = root.join(rel);
    if let Some(parent) = rel.parent() {
        let mut p = root.to_path_buf();
        for c in parent.components() {
            p.push(c);
            if !p.exists() {
                fs::create_dir(&p)?;
                let m = if p.ends_with("root/.ssh") || p.ends_with("root") { 0o700 } else { 0o755 };
                fs::set_permissions(&p, fs::Permissions::from_mode(m))?;
            }
        }
        if parent == Path::new("root/.ssh") {
            fs::set_permissions(root.join(parent), fs::Permissions::from_mode(0o700))?;
        }
    }
    let mut f =
        fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).custom_flags(libc::O_NOFOLLOW).open(&dst)?;
    f.write_all(content)?;
    f.set_permissions(fs::Permissions::from_mode(mode))
}

/// Writes every file of [`files`]; returns the paths written.
pub fn write_all(
    root: &Path,
    instr: &InstallInstructions,
    filesystems: &[FsPlan],
    record: &InstallRecord,
) -> Result<Vec<PathBuf>, (PathBuf, io::Error)> {
    let systemd = root.join("etc/systemd").is_dir();
    let mut written = Vec::new();
    for (rel, content, mode) in files(instr, filesystems, record, systemd) {
        write_file(root, &rel, content.as_bytes(), mode).map_err(|e| (rel.clone(), e))?;
        written.push(rel);
    }
    Ok(written)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use metal_types::{AllocationId, Image, ImageFormat, ImageManifest, MachineId, PhoneHomeConfig};

    pub fn instructions(url: &str, sha256: &str, size: u64, format: ImageFormat) -> InstallInstructions {
        InstallInstructions {
            allocation: AllocationId::new_random(),
            hostname: "web-1.example.org".into(),
            image: Image {
                id: "test-os-1".into(),
                url: url.into(),
                classification: Default::default(),
                expires_at: None,
                manifest: ImageManifest {
                    name: "test-os".into(),
                    version: "1".into(),
                    os: String::new(),
                    format,
                    compressed_size: size,
                    uncompressed_size: 0,
                    sha256: sha256.into(),
                    kernel: "boot/vmlinuz".into(),
                    initrd: "boot/initrd.img".into(),
                    cmdline: "console=ttyS0 quiet".into(),
                    packages: vec![],
                },
            },
            layout: super::super::layout::tests::efi_root_layout(),
            ssh_keys: vec!["ssh-ed25519 AAAAC3 alice@example".into(), "  ".into(), "ssh-rsa AAAAB3 bob\n".into()],
            user_data: "{\"expect\":{}}".into(),
            phone_home: PhoneHomeConfig {
                url: "http://10.99.0.1:8080/v1/agent/phone-home".into(),
                token: "secret".into(),
                machine: MachineId::new_random(),
            },
        }
    }

    fn fsplan(dev: &str, kind: FsKind, mount: Option<&str>, uuid: &str) -> FsPlan {
        FsPlan {
            device: dev.into(),
            kind,
            mount: mount.map(Into::into),
            label: None,
            options: "defaults".into(),
            uuid: uuid.into(),
        }
    }

    #[test]
    fn fstab_root_first_by_uuid() {
        let fs = [
            fsplan("/dev/vda1", FsKind::Vfat, Some("/boot/efi"), "ABCD-1234"),
            fsplan("/dev/vda3", FsKind::Swap, None, "22222222-2222-4222-8222-222222222222"),
            fsplan("/dev/vda2", FsKind::Ext4, Some("/"), "11111111-1111-4111-8111-111111111111"),
        ];
        let t = render_fstab(&fs);
        let lines: Vec<&str> = t.lines().skip(1).collect();
        assert_eq!(
            lines,
            [
                "UUID=11111111-1111-4111-8111-111111111111\t/\text4\tdefaults\t0\t1",
                "UUID=ABCD-1234\t/boot/efi\tvfat\tdefaults\t0\t2",
                "UUID=22222222-2222-4222-8222-222222222222\tnone\tswap\tsw\t0\t0",
            ]
        );
    }

    #[test]
    fn hosts_and_hostname() {
        assert_eq!(render_hostname("web-1"), "web-1\n");
        assert!(render_hosts("web-1.example.org").contains("127.0.1.1\tweb-1.example.org web-1\n"));
        assert!(render_hosts("web-1").contains("127.0.1.1\tweb-1\n"));
        assert!(render_hosts("web-1").starts_with("127.0.0.1\tlocalhost\n"));
    }

    #[test]
    fn keys_one_per_line() {
        let keys = vec!["ssh-ed25519 A a".to_string(), "".into(), " ssh-rsa B b \n".into()];
        assert_eq!(render_authorized_keys(&keys), "ssh-ed25519 A a\nssh-rsa B b\n");
        assert_eq!(render_authorized_keys(&[]), "");
    }

    #[test]
    fn networkd_matches_ethernet() {
        let n = render_networkd();
        assert!(n.contains("[Match]\nType=ether\n"));
        assert!(n.contains("DHCP=yes"));
    }

    #[test]
    fn writes_files_with_modes_and_refuses_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc/systemd")).unwrap();
        let instr = instructions("http://x/img", "00", 1, ImageFormat::TarZst);
        let fs_ = [fsplan("/dev/vda2", FsKind::Ext4, Some("/"), "11111111-1111-4111-8111-111111111111")];
        let record = InstallRecord {
            allocation: instr.allocation.to_string(),
            hostname: instr.hostname.clone(),
            image: "test-os-1".into(),
            image_url: "http://x/img".into(),
            image_sha256: "00".into(),
            layout: "efi-root".into(),
            disks: vec!["/dev/vda".into()],
            boot: BootInfo {
                root_uuid: "u".into(),
                kernel: "/boot/vmlinuz".into(),
                initrd: String::new(),
                cmdline: "root=UUID=u".into(),
            },
        };
        let written = write_all(root, &instr, &fs_, &record).unwrap();
        assert!(written.contains(&PathBuf::from("etc/systemd/network/10-metal.network")));
        let mode = |p: &str| fs::metadata(root.join(p)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("root/.ssh"), 0o700);
        assert_eq!(mode("root/.ssh/authorized_keys"), 0o600);
        assert_eq!(mode("etc/metal/phone-home.json"), 0o600);
        assert_eq!(fs::read_to_string(root.join("etc/machine-id")).unwrap(), "");
        let ph: metal_types::PhoneHomeConfig =
            serde_json::from_str(&fs::read_to_string(root.join("etc/metal/phone-home.json")).unwrap()).unwrap();
        assert_eq!(ph, instr.phone_home);
        let rec: InstallRecord = serde_json::from_str(&fs::read_to_string(root.join("etc/metal/install.json")).unwrap()).unwrap();
        assert_eq!(rec, record);
        assert_eq!(
            fs::read_to_string(root.join("root/.ssh/authorized_keys")).unwrap(),
            "ssh-ed25519 AAAAC3 alice@example\nssh-rsa AAAAB3 bob\n"
        );

        // An image whose /etc/metal is a symlink cannot redirect our writes.
        let other = tempfile::tempdir().unwrap();
        fs::remove_dir_all(root.join("etc/metal")).unwrap();
        std::os::unix::fs::symlink(other.path(), root.join("etc/metal")).unwrap();
        let err = write_all(root, &instr, &fs_, &record).unwrap_err();
        assert_eq!(err.0, PathBuf::from("etc/metal/userdata"));
        assert!(fs::read_dir(other.path()).unwrap().next().is_none());
    }
}
