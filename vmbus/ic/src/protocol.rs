//! The integration-service wire formats, byte for byte as Linux declares
//! them (`include/linux/hyperv.h`, `include/uapi/linux/hyperv.h`; every
//! struct `__packed`, every integer little endian).
//!
//! An IC message is the payload of a VMBus in-band packet:
//!
//! ```text
//!  0        8                         28
//!  ├ pipe ──┼ IC header (icmsg_hdr) ──┼ body (service message) ──…
//! ```
//!
//! All structs are built from alignment-1 integers, so each has exactly
//! the size of its C counterpart and can be read at any offset.

use std::fmt;

use vmbus::Guid;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the pipe header (`struct vmbuspipe_hdr`).
pub const PIPE_HEADER_SIZE: usize = 8;
/// Size of the IC header (`struct icmsg_hdr`).
pub const IC_HEADER_SIZE: usize = 20;
/// Where the body starts in the payload (Linux's `ICMSG_HDR`).
pub const BODY_OFFSET: usize = PIPE_HEADER_SIZE + IC_HEADER_SIZE;

/// `vmbuspipe_hdr`: Linux skips it and echoes it unchanged.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct PipeHeader {
    pub flags: U32,
    /// Bytes of IC header and body.
    pub msgsize: U32,
}

/// Pipe packet type of a data message (the only one ICs use).
pub const PIPE_DATA: u32 = 1;

/// A framework or message version: major, then minor, each a u16.
#[repr(C)]
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct Version {
    pub major: U16,
    pub minor: U16,
}

impl Version {
    pub const fn new(major: u16, minor: u16) -> Self {
        Version {
            major: U16::new(major),
            minor: U16::new(minor),
        }
    }

    /// Linux's packed form, `major << 16 | minor`.
    pub fn packed(self) -> u32 {
        u32::from(self.major.get()) << 16 | u32::from(self.minor.get())
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major.get(), self.minor.get())
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Version {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `icmsg_hdr` (20 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct IcHeader {
    pub framework: Version,
    pub msgtype: U16,
    pub message: Version,
    /// Body bytes.
    pub msgsize: U16,
    pub status: U32,
    pub transaction_id: u8,
    pub flags: u8,
    pub reserved: [u8; 2],
}

/// `icmsgtype` values.
pub mod msgtype {
    pub const NEGOTIATE: u16 = 0;
    pub const HEARTBEAT: u16 = 1;
    pub const KVP_EXCHANGE: u16 = 2;
    pub const SHUTDOWN: u16 = 3;
    pub const TIMESYNC: u16 = 4;
    pub const VSS: u16 = 5;
    pub const FCOPY: u16 = 7;
}

/// `icflags` bits.
pub mod icflags {
    pub const TRANSACTION: u8 = 1;
    pub const REQUEST: u8 = 2;
    pub const RESPONSE: u8 = 4;
    /// What a host request carries.
    pub const HOST_REQUEST: u8 = TRANSACTION | REQUEST;
    /// What every Linux reply carries, whatever the request had.
    pub const GUEST_RESPONSE: u8 = TRANSACTION | RESPONSE;
}

/// Status codes (HRESULT style) as `include/uapi/linux/hyperv.h` names them.
pub mod status {
    pub const S_OK: u32 = 0;
    pub const E_FAIL: u32 = 0x8000_4005;
    /// ERROR_NO_MORE_ITEMS: the end of a KVP enumeration, or key not found.
    pub const S_CONT: u32 = 0x8007_0103;
    pub const ERROR_NOT_SUPPORTED: u32 = 0x8007_0032;
    pub const ERROR_MACHINE_LOCKED: u32 = 0x8007_04F7;
    pub const ERROR_DEVICE_NOT_CONNECTED: u32 = 0x8007_048F;
    pub const INVALIDARG: u32 = 0x8007_0057;
    pub const GUID_NOTFOUND: u32 = 0x8004_1002;
    pub const ERROR_ALREADY_EXISTS: u32 = 0x8007_0050;
    pub const ERROR_DISK_FULL: u32 = 0x8007_0070;
}

/// Head of a NEGOTIATE body (`icmsg_negotiate` without its array).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct NegotiateHeader {
    pub framework_count: U16,
    pub message_count: U16,
    pub reserved: U32,
}

/// Linux's IC_VERSION_NEGOTIATION_MAX_VER_COUNT.
pub const MAX_VERSION_COUNT: usize = 100;
/// icmsgsize of every Linux NEGOTIATE reply (two counts, reserved, two versions).
pub const NEGOTIATE_REPLY_MSGSIZE: u16 = 16;

/// `shutdown_msg_data` (2060 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct ShutdownMessage {
    pub reason_code: U32,
    pub timeout_seconds: U32,
    pub flags: U32,
    pub display_message: [u8; 2048],
}

/// Shutdown flag bits.
pub mod shutdown_flags {
    pub const FORCE: u32 = 1;
    pub const RESTART: u32 = 2;
    pub const HIBERNATE: u32 = 4;
}

/// SHTDN_REASON_FLAG_PLANNED, the reason a host-initiated shutdown carries.
pub const SHUTDOWN_REASON_PLANNED: u32 = 0x8000_0000;

/// `ictimesync_data` (message versions 1.0 and 3.0; 25 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct TimesyncV3 {
    pub parent_time: U64,
    pub child_time: U64,
    pub round_trip_time: U64,
    pub flags: u8,
}

