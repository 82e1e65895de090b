//! The persistent store: one sqlx `Any` pool, so the same statements run on SQLite (the default,
//! a file) and PostgreSQL (several replicas). Numbered migrations live in `api/migrations/`.
//!
//! Conventions: ids are TEXT, timestamps BIGINT milliseconds since the epoch, JSON documents TEXT,
//! flags BIGINT 0/1. Every write runs in a transaction from [`Store::write`]; on SQLite that takes
//! an in-process lock and `BEGIN IMMEDIATE` (SQLite has one writer anyway; this avoids lock
//! upgrade deadlocks), on PostgreSQL it is a plain transaction and row locks do the rest.

use crate::error::{Error, Result};
use crate::fsm::{self, FsmState, Record};
use crate::policy::{self, Candidate};
use crate::{now_ms, rfc3339};
use metal_types::{Allocation, AllocationId, BootInfo, EventSource, Image, MachineEvent, MachineId, ProvisioningEvent as Ev};
use serde::de::DeserializeOwned;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::AnyConnection;
use sqlx::{Any, AnyPool, Row, Transaction};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Mutex, OwnedMutexGuard};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Numbered migrations: (version, name, SQL). Applied in order, each in its own transaction.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "initial schema", include_str!("../migrations/0001_initial.sql")),
    (2, "enrolment token mac", include_str!("../migrations/0002_enrolment_mac.sql")),
    (3, "free machine index", include_str!("../migrations/0003_free_machine_index.sql")),
    (4, "secrets", include_str!("../migrations/0004_secrets.sql")),
    (5, "event source", include_str!("../migrations/0005_event_source.sql")),
];

/// The PostgreSQL channel that carries "machine X was allocated" between replicas.
pub const ALLOCATION_CHANNEL: &str = "metal_allocation";

pub struct Store {
    pool: AnyPool,
    backend: Backend,
    url: String,
    write_lock: Option<Arc<Mutex<()>>>,
    /// SQLite only (one API process owns the file): read caches, cleared by every write of this
    /// process, entries at most `cache_ttl` old.
    catalog_cache: Option<Cache>,
    token_cache: Option<Cache>,
    /// Both backends: what the boot decision reads on every request, i.e. partitions (parsed) and
    /// long-lived tokens (admin, tenant, pixie). Cleared by this process's writes; another
    /// replica's writes (and rows changed by hand) are seen after at most `cache_ttl`.
    boot_cache: Cache,
    /// SQLite: the queue of the group-commit allocation writer.
    group_writer: Option<tokio::sync::mpsc::UnboundedSender<AllocJob>>,
    /// A machine silent for this long is dead: pixie's sightings of a machine whose
    /// metal-hammer was heard from more recently are ignored (`fsm::Origin::Pixie`).
    dead_after_ms: i64,
}

#[derive(Debug, Clone)]
enum Cached {
    Body(Option<String>),
    Bodies(Vec<String>),
    /// (version, expires_ms, body) of images.
    Images(Vec<(String, Option<i64>, String)>),
    Token(Option<Box<TokenRow>>),
    Partition(Arc<metal_types::Partition>),
}

/// A read-through cache that never keeps a value read before a write it missed: a writer bumps
/// the generation (after its commit) and clears; a reader stores only if the generation did not
/// move while it read the database. Entries older than `ttl` are not used, so writes this
/// process did not make (another replica, an operator in `psql`) show after at most `ttl`.
struct Cache {
    ttl: Duration,
    /// (generation, key → (stored at, value)).
    inner: std::sync::Mutex<(u64, CacheMap)>,
}

type CacheMap = std::collections::HashMap<String, (std::time::Instant, Cached)>;

impl Cache {
    const MAX_ENTRIES: usize = 10_000;

    fn new(ttl: Duration) -> Cache {
        Cache { ttl, inner: Default::default() }
    }

    fn get(&self, key: &str) -> (u64, Option<Cached>) {
        let g = self.inner.lock().expect("cache lock");
        let hit = g.1.get(key).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, v)| v.clone());
        (g.0, hit)
    }

    fn put(&self, generation: u64, key: String, value: Cached) {
        let mut g = self.inner.lock().expect("cache lock");
        if g.0 == generation {
            if g.1.len() >= Self::MAX_ENTRIES {
                g.1.clear();
            }
            g.1.insert(key, (std::time::Instant::now(), value));
        }
    }

    fn invalidate(&self) {
        let mut g = self.inner.lock().expect("cache lock");
        g.0 += 1;
        g.1.clear();
    }
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

/// The catalog tables that hold one JSON document per id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Partition,
    Size,
    Layout,
    Project,
}

impl Kind {
    fn table(self) -> &'static str {
        match self {
            Kind::Partition => "partitions",
            Kind::Size => "sizes",
            Kind::Layout => "layouts",
            Kind::Project => "projects",
        }
    }
    /// The word used in messages, matching the path segment `/v1/<noun>s`.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Partition => "partition",
            Kind::Size => "size",
            Kind::Layout => "layout",
            Kind::Project => "project",
        }
    }
}

/// A stored token (never the token itself: only its SHA-256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    pub id: String,
    pub hash: String,
    pub role: String,
    pub project: Option<String>,
    pub partition: Option<String>,
    pub machine: Option<String>,
    pub allocation: Option<String>,
    /// Enrolment tokens: the MAC address that PXE booted.
    pub mac: Option<String>,
    pub description: String,
    pub expires_ms: Option<i64>,
}

/// A machine row joined with its current allocation.
#[derive(Debug, Clone)]
pub struct MachineRow {
    pub id: MachineId,
    pub partition: Option<String>,
    pub size: String,
    pub inventory: Option<String>,
    pub fsm: FsmState,
    pub last_seen_ms: Option<i64>,
    pub allocation: Option<Allocation>,
    pub allocation_phoned_home: bool,
    pub boot: Option<BootInfo>,
}

/// A registration the handler has checked (token, partition, size match).
#[derive(Debug)]
pub struct Registration<'a> {
    pub id: MachineId,
    pub partition: &'a str,
    pub size: &'a str,
    pub inventory: &'a metal_types::Inventory,
    pub credential: &'a TokenRow,
    /// The MAC the enrolment token is bound to (normalised); `None` when an admin registers.
    pub token_mac: Option<&'a str>,
}

fn source_name(s: EventSource) -> &'static str {
    match s {
        EventSource::Agent => "agent",
        EventSource::Pixie => "pixie",
        EventSource::PhoneHome => "phone_home",
        EventSource::Api => "api",
    }
}

fn parse_source(s: &str) -> Result<EventSource> {
    Ok(match s {
        "agent" => EventSource::Agent,
        "pixie" => EventSource::Pixie,
        "phone_home" => EventSource::PhoneHome,
        "api" => EventSource::Api,
        other => return Err(Error::Internal(format!("stored event source {other:?}"))),
    })
}

/// What `allocate` should do; the handler has resolved and validated every name.
#[derive(Debug, Clone)]
pub struct AllocationPlan {
    pub project: String,
    pub partition: String,
    /// The size to pick from (pool allocation).
    pub size: Option<String>,
    /// A specific machine instead of the pool.
    pub machine: Option<MachineId>,
    pub image: String,
    pub hostname: String,
    pub layout: String,
    pub ssh_keys: Vec<String>,
    pub user_data: String,
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Clone)]
pub enum AllocOutcome {
    Created(Allocation),
    /// The idempotency key was used before: the first allocation.
    Existing(Allocation),
}

fn parse_json<T: DeserializeOwned>(what: &'static str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|source| Error::Corrupt { what, source })
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("wire types always serialize")
}

fn parse_machine_id(s: &str) -> Result<MachineId> {
    s.parse().map_err(|e| Error::Internal(format!("stored machine id: {e}")))
}

