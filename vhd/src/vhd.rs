//! VHD fixed, dynamic and differencing disks.
//!
//! An open VHD is a chain of layers: layer 0 is the image itself (writable
//! unless opened read-only), layers 1.. are its parents, opened read-only.
//! Each dynamic or differencing layer keeps its BAT in memory as atomics, so
//! mapping a request is lock-free and shared by every worker. Reads are
//! planned sector run by sector run: allocated data becomes an SQE against
//! whichever file of the chain holds it; unallocated data of a dynamic layer
//! (or past the end of a parent) is zero-filled in caller memory.
//!
//! # Crash safety
//! Allocation is rare metadata work, done synchronously under a mutex (so two
//! writers never allocate one block twice):
//! 1. the footer is written at the new end of file and fdatasync'ed, so the
//!    file always ends in a valid footer;
//! 2. zeros over the old footer and the sector bitmap (all ones for
//!    dynamic, all zeros for differencing) are written where the old footer
//!    was; the block is placed so its data area starts on a 4 KiB boundary
//!    (page-aligned guest reads), and that area is a hole reading zeros;
//! 3. the BAT entry is set in memory only.
//!
//! Data writes go to io_uring. A flush is: fdatasync (data and bitmaps
//! durable), then write the dirty BAT sectors and dirty differencing bitmaps,
//! then fdatasync. So data and bitmap are durable before the BAT entry that
//! makes them visible; a crash loses only unflushed writes and leaves at
//! most unreferenced space before the footer, which `check` reports as a
//! leak (not corruption) and a read-write open reclaims. Differencing bitmap
//! bits are set in memory only once the data write has completed.

use crate::device::{BlockDevice, DeviceInfo, DeviceKind, Op, Request, validate};
use crate::error::{BlockError, ImageError};
use crate::file::IoFile;
use crate::format::{
    self, BAT_UNUSED, DiskType, DynHeader, FOOTER_SIZE, Footer, SECTOR, bat_size, bitmap_size,
};
use crate::queue::{IoQueue, OnComplete, PostAction, SlotId};
use crate::raw::{DiskOptions, dio_align, needs_bounce};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use zerocopy::IntoBytes;

/// Largest accepted block size (256 MiB); the format allows any power of
/// two, but larger blocks only come from damaged or hostile images.
const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// Largest accepted parent locator payload.
const MAX_LOCATOR_LEN: u32 = 64 << 10;
/// Most blocks accepted in one image (16 Mi: 32 TiB of 2 MiB blocks).
const MAX_BLOCKS: u64 = 1 << 24;
/// New blocks place their data area on this boundary.
const DATA_ALIGN: u64 = 4096;

/// Parsed and validated metadata of one VHD file.
#[derive(Debug, Clone)]
pub struct VhdMeta {
    pub footer: Footer,
    pub header: Option<DynHeader>,
    pub file_len: u64,
    /// Offset of the footer this file ends with (for dynamic/differencing:
    /// where the next block goes).
    pub footer_offset: u64,
    /// The footer at the end of the file was damaged; the copy at offset 0
    /// was used.
    pub end_footer_damaged: bool,
    /// The copy at offset 0 differs from the footer at the end.
    pub footer_copy_differs: bool,
    /// BAT (empty for fixed disks).
    pub bat: Vec<u32>,
    /// End of the metadata and the highest referenced block.
    pub data_end: u64,
}

impl VhdMeta {
    pub fn disk_type(&self) -> DiskType {
        self.footer.disk_type()
    }

    pub fn virtual_size(&self) -> u64 {
        self.footer.virtual_size()
    }

    pub fn block_size(&self) -> u32 {
        self.header.as_ref().map_or(0, |h| h.block_size.get())
    }

    /// Bytes of trailing space no BAT entry references (a crash leftover).
    pub fn leaked_bytes(&self) -> u64 {
        if self.disk_type() == DiskType::Fixed {
            0
        } else {
            self.footer_offset.saturating_sub(self.data_end)
        }
    }

