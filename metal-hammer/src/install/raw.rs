//! Raw disk images: the decompressed stream goes to the whole disk as it is, and the
//! filesystems' UUIDs are read back from their superblocks.
//!
//! # Durability contract of [`write_raw`]
//!
//! The device is opened `O_WRONLY | O_EXCL | O_CLOEXEC` (`O_EXCL` on a block device fails while
//! any partition of it is mounted or claimed), and on a block device a second time with
//! `O_DIRECT`. Data is written sequentially in 4 MiB blocks from a page-aligned buffer: whole
//! sectors of an aligned block go through the `O_DIRECT` descriptor (no page-cache copy), the
//! rest (the tail of an image that is not a whole number of blocks, anything after a short
//! write) through the buffered one, at the same explicit offsets (`pwrite`). A short write is
//! continued and an interrupted one retried; any other error ends the install. After the last
//! byte, `fsync` flushes the buffered data and the device's volatile write cache (which also
//! holds the direct writes), and `BLKFLSBUF` drops the device's cached pages so what is read
//! back (the partition table, the superblocks) comes from the disk. Only then is the write
//! reported done.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use metal_types::FsKind;

use super::gpt::partition_device;
use super::layout::vfat_uuid;
use crate::sys::PartitionSpan;

/// A sink for image bytes; [`write_raw`] needs only this, so tests can inject short and failed
/// writes.
pub trait Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Makes everything written durable.
    fn flush_durable(&mut self) -> io::Result<()>;
}

/// A disk or image file opened for [`write_raw`].
pub struct DeviceSink {
    file: File,
    /// `O_DIRECT` descriptor of a block device, and its logical sector size.
    direct: Option<(File, usize)>,
    block: bool,
    offset: u64,
}

impl DeviceSink {
    pub fn open(path: &Path) -> io::Result<DeviceSink> {
        let block = std::fs::metadata(path)?.file_type().is_block_device();
        let mut flags = libc::O_CLOEXEC;
        if block {
            flags |= libc::O_EXCL;
        }
        let file = OpenOptions::new().write(true).custom_flags(flags).open(path)?;
        let direct = if block {
            let sector = super::gpt::logical_sector_size(&file)? as usize;
            // Not fatal: a device that refuses O_DIRECT is written through the page cache.
            OpenOptions::new().write(true).custom_flags(libc::O_CLOEXEC | libc::O_DIRECT).open(path).ok().map(|f| (f, sector))
        } else {
            None
        };
        Ok(DeviceSink { file, direct, block, offset: 0 })
    }
}

impl Sink for DeviceSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = match &self.direct {
            Some((direct, sector))
                if (buf.as_ptr() as usize).is_multiple_of(ALIGN)
                    && buf.len() >= *sector
                    && self.offset.is_multiple_of(*sector as u64) =>
            {
                let whole = buf.len() - buf.len() % sector;
                direct.write_at(&buf[..whole], self.offset)?
            }
            _ => self.file.write_at(buf, self.offset)?,
        };
        self.offset += n as u64;
        Ok(n)
    }
    fn flush_durable(&mut self) -> io::Result<()> {
        self.file.sync_all()?;
        if self.block {
            // BLKFLSBUF = _IO(0x12, 97)
            const BLKFLSBUF: libc::c_ulong = 0x1261;
            // SAFETY: BLKFLSBUF takes no argument; the fd is open.
            if unsafe { libc::ioctl(self.file.as_raw_fd(), BLKFLSBUF as _, 0) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// Alignment of the write buffer: a page, enough for `O_DIRECT` on any logical sector size.
pub(crate) const ALIGN: usize = 4096;

#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; ALIGN]);

/// A zeroed buffer of `pages` pages whose start is page-aligned (for `O_DIRECT`).
pub(crate) struct AlignedBuf(Vec<Page>);

impl AlignedBuf {
    pub(crate) fn new(pages: usize) -> AlignedBuf {
        AlignedBuf(vec![Page([0; ALIGN]); pages])
    }

    pub(crate) fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: `Page` is a plain byte array with no padding; the slice covers exactly the
        // vector's initialised elements and lives no longer than the borrow of it.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), self.0.len() * ALIGN) }
    }
}

/// Reads from `src` until `buf` is full or `src` ends (so writes stay large); the bytes read.
pub(crate) fn fill<R: Read + ?Sized>(src: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match src.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Copies `src` to `sink` until `src` ends, then makes it durable. `progress` gets the bytes
/// written since its last call. Returns the number of bytes written.
pub fn write_raw<R: Read, S: Sink>(mut src: R, sink: &mut S, limit: u64, progress: &mut dyn FnMut(u64)) -> io::Result<u64> {
    let mut pages = AlignedBuf::new((4 << 20) / ALIGN);
    let buf = pages.bytes();
    let mut total = 0u64;
    loop {
        let filled = fill(&mut src, buf)?;
        if filled == 0 {
            break;
        }
        if total + filled as u64 > limit {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("the image is larger than the disk ({limit} bytes)")));
        }
        let mut done = 0;
        while done < filled {
            match sink.write(&buf[done..filled]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the disk accepted no more bytes")),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        total += filled as u64;
        progress(filled as u64);
    }
    sink.flush_durable()?;
    Ok(total)
}

/// After a raw image smaller than the disk: moves the backup GPT to the real end of the disk so
/// the table is valid (the partitions stay as the image has them). Returns the image's
/// partitions.
pub fn relocate_backup_gpt(device: &Path, sector_size: u64) -> Result<Vec<PartitionSpan>, gptman::Error> {
    let mut f = OpenOptions::new().read(true).write(true).open(device)?;
    let mut gpt = gptman::GPT::read_from(&mut f, sector_size)?;
    let len = f.seek(SeekFrom::End(0))? / sector_size;
    if gpt.header.backup_lba != len - 1 {
        gpt.header.update_from(&mut f, sector_size)?;
        gpt.write_into(&mut f)?;
        f.sync_all()?;
    }
    Ok(spans(&gpt, device, sector_size))
}

/// The used partitions of the GPT on `f` (the disk `device`).
pub fn read_partitions(f: &mut File, device: &Path, sector_size: u64) -> Result<Vec<PartitionSpan>, gptman::Error> {
    Ok(spans(&gptman::GPT::read_from(f, sector_size)?, device, sector_size))
}

fn spans(gpt: &gptman::GPT, device: &Path, sector_size: u64) -> Vec<PartitionSpan> {
    gpt.iter()
        .filter(|(_, p)| p.is_used())
        .map(|(n, p)| PartitionSpan {
            number: n,
            start: p.starting_lba.saturating_mul(sector_size),
            len: (p.ending_lba.saturating_sub(p.starting_lba) + 1).saturating_mul(sector_size),
            node: partition_device(device, n),
        })
        .collect()
}

/// Reads the UUID of the filesystem on `device` from its superblock, in the form fstab uses.
pub fn read_fs_uuid(device: &Path, kind: FsKind) -> io::Result<String> {
    let mut sb = Vec::with_capacity(8192);
    File::open(device)?.take(8192).read_to_end(&mut sb)?;
    uuid_from_superblock(&sb, kind).ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidData, format!("no {kind:?} filesystem found on {}", device.display()))
    })
}

