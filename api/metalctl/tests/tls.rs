//! metalctl against an HTTPS metal-api with a CA generated per test: trusted through
//! `METALCTL_CA_FILE` or the config file's `ca_file`, refused with a clear error otherwise.

mod common;

use common::{Api, ADMIN_TOKEN};
use metal_client::ca::TestCa;

fn https_api() -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    TestCa::generate("metalctl test CA").unwrap().write_server_files(dir.path(), "api", &["127.0.0.1", "localhost"]).unwrap();
    let (cert, key) = (dir.path().join("api.pem"), dir.path().join("api.key"));
    Api::start_in(dir, &[("METAL_TLS_CERT", cert), ("METAL_TLS_KEY", key)])
}

#[test]
fn trusts_the_api_through_the_ca_file_and_refuses_it_without() {
    let api = https_api();
    assert!(api.url.starts_with("https://"), "{}", api.url);
    let ca = api.dir.path().join("ca.pem");

    let out = api.ctl_command(Some(ADMIN_TOKEN), &["project", "ls"]).env("METALCTL_CA_FILE", &ca).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let config = api.dir.path().join("config.yaml");
    std::fs::write(&config, format!("ca_file: {}\n", ca.display())).unwrap();
    let cfg = config.display().to_string();
    api.ctl(Some(ADMIN_TOKEN), &["--config", &cfg, "project", "ls"]).ok(&["project ls with ca_file"]);

    // The system's trust store does not know the lab CA.
    let out = api.ctl(Some(ADMIN_TOKEN), &["project", "ls"]);
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("TLS to the API failed")
            && out.stderr.contains("METALCTL_CA_FILE")
            && out.stderr.contains("UnknownIssuer"),
        "{}",
        out.stderr
    );

    // A broken bundle is named, not ignored.
    let out = api
        .ctl_command(Some(ADMIN_TOKEN), &["project", "ls"])
        .env("METALCTL_CA_FILE", api.dir.path().join("api.key"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("api.key") && stderr.contains("no certificate"), "{stderr}");
}