    /// Reads and validates the metadata of `file`.
    pub fn read(file: &IoFile) -> Result<VhdMeta, ImageError> {
        let file_len = file.len()?;
        if file_len < FOOTER_SIZE as u64 {
            return Err(ImageError::TooSmall {
                what: "VHD footer",
                len: file_len,
            });
        }
        let footer_offset = (file_len - FOOTER_SIZE as u64) / SECTOR * SECTOR;
        let mut buf = [0u8; FOOTER_SIZE];
        file.read_exact_at(&mut buf, footer_offset)?;
        let end = Footer::parse(&buf);
        let mut copy_buf = [0u8; FOOTER_SIZE];
        file.read_exact_at(&mut copy_buf, 0)?;
        let copy = Footer::parse(&copy_buf);
        let (footer, end_footer_damaged) = match (end, copy) {
            (Ok(f), _) => (f, false),
            (Err(e), Ok(c)) if c.disk_type() != DiskType::Fixed => {
                tracing::warn!(path = %file.path().display(), "end footer damaged ({e}); using the copy at offset 0");
                (c, true)
            }
            (Err(e), _) => return Err(e),
        };
        let footer_copy_differs =
            !end_footer_damaged && footer.disk_type() != DiskType::Fixed && copy_buf != buf;
        let mut meta = VhdMeta {
            footer,
            header: None,
            file_len,
            footer_offset: if end_footer_damaged {
                file_len
            } else {
                footer_offset
            },
            end_footer_damaged,
            footer_copy_differs,
            bat: Vec::new(),
            data_end: 0,
        };
        let size = meta.virtual_size();
        if !size.is_multiple_of(SECTOR) || size > (u64::from(u32::MAX) + 1) * SECTOR {
            return Err(ImageError::BadVirtualSize(size));
        }
        if meta.disk_type() == DiskType::Fixed {
            if size > footer_offset {
                return Err(ImageError::OutsideFile {
                    what: "fixed disk data",
                    offset: 0,
                    len: size,
                    file_len,
                });
            }
            meta.data_end = size;
            return Ok(meta);
        }
        meta.read_dynamic(file)?;
        Ok(meta)
    }

    fn read_dynamic(&mut self, file: &IoFile) -> Result<(), ImageError> {
        let limit = self.footer_offset;
        let header_offset = self.footer.data_offset.get();
        check_inside(
            "dynamic disk header",
            header_offset,
            1024,
            limit,
            self.file_len,
        )?;
        let mut hbuf = [0u8; 1024];
        file.read_exact_at(&mut hbuf, header_offset)?;
        let header = DynHeader::parse(&hbuf)?;
        let block_size = header.block_size.get();
        if !block_size.is_power_of_two() || !(512..=MAX_BLOCK_SIZE).contains(&block_size) {
            return Err(ImageError::BadBlockSize(block_size));
        }
        let entries = header.max_table_entries.get();
        let size = self.virtual_size();
        if u64::from(entries) * u64::from(block_size) < size {
            return Err(ImageError::BatTooSmall {
                entries,
                block_size,
                size,
            });
        }
        // Entries past the virtual size map nothing; only the needed ones
        // are kept (and bound the memory a hostile header can ask for).
        let needed = size.div_ceil(u64::from(block_size));
        if needed > MAX_BLOCKS {
            return Err(ImageError::TooManyBlocks(needed));
        }
        let bat_offset = header.table_offset.get();
        let bat_len = bat_size(entries);
        check_inside("BAT", bat_offset, bat_len, limit, self.file_len)?;
        // Metadata regions that blocks must not overlap.
        let mut regions: Vec<(u64, u64, &'static str)> = vec![
            (0, FOOTER_SIZE as u64, "footer copy"),
            (header_offset, 1024, "dynamic disk header"),
            (bat_offset, bat_len, "BAT"),
        ];
        if self.disk_type() == DiskType::Differencing {
            for loc in header.locators.iter().filter(|l| l.data_length.get() > 0) {
                let (off, len) = (loc.data_offset.get(), u64::from(loc.data_length.get()));
                check_inside("parent locator", off, len, limit, self.file_len)?;
                regions.push((off, len, "parent locator"));
            }
        }
        check_regions(&regions)?;
        let mut raw = vec![0u8; needed as usize * 4];
        file.read_exact_at(&mut raw, bat_offset)?;
        let bat: Vec<u32> = raw
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let extent = bitmap_size(block_size) + u64::from(block_size);
        let mut data_end = regions.iter().map(|r| r.0 + r.1).max().unwrap_or(0);
        data_end = data_end.div_ceil(SECTOR) * SECTOR;
        let mut used: Vec<(u64, u32)> = Vec::new();
        for (index, &sector) in bat.iter().enumerate() {
            if sector == BAT_UNUSED {
                continue;
            }
            let index = index as u32;
            let start = u64::from(sector) * SECTOR;
            if start + extent > limit {
                return Err(ImageError::BlockPastEof { index, sector });
            }
            if regions
                .iter()
                .any(|&(off, len, _)| start < off + len && off < start + extent)
            {
                return Err(ImageError::BlockOverlapsMetadata { index, sector });
            }
            used.push((start, index));
            data_end = data_end.max(start + extent);
        }
        used.sort_unstable();
        for pair in used.windows(2) {
            if pair[0].0 + extent > pair[1].0 {
                return Err(ImageError::BlocksOverlap {
                    first: pair[0].1.min(pair[1].1),
                    second: pair[0].1.max(pair[1].1),
                });
            }
        }
        self.header = Some(header);
        self.bat = bat;
        self.data_end = data_end;
        Ok(())
    }
}

