//! Linear disks: a raw file or host block device (passthrough), and the same
//! mapping reused for fixed VHDs (data then footer) and ISO images.

use crate::device::{
    Allocation, BlockDevice, DeviceInfo, DeviceKind, Op, Request, check_extent, validate,
};
use crate::error::{BlockError, ImageError};
use crate::file::{CacheMode, IoFile};
use crate::queue::IoQueue;
use std::path::Path;

/// How to open a disk.
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// Open read-only (writes and discards fail with `BlockError::ReadOnly`).
    pub read_only: bool,
    pub cache: CacheMode,
    /// Longest differencing chain accepted (child included).
    pub max_chain_depth: usize,
    /// How long an open waits for conflicting image locks to go.
    pub lock_wait: std::time::Duration,
    /// Where a differencing disk's parents may be.
    pub parents: crate::vhd::ParentPolicy,
    /// Take and check no image locks (QEMU's force-share, `-U`): read-only
    /// tool opens that accept an image others may be changing.
    pub force_share: bool,
    /// Take no image locks at all, also for a read-write open: for tools
    /// that hold [`crate::ImageLock`]s of their own on every file they
    /// touch (a merge writes a parent its child's chain would lock).
    pub unlocked: bool,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            read_only: false,
            cache: CacheMode::Direct,
            max_chain_depth: 32,
            lock_wait: crate::file::LOCK_WAIT,
            parents: Default::default(),
            force_share: false,
            unlocked: false,
        }
    }
}

impl DiskOptions {
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    pub fn cache(mut self, cache: CacheMode) -> Self {
        self.cache = cache;
        self
    }

    pub fn force_share(mut self, force_share: bool) -> Self {
        self.force_share = force_share;
        self
    }
}

/// A disk whose blocks map linearly onto a byte range of one file.
#[derive(Debug)]
pub struct RawDisk {
    file: IoFile,
    info: DeviceInfo,
    /// Bytes of backing data; a raw file's partial last block reads as
    /// zeros past this.
    data_len: u64,
}

impl RawDisk {
    /// Opens a raw file or host block device as a 512-byte-block disk. A
    /// trailing partial sector reads as if padded with zeros (as qemu does);
    /// a read-write open pads the file to a whole sector.
    pub fn open(path: &Path, options: &DiskOptions) -> Result<RawDisk, ImageError> {
        let mut file = IoFile::open_image(path, !options.read_only, options)?;
        let mut size = file.len()?;
        if size % 512 != 0 && file.writable && !file.block_device {
            // Writes may land in the partial last sector: pad it with zeros
            // once, so reads and writes see one length.
            size = size.div_ceil(512) * 512;
            file.set_len(size)?;
        }
        if size % 512 != 0 && file.direct {
            // O_DIRECT cannot read a partial tail; such files are rare.
            let cached = options.clone().cache(crate::file::CacheMode::Cached);
            drop(file); // release the lock before taking it again
            file = IoFile::open_image(path, !options.read_only, &cached)?;
        }
        let id = file.derived_id();
        Ok(RawDisk::linear(file, 512, size, DeviceKind::Raw, id, true))
    }

    /// A linear disk over the first `size` bytes of `file`.
    pub(crate) fn linear(
        file: IoFile,
        block_size: u32,
        size: u64,
        kind: DeviceKind,
        unique_id: [u8; 16],
        supports_discard: bool,
    ) -> RawDisk {
        let read_only = !file.writable;
        let info = DeviceInfo {
            block_size,
            blocks: size.div_ceil(u64::from(block_size)),
            read_only,
            supports_discard: supports_discard && !read_only,
            unique_id,
            kind,
        };
        RawDisk {
            file,
            info,
            data_len: size,
        }
    }

    /// True when the data descriptor uses O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.file.direct
    }
}

/// Memory alignment O_DIRECT needs for `file`, None when buffered.
pub(crate) fn dio_align(file: &IoFile) -> Option<usize> {
    file.direct.then_some(file.mem_align)
}

/// True when the request must go through a bounce buffer: some descriptor
/// it uses is O_DIRECT (needing `align`) and some segment is not aligned.
pub(crate) fn needs_bounce(align: Option<usize>, iov: &[libc::iovec]) -> bool {
    align.is_some_and(|align| !aligned(align, iov))
}

fn aligned(align: usize, iov: &[libc::iovec]) -> bool {
    iov.iter()
        .all(|v| (v.iov_base as usize).is_multiple_of(align) && v.iov_len.is_multiple_of(512))
}

impl BlockDevice for RawDisk {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// Holes of a sparse file (SEEK_DATA/SEEK_HOLE); a block device is all
    /// data. A block holding any data counts as data.
    fn allocation(&self, offset: u64, blocks: u64) -> Result<(Allocation, u64), BlockError> {
        check_extent(&self.info, offset, blocks)?;
        if self.file.block_device {
            return Ok((Allocation::Data, blocks));
        }
        let bs = u64::from(self.info.block_size);
        let (start, end) = (offset * bs, (offset + blocks) * bs);
        if start >= self.data_len {
            // The zero padding past a partial last sector.
            return Ok((Allocation::Hole, blocks));
        }
        Ok(
            match crate::seek::run_at(&self.file.meta, start, end.min(self.data_len)) {
                crate::seek::FileRun::Hole(to) if to - start >= bs => {
                    let run = if to >= self.data_len { end } else { to };
                    (Allocation::Hole, (run - start) / bs)
                }
                crate::seek::FileRun::Hole(_) => (Allocation::Data, 1),
                crate::seek::FileRun::Data(to) => (Allocation::Data, (to - start).div_ceil(bs)),
            },
        )
    }

    fn discard_zeroes(&self) -> bool {
        // A punched hole reads zeros; BLKDISCARD promises nothing.
        self.info.supports_discard && !self.file.block_device
    }

    fn submit(&self, queue: &mut IoQueue, req: Request<'_>) -> Result<(), BlockError> {
        let bytes = validate(&self.info, &req)?;
        let offset = req.offset * u64::from(self.info.block_size);
        let bounce = needs_bounce(dio_align(&self.file), req.iov);
        let id = queue.begin(req.tag, req.iov, bounce)?;
        let planned = match req.op {
            Op::Read | Op::Write => {
                let write = req.op == Op::Write;
                let in_file = if write {
                    bytes
                } else {
                    bytes.min(self.data_len.saturating_sub(offset))
                };
                queue
                    .add_rw(id, &self.file, write, offset, 0, in_file)
                    .and_then(|()| match bytes - in_file {
                        0 => Ok(()),
                        tail => queue.add_zero(id, in_file, tail),
                    })
            }
            Op::Flush => {
                if !self.info.read_only {
                    queue.add_fsync(id, &self.file);
                }
                Ok(())
            }
            Op::Discard if self.file.block_device => self
                .file
                .blk_discard(offset, bytes)
                .map_err(|e| BlockError::from_io(&e)),
            Op::Discard => {
                queue.add_punch(id, &self.file, offset, bytes);
                Ok(())
            }
        };
        match planned {
            Ok(()) => queue.commit(id),
            Err(err) => {
                queue.cancel(id);
                Err(err)
            }
        }
    }
}
