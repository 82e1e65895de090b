//! Test harness: network namespaces the test creates (and deletes on drop, also on panic),
//! veth pairs and bridges between them, child processes killed on drop, pixie started with a
//! config and waited for by a positive signal (its HTTP `/healthz` from inside the namespace).

#![allow(dead_code)]

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);

/// Root is needed for namespaces: without it a netns test says SKIPPED and returns, or fails
/// in a run that must run everything (`metal_testkit::require`).
pub fn skip_unless_root(test: &str) -> bool {
    !metal_testkit::require(metal_testkit::is_root(), &format!("{test}: needs root to create network namespaces"))
}

pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    if !out.status.success() {
        panic!("{cmd:?} failed: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn ip(args: &str) {
    run(Command::new("ip").args(args.split_whitespace()));
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("px{}-{}-{}", tag, std::process::id() % 100_000, COUNTER.fetch_add(1, Ordering::SeqCst));
        ip(&format!("netns add {name}"));
        let ns = Netns { name };
        ns.ip("link set lo up");
        ns
    }

    pub fn ip(&self, args: &str) {
        ip(&format!("-n {} {args}", self.name));
    }

    /// A command that runs inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it opens live there).
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap();
            // SAFETY: setns on an open namespace fd affects only this thread.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Links namespace `a` (interface `a_if`) and `b` (`b_if`) with a veth pair, created inside the
/// test's own namespaces: it never appears in the host's, and tests running side by side in
/// other processes cannot collide on its names.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    ip(&format!("-n {} link add {a_if} type veth peer name {b_if} netns {}", a.name, b.name));
    a.ip(&format!("link set {a_if} up"));
    b.ip(&format!("link set {b_if} up"));
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Proc {
        let f = File::create(log).unwrap();
        cmd.stdout(f.try_clone().unwrap()).stderr(f).stdin(Stdio::null());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc { child, log: log.to_path_buf(), name: name.to_string() }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stop(&mut self) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `cond` until it holds or `timeout` passes; the panic names what never came.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn pixie_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pixie"))
}

/// Starts pixie in `ns` and waits for its `/healthz`.
pub fn start_pixie(ns: &Netns, dir: &Path, config: &str, tag: &str) -> Proc {
    let conf = dir.join(format!("pixie-{tag}.toml"));
    std::fs::write(&conf, config).unwrap();
    let mut cmd = ns.cmd(pixie_bin());
    cmd.arg("--config").arg(&conf).env("RUST_LOG", "debug,hyper=info,reqwest=info");
    let mut p = Proc::spawn("pixie", cmd, &dir.join(format!("pixie-{tag}.log")));
    let url = format!("http://{SERVER_IP}:8081/healthz");
    wait_until("pixie /healthz", Duration::from_secs(20), || {
        assert!(p.alive(), "pixie exited:\n{}", p.log_text());
        ns.cmd("curl").args(["-sf", "-m", "1", &url]).output().map(|o| o.status.success()).unwrap_or(false)
    });
    p
}

/// A pixie config for server mode on `iface`.
pub fn server_config(iface: &str, dir: &Path, tftp_root: &Path, extra_dhcp: &str) -> String {
    format!(
        r#"partition = "lab"
[api]
url = "http://{SERVER_IP}:8080"
token = "test-token"
timeout_ms = 500
[dhcp]
mode = "server"
interface = "{iface}"
server_ip = "{SERVER_IP}"
lease_file = "{leases}"
{extra_dhcp}
[dhcp.pool]
subnet = "10.99.0.0/24"
start = "10.99.0.100"
end = "10.99.0.199"
router = "{SERVER_IP}"
dns = ["{SERVER_IP}"]
domain = "lab"
lease_time_s = 3600
[tftp]
listen = "{SERVER_IP}:69"
root = "{root}"
[http]
listen = "{SERVER_IP}:8081"
public_url = "http://{SERVER_IP}:8081"
hammer_dir = "{root}"
"#,
        leases = dir.join("leases.json").display(),
        root = tftp_root.display(),
    )
}

/// Writes `n` bytes of deterministic, non-repeating content.
pub fn write_pattern(path: &Path, n: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    let data: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}