fn check_inside(
    what: &'static str,
    offset: u64,
    len: u64,
    limit: u64,
    file_len: u64,
) -> Result<(), ImageError> {
    if offset.checked_add(len).is_none_or(|end| end > limit) || !offset.is_multiple_of(SECTOR) {
        return Err(ImageError::OutsideFile {
            what,
            offset,
            len,
            file_len,
        });
    }
    Ok(())
}

fn check_regions(regions: &[(u64, u64, &'static str)]) -> Result<(), ImageError> {
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            if a.0 < b.0 + b.1 && b.0 < a.0 + a.1 {
                return Err(ImageError::MetadataOverlap {
                    what: b.2,
                    offset: b.0,
                    other: a.2,
                });
            }
        }
    }
    Ok(())
}

/// A differencing block's sector bitmap (MSB first, as on disk).
#[derive(Debug)]
pub(crate) struct SectorBitmap {
    bits: Box<[AtomicU8]>,
    block: u32,
    /// Set when bits changed since the last flush wrote them.
    dirty: AtomicBool,
    /// The owning layer's dirty-block index (one bit per block).
    dirty_index: Arc<[AtomicU64]>,
}

impl SectorBitmap {
    fn is_set(&self, sector: u64) -> bool {
        self.bits
            .get((sector / 8) as usize)
            .is_some_and(|b| b.load(Ordering::Acquire) & (0x80 >> (sector % 8)) != 0)
    }

    fn snapshot(&self) -> Vec<u8> {
        self.bits
            .iter()
            .map(|b| b.load(Ordering::Acquire))
            .collect()
    }
}

impl OnComplete for SectorBitmap {
    /// Sets sectors `[a, a + b)` after their data write completed.
    fn on_complete(&self, first: u64, count: u64) {
        for sector in first..first + count {
            if let Some(byte) = self.bits.get((sector / 8) as usize) {
                byte.fetch_or(0x80 >> (sector % 8), Ordering::AcqRel);
            }
        }
        if !self.dirty.swap(true, Ordering::AcqRel)
            && let Some(word) = self.dirty_index.get(self.block as usize / 64)
        {
            word.fetch_or(1 << (self.block % 64), Ordering::AcqRel);
        }
    }
}

/// One file of the chain.
#[derive(Debug)]
struct Layer {
    file: IoFile,
    meta: VhdMeta,
    kind: DiskType,
    size: u64,
    block_size: u64,
    bitmap_bytes: u64,
    bat: Box<[AtomicU32]>,
    /// Differencing bitmaps, loaded on first use.
    bitmaps: Box<[OnceLock<Arc<SectorBitmap>>]>,
    dirty_bitmaps: Arc<[AtomicU64]>,
}

