//! Configuration in two steps: the strict TOML shape ([`File`], unknown keys are errors that
//! name the key) and the validated runtime types ([`Config`]) built from it with `TryFrom`.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{0}")]
    Value(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Value(msg.into())
}

/// MAC addresses are `metal_types::Mac` in every crate (one parser, one printed form).
pub use metal_types::Mac;

// ---------------------------------------------------------------------------------------------
// The file as written
// ---------------------------------------------------------------------------------------------

/// The TOML file exactly as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub partition: String,
    pub api: FileApi,
    #[serde(default)]
    pub dhcp: Option<FileDhcp>,
    #[serde(default)]
    pub tftp: Option<FileTftp>,
    pub http: FileHttp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileApi {
    pub url: String,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// How long the HTTP iPXE endpoint waits for the API before it answers with a retry script.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// PEM bundle that an `https://` API's certificate must chain to (instead of the system's
    /// trust store).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DhcpMode {
    /// Hands out addresses and boot information.
    Server,
    /// Beside another DHCP server: boot information for PXE clients only, never an address.
    Proxy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDhcp {
    pub mode: DhcpMode,
    pub interface: String,
    pub server_ip: Ipv4Addr,
    #[serde(default)]
    pub pool: Option<FilePool>,
    /// More pools, for relayed subnets (chosen by giaddr).
    #[serde(default)]
    pub pools: Vec<FilePool>,
    #[serde(default)]
    pub reservations: Vec<FileReservation>,
    #[serde(default)]
    pub lease_file: Option<PathBuf>,
    #[serde(default)]
    pub boot: Option<FileBoot>,
    /// At most one `PXE Booting` event per MAC within this many seconds (5); 0 reports every
    /// PXE DISCOVER. DHCP answers are never held back.
    #[serde(default)]
    pub pxe_event_interval_s: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePool {
    pub subnet: String,
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
    #[serde(default)]
    pub router: Option<Ipv4Addr>,
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub lease_time_s: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileReservation {
    pub mac: String,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBoot {
    /// TFTP file for legacy BIOS PXE (option 93 = 0). Default `undionly.kpxe`.
    #[serde(default)]
    pub bios: Option<String>,
    /// TFTP file for x86-64 UEFI PXE (option 93 = 7 or 9). Default `snponly.efi`: it drives the
    /// NIC through the firmware, so when a script `exit`s (boot from local disk) the firmware
    /// carries on with its next boot option. Debian's `ipxe.efi` hangs there instead.
    #[serde(default)]
    pub uefi: Option<String>,
    /// TFTP file for ARM64 UEFI (option 93 = 11). No default: such clients get no boot file.
    #[serde(default)]
    pub uefi_arm64: Option<String>,
    /// URL for UEFI HTTP boot clients. Default `<http.public_url>/boot/<uefi file>`.
    #[serde(default)]
    pub uefi_http_url: Option<String>,
    /// TFTP server address put in siaddr (next-server). Default: `dhcp.server_ip`.
    #[serde(default)]
    pub tftp_server: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTftp {
    pub listen: SocketAddr,
    pub root: PathBuf,
    /// Directories outside `root` that symlinks inside it may lead into (Debian's `ipxe` package
    /// links `ipxe.efi` to `/boot/ipxe.efi`). Every other way out of the root is refused.
    #[serde(default)]
    pub symlink_targets: Vec<PathBuf>,
    /// Largest block size granted (RFC 2348 allows up to 65464).
    #[serde(default)]
    pub max_blksize: Option<u16>,
    /// Largest window granted (RFC 7440).
    #[serde(default)]
    pub max_windowsize: Option<u16>,
    /// Retransmissions of one window before the transfer is abandoned.
    #[serde(default)]
    pub retries: Option<u32>,
    /// Transfers running at once, from all clients (256). Further RRQs are dropped unanswered.
    #[serde(default)]
    pub max_transfers: Option<usize>,
    /// Transfers running at once to one client address (32).
    #[serde(default)]
    pub max_transfers_per_client: Option<usize>,
    /// The longest `timeout` option granted, in seconds (5); a longer one is left out of the
    /// OACK and the default of 1 s applies (RFC 2349 allows no lower counter-offer).
    #[serde(default)]
    pub max_timeout_s: Option<u64>,
    /// How long one transfer may run at all, in seconds (120).
    #[serde(default)]
    pub max_session_s: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHttp {
    pub listen: SocketAddr,
    pub public_url: String,
    #[serde(default)]
    pub hammer_dir: Option<PathBuf>,
    /// Instead of `hammer_dir`: fetch `/hammer/<file>` from `<hammer_url>/<file>` and keep it in
    /// memory for `hammer_cache_s` (300).
    #[serde(default)]
    pub hammer_url: Option<String>,
    #[serde(default)]
    pub hammer_cache_s: Option<u64>,
    #[serde(default)]
    pub images_dir: Option<PathBuf>,
    /// How long a boot decision is reused for the same (MAC, UUID, arch), in ms; 0 turns the
    /// cache off. At most [`MAX_DECISION_CACHE_MS`].
    #[serde(default)]
    pub decision_cache_ms: Option<u64>,
    /// Connections open at once (1024); further ones get a `503` and are closed at once.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// How long a request head may take to arrive, in seconds (30).
    #[serde(default)]
    pub header_timeout_s: Option<u64>,
    /// How long a connection may sit without a request, or without taking the answer's bytes,
    /// in seconds (60).
    #[serde(default)]
    pub idle_timeout_s: Option<u64>,
    /// How long a request body may pause between two pieces, in seconds (60).
    #[serde(default)]
    pub body_timeout_s: Option<u64>,
}

// ---------------------------------------------------------------------------------------------
// Validated runtime types
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Config {
    pub partition: String,
    pub api: ApiConfig,
    pub dhcp: Option<DhcpConfig>,
    pub tftp: Option<TftpConfig>,
    pub http: HttpConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Inline(String),
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Without a trailing slash.
    pub url: String,
    pub token: TokenSource,
    pub timeout: Duration,
    /// `None`: the system's trust store.
    pub ca_file: Option<PathBuf>,
}

impl ApiConfig {
    /// The pixie token, read from its file when configured that way.
    pub fn read_token(&self) -> Result<String, ConfigError> {
        match &self.token {
            TokenSource::Inline(t) => Ok(t.clone()),
            TokenSource::File(p) => {
                let t = std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.clone(), source })?;
                let t = t.trim().to_string();
                if t.is_empty() {
                    return Err(invalid(format!("api.token_file {} is empty", p.display())));
                }
                Ok(t)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct DhcpConfig {
    pub mode: DhcpMode,
    pub interface: String,
    pub server_ip: Ipv4Addr,
    /// In server mode at least one; the first whose subnet holds `server_ip` serves the local link.
    pub pools: Vec<Pool>,
    pub reservations: HashMap<Mac, Reservation>,
    pub lease_file: Option<PathBuf>,
    pub boot: BootConfig,
    /// At most one `PXE Booting` event per MAC within this interval; zero: every DISCOVER.
    pub pxe_event_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: Ipv4Addr,
    pub hostname: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub network: Ipv4Addr,
    pub prefix: u8,
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    pub lease_time: Duration,
}

impl Pool {
    pub fn netmask(&self) -> Ipv4Addr {
        prefix_mask(self.prefix)
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.netmask()) == u32::from(self.network)
    }
    pub fn in_range(&self, ip: Ipv4Addr) -> bool {
        (u32::from(self.start)..=u32::from(self.end)).contains(&u32::from(ip))
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !u32::from(self.netmask()))
    }
}

fn prefix_mask(prefix: u8) -> Ipv4Addr {
    if prefix == 0 {
        Ipv4Addr::UNSPECIFIED
    } else {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix)))
    }
}

/// What each kind of client is offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    pub bios_file: String,
    pub uefi_file: String,
    pub uefi_arm64_file: Option<String>,
    pub uefi_http_url: String,
    pub tftp_server: Ipv4Addr,
    /// `<http.public_url>/ipxe`: iPXE clients get this plus `?mac=…&uuid=…&arch=…`.
    pub ipxe_script_url: String,
}

#[derive(Debug, Clone)]
pub struct TftpConfig {
    pub listen: SocketAddr,
    pub root: PathBuf,
    pub symlink_targets: Vec<PathBuf>,
    pub max_blksize: u16,
    pub max_windowsize: u16,
    pub retries: u32,
    pub max_transfers: usize,
    pub max_transfers_per_client: usize,
    pub max_timeout: Duration,
    pub max_session: Duration,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Without a trailing slash.
    pub public_url: String,
    pub hammer_dir: Option<PathBuf>,
    pub hammer_url: Option<String>,
    pub hammer_cache: Duration,
    pub images_dir: Option<PathBuf>,
    /// Zero: every `/ipxe` request asks the API.
    pub decision_cache: Duration,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_timeout: Duration,
}

/// The longest boot-decision cache allowed: below the time any machine needs from power-on to
/// its `/ipxe` request, and not above the shortest wait in pixie's retry scripts (2 s), so a
/// machine never gets an answer older than its own reboot (docs/pixie.md, "Decision cache").
pub const MAX_DECISION_CACHE_MS: u64 = 2000;

pub const DEFAULT_BIOS_FILE: &str = "undionly.kpxe";
/// `http.max_connections` when not set.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: usize = 1024;

/// A timeout in whole seconds, `default` when not set; 1 s to 1 h.
fn timeout_s(what: &str, value: Option<u64>, default: u64) -> Result<Duration, ConfigError> {
    match value.unwrap_or(default) {
        s if !(1..=3600).contains(&s) => Err(invalid(format!("{what} must be within 1..=3600 seconds"))),
        s => Ok(Duration::from_secs(s)),
    }
}
/// `tftp.max_transfers` and `tftp.max_transfers_per_client` when not set.
pub const DEFAULT_TFTP_MAX_TRANSFERS: usize = 256;
pub const DEFAULT_TFTP_MAX_PER_CLIENT: usize = 32;
/// `dhcp.pxe_event_interval_s` when not set.
pub const DEFAULT_PXE_EVENT_INTERVAL_S: u64 = 5;
pub const DEFAULT_UEFI_FILE: &str = "snponly.efi";

fn parse_subnet(s: &str) -> Result<(Ipv4Addr, u8), ConfigError> {
    let (addr, prefix) =
        s.split_once('/').ok_or_else(|| invalid(format!("subnet {s:?}: expected address/prefix, e.g. 10.99.0.0/24")))?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| invalid(format!("subnet {s:?}: bad address")))?;
    let prefix: u8 = prefix.parse().map_err(|_| invalid(format!("subnet {s:?}: bad prefix")))?;
    if prefix > 30 {
        return Err(invalid(format!("subnet {s:?}: prefix must be at most /30")));
    }
    let network = Ipv4Addr::from(u32::from(addr) & u32::from(prefix_mask(prefix)));
    if network != addr {
        return Err(invalid(format!("subnet {s:?}: host bits set (did you mean {network}/{prefix}?)")));
    }
    Ok((network, prefix))
}

fn check_http_url(what: &str, url: &str) -> Result<String, ConfigError> {
    let u = url.trim_end_matches('/');
    if !(u.starts_with("http://") || u.starts_with("https://")) || u.len() <= "http://".len() {
        return Err(invalid(format!("{what} {url:?} must be an http:// or https:// URL")));
    }
    if u.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(format!("{what} {url:?} contains whitespace")));
    }
    Ok(u.to_string())
}

