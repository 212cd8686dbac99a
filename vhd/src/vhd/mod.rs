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
//! Data writes go to io_uring. A flush is: copy the dirty BAT sectors and
//! dirty differencing bitmaps as they are, fdatasync (the data they expose
//! and the bitmaps of new blocks durable), write the copies, fdatasync. So
//! data and bitmap are durable before the BAT entry or bitmap bit that
//! makes them visible; a crash loses only unflushed writes and leaves at
//! most unreferenced space before the footer, which `check` reports as a
//! leak (not corruption) and a read-write open reclaims. Differencing bitmap
//! bits are set in memory only once the data write has completed, which is
//! why copying them before the first fdatasync is enough.
//!
//! A flush with metadata to write runs on the image's flusher thread
//! (started on first use). Flushes are serialised by their own mutex; the
//! allocation mutex is held only while the copies are taken, so blocks can
//! be allocated during a flush's fdatasyncs. The guest's flush request
//! waits for it as one more I/O on the worker's ring (a read of an eventfd
//! the flusher rings), so the worker keeps serving its other requests
//! meanwhile. A flush with nothing to write is one fdatasync on the ring.

mod chain;
mod meta;
mod parent;

pub use meta::VhdMeta;
pub use parent::find_parent;

use crate::device::{BlockDevice, DeviceInfo, DeviceKind, Op, Request, validate};
use crate::error::{BlockError, ImageError};
use crate::file::IoFile;
use crate::format::{self, BAT_UNUSED, DiskType, FOOTER_SIZE, SECTOR, bat_size};
use crate::queue::{IoQueue, PostAction, Signal, SlotId};
use crate::raw::{DiskOptions, dio_align, needs_bounce};
use chain::Layer;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use zerocopy::IntoBytes;

/// New blocks place their data area on this boundary.
const DATA_ALIGN: u64 = 4096;

/// Allocation state, under the mutex.
#[derive(Debug)]
struct AllocState {
    /// Where the footer is now; the next block goes here.
    footer_offset: u64,
    /// BAT sectors changed since the last flush.
    dirty_bat: Vec<bool>,
}

/// Metadata state of the image, shared with the flusher thread.
#[derive(Debug)]
struct MetaState {
    alloc: Mutex<AllocState>,
    /// Held through a whole metadata flush.
    flush: Mutex<()>,
    /// Set by allocations, cleared by flush: lets a flush with nothing to
    /// write skip the mutex.
    meta_dirty: AtomicBool,
}

impl MetaState {
    fn lock_alloc(&self) -> std::sync::MutexGuard<'_, AllocState> {
        // Poisoning is not an error here: the state is a footer offset and
        // dirty marks, each updated in one step.
        self.alloc.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A metadata flush for the flusher thread, and whom to tell.
struct FlushJob {
    chain: Arc<Vec<Layer>>,
    meta: Arc<MetaState>,
    signal: Arc<Signal>,
}

/// An open VHD (fixed, dynamic or differencing with its parents).
#[derive(Debug)]
pub struct VhdDisk {
    chain: Arc<Vec<Layer>>,
    info: DeviceInfo,
    meta_state: Arc<MetaState>,
    /// Strictest O_DIRECT memory alignment in the chain (None: all buffered).
    dio_align: Option<usize>,
    /// Where metadata flushes go (a thread started on first use), so the
    /// worker that asked keeps serving its other requests through the two
    /// fdatasyncs. Closing it ends the thread.
    flusher: OnceLock<mpsc::Sender<FlushJob>>,
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
            let file = IoFile::open_with(&current, writable, options.cache, options.lock_wait)?;
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
            // Differencing disks cannot: a discarded sector must not show
            // the parent's data again, and hiding it needs a block anyway.
            supports_discard: top.kind != DiskType::Differencing && !read_only,
            unique_id: top.meta.footer.unique_id,
            kind,
        };
        let bat_sectors = (bat_size(top.bat.len() as u32) / SECTOR) as usize;
        let disk = VhdDisk {
            meta_state: Arc::new(MetaState {
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
                }),
                meta_dirty: AtomicBool::new(false),
                flush: Mutex::new(()),
            }),
            dio_align: chain.iter().filter_map(|l| dio_align(&l.file)).max(),
            chain: Arc::new(chain),
            info,
            flusher: OnceLock::new(),
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
        let mut state = self.meta_state.lock_alloc();
        state.footer_offset = footer_offset;
        Ok(())
    }

    /// Allocates block `block` of the image; returns its sector.
    fn allocate(&self, block: u32) -> Result<u32, BlockError> {
        let layer = &self.chain[0];
        let mut state = self.meta_state.lock_alloc();
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
        self.meta_state.meta_dirty.store(true, Ordering::Release);
        Ok(sector)
    }

    /// Writes dirty BAT sectors and differencing bitmaps, bracketed by
    /// fdatasyncs (see the module docs), on the calling thread.
    pub fn flush_metadata(&self) -> Result<(), ImageError> {
        flush_metadata(&self.chain[0], &self.meta_state)
    }

    /// Hands a metadata flush to the flusher thread; request `id`
    /// completes when it is done. Without a flusher thread (it could not
    /// be started) the flush runs here, as it must happen either way.
    fn flush_in_background(&self, queue: &mut IoQueue, id: SlotId) -> Result<(), BlockError> {
        let signal = Signal::new().map_err(|e| BlockError::from_io(&e))?;
        let job = FlushJob {
            chain: Arc::clone(&self.chain),
            meta: Arc::clone(&self.meta_state),
            signal: Arc::clone(&signal),
        };
        if self.flusher.get_or_init(start_flusher).send(job).is_err() {
            return self
                .flush_metadata()
                .map_err(|e| BlockError::Metadata(e.to_string()));
        }
        queue.add_wait(id, signal);
        Ok(())
    }
}