impl Layer {
    fn new(file: IoFile, meta: VhdMeta) -> Layer {
        let kind = meta.disk_type();
        let entries = meta.bat.len();
        let bitmaps = if kind == DiskType::Differencing {
            entries
        } else {
            0
        };
        Layer {
            size: meta.virtual_size(),
            block_size: u64::from(meta.block_size()),
            bitmap_bytes: if kind == DiskType::Fixed {
                0
            } else {
                bitmap_size(meta.block_size())
            },
            bat: meta.bat.iter().map(|&e| AtomicU32::new(e)).collect(),
            bitmaps: (0..bitmaps).map(|_| OnceLock::new()).collect(),
            dirty_bitmaps: (0..bitmaps.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            file,
            meta,
            kind,
        }
    }

    /// The bitmap of allocated differencing block `block` at `sector`.
    fn bitmap(&self, block: u32, sector: u32) -> Result<&Arc<SectorBitmap>, BlockError> {
        let cell = self
            .bitmaps
            .get(block as usize)
            .ok_or_else(|| BlockError::Metadata("bitmap index out of range".into()))?;
        if let Some(bitmap) = cell.get() {
            return Ok(bitmap);
        }
        let mut bytes = vec![0u8; self.bitmap_bytes as usize];
        self.file
            .read_exact_at(&mut bytes, u64::from(sector) * SECTOR)
            .map_err(|e| BlockError::Metadata(e.to_string()))?;
        let _ = cell.set(self.new_bitmap(block, &bytes));
        cell.get()
            .ok_or_else(|| BlockError::Metadata("bitmap cache".into()))
    }

    fn new_bitmap(&self, block: u32, bytes: &[u8]) -> Arc<SectorBitmap> {
        Arc::new(SectorBitmap {
            bits: bytes.iter().map(|&b| AtomicU8::new(b)).collect(),
            block,
            dirty: AtomicBool::new(false),
            dirty_index: self.dirty_bitmaps.clone(),
        })
    }
}

/// Allocation state, under the mutex.
#[derive(Debug)]
struct AllocState {
    /// Where the footer is now; the next block goes here.
    footer_offset: u64,
    /// BAT sectors changed since the last flush.
    dirty_bat: Vec<bool>,
    any_dirty: bool,
}

/// An open VHD (fixed, dynamic or differencing with its parents).
#[derive(Debug)]
pub struct VhdDisk {
    chain: Vec<Layer>,
    info: DeviceInfo,
    alloc: Mutex<AllocState>,
    /// Set by allocations, cleared by flush: lets a flush with nothing to
    /// write skip the mutex.
    meta_dirty: AtomicBool,
    /// Strictest O_DIRECT memory alignment in the chain (None: all buffered).
    dio_align: Option<usize>,
}

impl VhdDisk {
    /// Opens a VHD and, for a differencing disk, its parent chain.
    pub fn open(path: &Path, options: &DiskOptions) -> Result<VhdDisk, ImageError> {
        let mut chain = Vec::new();
        let mut seen: Vec<PathBuf> = Vec::new();
        let mut next = Some(path.to_path_buf());
        let mut expect_id: Option<[u8; 16]> = None;
        while let Some(current) = next.take() {
            if chain.len() >= options.max_chain_depth.max(1) {
                return Err(ImageError::ChainTooDeep(options.max_chain_depth));
            }
            let canonical =
                std::fs::canonicalize(&current).map_err(|e| ImageError::io(&current, e))?;
            if seen.contains(&canonical) {
                return Err(ImageError::ParentCycle(canonical));
            }
            seen.push(canonical);
            let writable = chain.is_empty() && !options.read_only;
            let file = IoFile::open(&current, writable, options.cache)?;
            let meta = VhdMeta::read(&file)?;
            if let Some(expected) = expect_id
                && meta.footer.unique_id != expected
            {
                return Err(ImageError::ParentIdMismatch {
                    parent: current,
                    expected: format::format_uuid(&expected),
                    found: format::format_uuid(&meta.footer.unique_id),
                });
            }
            if meta.disk_type() == DiskType::Differencing {
                let header = meta.header.as_ref().ok_or(ImageError::NoParentLocator)?;
                expect_id = Some(header.parent_unique_id);
                next = Some(find_parent(&current, &file, header)?);
            }
            chain.push(Layer::new(file, meta));
        }
        let top = &chain[0];
        let kind = match top.kind {
            DiskType::Fixed => DeviceKind::VhdFixed,
            DiskType::Dynamic => DeviceKind::VhdDynamic,
            DiskType::Differencing => DeviceKind::VhdDifferencing,
        };
        let read_only = !top.file.writable;
        let info = DeviceInfo {
            block_size: SECTOR as u32,
            blocks: top.size / SECTOR,
            read_only,
            supports_discard: top.kind == DiskType::Fixed && !read_only,
            unique_id: top.meta.footer.unique_id,
            kind,
        };
        let bat_sectors = (bat_size(top.bat.len() as u32) / SECTOR) as usize;
        let disk = VhdDisk {
            alloc: Mutex::new(AllocState {
                footer_offset: top.meta.footer_offset,
                dirty_bat: vec![
                    false;
                    if top.kind == DiskType::Fixed {
                        0
                    } else {
                        bat_sectors
                    }
                ],
                any_dirty: false,
            }),
            meta_dirty: AtomicBool::new(false),
            dio_align: chain.iter().filter_map(|l| dio_align(&l.file)).max(),
            chain,
            info,
        };
        if !read_only && disk.chain[0].kind != DiskType::Fixed {
            disk.repair_tail()?;
        }
        Ok(disk)
    }