fn check_file_name(what: &str, name: &str) -> Result<String, ConfigError> {
    if name.is_empty() || name.len() > 127 || !name.is_ascii() || name.chars().any(|c| c.is_control()) {
        return Err(invalid(format!("{what} {name:?} must be 1..127 printable ASCII characters")));
    }
    Ok(name.to_string())
}

impl TryFrom<FilePool> for Pool {
    type Error = ConfigError;
    fn try_from(p: FilePool) -> Result<Self, Self::Error> {
        let (network, prefix) = parse_subnet(&p.subnet)?;
        let pool = Pool {
            network,
            prefix,
            start: p.start,
            end: p.end,
            router: p.router,
            dns: p.dns,
            domain: p.domain,
            lease_time: Duration::from_secs(u64::from(p.lease_time_s.unwrap_or(3600))),
        };
        for (what, ip) in [("start", pool.start), ("end", pool.end)] {
            if !pool.contains(ip) || ip == pool.network || ip == pool.broadcast() {
                return Err(invalid(format!("pool {what} {ip} is not a host address of {}", p.subnet)));
            }
        }
        if u32::from(pool.start) > u32::from(pool.end) {
            return Err(invalid(format!("pool start {} is after end {}", pool.start, pool.end)));
        }
        if let Some(r) = pool.router {
            if !pool.contains(r) {
                return Err(invalid(format!("pool router {r} is outside {}", p.subnet)));
            }
        }
        if pool.lease_time < Duration::from_secs(60) {
            return Err(invalid("pool lease_time_s must be at least 60"));
        }
        if let Some(d) = &pool.domain {
            if d.is_empty() || d.len() > 253 || d.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(format!("pool domain {d:?} is not a domain name")));
            }
        }
        Ok(pool)
    }
}

