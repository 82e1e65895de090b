//! Harness for metalctl's integration tests: a real `metal-api` on 127.0.0.1 with a SQLite file
//! in a temporary directory, the real `metalctl` binary, and a simulated agent that speaks the
//! agent contract over HTTP the way metal-hammer and the installed OS do.
#![allow(dead_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use metal_types::*;
use serde::de::DeserializeOwned;

pub const ADMIN_TOKEN: &str = "metalctl-test-admin-token-0123456789";

/// `docs/examples/<name>`.
pub fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs/examples")
        .join(name)
        .canonicalize()
        .unwrap_or_else(|e| panic!("docs/examples/{name}: {e}"))
        .display()
        .to_string()
}

/// The `metal-api` binary next to the metalctl under test. CI builds the workspace first
/// (`scripts/build-lab`: `cargo build --workspace --bins`), so it is there and current. When it
/// is missing or older than the API's or the wire types' sources, it is built here with
/// `cargo build -p metal-api` (in CI that would rebuild shared dependencies with another
/// feature set, so only when needed). `METAL_API_BIN` names another binary instead.
/// A server that cannot be built fails the tests; they never skip.
pub fn metal_api_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("METAL_API_BIN") {
            return PathBuf::from(p);
        }
        let dir = Path::new(env!("CARGO_BIN_EXE_metalctl")).parent().expect("bin dir").to_path_buf();
        let bin = dir.join("metal-api");
        if is_fresh(&bin) {
            return bin;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", "metal-api", "--bin", "metal-api"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
        let out = cmd.output().expect("run cargo build -p metal-api");
        assert!(
            out.status.success(),
            "the integration tests need the real API server, and `cargo build -p metal-api` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(bin.exists(), "{} is missing after cargo build -p metal-api", bin.display());
        bin
    })
    .clone()
}

/// Whether `bin` exists and is newer than every source it is built from.
fn is_fresh(bin: &Path) -> bool {
    fn newest(path: &Path) -> Option<std::time::SystemTime> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_dir() {
            return meta.modified().ok();
        }
        std::fs::read_dir(path).ok()?.filter_map(|e| newest(&e.ok()?.path())).max()
    }
    let Some(built) = std::fs::metadata(bin).and_then(|m| m.modified()).ok() else {
        return false;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    ["api/src", "api/migrations", "api/Cargo.toml", "types/src", "types/Cargo.toml", "Cargo.lock"]
        .iter()
        .filter_map(|p| newest(&root.join(p)))
        .all(|changed| changed <= built)
}

/// A running `metal-api`, killed on drop.
pub struct Api {
    child: Child,
    pub url: String,
    pub dir: tempfile::TempDir,
    /// One log per start.
    logs: Vec<PathBuf>,
}

impl Api {
    /// Starts the API on 127.0.0.1:0 and reads the bound address from its `listening on` line.
    pub fn start() -> Api {
        Api::start_in(tempfile::tempdir().expect("tempdir"), &[])
    }

    /// Starts the API in `dir` with more environment (e.g. METAL_TLS_CERT/METAL_TLS_KEY: the
    /// URL is `https://` then).
    pub fn start_in(dir: tempfile::TempDir, env: &[(&str, PathBuf)]) -> Api {
        let log = dir.path().join("metal-api.log");
        let child = spawn_api_with(dir.path(), "127.0.0.1:0", &log, env);
        let mut api = Api { child, url: String::new(), dir, logs: vec![log] };
        let scheme = if env.iter().any(|(k, _)| *k == "METAL_TLS_CERT") { "https" } else { "http" };
        api.url = format!("{scheme}://{}", api.wait_listening());
        api
    }

