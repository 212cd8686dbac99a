//! Allocation queries over a chain: a sector is data when some layer holds
//! it (a fixed layer, an allocated dynamic block, a set differencing bitmap
//! bit) and a hole when none does. Used for NBD block status and sparse
//! copies; reads the same BAT atomics and bitmaps the data path does.

use super::VhdDisk;
use crate::device::Allocation;
use crate::error::BlockError;
use crate::format::{BAT_UNUSED, DiskType, SECTOR};
use std::sync::atomic::Ordering;

/// Runs looked at per query before answering with what is known so far.
const MAX_STEPS: usize = 4096;

impl VhdDisk {
    /// The allocation of sectors from `sector` on (at most `max`, at least
    /// one): the first run's state, extended over following runs of the
    /// same state.
    pub(super) fn allocation_run(
        &self,
        sector: u64,
        max: u64,
    ) -> Result<(Allocation, u64), BlockError> {
        let (first, mut total) = self.present_run(0, sector, max)?;
        let mut steps = 1;
        while total < max && steps < MAX_STEPS {
            let (present, run) = self.present_run(0, sector + total, max - total)?;
            if present != first {
                break;
            }
            total += run;
            steps += 1;
        }
        let state = if first {
            Allocation::Data
        } else {
            Allocation::Hole
        };
        Ok((state, total))
    }

    /// Whether layers `depth..` hold sector `sector`, and for how many
    /// sectors (at least one, at most `max`) that stays so.
    fn present_run(&self, depth: usize, sector: u64, max: u64) -> Result<(bool, u64), BlockError> {
        let Some(layer) = self.chain.get(depth) else {
            return Ok((false, max));
        };
        let layer_sectors = layer.size / SECTOR;
        if sector >= layer_sectors {
            // Past the end of a smaller parent: reads zeros.
            return Ok((false, max));
        }
        let max = max.min(layer_sectors - sector);
        if layer.kind == DiskType::Fixed {
            return Ok((true, max));
        }
        let per_block = layer.block_size / SECTOR;
        let block = sector / per_block;
        let in_block = sector % per_block;
        let max = max.min(per_block - in_block);
        let entry = layer
            .bat
            .get(block as usize)
            .map_or(BAT_UNUSED, |e| e.load(Ordering::Acquire));
        match (layer.kind, entry == BAT_UNUSED) {
            (DiskType::Dynamic, unused) => Ok((!unused, max)),
            (_, true) => self.present_run(depth + 1, sector, max),
            (_, false) => {
                let bitmap = layer.bitmap(block as u32, entry)?;
                let here = bitmap.is_set(in_block);
                let mut run = 1;
                while run < max && bitmap.is_set(in_block + run) == here {
                    run += 1;
                }
                if here {
                    Ok((true, run))
                } else {
                    self.present_run(depth + 1, sector, run)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Allocation, BlockDevice, BlockingIo, CacheMode, DiskOptions, VhdDisk};

    const MIB: u64 = 1 << 20;

    #[test]
    fn dynamic_and_differencing_runs_follow_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vhd");
        let child = dir.path().join("child.vhd");
        crate::create::create_dynamic(&base, 8 * MIB, MIB as u32).unwrap();
        let options = DiskOptions::default().cache(CacheMode::Cached);
        {
            let disk = VhdDisk::open(&base, &options).unwrap();
            let mut io = BlockingIo::new().unwrap();
            // Block 2 (sectors 4096..6144) allocated by a write in it.
            io.write(&disk, 4096 + 8, &[7u8; 4096]).unwrap();
            io.flush(&disk).unwrap();
            assert_eq!(disk.allocation(0, 16384).unwrap(), (Allocation::Hole, 4096));
            assert_eq!(
                disk.allocation(4096, 12288).unwrap(),
                (Allocation::Data, 2048)
            );
            assert_eq!(disk.allocation(4100, 10).unwrap(), (Allocation::Data, 10));
            assert_eq!(
                disk.allocation(6144, 10240).unwrap(),
                (Allocation::Hole, 10240)
            );
            assert!(disk.allocation(16383, 2).is_err());
            assert!(disk.allocation(0, 0).is_err());
        }
        crate::create::create_differencing(&child, &base, MIB as u32).unwrap();
        let disk = VhdDisk::open(&child, &options).unwrap();
        let mut io = BlockingIo::new().unwrap();
        // Sectors 100..108 of the child; block 2 comes from the parent.
        io.write(&disk, 100, &[9u8; 4096]).unwrap();
        assert_eq!(disk.allocation(0, 16384).unwrap(), (Allocation::Hole, 100));
        assert_eq!(disk.allocation(100, 16284).unwrap(), (Allocation::Data, 8));
        assert_eq!(
            disk.allocation(108, 16276).unwrap(),
            (Allocation::Hole, 4096 - 108)
        );
        assert_eq!(
            disk.allocation(4096, 12288).unwrap(),
            (Allocation::Data, 2048)
        );
    }
}
