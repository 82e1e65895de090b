//! An in-memory description of a filesystem tree: the common input of the cpio and tar writers.
//!
//! Paths are relative (`init`, `lib/modules/6.1.0/modules.dep`), `/`-separated, without `.` or
//! `..` components. Entries are kept sorted by path, so every archive written from a tree lists
//! its entries in the same order, parents before children.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{at, Error, Result};

/// Where the bytes of a regular file come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    Bytes(Vec<u8>),
    /// Read from this host path when the archive is written (follows symlinks).
    Host(PathBuf),
    /// Generated when the archive is written ([`crate::filler::FillerReader`] with this seed).
    Filler {
        seed: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File {
        data: Data,
        size: u64,
    },
    Symlink(String),
    /// A hard link to an earlier entry of the tree (tar only).
    HardLink(String),
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Permission bits including setuid/setgid/sticky (`0o7777`), no file type.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub kind: Kind,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    entries: BTreeMap<String, Entry>,
}

/// Normalises `/a//b/` to `a/b`; refuses `..`, `.` and empty paths.
pub fn normalize(path: &str) -> Result<String> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|p| *p == ".." || *p == ".") {
        return Err(Error::Invalid(format!("bad path in image tree: {path:?}")));
    }
    Ok(parts.join("/"))
}

impl Tree {
    pub fn new() -> Tree {
        Tree::default()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Entries in archive order (sorted by path bytes).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(p, e)| (p.as_str(), e))
    }

    /// Total bytes of regular files.
    pub fn file_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| match e.kind {
                Kind::File { size, .. } => size,
                _ => 0,
            })
            .sum()
    }

    /// Removes every entry whose path satisfies `doomed` (and, for directories, what is under
    /// them); returns how many entries went.
    pub fn remove_where(&mut self, doomed: impl Fn(&str) -> bool) -> usize {
        let roots: Vec<String> = self.entries.keys().filter(|p| doomed(p)).cloned().collect();
        let before = self.entries.len();
        self.entries.retain(|p, _| {
            !roots.iter().any(|r| p == r || (p.starts_with(r.as_str()) && p.as_bytes().get(r.len()) == Some(&b'/')))
        });
        before - self.entries.len()
    }

    /// Paths of the entries directly inside directory `dir`.
    pub fn children(&self, dir: &str) -> Vec<&str> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        self.entries
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(p, _)| p.as_str())
            .filter(|p| !p[prefix.len()..].contains('/'))
            .collect()
    }

    /// Inserts an entry, creating missing parent directories (0755, root).
    pub fn insert(&mut self, path: &str, entry: Entry) -> Result<()> {
        let path = normalize(path)?;
        let mut parent = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            match self.entries.get(&parent) {
                Some(Entry { kind: Kind::Dir, .. }) => {}
                Some(_) => return Err(Error::Invalid(format!("{parent} is not a directory (adding {path})"))),
                None => {
                    self.entries.insert(parent.clone(), Entry { mode: 0o755, uid: 0, gid: 0, kind: Kind::Dir });
                }
            }
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    pub fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        self.insert(path, Entry { mode, uid: 0, gid: 0, kind: Kind::Dir })
    }

    pub fn bytes(&mut self, path: &str, mode: u32, data: impl Into<Vec<u8>>) -> Result<()> {
        let data = data.into();
        let size = data.len() as u64;
        self.insert(path, Entry { mode, uid: 0, gid: 0, kind: Kind::File { data: Data::Bytes(data), size } })
    }

    /// A regular file whose content is read from `host` (symlinks followed) at write time.
    pub fn host_file(&mut self, path: &str, mode: u32, host: &Path) -> Result<()> {
        let meta = fs::metadata(host).map_err(at(host))?;
        if !meta.is_file() {
            return Err(Error::Invalid(format!("{} is not a regular file", host.display())));
        }
        let kind = Kind::File { data: Data::Host(host.to_path_buf()), size: meta.len() };
        self.insert(path, Entry { mode, uid: 0, gid: 0, kind })
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(path, Entry { mode: 0o777, uid: 0, gid: 0, kind: Kind::Symlink(target.to_string()) })
    }

    pub fn char_dev(&mut self, path: &str, mode: u32, major: u32, minor: u32) -> Result<()> {
        self.insert(path, Entry { mode, uid: 0, gid: 0, kind: Kind::CharDev { major, minor } })
    }

    /// Reads a directory tree from disk (not following symlinks), keeping modes, owners (as
    /// numbers), device numbers and hard links. Sockets are skipped.
    pub fn from_dir(root: &Path) -> Result<Tree> {
        let mut tree = Tree::new();
        let mut seen: BTreeMap<(u64, u64), String> = BTreeMap::new();
        let mut stack = vec![(root.to_path_buf(), String::new())];
        let mut found: BTreeMap<String, (PathBuf, fs::Metadata)> = BTreeMap::new();
        while let Some((dir, rel)) = stack.pop() {
            for item in fs::read_dir(&dir).map_err(at(&dir))? {
                let item = item.map_err(at(&dir))?;
                let name = item.file_name();
                let name = name
                    .to_str()
                    .ok_or_else(|| Error::Invalid(format!("non-UTF-8 file name in {}: {:?}", dir.display(), name)))?;
                let host = item.path();
                let meta = fs::symlink_metadata(&host).map_err(at(&host))?;
                let rel_path = if rel.is_empty() { name.to_string() } else { format!("{rel}/{name}") };
                if meta.is_dir() {
                    stack.push((host.clone(), rel_path.clone()));
                }
                found.insert(rel_path, (host, meta));
            }
        }
        // Sorted order makes the first path of a hard-linked inode the stored one.
        for (rel, (host, meta)) in found {
            let ft = meta.file_type();
            let (major, minor) = dev_split(meta.rdev());
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_symlink() {
                let target = fs::read_link(&host).map_err(at(&host))?;
                Kind::Symlink(
                    target.to_str().ok_or_else(|| Error::Invalid(format!("non-UTF-8 link {}", host.display())))?.to_string(),
                )
            } else if ft.is_file() {
                if meta.nlink() > 1 {
                    if let Some(first) = seen.get(&(meta.dev(), meta.ino())) {
                        let kind = Kind::HardLink(first.clone());
                        tree.entries.insert(rel, Entry { mode: meta.mode() & 0o7777, uid: meta.uid(), gid: meta.gid(), kind });
                        continue;
                    }
                    seen.insert((meta.dev(), meta.ino()), rel.clone());
                }
                Kind::File { data: Data::Host(host.clone()), size: meta.len() }
            } else if ft.is_char_device() {
                Kind::CharDev { major, minor }
            } else if ft.is_block_device() {
                Kind::BlockDev { major, minor }
            } else if ft.is_fifo() {
                Kind::Fifo
            } else {
                continue; // sockets
            };
            tree.entries.insert(rel, Entry { mode: meta.mode() & 0o7777, uid: meta.uid(), gid: meta.gid(), kind });
        }
        Ok(tree)
    }
}

