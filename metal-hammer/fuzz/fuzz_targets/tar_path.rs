//! Hostile paths in images: an archive member name goes through `extract::sanitize`, a kernel
//! or helper path named by an image through `resolve_in_root` (over a small tree with symlinks
//! that point up, out and in circles). Neither ever yields a path outside the root, a `..`
//! component, or panics; `sanitize` refuses exactly the names with a `..` and is idempotent.
#![no_main]

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use metal_hammer::install::extract::sanitize;
use metal_hammer::install::resolve_in_root;

/// The tree, made once per process under `$TMPDIR` (scripts/fuzz points it at a scratch
/// directory it removes).
fn tree() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("metal-fuzz-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for d in ["boot", "etc", "usr/lib/x", "var"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("boot/vmlinuz-6.1"), b"kernel").unwrap();
        let links = [
            ("boot/vmlinuz", "vmlinuz-6.1"),
            ("vmlinuz", "boot/vmlinuz"),
            ("up", "../../../.."),
            ("etc/abs", "/etc"),
            ("etc/out", "/../../tmp"),
            ("usr/lib/x/back", "../../.."),
            ("loop", "loop"),
            ("ping", "pong"),
            ("pong", "ping"),
            ("var/run", "../up/boot"),
        ];
        for (link, target) in links {
            std::os::unix::fs::symlink(target, root.join(link)).unwrap();
        }
        root.canonicalize().unwrap()
    })
}

fn only_normal(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_)))
}

fuzz_target!(|data: &[u8]| {
    let name = Path::new(OsStr::from_bytes(data));
    let has_parent = name.components().any(|c| c == Component::ParentDir);
    match sanitize(name) {
        Some(rel) => {
            assert!(!has_parent, "{name:?} has a .. component and was accepted as {rel:?}");
            assert!(rel.is_relative() && only_normal(&rel), "{name:?} became {rel:?}");
            assert!(Path::new("/root-of-image").join(&rel).starts_with("/root-of-image"), "{rel:?} escapes");
            assert_eq!(sanitize(&rel).as_ref(), Some(&rel), "sanitize is not idempotent on {rel:?}");
        }
        None => assert!(has_parent, "{name:?} has no .. component and was refused"),
    }

    let root = tree();
    if let Ok(rel) = std::str::from_utf8(data) {
        if let Ok(p) = resolve_in_root(root, rel) {
            let inside = p.strip_prefix(root).unwrap_or_else(|_| panic!("{rel:?} resolved to {p:?}, outside {root:?}"));
            assert!(only_normal(inside), "{rel:?} resolved to {p:?}");
        }
    }
});
