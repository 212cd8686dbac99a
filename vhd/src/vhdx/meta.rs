//! Reading and validating the metadata of one VHDX file: file identifier,
//! headers, region table, metadata table and items, parent locator, BAT.
//!
//! Everything read after the header section goes through a [`Source`], so a
//! read-only open of an image with a pending log sees the metadata as the
//! log would leave it (see [`super::log::Overlay`]).

use super::error::VhdxError;
use super::format::{
    self, BAT_REGION, FILE_PARAMETERS, FILE_SIGNATURE, Guid, HAS_PARENT, HEADER_CHECKSUM_AT,
    HEADER_OFFSETS, HEADER_SECTION, HEADER_SIGNATURE, HEADER_SIZE, Header, LEAVE_BLOCKS_ALLOCATED,
    LOGICAL_SECTOR_SIZE, MAX_BLOCK_SIZE, MAX_METADATA_ITEM, MAX_TABLE_ENTRIES, MAX_VIRTUAL_SIZE,
    META_IS_REQUIRED, METADATA_REGION, METADATA_SIGNATURE, METADATA_TABLE_SIZE, MIB,
    MIN_BLOCK_SIZE, MetadataEntry, MetadataTableHeader, PAGE83_DATA, PARENT_LOCATOR,
    PHYSICAL_SECTOR_SIZE, ParentLocatorEntry, ParentLocatorHeader, REGION_SIGNATURE,
    REGION_TABLE_OFFSETS, REGION_TABLE_SIZE, RegionEntry, RegionTableHeader, SECTOR_BITMAP_BLOCK,
    VHDX_PARENT_TYPE, VIRTUAL_DISK_SIZE, bat_offset, bat_state, bitmap_state, crc_with_hole,
    payload, stored_crc,
};
use super::log::{LogRegion, Overlay};
use crate::error::ImageError;
use crate::file::IoFile;
use zerocopy::FromBytes;

/// Most BAT entries accepted (16 Mi: 512 TiB of 32 MiB blocks).
const MAX_BAT_ENTRIES: u64 = 1 << 24;

/// The three kinds of VHDX.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhdxKind {
    Fixed,
    Dynamic,
    Differencing,
}

impl VhdxKind {
    pub fn name(self) -> &'static str {
        match self {
            VhdxKind::Fixed => "fixed",
            VhdxKind::Dynamic => "dynamic",
            VhdxKind::Differencing => "differencing",
        }
    }
}

/// Reads through the replay overlay, if any.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub file: &'a IoFile,
    pub overlay: Option<&'a Overlay>,
}

impl Source<'_> {
    pub fn read(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        match self.overlay {
            Some(o) => o.read(self.file, buf, offset),
            None => self.file.read_exact_at(buf, offset),
        }
    }

    fn len(&self) -> Result<u64, ImageError> {
        let len = self.file.len()?;
        Ok(self.overlay.map_or(len, |o| o.file_len(len)))
    }
}

/// The file identifier's creator and the current header.
#[derive(Debug, Clone)]
pub struct Headers {
    pub creator: String,
    pub current: Header,
    /// Which slot (0: 64 KiB, 1: 128 KiB) holds the current header.
    pub slot: usize,
    pub valid: [bool; 2],
}

/// Reads the file identifier and both headers; picks the current one.
pub fn read_headers(file: &IoFile) -> Result<Headers, ImageError> {
    let len = file.len()?;
    if len < HEADER_SECTION {
        return Err(VhdxError::TooSmall(len).into());
    }
    let mut id = vec![0u8; 520];
    file.read_exact_at(&mut id, 0)?;
    if &id[..8] != FILE_SIGNATURE {
        return Err(VhdxError::NoSignature.into());
    }
    let creator = crate::format::from_utf16le(&id[8..]);
    let mut parsed = Vec::new();
    for offset in HEADER_OFFSETS {
        let mut buf = vec![0u8; HEADER_SIZE];
        file.read_exact_at(&mut buf, offset)?;
        parsed.push(parse_header(&buf));
    }
    let valid = [parsed[0].is_ok(), parsed[1].is_ok()];
    let (slot, current) = match (&parsed[0], &parsed[1]) {
        (Ok(a), Ok(b)) => {
            let (sa, sb) = (a.sequence_number.get(), b.sequence_number.get());
            if sa == sb && zerocopy::IntoBytes::as_bytes(a) != zerocopy::IntoBytes::as_bytes(b) {
                return Err(VhdxError::AmbiguousHeaders(sa).into());
            }
            if sb > sa {
                (1, b.clone())
            } else {
                (0, a.clone())
            }
        }
        (Ok(a), Err(_)) => (0, a.clone()),
        (Err(_), Ok(b)) => (1, b.clone()),
        (Err(a), Err(b)) => {
            return Err(VhdxError::NoValidHeader {
                first: a.clone(),
                second: b.clone(),
            }
            .into());
        }
    };
    check_header(&current, len)?;
    Ok(Headers {
        creator,
        current,
        slot,
        valid,
    })
}

