//! RNDIS, the netvsc protocol's inner layer: the messages inside
//! SEND_RNDIS_PKT (guest to host, in send-buffer sections or GPA-direct
//! ranges) and inside receive-buffer ranges (host to guest), plus the NDIS
//! objects some OIDs carry. All little endian; offsets inside a message are
//! counted from the start of its body (right after the 8-byte header).

// The zerocopy derives inside `wire!` generate helper types that the lint
// sees as local; every wire struct itself derives Debug.
#![allow(missing_debug_implementations)]

use super::nvsp::wire;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `ndis_msg_type` values (completions are `0x8000_0000 | request`).
pub mod msg {
    pub const PACKET: u32 = 1;
    pub const INIT: u32 = 2;
    pub const HALT: u32 = 3;
    pub const QUERY: u32 = 4;
    pub const SET: u32 = 5;
    pub const RESET: u32 = 6;
    pub const INDICATE_STATUS: u32 = 7;
    pub const KEEPALIVE: u32 = 8;
    pub const COMPLETION: u32 = 0x8000_0000;
    pub const INIT_COMPLETE: u32 = COMPLETION | INIT;
    pub const QUERY_COMPLETE: u32 = COMPLETION | QUERY;
    pub const SET_COMPLETE: u32 = COMPLETION | SET;
    pub const RESET_COMPLETE: u32 = COMPLETION | RESET;
    pub const KEEPALIVE_COMPLETE: u32 = COMPLETION | KEEPALIVE;
}

/// RNDIS status codes.
pub mod status {
    pub const SUCCESS: u32 = 0;
    pub const FAILURE: u32 = 0xC000_0001;
    pub const NOT_SUPPORTED: u32 = 0xC000_00BB;
    pub const INVALID_DATA: u32 = 0xC001_0015;
    pub const BUFFER_OVERFLOW: u32 = 0x8000_0005;
    pub const MEDIA_CONNECT: u32 = 0x4001_000B;
    pub const MEDIA_DISCONNECT: u32 = 0x4001_000C;
    pub const NETWORK_CHANGE: u32 = 0x4001_0018;
}

/// The OIDs a Linux guest queries and sets.
pub mod oid {
    pub const GEN_MAXIMUM_FRAME_SIZE: u32 = 0x0001_0106;
    pub const GEN_LINK_SPEED: u32 = 0x0001_0107;
    pub const GEN_CURRENT_PACKET_FILTER: u32 = 0x0001_010E;
    pub const GEN_MEDIA_CONNECT_STATUS: u32 = 0x0001_0114;
    pub const GEN_RECEIVE_SCALE_CAPABILITIES: u32 = 0x0001_0203;
    pub const GEN_RECEIVE_SCALE_PARAMETERS: u32 = 0x0001_0204;
    pub const GEN_RNDIS_CONFIG_PARAMETER: u32 = 0x0001_021B;
    pub const GEN_FRIENDLY_NAME: u32 = 0x0002_0216;
    pub const P802_3_PERMANENT_ADDRESS: u32 = 0x0101_0101;
    pub const P802_3_CURRENT_ADDRESS: u32 = 0x0101_0102;
    pub const TCP_OFFLOAD_PARAMETERS: u32 = 0xFC01_020C;
    pub const TCP_OFFLOAD_HARDWARE_CAPABILITIES: u32 = 0xFC01_020D;
}

/// OID_GEN_CURRENT_PACKET_FILTER bits.
pub mod filter {
    pub const DIRECTED: u32 = 0x1;
    pub const MULTICAST: u32 = 0x2;
    pub const ALL_MULTICAST: u32 = 0x4;
    pub const BROADCAST: u32 = 0x8;
    pub const PROMISCUOUS: u32 = 0x20;
}

/// Per-packet info types.
pub mod ppi {
    pub const TCPIP_CHKSUM: u32 = 0;
    pub const TCP_LARGESEND: u32 = 2;
    pub const IEEE_8021Q: u32 = 6;
    pub const NBL_HASH_VALUE: u32 = 8;
}

/// Size of the header every RNDIS message starts with.
pub const HEADER_SIZE: usize = 8;
/// Size of the header of one per-packet info.
pub const PPI_HEADER_SIZE: usize = 12;
/// Size of a PPI carrying one u32.
pub const PPI_U32_SIZE: usize = PPI_HEADER_SIZE + 4;

