//! The storvsc wire protocol (`struct vstor_packet` and friends from
//! drivers/scsi/storvsc_drv.c), all little endian and packed, and the
//! typed [`VstorRequest`] every packet a guest sends is parsed into before
//! the worker acts on it.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of a `vstor_packet`, and of every completion the host sends.
pub const PACKET_SIZE: usize = 64;
/// Bytes pre-Win8 guests leave off the end (the Win8 SRB extension).
pub const WIN8_EXTENSION_SIZE: usize = 16;
/// Smallest packet accepted from a guest.
pub const MIN_PACKET_SIZE: usize = PACKET_SIZE - WIN8_EXTENSION_SIZE;

/// `enum vstor_packet_operation`.
pub mod operation {
    pub const COMPLETE_IO: u32 = 1;
    pub const REMOVE_DEVICE: u32 = 2;
    pub const EXECUTE_SRB: u32 = 3;
    pub const RESET_LUN: u32 = 4;
    pub const RESET_ADAPTER: u32 = 5;
    pub const RESET_BUS: u32 = 6;
    pub const BEGIN_INITIALIZATION: u32 = 7;
    pub const END_INITIALIZATION: u32 = 8;
    pub const QUERY_PROTOCOL_VERSION: u32 = 9;
    pub const QUERY_PROPERTIES: u32 = 10;
    pub const ENUMERATE_BUS: u32 = 11;
    pub const FCHBA_DATA: u32 = 12;
    pub const CREATE_SUB_CHANNELS: u32 = 13;
}

/// Protocol versions, `major << 8 | minor`.
pub mod version {
    pub const WIN6: u16 = 0x0200;
    pub const WIN7: u16 = 0x0402;
    pub const WIN8: u16 = 0x0501;
    pub const WIN8_1: u16 = 0x0600;
    pub const WIN10: u16 = 0x0602;
}

/// Versions vspa accepts (all with the Win8 SRB layout).
pub const SUPPORTED_VERSIONS: [u16; 3] = [version::WIN10, version::WIN8_1, version::WIN8];

/// NTSTATUS values in `vstor_packet.status`.
pub mod status {
    pub const SUCCESS: u32 = 0;
    pub const REVISION_MISMATCH: u32 = 0xC000_0059;
    pub const INVALID_PARAMETER: u32 = 0xC000_000D;
    pub const INVALID_DEVICE_STATE: u32 = 0xC000_0184;
}

/// `vstor_packet.flags`: the guest wants a completion.
pub const REQUEST_COMPLETION_FLAG: u32 = 1;

/// `vmstorage_channel_properties.flags`: multi-channel support.
pub const STORAGE_CHANNEL_SUPPORTS_MULTI_CHANNEL: u32 = 1;

/// SRB status codes (`vm_srb.srb_status`).
pub mod srb {
    pub const SUCCESS: u8 = 0x01;
    pub const ABORTED: u8 = 0x02;
    pub const ERROR: u8 = 0x04;
    pub const INVALID_REQUEST: u8 = 0x06;
    pub const INVALID_LUN: u8 = 0x20;
    pub const DATA_OVERRUN: u8 = 0x12;
    pub const AUTOSENSE_VALID: u8 = 0x80;
}

/// SRB `data_in` values.
pub mod direction {
    pub const WRITE: u8 = 0;
    pub const READ: u8 = 1;
    pub const NONE: u8 = 2;
}

/// Sense bytes the SRB can carry (`STORVSC_SENSE_BUFFER_SIZE`).
pub const SENSE_BUFFER_SIZE: usize = 0x14;

/// The first 12 bytes of every `vstor_packet`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct PacketHeader {
    pub operation: U32,
    pub flags: U32,
    pub status: U32,
}

/// `struct vmscsi_request` including the Win8 extension.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ScsiRequest {
    pub length: U16,
    pub srb_status: u8,
    pub scsi_status: u8,
    pub port: u8,
    pub path_id: u8,
    pub target_id: u8,
    pub lun: u8,
    pub cdb_length: u8,
    pub sense_info_length: u8,
    pub data_in: u8,
    pub reserved: u8,
    pub data_transfer_length: U32,
    /// The CDB on the way in, the sense data on the way out.
    pub cdb_or_sense: [u8; SENSE_BUFFER_SIZE],
    pub reserve: U16,
    pub queue_tag: u8,
    pub queue_action: u8,
    pub srb_flags: U32,
    pub timeout: U32,
    pub queue_sort_key: U32,
}

/// `struct vmstorage_channel_properties`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ChannelProperties {
    pub reserved: U32,
    pub max_channel_count: U16,
    pub reserved1: U16,
    pub flags: U32,
    pub max_transfer_bytes: U32,
    pub reserved2: U64,
}

