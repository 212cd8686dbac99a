//! What a Linux 6.1 guest's hv_netvsc accepts from the host, written as
//! Linux's own checks so that the client (and the tests that use it)
//! reject exactly what Linux rejects and fall back exactly where Linux
//! does.
//!
//! Each function names the Linux function it mirrors
//! (drivers/net/hyperv/rndis_filter.c unless said otherwise). A reply
//! that fails here is one a Linux guest ignores or refuses: a regression
//! in the VSP shows up as a client with fewer channels or offloads, hence
//! as failing end-to-end tests and lower benchmark figures, not only as
//! a wrong byte. Where Linux drops a message and carries on (or waits
//! forever for it), the client stops with [`Refused`] instead, so the
//! test that met it fails at once and says why.

use zerocopy::FromBytes;

use super::super::nvsp::{self, NvspMessage};
use super::super::rndis::{
    self, NdisOffload, OBJECT_TYPE_OFFLOAD, OFFLOAD_SIZE_6_0, RssCapabilities, offload_caps,
};

/// `sizeof(struct ndis_offload)` in hyperv_net.h (not packed: 156 bytes),
/// the result size `rndis_query_hwcaps` passes.
pub const OFFLOAD_RESULT_SIZE: usize = 156;
/// `sizeof(struct ndis_recv_scale_cap)` (`__packed`: 18 bytes), the
/// result size `rndis_filter_device_add` passes for RSS capabilities.
pub const RSS_CAPS_RESULT_SIZE: usize = 18;
/// `VRSS_CHANNEL_DEFAULT` (hyperv_net.h, 6.1: 8): the channels
/// `netvsc_probe` asks for at most (`netvsc_devinfo_get`).
pub const DEFAULT_CHANNELS: u32 = 8;
/// `NETVSC_MAX_PKT_SIZE`: the `max_pkt_size` of every netvsc channel,
/// `NETVSC_XFER_HEADER_SIZE(562) + sizeof(struct nvsp_message) + 4 * 16`.
pub const MAX_PKT_SIZE: usize = xfer_header_size(562) + nvsp::MESSAGE_SIZE + 4 * 16;
/// `NETVSC_RECEIVE_BUFFER_ID`, the transfer page set id Linux expects.
pub const RECEIVE_BUFFER_ID: u16 = 0xCAFE;
/// `NETVSC_MTU_MIN` (`ETH_MIN_MTU`).
pub const MTU_MIN: u32 = 68;
/// `sizeof(wname)` in `rndis_get_friendly_name`: 256 UCS-2 characters.
pub const FRIENDLY_NAME_RESULT_SIZE: usize = 512;

/// `NETVSC_XFER_HEADER_SIZE(rng_cnt)`: `offsetof(struct
/// vmtransfer_page_packet_header, ranges)` (24) plus 8 per range.
pub const fn xfer_header_size(ranges: usize) -> usize {
    24 + 8 * ranges
}

