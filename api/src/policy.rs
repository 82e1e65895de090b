//! Pure decisions: which size a machine is, which machine an allocation gets, which layout and
//! image version apply. No I/O; the store feeds them rows and re-checks inside its transaction.

use metal_types::{ConstraintKind, FilesystemLayout, Inventory, MachineId, ProvisioningEvent, Size};
use std::cmp::Ordering;

/// The size id of a machine that matches no size, or more than one.
pub use metal_types::catalog::UNKNOWN_SIZE;

/// Whether every constraint of `size` holds for `inv`.
pub fn size_matches(size: &Size, inv: &Inventory) -> bool {
    !size.constraints.is_empty()
        && size.constraints.iter().all(|c| {
            let v = match c.kind {
                ConstraintKind::Cores => inv.cores(),
                ConstraintKind::Memory => inv.memory_bytes,
                ConstraintKind::Storage => inv.storage_bytes(),
            };
            c.min <= v && v <= c.max
        })
}

/// The one size `inv` matches, or [`UNKNOWN_SIZE`] when it matches none or several.
pub fn match_size(sizes: &[Size], inv: &Inventory) -> String {
    let mut hits = sizes.iter().filter(|s| size_matches(s, inv));
    match (hits.next(), hits.next()) {
        (Some(s), None) => s.id.clone(),
        _ => UNKNOWN_SIZE.to_string(),
    }
}

pub use metal_types::catalog::{validate_id, validate_size};

/// A machine as the pick sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: MachineId,
    pub state: Option<ProvisioningEvent>,
    pub allocated: bool,
    pub crash_loop: bool,
    pub last_seen_ms: Option<i64>,
}

/// One rule a machine must meet to be picked for an allocation. [`ELIGIBLE`] lists them all; the
/// store's pre-filter, its re-check inside the allocation's transaction, [`Candidate::eligible`]
/// and the explanation of a refusal ([`why_not`]) are all rendered from that one list, so they
/// cannot disagree (`api/tests/eligibility.rs` checks SQL and Rust against each other on both
/// backends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Its last event is `Waiting`: metal-hammer wiped it and waits in the pool.
    Waiting,
    /// No allocation holds it.
    Unallocated,
    /// Not flagged as crash-looping.
    NotCrashLooping,
    /// Heard from within the dead-after window.
    Alive,
}

/// Every rule, in the order a refusal names the first one broken.
pub const ELIGIBLE: [Rule; 4] = [Rule::Waiting, Rule::Unallocated, Rule::NotCrashLooping, Rule::Alive];

/// Why a machine cannot be picked: the first rule of [`ELIGIBLE`] it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Ineligible {
    #[error("it is not Waiting (state: {})", .0.map_or("none", |e| e.as_str()))]
    NotWaiting(Option<ProvisioningEvent>),
    #[error("it is already allocated")]
    Allocated,
    #[error("it is crash-looping")]
    CrashLooping,
    #[error("it has not been heard from in {} s", .dead_after_ms / 1000)]
    Silent { dead_after_ms: i64 },
    /// Every rule held when it was read, but another allocation took it first.
    #[error("it was taken concurrently")]
    Taken,
}

impl Rule {
    /// The rule as a condition on the `machines` table; `cutoff` is the SQL placeholder that
    /// will hold `now - dead_after` (the oldest `last_seen_ms` that still counts as alive). The
    /// first three are written exactly as the partial index `machines_free` is, so SQLite uses it.
    pub fn sql(self, cutoff: &str) -> String {
        match self {
            Rule::Waiting => "state = 'Waiting'".into(),
            Rule::Unallocated => "allocation IS NULL".into(),
            Rule::NotCrashLooping => "crash_loop = 0".into(),
            Rule::Alive => format!("last_seen_ms > {cutoff}"),
        }
    }

    /// Whether `c` meets the rule at `now_ms`.
    pub fn holds(self, c: &Candidate, now_ms: i64, dead_after_ms: i64) -> bool {
        match self {
            Rule::Waiting => c.state == Some(ProvisioningEvent::Waiting),
            Rule::Unallocated => !c.allocated,
            Rule::NotCrashLooping => !c.crash_loop,
            Rule::Alive => c.last_seen_ms.is_some_and(|t| t > now_ms - dead_after_ms),
        }
    }

