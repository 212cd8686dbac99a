//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`): magic
//! numbers, option, reply, command and flag codes, and the fixed-size
//! messages of the fixed newstyle handshake and the transmission phase as
//! zero-copy big-endian views. Shared by the client ([`super::client`]) and
//! the server (`storage::nbd`); nothing here does I/O.
//!
//! Every struct is `#[repr(C)]` of byte-order-aware integers (alignment 1,
//! no padding), so `as_bytes()` is the message as sent; the layout tests at
//! the end compare them with byte strings written out from the spec.

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// `NBDMAGIC`, the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting's second magic and every option's magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The second magic of an oldstyle greeting (not supported, only recognised).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;
/// Longest string (export name, message) the protocol allows.
pub const MAX_STRING: usize = 4096;
/// The payload every peer must accept (2^25 bytes); vspa's limit both ways.
pub const MAX_PAYLOAD: u32 = 1 << 25;
/// Zero bytes after an `NBD_OPT_EXPORT_NAME` reply without `NO_ZEROES`.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Handshake flags (server, 16 bits).
pub mod handshake {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags (32 bits, sent after the greeting).
pub mod client_flags {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`); errors have bit 31 set.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    pub const ERR_BIT: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR_BIT | 1;
    pub const ERR_POLICY: u32 = ERR_BIT | 2;
    pub const ERR_INVALID: u32 = ERR_BIT | 3;
    pub const ERR_PLATFORM: u32 = ERR_BIT | 4;
    pub const ERR_TLS_REQD: u32 = ERR_BIT | 5;
    pub const ERR_UNKNOWN: u32 = ERR_BIT | 6;
    pub const ERR_SHUTDOWN: u32 = ERR_BIT | 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR_BIT | 8;
    pub const ERR_TOO_BIG: u32 = ERR_BIT | 9;
}

/// Information types of `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`, 16 bits).
pub mod flag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Commands (`NBD_CMD_*`).
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;

    /// Name of a command, for messages.
    pub fn name(code: u16) -> &'static str {
        match code {
            READ => "READ",
            WRITE => "WRITE",
            DISC => "DISC",
            FLUSH => "FLUSH",
            TRIM => "TRIM",
            CACHE => "CACHE",
            WRITE_ZEROES => "WRITE_ZEROES",
            BLOCK_STATUS => "BLOCK_STATUS",
            _ => "unknown",
        }
    }
}

/// Command flags (`NBD_CMD_FLAG_*`, 16 bits).
pub mod cmd_flag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply flags.
pub mod reply_flag {
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod chunk {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    /// Bit 15 marks error chunks.
    pub const ERROR_BIT: u16 = 1 << 15;
    pub const ERROR: u16 = ERROR_BIT | 1;
    pub const ERROR_OFFSET: u16 = ERROR_BIT | 2;
}

/// Error values of replies (`NBD_E*`).
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;

    /// The NBD error for a host errno (the spec's mapping: EDQUOT and EFBIG
    /// become ENOSPC; anything without an NBD value becomes EIO).
    pub fn from_host(errno: i32) -> u32 {
        match errno {
            libc::EPERM | libc::EROFS => EPERM,
            libc::ENOMEM => ENOMEM,
            libc::EINVAL => EINVAL,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
            libc::EOVERFLOW => EOVERFLOW,
            libc::ENOTSUP => ENOTSUP,
            libc::ESHUTDOWN => ESHUTDOWN,
            _ => EIO,
        }
    }

    /// The host errno for an NBD error; unknown values count as EINVAL, as
    /// the spec tells clients.
    pub fn to_host(error: u32) -> i32 {
        match error {
            EPERM => libc::EPERM,
            EIO => libc::EIO,
            ENOMEM => libc::ENOMEM,
            ENOSPC => libc::ENOSPC,
            EOVERFLOW => libc::EOVERFLOW,
            ENOTSUP => libc::ENOTSUP,
            ESHUTDOWN => libc::ESHUTDOWN,
            _ => libc::EINVAL,
        }
    }
}

/// `base:allocation` states.
pub mod state {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context vspa knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The newstyle greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags (18 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Greeting {
    pub magic: U64,
    pub option_magic: U64,
    pub flags: U16,
}

/// An option request header (16 bytes); `length` bytes of data follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionHeader {
    pub magic: U64,
    pub option: U32,
    pub length: U32,
}

/// An option reply header (20 bytes); `length` bytes of data follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct OptionReplyHeader {
    pub magic: U64,
    pub option: U32,
    pub reply_type: U32,
    pub length: U32,
}

/// The reply to `NBD_OPT_EXPORT_NAME` before its optional padding (10 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ExportNameReply {
    pub size: U64,
    pub flags: U16,
}

/// `NBD_INFO_EXPORT` (12 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoExport {
    pub info_type: U16,
    pub size: U64,
    pub flags: U16,
}

/// `NBD_INFO_BLOCK_SIZE` (14 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct InfoBlockSize {
    pub info_type: U16,
    pub minimum: U32,
    pub preferred: U32,
    pub maximum: U32,
}

/// A transmission request (28 bytes); a WRITE's payload follows.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RequestHeader {
    pub magic: U32,
    pub flags: U16,
    pub command: U16,
    pub cookie: U64,
    pub offset: U64,
    pub length: U32,
}

/// A simple reply (16 bytes); a successful READ's data follows.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct SimpleReply {
    pub magic: U32,
    pub error: U32,
    pub cookie: U64,
}

/// A structured reply chunk header (20 bytes); `length` bytes follow.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ChunkHeader {
    pub magic: U32,
    pub flags: U16,
    pub chunk_type: U16,
    pub cookie: U64,
    pub length: U32,
}

/// An `OFFSET_DATA` chunk's header and offset (28 bytes); the data follows.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DataChunkHeader {
    pub chunk: ChunkHeader,
    pub offset: U64,
}

/// The payload of an `OFFSET_HOLE` chunk (12 bytes).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct HolePayload {
    pub offset: U64,
    pub size: U32,
}

/// One extent of a `BLOCK_STATUS` chunk (8 bytes), after its u32 context id.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct BlockDescriptor {
    pub length: U32,
    pub flags: U32,
}

/// The fixed start of an error chunk's payload (6 bytes); the message
/// follows (then, for `ERROR_OFFSET`, a u64 offset).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ErrorPayload {
    pub error: U32,
    pub message_length: U16,
}

impl OptionReplyHeader {
    pub fn new(option: u32, reply_type: u32, length: u32) -> OptionReplyHeader {
        OptionReplyHeader {
            magic: OPTION_REPLY_MAGIC.into(),
            option: option.into(),
            reply_type: reply_type.into(),
            length: length.into(),
        }
    }
}

impl OptionHeader {
    pub fn new(option: u32, length: u32) -> OptionHeader {
        OptionHeader {
            magic: IHAVEOPT.into(),
            option: option.into(),
            length: length.into(),
        }
    }
}

impl RequestHeader {
    pub fn new(command: u16, flags: u16, cookie: u64, offset: u64, length: u32) -> Self {
        RequestHeader {
            magic: REQUEST_MAGIC.into(),
            flags: flags.into(),
            command: command.into(),
            cookie: cookie.into(),
            offset: offset.into(),
            length: length.into(),
        }
    }
}

impl SimpleReply {
    pub fn new(cookie: u64, error: u32) -> SimpleReply {
        SimpleReply {
            magic: SIMPLE_REPLY_MAGIC.into(),
            error: error.into(),
            cookie: cookie.into(),
        }
    }
}

impl ChunkHeader {
    pub fn new(cookie: u64, flags: u16, chunk_type: u16, length: u32) -> ChunkHeader {
        ChunkHeader {
            magic: STRUCTURED_REPLY_MAGIC.into(),
            flags: flags.into(),
            chunk_type: chunk_type.into(),
            cookie: cookie.into(),
            length: length.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hex digits to bytes (whitespace ignored), for spec-derived layouts.
    fn hex(text: &str) -> Vec<u8> {
        let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect()
    }

    #[test]
    fn magics_spell_what_the_spec_says() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
        assert_eq!(OPTION_REPLY_MAGIC, 0x3e889045565a9);
        assert_eq!(CLISERV_MAGIC, 0x00420281861253);
    }

    #[test]
    fn handshake_layouts_match_the_specification() {
        let g = Greeting {
            magic: NBDMAGIC.into(),
            option_magic: IHAVEOPT.into(),
            flags: (handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES).into(),
        };
        assert_eq!(g.as_bytes(), hex("4e42444d41474943 49484156454f5054 0003"));
        let o = OptionHeader::new(opt::GO, 0x1234);
        assert_eq!(o.as_bytes(), hex("49484156454f5054 00000007 00001234"));
        let r = OptionReplyHeader::new(opt::INFO, rep::ERR_UNKNOWN, 5);
        assert_eq!(
            r.as_bytes(),
            hex("0003e889045565a9 00000006 80000006 00000005")
        );
        let e = ExportNameReply {
            size: (64u64 << 20).into(),
            flags: (flag::HAS_FLAGS | flag::SEND_FLUSH).into(),
        };
        assert_eq!(e.as_bytes(), hex("0000000004000000 0005"));
        let i = InfoExport {
            info_type: info::EXPORT.into(),
            size: 0x0102_0304_0506_0708u64.into(),
            flags: 0x0d6d.into(),
        };
        assert_eq!(i.as_bytes(), hex("0000 0102030405060708 0d6d"));
        let b = InfoBlockSize {
            info_type: info::BLOCK_SIZE.into(),
            minimum: 512.into(),
            preferred: 4096.into(),
            maximum: MAX_PAYLOAD.into(),
        };
        assert_eq!(b.as_bytes(), hex("0003 00000200 00001000 02000000"));
    }

    #[test]
    fn transmission_layouts_match_the_specification() {
        let r = RequestHeader::new(cmd::WRITE, cmd_flag::FUA, 0xa1a2, 0x1000, 4096);
        assert_eq!(
            r.as_bytes(),
            hex("25609513 0001 0001 000000000000a1a2 0000000000001000 00001000")
        );
        assert_eq!(size_of::<RequestHeader>(), 28);
        let s = SimpleReply::new(7, errno::EINVAL);
        assert_eq!(s.as_bytes(), hex("67446698 00000016 0000000000000007"));
        let c = DataChunkHeader {
            chunk: ChunkHeader::new(9, reply_flag::DONE, chunk::OFFSET_DATA, 8 + 512),
            offset: 0x200.into(),
        };
        assert_eq!(
            c.as_bytes(),
            hex("668e33ef 0001 0001 0000000000000009 00000208 0000000000000200")
        );
        let h = HolePayload {
            offset: 0x4000.into(),
            size: 0x2000.into(),
        };
        assert_eq!(h.as_bytes(), hex("0000000000004000 00002000"));
        let d = BlockDescriptor {
            length: 0x10000.into(),
            flags: (state::HOLE | state::ZERO).into(),
        };
        assert_eq!(d.as_bytes(), hex("00010000 00000003"));
        let e = ErrorPayload {
            error: errno::EIO.into(),
            message_length: 3.into(),
        };
        assert_eq!(e.as_bytes(), hex("00000005 0003"));
        assert_eq!(chunk::ERROR, 0x8001);
        assert_eq!(chunk::ERROR_OFFSET, 0x8002);
    }

    #[test]
    fn error_values_map_both_ways() {
        for (nbd, host) in [
            (errno::EPERM, libc::EPERM),
            (errno::EIO, libc::EIO),
            (errno::ENOSPC, libc::ENOSPC),
            (errno::ESHUTDOWN, libc::ESHUTDOWN),
        ] {
            assert_eq!(errno::from_host(host), nbd);
            assert_eq!(errno::to_host(nbd), host);
        }
        assert_eq!(errno::from_host(libc::EDQUOT), errno::ENOSPC);
        assert_eq!(errno::from_host(libc::ENODEV), errno::EIO);
        assert_eq!(errno::to_host(4242), libc::EINVAL);
    }
}
