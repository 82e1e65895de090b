//! The HTTP routes. Handlers check who is calling, load what the pure planners need
//! (`crate::allocation`, `crate::policy`), call the store and shape the answer; every failure is
//! an [`Error`], turned into a response in `error.rs`.
//!
//! | module | routes |
//! |---|---|
//! | `mod.rs` | the router, `/healthz`, `/metrics`, the JSON body extractor, request metrics |
//! | `catalog` | `/v1/partitions`, `/v1/sizes`, `/v1/layouts`, `/v1/projects`, `/v1/images` |
//! | `tokens` | `/v1/tokens` |
//! | `machines` | `/v1/machines…`, `/v1/allocations` |
//! | `agent` | `/v1/agent/…` (metal-hammer, phone home) |
//! | `boot` | `/v1/boot/…` (pixie) |

mod agent;
mod boot;
mod catalog;
mod machines;
mod tokens;

use crate::error::{Error, Result};
use crate::{App, BODY_LIMIT};
use agent::*;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use boot::*;
use catalog::*;
use machines::*;
use metal_types::{FilesystemLayout, MachineId, Partition, Project, Size};
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Instant;
use tokens::*;

pub(crate) type AppState = State<Arc<App>>;

/// A JSON request body whose rejections (syntax, unknown fields, size) become 400/413 `ApiError`s.
pub struct Body<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = Error;
    async fn from_request(req: Request, state: &S) -> Result<Self> {
        let Json(v) = Json::<T>::from_request(req, state).await?;
        Ok(Body(v))
    }
}

/// Builds the router with every route, the body limit, metrics and tracing.
pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/partitions", post(create_item::<Partition>).get(list_items::<Partition>))
        .route("/v1/partitions/{id}", get(get_item::<Partition>).delete(delete_item::<Partition>))
        .route("/v1/sizes", post(create_item::<Size>).get(list_items::<Size>))
        .route("/v1/sizes/{id}", get(get_item::<Size>).delete(delete_item::<Size>))
        .route("/v1/layouts", post(create_item::<FilesystemLayout>).get(list_items::<FilesystemLayout>))
        .route("/v1/layouts/{id}", get(get_item::<FilesystemLayout>).delete(delete_item::<FilesystemLayout>))
        .route("/v1/projects", post(create_item::<Project>).get(list_items::<Project>))
        .route("/v1/projects/{id}", get(get_item::<Project>).delete(delete_item::<Project>))
        .route("/v1/images", post(create_image).get(list_images))
        .route("/v1/images/{id}", get(get_image).delete(delete_image))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route("/v1/machines", get(list_machines))
        .route("/v1/machines/{id}", get(get_machine))
        .route("/v1/machines/{id}/events", get(machine_events))
        .route("/v1/machines/{id}/allocation", delete(free_machine))
        .route("/v1/allocations", post(allocate).get(list_allocations))
        .route("/v1/agent/register", post(register))
        .route("/v1/agent/events", post(agent_events))
        .route("/v1/agent/wipe-report", post(wipe_report))
        .route("/v1/agent/wait", get(wait))
        .route("/v1/agent/install-report", post(install_report))
        .route("/v1/agent/phone-home", post(phone_home))
        .route("/v1/boot/decide", post(boot_decide))
        .route("/v1/boot/pxe-event", post(pxe_event))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    let docs = utoipa_swagger_ui::SwaggerUi::new("/swagger-ui").url("/openapi.json", crate::openapi::document());
    Router::new()
        .merge(api)
        .merge(docs)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(app)
}

async fn observe(State(app): AppState, matched: Option<MatchedPath>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let route = matched.map(|m| m.as_str().to_string()).unwrap_or_else(|| "unmatched".into());
    let start = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status();
    let matched = (route != "unmatched").then_some(route.as_str());
    app.metrics.observe(&method, matched, status.as_u16(), start.elapsed().as_secs_f64());
    if status.is_client_error() {
        let (code, message) =
            resp.extensions().get::<crate::error::Refusal>().map(|r| (r.code, r.message.as_str())).unwrap_or(("", ""));
        tracing::info!(%method, %route, status = status.as_u16(), code, reason = message, "request refused");
    }
    resp
}

async fn not_found() -> Error {
    Error::NotFound("no such route; the API's routes are listed at /openapi.json".into())
}

async fn method_not_allowed() -> Response {
    let body = metal_types::ApiError {
        code: "method_not_allowed".into(),
        message: "this route does not accept that method; see /openapi.json".into(),
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

pub(crate) fn parse_machine(s: &str) -> Result<MachineId> {
    s.parse().map_err(|e: metal_types::ParseIdError| Error::BadRequest(e.to_string()))
}

pub(crate) fn path(p: std::result::Result<Path<String>, PathRejection>) -> Result<String> {
    Ok(p?.0)
}

// ---------------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------------

async fn healthz(State(app): AppState) -> Result<Json<serde_json::Value>> {
    app.store.ping().await?;
    Ok(Json(serde_json::json!({ "status": "ok" })))
}

async fn metrics(State(app): AppState) -> Result<Response> {
    let states = app.store.machines_by_state().await?;
    let (total, active) = app.store.allocation_counts().await?;
    let snapshot = crate::metrics::Snapshot { machines_by_state: &states, allocations_total: total, allocations_active: active };
    let (text, content_type) =
        app.metrics.render(&snapshot).map_err(|e| Error::Internal(format!("rendering the metrics: {e}")))?;
    Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
}
