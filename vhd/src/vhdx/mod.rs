//! VHDX fixed, dynamic and differencing disks (Hyper-V's current format).
//!
//! # Place in the data path
//! Same as VHD (see [`crate::vhd`]): an open VHDX is a chain of layers, the
//! image first (writable unless opened read-only), then its read-only
//! parents. Each layer keeps its BAT in memory as atomics and, for a
//! differencing layer, its sector bitmaps (one 1 MiB block per chunk, loaded
//! on first use) as atomic words, so mapping a request reads atomics only and
//! every worker shares the device without locks. Present data becomes SQEs
//! on the worker's own [`IoQueue`]; absent data reads zeros or falls through
//! to the parent, sector run by sector run.
//!
//! # Crash safety
//! A crash loses at most the writes that were not flushed, never older data.
//! Metadata (BAT entries, sector bitmap bits) changes in memory only; the
//! file's copy changes through the VHDX log, batched per flush:
//!
//! 1. *Allocation* (rare, under the image's allocation mutex): a new payload
//!    block (and, for a differencing disk, the chunk's 1 MiB sector bitmap
//!    block) goes at the MiB-aligned end of the file, which is extended
//!    (`ftruncate`, so the block reads zeros); its BAT entry is set in memory
//!    and its BAT page marked dirty. Nothing is written or synced. A new
//!    differencing block is PARTIALLY_PRESENT with its bitmap bits cleared
//!    (so it reads its parent), or FULLY_PRESENT over a ZERO block.
//! 2. *Writes* go to io_uring at once. A differencing write's bitmap bits are
//!    set in memory when the write has completed (a queue post-action), which
//!    marks that bitmap page dirty.
//! 3. *Flush* (on the image's flusher thread; the request waits for it on the
//!    ring): under the allocation mutex, copy every dirty page (bitmap pages,
//!    then BAT pages from the highest); then, round by round: fdatasync (the
//!    data those pages expose, the file's new length and the previous round's
//!    in-place writes are durable), write the round as log entries whose tail
//!    is the round itself, fdatasync (the round is durable: replay would
//!    redo it), write the pages in place. The flush completes after the last
//!    round is logged: its in-place writes become durable with the next
//!    flush's first fdatasync, and until then the log replays them.
//!
//! Why it holds: a page is logged only after the data it exposes is durable
//! (a bitmap bit is set only after its write completed, before the copy);
//! a round takes at most half the log, so writing one never overwrites the
//! round before it, which stays replayable until the new one is complete;
//! a torn round fails its CRC, so replay redoes the previous (already
//! applied) round, which is idempotent. A flush with more pages than a round
//! holds logs bitmap pages before BAT pages and BAT pages from the highest
//! index down, so every prefix of its rounds is consistent: a chunk's bitmap
//! entry (highest in its chunk) and bits never appear after the payload
//! entries that need them. Space allocated but never logged is unreferenced:
//! `check` reports it as a leak, a read-write open truncates it.
//!
//! The header follows the specification: a read-write open writes the
//! non-current header with the sequence number + 1 and a new FileWriteGuid
//! (and fdatasyncs) before anything else changes, replays a pending log, then
//! sets a new LogGuid; the first write changes DataWriteGuid the same way. A
//! clean close clears the LogGuid, so other readers see an empty log.
//!
//! A read-only open of an image with a pending log replays it in memory
//! (metadata only; a log that changes block data is refused with a message).

mod create;
mod error;
pub mod format;
mod log;
mod meta;
mod parent;
pub(crate) mod tool;

pub use create::{VhdxOptions, create_differencing, create_vhdx};
pub use error::VhdxError;
pub use format::Guid;
pub use log::{Change, LogRegion, LogWriter, Replay, find_in};
pub use meta::{Headers, Source, VhdxKind, VhdxMeta, read_headers};

use crate::device::{BlockDevice, DeviceInfo, DeviceKind, Op, Request, validate};
use crate::error::{BlockError, ImageError};
use crate::file::IoFile;
use crate::flusher::Flusher;
use crate::queue::{IoQueue, OnComplete, PostAction, SlotId};
use crate::raw::{DiskOptions, dio_align, needs_bounce};
use crate::vhd::pieces;
use format::{
    HEADER_OFFSETS, Header, LOG_SECTOR, SECTOR_BITMAP_BLOCK, bat_entry, bat_offset, bat_state,
    bitmap_state, payload,
};
use log::Overlay;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use zerocopy::IntoBytes;

