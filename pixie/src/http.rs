//! HTTP: per-machine iPXE scripts (`/ipxe`), the metal-hammer kernel and initrd (`/hammer/*`),
//! the lab's images (`/images/*`), the TFTP root for UEFI HTTP boot (`/boot/*`), `/metrics` and
//! `/healthz`. Static files are served with Range support; paths cannot leave their directory.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metal_types::{Arch, BootRequest, MachineId};
use tower_http::services::ServeDir;

use crate::api::{error_chain, ApiClient};
use crate::config::Mac;
use crate::dhcp::arch_name;
use crate::ipxe::{render, ScriptInput};
use crate::metrics::Metrics;

pub struct HttpState {
    pub api: ApiClient,
    /// `/hammer/*`, served from memory: a local directory or an upstream URL.
    pub hammer: Option<crate::files::MemDir>,
    pub hammer_upstream: Option<crate::files::Upstream>,
    pub partition: String,
    /// Without a trailing slash.
    pub public_url: String,
    pub metrics: Arc<Metrics>,
}

/// Parses the `arch` query value: pixie's own names, and iPXE's `${platform}`/`${buildarch}`.
pub fn parse_arch(s: &str) -> Arch {
    match s.trim().to_ascii_lowercase().as_str() {
        "bios_x86" | "bios" | "pcbios" | "i386" => Arch::BiosX86,
        "uefi_x64" | "efi" | "uefi" | "x86_64" | "efi64" => Arch::UefiX64,
        "uefi_x64_http" => Arch::UefiX64Http,
        "uefi_arm64" | "arm64" => Arch::UefiArm64,
        _ => Arch::Unknown,
    }
}

fn script(body: String) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], body).into_response()
}

async fn ipxe(State(st): State<Arc<HttpState>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let Some(mac) = q.get("mac").and_then(|m| m.parse::<Mac>().ok()) else {
        st.metrics.inc("pixie_boot_decisions_total", &[("outcome", "bad_request")]);
        return (StatusCode::BAD_REQUEST, "mac query parameter missing or not a MAC address\n").into_response();
    };
    // An unknown or unexpanded (`${uuid}`) UUID is left out; the API matches by MAC then.
    let uuid = q.get("uuid").and_then(|u| u.parse::<MachineId>().ok());
    let arch = q.get("arch").map(|a| parse_arch(a)).unwrap_or(Arch::Unknown);
    let attempt: u32 = q.get("attempt").and_then(|a| a.parse().ok()).unwrap_or(0).min(1000);
    let mut retry_url = format!("{}/ipxe?mac={mac}", st.public_url);
    if let Some(u) = uuid {
        retry_url.push_str(&format!("&uuid={u}"));
    }
    retry_url.push_str(&format!("&arch={}&attempt={}", arch_name(arch), attempt + 1));
    let req = BootRequest { partition: st.partition.clone(), mac: mac.to_string(), uuid, arch };
    match st.api.decide(&req).await {
        Ok(decision) => {
            let what = match &decision {
                metal_types::BootDecision::Hammer { .. } => "hammer",
                metal_types::BootDecision::LocalDisk => "local_disk",
            };
            st.metrics.inc("pixie_boot_decisions_total", &[("outcome", what)]);
            tracing::info!(%mac, uuid = ?uuid.map(|u| u.to_string()), arch = arch_name(arch), decision = what, attempt, "iPXE script");
            script(render(&ScriptInput::Decision { decision: &decision, arch, retry_url: &retry_url, attempt }))
        }
        Err(e) => {
            st.metrics.inc("pixie_boot_decisions_total", &[("outcome", "retry")]);
            let reason = error_chain(&e);
            tracing::warn!(%mac, arch = arch_name(arch), attempt, error = %reason, "no boot decision: iPXE told to retry");
            script(render(&ScriptInput::Retry { reason: &reason, retry_url: &retry_url, attempt }))
        }
    }
}

async fn hammer(State(st): State<Arc<HttpState>>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    match (&st.hammer, &st.hammer_upstream) {
        (Some(dir), _) => dir.serve(&name, &headers),
        (None, Some(up)) => up.serve(&name, &headers).await,
        (None, None) => (StatusCode::NOT_FOUND, "no hammer_dir or hammer_url configured\n").into_response(),
    }
}

async fn metrics(State(st): State<Arc<HttpState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render()).into_response()
}

async fn count(State(st): State<Arc<HttpState>>, req: Request, next: Next) -> Response {
    let route: &'static str = match req.uri().path().trim_start_matches('/').split('/').next().unwrap_or("") {
        "ipxe" => "ipxe",
        "hammer" => "hammer",
        "images" => "images",
        "boot" => "boot",
        "metrics" => "metrics",
        "healthz" => "healthz",
        _ => "other",
    };
    let resp = next.run(req).await;
    st.metrics.inc("pixie_http_requests_total", &[("route", route), ("status", resp.status().as_str())]);
    resp
}

/// Directories served as static files from disk (`/hammer` is served from memory instead).
#[derive(Debug, Clone, Default)]
pub struct StaticDirs {
    pub images: Option<PathBuf>,
    pub boot: Option<PathBuf>,
}

pub fn router(state: Arc<HttpState>, dirs: &StaticDirs) -> Router {
    let mut r = Router::new()
        .route("/ipxe", get(ipxe))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/hammer/{name}", get(hammer));
    for (prefix, dir) in [("/images", &dirs.images), ("/boot", &dirs.boot)] {
        if let Some(d) = dir {
            r = r.nest_service(prefix, ServeDir::new(d));
        }
    }
    r.layer(middleware::from_fn_with_state(state.clone(), count)).with_state(state)
}
