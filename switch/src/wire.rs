//! Wire formats the switch reads and writes, as zero-copy views.
//!
//! Every header is a `#[repr(C)]` struct of byte-aligned fields (zerocopy's
//! network-endian integers for the network protocols, little-endian ones for
//! virtio and pcap), so a header is a cast of the frame's bytes, never a copy.
//! The size of each struct is asserted at compile time and its layout is
//! checked against hand-decoded bytes in the tests below.

use std::fmt;
use std::str::FromStr;
use zerocopy::byteorder::little_endian as le;
use zerocopy::byteorder::network_endian as be;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType of an 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

/// IP protocol numbers the switch looks at.
pub const IPPROTO_TCP: u8 = 6;
/// UDP.
pub const IPPROTO_UDP: u8 = 17;
/// ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// Length of one 802.1Q tag.
pub const VLAN_HLEN: usize = 4;

/// A 48-bit MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Group (multicast or broadcast) bit set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }

    /// The all-ones broadcast address.
    pub fn is_broadcast(&self) -> bool {
        self.0 == [0xff; 6]
    }

    /// The address as the low 48 bits of a u64 (for table keys).
    pub fn to_u64(self) -> u64 {
        let mut b = [0u8; 8];
        b[2..].copy_from_slice(&self.0);
        u64::from_be_bytes(b)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A MAC address string was not six colon-separated hex bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?} (want six hex bytes like 02:00:00:00:00:01)")]
pub struct MacParseError(pub String);

impl FromStr for MacAddr {
    type Err = MacParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_string());
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

/// One's-complement sum of `data` (big-endian 16-bit words; an odd last byte
/// is padded with zero) added to `acc`, not yet folded.
pub fn ones_sum(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u32::from_be_bytes(tail))
}

/// Folds a sum to 16 bits (not complemented).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Ethernet II header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: be::U16,
}

/// The four bytes after the MAC addresses of an 802.1Q-tagged frame (the TPID
/// 0x8100 is the `ethertype` of the `EthHdr` before it).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VlanTag {
    /// Priority (3 bits), drop eligible (1 bit), VLAN id (12 bits).
    pub tci: be::U16,
    /// EtherType of the payload.
    pub ethertype: be::U16,
}

/// ARP for IPv4 over Ethernet.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct ArpHdr {
    pub htype: be::U16,
    pub ptype: be::U16,
    pub hlen: u8,
    pub plen: u8,
    pub op: be::U16,
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

/// IPv4 header without options.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Ipv4Hdr {
    /// Version (4 bits) and header length in 32-bit words (4 bits).
    pub ver_ihl: u8,
    pub tos: u8,
    pub total_len: be::U16,
    pub id: be::U16,
    /// Flags (3 bits) and fragment offset in 8-byte units (13 bits).
    pub frag: be::U16,
    pub ttl: u8,
    pub proto: u8,
    pub csum: be::U16,
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// An IPv4 header shorter than its 20 fixed bytes, or than its IHL says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("IPv4 header truncated")]
pub struct TruncatedIpv4;

impl Ipv4Hdr {
    /// Computes and stores the header checksum of the IPv4 packet at the
    /// start of `packet` (over its header and options): the one place the
    /// switch writes IPv4 header checksums.
    pub fn fill_checksum(packet: &mut [u8]) -> Result<(), TruncatedIpv4> {
        let (h, _) = Ipv4Hdr::ref_from_prefix(packet).map_err(|_| TruncatedIpv4)?;
        let len = h.header_len();
        if len < size_of::<Ipv4Hdr>() || len > packet.len() {
            return Err(TruncatedIpv4);
        }
        packet[10..12].fill(0);
        let sum = !fold(ones_sum(&packet[..len], 0));
        packet[10..12].copy_from_slice(&sum.to_be_bytes());
        Ok(())
    }

    /// Header length in bytes.
    pub fn header_len(&self) -> usize {
        usize::from(self.ver_ihl & 0x0f) * 4
    }
    /// Fragment offset in bytes (0 for an unfragmented packet or the first fragment).
    pub fn frag_offset(&self) -> usize {
        usize::from(self.frag.get() & 0x1fff) * 8
    }
}

