//! VMBus ring buffers, byte-compatible with the Linux guest driver.
//!
//! A ring is one control page followed by a data area. The producer owns
//! `write_index`, the consumer owns `read_index`; both are byte offsets into
//! the data area, 8-byte aligned and smaller than its size. Each packet is a
//! 16-byte descriptor, its payload padded to 8 bytes, then an 8-byte trailer
//! holding the packet's start offset in its upper half. The producer never
//! fills the ring completely (free space = size - used - 8), so equal indices
//! always mean "empty".
//!
//! Signalling (the rules the Linux guest follows too):
//! - the producer signals only if the ring was empty before its batch was
//!   published and the consumer's `interrupt_mask` is clear;
//! - the consumer, after publishing `read_index`, signals the producer when
//!   free space rises above the producer's `pending_send_sz`;
//! - a full barrier separates each index store from reading the peer's
//!   mask or pending size (the lost-wakeup window).
//!
//! Reads and writes are batched: packets are staged privately and the index
//! is published once per batch by `commit`. Both sides validate everything
//! they read from the peer and report a [`RingError`]; the channel owner then
//! resets the channel.
#![allow(unsafe_code)]

use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering, fence};

use zerocopy::FromBytes;

use crate::memory::{RingPages, SharedSlice};
use crate::wire::{
    FEATURE_PENDING_SEND_SIZE, PAGE_SIZE, PacketDescriptor, packet_type, ring_offset,
};

/// Size of a packet descriptor.
pub const DESCRIPTOR_SIZE: usize = 16;
/// Size of the trailer after each packet.
pub const TRAILER_SIZE: usize = 8;

/// Ring bytes a packet takes (what [`OutgoingRing::request_space`] asks
/// for): its descriptor, `payload` bytes after it (header areas such as
/// GPA ranges or transfer-page ranges count as payload), padding to 8 and
/// the trailer.
pub const fn packet_len(payload: usize) -> usize {
    (DESCRIPTOR_SIZE + payload).next_multiple_of(8) + TRAILER_SIZE
}

/// A protocol violation seen in a ring shared with a peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("peer's {which} {value:#x} is unaligned or outside the {size}-byte ring")]
    BadIndex {
        which: &'static str,
        value: u32,
        size: u32,
    },
    #[error("only {available} bytes available, less than a packet")]
    Truncated { available: u32 },
    #[error("bad descriptor: offset8 {offset8}, length8 {length8}, {available} bytes available")]
    BadDescriptor {
        offset8: u16,
        length8: u16,
        available: u32,
    },
    #[error("packet of {0} bytes can never fit this ring")]
    TooLarge(usize),
}

/// Why a packet could not be written now.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WriteError {
    #[error("ring full: {needed} bytes needed")]
    Full { needed: u32 },
    #[error(transparent)]
    Ring(#[from] RingError),
}

enum Backing {
    Mapped(#[allow(dead_code)] RingPages),
    Heap {
        ptr: NonNull<u8>,
        layout: std::alloc::Layout,
    },
}

/// The memory of one ring: control page plus data area, either doubly
/// mapped (a wrapping packet is contiguous) or mapped once (wrapping
/// accesses are split in two).
pub struct RingMemory {
    control: NonNull<u8>,
    data: NonNull<u8>,
    size: u32,
    double_mapped: bool,
    backing: Backing,
}

impl std::fmt::Debug for RingMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingMemory")
            .field("size", &self.size)
            .field("double_mapped", &self.double_mapped)
            .finish()
    }
}

// SAFETY: RingMemory is shared memory reached only through raw pointers and
// atomics; each side (reader, writer) touches only what the protocol lets it.
unsafe impl Send for RingMemory {}
// SAFETY: as above.
unsafe impl Sync for RingMemory {}

impl RingMemory {
    /// A ring over pages mapped by [`crate::SharedMemory::map_ring`].
    pub fn from_pages(pages: RingPages) -> Result<Arc<Self>, RingError> {
        let size =
            u32::try_from(pages.data_size()).map_err(|_| RingError::TooLarge(pages.data_size()))?;
        Ok(Arc::new(RingMemory {
            control: pages.control(),
            data: pages.data(),
            size,
            double_mapped: true,
            backing: Backing::Mapped(pages),
        }))
    }