    /// Metadata of the image itself (layer 0).
    pub fn meta(&self) -> &VhdMeta {
        &self.chain[0].meta
    }

    /// Paths of the chain, the image first, then each parent.
    pub fn chain_paths(&self) -> Vec<PathBuf> {
        self.chain
            .iter()
            .map(|l| l.file.path().to_path_buf())
            .collect()
    }

    /// Metadata of every layer, the image first.
    pub fn chain_meta(&self) -> Vec<&VhdMeta> {
        self.chain.iter().map(|l| &l.meta).collect()
    }

    /// True when the data descriptor of the image uses O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.chain[0].file.direct
    }

    /// Current BAT entry of block `index` of the image (None if out of range).
    pub fn bat_entry(&self, index: usize) -> Option<u32> {
        self.chain[0]
            .bat
            .get(index)
            .map(|e| e.load(Ordering::Acquire))
    }

    /// Whether sector `sector` of the image itself (not its parents) holds
    /// data: for dynamic, its block is allocated; for differencing, its
    /// bitmap bit is set too. Fixed disks hold every sector.
    pub fn sector_present(&self, sector: u64) -> Result<bool, BlockError> {
        let layer = &self.chain[0];
        if layer.kind == DiskType::Fixed {
            return Ok(true);
        }
        let per_block = layer.block_size / SECTOR;
        let block = (sector / per_block) as u32;
        let Some(entry) = self.bat_entry(block as usize) else {
            return Ok(false);
        };
        if entry == BAT_UNUSED {
            return Ok(false);
        }
        if layer.kind == DiskType::Dynamic {
            return Ok(true);
        }
        Ok(layer.bitmap(block, entry)?.is_set(sector % per_block))
    }

    /// On a read-write open: moves the footer back over leaked trailing
    /// space, or rewrites a damaged end footer, and drops anything past it
    /// (so new blocks start as holes reading zeros).
    fn repair_tail(&self) -> Result<(), ImageError> {
        let layer = &self.chain[0];
        let meta = &layer.meta;
        let footer_offset = meta.data_end;
        if footer_offset == meta.footer_offset
            && !meta.end_footer_damaged
            && meta.file_len == footer_offset + FOOTER_SIZE as u64
        {
            return Ok(());
        }
        tracing::info!(
            path = %layer.file.path().display(),
            leaked = meta.leaked_bytes(),
            "reclaiming trailing space and rewriting the footer"
        );
        let mut footer = meta.footer.clone();
        footer.seal();
        layer.file.write_all_at(footer.as_bytes(), footer_offset)?;
        layer.file.sync_data()?;
        layer.file.set_len(footer_offset + FOOTER_SIZE as u64)?;
        layer.file.sync_data()?;
        let mut state = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        state.footer_offset = footer_offset;
        Ok(())
    }

