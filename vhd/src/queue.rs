//! [`IoQueue`]: one io_uring per worker thread, with a fixed slab of request
//! slots.
//!
//! A block request becomes one slot. The backend plans it as a list of
//! sub-I/Os (each one SQE against some file of the image chain) plus
//! synchronous zero-fills of caller memory and synchronous buffered writes
//! of whole pages (a system call beats io-wq there; see the `inline`
//! module), then commits it: the SQEs are pushed (not submitted). A request
//! left with no SQE is ready at once, and is reported by the next
//! [`IoQueue::reap`] like any other: callers see one completion model. The
//! owner calls [`IoQueue::submit`] once per poll-loop iteration, so a batch
//! of requests costs one `io_uring_enter`.
//! When every SQE of a slot has completed, the slot's post-completion
//! actions run (e.g. setting differencing sector-bitmap bits, copying a
//! bounce buffer out) and [`IoQueue::reap`] reports the request once, with
//! its caller tag.
//!
//! Slots keep their vectors (iovec arrays the kernel reads, planned SQEs,
//! actions) across requests, so the steady state allocates nothing. Backing
//! files are entered into a registered-file table on first use.
//!
//! A request may also wait for work another thread does (a `Signal`):
//! the slot reads an eventfd that thread rings, so the wait costs the
//! worker nothing.
//!
//! The owner may push its own SQEs (e.g. a POLL_ADD on a doorbell eventfd)
//! with [`IoQueue::push_user`]; their CQEs come back as
//! [`Completion::User`], so a worker can sleep in one `io_uring_enter`
//! waiting for disk completions or a doorbell.
//!
//! Rings are created through `vspa_threads::privileged`: on the ring thread
//! once the appliance's sandbox started it (no other thread may call
//! `io_uring_setup` or `io_uring_register` then), here otherwise.
//! A *restricted* queue ([`QueueConfig::restricted`], the default once the
//! sandbox called [`restrict_new_rings`]) gets its ring created
//! disabled, its sparse file table and one
//! `IORING_REGISTER_RESTRICTIONS` (the opcodes in [`RESTRICTED_OPCODES`],
//! SQE flags FIXED_FILE and ASYNC only, no register opcode at all), and
//! is then enabled: no register call works on it afterwards. Its
//! registered-file table is kept through FILES_UPDATE SQEs instead of
//! register calls, so lazily registered files and released ones (closed
//! images must not stay open) need no system call the owner is denied.

use crate::error::BlockError;
use crate::file::IoFile;
use crate::inline::Inline;
use io_uring::{IoUring, opcode, squeue, types};
use std::alloc::Layout;
use std::cell::UnsafeCell;
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Bit of `user_data` that marks an SQE pushed by the queue's owner.
const USER_BIT: u64 = 1 << 63;
/// Alignment of bounce buffers (enough for any O_DIRECT backing).
const BOUNCE_ALIGN: usize = 4096;

/// Sizes of a queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Request slots: the most requests in flight at once.
    pub slots: u32,
    /// Submission queue entries (the completion queue is twice that).
    pub ring_entries: u32,
    /// Size of the registered-file table; 0 disables registered files.
    pub registered_files: u32,
    /// Create a restricted ring (see the module docs); defaults to what
    /// [`restrict_new_rings`] last set (off unless a sandbox turned it on).
    pub restricted: bool,
    /// A restricted ring also takes [`SOCKET_OPCODES`]: the queue receives
    /// and sends on a socket through [`IoQueue::push_user`] (an NBD
    /// server connection).
    pub socket_io: bool,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            slots: 128,
            ring_entries: 256,
            registered_files: 32,
            restricted: RESTRICT_NEW_RINGS.load(Ordering::Relaxed),
            socket_io: false,
        }
    }
}

static RESTRICT_NEW_RINGS: AtomicBool = AtomicBool::new(false);

/// Makes queues created from now on restricted by default (the appliance's
/// sandbox turns this on before it starts any device).
pub fn restrict_new_rings(on: bool) {
    RESTRICT_NEW_RINGS.store(on, Ordering::Relaxed);
}

/// The only opcodes a restricted ring accepts: what the backends plan
/// (reads and writes, plain, vectored and into registered memory;
/// fdatasync; hole punching) and the table updates of the queue itself.
/// Anything else completes with -EACCES.
pub const RESTRICTED_OPCODES: [u8; 9] = [
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::ReadFixed::CODE,
    opcode::WriteFixed::CODE,
    opcode::Fsync::CODE,
    opcode::Fallocate::CODE,
    opcode::FilesUpdate::CODE,
];

/// What a restricted ring with [`QueueConfig::socket_io`] takes besides
/// [`RESTRICTED_OPCODES`]: receiving requests and sending replies.
pub const SOCKET_OPCODES: [u8; 2] = [opcode::Recv::CODE, opcode::SendMsg::CODE];

/// SQE flags a restricted ring accepts: registered files, and IOSQE_ASYNC
/// (writes the kernel cannot do without blocking go straight to a worker).
pub const RESTRICTED_SQE_FLAGS: u8 = squeue::Flags::FIXED_FILE.bits() | squeue::Flags::ASYNC.bits();

/// `user_data` of the queue's own FILES_UPDATE SQEs.
const TABLE_UPDATE: u64 = 1 << 62;

