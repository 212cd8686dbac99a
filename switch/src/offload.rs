//! Software fallbacks for offloads a destination port cannot take: finishing
//! a partial L4 checksum and cutting a TCP GSO frame into MSS-sized segments.
//!
//! Only frames bound for a port without the matching capability come here,
//! so this is the one place the switch copies frame bytes: every segment (or
//! completed frame) is a new buffer. All segments of one frame share one
//! allocation.

use crate::frame::{Gso, GsoKind, PartialCsum};
use crate::wire::{IPPROTO_TCP, Ipv4Hdr, Ipv6Hdr, TcpHdr, tcp_flags};
use bytes::{Bytes, BytesMut};
use zerocopy::FromBytes;

pub use crate::wire::{fold, ones_sum};

/// Why an offload could not be done; the frame is dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    #[error("checksum start/offset outside the frame")]
    BadCsumOffsets,
    #[error("GSO frame headers truncated or inconsistent")]
    BadGsoHeaders,
    #[error("GSO frame is not TCP")]
    NotTcp,
    #[error("GSO segment size is zero")]
    ZeroMss,
}

/// The value that completes a partial checksum of `frame`: the one place
/// the switch finishes L4 checksums (here for ports without checksum
/// offload, in netvsp while copying to the guest). The field already holds
/// the pseudo-header sum, so it is summed as it is. A result of 0 is sent
/// as 0xffff, as Linux does: UDP must (0 means "no checksum"), and for TCP
/// the two are the same one's-complement number.
pub fn partial_csum_value(frame: &[u8], csum: PartialCsum) -> Result<u16, OffloadError> {
    let start = usize::from(csum.start);
    let at = start + usize::from(csum.offset);
    if start >= frame.len() || at + 2 > frame.len() {
        return Err(OffloadError::BadCsumOffsets);
    }
    match !fold(ones_sum(&frame[start..], 0)) {
        0 => Ok(0xffff),
        v => Ok(v),
    }
}

/// The frame with its partial checksum finished, in a new buffer.
pub fn complete_csum(frame: &[u8], csum: PartialCsum) -> Result<Bytes, OffloadError> {
    let value = partial_csum_value(frame, csum)?;
    let at = usize::from(csum.start) + usize::from(csum.offset);
    let mut out = BytesMut::from(frame);
    out[at..at + 2].copy_from_slice(&value.to_be_bytes());
    Ok(out.freeze())
}

/// Where the headers of a GSO frame are.
#[derive(Debug)]
struct GsoLayout {
    l3: usize,
    l4: usize,
    /// End of the TCP header: where the payload starts.
    payload: usize,
}

fn gso_layout(frame: &[u8], l3: usize, kind: GsoKind) -> Result<GsoLayout, OffloadError> {
    let ip = frame.get(l3..).ok_or(OffloadError::BadGsoHeaders)?;
    let l4 = match kind {
        GsoKind::Tcp4 => {
            let (h, _) = Ipv4Hdr::ref_from_prefix(ip).map_err(|_| OffloadError::BadGsoHeaders)?;
            if h.proto != IPPROTO_TCP {
                return Err(OffloadError::NotTcp);
            }
            if h.header_len() < 20 {
                return Err(OffloadError::BadGsoHeaders);
            }
            l3 + h.header_len()
        }
        GsoKind::Tcp6 => {
            let (h, _) = Ipv6Hdr::ref_from_prefix(ip).map_err(|_| OffloadError::BadGsoHeaders)?;
            // Extension headers before TCP are not produced by GSO senders.
            if h.next_header != IPPROTO_TCP {
                return Err(OffloadError::NotTcp);
            }
            l3 + 40
        }
    };
    let tcp = frame.get(l4..).ok_or(OffloadError::BadGsoHeaders)?;
    let (th, _) = TcpHdr::ref_from_prefix(tcp).map_err(|_| OffloadError::BadGsoHeaders)?;
    let payload = l4 + th.header_len();
    if th.header_len() < 20 || payload > frame.len() {
        return Err(OffloadError::BadGsoHeaders);
    }
    Ok(GsoLayout { l3, l4, payload })
}

