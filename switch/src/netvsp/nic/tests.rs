//! The NIC's protocol state: each request in a state where it is not valid
//! gets the answer the module docs of `nvsp` and `control` give.

use bytes::Bytes;
use vmbus::MappedPages;
use vmbus::packet::{TransferPages, write_gpa_direct};
use vmbus::ring::{IncomingRing, OutgoingRing, private_pair};
use vmbus::wire::{PACKET_FLAG_COMPLETION_REQUESTED, packet_type};
use zerocopy::{FromBytes, IntoBytes};

use super::Nic;
use crate::netvsp::NetvspStats;
use crate::netvsp::client::oid_message;
use crate::netvsp::fuzz::{
    DIRECT_PAGE, Fixture, MAC, RECV_GPADL, SEND_GPADL, fixture, nvsp_packet, rig,
};
use crate::netvsp::nvsp::{self, NvspMessage};
use crate::netvsp::rndis;
use crate::{Frame, PortHandle, Switch};
use std::sync::Arc;

/// What the host sent back.
#[derive(Debug, PartialEq, Eq)]
enum Back {
    /// A completion: its transaction and NVSP message type and status.
    Completion {
        tid: u64,
        msg_type: u32,
        status: u32,
    },
    /// An RNDIS control message in the receive buffer: its type and status.
    Control {
        msg_type: u32,
        status: u32,
    },
    /// A receive packet with frames.
    Frames(usize),
    Inband,
}

struct Guest {
    f: Fixture,
    to_host: OutgoingRing,
    replies: IncomingRing,
    nic: Nic,
    peer: PortHandle,
    _switch: Arc<Switch>,
    recv: Option<MappedPages>,
}

impl Guest {
    fn new() -> Guest {
        let f = fixture();
        let (to_host, from_guest) = private_pair(16);
        let (to_guest, replies) = private_pair(16);
        let (nic, peer, switch) = rig(&f, from_guest, to_guest);
        Guest {
            f,
            to_host,
            replies,
            nic,
            peer,
            _switch: switch,
            recv: None,
        }
    }

    fn stats(&self) -> NetvspStats {
        self.nic.core.dev.counters.snapshot()
    }

    /// Sends an NVSP message wanting a completion; returns what came back.
    fn nvsp(&mut self, tid: u64, m: &NvspMessage) -> Vec<Back> {
        assert!(nvsp_packet(&mut self.to_host, tid, m));
        self.run()
    }

    fn init(&mut self) -> Vec<Back> {
        let v = nvsp::version::V61.into();
        self.nvsp(
            1,
            &NvspMessage::new(
                nvsp::msg::INIT,
                &nvsp::Init {
                    min_version: v,
                    max_version: v,
                },
            ),
        )
    }

    fn buffer(&mut self, msg_type: u32, gpadl: u32) -> Vec<Back> {
        let b = nvsp::SendBuffer {
            gpadl: gpadl.into(),
            id: nvsp::RECV_BUFFER_ID.into(),
        };
        self.nvsp(2, &NvspMessage::new(msg_type, &b))
    }

    /// Sends RNDIS messages GPA-direct from the direct page.
    fn rndis(&mut self, tid: u64, msgs: &[u8]) -> Vec<Back> {
        let page = self.f.memory.slice(DIRECT_PAGE * 4096, msgs.len()).unwrap();
        page.write_at(0, msgs).unwrap();
        // SEND_RNDIS_PKT, control, no section: the same 16 bytes both ways.
        write_gpa_direct(
            &mut self.to_host,
            tid,
            PACKET_FLAG_COMPLETION_REQUESTED,
            &[(msgs.len() as u32, 0, &[DIRECT_PAGE])],
            &nvsp::rndis_pkt_payload(nvsp::channel_type::CONTROL),
        )
        .unwrap();
        self.run()
    }

    fn set_filter(&mut self, filter: u32) -> Vec<Back> {
        let m = oid_message(
            rndis::msg::SET,
            9,
            rndis::oid::GEN_CURRENT_PACKET_FILTER,
            &filter.to_le_bytes(),
        );
        self.rndis(20, &m)
    }