/// Creates the ring of a queue: restricted ones disabled, with their file
/// table and restrictions, then enabled. Returns the ring and the size of
/// its registered-file table.
fn build_ring(config: QueueConfig) -> std::io::Result<(IoUring, usize)> {
    let mut builder = IoUring::builder();
    builder
        .setup_cqsize(config.ring_entries.saturating_mul(2))
        .setup_coop_taskrun()
        .setup_taskrun_flag();
    if config.restricted {
        builder.setup_r_disabled();
    }
    let ring = builder.build(config.ring_entries)?;
    let file_capacity = if config.registered_files > 0
        && ring
            .submitter()
            .register_files_sparse(config.registered_files)
            .is_ok()
    {
        config.registered_files as usize
    } else {
        0
    };
    if config.restricted {
        use io_uring::register::Restriction;
        let sockets: &[u8] = if config.socket_io {
            &SOCKET_OPCODES
        } else {
            &[]
        };
        let mut rules: Vec<Restriction> = RESTRICTED_OPCODES
            .iter()
            .chain(sockets)
            .map(|&op| Restriction::sqe_op(op))
            .collect();
        rules.push(Restriction::sqe_flags_allowed(RESTRICTED_SQE_FLAGS));
        ring.submitter().register_restrictions(&mut rules)?;
        ring.submitter().register_enable_rings()?;
    }
    Ok((ring, file_capacity))
}

/// Whether this kernel creates restricted rings (Linux 5.10 and later,
/// io_uring enabled); the sandbox asks before it turns them on.
pub fn restricted_rings_available() -> std::io::Result<()> {
    build_ring(QueueConfig {
        slots: 1,
        ring_entries: 2,
        registered_files: 1,
        restricted: true,
        socket_io: false,
    })
    .map(drop)
}

/// One completion returned by [`IoQueue::reap`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completion {
    /// A block request finished; `Ok` carries the bytes transferred.
    Request {
        tag: u64,
        result: Result<u32, BlockError>,
    },
    /// An SQE pushed with [`IoQueue::push_user`] produced a CQE.
    User { tag: u64, result: i32, flags: u32 },
}

/// Work run on the owning thread when a request's I/O has all succeeded.
pub(crate) trait OnComplete: Send + Sync {
    fn on_complete(&self, a: u64, b: u64);
}

pub(crate) struct PostAction {
    pub target: Arc<dyn OnComplete>,
    pub a: u64,
    pub b: u64,
    /// Run on failure too (bookkeeping of the request itself, not of
    /// its data).
    pub always: bool,
}

/// The end of work another thread does for a request (a metadata flush),
/// seen by the worker as one more I/O: the slot reads the eventfd this
/// signal rings, so the worker keeps serving other requests meanwhile.
pub(crate) struct Signal {
    /// Blocking, so io_uring waits for readability instead of failing.
    fd: OwnedFd,
    /// Where the kernel puts the eventfd's counter; never read here.
    sink: Box<UnsafeCell<u64>>,
    failure: Mutex<Option<String>>,
}

// SAFETY: `sink` is written only by the kernel, during the one read a slot
// keeps in flight; this code never reads or writes it. Everything else is
// Sync on its own.
unsafe impl Sync for Signal {}

impl Signal {
    pub(crate) fn new() -> std::io::Result<Arc<Signal>> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Arc::new(Signal {
            // SAFETY: a fresh descriptor nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            sink: Box::new(UnsafeCell::new(0)),
            failure: Mutex::new(None),
        }))
    }

    /// Records how the work ended and wakes the waiting request.
    pub(crate) fn finish(&self, outcome: Result<(), String>) {
        *self.failure.lock().unwrap_or_else(|e| e.into_inner()) = outcome.err();
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to our own eventfd.
        // It cannot block: the counter is written once per signal.
        unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }

    fn failure(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Bytes a slot's read of a [`Signal`] transfers.
const SIGNAL_BYTES: u64 = 8;

/// Handle of a slot being planned.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SlotId(u32);

#[derive(Debug, Clone, Copy)]
enum FileRef {
    Fd(i32),
    Fixed(u32),
}

#[derive(Debug, Clone, Copy)]
enum SubKind {
    Read,
    Write,
    Fsync,
    Punch,
    /// Completed by another thread posting a CQE into this ring.
    Remote,
}

/// Where another thread posts the CQE that completes one part of a request
/// (an `IORING_OP_MSG_RING` into the queue's ring): the CQE's result is
/// the bytes that part moved, or a negative errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RemoteCompletion {
    pub ring_fd: std::os::fd::RawFd,
    pub user_data: u64,
}

#[derive(Debug, Clone, Copy)]
struct Sub {
    file: FileRef,
    kind: SubKind,
    /// Registered buffer holding the (single) segment, if any.
    buf_index: Option<u16>,
    offset: u64,
    len: u64,
    iov_start: u32,
    iov_count: u32,
    /// Straight to an io-wq worker (IOSQE_ASYNC): the kernel cannot do it
    /// without blocking, so a non-blocking attempt first is wasted work.
    punt: bool,
}

/// A page-aligned heap buffer for O_DIRECT bounces.
struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = Layout::from_size_align(len.max(BOUNCE_ALIGN), BOUNCE_ALIGN)
            .expect("bounce size fits a layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf {
            ptr,
            len: layout.size(),
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, BOUNCE_ALIGN).expect("layout of new()");
        // SAFETY: allocated in new() with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

