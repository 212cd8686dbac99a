//! A netvsc-like client: the guest side of the network VSP, for tests, the
//! demo and benchmarks.
//!
//! The protocol logic is written once over [`vmbus::vsc`]: it runs over
//! hosted mode ([`vmbus::hosted::client::HostedClient`] and its
//! [`ClientChannel`]s, the default) and inside a VM, where the VMM's test
//! guest provides the bus and channels (`vmm::testguest::GuestVsc`: every
//! channel message an HvPostMessage, every signal an HvSignalEvent, every
//! host signal a SynIC interrupt, the rings and buffers in guest RAM).
//!
//! It follows what Linux's hv_netvsc sends, in the same order and shapes:
//! NVSP INIT newest version first (stepping down on failure), NDIS config
//! and version, the receive buffer (id 0xCAFE) and send buffer as GPADLs,
//! RNDIS INIT, the OID queries and sets, SUBCHANNEL and the RSS parameters.
//! RNDIS control messages go GPA-direct from a control page (optionally
//! placed across a page boundary, as one range with two pfns or as two
//! ranges); data messages are packed into send-buffer sections, several per
//! section, each padded to the host's alignment; large frames go
//! GPA-direct. Received transfer-page packets are read in place from the
//! receive buffer and completed with 8-byte completions.
//!
//! The low-level helpers ([`send_nvsp`], [`read_packet`], ...) let tests
//! send exact bytes and inspect exact replies.
//!
//! - `connect`: [`NetvscClient::connect`], Linux's initialisation step by
//!   step; `data`: sending and receiving frames; `wire`: the NVSP and RNDIS
//!   helpers; [`packets`]: the frames and exchanges tests and benchmarks
//!   use; [`linux`]: the checks Linux applies to the host's answers.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use vmbus::channel::Wait;
use vmbus::hosted::client::ClientChannel;
use vmbus::packet::{TransferPages, write_gpa_direct};
use vmbus::ring::{RingError, WriteError};
use vmbus::vsc::{BusError, Offer, Pages, VscBus, VscChannel};
use vmbus::wire::{PACKET_FLAG_COMPLETION_REQUESTED, packet_type};
use vmbus::{MappedPages, SharedMemory, SharedSlice};
use zerocopy::{FromBytes, IntoBytes};

use super::nvsp::{self, NvspMessage};
use super::rndis::{self, PacketInfo};
use crate::wire::MacAddr;

mod connect;
mod data;
mod hosted;
pub mod linux;
pub mod packets;
mod wire;

pub use wire::{
    HostPacket, complete_receive, oid_message, parse_query_complete, read_packet, rndis_message,
    send_nvsp, wait_completion, wait_packet,
};

pub use hosted::connect_hosted;

/// Transaction id Linux uses for NVSP initialisation requests.
pub const INIT_TXID: u64 = u64::MAX - 2;
/// Transaction id of messages that want no completion.
pub const NO_RESPONSE_TXID: u64 = u64::MAX - 1;
/// Time to wait for a reply.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Client-side failures.
#[derive(Debug, thiserror::Error)]
pub enum NetvscError {
    #[error("VMBus: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Memory(#[from] vmbus::MemoryError),
    #[error("ring full")]
    Full,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("host answered {what} with status {status:#x}")]
    Status { what: &'static str, status: u32 },
    #[error("host sent a malformed {0}")]
    Malformed(&'static str),
    #[error("host accepted no NVSP version")]
    NoVersion,
    #[error("hosted mode: {0}")]
    Hosted(#[from] vmbus::hosted::client::ClientError),
    #[error("no network device with instance {0} is offered")]
    NoOffer(vmbus::Guid),
    /// A reply a Linux 6.1 guest would drop, refuse or wait on forever.
    #[error("Linux refuses the host's reply: {0}")]
    Linux(#[from] linux::Refused),
}

impl From<WriteError> for NetvscError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Full { .. } => NetvscError::Full,
            WriteError::Ring(r) => NetvscError::Ring(r),
        }
    }
}

/// How a GPA-direct RNDIS message is laid out in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// At the start of a page: one range, one page.
    PageStart,
    /// Crossing a page boundary `before` bytes from the end of the first
    /// page, described as one range with two pfns (newer kernels).
    StraddleOneRange { before: u32 },
    /// Crossing a page boundary, described as two ranges (older kernels).
    StraddleTwoRanges { before: u32 },
}

