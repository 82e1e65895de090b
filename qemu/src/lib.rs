//! metal-lab: QEMU machines PXE booting from our own services, inside a private network
//! namespace, driven end to end.
//!
//! A [`Lab`] is one namespace with a bridge (`10.99.0.1/24`), radvd, the API (HTTPS with a CA
//! made for this lab, see [`tls`]) and pixie bound to the bridge address, and the catalog a
//! lab needs. [`vm::Vm`]s join it on taps; their
//! serial consoles go to files that tests wait on for markers, and their QEMU monitors are the
//! lab's power control. Everything the lab starts is killed when it is dropped, and the
//! namespace goes with the process; when a test fails, the serial consoles and service logs
//! are printed.
//!
//! Tests must call [`netns::enter_private_netns`] (done by [`Lab::start`]) before any thread
//! that should live in the lab is started, which is why lab tests build their tokio runtime
//! themselves (see [`run_in_lab`]).

pub mod netns;
pub mod proc;
pub mod services;
pub mod tls;
pub mod vm;
pub mod wait;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use metal_types::{Image, TokenRequest, TokenResponse, TokenRole};

pub use services::{ApiClient, Paths};
pub use vm::{DiskBus, DiskSpec, Firmware, Vm, VmSpec};
pub use wait::{Deadline, LogCursor};

use proc::Service;

/// One running lab.
pub struct Lab {
    pub dir: PathBuf,
    pub paths: Paths,
    pub admin: ApiClient,
    pub tenant: ApiClient,
    pub images: Vec<Image>,
    pub pixie_token: String,
    pub admin_token: String,
    /// The lab's CA and the API's certificate; `None` with `METAL_LAB_TLS=0`.
    pub tls: Option<tls::LabTls>,
    /// What pixie serves as `/hammer/*`: the lab's own copy (its initrd carries the lab CA),
    /// or the shared build output without TLS.
    pub hammer_dir: PathBuf,
    pub vms: Vec<Vm>,
    passed: bool,
    api: Option<Service>,
    pixie: Option<Service>,
    radvd: Option<Service>,
    _tmp: Option<tempfile::TempDir>,
}