#[derive(Default)]
struct Slot {
    tag: u64,
    pending: u32,
    expected: u64,
    /// Bytes planned a second time (a write mirrored to another file),
    /// counted in `expected` but not in the caller's result.
    mirrored: u64,
    done: u64,
    error: Option<BlockError>,
    /// Copy of the caller's scatter-gather list.
    caller: Vec<libc::iovec>,
    /// iovec arrays of the planned SQEs; the kernel reads these.
    iovs: Vec<libc::iovec>,
    subs: Vec<Sub>,
    post: Vec<PostAction>,
    /// Work on another thread this request also waits for.
    wait: Option<Arc<Signal>>,
    bounce: Option<AlignedBuf>,
    /// This request goes through the bounce buffer.
    bounced: bool,
    /// Caller byte ranges to copy from the bounce buffer after a read.
    copy_out: Vec<(u64, u64)>,
}

impl Slot {
    fn reset(&mut self, tag: u64) {
        self.tag = tag;
        self.pending = 0;
        self.expected = 0;
        self.mirrored = 0;
        self.done = 0;
        self.error = None;
        self.caller.clear();
        self.iovs.clear();
        self.subs.clear();
        self.post.clear();
        self.wait = None;
        self.copy_out.clear();
    }

    /// Calls `f(ptr, len)` for each piece of caller memory in
    /// `[start, start + len)` of the request's byte space.
    fn for_each_piece(
        &self,
        start: u64,
        len: u64,
        mut f: impl FnMut(*mut u8, usize),
    ) -> Result<(), BlockError> {
        let mut pos = 0u64;
        let mut left = len;
        for v in &self.caller {
            if left == 0 {
                break;
            }
            let vlen = v.iov_len as u64;
            let cur = start + (len - left);
            if cur < pos + vlen {
                let skip = cur - pos;
                let take = (vlen - skip).min(left);
                // `skip < vlen`, so the offset stays inside the caller's iovec.
                f(
                    v.iov_base.cast::<u8>().wrapping_add(skip as usize),
                    take as usize,
                );
                left -= take;
            }
            pos += vlen;
        }
        if left == 0 {
            Ok(())
        } else {
            Err(BlockError::LengthMismatch {
                expected: start + len,
                actual: pos,
            })
        }
    }
}

/// Counters of what the queue has pushed (for tests and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// SQEs pushed for requests.
    pub sqes: u64,
    /// Of those, SQEs on a registered file.
    pub fixed_file_sqes: u64,
    /// Of those, reads and writes into registered memory (READ/WRITE_FIXED).
    pub fixed_buffer_sqes: u64,
    /// Buffered writes done inline as a system call instead of an SQE
    /// (see the `inline` module), stores included.
    pub inline_writes: u64,
    /// Of those, writes done as a copy into the file's mapping (see the
    /// `mapped` module).
    pub mapped_writes: u64,
}

/// Largest buffer io_uring registers in one piece.
const MAX_REGISTERED_BUFFER: usize = 1 << 30;

/// One io_uring plus its request slots; owned by one worker thread.
pub struct IoQueue {
    ring: IoUring,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    ready: VecDeque<u32>,
    user_ready: VecDeque<(u64, i32, u32)>,
    /// Registered-file table: position = fixed index; the file's id and
    /// liveness flag, None for a free entry.
    files: Vec<Option<(u64, Arc<AtomicBool>)>>,
    /// `file::dropped_files()` when the table was last swept.
    swept_at: u64,
    file_capacity: usize,
    /// Internal SQEs pushed and not yet completed.
    pending_sqes: usize,
    /// Owner SQEs pushed whose final CQE has not arrived.
    pending_user: usize,
    /// Registered memory: (start, end) address of each buffer index.
    buffers: Vec<(usize, usize)>,
    stats: QueueStats,
    /// A restricted ring: its file table changes through FILES_UPDATE SQEs.
    restricted: bool,
    /// What each file-table entry's pending FILES_UPDATE installs (the
    /// kernel reads it when it runs the SQE).
    table_fds: Box<[i32]>,
}

impl std::fmt::Debug for IoQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoQueue")
            .field("slots", &self.slots.len())
            .field("free", &self.free.len())
            .field("pending_sqes", &self.pending_sqes)
            .finish()
    }
}

// SAFETY: the raw pointers inside the slots point at caller memory whose
// validity the caller guarantees until completion, independent of which
// thread owns the queue; nothing in the queue is tied to a thread.
unsafe impl Send for IoQueue {}

impl IoQueue {
    /// A queue with `slots` request slots and default ring sizes.
    pub fn new(slots: u32) -> std::io::Result<IoQueue> {
        let ring_entries = slots.saturating_mul(2).clamp(8, 4096).next_power_of_two();
        IoQueue::with_config(QueueConfig {
            slots,
            ring_entries,
            ..QueueConfig::default()
        })
    }

    pub fn with_config(config: QueueConfig) -> std::io::Result<IoQueue> {
        // On the ring thread when there is one (the sandbox denies every
        // other thread io_uring_setup), restricted or not.
        let (ring, file_capacity) = vspa_threads::privileged(move || build_ring(config))?;
        let slots: Box<[Slot]> = (0..config.slots.max(1)).map(|_| Slot::default()).collect();
        Ok(IoQueue {
            free: (0..slots.len() as u32).rev().collect(),
            ready: VecDeque::with_capacity(slots.len()),
            user_ready: VecDeque::with_capacity(64),
            slots,
            ring,
            files: Vec::with_capacity(file_capacity),
            swept_at: crate::file::dropped_files(),
            file_capacity,
            pending_sqes: 0,
            pending_user: 0,
            buffers: Vec::new(),
            stats: QueueStats::default(),
            restricted: config.restricted,
            table_fds: vec![-1; if config.restricted { file_capacity } else { 0 }].into(),
        })
    }

