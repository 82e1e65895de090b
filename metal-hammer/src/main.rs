//! `metal-hammer`: PID 1 of the metal-hammer initramfs, and a few subcommands for tests and
//! for looking at a live system.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};
use metal_hammer::flow::{self, BoxError, Paths};
use metal_hammer::install::{InstallOptions, Progress, Stage, StageStatus};
use metal_hammer::sys::{LinuxSys, Sys};
use metal_hammer::{console, destructive_allowed, inventory, lldp, net, wipe};
use metal_types::{BootInfo, InstallInstructions};

#[derive(Parser)]
#[command(
    name = "metal-hammer",
    version,
    about = "The in-machine agent of the bare-metal cloud. With no subcommand, as PID 1: the whole provisioning flow."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the hardware inventory as JSON. Reads only; touches nothing.
    Inventory {
        /// Root of the /proc and /sys tree to read.
        #[arg(long, default_value = "/")]
        root: PathBuf,
        /// Listen this many seconds for LLDP neighbours (needs root).
        #[arg(long, default_value_t = 0)]
        lldp: u64,
    },
    /// Wipe the named devices (loop devices in tests) and print the wipe report as JSON.
    Wipe {
        /// Block device or image file to wipe; repeat for several.
        #[arg(long = "device", required = true)]
        devices: Vec<PathBuf>,
    },
    /// Install from an instructions file onto the named devices (layout disk `first` is the
    /// first --device) and print the boot info as JSON. Does not kexec.
    Install {
        #[arg(long)]
        instructions: PathBuf,
        #[arg(long = "device", required = true)]
        devices: Vec<PathBuf>,
        /// Where the target filesystems are mounted while installing.
        #[arg(long, default_value = "/mnt/target")]
        mount_root: PathBuf,
    },
}

/// The install step: [`metal_hammer::install::install_with`] on a blocking thread, its stage
/// progress printed as console markers. Image URLs are verified against what metal-hammer
/// trusts for the API, and that goes into the installed OS for phone-home.
async fn run_install(
    sys: &dyn Sys,
    instr: &InstallInstructions,
    disks: &[PathBuf],
    mount_root: &Path,
) -> Result<BootInfo, BoxError> {
    let trust = metal_hammer::tls::Trust::load(&Paths::production().ca_files)?;
    let mut opts = InstallOptions { ca_pem: Some(trust.pem), ..Default::default() };
    opts.fetch.roots = metal_client::tls::Roots::Only(trust.certs);
    let work = || {
        let started = std::time::Instant::now();
        let watch = metal_hammer::memwatch::Watch::start(Path::new("/proc"), Duration::from_millis(100));
        let mut last_log = std::time::Instant::now();
        let mut stream_started = None;
        let mut stream_ms = 0u128;
        let mut progress = |p: Progress| match p {
            Progress::Stage { stage, status, detail } => {
                if stage == Stage::Stream {
                    match status {
                        StageStatus::Start => stream_started = Some(std::time::Instant::now()),
                        _ => stream_ms = stream_started.map_or(0, |t| t.elapsed().as_millis()),
                    }
                }
                let status = match status {
                    StageStatus::Start => console::Status::Start,
                    StageStatus::Ok => console::Status::Ok,
                    StageStatus::Error => console::Status::Error,
                };
                console::marker_detail(stage.as_str(), status, &detail);
            }
            Progress::Stream(s) => {
                if last_log.elapsed() >= Duration::from_secs(2) || (s.total > 0 && s.downloaded >= s.total) {
                    last_log = std::time::Instant::now();
                    metal_hammer::log!(
                        "stream: {} / {} MB downloaded, {} MB written, {} MB/s, {} resumes",
                        s.downloaded >> 20,
                        s.total >> 20,
                        s.written >> 20,
                        s.bytes_per_sec >> 20,
                        s.resumes
                    );
                }
            }
        };
        let result = metal_hammer::install::install_with(sys, instr, disks, mount_root, &opts, &mut progress);
        // One line with the whole install's time and memory, for the memory benchmark.
        let memory = watch.finish();
        let detail = format!(
            "duration_ms={} stream_ms={stream_ms} image_bytes={} {}",
            started.elapsed().as_millis(),
            instr.image.manifest.uncompressed_size,
            memory.marker_fields()
        );
        let status = if result.is_ok() { console::Status::Ok } else { console::Status::Error };
        console::marker_detail("install", status, &detail);
        result
    };
    let result = match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(work),
        _ => work(),
    };
    Ok(result?)
}

