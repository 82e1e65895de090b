//! The reqwest client of every metal client: rustls with ring, trusting [`Roots`], with a
//! connect timeout and an optional timeout for whole requests.

use std::time::Duration;

use crate::tls::{self, Roots};

/// Connect timeout unless the caller picks another.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a client is built.
#[derive(Debug, Clone)]
pub struct Options {
    pub roots: Roots,
    pub connect_timeout: Duration,
    /// Whole request, headers to the end of the body. `None`: no limit (per-request timeouts
    /// still apply, e.g. for long-polls).
    pub timeout: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options { roots: Roots::Platform, connect_timeout: DEFAULT_CONNECT_TIMEOUT, timeout: None }
    }
}

impl Options {
    pub fn new(roots: Roots) -> Options {
        Options { roots, ..Options::default() }
    }
    pub fn connect_timeout(mut self, d: Duration) -> Options {
        self.connect_timeout = d;
        self
    }
    pub fn timeout(mut self, d: Duration) -> Options {
        self.timeout = Some(d);
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("certificate {index} of the CA bundle is not usable by the HTTP client")]
    Cert {
        index: usize,
        #[source]
        source: reqwest::Error,
    },
    #[error("building the HTTP client")]
    Build(#[source] reqwest::Error),
}

/// A client builder with the crypto provider installed and trust and timeouts set; add more
/// (user agent, pool sizes) before `build()`.
pub fn builder(opts: &Options) -> Result<reqwest::ClientBuilder, BuildError> {
    tls::install_provider();
    // Idle pooled connections are dropped before the API's idle timeout (60 s by default) closes
    // them, so a request rarely races the server's close.
    let mut b = reqwest::Client::builder().connect_timeout(opts.connect_timeout).pool_idle_timeout(POOL_IDLE_TIMEOUT);
    if let Some(t) = opts.timeout {
        b = b.timeout(t);
    }
    if let Roots::Only(certs) = &opts.roots {
        let certs = certs
            .iter()
            .enumerate()
            .map(|(i, c)| reqwest::Certificate::from_der(c).map_err(|source| BuildError::Cert { index: i + 1, source }))
            .collect::<Result<Vec<_>, _>>()?;
        b = b.tls_certs_only(certs);
    }
    Ok(b)
}

/// [`builder`], built.
pub fn client(opts: &Options) -> Result<reqwest::Client, BuildError> {
    builder(opts)?.build().map_err(BuildError::Build)
}

/// Whether a request failed because the server's certificate was not trusted (or TLS failed
/// otherwise), for error messages that tell the operator to check the CA bundle.
pub fn is_tls_error(e: &reqwest::Error) -> bool {
    fn walk(e: &(dyn std::error::Error + 'static)) -> bool {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        // `io::Error::source` skips the error it wraps; look at that one itself.
        if let Some(inner) = e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            if walk(inner) {
                return true;
            }
        }
        e.source().is_some_and(walk)
    }
    walk(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::TestCa;
    use std::io::{Read, Write};
    use std::sync::Arc;

    /// One HTTPS answer per connection from a rustls server on a plain std socket.
    fn https_server(cert: &crate::ca::ServerCert, connections: usize) -> (u16, std::thread::JoinHandle<()>) {
        use rustls::pki_types::pem::PemObject;
        let chain =
            rustls::pki_types::CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            for _ in 0..connections {
                let (tcp, _) = listener.accept().unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let conn = rustls::ServerConnection::new(config.clone()).unwrap();
                let mut s = rustls::StreamOwned::new(conn, tcp);
                let mut buf = [0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if !got.is_empty() {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
                    s.conn.send_close_notify();
                    let _ = s.flush();
                }
            }
        });
        (port, t)
    }

    #[tokio::test]
    async fn trusts_exactly_the_given_bundle() {
        let ca = TestCa::generate("metal-client test CA").unwrap();
        let other = TestCa::generate("some other CA").unwrap();
        let (port, server) = https_server(&ca.server_cert(&["localhost", "127.0.0.1"]).unwrap(), 3);
        let url = format!("https://127.0.0.1:{port}/healthz");
        let pem = |c: &TestCa| tls::parse_ca_pem("ca.pem".as_ref(), c.cert_pem.as_bytes()).unwrap();

        let good = client(&Options::new(Roots::Only(pem(&ca))).timeout(Duration::from_secs(10))).unwrap();
        let r = good.get(&url).send().await.unwrap();
        assert_eq!(r.text().await.unwrap(), "ok");

        for roots in [Roots::Only(pem(&other)), Roots::Platform] {
            let bad = client(&Options::new(roots.clone()).timeout(Duration::from_secs(10))).unwrap();
            let err = bad.get(&url).send().await.unwrap_err();
            assert!(is_tls_error(&err), "{roots:?}: expected a certificate error, got {err:?}");
        }
        server.join().unwrap();
    }
}
