//! The API client: boot decisions (`POST /v1/boot/decide`, with a short per-machine cache and
//! one call for concurrent identical requests: [`DecisionCache`]) and `PXE Booting` events
//! (`POST /v1/boot/pxe-event`, fire-and-forget through a bounded queue).
//!
//! The decision is behind a seam, [`BootDecider`]: the API-backed [`ApiClient`] in production,
//! [`StaticDecider`] (answers from a table, requests recorded) in tests, so `/ipxe` is tested
//! for every decision and architecture without a fake HTTP server.
//!
//! One [`reqwest::Client`] is shared by every clone of [`ApiClient`], so calls reuse the pooled
//! keep-alive connections to the API instead of connecting per request.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metal_client::http::BuildError;
use metal_client::tls::Roots;
use metal_types::{Arch, BootDecision, BootRequest, MachineId, PxeEvent};
use tokio::sync::{mpsc, OnceCell};

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
    /// A client trusting the system's trust store for an `https://` API.
    pub fn new(base: &str, token: &str, timeout: Duration) -> ApiClient {
        ApiClient::with_roots(base, token, timeout, &Roots::Platform).expect("building an HTTP client with static settings")
    }

    /// A client trusting `roots` (`api.ca_file`) for an `https://` API.
    pub fn with_roots(base: &str, token: &str, timeout: Duration, roots: &Roots) -> Result<ApiClient, BuildError> {
        let opts = metal_client::http::Options::new(roots.clone()).connect_timeout(timeout);
        let http = metal_client::http::builder(&opts)?.pool_max_idle_per_host(64).build().map_err(BuildError::Build)?;
        Ok(ApiClient { http, base: base.trim_end_matches('/').to_string(), token: token.to_string(), timeout })
    }

    async fn post<T: serde::Serialize>(&self, path: &str, body: &T) -> Result<reqwest::Response, ApiError> {
        let url = format!("{}{path}", self.base);
        let resp =
            self.http.post(&url).bearer_auth(&self.token).timeout(self.timeout).json(body).send().await.map_err(|source| {
                if source.is_timeout() {
                    ApiError::Timeout(self.timeout)
                } else {
                    ApiError::Unreachable { url, source }
                }
            })?;
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
            if source.is_timeout() {
                ApiError::Timeout(self.timeout)
            } else {
                ApiError::Body { source }
            }
        })
    }

    pub async fn pxe_event(&self, ev: &PxeEvent) -> Result<(), ApiError> {
        self.post("/v1/boot/pxe-event", ev).await.map(|_| ())
    }
}

/// A boxed future of a decision (object-safe trait methods).
pub type Decision<'a> = Pin<Box<dyn Future<Output = Result<BootDecision, ApiError>> + Send + 'a>>;

/// Who decides what a machine that PXE boots gets.
pub trait BootDecider: Send + Sync + 'static {
    fn decide<'a>(&'a self, req: &'a BootRequest) -> Decision<'a>;
}

impl BootDecider for ApiClient {
    fn decide<'a>(&'a self, req: &'a BootRequest) -> Decision<'a> {
        Box::pin(ApiClient::decide(self, req))
    }
}

/// Decisions from a table: the answer for the request's MAC, else the default; an `Err` answer
/// comes back as the API answering 503 with that text. Every request is recorded.
#[derive(Default)]
pub struct StaticDecider {
    by_mac: HashMap<String, Result<BootDecision, String>>,
    default: Option<Result<BootDecision, String>>,
    seen: Mutex<Vec<BootRequest>>,
}

impl StaticDecider {
    /// Answers every request with `answer`.
    pub fn always(answer: Result<BootDecision, String>) -> StaticDecider {
        StaticDecider { default: Some(answer), ..Default::default() }
    }

    /// Answers requests from `mac` (as `BootRequest::mac` holds it) with `answer`.
    pub fn with(mut self, mac: &str, answer: Result<BootDecision, String>) -> StaticDecider {
        self.by_mac.insert(mac.to_string(), answer);
        self
    }

    /// The requests asked so far.
    pub fn seen(&self) -> Vec<BootRequest> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BootDecider for StaticDecider {
    fn decide<'a>(&'a self, req: &'a BootRequest) -> Decision<'a> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).push(req.clone());
        let answer = self.by_mac.get(&req.mac).or(self.default.as_ref()).cloned();
        Box::pin(async move {
            match answer {
                Some(Ok(d)) => Ok(d),
                Some(Err(body)) => Err(ApiError::Status { status: 503, body }),
                None => Err(ApiError::Status { status: 404, body: format!("no decision for {}", req.mac) }),
            }
        })
    }
}

