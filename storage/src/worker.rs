//! One worker per channel: the storage data path.
//!
//! The worker owns its channel's rings and its own io_uring ([`IoQueue`]).
//! Each poll-loop iteration it reaps block completions, reads as many
//! requests as it has free slots for, parses each packet into a
//! [`VstorRequest`], lets the channel's [`InitState`] say whether it is
//! valid now (see [`crate::init`] for the answers when it is not), turns
//! each SRB into SCSI execution (immediate data, or block I/O whose iovecs
//! point straight into the guest's pages), submits all SQEs with one
//! `io_uring_enter`, writes 64-byte COMPLETE_IO packets and publishes both
//! ring indices at the end of the pass (and every few requests within it,
//! so that writes completed inline reach the guest while it still polls).
//! Idle (after [`IdleSpin`]'s spin time), it sleeps on its doorbell, its
//! io_uring, its stop token and its controller's LUN change kick at once.
//!
//! The worker knows its controller only through its settings and the
//! shared LUN table ([`crate::luns`]).

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use vhd::{BlockError, Completion, IoQueue, QueueConfig};
use vmbus::channel::{Channel, ChannelWorker, spawn_worker_on};
use vmbus::event::{EventFd, poll_readable};
use vmbus::packet::GpaRanges;
use vmbus::ring::{RingError, WriteError};
use vmbus::server::{ControlHandle, OpenedChannel};
use vmbus::wire::packet_type;
use vmbus::worker::{IdleSpin, StopToken};
use vmbus::{MemoryError, SharedMemory};
use zerocopy::{FromZeros, IntoBytes};

use crate::init::{InitState, Step, Work};
use crate::limit::{self, Charge, LunLimiter};
use crate::luns::{BusChange, Disk, Lun, LunCache, SharedLuns};
use crate::protocol::{
    ChannelProperties, PACKET_SIZE, PacketError, STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL,
    ScsiRequest, VstorPacket, VstorRequest, direction, operation, srb, status,
};
use crate::scsi::dvd::{DvdSession, DvdTarget};
use crate::scsi::{self, BlockOp, Command, Outcome, RESPONSE_BUFFER, Sense, opcode};
use crate::settings::ControllerConfig;
use crate::stats::{IoOp, WorkerIo};
use crate::submit;

/// Block requests one SCSI command may fan out to (UNMAP descriptors,
/// WRITE SAME chunks).
const MAX_FANOUT: u32 = 64;
/// WRITE SAME pattern buffers hold at most this much.
const WRITE_SAME_CHUNK: usize = 64 * 1024;
/// Ring bytes of a completion packet, about (descriptor, vstor packet,
/// trailer): how far `reap` prefetches the outgoing ring per request.
const COMPLETION_PACKET_LEN: usize = 96;
/// Requests read between mid-pass publications (see `read_requests`).
const PUBLISH_EVERY: u32 = 16;

/// Why a worker gave up its channel.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("io_uring: {0}")]
    Io(#[from] std::io::Error),
}

/// Why an SRB's data buffer is refused (INVALID_REQUEST).
#[derive(Debug, thiserror::Error)]
enum BufferError {
    #[error("GPA ranges malformed")]
    Ranges,
    #[error("transfer of {0} bytes is longer than its ranges or the controller's maximum")]
    TooLong(u32),
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// A worker's io_uring, sized for the queue depth (validated by the
/// controller) plus the fan-out of one command.
fn new_queue(depth: u32) -> std::io::Result<IoQueue> {
    IoQueue::with_config(QueueConfig {
        slots: depth + MAX_FANOUT,
        ring_entries: (depth + MAX_FANOUT).next_power_of_two().min(4096),
        ..QueueConfig::default()
    })
}

/// Runs a worker on the calling thread until it has nothing left to do
/// (every readable request answered, no I/O in flight). For harnesses.
pub(crate) fn run_until_idle(shared: Shared, ch: OpenedChannel) -> Result<(), WorkerError> {
    let queue = new_queue(shared.config.queue_depth)?;
    let kick = Arc::new(EventFd::new()?);
    let mut w = Worker::new(shared, ch, queue, kick, StopToken::new()?);
    loop {
        if !w.iterate()? {
            if w.queue.in_flight() == 0 && w.paused_until.is_none() {
                return Ok(());
            }
            if w.queue.in_flight() > 0 {
                w.queue.submit_and_wait()?;
            } else {
                w.sleep()?;
            }
        }
    }
}

/// What every channel worker of a controller shares.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    pub config: ControllerConfig,
    pub luns: Arc<SharedLuns>,
    pub limiter: Option<Arc<LunLimiter>>,
}