/// Settings of a [`NetvscClient`].
#[derive(Debug, Clone)]
pub struct NetvscOptions {
    /// NVSP versions to try, newest first.
    pub versions: Vec<u32>,
    pub recv_buffer_bytes: u64,
    pub send_buffer_bytes: u64,
    /// Pages of each ring, control page included.
    pub ring_pages: u64,
    /// Sub-channels to ask for at most. Linux asks for `min(online CPUs,
    /// receive queues, 16) - 1`, and only after an RSS capabilities reply
    /// it accepts; [`NetvscOptions::linux`] sets this the same way.
    pub subchannels: u16,
    /// MTU sent in SEND_NDIS_CONFIG.
    pub mtu: u32,
    /// Packet filter set after initialisation (0: leave it unset).
    pub packet_filter: u32,
    /// Register the buffers with their pages in a scrambled order, so
    /// host-side ranges cross discontiguous guest pages.
    pub scatter_buffers: bool,
    /// Where RNDIS control messages are placed.
    pub control_placement: Placement,
}

impl NetvscOptions {
    /// What a Linux 6.1 guest with `cpus` online CPUs asks for (the
    /// defaults, plus sub-channels up to `min(cpus, 16) - 1`).
    pub fn linux(cpus: u32) -> Self {
        NetvscOptions {
            subchannels: (cpus.clamp(1, linux::DEFAULT_CHANNELS) - 1) as u16,
            ..NetvscOptions::default()
        }
    }
}

impl Default for NetvscOptions {
    fn default() -> Self {
        NetvscOptions {
            versions: nvsp::SUPPORTED_VERSIONS.to_vec(),
            recv_buffer_bytes: 2 << 20,
            send_buffer_bytes: 1 << 20,
            ring_pages: 64,
            subchannels: 0,
            mtu: 1500,
            packet_filter: rndis::filter::DIRECTED
                | rndis::filter::ALL_MULTICAST
                | rndis::filter::BROADCAST,
            scatter_buffers: false,
            control_placement: Placement::PageStart,
        }
    }
}

/// A frame to send.
#[derive(Debug, Clone, Copy)]
pub struct TxFrame<'a> {
    pub data: &'a [u8],
    pub info: PacketInfo,
}

impl<'a> TxFrame<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        TxFrame {
            data,
            info: PacketInfo::default(),
        }
    }
}

/// A received frame, read in place from the receive buffer.
#[derive(Debug)]
pub struct RxFrame<'a> {
    pub data: SharedSlice<'a>,
    pub info: PacketInfo,
    pub channel: usize,
}

impl RxFrame<'_> {
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.data.len()];
        self.data.read_at(0, &mut v).expect("inside the frame");
        v
    }
}

/// A buffer registered with the host.
#[derive(Debug)]
struct Buffer {
    pages: Pages,
    gpadl: u32,
    /// The pages as the host sees them, in GPADL order.
    map: MappedPages,
}

/// Sends in flight: the transaction id carries the section.
const TID_SECTION_BITS: u32 = 32;
/// Transaction ids of GPA-direct data sends (no section).
const DIRECT_TAG: u32 = 0xFFFF_FFFF;

/// What the receive path updates besides frames.
#[derive(Debug, Default)]
pub struct ClientState {
    /// Current link state (from the query, then indications).
    pub link_up: bool,
    /// Status codes of INDICATE_STATUS messages received.
    pub indications: Vec<u32>,
    /// The host's send indirection table, if it sent one.
    pub send_table: Option<Vec<u32>>,
    /// Completions from the host with a failure status.
    pub failed_sends: u64,
    /// RNDIS control replies not yet claimed.
    replies: VecDeque<Vec<u8>>,
}

/// A connected netvsc client over channels of type `C` (hosted mode's
/// [`ClientChannel`] by default; a VM's test guest provides another).
#[derive(Debug)]
pub struct NetvscClient<C: VscChannel = ClientChannel> {
    pub channels: Vec<C>,
    memory: SharedMemory,
    /// Negotiated NVSP version.
    pub version: u32,
    pub mac: MacAddr,
    /// OID_GEN_MAXIMUM_FRAME_SIZE.
    pub mtu: u32,
    /// The MTU Linux ends up with: the one it sent, lowered by the
    /// MAXIMUM_FRAME_SIZE reply ([`linux::frame_size`]).
    pub linux_mtu: u32,
    pub link_speed: u32,
    pub friendly_name: Option<String>,
    /// The raw OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES reply.
    pub offload: Vec<u8>,
    /// The raw OID_GEN_RECEIVE_SCALE_CAPABILITIES reply (empty if refused).
    pub rss_caps: Vec<u8>,
    /// Receive queues from an RSS capabilities reply Linux accepts (None:
    /// Linux stays on one channel).
    pub rss_queues: Option<u32>,
    /// The offloads Linux enables from the capabilities reply.
    pub features: linux::Features,
    pub max_pkt_per_msg: u32,
    pub pkt_align: u32,
    pub section_size: u32,
    /// sub_alloc_size and num_sub_allocs of the receive buffer.
    pub recv_sub_alloc: (u32, u32),
    recv: Buffer,
    send: Buffer,
    /// Page for GPA-direct control messages and large frames.
    direct: Pages,
    free_sections: Vec<u32>,
    next_seq: u64,
    next_req: u32,
    pub state: ClientState,
    /// Frames received while waiting for control replies.
    pub frames_while_waiting: u64,
    ranges: TransferPages,
}

