//! Creating VHDX images: fixed, dynamic and differencing (with a parent
//! locator naming the parent's DataWriteGuid and its relative and absolute
//! paths).
//!
//! Layout: the 1 MiB header section (file identifier, two headers, two
//! identical region tables), the log at 1 MiB, the 1 MiB metadata region,
//! the BAT, then (fixed disks) every payload block in order. Blocks of a
//! fixed disk are sparse until written.

use super::error::VhdxError;
use super::format::{
    self, BAT_REGION, DEFAULT_BLOCK_SIZE, DEFAULT_DIFF_BLOCK_SIZE, DEFAULT_LOG_SIZE,
    FILE_PARAMETERS, FILE_SIGNATURE, Guid, HAS_PARENT, HEADER_OFFSETS, HEADER_SECTION,
    HEADER_SIGNATURE, Header, LEAVE_BLOCKS_ALLOCATED, LOGICAL_SECTOR_SIZE, MAX_BLOCK_SIZE,
    MAX_VIRTUAL_SIZE, META_IS_REQUIRED, META_IS_VIRTUAL_DISK, METADATA_REGION, METADATA_SIGNATURE,
    MIB, MIN_BLOCK_SIZE, MetadataEntry, MetadataTableHeader, PAGE83_DATA, PARENT_LOCATOR,
    PHYSICAL_SECTOR_SIZE, ParentLocatorEntry, ParentLocatorHeader, REGION_SIGNATURE,
    REGION_TABLE_OFFSETS, REGION_TABLE_SIZE, RegionEntry, RegionTableHeader, VHDX_PARENT_TYPE,
    VIRTUAL_DISK_SIZE, bat_entry, payload, seal_crc,
};
use super::{VhdxDisk, VhdxKind};
use crate::create::{absolute_dir, create_file, relative_path, write_at};
use crate::error::ImageError;
use crate::file::CacheMode;
use crate::raw::DiskOptions;
use std::path::Path;
use zerocopy::{FromZeros, IntoBytes};

/// Size of the metadata region vspa writes.
const METADATA_REGION_SIZE: u64 = MIB;

/// Choices for a new VHDX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VhdxOptions {
    /// Payload block size; 0 picks the default (32 MiB, 2 MiB for
    /// differencing disks).
    pub block_size: u32,
    pub logical_sector: u32,
    pub physical_sector: u32,
    pub log_size: u32,
}

impl Default for VhdxOptions {
    fn default() -> Self {
        VhdxOptions {
            block_size: 0,
            logical_sector: 512,
            physical_sector: 4096,
            log_size: DEFAULT_LOG_SIZE,
        }
    }
}

impl VhdxOptions {
    fn check(&self) -> Result<(), VhdxError> {
        let b = self.block_size;
        if b != 0 && (!b.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&b)) {
            return Err(VhdxError::BadBlockSize(b));
        }
        for (which, value) in [
            ("logical", self.logical_sector),
            ("physical", self.physical_sector),
        ] {
            if value != 512 && value != 4096 {
                return Err(VhdxError::BadSectorSize { which, value });
            }
        }
        if self.log_size == 0 || !u64::from(self.log_size).is_multiple_of(MIB) {
            return Err(VhdxError::BadHeader(format!(
                "log size {} is not a non-zero multiple of 1 MiB",
                self.log_size
            )));
        }
        Ok(())
    }
}

