//! Fuzz harness for the network VSP's NVSP and RNDIS handling, shared by
//! `switch/fuzz` (target `netvsp`) and the proptests below. It runs the
//! real NIC code over private rings: a valid initialisation (NVSP INIT,
//! buffers, RNDIS INIT) followed by packets and send-buffer sections built
//! from the input, and frames from another switch port towards the guest.
//! Nothing may panic, and everything the host writes back must be well
//! formed: every range inside the receive buffer and no longer than the
//! sub-allocation size, every completion at least 8 bytes.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use bytes::Bytes;
use vmbus::SharedMemory;
use vmbus::channel::Channel;
use vmbus::event::EventFd;
use vmbus::gpadl::{GpadlBuilder, gpadl_messages};
use vmbus::packet::{TransferPages, write_gpa_direct};
use vmbus::ring::{IncomingRing, private_pair};
use vmbus::server::{ControlHandle, GpadlMap};
use vmbus::wire::{PACKET_FLAG_COMPLETION_REQUESTED, packet_type};
use vmbus::worker::StopToken;
use zerocopy::IntoBytes;

use super::nic::{Chan, Nic};
use super::nvsp::{self, NvspMessage};
use super::rndis;
use super::{DeviceShared, NetvspConfig, NetvspCounters};
use crate::wire::MacAddr;
use crate::{Frame, Offload, OffloadCaps, PartialCsum, PortSpec, Switch};

const PAGES: u64 = 64;
const RECV_FIRST: u64 = 8;
const RECV_PAGES: u64 = 16;
const SEND_FIRST: u64 = 24;
const SEND_PAGES: u64 = 6;
pub(super) const DIRECT_PAGE: u64 = 40;
pub(super) const RECV_GPADL: u32 = 0x100;
pub(super) const SEND_GPADL: u32 = 0x101;
/// Input bytes per packet.
const CHUNK: usize = 48;
pub(super) const MAC: MacAddr = MacAddr([2, 0, 0, 0, 0, 0x11]);

/// A guest's memory with its receive and send buffers as GPADLs.
pub(super) struct Fixture {
    pub memory: SharedMemory,
    pub gpadls: GpadlMap,
}

pub(super) fn fixture() -> Fixture {
    let (memory, _fd) = SharedMemory::create(PAGES * 4096).expect("memfd");
    let gpadls = GpadlMap::default();
    for (id, first, n) in [
        (RECV_GPADL, RECV_FIRST, RECV_PAGES),
        (SEND_GPADL, SEND_FIRST, SEND_PAGES),
    ] {
        // The receive buffer's pages are scrambled, as a guest's vmalloc
        // buffer would be.
        let mut pfns: Vec<u64> = (first..first + n).collect();
        if id == RECV_GPADL {
            pfns.reverse();
        }
        let msgs = gpadl_messages(1, id, &pfns);
        let mut b = GpadlBuilder::start(&msgs[0]).expect("header");
        for m in &msgs[1..] {
            b.add_body(m).expect("body");
        }
        gpadls.insert(b.finish(&memory).expect("gpadl"));
    }
    Fixture { memory, gpadls }
}

/// Writes `m` in-band, wanting a completion; false if the ring is full.
pub(super) fn nvsp_packet(out: &mut vmbus::ring::OutgoingRing, tid: u64, m: &NvspMessage) -> bool {
    out.write_packet(
        packet_type::DATA_INBAND,
        PACKET_FLAG_COMPLETION_REQUESTED,
        tid,
        &[],
        m.as_bytes(),
    )
    .is_ok()
}

