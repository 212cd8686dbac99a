//! Host tap device port (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).
//!
//! Every frame read or written carries a 10-byte `virtio_net_hdr`. With
//! offloads on, TUNSETOFFLOAD lets the kernel hand us partial checksums and
//! TCP GSO frames up to 64 KiB, which the switch forwards whole to ports that
//! take them (another tap writes them back with the same header); with
//! offloads off the kernel segments and checksums before we read, and the
//! switch does it in software for frames bound here.
//!
//! Receive buffers: frames are read into one large `BytesMut` chunk and split
//! off as `Bytes` without copying. Once every frame of the chunk has been
//! sent and dropped the chunk is reclaimed in place, so the steady state
//! allocates nothing; a chunk still referenced (frames queued elsewhere) is
//! left to its readers and a new one allocated.

use crate::frame::{Delivery, Frame, Gso, GsoKind, Offload, OffloadCaps, PartialCsum};
use crate::port::Port;
use crate::sys::{self, TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6};
use crate::wire::{VirtioNetHdr, vnet};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::fs::File;
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsFd, BorrowedFd};
use zerocopy::{FromBytes, IntoBytes};

const VNET_HDR_LEN: usize = size_of::<VirtioNetHdr>();
/// Room for the largest frame a tap hands over: header + 64 KiB GSO frame
/// + Ethernet and VLAN headers.
const MAX_READ: usize = VNET_HDR_LEN + 65_536 + 64;
/// Alignment of every frame in the receive chunk.
const ALIGN: usize = 64;
/// Receive chunk size: a batch of large frames fits in one chunk.
const CHUNK: usize = 32 * MAX_READ;

/// A tap device attached to a switch.
#[derive(Debug)]
pub struct TapPort {
    file: File,
    offloads: bool,
    buf: BytesMut,
}

impl TapPort {
    /// Opens (creating if needed) tap `ifname`; `offloads` negotiates
    /// checksum and TSO offloads with the kernel.
    pub fn open(ifname: &str, offloads: bool) -> io::Result<Self> {
        let flags = if offloads {
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        } else {
            0
        };
        let file = sys::open_tap(ifname, flags)
            .map_err(|e| io::Error::new(e.kind(), format!("tap {ifname}: {e}")))?;
        Ok(TapPort {
            file,
            offloads,
            buf: BytesMut::with_capacity(CHUNK),
        })
    }

    /// Makes room for one more read, starting on a cache line (the kernel's
    /// copy is fastest to an aligned destination); false when the batch
    /// should end first so the frames already read can be sent and the
    /// chunk reclaimed.
    fn make_room(&mut self, batch_empty: bool) -> bool {
        let room = MAX_READ + ALIGN;
        if self.buf.capacity() < room && !self.buf.try_reclaim(room) {
            if !batch_empty {
                return false;
            }
            self.buf = BytesMut::with_capacity(CHUNK);
        }
        let pad = self.buf.as_ptr().align_offset(ALIGN);
        self.buf.put_bytes(0, pad);
        self.buf.advance(pad);
        true
    }
}

/// The frame `data` described by virtio_net_hdr `hdr`, or None if the
/// header is short or inconsistent with the frame.
pub fn frame_from_vnet(hdr: &[u8], data: Bytes) -> Option<Frame> {
    let hdr = VirtioNetHdr::read_from_bytes(hdr).ok()?;
    let csum = if hdr.flags & vnet::F_NEEDS_CSUM != 0 {
        let c = PartialCsum {
            start: hdr.csum_start.get(),
            offset: hdr.csum_offset.get(),
        };
        if usize::from(c.start) + usize::from(c.offset) + 2 > data.len() {
            return None;
        }
        Some(c)
    } else {
        None
    };
    let kind = match hdr.gso_type & !vnet::GSO_ECN {
        vnet::GSO_NONE => None,
        vnet::GSO_TCPV4 => Some(GsoKind::Tcp4),
        vnet::GSO_TCPV6 => Some(GsoKind::Tcp6),
        _ => return None,
    };
    let gso = match kind {
        Some(kind) if hdr.gso_size.get() > 0 && csum.is_some() => Some(Gso {
            kind,
            mss: hdr.gso_size.get(),
            ecn: hdr.gso_type & vnet::GSO_ECN != 0,
        }),
        Some(_) => return None,
        None => None,
    };
    Some(Frame {
        data,
        offload: Offload { csum, gso },
    })
}

