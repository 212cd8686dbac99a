//! Buffered writes as a copy into a shared mapping of the image file.
//!
//! An inline `pwritev` of 4 KiB costs about 2 us on this project's hosts,
//! most of it the filesystem's write path (`write_begin`, buffer heads,
//! `write_end`) run again for a page that is already cached and dirty. A
//! store into a shared mapping of the file reaches the same page-cache page
//! with no system call: about 0.8-1.1 us a write (`vspa-bench write-path`,
//! `mmap` against `pwrite`; README, Measuring). So the inline path
//! (`inline`) copies into a mapping when it can, under these rules:
//! - Only files opened with cache mode `mapped` (buffered, regular,
//!   writable) and only the whole-page writes the inline path takes; the
//!   mapping is made at open and covers the file's length then plus
//!   [`HEADROOM`] for growth. Writes beyond it go to `pwritev`.
//! - Only pages this process wrote in the current *epoch*, which each flush
//!   of the file ends. A page written since the last flush is dirty or
//!   was just written back, so it is in the page cache and the store never
//!   waits on a read from disk; any other page goes to `pwritev`, which
//!   never reads a whole page, and is marked. After a flush (its writeback
//!   write-protects the pages) the first write of each page is a
//!   `pwritev` again, the next ones are stores.
//! - The flusher's own writeback write-protects pages too, and a page's
//!   next store then faults (`page_mkwrite`, about 5 us here, 2.5x a
//!   `pwritev`): stores dip while a hot file is written back (README,
//!   Measuring: a 70 s run of `vspa-bench write-path --sustain`). A
//!   faulting store may also wait where `pwritev` would (dirty-page
//!   throttling); `RWF_NOWAIT`'s refusal, which hands such writes to the
//!   ring on XFS and btrfs, has no equivalent for a store.
//! - The copy is `trycopy::try_copy`: if the kernel answers a store with
//!   SIGBUS (file shortened, no space for a delayed allocation, a read
//!   error, guest memory gone) the copy fails and the write is redone with
//!   `pwritev`, whose errno is what the guest sees.
//!
//! Why a mode of its own, not the default for `cached`: a store is not
//! atomic against the death of the process. `pwritev` copies a page in the
//! kernel, which no signal interrupts, so a SIGKILL leaves each page old or
//! new; `rep movsb` is interruptible, and a kill mid-copy leaves the page's
//! start new and the rest old (cut at 32-byte boundaries here: 297 of 300
//! kills of a copy loop tore its page). Disks promise at least a whole
//! sector, old or new, and some guest software relies on it. (A kernel
//! copy into the mapping, `process_vm_writev` to itself, would be atomic,
//! but costs what `pwritev` costs: 0.5 M/s for both.)
//!
//! Flush semantics hold: `fdatasync` writes back pages dirtied through a
//! mapping like any others, and a store has completed before its request
//! is reported. Epochs live in the marks themselves (16 bits of each
//! 64-bit word), so ending one is one atomic add, with no sweep; a mark
//! from an epoch 65,536 flushes old can be mistaken for a current one,
//! which costs one store that may wait on a read, never correctness.

use crate::trycopy;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use zerocopy::FromZeros;

/// Bytes of a host page.
const PAGE: u64 = 4096;
/// Address space mapped beyond the file's length at open, so a growing
/// image (dynamic VHD blocks) keeps the fast path for new blocks. Only
/// address space: pages exist only where the file does.
pub(crate) const HEADROOM: u64 = 64 << 30;
/// Pages marked per word; the word's top 16 bits hold its epoch.
const PAGES_PER_WORD: u64 = 48;
const PAGE_BITS: u64 = (1 << PAGES_PER_WORD) - 1;

/// A shared read-write mapping of one file, with its page marks.
#[derive(Debug)]
pub(crate) struct Mapping {
    base: *mut u8,
    len: u64,
    /// Per page: written by this process in the current epoch.
    marks: Box<[AtomicU64]>,
    epoch: AtomicU64,
}

