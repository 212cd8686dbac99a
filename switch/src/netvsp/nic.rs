//! One virtual NIC: a peer's netvsc device state, its channels and its
//! switch port, owned by one pool thread and polled to completion.
//!
//! A poll pass ([`Nic::poll`]):
//! 1. reads every channel's ring: the guest's completions of receive
//!    packets free receive-buffer space; NVSP control messages get their
//!    completions; each SEND_RNDIS_PKT is walked message by message (one
//!    send-buffer section, GPA-direct ranges, or a section followed by
//!    ranges), RNDIS control messages are answered through the receive
//!    buffer and every data message becomes a [`Frame`] copied once out of
//!    guest memory into a shared chunk; its completion is written right
//!    away;
//! 2. hands all frames of the pass to the switch in one
//!    [`PortHandle::ingress`] call;
//! 3. drains the frames the switch queued for the port, picks a channel
//!    per flow (the guest's RSS table), copies each frame once into the
//!    channel's receive-buffer region behind its RNDIS header and PPIs, and
//!    sends one transfer-page packet per channel with up to 375 ranges;
//! 4. publishes each ring's indices once and signals the guest at most once
//!    per ring.
//!
//! Nothing here trusts the guest: every section index, range, length and
//! offset is checked before use. A malformed message is dropped and
//! counted (and its NVSP packet completed with a failure status); a
//! malformed ring resets the channel through its [`ControlHandle`].

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::BytesMut;
use vmbus::channel::Channel;
use vmbus::packet::{GpaRanges, write_transfer_pages};
use vmbus::ring::{RingError, WriteError};
use vmbus::server::{ControlHandle, GpadlMap};
use vmbus::wire::{PACKET_FLAG_COMPLETION_REQUESTED, packet_type};
use vmbus::{SharedMemory, SharedSlice};
use zerocopy::{FromBytes, IntoBytes};

use super::buffers::{RecvBuffer, RxRing, SendBuffer};
use super::nvsp::{self, NvspMessage};
use super::rndis::{self, PacketInfo};
use super::{DeviceShared, rss};
use crate::wire::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, IPPROTO_TCP};
use crate::{Delivery, Frame, Gso, GsoKind, Offload, PartialCsum, PortHandle};

/// Send-buffer section size vspa answers (the guest divides its buffer so).
pub const SECTION_SIZE: u32 = 6144;
/// Ranges per transfer-page packet (the limit Linux accepts for NDIS 6).
pub const MAX_RANGES: usize = 375;
/// RNDIS messages the guest may pack in one section.
pub const MAX_PKT_PER_MSG: u32 = 32;
/// Alignment of packed messages, as a power of two (8 bytes).
pub const PKT_ALIGNMENT_FACTOR: u32 = 3;
/// Largest LSO frame payload the guest may send.
pub const MAX_LSO_SIZE: u32 = 62_780;
/// Largest frame accepted from the guest (an LSO frame with headers).
const MAX_TX_FRAME: usize = 65_535 + 18;
/// Smallest frame accepted from the guest.
const MIN_TX_FRAME: usize = 14;
/// Largest range list of a GPA-direct packet (Linux sends at most a few
/// dozen pages); longer ones are refused before they are parsed.
const MAX_GPA_HEADER: usize = 8 * 1024;
/// Most bytes a GPA-direct packet may describe: one LSO frame and its
/// RNDIS header, with room to spare.
const MAX_GPA_BYTES: u64 = 128 * 1024;
/// Largest RNDIS control message accepted.
const MAX_CONTROL_MESSAGE: usize = 16 * 1024;
/// Largest PPI area read per data message.
const MAX_PPI_AREA: usize = 256;
/// Packets read from one channel per pass.
const READ_BUDGET: usize = 256;
/// Frames read from the guest before they are handed to the switch.
const FRAME_BUDGET: usize = 256;
/// Frames drained from the switch per pass.
const DRAIN_BATCH: usize = 512;
/// Size of the chunks frames are copied into.
const CHUNK: usize = 256 * 1024;
/// Control replies a channel holds for a full ring before dropping more.
const MAX_OUTBOX: usize = 256;
/// Largest RNDIS header (with three PPIs) vspa writes before a frame.
pub const MAX_RX_HEADER: usize = rndis::PACKET_HEADERS + 3 * rndis::PPI_U32_SIZE;

/// Why a sub-channel cannot join its NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("channel {0} is already attached")]
    Attached(u16),
    #[error("channel {0} is beyond the device's channels")]
    BeyondChannels(u16),
}

/// A reply waiting for ring or receive-buffer space.
#[derive(Debug)]
enum Out {
    /// A completion packet.
    Completion { tid: u64, bytes: [u8; 40], len: u8 },
    /// An RNDIS control message for the receive buffer.
    Control(Vec<u8>),
    /// An in-band NVSP message (the send indirection table).
    Inband(Vec<u8>),
}

/// One channel of the NIC.
#[derive(Debug)]
pub(crate) struct Chan {
    pub index: u16,
    pub relid: u32,
    pub ch: Channel,
    outbox: VecDeque<Out>,
    /// Ranges of the data packet being built.
    ranges: Vec<(u32, u32)>,
    /// The ring broke; a reset was requested and the channel is idle.
    pub dead: bool,
}

impl Chan {
    pub fn new(index: u16, relid: u32, ch: Channel) -> Self {
        Chan {
            index,
            relid,
            ch,
            outbox: VecDeque::new(),
            ranges: Vec::with_capacity(MAX_RANGES),
            dead: false,
        }
    }

    /// Bytes the first queued reply needs in the ring (0 if none).
    pub fn waiting_for(&self) -> usize {
        match self.outbox.front() {
            None => 0,
            Some(Out::Completion { len, .. }) => 16 + usize::from(*len).next_multiple_of(8),
            Some(Out::Control(_)) => 16 + 16 + 16,
            Some(Out::Inband(b)) => 16 + b.len().next_multiple_of(8),
        }
    }
}

/// The guest's receive-side scaling settings.
#[derive(Debug, Clone)]
struct RssState {
    key: [u8; rndis::RSS_KEY_MAX],
    key_len: usize,
    table: [u8; rndis::RSS_TABLE_MAX],
    table_len: usize,
    hash_info: u32,
}

/// A NIC: one peer's use of one netvsp device.
#[derive(Debug)]
pub(crate) struct Nic {
    pub id: u64,
    core: Core,
    pub chans: Vec<Option<Chan>>,
}

#[derive(Debug)]
struct Core {
    dev: Arc<DeviceShared>,
    port: PortHandle,
    memory: SharedMemory,
    gpadls: GpadlMap,
    control: ControlHandle,
    version: Option<u32>,
    ndis_version: (u32, u32),
    ndis_mtu: u32,
    ndis_caps: u64,
    rndis_ready: bool,
    filter: u32,
    mac: [u8; 6],
    /// Link state last told to the guest (None before RNDIS init).
    link_told: Option<bool>,
    offload_params: [u8; 11],
    rss: Option<RssState>,
    subchannels: u16,
    recv: Option<RecvBuffer>,
    /// Allocator of the receive buffer, shared by all channels (they are
    /// all on this thread) with one table of packets in flight.
    rx: Option<RxRing>,
    /// Channel picked for each frame being delivered, and its hash.
    picks: Vec<(u16, Option<u32>)>,
    send: Option<SendBuffer>,
    frames: Vec<Frame>,
    out: Vec<Delivery>,
    chunk: BytesMut,
    ranges: GpaRanges,
    segs: Vec<(u64, usize)>,
    scratch: Vec<u8>,
}

/// The bytes of one SEND_RNDIS_PKT: a send-buffer section and/or the
/// packet's GPA-direct pieces, concatenated.
struct Stream<'a> {
    head: Option<SharedSlice<'a>>,
    memory: &'a SharedMemory,
    segs: &'a [(u64, usize)],
    len: usize,
}

