//! The stage sequence of metal-hammer as PID 1 (DESIGN.md flows 2, 4 and 6):
//! boot → modules → network → inventory → register → wipe → wait → install → kexec.
//!
//! Every stage prints `METAL-HAMMER stage=<stage> status=start|ok|error` on the console. The
//! DHCP lease is renewed on a supervised thread from the network stage on; the wipe and wait
//! stages end with an error when it is lost, and the install does not start. Any
//! error ends in [`fatal`]: a `stage=fatal` marker, a `Crashed` event with the error chain
//! when the API knows us, a delay, and a reboot (back to PXE, and a fresh start).

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::time::Duration;

use metal_types::cmdline::{split, HammerParams};
use metal_types::{BootInfo, InstallInstructions, InstallReport, ProvisioningEvent, RegisterRequest, WipeReport};

use crate::api::ApiClient;
use crate::console::{chain, marker, Status};
use crate::sys::Sys;
use crate::{inventory, lldp, modules, net, pid1, wipe};

pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// Settings beyond [`HammerParams`], from the same kernel command line (all optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tunables {
    /// `metal.reboot_delay_s` (default 10): pause between a fatal error and the reboot.
    pub reboot_delay: Duration,
    /// `metal.dhcp_timeout_s` (default 120).
    pub dhcp_timeout: Duration,
    /// `metal.register_timeout_s` (default 60): how long to retry an unreachable API.
    pub register_timeout: Duration,
    /// `metal.wait_timeout_s` (default 30): long-poll timeout per request.
    pub wait_timeout_s: u64,
}

impl Default for Tunables {
    fn default() -> Self {
        Tunables {
            reboot_delay: Duration::from_secs(10),
            dhcp_timeout: Duration::from_secs(120),
            register_timeout: Duration::from_secs(60),
            wait_timeout_s: 30,
        }
    }
}

impl Tunables {
    /// Parses what is there and valid; anything else keeps its default.
    pub fn parse(cmdline: &str) -> Tunables {
        let mut t = Tunables::default();
        for (k, v) in split(cmdline) {
            let Ok(n) = v.parse::<u64>() else { continue };
            match k.as_str() {
                "metal.reboot_delay_s" => t.reboot_delay = Duration::from_secs(n),
                "metal.dhcp_timeout_s" => t.dhcp_timeout = Duration::from_secs(n.max(1)),
                "metal.register_timeout_s" => t.register_timeout = Duration::from_secs(n),
                "metal.wait_timeout_s" => t.wait_timeout_s = n.clamp(1, 300),
                _ => {}
            }
        }
        t
    }
}

/// An error of one stage.
#[derive(Debug, thiserror::Error)]
#[error("stage {stage} failed")]
pub struct StageError {
    pub stage: &'static str,
    #[source]
    pub source: BoxError,
}

fn stage_err(stage: &'static str) -> impl FnOnce(BoxError) -> StageError {
    move |source| StageError { stage, source }
}

/// Runs one stage between its start and ok/error markers.
async fn stage<T, F>(name: &'static str, f: F) -> Result<T, StageError>
where
    F: std::future::Future<Output = Result<T, BoxError>>,
{
    marker(name, Status::Start, &[]);
    match f.await {
        Ok(v) => Ok(v),
        Err(e) => {
            marker(name, Status::Error, &[("error", &chain(e.as_ref()))]);
            Err(stage_err(name)(e))
        }
    }
}

fn blocking_err(e: tokio::task::JoinError) -> BoxError {
    Box::new(std::io::Error::other(format!("stage thread: {e}")))
}

/// Where things live; `/` and its usual paths in production.
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
    pub modules_dir: PathBuf,
    pub mount_root: PathBuf,
    /// PEM bundles trusted for `https://` APIs, each read when it exists ([`crate::tls`]).
    pub ca_files: Vec<PathBuf>,
}

impl Paths {
    pub fn production() -> Paths {
        let release = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
        Paths {
            root: PathBuf::from("/"),
            modules_dir: PathBuf::from("/lib/modules").join(release),
            mount_root: PathBuf::from("/mnt/target"),
            ca_files: crate::tls::Trust::files_under(Path::new("/")),
        }
    }
}

