//! GPADLs: guest page lists the guest registers with the host (rings,
//! netvsc receive and send buffers).
//!
//! A GPADL arrives as a GPADL_HEADER message followed by GPADL_BODY messages
//! until `range_buflen` bytes of range data (range headers and pfns) have
//! been received. The assembled list is validated against the memory it
//! describes before the host answers GPADL_CREATED.

use zerocopy::FromBytes;

use crate::memory::{MemoryError, SharedMemory, SharedSlice};
use crate::wire::{GpaRangeHeader, GpadlBody, GpadlHeader, PAGE_SIZE};

/// A GPADL the guest got wrong.
#[derive(Debug, thiserror::Error)]
pub enum GpadlError {
    #[error("GPADL message of {0} bytes is too short")]
    Short(usize),
    #[error("GPADL {0:#x} already exists or is being built")]
    Duplicate(u32),
    #[error("GPADL body for unknown GPADL {0:#x}")]
    UnknownBody(u32),
    #[error("GPADL {gpadl:#x}: {reason}")]
    Malformed { gpadl: u32, reason: &'static str },
    #[error("GPADL {gpadl:#x}: {source}")]
    Memory { gpadl: u32, source: MemoryError },
}

/// One range of a GPADL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpadlRange {
    pub byte_count: u32,
    pub byte_offset: u32,
    first_pfn: usize,
    pfn_count: usize,
}

/// A complete, validated GPADL.
#[derive(Debug, Clone)]
pub struct Gpadl {
    pub id: u32,
    pub child_relid: u32,
    ranges: Vec<GpadlRange>,
    pfns: Vec<u64>,
}

impl Gpadl {
    pub fn ranges(&self) -> &[GpadlRange] {
        &self.ranges
    }

    pub fn pfns(&self, range: &GpadlRange) -> &[u64] {
        &self.pfns[range.first_pfn..range.first_pfn + range.pfn_count]
    }

    /// The page list of a single-range, page-aligned GPADL (rings and
    /// buffers are always this shape).
    pub fn single_range_pages(&self) -> Option<&[u64]> {
        match self.ranges.as_slice() {
            [r] if r.byte_offset == 0 && r.byte_count as usize == r.pfn_count * PAGE_SIZE => {
                Some(self.pfns(r))
            }
            _ => None,
        }
    }

    /// Byte `offset`..`offset+len` of a single-range GPADL as shared memory,
    /// if it does not cross a page boundary that is discontiguous. Used for
    /// receive/send buffer sections.
    pub fn slice<'m>(
        &self,
        memory: &'m SharedMemory,
        offset: usize,
        len: usize,
    ) -> Option<SharedSlice<'m>> {
        let pages = self.single_range_pages()?;
        let first = offset / PAGE_SIZE;
        let last = (offset + len.max(1) - 1) / PAGE_SIZE;
        if last >= pages.len() {
            return None;
        }
        // Every page must follow the previous one in guest memory.
        if pages[first..=last].windows(2).any(|w| w[1] != w[0] + 1) {
            return None;
        }
        let gpa = pages[first] * PAGE_SIZE as u64 + (offset % PAGE_SIZE) as u64;
        memory.slice(gpa, len).ok()
    }
}

/// A GPADL whose body messages are still arriving.
#[derive(Debug)]
pub struct GpadlBuilder {
    id: u32,
    child_relid: u32,
    range_count: u16,
    expected: usize,
    bytes: Vec<u8>,
}

/// Largest single-range GPADL: range_buflen is a u16.
pub const MAX_GPADL_PAGES: usize = (u16::MAX as usize - 8) / 8;