    /// A zeroed, singly mapped ring in private memory (tests and benches).
    pub fn new_private(data_pages: usize) -> Arc<Self> {
        assert!(data_pages > 0 && data_pages <= crate::memory::MAX_RING_DATA_PAGES);
        let layout = std::alloc::Layout::from_size_align((1 + data_pages) * PAGE_SIZE, PAGE_SIZE)
            .expect("ring layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Arc::new(RingMemory {
            control: ptr,
            // SAFETY: the allocation holds the control page and the data.
            data: unsafe { ptr.add(PAGE_SIZE) },
            size: (data_pages * PAGE_SIZE) as u32,
            double_mapped: false,
            backing: Backing::Heap { ptr, layout },
        })
    }

    /// Size of the data area in bytes.
    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn is_double_mapped(&self) -> bool {
        self.double_mapped
    }

    fn field(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: control fields are 4-byte aligned u32s inside the control
        // page, which lives as long as self; the peer accesses them
        // concurrently, hence atomics.
        unsafe { AtomicU32::from_ptr(self.control.as_ptr().add(offset).cast()) }
    }

    fn load_index(&self, offset: usize, which: &'static str) -> Result<u32, RingError> {
        let value = self.field(offset).load(Ordering::Acquire);
        if value >= self.size || !value.is_multiple_of(8) {
            return Err(RingError::BadIndex {
                which,
                value,
                size: self.size,
            });
        }
        Ok(value)
    }

    /// Initializes the control page the way a fresh ring starts: indices 0,
    /// no mask, no pending size, feature bit set. Only the ring's creator
    /// (the guest side) does this.
    pub fn init_control(&self) {
        for off in [
            ring_offset::WRITE_INDEX,
            ring_offset::READ_INDEX,
            ring_offset::INTERRUPT_MASK,
            ring_offset::PENDING_SEND_SZ,
        ] {
            self.field(off).store(0, Ordering::Relaxed);
        }
        self.field(ring_offset::FEATURE_BITS)
            .store(FEATURE_PENDING_SEND_SIZE, Ordering::Release);
    }

    /// Overwrites the start of the control page with raw bytes (fuzzing
    /// and tests play a hostile peer with this).
    pub fn write_control_bytes(&self, bytes: &[u8]) {
        let n = bytes.len().min(PAGE_SIZE);
        // SAFETY: the control page is PAGE_SIZE bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.control.as_ptr(), n) };
    }

    /// Overwrites the start of the data area with raw bytes.
    pub fn write_data_bytes(&self, bytes: &[u8]) {
        let n = bytes.len().min(self.size as usize);
        // SAFETY: the data area is `size` bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.data.as_ptr(), n) };
    }

    /// A view of `len` bytes at data offset `pos`, or None if it wraps and
    /// the ring is not doubly mapped.
    fn contiguous(&self, pos: u32, len: usize) -> Option<SharedSlice<'_>> {
        if self.double_mapped || pos as usize + len <= self.size as usize {
            debug_assert!(len <= self.size as usize);
            // SAFETY: pos < size and len <= size; with a double mapping the
            // range stays inside the second copy, otherwise it was checked
            // to end inside the first.
            Some(unsafe { SharedSlice::new(self.data.as_ptr().add(pos as usize), len) })
        } else {
            None
        }
    }

    /// Copies ring bytes at `pos` (wrapping) into `buf`.
    fn read_wrapping(&self, pos: u32, buf: &mut [u8]) {
        let first = buf.len().min((self.size - pos) as usize);
        // SAFETY: [pos, pos + first) lies in the data area; the remainder
        // starts again at offset 0 and is shorter than the ring.
        unsafe {
            let data = self.data.as_ptr();
            std::ptr::copy_nonoverlapping(data.add(pos as usize), buf.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, buf.as_mut_ptr().add(first), buf.len() - first);
        }
    }

    /// Copies `src` into ring bytes at `pos` (wrapping).
    fn write_wrapping(&self, pos: u32, src: &[u8]) {
        if let Some(dst) = self.contiguous(pos, src.len()) {
            // SAFETY: dst covers src.len() valid bytes.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_ptr(), src.len()) };
            return;
        }
        let first = (self.size - pos) as usize;
        // SAFETY: as in read_wrapping.
        unsafe {
            let data = self.data.as_ptr();
            std::ptr::copy_nonoverlapping(src.as_ptr(), data.add(pos as usize), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), data, src.len() - first);
        }
    }

    /// Stores little-endian words at `pos` (wrapping) straight from
    /// registers. Copying a descriptor built field by field on the stack
    /// instead reads it back wider than it was written, which the store
    /// buffer cannot forward: the copy then waits for every older store to
    /// reach the cache, this packet's payload too, whose lines the peer's
    /// CPU has to give up first (the largest user-space cost of a storage
    /// worker writing completions).
    fn write_words<const N: usize>(&self, pos: u32, words: [u64; N]) {
        // Indices are checked to be 8-aligned when a ring is opened
        // (`load_index`) and packets keep that alignment, so no word wraps.
        debug_assert!(pos.is_multiple_of(8));
        let mut at = pos as usize;
        for w in words {
            if at >= self.size as usize {
                at -= self.size as usize;
            }
            // SAFETY: `at` is 8-aligned and below `size`, a multiple of
            // the page size, so the word lies in the data area.
            unsafe {
                std::ptr::write_unaligned(self.data.as_ptr().add(at).cast::<u64>(), w.to_le())
            };
            at += 8;
        }
    }

    /// Asks the CPU to own the cache lines of `[pos, pos + len)` (wrapping)
    /// ahead of the stores that fill them.
    fn prefetch_for_write(&self, pos: u32, len: u32) {
        #[cfg(target_arch = "x86_64")]
        for off in (0..len as usize).step_by(64) {
            let mut at = pos as usize + off;
            if at >= self.size as usize {
                at -= self.size as usize;
            }
            // SAFETY: `at` < size, so the address lies in the data area;
            // PREFETCHW only moves a cache line (it never faults or
            // changes memory; CPUs without it run it as a NOP).
            unsafe {
                std::arch::asm!(
                    "prefetchw [{}]",
                    in(reg) self.data.as_ptr().add(at),
                    options(nostack, preserves_flags, readonly)
                );
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (pos, len);
    }

    /// Copies shared memory into ring bytes at `pos` (wrapping).
    fn write_shared_wrapping(&self, pos: u32, src: &SharedSlice<'_>) {
        let len = src.len();
        if let Some(dst) = self.contiguous(pos, len) {
            // SAFETY: both ranges are valid for len bytes; copy allows overlap.
            unsafe { std::ptr::copy(src.as_ptr(), dst.as_ptr(), len) };
            return;
        }
        let first = (self.size - pos) as usize;
        // SAFETY: as in read_wrapping; source valid for len bytes.
        unsafe {
            let data = self.data.as_ptr();
            std::ptr::copy(src.as_ptr(), data.add(pos as usize), first);
            std::ptr::copy(src.as_ptr().add(first), data, len - first);
        }
    }
}

impl Drop for RingMemory {
    fn drop(&mut self) {
        if let Backing::Heap { ptr, layout } = self.backing {
            // SAFETY: allocated in new_private with this layout.
            unsafe { std::alloc::dealloc(ptr.as_ptr(), layout) };
        }
    }
}

fn ring_distance(from: u32, to: u32, size: u32) -> u32 {
    if to >= from {
        to - from
    } else {
        size - from + to
    }
}

fn advance(pos: u32, by: u32, size: u32) -> u32 {
    let next = pos as u64 + by as u64;
    (next % size as u64) as u32
}

/// A packet descriptor copied out of the ring and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub packet_type: u16,
    /// Offset of the payload from the start of the packet, in bytes.
    pub data_offset: u32,
    /// Length of the packet including the descriptor and padding, in bytes.
    pub length: u32,
    pub flags: u16,
    pub transaction_id: u64,
}

