//! `image-builder`: builds the kernel cache, the metal-hammer initramfs, the test OS and OS
//! images, and publishes images to the API. See `docs/images.md`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use image_builder::{archive, hammer, kernel, publish, serve, testos};

#[derive(Parser)]
#[command(
    name = "image-builder",
    version,
    about = "Builds what bare-metal machines boot: kernel cache, metal-hammer initramfs, test OS, OS images"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Download and extract Debian's kernel into <cache>/kernel/<version>/ (idempotent); prints the path.
    Kernel {
        #[arg(long, default_value = "/var/cache/metal")]
        cache: PathBuf,
        /// Meta package (its linux-image-<version> dependency is used) or a concrete package.
        #[arg(long, default_value = "linux-image-amd64")]
        package: String,
    },
    /// Build the metal-hammer vmlinuz and initrd.img.
    Hammer {
        /// An extracted kernel: <cache>/kernel/<version>.
        #[arg(long)]
        kernel_dir: PathBuf,
        /// The static metal-hammer binary (becomes /init).
        #[arg(long)]
        hammer_bin: PathBuf,
        #[arg(long, default_value = "target/lab/hammer")]
        out: PathBuf,
        /// Extra kernel modules to include (with their dependencies).
        #[arg(long = "module")]
        modules: Vec<String>,
        #[arg(long, default_value_t = 9)]
        zstd_level: i32,
        /// A PEM CA bundle to append to the initramfs's CA bundle (repeatable): metal-hammer
        /// then trusts an API or image server whose certificate chains to it.
        #[arg(long = "ca")]
        ca_files: Vec<PathBuf>,
    },
    /// Build the small busybox test OS as test-os-<version>.tar.zst + manifest + sha256.
    TestOs {
        #[arg(long)]
        kernel_dir: PathBuf,
        /// The static phone-home binary (metal-hammer's `phone-home` bin, musl).
        #[arg(long)]
        phone_home_bin: PathBuf,
        #[arg(long, default_value = "target/lab/images")]
        out: PathBuf,
        /// Image version; default: today's date (YYYYMMDD).
        #[arg(long)]
        version: Option<String>,
        #[arg(long, default_value_t = 9)]
        zstd_level: i32,
        #[arg(long, default_value = "/usr/bin/busybox")]
        busybox: PathBuf,
        /// Add this many MiB of generated filler files under /opt/filler (memory and size
        /// benchmarks); the image is then named by --filler-name.
        #[arg(long, default_value_t = 0)]
        filler_mib: u64,
        #[arg(long, default_value = "test-os-filler")]
        filler_name: String,
        /// Seed of the filler content (same seed, same bytes).
        #[arg(long, default_value_t = 1)]
        filler_seed: u64,
    },
    /// Build an OS image (Debian by mmdebstrap, or from a directory or tarball).
    Os(image_builder::os::OsArgs),
    /// Register a built image in the API's catalog (POST /v1/images).
    Publish {
        /// The image's manifest (<image>.json).
        #[arg(long)]
        manifest: PathBuf,
        /// Where machines download images from, e.g. http://10.99.0.1:8081/images
        #[arg(long)]
        url_base: String,
        /// The API, e.g. http://10.99.0.1:8080
        #[arg(long, env = "METAL_API")]
        api: String,
        /// An admin token.
        #[arg(long, env = "METAL_TOKEN")]
        token: String,
        /// The CA bundle an `https://` API's certificate must chain to (default: the system's).
        #[arg(long, env = "METAL_CA_FILE")]
        ca_file: Option<PathBuf>,
    },
    /// Compress a file (`-` for stdin) the way OS images are compressed: independent zstd frames
    /// of 8 MiB each, with content size and checksum (for images made by other tools, and the
    /// install benchmark). Prints the SHA-256 and sizes.
    Compress {
        input: PathBuf,
        output: PathBuf,
        #[arg(long, default_value_t = 9)]
        zstd_level: i32,
    },
    /// Serve the files of a directory over HTTP (GET, HEAD, Range) for the lab, until killed.
    Serve {
        /// The directory to serve (e.g. target/lab/images); nothing outside it is reachable.
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on; port 0 picks a free port (the real one is printed).
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: String,
    },
}

fn run(cli: Cli) -> image_builder::Result<()> {
    match cli.command {
        Cmd::Kernel { cache, package } => {
            let k = kernel::ensure(&cache, &package)?;
            println!("{}", k.root.display());
        }
        Cmd::Hammer { kernel_dir, hammer_bin, out, modules, zstd_level, ca_files } => {
            let o = hammer::build(&hammer::HammerOptions {
                kernel_dir,
                hammer_bin,
                out,
                extra_modules: modules,
                zstd_level,
                ca_files,
            })?;
            println!("{}", o.vmlinuz.display());
            println!("{}", o.initrd.path.display());
        }
        Cmd::TestOs { kernel_dir, phone_home_bin, out, version, zstd_level, busybox, filler_mib, filler_name, filler_seed } => {
            let version = version.unwrap_or_else(image_builder::today);
            let filler =
                (filler_mib > 0).then_some(testos::Filler { name: filler_name, bytes: filler_mib << 20, seed: filler_seed });
            let opts = testos::TestOsOptions { kernel_dir, phone_home_bin, out, version, zstd_level, busybox };
            let (file, _) = testos::build_with(&opts, filler.as_ref())?;
            println!("{}", file.display());
        }
        Cmd::Os(args) => {
            for file in image_builder::os::build(&args)? {
                println!("{}", file.display());
            }
        }
        Cmd::Publish { manifest, url_base, api, token, ca_file } => {
            println!("{}", publish::publish(&manifest, &url_base, &api, &token, ca_file.as_deref())?);
        }
        Cmd::Compress { input, output, zstd_level } => {
            let w = archive::write_image_zst(&output, zstd_level, "compress", |w| {
                if input.as_os_str() == "-" {
                    std::io::copy(&mut std::io::stdin().lock(), w).map(|_| ())
                } else {
                    std::io::copy(&mut std::fs::File::open(&input)?, w).map(|_| ())
                }
            })?;
            println!("{}  {} ({} bytes from {})", w.sha256, output.display(), w.compressed_size, w.uncompressed_size);
        }
        Cmd::Serve { dir, listen } => serve::serve(&dir, &listen)?,
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut msg = format!("image-builder: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            ExitCode::FAILURE
        }
    }
}
