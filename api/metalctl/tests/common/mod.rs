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

use anyhow::{bail, Result};
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

/// One machine on `metal_client::sim::SimAgent`, with pixie's token at hand.
pub struct SimAgent {
    sim: metal_client::sim::SimAgent,
    pixie: metal_client::api::Client,
}

impl SimAgent {
    pub fn id(&self) -> MachineId {
        self.sim.id()
    }

    /// PXE boot through the boot decision (as pixie), then register with the enrolment token
    /// from the command line, report the wipe and `Waiting`.
    pub async fn boot_and_register(api: &Api, pixie_token: &str, n: u8) -> Result<SimAgent> {
        let base = metal_client::api::Client::new(&api.url, None, None)?;
        let pixie = base.with_token(pixie_token);
        let mut sim = metal_client::sim::SimAgent::new(&base, "lab", u32::from(n));
        sim.join_pool(&pixie).await?;
        Ok(SimAgent { sim, pixie })
    }

    pub async fn events(&self, events: &[(ProvisioningEvent, &str)]) -> Result<()> {
        Ok(self.sim.events(events).await?)
    }

    /// What pixie reports when this machine PXE boots.
    pub async fn pxe_boot(&self, _pixie_token: &str) -> Result<()> {
        Ok(self.sim.pxe_event(&self.pixie).await?)
    }

    /// Long-polls until the machine is allocated.
    pub async fn wait(&self, within: Duration) -> Result<InstallInstructions> {
        Ok(self.sim.wait_for_allocation(within).await?)
    }

    /// Installs as metal-hammer would (events + install report), then phones home as the OS.
    pub async fn install_and_phone_home(&self, ins: &InstallInstructions) -> Result<()> {
        let path = "/v1/agent/phone-home";
        if !ins.phone_home.url.ends_with(path) {
            bail!("phone-home URL {} does not end with {path}", ins.phone_home.url);
        }
        Ok(self.sim.install_and_phone_home(ins).await?)
    }
}