wire!(
    /// Header of every RNDIS message.
    Header { msg_type: U32, msg_len: U32, } = 8
);
wire!(
    /// INIT request body.
    InitRequest { req_id: U32, major: U32, minor: U32, max_xfer_size: U32, } = 16
);
wire!(
    /// INIT completion body.
    InitComplete {
        req_id: U32,
        status: U32,
        major: U32,
        minor: U32,
        dev_flags: U32,
        medium: U32,
        max_pkt_per_msg: U32,
        max_xfer_size: U32,
        pkt_alignment_factor: U32,
        af_list_offset: U32,
        af_list_size: U32,
    } = 44
);
wire!(
    /// QUERY and SET request bodies (SET's data follows).
    OidRequest { req_id: U32, oid: U32, info_buflen: U32, info_buf_offset: U32, dev_vc_handle: U32, } = 20
);
wire!(
    /// QUERY completion body (the data follows at `info_buf_offset`).
    QueryComplete { req_id: U32, status: U32, info_buflen: U32, info_buf_offset: U32, } = 16
);
wire!(
    /// SET and KEEPALIVE completion bodies.
    SetComplete { req_id: U32, status: U32, } = 8
);
wire!(
    /// RESET completion body.
    ResetComplete { status: U32, addressing_reset: U32, } = 8
);
wire!(
    /// INDICATE_STATUS body.
    IndicateStatus { status: U32, status_buflen: U32, status_buf_offset: U32, } = 12
);
wire!(
    /// PACKET body.
    Packet {
        data_offset: U32,
        data_len: U32,
        oob_data_offset: U32,
        oob_data_len: U32,
        num_oob_data_elements: U32,
        per_pkt_info_offset: U32,
        per_pkt_info_len: U32,
        vc_handle: U32,
        reserved: U32,
    } = 36
);
wire!(
    /// Header of one per-packet info; its value is at `ppi_offset` from
    /// the start of this header.
    PpiHeader { size: U32, ppi_type: U32, ppi_offset: U32, } = 12
);
wire!(
    /// OID_GEN_RNDIS_CONFIG_PARAMETER: offsets from the start of this struct.
    ConfigParameter { name_offset: U32, name_length: U32, param_type: U32, value_offset: U32, value_length: U32, } = 20
);
wire!(
    /// Header of an NDIS object.
    ObjectHeader { obj_type: u8, revision: u8, size: U16, } = 4
);

/// Size of a PACKET message's headers (RNDIS header + PACKET body).
pub const PACKET_HEADERS: usize = HEADER_SIZE + size_of::<Packet>();

/// An RNDIS message: header, `body` (the message type's fixed part), then
/// `data`. Both sides build theirs with it (the host's replies and
/// indications, the client's requests).
pub fn message(msg_type: u32, body: &[u8], data: &[u8]) -> Vec<u8> {
    let len = HEADER_SIZE + body.len() + data.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(
        Header {
            msg_type: msg_type.into(),
            msg_len: (len as u32).into(),
        }
        .as_bytes(),
    );
    m.extend_from_slice(body);
    m.extend_from_slice(data);
    m
}

/// NDIS object types.
pub const OBJECT_TYPE_OFFLOAD: u8 = 0xA7;
pub const OBJECT_TYPE_OFFLOAD_PARAMETERS: u8 = 0x80;
pub const OBJECT_TYPE_RSS_CAPABILITIES: u8 = 0x88;
pub const OBJECT_TYPE_RSS_PARAMETERS: u8 = 0x89;

