//! The HTTP routes. Handlers check who is calling, validate, call the store and shape the answer;
//! every failure is an [`Error`], turned into a response in `error.rs`.

use crate::auth::{self, Principal, Scope};
use crate::enrolment::{self, normalize_mac};
use crate::error::{Error, Result};
use crate::policy::{self, UNKNOWN_SIZE};
use crate::store::{AllocOutcome, AllocationPlan, Kind, MachineRow};
use crate::{fsm, now_ms, rfc3339, App, BODY_LIMIT, MAX_WAIT_S};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use metal_types::cmdline::HammerParams;
use metal_types::{
    Allocation, AllocationRequest, BootDecision, BootRequest, EventBatch, FilesystemLayout, Image, InstallInstructions,
    InstallReport, Machine, MachineEvent, MachineId, Partition, PhoneHome, PhoneHomeConfig, Project, PxeEvent,
    RegisterRequest, RegisterResponse, Size, TokenInfo, TokenRequest, TokenResponse, TokenRole, WipeReport,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

type AppState = State<Arc<App>>;

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
        let (code, message) = resp
            .extensions()
            .get::<crate::error::Refusal>()
            .map(|r| (r.code, r.message.as_str()))
            .unwrap_or(("", ""));
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

fn parse_machine(s: &str) -> Result<MachineId> {
    s.parse().map_err(|e: metal_types::ParseIdError| Error::BadRequest(e.to_string()))
}

fn path(p: std::result::Result<Path<String>, PathRejection>) -> Result<String> {
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

// ---------------------------------------------------------------------------------------------
// Catalog
// ---------------------------------------------------------------------------------------------

fn validate_url(what: &str, url: &str) -> std::result::Result<(), String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.chars().any(|c| c.is_whitespace() || c == '"') {
        return Err(format!("{what} {url:?} must be an http:// or https:// URL without spaces or quotes"));
    }
    Ok(())
}

/// A catalog object kept as one JSON document per id.
pub trait CatalogItem: Serialize + DeserializeOwned + Send + 'static {
    const KIND: Kind;
    fn id(&self) -> &str;
    fn validate(&self) -> std::result::Result<(), String>;
}

impl CatalogItem for Partition {
    const KIND: Kind = Kind::Partition;
    fn id(&self) -> &str {
        &self.id
    }
    fn validate(&self) -> std::result::Result<(), String> {
        policy::validate_id("partition", &self.id)?;
        validate_url("boot.kernel_url", &self.boot.kernel_url)?;
        validate_url("boot.initrd_url", &self.boot.initrd_url)?;
        validate_url("boot.api_url", &self.boot.api_url)?;
        if self.boot.cmdline.contains('"') || self.boot.cmdline.contains("metal.") {
            return Err("boot.cmdline must not contain quotes or metal.* parameters (the API adds those)".into());
        }
        Ok(())
    }
}

impl CatalogItem for Size {
    const KIND: Kind = Kind::Size;
    fn id(&self) -> &str {
        &self.id
    }
    fn validate(&self) -> std::result::Result<(), String> {
        policy::validate_size(self)
    }
}

impl CatalogItem for FilesystemLayout {
    const KIND: Kind = Kind::Layout;
    fn id(&self) -> &str {
        &self.id
    }
    fn validate(&self) -> std::result::Result<(), String> {
        policy::validate_id("layout", &self.id)?;
        if self.disks.is_empty() {
            return Err("a layout needs at least one disk".into());
        }
        for d in &self.disks {
            if d.partitions.is_empty() {
                return Err(format!("disk {} has no partitions", d.device));
            }
            for (i, p) in d.partitions.iter().enumerate() {
                if p.number as usize != i + 1 {
                    return Err(format!("partitions of disk {} must be numbered 1, 2, … in order", d.device));
                }
                if p.size_mib == 0 && i + 1 != d.partitions.len() {
                    return Err(format!(
                        "partition {} of disk {}: size 0 (rest of the disk) is only allowed for the last partition",
                        p.number, d.device
                    ));
                }
            }
        }
        for fs in &self.filesystems {
            let Some((dev, num)) = fs.source.rsplit_once(':') else {
                return Err(format!("filesystem source {:?} must be <disk>:<partition number>", fs.source));
            };
            let num: u32 = num.parse().map_err(|_| format!("filesystem source {:?}: bad partition number", fs.source))?;
            let known = self.disks.iter().any(|d| d.device == dev && d.partitions.iter().any(|p| p.number == num));
            if !known {
                return Err(format!("filesystem source {:?} names no partition of this layout", fs.source));
            }
        }
        Ok(())
    }
}

