//! Wire formats: the ring control page, packet descriptors and the channel
//! management messages, byte for byte as `include/linux/hyperv.h` defines
//! them (all little endian, all `__packed`).
//!
//! Every struct is built from alignment-1 little-endian integers, so a struct
//! has exactly the size of its C counterpart and can be read from any offset
//! of a received buffer with `FromBytes::read_from_prefix`.

use crate::guid::Guid;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Page size of the VMBus protocol (HV_HYP_PAGE_SIZE), whatever the host's.
pub const PAGE_SIZE: usize = 4096;
/// Largest channel message payload (HV_MESSAGE_PAYLOAD_BYTE_COUNT).
pub const MAX_MESSAGE_SIZE: usize = 240;
/// Size of the user-defined area of offers and open requests.
pub const USER_DEFINED_BYTES: usize = 120;

/// Protocol versions, `major << 16 | minor`.
pub mod version {
    pub const WS2008: u32 = 13;
    pub const WIN7: u32 = 1 << 16 | 1;
    pub const WIN8: u32 = 2 << 16 | 4;
    pub const WIN8_1: u32 = 3 << 16;
    pub const WIN10: u32 = 4 << 16;
    pub const WIN10_V4_1: u32 = 4 << 16 | 1;
    pub const WIN10_V5: u32 = 5 << 16;
    pub const WIN10_V5_1: u32 = 5 << 16 | 1;
    pub const WIN10_V5_2: u32 = 5 << 16 | 2;
    pub const WIN10_V5_3: u32 = 5 << 16 | 3;
}

/// Connection ids a guest posts channel messages to.
pub mod connection_id {
    /// Messages before protocol 5.0.
    pub const MESSAGE: u32 = 1;
    /// INITIATE_CONTACT from protocol 5.0 on, and the id vspa hands out.
    pub const MESSAGE_4: u32 = 4;
    /// Base of the per-channel event connection ids vspa hands out.
    pub const CHANNEL_EVENT_BASE: u32 = 0x1_0000;
}

/// Channel message types (`enum vmbus_channel_message_type`).
pub mod msgtype {
    pub const OFFERCHANNEL: u32 = 1;
    pub const RESCIND_CHANNELOFFER: u32 = 2;
    pub const REQUESTOFFERS: u32 = 3;
    pub const ALLOFFERS_DELIVERED: u32 = 4;
    pub const OPENCHANNEL: u32 = 5;
    pub const OPENCHANNEL_RESULT: u32 = 6;
    pub const CLOSECHANNEL: u32 = 7;
    pub const GPADL_HEADER: u32 = 8;
    pub const GPADL_BODY: u32 = 9;
    pub const GPADL_CREATED: u32 = 10;
    pub const GPADL_TEARDOWN: u32 = 11;
    pub const GPADL_TORNDOWN: u32 = 12;
    pub const RELID_RELEASED: u32 = 13;
    pub const INITIATE_CONTACT: u32 = 14;
    pub const VERSION_RESPONSE: u32 = 15;
    pub const UNLOAD: u32 = 16;
    pub const UNLOAD_RESPONSE: u32 = 17;
    pub const TL_CONNECT_REQUEST: u32 = 21;
    pub const MODIFYCHANNEL: u32 = 22;
    pub const TL_CONNECT_RESULT: u32 = 23;
    pub const MODIFYCHANNEL_RESPONSE: u32 = 24;
}

/// Relids a guest can use: Linux maps a channel only if its `child_relid`
/// is below `MAX_CHANNEL_RELIDS` (`max(MAX_NUM_CHANNELS_SUPPORTED,
/// HV_EVENT_FLAGS_COUNT)` = 2048, drivers/hv/hyperv_vmbus.h), and scans
/// that many event flags for interrupts.
pub const MAX_CHANNEL_RELIDS: u32 = 2048;

/// VMBus packet types (`enum vmbus_packet_type`).
pub mod packet_type {
    pub const DATA_INBAND: u16 = 6;
    pub const DATA_USING_TRANSFER_PAGES: u16 = 7;
    pub const DATA_USING_GPA_DIRECT: u16 = 9;
    pub const COMPLETION: u16 = 0xb;
}

/// `VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED`.
pub const PACKET_FLAG_COMPLETION_REQUESTED: u16 = 1;

