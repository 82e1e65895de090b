//! `image-builder publish` against the real metal-api (SQLite, 127.0.0.1, port 0): the image
//! lands in the catalog with its URL and manifest; a bad token is refused with the API's answer.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use image_builder::{archive, http, publish, testos};
use metal_types::Image;

const ADMIN: &str = "image-builder-test-admin-token-0123456789";

struct Api {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn metal_api_bin() -> PathBuf {
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| common::workspace().join("target"));
    let bin = target.join("debug/metal-api");
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-p", "metal-api", "--bin", "metal-api"])
            .current_dir(common::workspace())
            .status()
            .unwrap();
        assert!(st.success(), "cargo build -p metal-api failed");
    }
    bin
}

fn start_api() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(metal_api_bin())
        .args(["--listen", "127.0.0.1:0", "--admin-token", ADMIN])
        .arg("--db")
        .arg(format!("sqlite://{}", dir.path().join("m.db").display()))
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start metal-api");
    // Owned by `Api` from here on, so a failed start still kills it.
    let mut api = Api { child, url: String::new(), _dir: dir };
    let (tx, rx) = mpsc::channel();
    for s in
        [Box::new(api.child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(api.child.stderr.take().unwrap())]
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("metal-api did not say `listening on`:\n{}", log.join("\n")));
        if let Some(addr) = line.split("listening on ").nth(1) {
            let addr = addr
                .split_whitespace()
                .next()
                .unwrap()
                .trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '.' && c != ':');
            api.url = format!("http://{addr}");
            return api;
        }
        log.push(line);
    }
}

#[test]
fn publish_registers_the_image() {
    let api = start_api();
    let out = tempfile::tempdir().unwrap();
    let opts = testos::TestOsOptions {
        kernel_dir: common::kernel().root,
        phone_home_bin: common::phone_home_bin(),
        out: out.path().to_path_buf(),
        version: "9".into(),
        zstd_level: 3,
        busybox: "/usr/bin/busybox".into(),
    };
    let (file, manifest) = testos::build(&opts).unwrap();
    let manifest_path = file.with_file_name("test-os-9.tar.zst.json");

    let err =
        publish::publish(&manifest_path, "http://10.99.0.1:8081/images", &api.url, "wrong-token", None).unwrap_err().to_string();
    assert!(err.contains("status 401"), "{err}");

    let answer = publish::publish(&manifest_path, "http://10.99.0.1:8081/images/", &api.url, ADMIN, None).unwrap();
    let image: Image = serde_json::from_str(&answer).unwrap();
    assert_eq!(image.id, "test-os-9");
    assert_eq!(image.url, "http://10.99.0.1:8081/images/test-os-9.tar.zst");
    assert_eq!(image.manifest, manifest);

    let (status, body) = http::get(&format!("{}/v1/images/test-os-9", api.url), ADMIN, Duration::from_secs(10)).unwrap();
    assert_eq!(status, 200);
    let stored: Image = serde_json::from_slice(&body).unwrap();
    assert_eq!(stored.manifest.sha256, archive::sha256_file(&file).unwrap());
}
