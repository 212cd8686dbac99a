//! SCSI targets: the disk (SBC) and DVD (MMC) command sets a Linux guest's
//! sd and sr drivers use.
//!
//! A target decodes a CDB into an [`Outcome`]: response data built in a
//! caller buffer, block I/O for the worker to run on io_uring, or a CHECK
//! CONDITION with fixed-format sense. Targets know nothing about VMBus;
//! the storage worker moves the data between guest pages and the backend.

pub mod disk;
pub mod dvd;
pub mod sense;

pub use sense::Sense;

/// Operation codes used here.
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS_NOTIFICATION: u8 = 0x4a;
    pub const READ_DISC_INFORMATION: u8 = 0x51;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const VERIFY_12: u8 = 0xaf;
    pub const SET_CD_SPEED: u8 = 0xbb;
    pub const MECHANISM_STATUS: u8 = 0xbd;
    /// SERVICE ACTION IN(16) action READ CAPACITY(16).
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
}

/// SCSI status byte values.
pub mod status {
    pub const GOOD: u8 = 0x00;
    pub const CHECK_CONDITION: u8 = 0x02;
}

/// Largest response a target builds (REPORT LUNS for 256 LUNs is 2056).
pub const RESPONSE_BUFFER: usize = 4096;

/// Facts about a target's medium the command sets report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaInfo {
    pub block_size: u32,
    /// Physical block size (a power-of-two multiple of `block_size`, e.g.
    /// 4096 for a 512-byte-sector VHDX on 4 KiB sectors).
    pub physical_block_size: u32,
    pub blocks: u64,
    pub read_only: bool,
    pub supports_discard: bool,
    /// Thin provisioned (dynamic and differencing VHDs).
    pub thin: bool,
    /// Stable 16-byte identity (the VHD UUID): serial and NAA id derive
    /// from it.
    pub unique_id: [u8; 16],
}

/// A block operation the worker runs on the target's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    Read,
    Write,
    Flush,
}

/// What executing a CDB asks the worker to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// GOOD status, no data.
    Good,
    /// GOOD status; the first `len` bytes of the response buffer go to the
    /// guest (truncated to what it asked for).
    DataIn(usize),
    /// Block I/O of `blocks` blocks at `lba` with the guest's buffer.
    Io { op: BlockOp, lba: u64, blocks: u32 },
    /// Discard these (lba, blocks) ranges (UNMAP, WRITE SAME with UNMAP).
    Discard(Vec<(u64, u32)>),
    /// Write `blocks` copies of the single block the guest sent.
    WriteSame { lba: u64, blocks: u32 },
    /// CHECK CONDITION with this sense.
    Check(Sense),
}

/// A decoded command: the CDB and how much data the guest transfers.
#[derive(Debug, Clone, Copy)]
pub struct Command<'a> {
    pub cdb: &'a [u8],
    /// Bytes of the guest's data buffer (data-in or data-out).
    pub data_len: u32,
    /// For data-out commands whose parameters matter (UNMAP, MODE
    /// SELECT): the data the guest sent, copied out of its memory.
    pub data_out: &'a [u8],
}

/// Big-endian field readers over a CDB; out-of-range reads yield zero
/// (a CDB shorter than its opcode needs is caught before decoding).
pub(crate) fn be16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_be_bytes([s[0], s[1]]))
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_be_bytes(s.try_into().expect("8 bytes")))
}

/// Whether a command's data-out buffer is a parameter list the target reads
/// (UNMAP descriptors, MODE SELECT pages) rather than data for the medium.
pub fn has_parameter_list(opcode: u8) -> bool {
    matches!(
        opcode,
        opcode::UNMAP | opcode::MODE_SELECT_10 | opcode::MODE_SELECT_6
    )
}

/// CDB length implied by an opcode's group code.
pub fn cdb_length(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 0,
    }
}