/// The whole life of metal-hammer as PID 1, until kexec. Returns only with an error (and the
/// API client when registration got that far, to report the crash).
pub async fn run<I>(sys: &dyn Sys, paths: &Paths, cmdline: &str, install: I) -> (StageError, Option<ApiClient>)
where
    I: AsyncFnOnce(&dyn Sys, &InstallInstructions, &[PathBuf], &Path) -> Result<BootInfo, BoxError>,
{
    let mut api_slot = None;
    let err = match run_inner(sys, paths, cmdline, install, &mut api_slot).await {
        Ok(never) => match never {},
        Err(e) => e,
    };
    (err, api_slot)
}

async fn run_inner<I>(
    sys: &dyn Sys,
    paths: &Paths,
    cmdline: &str,
    install: I,
    api_slot: &mut Option<ApiClient>,
) -> Result<std::convert::Infallible, StageError>
where
    I: AsyncFnOnce(&dyn Sys, &InstallInstructions, &[PathBuf], &Path) -> Result<BootInfo, BoxError>,
{
    let tun = Tunables::parse(cmdline);
    let params = stage("boot", async {
        pid1::mount_early(sys, &paths.root)?;
        Ok(HammerParams::parse(cmdline)?)
    })
    .await?;
    marker("boot", Status::Ok, &[("api", &params.api_url), ("partition", &params.partition)]);

    // Modules: what the hardware needs, then wait for NICs and disks to show up.
    let summary = stage("modules", async {
        let index = modules::ModuleIndex::load(&paths.modules_dir)?;
        if std::process::id() == 1 {
            if let Err(e) = std::env::current_exe().and_then(|exe| modules::register_as_modprobe(&paths.root, &exe)) {
                crate::log!("cannot register as the kernel's modprobe: {e}");
            }
        }
        let (sys_path, mods) = (paths.root.join("sys"), paths.modules_dir.clone());
        let summary = modules::load_for_hardware(sys, &index, &mods, &sys_path, modules::ALWAYS, 5, Duration::from_millis(300));
        for (m, e) in &summary.failed {
            crate::log!("module {m}: {e}");
        }
        net::wait_for_nics(&sys_path, Duration::from_secs(10));
        net::wait_for_disks(&sys_path, Duration::from_secs(1), Duration::from_secs(10));
        Ok::<_, BoxError>(summary)
    })
    .await?;
    marker(
        "modules",
        Status::Ok,
        &[("loaded", &summary.loaded.len().to_string()), ("failed", &summary.failed.len().to_string())],
    );

    // Network: DHCP needs our UUID (option 97) before the full inventory.
    let sysfs = paths.root.join("sys");
    let (_, product_uuid) = inventory::read_dmi(&sysfs);
    let machine = inventory::machine_id(product_uuid.as_deref(), &inventory::read_nics(&sysfs));
    let root = paths.root.clone();
    let dhcp_timeout = tun.dhcp_timeout;
    let uuid = machine.map(|m| m.0).unwrap_or_default();
    let configured = stage("network", async move {
        tokio::task::spawn_blocking(move || net::bring_up(&root, &uuid, dhcp_timeout))
            .await
            .map_err(blocking_err)?
            .map_err(Into::into)
    })
    .await?;
    marker(
        "network",
        Status::Ok,
        &[
            ("interface", &configured.interface),
            ("address", &format!("{}/{}", configured.lease.address, configured.lease.prefix_len)),
        ],
    );
    let lease = net::keep_lease(paths.root.clone(), uuid, configured.clone());

    // Inventory, with LLDP neighbours heard within metal.lldp seconds.
    let (root, lldp_s) = (paths.root.clone(), params.lldp_seconds);
    let inv = stage("inventory", async move {
        tokio::task::spawn_blocking(move || -> Result<metal_types::Inventory, BoxError> {
            let mut inv = inventory::collect(&root, &[])?;
            if lldp_s > 0 {
                let ifaces: Vec<(String, i32)> =
                    inv.nics.iter().filter_map(|n| Some((n.name.clone(), net::ifindex(&n.name)?))).collect();
                match lldp::listen(&ifaces, Duration::from_secs(lldp_s.into())) {
                    Ok(n) => inv.lldp = n,
                    Err(e) => crate::log!("LLDP: {e}"),
                }
            }
            Ok(inv)
        })
        .await
        .map_err(blocking_err)?
    })
    .await?;
    marker(
        "inventory",
        Status::Ok,
        &[("uuid", &inv.uuid.to_string()), ("disks", &inv.disks.len().to_string()), ("nics", &inv.nics.len().to_string())],
    );

    // Register with the enrolment token; events queue up until we hold the credential.
    let trust = crate::tls::Trust::load(&paths.ca_files).map_err(|e| stage_err("register")(e.into()))?;
    let api = ApiClient::new(&params.api_url, &params.enrolment_token, &trust).map_err(|e| stage_err("register")(e.into()))?;
    let api = &*api_slot.insert(api);
    api.event(ProvisioningEvent::Preparing, format!("metal-hammer {} on {}", env!("CARGO_PKG_VERSION"), configured.interface));
    api.event(ProvisioningEvent::Registering, "");
    let req = RegisterRequest { partition: params.partition.clone(), inventory: inv.clone() };
    let reg = stage("register", async {
        let reg = api.retry("register", tun.register_timeout, Duration::from_secs(5), || api.register(&req)).await?;
        if let Err(e) = api.flush().await {
            crate::log!("events: {} (kept, sent later)", chain(&e));
        }
        Ok::<_, BoxError>(reg)
    })
    .await?;
    marker("register", Status::Ok, &[("machine", &reg.machine.to_string()), ("size", &reg.size)]);

    // Wipe every disk, in parallel.
    let targets: Vec<wipe::WipeTarget> = inv
        .disks
        .iter()
        .map(|d| wipe::WipeTarget { path: PathBuf::from("/dev").join(&d.name), size_bytes: d.size_bytes })
        .collect();
    let wiped = stage("wipe", while_leased(&lease, wipe_blocking(sys, targets))).await?;
    let methods: Vec<String> = wiped.iter().map(|w| format!("{}:{}:{}ms", w.disk, w.method, w.duration_ms)).collect();
    marker("wipe", Status::Ok, &[("disks", &methods.join(","))]);
    let report = WipeReport { disks: wiped };
    api.retry("wipe-report", tun.register_timeout.max(Duration::from_secs(300)), Duration::from_secs(10), || {
        api.wipe_report(&report)
    })
    .await
    .map_err(|e| stage_err("wipe")(e.into()))?;

    // Warm pool: Waiting, then long-poll for an allocation.
    api.event(ProvisioningEvent::Waiting, "");
    let instr = stage(
        "wait",
        while_leased(&lease, async {
            Ok::<_, BoxError>(api.wait_for_instructions(tun.wait_timeout_s, Duration::from_secs(10)).await?)
        }),
    )
    .await?;
    marker("wait", Status::Ok, &[("allocation", &instr.allocation.to_string()), ("image", &instr.image.id)]);

    let disks = inventory::install_targets(&paths.root, &inv.disks);
    lease.check().map_err(|e| stage_err("install")(e.into()))?;
    install_and_boot(sys, api, &instr, &disks, &paths.mount_root, install).await?;
    unreachable!("kexec_reboot returned success")
}

