//! The persistent store: one sqlx `Any` pool, so the same statements run on SQLite (the default,
//! a file) and PostgreSQL (several replicas). Each module answers one question:
//!
//! | module | what |
//! |---|---|
//! | `mod.rs` | opening the pool, write transactions ([`Store::write`]), the clock |
//! | [`migrate`] | numbered migrations from `api/migrations/` |
//! | [`cache`] | the read-through cache that never keeps a value read before a write it missed |
//! | [`catalog`] | partitions, sizes, layouts, projects (one JSON document per id), images |
//! | [`tokens`] | stored tokens (hashes only) and shared secrets |
//! | [`machines`] | machine rows, registration, boot lookups, reports |
//! | [`beats`] | heartbeats kept in memory and written once per interval |
//! | [`events`] | the provisioning timeline through the state machine (`crate::fsm`) |
//! | [`allocation`] | how a machine is picked and allocated, freed, phoned home |
//! | [`error`] | what the store reports ([`StoreError`]); `crate::error` makes messages of it |
//!
//! Conventions: ids are TEXT, timestamps BIGINT milliseconds since the epoch (from the store's
//! clock, `crate::clock`), JSON documents TEXT, flags BIGINT 0/1. Every write runs in a
//! transaction from [`Store::write`]; on SQLite that takes an in-process lock and
//! `BEGIN IMMEDIATE` (SQLite has one writer anyway; this avoids lock upgrade deadlocks), on
//! PostgreSQL it is a plain transaction and row locks do the rest.

pub mod allocation;
pub mod beats;
pub mod cache;
pub mod catalog;
pub mod error;
pub mod events;
pub mod machines;
pub mod migrate;
pub mod tokens;

pub use allocation::{AllocOutcome, AllocationPlan};
pub use error::{Conflict, Ineligible, NoMachine, Refusal, Result, StoreError};
pub use machines::{MachineRow, Registration};
pub use tokens::TokenRow;

use crate::clock::ClockRef;
use cache::Cache;
use metal_types::{MachineId, ProvisioningEvent as Ev};
use serde::de::DeserializeOwned;
use sqlx::any::AnyPoolOptions;
use sqlx::AnyConnection;
use sqlx::{Any, AnyPool, Transaction};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, OwnedMutexGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The PostgreSQL channel that carries "machine X was allocated" between replicas.
pub const ALLOCATION_CHANNEL: &str = "metal_allocation";

/// Catalog reads cached on SQLite (one API process owns the file).
struct CatalogCaches {
    /// `kind/id` → body.
    objects: Cache<Option<String>>,
    /// `kind` → bodies.
    lists: Cache<Vec<String>>,
    /// `by/key` → image rows.
    images: Cache<Vec<catalog::ImageRow>>,
}

pub struct Store {
    pool: AnyPool,
    backend: Backend,
    url: String,
    write_lock: Option<Arc<Mutex<()>>>,
    clock: ClockRef,
    /// SQLite only: read caches, cleared by every write of this process, entries at most
    /// `cache_ttl` old.
    catalog_cache: Option<CatalogCaches>,
    token_cache: Option<Cache<Option<TokenRow>>>,
    /// Both backends: what the boot decision reads on every request, i.e. partitions (parsed)
    /// and long-lived tokens (admin, tenant, pixie). Cleared by this process's writes; another
    /// replica's writes (and rows changed by hand) are seen after at most `cache_ttl`.
    boot_partitions: Cache<Arc<metal_types::Partition>>,
    boot_tokens: Cache<TokenRow>,
    /// SQLite: the queue of the group-commit allocation writer.
    group_writer: Option<tokio::sync::mpsc::UnboundedSender<allocation::AllocJob>>,
    /// A machine silent for this long is dead: pixie's sightings of a machine whose
    /// metal-hammer was heard from more recently are ignored (`fsm::Origin::Pixie`).
    dead_after_ms: i64,
    /// Heartbeats not written yet ([`beats`]).
    beats: Arc<beats::Beats>,
}

/// A write transaction (and, on SQLite, the process-wide writer lock). Dropping it rolls back.
pub struct Tx {
    tx: Transaction<'static, Any>,
    _guard: Option<OwnedMutexGuard<()>>,
}

impl Tx {
    pub fn c(&mut self) -> &mut AnyConnection {
        &mut self.tx
    }
    pub async fn commit(self) -> Result<()> {
        self.tx.commit().await?;
        Ok(())
    }
    pub async fn rollback(self) -> Result<()> {
        self.tx.rollback().await?;
        Ok(())
    }
}

fn parse_json<T: DeserializeOwned>(what: &'static str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|source| StoreError::Corrupt { what, source })
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("wire types always serialize")
}

fn parse_machine_id(s: &str) -> Result<MachineId> {
    s.parse().map_err(|e| StoreError::Internal(format!("stored machine id: {e}")))
}

fn parse_event(s: &str) -> Result<Ev> {
    s.parse().map_err(|e| StoreError::Internal(format!("stored event: {e}")))
}

/// The options of [`Store::open`].
#[derive(Debug, Clone)]
pub struct Options {
    /// SQLite `synchronous=NORMAL` instead of `FULL`. In WAL mode a commit then survives a
    /// crash of the API but not a power loss of the host; see `--sqlite-sync`.
    pub sqlite_sync_normal: bool,
    /// The longest time a cached read is used (see [`cache`]).
    pub cache_ttl: Duration,
    /// A machine not heard from for this long is dead.
    pub dead_after_ms: i64,
    /// How often heartbeats are written ([`beats`]); at most a tenth of `dead_after_ms`.
    pub beat_interval: Duration,
    pub clock: ClockRef,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sqlite_sync_normal: false,
            cache_ttl: Duration::from_secs(5),
            dead_after_ms: 60_000,
            beat_interval: Duration::from_secs(1),
            clock: ClockRef::default(),
        }
    }
}