/// IPv6 fixed header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8 bits), flow label (20 bits).
    pub ver_tc_flow: be::U32,
    pub payload_len: be::U16,
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The first two bytes every IPv6 extension header shares.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Ipv6ExtHdr {
    pub next_header: u8,
    pub len: u8,
}

/// UDP header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct UdpHdr {
    pub src_port: be::U16,
    pub dst_port: be::U16,
    pub len: be::U16,
    pub csum: be::U16,
}

/// TCP header without options.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct TcpHdr {
    pub src_port: be::U16,
    pub dst_port: be::U16,
    pub seq: be::U32,
    pub ack: be::U32,
    /// Data offset in 32-bit words (4 bits), reserved (4 bits), flags (8 bits).
    pub off_flags: be::U16,
    pub window: be::U16,
    pub csum: be::U16,
    pub urgent: be::U16,
}

/// TCP flags in the low byte of `off_flags`.
pub mod tcp_flags {
    pub const FIN: u16 = 0x01;
    pub const PSH: u16 = 0x08;
    pub const CWR: u16 = 0x80;
}

impl TcpHdr {
    /// Header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.off_flags.get() >> 12) * 4
    }
}

/// Fixed part of a DHCP (BOOTP) message, up to and including the magic cookie.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct DhcpHdr {
    /// 1 = BOOTREQUEST (client), 2 = BOOTREPLY (server).
    pub op: u8,
    pub htype: u8,
    pub hlen: u8,
    pub hops: u8,
    pub xid: be::U32,
    pub secs: be::U16,
    pub flags: be::U16,
    pub ciaddr: [u8; 4],
    pub yiaddr: [u8; 4],
    pub siaddr: [u8; 4],
    pub giaddr: [u8; 4],
    pub chaddr: [u8; 16],
    pub sname: [u8; 64],
    pub file: [u8; 128],
    pub magic: be::U32,
}

/// DHCP op of a server reply.
pub const DHCP_BOOTREPLY: u8 = 2;
/// DHCPv4 server and client UDP ports.
pub const DHCP_SERVER_PORT: u16 = 67;
/// DHCPv4 client port.
pub const DHCP_CLIENT_PORT: u16 = 68;
/// DHCPv6 server/relay port (server messages come from it).
pub const DHCPV6_SERVER_PORT: u16 = 547;
/// DHCPv6 client port.
pub const DHCPV6_CLIENT_PORT: u16 = 546;

/// ICMPv6 header (the part every message shares).
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct Icmpv6Hdr {
    pub icmp_type: u8,
    pub code: u8,
    pub csum: be::U16,
}

/// ICMPv6 router advertisement.
pub const ICMPV6_ROUTER_ADVERT: u8 = 134;
/// ICMPv6 redirect (a router's message too).
pub const ICMPV6_REDIRECT: u8 = 137;

/// `struct virtio_net_hdr` (the 10-byte legacy layout the tap driver uses
/// with IFF_VNET_HDR and the default header size); little-endian, as on
/// every host this runs on (the tap's TUNSETVNETLE is not needed there).
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VirtioNetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: le::U16,
    pub gso_size: le::U16,
    pub csum_start: le::U16,
    pub csum_offset: le::U16,
}

/// virtio_net_hdr flags and GSO types.
pub mod vnet {
    pub const F_NEEDS_CSUM: u8 = 1;
    pub const F_DATA_VALID: u8 = 2;
    /// The outer UDP checksum of a UDP-tunnel GSO packet is to be filled
    /// in per segment (Linux 6.17+).
    pub const F_UDP_TUNNEL_CSUM: u8 = 8;
    pub const GSO_NONE: u8 = 0;
    pub const GSO_TCPV4: u8 = 1;
    pub const GSO_UDP: u8 = 3;
    pub const GSO_TCPV6: u8 = 4;
    /// The GSO packet is inside a UDP tunnel over IPv4 (or IPv6): or'ed
    /// with the inner packet's GSO type (Linux 6.17+).
    pub const GSO_UDP_TUNNEL_IPV4: u8 = 0x20;
    pub const GSO_UDP_TUNNEL_IPV6: u8 = 0x40;
    pub const GSO_ECN: u8 = 0x80;
}