fn parse_header(buf: &[u8]) -> Result<Header, String> {
    let (h, _) = Header::read_from_prefix(buf).map_err(|_| "short read".to_string())?;
    if &h.signature != HEADER_SIGNATURE {
        return Err("bad signature".into());
    }
    let (stored, computed) = (
        stored_crc(buf, HEADER_CHECKSUM_AT),
        crc_with_hole(buf, HEADER_CHECKSUM_AT),
    );
    if stored != computed {
        return Err(format!(
            "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    if h.version.get() != 1 {
        return Err(format!("unsupported version {}", h.version.get()));
    }
    Ok(h)
}

fn check_header(h: &Header, file_len: u64) -> Result<(), VhdxError> {
    let bad = |m: String| VhdxError::BadHeader(m);
    if h.log_version.get() != 0 {
        return Err(bad(format!(
            "unsupported log version {}",
            h.log_version.get()
        )));
    }
    let (off, len) = (h.log_offset.get(), u64::from(h.log_length.get()));
    if len > 0
        && (!off.is_multiple_of(MIB)
            || off < HEADER_SECTION
            || !len.is_multiple_of(MIB)
            || off.checked_add(len).is_none_or(|e| e > file_len))
    {
        return Err(bad(format!(
            "log at {off} (+{len} bytes) is not MiB-aligned inside the file ({file_len} bytes)"
        )));
    }
    Ok(())
}

/// Parsed and validated metadata of one VHDX file.
#[derive(Debug, Clone)]
pub struct VhdxMeta {
    pub file_len: u64,
    pub creator: String,
    pub header: Header,
    pub header_slot: usize,
    pub headers_valid: [bool; 2],
    pub region_tables_valid: [bool; 2],
    pub log: LogRegion,
    pub bat_region: (u64, u64),
    pub metadata_region: (u64, u64),
    pub block_size: u32,
    pub leave_allocated: bool,
    pub has_parent: bool,
    pub virtual_size: u64,
    pub page83: Guid,
    pub logical_sector: u32,
    pub physical_sector: u32,
    /// Parent locator key/value pairs (differencing only).
    pub locator: Vec<(String, String)>,
    pub chunk_ratio: u64,
    /// The whole BAT: payload entries with a sector bitmap entry after
    /// every `chunk_ratio` of them.
    pub bat: Vec<u64>,
    /// End of the last structure the file refers to (MiB-aligned): new
    /// blocks go here; anything after it is unreferenced.
    pub data_end: u64,
    /// (entries, first, last sequence number) of a log replayed in memory.
    pub pending_log: Option<(usize, u64, u64)>,
}

impl VhdxMeta {
    pub fn kind(&self) -> VhdxKind {
        if self.has_parent {
            VhdxKind::Differencing
        } else if self.leave_allocated {
            VhdxKind::Fixed
        } else {
            VhdxKind::Dynamic
        }
    }

    pub fn locator_value(&self, key: &str) -> Option<&str> {
        self.locator
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// Number of payload blocks.
    pub fn payload_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(u64::from(self.block_size))
    }

    /// Bytes of unreferenced space at the end of the file.
    pub fn leaked_bytes(&self) -> u64 {
        self.file_len.saturating_sub(self.data_end)
    }

    /// Payload blocks with data in this file (fully or partly present).
    pub fn allocated_blocks(&self) -> u64 {
        (0..self.payload_blocks())
            .filter(|&b| {
                let e = self.bat[self.payload_index(b) as usize];
                matches!(
                    bat_state(e),
                    payload::FULLY_PRESENT | payload::PARTIALLY_PRESENT
                )
            })
            .count() as u64
    }

    /// Reads everything after the headers; `overlay` holds a log replayed
    /// in memory, if any.
    pub fn read(
        file: &IoFile,
        headers: &Headers,
        overlay: Option<&Overlay>,
    ) -> Result<VhdxMeta, ImageError> {
        let src = Source { file, overlay };
        let file_len = src.len()?;
        let h = &headers.current;
        let log = LogRegion {
            offset: h.log_offset.get(),
            length: u64::from(h.log_length.get()),
        };
        let (entries, tables_valid) = read_region_table(file)?;
        let mut regions = vec![Region::new("header section", 0, HEADER_SECTION)];
        if log.length > 0 {
            regions.push(Region::new("log", log.offset, log.length));
        }
        let (mut bat_region, mut metadata_region) = (None, None);
        for e in &entries {
            let (offset, length) = (e.file_offset.get(), u64::from(e.length.get()));
            let name = if e.guid == BAT_REGION {
                "BAT region"
            } else if e.guid == METADATA_REGION {
                "metadata region"
            } else if e.flags.get() & 1 != 0 {
                return Err(VhdxError::UnknownRequired {
                    what: "region",
                    guid: e.guid,
                }
                .into());
            } else {
                "unknown region"
            };
            check_region(name, offset, length, file_len)?;
            let slot = match name {
                "BAT region" => &mut bat_region,
                "metadata region" => &mut metadata_region,
                _ => &mut None,
            };
            if slot.replace((offset, length)).is_some() {
                return Err(VhdxError::BadRegion {
                    what: name.into(),
                    reason: "listed twice".into(),
                }
                .into());
            }
            regions.push(Region::new(name, offset, length));
        }
        check_overlaps(&mut regions.clone())?;
        let bat_region = bat_region.ok_or(VhdxError::MissingRegion("BAT"))?;
        let metadata_region = metadata_region.ok_or(VhdxError::MissingRegion("metadata"))?;
        let mut meta = VhdxMeta {
            file_len,
            creator: headers.creator.clone(),
            header: h.clone(),
            header_slot: headers.slot,
            headers_valid: headers.valid,
            region_tables_valid: tables_valid,
            log,
            bat_region,
            metadata_region,
            block_size: 0,
            leave_allocated: false,
            has_parent: false,
            virtual_size: 0,
            page83: Guid::ZERO,
            logical_sector: 0,
            physical_sector: 0,
            locator: Vec::new(),
            chunk_ratio: 1,
            bat: Vec::new(),
            data_end: 0,
            pending_log: None,
        };
        meta.read_metadata(&src)?;
        meta.read_bat(&src, regions)?;
        if let Some(o) = overlay {
            meta.check_overlay(o)?;
        }
        Ok(meta)
    }

    fn read_metadata(&mut self, src: &Source<'_>) -> Result<(), ImageError> {
        let (base, region_len) = self.metadata_region;
        let mut table = vec![0u8; METADATA_TABLE_SIZE];
        src.read(&mut table, base)?;
        let bad = |m: String| ImageError::from(VhdxError::BadMetadata(m));
        let (header, rest) = MetadataTableHeader::read_from_prefix(&table)
            .map_err(|_| bad("table too short".into()))?;
        if &header.signature != METADATA_SIGNATURE {
            return Err(bad("bad table signature".into()));
        }
        let count = header.entry_count.get();
        if u32::from(count) > MAX_TABLE_ENTRIES {
            return Err(bad(format!("{count} table entries (at most 2047)")));
        }
        let known = [
            (FILE_PARAMETERS, "file parameters", 8),
            (VIRTUAL_DISK_SIZE, "virtual disk size", 8),
            (PAGE83_DATA, "page 83 data", 16),
            (LOGICAL_SECTOR_SIZE, "logical sector size", 4),
            (PHYSICAL_SECTOR_SIZE, "physical sector size", 4),
            (PARENT_LOCATOR, "parent locator", 0),
        ];
        let mut found: [Option<Vec<u8>>; 6] = Default::default();
        let mut items = Vec::new();
        for i in 0..usize::from(count) {
            let (e, _) = MetadataEntry::read_from_prefix(&rest[i * 32..])
                .map_err(|_| bad("table entry out of range".into()))?;
            let Some(k) = known.iter().position(|(g, _, _)| *g == e.item_id) else {
                if e.flags.get() & META_IS_REQUIRED != 0 {
                    return Err(VhdxError::UnknownRequired {
                        what: "metadata item",
                        guid: e.item_id,
                    }
                    .into());
                }
                continue;
            };
            let (_, name, size) = known[k];
            let (off, len) = (e.offset.get(), e.length.get());
            let fits = u64::from(off) >= METADATA_TABLE_SIZE as u64
                && u64::from(off) + u64::from(len) <= region_len
                && len <= MAX_METADATA_ITEM
                && if size > 0 { len == size } else { len >= 20 };
            if !fits {
                return Err(bad(format!(
                    "{name} item at offset {off} (+{len} bytes) is malformed or outside the region"
                )));
            }
            if found[k].is_some() {
                return Err(bad(format!("{name} item listed twice")));
            }
            let mut data = vec![0u8; len as usize];
            src.read(&mut data, base + u64::from(off))?;
            found[k] = Some(data);
            items.push(Region::new(name, base + u64::from(off), u64::from(len)));
        }
        check_overlaps(&mut items)?;
        let need = |k: usize| {
            found[k]
                .clone()
                .ok_or_else(|| bad(format!("the {} item is missing", known[k].1)))
        };
        let params = need(0)?;
        let u32_at =
            |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        self.block_size = u32_at(&params, 0);
        let flags = u32_at(&params, 4);
        self.leave_allocated = flags & LEAVE_BLOCKS_ALLOCATED != 0;
        self.has_parent = flags & HAS_PARENT != 0;
        let size = need(1)?;
        self.virtual_size = u64::from_le_bytes(size[..8].try_into().unwrap_or([0; 8]));
        let page83 = need(2)?;
        self.page83 = Guid(page83[..16].try_into().unwrap_or([0; 16]));
        self.logical_sector = u32_at(&need(3)?, 0);
        self.physical_sector = u32_at(&need(4)?, 0);
        if !self.block_size.is_power_of_two()
            || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size)
        {
            return Err(VhdxError::BadBlockSize(self.block_size).into());
        }
        for (which, value) in [
            ("logical", self.logical_sector),
            ("physical", self.physical_sector),
        ] {
            if value != 512 && value != 4096 {
                return Err(VhdxError::BadSectorSize { which, value }.into());
            }
        }
        let vs = self.virtual_size;
        if vs == 0 || !vs.is_multiple_of(u64::from(self.logical_sector)) || vs > MAX_VIRTUAL_SIZE {
            return Err(VhdxError::BadVirtualSize {
                size: vs,
                sector: self.logical_sector,
            }
            .into());
        }
        self.chunk_ratio = format::chunk_ratio(self.logical_sector, self.block_size);
        match (&found[5], self.has_parent) {
            (Some(data), true) => self.locator = parse_locator(data)?,
            (None, true) => return Err(bad("differencing disk without a parent locator".into())),
            _ => {}
        }
        Ok(())
    }

    fn read_bat(&mut self, src: &Source<'_>, mut regions: Vec<Region>) -> Result<(), ImageError> {
        let entries = format::bat_entries(
            self.virtual_size,
            self.block_size,
            self.logical_sector,
            self.has_parent,
        );
        if entries > MAX_BAT_ENTRIES {
            return Err(VhdxError::TooManyBlocks(entries).into());
        }
        let have = self.bat_region.1 / 8;
        if have < entries {
            return Err(VhdxError::BatTooSmall {
                needed: entries,
                have,
            }
            .into());
        }
        let mut raw = vec![0u8; entries as usize * 8];
        src.read(&mut raw, self.bat_region.0)?;
        self.bat = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        let file_len = self.file_len;
        let bad =
            |index: u64, reason: String| ImageError::from(VhdxError::BadBatEntry { index, reason });
        let mut data_end = regions.iter().map(|r| r.end()).max().unwrap_or(0);
        let mut blocks = Vec::new();
        for (i, &e) in self.bat.iter().enumerate() {
            let index = i as u64;
            let state = bat_state(e);
            let (len, what) = if self.is_bitmap_entry(index) {
                match state {
                    bitmap_state::NOT_PRESENT => continue,
                    bitmap_state::PRESENT if self.has_parent => {
                        (SECTOR_BITMAP_BLOCK, "sector bitmap block")
                    }
                    s => {
                        return Err(bad(
                            index,
                            format!("sector bitmap state {s} is not valid here"),
                        ));
                    }
                }
            } else {
                match state {
                    payload::NOT_PRESENT
                    | payload::UNDEFINED
                    | payload::ZERO
                    | payload::UNMAPPED
                    | payload::UNMAPPED_V095 => continue,
                    payload::FULLY_PRESENT => {}
                    payload::PARTIALLY_PRESENT if self.has_parent => {
                        let chunk_end =
                            (index / (self.chunk_ratio + 1) + 1) * (self.chunk_ratio + 1);
                        let sb = self.bat.get(chunk_end as usize - 1).copied().unwrap_or(0);
                        if bat_state(sb) != bitmap_state::PRESENT {
                            return Err(bad(
                                index,
                                "partially present, but its chunk has no sector bitmap".into(),
                            ));
                        }
                    }
                    s => return Err(bad(index, format!("payload state {s} is not valid here"))),
                }
                (u64::from(self.block_size), "payload block")
            };
            let offset = bat_offset(e);
            // The last payload block may be partly past the virtual size;
            // only what is used has to be inside the file.
            let used = if what == "payload block" {
                let block = index - index / (self.chunk_ratio + 1);
                len.min(self.virtual_size - block * u64::from(self.block_size))
            } else {
                len
            };
            if offset < HEADER_SECTION || offset + used > file_len {
                return Err(bad(
                    index,
                    format!(
                        "{what} at offset {offset} (+{used} bytes) lies outside the file ({file_len} bytes)"
                    ),
                ));
            }
            if let Some(r) = regions.iter().find(|r| r.overlaps(offset, len)) {
                return Err(bad(
                    index,
                    format!("{what} at offset {offset} overlaps the {}", r.name),
                ));
            }
            blocks.push((offset, len, index));
            data_end = data_end.max(offset + len);
        }
        blocks.sort_unstable();
        for pair in blocks.windows(2) {
            if pair[0].0 + pair[0].1 > pair[1].0 {
                return Err(VhdxError::Overlap {
                    first: format!("block of BAT entry {}", pair[0].2),
                    first_offset: pair[0].0,
                    second: format!("block of BAT entry {}", pair[1].2),
                    second_offset: pair[1].0,
                }
                .into());
            }
        }
        regions.clear();
        self.data_end = data_end.next_multiple_of(MIB);
        Ok(())
    }

    /// True for the sector bitmap entry that ends each chunk.
    pub fn is_bitmap_entry(&self, index: u64) -> bool {
        (index + 1).is_multiple_of(self.chunk_ratio + 1)
    }

    /// A log replayed in memory may only change metadata: the BAT, the
    /// metadata region and sector bitmap blocks. Block data it changed
    /// would be read from the file, unreplayed.
    fn check_overlay(&self, overlay: &Overlay) -> Result<(), ImageError> {
        let mut allowed = vec![self.bat_region, self.metadata_region];
        for (i, &e) in self.bat.iter().enumerate() {
            if self.is_bitmap_entry(i as u64) && bat_state(e) == bitmap_state::PRESENT {
                allowed.push((bat_offset(e), SECTOR_BITMAP_BLOCK));
            }
        }
        for (offset, len) in overlay.ranges() {
            if !allowed
                .iter()
                .any(|&(s, l)| s <= offset && offset + len <= s + l)
            {
                return Err(VhdxError::LogNeedsWrite(format!(
                    "they change block data at offset {offset}"
                ))
                .into());
            }
        }
        Ok(())
    }
}

/// A named byte range of the file, for overlap checks.
#[derive(Debug, Clone)]
struct Region {
    name: &'static str,
    offset: u64,
    len: u64,
}

impl Region {
    fn new(name: &'static str, offset: u64, len: u64) -> Region {
        Region { name, offset, len }
    }

    fn end(&self) -> u64 {
        self.offset + self.len
    }

    fn overlaps(&self, offset: u64, len: u64) -> bool {
        offset < self.end() && self.offset < offset + len
    }
}

fn check_overlaps(regions: &mut [Region]) -> Result<(), VhdxError> {
    regions.sort_by_key(|r| r.offset);
    for pair in regions.windows(2) {
        if pair[0].end() > pair[1].offset {
            return Err(VhdxError::Overlap {
                first: pair[0].name.into(),
                first_offset: pair[0].offset,
                second: pair[1].name.into(),
                second_offset: pair[1].offset,
            });
        }
    }
    Ok(())
}

fn check_region(what: &str, offset: u64, length: u64, file_len: u64) -> Result<(), VhdxError> {
    let reason = if !offset.is_multiple_of(MIB) || offset < HEADER_SECTION {
        "offset is not a multiple of 1 MiB past the header section"
    } else if length == 0 || !length.is_multiple_of(MIB) {
        "length is not a non-zero multiple of 1 MiB"
    } else if offset.checked_add(length).is_none_or(|e| e > file_len) {
        "lies outside the file"
    } else {
        return Ok(());
    };
    Err(VhdxError::BadRegion {
        what: format!("{what} at {offset} (+{length} bytes)"),
        reason: reason.into(),
    })
}

/// Reads both region tables; the first valid one is used.
fn read_region_table(file: &IoFile) -> Result<(Vec<RegionEntry>, [bool; 2]), ImageError> {
    let mut results = Vec::new();
    for offset in REGION_TABLE_OFFSETS {
        let mut buf = vec![0u8; REGION_TABLE_SIZE];
        file.read_exact_at(&mut buf, offset)?;
        results.push(parse_region_table(&buf));
    }
    let valid = [results[0].is_ok(), results[1].is_ok()];
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(entries) => return Ok((entries, valid)),
            Err(e) => errors.push(e),
        }
    }
    Err(VhdxError::NoValidRegionTable {
        first: errors[0].clone(),
        second: errors[1].clone(),
    }
    .into())
}

