//! A small typed client of the metal API: one function per route, every body a `metal-types`
//! value. Errors keep the API's own `ApiError` so the caller can print its code and message.

use std::time::Duration;

use metal_types::{
    Allocation, AllocationRequest, ApiError, FilesystemLayout, Image, Machine, MachineEvent,
    MachineId, Partition, Project, Size, TokenRequest, TokenResponse,
};
use reqwest::{Method, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Everything that can go wrong talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API answered with an error body (`ApiError`).
    #[error("{} ({}, HTTP {})", .error.message, .error.code, .status.as_u16())]
    Api { status: StatusCode, error: ApiError },
    /// The API answered with an error status but not with an `ApiError` body (a proxy, or
    /// something that is not the metal API at that URL).
    #[error("HTTP {} from {request}: {body}", .status.as_u16())]
    Http {
        request: String,
        status: StatusCode,
        body: String,
    },
    /// The request never got an answer: connection refused, timeout, reset.
    #[error("cannot reach the API: {request}")]
    Transport {
        request: String,
        #[source]
        source: reqwest::Error,
    },
    /// A 2xx answer whose body is not what this route returns.
    #[error("unexpected answer to {request}")]
    Decode {
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
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A catalog object with the four admin routes `POST/GET /v1/<path>` and
/// `GET/DELETE /v1/<path>/{id}`.
pub trait CatalogKind: Serialize + DeserializeOwned {
    /// Path segment under `/v1`: `partitions`, `sizes`, …
    const PATH: &'static str;
    /// Singular noun for messages: `partition`, `size`, …
    const NOUN: &'static str;
    fn id(&self) -> &str;
}

impl CatalogKind for Partition {
    const PATH: &'static str = "partitions";
    const NOUN: &'static str = "partition";
    fn id(&self) -> &str {
        &self.id
    }
}

impl CatalogKind for Size {
    const PATH: &'static str = "sizes";
    const NOUN: &'static str = "size";
    fn id(&self) -> &str {
        &self.id
    }
}

impl CatalogKind for FilesystemLayout {
    const PATH: &'static str = "layouts";
    const NOUN: &'static str = "layout";
    fn id(&self) -> &str {
        &self.id
    }
}

impl CatalogKind for Project {
    const PATH: &'static str = "projects";
    const NOUN: &'static str = "project";
    fn id(&self) -> &str {
        &self.id
    }
}

/// Images: `GET /v1/images/{id_or_name}` resolves a bare name to the newest version.
impl CatalogKind for Image {
    const PATH: &'static str = "images";
    const NOUN: &'static str = "image";
    fn id(&self) -> &str {
        &self.id
    }
}

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

impl Client {
    /// `api_url` is the API's base URL (`http://10.99.0.1:8080`); routes are appended to it.
    pub fn new(api_url: &str, token: Option<String>) -> Result<Client> {
        let bad = || ClientError::BadUrl {
            url: api_url.to_string(),
        };
        let base = Url::parse(api_url).map_err(|_| bad())?;
        if !matches!(base.scheme(), "http" | "https") || base.cannot_be_a_base() {
            return Err(bad());
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("metalctl/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ClientError::Transport {
                request: "building the HTTP client".into(),
                source,
            })?;
        Ok(Client {
            base,
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    /// The URL of a route: the base URL's path plus the given segments, each escaped.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        {
            // `cannot_be_a_base` was ruled out in `new`.
            let mut path = url
                .path_segments_mut()
                .expect("base URL checked in Client::new");
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
        let url = self.url(segments);
        let request = format!("{method} {url}");
        let mut req = self.http.request(method, url);
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            let json = body.to_json().map_err(|source| ClientError::Decode {
                request: request.clone(),
                source,
            })?;
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json);
        }
        let transport = |source| ClientError::Transport {
            request: request.clone(),
            source,
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(transport)?;
        if status.is_success() {
            return Ok((status, bytes.to_vec()));
        }
        Err(match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(error) => ClientError::Api { status, error },
            Err(_) => ClientError::Http {
                request,
                status,
                body: String::from_utf8_lossy(&bytes)
                    .trim()
                    .chars()
                    .take(500)
                    .collect(),
            },
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
        let value = serde_json::from_slice(&bytes)
            .map_err(|source| ClientError::Decode { request, source })?;
        Ok((status, value))
    }

    async fn get<T: DeserializeOwned>(&self, segments: &[&str]) -> Result<T> {
        Ok(self.call(Method::GET, segments, None).await?.1)
    }

    // ------------------------------------------------------------------------------------
    // Routes
    // ------------------------------------------------------------------------------------

    /// `GET /healthz`: the body as text.
    pub async fn health(&self) -> Result<String> {
        let (_, bytes) = self.send(Method::GET, &["healthz"], None).await?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_string())
    }

    /// `POST /v1/<kind>`: the object as the API stored it, and whether it is new (201) or
    /// an identical one existed already (200). Different content under the same id is a 409.
    pub async fn create<K: CatalogKind + Sync>(&self, object: &K) -> Result<(K, bool)> {
        let (status, stored) = self
            .call(Method::POST, &["v1", K::PATH], Some(object))
            .await?;
        Ok((stored, status == StatusCode::CREATED))
    }

    /// `GET /v1/<kind>`.
    pub async fn list<K: CatalogKind>(&self) -> Result<Vec<K>> {
        self.get(&["v1", K::PATH]).await
    }

    /// `GET /v1/<kind>/{id}` (for images also a bare name: the newest image of that name).
    pub async fn describe<K: CatalogKind>(&self, id: &str) -> Result<K> {
        self.get(&["v1", K::PATH, id]).await
    }

    /// `DELETE /v1/<kind>/{id}`.
    pub async fn delete<K: CatalogKind>(&self, id: &str) -> Result<()> {
        self.send(Method::DELETE, &["v1", K::PATH, id], None)
            .await
            .map(|_| ())
    }

    /// `POST /v1/tokens` (admin).
    pub async fn create_token(&self, req: &TokenRequest) -> Result<TokenResponse> {
        Ok(self
            .call(Method::POST, &["v1", "tokens"], Some(req))
            .await?
            .1)
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
        self.get(&["v1", "machines", &id.to_string(), "events"])
            .await
    }

    /// `DELETE /v1/machines/{id}/allocation`: free the machine; it goes to `Machine Reclaim`.
    pub async fn free_machine(&self, id: MachineId) -> Result<Machine> {
        Ok(self
            .call(
                Method::DELETE,
                &["v1", "machines", &id.to_string(), "allocation"],
                None,
            )
            .await?
            .1)
    }

    /// `POST /v1/allocations`. 409 `no_machine_available` when no machine fits.
    pub async fn allocate(&self, req: &AllocationRequest) -> Result<Allocated> {
        let (status, allocation) = self
            .call(Method::POST, &["v1", "allocations"], Some(req))
            .await?;
        Ok(Allocated {
            allocation,
            created: status == StatusCode::CREATED,
        })
    }

    /// `GET /v1/allocations` (a tenant sees only its project's).
    pub async fn allocations(&self) -> Result<Vec<Allocation>> {
        self.get(&["v1", "allocations"]).await
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

    #[test]
    fn urls_keep_the_base_path_and_escape_segments() {
        let c = Client::new("http://10.99.0.1:8080", None).unwrap();
        assert_eq!(
            c.url(&["v1", "partitions"]).as_str(),
            "http://10.99.0.1:8080/v1/partitions"
        );
        let c = Client::new("http://example.test/api/", None).unwrap();
        assert_eq!(
            c.url(&["v1", "images", "a/b c"]).as_str(),
            "http://example.test/api/v1/images/a%2Fb%20c"
        );
    }

    #[test]
    fn bad_urls_are_refused() {
        assert!(matches!(
            Client::new("10.99.0.1:8080", None),
            Err(ClientError::BadUrl { .. })
        ));
        assert!(matches!(
            Client::new("ftp://x", None),
            Err(ClientError::BadUrl { .. })
        ));
        assert!(matches!(
            Client::new("mailto:a@b", None),
            Err(ClientError::BadUrl { .. })
        ));
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
        assert_eq!(
            e.to_string(),
            "no waiting machine of size small in partition lab (no_machine_available, HTTP 409)"
        );
    }
}
