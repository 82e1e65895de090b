//! Network bring-up: links up, wait for carrier, DHCP on every NIC with carrier until one gets
//! a lease, then address, default route and `/etc/resolv.conf`; then the lease is kept
//! ([`keep_lease`]) on a supervised thread ([`supervise`]): a panic there is logged, marked on
//! the console (`METAL-HAMMER stage=dhcp status=error`) and restarted; when the renewer gives
//! up, the flow's next check ([`LeaseKeeper`]) fails the stage it is in, and metal-hammer
//! reboots into a fresh start rather than wait with an expired lease.

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
    #[error("the DHCP lease on {interface} is no longer renewed ({reason}); restarting metal-hammer to get a fresh one")]
    LeaseLost { interface: String, reason: String },
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
/// over with DISCOVER and applies whatever address comes back. Runs on its own thread, restarted
/// after a panic ([`RENEWER_RESTARTS`]) from the lease it last applied; the returned keeper
/// tells the flow when the lease is no longer kept.
pub fn keep_lease(root: std::path::PathBuf, machine: uuid::Uuid, configured: Configured) -> LeaseKeeper {
    let Configured { interface, lease } = configured;
    let mac =
        inventory::read_nics(&root.join("sys")).into_iter().find(|n| n.name == interface).and_then(|n| dhcp::parse_mac(&n.mac));
    let mut held = (lease, Instant::now());
    let name = interface.clone();
    LeaseKeeper::supervise(interface, RENEWER_RESTARTS, move || {
        let Some(mac) = mac else {
            return Err(format!("cannot renew on {name}: it has no MAC address"));
        };
        renew_forever(&root, &machine, &name, mac, &mut held)
    })
}

/// The renewal loop of [`keep_lease`]. `held` is the lease last applied and when it was
/// obtained; it is updated after every renewal, so a restarted loop goes on from there.
fn renew_forever(
    root: &Path,
    machine: &uuid::Uuid,
    interface: &str,
    mac: [u8; 6],
    held: &mut (Lease, Instant),
) -> Result<std::convert::Infallible, String> {
    loop {
        let (lease, since) = held.clone();
        let expires = since + Duration::from_secs(lease.lease_seconds.into());
        std::thread::sleep((since + renew_after(lease.lease_seconds)).saturating_duration_since(Instant::now()));
        *held = loop {
            let renewed = if Instant::now() < expires {
                dhcp::renew_lease(interface, mac, machine, &lease, Duration::from_secs(10))
            } else {
                dhcp::obtain_lease(interface, mac, machine, Duration::from_secs(10))
            };
            match renewed {
                Ok(new) => {
                    if new.address != lease.address || new.prefix_len != lease.prefix_len || new.router != lease.router {
                        crate::log!("DHCP: {interface} now {}/{}", new.address, new.prefix_len);
                    }
                    match Netlink::open().map_err(NetError::Netlink).and_then(|mut nl| configure(&mut nl, root, interface, &new))
                    {
                        Ok(()) => break (new, Instant::now()),
                        Err(e) => crate::log!("DHCP: {}", crate::console::chain(&e)),
                    }
                }
                Err(e) => crate::log!("DHCP renew: {e}"),
            }
            std::thread::sleep(Duration::from_secs(10));
        };
    }
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

/// How often a panicking task is started again, and the pause before each restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restarts {
    pub max: u32,
    pub delay: Duration,
}

/// What the lease keeper gets: up to 5 restarts, 10 s apart.
pub const RENEWER_RESTARTS: Restarts = Restarts { max: 5, delay: Duration::from_secs(10) };

/// A task on its own thread, watched; see [`supervise`].
pub struct Supervised {
    failed: tokio::sync::watch::Receiver<Option<String>>,
    thread: std::thread::JoinHandle<()>,
}

impl Supervised {
    /// Why the task is no longer running, once it is not: it gave up, it panicked more often
    /// than it may be restarted, or its thread ended some other way.
    pub fn failure(&self) -> Option<String> {
        if let Some(why) = self.failed.borrow().clone() {
            return Some(why);
        }
        self.thread.is_finished().then(|| "its thread ended".to_string())
    }

    /// Waits until the task is no longer running; why ([`Supervised::failure`]).
    pub async fn failed(&self) -> String {
        let mut rx = self.failed.clone();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone(),
            // The supervisor thread is gone without saying why.
            Err(_) => None,
        };
        why.unwrap_or_else(|| "its thread ended".to_string())
    }
}

/// The text of a panic payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "a panic without a message".to_string(),
    }
}