/// `struct virtio_net_hdr_v1_hash_tunnel` (Linux 6.17+ UAPI): the header a
/// tap reads and writes once TUN_F_UDP_TUNNEL_GSO is on and TUNSETVNETHDRSZ
/// is 24. The v1 header (the legacy one plus `num_buffers`), the hash
/// report fields (unused by a tap, zero), then the offsets from the start
/// of the frame of the outer transport (UDP) header and of the inner
/// network header. Little-endian.
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct VirtioNetHdrTunnel {
    pub hdr: VirtioNetHdr,
    pub num_buffers: le::U16,
    pub hash_value: le::U32,
    pub hash_report: le::U16,
    pub hash_padding: le::U16,
    pub outer_th_offset: le::U16,
    pub inner_nh_offset: le::U16,
}

/// pcap global header (classic libpcap format, microsecond timestamps),
/// written little-endian; readers detect the byte order from the magic.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PcapFileHdr {
    pub magic: le::U32,
    pub version_major: le::U16,
    pub version_minor: le::U16,
    pub thiszone: le::I32,
    pub sigfigs: le::U32,
    pub snaplen: le::U32,
    pub linktype: le::U32,
}

/// pcap magic for microsecond timestamps.
pub const PCAP_MAGIC: u32 = 0xa1b2_c3d4;
/// pcap link type of Ethernet frames.
pub const PCAP_LINKTYPE_ETHERNET: u32 = 1;

/// pcap per-record header.
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct PcapRecordHdr {
    pub ts_sec: le::U32,
    pub ts_usec: le::U32,
    pub incl_len: le::U32,
    pub orig_len: le::U32,
}

