//! The agent contract (metal-hammer with its credential, the installed OS with its phone-home token): register, events, wipe report, wait, install report, phone home.

use super::{AppState, Body};
use crate::auth::{self, Principal};
use crate::error::{Error, Result};
use crate::{enrolment, policy, App, MAX_WAIT_S};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use metal_types::*;
use serde::Deserialize;
use std::time::Duration;

pub(super) async fn register(
    State(app): AppState,
    p: Principal,
    Body(req): Body<RegisterRequest>,
) -> Result<Json<RegisterResponse>> {
    let id = req.inventory.uuid;
    let token_mac = match &p {
        Principal::Admin => None,
        Principal::Enrolment { partition, mac, machine } => {
            let nics = req.inventory.nics.iter().map(|n| n.mac.as_str());
            enrolment::check_binding(partition.as_deref(), *mac, &req.partition, nics)
                .and_then(|()| enrolment::check_machine(*machine, id))
                .map_err(|e| Error::Forbidden(e.to_string()))?;
            *mac
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
    if app.store.get_object::<Partition>(&req.partition).await?.is_none() {
        return Err(Error::not_found("partition", &req.partition));
    }
    let sizes: Vec<Size> = app.store.list_objects().await?;
    let size = policy::match_size(&sizes, &req.inventory);
    let credential = auth::generate(Role::Machine);
    let mut row = auth::row(&credential, Role::Machine);
    row.machine = Some(id.to_string());
    row.partition = Some(req.partition.clone());
    row.description = "machine credential".into();
    let reg = crate::store::Registration {
        id,
        partition: &req.partition,
        size: &size,
        inventory: &req.inventory,
        credential: &row,
        token_mac,
    };
    app.store.register(&reg).await?;
    if size == policy::UNKNOWN_SIZE {
        tracing::warn!(machine = %id, cores = req.inventory.cores(), memory = req.inventory.memory_bytes, "machine matches no single size");
    }
    tracing::info!(machine = %id, size = %size, partition = %req.partition, "registered");
    Ok(Json(RegisterResponse { machine: id, size, credential }))
}

pub(super) async fn agent_events(State(app): AppState, p: Principal, Body(batch): Body<EventBatch>) -> Result<StatusCode> {
    let machine = p.require_machine()?;
    if batch.events.len() > 1000 {
        return Err(Error::bad_request("at most 1000 events per batch"));
    }
    let events: Vec<_> = batch.events.into_iter().map(|e| (e.event, e.time_ms, e.message)).collect();
    app.store.record_events(machine, &events).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn wipe_report(State(app): AppState, p: Principal, Body(report): Body<WipeReport>) -> Result<StatusCode> {
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
pub(super) async fn install_instructions(app: &App, machine: MachineId) -> Result<Option<InstallInstructions>> {
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
        .get_object(&alloc.layout)
        .await?
        .ok_or_else(|| Error::Conflict(format!("layout {} of allocation {} was deleted", alloc.layout, alloc.id)))?;
    let partition: Partition = app
        .store
        .get_object(&alloc.partition)
        .await?
        .ok_or_else(|| Error::Conflict(format!("partition {} of allocation {} was deleted", alloc.partition, alloc.id)))?;
    let token = auth::phone_home_token(&app.enrolment_key(), alloc.id);
    let created_ms = crate::parse_rfc3339(&alloc.created_at).unwrap_or_else(|| app.now_ms());
    let mut row = auth::row(&token, Role::PhoneHome);
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

pub(super) async fn wait(
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

pub(super) async fn install_report(State(app): AppState, p: Principal, Body(report): Body<InstallReport>) -> Result<StatusCode> {
    let machine = p.require_machine()?;
    app.store.install_report(machine, &report).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn phone_home(State(app): AppState, p: Principal, Body(body): Body<PhoneHome>) -> Result<StatusCode> {
    let Principal::PhoneHome { machine, allocation } = p else {
        return Err(Error::Forbidden(
            "phoning home needs the phone-home token from /etc/metal/phone-home.json (InstallInstructions.phone_home)".into(),
        ));
    };
    if body.machine != machine {
        return Err(Error::Forbidden(format!("this phone-home token belongs to machine {machine}, not {}", body.machine)));
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
