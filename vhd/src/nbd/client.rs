//! [`NbdClient`]: an export of an NBD server as a [`BlockDevice`].
//!
//! # Threads and memory
//! Workers call [`BlockDevice::submit`] on their own [`IoQueue`]. A request
//! becomes one queue slot and one *record* per NBD request (a request
//! longer than the server's maximum payload is split); each record holds
//! the command, its slice of the caller's iovecs and where to post the
//! completion. Records come from a fixed table; their indices travel
//! between the workers and the connection thread through two lock-free
//! queues (free, submitted), and whoever holds an index owns its record.
//!
//! One connection thread per client owns the socket. It sends headers and
//! WRITE payloads with one `sendmsg` per batch straight from the callers'
//! memory, decodes replies with [`Decoder`] (READ data is received straight
//! into the callers' memory) and completes each request by posting a CQE
//! into the submitting worker's ring (`IORING_OP_MSG_RING`, see
//! `crate::remote`), so the worker sees an ordinary completion in the ring
//! it already sleeps on. Several requests are in flight per connection
//! (up to [`NbdOptions::max_in_flight`]).
//!
//! # When the server goes away
//! A connection fails when the server closes it, the socket errors, the
//! server violates the protocol (bad magic, unknown cookie, oversized or
//! inconsistent chunks), or no reply arrives for
//! [`NbdOptions::io_timeout`] while requests are in flight. Then:
//! 1. The client reconnects with backoff (50 ms doubling to 2 s) and
//!    negotiates again; the export must keep its size.
//! 2. Requests not yet sent wait and go out on the new connection.
//! 3. Requests in flight (sent, unanswered) are sent again on the new
//!    connection: their memory is still the caller's and unchanged (they
//!    have not completed), and READ, WRITE, TRIM, FLUSH and BLOCK_STATUS
//!    are idempotent. A request is sent at most
//!    [`NbdOptions::max_attempts`] times, then fails with EIO.
//! 4. Writes the server acknowledged after the last successful FLUSH may
//!    have died with the server's cache, so the first FLUSH that completes
//!    after a reconnect fails with EIO (the guest sees a failed cache
//!    flush, a SCSI error) instead of claiming a durability nobody can
//!    prove; later flushes report normally. No acknowledged write is thus
//!    lost without a failed flush saying so.
//! 5. When no reconnect succeeds within [`NbdOptions::reconnect_timeout`],
//!    every waiting request fails with EIO, and so does every new one until
//!    a reconnect succeeds (attempts go on every 2 s).

use super::NbdError;
use super::negotiate::{self, ExportInfo};
use super::reply::{Coverage, Decoder, Expect, Source, Table};
use super::stream::{Stream, skip_front};
use super::uri::NbdUri;
use super::wire::{self, BlockDescriptor, RequestHeader, cmd, errno, flag, state};
use crate::device::{
    Allocation, BlockDevice, DeviceInfo, DeviceKind, Op, Request, check_extent, validate,
};
use crate::error::BlockError;
use crate::queue::{IoQueue, RemoteCompletion};
use crate::remote::Poster;
use crossbeam_queue::ArrayQueue;
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vspa_threads::ThreadKind;
use zerocopy::IntoBytes;

/// Requests per `sendmsg`.
const SEND_BATCH: usize = 64;
/// iovecs per `sendmsg`/`recvmsg` (below IOV_MAX).
const MAX_IOV: usize = 512;
/// Longest range one allocation query asks the server about.
const MAX_STATUS_QUERY: u64 = 1 << 30;
/// Extents kept from one BLOCK_STATUS reply.
const MAX_EXTENTS: usize = 65536;
/// First and longest pause between reconnect attempts.
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// How a client connects and what it tolerates.
#[derive(Debug, Clone)]
pub struct NbdOptions {
    /// Use the export read-only even if the server allows writes.
    pub read_only: bool,
    /// Deadline of a connect and of each handshake read and write.
    pub connect_timeout: Duration,
    /// How long requests wait for a lost server to come back.
    pub reconnect_timeout: Duration,
    /// Silence (no reply bytes while requests are in flight) after which
    /// the connection counts as dead.
    pub io_timeout: Duration,
    /// NBD requests in flight at most (records of the client).
    pub max_in_flight: u32,
    /// Times one request is sent before it fails.
    pub max_attempts: u8,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            read_only: false,
            connect_timeout: Duration::from_secs(10),
            reconnect_timeout: Duration::from_secs(30),
            io_timeout: Duration::from_secs(60),
            max_in_flight: 256,
            max_attempts: 3,
        }
    }
}

