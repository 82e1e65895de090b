//! `image-builder kernel`: Debian's kernel, extracted into a cache rather than installed.
//!
//! `<cache>/kernel/<version>/` holds what `dpkg -x` leaves from the real `linux-image-<version>`
//! package (the one `linux-image-amd64` depends on) plus `modules.dep`/`modules.alias` generated
//! by `depmod -b`. The directory appears by an atomic rename once it is complete, so its
//! existence means "done" and a second run does nothing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{at, Error, Result};
use crate::kmod::KernelDir;
use crate::tools;

/// The concrete kernel package behind a meta package, from `apt-cache show` output:
/// `Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)` → `linux-image-6.1.0-56-amd64`.
pub fn concrete_package(apt_cache_show: &str) -> Option<String> {
    let depends = apt_cache_show.lines().find_map(|l| l.strip_prefix("Depends:"))?;
    depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-") && d.as_bytes().get(12).is_some_and(u8::is_ascii_digit))
        .map(str::to_string)
}

/// `linux-image-6.1.0-56-amd64` → `6.1.0-56-amd64`.
pub fn package_version(package: &str) -> Option<&str> {
    package.strip_prefix("linux-image-").filter(|v| v.as_bytes().first().is_some_and(u8::is_ascii_digit))
}

/// Ensures the kernel of `package` is extracted under `<cache>/kernel/<version>/`; returns it.
pub fn ensure(cache: &Path, package: &str) -> Result<KernelDir> {
    let concrete = match package_version(package) {
        Some(_) => package.to_string(),
        None => {
            let apt_cache = tools::require("apt-cache", "apt")?;
            let out = tools::run(Command::new(apt_cache).args(["show", "--no-all-versions", package]))?;
            concrete_package(&String::from_utf8_lossy(&out.stdout))
                .ok_or_else(|| Error::Invalid(format!("`apt-cache show {package}` names no linux-image-<version> dependency")))?
        }
    };
    let version = package_version(&concrete).unwrap_or_default().to_string();
    let kernel_root = cache.join("kernel");
    let dest = kernel_root.join(&version);
    if dest.exists() {
        eprintln!("kernel {version}: already in {}", dest.display());
        return KernelDir::open(&dest);
    }
    let apt_get = tools::require("apt-get", "apt")?;
    let dpkg = tools::require("dpkg", "dpkg")?;
    let depmod = tools::require("depmod", "kmod")?;

    fs::create_dir_all(&kernel_root).map_err(at(&kernel_root))?;
    let work = kernel_root.join(format!(".{version}.partial"));
    if work.exists() {
        fs::remove_dir_all(&work).map_err(at(&work))?;
    }
    let download = work.join("download");
    let root = work.join("root");
    fs::create_dir_all(&download).map_err(at(&download))?;
    fs::create_dir_all(&root).map_err(at(&root))?;

    eprintln!("kernel {version}: downloading {concrete} (apt-get download)…");
    tools::run_writing(Command::new(apt_get).arg("download").arg(&concrete).current_dir(&download), &download).map_err(|e| {
        match e {
            Error::NoSpace { .. } => e,
            e => Error::Invalid(format!(
            "could not download {concrete}: {e}\n(it needs a Debian mirror in /etc/apt/sources.list and a fresh `apt-get update`)"
        )),
        }
    })?;
    let deb = find_deb(&download, &concrete)?;
    let deb_version = deb.file_name().and_then(|n| n.to_str()).and_then(|n| n.split('_').nth(1)).unwrap_or("").to_string();

    eprintln!("kernel {version}: extracting {} (dpkg -x)…", deb.display());
    tools::run_writing(Command::new(&dpkg).arg("-x").arg(&deb).arg(&root), &root)?;
    // usrmerge layouts put modules under usr/lib; keep one place: lib/modules.
    if !root.join("lib/modules").exists() && root.join("usr/lib/modules").exists() {
        fs::create_dir_all(root.join("lib")).map_err(at(&root))?;
        fs::rename(root.join("usr/lib/modules"), root.join("lib/modules")).map_err(at(&root))?;
    }
    let modules = root.join("lib/modules").join(&version);
    if !modules.is_dir() {
        return Err(Error::Invalid(format!("{concrete} has no lib/modules/{version}/")));
    }

    eprintln!("kernel {version}: generating modules.dep and modules.alias (depmod -b)…");
    tools::run_writing(Command::new(depmod).arg("-b").arg(&root).arg(&version), &modules)?;
    fs::remove_dir_all(&download).map_err(at(&download))?;
    let package_file = root.join(crate::kmod::PACKAGE_FILE);
    fs::write(&package_file, format!("{concrete} {deb_version}\n")).map_err(at(&package_file))?;

    fs::rename(&root, &dest).map_err(at(&dest))?;
    fs::remove_dir_all(&work).map_err(at(&work))?;
    eprintln!("kernel {version}: ready in {}", dest.display());
    KernelDir::open(&dest)
}

fn find_deb(dir: &Path, package: &str) -> Result<PathBuf> {
    for e in fs::read_dir(dir).map_err(at(dir))? {
        let p = e.map_err(at(dir))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(&format!("{package}_")) && name.ends_with(".deb") {
            return Ok(p);
        }
    }
    Err(Error::Invalid(format!("apt-get download left no {package}_*.deb in {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_package_to_concrete() {
        let show = "Package: linux-image-amd64\nSource: linux-signed-amd64 (6.1.192+2)\n\
                    Depends: linux-image-6.1.0-56-amd64 (= 6.1.192-2)\nDescription: x\n";
        assert_eq!(concrete_package(show).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        assert_eq!(
            concrete_package("Depends: linux-image-amd64-signed-template | linux-image-6.1.0-9-amd64-unsigned\n").as_deref(),
            Some("linux-image-6.1.0-9-amd64-unsigned")
        );
        assert_eq!(concrete_package("Package: x\n"), None);
    }

    #[test]
    fn versions() {
        assert_eq!(package_version("linux-image-6.1.0-56-amd64"), Some("6.1.0-56-amd64"));
        assert_eq!(package_version("linux-image-amd64"), None);
    }
}
