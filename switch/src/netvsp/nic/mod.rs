//! One virtual NIC: a peer's netvsc device state, its channels and its
//! switch port, owned by one pool thread and polled to completion.
//!
//! A poll pass ([`Nic::poll`]):
//! 1. reads every channel's ring, parsing each packet into an
//!    [`NvspRequest`](super::nvsp::NvspRequest) before acting on it
//!    ([`nvsp`]): the guest's completions of receive packets free
//!    receive-buffer space; NVSP control messages get their completions;
//!    each SEND_RNDIS_PKT is walked message by message ([`tx`]: one
//!    send-buffer section, GPA-direct ranges, or a section followed by
//!    ranges), RNDIS control messages are answered through the receive
//!    buffer ([`control`]) and every data message becomes a [`Frame`]
//!    copied once out of guest memory into a shared chunk; its completion
//!    is written right away;
//! 2. hands all frames of the pass to the switch in one
//!    [`PortHandle::ingress`] call;
//! 3. drains the frames the switch queued for the port ([`rx`]), picks a
//!    channel per flow (the guest's RSS table, [`super::rss`]), copies each
//!    frame once into the channel's receive-buffer region behind its RNDIS
//!    header and PPIs, and sends one transfer-page packet per channel with
//!    up to 375 ranges;
//! 4. publishes each ring's indices once and signals the guest at most once
//!    per ring. Replies that do not fit a full ring wait in the channel's
//!    [`outbox`].
//!
//! # Protocol state
//!
//! What the guest has set up is one [`NicState`]: NVSP negotiation, then
//! the receive buffer, inside which the RNDIS device is uninitialised or
//! initialised (with its packet filter and the link state last told). A
//! request that comes before what it needs gets the answer documented in
//! [`nvsp`] and [`control`]; frames for the guest flow only in the last
//! state with a non-zero packet filter and the link up.
//!
//! Nothing here trusts the guest: every section index, range, length and
//! offset is checked before use. A malformed message is dropped and
//! counted (and its NVSP packet completed with a failure status); a
//! malformed ring resets the channel through its [`ControlHandle`].

mod control;
mod nvsp;
mod outbox;
mod rx;
#[cfg(test)]
mod tests;
mod tx;

use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::BytesMut;
use vmbus::SharedMemory;
use vmbus::channel::Channel;
use vmbus::event::Epoll;
use vmbus::packet::GpaRanges;
use vmbus::ring::RingError;
use vmbus::server::{ControlHandle, GpadlMap};

use super::buffers::{RecvBuffer, RxRing, SendBuffer};
use super::rss::RssSettings;
use super::{DeviceShared, NetvspCounters, rndis};
use crate::{Delivery, Frame, PortHandle};
use outbox::Outbox;

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
/// Largest RNDIS header (with three PPIs) vspa writes before a frame.
pub const MAX_RX_HEADER: usize = rndis::PACKET_HEADERS + 3 * rndis::PPI_U32_SIZE;
/// Frames read from the guest before they are handed to the switch.
const FRAME_BUDGET: usize = 256;
/// Packets read from one channel per pass.
const READ_BUDGET: usize = 256;
/// Frames drained from the switch per pass.
const DRAIN_BATCH: usize = 512;

/// Why a sub-channel cannot join its NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("channel {0} is already attached")]
    Attached(u16),
    #[error("channel {0} is beyond the device's channels")]
    BeyondChannels(u16),
}

/// One channel of the NIC.
#[derive(Debug)]
pub(crate) struct Chan {
    pub index: u16,
    pub relid: u32,
    pub ch: Channel,
    /// Replies waiting for ring space.
    outbox: Outbox,
    /// (length, offset) ranges of the receive packet being built.
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
            outbox: Outbox::default(),
            ranges: Vec::with_capacity(MAX_RANGES),
            dead: false,
        }
    }

    fn is_primary(&self) -> bool {
        self.index == 0
    }
}

/// How far the guest has set the NIC up.
#[derive(Debug)]
enum NicState {
    /// No NVSP version agreed yet: only INIT is valid.
    Negotiating,
    /// A version is agreed: NDIS settings and the buffers may come.
    Negotiated(Session),
    /// The receive buffer is mapped: RNDIS replies and frames can reach
    /// the guest.
    Receiving {
        session: Session,
        rx: RxBuffer,
        rndis: RndisState,
    },
}

/// What NVSP negotiation agreed and the guest told about itself.
#[derive(Debug)]
struct Session {
    version: u32,
    /// SEND_NDIS_CONFIG: the guest's MTU (plus 14), 0 until sent.
    ndis_mtu: u32,
    /// SEND_NDIS_CONFIG capability bits.
    ndis_caps: u64,
    send: Option<SendBuffer>,
}