/// What identifies one machine's question: the answer is reused only for the same triple.
pub type DecisionKey = (String, Option<MachineId>, Arch);

/// The answer of one API call, shared by every request that waited for it.
pub type SharedDecision = Result<BootDecision, Arc<ApiError>>;

/// One API call for a key and, once it has answered, when it was made (the API read its state
/// after that, so the answer is never older than the age measured from there).
type Flight = Arc<OnceCell<(Instant, SharedDecision)>>;

/// Boot decisions reused for `ttl` per (MAC, UUID, arch), with single flight: requests that
/// arrive while the API is being asked for the same key wait for that call instead of making
/// their own. Failures are handed to the requests that waited for them but never kept: the next
/// request asks the API again. A `ttl` of zero turns both off. Why a short `ttl` cannot boot a
/// machine into a decision made before its last reboot: docs/pixie.md, "Decision cache".
pub struct DecisionCache {
    api: Arc<dyn BootDecider>,
    ttl: Duration,
    flights: Mutex<HashMap<DecisionKey, Flight>>,
}

/// Where an answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// This request asked the API.
    Api,
    /// Another request's call, answered within `ttl` or still running when this one came.
    Shared,
}

/// Above this many keys, answered and expired entries are dropped when a new key comes.
const PRUNE_ABOVE: usize = 4096;

impl DecisionCache {
    pub fn new(api: impl BootDecider, ttl: Duration) -> DecisionCache {
        DecisionCache::shared(Arc::new(api), ttl)
    }

    /// A cache in front of a decider the caller keeps a handle of (a test's [`StaticDecider`]).
    pub fn shared(api: Arc<dyn BootDecider>, ttl: Duration) -> DecisionCache {
        DecisionCache { api, ttl, flights: Mutex::new(HashMap::new()) }
    }

    fn usable(&self, flight: &Flight) -> bool {
        match flight.get() {
            None => true,
            Some((at, Ok(_))) => at.elapsed() < self.ttl,
            Some((_, Err(_))) => false,
        }
    }

