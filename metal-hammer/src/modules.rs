//! Kernel modules: load what the hardware needs, the way udev + modprobe would.
//!
//! `modules.alias` maps glob patterns over device modaliases (`pci:v00001AF4d00001000…`) to
//! module names; `modules.dep` maps each module file to the files it needs first. Parsing and
//! matching are pure; [`load_for_hardware`] reads `/sys` and loads through [`Sys::load_module`].
//! Loading a bus driver makes new devices appear (virtio_pci → virtio devices → virtio_blk), so
//! it rescans until a round loads nothing new.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use crate::sys::Sys;

#[derive(Debug, thiserror::Error)]
pub enum ModulesError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
}

/// Module names compare with `-` and `_` as the same character.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// `kernel/drivers/block/virtio_blk.ko` → `virtio_blk`.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    normalize(stem)
}

/// The parsed `modules.alias` and `modules.dep` of one kernel.
#[derive(Debug, Default, Clone)]
pub struct ModuleIndex {
    /// `(pattern, module name)` in file order.
    pub aliases: Vec<(String, String)>,
    /// module name → (relative path, dependency paths in `modules.dep` order).
    pub deps: BTreeMap<String, (String, Vec<String>)>,
}

impl ModuleIndex {
    pub fn parse(alias_text: &str, dep_text: &str) -> ModuleIndex {
        let aliases = alias_text
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                match (w.next(), w.next(), w.next()) {
                    (Some("alias"), Some(pat), Some(module)) => Some((pat.to_string(), normalize(module))),
                    _ => None,
                }
            })
            .collect();
        let deps = dep_text
            .lines()
            .filter_map(|l| {
                let (path, rest) = l.split_once(':')?;
                let path = path.trim();
                if path.is_empty() {
                    return None;
                }
                Some((module_name(path), (path.to_string(), rest.split_whitespace().map(String::from).collect())))
            })
            .collect();
        ModuleIndex { aliases, deps }
    }

    /// Reads `<dir>/modules.alias` and `<dir>/modules.dep`.
    pub fn load(dir: &Path) -> Result<ModuleIndex, ModulesError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| ModulesError::Read { path, source })
        };
        Ok(ModuleIndex::parse(&read("modules.alias")?, &read("modules.dep")?))
    }

    /// Modules whose alias pattern matches `modalias` (a module name itself also resolves).
    pub fn resolve(&self, modalias: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if self.deps.contains_key(&normalize(modalias)) {
            out.push(normalize(modalias));
        }
        for (pat, module) in &self.aliases {
            if glob_match(pat, modalias) && !out.contains(module) {
                out.push(module.clone());
            }
        }
        out
    }

    /// Module files to load for `module`, dependencies first, each once; modules already in
    /// `done` are left out. Unknown (built-in) modules give an empty list.
    pub fn load_order(&self, module: &str, done: &HashSet<String>) -> Vec<String> {
        let mut order = Vec::new();
        let mut seen: HashSet<String> = done.clone();
        self.visit(&normalize(module), &mut seen, &mut order, 0);
        order
    }

    fn visit(&self, name: &str, seen: &mut HashSet<String>, order: &mut Vec<String>, depth: usize) {
        if depth > 64 || seen.contains(name) {
            return;
        }
        let Some((path, deps)) = self.deps.get(name) else { return };
        seen.insert(name.to_string());
        // modprobe loads the list from its end: the last entry has no dependencies left.
        for dep in deps.iter().rev() {
            self.visit(&module_name(dep), seen, order, depth + 1);
        }
        order.push(path.clone());
    }
}

