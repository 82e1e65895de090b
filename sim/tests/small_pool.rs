//! metal-sim end to end at a small size: a real metal-api process (the workspace's build), 40
//! simulated machines, 4 tenants allocating and freeing for a few seconds. Every machine must
//! join, allocations must happen and reach `Installing`, and none may be double.

use std::path::PathBuf;
use std::process::Command;

fn api_bin() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    ["debug", "release"]
        .iter()
        .map(|p| target.join(p).join("metal-api"))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
}

#[test]
fn a_small_pool_allocates_without_double_allocations() {
    let api = api_bin();
    if !metal_testkit::require(api.is_some(), "the metal-api binary (cargo build -p metal-api; scripts/test builds it)") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_metal-sim"))
        .arg("--api-bin")
        .arg(api.unwrap())
        .args(["--machines", "40", "--tenants", "4", "--alloc-seconds", "4", "--ingest-seconds", "1", "--wait-s", "5"])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "metal-sim failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["machines"], 40, "{r}");
    assert_eq!(r["double_allocations"], 0, "{r}");
    assert!(r["allocations"].as_u64().unwrap() >= 4, "every tenant allocated at least once: {r}");
    assert!(r["to_installing_p50_ms"].as_f64().unwrap() > 0.0, "allocations reached Installing: {r}");
    assert!(r["heartbeats_per_s"].as_f64().unwrap() > 0.0 && r["events_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["rest_rss_mib"].as_f64().unwrap() > 1.0, "the API's RSS was read: {r}");
    let md = String::from_utf8_lossy(&out.stdout);
    assert!(md.starts_with("| SQLite (1 API) | 40 |"), "{md}");
}