impl TryFrom<File> for Config {
    type Error = ConfigError;
    fn try_from(f: File) -> Result<Self, Self::Error> {
        if f.partition.trim().is_empty() {
            return Err(invalid("partition must not be empty"));
        }
        let token = match (f.api.token, f.api.token_file) {
            (Some(t), None) if !t.trim().is_empty() => TokenSource::Inline(t.trim().to_string()),
            (None, Some(p)) => TokenSource::File(p),
            (Some(_), Some(_)) => return Err(invalid("api: give either token or token_file, not both")),
            _ => return Err(invalid("api: a token or token_file is required (pixie's token for the API)")),
        };
        let api = ApiConfig {
            url: check_http_url("api.url", &f.api.url)?,
            token,
            timeout: Duration::from_millis(f.api.timeout_ms.unwrap_or(2000).clamp(100, 60_000)),
            ca_file: f.api.ca_file,
        };
        let http = HttpConfig {
            listen: f.http.listen,
            public_url: check_http_url("http.public_url", &f.http.public_url)?,
            hammer_url: match (&f.http.hammer_dir, &f.http.hammer_url) {
                (Some(_), Some(_)) => return Err(invalid("http: give either hammer_dir or hammer_url, not both")),
                (_, Some(u)) => Some(check_http_url("http.hammer_url", u)?),
                _ => None,
            },
            hammer_cache: Duration::from_secs(f.http.hammer_cache_s.unwrap_or(300).max(1)),
            hammer_dir: f.http.hammer_dir,
            images_dir: f.http.images_dir,
            decision_cache: match f.http.decision_cache_ms.unwrap_or(1000) {
                ms if ms > MAX_DECISION_CACHE_MS => {
                    return Err(invalid(format!(
                        "http.decision_cache_ms {ms} is above {MAX_DECISION_CACHE_MS}: a cached decision must be younger than any reboot"
                    )))
                }
                ms => Duration::from_millis(ms),
            },
            max_connections: match f.http.max_connections.unwrap_or(DEFAULT_HTTP_MAX_CONNECTIONS) {
                n if !(1..=1_000_000).contains(&n) => return Err(invalid("http.max_connections must be within 1..=1000000")),
                n => n,
            },
            header_timeout: timeout_s("http.header_timeout_s", f.http.header_timeout_s, 30)?,
            idle_timeout: timeout_s("http.idle_timeout_s", f.http.idle_timeout_s, 60)?,
            body_timeout: timeout_s("http.body_timeout_s", f.http.body_timeout_s, 60)?,
        };
        let tftp = match f.tftp {
            None => None,
            Some(t) => {
                let max_blksize = t.max_blksize.unwrap_or(65464);
                if !(512..=65464).contains(&max_blksize) {
                    return Err(invalid("tftp.max_blksize must be within 512..=65464"));
                }
                let max_windowsize = t.max_windowsize.unwrap_or(64);
                if !(1..=1024).contains(&max_windowsize) {
                    return Err(invalid("tftp.max_windowsize must be within 1..=1024"));
                }
                let max_transfers = t.max_transfers.unwrap_or(DEFAULT_TFTP_MAX_TRANSFERS);
                if !(1..=65536).contains(&max_transfers) {
                    return Err(invalid("tftp.max_transfers must be within 1..=65536"));
                }
                let max_transfers_per_client = t.max_transfers_per_client.unwrap_or(DEFAULT_TFTP_MAX_PER_CLIENT);
                if !(1..=max_transfers).contains(&max_transfers_per_client) {
                    return Err(invalid(format!(
                        "tftp.max_transfers_per_client must be within 1..={max_transfers} (tftp.max_transfers)"
                    )));
                }
                let max_timeout_s = t.max_timeout_s.unwrap_or(5);
                if !(1..=255).contains(&max_timeout_s) {
                    return Err(invalid("tftp.max_timeout_s must be within 1..=255"));
                }
                let max_session_s = t.max_session_s.unwrap_or(120);
                if !(5..=86_400).contains(&max_session_s) {
                    return Err(invalid("tftp.max_session_s must be within 5..=86400"));
                }
                Some(TftpConfig {
                    listen: t.listen,
                    root: t.root,
                    symlink_targets: t.symlink_targets,
                    max_blksize,
                    max_windowsize,
                    retries: t.retries.unwrap_or(5).clamp(1, 100),
                    max_transfers,
                    max_transfers_per_client,
                    max_timeout: Duration::from_secs(max_timeout_s),
                    max_session: Duration::from_secs(max_session_s),
                })
            }
        };
        let dhcp = match f.dhcp {
            None => None,
            Some(d) => Some(validate_dhcp(d, &http)?),
        };
        Ok(Config { partition: f.partition.trim().to_string(), api, dhcp, tftp, http })
    }
}

