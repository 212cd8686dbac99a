//! Batched block allocation and metadata flushes of the writable layer of a
//! dynamic or differencing VHD: reserved space at the end of the file,
//! allocation in memory, batched metadata made durable by the next flush
//! (run on the image's flusher thread, `crate::flusher`, like the space
//! reservations), and what a close writes. The crash-safety argument is in
//! the parent module's docs. (Allocation *queries* are in `allocation`.)

use super::chain::Layer;
use crate::error::{BlockError, ImageError};
use crate::format::{BAT_UNUSED, DiskType, FOOTER_SIZE, SECTOR};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use zerocopy::IntoBytes;

/// New blocks place their data area on this boundary.
const DATA_ALIGN: u64 = 4096;
/// Smallest and largest step by which the reserved space grows (at least
/// two blocks either way).
const MIN_RESERVE: u64 = 16 << 20;
const MAX_RESERVE: u64 = 256 << 20;

/// Allocation state, under [`MetaState::alloc`].
#[derive(Debug)]
pub(super) struct AllocState {
    /// Where the footer is: the end of the reserved space.
    footer_offset: u64,
    /// Where the next block goes. `[next_free, footer_offset)` is reserved:
    /// it reads zeros and nothing on disk references it.
    next_free: u64,
    /// BAT sectors changed since the last flush.
    dirty_bat: Vec<bool>,
    /// Offsets of the sector bitmaps of dynamic blocks allocated since the
    /// last flush (all ones on disk before their BAT entries are written).
    new_bitmaps: Vec<u64>,
    /// Blocks not allocated yet (bounds the reservation).
    unallocated: u64,
    /// Size of the last reservation step.
    step: u64,
    /// A background reservation is queued on the flusher thread.
    refill_pending: bool,
}

/// Metadata state of the image, shared with the flusher thread.
#[derive(Debug)]
pub(super) struct MetaState {
    alloc: Mutex<AllocState>,
    /// Held through a whole metadata flush.
    flush: Mutex<()>,
    /// Held while the reserved space grows or shrinks (footer moves).
    extend: Mutex<()>,
    /// Set by allocations, cleared by flush: lets a flush with nothing to
    /// write skip the mutex.
    meta_dirty: AtomicBool,
    /// The image is closed: no more reservations.
    closed: AtomicBool,
}

/// Ignores mutex poisoning: every state behind these mutexes is updated in
/// steps that each leave it consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MetaState {
    /// State of `layer` as opened, its footer at `footer_offset`.
    pub(super) fn new(layer: &Layer, footer_offset: u64) -> MetaState {
        let bat_sectors = if layer.kind == DiskType::Fixed {
            0
        } else {
            (layer.bat.len() * 4).div_ceil(SECTOR as usize)
        };
        let unallocated = layer
            .bat
            .iter()
            .filter(|e| e.load(Ordering::Relaxed) == BAT_UNUSED)
            .count() as u64;
        MetaState {
            alloc: Mutex::new(AllocState {
                footer_offset,
                next_free: footer_offset,
                dirty_bat: vec![false; bat_sectors],
                new_bitmaps: Vec::new(),
                unallocated,
                step: 0,
                refill_pending: false,
            }),
            flush: Mutex::new(()),
            extend: Mutex::new(()),
            meta_dirty: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    pub(super) fn lock_alloc(&self) -> MutexGuard<'_, AllocState> {
        lock(&self.alloc)
    }

    /// The footer was moved to `offset` (an open's repair): nothing is
    /// reserved.
    pub(super) fn set_end(&self, offset: u64) {
        let mut state = self.lock_alloc();
        state.footer_offset = offset;
        state.next_free = offset;
    }

    /// A background reservation could not be queued.
    pub(super) fn refill_done(&self) {
        self.lock_alloc().refill_pending = false;
    }

    pub(super) fn is_dirty(&self) -> bool {
        self.meta_dirty.load(Ordering::Acquire)
    }
}

