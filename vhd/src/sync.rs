//! [`BlockingIo`]: run requests to completion one at a time on a private
//! queue, over owned byte buffers. For tools and tests, not the data path.
//!
//! The queue registers no files: between calls it holds no reference to
//! any image, so dropping a device releases its image locks at once.

use crate::device::{BlockDevice, Op, Request};
use crate::error::BlockError;
use crate::queue::{Completion, IoQueue};

/// A private queue that runs one request at a time and waits for it.
#[derive(Debug)]
pub struct BlockingIo {
    queue: IoQueue,
    next_tag: u64,
}

impl BlockingIo {
    pub fn new() -> std::io::Result<BlockingIo> {
        Ok(BlockingIo {
            queue: IoQueue::with_config(crate::queue::QueueConfig {
                slots: 4,
                ring_entries: 8,
                registered_files: 0,
                ..Default::default()
            })?,
            next_tag: 0,
        })
    }

    /// Reads `buf.len()` bytes (a whole number of blocks) at block `offset`.
    pub fn read(
        &mut self,
        dev: &dyn BlockDevice,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), BlockError> {
        let blocks = blocks_of(dev, buf.len())?;
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: `buf` is exclusively borrowed for this call, and `run`
        // returns only once the request's completion has been reaped.
        let req = unsafe { Request::new(Op::Read, offset, blocks, &iov, 0) };
        self.run(dev, req)
    }

    /// Writes `buf` (a whole number of blocks) at block `offset`.
    pub fn write(
        &mut self,
        dev: &dyn BlockDevice,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), BlockError> {
        let blocks = blocks_of(dev, buf.len())?;
        let iov = [libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        }];
        // SAFETY: `buf` is borrowed (unchanged) for this call, and `run`
        // returns only once the request's completion has been reaped; the
        // kernel only reads it.
        let req = unsafe { Request::new(Op::Write, offset, blocks, &iov, 0) };
        self.run(dev, req)
    }

    /// The whole device's contents (tools and tests; it is all in memory).
    pub fn read_all(&mut self, dev: &dyn BlockDevice) -> Result<Vec<u8>, BlockError> {
        let block = u64::from(dev.info().block_size);
        let size = usize::try_from(dev.info().size())
            .map_err(|_| BlockError::TooLarge(dev.info().size()))?;
        let mut out = vec![0u8; size];
        let chunk = (1usize << 20).div_ceil(block as usize) * block as usize;
        for (i, part) in out.chunks_mut(chunk).enumerate() {
            self.read(dev, (i * chunk) as u64 / block, part)?;
        }
        Ok(out)
    }

    pub fn flush(&mut self, dev: &dyn BlockDevice) -> Result<(), BlockError> {
        self.run(dev, Request::flush(0))
    }

    pub fn discard(
        &mut self,
        dev: &dyn BlockDevice,
        offset: u64,
        blocks: u32,
    ) -> Result<(), BlockError> {
        self.run(dev, Request::discard(offset, blocks, 0))
    }

    fn run(&mut self, dev: &dyn BlockDevice, mut req: Request<'_>) -> Result<(), BlockError> {
        self.next_tag = (self.next_tag + 1) & !(1 << 63);
        let tag = self.next_tag;
        req.tag = tag;
        dev.submit(&mut self.queue, req)?;
        let mut outcome = None;
        while outcome.is_none() {
            // A wait error cannot abandon the request: the kernel may still
            // be using the caller's buffer, so keep waiting.
            if let Err(err) = self.queue.submit_and_wait() {
                tracing::warn!("io_uring wait failed: {err}; retrying");
                std::thread::yield_now();
            }
            self.queue.reap(|c| {
                if let Completion::Request { tag: t, result } = c
                    && t == tag
                {
                    outcome = Some(result);
                }
            });
        }
        outcome.unwrap_or(Ok(0)).map(|_| ())
    }
}

fn blocks_of(dev: &dyn BlockDevice, len: usize) -> Result<u32, BlockError> {
    let bs = dev.info().block_size as usize;
    if !len.is_multiple_of(bs) {
        return Err(BlockError::LengthMismatch {
            expected: (len / bs * bs) as u64,
            actual: len as u64,
        });
    }
    u32::try_from(len / bs).map_err(|_| BlockError::TooLarge(len as u64))
}