fn parse_region_table(buf: &[u8]) -> Result<Vec<RegionEntry>, String> {
    let (h, rest) = RegionTableHeader::read_from_prefix(buf).map_err(|_| "short".to_string())?;
    if &h.signature != REGION_SIGNATURE {
        return Err("bad signature".into());
    }
    let (stored, computed) = (stored_crc(buf, 4), crc_with_hole(buf, 4));
    if stored != computed {
        return Err(format!(
            "checksum mismatch: stored {stored:#010x}, computed {computed:#010x}"
        ));
    }
    let count = h.entry_count.get();
    if count > MAX_TABLE_ENTRIES {
        return Err(format!("{count} entries (at most 2047)"));
    }
    Ok((0..count as usize)
        .filter_map(|i| RegionEntry::read_from_prefix(&rest[i * 32..]).ok())
        .map(|(e, _)| e)
        .collect())
}

/// The key/value pairs of a parent locator item.
fn parse_locator(data: &[u8]) -> Result<Vec<(String, String)>, VhdxError> {
    let bad = |m: &str| VhdxError::BadLocator(m.into());
    let (h, _) = ParentLocatorHeader::read_from_prefix(data).map_err(|_| bad("too short"))?;
    if h.locator_type != VHDX_PARENT_TYPE {
        return Err(VhdxError::BadLocator(format!(
            "locator type {} is not VHDX",
            h.locator_type
        )));
    }
    let count = usize::from(h.key_value_count.get());
    let mut pairs: Vec<(String, String)> = Vec::with_capacity(count);
    for i in 0..count {
        let at = 20 + i * 12;
        let (e, _) = data
            .get(at..)
            .and_then(|d| ParentLocatorEntry::read_from_prefix(d).ok())
            .ok_or_else(|| bad("entry table runs past the item"))?;
        let text = |off: u32, len: u16| -> Result<String, VhdxError> {
            let (off, len) = (off as usize, usize::from(len));
            let bytes = data
                .get(off..off.saturating_add(len))
                .filter(|b| off >= 20 && !b.is_empty() && b.len() % 2 == 0)
                .ok_or_else(|| {
                    bad("a key or value lies outside the item or is empty or odd-sized")
                })?;
            let units: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).map_err(|_| bad("a key or value is not UTF-16"))
        };
        let key = text(e.key_offset.get(), e.key_length.get())?;
        let value = text(e.value_offset.get(), e.value_length.get())?;
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(VhdxError::BadLocator(format!("key {key:?} listed twice")));
        }
        pairs.push((key, value));
    }
    if !pairs.iter().any(|(k, _)| k == "parent_linkage") {
        return Err(bad("no parent_linkage entry"));
    }
    Ok(pairs)
}