impl CatalogItem for Project {
    const KIND: Kind = Kind::Project;
    fn id(&self) -> &str {
        &self.id
    }
    fn validate(&self) -> std::result::Result<(), String> {
        policy::validate_id("project", &self.id)
    }
}

async fn create_item<T: CatalogItem>(State(app): AppState, p: Principal, Body(item): Body<T>) -> Result<(StatusCode, Json<T>)> {
    p.require_admin()?;
    item.validate().map_err(Error::BadRequest)?;
    let body = serde_json::to_value(&item).expect("wire types always serialize");
    let created = app.store.put_object(T::KIND, item.id(), &body).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(item)))
}

async fn list_items<T: CatalogItem>(State(app): AppState, p: Principal) -> Result<Json<Vec<T>>> {
    let scope = p.scope()?;
    let items: Vec<T> = app.store.list_objects(T::KIND).await?;
    Ok(Json(match (T::KIND, &scope) {
        (Kind::Project, Scope::Project(own)) => items.into_iter().filter(|i| i.id() == own).collect(),
        _ => items,
    }))
}

async fn get_item<T: CatalogItem>(
    State(app): AppState,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<T>> {
    let scope = p.scope()?;
    let id = path(id)?;
    if T::KIND == Kind::Project && !scope.sees(&id) {
        return Err(Error::not_found(T::KIND.noun(), &id));
    }
    match app.store.get_object(T::KIND, &id).await? {
        Some(item) => Ok(Json(item)),
        None => Err(Error::not_found(T::KIND.noun(), &id)),
    }
}

async fn delete_item<T: CatalogItem>(
    State(app): AppState,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<StatusCode> {
    p.require_admin()?;
    let id = path(id)?;
    let deleted = if T::KIND == Kind::Project {
        app.store.delete_project(&id).await?
    } else {
        app.store.delete_object(T::KIND, &id).await?
    };
    if deleted {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::not_found(T::KIND.noun(), &id))
    }
}

async fn create_image(State(app): AppState, p: Principal, Body(mut image): Body<Image>) -> Result<(StatusCode, Json<Image>)> {
    p.require_admin()?;
    let m = &image.manifest;
    let id = m.id();
    if !image.id.is_empty() && image.id != id {
        return Err(Error::bad_request(format!(
            "image id {:?} does not match <name>-<version> = {id:?}; leave id out, the API sets it",
            image.id
        )));
    }
    policy::validate_id("image", &id).map_err(Error::BadRequest)?;
    if m.name.is_empty() || m.version.is_empty() {
        return Err(Error::bad_request("manifest name and version must not be empty"));
    }
    if m.sha256.len() != 64 || !m.sha256.chars().all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)) {
        return Err(Error::bad_request("sha256 must be 64 lower-case hex digits (the SHA-256 of the compressed file)"));
    }
    validate_url("url", &image.url).map_err(Error::BadRequest)?;
    if m.kernel.is_empty() {
        return Err(Error::bad_request("kernel (path of the kernel inside the image) must not be empty"));
    }
    let expires_ms = match &image.expires_at {
        None => None,
        Some(s) => Some(crate::parse_rfc3339(s).ok_or_else(|| {
            Error::bad_request(format!("expires_at {s:?} is not an RFC 3339 time like 2027-01-01T00:00:00Z"))
        })?),
    };
    image.id = id;
    let created = app.store.put_image(&image, expires_ms).await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(image)))
}

async fn list_images(State(app): AppState, p: Principal) -> Result<Json<Vec<Image>>> {
    p.scope()?;
    Ok(Json(app.store.list_images().await?))
}

/// An image by id, or by name: the newest version that has not expired.
async fn resolve_image(app: &App, id_or_name: &str) -> Result<Image> {
    if let Some(i) = app.store.get_image(id_or_name).await? {
        return Ok(i);
    }
    app.store.newest_image(id_or_name, now_ms()).await?.ok_or_else(|| {
        Error::NotFound(format!(
            "image {id_or_name} not found (neither an image id nor the name of an image that has not expired); list them with GET /v1/images"
        ))
    })
}