impl<'a> Stream<'a> {
    /// Calls `f` with the pieces of `[off, off + len)`; false if out of range.
    fn visit(&self, mut off: usize, mut len: usize, mut f: impl FnMut(SharedSlice<'a>)) -> bool {
        if off.checked_add(len).is_none_or(|end| end > self.len) {
            return false;
        }
        if let Some(h) = &self.head {
            if off < h.len() {
                let n = len.min(h.len() - off);
                f(h.subslice(off, n).expect("inside the head"));
                len -= n;
                off = 0;
                if len == 0 {
                    return true;
                }
            } else {
                off -= h.len();
            }
        }
        for &(gpa, n) in self.segs {
            if len == 0 {
                break;
            }
            if off >= n {
                off -= n;
                continue;
            }
            let take = len.min(n - off);
            match self.memory.slice(gpa + off as u64, take) {
                Ok(s) => f(s),
                Err(_) => return false,
            }
            len -= take;
            off = 0;
        }
        len == 0
    }

    /// Copies `buf.len()` bytes at `off` out.
    fn read(&self, off: usize, buf: &mut [u8]) -> bool {
        if let Some(h) = &self.head
            && h.read_at(off, buf).is_ok()
        {
            return true;
        }
        let mut at = 0;
        self.visit(off, buf.len(), |s| {
            let n = s.len();
            let _ = s.read_at(0, &mut buf[at..at + n]);
            at += n;
        })
    }
}

/// Status of an NVSP SEND_RNDIS_PKT after walking it.
fn walk_status(bad: bool) -> u32 {
    if bad {
        nvsp::status::INVALID_RNDIS_PKT
    } else {
        nvsp::status::SUCCESS
    }
}

impl Nic {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        dev: Arc<DeviceShared>,
        port: PortHandle,
        memory: SharedMemory,
        gpadls: GpadlMap,
        control: ControlHandle,
        primary: Chan,
    ) -> Self {
        let mac = dev.config.mac.0;
        let mut chans: Vec<Option<Chan>> = (0..dev.config.channels).map(|_| None).collect();
        chans[0] = Some(primary);
        Nic {
            id,
            core: Core {
                dev,
                port,
                memory,
                gpadls,
                control,
                rx: None,
                picks: Vec::with_capacity(DRAIN_BATCH),
                version: None,
                ndis_version: (0, 0),
                ndis_mtu: 0,
                ndis_caps: 0,
                rndis_ready: false,
                filter: 0,
                mac,
                link_told: None,
                offload_params: [0; 11],
                rss: None,
                subchannels: 0,
                recv: None,
                send: None,
                frames: Vec::with_capacity(READ_BUDGET * 4),
                out: Vec::with_capacity(DRAIN_BATCH),
                chunk: BytesMut::new(),
                ranges: GpaRanges::new(),
                segs: Vec::with_capacity(64),
                scratch: Vec::with_capacity(MAX_CONTROL_MESSAGE),
            },
            chans,
        }
    }

    /// Whether sub-channel `index` may be attached.
    pub fn can_attach(&self, index: u16) -> Result<(), AttachError> {
        match self.chans.get(usize::from(index)) {
            Some(None) => Ok(()),
            Some(Some(_)) => Err(AttachError::Attached(index)),
            None => Err(AttachError::BeyondChannels(index)),
        }
    }

    /// Adds a sub-channel (after [`Nic::can_attach`] said yes).
    pub fn attach(&mut self, chan: Chan) {
        let i = usize::from(chan.index);
        if let Some(slot @ None) = self.chans.get_mut(i) {
            *slot = Some(chan);
        }
    }

    /// Removes sub-channel `index`.
    pub fn detach(&mut self, index: u16) -> Option<Chan> {
        self.chans.get_mut(usize::from(index))?.take()
    }

    pub fn port(&self) -> &PortHandle {
        &self.core.port
    }

    /// One pass over the NIC; true if anything moved.
    pub fn poll(&mut self) -> bool {
        let core = &mut self.core;
        let mut progress = false;
        if let Some(Some(c)) = self.chans.first_mut()
            && !c.dead
        {
            progress |= core.tell_link(c);
        }
        for c in self.chans.iter_mut().flatten() {
            if c.dead {
                continue;
            }
            match core.read_channel(c) {
                Ok(p) => progress |= p,
                Err(e) => core.fail(c, e),
            }
        }
        if !core.frames.is_empty() {
            core.port.ingress(&mut core.frames);
            progress = true;
        }
        progress |= core.deliver(&mut self.chans);
        for c in self.chans.iter_mut().flatten() {
            if !c.dead
                && let Err(e) = c.ch.flush()
            {
                core.fail(c, e);
            }
        }
        progress
    }

    /// Prepares every channel and the port for sleeping; false if work
    /// arrived meanwhile (the caller polls again, then calls `woke`).
    pub fn prepare_sleep(&mut self) -> bool {
        for c in self.chans.iter_mut().flatten() {
            if c.dead {
                continue;
            }
            let ok = if c.outbox.is_empty() {
                c.ch.prepare_sleep()
            } else {
                let need = (c.waiting_for() + 8) as u32;
                c.ch.flush()
                    .and_then(|()| c.ch.outgoing.request_space(need))
                    .map(|has_room| !has_room)
            };
            match ok {
                Ok(true) => {}
                Ok(false) => return false,
                Err(e) => {
                    self.core.fail(c, e);
                    return false;
                }
            }
        }
        self.core.port.prepare_sleep()
    }

    /// After a sleep (or an aborted one): masks the rings again and clears
    /// the doorbells that rang (`rang` holds their descriptors).
    pub fn woke(&mut self, rang: &[u64]) {
        use std::os::fd::{AsFd, AsRawFd};
        for c in self.chans.iter_mut().flatten() {
            if rang.contains(&(c.ch.doorbell().as_fd().as_raw_fd() as u64)) {
                c.ch.doorbell().consume();
            }
            c.ch.incoming.mask_interrupts();
        }
        let port_fd = self.core.port.doorbell_fd().as_raw_fd() as u64;
        self.core.port.woke(rang.contains(&port_fd));
    }
}

