//! The allocation API of the bare-metal cloud.
//!
//! - [`store`]: the persistent store (sqlx `Any`: SQLite file or PostgreSQL), split by concern
//!   (catalog, tokens, machines, events, allocation), with its own error type.
//! - [`clock`]: where every timestamp comes from (a manual clock in tests).
//! - [`fsm`]: the provisioning event state machine (pure, table-driven).
//! - [`allocation`]: the allocation planner (a request and a catalog snapshot → a plan, no I/O).
//! - [`policy`]: pure decisions: size matching, the eligibility rules and machine pick, layout
//!   and image version choice, the boot decision ([`policy::boot`]).
//! - [`auth`]: tokens (stored hashed) and the caller's identity; [`enrolment`]: the stateless,
//!   signed enrolment tokens of boot decisions.
//! - [`http`]: the axum routes; [`error`]: the one place errors become HTTP responses.
//! - [`metrics`]: Prometheus text at `/metrics`; [`openapi`]: the OpenAPI document.
//! - [`serve`]: the HTTP(S) server: TLS, slow-client timeouts, the connection limit.
//!
//! [`start`] binds a listener and serves; the binary and the tests both use it.

pub mod allocation;
pub mod auth;
pub mod clock;
pub mod enrolment;
pub mod error;
pub mod fsm;
pub mod http;
pub mod metrics;
pub mod openapi;
pub mod policy;
pub mod serve;
pub mod store;

use metal_types::MachineId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Largest accepted request body (an inventory of a big machine is well under this).
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Longest `GET /v1/agent/wait` long-poll.
pub const MAX_WAIT_S: u64 = 60;

#[derive(Debug, Clone)]
pub struct Config {
    /// `sqlite://metal.db` or `postgres://…`.
    pub db: String,
    /// Bootstrap: an admin token with this value is made to exist.
    pub admin_token: Option<String>,
    /// Lifetime of enrolment tokens handed out in boot decisions.
    pub enrolment_ttl_s: u64,
    /// A machine not heard from for this long is `Dead` (and not allocated).
    pub dead_after_s: u64,
    /// A reclaim that has not reached `Waiting` after this long is a failed reclaim.
    pub reclaim_timeout_s: u64,
    /// SQLite only: `synchronous=NORMAL` (survives an API crash, not a host power loss; much
    /// faster) instead of `FULL` (every commit is fsynced).
    pub sqlite_sync_normal: bool,
    /// How long cached reads of the boot decision (partitions, long-lived tokens) and the
    /// enrolment key are used before they are read again; 0 turns the caches off.
    pub cache_ttl_ms: u64,
    /// Lifetime of an allocation's phone-home token, from the allocation on (it is deleted
    /// earlier when the allocation is freed).
    pub phone_home_ttl_s: u64,
    /// HTTPS with this certificate chain and key; plain HTTP when `None`.
    pub tls: Option<serve::TlsFiles>,
    /// Timeouts and the connection limit of the HTTP server.
    pub limits: serve::Limits,
    /// Where the API's time comes from (the system clock; a `clock::ManualClock` in tests).
    pub clock: clock::ClockRef,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            db: "sqlite://metal.db".into(),
            admin_token: None,
            enrolment_ttl_s: 3600,
            dead_after_s: 60,
            reclaim_timeout_s: 900,
            sqlite_sync_normal: false,
            cache_ttl_ms: 5000,
            phone_home_ttl_s: 7 * 86_400,
            tls: None,
            limits: serve::Limits::default(),
            clock: clock::ClockRef::default(),
        }
    }
}

/// Wakes long-polling waits of one machine. In-process; on PostgreSQL a LISTEN task feeds it
/// allocations made by other replicas.
#[derive(Default)]
pub struct Waker {
    map: std::sync::Mutex<HashMap<MachineId, Arc<Notify>>>,
}

