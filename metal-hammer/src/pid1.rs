//! Being PID 1: the early mounts, a console on fds 0–2, and reaping orphans.
//!
//! Zombies are reaped by a thread woken by `SIGCHLD` (blocked everywhere, taken with
//! `sigtimedwait`). It only reaps a zombie it has seen on two consecutive passes: a child some
//! thread is waiting for (`std::process::Command`) is reaped by that thread at once, so the
//! reaper never steals an exit status; orphans re-parented to us are collected within a second
//! or two.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use crate::sys::Sys;

const MS_NOSUID: u64 = libc::MS_NOSUID;
const MS_NODEV: u64 = libc::MS_NODEV;
const MS_NOEXEC: u64 = libc::MS_NOEXEC;

/// (source, target, fstype, flags, data), in mount order.
pub const EARLY_MOUNTS: &[(&str, &str, &str, u64, Option<&str>)] = &[
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, Some("mode=0755")),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, Some("mode=0755")),
    ("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, Some("mode=1777")),
];

#[derive(Debug, thiserror::Error)]
#[error("mounting {fstype} on {target}")]
pub struct MountError {
    pub target: String,
    pub fstype: String,
    #[source]
    pub source: std::io::Error,
}

/// Mounts the early filesystems under `root` (`/` as PID 1). Already mounted (`EBUSY`) is fine.
pub fn mount_early(sys: &dyn Sys, root: &Path) -> Result<(), MountError> {
    for (source, target, fstype, flags, data) in EARLY_MOUNTS {
        let path = root.join(target.trim_start_matches('/'));
        let _ = std::fs::create_dir_all(&path);
        match sys.mount(source, &path, fstype, *flags, *data) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(MountError { target: path.display().to_string(), fstype: fstype.to_string(), source: e }),
        }
    }
    Ok(())
}

/// Makes sure fds 0, 1 and 2 are open, on `/dev/console` when they are not (an initramfs
/// without a console node gives init no output at all).
pub fn ensure_console() {
    // SAFETY: fcntl(F_GETFD) only queries.
    let missing = (0..3).any(|fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0);
    if !missing {
        return;
    }
    // SAFETY: open/dup2 on a constant path; fds 0–2 are meant to be replaced.
    unsafe {
        let fd = libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd >= 0 {
            for target in 0..3 {
                libc::dup2(fd, target);
            }
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
}

/// Pids of zombie children of this process, from `/proc`.
fn zombie_children(proc_: &Path) -> HashSet<i32> {
    let me = std::process::id() as i32;
    let mut out = HashSet::new();
    let Ok(entries) = std::fs::read_dir(proc_) else { return out };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        // "pid (comm) S ppid ..." — comm may contain spaces and parentheses: split after the last ')'.
        let Some(after) = stat.rsplit_once(')').map(|(_, a)| a) else { continue };
        let mut f = after.split_whitespace();
        let (state, ppid) = (f.next(), f.next().and_then(|p| p.parse::<i32>().ok()));
        if state == Some("Z") && ppid == Some(me) {
            out.insert(pid);
        }
    }
    out
}

/// Blocks `SIGCHLD` in the calling thread (call before any other thread starts so all inherit
/// it) and starts the reaper thread.
pub fn start_reaper() {
    // SAFETY: sigset manipulation on a local set; pthread_sigmask on the current thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| {
            let mut seen: HashSet<i32> = HashSet::new();
            loop {
                // SAFETY: as above; sigtimedwait with a local set and timeout.
                unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, libc::SIGCHLD);
                    let ts = libc::timespec { tv_sec: 1, tv_nsec: 0 };
                    libc::sigtimedwait(&set, std::ptr::null_mut(), &ts);
                }
                std::thread::sleep(Duration::from_millis(200));
                let now = zombie_children(Path::new("/proc"));
                for pid in now.intersection(&seen) {
                    // SAFETY: waitpid on a specific zombie child, non-blocking.
                    unsafe { libc::waitpid(*pid, std::ptr::null_mut(), libc::WNOHANG) };
                }
                seen = now;
            }
        })
        .expect("spawn reaper thread");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, RecordingSys};

    #[test]
    fn early_mounts_in_order_with_flags() {
        let dir = tempfile::tempdir().unwrap();
        let sys = RecordingSys::new();
        mount_early(&sys, dir.path()).unwrap();
        let calls = sys.calls();
        let targets: Vec<_> = calls
            .iter()
            .map(|c| match c {
                Call::Mount { target, fstype, .. } => {
                    (target.strip_prefix(dir.path()).unwrap().display().to_string(), fstype.clone())
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(
            targets,
            vec![
                ("proc".into(), "proc".into()),
                ("sys".into(), "sysfs".into()),
                ("dev".into(), "devtmpfs".into()),
                ("run".into(), "tmpfs".into()),
                ("tmp".into(), "tmpfs".into())
            ]
        );
        assert!(matches!(&calls[2], Call::Mount { flags, data: Some(d), .. } if *flags == MS_NOSUID && d == "mode=0755"));
        assert!(dir.path().join("dev").is_dir());
    }

    #[test]
    fn busy_is_fine_other_errors_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let sys = RecordingSys::new();
        sys.fail_with(libc::EBUSY, |_| true);
        mount_early(&sys, dir.path()).unwrap();
        let sys = RecordingSys::new();
        sys.fail_when(|c| matches!(c, Call::Mount { fstype, .. } if fstype == "devtmpfs"));
        let err = mount_early(&sys, dir.path()).unwrap_err();
        assert_eq!(err.fstype, "devtmpfs");
        assert_eq!(sys.calls().len(), 3, "stops at the first failure");
    }

    #[test]
    fn finds_zombie_children() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let mut found = false;
        for _ in 0..50 {
            if zombie_children(Path::new("/proc")).contains(&pid) {
                found = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait().unwrap();
        assert!(found, "exited child shows up as a zombie until waited for");
        assert!(!zombie_children(Path::new("/proc")).contains(&pid));
    }
}