/// The flusher thread of one image: runs its metadata flushes in order
/// until the image is closed.
fn start_flusher() -> mpsc::Sender<FlushJob> {
    let (tx, rx) = mpsc::channel::<FlushJob>();
    let spawned = std::thread::Builder::new()
        .name("vhd-flush".into())
        .spawn(move || {
            vspa_threads::enter(vspa_threads::ThreadKind::Flusher);
            for FlushJob {
                chain,
                meta,
                signal,
            } in rx
            {
                let run = || flush_metadata(&chain[0], &meta);
                let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("the metadata flush panicked".to_string()),
                };
                // Let go of the image before the worker hears of it, so a
                // close that follows the flush really closes the files.
                drop((chain, meta));
                signal.finish(outcome);
            }
        });
    if let Err(e) = spawned {
        // The receiver went with the closure: sends fail, flushes run inline.
        tracing::warn!("no VHD flusher thread ({e}); metadata flushes run on the worker");
    }
    tx
}

/// Writes the dirty BAT sectors and differencing bitmaps of `layer`,
/// bracketed by fdatasyncs (see the module docs).
fn flush_metadata(layer: &Layer, meta: &MetaState) -> Result<(), ImageError> {
    if layer.kind == DiskType::Fixed || !layer.file.writable {
        return layer.file.sync_data();
    }
    // One flush at a time: a flush that copied a BAT sector earlier must not
    // write it after a later flush wrote a newer copy.
    let _flushing = meta.flush.lock().unwrap_or_else(|e| e.into_inner());
    // Capture before the first fdatasync, under the allocation mutex: every
    // BAT entry copied belongs to a finished allocation, and a bitmap bit is
    // set only once its data write completed, so the fdatasync makes all
    // they expose durable before they are written. Allocations and writes
    // go on meanwhile; what they change waits for the next flush.
    let captured = {
        let mut state = meta.lock_alloc();
        meta.meta_dirty.store(false, Ordering::Release);
        capture_metadata(layer, &mut state)
    };
    let written = layer.file.sync_data().and_then(|()| {
        for m in &captured {
            layer.file.write_all_at(&m.bytes, m.offset)?;
        }
        layer.file.sync_data()
    });
    if written.is_err() {
        // Nothing is known to be on disk: mark it all dirty again.
        let mut state = meta.lock_alloc();
        restore_dirty(layer, meta, &mut state, &captured);
    }
    written
}

/// One metadata sector run to write, and what it was.
struct Captured {
    offset: u64,
    bytes: Vec<u8>,
    what: MetaPart,
}

#[derive(Clone, Copy)]
enum MetaPart {
    BatSector(usize),
    Bitmap(usize),
}

/// Takes the dirty marks and copies what they cover.
fn capture_metadata(layer: &Layer, state: &mut AllocState) -> Vec<Captured> {
    let bat_offset = layer
        .meta
        .header
        .as_ref()
        .map_or(0, |h| h.table_offset.get());
    let mut out = Vec::new();
    for (sector, dirty) in state.dirty_bat.iter_mut().enumerate() {
        if !std::mem::take(dirty) {
            continue;
        }
        let mut bytes = vec![0xffu8; SECTOR as usize];
        for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
            if let Some(entry) = layer.bat.get(sector * 128 + i) {
                chunk.copy_from_slice(&entry.load(Ordering::Acquire).to_be_bytes());
            }
        }
        let offset = bat_offset + sector as u64 * SECTOR;
        let what = MetaPart::BatSector(sector);
        out.push(Captured {
            offset,
            bytes,
            what,
        });
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
            let offset = u64::from(entry) * SECTOR;
            let what = MetaPart::Bitmap(block);
            out.push(Captured {
                offset,
                bytes: bitmap.snapshot(),
                what,
            });
        }
    }
    out
}

