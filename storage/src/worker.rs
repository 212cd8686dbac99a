//! One worker per channel: the storage data path.
//!
//! The worker owns its channel's rings and its own io_uring ([`IoQueue`]).
//! Each poll-loop iteration it reaps block completions, reads as many
//! requests as it has free slots for, turns each SRB into SCSI execution
//! (immediate data, or block I/O whose iovecs point straight into the
//! guest's pages), submits all SQEs with one `io_uring_enter`, writes
//! 64-byte COMPLETE_IO packets and publishes both ring indices once. Idle,
//! it sleeps on its doorbell, its io_uring, its stop token and its
//! controller's kick (LUN hot add/remove) at once.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use vhd::{Completion, IoQueue, QueueConfig};
use vmbus::SharedMemory;
use vmbus::channel::{Channel, ChannelWorker, StopToken, spawn_worker_on};
use vmbus::event::{EventFd, poll_readable};
use vmbus::packet::GpaRanges;
use vmbus::ring::{RingError, WriteError};
use vmbus::server::{ControlHandle, OpenedChannel};
use vmbus::wire::packet_type;
use zerocopy::IntoBytes;

use crate::controller::{BusChange, Controller, Disk, Lun, LunTable, block_error_sense};
use crate::protocol::{
    ChannelProperties, MIN_PACKET_SIZE, PACKET_SIZE, ProtocolVersion,
    STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL, SUPPORTED_VERSIONS, ScsiRequest, VstorPacket,
    direction, operation, srb, status,
};
use crate::scsi::dvd::{DvdSession, DvdTarget};
use crate::scsi::{self, BlockOp, Command, Outcome, RESPONSE_BUFFER, Sense, opcode};
use crate::submit;

/// Block requests one SCSI command may fan out to (UNMAP descriptors,
/// WRITE SAME chunks).
const MAX_FANOUT: u32 = 64;
/// WRITE SAME pattern buffers hold at most this much.
const WRITE_SAME_CHUNK: usize = 64 * 1024;

/// Why a worker gave up its channel.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("io_uring: {0}")]
    Io(#[from] std::io::Error),
}

/// A worker's io_uring, sized for the controller's queue depth plus the
/// fan-out of one command; returns it with the depth.
fn new_queue(controller: &Controller) -> std::io::Result<(IoQueue, u32)> {
    let depth = controller.config.queue_depth.clamp(1, 4096);
    let queue = IoQueue::with_config(QueueConfig {
        slots: depth + MAX_FANOUT,
        ring_entries: (depth + MAX_FANOUT).next_power_of_two().min(4096),
        ..QueueConfig::default()
    })?;
    Ok((queue, depth))
}

/// Runs a worker on the calling thread until it has nothing left to do
/// (every readable request answered, no I/O in flight). For harnesses.
pub fn run_until_idle(controller: Controller, ch: OpenedChannel) -> Result<(), WorkerError> {
    let (queue, depth) = new_queue(&controller)?;
    let kick = Arc::new(EventFd::new()?);
    let stop = StopToken::new()?;
    let mut w = Worker::new(controller, ch, queue, kick, stop, depth);
    loop {
        if !w.iterate()? {
            if w.queue.in_flight() == 0 {
                return Ok(());
            }
            w.queue.submit_and_wait()?;
        }
    }
}

