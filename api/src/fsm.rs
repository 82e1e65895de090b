//! The provisioning event state machine. Pure: no I/O, no clock (the caller passes `now`).
//!
//! The table follows metal-stack's transitions (`metal-api/cmd/metal-api/internal/fsm`), made a
//! little more lenient where our agent legitimately skips a step. `docs/events.md` documents it.
//!
//! Rules:
//! - Every event except `Alive` becomes the machine's state, allowed or not. An event that the
//!   table does not allow after the current state is stored flagged `unexpected`, never dropped.
//! - `Alive` is a heartbeat: it updates liveliness only and is not stored.
//! - Events have an [`Origin`]. The machine's own reports (metal-hammer with its credential, the
//!   installed OS with its phone-home token) are its word. A `PXE Booting` from pixie is only a
//!   sighting: anyone on the provisioning network can send a DHCP request with any MAC. A sighting
//!   is stored but [`Record::Ignored`] (the state stays) while an install is under way or while
//!   metal-hammer on that machine is alive in `Preparing`, `Registering` or `Waiting`; it never
//!   counts as a crash and is never a sign of life.
//! - A `PXE Booting` right after a `PXE Booting` is the same boot (DHCP discover, iPXE's second
//!   DHCP, …) and is not stored again.
//! - Crash loop: metal-hammer starting again (`Preparing` or `Registering`) while the machine is
//!   `Installing` or `Booting New Kernel` counts as a crash; [`CRASH_LOOP_THRESHOLD`] of them
//!   before the OS phones home (or the machine is reclaimed) set `crash_loop`.
//! - Failed reclaim: after `Machine Reclaim` the machine must come back to `Waiting`. A `Phoned
//!   Home` on the way sets `failed_reclaim` at once; so does not reaching `Waiting` within the
//!   reclaim timeout ([`failed_reclaim`]).

use metal_types::{Liveliness, ProvisioningEvent as Ev};

/// Crashes during one install before the machine is flagged as crash-looping.
pub const CRASH_LOOP_THRESHOLD: u32 = 3;

/// For each state (`None`: a machine with no events yet), the events that may follow it.
pub const TRANSITIONS: &[(Option<Ev>, &[Ev])] = &[
    (None, &[Ev::PxeBooting, Ev::Preparing, Ev::Registering]),
    (Some(Ev::PxeBooting), &[Ev::PxeBooting, Ev::Preparing, Ev::Registering, Ev::PhonedHome, Ev::Crashed]),
    (Some(Ev::Preparing), &[Ev::Preparing, Ev::Registering, Ev::PxeBooting, Ev::PlannedReboot, Ev::Crashed]),
    (Some(Ev::Registering), &[Ev::Registering, Ev::Waiting, Ev::PxeBooting, Ev::PlannedReboot, Ev::Crashed]),
    (Some(Ev::Waiting), &[Ev::Waiting, Ev::Installing, Ev::PxeBooting, Ev::PlannedReboot, Ev::MachineReclaim, Ev::Crashed]),
    (
        Some(Ev::Installing),
        &[
            Ev::Installing,
            Ev::BootingNewKernel,
            Ev::PxeBooting,
            Ev::Preparing,
            Ev::Registering,
            Ev::PlannedReboot,
            Ev::MachineReclaim,
            Ev::Crashed,
        ],
    ),
    (
        Some(Ev::BootingNewKernel),
        &[Ev::PhonedHome, Ev::PxeBooting, Ev::Preparing, Ev::Registering, Ev::PlannedReboot, Ev::MachineReclaim, Ev::Crashed],
    ),
    (Some(Ev::PhonedHome), &[Ev::PhonedHome, Ev::PxeBooting, Ev::PlannedReboot, Ev::MachineReclaim, Ev::Crashed]),
    (Some(Ev::PlannedReboot), &[Ev::PxeBooting, Ev::Preparing, Ev::PhonedHome, Ev::MachineReclaim, Ev::Crashed]),
    (
        Some(Ev::MachineReclaim),
        &[Ev::MachineReclaim, Ev::PxeBooting, Ev::Preparing, Ev::Registering, Ev::PlannedReboot, Ev::Crashed],
    ),
    (Some(Ev::Crashed), &[Ev::Crashed, Ev::PxeBooting, Ev::Preparing, Ev::Registering, Ev::PlannedReboot, Ev::MachineReclaim]),
];

