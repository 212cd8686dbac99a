//! The send path (guest to switch): walking the RNDIS messages of one
//! SEND_RNDIS_PKT, copying each data message's frame once out of guest
//! memory into a shared chunk, and turning its checksum and LSO PPIs into
//! offload state, fixing on the copy what the guest leaves for the host
//! (IP lengths, the IPv4 header checksum, the TCP pseudo-header sum).

use bytes::BytesMut;
use vmbus::ring::RingError;
use vmbus::{SharedMemory, SharedSlice};
use zerocopy::FromBytes;

use super::control::MAX_CONTROL_MESSAGE;
use super::{Chan, NicCore};
use crate::netvsp::nvsp;
use crate::netvsp::rndis::{self, PacketInfo, RndisError};
use crate::offload::{fold, tcp_pseudo_sum};
use crate::wire::{
    ETH_HLEN, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETHERTYPE_VLAN, IPPROTO_TCP, Ipv4Hdr, Ipv6Hdr,
    TruncatedIpv4,
};
use crate::{Frame, Gso, GsoKind, Offload, PartialCsum};

/// Largest frame accepted from the guest (an LSO frame with headers).
const MAX_TX_FRAME: usize = 65_535 + 18;
/// Smallest frame accepted from the guest.
const MIN_TX_FRAME: usize = 14;
/// Largest PPI area read per data message.
const MAX_PPI_AREA: usize = 256;
/// Size of the chunks frames are copied into.
const CHUNK: usize = 256 * 1024;

/// Why a frame's offload PPIs cannot be honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxOffloadError {
    #[error("LSO MSS {0} is 0 or larger than 65535")]
    BadMss(u32),
    #[error("offload header offset {0} is outside the frame")]
    BadOffset(usize),
    #[error("LSO frame is not the TCP over IPv4/IPv6 its PPI says")]
    NotTcp,
    #[error("frame too long for its IP length field")]
    TooLong,
    #[error(transparent)]
    Ipv4(#[from] TruncatedIpv4),
}

/// Why a data message was dropped.
#[derive(Debug, thiserror::Error)]
enum TxError {
    #[error(transparent)]
    Rndis(#[from] RndisError),
    #[error(transparent)]
    Offload(#[from] TxOffloadError),
}

/// The bytes of one SEND_RNDIS_PKT: a send-buffer section and/or the
/// packet's GPA-direct pieces, concatenated.
struct PacketBytes<'a> {
    section: Option<SharedSlice<'a>>,
    memory: &'a SharedMemory,
    pieces: &'a [(u64, usize)],
    len: usize,
}

impl<'a> PacketBytes<'a> {
    /// Calls `f` with the pieces of `[off, off + len)`; false if out of range.
    fn visit(&self, mut off: usize, mut len: usize, mut f: impl FnMut(SharedSlice<'a>)) -> bool {
        if off.checked_add(len).is_none_or(|end| end > self.len) {
            return false;
        }
        if let Some(h) = &self.section {
            if off < h.len() {
                let n = len.min(h.len() - off);
                f(h.subslice(off, n).expect("inside the section"));
                len -= n;
                off = 0;
                if len == 0 {
                    return true;
                }
            } else {
                off -= h.len();
            }
        }
        for &(gpa, n) in self.pieces {
            if len == 0 {
                break;
            }
            if off >= n {
                off -= n;
                continue;
            }
            let take = len.min(n - off);
            match self.memory.slice(gpa + off as u64, take) {
                Ok(s) => f(s),
                Err(_) => return false,
            }
            len -= take;
            off = 0;
        }
        len == 0
    }

    /// Copies `buf.len()` bytes at `off` out.
    fn read(&self, off: usize, buf: &mut [u8]) -> bool {
        if let Some(h) = &self.section
            && h.read_at(off, buf).is_ok()
        {
            return true;
        }
        let mut at = 0;
        self.visit(off, buf.len(), |s| {
            let n = s.len();
            let _ = s.read_at(0, &mut buf[at..at + n]);
            at += n;
        })
    }

    /// Appends `[off, off + len)` to `chunk` (which has the room).
    fn copy_into(&self, off: usize, len: usize, chunk: &mut BytesMut) -> bool {
        let mut ok = true;
        let all = self.visit(off, len, |s| ok &= s.copy_to_uninit(chunk).is_ok());
        all && ok
    }
}

impl NicCore {
    /// Walks the RNDIS messages of one SEND_RNDIS_PKT; returns the status
    /// of its completion.
    pub(super) fn on_rndis_pkt(
        &mut self,
        c: &mut Chan,
        pkt: nvsp::SendRndisPkt,
        gpa: bool,
    ) -> Result<u32, RingError> {
        let Some(section) = self.section_of(&pkt) else {
            return Ok(self.refuse_pkt());
        };
        if !self.gather_pieces(gpa) || (section.is_none() && self.gpa_pieces.is_empty()) {
            return Ok(self.refuse_pkt());
        }
        // Borrow the send buffer and the pieces for the walk, then put
        // them back (the walk needs the rest of the NIC mutably).
        let pieces = std::mem::take(&mut self.gpa_pieces);
        let send = self.state.session_mut().and_then(|s| s.send.take());
        let memory = self.memory.clone();
        let bytes = PacketBytes {
            section: section.and_then(|(off, len)| {
                send.as_ref()
                    .and_then(|s| s.map.slice().subslice(off, len).ok())
            }),
            memory: &memory,
            pieces: &pieces,
            len: section.map_or(0, |(_, len)| len) + pieces.iter().map(|p| p.1).sum::<usize>(),
        };
        let r = self.walk_messages(c, &bytes);
        if let Some(s) = self.state.session_mut() {
            s.send = send;
        }
        self.gpa_pieces = pieces;
        Ok(match r? {
            true => nvsp::status::INVALID_RNDIS_PKT,
            false => nvsp::status::SUCCESS,
        })
    }