impl Lab {
    /// Enters a private network namespace and starts everything. `dir` keeps the logs and
    /// disks (a temporary directory when `None`; it is kept when `METAL_LAB_KEEP` is set).
    pub async fn start(dir: Option<&Path>) -> Result<Lab> {
        vm::check_host()?;
        let paths = Paths::discover()?;
        let (tmp, dir) = match dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.to_path_buf())
            }
            None => {
                let t = tempfile::Builder::new().prefix("metal-lab-").tempdir()?;
                let d = t.path().to_path_buf();
                (Some(t), d)
            }
        };
        netns::create_bridge()?;
        let radvd = netns::start_radvd(&dir)?;
        let admin_token = format!("adm_{}", uuid_like());
        let tls = if tls::enabled() { Some(tls::LabTls::generate(&dir)?) } else { None };
        let hammer_dir = match &tls {
            Some(t) => {
                let d = dir.join("hammer");
                tls::lab_hammer_dir(&paths.hammer_dir, &d, &t.ca_pem)
                    .context("build the lab's metal-hammer initrd with the lab CA")?;
                d
            }
            None => paths.hammer_dir.clone(),
        };
        let roots = tls.as_ref().map(tls::LabTls::roots).transpose()?.unwrap_or_default();
        let api = services::start_api(&paths, &dir, &admin_token, tls.as_ref()).await?;
        let admin = ApiClient::new(&services::api_url(), &admin_token, &roots)?;
        let images = services::bootstrap_catalog(&admin, &paths).await.context("bootstrap the lab catalog")?;
        let pixie: TokenResponse = admin
            .create_token(&TokenRequest {
                role: TokenRole::Pixie,
                project: None,
                description: "lab pixie".into(),
                expires_in_s: None,
            })
            .await?;
        let tenant: TokenResponse = admin
            .create_token(&TokenRequest {
                role: TokenRole::Tenant,
                project: Some(services::PROJECT.into()),
                description: "lab tenant".into(),
                expires_in_s: None,
            })
            .await?;
        let pixie_svc = services::start_pixie(&paths, &dir, &pixie.token, tls.as_ref(), &hammer_dir).await?;
        let keep = std::env::var_os("METAL_LAB_KEEP").is_some();
        let tmp = if keep {
            if let Some(t) = tmp {
                let _ = t.keep();
            }
            None
        } else {
            tmp
        };
        Ok(Lab {
            tenant: ApiClient::new(&services::api_url(), &tenant.token, &roots)?,
            dir,
            paths,
            admin,
            images,
            pixie_token: pixie.token,
            admin_token,
            tls,
            hammer_dir,
            vms: Vec::new(),
            passed: false,
            api: Some(api),
            pixie: Some(pixie_svc),
            radvd: Some(radvd),
            _tmp: tmp,
        })
    }

    /// Adds a VM (powered off).
    pub fn add_vm(&mut self, spec: VmSpec) -> Result<usize> {
        let vm = Vm::create(spec, &self.dir)?;
        self.vms.push(vm);
        Ok(self.vms.len() - 1)
    }

    /// The lab CA's file, for clients run by tests (`METALCTL_CA_FILE`); `None` without TLS.
    pub fn ca_file(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca_file.as_path())
    }

    /// The newest image with this name.
    pub fn image(&self, name: &str) -> Option<&Image> {
        self.images.iter().rfind(|i| i.manifest.name == name)
    }

    /// Kills the API (like a crash) and starts it again on the same store.
    pub async fn restart_api(&mut self, crash: bool) -> Result<()> {
        if let Some(mut a) = self.api.take() {
            if crash {
                a.kill();
            } else {
                a.stop(std::time::Duration::from_secs(5));
            }
        }
        self.api = Some(services::start_api(&self.paths, &self.dir, &self.admin_token, self.tls.as_ref()).await?);
        Ok(())
    }

    /// Stops pixie and starts it again.
    pub async fn restart_pixie(&mut self) -> Result<()> {
        if let Some(mut p) = self.pixie.take() {
            p.stop(std::time::Duration::from_secs(5));
        }
        self.pixie =
            Some(services::start_pixie(&self.paths, &self.dir, &self.pixie_token, self.tls.as_ref(), &self.hammer_dir).await?);
        Ok(())
    }

    /// The address pixie leased to `mac`, read from its lease file.
    pub fn lease_ip(&self, mac: &str) -> Option<String> {
        let text = std::fs::read_to_string(self.dir.join("leases.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok().or_else(|| {
            // A journal of JSON lines: the last entry for the MAC wins.
            text.lines()
                .rev()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v.to_string().contains(mac))
        })?;
        find_ip_for_mac(&v, mac)
    }

    /// Marks the scenario as passed; a lab dropped without it prints its failure report.
    pub fn pass(&mut self) {
        self.passed = true;
    }

    /// The serial consoles and service logs, for a failure report.
    pub fn report(&self) -> String {
        let mut s = String::new();
        for vm in &self.vms {
            s.push_str(&format!("\n===== serial console of {} (last 80 lines) =====\n{}\n", vm.spec.name, vm.serial_tail(80)));
        }
        for svc in [&self.api, &self.pixie, &self.radvd].into_iter().flatten() {
            s.push_str(&format!("\n===== {} log (last 60 lines) =====\n{}\n", svc.name, svc.tail(60)));
        }
        s
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.passed {
            eprintln!("{}", self.report());
            eprintln!("lab directory: {}", self.dir.display());
        }
        for vm in &mut self.vms {
            vm.power_off();
        }
    }
}

/// Runs `body` inside a fresh lab namespace on a runtime whose threads all live there.
/// On error the lab's report is printed before the error is returned.
pub fn run_in_lab<T, F, Fut>(body: F) -> Result<T>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    netns::enter_private_netns()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(body())
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut bytes);
    }
    format!("{n:x}{}", bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

fn find_ip_for_mac(v: &serde_json::Value, mac: &str) -> Option<String> {
    match v {
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_ip_for_mac(x, mac)),
        serde_json::Value::Object(o) => {
            if o.values().any(|x| x.as_str().is_some_and(|s| s.eq_ignore_ascii_case(mac))) {
                return o.values().filter_map(|x| x.as_str()).find(|s| s.parse::<std::net::Ipv4Addr>().is_ok()).map(String::from);
            }
            o.values().find_map(|x| find_ip_for_mac(x, mac))
        }
        _ => None,
    }
}
