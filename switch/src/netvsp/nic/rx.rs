//! The receive path (switch to guest): draining the frames the switch
//! queued for the port, picking each one's channel (RSS), copying it once
//! into the receive buffer behind its RNDIS header and PPIs (VLAN tag,
//! checksum result, hash), completing its partial checksum on the copy,
//! and sending one transfer-page packet per channel. Frames the guest
//! cannot take now (no receive buffer, RNDIS not initialised, packet
//! filter 0, link down, buffer or ring full) are dropped and counted; the
//! switch is never blocked.

use vmbus::packet::write_transfer_pages;
use vmbus::ring::WriteError;
use vmbus::wire::PACKET_FLAG_COMPLETION_REQUESTED;

use super::{Chan, DRAIN_BATCH, MAX_RANGES, NicCore};
use crate::Delivery;
use crate::netvsp::nvsp;
use crate::netvsp::rndis::{self, PacketInfo};
use crate::netvsp::rss::flow_hash;
use crate::offload::partial_csum_value;
use crate::wire::ETHERTYPE_VLAN;

/// What a pass's frames for the guest are checked against.
#[derive(Debug, Clone, Copy)]
struct Accept {
    filter: u32,
    mac: [u8; 6],
    /// Largest untagged frame.
    max_frame: usize,
    /// The guest takes VLAN tags as 802.1Q PPIs.
    vlan_ppi: bool,
}

impl Accept {
    /// Whether the packet filter takes a frame for `dst`.
    fn takes(&self, dst: &[u8]) -> bool {
        use rndis::filter::*;
        let f = self.filter;
        if f & PROMISCUOUS != 0 {
            return true;
        }
        if dst == [0xff; 6] {
            f & BROADCAST != 0
        } else if dst[0] & 1 != 0 {
            f & (MULTICAST | ALL_MULTICAST) != 0
        } else {
            f & DIRECTED != 0 && dst == self.mac
        }
    }
}

fn usable(c: &Option<Chan>) -> bool {
    c.as_ref().is_some_and(|c| !c.dead)
}

impl NicCore {
    /// Moves queued frames into the guest's receive buffer.
    pub(super) fn deliver(&mut self, chans: &mut [Option<Chan>]) -> bool {
        if self.port.drain(&mut self.out, DRAIN_BATCH) == 0 {
            return false;
        }
        let mut out = std::mem::take(&mut self.out);
        let accept = Accept {
            filter: self.state.filter(),
            mac: self.settings.mac,
            max_frame: self.max_rx_frame(),
            vlan_ppi: self.vlan_ppi(),
        };
        // A non-zero filter means a receive buffer and an initialised device.
        if accept.filter == 0 || !self.dev.link_up() {
            self.count(|c| &c.drop_rx_not_ready, out.len() as u64);
        } else {
            self.pick_channels(&out, chans);
            // One channel at a time, so each packet's messages are
            // contiguous in the receive buffer and packets go in flight in
            // ring order.
            for (ci, slot) in chans.iter_mut().enumerate() {
                let Some(c) = slot.as_mut().filter(|c| !c.dead) else {
                    continue;
                };
                for (i, d) in out.iter().enumerate() {
                    let (pc, hash) = self.rx_channels[i];
                    if usize::from(pc) == ci {
                        self.deliver_one(c, d, hash, &accept);
                    }
                }
                if !c.ranges.is_empty() {
                    self.flush_data(c);
                }
            }
        }
        out.clear();
        self.out = out;
        true
    }

    /// Picks each frame's channel: the flow hash through the guest's
    /// indirection table (channel 0 without RSS or sub-channels).
    fn pick_channels(&mut self, out: &[Delivery], chans: &[Option<Chan>]) {
        let open = chans.iter().filter(|c| usable(c)).count();
        self.rx_channels.clear();
        for d in out {
            let (mut ci, mut hash) = (0u16, None);
            if open > 1
                && let Some(h) = flow_hash(self.settings.rss.as_ref(), &d.data)
            {
                hash = Some(h);
                let want = match &self.settings.rss {
                    Some(r) => r.channel(h).unwrap_or(h as usize % open),
                    None => h as usize % open,
                };
                if chans.get(want).is_some_and(usable) {
                    ci = want as u16;
                }
            }
            self.rx_channels.push((ci, hash));
        }
        if !chans.first().is_some_and(usable) {
            let lost = self.rx_channels.iter().filter(|p| p.0 == 0).count();
            self.count(|c| &c.drop_rx_not_ready, lost as u64);
        }
    }