/// Shell-style glob as in `modules.alias`: `*`, `?` and `[…]` classes (with ranges and `!`/`^`).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ti));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class_match(&p, pi, t[ti]) {
                        if matched {
                            pi = next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == '[' {
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, st)) => {
                pi = sp + 1;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Matches `c` against the class starting at `p[start] == '['`; returns (matched, index after
/// `]`), or `None` when the class is not closed (then `[` is a literal).
fn class_match(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

/// Every device modalias under `<sys>/devices/**/modalias` and `<sys>/bus/*/devices/*/modalias`.
pub fn read_modaliases(sys: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![sys.join("devices")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() && e.file_name() == "modalias" {
                if let Ok(s) = std::fs::read_to_string(e.path()) {
                    let s = s.trim();
                    if !s.is_empty() {
                        out.insert(s.to_string());
                    }
                }
            }
        }
    }
    if let Ok(buses) = std::fs::read_dir(sys.join("bus")) {
        for bus in buses.flatten() {
            let Ok(devs) = std::fs::read_dir(bus.path().join("devices")) else { continue };
            for d in devs.flatten() {
                if let Ok(s) = std::fs::read_to_string(d.path().join("modalias")) {
                    let s = s.trim();
                    if !s.is_empty() {
                        out.insert(s.to_string());
                    }
                }
            }
        }
    }
    out
}

/// Modules loaded regardless of hardware: what install and the kernel ask for by name
/// (filesystems, their checksums and code pages, SCSI disks behind any host adapter).
pub const ALWAYS: &[&str] = &[
    "crc32c_intel",
    "crc32c_generic",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_utf8",
    "nls_ascii",
    "nls_iso8859_1",
    "sd_mod",
    "af_packet",
];

/// What [`load_for_hardware`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadSummary {
    pub loaded: Vec<String>,
    pub failed: Vec<(String, String)>,
}

/// Loads the modules for every modalias under `sysfs`, plus `extra` by name, rescanning after
/// each round (new buses expose new devices) until nothing new loads, at most `rounds` times.
/// A module that fails to load is recorded, not fatal: hardware we cannot drive is reported
/// by the stages that need it.
pub fn load_for_hardware(
    sys: &dyn Sys,
    index: &ModuleIndex,
    modules_dir: &Path,
    sysfs: &Path,
    extra: &[&str],
    rounds: usize,
    settle: std::time::Duration,
) -> LoadSummary {
    let mut done: HashSet<String> = HashSet::new();
    let mut summary = LoadSummary::default();
    let mut wanted: Vec<String> = extra.iter().map(|m| normalize(m)).collect();
    for round in 0..rounds {
        let aliases = read_modaliases(sysfs);
        for alias in &aliases {
            for m in index.resolve(alias) {
                if !wanted.contains(&m) {
                    wanted.push(m);
                }
            }
        }
        let mut new = 0;
        for m in wanted.clone() {
            for path in index.load_order(&m, &done) {
                let name = module_name(&path);
                done.insert(name.clone());
                match sys.load_module(&modules_dir.join(&path), "") {
                    Ok(()) => {
                        summary.loaded.push(name);
                        new += 1;
                    }
                    // ENODEV: the driver has no hardware here (crc32c_intel without SSE4.2).
                    Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
                    Err(e) => summary.failed.push((name, e.to_string())),
                }
            }
            done.insert(m);
        }
        if new == 0 && round > 0 {
            break;
        }
        if new > 0 {
            std::thread::sleep(settle);
        }
    }
    summary
}

/// What the kernel runs for `request_module()`: `<modprobe> -q -- <name>`. Returns the module
/// name when `args` (without argv\[0\]) look like that.
pub fn modprobe_request(args: &[String]) -> Option<&str> {
    match args {
        [q, dashes, name] if q == "-q" && dashes == "--" => Some(name),
        [q, name] if q == "-q" && !name.starts_with('-') => Some(name),
        _ => None,
    }
}

/// Loads `name` (a module name or an alias such as `crypto-crc32c`, `fs-vfat`) with its
/// dependencies. Used when the kernel calls us as its modprobe.
pub fn modprobe(sys: &dyn Sys, index: &ModuleIndex, modules_dir: &Path, name: &str) -> Result<usize, std::io::Error> {
    let candidates = index.resolve(name);
    if candidates.is_empty() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("no module for {name}")));
    }
    let mut done = HashSet::new();
    let mut loaded = 0;
    let mut last_err = None;
    for m in candidates {
        for path in index.load_order(&m, &done) {
            done.insert(module_name(&path));
            match sys.load_module(&modules_dir.join(&path), "") {
                Ok(()) => loaded += 1,
                Err(e) => last_err = Some(e),
            }
        }
    }
    match (loaded, last_err) {
        (0, Some(e)) => Err(e),
        _ => Ok(loaded),
    }
}