impl Core {
    fn count(&self, c: fn(&super::NetvspCounters) -> &std::sync::atomic::AtomicU64, n: u64) {
        c(&self.dev.counters).fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// A ring broke: reset the channel and stop touching it.
    fn fail(&self, c: &mut Chan, e: RingError) {
        tracing::warn!(
            port = self.port.name(),
            channel = c.index,
            relid = c.relid,
            "ring error, resetting the channel: {e}"
        );
        self.count(|c| &c.channel_resets, 1);
        c.dead = true;
        c.outbox.clear();
        self.control
            .reset(format!("netvsp channel {}: {e}", c.index));
    }

    // ---------------------------------------------------------------
    // Guest to host.

    fn read_channel(&mut self, c: &mut Chan) -> Result<bool, RingError> {
        let mut progress = false;
        for _ in 0..READ_BUDGET {
            if self.frames.len() >= FRAME_BUDGET || !self.drain_outbox(c)? {
                break;
            }
            let Some(p) = c.ch.incoming.read()? else {
                break;
            };
            progress = true;
            let desc = p.desc;
            let payload = p.payload();
            let mut raw = [0u8; nvsp::MESSAGE_SIZE];
            let n = payload.len().min(raw.len());
            payload
                .read_at(0, &mut raw[..n])
                .expect("inside the payload");
            let gpa = desc.packet_type == packet_type::DATA_USING_GPA_DIRECT;
            let ranges_ok = !gpa
                || (desc.data_offset as usize <= MAX_GPA_HEADER
                    && self.ranges.parse(&p).is_ok()
                    && self.ranges.total_bytes() <= MAX_GPA_BYTES);
            if n < 4 {
                self.count(|c| &c.bad_nvsp, 1);
                continue;
            }
            let msg = NvspMessage::from_prefix(&raw[..n]);
            let completion = desc.flags & PACKET_FLAG_COMPLETION_REQUESTED != 0;
            match desc.packet_type {
                packet_type::COMPLETION => self.on_completion(desc.transaction_id, &msg),
                packet_type::DATA_INBAND | packet_type::DATA_USING_GPA_DIRECT => {
                    self.on_nvsp(c, desc.transaction_id, completion, &msg, gpa, ranges_ok)?
                }
                _ => self.count(|c| &c.bad_nvsp, 1),
            }
        }
        Ok(progress)
    }

    /// The guest completed a receive packet.
    fn on_completion(&mut self, tid: u64, msg: &NvspMessage) {
        if msg.msg_type.get() != nvsp::msg::SEND_RNDIS_PKT_COMPLETE {
            self.count(|c| &c.bad_completions, 1);
            return;
        }
        let ok = self.rx.as_mut().is_some_and(|rx| rx.complete(tid).is_ok());
        if !ok {
            self.count(|c| &c.bad_completions, 1);
        }
    }

    fn complete(&mut self, c: &mut Chan, tid: u64, bytes: &[u8]) -> Result<(), RingError> {
        let mut b = [0u8; 40];
        b[..bytes.len()].copy_from_slice(bytes);
        let out = Out::Completion {
            tid,
            bytes: b,
            len: bytes.len() as u8,
        };
        self.queue(c, out)
    }

    /// Sends `out` now if nothing is queued before it and it fits, else
    /// queues it.
    fn queue(&mut self, c: &mut Chan, out: Out) -> Result<(), RingError> {
        if c.outbox.is_empty() && self.try_send(c, &out)? {
            return Ok(());
        }
        if c.outbox.len() >= MAX_OUTBOX && !matches!(out, Out::Completion { .. }) {
            self.count(|c| &c.drop_control_replies, 1);
            return Ok(());
        }
        c.outbox.push_back(out);
        Ok(())
    }

    /// Writes queued replies; true if the outbox is empty afterwards.
    fn drain_outbox(&mut self, c: &mut Chan) -> Result<bool, RingError> {
        while let Some(out) = c.outbox.pop_front() {
            if !self.try_send(c, &out)? {
                c.outbox.push_front(out);
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes one reply; false if the ring or receive buffer is full.
    fn try_send(&mut self, c: &mut Chan, out: &Out) -> Result<bool, RingError> {
        let r = match out {
            Out::Completion { tid, bytes, len } => {
                c.ch.outgoing
                    .write_completion(*tid, &bytes[..usize::from(*len)])
            }
            Out::Inband(b) => c.ch.outgoing.write_inband(0, false, b),
            Out::Control(msg) => return self.send_control_now(c, msg),
        };
        match r {
            Ok(()) => Ok(true),
            Err(WriteError::Full { .. }) => Ok(false),
            Err(WriteError::Ring(e)) => Err(e),
        }
    }

    /// Puts an RNDIS control message into the receive buffer and sends it
    /// as a one-range control packet. False if the ring is full (the reply
    /// waits); a reply that finds no receive-buffer space is dropped and
    /// counted, like a frame: only a guest that does not complete its
    /// receives gets there, and waiting for it would stall the channel.
    fn send_control_now(&mut self, c: &mut Chan, msg: &[u8]) -> Result<bool, RingError> {
        let drop_reply = |dev: &DeviceShared| {
            dev.counters
                .drop_control_replies
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(true)
        };
        let (Some(recv), Some(rx)) = (&self.recv, self.rx.as_mut()) else {
            // No receive buffer: nothing can reach the guest.
            return drop_reply(&self.dev);
        };
        if rx.table_full() {
            return drop_reply(&self.dev);
        }
        let Some(off) = rx.alloc(msg.len() as u32) else {
            return drop_reply(&self.dev);
        };
        let tid = rx.next_tid();
        let _ = recv.map.slice().write_at(off as usize, msg);
        let payload = nvsp::rndis_pkt_payload(nvsp::channel_type::CONTROL);
        match write_transfer_pages(
            &mut c.ch.outgoing,
            tid,
            PACKET_FLAG_COMPLETION_REQUESTED,
            nvsp::RECV_BUFFER_ID,
            &[(msg.len() as u32, off)],
            &payload,
        ) {
            Ok(()) => {
                rx.commit();
                Ok(true)
            }
            Err(WriteError::Full { .. }) => {
                rx.rollback();
                Ok(false)
            }
            Err(WriteError::Ring(e)) => Err(e),
        }
    }

    fn on_nvsp(
        &mut self,
        c: &mut Chan,
        tid: u64,
        completion: bool,
        msg: &NvspMessage,
        gpa: bool,
        ranges_ok: bool,
    ) -> Result<(), RingError> {
        let t = msg.msg_type.get();
        if t == nvsp::msg::SEND_RNDIS_PKT {
            let status = if ranges_ok {
                self.on_rndis_pkt(c, msg.body_as(), gpa)?
            } else {
                self.count(|c| &c.bad_nvsp, 1);
                nvsp::status::FAIL
            };
            if completion {
                self.complete(c, tid, &nvsp::rndis_pkt_complete(status))?;
            }
            return Ok(());
        }
        let reply = match t {
            nvsp::msg::INIT => Some(self.on_init(msg.body_as())),
            nvsp::msg::SEND_NDIS_VER => {
                let v: nvsp::SendNdisVersion = msg.body_as();
                self.ndis_version = (v.major.get(), v.minor.get());
                None
            }
            nvsp::msg::SEND_NDIS_CONFIG => {
                let cfg: nvsp::NdisConfig = msg.body_as();
                self.ndis_mtu = cfg.mtu.get();
                self.ndis_caps = cfg.capabilities.get();
                None
            }
            nvsp::msg::SEND_RECV_BUF => Some(self.on_recv_buf(c, msg.body_as())),
            nvsp::msg::SEND_SEND_BUF => Some(self.on_send_buf(msg.body_as())),
            nvsp::msg::REVOKE_RECV_BUF => {
                self.revoke_recv_buf(c);
                None
            }
            nvsp::msg::REVOKE_SEND_BUF => {
                self.send = None;
                None
            }
            nvsp::msg::SUBCHANNEL => return self.on_subchannel(c, tid, completion, msg.body_as()),
            _ => {
                tracing::debug!(
                    port = self.port.name(),
                    msg_type = t,
                    "unknown NVSP message"
                );
                self.count(|c| &c.bad_nvsp, 1);
                // Answer a request that wants one rather than leave the
                // guest waiting: same type, failure status.
                let mut m = NvspMessage::new(t, &nvsp::RndisPktComplete::default());
                m.body[..4].copy_from_slice(&nvsp::status::FAIL.to_le_bytes());
                Some(m)
            }
        };
        if let Some(m) = reply
            && completion
        {
            self.complete(c, tid, m.as_bytes())?;
        }
        Ok(())
    }

    fn on_init(&mut self, init: nvsp::Init) -> NvspMessage {
        let (lo, hi) = (init.min_version.get(), init.max_version.get());
        let chosen = nvsp::SUPPORTED_VERSIONS
            .iter()
            .copied()
            .find(|&v| lo <= v && v <= hi);
        let status = match chosen {
            Some(v) => {
                self.version = Some(v);
                nvsp::status::SUCCESS
            }
            None => nvsp::status::FAIL,
        };
        NvspMessage::new(
            nvsp::msg::INIT_COMPLETE,
            &nvsp::InitComplete {
                negotiated_version: chosen.unwrap_or(0).into(),
                max_mdl_chain_len: 0.into(),
                status: status.into(),
            },
        )
    }

    /// Largest untagged frame for the guest: the NIC's MTU, or the
    /// guest's own (SEND_NDIS_CONFIG carries MTU + 14) if smaller.
    fn max_rx_frame(&self) -> usize {
        let nic = self.dev.max_rx_frame();
        match self.ndis_mtu as usize {
            m if m >= 68 + 14 => nic.min(m),
            _ => nic,
        }
    }

    /// Whether the guest takes VLAN tags as 802.1Q PPIs (it said so in
    /// SEND_NDIS_CONFIG); otherwise tags stay in the frames.
    fn vlan_ppi(&self) -> bool {
        self.ndis_caps & nvsp::ndis_config::IEEE8021Q != 0
    }

    /// Largest RNDIS message the host sends in one range.
    fn max_rx_message(&self) -> u32 {
        (MAX_RX_HEADER + self.max_rx_frame() + 4) as u32
    }

    fn on_recv_buf(&mut self, c: &mut Chan, b: nvsp::SendBuffer) -> NvspMessage {
        let fail = NvspMessage::new(
            nvsp::msg::SEND_RECV_BUF_COMPLETE,
            &nvsp::RecvBufComplete {
                status: nvsp::status::FAIL.into(),
                ..Default::default()
            },
        );
        if self.version.is_none() || self.recv.is_some() || c.index != 0 {
            self.count(|c| &c.bad_nvsp, 1);
            return fail;
        }
        let Some(map) = self.map_gpadl(b.gpadl.get()) else {
            return fail;
        };
        let max = self.max_rx_message();
        let Some(recv) = RecvBuffer::new(map, b.gpadl.get(), max) else {
            tracing::warn!(port = self.port.name(), "receive buffer too small");
            return fail;
        };
        let reply = nvsp::RecvBufComplete {
            status: nvsp::status::SUCCESS.into(),
            num_sections: 1.into(),
            section: nvsp::RecvSection {
                offset: 0.into(),
                sub_alloc_size: recv.sub_alloc_size.into(),
                num_sub_allocs: recv.num_sub_allocs.into(),
                end_offset: (recv.sub_alloc_size * recv.num_sub_allocs).into(),
            },
        };
        self.rx = Some(recv.ring());
        self.recv = Some(recv);
        NvspMessage::new(nvsp::msg::SEND_RECV_BUF_COMPLETE, &reply)
    }

    fn revoke_recv_buf(&mut self, c: &mut Chan) {
        // Only the primary may revoke.
        if c.index == 0 {
            self.recv = None;
            self.rx = None;
            self.rndis_ready = false;
        }
    }

    fn on_send_buf(&mut self, b: nvsp::SendBuffer) -> NvspMessage {
        let status = if self.version.is_none() || self.send.is_some() {
            nvsp::status::FAIL
        } else {
            match self
                .map_gpadl(b.gpadl.get())
                .and_then(|m| SendBuffer::new(m, b.gpadl.get(), SECTION_SIZE))
            {
                Some(s) => {
                    self.send = Some(s);
                    nvsp::status::SUCCESS
                }
                None => nvsp::status::FAIL,
            }
        };
        NvspMessage::new(
            nvsp::msg::SEND_SEND_BUF_COMPLETE,
            &nvsp::SendBufComplete {
                status: status.into(),
                section_size: if status == nvsp::status::SUCCESS {
                    SECTION_SIZE
                } else {
                    0
                }
                .into(),
            },
        )
    }

    /// Maps a buffer GPADL the guest named; None (logged) if unusable.
    fn map_gpadl(&self, id: u32) -> Option<vmbus::MappedPages> {
        let Some(g) = self.gpadls.get(id) else {
            tracing::warn!(port = self.port.name(), gpadl = id, "unknown buffer GPADL");
            self.count(|c| &c.bad_nvsp, 1);
            return None;
        };
        let Some(pages) = g.single_range_pages() else {
            tracing::warn!(
                port = self.port.name(),
                gpadl = id,
                "buffer GPADL is not one range"
            );
            self.count(|c| &c.bad_nvsp, 1);
            return None;
        };
        match self.memory.map_pages(pages) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(port = self.port.name(), gpadl = id, "buffer GPADL: {e}");
                self.count(|c| &c.bad_nvsp, 1);
                None
            }
        }
    }

    fn on_subchannel(
        &mut self,
        c: &mut Chan,
        tid: u64,
        completion: bool,
        req: nvsp::SubchannelRequest,
    ) -> Result<(), RingError> {
        let allowed = c.index == 0
            && self.version.is_some_and(|v| v >= nvsp::version::V5)
            && req.op.get() == nvsp::SUBCHANNEL_ALLOCATE;
        let max = self
            .dev
            .config
            .channels
            .saturating_sub(1 + self.subchannels);
        let n = if allowed {
            (req.count.get().min(u32::from(max))) as u16
        } else {
            0
        };
        let reply = NvspMessage::new(
            nvsp::msg::SUBCHANNEL,
            &nvsp::SubchannelComplete {
                status: if allowed {
                    nvsp::status::SUCCESS
                } else {
                    nvsp::status::FAIL
                }
                .into(),
                count: u32::from(n).into(),
            },
        );
        if !allowed {
            self.count(|c| &c.bad_nvsp, 1);
        }
        if completion {
            self.complete(c, tid, reply.as_bytes())?;
        }
        if n > 0 {
            self.subchannels += n;
            self.control.offer_subchannels(n);
            // Tell the guest how to spread its sends over the channels.
            let total = u32::from(1 + self.subchannels);
            let mut m = NvspMessage::new(
                nvsp::msg::SEND_INDIRECTION_TABLE,
                &nvsp::SendIndirectionTable {
                    count: (nvsp::SEND_TABLE_SIZE as u32).into(),
                    offset: (nvsp::MESSAGE_SIZE as u32).into(),
                },
            )
            .as_bytes()
            .to_vec();
            for i in 0..nvsp::SEND_TABLE_SIZE as u32 {
                m.extend_from_slice(&(i % total).to_le_bytes());
            }
            self.queue(c, Out::Inband(m))?;
        }
        Ok(())
    }

    /// Walks the RNDIS messages of one SEND_RNDIS_PKT.
    fn on_rndis_pkt(
        &mut self,
        c: &mut Chan,
        pkt: nvsp::SendRndisPkt,
        gpa: bool,
    ) -> Result<u32, RingError> {
        let index = pkt.section_index.get();
        let head = if index == nvsp::NO_SECTION {
            None
        } else {
            let Some(send) = &self.send else {
                self.count(|c| &c.bad_nvsp, 1);
                return Ok(nvsp::status::FAIL);
            };
            let size = pkt.section_size.get();
            if index >= send.sections || size > send.section_size {
                self.count(|c| &c.bad_nvsp, 1);
                return Ok(nvsp::status::FAIL);
            }
            let off = index as usize * send.section_size as usize;
            Some((off, size as usize))
        };
        self.segs.clear();
        if gpa {
            let mem = &self.memory;
            let segs = &mut self.segs;
            let r: Result<(), vmbus::MemoryError> = self.ranges.for_each_gpa(|g, n| {
                mem.slice(g, n)?;
                segs.push((g, n));
                Ok(())
            });
            if r.is_err() {
                self.count(|c| &c.bad_nvsp, 1);
                return Ok(nvsp::status::FAIL);
            }
        }
        if head.is_none() && self.segs.is_empty() {
            self.count(|c| &c.bad_nvsp, 1);
            return Ok(nvsp::status::FAIL);
        }
        // Borrow the pieces for the walk, then put them back.
        let segs = std::mem::take(&mut self.segs);
        let send = self.send.take();
        let memory = self.memory.clone();
        let stream = Stream {
            head: head.and_then(|(off, len)| {
                send.as_ref()
                    .and_then(|s| s.map.slice().subslice(off, len).ok())
            }),
            memory: &memory,
            segs: &segs,
            len: head.map_or(0, |(_, len)| len) + segs.iter().map(|s| s.1).sum::<usize>(),
        };
        let r = self.walk(c, &stream);
        self.send = send;
        self.segs = segs;
        r.map(walk_status)
    }

    /// Handles every message in `stream`; Ok(true) if any was malformed.
    fn walk(&mut self, c: &mut Chan, stream: &Stream<'_>) -> Result<bool, RingError> {
        let mut at = 0usize;
        let mut bad = false;
        while at + rndis::HEADER_SIZE <= stream.len {
            let mut hb = [0u8; rndis::PACKET_HEADERS];
            let avail = (stream.len - at).min(hb.len());
            if !stream.read(at, &mut hb[..avail]) {
                bad = true;
                break;
            }
            let h = rndis::Header::read_from_prefix(&hb).expect("8 bytes").0;
            let len = h.msg_len.get() as usize;
            if len < rndis::HEADER_SIZE || len > stream.len - at {
                self.count(|c| &c.drop_tx_malformed, 1);
                bad = true;
                break;
            }
            match h.msg_type.get() {
                rndis::msg::PACKET => {
                    if let Err(e) = self.data_message(stream, at, len, &hb[..avail]) {
                        tracing::debug!(port = self.port.name(), "dropped guest frame: {e}");
                        self.count(|c| &c.drop_tx_malformed, 1);
                        bad = true;
                    }
                }
                t => {
                    if !self.control_message(c, stream, at, len, t)? {
                        bad = true;
                    }
                }
            }
            at += len;
        }
        Ok(bad)
    }

    /// Makes a frame of one PACKET message.
    fn data_message(
        &mut self,
        stream: &Stream<'_>,
        at: usize,
        len: usize,
        head: &[u8],
    ) -> Result<(), rndis::RndisError> {
        if len < rndis::PACKET_HEADERS || head.len() < rndis::PACKET_HEADERS {
            return Err(rndis::RndisError::BadLength {
                len: len as u32,
                available: stream.len - at,
            });
        }
        let p = rndis::Packet::read_from_bytes(&head[rndis::HEADER_SIZE..]).expect("36 bytes");
        let lay = rndis::packet_layout(&p, len as u32)?;
        let mut info = PacketInfo::default();
        if lay.ppi_len > 0 {
            if lay.ppi_len > MAX_PPI_AREA {
                return Err(rndis::RndisError::BadPpiArea {
                    offset: p.per_pkt_info_offset.get(),
                    len: p.per_pkt_info_len.get(),
                });
            }
            let mut area = [0u8; MAX_PPI_AREA];
            if !stream.read(at + lay.ppi_offset, &mut area[..lay.ppi_len]) {
                return Err(rndis::RndisError::BadPpiArea {
                    offset: p.per_pkt_info_offset.get(),
                    len: p.per_pkt_info_len.get(),
                });
            }
            info = rndis::parse_ppis(&area[..lay.ppi_len])?;
        }
        let n = lay.data_len;
        if !(MIN_TX_FRAME..=MAX_TX_FRAME).contains(&n) {
            return Err(rndis::RndisError::BadFrameLength(n as u32));
        }
        let tag = info.vlan.map(rndis::vlan::to_tci).filter(|&t| t != 0);
        let total = n + if tag.is_some() { 4 } else { 0 };
        self.make_room(total);
        let start = at + lay.data_offset;
        let chunk = &mut self.chunk;
        let ok = match tag {
            None => stream.visit(start, n, |s| {
                let _ = s.copy_to_uninit(chunk);
            }),
            Some(tci) => {
                let a = stream.visit(start, 12, |s| {
                    let _ = s.copy_to_uninit(chunk);
                });
                chunk.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
                chunk.extend_from_slice(&tci.to_be_bytes());
                a && stream.visit(start + 12, n - 12, |s| {
                    let _ = s.copy_to_uninit(chunk);
                })
            }
        };
        if !ok || self.chunk.len() != total {
            self.chunk.clear();
            return Err(rndis::RndisError::BadFrameLength(n as u32));
        }
        let shift = if tag.is_some() { 4 } else { 0 };
        let offload = match tx_offload(&mut self.chunk, &info, shift) {
            Ok(o) => o,
            Err(()) => {
                self.chunk.clear();
                return Err(rndis::RndisError::BadFrameLength(n as u32));
            }
        };
        let data = self.chunk.split().freeze();
        self.frames.push(Frame { data, offload });
        Ok(())
    }

    /// Makes sure the chunk has room for `len` more bytes, reclaiming it
    /// when every frame cut from it is gone.
    fn make_room(&mut self, len: usize) {
        debug_assert!(self.chunk.is_empty());
        if self.chunk.capacity() >= len || self.chunk.try_reclaim(len.max(CHUNK / 2)) {
            return;
        }
        self.chunk = BytesMut::with_capacity(CHUNK.max(len));
    }

    /// Answers one RNDIS control message; false if it was malformed.
    fn control_message(
        &mut self,
        c: &mut Chan,
        stream: &Stream<'_>,
        at: usize,
        len: usize,
        msg_type: u32,
    ) -> Result<bool, RingError> {
        if len > MAX_CONTROL_MESSAGE {
            self.count(|c| &c.bad_control, 1);
            return Ok(false);
        }
        let mut m = std::mem::take(&mut self.scratch);
        m.clear();
        m.resize(len, 0);
        let ok = stream.read(at, &mut m);
        let r = if ok {
            self.control(c, &m, msg_type)
        } else {
            Ok(false)
        };
        self.scratch = m;
        if !matches!(r, Ok(true)) {
            self.count(|c| &c.bad_control, 1);
        }
        r
    }

    fn control(&mut self, c: &mut Chan, m: &[u8], msg_type: u32) -> Result<bool, RingError> {
        self.count(|c| &c.control_messages, 1);
        let body = &m[rndis::HEADER_SIZE..];
        let req_id = u32::from_le_bytes(
            body.get(..4)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 4]),
        );
        let reply = match msg_type {
            rndis::msg::INIT => {
                let Ok((_r, _)) = rndis::InitRequest::read_from_prefix(body) else {
                    return Ok(false);
                };
                self.rndis_ready = true;
                self.link_told = Some(self.dev.link_up());
                let b = rndis::InitComplete {
                    req_id: req_id.into(),
                    status: rndis::status::SUCCESS.into(),
                    major: 1.into(),
                    minor: 0.into(),
                    dev_flags: 1.into(),
                    medium: 0.into(),
                    max_pkt_per_msg: MAX_PKT_PER_MSG.into(),
                    max_xfer_size: (SECTION_SIZE * 8).into(),
                    pkt_alignment_factor: PKT_ALIGNMENT_FACTOR.into(),
                    af_list_offset: 0.into(),
                    af_list_size: 0.into(),
                };
                message(rndis::msg::INIT_COMPLETE, b.as_bytes(), &[])
            }
            rndis::msg::QUERY => {
                let Ok((r, _)) = rndis::OidRequest::read_from_prefix(body) else {
                    return Ok(false);
                };
                let (status, data) = self.query(r.oid.get());
                let b = rndis::QueryComplete {
                    req_id: req_id.into(),
                    status: status.into(),
                    info_buflen: (data.len() as u32).into(),
                    info_buf_offset: (size_of::<rndis::QueryComplete>() as u32).into(),
                };
                message(rndis::msg::QUERY_COMPLETE, b.as_bytes(), &data)
            }
            rndis::msg::SET => {
                let Ok((r, _)) = rndis::OidRequest::read_from_prefix(body) else {
                    return Ok(false);
                };
                let (off, n) = (
                    r.info_buf_offset.get() as usize,
                    r.info_buflen.get() as usize,
                );
                let status = match body.get(off..off.saturating_add(n)) {
                    Some(info) if n == 0 || off >= size_of::<rndis::OidRequest>() => {
                        self.set(r.oid.get(), info)
                    }
                    _ => rndis::status::INVALID_DATA,
                };
                let b = rndis::SetComplete {
                    req_id: req_id.into(),
                    status: status.into(),
                };
                message(rndis::msg::SET_COMPLETE, b.as_bytes(), &[])
            }
            rndis::msg::RESET => {
                let b = rndis::ResetComplete {
                    status: rndis::status::SUCCESS.into(),
                    addressing_reset: 0.into(),
                };
                message(rndis::msg::RESET_COMPLETE, b.as_bytes(), &[])
            }
            rndis::msg::KEEPALIVE => {
                let b = rndis::SetComplete {
                    req_id: req_id.into(),
                    status: rndis::status::SUCCESS.into(),
                };
                message(rndis::msg::KEEPALIVE_COMPLETE, b.as_bytes(), &[])
            }
            rndis::msg::HALT => {
                self.rndis_ready = false;
                self.filter = 0;
                return Ok(true);
            }
            _ => return Ok(false),
        };
        self.queue(c, Out::Control(reply))?;
        Ok(true)
    }

