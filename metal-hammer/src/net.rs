//! Network bring-up: links up, wait for carrier, DHCP on every NIC with carrier until one gets
//! a lease, then address, default route and `/etc/resolv.conf`.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::dhcp::{self, Lease};
use crate::inventory;
use crate::netlink::Netlink;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink")]
    Netlink(#[source] std::io::Error),
    #[error("no network interfaces found (is the NIC driver loaded?)")]
    NoNics,
    #[error("no DHCP lease on any of {interfaces} within {seconds} s; last error: {last}")]
    NoLease { interfaces: String, seconds: u64, last: String },
    #[error("configuring {interface}")]
    Configure { interface: String, source: std::io::Error },
    #[error("writing {path}")]
    Resolv { path: String, source: std::io::Error },
}

/// The configured interface.
#[derive(Debug, Clone)]
pub struct Configured {
    pub interface: String,
    pub lease: Lease,
}

/// The interface index of `name` in the current network namespace.
pub fn ifindex(name: &str) -> Option<i32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i > 0).then_some(i as i32)
}

/// `/etc/resolv.conf` content for a lease.
pub fn resolv_conf(lease: &Lease) -> String {
    let mut s = String::new();
    if let Some(d) = &lease.domain {
        s.push_str(&format!("search {d}\n"));
    }
    for ns in &lease.dns {
        s.push_str(&format!("nameserver {ns}\n"));
    }
    s
}

