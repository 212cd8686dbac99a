//! [`Poster`]: completes requests of other threads' [`IoQueue`]s from a
//! thread that did their work (e.g. an NBD connection thread), by posting
//! CQEs into their rings with `IORING_OP_MSG_RING`. The waiting worker sees
//! an ordinary completion; a batch of posts costs one `io_uring_enter` here
//! and no syscall on the worker.
//!
//! [`IoQueue`]: crate::IoQueue

use crate::queue::RemoteCompletion;
use io_uring::{IoUring, opcode, types};

/// Posts per ring submission.
const ENTRIES: u32 = 64;

/// A small private ring whose only SQEs are MSG_RING posts.
pub(crate) struct Poster {
    ring: IoUring,
    /// Posts pushed or submitted whose own CQE has not come back; a post's
    /// SQE user_data is its index here.
    in_flight: Vec<Option<(RemoteCompletion, i32)>>,
    free: Vec<u32>,
    /// Posts the kernel refused for now (target queue full), sent again.
    retry: Vec<(RemoteCompletion, i32)>,
    /// CQEs taken off the ring (index, result), kept for reuse.
    reaped: Vec<(u32, i32)>,
}

impl std::fmt::Debug for Poster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poster")
            .field("in_flight", &(self.in_flight.len() - self.free.len()))
            .finish()
    }
}

impl Poster {
    pub(crate) fn new() -> std::io::Result<Poster> {
        Ok(Poster {
            // On the ring thread when there is one: the sandbox denies
            // io_uring_setup everywhere else (see `vspa_threads`).
            ring: vspa_threads::privileged(|| {
                IoUring::builder().setup_cqsize(ENTRIES * 2).build(ENTRIES)
            })?,
            in_flight: Vec::new(),
            free: Vec::new(),
            retry: Vec::new(),
            reaped: Vec::new(),
        })
    }

    /// Queues the completion of `target` with `result` (bytes, or a
    /// negative errno); it reaches the target at the next [`Poster::flush`]
    /// (or sooner when the ring fills).
    pub(crate) fn post(&mut self, target: RemoteCompletion, result: i32) {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.in_flight.push(None);
                (self.in_flight.len() - 1) as u32
            }
        };
        self.in_flight[index as usize] = Some((target, result));
        let entry =
            opcode::MsgRingData::new(types::Fd(target.ring_fd), result, target.user_data, None)
                .build()
                .user_data(u64::from(index));
        loop {
            // SAFETY: a MSG_RING data SQE references no memory.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            self.submit(0);
        }
    }

    /// Sends every queued post and collects the kernel's answers; posts the
    /// target could not take yet are sent again.
    pub(crate) fn flush(&mut self) {
        self.submit(0);
        while !self.retry.is_empty() {
            for (target, result) in std::mem::take(&mut self.retry) {
                self.post(target, result);
            }
            self.submit(0);
        }
    }

    /// Waits until every post has been delivered (or refused for good).
    pub(crate) fn drain(&mut self) {
        self.flush();
        while self.free.len() < self.in_flight.len() {
            self.submit(1);
            self.flush();
        }
    }

    fn submit(&mut self, wait: usize) {
        match self.ring.submit_and_wait(wait) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(e) => tracing::warn!("posting completions: {e}"),
        }
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data() as u32, cqe.result())),
        );
        for (index, res) in reaped.drain(..) {
            let Some(post) = self
                .in_flight
                .get_mut(index as usize)
                .and_then(Option::take)
            else {
                continue;
            };
            self.free.push(index);
            match -res {
                0 => {}
                libc::EOVERFLOW | libc::EAGAIN | libc::EBUSY => self.retry.push(post),
                errno => tracing::error!(
                    ring = post.0.ring_fd,
                    "completion lost: the waiting queue refused it (errno {errno})"
                ),
            }
        }
        self.reaped = reaped;
    }
}

impl Drop for Poster {
    fn drop(&mut self) {
        self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlockError;
    use crate::queue::{Completion, IoQueue};

    #[test]
    fn remote_parts_complete_a_request_from_another_thread() {
        let mut queue = IoQueue::new(4).unwrap();
        let id = queue.begin(5, &[], false).unwrap();
        let a = queue.add_remote(id, 4096).unwrap();
        let b = queue.add_remote(id, 512).unwrap();
        queue.commit(id).unwrap();
        let id = queue.begin(6, &[], false).unwrap();
        let c = queue.add_remote(id, 512).unwrap();
        queue.commit(id).unwrap();
        std::thread::spawn(move || {
            let mut poster = Poster::new().unwrap();
            poster.post(a, 4096);
            poster.post(c, -libc::EIO);
            poster.flush();
            std::thread::sleep(std::time::Duration::from_millis(20));
            poster.post(b, 512);
            poster.drain();
        });
        let mut seen = Vec::new();
        while seen.len() < 2 {
            // Sleeps in the kernel until the other thread's posts arrive.
            queue.submit_and_wait().unwrap();
            queue.reap(|c| match c {
                Completion::Request { tag, result } => seen.push((tag, result)),
                other => panic!("unexpected {other:?}"),
            });
        }
        seen.sort_by_key(|(tag, _)| *tag);
        assert_eq!(seen, [(5, Ok(4608)), (6, Err(BlockError::Os(libc::EIO)))]);
        assert_eq!(queue.in_flight(), 0);
    }
}