/// `struct ndis_offload` (OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES), whose
/// natural C layout has no holes but the two after `rsc`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct NdisOffload {
    pub header: ObjectHeader,
    pub ip4_txenc: U32,
    pub ip4_txcsum: U32,
    pub ip4_rxenc: U32,
    pub ip4_rxcsum: U32,
    pub ip6_txenc: U32,
    pub ip6_txcsum: U32,
    pub ip6_rxenc: U32,
    pub ip6_rxcsum: U32,
    pub lsov1: [U32; 4],
    pub ipsecv1: [U32; 7],
    pub lsov2_ip4_encap: U32,
    pub lsov2_ip4_maxsz: U32,
    pub lsov2_ip4_minsg: U32,
    pub lsov2_ip6_encap: U32,
    pub lsov2_ip6_maxsz: U32,
    pub lsov2_ip6_minsg: U32,
    pub lsov2_ip6_opts: U32,
    pub flags: U32,
    pub ipsecv2: [u8; 32],
    pub rsc_ip4: u8,
    pub rsc_ip6: u8,
    pub rsc_pad: [u8; 2],
    pub encap_gre_flags: U32,
    pub encap_gre_maxhdr: U32,
}
const _: () = assert!(size_of::<NdisOffload>() == 156);

/// Sizes of `ndis_offload` by revision (NDIS 6.0, 6.1, 6.30).
pub const OFFLOAD_SIZE_6_0: u16 = 112;
pub const OFFLOAD_SIZE_6_1: u16 = 144;
pub const OFFLOAD_SIZE_6_30: u16 = 156;

/// Offload capability bits.
pub mod offload_caps {
    pub const ENCAP_8023: u32 = 2;
    pub const IP4_OPTIONS: u32 = 0x1;
    pub const TCP4_OPTIONS: u32 = 0x4;
    pub const TCP4: u32 = 0x10;
    pub const UDP4: u32 = 0x40;
    pub const IP4: u32 = 0x100;
    pub const IP6_EXT: u32 = 0x1;
    pub const TCP6_OPTIONS: u32 = 0x4;
    pub const TCP6: u32 = 0x10;
    pub const UDP6: u32 = 0x40;
    /// `NDIS_LSOV2_CAP_IP6EXT` and `NDIS_LSOV2_CAP_TCP6OPT`
    /// (drivers/net/hyperv/hyperv_net.h): Linux turns TSO6 on only when
    /// both are set (`NDIS_LSOV2_CAP_IP6`).
    pub const LSOV2_IP6_EXT: u32 = 0x1;
    pub const LSOV2_TCP6_OPTIONS: u32 = 0x4;
    pub const LSOV2_IP6: u32 = LSOV2_IP6_EXT | LSOV2_TCP6_OPTIONS;
    /// `NDIS_TXCSUM_ALL_TCP4` / `NDIS_TXCSUM_ALL_TCP6`: what Linux needs
    /// for TCP checksum offload (and then LSOv2) per IP version.
    pub const ALL_TCP4: u32 = TCP4 | TCP4_OPTIONS;
    pub const ALL_TCP6: u32 = TCP6 | TCP6_OPTIONS | IP6_EXT;
}

/// The offload capabilities vspa reports: checksums both ways for TCP and
/// UDP over IPv4 and IPv6, LSOv2 for both up to `max_lso` bytes, no RSC.
/// Revision and size follow the NVSP version, as the guest asks.
pub fn offload_capabilities(nvsp_version: u32, max_lso: u32) -> NdisOffload {
    use super::nvsp::version;
    use offload_caps::*;
    let (revision, size) = if nvsp_version >= version::V5 {
        (3, OFFLOAD_SIZE_6_30)
    } else if nvsp_version >= version::V4 {
        (2, OFFLOAD_SIZE_6_1)
    } else {
        (1, OFFLOAD_SIZE_6_0)
    };
    let v4 = IP4_OPTIONS | TCP4_OPTIONS | TCP4 | UDP4 | IP4;
    let v6 = IP6_EXT | TCP6_OPTIONS | TCP6 | UDP6;
    NdisOffload {
        header: ObjectHeader {
            obj_type: OBJECT_TYPE_OFFLOAD,
            revision,
            size: size.into(),
        },
        ip4_txenc: ENCAP_8023.into(),
        ip4_txcsum: v4.into(),
        ip4_rxenc: ENCAP_8023.into(),
        ip4_rxcsum: v4.into(),
        ip6_txenc: ENCAP_8023.into(),
        ip6_txcsum: v6.into(),
        ip6_rxenc: ENCAP_8023.into(),
        ip6_rxcsum: v6.into(),
        lsov2_ip4_encap: ENCAP_8023.into(),
        lsov2_ip4_maxsz: max_lso.into(),
        lsov2_ip4_minsg: 2.into(),
        lsov2_ip6_encap: ENCAP_8023.into(),
        lsov2_ip6_maxsz: max_lso.into(),
        lsov2_ip6_minsg: 2.into(),
        lsov2_ip6_opts: (LSOV2_IP6_EXT | LSOV2_TCP6_OPTIONS).into(),
        ..Default::default()
    }
}

