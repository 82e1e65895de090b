//! NVMe admin commands for wiping: Identify (what the controller can erase), Format NVM with a
//! secure-erase setting, and Sanitize (polled to completion), through `NVME_IOCTL_ADMIN_CMD`
//! on the namespace's block device. Parsing the Identify data is pure and unit-tested.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// `struct nvme_passthru_cmd` from `<linux/nvme_ioctl.h>` (72 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

const NVME_IOCTL_ID: libc::c_ulong = 0x4e40; // _IO('N', 0x40)
const NVME_IOCTL_ADMIN_CMD: libc::c_ulong = 0xc048_4e41; // _IOWR('N', 0x41, 72 bytes)
const OP_GET_LOG_PAGE: u8 = 0x02;
const OP_IDENTIFY: u8 = 0x06;
const OP_FORMAT_NVM: u8 = 0x80;
const OP_SANITIZE: u8 = 0x84;
const LOG_SANITIZE_STATUS: u32 = 0x81;

/// Secure Erase Settings of Format NVM.
pub const SES_USER_DATA: u8 = 1;
pub const SES_CRYPTO: u8 = 2;

/// Sanitize actions (SANACT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SanitizeAction {
    BlockErase = 2,
    Overwrite = 3,
    CryptoErase = 4,
}

/// What one namespace's controller can do to erase it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NvmeInfo {
    pub nsid: u32,
    /// The namespace's current LBA format index (kept by a format).
    pub lbaf: u8,
    /// OACS bit 1: Format NVM.
    pub format: bool,
    /// FNA bit 2: cryptographic erase as part of a format.
    pub format_crypto: bool,
    /// SANICAP bits 0–2.
    pub sanitize_crypto: bool,
    pub sanitize_block: bool,
    pub sanitize_overwrite: bool,
}

/// Parses Identify Controller (CNS 1) and Identify Namespace (CNS 0) data.
pub fn parse_identify(nsid: u32, ctrl: &[u8], ns: &[u8]) -> NvmeInfo {
    let byte = |b: &[u8], i: usize| b.get(i).copied().unwrap_or(0);
    let oacs = u16::from_le_bytes([byte(ctrl, 256), byte(ctrl, 257)]);
    let sanicap = u32::from_le_bytes([byte(ctrl, 328), byte(ctrl, 329), byte(ctrl, 330), byte(ctrl, 331)]);
    let fna = byte(ctrl, 524);
    let flbas = byte(ns, 26);
    NvmeInfo {
        nsid,
        lbaf: (flbas & 0x0f) | ((flbas >> 1) & 0x30),
        format: oacs & 0x2 != 0,
        format_crypto: fna & 0x4 != 0,
        sanitize_crypto: sanicap & 0x1 != 0,
        sanitize_block: sanicap & 0x2 != 0,
        sanitize_overwrite: sanicap & 0x4 != 0,
    }
}

/// The erase to use: a Format NVM (per namespace, synchronous) when supported — with crypto
/// erase when the controller offers it — else a Sanitize, else none (the caller discards).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvmeErase {
    Format { ses: u8 },
    Sanitize(SanitizeAction),
}

pub fn choose(info: &NvmeInfo) -> Option<NvmeErase> {
    if info.format {
        return Some(NvmeErase::Format { ses: if info.format_crypto { SES_CRYPTO } else { SES_USER_DATA } });
    }
    if info.sanitize_crypto {
        Some(NvmeErase::Sanitize(SanitizeAction::CryptoErase))
    } else if info.sanitize_block {
        Some(NvmeErase::Sanitize(SanitizeAction::BlockErase))
    } else if info.sanitize_overwrite {
        Some(NvmeErase::Sanitize(SanitizeAction::Overwrite))
    } else {
        None
    }
}

fn admin(file: &File, cmd: &mut PassthruCmd) -> io::Result<u32> {
    // SAFETY: cmd is a valid nvme_passthru_cmd; its addr/data_len describe a live buffer (or 0).
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), NVME_IOCTL_ADMIN_CMD as _, cmd as *mut PassthruCmd) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    if rc > 0 {
        return Err(io::Error::other(format!("NVMe admin command {:#04x} failed with status {rc:#x}", cmd.opcode)));
    }
    Ok(cmd.result)
}

fn read_page(file: &File, opcode: u8, nsid: u32, cdw10: u32, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut cmd = PassthruCmd {
        opcode,
        nsid,
        cdw10,
        addr: buf.as_mut_ptr() as u64,
        data_len: len as u32,
        timeout_ms: 10_000,
        ..Default::default()
    };
    admin(file, &mut cmd)?;
    Ok(buf)
}

