//! Frames as they move through the switch, and the one parse of their headers
//! that every policy decision reads.
//!
//! A [`Frame`] is the bytes of an Ethernet frame exactly as a port received
//! them (an 802.1Q tag, if any, still inside) plus offload metadata. The switch
//! never edits those bytes: VLAN tag removal or insertion happens when a port
//! writes the frame out, from the three slices [`Delivery::parts`] returns.

use crate::wire::{
    ArpHdr, DHCP_BOOTREPLY, DHCP_CLIENT_PORT, DHCP_SERVER_PORT, DHCPV6_CLIENT_PORT,
    DHCPV6_SERVER_PORT, DhcpHdr, ETH_HLEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6,
    ETHERTYPE_VLAN, EthHdr, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Icmpv6Hdr, Ipv4Hdr,
    Ipv6ExtHdr, Ipv6Hdr, MacAddr, UdpHdr, VLAN_HLEN, VlanTag,
};
use bytes::Bytes;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use zerocopy::FromBytes;

/// Checksum the sender left for the receiver of the frame to complete, in
/// virtio_net_hdr terms: one's-complement sum from `start` to the end of the
/// frame, stored at `start + offset`; the field holds the pseudo-header sum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialCsum {
    pub start: u16,
    pub offset: u16,
}

/// The kind of large segment a GSO frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GsoKind {
    Tcp4,
    Tcp6,
}

/// A large TCP segment to be cut into `mss`-sized segments by whoever
/// cannot take it whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gso {
    pub kind: GsoKind,
    /// Payload bytes per segment.
    pub mss: u16,
    /// The ECN flag of virtio: set CWR only on the first segment.
    pub ecn: bool,
}

/// Offload state of a frame. A frame with `gso` set also has `csum` set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Offload {
    pub csum: Option<PartialCsum>,
    pub gso: Option<Gso>,
}

/// What a port can take: frames needing more than this are completed in
/// software by the switch before they are queued to the port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OffloadCaps {
    /// Accepts frames whose L4 checksum is left partial.
    pub csum: bool,
    /// Accepts TCP/IPv4 GSO frames.
    pub tso4: bool,
    /// Accepts TCP/IPv6 GSO frames.
    pub tso6: bool,
}

impl OffloadCaps {
    /// Every offload this switch knows.
    pub const ALL: OffloadCaps = OffloadCaps {
        csum: true,
        tso4: true,
        tso6: true,
    };
    /// None: the port gets plain, complete frames of at most MTU size.
    pub const NONE: OffloadCaps = OffloadCaps {
        csum: false,
        tso4: false,
        tso6: false,
    };

    /// Whether a frame with this offload state can go to the port as it is.
    pub fn accepts(&self, off: &Offload) -> bool {
        let gso_ok = match off.gso {
            None => true,
            Some(Gso {
                kind: GsoKind::Tcp4,
                ..
            }) => self.tso4,
            Some(Gso {
                kind: GsoKind::Tcp6,
                ..
            }) => self.tso6,
        };
        gso_ok && (off.csum.is_none() || self.csum)
    }
}

/// A frame entering the switch.
#[derive(Debug, Clone)]
pub struct Frame {
    pub data: Bytes,
    pub offload: Offload,
}

impl Frame {
    /// A complete frame with no offload state.
    pub fn new(data: Bytes) -> Self {
        Frame {
            data,
            offload: Offload::default(),
        }
    }
}

/// A frame queued to a port: the received bytes plus how to rewrite its VLAN
/// tag on the way out.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The frame as received (tagged if `strip_tag`).
    pub data: Bytes,
    /// Offloads, with offsets relative to `data`.
    pub offload: Offload,
    /// `data` carries an 802.1Q tag at bytes 12..16 that must not go out.
    pub strip_tag: bool,
    /// Tag to insert after the MAC addresses (802.1Q TCI), if any.
    pub tag: Option<u16>,
}