/// A TCP GSO frame seen as its headers (Ethernet to TCP) and its payload,
/// ready to be cut into segments of at most `mss` payload bytes. Ports that
/// write segments themselves (scatter-gather, one header block per
/// segment) use [`TcpSegments::write_headers`] and send the payload slices
/// as they are; [`segment`] builds contiguous copies from it.
#[derive(Debug)]
pub struct TcpSegments<'a> {
    headers: &'a [u8],
    payload: &'a [u8],
    lay: GsoLayout,
    gso: Gso,
}

impl<'a> TcpSegments<'a> {
    /// The GSO frame `frame` whose IP header starts at `l3`.
    pub fn new(frame: &'a [u8], l3: usize, gso: Gso) -> Result<Self, OffloadError> {
        if gso.mss == 0 {
            return Err(OffloadError::ZeroMss);
        }
        let lay = gso_layout(frame, l3, gso.kind)?;
        let (headers, payload) = frame.split_at(lay.payload);
        Ok(TcpSegments {
            headers,
            payload,
            lay,
            gso,
        })
    }

    /// A GSO frame given as `headers` (ending exactly after the TCP header,
    /// IP header at `l3`) and `payload` in another buffer.
    pub fn from_parts(
        headers: &'a [u8],
        payload: &'a [u8],
        l3: usize,
        gso: Gso,
    ) -> Result<Self, OffloadError> {
        let whole = TcpSegments::new(headers, l3, gso)?;
        if !whole.payload.is_empty() {
            return Err(OffloadError::BadGsoHeaders);
        }
        Ok(TcpSegments { payload, ..whole })
    }

    /// Number of segments (at least one).
    pub fn count(&self) -> usize {
        self.payload
            .len()
            .div_ceil(usize::from(self.gso.mss))
            .max(1)
    }

    /// Length of every segment's headers.
    pub fn headers_len(&self) -> usize {
        self.headers.len()
    }

    /// Payload bytes of segment `i`.
    pub fn payload_of(&self, i: usize) -> &'a [u8] {
        let mss = usize::from(self.gso.mss);
        let from = (i * mss).min(self.payload.len());
        let to = (from + mss).min(self.payload.len());
        &self.payload[from..to]
    }

    /// Writes the headers of segment `i` (lengths, IDs, sequence number,
    /// flags, IP and TCP checksums complete) into `out`, which is
    /// `headers_len()` bytes long.
    pub fn write_headers(&self, i: usize, out: &mut [u8]) {
        out.copy_from_slice(self.headers);
        let last = i + 1 >= self.count();
        fix_segment(out, &self.lay, self.gso, i, last, self.payload_of(i));
    }
}

impl TcpSegments<'_> {
    /// The frame's GSO parameters.
    pub fn gso(&self) -> Gso {
        self.gso
    }

    /// Offset of the IP header in the headers.
    pub fn network_offset(&self) -> usize {
        self.lay.l3
    }

    /// Offset of the TCP header in the headers.
    pub fn transport_offset(&self) -> usize {
        self.lay.l4
    }

    /// Writes into `out` (`headers_len()` bytes) the headers of a smaller
    /// GSO frame made of segments `first..first + n`: lengths, IP ID,
    /// sequence number and flags as that frame's, the IP checksum complete
    /// and the TCP checksum field holding the pseudo-header sum a GSO
    /// frame's partial checksum starts from. Returns its payload.
    pub fn write_chunk_headers(&self, first: usize, n: usize, out: &mut [u8]) -> &[u8] {
        let mss = usize::from(self.gso.mss);
        let from = (first * mss).min(self.payload.len());
        let to = ((first + n) * mss).min(self.payload.len());
        let payload = &self.payload[from..to];
        out.copy_from_slice(self.headers);
        let last = first + n >= self.count();
        let l4_len = out.len() - self.lay.l4 + payload.len();
        let pseudo = fix_lengths_and_flags(out, &self.lay, self.gso, first, last, l4_len);
        out[self.lay.l4 + 16..self.lay.l4 + 18].copy_from_slice(&fold(pseudo).to_be_bytes());
        payload
    }
}

