//! A pcap file port: a sink (usually a mirror target) that writes every frame
//! it is given as a classic libpcap record. GSO frames are written whole
//! (the snap length allows 256 KiB), as a capture on a Linux interface with
//! offloads would show them. The file is flushed after every batch, so it is
//! complete up to the last batch whenever a reader opens it.

use crate::frame::{Delivery, Frame, OffloadCaps};
use crate::port::Port;
use crate::wire::{PCAP_LINKTYPE_ETHERNET, PCAP_MAGIC, PcapFileHdr, PcapRecordHdr};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};
use zerocopy::IntoBytes;

/// Largest frame stored whole.
pub const SNAPLEN: u32 = 262_144;

/// Writes frames to a pcap file.
#[derive(Debug)]
pub struct PcapPort {
    out: BufWriter<File>,
}

impl PcapPort {
    /// Creates (truncating) `path` and writes the pcap file header.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = File::create(path)
            .map_err(|e| io::Error::new(e.kind(), format!("pcap {}: {e}", path.display())))?;
        Self::new(file)
    }

    /// A pcap writer over an open file.
    pub fn new(file: File) -> io::Result<Self> {
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let hdr = PcapFileHdr {
            magic: PCAP_MAGIC.into(),
            version_major: 2.into(),
            version_minor: 4.into(),
            thiszone: 0.into(),
            sigfigs: 0.into(),
            snaplen: SNAPLEN.into(),
            linktype: PCAP_LINKTYPE_ETHERNET.into(),
        };
        out.write_all(hdr.as_bytes())?;
        out.flush()?;
        Ok(PcapPort { out })
    }

    fn write_record(&mut self, d: &Delivery, sec: u32, usec: u32) -> io::Result<()> {
        let mut tag = [0u8; 4];
        let len = d.len() as u32;
        let rec = PcapRecordHdr {
            ts_sec: sec.into(),
            ts_usec: usec.into(),
            incl_len: len.min(SNAPLEN).into(),
            orig_len: len.into(),
        };
        self.out.write_all(rec.as_bytes())?;
        let mut left = SNAPLEN as usize;
        for part in d.parts(&mut tag) {
            let n = part.len().min(left);
            self.out.write_all(&part[..n])?;
            left -= n;
        }
        Ok(())
    }
}

impl Port for PcapPort {
    fn recv_batch(&mut self, _batch: &mut Vec<Frame>, _max: usize) -> io::Result<usize> {
        Ok(0)
    }

    fn send_batch(&mut self, frames: &mut Vec<Delivery>) -> io::Result<usize> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (sec, usec) = (now.as_secs() as u32, now.subsec_micros());
        let mut failed = 0;
        for d in frames.drain(..) {
            if self.write_record(&d, sec, usec).is_err() {
                failed += 1;
            }
        }
        self.out.flush()?;
        Ok(failed)
    }

    fn fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn caps(&self) -> OffloadCaps {
        OffloadCaps::ALL
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn writes_header_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.pcap");
        let mut p = PcapPort::create(&path).unwrap();
        let frame: Vec<u8> = (0..60u8).collect();
        let mut batch = vec![Delivery {
            data: Bytes::from(frame.clone()),
            offload: Default::default(),
            strip_tag: false,
            tag: Some(5),
        }];
        assert_eq!(p.send_batch(&mut batch).unwrap(), 0);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 24 + 16 + 64);
        assert_eq!(&bytes[..4], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(&bytes[20..24], &[1, 0, 0, 0], "Ethernet link type");
        assert_eq!(&bytes[24 + 8..24 + 16], &[64, 0, 0, 0, 64, 0, 0, 0]);
        let rec = &bytes[40..];
        assert_eq!(&rec[..12], &frame[..12]);
        assert_eq!(&rec[12..16], &[0x81, 0, 0, 5], "tag inserted");
        assert_eq!(&rec[16..], &frame[12..]);
    }
}
