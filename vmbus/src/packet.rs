//! Typed views of the packets that carry memory references: GPA-direct
//! packets (a list of guest page ranges, used by storvsc and netvsc sends)
//! and transfer-page packets (ranges inside a pre-shared buffer, used for
//! netvsc receives). Also the writers for both.
//!
//! Parsing copies the range headers and page numbers out of the ring once,
//! into caller-owned reusable buffers, so validation and use see the same
//! values and no allocation happens per packet after warm-up.

use zerocopy::{FromBytes, IntoBytes};

use crate::memory::{MemoryError, SharedMemory, SharedSlice};
use crate::ring::{DESCRIPTOR_SIZE, IncomingPacket, OutgoingRing, WriteError};
use crate::wire::{
    GpaDirectHeader, GpaRangeHeader, PAGE_SIZE, TransferPageHeader, TransferPageRange, packet_type,
};

/// A malformed packet from the peer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("expected packet type {expected}, got {got}")]
    WrongType { expected: u16, got: u16 },
    #[error("range headers need {needed} bytes, the packet has {available}")]
    RangesPastHeader { needed: usize, available: usize },
    #[error("range {index}: offset {offset} and length {count} are invalid")]
    BadRange {
        index: usize,
        offset: u32,
        count: u32,
    },
    #[error("{0} ranges is more than allowed")]
    TooManyRanges(u32),
    #[error("payload of {needed} bytes needed, {available} present")]
    ShortPayload { needed: usize, available: usize },
}

/// One range of a GPA-direct packet: `byte_count` bytes starting
/// `byte_offset` bytes into the first of its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpaRange {
    pub byte_count: u32,
    pub byte_offset: u32,
    first_pfn: usize,
    pfn_count: usize,
}

/// Parsed ranges of a GPA-direct packet (reusable buffer).
#[derive(Debug, Default, Clone)]
pub struct GpaRanges {
    ranges: Vec<GpaRange>,
    pfns: Vec<u64>,
}

/// Most ranges accepted in one packet (Linux sends at most 32).
pub const MAX_GPA_RANGES: u32 = 256;

impl GpaRanges {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses the range list of a GPA-direct packet.
    pub fn parse(&mut self, packet: &IncomingPacket<'_>) -> Result<(), PacketError> {
        if packet.desc.packet_type != packet_type::DATA_USING_GPA_DIRECT {
            return Err(PacketError::WrongType {
                expected: packet_type::DATA_USING_GPA_DIRECT,
                got: packet.desc.packet_type,
            });
        }
        self.parse_area(&packet.header_area())
    }

    /// Parses a range list laid out as in a GPA-direct packet: a
    /// [`GpaDirectHeader`], then each range header followed by its pfns.
    /// The area may be longer than the ranges need (older Linux kernels
    /// reserve 32 page slots whatever the size).
    pub fn parse_area(&mut self, area: &SharedSlice<'_>) -> Result<(), PacketError> {
        self.ranges.clear();
        self.pfns.clear();
        let short = |needed| PacketError::RangesPastHeader {
            needed,
            available: area.len(),
        };
        let header: GpaDirectHeader = area.read_obj(0).map_err(|_| short(8))?;
        let count = header.range_count.get();
        if count > MAX_GPA_RANGES {
            return Err(PacketError::TooManyRanges(count));
        }
        let mut at = size_of::<GpaDirectHeader>();
        for index in 0..count as usize {
            let r: GpaRangeHeader = area.read_obj(at).map_err(|_| short(at + 8))?;
            at += size_of::<GpaRangeHeader>();
            let (offset, bytes) = (r.byte_offset.get(), r.byte_count.get());
            let pfn_count = pages_spanned(offset, bytes).ok_or(PacketError::BadRange {
                index,
                offset,
                count: bytes,
            })?;
            let first_pfn = self.pfns.len();
            let end = at + pfn_count * 8;
            if end > area.len() {
                return Err(short(end));
            }
            for i in 0..pfn_count {
                let pfn: u64 = area.read_obj(at + i * 8).map_err(|_| short(end))?;
                self.pfns.push(pfn);
            }
            at = end;
            self.ranges.push(GpaRange {
                byte_count: bytes,
                byte_offset: offset,
                first_pfn,
                pfn_count,
            });
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn ranges(&self) -> &[GpaRange] {
        &self.ranges
    }

    /// Page frames of one range.
    pub fn pfns(&self, range: &GpaRange) -> &[u64] {
        &self.pfns[range.first_pfn..range.first_pfn + range.pfn_count]
    }

    /// Total bytes described by all ranges.
    pub fn total_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.byte_count as u64).sum()
    }