fn main() {
    metal_hammer::tls::init();
    // As PID 1 the arguments come from the kernel: every command-line word it did not
    // recognise. Firmware loaders add some (iPXE on UEFI passes the image name, `vmlinuz`),
    // so PID 1 never parses them: it always runs the flow.
    if std::process::id() == 1 {
        pid1_main();
    }
    // The kernel's request_module() runs us as `modprobe -q -- <name>` (see modules::register_as_modprobe).
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(name) = metal_hammer::modules::modprobe_request(&args) {
        std::process::exit(modprobe_main(name));
    }
    let cli = Cli::parse();
    let code = match cli.command {
        None => {
            eprintln!("metal-hammer: the full flow runs only as PID 1 of the initramfs; see --help for subcommands");
            2
        }
        Some(cmd) => match subcommand(cmd) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("metal-hammer: {}", console::chain(e.as_ref()));
                1
            }
        },
    };
    std::process::exit(code);
}

fn modprobe_main(name: &str) -> i32 {
    let dir = Paths::production().modules_dir;
    let result = metal_hammer::modules::ModuleIndex::load(&dir)
        .map_err(|e| console::chain(&e))
        .and_then(|index| metal_hammer::modules::modprobe(&LinuxSys, &index, &dir, name).map_err(|e| e.to_string()));
    match result {
        Ok(_) => 0,
        Err(e) => {
            metal_hammer::log!("modprobe {name}: {e}");
            1
        }
    }
}

fn subcommand(cmd: Command) -> Result<(), BoxError> {
    match cmd {
        Command::Inventory { root, lldp: lldp_s } => {
            let mut inv = inventory::collect(&root, &[])?;
            if lldp_s > 0 {
                let ifaces: Vec<(String, i32)> =
                    inv.nics.iter().filter_map(|n| Some((n.name.clone(), net::ifindex(&n.name)?))).collect();
                inv.lldp = lldp::listen(&ifaces, Duration::from_secs(lldp_s))?;
            }
            println!("{}", serde_json::to_string_pretty(&inv)?);
            Ok(())
        }
        Command::Wipe { devices } => {
            if !destructive_allowed(!devices.is_empty()) {
                return Err("refusing to wipe: name the devices with --device".into());
            }
            let targets = devices
                .iter()
                .map(|d| {
                    Ok(wipe::WipeTarget {
                        path: d.clone(),
                        size_bytes: wipe::device_size(d).map_err(|e| format!("{}: {e}", d.display()))?,
                    })
                })
                .collect::<Result<Vec<_>, BoxError>>()?;
            let report = wipe::wipe_all(&LinuxSys, &targets)?;
            println!("{}", serde_json::to_string_pretty(&metal_types::WipeReport { disks: report })?);
            Ok(())
        }
        Command::Install { instructions, devices, mount_root } => {
            if !destructive_allowed(!devices.is_empty()) {
                return Err("refusing to install: name the devices with --device".into());
            }
            let text = std::fs::read_to_string(&instructions).map_err(|e| format!("{}: {e}", instructions.display()))?;
            let instr: InstallInstructions =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", instructions.display()))?;
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            let boot = rt.block_on(run_install(&LinuxSys, &instr, &devices, &mount_root))?;
            println!("{}", serde_json::to_string_pretty(&boot)?);
            // No kexec here: unmount the root that install leaves mounted for it.
            metal_hammer::install::release(&LinuxSys, &mount_root)
                .map_err(|e| format!("unmounting {}: {e}", mount_root.display()))?;
            Ok(())
        }
    }
}

/// PID 1: never returns, never exits (the kernel panics when init exits).
fn pid1_main() -> ! {
    metal_hammer::pid1::ensure_console();
    metal_hammer::pid1::start_reaper();
    std::panic::set_hook(Box::new(|info| {
        // A panic on the main thread ends the flow (then a reboot). Elsewhere the thread's owner
        // decides: the DHCP renewer is restarted (`net::supervise`), a blocking stage's panic
        // becomes that stage's error and ends in `flow::fatal`.
        let thread = std::thread::current();
        let stage = if thread.name() == Some("main") { "fatal" } else { "panic" };
        console::marker(
            stage,
            console::Status::Error,
            &[("thread", thread.name().unwrap_or("unnamed")), ("error", &format!("panic: {info}"))],
        );
    }));
    let sys = LinuxSys;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    if let Ok(rt) = rt {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async {
                // /proc is not mounted yet: the flow's boot stage mounts it, then reads the cmdline.
                let paths = Paths::production();
                let (err, api, delay) = {
                    let _ = metal_hammer::pid1::mount_early(&sys, &paths.root);
                    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
                    let delay = flow::Tunables::parse(&cmdline).reboot_delay;
                    let (err, api) = flow::run(&sys, &paths, &cmdline, run_install).await;
                    (err, api, delay)
                };
                flow::fatal(&sys, api.as_ref(), &err, delay).await;
            })
        }));
        if result.is_err() {
            std::thread::sleep(Duration::from_secs(10));
            sys.sync();
            let _ = sys.reboot();
        }
    } else {
        console::marker("fatal", console::Status::Error, &[("error", "cannot start the async runtime")]);
        std::thread::sleep(Duration::from_secs(10));
        let _ = sys.reboot();
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
