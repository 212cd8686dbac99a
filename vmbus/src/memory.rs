//! Memory shared with an untrusted peer: the guest-physical address space of
//! a VM (vm-memory, inside the VMM) or of a client process (a memfd passed
//! over the hosted-mode socket).
//!
//! Nothing here ever hands out a Rust reference into shared memory: the peer
//! may change any byte at any time. Access goes through [`SharedSlice`], a
//! bounds-checked raw range whose reads copy bytes out once (so a value is
//! validated and used from the same copy) and whose pointers can be given to
//! io_uring as iovecs.
#![allow(unsafe_code)]

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};
use zerocopy::{FromBytes, IntoBytes};

use crate::wire::PAGE_SIZE;

/// Errors about shared memory and the addresses a peer hands us.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest range {gpa:#x}+{len:#x} is outside shared memory")]
    OutOfRange { gpa: u64, len: u64 },
    #[error("page frame {0:#x} is outside shared memory")]
    BadPfn(u64),
    #[error("shared memory fd is not sealed against shrinking (F_SEAL_SHRINK)")]
    NotSealed,
    #[error("shared memory size {0:#x} is zero, not page aligned or too large")]
    BadSize(u64),
    #[error("page {0:#x} has no file backing, so it cannot be mapped twice")]
    NotMappable(u64),
    #[error("ring of {0} pages is too small or too large")]
    BadRingSize(usize),
    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("mapping shared memory failed: {0}")]
    Map(String),
}