/// A packet read from an incoming ring, valid until the next read.
#[derive(Debug)]
pub struct IncomingPacket<'a> {
    pub desc: Descriptor,
    bytes: SharedSlice<'a>,
}

impl<'a> IncomingPacket<'a> {
    /// The whole packet, descriptor included.
    pub fn bytes(&self) -> SharedSlice<'a> {
        self.bytes
    }

    /// The bytes from the data offset to the end of the packet (padding
    /// included: the length of a payload is the upper protocol's business).
    pub fn payload(&self) -> SharedSlice<'a> {
        self.bytes
            .subslice(
                self.desc.data_offset as usize,
                (self.desc.length - self.desc.data_offset) as usize,
            )
            .expect("checked when read")
    }

    /// The bytes between the descriptor and the data offset (range headers
    /// of GPA-direct and transfer-page packets).
    pub fn header_area(&self) -> SharedSlice<'a> {
        self.bytes
            .subslice(
                DESCRIPTOR_SIZE,
                self.desc.data_offset as usize - DESCRIPTOR_SIZE,
            )
            .expect("checked when read")
    }

    pub fn is_completion_requested(&self) -> bool {
        self.desc.flags & crate::wire::PACKET_FLAG_COMPLETION_REQUESTED != 0
    }
}

/// The consumer side of a ring.
#[derive(Debug)]
pub struct IncomingRing {
    mem: Arc<RingMemory>,
    /// Next byte to read (private until committed).
    read: u32,
    /// Start of the packet `read` returned last.
    last_start: u32,
    /// Value of read_index last published.
    published: u32,
    /// write_index as last observed.
    write_seen: u32,
    /// Copy of a wrapping packet when the ring is not doubly mapped.
    scratch: Vec<u8>,
    /// Packets read and ring bytes committed, for [`crate::stats`].
    packets: u64,
    bytes: u64,
}

