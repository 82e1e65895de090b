//! Helpers shared by the end-to-end scenarios.
#![allow(dead_code)]

use std::process::Command;

use anyhow::{bail, Context, Result};
use metal_lab::services::{self, PARTITION, PROJECT, SIZE};
use metal_lab::Lab;
use metal_types::Allocation;

pub const SSH_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMetalLabTestKeyOnlyForTheVerifier lab@test";
pub const OLD_DATA: &[u8] = b"TENANT-DATA-THAT-MUST-BE-WIPED";

pub fn metalctl(lab: &Lab, token: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(lab.paths.bin("metalctl"));
    if let Some(ca) = lab.ca_file() {
        cmd.env("METALCTL_CA_FILE", ca);
    }
    let out = cmd.args(["--api-url", &services::api_url(), "--token", token]).args(args).output().context("run metalctl")?;
    if !out.status.success() {
        bail!("metalctl {args:?} failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn user_data(hostname: &str) -> String {
    serde_json::json!({ "expect": { "hostname": hostname, "ssh_key": SSH_KEY, "userdata_marker": "lab-marker-42" } }).to_string()
}

pub async fn allocate(lab: &Lab, hostname: &str, image: &str) -> Result<Allocation> {
    let ud = user_data(hostname);
    let out = metalctl(
        lab,
        &lab.tenant.token,
        &[
            "machine",
            "allocate",
            "--project",
            PROJECT,
            "--partition",
            PARTITION,
            "--size",
            SIZE,
            "--image",
            image,
            "--hostname",
            hostname,
            "--ssh-key",
            SSH_KEY,
            "--user-data",
            &ud,
            "-o",
            "json",
        ],
    )?;
    serde_json::from_str(&out).with_context(|| format!("metalctl allocate printed {out}"))
}
