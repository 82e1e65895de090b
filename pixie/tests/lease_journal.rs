//! The lease journal on a real file system that runs out of space: a write torn by `ENOSPC`
//! must not swallow the record appended after it. The file system is a 32 KiB tmpfs mounted on
//! a temporary directory by the test (root only) and unmounted on drop, also on panic.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use pixie::config::Mac;
use pixie::dhcp::leases::{Journal, LeaseTable, State};

struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        common::run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "pixie-test"]).arg(at));
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn lease(n: u32) -> (Ipv4Addr, Mac) {
    let b = n.to_be_bytes();
    (Ipv4Addr::new(10, 99, b[2], b[3]), Mac([2, 0, 0, b[1], b[2], b[3]]))
}

fn empty_table() -> LeaseTable {
    LeaseTable::new(HashMap::new(), HashSet::new())
}

#[test]
fn a_torn_write_on_a_full_disk_does_not_swallow_the_next_record() {
    if common::skip_unless_root("journal_torn_write") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("fs");
    let _fs = Tmpfs::mount(&mnt, "32k");
    // Six of the eight pages are taken, so the journal runs out of space after about 8 KiB.
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![0u8; 24 * 1024]).unwrap();
    let path = mnt.join("leases.json");
    let now = 1_000;
    let mut table = empty_table();
    let (mut journal, _) = Journal::open(&path, &mut table, now).unwrap();
    let mut written = Vec::new();
    let mut failed = false;
    for n in 1..1000 {
        let (ip, mac) = lease(n);
        let rec = table.bind(ip, mac, now + 3600);
        match journal.append(&[rec]).and_then(|()| journal.sync()) {
            Ok(_) => written.push(n),
            Err(_) => {
                failed = true;
                break;
            }
        }
    }
    assert!(failed, "the 32 KiB file system never filled up");
    assert!(written.len() > 50, "only {} records fit", written.len());

    // Space again; the next lease must be written and survive a restart.
    std::fs::remove_file(&filler).unwrap();
    let (ip, mac) = lease(5000);
    journal.append(&[table.bind(ip, mac, now + 3600)]).unwrap();
    journal.sync().unwrap();
    drop(journal);

    let mut again = empty_table();
    let (_, skipped) = Journal::open(&path, &mut again, now + 10).unwrap();
    let found =
        again.get(ip).unwrap_or_else(|| panic!("the lease appended after the torn write was lost (skipped lines: {skipped})"));
    assert_eq!((found.mac, found.state), (Some(mac), State::Bound));
    for n in written {
        let (ip, mac) = lease(n);
        assert_eq!(again.get(ip).map(|e| e.mac), Some(Some(mac)), "lease {n} lost");
    }
}