/// Makes the kernel call `exe` for `request_module()` (filesystems, crypto algorithms, …), via
/// `<root>/proc/sys/kernel/modprobe`. The initramfs has no modprobe of its own.
pub fn register_as_modprobe(root: &Path, exe: &Path) -> std::io::Result<()> {
    std::fs::write(root.join("proc/sys/kernel/modprobe"), exe.as_os_str().as_encoded_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, RecordingSys};

    const ALIAS: &str = "# Aliases extracted from modules themselves.
alias pci:v00001AF4d00001000sv*sd*bc*sc*i* virtio_pci
alias pci:v00001AF4d*sv*sd*bc*sc*i* virtio_pci
alias virtio:d00000002v* virtio_blk
alias virtio:d00000001v* virtio_net
alias pci:v*d*sv*sd*bc01sc08i02* nvme
alias fs-ext4 ext4
alias usb:v*p*d*dc*dsc*dp*ic08isc0[1-6]ip50in* usb-storage
";
    const DEP: &str = "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko:
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/drivers/nvme/host/nvme.ko: kernel/drivers/nvme/host/nvme-core.ko
kernel/drivers/nvme/host/nvme-core.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/mbcache.ko kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko
kernel/fs/mbcache.ko:
kernel/fs/jbd2/jbd2.ko:
kernel/lib/crc16.ko:
kernel/drivers/usb/storage/usb-storage.ko:
";

    #[test]
    fn globs_like_fnmatch() {
        assert!(glob_match("pci:v00001AF4d*sv*sd*bc*sc*i*", "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"));
        assert!(!glob_match("pci:v00001AF4d*sv*", "pci:v00008086d00001001sv0"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("x[0-9]y", "x5y"));
        assert!(!glob_match("x[!0-9]y", "x5y"));
        assert!(glob_match("x[!0-9]y", "xay"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYbc"));
        assert!(!glob_match("a*b*c", "aXXbYYbd"));
        assert!(glob_match("x[y", "x[y"));
    }

    #[test]
    fn resolves_aliases_and_names() {
        let idx = ModuleIndex::parse(ALIAS, DEP);
        assert_eq!(idx.resolve("pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00"), vec!["virtio_pci"]);
        assert_eq!(idx.resolve("virtio:d00000002v00001AF4"), vec!["virtio_blk"]);
        assert_eq!(idx.resolve("pci:v00001B36d00000010sv00001AF4sd00001100bc01sc08i02"), vec!["nvme"]);
        assert_eq!(idx.resolve("usb:v0781p5567d0100dc00dsc00dp00ic08isc06ip50in00"), vec!["usb_storage"]);
        assert_eq!(idx.resolve("fs-ext4"), vec!["ext4"]);
        assert_eq!(idx.resolve("ext4"), vec!["ext4"]);
        assert!(idx.resolve("acpi:PNP0A03:").is_empty());
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let idx = ModuleIndex::parse(ALIAS, DEP);
        let order = idx.load_order("virtio_net", &HashSet::new());
        let names: Vec<String> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(names, vec!["virtio", "virtio_ring", "failover", "net_failover", "virtio_net"]);
        let done: HashSet<String> = ["virtio".to_string(), "virtio_ring".to_string()].into();
        let names: Vec<String> = idx.load_order("virtio-blk", &done).iter().map(|p| module_name(p)).collect();
        assert_eq!(names, vec!["virtio_blk"]);
        assert!(idx.load_order("builtin_thing", &HashSet::new()).is_empty());
    }

    #[test]
    fn modprobe_requests_from_the_kernel() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(modprobe_request(&args(&["-q", "--", "fs-ext4"])), Some("fs-ext4"));
        assert_eq!(modprobe_request(&args(&["-q", "crypto-crc32c"])), Some("crypto-crc32c"));
        assert_eq!(modprobe_request(&args(&["inventory"])), None);
        assert_eq!(modprobe_request(&args(&["-q", "--help"])), None);

        let idx = ModuleIndex::parse(ALIAS, DEP);
        let sys = RecordingSys::new();
        assert_eq!(modprobe(&sys, &idx, Path::new("/m"), "fs-ext4").unwrap(), 4);
        assert_eq!(
            sys.calls().last(),
            Some(&Call::LoadModule { path: "/m/kernel/fs/ext4/ext4.ko".into(), params: String::new() })
        );
        assert!(modprobe(&sys, &idx, Path::new("/m"), "fs-zfs").is_err());
    }

    #[test]
    fn loads_for_a_fake_sysfs_and_rescans() {
        let dir = tempfile::tempdir().unwrap();
        let sysfs = dir.path();
        let pci = sysfs.join("devices/pci0000:00/0000:00:04.0");
        std::fs::create_dir_all(&pci).unwrap();
        std::fs::write(pci.join("modalias"), "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00\n").unwrap();
        let idx = ModuleIndex::parse(ALIAS, DEP);
        let sys = RecordingSys::new();
        // The virtio device "appears" once the PCI driver is loaded: emulate with a second file
        // written before the run (read in round 0 as well; the rescan must not load twice).
        let vdev = pci.join("virtio1");
        std::fs::create_dir_all(&vdev).unwrap();
        std::fs::write(vdev.join("modalias"), "virtio:d00000002v00001AF4\n").unwrap();
        let summary = load_for_hardware(&sys, &idx, Path::new("/lib/modules/x"), sysfs, &["ext4"], 4, std::time::Duration::ZERO);
        let loaded: Vec<PathBuf> = sys
            .calls()
            .into_iter()
            .map(|c| match c {
                Call::LoadModule { path, .. } => path,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        let names: Vec<String> = loaded.iter().map(|p| module_name(&p.to_string_lossy())).collect();
        assert_eq!(
            names,
            vec![
                "crc16",
                "jbd2",
                "mbcache",
                "ext4",
                "virtio",
                "virtio_ring",
                "virtio_pci_legacy_dev",
                "virtio_pci_modern_dev",
                "virtio_pci",
                "virtio_blk"
            ]
        );
        assert_eq!(loaded[3], Path::new("/lib/modules/x/kernel/fs/ext4/ext4.ko"));
        assert_eq!(summary.loaded.len(), 10);
        assert!(summary.failed.is_empty());
    }
}
