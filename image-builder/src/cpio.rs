//! A newc ("070701") cpio writer, the format the Linux kernel unpacks as an initramfs.
//!
//! Output is a function of the tree alone: entries in path order, inode numbers counted from 1,
//! mtime 0, owners as in the tree (root for everything we build), no device numbers for the
//! archive itself. Two builds from the same inputs give the same bytes.

use std::fs::File;
use std::io::{self, Read, Write};

use crate::tree::{Data, Entry, Kind, Tree};

const S_IFIFO: u32 = 0o010000;
const S_IFCHR: u32 = 0o020000;
const S_IFDIR: u32 = 0o040000;
const S_IFBLK: u32 = 0o060000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

const TRAILER: &str = "TRAILER!!!";

struct Header<'a> {
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    size: u32,
    rdev: (u32, u32),
    name: &'a str,
}

fn pad4<W: Write + ?Sized>(out: &mut W, len: usize) -> io::Result<()> {
    let pad = (4 - len % 4) % 4;
    out.write_all(&[0u8; 3][..pad])
}

fn write_header<W: Write + ?Sized>(out: &mut W, h: &Header) -> io::Result<()> {
    let namesize = h.name.len() + 1;
    let fields = [h.ino, h.mode, h.uid, h.gid, h.nlink, 0, h.size, 0, 0, h.rdev.0, h.rdev.1, namesize as u32, 0];
    let mut text = String::with_capacity(110);
    text.push_str("070701");
    for f in fields {
        text.push_str(&format!("{f:08X}"));
    }
    out.write_all(text.as_bytes())?;
    out.write_all(h.name.as_bytes())?;
    out.write_all(&[0])?;
    pad4(out, 110 + namesize)
}

fn too_big(path: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("{path}: larger than 4 GiB, cpio newc cannot hold it"))
}

/// Writes `tree` as a newc archive (with trailer) to `out`. Hard links are refused: the trees
/// we put into initramfs images have none.
pub fn write<W: Write + ?Sized>(tree: &Tree, out: &mut W) -> io::Result<()> {
    let mut ino = 0u32;
    for (path, entry) in tree.iter() {
        ino += 1;
        write_entry(out, ino, path, entry)?;
    }
    let trailer = Header { ino: 0, mode: 0, uid: 0, gid: 0, nlink: 1, size: 0, rdev: (0, 0), name: TRAILER };
    write_header(out, &trailer)
}

fn write_entry<W: Write + ?Sized>(out: &mut W, ino: u32, path: &str, entry: &Entry) -> io::Result<()> {
    let perm = entry.mode & 0o7777;
    let mut h = Header { ino, mode: perm, uid: entry.uid, gid: entry.gid, nlink: 1, size: 0, rdev: (0, 0), name: path };
    match &entry.kind {
        Kind::Dir => {
            h.mode |= S_IFDIR;
            h.nlink = 2;
            write_header(out, &h)
        }
        Kind::File { data, size } => {
            h.mode |= S_IFREG;
            h.size = u32::try_from(*size).map_err(|_| too_big(path))?;
            write_header(out, &h)?;
            match data {
                Data::Bytes(bytes) => out.write_all(bytes)?,
                Data::Host(host) => {
                    let file = File::open(host)?;
                    let copied = io::copy(&mut file.take(*size + 1), out)?;
                    if copied != *size {
                        return Err(io::Error::other(format!(
                            "{} changed size while archiving ({size} → {copied} bytes)",
                            host.display()
                        )));
                    }
                }
                Data::Filler { seed } => {
                    io::copy(&mut crate::filler::FillerReader::new(*seed, *size), out)?;
                }
            }
            pad4(out, *size as usize)
        }
        Kind::Symlink(target) => {
            h.mode |= S_IFLNK;
            h.size = target.len() as u32;
            write_header(out, &h)?;
            out.write_all(target.as_bytes())?;
            pad4(out, target.len())
        }
        Kind::CharDev { major, minor } => {
            h.mode |= S_IFCHR;
            h.rdev = (*major, *minor);
            write_header(out, &h)
        }
        Kind::BlockDev { major, minor } => {
            h.mode |= S_IFBLK;
            h.rdev = (*major, *minor);
            write_header(out, &h)
        }
        Kind::Fifo => {
            h.mode |= S_IFIFO;
            write_header(out, &h)
        }
        Kind::HardLink(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{path}: hard links are not supported in initramfs archives"),
        )),
    }
}

