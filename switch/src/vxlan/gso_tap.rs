//! The VXLAN port's tunnel-GSO path (`gso_tap`): a TCP GSO frame leaves as
//! one UDP-tunnel GSO packet (Ethernet, outer IPv4 or IPv6, UDP, VXLAN,
//! then the whole inner frame) written to a tap device in the underlay's
//! network namespace, with a virtio_net_hdr that says "TCP GSO inside a UDP
//! tunnel" (Linux 6.17+, TUN_F_UDP_TUNNEL_GSO). The kernel routes it like
//! a packet from a host on the tap and forwards it to the underlay whole:
//! across a veth it reaches the peer VTEP as one packet, as the kernel
//! VXLAN device's own super-packets do, and a NIC or the kernel's software
//! GSO cuts it into MTU-sized VXLAN packets only where it leaves the host.
//! The socket path (`sendmmsg` of UDP GSO datagrams) instead gets its
//! datagrams cut back into single packets at a VXLAN peer on the same
//! host, one decapsulation each.
//!
//! The packets carry the port's own local address as their source, so the
//! peer's replies reach the port's UDP socket as before (receiving is
//! unchanged). For the kernel to forward them the underlay namespace must
//! forward: over IPv4 `net.ipv4.ip_forward=1` and
//! `net.ipv4.conf.all.rp_filter=0` (vspa sets the tap's own `accept_local=1`
//! and `rp_filter=0`, as a local source address arrives on it, and turns
//! IPv6 off on it), over IPv6 `net.ipv6.conf.all.forwarding=1`. Checked
//! when the port opens.
//!
//! Each frame's inner headers are written afresh (a copy of the frame's
//! without its VLAN tag, fixed up per packet); the payload is passed to
//! `writev` where it lies. A frame whose outer packet would pass 64 KiB
//! goes out as a few tunnel GSO packets of whole segments. Segments the
//! tap refuses (a tap set down) are handed back for the socket path.

use super::wire::{VXLAN_HLEN, VXLAN_PORT, VxlanHdr};
use crate::frame::GsoKind;
use crate::offload::TcpSegments;
use crate::sys::{self, TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6};
use crate::sys::{TUN_F_UDP_TUNNEL_GSO, TUN_F_UDP_TUNNEL_GSO_CSUM};
use crate::wire::{
    ETH_HLEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, EthHdr, IPPROTO_UDP, Ipv4Hdr, Ipv6Hdr, UdpHdr,
    VirtioNetHdrTunnel, fold, ones_sum, vnet,
};
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::BorrowedFd;
use zerocopy::{FromZeros, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Source MAC of the frames (the tap's peer, as the kernel sees it): any
/// locally administered unicast address other than the tap's.
const SOURCE_MAC: [u8; 6] = [0x02, 0x76, 0x73, 0x70, 0x61, 0x01];
/// TTL / hop limit of the outer packets (the kernel's VXLAN default);
/// forwarding takes one off.
const TTL: u8 = 64;
/// IPv4 "don't fragment".
const DF: u16 = 0x4000;
/// UDP and VXLAN headers.
const UDP_VXLAN: usize = 8 + VXLAN_HLEN;

/// The header block of one packet over IPv4: virtio_net_hdr, then the
/// outer Ethernet, IPv4, UDP and VXLAN headers.
#[derive(Debug, Clone, Copy, IntoBytes, Immutable, KnownLayout, Unaligned, FromZeros)]
#[repr(C)]
struct Outer4 {
    vnet: VirtioNetHdrTunnel,
    eth: EthHdr,
    ip: Ipv4Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
}

/// The same over IPv6.
#[derive(Debug, Clone, Copy, IntoBytes, Immutable, KnownLayout, Unaligned, FromZeros)]
#[repr(C)]
struct Outer6 {
    vnet: VirtioNetHdrTunnel,
    eth: EthHdr,
    ip: Ipv6Hdr,
    udp: UdpHdr,
    vxlan: VxlanHdr,
}

const VNET: usize = size_of::<VirtioNetHdrTunnel>();
const _: () = assert!(size_of::<Outer4>() == VNET + ETH_HLEN + 20 + UDP_VXLAN);
const _: () = assert!(size_of::<Outer6>() == VNET + ETH_HLEN + 40 + UDP_VXLAN);

/// A header block of either family.
#[derive(Debug, Clone, Copy)]
enum Outer {
    V4(Outer4),
    V6(Outer6),
}

impl Outer {
    fn as_bytes(&self) -> &[u8] {
        match self {
            Outer::V4(o) => o.as_bytes(),
            Outer::V6(o) => o.as_bytes(),
        }
    }

    /// Bytes of the frame in front of the inner frame.
    fn frame_len(&self) -> usize {
        self.as_bytes().len() - VNET
    }

    /// Largest inner frame of one packet: the outer IPv4 total length
    /// and the IPv6 payload length are 16 bits.
    fn max_inner(&self) -> usize {
        match self {
            Outer::V4(_) => 65_535 - 20 - UDP_VXLAN,
            Outer::V6(_) => 65_535 - UDP_VXLAN,
        }
    }
}

/// Why the tunnel-GSO path could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum GsoTapError {
    #[error(
        "gso_tap {0}: this kernel has no UDP-tunnel GSO on taps (TUN_F_UDP_TUNNEL_GSO, Linux 6.17+): {1}"
    )]
    NoKernelSupport(String, io::Error),
    #[error("gso_tap {0}: {1}")]
    Device(String, io::Error),
    #[error(
        "gso_tap {tap}: {key} is {value:?} in the underlay namespace; the kernel forwards the tap's packets only with {wanted}"
    )]
    Sysctl {
        tap: String,
        key: &'static str,
        value: String,
        wanted: &'static str,
    },
    #[error("gso_tap {0}: setting {1}: {2}")]
    SetSysctl(String, String, io::Error),
}