    /// Kills the API and starts it again on the same address and database.
    pub fn restart(&mut self) {
        self.kill();
        let log = self.dir.path().join(format!("metal-api-{}.log", self.logs.len() + 1));
        let addr = self.url.trim_start_matches("http://").to_string();
        self.child = spawn_api(self.dir.path(), &addr, &log);
        self.logs.push(log);
        let again = self.wait_listening();
        assert_eq!(format!("http://{again}"), self.url, "the restarted API listens elsewhere");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn wait_listening(&mut self) -> SocketAddr {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = read_text(self.logs.last().expect("a log"));
            if let Some(addr) = listening_addr(&text) {
                return addr;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("metal-api exited with {status} before listening; its log:\n{text}");
            }
            if Instant::now() > deadline {
                panic!("metal-api printed no `listening on <addr>` line within 30 s; its log:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every log of this API, oldest first.
    pub fn log_text(&self) -> String {
        self.logs.iter().map(|l| read_text(l)).collect::<Vec<_>>().join("--- restarted ---\n")
    }

    /// Runs metalctl against this API with `token` (none: no token anywhere), in a clean
    /// environment (no METAL_* variables, HOME in the temp dir so no user config is read).
    pub fn ctl(&self, token: Option<&str>, args: &[&str]) -> Run {
        let mut cmd = self.ctl_command(token, args);
        Run::from(cmd.output().expect("run metalctl"))
    }

    pub fn ctl_command(&self, token: Option<&str>, args: &[&str]) -> Command {
        let mut cmd = clean_ctl(self.dir.path());
        cmd.arg("--api-url").arg(&self.url);
        if let Some(t) = token {
            cmd.arg("--token").arg(t);
        }
        cmd.args(args);
        cmd
    }

    pub fn admin(&self, args: &[&str]) -> Run {
        self.ctl(Some(ADMIN_TOKEN), args)
    }

    /// An admin command that must succeed; its stdout.
    pub fn admin_ok(&self, args: &[&str]) -> String {
        self.admin(args).ok(args)
    }

    /// Creates the lab catalog from `docs/examples/`.
    pub fn create_examples(&self) {
        for (kind, file) in [
            ("partition", "partition.yaml"),
            ("size", "size.yaml"),
            ("layout", "layout.yaml"),
            ("project", "project.yaml"),
            ("image", "image.yaml"),
        ] {
            self.admin_ok(&[kind, "create", "-f", &example(file)]);
        }
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- metal-api log ---\n{}", self.log_text());
        }
    }
}

fn spawn_api(dir: &Path, listen: &str, log: &Path) -> Child {
    spawn_api_with(dir, listen, log, &[])
}

fn spawn_api_with(dir: &Path, listen: &str, log: &Path, env: &[(&str, PathBuf)]) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    Command::new(metal_api_bin())
        .envs(env.iter().map(|(k, v)| (*k, v.as_os_str())))
        .arg("--listen")
        .arg(listen)
        .arg("--db")
        .arg(format!("sqlite://{}", dir.join("m.db").display()))
        .arg("--admin-token")
        .arg(ADMIN_TOKEN)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup log"))
        .stderr(out)
        .spawn()
        .expect("spawn metal-api")
}

fn read_text(path: &Path) -> String {
    let mut s = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut s);
    }
    s
}

/// metalctl with a clean environment rooted at `home`.
pub fn clean_ctl(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_metalctl"));
    cmd.env_remove("METAL_API_URL")
        .env_remove("METAL_TOKEN")
        .env_remove("METALCTL_CA_FILE")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", home)
        .stdin(Stdio::null());
    cmd
}

/// Finds `listening on … <ip:port>` in a log, whatever the log format around it.
pub fn listening_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter_map(|l| l.split_once("listening on").map(|(_, rest)| rest))
        .find_map(|rest| rest.split(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':')).find_map(|w| w.parse().ok()))
}