/// `struct ndis_recv_scale_cap` (OID_GEN_RECEIVE_SCALE_CAPABILITIES),
/// `__packed` in Linux's hyperv_net.h: 18 bytes, no trailing padding.
/// Linux's `rndis_filter_query_device` refuses a reply whose
/// `info_buflen` exceeds `sizeof(struct ndis_recv_scale_cap)`.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct RssCapabilities {
    pub header: ObjectHeader,
    pub capabilities: U32,
    pub num_interrupt_messages: U32,
    pub num_receive_queues: U32,
    pub num_indirection_entries: U16,
}
const _: () = assert!(size_of::<RssCapabilities>() == 18);

/// RSS capability flags: Toeplitz hashing of TCP/IPv4 and TCP/IPv6.
pub const RSS_CAPS_HASH_TOEPLITZ: u32 = 0x1;
pub const RSS_CAPS_CLASSIFICATION_AT_DPC: u32 = 0x0400_0000;
pub const RSS_CAPS_HASH_TYPE_TCP_IPV4: u32 = 0x100;
pub const RSS_CAPS_HASH_TYPE_TCP_IPV6: u32 = 0x200;

/// Indirection table entries vspa reports and accepts at most.
pub const RSS_TABLE_MAX: usize = 128;
/// Largest RSS hash key accepted (Linux sends 40 bytes).
pub const RSS_KEY_MAX: usize = 64;

/// `struct ndis_recv_scale_param` (OID_GEN_RECEIVE_SCALE_PARAMETERS), C
/// natural layout; the table and key are at offsets from its start.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct RssParameters {
    pub header: ObjectHeader,
    pub flags: U16,
    pub base_cpu: U16,
    pub hash_info: U32,
    pub table_size: U16,
    pub pad0: U16,
    pub table_offset: U32,
    pub key_size: U16,
    pub pad1: U16,
    pub key_offset: U32,
    pub processor_masks_offset: U32,
    pub num_processor_masks: U32,
    pub processor_masks_entry_size: U32,
}
const _: () = assert!(size_of::<RssParameters>() == 40);

/// RSS parameter flag: hashing disabled.
pub const RSS_PARAM_FLAG_DISABLE_RSS: u16 = 0x10;

/// Checksum PPI bits, transmit direction (guest to host).
pub mod csum_tx {
    pub const IS_IPV4: u32 = 1 << 0;
    pub const IS_IPV6: u32 = 1 << 1;
    pub const TCP: u32 = 1 << 2;
    pub const UDP: u32 = 1 << 3;
    pub const IP_HEADER: u32 = 1 << 4;
    /// tcp_header_offset: bits 16..25.
    pub fn header_offset(v: u32) -> u16 {
        ((v >> 16) & 0x3ff) as u16
    }
}

/// Checksum PPI bits, receive direction (host to guest).
pub mod csum_rx {
    pub const TCP_FAILED: u32 = 1 << 0;
    pub const UDP_FAILED: u32 = 1 << 1;
    pub const IP_FAILED: u32 = 1 << 2;
    pub const TCP_SUCCEEDED: u32 = 1 << 3;
    pub const UDP_SUCCEEDED: u32 = 1 << 4;
    pub const IP_SUCCEEDED: u32 = 1 << 5;
}

/// LSOv2 transmit PPI fields.
pub mod lso {
    pub fn mss(v: u32) -> u32 {
        v & 0xf_ffff
    }
    pub fn tcp_header_offset(v: u32) -> u16 {
        ((v >> 20) & 0x3ff) as u16
    }
    pub fn is_v2(v: u32) -> bool {
        v & (1 << 30) != 0
    }
    pub fn is_ipv6(v: u32) -> bool {
        v & (1 << 31) != 0
    }
    /// An LSOv2 value for `mss` with the TCP header at `offset`.
    pub fn encode(mss: u32, offset: u16, ipv6: bool) -> u32 {
        (mss & 0xf_ffff) | (u32::from(offset) & 0x3ff) << 20 | 1 << 30 | u32::from(ipv6) << 31
    }
}

