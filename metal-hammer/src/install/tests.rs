//! Unit tests of the install sequence through [`RecordingSys`]: the disk is a sparse image file
//! (the GPT really is written to it), mkfs and mount are only recorded, so the image unpacks
//! into a temporary directory that stands for the mounted root.

use super::configure::tests::instructions;
use super::testing::{compress, sample_rootfs_tar, ImageServer};
use super::*;
use crate::sys::{Call, RecordingSys};
use metal_types::ImageFormat;
use std::io;
use std::time::Duration;

struct Fixture {
    _dir: tempfile::TempDir,
    disk: PathBuf,
    root: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(512 << 20).unwrap();
    let root = dir.path().join("target");
    Fixture { disk, root, _dir: dir }
}

fn fast() -> InstallOptions {
    InstallOptions {
        fetch: FetchOptions {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn position(calls: &[Call], pred: impl Fn(&Call) -> bool) -> usize {
    calls.iter().position(pred).unwrap_or_else(|| panic!("no such call in {calls:#?}"))
}

fn is_mkfs(c: &Call) -> bool {
    matches!(c, Call::Run { program, .. } if program.ends_with("mke2fs") || program.ends_with("mkfs.fat"))
}

#[test]
fn tar_install_order_and_result() {
    let f = fixture();
    let (z, sha) = compress(&sample_rootfs_tar());
    let server = ImageServer::start(z.clone()).unwrap();
    let instr = instructions(&server.url("test-os.tar.zst"), &sha, z.len() as u64, ImageFormat::TarZst);
    let sys = RecordingSys::new();
    let mut events = Vec::new();
    let boot = install_with(&sys, &instr, std::slice::from_ref(&f.disk), &f.root, &fast(), &mut |p| events.push(p)).unwrap();

    let calls = sys.calls();
    let reread = position(&calls, |c| matches!(c, Call::RereadPartitions { device } if device == &f.disk));
    let mkfs_root = position(&calls, |c| matches!(c, Call::Run { program, .. } if program.ends_with("mke2fs")));
    let mkfs_esp = position(&calls, |c| matches!(c, Call::Run { program, .. } if program.ends_with("mkfs.fat")));
    let mount_root = position(&calls, |c| matches!(c, Call::Mount { target, flags: 0, .. } if target == &f.root));
    let mount_esp = position(&calls, |c| matches!(c, Call::Mount { target, .. } if target == &f.root.join("boot/efi")));
    assert!(reread < mkfs_root && reread < mkfs_esp);
    assert!(mkfs_root.max(mkfs_esp) < mount_root);
    assert!(mount_root < mount_esp);
    // The end: ESP unmounted, root remounted read-only, sync.
    let n = calls.len();
    assert_eq!(calls[n - 3], Call::Umount { target: f.root.join("boot/efi") });
    assert!(
        matches!(&calls[n - 2], Call::Mount { target, flags, .. } if target == &f.root && *flags == libc::MS_REMOUNT | libc::MS_RDONLY)
    );
    assert_eq!(calls[n - 1], Call::Sync);

    // mkfs got the UUID that fstab and the command line use.
    let Call::Run { args, .. } = &calls[mkfs_root] else { unreachable!() };
    let uuid = &args[args.iter().position(|a| a == "-U").unwrap() + 1];
    assert_eq!(&boot.root_uuid, uuid);
    assert_eq!(boot.cmdline, format!("root=UUID={uuid} console=ttyS0 quiet"));
    assert!(std::fs::read_to_string(f.root.join("etc/fstab")).unwrap().contains(&format!("UUID={uuid}\t/\text4")));
    // Kernel and initrd resolved through their symlinks (one of them absolute) inside the root.
    assert_eq!(boot.kernel, f.root.join("boot/vmlinuz-6.1.0-test").display().to_string());
    assert_eq!(boot.initrd, f.root.join("boot/initrd.img-6.1.0-test").display().to_string());

    // The GPT really is on the disk image.
    let mut disk = std::fs::File::open(&f.disk).unwrap();
    let gpt = gptman::GPT::read_from(&mut disk, 512).unwrap();
    assert_eq!(gpt[1].starting_lba, 2048);
    assert_eq!(gpt[2].partition_name.as_str(), "root");

    // Unpacked and configured.
    assert_eq!(std::fs::read(f.root.join("usr/big.bin")).unwrap(), testing::sample_big_file());
    assert_eq!(std::fs::read_to_string(f.root.join("etc/hostname")).unwrap(), "web-1.example.org\n");
    assert!(f.root.join("etc/systemd/network/10-metal.network").is_file());

    // Stage markers in order, each started and finished.
    let stages: Vec<(Stage, StageStatus)> = events
        .iter()
        .filter_map(|e| match e {
            Progress::Stage { stage, status, .. } => Some((*stage, *status)),
            _ => None,
        })
        .collect();
    use StageStatus::{Ok as K, Start as S};
    assert_eq!(
        stages,
        [
            (Stage::Partition, S),
            (Stage::Partition, K),
            (Stage::Mkfs, S),
            (Stage::Mkfs, K),
            (Stage::Mount, S),
            (Stage::Mount, K),
            (Stage::Stream, S),
            (Stage::Stream, K),
            (Stage::Configure, S),
            (Stage::Configure, K)
        ]
    );
    let last = events.iter().rev().find_map(|e| match e {
        Progress::Stream(s) => Some(*s),
        _ => None,
    });
    let last = last.expect("stream progress");
    assert_eq!(last.downloaded, z.len() as u64);
    assert_eq!(last.total, z.len() as u64);
}

#[test]
fn nothing_is_mounted_when_mkfs_fails() {
    let f = fixture();
    let (z, sha) = compress(&sample_rootfs_tar());
    let server = ImageServer::start(z.clone()).unwrap();
    let instr = instructions(&server.url("i"), &sha, z.len() as u64, ImageFormat::TarZst);
    let sys = RecordingSys::new();
    sys.fail_when(|c| matches!(c, Call::Run { program, .. } if program.ends_with("mkfs.fat")));
    let err = install_with(&sys, &instr, std::slice::from_ref(&f.disk), &f.root, &fast(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, InstallError::Mkfs { kind: "vfat", .. }), "{err:?}");
    assert!(!sys.calls().iter().any(|c| matches!(c, Call::Mount { .. })));
    // The download starts before the disks are formatted (it runs ahead meanwhile); a failed
    // mkfs abandons it: one request at most, never a retry.
    assert!(server.ranges.lock().unwrap().len() <= 1, "the download was retried after the install failed");
}

#[test]
fn checksum_mismatch_fails_and_unmounts_everything() {
    let f = fixture();
    let (z, _) = compress(&sample_rootfs_tar());
    let server = ImageServer::start(z.clone()).unwrap();
    let wrong = "ab".repeat(32);
    let instr = instructions(&server.url("i"), &wrong, z.len() as u64, ImageFormat::TarZst);
    let sys = RecordingSys::new();
    let mut events = Vec::new();
    let err = install_with(&sys, &instr, std::slice::from_ref(&f.disk), &f.root, &fast(), &mut |p| events.push(p)).unwrap_err();
    assert!(matches!(&err, InstallError::Checksum { expected, .. } if expected == &wrong), "{err:?}");
    let calls = sys.calls();
    let mounts: Vec<_> =
        calls.iter().filter_map(|c| if let Call::Mount { target, .. } = c { Some(target.clone()) } else { None }).collect();
    let umounts: Vec<_> =
        calls.iter().filter_map(|c| if let Call::Umount { target } = c { Some(target.clone()) } else { None }).collect();
    assert_eq!(umounts, mounts.iter().rev().cloned().collect::<Vec<_>>());
    assert!(events.iter().any(|e| matches!(e, Progress::Stage { stage: Stage::Stream, status: StageStatus::Error, .. })));
    assert!(!events.iter().any(|e| matches!(e, Progress::Stage { stage: Stage::Configure, .. })));
}

const MIB: u64 = crate::wipe::MIB;

/// The recorded `ZeroRange`s on `disk`, as (offset, len).
fn zeroed(calls: &[Call], disk: &Path) -> Vec<(u64, u64)> {
    calls
        .iter()
        .filter_map(|c| {
            if let Call::ZeroRange { device, offset, len } = c {
                (device == disk).then_some((*offset, *len))
            } else {
                None
            }
        })
        .collect()
}

#[test]
fn tar_checksum_mismatch_clears_both_gpts_and_every_filesystem_head_after_unmounting() {
    let f = fixture();
    let (z, _) = compress(&sample_rootfs_tar());
    let server = ImageServer::start(z.clone()).unwrap();
    let instr = instructions(&server.url("i"), &"ab".repeat(32), z.len() as u64, ImageFormat::TarZst);
    let sys = RecordingSys::new();
    let err = install_with(&sys, &instr, std::slice::from_ref(&f.disk), &f.root, &fast(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, InstallError::Checksum { .. }), "{err:?}");
    // The table the install wrote (RecordingSys zeroes nothing, so it is still in the file).
    let mut disk = std::fs::File::open(&f.disk).unwrap();
    let gpt = gptman::GPT::read_from(&mut disk, 512).unwrap();
    let heads: Vec<(u64, u64)> = gpt
        .iter()
        .filter(|(_, p)| p.is_used())
        .map(|(_, p)| (p.starting_lba * 512, MIB.min((p.ending_lba - p.starting_lba + 1) * 512)))
        .collect();
    assert_eq!(heads.len(), instr.layout.disks[0].partitions.len());
    let size = 512 << 20;
    let mut expected = vec![(0, MIB), (size - MIB, MIB), (64 * MIB, 4096)];
    expected.extend(heads);
    let calls = sys.calls();
    assert_eq!(
        zeroed(&calls, &f.disk),
        expected,
        "MBR and primary GPT, backup GPT, the btrfs mirror, then each partition's first MiB"
    );
    // All of it after the last unmount (a mounted filesystem would write its superblock back),
    // then a sync and a re-read of the now empty table.
    let last_umount = calls.iter().rposition(|c| matches!(c, Call::Umount { .. })).unwrap();
    let first_zero = calls.iter().position(|c| matches!(c, Call::ZeroRange { .. })).unwrap();
    assert_eq!(calls[last_umount + 1], Call::Sync);
    assert_eq!(first_zero, last_umount + 2, "{calls:#?}");
    assert_eq!(&calls[first_zero + expected.len()..], [Call::Sync, Call::RereadPartitions { device: f.disk.clone() }]);
}

#[test]
fn a_failed_tar_download_also_clears_the_disk_and_a_failed_mkfs_too() {
    let f = fixture();
    let (z, sha) = compress(&sample_rootfs_tar());
    let server = ImageServer::start(z.clone()).unwrap();
    // Every response is cut before its first byte: the download gives up after two attempts.
    server.cut(0, u64::MAX / 2);
    let instr = instructions(&server.url("i"), &sha, z.len() as u64, ImageFormat::TarZst);
    let sys = RecordingSys::new();
    let mut opts = fast();
    opts.fetch.max_attempts = 2;
    let err = install_with(&sys, &instr, std::slice::from_ref(&f.disk), &f.root, &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(err, InstallError::Download(_)), "{err:?}");
    assert_eq!(zeroed(&sys.calls(), &f.disk)[..2], [(0, MIB), ((512 << 20) - MIB, MIB)]);

    let f = fixture();
    server.cut(0, 0);
    let sys = RecordingSys::new();
    sys.fail_when(|c| matches!(c, Call::Run { program, .. } if program.ends_with("mkfs.fat")));
    let err = install_with(&sys, &instr, std::slice::from_ref(&f.disk), &f.root, &fast(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, InstallError::Mkfs { .. }), "{err:?}");
    assert_eq!(zeroed(&sys.calls(), &f.disk)[..2], [(0, MIB), ((512 << 20) - MIB, MIB)]);
}

#[test]
fn fail_closed_ranges_cover_the_tables_and_each_partition_head() {
    let span = |start, len| PartitionSpan { number: 1, start, len, node: "/dev/vda1".into() };
    assert_eq!(
        fail_closed_ranges(8 * MIB, &[span(MIB, 4 * MIB), span(5 * MIB, 4096)]),
        [(0, MIB), (7 * MIB, MIB), (MIB, MIB), (5 * MIB, 4096)]
    );
    // A partition that claims to lie beyond the disk (a corrupt raw image's table) is cut to it.
    assert_eq!(
        fail_closed_ranges(8 * MIB, &[span(7 * MIB + 4096, 4 * MIB), span(9 * MIB, MIB)]),
        [(0, MIB), (7 * MIB, MIB), (7 * MIB + 4096, MIB - 4096)]
    );
}

#[test]
fn corrupted_bytes_are_a_checksum_error() {
    let f = fixture();
    let (mut z, sha) = compress(&sample_rootfs_tar());
    let mid = z.len() / 2;
    z[mid] ^= 0xff;
    z[mid + 1] ^= 0x55;
    let server = ImageServer::start(z.clone()).unwrap();
    let instr = instructions(&server.url("i"), &sha, z.len() as u64, ImageFormat::TarZst);
    let sys = RecordingSys::new();
    let err = install_with(&sys, &instr, std::slice::from_ref(&f.disk), &f.root, &fast(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, InstallError::Checksum { .. }), "{err:?}");
}

#[test]
fn dropped_connections_resume_with_range() {
    let f = fixture();
    let (z, sha) = compress(&sample_rootfs_tar());
    let server = ImageServer::start(z.clone()).unwrap();
    server.cut(100_000, 3);
    let instr = instructions(&server.url("i"), &sha, z.len() as u64, ImageFormat::TarZst);
    let sys = RecordingSys::new();
    install_with(&sys, &instr, std::slice::from_ref(&f.disk), &f.root, &fast(), &mut |_| {}).unwrap();
    let ranges = server.ranges.lock().unwrap().clone();
    assert_eq!(ranges, [None, Some("bytes=100000-".into()), Some("bytes=200000-".into()), Some("bytes=300000-".into())]);
    assert_eq!(std::fs::read(f.root.join("usr/big.bin")).unwrap(), testing::sample_big_file());
}

#[test]
fn server_ignoring_range_still_gives_a_correct_stream() {
    let f = fixture();
    let (z, sha) = compress(&sample_rootfs_tar());
    let server = ImageServer::start(z.clone()).unwrap();
    server.cut(70_000, 1);
    server.behaviour.ignore_range.store(true, Ordering::SeqCst);
    let instr = instructions(&server.url("i"), &sha, z.len() as u64, ImageFormat::TarZst);
    install_with(&RecordingSys::new(), &instr, std::slice::from_ref(&f.disk), &f.root, &fast(), &mut |_| {}).unwrap();
    assert_eq!(server.ranges.lock().unwrap().len(), 2);
}

#[test]
fn gives_up_after_bounded_retries() {
    let f = fixture();
    let (z, sha) = compress(&sample_rootfs_tar());
    let server = ImageServer::start(z.clone()).unwrap();
    // Every response is cut before its first byte: no progress, so the retries are counted.
    server.cut(0, u64::MAX / 2);
    let instr = instructions(&server.url("i"), &sha, z.len() as u64, ImageFormat::TarZst);
    let sys = RecordingSys::new();
    let mut opts = fast();
    opts.fetch.max_attempts = 3;
    let err = install_with(&sys, &instr, std::slice::from_ref(&f.disk), &f.root, &opts, &mut |_| {}).unwrap_err();
    assert!(matches!(err, InstallError::Download(FetchError::GaveUp { attempts: 3, .. })), "{err:?}");
    assert_eq!(server.ranges.lock().unwrap().len(), 3);
}

#[test]
fn invalid_manifest_touches_nothing() {
    let f = fixture();
    let instr = instructions("http://127.0.0.1:9/none", "not-a-digest", 1, ImageFormat::TarZst);
    let sys = RecordingSys::new();
    let err = install_with(&sys, &instr, std::slice::from_ref(&f.disk), &f.root, &fast(), &mut |_| {}).unwrap_err();
    assert!(matches!(err, InstallError::Invalid(_)));
    assert!(sys.calls().is_empty());
    let mut disk = std::fs::File::open(&f.disk).unwrap();
    assert!(gptman::GPT::read_from(&mut disk, 512).is_err());
}

#[test]
fn bootloader_hook_runs_in_a_chroot_with_bind_mounts() {
    let f = fixture();
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(10);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    tar.append_data(&mut h.clone(), "usr/local/sbin/metal-bootloader-hook", &b"#!/bin/sh\n"[..]).unwrap();
    h.set_mode(0o644);
    tar.append_data(&mut h, "boot/vmlinuz", &b"kernel...\n"[..]).unwrap();
    let (z, sha) = compress(&tar.into_inner().unwrap());
    let server = ImageServer::start(z.clone()).unwrap();
    let instr = instructions(&server.url("i"), &sha, z.len() as u64, ImageFormat::TarZst);
    let mut instr = instr;
    instr.image.manifest.initrd = String::new();
    let sys = RecordingSys::new();
    let boot = install_with(&sys, &instr, std::slice::from_ref(&f.disk), &f.root, &fast(), &mut |_| {}).unwrap();
    assert_eq!(boot.initrd, "");
    let calls = sys.calls();
    let chroot = position(&calls, |c| matches!(c, Call::RunInChroot { .. }));
    assert_eq!(
        calls[chroot],
        Call::RunInChroot {
            root: f.root.clone(),
            program: "/usr/local/sbin/metal-bootloader-hook".into(),
            args: vec![f.disk.display().to_string()]
        }
    );
    for d in ["dev", "proc", "sys"] {
        let m = position(
            &calls,
            |c| matches!(c, Call::Mount { target, flags, .. } if target == &f.root.join(d) && *flags == libc::MS_BIND),
        );
        let u = position(&calls, |c| matches!(c, Call::Umount { target } if target == &f.root.join(d)));
        assert!(m < chroot && chroot < u);
    }
    // Configuration is written before the hook runs (it may read install.json).
    assert!(f.root.join("etc/metal/install.json").is_file());
}

#[test]
fn resolve_in_root_stays_inside() {
    let dir = tempfile::tempdir().unwrap();
    let r = dir.path();
    std::fs::create_dir_all(r.join("boot")).unwrap();
    std::fs::write(r.join("boot/k-1"), b"k").unwrap();
    std::os::unix::fs::symlink("/boot/k-1", r.join("boot/abs")).unwrap();
    std::os::unix::fs::symlink("../../../../boot/k-1", r.join("boot/up")).unwrap();
    std::os::unix::fs::symlink("loop", r.join("boot/loop")).unwrap();
    assert_eq!(resolve_in_root(r, "boot/abs").unwrap(), r.join("boot/k-1"));
    assert_eq!(resolve_in_root(r, "/boot/up").unwrap(), r.join("boot/k-1"));
    assert!(resolve_in_root(r, "boot/loop").is_err());
}

#[test]
fn is_mkfs_helper_matches_tools() {
    assert!(is_mkfs(&Call::Run { program: "/usr/sbin/mke2fs".into(), args: vec![] }));
}

/// A sink that takes at most `short[i % len]` bytes per write, returns `Interrupted` on every
/// `interrupt_every`-th call, and fails with `EIO` on write number `fail_at` (or on flush).
#[derive(Default)]
struct FaultySink {
    data: Vec<u8>,
    short: Vec<usize>,
    interrupt_every: usize,
    fail_at: Option<usize>,
    fail_flush: bool,
    calls: usize,
    flushed: bool,
}

impl std::fmt::Debug for FaultySink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultySink")
            .field("written", &self.data.len())
            .field("short", &self.short)
            .field("interrupt_every", &self.interrupt_every)
            .field("fail_at", &self.fail_at)
            .field("fail_flush", &self.fail_flush)
            .finish()
    }
}

impl raw::Sink for FaultySink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.fail_at == Some(self.calls) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if self.interrupt_every > 0 && self.calls.is_multiple_of(self.interrupt_every) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let max = if self.short.is_empty() { buf.len() } else { self.short[self.calls % self.short.len()].max(1) };
        let n = buf.len().min(max);
        self.data.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush_durable(&mut self) -> io::Result<()> {
        if self.fail_flush {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.flushed = true;
        Ok(())
    }
}

/// A reader that hands out its data in the given chunk sizes.
struct ChunkyReader {
    data: Vec<u8>,
    pos: usize,
    chunks: Vec<usize>,
    i: usize,
}

impl io::Read for ChunkyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = self.chunks[self.i % self.chunks.len()].max(1);
        self.i += 1;
        let n = want.min(buf.len()).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn sink_strategy() -> impl proptest::strategy::Strategy<Value = FaultySink> {
    use proptest::prelude::*;
    (
        proptest::collection::vec(1usize..70_000, 1..6),
        (0usize..5).prop_map(|k| if k < 2 { 0 } else { k }),
        proptest::option::weighted(0.3, 1usize..40),
        proptest::bool::weighted(0.1),
    )
        .prop_map(|(short, interrupt_every, fail_at, fail_flush)| FaultySink {
            short,
            interrupt_every,
            fail_at,
            fail_flush,
            ..Default::default()
        })
}

fn patterned(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| ((i / 7) as u8).wrapping_mul(31).wrapping_add(seed) ^ (i % 13) as u8).collect()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Whatever the disk does with our writes, `write_raw` either put exactly the source on it
    /// and flushed it, or it failed (because a fault was injected).
    #[test]
    fn raw_writer_is_exact_or_fails(
        len in 0usize..300_000,
        seed in proptest::prelude::any::<u8>(),
        chunks in proptest::collection::vec(1usize..100_000, 1..5),
        mut sink in sink_strategy(),
    ) {
        let data = patterned(len, seed);
        let src = ChunkyReader { data: data.clone(), pos: 0, chunks, i: 0 };
        match raw::write_raw(src, &mut sink, u64::MAX, &mut |_| {}) {
            Ok(n) => {
                proptest::prop_assert_eq!(n as usize, data.len());
                proptest::prop_assert!(sink.data == data, "written bytes differ from the source");
                proptest::prop_assert!(sink.flushed);
            }
            Err(_) => proptest::prop_assert!(sink.fail_flush || sink.fail_at.is_some_and(|k| k <= sink.calls)),
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

    /// The whole raw stream (HTTP with cuts and resumes → SHA-256 → zstd → faulty disk): `Ok`
    /// only when the disk holds exactly the image and the digest matched; a corrupted download
    /// never gives `Ok`.
    #[test]
    fn raw_stream_digest_matches_or_install_fails(
        len in 1usize..400_000,
        seed in proptest::prelude::any::<u8>(),
        cut_at in 1u64..60_000,
        cuts in 0u64..3,
        corrupt in proptest::option::weighted(0.3, proptest::prelude::any::<proptest::sample::Index>()),
        mut sink in sink_strategy(),
    ) {
        let data = patterned(len, seed);
        let (mut z, sha) = compress(&data);
        if let Some(i) = &corrupt {
            let at = i.index(z.len());
            z[at] ^= 0x20;
        }
        let server = ImageServer::start(z.clone()).unwrap();
        server.cut(cut_at, cuts);
        let r = stream_raw_into(&server.url("x.raw.zst"), z.len() as u64, &sha, fast().fetch, &mut sink, u64::MAX, Path::new("test-sink"), &mut |_| {});
        match r {
            Ok(n) => {
                proptest::prop_assert!(corrupt.is_none(), "a corrupted image was accepted");
                proptest::prop_assert_eq!(n as usize, data.len());
                proptest::prop_assert!(sink.data == data);
            }
            Err(InstallError::Checksum { .. }) | Err(InstallError::Stream(_)) if corrupt.is_some() => {}
            Err(e) => {
                let injected = sink.fail_flush || sink.fail_at.is_some_and(|k| k <= sink.calls);
                proptest::prop_assert!(injected || corrupt.is_some(), "unexpected failure: {e:?}");
            }
        }
    }
}

#[test]
fn a_hook_that_hangs_is_killed() {
    if !metal_testkit::require(metal_testkit::is_root() && Path::new("/bin/sleep").exists(), "needs root and /bin/sleep") {
        return;
    }
    let t = std::time::Instant::now();
    let err = crate::sys::run_in_chroot_timeout(Path::new("/"), "/bin/sleep", &["30"], Duration::from_millis(300)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    assert!(t.elapsed() < Duration::from_secs(10));
    crate::sys::run_in_chroot_timeout(Path::new("/"), "/bin/true", &[], Duration::from_secs(10)).unwrap();
}

#[test]
fn the_trusted_cas_go_into_the_installed_os_for_phone_home() {
    use std::os::unix::fs::PermissionsExt;
    let (z, sha) = compress(&sample_rootfs_tar());
    let server = ImageServer::start(z.clone()).unwrap();
    let instr = instructions(&server.url("test-os.tar.zst"), &sha, z.len() as u64, ImageFormat::TarZst);
    for pem in [None, Some(b"-----BEGIN CERTIFICATE-----\nlab CA\n-----END CERTIFICATE-----\n".to_vec())] {
        let f = fixture();
        let opts = InstallOptions { ca_pem: pem.clone(), ..fast() };
        install_with(&RecordingSys::new(), &instr, std::slice::from_ref(&f.disk), &f.root, &opts, &mut |_| {}).unwrap();
        let path = f.root.join(crate::tls::INSTALLED_CA);
        match pem {
            None => assert!(!path.exists()),
            Some(pem) => {
                assert_eq!(std::fs::read(&path).unwrap(), pem);
                assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
            }
        }
    }
}
