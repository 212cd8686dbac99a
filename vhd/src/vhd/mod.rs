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
//! # Allocation: batched, durable at the next flush
//! A first write to a block allocates it in memory only (under a mutex, so
//! two writers never allocate one block twice): the block takes the next
//! place in *reserved space*, the BAT entry is set, the BAT sector is marked
//! dirty and, for a dynamic disk, the block's bitmap (all ones) is queued.
//! No I/O, no fdatasync: first-touch writes cost what any write costs.
//!
//! Reserved space lies between the last block and the footer. It grows in
//! steps (16 MiB doubling to 256 MiB, never past what the blocks left could
//! take): the footer is written further on and fdatasync'ed, then the old
//! footer is zeroed, and only then may blocks be placed over it. So reserved
//! space always reads zeros (a hole past the old end), which makes a new
//! dynamic block read zeros and a new differencing block's bitmap read all
//! clear without writing either. The flusher thread takes the next step in
//! the background when less than half of the last one is left; an
//! allocation waits for it only if none is left. A clean close (drop)
//! flushes, then moves the footer back to just after the last block
//! (written and fdatasync'ed before the file is cut), so a closed image has
//! no reserved space.
//!
//! A flush: under the allocation mutex, take the queued bitmaps and copy
//! the dirty BAT sectors and dirty differencing bitmaps; write the queued
//! all-ones bitmaps; fdatasync; write the copies; fdatasync. Differencing
//! bitmap bits are set in memory only once their data write has completed.
//!
//! # Crash safety
//! The guarantee: a crash (process or power) loses at most writes not
//! covered by a completed flush, never data a completed flush covered, and
//! leaves a valid image. Three invariants of the file on disk give it:
//! 1. *The file ends in a valid footer.* A reservation step makes the new
//!    footer durable before it zeroes the old one; a close makes the footer
//!    at the new end durable before it truncates. Data and bitmaps are
//!    written inside reserved space, never over the end footer.
//! 2. *A BAT entry on disk references a block whose bitmap and completed
//!    data are durable.* BAT sectors are written only by a flush, after the
//!    fdatasync that follows the writes of the bitmaps of every block they
//!    reference (captured under the same mutex as the BAT copy, so never
//!    later) and every data write completed before the capture. Bitmap
//!    bits likewise. A torn BAT or bitmap write leaves each sector old or
//!    new, both of which satisfy this.
//! 3. *Nothing referenced by a durable BAT entry moves or is overwritten by
//!    metadata work.* Reservation, zeroing and closing touch only space past
//!    the last block; bitmap updates only set bits.
//!
//! So after a crash the BAT on disk references exactly the blocks of
//! completed flushes (plus perhaps some of an interrupted one, whose data
//! and bitmaps were durable first), each holding every write its flush
//! covered; later blocks are unreferenced (their writes were not flushed)
//! and lie in the space between the last referenced block and the footer,
//! which `check` reports as a leak (not corruption) and a read-write open
//! reclaims. `tests/tests/vhd_crash.rs` kills writers at random moments,
//! with buffered (inline) and O_DIRECT (io_uring) writes.
//!
//! A flush with metadata to write runs on the image's flusher thread
//! (started on first use). Flushes are serialised by their own mutex; the
//! allocation mutex is held only while the copies are taken, so blocks can
//! be allocated during a flush's fdatasyncs. The guest's flush request
//! waits for it as one more I/O on the worker's ring (a read of an eventfd
//! the flusher rings), so the worker keeps serving its other requests
//! meanwhile. A flush with nothing to write is one fdatasync on the ring.

mod allocation;
mod batch;
mod chain;
pub mod live;
mod meta;
pub(crate) mod parent;

pub use meta::VhdMeta;
pub use parent::{ParentPolicy, find_parent};

use crate::device::{BlockDevice, DeviceInfo, DeviceKind, Op, Request, validate};
use crate::error::{BlockError, ImageError};
use crate::file::{CacheMode, IoFile};
use crate::flusher::Flusher;
use crate::format::{self, BAT_UNUSED, DiskType, FOOTER_SIZE, SECTOR};
use crate::queue::{IoQueue, PostAction, SlotId};
use crate::raw::{DiskOptions, dio_align, needs_bounce};
use batch::MetaState;
use chain::Layer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use zerocopy::IntoBytes;

