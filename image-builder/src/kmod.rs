//! Kernel module bookkeeping: `modules.dep`, `modules.alias`, `modules.builtin`.
//!
//! The initramfs images carry only some modules. These functions pick a set by module name,
//! close it over its dependencies, order it for loading, and write `modules.dep` and
//! `modules.alias` files that mention only what is included, so the runtime (metal-hammer, or the
//! test OS's `/init`) never looks for a module that is not there. All pure, except [`ModuleIndex::load`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{at, Error, Result};

/// `kernel/drivers/net/virtio_net.ko` → `virtio_net`; `crc32c-intel.ko` → `crc32c_intel`.
pub fn module_name(relpath: &str) -> String {
    let file = relpath.rsplit('/').next().unwrap_or(relpath);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModuleIndex {
    /// Module path (relative to `lib/modules/<version>/`) → the paths it depends on.
    pub deps: BTreeMap<String, Vec<String>>,
    /// Module name → module path.
    pub by_name: BTreeMap<String, String>,
    /// Names of modules built into the kernel image.
    pub builtin: BTreeSet<String>,
}

/// The result of [`ModuleIndex::resolve`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Module paths: the requested modules and everything they depend on.
    pub modules: BTreeSet<String>,
    /// Requested names that are built into the kernel (nothing to include).
    pub builtin: Vec<String>,
    /// Requested names that exist nowhere.
    pub missing: Vec<String>,
}

impl ModuleIndex {
    /// Reads `modules.dep` and `modules.builtin` from a `lib/modules/<version>` directory.
    pub fn load(dir: &Path) -> Result<ModuleIndex> {
        let dep_file = dir.join("modules.dep");
        let dep = fs::read_to_string(&dep_file).map_err(at(&dep_file))?;
        let builtin_file = dir.join("modules.builtin");
        let builtin = fs::read_to_string(&builtin_file).unwrap_or_default();
        ModuleIndex::parse(&dep, &builtin).map_err(|message| Error::Parse { file: dep_file, message })
    }

    pub fn parse(dep: &str, builtin: &str) -> Result<ModuleIndex, String> {
        let mut index = ModuleIndex::default();
        for (n, line) in dep.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (module, rest) = line.split_once(':').ok_or_else(|| format!("line {}: no `:` in {line:?}", n + 1))?;
            let module = module.trim().to_string();
            let deps = rest.split_whitespace().map(str::to_string).collect();
            index.by_name.insert(module_name(&module), module.clone());
            index.deps.insert(module, deps);
        }
        index.builtin = builtin.lines().map(str::trim).filter(|l| !l.is_empty()).map(module_name).collect();
        Ok(index)
    }

    /// Closes `names` over their dependencies.
    pub fn resolve<S: AsRef<str>>(&self, names: &[S]) -> Resolved {
        let mut out = Resolved::default();
        for name in names {
            let name = name.as_ref().replace('-', "_");
            if let Some(path) = self.by_name.get(&name) {
                out.modules.insert(path.clone());
                for dep in self.deps.get(path).into_iter().flatten() {
                    out.modules.insert(dep.clone());
                    // modules.dep lists the full closure, but be safe with hand-made files.
                    self.add_closure(dep, &mut out.modules);
                }
            } else if self.builtin.contains(&name) {
                out.builtin.push(name);
            } else {
                out.missing.push(name);
            }
        }
        out
    }

    fn add_closure(&self, path: &str, set: &mut BTreeSet<String>) {
        for dep in self.deps.get(path).into_iter().flatten() {
            if set.insert(dep.clone()) {
                self.add_closure(dep, set);
            }
        }
    }

    /// `set` in an order `insmod` accepts: every module after all of its dependencies; ties
    /// broken by path, so the order is stable.
    pub fn load_order(&self, set: &BTreeSet<String>) -> Vec<String> {
        fn visit(index: &ModuleIndex, path: &str, set: &BTreeSet<String>, done: &mut BTreeSet<String>, order: &mut Vec<String>) {
            if !set.contains(path) || !done.insert(path.to_string()) {
                return;
            }
            for dep in index.deps.get(path).into_iter().flatten() {
                visit(index, dep, set, done, order);
            }
            order.push(path.to_string());
        }
        let mut done = BTreeSet::new();
        let mut order = Vec::new();
        for path in set {
            visit(self, path, set, &mut done, &mut order);
        }
        order
    }

    /// A `modules.dep` mentioning only the modules of `set`.
    pub fn restricted_dep(&self, set: &BTreeSet<String>) -> String {
        let mut out = String::new();
        for path in set {
            out.push_str(path);
            out.push(':');
            for dep in self.deps.get(path).into_iter().flatten().filter(|d| set.contains(*d)) {
                out.push(' ');
                out.push_str(dep);
            }
            out.push('\n');
        }
        out
    }
}

