//! The layers of an open chain: per-file BAT atomics and lazily loaded
//! differencing sector bitmaps.

use super::meta::VhdMeta;
use crate::error::BlockError;
use crate::file::IoFile;
use crate::format::{DiskType, SECTOR, bitmap_size};
use crate::queue::OnComplete;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// A differencing block's sector bitmap (MSB first, as on disk).
#[derive(Debug)]
pub(super) struct SectorBitmap {
    pub(super) bits: Box<[AtomicU8]>,
    pub(super) block: u32,
    /// Set when bits changed since the last flush wrote them.
    pub(super) dirty: AtomicBool,
    /// The owning layer's dirty-block index (one bit per block).
    pub(super) dirty_index: Arc<[AtomicU64]>,
}

impl SectorBitmap {
    pub(super) fn is_set(&self, sector: u64) -> bool {
        self.bits
            .get((sector / 8) as usize)
            .is_some_and(|b| b.load(Ordering::Acquire) & (0x80 >> (sector % 8)) != 0)
    }

    /// Queues the bitmap for the next metadata flush.
    pub(super) fn mark_dirty(&self) {
        if !self.dirty.swap(true, Ordering::AcqRel)
            && let Some(word) = self.dirty_index.get(self.block as usize / 64)
        {
            word.fetch_or(1 << (self.block % 64), Ordering::AcqRel);
        }
    }

    pub(super) fn snapshot(&self) -> Vec<u8> {
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
        self.mark_dirty();
    }
}

/// One file of the chain.
#[derive(Debug)]
pub(super) struct Layer {
    pub(super) file: IoFile,
    pub(super) meta: VhdMeta,
    pub(super) kind: DiskType,
    pub(super) size: u64,
    pub(super) block_size: u64,
    pub(super) bitmap_bytes: u64,
    pub(super) bat: Box<[AtomicU32]>,
    /// Differencing bitmaps, loaded on first use.
    pub(super) bitmaps: Box<[OnceLock<Arc<SectorBitmap>>]>,
    pub(super) dirty_bitmaps: Arc<[AtomicU64]>,
}

impl Layer {
    pub(super) fn new(file: IoFile, meta: VhdMeta) -> Layer {
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
    pub(super) fn bitmap(&self, block: u32, sector: u32) -> Result<&Arc<SectorBitmap>, BlockError> {
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

    pub(super) fn new_bitmap(&self, block: u32, bytes: &[u8]) -> Arc<SectorBitmap> {
        Arc::new(SectorBitmap {
            bits: bytes.iter().map(|&b| AtomicU8::new(b)).collect(),
            block,
            dirty: AtomicBool::new(false),
            dirty_index: self.dirty_bitmaps.clone(),
        })
    }
}