    fn deliver_one(&mut self, c: &mut Chan, d: &Delivery, hash: Option<u32>, accept: &Accept) {
        let mut tag_buf = [0u8; 4];
        let [macs, tag, rest] = d.parts(&mut tag_buf);
        // The guest gets untagged frames with the tag in a PPI.
        let (tci, body) = if tag.len() == 4 {
            (Some(u16::from_be_bytes([tag[2], tag[3]])), rest)
        } else if rest.len() >= 4 && rest[..2] == ETHERTYPE_VLAN.to_be_bytes() {
            (Some(u16::from_be_bytes([rest[2], rest[3]])), &rest[4..])
        } else {
            (None, rest)
        };
        if !accept.takes(&macs[..6]) {
            self.count(|c| &c.drop_rx_filtered, 1);
            return;
        }
        if 12 + body.len() > accept.max_frame {
            self.count(|c| &c.drop_rx_oversize, 1);
            return;
        }
        // A guest that did not ask for 802.1Q PPIs gets the tag in the frame.
        let inline_tag = tci.filter(|_| !accept.vlan_ppi);
        let tag_len = if inline_tag.is_some() { 4 } else { 0 };
        let frame_len = 12 + tag_len + body.len();
        let mut info = PacketInfo {
            vlan: tci
                .filter(|_| inline_tag.is_none())
                .map(rndis::vlan::from_tci),
            hash,
            ..Default::default()
        };
        // The body of `d.data` starts 12 bytes (untagged) or 16 bytes in.
        let body_from = d.data.len() - body.len();
        let mut csum_fix = None;
        if let Some(pc) = d.offload.csum {
            let start = usize::from(pc.start);
            let value = match partial_csum_value(&d.data, pc) {
                Ok(v) if start >= body_from => v,
                _ => {
                    self.count(|c| &c.drop_rx_oversize, 1);
                    return;
                }
            };
            let at = start + usize::from(pc.offset);
            csum_fix = Some((12 + tag_len + at - body_from, value));
            info.csum = Some(match pc.offset {
                6 => rndis::csum_rx::UDP_SUCCEEDED | rndis::csum_rx::IP_SUCCEEDED,
                _ => rndis::csum_rx::TCP_SUCCEEDED | rndis::csum_rx::IP_SUCCEEDED,
            });
        }
        if !c.outbox.is_empty() {
            // Replies wait for the ring: so do frames, which are dropped.
            self.count(|c| &c.drop_rx_ring_full, 1);
            return;
        }
        if c.ranges.len() == MAX_RANGES {
            self.flush_data(c);
        }
        let Some(rx) = self.state.rx_mut() else {
            self.count(|c| &c.drop_rx_not_ready, 1);
            return;
        };
        if c.ranges.is_empty() && rx.ring.table_full() {
            self.count(|c| &c.drop_rx_no_buffer, 1);
            return;
        }
        let mut hdr = [0u8; 96];
        let hlen = rndis::write_packet_headers(&mut hdr, frame_len, &info);
        let msg_len = (hlen + frame_len) as u32;
        let Some(off) = rx.ring.alloc(msg_len) else {
            self.count(|c| &c.drop_rx_no_buffer, 1);
            return;
        };
        let buf = rx.recv.map.slice();
        let o = off as usize;
        let _ = buf.write_at(o, &hdr[..hlen]);
        let _ = buf.write_at(o + hlen, macs);
        if let Some(tci) = inline_tag {
            let mut t = [0x81, 0x00, 0, 0];
            t[2..].copy_from_slice(&tci.to_be_bytes());
            let _ = buf.write_at(o + hlen + 12, &t);
        }
        let _ = buf.write_at(o + hlen + 12 + tag_len, body);
        if let Some((at, v)) = csum_fix {
            let _ = buf.write_at(o + hlen + at, &v.to_be_bytes());
        }
        c.ranges.push((msg_len, off));
    }

    /// Sends the data packet a channel has been building.
    fn flush_data(&mut self, c: &mut Chan) {
        let Some(rx) = self.state.rx_mut() else {
            c.ranges.clear();
            return;
        };
        let tid = rx.ring.next_tid();
        let payload = nvsp::rndis_pkt_payload(nvsp::channel_type::DATA);
        let r = write_transfer_pages(
            &mut c.ch.outgoing,
            tid,
            PACKET_FLAG_COMPLETION_REQUESTED,
            nvsp::RECV_BUFFER_ID,
            &c.ranges,
            &payload,
        );
        let n = c.ranges.len() as u64;
        c.ranges.clear();
        match r {
            Ok(()) => {
                rx.ring.commit();
                self.count(|c| &c.rx_packets, 1);
            }
            Err(e) => {
                rx.ring.rollback();
                self.count(|c| &c.drop_rx_ring_full, n);
                if let WriteError::Ring(e) = e {
                    self.fail(c, e);
                }
            }
        }
    }
}