/// The virtio_net_hdr describing a delivery's offloads.
pub fn vnet_hdr_for(d: &Delivery) -> VirtioNetHdr {
    let mut hdr = VirtioNetHdr::default();
    let off = d.out_offload();
    if let Some(c) = off.csum {
        hdr.flags = vnet::F_NEEDS_CSUM;
        hdr.csum_start.set(c.start);
        hdr.csum_offset.set(c.offset);
    }
    if let (Some(g), Some(c)) = (off.gso, d.offload.csum) {
        hdr.gso_type = match g.kind {
            GsoKind::Tcp4 => vnet::GSO_TCPV4,
            GsoKind::Tcp6 => vnet::GSO_TCPV6,
        } | if g.ecn { vnet::GSO_ECN } else { 0 };
        hdr.gso_size.set(g.mss);
        // Headers end after the TCP header (data offset at byte 12 of TCP).
        let doff = d
            .data
            .get(usize::from(c.start) + 12)
            .map_or(20, |b| usize::from(b >> 4) * 4);
        let out_start = usize::from(off.csum.map_or(0, |c| c.start));
        hdr.hdr_len.set((out_start + doff) as u16);
    }
    hdr
}

impl Port for TapPort {
    fn recv_batch(&mut self, batch: &mut Vec<Frame>, max: usize) -> io::Result<usize> {
        let mut bad = 0;
        let start = batch.len();
        while batch.len() - start < max && self.make_room(batch.len() == start) {
            let mut hdr = [0u8; VNET_HDR_LEN];
            match sys::readv_into(&self.file, &mut hdr, &mut self.buf) {
                Ok(_) => match frame_from_vnet(&hdr, self.buf.split().freeze()) {
                    Some(frame) => batch.push(frame),
                    None => bad += 1,
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(bad)
    }

    fn send_batch(&mut self, frames: &mut Vec<Delivery>) -> io::Result<usize> {
        let mut failed = 0;
        for d in frames.drain(..) {
            let hdr = vnet_hdr_for(&d);
            let mut tag = [0u8; 4];
            let [head, tag, rest] = d.parts(&mut tag);
            let iov = [
                IoSlice::new(hdr.as_bytes()),
                IoSlice::new(head),
                IoSlice::new(tag),
                IoSlice::new(rest),
            ];
            if (&self.file).write_vectored(&iov).is_err() {
                failed += 1;
            }
        }
        Ok(failed)
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    fn caps(&self) -> OffloadCaps {
        if self.offloads {
            OffloadCaps::ALL
        } else {
            OffloadCaps::NONE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_from(hdr: [u8; 10], frame_len: usize) -> Option<Frame> {
        frame_from_vnet(&hdr, Bytes::from(vec![0u8; frame_len]))
    }

    #[test]
    fn reads_offload_state_from_vnet_header() {
        let f = frame_from([1, 0x81, 66, 0, 0xa8, 5, 34, 0, 16, 0], 3000).unwrap();
        assert_eq!(f.data.len(), 3000);
        assert_eq!(
            f.offload.csum,
            Some(PartialCsum {
                start: 34,
                offset: 16
            })
        );
        assert_eq!(
            f.offload.gso,
            Some(Gso {
                kind: GsoKind::Tcp4,
                mss: 1448,
                ecn: true
            })
        );
        let plain = frame_from([0; 10], 60).unwrap();
        assert_eq!(plain.offload, Offload::default());
    }

    #[test]
    fn rejects_inconsistent_vnet_headers() {
        // Checksum offset past the frame.
        assert!(frame_from([1, 0, 0, 0, 0, 0, 50, 0, 16, 0], 60).is_none());
        // UDP fragmentation offload (never negotiated).
        assert!(frame_from([1, 3, 0, 0, 0, 5, 34, 0, 6, 0], 3000).is_none());
        // GSO without segment size, or without partial checksum.
        assert!(frame_from([1, 1, 0, 0, 0, 0, 34, 0, 16, 0], 3000).is_none());
        assert!(frame_from([0, 1, 0, 0, 0, 5, 0, 0, 0, 0], 3000).is_none());
        // Shorter than the header.
        assert!(frame_from_vnet(&[0; 5], Bytes::from_static(&[0; 60])).is_none());
    }

    #[test]
    fn writes_vnet_header_for_tag_rewrites() {
        let mut data = vec![0u8; 18 + 20 + 32 + 100];
        data[18 + 20 + 12] = 0x80; // TCP data offset 32 bytes
        let d = Delivery {
            data: Bytes::from(data),
            offload: Offload {
                csum: Some(PartialCsum {
                    start: 38,
                    offset: 16,
                }),
                gso: Some(Gso {
                    kind: GsoKind::Tcp4,
                    mss: 1000,
                    ecn: false,
                }),
            },
            strip_tag: true,
            tag: None,
        };
        let h = vnet_hdr_for(&d);
        assert_eq!(h.flags, vnet::F_NEEDS_CSUM);
        assert_eq!(h.gso_type, vnet::GSO_TCPV4);
        assert_eq!(h.gso_size.get(), 1000);
        assert_eq!(h.csum_start.get(), 34);
        assert_eq!(h.csum_offset.get(), 16);
        assert_eq!(h.hdr_len.get(), 34 + 32);
    }
}
