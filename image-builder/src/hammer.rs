//! `image-builder hammer`: the metal-hammer kernel and initramfs.
//!
//! The initramfs is a newc cpio compressed with zstd holding `/init` (the static metal-hammer),
//! the modules for common storage and network hardware with all their dependencies, a
//! `modules.dep`/`modules.alias` restricted to them, the filesystem tools with their shared
//! libraries, `/etc/mke2fs.conf`, the CA bundle (the build host's, with every `--ca FILE`
//! appended: metal-hammer trusts it for an `https://` API and image URLs), and the few
//! directories and device nodes a PID 1 needs before it mounts devtmpfs.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::archive;
use crate::cpio;
use crate::error::{at, Error, Result};
use crate::kmod::{self, KernelDir, ModuleIndex};
use crate::tools;
use crate::tree::Tree;

/// Storage controllers and disks.
pub const STORAGE_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "nvme",
    "ahci",
    "ata_piix",
    "sd_mod",
    "sr_mod",
    "megaraid_sas",
    "mpt3sas",
    "smartpqi",
    "hpsa",
    "xhci_pci",
    "ehci_pci",
    "usb_storage",
    "uas",
];
/// Network cards.
pub const NET_MODULES: &[&str] = &[
    "virtio_net",
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "ixgbe",
    "i40e",
    "ice",
    "mlx4_en",
    "mlx5_core",
    "bnxt_en",
    "tg3",
    "r8169",
    "vmxnet3",
    "af_packet",
    "8021q",
    "bonding",
];
/// Filesystems and what mounting them needs (ext4 wants a crc32c implementation).
pub const FS_MODULES: &[&str] = &[
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_iso8859_1",
    "nls_utf8",
    "crc32c_generic",
    "crc32c_intel",
    "efivarfs",
    "loop",
    "dm_mod",
];

/// Tools metal-hammer runs, with the Debian package each comes from.
pub const TOOLS: &[(&str, &str)] = &[("mke2fs", "e2fsprogs"), ("mkfs.fat", "dosfstools"), ("mkswap", "util-linux")];