impl GpadlBuilder {
    /// Starts a GPADL from its header message.
    pub fn start(msg: &[u8]) -> Result<Self, GpadlError> {
        let (h, rest) =
            GpadlHeader::read_from_prefix(msg).map_err(|_| GpadlError::Short(msg.len()))?;
        let id = h.gpadl.get();
        let expected = h.range_buflen.get() as usize;
        let range_count = h.range_count.get();
        if range_count == 0 || expected < range_count as usize * size_of::<GpaRangeHeader>() {
            return Err(GpadlError::Malformed {
                gpadl: id,
                reason: "range count and range buffer length disagree",
            });
        }
        let take = rest.len().min(expected);
        Ok(GpadlBuilder {
            id,
            child_relid: h.child_relid.get(),
            range_count,
            expected,
            bytes: rest[..take].to_vec(),
        })
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub fn child_relid(&self) -> u32 {
        self.child_relid
    }

    pub fn is_complete(&self) -> bool {
        self.bytes.len() >= self.expected
    }

    /// The GPADL id a body message continues.
    pub fn body_id(msg: &[u8]) -> Result<u32, GpadlError> {
        let (b, _) = GpadlBody::read_from_prefix(msg).map_err(|_| GpadlError::Short(msg.len()))?;
        Ok(b.gpadl.get())
    }

    /// Appends a body message's pfns.
    pub fn add_body(&mut self, msg: &[u8]) -> Result<(), GpadlError> {
        let (_, rest) =
            GpadlBody::read_from_prefix(msg).map_err(|_| GpadlError::Short(msg.len()))?;
        let take = rest.len().min(self.expected - self.bytes.len());
        if rest.is_empty() {
            return Err(GpadlError::Malformed {
                gpadl: self.id,
                reason: "empty body message",
            });
        }
        self.bytes.extend_from_slice(&rest[..take]);
        Ok(())
    }

    /// Parses and validates the complete range buffer against `memory`.
    pub fn finish(self, memory: &SharedMemory) -> Result<Gpadl, GpadlError> {
        let id = self.id;
        let bad = |reason| GpadlError::Malformed { gpadl: id, reason };
        let mut ranges = Vec::with_capacity(self.range_count as usize);
        let mut pfns = Vec::with_capacity(self.expected / 8);
        let mut at = 0usize;
        for _ in 0..self.range_count {
            let (r, _) = GpaRangeHeader::read_from_prefix(self.bytes.get(at..).unwrap_or_default())
                .map_err(|_| bad("range header past the range buffer"))?;
            at += size_of::<GpaRangeHeader>();
            let (count, offset) = (r.byte_count.get(), r.byte_offset.get());
            if count == 0 || offset as usize >= PAGE_SIZE {
                return Err(bad("empty range or offset beyond the first page"));
            }
            let n = (offset as usize + count as usize).div_ceil(PAGE_SIZE);
            let end = at + n * 8;
            let raw = self
                .bytes
                .get(at..end)
                .ok_or(bad("pfns past the range buffer"))?;
            let first = pfns.len();
            pfns.extend(
                raw.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
            );
            ranges.push(GpadlRange {
                byte_count: count,
                byte_offset: offset,
                first_pfn: first,
                pfn_count: n,
            });
            at = end;
        }
        if at != self.expected {
            return Err(bad("range buffer length does not match its ranges"));
        }
        memory
            .check_pfns(&pfns)
            .map_err(|source| GpadlError::Memory { gpadl: id, source })?;
        Ok(Gpadl {
            id,
            child_relid: self.child_relid,
            ranges,
            pfns,
        })
    }
}

/// Builds the GPADL_HEADER and GPADL_BODY messages for one page-aligned
/// range, as a Linux guest does (client side).
pub fn gpadl_messages(child_relid: u32, gpadl: u32, pfns: &[u64]) -> Vec<Vec<u8>> {
    assert!(
        pfns.len() <= MAX_GPADL_PAGES,
        "GPADL too large for one range buffer"
    );
    use crate::wire::{GPADL_BODY_MAX_PFNS, GPADL_HEADER_MAX_PFNS, MessageHeader, msgtype};
    use zerocopy::IntoBytes;
    let first = pfns.len().min(GPADL_HEADER_MAX_PFNS);
    let header = GpadlHeader {
        header: MessageHeader::new(msgtype::GPADL_HEADER),
        child_relid: child_relid.into(),
        gpadl: gpadl.into(),
        range_buflen: ((8 + pfns.len() * 8) as u16).into(),
        range_count: 1.into(),
    };
    let range = GpaRangeHeader {
        byte_count: ((pfns.len() * PAGE_SIZE) as u32).into(),
        byte_offset: 0.into(),
    };
    let mut msg = header.as_bytes().to_vec();
    msg.extend_from_slice(range.as_bytes());
    msg.extend_from_slice(pfns[..first].as_bytes());
    let mut out = vec![msg];
    for (i, chunk) in pfns[first..].chunks(GPADL_BODY_MAX_PFNS).enumerate() {
        let body = GpadlBody {
            header: MessageHeader::new(msgtype::GPADL_BODY),
            message_number: (i as u32 + 1).into(),
            gpadl: gpadl.into(),
        };
        let mut m = body.as_bytes().to_vec();
        m.extend_from_slice(chunk.as_bytes());
        out.push(m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(msgs: &[Vec<u8>], mem: &SharedMemory) -> Result<Gpadl, GpadlError> {
        let mut b = GpadlBuilder::start(&msgs[0])?;
        for m in &msgs[1..] {
            assert_eq!(GpadlBuilder::body_id(m)?, b.id());
            b.add_body(m)?;
        }
        assert!(b.is_complete());
        b.finish(mem)
    }

    #[test]
    fn header_message_bytes() {
        let msgs = gpadl_messages(7, 0xe1e10, &[0x100, 0x101]);
        assert_eq!(msgs.len(), 1);
        assert_eq!(
            msgs[0],
            [
                8, 0, 0, 0, 0, 0, 0, 0, // GPADL_HEADER
                7, 0, 0, 0, 0x10, 0x1e, 0x0e, 0, // relid, gpadl
                24, 0, 1, 0, // range_buflen 8 + 16, one range
                0, 0x20, 0, 0, 0, 0, 0, 0, // 8192 bytes at offset 0
                0, 1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0,
            ]
        );
    }

    #[test]
    fn multi_message_gpadl_assembles() {
        let (mem, _fd) = SharedMemory::create(256 * 4096).unwrap();
        let pfns: Vec<u64> = (10..110).collect();
        let msgs = gpadl_messages(1, 5, &pfns);
        assert_eq!(msgs.len(), 1 + (100 - 26usize).div_ceil(28));
        assert!(msgs.iter().all(|m| m.len() <= 240));
        let g = build(&msgs, &mem).unwrap();
        assert_eq!(g.single_range_pages().unwrap(), pfns.as_slice());
        let s = g.slice(&mem, 4096 * 3 + 10, 8000).unwrap();
        assert_eq!(s.len(), 8000);
    }

    #[test]
    fn pages_outside_memory_are_refused() {
        let (mem, _fd) = SharedMemory::create(16 * 4096).unwrap();
        let msgs = gpadl_messages(1, 5, &[1, 2, 16]);
        assert!(matches!(build(&msgs, &mem), Err(GpadlError::Memory { .. })));
        let msgs = gpadl_messages(1, 5, &[u64::MAX]);
        assert!(matches!(build(&msgs, &mem), Err(GpadlError::Memory { .. })));
    }

    #[test]
    fn inconsistent_lengths_are_refused() {
        let (mem, _fd) = SharedMemory::create(16 * 4096).unwrap();
        let mut m = gpadl_messages(1, 5, &[1, 2]).remove(0);
        // byte_count claims 3 pages, only two pfns follow.
        m[20..24].copy_from_slice(&(3 * 4096u32).to_le_bytes());
        assert!(matches!(
            build(&[m], &mem),
            Err(GpadlError::Malformed { .. })
        ));
        let mut m = gpadl_messages(1, 5, &[1, 2]).remove(0);
        m[18] = 0; // zero ranges
        assert!(matches!(
            GpadlBuilder::start(&m),
            Err(GpadlError::Malformed { .. })
        ));
        assert!(matches!(
            GpadlBuilder::start(&m[..10]),
            Err(GpadlError::Short(10))
        ));
    }

    #[test]
    fn discontiguous_section_is_not_sliced() {
        let (mem, _fd) = SharedMemory::create(16 * 4096).unwrap();
        let g = build(&gpadl_messages(1, 5, &[1, 2, 9]), &mem).unwrap();
        assert!(g.slice(&mem, 4000, 200).is_some());
        assert!(g.slice(&mem, 8000, 400).is_none());
        assert!(g.slice(&mem, 3 * 4096, 1).is_none());
    }
}