/// Splits a Linux `dev_t` into major and minor numbers (glibc encoding).
pub fn dev_split(dev: u64) -> (u32, u32) {
    let major = ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff);
    let minor = ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff);
    (major as u32, minor as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_refuses_escapes() {
        assert_eq!(normalize("/a//b/").unwrap(), "a/b");
        assert!(normalize("a/../b").is_err());
        assert!(normalize("/").is_err());
        assert!(normalize("./a").is_err());
    }

    #[test]
    fn insert_creates_parents_in_order() {
        let mut t = Tree::new();
        t.bytes("lib/modules/x/a.ko", 0o644, b"x".to_vec()).unwrap();
        t.symlink("bin/sh", "busybox").unwrap();
        let paths: Vec<&str> = t.iter().map(|(p, _)| p).collect();
        assert_eq!(paths, ["bin", "bin/sh", "lib", "lib/modules", "lib/modules/x", "lib/modules/x/a.ko"]);
    }

    #[test]
    fn file_under_a_file_is_refused() {
        let mut t = Tree::new();
        t.bytes("a", 0o644, b"x".to_vec()).unwrap();
        assert!(t.bytes("a/b", 0o644, b"y".to_vec()).is_err());
    }

    #[test]
    fn remove_and_children() {
        let mut t = Tree::new();
        t.bytes("etc/ssh/ssh_host_rsa_key", 0o600, b"k".to_vec()).unwrap();
        t.bytes("etc/ssh/sshd_config", 0o644, b"c".to_vec()).unwrap();
        t.bytes("etc/sshd", 0o644, b"x".to_vec()).unwrap();
        t.bytes("var/log/x/y", 0o644, b"x".to_vec()).unwrap();
        assert_eq!(t.children("etc/ssh"), ["etc/ssh/ssh_host_rsa_key", "etc/ssh/sshd_config"]);
        assert_eq!(t.remove_where(|p| p.starts_with("etc/ssh/ssh_host_")), 1);
        assert_eq!(t.remove_where(|p| p == "var/log/x"), 2);
        assert!(t.get("etc/sshd").is_some());
        assert!(t.get("var/log").is_some());
    }

    #[test]
    fn dev_numbers() {
        assert_eq!(dev_split(0x0501), (5, 1));
        assert_eq!(dev_split(0xfe01), (254, 1));
    }
}