    fn query(&self, oid: u32) -> (u32, Vec<u8>) {
        use rndis::oid;
        let cfg = &self.dev.config;
        let data = match oid {
            oid::GEN_MAXIMUM_FRAME_SIZE => cfg.mtu.to_le_bytes().to_vec(),
            oid::GEN_LINK_SPEED => (cfg.link_speed_mbps.saturating_mul(10_000))
                .to_le_bytes()
                .to_vec(),
            oid::GEN_MEDIA_CONNECT_STATUS => u32::from(!self.dev.link_up()).to_le_bytes().to_vec(),
            oid::P802_3_PERMANENT_ADDRESS => cfg.mac.0.to_vec(),
            oid::P802_3_CURRENT_ADDRESS => self.mac.to_vec(),
            oid::GEN_CURRENT_PACKET_FILTER => self.filter.to_le_bytes().to_vec(),
            oid::GEN_FRIENDLY_NAME => rndis::utf16_name(&cfg.name, 256),
            oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES => {
                let caps = rndis::offload_capabilities(self.version.unwrap_or(0), MAX_LSO_SIZE);
                let size = usize::from(caps.header.size.get());
                caps.as_bytes()[..size].to_vec()
            }
            oid::GEN_RECEIVE_SCALE_CAPABILITIES
                if cfg.channels > 1 && self.version.is_some_and(|v| v >= nvsp::version::V5) =>
            {
                let caps = rndis::RssCapabilities {
                    header: rndis::ObjectHeader {
                        obj_type: rndis::OBJECT_TYPE_RSS_CAPABILITIES,
                        revision: 2,
                        size: (size_of::<rndis::RssCapabilities>() as u16).into(),
                    },
                    capabilities: (rndis::RSS_CAPS_HASH_TOEPLITZ
                        | rndis::RSS_CAPS_CLASSIFICATION_AT_DPC
                        | rndis::RSS_CAPS_HASH_TYPE_TCP_IPV4
                        | rndis::RSS_CAPS_HASH_TYPE_TCP_IPV6)
                        .into(),
                    num_interrupt_messages: 1.into(),
                    num_receive_queues: u32::from(cfg.channels).into(),
                    num_indirection_entries: (rndis::RSS_TABLE_MAX as u16).into(),
                };
                caps.as_bytes().to_vec()
            }
            _ => return (rndis::status::NOT_SUPPORTED, Vec::new()),
        };
        (rndis::status::SUCCESS, data)
    }