/// Keeps the `alias <pattern> <module>` lines of a `modules.alias` whose module is in `names`.
pub fn restrict_alias(alias: &str, names: &BTreeSet<String>) -> String {
    let mut out = String::from("# Aliases of the modules in this image (generated by image-builder).\n");
    for line in alias.lines() {
        let mut words = line.split_whitespace();
        if let (Some("alias"), Some(_), Some(module), None) = (words.next(), words.next(), words.next(), words.next()) {
            if names.contains(&module.replace('-', "_")) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// File in an extracted kernel naming the package it came from: `<package> <version>`.
pub const PACKAGE_FILE: &str = "metal-kernel-package";

/// The `lib/modules/<version>` directory of an extracted kernel, and the kernel image beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDir {
    pub root: PathBuf,
    pub version: String,
}

impl KernelDir {
    /// Opens `<root>` laid out as `dpkg -x` leaves a linux-image package: `boot/vmlinuz-<v>` and
    /// `lib/modules/<v>/` with `modules.dep` (generated by `image-builder kernel`).
    pub fn open(root: &Path) -> Result<KernelDir> {
        let missing = |what: String| Error::MissingKernel { dir: root.to_path_buf(), what };
        let modules = root.join("lib/modules");
        let mut versions: Vec<String> = fs::read_dir(&modules)
            .map_err(|e| missing(format!("{}: {e}", modules.display())))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        versions.sort();
        let version = match versions.as_slice() {
            [v] => v.clone(),
            [] => return Err(missing("lib/modules/ is empty".into())),
            many => return Err(missing(format!("several kernels in lib/modules/: {}", many.join(", ")))),
        };
        let kernel = KernelDir { root: root.to_path_buf(), version };
        if !kernel.vmlinuz().is_file() {
            return Err(missing(format!("no {}", kernel.vmlinuz().display())));
        }
        if !kernel.modules_dir().join("modules.dep").is_file() {
            return Err(missing("no modules.dep (not prepared by `image-builder kernel`)".into()));
        }
        Ok(kernel)
    }

    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join("boot").join(format!("vmlinuz-{}", self.version))
    }

    /// `linux-image-6.1.0-56-amd64 6.1.192-2`, when `image-builder kernel` recorded it.
    pub fn package(&self) -> Option<String> {
        fs::read_to_string(self.root.join(PACKAGE_FILE)).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
    }

    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/arch/x86/crypto/crc32c-intel.ko:
kernel/fs/ext4/ext4.ko: kernel/lib/crc16.ko kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko
kernel/lib/crc16.ko:
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
";
    const BUILTIN: &str = "kernel/net/packet/af_packet.ko\n";

    fn index() -> ModuleIndex {
        ModuleIndex::parse(DEP, BUILTIN).unwrap()
    }

    #[test]
    fn names() {
        assert_eq!(module_name("kernel/arch/x86/crypto/crc32c-intel.ko"), "crc32c_intel");
        assert_eq!(module_name("kernel/fs/ext4/ext4.ko.zst"), "ext4");
    }

    #[test]
    fn resolve_closes_over_dependencies() {
        let r = index().resolve(&["virtio_net", "crc32c-intel", "af_packet", "nope"]);
        assert_eq!(
            r.modules.iter().map(String::as_str).collect::<Vec<_>>(),
            [
                "kernel/arch/x86/crypto/crc32c-intel.ko",
                "kernel/drivers/net/net_failover.ko",
                "kernel/drivers/net/virtio_net.ko",
                "kernel/net/core/failover.ko"
            ]
        );
        assert_eq!(r.builtin, ["af_packet"]);
        assert_eq!(r.missing, ["nope"]);
    }

    #[test]
    fn load_order_puts_dependencies_first() {
        let idx = index();
        let r = idx.resolve(&["virtio_net", "ext4"]);
        let order = idx.load_order(&r.modules);
        assert_eq!(order.len(), r.modules.len());
        let pos = |m: &str| order.iter().position(|p| p.ends_with(m)).unwrap();
        assert!(pos("/failover.ko") < pos("/net_failover.ko"));
        assert!(pos("/net_failover.ko") < pos("/virtio_net.ko"));
        assert!(pos("/jbd2.ko") < pos("/ext4.ko"));
        assert!(pos("/crc16.ko") < pos("/ext4.ko"));
    }

    #[test]
    fn restricted_files_mention_only_included_modules() {
        let idx = index();
        let r = idx.resolve(&["virtio_net"]);
        let dep = idx.restricted_dep(&r.modules);
        assert_eq!(
            dep,
            "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n\
             kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko\n\
             kernel/net/core/failover.ko:\n"
        );
        let names: BTreeSet<String> = r.modules.iter().map(|m| module_name(m)).collect();
        let alias = restrict_alias(
            "# Aliases extracted from modules themselves.\nalias virtio:d00000001v* virtio_net\nalias pci:v00008086d* e1000e\n",
            &names,
        );
        assert!(alias.contains("alias virtio:d00000001v* virtio_net\n"));
        assert!(!alias.contains("e1000e"));
    }

    #[test]
    fn malformed_dep_is_an_error() {
        assert!(ModuleIndex::parse("kernel/a.ko kernel/b.ko\n", "").is_err());
    }
}