fn validate_dhcp(d: FileDhcp, http: &HttpConfig) -> Result<DhcpConfig, ConfigError> {
    if d.interface.is_empty() || d.interface.len() > 15 {
        return Err(invalid(format!("dhcp.interface {:?} is not an interface name", d.interface)));
    }
    let mut pools = Vec::new();
    for p in d.pool.into_iter().chain(d.pools) {
        pools.push(Pool::try_from(p)?);
    }
    for (i, a) in pools.iter().enumerate() {
        for b in &pools[i + 1..] {
            if a.contains(b.network) || b.contains(a.network) {
                return Err(invalid(format!("dhcp pools {}/{} and {}/{} overlap", a.network, a.prefix, b.network, b.prefix)));
            }
        }
    }
    match d.mode {
        DhcpMode::Server if pools.is_empty() => {
            return Err(invalid("dhcp.mode = \"server\" needs a [dhcp.pool]"));
        }
        DhcpMode::Proxy if !pools.is_empty() || !d.reservations.is_empty() => {
            return Err(invalid("dhcp.mode = \"proxy\" hands out no addresses: remove dhcp.pool/pools/reservations"));
        }
        _ => {}
    }
    let mut reservations = HashMap::new();
    let mut taken = HashMap::new();
    for r in d.reservations {
        let mac: Mac = r.mac.parse().map_err(|e: metal_types::ParseMacError| invalid(e.to_string()))?;
        if !pools.iter().any(|p| p.contains(r.ip)) {
            return Err(invalid(format!("reservation {mac} → {} is outside every pool's subnet", r.ip)));
        }
        if let Some(other) = taken.insert(r.ip, mac) {
            return Err(invalid(format!("reservation {} is given to both {other} and {mac}", r.ip)));
        }
        if reservations.insert(mac, Reservation { ip: r.ip, hostname: r.hostname }).is_some() {
            return Err(invalid(format!("reservation for {mac} is listed twice")));
        }
    }
    let b = d.boot.unwrap_or(FileBoot { bios: None, uefi: None, uefi_arm64: None, uefi_http_url: None, tftp_server: None });
    let uefi_file = check_file_name("dhcp.boot.uefi", b.uefi.as_deref().unwrap_or(DEFAULT_UEFI_FILE))?;
    let uefi_http_url = match b.uefi_http_url {
        Some(u) => check_http_url("dhcp.boot.uefi_http_url", &u)?,
        None => format!("{}/boot/{}", http.public_url, uefi_file),
    };
    let boot = BootConfig {
        bios_file: check_file_name("dhcp.boot.bios", b.bios.as_deref().unwrap_or(DEFAULT_BIOS_FILE))?,
        uefi_file,
        uefi_arm64_file: b.uefi_arm64.map(|f| check_file_name("dhcp.boot.uefi_arm64", &f)).transpose()?,
        uefi_http_url,
        tftp_server: b.tftp_server.unwrap_or(d.server_ip),
        ipxe_script_url: format!("{}/ipxe", http.public_url),
    };
    Ok(DhcpConfig {
        mode: d.mode,
        interface: d.interface,
        server_ip: d.server_ip,
        pools,
        reservations,
        lease_file: d.lease_file,
        boot,
        pxe_event_interval: match d.pxe_event_interval_s.unwrap_or(DEFAULT_PXE_EVENT_INTERVAL_S) {
            s if s > 3600 => {
                return Err(invalid(format!("dhcp.pxe_event_interval_s {s} is above 3600: the API would miss real reboots")))
            }
            s => Duration::from_secs(s),
        },
    })
}

