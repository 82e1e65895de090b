//! Following a machine's event timeline: poll `GET /v1/machines/{id}/events`, print what is
//! new, stop at a wanted event, on `Crashed`, at a deadline or on Ctrl-C.
//!
//! Deciding what is new and when to stop is pure ([`Follower`]); the polling loop around it
//! ([`follow`]) only fetches and prints.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use metal_types::{MachineEvent, MachineId, ProvisioningEvent};
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::client::Client;
use crate::output::{error_chain, event_record, parse_time, Format};

/// Identity of an event in the timeline (the API has no event ids).
type Key = (String, String, ProvisioningEvent, String);

fn key(e: &MachineEvent) -> Key {
    (e.time.clone(), e.received.clone(), e.event, e.message.clone())
}

/// Why following stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The event we waited for arrived.
    Reached(ProvisioningEvent),
    /// The machine reported `Crashed` while we waited for something else.
    Crashed { message: String },
    /// The API flagged the machine as crash-looping (it PXE booted again mid-install, too
    /// often) while we waited.
    CrashLoop,
    /// The deadline passed; the last event seen, if any.
    TimedOut { last: Option<ProvisioningEvent> },
    /// Ctrl-C.
    Interrupted,
}

/// Remembers which events were already shown and decides when to stop.
#[derive(Debug, Default)]
pub struct Follower {
    seen: HashSet<Key>,
    /// Events the API received before this instant are history: not shown, never a stop.
    since: Option<OffsetDateTime>,
    until: Option<ProvisioningEvent>,
    last: Option<ProvisioningEvent>,
    /// Whether the first batch of events was looked at yet.
    started: bool,
    /// The machine's `crash_loop` flag when following started.
    crash_loop_at_start: Option<bool>,
}

impl Follower {
    /// Follows the whole timeline: the history is shown first, and if its last event already
    /// is `until`, following ends at once.
    pub fn all(until: Option<ProvisioningEvent>) -> Follower {
        Follower { until, ..Default::default() }
    }

    /// Follows only what the API receives from `since` on (e.g. an allocation's creation
    /// time): an older `Phoned Home` of an earlier allocation must not count.
    pub fn since(since: OffsetDateTime, until: Option<ProvisioningEvent>) -> Follower {
        Follower { since: Some(since), until, ..Default::default() }
    }

    /// Whether following waits for an event (and so watches for failures too).
    pub fn waits(&self) -> bool {
        self.until.is_some()
    }

    /// Takes the machine's `crash_loop` flag as just fetched: a flag that turns on while we wait
    /// ends the wait (one already on at the start is an old story and does not).
    pub fn crash_loop(&mut self, flag: bool) -> Option<End> {
        let at_start = *self.crash_loop_at_start.get_or_insert(flag);
        (self.waits() && flag && !at_start).then_some(End::CrashLoop)
    }

    pub fn last(&self) -> Option<ProvisioningEvent> {
        self.last
    }

    /// Takes the full timeline as just fetched; returns the events not shown before (in
    /// order) and whether to stop.
    pub fn absorb(&mut self, events: &[MachineEvent]) -> (Vec<MachineEvent>, Option<End>) {
        let first = !self.started;
        self.started = true;
        let mut fresh = Vec::new();
        for e in events {
            if !self.seen.insert(key(e)) {
                continue;
            }
            if let (Some(since), Some(received)) = (self.since, parse_time(&e.received)) {
                if received < since {
                    continue;
                }
            }
            fresh.push(e.clone());
        }
        if let Some(e) = fresh.last() {
            self.last = Some(e.event);
        } else if first {
            self.last = events.last().map(|e| e.event);
        }

        let Some(until) = self.until else {
            return (fresh, None);
        };
        // In the history shown at the start only the latest event counts: an old
        // `Phoned Home` followed by a reclaim is not "phoned home now".
        let candidates: &[MachineEvent] =
            if first && self.since.is_none() { fresh.last().map(std::slice::from_ref).unwrap_or(&[]) } else { &fresh };
        let end = candidates.iter().find_map(|e| {
            if e.event == until {
                Some(End::Reached(until))
            } else if e.event == ProvisioningEvent::Crashed {
                Some(End::Crashed { message: e.message.clone() })
            } else {
                None
            }
        });
        (fresh, end)
    }
}

/// Knobs of [`follow`].
#[derive(Debug, Clone, Copy)]
pub struct FollowOptions {
    pub interval: Duration,
    /// How each new event is written: a timeline line, a JSON line, a YAML document.
    pub format: Format,
    /// `None`: until Ctrl-C (or the wanted event).
    pub timeout: Option<Duration>,
}

