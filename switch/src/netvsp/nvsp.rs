//! NVSP, the netvsc protocol's outer layer: `struct nvsp_message` and its
//! bodies (all little endian, packed), as Linux's hv_netvsc lays them out.
//!
//! Every message a guest sends is a zero-filled 40-byte [`NvspMessage`]: a
//! `msg_type` and a 36-byte body the message type gives a meaning to. The
//! typed bodies below are read from and written to that body, and every
//! packet a guest sends is parsed into an [`NvspRequest`] before the NIC
//! acts on it.

// The zerocopy derives inside `wire!` generate helper types that the lint
// sees as local; every wire struct itself derives Debug.
#![allow(missing_debug_implementations)]

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of `struct nvsp_message` (Linux always sends this many bytes).
pub const MESSAGE_SIZE: usize = 40;

/// Protocol versions, oldest first.
pub mod version {
    pub const V1: u32 = 0x2;
    pub const V2: u32 = 0x30002;
    pub const V4: u32 = 0x40000;
    pub const V5: u32 = 0x50000;
    pub const V6: u32 = 0x60000;
    pub const V61: u32 = 0x60001;
}

/// Versions vspa accepts, newest first (the order a guest tries them).
pub const SUPPORTED_VERSIONS: [u32; 6] = [
    version::V61,
    version::V6,
    version::V5,
    version::V4,
    version::V2,
    version::V1,
];

/// `msg_type` values.
pub mod msg {
    pub const INIT: u32 = 1;
    pub const INIT_COMPLETE: u32 = 2;
    pub const SEND_NDIS_VER: u32 = 100;
    pub const SEND_RECV_BUF: u32 = 101;
    pub const SEND_RECV_BUF_COMPLETE: u32 = 102;
    pub const REVOKE_RECV_BUF: u32 = 103;
    pub const SEND_SEND_BUF: u32 = 104;
    pub const SEND_SEND_BUF_COMPLETE: u32 = 105;
    pub const REVOKE_SEND_BUF: u32 = 106;
    pub const SEND_RNDIS_PKT: u32 = 107;
    pub const SEND_RNDIS_PKT_COMPLETE: u32 = 108;
    pub const SEND_NDIS_CONFIG: u32 = 125;
    pub const SEND_VF_ASSOCIATION: u32 = 128;
    pub const SWITCH_DATA_PATH: u32 = 129;
    pub const SUBCHANNEL: u32 = 133;
    pub const SEND_INDIRECTION_TABLE: u32 = 134;
}

/// `status` values of completions.
pub mod status {
    pub const NONE: u32 = 0;
    pub const SUCCESS: u32 = 1;
    pub const FAIL: u32 = 2;
    pub const PROTOCOL_TOO_NEW: u32 = 3;
    pub const PROTOCOL_TOO_OLD: u32 = 4;
    pub const INVALID_RNDIS_PKT: u32 = 5;
    pub const BUSY: u32 = 6;
    pub const PROTOCOL_UNSUPPORTED: u32 = 7;
}

/// `channel_type` of SEND_RNDIS_PKT.
pub mod channel_type {
    pub const DATA: u32 = 0;
    pub const CONTROL: u32 = 1;
}

/// Section index meaning "the data is in the packet's GPA-direct ranges".
pub const NO_SECTION: u32 = 0xFFFF_FFFF;
/// Transfer page set id of the receive buffer (the guest's choice, fixed by Linux).
pub const RECV_BUFFER_ID: u16 = 0xCAFE;
/// Entries of the send indirection table the host may send (VRSS_SEND_TAB_SIZE).
pub const SEND_TABLE_SIZE: usize = 16;
/// SUBCHANNEL `op`: allocate.
pub const SUBCHANNEL_ALLOCATE: u32 = 1;

/// `struct nvsp_message`: type and raw body.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct NvspMessage {
    pub msg_type: U32,
    pub body: [u8; MESSAGE_SIZE - 4],
}

