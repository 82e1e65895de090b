//! The agent side of the API contract (`/v1/agent/*`), over reqwest with rustls.
//!
//! The initramfs has no system certificate store, so the client never asks for one: it trusts
//! exactly the certificates of [`crate::tls::Trust`] (none when the initramfs has no bundle),
//! and plain `http://` needs nothing. The machine credential from registration is
//! kept in memory only. Events are buffered and sent in order; when the API is away they stay
//! buffered and go out with the next successful send, so none is lost.

use std::sync::Mutex;
use std::time::Duration;

use metal_client::http::Options;
use metal_client::tls::Roots;
use metal_types::{
    EventBatch, EventReport, InstallInstructions, InstallReport, ProvisioningEvent, RegisterRequest, RegisterResponse, WipeReport,
};
use reqwest::StatusCode;

use crate::tls::Trust;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("building the HTTP client")]
    Build(#[source] metal_client::http::BuildError),
    #[error("{route}: request failed")]
    Http { route: &'static str, source: reqwest::Error },
    #[error("{route}: HTTP {status}: {body}")]
    Status { route: &'static str, status: StatusCode, body: String },
    #[error("{0}: not registered yet (no machine credential)")]
    NotRegistered(&'static str),
}

impl ApiError {
    /// Worth retrying: the API is away or overloaded, not refusing us.
    pub fn is_transient(&self) -> bool {
        match self {
            ApiError::Http { .. } => true,
            ApiError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS || *status == StatusCode::REQUEST_TIMEOUT
            }
            _ => false,
        }
    }
}

/// Milliseconds since the Unix epoch, the agent's clock for events.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Exponential back-off: 0.5 s doubling, capped.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(cap: Duration) -> Backoff {
        Backoff { next: Duration::from_millis(500), cap }
    }
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d
    }
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(500);
    }
}

pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    enrolment_token: String,
    credential: Mutex<Option<String>>,
    pending: Mutex<Vec<EventReport>>,
}

