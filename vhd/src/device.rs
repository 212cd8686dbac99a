//! The one block interface every backend implements.

use crate::error::BlockError;
use crate::queue::IoQueue;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Read `blocks` blocks into the scatter-gather list.
    Read,
    /// Write `blocks` blocks from the scatter-gather list.
    Write,
    /// Make every write completed before this request durable.
    Flush,
    /// The range's contents are no longer needed (reads may return anything
    /// the backend chooses, in practice zeros).
    Discard,
}

/// One block request.
///
/// `iov` points into caller memory (later: a guest's shared memory). The
/// iovec array itself is copied during `submit` and need not outlive it;
/// the memory it describes must stay valid until the completion is reaped,
/// which is why building a read or write request is `unsafe`.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub(crate) op: Op,
    pub(crate) offset: u64,
    pub(crate) blocks: u32,
    pub(crate) iov: &'a [libc::iovec],
    pub(crate) tag: u64,
}

impl<'a> Request<'a> {
    /// A request of `blocks` blocks at block `offset`, scatter-gathering
    /// through `iov`, reported with `tag`.
    ///
    /// # Safety
    /// For a read, every iovec must describe memory writable for its length;
    /// for a write, readable. That memory must stay valid, and must not be
    /// accessed by anyone else (for a read) or changed (for a write), from
    /// `submit` until this request's completion is reaped from the queue,
    /// since the kernel accesses it asynchronously.
    #[allow(unsafe_code)] // declares the caller contract; no unsafe operation here
    pub unsafe fn new(op: Op, offset: u64, blocks: u32, iov: &'a [libc::iovec], tag: u64) -> Self {
        Request {
            op,
            offset,
            blocks,
            iov,
            tag,
        }
    }

    /// Makes every completed write durable.
    pub fn flush(tag: u64) -> Request<'static> {
        Request {
            op: Op::Flush,
            offset: 0,
            blocks: 0,
            iov: &[],
            tag,
        }
    }

    /// Discards `blocks` blocks at block `offset`.
    pub fn discard(offset: u64, blocks: u32, tag: u64) -> Request<'static> {
        Request {
            op: Op::Discard,
            offset,
            blocks,
            iov: &[],
            tag,
        }
    }

    pub fn op(&self) -> Op {
        self.op
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn blocks(&self) -> u32 {
        self.blocks
    }

    pub fn tag(&self) -> u64 {
        self.tag
    }

    pub fn iov(&self) -> &'a [libc::iovec] {
        self.iov
    }
}

/// The backend behind a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A raw file or host block device.
    Raw,
    /// A fixed VHD.
    VhdFixed,
    /// A dynamic VHD.
    VhdDynamic,
    /// A differencing VHD (and its parent chain).
    VhdDifferencing,
    /// An ISO 9660 image, exposed as read-only DVD media.
    Iso,
    /// A fixed VHDX.
    VhdxFixed,
    /// A dynamic VHDX.
    VhdxDynamic,
    /// A differencing VHDX (and its parent chain).
    VhdxDifferencing,
    /// An export of an NBD server (see [`crate::nbd`]).
    Nbd,
}

/// Static facts about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Logical block size: 512, 4096 (VHDX with 4 KiB sectors), or 2048
    /// for DVD media.
    pub block_size: u32,
    /// Capacity in logical blocks.
    pub blocks: u64,
    pub read_only: bool,
    pub supports_discard: bool,
    /// Stable identity: the VHD unique id; for raw and ISO a deterministic
    /// hash of the backing file's device and inode (or the ISO's volume data).
    pub unique_id: [u8; 16],
    pub kind: DeviceKind,
}

impl DeviceInfo {
    /// Capacity in bytes.
    pub fn size(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }
}

/// An open disk: shared by several workers (`Arc<dyn BlockDevice>`), each
/// submitting on its own [`IoQueue`].
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    fn info(&self) -> &DeviceInfo;

    /// Validates `req` and queues its I/O on `queue`. On `Ok` exactly one
    /// completion with `req.tag` is later returned by [`IoQueue::reap`]; on
    /// `Err` none is. SQEs are only pushed; the caller submits them with
    /// [`IoQueue::submit`] once per poll-loop iteration.
    fn submit(&self, queue: &mut IoQueue, req: Request<'_>) -> Result<(), BlockError>;

    /// Physical block size to report to guests (alignment hint); the
    /// logical block size unless the backend knows better.
    fn physical_block_size(&self) -> u32 {
        self.info().block_size
    }
    /// Allocation of the blocks from block `offset` on: the state of the
    /// first one and how many (at least 1, at most `blocks`) share it.
    /// Control-plane work (sparse copies, NBD block status), not for the
    /// data path; backends that cannot tell report data.
    fn allocation(&self, offset: u64, blocks: u64) -> Result<(Allocation, u64), BlockError> {
        check_extent(self.info(), offset, blocks)?;
        Ok((Allocation::Data, blocks))
    }

    /// True when a completed discard leaves its range reading as zeros (a
    /// hole punched in a file), so a discard may stand in for writing
    /// zeros.
    fn discard_zeroes(&self) -> bool {
        false
    }
}

/// What backs a run of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Allocated; the contents must be read.
    Data,
    /// Allocated and known to read as zeros.
    Zero,
    /// Not allocated: reads as zeros (writing may allocate).
    Hole,
}

impl Allocation {
    /// True when the run reads as zeros without reading it.
    pub fn reads_zero(self) -> bool {
        self != Allocation::Data
    }
}

/// Checks an allocation query: at least one block, all inside the device.
pub fn check_extent(info: &DeviceInfo, offset: u64, blocks: u64) -> Result<(), BlockError> {
    let end = offset.checked_add(blocks);
    if blocks == 0 || end.is_none_or(|end| end > info.blocks) {
        return Err(BlockError::OutOfRange {
            offset,
            blocks: u32::try_from(blocks).unwrap_or(u32::MAX),
            capacity: info.blocks,
        });
    }
    Ok(())
}

/// Checks a request against the device; returns its length in bytes.
pub fn validate(info: &DeviceInfo, req: &Request<'_>) -> Result<u64, BlockError> {
    if req.op == Op::Flush {
        return if req.blocks == 0 && req.iov.is_empty() {
            Ok(0)
        } else {
            Err(BlockError::LengthMismatch {
                expected: 0,
                actual: iov_len(req.iov) + u64::from(req.blocks),
            })
        };
    }
    let end = req.offset.checked_add(u64::from(req.blocks));
    if end.is_none_or(|end| end > info.blocks) {
        return Err(BlockError::OutOfRange {
            offset: req.offset,
            blocks: req.blocks,
            capacity: info.blocks,
        });
    }
    if matches!(req.op, Op::Write | Op::Discard) && info.read_only {
        return Err(BlockError::ReadOnly);
    }
    if req.op == Op::Discard && !info.supports_discard {
        return Err(BlockError::DiscardUnsupported);
    }
    let bytes = u64::from(req.blocks) * u64::from(info.block_size);
    if req.op != Op::Discard && bytes > u64::from(u32::MAX) {
        return Err(BlockError::TooLarge(bytes));
    }
    let actual = iov_len(req.iov);
    let expected = if req.op == Op::Discard { 0 } else { bytes };
    if actual != expected {
        return Err(BlockError::LengthMismatch { expected, actual });
    }
    Ok(bytes)
}

/// Total length of a scatter-gather list.
pub fn iov_len(iov: &[libc::iovec]) -> u64 {
    iov.iter().map(|v| v.iov_len as u64).sum()
}