    /// Whether the ring is restricted (see the module docs).
    pub fn is_restricted(&self) -> bool {
        self.restricted
    }

    /// Points file-table entry `index` at `fd` (-1: empty): a register
    /// call, or on a restricted ring a FILES_UPDATE SQE ahead of every SQE
    /// that names the entry.
    fn update_table(&mut self, index: usize, fd: i32) -> bool {
        if !self.restricted {
            return self
                .ring
                .submitter()
                .register_files_update(index as u32, &[fd])
                .is_ok();
        }
        self.table_fds[index] = fd;
        let entry = opcode::FilesUpdate::new(&self.table_fds[index], 1)
            .offset(index as i32)
            .build()
            .user_data(TABLE_UPDATE);
        self.push_sqe(&entry).is_ok()
    }

    /// Registers memory (e.g. all of a guest's RAM) with the ring. Request
    /// segments inside it then use READ_FIXED/WRITE_FIXED: the kernel pins
    /// those pages once here instead of on every O_DIRECT request. Regions
    /// over 1 GiB are registered in 1 GiB pieces. Replaces any earlier
    /// registration; call it with no requests in flight.
    ///
    /// # Safety
    /// Every region must stay mapped until the queue is dropped or
    /// [`IoQueue::unregister_memory`] is called.
    pub unsafe fn register_memory(&mut self, regions: &[libc::iovec]) -> std::io::Result<()> {
        self.unregister_memory()?;
        let mut pieces = Vec::new();
        for region in regions {
            let start = region.iov_base as usize;
            let mut at = 0;
            while at < region.iov_len {
                let len = (region.iov_len - at).min(MAX_REGISTERED_BUFFER);
                pieces.push(libc::iovec {
                    iov_base: (start + at) as *mut libc::c_void,
                    iov_len: len,
                });
                at += len;
            }
        }
        if pieces.len() > usize::from(u16::MAX) {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        }
        if pieces.is_empty() {
            return Ok(());
        }
        if self.restricted {
            // No register call works on a restricted ring once enabled.
            return Err(std::io::Error::from_raw_os_error(libc::EPERM));
        }
        // SAFETY: the caller keeps the regions mapped while registered.
        unsafe { self.ring.submitter().register_buffers(&pieces)? };
        self.buffers = pieces
            .iter()
            .map(|v| (v.iov_base as usize, v.iov_base as usize + v.iov_len))
            .collect();
        Ok(())
    }

    /// Drops the memory registration (if any).
    pub fn unregister_memory(&mut self) -> std::io::Result<()> {
        if self.buffers.is_empty() {
            return Ok(());
        }
        self.buffers.clear();
        self.ring.submitter().unregister_buffers()
    }

    /// What the queue has pushed so far.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Registered buffer wholly containing `[ptr, ptr + len)`.
    fn buffer_of(&self, ptr: *mut libc::c_void, len: usize) -> Option<u16> {
        let start = ptr as usize;
        let end = start.checked_add(len)?;
        self.buffers
            .iter()
            .position(|&(s, e)| s <= start && end <= e)
            .map(|i| i as u16)
    }

    /// Requests in flight (submitted to a device and not yet reaped).
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Free request slots.
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// The ring's fd (e.g. to register an eventfd for completions).
    pub fn ring_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.ring.as_raw_fd()
    }
}

/// The ring's fd is readable (poll) while completions wait to be reaped, so
/// a worker can sleep on it together with its other fds.
impl std::os::fd::AsFd for IoQueue {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the ring fd stays open as long as the queue (and so the
        // returned borrow) lives.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.ring_fd()) }
    }
}

impl IoQueue {
    /// Pushes an owner SQE (e.g. POLL_ADD on a doorbell eventfd); its CQE is
    /// reported as [`Completion::User`] with `tag`, which must be below 2^63.
    ///
    /// # Safety
    /// The SQE must be valid for the kernel: any memory it references must
    /// stay valid until its completion is reaped.
    pub unsafe fn push_user(&mut self, entry: squeue::Entry, tag: u64) -> Result<(), BlockError> {
        if tag & USER_BIT != 0 {
            return Err(BlockError::BadTag(tag));
        }
        self.push_sqe(&entry.user_data(tag | USER_BIT))?;
        self.pending_user += 1;
        Ok(())
    }

    /// Submits every pushed SQE with one `io_uring_enter`, without waiting.
    pub fn submit(&mut self) -> std::io::Result<usize> {
        // Poll loops call this every iteration: no syscall when idle. With
        // COOP_TASKRUN some completions (e.g. O_DIRECT) are posted only when
        // the task enters the kernel; the TASKRUN flag says one is waiting.
        if !self.kernel_work_pending() {
            self.release_closed_files();
            return Ok(0);
        }
        self.enter(0)
    }

    /// SQEs to submit, completions waiting for task work to be run, or a
    /// completion queue overflow to flush.
    fn kernel_work_pending(&mut self) -> bool {
        let sq = self.ring.submission();
        !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
    }

    /// Submits and sleeps until at least one completion is ready to reap
    /// (returns at once if one already is, or if nothing could complete).
    pub fn submit_and_wait(&mut self) -> std::io::Result<usize> {
        if self.nothing_to_wait_for() {
            return self.enter(0);
        }
        self.enter(1)
    }