/// `ictimesync_ref_data` (message version 4.0; 22 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct TimesyncV4 {
    /// Host wall clock, 100 ns units since 1601-01-01 UTC.
    pub parent_time: U64,
    /// The guest's reference counter when `parent_time` was taken.
    pub reference_time: U64,
    pub flags: u8,
    pub leap_flags: u8,
    pub stratum: u8,
    pub reserved: [u8; 3],
}

/// Time sync flags.
pub mod timesync_flags {
    pub const PROBE: u8 = 0;
    pub const SYNC: u8 = 1;
    pub const SAMPLE: u8 = 2;
}

/// 100 ns intervals from 1601-01-01 to 1970-01-01 (Linux's WLTIMEDELTA).
pub const FILETIME_UNIX_EPOCH: u64 = 116_444_736_000_000_000;

/// `heartbeat_msg_data` (40 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct HeartbeatMessage {
    pub sequence: U64,
    pub reserved: [U32; 8],
}

/// `hv_kvp_hdr` (4 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct KvpHeader {
    pub operation: u8,
    pub pool: u8,
    pub pad: U16,
}

/// Largest key, in bytes of UTF-16 including the terminator.
pub const KVP_MAX_KEY_SIZE: usize = 512;
/// Largest value, in bytes including the terminator.
pub const KVP_MAX_VALUE_SIZE: usize = 2048;

/// `hv_kvp_exchg_msg_value` (2572 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct KvpValue {
    pub value_type: U32,
    /// Bytes of `key` in use, terminator included.
    pub key_size: U32,
    /// Bytes of `value` in use, terminator included for strings.
    pub value_size: U32,
    pub key: [u8; KVP_MAX_KEY_SIZE],
    pub value: [u8; KVP_MAX_VALUE_SIZE],
}

/// GET and SET bodies: header, then the value (2576 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct KvpSetMessage {
    pub header: KvpHeader,
    pub data: KvpValue,
}

/// DELETE body (520 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct KvpDeleteMessage {
    pub header: KvpHeader,
    pub key_size: U32,
    pub key: [u8; KVP_MAX_KEY_SIZE],
}

/// ENUMERATE body (2580 bytes); the guest writes the entry in place.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct KvpEnumerateMessage {
    pub header: KvpHeader,
    pub index: U32,
    pub data: KvpValue,
}

/// `hv_kvp_ip_msg` (7428 bytes): GET_IP_INFO and SET_IP_INFO in the string
/// form of message versions up to 4.0. Its header has no pad.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
pub struct KvpIpMessage {
    pub operation: u8,
    pub pool: u8,
    pub adapter_id: [U16; 128],
    pub addr_family: u8,
    pub dhcp_enabled: u8,
    pub ip_addr: [U16; 1024],
    pub sub_net: [U16; 1024],
    pub gate_way: [U16; 512],
    pub dns_addr: [U16; 1024],
}

