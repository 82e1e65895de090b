//! Test prerequisites that cannot turn into green tests that never ran.
//!
//! A test that needs root, a tool or a database asks [`require`] first. When the prerequisite is
//! missing on a developer's machine the test says `SKIPPED …` and returns; in a run that must run
//! everything — `CI=true` or `METAL_REQUIRE_ALL=1`, both set by `scripts/test` — it fails
//! instead, naming what was missing.

use std::path::Path;

/// Whether this run must run every test (`CI=true` or `METAL_REQUIRE_ALL` set and not `0`).
pub fn require_all() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true") || std::env::var("METAL_REQUIRE_ALL").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `true` when `ok`; otherwise fails the test in a run that must run everything, or prints
/// `SKIPPED: <what>` and returns `false` (the caller returns).
#[track_caller]
pub fn require(ok: bool, what: &str) -> bool {
    if ok {
        return true;
    }
    if require_all() {
        panic!("prerequisite missing: {what} (CI=true or METAL_REQUIRE_ALL is set, so every test must run)");
    }
    eprintln!("SKIPPED: {what}");
    false
}

/// Whether the test runs as root (namespaces, loop devices, mounts).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Whether `program` is on the `PATH`.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| is_executable(&d.join(program))))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_present_prerequisite_passes_and_sh_is_found() {
        assert!(require(true, "nothing"));
        assert!(have("sh"));
        assert!(!have("no-such-program-metal"));
    }

    #[test]
    fn root_is_read_from_proc() {
        let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
        assert_eq!(is_root(), uid == 0);
    }
}
