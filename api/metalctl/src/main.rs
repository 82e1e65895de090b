//! `metalctl`: the command-line client of the metal API, for operators (partitions, sizes,
//! images, layouts, projects, tokens, machines) and tenants (allocate, free, follow).

mod client;
mod config;
mod input;
mod output;
mod watch;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use metal_types::{
    AllocationRequest, FilesystemLayout, Image, ImageClassification, ImageManifest, Machine, MachineId, Partition, Project,
    ProvisioningEvent, Size, TokenRequest, TokenRole,
};
use serde::Serialize;
use time::OffsetDateTime;

use client::Client;
use metal_types::CatalogObject;
use output::{Format, Tabular};
use watch::{End, FollowOptions, Follower};

/// Exit codes besides 0 (success), 1 (error) and 2 (bad command line).
const EXIT_TIMEOUT: u8 = 3;
const EXIT_CRASHED: u8 = 4;
const EXIT_INTERRUPTED: u8 = 130;

const GLOBAL: &str = "Global options";

#[derive(Debug, Parser)]
#[command(name = "metalctl", version, about = "Command-line client of the metal API")]
struct Cli {
    /// Base URL of the API [env: METAL_API_URL; config file: api_url]
    #[arg(long, global = true, value_name = "URL", help_heading = GLOBAL)]
    api_url: Option<String>,
    /// Bearer token [env: METAL_TOKEN; config file: token]
    #[arg(long, global = true, value_name = "TOKEN", help_heading = GLOBAL)]
    token: Option<String>,
    /// Config file (YAML with `api_url` and `token`) [default: ~/.config/metalctl/config.yaml]
    #[arg(long, global = true, value_name = "FILE", help_heading = GLOBAL)]
    config: Option<PathBuf>,
    /// Output format
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t, help_heading = GLOBAL)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Partitions: network segments with their boot configuration (admin)
    #[command(subcommand)]
    Partition(CatalogCmd),
    /// Machine sizes: constraints on cores, memory and storage (admin)
    #[command(subcommand)]
    Size(CatalogCmd),
    /// OS images (admin)
    #[command(subcommand)]
    Image(ImageCmd),
    /// Filesystem layouts: GPT partitions and filesystems (admin)
    #[command(subcommand)]
    Layout(CatalogCmd),
    /// Projects: the tenants (admin)
    #[command(subcommand)]
    Project(CatalogCmd),
    /// API tokens (admin)
    #[command(subcommand)]
    Token(TokenCmd),
    /// Machines: list, inspect, follow, allocate, free
    #[command(subcommand)]
    Machine(MachineCmd),
    /// Allocations
    #[command(subcommand)]
    Allocation(AllocationCmd),
    /// Check that the API answers (GET /healthz)
    Health,
}