/// Whether `to` may follow `from`. `Alive` may follow anything (it is a heartbeat).
pub fn allowed(from: Option<Ev>, to: Ev) -> bool {
    if to == Ev::Alive {
        return true;
    }
    TRANSITIONS.iter().find(|(f, _)| *f == from).is_some_and(|(_, next)| next.contains(&to))
}

/// What the API keeps per machine to run the state machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FsmState {
    /// The last stored event.
    pub state: Option<Ev>,
    /// Crashes (PXE boots mid-install) since the last success or reclaim.
    pub crash_count: u32,
    pub crash_loop: bool,
    /// Between `Machine Reclaim` and the next `Waiting`.
    pub reclaiming: bool,
    /// When the current reclaim started (ms since the epoch).
    pub reclaim_ms: Option<i64>,
    /// Set when the old OS phoned home during a reclaim.
    pub failed_reclaim: bool,
}

/// Where an event came from, as far as the state machine is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The machine itself: metal-hammer with its credential, the installed OS with its
    /// phone-home token, or the API acting on it (free, install report).
    Machine,
    /// pixie saw a PXE request. `agent_alive`: metal-hammer on that machine was heard from
    /// within the dead-after window.
    Pixie { agent_alive: bool },
}

/// How an event is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Append to the machine's timeline.
    Store { unexpected: bool },
    /// Append to the timeline marked `ignored`; the state does not change (a sighting by pixie
    /// that the machine's own reports contradict).
    Ignored,
    /// Only the heartbeat (last seen) is updated: `Alive`.
    Heartbeat,
    /// A repeat of the same boot's `PXE Booting`: nothing changes.
    Collapse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub next: FsmState,
    pub record: Record,
}

impl Step {
    /// Whether the event is a sign of life of the machine (updates its last-seen time).
    pub fn alive(&self, origin: Origin) -> bool {
        origin == Origin::Machine && self.record != Record::Collapse
    }
}

/// Applies one event to a machine's state.
pub fn apply(prev: &FsmState, ev: Ev, origin: Origin, now_ms: i64) -> Step {
    let keep = |record| Step { next: prev.clone(), record };
    if ev == Ev::Alive {
        return keep(Record::Heartbeat);
    }
    if ev == Ev::PxeBooting && prev.state == Some(Ev::PxeBooting) {
        return keep(Record::Collapse);
    }
    if let (Ev::PxeBooting, Origin::Pixie { agent_alive }) = (ev, origin) {
        let installing = matches!(prev.state, Some(Ev::Installing) | Some(Ev::BootingNewKernel));
        let hammer_up = matches!(prev.state, Some(Ev::Preparing) | Some(Ev::Registering) | Some(Ev::Waiting));
        if installing || (hammer_up && agent_alive) {
            return keep(Record::Ignored);
        }
    }
    let unexpected = !allowed(prev.state, ev);
    let mut next = prev.clone();
    next.state = Some(ev);
    match ev {
        Ev::Preparing | Ev::Registering if matches!(prev.state, Some(Ev::Installing) | Some(Ev::BootingNewKernel)) => {
            next.crash_count += 1;
            if next.crash_count >= CRASH_LOOP_THRESHOLD {
                next.crash_loop = true;
            }
        }
        Ev::PhonedHome => {
            if prev.reclaiming {
                next.failed_reclaim = true;
            } else {
                next.crash_count = 0;
                next.crash_loop = false;
            }
        }
        Ev::Waiting => {
            next.reclaiming = false;
            next.reclaim_ms = None;
            next.failed_reclaim = false;
        }
        Ev::MachineReclaim => {
            next.reclaiming = true;
            next.reclaim_ms = Some(now_ms);
            next.failed_reclaim = false;
            next.crash_count = 0;
            next.crash_loop = false;
        }
        _ => {}
    }
    Step { next, record: Record::Store { unexpected } }
}

/// Whether a reclaim failed: the old OS phoned home, or `Waiting` did not come within `timeout_ms`.
pub fn failed_reclaim(s: &FsmState, now_ms: i64, timeout_ms: i64) -> bool {
    s.failed_reclaim || (s.reclaiming && s.reclaim_ms.is_some_and(|t| now_ms - t > timeout_ms))
}