impl IncomingRing {
    /// Attaches to a ring whose read_index the peer has initialized.
    pub fn new(mem: Arc<RingMemory>) -> Result<Self, RingError> {
        let read = mem.load_index(ring_offset::READ_INDEX, "read_index")?;
        let write = mem.load_index(ring_offset::WRITE_INDEX, "write_index")?;
        let scratch = if mem.double_mapped {
            Vec::new()
        } else {
            vec![0; mem.size as usize]
        };
        Ok(IncomingRing {
            mem,
            read,
            last_start: read,
            published: read,
            write_seen: write,
            scratch,
            packets: 0,
            bytes: 0,
        })
    }

    pub fn memory(&self) -> &Arc<RingMemory> {
        &self.mem
    }

    fn available(&self) -> u32 {
        ring_distance(self.read, self.write_seen, self.mem.size)
    }

    /// Bytes the peer has published that we have not read yet.
    pub fn bytes_available(&mut self) -> Result<u32, RingError> {
        self.write_seen = self
            .mem
            .load_index(ring_offset::WRITE_INDEX, "write_index")?;
        Ok(self.available())
    }

    /// Reads the next packet, if any. The read position advances privately;
    /// call [`IncomingRing::commit`] to hand the space back to the producer.
    pub fn read(&mut self) -> Result<Option<IncomingPacket<'_>>, RingError> {
        if self.available() == 0 && self.bytes_available()? == 0 {
            return Ok(None);
        }
        let available = self.available();
        if (available as usize) < DESCRIPTOR_SIZE + TRAILER_SIZE {
            return Err(RingError::Truncated { available });
        }
        let mut raw = [0u8; DESCRIPTOR_SIZE];
        self.mem.read_wrapping(self.read, &mut raw);
        let d = PacketDescriptor::read_from_bytes(&raw).expect("16 bytes");
        let desc = check_descriptor(&d, available)?;
        let start = self.read;
        self.last_start = start;
        self.packets += 1;
        let len = desc.length as usize;
        self.read = advance(start, desc.length + TRAILER_SIZE as u32, self.mem.size);
        let bytes = match self.mem.contiguous(start, len) {
            Some(slice) => slice,
            None => {
                self.mem.read_wrapping(start, &mut self.scratch[..len]);
                // SAFETY: scratch is private memory of at least len bytes,
                // untouched until the packet's borrow of self ends.
                unsafe { SharedSlice::new(self.scratch.as_mut_ptr(), len) }
            }
        };
        Ok(Some(IncomingPacket { desc, bytes }))
    }

    /// Puts the packet `read` returned last back, to be read again (used
    /// when its reply does not fit yet).
    pub fn unread(&mut self) {
        if self.read != self.last_start {
            self.packets -= 1;
        }
        self.read = self.last_start;
    }

    /// Packets read and ring bytes handed back since the ring was attached.
    pub fn totals(&self) -> (u64, u64) {
        (self.packets, self.bytes)
    }

    /// Publishes the read position. Returns true if the producer is waiting
    /// for space (pending_send_sz) and now has it: signal it.
    pub fn commit(&mut self) -> Result<bool, RingError> {
        if self.read == self.published {
            return Ok(false);
        }
        let size = self.mem.size;
        let consumed = ring_distance(self.published, self.read, size);
        self.bytes += u64::from(consumed);
        self.mem
            .field(ring_offset::READ_INDEX)
            .store(self.read, Ordering::Release);
        self.published = self.read;
        fence(Ordering::SeqCst);
        if self
            .mem
            .field(ring_offset::FEATURE_BITS)
            .load(Ordering::Relaxed)
            & FEATURE_PENDING_SEND_SIZE
            == 0
        {
            return Ok(false);
        }
        let pending = self
            .mem
            .field(ring_offset::PENDING_SEND_SZ)
            .load(Ordering::Acquire);
        if pending == 0 {
            return Ok(false);
        }
        let write = self
            .mem
            .load_index(ring_offset::WRITE_INDEX, "write_index")?;
        let free_now = size - ring_distance(self.read, write, size);
        let free_before = free_now.saturating_sub(consumed);
        Ok(free_before <= pending && free_now > pending)
    }

    /// Tells the producer not to signal: we are polling.
    pub fn mask_interrupts(&self) {
        self.mem
            .field(ring_offset::INTERRUPT_MASK)
            .store(1, Ordering::Relaxed);
    }

    /// Re-enables signals before sleeping. Returns false if data arrived in
    /// the meantime, in which case the caller must keep polling.
    pub fn unmask_and_check_empty(&mut self) -> Result<bool, RingError> {
        self.mem
            .field(ring_offset::INTERRUPT_MASK)
            .store(0, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        Ok(self.bytes_available()? == 0)
    }
}