/// Cuts a TCP GSO frame whose IP header starts at `l3` into segments of at
/// most `gso.mss` payload bytes with complete IP and TCP checksums, appended
/// to `out`.
pub fn segment(
    frame: &[u8],
    l3: usize,
    gso: Gso,
    out: &mut Vec<Bytes>,
) -> Result<(), OffloadError> {
    let segs = TcpSegments::new(frame, l3, gso)?;
    let hlen = segs.headers_len();
    let count = segs.count();
    let mut buf = BytesMut::with_capacity(count * hlen + segs.payload.len());
    for i in 0..count {
        buf.resize(hlen, 0);
        segs.write_headers(i, &mut buf[..]);
        buf.extend_from_slice(segs.payload_of(i));
        out.push(buf.split().freeze());
    }
    Ok(())
}

/// Rewrites lengths, IDs, sequence numbers, flags and checksums in the
/// headers `hdrs` of segment `index`, which carries `payload`.
fn fix_segment(
    hdrs: &mut [u8],
    lay: &GsoLayout,
    gso: Gso,
    index: usize,
    last: bool,
    payload: &[u8],
) {
    let l4_len = hdrs.len() - lay.l4 + payload.len();
    let pseudo = fix_lengths_and_flags(hdrs, lay, gso, index, last, l4_len);
    hdrs[lay.l4 + 16..lay.l4 + 18].fill(0);
    // The TCP header is a multiple of 4 bytes, so the payload's words line
    // up with the ones a single pass over header and payload would sum.
    let sum = !fold(ones_sum(payload, ones_sum(&hdrs[lay.l4..], pseudo)));
    hdrs[lay.l4 + 16..lay.l4 + 18].copy_from_slice(&sum.to_be_bytes());
}

/// The part of [`fix_segment`] shared with GSO chunks: the IP length, ID
/// and checksum, the TCP sequence number and flags of a packet that starts
/// with segment `index` and carries `l4_len` bytes of TCP. Returns the TCP
/// pseudo-header sum.
fn fix_lengths_and_flags(
    hdrs: &mut [u8],
    lay: &GsoLayout,
    gso: Gso,
    index: usize,
    last: bool,
    l4_len: usize,
) -> u64 {
    let seq_off = index * usize::from(gso.mss);
    match gso.kind {
        GsoKind::Tcp4 => {
            let ip = Ipv4Hdr::mut_from_prefix(&mut hdrs[lay.l3..])
                .expect("checked by gso_layout")
                .0;
            ip.total_len.set((lay.l4 - lay.l3 + l4_len) as u16);
            ip.id.set(ip.id.get().wrapping_add(index as u16));
            Ipv4Hdr::fill_checksum(&mut hdrs[lay.l3..]).expect("checked by gso_layout");
        }
        GsoKind::Tcp6 => {
            let ip = Ipv6Hdr::mut_from_prefix(&mut hdrs[lay.l3..])
                .expect("checked by gso_layout")
                .0;
            ip.payload_len.set((lay.l4 - lay.l3 - 40 + l4_len) as u16);
        }
    }
    let pseudo = tcp_pseudo_sum(&hdrs[lay.l3..], gso.kind, l4_len);
    let th = TcpHdr::mut_from_prefix(&mut hdrs[lay.l4..])
        .expect("checked by gso_layout")
        .0;
    th.seq.set(th.seq.get().wrapping_add(seq_off as u32));
    let mut flags = th.off_flags.get();
    if !last {
        flags &= !(tcp_flags::FIN | tcp_flags::PSH);
    }
    if index > 0 && gso.ecn {
        flags &= !tcp_flags::CWR;
    }
    th.off_flags.set(flags);
    pseudo
}