    fn broken_by(self, c: &Candidate, dead_after_ms: i64) -> Ineligible {
        match self {
            Rule::Waiting => Ineligible::NotWaiting(c.state),
            Rule::Unallocated => Ineligible::Allocated,
            Rule::NotCrashLooping => Ineligible::CrashLooping,
            Rule::Alive => Ineligible::Silent { dead_after_ms },
        }
    }
}

/// All of [`ELIGIBLE`] as one SQL condition (see [`Rule::sql`]).
pub fn eligible_sql(cutoff: &str) -> String {
    ELIGIBLE.iter().map(|r| r.sql(cutoff)).collect::<Vec<_>>().join(" AND ")
}

/// The first rule `c` breaks at `now_ms`, or `None` when it may be picked.
pub fn why_not(c: &Candidate, now_ms: i64, dead_after_ms: i64) -> Option<Ineligible> {
    ELIGIBLE.iter().find(|r| !r.holds(c, now_ms, dead_after_ms)).map(|r| r.broken_by(c, dead_after_ms))
}

impl Candidate {
    /// Whether every rule of [`ELIGIBLE`] holds at `now_ms`.
    pub fn eligible(&self, now_ms: i64, dead_after_ms: i64) -> bool {
        why_not(self, now_ms, dead_after_ms).is_none()
    }
}

/// How many of the newest eligible machines a pick chooses among, on every backend.
pub const CANDIDATE_WINDOW: usize = 16;

/// Picks one eligible machine. `spread` (any number, e.g. random) chooses among several, so
/// concurrent requests on different replicas tend not to fight over the same row.
pub fn pick(cands: &[Candidate], now_ms: i64, dead_after_ms: i64, spread: u64) -> Option<MachineId> {
    let eligible: Vec<&Candidate> = cands.iter().filter(|c| c.eligible(now_ms, dead_after_ms)).collect();
    if eligible.is_empty() {
        return None;
    }
    Some(eligible[(spread % eligible.len() as u64) as usize].id)
}

/// Whether a layout may be used with this size and image name.
pub fn layout_fits(layout: &FilesystemLayout, size: &str, image_name: &str) -> bool {
    (layout.sizes.is_empty() || layout.sizes.iter().any(|s| s == size))
        && (layout.images.is_empty() || layout.images.iter().any(|p| image_name.starts_with(p.as_str())))
}

/// The first layout (by id) that fits.
pub fn pick_layout<'a>(layouts: &'a [FilesystemLayout], size: &str, image_name: &str) -> Option<&'a FilesystemLayout> {
    let mut fitting: Vec<&FilesystemLayout> = layouts.iter().filter(|l| layout_fits(l, size, image_name)).collect();
    fitting.sort_by(|a, b| a.id.cmp(&b.id));
    fitting.into_iter().next()
}

/// Compares image versions: dot-separated parts, numeric parts numerically, others as text.
/// `20261124.1` is newer than `20261124`, and `20261125` newer than both.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let mut pa = a.split('.');
    let mut pb = b.split('.');
    loop {
        match (pa.next(), pb.next()) {
            (None, None) => return Ordering::Equal,
            (Some(_), None) => return Ordering::Greater,
            (None, Some(_)) => return Ordering::Less,
            (Some(x), Some(y)) => {
                let o = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(m), Ok(n)) => m.cmp(&n),
                    _ => x.cmp(y),
                };
                if o != Ordering::Equal {
                    return o;
                }
            }
        }
    }
}

/// What a machine that PXE boots gets: the installed OS from its disk, or metal-hammer with an
/// enrolment token bound to what the boot request showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootPlan {
    /// Its allocation's OS phoned home: boot that from the local disk.
    LocalDisk,
    /// Boot metal-hammer; the caller signs `claims` into the token of `metal.token`.
    Hammer { claims: crate::enrolment::Claims, kernel_url: String, initrd_url: String, api_url: String, cmdline: String },
}

/// The machine a boot request belongs to, as the store found it (by UUID or by MAC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootMachine {
    pub id: MachineId,
    /// Its current allocation's OS has phoned home.
    pub phoned_home: bool,
}

