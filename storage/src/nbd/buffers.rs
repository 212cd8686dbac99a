//! Per-connection memory of the NBD server, under one budget: the receive
//! arena WRITE payloads are written from (in place), and the page-aligned
//! buffers READ data is read into and sent from. Both are reused across
//! requests, so the steady state allocates nothing.

use std::sync::OnceLock;

/// Size of an ordinary receive chunk.
pub(crate) const RX_CHUNK: usize = 1 << 20;
/// Receive space below which a chunk is not worth a RECV.
const MIN_RECV: usize = 16 * 1024;
/// Spare receive chunks kept for reuse.
const SPARE_CHUNKS: usize = 2;
const PAGE: usize = 4096;

/// Bytes of buffers a connection may hold (receive chunks, read buffers).
#[derive(Debug)]
pub(crate) struct Memory {
    pub used: usize,
    pub limit: usize,
}

impl Memory {
    fn try_take(&mut self, bytes: usize) -> bool {
        if self.used + bytes > self.limit {
            return false;
        }
        self.used += bytes;
        true
    }

    fn give(&mut self, bytes: usize) {
        self.used -= bytes;
    }
}

/// A page-aligned buffer (for O_DIRECT devices: no bounce copies).
#[derive(Debug)]
pub(crate) struct PageBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    pub(crate) fn new(len: usize) -> PageBuf {
        let raw = vec![0u8; len + PAGE - 1];
        let start = raw.as_ptr().align_offset(PAGE);
        PageBuf { raw, start, len }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The first `len` bytes as an iovec (for the kernel to fill or send).
    pub(crate) fn iovec(&mut self, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.raw[self.start..self.start + len.min(self.len)]
                .as_mut_ptr()
                .cast(),
            iov_len: len.min(self.len),
        }
    }
}

/// A shared buffer of zeros, written by WRITE_ZEROES that cannot punch.
pub(crate) fn zeros() -> &'static PageBuf {
    static ZEROS: OnceLock<PageBuf> = OnceLock::new();
    ZEROS.get_or_init(|| PageBuf::new(RX_CHUNK))
}

impl PageBuf {
    /// An iovec over the buffer for the kernel to read only (writes from
    /// the shared zero buffer).
    pub(crate) fn read_only_iovec(&self, len: usize) -> libc::iovec {
        libc::iovec {
            iov_base: self.raw[self.start..].as_ptr().cast_mut().cast(),
            iov_len: len.min(self.len),
        }
    }
}

/// Read buffers by power-of-two size class (4 KiB .. 32 MiB).
#[derive(Debug, Default)]
pub(crate) struct BufPool {
    classes: [Vec<PageBuf>; 14],
}

fn class_of(len: usize) -> usize {
    let bits = usize::BITS - len.max(PAGE).saturating_sub(1).leading_zeros();
    (bits as usize).saturating_sub(12).min(13)
}

impl BufPool {
    /// A buffer of at least `len` bytes, if the budget allows.
    pub(crate) fn take(&mut self, len: usize, mem: &mut Memory) -> Option<PageBuf> {
        let class = class_of(len);
        if let Some(buf) = self.classes[class].pop() {
            return Some(buf);
        }
        let size = PAGE << class;
        if !mem.try_take(size) {
            // Cached buffers of other sizes may be what stands in the way.
            self.shrink(mem);
            if !mem.try_take(size) {
                return None;
            }
        }
        Some(PageBuf::new(size))
    }

    pub(crate) fn give(&mut self, buf: PageBuf, mem: &mut Memory) {
        let class = class_of(buf.len());
        let keep = if class <= 4 { 256 } else { 4 };
        if self.classes[class].len() < keep {
            self.classes[class].push(buf);
        } else {
            mem.give(buf.len());
        }
    }

    fn shrink(&mut self, mem: &mut Memory) {
        for class in &mut self.classes {
            for buf in class.drain(..) {
                mem.give(buf.len());
            }
        }
    }
}

