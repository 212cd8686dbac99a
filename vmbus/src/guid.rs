//! GUIDs in the mixed-endian byte order VMBus puts on the wire (Linux `guid_t`):
//! the first three fields little endian, the last eight bytes as written.

use std::fmt;
use std::str::FromStr;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// A 16-byte GUID exactly as it sits in an offer message.
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    FromBytes,
    IntoBytes,
    Immutable,
    KnownLayout,
    Unaligned,
)]
#[repr(C)]
pub struct Guid(pub [u8; 16]);

/// A GUID string that is not `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed GUID string")]
pub struct GuidParseError;

impl Guid {
    /// Builds a GUID from its textual fields.
    pub const fn from_fields(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> Self {
        let a = d1.to_le_bytes();
        let b = d2.to_le_bytes();
        let c = d3.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d4[0], d4[1], d4[2], d4[3], d4[4],
            d4[5], d4[6], d4[7],
        ])
    }

    fn fields(&self) -> (u32, u16, u16, &[u8]) {
        let b = &self.0;
        (
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_le_bytes([b[4], b[5]]),
            u16::from_le_bytes([b[6], b[7]]),
            &b[8..],
        )
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (d1, d2, d3, d4) = self.fields();
        write!(
            f,
            "{d1:08x}-{d2:04x}-{d3:04x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            d4[0], d4[1], d4[2], d4[3], d4[4], d4[5], d4[6], d4[7]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Guid {
    type Err = GuidParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if parts.len() != 5 || parts.iter().zip(lens).any(|(p, l)| p.len() != l) {
            return Err(GuidParseError);
        }
        let hex = |p: &str| u64::from_str_radix(p, 16).map_err(|_| GuidParseError);
        let d1 = hex(parts[0])? as u32;
        let d2 = hex(parts[1])? as u16;
        let d3 = hex(parts[2])? as u16;
        let tail = (hex(parts[3])? << 48) | hex(parts[4])?;
        Ok(Guid::from_fields(d1, d2, d3, tail.to_be_bytes()))
    }
}

/// Interface type of the synthetic SCSI controller (storvsc).
pub const SCSI_INTERFACE: Guid = Guid::from_fields(
    0xba6163d9,
    0x04a1,
    0x4d29,
    [0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1, 0xdc, 0x7f],
);

/// Interface type of the synthetic network adapter (netvsc).
pub const NETWORK_INTERFACE: Guid = Guid::from_fields(
    0xf8615163,
    0xdf3e,
    0x46c5,
    [0x91, 0x3f, 0xf2, 0xd2, 0xf9, 0x65, 0xed, 0x0e],
);

/// Interface type of vspa's echo device (used by the demo, tests and benches).
pub const ECHO_INTERFACE: Guid = Guid::from_fields(
    0x7a5c0e11,
    0x3b8e,
    0x4d7f,
    [0x9a, 0x42, 0x56, 0x53, 0x50, 0x41, 0x45, 0x43],
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scsi_guid_bytes_match_linux_guid_init() {
        // GUID_INIT(0xba6163d9, 0x04a1, 0x4d29, 0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1, 0xdc, 0x7f)
        assert_eq!(
            SCSI_INTERFACE.0,
            [
                0xd9, 0x63, 0x61, 0xba, 0xa1, 0x04, 0x29, 0x4d, 0xb6, 0x05, 0x72, 0xe2, 0xff, 0xb1,
                0xdc, 0x7f
            ]
        );
    }

    #[test]
    fn text_round_trip() {
        let s = "f8615163-df3e-46c5-913f-f2d2f965ed0e";
        let g: Guid = s.parse().unwrap();
        assert_eq!(g, NETWORK_INTERFACE);
        assert_eq!(g.to_string(), s);
        assert_eq!("not-a-guid".parse::<Guid>(), Err(GuidParseError));
        assert_eq!(
            "f8615163-df3e-46c5-913f-f2d2f965ed0".parse::<Guid>(),
            Err(GuidParseError)
        );
    }
}
