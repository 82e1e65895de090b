//! How a machine is picked and allocated, and what ends an allocation.
//!
//! The pick is the same on both backends: read the [`CANDIDATE_WINDOW`] newest machines that
//! meet every rule of [`policy::ELIGIBLE`] (the SQL is rendered from those rules), choose one
//! with a random spread ([`policy::pick`]), and take it with an `UPDATE … WHERE <the same
//! rules>` inside the same transaction, so a machine is never allocated twice (the unique index
//! `allocations_one_active_per_machine` is the last line of defence). What differs is how
//! concurrent requests meet:
//! - **PostgreSQL**: one transaction per request; for the pool, the window, the spread and the
//!   lock are one statement ([`lock_from_pool`]: the window rotated by the spread, the first row
//!   no concurrent request holds locked `FOR UPDATE SKIP LOCKED`, and the newest free one beyond
//!   the window when they hold all of it), so requests on several replicas take different
//!   machines instead of queueing on one or retrying; the commit carries a `NOTIFY` that wakes
//!   the machine's long-poll on whichever replica holds it.
//! - **SQLite**: one writer task runs every queued request in one transaction (group commit: one
//!   fsync for many allocations); a request is answered only after its transaction committed.
//!
//! Also here: freeing (which deletes the allocation's phone-home token and records `Machine
//! Reclaim`), the phone home, and the allocation queries the handlers need.

use super::{
    parse_event, parse_json, parse_machine_id, to_json, Backend, Conflict, NoMachine, Result, Store, StoreError, TokenRow,
    ALLOCATION_CHANNEL,
};
use crate::clock::ClockRef;
use crate::policy::{self, Candidate, Ineligible, CANDIDATE_WINDOW};
use crate::rfc3339;
use metal_types::{Allocation, AllocationId, EventSource, MachineId, ProvisioningEvent as Ev};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AnyPool, Row};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// What `allocate` should do; the planner (`crate::allocation::resolve`) has resolved and
/// validated every name.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Attempts per request before it gives up with [`Conflict::Contended`].
const ATTEMPTS: usize = 16;

impl Store {
    /// Picks a machine and allocates it in one transaction (see the module documentation).
    pub async fn allocate(&self, plan: &AllocationPlan, dead_after_ms: i64) -> Result<AllocOutcome> {
        match &self.group_writer {
            Some(tx) => {
                let (reply, rx) = tokio::sync::oneshot::channel();
                tx.send(AllocJob { plan: plan.clone(), dead_after_ms, reply })
                    .map_err(|_| StoreError::Internal("the allocation writer stopped".into()))?;
                rx.await.map_err(|_| StoreError::Internal("the allocation writer dropped a request".into()))?
            }
            None => self.allocate_pg(plan, dead_after_ms).await,
        }
    }