fn check_descriptor(d: &PacketDescriptor, available: u32) -> Result<Descriptor, RingError> {
    let offset = d.data_offset8.get() as u32 * 8;
    let length = d.length8.get() as u32 * 8;
    let bad = || RingError::BadDescriptor {
        offset8: d.data_offset8.get(),
        length8: d.length8.get(),
        available,
    };
    if offset < DESCRIPTOR_SIZE as u32 || offset > length {
        return Err(bad());
    }
    if length as u64 + TRAILER_SIZE as u64 > available as u64 {
        return Err(bad());
    }
    Ok(Descriptor {
        packet_type: d.packet_type.get(),
        data_offset: offset,
        length,
        flags: d.flags.get(),
        transaction_id: d.transaction_id.get(),
    })
}

/// The producer side of a ring.
#[derive(Debug)]
pub struct OutgoingRing {
    mem: Arc<RingMemory>,
    /// Next byte to write (private until committed).
    write: u32,
    /// Value of write_index last published.
    published: u32,
    /// read_index as last observed.
    read_seen: u32,
    /// True while pending_send_sz is set by us.
    waiting: bool,
    /// Packets staged and ring bytes published, for [`crate::stats`].
    packets: u64,
    bytes: u64,
}

impl OutgoingRing {
    /// Attaches to a ring whose write_index the peer has initialized.
    pub fn new(mem: Arc<RingMemory>) -> Result<Self, RingError> {
        let write = mem.load_index(ring_offset::WRITE_INDEX, "write_index")?;
        let read = mem.load_index(ring_offset::READ_INDEX, "read_index")?;
        Ok(OutgoingRing {
            mem,
            write,
            published: write,
            read_seen: read,
            waiting: false,
            packets: 0,
            bytes: 0,
        })
    }

    pub fn memory(&self) -> &Arc<RingMemory> {
        &self.mem
    }

    /// Largest packet (descriptor, payload, padding) this ring can ever take.
    pub fn max_packet_len(&self) -> usize {
        self.mem.size as usize - 2 * TRAILER_SIZE
    }

    fn free(&self) -> u32 {
        let used = ring_distance(self.read_seen, self.write, self.mem.size);
        // Never fill the ring completely: equal indices mean empty.
        (self.mem.size - used).saturating_sub(TRAILER_SIZE as u32)
    }

