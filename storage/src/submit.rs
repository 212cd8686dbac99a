//! The one place the storage VSP hands guest memory to io_uring.
#![allow(unsafe_code)]

use vhd::{BlockDevice, BlockError, IoQueue, Op, Request};

/// Submits a read or write whose iovecs point into guest memory.
///
/// The iovecs were built from `SharedMemory::slice` ranges of the channel's
/// guest memory, which the worker keeps mapped (it holds the `SharedMemory`)
/// until it has reaped every request, so the memory outlives the I/O. The
/// guest may change or read that memory concurrently; that only affects the
/// guest's own data, never host memory.
pub(crate) fn guest_io(
    queue: &mut IoQueue,
    device: &dyn BlockDevice,
    op: Op,
    lba: u64,
    blocks: u32,
    iov: &[libc::iovec],
    tag: u64,
) -> Result<(), BlockError> {
    // SAFETY: see above: every iovec lies in mapped guest memory that stays
    // mapped until this request is reaped.
    let req = unsafe { Request::new(op, lba, blocks, iov, tag) };
    device.submit(queue, req)
}

/// Submits a write from a worker-owned pattern buffer (WRITE SAME).
///
/// The buffer belongs to the command's slot, which is not reused (nor its
/// buffer changed) until every request of the command has been reaped.
pub(crate) fn pattern_write(
    queue: &mut IoQueue,
    device: &dyn BlockDevice,
    lba: u64,
    blocks: u32,
    iov: &[libc::iovec],
    tag: u64,
) -> Result<(), BlockError> {
    // SAFETY: the slot's pattern buffer outlives the request (see above).
    let req = unsafe { Request::new(Op::Write, lba, blocks, iov, tag) };
    device.submit(queue, req)
}
