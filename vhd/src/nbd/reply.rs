//! The client's decoder of transmission replies: simple replies and
//! structured reply chunks, interleaved in any order. It reads exactly the
//! bytes of each header and fixed payload from the socket, and hands READ
//! data to the [`Table`] to receive straight into the request's memory, so
//! data is never staged. Everything the server says is checked against the
//! request it answers (cookie in flight, chunk type valid for the command,
//! offsets and lengths inside the request, no overlapping content, the
//! whole range covered on success); a violation is a [`DecodeError`] and
//! the connection is dropped, never a panic.

use super::wire::{
    self, BlockDescriptor, ChunkHeader, ErrorPayload, HolePayload, SimpleReply, chunk, cmd,
    reply_flag,
};
use std::io;
use zerocopy::FromBytes;

/// Largest error chunk payload: error, length, a 4 KiB message, an offset.
const MAX_ERROR_PAYLOAD: u32 = 6 + wire::MAX_STRING as u32 + 8;
/// Largest BLOCK_STATUS chunk the spec lets a server send (2^20 extents).
const MAX_STATUS_PAYLOAD: u32 = 4 + 8 * (1 << 20);
/// Block status bytes decoded per batch (a whole number of descriptors).
const STATUS_BATCH: usize = 4096;

/// Where replies come from: one non-blocking receive at a time.
pub trait Source {
    /// Receives into `iov`; `WouldBlock` when nothing is there now, 0 at
    /// the end of the stream.
    ///
    /// # Safety
    /// Every iovec must describe memory writable for its length that
    /// nothing else accesses during the call.
    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;
}

/// What the decoder needs to know of a request in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub command: u16,
    pub offset: u64,
    pub length: u32,
}

/// The requests in flight, as the decoder sees them. Byte positions are
/// relative to the request's offset.
pub trait Table {
    /// The request in flight under `cookie`.
    fn expect(&self, cookie: u64) -> Option<Expect>;
    /// Records a content chunk over `[at, at + len)`; refuses one that
    /// overlaps an earlier chunk of the same reply.
    fn content(&mut self, cookie: u64, at: u64, len: u64) -> Result<(), String>;
    /// Receives READ data for `[at, at + len)` from `src`; returns how many
    /// bytes arrived (the source's errors, `WouldBlock` included, pass up).
    fn receive(
        &mut self,
        cookie: u64,
        src: &mut dyn Source,
        at: u64,
        len: u64,
    ) -> io::Result<usize>;
    /// `[at, at + len)` reads as zeros.
    fn zero(&mut self, cookie: u64, at: u64, len: u64);
    /// Extents of one BLOCK_STATUS chunk for metadata context `context`.
    fn extents(&mut self, cookie: u64, context: u32, descriptors: &[BlockDescriptor]);
    /// The request failed with NBD error `error`.
    fn fail(&mut self, cookie: u64, error: u32, message: &str);
    /// The reply is complete; an error if it left the request unanswered
    /// (a successful READ whose chunks do not cover it).
    fn done(&mut self, cookie: u64) -> Result<(), String>;
}

/// Why decoding stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("NBD protocol violation by the server: {0}")]
    Protocol(String),
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    #[error("the server closed the connection")]
    Closed,
}

fn protocol(why: impl Into<String>) -> DecodeError {
    DecodeError::Protocol(why.into())
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// Between replies, or inside a header (`Decoder::have` bytes read).
    Header,
    /// READ data going into the request.
    Data {
        cookie: u64,
        at: u64,
        left: u64,
        finish: bool,
    },
    /// A fixed or short payload going into `Decoder::small` (for
    /// OFFSET_DATA, the offset before the data of a `chunk_len` chunk).
    Small {
        cookie: u64,
        flags: u16,
        kind: u16,
        len: usize,
        chunk_len: u32,
    },
    /// A BLOCK_STATUS payload, decoded in batches.
    Status {
        cookie: u64,
        flags: u16,
        left: u32,
        context: Option<u32>,
    },
}

/// Decodes one connection's replies.
#[derive(Debug)]
pub struct Decoder {
    structured: bool,
    head: [u8; size_of::<ChunkHeader>()],
    have: usize,
    state: State,
    small: Vec<u8>,
    filled: usize,
}

impl Decoder {
    /// A decoder for a connection that did (or did not) negotiate
    /// structured replies.
    pub fn new(structured: bool) -> Decoder {
        Decoder {
            structured,
            head: [0; size_of::<ChunkHeader>()],
            have: 0,
            state: State::Header,
            small: Vec::new(),
            filled: 0,
        }
    }

