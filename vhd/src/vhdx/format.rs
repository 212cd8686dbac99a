//! VHDX on-disk structures (Microsoft's "VHDX Format Specification v1.00"):
//! the file type identifier, headers, region table, metadata table and
//! items, parent locator, BAT entries, and the log's entry header,
//! descriptors and data sectors. All fields are little endian; GUIDs are in
//! Microsoft's mixed-endian layout.
//!
//! Plain data over byte slices (zerocopy views) and the CRC-32C helpers;
//! nothing here touches files or panics on any input.

use zerocopy::byteorder::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
/// The header section: file identifier, two headers, two region tables.
pub const HEADER_SECTION: u64 = MIB;
/// Headers and region tables each sit in a 64 KiB slot.
pub const SLOT: u64 = 64 * KIB;
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
/// The CRC of a header covers this much (the structure is padded to it).
pub const HEADER_SIZE: usize = 4096;
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// Most entries a region or metadata table may hold.
pub const MAX_TABLE_ENTRIES: u32 = 2047;
/// The metadata table occupies the first 64 KiB of the metadata region.
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
/// Largest metadata item.
pub const MAX_METADATA_ITEM: u32 = MIB as u32;
/// Sector bitmap blocks are always 1 MiB: 2^23 bits, one per logical sector.
pub const SECTOR_BITMAP_BLOCK: u64 = MIB;
pub const SECTORS_PER_BITMAP_BLOCK: u64 = 1 << 23;
/// Log sectors (entry granularity) and metadata pages written through it.
pub const LOG_SECTOR: u64 = 4096;
/// Payload block sizes the format allows.
pub const MIN_BLOCK_SIZE: u32 = MIB as u32;
pub const MAX_BLOCK_SIZE: u32 = 256 * MIB as u32;
/// Largest virtual disk the format allows (64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Default block sizes: what Hyper-V picks (32 MiB dynamic, 2 MiB differencing).
pub const DEFAULT_BLOCK_SIZE: u32 = 32 * MIB as u32;
pub const DEFAULT_DIFF_BLOCK_SIZE: u32 = 2 * MIB as u32;
pub const DEFAULT_LOG_SIZE: u32 = MIB as u32;

pub const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
pub const HEADER_SIGNATURE: &[u8; 4] = b"head";
pub const REGION_SIGNATURE: &[u8; 4] = b"regi";
pub const METADATA_SIGNATURE: &[u8; 8] = b"metadata";
pub const LOG_SIGNATURE: &[u8; 4] = b"loge";
pub const DATA_DESC_SIGNATURE: &[u8; 4] = b"desc";
pub const ZERO_DESC_SIGNATURE: &[u8; 4] = b"zero";
pub const DATA_SECTOR_SIGNATURE: &[u8; 4] = b"data";

