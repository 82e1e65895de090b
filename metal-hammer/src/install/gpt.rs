//! The GPT partition table: a pure plan from the layout, then gptman writes it.
//!
//! [`plan`] turns one layout disk (its partitions), the disk size and the logical sector size into
//! exact LBAs: every partition starts on a 1 MiB boundary, sizes are whole MiB, `size_mib: 0`
//! means "the rest of the disk" and is allowed for the last partition only (its end is rounded
//! down to a 1 MiB boundary too). [`write`] puts that plan on a disk or image file with a
//! protective MBR and both GPT copies.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use metal_types::{GptPartition, GptType};
use uuid::Uuid;

const MIB: u64 = 1024 * 1024;
/// GPT entries we reserve (the usual 128 × 128 bytes).
const ENTRIES: u64 = 128;
const ENTRY_SIZE: u64 = 128;

/// The partition type GUID of a layout partition type.
pub fn type_guid(t: GptType) -> Uuid {
    let s = match t {
        GptType::Efi => "c12a7328-f81f-11d2-ba4b-00a0c93ec93b",
        GptType::Linux => "0fc63daf-8483-4772-8e79-3d69d8477de4",
        GptType::Swap => "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f",
        GptType::BiosBoot => "21686148-6e61-6e6f-744e-656564454649",
    };
    Uuid::parse_str(s).expect("constant GUID")
}

/// One partition with its final position, in logical sectors (inclusive range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPartition {
    pub number: u32,
    pub label: String,
    pub gpt_type: GptType,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl PlannedPartition {
    pub fn size_bytes(&self, sector_size: u64) -> u64 {
        (self.last_lba - self.first_lba + 1) * sector_size
    }
}

/// Where everything goes on one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GptPlan {
    pub sector_size: u64,
    pub total_sectors: u64,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    pub partitions: Vec<PlannedPartition>,
}

/// Why a layout does not fit a disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("logical sector size {0} is not supported (512 or 4096)")]
    SectorSize(u64),
    #[error("the layout has no partitions for this disk")]
    NoPartitions,
    #[error("partition number {0} is not between 1 and 128")]
    Number(u32),
    #[error("partition number {0} appears twice")]
    DuplicateNumber(u32),
    #[error("partition {0} has size 0 (the rest of the disk) but is not the last partition")]
    RestNotLast(u32),
    #[error("partition label {label:?} of partition {number} is longer than 36 UTF-16 units")]
    Label { number: u32, label: String },
    #[error("partition {number} does not fit: it needs up to sector {needed}, the last usable is {last_usable}")]
    TooSmall { number: u32, needed: u64, last_usable: u64 },
}

/// Places `parts` (in the order given) on a disk of `disk_bytes` with `sector_size`-byte
/// logical sectors.
pub fn plan(parts: &[GptPartition], disk_bytes: u64, sector_size: u64) -> Result<GptPlan, PlanError> {
    if sector_size != 512 && sector_size != 4096 {
        return Err(PlanError::SectorSize(sector_size));
    }
    if parts.is_empty() {
        return Err(PlanError::NoPartitions);
    }
    let total_sectors = disk_bytes / sector_size;
    let array_sectors = (ENTRIES * ENTRY_SIZE).div_ceil(sector_size);
    let first_usable_lba = 2 + array_sectors;
    // Protective MBR, primary header and array at the start; array and backup header at the end.
    let last_usable_lba = total_sectors.saturating_sub(2 + array_sectors);
    let align = MIB / sector_size;

    let mut seen = std::collections::HashSet::new();
    let mut next = first_usable_lba.div_ceil(align) * align;
    let mut out = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        if p.number == 0 || p.number > ENTRIES as u32 {
            return Err(PlanError::Number(p.number));
        }
        if !seen.insert(p.number) {
            return Err(PlanError::DuplicateNumber(p.number));
        }
        if p.label.encode_utf16().count() > 36 {
            return Err(PlanError::Label { number: p.number, label: p.label.clone() });
        }
        let first_lba = next;
        let last_lba = if p.size_mib == 0 {
            if i + 1 != parts.len() {
                return Err(PlanError::RestNotLast(p.number));
            }
            // Round the end down to a MiB boundary; it must leave at least one MiB.
            let end = (last_usable_lba + 1) / align * align;
            if end < first_lba + align {
                return Err(PlanError::TooSmall {
                    number: p.number,
                    needed: first_lba + align - 1,
                    last_usable: last_usable_lba,
                });
            }
            end - 1
        } else {
            let sectors = p.size_mib.saturating_mul(MIB / sector_size);
            first_lba.saturating_add(sectors) - 1
        };
        if last_lba > last_usable_lba || last_usable_lba == 0 {
            return Err(PlanError::TooSmall { number: p.number, needed: last_lba, last_usable: last_usable_lba });
        }
        out.push(PlannedPartition { number: p.number, label: p.label.clone(), gpt_type: p.gpt_type, first_lba, last_lba });
        next = (last_lba + 1).div_ceil(align) * align;
    }
    Ok(GptPlan { sector_size, total_sectors, first_usable_lba, last_usable_lba, partitions: out })
}