/// Runs `work` unless the DHCP lease is (or gets) lost first: then that is the stage's error,
/// and the flow ends in [`fatal`] (a reboot, a fresh lease) instead of going on without one.
async fn while_leased<T>(
    lease: &net::LeaseKeeper,
    work: impl std::future::Future<Output = Result<T, BoxError>>,
) -> Result<T, BoxError> {
    lease.check()?;
    tokio::select! {
        r = work => r,
        lost = lease.lost() => Err(lost.into()),
    }
}

/// Runs the wipe on a blocking thread. `Sys` is shared by reference, so the thread is scoped
/// by blocking in place (`block_in_place` needs the multi-thread runtime; a current-thread
/// runtime just blocks, which is fine for PID 1).
async fn wipe_blocking(sys: &dyn Sys, targets: Vec<wipe::WipeTarget>) -> Result<Vec<metal_types::DiskWipe>, BoxError> {
    let run = || wipe::wipe_all(sys, &targets);
    let result = match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(run),
        _ => run(),
    };
    Ok(result?)
}

/// Install, report, and kexec into the installed kernel. No kexec unless the install
/// succeeded; a failed install is reported (`success: false`) and returned as an error.
pub async fn install_and_boot<I>(
    sys: &dyn Sys,
    api: &ApiClient,
    instr: &InstallInstructions,
    disks: &[PathBuf],
    mount_root: &Path,
    install: I,
) -> Result<(), StageError>
where
    I: AsyncFnOnce(&dyn Sys, &InstallInstructions, &[PathBuf], &Path) -> Result<BootInfo, BoxError>,
{
    api.event(
        ProvisioningEvent::Installing,
        format!("image {} on {}", instr.image.id, disks.first().map(|d| d.display().to_string()).unwrap_or_default()),
    );
    if let Err(e) = api.flush().await {
        crate::log!("events: {} (kept, sent later)", chain(&e));
    }
    let result = install(sys, instr, disks, mount_root).await;
    let report = match &result {
        Ok(boot) => {
            InstallReport { allocation: instr.allocation, success: true, message: String::new(), boot: Some(boot.clone()) }
        }
        Err(e) => InstallReport { allocation: instr.allocation, success: false, message: chain(e.as_ref()), boot: None },
    };
    let reported =
        api.retry("install-report", Duration::from_secs(60), Duration::from_secs(10), || api.install_report(&report)).await;
    let boot = result.map_err(stage_err("install"))?;
    reported.map_err(|e| stage_err("install")(e.into()))?;

    stage("kexec", async {
        let initrd = (!boot.initrd.is_empty()).then(|| PathBuf::from(&boot.initrd));
        sys.kexec_load(Path::new(&boot.kernel), initrd.as_deref(), &boot.cmdline)?;
        api.event(ProvisioningEvent::BootingNewKernel, format!("{} {}", boot.kernel, boot.cmdline));
        // The install report is in; this event is worth a short wait, not a failed boot.
        if let Err(e) = api.retry("events", Duration::from_secs(30), Duration::from_secs(5), || api.flush()).await {
            crate::log!("booting without reporting it: {}", chain(&e));
        }
        unmount_below(sys, mount_root);
        sys.sync();
        marker("kexec", Status::Ok, &[("kernel", &boot.kernel)]);
        sys.kexec_reboot()?;
        Ok::<_, BoxError>(())
    })
    .await
}