    /// Polls the NIC until it is idle; returns the host's packets.
    fn run(&mut self) -> Vec<Back> {
        self.to_host.commit().unwrap();
        while self.nic.poll() {}
        let mut back = Vec::new();
        while let Some(p) = self.replies.read().unwrap() {
            let mut head = [0u8; 12];
            let payload = p.payload();
            let n = payload.len().min(12);
            payload.read_at(0, &mut head[..n]).unwrap();
            let word = |i: usize| u32::from_le_bytes(head[i..i + 4].try_into().unwrap());
            back.push(match p.desc.packet_type {
                packet_type::COMPLETION => Back::Completion {
                    tid: p.desc.transaction_id,
                    msg_type: word(0),
                    status: word(4),
                },
                packet_type::DATA_USING_TRANSFER_PAGES => {
                    let mut t = TransferPages::default();
                    t.parse(&p).unwrap();
                    if word(4) == nvsp::channel_type::DATA {
                        Back::Frames(t.ranges.len())
                    } else {
                        let off = t.ranges[0].byte_offset.get() as usize;
                        self.control_reply(off)
                    }
                }
                _ => Back::Inband,
            });
        }
        self.replies.commit().unwrap();
        back
    }

    /// Reads an RNDIS control message at `off` of the receive buffer.
    fn control_reply(&mut self, off: usize) -> Back {
        let f = &self.f;
        let recv = self.recv.get_or_insert_with(|| {
            let g = f.gpadls.get(RECV_GPADL).unwrap();
            f.memory.map_pages(g.single_range_pages().unwrap()).unwrap()
        });
        let mut m = [0u8; 16];
        recv.slice().read_at(off, &mut m).unwrap();
        let h = rndis::Header::read_from_prefix(&m).unwrap().0;
        let status_at = if h.msg_type.get() == rndis::msg::INDICATE_STATUS {
            8
        } else {
            12
        };
        Back::Control {
            msg_type: h.msg_type.get(),
            status: u32::from_le_bytes(m[status_at..status_at + 4].try_into().unwrap()),
        }
    }
}

fn completion(tid: u64, msg_type: u32, status: u32) -> Back {
    Back::Completion {
        tid,
        msg_type,
        status,
    }
}

fn rndis_init() -> Vec<u8> {
    let r = rndis::InitRequest {
        req_id: 1.into(),
        major: 1.into(),
        minor: 0.into(),
        max_xfer_size: 0x4000.into(),
    };
    rndis::message(rndis::msg::INIT, r.as_bytes(), &[])
}

const FAIL: u32 = nvsp::status::FAIL;
const OK: u32 = nvsp::status::SUCCESS;

#[test]
fn requests_before_nvsp_init_fail() {
    let mut g = Guest::new();
    assert_eq!(
        g.buffer(nvsp::msg::SEND_RECV_BUF, RECV_GPADL),
        [completion(2, nvsp::msg::SEND_RECV_BUF_COMPLETE, FAIL)]
    );
    assert_eq!(
        g.buffer(nvsp::msg::SEND_SEND_BUF, SEND_GPADL),
        [completion(2, nvsp::msg::SEND_SEND_BUF_COMPLETE, FAIL)]
    );
    // RNDIS before a version: the packet fails, nothing is answered inside.
    assert_eq!(
        g.rndis(3, &rndis_init()),
        [completion(3, nvsp::msg::SEND_RNDIS_PKT_COMPLETE, FAIL)]
    );
    let sub = nvsp::SubchannelRequest {
        op: nvsp::SUBCHANNEL_ALLOCATE.into(),
        count: 1.into(),
    };
    assert_eq!(
        g.nvsp(4, &NvspMessage::new(nvsp::msg::SUBCHANNEL, &sub)),
        [completion(4, nvsp::msg::SUBCHANNEL, FAIL)]
    );
    assert_eq!(g.stats().bad_nvsp, 4);
    // INIT still works after all that.
    assert_eq!(g.init(), [completion(1, nvsp::msg::INIT_COMPLETE, 0x60001)]);
}