    /// Prefetches for writing the next `len` bytes of free ring space (as
    /// far as the consumer is known to have freed it), so a batch of
    /// packets about to be written has its cache lines fetched from the
    /// consumer's CPU in parallel, not one store-buffer stall at a time.
    pub fn prefetch_next(&self, len: usize) {
        let len = (len as u32).min(self.free());
        self.mem.prefetch_for_write(self.write, len);
    }

    /// Free bytes for packets, re-reading the consumer's index.
    pub fn free_space(&mut self) -> Result<u32, RingError> {
        self.read_seen = self.mem.load_index(ring_offset::READ_INDEX, "read_index")?;
        Ok(self.free())
    }

    fn ensure_space(&mut self, needed: u32) -> Result<(), WriteError> {
        if self.free() >= needed || self.free_space()? >= needed {
            return Ok(());
        }
        Err(WriteError::Full { needed })
    }

    /// Reserves room for a packet whose payload starts at `data_offset`
    /// (descriptor and headers before it) and is `payload_len` bytes long.
    /// Nothing is visible to the peer until [`OutgoingRing::commit`].
    pub fn reserve(
        &mut self,
        data_offset: usize,
        payload_len: usize,
    ) -> Result<PacketSlot<'_>, WriteError> {
        debug_assert!(data_offset >= DESCRIPTOR_SIZE && data_offset.is_multiple_of(8));
        let total = packet_len(data_offset - DESCRIPTOR_SIZE + payload_len);
        let length = total - TRAILER_SIZE;
        if length > self.max_packet_len() || length / 8 > u16::MAX as usize {
            return Err(RingError::TooLarge(length).into());
        }
        self.ensure_space(total as u32)?;
        Ok(PacketSlot {
            start: self.write,
            length: length as u32,
            data_offset: data_offset as u32,
            ring: self,
        })
    }

    /// Writes a whole in-band style packet: `header` right after the
    /// descriptor (padded to 8), then `payload`.
    pub fn write_packet(
        &mut self,
        packet_type: u16,
        flags: u16,
        transaction_id: u64,
        header: &[u8],
        payload: &[u8],
    ) -> Result<(), WriteError> {
        let header_end = DESCRIPTOR_SIZE + header.len();
        let data_offset = header_end.next_multiple_of(8);
        let mut slot = self.reserve(data_offset, payload.len())?;
        slot.write(DESCRIPTOR_SIZE, header);
        slot.zero(header_end, data_offset - header_end);
        slot.write(data_offset, payload);
        slot.zero_padding(payload.len());
        slot.finish(packet_type, flags, transaction_id);
        Ok(())
    }

    /// Writes an in-band data packet.
    pub fn write_inband(
        &mut self,
        transaction_id: u64,
        completion: bool,
        payload: &[u8],
    ) -> Result<(), WriteError> {
        let flags = if completion {
            crate::wire::PACKET_FLAG_COMPLETION_REQUESTED
        } else {
            0
        };
        self.write_packet(
            packet_type::DATA_INBAND,
            flags,
            transaction_id,
            &[],
            payload,
        )
    }

    /// Writes a completion packet.
    pub fn write_completion(
        &mut self,
        transaction_id: u64,
        payload: &[u8],
    ) -> Result<(), WriteError> {
        self.write_packet(packet_type::COMPLETION, 0, transaction_id, &[], payload)
    }

    /// Publishes staged packets. Returns true if the consumer must be
    /// signalled (the ring was empty before this batch and it is not
    /// masking interrupts).
    pub fn commit(&mut self) -> Result<bool, RingError> {
        if self.write == self.published {
            return Ok(false);
        }
        let old = self.published;
        self.bytes += u64::from(ring_distance(old, self.write, self.mem.size));
        self.mem
            .field(ring_offset::WRITE_INDEX)
            .store(self.write, Ordering::Release);
        self.published = self.write;
        if self.waiting {
            self.mem
                .field(ring_offset::PENDING_SEND_SZ)
                .store(0, Ordering::Relaxed);
            self.waiting = false;
        }
        fence(Ordering::SeqCst);
        if self
            .mem
            .field(ring_offset::INTERRUPT_MASK)
            .load(Ordering::Relaxed)
            != 0
        {
            return Ok(false);
        }
        let read = self.mem.load_index(ring_offset::READ_INDEX, "read_index")?;
        self.read_seen = read;
        Ok(read == old)
    }

    /// Asks the consumer to signal once `needed` bytes (a packet plus its
    /// trailer) are free. Returns true if they already are, so the caller
    /// should retry instead of sleeping.
    pub fn request_space(&mut self, needed: u32) -> Result<bool, RingError> {
        self.mem
            .field(ring_offset::PENDING_SEND_SZ)
            .store(needed, Ordering::Relaxed);
        self.waiting = true;
        fence(Ordering::SeqCst);
        Ok(self.free_space()? >= needed)
    }

    /// Packets staged and ring bytes published since the ring was attached.
    pub fn totals(&self) -> (u64, u64) {
        (self.packets, self.bytes)
    }

    /// True if everything published has been consumed.
    pub fn is_drained(&mut self) -> Result<bool, RingError> {
        self.read_seen = self.mem.load_index(ring_offset::READ_INDEX, "read_index")?;
        Ok(self.read_seen == self.published)
    }
}