    /// True between replies.
    pub fn idle(&self) -> bool {
        matches!(self.state, State::Header) && self.have == 0
    }

    /// Decodes replies until the source has nothing more for now (Ok with
    /// the bytes consumed) or something is wrong.
    pub fn run(
        &mut self,
        src: &mut dyn Source,
        table: &mut dyn Table,
    ) -> Result<usize, DecodeError> {
        let mut consumed = 0;
        loop {
            match self.step(src, table) {
                Ok(0) => return Err(DecodeError::Closed),
                Ok(n) => consumed += n,
                Err(DecodeError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(consumed);
                }
                Err(DecodeError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// One receive and what it completes; the bytes received.
    fn step(&mut self, src: &mut dyn Source, table: &mut dyn Table) -> Result<usize, DecodeError> {
        match self.state {
            State::Header => self.read_header(src, table),
            State::Data {
                cookie,
                at,
                left,
                finish,
            } => {
                let n = table.receive(cookie, src, at, left)? as u64;
                if n == 0 {
                    return Ok(0);
                }
                let n = n.min(left);
                if n == left {
                    self.state = State::Header;
                    if finish {
                        table.done(cookie).map_err(protocol)?;
                    }
                } else {
                    self.state = State::Data {
                        cookie,
                        at: at + n,
                        left: left - n,
                        finish,
                    };
                }
                Ok(n as usize)
            }
            State::Small {
                cookie,
                flags,
                kind,
                len,
                chunk_len,
            } => {
                let n = self.fill(src, len)?;
                if n > 0 && self.filled == len {
                    self.state = State::Header;
                    self.small_payload(table, cookie, flags, kind, chunk_len)?;
                    self.finish_chunk(table, cookie, flags)?;
                }
                Ok(n)
            }
            State::Status {
                cookie,
                flags,
                left,
                context,
            } => self.read_status(src, table, cookie, flags, left, context),
        }
    }

    /// Receives into `small` until it holds `len` bytes.
    fn fill(&mut self, src: &mut dyn Source, len: usize) -> Result<usize, DecodeError> {
        if self.small.len() < len {
            self.small.resize(len, 0);
        }
        let iov = [libc::iovec {
            iov_base: self.small[self.filled..].as_mut_ptr().cast(),
            iov_len: len - self.filled,
        }];
        // SAFETY: the iovec covers the unfilled part of `small`, owned here.
        let n = unsafe { src.recv(&iov)? };
        self.filled += n;
        Ok(n)
    }

    fn read_header(
        &mut self,
        src: &mut dyn Source,
        table: &mut dyn Table,
    ) -> Result<usize, DecodeError> {
        // A simple reply is 16 bytes, a chunk header 20: read 16, then the
        // magic says whether 4 more belong to this header.
        let need = if self.have >= 4 && self.magic() == wire::STRUCTURED_REPLY_MAGIC {
            size_of::<ChunkHeader>()
        } else {
            size_of::<SimpleReply>()
        };
        let iov = [libc::iovec {
            iov_base: self.head[self.have..need].as_mut_ptr().cast(),
            iov_len: need - self.have,
        }];
        // SAFETY: the iovec covers the unread part of `head`, owned here.
        let n = unsafe { src.recv(&iov)? };
        if n == 0 {
            return Ok(0);
        }
        self.have += n;
        if self.have < 4 {
            return Ok(n);
        }
        match self.magic() {
            wire::SIMPLE_REPLY_MAGIC if self.have == size_of::<SimpleReply>() => {
                self.have = 0;
                self.simple_reply(table)?;
            }
            wire::STRUCTURED_REPLY_MAGIC if self.have == size_of::<ChunkHeader>() => {
                self.have = 0;
                self.chunk_header(table)?;
            }
            wire::SIMPLE_REPLY_MAGIC | wire::STRUCTURED_REPLY_MAGIC => {}
            other => return Err(protocol(format!("bad reply magic {other:#010x}"))),
        }
        Ok(n)
    }

    fn magic(&self) -> u32 {
        u32::from_be_bytes([self.head[0], self.head[1], self.head[2], self.head[3]])
    }

    fn in_flight(table: &dyn Table, cookie: u64) -> Result<Expect, DecodeError> {
        table.expect(cookie).ok_or_else(|| {
            protocol(format!(
                "reply with cookie {cookie:#x}, which is not in flight"
            ))
        })
    }

    fn simple_reply(&mut self, table: &mut dyn Table) -> Result<(), DecodeError> {
        let r = SimpleReply::read_from_bytes(&self.head[..size_of::<SimpleReply>()])
            .map_err(|_| protocol("short simple reply"))?;
        let cookie = r.cookie.get();
        let e = Self::in_flight(table, cookie)?;
        if self.structured && e.command == cmd::READ {
            return Err(protocol(
                "simple reply to a READ after structured replies were negotiated",
            ));
        }
        let error = r.error.get();
        if error != 0 {
            table.fail(cookie, error, "");
            return table.done(cookie).map_err(protocol);
        }
        match e.command {
            cmd::READ if e.length > 0 => {
                table
                    .content(cookie, 0, u64::from(e.length))
                    .map_err(protocol)?;
                self.state = State::Data {
                    cookie,
                    at: 0,
                    left: u64::from(e.length),
                    finish: true,
                };
                Ok(())
            }
            cmd::BLOCK_STATUS => Err(protocol("simple success reply to BLOCK_STATUS")),
            _ => table.done(cookie).map_err(protocol),
        }
    }

    fn chunk_header(&mut self, table: &mut dyn Table) -> Result<(), DecodeError> {
        let h =
            ChunkHeader::read_from_bytes(&self.head[..]).map_err(|_| protocol("short chunk"))?;
        if !self.structured {
            return Err(protocol(
                "structured reply without negotiating structured replies",
            ));
        }
        let (cookie, flags, kind, len) = (
            h.cookie.get(),
            h.flags.get(),
            h.chunk_type.get(),
            h.length.get(),
        );
        let e = Self::in_flight(table, cookie)?;
        let wrong_command = |want: u16| {
            (e.command != want).then(|| {
                protocol(format!(
                    "chunk type {kind} in the reply to {}",
                    cmd::name(e.command)
                ))
            })
        };
        match kind {
            chunk::NONE => {
                if len != 0 || flags & reply_flag::DONE == 0 {
                    return Err(protocol("NONE chunk with a payload or without DONE"));
                }
                table.done(cookie).map_err(protocol)
            }
            chunk::OFFSET_DATA => {
                if let Some(err) = wrong_command(cmd::READ) {
                    return Err(err);
                }
                if len < 9 || u64::from(len - 8) > u64::from(e.length) {
                    return Err(protocol(format!(
                        "OFFSET_DATA chunk of {len} bytes for a {}-byte read",
                        e.length
                    )));
                }
                self.start_small(cookie, flags, kind, 8, len);
                Ok(())
            }
            chunk::OFFSET_HOLE => {
                if let Some(err) = wrong_command(cmd::READ) {
                    return Err(err);
                }
                if len as usize != size_of::<HolePayload>() {
                    return Err(protocol(format!("OFFSET_HOLE chunk of {len} bytes")));
                }
                self.start_small(cookie, flags, kind, len as usize, len);
                Ok(())
            }
            chunk::BLOCK_STATUS => {
                if let Some(err) = wrong_command(cmd::BLOCK_STATUS) {
                    return Err(err);
                }
                if len < 12 || (len - 4) % 8 != 0 || len > MAX_STATUS_PAYLOAD {
                    return Err(protocol(format!("BLOCK_STATUS chunk of {len} bytes")));
                }
                self.filled = 0;
                self.state = State::Status {
                    cookie,
                    flags,
                    left: len,
                    context: None,
                };
                Ok(())
            }
            k if k & chunk::ERROR_BIT != 0 => {
                let min = if k == chunk::ERROR_OFFSET { 14 } else { 6 };
                if len < min || len > MAX_ERROR_PAYLOAD {
                    return Err(protocol(format!("error chunk of {len} bytes")));
                }
                self.start_small(cookie, flags, kind, len as usize, len);
                Ok(())
            }
            other => Err(protocol(format!("unknown chunk type {other}"))),
        }
    }

    fn start_small(&mut self, cookie: u64, flags: u16, kind: u16, len: usize, chunk_len: u32) {
        self.filled = 0;
        self.state = State::Small {
            cookie,
            flags,
            kind,
            len,
            chunk_len,
        };
    }

    /// A complete fixed payload (`small[..filled]`).
    fn small_payload(
        &mut self,
        table: &mut dyn Table,
        cookie: u64,
        flags: u16,
        kind: u16,
        chunk_len: u32,
    ) -> Result<(), DecodeError> {
        let e = Self::in_flight(table, cookie)?;
        let payload = &self.small[..self.filled];
        match kind {
            chunk::OFFSET_DATA => {
                let offset = u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"));
                let len = u64::from(chunk_len - 8);
                let at = inside(&e, offset, len)?;
                table.content(cookie, at, len).map_err(protocol)?;
                self.state = State::Data {
                    cookie,
                    at,
                    left: len,
                    finish: flags & reply_flag::DONE != 0,
                };
                Ok(())
            }
            chunk::OFFSET_HOLE => {
                let hole = HolePayload::read_from_bytes(payload).map_err(|_| protocol("hole"))?;
                let len = u64::from(hole.size.get());
                if len == 0 {
                    return Err(protocol("OFFSET_HOLE of size 0"));
                }
                let at = inside(&e, hole.offset.get(), len)?;
                table.content(cookie, at, len).map_err(protocol)?;
                table.zero(cookie, at, len);
                Ok(())
            }
            _ => {
                let (head, rest) = payload.split_at(size_of::<ErrorPayload>());
                let err = ErrorPayload::read_from_bytes(head).map_err(|_| protocol("error"))?;
                let tail = if kind == chunk::ERROR_OFFSET { 8 } else { 0 };
                let msg_len = usize::from(err.message_length.get());
                if msg_len + tail > rest.len() {
                    return Err(protocol("error message overruns its chunk"));
                }
                let error = err.error.get();
                if error == 0 {
                    return Err(protocol("error chunk with error value 0"));
                }
                let message = String::from_utf8_lossy(&rest[..msg_len]);
                table.fail(cookie, error, &message);
                Ok(())
            }
        }
    }

    fn read_status(
        &mut self,
        src: &mut dyn Source,
        table: &mut dyn Table,
        cookie: u64,
        flags: u16,
        left: u32,
        context: Option<u32>,
    ) -> Result<usize, DecodeError> {
        let batch = if context.is_none() {
            4
        } else {
            (left as usize).min(STATUS_BATCH)
        };
        let n = self.fill(src, batch)?;
        if n == 0 || self.filled < batch {
            return Ok(n);
        }
        self.filled = 0;
        let left = left - batch as u32;
        let context = match context {
            None => u32::from_be_bytes(self.small[..4].try_into().expect("4 bytes")),
            Some(id) => {
                let descriptors = <[BlockDescriptor]>::ref_from_bytes(&self.small[..batch])
                    .map_err(|_| protocol("block status descriptors"))?;
                if descriptors.iter().any(|d| d.length.get() == 0) {
                    return Err(protocol("block status extent of length 0"));
                }
                table.extents(cookie, id, descriptors);
                id
            }
        };
        if left == 0 {
            self.state = State::Header;
            self.finish_chunk(table, cookie, flags)?;
        } else {
            self.state = State::Status {
                cookie,
                flags,
                left,
                context: Some(context),
            };
        }
        Ok(n)
    }

    fn finish_chunk(
        &mut self,
        table: &mut dyn Table,
        cookie: u64,
        flags: u16,
    ) -> Result<(), DecodeError> {
        if flags & reply_flag::DONE != 0 && matches!(self.state, State::Header) {
            table.done(cookie).map_err(protocol)?;
        }
        Ok(())
    }
}

/// Position of `[offset, offset + len)` inside request `e`.
fn inside(e: &Expect, offset: u64, len: u64) -> Result<u64, DecodeError> {
    let end = offset.checked_add(len);
    let req_end = e.offset + u64::from(e.length);
    if offset < e.offset || end.is_none_or(|end| end > req_end) {
        return Err(protocol(format!(
            "chunk [{offset}, +{len}) outside the request [{}, +{})",
            e.offset, e.length
        )));
    }
    Ok(offset - e.offset)
}

/// The content chunks of one READ reply: refuses overlaps, and tells
/// whether they cover the whole request.
#[derive(Debug, Default)]
pub struct Coverage {
    /// Disjoint `[start, end)` ranges received so far.
    ranges: Vec<(u64, u64)>,
    covered: u64,
}

/// Content chunks accepted in one reply (more is a denial of service).
const MAX_CHUNKS: usize = 4096;

impl Coverage {
    pub fn clear(&mut self) {
        self.ranges.clear();
        self.covered = 0;
    }

    /// Adds `[at, at + len)`; an error if it overlaps an earlier chunk.
    pub fn add(&mut self, at: u64, len: u64) -> Result<(), String> {
        let end = at + len;
        if self.ranges.iter().any(|&(s, e)| at < e && s < end) {
            return Err(format!("chunk [{at}, +{len}) overlaps an earlier one"));
        }
        if self.ranges.len() >= MAX_CHUNKS {
            return Err("too many chunks in one reply".into());
        }
        self.ranges.push((at, end));
        self.covered += len;
        Ok(())
    }

    /// True when the chunks cover `length` bytes (they never overlap).
    pub fn complete(&self, length: u32) -> bool {
        self.covered == u64::from(length)
    }
}