async fn get_image(State(app): AppState, p: Principal, id: std::result::Result<Path<String>, PathRejection>) -> Result<Json<Image>> {
    p.scope()?;
    Ok(Json(resolve_image(&app, &path(id)?).await?))
}

async fn delete_image(State(app): AppState, p: Principal, id: std::result::Result<Path<String>, PathRejection>) -> Result<StatusCode> {
    p.require_admin()?;
    let id = path(id)?;
    if app.store.delete_image(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::not_found("image", &id))
    }
}

async fn create_token(State(app): AppState, p: Principal, Body(req): Body<TokenRequest>) -> Result<(StatusCode, Json<TokenResponse>)> {
    p.require_admin()?;
    let (role, prefix) = match req.role {
        TokenRole::Admin => ("admin", "adm"),
        TokenRole::Tenant => ("tenant", "ten"),
        TokenRole::Pixie => ("pixie", "pix"),
    };
    match (req.role, &req.project) {
        (TokenRole::Tenant, None) => return Err(Error::bad_request("a tenant token needs a project")),
        (TokenRole::Tenant, Some(project)) => {
            if app.store.get_object::<Project>(Kind::Project, project).await?.is_none() {
                return Err(Error::not_found("project", project));
            }
        }
        (_, Some(_)) => return Err(Error::bad_request("only tenant tokens belong to a project; leave project out")),
        (_, None) => {}
    }
    let expires_ms = match req.expires_in_s {
        Some(0) => return Err(Error::bad_request("expires_in_s must be at least 1 (leave it out for a token that lives until revoked)")),
        Some(s) if s > 100 * 365 * 86_400 => return Err(Error::bad_request("expires_in_s must be at most 100 years")),
        Some(s) => Some(now_ms() + s as i64 * 1000),
        None => None,
    };
    if req.description.len() > 200 {
        return Err(Error::bad_request("description must be at most 200 characters"));
    }
    let token = auth::generate(prefix);
    let mut row = auth::row(&token, role);
    row.project = req.project.clone();
    row.description = req.description.clone();
    row.expires_ms = expires_ms;
    app.store.insert_token(&row).await?;
    tracing::info!(token = %row.id, role, project = ?req.project, "token created");
    Ok((
        StatusCode::CREATED,
        Json(TokenResponse { id: row.id, token, role: req.role, project: req.project, expires_at: expires_ms.map(rfc3339) }),
    ))
}

async fn list_tokens(State(app): AppState, p: Principal) -> Result<Json<Vec<TokenInfo>>> {
    p.require_admin()?;
    let rows = app.store.list_tokens().await?;
    let infos = rows
        .into_iter()
        .map(|(t, created)| {
            let role = match t.role.as_str() {
                "admin" => TokenRole::Admin,
                "tenant" => TokenRole::Tenant,
                "pixie" => TokenRole::Pixie,
                other => return Err(Error::Internal(format!("token {} has role {other:?}", t.id))),
            };
            Ok(TokenInfo {
                id: t.id,
                role,
                project: t.project,
                description: t.description,
                created_at: rfc3339(created),
                expires_at: t.expires_ms.map(rfc3339),
            })
        })
        .collect::<Result<_>>()?;
    Ok(Json(infos))
}

async fn revoke_token(State(app): AppState, p: Principal, id: std::result::Result<Path<String>, PathRejection>) -> Result<StatusCode> {
    p.require_admin()?;
    let id = path(id)?;
    if app.store.revoke_token(&id, now_ms()).await? {
        tracing::info!(token = %id, "token revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Error::NotFound(format!("token {id} not found (only admin, tenant and pixie tokens are listed and revoked); list them with GET /v1/tokens")))
    }
}

// ---------------------------------------------------------------------------------------------
// Machines and allocations
// ---------------------------------------------------------------------------------------------

fn machine_view(app: &App, row: MachineRow, now: i64) -> Result<Machine> {
    let inventory = row
        .inventory
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|source| Error::Corrupt { what: "inventory", source })?;
    Ok(Machine {
        id: row.id,
        partition: row.partition,
        size: row.size,
        state: row.fsm.state,
        liveliness: fsm::liveliness(row.fsm.state, row.last_seen_ms, now, app.config.dead_after_s as i64 * 1000),
        crash_loop: row.fsm.crash_loop,
        failed_reclaim: fsm::failed_reclaim(&row.fsm, now, app.config.reclaim_timeout_s as i64 * 1000),
        allocation: row.allocation,
        inventory,
        boot: row.boot,
        last_seen: row.last_seen_ms.map(rfc3339),
    })
}

