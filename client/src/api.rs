//! The typed client of the metal API (feature `api`): one function per route, every body a
//! `metal-types` value, errors decoded into the API's own [`ApiError`] and sorted by what can be
//! done about them ([`ClientError::is_retryable`], [`backoff`]). metalctl, the lab, image-builder's
//! `publish`, the API's tests and the scale simulator use it; `api/tests/openapi.rs` checks that
//! every route it calls is in the API's OpenAPI document.

use std::time::Duration;

use metal_types::{
    Allocation, AllocationRequest, ApiError, BootDecision, BootRequest, CatalogObject, EventBatch, InstallInstructions,
    InstallReport, Machine, MachineEvent, MachineId, PhoneHome, PxeEvent, RegisterRequest, RegisterResponse, TokenInfo,
    TokenRequest, TokenResponse, WipeReport,
};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;

/// Everything that can go wrong talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error body (`ApiError`).
    #[error("{} ({}, HTTP {})", .error.message, .error.code, .status.as_u16())]
    Api { status: StatusCode, error: ApiError },
    /// The API answered with an error status but not with an `ApiError` body (a proxy, or
    /// something that is not the metal API at that URL).
    #[error("HTTP {} from {request}: {body}", .status.as_u16())]
    Http { request: String, status: StatusCode, body: String },
    /// The request never got an answer: connection refused, timeout, reset.
    #[error("cannot reach the API: {request}")]
    Transport {
        request: String,
        #[source]
        source: reqwest::Error,
    },
    /// TLS to an `https://` API failed, typically a certificate the trusted CAs do not vouch for.
    #[error("TLS to the API failed: {request} (is the API's CA among the trusted ones?)")]
    Tls {
        request: String,
        #[source]
        source: reqwest::Error,
    },
    /// The CA bundle cannot be used.
    #[error("cannot use the CA bundle")]
    Ca(#[source] crate::tls::CaError),
    #[error("building the HTTP client")]
    Build(#[source] crate::http::BuildError),
    /// A 2xx answer whose body is not what this route returns.
    #[error("unexpected answer to {request}")]
    Decode {
        request: String,
        #[source]
        source: serde_json::Error,
    },
    /// The request body could not be turned into JSON.
    #[error("cannot encode the body of {request}")]
    Encode {
        request: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("API URL {url:?} is not a usable http(s) URL")]
    BadUrl { url: String },
}

impl ClientError {
    /// True when the request may not have reached the API (safe to retry only when the
    /// request is idempotent or carries an idempotency key).
    pub fn is_transport(&self) -> bool {
        matches!(self, ClientError::Transport { .. })
    }

    /// The API's error code (`no_machine_available`, `not_found`, …) when it answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { error, .. } => Some(&error.code),
            _ => None,
        }
    }

    /// The HTTP status when the API (or something in front of it) answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } | ClientError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether trying again later can help: the API was not reached, or it answered 5xx, 429
    /// or 503. A 4xx says the request itself is wrong (or refused) and will be again.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            _ => self.status().is_some_and(|s| s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS),
        }
    }
}

/// Exponential back-off with full jitter: the pause before attempt `attempt` (1-based) is a
/// random time up to `base * 2^(attempt-1)`, capped at `max`.
pub fn backoff(attempt: u32, base: Duration, max: Duration) -> Duration {
    let ceiling = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16)).min(max);
    let nanos = ceiling.as_nanos().min(u128::from(u64::MAX)) as u64;
    if nanos == 0 {
        return Duration::ZERO;
    }
    // Jitter from the clock's low bits: good enough to spread agents, no RNG dependency.
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let mixed = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ u64::from(attempt);
    Duration::from_nanos(mixed % nanos + 1)
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// The outcome of `POST /v1/allocations`.
#[derive(Debug, Clone)]
pub struct Allocated {
    pub allocation: Allocation,
    /// `false` when the API answered 200: an earlier request with the same idempotency key
    /// already made this allocation.
    pub created: bool,
}

#[derive(Debug, Clone)]
pub struct Client {
    base: Url,
    token: Option<String>,
    http: reqwest::Client,
}

/// Requests other than long-polls end after this long.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

impl Client {
    /// `api_url` is the API's base URL (`http://10.99.0.1:8080`); routes are appended to it.
    /// An `https://` API's certificate must chain to the CA bundle `ca_file` when given, else
    /// to the system's trust store.
    pub fn new(api_url: &str, token: Option<String>, ca_file: Option<&std::path::Path>) -> Result<Client> {
        Self::new_as(concat!("metal-client/", env!("CARGO_PKG_VERSION")), api_url, token, ca_file)
    }

