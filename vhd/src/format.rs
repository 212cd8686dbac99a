//! VHD v1 on-disk structures: the footer, the dynamic disk header, parent
//! locators, the checksum, CHS geometry and the creator-dependent size rule.
//!
//! Everything here is plain data over byte slices (zerocopy views, big
//! endian); nothing touches files. Parsing checks cookies, versions and
//! checksums and returns [`ImageError`]s; it never panics on any input.

use crate::error::ImageError;
use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Sector size of the VHD format.
pub const SECTOR: u64 = 512;
/// Size of the footer (and of its copy at offset 0 of a dynamic disk).
pub const FOOTER_SIZE: usize = 512;
/// Size of the dynamic disk header.
pub const DYN_HEADER_SIZE: usize = 1024;
/// BAT entry value of a block that is not allocated.
pub const BAT_UNUSED: u32 = 0xFFFF_FFFF;
/// Default block size of dynamic and differencing disks (2 MiB).
pub const DEFAULT_BLOCK_SIZE: u32 = 2 << 20;
/// Largest virtual size the format can describe (2040 GiB, the limit the
/// specification and Hyper-V give for VHD).
pub const MAX_VIRTUAL_SIZE: u64 = 2040 << 30;
/// Largest CHS geometry: 65535 cylinders, 16 heads, 255 sectors per track.
pub const MAX_CHS_SECTORS: u64 = 65535 * 16 * 255;
/// Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00 UTC).
pub const VHD_EPOCH: u64 = 946_684_800;

pub const FOOTER_COOKIE: &[u8; 8] = b"conectix";
pub const DYN_COOKIE: &[u8; 8] = b"cxsparse";
/// Creator application written by this crate.
pub const CREATOR_APP: [u8; 4] = *b"vspa";

/// Disk type field of the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    Fixed,
    Dynamic,
    Differencing,
}

impl DiskType {
    pub fn from_raw(raw: u32) -> Result<Self, ImageError> {
        match raw {
            2 => Ok(Self::Fixed),
            3 => Ok(Self::Dynamic),
            4 => Ok(Self::Differencing),
            other => Err(ImageError::UnsupportedDiskType(other)),
        }
    }

    pub fn raw(self) -> u32 {
        match self {
            Self::Fixed => 2,
            Self::Dynamic => 3,
            Self::Differencing => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Fixed => "fixed",
            Self::Dynamic => "dynamic",
            Self::Differencing => "differencing",
        }
    }
}

/// The 512-byte hard disk footer.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Footer {
    pub cookie: [u8; 8],
    pub features: U32,
    pub version: U32,
    pub data_offset: U64,
    pub timestamp: U32,
    pub creator_app: [u8; 4],
    pub creator_version: U32,
    pub creator_os: [u8; 4],
    pub original_size: U64,
    pub current_size: U64,
    pub cylinders: U16,
    pub heads: u8,
    pub sectors_per_track: u8,
    pub disk_type: U32,
    pub checksum: U32,
    pub unique_id: [u8; 16],
    pub saved_state: u8,
    pub reserved: [u8; 427],
}

/// One of the eight parent locator entries of the dynamic header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Locator {
    pub platform_code: [u8; 4],
    pub data_space: U32,
    pub data_length: U32,
    pub reserved: U32,
    pub data_offset: U64,
}

/// The 1024-byte dynamic disk header.
#[derive(Debug, Clone, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DynHeader {
    pub cookie: [u8; 8],
    pub data_offset: U64,
    pub table_offset: U64,
    pub version: U32,
    pub max_table_entries: U32,
    pub block_size: U32,
    pub checksum: U32,
    pub parent_unique_id: [u8; 16],
    pub parent_timestamp: U32,
    pub reserved1: U32,
    pub parent_name: [u8; 512],
    pub locators: [Locator; 8],
    pub reserved2: [u8; 256],
}

/// One's complement of the byte sum, with the 4 checksum bytes counted as zero.
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !(checksum_at..checksum_at + 4).contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

/// Offset of the checksum field inside the footer.
pub const FOOTER_CHECKSUM_AT: usize = 64;
/// Offset of the checksum field inside the dynamic header.
pub const DYN_CHECKSUM_AT: usize = 36;