    fn nothing_to_wait_for(&self) -> bool {
        !self.ready.is_empty()
            || !self.user_ready.is_empty()
            || (self.pending_sqes == 0 && self.pending_user == 0)
    }

    /// Like [`IoQueue::submit_and_wait`], but sleeps at most `timeout`
    /// (for workers that also need a periodic tick).
    pub fn submit_and_wait_timeout(
        &mut self,
        timeout: std::time::Duration,
    ) -> std::io::Result<usize> {
        if self.nothing_to_wait_for() {
            return self.enter(0);
        }
        let ts = types::Timespec::new()
            .sec(timeout.as_secs())
            .nsec(timeout.subsec_nanos());
        let args = types::SubmitArgs::new().timespec(&ts);
        loop {
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => return Ok(0),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    self.drain_cq();
                    return Ok(0);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn enter(&mut self, want: usize) -> std::io::Result<usize> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(n) => {
                    self.release_closed_files();
                    return Ok(n);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // Completion queue backlog: move CQEs into slots and let the
                // caller reap; the SQEs stay queued for the next call.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    self.drain_cq();
                    return Ok(0);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Reports every finished request and owner CQE to `f`; returns how
    /// many were reported.
    pub fn reap(&mut self, mut f: impl FnMut(Completion)) -> usize {
        self.drain_cq();
        let mut reported = 0;
        while let Some(idx) = self.ready.pop_front() {
            let (tag, result) = self.finish(idx);
            self.free.push(idx);
            f(Completion::Request { tag, result });
            reported += 1;
        }
        while let Some((tag, result, flags)) = self.user_ready.pop_front() {
            f(Completion::User { tag, result, flags });
            reported += 1;
        }
        reported
    }

    fn drain_cq(&mut self) {
        let cq = self.ring.completion();
        for cqe in cq {
            let data = cqe.user_data();
            if data == TABLE_UPDATE {
                if cqe.result() < 0 {
                    tracing::warn!("io_uring file table update failed: {}", cqe.result());
                }
                continue;
            }
            if data & USER_BIT != 0 {
                if !io_uring::cqueue::more(cqe.flags()) {
                    self.pending_user = self.pending_user.saturating_sub(1);
                }
                self.user_ready
                    .push_back((data & !USER_BIT, cqe.result(), cqe.flags()));
                continue;
            }
            self.pending_sqes -= 1;
            let idx = data as u32;
            let Some(slot) = self.slots.get_mut(idx as usize) else {
                continue;
            };
            let res = cqe.result();
            if res < 0 {
                slot.error.get_or_insert(BlockError::Os(-res));
            } else {
                slot.done += res as u64;
            }
            slot.pending -= 1;
            if slot.pending == 0 {
                self.ready.push_back(idx);
            }
        }
    }

    /// Result of a finished slot; runs its post actions on success (those
    /// marked `always` in any case).
    fn finish(&mut self, idx: u32) -> (u64, Result<u32, BlockError>) {
        let slot = &mut self.slots[idx as usize];
        let wait = slot.wait.take();
        let waited = if wait.is_some() { SIGNAL_BYTES } else { 0 };
        let result = match slot.error.take() {
            Some(err) => Err(err),
            None if slot.done != slot.expected => Err(BlockError::ShortTransfer {
                done: slot.done,
                expected: slot.expected,
            }),
            None => match wait.and_then(|w| w.failure()) {
                Some(why) => Err(BlockError::Metadata(why)),
                None => Ok((slot.expected - waited - slot.mirrored) as u32),
            },
        };
        for action in slot.post.drain(..) {
            if result.is_ok() || action.always {
                action.target.on_complete(action.a, action.b);
            }
        }
        if result.is_ok()
            && let Some(bounce) = &slot.bounce
        {
            for &(start, len) in &slot.copy_out {
                let src = bounce.ptr.as_ptr().wrapping_add(start as usize);
                let mut copied = 0usize;
                // The range was checked against the caller's list when planned.
                let _ = slot.for_each_piece(start, len, |dst, n| {
                    // SAFETY: `src + copied .. + n` lies in the bounce
                    // buffer (sized to the request); `dst` is caller
                    // memory valid until completion by the Request
                    // contract; the two never overlap.
                    unsafe { std::ptr::copy_nonoverlapping(src.add(copied), dst, n) };
                    copied += n;
                });
            }
        }
        slot.post.clear();
        (slot.tag, result)
    }

    fn push_sqe(&mut self, entry: &squeue::Entry) -> Result<(), BlockError> {
        loop {
            // SAFETY: every entry built by this queue references iovec
            // arrays and bounce buffers owned by a busy slot, which stay put
            // until the slot's CQEs are drained; owner entries carry the
            // push_user contract.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand what is queued to the kernel.
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN)) => {
                    self.drain_cq();
                    if self.ring.submission().is_full() {
                        // Wait for completions to make room.
                        if let Err(e) = self.ring.submit_and_wait(1)
                            && e.raw_os_error() != Some(libc::EINTR)
                            && e.raw_os_error() != Some(libc::EBUSY)
                        {
                            return Err(BlockError::from_io(&e));
                        }
                        self.drain_cq();
                    }
                }
                Err(e) => return Err(BlockError::from_io(&e)),
            }
        }
    }