    /// [`Client::new`] with the program's own user agent (`metalctl/0.1.0`).
    pub fn new_as(user_agent: &str, api_url: &str, token: Option<String>, ca_file: Option<&std::path::Path>) -> Result<Client> {
        let roots = crate::tls::Roots::from_ca_file(ca_file).map_err(ClientError::Ca)?;
        let opts = crate::http::Options::new(roots).connect_timeout(Duration::from_secs(10));
        let http = crate::http::builder(&opts)
            .map_err(ClientError::Build)?
            .user_agent(user_agent)
            .build()
            .map_err(|e| ClientError::Build(crate::http::BuildError::Build(e)))?;
        Self::with_http(api_url, token, http)
    }

    /// A client on an HTTP client the caller built (its own trust, pool sizes, timeouts).
    pub fn with_http(api_url: &str, token: Option<String>, http: reqwest::Client) -> Result<Client> {
        let bad = || ClientError::BadUrl { url: api_url.to_string() };
        let base = Url::parse(api_url).map_err(|_| bad())?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(bad());
        }
        Ok(Client { base, token: token.filter(|t| !t.is_empty()), http })
    }

    /// The same API and connection pool with another token (an agent after registering).
    pub fn with_token(&self, token: impl Into<String>) -> Client {
        Client { base: self.base.clone(), token: Some(token.into()).filter(|t| !t.is_empty()), http: self.http.clone() }
    }

    /// The API's base URL.
    pub fn base(&self) -> &Url {
        &self.base
    }

    /// The URL of a route: the base URL's path plus the given segments, each escaped.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        {
            // `cannot_be_a_base` was ruled out in `new`.
            let mut path = url.path_segments_mut().expect("base URL checked in Client::new");
            path.pop_if_empty();
            path.extend(segments);
        }
        url
    }

    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&(dyn erased::Body + Sync)>,
    ) -> Result<(StatusCode, Vec<u8>)> {
        self.send_with(method, segments, &[], body, REQUEST_TIMEOUT).await
    }

    async fn send_with(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&(dyn erased::Body + Sync)>,
        timeout: Duration,
    ) -> Result<(StatusCode, Vec<u8>)> {
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query.iter().map(|(k, v)| (*k, v.as_str())));
        }
        let request = format!("{method} {url}");
        let mut req = self.http.request(method, url).timeout(timeout);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            let json = body.to_json().map_err(|source| ClientError::Encode { request: request.clone(), source })?;
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(json);
        }
        let transport = |source: reqwest::Error| {
            if crate::http::is_tls_error(&source) {
                ClientError::Tls { request: request.clone(), source }
            } else {
                ClientError::Transport { request: request.clone(), source }
            }
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(transport)?;
        if status.is_success() {
            return Ok((status, bytes.to_vec()));
        }
        Err(match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(error) => ClientError::Api { status, error },
            Err(_) => {
                ClientError::Http { request, status, body: String::from_utf8_lossy(&bytes).trim().chars().take(500).collect() }
            }
        })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&(dyn erased::Body + Sync)>,
    ) -> Result<(StatusCode, T)> {
        let request = format!("{method} {}", self.url(segments));
        let (status, bytes) = self.send(method, segments, body).await?;
        let value = serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode { request, source })?;
        Ok((status, value))
    }

    async fn get<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T> {
        Ok(self.call(Method::GET, segments, None).await?.1)
    }

    /// A request whose success is an empty answer (204).
    async fn post_empty(&self, segments: &[&str], body: &(dyn erased::Body + Sync)) -> Result<()> {
        self.send(Method::POST, segments, Some(body)).await.map(|_| ())
    }

    // ------------------------------------------------------------------------------------
    // Routes
    // ------------------------------------------------------------------------------------

    /// `GET /healthz`: the body as text.
    pub async fn health(&self) -> Result<String> {
        let (_, bytes) = self.send(Method::GET, &["healthz"], None).await?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_string())
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> Result<String> {
        let (_, bytes) = self.send(Method::GET, &["metrics"], None).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// `POST /v1/<kind>`: the object as the API stored it, and whether it is new (201) or
    /// an identical one existed already (200). Different content under the same id is a 409.
    pub async fn create<K: CatalogObject>(&self, object: &K) -> Result<(K, bool)> {
        let (status, stored) = self.call(Method::POST, &["v1", K::PLURAL], Some(object)).await?;
        Ok((stored, status == StatusCode::CREATED))
    }

    /// `GET /v1/<kind>`.
    pub async fn list<K: CatalogObject>(&self) -> Result<Vec<K>> {
        self.get(&["v1", K::PLURAL]).await
    }

    /// `GET /v1/<kind>/{id}` (for images also a bare name: the newest image of that name).
    pub async fn describe<K: CatalogObject>(&self, id: &str) -> Result<K> {
        self.get(&["v1", K::PLURAL, id]).await
    }

    /// `DELETE /v1/<kind>/{id}`.
    pub async fn delete<K: CatalogObject>(&self, id: &str) -> Result<()> {
        self.send(Method::DELETE, &["v1", K::PLURAL, id], None).await.map(|_| ())
    }

    /// `POST /v1/tokens` (admin).
    pub async fn create_token(&self, req: &TokenRequest) -> Result<TokenResponse> {
        Ok(self.call(Method::POST, &["v1", "tokens"], Some(req)).await?.1)
    }

    /// `GET /v1/tokens` (admin): admin, tenant and pixie tokens, never the tokens themselves.
    pub async fn tokens(&self) -> Result<Vec<TokenInfo>> {
        self.get(&["v1", "tokens"]).await
    }

    /// `DELETE /v1/tokens/{id}` (admin): the token stops working (within the API's cache TTL
    /// on other replicas).
    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        self.send(Method::DELETE, &["v1", "tokens", id], None).await.map(|_| ())
    }

    /// `GET /v1/machines`.
    pub async fn machines(&self) -> Result<Vec<Machine>> {
        self.get(&["v1", "machines"]).await
    }

    /// `GET /v1/machines/{id}`.
    pub async fn machine(&self, id: MachineId) -> Result<Machine> {
        self.get(&["v1", "machines", &id.to_string()]).await
    }

    /// `GET /v1/machines/{id}/events`: the machine's timeline, oldest first.
    pub async fn machine_events(&self, id: MachineId) -> Result<Vec<MachineEvent>> {
        self.get(&["v1", "machines", &id.to_string(), "events"]).await
    }

    /// `DELETE /v1/machines/{id}/allocation`: free the machine; it goes to `Machine Reclaim`.
    pub async fn free_machine(&self, id: MachineId) -> Result<Machine> {
        Ok(self.call(Method::DELETE, &["v1", "machines", &id.to_string(), "allocation"], None).await?.1)
    }

    /// `POST /v1/allocations`. 409 `no_machine_available` when no machine fits.
    pub async fn allocate(&self, req: &AllocationRequest) -> Result<Allocated> {
        let (status, allocation) = self.call(Method::POST, &["v1", "allocations"], Some(req)).await?;
        Ok(Allocated { allocation, created: status == StatusCode::CREATED })
    }

    /// [`Client::allocate`], retried up to `attempts` times in all when the request may not
    /// have reached the API. Safe only because the request carries an idempotency key (a
    /// retry of a request the API did process returns that first allocation); refused without.
    /// `on_retry` hears about each failed attempt before the pause.
    pub async fn allocate_retrying(
        &self,
        req: &AllocationRequest,
        attempts: u32,
        pause: Duration,
        on_retry: &mut dyn FnMut(&ClientError),
    ) -> Result<Allocated> {
        let mut attempt = 1;
        loop {
            match self.allocate(req).await {
                Err(e) if e.is_transport() && attempt < attempts && req.idempotency_key.is_some() => {
                    on_retry(&e);
                    tokio::time::sleep(pause * attempt).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// `GET /v1/allocations` (a tenant sees only its project's).
    pub async fn allocations(&self) -> Result<Vec<Allocation>> {
        self.get(&["v1", "allocations"]).await
    }

    // Boot routes (pixie's token).

    /// `POST /v1/boot/decide`: what a machine that PXE boots gets.
    pub async fn boot_decide(&self, req: &BootRequest) -> Result<BootDecision> {
        Ok(self.call(Method::POST, &["v1", "boot", "decide"], Some(req)).await?.1)
    }

    /// `POST /v1/boot/pxe-event`: pixie saw a PXE request.
    pub async fn pxe_event(&self, ev: &PxeEvent) -> Result<()> {
        self.post_empty(&["v1", "boot", "pxe-event"], ev).await
    }

    // Agent routes (the enrolment token to register, then the machine's credential).

    /// `POST /v1/agent/register` with the enrolment token from the kernel command line.
    pub async fn register(&self, req: &RegisterRequest) -> Result<RegisterResponse> {
        Ok(self.call(Method::POST, &["v1", "agent", "register"], Some(req)).await?.1)
    }

    /// `POST /v1/agent/events`.
    pub async fn events(&self, batch: &EventBatch) -> Result<()> {
        self.post_empty(&["v1", "agent", "events"], batch).await
    }

    /// `POST /v1/agent/wipe-report`.
    pub async fn wipe_report(&self, report: &WipeReport) -> Result<()> {
        self.post_empty(&["v1", "agent", "wipe-report"], report).await
    }

    /// `GET /v1/agent/wait`: one long-poll of up to `timeout_s` seconds; `None` when it ended
    /// without instructions (204).
    pub async fn wait(&self, timeout_s: u64) -> Result<Option<InstallInstructions>> {
        let request = format!("GET {}", self.url(&["v1", "agent", "wait"]));
        let timeout = Duration::from_secs(timeout_s) + Duration::from_secs(15);
        let (status, bytes) =
            self.send_with(Method::GET, &["v1", "agent", "wait"], &[("timeout_s", timeout_s.to_string())], None, timeout).await?;
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        serde_json::from_slice(&bytes).map(Some).map_err(|source| ClientError::Decode { request, source })
    }

    /// `POST /v1/agent/install-report`.
    pub async fn install_report(&self, report: &InstallReport) -> Result<()> {
        self.post_empty(&["v1", "agent", "install-report"], report).await
    }

    /// `POST /v1/agent/phone-home` with the allocation's phone-home token.
    pub async fn phone_home(&self, body: &PhoneHome) -> Result<()> {
        self.post_empty(&["v1", "agent", "phone-home"], body).await
    }
}

/// Object-safe serialization, so `send` takes any body without being generic over it.
mod erased {
    pub trait Body {
        fn to_json(&self) -> serde_json::Result<Vec<u8>>;
    }

    impl<T: serde::Serialize> Body for T {
        fn to_json(&self) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metal_types::{Project, Size};

    #[test]
    fn urls_keep_the_base_path_and_escape_segments() {
        let c = Client::new("http://10.99.0.1:8080", None, None).unwrap();
        assert_eq!(c.url(&["v1", "partitions"]).as_str(), "http://10.99.0.1:8080/v1/partitions");
        let c = Client::new("http://example.test/api/", None, None).unwrap();
        assert_eq!(c.url(&["v1", "images", "a/b c"]).as_str(), "http://example.test/api/v1/images/a%2Fb%20c");
    }

    #[test]
    fn bad_urls_are_refused() {
        assert!(matches!(Client::new("10.99.0.1:8080", None, None), Err(ClientError::BadUrl { .. })));
        assert!(matches!(Client::new("ftp://x", None, None), Err(ClientError::BadUrl { .. })));
        assert!(matches!(Client::new("mailto:a@b", None, None), Err(ClientError::BadUrl { .. })));
    }

    #[test]
    fn retry_classification_and_backoff() {
        let api = |s: u16| ClientError::Api {
            status: StatusCode::from_u16(s).unwrap(),
            error: ApiError { code: "c".into(), message: "m".into() },
        };
        assert!(api(503).is_retryable() && api(500).is_retryable() && api(429).is_retryable());
        assert!(!api(409).is_retryable() && !api(404).is_retryable() && !api(401).is_retryable());
        assert_eq!(api(409).code(), Some("c"));
        let base = Duration::from_millis(100);
        for attempt in 1..20 {
            let d = backoff(attempt, base, Duration::from_secs(5));
            assert!(
                d > Duration::ZERO && d <= base * (1 << (attempt - 1).min(16)) && d <= Duration::from_secs(5),
                "{attempt}: {d:?}"
            );
        }
    }

    #[test]
    fn api_errors_print_message_code_and_status() {
        let e = ClientError::Api {
            status: StatusCode::CONFLICT,
            error: ApiError {
                code: "no_machine_available".into(),
                message: "no waiting machine of size small in partition lab".into(),
            },
        };
        assert_eq!(e.to_string(), "no waiting machine of size small in partition lab (no_machine_available, HTTP 409)");
    }

    /// A loopback HTTP/1.1 server for these unit tests: each connection gets the next scripted
    /// reply (`None`: the connection is closed without an answer); requests are recorded.
    struct Scripted {
        url: String,
        requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    }

    async fn scripted(replies: Vec<Option<(u16, &'static str)>>) -> Scripted {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            for reply in replies {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Headers, then as much body as Content-Length says.
                let request = loop {
                    let n = sock.read(&mut chunk).await.unwrap();
                    buf.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buf).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let len = head
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        if body.len() >= len {
                            break text;
                        }
                    }
                    if n == 0 {
                        break text;
                    }
                };
                seen.lock().unwrap().push(request);
                if let Some((status, body)) = reply {
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    sock.write_all(resp.as_bytes()).await.unwrap();
                }
            }
        });
        Scripted { url, requests }
    }

    const ALLOCATION: &str = r#"{"id":"00000000-0000-0000-0000-0000000000aa","machine":"00000000-0000-0000-0000-000000000001",
        "project":"p","partition":"lab","image":"test-os-1","hostname":"h","layout":"l","ssh_keys":[],
        "user_data":"","created_at":"2026-11-24T12:00:00Z","idempotency_key":"k1"}"#;

    fn request(key: Option<&str>) -> AllocationRequest {
        AllocationRequest {
            project: "p".into(),
            partition: "lab".into(),
            size: Some("small".into()),
            machine: None,
            image: "test-os".into(),
            hostname: "h".into(),
            layout: None,
            ssh_keys: vec![],
            user_data: String::new(),
            idempotency_key: key.map(Into::into),
        }
    }

    #[tokio::test]
    async fn errors_are_sorted_by_what_came_back() {
        let s = scripted(vec![
            Some((409, r#"{"code":"no_machine_available","message":"no machine of size small is waiting"}"#)),
            Some((502, "<html>Bad Gateway</html>")),
            Some((200, r#"{"not":"a list"}"#)),
            Some((200, "[]")),
        ])
        .await;
        let c = Client::new(&s.url, Some("tok".into()), None).unwrap();

        let e = c.allocate(&request(None)).await.unwrap_err();
        assert_eq!(e.to_string(), "no machine of size small is waiting (no_machine_available, HTTP 409)");
        let e = c.machines().await.unwrap_err();
        assert!(matches!(e, ClientError::Http { .. }), "{e:?}");
        assert_eq!(e.to_string(), format!("HTTP 502 from GET {}/v1/machines: <html>Bad Gateway</html>", s.url));
        let e = c.list::<Project>().await.unwrap_err();
        assert!(matches!(e, ClientError::Decode { .. }), "{e:?}");
        assert!(c.list::<Size>().await.unwrap().is_empty());

        let reqs = s.requests.lock().unwrap().clone();
        assert!(reqs[0].starts_with("POST /v1/allocations HTTP/1.1"), "{}", reqs[0]);
        assert!(reqs[0].to_ascii_lowercase().contains("authorization: bearer tok"), "{}", reqs[0]);
        assert!(reqs[0].contains(r#""hostname":"h""#), "{}", reqs[0]);
        assert!(reqs[3].starts_with("GET /v1/sizes HTTP/1.1"), "{}", reqs[3]);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_transport_error() {
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let c = Client::new(&format!("http://{addr}"), None, None).unwrap();
        let e = c.health().await.unwrap_err();
        assert!(e.is_transport(), "{e:?}");
        assert!(e.to_string().starts_with(&format!("cannot reach the API: GET http://{addr}/healthz")), "{e}");
    }

    #[tokio::test]
    async fn allocation_is_retried_with_the_same_key_after_a_lost_answer() {
        let s = scripted(vec![None, Some((201, ALLOCATION))]).await;
        let c = Client::new(&s.url, None, None).unwrap();
        let mut retries = 0;
        let a = c.allocate_retrying(&request(Some("k1")), 3, Duration::from_millis(1), &mut |_| retries += 1).await.unwrap();
        assert!(a.created);
        assert_eq!(a.allocation.hostname, "h");
        assert_eq!(retries, 1);
        let reqs = s.requests.lock().unwrap().clone();
        assert_eq!(reqs.len(), 2);
        assert!(reqs.iter().all(|r| r.contains(r#""idempotency_key":"k1""#)), "{reqs:?}");
    }

    #[tokio::test]
    async fn no_retry_without_a_key_nor_after_an_api_answer() {
        let s = scripted(vec![None]).await;
        let c = Client::new(&s.url, None, None).unwrap();
        let e = c.allocate_retrying(&request(None), 3, Duration::from_millis(1), &mut |_| panic!("retried")).await;
        assert!(e.unwrap_err().is_transport());

        let s = scripted(vec![Some((200, ALLOCATION))]).await;
        let c = Client::new(&s.url, None, None).unwrap();
        let a = c.allocate_retrying(&request(Some("k1")), 3, Duration::from_millis(1), &mut |_| panic!("retried")).await;
        assert!(!a.unwrap().created, "200 means an earlier request with this key made it");

        let s = scripted(vec![Some((409, r#"{"code":"conflict","message":"m"}"#))]).await;
        let c = Client::new(&s.url, None, None).unwrap();
        let e = c.allocate_retrying(&request(Some("k1")), 3, Duration::from_millis(1), &mut |_| panic!("retried")).await;
        assert!(matches!(e.unwrap_err(), ClientError::Api { .. }));
    }
}
