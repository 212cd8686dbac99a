//! Builders of the few frames tests, the demo and the benchmarks send:
//! Ethernet (tagged or not), ARP, IPv4 with its header checksum, IPv6,
//! UDP with a full or partial checksum, ICMP echo and a DHCP body. Not on
//! any data path; every builder writes its checksums with the switch's own
//! helpers ([`Ipv4Hdr::fill_checksum`], [`ones_sum`]), so there is one set
//! of checksum code to trust.

use crate::wire::{ETHERTYPE_ARP, ETHERTYPE_VLAN, IPPROTO_UDP, Ipv4Hdr, MacAddr, fold, ones_sum};

/// An Ethernet frame.
pub fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    eth_tagged(dst, src, None, ethertype, payload)
}

/// An Ethernet frame with an 802.1Q tag (TCI) when `tag` is given.
pub fn eth_tagged(
    dst: MacAddr,
    src: MacAddr,
    tag: Option<u16>,
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    if let Some(tci) = tag {
        f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP request (op 1, broadcast) or reply (op 2) frame.
pub fn arp(op: u16, sha: MacAddr, spa: [u8; 4], tha: MacAddr, tpa: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4];
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha.0);
    p.extend_from_slice(&spa);
    p.extend_from_slice(&tha.0);
    p.extend_from_slice(&tpa);
    let dst = if op == 1 { MacAddr::BROADCAST } else { tha };
    eth(dst, sha, ETHERTYPE_ARP, &p)
}

/// An IPv4 packet (don't-fragment, header checksum filled in) around `l4`.
pub fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0x33, 0x44, 0x40, 0, 64, proto, 0, 0];
    p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(l4);
    Ipv4Hdr::fill_checksum(&mut p).expect("a 20-byte header");
    p
}

/// An IPv6 packet from fe80::1 to ff02::1 around `l4` with next header `next`.
pub fn ipv6(next: u8, l4: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.extend_from_slice(&[next, 255]);
    p.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&[0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    p.extend_from_slice(l4);
    p
}

/// A UDP datagram between `src` and `dst`; with `partial` the checksum
/// holds only the pseudo-header sum (for the host to complete), else the
/// full checksum.
pub fn udp(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    data: &[u8],
    partial: bool,
) -> Vec<u8> {
    let mut u = udp_unchecked(sport, dport, data);
    let mut addrs = src.to_vec();
    addrs.extend_from_slice(&dst);
    let pseudo = ones_sum(&addrs, u64::from(IPPROTO_UDP) + u.len() as u64);
    let c = if partial {
        fold(pseudo)
    } else {
        !fold(ones_sum(&u, pseudo))
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// A UDP datagram without a checksum (0: none, which IPv4 allows).
pub fn udp_unchecked(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + data.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    u
}

/// An ICMP echo request with its checksum.
pub fn icmp_echo(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = !fold(ones_sum(&m, 0));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A DHCP (BOOTP) body of `op` (1 request, 2 reply) with the magic cookie.
pub fn dhcp(op: u8) -> Vec<u8> {
    let mut d = vec![0u8; 240];
    d[0] = op;
    d[1] = 1;
    d[2] = 6;
    d[236..240].copy_from_slice(&[0x63, 0x82, 0x53, 0x63]);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_verify() {
        // The classic example header whose checksum is 0xb861.
        let mut h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xaa, 0xbb, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        Ipv4Hdr::fill_checksum(&mut h).unwrap();
        assert_eq!(&h[10..12], &[0xb8, 0x61]);
        assert!(Ipv4Hdr::fill_checksum(&mut h[..19]).is_err());
        let ip = ipv4([10, 0, 0, 1], [10, 0, 0, 2], 1, &icmp_echo(1, 2, b"x"));
        assert_eq!(fold(ones_sum(&ip[..20], 0)), 0xffff);
        assert_eq!(fold(ones_sum(&ip[20..], 0)), 0xffff);
        let u = udp([10, 0, 0, 1], [10, 0, 0, 2], 1, 2, b"abc", false);
        let pseudo = ones_sum(&[10, 0, 0, 1, 10, 0, 0, 2], 17 + u.len() as u64);
        assert_eq!(fold(ones_sum(&u, pseudo)), 0xffff);
        assert_eq!(
            eth_tagged(MacAddr::BROADCAST, MacAddr::default(), Some(5), 1, &[]).len(),
            18
        );
    }
}