/// 802.1Q PPI: priority bits 0..2, CFI bit 3, VLAN id bits 4..15.
pub mod vlan {
    pub fn to_tci(v: u32) -> u16 {
        let pri = (v & 0x7) as u16;
        let cfi = ((v >> 3) & 1) as u16;
        let vid = ((v >> 4) & 0xfff) as u16;
        pri << 13 | cfi << 12 | vid
    }
    pub fn from_tci(tci: u16) -> u32 {
        let tci = u32::from(tci);
        (tci >> 13) | ((tci >> 12) & 1) << 3 | (tci & 0xfff) << 4
    }
}

/// Per-packet info of one PACKET message, as far as vspa uses it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketInfo {
    pub csum: Option<u32>,
    pub lso: Option<u32>,
    pub vlan: Option<u32>,
    pub hash: Option<u32>,
}

/// A malformed RNDIS message; the message is dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RndisError {
    #[error(
        "message length {len} is shorter than its header or runs past the {available} bytes left"
    )]
    BadLength { len: u32, available: usize },
    #[error("data {offset}+{len} runs past the {msg_len}-byte message")]
    BadData { offset: u32, len: u32, msg_len: u32 },
    #[error("per-packet info {offset}+{len} runs past the message")]
    BadPpiArea { offset: u32, len: u32 },
    #[error("per-packet info of size {size} (value at {value_offset}) is malformed")]
    BadPpi { size: u32, value_offset: u32 },
    #[error("frame of {0} bytes is too short or too long")]
    BadFrameLength(u32),
}

/// Where a PACKET message's frame and PPIs are, relative to the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketLayout {
    pub data_offset: usize,
    pub data_len: usize,
    pub ppi_offset: usize,
    pub ppi_len: usize,
}

/// Checks a PACKET body against the message length: the frame and the PPI
/// area must lie inside the message.
pub fn packet_layout(p: &Packet, msg_len: u32) -> Result<PacketLayout, RndisError> {
    let body = u64::from(msg_len) - HEADER_SIZE as u64;
    let (off, len) = (p.data_offset.get(), p.data_len.get());
    if u64::from(off) + u64::from(len) > body || (off as usize) < size_of::<Packet>() {
        return Err(RndisError::BadData {
            offset: off,
            len,
            msg_len,
        });
    }
    let (poff, plen) = (p.per_pkt_info_offset.get(), p.per_pkt_info_len.get());
    if plen != 0
        && (u64::from(poff) + u64::from(plen) > body || (poff as usize) < size_of::<Packet>())
    {
        return Err(RndisError::BadPpiArea {
            offset: poff,
            len: plen,
        });
    }
    Ok(PacketLayout {
        data_offset: HEADER_SIZE + off as usize,
        data_len: len as usize,
        ppi_offset: HEADER_SIZE + poff as usize,
        ppi_len: plen as usize,
    })
}

