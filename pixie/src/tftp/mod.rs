//! Read-only TFTP: the codec ([`codec`]), path resolution under the root ([`resolve`]), which
//! requests may start a transfer ([`admission`]) and the server ([`server`]: one task and one
//! socket per transfer).

pub mod admission;
pub mod codec;
pub mod server;

use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} leaves the TFTP root")]
    Escapes(String),
    #[error("path {0:?} contains a NUL or control character")]
    BadChar(String),
    #[error("file {0:?} not found")]
    NotFound(String),
    #[error("{0:?} is not a regular file")]
    NotAFile(String),
}

/// The relative path a request names: leading slashes (and a `\` used as separator by some
/// clients) map under the root; `..` anywhere is refused.
pub fn sanitize(requested: &str) -> Result<PathBuf, PathError> {
    if requested.chars().any(|c| c.is_control()) {
        return Err(PathError::BadChar(requested.to_string()));
    }
    let normal = requested.replace('\\', "/");
    let mut out = PathBuf::new();
    for c in Path::new(normal.trim_start_matches('/')).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(PathError::Escapes(requested.to_string()))
            }
        }
    }
    if out.as_os_str().is_empty() {
        return Err(PathError::NotFound(requested.to_string()));
    }
    Ok(out)
}

/// The file under `root` that `requested` names, after following symlinks; a symlink that
/// leads out of the root is refused unless it leads into one of `allowed` (Debian's `ipxe`
/// package links `/usr/lib/ipxe/ipxe.efi` to `/boot/ipxe.efi`). All paths must be canonical.
pub fn resolve(root: &Path, allowed: &[PathBuf], requested: &str) -> Result<PathBuf, PathError> {
    let rel = sanitize(requested)?;
    let full = root.join(rel).canonicalize().map_err(|_| PathError::NotFound(requested.to_string()))?;
    if !full.starts_with(root) && !allowed.iter().any(|a| full.starts_with(a)) {
        return Err(PathError::Escapes(requested.to_string()));
    }
    if !full.is_file() {
        return Err(PathError::NotAFile(requested.to_string()));
    }
    Ok(full)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_maps_and_refuses() {
        assert_eq!(sanitize("undionly.kpxe").unwrap(), PathBuf::from("undionly.kpxe"));
        assert_eq!(sanitize("/ipxe.efi").unwrap(), PathBuf::from("ipxe.efi"));
        assert_eq!(sanitize("//a/./b").unwrap(), PathBuf::from("a/b"));
        assert_eq!(sanitize("\\boot\\x.efi").unwrap(), PathBuf::from("boot/x.efi"));
        for bad in ["../etc/passwd", "a/../../b", "a/..", "..\\x", "/.."] {
            assert!(matches!(sanitize(bad), Err(PathError::Escapes(_))), "{bad}");
        }
        assert!(matches!(sanitize("a\nb"), Err(PathError::BadChar(_))));
        assert!(sanitize("/").is_err());
    }

    #[test]
    fn resolve_refuses_symlinks_out_of_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("ok.bin"), b"x").unwrap();
        std::fs::write(dir.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        std::os::unix::fs::symlink("ok.bin", root.join("inner")).unwrap();
        std::fs::create_dir(root.join("sub")).unwrap();
        let root = root.canonicalize().unwrap();
        assert!(resolve(&root, &[], "ok.bin").is_ok());
        assert!(resolve(&root, &[], "/inner").is_ok());
        assert!(matches!(resolve(&root, &[], "link"), Err(PathError::Escapes(_))));
        assert!(matches!(resolve(&root, &[], "missing"), Err(PathError::NotFound(_))));
        assert!(matches!(resolve(&root, &[], "sub"), Err(PathError::NotAFile(_))));
        // Only into a directory the configuration names.
        let outside = dir.path().canonicalize().unwrap();
        assert!(resolve(&root, &[outside], "link").is_ok());
        let elsewhere = std::env::temp_dir().join("pixie-no-such-dir");
        assert!(resolve(&root, &[elsewhere], "link").is_err());
    }
}