/// Where a block placed at `region` lies: (its sector, the end of its data).
fn place(layer: &Layer, region: u64) -> (u64, u64) {
    // The data area starts on a 4 KiB boundary: page-aligned data makes
    // every 4 KiB guest I/O one page cache page (and lets buffered writes
    // run inline). The gap costs < 4 KiB a block.
    let data_start = (region + layer.bitmap_bytes).next_multiple_of(DATA_ALIGN);
    (
        data_start - layer.bitmap_bytes,
        data_start + layer.block_size,
    )
}

/// Most bytes one more block can take.
fn block_extent(layer: &Layer) -> u64 {
    layer.bitmap_bytes + DATA_ALIGN + layer.block_size
}

/// Allocates block `block` of `layer` in memory; returns its sector and,
/// when the reserved space is running low, the footer offset a background
/// step should start from (the caller asks the flusher thread for it).
/// Takes more reserved space synchronously only when none is left.
pub(super) fn allocate(
    layer: &Layer,
    meta: &MetaState,
    block: u32,
) -> Result<(u32, Option<u64>), BlockError> {
    loop {
        let mut state = meta.lock_alloc();
        let current = layer.bat[block as usize].load(Ordering::Acquire);
        if current != BAT_UNUSED {
            return Ok((current, None));
        }
        let (start, end) = place(layer, state.next_free);
        if end > state.footer_offset {
            drop(state);
            extend(layer, meta, Need::Past(end))
                .map_err(|e| BlockError::Metadata(e.to_string()))?;
            if meta.closed.load(Ordering::Acquire) {
                return Err(BlockError::Metadata("the image is closed".into()));
            }
            continue;
        }
        let sector = u32::try_from(start / SECTOR)
            .ok()
            .filter(|&s| s != BAT_UNUSED)
            .ok_or_else(|| BlockError::Metadata("image file exceeds 2 TiB".into()))?;
        state.next_free = end;
        state.unallocated = state.unallocated.saturating_sub(1);
        if layer.kind == DiskType::Differencing {
            // The bitmap on disk reads zeros already (reserved space).
            let zeros = vec![0u8; layer.bitmap_bytes as usize];
            let _ = layer.bitmaps[block as usize].set(layer.new_bitmap(block, &zeros));
        } else {
            state.new_bitmaps.push(start);
        }
        layer.bat[block as usize].store(sector, Ordering::Release);
        if let Some(flag) = state
            .dirty_bat
            .get_mut(block as usize * 4 / SECTOR as usize)
        {
            *flag = true;
        }
        meta.meta_dirty.store(true, Ordering::Release);
        let low = state.footer_offset - state.next_free < state.step / 2;
        let refill = low && state.unallocated > 0 && !state.refill_pending;
        state.refill_pending |= refill;
        return Ok((sector, refill.then_some(state.footer_offset)));
    }
}

/// How much reserved space an extension must add.
#[derive(Debug, Clone, Copy)]
pub(super) enum Need {
    /// Enough that it ends at this offset or later (an allocation waits).
    Past(u64),
    /// One step, unless the footer has moved from this offset meanwhile
    /// (a background refill made obsolete by another extension).
    StepFrom(u64),
}

/// Grows the reserved space: the footer is written further on and made
/// durable, then the old footer is zeroed (it lies in reserved space,
/// which must read zeros), and only then may blocks be placed over it.
pub(super) fn extend(layer: &Layer, meta: &MetaState, need: Need) -> Result<(), ImageError> {
    let _extending = lock(&meta.extend);
    let (old, target) = {
        let mut state = meta.lock_alloc();
        let at_least = match need {
            Need::Past(end) if end > state.footer_offset => end,
            Need::StepFrom(seen) if seen == state.footer_offset => 0,
            _ => return Ok(()),
        };
        if meta.closed.load(Ordering::Acquire) {
            return Ok(());
        }
        let extent = block_extent(layer);
        let step = (state.step * 2).clamp(MIN_RESERVE.max(2 * extent), MAX_RESERVE.max(2 * extent));
        // Never more than every block left could take.
        let most = state.next_free + state.unallocated * extent;
        let target = (state.footer_offset + step)
            .min(most)
            .max(at_least)
            .next_multiple_of(SECTOR);
        if target <= state.footer_offset {
            return Ok(());
        }
        state.step = step;
        (state.footer_offset, target)
    };
    let mut footer = layer.meta.footer.clone();
    footer.seal();
    layer.file.write_all_at(footer.as_bytes(), target)?;
    layer.file.sync_data()?;
    layer.file.write_all_at(&[0u8; FOOTER_SIZE], old)?;
    meta.lock_alloc().footer_offset = target;
    Ok(())
}

