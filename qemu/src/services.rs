//! The lab's services: the API (HTTPS with the lab CA unless `METAL_LAB_TLS=0`) and pixie bound
//! to the bridge address, and the catalog a lab needs (partition, size, layout, project,
//! images, tokens).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use metal_types::*;

use metal_client::tls::Roots;

use crate::netns::HOST_IP;
use crate::proc::Service;
use crate::tls::LabTls;
use crate::wait::{until, Deadline};

pub const API_PORT: u16 = 8080;
pub const PIXIE_HTTP_PORT: u16 = 8081;
pub const PARTITION: &str = "lab";
pub const SIZE: &str = "lab-small";
pub const LAYOUT: &str = "lab-efi-ext4";
pub const PROJECT: &str = "tenant-a";

/// `https://10.99.0.1:8080` (`http://` with `METAL_LAB_TLS=0`).
pub fn api_url() -> String {
    let scheme = if crate::tls::enabled() { "https" } else { "http" };
    format!("{scheme}://{HOST_IP}:{API_PORT}")
}

pub fn pixie_url() -> String {
    format!("http://{HOST_IP}:{PIXIE_HTTP_PORT}")
}

/// Where the workspace's binaries and lab artifacts are.
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
    pub bin_dir: PathBuf,
    pub hammer_dir: PathBuf,
    pub images_dir: PathBuf,
}

impl Paths {
    /// From the workspace layout; `METAL_BIN_DIR` overrides where binaries are looked up
    /// (the demo uses release builds) and `METAL_LAB_ARTIFACTS` where `hammer/` and `images/` are.
    pub fn discover() -> Result<Paths> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace root")?.to_path_buf();
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root.join("target"));
        let bin_dir = std::env::var_os("METAL_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| target.join("debug"));
        let artifacts = std::env::var_os("METAL_LAB_ARTIFACTS").map(PathBuf::from).unwrap_or_else(|| target.join("lab"));
        let p = Paths { root, bin_dir, hammer_dir: artifacts.join("hammer"), images_dir: artifacts.join("images") };
        for bin in ["metal-api", "pixie", "metalctl"] {
            if !p.bin(bin).exists() {
                bail!("{} is missing: build the workspace first (cargo build --workspace)", p.bin(bin).display());
            }
        }
        for f in ["vmlinuz", "initrd.img"] {
            if !p.hammer_dir.join(f).exists() {
                bail!("{} is missing: run scripts/build-lab first", p.hammer_dir.join(f).display());
            }
        }
        Ok(p)
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// Manifests of the images built for the lab, newest version last per name.
    pub fn image_manifests(&self) -> Result<Vec<(PathBuf, ImageManifest)>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.images_dir).with_context(|| format!("read {}", self.images_dir.display()))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "json") {
                let m: ImageManifest =
                    serde_json::from_slice(&std::fs::read(&p)?).with_context(|| format!("parse {}", p.display()))?;
                out.push((p, m));
            }
        }
        out.sort_by(|a, b| (&a.1.name, &a.1.version).cmp(&(&b.1.name, &b.1.version)));
        Ok(out)
    }
}

/// What the lab asks of the API: the typed client (`metal_client::api`, reached through
/// `Deref`) plus waiting for a machine's events.
#[derive(Clone)]
pub struct ApiClient {
    api: metal_client::api::Client,
    /// The token it sends (the lab hands it to metalctl too).
    pub token: String,
}

impl std::ops::Deref for ApiClient {
    type Target = metal_client::api::Client;
    fn deref(&self) -> &Self::Target {
        &self.api
    }
}

impl ApiClient {
    /// `roots`: what an `https://` API must chain to (the lab CA).
    pub fn new(base: &str, token: &str, roots: &Roots) -> Result<ApiClient> {
        let http = metal_client::http::client(&metal_client::http::Options::new(roots.clone()).timeout(Duration::from_secs(90)))?;
        Ok(ApiClient { api: metal_client::api::Client::with_http(base, Some(token.into()), http)?, token: token.into() })
    }

    pub async fn events(&self, id: MachineId) -> Result<Vec<MachineEvent>> {
        Ok(self.api.machine_events(id).await?)
    }