impl NvspMessage {
    /// A zero-filled message of `msg_type` with `body` at the start of its body.
    pub fn new<T: IntoBytes + Immutable>(msg_type: u32, body: &T) -> Self {
        let mut m = NvspMessage::new_zeroed();
        m.msg_type.set(msg_type);
        let b = body.as_bytes();
        m.body[..b.len()].copy_from_slice(b);
        m
    }

    /// The body read as `T` (zero-extended: the body is always 36 bytes).
    pub fn body_as<T: FromBytes>(&self) -> T {
        T::read_from_prefix(&self.body).expect("bodies fit").0
    }

    /// Parses the first bytes of a packet payload; a short payload is
    /// zero-extended, as if the guest had zero-filled it.
    pub fn from_prefix(bytes: &[u8]) -> Self {
        let mut m = NvspMessage::new_zeroed();
        let n = bytes.len().min(MESSAGE_SIZE);
        m.as_mut_bytes()[..n].copy_from_slice(&bytes[..n]);
        m
    }
}

macro_rules! wire {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident: $t:ty,)* } = $size:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, Unaligned)]
        #[repr(C)]
        pub struct $name { $($(#[$fm])* pub $f: $t,)* }
        const _: () = assert!(size_of::<$name>() == $size);
    };
}
pub(crate) use wire;

wire!(
    /// INIT: the guest proposes one version (min = max in Linux).
    Init { min_version: U32, max_version: U32, } = 8
);
wire!(
    /// INIT_COMPLETE.
    InitComplete { negotiated_version: U32, max_mdl_chain_len: U32, status: U32, } = 12
);
wire!(
    /// SEND_NDIS_VER.
    SendNdisVersion { major: U32, minor: U32, } = 8
);
wire!(
    /// SEND_RECV_BUF and SEND_SEND_BUF.
    SendBuffer { gpadl: U32, id: U16, } = 6
);
wire!(
    /// One section of SEND_RECV_BUF_COMPLETE.
    RecvSection { offset: U32, sub_alloc_size: U32, num_sub_allocs: U32, end_offset: U32, } = 16
);
wire!(
    /// SEND_RECV_BUF_COMPLETE with its single section.
    RecvBufComplete { status: U32, num_sections: U32, section: RecvSection, } = 24
);
wire!(
    /// SEND_SEND_BUF_COMPLETE.
    SendBufComplete { status: U32, section_size: U32, } = 8
);
wire!(
    /// REVOKE_RECV_BUF and REVOKE_SEND_BUF.
    RevokeBuffer { id: U16, } = 2
);
wire!(
    /// SEND_RNDIS_PKT.
    SendRndisPkt { channel_type: U32, section_index: U32, section_size: U32, } = 12
);
wire!(
    /// SEND_RNDIS_PKT_COMPLETE.
    RndisPktComplete { status: U32, } = 4
);
wire!(
    /// SEND_NDIS_CONFIG.
    NdisConfig { mtu: U32, reserved: U32, capabilities: U64, } = 16
);
wire!(
    /// SUBCHANNEL request.
    SubchannelRequest { op: U32, count: U32, } = 8
);
wire!(
    /// SUBCHANNEL completion.
    SubchannelComplete { status: U32, count: U32, } = 8
);
wire!(
    /// SWITCH_DATA_PATH: `active_datapath` 1 = synthetic, 2 = VF.
    SwitchDataPath { active_datapath: U32, } = 4
);
wire!(
    /// SEND_INDIRECTION_TABLE: `count` u32 entries at `offset` from the
    /// start of the nvsp_message.
    SendIndirectionTable { count: U32, offset: U32, } = 8
);

/// SEND_NDIS_CONFIG capability bits.
pub mod ndis_config {
    pub const VMQ: u64 = 1 << 0;
    pub const CHIMNEY: u64 = 1 << 1;
    pub const SRIOV: u64 = 1 << 2;
    pub const IEEE8021Q: u64 = 1 << 3;
    pub const CORRELATION_ID: u64 = 1 << 4;
    pub const TEAMING: u64 = 1 << 5;
    pub const VSUBNETID: u64 = 1 << 6;
    pub const RSC: u64 = 1 << 7;
}

/// A guest's packet on a netvsp channel, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvspRequest {
    /// A completion packet: the guest is done with the host's receive
    /// packet of that transaction id.
    RecvComplete,
    Init(Init),
    SendNdisVersion(SendNdisVersion),
    SendNdisConfig(NdisConfig),
    SendRecvBuffer(SendBuffer),
    SendSendBuffer(SendBuffer),
    RevokeRecvBuffer,
    RevokeSendBuffer,
    /// RNDIS messages in a send-buffer section and/or the packet's
    /// GPA-direct ranges.
    SendRndisPkt(SendRndisPkt),
    Subchannel(SubchannelRequest),
    /// The guest moves its data path to or from a VF (vspa has none).
    SwitchDataPath(SwitchDataPath),
    /// A message type the host does not take (answered with a failure).
    Unknown(u32),
}