/// Log pages per sector bitmap block.
const BITMAP_PAGES: usize = (SECTOR_BITMAP_BLOCK / LOG_SECTOR) as usize;
/// BAT entries per log page.
const ENTRIES_PER_PAGE: usize = (LOG_SECTOR / 8) as usize;

/// A chunk's sector bitmap: bit n (LSB first) of the block is the chunk's
/// logical sector n; set means this file holds it.
#[derive(Debug)]
struct Bitmap {
    words: Box<[AtomicU64]>,
    chunk: usize,
    /// One bit per 4 KiB page changed since the last flush.
    dirty_pages: [AtomicU64; BITMAP_PAGES / 64],
    /// The owning layer's dirty-chunk index.
    dirty_chunks: Arc<[AtomicU64]>,
}

impl Bitmap {
    fn new(chunk: usize, bytes: &[u8], dirty_chunks: Arc<[AtomicU64]>) -> Bitmap {
        Bitmap {
            words: bytes
                .chunks_exact(8)
                .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))))
                .collect(),
            chunk,
            dirty_pages: Default::default(),
            dirty_chunks,
        }
    }

    fn is_set(&self, sector: u64) -> bool {
        self.words
            .get((sector / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (sector % 64)) != 0)
    }

    fn mark_page_dirty(&self, page: usize) {
        if let Some(w) = self.dirty_pages.get(page / 64) {
            w.fetch_or(1 << (page % 64), Ordering::AcqRel);
        }
        if let Some(w) = self.dirty_chunks.get(self.chunk / 64) {
            w.fetch_or(1 << (self.chunk % 64), Ordering::AcqRel);
        }
    }

    /// Sets (or clears) sectors `[first, first + count)`; marks the pages
    /// that changed dirty.
    fn update(&self, first: u64, count: u64, set: bool) {
        let mut s = first;
        let end = first + count;
        while s < end {
            let bits = (64 - s % 64).min(end - s);
            let mask = if bits == 64 {
                u64::MAX
            } else {
                ((1u64 << bits) - 1) << (s % 64)
            };
            if let Some(w) = self.words.get((s / 64) as usize) {
                let old = if set {
                    w.fetch_or(mask, Ordering::AcqRel)
                } else {
                    w.fetch_and(!mask, Ordering::AcqRel)
                };
                if (old & mask != mask && set) || (old & mask != 0 && !set) {
                    self.mark_page_dirty((s / 64) as usize * 8 / LOG_SECTOR as usize);
                }
            }
            s += bits;
        }
    }

    /// Bytes of page `page`, as they are now.
    fn page(&self, page: usize) -> Vec<u8> {
        let per = LOG_SECTOR as usize / 8;
        self.words[page * per..(page + 1) * per]
            .iter()
            .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
            .collect()
    }
}

impl OnComplete for Bitmap {
    /// Sets sectors `[a, a + b)` after their data write completed.
    fn on_complete(&self, first: u64, count: u64) {
        self.update(first, count, true);
    }
}

/// One file of the chain.
#[derive(Debug)]
struct Layer {
    file: IoFile,
    meta: VhdxMeta,
    kind: VhdxKind,
    size: u64,
    block_size: u64,
    sector: u64,
    chunk_ratio: u64,
    bat: Box<[AtomicU64]>,
    bitmaps: Box<[OnceLock<Arc<Bitmap>>]>,
    dirty_chunks: Arc<[AtomicU64]>,
    /// A pending log replayed in memory (read-only opens).
    overlay: Option<Overlay>,
}

