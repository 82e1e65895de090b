//! The allocation planner: what an [`AllocationRequest`] means, decided from a snapshot of the
//! catalog without I/O. [`resolve`] checks the request and turns its names into an
//! [`AllocationPlan`] (which image version, which layout, which size); the store then picks and
//! takes a machine for that plan in one transaction (`store::allocation`). The handler
//! (`http::machines`) loads the [`Catalog`] snapshot and maps [`PlanError`] to messages.

use crate::policy;
use crate::store::AllocationPlan;
use metal_types::{AllocationRequest, FilesystemLayout, Image, MachineId};

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY: usize = 200;
/// Largest user data.
pub const MAX_USER_DATA: usize = 256 * 1024;

/// What the planner needs to know about the catalog for one request.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub project_exists: bool,
    pub partition_exists: bool,
    /// The image the request names (by id, or the newest unexpired of that name), with the time
    /// it expires.
    pub image: Option<(Image, Option<i64>)>,
    /// When the request names a machine: its partition and size, if it exists.
    pub machine: Option<(Option<String>, String)>,
    /// When the request names a size: whether it exists.
    pub size_exists: bool,
    pub layouts: Vec<FilesystemLayout>,
}

/// Why a request cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("project {0} not found")]
    ProjectNotFound(String),
    #[error("partition {0} not found")]
    PartitionNotFound(String),
    #[error("hostname {0:?} is invalid")]
    BadHostname(String),
    #[error("idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY} characters")]
    BadIdempotencyKey,
    #[error("user_data must be at most 256 KiB")]
    UserDataTooLarge,
    #[error("image {0} not found")]
    ImageNotFound(String),
    #[error("image {id} expired")]
    ImageExpired { id: String, at_ms: i64 },
    #[error("machine {machine} not found in partition {partition}")]
    MachineNotInPartition { machine: MachineId, partition: String },
    #[error("size {0} not found")]
    SizeNotFound(String),
    #[error("neither a size nor a machine")]
    NoSizeOrMachine,
    #[error("layout {0} not found")]
    LayoutNotFound(String),
    #[error("layout {layout} does not allow size {size} with image {image}")]
    LayoutDoesNotFit { layout: String, size: String, image: String },
    #[error("no layout fits size {size} and image {image}")]
    NoLayoutFits { size: String, image: String },
}