/// Room reserved for one outgoing packet. Offsets are from the start of the
/// packet (the descriptor is at 0). Dropping a slot without `finish`
/// abandons it.
#[derive(Debug)]
pub struct PacketSlot<'a> {
    ring: &'a mut OutgoingRing,
    start: u32,
    length: u32,
    data_offset: u32,
}

impl PacketSlot<'_> {
    /// Bytes available for the payload, from the data offset to the end.
    pub fn payload_capacity(&self) -> usize {
        (self.length - self.data_offset) as usize
    }

    fn pos(&self, offset: usize, len: usize) -> u32 {
        assert!(
            offset + len <= self.length as usize,
            "write past reserved packet"
        );
        advance(self.start, offset as u32, self.ring.mem.size)
    }

    /// Copies bytes into the packet at `offset`.
    pub fn write(&mut self, offset: usize, bytes: &[u8]) {
        let pos = self.pos(offset, bytes.len());
        self.ring.mem.write_wrapping(pos, bytes);
    }

    /// Copies shared memory (e.g. another ring's payload) into the packet.
    pub fn write_shared(&mut self, offset: usize, src: &SharedSlice<'_>) {
        let pos = self.pos(offset, src.len());
        self.ring.mem.write_shared_wrapping(pos, src);
    }

    /// Writes the descriptor and trailer and stages the packet.
    pub fn finish(self, packet_type: u16, flags: u16, transaction_id: u64) {
        // The descriptor's two words (`PacketDescriptor`'s layout), built
        // in registers: see `RingMemory::write_words`.
        let head = u64::from(packet_type)
            | u64::from((self.data_offset / 8) as u16) << 16
            | u64::from((self.length / 8) as u16) << 32
            | u64::from(flags) << 48;
        let mem = &self.ring.mem;
        mem.write_words(self.start, [head, transaction_id]);
        let end = advance(self.start, self.length, mem.size);
        let trailer = (self.start as u64) << 32;
        mem.write_words(end, [trailer]);
        self.ring.write = advance(end, TRAILER_SIZE as u32, mem.size);
        self.ring.packets += 1;
    }

    /// Zeroes `len` bytes at `offset` (padding, reserved fields).
    pub fn zero(&mut self, offset: usize, len: usize) {
        const ZEROS: [u8; 64] = [0; 64];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len());
            self.write(offset + done, &ZEROS[..n]);
            done += n;
        }
    }

    /// Zeroes the padding between `used` payload bytes and the packet end.
    pub fn zero_padding(&mut self, used: usize) {
        let from = self.data_offset as usize + used;
        self.zero(from, self.length as usize - from);
    }
}

/// A connected producer/consumer pair over private memory (tests, benches).
pub fn private_pair(data_pages: usize) -> (OutgoingRing, IncomingRing) {
    let mem = RingMemory::new_private(data_pages);
    mem.init_control();
    let out = OutgoingRing::new(mem.clone()).expect("fresh ring");
    let inc = IncomingRing::new(mem).expect("fresh ring");
    (out, inc)
}

#[cfg(test)]
mod tests;