/// The TCP pseudo-header sum (not folded) of the IP packet at the start of
/// `ip`, whose header was checked to be there, with `l4_len` bytes of TCP.
pub fn tcp_pseudo_sum(ip: &[u8], kind: GsoKind, l4_len: usize) -> u64 {
    let addrs = match kind {
        GsoKind::Tcp4 => &ip[12..20],
        GsoKind::Tcp6 => &ip[8..40],
    };
    ones_sum(addrs, u64::from(IPPROTO_TCP) + l4_len as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::tests::{A, B, eth};
    use crate::wire::{ETHERTYPE_IPV4, ETHERTYPE_IPV6};

    /// A TCP segment (header with 12 bytes of options) carrying `payload`.
    fn tcp(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut t = vec![0x9c, 0x40, 0x14, 0x51];
        t.extend_from_slice(&seq.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 9, 0x80, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        t.extend_from_slice(payload);
        t
    }

    fn verify_l4(seg: &[u8], l3: usize, l4: usize, v6: bool) {
        let addrs = if v6 {
            &seg[l3 + 8..l3 + 40]
        } else {
            &seg[l3 + 12..l3 + 20]
        };
        let len = (seg.len() - l4) as u64;
        let sum = fold(ones_sum(&seg[l4..], ones_sum(addrs, 6 + len)));
        assert_eq!(sum, 0xffff, "TCP checksum verifies");
    }

    #[test]
    fn checksum_of_known_ipv4_header() {
        // Classic example header whose checksum is 0xb861.
        let h = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(!fold(ones_sum(&h, 0)), 0xb861);
        assert_eq!(fold(ones_sum(&[0xff, 0xff, 0x01], 0)), 0x0100);
    }

    /// An IPv4 TCP GSO frame (10.0.0.1 -> 10.0.0.2, IP ID 0x1000, TCP
    /// sequence 1000, FIN|PSH|ACK) carrying `payload`, MSS 1448.
    fn ipv4_gso_frame(payload: &[u8]) -> (Vec<u8>, Gso) {
        let mut ip =
            crate::frame::tests::ipv4([10, 0, 0, 1], [10, 0, 0, 2], 6, &tcp(1000, 0x19, payload));
        ip[4..6].copy_from_slice(&[0x10, 0x00]);
        let gso = Gso {
            kind: GsoKind::Tcp4,
            mss: 1448,
            ecn: false,
        };
        (eth(B, A, None, ETHERTYPE_IPV4, &ip), gso)
    }

    #[test]
    fn a_chunk_of_a_gso_frame_segments_like_the_frame() {
        let payload: Vec<u8> = (0..7000u32).map(|i| (i * 7) as u8).collect();
        let (frame, gso) = ipv4_gso_frame(&payload);
        let mut whole = Vec::new();
        segment(&frame, 14, gso, &mut whole).unwrap();
        assert_eq!(whole.len(), 5);
        let segs = TcpSegments::new(&frame, 14, gso).unwrap();
        let mut chunks = Vec::new();
        for (first, n) in [(0, 2), (2, 3)] {
            let mut hdrs = vec![0u8; segs.headers_len()];
            let body = segs.write_chunk_headers(first, n, &mut hdrs);
            let ip = Ipv4Hdr::ref_from_prefix(&hdrs[14..]).unwrap().0;
            assert_eq!(
                usize::from(ip.total_len.get()),
                hdrs.len() - 14 + body.len()
            );
            assert_eq!(fold(ones_sum(&hdrs[14..34], 0)), 0xffff);
            // The TCP checksum field holds the pseudo-header sum (a GSO
            // frame's partial checksum): source, destination, protocol
            // and the chunk's TCP length.
            let l4_len = (hdrs.len() - 34 + body.len()) as u64;
            let seed = fold(ones_sum(&[10, 0, 0, 1, 10, 0, 0, 2], 6 + l4_len));
            assert_eq!(u16::from_be_bytes([hdrs[50], hdrs[51]]), seed);
            let chunk = [&hdrs[..], body].concat();
            segment(&chunk, 14, gso, &mut chunks).unwrap();
        }
        assert_eq!(chunks, whole, "the chunks cut into the frame's segments");
    }

    #[test]
    fn segments_ipv4_gso_frame() {
        let payload: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let (frame, gso) = ipv4_gso_frame(&payload);
        let mut out = Vec::new();
        segment(&frame, 14, gso, &mut out).unwrap();
        assert_eq!(out.len(), 3);
        let mut joined = Vec::new();
        for (i, seg) in out.iter().enumerate() {
            let ip = Ipv4Hdr::ref_from_prefix(&seg[14..]).unwrap().0;
            assert_eq!(usize::from(ip.total_len.get()), seg.len() - 14);
            assert_eq!(ip.id.get(), 0x1000 + i as u16);
            assert_eq!(
                fold(ones_sum(&seg[14..34], 0)),
                0xffff,
                "IP checksum verifies"
            );
            let th = TcpHdr::ref_from_prefix(&seg[34..]).unwrap().0;
            assert_eq!(th.seq.get(), 1000 + (i * 1448) as u32);
            let flags = th.off_flags.get() & 0xff;
            assert_eq!(flags, if i == 2 { 0x19 } else { 0x10 }, "FIN/PSH only last");
            verify_l4(seg, 14, 34, false);
            joined.extend_from_slice(&seg[66..]);
        }
        assert_eq!(out[0].len(), 66 + 1448);
        assert_eq!(out[2].len(), 66 + 3000 - 2 * 1448);
        assert_eq!(joined, payload);
    }

    #[test]
    fn segments_tagged_ipv6_gso_frame_with_ecn() {
        let payload = vec![0xa5u8; 2000];
        let ip = crate::frame::tests::ipv6(6, &tcp(7, 0x80 | 0x10, &payload));
        let frame = eth(B, A, Some(12), ETHERTYPE_IPV6, &ip);
        let gso = Gso {
            kind: GsoKind::Tcp6,
            mss: 1000,
            ecn: true,
        };
        let mut out = Vec::new();
        segment(&frame, 18, gso, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        for (i, seg) in out.iter().enumerate() {
            let ip = Ipv6Hdr::ref_from_prefix(&seg[18..]).unwrap().0;
            assert_eq!(usize::from(ip.payload_len.get()), seg.len() - 58);
            let flags = TcpHdr::ref_from_prefix(&seg[58..])
                .unwrap()
                .0
                .off_flags
                .get()
                & 0xff;
            assert_eq!(flags & 0x80 != 0, i == 0, "CWR only on the first segment");
            verify_l4(seg, 18, 58, true);
        }
    }

    #[test]
    fn rejects_bad_gso_frames() {
        let gso = Gso {
            kind: GsoKind::Tcp4,
            mss: 100,
            ecn: false,
        };
        let udp = crate::frame::tests::ipv4([1; 4], [2; 4], 17, &[0; 30]);
        let f = eth(B, A, None, ETHERTYPE_IPV4, &udp);
        let mut out = Vec::new();
        assert_eq!(segment(&f, 14, gso, &mut out), Err(OffloadError::NotTcp));
        assert_eq!(
            segment(&f[..20], 14, gso, &mut out),
            Err(OffloadError::BadGsoHeaders)
        );
        assert_eq!(
            segment(&f, 400, gso, &mut out),
            Err(OffloadError::BadGsoHeaders)
        );
        let zero = Gso { mss: 0, ..gso };
        assert_eq!(segment(&f, 14, zero, &mut out), Err(OffloadError::ZeroMss));
        let mut short_tcp = crate::frame::tests::ipv4([1; 4], [2; 4], 6, &tcp(1, 0x10, b""));
        short_tcp[20 + 12] = 0xf0; // data offset 60 bytes, past the frame
        let f = eth(B, A, None, ETHERTYPE_IPV4, &short_tcp);
        assert_eq!(
            segment(&f, 14, gso, &mut out),
            Err(OffloadError::BadGsoHeaders)
        );
        assert!(out.is_empty());
    }

    #[test]
    fn completes_partial_udp_checksum() {
        let mut udp = crate::frame::tests::udp(5000, 6000, b"hello world");
        // Partial: the field holds the pseudo-header sum (not complemented).
        let src = [10, 0, 0, 1];
        let dst = [10, 0, 0, 2];
        let len = udp.len() as u64;
        let pseudo = fold(ones_sum(&[src, dst].concat(), 17 + len));
        udp[6..8].copy_from_slice(&pseudo.to_be_bytes());
        let frame = eth(
            B,
            A,
            None,
            ETHERTYPE_IPV4,
            &crate::frame::tests::ipv4(src, dst, 17, &udp),
        );
        let done = complete_csum(
            &frame,
            PartialCsum {
                start: 34,
                offset: 6,
            },
        )
        .unwrap();
        let check = fold(ones_sum(
            &done[34..],
            ones_sum(&[src, dst].concat(), 17 + len),
        ));
        assert_eq!(check, 0xffff);
        assert_eq!(done[..40], frame[..40]);
        assert_eq!(
            complete_csum(
                &frame,
                PartialCsum {
                    start: 34,
                    offset: 60
                }
            ),
            Err(OffloadError::BadCsumOffsets)
        );
        assert_eq!(
            complete_csum(
                &frame,
                PartialCsum {
                    start: 500,
                    offset: 0
                }
            ),
            Err(OffloadError::BadCsumOffsets)
        );
    }
}