/// The NVSP packets of a well-behaved guest's initialisation.
fn init_sequence(out: &mut vmbus::ring::OutgoingRing, memory: &SharedMemory) {
    let init = NvspMessage::new(
        nvsp::msg::INIT,
        &nvsp::Init {
            min_version: nvsp::version::V61.into(),
            max_version: nvsp::version::V61.into(),
        },
    );
    nvsp_packet(out, 1, &init);
    for (tid, t, gpadl, id) in [
        (
            2,
            nvsp::msg::SEND_RECV_BUF,
            RECV_GPADL,
            nvsp::RECV_BUFFER_ID,
        ),
        (3, nvsp::msg::SEND_SEND_BUF, SEND_GPADL, 0),
    ] {
        let m = NvspMessage::new(
            t,
            &nvsp::SendBuffer {
                gpadl: gpadl.into(),
                id: id.into(),
            },
        );
        nvsp_packet(out, tid, &m);
    }
    // RNDIS INIT and a packet filter, GPA-direct from the direct page.
    let init = super::client::rndis_message(
        rndis::msg::INIT,
        rndis::InitRequest {
            req_id: 1.into(),
            major: 1.into(),
            minor: 0.into(),
            max_xfer_size: 0x4000.into(),
        }
        .as_bytes(),
        &[],
    );
    let filter = super::client::oid_message(
        rndis::msg::SET,
        2,
        rndis::oid::GEN_CURRENT_PACKET_FILTER,
        &rndis::filter::PROMISCUOUS.to_le_bytes(),
    );
    let mut both = init.clone();
    both.extend_from_slice(&filter);
    let page = memory
        .slice(DIRECT_PAGE * 4096, both.len())
        .expect("direct page");
    page.write_at(0, &both).expect("fits");
    let m = NvspMessage::new(
        nvsp::msg::SEND_RNDIS_PKT,
        &nvsp::SendRndisPkt {
            channel_type: 1.into(),
            section_index: nvsp::NO_SECTION.into(),
            section_size: 0.into(),
        },
    );
    let _ = write_gpa_direct(
        out,
        4,
        PACKET_FLAG_COMPLETION_REQUESTED,
        &[(both.len() as u32, 0, &[DIRECT_PAGE])],
        m.as_bytes(),
    );
}

/// Picks an NVSP message type from a byte: mostly known ones.
fn msg_type(b: u8) -> u32 {
    const KNOWN: [u32; 12] = [
        nvsp::msg::SEND_RNDIS_PKT,
        nvsp::msg::SEND_RNDIS_PKT,
        nvsp::msg::SEND_RNDIS_PKT,
        nvsp::msg::SEND_RNDIS_PKT_COMPLETE,
        nvsp::msg::INIT,
        nvsp::msg::SEND_NDIS_VER,
        nvsp::msg::SEND_NDIS_CONFIG,
        nvsp::msg::SEND_RECV_BUF,
        nvsp::msg::SEND_SEND_BUF,
        nvsp::msg::REVOKE_RECV_BUF,
        nvsp::msg::SUBCHANNEL,
        nvsp::msg::REVOKE_SEND_BUF,
    ];
    if b < 240 {
        KNOWN[usize::from(b) % KNOWN.len()]
    } else {
        u32::from(b)
    }
}