#[test]
fn rndis_before_the_receive_buffer_has_nowhere_to_answer() {
    let mut g = Guest::new();
    g.init();
    assert_eq!(
        g.rndis(3, &rndis_init()),
        [completion(3, nvsp::msg::SEND_RNDIS_PKT_COMPLETE, OK)]
    );
    assert_eq!(g.stats().drop_control_replies, 1);
    // The device was not initialised: once the buffer is there, a packet
    // filter is refused until INITIALIZE.
    g.buffer(nvsp::msg::SEND_RECV_BUF, RECV_GPADL);
    let set_complete = |status| Back::Control {
        msg_type: rndis::msg::SET_COMPLETE,
        status,
    };
    let back = g.set_filter(rndis::filter::PROMISCUOUS);
    assert!(
        back.contains(&set_complete(rndis::status::FAILURE)),
        "{back:?}"
    );
    let back = g.rndis(5, &rndis_init());
    assert!(
        back.contains(&Back::Control {
            msg_type: rndis::msg::INIT_COMPLETE,
            status: rndis::status::SUCCESS
        }),
        "{back:?}"
    );
    let back = g.set_filter(rndis::filter::PROMISCUOUS);
    assert!(
        back.contains(&set_complete(rndis::status::SUCCESS)),
        "{back:?}"
    );
}

#[test]
fn buffers_and_init_are_refused_once_receiving() {
    let mut g = Guest::new();
    g.init();
    assert_eq!(
        g.buffer(nvsp::msg::SEND_RECV_BUF, RECV_GPADL)[0],
        completion(2, nvsp::msg::SEND_RECV_BUF_COMPLETE, OK)
    );
    assert_eq!(
        g.buffer(nvsp::msg::SEND_RECV_BUF, RECV_GPADL),
        [completion(2, nvsp::msg::SEND_RECV_BUF_COMPLETE, FAIL)]
    );
    assert_eq!(
        g.init(),
        [completion(1, nvsp::msg::INIT_COMPLETE, 0)],
        "refused: no version agreed"
    );
    // Unknown types fail with their own type, in any state.
    assert_eq!(
        g.nvsp(6, &NvspMessage::from_prefix(&[0x77, 0, 0, 0])),
        [completion(6, 0x77, FAIL)]
    );
    // A revoked receive buffer takes the RNDIS device with it; a new one
    // may then be given.
    g.nvsp(
        7,
        &NvspMessage::new(nvsp::msg::REVOKE_RECV_BUF, &nvsp::RevokeBuffer::default()),
    );
    assert_eq!(
        g.buffer(nvsp::msg::SEND_RECV_BUF, RECV_GPADL)[0],
        completion(2, nvsp::msg::SEND_RECV_BUF_COMPLETE, OK)
    );
}

#[test]
fn frames_flow_only_to_an_initialised_device_with_a_filter() {
    let mut g = Guest::new();
    g.init();
    g.buffer(nvsp::msg::SEND_RECV_BUF, RECV_GPADL);
    let src = crate::wire::MacAddr([2, 0, 0, 0, 0, 9]);
    let frame = || {
        let f = crate::testing::eth(MAC, src, 0x88b5, &[0; 50]);
        vec![Frame::new(Bytes::from(f))]
    };
    g.peer.ingress(&mut frame());
    assert!(!g.run().contains(&Back::Frames(1)));
    assert_eq!(g.stats().drop_rx_not_ready, 1, "uninitialised");
    g.rndis(3, &rndis_init());
    g.peer.ingress(&mut frame());
    g.run();
    assert_eq!(g.stats().drop_rx_not_ready, 2, "packet filter 0");
    g.set_filter(rndis::filter::DIRECTED);
    g.peer.ingress(&mut frame());
    assert!(g.run().contains(&Back::Frames(1)));
    // HALT: uninitialised again, and the filter is gone with it.
    g.rndis(4, &rndis::message(rndis::msg::HALT, &[0; 4], &[]));
    g.peer.ingress(&mut frame());
    g.run();
    assert_eq!(g.stats().drop_rx_not_ready, 3, "halted");
}