    /// Allocates block `block` of the image; returns its sector.
    fn allocate(&self, block: u32) -> Result<u32, BlockError> {
        let layer = &self.chain[0];
        let mut state = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let current = layer.bat[block as usize].load(Ordering::Acquire);
        if current != BAT_UNUSED {
            return Ok(current);
        }
        // The block goes where the footer is, pushed forward so that its
        // data area starts on a 4 KiB boundary: page-aligned data makes
        // every 4 KiB guest read one page cache page (or one O_DIRECT
        // sector run on 4K-sector storage). The gap costs < 4 KiB a block.
        let old_footer = state.footer_offset;
        let data_start = (old_footer + layer.bitmap_bytes).next_multiple_of(DATA_ALIGN);
        let start = data_start - layer.bitmap_bytes;
        let sector = u32::try_from(start / SECTOR)
            .ok()
            .filter(|&s| s != BAT_UNUSED)
            .ok_or_else(|| BlockError::Metadata("image file exceeds 2 TiB".into()))?;
        let new_footer = data_start + layer.block_size;
        let io = |e: ImageError| BlockError::Metadata(e.to_string());
        let mut footer = layer.meta.footer.clone();
        footer.seal();
        layer
            .file
            .write_all_at(footer.as_bytes(), new_footer)
            .map_err(io)?;
        layer.file.sync_data().map_err(io)?;
        let fill = if layer.kind == DiskType::Dynamic {
            0xff
        } else {
            0
        };
        // Zeros over the old footer and the gap, then the bitmap.
        let gap = (start - old_footer) as usize;
        let mut head = vec![0u8; gap + layer.bitmap_bytes as usize];
        head[gap..].fill(fill);
        layer.file.write_all_at(&head, old_footer).map_err(io)?;
        let bitmap = &head[gap..];
        state.footer_offset = new_footer;
        if layer.kind == DiskType::Differencing {
            let _ = layer.bitmaps[block as usize].set(layer.new_bitmap(block, bitmap));
        }
        layer.bat[block as usize].store(sector, Ordering::Release);
        let bat_sector = block as usize * 4 / SECTOR as usize;
        if let Some(flag) = state.dirty_bat.get_mut(bat_sector) {
            *flag = true;
        }
        state.any_dirty = true;
        self.meta_dirty.store(true, Ordering::Release);
        Ok(sector)
    }

