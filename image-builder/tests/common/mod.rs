//! Shared helpers of the image-builder integration tests: the kernel cache, the static
//! binaries, a cpio extractor, and a QEMU machine whose serial console is read line by line
//! against one deadline.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use image_builder::cpio::Member;
use image_builder::kmod::KernelDir;

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The Debian kernel, extracted by `image-builder kernel` (downloaded on a fresh machine).
pub fn kernel() -> KernelDir {
    static K: OnceLock<KernelDir> = OnceLock::new();
    K.get_or_init(|| {
        let cache = std::env::var("METAL_CACHE").unwrap_or_else(|_| "/var/cache/metal".into());
        image_builder::kernel::ensure(Path::new(&cache), "linux-image-amd64").expect("kernel cache")
    })
    .clone()
}

fn musl_bin(name: &str, env: &str) -> PathBuf {
    if let Ok(p) = std::env::var(env) {
        return PathBuf::from(p);
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace().join("target"));
    let path = target.join("x86_64-unknown-linux-musl/release").join(name);
    if !path.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "metal-hammer", "--release", "--target", "x86_64-unknown-linux-musl", "--bin", name])
            .current_dir(workspace())
            .status()
            .expect("run cargo");
        assert!(status.success(), "building the static {name} failed");
    }
    path
}

/// The static phone-home binary (`METAL_PHONE_HOME_BIN`, or built with cargo).
pub fn phone_home_bin() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| musl_bin("phone-home", "METAL_PHONE_HOME_BIN")).clone()
}

/// What becomes `/init` of the hammer initramfs in tests, and the first line it prints: the
/// real metal-hammer when a static build of it prints stage markers, otherwise phone-home
/// (which shows the kernel ran `/init`).
pub fn hammer_init() -> (PathBuf, &'static str) {
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace().join("target"));
    let hammer = std::env::var("METAL_HAMMER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| target.join("x86_64-unknown-linux-musl/release/metal-hammer"));
    let prints_markers = fs::read(&hammer).map(|b| b.windows(12).any(|w| w == b"METAL-HAMMER")).unwrap_or(false);
    if prints_markers {
        (hammer, "METAL-HAMMER stage=")
    } else {
        (phone_home_bin(), "PHONE-HOME status=")
    }
}

pub fn zstd_decode(path: &Path) -> Vec<u8> {
    zstd::decode_all(fs::File::open(path).unwrap()).unwrap()
}

/// Writes the members of a cpio into `dir` (directories, files, symlinks; nodes skipped).
pub fn extract_cpio(members: &[Member], dir: &Path) {
    for m in members {
        let dest = dir.join(&m.name);
        match m.mode & 0o170000 {
            0o040000 => fs::create_dir_all(&dest).unwrap(),
            0o100000 => {
                fs::write(&dest, &m.data).unwrap();
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&dest, fs::Permissions::from_mode(m.mode & 0o7777)).unwrap();
            }
            0o120000 => std::os::unix::fs::symlink(String::from_utf8(m.data.clone()).unwrap(), &dest).unwrap(),
            _ => {}
        }
    }
}

/// At most this many of our QEMU machines run at once, across test processes (nextest runs
/// each test in its own process): software emulation on two cores slows to a crawl otherwise.
const VM_SLOTS: usize = 2;

fn vm_slot() -> fs::File {
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace().join("target"));
    let open = |i: usize| {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(target.join(format!("image-builder-vm-slot-{i}.lock")))
            .unwrap()
    };
    for i in 0..VM_SLOTS {
        let f = open(i);
        if f.try_lock().is_ok() {
            return f;
        }
    }
    let f = open(0);
    f.lock().unwrap();
    f
}

/// A QEMU machine (TCG) with its serial console on stdout, killed on drop.
pub struct Qemu {
    _slot: fs::File,
    child: Child,
    lines: Receiver<String>,
    pub log: Vec<String>,
}

impl Qemu {
    /// Starts the machine once one of the [`VM_SLOTS`] is free; deadlines start after this.
    pub fn start(args: &[String]) -> Qemu {
        let slot = vm_slot();
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-accel", "tcg", "-m", "1024", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start qemu-system-x86_64 (Debian package qemu-system-x86)");
        let (tx, rx) = mpsc::channel();
        for stream in
            [Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>, Box::new(child.stderr.take().unwrap())]
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                let mut buf = Vec::new();
                while reader.read_until(b'\n', &mut buf).map(|n| n > 0).unwrap_or(false) {
                    let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                    buf.clear();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Qemu { _slot: slot, child, lines: rx, log: Vec::new() }
    }

    /// Reads console lines until one contains `marker`; returns it. Panics with the console log
    /// when `deadline` passes or the machine stops first.
    pub fn wait_for(&mut self, marker: &str, deadline: Instant) -> String {
        self.wait_for_any(&[marker], deadline)
    }

    pub fn wait_for_any(&mut self, markers: &[&str], deadline: Instant) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if markers.iter().any(|m| line.contains(m)) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("timed out waiting for {markers:?}; console:\n{}", self.log.join("\n")),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("machine stopped before {markers:?}; console:\n{}", self.log.join("\n"))
                }
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