    fn refuse_pkt(&self) -> u32 {
        self.count(|c| &c.bad_nvsp, 1);
        nvsp::status::FAIL
    }

    /// The (offset, length) of the send-buffer section a packet names:
    /// Some(None) if it names none, None if it names one that is not there.
    fn section_of(&self, pkt: &nvsp::SendRndisPkt) -> Option<Option<(usize, usize)>> {
        let index = pkt.section_index.get();
        if index == nvsp::NO_SECTION {
            return Some(None);
        }
        let send = self.state.session()?.send.as_ref()?;
        let size = pkt.section_size.get();
        if index >= send.sections || size > send.section_size {
            return None;
        }
        let off = index as usize * send.section_size as usize;
        Some(Some((off, size as usize)))
    }

    /// Resolves the packet's GPA-direct ranges into `gpa_pieces`, each
    /// checked to be guest memory; false if one is not.
    fn gather_pieces(&mut self, gpa: bool) -> bool {
        self.gpa_pieces.clear();
        if !gpa {
            return true;
        }
        let mem = &self.memory;
        let pieces = &mut self.gpa_pieces;
        let r: Result<(), vmbus::MemoryError> = self.ranges.for_each_gpa(|g, n| {
            mem.slice(g, n)?;
            pieces.push((g, n));
            Ok(())
        });
        r.is_ok()
    }

    /// Handles every message in `bytes`; Ok(true) if any was malformed.
    fn walk_messages(&mut self, c: &mut Chan, bytes: &PacketBytes<'_>) -> Result<bool, RingError> {
        let mut at = 0usize;
        let mut bad = false;
        while at + rndis::HEADER_SIZE <= bytes.len {
            let mut hb = [0u8; rndis::PACKET_HEADERS];
            let avail = (bytes.len - at).min(hb.len());
            if !bytes.read(at, &mut hb[..avail]) {
                bad = true;
                break;
            }
            let h = rndis::Header::read_from_prefix(&hb).expect("8 bytes").0;
            let len = h.msg_len.get() as usize;
            if len < rndis::HEADER_SIZE || len > bytes.len - at {
                self.count(|c| &c.drop_tx_malformed, 1);
                bad = true;
                break;
            }
            match h.msg_type.get() {
                rndis::msg::PACKET => {
                    if let Err(e) = self.data_message(bytes, at, len, &hb[..avail]) {
                        tracing::debug!(port = self.port.name(), "dropped guest frame: {e}");
                        self.count(|c| &c.drop_tx_malformed, 1);
                        bad = true;
                    }
                }
                t => bad |= !self.control_message(c, bytes, at, len, t)?,
            }
            at += len;
        }
        Ok(bad)
    }