    /// Writes dirty BAT sectors and differencing bitmaps, bracketed by
    /// fdatasyncs (see the module docs).
    pub fn flush_metadata(&self) -> Result<(), ImageError> {
        let layer = &self.chain[0];
        if layer.kind == DiskType::Fixed || !layer.file.writable {
            return layer.file.sync_data();
        }
        let mut state = self.alloc.lock().unwrap_or_else(|e| e.into_inner());
        self.meta_dirty.store(false, Ordering::Release);
        layer.file.sync_data()?;
        let bat_offset = layer
            .meta
            .header
            .as_ref()
            .map_or(0, |h| h.table_offset.get());
        for (sector, dirty) in state.dirty_bat.iter_mut().enumerate() {
            if !std::mem::take(dirty) {
                continue;
            }
            let mut bytes = [0xffu8; SECTOR as usize];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                if let Some(entry) = layer.bat.get(sector * 128 + i) {
                    chunk.copy_from_slice(&entry.load(Ordering::Acquire).to_be_bytes());
                }
            }
            layer
                .file
                .write_all_at(&bytes, bat_offset + sector as u64 * SECTOR)?;
        }
        for (w, word) in layer.dirty_bitmaps.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let block = w * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let Some(bitmap) = layer.bitmaps.get(block).and_then(|c| c.get()) else {
                    continue;
                };
                bitmap.dirty.store(false, Ordering::Release);
                let entry = layer.bat[block].load(Ordering::Acquire);
                layer
                    .file
                    .write_all_at(&bitmap.snapshot(), u64::from(entry) * SECTOR)?;
            }
        }
        state.any_dirty = false;
        layer.file.sync_data()
    }

    fn has_dirty_metadata(&self) -> bool {
        self.meta_dirty.load(Ordering::Acquire)
            || self.chain[0]
                .dirty_bitmaps
                .iter()
                .any(|w| w.load(Ordering::Acquire) != 0)
    }

    /// Plans a read of disk bytes `[offset, offset + len)` from layer
    /// `depth` into request bytes starting at `start`.
    fn plan_read(
        &self,
        queue: &mut IoQueue,
        id: SlotId,
        depth: usize,
        offset: u64,
        start: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        let Some(layer) = self.chain.get(depth) else {
            return queue.add_zero(id, start, len);
        };
        if offset >= layer.size {
            return queue.add_zero(id, start, len);
        }
        let in_size = len.min(layer.size - offset);
        if in_size < len {
            queue.add_zero(id, start + in_size, len - in_size)?;
        }
        if layer.kind == DiskType::Fixed {
            return queue.add_rw(id, &layer.file, false, offset, start, in_size);
        }
        for Piece {
            block,
            in_block,
            done,
            len: piece,
        } in pieces(offset, in_size, layer.block_size)
        {
            let pos = offset + done;
            let entry = layer.bat[block as usize].load(Ordering::Acquire);
            let req_at = start + done;
            if entry == BAT_UNUSED {
                if layer.kind == DiskType::Dynamic {
                    queue.add_zero(id, req_at, piece)?;
                } else {
                    self.plan_read(queue, id, depth + 1, pos, req_at, piece)?;
                }
            } else {
                let data = u64::from(entry) * SECTOR + layer.bitmap_bytes;
                if layer.kind == DiskType::Dynamic {
                    queue.add_rw(id, &layer.file, false, data + in_block, req_at, piece)?;
                } else {
                    let bitmap = layer.bitmap(block, entry)?;
                    let first = in_block / SECTOR;
                    let count = piece / SECTOR;
                    let mut s = 0;
                    while s < count {
                        let here = bitmap.is_set(first + s);
                        let mut run = 1;
                        while s + run < count && bitmap.is_set(first + s + run) == here {
                            run += 1;
                        }
                        let (at, n) = (req_at + s * SECTOR, run * SECTOR);
                        if here {
                            let file_at = data + (first + s) * SECTOR;
                            queue.add_rw(id, &layer.file, false, file_at, at, n)?;
                        } else {
                            let disk_at = pos + s * SECTOR;
                            self.plan_read(queue, id, depth + 1, disk_at, at, n)?;
                        }
                        s += run;
                    }
                }
            }
        }
        Ok(())
    }

    fn plan_write(
        &self,
        queue: &mut IoQueue,
        id: SlotId,
        offset: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        let layer = &self.chain[0];
        if layer.kind == DiskType::Fixed {
            return queue.add_rw(id, &layer.file, true, offset, 0, len);
        }
        for Piece {
            block,
            in_block,
            done,
            len: piece,
        } in pieces(offset, len, layer.block_size)
        {
            let mut entry = layer.bat[block as usize].load(Ordering::Acquire);
            if entry == BAT_UNUSED {
                entry = self.allocate(block)?;
            }
            let data = u64::from(entry) * SECTOR + layer.bitmap_bytes;
            queue.add_rw(id, &layer.file, true, data + in_block, done, piece)?;
            if layer.kind == DiskType::Differencing {
                let bitmap = layer.bitmap(block, entry)?;
                queue.add_post(
                    id,
                    PostAction {
                        target: bitmap.clone(),
                        a: in_block / SECTOR,
                        b: piece / SECTOR,
                    },
                );
            }
        }
        Ok(())
    }

    fn plan(
        &self,
        queue: &mut IoQueue,
        id: SlotId,
        req: &Request<'_>,
        bytes: u64,
    ) -> Result<(), BlockError> {
        let offset = req.offset * SECTOR;
        let layer = &self.chain[0];
        match req.op {
            Op::Read => self.plan_read(queue, id, 0, offset, 0, bytes),
            Op::Write => self.plan_write(queue, id, offset, bytes),
            Op::Flush if self.info.read_only => Ok(()),
            Op::Flush if layer.kind != DiskType::Fixed && self.has_dirty_metadata() => self
                .flush_metadata()
                .map_err(|e| BlockError::Metadata(e.to_string())),
            Op::Flush => {
                queue.add_fsync(id, &layer.file);
                Ok(())
            }
            Op::Discard => {
                queue.add_punch(id, &layer.file, offset, bytes);
                Ok(())
            }
        }
    }
}