impl Delivery {
    /// The frame to write, as three slices: MAC addresses, the tag to insert
    /// (empty or 4 bytes, filled into `tag_buf`) and the rest.
    pub fn parts<'a>(&'a self, tag_buf: &'a mut [u8; 4]) -> [&'a [u8]; 3] {
        let rest_from = if self.strip_tag { 12 + VLAN_HLEN } else { 12 };
        let tag: &[u8] = match self.tag {
            Some(tci) => {
                tag_buf[..2].copy_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
                tag_buf[2..].copy_from_slice(&tci.to_be_bytes());
                &tag_buf[..]
            }
            None => &[],
        };
        [&self.data[..12], tag, &self.data[rest_from..]]
    }

    /// Length of the frame as written.
    pub fn len(&self) -> usize {
        let mut len = self.data.len();
        if self.strip_tag {
            len -= VLAN_HLEN;
        }
        if self.tag.is_some() {
            len += VLAN_HLEN;
        }
        len
    }

    /// Never true: a delivery holds at least the MAC addresses.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Bytes the tag rewrite adds (+4), removes (-4) or neither (0), for
    /// shifting offload offsets.
    pub fn shift(&self) -> isize {
        let added = if self.tag.is_some() { 4 } else { 0 };
        let removed = if self.strip_tag { 4 } else { 0 };
        added - removed
    }

    /// Offloads with offsets relative to the frame as written.
    pub fn out_offload(&self) -> Offload {
        let mut off = self.offload;
        if let Some(c) = &mut off.csum {
            c.start = (isize::from(c.start as i16) + self.shift()) as u16;
        }
        off
    }

    /// The frame as written, in one buffer: the data itself when no tag
    /// changes (no copy), else a copy. For ports that need one slice.
    pub fn contiguous(&self) -> Bytes {
        if self.tag.is_none() && !self.strip_tag {
            return self.data.clone();
        }
        let mut tag_buf = [0u8; 4];
        let parts = self.parts(&mut tag_buf);
        let mut out = Vec::with_capacity(self.len());
        for p in parts {
            out.extend_from_slice(p);
        }
        Bytes::from(out)
    }
}

/// Why a frame could not be parsed; the switch drops it and counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("frame shorter than an Ethernet header")]
    TooShort,
    #[error("802.1Q tag truncated")]
    TruncatedTag,
    #[error("stacked 802.1Q tags are not supported")]
    StackedTags,
    #[error("IPv4 header truncated or inconsistent")]
    BadIpv4,
    #[error("IPv6 header truncated or inconsistent")]
    BadIpv6,
    #[error("ARP packet truncated")]
    BadArp,
}

/// Layer 4 facts the security guards need.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L4Info {
    /// IP protocol of the upper layer, if the walk reached it.
    pub proto: Option<u8>,
    /// Offset of the L4 header in the frame (when `proto` is known and this is
    /// the first or only fragment).
    pub offset: usize,
    /// TCP/UDP source and destination ports.
    pub ports: Option<(u16, u16)>,
    /// ICMPv6 type.
    pub icmp6_type: Option<u8>,
    /// A DHCPv4 or DHCPv6 server message.
    pub dhcp_server: bool,
}

/// The headers of a frame, parsed once at ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    pub dst: MacAddr,
    pub src: MacAddr,
    /// TCI of the 802.1Q tag, if the frame has one.
    pub tci: Option<u16>,
    /// EtherType of the payload (after the tag).
    pub ethertype: u16,
    /// Offset of the L3 header.
    pub l3_offset: usize,
    /// IP source and destination (for ARP: sender and target protocol address).
    pub ip: Option<(IpAddr, IpAddr)>,
    pub l4: L4Info,
}

impl FrameInfo {
    /// VLAN id of the frame's tag, if any.
    pub fn tag_vid(&self) -> Option<u16> {
        self.tci.map(|t| t & 0x0fff)
    }
}