fn parse_event(s: &str) -> Result<Ev> {
    s.parse().map_err(|e| Error::Internal(format!("stored event: {e}")))
}

const MACHINE_SELECT: &str = "SELECT m.id, m.partition, m.size, m.inventory, m.state, m.crash_count, m.crash_loop, \
     m.reclaiming, m.reclaim_ms, m.failed_reclaim, m.last_seen_ms, m.boot, \
     a.body AS alloc_body, a.phoned_home_ms AS alloc_phoned_home_ms \
     FROM machines m LEFT JOIN allocations a ON a.id = m.allocation";

fn machine_row(r: &AnyRow) -> Result<MachineRow> {
    let state: Option<String> = r.try_get("state")?;
    let alloc_body: Option<String> = r.try_get("alloc_body")?;
    let boot: Option<String> = r.try_get("boot")?;
    Ok(MachineRow {
        id: parse_machine_id(&r.try_get::<String, _>("id")?)?,
        partition: r.try_get("partition")?,
        size: r.try_get("size")?,
        inventory: r.try_get("inventory")?,
        fsm: FsmState {
            state: state.as_deref().map(parse_event).transpose()?,
            crash_count: r.try_get::<i64, _>("crash_count")? as u32,
            crash_loop: r.try_get::<i64, _>("crash_loop")? != 0,
            reclaiming: r.try_get::<i64, _>("reclaiming")? != 0,
            reclaim_ms: r.try_get("reclaim_ms")?,
            failed_reclaim: r.try_get::<i64, _>("failed_reclaim")? != 0,
        },
        last_seen_ms: r.try_get("last_seen_ms")?,
        allocation: alloc_body.as_deref().map(|b| parse_json("allocation", b)).transpose()?,
        allocation_phoned_home: r.try_get::<Option<i64>, _>("alloc_phoned_home_ms")?.is_some(),
        boot: boot.as_deref().map(|b| parse_json("boot info", b)).transpose()?,
    })
}

fn token_row(r: &AnyRow) -> Result<TokenRow> {
    Ok(TokenRow {
        id: r.try_get("id")?,
        hash: r.try_get("hash")?,
        role: r.try_get("role")?,
        project: r.try_get("project")?,
        partition: r.try_get("partition")?,
        machine: r.try_get("machine")?,
        allocation: r.try_get("allocation")?,
        mac: r.try_get("mac")?,
        description: r.try_get("description")?,
        expires_ms: r.try_get("expires_ms")?,
    })
}