/// The boot decision. The token is bound to the partition, the MAC the request came from and
/// the machine: the known one, else the UUID the request named (`enrolment` module doc).
pub fn boot(
    machine: Option<BootMachine>,
    partition: &metal_types::Partition,
    mac: Option<metal_types::Mac>,
    uuid: Option<MachineId>,
    token_expires_ms: i64,
) -> BootPlan {
    if machine.is_some_and(|m| m.phoned_home) {
        return BootPlan::LocalDisk;
    }
    let claims = crate::enrolment::Claims::new(
        &partition.id,
        mac.map(|m| m.to_string()),
        machine.map(|m| m.id).or(uuid),
        token_expires_ms,
    );
    BootPlan::Hammer {
        claims,
        kernel_url: partition.boot.kernel_url.clone(),
        initrd_url: partition.boot.initrd_url.clone(),
        api_url: partition.boot.api_url.trim_end_matches('/').to_string(),
        cmdline: partition.boot.cmdline.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metal_types::{Cpu, Disk, SizeConstraint};
    use proptest::prelude::*;

    fn inv(cores: u32, mem_gib: u64, disk_gib: u64) -> Inventory {
        Inventory {
            cpus: vec![Cpu { model: "x".into(), cores, threads: cores * 2 }],
            memory_bytes: mem_gib << 30,
            disks: vec![Disk { name: "vda".into(), size_bytes: disk_gib << 30, ..Default::default() }],
            ..Default::default()
        }
    }

    fn size(id: &str, cores: (u64, u64), mem_gib: (u64, u64)) -> Size {
        Size {
            id: id.into(),
            description: String::new(),
            constraints: vec![
                SizeConstraint { kind: ConstraintKind::Cores, min: cores.0, max: cores.1 },
                SizeConstraint { kind: ConstraintKind::Memory, min: mem_gib.0 << 30, max: mem_gib.1 << 30 },
            ],
        }
    }

    #[test]
    fn size_matching_table() {
        let sizes = vec![size("small", (1, 2), (1, 4)), size("big", (4, 64), (8, 512)), size("odd", (2, 2), (4, 4))];
        let cases = [
            (inv(1, 2, 10), "small"),
            (inv(8, 16, 10), "big"),
            (inv(3, 2, 10), "unknown"),    // no size has 3 cores with 2 GiB
            (inv(2, 4, 10), "unknown"),    // small and odd both match: ambiguous
            (inv(128, 16, 10), "unknown"), // too many cores
            (inv(2, 3, 10), "small"),
        ];
        for (i, want) in cases {
            assert_eq!(match_size(&sizes, &i), want, "{} cores {} bytes", i.cores(), i.memory_bytes);
        }
        assert_eq!(match_size(&[], &inv(1, 1, 1)), "unknown");
    }

    #[test]
    fn size_validation() {
        assert!(validate_size(&size("ok", (1, 2), (1, 2))).is_ok());
        assert!(validate_size(&size("bad", (3, 2), (1, 2))).is_err());
        assert!(validate_size(&size("unknown", (1, 2), (1, 2))).is_err());
        assert!(validate_size(&Size { id: "e".into(), description: String::new(), constraints: vec![] }).is_err());
        assert!(validate_size(&size("Upper", (1, 2), (1, 2))).is_err());
    }

    #[test]
    fn versions_sort_numerically() {
        assert_eq!(compare_versions("20261124.1", "20261124"), Ordering::Greater);
        assert_eq!(compare_versions("20261125", "20261124.9"), Ordering::Greater);
        assert_eq!(compare_versions("9", "10"), Ordering::Less);
        assert_eq!(compare_versions("1.2", "1.2"), Ordering::Equal);
    }

    #[test]
    fn layouts_fit_by_size_and_image_prefix() {
        let l = |id: &str, sizes: &[&str], images: &[&str]| FilesystemLayout {
            id: id.into(),
            description: String::new(),
            disks: vec![],
            filesystems: vec![],
            sizes: sizes.iter().map(|s| s.to_string()).collect(),
            images: images.iter().map(|s| s.to_string()).collect(),
        };
        let layouts = vec![l("z-any", &[], &[]), l("a-debian", &["small"], &["debian"])];
        assert_eq!(pick_layout(&layouts, "small", "debian-12").unwrap().id, "a-debian");
        assert_eq!(pick_layout(&layouts, "big", "debian-12").unwrap().id, "z-any");
        assert_eq!(pick_layout(&layouts, "small", "test-os").unwrap().id, "z-any");
        assert!(pick_layout(&layouts[1..], "big", "debian-12").is_none());
    }

    fn arb_state() -> impl Strategy<Value = Option<ProvisioningEvent>> {
        prop_oneof![Just(None), proptest::sample::select(ProvisioningEvent::ALL.to_vec()).prop_map(Some)]
    }

    fn arb_candidate() -> impl Strategy<Value = Candidate> {
        (any::<u128>(), arb_state(), any::<bool>(), any::<bool>(), proptest::option::of(0i64..2_000)).prop_map(
            |(id, state, allocated, crash_loop, last_seen_ms)| Candidate {
                id: MachineId(uuid::Uuid::from_u128(id)),
                state,
                allocated,
                crash_loop,
                last_seen_ms,
            },
        )
    }

    proptest! {
        #[test]
        fn pick_returns_an_eligible_machine_iff_one_exists(
            cands in proptest::collection::vec(arb_candidate(), 0..40),
            now in 1_000i64..2_000,
            spread in any::<u64>(),
        ) {
            let dead_after = 500;
            let picked = pick(&cands, now, dead_after, spread);
            let any_eligible = cands.iter().any(|c| c.eligible(now, dead_after));
            prop_assert_eq!(picked.is_some(), any_eligible);
            if let Some(id) = picked {
                let c = cands.iter().find(|c| c.id == id).unwrap();
                prop_assert!(c.eligible(now, dead_after));
                prop_assert_eq!(c.state, Some(ProvisioningEvent::Waiting));
                prop_assert!(!c.allocated);
            }
        }

        #[test]
        fn size_match_is_unknown_or_a_single_matching_size(
            cores in 0u32..70, mem in 0u64..600, bounds in proptest::collection::vec((0u64..70, 0u64..70, 0u64..600, 0u64..600), 0..6),
        ) {
            let sizes: Vec<Size> = bounds.iter().enumerate().map(|(i, (a, b, c, d))| {
                size(&format!("s{i}"), (*a.min(b), *a.max(b)), (*c.min(d), *c.max(d)))
            }).collect();
            let i = inv(cores, mem, 1);
            let got = match_size(&sizes, &i);
            let hits: Vec<&Size> = sizes.iter().filter(|s| size_matches(s, &i)).collect();
            if hits.len() == 1 { prop_assert_eq!(&got, &hits[0].id); } else { prop_assert_eq!(got, UNKNOWN_SIZE); }
        }
    }

    fn partition() -> metal_types::Partition {
        metal_types::Partition {
            id: "lab".into(),
            description: String::new(),
            boot: metal_types::PartitionBoot {
                kernel_url: "http://10.0.0.1/vmlinuz".into(),
                initrd_url: "http://10.0.0.1/initrd.img".into(),
                api_url: "https://10.0.0.1:8080/".into(),
                cmdline: "console=ttyS0".into(),
            },
        }
    }

    #[test]
    fn boot_plans() {
        let p = partition();
        let mac: metal_types::Mac = "52:54:00:00:00:01".parse().unwrap();
        let known = MachineId::new_random();
        let named = MachineId::new_random();
        // A machine whose OS phoned home boots from its disk.
        let done = BootMachine { id: known, phoned_home: true };
        assert_eq!(boot(Some(done), &p, Some(mac), None, 1), BootPlan::LocalDisk);
        // A known machine gets a token for itself, even when the request names another UUID.
        let BootPlan::Hammer { claims, api_url, cmdline, .. } =
            boot(Some(BootMachine { id: known, phoned_home: false }), &p, Some(mac), Some(named), 99)
        else {
            panic!("hammer expected")
        };
        assert_eq!((claims.machine, claims.mac.as_deref(), claims.expires_ms), (Some(known), Some("52:54:00:00:00:01"), 99));
        assert_eq!(claims.partition, "lab");
        assert_eq!(api_url, "https://10.0.0.1:8080", "no trailing slash");
        assert_eq!(cmdline, "console=ttyS0");
        // An unknown machine: bound to the UUID it named, or to nothing but the MAC.
        let BootPlan::Hammer { claims, .. } = boot(None, &p, Some(mac), Some(named), 99) else { panic!() };
        assert_eq!(claims.machine, Some(named));
        let BootPlan::Hammer { claims, .. } = boot(None, &p, None, None, 99) else { panic!() };
        assert_eq!((claims.machine, claims.mac), (None, None));
    }
}