/// A GUID as stored: Data1 (u32), Data2, Data3 (u16) little endian, then
/// Data4 as 8 bytes.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(transparent)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    /// From the canonical fields (as written "data1-data2-data3-data4").
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Guid {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    /// A new random (version 4) GUID.
    pub fn random() -> std::io::Result<Guid> {
        let mut id = crate::format::new_uuid()?;
        // new_uuid sets the version nibble in big-endian order; Data3 is
        // stored little endian, so move it to the byte that holds it here.
        id[7] = (id[7] & 0x0f) | 0x40;
        Ok(Guid(id))
    }

    pub fn is_zero(&self) -> bool {
        self.0 == [0; 16]
    }

    fn fields(&self) -> (u32, u16, u16, [u8; 8]) {
        let b = &self.0;
        let mut d4 = [0u8; 8];
        d4.copy_from_slice(&b[8..]);
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            d4,
        )
    }

    /// Parses "{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}" (braces optional,
    /// any case).
    pub fn parse(text: &str) -> Option<Guid> {
        let t = text.trim().trim_start_matches('{').trim_end_matches('}');
        let parts: Vec<&str> = t.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if parts.len() != 5 || parts.iter().zip(lens).any(|(p, l)| p.len() != l) {
            return None;
        }
        let d1 = u32::from_str_radix(parts[0], 16).ok()?;
        let d2 = u16::from_str_radix(parts[1], 16).ok()?;
        let d3 = u16::from_str_radix(parts[2], 16).ok()?;
        let tail = format!("{}{}", parts[3], parts[4]);
        let mut d4 = [0u8; 8];
        for (i, byte) in d4.iter_mut().enumerate() {
            *byte = u8::from_str_radix(tail.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(Guid::from_fields(d1, d2, d3, d4))
    }

    /// "{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}", as parent locators hold it.
    pub fn braced(&self) -> String {
        format!("{{{self}}}")
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (d1, d2, d3, d4) = self.fields();
        write!(f, "{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-", d4[0], d4[1])?;
        d4[2..].iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

pub const BAT_REGION: Guid = Guid::from_fields(
    0x2dc2_7766,
    0xf623,
    0x4200,
    [0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08],
);
pub const METADATA_REGION: Guid = Guid::from_fields(
    0x8b7c_a206,
    0x4790,
    0x4b9a,
    [0xb8, 0xfe, 0x57, 0x5f, 0x05, 0x0f, 0x88, 0x6e],
);
pub const FILE_PARAMETERS: Guid = Guid::from_fields(
    0xcaa1_6737,
    0xfa36,
    0x4d43,
    [0xb3, 0xb6, 0x33, 0xf0, 0xaa, 0x44, 0xe7, 0x6b],
);
pub const VIRTUAL_DISK_SIZE: Guid = Guid::from_fields(
    0x2fa5_4224,
    0xcd1b,
    0x4876,
    [0xb2, 0x11, 0x5d, 0xbe, 0xd8, 0x3b, 0xf4, 0xb8],
);
pub const PAGE83_DATA: Guid = Guid::from_fields(
    0xbeca_12ab,
    0xb2e6,
    0x4523,
    [0x93, 0xef, 0xc3, 0x09, 0xe0, 0x00, 0xc7, 0x46],
);
pub const LOGICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0x8141_bf1d,
    0xa96f,
    0x4709,
    [0xba, 0x47, 0xf2, 0x33, 0xa8, 0xfa, 0xab, 0x5f],
);
pub const PHYSICAL_SECTOR_SIZE: Guid = Guid::from_fields(
    0xcda3_48c7,
    0x445d,
    0x4471,
    [0x9c, 0xc9, 0xe9, 0x88, 0x52, 0x51, 0xc5, 0x56],
);
pub const PARENT_LOCATOR: Guid = Guid::from_fields(
    0xa8d3_5f2d,
    0xb30b,
    0x454d,
    [0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab, 0x0c],
);
/// Locator type of a VHDX parent.
pub const VHDX_PARENT_TYPE: Guid = Guid::from_fields(
    0xb04a_efb7,
    0xd19e,
    0x4a81,
    [0xb7, 0x89, 0x25, 0xb8, 0xe9, 0x44, 0x59, 0x13],
);

/// The 4 KiB header (two copies, at 64 and 128 KiB).
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Header {
    pub signature: [u8; 4],
    pub checksum: U32,
    pub sequence_number: U64,
    pub file_write_guid: Guid,
    pub data_write_guid: Guid,
    pub log_guid: Guid,
    pub log_version: U16,
    pub version: U16,
    pub log_length: U32,
    pub log_offset: U64,
    pub reserved: [u8; 4016],
}

pub const HEADER_CHECKSUM_AT: usize = 4;

impl Header {
    /// Sets the checksum over the whole 4 KiB.
    pub fn seal(&mut self) {
        self.checksum.set(0);
        self.checksum.set(crc32c::crc32c(self.as_bytes()));
    }
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RegionTableHeader {
    pub signature: [u8; 4],
    pub checksum: U32,
    pub entry_count: U32,
    pub reserved: U32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RegionEntry {
    pub guid: Guid,
    pub file_offset: U64,
    pub length: U32,
    /// Bit 0: required (an implementation that does not know the region
    /// must refuse the file).
    pub flags: U32,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct MetadataTableHeader {
    pub signature: [u8; 8],
    pub reserved: U16,
    pub entry_count: U16,
    pub reserved2: [u8; 20],
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct MetadataEntry {
    pub item_id: Guid,
    /// From the start of the metadata region; at least 64 KiB when the
    /// item has a length.
    pub offset: U32,
    pub length: U32,
    /// Bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired.
    pub flags: U32,
    pub reserved: U32,
}

pub const META_IS_USER: u32 = 1;
pub const META_IS_VIRTUAL_DISK: u32 = 2;
pub const META_IS_REQUIRED: u32 = 4;

/// File parameters item flags.
pub const LEAVE_BLOCKS_ALLOCATED: u32 = 1;
pub const HAS_PARENT: u32 = 2;

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ParentLocatorHeader {
    pub locator_type: Guid,
    pub reserved: U16,
    pub key_value_count: U16,
}

#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ParentLocatorEntry {
    pub key_offset: U32,
    pub value_offset: U32,
    pub key_length: U16,
    pub value_length: U16,
}

/// Payload block states (low 3 bits of a payload BAT entry).
pub mod payload {
    pub const NOT_PRESENT: u64 = 0;
    pub const UNDEFINED: u64 = 1;
    pub const ZERO: u64 = 2;
    pub const UNMAPPED: u64 = 3;
    /// The value version 0.95 of the specification gave UNMAPPED; still
    /// read as such.
    pub const UNMAPPED_V095: u64 = 5;
    pub const FULLY_PRESENT: u64 = 6;
    pub const PARTIALLY_PRESENT: u64 = 7;
}

/// Sector bitmap block states.
pub mod bitmap_state {
    pub const NOT_PRESENT: u64 = 0;
    pub const PRESENT: u64 = 6;
}

/// State of a BAT entry.
pub fn bat_state(entry: u64) -> u64 {
    entry & 7
}

/// File offset a BAT entry points at (FileOffsetMB, in bytes).
pub fn bat_offset(entry: u64) -> u64 {
    (entry >> 20) << 20
}

/// A BAT entry for `state` at file offset `offset` (a multiple of 1 MiB).
pub fn bat_entry(state: u64, offset: u64) -> u64 {
    (offset & !(MIB - 1)) | (state & 7)
}

/// Log entry header (first 64 bytes of an entry).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct LogEntryHeader {
    pub signature: [u8; 4],
    /// CRC-32C over the whole entry (`entry_length` bytes) with this
    /// field zero.
    pub checksum: U32,
    pub entry_length: U32,
    /// Offset (from the start of the log) of the oldest entry of the
    /// sequence this entry ends that may not yet be applied.
    pub tail: U32,
    pub sequence_number: U64,
    pub descriptor_count: U32,
    pub reserved: U32,
    pub log_guid: Guid,
    /// The file's size when the entry was written, all of it durable.
    pub flushed_file_offset: U64,
    /// The size the file needs for every structure the entry refers to.
    pub last_file_offset: U64,
}

pub const LOG_HEADER_SIZE: usize = 64;
pub const LOG_CHECKSUM_AT: usize = 4;

/// A data ("desc") or zero ("zero") descriptor. For data, `word` holds the
/// trailing 4 bytes of the 4 KiB sector and `wide` the leading 8; for zero,
/// `word` is reserved and `wide` is the length to zero.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Descriptor {
    pub signature: [u8; 4],
    pub word: U32,
    pub wide: U64,
    pub file_offset: U64,
    pub sequence_number: U64,
}

pub const DESCRIPTOR_SIZE: usize = 32;
/// Descriptors in the first sector of an entry (after the header) and in
/// each following descriptor sector.
pub const FIRST_SECTOR_DESCRIPTORS: usize = 126;
pub const DESCRIPTORS_PER_SECTOR: usize = 128;

/// Sectors holding the header and `count` descriptors (at least one).
pub fn descriptor_sectors(count: u64) -> u64 {
    (count + 2).div_ceil(DESCRIPTORS_PER_SECTOR as u64)
}

/// CRC-32C of `bytes` with the 4 bytes at `at` taken as zero.
pub fn crc_with_hole(bytes: &[u8], at: usize) -> u32 {
    let (head, rest) = bytes.split_at(at.min(bytes.len()));
    let tail = rest.get(4..).unwrap_or(&[]);
    let crc = crc32c::crc32c(head);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, tail)
}

/// The stored little-endian checksum at `at`.
pub fn stored_crc(bytes: &[u8], at: usize) -> u32 {
    bytes
        .get(at..at + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Writes the CRC-32C of `bytes` (field at `at` zeroed) into that field.
pub fn seal_crc(bytes: &mut [u8], at: usize) {
    bytes[at..at + 4].fill(0);
    let crc = crc32c::crc32c(bytes);
    bytes[at..at + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Payload blocks per sector bitmap block.
pub fn chunk_ratio(logical_sector: u32, block_size: u32) -> u64 {
    SECTORS_PER_BITMAP_BLOCK * u64::from(logical_sector) / u64::from(block_size)
}

/// BAT entries a disk needs: payload entries with a sector bitmap entry
/// after every `chunk_ratio` of them (for a differencing disk, a bitmap
/// entry for every chunk; otherwise none after a final partial chunk).
pub fn bat_entries(virtual_size: u64, block_size: u32, logical_sector: u32, diff: bool) -> u64 {
    let blocks = virtual_size.div_ceil(u64::from(block_size));
    let ratio = chunk_ratio(logical_sector, block_size);
    if diff {
        blocks.div_ceil(ratio) * (ratio + 1)
    } else {
        blocks + blocks.saturating_sub(1) / ratio
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_specification() {
        assert_eq!(size_of::<Header>(), 4096);
        assert_eq!(std::mem::offset_of!(Header, sequence_number), 8);
        assert_eq!(std::mem::offset_of!(Header, file_write_guid), 16);
        assert_eq!(std::mem::offset_of!(Header, data_write_guid), 32);
        assert_eq!(std::mem::offset_of!(Header, log_guid), 48);
        assert_eq!(std::mem::offset_of!(Header, log_version), 64);
        assert_eq!(std::mem::offset_of!(Header, version), 66);
        assert_eq!(std::mem::offset_of!(Header, log_length), 68);
        assert_eq!(std::mem::offset_of!(Header, log_offset), 72);
        assert_eq!(size_of::<RegionTableHeader>(), 16);
        assert_eq!(size_of::<RegionEntry>(), 32);
        assert_eq!(std::mem::offset_of!(RegionEntry, file_offset), 16);
        assert_eq!(size_of::<MetadataTableHeader>(), 32);
        assert_eq!(std::mem::offset_of!(MetadataTableHeader, entry_count), 10);
        assert_eq!(size_of::<MetadataEntry>(), 32);
        assert_eq!(std::mem::offset_of!(MetadataEntry, flags), 24);
        assert_eq!(size_of::<ParentLocatorHeader>(), 20);
        assert_eq!(size_of::<ParentLocatorEntry>(), 12);
        assert_eq!(size_of::<LogEntryHeader>(), LOG_HEADER_SIZE);
        assert_eq!(std::mem::offset_of!(LogEntryHeader, tail), 12);
        assert_eq!(std::mem::offset_of!(LogEntryHeader, sequence_number), 16);
        assert_eq!(std::mem::offset_of!(LogEntryHeader, log_guid), 32);
        assert_eq!(
            std::mem::offset_of!(LogEntryHeader, flushed_file_offset),
            48
        );
        assert_eq!(std::mem::offset_of!(LogEntryHeader, last_file_offset), 56);
        assert_eq!(size_of::<Descriptor>(), DESCRIPTOR_SIZE);
        assert_eq!(std::mem::offset_of!(Descriptor, file_offset), 16);
    }

    #[test]
    fn guids_use_the_mixed_endian_layout() {
        // The BAT region GUID as the specification prints it, and its bytes
        // as they appear in every VHDX region table.
        assert_eq!(
            BAT_REGION.to_string(),
            "2dc27766-f623-4200-9d64-115e9bfd4a08"
        );
        assert_eq!(
            BAT_REGION.0,
            [
                0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd,
                0x4a, 0x08
            ]
        );
        assert_eq!(
            Guid::parse("{2DC27766-F623-4200-9D64-115E9BFD4A08}"),
            Some(BAT_REGION)
        );
        assert_eq!(Guid::parse(&BAT_REGION.braced()), Some(BAT_REGION));
        assert_eq!(Guid::parse("2dc27766-f623-4200-9d64"), None);
        let g = Guid::random().unwrap();
        assert_eq!(g.to_string().as_bytes()[14], b'4', "version 4: {g}");
    }

    #[test]
    fn crc32c_matches_the_castagnoli_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        let mut b = b"1234XXXX56789".to_vec();
        seal_crc(&mut b, 4);
        assert_eq!(stored_crc(&b, 4), crc_with_hole(&b, 4));
    }

    #[test]
    fn bat_geometry() {
        // 512-byte sectors, 32 MiB blocks: 128 payload blocks per chunk.
        assert_eq!(chunk_ratio(512, 32 << 20), 128);
        assert_eq!(chunk_ratio(4096, 1 << 20), 32768);
        // 10 GiB in 32 MiB blocks: 320 payload entries, two bitmap entries
        // between them.
        assert_eq!(bat_entries(10 << 30, 32 << 20, 512, false), 322);
        assert_eq!(bat_entries(10 << 30, 32 << 20, 512, true), 3 * 129);
        assert_eq!(bat_entries(128 << 25, 32 << 20, 512, false), 128);
        assert_eq!(descriptor_sectors(0), 1);
        assert_eq!(descriptor_sectors(126), 1);
        assert_eq!(descriptor_sectors(127), 2);
        assert_eq!(bat_entry(payload::FULLY_PRESENT, 3 << 20), (3 << 20) | 6);
        assert_eq!(bat_offset((3 << 20) | 6), 3 << 20);
    }
}