/// `struct vmstorage_protocol_version`.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct ProtocolVersion {
    pub major_minor: U16,
    pub revision: U16,
}

/// A whole `vstor_packet`: header plus the 52-byte union.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct VstorPacket {
    pub header: PacketHeader,
    pub body: [u8; 52],
}

impl VstorPacket {
    /// A packet with `operation` and `status`, zero elsewhere.
    pub fn new(operation: u32, status: u32) -> Self {
        let mut p = Self::new_zeroed();
        p.header.operation = operation.into();
        p.header.status = status.into();
        p
    }

    /// The body as a SCSI request.
    pub fn srb(&self) -> ScsiRequest {
        ScsiRequest::read_from_bytes(&self.body).expect("52 bytes")
    }

    pub fn set_srb(&mut self, srb: &ScsiRequest) {
        self.body.copy_from_slice(srb.as_bytes());
    }

    /// Stores a plain value at the start of the body.
    pub fn set_body<T: IntoBytes + Immutable>(&mut self, value: &T) {
        let b = value.as_bytes();
        self.body[..b.len()].copy_from_slice(b);
    }

    /// Reads a plain value from the start of the body.
    pub fn body_as<T: FromBytes>(&self) -> T {
        T::read_from_prefix(&self.body)
            .expect("body is large enough")
            .0
    }
}

/// A guest's request, parsed from one packet.
#[derive(Debug, Clone, Copy)]
pub enum VstorRequest {
    BeginInitialization,
    /// The version the guest proposes (echoed in the answer).
    QueryProtocolVersion(ProtocolVersion),
    QueryProperties,
    EndInitialization,
    ExecuteSrb(ScsiRequest),
    /// Sub-channels the guest asks for.
    CreateSubChannels(u16),
    /// RESET_LUN, RESET_BUS or RESET_ADAPTER (the operation).
    Reset(u32),
    /// An operation a guest never sends to a host (COMPLETE_IO,
    /// ENUMERATE_BUS, ...), FCHBA_DATA (no Fibre Channel here) or an
    /// unknown one.
    Unsupported(u32),
}

/// Why a packet is not a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// A completion of a host packet: storvsc guests do not send them, and
    /// they need no answer.
    #[error("completion packet")]
    Completion,
    #[error("packet type {0} does not carry a request")]
    PacketType(u16),
    #[error("vstor packet of {0} bytes is shorter than {MIN_PACKET_SIZE}")]
    Short(usize),
}

impl VstorRequest {
    /// Parses the payload of a packet of `packet_type` (in-band or
    /// GPA-direct; the GPA ranges are the transport's). Pre-Win8 guests
    /// send packets 16 bytes short: they are read as if zero-filled.
    pub fn parse(payload: &[u8], packet_type: u16) -> Result<VstorRequest, PacketError> {
        use vmbus::wire::packet_type as t;
        match packet_type {
            t::DATA_INBAND | t::DATA_USING_GPA_DIRECT => {}
            t::COMPLETION => return Err(PacketError::Completion),
            other => return Err(PacketError::PacketType(other)),
        }
        if payload.len() < MIN_PACKET_SIZE {
            return Err(PacketError::Short(payload.len()));
        }
        let mut p = VstorPacket::new_zeroed();
        let n = payload.len().min(PACKET_SIZE);
        p.as_mut_bytes()[..n].copy_from_slice(&payload[..n]);
        Ok(Self::from_packet(&p))
    }