impl BlockDevice for VhdDisk {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&self, queue: &mut IoQueue, req: Request<'_>) -> Result<(), BlockError> {
        let bytes = validate(&self.info, &req)?;
        let bounce = needs_bounce(self.dio_align, req.iov);
        let id = queue.begin(req.tag, req.iov, bounce)?;
        match self.plan(queue, id, &req, bytes) {
            Ok(()) => queue.commit(id),
            Err(err) => {
                queue.cancel(id);
                Err(err)
            }
        }
    }
}

/// The part of a byte range that falls in one block.
struct Piece {
    block: u32,
    /// Offset inside the block.
    in_block: u64,
    /// Offset of the piece from the start of the range.
    done: u64,
    len: u64,
}

/// Splits `[offset, offset + len)` at block boundaries.
fn pieces(offset: u64, len: u64, block_size: u64) -> impl Iterator<Item = Piece> {
    let mut done = 0;
    std::iter::from_fn(move || {
        (done < len).then(|| {
            let pos = offset + done;
            let in_block = pos % block_size;
            let piece = Piece {
                block: (pos / block_size) as u32,
                in_block,
                done,
                len: (block_size - in_block).min(len - done),
            };
            done += piece.len;
            piece
        })
    })
}

/// Locates the parent of differencing disk `child` through its locators
/// (W2ru relative, W2ku absolute, MacX file URL), then its parent name.
pub fn find_parent(child: &Path, file: &IoFile, header: &DynHeader) -> Result<PathBuf, ImageError> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    for code in [b"W2ru", b"W2ku", b"MacX"] {
        for loc in header.locators.iter().filter(|l| &l.platform_code == code) {
            let len = loc.data_length.get();
            if len == 0 {
                continue;
            }
            let text = String::from_utf8_lossy(code).into_owned();
            if len > MAX_LOCATOR_LEN {
                return Err(ImageError::BadLocator {
                    code: text,
                    reason: "data length is absurd",
                });
            }
            let mut data = vec![0u8; len as usize];
            file.read_exact_at(&mut data, loc.data_offset.get())?;
            let path = if code == b"MacX" {
                let url = String::from_utf8_lossy(&data)
                    .trim_end_matches('\0')
                    .to_string();
                PathBuf::from(percent_decode(url.strip_prefix("file://").unwrap_or(&url)))
            } else {
                windows_to_local(&format::from_utf16le(&data))
            };
            candidates.push(if path.is_absolute() {
                path
            } else {
                dir.join(path)
            });
        }
    }
    let name = header.parent_name();
    if !name.is_empty() {
        let local = windows_to_local(&name);
        if let Some(base) = local.file_name() {
            candidates.push(dir.join(base));
        }
        candidates.push(if local.is_absolute() {
            local
        } else {
            dir.join(local)
        });
    }
    if candidates.is_empty() {
        return Err(ImageError::NoParentLocator);
    }
    for candidate in candidates {
        if candidate.is_file() || is_block_device(&candidate) {
            return Ok(candidate);
        }
        tried.push(candidate.display().to_string());
    }
    Err(ImageError::ParentNotFound {
        child: child.to_path_buf(),
        tried: tried.join(", "),
    })
}

fn is_block_device(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device())
}

/// A Windows path (".\x.vhd", "C:\dir\x.vhd") as a local path: backslashes
/// become slashes; a drive letter cannot resolve here and stays as is.
fn windows_to_local(path: &str) -> PathBuf {
    let p = path.trim_end_matches('\0').replace('\\', "/");
    PathBuf::from(p.strip_prefix("./").map(str::to_string).unwrap_or(p))
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(v) = u8::from_str_radix(
                std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                16,
            )
        {
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