impl Layer {
    fn new(file: IoFile, meta: VhdxMeta, overlay: Option<Overlay>) -> Layer {
        let chunks = if meta.has_parent {
            meta.payload_blocks().div_ceil(meta.chunk_ratio) as usize
        } else {
            0
        };
        Layer {
            kind: meta.kind(),
            size: meta.virtual_size,
            block_size: u64::from(meta.block_size),
            sector: u64::from(meta.logical_sector),
            chunk_ratio: meta.chunk_ratio,
            bat: meta.bat.iter().map(|&e| AtomicU64::new(e)).collect(),
            bitmaps: (0..chunks).map(|_| OnceLock::new()).collect(),
            dirty_chunks: (0..chunks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            file,
            meta,
            overlay,
        }
    }

    fn payload_index(&self, block: u64) -> usize {
        (block + block / self.chunk_ratio) as usize
    }

    fn bitmap_index(&self, chunk: usize) -> usize {
        (chunk as u64 * (self.chunk_ratio + 1) + self.chunk_ratio) as usize
    }

    fn entry(&self, index: usize) -> u64 {
        self.bat.get(index).map_or(0, |e| e.load(Ordering::Acquire))
    }

    /// The sector bitmap of chunk `chunk`, read on first use.
    fn bitmap(&self, chunk: usize) -> Result<&Arc<Bitmap>, BlockError> {
        let cell = self
            .bitmaps
            .get(chunk)
            .ok_or_else(|| BlockError::Metadata("sector bitmap index out of range".into()))?;
        if let Some(b) = cell.get() {
            return Ok(b);
        }
        let entry = self.entry(self.bitmap_index(chunk));
        let mut bytes = vec![0u8; SECTOR_BITMAP_BLOCK as usize];
        if bat_state(entry) == bitmap_state::PRESENT {
            let src = Source {
                file: &self.file,
                overlay: self.overlay.as_ref(),
            };
            src.read(&mut bytes, bat_offset(entry))
                .map_err(|e| BlockError::Metadata(e.to_string()))?;
        }
        let _ = cell.set(Arc::new(Bitmap::new(
            chunk,
            &bytes,
            Arc::clone(&self.dirty_chunks),
        )));
        cell.get()
            .ok_or_else(|| BlockError::Metadata("sector bitmap cache".into()))
    }

    /// Whether logical sector `sector` of this layer holds data here.
    fn sector_present(&self, sector: u64) -> Result<bool, BlockError> {
        let per_block = self.block_size / self.sector;
        let block = sector / per_block;
        let e = self.entry(self.payload_index(block));
        Ok(match bat_state(e) {
            payload::FULLY_PRESENT => true,
            payload::PARTIALLY_PRESENT => {
                let chunk = (block / self.chunk_ratio) as usize;
                let in_chunk = (block % self.chunk_ratio) * per_block + sector % per_block;
                self.bitmap(chunk)?.is_set(in_chunk)
            }
            _ => false,
        })
    }
}

/// Allocation and header state, under the allocation mutex.
#[derive(Debug)]
struct AllocState {
    header: Header,
    slot: usize,
    /// MiB-aligned end of the file: the next block goes here.
    file_end: u64,
    /// BAT pages changed since the last flush.
    dirty_bat: Vec<bool>,
}

/// What a writable image adds.
#[derive(Debug)]
struct WriteState {
    alloc: Mutex<AllocState>,
    /// Held through a metadata flush; owns the log's write position.
    log: Mutex<LogWriter>,
    meta_dirty: AtomicBool,
    data_guid_changed: AtomicBool,
}

impl WriteState {
    fn lock_alloc(&self) -> MutexGuard<'_, AllocState> {
        // Each update of the state is one step; poisoning changes nothing.
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The chain and, for a writable image, its metadata state; shared with
/// the flusher thread. Dropping the last reference closes the image.
#[derive(Debug)]
struct Inner {
    chain: Vec<Layer>,
    write: Option<WriteState>,
}

/// An open VHDX (fixed, dynamic or differencing with its parents).
#[derive(Debug)]
pub struct VhdxDisk {
    inner: Arc<Inner>,
    info: DeviceInfo,
    physical_block_size: u32,
    dio_align: Option<usize>,
    flusher: Flusher,
}

impl VhdxDisk {
    /// Opens a VHDX and, for a differencing disk, its parent chain. A
    /// read-write open replays a pending log and reclaims unreferenced
    /// space at the end of the file.
    pub fn open(path: &Path, options: &DiskOptions) -> Result<VhdxDisk, ImageError> {
        let mut chain: Vec<Layer> = Vec::new();
        let mut seen: Vec<PathBuf> = Vec::new();
        let mut next = Some(path.to_path_buf());
        let mut write = None;
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
            let file = IoFile::open_image(&current, writable, options)?;
            let layer = if writable {
                let (layer, state) = open_writable(file)?;
                write = Some(state);
                layer
            } else {
                open_read_only(file)?
            };
            if let Some(child) = chain.last() {
                parent::check_parent(&child.meta, &current, &layer.meta)?;
            }
            if layer.meta.has_parent {
                next = Some(parent::find_parent(
                    &current,
                    &layer.meta,
                    &options.parents,
                )?);
            }
            chain.push(layer);
        }
        let top = &chain[0];
        let read_only = write.is_none();
        let info = DeviceInfo {
            block_size: top.sector as u32,
            blocks: top.size / top.sector,
            read_only,
            // As for VHD: a discarded sector of a differencing disk would
            // show the parent's data again.
            supports_discard: top.kind != VhdxKind::Differencing && !read_only,
            unique_id: top.meta.page83.0,
            kind: match top.kind {
                VhdxKind::Fixed => DeviceKind::VhdxFixed,
                VhdxKind::Dynamic => DeviceKind::VhdxDynamic,
                VhdxKind::Differencing => DeviceKind::VhdxDifferencing,
            },
        };
        Ok(VhdxDisk {
            physical_block_size: top.meta.physical_sector.max(top.sector as u32),
            dio_align: chain.iter().filter_map(|l| dio_align(&l.file)).max(),
            inner: Arc::new(Inner { chain, write }),
            info,
            flusher: Flusher::new("vhdx-flush"),
        })
    }

