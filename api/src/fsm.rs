//! The provisioning event state machine. Pure: no I/O, no clock (the caller passes `now`).
//!
//! The table follows metal-stack's transitions (`metal-api/cmd/metal-api/internal/fsm`), made a
//! little more lenient where our agent legitimately skips a step. `docs/events.md` documents it.
//!
//! Rules:
//! - Every event except `Alive` becomes the machine's state, allowed or not. An event that the
//!   table does not allow after the current state is stored flagged `unexpected`, never dropped.
//! - `Alive` is a heartbeat: it updates liveliness only and is not stored.
//! - A `PXE Booting` right after a `PXE Booting` is the same boot (DHCP discover, iPXE's second
//!   DHCP, …) and is not stored again.
//! - Crash loop: a `PXE Booting` while `Installing` or `Booting New Kernel` counts as a crash;
//!   [`CRASH_LOOP_THRESHOLD`] of them before the OS phones home (or the machine is reclaimed) set
//!   `crash_loop`.
//! - Failed reclaim: after `Machine Reclaim` the machine must come back to `Waiting`. A `Phoned
//!   Home` on the way (the old OS booted instead of metal-hammer) sets `failed_reclaim` at once;
//!   so does not reaching `Waiting` within the reclaim timeout ([`failed_reclaim`]).

use metal_types::{Liveliness, ProvisioningEvent as Ev};

/// Crashes during one install before the machine is flagged as crash-looping.
pub const CRASH_LOOP_THRESHOLD: u32 = 3;

/// For each state (`None`: a machine with no events yet), the events that may follow it.
pub const TRANSITIONS: &[(Option<Ev>, &[Ev])] = &[
    (None, &[Ev::PxeBooting, Ev::Preparing, Ev::Registering]),
    (Some(Ev::PxeBooting), &[Ev::PxeBooting, Ev::Preparing, Ev::Registering, Ev::PhonedHome, Ev::Crashed]),
    (Some(Ev::Preparing), &[Ev::Preparing, Ev::Registering, Ev::PxeBooting, Ev::PlannedReboot, Ev::Crashed]),
    (
        Some(Ev::Registering),
        &[Ev::Registering, Ev::Waiting, Ev::PxeBooting, Ev::PlannedReboot, Ev::Crashed],
    ),
    (
        Some(Ev::Waiting),
        &[Ev::Waiting, Ev::Installing, Ev::PxeBooting, Ev::PlannedReboot, Ev::MachineReclaim, Ev::Crashed],
    ),
    (
        Some(Ev::Installing),
        &[Ev::Installing, Ev::BootingNewKernel, Ev::PxeBooting, Ev::PlannedReboot, Ev::MachineReclaim, Ev::Crashed],
    ),
    (
        Some(Ev::BootingNewKernel),
        &[Ev::PhonedHome, Ev::PxeBooting, Ev::PlannedReboot, Ev::MachineReclaim, Ev::Crashed],
    ),
    (
        Some(Ev::PhonedHome),
        &[Ev::PhonedHome, Ev::PxeBooting, Ev::PlannedReboot, Ev::MachineReclaim, Ev::Crashed],
    ),
    (
        Some(Ev::PlannedReboot),
        &[Ev::PxeBooting, Ev::Preparing, Ev::PhonedHome, Ev::MachineReclaim, Ev::Crashed],
    ),
    (
        Some(Ev::MachineReclaim),
        &[Ev::MachineReclaim, Ev::PxeBooting, Ev::Preparing, Ev::Registering, Ev::PlannedReboot, Ev::Crashed],
    ),
    (
        Some(Ev::Crashed),
        &[Ev::Crashed, Ev::PxeBooting, Ev::Preparing, Ev::Registering, Ev::PlannedReboot, Ev::MachineReclaim],
    ),
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

/// How an event is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// Append to the machine's timeline.
    Store { unexpected: bool },
    /// Only the heartbeat (last seen) is updated: `Alive`.
    Heartbeat,
    /// A repeat of the same boot's `PXE Booting`: only the heartbeat is updated.
    Collapse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub next: FsmState,
    pub record: Record,
}

/// Applies one event to a machine's state.
pub fn apply(prev: &FsmState, ev: Ev, now_ms: i64) -> Step {
    if ev == Ev::Alive {
        return Step { next: prev.clone(), record: Record::Heartbeat };
    }
    if ev == Ev::PxeBooting && prev.state == Some(Ev::PxeBooting) {
        return Step { next: prev.clone(), record: Record::Collapse };
    }
    let unexpected = !allowed(prev.state, ev);
    let mut next = prev.clone();
    next.state = Some(ev);
    match ev {
        Ev::PxeBooting if matches!(prev.state, Some(Ev::Installing) | Some(Ev::BootingNewKernel)) => {
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

    fn run(events: &[Ev]) -> (FsmState, Vec<Record>) {
        let mut s = FsmState::default();
        let mut records = Vec::new();
        for (i, e) in events.iter().enumerate() {
            let step = apply(&s, *e, i as i64 * 1000);
            s = step.next;
            records.push(step.record);
        }
        (s, records)
    }

    #[test]
    fn happy_path_is_all_expected() {
        use Ev::*;
        let (s, records) = run(&[
            PxeBooting, Preparing, Registering, Waiting, Installing, BootingNewKernel, PhonedHome,
            MachineReclaim, PxeBooting, Registering, Waiting,
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
    fn crash_loop_after_threshold_pxe_boots_mid_install() {
        use Ev::*;
        let attempt = [Registering, Waiting, Installing, PxeBooting];
        let mut evs = Vec::new();
        for _ in 0..CRASH_LOOP_THRESHOLD - 1 {
            evs.extend_from_slice(&attempt);
        }
        let (s, _) = run(&evs);
        assert_eq!(s.crash_count, CRASH_LOOP_THRESHOLD - 1);
        assert!(!s.crash_loop);
        evs.extend_from_slice(&attempt);
        let (s, _) = run(&evs);
        assert!(s.crash_loop);
        // A successful phone home clears it.
        evs.extend_from_slice(&[Registering, Waiting, Installing, BootingNewKernel, PhonedHome]);
        let (s, _) = run(&evs);
        assert!(!s.crash_loop);
        assert_eq!(s.crash_count, 0);
    }

    #[test]
    fn failed_reclaim_when_old_os_phones_home_or_timeout() {
        use Ev::*;
        let (s, records) = run(&[Registering, Waiting, Installing, BootingNewKernel, PhonedHome, MachineReclaim, PxeBooting, PhonedHome]);
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
