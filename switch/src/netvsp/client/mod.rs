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

pub mod linux;

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
}

impl From<WriteError> for NetvscError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Full { .. } => NetvscError::Full,
            WriteError::Ring(r) => NetvscError::Ring(r),
        }
    }
}

/// A packet from the host, copied out (tests and control path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPacket {
    Completion {
        tid: u64,
        payload: Vec<u8>,
    },
    TransferPages {
        tid: u64,
        flags: u16,
        set_id: u16,
        ranges: Vec<(u32, u32)>,
        payload: Vec<u8>,
    },
    Inband {
        tid: u64,
        payload: Vec<u8>,
    },
    Other {
        packet_type: u16,
    },
}

/// Writes an NVSP message as an in-band packet (40 bytes, as Linux does).
pub fn send_nvsp(
    ch: &mut impl VscChannel,
    txid: u64,
    completion: bool,
    msg: &NvspMessage,
) -> Result<(), NetvscError> {
    let flags = if completion {
        PACKET_FLAG_COMPLETION_REQUESTED
    } else {
        0
    };
    ch.outgoing()
        .write_packet(packet_type::DATA_INBAND, flags, txid, &[], msg.as_bytes())?;
    ch.flush()?;
    Ok(())
}

/// Reads the next packet, copied out.
pub fn read_packet(ch: &mut impl VscChannel) -> Result<Option<HostPacket>, NetvscError> {
    let Some(p) = ch.incoming().read()? else {
        return Ok(None);
    };
    let tid = p.desc.transaction_id;
    let payload = p.payload();
    let mut bytes = vec![0u8; payload.len()];
    payload.read_at(0, &mut bytes).expect("inside the payload");
    let out = match p.desc.packet_type {
        packet_type::COMPLETION => HostPacket::Completion {
            tid,
            payload: bytes,
        },
        packet_type::DATA_INBAND => HostPacket::Inband {
            tid,
            payload: bytes,
        },
        packet_type::DATA_USING_TRANSFER_PAGES => {
            let mut t = TransferPages::default();
            t.parse(&p)
                .map_err(|_| NetvscError::Malformed("transfer-page packet"))?;
            HostPacket::TransferPages {
                tid,
                flags: p.desc.flags,
                set_id: t.set_id,
                ranges: t
                    .ranges
                    .iter()
                    .map(|r| (r.byte_count.get(), r.byte_offset.get()))
                    .collect(),
                payload: bytes,
            }
        }
        other => HostPacket::Other { packet_type: other },
    };
    Ok(Some(out))
}

/// Waits for the next packet.
pub fn wait_packet(ch: &mut impl VscChannel, timeout: Duration) -> Result<HostPacket, NetvscError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = read_packet(ch)? {
            ch.flush()?;
            return Ok(p);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || ch.wait(left)? == Wait::Stopped {
            return Err(NetvscError::Timeout("a packet from the host"));
        }
    }
}