    /// Metadata of the image itself (layer 0), as opened.
    pub fn meta(&self) -> &VhdxMeta {
        &self.inner.chain[0].meta
    }

    /// Metadata of every layer, the image first.
    pub fn chain_meta(&self) -> Vec<&VhdxMeta> {
        self.inner.chain.iter().map(|l| &l.meta).collect()
    }

    /// Paths of the chain, the image first, then each parent.
    pub fn chain_paths(&self) -> Vec<PathBuf> {
        self.inner
            .chain
            .iter()
            .map(|l| l.file.path().to_path_buf())
            .collect()
    }

    /// Current BAT entry `index` of the image.
    pub fn bat_entry(&self, index: usize) -> Option<u64> {
        self.inner.chain[0]
            .bat
            .get(index)
            .map(|e| e.load(Ordering::Acquire))
    }

    /// Whether logical sector `sector` of the image itself (not its
    /// parents) holds data.
    pub fn sector_present(&self, sector: u64) -> Result<bool, BlockError> {
        self.inner.chain[0].sector_present(sector)
    }

    /// Changes the DataWriteGuid to `guid` now, before the first write
    /// (a merge names it in the child first, see `tool::merge`).
    pub fn begin_data_write(&self, guid: Guid) -> Result<(), ImageError> {
        let w = self.write_state()?;
        let mut st = w.lock_alloc();
        update_header(&self.inner.chain[0].file, &mut st, |h| {
            h.data_write_guid = guid
        })?;
        w.data_guid_changed.store(true, Ordering::Release);
        Ok(())
    }

    /// Sets the parent locator's parent_linkage2 to `guid`, through the
    /// log: the child then also accepts a parent with that DataWriteGuid.
    pub fn set_parent_linkage2(&self, guid: Guid) -> Result<(), ImageError> {
        let w = self.write_state()?;
        let layer = &self.inner.chain[0];
        let mut pairs = layer.meta.locator.clone();
        pairs.retain(|(k, _)| k != "parent_linkage2");
        pairs.push(("parent_linkage2".into(), guid.braced()));
        let pages = create::locator_pages(&layer.file, &layer.meta, &pairs)?;
        let mut log = w.log.lock().unwrap_or_else(|e| e.into_inner());
        let file_end = w.lock_alloc().file_end;
        let refs: Vec<(u64, &[u8])> = pages.iter().map(|(o, b)| (*o, &b[..])).collect();
        log_rounds(&layer.file, &mut log, &refs, file_end)?;
        layer.file.sync_data()
    }

    /// Writes dirty metadata through the log on the calling thread.
    pub fn flush_metadata(&self) -> Result<(), ImageError> {
        flush_metadata(&self.inner)
    }

    fn has_dirty_metadata(&self) -> bool {
        self.inner.write.as_ref().is_some_and(|w| {
            w.meta_dirty.load(Ordering::Acquire)
                || self.inner.chain[0]
                    .dirty_chunks
                    .iter()
                    .any(|c| c.load(Ordering::Acquire) != 0)
        })
    }

