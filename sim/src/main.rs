//! metal-sim: the API at data-center size.
//!
//! Starts `--replicas` real metal-api processes on one database (SQLite in a temporary
//! directory, or `--db postgres://…`), then `--machines` simulated machines
//! (`metal_client::sim::SimAgent`) that PXE boot through the boot decision, register, report
//! their wipe and `Waiting`, and long-poll `wait` like metal-hammer — parked, heartbeating. Then:
//!
//! 1. **at rest**: the API's CPU and RSS (from `/proc`) with every machine parked;
//! 2. **ingestion**: 64 workers send heartbeats (`wait?timeout_s=0`) and `Alive` events with
//!    machine credentials for a few seconds;
//! 3. **allocation**: `--tenants` tenants (one project each) allocate from the pool, the machine
//!    installs and phones home, the tenant frees it, the machine reboots into the pool again —
//!    for `--alloc-seconds`; allocation latency, the time from the allocation request to the
//!    machine's `Installing`, and double allocations (a machine handed out while it was still
//!    allocated, seen by the tenants and checked against `GET /v1/allocations`) are counted.
//!
//! It prints Markdown rows for `docs/BENCHMARKS.md` and, with `--json`, writes the figures.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use metal_client::api::Client;
use metal_client::sim::{self, SimAgent};
use metal_types::*;
use rand::RngCore;
use tokio::sync::{Notify, Semaphore};