/// Completes a receive packet (the 8-byte completion Linux sends).
pub fn complete_receive(ch: &mut impl VscChannel, tid: u64) -> Result<(), NetvscError> {
    ch.outgoing()
        .write_completion(tid, &nvsp::rndis_pkt_complete(nvsp::status::SUCCESS))?;
    Ok(())
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

fn register(
    host: &mut impl VscBus,
    relid: u32,
    bytes: u64,
    scatter: bool,
) -> Result<Buffer, NetvscError> {
    let count = bytes.div_ceil(4096).max(1);
    let pages = host.alloc_pages(count)?;
    let mut pfns = pages.pfns();
    if scatter {
        // Swap neighbours: no two adjacent buffer pages are adjacent in memory.
        for pair in pfns.chunks_mut(2) {
            pair.reverse();
        }
    }
    let gpadl = host.create_gpadl(relid, &pfns)?;
    let map = host.memory().map_pages(&pfns)?;
    Ok(Buffer { pages, gpadl, map })
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
    /// Opens the NIC's primary channel through `host` and initialises it as
    /// Linux does.
    pub fn connect(
        host: &mut impl VscBus<Channel = C>,
        offer: &Offer,
        opts: &NetvscOptions,
    ) -> Result<Self, NetvscError> {
        let mut ch = host.open_channel(offer, opts.ring_pages, opts.ring_pages)?;
        let mut version = None;
        for &v in &opts.versions {
            let m = NvspMessage::new(
                nvsp::msg::INIT,
                &nvsp::Init {
                    min_version: v.into(),
                    max_version: v.into(),
                },
            );
            send_nvsp(&mut ch, INIT_TXID, true, &m)?;
            let r = wait_completion(&mut ch, INIT_TXID)?;
            if r.msg_type.get() != nvsp::msg::INIT_COMPLETE {
                return Err(NetvscError::Malformed("INIT_COMPLETE"));
            }
            let c: nvsp::InitComplete = r.body_as();
            if c.status.get() == nvsp::status::SUCCESS {
                version = Some(v);
                break;
            }
        }
        let version = version.ok_or(NetvscError::NoVersion)?;
        if version >= nvsp::version::V2 {
            let m = NvspMessage::new(
                nvsp::msg::SEND_NDIS_CONFIG,
                &nvsp::NdisConfig {
                    mtu: (opts.mtu + 14).into(),
                    reserved: 0.into(),
                    capabilities: nvsp::ndis_config::IEEE8021Q.into(),
                },
            );
            send_nvsp(&mut ch, NO_RESPONSE_TXID, false, &m)?;
        }
        let minor = if version <= nvsp::version::V4 { 1 } else { 30 };
        let m = NvspMessage::new(
            nvsp::msg::SEND_NDIS_VER,
            &nvsp::SendNdisVersion {
                major: 6.into(),
                minor: minor.into(),
            },
        );
        send_nvsp(&mut ch, NO_RESPONSE_TXID, false, &m)?;

        let relid = ch.offer().relid;
        let recv = register(host, relid, opts.recv_buffer_bytes, opts.scatter_buffers)?;
        let m = NvspMessage::new(
            nvsp::msg::SEND_RECV_BUF,
            &nvsp::SendBuffer {
                gpadl: recv.gpadl.into(),
                id: nvsp::RECV_BUFFER_ID.into(),
            },
        );
        send_nvsp(&mut ch, INIT_TXID, true, &m)?;
        let r = wait_completion(&mut ch, INIT_TXID)?;
        let rc: nvsp::RecvBufComplete = r.body_as();
        if r.msg_type.get() != nvsp::msg::SEND_RECV_BUF_COMPLETE
            || rc.status.get() != nvsp::status::SUCCESS
            || rc.num_sections.get() != 1
            || rc.section.offset.get() != 0
        {
            return Err(NetvscError::Status {
                what: "SEND_RECV_BUF",
                status: rc.status.get(),
            });
        }
        let send = register(host, relid, opts.send_buffer_bytes, opts.scatter_buffers)?;
        let m = NvspMessage::new(
            nvsp::msg::SEND_SEND_BUF,
            &nvsp::SendBuffer {
                gpadl: send.gpadl.into(),
                id: 0.into(),
            },
        );
        send_nvsp(&mut ch, INIT_TXID, true, &m)?;
        let r = wait_completion(&mut ch, INIT_TXID)?;
        let sc: nvsp::SendBufComplete = r.body_as();
        if r.msg_type.get() != nvsp::msg::SEND_SEND_BUF_COMPLETE
            || sc.status.get() != nvsp::status::SUCCESS
            || sc.section_size.get() == 0
        {
            return Err(NetvscError::Status {
                what: "SEND_SEND_BUF",
                status: sc.status.get(),
            });
        }
        let section_size = sc.section_size.get();
        let sections = (send.map.len() as u32) / section_size;
        let direct = host.alloc_pages(18)?;
        let mut c = NetvscClient {
            channels: vec![ch],
            memory: host.memory().clone(),
            version,
            mac: MacAddr::default(),
            mtu: 0,
            link_speed: 0,
            friendly_name: None,
            offload: Vec::new(),
            rss_caps: Vec::new(),
            rss_queues: None,
            features: linux::Features::default(),
            max_pkt_per_msg: 1,
            pkt_align: 8,
            section_size,
            recv_sub_alloc: (
                rc.section.sub_alloc_size.get(),
                rc.section.num_sub_allocs.get(),
            ),
            recv,
            send,
            direct,
            free_sections: (0..sections).rev().collect(),
            next_seq: 1,
            next_req: 1,
            state: ClientState::default(),
            frames_while_waiting: 0,
            ranges: TransferPages::default(),
        };
        c.rndis_init(opts.control_placement)?;
        c.query_all(opts.control_placement)?;
        if opts.subchannels > 0 && version >= nvsp::version::V5 {
            c.open_subchannels(host, opts)?;
        }
        if opts.packet_filter != 0 {
            let st = c.set(
                rndis::oid::GEN_CURRENT_PACKET_FILTER,
                &opts.packet_filter.to_le_bytes(),
                opts.control_placement,
            )?;
            if st != rndis::status::SUCCESS {
                return Err(NetvscError::Status {
                    what: "packet filter",
                    status: st,
                });
            }
        }
        Ok(c)
    }

    fn req_id(&mut self) -> u32 {
        self.next_req += 1;
        self.next_req
    }

    fn rndis_init(&mut self, placement: Placement) -> Result<(), NetvscError> {
        let req = self.req_id();
        let body = rndis::InitRequest {
            req_id: req.into(),
            major: 1.into(),
            minor: 0.into(),
            max_xfer_size: 0x4000.into(),
        };
        let reply = self.request(
            &rndis_message(rndis::msg::INIT, body.as_bytes(), &[]),
            placement,
        )?;
        let c = rndis::InitComplete::read_from_prefix(&reply[8..])
            .map_err(|_| NetvscError::Malformed("RNDIS INIT_COMPLETE"))?
            .0;
        if c.status.get() != rndis::status::SUCCESS {
            return Err(NetvscError::Status {
                what: "RNDIS INIT",
                status: c.status.get(),
            });
        }
        self.max_pkt_per_msg = c.max_pkt_per_msg.get().max(1);
        self.pkt_align = 1 << c.pkt_alignment_factor.get().min(12);
        Ok(())
    }

    /// The queries and sets of Linux's `rndis_filter_device_add`, in its
    /// order, each reply checked as Linux checks it ([`linux`]).
    fn query_all(&mut self, placement: Placement) -> Result<(), NetvscError> {
        use rndis::oid;
        // Linux keeps its MTU unless a 4-byte reply lowers it.
        if let Ok(mtu) = self.query_linux(oid::GEN_MAXIMUM_FRAME_SIZE, &[], 4, placement)?
            && mtu.len() == 4
        {
            self.mtu = u32::from_le_bytes(mtu[..4].try_into().expect("4"));
        }
        let mac = self.query_linux(oid::P802_3_PERMANENT_ADDRESS, &[], 6, placement)?;
        let mac = mac.map_err(|_| NetvscError::Malformed("permanent address"))?;
        self.mac = MacAddr(
            mac.try_into()
                .map_err(|_| NetvscError::Malformed("permanent address"))?,
        );
        self.set_hwcaps(placement)?;
        if let Ok(link) = self.query_linux(oid::GEN_MEDIA_CONNECT_STATUS, &[], 4, placement)? {
            self.state.link_up = link.first().is_none_or(|&b| b == 0);
        }
        if self.version < nvsp::version::V5 {
            return self.query_friendly_name(placement);
        }
        if let Ok(speed) = self.query_linux(oid::GEN_LINK_SPEED, &[], 4, placement)?
            && speed.len() == 4
        {
            self.link_speed = u32::from_le_bytes(speed[..4].try_into().expect("4"));
        }
        let rss = self.query_linux(
            oid::GEN_RECEIVE_SCALE_CAPABILITIES,
            &[],
            linux::RSS_CAPS_RESULT_SIZE,
            placement,
        )?;
        self.rss_queues = linux::rss_queues(rss.as_deref().map_err(|e| *e));
        self.rss_caps = rss.unwrap_or_default();
        self.query_friendly_name(placement)
    }

    /// `rndis_netdev_set_hwcaps`: query the offload capabilities, work out
    /// the features Linux would enable and set the offload parameters.
    fn set_hwcaps(&mut self, placement: Placement) -> Result<(), NetvscError> {
        use rndis::oid;
        // The guest puts an offload header sized for its NVSP version in
        // the query's input buffer.
        let (rev, size) = if self.version >= nvsp::version::V5 {
            (3u8, rndis::OFFLOAD_SIZE_6_30)
        } else if self.version >= nvsp::version::V4 {
            (2, rndis::OFFLOAD_SIZE_6_1)
        } else {
            (1, rndis::OFFLOAD_SIZE_6_0)
        };
        let mut input = vec![0u8; usize::from(size)];
        input[..4].copy_from_slice(
            rndis::ObjectHeader {
                obj_type: rndis::OBJECT_TYPE_OFFLOAD,
                revision: rev,
                size: size.into(),
            }
            .as_bytes(),
        );
        let caps = self.query_linux(
            oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES,
            &input,
            linux::OFFLOAD_RESULT_SIZE,
            placement,
        )?;
        let caps = caps.map_err(|_| NetvscError::Malformed("offload capabilities"))?;
        let hw = linux::hardware_caps(&caps)
            .map_err(|_| NetvscError::Malformed("offload capabilities"))?;
        self.offload = caps;
        self.features = linux::features(&hw);
        let params = linux::offload_params(&self.features, self.version);
        let st = self.set(oid::TCP_OFFLOAD_PARAMETERS, &params, placement)?;
        if st != rndis::status::SUCCESS {
            return Err(NetvscError::Status {
                what: "offload parameters",
                status: st,
            });
        }
        Ok(())
    }

    /// The NIC's name (Linux does not ask; tests and the demo show it).
    fn query_friendly_name(&mut self, placement: Placement) -> Result<(), NetvscError> {
        let (st, name) = self.query(rndis::oid::GEN_FRIENDLY_NAME, &[], placement)?;
        if st == rndis::status::SUCCESS {
            self.friendly_name = Some(rndis::from_utf16(&name));
        }
        Ok(())
    }

    /// An OID query whose reply goes through Linux's
    /// `rndis_filter_query_device` with a `result_size`-byte buffer: the
    /// information Linux would take, or why it would refuse the reply.
    pub fn query_linux(
        &mut self,
        oid: u32,
        input: &[u8],
        result_size: usize,
        placement: Placement,
    ) -> Result<Result<Vec<u8>, linux::Refused>, NetvscError> {
        let req = self.req_id();
        let r = self.request(&oid_message(rndis::msg::QUERY, req, oid, input), placement)?;
        Ok(linux::query_result(&r, result_size).map(<[u8]>::to_vec))
    }

    fn open_subchannels(
        &mut self,
        host: &mut impl VscBus<Channel = C>,
        opts: &NetvscOptions,
    ) -> Result<(), NetvscError> {
        // Linux asks for sub-channels only after an RSS capabilities
        // reply it accepted, with at least two receive queues.
        let channels = linux::channels(self.rss_queues, u32::from(opts.subchannels) + 1);
        let want = channels - 1;
        if want == 0 {
            return Ok(());
        }
        let m = NvspMessage::new(
            nvsp::msg::SUBCHANNEL,
            &nvsp::SubchannelRequest {
                op: nvsp::SUBCHANNEL_ALLOCATE.into(),
                count: want.into(),
            },
        );
        send_nvsp(&mut self.channels[0], INIT_TXID, true, &m)?;
        let r = self.wait_completion_primary(INIT_TXID)?;
        let sc: nvsp::SubchannelComplete = r.body_as();
        if r.msg_type.get() != nvsp::msg::SUBCHANNEL || sc.status.get() != nvsp::status::SUCCESS {
            return Err(NetvscError::Status {
                what: "SUBCHANNEL",
                status: sc.status.get(),
            });
        }
        let n = sc.count.get();
        let instance = self.channels[0].offer().instance;
        let mut opened = 0;
        while opened < n {
            let offer = host.wait_offer()?;
            if offer.instance != instance || offer.subchannel_index == 0 {
                continue;
            }
            let ch = host.open_channel(&offer, opts.ring_pages, opts.ring_pages)?;
            self.channels.push(ch);
            opened += 1;
        }
        self.channels.sort_by_key(|c| c.offer().subchannel_index);
        // RSS parameters: Linux's layout, 128-entry table, 40-byte key.
        let table: Vec<u32> = (0..rndis::RSS_TABLE_MAX as u32)
            .map(|i| i % (1 + n))
            .collect();
        let mut p = rndis::RssParameters {
            header: rndis::ObjectHeader {
                obj_type: rndis::OBJECT_TYPE_RSS_PARAMETERS,
                revision: 2,
                size: 40.into(),
            },
            hash_info: (super::rss::HASH_FUNC_TOEPLITZ
                | super::rss::HASH_IPV4
                | super::rss::HASH_TCP_IPV4
                | super::rss::HASH_IPV6
                | super::rss::HASH_TCP_IPV6)
                .into(),
            table_size: ((table.len() * 4) as u16).into(),
            table_offset: 40.into(),
            key_size: 40.into(),
            key_offset: (40 + table.len() as u32 * 4).into(),
            ..Default::default()
        };
        p.flags.set(0);
        let mut info = p.as_bytes().to_vec();
        info.extend_from_slice(table.as_bytes());
        info.extend_from_slice(&super::rss::DEFAULT_KEY);
        let st = self.set(
            rndis::oid::GEN_RECEIVE_SCALE_PARAMETERS,
            &info,
            opts.control_placement,
        )?;
        if st != rndis::status::SUCCESS {
            return Err(NetvscError::Status {
                what: "RSS parameters",
                status: st,
            });
        }
        Ok(())
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

    /// Sends `msg` (an RNDIS message) GPA-direct from the direct pages;
    /// returns the transaction id. One direct send at a time.
    pub fn send_direct(
        &mut self,
        chan: usize,
        msg: &[u8],
        placement: Placement,
        channel_type: u32,
    ) -> Result<u64, NetvscError> {
        let page = self.direct.first_pfn;
        let (offset, ranges): (u32, Vec<(u32, u32, Vec<u64>)>) = match placement {
            Placement::PageStart => {
                let n = (msg.len() as u64).div_ceil(4096).max(1);
                (0, vec![(msg.len() as u32, 0, (page..page + n).collect())])
            }
            Placement::StraddleOneRange { before } => {
                let off = 4096 - before.min(4095);
                let n = (u64::from(off) + msg.len() as u64).div_ceil(4096);
                (
                    off,
                    vec![(msg.len() as u32, off, (page..page + n).collect())],
                )
            }
            Placement::StraddleTwoRanges { before } => {
                let off = 4096 - before.min(4095);
                let first = (4096 - off).min(msg.len() as u32);
                let rest = msg.len() as u32 - first;
                let n = u64::from(rest).div_ceil(4096).max(1);
                let mut r = vec![(first, off, vec![page])];
                if rest > 0 {
                    r.push((rest, 0, (page + 1..page + 1 + n).collect()));
                }
                (off, r)
            }
        };
        let dst = self
            .memory
            .slice(page * 4096 + u64::from(offset), msg.len())?;
        dst.write_at(0, msg).expect("direct pages hold the message");
        let tid = (self.next_seq << TID_SECTION_BITS) | u64::from(DIRECT_TAG);
        self.next_seq += 1;
        let m = NvspMessage::new(
            nvsp::msg::SEND_RNDIS_PKT,
            &nvsp::SendRndisPkt {
                channel_type: channel_type.into(),
                section_index: nvsp::NO_SECTION.into(),
                section_size: 0.into(),
            },
        );
        let refs: Vec<(u32, u32, &[u64])> = ranges
            .iter()
            .map(|(c, o, p)| (*c, *o, p.as_slice()))
            .collect();
        let ch = &mut self.channels[chan];
        write_gpa_direct(
            ch.outgoing(),
            tid,
            PACKET_FLAG_COMPLETION_REQUESTED,
            &refs,
            m.as_bytes(),
        )?;
        ch.flush()?;
        Ok(tid)
    }

    /// Sends one large data frame GPA-direct (an LSO frame, as Linux sends
    /// them): the RNDIS header and the frame in the direct pages.
    pub fn send_frame_direct(
        &mut self,
        chan: usize,
        frame: &TxFrame<'_>,
        placement: Placement,
    ) -> Result<u64, NetvscError> {
        let mut hdr = [0u8; 96];
        let n = rndis::write_packet_headers(&mut hdr, frame.data.len(), &frame.info);
        let mut msg = hdr[..n].to_vec();
        msg.extend_from_slice(frame.data);
        self.send_direct(chan, &msg, placement, nvsp::channel_type::DATA)
    }

    // -------------------------------------------------------------------
    // Data path.

    /// Packs `frames` into send-buffer sections (several per section, up to
    /// the host's max_pkt_per_msg) and sends one SEND_RNDIS_PKT per section
    /// on channel `chan`. Returns how many frames went out (fewer when no
    /// section is free: poll for completions and retry).
    pub fn send(&mut self, chan: usize, frames: &[TxFrame<'_>]) -> Result<usize, NetvscError> {
        let mut sent = 0;
        let section_size = self.section_size as usize;
        let align = self.pkt_align as usize;
        let buf = self.send.map.slice();
        while sent < frames.len() {
            let Some(&section) = self.free_sections.last() else {
                break;
            };
            let base = section as usize * section_size;
            let mut used = 0usize;
            let mut count = 0u32;
            let mut last_len_at = None;
            while sent < frames.len() && count < self.max_pkt_per_msg {
                let f = &frames[sent];
                let mut hdr = [0u8; 96];
                let hl = rndis::write_packet_headers(&mut hdr, f.data.len(), &f.info);
                let len = hl + f.data.len();
                let start = used.next_multiple_of(align);
                if start + len > section_size {
                    if count == 0 {
                        return Err(NetvscError::Malformed("frame larger than a section"));
                    }
                    break;
                }
                // Pad the previous message so this one starts aligned.
                if let Some(at) = last_len_at {
                    let padded = (start - at) as u32;
                    buf.write_at(base + at + 4, &padded.to_le_bytes())
                        .expect("inside the section");
                }
                buf.write_at(base + start, &hdr[..hl]).expect("inside");
                buf.write_at(base + start + hl, f.data).expect("inside");
                last_len_at = Some(start);
                used = start + len;
                count += 1;
                sent += 1;
            }
            self.free_sections.pop();
            let tid = (self.next_seq << TID_SECTION_BITS) | u64::from(section);
            self.next_seq += 1;
            let m = NvspMessage::new(
                nvsp::msg::SEND_RNDIS_PKT,
                &nvsp::SendRndisPkt {
                    channel_type: nvsp::channel_type::DATA.into(),
                    section_index: section.into(),
                    section_size: (used as u32).into(),
                },
            );
            let r = self.channels[chan].outgoing().write_packet(
                packet_type::DATA_INBAND,
                PACKET_FLAG_COMPLETION_REQUESTED,
                tid,
                &[],
                m.as_bytes(),
            );
            if let Err(e) = r {
                self.free_sections.push(section);
                sent -= count as usize;
                if matches!(e, WriteError::Full { .. }) {
                    break;
                }
                return Err(e.into());
            }
        }
        self.channels[chan].flush()?;
        Ok(sent)
    }

    /// Handles everything waiting on channel `chan`: send completions free
    /// sections, received frames go to `on_frame` (read in place) and are
    /// completed, control replies and indications are kept. Returns the
    /// number of frames.
    pub fn poll(
        &mut self,
        chan: usize,
        mut on_frame: impl FnMut(RxFrame<'_>),
    ) -> Result<usize, NetvscError> {
        let mut frames = 0;
        self.pump(chan, None, &mut |f| {
            frames += 1;
            on_frame(f)
        })?;
        Ok(frames)
    }

    /// Like [`NetvscClient::poll`] but stops at the completion `want`, which
    /// it returns.
    fn pump_for(
        &mut self,
        chan: usize,
        want: Option<u64>,
    ) -> Result<Option<NvspMessage>, NetvscError> {
        let mut dropped = 0;
        let r = self.pump(chan, want, &mut |_| dropped += 1);
        self.frames_while_waiting += dropped;
        r
    }

    fn pump(
        &mut self,
        chan: usize,
        want: Option<u64>,
        on_frame: &mut dyn FnMut(RxFrame<'_>),
    ) -> Result<Option<NvspMessage>, NetvscError> {
        let NetvscClient {
            channels,
            recv,
            ranges,
            free_sections,
            state,
            ..
        } = self;
        let recv = recv.map.slice();
        let ch = &mut channels[chan];
        let mut found = None;
        while let Some(p) = ch.incoming().read()? {
            let tid = p.desc.transaction_id;
            match p.desc.packet_type {
                packet_type::COMPLETION => {
                    let mut raw = [0u8; nvsp::MESSAGE_SIZE];
                    let n = p.payload().len().min(raw.len());
                    p.payload().read_at(0, &mut raw[..n]).expect("inside");
                    let m = NvspMessage::from_prefix(&raw[..n]);
                    if Some(tid) == want {
                        found = Some(m);
                        break;
                    }
                    if m.msg_type.get() == nvsp::msg::SEND_RNDIS_PKT_COMPLETE {
                        let st: nvsp::RndisPktComplete = m.body_as();
                        if st.status.get() != nvsp::status::SUCCESS {
                            state.failed_sends += 1;
                        }
                        let section = (tid & 0xFFFF_FFFF) as u32;
                        if section != DIRECT_TAG {
                            free_sections.push(section);
                        }
                    }
                }
                packet_type::DATA_INBAND => {
                    let mut raw = vec![0u8; p.payload().len()];
                    p.payload().read_at(0, &mut raw).expect("inside");
                    let m = NvspMessage::from_prefix(&raw);
                    if m.msg_type.get() == nvsp::msg::SEND_INDIRECTION_TABLE {
                        let t: nvsp::SendIndirectionTable = m.body_as();
                        let (count, off) = (t.count.get() as usize, t.offset.get() as usize);
                        if let Some(b) = raw.get(off..off + count * 4) {
                            state.send_table = Some(
                                b.chunks_exact(4)
                                    .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
                                    .collect(),
                            );
                        }
                    }
                }
                packet_type::DATA_USING_TRANSFER_PAGES => {
                    let parsed = ranges.parse(&p);
                    if parsed.is_err() || ranges.set_id != nvsp::RECV_BUFFER_ID {
                        return Err(NetvscError::Malformed("transfer-page packet"));
                    }
                    for r in &ranges.ranges {
                        let (len, off) =
                            (r.byte_count.get() as usize, r.byte_offset.get() as usize);
                        let msg = recv
                            .subslice(off, len)
                            .map_err(|_| NetvscError::Malformed("receive range"))?;
                        on_message(state, chan, msg, on_frame)?;
                    }
                    complete_receive(ch, tid)?;
                }
                _ => {}
            }
        }
        ch.flush()?;
        Ok(found)
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

fn on_message(
    state: &mut ClientState,
    chan: usize,
    msg: SharedSlice<'_>,
    on_frame: &mut dyn FnMut(RxFrame<'_>),
) -> Result<(), NetvscError> {
    let mut head = [0u8; super::nic::MAX_RX_HEADER];
    let n = msg.len().min(head.len());
    msg.read_at(0, &mut head[..n]).expect("inside");
    let h = rndis::Header::read_from_prefix(&head[..n])
        .map_err(|_| NetvscError::Malformed("RNDIS header"))?
        .0;
    if h.msg_len.get() as usize > msg.len() {
        return Err(NetvscError::Malformed("RNDIS length"));
    }
    match h.msg_type.get() {
        rndis::msg::PACKET => {
            let p = rndis::Packet::read_from_prefix(head.get(8..n).unwrap_or_default())
                .map_err(|_| NetvscError::Malformed("RNDIS packet"))?
                .0;
            let lay = rndis::packet_layout(&p, h.msg_len.get())
                .map_err(|_| NetvscError::Malformed("RNDIS packet layout"))?;
            let mut area = [0u8; 256];
            let area = area
                .get_mut(..lay.ppi_len)
                .ok_or(NetvscError::Malformed("PPI area"))?;
            msg.read_at(lay.ppi_offset, area)
                .map_err(|_| NetvscError::Malformed("PPI area"))?;
            let info = rndis::parse_ppis(area).map_err(|_| NetvscError::Malformed("PPI"))?;
            let data = msg
                .subslice(lay.data_offset, lay.data_len)
                .map_err(|_| NetvscError::Malformed("frame"))?;
            on_frame(RxFrame {
                data,
                info,
                channel: chan,
            });
        }
        rndis::msg::INDICATE_STATUS => {
            let s = rndis::IndicateStatus::read_from_prefix(head.get(8..n).unwrap_or_default())
                .map_err(|_| NetvscError::Malformed("INDICATE_STATUS"))?
                .0;
            let st = s.status.get();
            match st {
                rndis::status::MEDIA_CONNECT => state.link_up = true,
                rndis::status::MEDIA_DISCONNECT => state.link_up = false,
                _ => {}
            }
            state.indications.push(st);
        }
        _ => {
            let mut v = vec![0u8; h.msg_len.get() as usize];
            msg.read_at(0, &mut v).expect("inside");
            state.replies.push_back(v);
        }
    }
    Ok(())
}

/// Waits for the completion `txid` on `ch`, discarding anything else.
pub fn wait_completion(ch: &mut impl VscChannel, txid: u64) -> Result<NvspMessage, NetvscError> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match wait_packet(ch, left)? {
            HostPacket::Completion { tid, payload } if tid == txid => {
                return Ok(NvspMessage::from_prefix(&payload));
            }
            _ => continue,
        }
    }
}

pub use super::rndis::message as rndis_message;

/// A QUERY or SET message for `oid` with `info` as its information buffer
/// (right after the request, at offset 20; offset 0 when empty, as Linux
/// sends queries).
pub fn oid_message(msg_type: u32, req_id: u32, oid: u32, info: &[u8]) -> Vec<u8> {
    let body = rndis::OidRequest {
        req_id: req_id.into(),
        oid: oid.into(),
        info_buflen: (info.len() as u32).into(),
        info_buf_offset: if info.is_empty() && msg_type == rndis::msg::QUERY {
            0
        } else {
            size_of::<rndis::OidRequest>() as u32
        }
        .into(),
        dev_vc_handle: 0.into(),
    };
    rndis_message(msg_type, body.as_bytes(), info)
}

/// Parses a QUERY_COMPLETE as Linux does: offset at least 16, data inside
/// the message.
pub fn parse_query_complete(r: &[u8]) -> Result<(u32, Vec<u8>), NetvscError> {
    let bad = NetvscError::Malformed("QUERY_COMPLETE");
    let c = rndis::QueryComplete::read_from_prefix(
        r.get(8..).ok_or(NetvscError::Malformed("QUERY_COMPLETE"))?,
    )
    .map_err(|_| NetvscError::Malformed("QUERY_COMPLETE"))?
    .0;
    if c.status.get() != rndis::status::SUCCESS {
        return Ok((c.status.get(), Vec::new()));
    }
    let (off, len) = (
        c.info_buf_offset.get() as usize,
        c.info_buflen.get() as usize,
    );
    if off < 16 || 8 + off + len > r.len() {
        return Err(bad);
    }
    Ok((c.status.get(), r[8 + off..8 + off + len].to_vec()))
}

/// What tests, the demo and benchmarks send and wait for as a guest: the
/// frame builders of [`crate::testing`] and the exchanges built on them.
pub mod packets {
    use std::time::{Duration, Instant};

    use super::{NetvscClient, NetvscError, PacketInfo, TxFrame, VscChannel};
    use crate::offload::{fold, ones_sum};
    pub use crate::testing::{arp, eth, icmp_echo, ipv4, udp};
    use crate::wire::MacAddr;

    /// Polls channel 0, answering ARP requests for `ip` (the guest's
    /// address), until `f` returns true for a frame or `timeout` passes;
    /// false on timeout.
    pub fn pump<C: VscChannel>(
        c: &mut NetvscClient<C>,
        ip: [u8; 4],
        timeout: Duration,
        mut f: impl FnMut(&[u8], &PacketInfo) -> bool,
    ) -> Result<bool, NetvscError> {
        let deadline = Instant::now() + timeout;
        let mac = c.mac;
        let mut frames = Vec::new();
        while Instant::now() < deadline {
            frames.clear();
            c.poll(0, |fr| frames.push((fr.to_vec(), fr.info)))?;
            for (fr, info) in &frames {
                if let Some((sha, spa)) = arp_request_for(fr, ip) {
                    c.send(0, &[TxFrame::new(&arp(2, mac, ip, sha, spa))])?;
                    continue;
                }
                if f(fr, info) {
                    return Ok(true);
                }
            }
            c.wait(0, Duration::from_millis(5))?;
        }
        Ok(false)
    }

    /// The sender of an ARP request for `ip`.
    fn arp_request_for(f: &[u8], ip: [u8; 4]) -> Option<(MacAddr, [u8; 4])> {
        let is = f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 1] && f[38..42] == ip;
        is.then(|| {
            (
                MacAddr(f[22..28].try_into().expect("6 bytes")),
                f[28..32].try_into().expect("4 bytes"),
            )
        })
    }

    /// Resolves `ip` with ARP from the guest at `me` (five tries).
    pub fn resolve<C: VscChannel>(
        c: &mut NetvscClient<C>,
        me: [u8; 4],
        ip: [u8; 4],
    ) -> Result<Option<MacAddr>, NetvscError> {
        let req = arp(1, c.mac, me, MacAddr::default(), ip);
        let mut mac = None;
        for _ in 0..5 {
            c.send(0, &[TxFrame::new(&req)])?;
            let found = pump(c, me, Duration::from_secs(2), |f, _| {
                let reply =
                    f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == ip;
                if reply {
                    mac = Some(MacAddr(f[22..28].try_into().expect("6 bytes")));
                }
                reply
            })?;
            if found {
                break;
            }
        }
        Ok(mac)
    }

    /// One ICMP echo from the guest at `me` to `ip` (at `mac`) with a
    /// 56-byte payload derived from `seq`; returns the round-trip time if
    /// a reply with the same payload and a valid checksum came back.
    pub fn ping<C: VscChannel>(
        c: &mut NetvscClient<C>,
        me: [u8; 4],
        ip: [u8; 4],
        mac: MacAddr,
        seq: u16,
    ) -> Result<Option<Duration>, NetvscError> {
        let payload: Vec<u8> = (0..56).map(|i| (i as u8) ^ (seq as u8)).collect();
        let f = eth(
            mac,
            c.mac,
            0x0800,
            &ipv4(me, ip, 1, &icmp_echo(0x77, seq, &payload)),
        );
        let start = Instant::now();
        c.send(0, &[TxFrame::new(&f)])?;
        let mut ok = false;
        pump(c, me, Duration::from_secs(5), |f, _| {
            let reply = f.len() >= 42
                && f[12..14] == [8, 0]
                && f[23] == 1
                && f[26..30] == ip
                && f[34] == 0
                && f[40..42] == seq.to_be_bytes();
            if reply {
                ok = fold(ones_sum(&f[34..], 0)) == 0xffff && f[42..] == payload[..];
            }
            reply
        })?;
        Ok(ok.then(|| start.elapsed()))
    }
}