    fn set(&mut self, oid: u32, info: &[u8]) -> u32 {
        use rndis::{oid, status};
        match oid {
            oid::GEN_CURRENT_PACKET_FILTER => match info.get(..4) {
                Some(b) => {
                    self.filter = u32::from_le_bytes(b.try_into().expect("4 bytes"));
                    status::SUCCESS
                }
                None => status::INVALID_DATA,
            },
            oid::TCP_OFFLOAD_PARAMETERS => match rndis::ObjectHeader::read_from_prefix(info) {
                Ok((h, rest))
                    if h.obj_type == rndis::OBJECT_TYPE_OFFLOAD_PARAMETERS
                        && rest.len() >= self.offload_params.len() =>
                {
                    let n = self.offload_params.len();
                    self.offload_params.copy_from_slice(&rest[..n]);
                    status::SUCCESS
                }
                _ => status::INVALID_DATA,
            },
            oid::GEN_RNDIS_CONFIG_PARAMETER => self.config_parameter(info),
            oid::GEN_RECEIVE_SCALE_PARAMETERS => match parse_rss(info) {
                Some(r) => {
                    self.rss = r;
                    status::SUCCESS
                }
                None => status::INVALID_DATA,
            },
            _ => status::NOT_SUPPORTED,
        }
    }