/// Starts the worker of an opened channel.
pub(crate) fn start(
    controller: Controller,
    ch: OpenedChannel,
) -> std::io::Result<Box<dyn ChannelWorker>> {
    let (queue, depth) = new_queue(&controller)?;
    let kick = Arc::new(EventFd::new()?);
    controller.register_kick(&kick);
    let name = format!("scsi-{}-{}", controller.config.name, ch.relid);
    let cpu = vmbus::cpu::nth(&controller.config.cpus, ch.subchannel_index.into());
    spawn_worker_on(name, cpu, vmbus::ThreadKind::StorageWorker, move |stop| {
        let control = ch.control.clone();
        let mut worker = Worker::new(controller, ch, queue, kick, stop, depth);
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

/// One SCSI command in flight.
#[derive(Debug)]
struct Slot {
    txid: u64,
    srb: ScsiRequest,
    /// Block requests still outstanding.
    pending: u32,
    /// Bytes to report on success.
    bytes: u32,
    write: bool,
    sense: Option<Sense>,
    /// WRITE SAME pattern (allocated on first use, then reused).
    pattern: Vec<u8>,
}

struct Worker {
    controller: Controller,
    ch: Channel,
    queue: IoQueue,
    memory: SharedMemory,
    control: ControlHandle,
    primary: bool,
    kick: Arc<EventFd>,
    generation: u64,
    table: Arc<LunTable>,
    /// This worker's copy of the table's LUNs, indexed by LUN: a command
    /// borrows its LUN from here (no shared reference count touched).
    luns: Vec<Option<Arc<Lun>>>,
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
}

impl Worker {
    fn new(
        controller: Controller,
        ch: OpenedChannel,
        queue: IoQueue,
        kick: Arc<EventFd>,
        stop: StopToken,
        depth: u32,
    ) -> Worker {
        let (generation, table, _) = controller.snapshot();
        let slots = (0..depth)
            .map(|_| Slot {
                txid: 0,
                srb: <ScsiRequest as zerocopy::FromZeros>::new_zeroed(),
                pending: 0,
                bytes: 0,
                write: false,
                sense: None,
                pattern: Vec::new(),
            })
            .collect();
        Worker {
            primary: ch.subchannel_index == 0,
            memory: ch.memory,
            control: ch.control,
            ch: Channel::new(
                ch.incoming,
                ch.outgoing,
                ch.signals.doorbell,
                ch.signals.notify,
                stop,
            ),
            controller,
            queue,
            kick,
            generation,
            luns: lun_slots(&table),
            table,
            dvd: BTreeMap::new(),
            slots,
            free: (0..depth).rev().collect(),
            ranges: GpaRanges::new(),
            segs: Vec::with_capacity(64),
            iov: Vec::with_capacity(64),
            response: vec![0; RESPONSE_BUFFER],
            params: vec![0; RESPONSE_BUFFER],
            outbox: VecDeque::with_capacity(depth as usize + 8),
            done: Vec::with_capacity(depth as usize),
        }
    }

    fn run(&mut self) -> Result<(), WorkerError> {
        let spin = self.controller.config.spin;
        let mut idle_since: Option<Instant> = None;
        while !self.ch.stop_token().is_stopped() {
            if self.iterate()? {
                idle_since = None;
                continue;
            }
            // Poll a little longer before paying for a sleep and a wake-up.
            if idle_since.get_or_insert_with(Instant::now).elapsed() < spin {
                std::hint::spin_loop();
                continue;
            }
            idle_since = None;
            self.sleep()?;
        }
        self.drain_in_flight()
    }

    /// One poll-loop pass; true if anything happened.
    fn iterate(&mut self) -> Result<bool, WorkerError> {
        let mut progress = self.reap() > 0;
        progress |= self.drain_outbox()?;
        progress |= self.read_requests()?;
        self.queue.submit()?;
        progress |= self.drain_outbox()?;
        self.ch.flush()?;
        Ok(progress)
    }

    /// Waits for every block request to finish: their iovecs point into
    /// guest memory, which must stay mapped until the kernel is done.
    fn drain_in_flight(&mut self) -> Result<(), WorkerError> {
        while self.queue.in_flight() > 0 {
            self.queue.submit_and_wait()?;
            self.reap();
        }
        Ok(())
    }

    fn can_accept(&self) -> bool {
        !self.free.is_empty()
            && self.outbox.is_empty()
            && self.queue.free_slots() >= MAX_FANOUT as usize
    }

    fn sleep(&mut self) -> Result<(), WorkerError> {
        if self.can_accept() {
            if !self.ch.prepare_sleep()? {
                return Ok(());
            }
        } else if let Some((_, _, p)) = self.outbox.front() {
            let needed = (16 + p.as_bytes().len() + 8) as u32;
            if self.ch.outgoing.request_space(needed)? {
                return Ok(());
            }
        }
        let [_, _, kicked, _] = poll_readable(
            [
                self.ch.doorbell().as_fd(),
                self.ch.stop_token().event().as_fd(),
                self.kick.as_fd(),
                self.queue.as_fd(),
            ],
            None,
        );
        self.ch.woke();
        if kicked {
            self.kick.consume();
            self.refresh_table();
        }
        Ok(())
    }

    /// Picks up a LUN table change (one atomic load when there is none).
    /// A primary channel then tells its guest to rescan, once per change,
    /// whether the change was seen through a command or through the kick.
    fn refresh_table(&mut self) {
        if self.controller.generation() == self.generation {
            return;
        }
        let (generation, table, change) = self.controller.snapshot();
        self.generation = generation;
        self.luns = lun_slots(&table);
        self.table = table;
        if !self.primary {
            return;
        }
        let op = match change {
            Some(BusChange::Removed) => operation::REMOVE_DEVICE,
            _ => operation::ENUMERATE_BUS,
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

    /// Reads requests while there is room to run them.
    fn read_requests(&mut self) -> Result<bool, WorkerError> {
        let mut any = false;
        while self.can_accept() {
            let Some(p) = self.ch.incoming.read()? else {
                break;
            };
            any = true;
            let txid = p.desc.transaction_id;
            let kind = p.desc.packet_type;
            let payload = p.payload();
            let mut raw = [0u8; PACKET_SIZE];
            let n = payload.len().min(PACKET_SIZE);
            payload.read_at(0, &mut raw[..n]).expect("within payload");
            let gpa = kind == packet_type::DATA_USING_GPA_DIRECT;
            let ranges_ok = !gpa || self.ranges.parse(&p).is_ok();
            match kind {
                packet_type::COMPLETION => continue,
                packet_type::DATA_INBAND | packet_type::DATA_USING_GPA_DIRECT => {}
                _ => {
                    self.reply_status(txid, status::INVALID_PARAMETER);
                    continue;
                }
            }
            if n < MIN_PACKET_SIZE {
                tracing::warn!(len = n, "short vstor packet");
                self.reply_status(txid, status::INVALID_PARAMETER);
                continue;
            }
            let packet = zerocopy::FromBytes::read_from_bytes(&raw).expect("64 bytes");
            self.handle(txid, &packet, gpa, ranges_ok);
        }
        Ok(any)
    }

    fn reply(&mut self, txid: u64, packet: VstorPacket) {
        self.outbox.push_back((txid, ReplyKind::Completion, packet));
    }

    fn reply_status(&mut self, txid: u64, status: u32) {
        self.reply(txid, VstorPacket::new(operation::COMPLETE_IO, status));
    }

    fn handle(&mut self, txid: u64, packet: &VstorPacket, gpa: bool, ranges_ok: bool) {
        let op = packet.header.operation.get();
        match op {
            operation::EXECUTE_SRB => self.execute_srb(txid, packet, gpa, ranges_ok),
            operation::BEGIN_INITIALIZATION | operation::END_INITIALIZATION => {
                self.reply_status(txid, status::SUCCESS)
            }
            operation::RESET_LUN | operation::RESET_BUS | operation::RESET_ADAPTER => {
                self.reply_status(txid, status::SUCCESS)
            }
            operation::QUERY_PROTOCOL_VERSION => {
                let v: ProtocolVersion = packet.body_as();
                let ok = SUPPORTED_VERSIONS.contains(&v.major_minor.get());
                let mut reply = VstorPacket::new(
                    operation::COMPLETE_IO,
                    if ok {
                        status::SUCCESS
                    } else {
                        status::REVISION_MISMATCH
                    },
                );
                reply.set_body(&v);
                self.reply(txid, reply);
            }
            operation::QUERY_PROPERTIES => {
                let c = &self.controller.config;
                let props = ChannelProperties {
                    reserved: 0.into(),
                    max_channel_count: c.max_subchannels.into(),
                    reserved1: 0.into(),
                    flags: if c.max_subchannels > 0 {
                        STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL
                    } else {
                        0
                    }
                    .into(),
                    max_transfer_bytes: c.max_transfer.into(),
                    reserved2: 0.into(),
                };
                let mut reply = VstorPacket::new(operation::COMPLETE_IO, status::SUCCESS);
                reply.set_body(&props);
                self.reply(txid, reply);
            }
            operation::CREATE_SUB_CHANNELS => {
                let count: zerocopy::little_endian::U16 = packet.body_as();
                let count = count.get().min(self.controller.config.max_subchannels);
                if !self.primary || count == 0 {
                    self.reply_status(txid, status::INVALID_PARAMETER);
                    return;
                }
                self.control.offer_subchannels(count);
                self.reply_status(txid, status::SUCCESS);
            }
            _ => {
                tracing::debug!(op, "unsupported vstor operation");
                self.reply_status(txid, status::INVALID_PARAMETER);
            }
        }
    }

    fn execute_srb(&mut self, txid: u64, packet: &VstorPacket, gpa: bool, ranges_ok: bool) {
        let srb_in = packet.srb();
        let Some(slot) = self.free.pop() else {
            unreachable!("read only with a free slot")
        };
        {
            let s = &mut self.slots[slot as usize];
            s.txid = txid;
            s.srb = srb_in;
            s.pending = 0;
            s.bytes = 0;
            s.write = false;
            s.sense = None;
        }
        let cdb_len = srb_in.cdb_length as usize;
        if cdb_len == 0 || cdb_len > 16 || !ranges_ok {
            return self.finish_status(slot, srb::INVALID_REQUEST);
        }
        let mut cdb = [0u8; 16];
        cdb[..cdb_len].copy_from_slice(&srb_in.cdb_or_sense[..cdb_len]);
        if scsi::cdb_length(cdb[0]) > cdb_len {
            return self.finish_status(slot, srb::INVALID_REQUEST);
        }
        let data_len = match self.data_buffer(&srb_in, gpa) {
            Ok(n) => n,
            Err(()) => return self.finish_status(slot, srb::INVALID_REQUEST),
        };
        self.refresh_table();
        let addressed = srb_in.path_id == 0 && srb_in.target_id == 0;
        if cdb[0] == opcode::REPORT_LUNS {
            let luns = if addressed {
                self.table.numbers()
            } else {
                Vec::new()
            };
            let outcome = scsi::report_luns(&mut self.response, &luns);
            return self.apply(slot, outcome, data_len, None);
        }
        let slot_of_lun = srb_in.lun as usize;
        let lun = if addressed {
            self.luns[slot_of_lun].take()
        } else {
            None
        };
        let Some(lun) = lun else {
            if cdb[0] == opcode::INQUIRY {
                let outcome = scsi::inquiry_no_lun(&mut self.response);
                return self.apply(slot, outcome, data_len, None);
            }
            return self.finish_status(slot, srb::INVALID_LUN);
        };
        let data_out = self.read_parameters(&cdb, data_len);
        let cmd = Command {
            cdb: &cdb[..cdb_len],
            data_len,
            data_out: &self.params[..data_out],
        };
        let out = &mut self.response[..];
        match &*lun {
            Lun::Disk { target, device } => {
                let outcome = target.execute(&cmd, out);
                self.apply(slot, outcome, data_len, Some(device));
            }
            Lun::Dvd { drive } => {
                let session = self
                    .dvd
                    .entry(srb_in.lun)
                    .or_insert_with(|| DvdSession::new(drive));
                let outcome = DvdTarget.execute(drive, session, &cmd, out);
                let media = session.media().cloned();
                self.apply(slot, outcome, data_len, media.as_ref());
            }
        }
        self.luns[slot_of_lun] = Some(lun);
    }

    /// Resolves the guest's buffer into `segs`; returns its length.
    fn data_buffer(&mut self, srb_in: &ScsiRequest, gpa: bool) -> Result<u32, ()> {
        self.segs.clear();
        // No-data commands (in-band, or data_in NONE) may carry a stale
        // transfer length or page list: trust the packet type and data_in.
        if !gpa || srb_in.data_in == direction::NONE {
            return Ok(0);
        }
        let len = srb_in.data_transfer_length.get();
        if u64::from(len) > self.ranges.total_bytes() || len > self.controller.config.max_transfer {
            return Err(());
        }
        let mut left = len as usize;
        let memory = &self.memory;
        let segs = &mut self.segs;
        let r: Result<(), vmbus::MemoryError> = self.ranges.for_each_gpa(|gpa, n| {
            if left == 0 {
                return Ok(());
            }
            let n = n.min(left);
            memory.slice(gpa, n)?;
            segs.push((gpa, n));
            left -= n;
            Ok(())
        });
        r.map_err(|_| ())?;
        Ok(len)
    }

    /// Copies a data-out parameter list (UNMAP, MODE SELECT) out of guest
    /// memory into the second half of the response buffer.
    fn read_parameters(&mut self, cdb: &[u8], data_len: u32) -> usize {
        let needs = matches!(
            cdb[0],
            opcode::UNMAP | opcode::MODE_SELECT_10 | opcode::MODE_SELECT_6
        );
        if !needs {
            return 0;
        }
        let want = (data_len as usize).min(self.params.len());
        copy_from_guest(&self.memory, &self.segs, &mut self.params[..want])
    }

    fn apply(&mut self, slot: u32, outcome: Outcome, data_len: u32, device: Option<&Disk>) {
        match outcome {
            Outcome::Good => self.finish_status(slot, srb::SUCCESS),
            Outcome::DataIn(n) => {
                let is_read = self.slots[slot as usize].srb.data_in == direction::READ;
                let copied = if is_read {
                    let n = n.min(data_len as usize);
                    copy_to_guest(&self.memory, &self.segs, &self.response[..n])
                } else {
                    0
                };
                self.slots[slot as usize].bytes = copied as u32;
                self.finish_status(slot, srb::SUCCESS);
            }
            Outcome::Check(sense) => {
                self.slots[slot as usize].sense = Some(sense);
                self.finish(slot);
            }
            Outcome::Io { op, lba, blocks } => {
                let Some(device) = device else {
                    return self.finish_sense(slot, Sense::MEDIUM_NOT_PRESENT);
                };
                self.submit_io(slot, device, op, lba, blocks, data_len);
            }
            Outcome::Discard(ranges) => {
                let Some(device) = device else {
                    return self.finish_sense(slot, Sense::MEDIUM_NOT_PRESENT);
                };
                self.slots[slot as usize].write = true;
                for (lba, blocks) in ranges {
                    let req = vhd::Request::discard(lba, blocks, u64::from(slot));
                    self.push(slot, device, req);
                }
                self.maybe_finish(slot);
            }
            Outcome::WriteSame { lba, blocks } => {
                let Some(device) = device else {
                    return self.finish_sense(slot, Sense::MEDIUM_NOT_PRESENT);
                };
                self.write_same(slot, device, lba, blocks, data_len);
            }
        }
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
            return self.finish_status(slot, srb::INVALID_REQUEST);
        }
        let s = &mut self.slots[slot as usize];
        s.write = op == BlockOp::Write;
        s.bytes = if op == BlockOp::Flush { 0 } else { data_len };
        if op == BlockOp::Flush {
            self.push(slot, device, vhd::Request::flush(u64::from(slot)));
            return self.maybe_finish(slot);
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
        let r = submit::guest_io(
            &mut self.queue,
            &**device,
            vop,
            lba,
            blocks,
            &self.iov,
            u64::from(slot),
        );
        self.account(slot, r);
        self.maybe_finish(slot);
    }

    fn write_same(&mut self, slot: u32, device: &Disk, lba: u64, blocks: u32, data_len: u32) {
        let bs = data_len as usize;
        if bs > self.response.len()
            || copy_from_guest(&self.memory, &self.segs, &mut self.response[..bs]) != bs
        {
            return self.finish_status(slot, srb::INVALID_REQUEST);
        }
        let block = &self.response[..bs];
        let per_chunk = (WRITE_SAME_CHUNK / bs).max(1) as u32;
        let s = &mut self.slots[slot as usize];
        s.write = true;
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
            self.account(slot, r);
            done += n;
        }
        self.maybe_finish(slot);
    }

    fn push(&mut self, slot: u32, device: &Disk, req: vhd::Request<'_>) {
        let r = device.submit(&mut self.queue, req);
        self.account(slot, r);
    }

    fn account(&mut self, slot: u32, r: Result<(), vhd::BlockError>) {
        let s = &mut self.slots[slot as usize];
        match r {
            Ok(()) => s.pending += 1,
            Err(e) => {
                tracing::warn!("block request refused: {e}");
                s.sense.get_or_insert(block_error_sense(&e, s.write));
            }
        }
    }

    fn maybe_finish(&mut self, slot: u32) {
        if self.slots[slot as usize].pending == 0 {
            self.finish(slot);
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
                    s.sense.get_or_insert(block_error_sense(&e, s.write));
                }
                if s.pending == 0 {
                    done.push(tag as u32);
                }
            }
        });
        for i in 0..self.done.len() {
            let slot = self.done[i];
            self.finish(slot);
        }
        n
    }

    fn finish_sense(&mut self, slot: u32, sense: Sense) {
        self.slots[slot as usize].sense = Some(sense);
        self.finish(slot);
    }

    fn finish_status(&mut self, slot: u32, srb_status: u8) {
        let s = &mut self.slots[slot as usize];
        s.srb.srb_status = srb_status;
        s.srb.scsi_status = scsi::status::GOOD;
        if srb_status != srb::SUCCESS {
            s.bytes = 0;
        }
        self.complete(slot);
    }

    /// Completes a slot from its sense (or success) and frees it.
    fn finish(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        match s.sense {
            None => {
                s.srb.srb_status = srb::SUCCESS;
                s.srb.scsi_status = scsi::status::GOOD;
            }
            Some(sense) => {
                s.srb.srb_status = srb::ERROR | srb::AUTOSENSE_VALID;
                s.srb.scsi_status = scsi::status::CHECK_CONDITION;
                s.bytes = 0;
                let fixed = sense.fixed();
                let n = (s.srb.sense_info_length as usize)
                    .clamp(1, fixed.len())
                    .min(s.srb.cdb_or_sense.len());
                s.srb.cdb_or_sense = [0; crate::protocol::SENSE_BUFFER_SIZE];
                s.srb.cdb_or_sense[..n].copy_from_slice(&fixed[..n]);
                s.srb.sense_info_length = n as u8;
            }
        }
        self.complete(slot);
    }

    fn complete(&mut self, slot: u32) {
        let s = &mut self.slots[slot as usize];
        s.srb.data_transfer_length = s.bytes.into();
        let mut reply = VstorPacket::new(operation::COMPLETE_IO, status::SUCCESS);
        reply.set_srb(&s.srb);
        let txid = s.txid;
        self.outbox.push_back((txid, ReplyKind::Completion, reply));
        self.free.push(slot);
    }
}

/// One slot per possible LUN, filled from a table.
fn lun_slots(table: &LunTable) -> Vec<Option<Arc<Lun>>> {
    (0..=255u8).map(|n| table.get(n).cloned()).collect()
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