/// An open VHD (fixed, dynamic or differencing with its parents).
#[derive(Debug)]
pub struct VhdDisk {
    chain: Arc<Vec<Arc<Layer>>>,
    info: DeviceInfo,
    meta_state: Arc<MetaState>,
    /// Strictest O_DIRECT memory alignment in the chain (None: all buffered).
    dio_align: Option<usize>,
    /// Where metadata flushes and space reservations go (a thread started
    /// on first use), so the worker that asked keeps serving its other
    /// requests through their fdatasyncs. Dropping it ends the thread.
    flusher: Flusher,
    /// Set for a live checkpoint's child (see [`live`]): its open parent,
    /// write tracking and mirroring for an online merge.
    live: Option<Arc<live::Live>>,
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
            let file = IoFile::open_image(&current, writable, options)?;
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
                next = Some(find_parent(&current, &file, header, &options.parents)?);
            }
            chain.push(Arc::new(Layer::new(file, meta)));
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
        let disk = VhdDisk {
            meta_state: Arc::new(MetaState::new(top, top.meta.footer_offset)),
            dio_align: chain.iter().filter_map(|l| dio_align(&l.file)).max(),
            chain: Arc::new(chain),
            info,
            flusher: Flusher::new("vhd-flush"),
            live: None,
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

    /// The cache mode the image was opened with.
    pub fn cache_mode(&self) -> CacheMode {
        self.chain[0].file.cache
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
        self.meta_state.set_end(footer_offset);
        Ok(())
    }

    /// Allocates block `block` of the image (in memory; see the module
    /// docs); returns its sector.
    fn allocate(&self, block: u32) -> Result<u32, BlockError> {
        let (sector, refill) = batch::allocate(&self.chain[0], &self.meta_state, block)?;
        if let Some(seen) = refill {
            let chain = Arc::clone(&self.chain);
            let meta = Arc::clone(&self.meta_state);
            let work = Box::new(move || batch::refill(&chain[0], &meta, seen));
            if self.flusher.background(work).is_err() {
                // No flusher thread: allocations reserve space themselves.
                self.meta_state.refill_done();
            }
        }
        Ok(sector)
    }

    /// Writes dirty BAT sectors and bitmaps, bracketed by fdatasyncs (see
    /// the module docs), on the calling thread.
    pub fn flush_metadata(&self) -> Result<(), ImageError> {
        batch::flush_metadata(&self.chain[0], &self.meta_state)
    }

    /// Hands a metadata flush to the flusher thread; request `id`
    /// completes when it is done.
    fn flush_in_background(&self, queue: &mut IoQueue, id: SlotId) -> Result<(), BlockError> {
        let chain = Arc::clone(&self.chain);
        let meta = Arc::clone(&self.meta_state);
        let parent = self.live_parent().cloned();
        let work = Box::new(move || {
            let parent = parent.map_or(Ok(()), |p| p.flush_metadata());
            parent
                .and_then(|()| batch::flush_metadata(&chain[0], &meta))
                .map_err(|e| e.to_string())
        });
        self.flusher.submit(queue, id, work)
    }
}

/// A clean close makes every completed write durable and gives back the
/// reserved space (see the module docs). Errors can only be logged here.
impl Drop for VhdDisk {
    fn drop(&mut self) {
        let layer = &self.chain[0];
        if self.info.read_only || layer.kind == DiskType::Fixed {
            return;
        }
        if let Err(e) = batch::close(layer, &self.meta_state, self.has_dirty_metadata()) {
            tracing::warn!(path = %layer.file.path().display(), "closing the image: {e}");
        }
    }
}

impl VhdDisk {
    fn has_dirty_metadata(&self) -> bool {
        self.meta_state.is_dirty()
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
        if self.live.is_none() {
            return self.plan_own_write(queue, id, offset, len);
        }
        let planned = self
            .track_write(queue, id, offset, len)
            .and_then(|()| self.plan_own_write(queue, id, offset, len));
        // Last, so that it counts the write done only after the bitmap
        // bits are set (post actions run in order), and on failure too.
        self.track_done(queue, id, offset, len);
        planned
    }