    fn config_parameter(&mut self, info: &[u8]) -> u32 {
        use rndis::status;
        let Ok((p, _)) = rndis::ConfigParameter::read_from_prefix(info) else {
            return status::INVALID_DATA;
        };
        let field = |off: u32, len: u32| {
            let (off, len) = (off as usize, len as usize);
            info.get(off..off.checked_add(len)?)
        };
        let (Some(name), Some(value)) = (
            field(p.name_offset.get(), p.name_length.get()),
            field(p.value_offset.get(), p.value_length.get()),
        ) else {
            return status::INVALID_DATA;
        };
        if !rndis::from_utf16(name).eq_ignore_ascii_case("NetworkAddress") {
            // Other parameters are accepted and ignored.
            return status::SUCCESS;
        }
        let text = rndis::from_utf16(value);
        let hex: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        if p.param_type.get() != 2 || hex.len() != 12 {
            return status::INVALID_DATA;
        }
        let mut mac = [0u8; 6];
        for (i, b) in mac.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
        if mac[0] & 1 != 0 || mac == [0; 6] {
            return status::INVALID_DATA;
        }
        self.mac = mac;
        status::SUCCESS
    }

    /// Tells the guest about a link change; true if an indication went out.
    fn tell_link(&mut self, c: &mut Chan) -> bool {
        let up = self.dev.link_up();
        if !self.rndis_ready || self.link_told == Some(up) || self.recv.is_none() {
            return false;
        }
        self.link_told = Some(up);
        let st = if up {
            rndis::status::MEDIA_CONNECT
        } else {
            rndis::status::MEDIA_DISCONNECT
        };
        let b = rndis::IndicateStatus {
            status: st.into(),
            status_buflen: 0.into(),
            status_buf_offset: 0.into(),
        };
        self.count(|c| &c.link_indications, 1);
        let msg = message(rndis::msg::INDICATE_STATUS, b.as_bytes(), &[]);
        if let Err(e) = self.queue(c, Out::Control(msg)) {
            self.fail(c, e);
        }
        true
    }

    // ---------------------------------------------------------------
    // Host to guest.

    /// Moves queued frames into the guest's receive buffer.
    fn deliver(&mut self, chans: &mut [Option<Chan>]) -> bool {
        if self.port.drain(&mut self.out, DRAIN_BATCH) == 0 {
            return false;
        }
        let ready = self.rndis_ready && self.filter != 0 && self.rx.is_some() && self.dev.link_up();
        let mut out = std::mem::take(&mut self.out);
        if !ready {
            self.count(|c| &c.drop_rx_not_ready, out.len() as u64);
            out.clear();
            self.out = out;
            return true;
        }
        let usable = |c: &Option<Chan>| c.as_ref().is_some_and(|c| !c.dead);
        let open = chans.iter().filter(|c| usable(c)).count();
        // Pick each frame's channel: the flow hash through the guest's
        // indirection table.
        self.picks.clear();
        for d in &out {
            let (mut ci, mut hash) = (0u16, None);
            if open > 1
                && let Some(h) = flow_hash(self.rss.as_ref(), frame_body(&d.data))
            {
                hash = Some(h);
                let want = match &self.rss {
                    Some(r) if r.table_len > 0 => usize::from(r.table[h as usize % r.table_len]),
                    _ => h as usize % open,
                };
                if chans.get(want).is_some_and(usable) {
                    ci = want as u16;
                }
            }
            self.picks.push((ci, hash));
        }
        if !chans.first().is_some_and(usable) {
            let lost = self.picks.iter().filter(|p| p.0 == 0).count();
            self.count(|c| &c.drop_rx_not_ready, lost as u64);
        }
        // One channel at a time, so each packet's messages are contiguous
        // in the receive buffer and packets go in flight in ring order.
        for (ci, slot) in chans.iter_mut().enumerate() {
            let Some(c) = slot else {
                continue;
            };
            if c.dead {
                continue;
            }
            for (i, d) in out.iter().enumerate() {
                let (pc, hash) = self.picks[i];
                if usize::from(pc) == ci {
                    self.deliver_one(c, d, hash);
                }
            }
            if !c.ranges.is_empty() {
                self.flush_data(c);
            }
        }
        out.clear();
        self.out = out;
        true
    }

    fn accepts(&self, dst: &[u8]) -> bool {
        use rndis::filter::*;
        let f = self.filter;
        if f & PROMISCUOUS != 0 {
            return true;
        }
        if dst == [0xff; 6] {
            f & BROADCAST != 0
        } else if dst[0] & 1 != 0 {
            f & (MULTICAST | ALL_MULTICAST) != 0
        } else {
            f & DIRECTED != 0 && dst == self.mac
        }
    }

