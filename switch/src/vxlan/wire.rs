//! The VXLAN header (RFC 7348 section 5) and the pure functions around it:
//! building the header the Linux kernel accepts, taking a received
//! datagram apart, and the flow hash that picks a UDP source port.
//!
//! Linux drops any VXLAN packet whose flags are not exactly the I bit or
//! whose reserved bytes are not zero (unless an extension such as GBP or
//! GPE is configured), so vspa sends exactly `08 00 00 00 | VNI | 00` and
//! holds received packets to the same rule.

use crate::frame::FrameInfo;
use crate::wire::{ETH_HLEN, ETHERTYPE_VLAN};
use zerocopy::byteorder::network_endian as be;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Length of the VXLAN header.
pub const VXLAN_HLEN: usize = 8;
/// The only flag defined: the VNI is valid.
pub const FLAG_I: u8 = 0x08;
/// IANA's UDP port for VXLAN.
pub const VXLAN_PORT: u16 = 4789;
/// Largest VNI (24 bits).
pub const MAX_VNI: u32 = 0x00ff_ffff;
/// Outer IPv4 + UDP + VXLAN bytes in front of the inner frame.
pub const OUTER_V4: usize = 20 + 8 + VXLAN_HLEN;
/// Outer IPv6 + UDP + VXLAN bytes in front of the inner frame.
pub const OUTER_V6: usize = 40 + 8 + VXLAN_HLEN;

/// The VXLAN header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VxlanHdr {
    /// `FLAG_I` and seven reserved bits.
    pub flags: u8,
    pub reserved1: [u8; 3],
    /// VNI (24 bits) and a reserved byte.
    pub vni_reserved: be::U32,
}

const _: () = assert!(size_of::<VxlanHdr>() == VXLAN_HLEN);

impl VxlanHdr {
    /// The header for `vni`, exactly as Linux sends it.
    pub fn new(vni: u32) -> Self {
        VxlanHdr {
            flags: FLAG_I,
            reserved1: [0; 3],
            vni_reserved: (vni << 8).into(),
        }
    }

    pub fn vni(&self) -> u32 {
        self.vni_reserved.get() >> 8
    }
}

/// Why a received datagram was not a frame for the switch; each is a
/// counter of the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecapError {
    #[error("datagram shorter than a VXLAN header")]
    Truncated,
    #[error("flags other than I, or reserved bits set")]
    BadFlags,
    #[error("VNI not configured on the port")]
    UnknownVni,
    #[error("inner frame shorter than an Ethernet header")]
    ShortInner,
    #[error("inner frame longer than the port's MTU allows")]
    TooBig,
    #[error("inner frame carries an 802.1Q tag")]
    InnerTag,
    #[error("inner source MAC is multicast or zero")]
    BadSource,
}

/// A received VXLAN packet, taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decapped {
    pub vni: u32,
    /// Offset of the inner Ethernet frame in the datagram.
    pub inner: usize,
    /// Inner source MAC (to learn).
    pub src: [u8; 6],
}

/// Checks a UDP payload as a VXLAN packet whose inner frame may be at most
/// `max_inner` bytes; `known_vni` says whether a VNI is configured.
pub fn decap(
    datagram: &[u8],
    max_inner: usize,
    known_vni: impl Fn(u32) -> bool,
) -> Result<Decapped, DecapError> {
    let (hdr, inner) = VxlanHdr::ref_from_prefix(datagram).map_err(|_| DecapError::Truncated)?;
    if hdr.flags != FLAG_I || hdr.reserved1 != [0; 3] || hdr.vni_reserved.get() & 0xff != 0 {
        return Err(DecapError::BadFlags);
    }
    let vni = hdr.vni();
    if !known_vni(vni) {
        return Err(DecapError::UnknownVni);
    }
    if inner.len() < ETH_HLEN {
        return Err(DecapError::ShortInner);
    }
    if inner.len() > max_inner {
        return Err(DecapError::TooBig);
    }
    if u16::from_be_bytes([inner[12], inner[13]]) == ETHERTYPE_VLAN {
        return Err(DecapError::InnerTag);
    }
    let src: [u8; 6] = inner[6..12].try_into().expect("checked length");
    if src[0] & 1 == 1 || src == [0; 6] {
        return Err(DecapError::BadSource);
    }
    Ok(Decapped {
        vni,
        inner: VXLAN_HLEN,
        src,
    })
}

/// Rewrites a decapsulated datagram in place so that its inner frame
/// carries an 802.1Q tag `tci`: the MAC addresses move four bytes back
/// into the VXLAN header's room and the tag goes after them. Returns the
/// offset where the tagged frame now starts.
pub fn tag_in_place(datagram: &mut [u8], tci: u16) -> usize {
    let start = VXLAN_HLEN - 4;
    datagram.copy_within(VXLAN_HLEN..VXLAN_HLEN + 12, start);
    datagram[start + 12..start + 14].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
    datagram[start + 14..start + 16].copy_from_slice(&tci.to_be_bytes());
    start
}

/// A hash of an inner frame's flow (IP addresses, protocol and ports, or
/// the MAC addresses for other frames), stable for the flow, to pick a UDP
/// source port so that ECMP and RSS on the path spread flows.
pub fn flow_hash(frame: &[u8], info: Option<&FrameInfo>) -> u32 {
    let mut h = Fnv::default();
    match info.and_then(|i| i.ip.map(|ip| (ip, i))) {
        Some(((src, dst), i)) => {
            h.ip(src);
            h.ip(dst);
            h.bytes(&[i.l4.proto.unwrap_or(0)]);
            if let Some((s, d)) = i.l4.ports {
                h.bytes(&s.to_be_bytes());
                h.bytes(&d.to_be_bytes());
            }
        }
        None => h.bytes(frame.get(..12).unwrap_or(frame)),
    }
    h.finish()
}