    fn plan_own_write(
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
                        always: false,
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
            Op::Flush if self.live.is_some() => self.flush_in_background(queue, id),
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

    fn allocation(&self, offset: u64, blocks: u64) -> Result<(crate::Allocation, u64), BlockError> {
        crate::device::check_extent(&self.info, offset, blocks)?;
        self.allocation_run(offset, blocks)
    }

    fn discard_zeroes(&self) -> bool {
        self.info.supports_discard
    }

    fn as_vhd(self: Arc<Self>) -> Option<Arc<VhdDisk>> {
        Some(self)
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
pub(crate) struct Piece {
    pub(crate) block: u32,
    /// Offset inside the block.
    pub(crate) in_block: u64,
    /// Offset of the piece from the start of the range.
    pub(crate) done: u64,
    pub(crate) len: u64,
}

/// Splits `[offset, offset + len)` at block boundaries.
pub(crate) fn pieces(offset: u64, len: u64, block_size: u64) -> impl Iterator<Item = Piece> {
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
    use std::sync::mpsc;

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

    /// What another reader of the file sees now.
    fn on_disk(path: &Path) -> VhdMeta {
        let file = IoFile::open_unlocked(path).unwrap();
        VhdMeta::read(&file).unwrap()
    }

    #[test]
    fn allocation_is_batched_and_reserved_space_is_given_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.vhd");
        let block = 64u64 << 10;
        crate::create::create_dynamic(&path, 1024 * block, block as u32).unwrap();
        let created = std::fs::metadata(&path).unwrap().len();
        let disk = VhdDisk::open(&path, &DiskOptions::default().cache(CacheMode::Cached)).unwrap();
        let mut io = BlockingIo::new().unwrap();
        let blocks = 300u64;
        for b in 0..blocks {
            io.write(&disk, b * block / SECTOR + 8, &[b as u8 + 1; 4096])
                .unwrap();
        }
        // Nothing referenced on disk yet, and the file still ends in a
        // valid footer past the reserved space.
        let before = on_disk(&path);
        assert!(!before.end_footer_damaged);
        assert!(before.bat.iter().all(|&e| e == BAT_UNUSED));
        assert_eq!(before.file_len % SECTOR, 0);
        assert!(before.leaked_bytes() >= blocks * block, "{before:?}");
        // A flush makes the batch durable: bitmaps all ones, BAT entries.
        io.flush(&disk).unwrap();
        let flushed = on_disk(&path);
        assert!(
            flushed.bat[..blocks as usize]
                .iter()
                .all(|&e| e != BAT_UNUSED)
        );
        let file = IoFile::open_unlocked(&path).unwrap();
        let mut bitmap = vec![0u8; 512];
        file.read_exact_at(&mut bitmap, u64::from(flushed.bat[7]) * SECTOR)
            .unwrap();
        assert!(bitmap.iter().all(|&b| b == 0xff));
        // A clean close flushes what is left and gives the reserved space
        // back.
        let last = blocks;
        io.write(&disk, last * block / SECTOR + 8, &[last as u8 + 1; 4096])
            .unwrap();
        drop((disk, io));
        let closed = on_disk(&path);
        assert_eq!(closed.leaked_bytes(), 0);
        assert_eq!(closed.file_len, closed.data_end + FOOTER_SIZE as u64);
        assert!(closed.file_len <= created + (blocks + 1) * (block + 4096));
        let disk = VhdDisk::open(&path, &DiskOptions::default().read_only(true)).unwrap();
        let mut io = BlockingIo::new().unwrap();
        let mut page = vec![0u8; 4096];
        for b in [0, 7, blocks - 1, last] {
            io.read(&disk, b * block / SECTOR + 8, &mut page).unwrap();
            assert!(page.iter().all(|&x| x == b as u8 + 1));
            io.read(&disk, b * block / SECTOR, &mut page).unwrap();
            assert!(page.iter().all(|&x| x == 0), "new blocks read zeros");
        }
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
            let _held = meta.lock_alloc();
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