/// An NBD export as a block device.
#[derive(Debug)]
pub struct NbdClient {
    uri: NbdUri,
    export: ExportInfo,
    info: DeviceInfo,
    /// Bytes per READ/WRITE request (the server's maximum payload, at most
    /// 32 MiB, a whole number of blocks).
    max_request: u64,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NbdClient {
    /// Connects to `uri`, negotiates its export and starts the connection
    /// thread.
    pub fn open(uri: &NbdUri, options: &NbdOptions) -> Result<NbdClient, NbdError> {
        let (stream, export) = negotiate::connect(uri, options.connect_timeout)?;
        let block_size = export.min_block.max(512);
        let blocks = export.size / u64::from(block_size);
        if blocks == 0 {
            return Err(NbdError::Unsupported(format!(
                "export of {} bytes holds no whole {block_size}-byte block",
                export.size
            )));
        }
        if export.size % u64::from(block_size) != 0 {
            tracing::warn!(%uri, size = export.size, "export size is not a whole number of blocks; the tail is not used");
        }
        let read_only = options.read_only || export.has(flag::READ_ONLY);
        let info = DeviceInfo {
            block_size,
            blocks,
            read_only,
            supports_discard: export.has(flag::SEND_TRIM) && !read_only,
            unique_id: crate::file::derive_id(uri.to_string().as_bytes()),
            kind: DeviceKind::Nbd,
        };
        let bs = u64::from(block_size);
        let max_request = (u64::from(export.max_payload.min(wire::MAX_PAYLOAD)) / bs * bs).max(bs);
        let count = options.max_in_flight.clamp(1, 1 << 16) as usize;
        let shared = Arc::new(Shared {
            records: (0..count)
                .map(|_| Record(UnsafeCell::new(Job::default())))
                .collect(),
            free: ArrayQueue::new(count),
            submitted: ArrayQueue::new(count),
            doorbell: Doorbell::new().map_err(NbdError::Io)?,
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            down: AtomicBool::new(false),
        });
        for i in 0..count as u32 {
            let _ = shared.free.push(i);
        }
        let conn = Conn::new(
            Arc::clone(&shared),
            uri.clone(),
            options.clone(),
            export.clone(),
            stream,
        )
        .map_err(NbdError::Io)?;
        let thread = vspa_threads::spawn("nbd-client", ThreadKind::NbdClient, move || conn.run())
            .map_err(NbdError::Io)?;
        Ok(NbdClient {
            uri: uri.clone(),
            export,
            info,
            max_request,
            shared,
            thread: Some(thread),
        })
    }

    /// What the handshake settled.
    pub fn export(&self) -> &ExportInfo {
        &self.export
    }

    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// Takes a free record, waiting up to `wait` (control-plane callers).
    fn take_record(&self, wait: Duration) -> Result<u32, BlockError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(idx) = self.shared.free.pop() {
                return Ok(idx);
            }
            if Instant::now() >= deadline {
                return Err(BlockError::QueueFull);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Opens the NBD URI `path` (see [`crate::open_as`]) with default options.
pub fn open_path(
    path: &std::path::Path,
    read_only: bool,
) -> Result<Arc<dyn BlockDevice>, crate::ImageError> {
    let text = path
        .to_str()
        .ok_or_else(|| NbdError::Uri(format!("{} is not UTF-8", path.display())))?;
    let uri: NbdUri = text.parse()?;
    let options = NbdOptions {
        read_only,
        ..NbdOptions::default()
    };
    Ok(Arc::new(NbdClient::open(&uri, &options)?))
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.doorbell.ring();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl BlockDevice for NbdClient {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn submit(&self, queue: &mut IoQueue, req: Request<'_>) -> Result<(), BlockError> {
        let bytes = validate(&self.info, &req)?;
        if self.shared.down.load(Ordering::Acquire) {
            return Err(BlockError::Os(libc::EIO));
        }
        let bs = u64::from(self.info.block_size);
        let (command, piece) = match req.op() {
            Op::Read => (cmd::READ, self.max_request),
            Op::Write => (cmd::WRITE, self.max_request),
            Op::Discard => (cmd::TRIM, u64::from(u32::MAX) / bs * bs),
            Op::Flush => (cmd::FLUSH, 0),
        };
        let pieces = match command {
            cmd::FLUSH if self.export.has(flag::SEND_FLUSH) => 1,
            cmd::FLUSH => 0,
            _ => bytes.div_ceil(piece),
        };
        let id = queue.begin(req.tag(), req.iov(), false)?;
        let mut taken = Taken::default();
        let planned = (|| {
            for i in 0..pieces {
                let idx = self.shared.free.pop().ok_or(BlockError::QueueFull)?;
                if let Err(e) = taken.push(idx) {
                    let _ = self.shared.free.push(idx);
                    return Err(e);
                }
                let start = i * piece;
                let len = if command == cmd::FLUSH {
                    0
                } else {
                    piece.min(bytes - start)
                };
                let moved = if matches!(command, cmd::READ | cmd::WRITE) {
                    len
                } else {
                    0
                };
                let target = queue.add_remote(id, moved)?;
                // SAFETY: `idx` came off the free queue, so this thread
                // owns its record until it pushes the index on.
                let job = unsafe { self.shared.job(idx) };
                job.command = command;
                job.offset = req.offset() * bs + start;
                job.length = len as u32;
                job.attempts = 0;
                job.done = Done::Queue(target);
                job.iov.clear();
                if matches!(command, cmd::READ | cmd::WRITE) {
                    carve(req.iov(), start, len, &mut job.iov);
                }
            }
            Ok(())
        })();
        if let Err(err) = planned {
            for &idx in taken.as_slice() {
                let _ = self.shared.free.push(idx);
            }
            queue.cancel(id);
            return Err(err);
        }
        for &idx in taken.as_slice() {
            // Cannot fail: the queue holds every record.
            let _ = self.shared.submitted.push(idx);
        }
        // Nothing drains this queue's completions before the commit, so a
        // post that arrives early waits in the ring.
        queue.commit(id)?;
        self.shared.kick();
        Ok(())
    }

    /// `base:allocation` from the server, when it offers the context.
    fn allocation(&self, offset: u64, blocks: u64) -> Result<(Allocation, u64), BlockError> {
        check_extent(&self.info, offset, blocks)?;
        if self.export.allocation_context.is_none() {
            return Ok((Allocation::Data, blocks));
        }
        let bs = u64::from(self.info.block_size);
        let length = (blocks * bs).min(MAX_STATUS_QUERY) as u32;
        let waiter = Arc::new(Waiter::default());
        let idx = self.take_record(Duration::from_secs(5))?;
        // SAFETY: `idx` came off the free queue: this thread owns it.
        let job = unsafe { self.shared.job(idx) };
        job.command = cmd::BLOCK_STATUS;
        job.offset = offset * bs;
        job.length = length;
        job.attempts = 0;
        job.iov.clear();
        job.done = Done::Waiter(Arc::clone(&waiter));
        let _ = self.shared.submitted.push(idx);
        self.shared.kick();
        let extents = waiter.wait()?;
        Ok(interpret_extents(&extents, bs, blocks))
    }
}

/// The allocation of the first run of `extents` (length, flags), in blocks.
fn interpret_extents(extents: &[(u32, u32)], bs: u64, blocks: u64) -> (Allocation, u64) {
    let kind = |flags: u32| {
        if flags & state::ZERO == 0 {
            Allocation::Data
        } else if flags & state::HOLE != 0 {
            Allocation::Hole
        } else {
            Allocation::Zero
        }
    };
    let Some(&(_, first_flags)) = extents.first() else {
        return (Allocation::Data, blocks);
    };
    let first = kind(first_flags);
    let bytes: u64 = extents
        .iter()
        .take_while(|(_, f)| kind(*f) == first)
        .map(|&(len, _)| u64::from(len))
        .sum();
    let run = if first == Allocation::Data {
        bytes.div_ceil(bs)
    } else {
        bytes / bs
    };
    match run.min(blocks) {
        0 => (Allocation::Data, 1),
        run => (first, run),
    }
}

/// Appends the iovecs covering bytes `[start, start + len)` of `iov`.
fn carve(iov: &[libc::iovec], start: u64, len: u64, out: &mut Vec<libc::iovec>) {
    let mut pos = 0u64;
    let end = start + len;
    for v in iov {
        let vend = pos + v.iov_len as u64;
        if vend > start && pos < end {
            let from = start.max(pos);
            let to = end.min(vend);
            out.push(libc::iovec {
                iov_base: v
                    .iov_base
                    .cast::<u8>()
                    .wrapping_add((from - pos) as usize)
                    .cast(),
                iov_len: (to - from) as usize,
            });
        }
        if vend >= end {
            break;
        }
        pos = vend;
    }
}

/// Record indices taken for one request (most requests need one).
struct Taken {
    len: usize,
    items: [u32; 1024],
}

impl Default for Taken {
    fn default() -> Taken {
        Taken {
            len: 0,
            items: [0; 1024],
        }
    }
}

impl Taken {
    fn push(&mut self, idx: u32) -> Result<(), BlockError> {
        let slot = self.items.get_mut(self.len).ok_or(BlockError::QueueFull)?;
        *slot = idx;
        self.len += 1;
        Ok(())
    }

    fn as_slice(&self) -> &[u32] {
        &self.items[..self.len]
    }
}

/// Where a finished record's result goes.
#[derive(Default)]
enum Done {
    #[default]
    Nothing,
    /// A worker's queue slot (a READ/WRITE/TRIM/FLUSH part).
    Queue(RemoteCompletion),
    /// A control-plane caller waiting for block status.
    Waiter(Arc<Waiter>),
}

/// One NBD request: filled by the submitter, then owned by the connection
/// thread until it completes.
#[derive(Default)]
struct Job {
    command: u16,
    offset: u64,
    length: u32,
    /// The caller's memory for READ and WRITE data.
    iov: Vec<libc::iovec>,
    done: Done,
    attempts: u8,
}

struct Record(UnsafeCell<Job>);

// SAFETY: a record is only touched by the thread holding its index (taken
// off the free queue by a submitter, then handed to the connection thread
// through the submitted queue, then pushed back on the free queue); the
// queues' atomics order those hand-overs. The iovecs' raw pointers name
// caller memory valid until completion by the `Request` contract.
unsafe impl Sync for Record {}
// SAFETY: as above; nothing in a record is tied to a thread.
unsafe impl Send for Record {}

/// State shared by the device (workers) and its connection thread.
struct Shared {
    records: Box<[Record]>,
    free: ArrayQueue<u32>,
    submitted: ArrayQueue<u32>,
    doorbell: Doorbell,
    /// The connection thread is about to sleep: submitters ring the bell.
    parked: AtomicBool,
    stop: AtomicBool,
    /// The server stayed away past the reconnect timeout.
    down: AtomicBool,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("records", &self.records.len())
            .field("down", &self.down)
            .finish()
    }
}

impl Shared {
    /// The record with index `idx`.
    ///
    /// # Safety
    /// The caller holds `idx` (see [`Record`]), and no other reference to
    /// this record is alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn job(&self, idx: u32) -> &mut Job {
        // SAFETY: exclusive by the caller's contract.
        unsafe { &mut *self.records[idx as usize].0.get() }
    }

    /// Wakes the connection thread if it sleeps (or is about to).
    fn kick(&self) {
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::Relaxed) {
            self.doorbell.ring();
        }
    }
}

/// An eventfd the connection thread sleeps on.
#[derive(Debug)]
struct Doorbell(OwnedFd);

impl Doorbell {
    fn new() -> std::io::Result<Doorbell> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        Ok(Doorbell(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array; a full counter (never
        // reached) would just fail.
        unsafe { libc::write(self.0.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    fn clear(&self) {
        let mut sink = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a local array (non-blocking).
        unsafe { libc::read(self.0.as_raw_fd(), sink.as_mut_ptr().cast(), 8) };
    }
}

/// Extents (length, flags) of a block status reply, or a host errno.
type StatusResult = Result<Vec<(u32, u32)>, i32>;

/// A block status caller waiting for its extents.
#[derive(Default)]
struct Waiter {
    result: Mutex<Option<StatusResult>>,
    ready: Condvar,
}

impl Waiter {
    fn finish(&self, result: StatusResult) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        self.ready.notify_all();
    }

    fn wait(&self) -> Result<Vec<(u32, u32)>, BlockError> {
        let mut guard = self.result.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(result) = guard.take() {
                return result.map_err(BlockError::Os);
            }
            guard = self.ready.wait(guard).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Where a record is, seen from the connection thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Stage {
    #[default]
    Idle,
    /// Waiting to be sent.
    Queued,
    /// Sent (the value orders resends); waiting for its reply.
    InFlight(u64),
}

/// The connection thread's view of one record.
#[derive(Default)]
struct Entry {
    generation: u32,
    stage: Stage,
    header: [u8; size_of::<RequestHeader>()],
    coverage: Coverage,
    error: Option<u32>,
    extents: Vec<(u32, u32)>,
    /// Writes acknowledged when this FLUSH was sent.
    flush_mark: u64,
}

/// The records as the connection thread tracks them, and where their
/// results go.
struct Flight {
    shared: Arc<Shared>,
    entries: Box<[Entry]>,
    poster: Poster,
    context: Option<u32>,
    sent: u64,
    /// Writes (and trims) acknowledged so far, and how many of them a
    /// successful FLUSH covered.
    acked_writes: u64,
    flushed: u64,
    /// The connection was lost with unflushed acknowledged writes.
    lost_writes: bool,
    /// Records sent and not answered.
    in_flight: usize,
    scratch: Vec<libc::iovec>,
}

impl Flight {
    /// The record of `cookie`, if it is in flight under that cookie.
    fn lookup(&self, cookie: u64) -> Option<u32> {
        let idx = cookie as u32;
        let entry = self.entries.get(idx as usize)?;
        (entry.generation == (cookie >> 32) as u32 && matches!(entry.stage, Stage::InFlight(_)))
            .then_some(idx)
    }

    fn job(&mut self, idx: u32) -> &mut Job {
        // SAFETY: the connection thread holds every index it tracks (queued
        // or in flight), and `&mut self` makes this the only reference.
        unsafe { self.shared.job(idx) }
    }

    /// Queues a record to be sent: one handed over by a submitter, or one
    /// in flight on a lost connection.
    fn accept(&mut self, idx: u32) {
        let cookie = {
            let entry = &mut self.entries[idx as usize];
            if matches!(entry.stage, Stage::InFlight(_)) {
                self.in_flight -= 1;
            }
            entry.stage = Stage::Queued;
            entry.coverage.clear();
            entry.error = None;
            entry.extents.clear();
            (u64::from(entry.generation) << 32) | u64::from(idx)
        };
        let job = self.job(idx);
        let header = RequestHeader::new(job.command, 0, cookie, job.offset, job.length);
        self.entries[idx as usize]
            .header
            .copy_from_slice(header.as_bytes());
    }

    /// A reply completed record `idx`.
    fn complete(&mut self, idx: u32, mut result: Result<(), u32>) {
        let command = self.job(idx).command;
        match (command, result) {
            (cmd::WRITE | cmd::TRIM, Ok(())) => self.acked_writes += 1,
            (cmd::FLUSH, Ok(())) => {
                let mark = self.entries[idx as usize].flush_mark;
                self.flushed = self.flushed.max(mark);
                if std::mem::take(&mut self.lost_writes) {
                    tracing::warn!(
                        "NBD flush failed on purpose: the server went away with unflushed writes"
                    );
                    result = Err(errno::EIO);
                }
            }
            _ => {}
        }
        self.deliver(idx, result);
    }

    /// Sends the result of record `idx` where it belongs and frees it.
    fn deliver(&mut self, idx: u32, result: Result<(), u32>) {
        let extents = std::mem::take(&mut self.entries[idx as usize].extents);
        let job = self.job(idx);
        let moved = if matches!(job.command, cmd::READ | cmd::WRITE) {
            job.length as i32
        } else {
            0
        };
        let done = std::mem::take(&mut job.done);
        job.iov.clear();
        match done {
            Done::Queue(target) => {
                let res = result.map_or_else(|e| -errno::to_host(e), |()| moved);
                self.poster.post(target, res);
            }
            Done::Waiter(waiter) => waiter.finish(result.map(|()| extents).map_err(errno::to_host)),
            Done::Nothing => {}
        }
        let entry = &mut self.entries[idx as usize];
        if matches!(entry.stage, Stage::InFlight(_)) {
            self.in_flight -= 1;
        }
        entry.stage = Stage::Idle;
        entry.generation = entry.generation.wrapping_add(1);
        entry.coverage.clear();
        entry.error = None;
        let _ = self.shared.free.push(idx);
    }
}

impl Table for Flight {
    fn expect(&self, cookie: u64) -> Option<Expect> {
        let idx = self.lookup(cookie)?;
        // SAFETY: an in-flight record is held by this thread; the shared
        // reference lives only for this read.
        let job = unsafe { &*self.shared.records[idx as usize].0.get() };
        Some(Expect {
            command: job.command,
            offset: job.offset,
            length: job.length,
        })
    }

    fn content(&mut self, cookie: u64, at: u64, len: u64) -> Result<(), String> {
        let idx = self.lookup(cookie).ok_or("cookie not in flight")?;
        self.entries[idx as usize].coverage.add(at, len)
    }

    fn receive(
        &mut self,
        cookie: u64,
        src: &mut dyn Source,
        at: u64,
        len: u64,
    ) -> std::io::Result<usize> {
        let Some(idx) = self.lookup(cookie) else {
            return Err(std::io::Error::other("cookie not in flight"));
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        carve(&self.job(idx).iov, at, len, &mut scratch);
        scratch.truncate(MAX_IOV);
        // SAFETY: the iovecs are a part of the READ's caller memory, valid
        // and not accessed by anyone else until the request completes (the
        // `Request` contract); it has not completed.
        let got = unsafe { src.recv(&scratch) };
        self.scratch = scratch;
        got
    }

    fn zero(&mut self, cookie: u64, at: u64, len: u64) {
        let Some(idx) = self.lookup(cookie) else {
            return;
        };
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        carve(&self.job(idx).iov, at, len, &mut scratch);
        for v in &scratch {
            // SAFETY: as in `receive`: caller memory of an uncompleted READ.
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
        self.scratch = scratch;
    }

    fn extents(&mut self, cookie: u64, context: u32, descriptors: &[BlockDescriptor]) {
        let Some(idx) = self.lookup(cookie) else {
            return;
        };
        if Some(context) != self.context {
            return;
        }
        let out = &mut self.entries[idx as usize].extents;
        let room = MAX_EXTENTS.saturating_sub(out.len());
        out.extend(
            descriptors
                .iter()
                .take(room)
                .map(|d| (d.length.get(), d.flags.get())),
        );
    }

    fn fail(&mut self, cookie: u64, error: u32, message: &str) {
        if let Some(idx) = self.lookup(cookie) {
            tracing::debug!(error, message, "NBD request failed");
            self.entries[idx as usize].error.get_or_insert(error);
        }
    }

    fn done(&mut self, cookie: u64) -> Result<(), String> {
        let idx = self.lookup(cookie).ok_or("cookie not in flight")?;
        let (command, length) = {
            let job = self.job(idx);
            (job.command, job.length)
        };
        let entry = &self.entries[idx as usize];
        let result = match entry.error {
            Some(e) => Err(e),
            None if command == cmd::READ && !entry.coverage.complete(length) => {
                return Err("READ reply ended before covering the request".into());
            }
            None => Ok(()),
        };
        self.complete(idx, result);
        Ok(())
    }
}

/// Replies come straight from the socket.
struct StreamSource<'a>(&'a Stream);

impl Source for StreamSource<'_> {
    unsafe fn recv(&mut self, iov: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the caller's contract is recv_nonblocking's.
        unsafe { self.0.recv_nonblocking(iov) }
    }
}

/// The connection thread.
struct Conn {
    shared: Arc<Shared>,
    uri: NbdUri,
    options: NbdOptions,
    export: ExportInfo,
    stream: Option<Stream>,
    decoder: Decoder,
    flight: Flight,
    /// Records to send, in order; the first may be partly sent.
    queue: VecDeque<u32>,
    sent_bytes: usize,
    iov: Vec<libc::iovec>,
    last_reply: Instant,
}

// SAFETY: the only non-Send parts are iovec scratch lists, which hold
// pointers into callers' memory only during one send or receive on the
// connection thread.
unsafe impl Send for Conn {}

impl Conn {
    fn new(
        shared: Arc<Shared>,
        uri: NbdUri,
        options: NbdOptions,
        export: ExportInfo,
        stream: Stream,
    ) -> std::io::Result<Conn> {
        let count = shared.records.len();
        Ok(Conn {
            flight: Flight {
                shared: Arc::clone(&shared),
                entries: (0..count).map(|_| Entry::default()).collect(),
                poster: Poster::new()?,
                context: export.allocation_context,
                sent: 0,
                acked_writes: 0,
                flushed: 0,
                lost_writes: false,
                in_flight: 0,
                scratch: Vec::with_capacity(MAX_IOV),
            },
            decoder: Decoder::new(export.structured),
            shared,
            uri,
            options,
            export,
            stream: Some(stream),
            queue: VecDeque::with_capacity(count),
            sent_bytes: 0,
            iov: Vec::with_capacity(MAX_IOV + SEND_BATCH),
            last_reply: Instant::now(),
        })
    }

    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    fn run(mut self) {
        while !self.stopping() {
            if self.stream.is_none() && !self.reconnect() {
                break;
            }
            let mut progress = self.pull();
            progress |= self.send();
            progress |= self.receive();
            self.flight.poster.flush();
            self.check_silence();
            if !progress {
                self.park();
            }
        }
        self.shutdown();
    }

    /// Takes the records submitters handed over.
    fn pull(&mut self) -> bool {
        let mut any = false;
        while let Some(idx) = self.shared.submitted.pop() {
            any = true;
            let command = self.flight.job(idx).command;
            if self.shared.down.load(Ordering::Acquire) {
                self.flight.deliver(idx, Err(errno::EIO));
            } else if command == cmd::BLOCK_STATUS && self.flight.context.is_none() {
                // Only after a reconnect lost the context: no news is data.
                self.flight.deliver(idx, Ok(()));
            } else {
                self.flight.accept(idx);
                self.queue.push_back(idx);
            }
        }
        any
    }

    /// Bytes record `idx` takes on the wire.
    fn wire_len(&mut self, idx: u32) -> usize {
        let job = self.flight.job(idx);
        size_of::<RequestHeader>()
            + if job.command == cmd::WRITE {
                job.length as usize
            } else {
                0
            }
    }

    /// One `sendmsg` of queued requests; true if anything went out.
    fn send(&mut self) -> bool {
        if self.stream.is_none() || self.queue.is_empty() {
            return false;
        }
        self.iov.clear();
        for &idx in self.queue.iter().take(SEND_BATCH) {
            if self.iov.len() >= MAX_IOV {
                break;
            }
            let header = &self.flight.entries[idx as usize].header;
            self.iov.push(libc::iovec {
                iov_base: header.as_ptr().cast_mut().cast(),
                iov_len: header.len(),
            });
            // SAFETY: the connection thread holds every queued record.
            let job = unsafe { self.shared.job(idx) };
            if job.command == cmd::WRITE {
                self.iov.extend_from_slice(&job.iov);
            }
        }
        skip_front(&mut self.iov, self.sent_bytes);
        let stream = self.stream.as_ref().expect("checked above");
        let limit = self.iov.len().min(MAX_IOV);
        // SAFETY: the iovecs name the records' header arrays (owned here,
        // unchanged while sending) and WRITE callers' memory, readable until
        // those requests complete (the `Request` contract).
        match unsafe { stream.send_nonblocking(&self.iov[..limit]) } {
            Ok(n) => {
                self.advance(n);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
            Err(e) => {
                self.lost(format!("send failed: {e}"));
                true
            }
        }
    }

    /// Accounts `n` more bytes sent: fully sent requests are in flight.
    fn advance(&mut self, n: usize) {
        let mut total = self.sent_bytes + n;
        while let Some(&idx) = self.queue.front() {
            let len = self.wire_len(idx);
            if total < len {
                break;
            }
            total -= len;
            self.queue.pop_front();
            self.flight.sent += 1;
            let mark = self.flight.acked_writes;
            let entry = &mut self.flight.entries[idx as usize];
            entry.stage = Stage::InFlight(self.flight.sent);
            entry.flush_mark = mark;
            self.flight.in_flight += 1;
        }
        self.sent_bytes = total;
        if self.queue.is_empty() {
            self.sent_bytes = 0;
        }
    }

    fn in_flight(&self) -> bool {
        self.flight.in_flight > 0
    }

    /// Decodes whatever replies arrived; true if any bytes did.
    fn receive(&mut self) -> bool {
        let Some(stream) = &self.stream else {
            return false;
        };
        let mut src = StreamSource(stream);
        match self.decoder.run(&mut src, &mut self.flight) {
            Ok(0) => false,
            Ok(_) => {
                self.last_reply = Instant::now();
                true
            }
            Err(e) => {
                self.lost(e.to_string());
                true
            }
        }
    }

    /// A connection with requests in flight and no reply for too long is
    /// dead.
    fn check_silence(&mut self) {
        if self.stream.is_some()
            && self.last_reply.elapsed() > self.options.io_timeout
            && self.in_flight()
        {
            let secs = self.options.io_timeout.as_secs_f64();
            self.lost(format!("no reply for {secs:.1} s"));
        }
    }

    /// Sleeps until the socket or the doorbell has something.
    fn park(&mut self) {
        self.shared.parked.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if !self.shared.submitted.is_empty() || self.stopping() {
            self.shared.parked.store(false, Ordering::Relaxed);
            return;
        }
        if let Some(stream) = &self.stream {
            let timeout = if self.in_flight() {
                self.options
                    .io_timeout
                    .saturating_sub(self.last_reply.elapsed())
                    .clamp(Duration::from_millis(1), Duration::from_secs(1))
            } else {
                Duration::from_secs(1)
            };
            stream.wait(
                !self.queue.is_empty(),
                Some(self.shared.doorbell.0.as_fd()),
                timeout,
            );
        }
        self.shared.parked.store(false, Ordering::Relaxed);
        self.shared.doorbell.clear();
        if !self.in_flight() {
            // Idle: the silence clock starts with the next request.
            self.last_reply = Instant::now();
        }
    }

    /// The connection failed: requeue per the module's rule.
    fn lost(&mut self, why: String) {
        tracing::warn!(uri = %self.uri, "NBD connection lost: {why}");
        if let Some(stream) = self.stream.take() {
            stream.shutdown(std::net::Shutdown::Both);
        }
        let mut again: Vec<(u64, u32)> = self
            .flight
            .entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| match e.stage {
                Stage::InFlight(seq) => Some((seq, i as u32)),
                _ => None,
            })
            .collect();
        again.sort_unstable();
        let mut resend = VecDeque::with_capacity(again.len() + self.queue.len());
        for (_, idx) in again {
            let job = self.flight.job(idx);
            job.attempts = job.attempts.saturating_add(1);
            if job.attempts >= self.options.max_attempts {
                tracing::warn!(
                    command = cmd::name(job.command),
                    "NBD request failed after {} attempts",
                    job.attempts
                );
                self.flight.deliver(idx, Err(errno::EIO));
            } else {
                self.flight.accept(idx);
                resend.push_back(idx);
            }
        }
        resend.extend(self.queue.drain(..));
        self.queue = resend;
        self.sent_bytes = 0;
        if self.flight.acked_writes > self.flight.flushed {
            self.flight.lost_writes = true;
        }
        self.decoder = Decoder::new(self.export.structured);
    }

    /// Reconnects with backoff; false when the client is stopping.
    fn reconnect(&mut self) -> bool {
        let started = Instant::now();
        let mut backoff = BACKOFF_START;
        loop {
            if self.stopping() {
                return false;
            }
            self.pull();
            if !self.shared.down.load(Ordering::Acquire)
                && started.elapsed() >= self.options.reconnect_timeout
            {
                tracing::error!(uri = %self.uri, "NBD server unreachable; failing its requests until it is back");
                self.shared.down.store(true, Ordering::Release);
                while let Some(idx) = self.queue.pop_front() {
                    self.flight.deliver(idx, Err(errno::EIO));
                }
            }
            match negotiate::connect(&self.uri, self.options.connect_timeout) {
                Ok((stream, info)) if info.size == self.export.size => {
                    tracing::info!(uri = %self.uri, "NBD connection re-established");
                    self.decoder = Decoder::new(info.structured);
                    self.flight.context = info.allocation_context;
                    self.export.structured = info.structured;
                    self.stream = Some(stream);
                    self.shared.down.store(false, Ordering::Release);
                    self.last_reply = Instant::now();
                    return true;
                }
                Ok((_, info)) => tracing::error!(
                    uri = %self.uri,
                    "NBD export changed size ({} to {} bytes); not using it",
                    self.export.size,
                    info.size
                ),
                Err(e) => tracing::debug!(uri = %self.uri, "NBD reconnect failed: {e}"),
            }
            self.flight.poster.flush();
            wait_readable(&self.shared.doorbell.0, backoff);
            self.shared.doorbell.clear();
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Fails what is left, says goodbye to the server and waits until every
    /// completion has been delivered.
    fn shutdown(&mut self) {
        let clean = !self.in_flight() && self.queue.is_empty();
        self.pull();
        while let Some(idx) = self.queue.pop_front() {
            self.flight.deliver(idx, Err(errno::ESHUTDOWN));
        }
        for idx in 0..self.flight.entries.len() as u32 {
            if self.flight.entries[idx as usize].stage != Stage::Idle {
                self.flight.deliver(idx, Err(errno::ESHUTDOWN));
            }
        }
        if let Some(stream) = self.stream.take()
            && clean
        {
            let disc = RequestHeader::new(cmd::DISC, 0, 0, 0, 0);
            let _ = stream.set_timeout(Some(Duration::from_millis(200)));
            let _ = stream.write_all(disc.as_bytes());
        }
        self.flight.poster.drain();
    }
}

/// Sleeps until `fd` is readable or `timeout` passes.
fn wait_readable(fd: &OwnedFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carving_follows_the_iovec_boundaries() {
        let mut a = [0u8; 100];
        let mut b = [0u8; 50];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 100,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 50,
            },
        ];
        let mut out = Vec::new();
        carve(&iov, 90, 30, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].iov_base as usize, a.as_ptr() as usize + 90);
        assert_eq!(out[0].iov_len, 10);
        assert_eq!(out[1].iov_base as usize, b.as_ptr() as usize);
        assert_eq!(out[1].iov_len, 20);
        out.clear();
        carve(&iov, 100, 50, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].iov_len, 50);
        let mut list = iov.to_vec();
        skip_front(&mut list, 120);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].iov_len, 30);
    }

    #[test]
    fn extents_become_block_runs() {
        let hole = state::HOLE | state::ZERO;
        assert_eq!(
            interpret_extents(&[(4096, hole), (8192, hole), (512, 0)], 512, 100),
            (Allocation::Hole, 24)
        );
        assert_eq!(
            interpret_extents(&[(700, 0), (512, hole)], 512, 100),
            (Allocation::Data, 2)
        );
        assert_eq!(
            interpret_extents(&[(4096, state::ZERO)], 512, 4),
            (Allocation::Zero, 4)
        );
        assert_eq!(
            interpret_extents(&[(100, hole)], 512, 4),
            (Allocation::Data, 1)
        );
        assert_eq!(
            interpret_extents(&[(4096, state::HOLE)], 512, 8),
            (Allocation::Data, 8)
        );
        assert_eq!(interpret_extents(&[], 512, 8), (Allocation::Data, 8));
    }
}
