//! The transmission phase of one connection: one thread, one [`IoQueue`],
//! everything in one ring. Each loop iteration parses the requests already
//! received, submits their block I/O, queues a RECV for more requests and a
//! SENDMSG of every reply ready, and sleeps in one `io_uring_enter` until
//! any of it completes.
//!
//! Data is never copied: WRITE payloads go to the device from where they
//! were received (the [`RxArena`]), READ data is read into a page-aligned
//! buffer and sent from there, after its reply header, by the same
//! `sendmsg` that carries the other ready replies. Memory is bounded per
//! connection (requests in flight, buffer budget): when it is used up the
//! server stops reading until replies have gone out.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types};
use vhd::nbd::Stream;
use vhd::nbd::stream::skip_front;
use vhd::nbd::wire::{
    BlockDescriptor, ChunkHeader, DataChunkHeader, ErrorPayload, RequestHeader, SimpleReply, chunk,
    cmd, errno, reply_flag, state,
};
use vhd::{Allocation, BlockDevice, BlockError, Completion, IoQueue, Op, QueueConfig, Request};
use zerocopy::{FromBytes, IntoBytes};

use super::buffers::{BufPool, Memory, PageBuf, RX_CHUNK, RxArena, zeros};
use super::handshake::{ALLOCATION_CONTEXT, Session};
use super::request::{Action, Limits, Verdict, check};

/// Requests one connection has in flight at most.
const MAX_REQUESTS: u32 = 128;
/// Buffer memory one connection may hold.
const MEMORY_LIMIT: usize = 80 << 20;
/// Bytes per block request of WRITE_ZEROES-by-writing and CACHE.
const PIECE: u64 = RX_CHUNK as u64;
/// Extents in one BLOCK_STATUS reply at most.
const MAX_EXTENTS: usize = 16 * 1024;
/// iovecs per SENDMSG.
const MAX_SEND_IOV: usize = 512;
const HEADER: usize = size_of::<RequestHeader>();
const RECV_TAG: u64 = 1;
const SEND_TAG: u64 = 2;

/// Where a request is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Free,
    /// Its block I/O runs.
    Io,
    /// The flush that makes a FUA request durable runs.
    Flush,
    /// Replied to (waiting to be sent).
    Done,
}

/// One request in flight.
#[derive(Debug, Default)]
struct Req {
    cookie: u64,
    command: u16,
    offset: u64,
    length: u32,
    fua: bool,
    phase: Phase,
    /// Block requests outstanding.
    pending: u32,
    /// NBD error of the reply (0: success).
    error: u32,
    head: [u8; 32],
    head_len: usize,
    /// READ data.
    data: Option<PageBuf>,
    /// Receive chunk holding the WRITE payload.
    pinned: Option<usize>,
    /// WRITE_ZEROES-by-writing or CACHE, done piece by piece.
    next: u64,
    end: u64,
    zeroing: bool,
    /// BLOCK_STATUS descriptors.
    extents: Vec<u8>,
}

/// The SENDMSG in flight and what it carries.
struct Sender {
    iov: Vec<libc::iovec>,
    msg: Box<libc::msghdr>,
    reqs: Vec<u32>,
    busy: bool,
}

struct Conn<'a> {
    fd: RawFd,
    stream: &'a Stream,
    device: &'a dyn BlockDevice,
    bs: u64,
    limits: Limits,
    queue: IoQueue,
    reqs: Vec<Req>,
    free: Vec<u32>,
    mem: Memory,
    rx: RxArena,
    pool: BufPool,
    scratch: Option<PageBuf>,
    ready: VecDeque<u32>,
    send: Sender,
    recv_busy: bool,
    /// No more requests are read (client closed, DISC, fatal error).
    eof: bool,
    /// The socket cannot carry replies any more.
    broken: bool,
    /// WRITE payload bytes still to discard (refused requests).
    skip: u64,
    events: Vec<Completion>,
    runs: Vec<(u64, u32)>,
    /// Why the connection ended abnormally.
    failure: Option<String>,
}