/// After a failed flush: everything captured is dirty again.
fn restore_dirty(layer: &Layer, meta: &MetaState, state: &mut AllocState, parts: &[Captured]) {
    for part in parts {
        match part.what {
            MetaPart::BatSector(sector) => {
                state.dirty_bat[sector] = true;
                meta.meta_dirty.store(true, Ordering::Release);
            }
            MetaPart::Bitmap(block) => {
                if let Some(bitmap) = layer.bitmaps.get(block).and_then(|c| c.get()) {
                    bitmap.mark_dirty();
                }
            }
        }
    }
}

impl VhdDisk {
    fn has_dirty_metadata(&self) -> bool {
        self.meta_state.meta_dirty.load(Ordering::Acquire)
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

    /// Discard on a dynamic disk: the data of allocated blocks becomes a
    /// hole (reading zeros, giving the space back to the host); the block
    /// stays allocated with its bitmap, so no metadata changes.
    /// Unallocated blocks already read zeros.
    fn plan_discard(&self, queue: &mut IoQueue, id: SlotId, offset: u64, len: u64) {
        let layer = &self.chain[0];
        for p in pieces(offset, len, layer.block_size) {
            let entry = layer.bat[p.block as usize].load(Ordering::Acquire);
            if entry != BAT_UNUSED {
                let data = u64::from(entry) * SECTOR + layer.bitmap_bytes;
                queue.add_punch(id, &layer.file, data + p.in_block, p.len);
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
        let offset = req.offset * SECTOR;
        let layer = &self.chain[0];
        match req.op {
            Op::Read => self.plan_read(queue, id, 0, offset, 0, bytes),
            Op::Write => self.plan_write(queue, id, offset, bytes),
            Op::Flush if self.info.read_only => Ok(()),
            Op::Flush if layer.kind != DiskType::Fixed && self.has_dirty_metadata() => {
                self.flush_in_background(queue, id)
            }
            Op::Flush => {
                queue.add_fsync(id, &layer.file);
                Ok(())
            }
            Op::Discard if layer.kind == DiskType::Dynamic => {
                self.plan_discard(queue, id, offset, bytes);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlockingIo, CacheMode, Completion};

    /// Submits and reaps until request `tag` completes; returns every
    /// completion seen, in order.
    fn until(queue: &mut IoQueue, tag: u64) -> Vec<(u64, Result<u32, BlockError>)> {
        let mut seen = Vec::new();
        while !seen.iter().any(|(t, _)| *t == tag) {
            queue.submit_and_wait().unwrap();
            queue.reap(|c| match c {
                Completion::Request { tag, result } => seen.push((tag, result)),
                other => panic!("unexpected {other:?}"),
            });
        }
        seen
    }

    #[test]
    #[allow(unsafe_code)] // a request over a test-owned buffer
    fn a_metadata_flush_leaves_the_worker_free_and_makes_the_bat_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhd");
        crate::create::create_dynamic(&path, 8 << 20, 1 << 20).unwrap();
        let options = DiskOptions::default().cache(CacheMode::Cached);
        let disk = VhdDisk::open(&path, &options).unwrap();
        let mut io = BlockingIo::new().unwrap();
        io.write(&disk, 2048 + 8, &[0x5a; 4096]).unwrap();
        assert!(disk.has_dirty_metadata());
        let mut queue = IoQueue::new(8).unwrap();
        // The flusher copies the metadata under the allocation lock: while
        // another thread holds it (until told, or 5 s), the flush waits.
        let meta = Arc::clone(&disk.meta_state);
        let (locked_tx, locked) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _held = meta.alloc.lock().unwrap();
            locked_tx.send(()).unwrap();
            let _ = release_rx.recv_timeout(std::time::Duration::from_secs(5));
            std::time::Instant::now()
        });
        locked.recv().unwrap();
        disk.submit(&mut queue, Request::flush(1)).unwrap();
        let mut buf = vec![0u8; 4096];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: `buf` is not touched until the read is reaped below.
        let read = unsafe { Request::new(Op::Read, 2048 + 8, 8, &iov, 2) };
        disk.submit(&mut queue, read).unwrap();
        let seen = until(&mut queue, 2);
        let read_done = std::time::Instant::now();
        let _ = release.send(());
        let released = holder.join().unwrap();
        assert!(read_done < released, "the read waited for the flush");
        assert_eq!(seen, [(2, Ok(4096))]);
        assert_eq!(buf, [0x5a; 4096]);
        assert_eq!(until(&mut queue, 1), [(1, Ok(0))]);
        assert!(!disk.has_dirty_metadata());
        // What the flush wrote is on disk: a fresh open finds the block.
        drop((disk, queue, io));
        let reopened = VhdDisk::open(&path, &options).unwrap();
        assert_ne!(reopened.bat_entry(1), Some(BAT_UNUSED));
        let mut back = vec![0u8; 4096];
        let mut io = BlockingIo::new().unwrap();
        io.read(&reopened, 2048 + 8, &mut back).unwrap();
        assert_eq!(back, [0x5a; 4096]);
    }
}