    async fn allocate_pg(&self, plan: &AllocationPlan, dead_after_ms: i64) -> Result<AllocOutcome> {
        for attempt in 0..ATTEMPTS {
            let mut tx = self.write().await?;
            match allocate_attempt(tx.c(), Backend::Postgres, plan, self.now_ms(), dead_after_ms).await {
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
                    // Every candidate was locked by concurrent requests: let them commit.
                    tokio::time::sleep(Duration::from_millis(1 << attempt.min(5))).await;
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
        Err(Conflict::Contended { attempts: ATTEMPTS }.into())
    }

    /// Active allocations, all or one project's.
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
                r.try_get::<String, _>("machine")? == machine.to_string() && r.try_get::<Option<i64>, _>("freed_ms")?.is_none()
            }
        })
    }

    /// When the allocation was made (ms since the epoch).
    pub async fn allocation_created_ms(&self, id: AllocationId) -> Result<Option<i64>> {
        let row = sqlx::query("SELECT created_ms FROM allocations WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("created_ms")).transpose()?)
    }

    /// Records the phone home of an allocation's OS. The machine's credential goes: metal-hammer
    /// is gone (it kexeced), so nobody should hold one until the machine is freed.
    pub async fn phoned_home(&self, machine: MachineId, allocation: AllocationId, time_ms: i64, message: &str) -> Result<()> {
        let now = self.now_ms();
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
        self.apply_events_in(tx.c(), machine, EventSource::PhoneHome, &[(Ev::PhonedHome, time_ms, message.to_string())], now)
            .await?;
        tx.commit().await?;
        self.tokens_changed();
        Ok(())
    }

    /// Frees the machine's allocation, deletes its phone-home token and records `Machine
    /// Reclaim`. With `project`, only an allocation of that project is freed (others look like
    /// a missing machine).
    pub async fn free(&self, id: MachineId, project: Option<&str>) -> Result<()> {
        let now = self.now_ms();
        let mut tx = self.write().await?;
        let row = sqlx::query(&format!(
            "SELECT m.allocation, a.project FROM machines m LEFT JOIN allocations a ON a.id = m.allocation WHERE m.id = $1{}",
            self.lock_clause(Some("m"))
        ))
        .bind(id.to_string())
        .fetch_optional(tx.c())
        .await?;
        let Some(row) = row else { return Err(StoreError::not_found("machine", id)) };
        let alloc: Option<String> = row.try_get("allocation")?;
        let owner: Option<String> = row.try_get("project")?;
        if project.is_some_and(|p| owner.as_deref() != Some(p)) {
            return Err(StoreError::not_found("machine", id));
        }
        let Some(alloc) = alloc else { return Err(Conflict::NotAllocated { machine: id }.into()) };
        sqlx::query("UPDATE allocations SET freed_ms = $1 WHERE id = $2").bind(now).bind(&alloc).execute(tx.c()).await?;
        sqlx::query("UPDATE machines SET allocation = NULL, boot = NULL, updated_ms = $1 WHERE id = $2")
            .bind(now)
            .bind(id.to_string())
            .execute(tx.c())
            .await?;
        sqlx::query("DELETE FROM tokens WHERE role = 'phone_home' AND allocation = $1").bind(&alloc).execute(tx.c()).await?;
        self.apply_events_in(
            tx.c(),
            id,
            EventSource::Api,
            &[(Ev::MachineReclaim, now, format!("allocation {alloc} freed"))],
            now,
        )
        .await?;
        tx.commit().await?;
        self.tokens_changed();
        Ok(())
    }

    /// Stores the phone-home token of an allocation unless it is stored already (every answer
    /// of `wait` for one allocation carries the same token; see `auth::phone_home_token`).
    pub async fn issue_phone_home(&self, t: &TokenRow) -> Result<()> {
        self.ensure_token(t).await
    }
}

