//! Boot routes for pixie: what a machine boots (`policy::boot` decides), and PXE sightings.

use super::{AppState, Body};
use crate::auth::Principal;
use crate::enrolment;
use crate::error::{Error, Result};
use crate::policy::{self, BootMachine, BootPlan};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use metal_types::cmdline::HammerParams;
use metal_types::*;

/// The MAC of a boot request or PXE event: any common spelling; empty means none was sent.
fn request_mac(mac: &str) -> Result<Option<Mac>> {
    if mac.trim().is_empty() {
        return Ok(None);
    }
    mac.parse().map(Some).map_err(|e: ParseMacError| Error::bad_request(format!("mac: {e}")))
}

/// Reads only: the partition and pixie's token come from the boot cache (at most
/// `--cache-ttl-ms` old), the machine is one query, and the enrolment token is signed, not stored.
pub(super) async fn boot_decide(State(app): AppState, p: Principal, Body(req): Body<BootRequest>) -> Result<Json<BootDecision>> {
    p.require_pixie()?;
    let partition =
        app.store.boot_partition(&req.partition).await?.ok_or_else(|| Error::not_found("partition", &req.partition))?;
    let mac = request_mac(&req.mac)?;
    let machine = app.store.boot_machine(req.uuid, mac).await?.map(|(id, phoned_home)| BootMachine { id, phoned_home });
    let expires_ms = app.now_ms() + app.config.enrolment_ttl_s as i64 * 1000;
    match policy::boot(machine, &partition, mac, req.uuid, expires_ms) {
        BootPlan::LocalDisk => Ok(Json(BootDecision::LocalDisk)),
        BootPlan::Hammer { claims, kernel_url, initrd_url, api_url, cmdline } => {
            let params = HammerParams {
                api_url,
                enrolment_token: enrolment::issue(&app.enrolment_key(), &claims),
                partition: partition.id.clone(),
                lldp_seconds: 0,
            };
            let params = params.encode().map_err(|e| Error::Internal(format!("partition {}: {e}", partition.id)))?;
            Ok(Json(BootDecision::Hammer { kernel_url, initrd_url, cmdline: format!("{cmdline} {params}").trim().to_string() }))
        }
    }
}

/// A sighting: pixie saw a PXE request. Recorded for the registered machine that owns the MAC
/// (never creates one), and it moves no machine whose metal-hammer is alive (`fsm` module doc).
pub(super) async fn pxe_event(State(app): AppState, p: Principal, Body(ev): Body<PxeEvent>) -> Result<StatusCode> {
    p.require_pixie()?;
    if app.store.boot_partition(&ev.partition).await?.is_none() {
        return Err(Error::not_found("partition", &ev.partition));
    }
    let Some(mac) = request_mac(&ev.mac)? else {
        return Err(Error::bad_request("a PXE event needs the MAC of the machine that booted"));
    };
    let msg = if ev.message.is_empty() { format!("{} from {mac}", arch_label(ev.arch)) } else { ev.message.clone() };
    if app.store.pxe_event(mac, ev.uuid, &msg).await?.is_none() {
        tracing::debug!(%mac, "PXE event for a MAC no registered machine owns; not recorded");
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