fn os_error(op: &'static str) -> MemoryError {
    MemoryError::Os {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Largest shared memory vspa maps for one peer (hosted clients): 1 TiB.
const MAX_SHARED_SIZE: u64 = 1 << 40;

/// The guest-physical address space of one peer. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SharedMemory {
    mem: Arc<GuestMemoryMmap>,
}

impl SharedMemory {
    /// Wraps a VM's guest memory (the VMM path).
    pub fn from_guest_memory(mem: Arc<GuestMemoryMmap>) -> Self {
        SharedMemory { mem }
    }

    /// Maps a memfd a hosted client passed us; GPA = offset in the file.
    /// The fd must be sealed against shrinking, otherwise the client could
    /// truncate it and turn our accesses into SIGBUS.
    pub fn from_memfd(fd: OwnedFd) -> Result<Self, MemoryError> {
        // SAFETY: fcntl on an fd we own; F_GET_SEALS takes no argument.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(MemoryError::NotSealed);
        }
        let file = File::from(fd);
        let size = file
            .metadata()
            .map_err(|source| MemoryError::Os {
                op: "fstat",
                source,
            })?
            .len();
        Self::map_file(file, size)
    }

    /// Creates a new sealed memfd of `size` bytes and maps it: the client side
    /// of hosted mode, and test memory. Returns the fd to pass to the peer.
    pub fn create(size: u64) -> Result<(Self, OwnedFd), MemoryError> {
        let name = c"vspa-shared";
        // SAFETY: memfd_create with a valid NUL-terminated name.
        let raw = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(os_error("memfd_create"));
        }
        // SAFETY: memfd_create returned a fresh fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = File::from(
            fd.try_clone()
                .map_err(|source| MemoryError::Os { op: "dup", source })?,
        );
        file.set_len(size).map_err(|source| MemoryError::Os {
            op: "ftruncate",
            source,
        })?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on an fd we own with an integer argument.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(os_error("F_ADD_SEALS"));
        }
        Ok((Self::map_file(file, size)?, fd))
    }

    fn map_file(file: File, size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE as u64) || size > MAX_SHARED_SIZE {
            return Err(MemoryError::BadSize(size));
        }
        let region = GuestRegionMmap::<()>::from_range(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::new(file, 0)),
        )
        .map_err(|e| MemoryError::Map(e.to_string()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        Ok(SharedMemory { mem: Arc::new(mem) })
    }

    /// The underlying vm-memory object.
    pub fn guest_memory(&self) -> &Arc<GuestMemoryMmap> {
        &self.mem
    }

    /// Bytes from GPA 0 to the end of the last region.
    pub fn size(&self) -> u64 {
        self.mem
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0)
    }

    /// Checked view of `[gpa, gpa + len)`, which must lie in one region.
    pub fn slice(&self, gpa: u64, len: usize) -> Result<SharedSlice<'_>, MemoryError> {
        let bad = || MemoryError::OutOfRange {
            gpa,
            len: len as u64,
        };
        let (region, offset) = self.mem.to_region_addr(GuestAddress(gpa)).ok_or_else(bad)?;
        let end = offset.0.checked_add(len as u64).ok_or_else(bad)?;
        if end > region.len() {
            return Err(bad());
        }
        let ptr = region
            .get_host_address(MemoryRegionAddress(offset.0))
            .map_err(|_| bad())?;
        // SAFETY: [ptr, ptr + len) lies inside the region's mapping, which
        // lives as long as `self.mem` and so as long as the returned borrow.
        Ok(unsafe { SharedSlice::new(ptr, len) })
    }

    /// Checks that every page frame lies inside shared memory.
    pub fn check_pfns(&self, pfns: &[u64]) -> Result<(), MemoryError> {
        for &pfn in pfns {
            let gpa = pfn
                .checked_mul(PAGE_SIZE as u64)
                .ok_or(MemoryError::BadPfn(pfn))?;
            self.slice(gpa, PAGE_SIZE)
                .map_err(|_| MemoryError::BadPfn(pfn))?;
        }
        Ok(())
    }

    /// The file and offset backing a page, for mapping it a second time.
    fn page_backing(&self, pfn: u64) -> Result<(RawFd, u64), MemoryError> {
        let gpa = pfn
            .checked_mul(PAGE_SIZE as u64)
            .ok_or(MemoryError::BadPfn(pfn))?;
        let (region, offset) = self
            .mem
            .to_region_addr(GuestAddress(gpa))
            .ok_or(MemoryError::BadPfn(pfn))?;
        if offset.0 + PAGE_SIZE as u64 > region.len() {
            return Err(MemoryError::BadPfn(pfn));
        }
        let fo = region.file_offset().ok_or(MemoryError::NotMappable(pfn))?;
        Ok((fo.file().as_raw_fd(), fo.start() + offset.0))
    }

    /// Maps a ring described by page frames (control page first, then the
    /// data pages) into one contiguous range with the data pages mapped twice
    /// back to back, so every packet, even one that wraps, reads linearly.
    pub fn map_ring(&self, pfns: &[u64]) -> Result<RingPages, MemoryError> {
        let data_pages = pfns.len().saturating_sub(1);
        if data_pages == 0 || data_pages > MAX_RING_DATA_PAGES {
            return Err(MemoryError::BadRingSize(pfns.len()));
        }
        let backing = pfns
            .iter()
            .map(|&pfn| self.page_backing(pfn))
            .collect::<Result<Vec<_>, _>>()?;
        let total = (1 + 2 * data_pages) * PAGE_SIZE;
        let pages = RingPages::reserve(total, data_pages * PAGE_SIZE)?;
        // Page slots: control, data, then data again.
        let slots = backing.iter().chain(backing[1..].iter());
        let mut runs: Vec<(usize, RawFd, u64, usize)> = Vec::new();
        for (slot, &(fd, off)) in slots.enumerate() {
            match runs.last_mut() {
                Some((s, f, o, n))
                    if *f == fd && *o + (*n * PAGE_SIZE) as u64 == off && *s + *n == slot =>
                {
                    *n += 1
                }
                _ => runs.push((slot, fd, off, 1)),
            }
        }
        for (slot, fd, off, n) in runs {
            pages.map_fixed(slot * PAGE_SIZE, n * PAGE_SIZE, fd, off)?;
        }
        Ok(pages)
    }

    /// Maps the pages of a buffer (a netvsc receive or send buffer GPADL)
    /// into one contiguous range, in order, so a range of the buffer that
    /// crosses guest pages that are not adjacent still reads and writes
    /// linearly. The mapping shares the peer's pages; it stays valid (and
    /// keeps the pages) until dropped, whatever the peer does meanwhile.
    pub fn map_pages(&self, pfns: &[u64]) -> Result<MappedPages, MemoryError> {
        if pfns.is_empty() || pfns.len() > MAX_MAPPED_PAGES {
            return Err(MemoryError::BadRingSize(pfns.len()));
        }
        let backing = pfns
            .iter()
            .map(|&pfn| self.page_backing(pfn))
            .collect::<Result<Vec<_>, _>>()?;
        let total = pfns.len() * PAGE_SIZE;
        let pages = RingPages::reserve(total, total)?;
        let mut at = 0;
        while at < backing.len() {
            let (fd, off) = backing[at];
            let mut n = 1;
            while at + n < backing.len() && backing[at + n] == (fd, off + (n * PAGE_SIZE) as u64) {
                n += 1;
            }
            pages.map_fixed(at * PAGE_SIZE, n * PAGE_SIZE, fd, off)?;
            at += n;
        }
        Ok(MappedPages(pages))
    }
}