/// Serves requests on `stream` until the client disconnects; an error
/// says why it ended abnormally.
pub(crate) fn serve(stream: &Stream, session: &Session) -> Result<(), String> {
    let device = &*session.export.device;
    let info = device.info();
    let limits = Limits {
        size: session.export.size(),
        block: info.block_size,
        read_only: session.export.read_only,
        structured: session.structured,
        allocation: session.allocation,
        trim: session.export.can_trim(),
    };
    let queue = IoQueue::with_config(QueueConfig {
        slots: MAX_REQUESTS + 8,
        ring_entries: 256,
        socket_io: true,
        ..QueueConfig::default()
    })
    .map_err(|e| format!("io_uring: {e}"))?;
    let mut mem = Memory {
        used: 0,
        limit: MEMORY_LIMIT,
    };
    let rx = RxArena::new(&mut mem);
    // SAFETY: an all-zero msghdr is valid (no name, no control data).
    let msg: libc::msghdr = unsafe { std::mem::zeroed() };
    let mut conn = Conn {
        fd: stream.as_raw_fd(),
        stream,
        device,
        bs: u64::from(info.block_size),
        limits,
        queue,
        reqs: (0..MAX_REQUESTS).map(|_| Req::default()).collect(),
        free: (0..MAX_REQUESTS).rev().collect(),
        mem,
        rx,
        pool: BufPool::default(),
        scratch: None,
        ready: VecDeque::with_capacity(MAX_REQUESTS as usize),
        send: Sender {
            iov: Vec::with_capacity(MAX_SEND_IOV),
            msg: Box::new(msg),
            reqs: Vec::with_capacity(MAX_REQUESTS as usize),
            busy: false,
        },
        recv_busy: false,
        eof: false,
        broken: false,
        skip: 0,
        events: Vec::with_capacity(2 * MAX_REQUESTS as usize),
        runs: Vec::new(),
        failure: None,
    };
    conn.run();
    match conn.failure {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// The NBD error for a failed block request.
fn nbd_error(err: &BlockError, writes: bool) -> u32 {
    match err {
        BlockError::OutOfRange { .. } if writes => errno::ENOSPC,
        BlockError::ReadOnly => errno::EPERM,
        BlockError::TooLarge(_) => errno::EOVERFLOW,
        BlockError::Os(e) => errno::from_host(*e),
        BlockError::OutOfRange { .. }
        | BlockError::LengthMismatch { .. }
        | BlockError::DiscardUnsupported => errno::EINVAL,
        _ => errno::EIO,
    }
}

impl Conn<'_> {
    fn run(&mut self) {
        loop {
            self.parse();
            self.post_recv();
            self.post_send();
            if self.finished() {
                return;
            }
            if let Err(e) = self.queue.submit_and_wait() {
                // The ring itself failed: stop using the socket, and keep
                // waiting so no buffer is freed under the kernel.
                self.fail(format!("io_uring: {e}"));
                self.broken = true;
                self.stream.shutdown(std::net::Shutdown::Both);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let mut events = std::mem::take(&mut self.events);
            self.queue.reap(|c| events.push(c));
            for event in events.drain(..) {
                match event {
                    Completion::Request { tag, result } => self.completed(tag as u32, result),
                    Completion::User { tag, result, .. } if tag == RECV_TAG => {
                        self.received(result)
                    }
                    Completion::User { result, .. } => self.sent(result),
                }
            }
            self.events = events;
        }
    }

    /// Nothing left to read, run or send.
    fn finished(&self) -> bool {
        self.eof
            && !self.recv_busy
            && !self.send.busy
            && (self.ready.is_empty() || self.broken)
            && self.queue.in_flight() == 0
    }

    fn fail(&mut self, why: String) {
        self.failure.get_or_insert(why);
        self.stop_reading();
    }

    /// No more requests: a pending RECV ends (with 0) once the read side
    /// is shut.
    fn stop_reading(&mut self) {
        self.eof = true;
        if self.recv_busy {
            self.stream.shutdown(std::net::Shutdown::Read);
        }
    }

    // ---- requests ----

    /// Turns received bytes into running requests while slots and memory
    /// last.
    fn parse(&mut self) {
        while !self.eof {
            if self.skip > 0 {
                let n = self.rx.available().len().min(self.skip as usize);
                if n == 0 {
                    return;
                }
                self.rx.consume(n);
                self.skip -= n as u64;
                continue;
            }
            let avail = self.rx.available();
            if avail.len() < HEADER {
                if !self.recv_busy {
                    self.rx.make_room(HEADER, &mut self.mem);
                }
                return;
            }
            let header = RequestHeader::read_from_bytes(&avail[..HEADER]).expect("28 bytes");
            let have = avail.len();
            match check(&header, &self.limits) {
                Verdict::Drop { errno, why } => {
                    if let Some(e) = errno
                        && let Some(slot) = self.take_slot(&header)
                    {
                        self.finish(slot, e);
                    }
                    self.fail(format!("{why}; disconnecting"));
                    return;
                }
                Verdict::Run(Action::Disconnect) => {
                    self.rx.consume(HEADER);
                    self.stop_reading();
                    return;
                }
                Verdict::Refuse { errno, payload } => {
                    let Some(slot) = self.take_slot(&header) else {
                        return;
                    };
                    self.rx.consume(HEADER);
                    self.skip = u64::from(payload);
                    self.finish(slot, errno);
                }
                Verdict::Run(action) => {
                    let payload = match action {
                        Action::Write { length, .. } => length as usize,
                        _ => 0,
                    };
                    if have < HEADER + payload {
                        if !self.recv_busy {
                            self.rx.make_room(HEADER + payload, &mut self.mem);
                        }
                        return;
                    }
                    let Some(slot) = self.take_slot(&header) else {
                        return;
                    };
                    if let Action::Read { length, .. } = action
                        && length > 0
                    {
                        match self.pool.take(length as usize, &mut self.mem) {
                            Some(buf) => self.reqs[slot as usize].data = Some(buf),
                            None => {
                                self.put_slot(slot);
                                return;
                            }
                        }
                    }
                    self.rx.consume(HEADER);
                    self.start(slot, action);
                }
            }
        }
    }

    /// A free request slot set up for `header`, if any is left.
    fn take_slot(&mut self, header: &RequestHeader) -> Option<u32> {
        let slot = self.free.pop()?;
        let req = &mut self.reqs[slot as usize];
        req.cookie = header.cookie.get();
        req.command = header.command.get();
        req.offset = header.offset.get();
        req.length = header.length.get();
        req.fua = false;
        req.phase = Phase::Io;
        req.pending = 0;
        req.error = 0;
        Some(slot)
    }

    fn put_slot(&mut self, slot: u32) {
        self.reqs[slot as usize].phase = Phase::Free;
        self.free.push(slot);
    }

    fn start(&mut self, slot: u32, action: Action) {
        match action {
            Action::Read { offset, length } if length > 0 => {
                let iov = self.reqs[slot as usize]
                    .data
                    .as_mut()
                    .expect("buffer taken in parse")
                    .iovec(length as usize);
                self.issue(slot, Op::Read, offset, u64::from(length), Some(iov));
            }
            Action::Write {
                offset,
                length,
                fua,
            } if length > 0 => {
                let (chunk, iov) = self.rx.pin(length as usize);
                self.rx.consume(length as usize);
                let req = &mut self.reqs[slot as usize];
                req.pinned = Some(chunk);
                req.fua = fua;
                self.issue(slot, Op::Write, offset, u64::from(length), Some(iov));
            }
            Action::Flush => self.issue(slot, Op::Flush, 0, 0, None),
            Action::Trim {
                offset,
                length,
                fua,
            } if length > 0 => {
                self.reqs[slot as usize].fua = fua;
                self.issue(slot, Op::Discard, offset, u64::from(length), None);
            }
            Action::WriteZeroes {
                offset,
                length,
                fua,
                no_hole,
                fast,
            } if length > 0 => {
                self.reqs[slot as usize].fua = fua;
                let info = self.device.info();
                if !no_hole && info.supports_discard && self.device.discard_zeroes() {
                    self.issue(slot, Op::Discard, offset, u64::from(length), None);
                } else if fast {
                    self.finish(slot, errno::ENOTSUP);
                } else {
                    self.pieces(slot, offset, length, true);
                }
            }
            Action::Cache { offset, length } if length > 0 => {
                self.pieces(slot, offset, length, false)
            }
            Action::BlockStatus {
                offset,
                length,
                req_one,
            } => self.block_status(slot, offset, length, req_one),
            // Zero-length requests: nothing to do.
            _ => self.finish(slot, 0),
        }
    }

    /// Submits one block request for `slot`; a refusal finishes it (unless
    /// other parts of it are still running).
    fn issue(&mut self, slot: u32, op: Op, offset: u64, length: u64, iov: Option<libc::iovec>) {
        let iovs: &[libc::iovec] = match &iov {
            Some(v) => std::slice::from_ref(v),
            None => &[],
        };
        let request = match op {
            Op::Flush => Request::flush(u64::from(slot)),
            Op::Discard => {
                Request::discard(offset / self.bs, (length / self.bs) as u32, u64::from(slot))
            }
            // SAFETY: the iovec names this request's own buffer (a pool
            // buffer, a pinned receive chunk, the shared zero buffer or the
            // CACHE scratch buffer), none of which is released or reused
            // before this request's completion has been reaped: buffers go
            // back only in `release`, after the reply was sent, and the
            // reply is built after the last completion.
            _ => unsafe {
                Request::new(
                    op,
                    offset / self.bs,
                    (length / self.bs) as u32,
                    iovs,
                    u64::from(slot),
                )
            },
        };
        match self.device.submit(&mut self.queue, request) {
            Ok(()) => self.reqs[slot as usize].pending += 1,
            Err(e) => {
                let writes = matches!(op, Op::Write | Op::Discard);
                let req = &mut self.reqs[slot as usize];
                if req.error == 0 {
                    req.error = nbd_error(&e, writes);
                }
                if req.pending == 0 {
                    let error = req.error;
                    self.finish(slot, error);
                }
            }
        }
    }

    /// Runs a long WRITE_ZEROES (`zeroing`) or CACHE piece by piece.
    fn pieces(&mut self, slot: u32, offset: u64, length: u32, zeroing: bool) {
        let req = &mut self.reqs[slot as usize];
        req.next = offset;
        req.end = offset + u64::from(length);
        req.zeroing = zeroing;
        self.next_piece(slot);
    }

    fn next_piece(&mut self, slot: u32) {
        let req = &mut self.reqs[slot as usize];
        let at = req.next;
        let len = (req.end - at).min(PIECE);
        req.next += len;
        if req.zeroing {
            let iov = zeros().read_only_iovec(len as usize);
            self.issue(slot, Op::Write, at, len, Some(iov));
        } else {
            let scratch = self
                .scratch
                .get_or_insert_with(|| PageBuf::new(PIECE as usize));
            let iov = scratch.iovec(len as usize);
            self.issue(slot, Op::Read, at, len, Some(iov));
        }
    }

    /// A block request of `slot` completed.
    fn completed(&mut self, slot: u32, result: Result<u32, BlockError>) {
        let Some(req) = self.reqs.get_mut(slot as usize) else {
            return;
        };
        req.pending = req.pending.saturating_sub(1);
        if let Err(e) = &result
            && req.error == 0
        {
            let writes = matches!(req.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
            req.error = nbd_error(e, writes);
        }
        if req.pending > 0 {
            return;
        }
        let (error, phase) = (req.error, req.phase);
        let more = req.next < req.end;
        let durable = req.fua && matches!(req.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if error == 0 && phase == Phase::Io && more {
            self.next_piece(slot);
        } else if error == 0 && phase == Phase::Io && durable {
            // FUA: the reply waits until the data is durable.
            req.phase = Phase::Flush;
            self.issue(slot, Op::Flush, 0, 0, None);
        } else {
            self.finish(slot, error);
        }
    }

    /// `base:allocation` extents from the device's allocation.
    fn block_status(&mut self, slot: u32, offset: u64, length: u32, req_one: bool) {
        let bs = self.bs;
        let (mut at, end) = (offset / bs, (offset + u64::from(length)) / bs);
        let max_bytes = u64::from(u32::MAX) / bs * bs;
        let mut runs = std::mem::take(&mut self.runs);
        runs.clear();
        while at < end && runs.len() < MAX_EXTENTS {
            let (kind, n) = match self.device.allocation(at, end - at) {
                Ok(found) => found,
                Err(e) => {
                    self.runs = runs;
                    return self.finish(slot, nbd_error(&e, false));
                }
            };
            let flags = match kind {
                Allocation::Data => 0,
                Allocation::Zero => state::ZERO,
                Allocation::Hole => state::HOLE | state::ZERO,
            };
            let mut bytes = n.max(1) * bs;
            at += n.max(1);
            while bytes > 0 {
                match runs.last_mut() {
                    Some((len, f)) if *f == flags && *len < max_bytes => {
                        let add = bytes.min(max_bytes - *len);
                        *len += add;
                        bytes -= add;
                    }
                    _ => {
                        let add = bytes.min(max_bytes);
                        runs.push((add, flags));
                        bytes -= add;
                    }
                }
            }
            if req_one {
                runs.truncate(1);
                break;
            }
        }
        let extents = &mut self.reqs[slot as usize].extents;
        extents.clear();
        for &(len, flags) in runs.iter().take(MAX_EXTENTS) {
            let d = BlockDescriptor {
                length: (len as u32).into(),
                flags: flags.into(),
            };
            extents.extend_from_slice(d.as_bytes());
        }
        self.runs = runs;
        self.finish(slot, 0);
    }

    /// Builds the reply of `slot` and queues it for sending.
    fn finish(&mut self, slot: u32, error: u32) {
        if self.broken {
            return self.release(slot);
        }
        let structured = self.limits.structured;
        let req = &mut self.reqs[slot as usize];
        req.error = error;
        req.phase = Phase::Done;
        let cookie = req.cookie;
        let mut head = [0u8; 32];
        let len = if structured && error != 0 {
            let h = ChunkHeader::new(cookie, reply_flag::DONE, chunk::ERROR, 6);
            let e = ErrorPayload {
                error: error.into(),
                message_length: 0.into(),
            };
            head[..20].copy_from_slice(h.as_bytes());
            head[20..26].copy_from_slice(e.as_bytes());
            26
        } else if structured && req.command == cmd::READ && req.length > 0 {
            let h = DataChunkHeader {
                chunk: ChunkHeader::new(
                    cookie,
                    reply_flag::DONE,
                    chunk::OFFSET_DATA,
                    8 + req.length,
                ),
                offset: req.offset.into(),
            };
            head[..28].copy_from_slice(h.as_bytes());
            28
        } else if structured && req.command == cmd::READ {
            let h = ChunkHeader::new(cookie, reply_flag::DONE, chunk::NONE, 0);
            head[..20].copy_from_slice(h.as_bytes());
            20
        } else if structured && req.command == cmd::BLOCK_STATUS {
            let payload = 4 + req.extents.len() as u32;
            let h = ChunkHeader::new(cookie, reply_flag::DONE, chunk::BLOCK_STATUS, payload);
            head[..20].copy_from_slice(h.as_bytes());
            head[20..24].copy_from_slice(&ALLOCATION_CONTEXT.to_be_bytes());
            24
        } else {
            head[..16].copy_from_slice(SimpleReply::new(cookie, error).as_bytes());
            16
        };
        req.head = head;
        req.head_len = len;
        self.ready.push_back(slot);
    }

    /// Gives back what a sent (or dropped) reply held.
    fn release(&mut self, slot: u32) {
        let req = &mut self.reqs[slot as usize];
        if let Some(buf) = req.data.take() {
            self.pool.give(buf, &mut self.mem);
        }
        if let Some(chunk) = req.pinned.take() {
            self.rx.unpin(chunk, &mut self.mem);
        }
        req.extents.clear();
        req.next = 0;
        req.end = 0;
        self.put_slot(slot);
    }

    // ---- the socket ----

    fn post_recv(&mut self) {
        if self.recv_busy || self.eof || self.free.is_empty() {
            return;
        }
        let Some(space) = self.rx.recv_space(&mut self.mem) else {
            return;
        };
        let entry = opcode::Recv::new(
            types::Fd(self.fd),
            space.iov_base.cast(),
            space.iov_len as u32,
        )
        .build();
        // SAFETY: the receive space belongs to the arena's current chunk,
        // which is neither moved nor freed while a RECV is in flight (the
        // arena is only rearranged with `recv_busy` false), and the loop
        // waits for the RECV's completion before the connection ends.
        if unsafe { self.queue.push_user(entry, RECV_TAG) }.is_ok() {
            self.recv_busy = true;
        }
    }

    fn received(&mut self, result: i32) {
        self.recv_busy = false;
        match result {
            n if n > 0 => self.rx.received(n as usize),
            0 => self.eof = true,
            e if -e == libc::EINTR || -e == libc::EAGAIN => {}
            e => {
                let err = std::io::Error::from_raw_os_error(-e);
                self.fail(format!("receive failed: {err}"));
            }
        }
    }

    fn post_send(&mut self) {
        if self.send.busy || self.broken {
            return;
        }
        if self.send.iov.is_empty() {
            self.send.reqs.clear();
            while let Some(&slot) = self.ready.front() {
                if self.send.iov.len() + 2 > MAX_SEND_IOV {
                    break;
                }
                self.ready.pop_front();
                self.push_reply(slot);
            }
            if self.send.iov.is_empty() {
                return;
            }
        }
        self.send.msg.msg_iov = self.send.iov.as_mut_ptr();
        self.send.msg.msg_iovlen = self.send.iov.len();
        let entry = opcode::SendMsg::new(types::Fd(self.fd), &raw const *self.send.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build();
        // SAFETY: the msghdr (boxed), the iovec array and every buffer it
        // names (reply headers in the request table, READ buffers, extent
        // lists) stay untouched until the SENDMSG completes: the requests
        // are released only in `sent`, and the loop waits for it.
        if unsafe { self.queue.push_user(entry, SEND_TAG) }.is_ok() {
            self.send.busy = true;
        }
    }

    /// Adds the iovecs of `slot`'s reply to the send batch.
    fn push_reply(&mut self, slot: u32) {
        let req = &mut self.reqs[slot as usize];
        self.send.iov.push(libc::iovec {
            iov_base: req.head.as_mut_ptr().cast(),
            iov_len: req.head_len,
        });
        if req.error == 0 {
            if let Some(data) = req.data.as_mut().filter(|_| req.command == cmd::READ) {
                self.send.iov.push(data.iovec(req.length as usize));
            }
            if req.command == cmd::BLOCK_STATUS && self.limits.structured {
                self.send.iov.push(libc::iovec {
                    iov_base: req.extents.as_mut_ptr().cast(),
                    iov_len: req.extents.len(),
                });
            }
        }
        self.send.reqs.push(slot);
    }

    fn sent(&mut self, result: i32) {
        self.send.busy = false;
        if result < 0 {
            if -result == libc::EINTR || -result == libc::EAGAIN {
                return;
            }
            let err = std::io::Error::from_raw_os_error(-result);
            self.broken = true;
            self.fail(format!("send failed: {err}"));
            self.send.iov.clear();
            for slot in std::mem::take(&mut self.send.reqs) {
                self.release(slot);
            }
            while let Some(slot) = self.ready.pop_front() {
                self.release(slot);
            }
            return;
        }
        skip_front(&mut self.send.iov, result as usize);
        if self.send.iov.is_empty() {
            let reqs = std::mem::take(&mut self.send.reqs);
            for &slot in &reqs {
                self.release(slot);
            }
            self.send.reqs = reqs;
            self.send.reqs.clear();
        }
    }
}