#[derive(Debug)]
struct Chunk {
    data: Vec<u8>,
    /// WRITE requests in flight whose payload lies here.
    refs: u32,
    /// In use (current, or holding payloads); otherwise spare.
    busy: bool,
}

/// Where received bytes land and WRITE payloads are written from. Bytes
/// are parsed in place; a chunk that fills up is replaced, copying over
/// only the partly received request at its end, and retired once no
/// WRITE in flight points into it.
#[derive(Debug)]
pub(crate) struct RxArena {
    chunks: Vec<Chunk>,
    cur: usize,
    pos: usize,
    filled: usize,
}

impl RxArena {
    pub(crate) fn new(mem: &mut Memory) -> RxArena {
        mem.used += RX_CHUNK;
        RxArena {
            chunks: vec![Chunk {
                data: vec![0; RX_CHUNK],
                refs: 0,
                busy: true,
            }],
            cur: 0,
            pos: 0,
            filled: 0,
        }
    }

    /// Received bytes not parsed yet.
    pub(crate) fn available(&self) -> &[u8] {
        &self.chunks[self.cur].data[self.pos..self.filled]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.filled);
    }

    /// Where the next RECV may write, after tidying up: a fully parsed
    /// chunk no WRITE points into starts over; one nearly full is
    /// replaced. Call only with no RECV in flight.
    pub(crate) fn recv_space(&mut self, mem: &mut Memory) -> Option<libc::iovec> {
        let chunk = &self.chunks[self.cur];
        if self.pos == self.filled && chunk.refs == 0 {
            self.pos = 0;
            self.filled = 0;
        }
        if self.chunks[self.cur].data.len() - self.filled < MIN_RECV {
            let need = self.filled - self.pos + MIN_RECV;
            if !self.make_room(need, mem) {
                return None;
            }
        }
        let free = &mut self.chunks[self.cur].data[self.filled..];
        Some(libc::iovec {
            iov_base: free.as_mut_ptr().cast(),
            iov_len: free.len(),
        })
    }

    pub(crate) fn received(&mut self, n: usize) {
        self.filled = (self.filled + n).min(self.chunks[self.cur].data.len());
    }

    /// Makes `need` bytes from the parse position contiguous in one chunk
    /// (moving the unparsed bytes to a new chunk when they do not fit);
    /// false when the budget does not allow it now. Call only with no
    /// RECV in flight.
    pub(crate) fn make_room(&mut self, need: usize, mem: &mut Memory) -> bool {
        if self.chunks[self.cur].data.len() - self.pos >= need {
            return true;
        }
        let size = need.max(RX_CHUNK);
        let Some(next) = self.spare(size, mem) else {
            return false;
        };
        let (old, pos, filled) = (self.cur, self.pos, self.filled);
        let (a, b) = if old < next {
            let (lo, hi) = self.chunks.split_at_mut(next);
            (&lo[old], &mut hi[0])
        } else {
            let (lo, hi) = self.chunks.split_at_mut(old);
            (&hi[0], &mut lo[next])
        };
        b.data[..filled - pos].copy_from_slice(&a.data[pos..filled]);
        self.cur = next;
        self.pos = 0;
        self.filled = filled - pos;
        self.retire(old, mem);
        true
    }

    /// A spare chunk of at least `size` bytes, or a new one.
    fn spare(&mut self, size: usize, mem: &mut Memory) -> Option<usize> {
        if let Some(i) = self
            .chunks
            .iter()
            .position(|c| !c.busy && c.data.len() >= size)
        {
            self.chunks[i].busy = true;
            return Some(i);
        }
        if !mem.try_take(size) {
            return None;
        }
        let chunk = Chunk {
            data: vec![0; size],
            refs: 0,
            busy: true,
        };
        match self
            .chunks
            .iter()
            .position(|c| !c.busy && c.data.is_empty())
        {
            Some(i) => {
                self.chunks[i] = chunk;
                Some(i)
            }
            None => {
                self.chunks.push(chunk);
                Some(self.chunks.len() - 1)
            }
        }
    }

    /// Frees chunk `i` if nothing points into it and it is not current;
    /// keeps a few ordinary ones as spares.
    fn retire(&mut self, i: usize, mem: &mut Memory) {
        if i == self.cur || self.chunks[i].refs > 0 {
            return;
        }
        let spares = self
            .chunks
            .iter()
            .filter(|c| !c.busy && !c.data.is_empty())
            .count();
        let chunk = &mut self.chunks[i];
        chunk.busy = false;
        if chunk.data.len() != RX_CHUNK || spares >= SPARE_CHUNKS {
            mem.give(chunk.data.len());
            chunk.data = Vec::new();
        }
    }

    /// Pins the current chunk for a WRITE whose payload starts at the parse
    /// position; returns the chunk and an iovec over `len` payload bytes.
    pub(crate) fn pin(&mut self, len: usize) -> (usize, libc::iovec) {
        let chunk = &mut self.chunks[self.cur];
        chunk.refs += 1;
        let payload = &mut chunk.data[self.pos..self.pos + len];
        let iov = libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: len,
        };
        (self.cur, iov)
    }

    /// A WRITE from chunk `i` finished.
    pub(crate) fn unpin(&mut self, i: usize, mem: &mut Memory) {
        if let Some(chunk) = self.chunks.get_mut(i) {
            chunk.refs = chunk.refs.saturating_sub(1);
        }
        self.retire(i, mem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arena_moves_partial_requests_and_keeps_pinned_chunks() {
        let mut mem = Memory {
            used: 0,
            limit: 8 * RX_CHUNK,
        };
        let mut rx = RxArena::new(&mut mem);
        let space = rx.recv_space(&mut mem).unwrap();
        assert_eq!(space.iov_len, RX_CHUNK);
        // A full chunk: one request parsed and pinned, 100 bytes partial.
        rx.received(RX_CHUNK);
        let (chunk, iov) = rx.pin(4096);
        assert_eq!(iov.iov_len, 4096);
        rx.consume(RX_CHUNK - 100);
        assert_eq!(rx.available().len(), 100);
        assert!(rx.make_room(4096 + 28, &mut mem));
        assert_eq!(rx.available().len(), 100);
        assert_ne!(rx.cur, chunk, "moved to a new chunk");
        assert_eq!(mem.used, 2 * RX_CHUNK);
        rx.unpin(chunk, &mut mem);
        assert_eq!(mem.used, 2 * RX_CHUNK, "kept as a spare");
        // A payload larger than a chunk gets a chunk of its own.
        assert!(rx.make_room(3 * RX_CHUNK, &mut mem));
        assert_eq!(rx.available().len(), 100);
        assert!(!rx.make_room(9 * RX_CHUNK, &mut mem), "over budget");
    }

    #[test]
    fn the_pool_reuses_buffers_within_the_budget() {
        let mut mem = Memory {
            used: 0,
            limit: 1 << 20,
        };
        let mut pool = BufPool::default();
        let mut a = pool.take(4096, &mut mem).unwrap();
        assert_eq!(a.iovec(4096).iov_base as usize % PAGE, 0);
        assert_eq!(class_of(4096), 0);
        assert_eq!(class_of(4097), 1);
        assert_eq!(class_of(1 << 25), 13);
        let big = pool.take(1 << 19, &mut mem).unwrap();
        assert!(pool.take(1 << 19, &mut mem).is_none());
        pool.give(big, &mut mem);
        pool.give(a, &mut mem);
        assert!(pool.take(1 << 19, &mut mem).is_some());
        a = pool.take(4096, &mut mem).unwrap();
        assert_eq!(a.len(), 4096);
    }
}
