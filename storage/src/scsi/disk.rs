//! The SCSI block command set of a virtual disk (what Linux's sd uses).

use super::{
    BlockOp, Command, MediaInfo, Outcome, Sense, ascii, be16, be32, be64, check_transfer, opcode,
    respond, rw_lba,
};

/// Most UNMAP descriptors accepted per command.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 64;

/// A disk LUN's command handling.
#[derive(Debug, Clone)]
pub struct DiskTarget {
    media: MediaInfo,
    /// Largest transfer in blocks (from the controller's max transfer).
    max_transfer_blocks: u32,
}

impl DiskTarget {
    pub fn new(media: MediaInfo, max_transfer_bytes: u32) -> Self {
        let max_transfer_blocks = max_transfer_bytes / media.block_size;
        DiskTarget {
            media,
            max_transfer_blocks,
        }
    }

    pub fn media(&self) -> &MediaInfo {
        &self.media
    }

    /// Serial number: the image's UUID as 32 hex digits.
    pub fn serial(&self) -> String {
        self.media
            .unique_id
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect()
    }

    /// NAA locally assigned identifier (type 3): 60 bits of the UUID.
    pub fn naa(&self) -> [u8; 8] {
        let mut id = [0u8; 8];
        id.copy_from_slice(&self.media.unique_id[8..]);
        id[0] = 0x30 | (id[0] & 0x0f);
        id
    }

    /// Logical blocks per physical block (1 when they are the same).
    fn logical_per_physical(&self) -> u32 {
        (self.media.physical_block_size / self.media.block_size.max(1))
            .clamp(1, 1 << 15)
            .next_power_of_two()
    }

    fn discard_usable(&self) -> bool {
        self.media.supports_discard && !self.media.read_only
    }

    /// Executes one CDB; response data goes to `out`.
    pub fn execute(&self, cmd: &Command<'_>, out: &mut [u8]) -> Outcome {
        let cdb = cmd.cdb;
        match cdb[0] {
            opcode::TEST_UNIT_READY
            | opcode::START_STOP_UNIT
            | opcode::PREVENT_ALLOW_MEDIUM_REMOVAL => Outcome::Good,
            opcode::INQUIRY => self.inquiry(cdb, out),
            opcode::REQUEST_SENSE => respond(out, &no_sense()),
            opcode::READ_CAPACITY_10 => self.read_capacity_10(out),
            opcode::SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == opcode::SA_READ_CAPACITY_16 => {
                self.read_capacity_16(out)
            }
            opcode::MODE_SENSE_6 | opcode::MODE_SENSE_10 => self.mode_sense(cdb, out),
            opcode::READ_6 | opcode::READ_10 | opcode::READ_12 | opcode::READ_16 => {
                self.rw(cmd, BlockOp::Read)
            }
            opcode::WRITE_6 | opcode::WRITE_10 | opcode::WRITE_12 | opcode::WRITE_16 => {
                self.rw(cmd, BlockOp::Write)
            }
            opcode::VERIFY_10 | opcode::VERIFY_12 | opcode::VERIFY_16 => self.verify(cdb),
            opcode::SYNCHRONIZE_CACHE_10 | opcode::SYNCHRONIZE_CACHE_16 => Outcome::Io {
                op: BlockOp::Flush,
                lba: 0,
                blocks: 0,
            },
            opcode::UNMAP if self.discard_usable() => self.unmap(cmd),
            opcode::WRITE_SAME_10 | opcode::WRITE_SAME_16 => self.write_same(cmd),
            _ if cdb[0] == opcode::UNMAP && self.media.read_only => {
                Outcome::Check(Sense::WRITE_PROTECTED)
            }
            _ => Outcome::Check(Sense::INVALID_COMMAND),
        }
    }

    fn rw(&self, cmd: &Command<'_>, op: BlockOp) -> Outcome {
        let (lba, blocks) = rw_lba(cmd.cdb);
        if op == BlockOp::Write && self.media.read_only {
            return Outcome::Check(Sense::WRITE_PROTECTED);
        }
        if let Err(s) = check_transfer(&self.media, lba, blocks, cmd.data_len) {
            return Outcome::Check(s);
        }
        if blocks == 0 {
            return Outcome::Good;
        }
        if blocks > self.max_transfer_blocks {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        Outcome::Io { op, lba, blocks }
    }

    fn verify(&self, cdb: &[u8]) -> Outcome {
        let (lba, blocks) = rw_lba(cdb);
        if lba
            .checked_add(u64::from(blocks))
            .is_none_or(|e| e > self.media.blocks)
        {
            return Outcome::Check(Sense::LBA_OUT_OF_RANGE);
        }
        Outcome::Good
    }

    fn inquiry(&self, cdb: &[u8], out: &mut [u8]) -> Outcome {
        let evpd = cdb[1] & 1 != 0;
        let page = cdb[2];
        if !evpd {
            if page != 0 {
                return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
            }
            return respond(out, &standard_inquiry(0x00, false, "Virtual Disk"));
        }
        match page {
            0x00 => {
                let pages: &[u8] = &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];
                let mut d = vec![0u8, 0x00, 0, pages.len() as u8];
                d.extend_from_slice(pages);
                respond(out, &d)
            }
            0x80 => {
                let serial = self.serial();
                let mut d = vec![0u8, 0x80, 0, serial.len() as u8];
                d.extend_from_slice(serial.as_bytes());
                respond(out, &d)
            }
            0x83 => respond(out, &self.device_identification()),
            0xb0 => respond(out, &self.block_limits()),
            0xb1 => {
                let mut d = [0u8; 64];
                d[1] = 0xb1;
                d[3] = 0x3c;
                d[5] = 0x01; // medium rotation rate 1: non-rotating
                respond(out, &d)
            }
            0xb2 => respond(out, &self.provisioning()),
            _ => Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
        }
    }