impl Store {
    /// Opens (and for SQLite creates) the database and applies pending migrations.
    ///
    /// `sqlite_sync_normal`: SQLite `synchronous=NORMAL` instead of `FULL`. In WAL mode a
    /// commit then survives a crash of the API but not a power loss of the host; see
    /// `--sqlite-sync`.
    ///
    /// `cache_ttl`: the longest time a cached read is used (see [`Cache`]).
    pub async fn open(url: &str, sqlite_sync_normal: bool, cache_ttl: Duration) -> Result<Store> {
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
            return Err(Error::BadRequest(format!(
                "database URL {url:?} is neither sqlite://… nor postgres://…"
            )));
        };
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
        let group_writer = write_lock.as_ref().map(|lock| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(group_writer(pool.clone(), lock.clone(), rx));
            tx
        });
        let store = Store {
            pool,
            backend,
            url,
            write_lock,
            catalog_cache: sqlite.then(|| Cache::new(cache_ttl)),
            token_cache: sqlite.then(|| Cache::new(cache_ttl)),
            boot_cache: Cache::new(cache_ttl),
            group_writer,
            dead_after_ms: 60_000,
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Reads through `cache` (when there is one).
    async fn cached<F>(cache: &Option<Cache>, key: String, load: F) -> Result<Cached>
    where
        F: std::future::Future<Output = Result<Cached>>,
    {
        let Some(c) = cache else { return load.await };
        let (generation, hit) = c.get(&key);
        if let Some(v) = hit {
            return Ok(v);
        }
        let v = load.await?;
        c.put(generation, key, v.clone());
        Ok(v)
    }

    fn catalog_changed(&self) {
        if let Some(c) = &self.catalog_cache {
            c.invalidate();
        }
        self.boot_cache.invalidate();
    }

    fn tokens_changed(&self) {
        if let Some(c) = &self.token_cache {
            c.invalidate();
        }
        self.boot_cache.invalidate();
    }

    /// Sets the dead-after window (`--dead-after-s`; default 60 s).
    pub fn set_dead_after_ms(&mut self, ms: i64) {
        self.dead_after_ms = ms;
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn migrate(&self) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        if self.backend == Backend::Postgres {
            // Replicas starting together take turns.
            sqlx::query("SELECT pg_advisory_lock(7460001)").execute(&mut *conn).await?;
        }
        let result = async {
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_ms BIGINT NOT NULL)",
            )
            .execute(&mut *conn)
            .await?;
            let applied: Vec<i64> = sqlx::query("SELECT version FROM schema_migrations")
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| r.try_get::<i64, _>("version"))
                .collect::<Result<_, _>>()?;
            let serial = match self.backend {
                Backend::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
                Backend::Postgres => "BIGSERIAL PRIMARY KEY",
            };
            for (version, name, sql) in MIGRATIONS {
                if applied.contains(version) {
                    continue;
                }
                let sql: String = sql
                    .replace("{serial}", serial)
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("--"))
                    .collect::<Vec<_>>()
                    .join("\n");
                let mut tx = sqlx::Connection::begin(&mut *conn).await?;
                for stmt in sql.split(';') {
                    if stmt.trim().is_empty() {
                        continue;
                    }
                    sqlx::query(stmt).execute(&mut *tx).await?;
                }
                sqlx::query("INSERT INTO schema_migrations (version, name, applied_ms) VALUES ($1, $2, $3)")
                    .bind(*version)
                    .bind(*name)
                    .bind(now_ms())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                tracing::info!(version, name, "applied migration");
            }
            Ok::<(), Error>(())
        }
        .await;
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT pg_advisory_unlock(7460001)").execute(&mut *conn).await?;
        }
        result
    }

    /// Starts a write transaction.
    pub async fn write(&self) -> Result<Tx> {
        let guard = match &self.write_lock {
            Some(l) => Some(l.clone().lock_owned().await),
            None => None,
        };
        let tx = match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        };
        Ok(Tx { tx, _guard: guard })
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Catalog
    // -----------------------------------------------------------------------------------------

    /// Inserts a catalog document. `Ok(true)`: created; `Ok(false)`: an identical one existed.
    pub async fn put_object(&self, kind: Kind, id: &str, body: &serde_json::Value) -> Result<bool> {
        let mut tx = self.write().await?;
        let existing: Option<String> = sqlx::query(&format!("SELECT body FROM {} WHERE id = $1", kind.table()))
            .bind(id)
            .fetch_optional(tx.c())
            .await?
            .map(|r| r.try_get("body"))
            .transpose()?;
        if let Some(existing) = existing {
            let existing: serde_json::Value = parse_json("catalog object", &existing)?;
            return if &existing == body {
                Ok(false)
            } else {
                Err(Error::Conflict(format!(
                    "{} {id} exists with different content; DELETE /v1/{}s/{id} first or use another id",
                    kind.noun(),
                    kind.noun()
                )))
            };
        }
        sqlx::query(&format!("INSERT INTO {} (id, body, created_ms) VALUES ($1, $2, $3)", kind.table()))
            .bind(id)
            .bind(body.to_string())
            .bind(now_ms())
            .execute(tx.c())
            .await?;
        tx.commit().await?;
        self.catalog_changed();
        Ok(true)
    }

    pub async fn get_object<T: DeserializeOwned>(&self, kind: Kind, id: &str) -> Result<Option<T>> {
        let load = async {
            let row = sqlx::query(&format!("SELECT body FROM {} WHERE id = $1", kind.table()))
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
            Ok(Cached::Body(row.map(|r| r.try_get::<String, _>("body")).transpose()?))
        };
        let Cached::Body(body) = Self::cached(&self.catalog_cache, format!("{}/{id}", kind.table()), load).await? else {
            unreachable!("cache key kinds do not mix")
        };
        body.map(|b| parse_json(kind.noun(), &b)).transpose()
    }

    /// A partition for the boot decision: parsed once and kept for at most the cache TTL. A
    /// missing partition is not cached (one created on another replica counts at once).
    pub async fn boot_partition(&self, id: &str) -> Result<Option<Arc<metal_types::Partition>>> {
        let key = format!("partitions/{id}");
        let (generation, hit) = self.boot_cache.get(&key);
        if let Some(Cached::Partition(p)) = hit {
            return Ok(Some(p));
        }
        let Some(p) = self.get_object::<metal_types::Partition>(Kind::Partition, id).await? else {
            return Ok(None);
        };
        let p = Arc::new(p);
        self.boot_cache.put(generation, key, Cached::Partition(p.clone()));
        Ok(Some(p))
    }

    pub async fn list_objects<T: DeserializeOwned>(&self, kind: Kind) -> Result<Vec<T>> {
        let load = async {
            let rows = sqlx::query(&format!("SELECT body FROM {} ORDER BY id", kind.table())).fetch_all(&self.pool).await?;
            Ok(Cached::Bodies(rows.iter().map(|r| r.try_get::<String, _>("body")).collect::<Result<_, _>>()?))
        };
        let Cached::Bodies(bodies) = Self::cached(&self.catalog_cache, kind.table().to_string(), load).await? else {
            unreachable!("cache key kinds do not mix")
        };
        bodies.iter().map(|b| parse_json(kind.noun(), b)).collect()
    }

    pub async fn delete_object(&self, kind: Kind, id: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let n = sqlx::query(&format!("DELETE FROM {} WHERE id = $1", kind.table()))
            .bind(id)
            .execute(tx.c())
            .await?
            .rows_affected();
        tx.commit().await?;
        self.catalog_changed();
        Ok(n > 0)
    }

    /// Deletes a project and revokes its tenant tokens in one transaction, refusing while it has
    /// active allocations. A project created again with the same id starts with no tokens.
    pub async fn delete_project(&self, id: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let active: i64 = sqlx::query("SELECT COUNT(*) AS n FROM allocations WHERE freed_ms IS NULL AND project = $1")
            .bind(id)
            .fetch_one(tx.c())
            .await?
            .try_get("n")?;
        if active > 0 {
            return Err(Error::Conflict(format!("project {id} has {active} active allocations; free them first")));
        }
        let n = sqlx::query("DELETE FROM projects WHERE id = $1").bind(id).execute(tx.c()).await?.rows_affected();
        let revoked = sqlx::query("DELETE FROM tokens WHERE role = 'tenant' AND project = $1").bind(id).execute(tx.c()).await?.rows_affected();
        tx.commit().await?;
        self.catalog_changed();
        self.tokens_changed();
        if revoked > 0 {
            tracing::info!(project = id, revoked, "project deleted; its tenant tokens are revoked");
        }
        Ok(n > 0)
    }

    pub async fn put_image(&self, image: &Image, expires_ms: Option<i64>) -> Result<bool> {
        let body = serde_json::to_value(image).expect("wire types always serialize");
        let mut tx = self.write().await?;
        let existing: Option<String> = sqlx::query("SELECT body FROM images WHERE id = $1")
            .bind(&image.id)
            .fetch_optional(tx.c())
            .await?
            .map(|r| r.try_get("body"))
            .transpose()?;
        if let Some(existing) = existing {
            let existing: serde_json::Value = parse_json("image", &existing)?;
            return if existing == body {
                Ok(false)
            } else {
                Err(Error::Conflict(format!(
                    "image {} exists with different content; images are immutable: publish a new version, or DELETE /v1/images/{} first",
                    image.id, image.id
                )))
            };
        }
        sqlx::query("INSERT INTO images (id, name, version, expires_ms, body, created_ms) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&image.id)
            .bind(&image.manifest.name)
            .bind(&image.manifest.version)
            .bind(expires_ms)
            .bind(body.to_string())
            .bind(now_ms())
            .execute(tx.c())
            .await?;
        tx.commit().await?;
        self.catalog_changed();
        Ok(true)
    }

    /// (version, expires_ms, body) of the images with this id (`by = "id"`) or name (`by = "name"`).
    async fn image_rows(&self, by: &'static str, key: &str) -> Result<Vec<(String, Option<i64>, String)>> {
        let load = async {
            let rows = sqlx::query(&format!("SELECT version, expires_ms, body FROM images WHERE {by} = $1"))
                .bind(key)
                .fetch_all(&self.pool)
                .await?;
            let rows = rows
                .iter()
                .map(|r| Ok((r.try_get("version")?, r.try_get("expires_ms")?, r.try_get("body")?)))
                .collect::<Result<Vec<_>, sqlx::Error>>()?;
            Ok(Cached::Images(rows))
        };
        let Cached::Images(rows) = Self::cached(&self.catalog_cache, format!("images/{by}/{key}"), load).await? else {
            unreachable!("cache key kinds do not mix")
        };
        Ok(rows)
    }

    pub async fn get_image(&self, id: &str) -> Result<Option<Image>> {
        self.image_rows("id", id).await?.first().map(|(_, _, b)| parse_json("image", b)).transpose()
    }

    /// The newest version of `name` that has not expired at `now`.
    pub async fn newest_image(&self, name: &str, now: i64) -> Result<Option<Image>> {
        let rows = self.image_rows("name", name).await?;
        let best = rows
            .iter()
            .filter(|(_, exp, _)| exp.is_none_or(|e| e > now))
            .max_by(|a, b| policy::compare_versions(&a.0, &b.0));
        best.map(|(_, _, b)| parse_json("image", b)).transpose()
    }

    pub async fn image_expires_ms(&self, id: &str) -> Result<Option<i64>> {
        Ok(self.image_rows("id", id).await?.first().and_then(|(_, e, _)| *e))
    }

    pub async fn list_images(&self) -> Result<Vec<Image>> {
        sqlx::query("SELECT body FROM images ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| parse_json("image", &r.try_get::<String, _>("body")?))
            .collect()
    }

    pub async fn delete_image(&self, id: &str) -> Result<bool> {
        let mut tx = self.write().await?;
        let n = sqlx::query("DELETE FROM images WHERE id = $1").bind(id).execute(tx.c()).await?.rows_affected();
        tx.commit().await?;
        self.catalog_changed();
        Ok(n > 0)
    }

    // -----------------------------------------------------------------------------------------
    // Tokens
    // -----------------------------------------------------------------------------------------

    async fn insert_token_in(c: &mut AnyConnection, t: &TokenRow) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (id, hash, role, project, partition, machine, allocation, mac, description, expires_ms, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&t.id)
        .bind(&t.hash)
        .bind(&t.role)
        .bind(&t.project)
        .bind(&t.partition)
        .bind(&t.machine)
        .bind(&t.allocation)
        .bind(&t.mac)
        .bind(&t.description)
        .bind(t.expires_ms)
        .bind(now_ms())
        .execute(c)
        .await?;
        Ok(())
    }

    pub async fn insert_token(&self, t: &TokenRow) -> Result<()> {
        let mut tx = self.write().await?;
        Self::insert_token_in(tx.c(), t).await?;
        tx.commit().await?;
        self.tokens_changed();
        Ok(())
    }

    /// Makes sure a token with this hash exists (the bootstrap admin token, phone-home tokens).
    pub async fn ensure_token(&self, t: &TokenRow) -> Result<()> {
        let mut tx = self.write().await?;
        let exists = sqlx::query("SELECT id FROM tokens WHERE hash = $1").bind(&t.hash).fetch_optional(tx.c()).await?;
        // Replicas starting together race here: the loser's insert (PostgreSQL) or commit
        // (SQLite) meets the unique hash, and the token is there either way.
        let r = match exists {
            Some(_) => tx.commit().await,
            None => match Self::insert_token_in(tx.c(), t).await {
                Ok(()) => tx.commit().await,
                Err(e) => Err(e),
            },
        };
        let r = match r {
            Err(e) if e.is_unique_violation() => Ok(()),
            other => other,
        };
        self.tokens_changed();
        r
    }

    /// The token with this hash. Long-lived tokens (admin, tenant, pixie) are kept for at most
    /// the cache TTL on every backend, so a token deleted from the database on another replica or
    /// by hand stops working within that time; tokens that writes replace (machine credentials,
    /// phone-home and stored enrolment tokens) are read from the database each time on PostgreSQL.
    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRow>> {
        if self.token_cache.is_some() {
            // SQLite: the token cache already keeps every token for at most the TTL.
            return self.token_by_hash_read(hash).await;
        }
        let (generation, hit) = self.boot_cache.get(hash);
        if let Some(Cached::Token(Some(t))) = hit {
            return Ok(Some(*t));
        }
        let t = self.token_by_hash_read(hash).await?;
        if let Some(t) = &t {
            if matches!(t.role.as_str(), "admin" | "tenant" | "pixie") {
                self.boot_cache.put(generation, hash.to_string(), Cached::Token(Some(Box::new(t.clone()))));
            }
        }
        Ok(t)
    }

    /// Through the SQLite token cache when there is one, else from the database.
    async fn token_by_hash_read(&self, hash: &str) -> Result<Option<TokenRow>> {
        let load = async {
            let row = sqlx::query("SELECT * FROM tokens WHERE hash = $1").bind(hash).fetch_optional(&self.pool).await?;
            Ok(Cached::Token(row.as_ref().map(token_row).transpose()?.map(Box::new)))
        };
        let Cached::Token(t) = Self::cached(&self.token_cache, hash.to_string(), load).await? else {
            unreachable!("cache key kinds do not mix")
        };
        Ok(t.map(|b| *b))
    }

    /// Drops expired enrolment tokens stored by earlier versions (which wrote one per boot
    /// decision); returns how many. Enrolment tokens are stateless now (`enrolment.rs`).
    pub async fn drop_expired_stored_enrolments(&self, now: i64) -> Result<u64> {
        let mut tx = self.write().await?;
        let n = sqlx::query("DELETE FROM tokens WHERE role = 'enrolment' AND expires_ms < $1")
            .bind(now)
            .execute(tx.c())
            .await?
            .rows_affected();
        tx.commit().await?;
        self.tokens_changed();
        Ok(n)
    }

    /// Admin, tenant and pixie tokens (never their hashes' secrets: a row is all there is).
    pub async fn list_tokens(&self) -> Result<Vec<(TokenRow, i64)>> {
        sqlx::query("SELECT * FROM tokens WHERE role IN ('admin', 'tenant', 'pixie') ORDER BY created_ms, id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((token_row(r)?, r.try_get("created_ms")?)))
            .collect()
    }

    /// Revokes the admin, tenant or pixie token `id`. Refuses to revoke the last admin token
    /// that has not expired (nobody could administer the API any more). `Ok(false)`: no such token.
    pub async fn revoke_token(&self, id: &str, now: i64) -> Result<bool> {
        let mut tx = self.write().await?;
        let row = sqlx::query("SELECT role FROM tokens WHERE id = $1 AND role IN ('admin', 'tenant', 'pixie')")
            .bind(id)
            .fetch_optional(tx.c())
            .await?;
        let Some(row) = row else { return Ok(false) };
        if row.try_get::<String, _>("role")? == "admin" {
            let others = sqlx::query(
                "SELECT COUNT(*) AS n FROM tokens WHERE role = 'admin' AND id <> $1 AND (expires_ms IS NULL OR expires_ms > $2)",
            )
            .bind(id)
            .bind(now)
            .fetch_one(tx.c())
            .await?;
            if others.try_get::<i64, _>("n")? == 0 {
                return Err(Error::Conflict(format!(
                    "token {id} is the last admin token; create another admin token first, then revoke this one"
                )));
            }
        }
        sqlx::query("DELETE FROM tokens WHERE id = $1").bind(id).execute(tx.c()).await?;
        tx.commit().await?;
        self.tokens_changed();
        Ok(true)
    }

    /// The secret `name`, created from `fresh()` by whichever API gets there first: every
    /// replica ends up with the same value.
    pub async fn secret(&self, name: &str, fresh: impl FnOnce() -> String) -> Result<String> {
        if let Some(v) = self.read_secret(name).await? {
            return Ok(v);
        }
        let mut tx = self.write().await?;
        sqlx::query("INSERT INTO secrets (name, value, created_ms) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(fresh())
            .bind(now_ms())
            .execute(tx.c())
            .await?;
        tx.commit().await?;
        self.read_secret(name)
            .await?
            .ok_or_else(|| Error::Internal(format!("secret {name} vanished right after it was created")))
    }

    /// The secret `name` as stored now, if there is one.
    pub async fn read_secret(&self, name: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM secrets WHERE name = $1").bind(name).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }

    // -----------------------------------------------------------------------------------------
    // Machines and events
    // -----------------------------------------------------------------------------------------

    pub async fn machine(&self, id: MachineId) -> Result<Option<MachineRow>> {
        sqlx::query(&format!("{MACHINE_SELECT} WHERE m.id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(machine_row)
            .transpose()
    }

    /// All machines, or only those allocated to `project`.
    pub async fn machines(&self, project: Option<&str>) -> Result<Vec<MachineRow>> {
        let rows = match project {
            None => sqlx::query(&format!("{MACHINE_SELECT} ORDER BY m.id")).fetch_all(&self.pool).await?,
            Some(p) => {
                sqlx::query(&format!("{MACHINE_SELECT} WHERE a.project = $1 ORDER BY m.id"))
                    .bind(p)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(machine_row).collect()
    }

    /// For the boot decision, in one query: the machine that owns `mac`, or else the one named
    /// by `uuid` (in either SMBIOS byte order); its id and whether its current allocation has
    /// phoned home. The MAC comes first: it is what the enrolment token is bound to, and a UUID
    /// in a boot request is whatever the client claims.
    pub async fn boot_machine(&self, uuid: Option<MachineId>, mac: &str) -> Result<Option<(MachineId, bool)>> {
        let rows = sqlx::query(
            "SELECT m.id, a.phoned_home_ms, CASE WHEN m.id = (SELECT machine FROM machine_macs WHERE mac = $3) THEN 0 ELSE 1 END AS rank \
             FROM machines m LEFT JOIN allocations a ON a.id = m.allocation \
             WHERE m.id = (SELECT machine FROM machine_macs WHERE mac = $3) OR m.id = $1 OR m.id = $2 ORDER BY rank",
        )
        .bind(uuid.map(|u| u.to_string()))
        .bind(uuid.map(|u| u.byte_swapped().to_string()))
        .bind(crate::enrolment::normalize_mac(mac))
        .fetch_all(&self.pool)
        .await?;
        let Some(r) = rows.first() else { return Ok(None) };
        let id = parse_machine_id(&r.try_get::<String, _>("id")?)?;
        Ok(Some((id, r.try_get::<Option<i64>, _>("phoned_home_ms")?.is_some())))
    }

    pub async fn machine_by_mac(&self, mac: &str) -> Result<Option<MachineId>> {
        let row = sqlx::query("SELECT machine FROM machine_macs WHERE mac = $1")
            .bind(crate::enrolment::normalize_mac(mac))
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse_machine_id(&r.try_get::<String, _>("machine")?)).transpose()
    }

    /// The machine's state machine row and last sign of life, locked for this transaction on
    /// PostgreSQL so concurrent events of one machine apply one after the other (SQLite has one
    /// writer anyway).
    async fn load_fsm(&self, c: &mut AnyConnection, id: MachineId) -> Result<Option<(FsmState, Option<i64>)>> {
        let lock = if self.backend == Backend::Postgres { " FOR UPDATE" } else { "" };
        let row = sqlx::query(&format!(
            "SELECT state, crash_count, crash_loop, reclaiming, reclaim_ms, failed_reclaim, last_seen_ms FROM machines WHERE id = $1{lock}"
        ))
        .bind(id.to_string())
        .fetch_optional(c)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let state: Option<String> = r.try_get("state")?;
        let fsm = FsmState {
            state: state.as_deref().map(parse_event).transpose()?,
            crash_count: r.try_get::<i64, _>("crash_count")? as u32,
            crash_loop: r.try_get::<i64, _>("crash_loop")? != 0,
            reclaiming: r.try_get::<i64, _>("reclaiming")? != 0,
            reclaim_ms: r.try_get("reclaim_ms")?,
            failed_reclaim: r.try_get::<i64, _>("failed_reclaim")? != 0,
        };
        Ok(Some((fsm, r.try_get("last_seen_ms")?)))
    }

    /// Runs events through the state machine and stores them, inside `c`'s transaction.
    /// The machine's own events are signs of life; pixie's sightings are not (see [`fsm`]).
    async fn apply_events_in(&self, c: &mut AnyConnection, id: MachineId, source: EventSource, events: &[(Ev, i64, String)], now: i64) -> Result<()> {
        let Some((mut s, last_seen)) = self.load_fsm(c, id).await? else {
            return Err(Error::not_found("machine", id));
        };
        let origin = match source {
            EventSource::Pixie => {
                fsm::Origin::Pixie { agent_alive: last_seen.is_some_and(|t| now - t < self.dead_after_ms) }
            }
            _ => fsm::Origin::Machine,
        };
        let mut alive = false;
        for (ev, time_ms, message) in events {
            let step = fsm::apply(&s, *ev, origin, now);
            alive |= step.alive(origin);
            let (unexpected, ignored) = match step.record {
                Record::Store { unexpected } => (unexpected, false),
                Record::Ignored => (false, true),
                Record::Heartbeat | Record::Collapse => {
                    s = step.next;
                    continue;
                }
            };
            if unexpected {
                tracing::warn!(machine = %id, from = ?s.state.map(|e| e.as_str()), event = %ev, "unexpected provisioning event");
            }
            sqlx::query(
                "INSERT INTO events (machine, event, message, time_ms, received_ms, unexpected, source, ignored) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            )
            .bind(id.to_string())
            .bind(ev.as_str())
            .bind(metal_types::bound_message(message.clone()))
            .bind(*time_ms)
            .bind(now)
            .bind(i64::from(unexpected))
            .bind(source_name(source))
            .bind(i64::from(ignored))
            .execute(&mut *c)
            .await?;
            s = step.next;
        }
        sqlx::query(
            "UPDATE machines SET state = $1, crash_count = $2, crash_loop = $3, reclaiming = $4, reclaim_ms = $5, \
             failed_reclaim = $6, last_seen_ms = CASE WHEN $7 = 1 THEN $8 ELSE last_seen_ms END, updated_ms = $8 WHERE id = $9",
        )
        .bind(s.state.map(|e| e.as_str().to_string()))
        .bind(i64::from(s.crash_count))
        .bind(i64::from(s.crash_loop))
        .bind(i64::from(s.reclaiming))
        .bind(s.reclaim_ms)
        .bind(i64::from(s.failed_reclaim))
        .bind(i64::from(alive))
        .bind(now)
        .bind(id.to_string())
        .execute(&mut *c)
        .await?;
        Ok(())
    }

    /// Events the machine reported itself (metal-hammer with its credential).
    pub async fn record_events(&self, id: MachineId, events: &[(Ev, i64, String)]) -> Result<()> {
        let now = now_ms();
        let mut tx = self.write().await?;
        self.apply_events_in(tx.c(), id, EventSource::Agent, events, now).await?;
        tx.commit().await
    }

    /// A `PXE Booting` that pixie saw for `mac` (and, as the client claimed, `uuid`). Recorded
    /// only for a registered machine that owns that MAC and, when a UUID was sent, is that UUID;
    /// never creates a machine. Returns the machine it was recorded for.
    pub async fn pxe_event(&self, mac: &str, uuid: Option<MachineId>, message: &str) -> Result<Option<MachineId>> {
        let Some(id) = self.machine_by_mac(mac).await? else { return Ok(None) };
        if uuid.is_some_and(|u| !u.same_machine(id)) {
            tracing::info!(%mac, machine = %id, claimed = ?uuid.map(|u| u.to_string()), "PXE request names another UUID than the MAC's machine; not recorded");
            return Ok(None);
        }
        let now = now_ms();
        let mut tx = self.write().await?;
        self.apply_events_in(tx.c(), id, EventSource::Pixie, &[(Ev::PxeBooting, now, message.to_string())], now).await?;
        tx.commit().await?;
        Ok(Some(id))
    }

    /// A heartbeat: the machine's agent is alive.
    pub async fn heartbeat(&self, id: MachineId) -> Result<()> {
        let now = now_ms();
        let mut tx = self.write().await?;
        sqlx::query("UPDATE machines SET last_seen_ms = $1 WHERE id = $2")
            .bind(now)
            .bind(id.to_string())
            .execute(tx.c())
            .await?;
        tx.commit().await
    }

    /// Registers (or re-registers) a machine and replaces its credential. A sign of life.
    ///
    /// The rules (api/README.md, "Machine identity"): a machine that exists may be registered
    /// again only with a token whose MAC (`token_mac`; `None` for an admin) is one of the MACs it
    /// registered with before, and never while its allocation's OS has phoned home; a MAC that
    /// belongs to another machine is not taken over (the token's own MAC is refused outright).
    pub async fn register(&self, reg: &Registration<'_>) -> Result<()> {
        let now = now_ms();
        let id = reg.id;
        let mut tx = self.write().await?;
        let lock = if self.backend == Backend::Postgres { " FOR UPDATE OF m" } else { "" };
        let existing = sqlx::query(&format!(
            "SELECT m.id, a.id AS alloc, a.phoned_home_ms FROM machines m LEFT JOIN allocations a ON a.id = m.allocation WHERE m.id = $1{lock}"
        ))
        .bind(id.to_string())
        .fetch_optional(tx.c())
        .await?;
        if let Some(row) = &existing {
            if let (Some(alloc), Some(at)) = (row.try_get::<Option<String>, _>("alloc")?, row.try_get::<Option<i64>, _>("phoned_home_ms")?) {
                return Err(Error::Conflict(format!(
                    "machine {id} is running the installed OS of allocation {alloc} (phoned home at {}); it registers again \
                     only after the allocation is freed",
                    rfc3339(at)
                )));
            }
            if let Some(mac) = reg.token_mac {
                let known = sqlx::query("SELECT mac FROM machine_macs WHERE machine = $1 AND mac = $2")
                    .bind(id.to_string())
                    .bind(mac)
                    .fetch_optional(tx.c())
                    .await?;
                if known.is_none() {
                    return Err(Error::Forbidden(format!(
                        "machine {id} is registered with other NICs than {mac}, the MAC this enrolment token was issued to; \
                         PXE boot the machine from one of its own NICs (if its NICs really changed, an operator must \
                         decommission the machine first)"
                    )));
                }
            }
        }
        let mut macs = Vec::new();
        for nic in &reg.inventory.nics {
            let mac = crate::enrolment::normalize_mac(&nic.mac);
            if mac.is_empty() || macs.contains(&mac) {
                continue;
            }
            let owner: Option<String> = sqlx::query("SELECT machine FROM machine_macs WHERE mac = $1 AND machine <> $2")
                .bind(&mac)
                .bind(id.to_string())
                .fetch_optional(tx.c())
                .await?
                .map(|r| r.try_get("machine"))
                .transpose()?;
            match owner {
                Some(owner) if reg.token_mac == Some(mac.as_str()) => {
                    return Err(Error::Conflict(format!(
                        "NIC {mac} belongs to machine {owner}; if it moved to machine {id}, an operator must decommission {owner} first"
                    )))
                }
                Some(owner) => {
                    tracing::warn!(machine = %id, %mac, %owner, "inventory lists a NIC of another machine; keeping it with that machine")
                }
                None => macs.push(mac),
            }
        }
        sqlx::query(
            "INSERT INTO machines (id, partition, size, inventory, last_seen_ms, created_ms, updated_ms) VALUES ($1, $2, $3, $4, $5, $5, $5) \
             ON CONFLICT (id) DO UPDATE SET partition = excluded.partition, size = excluded.size, \
             inventory = excluded.inventory, last_seen_ms = excluded.last_seen_ms, updated_ms = excluded.updated_ms",
        )
        .bind(id.to_string())
        .bind(reg.partition)
        .bind(reg.size)
        .bind(to_json(reg.inventory))
        .bind(now)
        .execute(tx.c())
        .await?;
        for mac in &macs {
            sqlx::query("INSERT INTO machine_macs (mac, machine) VALUES ($1, $2) ON CONFLICT (mac) DO NOTHING")
                .bind(mac)
                .bind(id.to_string())
                .execute(tx.c())
                .await?;
        }
        sqlx::query("DELETE FROM tokens WHERE role = 'machine' AND machine = $1")
            .bind(id.to_string())
            .execute(tx.c())
            .await?;
        Self::insert_token_in(tx.c(), reg.credential).await?;
        // No event here: the agent reports `Preparing` and `Registering` itself (queued before it
        // had a credential, sent right after), as in metal-stack.
        tx.commit().await?;
        self.tokens_changed();
        Ok(())
    }

    pub async fn set_wipe_report(&self, id: MachineId, report: &metal_types::WipeReport) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query("UPDATE machines SET wipe = $1, last_seen_ms = $2 WHERE id = $3")
            .bind(to_json(report))
            .bind(now_ms())
            .bind(id.to_string())
            .execute(tx.c())
            .await?;
        tx.commit().await
    }

    /// Stores an install report for the machine's current allocation.
    pub async fn install_report(&self, id: MachineId, report: &metal_types::InstallReport) -> Result<()> {
        let now = now_ms();
        let mut tx = self.write().await?;
        let current: Option<String> = sqlx::query("SELECT allocation FROM machines WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(tx.c())
            .await?
            .map(|r| r.try_get::<Option<String>, _>("allocation"))
            .transpose()?
            .flatten();
        if current.as_deref() != Some(report.allocation.to_string().as_str()) {
            return Err(Error::Conflict(format!(
                "allocation {} is not this machine's current allocation; wait for new instructions",
                report.allocation
            )));
        }
        if let Some(boot) = &report.boot {
            sqlx::query("UPDATE machines SET boot = $1 WHERE id = $2")
                .bind(to_json(boot))
                .bind(id.to_string())
                .execute(tx.c())
                .await?;
        }
        if !report.success {
            let msg = format!("install failed: {}", report.message);
            self.apply_events_in(tx.c(), id, EventSource::Agent, &[(Ev::Crashed, now, msg)], now).await?;
        } else {
            sqlx::query("UPDATE machines SET last_seen_ms = $1 WHERE id = $2")
                .bind(now)
                .bind(id.to_string())
                .execute(tx.c())
                .await?;
        }
        tx.commit().await
    }

    /// The machine's timeline; with `since_ms`, only what the API received from then on (a
    /// tenant sees the timeline of its own allocation, not the previous tenant's).
    pub async fn events(&self, id: MachineId, since_ms: Option<i64>) -> Result<Vec<MachineEvent>> {
        sqlx::query(
            "SELECT event, message, time_ms, received_ms, unexpected, source, ignored FROM events \
             WHERE machine = $1 AND received_ms >= $2 ORDER BY seq",
        )
        .bind(id.to_string())
        .bind(since_ms.unwrap_or(i64::MIN))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(MachineEvent {
                event: parse_event(&r.try_get::<String, _>("event")?)?,
                message: r.try_get("message")?,
                time: rfc3339(r.try_get("time_ms")?),
                received: rfc3339(r.try_get("received_ms")?),
                unexpected: r.try_get::<i64, _>("unexpected")? != 0,
                source: parse_source(&r.try_get::<String, _>("source")?)?,
                ignored: r.try_get::<i64, _>("ignored")? != 0,
            })
        })
        .collect()
    }

    /// When the allocation was made (ms since the epoch).
    pub async fn allocation_created_ms(&self, id: AllocationId) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT created_ms FROM allocations WHERE id = $1").bind(id.to_string()).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.try_get("created_ms")).transpose()?)
    }

    // -----------------------------------------------------------------------------------------
    // Allocations
    // -----------------------------------------------------------------------------------------


    /// Picks a machine and allocates it in one transaction; see [`policy::pick`].
    ///
    /// PostgreSQL: one transaction per request, candidates locked `FOR UPDATE SKIP LOCKED`, the
    /// commit carries a NOTIFY for the other replicas. SQLite: requests are handed to one writer
    /// task that runs every queued request in one transaction (group commit: one fsync for many
    /// allocations); a request is answered only after its transaction committed.
    pub async fn allocate(&self, plan: &AllocationPlan, dead_after_ms: i64) -> Result<AllocOutcome> {
        match &self.group_writer {
            Some(tx) => {
                let (reply, rx) = tokio::sync::oneshot::channel();
                tx.send(AllocJob { plan: plan.clone(), dead_after_ms, reply })
                    .map_err(|_| Error::Internal("the allocation writer stopped".into()))?;
                rx.await.map_err(|_| Error::Internal("the allocation writer dropped a request".into()))?
            }
            None => self.allocate_pg(plan, dead_after_ms).await,
        }
    }

    async fn allocate_pg(&self, plan: &AllocationPlan, dead_after_ms: i64) -> Result<AllocOutcome> {
        const ATTEMPTS: usize = 16;
        for attempt in 0..ATTEMPTS {
            let mut tx = self.write().await?;
            match allocate_attempt(tx.c(), Backend::Postgres, plan, dead_after_ms).await {
                Ok(Attempt::Done(AllocOutcome::Created(a))) => {
                    // Delivered to every replica's listener when the transaction commits. The
                    // payload is a UUID (hex and dashes), safe to inline.
                    sqlx::query(&format!("NOTIFY {ALLOCATION_CHANNEL}, '{}'", a.machine)).execute(tx.c()).await?;
                    match tx.commit().await {
                        Ok(()) => return Ok(AllocOutcome::Created(a)),
                        Err(e) if e.is_unique_violation() => continue,
                        Err(e) => return Err(e),
                    }
                }
                Ok(Attempt::Done(other)) => {
                    tx.rollback().await?;
                    return Ok(other);
                }
                Ok(Attempt::Retry) => {
                    tx.rollback().await?;
                    tracing::debug!(attempt, "lost the race for a machine; retrying");
                }
                Err(e) if e.is_unique_violation() => {
                    drop(tx);
                    if let Some(key) = &plan.idempotency_key {
                        // A concurrent request with the same key won.
                        let mut c = self.pool.acquire().await?;
                        if let Some(a) = allocation_by_key(&mut c, &plan.project, key).await? {
                            return Ok(AllocOutcome::Existing(a));
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Conflict(format!(
            "could not allocate after {ATTEMPTS} attempts because of concurrent allocations; retry the request"
        )))
    }

    pub async fn allocations(&self, project: Option<&str>) -> Result<Vec<Allocation>> {
        let rows = match project {
            None => {
                sqlx::query("SELECT body FROM allocations WHERE freed_ms IS NULL ORDER BY created_ms, id")
                    .fetch_all(&self.pool)
                    .await?
            }
            Some(p) => {
                sqlx::query("SELECT body FROM allocations WHERE freed_ms IS NULL AND project = $1 ORDER BY created_ms, id")
                    .bind(p)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(|r| parse_json("allocation", &r.try_get::<String, _>("body")?)).collect()
    }

    /// Whether the allocation is still active and belongs to `machine`.
    pub async fn allocation_active(&self, id: AllocationId, machine: MachineId) -> Result<bool> {
        let row = sqlx::query("SELECT machine, freed_ms FROM allocations WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            None => false,
            Some(r) => {
                r.try_get::<String, _>("machine")? == machine.to_string()
                    && r.try_get::<Option<i64>, _>("freed_ms")?.is_none()
            }
        })
    }

    /// Records the phone home of an allocation's OS. The machine's credential goes: metal-hammer
    /// is gone (it kexeced), so nobody should hold one until the machine is freed.
    pub async fn phoned_home(&self, machine: MachineId, allocation: AllocationId, time_ms: i64, message: &str) -> Result<()> {
        let now = now_ms();
        let mut tx = self.write().await?;
        sqlx::query("UPDATE allocations SET phoned_home_ms = $1 WHERE id = $2 AND phoned_home_ms IS NULL")
            .bind(now)
            .bind(allocation.to_string())
            .execute(tx.c())
            .await?;
        sqlx::query("DELETE FROM tokens WHERE role = 'machine' AND machine = $1")
            .bind(machine.to_string())
            .execute(tx.c())
            .await?;
        self.apply_events_in(tx.c(), machine, EventSource::PhoneHome, &[(Ev::PhonedHome, time_ms, message.to_string())], now).await?;
        tx.commit().await?;
        self.tokens_changed();
        Ok(())
    }

    /// Frees the machine's allocation, deletes its phone-home token and records `Machine
    /// Reclaim`. With `project`, only an allocation of that project is freed (others look like
    /// a missing machine).
    pub async fn free(&self, id: MachineId, project: Option<&str>) -> Result<()> {
        let now = now_ms();
        let mut tx = self.write().await?;
        let lock = if self.backend == Backend::Postgres { " FOR UPDATE OF m" } else { "" };
        let row = sqlx::query(&format!(
            "SELECT m.allocation, a.project FROM machines m LEFT JOIN allocations a ON a.id = m.allocation WHERE m.id = $1{lock}"
        ))
        .bind(id.to_string())
        .fetch_optional(tx.c())
        .await?;
        let Some(row) = row else { return Err(Error::not_found("machine", id)) };
        let alloc: Option<String> = row.try_get("allocation")?;
        let owner: Option<String> = row.try_get("project")?;
        if let Some(p) = project {
            if owner.as_deref() != Some(p) {
                return Err(Error::not_found("machine", id));
            }
        }
        let Some(alloc) = alloc else {
            return Err(Error::Conflict(format!("machine {id} is not allocated; there is nothing to free")));
        };
        sqlx::query("UPDATE allocations SET freed_ms = $1 WHERE id = $2")
            .bind(now)
            .bind(&alloc)
            .execute(tx.c())
            .await?;
        sqlx::query("UPDATE machines SET allocation = NULL, boot = NULL, updated_ms = $1 WHERE id = $2")
            .bind(now)
            .bind(id.to_string())
            .execute(tx.c())
            .await?;
        sqlx::query("DELETE FROM tokens WHERE role = 'phone_home' AND allocation = $1").bind(&alloc).execute(tx.c()).await?;
        self.apply_events_in(tx.c(), id, EventSource::Api, &[(Ev::MachineReclaim, now, format!("allocation {alloc} freed"))], now).await?;
        tx.commit().await?;
        self.tokens_changed();
        Ok(())
    }

    /// Stores the phone-home token of an allocation unless it is stored already (every answer
    /// of `wait` for one allocation carries the same token; see `auth::phone_home_token`).
    pub async fn issue_phone_home(&self, t: &TokenRow) -> Result<()> {
        self.ensure_token(t).await
    }

    /// Whether the allocation's OS has phoned home.
    pub async fn allocation_phoned_home(&self, id: AllocationId) -> Result<bool> {
        let row = sqlx::query("SELECT phoned_home_ms FROM allocations WHERE id = $1").bind(id.to_string()).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.try_get::<Option<i64>, _>("phoned_home_ms")).transpose()?.flatten().is_some())
    }

    // -----------------------------------------------------------------------------------------
    // Metrics
    // -----------------------------------------------------------------------------------------

    pub async fn machines_by_state(&self) -> Result<Vec<(String, i64)>> {
        sqlx::query("SELECT state, COUNT(*) AS n FROM machines GROUP BY state ORDER BY state")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok((r.try_get::<Option<String>, _>("state")?.unwrap_or_else(|| "none".into()), r.try_get("n")?))
            })
            .collect()
    }

    pub async fn allocation_counts(&self) -> Result<(i64, i64)> {
        let r = sqlx::query(
            "SELECT COUNT(*) AS total, COUNT(freed_ms) AS freed FROM allocations",
        )
        .fetch_one(&self.pool)
        .await?;
        let total: i64 = r.try_get("total")?;
        let freed: i64 = r.try_get("freed")?;
        Ok((total, total - freed))
    }
}

/// One queued allocation for the SQLite group writer.
struct AllocJob {
    plan: AllocationPlan,
    dead_after_ms: i64,
    reply: tokio::sync::oneshot::Sender<Result<AllocOutcome>>,
}

#[allow(clippy::large_enum_variant)] // short-lived, returned once per attempt
enum Attempt {
    Done(AllocOutcome),
    /// The picked machine was taken between the read and the write: pick again.
    Retry,
}

async fn allocation_by_key(c: &mut AnyConnection, project: &str, key: &str) -> Result<Option<Allocation>> {
    let row = sqlx::query("SELECT body FROM allocations WHERE project = $1 AND idempotency_key = $2")
        .bind(project)
        .bind(key)
        .fetch_optional(c)
        .await?;
    row.map(|r| parse_json("allocation", &r.try_get::<String, _>("body")?)).transpose()
}

/// One try at an allocation inside the caller's transaction. On `Retry` and on errors the caller
/// must undo what this wrote (roll back, or delete the allocation row it names).
async fn allocate_attempt(c: &mut AnyConnection, backend: Backend, plan: &AllocationPlan, dead_after_ms: i64) -> Result<Attempt> {
    let now = now_ms();
    let pg = backend == Backend::Postgres;
    if let Some(key) = &plan.idempotency_key {
        if pg {
            // Requests with the same key queue here until the first one's transaction ends, so
            // the later ones see its allocation below instead of each taking (and locking) a
            // machine of their own in the meantime. SQLite serialises writers anyway.
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))::text")
                .bind(format!("{}/{key}", plan.project))
                .execute(&mut *c)
                .await?;
        }
        if let Some(a) = allocation_by_key(c, &plan.project, key).await? {
            return Ok(Attempt::Done(AllocOutcome::Existing(a)));
        }
    }
    let rows = match (&plan.machine, &plan.size) {
        (Some(m), _) => {
            sqlx::query(&format!(
                "SELECT id, state, allocation, crash_loop, last_seen_ms FROM machines WHERE id = $1 AND partition = $2{}",
                if pg { " FOR UPDATE" } else { "" }
            ))
            .bind(m.to_string())
            .bind(&plan.partition)
            .fetch_all(&mut *c)
            .await?
        }
        (None, Some(size)) => {
            // Pre-filter in SQL (index `machines_free`); the pick re-checks every condition.
            let tail = if pg { "LIMIT 1 FOR UPDATE SKIP LOCKED" } else { "LIMIT 16" };
            sqlx::query(&format!(
                "SELECT id, state, allocation, crash_loop, last_seen_ms FROM machines \
                 WHERE partition = $1 AND size = $2 AND state = 'Waiting' AND allocation IS NULL \
                 AND crash_loop = 0 AND last_seen_ms > $3 ORDER BY last_seen_ms DESC {tail}"
            ))
            .bind(&plan.partition)
            .bind(size)
            .bind(now - dead_after_ms)
            .fetch_all(&mut *c)
            .await?
        }
        (None, None) => return Err(Error::bad_request("give a size or a machine")),
    };
    let cands: Vec<Candidate> = rows
        .iter()
        .map(|r| {
            let state: Option<String> = r.try_get("state")?;
            Ok(Candidate {
                id: parse_machine_id(&r.try_get::<String, _>("id")?)?,
                state: state.as_deref().map(parse_event).transpose()?,
                allocated: r.try_get::<Option<String>, _>("allocation")?.is_some(),
                crash_loop: r.try_get::<i64, _>("crash_loop")? != 0,
                last_seen_ms: r.try_get("last_seen_ms")?,
            })
        })
        .collect::<Result<_>>()?;
    let Some(machine) = policy::pick(&cands, now, dead_after_ms, rand::random()) else {
        return Err(why_no_machine(plan, cands.first(), now, dead_after_ms));
    };
    let alloc = Allocation {
        id: AllocationId::new_random(),
        machine,
        project: plan.project.clone(),
        partition: plan.partition.clone(),
        image: plan.image.clone(),
        hostname: plan.hostname.clone(),
        layout: plan.layout.clone(),
        ssh_keys: plan.ssh_keys.clone(),
        user_data: plan.user_data.clone(),
        created_at: rfc3339(now),
        idempotency_key: plan.idempotency_key.clone(),
    };
    sqlx::query("INSERT INTO allocations (id, machine, project, body, idempotency_key, created_ms) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(alloc.id.to_string())
        .bind(machine.to_string())
        .bind(&alloc.project)
        .bind(to_json(&alloc))
        .bind(&alloc.idempotency_key)
        .bind(now)
        .execute(&mut *c)
        .await?;
    // The re-check: only a machine that is still free and waiting is taken.
    let n = sqlx::query(
        "UPDATE machines SET allocation = $1, updated_ms = $2 WHERE id = $3 AND allocation IS NULL AND state = 'Waiting'",
    )
    .bind(alloc.id.to_string())
    .bind(now)
    .bind(machine.to_string())
    .execute(&mut *c)
    .await?
    .rows_affected();
    if n == 0 {
        if !pg {
            sqlx::query("DELETE FROM allocations WHERE id = $1").bind(alloc.id.to_string()).execute(&mut *c).await?;
        }
        return Ok(Attempt::Retry);
    }
    Ok(Attempt::Done(AllocOutcome::Created(alloc)))
}

fn why_no_machine(plan: &AllocationPlan, cand: Option<&Candidate>, now: i64, dead_after_ms: i64) -> Error {
    match (&plan.machine, cand) {
        (Some(m), None) => Error::NotFound(format!("machine {m} not found in partition {}", plan.partition)),
        (Some(m), Some(c)) => {
            let why = if c.allocated {
                "it is already allocated".to_string()
            } else if c.crash_loop {
                "it is crash-looping".to_string()
            } else if c.state != Some(Ev::Waiting) {
                format!("it is not Waiting (state: {})", c.state.map_or("none", |e| e.as_str()))
            } else if !c.eligible(now, dead_after_ms) {
                format!("it has not been heard from in {} s", dead_after_ms / 1000)
            } else {
                "it was taken concurrently".to_string()
            };
            Error::NoMachineAvailable(format!("machine {m} cannot be allocated: {why}; pick another machine or ask for a size"))
        }
        (None, _) => Error::NoMachineAvailable(format!(
            "no machine of size {} is waiting in partition {}; retry when machines return to the pool, or try another size or partition",
            plan.size.as_deref().unwrap_or("?"),
            plan.partition
        )),
    }
}

/// The SQLite allocation writer: takes every queued request, runs them in one transaction, and
/// answers each after the commit. Exits when the store is dropped.
async fn group_writer(pool: AnyPool, lock: Arc<Mutex<()>>, mut jobs: tokio::sync::mpsc::UnboundedReceiver<AllocJob>) {
    const MAX_BATCH: usize = 256;
    while let Some(first) = jobs.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let _guard = lock.lock().await;
        let results = run_batch(&pool, &batch).await;
        match results {
            Ok(results) => {
                for (job, r) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, jobs = batch.len(), "allocation batch failed; nothing of it was committed");
                for job in batch {
                    let _ = job.reply.send(Err(Error::Internal(format!("allocation transaction failed: {msg}"))));
                }
            }
        }
    }
}

/// Runs a batch in one transaction. `Err` only when the transaction itself failed (then nothing
/// was committed); a request's own failure (no machine, …) is its result and wrote nothing.
async fn run_batch(pool: &AnyPool, batch: &[AllocJob]) -> Result<Vec<Result<AllocOutcome>>> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let mut result = Err(Error::Conflict("could not allocate because of concurrent allocations; retry".into()));
        for _ in 0..16 {
            match allocate_attempt(&mut tx, Backend::Sqlite, &job.plan, job.dead_after_ms).await {
                Ok(Attempt::Retry) => continue,
                Ok(Attempt::Done(o)) => {
                    result = Ok(o);
                    break;
                }
                // A database error leaves the transaction in doubt: fail the whole batch.
                Err(Error::Db(e)) if !matches!(&e, sqlx::Error::Database(d) if d.is_unique_violation()) => return Err(Error::Db(e)),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        results.push(result);
    }
    tx.commit().await?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_drops_values_read_before_a_write() {
        let c = Cache::new(Duration::from_secs(60));
        let (g, hit) = c.get("k");
        assert!(hit.is_none());
        // A writer commits and invalidates while the reader was reading the old value.
        c.invalidate();
        c.put(g, "k".into(), Cached::Body(Some("old".into())));
        assert!(c.get("k").1.is_none(), "a stale read must not be cached");
        let (g, _) = c.get("k");
        c.put(g, "k".into(), Cached::Body(Some("new".into())));
        assert!(matches!(c.get("k").1, Some(Cached::Body(Some(b))) if b == "new"));
        c.invalidate();
        assert!(c.get("k").1.is_none());
    }

    #[test]
    fn cache_entries_expire() {
        let c = Cache::new(Duration::from_millis(50));
        let (g, _) = c.get("k");
        c.put(g, "k".into(), Cached::Body(Some("v".into())));
        assert!(c.get("k").1.is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(c.get("k").1.is_none(), "an entry older than the TTL must be read again");
        let off = Cache::new(Duration::ZERO);
        let (g, _) = off.get("k");
        off.put(g, "k".into(), Cached::Body(Some("v".into())));
        assert!(off.get("k").1.is_none(), "TTL 0 caches nothing");
    }
}