/// Offer flag bits (`chn_flags`).
pub mod offer_flags {
    pub const ENUMERATE_DEVICE_INTERFACE: u16 = 1;
    pub const NAMED_PIPE_MODE: u16 = 0x10;
}

/// Ring feature bit: the owner honours `pending_send_sz`.
pub const FEATURE_PENDING_SEND_SIZE: u32 = 1;

/// The first 68 bytes of a ring's control page (`struct hv_ring_buffer`),
/// which is padded to a full page; data starts at offset 4096.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RingControl {
    pub write_index: U32,
    pub read_index: U32,
    pub interrupt_mask: U32,
    pub pending_send_sz: U32,
    pub reserved1: [U32; 12],
    pub feature_bits: U32,
}

/// Byte offsets of the control page fields, for atomic access.
pub mod ring_offset {
    pub const WRITE_INDEX: usize = 0;
    pub const READ_INDEX: usize = 4;
    pub const INTERRUPT_MASK: usize = 8;
    pub const PENDING_SEND_SZ: usize = 12;
    pub const FEATURE_BITS: usize = 0x40;
}

/// `struct vmpacket_descriptor`: offsets and lengths in units of 8 bytes,
/// counted from the start of the descriptor.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct PacketDescriptor {
    pub packet_type: U16,
    pub data_offset8: U16,
    pub length8: U16,
    pub flags: U16,
    pub transaction_id: U64,
}

/// Header of a GPA-direct packet after the descriptor (`vmdata_gpa_direct`).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct GpaDirectHeader {
    pub reserved: U32,
    pub range_count: U32,
}

/// `struct gpa_range` without its flexible pfn array.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct GpaRangeHeader {
    pub byte_count: U32,
    pub byte_offset: U32,
}

/// Header of a transfer-page packet after the descriptor
/// (`vmtransfer_page_packet_header`).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct TransferPageHeader {
    pub transfer_page_set_id: U16,
    pub sender_owns_set: u8,
    pub reserved: u8,
    pub range_count: U32,
}

/// `struct vmtransfer_page_range`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct TransferPageRange {
    pub byte_count: U32,
    pub byte_offset: U32,
}

/// `struct vmbus_channel_message_header`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct MessageHeader {
    pub msgtype: U32,
    pub padding: U32,
}

impl MessageHeader {
    pub fn new(msgtype: u32) -> Self {
        MessageHeader {
            msgtype: msgtype.into(),
            padding: 0.into(),
        }
    }
}

/// `struct vmbus_channel_initiate_contact`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct InitiateContact {
    pub header: MessageHeader,
    pub version_requested: U32,
    pub target_vcpu: U32,
    /// Before 5.0: the interrupt page GPA; from 5.0: byte 0 is msg_sint,
    /// byte 1 msg_vtl.
    pub interrupt_page_or_sint: U64,
    pub monitor_page1: U64,
    pub monitor_page2: U64,
}

/// `struct vmbus_channel_version_response`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct VersionResponse {
    pub header: MessageHeader,
    pub version_supported: u8,
    pub connection_state: u8,
    pub padding: U16,
    pub msg_conn_id: U32,
}

/// `struct vmbus_channel_offer`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ChannelOffer {
    pub interface_type: Guid,
    pub interface_instance: Guid,
    pub reserved1: U64,
    pub reserved2: U64,
    pub channel_flags: U16,
    pub mmio_megabytes: U16,
    pub user_defined: [u8; USER_DEFINED_BYTES],
    pub sub_channel_index: U16,
    pub reserved3: U16,
}

/// `struct vmbus_channel_offer_channel`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct OfferChannel {
    pub header: MessageHeader,
    pub offer: ChannelOffer,
    pub child_relid: U32,
    pub monitor_id: u8,
    /// Bit 0: monitor_allocated.
    pub monitor_flags: u8,
    /// Bit 0: is_dedicated_interrupt.
    pub interrupt_flags: U16,
    pub connection_id: U32,
}

/// Messages that carry only a relid: RESCIND_CHANNELOFFER, CLOSECHANNEL,
/// RELID_RELEASED.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RelidMessage {
    pub header: MessageHeader,
    pub child_relid: U32,
}