    fn deliver_one(&mut self, c: &mut Chan, d: &Delivery, hash: Option<u32>) {
        let mut tag_buf = [0u8; 4];
        let [macs, tag, rest] = d.parts(&mut tag_buf);
        // The guest gets untagged frames with the tag in a PPI.
        let (tci, body) = if tag.len() == 4 {
            (Some(u16::from_be_bytes([tag[2], tag[3]])), rest)
        } else if rest.len() >= 4 && rest[..2] == ETHERTYPE_VLAN.to_be_bytes() {
            (Some(u16::from_be_bytes([rest[2], rest[3]])), &rest[4..])
        } else {
            (None, rest)
        };
        if !self.accepts(&macs[..6]) {
            self.count(|c| &c.drop_rx_filtered, 1);
            return;
        }
        if 12 + body.len() > self.max_rx_frame() {
            self.count(|c| &c.drop_rx_oversize, 1);
            return;
        }
        // A guest that did not ask for 802.1Q PPIs gets the tag in the frame.
        let inline_tag = tci.filter(|_| !self.vlan_ppi());
        let tag_len = if inline_tag.is_some() { 4 } else { 0 };
        let frame_len = 12 + tag_len + body.len();
        let mut info = PacketInfo {
            vlan: tci
                .filter(|_| inline_tag.is_none())
                .map(rndis::vlan::from_tci),
            hash,
            ..Default::default()
        };
        // The body of `d.data` starts 12 bytes (untagged) or 16 bytes in.
        let body_from = d.data.len() - body.len();
        let mut csum_fix = None;
        if let Some(pc) = d.offload.csum {
            let start = usize::from(pc.start);
            let at = start + usize::from(pc.offset);
            if start < body_from || at + 2 > d.data.len() {
                self.count(|c| &c.drop_rx_oversize, 1);
                return;
            }
            let mut v = !crate::offload::fold(crate::offload::ones_sum(&d.data[start..], 0));
            if v == 0 && pc.offset == 6 {
                v = 0xffff;
            }
            csum_fix = Some((12 + tag_len + at - body_from, v));
            info.csum = Some(match pc.offset {
                6 => rndis::csum_rx::UDP_SUCCEEDED | rndis::csum_rx::IP_SUCCEEDED,
                _ => rndis::csum_rx::TCP_SUCCEEDED | rndis::csum_rx::IP_SUCCEEDED,
            });
        }
        if !c.outbox.is_empty() {
            // Replies wait for the ring: so do frames, which are dropped.
            self.count(|c| &c.drop_rx_ring_full, 1);
            return;
        }
        if c.ranges.len() == MAX_RANGES {
            self.flush_data(c);
        }
        let (Some(rx), Some(recv)) = (self.rx.as_mut(), self.recv.as_ref()) else {
            self.count(|c| &c.drop_rx_not_ready, 1);
            return;
        };
        if c.ranges.is_empty() && rx.table_full() {
            self.count(|c| &c.drop_rx_no_buffer, 1);
            return;
        }
        let mut hdr = [0u8; 96];
        let hlen = rndis::write_packet_headers(&mut hdr, frame_len, &info);
        let msg_len = (hlen + frame_len) as u32;
        let Some(off) = rx.alloc(msg_len) else {
            self.count(|c| &c.drop_rx_no_buffer, 1);
            return;
        };
        let buf = recv.map.slice();
        let o = off as usize;
        let _ = buf.write_at(o, &hdr[..hlen]);
        let _ = buf.write_at(o + hlen, macs);
        if let Some(tci) = inline_tag {
            let mut t = [0x81, 0x00, 0, 0];
            t[2..].copy_from_slice(&tci.to_be_bytes());
            let _ = buf.write_at(o + hlen + 12, &t);
        }
        let _ = buf.write_at(o + hlen + 12 + tag_len, body);
        if let Some((at, v)) = csum_fix {
            let _ = buf.write_at(o + hlen + at, &v.to_be_bytes());
        }
        c.ranges.push((msg_len, off));
    }

    /// Sends the data packet a channel has been building.
    fn flush_data(&mut self, c: &mut Chan) {
        let Some(rx) = self.rx.as_mut() else {
            c.ranges.clear();
            return;
        };
        let tid = rx.next_tid();
        let payload = nvsp::rndis_pkt_payload(nvsp::channel_type::DATA);
        let r = write_transfer_pages(
            &mut c.ch.outgoing,
            tid,
            PACKET_FLAG_COMPLETION_REQUESTED,
            nvsp::RECV_BUFFER_ID,
            &c.ranges,
            &payload,
        );
        let n = c.ranges.len() as u64;
        c.ranges.clear();
        match r {
            Ok(()) => {
                rx.commit();
                self.count(|c| &c.rx_packets, 1);
            }
            Err(e) => {
                rx.rollback();
                self.count(|c| &c.drop_rx_ring_full, n);
                if let WriteError::Ring(e) = e {
                    self.fail(c, e);
                }
            }
        }
    }
}

/// What follows the MAC addresses and any 802.1Q tag.
fn frame_body(data: &[u8]) -> &[u8] {
    let from = if data.get(12..14) == Some(&ETHERTYPE_VLAN.to_be_bytes()[..]) {
        16
    } else {
        12
    };
    data.get(from..).unwrap_or_default()
}

/// An RNDIS message: header, `body`, then `data`.
fn message(msg_type: u32, body: &[u8], data: &[u8]) -> Vec<u8> {
    let len = rndis::HEADER_SIZE + body.len() + data.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(
        rndis::Header {
            msg_type: msg_type.into(),
            msg_len: (len as u32).into(),
        }
        .as_bytes(),
    );
    m.extend_from_slice(body);
    m.extend_from_slice(data);
    m
}

/// Parses OID_GEN_RECEIVE_SCALE_PARAMETERS; Some(None) disables RSS.
fn parse_rss(info: &[u8]) -> Option<Option<RssState>> {
    let (p, _) = rndis::RssParameters::read_from_prefix(info).ok()?;
    if p.header.obj_type != rndis::OBJECT_TYPE_RSS_PARAMETERS {
        return None;
    }
    if p.flags.get() & rndis::RSS_PARAM_FLAG_DISABLE_RSS != 0 {
        return Some(None);
    }
    let (toff, tlen) = (
        p.table_offset.get() as usize,
        usize::from(p.table_size.get()),
    );
    let (koff, klen) = (p.key_offset.get() as usize, usize::from(p.key_size.get()));
    let entries = tlen / 4;
    if entries > rndis::RSS_TABLE_MAX || klen > rndis::RSS_KEY_MAX {
        return None;
    }
    let table = info.get(toff..toff.checked_add(entries * 4)?)?;
    let key = info.get(koff..koff.checked_add(klen)?)?;
    let mut s = RssState {
        key: [0; rndis::RSS_KEY_MAX],
        key_len: klen,
        table: [0; rndis::RSS_TABLE_MAX],
        table_len: entries,
        hash_info: p.hash_info.get(),
    };
    s.key[..klen].copy_from_slice(key);
    for (i, e) in table.chunks_exact(4).enumerate() {
        // Entries name channels; clamp what no channel could be.
        s.table[i] = u32::from_le_bytes(e.try_into().expect("4 bytes")).min(255) as u8;
    }
    Some(Some(s))
}

/// The Toeplitz hash the guest's RSS settings ask for, or a fixed-key one.
fn flow_hash(rss: Option<&RssState>, body: &[u8]) -> Option<u32> {
    let mut input = [0u8; 36];
    let (n, ports) = hash_input(body, &mut input)?;
    let (key, hash_info) = match rss {
        Some(r) if r.key_len >= 4 => (&r.key[..r.key_len], r.hash_info),
        _ => (&rss::DEFAULT_KEY[..], u32::MAX),
    };
    // Hash the ports only when the guest asked for TCP hashing.
    let tcp_types = rss::HASH_TCP_IPV4 | rss::HASH_TCP_IPV6;
    let n = if ports && hash_info & tcp_types != 0 {
        n
    } else if ports {
        n - 4
    } else {
        n
    };
    Some(rss::toeplitz(key, &input[..n]))
}

/// Addresses (and TCP ports) of a frame body (what follows the MACs), in
/// Toeplitz input order: returns the length and whether ports are in it.
fn hash_input(body: &[u8], out: &mut [u8; 36]) -> Option<(usize, bool)> {
    let et = u16::from_be_bytes([*body.first()?, *body.get(1)?]);
    let l3 = body.get(2..)?;
    let (addrs, proto, l4) = match et {
        ETHERTYPE_IPV4 => {
            let ihl = usize::from(l3.first()? & 0xf) * 4;
            let frag = u16::from_be_bytes([*l3.get(6)?, *l3.get(7)?]) & 0x3fff;
            let l4 = if frag == 0 { l3.get(ihl..) } else { None };
            (l3.get(12..20)?, *l3.get(9)?, l4)
        }
        ETHERTYPE_IPV6 => (l3.get(8..40)?, *l3.get(6)?, l3.get(40..)),
        _ => return None,
    };
    out[..addrs.len()].copy_from_slice(addrs);
    let n = addrs.len();
    match (proto, l4) {
        (IPPROTO_TCP, Some(l4)) if l4.len() >= 4 => {
            out[n..n + 4].copy_from_slice(&l4[..4]);
            Some((n + 4, true))
        }
        _ => Some((n, false)),
    }
}

