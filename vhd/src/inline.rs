//! Buffered writes the worker does itself: one system call, or a copy into
//! a mapping of the file.
//!
//! A write through the page cache is a copy into cached pages: on this
//! project's hosts (ext4) `pwritev` does a 4 KiB one in about 2 us. Handed
//! to io_uring, the same write cannot complete at submission (ext4 has no
//! non-blocking buffered writes), so it is punted to an io-wq worker thread,
//! where writes to one file serialise on the inode lock: 3-4x slower at
//! QD32 and about 8 us at QD1. A small thread pool does no better on two
//! CPUs. The figures are in the README's Measuring section
//! (`vspa-bench write-path`).
//!
//! So a queue does buffered writes inline, while planning the request, and
//! reports them like any other completion (the slot simply has no SQE left
//! to wait for). The rules:
//! - only buffered descriptors: O_DIRECT writes go to the ring, where the
//!   device completes them asynchronously;
//! - only whole pages (offset and length multiples of 4 KiB): such a write
//!   never reads the page from disk first, so it cannot stall the worker
//!   on a cache miss; partial pages go to the ring;
//! - `RWF_NOWAIT` first, for filesystems that support it (XFS, btrfs, block
//!   devices): a write that would block (dirty throttling, a page under
//!   writeback) is refused and goes to the ring instead. A file whose
//!   filesystem refuses the flag itself (ext4: EOPNOTSUPP) is remembered,
//!   and its writes are plain `pwritev` from then on;
//! - a buffered write that does go to the ring (refused, or a partial page)
//!   of such a file is flagged IOSQE_ASYNC: io_uring would only try it
//!   without blocking, fail, and punt it to io-wq anyway.
//!
//! In cache mode `mapped`, a page written since the file's last flush is
//! written as a copy into a shared mapping of the file instead, with no
//! system call (see [`crate::mapped`]).
//!
//! Completion order and flush semantics do not change: an inline write has
//! completed before its request is reported, so a flush submitted after
//! that report covers it, exactly as for a write completed by the ring. A
//! request refused after some of its pieces were written inline (say, its
//! second block could not be allocated) may have been partly written, as a
//! failed write may be.

use crate::file::IoFile;
use std::sync::atomic::Ordering;

/// A file's support for `RWF_NOWAIT` buffered writes, learnt from the
/// first write (shared by every queue writing the file).
pub(crate) mod nowait {
    pub(crate) const UNKNOWN: u8 = 0;
    pub(crate) const SUPPORTED: u8 = 1;
    pub(crate) const UNSUPPORTED: u8 = 2;
}

/// Bytes of a host page: inline writes cover whole ones.
const PAGE: u64 = 4096;

/// What happened to a write offered for inline execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Inline {
    /// Done by a system call: bytes written, or the errno.
    Done(Result<u64, i32>),
    /// Done as a copy into the file's mapping (see [`crate::mapped`]).
    Stored(u64),
    /// Not done here: submit it to the ring.
    ToRing,
}

/// True when a write of `len` bytes at `offset` of `file` may run inline.
pub(crate) fn eligible(file: &IoFile, offset: u64, len: u64) -> bool {
    !file.direct && offset.is_multiple_of(PAGE) && len.is_multiple_of(PAGE) && len > 0
}

/// True when a buffered write of `file` that goes to the ring should skip
/// io_uring's non-blocking attempt (IOSQE_ASYNC): the filesystem cannot
/// write without blocking, so the attempt would fail and be punted anyway
/// (`vspa-bench write-path`: ~2x the IOPS of letting io_uring try first).
pub(crate) fn punt(file: &IoFile) -> bool {
    !file.direct && file.nowait_writes.load(Ordering::Relaxed) == nowait::UNSUPPORTED
}

/// Writes `iov` (`len` bytes) at `offset` of `file` now, unless the
/// filesystem says the write would block. The caller checked [`eligible`].
pub(crate) fn write(file: &IoFile, iov: &[libc::iovec], offset: u64, len: u64) -> Inline {
    let Some(map) = &file.mapping else {
        return write_call(file, iov, offset);
    };
    if map.write(iov, offset, len) {
        return Inline::Stored(len);
    }
    let done = write_call(file, iov, offset);
    if let Inline::Done(Ok(n)) = done {
        map.wrote(offset, n - n % PAGE);
    }
    done
}

/// [`write`] as a system call.
fn write_call(file: &IoFile, iov: &[libc::iovec], offset: u64) -> Inline {
    let state = file.nowait_writes.load(Ordering::Relaxed);
    if state != nowait::UNSUPPORTED {
        match pwritev2(file, iov, offset, libc::RWF_NOWAIT) {
            Err(libc::EAGAIN) => {
                note(file, state, nowait::SUPPORTED);
                return Inline::ToRing;
            }
            Err(libc::EOPNOTSUPP) => note(file, state, nowait::UNSUPPORTED),
            done => {
                note(file, state, nowait::SUPPORTED);
                return Inline::Done(done);
            }
        }
    }
    Inline::Done(pwritev2(file, iov, offset, 0))
}

fn note(file: &IoFile, state: u8, learnt: u8) {
    if state == nowait::UNKNOWN {
        file.nowait_writes.store(learnt, Ordering::Relaxed);
    }
}

