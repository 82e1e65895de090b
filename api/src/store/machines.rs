//! Machines: their rows (joined with the current allocation), registration under the rules of
//! machine identity, the boot decision's lookup, heartbeats, wipe and install reports, and the
//! counts `/metrics` shows.

use super::{parse_event, parse_json, parse_machine_id, to_json, Conflict, Refusal, Result, Store, TokenRow};
use crate::fsm::FsmState;
use metal_types::{Allocation, BootInfo, EventSource, Mac, MachineId, ProvisioningEvent as Ev};
use sqlx::any::AnyRow;
use sqlx::Row;

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
    /// The MAC the enrolment token is bound to; `None` when an admin registers.
    pub token_mac: Option<Mac>,
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

impl Store {
    pub async fn machine(&self, id: MachineId) -> Result<Option<MachineRow>> {
        sqlx::query(&format!("{MACHINE_SELECT} WHERE m.id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(|r| machine_row(r).map(|m| self.with_beat(m)))
            .transpose()
    }

    /// All machines, or only those allocated to `project`.
    pub async fn machines(&self, project: Option<&str>) -> Result<Vec<MachineRow>> {
        let rows = match project {
            None => sqlx::query(&format!("{MACHINE_SELECT} ORDER BY m.id")).fetch_all(&self.pool).await?,
            Some(p) => {
                sqlx::query(&format!("{MACHINE_SELECT} WHERE a.project = $1 ORDER BY m.id")).bind(p).fetch_all(&self.pool).await?
            }
        };
        rows.iter().map(|r| machine_row(r).map(|m| self.with_beat(m))).collect()
    }

    /// For the boot decision, in one query: the machine that owns `mac`, or else the one named
    /// by `uuid` (in either SMBIOS byte order); its id and whether its current allocation has
    /// phoned home. The MAC comes first: it is what the enrolment token is bound to, and a UUID
    /// in a boot request is whatever the client claims.
    pub async fn boot_machine(&self, uuid: Option<MachineId>, mac: Option<Mac>) -> Result<Option<(MachineId, bool)>> {
        let rows = sqlx::query(
            "SELECT m.id, a.phoned_home_ms, CASE WHEN m.id = (SELECT machine FROM machine_macs WHERE mac = $3) THEN 0 ELSE 1 END AS rank \
             FROM machines m LEFT JOIN allocations a ON a.id = m.allocation \
             WHERE m.id = (SELECT machine FROM machine_macs WHERE mac = $3) OR m.id = $1 OR m.id = $2 ORDER BY rank",
        )
        .bind(uuid.map(|u| u.to_string()))
        .bind(uuid.map(|u| u.byte_swapped().to_string()))
        .bind(mac.map(|m| m.to_string()))
        .fetch_all(&self.pool)
        .await?;
        let Some(r) = rows.first() else { return Ok(None) };
        let id = parse_machine_id(&r.try_get::<String, _>("id")?)?;
        Ok(Some((id, r.try_get::<Option<i64>, _>("phoned_home_ms")?.is_some())))
    }

    pub async fn machine_by_mac(&self, mac: Mac) -> Result<Option<MachineId>> {
        let row = sqlx::query("SELECT machine FROM machine_macs WHERE mac = $1")
            .bind(mac.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse_machine_id(&r.try_get::<String, _>("machine")?)).transpose()
    }

    /// A heartbeat: the machine's agent is alive.
    /// Recorded in memory and written with the others of this interval (`super::beats`).
    pub async fn heartbeat(&self, id: MachineId) -> Result<()> {
        self.beats.record(id, self.now_ms());
        Ok(())
    }

    fn with_beat(&self, mut row: MachineRow) -> MachineRow {
        row.last_seen_ms = self.beats.overlay(row.id, row.last_seen_ms);
        row
    }

    /// Registers (or re-registers) a machine and replaces its credential. A sign of life.
    ///
    /// The rules (api/README.md, "Machine identity"): a machine that exists may be registered
    /// again only with a token whose MAC (`token_mac`; `None` for an admin) is one of the MACs it
    /// registered with before, and never while its allocation's OS has phoned home; a MAC that
    /// belongs to another machine is not taken over (the token's own MAC is refused outright).
    pub async fn register(&self, reg: &Registration<'_>) -> Result<()> {
        let now = self.now_ms();
        let id = reg.id;
        let mut tx = self.write().await?;
        let existing = sqlx::query(&format!(
            "SELECT m.id, a.id AS alloc, a.phoned_home_ms FROM machines m LEFT JOIN allocations a ON a.id = m.allocation WHERE m.id = $1{}",
            self.lock_clause(Some("m"))
        ))
        .bind(id.to_string())
        .fetch_optional(tx.c())
        .await?;
        if let Some(row) = &existing {
            if let (Some(allocation), Some(since_ms)) =
                (row.try_get::<Option<String>, _>("alloc")?, row.try_get::<Option<i64>, _>("phoned_home_ms")?)
            {
                return Err(Conflict::InstalledOs { machine: id, allocation, since_ms }.into());
            }
            if let Some(mac) = reg.token_mac {
                let known = sqlx::query("SELECT mac FROM machine_macs WHERE machine = $1 AND mac = $2")
                    .bind(id.to_string())
                    .bind(mac.to_string())
                    .fetch_optional(tx.c())
                    .await?;
                if known.is_none() {
                    return Err(Refusal::UnknownNic { machine: id, mac: mac.to_string() }.into());
                }
            }
        }
        let mut macs: Vec<Mac> = Vec::new();
        for nic in &reg.inventory.nics {
            let Ok(mac) = nic.mac.parse::<Mac>() else {
                if !nic.mac.trim().is_empty() {
                    tracing::warn!(machine = %id, nic = %nic.name, mac = %nic.mac, "inventory NIC has no usable MAC; not recorded");
                }
                continue;
            };
            if macs.contains(&mac) {
                continue;
            }
            let owner: Option<String> = sqlx::query("SELECT machine FROM machine_macs WHERE mac = $1 AND machine <> $2")
                .bind(mac.to_string())
                .bind(id.to_string())
                .fetch_optional(tx.c())
                .await?
                .map(|r| r.try_get("machine"))
                .transpose()?;
            match owner {
                Some(owner) if reg.token_mac == Some(mac) => {
                    return Err(Conflict::MacTaken { mac: mac.to_string(), owner, machine: id }.into())
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
                .bind(mac.to_string())
                .bind(id.to_string())
                .execute(tx.c())
                .await?;
        }
        sqlx::query("DELETE FROM tokens WHERE role = 'machine' AND machine = $1").bind(id.to_string()).execute(tx.c()).await?;
        self.insert_token_in(tx.c(), reg.credential).await?;
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
            .bind(self.now_ms())
            .bind(id.to_string())
            .execute(tx.c())
            .await?;
        tx.commit().await
    }

    /// Stores an install report for the machine's current allocation; a failed one records
    /// `Crashed` with the reason.
    pub async fn install_report(&self, id: MachineId, report: &metal_types::InstallReport) -> Result<()> {
        let now = self.now_ms();
        let mut tx = self.write().await?;
        let current: Option<String> = sqlx::query("SELECT allocation FROM machines WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(tx.c())
            .await?
            .map(|r| r.try_get::<Option<String>, _>("allocation"))
            .transpose()?
            .flatten();
        if current.as_deref() != Some(report.allocation.to_string().as_str()) {
            return Err(Conflict::NotCurrentAllocation { allocation: report.allocation }.into());
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

    /// Machines by state (`none` for machines with no event yet), for `/metrics`.
    pub async fn machines_by_state(&self) -> Result<Vec<(String, i64)>> {
        sqlx::query("SELECT state, COUNT(*) AS n FROM machines GROUP BY state ORDER BY state")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok((r.try_get::<Option<String>, _>("state")?.unwrap_or_else(|| "none".into()), r.try_get("n")?)))
            .collect()
    }

    /// (allocations ever made, allocations active), for `/metrics`.
    pub async fn allocation_counts(&self) -> Result<(i64, i64)> {
        let r = sqlx::query("SELECT COUNT(*) AS total, COUNT(freed_ms) AS freed FROM allocations").fetch_one(&self.pool).await?;
        let total: i64 = r.try_get("total")?;
        let freed: i64 = r.try_get("freed")?;
        Ok((total, total - freed))
    }
}