/// KVP operations.
pub mod kvp_op {
    pub const GET: u8 = 0;
    pub const SET: u8 = 1;
    pub const DELETE: u8 = 2;
    pub const ENUMERATE: u8 = 3;
    pub const GET_IP_INFO: u8 = 4;
    pub const SET_IP_INFO: u8 = 5;
}

/// KVP value types Linux knows.
pub mod reg_type {
    pub const SZ: u32 = 1;
    pub const U32: u32 = 4;
    pub const U64: u32 = 8;
}

/// `hv_vss_msg` (12 bytes).
#[repr(C)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
pub struct VssMessage {
    pub operation: u8,
    pub reserved: [u8; 7],
    /// `vss_cf.flags` (HOT_BACKUP) or `dm_info.flags` (GET_DM_INFO).
    pub flags: U32,
}

/// VSS operations.
pub mod vss_op {
    pub const CREATE: u8 = 0;
    pub const DELETE: u8 = 1;
    pub const HOT_BACKUP: u8 = 2;
    pub const GET_DM_INFO: u8 = 3;
    pub const BU_COMPLETE: u8 = 4;
    pub const FREEZE: u8 = 5;
    pub const THAW: u8 = 6;
    pub const AUTO_RECOVER: u8 = 7;
}

/// Flags Linux returns on a HOT_BACKUP reply (VSS_HBU_NO_AUTO_RECOVERY).
pub const VSS_HBU_NO_AUTO_RECOVERY: u32 = 5;

/// The integration services vspa offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    Shutdown,
    TimeSync,
    Heartbeat,
    Kvp,
    Vss,
}

const FW_1_0: Version = Version::new(1, 0);
const FW_3_0: Version = Version::new(3, 0);

