//! The API client: boot decisions (`POST /v1/boot/decide`) and `PXE Booting` events
//! (`POST /v1/boot/pxe-event`, fire-and-forget through a bounded queue).

use std::sync::Arc;
use std::time::Duration;

use metal_types::{BootDecision, BootRequest, PxeEvent};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API unreachable at {url}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("API did not answer within {0:?}")]
    Timeout(Duration),
    #[error("API answered {status}: {body}")]
    Status { status: u16, body: String },
    #[error("API answer is not a boot decision")]
    Body { source: reqwest::Error },
}

#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    token: String,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(base: &str, token: &str, timeout: Duration) -> ApiClient {
        let http = reqwest::Client::builder()
            .connect_timeout(timeout)
            .pool_max_idle_per_host(64)
            .build()
            .expect("building an HTTP client with static settings");
        ApiClient { http, base: base.trim_end_matches('/').to_string(), token: token.to_string(), timeout }
    }

    async fn post<T: serde::Serialize>(&self, path: &str, body: &T) -> Result<reqwest::Response, ApiError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .timeout(self.timeout)
            .json(body)
            .send()
            .await
            .map_err(|source| if source.is_timeout() { ApiError::Timeout(self.timeout) } else { ApiError::Unreachable { url, source } })?;
        let status = resp.status();
        if !status.is_success() {
            let mut body = resp.text().await.unwrap_or_default();
            body.truncate(200);
            return Err(ApiError::Status { status: status.as_u16(), body });
        }
        Ok(resp)
    }

    pub async fn decide(&self, req: &BootRequest) -> Result<BootDecision, ApiError> {
        let resp = self.post("/v1/boot/decide", req).await?;
        resp.json::<BootDecision>().await.map_err(|source| {
            if source.is_timeout() { ApiError::Timeout(self.timeout) } else { ApiError::Body { source } }
        })
    }

    pub async fn pxe_event(&self, ev: &PxeEvent) -> Result<(), ApiError> {
        self.post("/v1/boot/pxe-event", ev).await.map(|_| ())
    }
}

/// The sending side of the event queue; never blocks (the DHCP path calls it).
#[derive(Clone)]
pub struct EventQueue {
    tx: mpsc::Sender<PxeEvent>,
    metrics: Arc<Metrics>,
}

impl EventQueue {
    /// A queue of `capacity` events drained by a task that posts them to the API.
    pub fn spawn(client: ApiClient, capacity: usize, metrics: Arc<Metrics>) -> EventQueue {
        let (tx, mut rx) = mpsc::channel::<PxeEvent>(capacity);
        let m = metrics.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                match client.pxe_event(&ev).await {
                    Ok(()) => m.inc("pixie_pxe_events_total", &[("result", "sent")]),
                    Err(e) => {
                        m.inc("pixie_pxe_events_total", &[("result", "failed")]);
                        tracing::warn!(mac = %ev.mac, error = %error_chain(&e), "PXE Booting event not delivered");
                    }
                }
            }
        });
        EventQueue { tx, metrics }
    }

    /// A queue that only counts (no API), for tests.
    pub fn detached(metrics: Arc<Metrics>) -> (EventQueue, mpsc::Receiver<PxeEvent>) {
        let (tx, rx) = mpsc::channel(64);
        (EventQueue { tx, metrics }, rx)
    }

    pub fn send(&self, ev: PxeEvent) {
        if let Err(e) = self.tx.try_send(ev) {
            self.metrics.inc("pixie_pxe_events_total", &[("result", "dropped")]);
            tracing::warn!(reason = %e, "PXE Booting event dropped: queue full or closed");
        }
    }
}

/// `error: cause: cause` on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
