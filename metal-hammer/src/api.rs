//! The agent side of the API contract (`/v1/agent/*`), over reqwest with rustls.
//!
//! The initramfs has no system certificate store, so the client never asks for one: it trusts
//! exactly the certificates in `/etc/ssl/certs/ca-certificates.crt` when that file exists (none
//! otherwise), and plain `http://` needs nothing. The machine credential from registration is
//! kept in memory only. Events are buffered and sent in order; when the API is away they stay
//! buffered and go out with the next successful send, so none is lost.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use metal_types::{
    EventBatch, EventReport, InstallInstructions, InstallReport, ProvisioningEvent, RegisterRequest, RegisterResponse, WipeReport,
};
use reqwest::StatusCode;

pub const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("building the HTTP client")]
    Build(#[source] reqwest::Error),
    #[error("reading the CA bundle {path}")]
    Certs { path: String, source: reqwest::Error },
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
            ApiError::Status { status, .. } => status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS || *status == StatusCode::REQUEST_TIMEOUT,
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
    /// `ca_bundle`: PEM file of trusted roots, read when it exists.
    pub fn new(base: &str, enrolment_token: &str, ca_bundle: &Path) -> Result<ApiClient, ApiError> {
        crate::tls::init();
        let certs = match std::fs::read(ca_bundle) {
            Ok(pem) => reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| ApiError::Certs { path: ca_bundle.display().to_string(), source })?,
            Err(_) => Vec::new(),
        };
        let http = reqwest::Client::builder()
            .tls_certs_only(certs)
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("metal-hammer/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ApiError::Build)?;
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
        let resp = self.http.post(format!("{}/v1/agent/wipe-report", self.base)).bearer_auth(cred).timeout(Duration::from_secs(15)).json(report).send().await;
        Self::check(ROUTE, resp).await.map(|_| ())
    }

    pub async fn install_report(&self, report: &InstallReport) -> Result<(), ApiError> {
        const ROUTE: &str = "install-report";
        let cred = self.credential(ROUTE)?;
        let resp = self.http.post(format!("{}/v1/agent/install-report", self.base)).bearer_auth(cred).timeout(Duration::from_secs(15)).json(report).send().await;
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
        let c = ApiClient::new("http://127.0.0.1:9/", "tok", Path::new("/nonexistent/ca.crt")).unwrap();
        assert_eq!(c.base, "http://127.0.0.1:9");
        assert!(!c.is_registered());
    }

    #[test]
    fn client_trusts_a_ca_bundle_when_present_and_rejects_a_broken_one() {
        let dir = tempfile::tempdir().unwrap();
        let system = Path::new(CA_BUNDLE);
        if system.exists() {
            ApiClient::new("https://api.example:8443", "tok", system).unwrap();
        }
        let broken = dir.path().join("ca.crt");
        std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n").unwrap();
        assert!(matches!(ApiClient::new("https://x", "tok", &broken), Err(ApiError::Certs { .. })));
    }
}