    fn write_state(&self) -> Result<&WriteState, BlockError> {
        self.inner.write.as_ref().ok_or(BlockError::ReadOnly)
    }

    /// Before the first write of user-visible data: a new DataWriteGuid.
    fn first_write(&self) -> Result<(), BlockError> {
        let w = self.write_state()?;
        if w.data_guid_changed.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut st = w.lock_alloc();
        if !w.data_guid_changed.load(Ordering::Acquire) {
            let guid = Guid::random().map_err(|e| BlockError::from_io(&e))?;
            update_header(&self.inner.chain[0].file, &mut st, |h| {
                h.data_write_guid = guid
            })
            .map_err(|e| BlockError::Metadata(e.to_string()))?;
            w.data_guid_changed.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// Allocates payload block `block` of the image; returns its entry.
    fn allocate(&self, block: u64) -> Result<u64, BlockError> {
        let layer = &self.inner.chain[0];
        let w = self.write_state()?;
        let mut st = w.lock_alloc();
        let index = layer.payload_index(block);
        let current = layer.entry(index);
        if is_present(current) {
            return Ok(current);
        }
        let io = |e: ImageError| BlockError::Metadata(e.to_string());
        let partial = layer.kind == VhdxKind::Differencing && bat_state(current) != payload::ZERO;
        if partial {
            let chunk = (block / layer.chunk_ratio) as usize;
            let sb_index = layer.bitmap_index(chunk);
            if bat_state(layer.entry(sb_index)) != bitmap_state::PRESENT {
                let at = grow(&layer.file, &mut st, SECTOR_BITMAP_BLOCK).map_err(io)?;
                // A fresh bitmap block reads zeros: nothing present yet.
                let _ = layer.bitmaps[chunk].set(Arc::new(Bitmap::new(
                    chunk,
                    &vec![0u8; SECTOR_BITMAP_BLOCK as usize],
                    Arc::clone(&layer.dirty_chunks),
                )));
                layer.bat[sb_index].store(bat_entry(bitmap_state::PRESENT, at), Ordering::Release);
                mark_bat_dirty(&mut st, sb_index);
            }
            // Bits of this block left from a block that was never logged
            // must not show its sectors as present.
            let per_block = layer.block_size / layer.sector;
            let first = (block % layer.chunk_ratio) * per_block;
            layer.bitmap(chunk)?.update(first, per_block, false);
        }
        let at = grow(&layer.file, &mut st, layer.block_size).map_err(io)?;
        let state = if partial {
            payload::PARTIALLY_PRESENT
        } else {
            payload::FULLY_PRESENT
        };
        let entry = bat_entry(state, at);
        layer.bat[index].store(entry, Ordering::Release);
        mark_bat_dirty(&mut st, index);
        w.meta_dirty.store(true, Ordering::Release);
        Ok(entry)
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
        let Some(layer) = self.inner.chain.get(depth) else {
            return queue.add_zero(id, start, len);
        };
        if offset >= layer.size {
            return queue.add_zero(id, start, len);
        }
        let in_size = len.min(layer.size - offset);
        if in_size < len {
            queue.add_zero(id, start + in_size, len - in_size)?;
        }
        let diff = layer.kind == VhdxKind::Differencing;
        for p in pieces(offset, in_size, layer.block_size) {
            let block = u64::from(p.block);
            let entry = layer.entry(layer.payload_index(block));
            let (pos, at) = (offset + p.done, start + p.done);
            match bat_state(entry) {
                payload::FULLY_PRESENT => queue.add_rw(
                    id,
                    &layer.file,
                    false,
                    bat_offset(entry) + p.in_block,
                    at,
                    p.len,
                )?,
                payload::PARTIALLY_PRESENT => {
                    let chunk = (block / layer.chunk_ratio) as usize;
                    let bitmap = layer.bitmap(chunk)?;
                    let per_block = layer.block_size / layer.sector;
                    let base = (block % layer.chunk_ratio) * per_block + p.in_block / layer.sector;
                    let count = p.len / layer.sector;
                    let mut s = 0;
                    while s < count {
                        let here = bitmap.is_set(base + s);
                        let mut run = 1;
                        while s + run < count && bitmap.is_set(base + s + run) == here {
                            run += 1;
                        }
                        let (dst, n) = (at + s * layer.sector, run * layer.sector);
                        if here {
                            let file_at = bat_offset(entry) + p.in_block + s * layer.sector;
                            queue.add_rw(id, &layer.file, false, file_at, dst, n)?;
                        } else {
                            self.plan_read(queue, id, depth + 1, pos + s * layer.sector, dst, n)?;
                        }
                        s += run;
                    }
                }
                payload::ZERO => queue.add_zero(id, at, p.len)?,
                _ if diff => self.plan_read(queue, id, depth + 1, pos, at, p.len)?,
                _ => queue.add_zero(id, at, p.len)?,
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
        self.first_write()?;
        let layer = &self.inner.chain[0];
        for p in pieces(offset, len, layer.block_size) {
            let block = u64::from(p.block);
            let mut entry = layer.entry(layer.payload_index(block));
            if !is_present(entry) {
                entry = self.allocate(block)?;
            }
            let file_at = bat_offset(entry) + p.in_block;
            queue.add_rw(id, &layer.file, true, file_at, p.done, p.len)?;
            if bat_state(entry) == payload::PARTIALLY_PRESENT {
                let chunk = (block / layer.chunk_ratio) as usize;
                let per_block = layer.block_size / layer.sector;
                let first = (block % layer.chunk_ratio) * per_block + p.in_block / layer.sector;
                let target: Arc<dyn OnComplete> = layer.bitmap(chunk)?.clone();
                queue.add_post(
                    id,
                    PostAction {
                        target,
                        a: first,
                        b: p.len / layer.sector,
                        always: false,
                    },
                );
            }
        }
        Ok(())
    }

    /// Discard: the data of present blocks becomes a hole (reads zeros,
    /// host space returned); blocks stay allocated, no metadata changes.
    fn plan_discard(&self, queue: &mut IoQueue, id: SlotId, offset: u64, len: u64) {
        let layer = &self.inner.chain[0];
        for p in pieces(offset, len, layer.block_size) {
            let entry = layer.entry(layer.payload_index(u64::from(p.block)));
            if bat_state(entry) == payload::FULLY_PRESENT {
                queue.add_punch(id, &layer.file, bat_offset(entry) + p.in_block, p.len);
            }
        }
    }

    fn plan(
        &self,
        queue: &mut IoQueue,
        id: SlotId,
        req: &Request<'_>,
        bytes: u64,
    ) -> Result<(), BlockError> {
        let offset = req.offset * u64::from(self.info.block_size);
        match req.op {
            Op::Read => self.plan_read(queue, id, 0, offset, 0, bytes),
            Op::Write => self.plan_write(queue, id, offset, bytes),
            Op::Flush if self.info.read_only => Ok(()),
            Op::Flush if self.has_dirty_metadata() => {
                let inner = Arc::clone(&self.inner);
                let work = Box::new(move || flush_metadata(&inner).map_err(|e| e.to_string()));
                self.flusher.submit(queue, id, work)
            }
            Op::Flush => {
                queue.add_fsync(id, &self.inner.chain[0].file);
                Ok(())
            }
            Op::Discard => {
                self.plan_discard(queue, id, offset, bytes);
                Ok(())
            }
        }
    }
}

impl BlockDevice for VhdxDisk {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The image's physical sector size (4096 for 512e disks).
    fn physical_block_size(&self) -> u32 {
        self.physical_block_size
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

fn is_present(entry: u64) -> bool {
    matches!(
        bat_state(entry),
        payload::FULLY_PRESENT | payload::PARTIALLY_PRESENT
    )
}

fn mark_bat_dirty(st: &mut AllocState, index: usize) {
    if let Some(flag) = st.dirty_bat.get_mut(index / ENTRIES_PER_PAGE) {
        *flag = true;
    }
}

/// Extends the file by `len` bytes at its MiB-aligned end; returns where.
fn grow(file: &IoFile, st: &mut AllocState, len: u64) -> Result<u64, ImageError> {
    let at = st.file_end;
    file.set_len(at + len)?;
    st.file_end = at + len;
    Ok(at)
}

/// Writes the non-current header with the next sequence number and `edit`
/// applied, and makes it durable: it is then the current one.
fn update_header(
    file: &IoFile,
    st: &mut AllocState,
    edit: impl FnOnce(&mut Header),
) -> Result<(), ImageError> {
    let mut header = st.header.clone();
    header
        .sequence_number
        .set(header.sequence_number.get().wrapping_add(1));
    edit(&mut header);
    header.seal();
    let slot = 1 - st.slot;
    file.write_all_at(header.as_bytes(), HEADER_OFFSETS[slot])?;
    file.sync_data()?;
    st.header = header;
    st.slot = slot;
    Ok(())
}

/// Opens the image file read-write: new FileWriteGuid, log replay, tail
/// reclaim, new LogGuid (see the module docs).
fn open_writable(file: IoFile) -> Result<(Layer, WriteState), ImageError> {
    let headers = read_headers(&file)?;
    let h = &headers.current;
    let region = LogRegion {
        offset: h.log_offset.get(),
        length: u64::from(h.log_length.get()),
    };
    if region.length == 0 {
        return Err(
            VhdxError::BadHeader("no log: metadata cannot be updated safely".into()).into(),
        );
    }
    let replay = log::find_active(&file, region, h.log_guid, file.len()?)?;
    let mut st = AllocState {
        header: h.clone(),
        slot: headers.slot,
        file_end: 0,
        dirty_bat: Vec::new(),
    };
    let session = Guid::random().map_err(|e| ImageError::io("getrandom", e))?;
    update_header(&file, &mut st, |h| h.file_write_guid = session)?;
    if let Some(replay) = &replay {
        tracing::info!(
            path = %file.path().display(),
            entries = replay.entries,
            "replaying the VHDX log"
        );
        replay.apply(&file)?;
        file.sync_data()?;
        update_header(&file, &mut st, |h| h.log_guid = Guid::ZERO)?;
    }
    let current = Headers {
        creator: headers.creator.clone(),
        current: st.header.clone(),
        slot: st.slot,
        valid: [true, true],
    };
    let mut meta = VhdxMeta::read(&file, &current, None)?;
    if meta.file_len > meta.data_end {
        tracing::info!(
            path = %file.path().display(),
            leaked = meta.leaked_bytes(),
            "reclaiming unreferenced space at the end of the VHDX"
        );
        file.set_len(meta.data_end)?;
        file.sync_data()?;
        meta.file_len = meta.data_end;
    }
    // Both headers end up current and valid with the session's LogGuid.
    let log_guid = Guid::random().map_err(|e| ImageError::io("getrandom", e))?;
    update_header(&file, &mut st, |h| h.log_guid = log_guid)?;
    update_header(&file, &mut st, |_| {})?;
    st.file_end = meta.data_end;
    st.dirty_bat = vec![false; (meta.bat.len()).div_ceil(ENTRIES_PER_PAGE)];
    let state = WriteState {
        alloc: Mutex::new(st),
        log: Mutex::new(LogWriter::new(region, log_guid)),
        meta_dirty: AtomicBool::new(false),
        data_guid_changed: AtomicBool::new(false),
    };
    Ok((Layer::new(file, meta, None), state))
}

/// Opens a file read-only; a pending log is replayed in memory.
fn open_read_only(file: IoFile) -> Result<Layer, ImageError> {
    let headers = read_headers(&file)?;
    let h = &headers.current;
    let region = LogRegion {
        offset: h.log_offset.get(),
        length: u64::from(h.log_length.get()),
    };
    let replay = log::find_active(&file, region, h.log_guid, file.len()?)?;
    let overlay = replay.as_ref().map(Replay::overlay).transpose()?;
    let mut meta = VhdxMeta::read(&file, &headers, overlay.as_ref())?;
    meta.pending_log = replay
        .as_ref()
        .map(|r| (r.entries, r.first_sequence, r.last_sequence));
    Ok(Layer::new(file, meta, overlay))
}

/// One 4 KiB metadata page to log and write, and what it was.
struct Page {
    offset: u64,
    bytes: Vec<u8>,
    what: PagePart,
}

#[derive(Clone, Copy)]
enum PagePart {
    Bat(usize),
    Bitmap(usize, usize),
}

/// Logs and writes the dirty metadata of the image (see the module docs).
fn flush_metadata(inner: &Inner) -> Result<(), ImageError> {
    let layer = &inner.chain[0];
    let Some(w) = &inner.write else {
        return Ok(());
    };
    // One flush at a time: the log's position and order belong to it.
    let mut log = w.log.lock().unwrap_or_else(|e| e.into_inner());
    let (pages, file_end) = {
        let mut st = w.lock_alloc();
        w.meta_dirty.store(false, Ordering::Release);
        (capture(layer, &mut st), st.file_end)
    };
    if pages.is_empty() {
        return layer.file.sync_data();
    }
    let refs: Vec<(u64, &[u8])> = pages.iter().map(|p| (p.offset, &p.bytes[..])).collect();
    let written = log_rounds(&layer.file, &mut log, &refs, file_end);
    if written.is_err() {
        // Nothing is known to be on disk: everything is dirty again.
        let mut st = w.lock_alloc();
        for p in &pages {
            match p.what {
                PagePart::Bat(page) => {
                    st.dirty_bat[page] = true;
                    w.meta_dirty.store(true, Ordering::Release);
                }
                PagePart::Bitmap(chunk, page) => {
                    if let Some(b) = layer.bitmaps.get(chunk).and_then(|c| c.get()) {
                        b.mark_page_dirty(page);
                    }
                }
            }
        }
    }
    written
}

/// Logs `pages` round by round and writes them in place: fdatasync, log
/// entries, fdatasync, pages (see the module docs).
fn log_rounds(
    file: &IoFile,
    log: &mut LogWriter,
    pages: &[(u64, &[u8])],
    file_end: u64,
) -> Result<(), ImageError> {
    pages.chunks(log.pages_per_round()).try_for_each(|round| {
        file.sync_data()?;
        log.write_round(file, round, file_end)?;
        file.sync_data()?;
        round
            .iter()
            .try_for_each(|(offset, bytes)| file.write_all_at(bytes, *offset))
    })
}

/// Takes the dirty marks and copies the pages they cover: bitmap pages
/// first, then BAT pages from the highest (see the module docs).
fn capture(layer: &Layer, st: &mut AllocState) -> Vec<Page> {
    let mut out = Vec::new();
    for (w, word) in layer.dirty_chunks.iter().enumerate() {
        let mut bits = word.swap(0, Ordering::AcqRel);
        while bits != 0 {
            let chunk = w * 64 + bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let Some(bitmap) = layer.bitmaps.get(chunk).and_then(|c| c.get()) else {
                continue;
            };
            let base = bat_offset(layer.entry(layer.bitmap_index(chunk)));
            for (pw, pword) in bitmap.dirty_pages.iter().enumerate() {
                let mut pbits = pword.swap(0, Ordering::AcqRel);
                while pbits != 0 {
                    let page = pw * 64 + pbits.trailing_zeros() as usize;
                    pbits &= pbits - 1;
                    out.push(Page {
                        offset: base + page as u64 * LOG_SECTOR,
                        bytes: bitmap.page(page),
                        what: PagePart::Bitmap(chunk, page),
                    });
                }
            }
        }
    }
    let bat_base = layer.meta.bat_region.0;
    for page in (0..st.dirty_bat.len()).rev() {
        if !std::mem::take(&mut st.dirty_bat[page]) {
            continue;
        }
        let mut bytes = vec![0u8; LOG_SECTOR as usize];
        for (i, chunk) in bytes.chunks_exact_mut(8).enumerate() {
            if let Some(e) = layer.bat.get(page * ENTRIES_PER_PAGE + i) {
                chunk.copy_from_slice(&e.load(Ordering::Acquire).to_le_bytes());
            }
        }
        out.push(Page {
            offset: bat_base + page as u64 * LOG_SECTOR,
            bytes,
            what: PagePart::Bat(page),
        });
    }
    out
}

impl Drop for Inner {
    /// A clean close: metadata logged and written, then the log cleared.
    fn drop(&mut self) {
        let Some(w) = &self.write else {
            return;
        };
        let layer = &self.chain[0];
        let closed = flush_metadata(self)
            .and_then(|()| layer.file.sync_data())
            .and_then(|()| {
                let mut st = w.lock_alloc();
                update_header(&layer.file, &mut st, |h| h.log_guid = Guid::ZERO)
            });
        if let Err(e) = closed {
            tracing::warn!(
                path = %layer.file.path().display(),
                "VHDX not closed cleanly ({e}); its log is replayed on the next open"
            );
        }
    }
}

#[cfg(test)]
mod tests;