/// Walks a PPI area (copied out of shared memory) and picks the known
/// types. Each PPI's `size` covers its header and value; unknown types are
/// skipped.
pub fn parse_ppis(area: &[u8]) -> Result<PacketInfo, RndisError> {
    let mut info = PacketInfo::default();
    let mut at = 0usize;
    while at < area.len() {
        let Ok((h, _)) = PpiHeader::read_from_prefix(&area[at..]) else {
            return Err(RndisError::BadPpi {
                size: 0,
                value_offset: 0,
            });
        };
        let (size, voff) = (h.size.get(), h.ppi_offset.get());
        let bad = RndisError::BadPpi {
            size,
            value_offset: voff,
        };
        let size = size as usize;
        if size < PPI_HEADER_SIZE || size > area.len() - at {
            return Err(bad);
        }
        let value = || -> Result<u32, RndisError> {
            let v = voff as usize;
            if v < PPI_HEADER_SIZE || v + 4 > size {
                return Err(bad);
            }
            let b = &area[at + v..at + v + 4];
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        match h.ppi_type.get() {
            ppi::TCPIP_CHKSUM => info.csum = Some(value()?),
            ppi::TCP_LARGESEND => info.lso = Some(value()?),
            ppi::IEEE_8021Q => info.vlan = Some(value()?),
            ppi::NBL_HASH_VALUE => info.hash = Some(value()?),
            _ => {}
        }
        at += size;
    }
    Ok(info)
}

/// Appends a PPI carrying `value` (the layout Linux and Hyper-V use: value
/// right after the header).
pub fn push_ppi(out: &mut [u8], at: usize, ppi_type: u32, value: u32) -> usize {
    let h = PpiHeader {
        size: (PPI_U32_SIZE as u32).into(),
        ppi_type: ppi_type.into(),
        ppi_offset: (PPI_HEADER_SIZE as u32).into(),
    };
    out[at..at + PPI_HEADER_SIZE].copy_from_slice(h.as_bytes());
    out[at + PPI_HEADER_SIZE..at + PPI_U32_SIZE].copy_from_slice(&value.to_le_bytes());
    at + PPI_U32_SIZE
}

/// Writes the RNDIS header, PACKET body and PPIs of a data message whose
/// frame of `frame_len` bytes follows; returns the header length.
pub fn write_packet_headers(out: &mut [u8; 96], frame_len: usize, info: &PacketInfo) -> usize {
    let mut at = PACKET_HEADERS;
    for (t, v) in [
        (ppi::TCPIP_CHKSUM, info.csum),
        (ppi::IEEE_8021Q, info.vlan),
        (ppi::NBL_HASH_VALUE, info.hash),
        (ppi::TCP_LARGESEND, info.lso),
    ] {
        if let Some(v) = v {
            at = push_ppi(out, at, t, v);
        }
    }
    let ppi_len = at - PACKET_HEADERS;
    let h = Header {
        msg_type: msg::PACKET.into(),
        msg_len: ((at + frame_len) as u32).into(),
    };
    let p = Packet {
        data_offset: ((at - HEADER_SIZE) as u32).into(),
        data_len: (frame_len as u32).into(),
        per_pkt_info_offset: if ppi_len > 0 {
            (size_of::<Packet>() as u32).into()
        } else {
            0.into()
        },
        per_pkt_info_len: (ppi_len as u32).into(),
        ..Default::default()
    };
    out[..HEADER_SIZE].copy_from_slice(h.as_bytes());
    out[HEADER_SIZE..PACKET_HEADERS].copy_from_slice(p.as_bytes());
    at
}

/// Encodes `name` as UTF-16LE with a terminating NUL, at most `max` bytes.
pub fn utf16_name(name: &str, max: usize) -> Vec<u8> {
    let mut out: Vec<u8> = name
        .encode_utf16()
        .take(max / 2 - 1)
        .flat_map(u16::to_le_bytes)
        .collect();
    out.extend_from_slice(&[0, 0]);
    out
}

/// Decodes UTF-16LE bytes (lossy), stopping at a NUL.
pub fn from_utf16(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offload_capabilities_layout() {
        let c = offload_capabilities(super::super::nvsp::version::V61, 62_780);
        let b = c.as_bytes();
        assert_eq!(&b[..4], &[0xa7, 3, 156, 0]);
        assert_eq!(&b[4..8], &2u32.to_le_bytes(), "ip4 tx encapsulation");
        assert_eq!(&b[8..12], &0x155u32.to_le_bytes(), "ip4 tx checksums");
        assert_eq!(&b[24..28], &0x55u32.to_le_bytes(), "ip6 tx checksums");
        assert_eq!(&b[80..84], &2u32.to_le_bytes(), "lsov2 ip4 encapsulation");
        assert_eq!(&b[84..88], &62_780u32.to_le_bytes(), "lsov2 ip4 max size");
        assert_eq!(&b[88..92], &2u32.to_le_bytes(), "lsov2 ip4 min segments");
        assert_eq!(&b[104..108], &5u32.to_le_bytes(), "lsov2 ip6 options");
        assert_eq!(&b[144..146], &[0, 0], "no RSC");
        let old = offload_capabilities(super::super::nvsp::version::V2, 62_780);
        assert_eq!(&old.as_bytes()[..4], &[0xa7, 1, 112, 0]);
        let v4 = offload_capabilities(super::super::nvsp::version::V4, 62_780);
        assert_eq!(&v4.as_bytes()[..4], &[0xa7, 2, 144, 0]);
    }

    #[test]
    fn packet_headers_and_ppis_round_trip() {
        let mut out = [0u8; 96];
        let info = PacketInfo {
            csum: Some(csum_rx::TCP_SUCCEEDED | csum_rx::IP_SUCCEEDED),
            vlan: Some(vlan::from_tci(0x6005)),
            hash: Some(0xdead_beef),
            lso: None,
        };
        let n = write_packet_headers(&mut out, 60, &info);
        assert_eq!(n, 44 + 3 * 16);
        assert_eq!(&out[..8], &[1, 0, 0, 0, 152, 0, 0, 0]);
        let p = Packet::read_from_bytes(&out[8..44]).unwrap();
        assert_eq!(p.data_offset.get(), 36 + 48);
        assert_eq!(p.data_len.get(), 60);
        assert_eq!(p.per_pkt_info_offset.get(), 36);
        assert_eq!(p.per_pkt_info_len.get(), 48);
        // First PPI: size 16, type 0, value offset 12, value.
        assert_eq!(&out[44..56], &[16, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0]);
        assert_eq!(&out[56..60], &0x28u32.to_le_bytes());
        let l = packet_layout(&p, 152).unwrap();
        assert_eq!((l.data_offset, l.data_len), (92, 60));
        let parsed = parse_ppis(&out[l.ppi_offset..l.ppi_offset + l.ppi_len]).unwrap();
        assert_eq!(parsed, info);
        assert_eq!(vlan::to_tci(parsed.vlan.unwrap()), 0x6005);
    }

    #[test]
    fn malformed_packets_are_refused() {
        let p = Packet {
            data_offset: 36.into(),
            data_len: 100.into(),
            ..Default::default()
        };
        assert!(packet_layout(&p, 8 + 36 + 100).is_ok());
        assert!(matches!(
            packet_layout(&p, 8 + 36 + 99),
            Err(RndisError::BadData { .. })
        ));
        let huge = Packet {
            data_offset: u32::MAX.into(),
            data_len: u32::MAX.into(),
            ..Default::default()
        };
        assert!(packet_layout(&huge, u32::MAX).is_err());
        let ppi_past = Packet {
            per_pkt_info_offset: 36.into(),
            per_pkt_info_len: 200.into(),
            ..p
        };
        assert!(matches!(
            packet_layout(&ppi_past, 8 + 36 + 100),
            Err(RndisError::BadPpiArea { .. })
        ));
        // A PPI whose size runs past the area, one whose value is outside it,
        // and a zero-size one (which would loop forever if accepted).
        assert!(parse_ppis(&[32, 0, 0, 0, 0, 0, 0, 0, 12, 0, 0, 0, 1, 2, 3, 4]).is_err());
        assert!(parse_ppis(&[16, 0, 0, 0, 0, 0, 0, 0, 14, 0, 0, 0, 1, 2, 3, 4]).is_err());
        assert!(parse_ppis(&[0; 16]).is_err());
        assert!(parse_ppis(&[1, 2, 3]).is_err());
        // Unknown types are skipped.
        let i = parse_ppis(&[16, 0, 0, 0, 99, 0, 0, 0, 12, 0, 0, 0, 1, 2, 3, 4]).unwrap();
        assert_eq!(i, PacketInfo::default());
    }

    #[test]
    fn lso_and_vlan_bits() {
        let v = lso::encode(1448, 34, false);
        assert_eq!(lso::mss(v), 1448);
        assert_eq!(lso::tcp_header_offset(v), 34);
        assert!(lso::is_v2(v) && !lso::is_ipv6(v));
        assert!(lso::is_ipv6(lso::encode(1440, 54, true)));
        assert_eq!(csum_tx::header_offset(0x0022_0005), 34);
        assert_eq!(vlan::from_tci(0x0064), 0x640);
        assert_eq!(utf16_name("ab", 256), vec![b'a', 0, b'b', 0, 0, 0]);
        assert_eq!(from_utf16(&utf16_name("eth-vm1", 256)), "eth-vm1");
    }
}