/// One `pwritev2` (or `pwrite` for one piece) on the data descriptor
/// (retried on EINTR).
fn pwritev2(file: &IoFile, iov: &[libc::iovec], offset: u64, flags: i32) -> Result<u64, i32> {
    let count = i32::try_from(iov.len()).map_err(|_| libc::EINVAL)?;
    let at = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
    loop {
        let n = match iov {
            // One piece and no flags: pwrite(2) skips copying in an iovec
            // array (a few percent of a page-cache write).
            [one] if flags == 0 => {
                // SAFETY: `one` describes memory readable for its length
                // (the Request contract, or a bounce buffer the slot owns);
                // the kernel only reads it, during this call.
                unsafe { libc::pwrite(file.data_fd(), one.iov_base, one.iov_len, at) }
            }
            // SAFETY: as above, for every element of `iov`.
            _ => unsafe { libc::pwritev2(file.data_fd(), iov.as_ptr(), count, at, flags) },
        };
        if n >= 0 {
            return Ok(n as u64);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(errno) => return Err(errno),
            None => return Err(libc::EIO),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::CacheMode;

    /// One iovec over `buf`.
    pub(crate) fn iov(buf: &[u8]) -> [libc::iovec; 1] {
        [libc::iovec {
            iov_base: buf.as_ptr().cast_mut().cast(),
            iov_len: buf.len(),
        }]
    }

    #[test]
    fn buffered_whole_pages_are_written_inline_and_the_probe_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
        let file = IoFile::open(&path, true, CacheMode::Cached).unwrap();
        assert!(eligible(&file, 8192, 4096));
        assert!(
            !eligible(&file, 512, 4096),
            "a partial page may need a read"
        );
        assert!(!eligible(&file, 4096, 512));
        let data = [0xa5u8; 8192];
        assert_eq!(
            write(&file, &iov(&data), 4096, 8192),
            Inline::Done(Ok(8192))
        );
        assert_ne!(file.nowait_writes.load(Ordering::Relaxed), nowait::UNKNOWN);
        assert_eq!(
            write(&file, &iov(&data), 4096, 8192),
            Inline::Done(Ok(8192)),
            "cache mode `cached` never stores through a mapping"
        );
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk[4096..12288], data);
        assert!(on_disk[..4096].iter().all(|&b| b == 0));
    }

    /// Dirty pages of `file` in `len` bytes from `offset` (cachestat(2),
    /// Linux 6.5).
    #[cfg(target_arch = "x86_64")]
    fn dirty_pages(file: &IoFile, offset: u64, len: u64) -> u64 {
        const SYS_CACHESTAT: libc::c_long = 451;
        let range = [offset, len];
        // nr_cache, nr_dirty, nr_writeback, nr_evicted, nr_recently_evicted.
        let mut stat = [0u64; 5];
        // SAFETY: both structures are plain u64 arrays of the kernel's
        // layout, live for the call; the kernel writes only `stat`.
        let rc = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.data_fd(),
                range.as_ptr(),
                stat.as_mut_ptr(),
                0,
            )
        };
        assert_eq!(rc, 0, "cachestat: {}", std::io::Error::last_os_error());
        stat[1]
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn a_store_dirties_its_page_and_a_flush_writes_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
        let file = IoFile::open(&path, true, CacheMode::Mapped).unwrap();
        let data = [0x3cu8; 8192];
        assert_eq!(
            write(&file, &iov(&data), 8192, 8192),
            Inline::Done(Ok(8192))
        );
        // Written back behind vspa's back (as the flusher does): clean and
        // write-protected, still marked.
        // SAFETY: sync_file_range takes no pointers.
        let rc = unsafe {
            libc::sync_file_range(
                file.data_fd(),
                8192,
                8192,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
        };
        assert_eq!(rc, 0);
        assert_eq!(dirty_pages(&file, 8192, 8192), 0);
        assert_eq!(write(&file, &iov(&data), 8192, 8192), Inline::Stored(8192));
        assert_eq!(dirty_pages(&file, 8192, 8192), 2, "the store dirtied both");
        file.sync_data().unwrap();
        assert_eq!(dirty_pages(&file, 0, 1 << 16), 0, "the flush wrote them");
    }

    #[test]
    fn mapped_files_store_rewrites_until_the_next_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0u8; 1 << 16]).unwrap();
        let file = IoFile::open(&path, true, CacheMode::Mapped).unwrap();
        let (first, again) = ([0xa5u8; 8192], [0x5au8; 8192]);
        assert_eq!(
            write(&file, &iov(&first), 4096, 8192),
            Inline::Done(Ok(8192))
        );
        assert_eq!(write(&file, &iov(&again), 4096, 8192), Inline::Stored(8192));
        assert_eq!(std::fs::read(&path).unwrap()[4096..12288], again);
        file.sync_data().unwrap();
        assert_eq!(
            write(&file, &iov(&first), 4096, 8192),
            Inline::Done(Ok(8192)),
            "a flush ends the pages' marks"
        );
        file.set_len(4096).unwrap();
        assert_eq!(
            write(&file, &iov(&again), 4096, 8192),
            Inline::Done(Ok(8192)),
            "a store past a shortened file's end is redone as pwritev"
        );
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(on_disk.len(), 12288);
        assert_eq!(on_disk[4096..], again);
    }
}