pub struct HammerOptions {
    pub kernel_dir: PathBuf,
    pub hammer_bin: PathBuf,
    pub out: PathBuf,
    pub extra_modules: Vec<String>,
    pub zstd_level: i32,
    /// PEM CA bundles appended to the initramfs's `/etc/ssl/certs/ca-certificates.crt`.
    pub ca_files: Vec<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct HammerOutput {
    pub vmlinuz: PathBuf,
    pub initrd: archive::Written,
    pub modules: usize,
}

/// Puts the modules `names` (closed over dependencies) into `tree` under
/// `lib/modules/<version>/`, with restricted `modules.dep`, `modules.alias` and the kernel's
/// `modules.builtin`. Returns the module paths in load order.
pub fn add_modules(tree: &mut Tree, kernel: &KernelDir, names: &[String], strict: bool) -> Result<Vec<String>> {
    let dir = kernel.modules_dir();
    let index = ModuleIndex::load(&dir)?;
    let resolved = index.resolve(names);
    if !resolved.missing.is_empty() {
        if strict {
            return Err(Error::MissingModule { module: resolved.missing.join(", "), dep_file: dir.join("modules.dep") });
        }
        eprintln!("  note: not in this kernel, skipped: {}", resolved.missing.join(", "));
    }
    let base = format!("lib/modules/{}", kernel.version);
    for path in &resolved.modules {
        tree.host_file(&format!("{base}/{path}"), 0o644, &dir.join(path))?;
    }
    tree.bytes(&format!("{base}/modules.dep"), 0o644, index.restricted_dep(&resolved.modules))?;
    let alias_file = dir.join("modules.alias");
    let alias = fs::read_to_string(&alias_file).map_err(at(&alias_file))?;
    let names: BTreeSet<String> = resolved.modules.iter().map(|m| kmod::module_name(m)).collect();
    tree.bytes(&format!("{base}/modules.alias"), 0o644, kmod::restrict_alias(&alias, &names))?;
    let builtin = dir.join("modules.builtin");
    if builtin.is_file() {
        tree.host_file(&format!("{base}/modules.builtin"), 0o644, &builtin)?;
    }
    Ok(index.load_order(&resolved.modules))
}

/// Directories and device nodes every initramfs of ours has.
pub fn add_skeleton(tree: &mut Tree) -> Result<()> {
    for d in ["proc", "sys", "dev", "run", "mnt", "etc", "root"] {
        tree.dir(d, 0o755)?;
    }
    tree.dir("tmp", 0o1777)?;
    tree.char_dev("dev/console", 0o600, 5, 1)?;
    tree.char_dev("dev/null", 0o666, 1, 3)?;
    Ok(())
}

/// The initramfs tree of metal-hammer.
pub fn tree(kernel: &KernelDir, hammer_bin: &Path, extra_modules: &[String]) -> Result<(Tree, usize)> {
    let mut tree = Tree::new();
    add_skeleton(&mut tree)?;
    if !tools::is_static(hammer_bin)? {
        eprintln!("  warning: {} is dynamically linked; copying its libraries too", hammer_bin.display());
    }
    tools::add_program(&mut tree, "init", hammer_bin)?;

    let names: Vec<String> = STORAGE_MODULES
        .iter()
        .chain(NET_MODULES)
        .chain(FS_MODULES)
        .map(|s| s.to_string())
        .chain(extra_modules.iter().cloned())
        .collect();
    let order = add_modules(&mut tree, kernel, &names, false)?;

    for (tool, package) in TOOLS {
        let host = tools::require(tool, package)?;
        tools::add_program(&mut tree, &format!("usr/sbin/{tool}"), &host)?;
    }
    tree.symlink("usr/sbin/mkfs.ext4", "mke2fs")?;
    tree.symlink("usr/sbin/mkfs.vfat", "mkfs.fat")?;
    tree.symlink("sbin", "usr/sbin")?;
    tree.symlink("bin", "usr/bin")?;
    tree.dir("usr/bin", 0o755)?;

    let mke2fs_conf = Path::new("/etc/mke2fs.conf");
    if !mke2fs_conf.is_file() {
        return Err(Error::MissingTool { tool: "/etc/mke2fs.conf".into(), package: "e2fsprogs".into() });
    }
    tree.host_file("etc/mke2fs.conf", 0o644, mke2fs_conf)?;
    let ca = Path::new(HOST_CA_BUNDLE);
    if !ca.is_file() {
        return Err(Error::MissingTool { tool: ca.display().to_string(), package: "ca-certificates".into() });
    }
    tree.host_file("etc/ssl/certs/ca-certificates.crt", 0o644, ca)?;
    Ok((tree, order.len()))
}

/// The system CA bundle, on the build host and in the initramfs.
pub const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// `host` with every file of `extra` appended; each must be a PEM bundle of certificates.
pub fn ca_bundle(host: &Path, extra: &[PathBuf]) -> Result<Vec<u8>> {
    let mut bundle = fs::read(host).map_err(at(host))?;
    for f in extra {
        metal_client::tls::read_ca_file(f).map_err(|e| {
            let mut msg = format!("--ca: {e}");
            if let Some(src) = std::error::Error::source(&e) {
                msg.push_str(&format!(": {src}"));
            }
            Error::Invalid(msg)
        })?;
        if !bundle.ends_with(b"\n") {
            bundle.push(b'\n');
        }
        bundle.extend_from_slice(&fs::read(f).map_err(at(f))?);
    }
    Ok(bundle)
}

/// Builds `vmlinuz` and `initrd.img` in `opts.out`.
pub fn build(opts: &HammerOptions) -> Result<HammerOutput> {
    let started = Instant::now();
    let kernel = KernelDir::open(&opts.kernel_dir)?;
    if !opts.hammer_bin.is_file() {
        return Err(Error::Invalid(format!(
            "no metal-hammer binary at {}: build it with `cargo build -p metal-hammer --release --target x86_64-unknown-linux-musl`",
            opts.hammer_bin.display()
        )));
    }
    fs::create_dir_all(&opts.out).map_err(at(&opts.out))?;
    eprintln!("hammer: collecting /init, modules ({}) and tools…", kernel.version);
    let (mut tree, modules) = tree(&kernel, &opts.hammer_bin, &opts.extra_modules)?;
    if !opts.ca_files.is_empty() {
        let bundle = ca_bundle(Path::new(HOST_CA_BUNDLE), &opts.ca_files)?;
        tree.bytes(&HOST_CA_BUNDLE[1..], 0o644, bundle)?;
        eprintln!("hammer: CA bundle with {} operator CA file(s) appended", opts.ca_files.len());
    }
    eprintln!(
        "hammer: {} entries, {} modules, {} MiB uncompressed; compressing (zstd -{})…",
        tree.len(),
        modules,
        tree.file_bytes() >> 20,
        opts.zstd_level
    );
    let initrd_path = opts.out.join("initrd.img");
    let initrd = archive::write_zst(&initrd_path, opts.zstd_level, "initrd.img", |w| cpio::write(&tree, w))?;
    let vmlinuz = opts.out.join("vmlinuz");
    let kernel_bytes = fs::read(kernel.vmlinuz()).map_err(at(kernel.vmlinuz()))?;
    archive::write_file(&vmlinuz, &kernel_bytes)?;
    eprintln!(
        "hammer: initrd.img {:.1} MiB compressed ({:.1} MiB cpio), vmlinuz {:.1} MiB, in {:.1?}",
        initrd.compressed_size as f64 / 1048576.0,
        initrd.uncompressed_size as f64 / 1048576.0,
        kernel_bytes.len() as f64 / 1048576.0,
        started.elapsed()
    );
    Ok(HammerOutput { vmlinuz, initrd, modules })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operator_cas_are_appended_to_the_bundle_and_broken_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host.crt");
        let ca = metal_client::ca::TestCa::generate("operator CA").unwrap().cert_pem;
        fs::write(&host, "# host bundle without a final newline").unwrap();
        let op = dir.path().join("operator.pem");
        fs::write(&op, &ca).unwrap();
        let bundle = String::from_utf8(ca_bundle(&host, std::slice::from_ref(&op)).unwrap()).unwrap();
        assert_eq!(bundle, format!("# host bundle without a final newline\n{ca}"));

        let key = dir.path().join("key.pem");
        fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        for bad in [key, dir.path().join("missing.pem")] {
            let err = ca_bundle(&host, &[op.clone(), bad.clone()]).unwrap_err().to_string();
            assert!(err.contains("--ca") && err.contains(&*bad.file_name().unwrap().to_string_lossy()), "{err}");
        }
    }
}