/// The machine if the caller may see it: operators all, tenants only their project's.
async fn visible_machine(app: &App, scope: &Scope, id: &str) -> Result<MachineRow> {
    let id = parse_machine(id)?;
    let row = app.store.machine(id).await?.ok_or_else(|| Error::not_found("machine", id))?;
    if let Scope::Project(p) = scope {
        if row.allocation.as_ref().map(|a| &a.project) != Some(p) {
            return Err(Error::not_found("machine", id));
        }
    }
    Ok(row)
}

async fn list_machines(State(app): AppState, p: Principal) -> Result<Json<Vec<Machine>>> {
    let scope = p.scope()?;
    let now = now_ms();
    let rows = app.store.machines(scope.project()).await?;
    Ok(Json(rows.into_iter().map(|r| machine_view(&app, r, now)).collect::<Result<_>>()?))
}

async fn get_machine(State(app): AppState, p: Principal, id: std::result::Result<Path<String>, PathRejection>) -> Result<Json<Machine>> {
    let scope = p.scope()?;
    let row = visible_machine(&app, &scope, &path(id)?).await?;
    Ok(Json(machine_view(&app, row, now_ms())?))
}

async fn machine_events(
    State(app): AppState,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Vec<MachineEvent>>> {
    let scope = p.scope()?;
    let row = visible_machine(&app, &scope, &path(id)?).await?;
    // A tenant sees the timeline of its own allocation only, not what came before it.
    let since = match (&scope, &row.allocation) {
        (Scope::Project(_), Some(a)) => app.store.allocation_created_ms(a.id).await?,
        _ => None,
    };
    Ok(Json(app.store.events(row.id, since).await?))
}

async fn free_machine(State(app): AppState, p: Principal, id: std::result::Result<Path<String>, PathRejection>) -> Result<Json<Machine>> {
    let scope = p.scope()?;
    let id = parse_machine(&path(id)?)?;
    app.store.free(id, scope.project()).await?;
    let row = app.store.machine(id).await?.ok_or_else(|| Error::not_found("machine", id))?;
    Ok(Json(machine_view(&app, row, now_ms())?))
}

fn validate_hostname(h: &str) -> Result<()> {
    let ok = !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(Error::bad_request(format!(
            "hostname {h:?} is invalid: use labels of letters, digits and '-' (1-63 characters each), separated by dots"
        )))
    }
}

