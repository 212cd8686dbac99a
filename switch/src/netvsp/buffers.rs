//! The two buffers a netvsc guest shares with its host, and how the host
//! carves the receive buffer up.
//!
//! Both are GPADLs the guest names in NVSP messages. vspa maps each one's
//! pages contiguously ([`vmbus::SharedMemory::map_pages`]), so a message
//! that crosses guest pages that are not adjacent is still one linear copy.
//!
//! Receive buffer: the RNDIS messages sent to the guest are allocated from
//! it as a ring ([`RxRing`]) shared by the NIC's channels (they all run on
//! one thread): the messages of one transfer-page packet are packed back to
//! back, and a packet's space returns when the guest completes it. Packets
//! normally complete in order; one completed early waits for the older
//! ones, and a guest that never completes only fills its own buffer, after
//! which frames for it are dropped and counted.

use vmbus::MappedPages;

/// Alignment of each message in the receive buffer.
pub const RX_ALIGN: u32 = 8;

/// A mapped receive buffer.
#[derive(Debug)]
pub struct RecvBuffer {
    pub map: MappedPages,
    pub gpadl: u32,
    /// Size reported to the guest as sub-allocation size: the largest
    /// message vspa ever puts in one range.
    pub sub_alloc_size: u32,
    pub num_sub_allocs: u32,
}

impl RecvBuffer {
    /// Lays out a buffer whose largest message is `max_message` bytes; None
    /// if it cannot hold two of them.
    pub fn new(map: MappedPages, gpadl: u32, max_message: u32) -> Option<Self> {
        let size = u32::try_from(map.len()).ok()?;
        let sub_alloc_size = max_message.next_multiple_of(64);
        if size / 2 < sub_alloc_size {
            return None;
        }
        Some(RecvBuffer {
            map,
            gpadl,
            sub_alloc_size,
            num_sub_allocs: size / sub_alloc_size,
        })
    }

    /// A fresh allocator over the whole buffer.
    pub fn ring(&self) -> RxRing {
        // Packets in flight: the guest tracks at most num_sub_allocs
        // completions per channel.
        let slots = (self.num_sub_allocs as usize).clamp(1, 4096);
        RxRing::new(0, self.map.len() as u32, slots)
    }
}

/// A mapped send buffer.
#[derive(Debug)]
pub struct SendBuffer {
    pub map: MappedPages,
    pub gpadl: u32,
    pub section_size: u32,
    pub sections: u32,
}

impl SendBuffer {
    pub fn new(map: MappedPages, gpadl: u32, section_size: u32) -> Option<Self> {
        let sections = u32::try_from(map.len()).ok()? / section_size;
        (sections > 0).then_some(SendBuffer {
            map,
            gpadl,
            section_size,
            sections,
        })
    }
}

/// One transfer-page packet in flight.
#[derive(Debug, Clone, Copy, Default)]
struct InFlight {
    /// Ring position after the packet's last message.
    end: u32,
    done: bool,
}

/// Why a completion from the guest was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CompletionError {
    #[error("transaction id {0} is not a packet in flight")]
    Unknown(u64),
    #[error("transaction id {0} was already completed")]
    Duplicate(u64),
}

/// Ring allocator over one channel's receive-buffer region, with the table
/// of packets in flight. Transaction ids are sequential per channel, so a
/// completion finds its packet by subtraction.
#[derive(Debug)]
pub struct RxRing {
    base: u32,
    size: u32,
    /// Next free byte (relative to base).
    head: u32,
    /// Oldest byte still in use.
    tail: u32,
    table: Box<[InFlight]>,
    /// Transaction id of the oldest packet in flight.
    oldest: u64,
    /// Transaction id the next packet gets.
    next: u64,
    /// Head when the packet being built started (for rollback).
    open_at: Option<u32>,
}

impl RxRing {
    pub fn new(base: u32, size: u32, slots: usize) -> Self {
        RxRing {
            base,
            size,
            head: 0,
            tail: 0,
            table: vec![InFlight::default(); slots].into_boxed_slice(),
            oldest: 1,
            next: 1,
            open_at: None,
        }
    }

    fn in_flight(&self) -> usize {
        (self.next - self.oldest) as usize
    }

    /// True if no more packets may be sent until the guest completes some.
    pub fn table_full(&self) -> bool {
        self.in_flight() >= self.table.len()
    }

    /// Packets the guest has not completed.
    pub fn pending(&self) -> usize {
        self.in_flight()
    }

    fn empty(&self) -> bool {
        self.in_flight() == 0 && self.open_at.is_none()
    }