#[derive(Debug, Subcommand)]
enum CatalogCmd {
    /// Create from a YAML or JSON file holding one object or a list (`-` reads stdin)
    Create {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
    },
    /// List all
    #[command(visible_alias = "list")]
    Ls,
    /// Show one
    #[command(visible_alias = "get")]
    Describe { id: String },
    /// Delete one
    #[command(visible_alias = "rm")]
    Delete { id: String },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Create from a YAML/JSON file of images, or from image-builder's manifest plus a URL
    Create {
        #[arg(
            short = 'f',
            long = "file",
            value_name = "FILE",
            conflicts_with = "manifest",
            required_unless_present = "manifest"
        )]
        file: Option<PathBuf>,
        /// The manifest image-builder writes next to the image (`<name>-<version>.<format>.json`)
        #[arg(long, value_name = "FILE.json", requires = "url")]
        manifest: Option<PathBuf>,
        /// Where machines download the image from
        #[arg(long, requires = "manifest")]
        url: Option<String>,
        #[arg(long, value_enum, default_value = "supported", requires = "manifest")]
        classification: Classification,
        /// RFC 3339 time after which the image cannot be allocated
        #[arg(long, value_name = "TIME", requires = "manifest")]
        expires_at: Option<String>,
    },
    /// List all images
    #[command(visible_alias = "list")]
    Ls,
    /// Show one image; a bare name (`debian-12`) shows the newest of that name
    #[command(visible_alias = "get")]
    Describe { id_or_name: String },
    /// Delete one image
    #[command(visible_alias = "rm")]
    Delete { id: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Classification {
    Preview,
    Supported,
    Deprecated,
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// List admin, tenant and pixie tokens (never the tokens themselves)
    Ls,
    /// Create a token; it is shown once
    Create {
        #[arg(long, value_enum)]
        role: Role,
        /// The project of a tenant token
        #[arg(long)]
        project: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        /// The token stops working after this long: `90s`, `30m`, `12h`, `30d` (default: until revoked)
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<u64>,
    },
    /// Revoke a token by its id (from `token ls`); it stops working within seconds
    Revoke { id: String },
}

/// `90s`, `30m`, `12h`, `30d` or a plain number of seconds, as seconds.
fn parse_duration(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().map_err(|_| format!("{s:?} is not a duration like 90s, 30m, 12h or 30d"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(factor).filter(|v| *v > 0).ok_or_else(|| format!("{s:?} must be more than zero and less than forever"))
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Role {
    Admin,
    Tenant,
    Pixie,
}

// Parsed once per run: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum MachineCmd {
    /// List machines
    #[command(visible_alias = "list")]
    Ls(MachineLs),
    /// Show one machine with its allocation and inventory
    #[command(visible_alias = "get")]
    Describe {
        /// Machine id (UUID)
        id: MachineId,
    },
    /// Show a machine's provisioning timeline
    Events(EventsArgs),
    /// Allocate a machine
    Allocate(AllocateArgs),
    /// Free a machine: its allocation ends and it is reclaimed (wiped, back to the pool)
    Free {
        /// Machine id (UUID)
        id: MachineId,
    },
}

#[derive(Debug, Args)]
struct MachineLs {
    /// Redraw every 2 seconds until Ctrl-C
    #[arg(long)]
    watch: bool,
    #[arg(long)]
    partition: Option<String>,
    #[arg(long)]
    size: Option<String>,
    #[arg(long)]
    project: Option<String>,
    /// Only machines whose last event is this one (e.g. Waiting)
    #[arg(long, value_parser = parse_event)]
    state: Option<ProvisioningEvent>,
}

#[derive(Debug, Args)]
struct EventsArgs {
    /// Machine id (UUID)
    id: MachineId,
    /// Keep polling and print new events as they come, until Ctrl-C
    #[arg(long)]
    watch: bool,
    /// Stop watching when this event arrives (implies --watch); exit 4 if `Crashed` comes first
    #[arg(long, value_name = "EVENT", value_parser = parse_awaited_event)]
    until: Option<ProvisioningEvent>,
    /// Stop watching after this many seconds (implies --watch); exit 3 if --until did not come
    #[arg(long = "timeout-s", value_name = "SECONDS")]
    timeout_s: Option<u64>,
    /// Seconds between polls
    #[arg(long = "interval-s", value_name = "SECONDS", default_value_t = 1.0)]
    interval_s: f64,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["size", "machine"]))]
struct AllocateArgs {
    /// The tenant the machine is for
    #[arg(long)]
    project: String,
    /// Where the machine stands
    #[arg(long)]
    partition: String,
    /// Any waiting machine of this size
    #[arg(long)]
    size: Option<String>,
    /// This machine
    #[arg(long, value_name = "ID")]
    machine: Option<MachineId>,
    /// Image id or name (a name picks the newest version)
    #[arg(long)]
    image: String,
    /// Hostname of the installed OS
    #[arg(long)]
    hostname: String,
    /// An SSH public key (repeatable)
    #[arg(long = "ssh-key", value_name = "KEY")]
    ssh_keys: Vec<String>,
    /// A file of SSH public keys, one per line (repeatable)
    #[arg(long = "ssh-key-file", value_name = "FILE")]
    ssh_key_files: Vec<PathBuf>,
    /// User data for the installed OS (written to /etc/metal/userdata)
    #[arg(long, value_name = "STR", conflicts_with = "user_data_file")]
    user_data: Option<String>,
    /// User data from a file
    #[arg(long, value_name = "FILE")]
    user_data_file: Option<PathBuf>,
    /// Filesystem layout id (default: the API picks one that fits size and image)
    #[arg(long)]
    layout: Option<String>,
    /// The same key never allocates twice; a repeat returns the first allocation.
    /// Default: a fresh random key, so metalctl's own retries are safe.
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// Follow the machine's events until this one (e.g. "Phoned Home"); exit 4 on `Crashed`
    #[arg(long, value_name = "EVENT", value_parser = parse_awaited_event)]
    wait_for: Option<ProvisioningEvent>,
    /// With --wait-for: give up after this many seconds (exit 3)
    #[arg(long = "timeout-s", value_name = "SECONDS", default_value_t = 900, requires = "wait_for")]
    timeout_s: u64,
}

#[derive(Debug, Subcommand)]
enum AllocationCmd {
    /// List allocations (a tenant sees its project's)
    #[command(visible_alias = "list")]
    Ls,
}

/// Event names as the API spells them (`Phoned Home`), any case, `-`/`_` for spaces.
fn parse_event(s: &str) -> Result<ProvisioningEvent, String> {
    let norm = |v: &str| v.to_ascii_lowercase().replace(['-', '_'], " ");
    ProvisioningEvent::ALL.into_iter().find(|e| norm(e.as_str()) == norm(s.trim())).ok_or_else(|| {
        let all: Vec<&str> = ProvisioningEvent::ALL.iter().map(|e| e.as_str()).collect();
        format!("unknown event {s:?}; one of: {}", all.join(", "))
    })
}

/// An event to wait for: any but `Alive`, which is a heartbeat the API does not keep in the
/// timeline, so a wait for it would never end.
fn parse_awaited_event(s: &str) -> Result<ProvisioningEvent, String> {
    match parse_event(s)? {
        ProvisioningEvent::Alive => {
            Err("`Alive` is a heartbeat and never appears in the timeline; wait for \"Phoned Home\" instead".to_string())
        }
        e => Ok(e),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.chain().any(|c| matches!(c.downcast_ref::<client::ClientError>(), Some(client::ClientError::Tls { .. }))) {
                eprintln!("hint: give the API's CA bundle as `ca_file` in the config file or in METALCTL_CA_FILE");
            }
            ExitCode::FAILURE
        }
    }
}