/// Parses the Ethernet, VLAN, IP and L4 headers of `frame`.
pub fn parse(frame: &[u8]) -> Result<FrameInfo, ParseError> {
    let (eth, mut rest) = EthHdr::ref_from_prefix(frame).map_err(|_| ParseError::TooShort)?;
    let mut ethertype = eth.ethertype.get();
    let mut tci = None;
    let mut l3_offset = ETH_HLEN;
    if ethertype == ETHERTYPE_VLAN {
        let (tag, after) = VlanTag::ref_from_prefix(rest).map_err(|_| ParseError::TruncatedTag)?;
        tci = Some(tag.tci.get());
        ethertype = tag.ethertype.get();
        if ethertype == ETHERTYPE_VLAN {
            return Err(ParseError::StackedTags);
        }
        rest = after;
        l3_offset += VLAN_HLEN;
    }
    let mut info = FrameInfo {
        dst: MacAddr(eth.dst),
        src: MacAddr(eth.src),
        tci,
        ethertype,
        l3_offset,
        ip: None,
        l4: L4Info::default(),
    };
    match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(rest, &mut info)?,
        ETHERTYPE_IPV6 => parse_ipv6(rest, &mut info)?,
        ETHERTYPE_ARP => {
            let (arp, _) = ArpHdr::ref_from_prefix(rest).map_err(|_| ParseError::BadArp)?;
            if arp.ptype.get() == ETHERTYPE_IPV4 && arp.plen == 4 {
                info.ip = Some((
                    IpAddr::V4(Ipv4Addr::from(arp.spa)),
                    IpAddr::V4(Ipv4Addr::from(arp.tpa)),
                ));
            }
        }
        _ => {}
    }
    Ok(info)
}

fn parse_ipv4(l3: &[u8], info: &mut FrameInfo) -> Result<(), ParseError> {
    let (ip, _) = Ipv4Hdr::ref_from_prefix(l3).map_err(|_| ParseError::BadIpv4)?;
    let hlen = ip.header_len();
    let total = usize::from(ip.total_len.get());
    if ip.ver_ihl >> 4 != 4 || hlen < 20 || total < hlen || total > l3.len() {
        return Err(ParseError::BadIpv4);
    }
    info.ip = Some((
        IpAddr::V4(Ipv4Addr::from(ip.src)),
        IpAddr::V4(Ipv4Addr::from(ip.dst)),
    ));
    info.l4.proto = Some(ip.proto);
    if ip.frag_offset() == 0 {
        info.l4.offset = info.l3_offset + hlen;
        parse_l4(ip.proto, &l3[hlen..total], info);
    }
    Ok(())
}

/// Longest IPv6 extension-header chain walked before giving up.
const MAX_IPV6_EXT: usize = 8;

fn parse_ipv6(l3: &[u8], info: &mut FrameInfo) -> Result<(), ParseError> {
    let (ip, _) = Ipv6Hdr::ref_from_prefix(l3).map_err(|_| ParseError::BadIpv6)?;
    let end = 40 + usize::from(ip.payload_len.get());
    if ip.ver_tc_flow.get() >> 28 != 6 || end > l3.len() {
        return Err(ParseError::BadIpv6);
    }
    info.ip = Some((
        IpAddr::V6(Ipv6Addr::from(ip.src)),
        IpAddr::V6(Ipv6Addr::from(ip.dst)),
    ));
    let mut next = ip.next_header;
    let mut off = 40;
    for _ in 0..MAX_IPV6_EXT {
        let ext_len = match next {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let (ext, _) =
                    Ipv6ExtHdr::ref_from_prefix(&l3[off..end]).map_err(|_| ParseError::BadIpv6)?;
                (usize::from(ext.len) + 1) * 8
            }
            // Fragment: 8 bytes; only the first fragment has the L4 header.
            44 => {
                let frag = l3.get(off..off + 8).ok_or(ParseError::BadIpv6)?;
                if u16::from_be_bytes([frag[2], frag[3]]) & 0xfff8 != 0 {
                    return Ok(());
                }
                8
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                let (ext, _) =
                    Ipv6ExtHdr::ref_from_prefix(&l3[off..end]).map_err(|_| ParseError::BadIpv6)?;
                (usize::from(ext.len) + 2) * 4
            }
            proto => {
                info.l4.proto = Some(proto);
                info.l4.offset = info.l3_offset + off;
                parse_l4(proto, &l3[off..end], info);
                return Ok(());
            }
        };
        next = l3[off];
        off += ext_len;
        if off > end {
            return Err(ParseError::BadIpv6);
        }
    }
    // A chain too long to walk: the upper protocol stays unknown, which the
    // RA guard treats as suspect.
    Ok(())
}