impl ApiClient {
    /// An `https://` API must present a certificate that `trust` vouches for.
    pub fn new(base: &str, enrolment_token: &str, trust: &Trust) -> Result<ApiClient, ApiError> {
        let opts = Options::new(Roots::Only(trust.certs.clone())).connect_timeout(Duration::from_secs(5));
        let http = metal_client::http::builder(&opts)
            .map_err(ApiError::Build)?
            .no_proxy()
            .user_agent(concat!("metal-hammer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiError::Build(metal_client::http::BuildError::Build(e)))?;
        Ok(ApiClient {
            http,
            base: base.trim_end_matches('/').to_string(),
            enrolment_token: enrolment_token.to_string(),
            credential: Mutex::new(None),
            pending: Mutex::new(Vec::new()),
        })
    }

    /// The same client (credential, queued events) talking to another address (tests only).
    #[cfg(test)]
    pub(crate) fn with_base(self, base: String) -> ApiClient {
        ApiClient { base, ..self }
    }

    pub fn is_registered(&self) -> bool {
        self.credential.lock().unwrap().is_some()
    }

    fn credential(&self, route: &'static str) -> Result<String, ApiError> {
        self.credential.lock().unwrap().clone().ok_or(ApiError::NotRegistered(route))
    }

    async fn check(route: &'static str, resp: Result<reqwest::Response, reqwest::Error>) -> Result<reqwest::Response, ApiError> {
        let resp = resp.map_err(|source| ApiError::Http { route, source })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        let body = match serde_json::from_str::<metal_types::ApiError>(&body) {
            Ok(e) => format!("{}: {}", e.code, e.message),
            Err(_) => body.chars().take(300).collect(),
        };
        Err(ApiError::Status { route, status, body })
    }

    /// `POST /v1/agent/register` with the enrolment token; keeps the credential.
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse, ApiError> {
        const ROUTE: &str = "register";
        let resp = self
            .http
            .post(format!("{}/v1/agent/register", self.base))
            .bearer_auth(&self.enrolment_token)
            .timeout(Duration::from_secs(20))
            .json(req)
            .send()
            .await;
        let resp = Self::check(ROUTE, resp).await?;
        let reg: RegisterResponse = resp.json().await.map_err(|source| ApiError::Http { route: ROUTE, source })?;
        *self.credential.lock().unwrap() = Some(reg.credential.clone());
        Ok(reg)
    }

    /// Queues an event; it goes out with the next [`ApiClient::flush`].
    pub fn event(&self, event: ProvisioningEvent, message: impl Into<String>) {
        self.pending.lock().unwrap().push(EventReport { event, time_ms: now_ms(), message: message.into() });
    }

    pub fn pending_events(&self) -> usize {
        self.pending.lock().unwrap().len()
    }

    /// Sends every queued event, in order, in one batch. On failure they stay queued.
    pub async fn flush(&self) -> Result<(), ApiError> {
        const ROUTE: &str = "events";
        let batch: Vec<EventReport> = self.pending.lock().unwrap().clone();
        if batch.is_empty() {
            return Ok(());
        }
        let cred = self.credential(ROUTE)?;
        let resp = self
            .http
            .post(format!("{}/v1/agent/events", self.base))
            .bearer_auth(cred)
            .timeout(Duration::from_secs(15))
            .json(&EventBatch { events: batch.clone() })
            .send()
            .await;
        Self::check(ROUTE, resp).await?;
        let mut pending = self.pending.lock().unwrap();
        // Only drop what was sent; events queued meanwhile stay.
        if pending.len() >= batch.len() && pending[..batch.len()] == batch[..] {
            pending.drain(..batch.len());
        }
        Ok(())
    }

    pub async fn wipe_report(&self, report: &WipeReport) -> Result<(), ApiError> {
        const ROUTE: &str = "wipe-report";
        let cred = self.credential(ROUTE)?;
        let resp = self
            .http
            .post(format!("{}/v1/agent/wipe-report", self.base))
            .bearer_auth(cred)
            .timeout(Duration::from_secs(15))
            .json(report)
            .send()
            .await;
        Self::check(ROUTE, resp).await.map(|_| ())
    }

    pub async fn install_report(&self, report: &InstallReport) -> Result<(), ApiError> {
        const ROUTE: &str = "install-report";
        let cred = self.credential(ROUTE)?;
        let resp = self
            .http
            .post(format!("{}/v1/agent/install-report", self.base))
            .bearer_auth(cred)
            .timeout(Duration::from_secs(15))
            .json(report)
            .send()
            .await;
        Self::check(ROUTE, resp).await.map(|_| ())
    }

    /// One long-poll: `Some` on 200, `None` on 204.
    pub async fn wait_once(&self, timeout_s: u64) -> Result<Option<InstallInstructions>, ApiError> {
        const ROUTE: &str = "wait";
        let cred = self.credential(ROUTE)?;
        let resp = self
            .http
            .get(format!("{}/v1/agent/wait", self.base))
            .query(&[("timeout_s", timeout_s)])
            .bearer_auth(cred)
            .timeout(Duration::from_secs(timeout_s + 15))
            .send()
            .await;
        let resp = Self::check(ROUTE, resp).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        resp.json().await.map(Some).map_err(|source| ApiError::Http { route: ROUTE, source })
    }

    /// Retries `op` with back-off while its error is transient, at most until `give_up`.
    pub async fn retry<T, F, Fut>(&self, what: &str, give_up: Duration, cap: Duration, mut op: F) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>>,
    {
        let deadline = tokio::time::Instant::now() + give_up;
        let mut backoff = Backoff::new(cap);
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                    let d = backoff.next_delay();
                    crate::log!("{} (retrying {what} in {} ms)", crate::console::chain(&e), d.as_millis());
                    tokio::time::sleep(d).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Long-polls until the API hands out install instructions. Every poll is a heartbeat;
    /// queued events are flushed before each one. While the API is away this reconnects with
    /// back-off capped at `cap`, forever; it returns an error only when the API refuses us.
    pub async fn wait_for_instructions(&self, timeout_s: u64, cap: Duration) -> Result<InstallInstructions, ApiError> {
        let mut backoff = Backoff::new(cap);
        loop {
            if let Err(e) = self.flush().await {
                if !e.is_transient() {
                    return Err(e);
                }
            }
            match self.wait_once(timeout_s).await {
                Ok(Some(instr)) => return Ok(instr),
                Ok(None) => backoff.reset(),
                Err(e) if e.is_transient() => {
                    let d = backoff.next_delay();
                    crate::log!("{} (reconnecting in {} ms)", crate::console::chain(&e), d.as_millis());
                    tokio::time::sleep(d).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::new(Duration::from_secs(10));
        let ds: Vec<u64> = (0..7).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(ds, vec![500, 1000, 2000, 4000, 8000, 10000, 10000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(500));
    }

    #[test]
    fn client_builds_without_any_certificate_store() {
        let c = ApiClient::new("http://127.0.0.1:9/", "tok", &Trust::default()).unwrap();
        assert_eq!(c.base, "http://127.0.0.1:9");
        assert!(!c.is_registered());
    }

    /// An HTTPS API with a per-test CA: trusted through the bundle files metal-hammer reads,
    /// refused (as a transient connection error, retried) without them.
    #[tokio::test]
    async fn registers_over_https_only_with_the_ca_in_its_trust() {
        use metal_client::ca::TestCa;
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::generate("hammer test CA").unwrap();
        let server = ca.server_cert(&["127.0.0.1"]).unwrap();
        let base = testing_https::serve(
            &server,
            "{\"machine\":\"00000000-0000-4000-8000-000000000001\",\"size\":\"s\",\"credential\":\"mch_x\"}",
        );
        let files = Trust::files_under(dir.path());
        std::fs::create_dir_all(files[1].parent().unwrap()).unwrap();
        std::fs::write(&files[1], &ca.cert_pem).unwrap();
        let req = RegisterRequest { partition: "lab".into(), inventory: Default::default() };

        let trusted = ApiClient::new(&base, "enr", &Trust::load(&files).unwrap()).unwrap();
        let reg = trusted.register(&req).await.unwrap();
        assert_eq!(reg.credential, "mch_x");

        let untrusting = ApiClient::new(&base, "enr", &Trust::default()).unwrap();
        let err = untrusting.register(&req).await.unwrap_err();
        assert!(matches!(&err, ApiError::Http { source, .. } if metal_client::http::is_tls_error(source)), "{err:?}");
    }
}

/// A one-answer HTTPS server on loopback for the tests above (rustls on a std socket).
#[cfg(test)]
mod testing_https {
    use std::io::{Read, Write};
    use std::sync::Arc;

    /// Answers each request with 200 and `body`; returns `https://127.0.0.1:<port>`.
    pub fn serve(cert: &metal_client::ca::ServerCert, body: &'static str) -> String {
        use rustls::pki_types::pem::PemObject;
        let chain =
            rustls::pki_types::CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(metal_client::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let config = Arc::new(config);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { return };
                let _ = tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)));
                let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config.clone()).unwrap(), tcp);
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let complete = |got: &[u8]| {
                    let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else { return false };
                    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    got.len() >= end + 4 + len
                };
                while !complete(&got) {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if complete(&got) {
                    let _ = write!(tls, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
            }
        });
        format!("https://127.0.0.1:{port}")
    }
}