impl Waker {
    pub fn handle(&self, id: MachineId) -> Arc<Notify> {
        self.map.lock().expect("waker lock").entry(id).or_default().clone()
    }
    pub fn wake(&self, id: MachineId) {
        if let Some(n) = self.map.lock().expect("waker lock").get(&id) {
            n.notify_waiters();
        }
    }
    pub fn wake_all(&self) {
        for n in self.map.lock().expect("waker lock").values() {
            n.notify_waiters();
        }
    }
}

/// Shared state of one API instance.
pub struct App {
    pub store: store::Store,
    pub config: Config,
    pub waker: Waker,
    pub metrics: metrics::Metrics,
    /// Set when the server shuts down: parked waits return 204 at once.
    pub stopping: std::sync::atomic::AtomicBool,
    /// The key of enrolment tokens, from the `secrets` table; re-read every cache TTL, so a
    /// rotation (deleting the row) reaches every replica.
    enrolment_key: std::sync::RwLock<Arc<enrolment::Key>>,
}

impl App {
    /// Ends parked long-polls (they answer 204; agents simply wait again, on another replica).
    pub fn begin_shutdown(&self) {
        self.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        self.waker.wake_all();
    }

    /// Now, by the API's clock ([`Config::clock`]).
    pub fn now_ms(&self) -> i64 {
        self.config.clock.now_ms()
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn enrolment_key(&self) -> Arc<enrolment::Key> {
        self.enrolment_key.read().expect("key lock").clone()
    }

    /// Reads the enrolment key from the database again (creating one if the row was deleted).
    pub async fn reload_enrolment_key(&self) -> Result<(), error::Error> {
        let key = load_enrolment_key(&self.store).await?;
        let mut k = self.enrolment_key.write().expect("key lock");
        if **k != key {
            tracing::info!("enrolment key changed (rotated); tokens signed with the old key are refused from now on");
            *k = Arc::new(key);
        }
        Ok(())
    }
}

async fn load_enrolment_key(store: &store::Store) -> Result<enrolment::Key, error::Error> {
    let hex = store.secret(enrolment::KEY_NAME, || enrolment::Key::random().to_hex()).await?;
    enrolment::Key::from_hex(&hex)
        .ok_or_else(|| error::Error::Internal(format!("secret {} is not 64 hex digits", enrolment::KEY_NAME)))
}

/// Re-reads the enrolment key every cache TTL (at least every 100 ms) until the app stops.
async fn refresh_enrolment_key(app: std::sync::Weak<App>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(app) = app.upgrade() else { return };
        if app.is_stopping() {
            return;
        }
        if let Err(e) = app.reload_enrolment_key().await {
            tracing::warn!(error = %e, "cannot re-read the enrolment key; keeping the one in memory");
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the API (its database, bootstrap token and keys)")]
    Db(#[source] error::Error),
    #[error("cannot listen on {addr}")]
    Bind { addr: String, source: std::io::Error },
    #[error("cannot set up HTTPS")]
    Tls(#[source] serve::TlsError),
}

impl App {
    /// Opens the store, applies migrations and the bootstrap admin token.
    pub async fn open(config: Config) -> Result<Arc<App>, error::Error> {
        let cache_ttl = Duration::from_millis(config.cache_ttl_ms);
        if let Some(token) = &config.admin_token {
            let bits = auth::estimated_bits(token);
            if bits < auth::MIN_BOOTSTRAP_BITS {
                return Err(error::Error::BadRequest(format!(
                    "the bootstrap admin token is too weak (about {bits:.0} bits by a conservative estimate; it needs at least \
                     128 bits): use e.g. `openssl rand -hex 32`"
                )));
            }
        }
        let opts = store::Options {
            sqlite_sync_normal: config.sqlite_sync_normal,
            cache_ttl,
            dead_after_ms: config.dead_after_s as i64 * 1000,
            beat_interval: std::time::Duration::from_secs(1),
            clock: config.clock.clone(),
        };
        let store = store::Store::open(&config.db, opts).await?;
        if let Some(token) = &config.admin_token {
            let mut row = auth::row(token, metal_types::Role::Admin);
            row.description = "bootstrap admin token (--admin-token)".into();
            store.ensure_token(&row).await?;
        }
        let dropped = store.drop_expired_stored_enrolments().await?;
        if dropped > 0 {
            tracing::info!(dropped, "dropped expired enrolment tokens stored by an earlier version");
        }
        let key = load_enrolment_key(&store).await?;
        let app = Arc::new(App {
            store,
            config,
            waker: Waker::default(),
            metrics: metrics::Metrics::default(),
            stopping: Default::default(),
            enrolment_key: std::sync::RwLock::new(Arc::new(key)),
        });
        if app.store.backend() == store::Backend::Postgres {
            tokio::spawn(listen_for_allocations(Arc::downgrade(&app)));
        }
        tokio::spawn(refresh_enrolment_key(Arc::downgrade(&app), cache_ttl.max(Duration::from_millis(100))));
        Ok(app)
    }
}

/// Feeds PostgreSQL notifications about allocations into the in-process waker, so a machine
/// long-polling on this replica wakes when another replica allocates it.
async fn listen_for_allocations(app: std::sync::Weak<App>) {
    let Some(url) = app.upgrade().map(|a| a.store.url().to_string()) else { return };
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot connect the allocation listener; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                if app.upgrade().is_none() {
                    return;
                }
                continue;
            }
        };
        if let Err(e) = listener.listen(store::ALLOCATION_CHANNEL).await {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Whatever was missed while (re)connecting: let every wait re-check the database.
        match app.upgrade() {
            Some(a) => a.waker.wake_all(),
            None => return,
        }
        loop {
            let n = tokio::time::timeout(Duration::from_secs(5), listener.try_recv()).await;
            let Some(app) = app.upgrade() else { return };
            match n {
                Err(_) => continue, // idle; check the app still exists
                Ok(Ok(Some(n))) => {
                    if let Ok(id) = n.payload().parse::<MachineId>() {
                        app.waker.wake(id);
                    }
                }
                Ok(Ok(None)) => {
                    // Connection lost and re-established: notifications may be lost.
                    app.waker.wake_all();
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "allocation listener failed; reconnecting");
                    break;
                }
            }
        }
    }
}

/// A running API instance.
pub struct Running {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    https: bool,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// Stops accepting, finishes in-flight requests, closes the pool.
    pub async fn stop(mut self) {
        self.app.begin_shutdown();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.handle).await;
        self.app.store.close().await;
    }