async fn allocate(State(app): AppState, p: Principal, Body(req): Body<AllocationRequest>) -> Result<(StatusCode, Json<Allocation>)> {
    let scope = p.scope()?;
    if !scope.sees(&req.project) {
        return Err(Error::NotFound(format!(
            "project {} not found (your token belongs to project {})",
            req.project,
            scope.project().unwrap_or_default()
        )));
    }
    if app.store.get_object::<Project>(Kind::Project, &req.project).await?.is_none() {
        return Err(Error::not_found("project", &req.project));
    }
    if app.store.get_object::<Partition>(Kind::Partition, &req.partition).await?.is_none() {
        return Err(Error::not_found("partition", &req.partition));
    }
    validate_hostname(&req.hostname)?;
    if req.idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 200) {
        return Err(Error::bad_request("idempotency_key must be 1-200 characters"));
    }
    if req.user_data.len() > 256 * 1024 {
        return Err(Error::bad_request("user_data must be at most 256 KiB"));
    }
    let image = resolve_image(&app, &req.image).await?;
    if let Some(exp) = app.store.image_expires_ms(&image.id).await? {
        if exp <= now_ms() {
            return Err(Error::bad_request(format!(
                "image {} expired at {}; use a newer version (or just the image name)",
                image.id,
                rfc3339(exp)
            )));
        }
    }
    let size = match (&req.machine, &req.size) {
        (Some(m), _) => {
            let row = app.store.machine(*m).await?.filter(|r| r.partition.as_deref() == Some(req.partition.as_str()));
            let Some(row) = row else {
                return Err(Error::NotFound(format!("machine {m} not found in partition {}", req.partition)));
            };
            row.size
        }
        (None, Some(size)) => {
            if app.store.get_object::<Size>(Kind::Size, size).await?.is_none() {
                return Err(Error::not_found("size", size));
            }
            size.clone()
        }
        (None, None) => return Err(Error::bad_request("give a size (to pick from the pool) or a machine")),
    };
    let layout = match &req.layout {
        Some(id) => {
            let l: FilesystemLayout =
                app.store.get_object(Kind::Layout, id).await?.ok_or_else(|| Error::not_found("layout", id))?;
            if !policy::layout_fits(&l, &size, &image.manifest.name) {
                return Err(Error::bad_request(format!(
                    "layout {id} does not allow size {size} with image {}; pick another layout",
                    image.manifest.name
                )));
            }
            l.id
        }
        None => {
            let all: Vec<FilesystemLayout> = app.store.list_objects(Kind::Layout).await?;
            policy::pick_layout(&all, &size, &image.manifest.name)
                .ok_or_else(|| {
                    Error::bad_request(format!(
                        "no filesystem layout fits size {size} and image {}; create one with POST /v1/layouts",
                        image.manifest.name
                    ))
                })?
                .id
                .clone()
        }
    };
    let plan = AllocationPlan {
        project: req.project.clone(),
        partition: req.partition.clone(),
        size: req.machine.is_none().then_some(size),
        machine: req.machine,
        image: image.id.clone(),
        hostname: req.hostname.clone(),
        layout,
        ssh_keys: req.ssh_keys.clone(),
        user_data: req.user_data.clone(),
        idempotency_key: req.idempotency_key.clone(),
    };
    let outcome = match app.store.allocate(&plan, app.config.dead_after_s as i64 * 1000).await {
        // A tenant learns nothing about a machine it cannot see: why it cannot have it (allocated
        // to another project, crash-looping, …) is for operators. Its own machines it may ask about.
        Err(e @ (Error::NoMachineAvailable(_) | Error::NotFound(_))) if matches!(scope, Scope::Project(_)) && req.machine.is_some() => {
            let m = req.machine.unwrap_or_default();
            let own = app.store.machine(m).await?.and_then(|r| r.allocation).is_some_and(|a| scope.sees(&a.project));
            if own {
                return Err(e);
            }
            return Err(Error::NotFound(format!(
                "machine {m} not found in partition {} among the machines you may allocate",
                req.partition
            )));
        }
        other => other?,
    };
    match outcome {
        AllocOutcome::Created(a) => {
            app.waker.wake(a.machine);
            tracing::info!(allocation = %a.id, machine = %a.machine, project = %a.project, "allocated");
            Ok((StatusCode::CREATED, Json(a)))
        }
        AllocOutcome::Existing(a) => Ok((StatusCode::OK, Json(a))),
    }
}

async fn list_allocations(State(app): AppState, p: Principal) -> Result<Json<Vec<Allocation>>> {
    let scope = p.scope()?;
    Ok(Json(app.store.allocations(scope.project()).await?))
}

// ---------------------------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------------------------

async fn register(State(app): AppState, p: Principal, Body(req): Body<RegisterRequest>) -> Result<Json<RegisterResponse>> {
    let id = req.inventory.uuid;
    let token_mac = match &p {
        Principal::Admin => None,
        Principal::Enrolment { partition, mac, machine } => {
            let nics = req.inventory.nics.iter().map(|n| n.mac.as_str());
            enrolment::check_binding(partition.as_deref(), mac.as_deref(), &req.partition, nics)
                .and_then(|()| enrolment::check_machine(*machine, id))
                .map_err(|e| Error::Forbidden(e.to_string()))?;
            mac.clone()
        }
        _ => {
            return Err(Error::Forbidden(
                "registering needs the enrolment token from the kernel command line (metal.token=…)".into(),
            ))
        }
    };
    if id.0.is_nil() {
        return Err(Error::bad_request("inventory.uuid is the nil UUID; the machine needs its SMBIOS system UUID"));
    }
    if app.store.get_object::<Partition>(Kind::Partition, &req.partition).await?.is_none() {
        return Err(Error::not_found("partition", &req.partition));
    }
    let sizes: Vec<Size> = app.store.list_objects(Kind::Size).await?;
    let size = policy::match_size(&sizes, &req.inventory);
    let credential = auth::generate("mch");
    let mut row = auth::row(&credential, "machine");
    row.machine = Some(id.to_string());
    row.partition = Some(req.partition.clone());
    row.description = "machine credential".into();
    let reg = crate::store::Registration {
        id,
        partition: &req.partition,
        size: &size,
        inventory: &req.inventory,
        credential: &row,
        token_mac: token_mac.as_deref(),
    };
    app.store.register(&reg).await?;
    if size == UNKNOWN_SIZE {
        tracing::warn!(machine = %id, cores = req.inventory.cores(), memory = req.inventory.memory_bytes, "machine matches no single size");
    }
    tracing::info!(machine = %id, size = %size, partition = %req.partition, "registered");
    Ok(Json(RegisterResponse { machine: id, size, credential }))
}