    /// Copies one RNDIS control message out and answers it; false if it
    /// was malformed (counted).
    fn control_message(
        &mut self,
        c: &mut Chan,
        bytes: &PacketBytes<'_>,
        at: usize,
        len: usize,
        msg_type: u32,
    ) -> Result<bool, RingError> {
        if len > MAX_CONTROL_MESSAGE {
            self.count(|c| &c.bad_control, 1);
            return Ok(false);
        }
        let mut m = std::mem::take(&mut self.control_buf);
        m.clear();
        m.resize(len, 0);
        let r = match bytes.read(at, &mut m) {
            true => self.control(c, &m, msg_type),
            false => Ok(false),
        };
        self.control_buf = m;
        if !matches!(r, Ok(true)) {
            self.count(|c| &c.bad_control, 1);
        }
        r
    }

    /// Makes a frame of one PACKET message.
    fn data_message(
        &mut self,
        bytes: &PacketBytes<'_>,
        at: usize,
        len: usize,
        head: &[u8],
    ) -> Result<(), TxError> {
        if len < rndis::PACKET_HEADERS || head.len() < rndis::PACKET_HEADERS {
            return Err(RndisError::BadLength {
                len: len as u32,
                available: bytes.len - at,
            }
            .into());
        }
        let p = rndis::Packet::read_from_bytes(&head[rndis::HEADER_SIZE..]).expect("36 bytes");
        let lay = rndis::packet_layout(&p, len as u32)?;
        let info = self.packet_info(bytes, at, &p, &lay)?;
        let n = lay.data_len;
        if !(MIN_TX_FRAME..=MAX_TX_FRAME).contains(&n) {
            return Err(RndisError::BadFrameLength(n as u32).into());
        }
        let tag = info.vlan.map(rndis::vlan::to_tci).filter(|&t| t != 0);
        let shift = if tag.is_some() { 4 } else { 0 };
        self.make_room(n + shift);
        let start = at + lay.data_offset;
        let chunk = &mut self.chunk;
        let ok = match tag {
            None => bytes.copy_into(start, n, chunk),
            Some(tci) => {
                let macs = bytes.copy_into(start, 12, chunk);
                chunk.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
                chunk.extend_from_slice(&tci.to_be_bytes());
                macs && bytes.copy_into(start + 12, n - 12, chunk)
            }
        };
        if !ok || self.chunk.len() != n + shift {
            self.chunk.clear();
            return Err(RndisError::BadFrameLength(n as u32).into());
        }
        let offload =
            tx_offload(&mut self.chunk, &info, shift).inspect_err(|_| self.chunk.clear())?;
        let data = self.chunk.split().freeze();
        self.frames.push(Frame { data, offload });
        Ok(())
    }

    /// The message's PPIs (none if it has no PPI area).
    fn packet_info(
        &self,
        bytes: &PacketBytes<'_>,
        at: usize,
        p: &rndis::Packet,
        lay: &rndis::PacketLayout,
    ) -> Result<PacketInfo, RndisError> {
        if lay.ppi_len == 0 {
            return Ok(PacketInfo::default());
        }
        let bad = RndisError::BadPpiArea {
            offset: p.per_pkt_info_offset.get(),
            len: p.per_pkt_info_len.get(),
        };
        let mut area = [0u8; MAX_PPI_AREA];
        if lay.ppi_len > MAX_PPI_AREA || !bytes.read(at + lay.ppi_offset, &mut area[..lay.ppi_len])
        {
            return Err(bad);
        }
        rndis::parse_ppis(&area[..lay.ppi_len])
    }