/// Waits until at least one NIC appears in `/sys/class/net` (drivers probe asynchronously).
pub fn wait_for_nics(sysfs: &Path, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    loop {
        let n = inventory::read_nics(sysfs).len();
        if n > 0 || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the set of disks in `<sysfs>/block` has not changed for `settle` (NVMe and
/// SCSI probe asynchronously, after their module loaded), at most `timeout`. Returns the count.
pub fn wait_for_disks(sysfs: &Path, settle: Duration, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let list = || inventory::read_disks(sysfs, &[]).into_iter().map(|d| d.name).collect::<Vec<_>>();
    let mut last = list();
    let mut stable_since = Instant::now();
    loop {
        let now = Instant::now();
        if (!last.is_empty() && now.duration_since(stable_since) >= settle) || now >= deadline {
            return last.len();
        }
        std::thread::sleep(Duration::from_millis(100));
        let cur = list();
        if cur != last {
            last = cur;
            stable_since = Instant::now();
        }
    }
}

/// Brings every physical NIC up and configures the first one that gets a DHCP lease.
pub fn bring_up(root: &Path, machine: &uuid::Uuid, timeout: Duration) -> Result<Configured, NetError> {
    let sysfs = root.join("sys");
    let mut nl = Netlink::open().map_err(NetError::Netlink)?;
    if let Some(lo) = ifindex("lo") {
        nl.link_up(lo).map_err(NetError::Netlink)?;
    }
    let nics = inventory::read_nics(&sysfs);
    if nics.is_empty() {
        return Err(NetError::NoNics);
    }
    for nic in &nics {
        if let Some(i) = ifindex(&nic.name) {
            if let Err(e) = nl.link_up(i) {
                crate::log!("cannot bring {} up: {e}", nic.name);
            }
        }
    }
    let start = Instant::now();
    let deadline = start + timeout;
    // Carrier needs a moment after link up; take whichever NICs have it after up to 10 s.
    let carrier_deadline = (start + Duration::from_secs(10)).min(deadline);
    let mut with_carrier;
    loop {
        with_carrier = inventory::read_nics(&sysfs).into_iter().filter(|n| n.carrier).collect::<Vec<_>>();
        if !with_carrier.is_empty() || Instant::now() >= carrier_deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let candidates = if with_carrier.is_empty() { inventory::read_nics(&sysfs) } else { with_carrier };
    let names: Vec<String> = candidates.iter().map(|n| n.name.clone()).collect();
    crate::log!("DHCP on {}", names.join(", "));
    let mut last = String::from("none tried");
    let mut per_try = Duration::from_secs(3);
    while Instant::now() < deadline {
        for nic in &candidates {
            let Some(mac) = dhcp::parse_mac(&nic.mac) else { continue };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match dhcp::obtain_lease(&nic.name, mac, machine, per_try.min(left)) {
                Ok(lease) => {
                    configure(&mut nl, root, &nic.name, &lease)?;
                    return Ok(Configured { interface: nic.name.clone(), lease });
                }
                Err(e) => {
                    crate::log!("{e}");
                    last = e.to_string();
                }
            }
        }
        per_try = (per_try * 2).min(Duration::from_secs(16));
    }
    Err(NetError::NoLease { interfaces: names.join(","), seconds: timeout.as_secs(), last })
}

/// When to renew: half the lease, at least 10 s, at most a day.
pub fn renew_after(lease_seconds: u32) -> Duration {
    Duration::from_secs(u64::from(lease_seconds / 2).clamp(10, 86_400))
}

/// Keeps the lease for as long as the process lives (a machine can wait in the warm pool for
/// days): renews at half the lease time; when renewing fails until the lease ran out, starts
/// over with DISCOVER and applies whatever address comes back. Runs on its own thread.
pub fn keep_lease(root: std::path::PathBuf, machine: uuid::Uuid, configured: Configured) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("dhcp".into())
        .spawn(move || {
            let Configured { interface, mut lease } = configured;
            let mac = inventory::read_nics(&root.join("sys")).into_iter().find(|n| n.name == interface).and_then(|n| dhcp::parse_mac(&n.mac));
            let Some(mac) = mac else {
                crate::log!("DHCP: cannot renew on {interface}: no MAC address");
                return;
            };
            loop {
                let expires = Instant::now() + Duration::from_secs(lease.lease_seconds.into());
                std::thread::sleep(renew_after(lease.lease_seconds));
                lease = loop {
                    let renewed = if Instant::now() < expires {
                        dhcp::renew_lease(&interface, mac, &machine, &lease, Duration::from_secs(10))
                    } else {
                        dhcp::obtain_lease(&interface, mac, &machine, Duration::from_secs(10))
                    };
                    match renewed {
                        Ok(new) => {
                            if new.address != lease.address || new.prefix_len != lease.prefix_len || new.router != lease.router {
                                crate::log!("DHCP: {interface} now {}/{}", new.address, new.prefix_len);
                            }
                            match Netlink::open().map_err(NetError::Netlink).and_then(|mut nl| configure(&mut nl, &root, &interface, &new)) {
                                Ok(()) => break new,
                                Err(e) => crate::log!("DHCP: {}", crate::console::chain(&e)),
                            }
                        }
                        Err(e) => crate::log!("DHCP renew: {e}"),
                    }
                    std::thread::sleep(Duration::from_secs(10));
                };
            }
        })
        .expect("spawn dhcp thread")
}

/// Puts a lease on `interface`: address, default route, `<root>/etc/resolv.conf`.
pub fn configure(nl: &mut Netlink, root: &Path, interface: &str, lease: &Lease) -> Result<(), NetError> {
    let err = |source| NetError::Configure { interface: interface.to_string(), source };
    let index = ifindex(interface).ok_or_else(|| err(std::io::Error::other("interface vanished")))?;
    nl.add_address(index, lease.address, lease.prefix_len).map_err(err)?;
    if let Some(gw) = lease.router {
        nl.add_default_route(index, gw).map_err(err)?;
    }
    let etc = root.join("etc");
    let path = etc.join("resolv.conf");
    std::fs::create_dir_all(&etc)
        .and_then(|_| std::fs::write(&path, resolv_conf(lease)))
        .map_err(|source| NetError::Resolv { path: path.display().to_string(), source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn waits_for_a_late_disk_and_for_the_list_to_settle() {
        let dir = tempfile::tempdir().unwrap();
        let sysfs = dir.path().to_path_buf();
        std::fs::create_dir_all(sysfs.join("block/vda")).unwrap();
        std::fs::write(sysfs.join("block/vda/size"), "8\n").unwrap();
        let late = sysfs.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::create_dir_all(late.join("block/nvme0n1")).unwrap();
            std::fs::write(late.join("block/nvme0n1/size"), "8\n").unwrap();
        });
        let start = Instant::now();
        assert_eq!(wait_for_disks(&sysfs, Duration::from_millis(600), Duration::from_secs(5)), 2);
        assert!(start.elapsed() >= Duration::from_millis(800), "settled after the late disk");
        t.join().unwrap();
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(wait_for_disks(empty.path(), Duration::from_millis(100), Duration::from_millis(300)), 0);
    }

    #[test]
    fn renews_at_half_the_lease() {
        assert_eq!(renew_after(3600), Duration::from_secs(1800));
        assert_eq!(renew_after(4), Duration::from_secs(10));
        assert_eq!(renew_after(u32::MAX), Duration::from_secs(86_400));
    }

    #[test]
    fn resolv_conf_lists_search_and_servers() {
        let lease = Lease {
            address: Ipv4Addr::new(10, 99, 0, 150),
            prefix_len: 24,
            router: None,
            dns: vec![Ipv4Addr::new(10, 99, 0, 1)],
            domain: Some("lab".into()),
            server: Ipv4Addr::new(10, 99, 0, 1),
            lease_seconds: 60,
        };
        assert_eq!(resolv_conf(&lease), "search lab\nnameserver 10.99.0.1\n");
    }
}