/// The UUID in the first 8 KiB of a filesystem, if it is of `kind`.
pub fn uuid_from_superblock(sb: &[u8], kind: FsKind) -> Option<String> {
    match kind {
        FsKind::Ext4 => {
            // Superblock at 1024; s_magic at 0x38, s_uuid at 0x68.
            let s = sb.get(1024..1024 + 0x78)?;
            if u16::from_le_bytes([s[0x38], s[0x39]]) != 0xef53 {
                return None;
            }
            Some(uuid::Uuid::from_slice(&s[0x68..0x78]).ok()?.hyphenated().to_string())
        }
        FsKind::Vfat => {
            if sb.get(510..512)? != [0x55, 0xaa] {
                return None;
            }
            // FAT32 keeps the volume id at 0x43, FAT12/16 at 0x27.
            let at = if sb.get(0x52..0x57)? == b"FAT32" { 0x43 } else { 0x27 };
            let id = u32::from_le_bytes(sb.get(at..at + 4)?.try_into().ok()?);
            Some(vfat_uuid(id))
        }
        FsKind::Swap => {
            // "SWAPSPACE2" ends the first page (4 KiB on x86-64); the UUID is at 1024 + 12.
            if sb.get(4096 - 10..4096)? != b"SWAPSPACE2" {
                return None;
            }
            Some(uuid::Uuid::from_slice(sb.get(1036..1052)?).ok()?.hyphenated().to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ext4_superblock_uuid() {
        let mut sb = vec![0u8; 8192];
        sb[1024 + 0x38..1024 + 0x3a].copy_from_slice(&0xef53u16.to_le_bytes());
        let u = uuid::Uuid::new_v4();
        sb[1024 + 0x68..1024 + 0x78].copy_from_slice(u.as_bytes());
        assert_eq!(uuid_from_superblock(&sb, FsKind::Ext4), Some(u.hyphenated().to_string()));
        assert_eq!(uuid_from_superblock(&sb, FsKind::Vfat), None);
        assert_eq!(uuid_from_superblock(&vec![0u8; 8192], FsKind::Ext4), None);
    }

    #[test]
    fn fat32_volume_id() {
        let mut sb = vec![0u8; 8192];
        sb[510] = 0x55;
        sb[511] = 0xaa;
        sb[0x52..0x57].copy_from_slice(b"FAT32");
        sb[0x43..0x47].copy_from_slice(&0xabcd1234u32.to_le_bytes());
        assert_eq!(uuid_from_superblock(&sb, FsKind::Vfat).as_deref(), Some("ABCD-1234"));
    }
}