/// `struct vmbus_channel_open_channel`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct OpenChannel {
    pub header: MessageHeader,
    pub child_relid: U32,
    pub open_id: U32,
    pub ring_gpadl: U32,
    pub target_vp: U32,
    /// Page offset of the host-to-guest ring inside the ring GPADL.
    pub downstream_ring_page_offset: U32,
    pub user_data: [u8; USER_DEFINED_BYTES],
}

/// `struct vmbus_channel_open_result`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct OpenResult {
    pub header: MessageHeader,
    pub child_relid: U32,
    pub open_id: U32,
    pub status: U32,
}

/// `struct vmbus_channel_gpadl_header` without its range array.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct GpadlHeader {
    pub header: MessageHeader,
    pub child_relid: U32,
    pub gpadl: U32,
    /// Bytes of range data (range headers and pfns) over all messages.
    pub range_buflen: U16,
    pub range_count: U16,
}

/// `struct vmbus_channel_gpadl_body` without its pfn array.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct GpadlBody {
    pub header: MessageHeader,
    pub message_number: U32,
    pub gpadl: U32,
}

/// `struct vmbus_channel_gpadl_created`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct GpadlCreated {
    pub header: MessageHeader,
    pub child_relid: U32,
    pub gpadl: U32,
    pub creation_status: U32,
}

/// `struct vmbus_channel_gpadl_teardown`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct GpadlTeardown {
    pub header: MessageHeader,
    pub child_relid: U32,
    pub gpadl: U32,
}

/// `struct vmbus_channel_gpadl_torndown`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct GpadlTorndown {
    pub header: MessageHeader,
    pub gpadl: U32,
}

/// `struct vmbus_channel_modifychannel`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ModifyChannel {
    pub header: MessageHeader,
    pub child_relid: U32,
    pub target_vp: U32,
}

/// `struct vmbus_channel_modifychannel_response`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ModifyChannelResponse {
    pub header: MessageHeader,
    pub child_relid: U32,
    pub status: U32,
}

/// Most pfns that fit in a GPADL_HEADER message after one range header.
pub const GPADL_HEADER_MAX_PFNS: usize =
    (MAX_MESSAGE_SIZE - size_of::<GpadlHeader>() - size_of::<GpaRangeHeader>()) / 8;
