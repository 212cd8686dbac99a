//! Guest RAM: one memfd mapped as the VM's regions.
//!
//! RAM lives in a memfd (not anonymous memory) so that the VMBus code can
//! map ring pages a second time, back to back, straight from the file
//! (`vmbus::SharedMemory::map_ring`), and so that resident guest RAM shows
//! up as shared memory, apart from the VMM's own footprint.
#![allow(unsafe_code)]

use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Arc;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::layout;

/// Errors creating guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small (at least 4 MiB) or too large")]
    BadSize(u64),
    #[error("cannot create guest memory: {0}")]
    Os(#[from] std::io::Error),
    #[error("cannot map guest memory: {0}")]
    Map(String),
}

/// Largest guest RAM accepted: 1 TiB.
const MAX_RAM: u64 = 1 << 40;

/// Creates `bytes` of guest RAM backed by a fresh memfd.
pub fn create_guest_ram(bytes: u64) -> Result<Arc<GuestMemoryMmap>, MemoryError> {
    if !(4 << 20..=MAX_RAM).contains(&bytes) || !bytes.is_multiple_of(4096) {
        return Err(MemoryError::BadSize(bytes >> 20));
    }
    let file = memfd(bytes)?;
    let mut offset = 0;
    let mut regions = Vec::new();
    for (gpa, len) in layout::ram_ranges(bytes) {
        let fo = FileOffset::new(file.try_clone()?, offset);
        let region = GuestRegionMmap::<()>::from_range(GuestAddress(gpa), len as usize, Some(fo))
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        regions.push(region);
        offset += len;
    }
    let mem =
        GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))?;
    Ok(Arc::new(mem))
}

fn memfd(bytes: u64) -> Result<File, MemoryError> {
    // SAFETY: memfd_create with a valid NUL-terminated name.
    let raw = unsafe { libc::memfd_create(c"vspa-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: memfd_create returned a fresh fd nobody else owns.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    file.set_len(bytes)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn ram_is_file_backed_and_split_around_the_gap() {
        let mem = create_guest_ram(16 << 20).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert!(mem.iter().all(|r| r.file_offset().is_some()));
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(matches!(
            create_guest_ram(1 << 20),
            Err(MemoryError::BadSize(1))
        ));
        assert!(create_guest_ram((16 << 20) + 1).is_err());
        // 4 GiB: 3 GiB below the MMIO gap, 1 GiB from 4 GiB, one memfd.
        let big = create_guest_ram(4 << 30).unwrap();
        let regions: Vec<(u64, u64, u64)> = big
            .iter()
            .map(|r| (r.start_addr().0, r.len(), r.file_offset().unwrap().start()))
            .collect();
        assert_eq!(regions, vec![(0, 3 << 30, 0), (4 << 30, 1 << 30, 3 << 30)]);
    }
}