    /// Fixed-file index of `file` in this ring, registering it on first use.
    fn file_ref(&mut self, file: &IoFile) -> FileRef {
        let entry_of = |e: &Option<(u64, Arc<AtomicBool>)>| e.as_ref().map(|(id, _)| *id);
        if let Some(i) = self.files.iter().position(|e| entry_of(e) == Some(file.id)) {
            return FileRef::Fixed(i as u32);
        }
        let free = match self.files.iter().position(Option::is_none) {
            Some(i) => i,
            None if self.files.len() < self.file_capacity => {
                self.files.push(None);
                self.files.len() - 1
            }
            None => return FileRef::Fd(file.data_fd()),
        };
        if !self.update_table(free, file.data_fd()) {
            return FileRef::Fd(file.data_fd());
        }
        self.files[free] = Some((file.id, file.alive.clone()));
        FileRef::Fixed(free as u32)
    }

    /// Drops registered-file entries of files that were closed, so the ring
    /// does not keep them (and their image locks) open. Every submit does
    /// this when some file was closed; an idle queue's owner may call it
    /// after dropping a device. Does nothing while SQEs wait to be
    /// submitted (they may name an entry).
    pub fn release_closed_files(&mut self) {
        let dropped = crate::file::dropped_files();
        if dropped == self.swept_at || !self.ring.submission().is_empty() {
            return;
        }
        self.swept_at = dropped;
        for i in 0..self.files.len() {
            let dead = self.files[i]
                .as_ref()
                .is_some_and(|(_, alive)| !alive.load(Ordering::Acquire));
            if dead && self.update_table(i, -1) {
                self.files[i] = None;
            }
        }
        if self.restricted && !self.ring.submission().is_empty() {
            // Hand the updates over now: an idle queue must not keep a
            // closed image open until its next request.
            let _ = self.ring.submit();
        }
    }

    // ---- planning, used by the backends ----

    /// Takes a free slot for a request over `iov`; `bounce` routes its data
    /// through the slot's aligned buffer (O_DIRECT with unaligned memory).
    pub(crate) fn begin(
        &mut self,
        tag: u64,
        iov: &[libc::iovec],
        bounce: bool,
    ) -> Result<SlotId, BlockError> {
        let idx = self.free.pop().ok_or(BlockError::QueueFull)?;
        let slot = &mut self.slots[idx as usize];
        slot.reset(tag);
        slot.bounced = bounce;
        slot.caller.extend_from_slice(iov);
        Ok(SlotId(idx))
    }

    /// Gives back a slot whose planning failed; nothing was pushed.
    pub(crate) fn cancel(&mut self, id: SlotId) {
        for action in self.slots[id.0 as usize].post.drain(..) {
            if action.always {
                action.target.on_complete(action.a, action.b);
            }
        }
        self.slots[id.0 as usize].wait = None;
        self.free.push(id.0);
    }

    /// Plans a read or write of request bytes `[start, start + len)` at
    /// `file_offset` of `file`.
    pub(crate) fn add_rw(
        &mut self,
        id: SlotId,
        file: &IoFile,
        write: bool,
        file_offset: u64,
        start: u64,
        len: u64,
    ) -> Result<(), BlockError> {
        let slot = &mut self.slots[id.0 as usize];
        let iov_start = slot.iovs.len() as u32;
        if slot.bounced {
            let need = slot.caller.iter().map(|v| v.iov_len).sum::<usize>();
            if slot.bounce.as_ref().is_none_or(|b| b.len < need) {
                slot.bounce = Some(AlignedBuf::new(need));
            }
            let base = slot
                .bounce
                .as_ref()
                .map_or(std::ptr::null_mut(), |b| b.ptr.as_ptr());
            let dst = base.wrapping_add(start as usize);
            if write {
                let mut copied = 0usize;
                slot.for_each_piece(start, len, |src, n| {
                    // SAFETY: `src` is caller memory valid for `n` bytes by
                    // the Request contract; `dst + copied .. + n` lies in the
                    // bounce buffer, which holds the whole request.
                    unsafe { std::ptr::copy_nonoverlapping(src, dst.add(copied), n) };
                    copied += n;
                })?;
            } else {
                slot.for_each_piece(start, len, |_, _| {})?;
                slot.copy_out.push((start, len));
            }
            slot.iovs.push(libc::iovec {
                iov_base: dst.cast(),
                iov_len: len as usize,
            });
        } else {
            let mut iovs = std::mem::take(&mut slot.iovs);
            let carved = slot.for_each_piece(start, len, |ptr, n| {
                push_merged(&mut iovs, iov_start as usize, ptr, n)
            });
            slot.iovs = iovs;
            carved?;
        }
        let mut punt = write && crate::inline::punt(file);
        if write && crate::inline::eligible(file, file_offset, len) {
            let vecs = &slot.iovs[iov_start as usize..];
            let inline = crate::inline::write(file, vecs, file_offset, len);
            punt = inline == Inline::ToRing;
            let result = match inline {
                Inline::Done(result) => Some(result),
                Inline::Stored(n) => {
                    self.stats.mapped_writes += 1;
                    Some(Ok(n))
                }
                Inline::ToRing => None,
            };
            if let Some(result) = result {
                slot.iovs.truncate(iov_start as usize);
                slot.expected += len;
                match result {
                    Ok(n) => slot.done += n,
                    Err(errno) => {
                        slot.error.get_or_insert(BlockError::Os(errno));
                    }
                }
                self.stats.inline_writes += 1;
                return Ok(());
            }
        }
        let target = self.file_ref(file);
        let slot = &mut self.slots[id.0 as usize];
        let iov_count = slot.iovs.len() as u32 - iov_start;
        let buf_index = match (iov_count, slot.iovs.last()) {
            (1, Some(v)) if !self.buffers.is_empty() => {
                let (base, len) = (v.iov_base, v.iov_len);
                self.buffer_of(base, len)
            }
            _ => None,
        };
        let slot = &mut self.slots[id.0 as usize];
        slot.subs.push(Sub {
            file: target,
            kind: if write { SubKind::Write } else { SubKind::Read },
            buf_index,
            offset: file_offset,
            len,
            iov_start,
            iov_count,
            punt,
        });
        slot.expected += len;
        Ok(())
    }