// SAFETY: the mapping is shared memory that every thread may copy into
// (the page cache serialises nothing we rely on; requests own their
// ranges); the marks are atomics.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `fd` for `file_len` bytes plus [`HEADROOM`]; None when the
    /// SIGBUS handler is not installed or the mapping fails (writes then
    /// all go through `pwritev`).
    pub(crate) fn new(fd: BorrowedFd<'_>, file_len: u64) -> Option<Mapping> {
        if !trycopy::installed() {
            return None;
        }
        let len = file_len
            .div_ceil(PAGE)
            .checked_mul(PAGE)?
            .checked_add(HEADROOM)?;
        // SAFETY: a new shared mapping of an open descriptor at an address
        // the kernel picks; nothing else refers to that range. NORESERVE:
        // address space only, no memory is committed for it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                usize::try_from(len).ok()?,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            tracing::debug!(error = %std::io::Error::last_os_error(), "no write mapping");
            return None;
        }
        let words = (len / PAGE).div_ceil(PAGES_PER_WORD);
        // Zeroed allocations of this size come straight from the kernel's
        // zero pages: only words in use take memory.
        let marks =
            <[AtomicU64] as FromZeros>::new_box_zeroed_with_elems(usize::try_from(words).ok()?)
                .ok()?;
        Some(Mapping {
            base: base.cast(),
            len,
            marks,
            epoch: AtomicU64::new(1),
        })
    }

    /// Writes `iov` at `offset` through the mapping if every page of the
    /// range is marked in this epoch; false if not, or if the copy faulted
    /// (the caller then writes it with `pwritev`). `offset` and the total
    /// length are whole pages.
    pub(crate) fn write(&self, iov: &[libc::iovec], offset: u64, len: u64) -> bool {
        if !self.marked(offset, len) {
            return false;
        }
        let mut at = offset;
        for piece in iov {
            // SAFETY: `at .. at + iov_len` lies in the mapping (`marked`
            // checked the whole range against `len`); the source is caller
            // memory readable for its length (the Request contract) and no
            // part of a file mapping. A SIGBUS on either side is the
            // failure try_copy reports.
            let done = unsafe {
                trycopy::try_copy(
                    self.base.add(at as usize),
                    piece.iov_base.cast(),
                    piece.iov_len,
                )
            };
            if !done {
                return false;
            }
            at += piece.iov_len as u64;
        }
        true
    }

    /// Marks the pages of a range just written with `pwritev`.
    pub(crate) fn wrote(&self, offset: u64, len: u64) {
        let epoch = self.epoch.load(Ordering::Relaxed) & 0xffff;
        self.for_each_word(offset, len, |word, mask| {
            let mut old = word.load(Ordering::Relaxed);
            loop {
                let new = if old >> PAGES_PER_WORD == epoch {
                    old | mask
                } else {
                    epoch << PAGES_PER_WORD | mask
                };
                match word.compare_exchange_weak(old, new, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => return true,
                    Err(now) => old = now,
                }
            }
        });
    }

    /// Ends the epoch: called as a flush of the file is issued.
    pub(crate) fn flushed(&self) {
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// True when every page of the range is inside the mapping and marked
    /// in this epoch.
    fn marked(&self, offset: u64, len: u64) -> bool {
        if offset.checked_add(len).is_none_or(|end| end > self.len) || len == 0 {
            return false;
        }
        let epoch = self.epoch.load(Ordering::Relaxed) & 0xffff;
        self.for_each_word(offset, len, |word, mask| {
            let now = word.load(Ordering::Relaxed);
            now >> PAGES_PER_WORD == epoch && now & mask == mask
        })
    }

    /// Calls `f(word, mask of the range's pages in it)` for each word the
    /// page range touches, stopping at the first false; false then.
    fn for_each_word(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&AtomicU64, u64) -> bool,
    ) -> bool {
        let first = offset / PAGE;
        let end = (offset + len).div_ceil(PAGE).min(self.len / PAGE);
        let mut page = first;
        while page < end {
            let index = page / PAGES_PER_WORD;
            let bit = page % PAGES_PER_WORD;
            let count = (PAGES_PER_WORD - bit).min(end - page);
            let mask = (PAGE_BITS >> (PAGES_PER_WORD - count)) << bit;
            let Some(word) = self.marks.get(index as usize) else {
                return false;
            };
            if !f(word, mask) {
                return false;
            }
            page += count;
        }
        true
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range this mapping made; no copy is in flight, since
        // the owning file is being dropped.
        unsafe { libc::munmap(self.base.cast(), self.len as usize) };
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::inline::tests::iov;
    use crate::trycopy::tests::scratch_file;
    use std::os::fd::AsFd;

    #[test]
    fn only_pages_marked_in_this_epoch_are_written_through_the_mapping() {
        let (dir, f) = scratch_file(1 << 20);
        let map = Mapping::new(f.as_fd(), 1 << 20).unwrap();
        let data = vec![0xc3u8; 8192];
        assert!(
            !map.write(&iov(&data), 4096 * 47, 8192),
            "nothing marked yet"
        );
        map.wrote(4096 * 47, 8192); // pages 47 and 48: two words
        assert!(map.write(&iov(&data), 4096 * 47, 8192));
        assert!(
            !map.write(&iov(&data), 4096 * 47, 12288),
            "page 49 unmarked"
        );
        let on_disk = std::fs::read(dir.path().join("f")).unwrap();
        assert!(on_disk[4096 * 47..4096 * 49].iter().all(|&b| b == 0xc3));
        assert!(on_disk[..4096 * 47].iter().all(|&b| b == 0));
        map.flushed();
        assert!(
            !map.write(&iov(&data), 4096 * 47, 8192),
            "a flush ends the epoch"
        );
        map.wrote(4096 * 48, 4096);
        assert!(map.write(&iov(&data[..4096]), 4096 * 48, 4096));
        assert!(
            !map.write(&iov(&data[..4096]), 4096 * 47, 4096),
            "old mark, old epoch"
        );
    }

    #[test]
    fn a_file_shortened_underneath_fails_the_copy_instead_of_the_process() {
        let (_dir, f) = scratch_file(1 << 20);
        let map = Mapping::new(f.as_fd(), 1 << 20).unwrap();
        let data = vec![1u8; 4096];
        map.wrote(1 << 19, 4096);
        f.set_len(1 << 18).unwrap();
        assert!(!map.write(&iov(&data), 1 << 19, 4096));
        assert!(!map.write(&iov(&data), map.len, 4096), "past the mapping");
        assert!(
            !map.write(&iov(&data), u64::MAX - 4095, 4096),
            "no overflow"
        );
    }
}