/// What a differencing disk records about its parent.
struct ParentRef {
    pairs: Vec<(&'static str, String)>,
}

/// Creates a fixed or dynamic VHDX of `size` bytes.
pub fn create_vhdx(
    path: &Path,
    kind: VhdxKind,
    size: u64,
    options: &VhdxOptions,
) -> Result<(), ImageError> {
    if kind == VhdxKind::Differencing {
        return Err(ImageError::InvalidArgument(
            "a differencing VHDX needs a parent".into(),
        ));
    }
    let mut o = *options;
    if o.block_size == 0 {
        o.block_size = DEFAULT_BLOCK_SIZE;
    }
    write_image(path, kind, size, &o, None)
}

/// Creates a differencing VHDX over `parent` (a VHDX), with its size and
/// logical sector size.
pub fn create_differencing(
    path: &Path,
    parent: &Path,
    options: &VhdxOptions,
) -> Result<(), ImageError> {
    let ro = DiskOptions::default()
        .read_only(true)
        .cache(CacheMode::Cached);
    let p = VhdxDisk::open(parent, &ro)?;
    let pm = p.meta();
    let parent_abs = std::fs::canonicalize(parent).map_err(|e| ImageError::io(parent, e))?;
    let relative = relative_path(&absolute_dir(path)?, &parent_abs);
    let mut o = *options;
    o.logical_sector = pm.logical_sector;
    if o.block_size == 0 {
        o.block_size = DEFAULT_DIFF_BLOCK_SIZE;
    }
    let parent_ref = ParentRef {
        pairs: vec![
            ("parent_linkage", pm.header.data_write_guid.braced()),
            (
                "relative_path",
                format!(".\\{}", relative.display().to_string().replace('/', "\\")),
            ),
            // Backslashes: readers split the name off at the last one
            // (libvhdi looks for it next to the child).
            (
                "absolute_win32_path",
                parent_abs.display().to_string().replace('/', "\\"),
            ),
        ],
    };
    write_image(
        path,
        VhdxKind::Differencing,
        pm.virtual_size,
        &o,
        Some(parent_ref),
    )
}

fn write_image(
    path: &Path,
    kind: VhdxKind,
    size: u64,
    o: &VhdxOptions,
    parent: Option<ParentRef>,
) -> Result<(), ImageError> {
    o.check()?;
    if size == 0 || !size.is_multiple_of(u64::from(o.logical_sector)) || size > MAX_VIRTUAL_SIZE {
        return Err(VhdxError::BadVirtualSize {
            size,
            sector: o.logical_sector,
        }
        .into());
    }
    let diff = kind == VhdxKind::Differencing;
    let entries = format::bat_entries(size, o.block_size, o.logical_sector, diff);
    let log_offset = HEADER_SECTION;
    let meta_offset = log_offset + u64::from(o.log_size);
    let bat_offset = meta_offset + METADATA_REGION_SIZE;
    let bat_len = (entries * 8).next_multiple_of(MIB);
    let data_start = bat_offset + bat_len;
    let random = || Guid::random().map_err(|e| ImageError::io("getrandom", e));

    let file = create_file(path)?;
    let put = |bytes: &[u8], at: u64| write_at(&file, path, bytes, at);
    let mut id = vec![0u8; 520];
    id[..8].copy_from_slice(FILE_SIGNATURE);
    let creator = crate::format::utf16le(&format!("vspa {}", env!("CARGO_PKG_VERSION")));
    id[8..8 + creator.len()].copy_from_slice(&creator);
    put(&id, 0)?;

    let mut header = Header::new_zeroed();
    header.signature = *HEADER_SIGNATURE;
    header.file_write_guid = random()?;
    header.data_write_guid = random()?;
    header.version.set(1);
    header.log_length.set(o.log_size);
    header.log_offset.set(log_offset);
    for (i, at) in HEADER_OFFSETS.iter().enumerate() {
        header.sequence_number.set(i as u64 + 1);
        header.seal();
        put(header.as_bytes(), *at)?;
    }

    let mut table = vec![0u8; REGION_TABLE_SIZE];
    let rt = RegionTableHeader {
        signature: *REGION_SIGNATURE,
        checksum: 0.into(),
        entry_count: 2.into(),
        reserved: 0.into(),
    };
    table[..16].copy_from_slice(rt.as_bytes());
    for (i, (guid, offset, len)) in [
        (BAT_REGION, bat_offset, bat_len),
        (METADATA_REGION, meta_offset, METADATA_REGION_SIZE),
    ]
    .into_iter()
    .enumerate()
    {
        let e = RegionEntry {
            guid,
            file_offset: offset.into(),
            length: (len as u32).into(),
            flags: 1.into(),
        };
        table[16 + i * 32..48 + i * 32].copy_from_slice(e.as_bytes());
    }
    seal_crc(&mut table, 4);
    for at in REGION_TABLE_OFFSETS {
        put(&table, at)?;
    }

    put(&metadata(size, o, kind, &parent, random()?), meta_offset)?;

    let mut end = data_start;
    if kind == VhdxKind::Fixed {
        let blocks = size.div_ceil(u64::from(o.block_size));
        let ratio = format::chunk_ratio(o.logical_sector, o.block_size);
        let mut bat = vec![0u8; entries as usize * 8];
        for b in 0..blocks {
            let index = (b + b / ratio) as usize;
            let e = bat_entry(payload::FULLY_PRESENT, end);
            bat[index * 8..index * 8 + 8].copy_from_slice(&e.to_le_bytes());
            end += u64::from(o.block_size);
        }
        put(&bat, bat_offset)?;
    }
    file.set_len(end).map_err(|e| ImageError::io(path, e))?;
    file.sync_all().map_err(|e| ImageError::io(path, e))
}

/// The metadata region: table, then the items from 64 KiB.
fn metadata(
    size: u64,
    o: &VhdxOptions,
    kind: VhdxKind,
    parent: &Option<ParentRef>,
    page83: Guid,
) -> Vec<u8> {
    let mut flags = 0;
    if kind == VhdxKind::Fixed {
        flags |= LEAVE_BLOCKS_ALLOCATED;
    }
    if parent.is_some() {
        flags |= HAS_PARENT;
    }
    let mut params = o.block_size.to_le_bytes().to_vec();
    params.extend_from_slice(&flags.to_le_bytes());
    let required = META_IS_REQUIRED;
    let disk = META_IS_REQUIRED | META_IS_VIRTUAL_DISK;
    let mut items: Vec<(Guid, u32, Vec<u8>)> = vec![
        (FILE_PARAMETERS, required, params),
        (VIRTUAL_DISK_SIZE, disk, size.to_le_bytes().to_vec()),
        (PAGE83_DATA, disk, page83.0.to_vec()),
        (
            LOGICAL_SECTOR_SIZE,
            disk,
            o.logical_sector.to_le_bytes().to_vec(),
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            disk,
            o.physical_sector.to_le_bytes().to_vec(),
        ),
    ];
    if let Some(p) = parent {
        items.push((PARENT_LOCATOR, required, locator(&p.pairs)));
    }
    let mut region = vec![0u8; 64 * 1024];
    let header = MetadataTableHeader {
        signature: *METADATA_SIGNATURE,
        reserved: 0.into(),
        entry_count: (items.len() as u16).into(),
        reserved2: [0; 20],
    };
    region[..32].copy_from_slice(header.as_bytes());
    for (i, (guid, flags, data)) in items.into_iter().enumerate() {
        let e = MetadataEntry {
            item_id: guid,
            offset: (region.len() as u32).into(),
            length: (data.len() as u32).into(),
            flags: flags.into(),
            reserved: 0.into(),
        };
        region[32 + i * 32..64 + i * 32].copy_from_slice(e.as_bytes());
        region.extend_from_slice(&data);
        region.resize(region.len().next_multiple_of(8), 0);
    }
    region
}

/// The metadata pages (4 KiB, with their file offsets) that give the
/// image `meta` of `file` the parent locator `pairs`: the item rewritten in
/// place, or after the last item when it grew, and its table entry.
pub(super) fn locator_pages(
    file: &crate::file::IoFile,
    meta: &super::VhdxMeta,
    pairs: &[(String, String)],
) -> Result<Vec<(u64, Vec<u8>)>, ImageError> {
    use zerocopy::FromBytes;
    let (base, region_len) = meta.metadata_region;
    let mut region = vec![0u8; region_len as usize];
    file.read_exact_at(&mut region, base)?;
    let count = MetadataTableHeader::read_from_prefix(&region)
        .map(|(h, _)| usize::from(h.entry_count.get()))
        .unwrap_or(0);
    let entry = |i: usize| MetadataEntry::read_from_prefix(&region[32 + i * 32..]).map(|(e, _)| e);
    let mut at = None;
    let mut items_end = 64 * 1024;
    for i in 0..count {
        let e = entry(i).map_err(|_| VhdxError::BadMetadata("table".into()))?;
        items_end = items_end.max((e.offset.get() + e.length.get()) as usize);
        if e.item_id == PARENT_LOCATOR {
            at = Some(i);
        }
    }
    let i = at.ok_or_else(|| VhdxError::BadLocator("no parent locator item".into()))?;
    let mut e = entry(i).map_err(|_| VhdxError::BadMetadata("table".into()))?;
    let refs: Vec<(&str, String)> = pairs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    let item = locator(&refs);
    let offset = if item.len() <= e.length.get() as usize {
        e.offset.get() as usize
    } else {
        items_end.next_multiple_of(8)
    };
    if offset + item.len() > region.len() {
        return Err(VhdxError::BadMetadata("no room for the parent locator".into()).into());
    }
    region[offset..offset + item.len()].copy_from_slice(&item);
    e.offset.set(offset as u32);
    e.length.set(item.len() as u32);
    region[32 + i * 32..64 + i * 32].copy_from_slice(e.as_bytes());
    let page = 4096;
    let mut touched: Vec<usize> = vec![(32 + i * 32) / page];
    touched.extend(offset / page..(offset + item.len()).div_ceil(page));
    touched.sort_unstable();
    touched.dedup();
    Ok(touched
        .into_iter()
        .map(|p| {
            (
                base + (p * page) as u64,
                region[p * page..(p + 1) * page].to_vec(),
            )
        })
        .collect())
}

/// A VHDX parent locator item: header, entries, UTF-16LE strings.
fn locator(pairs: &[(&str, String)]) -> Vec<u8> {
    let header = ParentLocatorHeader {
        locator_type: VHDX_PARENT_TYPE,
        reserved: 0.into(),
        key_value_count: (pairs.len() as u16).into(),
    };
    let mut out = header.as_bytes().to_vec();
    let mut strings = Vec::new();
    let base = 20 + 12 * pairs.len();
    for (key, value) in pairs {
        let k = crate::format::utf16le(key);
        let v = crate::format::utf16le(value);
        let e = ParentLocatorEntry {
            key_offset: ((base + strings.len()) as u32).into(),
            value_offset: ((base + strings.len() + k.len()) as u32).into(),
            key_length: (k.len() as u16).into(),
            value_length: (v.len() as u16).into(),
        };
        out.extend_from_slice(e.as_bytes());
        strings.extend_from_slice(&k);
        strings.extend_from_slice(&v);
    }
    out.extend_from_slice(&strings);
    out
}
