//! The provisioning timeline: events run through the state machine ([`crate::fsm`]) inside a
//! transaction that locks the machine's row (PostgreSQL), so concurrent events of one machine
//! apply one after the other; every event is stored with its source and whether it changed the
//! state. Messages are bounded ([`metal_types::bound_message`]).

use super::{parse_event, Result, Store, StoreError};
use crate::fsm::{self, FsmState, Record};
use crate::rfc3339;
use metal_types::{EventSource, Mac, MachineEvent, MachineId, ProvisioningEvent as Ev};
use sqlx::{AnyConnection, Row};

pub(super) fn source_name(s: EventSource) -> &'static str {
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
        other => return Err(StoreError::Internal(format!("stored event source {other:?}"))),
    })
}

impl Store {
    /// The machine's state machine row and last sign of life, locked for this transaction on
    /// PostgreSQL so concurrent events of one machine apply one after the other (SQLite has one
    /// writer anyway).
    async fn load_fsm(&self, c: &mut AnyConnection, id: MachineId) -> Result<Option<(FsmState, Option<i64>)>> {
        let row = sqlx::query(&format!(
            "SELECT state, crash_count, crash_loop, reclaiming, reclaim_ms, failed_reclaim, last_seen_ms FROM machines WHERE id = $1{}",
            self.lock_clause(None)
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
        Ok(Some((fsm, self.beats.overlay(id, r.try_get("last_seen_ms")?))))
    }

    /// Runs events through the state machine and stores them, inside `c`'s transaction.
    /// The machine's own events are signs of life; pixie's sightings are not (see [`fsm`]).
    pub(super) async fn apply_events_in(
        &self,
        c: &mut AnyConnection,
        id: MachineId,
        source: EventSource,
        events: &[(Ev, i64, String)],
        now: i64,
    ) -> Result<()> {
        let Some((mut s, last_seen)) = self.load_fsm(c, id).await? else {
            return Err(StoreError::not_found("machine", id));
        };
        let origin = match source {
            EventSource::Pixie => fsm::Origin::Pixie { agent_alive: last_seen.is_some_and(|t| now - t < self.dead_after_ms) },
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
        let now = self.now_ms();
        let mut tx = self.write().await?;
        self.apply_events_in(tx.c(), id, EventSource::Agent, events, now).await?;
        tx.commit().await
    }

    /// A `PXE Booting` that pixie saw for `mac` (and, as the client claimed, `uuid`). Recorded
    /// only for a registered machine that owns that MAC and, when a UUID was sent, is that UUID;
    /// never creates a machine. Returns the machine it was recorded for.
    pub async fn pxe_event(&self, mac: Mac, uuid: Option<MachineId>, message: &str) -> Result<Option<MachineId>> {
        let Some(id) = self.machine_by_mac(mac).await? else { return Ok(None) };
        if uuid.is_some_and(|u| !u.same_machine(id)) {
            tracing::info!(%mac, machine = %id, claimed = ?uuid.map(|u| u.to_string()), "PXE request names another UUID than the MAC's machine; not recorded");
            return Ok(None);
        }
        let now = self.now_ms();
        let mut tx = self.write().await?;
        self.apply_events_in(tx.c(), id, EventSource::Pixie, &[(Ev::PxeBooting, now, message.to_string())], now).await?;
        tx.commit().await?;
        Ok(Some(id))
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
}