    /// Makes sure the chunk has room for `len` more bytes, reclaiming it
    /// when every frame cut from it is gone.
    fn make_room(&mut self, len: usize) {
        debug_assert!(self.chunk.is_empty());
        if self.chunk.capacity() >= len || self.chunk.try_reclaim(len.max(CHUNK / 2)) {
            return;
        }
        self.chunk = BytesMut::with_capacity(CHUNK.max(len));
    }
}

/// Offload state of a frame from the guest's PPIs, fixing what the guest
/// leaves for the host on LSO. `shift` is 4 when a VLAN tag was inserted.
pub(super) fn tx_offload(
    frame: &mut [u8],
    info: &PacketInfo,
    shift: usize,
) -> Result<Offload, TxOffloadError> {
    let l3 = ETH_HLEN + shift;
    let ethertype = u16::from_be_bytes([frame[l3 - 2], frame[l3 - 1]]);
    if let Some(v) = info.lso {
        return lso_offload(frame, v, l3, ethertype, shift);
    }
    let Some(v) = info.csum else {
        return Ok(Offload::default());
    };
    use rndis::csum_tx;
    if v & csum_tx::IP_HEADER != 0 && v & csum_tx::IS_IPV4 != 0 && ethertype == ETHERTYPE_IPV4 {
        Ipv4Hdr::fill_checksum(&mut frame[l3..])?;
    }
    let offset = if v & csum_tx::TCP != 0 {
        16
    } else if v & csum_tx::UDP != 0 {
        6
    } else {
        return Ok(Offload::default());
    };
    let start = usize::from(csum_tx::header_offset(v)) + shift;
    if start < l3 || start + offset + 2 > frame.len() {
        return Err(TxOffloadError::BadOffset(start));
    }
    Ok(Offload {
        csum: Some(PartialCsum {
            start: start as u16,
            offset: offset as u16,
        }),
        gso: None,
    })
}

/// An LSOv2 frame: fixes its IP lengths (and IPv4 header checksum) and puts
/// the pseudo-header sum with the whole TCP length in the TCP checksum, as
/// GSO senders leave it.
fn lso_offload(
    frame: &mut [u8],
    v: u32,
    l3: usize,
    ethertype: u16,
    shift: usize,
) -> Result<Offload, TxOffloadError> {
    let mss = rndis::lso::mss(v);
    let tcp = usize::from(rndis::lso::tcp_header_offset(v)) + shift;
    if mss == 0 || mss > u32::from(u16::MAX) {
        return Err(TxOffloadError::BadMss(mss));
    }
    if tcp < l3 || tcp + 20 > frame.len() {
        return Err(TxOffloadError::BadOffset(tcp));
    }
    let kind = if rndis::lso::is_ipv6(v) {
        fix_ipv6_length(frame, l3, tcp, ethertype)?;
        GsoKind::Tcp6
    } else {
        fix_ipv4_header(frame, l3, tcp, ethertype)?;
        GsoKind::Tcp4
    };
    let pseudo = fold(tcp_pseudo_sum(&frame[l3..], kind, frame.len() - tcp));
    frame[tcp + 16..tcp + 18].copy_from_slice(&pseudo.to_be_bytes());
    Ok(Offload {
        csum: Some(PartialCsum {
            start: tcp as u16,
            offset: 16,
        }),
        gso: Some(Gso {
            kind,
            mss: mss as u16,
            ecn: false,
        }),
    })
}

fn fix_ipv6_length(
    frame: &mut [u8],
    l3: usize,
    tcp: usize,
    ethertype: u16,
) -> Result<(), TxOffloadError> {
    let len = frame.len();
    if ethertype != ETHERTYPE_IPV6 || tcp < l3 + 40 {
        return Err(TxOffloadError::NotTcp);
    }
    let (ip, _) = Ipv6Hdr::mut_from_prefix(&mut frame[l3..]).map_err(|_| TxOffloadError::NotTcp)?;
    if ip.ver_tc_flow.get() >> 28 != 6 {
        return Err(TxOffloadError::NotTcp);
    }
    let payload = u16::try_from(len - l3 - 40).map_err(|_| TxOffloadError::TooLong)?;
    ip.payload_len.set(payload);
    Ok(())
}

fn fix_ipv4_header(
    frame: &mut [u8],
    l3: usize,
    tcp: usize,
    ethertype: u16,
) -> Result<(), TxOffloadError> {
    let len = frame.len();
    let (ip, _) = Ipv4Hdr::mut_from_prefix(&mut frame[l3..]).map_err(|_| TxOffloadError::NotTcp)?;
    let ihl = ip.header_len();
    if ethertype != ETHERTYPE_IPV4
        || ip.ver_ihl >> 4 != 4
        || ihl < 20
        || l3 + ihl > tcp
        || ip.proto != IPPROTO_TCP
    {
        return Err(TxOffloadError::NotTcp);
    }
    ip.total_len
        .set(u16::try_from(len - l3).map_err(|_| TxOffloadError::TooLong)?);
    Ok(Ipv4Hdr::fill_checksum(&mut frame[l3..])?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::ones_sum;
    use crate::testing::{eth, ipv4};
    use crate::wire::MacAddr;

    /// An IPv4 TCP frame (20-byte TCP header) with `payload` zero bytes,
    /// its IP length and checksum left zero as an LSO sender leaves them.
    fn ipv4_tcp_frame(payload: usize) -> Vec<u8> {
        let mut tcp = vec![0u8; 20 + payload];
        tcp[12] = 0x50;
        let mut ip = ipv4([10, 0, 0, 1], [10, 0, 0, 2], IPPROTO_TCP, &tcp);
        ip[2..4].fill(0);
        ip[10..12].fill(0);
        eth(MacAddr::default(), MacAddr::default(), ETHERTYPE_IPV4, &ip)
    }

    #[test]
    fn lso_frames_get_lengths_and_checksums_fixed() {
        let mut f = ipv4_tcp_frame(3000);
        let info = PacketInfo {
            lso: Some(rndis::lso::encode(1448, 34, false)),
            ..Default::default()
        };
        let o = tx_offload(&mut f, &info, 0).unwrap();
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 3040);
        assert_eq!(
            fold(ones_sum(&f[14..34], 0)),
            0xffff,
            "IPv4 header checksum"
        );
        let g = o.gso.unwrap();
        assert_eq!((g.kind, g.mss), (GsoKind::Tcp4, 1448));
        assert_eq!(
            o.csum,
            Some(PartialCsum {
                start: 34,
                offset: 16
            })
        );
        // The TCP checksum field holds the pseudo-header sum with length:
        // completing it over the segment must verify.
        let mut seg = f.clone();
        let v = !fold(ones_sum(&seg[34..], 0));
        seg[50..52].copy_from_slice(&v.to_be_bytes());
        let verify = fold(ones_sum(
            &seg[34..],
            ones_sum(&seg[26..34], 6 + (seg.len() - 34) as u64),
        ));
        assert_eq!(verify, 0xffff);
        // Bad LSO: header offset past the frame, zero MSS, IPv6 on IPv4, UDP.
        let mut f = ipv4_tcp_frame(10);
        let bad = |v| PacketInfo {
            lso: Some(v),
            ..Default::default()
        };
        assert_eq!(
            tx_offload(&mut f, &bad(rndis::lso::encode(1448, 60, false)), 0),
            Err(TxOffloadError::BadOffset(60))
        );
        assert_eq!(
            tx_offload(&mut f, &bad(rndis::lso::encode(0, 34, false)), 0),
            Err(TxOffloadError::BadMss(0))
        );
        assert_eq!(
            tx_offload(&mut f, &bad(rndis::lso::encode(1448, 34, true)), 0),
            Err(TxOffloadError::NotTcp)
        );
        f[23] = crate::wire::IPPROTO_UDP;
        assert_eq!(
            tx_offload(&mut f, &bad(rndis::lso::encode(1448, 34, false)), 0),
            Err(TxOffloadError::NotTcp)
        );
    }

    #[test]
    fn checksum_ppi_becomes_partial_checksum() {
        let mut f = ipv4_tcp_frame(100);
        let v = rndis::csum_tx::IS_IPV4 | rndis::csum_tx::TCP | 34 << 16;
        let info = PacketInfo {
            csum: Some(v),
            ..Default::default()
        };
        let o = tx_offload(&mut f, &info, 0).unwrap();
        assert_eq!(
            o.csum,
            Some(PartialCsum {
                start: 34,
                offset: 16
            })
        );
        assert!(o.gso.is_none());
        // With a VLAN tag inserted, offsets move by 4.
        let mut t = f[..12].to_vec();
        t.extend_from_slice(&[0x81, 0, 0, 5]);
        t.extend_from_slice(&f[12..]);
        let o = tx_offload(&mut t, &info, 4).unwrap();
        assert_eq!(o.csum.unwrap().start, 38);
        let udp = rndis::csum_tx::IS_IPV4 | rndis::csum_tx::UDP | 34 << 16;
        let o = tx_offload(
            &mut f,
            &PacketInfo {
                csum: Some(udp),
                ..Default::default()
            },
            0,
        )
        .unwrap();
        assert_eq!(o.csum.unwrap().offset, 6);
        let past = rndis::csum_tx::TCP | 150 << 16;
        let info = PacketInfo {
            csum: Some(past),
            ..Default::default()
        };
        assert_eq!(
            tx_offload(&mut f, &info, 0),
            Err(TxOffloadError::BadOffset(150))
        );
        // An IP header checksum the guest asks for is filled in.
        let mut f = ipv4_tcp_frame(10);
        let ip = rndis::csum_tx::IS_IPV4 | rndis::csum_tx::IP_HEADER;
        let info = PacketInfo {
            csum: Some(ip),
            ..Default::default()
        };
        tx_offload(&mut f, &info, 0).unwrap();
        assert_eq!(fold(ones_sum(&f[14..34], 0)), 0xffff);
    }
}