/// The tap of the tunnel-GSO path.
#[derive(Debug)]
pub struct GsoTap {
    file: File,
    name: String,
    outer: OuterBuilder,
    /// Inner headers of the packet being written.
    headers: Vec<u8>,
}

/// Builds the header block of each packet.
#[derive(Debug, Clone, Copy)]
struct OuterBuilder {
    /// The fixed fields.
    template: Outer,
    udp_csum: bool,
}

/// What one [`GsoTap::send`] sent.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    /// Tunnel GSO packets written.
    pub writes: u64,
    /// VXLAN packets they become (segments).
    pub packets: u64,
    /// Inner bytes of those packets.
    pub bytes: u64,
}

/// A [`GsoTap::send`] the tap refused part of (a tap set down, say).
#[derive(Debug)]
pub struct Unsent {
    /// What went out before.
    pub sent: Sent,
    /// The first segment not sent.
    pub from: usize,
    pub error: io::Error,
}

impl GsoTap {
    /// Creates tap `name` in the calling thread's network namespace, sets
    /// its offloads and header size, brings it up and checks that the
    /// namespace forwards its packets. `sock` is any socket of that
    /// namespace (for the interface ioctls).
    pub fn open(
        name: &str,
        local: IpAddr,
        udp_csum: bool,
        sock: BorrowedFd<'_>,
    ) -> Result<Self, GsoTapError> {
        let dev = |e| GsoTapError::Device(name.to_string(), e);
        let plain = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN;
        let file = sys::open_tap(name, plain).map_err(dev)?;
        let tunnel = TUN_F_UDP_TUNNEL_GSO | TUN_F_UDP_TUNNEL_GSO_CSUM;
        sys::set_offloads(&file, plain | tunnel)
            .map_err(|e| GsoTapError::NoKernelSupport(name.to_string(), e))?;
        sys::set_vnet_hdr_size(&file, VNET).map_err(dev)?;
        match local {
            IpAddr::V4(_) => forward_ipv4(name)?,
            IpAddr::V6(_) => require(
                name,
                "net/ipv6/conf/all/forwarding",
                "1",
                "net.ipv6.conf.all.forwarding=1",
            )?,
        }
        let tap_mac = sys::link_up(sock, name).map_err(dev)?;
        Ok(GsoTap {
            file,
            name: name.to_string(),
            outer: OuterBuilder::new(tap_mac, local, udp_csum),
            headers: Vec::with_capacity(256),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether packets to `to` can go out through this tap (same family as
    /// the port's local address).
    pub fn reaches(&self, to: SocketAddr) -> bool {
        matches!(
            (&self.outer.template, to),
            (Outer::V4(_), SocketAddr::V4(_)) | (Outer::V6(_), SocketAddr::V6(_))
        )
    }

    /// Sends the segments of `segs` (a TCP GSO frame without a VLAN tag)
    /// in VNI `vni` to `to` (of the local address's family) from UDP
    /// source port `sport`. `segs`' segments must fit the underlay MTU
    /// (the caller checks).
    pub fn send(
        &mut self,
        segs: &TcpSegments<'_>,
        vni: u32,
        to: SocketAddr,
        sport: u16,
    ) -> Result<Sent, Unsent> {
        let mut sent = Sent::default();
        for (first, n) in chunks(segs, self.outer.template.max_inner()) {
            let hlen = segs.headers_len();
            self.headers.resize(hlen, 0);
            let payload = segs.write_chunk_headers(first, n, &mut self.headers);
            let inner = hlen + payload.len();
            let outer = self.outer.build(segs, inner, vni, to, sport);
            let iov = [
                IoSlice::new(outer.as_bytes()),
                IoSlice::new(&self.headers),
                IoSlice::new(payload),
            ];
            let want = outer.as_bytes().len() + inner;
            // A tap takes a packet whole or not at all.
            let error = match (&self.file).write_vectored(&iov) {
                Ok(wrote) if wrote == want => None,
                Ok(wrote) => Some(io::Error::other(format!(
                    "tap took {wrote} of {want} bytes"
                ))),
                Err(e) => Some(e),
            };
            if let Some(error) = error {
                return Err(Unsent {
                    sent,
                    from: first,
                    error,
                });
            }
            sent.writes += 1;
            sent.packets += n as u64;
            sent.bytes += (n * hlen + payload.len()) as u64;
        }
        Ok(sent)
    }
}

/// Checks that the namespace forwards IPv4 from the tap, and lets the tap
/// take packets from the namespace's own address.
fn forward_ipv4(name: &str) -> Result<(), GsoTapError> {
    require(name, "net/ipv4/ip_forward", "1", "net.ipv4.ip_forward=1")?;
    require(
        name,
        "net/ipv4/conf/all/rp_filter",
        "0",
        "net.ipv4.conf.all.rp_filter=0",
    )?;
    for (key, value, needed) in [
        (format!("net/ipv4/conf/{name}/accept_local"), "1", true),
        (format!("net/ipv4/conf/{name}/rp_filter"), "0", true),
        // Without IPv6 in the kernel there is nothing to turn off.
        (format!("net/ipv6/conf/{name}/disable_ipv6"), "1", false),
    ] {
        match write_sysctl(&key, value) {
            Err(e) if needed || e.kind() != io::ErrorKind::NotFound => {
                return Err(GsoTapError::SetSysctl(name.to_string(), key, e));
            }
            _ => {}
        }
    }
    Ok(())
}

impl OuterBuilder {
    /// The fixed parts of every packet's header block.
    fn new(tap_mac: [u8; 6], local: IpAddr, udp_csum: bool) -> Self {
        let eth = |ethertype: u16| {
            let mut e = EthHdr::new_zeroed();
            e.dst = tap_mac;
            e.src = SOURCE_MAC;
            e.ethertype.set(ethertype);
            e
        };
        let mut vnet = VirtioNetHdrTunnel::new_zeroed();
        let template = match local {
            IpAddr::V4(local) => {
                let mut o = Outer4::new_zeroed();
                vnet.outer_th_offset.set((ETH_HLEN + 20) as u16);
                o.vnet = vnet;
                o.eth = eth(ETHERTYPE_IPV4);
                o.ip.ver_ihl = 0x45;
                o.ip.frag.set(DF);
                o.ip.ttl = TTL;
                o.ip.proto = IPPROTO_UDP;
                o.ip.src = local.octets();
                o.udp.dst_port.set(VXLAN_PORT);
                Outer::V4(o)
            }
            IpAddr::V6(local) => {
                let mut o = Outer6::new_zeroed();
                vnet.outer_th_offset.set((ETH_HLEN + 40) as u16);
                o.vnet = vnet;
                o.eth = eth(ETHERTYPE_IPV6);
                o.ip.ver_tc_flow.set(6 << 28);
                o.ip.next_header = IPPROTO_UDP;
                o.ip.hop_limit = TTL;
                o.ip.src = local.octets();
                o.udp.dst_port.set(VXLAN_PORT);
                Outer::V6(o)
            }
        };
        OuterBuilder { template, udp_csum }
    }

    /// The header block of one packet carrying an `inner`-byte frame to
    /// `to` (of the template's family; another family's address leaves the
    /// destination unset, and the caller never passes one).
    fn build(
        &self,
        segs: &TcpSegments<'_>,
        inner: usize,
        vni: u32,
        to: SocketAddr,
        sport: u16,
    ) -> Outer {
        let mut outer = self.template;
        let front = outer.frame_len();
        let udp_len = (UDP_VXLAN + inner) as u16;
        let (vnet, udp, vxlan, family, pseudo) = match (&mut outer, to.ip()) {
            (Outer::V4(o), dst) => {
                if let IpAddr::V4(dst) = dst {
                    o.ip.dst = dst.octets();
                }
                o.ip.total_len.set(20 + udp_len);
                o.ip.csum.set(0);
                o.ip.csum.set(!fold(ones_sum(o.ip.as_bytes(), 0)));
                let addrs = ones_sum(&o.ip.dst, ones_sum(&o.ip.src, 0));
                (
                    &mut o.vnet,
                    &mut o.udp,
                    &mut o.vxlan,
                    vnet::GSO_UDP_TUNNEL_IPV4,
                    addrs,
                )
            }
            (Outer::V6(o), dst) => {
                if let IpAddr::V6(dst) = dst {
                    o.ip.dst = dst.octets();
                }
                o.ip.payload_len.set(udp_len);
                let addrs = ones_sum(&o.ip.dst, ones_sum(&o.ip.src, 0));
                (
                    &mut o.vnet,
                    &mut o.udp,
                    &mut o.vxlan,
                    vnet::GSO_UDP_TUNNEL_IPV6,
                    addrs,
                )
            }
        };
        let gso = segs.gso();
        let h = &mut vnet.hdr;
        h.flags = vnet::F_NEEDS_CSUM;
        if self.udp_csum {
            h.flags |= vnet::F_UDP_TUNNEL_CSUM;
        }
        let kind = match gso.kind {
            GsoKind::Tcp4 => vnet::GSO_TCPV4,
            GsoKind::Tcp6 => vnet::GSO_TCPV6,
        };
        let ecn = if gso.ecn { vnet::GSO_ECN } else { 0 };
        h.gso_type = kind | family | ecn;
        h.hdr_len.set((front + segs.headers_len()) as u16);
        h.gso_size.set(gso.mss);
        h.csum_start.set((front + segs.transport_offset()) as u16);
        h.csum_offset.set(16);
        vnet.inner_nh_offset
            .set((front + segs.network_offset()) as u16);
        udp.src_port.set(sport);
        udp.dst_port.set(to.port());
        udp.len.set(udp_len);
        // With the outer checksum on, the field holds the pseudo-header
        // sum the kernel completes per segment (as for any partial
        // checksum); off, zero.
        let seed = if self.udp_csum {
            fold(pseudo + u64::from(IPPROTO_UDP) + u64::from(udp_len))
        } else {
            0
        };
        udp.csum.set(seed);
        *vxlan = VxlanHdr::new(vni);
        outer
    }
}

/// The packets a frame goes out as: (first segment, segments), as even as
/// the limit of `max_inner` bytes per packet allows.
fn chunks(segs: &TcpSegments<'_>, max_inner: usize) -> impl Iterator<Item = (usize, usize)> {
    let count = segs.count();
    let mss = usize::from(segs.gso().mss);
    let most = (max_inner.saturating_sub(segs.headers_len()) / mss).max(1);
    let packets = count.div_ceil(most);
    // The first `count % packets` packets take one segment more.
    let (base, extra) = (count / packets, count % packets);
    (0..packets).map(move |i| {
        let first = i * base + i.min(extra);
        (first, base + usize::from(i < extra))
    })
}

/// Fails unless sysctl `key` (a path under /proc/sys) reads `value`.
fn require(
    tap: &str,
    key: &'static str,
    value: &str,
    wanted: &'static str,
) -> Result<(), GsoTapError> {
    let now = std::fs::read_to_string(format!("/proc/sys/{key}"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unreadable ({e})"));
    if now == value {
        return Ok(());
    }
    Err(GsoTapError::Sysctl {
        tap: tap.to_string(),
        key,
        value: now,
        wanted,
    })
}

fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    std::fs::write(format!("/proc/sys/{key}"), value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Gso;
    use crate::frame::tests::{A, B, eth, ipv4};

    /// A TCP GSO frame: 66 bytes of headers (TCP with 12 bytes of options)
    /// and `segments` full segments of 1398 bytes.
    fn gso_frame(segments: usize) -> (Vec<u8>, Gso) {
        let mut tcp = vec![
            0x9c, 0x40, 0x14, 0x51, 0, 0, 0x03, 0xe8, 0, 0, 0, 9, 0x80, 0x18,
        ];
        tcp.extend_from_slice(&[0xff, 0xff, 0, 0, 0, 0, 1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        tcp.resize(32 + segments * 1398, 0x5a);
        let ip = ipv4([192, 168, 1, 1], [192, 168, 1, 2], 6, &tcp);
        let gso = Gso {
            kind: GsoKind::Tcp4,
            mss: 1398,
            ecn: false,
        };
        (eth(B, A, None, ETHERTYPE_IPV4, &ip), gso)
    }

    const TAP_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];

    #[test]
    fn header_block_bytes_over_ipv4() {
        let (frame, gso) = gso_frame(24);
        let segs = TcpSegments::new(&frame, 14, gso).unwrap();
        let local: IpAddr = "10.218.0.1".parse().unwrap();
        let to: SocketAddr = "10.218.0.2:4789".parse().unwrap();
        let o = OuterBuilder::new(TAP_MAC, local, true).build(&segs, frame.len(), 42, to, 50_000);
        // Worked by hand: inner frame 66 + 24 * 1398 = 33618 bytes, UDP
        // length 33634 (0x8362), IPv4 total 33654 (0x8376); IPv4 header
        // sum 0x5e3f, checksum 0xa1c0; UDP pseudo-header sum 0x992a.
        #[rustfmt::skip]
        let want: [u8; 74] = [
            // virtio_net_hdr_v1_hash_tunnel: NEEDS_CSUM|UDP_TUNNEL_CSUM,
            // TCPV4|UDP_TUNNEL_IPV4, hdr_len 116, gso_size 1398,
            // csum_start 84, csum_offset 16, (num_buffers, hash: 0),
            // outer_th_offset 34, inner_nh_offset 64.
            0x09, 0x21, 116, 0, 0x76, 0x05, 84, 0, 16, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 34, 0, 64, 0,
            // Ethernet: to the tap, from vspa's MAC, IPv4.
            2, 0, 0, 0, 0, 0xfe, 0x02, 0x76, 0x73, 0x70, 0x61, 0x01, 0x08, 0x00,
            // IPv4: DF, TTL 64, UDP, 10.218.0.1 -> 10.218.0.2.
            0x45, 0, 0x83, 0x76, 0, 0, 0x40, 0, 64, 17, 0xa1, 0xc0,
            10, 218, 0, 1, 10, 218, 0, 2,
            // UDP 50000 -> 4789, length, pseudo-header sum.
            0xc3, 0x50, 0x12, 0xb5, 0x83, 0x62, 0x99, 0x2a,
            // VXLAN: I flag, VNI 42.
            0x08, 0, 0, 0, 0, 0, 42, 0,
        ];
        assert_eq!(o.as_bytes(), &want);
        let o = OuterBuilder::new(TAP_MAC, local, false).build(&segs, frame.len(), 42, to, 50_000);
        let b = o.as_bytes();
        assert_eq!(b[0], vnet::F_NEEDS_CSUM, "no outer checksum to fill in");
        assert_eq!(&b[64..66], &[0, 0], "zero UDP checksum");
    }

    #[test]
    fn header_block_bytes_over_ipv6() {
        let (frame, gso) = gso_frame(24);
        let segs = TcpSegments::new(&frame, 14, gso).unwrap();
        let local: IpAddr = "fd00:219::2".parse().unwrap();
        let to: SocketAddr = "[fd00:219::1]:4789".parse().unwrap();
        let o = OuterBuilder::new(TAP_MAC, local, true).build(&segs, frame.len(), 44, to, 50_000);
        // Worked by hand: UDP length (and IPv6 payload length) 33634
        // (0x8362); pseudo-header sum: addresses 0xff1b + 0xff1a, next
        // header 17, length 0x8362: 0x281a8, folded 0x81aa.
        #[rustfmt::skip]
        let want: [u8; 94] = [
            // TCPV4|UDP_TUNNEL_IPV6, hdr_len 70 + 66, csum_start 70 + 34,
            // outer_th_offset 54, inner_nh_offset 84.
            0x09, 0x41, 136, 0, 0x76, 0x05, 104, 0, 16, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 54, 0, 84, 0,
            2, 0, 0, 0, 0, 0xfe, 0x02, 0x76, 0x73, 0x70, 0x61, 0x01, 0x86, 0xdd,
            // IPv6: version 6, payload length, UDP, hop limit 64.
            0x60, 0, 0, 0, 0x83, 0x62, 17, 64,
            0xfd, 0, 0x02, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
            0xfd, 0, 0x02, 0x19, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
            0xc3, 0x50, 0x12, 0xb5, 0x83, 0x62, 0x81, 0xaa,
            0x08, 0, 0, 0, 0, 0, 44, 0,
        ];
        assert_eq!(o.as_bytes(), &want);
    }

    proptest::proptest! {
        /// Any frame's chunks cover its segments once, in order, differ
        /// in size by at most one segment, and fit the 64 KiB limit
        /// unless a single segment does not.
        #[test]
        fn chunks_cover_every_segment_within_the_limit(
            payload in 0usize..70_000,
            mss in 1u16..9000,
            v6 in proptest::bool::ANY,
        ) {
            let mut tcp = vec![0u8; 20 + payload];
            tcp[12] = 0x50;
            let ip = ipv4([192, 168, 1, 1], [192, 168, 1, 2], 6, &tcp);
            let frame = eth(B, A, None, ETHERTYPE_IPV4, &ip);
            let gso = Gso { kind: GsoKind::Tcp4, mss, ecn: false };
            let segs = TcpSegments::new(&frame, 14, gso).unwrap();
            let max_inner = if v6 { 65_535 - 16 } else { 65_535 - 36 };
            let all: Vec<_> = chunks(&segs, max_inner).collect();
            let mut next = 0;
            for &(first, n) in &all {
                proptest::prop_assert_eq!(first, next);
                proptest::prop_assert!(n >= 1);
                let bytes = segs.headers_len() + n * usize::from(mss);
                proptest::prop_assert!(n == 1 || bytes <= max_inner, "{} bytes", bytes);
                next += n;
            }
            proptest::prop_assert_eq!(next, segs.count());
            let sizes = all.iter().map(|c| c.1);
            let spread = sizes.clone().max().unwrap() - sizes.min().unwrap();
            proptest::prop_assert!(spread <= 1, "{:?}", all);
        }
    }

    #[test]
    fn frames_over_64k_go_out_in_even_packets() {
        let (frame, gso) = gso_frame(24);
        let segs = TcpSegments::new(&frame, 14, gso).unwrap();
        let v4 = 65_535 - 36;
        assert_eq!(chunks(&segs, v4).collect::<Vec<_>>(), [(0, 24)]);
        // 66 + 47 * 1398 = 65772 bytes: over 65499, so two packets.
        let (frame, gso) = gso_frame(47);
        let segs = TcpSegments::new(&frame, 14, gso).unwrap();
        assert_eq!(chunks(&segs, v4).collect::<Vec<_>>(), [(0, 24), (24, 23)]);
        let (frame, gso) = gso_frame(46);
        let segs = TcpSegments::new(&frame, 14, gso).unwrap();
        assert_eq!(66 + 46 * 1398, 64_374);
        assert_eq!(chunks(&segs, v4).collect::<Vec<_>>(), [(0, 46)]);
    }
}