/// Why a packet is not an NVSP request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("NVSP message of {0} bytes has no type")]
    Short(usize),
    #[error("packet type {0} does not carry NVSP")]
    PacketType(u16),
    #[error("completion of type {0} is not SEND_RNDIS_PKT_COMPLETE")]
    Completion(u32),
}

impl NvspRequest {
    /// Parses the first bytes of a packet's payload (a short message is
    /// zero-extended, as if the guest had zero-filled it) by packet type.
    pub fn parse(payload: &[u8], packet_type: u16) -> Result<NvspRequest, PacketError> {
        use vmbus::wire::packet_type as t;
        if payload.len() < 4 {
            return Err(PacketError::Short(payload.len()));
        }
        let m = NvspMessage::from_prefix(payload);
        match packet_type {
            t::COMPLETION => match m.msg_type.get() {
                msg::SEND_RNDIS_PKT_COMPLETE => Ok(NvspRequest::RecvComplete),
                other => Err(PacketError::Completion(other)),
            },
            t::DATA_INBAND | t::DATA_USING_GPA_DIRECT => Ok(Self::from_message(&m)),
            other => Err(PacketError::PacketType(other)),
        }
    }

    fn from_message(m: &NvspMessage) -> NvspRequest {
        match m.msg_type.get() {
            msg::INIT => NvspRequest::Init(m.body_as()),
            msg::SEND_NDIS_VER => NvspRequest::SendNdisVersion(m.body_as()),
            msg::SEND_NDIS_CONFIG => NvspRequest::SendNdisConfig(m.body_as()),
            msg::SEND_RECV_BUF => NvspRequest::SendRecvBuffer(m.body_as()),
            msg::SEND_SEND_BUF => NvspRequest::SendSendBuffer(m.body_as()),
            msg::REVOKE_RECV_BUF => NvspRequest::RevokeRecvBuffer,
            msg::REVOKE_SEND_BUF => NvspRequest::RevokeSendBuffer,
            msg::SEND_RNDIS_PKT => NvspRequest::SendRndisPkt(m.body_as()),
            msg::SUBCHANNEL => NvspRequest::Subchannel(m.body_as()),
            msg::SWITCH_DATA_PATH => NvspRequest::SwitchDataPath(m.body_as()),
            other => NvspRequest::Unknown(other),
        }
    }
}

/// The 8-byte completion a guest sends for a receive (and the host for a send).
pub fn rndis_pkt_complete(status: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&msg::SEND_RNDIS_PKT_COMPLETE.to_le_bytes());
    b[4..].copy_from_slice(&status.to_le_bytes());
    b
}

