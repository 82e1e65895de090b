//! Pure decisions: which size a machine is, which machine an allocation gets, which layout and
//! image version apply. No I/O; the store feeds them rows and re-checks inside its transaction.

use metal_types::{ConstraintKind, FilesystemLayout, Inventory, MachineId, ProvisioningEvent, Size};
use std::cmp::Ordering;

/// The size id of a machine that matches no size, or more than one.
pub const UNKNOWN_SIZE: &str = "unknown";

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

/// Checks a size before it is stored.
pub fn validate_size(size: &Size) -> Result<(), String> {
    validate_id("size", &size.id)?;
    if size.id == UNKNOWN_SIZE {
        return Err("size id `unknown` is reserved for machines that match no size; pick another id".into());
    }
    if size.constraints.is_empty() {
        return Err("a size needs at least one constraint (cores, memory or storage)".into());
    }
    for c in &size.constraints {
        if c.min > c.max {
            return Err(format!("constraint {:?} has min {} > max {}; swap them", c.kind, c.min, c.max));
        }
    }
    let mut kinds: Vec<_> = size.constraints.iter().map(|c| c.kind as u8).collect();
    kinds.sort_unstable();
    if kinds.windows(2).any(|w| w[0] == w[1]) {
        return Err("a size has at most one constraint per kind".into());
    }
    Ok(())
}

/// Ids of catalog objects: 1–63 characters of `a-z 0-9 - _ .`, starting with a letter or digit.
pub fn validate_id(what: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} id {id:?} is invalid: use 1-63 characters a-z, 0-9, '-', '_', '.', starting with a letter or digit"
        ))
    }
}

/// A machine as the pick sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: MachineId,
    pub state: Option<ProvisioningEvent>,
    pub allocated: bool,
    pub crash_loop: bool,
    pub last_seen_ms: Option<i64>,
}

impl Candidate {
    /// Waiting, not allocated, not crash-looping, and heard from within `dead_after_ms`.
    pub fn eligible(&self, now_ms: i64, dead_after_ms: i64) -> bool {
        self.state == Some(ProvisioningEvent::Waiting)
            && !self.allocated
            && !self.crash_loop
            && self.last_seen_ms.is_some_and(|t| now_ms - t < dead_after_ms)
    }
}

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
            (inv(3, 2, 10), "unknown"),   // no size has 3 cores with 2 GiB
            (inv(2, 4, 10), "unknown"),   // small and odd both match: ambiguous
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
        (any::<u128>(), arb_state(), any::<bool>(), any::<bool>(), proptest::option::of(0i64..2_000))
            .prop_map(|(id, state, allocated, crash_loop, last_seen_ms)| Candidate {
                id: MachineId(uuid::Uuid::from_u128(id)),
                state,
                allocated,
                crash_loop,
                last_seen_ms,
            })
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
}