    fn from_packet(p: &VstorPacket) -> VstorRequest {
        let op = p.header.operation.get();
        match op {
            operation::BEGIN_INITIALIZATION => VstorRequest::BeginInitialization,
            operation::QUERY_PROTOCOL_VERSION => VstorRequest::QueryProtocolVersion(p.body_as()),
            operation::QUERY_PROPERTIES => VstorRequest::QueryProperties,
            operation::END_INITIALIZATION => VstorRequest::EndInitialization,
            operation::EXECUTE_SRB => VstorRequest::ExecuteSrb(p.srb()),
            operation::CREATE_SUB_CHANNELS => {
                VstorRequest::CreateSubChannels(p.body_as::<U16>().get())
            }
            operation::RESET_LUN | operation::RESET_BUS | operation::RESET_ADAPTER => {
                VstorRequest::Reset(op)
            }
            _ => VstorRequest::Unsupported(op),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    // Offsets of the packed structs in storvsc_drv.c, by hand.
    #[test]
    fn layouts() {
        assert_eq!(size_of::<PacketHeader>(), 12);
        assert_eq!(size_of::<VstorPacket>(), 64);
        assert_eq!(size_of::<ScsiRequest>(), 0x34);
        assert_eq!(offset_of!(ScsiRequest, srb_status), 2);
        assert_eq!(offset_of!(ScsiRequest, scsi_status), 3);
        assert_eq!(offset_of!(ScsiRequest, port), 4);
        assert_eq!(offset_of!(ScsiRequest, target_id), 6);
        assert_eq!(offset_of!(ScsiRequest, lun), 7);
        assert_eq!(offset_of!(ScsiRequest, cdb_length), 8);
        assert_eq!(offset_of!(ScsiRequest, sense_info_length), 9);
        assert_eq!(offset_of!(ScsiRequest, data_in), 10);
        assert_eq!(offset_of!(ScsiRequest, data_transfer_length), 12);
        assert_eq!(offset_of!(ScsiRequest, cdb_or_sense), 16);
        assert_eq!(offset_of!(ScsiRequest, reserve), 36);
        assert_eq!(offset_of!(ScsiRequest, queue_tag), 38);
        assert_eq!(offset_of!(ScsiRequest, srb_flags), 40);
        assert_eq!(offset_of!(ScsiRequest, timeout), 44);
        assert_eq!(offset_of!(ScsiRequest, queue_sort_key), 48);
        assert_eq!(size_of::<ChannelProperties>(), 24);
        assert_eq!(offset_of!(ChannelProperties, max_channel_count), 4);
        assert_eq!(offset_of!(ChannelProperties, flags), 8);
        assert_eq!(offset_of!(ChannelProperties, max_transfer_bytes), 12);
        assert_eq!(size_of::<ProtocolVersion>(), 4);
        assert_eq!(MIN_PACKET_SIZE, 48);
    }

    #[test]
    fn requests_parse_from_linux_bytes() {
        use vmbus::wire::packet_type as t;
        // QUERY_PROTOCOL_VERSION 6.2 as Linux sends it: 48 bytes (no Win8
        // extension yet), flags = REQUEST_COMPLETION_FLAG.
        let mut b = [0u8; 48];
        b[0] = 9;
        b[4] = 1;
        b[12..14].copy_from_slice(&[2, 6]);
        match VstorRequest::parse(&b, t::DATA_INBAND) {
            Ok(VstorRequest::QueryProtocolVersion(v)) => {
                assert_eq!(v.major_minor.get(), version::WIN10)
            }
            other => panic!("{other:?}"),
        }
        // CREATE_SUB_CHANNELS for 3: the count is the body's first u16.
        let mut b = [0u8; 64];
        b[0] = 13;
        b[12] = 3;
        assert!(matches!(
            VstorRequest::parse(&b, t::DATA_INBAND),
            Ok(VstorRequest::CreateSubChannels(3))
        ));
        // EXECUTE_SRB GPA-direct: the SRB is the body.
        b[0] = 3;
        b[12 + 7] = 5; // lun
        b[12 + 8] = 10; // cdb_length
        match VstorRequest::parse(&b, t::DATA_USING_GPA_DIRECT) {
            Ok(VstorRequest::ExecuteSrb(srb)) => assert_eq!((srb.lun, srb.cdb_length), (5, 10)),
            other => panic!("{other:?}"),
        }
        b[0] = 6;
        assert!(matches!(
            VstorRequest::parse(&b, t::DATA_INBAND),
            Ok(VstorRequest::Reset(operation::RESET_BUS))
        ));
        b[0] = 12;
        assert!(matches!(
            VstorRequest::parse(&b, t::DATA_INBAND),
            Ok(VstorRequest::Unsupported(operation::FCHBA_DATA))
        ));
        // Not requests.
        assert_eq!(
            VstorRequest::parse(&b[..47], t::DATA_INBAND).unwrap_err(),
            PacketError::Short(47)
        );
        assert_eq!(
            VstorRequest::parse(&b, t::COMPLETION).unwrap_err(),
            PacketError::Completion
        );
        assert_eq!(
            VstorRequest::parse(&b, t::DATA_USING_TRANSFER_PAGES).unwrap_err(),
            PacketError::PacketType(t::DATA_USING_TRANSFER_PAGES)
        );
    }

    #[test]
    fn packet_bytes() {
        let mut p = VstorPacket::new(operation::COMPLETE_IO, status::REVISION_MISMATCH);
        p.header.flags = REQUEST_COMPLETION_FLAG.into();
        p.set_body(&ProtocolVersion {
            major_minor: version::WIN10.into(),
            revision: 0.into(),
        });
        let b = p.as_bytes();
        assert_eq!(
            &b[..16],
            &[1, 0, 0, 0, 1, 0, 0, 0, 0x59, 0, 0, 0xc0, 2, 6, 0, 0]
        );
    }
}