/// Identify on a namespace block device (`/dev/nvme0n1`). `ENOTTY` when it is not NVMe.
pub fn identify(device: &Path) -> io::Result<NvmeInfo> {
    let file = File::open(device)?;
    // SAFETY: NVME_IOCTL_ID takes no argument.
    let nsid = unsafe { libc::ioctl(file.as_raw_fd(), NVME_IOCTL_ID as _) };
    if nsid < 0 {
        return Err(io::Error::last_os_error());
    }
    let ctrl = read_page(&file, OP_IDENTIFY, 0, 1, 4096)?;
    let ns = read_page(&file, OP_IDENTIFY, nsid as u32, 0, 4096)?;
    Ok(parse_identify(nsid as u32, &ctrl, &ns))
}

/// Format NVM of one namespace, keeping its LBA format; synchronous (up to `timeout`).
pub fn format(device: &Path, nsid: u32, lbaf: u8, ses: u8, timeout: Duration) -> io::Result<()> {
    let file = File::options().read(true).write(true).open(device)?;
    let cdw10 = u32::from(lbaf & 0x0f) | (u32::from(ses & 0x7) << 9) | (u32::from(lbaf & 0x30) << 8);
    let mut cmd = PassthruCmd {
        opcode: OP_FORMAT_NVM,
        nsid,
        cdw10,
        timeout_ms: timeout.as_millis().min(u32::MAX as u128) as u32,
        ..Default::default()
    };
    admin(&file, &mut cmd).map(|_| ())
}

/// Starts a Sanitize and polls the Sanitize Status log until it completes (or `timeout`).
pub fn sanitize(device: &Path, action: SanitizeAction, timeout: Duration) -> io::Result<()> {
    let file = File::options().read(true).write(true).open(device)?;
    let mut cmd = PassthruCmd { opcode: OP_SANITIZE, cdw10: action as u32, timeout_ms: 60_000, ..Default::default() };
    admin(&file, &mut cmd)?;
    let deadline = Instant::now() + timeout;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        // Get Log Page: NUMDL = dwords - 1 in bits 31:16, LID in 7:0; the status log is 512 bytes.
        let log = read_page(&file, OP_GET_LOG_PAGE, 0xffff_ffff, (127 << 16) | LOG_SANITIZE_STATUS, 512)?;
        match sanitize_state(&log) {
            SanitizeState::Done => return Ok(()),
            SanitizeState::Failed => return Err(io::Error::other("NVMe sanitize failed (sanitize status log)")),
            SanitizeState::Running => {}
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "NVMe sanitize did not finish in time"));
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum SanitizeState {
    Running,
    Done,
    Failed,
}

/// SSTAT (bytes 2–3) bits 2:0 of the Sanitize Status log: 1 or 4 done, 3 failed, else running.
pub fn sanitize_state(log: &[u8]) -> SanitizeState {
    match log.get(2).copied().unwrap_or(0) & 0x7 {
        1 | 4 => SanitizeState::Done,
        3 => SanitizeState::Failed,
        _ => SanitizeState::Running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passthru_struct_matches_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<PassthruCmd>(), 72);
        assert_eq!(NVME_IOCTL_ADMIN_CMD, (3 << 30) | (72 << 16) | ((b'N' as libc::c_ulong) << 8) | 0x41);
    }

    #[test]
    fn identify_parsing_and_choice() {
        let mut ctrl = vec![0u8; 4096];
        let mut ns = vec![0u8; 4096];
        ns[26] = 0x01; // LBA format 1
        assert_eq!(choose(&parse_identify(1, &ctrl, &ns)), None);
        ctrl[328] = 0x2; // block erase sanitize
        let info = parse_identify(1, &ctrl, &ns);
        assert_eq!((info.lbaf, info.sanitize_block, info.format), (1, true, false));
        assert_eq!(choose(&info), Some(NvmeErase::Sanitize(SanitizeAction::BlockErase)));
        ctrl[256] = 0x2; // format supported
        assert_eq!(choose(&parse_identify(1, &ctrl, &ns)), Some(NvmeErase::Format { ses: SES_USER_DATA }));
        ctrl[524] = 0x4; // crypto erase on format
        assert_eq!(choose(&parse_identify(1, &ctrl, &ns)), Some(NvmeErase::Format { ses: SES_CRYPTO }));
    }

    #[test]
    fn sanitize_status() {
        assert_eq!(sanitize_state(&[0, 0, 2, 0]), SanitizeState::Running);
        assert_eq!(sanitize_state(&[0, 0, 1, 0]), SanitizeState::Done);
        assert_eq!(sanitize_state(&[0, 0, 3, 0]), SanitizeState::Failed);
        assert_eq!(sanitize_state(&[]), SanitizeState::Running);
    }
}