/// Largest buffer [`SharedMemory::map_pages`] maps: 64 MiB.
pub const MAX_MAPPED_PAGES: usize = 16384;

/// Pages of shared memory mapped contiguously by [`SharedMemory::map_pages`].
#[derive(Debug)]
pub struct MappedPages(RingPages);

impl MappedPages {
    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.0.total
    }

    /// Never true: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The whole mapping as a bounds-checked slice.
    pub fn slice(&self) -> SharedSlice<'_> {
        // SAFETY: the mapping covers `total` bytes, is readable and writable
        // and lives as long as `self`, which the slice borrows.
        unsafe { SharedSlice::new(self.0.base.as_ptr(), self.0.total) }
    }
}

/// Largest ring data area accepted: 64 MiB keeps u32 indices far from
/// overflow and bounds what one channel can make us map.
pub const MAX_RING_DATA_PAGES: usize = 16384;

/// A ring's pages mapped contiguously: control page, data, data again.
#[derive(Debug)]
pub struct RingPages {
    base: NonNull<u8>,
    total: usize,
    data_size: usize,
}

// SAFETY: the mapping is plain shared memory; the owner of RingPages decides
// which thread touches it, and all accesses go through raw pointers.
unsafe impl Send for RingPages {}
// SAFETY: as above; RingPages itself has no interior state.
unsafe impl Sync for RingPages {}

impl RingPages {
    fn reserve(total: usize, data_size: usize) -> Result<Self, MemoryError> {
        // SAFETY: anonymous PROT_NONE reservation; no existing memory touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os_error("mmap reserve"));
        }
        let base = NonNull::new(ptr.cast()).ok_or_else(|| os_error("mmap reserve"))?;
        Ok(RingPages {
            base,
            total,
            data_size,
        })
    }

    fn map_fixed(&self, at: usize, len: usize, fd: RawFd, off: u64) -> Result<(), MemoryError> {
        debug_assert!(at + len <= self.total);
        // SAFETY: the target range lies inside our own reservation, so
        // MAP_FIXED replaces only pages we own.
        let ptr = unsafe {
            libc::mmap(
                self.base.as_ptr().add(at).cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                off as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os_error("mmap ring page"));
        }
        Ok(())
    }

    /// Start of the control page.
    pub fn control(&self) -> NonNull<u8> {
        self.base
    }

    /// Start of the (doubly mapped) data area.
    pub fn data(&self) -> NonNull<u8> {
        // SAFETY: the control page is followed by the data mappings.
        unsafe { self.base.add(PAGE_SIZE) }
    }

    /// Size of one copy of the data area.
    pub fn data_size(&self) -> usize {
        self.data_size
    }
}

impl Drop for RingPages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation made in `reserve`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.total) };
    }
}

/// A bounds-checked range of shared memory, valid for `'a`.
#[derive(Clone, Copy, Debug)]
pub struct SharedSlice<'a> {
    ptr: *mut u8,
    len: usize,
    _life: PhantomData<&'a ()>,
}

// SAFETY: a SharedSlice is a pointer range into shared memory that stays
// mapped for 'a; access is by copy, so it may move between threads.
unsafe impl Send for SharedSlice<'_> {}
// SAFETY: as above.
unsafe impl Sync for SharedSlice<'_> {}

/// An access past the end of a [`SharedSlice`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("access at {offset}+{len} past the end of a {size}-byte range")]
pub struct OutOfBounds {
    pub offset: usize,
    pub len: usize,
    pub size: usize,
}