/// More reserved space, on the flusher thread; see [`allocate`].
pub(super) fn refill(layer: &Layer, meta: &MetaState, seen: u64) {
    let extended = extend(layer, meta, Need::StepFrom(seen));
    meta.refill_done();
    if let Err(e) = extended {
        // The next allocation that finds no room tries again and reports.
        tracing::warn!(path = %layer.file.path().display(), "reserving space: {e}");
    }
}

/// Writes the dirty metadata of `layer` (see the module docs for the
/// order), on the calling thread.
pub(super) fn flush_metadata(layer: &Layer, meta: &MetaState) -> Result<(), ImageError> {
    if layer.kind == DiskType::Fixed || !layer.file.writable {
        return layer.file.sync_data();
    }
    // One flush at a time: a flush that copied a BAT sector earlier must not
    // write it after a later flush wrote a newer copy.
    let _flushing = lock(&meta.flush);
    // Capture before the first fdatasync, under the allocation mutex: every
    // BAT entry copied belongs to a finished allocation, whose new bitmap
    // is captured with it, and a bitmap bit is set only once its data write
    // completed, so the fdatasync makes all they expose durable before
    // they are written. Allocations and writes go on meanwhile; what they
    // change waits for the next flush.
    let (ones, captured) = {
        let mut state = meta.lock_alloc();
        meta.meta_dirty.store(false, Ordering::Release);
        let ones = std::mem::take(&mut state.new_bitmaps);
        (ones, capture_metadata(layer, &mut state))
    };
    let all_ones = vec![0xffu8; layer.bitmap_bytes as usize];
    let written = (|| {
        for &offset in &ones {
            layer.file.write_all_at(&all_ones, offset)?;
        }
        layer.file.sync_data()?;
        for m in &captured {
            layer.file.write_all_at(&m.bytes, m.offset)?;
        }
        layer.file.sync_data()
    })();
    if written.is_err() {
        // Nothing is known to be on disk: mark it all dirty again.
        let mut state = meta.lock_alloc();
        state.new_bitmaps.extend_from_slice(&ones);
        restore_dirty(layer, meta, &mut state, &captured);
        meta.meta_dirty.store(true, Ordering::Release);
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

/// A clean close: dirty metadata is flushed (so a reopen finds every
/// completed write), and the footer moves back over the unused reserved
/// space (written and made durable first, then the file is cut after it),
/// so a closed image ends right after its last block, as if space had been
/// allocated one block at a time.
pub(super) fn close(layer: &Layer, meta: &MetaState, dirty: bool) -> Result<(), ImageError> {
    let _extending = lock(&meta.extend);
    meta.closed.store(true, Ordering::Release);
    if dirty {
        flush_metadata(layer, meta)?;
    }
    let (next_free, footer_offset) = {
        let state = meta.lock_alloc();
        (state.next_free, state.footer_offset)
    };
    if next_free == footer_offset {
        return Ok(());
    }
    let mut footer = layer.meta.footer.clone();
    footer.seal();
    layer.file.write_all_at(footer.as_bytes(), next_free)?;
    layer.file.sync_data()?;
    layer.file.set_len(next_free + FOOTER_SIZE as u64)?;
    meta.set_end(next_free);
    Ok(())
}