    /// Visits the (GPA, length) of every page piece the ranges describe, in
    /// order. GPAs are not checked against memory here.
    pub fn for_each_gpa<E>(&self, mut f: impl FnMut(u64, usize) -> Result<(), E>) -> Result<(), E>
    where
        E: From<MemoryError>,
    {
        for r in &self.ranges {
            let mut offset = r.byte_offset as usize;
            let mut left = r.byte_count as usize;
            for &pfn in self.pfns(r) {
                let len = left.min(PAGE_SIZE - offset);
                let gpa = pfn
                    .checked_mul(PAGE_SIZE as u64)
                    .and_then(|a| a.checked_add(offset as u64))
                    .ok_or(MemoryError::BadPfn(pfn))?;
                f(gpa, len)?;
                left -= len;
                offset = 0;
            }
        }
        Ok(())
    }

    /// Visits every contiguous piece of guest memory the ranges describe, in
    /// order, after checking it lies inside `memory`.
    pub fn for_each_segment<'m>(
        &self,
        memory: &'m SharedMemory,
        mut f: impl FnMut(SharedSlice<'m>),
    ) -> Result<(), MemoryError> {
        self.for_each_gpa(|gpa, len| {
            f(memory.slice(gpa, len)?);
            Ok(())
        })
    }
}

/// Pages spanned by a range, or None if the range is invalid: empty, or
/// starting beyond its first page.
fn pages_spanned(offset: u32, count: u32) -> Option<usize> {
    if count == 0 || offset as usize >= PAGE_SIZE {
        return None;
    }
    Some((offset as usize + count as usize).div_ceil(PAGE_SIZE))
}

/// A transfer-page packet's header and ranges (reusable buffer).
#[derive(Debug, Default, Clone)]
pub struct TransferPages {
    pub set_id: u16,
    pub ranges: Vec<TransferPageRange>,
}

/// Most ranges accepted in a transfer-page packet (netvsc uses <= 375).
pub const MAX_TRANSFER_RANGES: u32 = 512;

impl TransferPages {
    /// Parses a transfer-page packet.
    pub fn parse(&mut self, packet: &IncomingPacket<'_>) -> Result<(), PacketError> {
        if packet.desc.packet_type != packet_type::DATA_USING_TRANSFER_PAGES {
            return Err(PacketError::WrongType {
                expected: packet_type::DATA_USING_TRANSFER_PAGES,
                got: packet.desc.packet_type,
            });
        }
        let area = packet.header_area();
        let short = |needed| PacketError::RangesPastHeader {
            needed,
            available: area.len(),
        };
        let h: TransferPageHeader = area.read_obj(0).map_err(|_| short(8))?;
        let count = h.range_count.get();
        if count > MAX_TRANSFER_RANGES {
            return Err(PacketError::TooManyRanges(count));
        }
        self.set_id = h.transfer_page_set_id.get();
        self.ranges.clear();
        for i in 0..count as usize {
            let at = 8 + i * 8;
            self.ranges
                .push(area.read_obj(at).map_err(|_| short(at + 8))?);
        }
        Ok(())
    }
}