fn parse_l4(proto: u8, l4: &[u8], info: &mut FrameInfo) {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            // Both start with the two ports; a truncated header leaves them unknown.
            let Ok((udp, payload)) = UdpHdr::ref_from_prefix(l4) else {
                return;
            };
            let (sport, dport) = (udp.src_port.get(), udp.dst_port.get());
            info.l4.ports = Some((sport, dport));
            if proto == IPPROTO_UDP {
                info.l4.dhcp_server = is_dhcp_server(info, sport, dport, payload);
            }
        }
        IPPROTO_ICMPV6 => {
            if let Ok((icmp, _)) = Icmpv6Hdr::ref_from_prefix(l4) {
                info.l4.icmp6_type = Some(icmp.icmp_type);
            }
        }
        _ => {}
    }
}

fn is_dhcp_server(info: &FrameInfo, sport: u16, dport: u16, payload: &[u8]) -> bool {
    match info.ethertype {
        ETHERTYPE_IPV4 if sport == DHCP_SERVER_PORT && dport == DHCP_CLIENT_PORT => {
            // A reply; a truncated one is counted as a server message too.
            DhcpHdr::ref_from_prefix(payload).map_or(true, |(d, _)| d.op == DHCP_BOOTREPLY)
        }
        ETHERTYPE_IPV6 => sport == DHCPV6_SERVER_PORT && dport == DHCPV6_CLIENT_PORT,
        _ => false,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::wire::ICMPV6_ROUTER_ADVERT;

    pub const A: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xa]);
    pub const B: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xb]);

    // The switch's tests build frames with `testing`, under short names:
    // `eth` takes an optional tag, `udp` carries no checksum.
    pub use crate::testing::{dhcp, eth_tagged as eth, ipv4, ipv6, udp_unchecked as udp};

    #[test]
    fn parses_tagged_ipv4_udp() {
        let f = eth(
            B,
            A,
            Some(0x2064),
            ETHERTYPE_IPV4,
            &ipv4(
                [10, 0, 0, 1],
                [10, 0, 0, 2],
                IPPROTO_UDP,
                &udp(1000, 2000, b"hi"),
            ),
        );
        let i = parse(&f).unwrap();
        assert_eq!((i.dst, i.src), (B, A));
        assert_eq!(i.tag_vid(), Some(100));
        assert_eq!(i.ethertype, ETHERTYPE_IPV4);
        assert_eq!(i.l3_offset, 18);
        assert_eq!(
            i.ip,
            Some(("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()))
        );
        assert_eq!(i.l4.proto, Some(IPPROTO_UDP));
        assert_eq!(i.l4.offset, 38);
        assert_eq!(i.l4.ports, Some((1000, 2000)));
        assert!(!i.l4.dhcp_server);
    }

    #[test]
    fn recognises_dhcp_server_replies_only() {
        let reply = ipv4([10, 0, 0, 1], [255; 4], IPPROTO_UDP, &udp(67, 68, &dhcp(2)));
        let request = ipv4([0; 4], [255; 4], IPPROTO_UDP, &udp(68, 67, &dhcp(1)));
        assert!(
            parse(&eth(B, A, None, ETHERTYPE_IPV4, &reply))
                .unwrap()
                .l4
                .dhcp_server
        );
        assert!(
            !parse(&eth(B, A, None, ETHERTYPE_IPV4, &request))
                .unwrap()
                .l4
                .dhcp_server
        );
        let v6 = ipv6(IPPROTO_UDP, &udp(547, 546, b"x"));
        assert!(
            parse(&eth(B, A, None, ETHERTYPE_IPV6, &v6))
                .unwrap()
                .l4
                .dhcp_server
        );
    }

    #[test]
    fn finds_icmpv6_behind_extension_headers() {
        let mut l4 = vec![IPPROTO_ICMPV6, 0, 1, 4, 0, 0, 0, 0]; // hop-by-hop, 8 bytes
        l4.extend_from_slice(&[ICMPV6_ROUTER_ADVERT, 0, 0, 0, 0, 0, 0, 0]);
        let i = parse(&eth(B, A, None, ETHERTYPE_IPV6, &ipv6(0, &l4))).unwrap();
        assert_eq!(i.l4.proto, Some(IPPROTO_ICMPV6));
        assert_eq!(i.l4.icmp6_type, Some(ICMPV6_ROUTER_ADVERT));
        assert_eq!(i.l4.offset, 14 + 48);
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(parse(&[0u8; 13]), Err(ParseError::TooShort));
        assert_eq!(
            parse(&eth(B, A, None, ETHERTYPE_VLAN, &[0, 1])),
            Err(ParseError::TruncatedTag)
        );
        let mut bad_len = ipv4([1; 4], [2; 4], IPPROTO_UDP, &udp(1, 2, b""));
        bad_len[3] = 200; // total length past the frame
        assert_eq!(
            parse(&eth(B, A, None, ETHERTYPE_IPV4, &bad_len)),
            Err(ParseError::BadIpv4)
        );
        let mut bad_ihl = ipv4([1; 4], [2; 4], IPPROTO_UDP, &udp(1, 2, b""));
        bad_ihl[0] = 0x44;
        assert_eq!(
            parse(&eth(B, A, None, ETHERTYPE_IPV4, &bad_ihl)),
            Err(ParseError::BadIpv4)
        );
        let mut v6 = ipv6(0, &[IPPROTO_ICMPV6, 9, 0, 0, 0, 0, 0, 0]); // ext len past end
        assert_eq!(
            parse(&eth(B, A, None, ETHERTYPE_IPV6, &v6)),
            Err(ParseError::BadIpv6)
        );
        v6.truncate(30);
        assert_eq!(
            parse(&eth(B, A, None, ETHERTYPE_IPV6, &v6)),
            Err(ParseError::BadIpv6)
        );
        assert_eq!(
            parse(&eth(B, A, None, ETHERTYPE_ARP, &[0; 10])),
            Err(ParseError::BadArp)
        );
    }

    #[test]
    fn delivery_parts_rewrite_tags() {
        let f = Bytes::from(eth(B, A, Some(5), 0x88b5, b"payload"));
        let d = Delivery {
            data: f.clone(),
            offload: Offload {
                csum: Some(PartialCsum {
                    start: 34,
                    offset: 16,
                }),
                gso: None,
            },
            strip_tag: true,
            tag: None,
        };
        let mut buf = [0; 4];
        let joined: Vec<u8> = d.parts(&mut buf).concat();
        assert_eq!(joined, eth(B, A, None, 0x88b5, b"payload"));
        assert_eq!(d.len(), joined.len());
        assert_eq!(d.contiguous(), joined);
        assert_eq!(d.out_offload().csum.unwrap().start, 30);
        let retag = Delivery {
            tag: Some(7),
            ..d.clone()
        };
        assert_eq!(retag.contiguous(), eth(B, A, Some(7), 0x88b5, b"payload"));
        let add = Delivery {
            data: Bytes::from(eth(B, A, None, 0x88b5, b"p")),
            strip_tag: false,
            tag: Some(9),
            ..d
        };
        assert_eq!(add.contiguous(), eth(B, A, Some(9), 0x88b5, b"p"));
        assert_eq!(add.out_offload().csum.unwrap().start, 38);
    }
}
