//! `pixie --config pixie.toml`: DHCP, TFTP and HTTP for one partition.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use pixie::api::{ApiClient, DecisionCache, EventQueue};
use pixie::config::{Config, TokenSource};
use pixie::files::{Layout, LocalDir};
use pixie::http::{HttpLimits, HttpState, StaticDirs};
use pixie::metrics::Metrics;

#[derive(Debug, Parser)]
#[command(version, about = "pixie: DHCP, TFTP and HTTP boot service driven by the metal API")]
struct Cli {
    /// The TOML configuration file.
    #[arg(long, short = 'c', env = "PIXIE_CONFIG")]
    config: PathBuf,
    /// Overrides dhcp.interface.
    #[arg(long)]
    interface: Option<String>,
    /// Overrides api.url.
    #[arg(long)]
    api_url: Option<String>,
    /// Overrides api.token / api.token_file: read the token from this file.
    #[arg(long)]
    api_token_file: Option<PathBuf>,
    /// Overrides http.listen.
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Overrides tftp.listen.
    #[arg(long)]
    tftp_listen: Option<SocketAddr>,
    /// Run without DHCP even when the file configures it.
    #[arg(long)]
    no_dhcp: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let sub = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if cli.log_json {
        sub.json().init();
    } else {
        sub.init();
    }
    if let Err(e) = run(cli) {
        eprintln!("pixie: {e:#}");
        std::process::exit(1);
    }
}

fn apply_overrides(cfg: &mut Config, cli: &Cli) {
    if let (Some(i), Some(d)) = (&cli.interface, cfg.dhcp.as_mut()) {
        d.interface = i.clone();
    }
    if let Some(u) = &cli.api_url {
        cfg.api.url = u.trim_end_matches('/').to_string();
    }
    if let Some(p) = &cli.api_token_file {
        cfg.api.token = TokenSource::File(p.clone());
    }
    if let Some(l) = cli.http_listen {
        cfg.http.listen = l;
    }
    if let (Some(l), Some(t)) = (cli.tftp_listen, cfg.tftp.as_mut()) {
        t.listen = l;
    }
    if cli.no_dhcp {
        cfg.dhcp = None;
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut cfg = Config::load(&cli.config)?;
    apply_overrides(&mut cfg, &cli);
    let token = cfg.api.read_token()?;
    let roots = metal_client::tls::Roots::from_ca_file(cfg.api.ca_file.as_deref())?;
    if cli.check {
        println!("{}: ok", cli.config.display());
        return Ok(());
    }
    raise_descriptor_limit(&cfg);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    rt.block_on(serve(cfg, token, roots))
}

async fn serve(cfg: Config, token: String, roots: metal_client::tls::Roots) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let api = ApiClient::with_roots(&cfg.api.url, &token, cfg.api.timeout, &roots)?;
    let events = EventQueue::spawn(api.clone(), 1024, metrics.clone());

    if let Some(t) = &cfg.tftp {
        let boot_files: Vec<&str> = match &cfg.dhcp {
            Some(d) => [Some(d.boot.bios_file.as_str()), Some(d.boot.uefi_file.as_str()), d.boot.uefi_arm64_file.as_deref()]
                .into_iter()
                .flatten()
                .collect(),
            None => vec![],
        };
        let addr = pixie::tftp::server::start(t, metrics.clone(), &boot_files).await?;
        tracing::info!(%addr, "TFTP started");
    }
    if let Some(d) = &cfg.dhcp {
        let handler =
            pixie::dhcp::server::Handler::new(Arc::new(d.clone()), cfg.partition.clone(), events.clone(), metrics.clone())?;
        pixie::dhcp::server::start(Arc::new(handler))?;
    }
    let hammer = cfg.http.hammer_dir.as_deref().map(|d| LocalDir::new(d, Layout::Flat));
    let hammer_upstream = cfg.http.hammer_url.as_deref().map(|u| pixie::files::Upstream::new(u, cfg.http.hammer_cache));
    let boot = cfg.tftp.as_ref().map(|t| LocalDir::new(&t.root, Layout::Tree).allow(&t.symlink_targets));
    let state = Arc::new(HttpState {
        decisions: DecisionCache::new(api, cfg.http.decision_cache),
        hammer,
        hammer_upstream,
        boot,
        partition: cfg.partition.clone(),
        public_url: cfg.http.public_url.clone(),
        metrics,
        limits: HttpLimits {
            max_connections: cfg.http.max_connections,
            header_timeout: cfg.http.header_timeout,
            idle_timeout: cfg.http.idle_timeout,
            body_timeout: cfg.http.body_timeout,
        },
    });
    let dirs = StaticDirs { images: cfg.http.images_dir.clone() };
    let listener =
        tokio::net::TcpListener::bind(cfg.http.listen).await.with_context(|| format!("binding HTTP on {}", cfg.http.listen))?;
    tracing::info!(listen = %cfg.http.listen, public_url = %cfg.http.public_url, partition = %cfg.partition, decision_cache = ?cfg.http.decision_cache, "HTTP listening");
    pixie::http::serve(listener, state, &dirs, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}

/// Raises the soft descriptor limit to the hard one (every TFTP transfer holds a socket and a
/// file, every HTTP connection a socket) and logs it; warns when even that is below what the
/// configured limits may need.
fn raise_descriptor_limit(cfg: &Config) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit read and write one rlimit in a live stack variable.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot read the descriptor limit (RLIMIT_NOFILE)");
        return;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), soft = before, hard = lim.rlim_max, "cannot raise the descriptor limit");
            lim.rlim_cur = before;
        }
    }
    let tftp = cfg.tftp.as_ref().map_or(0, |t| 2 * t.max_transfers as u64);
    let need = tftp + cfg.http.max_connections as u64 + 64;
    if lim.rlim_cur < need {
        tracing::warn!(
            limit = lim.rlim_cur, need,
            "descriptor limit below 2 × tftp.max_transfers + http.max_connections + 64: raise the hard limit (LimitNOFILE= in systemd) or lower those settings"
        );
    } else {
        tracing::info!(limit = lim.rlim_cur, was = before, "descriptor limit");
    }
}