/// Runs the NIC over input `data`: byte 0 times 32 is the length of the
/// part that fills the send buffer and the direct pages (RNDIS messages
/// for sections and ranges to point at); the rest is cut into 48-byte
/// packet descriptions. Returns the packets the host wrote back.
pub fn packets(data: &[u8]) -> usize {
    let f = fixture();
    let (sections, script) = match data.split_first() {
        Some((&n, rest)) => rest.split_at((usize::from(n) * 32).min(rest.len())),
        None => (&[][..], &[][..]),
    };
    let send = f
        .memory
        .slice(SEND_FIRST * 4096, (SEND_PAGES * 4096) as usize)
        .expect("send buffer");
    send.write_at(0, &sections[..sections.len().min(send.len())])
        .expect("fits");
    let (mut to_host, from_guest) = private_pair(32);
    let (to_guest, mut replies) = private_pair(32);
    init_sequence(&mut to_host, &f.memory);
    let direct = f
        .memory
        .slice((DIRECT_PAGE + 1) * 4096, 4096)
        .expect("direct pages");
    direct
        .write_at(0, &sections[..sections.len().min(4096)])
        .expect("fits");
    for (i, c) in script.chunks(CHUNK).enumerate() {
        let mut c = c.to_vec();
        c.resize(CHUNK, 0);
        let tid = 100 + i as u64;
        let mut m = NvspMessage::from_prefix(&c[4..]);
        m.msg_type.set(msg_type(c[1]));
        let ok = match c[0] % 4 {
            0 | 1 => {
                // SEND_RNDIS_PKT-like: small section numbers mostly.
                if m.msg_type.get() == nvsp::msg::SEND_RNDIS_PKT && c[0] & 0x80 == 0 {
                    m.body[4..8].copy_from_slice(&u32::from(c[2] % 5).to_le_bytes());
                    let size = u32::from(u16::from_le_bytes([c[3], c[44]])) % 7000;
                    m.body[8..12].copy_from_slice(&size.to_le_bytes());
                }
                nvsp_packet(&mut to_host, tid, &m)
            }
            2 => {
                let count = u32::from(u16::from_le_bytes([c[2], c[3]])) % 9000;
                let offset = u32::from(c[44]) * 17 % 4096;
                let pages = ((offset + count.max(1)) as usize)
                    .div_ceil(4096)
                    .clamp(1, 4);
                let first = DIRECT_PAGE + 1 + u64::from(c[45] % 3);
                let pfns: Vec<u64> = (first..first + pages as u64).collect();
                write_gpa_direct(
                    &mut to_host,
                    tid,
                    PACKET_FLAG_COMPLETION_REQUESTED,
                    &[(count.max(1), offset, &pfns)],
                    m.as_bytes(),
                )
                .is_ok()
            }
            _ => {
                // A completion of a receive packet, tid from the input.
                let t = u64::from(c[2] % 16);
                to_host
                    .write_completion(t, &nvsp::rndis_pkt_complete(u32::from(c[3])))
                    .is_ok()
            }
        };
        if !ok {
            break;
        }
    }
    if to_host.commit().is_err() {
        return 0;
    }
    let (mut nic, mut peer, _sw) = rig(&f, from_guest, to_guest);
    // Frames towards the guest, some with partial checksums, from the input.
    let mut frames: Vec<Frame> = script
        .chunks(97)
        .map(|c| {
            let mut d = c.to_vec();
            if d.len() >= 6 {
                d[..6].copy_from_slice(&MAC.0);
            }
            let csum = (d.len() > 40 && d[20] & 1 == 1).then(|| PartialCsum {
                start: u16::from(d[21]),
                offset: u16::from(d[22] % 20),
            });
            Frame {
                data: Bytes::from(d),
                offload: Offload { csum, gso: None },
            }
        })
        .collect();
    let mut idle = 0;
    let mut rounds = 0;
    while idle < 2 && rounds < 10_000 {
        rounds += 1;
        if rounds == 2 {
            peer.ingress(&mut frames);
        }
        if nic.poll() {
            idle = 0;
        } else {
            idle += 1;
        }
    }
    check_replies(&mut replies, &f.memory)
}

/// A two-channel NIC over the fixture's memory and these rings, on a
/// switch with one other port (`peer`) to send it frames.
pub(super) fn rig(
    f: &Fixture,
    from_guest: IncomingRing,
    to_guest: vmbus::ring::OutgoingRing,
) -> (Nic, crate::PortHandle, Arc<Switch>) {
    let sw = Switch::new("fuzz", 64, 300);
    let peer = sw
        .add_port(PortSpec::new("peer", OffloadCaps::ALL))
        .expect("port");
    let port = sw
        .add_port(PortSpec::new("nic", super::CAPS))
        .expect("port");
    let dev = Arc::new(DeviceShared {
        config: NetvspConfig {
            channels: 2,
            ..NetvspConfig::new("nic", Default::default(), MAC)
        },
        counters: NetvspCounters::default(),
        link: AtomicBool::new(true),
    });
    let channel = Channel::new(
        from_guest,
        to_guest,
        Arc::new(EventFd::new().expect("eventfd")),
        Arc::new(EventFd::new().expect("eventfd")),
        StopToken::new().expect("stop token"),
    );
    let nic = Nic::new(
        1,
        dev,
        port,
        f.memory.clone(),
        f.gpadls.clone(),
        ControlHandle::detached(1),
        Chan::new(0, 1, channel),
    );
    (nic, peer, sw)
}

