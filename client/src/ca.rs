//! A throwaway certificate authority for the lab and for tests (feature `ca`): one CA per lab
//! or test, and server certificates it signs for given names and IP addresses. Keys are ECDSA
//! P-256 made by ring; nothing here is meant for production CAs (see docs/security.md for where
//! the CA comes from there).

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum CaGenError {
    #[error("generating a certificate")]
    Generate(#[from] rcgen::Error),
    #[error("writing {}", path.display())]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A CA: its certificate (PEM) and what signs with it.
pub struct TestCa {
    pub cert_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A server certificate and its private key, both PEM.
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    /// A new CA named `common_name`.
    pub fn generate(common_name: &str) -> Result<TestCa, CaGenError> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key)?;
        Ok(TestCa { cert_pem: cert.pem(), issuer: rcgen::Issuer::new(params, key) })
    }

    /// A server certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn server_cert(&self, names: &[&str]) -> Result<ServerCert, CaGenError> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        params.distinguished_name.push(rcgen::DnType::CommonName, names.first().copied().unwrap_or("server"));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Writes `ca.pem`, `<stem>.pem` and `<stem>.key` (0600) into `dir`, for a server
    /// certificate for `names`. Returns that certificate.
    pub fn write_server_files(&self, dir: &Path, stem: &str, names: &[&str]) -> Result<ServerCert, CaGenError> {
        use std::os::unix::fs::OpenOptionsExt;
        let server = self.server_cert(names)?;
        let write = |name: String, text: &str, mode: u32| {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)
                .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
                .map_err(|source| CaGenError::Write { path, source })
        };
        write("ca.pem".into(), &self.cert_pem, 0o644)?;
        write(format!("{stem}.pem"), &server.cert_pem, 0o644)?;
        write(format!("{stem}.key"), &server.key_pem, 0o600)?;
        Ok(server)
    }
}