    fn device_identification(&self) -> Vec<u8> {
        let mut d = vec![0u8, 0x83, 0, 0];
        // NAA, binary, associated with the LUN.
        d.extend_from_slice(&[0x01, 0x03, 0x00, 8]);
        d.extend_from_slice(&self.naa());
        // T10 vendor id, ASCII: vendor then the serial.
        let serial = self.serial();
        d.extend_from_slice(&[0x02, 0x01, 0x00, (8 + serial.len()) as u8]);
        let mut vendor = [0u8; 8];
        ascii(&mut vendor, "Msft");
        d.extend_from_slice(&vendor);
        d.extend_from_slice(serial.as_bytes());
        let len = (d.len() - 4) as u16;
        d[2..4].copy_from_slice(&len.to_be_bytes());
        d
    }

    fn block_limits(&self) -> [u8; 64] {
        let mut d = [0u8; 64];
        d[1] = 0xb0;
        d[3] = 0x3c;
        d[4] = 0x01; // WSNZ: WRITE SAME of zero blocks is not allowed
        // Optimal transfer length granularity: one physical block.
        d[6..8].copy_from_slice(&(self.logical_per_physical() as u16).to_be_bytes());
        d[8..12].copy_from_slice(&self.max_transfer_blocks.to_be_bytes());
        d[12..16].copy_from_slice(&self.max_transfer_blocks.to_be_bytes());
        if self.discard_usable() {
            d[20..24].copy_from_slice(&u32::MAX.to_be_bytes()); // max unmap LBA count
            d[24..28].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            let granularity = 4096 / self.media.block_size;
            d[28..32].copy_from_slice(&granularity.to_be_bytes());
        }
        d[36..44].copy_from_slice(&u64::from(self.max_transfer_blocks).to_be_bytes()); // max WRITE SAME
        d
    }

    fn provisioning(&self) -> [u8; 8] {
        let mut d = [0u8; 8];
        d[1] = 0xb2;
        d[3] = 4;
        if self.discard_usable() {
            d[5] = 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
        }
        d[6] = if self.media.thin { 2 } else { 0 }; // provisioning type
        d
    }

    fn read_capacity_10(&self, out: &mut [u8]) -> Outcome {
        let last = self.media.blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
        let mut d = [0u8; 8];
        d[..4].copy_from_slice(&last.to_be_bytes());
        d[4..].copy_from_slice(&self.media.block_size.to_be_bytes());
        respond(out, &d)
    }