/// What a metalctl run printed and how it ended.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn ok(self, what: &[&str]) -> String {
        assert_eq!(self.code, Some(0), "metalctl {what:?} failed:\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self.stdout
    }

    /// Must fail with `code`; returns stderr.
    pub fn fails(self, code: i32, what: &str) -> String {
        assert_eq!(self.code, Some(code), "{what}: expected exit {code}\nstdout: {}\nstderr: {}", self.stdout, self.stderr);
        self.stderr
    }

    pub fn json<T: DeserializeOwned>(self, what: &[&str]) -> T {
        let out = self.ok(what);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("metalctl {what:?} printed no valid JSON ({e}):\n{out}"))
    }

    pub fn yaml<T: DeserializeOwned>(self, what: &[&str]) -> T {
        let out = self.ok(what);
        serde_yaml::from_str(&out).unwrap_or_else(|e| panic!("metalctl {what:?} printed no valid YAML ({e}):\n{out}"))
    }
}

// ---------------------------------------------------------------------------------------------
// The simulated agent
// ---------------------------------------------------------------------------------------------

pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// A small VM's inventory: 2 cores, 2 GiB, one 10 GiB virtio disk (size `lab-small`).
pub fn inventory(n: u8) -> Inventory {
    Inventory {
        uuid: MachineId(uuid::Uuid::from_u128(0x6b1f2c3d_0000_4000_8000_000000000000 + u128::from(n))),
        cpus: vec![Cpu { model: "QEMU Virtual CPU".into(), cores: 2, threads: 2 }],
        memory_bytes: 2 << 30,
        disks: vec![Disk {
            name: "vda".into(),
            size_bytes: 10 << 30,
            model: "QEMU HARDDISK".into(),
            serial: format!("disk-{n}"),
            wwn: String::new(),
            rotational: false,
            logical_sector_size: 512,
            physical_sector_size: 512,
            bus: "virtio".into(),
        }],
        nics: vec![Nic {
            name: "eth0".into(),
            mac: format!("52:54:00:00:00:{n:02x}"),
            driver: "virtio_net".into(),
            speed_mbps: None,
            carrier: true,
        }],
        dmi: Dmi {
            sys_vendor: "QEMU".into(),
            product_name: "Standard PC (i440FX + PIIX, 1996)".into(),
            product_serial: format!("serial-{n}"),
            ..Default::default()
        },
        lldp: vec![],
    }
}

/// Speaks the agent contract for one machine: pixie's boot decision, register, events, wait,
/// install report, and the installed OS's phone home.
pub struct SimAgent {
    pub api: String,
    pub inventory: Inventory,
    pub credential: String,
    http: reqwest::Client,
}

impl SimAgent {
    pub fn id(&self) -> MachineId {
        self.inventory.uuid
    }

    /// PXE boot through the boot decision (as pixie), then register with the enrolment token
    /// from the command line, report the wipe and `Waiting`.
    pub async fn boot_and_register(api: &Api, pixie_token: &str, n: u8) -> Result<SimAgent> {
        metal_client::tls::install_provider();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        let inventory = inventory(n);
        let mac = inventory.nics[0].mac.clone();
        let pxe = PxeEvent {
            partition: "lab".into(),
            mac: mac.clone(),
            uuid: Some(inventory.uuid),
            arch: Arch::BiosX86,
            message: "simulated PXE boot".into(),
        };
        send(http.post(format!("{}/v1/boot/pxe-event", api.url)).bearer_auth(pixie_token).json(&pxe)).await?;
        let decide = BootRequest { partition: "lab".into(), mac, uuid: Some(inventory.uuid), arch: Arch::BiosX86 };
        let decision: BootDecision =
            json(http.post(format!("{}/v1/boot/decide", api.url)).bearer_auth(pixie_token).json(&decide)).await?;
        let BootDecision::Hammer { cmdline, .. } = decision else { bail!("boot decision {decision:?} is not metal-hammer") };
        let enrolment = cmdline::split(&cmdline)
            .into_iter()
            .find(|(k, _)| k == "metal.token")
            .map(|(_, v)| v)
            .with_context(|| format!("no metal.token in {cmdline}"))?;

        let mut agent = SimAgent { api: api.url.clone(), inventory, credential: String::new(), http };
        let reg = RegisterRequest { partition: "lab".into(), inventory: agent.inventory.clone() };
        let resp: RegisterResponse =
            json(agent.http.post(format!("{}/v1/agent/register", agent.api)).bearer_auth(&enrolment).json(&reg)).await?;
        agent.credential = resp.credential;
        let wipe = WipeReport { disks: vec![DiskWipe { disk: "vda".into(), method: "discard".into(), duration_ms: 12 }] };
        send(agent.post("/v1/agent/wipe-report").json(&wipe)).await?;
        agent.events(&[(ProvisioningEvent::Waiting, "disks wiped, waiting for an allocation")]).await?;
        Ok(agent)
    }

    fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.api)).bearer_auth(&self.credential)
    }

    pub async fn events(&self, events: &[(ProvisioningEvent, &str)]) -> Result<()> {
        let batch = EventBatch {
            events: events
                .iter()
                .map(|(event, message)| EventReport { event: *event, time_ms: now_ms(), message: message.to_string() })
                .collect(),
        };
        send(self.post("/v1/agent/events").json(&batch)).await
    }

    /// What pixie reports when this machine PXE boots.
    pub async fn pxe_boot(&self, pixie_token: &str) -> Result<()> {
        let pxe = PxeEvent {
            partition: "lab".into(),
            mac: self.inventory.nics[0].mac.clone(),
            uuid: Some(self.id()),
            arch: Arch::BiosX86,
            message: "simulated PXE boot".into(),
        };
        let url = format!("{}/v1/boot/pxe-event", self.api);
        send(self.http.post(url).bearer_auth(pixie_token).json(&pxe)).await
    }

    /// Long-polls until the machine is allocated.
    pub async fn wait(&self, within: Duration) -> Result<InstallInstructions> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let resp =
                self.http.get(format!("{}/v1/agent/wait?timeout_s=2", self.api)).bearer_auth(&self.credential).send().await?;
            match resp.status().as_u16() {
                200 => return Ok(resp.json().await?),
                204 => continue,
                s => bail!("wait: HTTP {s}: {}", resp.text().await.unwrap_or_default()),
            }
        }
        bail!("no allocation for machine {} within {within:?}", self.id())
    }

    /// Installs as metal-hammer would (events + install report), then phones home as the OS.
    pub async fn install_and_phone_home(&self, ins: &InstallInstructions) -> Result<()> {
        self.events(&[(ProvisioningEvent::Installing, &format!("image {}", ins.image.id))]).await?;
        let report = InstallReport {
            allocation: ins.allocation,
            success: true,
            message: String::new(),
            boot: Some(BootInfo {
                root_uuid: "0b4e7d1c-9a7e-4a44-a3a0-5b0c8a3f9d11".into(),
                kernel: "/boot/vmlinuz".into(),
                initrd: "/boot/initrd.img".into(),
                cmdline: "console=ttyS0".into(),
            }),
        };
        send(self.post("/v1/agent/install-report").json(&report)).await?;
        self.events(&[(ProvisioningEvent::BootingNewKernel, "kexec")]).await?;
        let ph = PhoneHome { machine: self.id(), time_ms: now_ms(), message: "booted".into() };
        // The URL names the API as the partition's machines reach it (the lab address of the
        // example partition); this test's API listens on loopback, so only the path is used.
        let path = "/v1/agent/phone-home";
        if !ins.phone_home.url.ends_with(path) {
            bail!("phone-home URL {} does not end with {path}", ins.phone_home.url);
        }
        let url = format!("{}{path}", self.api);
        send(self.http.post(url).bearer_auth(&ins.phone_home.token).json(&ph)).await
    }
}

async fn send(req: reqwest::RequestBuilder) -> Result<()> {
    let resp = req.send().await?;
    let status = resp.status();
    if !status.is_success() {
        bail!("HTTP {status}: {}", resp.text().await.unwrap_or_default());
    }
    Ok(())
}

async fn json<T: DeserializeOwned>(req: reqwest::RequestBuilder) -> Result<T> {
    let resp = req.send().await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    if !status.is_success() {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    serde_json::from_slice(&body).with_context(|| format!("decode {}", String::from_utf8_lossy(&body)))
}