/// Runs `body` on a thread named `stage`, for as long as the process lives. `body` never
/// returns `Ok`; `Err(why)` means it gave up, and it is not started again. When it panics it
/// is started again after `restarts.delay`, at most `restarts.max` times. Every panic is logged
/// and printed as a `METAL-HAMMER stage=<stage> status=error` marker; so is giving up, which
/// the returned handle then reports ([`Supervised::failure`], [`Supervised::failed`]).
pub fn supervise<F>(stage: &'static str, restarts: Restarts, mut body: F) -> Supervised
where
    F: FnMut() -> Result<std::convert::Infallible, String> + Send + 'static,
{
    let (tx, rx) = tokio::sync::watch::channel(None);
    let give_up = move |why: String| {
        crate::log!("{stage}: {why}");
        crate::console::marker(stage, crate::console::Status::Error, &[("error", &why)]);
        tx.send_replace(Some(why));
    };
    let thread = std::thread::Builder::new().name(stage.into()).spawn(move || {
        let mut panics = 0u32;
        loop {
            // The body's state is whatever it last stored; restarting from there is its design.
            let err = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(&mut body)) {
                Ok(Ok(never)) => match never {},
                Ok(Err(why)) => return give_up(why),
                Err(payload) => panic_text(payload.as_ref()),
            };
            panics += 1;
            if panics > restarts.max {
                return give_up(format!("gave up after {panics} panics, the last: {err}"));
            }
            let why = format!("panicked: {err}; restart {panics} of {} in {} s", restarts.max, restarts.delay.as_secs());
            crate::log!("{stage}: {why}");
            crate::console::marker(stage, crate::console::Status::Error, &[("error", &why)]);
            std::thread::sleep(restarts.delay);
        }
    });
    match thread {
        Ok(thread) => Supervised { failed: rx, thread },
        // No thread: report that at once (a thread that has already ended stands in).
        Err(e) => {
            let why = format!("cannot start its thread: {e}");
            crate::log!("{stage}: {why}");
            let (tx, rx) = tokio::sync::watch::channel(Some(why));
            drop(tx);
            Supervised { failed: rx, thread: std::thread::spawn(|| {}) }
        }
    }
}

/// The renewal of the lease of the configured interface, supervised ([`supervise`], stage
/// `dhcp`). The flow asks it at its stages ([`LeaseKeeper::check`], [`LeaseKeeper::lost`]).
pub struct LeaseKeeper {
    pub interface: String,
    task: Supervised,
}

impl LeaseKeeper {
    /// Keeps a lease on `interface` with `body` (the renewal loop; a closure in tests).
    pub fn supervise<F>(interface: String, restarts: Restarts, body: F) -> LeaseKeeper
    where
        F: FnMut() -> Result<std::convert::Infallible, String> + Send + 'static,
    {
        LeaseKeeper { interface, task: supervise("dhcp", restarts, body) }
    }

    /// `Err(LeaseLost)` once the lease is no longer renewed.
    pub fn check(&self) -> Result<(), NetError> {
        match self.task.failure() {
            None => Ok(()),
            Some(reason) => Err(self.lost_because(reason)),
        }
    }

    /// Waits until the lease is no longer renewed.
    pub async fn lost(&self) -> NetError {
        let reason = self.task.failed().await;
        self.lost_because(reason)
    }

    fn lost_because(&self, reason: String) -> NetError {
        NetError::LeaseLost { interface: self.interface.clone(), reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// Polls `cond` for up to 10 s.
    fn eventually(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "never: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[tokio::test]
    async fn a_renewer_that_keeps_panicking_is_restarted_then_reported() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let task = supervise("test-renewer", Restarts { max: 2, delay: Duration::ZERO }, move || {
            c.fetch_add(1, Ordering::SeqCst);
            panic!("injected renewal bug")
        });
        let why = tokio::time::timeout(Duration::from_secs(10), task.failed()).await.expect("the flow notices the dead renewer");
        assert_eq!(calls.load(Ordering::SeqCst), 3, "the first run and two restarts");
        assert!(why.contains("injected renewal bug") && why.contains("after 3 panics"), "{why}");
        assert_eq!(task.failure(), Some(why));
    }

    #[test]
    fn a_renewer_that_recovers_after_a_restart_is_not_a_failure_until_it_stops() {
        let calls = Arc::new(AtomicU32::new(0));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let c = calls.clone();
        let task = supervise("test-renewer", Restarts { max: 5, delay: Duration::ZERO }, move || {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("injected once");
            }
            let _ = released.recv();
            Err("stopped on purpose".into())
        });
        eventually("restarted after the panic", || calls.load(Ordering::SeqCst) == 2);
        assert_eq!(task.failure(), None, "running again after one panic");
        drop(release);
        eventually("a renewer that returns is a failure", || task.failure().is_some());
        assert_eq!(task.failure().as_deref(), Some("stopped on purpose"));
        assert_eq!(calls.load(Ordering::SeqCst), 2, "a renewer that gave up is not restarted");
    }

    #[test]
    fn the_lease_keeper_reports_a_lost_lease_with_its_interface() {
        let keeper = LeaseKeeper::supervise("eth7".into(), Restarts { max: 0, delay: Duration::ZERO }, || panic!("injected"));
        eventually("the keeper fails", || keeper.check().is_err());
        let err = keeper.check().unwrap_err();
        assert!(matches!(&err, NetError::LeaseLost { interface, .. } if interface == "eth7"), "{err:?}");
        assert!(err.to_string().contains("eth7") && err.to_string().contains("injected"), "{err}");
    }

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
