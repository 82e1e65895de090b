//! TLS: the crypto provider and what metal-hammer trusts.
//!
//! reqwest is built without a provider (ring is the workspace's only one, `metal_client::tls`);
//! [`init`] installs it and must run before any HTTP client is built (`main` calls it first
//! thing, the clients call it again).
//!
//! metal-hammer trusts the certificates of [`TRUSTED_FILES`] that exist in its initramfs: the
//! system bundle (image-builder copies the build host's and appends every `--ca FILE`) and
//! `/etc/metal/ca.pem` (extra CAs, e.g. a small cpio appended to the initrd as the lab does for
//! its per-lab CA). With neither file nothing is trusted and only `http://` works. A file that
//! exists but is broken is an error, never a reason to trust less or more.
//!
//! What it trusts is written into the installed OS as [`INSTALLED_CA`], which phone-home
//! verifies the API against.

use std::path::{Path, PathBuf};

use metal_client::tls::CaError;
use rustls::pki_types::CertificateDer;

/// The initramfs's system bundle.
pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Extra CAs next to it (an appended cpio can add this file without replacing the bundle).
pub const EXTRA_CA: &str = "/etc/metal/ca.pem";
/// Read in this order; each one only when it exists.
pub const TRUSTED_FILES: [&str; 2] = [CA_BUNDLE, EXTRA_CA];
/// In the installed OS (relative to its root): every certificate metal-hammer trusted.
pub const INSTALLED_CA: &str = "etc/metal/ca.pem";

/// Installs ring as the process's crypto provider; later calls do nothing.
pub fn init() {
    metal_client::tls::install_provider();
}

/// The certificates metal-hammer trusts and their PEM text.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    pub certs: Vec<CertificateDer<'static>>,
    /// The files' PEM text, concatenated (for [`INSTALLED_CA`]).
    pub pem: Vec<u8>,
}

impl Trust {
    /// Reads every file of `files` that exists.
    pub fn load(files: &[PathBuf]) -> Result<Trust, CaError> {
        let mut trust = Trust::default();
        for f in files {
            let pem = match std::fs::read(f) {
                Ok(p) => p,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(CaError::Read { path: f.clone(), source }),
            };
            trust.certs.extend(metal_client::tls::parse_ca_pem(f, &pem)?);
            trust.pem.extend_from_slice(&pem);
            if !trust.pem.ends_with(b"\n") {
                trust.pem.push(b'\n');
            }
        }
        Ok(trust)
    }

    /// [`TRUSTED_FILES`] under `root` (`/` in production).
    pub fn files_under(root: &Path) -> Vec<PathBuf> {
        TRUSTED_FILES.iter().map(|f| root.join(f.trim_start_matches('/'))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_files_are_skipped_and_present_ones_concatenated() {
        let dir = tempfile::tempdir().unwrap();
        let files = Trust::files_under(dir.path());
        let none = Trust::load(&files).unwrap();
        assert!(none.certs.is_empty() && none.pem.is_empty());
        let system = Path::new(CA_BUNDLE);
        if !metal_testkit::require(system.exists(), "the system CA bundle (Debian's ca-certificates)") {
            return;
        }
        // The build host's bundle as the initramfs's, plus the same file again as the extra CA.
        std::fs::create_dir_all(files[0].parent().unwrap()).unwrap();
        std::fs::create_dir_all(files[1].parent().unwrap()).unwrap();
        std::fs::copy(system, &files[0]).unwrap();
        let one = Trust::load(&files).unwrap();
        assert!(!one.certs.is_empty());
        std::fs::copy(system, &files[1]).unwrap();
        let two = Trust::load(&files).unwrap();
        assert_eq!(two.certs.len(), 2 * one.certs.len());
        assert!(two.pem.len() >= 2 * std::fs::metadata(system).unwrap().len() as usize);
    }

    #[test]
    fn a_broken_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let files = Trust::files_under(dir.path());
        std::fs::create_dir_all(files[1].parent().unwrap()).unwrap();
        std::fs::write(&files[1], "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").unwrap();
        let err = Trust::load(&files).unwrap_err();
        assert!(err.to_string().contains("etc/metal/ca.pem"), "{err}");
    }
}