/// Reads what the host wrote and checks its shape.
fn check_replies(replies: &mut IncomingRing, _memory: &SharedMemory) -> usize {
    let mut n = 0;
    let mut t = TransferPages::default();
    while let Ok(Some(p)) = replies.read() {
        n += 1;
        match p.desc.packet_type {
            packet_type::COMPLETION => {
                assert!(p.payload().len() >= 8, "completion shorter than 8 bytes");
            }
            packet_type::DATA_USING_TRANSFER_PAGES => {
                t.parse(&p).expect("well-formed transfer-page packet");
                assert_eq!(t.set_id, nvsp::RECV_BUFFER_ID);
                assert!(!t.ranges.is_empty() && t.ranges.len() <= super::nic::MAX_RANGES);
                assert!(
                    p.desc.length as usize <= 4624,
                    "packet larger than 4624 bytes"
                );
                for r in &t.ranges {
                    let (len, off) = (r.byte_count.get() as u64, r.byte_offset.get() as u64);
                    assert!(off + len <= RECV_PAGES * 4096, "range past the buffer");
                    assert!(len <= 4096, "range longer than a sub-allocation");
                }
            }
            packet_type::DATA_INBAND => {}
            other => panic!("unexpected packet type {other}"),
        }
    }
    n
}

/// A harness that feeds RNDIS parsing directly (PPI areas, packet bodies).
pub fn rndis(data: &[u8]) {
    let _ = rndis::parse_ppis(data);
    if let Ok((p, rest)) = <rndis::Packet as zerocopy::FromBytes>::read_from_prefix(data) {
        let len = rest.len() as u32 + 44;
        if let Ok(l) = rndis::packet_layout(&p, len) {
            assert!(l.data_offset + l.data_len <= len as usize);
            assert!(l.ppi_len == 0 || l.ppi_offset + l.ppi_len <= len as usize);
        }
    }
    let _ = super::client::parse_query_complete(data);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn initialisation_is_answered() {
        // No script: INIT, both buffers and the RNDIS messages are answered.
        let n = packets(&[]);
        // 3 NVSP completions, 1 SEND_RNDIS_PKT completion, 2 RNDIS replies.
        assert_eq!(n, 6);
    }

    #[test]
    fn a_section_of_frames_is_taken() {
        // Section 0 holds two RNDIS data messages; the script sends it.
        let mut sections = Vec::new();
        for i in 0..2u8 {
            let mut hdr = [0u8; 96];
            let frame = [i; 60];
            let n = rndis::write_packet_headers(&mut hdr, frame.len(), &Default::default());
            sections.extend_from_slice(&hdr[..n]);
            sections.extend_from_slice(&frame);
        }
        let used = sections.len();
        let mut script = vec![0u8; CHUNK];
        script[0] = 0;
        script[1] = 0; // SEND_RNDIS_PKT
        script[2] = 0; // section 0
        script[3] = used as u8;
        script[44] = (used >> 8) as u8;
        sections.resize(256, 0);
        let mut data = vec![8u8];
        data.extend_from_slice(&sections);
        data.extend_from_slice(&script);
        // The init replies plus the data packet's completion.
        assert_eq!(packets(&data), 7);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn packets_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
            packets(&data);
        }

        #[test]
        fn rndis_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            rndis(&data);
        }
    }
}