/// Cookie, checksum and version check shared by the footer and the header:
/// `bytes` must hold at least `size` bytes starting with `cookie`, whose
/// checksum (at `checksum_at`) matches and whose version (big-endian u32 at
/// `version_at`) has major version 1.
fn check_structure(
    bytes: &[u8],
    structure: &'static str,
    size: usize,
    cookie: &[u8; 8],
    checksum_at: usize,
    version_at: usize,
) -> Result<(), ImageError> {
    let raw = bytes.get(..size).ok_or(ImageError::TooSmall {
        what: structure,
        len: bytes.len() as u64,
    })?;
    if &raw[..8] != cookie {
        return Err(ImageError::BadCookie { structure });
    }
    let field = |at: usize| u32::from_be_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
    let (stored, computed) = (field(checksum_at), checksum(raw, checksum_at));
    if stored != computed {
        return Err(ImageError::BadChecksum {
            structure,
            stored,
            computed,
        });
    }
    let version = field(version_at);
    if version >> 16 != 1 {
        return Err(ImageError::BadVersion { structure, version });
    }
    Ok(())
}

impl Footer {
    /// Parses and validates a footer (cookie, version, checksum, disk type).
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageError> {
        check_structure(
            bytes,
            "footer",
            FOOTER_SIZE,
            FOOTER_COOKIE,
            FOOTER_CHECKSUM_AT,
            12,
        )?;
        let footer =
            Footer::read_from_bytes(&bytes[..FOOTER_SIZE]).map_err(|_| ImageError::TooSmall {
                what: "footer",
                len: bytes.len() as u64,
            })?;
        DiskType::from_raw(footer.disk_type.get())?;
        Ok(footer)
    }

    pub fn disk_type(&self) -> DiskType {
        // parse() validated the field; fall back to fixed for hand-built values.
        DiskType::from_raw(self.disk_type.get()).unwrap_or(DiskType::Fixed)
    }

    /// Recomputes and stores the checksum.
    pub fn seal(&mut self) {
        self.checksum.set(0);
        let sum = checksum(self.as_bytes(), FOOTER_CHECKSUM_AT);
        self.checksum.set(sum);
    }

    /// True when the checksum field matches the contents.
    pub fn checksum_ok(&self) -> bool {
        checksum(self.as_bytes(), FOOTER_CHECKSUM_AT) == self.checksum.get()
    }

    pub fn geometry(&self) -> Geometry {
        Geometry {
            cylinders: self.cylinders.get(),
            heads: self.heads,
            sectors_per_track: self.sectors_per_track,
        }
    }

    /// Creator application as text (trailing NULs and spaces trimmed).
    pub fn creator(&self) -> String {
        let app: String = self
            .creator_app
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    ' '
                }
            })
            .collect();
        app.trim_end().to_string()
    }

    /// The virtual disk size exactly as the creator field implies.
    ///
    /// Writers that store the exact size in `current_size` (Hyper-V "win ",
    /// qemu with force_size "qem2", Disk2vhd "d2v ", XenServer "CTXS" and
    /// blktap "tap\0", and this crate) are read by `current_size`; so is any
    /// disk whose geometry is at the CHS maximum. Everyone else (Virtual PC,
    /// plain qemu) sized the disk by its geometry, so the size is C*H*S*512.
    pub fn virtual_size(&self) -> u64 {
        let exact_creators: [&[u8; 4]; 6] =
            [b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0", &CREATOR_APP];
        let geometry = self.geometry();
        if exact_creators.contains(&&self.creator_app) || geometry.is_max() {
            self.current_size.get()
        } else {
            geometry.sectors() * SECTOR
        }
    }
}

impl DynHeader {
    /// Parses and validates a dynamic header (cookie, version, checksum).
    pub fn parse(bytes: &[u8]) -> Result<Self, ImageError> {
        check_structure(
            bytes,
            "dynamic disk header",
            DYN_HEADER_SIZE,
            DYN_COOKIE,
            DYN_CHECKSUM_AT,
            24,
        )?;
        let header = DynHeader::read_from_bytes(&bytes[..DYN_HEADER_SIZE]).map_err(|_| {
            ImageError::TooSmall {
                what: "dynamic disk header",
                len: bytes.len() as u64,
            }
        })?;
        Ok(header)
    }

    pub fn seal(&mut self) {
        self.checksum.set(0);
        let sum = checksum(self.as_bytes(), DYN_CHECKSUM_AT);
        self.checksum.set(sum);
    }

