//! The lab's TLS: a CA generated per lab, a server certificate for the API's lab address, and
//! the per-lab metal-hammer initrd that carries the CA.
//!
//! On by default; `METAL_LAB_TLS=0` runs the lab on plain HTTP (for debugging with tcpdump).
//! The files live in the lab directory: `tls/ca.pem`, `tls/api.pem`, `tls/api.key` (0600).
//!
//! metal-hammer trusts its initramfs's `/etc/ssl/certs/ca-certificates.crt` and
//! `/etc/metal/ca.pem` (`metal_hammer::tls`). The lab does not rebuild the shared
//! `target/lab/hammer/initrd.img`: it copies it into the lab directory and appends a small
//! uncompressed newc cpio holding `/etc/metal/ca.pem` (the kernel unpacks a concatenation of
//! cpio archives, compressed or not, each starting 4-byte aligned). The system bundle stays as
//! image-builder put it.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use metal_client::ca::TestCa;
use metal_client::tls::Roots;

use crate::netns::HOST_IP;

/// Whether the lab runs with TLS (`METAL_LAB_TLS` is not `0`).
pub fn enabled() -> bool {
    std::env::var("METAL_LAB_TLS").map_or(true, |v| v != "0")
}

/// One lab's CA and the API's certificate, as files.
#[derive(Debug, Clone)]
pub struct LabTls {
    pub ca_file: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca_pem: String,
}

impl LabTls {
    /// Generates the CA and a certificate for the API's lab address (and `localhost`) in
    /// `<dir>/tls`.
    pub fn generate(dir: &Path) -> Result<LabTls> {
        let tls = dir.join("tls");
        std::fs::create_dir_all(&tls).with_context(|| format!("create {}", tls.display()))?;
        let ca = TestCa::generate("metal lab CA").context("generate the lab CA")?;
        ca.write_server_files(&tls, "api", &[&HOST_IP.to_string(), "localhost"]).context("write the lab's TLS files")?;
        Ok(LabTls { ca_file: tls.join("ca.pem"), cert: tls.join("api.pem"), key: tls.join("api.key"), ca_pem: ca.cert_pem })
    }

    /// What the lab's own HTTP clients trust.
    pub fn roots(&self) -> Result<Roots> {
        Ok(Roots::from_ca_file(Some(&self.ca_file))?)
    }
}

/// Writes `dir/vmlinuz` and `dir/initrd.img`: the shared kernel (hard-linked, or copied across
/// filesystems) and the shared initrd with a cpio adding `/etc/metal/ca.pem` appended.
pub fn lab_hammer_dir(shared: &Path, dir: &Path, ca_pem: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let (src, dst) = (shared.join("vmlinuz"), dir.join("vmlinuz"));
    let _ = std::fs::remove_file(&dst);
    if std::fs::hard_link(&src, &dst).is_err() {
        std::fs::copy(&src, &dst).with_context(|| format!("copy {} to {}", src.display(), dst.display()))?;
    }
    let mut initrd =
        std::fs::read(shared.join("initrd.img")).with_context(|| format!("read {}", shared.join("initrd.img").display()))?;
    // The next archive must start 4-byte aligned; the kernel skips NUL padding between them.
    initrd.resize(initrd.len().next_multiple_of(4), 0);
    newc(&mut initrd, &[Entry::Dir("etc"), Entry::Dir("etc/metal"), Entry::File("etc/metal/ca.pem", ca_pem.as_bytes())]);
    let out = dir.join("initrd.img");
    std::fs::File::create(&out).and_then(|mut f| f.write_all(&initrd)).with_context(|| format!("write {}", out.display()))?;
    Ok(())
}

/// One member of a newc archive (root-owned; directories 0755, files 0644).
#[derive(Debug, Clone, Copy)]
pub enum Entry<'a> {
    Dir(&'a str),
    File(&'a str, &'a [u8]),
}

/// Appends an uncompressed newc ("070701") cpio archive of `entries` to `out`, ending with
/// the `TRAILER!!!` entry. `out` must be 4-byte aligned at the start.
pub fn newc(out: &mut Vec<u8>, entries: &[Entry<'_>]) {
    fn pad(out: &mut Vec<u8>) {
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let mut member = |ino: u32, name: &str, mode: u32, data: &[u8]| {
        let fields = [
            ino,
            mode,
            0,
            0,
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad(out);
        out.extend_from_slice(data);
        pad(out);
    };
    for (i, e) in entries.iter().enumerate() {
        match *e {
            Entry::Dir(name) => member(i as u32 + 1, name, 0o040755, &[]),
            Entry::File(name, data) => member(i as u32 + 1, name, 0o100644, data),
        }
    }
    member(0, "TRAILER!!!", 0, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cpio -t` (GNU cpio) reads the archive back, when it is installed.
    #[test]
    fn newc_archive_reads_back() {
        let mut a = Vec::new();
        newc(&mut a, &[Entry::Dir("etc"), Entry::Dir("etc/metal"), Entry::File("etc/metal/ca.pem", b"PEM\n")]);
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        if !metal_testkit::require(metal_testkit::have("cpio"), "the cpio read-back needs the cpio program") {
            return;
        }
        let mut child = std::process::Command::new("cpio")
            .args(["-it", "--quiet", "-v"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cpio");
        child.stdin.take().unwrap().write_all(&a).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), 3, "{listing}");
        assert!(lines[0].starts_with("drwxr-xr-x") && lines[0].ends_with(" etc"), "{listing}");
        assert!(
            lines[2].starts_with("-rw-r--r--") && lines[2].contains(" 4 ") && lines[2].ends_with(" etc/metal/ca.pem"),
            "{listing}"
        );
    }

    #[test]
    fn lab_initrd_is_the_shared_one_plus_an_aligned_ca_archive() {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        std::fs::write(shared.join("vmlinuz"), b"kernel").unwrap();
        std::fs::write(shared.join("initrd.img"), b"zstd-frame").unwrap(); // 10 bytes: needs padding
        let lab = dir.path().join("lab");
        let tls = LabTls::generate(dir.path()).unwrap();
        lab_hammer_dir(&shared, &lab, &tls.ca_pem).unwrap();
        assert_eq!(std::fs::read(lab.join("vmlinuz")).unwrap(), b"kernel");
        let initrd = std::fs::read(lab.join("initrd.img")).unwrap();
        assert!(initrd.starts_with(b"zstd-frame\x00\x00070701"));
        let text = String::from_utf8_lossy(&initrd);
        assert!(text.contains("etc/metal/ca.pem\0") && text.contains(&tls.ca_pem) && text.contains("TRAILER!!!"));
        assert!(metal_client::tls::read_ca_file(&tls.ca_file).is_ok());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&tls.key).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