/// Writes a GPA-direct packet: `ranges` are (byte_count, byte_offset, pfns).
pub fn write_gpa_direct(
    ring: &mut OutgoingRing,
    transaction_id: u64,
    flags: u16,
    ranges: &[(u32, u32, &[u64])],
    payload: &[u8],
) -> Result<(), WriteError> {
    let range_bytes: usize = ranges.iter().map(|(_, _, p)| 8 + p.len() * 8).sum();
    let data_offset = DESCRIPTOR_SIZE + 8 + range_bytes;
    let mut slot = ring.reserve(data_offset, payload.len())?;
    let header = GpaDirectHeader {
        reserved: 0.into(),
        range_count: (ranges.len() as u32).into(),
    };
    slot.write(DESCRIPTOR_SIZE, header.as_bytes());
    let mut at = DESCRIPTOR_SIZE + 8;
    for (count, offset, pfns) in ranges {
        let r = GpaRangeHeader {
            byte_count: (*count).into(),
            byte_offset: (*offset).into(),
        };
        slot.write(at, r.as_bytes());
        slot.write(at + 8, pfns.as_bytes());
        at += 8 + pfns.len() * 8;
    }
    slot.write(data_offset, payload);
    slot.zero_padding(payload.len());
    slot.finish(packet_type::DATA_USING_GPA_DIRECT, flags, transaction_id);
    Ok(())
}

/// Writes a transfer-page packet referring to `ranges` (byte_count,
/// byte_offset) of transfer page set `set_id`.
pub fn write_transfer_pages(
    ring: &mut OutgoingRing,
    transaction_id: u64,
    flags: u16,
    set_id: u16,
    ranges: &[(u32, u32)],
    payload: &[u8],
) -> Result<(), WriteError> {
    let data_offset = DESCRIPTOR_SIZE + 8 + ranges.len() * 8;
    let mut slot = ring.reserve(data_offset, payload.len())?;
    let header = TransferPageHeader {
        transfer_page_set_id: set_id.into(),
        sender_owns_set: 0,
        reserved: 0,
        range_count: (ranges.len() as u32).into(),
    };
    slot.write(DESCRIPTOR_SIZE, header.as_bytes());
    for (i, (count, offset)) in ranges.iter().enumerate() {
        let r = TransferPageRange {
            byte_count: (*count).into(),
            byte_offset: (*offset).into(),
        };
        slot.write(DESCRIPTOR_SIZE + 8 + i * 8, r.as_bytes());
    }
    slot.write(data_offset, payload);
    slot.zero_padding(payload.len());
    slot.finish(
        packet_type::DATA_USING_TRANSFER_PAGES,
        flags,
        transaction_id,
    );
    Ok(())
}