/// One member of a newc archive, as read back by [`list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Parses a newc archive up to its trailer: the reader used by tests and `image-builder` checks.
pub fn list(mut bytes: &[u8]) -> io::Result<Vec<Member>> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut members = Vec::new();
    let mut offset = 0usize;
    loop {
        if bytes.len() < 110 || &bytes[..6] != b"070701" {
            return Err(bad("missing newc header (or no trailer)"));
        }
        let field = |i: usize| -> io::Result<u32> {
            let s = std::str::from_utf8(&bytes[6 + i * 8..14 + i * 8]).map_err(|_| bad("header not ASCII"))?;
            u32::from_str_radix(s, 16).map_err(|_| bad("header field not hex"))
        };
        let (mode, uid, gid, mtime, size) = (field(1)?, field(2)?, field(3)?, field(5)?, field(6)? as usize);
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_end = 110 + namesize;
        if namesize == 0 || bytes.len() < name_end {
            return Err(bad("truncated name"));
        }
        let name = std::str::from_utf8(&bytes[110..name_end - 1]).map_err(|_| bad("name not UTF-8"))?.to_string();
        let data_start = name_end + (4 - (offset + name_end) % 4) % 4;
        let data_end = data_start + size;
        if bytes.len() < data_end {
            return Err(bad("truncated data"));
        }
        if name == TRAILER {
            return Ok(members);
        }
        members.push(Member { name, mode, uid, gid, mtime, rdev, data: bytes[data_start..data_end].to_vec() });
        let next = data_end + (4 - (offset + data_end) % 4) % 4;
        offset += next;
        bytes = &bytes[next.min(bytes.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Tree {
        let mut t = Tree::new();
        t.bytes("init", 0o755, b"#!/bin/sh\n".to_vec()).unwrap();
        t.bytes("etc/a", 0o644, b"12345".to_vec()).unwrap();
        t.symlink("bin/sh", "busybox").unwrap();
        t.char_dev("dev/console", 0o600, 5, 1).unwrap();
        t.dir("proc", 0o555).unwrap();
        t
    }

    #[test]
    fn round_trip_lists_every_member_in_order() {
        let mut out = Vec::new();
        write(&sample(), &mut out).unwrap();
        assert_eq!(out.len() % 4, 0);
        let members = list(&out).unwrap();
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/sh", "dev", "dev/console", "etc", "etc/a", "init", "proc"]);
        let init = &members[6];
        assert_eq!(init.mode, S_IFREG | 0o755);
        assert_eq!(init.data, b"#!/bin/sh\n");
        assert_eq!(members[1].mode, S_IFLNK | 0o777);
        assert_eq!(members[1].data, b"busybox");
        assert_eq!(members[3].mode, S_IFCHR | 0o600);
        assert_eq!(members[3].rdev, (5, 1));
        assert!(members.iter().all(|m| m.mtime == 0 && m.uid == 0 && m.gid == 0));
    }

    #[test]
    fn header_layout_matches_the_newc_spec() {
        let mut t = Tree::new();
        t.bytes("a", 0o644, b"xy".to_vec()).unwrap();
        let mut out = Vec::new();
        write(&t, &mut out).unwrap();
        let expected_header = "070701\
            00000001000081A4000000000000000000000001\
            00000000000000020000000000000000\
            000000000000000000000002\
            00000000";
        assert_eq!(&out[..110], expected_header.as_bytes());
        // name "a\0" ends at 112, already 4-aligned; then "xy" + 2 bytes of padding
        assert_eq!(&out[110..116], b"a\0xy\0\0");
        assert_eq!(&out[116..122], b"070701");
        assert!(out.ends_with(b"TRAILER!!!\0\0\0\0"));
    }

    #[test]
    fn same_tree_same_bytes() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        write(&sample(), &mut a).unwrap();
        write(&sample(), &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn hard_links_are_refused() {
        let mut t = Tree::new();
        t.insert("x", Entry { mode: 0o644, uid: 0, gid: 0, kind: Kind::HardLink("y".into()) }).unwrap();
        assert!(write(&t, &mut Vec::new()).is_err());
    }
}
