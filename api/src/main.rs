//! `metal-api`: the allocation API server.

use anyhow::Context;
use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SqliteSync {
    Full,
    Normal,
}

#[derive(Debug, Parser)]
#[command(name = "metal-api", about = "The allocation API of the bare-metal cloud", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the log says which).
    #[arg(long, env = "METAL_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Database URL: `sqlite://metal.db` (created if missing) or `postgres://user:pass@host/db`.
    #[arg(long, env = "METAL_DB", default_value = "sqlite://metal.db")]
    db: String,
    /// Bootstrap: make sure an admin token with this value exists.
    #[arg(long, env = "METAL_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Lifetime of enrolment tokens handed to booting machines, in seconds.
    #[arg(long, env = "METAL_ENROLMENT_TTL_S", default_value_t = 3600)]
    enrolment_ttl_s: u64,
    /// A machine not heard from for this many seconds is Dead and not allocated.
    #[arg(long, env = "METAL_DEAD_AFTER_S", default_value_t = 60)]
    dead_after_s: u64,
    /// A reclaim that does not reach Waiting within this many seconds is a failed reclaim.
    #[arg(long, env = "METAL_RECLAIM_TIMEOUT_S", default_value_t = 900)]
    reclaim_timeout_s: u64,
    /// SQLite durability: `full` fsyncs every commit; `normal` (WAL) survives a crash of the API
    /// but may lose the last commits on a power loss of the host, and is several times faster.
    #[arg(long, env = "METAL_SQLITE_SYNC", value_enum, default_value = "full")]
    sqlite_sync: SqliteSync,
    /// How long (ms) the API keeps what the boot decision reads: partitions, long-lived tokens
    /// (a token deleted in the database stops working within this time) and the enrolment key.
    #[arg(long, env = "METAL_CACHE_TTL_MS", default_value_t = 5000)]
    cache_ttl_ms: u64,
    /// Log format.
    #[arg(long, env = "METAL_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("metal-api: error: {e:#}");
        std::process::exit(1);
    }
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    match args.log_format {
        LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
            .init(),
        LogFormat::Json => tracing_subscriber::fmt().json().with_env_filter(filter).init(),
    }
    let config = metal_api::Config {
        db: args.db.clone(),
        admin_token: args.admin_token.clone(),
        enrolment_ttl_s: args.enrolment_ttl_s,
        dead_after_s: args.dead_after_s,
        reclaim_timeout_s: args.reclaim_timeout_s,
        sqlite_sync_normal: args.sqlite_sync == SqliteSync::Normal,
        cache_ttl_ms: args.cache_ttl_ms,
    };
    let mut running = metal_api::start(config, &args.listen).await.context("starting the API")?;
    tracing::info!(addr = %running.addr, db = %redact(&args.db), "listening on {}", running.addr);
    tokio::select! {
        r = running.join() => return r.context("serving"),
        _ = shutdown_signal() => {}
    }
    tracing::info!("shutting down: finishing requests in flight");
    running.stop().await;
    Ok(())
}

/// The database URL without a password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