    /// The decision for `req`, from the API or from a call made for the same key within `ttl`.
    pub async fn decide(&self, req: &BootRequest) -> (SharedDecision, Source) {
        if self.ttl.is_zero() {
            return (self.api.decide(req).await.map_err(Arc::new), Source::Api);
        }
        let key: DecisionKey = (req.mac.clone(), req.uuid, req.arch);
        let flight = {
            let mut flights = self.flights.lock().unwrap_or_else(|e| e.into_inner());
            match flights.get(&key) {
                Some(f) if self.usable(f) => f.clone(),
                _ => {
                    if flights.len() >= PRUNE_ABOVE {
                        flights.retain(|_, f| self.usable(f));
                    }
                    let f = Flight::default();
                    flights.insert(key, f.clone());
                    f
                }
            }
        };
        // The first caller runs the call; if its request is dropped mid-call (client gone), a
        // waiting one takes over, so nobody waits for a call that no longer runs.
        let mut asked = false;
        let (_, answer) = flight
            .get_or_init(|| async {
                asked = true;
                let started = Instant::now();
                (started, self.api.decide(req).await.map_err(Arc::new))
            })
            .await;
        (answer.clone(), if asked { Source::Api } else { Source::Shared })
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
                    Ok(()) => m.pxe_events.inc(["sent"]),
                    Err(e) => {
                        m.pxe_events.inc(["failed"]);
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
            self.metrics.pxe_events.inc(["dropped"]);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A stand-in API on loopback: counts decide calls and TCP connections, answers after
    /// `delay`, with `500` while `fail` is set.
    struct FakeApi {
        url: String,
        calls: Arc<AtomicUsize>,
        connections: Arc<AtomicUsize>,
        fail: Arc<AtomicBool>,
    }

    async fn fake_api(delay: Duration) -> FakeApi {
        let calls = Arc::new(AtomicUsize::new(0));
        let fail = Arc::new(AtomicBool::new(false));
        let (c, f) = (calls.clone(), fail.clone());
        let app = axum::Router::new().route(
            "/v1/boot/decide",
            axum::routing::post(move |axum::Json(req): axum::Json<BootRequest>| {
                let (c, f) = (c.clone(), f.clone());
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    if f.load(Ordering::SeqCst) {
                        return Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
                    }
                    let cmdline = format!("metal.mac={}", req.mac);
                    Ok(axum::Json(BootDecision::Hammer { kernel_url: "http://k".into(), initrd_url: "http://i".into(), cmdline }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let conns = connections.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                conns.fetch_add(1, Ordering::SeqCst);
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(s), svc));
            }
        });
        FakeApi { url, calls, connections, fail }
    }

    fn req(mac: &str) -> BootRequest {
        BootRequest { partition: "lab".into(), mac: mac.into(), uuid: None, arch: Arch::BiosX86 }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_identical_requests_make_one_call_and_the_answer_expires() {
        let api = fake_api(Duration::from_millis(200)).await;
        let cache =
            Arc::new(DecisionCache::new(ApiClient::new(&api.url, "t", Duration::from_secs(5)), Duration::from_millis(1000)));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let c = cache.clone();
                tokio::spawn(async move { c.decide(&req("52:54:00:00:00:01")).await })
            })
            .collect();
        let mut from_api = 0;
        for t in tasks {
            let (answer, source) = t.await.unwrap();
            assert!(matches!(answer.unwrap(), BootDecision::Hammer { cmdline, .. } if cmdline == "metal.mac=52:54:00:00:00:01"));
            from_api += usize::from(source == Source::Api);
        }
        assert_eq!(api.calls.load(Ordering::SeqCst), 1, "one API call for 16 identical requests");
        assert_eq!(from_api, 1);
        assert_eq!(cache.decide(&req("52:54:00:00:00:01")).await.1, Source::Shared, "within the TTL");
        let (other, _) = cache.decide(&req("52:54:00:00:00:02")).await;
        assert!(matches!(other.unwrap(), BootDecision::Hammer { cmdline, .. } if cmdline == "metal.mac=52:54:00:00:00:02"));
        assert_eq!(api.calls.load(Ordering::SeqCst), 2, "another MAC is another question");
        let mut uefi = req("52:54:00:00:00:01");
        uefi.arch = Arch::UefiX64;
        cache.decide(&uefi).await.0.unwrap();
        assert_eq!(api.calls.load(Ordering::SeqCst), 3, "another arch is another question");
        tokio::time::sleep(Duration::from_millis(1000)).await;
        assert_eq!(cache.decide(&req("52:54:00:00:00:01")).await.1, Source::Api, "expired after the TTL");
        assert_eq!(api.calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failures_are_shared_by_waiters_but_never_kept() {
        let api = fake_api(Duration::from_millis(100)).await;
        api.fail.store(true, Ordering::SeqCst);
        let cache = Arc::new(DecisionCache::new(ApiClient::new(&api.url, "t", Duration::from_secs(5)), Duration::from_secs(2)));
        let r = req("52:54:00:00:00:01");
        let (a, b) = tokio::join!(cache.decide(&r), cache.decide(&r));
        assert!(matches!(&*a.0.unwrap_err(), ApiError::Status { status: 500, .. }));
        assert!(b.0.is_err());
        assert_eq!(api.calls.load(Ordering::SeqCst), 1);
        api.fail.store(false, Ordering::SeqCst);
        let (answer, source) = cache.decide(&req("52:54:00:00:00:01")).await;
        assert!(answer.is_ok() && source == Source::Api, "the failure was not cached");
        assert_eq!(api.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_first_caller_hands_the_call_to_a_waiter() {
        let api = fake_api(Duration::from_millis(300)).await;
        let cache = Arc::new(DecisionCache::new(ApiClient::new(&api.url, "t", Duration::from_secs(5)), Duration::from_secs(2)));
        let c = cache.clone();
        let first = tokio::spawn(async move { c.decide(&req("52:54:00:00:00:01")).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let c = cache.clone();
        let second = tokio::spawn(async move { c.decide(&req("52:54:00:00:00:01")).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        first.abort();
        let (answer, source) =
            tokio::time::timeout(Duration::from_secs(3), second).await.expect("the waiter is not stuck").unwrap();
        assert!(answer.is_ok());
        assert_eq!(source, Source::Api, "the waiter made the call itself");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ttl_zero_asks_every_time_over_one_kept_alive_connection() {
        let api = fake_api(Duration::ZERO).await;
        let cache = DecisionCache::new(ApiClient::new(&api.url, "t", Duration::from_secs(5)), Duration::ZERO);
        for _ in 0..50 {
            assert_eq!(cache.decide(&req("52:54:00:00:00:01")).await.1, Source::Api);
        }
        assert_eq!(api.calls.load(Ordering::SeqCst), 50);
        // A connection goes back to the pool just after its response is read, so now and then a
        // call opens a second one; without reuse this would be 50.
        let conns = api.connections.load(Ordering::SeqCst);
        assert!(conns <= 3, "50 sequential calls took {conns} connections");
    }
}