impl<'a> SharedSlice<'a> {
    /// # Safety
    /// `[ptr, ptr + len)` must stay mapped and writable for `'a`.
    pub unsafe fn new(ptr: *mut u8, len: usize) -> Self {
        SharedSlice {
            ptr,
            len,
            _life: PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Raw start pointer, for iovecs handed to the kernel.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), OutOfBounds> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Sub-range `[offset, offset + len)`.
    pub fn subslice(&self, offset: usize, len: usize) -> Result<SharedSlice<'a>, OutOfBounds> {
        self.check(offset, len)?;
        // SAFETY: checked to lie inside our own range.
        Ok(unsafe { SharedSlice::new(self.ptr.add(offset), len) })
    }

    /// Copies bytes out of shared memory.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        self.check(offset, buf.len())?;
        // SAFETY: source checked in bounds; destination is private memory.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies bytes into shared memory.
    pub fn write_at(&self, offset: usize, buf: &[u8]) -> Result<(), OutOfBounds> {
        self.check(offset, buf.len())?;
        // SAFETY: destination checked in bounds; source is private memory.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.ptr.add(offset), buf.len()) };
        Ok(())
    }

    /// Reads a plain-old-data value (one copy; validate the copy).
    pub fn read_obj<T: FromBytes + IntoBytes>(&self, offset: usize) -> Result<T, OutOfBounds> {
        let mut value = T::new_zeroed();
        self.read_at(offset, value.as_mut_bytes())?;
        Ok(value)
    }

    /// Writes a plain-old-data value.
    pub fn write_obj<T: IntoBytes + zerocopy::Immutable>(
        &self,
        offset: usize,
        value: &T,
    ) -> Result<(), OutOfBounds> {
        self.write_at(offset, value.as_bytes())
    }