    /// Parent name from the UTF-16 big endian field, up to the first NUL.
    pub fn parent_name(&self) -> String {
        let units: Vec<u16> = self
            .parent_name
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        String::from_utf16_lossy(&units)
    }
}

/// CHS geometry of the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub cylinders: u16,
    pub heads: u8,
    pub sectors_per_track: u8,
}

impl Geometry {
    pub fn sectors(self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors_per_track)
    }

    pub fn is_max(self) -> bool {
        self.cylinders == 65535 && self.heads == 16 && self.sectors_per_track == 255
    }

    pub const MAX: Geometry = Geometry {
        cylinders: 65535,
        heads: 16,
        sectors_per_track: 255,
    };

    /// Geometry for a sector count, by the algorithm of the VHD specification
    /// (appendix "CHS calculation"); rounds down.
    pub fn for_sectors(total: u64) -> Geometry {
        let total = total.min(MAX_CHS_SECTORS);
        let (spt, heads, cyl_x_heads) = if total >= 65535 * 16 * 63 {
            (255u64, 16u64, total / 255)
        } else {
            let mut spt = 17;
            let mut cth = total / spt;
            let mut heads = cth.div_ceil(1024).max(4);
            if cth >= heads * 1024 || heads > 16 {
                spt = 31;
                heads = 16;
                cth = total / spt;
            }
            if cth >= heads * 1024 {
                spt = 63;
                heads = 16;
                cth = total / spt;
            }
            (spt, heads, cth)
        };
        Geometry {
            cylinders: (cyl_x_heads / heads).min(65535) as u16,
            heads: heads as u8,
            sectors_per_track: spt as u8,
        }
    }
}

/// Geometry to record for an exact size: the specification's geometry when
/// it describes the size exactly, else the CHS maximum, which readers
/// (qemu among them) take as "use current_size".
pub fn geometry_for_exact_size(size: u64) -> Geometry {
    let geometry = Geometry::for_sectors(size / SECTOR);
    if geometry.sectors() * SECTOR == size {
        geometry
    } else {
        Geometry::MAX
    }
}

/// Bytes of the sector bitmap in front of each block (rounded up to a sector).
pub fn bitmap_size(block_size: u32) -> u64 {
    let sectors = u64::from(block_size) / SECTOR;
    sectors.div_ceil(8).div_ceil(SECTOR) * SECTOR
}

/// Bytes of the BAT for `entries` entries (rounded up to a sector).
pub fn bat_size(entries: u32) -> u64 {
    (u64::from(entries) * 4).div_ceil(SECTOR) * SECTOR
}

/// Seconds since the VHD epoch, for the timestamp fields.
pub fn vhd_timestamp_now() -> u32 {
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(VHD_EPOCH);
    unix.saturating_sub(VHD_EPOCH).min(u64::from(u32::MAX)) as u32
}

/// Formats a 16-byte id as a UUID string.
pub fn format_uuid(id: &[u8; 16]) -> String {
    let h: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A new random (version 4) UUID.
pub fn new_uuid() -> std::io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    crate::file::random_bytes(&mut id)?;
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}