/// Whether `h` is a valid host name: labels of letters, digits and `-` (1–63 characters, not
/// starting or ending with `-`), separated by dots, at most 253 characters in all.
pub fn valid_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// Checks `req` against `cat` at `now_ms` and names everything the store needs. The checks run
/// in a fixed order, so a request with several mistakes always hears of the same one first.
pub fn resolve(cat: &Catalog, req: &AllocationRequest, now_ms: i64) -> Result<AllocationPlan, PlanError> {
    if !cat.project_exists {
        return Err(PlanError::ProjectNotFound(req.project.clone()));
    }
    if !cat.partition_exists {
        return Err(PlanError::PartitionNotFound(req.partition.clone()));
    }
    if !valid_hostname(&req.hostname) {
        return Err(PlanError::BadHostname(req.hostname.clone()));
    }
    if req.idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY) {
        return Err(PlanError::BadIdempotencyKey);
    }
    if req.user_data.len() > MAX_USER_DATA {
        return Err(PlanError::UserDataTooLarge);
    }
    let Some((image, expires)) = &cat.image else { return Err(PlanError::ImageNotFound(req.image.clone())) };
    if let Some(at_ms) = expires.filter(|e| *e <= now_ms) {
        return Err(PlanError::ImageExpired { id: image.id.clone(), at_ms });
    }
    let size = match (&req.machine, &req.size) {
        (Some(m), _) => match &cat.machine {
            Some((Some(p), size)) if *p == req.partition => size.clone(),
            _ => return Err(PlanError::MachineNotInPartition { machine: *m, partition: req.partition.clone() }),
        },
        (None, Some(size)) if cat.size_exists => size.clone(),
        (None, Some(size)) => return Err(PlanError::SizeNotFound(size.clone())),
        (None, None) => return Err(PlanError::NoSizeOrMachine),
    };
    let image_name = &image.manifest.name;
    let layout = match &req.layout {
        Some(id) => {
            let Some(l) = cat.layouts.iter().find(|l| &l.id == id) else { return Err(PlanError::LayoutNotFound(id.clone())) };
            if !policy::layout_fits(l, &size, image_name) {
                return Err(PlanError::LayoutDoesNotFit { layout: id.clone(), size, image: image_name.clone() });
            }
            l.id.clone()
        }
        None => match policy::pick_layout(&cat.layouts, &size, image_name) {
            Some(l) => l.id.clone(),
            None => return Err(PlanError::NoLayoutFits { size, image: image_name.clone() }),
        },
    };
    Ok(AllocationPlan {
        project: req.project.clone(),
        partition: req.partition.clone(),
        size: req.machine.is_none().then_some(size),
        machine: req.machine,
        image: image.id.clone(),
        hostname: req.hostname.clone(),
        layout,
        ssh_keys: req.ssh_keys.clone(),
        user_data: req.user_data.clone(),
        idempotency_key: req.idempotency_key.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use metal_types::{FsKind, GptPartition, GptType, ImageFormat, ImageManifest, LayoutDisk};

    fn image(name: &str, version: &str) -> Image {
        Image {
            id: format!("{name}-{version}"),
            url: "http://x/i".into(),
            classification: Default::default(),
            expires_at: None,
            manifest: ImageManifest {
                name: name.into(),
                version: version.into(),
                os: String::new(),
                format: ImageFormat::TarZst,
                compressed_size: 1,
                uncompressed_size: 1,
                sha256: "a".repeat(64),
                kernel: "boot/vmlinuz".into(),
                initrd: String::new(),
                cmdline: String::new(),
                packages: vec![],
            },
        }
    }

    fn layout(id: &str, sizes: &[&str], images: &[&str]) -> FilesystemLayout {
        FilesystemLayout {
            id: id.into(),
            description: String::new(),
            disks: vec![LayoutDisk {
                device: "first".into(),
                partitions: vec![GptPartition { number: 1, label: "root".into(), size_mib: 0, gpt_type: GptType::Linux }],
            }],
            filesystems: vec![metal_types::Filesystem {
                source: "first:1".into(),
                kind: FsKind::Ext4,
                mount: Some("/".into()),
                label: None,
                options: None,
            }],
            sizes: sizes.iter().map(|s| s.to_string()).collect(),
            images: images.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn catalog() -> Catalog {
        Catalog {
            project_exists: true,
            partition_exists: true,
            image: Some((image("test-os", "2"), None)),
            machine: None,
            size_exists: true,
            layouts: vec![layout("b-any", &[], &[]), layout("a-debian", &[], &["debian"])],
        }
    }

    fn request() -> AllocationRequest {
        serde_json::from_value(
            serde_json::json!({"project": "p1", "partition": "lab", "size": "small", "image": "test-os", "hostname": "web-1"}),
        )
        .unwrap()
    }

    #[test]
    fn a_good_request_names_everything() {
        let plan = resolve(&catalog(), &request(), 0).unwrap();
        assert_eq!(plan.image, "test-os-2");
        assert_eq!(plan.layout, "b-any", "the first layout by id that fits (a-debian is for debian images)");
        assert_eq!(plan.size.as_deref(), Some("small"));
        assert_eq!(plan.machine, None);
    }

    #[test]
    fn each_mistake_is_named() {
        type Spoil = Box<dyn Fn(&mut Catalog, &mut AllocationRequest)>;
        let cases: Vec<(Spoil, PlanError)> = vec![
            (Box::new(|c, _| c.project_exists = false), PlanError::ProjectNotFound("p1".into())),
            (Box::new(|c, _| c.partition_exists = false), PlanError::PartitionNotFound("lab".into())),
            (Box::new(|_, r| r.hostname = "no spaces".into()), PlanError::BadHostname("no spaces".into())),
            (Box::new(|_, r| r.idempotency_key = Some(String::new())), PlanError::BadIdempotencyKey),
            (Box::new(|_, r| r.user_data = "x".repeat(MAX_USER_DATA + 1)), PlanError::UserDataTooLarge),
            (Box::new(|c, _| c.image = None), PlanError::ImageNotFound("test-os".into())),
            (
                Box::new(|c, _| c.image = Some((image("test-os", "2"), Some(5)))),
                PlanError::ImageExpired { id: "test-os-2".into(), at_ms: 5 },
            ),
            (Box::new(|c, _| c.size_exists = false), PlanError::SizeNotFound("small".into())),
            (Box::new(|_, r| r.size = None), PlanError::NoSizeOrMachine),
            (Box::new(|_, r| r.layout = Some("nope".into())), PlanError::LayoutNotFound("nope".into())),
            (
                Box::new(|_, r| r.layout = Some("a-debian".into())),
                PlanError::LayoutDoesNotFit { layout: "a-debian".into(), size: "small".into(), image: "test-os".into() },
            ),
            (
                Box::new(|c, _| c.layouts.retain(|l| l.id == "a-debian")),
                PlanError::NoLayoutFits { size: "small".into(), image: "test-os".into() },
            ),
        ];
        for (i, (spoil, want)) in cases.into_iter().enumerate() {
            let (mut c, mut r) = (catalog(), request());
            spoil(&mut c, &mut r);
            assert_eq!(resolve(&c, &r, 10), Err(want), "case {i}");
        }
    }

    #[test]
    fn a_named_machine_brings_its_size_and_must_be_in_the_partition() {
        let m = MachineId::new_random();
        let mut r = request();
        r.size = None;
        r.machine = Some(m);
        let mut c = catalog();
        c.machine = Some((Some("lab".into()), "big".into()));
        let plan = resolve(&c, &r, 0).unwrap();
        assert_eq!((plan.machine, plan.size), (Some(m), None));
        c.machine = Some((Some("other".into()), "big".into()));
        assert_eq!(resolve(&c, &r, 0), Err(PlanError::MachineNotInPartition { machine: m, partition: "lab".into() }));
        c.machine = None;
        assert!(matches!(resolve(&c, &r, 0), Err(PlanError::MachineNotInPartition { .. })));
    }

    #[test]
    fn hostnames() {
        for ok in ["a", "web-1", "a.b.c", &"x".repeat(63)] {
            assert!(valid_hostname(ok), "{ok:?}");
        }
        for bad in ["", "-a", "a-", "a..b", "a b", "ä", &"x".repeat(64), &format!("{}.x", "a.".repeat(130))] {
            assert!(!valid_hostname(bad), "{bad:?}");
        }
    }
}