/// The device node of partition `number` of `disk`: `/dev/vda` → `/dev/vda1`, but a disk whose
/// name ends in a digit gets a `p`: `/dev/nvme0n1` → `/dev/nvme0n1p1`, `/dev/loop0` →
/// `/dev/loop0p1`, `/dev/mmcblk0` → `/dev/mmcblk0p1`.
pub fn partition_device(disk: &Path, number: u32) -> PathBuf {
    let s = disk.as_os_str().to_string_lossy();
    if s.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{s}p{number}"))
    } else {
        PathBuf::from(format!("{s}{number}"))
    }
}

/// The logical sector size of a block device (`BLKSSZGET`); 512 for regular files.
pub fn logical_sector_size(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    if !file.metadata()?.file_type().is_block_device() {
        return Ok(512);
    }
    let mut size: libc::c_int = 0;
    // BLKSSZGET = _IO(0x12, 104)
    const BLKSSZGET: libc::c_ulong = 0x1268;
    // SAFETY: BLKSSZGET writes one c_int through the pointer, which is valid for the call.
    let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(file), BLKSSZGET as _, &mut size) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size as u64)
}

/// Size in bytes of a disk or image file.
pub fn device_size(file: &mut File) -> io::Result<u64> {
    let size = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(size)
}

/// Writes `plan` to `target` (a disk or image file opened read-write): protective MBR, primary
/// GPT at the start and the backup at the end. Fresh random disk and partition GUIDs.
pub fn write<F: io::Read + io::Write + Seek>(target: &mut F, plan: &GptPlan) -> Result<(), gptman::Error> {
    let mut gpt = gptman::GPT::new_from(target, plan.sector_size, *Uuid::new_v4().as_bytes())?;
    gpt.align = MIB / plan.sector_size;
    debug_assert_eq!(gpt.header.first_usable_lba, plan.first_usable_lba);
    debug_assert_eq!(gpt.header.last_usable_lba, plan.last_usable_lba);
    for p in &plan.partitions {
        gpt[p.number] = gptman::GPTPartitionEntry {
            partition_type_guid: type_guid(p.gpt_type).to_bytes_le(),
            unique_partition_guid: Uuid::new_v4().to_bytes_le(),
            starting_lba: p.first_lba,
            ending_lba: p.last_lba,
            attribute_bits: 0,
            partition_name: p.label.as_str().into(),
        };
    }
    gptman::GPT::write_protective_mbr_into(target, plan.sector_size)?;
    gpt.write_into(target)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(number: u32, size_mib: u64, t: GptType) -> GptPartition {
        GptPartition { number, label: format!("p{number}"), size_mib, gpt_type: t }
    }

    #[test]
    fn plan_512_esp_and_rest() {
        let disk = 2048 * MIB;
        let p = plan(&[part(1, 64, GptType::Efi), part(2, 0, GptType::Linux)], disk, 512).unwrap();
        assert_eq!(p.first_usable_lba, 34);
        assert_eq!(p.last_usable_lba, disk / 512 - 34);
        assert_eq!(p.partitions[0].first_lba, 2048);
        assert_eq!(p.partitions[0].last_lba, 2048 + 64 * 2048 - 1);
        assert_eq!(p.partitions[1].first_lba, 2048 + 64 * 2048);
        // The rest ends on the last whole MiB before the backup GPT.
        assert_eq!(p.partitions[1].last_lba, disk / 512 - 2048 - 1);
        assert_eq!(p.partitions[1].size_bytes(512), disk - 65 * MIB - MIB);
    }

    #[test]
    fn plan_4096_aligns_to_256_sectors() {
        let disk = 1024 * MIB;
        let p =
            plan(&[part(1, 1, GptType::BiosBoot), part(2, 100, GptType::Linux), part(3, 0, GptType::Swap)], disk, 4096).unwrap();
        assert_eq!(p.first_usable_lba, 6);
        assert_eq!(p.last_usable_lba, disk / 4096 - 6);
        assert_eq!(p.partitions[0].first_lba, 256);
        assert_eq!(p.partitions[0].last_lba, 511);
        assert_eq!(p.partitions[1].first_lba, 512);
        assert_eq!(p.partitions[1].size_bytes(4096), 100 * MIB);
        for q in &p.partitions {
            assert_eq!(q.first_lba * 4096 % MIB, 0);
            assert_eq!((q.last_lba + 1) * 4096 % MIB, 0);
        }
    }

    #[test]
    fn plan_rejects_bad_layouts() {
        assert_eq!(plan(&[part(1, 10, GptType::Linux)], 100 * MIB, 520), Err(PlanError::SectorSize(520)));
        assert_eq!(plan(&[], 100 * MIB, 512), Err(PlanError::NoPartitions));
        assert_eq!(
            plan(&[part(1, 0, GptType::Linux), part(2, 1, GptType::Linux)], 100 * MIB, 512),
            Err(PlanError::RestNotLast(1))
        );
        assert_eq!(
            plan(&[part(1, 1, GptType::Linux), part(1, 1, GptType::Linux)], 100 * MIB, 512),
            Err(PlanError::DuplicateNumber(1))
        );
        assert_eq!(plan(&[part(0, 1, GptType::Linux)], 100 * MIB, 512), Err(PlanError::Number(0)));
        assert!(matches!(plan(&[part(1, 100, GptType::Linux)], 100 * MIB, 512), Err(PlanError::TooSmall { number: 1, .. })));
        assert!(matches!(
            plan(&[part(1, 98, GptType::Linux), part(2, 0, GptType::Linux)], 100 * MIB, 512),
            Err(PlanError::TooSmall { number: 2, .. })
        ));
        // Exactly fits: 100 MiB disk, 1 MiB at each end.
        assert!(plan(&[part(1, 98, GptType::Linux)], 100 * MIB, 512).is_ok());
        let long = GptPartition { number: 1, label: "x".repeat(37), size_mib: 1, gpt_type: GptType::Linux };
        assert!(matches!(plan(&[long], 100 * MIB, 512), Err(PlanError::Label { .. })));
    }

    #[test]
    fn partition_device_names() {
        assert_eq!(partition_device(Path::new("/dev/vda"), 1), Path::new("/dev/vda1"));
        assert_eq!(partition_device(Path::new("/dev/sdb"), 12), Path::new("/dev/sdb12"));
        assert_eq!(partition_device(Path::new("/dev/nvme0n1"), 2), Path::new("/dev/nvme0n1p2"));
        assert_eq!(partition_device(Path::new("/dev/loop0"), 1), Path::new("/dev/loop0p1"));
        assert_eq!(partition_device(Path::new("/dev/mmcblk0"), 3), Path::new("/dev/mmcblk0p3"));
    }

    #[test]
    fn written_table_reads_back_with_both_sector_sizes() {
        for ss in [512u64, 4096] {
            let disk = 256 * MIB;
            let p = plan(&[part(1, 32, GptType::Efi), part(2, 0, GptType::Linux)], disk, ss).unwrap();
            let mut cur = io::Cursor::new(vec![0u8; disk as usize]);
            write(&mut cur, &p).unwrap();
            let bytes = cur.get_ref();
            // Protective MBR signature and type 0xEE.
            assert_eq!(&bytes[510..512], &[0x55, 0xaa]);
            assert_eq!(bytes[446 + 4], 0xee);
            let gpt = gptman::GPT::read_from(&mut cur, ss).unwrap();
            assert_eq!(gpt.header.first_usable_lba, p.first_usable_lba);
            assert_eq!(gpt.header.last_usable_lba, p.last_usable_lba);
            assert_eq!(gpt[1].starting_lba, p.partitions[0].first_lba);
            assert_eq!(gpt[2].ending_lba, p.partitions[1].last_lba);
            assert_eq!(gpt[1].partition_type_guid, type_guid(GptType::Efi).to_bytes_le());
            assert_eq!(gpt[2].partition_name.as_str(), "p2");
            // The backup header is readable too (the last sector).
            cur.seek(SeekFrom::Start(disk - ss)).unwrap();
            let backup = gptman::GPTHeader::read_from(&mut cur).unwrap();
            assert_eq!(backup.primary_lba, disk / ss - 1);
        }
    }
}