/// Why Linux refuses a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("QUERY_COMPLETE shorter than its fixed fields")]
    Short,
    #[error("info_buflen {len} is more than the {limit} bytes Linux passes")]
    TooLong { len: u32, limit: usize },
    #[error("info_buf_offset {0} points into the fixed fields")]
    OffsetInHeader(u32),
    #[error("the information buffer runs past msg_len")]
    PastMessage,
    #[error("NDIS object type {0:#x} is not NDIS_OBJECT_TYPE_OFFLOAD")]
    ObjectType(u8),
    #[error("NDIS object revision {0} is below 1")]
    ObjectRevision(u8),
    #[error("NDIS object size {size} is outside 112..={returned}")]
    ObjectSize { size: u16, returned: usize },
    // netvsc_send_completion (netvsc.c)
    #[error("completion of {len} bytes is too short for NVSP type {msg_type}")]
    ShortCompletion { msg_type: u32, len: usize },
    #[error("unknown send completion type {0}")]
    CompletionType(u32),
    // netvsc_init_buf (netvsc.c)
    #[error("receive buffer: {0}")]
    RecvBuffer(&'static str),
    // hv_pkt_iter_first (ring_buffer.c)
    #[error("packet of {len} bytes is longer than max_pkt_size {max}")]
    PacketTooLong { len: usize, max: usize },
    // netvsc_receive (netvsc.c)
    #[error("transfer-page packet: {0}")]
    XferPacket(&'static str),
    #[error("range {offset}+{len} runs past the {size}-byte receive buffer")]
    RangeOutside { offset: u32, len: u32, size: u32 },
    #[error("range of {len} bytes is longer than the {section}-byte receive section")]
    RangeTooLong { len: u32, section: u32 },
    // rndis_filter_receive, rndis_filter_receive_response
    #[error("RNDIS message of msg_len {msg_len} in a {buflen}-byte range")]
    RndisLength { msg_len: u32, buflen: usize },
    #[error("unhandled RNDIS message type {0:#x}")]
    RndisType(u32),
    // rndis_filter_receive_data, rndis_get_ppi
    #[error("RNDIS packet: {0}")]
    RndisPacket(&'static str),
    #[error("per-packet info: {0} (Linux's rndis_get_ppi loops forever on it)")]
    PpiLoop(&'static str),
    #[error("per-packet info area: {0}")]
    PpiArea(&'static str),
    // netvsc_send_table (netvsc.c)
    #[error("send table: {0}")]
    SendTable(&'static str),
    // netvsc_linkstatus_callback (netvsc_drv.c)
    #[error("INDICATE_STATUS with msg_len {0}")]
    IndicateLength(u32),
    // rndis_set_subchannel, netvsc_sc_open
    #[error("SUBCHANNEL completion with status {0}")]
    SubchannelStatus(u32),
    #[error("{granted} sub-channels granted, {asked} asked for")]
    SubchannelCount { granted: u32, asked: u32 },
    #[error("sub-channel index {index} is not below num_chn {num_chn}: netvsc_sc_open ignores it")]
    SubchannelIndex { index: u16, num_chn: u32 },
    // rndis_filter_device_add and the OID helpers
    #[error("{0}")]
    Oid(&'static str),
}

/// `rndis_filter_query_device`: the information buffer of a whole
/// RNDIS QUERY_COMPLETE message (`reply`, header included), given the
/// result buffer size the caller passes. Linux does not look at the
/// status: a refused OID comes back as an empty result.
pub fn query_result(reply: &[u8], result_size: usize) -> Result<&[u8], Refused> {
    let word = |at: usize| {
        reply
            .get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let header = rndis::HEADER_SIZE as u32;
    let msg_len = word(4).ok_or(Refused::Short)?.min(reply.len() as u32);
    // msg_len - RNDIS_HEADER_SIZE < sizeof(struct rndis_query_complete)
    if msg_len < header + 16 {
        return Err(Refused::Short);
    }
    let (len, off) = (
        word(16).ok_or(Refused::Short)?,
        word(20).ok_or(Refused::Short)?,
    );
    let body = msg_len - header;
    if len as usize > result_size {
        return Err(Refused::TooLong {
            len,
            limit: result_size,
        });
    }
    if off < 16 {
        return Err(Refused::OffsetInHeader(off));
    }
    if body < off || body - off < len {
        return Err(Refused::PastMessage);
    }
    let start = (header + off) as usize;
    Ok(&reply[start..start + len as usize])
}

/// `rndis_query_hwcaps`: the offload capabilities object, as Linux
/// validates it after the query (type, revision, size against what came
/// back). Shorter objects are zero-extended, as Linux's memset does.
pub fn hardware_caps(result: &[u8]) -> Result<NdisOffload, Refused> {
    let mut buf = [0u8; OFFLOAD_RESULT_SIZE];
    let n = result.len().min(OFFLOAD_RESULT_SIZE);
    buf[..n].copy_from_slice(&result[..n]);
    let caps = NdisOffload::read_from_bytes(&buf).expect("156 bytes");
    let h = caps.header;
    if h.obj_type != OBJECT_TYPE_OFFLOAD {
        return Err(Refused::ObjectType(h.obj_type));
    }
    if h.revision < 1 {
        return Err(Refused::ObjectRevision(h.revision));
    }
    let size = h.size.get();
    if usize::from(size) > result.len() || size < OFFLOAD_SIZE_6_0 {
        return Err(Refused::ObjectSize {
            size,
            returned: result.len(),
        });
    }
    Ok(caps)
}

/// The offloads Linux turns on (`rndis_netdev_set_hwcaps`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
    /// NETIF_F_IP_CSUM: TCP/IPv4 checksum offload.
    pub csum_tcp4: bool,
    pub csum_udp4: bool,
    /// NETIF_F_TSO.
    pub tso4: bool,
    /// NETIF_F_IPV6_CSUM: TCP/IPv6 checksum offload.
    pub csum_tcp6: bool,
    pub csum_udp6: bool,
    /// NETIF_F_TSO6.
    pub tso6: bool,
    /// Largest GSO frame Linux will hand the device.
    pub gso_max_size: u32,
}

/// `GSO_MAX_SIZE` (65536), Linux's starting point for gso_max_size.
const GSO_MAX_SIZE: u32 = 65_536;

/// `rndis_netdev_set_hwcaps`: what Linux enables from the capabilities.
pub fn features(caps: &NdisOffload) -> Features {
    use offload_caps::*;
    let mut f = Features {
        gso_max_size: GSO_MAX_SIZE,
        ..Features::default()
    };
    // (hwcaps.csum.ip4_txcsum & NDIS_TXCSUM_ALL_TCP4) == NDIS_TXCSUM_ALL_TCP4
    let tx4 = caps.ip4_txcsum.get();
    if tx4 & ALL_TCP4 == ALL_TCP4 {
        f.csum_tcp4 = true;
        if caps.lsov2_ip4_encap.get() & ENCAP_8023 != 0 {
            f.tso4 = true;
            f.gso_max_size = f.gso_max_size.min(caps.lsov2_ip4_maxsz.get());
        }
        f.csum_udp4 = tx4 & UDP4 != 0;
    }
    // (hwcaps.csum.ip6_txcsum & NDIS_TXCSUM_ALL_TCP6) == NDIS_TXCSUM_ALL_TCP6
    let tx6 = caps.ip6_txcsum.get();
    if tx6 & ALL_TCP6 == ALL_TCP6 {
        f.csum_tcp6 = true;
        // (ip6_encap & NDIS_OFFLOAD_ENCAP_8023) &&
        // (ip6_opts & NDIS_LSOV2_CAP_IP6) == NDIS_LSOV2_CAP_IP6
        if caps.lsov2_ip6_encap.get() & ENCAP_8023 != 0
            && caps.lsov2_ip6_opts.get() & LSOV2_IP6 == LSOV2_IP6
        {
            f.tso6 = true;
            f.gso_max_size = f.gso_max_size.min(caps.lsov2_ip6_maxsz.get());
        }
        f.csum_udp6 = tx6 & UDP6 != 0;
    }
    f
}

/// `struct ndis_offload_params` as `rndis_filter_set_offload_params`
/// sends it for `features`: 28 bytes (`sizeof`, natural alignment) from
/// NVSP 5, `VERSION_4_OFFLOAD_SIZE` (22) with the UDP fields cleared
/// before.
pub fn offload_params(f: &Features, nvsp_version: u32) -> Vec<u8> {
    const TX_RX_DISABLED: u8 = 1;
    const TX_RX_ENABLED: u8 = 4;
    const LSOV2_ENABLED: u8 = 2;
    let on = |b: bool, v: u8| if b { v } else { 0 };
    let old = nvsp_version <= super::super::nvsp::version::V4;
    let len: u16 = if old { 22 } else { 28 };
    let mut p = vec![0u8; usize::from(len)];
    p[0] = rndis::OBJECT_TYPE_OFFLOAD_PARAMETERS;
    p[1] = 3; // NDIS_OFFLOAD_PARAMETERS_REVISION_3
    p[2..4].copy_from_slice(&len.to_le_bytes());
    p[4] = TX_RX_DISABLED; // ip_v4_csum: Linux checksums IP headers itself
    p[5] = on(f.csum_tcp4, TX_RX_ENABLED);
    p[6] = on(f.csum_udp4 && !old, TX_RX_ENABLED);
    p[7] = on(f.csum_tcp6, TX_RX_ENABLED);
    p[8] = on(f.csum_udp6 && !old, TX_RX_ENABLED);
    p[11] = on(f.tso4, LSOV2_ENABLED);
    p[12] = on(f.tso6, LSOV2_ENABLED);
    p
}

/// `rndis_filter_device_add`: the receive queues Linux sees in the RSS
/// capabilities reply, or None when it stays on one channel (a refused
/// query reads as zeroed capabilities; fewer than 2 queues means no RSS).
pub fn rss_queues(result: Result<&[u8], Refused>) -> Option<u32> {
    let result = result.ok()?;
    let mut buf = [0u8; RSS_CAPS_RESULT_SIZE];
    buf[..result.len()].copy_from_slice(result);
    let caps = RssCapabilities::read_from_bytes(&buf).expect("18 bytes");
    let queues = caps.num_receive_queues.get();
    (queues >= 2).then_some(queues)
}

/// Channels Linux opens: `min(online CPUs, receive queues,
/// VRSS_CHANNEL_DEFAULT)` (`rndis_filter_device_add`, `netvsc_probe`).
pub fn channels(queues: Option<u32>, cpus: u32) -> u32 {
    queues.map_or(1, |q| q.min(cpus).clamp(1, DEFAULT_CHANNELS))
}

// ---------------------------------------------------------------------
// NVSP completions and messages from the host.

/// What a host completion is to Linux's `netvsc_send_completion`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// `if (!msglen)`: a completion without payload, which completes the
    /// request it answers (SWITCH_DATA_PATH).
    Empty,
    /// INIT_COMPLETE, SEND_RECV_BUF_COMPLETE, SEND_SEND_BUF_COMPLETE or
    /// SUBCHANNEL: Linux copies `sizeof(struct nvsp_message)` bytes and
    /// wakes `channel_init_wait`.
    Init(NvspMessage),
    /// SEND_RNDIS_PKT_COMPLETE with its status.
    RndisPkt(u32),
}

/// `netvsc_send_completion` (netvsc.c, 6.1; the SEND_RNDIS_PKT_COMPLETE
/// length check is 6.1.20's): the size each type needs, the checks
/// falling through from INIT_COMPLETE (16, then 28) to
/// SEND_RECV_BUF_COMPLETE (28), SEND_SEND_BUF_COMPLETE (12) and
/// SUBCHANNEL (12). `payload` is `hv_pkt_datalen`: the packet's bytes from
/// its data offset, padding included.
pub fn send_completion(payload: &[u8]) -> Result<Completion, Refused> {
    if payload.is_empty() {
        return Ok(Completion::Empty);
    }
    let short = |msg_type| Refused::ShortCompletion {
        msg_type,
        len: payload.len(),
    };
    let msg_type = u32::from_le_bytes(payload.get(..4).ok_or(short(0))?.try_into().expect("4"));
    // nvsp_message_header + the body each case checks.
    let need = match msg_type {
        nvsp::msg::INIT_COMPLETE | nvsp::msg::SEND_RECV_BUF_COMPLETE => 4 + 24,
        nvsp::msg::SEND_SEND_BUF_COMPLETE | nvsp::msg::SUBCHANNEL => 4 + 8,
        nvsp::msg::SEND_RNDIS_PKT_COMPLETE => 4 + 4,
        other => return Err(Refused::CompletionType(other)),
    };
    if payload.len() < need {
        return Err(short(msg_type));
    }
    let m = NvspMessage::from_prefix(payload);
    Ok(match msg_type {
        nvsp::msg::SEND_RNDIS_PKT_COMPLETE => {
            Completion::RndisPkt(m.body_as::<nvsp::RndisPktComplete>().status.get())
        }
        _ => Completion::Init(m),
    })
}

/// `netvsc_init_buf` (netvsc.c): the receive section of a
/// SEND_RECV_BUF_COMPLETE Linux accepts for a `buf_size`-byte buffer:
/// status SUCCESS, exactly one section at offset 0, a section size of at
/// least `NETVSC_MTU_MIN` and sections that fit the buffer. Returns
/// (`recv_section_size`, `recv_section_cnt`).
pub fn init_recv_buf(reply: &NvspMessage, buf_size: u64) -> Result<(u32, u32), Refused> {
    let r: nvsp::RecvBufComplete = reply.body_as();
    if reply.msg_type.get() != nvsp::msg::SEND_RECV_BUF_COMPLETE {
        return Err(Refused::RecvBuffer("not SEND_RECV_BUF_COMPLETE"));
    }
    if r.status.get() != nvsp::status::SUCCESS {
        return Err(Refused::RecvBuffer("status is not SUCCESS"));
    }
    if r.num_sections.get() != 1 || r.section.offset.get() != 0 {
        return Err(Refused::RecvBuffer("not one section at offset 0"));
    }
    let (size, count) = (
        r.section.sub_alloc_size.get(),
        r.section.num_sub_allocs.get(),
    );
    if size < MTU_MIN || u64::from(size) * u64::from(count) > buf_size {
        return Err(Refused::RecvBuffer("section size or count out of bounds"));
    }
    Ok((size, count))
}

/// `netvsc_send_table` (netvsc.c): the send indirection table Linux takes
/// from a SEND_INDIRECTION_TABLE message (`msg`, `hv_pkt_datalen` bytes).
/// For NVSP 6 and older Linux reads the table at 40 (`sizeof(struct
/// nvsp_message_header) + sizeof(union nvsp_6_message_uber)`) whatever
/// `offset` says, when the message is long enough.
pub fn send_table(msg: &[u8], nvsp_version: u32) -> Result<[u32; 16], Refused> {
    const COUNT: usize = nvsp::SEND_TABLE_SIZE;
    if msg.len() < 4 + 8 {
        return Err(Refused::SendTable("message too short"));
    }
    let t: nvsp::SendIndirectionTable = NvspMessage::from_prefix(msg).body_as();
    if t.count.get() as usize != COUNT {
        return Err(Refused::SendTable("count is not VRSS_SEND_TAB_SIZE"));
    }
    let mut offset = t.offset.get() as usize;
    if nvsp_version <= nvsp::version::V6 && msg.len() >= nvsp::MESSAGE_SIZE + COUNT * 4 {
        offset = nvsp::MESSAGE_SIZE;
    }
    if msg.len() < COUNT * 4 || offset > msg.len() - COUNT * 4 {
        return Err(Refused::SendTable("offset too big"));
    }
    let mut table = [0u32; COUNT];
    for (i, e) in table.iter_mut().enumerate() {
        let at = offset + 4 * i;
        *e = u32::from_le_bytes(msg[at..at + 4].try_into().expect("4"));
    }
    Ok(table)
}

/// `rndis_set_subchannel`: the sub-channels Linux waits for after asking
/// for `asked` (`num_chn - 1`): status SUCCESS and no more than asked.
pub fn subchannel_complete(reply: &NvspMessage, asked: u32) -> Result<u32, Refused> {
    let c: nvsp::SubchannelComplete = reply.body_as();
    if reply.msg_type.get() != nvsp::msg::SUBCHANNEL || c.status.get() != nvsp::status::SUCCESS {
        return Err(Refused::SubchannelStatus(c.status.get()));
    }
    let granted = c.count.get();
    if granted > asked {
        return Err(Refused::SubchannelCount { granted, asked });
    }
    Ok(granted)
}

/// `netvsc_sc_open`: a sub-channel offer Linux opens, given the channel
/// count it waits for (`if (chn_index >= nvscdev->num_chn) return;`, and
/// then `rndis_set_subchannel` waits forever for `open_chn == num_chn`).
pub fn sc_open(index: u16, num_chn: u32) -> Result<(), Refused> {
    if u32::from(index) >= num_chn {
        return Err(Refused::SubchannelIndex { index, num_chn });
    }
    Ok(())
}

// ---------------------------------------------------------------------
// The receive path: transfer-page packets and the RNDIS messages in them.

/// `hv_pkt_iter_first` (drivers/hv/ring_buffer.c): a netvsc packet of
/// `len` bytes (`len8 << 3`, descriptor included) arrives whole only if it
/// fits the channel's `max_pkt_size` ([`MAX_PKT_SIZE`]).
pub fn packet_fits(len: usize) -> Result<(), Refused> {
    if !vmbus::linux::packet_fits(len, MAX_PKT_SIZE) {
        return Err(Refused::PacketTooLong {
            len,
            max: MAX_PKT_SIZE,
        });
    }
    Ok(())
}

/// `netvsc_receive` (netvsc.c), the checks on the packet: `data_offset` is
/// `offset8 << 3`, `payload` the NVSP message (`hv_pkt_data`).
pub fn receive_packet(
    data_offset: u32,
    payload: &[u8],
    set_id: u16,
    range_count: u32,
) -> Result<(), Refused> {
    if payload.len() < 4 {
        return Err(Refused::XferPacket("NVSP header too short"));
    }
    if payload[..4] != nvsp::msg::SEND_RNDIS_PKT.to_le_bytes() {
        return Err(Refused::XferPacket("NVSP type is not SEND_RNDIS_PKT"));
    }
    // sizeof(struct vmtransfer_page_packet_header), one range included.
    if (data_offset as usize) < xfer_header_size(1) {
        return Err(Refused::XferPacket("offset smaller than the header"));
    }
    if set_id != RECEIVE_BUFFER_ID {
        return Err(Refused::XferPacket("transfer page set is not 0xCAFE"));
    }
    if xfer_header_size(range_count as usize) > data_offset as usize {
        return Err(Refused::XferPacket("range count past the data offset"));
    }
    Ok(())
}

/// `netvsc_receive`, the checks on each range: inside the receive buffer
/// and no longer than the receive section (Linux copies a range into a
/// section-sized buffer; a longer one is dropped with status FAIL).
pub fn receive_range(
    offset: u32,
    len: u32,
    recv_buf_size: u32,
    recv_section_size: u32,
) -> Result<(), Refused> {
    if offset > recv_buf_size || len > recv_buf_size - offset {
        return Err(Refused::RangeOutside {
            offset,
            len,
            size: recv_buf_size,
        });
    }
    if len > recv_section_size {
        return Err(Refused::RangeTooLong {
            len,
            section: recv_section_size,
        });
    }
    Ok(())
}

/// `rndis_filter_receive`: the type of an RNDIS message in a `buflen`-byte
/// range (`head` its first bytes) Linux handles: the header fits, `msg_len`
/// covers the header and fits the range, and the type is one Linux takes
/// from a host (PACKET, INIT_C, QUERY_C, SET_C, INDICATE).
pub fn rndis_receive(head: &[u8], buflen: usize) -> Result<u32, Refused> {
    let (h, _) = rndis::Header::read_from_prefix(head)
        .map_err(|_| Refused::RndisLength { msg_len: 0, buflen })?;
    let msg_len = h.msg_len.get();
    if (msg_len as usize) < rndis::HEADER_SIZE || buflen < msg_len as usize {
        return Err(Refused::RndisLength { msg_len, buflen });
    }
    use rndis::msg;
    match h.msg_type.get() {
        t @ (msg::PACKET
        | msg::INIT_COMPLETE
        | msg::QUERY_COMPLETE
        | msg::SET_COMPLETE
        | msg::INDICATE_STATUS) => Ok(t),
        other => Err(Refused::RndisType(other)),
    }
}

/// `rndis_filter_receive_response`: a completion's request id (`msg_len -
/// RNDIS_HEADER_SIZE >= sizeof(u32)`), and Linux copies it only if
/// `msg_len <= sizeof(struct rndis_message) + RNDIS_EXT_LEN`.
pub fn response_req_id(msg: &[u8]) -> Result<u32, Refused> {
    const MAX_RESPONSE: usize = 52 + 4096;
    let msg_len = msg.len();
    if !(rndis::HEADER_SIZE + 4..=MAX_RESPONSE).contains(&msg_len) {
        return Err(Refused::RndisLength {
            msg_len: msg_len as u32,
            buflen: msg_len,
        });
    }
    Ok(u32::from_le_bytes(msg[8..12].try_into().expect("4")))
}

/// Where Linux finds the frame and the PPIs of a PACKET message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxPacket {
    /// The frame: offset from the message start, and length.
    pub data_offset: usize,
    pub data_len: usize,
    /// The `rndis_packet` (PPI offset and length are relative to it).
    pub packet: rndis::Packet,
    /// `rpkt_len`: the range's length less the RNDIS header.
    pub rpkt_len: u32,
}

/// `rndis_filter_receive_data`: the frame of a PACKET message in a
/// `buflen`-byte range (`head` holds at least its first 44 bytes when the
/// range has them).
pub fn receive_data(head: &[u8], buflen: usize) -> Result<RxPacket, Refused> {
    const HDR: usize = rndis::HEADER_SIZE;
    let buflen = u32::try_from(buflen).map_err(|_| Refused::RndisPacket("range too long"))?;
    if (buflen as usize) < rndis::PACKET_HEADERS {
        return Err(Refused::RndisPacket("data_buflen too small"));
    }
    let (p, _) = rndis::Packet::read_from_prefix(&head[HDR..])
        .map_err(|_| Refused::RndisPacket("header not read"))?;
    let rpkt_len = buflen - HDR as u32;
    // if (rndis_pkt->data_offset >= data_buflen - RNDIS_HEADER_SIZE)
    if p.data_offset.get() >= rpkt_len {
        return Err(Refused::RndisPacket("data_offset past the range"));
    }
    // data_buflen -= RNDIS_HEADER_SIZE + data_offset; >= data_len
    if rpkt_len - p.data_offset.get() < p.data_len.get() {
        return Err(Refused::RndisPacket("data runs past the range"));
    }
    Ok(RxPacket {
        data_offset: HDR + p.data_offset.get() as usize,
        data_len: p.data_len.get() as usize,
        packet: p,
        rpkt_len,
    })
}

impl RxPacket {
    /// `rndis_get_ppi`'s checks on the area: where it is, from the message
    /// start, and its length; None when there is none
    /// (`per_pkt_info_offset == 0`) or Linux refuses it (then it finds no
    /// PPI at all).
    pub fn ppi_area(&self) -> Result<Option<(usize, usize)>, Refused> {
        let (off, len) = (
            self.packet.per_pkt_info_offset.get(),
            self.packet.per_pkt_info_len.get(),
        );
        if off == 0 {
            return Ok(None);
        }
        if (off as usize) < size_of::<rndis::Packet>() || off > self.rpkt_len {
            return Err(Refused::PpiArea("per_pkt_info_offset"));
        }
        if (len as usize) < rndis::PPI_HEADER_SIZE || len > self.rpkt_len - off {
            return Err(Refused::PpiArea("per_pkt_info_len"));
        }
        Ok(Some((rndis::HEADER_SIZE + off as usize, len as usize)))
    }
}

/// `rndis_get_ppi`: the `size`-byte value of the PPI of `ppi_type` (and
/// `internal` bit) in `area`, walking it as Linux does. A PPI whose size
/// runs past the area or whose value offset is not inside it makes Linux
/// `continue` without moving on, that is loop forever: refused.
pub fn get_ppi(
    area: &[u8],
    ppi_type: u32,
    internal: bool,
    size: usize,
) -> Result<Option<&[u8]>, Refused> {
    let mut at = 0usize;
    while at < area.len() {
        let left = area.len() - at;
        let (h, _) = rndis::PpiHeader::read_from_prefix(&area[at..])
            .map_err(|_| Refused::PpiLoop("header runs past the area"))?;
        let (psize, poff) = (h.size.get() as usize, h.ppi_offset.get() as usize);
        if psize > left {
            return Err(Refused::PpiLoop("size larger than what is left"));
        }
        if poff >= psize {
            return Err(Refused::PpiLoop("ppi_offset not below size"));
        }
        let word = h.ppi_type.get();
        if word & 0x7fff_ffff == ppi_type && (word >> 31 == 1) == internal {
            if psize - poff < size {
                return Err(Refused::PpiLoop("value smaller than its type"));
            }
            return Ok(Some(&area[at + poff..at + poff + size]));
        }
        if psize == 0 {
            return Err(Refused::PpiLoop("size 0"));
        }
        at += psize;
    }
    Ok(None)
}

/// The receive PPIs Linux reads (`rndis_filter_receive_data`): 802.1Q,
/// checksum and hash, each a u32.
pub fn receive_ppis(area: &[u8]) -> Result<rndis::PacketInfo, Refused> {
    let u32_of = |t| -> Result<Option<u32>, Refused> {
        Ok(get_ppi(area, t, false, 4)?.map(|v| u32::from_le_bytes(v.try_into().expect("4"))))
    };
    Ok(rndis::PacketInfo {
        vlan: u32_of(rndis::ppi::IEEE_8021Q)?,
        csum: u32_of(rndis::ppi::TCPIP_CHKSUM)?,
        hash: u32_of(rndis::ppi::NBL_HASH_VALUE)?,
        lso: None,
    })
}

/// A link event Linux acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkEvent {
    Up,
    Down,
    /// RNDIS_STATUS_NETWORK_CHANGE: down, then up again.
    NetworkChange,
}

/// `RNDIS_STATUS_NETWORK_CHANGE` (include/linux/rndis.h).
pub const STATUS_NETWORK_CHANGE: u32 = 0x4001_0018;

/// `netvsc_linkstatus_callback` (netvsc_drv.c): what an INDICATE_STATUS
/// (`msg`, the whole message) tells Linux; None for statuses it ignores.
pub fn link_status(msg: &[u8]) -> Result<Option<LinkEvent>, Refused> {
    let msg_len = msg.len() as u32;
    // resp->msg_len - RNDIS_HEADER_SIZE < sizeof(struct rndis_indicate_status)
    if msg.len() < rndis::HEADER_SIZE + size_of::<rndis::IndicateStatus>() {
        return Err(Refused::IndicateLength(msg_len));
    }
    let (i, _) = rndis::IndicateStatus::read_from_prefix(&msg[rndis::HEADER_SIZE..])
        .map_err(|_| Refused::IndicateLength(msg_len))?;
    Ok(match i.status.get() {
        rndis::status::MEDIA_CONNECT => Some(LinkEvent::Up),
        rndis::status::MEDIA_DISCONNECT => Some(LinkEvent::Down),
        STATUS_NETWORK_CHANGE => Some(LinkEvent::NetworkChange),
        _ => None,
    })
}

// ---------------------------------------------------------------------
// rndis_filter_device_add: the OID results Linux uses.

/// The MTU Linux takes from OID_GEN_MAXIMUM_FRAME_SIZE: `if (ret == 0 &&
/// size == sizeof(u32) && mtu < net->mtu)`.
pub fn frame_size(result: &[u8], mtu: u32) -> u32 {
    match <[u8; 4]>::try_from(result) {
        Ok(b) => mtu.min(u32::from_le_bytes(b)),
        Err(_) => mtu,
    }
}

/// OID_802_3_PERMANENT_ADDRESS (`rndis_filter_query_device_mac`, result
/// size `ETH_ALEN`): Linux copies what came back into the 6-byte address
/// (a shorter reply leaves the rest as it was: zero here).
pub fn permanent_address(result: &[u8]) -> [u8; 6] {
    let mut mac = [0u8; 6];
    mac[..result.len().min(6)].copy_from_slice(&result[..result.len().min(6)]);
    mac
}

/// `rndis_get_friendly_name`: the alias Linux sets from a FRIENDLY_NAME
/// result (512-byte buffer). `ucs2_as_utf8` stops at the first NUL, and
/// Linux's buffer holds nothing past what came back: a name without its
/// NUL is refused here (Linux would read stack bytes after it). The
/// default "Network Adapter" and an empty reply set no alias.
pub fn friendly_name(result: &[u8]) -> Result<Option<String>, Refused> {
    if result.is_empty() {
        return Ok(None);
    }
    let units: Vec<u16> = result
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    let Some(end) = units.iter().position(|&u| u == 0) else {
        return Err(Refused::Oid("friendly name without its NUL"));
    };
    let name = String::from_utf16_lossy(&units[..end]);
    Ok((name != "Network Adapter").then_some(name))
}

/// `rndis_set_link_state` (run on the OID_GEN_MEDIA_CONNECT_STATUS
/// reply, `reply` the whole QUERY_COMPLETE): Some(link up) when Linux
/// takes the state (SUCCESS, at least 4 bytes inside the message; 0 is
/// up), None when it keeps its own.
pub fn link_state(reply: &[u8]) -> Option<bool> {
    let (c, _) = rndis::QueryComplete::read_from_prefix(reply.get(8..)?).ok()?;
    let body = reply.len().checked_sub(rndis::HEADER_SIZE)?;
    let (off, len) = (
        c.info_buf_offset.get() as usize,
        c.info_buflen.get() as usize,
    );
    let ok = c.status.get() == rndis::status::SUCCESS
        && len >= 4
        && off >= size_of::<rndis::QueryComplete>()
        && body >= off
        && body - off >= len;
    let at = rndis::HEADER_SIZE + off;
    ok.then(|| reply[at..at + 4] == [0; 4])
}

/// `rndis_filter_init_device`: what Linux keeps of an INIT_COMPLETE whose
/// status is SUCCESS: (`max_pkt`, `pkt_align`) = (`max_pkt_per_msg`, `1 <<
/// pkt_alignment_factor`).
pub fn init_device(c: &rndis::InitComplete) -> Result<(u32, u32), Refused> {
    if c.status.get() != rndis::status::SUCCESS {
        return Err(Refused::Oid("RNDIS INIT_COMPLETE status"));
    }
    let factor = c.pkt_alignment_factor.get();
    if factor >= 32 {
        return Err(Refused::Oid("pkt_alignment_factor shifts past 32 bits"));
    }
    Ok((c.max_pkt_per_msg.get(), 1 << factor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    fn complete(info: &[u8], off: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&rndis::msg::QUERY_COMPLETE.to_le_bytes());
        m.extend_from_slice(&(8 + off + info.len() as u32).to_le_bytes());
        m.extend_from_slice(&7u32.to_le_bytes()); // request id
        m.extend_from_slice(&0u32.to_le_bytes()); // status
        m.extend_from_slice(&(info.len() as u32).to_le_bytes());
        m.extend_from_slice(&off.to_le_bytes());
        m.resize((8 + off) as usize, 0);
        m.extend_from_slice(info);
        m
    }

    #[test]
    fn query_result_applies_linux_bounds() {
        let r = complete(&[1, 2, 3, 4], 16);
        assert_eq!(query_result(&r, 4), Ok(&[1u8, 2, 3, 4][..]));
        assert_eq!(
            query_result(&r, 3),
            Err(Refused::TooLong { len: 4, limit: 3 })
        );
        let mut bad = complete(&[1, 2, 3, 4], 16);
        bad[20..24].copy_from_slice(&8u32.to_le_bytes());
        assert_eq!(query_result(&bad, 4), Err(Refused::OffsetInHeader(8)));
        let mut past = complete(&[1, 2, 3, 4], 16);
        past[16..20].copy_from_slice(&5u32.to_le_bytes());
        assert_eq!(query_result(&past, 8), Err(Refused::PastMessage));
        assert_eq!(query_result(&r[..20], 4), Err(Refused::Short));
    }

    #[test]
    fn a_20_byte_rss_reply_leaves_linux_on_one_channel() {
        let mut caps = [0u8; 20];
        caps[12..16].copy_from_slice(&4u32.to_le_bytes());
        let r = complete(&caps, 16);
        let got = query_result(&r, RSS_CAPS_RESULT_SIZE);
        assert!(got.is_err());
        assert_eq!(channels(rss_queues(got), 2), 1);
        let r = complete(&caps[..18], 16);
        assert_eq!(
            channels(rss_queues(query_result(&r, RSS_CAPS_RESULT_SIZE)), 2),
            2
        );
    }

    #[test]
    fn tso6_needs_both_lsov2_ipv6_option_bits() {
        let mut caps = rndis::offload_capabilities(super::super::super::nvsp::version::V61, 62_780);
        assert!(features(&caps).tso6);
        caps.lsov2_ip6_opts = (offload_caps::LSOV2_IP6_EXT | 0x2).into();
        let f = features(&caps);
        assert!(!f.tso6 && f.tso4 && f.csum_tcp6);
        assert_eq!(hardware_caps(caps.as_bytes()), Ok(caps));
        assert_eq!(
            hardware_caps(&caps.as_bytes()[..100]),
            Err(Refused::ObjectSize {
                size: 156,
                returned: 100
            })
        );
    }

    #[test]
    fn offload_params_follow_linux_sizes() {
        let f = Features {
            csum_tcp4: true,
            csum_udp4: true,
            tso4: true,
            csum_tcp6: true,
            csum_udp6: true,
            tso6: true,
            gso_max_size: 62_780,
        };
        let p = offload_params(&f, super::super::super::nvsp::version::V61);
        assert_eq!(
            p,
            [
                0x80, 3, 28, 0, 1, 4, 4, 4, 4, 0, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                0, 0
            ]
        );
        let p = offload_params(&f, super::super::super::nvsp::version::V4);
        assert_eq!(p.len(), 22);
        assert_eq!(
            (p[6], p[8]),
            (0, 0),
            "no UDP checksum offload before NVSP 5"
        );
    }

    fn nvsp(words: &[u32], len: usize) -> Vec<u8> {
        let mut v: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        v.resize(len, 0);
        v
    }

    #[test]
    fn netvsc_send_completion_sizes_and_types() {
        assert_eq!(send_completion(&[]), Ok(Completion::Empty));
        // INIT_COMPLETE falls through to SEND_RECV_BUF_COMPLETE's 28.
        let init = nvsp(&[nvsp::msg::INIT_COMPLETE, 0x6_0001, 0, 1], 40);
        assert!(matches!(send_completion(&init), Ok(Completion::Init(_))));
        assert_eq!(
            send_completion(&init[..16]),
            Err(Refused::ShortCompletion {
                msg_type: nvsp::msg::INIT_COMPLETE,
                len: 16
            })
        );
        let sub = nvsp(&[nvsp::msg::SUBCHANNEL, 1, 3], 12);
        assert!(matches!(send_completion(&sub), Ok(Completion::Init(_))));
        assert!(send_completion(&sub[..8]).is_err());
        let pkt = nvsp(&[nvsp::msg::SEND_RNDIS_PKT_COMPLETE, 1], 8);
        assert_eq!(send_completion(&pkt), Ok(Completion::RndisPkt(1)));
        assert!(send_completion(&pkt[..4]).is_err());
        // What vspa sent for SWITCH_DATA_PATH before E8.
        let switch = nvsp(&[nvsp::msg::SWITCH_DATA_PATH, 2], 40);
        assert_eq!(
            send_completion(&switch),
            Err(Refused::CompletionType(nvsp::msg::SWITCH_DATA_PATH))
        );
    }

    #[test]
    fn netvsc_init_buf_and_rndis_set_subchannel_bounds() {
        let ok = NvspMessage::from_prefix(&nvsp(
            &[
                nvsp::msg::SEND_RECV_BUF_COMPLETE,
                1,
                1,
                0,
                1600,
                1000,
                1_600_000,
            ],
            40,
        ));
        assert_eq!(init_recv_buf(&ok, 2 << 20), Ok((1600, 1000)));
        assert!(
            init_recv_buf(&ok, 1_000_000).is_err(),
            "sections past the buffer"
        );
        let small = NvspMessage::from_prefix(&nvsp(
            &[nvsp::msg::SEND_RECV_BUF_COMPLETE, 1, 1, 0, 64, 10],
            40,
        ));
        assert!(
            init_recv_buf(&small, 2 << 20).is_err(),
            "below NETVSC_MTU_MIN"
        );
        let two = NvspMessage::from_prefix(&nvsp(
            &[nvsp::msg::SEND_RECV_BUF_COMPLETE, 1, 2, 0, 1600, 10],
            40,
        ));
        assert!(init_recv_buf(&two, 2 << 20).is_err());
        let sc = |n| NvspMessage::from_prefix(&nvsp(&[nvsp::msg::SUBCHANNEL, 1, n], 40));
        assert_eq!(subchannel_complete(&sc(1), 1), Ok(1));
        assert_eq!(
            subchannel_complete(&sc(3), 1),
            Err(Refused::SubchannelCount {
                granted: 3,
                asked: 1
            })
        );
        assert_eq!(sc_open(3, 4), Ok(()));
        assert_eq!(
            sc_open(4, 4),
            Err(Refused::SubchannelIndex {
                index: 4,
                num_chn: 4
            })
        );
    }

    #[test]
    fn netvsc_send_table_reads_at_40_up_to_nvsp_6() {
        let mut m = nvsp(&[nvsp::msg::SEND_INDIRECTION_TABLE, 16, 12], 40);
        m.extend((0..16u32).flat_map(|i| (i % 3).to_le_bytes()));
        let want: [u32; 16] = core::array::from_fn(|i| i as u32 % 3);
        assert_eq!(send_table(&m, nvsp::version::V6), Ok(want));
        // NVSP 6.1 believes the offset: 12 reads the wrong words.
        assert_ne!(send_table(&m, nvsp::version::V61), Ok(want));
        m[8..12].copy_from_slice(&40u32.to_le_bytes());
        assert_eq!(send_table(&m, nvsp::version::V61), Ok(want));
        m[8..12].copy_from_slice(&41u32.to_le_bytes());
        assert!(send_table(&m, nvsp::version::V61).is_err());
        m[4..8].copy_from_slice(&8u32.to_le_bytes());
        assert!(send_table(&m, nvsp::version::V6).is_err());
    }

    #[test]
    fn netvsc_receive_packet_and_range_checks() {
        let pkt = nvsp::msg::SEND_RNDIS_PKT.to_le_bytes();
        assert_eq!(receive_packet(32, &pkt, 0xCAFE, 1), Ok(()));
        assert!(receive_packet(24, &pkt, 0xCAFE, 0).is_err());
        assert!(receive_packet(32, &pkt, 0xBEEF, 1).is_err());
        assert!(receive_packet(32, &pkt, 0xCAFE, 2).is_err());
        assert!(receive_packet(32, &[1, 0, 0, 0], 0xCAFE, 1).is_err());
        assert_eq!(receive_range(0, 192, 4096, 192), Ok(()));
        assert_eq!(
            receive_range(0, 280, 4096, 192),
            Err(Refused::RangeTooLong {
                len: 280,
                section: 192
            })
        );
        assert!(receive_range(4000, 192, 4096, 192).is_err());
        assert!(packet_fits(xfer_header_size(375) + 16).is_ok());
        assert!(packet_fits(MAX_PKT_SIZE + 8).is_err());
        assert_eq!(MAX_PKT_SIZE, 4624);
    }

    #[test]
    fn rndis_receive_data_and_get_ppi_as_linux() {
        let info = rndis::PacketInfo {
            vlan: Some(0x50),
            csum: Some(0x28),
            hash: Some(0x1234_5678),
            lso: None,
        };
        let mut hdr = [0u8; 96];
        let n = rndis::write_packet_headers(&mut hdr, 60, &info);
        let mut msg = hdr[..n].to_vec();
        msg.resize(n + 60, 0xab);
        assert_eq!(rndis_receive(&msg, msg.len()), Ok(rndis::msg::PACKET));
        assert!(
            rndis_receive(&msg, msg.len() - 1).is_err(),
            "msg_len past the range"
        );
        let rx = receive_data(&msg, msg.len()).unwrap();
        assert_eq!((rx.data_offset, rx.data_len), (n, 60));
        let (off, len) = rx.ppi_area().unwrap().unwrap();
        assert_eq!(receive_ppis(&msg[off..off + len]), Ok(info));
        // A PPI whose ppi_offset is not below its size: Linux spins.
        let mut bad = msg.clone();
        bad[off + 8..off + 12].copy_from_slice(&16u32.to_le_bytes());
        assert!(matches!(
            receive_ppis(&bad[off..off + len]),
            Err(Refused::PpiLoop(_))
        ));
        // per_pkt_info_len below one PPI header: Linux finds no PPI.
        let mut short = msg.clone();
        short[8 + 24..8 + 28].copy_from_slice(&4u32.to_le_bytes());
        let rx = receive_data(&short, short.len()).unwrap();
        assert!(rx.ppi_area().is_err());
        // The frame runs past the range.
        assert!(receive_data(&msg, msg.len() - 1).is_err());
        let mut t = msg.clone();
        t[0..4].copy_from_slice(&rndis::msg::KEEPALIVE_COMPLETE.to_le_bytes());
        assert!(matches!(
            rndis_receive(&t, t.len()),
            Err(Refused::RndisType(_))
        ));
    }

    #[test]
    fn link_status_name_and_link_state_as_linux() {
        let ind = |status: u32, len: u32| {
            let mut m = nvsp(
                &[rndis::msg::INDICATE_STATUS, len, status, 0, 0],
                len as usize,
            );
            m.truncate(len as usize);
            m
        };
        assert_eq!(
            link_status(&ind(rndis::status::MEDIA_CONNECT, 20)),
            Ok(Some(LinkEvent::Up))
        );
        assert_eq!(
            link_status(&ind(rndis::status::MEDIA_DISCONNECT, 20)),
            Ok(Some(LinkEvent::Down))
        );
        assert_eq!(link_status(&ind(0x4001_0013, 20)), Ok(None));
        assert!(link_status(&ind(rndis::status::MEDIA_CONNECT, 16)).is_err());
        let name = rndis::utf16_name("eth-vm1", 256);
        assert_eq!(friendly_name(&name), Ok(Some("eth-vm1".into())));
        assert!(friendly_name(&name[..name.len() - 2]).is_err(), "no NUL");
        let default = rndis::utf16_name("Network Adapter", 256);
        assert_eq!(friendly_name(&default), Ok(None));
        let up = complete(&0u32.to_le_bytes(), 16);
        assert_eq!(link_state(&up), Some(true));
        assert_eq!(link_state(&complete(&1u32.to_le_bytes(), 16)), Some(false));
        assert_eq!(link_state(&complete(&[0, 0], 16)), None, "info_buflen < 4");
        assert_eq!(frame_size(&1400u32.to_le_bytes(), 1500), 1400);
        assert_eq!(frame_size(&9000u32.to_le_bytes(), 1500), 1500);
        assert_eq!(frame_size(&[0, 1], 1500), 1500);
        assert_eq!(permanent_address(&[1, 2, 3]), [1, 2, 3, 0, 0, 0]);
    }
}