/// Reads a `T` at the start of a packet's payload.
pub fn read_payload<T: FromBytes + IntoBytes>(
    packet: &IncomingPacket<'_>,
) -> Result<T, PacketError> {
    let payload = packet.payload();
    payload.read_obj(0).map_err(|_| PacketError::ShortPayload {
        needed: size_of::<T>(),
        available: payload.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::private_pair;

    #[test]
    fn gpa_direct_round_trip_and_bytes() {
        let (mut out, mut inc) = private_pair(2);
        let pfns = [0x10u64, 0x11, 0x2a];
        write_gpa_direct(&mut out, 77, 1, &[(9000, 100, &pfns)], &[0xee; 64]).unwrap();
        out.commit().unwrap();
        let p = inc.read().unwrap().unwrap();
        assert_eq!(p.desc.packet_type, 9);
        // 16 descriptor + 8 header + 8 range + 3 * 8 pfns = 56
        assert_eq!(p.desc.data_offset, 56);
        let mut raw = [0u8; 56];
        p.bytes().read_at(0, &mut raw).unwrap();
        assert_eq!(&raw[16..24], &[0, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&raw[24..32], &[0x28, 0x23, 0, 0, 100, 0, 0, 0]);
        assert_eq!(&raw[32..40], &[0x10, 0, 0, 0, 0, 0, 0, 0]);
        let mut g = GpaRanges::new();
        g.parse(&p).unwrap();
        assert_eq!(g.len(), 1);
        let r = g.ranges()[0];
        assert_eq!((r.byte_count, r.byte_offset), (9000, 100));
        assert_eq!(g.pfns(&r), &pfns);
        assert_eq!(g.total_bytes(), 9000);
    }

    #[test]
    fn segments_follow_page_boundaries() {
        let (mem, _fd) = SharedMemory::create(16 * 4096).unwrap();
        let (mut out, mut inc) = private_pair(1);
        write_gpa_direct(
            &mut out,
            1,
            0,
            &[(5000, 4000, &[3, 7, 8]), (10, 0, &[9])],
            &[],
        )
        .unwrap();
        out.commit().unwrap();
        let p = inc.read().unwrap().unwrap();
        let mut g = GpaRanges::new();
        g.parse(&p).unwrap();
        let mut segs = Vec::new();
        let base = mem.slice(0, 1).unwrap().as_ptr() as usize;
        g.for_each_segment(&mem, |s| segs.push((s.as_ptr() as usize - base, s.len())))
            .unwrap();
        assert_eq!(
            segs,
            vec![
                (3 * 4096 + 4000, 96),
                (7 * 4096, 4096),
                (8 * 4096, 808),
                (9 * 4096, 10)
            ]
        );
        // A pfn past the end of memory is refused.
        write_gpa_direct(&mut out, 2, 0, &[(10, 0, &[16])], &[]).unwrap();
        out.commit().unwrap();
        let p = inc.read().unwrap().unwrap();
        g.parse(&p).unwrap();
        assert!(g.for_each_segment(&mem, |_| {}).is_err());
    }

    #[test]
    fn malformed_ranges_are_rejected() {
        let (mut out, mut inc) = private_pair(1);
        let mut g = GpaRanges::new();
        // Claims 4 pfns' worth of bytes but carries one.
        write_gpa_direct(&mut out, 1, 0, &[(4 * 4096, 0, &[1])], &[]).unwrap();
        // Offset beyond the first page.
        write_gpa_direct(&mut out, 2, 0, &[(16, 4096, &[1])], &[]).unwrap();
        // Zero-length range.
        write_gpa_direct(&mut out, 3, 0, &[(0, 0, &[1])], &[]).unwrap();
        // An in-band packet is not GPA-direct.
        out.write_inband(4, false, &[0; 8]).unwrap();
        out.commit().unwrap();
        let p = inc.read().unwrap().unwrap();
        assert!(matches!(
            g.parse(&p),
            Err(PacketError::RangesPastHeader { .. })
        ));
        let p = inc.read().unwrap().unwrap();
        assert!(matches!(
            g.parse(&p),
            Err(PacketError::BadRange { offset: 4096, .. })
        ));
        let p = inc.read().unwrap().unwrap();
        assert!(matches!(
            g.parse(&p),
            Err(PacketError::BadRange { count: 0, .. })
        ));
        let p = inc.read().unwrap().unwrap();
        assert!(matches!(g.parse(&p), Err(PacketError::WrongType { .. })));
    }

    #[test]
    fn oversized_slot_area_from_old_kernels_is_accepted() {
        // 32 pfn slots reserved, one range of one page used.
        let (mut out, mut inc) = private_pair(1);
        let slots = [5u64; 32];
        write_gpa_direct(&mut out, 1, 0, &[(512, 0, &slots)], &[]).unwrap();
        out.commit().unwrap();
        let p = inc.read().unwrap().unwrap();
        let mut g = GpaRanges::new();
        // The writer declared 512 bytes, so only one pfn belongs to the range.
        g.parse(&p).unwrap();
        assert_eq!(g.pfns(&g.ranges()[0]), &[5]);
    }

    #[test]
    fn transfer_pages_round_trip() {
        let (mut out, mut inc) = private_pair(1);
        write_transfer_pages(
            &mut out,
            5,
            0,
            0xcafe,
            &[(100, 0), (200, 4096)],
            &[1, 2, 3, 4],
        )
        .unwrap();
        out.commit().unwrap();
        let p = inc.read().unwrap().unwrap();
        let mut t = TransferPages::default();
        t.parse(&p).unwrap();
        assert_eq!(t.set_id, 0xcafe);
        let got: Vec<(u32, u32)> = t
            .ranges
            .iter()
            .map(|r| (r.byte_count.get(), r.byte_offset.get()))
            .collect();
        assert_eq!(got, vec![(100, 0), (200, 4096)]);
        let v: [u8; 4] = read_payload(&p).unwrap();
        assert_eq!(v, [1, 2, 3, 4]);
    }
}