impl<C: VscChannel> NetvscClient<C> {
    fn req_id(&mut self) -> u32 {
        self.next_req += 1;
        self.next_req
    }

    // -------------------------------------------------------------------
    // Control path.

    fn wait_completion_primary(&mut self, tid: u64) -> Result<NvspMessage, NetvscError> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(m) = self.pump_for(0, Some(tid))? {
                return Ok(m);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NetvscError::Timeout("an NVSP completion"));
            }
            self.channels[0].wait(left)?;
        }
    }

    /// Sends an RNDIS control message and waits for the reply with the
    /// same request id (the whole reply message).
    pub fn request(&mut self, msg: &[u8], placement: Placement) -> Result<Vec<u8>, NetvscError> {
        let req = u32::from_le_bytes(msg[8..12].try_into().expect("request id"));
        let tid = self.send_direct(0, msg, placement, nvsp::channel_type::CONTROL)?;
        let deadline = Instant::now() + TIMEOUT;
        let mut completed = false;
        loop {
            if let Some(m) = self.pump_for(0, Some(tid))? {
                let c: nvsp::RndisPktComplete = m.body_as();
                if c.status.get() != nvsp::status::SUCCESS {
                    return Err(NetvscError::Status {
                        what: "control SEND_RNDIS_PKT",
                        status: c.status.get(),
                    });
                }
                completed = true;
            }
            if let Some(i) = self
                .state
                .replies
                .iter()
                .position(|r| r.len() >= 12 && r[8..12] == req.to_le_bytes())
                && completed
            {
                return Ok(self.state.replies.remove(i).expect("present"));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(NetvscError::Timeout("an RNDIS reply"));
            }
            self.channels[0].wait(left)?;
        }
    }

    /// OID query: (status, data).
    pub fn query(
        &mut self,
        oid: u32,
        input: &[u8],
        placement: Placement,
    ) -> Result<(u32, Vec<u8>), NetvscError> {
        let req = self.req_id();
        let r = self.request(&oid_message(rndis::msg::QUERY, req, oid, input), placement)?;
        parse_query_complete(&r)
    }

    /// OID set: status.
    pub fn set(&mut self, oid: u32, data: &[u8], placement: Placement) -> Result<u32, NetvscError> {
        let req = self.req_id();
        let r = self.request(&oid_message(rndis::msg::SET, req, oid, data), placement)?;
        let c = rndis::SetComplete::read_from_prefix(r.get(8..).unwrap_or_default())
            .map_err(|_| NetvscError::Malformed("SET_COMPLETE"))?
            .0;
        Ok(c.status.get())
    }

    /// Waits until channel `chan` has something to read (or the timeout).
    pub fn wait(&mut self, chan: usize, timeout: Duration) -> Result<(), NetvscError> {
        self.channels[chan].wait(timeout)?;
        Ok(())
    }

    /// Sections free for sending.
    pub fn free_sections(&self) -> usize {
        self.free_sections.len()
    }

    /// Sections in the send buffer.
    pub fn sections(&self) -> usize {
        self.send.map.len() / self.section_size as usize
    }

    /// The receive buffer as the host sees it (tests inspect it).
    pub fn receive_buffer(&self) -> SharedSlice<'_> {
        self.recv.map.slice()
    }

    /// The send buffer (tests write malformed sections into it).
    pub fn send_buffer(&self) -> SharedSlice<'_> {
        self.send.map.slice()
    }

    /// Client pages backing the buffers (receive, send).
    pub fn buffer_pages(&self) -> (Pages, Pages) {
        (self.recv.pages, self.send.pages)
    }

    /// GPADL ids of the buffers (receive, send).
    pub fn buffer_gpadls(&self) -> (u32, u32) {
        (self.recv.gpadl, self.send.gpadl)
    }
}