/// The mapped receive buffer and its allocator, shared by all channels
/// (they are all on this thread) with one table of packets in flight.
#[derive(Debug)]
struct RxBuffer {
    recv: RecvBuffer,
    ring: RxRing,
}

/// The RNDIS device inside a receiving NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RndisState {
    /// Before INITIALIZE, or after HALT.
    Uninitialized,
    /// INITIALIZE answered.
    Initialized {
        /// OID_GEN_CURRENT_PACKET_FILTER (0: no frames).
        filter: u32,
        /// The link state the guest was last told.
        link_told: bool,
    },
}

impl NicState {
    fn session(&self) -> Option<&Session> {
        match self {
            NicState::Negotiating => None,
            NicState::Negotiated(s) | NicState::Receiving { session: s, .. } => Some(s),
        }
    }

    fn session_mut(&mut self) -> Option<&mut Session> {
        match self {
            NicState::Negotiating => None,
            NicState::Negotiated(s) | NicState::Receiving { session: s, .. } => Some(s),
        }
    }

    fn version(&self) -> Option<u32> {
        self.session().map(|s| s.version)
    }

    fn rx_mut(&mut self) -> Option<&mut RxBuffer> {
        match self {
            NicState::Receiving { rx, .. } => Some(rx),
            _ => None,
        }
    }

    /// The packet filter (0 unless the RNDIS device is initialised).
    fn filter(&self) -> u32 {
        match self {
            NicState::Receiving {
                rndis: RndisState::Initialized { filter, .. },
                ..
            } => *filter,
            _ => 0,
        }
    }
}

/// The RNDIS device's settings a guest may change, kept across HALT.
#[derive(Debug)]
struct Settings {
    /// Current MAC address (the NetworkAddress configuration parameter).
    mac: [u8; 6],
    offload_params: [u8; 11],
    rss: Option<RssSettings>,
    /// Sub-channels offered so far.
    subchannels: u16,
}

/// A NIC: one peer's use of one netvsp device.
#[derive(Debug)]
pub(crate) struct Nic {
    pub id: u64,
    core: NicCore,
    pub chans: Vec<Option<Chan>>,
}

/// Everything of a NIC but its channels (apart, so a pass can borrow one
/// channel and the rest at once).
#[derive(Debug)]
struct NicCore {
    dev: Arc<DeviceShared>,
    port: PortHandle,
    memory: SharedMemory,
    gpadls: GpadlMap,
    control: ControlHandle,
    state: NicState,
    settings: Settings,
    /// Frames read from the guest this pass.
    frames: Vec<Frame>,
    /// Where frames from the guest are copied; frames are cut from it.
    chunk: BytesMut,
    /// GPA ranges of the packet being read.
    ranges: GpaRanges,
    /// (GPA, length) pieces of the SEND_RNDIS_PKT being walked.
    gpa_pieces: Vec<(u64, usize)>,
    /// Where an RNDIS control message is copied to be answered.
    control_buf: Vec<u8>,
    /// Frames drained from the switch this pass.
    out: Vec<Delivery>,
    /// The channel picked for each frame being delivered, and its hash.
    rx_channels: Vec<(u16, Option<u32>)>,
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
            core: NicCore {
                dev,
                port,
                memory,
                gpadls,
                control,
                state: NicState::Negotiating,
                settings: Settings {
                    mac,
                    offload_params: [0; 11],
                    rss: None,
                    subchannels: 0,
                },
                frames: Vec::with_capacity(READ_BUDGET * 4),
                chunk: BytesMut::new(),
                ranges: GpaRanges::new(),
                gpa_pieces: Vec::with_capacity(64),
                control_buf: Vec::with_capacity(control::MAX_CONTROL_MESSAGE),
                out: Vec::with_capacity(DRAIN_BATCH),
                rx_channels: Vec::with_capacity(DRAIN_BATCH),
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
            let may_sleep = match c.outbox.waiting_for() {
                None => c.ch.prepare_sleep(),
                Some(payload) => c.ch.prepare_sleep_for_space(payload),
            };
            match may_sleep {
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
    /// the doorbells that rang (`rang` holds their [`Epoll::token`]s).
    pub fn woke(&mut self, rang: &[u64]) {
        for c in self.chans.iter_mut().flatten() {
            if rang.contains(&Epoll::token(c.ch.doorbell().as_fd())) {
                c.ch.consume_doorbell();
            }
            c.ch.incoming.mask_interrupts();
        }
        let port_fd = Epoll::token(self.core.port.doorbell_fd());
        self.core.port.woke(rang.contains(&port_fd));
    }
}

impl NicCore {
    fn count(&self, c: fn(&NetvspCounters) -> &AtomicU64, n: u64) {
        c(&self.dev.counters).fetch_add(n, Ordering::Relaxed);
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
}