/// Offload state of a frame from the guest's PPIs, fixing what the guest
/// leaves for the host on LSO (IP lengths, IPv4 header checksum, the TCP
/// pseudo-header sum). `shift` is 4 when a VLAN tag was inserted.
fn tx_offload(frame: &mut [u8], info: &PacketInfo, shift: usize) -> Result<Offload, ()> {
    let len = frame.len();
    let et_at = if shift == 4 { 16 } else { 12 };
    let ethertype = u16::from_be_bytes([frame[et_at], frame[et_at + 1]]);
    let l3 = et_at + 2;
    if let Some(v) = info.lso {
        let mss = rndis::lso::mss(v);
        let tcp = usize::from(rndis::lso::tcp_header_offset(v)) + shift;
        let v6 = rndis::lso::is_ipv6(v);
        if mss == 0 || mss > u32::from(u16::MAX) || tcp + 20 > len || tcp < l3 {
            return Err(());
        }
        let tcp_len = len - tcp;
        let kind = if v6 {
            if ethertype != ETHERTYPE_IPV6 || tcp < l3 + 40 || frame[l3] >> 4 != 6 {
                return Err(());
            }
            let payload = u16::try_from(len - l3 - 40).map_err(|_| ())?;
            frame[l3 + 4..l3 + 6].copy_from_slice(&payload.to_be_bytes());
            GsoKind::Tcp6
        } else {
            let ihl = usize::from(frame.get(l3).ok_or(())? & 0xf) * 4;
            if ethertype != ETHERTYPE_IPV4
                || frame[l3] >> 4 != 4
                || ihl < 20
                || l3 + ihl > tcp
                || frame[l3 + 9] != IPPROTO_TCP
            {
                return Err(());
            }
            let total = u16::try_from(len - l3).map_err(|_| ())?;
            frame[l3 + 2..l3 + 4].copy_from_slice(&total.to_be_bytes());
            frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
            let sum = !crate::offload::fold(crate::offload::ones_sum(&frame[l3..l3 + ihl], 0));
            frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
            GsoKind::Tcp4
        };
        // Pseudo-header sum with the whole TCP length, as GSO senders leave it.
        let addrs = if v6 {
            &frame[l3 + 8..l3 + 40]
        } else {
            &frame[l3 + 12..l3 + 20]
        };
        let pseudo = crate::offload::fold(crate::offload::ones_sum(
            addrs,
            u64::from(IPPROTO_TCP) + tcp_len as u64,
        ));
        frame[tcp + 16..tcp + 18].copy_from_slice(&pseudo.to_be_bytes());
        return Ok(Offload {
            csum: Some(PartialCsum {
                start: tcp as u16,
                offset: 16,
            }),
            gso: Some(Gso {
                kind,
                mss: mss as u16,
                ecn: false,
            }),
        });
    }
    let Some(v) = info.csum else {
        return Ok(Offload::default());
    };
    use rndis::csum_tx;
    if v & csum_tx::IP_HEADER != 0 && v & csum_tx::IS_IPV4 != 0 && ethertype == ETHERTYPE_IPV4 {
        let ihl = usize::from(frame.get(l3).ok_or(())? & 0xf) * 4;
        if ihl < 20 || l3 + ihl > len {
            return Err(());
        }
        frame[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
        let sum = !crate::offload::fold(crate::offload::ones_sum(&frame[l3..l3 + ihl], 0));
        frame[l3 + 10..l3 + 12].copy_from_slice(&sum.to_be_bytes());
    }
    let offset = if v & csum_tx::TCP != 0 {
        16
    } else if v & csum_tx::UDP != 0 {
        6
    } else {
        return Ok(Offload::default());
    };
    let start = usize::from(csum_tx::header_offset(v)) + shift;
    if start < l3 || start + offset + 2 > len {
        return Err(());
    }
    Ok(Offload {
        csum: Some(PartialCsum {
            start: start as u16,
            offset: offset as u16,
        }),
        gso: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::{fold, ones_sum};

    fn ipv4_tcp_frame(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[14 + 8] = 64;
        f[14 + 9] = IPPROTO_TCP;
        f[14 + 12..14 + 16].copy_from_slice(&[10, 0, 0, 1]);
        f[14 + 16..14 + 20].copy_from_slice(&[10, 0, 0, 2]);
        f[34 + 12] = 0x50;
        f
    }

    #[test]
    fn lso_frames_get_lengths_and_checksums_fixed() {
        let mut f = ipv4_tcp_frame(3000);
        let info = PacketInfo {
            lso: Some(rndis::lso::encode(1448, 34, false)),
            ..Default::default()
        };
        let o = tx_offload(&mut f, &info, 0).unwrap();
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 3040);
        assert_eq!(
            fold(ones_sum(&f[14..34], 0)),
            0xffff,
            "IPv4 header checksum"
        );
        let g = o.gso.unwrap();
        assert_eq!((g.kind, g.mss), (GsoKind::Tcp4, 1448));
        assert_eq!(
            o.csum,
            Some(PartialCsum {
                start: 34,
                offset: 16
            })
        );
        // The TCP checksum field holds the pseudo-header sum with length:
        // completing it over the segment must verify.
        let mut seg = f.clone();
        let v = !fold(ones_sum(&seg[34..], 0));
        seg[50..52].copy_from_slice(&v.to_be_bytes());
        let verify = fold(ones_sum(
            &seg[34..],
            ones_sum(&seg[26..34], 6 + (seg.len() - 34) as u64),
        ));
        assert_eq!(verify, 0xffff);
        // Bad LSO: header offset past the frame, UDP, zero MSS.
        let mut f = ipv4_tcp_frame(10);
        let bad = |v| PacketInfo {
            lso: Some(v),
            ..Default::default()
        };
        assert!(tx_offload(&mut f, &bad(rndis::lso::encode(1448, 60, false)), 0).is_err());
        assert!(tx_offload(&mut f, &bad(rndis::lso::encode(0, 34, false)), 0).is_err());
        assert!(tx_offload(&mut f, &bad(rndis::lso::encode(1448, 34, true)), 0).is_err());
        f[23] = crate::wire::IPPROTO_UDP;
        assert!(tx_offload(&mut f, &bad(rndis::lso::encode(1448, 34, false)), 0).is_err());
    }

    #[test]
    fn checksum_ppi_becomes_partial_checksum() {
        let mut f = ipv4_tcp_frame(100);
        let v = rndis::csum_tx::IS_IPV4 | rndis::csum_tx::TCP | 34 << 16;
        let info = PacketInfo {
            csum: Some(v),
            ..Default::default()
        };
        let o = tx_offload(&mut f, &info, 0).unwrap();
        assert_eq!(
            o.csum,
            Some(PartialCsum {
                start: 34,
                offset: 16
            })
        );
        assert!(o.gso.is_none());
        // With a VLAN tag inserted, offsets move by 4.
        let mut t = f[..12].to_vec();
        t.extend_from_slice(&[0x81, 0, 0, 5]);
        t.extend_from_slice(&f[12..]);
        let o = tx_offload(&mut t, &info, 4).unwrap();
        assert_eq!(o.csum.unwrap().start, 38);
        let udp = rndis::csum_tx::IS_IPV4 | rndis::csum_tx::UDP | 34 << 16;
        let o = tx_offload(
            &mut f,
            &PacketInfo {
                csum: Some(udp),
                ..Default::default()
            },
            0,
        )
        .unwrap();
        assert_eq!(o.csum.unwrap().offset, 6);
        let past = rndis::csum_tx::TCP | 150 << 16;
        assert!(
            tx_offload(
                &mut f,
                &PacketInfo {
                    csum: Some(past),
                    ..Default::default()
                },
                0
            )
            .is_err()
        );
    }

    #[test]
    fn flow_hash_inputs() {
        let mut f = ipv4_tcp_frame(0);
        f[34..36].copy_from_slice(&1000u16.to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        let mut input = [0u8; 36];
        let (n, l4) = hash_input(&f[12..], &mut input).unwrap();
        assert!(l4);
        assert_eq!(&input[..n], &[10, 0, 0, 1, 10, 0, 0, 2, 0x03, 0xe8, 0, 80]);
        assert!(hash_input(&[0x08, 0x06, 0, 1], &mut input).is_none());
    }
}