    /// Allocates `len` bytes for a message of the packet being built;
    /// returns its offset in the receive buffer.
    pub fn alloc(&mut self, len: u32) -> Option<u32> {
        let a = len.checked_next_multiple_of(RX_ALIGN)?;
        if a == 0 || a > self.size {
            return None;
        }
        if self.empty() {
            self.head = 0;
            self.tail = 0;
        }
        let at = if self.empty() || self.head > self.tail {
            // In use: [tail, head). Free: [head, size), then [0, tail).
            if self.head + a <= self.size {
                self.head
            } else if a <= self.tail {
                0
            } else {
                return None;
            }
        } else if self.head + a <= self.tail {
            // Wrapped: free only between head and tail.
            self.head
        } else {
            // head == tail with packets in flight: full.
            return None;
        };
        if self.open_at.is_none() {
            self.open_at = Some(self.head);
        }
        self.head = at + a;
        Some(self.base + at)
    }

    /// The transaction id the packet being built will get.
    pub fn next_tid(&self) -> u64 {
        self.next
    }

    /// Closes the packet being built: its space is in flight under the
    /// returned transaction id. None if nothing was allocated.
    pub fn commit(&mut self) -> Option<u64> {
        self.open_at.take()?;
        let tid = self.next;
        let slot = (tid % self.table.len() as u64) as usize;
        self.table[slot] = InFlight {
            end: self.head,
            done: false,
        };
        self.next += 1;
        Some(tid)
    }

    /// Gives back everything allocated since the last commit.
    pub fn rollback(&mut self) {
        if let Some(at) = self.open_at.take() {
            self.head = at;
        }
    }

    /// The guest completed packet `tid`: its space (and that of every
    /// older completed packet) is free again.
    pub fn complete(&mut self, tid: u64) -> Result<(), CompletionError> {
        if tid < self.oldest || tid >= self.next {
            return Err(CompletionError::Unknown(tid));
        }
        let len = self.table.len() as u64;
        let e = &mut self.table[(tid % len) as usize];
        if e.done {
            return Err(CompletionError::Duplicate(tid));
        }
        e.done = true;
        while self.oldest < self.next {
            let e = self.table[(self.oldest % len) as usize];
            if !e.done {
                break;
            }
            self.tail = e.end;
            self.oldest += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_wraps_and_frees_in_order() {
        let mut r = RxRing::new(1000, 100, 8);
        assert_eq!(r.alloc(30), Some(1000));
        assert_eq!(r.alloc(30), Some(1032));
        let t1 = r.commit().unwrap();
        assert_eq!(r.alloc(30), Some(1064));
        let t2 = r.commit().unwrap();
        // 96 used; 4 left at the end, nothing freed at the start.
        assert_eq!(r.alloc(8), None);
        r.rollback();
        // t2 completes first: nothing is freed until t1 is.
        r.complete(t2).unwrap();
        assert_eq!(r.alloc(8), None);
        r.rollback();
        r.complete(t1).unwrap();
        // Everything is free: the ring restarts at 0 (100 rounds up to
        // 104 bytes, more than the ring).
        assert_eq!(r.pending(), 0);
        assert_eq!(r.alloc(100), None);
        assert_eq!(r.alloc(96), Some(1000));
        let t3 = r.commit().unwrap();
        assert_eq!(r.complete(t3), Ok(()));
        assert_eq!(r.complete(t3), Err(CompletionError::Unknown(t3)));
        assert_eq!(r.complete(99), Err(CompletionError::Unknown(99)));
    }

    #[test]
    fn ring_reuses_the_start_while_the_end_is_busy() {
        let mut r = RxRing::new(0, 64, 8);
        r.alloc(24).unwrap();
        let a = r.commit().unwrap();
        r.alloc(24).unwrap();
        let b = r.commit().unwrap();
        r.complete(a).unwrap();
        // 16 free at the end, 24 at the start: a 24-byte message wraps.
        assert_eq!(r.alloc(24), Some(0));
        let c = r.commit().unwrap();
        // Nothing left between head (24) and tail (24).
        assert_eq!(r.alloc(8), None);
        r.rollback();
        assert_eq!(r.complete(b), Ok(()));
        assert_eq!(r.complete(b), Err(CompletionError::Unknown(b)));
        // The tail is now 48 (b's end), head 24: 24 bytes free in between.
        assert_eq!(r.alloc(24), Some(24));
        r.rollback();
        r.complete(c).unwrap();
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn in_flight_table_bounds_packets() {
        let mut r = RxRing::new(0, 4096, 2);
        for _ in 0..2 {
            r.alloc(8).unwrap();
            r.commit().unwrap();
        }
        assert!(r.table_full());
        r.complete(1).unwrap();
        assert!(!r.table_full());
        // An early completion of a later packet is remembered.
        r.alloc(8).unwrap();
        let t = r.commit().unwrap();
        r.complete(t).unwrap();
        assert_eq!(r.complete(t), Err(CompletionError::Duplicate(t)));
        r.complete(2).unwrap();
        assert_eq!(r.pending(), 0);
    }
}