/// Polls the machine's events and writes each new one to `out` (see [`event_record`]) until the
/// follower says stop, the deadline passes or Ctrl-C. A failed poll that never reached the API
/// (e.g. the API restarting) is reported on stderr and retried; an API error ends following.
pub async fn follow(
    client: &Client,
    machine: MachineId,
    follower: &mut Follower,
    options: FollowOptions,
    out: &mut dyn Write,
) -> anyhow::Result<End> {
    let deadline = options.timeout.map(|t| Instant::now() + t);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        match client.machine_events(machine).await {
            Ok(events) => {
                let (fresh, end) = follower.absorb(&events);
                for e in &fresh {
                    write!(out, "{}", event_record(options.format, e)?)?;
                }
                out.flush()?;
                if let Some(end) = end {
                    return Ok(end);
                }
                if follower.waits() {
                    match client.machine(machine).await {
                        Ok(m) => {
                            if let Some(end) = follower.crash_loop(m.crash_loop) {
                                return Ok(end);
                            }
                        }
                        Err(e) if e.is_transport() => {
                            eprintln!("warning: {} (retrying)", error_chain(&e))
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            Err(e) if e.is_transport() => {
                eprintln!("warning: {} (retrying)", error_chain(&e))
            }
            Err(e) => return Err(e.into()),
        }
        let sleep = tokio::time::sleep(options.interval);
        let timed_out = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {}
            _ = timed_out => return Ok(End::TimedOut { last: follower.last() }),
            _ = &mut ctrl_c => return Ok(End::Interrupted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::format_description::well_known::Rfc3339;
    use ProvisioningEvent::*;

    fn ev(event: ProvisioningEvent, second: u32) -> MachineEvent {
        MachineEvent {
            event,
            message: format!("m{second}"),
            time: format!("2026-11-24T11:00:{second:02}Z"),
            received: format!("2026-11-24T11:00:{second:02}.010Z"),
            unexpected: false,
            source: metal_types::EventSource::Agent,
            ignored: false,
        }
    }

    fn names(es: &[MachineEvent]) -> Vec<ProvisioningEvent> {
        es.iter().map(|e| e.event).collect()
    }

    #[test]
    fn shows_each_event_once() {
        let mut f = Follower::all(None);
        let mut tl = vec![ev(PxeBooting, 1), ev(Preparing, 2)];
        let (fresh, end) = f.absorb(&tl);
        assert_eq!(names(&fresh), [PxeBooting, Preparing]);
        assert_eq!(end, None);
        assert!(f.absorb(&tl).0.is_empty());
        tl.push(ev(Registering, 3));
        tl.push(ev(Waiting, 4));
        assert_eq!(names(&f.absorb(&tl).0), [Registering, Waiting]);
        assert_eq!(f.last(), Some(Waiting));
        // A timeline the API trimmed at the front shows nothing twice.
        assert!(f.absorb(&tl[2..]).0.is_empty());
    }

    #[test]
    fn until_counts_only_the_latest_history_event_then_new_ones() {
        // Phoned home long ago, reclaimed since: not done.
        let mut tl = vec![ev(PhonedHome, 1), ev(MachineReclaim, 2), ev(Waiting, 3)];
        let mut f = Follower::all(Some(PhonedHome));
        assert_eq!(f.absorb(&tl).1, None);
        tl.push(ev(Installing, 4));
        tl.push(ev(BootingNewKernel, 5));
        assert_eq!(f.absorb(&tl).1, None);
        tl.push(ev(PhonedHome, 6));
        tl.push(ev(Alive, 7));
        assert_eq!(f.absorb(&tl).1, Some(End::Reached(PhonedHome)));

        // Already there at the start: done at once.
        let mut f = Follower::all(Some(PhonedHome));
        assert_eq!(f.absorb(&[ev(Installing, 1), ev(PhonedHome, 2)]).1, Some(End::Reached(PhonedHome)));
    }

    #[test]
    fn since_hides_history_and_crashes_end_the_wait() {
        let since = OffsetDateTime::parse("2026-11-24T11:00:03Z", &Rfc3339).unwrap();
        let mut f = Follower::since(since, Some(PhonedHome));
        let mut tl = vec![ev(PhonedHome, 1), ev(MachineReclaim, 2), ev(Waiting, 2)];
        let (fresh, end) = f.absorb(&tl);
        assert!(fresh.is_empty());
        assert_eq!(end, None);
        assert_eq!(f.last(), Some(Waiting));
        tl.push(ev(Installing, 4));
        let mut crashed = ev(Crashed, 5);
        crashed.message = "kernel panic".into();
        tl.push(crashed);
        let (fresh, end) = f.absorb(&tl);
        assert_eq!(names(&fresh), [Installing, Crashed]);
        assert_eq!(end, Some(End::Crashed { message: "kernel panic".into() }));
    }

    #[test]
    fn a_crash_loop_that_starts_while_waiting_ends_the_wait() {
        let mut f = Follower::all(Some(PhonedHome));
        assert_eq!(f.crash_loop(false), None);
        assert_eq!(f.crash_loop(false), None);
        assert_eq!(f.crash_loop(true), Some(End::CrashLoop));

        // Flagged before we started: not news.
        let mut f = Follower::all(Some(PhonedHome));
        assert_eq!(f.crash_loop(true), None);
        assert_eq!(f.crash_loop(true), None);

        // A plain watch never stops for it.
        let mut f = Follower::all(None);
        assert_eq!(f.crash_loop(false), None);
        assert_eq!(f.crash_loop(true), None);
    }

    #[test]
    fn waiting_for_crashed_itself_reaches_it() {
        let mut f = Follower::all(Some(Crashed));
        assert_eq!(f.absorb(&[ev(Installing, 1)]).1, None);
        assert_eq!(f.absorb(&[ev(Installing, 1), ev(Crashed, 2)]).1, Some(End::Reached(Crashed)));
    }
}