/// 32-bit FNV-1a with a final mix (the low bits pick among few sockets).
#[derive(Debug)]
struct Fnv(u32);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0x811c_9dc5)
    }
}

impl Fnv {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 = (self.0 ^ u32::from(x)).wrapping_mul(0x0100_0193);
        }
    }

    fn ip(&mut self, ip: std::net::IpAddr) {
        match ip {
            std::net::IpAddr::V4(a) => self.bytes(&a.octets()),
            std::net::IpAddr::V6(a) => self.bytes(&a.octets()),
        }
    }

    fn finish(&self) -> u32 {
        let mut x = self.0;
        x ^= x >> 16;
        x = x.wrapping_mul(0x85eb_ca6b);
        x ^ (x >> 13)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::parse;

    /// A VXLAN packet for VNI 42 (0x00002a) carrying an ARP request from
    /// 02:00:00:00:00:01 for 192.168.42.2, assembled by hand from RFC 7348
    /// section 5 (header) and RFC 826 (ARP).
    const ARP_IN_VNI_42: [u8; 50] = [
        0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x2a, 0x00, // VXLAN: I, VNI 42
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00,
        0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0xc0, 0xa8,
        0x2a, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xc0, 0xa8, 0x2a, 0x02,
    ];

    #[test]
    fn header_bytes_are_what_linux_accepts() {
        assert_eq!(VxlanHdr::new(42).as_bytes(), &[8, 0, 0, 0, 0, 0, 0x2a, 0]);
        assert_eq!(
            VxlanHdr::new(0x12_3456).as_bytes(),
            &[8, 0, 0, 0, 0x12, 0x34, 0x56, 0]
        );
        assert_eq!(VxlanHdr::new(MAX_VNI).vni(), MAX_VNI);
        assert_eq!(OUTER_V4 + ETH_HLEN, 50, "Linux's VXLAN_HEADROOM");
        assert_eq!(OUTER_V6 + ETH_HLEN, 70);
    }

    #[test]
    fn decapsulates_a_hand_checked_packet() {
        let d = decap(&ARP_IN_VNI_42, 1500, |v| v == 42).unwrap();
        assert_eq!(d.vni, 42);
        assert_eq!(d.inner, 8);
        assert_eq!(d.src, [2, 0, 0, 0, 0, 1]);
        let info = parse(&ARP_IN_VNI_42[d.inner..]).unwrap();
        assert!(info.dst.is_broadcast());
        assert_eq!(info.ethertype, 0x0806);
    }

    #[test]
    fn refuses_what_linux_refuses() {
        let with = |i: usize, v: u8| {
            let mut p = ARP_IN_VNI_42;
            p[i] = v;
            decap(&p, 1500, |v| v == 42)
        };
        assert_eq!(
            decap(&ARP_IN_VNI_42[..7], 1500, |_| true),
            Err(DecapError::Truncated)
        );
        assert_eq!(with(0, 0x0c), Err(DecapError::BadFlags), "G bit (GBP)");
        assert_eq!(with(0, 0x00), Err(DecapError::BadFlags), "no I bit");
        assert_eq!(with(2, 0x01), Err(DecapError::BadFlags));
        assert_eq!(with(7, 0x01), Err(DecapError::BadFlags));
        assert_eq!(with(6, 0x2b), Err(DecapError::UnknownVni));
        assert_eq!(
            decap(&ARP_IN_VNI_42[..8 + 13], 1500, |_| true),
            Err(DecapError::ShortInner)
        );
        assert_eq!(decap(&ARP_IN_VNI_42, 41, |_| true), Err(DecapError::TooBig));
        assert_eq!(with(14, 0x03), Err(DecapError::BadSource), "multicast");
        let mut tagged = ARP_IN_VNI_42;
        tagged[20..22].copy_from_slice(&[0x81, 0x00]);
        assert_eq!(decap(&tagged, 1500, |_| true), Err(DecapError::InnerTag));
    }

    #[test]
    fn tags_in_place() {
        let mut p = ARP_IN_VNI_42.to_vec();
        let start = tag_in_place(&mut p, 0x2064);
        let info = parse(&p[start..]).unwrap();
        assert_eq!(info.tag_vid(), Some(100));
        assert_eq!(info.src.0, [2, 0, 0, 0, 0, 1]);
        assert!(info.dst.is_broadcast());
        assert_eq!(info.ethertype, 0x0806);
        assert_eq!(p[start + 18..], ARP_IN_VNI_42[22..]);
    }

    #[test]
    fn flow_hash_is_per_flow() {
        use crate::frame::tests::{A, B, eth, ipv4, udp};
        let f = |sport| {
            eth(
                B,
                A,
                None,
                0x0800,
                &ipv4([10, 0, 0, 1], [10, 0, 0, 2], 17, &udp(sport, 53, b"x")),
            )
        };
        let (a, b) = (f(1000), f(1001));
        let ha = flow_hash(&a, parse(&a).ok().as_ref());
        assert_eq!(ha, flow_hash(&a, parse(&a).ok().as_ref()));
        assert_ne!(ha, flow_hash(&b, parse(&b).ok().as_ref()));
        assert_eq!(flow_hash(&a[..12], None), flow_hash(&b[..12], None));
    }
}