    fn read_capacity_16(&self, out: &mut [u8]) -> Outcome {
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&self.media.blocks.saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&self.media.block_size.to_be_bytes());
        // Logical blocks per physical block exponent.
        d[13] = self.logical_per_physical().trailing_zeros() as u8 & 0x0f;
        if self.media.thin || self.discard_usable() {
            d[14] = 0x80; // LBPME: logical block provisioning management
        }
        respond(out, &d)
    }

    fn mode_sense(&self, cdb: &[u8], out: &mut [u8]) -> Outcome {
        let ten = cdb[0] == opcode::MODE_SENSE_10;
        let dbd = cdb[1] & 0x08 != 0;
        let pc = cdb[2] >> 6;
        let page = cdb[2] & 0x3f;
        if pc == 3 {
            return Outcome::Check(Sense::SAVING_NOT_SUPPORTED);
        }
        if cdb[3] != 0 && cdb[3] != 0xff {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        let changeable = pc == 1;
        let mut pages = Vec::new();
        match page {
            0x08 => pages.extend_from_slice(&caching_page(changeable)),
            0x0a => pages.extend_from_slice(&control_page(changeable)),
            0x3f => {
                pages.extend_from_slice(&caching_page(changeable));
                pages.extend_from_slice(&control_page(changeable));
            }
            _ => return Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
        }
        let device_specific = if self.media.read_only { 0x80 } else { 0 };
        let desc = if dbd {
            Vec::new()
        } else {
            self.block_descriptor()
        };
        respond(out, &mode_data(ten, device_specific, &desc, &pages))
    }

    fn block_descriptor(&self) -> Vec<u8> {
        let mut d = vec![0u8; 8];
        let n = self.media.blocks.min(0xff_ffff) as u32;
        d[1..4].copy_from_slice(&n.to_be_bytes()[1..]);
        d[5..8].copy_from_slice(&self.media.block_size.to_be_bytes()[1..]);
        d
    }

    fn unmap(&self, cmd: &Command<'_>) -> Outcome {
        let param_len = be16(cmd.cdb, 7) as usize;
        if param_len == 0 {
            return Outcome::Good;
        }
        let data = &cmd.data_out[..param_len.min(cmd.data_out.len())];
        if data.len() < 8 {
            return Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let desc_len = be16(data, 2) as usize;
        if !desc_len.is_multiple_of(16) || 8 + desc_len > data.len() {
            return Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        if desc_len / 16 > MAX_UNMAP_DESCRIPTORS as usize {
            return Outcome::Check(Sense::INVALID_FIELD_IN_PARAMETERS);
        }
        let mut ranges = Vec::with_capacity(desc_len / 16);
        for d in data[8..8 + desc_len].chunks_exact(16) {
            let (lba, blocks) = (be64(d, 0), be32(d, 8));
            if lba
                .checked_add(u64::from(blocks))
                .is_none_or(|e| e > self.media.blocks)
            {
                return Outcome::Check(Sense::LBA_OUT_OF_RANGE);
            }
            if blocks > 0 {
                ranges.push((lba, blocks));
            }
        }
        Outcome::Discard(ranges)
    }

    fn write_same(&self, cmd: &Command<'_>) -> Outcome {
        let cdb = cmd.cdb;
        if self.media.read_only {
            return Outcome::Check(Sense::WRITE_PROTECTED);
        }
        let unmap = cdb[1] & 0x08 != 0;
        let (lba, blocks) = if cdb[0] == opcode::WRITE_SAME_10 {
            (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7)))
        } else {
            (be64(cdb, 2), be32(cdb, 10))
        };
        if blocks == 0 || u64::from(blocks) > u64::from(self.max_transfer_blocks) * 64 {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        if lba
            .checked_add(u64::from(blocks))
            .is_none_or(|e| e > self.media.blocks)
        {
            return Outcome::Check(Sense::LBA_OUT_OF_RANGE);
        }
        if unmap {
            if !self.discard_usable() {
                return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
            }
            return Outcome::Discard(vec![(lba, blocks)]);
        }
        if cmd.data_len != self.media.block_size {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        Outcome::WriteSame { lba, blocks }
    }
}

/// Standard INQUIRY data (36 bytes): SPC-4, HiSup, command queueing.
pub(crate) fn standard_inquiry(peripheral: u8, removable: bool, product: &str) -> [u8; 36] {
    let mut d = [0u8; 36];
    d[0] = peripheral;
    d[1] = if removable { 0x80 } else { 0 };
    d[2] = 0x06; // SPC-4: Linux must not put the LUN in CDB byte 1
    d[3] = 0x12; // HiSup, response data format 2
    d[4] = 31;
    d[7] = 0x02; // CmdQue
    ascii(&mut d[8..16], "Msft");
    ascii(&mut d[16..32], product);
    ascii(&mut d[32..36], "1.0");
    d
}

/// REQUEST SENSE data when nothing is pending.
pub(crate) fn no_sense() -> [u8; 18] {
    let mut d = [0u8; 18];
    d[0] = 0x70;
    d[7] = 10;
    d
}

fn caching_page(changeable: bool) -> [u8; 20] {
    let mut p = [0u8; 20];
    p[0] = 0x08;
    p[1] = 0x12;
    if !changeable {
        p[2] = 0x04; // WCE: a write cache, flushed by SYNCHRONIZE CACHE
    }
    p
}

fn control_page(_changeable: bool) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0] = 0x0a;
    p[1] = 0x0a;
    p
}

/// Mode parameter header (6 or 10 byte form) + descriptor + pages.
pub(crate) fn mode_data(ten: bool, device_specific: u8, desc: &[u8], pages: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + desc.len() + pages.len());
    if ten {
        let len = (6 + desc.len() + pages.len()) as u16;
        d.extend_from_slice(&len.to_be_bytes());
        d.extend_from_slice(&[0, device_specific, 0, 0]);
        d.extend_from_slice(&(desc.len() as u16).to_be_bytes());
    } else {
        let len = (3 + desc.len() + pages.len()) as u8;
        d.extend_from_slice(&[len, 0, device_specific, desc.len() as u8]);
    }
    d.extend_from_slice(desc);
    d.extend_from_slice(pages);
    d
}

#[cfg(test)]
mod tests;