/// Starts the worker of an opened channel.
pub(crate) fn start(shared: Shared, ch: OpenedChannel) -> std::io::Result<Box<dyn ChannelWorker>> {
    let queue = new_queue(shared.config.queue_depth)?;
    let kick = Arc::new(EventFd::new()?);
    shared.luns.register_kick(&kick);
    let name = format!("scsi-{}-{}", shared.config.name, ch.relid);
    let cpu = vmbus::cpu::nth(&shared.config.cpus, ch.subchannel_index.into());
    spawn_worker_on(name, cpu, vmbus::ThreadKind::StorageWorker, move |stop| {
        let control = ch.control.clone();
        let mut worker = Worker::new(shared, ch, queue, kick, stop);
        if let Err(e) = worker.run() {
            control.reset(e.to_string());
        }
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplyKind {
    Completion,
    Unsolicited,
}

/// Where an SRB's data is: GPA-direct ranges (parsed or not), or none.
#[derive(Debug, Clone, Copy)]
struct DataRanges {
    gpa: bool,
    parsed: bool,
}

/// How a command ends.
#[derive(Debug, Clone, Copy)]
enum End {
    /// The request itself was bad: this SRB status, no data, no sense.
    Refused(u8),
    /// CHECK CONDITION with this sense.
    Sense(Sense),
    /// As its execution left it: the first failure's sense, or success
    /// with the bytes recorded.
    Settled,
}

/// One SCSI command in flight.
#[derive(Debug)]
struct Slot {
    txid: u64,
    srb: ScsiRequest,
    /// Block requests of this command still outstanding. A command may fan
    /// out to several (UNMAP descriptors, WRITE SAME chunks), each with its
    /// own count of SQEs in the IoQueue's slots; this count is the
    /// command's, and it completes when the last of its requests does.
    pending: u32,
    /// Bytes to report on success.
    bytes: u32,
    /// The command writes: a failure that names no cause is a WRITE
    /// ERROR rather than an UNRECOVERED READ ERROR.
    writes: bool,
    sense: Option<Sense>,
    /// WRITE SAME pattern (allocated on first use, then reused).
    pattern: Vec<u8>,
}

impl Slot {
    fn new() -> Self {
        Slot {
            txid: 0,
            srb: ScsiRequest::new_zeroed(),
            pending: 0,
            bytes: 0,
            writes: false,
            sense: None,
            pattern: Vec::new(),
        }
    }

    fn start(&mut self, txid: u64, srb: ScsiRequest) {
        self.txid = txid;
        self.srb = srb;
        self.pending = 0;
        self.bytes = 0;
        self.writes = false;
        self.sense = None;
    }

    /// Counts a submitted block request, or records why it was refused.
    fn account(&mut self, submitted: Result<(), BlockError>) {
        match submitted {
            Ok(()) => self.pending += 1,
            Err(e) => {
                tracing::warn!("block request refused: {e}");
                self.fail(&e);
            }
        }
    }

    /// Records a failed block request; the first failure's sense is kept.
    fn fail(&mut self, e: &BlockError) {
        self.sense
            .get_or_insert(Sense::of_block_error(e, self.writes));
    }

    /// Fills in the SRB's status, sense and length for `end`.
    fn conclude(&mut self, end: End) {
        match (end, self.sense) {
            (End::Refused(status), _) => {
                self.srb.srb_status = status;
                self.srb.scsi_status = scsi::status::GOOD;
                self.bytes = 0;
            }
            (End::Sense(sense), _) | (End::Settled, Some(sense)) => self.set_sense(sense),
            (End::Settled, None) => {
                self.srb.srb_status = srb::SUCCESS;
                self.srb.scsi_status = scsi::status::GOOD;
            }
        }
        self.srb.data_transfer_length = self.bytes.into();
    }

    fn set_sense(&mut self, sense: Sense) {
        self.srb.srb_status = srb::ERROR | srb::AUTOSENSE_VALID;
        self.srb.scsi_status = scsi::status::CHECK_CONDITION;
        self.bytes = 0;
        let fixed = sense.fixed();
        let n = (self.srb.sense_info_length as usize)
            .clamp(1, fixed.len())
            .min(self.srb.cdb_or_sense.len());
        self.srb.cdb_or_sense = [0; crate::protocol::SENSE_BUFFER_SIZE];
        self.srb.cdb_or_sense[..n].copy_from_slice(&fixed[..n]);
        self.srb.sense_info_length = n as u8;
    }
}

struct Worker {
    config: ControllerConfig,
    /// What QUERY_PROPERTIES answers.
    properties: ChannelProperties,
    state: InitState,
    ch: Channel,
    queue: IoQueue,
    memory: SharedMemory,
    control: ControlHandle,
    primary: bool,
    /// Signalled when the controller's LUN table changes.
    lun_change: Arc<EventFd>,
    shared_luns: Arc<SharedLuns>,
    luns: LunCache,
    dvd: BTreeMap<u8, DvdSession<Disk>>,
    slots: Vec<Slot>,
    free: Vec<u32>,
    ranges: GpaRanges,
    /// (GPA, length) pieces of the current request's buffer.
    segs: Vec<(u64, usize)>,
    iov: Vec<libc::iovec>,
    /// Response data a target builds (INQUIRY, MODE SENSE, ...).
    response: Vec<u8>,
    /// Parameter data a guest sends with UNMAP and MODE SELECT.
    params: Vec<u8>,
    outbox: VecDeque<(u64, ReplyKind, VstorPacket)>,
    /// Slots whose block requests all finished in the last reap.
    done: Vec<u32>,
    /// The controller's per-LUN caps, when it has any.
    limiter: Option<Arc<LunLimiter>>,
    /// A cap is in debt: no requests are read before this instant.
    paused_until: Option<Instant>,
    /// This worker's I/O counters (metrics).
    io: WorkerIo,
}

/// The QUERY_PROPERTIES answer for a controller.
fn channel_properties(c: &ControllerConfig) -> ChannelProperties {
    let mut p = ChannelProperties::new_zeroed();
    p.max_channel_count = c.max_subchannels.into();
    if c.max_subchannels > 0 {
        p.flags = STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL.into();
    }
    p.max_transfer_bytes = c.max_transfer.into();
    p
}

impl Worker {
    fn new(
        shared: Shared,
        ch: OpenedChannel,
        queue: IoQueue,
        lun_change: Arc<EventFd>,
        stop: StopToken,
    ) -> Worker {
        let Shared {
            config,
            luns: shared_luns,
            limiter,
        } = shared;
        let depth = config.queue_depth;
        let (ch, context) = ch.into_channel(stop);
        let primary = context.subchannel_index == 0;
        Worker {
            properties: channel_properties(&config),
            state: InitState::for_channel(primary),
            config,
            primary,
            memory: context.memory,
            control: context.control,
            ch,
            queue,
            lun_change,
            luns: LunCache::new(&shared_luns, primary),
            io: WorkerIo::new(shared_luns.stats.clone(), depth),
            shared_luns,
            dvd: BTreeMap::new(),
            slots: (0..depth).map(|_| Slot::new()).collect(),
            free: (0..depth).rev().collect(),
            ranges: GpaRanges::new(),
            segs: Vec::with_capacity(64),
            iov: Vec::with_capacity(64),
            response: vec![0; RESPONSE_BUFFER],
            params: vec![0; RESPONSE_BUFFER],
            outbox: VecDeque::with_capacity(depth as usize + 8),
            done: Vec::with_capacity(depth as usize),
            limiter,
            paused_until: None,
        }
    }

    fn run(&mut self) -> Result<(), WorkerError> {
        let mut idle = IdleSpin::new(self.config.spin);
        while !self.ch.stop_token().is_stopped() {
            if idle.keep_polling(self.iterate()?) {
                continue;
            }
            self.sleep()?;
        }
        self.drain_in_flight()
    }

    /// One poll-loop pass; true if anything happened.
    fn iterate(&mut self) -> Result<bool, WorkerError> {
        self.io.tick();
        let mut progress = self.reap() > 0;
        progress |= self.drain_outbox()?;
        progress |= self.read_requests()?;
        self.queue.submit()?;
        self.io.tick();
        // Page-cache hits complete during the submission: report them in
        // this pass rather than behind the next batch's I/O.
        progress |= self.reap() > 0;
        progress |= self.drain_outbox()?;
        self.ch.flush()?;
        Ok(progress)
    }

    /// Waits for every block request to finish: their iovecs point into
    /// guest memory, which must stay mapped until the kernel is done.
    fn drain_in_flight(&mut self) -> Result<(), WorkerError> {
        while self.queue.in_flight() > 0 {
            self.queue.submit_and_wait()?;
            self.io.tick();
            self.reap();
        }
        Ok(())
    }

    fn can_accept(&mut self) -> bool {
        !self.paused()
            && !self.free.is_empty()
            && self.outbox.is_empty()
            && self.queue.free_slots() >= MAX_FANOUT as usize
    }

    /// Whether a LUN cap keeps this channel from reading requests now
    /// (clears the pause once it is over).
    fn paused(&mut self) -> bool {
        match self.paused_until {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                self.paused_until = None;
                false
            }
            None => false,
        }
    }

    /// Charges a submitted read or write to its LUN's cap.
    fn charge(&mut self, lun: u8, bytes: u32) {
        if let Some(limiter) = &self.limiter
            && let Charge::Pause(until) = limiter.charge(lun, bytes)
        {
            self.paused_until = Some(until);
            self.io.throttled(lun);
        }
    }

    fn sleep(&mut self) -> Result<(), WorkerError> {
        // Paused by a cap: sleep until the pause ends (or I/O completes);
        // the guest's doorbell stays masked, its requests wait in the ring.
        let timeout = self.paused_until.map(limit::sleep_for);
        let may_sleep = if timeout.is_some() {
            true
        } else if self.can_accept() {
            self.ch.prepare_sleep()?
        } else if self.outbox.is_empty() {
            true // out of slots: block completions wake us
        } else {
            self.ch.prepare_sleep_for_space(PACKET_SIZE)?
        };
        if !may_sleep {
            return Ok(());
        }
        // A paused channel does not listen to its doorbell.
        let doorbell = if timeout.is_some() {
            self.ch.stop_token().event().as_fd()
        } else {
            self.ch.doorbell().as_fd()
        };
        let [_, _, changed, _] = poll_readable(
            [
                doorbell,
                self.ch.stop_token().event().as_fd(),
                self.lun_change.as_fd(),
                self.queue.as_fd(),
            ],
            timeout,
        );
        self.ch.woke();
        if changed {
            self.lun_change.consume();
            self.refresh_luns(false);
        }
        Ok(())
    }

    /// Picks up a LUN table change (one atomic load when there is none).
    /// A primary channel then tells its guest to rescan, once per change,
    /// whether the change was seen through a command or through the kick,
    /// once its guest scans ([`LunCache::refresh`]).
    fn refresh_luns(&mut self, command: bool) {
        let Some(change) = self.luns.refresh(&self.shared_luns, command) else {
            return;
        };
        if !self.primary {
            return;
        }
        let op = match change {
            BusChange::Removed => operation::REMOVE_DEVICE,
            BusChange::Added => operation::ENUMERATE_BUS,
            BusChange::Replaced => return,
        };
        self.outbox.push_back((
            0,
            ReplyKind::Unsolicited,
            VstorPacket::new(op, status::SUCCESS),
        ));
    }

    /// Writes queued replies to the ring; true if any went out.
    fn drain_outbox(&mut self) -> Result<bool, WorkerError> {
        let mut wrote = false;
        while let Some((txid, kind, packet)) = self.outbox.front() {
            let r = match kind {
                ReplyKind::Completion => {
                    self.ch.outgoing.write_completion(*txid, packet.as_bytes())
                }
                ReplyKind::Unsolicited => {
                    self.ch
                        .outgoing
                        .write_inband(*txid, false, packet.as_bytes())
                }
            };
            match r {
                Ok(()) => {
                    self.outbox.pop_front();
                    wrote = true;
                }
                Err(WriteError::Full { .. }) => break,
                Err(WriteError::Ring(e)) => return Err(e.into()),
            }
        }
        Ok(wrote)
    }

    /// Reads requests while there is room to run them. Every
    /// [`PUBLISH_EVERY`] requests it submits them and publishes what has
    /// finished meanwhile, so the guest works on those completions while
    /// this worker runs the rest of a deep batch: page-cache reads and
    /// inline writes finish at 1-2 us each, and handing a 32-deep batch
    /// back only whole made worker and guest take turns instead.
    fn read_requests(&mut self) -> Result<bool, WorkerError> {
        let mut read = 0u32;
        while self.can_accept() {
            if read > 0 && read.is_multiple_of(PUBLISH_EVERY) {
                self.queue.submit()?;
                self.io.tick();
                self.reap();
                self.drain_outbox()?;
                self.ch.flush()?;
            }
            let Some(p) = self.ch.incoming.read()? else {
                break;
            };
            read += 1;
            let txid = p.desc.transaction_id;
            let kind = p.desc.packet_type;
            let payload = p.payload();
            let mut raw = [0u8; PACKET_SIZE];
            let n = payload.len().min(PACKET_SIZE);
            payload.read_at(0, &mut raw[..n]).expect("within payload");
            let gpa = kind == packet_type::DATA_USING_GPA_DIRECT;
            let data = DataRanges {
                gpa,
                parsed: !gpa || self.ranges.parse(&p).is_ok(),
            };
            let len = payload.len();
            match VstorRequest::parse(&raw[..n], kind) {
                Ok(request) => self.handle(txid, request, data),
                Err(PacketError::Completion) => {}
                Err(e) => {
                    tracing::debug!(len, "not a vstor request: {e}");
                    self.reply_status(txid, status::INVALID_PARAMETER);
                }
            }
        }
        Ok(read > 0)
    }

    fn reply(&mut self, txid: u64, packet: VstorPacket) {
        self.outbox.push_back((txid, ReplyKind::Completion, packet));
    }

    fn reply_status(&mut self, txid: u64, status: u32) {
        self.reply(txid, VstorPacket::new(operation::COMPLETE_IO, status));
    }

    fn handle(&mut self, txid: u64, request: VstorRequest, data: DataRanges) {
        match self.state.step(request, &self.properties) {
            Step::Answer(packet) => self.reply(txid, packet),
            Step::Run(Work::ExecuteSrb(srb)) => self.execute_srb(txid, srb, data),
            Step::Run(Work::CreateSubChannels(count)) => self.create_subchannels(txid, count),
            Step::Run(Work::Reset) => self.reply_status(txid, status::SUCCESS),
        }
    }

    fn create_subchannels(&mut self, txid: u64, count: u16) {
        let count = count.min(self.config.max_subchannels);
        if !self.primary || count == 0 {
            return self.reply_status(txid, status::INVALID_PARAMETER);
        }
        self.control.offer_subchannels(count);
        self.reply_status(txid, status::SUCCESS);
    }

    fn execute_srb(&mut self, txid: u64, srb_in: ScsiRequest, data: DataRanges) {
        let Some(slot) = self.free.pop() else {
            unreachable!("read only with a free slot")
        };
        self.slots[slot as usize].start(txid, srb_in);
        let cdb_len = srb_in.cdb_length as usize;
        if cdb_len == 0 || cdb_len > 16 {
            return self.finish(slot, End::Refused(srb::INVALID_REQUEST));
        }
        let mut cdb = [0u8; 16];
        cdb[..cdb_len].copy_from_slice(&srb_in.cdb_or_sense[..cdb_len]);
        if scsi::cdb_length(cdb[0]) > cdb_len {
            return self.finish(slot, End::Refused(srb::INVALID_REQUEST));
        }
        let data_len = match self.data_buffer(&srb_in, data) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!("SRB data buffer refused: {e}");
                return self.finish(slot, End::Refused(srb::INVALID_REQUEST));
            }
        };
        self.refresh_luns(true);
        let addressed = srb_in.path_id == 0 && srb_in.target_id == 0;
        if cdb[0] == opcode::REPORT_LUNS {
            let luns = if addressed {
                self.luns.numbers()
            } else {
                Vec::new()
            };
            let outcome = scsi::report_luns(&mut self.response, &luns);
            return self.apply(slot, outcome, data_len, None);
        }
        let lun = if addressed {
            self.luns.take(srb_in.lun)
        } else {
            None
        };
        let Some(lun) = lun else {
            if cdb[0] == opcode::INQUIRY {
                let outcome = scsi::inquiry_no_lun(&mut self.response);
                return self.apply(slot, outcome, data_len, None);
            }
            return self.finish(slot, End::Refused(srb::INVALID_LUN));
        };
        self.io.addressed(slot, srb_in.lun);
        self.execute_on(slot, &lun, &cdb[..cdb_len], data_len);
        self.luns.put(srb_in.lun, lun);
    }

    /// Runs a CDB against the LUN it addresses.
    fn execute_on(&mut self, slot: u32, lun: &Lun, cdb: &[u8], data_len: u32) {
        let data_out = self.read_parameters(cdb[0], data_len);
        let cmd = Command {
            cdb,
            data_len,
            data_out: &self.params[..data_out],
        };
        let out = &mut self.response[..];
        match lun {
            Lun::Disk { target, device } => {
                let outcome = target.execute(&cmd, out);
                self.apply(slot, outcome, data_len, Some(device));
            }
            Lun::Dvd { drive } => {
                let lun_number = self.slots[slot as usize].srb.lun;
                let session = self
                    .dvd
                    .entry(lun_number)
                    .or_insert_with(|| DvdSession::new(drive));
                let outcome = DvdTarget.execute(drive, session, &cmd, out);
                let media = session.media().cloned();
                self.apply(slot, outcome, data_len, media.as_ref());
            }
        }
    }

    /// Resolves the guest's buffer into `segs` (every piece checked to lie
    /// in guest memory: `submit_io` relies on it); returns its length.
    fn data_buffer(&mut self, srb_in: &ScsiRequest, data: DataRanges) -> Result<u32, BufferError> {
        self.segs.clear();
        if !data.parsed {
            return Err(BufferError::Ranges);
        }
        // No-data commands (in-band, or data_in NONE) may carry a stale
        // transfer length or page list: trust the packet type and data_in.
        if !data.gpa || srb_in.data_in == direction::NONE {
            return Ok(0);
        }
        let len = srb_in.data_transfer_length.get();
        if u64::from(len) > self.ranges.total_bytes() || len > self.config.max_transfer {
            return Err(BufferError::TooLong(len));
        }
        let mut left = len as usize;
        let memory = &self.memory;
        let segs = &mut self.segs;
        self.ranges.for_each_gpa(|gpa, n| {
            if left == 0 {
                return Ok(());
            }
            let n = n.min(left);
            memory.slice(gpa, n)?;
            segs.push((gpa, n));
            left -= n;
            Ok::<(), MemoryError>(())
        })?;
        Ok(len)
    }

    /// Copies a data-out parameter list (UNMAP, MODE SELECT) out of guest
    /// memory.
    fn read_parameters(&mut self, opcode: u8, data_len: u32) -> usize {
        if !scsi::has_parameter_list(opcode) {
            return 0;
        }
        let want = (data_len as usize).min(self.params.len());
        copy_from_guest(&self.memory, &self.segs, &mut self.params[..want])
    }

    /// Carries out what the target decided.
    fn apply(&mut self, slot: u32, outcome: Outcome, data_len: u32, device: Option<&Disk>) {
        match outcome {
            Outcome::Good => self.finish(slot, End::Settled),
            Outcome::DataIn(n) => self.data_in(slot, n, data_len),
            Outcome::Check(sense) => self.finish(slot, End::Sense(sense)),
            Outcome::Io { op, lba, blocks } => {
                if let Some(device) = self.medium(slot, device) {
                    self.submit_io(slot, device, op, lba, blocks, data_len);
                }
            }
            Outcome::Discard(ranges) => {
                if let Some(device) = self.medium(slot, device) {
                    self.discard(slot, device, ranges);
                }
            }
            Outcome::WriteSame { lba, blocks } => {
                if let Some(device) = self.medium(slot, device) {
                    self.write_same(slot, device, lba, blocks, data_len);
                }
            }
        }
    }

    /// The device block I/O goes to; without one (a DVD drive without
    /// media) the command ends with MEDIUM NOT PRESENT.
    fn medium<'d>(&mut self, slot: u32, device: Option<&'d Disk>) -> Option<&'d Disk> {
        if device.is_none() {
            self.finish(slot, End::Sense(Sense::MEDIUM_NOT_PRESENT));
        }
        device
    }

    fn discard(&mut self, slot: u32, device: &Disk, ranges: Vec<(u64, u32)>) {
        self.slots[slot as usize].writes = true;
        self.io.start(slot, IoOp::Unmap, 0);
        for (lba, blocks) in ranges {
            let req = vhd::Request::discard(lba, blocks, u64::from(slot));
            self.push(slot, device, req);
        }
        self.settle(slot);
    }

    /// Copies response data to a read's buffer and finishes.
    fn data_in(&mut self, slot: u32, n: usize, data_len: u32) {
        let s = &mut self.slots[slot as usize];
        s.bytes = if s.srb.data_in == direction::READ {
            let n = n.min(data_len as usize);
            copy_to_guest(&self.memory, &self.segs, &self.response[..n]) as u32
        } else {
            0
        };
        self.finish(slot, End::Settled);
    }

    fn submit_io(
        &mut self,
        slot: u32,
        device: &Disk,
        op: BlockOp,
        lba: u64,
        blocks: u32,
        data_len: u32,
    ) {
        let dir = self.slots[slot as usize].srb.data_in;
        let ok_dir = match op {
            BlockOp::Read => dir == direction::READ,
            BlockOp::Write => dir == direction::WRITE,
            BlockOp::Flush => true,
        };
        if !ok_dir {
            return self.finish(slot, End::Refused(srb::INVALID_REQUEST));
        }
        let s = &mut self.slots[slot as usize];
        s.writes = op == BlockOp::Write;
        s.bytes = if op == BlockOp::Flush { 0 } else { data_len };
        self.io.start(slot, op.into(), s.bytes);
        if op == BlockOp::Flush {
            self.push(slot, device, vhd::Request::flush(u64::from(slot)));
            return self.settle(slot);
        }
        self.iov.clear();
        for &(gpa, n) in &self.segs {
            let slice = self.memory.slice(gpa, n).expect("checked in data_buffer");
            self.iov.push(libc::iovec {
                iov_base: slice.as_ptr().cast(),
                iov_len: n,
            });
        }
        let vop = if op == BlockOp::Read {
            vhd::Op::Read
        } else {
            vhd::Op::Write
        };
        self.charge(self.slots[slot as usize].srb.lun, data_len);
        let r = submit::guest_io(
            &mut self.queue,
            &**device,
            vop,
            lba,
            blocks,
            &self.iov,
            u64::from(slot),
        );
        self.slots[slot as usize].account(r);
        self.settle(slot);
    }

    fn write_same(&mut self, slot: u32, device: &Disk, lba: u64, blocks: u32, data_len: u32) {
        let bs = data_len as usize;
        if bs > self.response.len()
            || copy_from_guest(&self.memory, &self.segs, &mut self.response[..bs]) != bs
        {
            return self.finish(slot, End::Refused(srb::INVALID_REQUEST));
        }
        let block = &self.response[..bs];
        let per_chunk = (WRITE_SAME_CHUNK / bs).max(1) as u32;
        let s = &mut self.slots[slot as usize];
        s.writes = true;
        self.io.start(slot, IoOp::WriteSame, 0);
        let copies = per_chunk.min(blocks) as usize;
        s.pattern.clear();
        for _ in 0..copies {
            s.pattern.extend_from_slice(block);
        }
        let base = s.pattern.as_ptr();
        let mut done = 0u32;
        while done < blocks {
            let n = per_chunk.min(blocks - done);
            let iov = [libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: n as usize * bs,
            }];
            let r = submit::pattern_write(
                &mut self.queue,
                &**device,
                lba + u64::from(done),
                n,
                &iov,
                u64::from(slot),
            );
            self.slots[slot as usize].account(r);
            done += n;
        }
        self.settle(slot);
    }

    fn push(&mut self, slot: u32, device: &Disk, req: vhd::Request<'_>) {
        let r = device.submit(&mut self.queue, req);
        self.slots[slot as usize].account(r);
    }

    /// Finishes a command whose block requests are all submitted, if none
    /// is still outstanding (else the last completion finishes it).
    fn settle(&mut self, slot: u32) {
        if self.slots[slot as usize].pending == 0 {
            self.finish(slot, End::Settled);
        }
    }

    /// Handles finished block requests; returns how many.
    fn reap(&mut self) -> usize {
        let slots = &mut self.slots;
        let done = &mut self.done;
        done.clear();
        let n = self.queue.reap(|c| {
            if let Completion::Request { tag, result } = c {
                let Some(s) = slots.get_mut(tag as usize) else {
                    return;
                };
                s.pending = s.pending.saturating_sub(1);
                if let Err(e) = result {
                    tracing::warn!("block I/O failed: {e}");
                    s.fail(&e);
                }
                if s.pending == 0 {
                    done.push(tag as u32);
                }
            }
        });
        self.ch
            .outgoing
            .prefetch_next(self.done.len() * COMPLETION_PACKET_LEN);
        for i in 0..self.done.len() {
            let slot = self.done[i];
            self.finish(slot, End::Settled);
        }
        n
    }

    /// The one way a command ends: its COMPLETE_IO is queued and its slot
    /// freed.
    fn finish(&mut self, slot: u32, end: End) {
        let s = &mut self.slots[slot as usize];
        s.conclude(end);
        self.io.finish(slot, &s.srb);
        let mut reply = VstorPacket::new(operation::COMPLETE_IO, status::SUCCESS);
        reply.set_srb(&s.srb);
        let txid = s.txid;
        self.outbox.push_back((txid, ReplyKind::Completion, reply));
        self.free.push(slot);
    }
}

/// Copies `data` into the guest pieces; returns bytes copied.
fn copy_to_guest(memory: &SharedMemory, segs: &[(u64, usize)], data: &[u8]) -> usize {
    let mut at = 0;
    for &(gpa, n) in segs {
        if at == data.len() {
            break;
        }
        let n = n.min(data.len() - at);
        let Ok(s) = memory.slice(gpa, n) else { break };
        if s.write_at(0, &data[at..at + n]).is_err() {
            break;
        }
        at += n;
    }
    at
}

/// Fills `buf` from the guest pieces; returns bytes copied.
fn copy_from_guest(memory: &SharedMemory, segs: &[(u64, usize)], buf: &mut [u8]) -> usize {
    let mut at = 0;
    for &(gpa, n) in segs {
        if at == buf.len() {
            break;
        }
        let n = n.min(buf.len() - at);
        let Ok(s) = memory.slice(gpa, n) else { break };
        if s.read_at(0, &mut buf[at..at + n]).is_err() {
            break;
        }
        at += n;
    }
    at
}