/// Liveliness from the age of the last sign of life. A machine running its installed OS does not
/// send heartbeats, so silence there is `Unknown`, not `Dead`.
pub fn liveliness(state: Option<Ev>, last_seen_ms: Option<i64>, now_ms: i64, dead_after_ms: i64) -> Liveliness {
    match last_seen_ms {
        None => Liveliness::Unknown,
        Some(t) if now_ms - t < dead_after_ms => Liveliness::Alive,
        Some(_) if state == Some(Ev::PhonedHome) => Liveliness::Unknown,
        Some(_) => Liveliness::Dead,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_has_a_row() {
        assert!(TRANSITIONS.iter().any(|(f, _)| f.is_none()));
        for e in Ev::ALL {
            let rows = TRANSITIONS.iter().filter(|(f, _)| *f == Some(e)).count();
            if e == Ev::Alive {
                assert_eq!(rows, 0, "Alive is never a state");
            } else {
                assert_eq!(rows, 1, "{e} needs exactly one row");
            }
        }
    }

    #[test]
    fn transition_table() {
        use Ev::*;
        let cases: &[(Option<Ev>, Ev, bool)] = &[
            (None, PxeBooting, true),
            (None, Registering, true),
            (None, Waiting, false),
            (Some(PxeBooting), Preparing, true),
            (Some(Preparing), Registering, true),
            (Some(Registering), Waiting, true),
            (Some(Waiting), Installing, true),
            (Some(Installing), BootingNewKernel, true),
            (Some(BootingNewKernel), PhonedHome, true),
            (Some(PhonedHome), MachineReclaim, true),
            (Some(MachineReclaim), Registering, true),
            (Some(MachineReclaim), PxeBooting, true),
            (Some(Waiting), PhonedHome, false),
            (Some(Registering), Installing, false),
            (Some(Installing), Waiting, false),
            (Some(BootingNewKernel), Installing, false),
            (Some(MachineReclaim), PhonedHome, false),
            (Some(PhonedHome), Installing, false),
            (Some(Crashed), Registering, true),
            (Some(Waiting), Alive, true),
            (None, Alive, true),
        ];
        for &(from, to, ok) in cases {
            assert_eq!(allowed(from, to), ok, "{from:?} -> {to}");
        }
    }

    /// Runs the events as the machine's own reports, except `PXE Booting`, which comes from
    /// pixie while metal-hammer is not alive (the machine really rebooted).
    fn run(events: &[Ev]) -> (FsmState, Vec<Record>) {
        run_from(FsmState::default(), events, false)
    }

    fn run_from(mut s: FsmState, events: &[Ev], agent_alive: bool) -> (FsmState, Vec<Record>) {
        let mut records = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let origin = if *e == Ev::PxeBooting { Origin::Pixie { agent_alive } } else { Origin::Machine };
            let step = apply(&s, *e, origin, i as i64 * 1000);
            s = step.next;
            records.push(step.record);
        }
        (s, records)
    }

    #[test]
    fn happy_path_is_all_expected() {
        use Ev::*;
        let (s, records) = run(&[
            PxeBooting,
            Preparing,
            Registering,
            Waiting,
            Installing,
            BootingNewKernel,
            PhonedHome,
            MachineReclaim,
            PxeBooting,
            Registering,
            Waiting,
        ]);
        assert!(records.iter().all(|r| *r == Record::Store { unexpected: false }), "{records:?}");
        assert_eq!(s.state, Some(Waiting));
        assert!(!s.crash_loop && !s.failed_reclaim && !s.reclaiming);
    }

    #[test]
    fn unexpected_events_are_stored_flagged_and_become_the_state() {
        let (s, records) = run(&[Ev::Registering, Ev::PhonedHome]);
        assert_eq!(records[1], Record::Store { unexpected: true });
        assert_eq!(s.state, Some(Ev::PhonedHome));
    }

    #[test]
    fn alive_is_a_heartbeat_and_repeated_pxe_collapses() {
        let (s, records) = run(&[Ev::PxeBooting, Ev::PxeBooting, Ev::Alive]);
        assert_eq!(records, vec![Record::Store { unexpected: false }, Record::Collapse, Record::Heartbeat]);
        assert_eq!(s.state, Some(Ev::PxeBooting));
    }

    #[test]
    fn crash_loop_after_threshold_restarts_mid_install() {
        use Ev::*;
        // The machine dies mid-install, PXE boots (a sighting, ignored while installing) and
        // metal-hammer starts again: that restart is the crash.
        let attempt = [Installing, PxeBooting, Preparing, Registering, Waiting];
        let mut evs = vec![Preparing, Registering, Waiting];
        for _ in 0..CRASH_LOOP_THRESHOLD - 1 {
            evs.extend_from_slice(&attempt);
        }
        let (s, records) = run(&evs);
        assert_eq!(s.crash_count, CRASH_LOOP_THRESHOLD - 1);
        assert!(!s.crash_loop);
        assert_eq!(records[4], Record::Ignored, "PXE Booting while Installing is a sighting");
        assert_eq!(records[5], Record::Store { unexpected: false }, "Installing → Preparing is a crash, not an error");
        evs.extend_from_slice(&attempt);
        let (s, _) = run(&evs);
        assert!(s.crash_loop);
        // Dying after the kexec counts too.
        let (s, _) = run(&[Registering, Waiting, Installing, BootingNewKernel, Preparing]);
        assert_eq!(s.crash_count, 1);
        // A successful phone home clears it.
        evs.extend_from_slice(&[Installing, BootingNewKernel, PhonedHome]);
        let (s, _) = run(&evs);
        assert!(!s.crash_loop);
        assert_eq!(s.crash_count, 0);
    }

    #[test]
    fn pixie_sightings_do_not_move_a_live_machine() {
        use Ev::*;
        let (waiting, _) = run(&[Preparing, Registering, Waiting]);
        // metal-hammer alive and waiting: a spoofed DISCOVER does not take it out of the pool.
        let (s, records) = run_from(waiting.clone(), &[PxeBooting, PxeBooting, PxeBooting], true);
        assert_eq!(s, waiting);
        assert_eq!(records, vec![Record::Ignored; 3]);
        // Silent for longer than the dead-after window: the machine really rebooted.
        let (s, records) = run_from(waiting.clone(), &[PxeBooting], false);
        assert_eq!(s.state, Some(PxeBooting));
        assert_eq!(records, vec![Record::Store { unexpected: false }]);
        // Mid-install, sightings never end the install or count as crashes, alive or not.
        let (installing, _) = run_from(waiting, &[Installing], true);
        for alive in [true, false] {
            let (s, _) = run_from(installing.clone(), &[PxeBooting, PxeBooting, PxeBooting], alive);
            assert_eq!(s, installing, "alive {alive}");
        }
        // A sighting is never a sign of life; the machine's own events are.
        let step = apply(&installing, PxeBooting, Origin::Pixie { agent_alive: false }, 0);
        assert!(!step.alive(Origin::Pixie { agent_alive: false }));
        assert!(apply(&installing, Alive, Origin::Machine, 0).alive(Origin::Machine));
        // After Phoned Home a PXE boot is the installed OS rebooting: it is the state, no crash.
        let (ph, _) = run(&[Registering, Waiting, Installing, BootingNewKernel, PhonedHome]);
        let (s, _) = run_from(ph, &[PxeBooting, PhonedHome], true);
        assert_eq!(s.state, Some(PhonedHome));
        assert_eq!(s.crash_count, 0);
    }

    #[test]
    fn failed_reclaim_when_old_os_phones_home_or_timeout() {
        use Ev::*;
        let (s, records) =
            run(&[Registering, Waiting, Installing, BootingNewKernel, PhonedHome, MachineReclaim, PxeBooting, PhonedHome]);
        assert!(s.failed_reclaim);
        assert_eq!(*records.last().unwrap(), Record::Store { unexpected: false }); // PXE → Phoned Home is normal per se
        let (s, _) = run(&[Registering, Waiting, MachineReclaim]);
        assert!(s.reclaiming);
        let t = s.reclaim_ms.unwrap();
        assert!(!failed_reclaim(&s, t + 1000, 60_000));
        assert!(failed_reclaim(&s, t + 61_000, 60_000));
        let (s, _) = run(&[Registering, Waiting, MachineReclaim, Registering, Waiting]);
        assert!(!failed_reclaim(&s, i64::MAX, 60_000));
    }

    #[test]
    fn liveliness_from_last_seen() {
        assert_eq!(liveliness(Some(Ev::Waiting), None, 100, 60), Liveliness::Unknown);
        assert_eq!(liveliness(Some(Ev::Waiting), Some(50), 100, 60), Liveliness::Alive);
        assert_eq!(liveliness(Some(Ev::Waiting), Some(10), 100, 60), Liveliness::Dead);
        assert_eq!(liveliness(Some(Ev::PhonedHome), Some(10), 100, 60), Liveliness::Unknown);
    }
}