/// One queued allocation for the SQLite group writer.
pub(super) struct AllocJob {
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

const CANDIDATE_COLUMNS: &str = "id, state, allocation, crash_loop, last_seen_ms";

fn candidate(r: &AnyRow) -> Result<Candidate> {
    let state: Option<String> = r.try_get("state")?;
    Ok(Candidate {
        id: parse_machine_id(&r.try_get::<String, _>("id")?)?,
        state: state.as_deref().map(parse_event).transpose()?,
        allocated: r.try_get::<Option<String>, _>("allocation")?.is_some(),
        crash_loop: r.try_get::<i64, _>("crash_loop")? != 0,
        last_seen_ms: r.try_get("last_seen_ms")?,
    })
}

/// The candidates of a plan: the named machine, or the window of the pool's newest eligible ones.
async fn candidates(c: &mut AnyConnection, plan: &AllocationPlan, cutoff: i64) -> Result<Vec<Candidate>> {
    let rows = match (&plan.machine, &plan.size) {
        (Some(m), _) => {
            sqlx::query(&format!("SELECT {CANDIDATE_COLUMNS} FROM machines WHERE id = $1 AND partition = $2"))
                .bind(m.to_string())
                .bind(&plan.partition)
                .fetch_all(&mut *c)
                .await?
        }
        (None, Some(size)) => {
            // Pre-filter in SQL (index `machines_free`); the pick re-checks every rule.
            sqlx::query(&format!(
                "SELECT {CANDIDATE_COLUMNS} FROM machines WHERE partition = $1 AND size = $2 AND {} \
                 ORDER BY last_seen_ms DESC LIMIT {CANDIDATE_WINDOW}",
                policy::eligible_sql("$3")
            ))
            .bind(&plan.partition)
            .bind(size)
            .bind(cutoff)
            .fetch_all(&mut *c)
            .await?
        }
        (None, None) => return Err(StoreError::Internal("an allocation plan needs a size or a machine".into())),
    };
    rows.iter().map(candidate).collect()
}

/// PostgreSQL: locks one of the eligible `picks` (in that order) that no concurrent request
/// holds, re-checking the rules; `None` when every one is locked or no longer eligible.
async fn lock_one(c: &mut AnyConnection, picks: &[MachineId], cutoff: i64) -> Result<Option<MachineId>> {
    for m in picks {
        let row = sqlx::query(&format!(
            "SELECT id FROM machines WHERE id = $1 AND {} FOR UPDATE SKIP LOCKED",
            policy::eligible_sql("$2")
        ))
        .bind(m.to_string())
        .bind(cutoff)
        .fetch_optional(&mut *c)
        .await?;
        if row.is_some() {
            return Ok(Some(*m));
        }
    }
    Ok(None)
}

/// PostgreSQL, pool allocation: the same window and spread as [`policy::pick`] on SQLite, in one
/// statement. The [`CANDIDATE_WINDOW`] newest eligible machines are numbered, rotated by the
/// spread (its choice first, then the rest of the window in order), and the first one no
/// concurrent request holds is locked (`FOR UPDATE SKIP LOCKED`, one row). When concurrent
/// requests hold the whole window, the newest eligible machine they do not hold is taken
/// instead, so a request never waits while a machine is free.
async fn lock_from_pool(
    c: &mut AnyConnection,
    partition: &str,
    size: &str,
    cutoff: i64,
    spread: u64,
) -> Result<Option<MachineId>> {
    let eligible = policy::eligible_sql("$3");
    let eligible_m = policy::ELIGIBLE.iter().map(|r| format!("m.{}", r.sql("$3"))).collect::<Vec<_>>().join(" AND ");
    let window = sqlx::query(&format!(
        "WITH w AS (SELECT id, row_number() OVER (ORDER BY last_seen_ms DESC) AS rn FROM machines \
         WHERE partition = $1 AND size = $2 AND {eligible} ORDER BY last_seen_ms DESC LIMIT {CANDIDATE_WINDOW}) \
         SELECT m.id FROM machines m JOIN w ON m.id = w.id WHERE {eligible_m} \
         ORDER BY (w.rn + $4) % {CANDIDATE_WINDOW} LIMIT 1 FOR UPDATE OF m SKIP LOCKED"
    ))
    .bind(partition)
    .bind(size)
    .bind(cutoff)
    .bind((spread % CANDIDATE_WINDOW as u64) as i64)
    .fetch_optional(&mut *c)
    .await?;
    let row = match window {
        Some(r) => Some(r),
        None => {
            sqlx::query(&format!(
                "SELECT id FROM machines WHERE partition = $1 AND size = $2 AND {eligible} \
                 ORDER BY last_seen_ms DESC LIMIT 1 FOR UPDATE SKIP LOCKED"
            ))
            .bind(partition)
            .bind(size)
            .bind(cutoff)
            .fetch_optional(&mut *c)
            .await?
        }
    };
    row.map(|r| parse_machine_id(&r.try_get::<String, _>("id")?)).transpose()
}

/// One try at an allocation inside the caller's transaction. On `Retry` and on errors the caller
/// must undo what this wrote (roll back, or delete the allocation row it names).
async fn allocate_attempt(
    c: &mut AnyConnection,
    backend: Backend,
    plan: &AllocationPlan,
    now: i64,
    dead_after_ms: i64,
) -> Result<Attempt> {
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
    let cutoff = now - dead_after_ms;
    let spread: u64 = rand::random();
    let machine = match (pg, &plan.size, &plan.machine) {
        // The pool on PostgreSQL: the window and the lock in one statement.
        (true, Some(size), None) => match lock_from_pool(c, &plan.partition, size, cutoff, spread).await? {
            Some(m) => m,
            None => return Err(NoMachine::PoolEmpty { size: size.clone(), partition: plan.partition.clone() }.into()),
        },
        _ => {
            let cands = candidates(c, plan, cutoff).await?;
            let Some(first) = policy::pick(&cands, now, dead_after_ms, spread) else {
                return Err(why_no_machine(plan, cands.first(), now, dead_after_ms).into());
            };
            if pg {
                match lock_one(c, &[first], cutoff).await? {
                    Some(m) => m,
                    None => return Ok(Attempt::Retry),
                }
            } else {
                first
            }
        }
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
    sqlx::query(
        "INSERT INTO allocations (id, machine, project, body, idempotency_key, created_ms) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(alloc.id.to_string())
    .bind(machine.to_string())
    .bind(&alloc.project)
    .bind(to_json(&alloc))
    .bind(&alloc.idempotency_key)
    .bind(now)
    .execute(&mut *c)
    .await?;
    // The re-check: only a machine that still meets every rule is taken.
    let n = sqlx::query(&format!(
        "UPDATE machines SET allocation = $1, updated_ms = $2 WHERE id = $3 AND {}",
        policy::eligible_sql("$4")
    ))
    .bind(alloc.id.to_string())
    .bind(now)
    .bind(machine.to_string())
    .bind(cutoff)
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

impl Store {
    /// The machines of `partition` that the SQL rendering of [`policy::ELIGIBLE`] selects at
    /// `now`, and every machine of it as the Rust rendering sees it: `api/tests/eligibility.rs`
    /// checks on both backends that they agree.
    pub async fn eligibility_views(
        &self,
        partition: &str,
        now: i64,
        dead_after_ms: i64,
    ) -> Result<(Vec<MachineId>, Vec<Candidate>)> {
        let by_sql =
            sqlx::query(&format!("SELECT id FROM machines WHERE partition = $1 AND {} ORDER BY id", policy::eligible_sql("$2")))
                .bind(partition)
                .bind(now - dead_after_ms)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| parse_machine_id(&r.try_get::<String, _>("id")?))
                .collect::<Result<Vec<_>>>()?;
        let all = sqlx::query(&format!("SELECT {CANDIDATE_COLUMNS} FROM machines WHERE partition = $1 ORDER BY id"))
            .bind(partition)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(candidate)
            .collect::<Result<Vec<_>>>()?;
        Ok((by_sql, all))
    }

    /// Writes a machine row with exactly the columns the rules read, bypassing registration and
    /// the state machine: for tests of the rules and for the scale simulator's set-up only.
    #[doc(hidden)]
    pub async fn put_candidate(&self, partition: &str, size: &str, c: &Candidate) -> Result<()> {
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO machines (id, partition, size, state, crash_loop, last_seen_ms, allocation, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        )
        .bind(c.id.to_string())
        .bind(partition)
        .bind(size)
        .bind(c.state.map(|e| e.as_str()))
        .bind(i64::from(c.crash_loop))
        .bind(c.last_seen_ms)
        .bind(c.allocated.then(|| AllocationId::new_random().to_string()))
        .bind(self.now_ms())
        .execute(tx.c())
        .await?;
        tx.commit().await
    }
}

fn why_no_machine(plan: &AllocationPlan, cand: Option<&Candidate>, now: i64, dead_after_ms: i64) -> NoMachine {
    match (&plan.machine, cand) {
        (Some(m), None) => NoMachine::NotInPartition { machine: *m, partition: plan.partition.clone() },
        (Some(m), Some(c)) => {
            NoMachine::Ineligible { machine: *m, why: policy::why_not(c, now, dead_after_ms).unwrap_or(Ineligible::Taken) }
        }
        (None, _) => NoMachine::PoolEmpty { size: plan.size.clone().unwrap_or_default(), partition: plan.partition.clone() },
    }
}

/// The SQLite allocation writer: takes every queued request, runs them in one transaction, and
/// answers each after the commit. Exits when the store is dropped.
pub(super) async fn group_writer(
    pool: AnyPool,
    lock: Arc<Mutex<()>>,
    clock: ClockRef,
    beats: Arc<super::beats::Beats>,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<AllocJob>,
) {
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
        // The beats recorded so far go into the same transaction: the allocator sees every
        // machine that said it is alive, at no extra commit.
        let taken = beats.take();
        let outcome = run_batch(&pool, &taken, &batch, clock.now_ms()).await;
        if outcome.is_err() {
            beats.restore(taken);
        }
        match outcome {
            Ok(results) => {
                for (job, r) in batch.into_iter().zip(results) {
                    let _ = job.reply.send(r);
                }
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, jobs = batch.len(), "allocation batch failed; nothing of it was committed");
                for job in batch {
                    let _ = job.reply.send(Err(StoreError::Internal(format!("allocation transaction failed: {msg}"))));
                }
            }
        }
    }
}

/// Runs a batch in one transaction. `Err` only when the transaction itself failed (then nothing
/// was committed); a request's own failure (no machine, …) is its result and wrote nothing.
async fn run_batch(
    pool: &AnyPool,
    beats: &[(MachineId, i64)],
    batch: &[AllocJob],
    now: i64,
) -> Result<Vec<Result<AllocOutcome>>> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    super::beats::write(&mut tx, beats).await?;
    let mut results = Vec::with_capacity(batch.len());
    for job in batch {
        let mut result = Err(Conflict::Contended { attempts: ATTEMPTS }.into());
        for _ in 0..ATTEMPTS {
            match allocate_attempt(&mut tx, Backend::Sqlite, &job.plan, now, job.dead_after_ms).await {
                Ok(Attempt::Retry) => continue,
                Ok(Attempt::Done(o)) => {
                    result = Ok(o);
                    break;
                }
                // A database error leaves the transaction in doubt: fail the whole batch.
                Err(StoreError::Db(e)) if !matches!(&e, sqlx::Error::Database(d) if d.is_unique_violation()) => {
                    return Err(StoreError::Db(e))
                }
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