/// A read or write CDB decoded: (lba, blocks).
pub(crate) fn rw_lba(cdb: &[u8]) -> (u64, u32) {
    match cdb[0] >> 5 {
        0 => {
            // READ/WRITE(6): 21-bit LBA, 0 blocks means 256.
            let lba = (u32::from(cdb[1] & 0x1f) << 16) | u32::from(be16(cdb, 2));
            let n = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
            (u64::from(lba), n)
        }
        1 => (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7))),
        5 => (u64::from(be32(cdb, 2)), be32(cdb, 6)),
        _ => (be64(cdb, 2), be32(cdb, 10)),
    }
}

/// Checks a transfer against the medium and the guest's buffer.
pub(crate) fn check_transfer(
    media: &MediaInfo,
    lba: u64,
    blocks: u32,
    data_len: u32,
) -> Result<(), Sense> {
    if lba
        .checked_add(u64::from(blocks))
        .is_none_or(|end| end > media.blocks)
    {
        return Err(Sense::LBA_OUT_OF_RANGE);
    }
    if u64::from(blocks) * u64::from(media.block_size) != u64::from(data_len) {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    Ok(())
}

/// Copies `src` into the response buffer, returning DataIn of its length.
pub(crate) fn respond(out: &mut [u8], src: &[u8]) -> Outcome {
    let n = src.len().min(out.len());
    out[..n].copy_from_slice(&src[..n]);
    Outcome::DataIn(n)
}

/// Writes a padded ASCII field.
pub(crate) fn ascii(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let b = s.as_bytes();
    let n = b.len().min(dst.len());
    dst[..n].copy_from_slice(&b[..n]);
}

/// REPORT LUNS data for `luns` (single-level addressing).
pub fn report_luns(out: &mut [u8], luns: &[u8]) -> Outcome {
    let len = 8 + 8 * luns.len();
    let len = len.min(out.len()) & !7;
    out[..len].fill(0);
    out[..4].copy_from_slice(&((8 * luns.len()) as u32).to_be_bytes());
    for (i, &lun) in luns.iter().enumerate().take((len - 8) / 8) {
        out[8 + i * 8 + 1] = lun;
    }
    Outcome::DataIn(len)
}

/// Standard INQUIRY data for a LUN that does not exist: peripheral
/// qualifier 3, type 0x1f, so the guest does not invent a device.
pub fn inquiry_no_lun(out: &mut [u8]) -> Outcome {
    let mut d = [0u8; 36];
    d[0] = 0x7f;
    d[2] = 0x06;
    d[3] = 0x12;
    d[4] = 31;
    respond(out, &d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rw_decoding() {
        assert_eq!(rw_lba(&[0x08, 0x1f, 0xff, 0xfe, 0, 0]), (0x1f_fffe, 256));
        assert_eq!(rw_lba(&[0x28, 0, 0, 0, 1, 0, 0, 0, 8, 0]), (256, 8));
        assert_eq!(rw_lba(&[0xa8, 0, 0, 0, 0, 9, 0, 1, 0, 0, 0, 0]), (9, 65536));
        let mut c16 = [0u8; 16];
        c16[0] = 0x88;
        c16[2..10].copy_from_slice(&0x1_0000_0000u64.to_be_bytes());
        c16[10..14].copy_from_slice(&7u32.to_be_bytes());
        assert_eq!(rw_lba(&c16), (0x1_0000_0000, 7));
        assert_eq!(cdb_length(0x88), 16);
        assert_eq!(cdb_length(0xa8), 12);
        assert_eq!(cdb_length(0x28), 10);
        assert_eq!(cdb_length(0x12), 6);
        assert_eq!(cdb_length(0xe0), 0);
    }

    #[test]
    fn report_luns_layout() {
        let mut out = [0xffu8; 64];
        assert_eq!(report_luns(&mut out, &[0, 3]), Outcome::DataIn(24));
        assert_eq!(
            &out[..24],
            &[
                0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0
            ]
        );
        assert_eq!(report_luns(&mut out, &[]), Outcome::DataIn(8));
        assert_eq!(&out[..8], &[0; 8]);
    }
}