impl Service {
    pub const ALL: [Service; 5] = [
        Service::Shutdown,
        Service::TimeSync,
        Service::Heartbeat,
        Service::Kvp,
        Service::Vss,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Shutdown => "shutdown",
            Service::TimeSync => "timesync",
            Service::Heartbeat => "heartbeat",
            Service::Kvp => "kvp",
            Service::Vss => "vss",
        }
    }

    /// The interface (class) GUID Linux's hv_utils binds.
    pub fn interface(self) -> Guid {
        match self {
            Service::Shutdown => guid::SHUTDOWN,
            Service::TimeSync => guid::TIMESYNC,
            Service::Heartbeat => guid::HEARTBEAT,
            Service::Kvp => guid::KVP,
            Service::Vss => guid::VSS,
        }
    }

    /// The instance GUID Hyper-V offers the service with.
    pub fn hyperv_instance(self) -> Guid {
        match self {
            Service::Shutdown => guid::SHUTDOWN_INSTANCE,
            Service::TimeSync => guid::TIMESYNC_INSTANCE,
            Service::Heartbeat => guid::HEARTBEAT_INSTANCE,
            Service::Kvp => guid::KVP_INSTANCE,
            Service::Vss => guid::VSS_INSTANCE,
        }
    }

    /// The service from an offer's interface GUID.
    pub fn from_interface(g: &Guid) -> Option<Service> {
        Service::ALL.into_iter().find(|s| s.interface() == *g)
    }

    /// The `icmsgtype` of the service's own messages.
    pub fn msgtype(self) -> u16 {
        match self {
            Service::Shutdown => msgtype::SHUTDOWN,
            Service::TimeSync => msgtype::TIMESYNC,
            Service::Heartbeat => msgtype::HEARTBEAT,
            Service::Kvp => msgtype::KVP_EXCHANGE,
            Service::Vss => msgtype::VSS,
        }
    }

    /// Framework versions Linux 6.1 accepts, in its preference order.
    pub fn linux_frameworks(self) -> &'static [Version] {
        match self {
            Service::Vss => &[FW_3_0],
            _ => &[FW_3_0, FW_1_0],
        }
    }

    /// Message versions Linux 6.1 accepts, in its preference order.
    pub fn linux_messages(self) -> &'static [Version] {
        const SD: [Version; 4] = [
            Version::new(3, 2),
            Version::new(3, 1),
            Version::new(3, 0),
            Version::new(1, 0),
        ];
        const TS: [Version; 3] = [Version::new(4, 0), Version::new(3, 0), Version::new(1, 0)];
        const HB: [Version; 2] = [Version::new(3, 0), Version::new(1, 0)];
        const KVP: [Version; 3] = [Version::new(4, 0), Version::new(3, 0), Version::new(1, 0)];
        const VSS: [Version; 1] = [Version::new(5, 0)];
        match self {
            Service::Shutdown => &SD,
            Service::TimeSync => &TS,
            Service::Heartbeat => &HB,
            Service::Kvp => &KVP,
            Service::Vss => &VSS,
        }
    }

    /// Framework versions vspa offers, oldest first (as Hyper-V lists them).
    pub fn host_frameworks(self) -> &'static [Version] {
        match self {
            Service::Vss => &[FW_3_0],
            _ => &[FW_1_0, FW_3_0],
        }
    }

    /// Message versions vspa offers. Time sync offers 3.0 and 4.0 only;
    /// KVP stops at 4.0 (5.0 is the binary IP-info form Linux lacks).
    pub fn host_messages(self) -> &'static [Version] {
        const SD: [Version; 4] = [
            Version::new(1, 0),
            Version::new(3, 0),
            Version::new(3, 1),
            Version::new(3, 2),
        ];
        const TS: [Version; 2] = [Version::new(3, 0), Version::new(4, 0)];
        const HB: [Version; 2] = [Version::new(1, 0), Version::new(3, 0)];
        const KVP: [Version; 2] = [Version::new(3, 0), Version::new(4, 0)];
        const VSS: [Version; 1] = [Version::new(5, 0)];
        match self {
            Service::Shutdown => &SD,
            Service::TimeSync => &TS,
            Service::Heartbeat => &HB,
            Service::Kvp => &KVP,
            Service::Vss => &VSS,
        }
    }

    /// Most payload bytes Linux reads from this channel in one packet; a
    /// larger packet wedges the channel (-ENOBUFS leaves it in the ring).
    pub fn linux_receive_limit(self) -> usize {
        match self {
            Service::Kvp => 4 * 4096,
            Service::Vss => 2 * 4096,
            _ => 4096,
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Interface and instance GUIDs (Microsoft byte order on the wire).
pub mod guid {
    use vmbus::Guid;

    pub const SHUTDOWN: Guid = Guid::from_fields(
        0x0e0b6031,
        0x5213,
        0x4934,
        [0x81, 0x8b, 0x38, 0xd9, 0x0c, 0xed, 0x39, 0xdb],
    );
    pub const TIMESYNC: Guid = Guid::from_fields(
        0x9527e630,
        0xd0ae,
        0x497b,
        [0xad, 0xce, 0xe8, 0x0a, 0xb0, 0x17, 0x5c, 0xaf],
    );
    pub const HEARTBEAT: Guid = Guid::from_fields(
        0x57164f39,
        0x9115,
        0x4e78,
        [0xab, 0x55, 0x38, 0x2f, 0x3b, 0xd5, 0x42, 0x2d],
    );
    pub const KVP: Guid = Guid::from_fields(
        0xa9a0f4e7,
        0x5a45,
        0x4d96,
        [0xb8, 0x27, 0x8a, 0x84, 0x1e, 0x8c, 0x03, 0xe6],
    );
    pub const VSS: Guid = Guid::from_fields(
        0x35fa2e29,
        0xea23,
        0x4236,
        [0x96, 0xae, 0x3a, 0x6e, 0xba, 0xcb, 0xa4, 0x40],
    );

    pub const SHUTDOWN_INSTANCE: Guid = Guid::from_fields(
        0xb6650ff7,
        0x33bc,
        0x4840,
        [0x80, 0x48, 0xe0, 0x67, 0x67, 0x86, 0xf3, 0x93],
    );
    pub const TIMESYNC_INSTANCE: Guid = Guid::from_fields(
        0x2dd1ce17,
        0x079e,
        0x403c,
        [0xb3, 0x52, 0xa1, 0x92, 0x1e, 0xe2, 0x07, 0xee],
    );
    pub const HEARTBEAT_INSTANCE: Guid = Guid::from_fields(
        0xfd149e91,
        0x82e0,
        0x4a7d,
        [0xaf, 0xa6, 0x2a, 0x41, 0x66, 0xcb, 0xd7, 0xc0],
    );
    pub const KVP_INSTANCE: Guid = Guid::from_fields(
        0x242ff919,
        0x07db,
        0x4180,
        [0x9c, 0x2e, 0xb8, 0x6c, 0xb6, 0x8c, 0x8c, 0x55],
    );
    pub const VSS_INSTANCE: Guid = Guid::from_fields(
        0x2450ee40,
        0x33bf,
        0x4fbd,
        [0x89, 0x2e, 0x9f, 0xb0, 0x6e, 0x92, 0x14, 0xcf],
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn ic_header_matches_icmsg_hdr() {
        assert_eq!(size_of::<PipeHeader>(), 8);
        assert_eq!(size_of::<IcHeader>(), 20);
        // Offsets within the header (payload offset = +8).
        assert_eq!(offset_of!(IcHeader, framework), 0);
        assert_eq!(offset_of!(IcHeader, msgtype), 4);
        assert_eq!(offset_of!(IcHeader, message), 6);
        assert_eq!(offset_of!(IcHeader, msgsize), 10);
        assert_eq!(offset_of!(IcHeader, status), 12);
        assert_eq!(offset_of!(IcHeader, transaction_id), 16);
        assert_eq!(offset_of!(IcHeader, flags), 17);
        assert_eq!(offset_of!(IcHeader, reserved), 18);
        assert_eq!(BODY_OFFSET, 28);
    }

    #[test]
    fn negotiate_layout() {
        assert_eq!(size_of::<NegotiateHeader>(), 8);
        assert_eq!(offset_of!(NegotiateHeader, message_count), 2);
        assert_eq!(size_of::<Version>(), 4);
        // A version is major then minor.
        assert_eq!(Version::new(3, 2).as_bytes(), &[3, 0, 2, 0]);
        assert_eq!(Version::new(3, 2).packed(), 0x0003_0002);
    }

    #[test]
    fn shutdown_layout() {
        assert_eq!(size_of::<ShutdownMessage>(), 2060);
        assert_eq!(offset_of!(ShutdownMessage, timeout_seconds), 4);
        assert_eq!(offset_of!(ShutdownMessage, flags), 8);
        assert_eq!(offset_of!(ShutdownMessage, display_message), 12);
    }

    #[test]
    fn timesync_layouts() {
        assert_eq!(size_of::<TimesyncV3>(), 25);
        assert_eq!(offset_of!(TimesyncV3, child_time), 8);
        assert_eq!(offset_of!(TimesyncV3, round_trip_time), 16);
        assert_eq!(offset_of!(TimesyncV3, flags), 24);
        assert_eq!(size_of::<TimesyncV4>(), 22);
        assert_eq!(offset_of!(TimesyncV4, reference_time), 8);
        assert_eq!(offset_of!(TimesyncV4, flags), 16);
        assert_eq!(offset_of!(TimesyncV4, leap_flags), 17);
        assert_eq!(offset_of!(TimesyncV4, stratum), 18);
        assert_eq!(offset_of!(TimesyncV4, reserved), 19);
    }

    #[test]
    fn heartbeat_layout() {
        assert_eq!(size_of::<HeartbeatMessage>(), 40);
        assert_eq!(offset_of!(HeartbeatMessage, reserved), 8);
    }

    #[test]
    fn kvp_layouts() {
        assert_eq!(size_of::<KvpHeader>(), 4);
        assert_eq!(size_of::<KvpValue>(), 2572);
        assert_eq!(offset_of!(KvpValue, key_size), 4);
        assert_eq!(offset_of!(KvpValue, value_size), 8);
        assert_eq!(offset_of!(KvpValue, key), 12);
        assert_eq!(offset_of!(KvpValue, value), 524);
        // Absolute body offsets from ic.md §6.1.
        assert_eq!(size_of::<KvpSetMessage>(), 2576);
        assert_eq!(
            offset_of!(KvpSetMessage, data) + offset_of!(KvpValue, key),
            16
        );
        assert_eq!(
            offset_of!(KvpSetMessage, data) + offset_of!(KvpValue, value),
            528
        );
        assert_eq!(size_of::<KvpDeleteMessage>(), 520);
        assert_eq!(offset_of!(KvpDeleteMessage, key_size), 4);
        assert_eq!(offset_of!(KvpDeleteMessage, key), 8);
        assert_eq!(size_of::<KvpEnumerateMessage>(), 2580);
        assert_eq!(offset_of!(KvpEnumerateMessage, index), 4);
        let data = offset_of!(KvpEnumerateMessage, data);
        assert_eq!(data + offset_of!(KvpValue, value_type), 8);
        assert_eq!(data + offset_of!(KvpValue, key_size), 12);
        assert_eq!(data + offset_of!(KvpValue, value_size), 16);
        assert_eq!(data + offset_of!(KvpValue, key), 20);
        assert_eq!(data + offset_of!(KvpValue, value), 532);
        assert_eq!(size_of::<KvpIpMessage>(), 7428);
        assert_eq!(offset_of!(KvpIpMessage, adapter_id), 2);
        assert_eq!(offset_of!(KvpIpMessage, addr_family), 258);
        assert_eq!(offset_of!(KvpIpMessage, dhcp_enabled), 259);
        assert_eq!(offset_of!(KvpIpMessage, ip_addr), 260);
        assert_eq!(offset_of!(KvpIpMessage, sub_net), 2308);
        assert_eq!(offset_of!(KvpIpMessage, gate_way), 4356);
        assert_eq!(offset_of!(KvpIpMessage, dns_addr), 5380);
    }

    #[test]
    fn vss_layout() {
        assert_eq!(size_of::<VssMessage>(), 12);
        assert_eq!(offset_of!(VssMessage, reserved), 1);
        assert_eq!(offset_of!(VssMessage, flags), 8);
    }

    #[test]
    fn guids_in_wire_order() {
        // "0e0b6031-5213-4934-818b-38d90ced39db": first three fields little endian.
        assert_eq!(
            guid::SHUTDOWN.0,
            [
                0x31, 0x60, 0x0b, 0x0e, 0x13, 0x52, 0x34, 0x49, 0x81, 0x8b, 0x38, 0xd9, 0x0c, 0xed,
                0x39, 0xdb
            ]
        );
        for (s, iface, inst) in [
            (
                Service::Shutdown,
                "0e0b6031-5213-4934-818b-38d90ced39db",
                "b6650ff7-33bc-4840-8048-e0676786f393",
            ),
            (
                Service::TimeSync,
                "9527e630-d0ae-497b-adce-e80ab0175caf",
                "2dd1ce17-079e-403c-b352-a1921ee207ee",
            ),
            (
                Service::Heartbeat,
                "57164f39-9115-4e78-ab55-382f3bd5422d",
                "fd149e91-82e0-4a7d-afa6-2a4166cbd7c0",
            ),
            (
                Service::Kvp,
                "a9a0f4e7-5a45-4d96-b827-8a841e8c03e6",
                "242ff919-07db-4180-9c2e-b86cb68c8c55",
            ),
            (
                Service::Vss,
                "35fa2e29-ea23-4236-96ae-3a6ebacba440",
                "2450ee40-33bf-4fbd-892e-9fb06e9214cf",
            ),
        ] {
            assert_eq!(s.interface().to_string(), iface);
            assert_eq!(s.hyperv_instance().to_string(), inst);
            assert_eq!(Service::from_interface(&s.interface()), Some(s));
        }
    }
}
