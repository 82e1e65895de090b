//! Install benchmark driver, used by `scripts/bench-install.sh` (root, loop devices).
//!
//! `install serve FILE` serves FILE over HTTP on 127.0.0.1 (Range and all) and prints its URL;
//! it runs until stdin closes. `install run URL SHA256 SIZE FORMAT DEVICE MOUNT_ROOT` installs
//! the image onto DEVICE with a one-partition ext4 layout, unmounts, syncs and prints
//! `seconds=<s> written=<bytes>`. Without arguments (as `cargo bench` runs it) it does nothing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use metal_hammer::install::{install, testing::ImageServer, Progress};
use metal_hammer::sys::{LinuxSys, Sys};
use metal_types::{
    AllocationId, Filesystem, FilesystemLayout, FsKind, GptPartition, GptType, Image, ImageFormat, ImageManifest,
    InstallInstructions, LayoutDisk, MachineId, PhoneHomeConfig,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    match args.first().map(String::as_str) {
        Some("serve") => serve(Path::new(&args[1])),
        Some("run") => run(&args[1..]),
        Some("unpack") => unpack(Path::new(&args[1]), Path::new(&args[2])),
        Some("fetch") => fetch(&args[1], args[2].parse().expect("size")),
        _ => eprintln!("install bench: driven by scripts/bench-install.sh"),
    }
}

/// Only download + SHA-256 + zstd, into nothing.
fn fetch(url: &str, size: u64) {
    use metal_hammer::install::{
        decode::Decoded,
        fetch::{Download, FetchOptions},
    };
    let start = Instant::now();
    let dl = Download::start(url, size, FetchOptions::default()).expect("start");
    let mut decoded = Decoded::start(dl).expect("zstd");
    let n = std::io::copy(&mut decoded, &mut std::io::sink()).expect("stream");
    let digest = decoded.into_inner().finish().expect("finish");
    println!("seconds={:.3} bytes={n} sha256={}", start.elapsed().as_secs_f64(), hex::encode(digest));
}

/// Only the tar unpacking, from an uncompressed tar in memory, into DIR.
fn unpack(tar: &Path, dir: &Path) {
    let data = std::fs::read(tar).expect("read tar");
    let opts = metal_hammer::install::extract::ExtractOptions { lenient: vec![], same_owner: true };
    let start = Instant::now();
    let stats = metal_hammer::install::extract::unpack(&data[..], dir, &opts, &mut |_| {}).expect("unpack");
    println!("seconds={:.3} files={} bytes={}", start.elapsed().as_secs_f64(), stats.files, stats.bytes);
}

fn serve(file: &Path) {
    let server = ImageServer::start(std::fs::read(file).expect("read image")).expect("start server");
    println!("{}", server.url(&file.file_name().unwrap().to_string_lossy()));
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

fn run(a: &[String]) {
    let [url, sha256, size, format, device, mount_root] = a else {
        panic!("run URL SHA256 SIZE FORMAT DEVICE MOUNT_ROOT");
    };
    let format = if format == "raw.zst" { ImageFormat::RawZst } else { ImageFormat::TarZst };
    let instr = InstallInstructions {
        allocation: AllocationId::new_random(),
        hostname: "bench".into(),
        image: Image {
            id: "bench-1".into(),
            url: url.clone(),
            classification: Default::default(),
            expires_at: None,
            manifest: ImageManifest {
                name: "bench".into(),
                version: "1".into(),
                os: String::new(),
                format,
                compressed_size: size.parse().expect("size"),
                uncompressed_size: 0,
                sha256: sha256.clone(),
                kernel: std::env::var("BENCH_KERNEL").unwrap_or_else(|_| "etc/os-release".into()),
                initrd: String::new(),
                cmdline: String::new(),
                packages: vec![],
            },
        },
        layout: FilesystemLayout {
            id: "bench".into(),
            description: String::new(),
            disks: vec![LayoutDisk {
                device: "first".into(),
                partitions: vec![GptPartition { number: 1, label: "root".into(), size_mib: 0, gpt_type: GptType::Linux }],
            }],
            filesystems: vec![Filesystem {
                source: "first:1".into(),
                kind: FsKind::Ext4,
                mount: Some("/".into()),
                label: None,
                options: None,
            }],
            sizes: vec![],
            images: vec![],
        },
        ssh_keys: vec![],
        user_data: String::new(),
        phone_home: PhoneHomeConfig { url: "http://127.0.0.1:9/".into(), token: "x".into(), machine: MachineId::new_random() },
    };
    let mount_root = PathBuf::from(mount_root);
    let start = Instant::now();
    let mut written = 0;
    let r = install(&LinuxSys, &instr, &[PathBuf::from(device)], &mount_root, &mut |p| match p {
        Progress::Stream(s) => written = s.written,
        Progress::Stage { stage, status, .. } if std::env::var_os("BENCH_STAGES").is_some() => {
            eprintln!("{:8.3}s {} {}", start.elapsed().as_secs_f64(), stage.as_str(), status.as_str())
        }
        _ => {}
    });
    if let Err(e) = r {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        eprintln!("install failed: {msg}");
        std::process::exit(1);
    }
    LinuxSys.umount(&mount_root).expect("umount");
    if std::env::var_os("BENCH_STAGES").is_some() {
        eprintln!("{:8.3}s umount", start.elapsed().as_secs_f64());
    }
    LinuxSys.sync();
    println!("seconds={:.3} written={written}", start.elapsed().as_secs_f64());
}