    /// Zero-fills request bytes `[start, start + len)` of caller memory now.
    pub(crate) fn add_zero(&mut self, id: SlotId, start: u64, len: u64) -> Result<(), BlockError> {
        let slot = &mut self.slots[id.0 as usize];
        slot.for_each_piece(start, len, |ptr, n| {
            // SAFETY: caller memory, valid and writable for `n` bytes until
            // completion by the Request contract.
            unsafe { std::ptr::write_bytes(ptr, 0, n) }
        })?;
        slot.expected += len;
        slot.done += len;
        Ok(())
    }

    /// Plans an fdatasync of `file`.
    pub(crate) fn add_fsync(&mut self, id: SlotId, file: &IoFile) {
        file.flushing();
        let target = self.file_ref(file);
        self.slots[id.0 as usize].subs.push(Sub {
            file: target,
            kind: SubKind::Fsync,
            buf_index: None,
            offset: 0,
            len: 0,
            iov_start: 0,
            iov_count: 0,
            punt: false,
        });
    }

    /// Plans a hole punch (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE).
    pub(crate) fn add_punch(&mut self, id: SlotId, file: &IoFile, offset: u64, len: u64) {
        let target = self.file_ref(file);
        self.slots[id.0 as usize].subs.push(Sub {
            file: target,
            kind: SubKind::Punch,
            buf_index: None,
            offset,
            len,
            iov_start: 0,
            iov_count: 0,
            punt: false,
        });
    }

    /// Makes the request also wait for `signal` (work done elsewhere); it
    /// fails if that work reports a failure.
    pub(crate) fn add_wait(&mut self, id: SlotId, signal: Arc<Signal>) {
        let slot = &mut self.slots[id.0 as usize];
        let iov_start = slot.iovs.len() as u32;
        slot.iovs.push(libc::iovec {
            iov_base: signal.sink.get().cast(),
            iov_len: SIGNAL_BYTES as usize,
        });
        slot.subs.push(Sub {
            file: FileRef::Fd(signal.fd.as_raw_fd()),
            kind: SubKind::Read,
            buf_index: None,
            offset: 0,
            len: SIGNAL_BYTES,
            iov_start,
            iov_count: 1,
            punt: false,
        });
        slot.expected += SIGNAL_BYTES;
        // Held by the slot: the descriptor and the sink outlive the read.
        slot.wait = Some(signal);
    }

    /// Makes the request also wait for a part of `len` bytes that another
    /// thread completes by posting a CQE to the returned target. A request
    /// with remote parts has no other I/O (so none of its SQEs can fail to
    /// be pushed while its remote parts are pending), and each target must
    /// be posted exactly once: the queue counts on that CQE.
    pub(crate) fn add_remote(
        &mut self,
        id: SlotId,
        len: u64,
    ) -> Result<RemoteCompletion, BlockError> {
        let ring_fd = self.ring_fd();
        let slot = &mut self.slots[id.0 as usize];
        if slot.subs.iter().any(|s| !matches!(s.kind, SubKind::Remote)) {
            return Err(BlockError::Metadata(
                "remote part mixed with local I/O".into(),
            ));
        }
        slot.subs.push(Sub {
            file: FileRef::Fd(-1),
            kind: SubKind::Remote,
            buf_index: None,
            offset: 0,
            len,
            iov_start: 0,
            iov_count: 0,
            punt: false,
        });
        slot.expected += len;
        Ok(RemoteCompletion {
            ring_fd,
            user_data: u64::from(id.0),
        })
    }

    /// Marks `len` bytes planned since as a second copy of the request's
    /// data (a mirrored write): they must complete, but the caller's result
    /// counts the request's bytes once.
    pub(crate) fn add_mirrored(&mut self, id: SlotId, len: u64) {
        self.slots[id.0 as usize].mirrored += len;
    }

    /// Runs `action` when the request's I/O has all succeeded.
    pub(crate) fn add_post(&mut self, id: SlotId, action: PostAction) {
        self.slots[id.0 as usize].post.push(action);
    }

    /// Pushes the planned SQEs; a request with none is ready at once.
    pub(crate) fn commit(&mut self, id: SlotId) -> Result<(), BlockError> {
        let idx = id.0;
        let count = self.slots[idx as usize].subs.len();
        self.slots[idx as usize].pending = count as u32;
        if count == 0 {
            self.ready.push_back(idx);
            return Ok(());
        }
        for i in 0..count {
            if matches!(self.slots[idx as usize].subs[i].kind, SubKind::Remote) {
                // Its CQE comes from the other thread, not from an SQE.
                self.pending_sqes += 1;
                continue;
            }
            let entry = {
                let slot = &self.slots[idx as usize];
                let sub = &slot.subs[i];
                self.stats.sqes += 1;
                self.stats.fixed_file_sqes += u64::from(matches!(sub.file, FileRef::Fixed(_)));
                self.stats.fixed_buffer_sqes += u64::from(sub.buf_index.is_some());
                let entry = build_sqe(sub, &slot.iovs).user_data(u64::from(idx));
                if sub.punt {
                    entry.flags(squeue::Flags::ASYNC)
                } else {
                    entry
                }
            };
            if let Err(err) = self.push_sqe(&entry) {
                // The SQEs already pushed will complete; the rest never will.
                let slot = &mut self.slots[idx as usize];
                slot.error.get_or_insert(err);
                slot.pending -= (count - i) as u32;
                if slot.pending == 0 {
                    self.ready.push_back(idx);
                }
                return Ok(());
            }
            self.pending_sqes += 1;
        }
        Ok(())
    }
}