const _: () = {
    assert!(size_of::<EthHdr>() == 14);
    assert!(size_of::<VlanTag>() == 4);
    assert!(size_of::<ArpHdr>() == 28);
    assert!(size_of::<Ipv4Hdr>() == 20);
    assert!(size_of::<Ipv6Hdr>() == 40);
    assert!(size_of::<UdpHdr>() == 8);
    assert!(size_of::<TcpHdr>() == 20);
    assert!(size_of::<DhcpHdr>() == 240);
    assert!(size_of::<Icmpv6Hdr>() == 4);
    assert!(size_of::<VirtioNetHdr>() == 10);
    assert!(size_of::<VirtioNetHdrTunnel>() == 24);
    assert!(size_of::<PcapFileHdr>() == 24);
    assert!(size_of::<PcapRecordHdr>() == 16);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parse_and_print() {
        let m: MacAddr = "02:0a:ff:00:10:01".parse().unwrap();
        assert_eq!(m.0, [0x02, 0x0a, 0xff, 0x00, 0x10, 0x01]);
        assert_eq!(m.to_string(), "02:0a:ff:00:10:01");
        assert_eq!(m.to_u64(), 0x020a_ff00_1001);
        assert!(!m.is_multicast());
        assert!(MacAddr::BROADCAST.is_multicast() && MacAddr::BROADCAST.is_broadcast());
        for bad in [
            "",
            "02:0a:ff:00:10",
            "02:0a:ff:00:10:01:02",
            "2:0a:ff:00:10:01",
            "zz:0a:ff:00:10:01",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn ethernet_and_vlan_layout() {
        // dst ff.., src 02:00:00:00:00:01, TPID 0x8100, TCI pcp 5 vid 100, type IPv4
        let b = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 1, 0x81, 0x00, 0xa0, 0x64, 0x08,
            0x00,
        ];
        let (eth, rest) = EthHdr::ref_from_prefix(&b).unwrap();
        assert_eq!(eth.dst, [0xff; 6]);
        assert_eq!(eth.src, [2, 0, 0, 0, 0, 1]);
        assert_eq!(eth.ethertype.get(), ETHERTYPE_VLAN);
        let (tag, _) = VlanTag::ref_from_prefix(rest).unwrap();
        assert_eq!(tag.tci.get() & 0x0fff, 100);
        assert_eq!(tag.tci.get() >> 13, 5);
        assert_eq!(tag.ethertype.get(), ETHERTYPE_IPV4);
    }

    #[test]
    fn ipv4_udp_dhcp_layout() {
        // 45 00 0148 1234 4000 40 11 abcd 0a000001 ffffffff | 0043 0044 0134 0000
        let mut b = vec![
            0x45, 0x00, 0x01, 0x48, 0x12, 0x34, 0x40, 0x00, 0x40, 0x11, 0xab, 0xcd, 10, 0, 0, 1,
            255, 255, 255, 255, 0x00, 0x43, 0x00, 0x44, 0x01, 0x34, 0x00, 0x00,
        ];
        b.extend_from_slice(&[2, 1, 6, 0]);
        b.resize(28 + 236, 0);
        b.extend_from_slice(&[0x63, 0x82, 0x53, 0x63]);
        let (ip, rest) = Ipv4Hdr::ref_from_prefix(&b).unwrap();
        assert_eq!(ip.header_len(), 20);
        assert_eq!(ip.total_len.get(), 0x148);
        assert_eq!(ip.id.get(), 0x1234);
        assert_eq!(ip.frag_offset(), 0);
        assert_eq!(ip.frag.get() & 0x4000, 0x4000, "DF");
        assert_eq!(ip.proto, IPPROTO_UDP);
        assert_eq!(ip.csum.get(), 0xabcd);
        assert_eq!(ip.src, [10, 0, 0, 1]);
        let (udp, rest) = UdpHdr::ref_from_prefix(rest).unwrap();
        assert_eq!(udp.src_port.get(), DHCP_SERVER_PORT);
        assert_eq!(udp.dst_port.get(), DHCP_CLIENT_PORT);
        assert_eq!(udp.len.get(), 0x134);
        let (dhcp, _) = DhcpHdr::ref_from_prefix(rest).unwrap();
        assert_eq!(dhcp.op, DHCP_BOOTREPLY);
        assert_eq!(dhcp.hlen, 6);
        assert_eq!(dhcp.magic.get(), 0x6382_5363);
    }

    #[test]
    fn ipv6_icmpv6_layout() {
        let mut b = vec![0x60, 0x00, 0x00, 0x00, 0x00, 0x10, 58, 255];
        b.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        b.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        b.extend_from_slice(&[134, 0, 0x12, 0x34]);
        let (ip, rest) = Ipv6Hdr::ref_from_prefix(&b).unwrap();
        assert_eq!(ip.ver_tc_flow.get() >> 28, 6);
        assert_eq!(ip.payload_len.get(), 16);
        assert_eq!(ip.next_header, IPPROTO_ICMPV6);
        assert_eq!(ip.hop_limit, 255);
        assert_eq!(ip.src[15], 1);
        assert_eq!(ip.dst[0], 0xff);
        let (icmp, _) = Icmpv6Hdr::ref_from_prefix(rest).unwrap();
        assert_eq!(icmp.icmp_type, ICMPV6_ROUTER_ADVERT);
        assert_eq!(icmp.csum.get(), 0x1234);
    }

    #[test]
    fn tcp_and_arp_layout() {
        let b = [
            0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 2, 0x80, 0x18, 0xff, 0xff, 0xbe, 0xef, 0,
            0,
        ];
        let tcp = TcpHdr::ref_from_bytes(&b).unwrap();
        assert_eq!(tcp.src_port.get(), 12345);
        assert_eq!(tcp.dst_port.get(), 80);
        assert_eq!(tcp.seq.get(), 1);
        assert_eq!(tcp.ack.get(), 2);
        assert_eq!(tcp.header_len(), 32);
        assert_eq!(tcp.off_flags.get() & 0xff, 0x18, "PSH|ACK");
        assert_eq!(tcp.csum.get(), 0xbeef);
        let arp = [
            0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2,
        ];
        let arp = ArpHdr::ref_from_bytes(&arp).unwrap();
        assert_eq!(arp.htype.get(), 1);
        assert_eq!(arp.ptype.get(), ETHERTYPE_IPV4);
        assert_eq!(arp.op.get(), 1);
        assert_eq!(arp.spa, [10, 0, 0, 1]);
        assert_eq!(arp.tpa, [10, 0, 0, 2]);
    }

    #[test]
    fn virtio_net_hdr_layout() {
        // NEEDS_CSUM, TCPV4|ECN, hdr_len 66, gso_size 1448, csum_start 34, csum_offset 16
        let b = [0x01, 0x81, 66, 0, 0xa8, 0x05, 34, 0, 16, 0];
        let h = VirtioNetHdr::ref_from_bytes(&b).unwrap();
        assert_eq!(h.flags, vnet::F_NEEDS_CSUM);
        assert_eq!(h.gso_type & !vnet::GSO_ECN, vnet::GSO_TCPV4);
        assert_eq!(h.hdr_len.get(), 66);
        assert_eq!(h.gso_size.get(), 1448);
        assert_eq!(h.csum_start.get(), 34);
        assert_eq!(h.csum_offset.get(), 16);
        assert_eq!(h.as_bytes(), &b);
    }

    #[test]
    fn virtio_net_hdr_tunnel_layout() {
        // include/uapi/linux/virtio_net.h: virtio_net_hdr_v1 (flags u8,
        // gso_type u8, hdr_len, gso_size, csum_start, csum_offset,
        // num_buffers: le16 each), hash_value le32, hash_report le16,
        // padding le16, outer_th_offset le16, inner_nh_offset le16.
        // NEEDS_CSUM|UDP_TUNNEL_CSUM, TCPV4|UDP_TUNNEL_IPV4, hdr_len 116,
        // gso_size 1398, csum_start 84, csum_offset 16, outer UDP at 34,
        // inner IP at 64.
        let b = [
            0x09, 0x21, 116, 0, 0x76, 0x05, 84, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 34, 0, 64,
            0,
        ];
        let h = VirtioNetHdrTunnel::ref_from_bytes(&b).unwrap();
        assert_eq!(h.hdr.flags, vnet::F_NEEDS_CSUM | vnet::F_UDP_TUNNEL_CSUM);
        assert_eq!(h.hdr.gso_type, vnet::GSO_TCPV4 | vnet::GSO_UDP_TUNNEL_IPV4);
        assert_eq!(h.hdr.hdr_len.get(), 116);
        assert_eq!(h.hdr.gso_size.get(), 1398);
        assert_eq!(h.hdr.csum_start.get(), 84);
        assert_eq!(h.hdr.csum_offset.get(), 16);
        assert_eq!(h.outer_th_offset.get(), 34);
        assert_eq!(h.inner_nh_offset.get(), 64);
        assert_eq!(h.as_bytes(), &b);
    }

    #[test]
    fn pcap_header_layout() {
        let h = PcapFileHdr {
            magic: PCAP_MAGIC.into(),
            version_major: 2.into(),
            version_minor: 4.into(),
            thiszone: 0.into(),
            sigfigs: 0.into(),
            snaplen: 262_144.into(),
            linktype: PCAP_LINKTYPE_ETHERNET.into(),
        };
        assert_eq!(
            h.as_bytes(),
            &[
                0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 1, 0, 0, 0
            ]
        );
        let r = PcapRecordHdr {
            ts_sec: 1.into(),
            ts_usec: 2.into(),
            incl_len: 60.into(),
            orig_len: 64.into(),
        };
        assert_eq!(
            r.as_bytes(),
            &[1, 0, 0, 0, 2, 0, 0, 0, 60, 0, 0, 0, 64, 0, 0, 0]
        );
    }
}