    /// Waits until the machine's timeline holds `event` (at or after index `from`); returns
    /// the index just past it. Fails at once on a `Crashed` at or after `from` unless that is
    /// what is awaited.
    pub async fn wait_event(&self, deadline: &Deadline, id: MachineId, event: ProvisioningEvent, from: usize) -> Result<usize> {
        self.wait_event_inner(deadline, id, event, from, true).await
    }

    /// Like [`ApiClient::wait_event`], but `Crashed` events on the way are expected (a fault
    /// scenario walks through them).
    pub async fn wait_event_past_crashes(
        &self,
        deadline: &Deadline,
        id: MachineId,
        event: ProvisioningEvent,
        from: usize,
    ) -> Result<usize> {
        self.wait_event_inner(deadline, id, event, from, false).await
    }

    async fn wait_event_inner(
        &self,
        deadline: &Deadline,
        id: MachineId,
        event: ProvisioningEvent,
        from: usize,
        fail_on_crash: bool,
    ) -> Result<usize> {
        let r = until(deadline, &format!("event {event:?} of machine {id}"), || async {
            let evs = self.events(id).await.ok()?;
            for (i, e) in evs.iter().enumerate().skip(from) {
                if e.event == event {
                    return Some(Ok(i + 1));
                }
                if fail_on_crash && e.event == ProvisioningEvent::Crashed && event != ProvisioningEvent::Crashed {
                    return Some(Err(e.message.clone()));
                }
            }
            None
        })
        .await?;
        r.map_err(|msg| anyhow::anyhow!("machine {id} reported Crashed while waiting for {event}: {msg}"))
    }
}