    /// Whether it serves HTTPS.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// `http(s)://<addr>`.
    pub fn base_url(&self) -> String {
        format!("{}://{}", if self.is_https() { "https" } else { "http" }, self.addr)
    }

    /// Waits until the server fails (it does not stop on its own).
    pub async fn join(&mut self) -> std::io::Result<()> {
        (&mut self.handle).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}

/// Reads the TLS files (when configured), opens the store, binds `listen` and serves in a
/// background task ([`serve`]).
pub async fn start(config: Config, listen: &str) -> Result<Running, StartError> {
    metal_client::tls::install_provider();
    let tls = config.tls.as_ref().map(serve::load_tls).transpose().map_err(StartError::Tls)?;
    let limits = config.limits.clone();
    let app = App::open(config).await.map_err(StartError::Db)?;
    let listener =
        tokio::net::TcpListener::bind(listen).await.map_err(|source| StartError::Bind { addr: listen.to_string(), source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: listen.to_string(), source })?;
    let router = http::router(app.clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let https = tls.is_some();
    let handle = tokio::spawn(serve::serve(listener, router, tls, limits, async move {
        let _ = rx.await;
    }));
    Ok(Running { addr, app, https, shutdown: Some(tx), handle })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// RFC 3339 (UTC, milliseconds) of a millisecond timestamp.
pub fn rfc3339(ms: i64) -> String {
    let t =
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Milliseconds since the epoch of an RFC 3339 time.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
}