fn settings(cli: &Cli) -> anyhow::Result<config::Settings> {
    let env = |k: &str| std::env::var(k).ok();
    let (path, required) = match &cli.config {
        Some(p) => (p.clone(), true),
        None => (config::default_path(&env), false),
    };
    let file = config::load_file(&path, required)?;
    if file.token.is_some() {
        if let Some(mode) = config::loose_mode(&path) {
            eprintln!(
                "warning: {} holds a token and is readable by others (mode {mode:04o}); run chmod 600 on it",
                path.display()
            );
        }
    }
    Ok(config::resolve(cli.api_url.as_deref(), cli.token.as_deref(), &env, &file, &path)?)
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let s = settings(&cli)?;
    let client = client::connect(&s.api_url, s.token, s.ca_file.as_deref())?;
    let out = cli.output;
    match cli.command {
        Command::Partition(cmd) => catalog::<Partition>(&client, cmd, out).await?,
        Command::Size(cmd) => catalog::<Size>(&client, cmd, out).await?,
        Command::Layout(cmd) => catalog::<FilesystemLayout>(&client, cmd, out).await?,
        Command::Project(cmd) => catalog::<Project>(&client, cmd, out).await?,
        Command::Image(cmd) => image(&client, cmd, out).await?,
        Command::Token(TokenCmd::Ls) => print_list(out, &client.tokens().await?)?,
        Command::Token(TokenCmd::Revoke { id }) => {
            client.revoke_token(&id).await?;
            eprintln!("token {id} revoked");
        }
        Command::Token(TokenCmd::Create { role, project, description, expires_in }) => {
            let role = match role {
                Role::Admin => TokenRole::Admin,
                Role::Tenant => TokenRole::Tenant,
                Role::Pixie => TokenRole::Pixie,
            };
            if role == TokenRole::Tenant && project.is_none() {
                bail!("a tenant token belongs to one project: pass --project");
            }
            let token = client.create_token(&TokenRequest { role, project, description, expires_in_s: expires_in }).await?;
            print_item(out, &token)?;
        }
        Command::Machine(cmd) => return machine(&client, cmd, out).await,
        Command::Allocation(AllocationCmd::Ls) => print_list(out, &client.allocations().await?)?,
        Command::Health => {
            let body = client.health().await?;
            emit(format!("{}\n", health_text(out, &body)))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What `health` prints: the API's `status` for the table format (`ok`), else its body.
fn health_text(format: Format, body: &str) -> String {
    let status = serde_json::from_str::<serde_json::Value>(body).ok().and_then(|v| v.get("status")?.as_str().map(str::to_string));
    match (format, status) {
        (Format::Table, Some(status)) => status,
        (Format::Yaml, _) => match serde_json::from_str::<serde_yaml::Value>(body) {
            Ok(v) => serde_yaml::to_string(&v).unwrap_or_else(|_| body.to_string()).trim_end().to_string(),
            Err(_) => body.to_string(),
        },
        _ if body.is_empty() => "ok".to_string(),
        _ => body.to_string(),
    }
}

/// Writes data to stdout. A closed pipe (`metalctl machine ls | head -1`) comes back as an
/// error that `main` ends quietly on.
fn emit(text: impl AsRef<str>) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_ref().as_bytes())?;
    stdout.flush()
}

/// True when the error comes from writing into a pipe whose reader is gone.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().filter_map(|c| c.downcast_ref::<std::io::Error>()).any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// Prints a list: a table, or the JSON/YAML of the list.
fn print_list<T: Serialize + Tabular>(format: Format, items: &[T]) -> anyhow::Result<()> {
    let text = match format {
        Format::Table => T::table(items).render(),
        _ => output::serialize(format, items)?,
    };
    Ok(emit(text)?)
}

/// Prints one object: as a one-row table, or its JSON/YAML (an object, not a list).
fn print_item<T: Serialize + Tabular>(format: Format, item: &T) -> anyhow::Result<()> {
    match format {
        Format::Table => print_list(format, std::slice::from_ref(item)),
        _ => print_one(format, item),
    }
}

/// Prints one object in full: YAML for the table format, else JSON/YAML.
fn print_one<T: Serialize>(format: Format, item: &T) -> anyhow::Result<()> {
    Ok(emit(output::serialize(format, item)?)?)
}

async fn catalog<K>(client: &Client, cmd: CatalogCmd, out: Format) -> anyhow::Result<()>
where
    K: CatalogObject + Tabular,
{
    match cmd {
        CatalogCmd::Create { file } => {
            create_all(client, input::read_objects::<K>(&file, K::NOUN)?, out).await?;
        }
        CatalogCmd::Ls => print_list(out, &client.list::<K>().await?)?,
        CatalogCmd::Describe { id } => print_one(out, &client.describe::<K>(&id).await?)?,
        CatalogCmd::Delete { id } => {
            client.delete::<K>(&id).await?;
            eprintln!("deleted {} {id}", K::NOUN);
        }
    }
    Ok(())
}

/// Creates the objects in order and prints what was created (JSON/YAML in the shape of the
/// input: one object or a list). On an error the ones created before it stay (and are printed),
/// and the error says how far it got.
async fn create_all<K>(client: &Client, objects: input::Objects<K>, out: Format) -> anyhow::Result<()>
where
    K: CatalogObject + Tabular,
{
    let input::Objects { items: objects, list } = objects;
    let total = objects.len();
    let mut created = Vec::with_capacity(total);
    let mut failure = None;
    for object in &objects {
        match client.create(object).await {
            Ok((c, new)) => {
                if !new {
                    eprintln!("{} {} exists already with this content: unchanged", K::NOUN, c.id());
                }
                created.push(c)
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    match created.as_slice() {
        [] => {}
        [one] if !list => print_item(out, one)?,
        all => print_list(out, all)?,
    }
    match failure {
        None => Ok(()),
        Some(e) if total == 1 => Err(e.into()),
        Some(e) => {
            let at = &objects[created.len()];
            Err(anyhow::Error::from(e).context(format!("{} {:?} ({} of {total})", K::NOUN, at.id(), created.len() + 1)))
        }
    }
}

async fn image(client: &Client, cmd: ImageCmd, out: Format) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Create { file: Some(file), .. } => {
            create_all(client, input::read_objects::<Image>(&file, Image::NOUN)?, out).await
        }
        ImageCmd::Create { file: None, manifest, url, classification, expires_at } => {
            let (Some(manifest), Some(url)) = (manifest, url) else {
                bail!("pass -f FILE, or --manifest FILE.json with --url URL");
            };
            let manifest: ImageManifest = input::read_one(&manifest, "image manifest")?;
            let image = Image {
                id: manifest.id(),
                url,
                classification: match classification {
                    Classification::Preview => ImageClassification::Preview,
                    Classification::Supported => ImageClassification::Supported,
                    Classification::Deprecated => ImageClassification::Deprecated,
                },
                expires_at,
                manifest,
            };
            create_all(client, input::Objects { items: vec![image], list: false }, out).await
        }
        ImageCmd::Ls => print_list(out, &client.list::<Image>().await?),
        ImageCmd::Describe { id_or_name } => print_one(out, &client.describe::<Image>(&id_or_name).await?),
        ImageCmd::Delete { id } => {
            client.delete::<Image>(&id).await?;
            eprintln!("deleted image {id}");
            Ok(())
        }
    }
}

async fn machine(client: &Client, cmd: MachineCmd, out: Format) -> anyhow::Result<ExitCode> {
    match cmd {
        MachineCmd::Ls(ls) if ls.watch => return machine_ls_watch(client, &ls, out).await,
        MachineCmd::Ls(ls) => {
            let machines = filter_machines(client.machines().await?, &ls);
            emit(machines_text(out, &machines)?)?;
        }
        MachineCmd::Describe { id } => {
            let m = client.machine(id).await?;
            match out {
                Format::Table => {
                    let events = client.machine_events(id).await?;
                    emit(output::machine_view(&m, &events, OffsetDateTime::now_utc()))?
                }
                _ => print_one(out, &m)?,
            }
        }
        MachineCmd::Events(args) => return events(client, args, out).await,
        MachineCmd::Allocate(args) => return allocate(client, args, out).await,
        MachineCmd::Free { id } => {
            let m = client.free_machine(id).await?;
            match out {
                Format::Table => {
                    emit(format!("freed machine {} (state: {})\n", m.id, m.state.map(|s| s.as_str()).unwrap_or("-")))?
                }
                _ => print_one(out, &m)?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn filter_machines(machines: Vec<Machine>, ls: &MachineLs) -> Vec<Machine> {
    fn project(m: &Machine) -> Option<&str> {
        m.allocation.as_ref().map(|a| a.project.as_str())
    }
    machines
        .into_iter()
        .filter(|m| ls.partition.as_deref().is_none_or(|p| m.partition.as_deref() == Some(p)))
        .filter(|m| ls.size.as_deref().is_none_or(|s| m.size == s))
        .filter(|m| ls.project.as_deref().is_none_or(|p| project(m) == Some(p)))
        .filter(|m| ls.state.is_none_or(|s| m.state == Some(s)))
        .collect()
}

fn machines_text(out: Format, machines: &[Machine]) -> anyhow::Result<String> {
    match out {
        Format::Table => Ok(output::machines_table(machines, OffsetDateTime::now_utc()).render()),
        _ => output::serialize(out, machines),
    }
}

/// `machine ls --watch`: redraws every 2 s (on a terminal: clears the screen first; otherwise
/// prints one snapshot after the other).
async fn machine_ls_watch(client: &Client, ls: &MachineLs, out: Format) -> anyhow::Result<ExitCode> {
    let tty = std::io::stdout().is_terminal();
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = &mut ctrl_c => return Ok(ExitCode::SUCCESS),
        }
        // An API that cannot be reached may come back: shown, and polled again. An answer
        // from the API that is an error (a revoked token, say) will not fix itself: it ends.
        let body = match client.machines().await {
            Ok(ms) => machines_text(out, &filter_machines(ms, ls))?,
            Err(e) if e.is_transport() => format!("error: {}\n", output::error_chain(&e)),
            Err(e) => return Err(e.into()),
        };
        let now = OffsetDateTime::now_utc();
        let mut stdout = std::io::stdout().lock();
        if tty {
            // Clear the screen, cursor home.
            write!(stdout, "\x1b[2J\x1b[H")?;
        }
        if out == Format::Table || tty {
            writeln!(stdout, "every 2s: machine ls   {:02}:{:02}:{:02} UTC\n", now.hour(), now.minute(), now.second())?;
        }
        write!(stdout, "{body}")?;
        if !tty {
            writeln!(stdout)?;
        }
        stdout.flush()?;
    }
}

async fn events(client: &Client, args: EventsArgs, out: Format) -> anyhow::Result<ExitCode> {
    let watching = args.watch || args.until.is_some() || args.timeout_s.is_some();
    if !watching {
        let events = client.machine_events(args.id).await?;
        match out {
            Format::Table => emit(output::timeline(&events))?,
            _ => print_one(out, &events)?,
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !(args.interval_s > 0.0 && args.interval_s.is_finite()) {
        bail!("--interval-s must be a positive number of seconds");
    }
    if out == Format::Table {
        emit(format!("{}\n", output::TIMELINE_HEADER))?;
    }
    let mut follower = Follower::all(args.until);
    let options = FollowOptions {
        format: out,
        interval: Duration::from_secs_f64(args.interval_s),
        timeout: args.timeout_s.map(Duration::from_secs),
    };
    let end = watch::follow(client, args.id, &mut follower, options, &mut std::io::stdout()).await?;
    Ok(report_end(end, args.until, args.id, true))
}

/// Maps how following ended to a message on stderr and an exit code. `plain_watch`: a watch
/// without a wanted event, where Ctrl-C is the normal way out.
fn report_end(end: End, until: Option<ProvisioningEvent>, id: MachineId, plain_watch: bool) -> ExitCode {
    match end {
        End::Reached(e) => {
            eprintln!("machine {id} reached {e}");
            ExitCode::SUCCESS
        }
        End::Crashed { message } => {
            eprintln!("error: machine {id} reported Crashed: {message}");
            ExitCode::from(EXIT_CRASHED)
        }
        End::CrashLoop => {
            eprintln!(
                "error: machine {id} is crash-looping (metal-hammer started again during the install, too often); \
                 see metalctl machine events {id}"
            );
            ExitCode::from(EXIT_CRASHED)
        }
        End::TimedOut { last } => {
            // A tenant's timeline starts at its allocation: before the machine reports anything
            // for it there is no event to name.
            let last = last.map(|e| e.as_str()).unwrap_or("none since the allocation");
            match until {
                Some(u) => eprintln!("error: timed out waiting for {u} on machine {id} (last event: {last})"),
                None => eprintln!("stopped watching machine {id} after the timeout (last event: {last})"),
            }
            if until.is_some() {
                ExitCode::from(EXIT_TIMEOUT)
            } else {
                ExitCode::SUCCESS
            }
        }
        End::Interrupted if plain_watch && until.is_none() => ExitCode::SUCCESS,
        End::Interrupted => {
            eprintln!("interrupted");
            ExitCode::from(EXIT_INTERRUPTED)
        }
    }
}

async fn allocate(client: &Client, args: AllocateArgs, out: Format) -> anyhow::Result<ExitCode> {
    let mut ssh_keys = args.ssh_keys;
    for f in &args.ssh_key_files {
        let text = std::fs::read_to_string(f).with_context(|| format!("cannot read SSH key file {}", f.display()))?;
        let keys = input::ssh_keys_from_text(&text);
        if keys.is_empty() {
            bail!("SSH key file {} holds no key", f.display());
        }
        ssh_keys.extend(keys);
    }
    let user_data = match (&args.user_data, &args.user_data_file) {
        (Some(s), _) => s.clone(),
        (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("cannot read user data file {}", f.display()))?,
        (None, None) => String::new(),
    };
    let request = AllocationRequest {
        project: args.project,
        partition: args.partition,
        size: args.size,
        machine: args.machine,
        image: args.image,
        hostname: args.hostname,
        layout: args.layout,
        ssh_keys,
        user_data,
        idempotency_key: Some(args.idempotency_key.unwrap_or_else(|| format!("metalctl-{}", uuid::Uuid::new_v4()))),
    };

    // The idempotency key makes a retry after a lost answer safe: it returns the same allocation.
    let allocated = client
        .allocate_retrying(&request, 3, Duration::from_secs(1), &mut |e| {
            eprintln!("warning: {:#} (retrying with the same idempotency key)", output::error_chain(e));
        })
        .await?;
    let a = &allocated.allocation;
    print_item(out, a)?;
    if !allocated.created {
        eprintln!("note: an earlier request with this idempotency key made this allocation");
    }
    std::io::stdout().flush()?;

    let Some(wait_for) = args.wait_for else {
        return Ok(ExitCode::SUCCESS);
    };
    // Only events the API received since the allocation count. With -o json/yaml stdout holds
    // the allocation alone, so the timeline goes to stderr.
    let since =
        output::parse_time(&a.created_at).with_context(|| format!("allocation created_at {:?} is not RFC 3339", a.created_at))?;
    let mut follower = Follower::since(since, Some(wait_for));
    let options = FollowOptions {
        format: Format::Table,
        interval: Duration::from_secs(1),
        timeout: Some(Duration::from_secs(args.timeout_s)),
    };
    let end = if out == Format::Table {
        emit(format!("\n{}\n", output::TIMELINE_HEADER))?;
        watch::follow(client, a.machine, &mut follower, options, &mut std::io::stdout()).await?
    } else {
        eprintln!("{}", output::TIMELINE_HEADER);
        watch::follow(client, a.machine, &mut follower, options, &mut std::io::stderr()).await?
    };
    Ok(report_end(end, Some(wait_for), a.machine, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("30m"), Ok(1800));
        assert_eq!(parse_duration("12h"), Ok(43_200));
        assert_eq!(parse_duration("30d"), Ok(2_592_000));
        for bad in ["", "0s", "d", "5w", "-1h", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn health_output() {
        let body = r#"{"status":"ok"}"#;
        assert_eq!(health_text(Format::Table, body), "ok");
        assert_eq!(health_text(Format::Json, body), body);
        assert_eq!(health_text(Format::Yaml, body), "status: ok");
        assert_eq!(health_text(Format::Table, ""), "ok");
        assert_eq!(health_text(Format::Table, "fine"), "fine");
    }

    #[test]
    fn alive_cannot_be_waited_for() {
        assert!(parse_awaited_event("alive").unwrap_err().contains("heartbeat"));
        assert_eq!(parse_awaited_event("crashed"), Ok(ProvisioningEvent::Crashed));
        let args = ["metalctl", "machine", "events", "00000000-0000-0000-0000-000000000001", "--until", "Alive"];
        assert!(Cli::try_parse_from(args).is_err());
    }

    #[test]
    fn machine_filters() {
        use metal_types::{Allocation, AllocationId, Liveliness};
        let m = |n: u128, partition: &str, size: &str, state, project: Option<&str>| Machine {
            id: MachineId(uuid::Uuid::from_u128(n)),
            partition: Some(partition.into()),
            size: size.into(),
            state: Some(state),
            liveliness: Liveliness::Alive,
            crash_loop: false,
            failed_reclaim: false,
            allocation: project.map(|p| Allocation {
                id: AllocationId(uuid::Uuid::from_u128(n)),
                machine: MachineId(uuid::Uuid::from_u128(n)),
                project: p.into(),
                partition: partition.into(),
                image: "i".into(),
                hostname: "h".into(),
                layout: "l".into(),
                ssh_keys: vec![],
                user_data: String::new(),
                created_at: String::new(),
                idempotency_key: None,
            }),
            inventory: None,
            boot: None,
            last_seen: None,
        };
        use ProvisioningEvent::*;
        let all = vec![
            m(1, "lab", "small", Waiting, None),
            m(2, "lab", "large", PhonedHome, Some("a")),
            m(3, "fra", "small", PhonedHome, Some("b")),
        ];
        let ids = |args: &[&str]| {
            let mut argv = vec!["metalctl", "machine", "ls"];
            argv.extend_from_slice(args);
            let Cli { command: Command::Machine(MachineCmd::Ls(ls)), .. } = Cli::try_parse_from(argv).unwrap() else {
                panic!("not machine ls")
            };
            filter_machines(all.clone(), &ls).iter().map(|m| m.id.0.as_u128()).collect::<Vec<_>>()
        };
        assert_eq!(ids(&[]), [1, 2, 3]);
        assert_eq!(ids(&["--partition", "lab"]), [1, 2]);
        assert_eq!(ids(&["--size", "small"]), [1, 3]);
        assert_eq!(ids(&["--project", "b"]), [3]);
        assert_eq!(ids(&["--state", "phoned-home", "--partition", "lab"]), [2]);
        assert_eq!(ids(&["--state", "Installing"]), Vec::<u128>::new());
    }

    #[test]
    fn event_names_parse_loosely() {
        assert_eq!(parse_event("Phoned Home"), Ok(ProvisioningEvent::PhonedHome));
        assert_eq!(parse_event("phoned-home"), Ok(ProvisioningEvent::PhonedHome));
        assert_eq!(parse_event("PXE_BOOTING"), Ok(ProvisioningEvent::PxeBooting));
        let err = parse_event("Done").unwrap_err();
        assert!(err.contains("Phoned Home") && err.contains("Crashed"), "{err}");
    }

    #[test]
    fn allocate_needs_size_or_machine() {
        let base = ["metalctl", "machine", "allocate", "--project", "p", "--partition", "lab", "--image", "i", "--hostname", "h"];
        assert!(Cli::try_parse_from(base).is_err());
        assert!(Cli::try_parse_from(base.iter().chain(&["--size", "small"])).is_ok());
        assert!(Cli::try_parse_from(base.iter().chain(&["--machine", "00000000-0000-0000-0000-000000000001"])).is_ok());
        assert!(Cli::try_parse_from(base.iter().chain(&["--machine", "nope"])).is_err());
        assert!(Cli::try_parse_from(base.iter().chain(&["--size", "s", "--timeout-s", "5"])).is_err());
        assert!(Cli::try_parse_from(base.iter().chain(&[
            "--size",
            "s",
            "--wait-for",
            "phoned home",
            "--timeout-s",
            "5",
            "-o",
            "json"
        ]))
        .is_ok());
    }

    #[test]
    fn image_create_takes_a_file_or_a_manifest_with_url() {
        assert!(Cli::try_parse_from(["metalctl", "image", "create", "-f", "i.yaml"]).is_ok());
        assert!(Cli::try_parse_from(["metalctl", "image", "create", "--manifest", "m.json", "--url", "http://x"]).is_ok());
        assert!(Cli::try_parse_from(["metalctl", "image", "create", "--manifest", "m.json"]).is_err());
        assert!(Cli::try_parse_from(["metalctl", "image", "create"]).is_err());
        assert!(Cli::try_parse_from(["metalctl", "image", "create", "-f", "i.yaml", "--manifest", "m", "--url", "u"]).is_err());
    }
}