/// Starts the API on the bridge address with a SQLite store in `dir`, over HTTPS with the
/// lab's certificate when `tls` is given. The admin token goes in a 0600 file, not on the
/// command line.
pub async fn start_api(paths: &Paths, dir: &Path, admin_token: &str, tls: Option<&LabTls>) -> Result<Service> {
    use std::os::unix::fs::OpenOptionsExt;
    let token_file = dir.join("admin.token");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&token_file)
        .and_then(|mut f| std::io::Write::write_all(&mut f, admin_token.as_bytes()))
        .with_context(|| format!("write {}", token_file.display()))?;
    let mut cmd = Command::new(paths.bin("metal-api"));
    cmd.arg("--listen").arg(format!("{HOST_IP}:{API_PORT}"));
    cmd.arg("--db").arg(format!("sqlite://{}", dir.join("metal.db").display()));
    cmd.arg("--admin-token-file").arg(&token_file);
    if let Some(t) = tls {
        cmd.arg("--tls-cert").arg(&t.cert).arg("--tls-key").arg(&t.key);
    }
    cmd.env("RUST_LOG", "info");
    let svc = Service::spawn("metal-api", cmd, &dir.join("metal-api.log"))?;
    let deadline = Deadline::new("api start", Duration::from_secs(30));
    let roots = tls.map(LabTls::roots).transpose()?.unwrap_or_default();
    let http = metal_client::http::client(&metal_client::http::Options::new(roots).timeout(Duration::from_secs(5)))?;
    until(&deadline, "API /healthz", || async {
        let r = http.get(format!("{}/healthz", api_url())).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await?;
    Ok(svc)
}

/// The pixie configuration for the lab: the API's CA from `tls`, `/hammer/*` from
/// `hammer_dir` (the lab's own initrd when it carries the lab CA).
pub fn pixie_config(paths: &Paths, dir: &Path, pixie_token: &str, tls: Option<&LabTls>, hammer_dir: &Path) -> String {
    let ca = tls.map(|t| format!("ca_file = \"{}\"\n", t.ca_file.display())).unwrap_or_default();
    format!(
        r#"partition = "{PARTITION}"

[api]
url = "{api}"
token = "{pixie_token}"
{ca}

[dhcp]
mode = "server"
interface = "{bridge}"
server_ip = "{HOST_IP}"
lease_file = "{leases}"

[dhcp.pool]
subnet = "10.99.0.0/24"
start = "10.99.0.100"
end = "10.99.0.199"
router = "{HOST_IP}"
dns = ["{HOST_IP}"]
domain = "lab"
lease_time_s = 3600

[tftp]
listen = "{HOST_IP}:69"
root = "/usr/lib/ipxe"
symlink_targets = ["/boot"]

[http]
listen = "{HOST_IP}:{PIXIE_HTTP_PORT}"
public_url = "{pixie}"
hammer_dir = "{hammer}"
images_dir = "{images}"
"#,
        api = api_url(),
        bridge = crate::netns::BRIDGE,
        leases = dir.join("leases.json").display(),
        pixie = pixie_url(),
        hammer = hammer_dir.display(),
        images = paths.images_dir.display(),
    )
}

/// Starts pixie with the lab configuration.
pub async fn start_pixie(
    paths: &Paths,
    dir: &Path,
    pixie_token: &str,
    tls: Option<&LabTls>,
    hammer_dir: &Path,
) -> Result<Service> {
    let conf = dir.join("pixie.toml");
    std::fs::write(&conf, pixie_config(paths, dir, pixie_token, tls, hammer_dir))?;
    let mut cmd = Command::new(paths.bin("pixie"));
    cmd.arg("--config").arg(&conf);
    cmd.env("RUST_LOG", "info");
    let svc = Service::spawn("pixie", cmd, &dir.join("pixie.log"))?;
    let deadline = Deadline::new("pixie start", Duration::from_secs(30));
    let http = metal_client::http::client(&metal_client::http::Options::default().timeout(Duration::from_secs(5)))?;
    until(&deadline, "pixie /healthz", || async {
        let r = http.get(format!("{}/healthz", pixie_url())).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await?;
    Ok(svc)
}

/// The lab's catalog: partition, size, layout, project, and every image built for the lab.
pub async fn bootstrap_catalog(admin: &ApiClient, paths: &Paths) -> Result<Vec<Image>> {
    let partition = Partition {
        id: PARTITION.into(),
        description: "the QEMU lab".into(),
        boot: PartitionBoot {
            kernel_url: format!("{}/hammer/vmlinuz", pixie_url()),
            initrd_url: format!("{}/hammer/initrd.img", pixie_url()),
            cmdline: "console=ttyS0".into(),
            api_url: api_url(),
        },
    };
    admin.create(&partition).await?;
    const GIB: u64 = 1 << 30;
    let size = Size {
        id: SIZE.into(),
        description: "lab VM".into(),
        constraints: vec![
            SizeConstraint { kind: ConstraintKind::Cores, min: 1, max: 64 },
            SizeConstraint { kind: ConstraintKind::Memory, min: GIB / 2, max: 64 * GIB },
            SizeConstraint { kind: ConstraintKind::Storage, min: GIB, max: 1024 * GIB },
        ],
    };
    admin.create(&size).await?;
    let layout = lab_layout();
    admin.create(&layout).await?;
    let project = Project { id: PROJECT.into(), description: "lab tenant".into() };
    admin.create(&project).await?;
    let mut images = Vec::new();
    for (path, manifest) in paths.image_manifests()? {
        let file = path.file_name().unwrap().to_string_lossy().trim_end_matches(".json").to_string();
        let image = Image {
            id: String::new(),
            url: format!("{}/images/{file}", pixie_url()),
            classification: ImageClassification::Supported,
            expires_at: None,
            manifest,
        };
        let (created, _) = admin.create(&image).await?;
        images.push(created);
    }
    Ok(images)
}

/// ESP + ext4 root on the first disk.
pub fn lab_layout() -> FilesystemLayout {
    FilesystemLayout {
        id: LAYOUT.into(),
        description: "ESP and ext4 root on the first disk".into(),
        disks: vec![LayoutDisk {
            device: "first".into(),
            partitions: vec![
                GptPartition { number: 1, label: "efi".into(), size_mib: 64, gpt_type: GptType::Efi },
                GptPartition { number: 2, label: "root".into(), size_mib: 0, gpt_type: GptType::Linux },
            ],
        }],
        filesystems: vec![
            Filesystem {
                source: "first:1".into(),
                kind: FsKind::Vfat,
                mount: Some("/boot/efi".into()),
                label: Some("EFI".into()),
                options: None,
            },
            Filesystem {
                source: "first:2".into(),
                kind: FsKind::Ext4,
                mount: Some("/".into()),
                label: Some("root".into()),
                options: None,
            },
        ],
        sizes: vec![],
        images: vec![],
    }
}