impl Config {
    /// Parses and validates TOML text; `path` only names the file in errors.
    pub fn from_toml(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let file: File =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), message: e.to_string() })?;
        Config::try_from(file).map_err(|e| match e {
            ConfigError::Value(message) => ConfigError::Invalid { path: path.to_path_buf(), message },
            other => other,
        })
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Config::from_toml(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAB: &str = r#"
partition = "lab"
[api]
url = "http://10.99.0.1:8080/"
token = "secret"
[dhcp]
mode = "server"
interface = "metalbr0"
server_ip = "10.99.0.1"
reservations = [{ mac = "52:54:00:00:00:01", ip = "10.99.0.50" }]
[dhcp.pool]
subnet = "10.99.0.0/24"
start = "10.99.0.100"
end = "10.99.0.199"
router = "10.99.0.1"
dns = ["10.99.0.1"]
domain = "lab"
lease_time_s = 3600
[tftp]
listen = "10.99.0.1:69"
root = "/usr/lib/ipxe"
[http]
listen = "10.99.0.1:8081"
public_url = "http://10.99.0.1:8081"
"#;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::from_toml(Path::new("test.toml"), s)
    }

    #[test]
    fn lab_config_parses_with_defaults() {
        let c = parse(LAB).unwrap();
        assert_eq!(c.api.url, "http://10.99.0.1:8080");
        let d = c.dhcp.unwrap();
        assert_eq!(d.pools[0].netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(d.boot.bios_file, "undionly.kpxe");
        assert_eq!(d.boot.ipxe_script_url, "http://10.99.0.1:8081/ipxe");
        assert_eq!(d.boot.uefi_http_url, "http://10.99.0.1:8081/boot/snponly.efi");
        let mac: Mac = "52:54:00:00:00:01".parse().unwrap();
        assert_eq!(d.reservations[&mac].ip, Ipv4Addr::new(10, 99, 0, 50));
        assert_eq!(c.tftp.unwrap().max_blksize, 65464);
        assert_eq!(c.http.decision_cache, Duration::from_millis(1000));
        let off =
            parse(&LAB.replace(
                "public_url = \"http://10.99.0.1:8081\"",
                "public_url = \"http://10.99.0.1:8081\"\ndecision_cache_ms = 0",
            ))
            .unwrap();
        assert_eq!(off.http.decision_cache, Duration::ZERO);
    }

    #[test]
    fn api_ca_file_is_optional() {
        assert_eq!(parse(LAB).unwrap().api.ca_file, None);
        let c = parse(&LAB.replace("token = \"secret\"", "token = \"secret\"\nca_file = \"/etc/metal/ca.pem\"")).unwrap();
        assert_eq!(c.api.ca_file, Some(PathBuf::from("/etc/metal/ca.pem")));
    }

    #[test]
    fn limits_have_defaults_and_bounds() {
        let c = parse(LAB).unwrap();
        assert_eq!(c.dhcp.unwrap().pxe_event_interval, Duration::from_secs(5));
        let t = c.tftp.unwrap();
        assert_eq!((t.max_transfers, t.max_transfers_per_client), (256, 32));
        assert_eq!((t.max_timeout, t.max_session), (Duration::from_secs(5), Duration::from_secs(120)));
        let h = c.http;
        assert_eq!(h.max_connections, 1024);
        assert_eq!(
            (h.header_timeout, h.idle_timeout, h.body_timeout),
            (Duration::from_secs(30), Duration::from_secs(60), Duration::from_secs(60))
        );
        let set = |section: &str, line: &str| LAB.replace(section, &format!("{section}\n{line}"));
        let c = parse(&set("[tftp]", "max_transfers = 8\nmax_transfers_per_client = 2\nmax_timeout_s = 3\nmax_session_s = 30"))
            .unwrap();
        let t = c.tftp.unwrap();
        assert_eq!(
            (t.max_transfers, t.max_transfers_per_client, t.max_timeout.as_secs(), t.max_session.as_secs()),
            (8, 2, 3, 30)
        );
        let c =
            parse(&set("[http]", "max_connections = 10\nheader_timeout_s = 1\nidle_timeout_s = 2\nbody_timeout_s = 3")).unwrap();
        assert_eq!(
            (
                c.http.max_connections,
                c.http.header_timeout.as_secs(),
                c.http.idle_timeout.as_secs(),
                c.http.body_timeout.as_secs()
            ),
            (10, 1, 2, 3)
        );
        assert_eq!(parse(&set("[dhcp]", "pxe_event_interval_s = 0")).unwrap().dhcp.unwrap().pxe_event_interval, Duration::ZERO);
        for (section, line, needle) in [
            ("[dhcp]", "pxe_event_interval_s = 7200", "pxe_event_interval_s"),
            ("[tftp]", "max_transfers = 0", "tftp.max_transfers must"),
            ("[tftp]", "max_transfers = 4\nmax_transfers_per_client = 5", "max_transfers_per_client"),
            ("[tftp]", "max_timeout_s = 256", "max_timeout_s"),
            ("[tftp]", "max_session_s = 1", "max_session_s"),
            ("[http]", "max_connections = 0", "max_connections"),
            ("[http]", "header_timeout_s = 0", "header_timeout_s"),
            ("[http]", "idle_timeout_s = 99999", "idle_timeout_s"),
        ] {
            let err = parse(&set(section, line)).unwrap_err().to_string();
            assert!(err.contains(needle), "{line}: {err}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let text = LAB.replace("domain = \"lab\"", "domian = \"lab\"");
        let err = parse(&text).unwrap_err().to_string();
        assert!(err.contains("domian"), "{err}");
    }

    #[test]
    fn invalid_values_are_refused() {
        for (from, to, needle) in [
            ("start = \"10.99.0.100\"", "start = \"10.98.0.100\"", "not a host address"),
            ("end = \"10.99.0.199\"", "end = \"10.99.0.99\"", "after end"),
            ("subnet = \"10.99.0.0/24\"", "subnet = \"10.99.0.1/24\"", "host bits"),
            ("mode = \"server\"", "mode = \"proxy\"", "proxy"),
            ("token = \"secret\"", "", "token"),
            ("ip = \"10.99.0.50\"", "ip = \"10.1.0.50\"", "outside"),
            ("url = \"http://10.99.0.1:8080/\"", "url = \"ftp://x\"", "http://"),
            (
                "public_url = \"http://10.99.0.1:8081\"",
                "public_url = \"http://10.99.0.1:8081\"\nhammer_dir = \"/a\"\nhammer_url = \"http://b\"",
                "not both",
            ),
            (
                "public_url = \"http://10.99.0.1:8081\"",
                "public_url = \"http://10.99.0.1:8081\"\ndecision_cache_ms = 5000",
                "decision_cache_ms 5000",
            ),
        ] {
            let text = LAB.replace(from, to);
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{from} → {to}: {err}");
        }
    }

    #[test]
    fn mac_parses_and_prints() {
        let m: Mac = "52-54-00-AB-cd-0F".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:0f");
        assert!("52:54:00:ab:cd".parse::<Mac>().is_err());
        assert!("52:54:00:ab:cd:0f0".parse::<Mac>().is_err());
    }
}
