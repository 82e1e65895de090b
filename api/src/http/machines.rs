//! Machine and allocation routes for operators and tenants: list and describe machines, their timelines, allocate, free.

use super::{parse_machine, path, AppState, Body};
use crate::allocation::{self, Catalog};
use crate::auth::{Principal, Scope};
use crate::error::{Error, Result};
use crate::store::{AllocOutcome, MachineRow, StoreError};
use crate::{fsm, rfc3339, App};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use metal_types::*;

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
pub(super) async fn visible_machine(app: &App, scope: &Scope, id: &str) -> Result<MachineRow> {
    let id = parse_machine(id)?;
    let row = app.store.machine(id).await?.ok_or_else(|| Error::not_found("machine", id))?;
    if let Scope::Project(p) = scope {
        if row.allocation.as_ref().map(|a| &a.project) != Some(p) {
            return Err(Error::not_found("machine", id));
        }
    }
    Ok(row)
}

pub(super) async fn list_machines(State(app): AppState, p: Principal) -> Result<Json<Vec<Machine>>> {
    let scope = p.scope()?;
    let now = app.now_ms();
    let rows = app.store.machines(scope.project()).await?;
    Ok(Json(rows.into_iter().map(|r| machine_view(&app, r, now)).collect::<Result<_>>()?))
}

pub(super) async fn get_machine(
    State(app): AppState,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Machine>> {
    let scope = p.scope()?;
    let row = visible_machine(&app, &scope, &path(id)?).await?;
    Ok(Json(machine_view(&app, row, app.now_ms())?))
}

pub(super) async fn machine_events(
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

pub(super) async fn free_machine(
    State(app): AppState,
    p: Principal,
    id: std::result::Result<Path<String>, PathRejection>,
) -> Result<Json<Machine>> {
    let scope = p.scope()?;
    let id = parse_machine(&path(id)?)?;
    app.store.free(id, scope.project()).await?;
    let row = app.store.machine(id).await?.ok_or_else(|| Error::not_found("machine", id))?;
    Ok(Json(machine_view(&app, row, app.now_ms())?))
}

/// What the planner needs from the catalog for `req` (read outside the allocation's transaction:
/// the store re-checks what matters inside it).
async fn load_catalog(app: &App, req: &AllocationRequest) -> Result<Catalog> {
    let image = match super::catalog::find_image(app, &req.image).await? {
        Some(image) => {
            let expires = app.store.image_expires_ms(&image.id).await?;
            Some((image, expires))
        }
        None => None,
    };
    let machine = match req.machine {
        Some(m) => app.store.machine(m).await?.map(|r| (r.partition, r.size)),
        None => None,
    };
    let size_exists = match (&req.machine, &req.size) {
        (None, Some(size)) => app.store.get_object::<Size>(size).await?.is_some(),
        _ => false,
    };
    Ok(Catalog {
        project_exists: app.store.get_object::<Project>(&req.project).await?.is_some(),
        partition_exists: app.store.get_object::<Partition>(&req.partition).await?.is_some(),
        image,
        machine,
        size_exists,
        layouts: app.store.list_objects::<FilesystemLayout>().await?,
    })
}

pub(super) async fn allocate(
    State(app): AppState,
    p: Principal,
    Body(req): Body<AllocationRequest>,
) -> Result<(StatusCode, Json<Allocation>)> {
    let scope = p.scope()?;
    if !scope.sees(&req.project) {
        return Err(Error::NotFound(format!(
            "project {} not found (your token belongs to project {})",
            req.project,
            scope.project().unwrap_or_default()
        )));
    }
    let catalog = load_catalog(&app, &req).await?;
    let plan = allocation::resolve(&catalog, &req, app.now_ms())?;
    let outcome = match app.store.allocate(&plan, app.config.dead_after_s as i64 * 1000).await {
        // A tenant learns nothing about a machine it cannot see: why it cannot have it (allocated
        // to another project, crash-looping, …) is for operators. Its own machines it may ask about.
        Err(e @ (StoreError::NoMachine(_) | StoreError::NotFound { .. }))
            if matches!(scope, Scope::Project(_)) && req.machine.is_some() =>
        {
            let m = req.machine.unwrap_or_default();
            let own = app.store.machine(m).await?.and_then(|r| r.allocation).is_some_and(|a| scope.sees(&a.project));
            if own {
                return Err(e.into());
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

pub(super) async fn list_allocations(State(app): AppState, p: Principal) -> Result<Json<Vec<Allocation>>> {
    let scope = p.scope()?;
    Ok(Json(app.store.allocations(scope.project()).await?))
}
