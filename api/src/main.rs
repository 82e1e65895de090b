//! `metal-api`: the allocation API server.

use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// Bootstrap: make sure an admin token with this value exists. Prefer the environment or
    /// `--admin-token-file`: a command line is visible to every user of the host.
    #[arg(long, env = "METAL_ADMIN_TOKEN", hide_env_values = true, conflicts_with = "admin_token_file")]
    admin_token: Option<String>,
    /// Bootstrap: like `--admin-token`, the value read from this file (surrounding whitespace
    /// trimmed; keep it 0600).
    #[arg(long, env = "METAL_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// HTTPS: the server's certificate chain (PEM, its own certificate first). Needs `--tls-key`.
    /// Without both the API serves plain HTTP.
    #[arg(long, env = "METAL_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// HTTPS: the private key of `--tls-cert` (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "METAL_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Seconds a client has for a whole request head, from its connection (or its first byte
    /// after an idle keep-alive period).
    #[arg(long, env = "METAL_HTTP_HEADER_TIMEOUT_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    http_header_timeout_s: u64,
    /// Seconds a kept-alive connection may sit idle between requests, and a response may make
    /// no progress because the client does not read it.
    #[arg(long, env = "METAL_HTTP_IDLE_TIMEOUT_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    http_idle_timeout_s: u64,
    /// Seconds a client has for a whole request body, from the end of its head.
    #[arg(long, env = "METAL_HTTP_BODY_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    http_body_timeout_s: u64,
    /// Seconds a client has for the TLS handshake, from its connection.
    #[arg(long, env = "METAL_TLS_HANDSHAKE_TIMEOUT_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    tls_handshake_timeout_s: u64,
    /// Most connections open at once; further ones wait in the listen backlog until one closes.
    #[arg(long, env = "METAL_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
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
    /// Lifetime of an allocation's phone-home token in seconds, counted from the allocation (it
    /// is deleted when the allocation is freed). The installed OS phones home at every boot.
    #[arg(long, env = "METAL_PHONE_HOME_TTL_S", default_value_t = 7 * 86_400)]
    phone_home_ttl_s: u64,
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
    let admin_token = match &args.admin_token_file {
        Some(path) => Some(read_token_file(path)?),
        None => args.admin_token.clone(),
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(metal_api::serve::TlsFiles { cert: cert.clone(), key: key.clone() }),
        _ => None,
    };
    if tls.is_none() {
        tracing::warn!(
            "serving plain HTTP: bearer tokens, enrolment credentials and install instructions travel in clear; give --tls-cert and --tls-key"
        );
    }
    let limits = metal_api::serve::Limits {
        header_read_timeout: Duration::from_secs(args.http_header_timeout_s),
        idle_timeout: Duration::from_secs(args.http_idle_timeout_s),
        body_read_timeout: Duration::from_secs(args.http_body_timeout_s),
        tls_handshake_timeout: Duration::from_secs(args.tls_handshake_timeout_s),
        max_connections: args.max_connections as usize,
    };
    let config = metal_api::Config {
        db: args.db.clone(),
        admin_token,
        enrolment_ttl_s: args.enrolment_ttl_s,
        dead_after_s: args.dead_after_s,
        reclaim_timeout_s: args.reclaim_timeout_s,
        sqlite_sync_normal: args.sqlite_sync == SqliteSync::Normal,
        cache_ttl_ms: args.cache_ttl_ms,
        phone_home_ttl_s: args.phone_home_ttl_s,
        tls,
        limits,
        clock: Default::default(),
    };
    let mut running = metal_api::start(config, &args.listen).await.context("starting the API")?;
    tracing::info!(addr = %running.addr, url = %running.base_url(), db = %redact(&args.db), "listening on {}", running.addr);
    tokio::select! {
        r = running.join() => return r.context("serving"),
        _ = shutdown_signal() => {}
    }
    tracing::info!("shutting down: finishing requests in flight");
    running.stop().await;
    Ok(())
}

/// The bootstrap admin token from `--admin-token-file`.
fn read_token_file(path: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the admin token file {}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        anyhow::bail!("the admin token file {} is empty", path.display());
    }
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", m.permissions().mode() & 0o777), "the admin token file is readable by others; chmod 600 it");
        }
    }
    Ok(token.to_string())
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