    /// Appends the whole range to `buf` in one copy, straight into its
    /// uninitialised spare capacity (no zeroing first); fails, leaving
    /// `buf` as it was, if the spare capacity is smaller than the range.
    pub fn copy_to_uninit(&self, buf: &mut bytes::BytesMut) -> Result<(), OutOfBounds> {
        let spare = buf.spare_capacity_mut();
        if spare.len() < self.len {
            return Err(OutOfBounds {
                offset: 0,
                len: self.len,
                size: spare.len(),
            });
        }
        // SAFETY: the source is valid for reads of `len` bytes (this
        // slice's contract) and the destination is `buf`'s own spare
        // capacity of at least that length; the peer may change the source
        // meanwhile, which changes only the bytes copied. Afterwards those
        // bytes are initialised, so the length may grow over them.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr, spare.as_mut_ptr().cast(), self.len);
            buf.set_len(buf.len() + self.len);
        }
        Ok(())
    }

    /// Copies all of `src` to `offset` (shared memory to shared memory).
    pub fn copy_from(&self, offset: usize, src: &SharedSlice<'_>) -> Result<(), OutOfBounds> {
        self.check(offset, src.len)?;
        // SAFETY: both ranges are valid; `copy` tolerates overlap.
        unsafe { std::ptr::copy(src.ptr, self.ptr.add(offset), src.len) };
        Ok(())
    }

    /// Fills the range with zeros.
    pub fn zero(&self) {
        // SAFETY: the whole range is valid for writes.
        unsafe { std::ptr::write_bytes(self.ptr, 0, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_into_spare_capacity() {
        let (mem, _fd) = SharedMemory::create(4096).unwrap();
        let s = mem.slice(100, 5).unwrap();
        s.write_at(0, b"hello").unwrap();
        let mut buf = bytes::BytesMut::with_capacity(8);
        buf.extend_from_slice(b"ab");
        s.copy_to_uninit(&mut buf).unwrap();
        assert_eq!(&buf[..], b"abhello");
        // Two bytes of room left: refused, the buffer unchanged.
        buf.resize(buf.capacity() - 2, b'x');
        let before = buf.clone();
        assert!(s.copy_to_uninit(&mut buf).is_err());
        assert_eq!(buf, before);
    }

    #[test]
    fn slices_are_bounds_checked() {
        let (mem, _fd) = SharedMemory::create(4 * 4096).unwrap();
        assert_eq!(mem.size(), 4 * 4096);
        assert!(mem.slice(3 * 4096, 4096).is_ok());
        assert!(mem.slice(3 * 4096, 4097).is_err());
        assert!(mem.slice(u64::MAX - 1, 4).is_err());
        let s = mem.slice(4096, 16).unwrap();
        s.write_at(0, &[1, 2, 3]).unwrap();
        let mut b = [0u8; 3];
        s.read_at(0, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3]);
        assert_eq!(
            s.read_at(14, &mut b),
            Err(OutOfBounds {
                offset: 14,
                len: 3,
                size: 16
            })
        );
        assert!(s.subslice(8, 9).is_err());
        assert!(mem.check_pfns(&[0, 3]).is_ok());
        assert!(matches!(mem.check_pfns(&[4]), Err(MemoryError::BadPfn(4))));
        assert!(matches!(
            mem.check_pfns(&[u64::MAX]),
            Err(MemoryError::BadPfn(_))
        ));
    }

    #[test]
    fn unsealed_memfd_is_refused() {
        // SAFETY: plain memfd_create without sealing.
        let raw = unsafe { libc::memfd_create(c"x".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: fresh fd.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        File::from(fd.try_clone().unwrap()).set_len(4096).unwrap();
        assert!(matches!(
            SharedMemory::from_memfd(fd),
            Err(MemoryError::NotSealed)
        ));
    }

    #[test]
    fn buffer_pages_map_in_order() {
        let (mem, _fd) = SharedMemory::create(8 * 4096).unwrap();
        mem.slice(6 * 4096 + 4094, 2)
            .unwrap()
            .write_at(0, b"ab")
            .unwrap();
        mem.slice(2 * 4096, 2).unwrap().write_at(0, b"cd").unwrap();
        // Pages 5, 6 (adjacent: one run), then 2.
        let m = mem.map_pages(&[5, 6, 2]).unwrap();
        assert_eq!(m.len(), 3 * 4096);
        let mut b = [0u8; 4];
        m.slice().read_at(2 * 4096 - 2, &mut b).unwrap();
        assert_eq!(&b, b"abcd");
        // Writes through the mapping reach the peer's pages.
        m.slice().write_at(10, b"xy").unwrap();
        mem.slice(5 * 4096 + 10, 2)
            .unwrap()
            .read_at(0, &mut b[..2])
            .unwrap();
        assert_eq!(&b[..2], b"xy");
        assert!(m.slice().read_at(3 * 4096 - 1, &mut b[..2]).is_err());
        assert!(matches!(mem.map_pages(&[8]), Err(MemoryError::BadPfn(8))));
        assert!(mem.map_pages(&[]).is_err());
    }

    #[test]
    fn ring_data_is_mapped_twice() {
        let (mem, _fd) = SharedMemory::create(8 * 4096).unwrap();
        // Control page 5, data pages 2 and 7 (not contiguous on purpose).
        let ring = mem.map_ring(&[5, 2, 7]).unwrap();
        assert_eq!(ring.data_size(), 8192);
        mem.slice(2 * 4096, 4096)
            .unwrap()
            .write_at(0, b"first")
            .unwrap();
        mem.slice(7 * 4096 + 4091, 5)
            .unwrap()
            .write_at(0, b"tail!")
            .unwrap();
        mem.slice(5 * 4096, 4)
            .unwrap()
            .write_at(0, b"ctrl")
            .unwrap();
        // SAFETY: the ring maps 1 + 2 * 2 pages.
        let view = unsafe { SharedSlice::new(ring.control().as_ptr(), 5 * 4096) };
        let mut b = [0u8; 10];
        view.read_at(4096 + 8192 + 4096 + 4091, &mut b[..5])
            .unwrap();
        assert_eq!(&b[..5], b"tail!");
        // The wrap: end of the first copy runs into the start of the second.
        view.read_at(4096 + 8192 - 5, &mut b).unwrap();
        assert_eq!(&b, b"tail!first");
        view.read_at(0, &mut b[..4]).unwrap();
        assert_eq!(&b[..4], b"ctrl");
        assert!(matches!(
            mem.map_ring(&[5]),
            Err(MemoryError::BadRingSize(1))
        ));
        assert!(matches!(mem.map_ring(&[5, 9]), Err(MemoryError::BadPfn(9))));
    }
}