#[derive(Parser, Debug, Clone)]
#[command(name = "metal-sim", about = "N simulated machines and tenants against real metal-api processes")]
struct Args {
    /// The metal-api binary.
    #[arg(long, default_value = "target/release/metal-api")]
    api_bin: PathBuf,
    /// `sqlite` (a file in a temporary directory) or a `postgres://` URL (an empty database).
    #[arg(long, default_value = "sqlite")]
    db: String,
    /// API processes on the database (PostgreSQL only for more than one).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    #[arg(long, default_value_t = 10_000)]
    machines: u32,
    #[arg(long, default_value_t = 64)]
    tenants: u32,
    /// Seconds of allocating and freeing.
    #[arg(long, default_value_t = 30)]
    alloc_seconds: u64,
    /// Seconds of the ingestion phase.
    #[arg(long, default_value_t = 5)]
    ingest_seconds: u64,
    /// Machines joining the pool at once.
    #[arg(long, default_value_t = 128)]
    join_concurrency: usize,
    /// Seconds each parked long-poll lasts.
    #[arg(long, default_value_t = 30)]
    wait_s: u64,
    /// The label of the Markdown rows.
    #[arg(long, default_value = "SQLite")]
    label: String,
    /// Write the figures as JSON here too.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What one run measured.
#[derive(Debug, Default, serde::Serialize)]
struct Report {
    label: String,
    machines: u32,
    replicas: usize,
    join_s: f64,
    rest_cpu_percent: f64,
    rest_rss_mib: f64,
    heartbeats_per_s: f64,
    events_per_s: f64,
    allocations: u64,
    allocations_per_s: f64,
    alloc_p50_ms: f64,
    alloc_p99_ms: f64,
    alloc_max_ms: f64,
    to_installing_p50_ms: f64,
    to_installing_p99_ms: f64,
    pool_empty: u64,
    errors: u64,
    double_allocations: u64,
}

/// One API process.
struct Replica {
    child: Child,
    url: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Replica {
    /// User plus system CPU seconds and resident MiB, from `/proc/<pid>`.
    fn usage(&self) -> Result<(f64, f64)> {
        let pid = self.child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command (which may hold spaces) start after the last ')'.
        let rest: Vec<&str> = stat.rsplit_once(')').context("/proc/pid/stat")?.1.split_whitespace().collect();
        let ticks: f64 = rest[11].parse::<f64>()? + rest[12].parse::<f64>()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .context("VmRSS")?
            .trim()
            .trim_end_matches(" kB")
            .trim()
            .parse()?;
        Ok((ticks / 100.0, rss_kib / 1024.0))
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn start_replicas(args: &Args, dir: &std::path::Path, admin: &str) -> Result<Vec<Replica>> {
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, admin)?;
    let db = if args.db == "sqlite" { format!("sqlite://{}", dir.join("metal.db").display()) } else { args.db.clone() };
    if args.replicas > 1 && !db.starts_with("postgres") {
        bail!("several replicas need PostgreSQL (--db postgres://…)");
    }
    let mut replicas = Vec::new();
    for i in 0..args.replicas {
        let port = free_port()?;
        let log = std::fs::File::create(dir.join(format!("api-{i}.log")))?;
        let child = Command::new(&args.api_bin)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--db", &db])
            .arg("--admin-token-file")
            .arg(&token_file)
            // Every parked machine holds a connection.
            .args(["--max-connections", &(args.machines as u64 + 2048).to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (build it: cargo build --release -p metal-api)", args.api_bin.display()))?;
        replicas.push(Replica { child, url: format!("http://127.0.0.1:{port}") });
        // The first one creates the schema; the next ones start on it.
        let c = Client::new(&replicas[i].url, None, None)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while c.health().await.is_err() {
            if Instant::now() > deadline {
                bail!("metal-api {i} did not come up; see {}", dir.join(format!("api-{i}.log")).display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(replicas)
}

/// The catalog: partition `sim`, size `small`, a layout, an image, a project and tenant token
/// per tenant, and pixie's token. Returns (pixie token, tenant tokens).
async fn catalog(admin: &Client, api_url: &str, tenants: u32) -> Result<(String, Vec<String>)> {
    let partition = Partition {
        id: "sim".into(),
        description: "metal-sim".into(),
        boot: PartitionBoot {
            kernel_url: "http://127.0.0.1:1/hammer/vmlinuz".into(),
            initrd_url: "http://127.0.0.1:1/hammer/initrd.img".into(),
            cmdline: String::new(),
            api_url: api_url.into(),
        },
    };
    admin.create(&partition).await?;
    let size = Size {
        id: "small".into(),
        description: String::new(),
        constraints: vec![SizeConstraint { kind: ConstraintKind::Cores, min: 1, max: 64 }],
    };
    admin.create(&size).await?;
    let layout: FilesystemLayout = serde_json::from_value(serde_json::json!({"id": "root",
        "disks": [{"device": "first", "partitions": [{"number": 1, "label": "root", "size_mib": 0, "type": "linux"}]}],
        "filesystems": [{"source": "first:1", "kind": "ext4", "mount": "/"}]}))?;
    admin.create(&layout).await?;
    let image: Image = serde_json::from_value(serde_json::json!({
        "url": "http://127.0.0.1:1/images/sim-1.tar.zst", "name": "sim", "version": "1", "format": "tar.zst",
        "compressed_size": 1, "uncompressed_size": 1, "sha256": "a".repeat(64), "kernel": "boot/vmlinuz"}))?;
    admin.create(&image).await?;
    let req = |role, project: Option<String>| TokenRequest { role, project, description: "metal-sim".into(), expires_in_s: None };
    let pixie = admin.create_token(&req(TokenRole::Pixie, None)).await?.token;
    let mut tokens = Vec::new();
    for t in 0..tenants {
        let id = format!("t{t}");
        admin.create(&Project { id: id.clone(), description: String::new() }).await?;
        tokens.push(admin.create_token(&req(TokenRole::Tenant, Some(id))).await?.token);
    }
    Ok((pixie, tokens))
}

/// What a machine and the tenant that allocated it tell each other.
#[derive(Default)]
struct Slot {
    /// When the machine reported `Installing`.
    installing_at: Mutex<Option<Instant>>,
    /// The machine phoned home (a permit waits when the tenant is not listening yet).
    done: Notify,
    /// The tenant freed it: reboot into the pool.
    reboot: Notify,
}

struct Shared {
    slots: HashMap<MachineId, Arc<Slot>>,
    /// Credentials of registered machines (the ingestion phase uses some).
    credentials: Mutex<Vec<String>>,
    joined: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

/// One machine's life: join the pool, park in `wait`, install and phone home when allocated,
/// wait to be freed, join again.
async fn machine(agent: SimAgent, pixie: Client, shared: Arc<Shared>, joins: Arc<Semaphore>, wait_s: u64) {
    let mut agent = agent;
    let slot = shared.slots[&agent.id()].clone();
    let mut first = true;
    'life: loop {
        {
            let _permit = joins.acquire().await;
            let mut tries = 0;
            while let Err(e) = agent.join_pool(&pixie).await {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                tries += 1;
                if tries > 20 || shared.stop.load(Ordering::Relaxed) {
                    eprintln!("machine {} cannot join the pool: {e}", agent.id());
                    return;
                }
                tokio::time::sleep(metal_client::api::backoff(tries, Duration::from_millis(200), Duration::from_secs(5))).await;
            }
        }
        if first {
            shared.credentials.lock().unwrap().push(agent.credential.clone());
            shared.joined.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        let ins = loop {
            if shared.stop.load(Ordering::Relaxed) {
                return;
            }
            match agent.wait(wait_s).await {
                Ok(Some(ins)) => break ins,
                Ok(None) => {}
                Err(_) => {
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let installed = async {
            agent.events(&[(ProvisioningEvent::Installing, "sim")]).await?;
            *slot.installing_at.lock().unwrap() = Some(Instant::now());
            agent.install(&ins).await?;
            agent.phone_home(&ins).await
        };
        if installed.await.is_err() {
            shared.errors.fetch_add(1, Ordering::Relaxed);
        }
        slot.done.notify_one();
        slot.reboot.notified().await;
        if shared.stop.load(Ordering::Relaxed) {
            break 'life;
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[derive(Default)]
struct TenantResult {
    latencies_ms: Vec<f64>,
    to_installing_ms: Vec<f64>,
    pool_empty: u64,
    errors: u64,
}

async fn tenant(
    client: Client,
    project: String,
    shared: Arc<Shared>,
    active: Arc<Mutex<HashSet<MachineId>>>,
    doubles: Arc<AtomicU64>,
    until: Instant,
) -> TenantResult {
    let mut r = TenantResult::default();
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let req = AllocationRequest {
            project: project.clone(),
            partition: "sim".into(),
            size: Some("small".into()),
            machine: None,
            image: "sim".into(),
            hostname: format!("{project}-{n}"),
            layout: None,
            ssh_keys: vec![],
            user_data: String::new(),
            idempotency_key: None,
        };
        let start = Instant::now();
        let a = match client.allocate(&req).await {
            Ok(a) => a.allocation,
            Err(e) if e.code() == Some("no_machine_available") => {
                r.pool_empty += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(_) => {
                r.errors += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        r.latencies_ms.push(start.elapsed().as_secs_f64() * 1e3);
        if !active.lock().unwrap().insert(a.machine) {
            doubles.fetch_add(1, Ordering::Relaxed);
        }
        let slot = shared.slots[&a.machine].clone();
        if tokio::time::timeout(Duration::from_secs(60), slot.done.notified()).await.is_err() {
            r.errors += 1;
        }
        if let Some(at) = slot.installing_at.lock().unwrap().take() {
            r.to_installing_ms.push(at.saturating_duration_since(start).as_secs_f64() * 1e3);
        }
        active.lock().unwrap().remove(&a.machine);
        if client.free_machine(a.machine).await.is_err() {
            r.errors += 1;
        }
        slot.reboot.notify_one();
    }
    r
}

async fn run(args: Args) -> Result<Report> {
    let dir = tempfile::tempdir()?;
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let admin_token = hex::encode(key);
    let replicas = start_replicas(&args, dir.path(), &admin_token).await?;
    let clients: Vec<Client> = replicas.iter().map(|r| Client::new(&r.url, None, None)).collect::<Result<_, _>>()?;
    let admin = clients[0].with_token(admin_token.clone());
    let (pixie_token, tenant_tokens) = catalog(&admin, &replicas[0].url, args.tenants).await?;
    let mut report = Report { label: args.label.clone(), machines: args.machines, replicas: args.replicas, ..Default::default() };

    // Join.
    let shared = Arc::new(Shared {
        slots: (0..args.machines).map(|n| (sim::machine_id(n), Arc::new(Slot::default()))).collect(),
        credentials: Mutex::new(Vec::new()),
        joined: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    let joins = Arc::new(Semaphore::new(args.join_concurrency));
    let t = Instant::now();
    let mut machines = Vec::new();
    for n in 0..args.machines {
        let c = &clients[n as usize % clients.len()];
        let agent = SimAgent::new(c, "sim", n);
        machines.push(tokio::spawn(machine(
            agent,
            c.with_token(pixie_token.clone()),
            shared.clone(),
            joins.clone(),
            args.wait_s,
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while shared.joined.load(Ordering::Relaxed) < u64::from(args.machines) {
        if Instant::now() > deadline {
            bail!("only {} of {} machines joined within 600 s", shared.joined.load(Ordering::Relaxed), args.machines);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report.join_s = t.elapsed().as_secs_f64();
    eprintln!("{}: {} machines joined in {:.1} s", args.label, args.machines, report.join_s);

    // At rest: every machine parked in a long-poll.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before: Vec<(f64, f64)> = replicas.iter().map(Replica::usage).collect::<Result<_>>()?;
    let window = 10.0;
    tokio::time::sleep(Duration::from_secs_f64(window)).await;
    let after: Vec<(f64, f64)> = replicas.iter().map(Replica::usage).collect::<Result<_>>()?;
    report.rest_cpu_percent = before.iter().zip(&after).map(|(b, a)| (a.0 - b.0) / window * 100.0).sum();
    report.rest_rss_mib = after.iter().map(|a| a.1).sum();

    // Ingestion: heartbeats and events from 64 machines' credentials.
    let creds: Vec<String> = shared.credentials.lock().unwrap().iter().take(64).cloned().collect();
    for events in [false, true] {
        let until = Instant::now() + Duration::from_secs(args.ingest_seconds);
        let count = Arc::new(AtomicU64::new(0));
        let mut workers = Vec::new();
        for (i, cred) in creds.iter().enumerate() {
            let c = clients[i % clients.len()].with_token(cred.clone());
            let count = count.clone();
            workers.push(tokio::spawn(async move {
                let batch = EventBatch {
                    events: vec![EventReport { event: ProvisioningEvent::Alive, time_ms: sim::now_ms(), message: "sim".into() }],
                };
                while Instant::now() < until {
                    let ok = if events { c.events(&batch).await.is_ok() } else { c.wait(0).await.is_ok() };
                    if ok {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for w in workers {
            w.await?;
        }
        let rate = count.load(Ordering::Relaxed) as f64 / args.ingest_seconds as f64;
        if events {
            report.events_per_s = rate;
        } else {
            report.heartbeats_per_s = rate;
        }
    }

    // Allocation under load.
    let active = Arc::new(Mutex::new(HashSet::new()));
    let doubles = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(args.alloc_seconds);
    let started = Instant::now();
    let mut tenants = Vec::new();
    for (t, token) in tenant_tokens.iter().enumerate() {
        let c = clients[t % clients.len()].with_token(token.clone());
        tenants.push(tokio::spawn(tenant(c, format!("t{t}"), shared.clone(), active.clone(), doubles.clone(), until)));
    }
    let mut lat = Vec::new();
    let mut inst = Vec::new();
    for t in tenants {
        let r = t.await?;
        lat.extend(r.latencies_ms);
        inst.extend(r.to_installing_ms);
        report.pool_empty += r.pool_empty;
        report.errors += r.errors;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    inst.sort_by(f64::total_cmp);
    report.allocations = lat.len() as u64;
    report.allocations_per_s = lat.len() as f64 / elapsed;
    report.alloc_p50_ms = percentile(&lat, 0.5);
    report.alloc_p99_ms = percentile(&lat, 0.99);
    report.alloc_max_ms = lat.last().copied().unwrap_or(0.0);
    report.to_installing_p50_ms = percentile(&inst, 0.5);
    report.to_installing_p99_ms = percentile(&inst, 0.99);
    // The API's view: every tenant freed what it allocated, so none may be left, and no machine
    // may ever hold two.
    let left = admin.allocations().await?;
    let machines_left: HashSet<MachineId> = left.iter().map(|a| a.machine).collect();
    report.double_allocations = doubles.load(Ordering::Relaxed) + (left.len() - machines_left.len()) as u64;
    report.errors += shared.errors.load(Ordering::Relaxed);

    shared.stop.store(true, Ordering::Relaxed);
    for m in machines {
        m.abort();
    }
    drop(replicas);
    Ok(report)
}

fn markdown(r: &Report) -> String {
    format!(
        "| {} ({} API{}) | {} | {:.0} s | {:.1} % / {:.0} MiB | {:.0} / {:.0} | {} ({:.0}/s) | {:.1} / {:.1} / {:.1} | {:.0} / {:.0} | {} |",
        r.label,
        r.replicas,
        if r.replicas > 1 { "s" } else { "" },
        r.machines,
        r.join_s,
        r.rest_cpu_percent,
        r.rest_rss_mib,
        r.heartbeats_per_s,
        r.events_per_s,
        r.allocations,
        r.allocations_per_s,
        r.alloc_p50_ms,
        r.alloc_p99_ms,
        r.alloc_max_ms,
        r.to_installing_p50_ms,
        r.to_installing_p99_ms,
        r.double_allocations
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(run(args.clone()))?;
    println!("{}", markdown(&report));
    eprintln!("pool empty: {}, errors: {}", report.pool_empty, report.errors);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    if report.double_allocations > 0 {
        bail!("{} double allocations", report.double_allocations);
    }
    Ok(())
}