/// Appends a piece of caller memory to the iovecs of the sub-I/O that
/// starts at `first`, extending the last one when the piece continues it
/// (contiguous guest pages make one segment, so a 64 KiB request is one
/// plain READ instead of a 16-segment READV).
fn push_merged(iovs: &mut Vec<libc::iovec>, first: usize, ptr: *mut u8, n: usize) {
    if iovs.len() > first
        && let Some(last) = iovs.last_mut()
        && (last.iov_base as usize).checked_add(last.iov_len) == Some(ptr as usize)
    {
        last.iov_len += n;
        return;
    }
    iovs.push(libc::iovec {
        iov_base: ptr.cast(),
        iov_len: n,
    });
}

macro_rules! with_target {
    ($file:expr, |$t:ident| $body:expr) => {
        match $file {
            FileRef::Fd(fd) => {
                let $t = types::Fd(fd);
                $body
            }
            FileRef::Fixed(i) => {
                let $t = types::Fixed(i);
                $body
            }
        }
    };
}

fn build_sqe(sub: &Sub, iovs: &[libc::iovec]) -> squeue::Entry {
    let vecs = &iovs[sub.iov_start as usize..(sub.iov_start + sub.iov_count) as usize];
    match (sub.kind, sub.buf_index) {
        (SubKind::Read, Some(index)) => with_target!(sub.file, |t| opcode::ReadFixed::new(
            t,
            vecs[0].iov_base.cast(),
            vecs[0].iov_len as u32,
            index
        )
        .offset(sub.offset)
        .build()),
        (SubKind::Write, Some(index)) => with_target!(sub.file, |t| opcode::WriteFixed::new(
            t,
            vecs[0].iov_base.cast(),
            vecs[0].iov_len as u32,
            index
        )
        .offset(sub.offset)
        .build()),
        // One segment: plain READ/WRITE avoid the kernel's iovec import.
        (SubKind::Read, _) if vecs.len() == 1 => with_target!(sub.file, |t| opcode::Read::new(
            t,
            vecs[0].iov_base.cast(),
            vecs[0].iov_len as u32
        )
        .offset(sub.offset)
        .build()),
        (SubKind::Write, _) if vecs.len() == 1 => with_target!(sub.file, |t| opcode::Write::new(
            t,
            vecs[0].iov_base.cast(),
            vecs[0].iov_len as u32
        )
        .offset(sub.offset)
        .build()),
        (SubKind::Read, _) => with_target!(sub.file, |t| opcode::Readv::new(
            t,
            vecs.as_ptr(),
            vecs.len() as u32
        )
        .offset(sub.offset)
        .build()),
        (SubKind::Write, _) => with_target!(sub.file, |t| opcode::Writev::new(
            t,
            vecs.as_ptr(),
            vecs.len() as u32
        )
        .offset(sub.offset)
        .build()),
        (SubKind::Fsync, _) => with_target!(sub.file, |t| opcode::Fsync::new(t)
            .flags(types::FsyncFlags::DATASYNC)
            .build()),
        (SubKind::Punch, _) => with_target!(sub.file, |t| opcode::Fallocate::new(t, sub.len)
            .offset(sub.offset)
            .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
            .build()),
        // Never built: `commit` skips remote parts.
        (SubKind::Remote, _) => opcode::Nop::new().build(),
    }
}

impl Drop for IoQueue {
    fn drop(&mut self) {
        // The kernel may still write into slot memory (bounce buffers,
        // iovec arrays): wait for every internal SQE before freeing it.
        while self.pending_sqes > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(_) => break,
            }
            self.drain_cq();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_waits_for_its_signal_and_takes_its_outcome() {
        let mut queue = IoQueue::new(4).unwrap();
        let cases = [
            (1, Ok(()), Ok(0)),
            (
                2,
                Err("no space".to_string()),
                Err(BlockError::Metadata("no space".into())),
            ),
        ];
        for (tag, outcome, want) in cases {
            let signal = Signal::new().unwrap();
            let id = queue.begin(tag, &[], false).unwrap();
            queue.add_wait(id, Arc::clone(&signal));
            queue.commit(id).unwrap();
            queue.submit().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            let mut seen = Vec::new();
            let reap = |queue: &mut IoQueue, seen: &mut Vec<(u64, Result<u32, BlockError>)>| {
                queue.reap(|c| match c {
                    Completion::Request { tag, result } => seen.push((tag, result)),
                    other => panic!("unexpected {other:?}"),
                })
            };
            reap(&mut queue, &mut seen);
            assert!(seen.is_empty(), "completed before its signal: {seen:?}");
            std::thread::spawn(move || signal.finish(outcome))
                .join()
                .unwrap();
            while seen.is_empty() {
                queue.submit_and_wait().unwrap();
                reap(&mut queue, &mut seen);
            }
            assert_eq!(seen, [(tag, want)]);
        }
        assert_eq!(queue.in_flight(), 0);
    }
}