/// The 16-byte SEND_RNDIS_PKT payload of a host-to-guest transfer-page packet.
pub fn rndis_pkt_payload(channel: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&msg::SEND_RNDIS_PKT.to_le_bytes());
    b[4..8].copy_from_slice(&channel.to_le_bytes());
    b[8..12].copy_from_slice(&NO_SECTION.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbus::wire::packet_type;

    #[test]
    fn requests_parse_from_linux_bytes() {
        // SEND_RECV_BUF as Linux sends it: gpadl, id 0xCAFE, zero-filled.
        let m = NvspMessage::new(
            msg::SEND_RECV_BUF,
            &SendBuffer {
                gpadl: 7.into(),
                id: RECV_BUFFER_ID.into(),
            },
        );
        let r = NvspRequest::parse(m.as_bytes(), packet_type::DATA_INBAND).unwrap();
        assert_eq!(
            r,
            NvspRequest::SendRecvBuffer(SendBuffer {
                gpadl: 7.into(),
                id: RECV_BUFFER_ID.into()
            })
        );
        // SEND_RNDIS_PKT GPA-direct, 16 bytes: section index NO_SECTION.
        let p = rndis_pkt_payload(channel_type::CONTROL);
        match NvspRequest::parse(&p, packet_type::DATA_USING_GPA_DIRECT).unwrap() {
            NvspRequest::SendRndisPkt(s) => {
                assert_eq!(s.section_index.get(), NO_SECTION);
                assert_eq!(s.channel_type.get(), channel_type::CONTROL);
            }
            other => panic!("{other:?}"),
        }
        // The guest's 8-byte receive completion.
        assert_eq!(
            NvspRequest::parse(&rndis_pkt_complete(1), packet_type::COMPLETION),
            Ok(NvspRequest::RecvComplete)
        );
        assert_eq!(
            NvspRequest::parse(&[0x77, 0, 0, 0], packet_type::DATA_INBAND),
            Ok(NvspRequest::Unknown(0x77))
        );
        assert_eq!(
            NvspRequest::parse(&[1, 0, 0], packet_type::DATA_INBAND),
            Err(PacketError::Short(3))
        );
        assert_eq!(
            NvspRequest::parse(&[1, 0, 0, 0], packet_type::COMPLETION),
            Err(PacketError::Completion(1))
        );
        assert_eq!(
            NvspRequest::parse(m.as_bytes(), packet_type::DATA_USING_TRANSFER_PAGES),
            Err(PacketError::PacketType(
                packet_type::DATA_USING_TRANSFER_PAGES
            ))
        );
    }

    #[test]
    fn layouts_match_linux() {
        let m = NvspMessage::new(
            msg::SEND_RECV_BUF,
            &SendBuffer {
                gpadl: 0xe1e10.into(),
                id: 0xcafe.into(),
            },
        );
        let b = m.as_bytes();
        assert_eq!(b.len(), 40);
        assert_eq!(&b[..10], &[101, 0, 0, 0, 0x10, 0x1e, 0x0e, 0, 0xfe, 0xca]);
        assert!(b[10..].iter().all(|&x| x == 0));
        let c = RecvBufComplete {
            status: status::SUCCESS.into(),
            num_sections: 1.into(),
            section: RecvSection {
                offset: 0.into(),
                sub_alloc_size: 1728.into(),
                num_sub_allocs: 9709.into(),
                end_offset: (1728 * 9709u32).into(),
            },
        };
        let m = NvspMessage::new(msg::SEND_RECV_BUF_COMPLETE, &c);
        assert_eq!(
            &m.as_bytes()[..16],
            &[102, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&m.as_bytes()[16..20], &1728u32.to_le_bytes());
        let cfg = NvspMessage::from_prefix(&[
            125, 0, 0, 0, 0xea, 5, 0, 0, 0, 0, 0, 0, 0x88, 0, 0, 0, 0, 0, 0, 0,
        ]);
        let n: NdisConfig = cfg.body_as();
        assert_eq!(n.mtu.get(), 1514);
        assert_eq!(
            n.capabilities.get(),
            ndis_config::IEEE8021Q | ndis_config::RSC
        );
        assert_eq!(rndis_pkt_complete(1), [108, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(
            rndis_pkt_payload(channel_type::CONTROL),
            [107, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]
        );
    }
}