/// Most pfns that fit in one GPADL_BODY message.
pub const GPADL_BODY_MAX_PFNS: usize = (MAX_MESSAGE_SIZE - size_of::<GpadlBody>()) / 8;

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use zerocopy::FromZeros;

    // Sizes and offsets below are those of the packed structs in
    // include/linux/hyperv.h, computed by hand from the field list.

    #[test]
    fn ring_control_layout() {
        assert_eq!(size_of::<RingControl>(), 68);
        assert_eq!(
            offset_of!(RingControl, write_index),
            ring_offset::WRITE_INDEX
        );
        assert_eq!(offset_of!(RingControl, read_index), ring_offset::READ_INDEX);
        assert_eq!(
            offset_of!(RingControl, interrupt_mask),
            ring_offset::INTERRUPT_MASK
        );
        assert_eq!(
            offset_of!(RingControl, pending_send_sz),
            ring_offset::PENDING_SEND_SZ
        );
        assert_eq!(
            offset_of!(RingControl, feature_bits),
            ring_offset::FEATURE_BITS
        );
    }

    #[test]
    fn packet_layouts() {
        assert_eq!(size_of::<PacketDescriptor>(), 16);
        assert_eq!(offset_of!(PacketDescriptor, data_offset8), 2);
        assert_eq!(offset_of!(PacketDescriptor, length8), 4);
        assert_eq!(offset_of!(PacketDescriptor, flags), 6);
        assert_eq!(offset_of!(PacketDescriptor, transaction_id), 8);
        assert_eq!(size_of::<GpaDirectHeader>(), 8);
        assert_eq!(size_of::<GpaRangeHeader>(), 8);
        assert_eq!(size_of::<TransferPageHeader>(), 8);
        assert_eq!(offset_of!(TransferPageHeader, sender_owns_set), 2);
        assert_eq!(offset_of!(TransferPageHeader, range_count), 4);
        assert_eq!(size_of::<TransferPageRange>(), 8);
    }

    #[test]
    fn descriptor_bytes() {
        let d = PacketDescriptor {
            packet_type: packet_type::DATA_USING_GPA_DIRECT.into(),
            data_offset8: 5.into(),
            length8: 0x0102.into(),
            flags: PACKET_FLAG_COMPLETION_REQUESTED.into(),
            transaction_id: 0x1122_3344_5566_7788.into(),
        };
        assert_eq!(
            d.as_bytes(),
            &[
                9, 0, 5, 0, 2, 1, 1, 0, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11
            ]
        );
    }

    #[test]
    fn channel_message_sizes() {
        assert_eq!(size_of::<MessageHeader>(), 8);
        assert_eq!(size_of::<InitiateContact>(), 40);
        assert_eq!(offset_of!(InitiateContact, interrupt_page_or_sint), 16);
        assert_eq!(offset_of!(InitiateContact, monitor_page2), 32);
        assert_eq!(size_of::<VersionResponse>(), 16);
        assert_eq!(offset_of!(VersionResponse, connection_state), 9);
        assert_eq!(offset_of!(VersionResponse, msg_conn_id), 12);
        assert_eq!(size_of::<ChannelOffer>(), 176);
        assert_eq!(offset_of!(ChannelOffer, interface_instance), 16);
        assert_eq!(offset_of!(ChannelOffer, channel_flags), 48);
        assert_eq!(offset_of!(ChannelOffer, mmio_megabytes), 50);
        assert_eq!(offset_of!(ChannelOffer, user_defined), 52);
        assert_eq!(offset_of!(ChannelOffer, sub_channel_index), 172);
        assert_eq!(size_of::<OfferChannel>(), 196);
        assert_eq!(offset_of!(OfferChannel, child_relid), 184);
        assert_eq!(offset_of!(OfferChannel, monitor_id), 188);
        assert_eq!(offset_of!(OfferChannel, monitor_flags), 189);
        assert_eq!(offset_of!(OfferChannel, interrupt_flags), 190);
        assert_eq!(offset_of!(OfferChannel, connection_id), 192);
        assert_eq!(size_of::<RelidMessage>(), 12);
        assert_eq!(size_of::<OpenChannel>(), 148);
        assert_eq!(offset_of!(OpenChannel, ring_gpadl), 16);
        assert_eq!(offset_of!(OpenChannel, downstream_ring_page_offset), 24);
        assert_eq!(offset_of!(OpenChannel, user_data), 28);
        assert_eq!(size_of::<OpenResult>(), 20);
        assert_eq!(size_of::<GpadlHeader>(), 20);
        assert_eq!(offset_of!(GpadlHeader, range_buflen), 16);
        assert_eq!(offset_of!(GpadlHeader, range_count), 18);
        assert_eq!(size_of::<GpadlBody>(), 16);
        assert_eq!(size_of::<GpadlCreated>(), 20);
        assert_eq!(size_of::<GpadlTeardown>(), 16);
        assert_eq!(size_of::<GpadlTorndown>(), 12);
        assert_eq!(size_of::<ModifyChannel>(), 16);
        assert_eq!(size_of::<ModifyChannelResponse>(), 16);
        // Linux: (HV_MESSAGE_PAYLOAD_BYTE_COUNT - sizeof(header msg) - sizeof(gpa_range)) / 8
        assert_eq!(GPADL_HEADER_MAX_PFNS, 26);
        assert_eq!(GPADL_BODY_MAX_PFNS, 28);
    }

    #[test]
    fn open_channel_bytes() {
        let mut m = OpenChannel::new_zeroed();
        m.header = MessageHeader::new(msgtype::OPENCHANNEL);
        m.child_relid = 3.into();
        m.open_id = 3.into();
        m.ring_gpadl = 0xe1e10.into();
        m.target_vp = 1.into();
        m.downstream_ring_page_offset = 0x100.into();
        m.user_data[0] = 0xaa;
        let b = m.as_bytes();
        assert_eq!(&b[..8], &[5, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&b[8..16], &[3, 0, 0, 0, 3, 0, 0, 0]);
        assert_eq!(&b[16..20], &[0x10, 0x1e, 0x0e, 0]);
        assert_eq!(&b[24..28], &[0, 1, 0, 0]);
        assert_eq!(b[28], 0xaa);
    }
}