/// Unmounts everything mounted at or below `dir`, deepest first (errors are logged: the
/// filesystems are synced before kexec either way).
fn unmount_below(sys: &dyn Sys, dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut targets: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|t| PathBuf::from(t.replace("\\040", " ")))
        .filter(|t| t.starts_with(dir))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.components().count()));
    for t in targets {
        if let Err(e) = sys.umount(&t) {
            crate::log!("umount {}: {e}", t.display());
        }
    }
}

/// The end of every failure: marker, `Crashed` (when the API knows us), delay, reboot.
/// Returns only when the reboot itself failed (or `sys` only records).
pub async fn fatal(sys: &dyn Sys, api: Option<&ApiClient>, err: &(dyn StdError + 'static), delay: Duration) {
    let msg = chain(err);
    marker("fatal", Status::Error, &[("error", &msg)]);
    crate::log!("fatal: {msg}; rebooting in {} s", delay.as_secs());
    if let Some(api) = api.filter(|a| a.is_registered()) {
        api.event(ProvisioningEvent::Crashed, msg.clone());
        match tokio::time::timeout(Duration::from_secs(10), api.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => crate::log!("could not report the crash: {}", chain(&e)),
            Err(_) => crate::log!("could not report the crash: API timed out"),
        }
    }
    tokio::time::sleep(delay).await;
    sys.sync();
    if let Err(e) = sys.reboot() {
        crate::log!("reboot failed: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, RecordingSys};
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use metal_types::{EventBatch, RegisterResponse};
    use std::sync::{Arc, Mutex};

    /// What the fake API saw, in order.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl Seen {
        fn push(&self, s: String) {
            self.0.lock().unwrap().push(s);
        }
        fn all(&self) -> Vec<String> {
            self.0.lock().unwrap().clone()
        }
    }

    pub fn instructions() -> InstallInstructions {
        serde_json::from_value(serde_json::json!({
            "allocation": "00000000-0000-4000-8000-000000000001",
            "hostname": "web-1",
            "image": {
                "url": "http://10.99.0.1:8081/images/test-os-1.tar.zst",
                "id": "test-os-1", "name": "test-os", "version": "1", "format": "tar.zst",
                "compressed_size": 1, "uncompressed_size": 1, "sha256": "00", "kernel": "boot/vmlinuz"
            },
            "layout": { "id": "simple", "disks": [], "filesystems": [] },
            "phone_home": { "url": "http://x/v1/agent/phone-home", "token": "t", "machine": "00000000-0000-4000-8000-000000000002" }
        }))
        .unwrap()
    }

    /// Serves the agent routes on 127.0.0.1:<random>; `wait` answers 204 `empty_waits` times,
    /// then 200 with [`instructions`].
    async fn fake_api(seen: Seen, empty_waits: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        serve_fake_api(listener, seen, empty_waits)
    }

    fn serve_fake_api(listener: tokio::net::TcpListener, seen: Seen, empty_waits: usize) -> String {
        let waits = Arc::new(Mutex::new(0usize));
        let app = Router::new()
            .route(
                "/v1/agent/register",
                post(|State(seen): State<Seen>, Json(req): Json<RegisterRequest>| async move {
                    seen.push(format!("register {}", req.partition));
                    Json(RegisterResponse { machine: req.inventory.uuid, size: "small".into(), credential: "cred-1".into() })
                }),
            )
            .route(
                "/v1/agent/events",
                post(|State(seen): State<Seen>, headers: axum::http::HeaderMap, Json(b): Json<EventBatch>| async move {
                    assert_eq!(headers["authorization"], "Bearer cred-1");
                    for e in b.events {
                        seen.push(format!("event {}", e.event));
                    }
                    StatusCode::NO_CONTENT
                }),
            )
            .route(
                "/v1/agent/install-report",
                post(|State(seen): State<Seen>, Json(r): Json<InstallReport>| async move {
                    seen.push(format!("install-report success={}", r.success));
                    StatusCode::NO_CONTENT
                }),
            )
            .route(
                "/v1/agent/wait",
                get(move |State(seen): State<Seen>| {
                    let waits = waits.clone();
                    async move {
                        let n = {
                            let mut w = waits.lock().unwrap();
                            *w += 1;
                            *w
                        };
                        seen.push("wait".into());
                        if n <= empty_waits {
                            Err(StatusCode::NO_CONTENT)
                        } else {
                            Ok(Json(instructions()))
                        }
                    }
                }),
            )
            .with_state(seen);
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    async fn registered(url: &str) -> ApiClient {
        let api = ApiClient::new(url, "enrol", &crate::tls::Trust::default()).unwrap();
        let inv = metal_types::Inventory::default();
        api.register(&RegisterRequest { partition: "lab".into(), inventory: inv }).await.unwrap();
        api
    }

    fn boot_info() -> BootInfo {
        BootInfo {
            root_uuid: "u".into(),
            kernel: "/mnt/target/boot/vmlinuz".into(),
            initrd: "/mnt/target/boot/initrd.img".into(),
            cmdline: "root=UUID=u console=ttyS0".into(),
        }
    }

    #[tokio::test]
    async fn failed_install_is_reported_and_never_kexecs() {
        let seen = Seen::default();
        let api = registered(&fake_api(seen.clone(), 0).await).await;
        let sys = RecordingSys::new();
        let err = install_and_boot(
            &sys,
            &api,
            &instructions(),
            &[PathBuf::from("/dev/vda")],
            Path::new("/mnt/target"),
            async |_: &dyn Sys, _: &InstallInstructions, _: &[PathBuf], _: &Path| -> Result<BootInfo, BoxError> {
                Err("checksum mismatch".into())
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.stage, "install");
        assert!(!sys.calls().iter().any(|c| matches!(c, Call::KexecLoad { .. } | Call::KexecReboot)), "{:?}", sys.calls());
        assert_eq!(seen.all(), vec!["register lab", "event Installing", "install-report success=false"]);
    }

    #[tokio::test]
    async fn successful_install_reports_then_kexecs_in_order() {
        let seen = Seen::default();
        let api = registered(&fake_api(seen.clone(), 0).await).await;
        let sys = RecordingSys::new();
        install_and_boot(
            &sys,
            &api,
            &instructions(),
            &[PathBuf::from("/dev/vda")],
            Path::new("/nonexistent-mount-root"),
            async |_: &dyn Sys, _: &InstallInstructions, _: &[PathBuf], _: &Path| -> Result<BootInfo, BoxError> {
                Ok(boot_info())
            },
        )
        .await
        .unwrap();
        assert_eq!(
            sys.calls(),
            vec![
                Call::KexecLoad {
                    kernel: "/mnt/target/boot/vmlinuz".into(),
                    initrd: Some("/mnt/target/boot/initrd.img".into()),
                    cmdline: "root=UUID=u console=ttyS0".into()
                },
                Call::Sync,
                Call::KexecReboot,
            ]
        );
        assert_eq!(
            seen.all(),
            vec!["register lab", "event Installing", "install-report success=true", "event Booting New Kernel"]
        );
    }

    #[tokio::test]
    async fn failed_kexec_load_does_not_reboot_into_it() {
        let seen = Seen::default();
        let api = registered(&fake_api(seen.clone(), 0).await).await;
        let sys = RecordingSys::new();
        sys.fail_when(|c| matches!(c, Call::KexecLoad { .. }));
        let mut b = boot_info();
        b.initrd.clear();
        let err = install_and_boot(
            &sys,
            &api,
            &instructions(),
            &[],
            Path::new("/nonexistent"),
            async move |_: &dyn Sys, _: &InstallInstructions, _: &[PathBuf], _: &Path| -> Result<BootInfo, BoxError> { Ok(b) },
        )
        .await
        .unwrap_err();
        assert_eq!(err.stage, "kexec");
        assert_eq!(
            sys.calls(),
            vec![Call::KexecLoad {
                kernel: "/mnt/target/boot/vmlinuz".into(),
                initrd: None,
                cmdline: "root=UUID=u console=ttyS0".into()
            }]
        );
    }

    #[tokio::test]
    async fn fatal_reports_crashed_then_reboots() {
        let seen = Seen::default();
        let api = registered(&fake_api(seen.clone(), 0).await).await;
        let sys = RecordingSys::new();
        let err = StageError { stage: "wipe", source: "disk vdb: I/O error".into() };
        fatal(&sys, Some(&api), &err, Duration::ZERO).await;
        assert_eq!(seen.all(), vec!["register lab", "event Crashed"]);
        assert_eq!(sys.calls(), vec![Call::Sync, Call::Reboot]);

        // Unregistered (no credential): nothing to report to, still reboots.
        let sys = RecordingSys::new();
        let unregistered = ApiClient::new("http://127.0.0.1:9", "enrol", &crate::tls::Trust::default()).unwrap();
        fatal(&sys, Some(&unregistered), &err, Duration::ZERO).await;
        fatal(&sys, None, &err, Duration::ZERO).await;
        assert_eq!(sys.calls(), vec![Call::Sync, Call::Reboot, Call::Sync, Call::Reboot]);
    }

    #[tokio::test]
    async fn wait_polls_through_204_and_events_flush_first() {
        let seen = Seen::default();
        let api = registered(&fake_api(seen.clone(), 2).await).await;
        api.event(ProvisioningEvent::Waiting, "");
        let instr = api.wait_for_instructions(1, Duration::from_millis(100)).await.unwrap();
        assert_eq!(instr.hostname, "web-1");
        assert_eq!(seen.all(), vec!["register lab", "event Waiting", "wait", "wait", "wait"]);
        assert_eq!(api.pending_events(), 0);
    }

    #[tokio::test]
    async fn wait_reconnects_when_the_api_comes_back_and_delivers_queued_events() {
        let seen = Seen::default();
        let url = fake_api(seen.clone(), 0).await;
        let api = registered(&url).await;
        // Point the registered client at a port with nobody listening, then start the API
        // there a little later: the wait retries with back-off and the queued event goes out.
        let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = spare.local_addr().unwrap();
        drop(spare);
        let moved = api.with_base(format!("http://{addr}"));
        moved.event(ProvisioningEvent::Waiting, "queued while away");
        let seen2 = seen.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            serve_fake_api(listener, seen2, 0);
        });
        let start = std::time::Instant::now();
        let instr = tokio::time::timeout(Duration::from_secs(20), moved.wait_for_instructions(1, Duration::from_millis(400)))
            .await
            .expect("came back")
            .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(1200));
        assert_eq!(instr.hostname, "web-1");
        assert_eq!(seen.all(), vec!["register lab", "event Waiting", "wait"]);
        assert_eq!(moved.pending_events(), 0);
    }

    #[tokio::test]
    async fn events_survive_an_api_outage() {
        // Register against a live API, then point a second client at a dead port: its events
        // stay queued; once "back", everything goes out in order.
        let seen = Seen::default();
        let url = fake_api(seen.clone(), 0).await;
        let api = registered(&url).await;
        let dead = ApiClient::new("http://127.0.0.1:9", "enrol", &crate::tls::Trust::default()).unwrap();
        dead.event(ProvisioningEvent::Preparing, "");
        assert!(dead.flush().await.is_err(), "not registered");
        api.event(ProvisioningEvent::Preparing, "");
        api.event(ProvisioningEvent::Registering, "");
        api.flush().await.unwrap();
        assert_eq!(seen.all(), vec!["register lab", "event Preparing", "event Registering"]);
        assert_eq!(dead.pending_events(), 1);
    }

    async fn never_install(_: &dyn Sys, _: &InstallInstructions, _: &[PathBuf], _: &Path) -> Result<BootInfo, BoxError> {
        panic!("must not get this far")
    }

    fn fake_paths(root: &Path) -> Paths {
        Paths {
            root: root.into(),
            modules_dir: root.join("lib/modules/test"),
            mount_root: root.join("mnt/target"),
            ca_files: vec![root.join("none")],
        }
    }

    #[tokio::test]
    async fn run_without_metal_params_fails_in_boot_after_mounting() {
        let dir = tempfile::tempdir().unwrap();
        let sys = RecordingSys::new();
        let (err, api) = run(&sys, &fake_paths(dir.path()), "console=ttyS0", never_install).await;
        assert_eq!(err.stage, "boot");
        assert!(chain(&err).contains("metal.api"), "{}", chain(&err));
        assert!(api.is_none());
        let calls = sys.calls();
        assert_eq!(calls.len(), 5, "the early mounts, nothing else: {calls:?}");
        assert!(calls.iter().all(|c| matches!(c, Call::Mount { .. })));
    }

    #[tokio::test]
    async fn run_without_module_index_fails_in_modules_and_touches_no_disk() {
        let dir = tempfile::tempdir().unwrap();
        let sys = RecordingSys::new();
        let cmdline = "console=ttyS0 metal.api=http://10.99.0.1:8080 metal.token=t metal.partition=lab";
        let (err, _) = run(&sys, &fake_paths(dir.path()), cmdline, never_install).await;
        assert_eq!(err.stage, "modules");
        assert!(chain(&err).contains("modules.alias"), "{}", chain(&err));
        assert!(!sys.calls().iter().any(|c| matches!(c, Call::Discard { .. } | Call::ZeroRange { .. } | Call::KexecLoad { .. })));
    }

    #[tokio::test]
    async fn a_lost_lease_ends_the_stage_that_waits() {
        let lease = net::LeaseKeeper::supervise("eth0".into(), net::Restarts { max: 1, delay: Duration::ZERO }, || {
            panic!("injected renewer bug")
        });
        let waiting = while_leased(&lease, async { std::future::pending::<Result<(), BoxError>>().await });
        let err =
            tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("the wait notices the lost lease").unwrap_err();
        assert!(err.to_string().contains("lease on eth0") && err.to_string().contains("injected renewer bug"), "{err}");
        // And a stage that starts afterwards fails at once.
        assert!(while_leased(&lease, async { Ok(()) }).await.is_err());

        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let stopped = Mutex::new(stopped);
        let kept = net::LeaseKeeper::supervise("eth0".into(), net::Restarts { max: 1, delay: Duration::ZERO }, move || {
            let _ = stopped.lock().unwrap().recv();
            Err("stopped".into())
        });
        assert_eq!(while_leased(&kept, async { Ok(7) }).await.unwrap(), 7, "a kept lease lets the stage run");
        drop(stop);
    }

    #[test]
    fn tunables_from_cmdline() {
        let t = Tunables::parse("console=ttyS0 metal.reboot_delay_s=3 metal.dhcp_timeout_s=x metal.wait_timeout_s=999");
        assert_eq!(t.reboot_delay, Duration::from_secs(3));
        assert_eq!(t.dhcp_timeout, Tunables::default().dhcp_timeout);
        assert_eq!(t.wait_timeout_s, 300);
    }
}