/// Encodes text as UTF-16 little endian (locator data as Windows writes it).
pub fn utf16le(text: &str) -> Vec<u8> {
    text.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// Decodes UTF-16 little endian locator data, stopping at a NUL.
pub fn from_utf16le(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_specification() {
        assert_eq!(size_of::<Footer>(), 512);
        assert_eq!(size_of::<DynHeader>(), 1024);
        assert_eq!(size_of::<Locator>(), 24);
        assert_eq!(std::mem::offset_of!(Footer, data_offset), 16);
        assert_eq!(std::mem::offset_of!(Footer, creator_app), 28);
        assert_eq!(std::mem::offset_of!(Footer, current_size), 48);
        assert_eq!(std::mem::offset_of!(Footer, cylinders), 56);
        assert_eq!(std::mem::offset_of!(Footer, disk_type), 60);
        assert_eq!(std::mem::offset_of!(Footer, checksum), FOOTER_CHECKSUM_AT);
        assert_eq!(std::mem::offset_of!(Footer, unique_id), 68);
        assert_eq!(std::mem::offset_of!(Footer, saved_state), 84);
        assert_eq!(std::mem::offset_of!(DynHeader, table_offset), 16);
        assert_eq!(std::mem::offset_of!(DynHeader, max_table_entries), 28);
        assert_eq!(std::mem::offset_of!(DynHeader, block_size), 32);
        assert_eq!(std::mem::offset_of!(DynHeader, checksum), DYN_CHECKSUM_AT);
        assert_eq!(std::mem::offset_of!(DynHeader, parent_unique_id), 40);
        assert_eq!(std::mem::offset_of!(DynHeader, parent_timestamp), 56);
        assert_eq!(std::mem::offset_of!(DynHeader, parent_name), 64);
        assert_eq!(std::mem::offset_of!(DynHeader, locators), 576);
        assert_eq!(std::mem::offset_of!(DynHeader, reserved2), 768);
    }

    /// A footer written byte by byte from the specification's table, with
    /// its checksum worked out by hand.
    #[test]
    fn parses_a_hand_built_footer() {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(b"conectix");
        b[8..12].copy_from_slice(&[0, 0, 0, 2]);
        b[12..16].copy_from_slice(&[0, 1, 0, 0]);
        b[16..24].copy_from_slice(&[0xff; 8]);
        b[28..32].copy_from_slice(b"win ");
        b[40..48].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[48..56].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[56..60].copy_from_slice(&[0, 30, 4, 17]);
        b[60..64].copy_from_slice(&[0, 0, 0, 2]);
        // Byte sum: cookie 0x35d ("conectix"), features 2, version 1,
        // data offset 8*0xff = 0x7f8, "win " 0x16e, sizes 2*0x10,
        // geometry 30+4+17 = 51, type 2.
        let sum: u32 = 0x35d + 2 + 1 + 0x7f8 + 0x16e + 0x20 + 51 + 2;
        b[64..68].copy_from_slice(&(!sum).to_be_bytes());
        let footer = Footer::parse(&b).expect("valid footer");
        assert_eq!(footer.disk_type(), DiskType::Fixed);
        assert_eq!(footer.current_size.get(), 1 << 20);
        assert_eq!(footer.virtual_size(), 1 << 20);
        assert_eq!(footer.creator(), "win");
        b[100] = 1;
        assert!(matches!(
            Footer::parse(&b),
            Err(ImageError::BadChecksum { .. })
        ));
    }

    #[test]
    fn size_follows_the_creator() {
        let mut b = [0u8; 512];
        b[0..8].copy_from_slice(b"conectix");
        b[12..16].copy_from_slice(&[0, 1, 0, 0]);
        b[28..32].copy_from_slice(b"vpc ");
        b[48..56].copy_from_slice(&(100u64 << 20).to_be_bytes());
        b[56..60].copy_from_slice(&[0, 100, 16, 63]);
        b[60..64].copy_from_slice(&[0, 0, 0, 3]);
        let mut footer = Footer::read_from_bytes(&b[..]).unwrap();
        assert_eq!(footer.virtual_size(), 100 * 16 * 63 * 512);
        footer.creator_app = *b"qem2";
        assert_eq!(footer.virtual_size(), 100 << 20);
        footer.creator_app = *b"qemu";
        footer.cylinders.set(65535);
        footer.heads = 16;
        footer.sectors_per_track = 255;
        assert_eq!(footer.virtual_size(), 100 << 20);
    }

    #[test]
    fn geometry_matches_known_values() {
        // qemu-img create -f vpc 64M rounds up to 964/8/17 = 67125248 bytes.
        let g = Geometry::for_sectors(131_104);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (964, 8, 17));
        let g = Geometry::for_sectors(131_072);
        assert_eq!((g.cylinders, g.heads, g.sectors_per_track), (963, 8, 17));
        assert_eq!(Geometry::for_sectors(u64::MAX), Geometry::MAX);
        assert_eq!(geometry_for_exact_size(67_125_248).sectors(), 131_104);
        assert!(geometry_for_exact_size(64 << 20).is_max());
    }

    #[test]
    fn bitmap_and_bat_sizes() {
        assert_eq!(bitmap_size(2 << 20), 512);
        assert_eq!(bitmap_size(512), 512);
        assert_eq!(bitmap_size(4 << 20), 1024);
        assert_eq!(bat_size(1), 512);
        assert_eq!(bat_size(128), 512);
        assert_eq!(bat_size(129), 1024);
    }

    #[test]
    fn uuid_text() {
        let id = [
            0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8,
        ];
        assert_eq!(format_uuid(&id), "12345678-9abc-def0-0102-030405060708");
    }
}
