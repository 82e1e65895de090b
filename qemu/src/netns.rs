//! The lab network: a private network namespace with a bridge for the machines.
//!
//! Tests call [`enter_private_netns`] first thing: the calling thread moves into a new network
//! namespace, and every thread and process it starts afterwards inherits it. The namespace
//! disappears with the last of them, so nothing is left behind even when a test is killed.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::proc::{run, Service};

pub const BRIDGE: &str = "metalbr0";
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const PREFIX_LEN: u8 = 24;
pub const HOST_IP6: &str = "fd00:99::1";

/// Moves the calling thread into a fresh network namespace with only loopback, up.
///
/// Call it before starting any thread that must share the lab network (a tokio runtime, say):
/// threads started earlier stay where they were.
pub fn enter_private_netns() -> Result<()> {
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let err = std::io::Error::last_os_error();
        bail!("unshare(CLONE_NEWNET) failed: {err} (the lab needs root)");
    }
    ip(&["link", "set", "lo", "up"])?;
    Ok(())
}

/// Runs `ip` with the given arguments.
pub fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args)).context("ip (iproute2)")
}

/// Creates the bridge with the lab's IPv4 and IPv6 addresses.
pub fn create_bridge() -> Result<()> {
    ip(&["link", "add", BRIDGE, "type", "bridge", "stp_state", "0", "forward_delay", "0"])?;
    ip(&["addr", "add", &format!("{HOST_IP}/{PREFIX_LEN}"), "dev", BRIDGE])?;
    ip(&["-6", "addr", "add", &format!("{HOST_IP6}/64"), "dev", BRIDGE, "nodad"])?;
    ip(&["link", "set", BRIDGE, "up"])?;
    Ok(())
}

/// Adds a tap device on the bridge for one VM.
pub fn add_tap(name: &str) -> Result<()> {
    ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
    ip(&["link", "set", name, "master", BRIDGE])?;
    ip(&["link", "set", name, "up"])?;
    Ok(())
}

/// Starts radvd on the bridge: iPXE otherwise waits ~13 s for an IPv6 router before it
/// carries on. A data center has a router; the lab has radvd.
pub fn start_radvd(dir: &Path) -> Result<Service> {
    let conf = dir.join("radvd.conf");
    std::fs::write(
        &conf,
        format!(
            "interface {BRIDGE} {{\n  AdvSendAdvert on;\n  MinRtrAdvInterval 3;\n  MaxRtrAdvInterval 4;\n  \
             AdvDefaultLifetime 0;\n  prefix fd00:99::/64 {{ AdvOnLink on; AdvAutonomous on; }};\n}};\n"
        ),
    )?;
    // radvd refuses to run as a router without forwarding; this sysctl is per namespace.
    std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1").context("enable IPv6 forwarding in the lab namespace")?;
    let mut cmd = Command::new("radvd");
    cmd.args(["--nodaemon", "--config"]).arg(&conf).arg("--pidfile").arg(dir.join("radvd.pid"));
    cmd.args(["--logmethod", "stderr"]);
    Service::spawn("radvd", cmd, &dir.join("radvd.log"))
}