impl Store {
    /// Opens (and for SQLite creates) the database and applies pending migrations.
    pub async fn open(url: &str, opts: Options) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if url.starts_with("sqlite:") {
            let url = if url.contains("mode=") {
                url.to_string()
            } else if url.contains('?') {
                format!("{url}&mode=rwc")
            } else {
                format!("{url}?mode=rwc")
            };
            (Backend::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_string())
        } else {
            return Err(StoreError::Config(format!("database URL {url:?} is neither sqlite://… nor postgres://…")));
        };
        let sqlite_sync_normal = opts.sqlite_sync_normal;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 8 } else { 16 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        let sync = if sqlite_sync_normal { "NORMAL" } else { "FULL" };
                        sqlx::query(&format!("PRAGMA synchronous = {sync}")).execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        if backend == Backend::Sqlite {
            // WAL is a property of the file: readers never block the one writer.
            sqlx::query("PRAGMA journal_mode=WAL").execute(&pool).await?;
        }
        let sqlite = backend == Backend::Sqlite;
        let write_lock = sqlite.then(|| Arc::new(Mutex::new(())));
        let beat_interval =
            opts.beat_interval.min(Duration::from_millis((opts.dead_after_ms.max(0) / 10) as u64)).max(Duration::from_millis(20));
        let beats = Arc::new(beats::Beats::new(beat_interval));
        let group_writer = write_lock.as_ref().map(|lock| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(allocation::group_writer(pool.clone(), lock.clone(), opts.clock.clone(), beats.clone(), rx));
            tx
        });
        tokio::spawn(flush_beats(pool.clone(), backend, write_lock.clone(), beats.clone()));
        let ttl = opts.cache_ttl;
        let store = Store {
            pool,
            backend,
            url,
            write_lock,
            clock: opts.clock,
            catalog_cache: sqlite.then(|| CatalogCaches {
                objects: Cache::new(ttl),
                lists: Cache::new(ttl),
                images: Cache::new(ttl),
            }),
            token_cache: sqlite.then(|| Cache::new(ttl)),
            boot_partitions: Cache::new(ttl),
            boot_tokens: Cache::new(ttl),
            group_writer,
            dead_after_ms: opts.dead_after_ms,
            beats,
        };
        migrate::run(&store).await?;
        Ok(store)
    }

    /// Now, by the store's clock.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn catalog_changed(&self) {
        if let Some(c) = &self.catalog_cache {
            c.objects.invalidate();
            c.lists.invalidate();
            c.images.invalidate();
        }
        self.boot_partitions.invalidate();
    }

    fn tokens_changed(&self) {
        if let Some(c) = &self.token_cache {
            c.invalidate();
        }
        self.boot_tokens.invalidate();
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    fn pg(&self) -> bool {
        self.backend == Backend::Postgres
    }

    /// ` FOR UPDATE` (or ` FOR UPDATE OF <of>`) on PostgreSQL, nothing on SQLite (one writer).
    fn lock_clause(&self, of: Option<&str>) -> String {
        match (self.pg(), of) {
            (false, _) => String::new(),
            (true, None) => " FOR UPDATE".into(),
            (true, Some(t)) => format!(" FOR UPDATE OF {t}"),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes the beats not written yet and closes the pool.
    pub async fn close(&self) {
        if let Err(e) = flush_once(&self.pool, self.backend, self.write_lock.as_ref(), &self.beats).await {
            tracing::warn!(error = %e, "could not write the last heartbeats before closing");
        }
        self.pool.close().await;
    }

    /// Starts a write transaction.
    pub async fn write(&self) -> Result<Tx> {
        begin_write(&self.pool, self.backend, self.write_lock.as_ref()).await
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// A write transaction: on SQLite the process-wide writer lock first, then `BEGIN IMMEDIATE`.
async fn begin_write(pool: &AnyPool, backend: Backend, lock: Option<&Arc<Mutex<()>>>) -> Result<Tx> {
    let guard = match lock {
        Some(l) => Some(l.clone().lock_owned().await),
        None => None,
    };
    let tx = match backend {
        Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await?,
        Backend::Postgres => pool.begin().await?,
    };
    Ok(Tx { tx, _guard: guard })
}

/// One write of every pending beat, in its own transaction; on failure they go back.
async fn flush_once(pool: &AnyPool, backend: Backend, lock: Option<&Arc<Mutex<()>>>, beats: &beats::Beats) -> Result<()> {
    if beats.is_empty() {
        return Ok(());
    }
    let mut tx = begin_write(pool, backend, lock).await?;
    let taken = beats.take();
    let result = match beats::write(tx.c(), &taken).await {
        Ok(()) => tx.commit().await,
        Err(e) => Err(e),
    };
    if result.is_err() {
        beats.restore(taken);
    }
    result
}

/// The flusher: every interval until the pool closes. A failed write keeps the beats for the next.
async fn flush_beats(pool: AnyPool, backend: Backend, lock: Option<Arc<Mutex<()>>>, beats: Arc<beats::Beats>) {
    let mut tick = tokio::time::interval(beats.interval());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !pool.is_closed() {
        tick.tick().await;
        if let Err(e) = flush_once(&pool, backend, lock.as_ref(), &beats).await {
            if !pool.is_closed() {
                tracing::warn!(error = %e, pending = beats.len(), "writing heartbeats failed; retrying next interval");
            }
        }
    }
}