async fn agent_events(State(app): AppState, p: Principal, Body(batch): Body<EventBatch>) -> Result<StatusCode> {
    let machine = p.require_machine()?;
    if batch.events.len() > 1000 {
        return Err(Error::bad_request("at most 1000 events per batch"));
    }
    let events: Vec<_> = batch.events.into_iter().map(|e| (e.event, e.time_ms, e.message)).collect();
    app.store.record_events(machine, &events).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn wipe_report(State(app): AppState, p: Principal, Body(report): Body<WipeReport>) -> Result<StatusCode> {
    let machine = p.require_machine()?;
    app.store.set_wipe_report(machine, &report).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitQuery {
    /// Seconds to wait for an allocation (default 30, at most 60).
    pub timeout_s: Option<u64>,
}

/// The install instructions of the machine's current allocation, or `None` when it has none or
/// its OS has phoned home already: from then on the allocation's secrets (user data, keys, the
/// phone-home token) are handed to no credential, whenever it was made.
async fn install_instructions(app: &App, machine: MachineId) -> Result<Option<InstallInstructions>> {
    let Some(row) = app.store.machine(machine).await? else {
        return Err(Error::not_found("machine", machine));
    };
    let Some(alloc) = row.allocation else { return Ok(None) };
    if row.allocation_phoned_home {
        return Ok(None);
    }
    let image = app
        .store
        .get_image(&alloc.image)
        .await?
        .ok_or_else(|| Error::Conflict(format!("image {} of allocation {} was deleted", alloc.image, alloc.id)))?;
    let layout: FilesystemLayout = app
        .store
        .get_object(Kind::Layout, &alloc.layout)
        .await?
        .ok_or_else(|| Error::Conflict(format!("layout {} of allocation {} was deleted", alloc.layout, alloc.id)))?;
    let partition: Partition = app
        .store
        .get_object(Kind::Partition, &alloc.partition)
        .await?
        .ok_or_else(|| Error::Conflict(format!("partition {} of allocation {} was deleted", alloc.partition, alloc.id)))?;
    let token = auth::phone_home_token(&app.enrolment_key(), alloc.id);
    let created_ms = crate::parse_rfc3339(&alloc.created_at).unwrap_or_else(now_ms);
    let mut row = auth::row(&token, "phone_home");
    row.machine = Some(machine.to_string());
    row.allocation = Some(alloc.id.to_string());
    row.description = "phone-home token".into();
    row.expires_ms = Some(created_ms + app.config.phone_home_ttl_s as i64 * 1000);
    app.store.issue_phone_home(&row).await?;
    Ok(Some(InstallInstructions {
        allocation: alloc.id,
        hostname: alloc.hostname,
        image,
        layout,
        ssh_keys: alloc.ssh_keys,
        user_data: alloc.user_data,
        phone_home: PhoneHomeConfig {
            url: format!("{}/v1/agent/phone-home", partition.boot.api_url.trim_end_matches('/')),
            token,
            machine,
        },
    }))
}

async fn wait(
    State(app): AppState,
    p: Principal,
    q: std::result::Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response> {
    let machine = p.require_machine()?;
    let Query(q) = q?;
    let timeout = Duration::from_secs(q.timeout_s.unwrap_or(30).min(MAX_WAIT_S));
    let deadline = tokio::time::Instant::now() + timeout;
    // A parked wait is a live machine: beat often enough that it never looks dead meanwhile.
    let beat_every = Duration::from_millis((app.config.dead_after_s * 1000 / 2).max(500));
    app.store.heartbeat(machine).await?;
    let mut next_beat = tokio::time::Instant::now() + beat_every;
    let notify = app.waker.handle(machine);
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(instr) = install_instructions(&app, machine).await? {
            return Ok((StatusCode::OK, Json(instr)).into_response());
        }
        if app.is_stopping() {
            break;
        }
        tokio::select! {
            _ = &mut notified => continue,
            _ = tokio::time::sleep_until(next_beat.min(deadline)) => {
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
                app.store.heartbeat(machine).await?;
                next_beat = tokio::time::Instant::now() + beat_every;
            }
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn install_report(State(app): AppState, p: Principal, Body(report): Body<InstallReport>) -> Result<StatusCode> {
    let machine = p.require_machine()?;
    app.store.install_report(machine, &report).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn phone_home(State(app): AppState, p: Principal, Body(body): Body<PhoneHome>) -> Result<StatusCode> {
    let Principal::PhoneHome { machine, allocation } = p else {
        return Err(Error::Forbidden(
            "phoning home needs the phone-home token from /etc/metal/phone-home.json (InstallInstructions.phone_home)".into(),
        ));
    };
    if body.machine != machine {
        return Err(Error::Forbidden(format!(
            "this phone-home token belongs to machine {machine}, not {}",
            body.machine
        )));
    }
    if !app.store.allocation_active(allocation, machine).await? {
        // A freed allocation's token is deleted with it, so this is a token read before the free
        // committed: refuse and record nothing (the machine may be back in the pool already).
        return Err(Error::Conflict(format!(
            "allocation {allocation} was freed; machine {machine} should be reclaimed (reboot it into metal-hammer)"
        )));
    }
    app.store.phoned_home(machine, allocation, body.time_ms, &body.message).await?;
    tracing::info!(%machine, %allocation, "phoned home");
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Boot (pixie)
// ---------------------------------------------------------------------------------------------

/// Reads only: the partition and pixie's token come from the boot cache (at most
/// `--cache-ttl-ms` old), the machine is one query, and the enrolment token is signed, not stored.
async fn boot_decide(State(app): AppState, p: Principal, Body(req): Body<BootRequest>) -> Result<Json<BootDecision>> {
    p.require_pixie()?;
    let partition = app.store.boot_partition(&req.partition).await?.ok_or_else(|| Error::not_found("partition", &req.partition))?;
    let machine = app.store.boot_machine(req.uuid, &req.mac).await?;
    if let Some((_, true)) = machine {
        return Ok(Json(BootDecision::LocalDisk));
    }
    let claims = enrolment::Claims::new(
        &partition.id,
        Some(normalize_mac(&req.mac)).filter(|m| !m.is_empty()),
        machine.map(|(id, _)| id).or(req.uuid),
        now_ms() + app.config.enrolment_ttl_s as i64 * 1000,
    );
    let token = enrolment::issue(&app.enrolment_key(), &claims);
    let params = HammerParams {
        api_url: partition.boot.api_url.trim_end_matches('/').to_string(),
        enrolment_token: token,
        partition: partition.id.clone(),
        lldp_seconds: 0,
    };
    let params = params.encode().map_err(|e| Error::Internal(format!("partition {}: {e}", partition.id)))?;
    let cmdline = format!("{} {params}", partition.boot.cmdline).trim().to_string();
    Ok(Json(BootDecision::Hammer {
        kernel_url: partition.boot.kernel_url.clone(),
        initrd_url: partition.boot.initrd_url.clone(),
        cmdline,
    }))
}

/// A sighting: pixie saw a PXE request. Recorded for the registered machine that owns the MAC
/// (never creates one), and it moves no machine whose metal-hammer is alive (`fsm` module doc).
async fn pxe_event(State(app): AppState, p: Principal, Body(ev): Body<PxeEvent>) -> Result<StatusCode> {
    p.require_pixie()?;
    if app.store.boot_partition(&ev.partition).await?.is_none() {
        return Err(Error::not_found("partition", &ev.partition));
    }
    let msg = if ev.message.is_empty() { format!("{} from {}", arch_label(ev.arch), ev.mac) } else { ev.message.clone() };
    if app.store.pxe_event(&ev.mac, ev.uuid, &msg).await?.is_none() {
        tracing::debug!(mac = %ev.mac, "PXE event for a MAC no registered machine owns; not recorded");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// How an architecture reads in an event message.
fn arch_label(a: metal_types::Arch) -> &'static str {
    match a {
        metal_types::Arch::BiosX86 => "x86 BIOS",
        metal_types::Arch::UefiX64 => "x86-64 UEFI",
        metal_types::Arch::UefiX64Http => "x86-64 UEFI HTTP",
        metal_types::Arch::UefiArm64 => "ARM64 UEFI",
        metal_types::Arch::Unknown => "unknown architecture",
    }
}
