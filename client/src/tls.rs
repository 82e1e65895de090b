//! TLS trust: the crypto provider, CA bundles and what a client trusts.
//!
//! The whole workspace uses rustls with ring and nothing else (no aws-lc). reqwest is built
//! without a provider, so [`install_provider`] must run before the first client is built;
//! [`crate::http::builder`] does it, and so does the API server.
//!
//! A CA bundle is a PEM file of `-----BEGIN CERTIFICATE-----` blocks (other blocks, such as
//! keys, are skipped). Reading one fails with an error naming the file when it cannot be read,
//! holds no certificate, is not valid PEM, or holds a certificate that cannot be a trust anchor:
//! a client must never fall back to trusting something else because its bundle was broken.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

/// Installs ring as the process's default rustls provider; later calls do nothing. An error
/// from rustls means a provider is installed already, and that one serves as well (there is
/// only ring in this workspace).
pub fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// The ring provider, for configs built with an explicit provider.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read the CA bundle {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA bundle {} holds no certificate (expected PEM `-----BEGIN CERTIFICATE-----` blocks)", path.display())]
    Empty { path: PathBuf },
    #[error("the CA bundle {} is not valid PEM: {detail}", path.display())]
    Pem { path: PathBuf, detail: String },
    #[error("certificate {index} of the CA bundle {} cannot be a trust anchor: {detail}", path.display())]
    Anchor { path: PathBuf, index: usize, detail: String },
}

/// Reads a CA bundle file; see the module documentation for what fails.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let pem = std::fs::read(path).map_err(|source| CaError::Read { path: path.to_path_buf(), source })?;
    parse_ca_pem(path, &pem)
}

/// Parses the PEM text of a CA bundle; `path` names it in errors.
pub fn parse_ca_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CaError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CaError::Pem { path: path.to_path_buf(), detail: e.to_string() })?;
    if certs.is_empty() {
        return Err(CaError::Empty { path: path.to_path_buf() });
    }
    let mut store = rustls::RootCertStore::empty();
    for (i, c) in certs.iter().enumerate() {
        store.add(c.clone()).map_err(|e| CaError::Anchor { path: path.to_path_buf(), index: i + 1, detail: e.to_string() })?;
    }
    Ok(certs)
}

/// A root store of certificates that [`parse_ca_pem`] accepted.
pub fn root_store(certs: &[CertificateDer<'static>]) -> rustls::RootCertStore {
    let mut store = rustls::RootCertStore::empty();
    store.add_parsable_certificates(certs.iter().cloned());
    store
}

/// A rustls client config (ring, TLS 1.2 and 1.3) that trusts exactly `certs`.
pub fn client_config(certs: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(root_store(certs))
        .with_no_client_auth()
}

/// What an HTTPS client trusts.
#[derive(Debug, Clone, Default)]
pub enum Roots {
    /// The operating system's trust store (through rustls-platform-verifier).
    #[default]
    Platform,
    /// Exactly these certificates. An empty list trusts nothing: only `http://` works.
    Only(Vec<CertificateDer<'static>>),
}

impl Roots {
    /// Exactly the bundle at `ca_file` when one is given, else the platform's trust store.
    pub fn from_ca_file(ca_file: Option<&Path>) -> Result<Roots, CaError> {
        match ca_file {
            Some(p) => read_ca_file(p).map(Roots::Only),
            None => Ok(Roots::Platform),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_bundle_of_two_cas_reads_and_keys_in_it_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        std::fs::write(&path, format!("# operator CAs\n{}{key}{}", ca_pem(), ca_pem())).unwrap();
        assert_eq!(read_ca_file(&path).unwrap().len(), 2);
        assert_eq!(root_store(&read_ca_file(&path).unwrap()).len(), 2);
        assert!(matches!(Roots::from_ca_file(Some(&path)).unwrap(), Roots::Only(c) if c.len() == 2));
        assert!(matches!(Roots::from_ca_file(None).unwrap(), Roots::Platform));
    }

    #[test]
    fn broken_bundles_fail_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let err = read_ca_file(&missing).unwrap_err();
        assert!(matches!(err, CaError::Read { .. }) && err.to_string().contains("missing.pem"), "{err}");

        type IsKind = fn(&CaError) -> bool;
        let cases: [(&str, String, IsKind); 4] = [
            ("empty.pem", String::new(), |e| matches!(e, CaError::Empty { .. })),
            ("key-only.pem", rcgen::KeyPair::generate().unwrap().serialize_pem(), |e| matches!(e, CaError::Empty { .. })),
            ("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".into(), |e| {
                matches!(e, CaError::Pem { .. })
            }),
            ("not-x509.pem", "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n".into(), |e| {
                matches!(e, CaError::Anchor { index: 1, .. })
            }),
        ];
        for (name, text, kind) in cases {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            let err = read_ca_file(&p).unwrap_err();
            assert!(kind(&err), "{name}: {err:?}");
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
    }
}
