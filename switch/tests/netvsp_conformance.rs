//! The network VSP against the packets a Linux guest's hv_netvsc sends, byte
//! for byte, over hosted mode, with the replies checked byte by byte.
//!
//! Each test builds an in-process appliance (switch, NIC pool, the netvsp
//! device, a hosted-mode server) and a guest that sends the exact NVSP and
//! RNDIS messages Linux sends, in its order; a probe port on the switch
//! sees what the guest sends and injects what it receives.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switch::netvsp::client::{
    self, HostPacket, INIT_TXID, NO_RESPONSE_TXID, NetvscClient, NetvscOptions, Placement, TxFrame,
    complete_receive, oid_message, rndis_message, send_nvsp, wait_packet,
};
use switch::netvsp::nvsp::{self, NvspMessage};
use switch::netvsp::rndis::{self, PacketInfo};
use switch::netvsp::{Netvsp, NetvspConfig, Pool};
use switch::offload::{fold, ones_sum};
use switch::policy::{PortPolicy, VlanPolicy};
use switch::wire::MacAddr;
use switch::{
    Delivery, Frame, GsoKind, Offload, OffloadCaps, PartialCsum, PortHandle, PortSpec, Switch,
};
use vmbus::hosted::HostedServer;
use vmbus::hosted::client::{ClientChannel, HostedClient, Pages};
use vmbus::packet::write_gpa_direct;
use vmbus::wire::PACKET_FLAG_COMPLETION_REQUESTED;
use vmbus::{MappedPages, SharedMemory};
use zerocopy::IntoBytes;

const NIC_MAC: MacAddr = MacAddr([0x00, 0x15, 0x5d, 0x01, 0x02, 0x03]);
const PEER_MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 0x99]);

struct Appliance {
    _dir: tempfile::TempDir,
    server: HostedServer,
    sw: Arc<Switch>,
    nic: Netvsp,
    _pool: Arc<Pool>,
}

fn appliance(channels: u16) -> Appliance {
    appliance_with(|cfg| cfg.channels = channels)
}

/// An appliance whose NIC configuration `f` adjusts.
fn appliance_with(f: impl FnOnce(&mut NetvspConfig)) -> Appliance {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new("sw", 1024, 300);
    let pool = Pool::new("nvt", 1, Duration::from_micros(20)).unwrap();
    let mut cfg = NetvspConfig::new(
        "eth-vm1",
        "8a3c1f2e-5b4d-4e6f-9a8b-7c6d5e4f3a2b".parse().unwrap(),
        NIC_MAC,
    );
    f(&mut cfg);
    let name = cfg.name.clone();
    // A trunk carrying VLAN 5 tagged and VLAN 1 untagged.
    let nic = Netvsp::new(
        cfg,
        sw.clone(),
        PortSpec {
            policy: trunk(),
            ..PortSpec::new(&name, OffloadCaps::NONE)
        },
        pool.clone(),
    );
    let registry = vmbus::server::Registry::new();
    registry.add(Arc::new(nic.clone()));
    let server = HostedServer::start(&dir.path().join("s.sock"), registry).unwrap();
    Appliance {
        _dir: dir,
        server,
        sw,
        nic,
        _pool: pool,
    }
}

fn trunk() -> PortPolicy {
    PortPolicy {
        vlan: VlanPolicy::trunk(&[5], Some(1)),
        ..Default::default()
    }
}

fn probe(sw: &Arc<Switch>, caps: OffloadCaps) -> PortHandle {
    sw.add_port(PortSpec {
        policy: trunk(),
        ..PortSpec::new("probe", caps)
    })
    .unwrap()
}

/// A receive packet's RNDIS messages, the completions read before it, and
/// its NVSP channel type.
type Received = (Vec<Vec<u8>>, Vec<(u64, Vec<u8>)>, u32);

/// A guest speaking raw NVSP on the primary channel.
struct Guest {
    host: HostedClient,
    ch: ClientChannel,
    recv: Option<(Pages, MappedPages, u32)>,
    send: Option<(MappedPages, u32)>,
    /// Pages for GPA-direct RNDIS messages.
    direct: Pages,
    req: u32,
}

impl Guest {
    fn new(a: &Appliance) -> Guest {
        let mut host = HostedClient::connect(a.server.path(), 48 << 20).unwrap();
        let offer = host.request_offers().unwrap().remove(0);
        assert_eq!(offer.interface, vmbus::guid::NETWORK_INTERFACE);
        let ch = host.open_channel(&offer, 32, 32, &[0; 24]).unwrap();
        let direct = host.alloc_pages(24).unwrap();
        Guest {
            host,
            ch,
            recv: None,
            send: None,
            direct,
            req: 0,
        }
    }

    fn memory(&self) -> &SharedMemory {
        self.host.memory()
    }

    /// Sends an NVSP message with completion requested and returns the
    /// completion's payload bytes.
    fn call(&mut self, m: &NvspMessage) -> Vec<u8> {
        send_nvsp(&mut self.ch, INIT_TXID, true, m).unwrap();
        match wait_packet(&mut self.ch, client::TIMEOUT).unwrap() {
            HostPacket::Completion { tid, payload } => {
                assert_eq!(tid, INIT_TXID);
                payload
            }
            other => panic!("expected a completion, got {other:?}"),
        }
    }

    fn tell(&mut self, m: &NvspMessage) {
        send_nvsp(&mut self.ch, NO_RESPONSE_TXID, false, m).unwrap();
    }

    fn init(&mut self, version: u32) -> Vec<u8> {
        self.call(&NvspMessage::new(
            nvsp::msg::INIT,
            &nvsp::Init {
                min_version: version.into(),
                max_version: version.into(),
            },
        ))
    }

    fn buffers(&mut self, recv_pages: u64, scatter: bool) -> (Vec<u8>, Vec<u8>) {
        let relid = self.ch.relid();
        let pages = self.host.alloc_pages(recv_pages).unwrap();
        let mut pfns = pages.pfns();
        if scatter {
            pfns.reverse();
        }
        let gpadl = self.host.create_gpadl(relid, &pfns).unwrap();
        let map = self.memory().map_pages(&pfns).unwrap();
        let r = self.call(&NvspMessage::new(
            nvsp::msg::SEND_RECV_BUF,
            &nvsp::SendBuffer {
                gpadl: gpadl.into(),
                id: nvsp::RECV_BUFFER_ID.into(),
            },
        ));
        let len = map.len() as u32;
        self.recv = Some((pages, map, len));
        let spages = self.host.alloc_pages(256).unwrap();
        let sgpadl = self.host.create_gpadl(relid, &spages.pfns()).unwrap();
        let smap = self.memory().map_pages(&spages.pfns()).unwrap();
        let s = self.call(&NvspMessage::new(
            nvsp::msg::SEND_SEND_BUF,
            &nvsp::SendBuffer {
                gpadl: sgpadl.into(),
                id: 0.into(),
            },
        ));
        self.send = Some((smap, 6144));
        (r, s)
    }

    /// Writes an RNDIS message into the direct pages and sends it
    /// GPA-direct as Linux sends control messages.
    fn send_rndis(&mut self, msg: &[u8], placement: Placement, tid: u64) {
        let page = self.direct.first_pfn;
        let (off, ranges): (u32, Vec<(u32, u32, Vec<u64>)>) = match placement {
            Placement::PageStart => (0, vec![(msg.len() as u32, 0, vec![page, page + 1])]),
            Placement::StraddleOneRange { before } => {
                let off = 4096 - before;
                (off, vec![(msg.len() as u32, off, vec![page, page + 1])])
            }
            Placement::StraddleTwoRanges { before } => {
                let off = 4096 - before;
                (
                    off,
                    vec![
                        (before, off, vec![page]),
                        (msg.len() as u32 - before, 0, vec![page + 1]),
                    ],
                )
            }
        };
        let ranges: Vec<_> = ranges
            .into_iter()
            .map(|(c, o, mut p)| {
                p.truncate((o as usize + c as usize).div_ceil(4096));
                (c, o, p)
            })
            .collect();
        self.memory()
            .slice(page * 4096 + u64::from(off), msg.len())
            .unwrap()
            .write_at(0, msg)
            .unwrap();
        let m = NvspMessage::new(
            nvsp::msg::SEND_RNDIS_PKT,
            &nvsp::SendRndisPkt {
                channel_type: nvsp::channel_type::CONTROL.into(),
                section_index: nvsp::NO_SECTION.into(),
                section_size: 0.into(),
            },
        );
        let refs: Vec<(u32, u32, &[u64])> = ranges
            .iter()
            .map(|(c, o, p)| (*c, *o, p.as_slice()))
            .collect();
        write_gpa_direct(
            &mut self.ch.channel.outgoing,
            tid,
            PACKET_FLAG_COMPLETION_REQUESTED,
            &refs,
            m.as_bytes(),
        )
        .unwrap();
        self.ch.channel.flush().unwrap();
    }

    /// Reads host packets until a transfer-page packet arrives; checks its
    /// shape and returns the RNDIS messages of its ranges (completing it).
    /// Completions seen on the way are returned too.
    fn receive(&mut self) -> Received {
        let mut completions = Vec::new();
        loop {
            match wait_packet(&mut self.ch, client::TIMEOUT).unwrap() {
                HostPacket::Completion { tid, payload } => completions.push((tid, payload)),
                HostPacket::TransferPages {
                    tid,
                    flags,
                    set_id,
                    ranges,
                    payload,
                } => {
                    assert_eq!(set_id, 0xCAFE);
                    assert_eq!(flags, PACKET_FLAG_COMPLETION_REQUESTED);
                    assert_eq!(payload.len(), 16, "NVSP payload of a receive");
                    assert_eq!(&payload[..4], &107u32.to_le_bytes());
                    assert_eq!(&payload[8..12], &[0xff; 4]);
                    let channel = u32::from_le_bytes(payload[4..8].try_into().unwrap());
                    let (_, map, len) = self.recv.as_ref().unwrap();
                    let msgs = ranges
                        .iter()
                        .map(|&(n, off)| {
                            assert!(off + n <= *len, "range inside the buffer");
                            let mut v = vec![0u8; n as usize];
                            map.slice().read_at(off as usize, &mut v).unwrap();
                            assert_eq!(
                                u32::from_le_bytes(v[4..8].try_into().unwrap()),
                                n,
                                "range length = RNDIS message length"
                            );
                            v
                        })
                        .collect();
                    complete_receive(&mut self.ch, tid).unwrap();
                    self.ch.channel.flush().unwrap();
                    return (msgs, completions, channel);
                }
                HostPacket::Inband { .. } => {}
                HostPacket::Other { packet_type } => panic!("unexpected packet type {packet_type}"),
            }
        }
    }

    /// One RNDIS control request and its single reply message.
    fn control(&mut self, msg: &[u8], placement: Placement) -> Vec<u8> {
        self.req += 1;
        let tid = 0x5000 + u64::from(self.req);
        self.send_rndis(msg, placement, tid);
        let (mut msgs, mut completions, channel) = self.receive();
        assert_eq!(channel, nvsp::channel_type::CONTROL);
        assert_eq!(msgs.len(), 1, "one control reply per packet");
        if completions.is_empty() {
            match wait_packet(&mut self.ch, client::TIMEOUT).unwrap() {
                HostPacket::Completion { tid, payload } => completions.push((tid, payload)),
                other => panic!("expected the send completion, got {other:?}"),
            }
        }
        assert_eq!(completions, vec![(tid, vec![108, 0, 0, 0, 1, 0, 0, 0])]);
        msgs.remove(0)
    }

    fn next_req(&mut self) -> u32 {
        self.req += 1;
        self.req + 1000
    }

    fn query(&mut self, oid: u32, input: &[u8], placement: Placement) -> (u32, Vec<u8>, Vec<u8>) {
        let req = self.next_req();
        let r = self.control(&oid_message(rndis::msg::QUERY, req, oid, input), placement);
        assert_eq!(&r[..4], &0x8000_0004u32.to_le_bytes(), "QUERY_COMPLETE");
        assert_eq!(&r[8..12], &req.to_le_bytes(), "request id echoed");
        let (status, data) = client::parse_query_complete(&r).unwrap();
        (status, data, r)
    }

    fn set(&mut self, oid: u32, data: &[u8]) -> (u32, Vec<u8>) {
        let req = self.next_req();
        let r = self.control(
            &oid_message(rndis::msg::SET, req, oid, data),
            Placement::PageStart,
        );
        assert_eq!(
            &r[..8],
            &[5, 0, 0, 0x80, 16, 0, 0, 0],
            "SET_COMPLETE, 16 bytes"
        );
        assert_eq!(&r[8..12], &req.to_le_bytes());
        (u32::from_le_bytes(r[12..16].try_into().unwrap()), r)
    }
}

fn u32s(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The 40-byte completion payload: type, then words, zero padded.
fn nvsp_bytes(words: &[u32]) -> Vec<u8> {
    let mut v = u32s(words);
    v.resize(40, 0);
    v
}

#[test]
fn init_with_each_version_and_refusals() {
    let a = appliance(1);
    let mut g = Guest::new(&a);
    // A newer version than vspa knows is refused, and the guest steps down
    // through every version Linux tries; each INIT_COMPLETE is a full
    // 40-byte nvsp_message.
    let cases = [
        (0x60002, None),
        (0x60001, Some(0x60001)),
        (0x60000, Some(0x60000)),
        (0x50000, Some(0x50000)),
        (0x40000, Some(0x40000)),
        (0x30002, Some(0x30002)),
        (0x2, Some(0x2)),
        (0x1, None),
        (0x30001, None),
    ];
    for (v, ok) in cases {
        let r = g.init(v);
        let want = match ok {
            Some(n) => nvsp_bytes(&[2, n, 0, 1]),
            None => nvsp_bytes(&[2, 0, 0, 2]),
        };
        assert_eq!(r, want, "INIT {v:#x}");
    }
    // An unknown message that wants a completion gets a failure, not silence.
    let r = g.call(&NvspMessage::from_prefix(&u32s(&[0x77])));
    assert_eq!(r, nvsp_bytes(&[0x77, 2]));
    // A receive buffer GPADL the guest never created is refused.
    let r = g.call(&NvspMessage::new(
        nvsp::msg::SEND_RECV_BUF,
        &nvsp::SendBuffer {
            gpadl: 0xdead.into(),
            id: 0xcafe.into(),
        },
    ));
    assert_eq!(r, nvsp_bytes(&[102, 2]));
    assert!(a.nic.stats().bad_nvsp >= 2);
}

#[test]
fn linux_initialisation_sequence_byte_for_byte() {
    let a = appliance(1);
    let mut g = Guest::new(&a);
    assert_eq!(g.init(0x60001), nvsp_bytes(&[2, 0x60001, 0, 1]));
    // NDIS config (MTU + 14, 802.1Q) and version: no replies.
    g.tell(&NvspMessage::new(
        nvsp::msg::SEND_NDIS_CONFIG,
        &nvsp::NdisConfig {
            mtu: 1514.into(),
            reserved: 0.into(),
            capabilities: nvsp::ndis_config::IEEE8021Q.into(),
        },
    ));
    g.tell(&NvspMessage::new(
        nvsp::msg::SEND_NDIS_VER,
        &nvsp::SendNdisVersion {
            major: 6.into(),
            minor: 30.into(),
        },
    ));
    // 16 MiB receive buffer (Linux's default), scattered pages.
    let (r, s) = g.buffers(4096, true);
    let sub = u32::from_le_bytes(r[16..20].try_into().unwrap());
    let count = u32::from_le_bytes(r[20..24].try_into().unwrap());
    assert_eq!(
        &r[..16],
        &u32s(&[102, 1, 1, 0])[..],
        "status, one section at 0"
    );
    assert!((68..=4096).contains(&sub), "sub_alloc_size {sub}");
    assert_eq!(count, (16 << 20) / sub, "num_sub_allocs fill the buffer");
    assert_eq!(&r[24..28], &(sub * count).to_le_bytes(), "end_offset");
    assert_eq!(s, nvsp_bytes(&[105, 1, 6144]));

    // RNDIS INIT, as rndis_filter_init_device sends it.
    let init = rndis_message(rndis::msg::INIT, &u32s(&[1, 1, 0, 0x4000]), &[]);
    let reply = g.control(&init, Placement::PageStart);
    assert_eq!(
        reply,
        u32s(&[0x8000_0002, 52, 1, 0, 1, 0, 1, 0, 32, 6144 * 8, 3, 0, 0]),
        "INIT_COMPLETE: connectionless 802.3, 32 messages per section, 8-byte alignment"
    );

    // The queries rndis_filter_device_add makes.
    let (st, mtu, _) = g.query(
        rndis::oid::GEN_MAXIMUM_FRAME_SIZE,
        &[],
        Placement::PageStart,
    );
    assert_eq!((st, mtu), (0, 1500u32.to_le_bytes().to_vec()));
    let (st, mac, raw) = g.query(
        rndis::oid::P802_3_PERMANENT_ADDRESS,
        &[],
        Placement::PageStart,
    );
    assert_eq!(st, 0);
    assert_eq!(mac, NIC_MAC.0, "exactly 6 bytes");
    assert_eq!(
        &raw[..8],
        &u32s(&[0x8000_0004, 30])[..],
        "QUERY_COMPLETE, 30 bytes"
    );
    assert_eq!(
        &raw[12..24],
        &u32s(&[0, 6, 16])[..],
        "success, 6 bytes at 16"
    );
    assert_eq!(&raw[24..], &NIC_MAC.0[..]);
    let (st, link, _) = g.query(
        rndis::oid::GEN_MEDIA_CONNECT_STATUS,
        &[],
        Placement::PageStart,
    );
    assert_eq!((st, link), (0, vec![0, 0, 0, 0]), "connected");
    let (_, speed, _) = g.query(rndis::oid::GEN_LINK_SPEED, &[], Placement::PageStart);
    assert_eq!(
        speed,
        100_000_000u32.to_le_bytes(),
        "10 Gbit/s in 100 bps units"
    );
    // Offload capabilities: the guest's input header asks for revision 3.
    let mut input = vec![0u8; 156];
    input[..4].copy_from_slice(&[0xa7, 3, 156, 0]);
    let (st, caps, _) = g.query(
        rndis::oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES,
        &input,
        Placement::PageStart,
    );
    assert_eq!(st, 0);
    assert_eq!(caps.len(), 156);
    assert_eq!(&caps[..4], &[0xa7, 3, 156, 0], "valid NDIS object header");
    assert_eq!(
        &caps[8..12],
        &0x155u32.to_le_bytes(),
        "IPv4 TCP/UDP/IP tx checksums"
    );
    assert_eq!(&caps[80..84], &2u32.to_le_bytes(), "LSOv2 IPv4, 802.3");
    assert_eq!(&caps[84..88], &62_780u32.to_le_bytes());
    let (st, name, _) = g.query(rndis::oid::GEN_FRIENDLY_NAME, &[], Placement::PageStart);
    assert_eq!(st, 0);
    assert_eq!(rndis::from_utf16(&name), "eth-vm1");
    // RSS is not offered on a single-channel NIC; unknown OIDs fail cleanly.
    let (st, data, raw) = g.query(
        rndis::oid::GEN_RECEIVE_SCALE_CAPABILITIES,
        &[],
        Placement::PageStart,
    );
    assert_eq!((st, data.len()), (rndis::status::NOT_SUPPORTED, 0));
    assert_eq!(raw.len(), 24);
    let (st, _, _) = g.query(0x0001_0202, &[], Placement::PageStart);
    assert_eq!(st, rndis::status::NOT_SUPPORTED);

    // Offload parameters (NVSP >= 5 layout), then the packet filter.
    let mut params = vec![0x80, 3, 28, 0];
    params.extend_from_slice(&[4, 4, 4, 4, 4, 0, 0, 2, 2, 0, 0]);
    params.resize(28, 0);
    assert_eq!(g.set(rndis::oid::TCP_OFFLOAD_PARAMETERS, &params).0, 0);
    assert_eq!(
        g.set(
            rndis::oid::GEN_CURRENT_PACKET_FILTER,
            &0x0du32.to_le_bytes()
        )
        .0,
        0
    );
    let (_, f, _) = g.query(
        rndis::oid::GEN_CURRENT_PACKET_FILTER,
        &[],
        Placement::PageStart,
    );
    assert_eq!(f, 0x0du32.to_le_bytes());
    // A malformed offload parameter object is refused.
    assert_eq!(
        g.set(rndis::oid::TCP_OFFLOAD_PARAMETERS, &[0x11, 1, 4, 0])
            .0,
        rndis::status::INVALID_DATA
    );

    // MAC change as rndis_filter_set_device_mac sends it.
    let name = rndis::utf16_name("NetworkAddress", 256);
    let name = &name[..name.len() - 2];
    let value: Vec<u8> = "02aabbccddee"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let mut p = u32s(&[
        20,
        name.len() as u32,
        2,
        20 + name.len() as u32,
        value.len() as u32,
    ]);
    p.extend_from_slice(name);
    p.extend_from_slice(&value);
    assert_eq!(g.set(rndis::oid::GEN_RNDIS_CONFIG_PARAMETER, &p).0, 0);
    let (_, cur, _) = g.query(
        rndis::oid::P802_3_CURRENT_ADDRESS,
        &[],
        Placement::PageStart,
    );
    assert_eq!(cur, [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
    let (_, perm, _) = g.query(
        rndis::oid::P802_3_PERMANENT_ADDRESS,
        &[],
        Placement::PageStart,
    );
    assert_eq!(perm, NIC_MAC.0);

    // Keepalive and reset.
    let ka = g.control(
        &rndis_message(rndis::msg::KEEPALIVE, &u32s(&[77]), &[]),
        Placement::PageStart,
    );
    assert_eq!(ka, u32s(&[0x8000_0008, 16, 77, 0]));
    let reset = g.control(
        &rndis_message(rndis::msg::RESET, &u32s(&[0]), &[]),
        Placement::PageStart,
    );
    assert_eq!(reset, u32s(&[0x8000_0006, 16, 0, 0]));
    assert_eq!(a.nic.stats().bad_control, 0);
}

#[test]
fn rndis_headers_straddling_pages() {
    let a = appliance(1);
    let mut g = Guest::new(&a);
    g.init(0x60001);
    g.buffers(256, false);
    let init = rndis_message(rndis::msg::INIT, &u32s(&[1, 1, 0, 0x4000]), &[]);
    g.control(&init, Placement::PageStart);
    // The query header crosses a page boundary 10 bytes in: as two GPA
    // ranges (older 6.1 kernels) and as one range with two pfns (newer).
    for placement in [
        Placement::StraddleTwoRanges { before: 10 },
        Placement::StraddleOneRange { before: 10 },
        Placement::StraddleTwoRanges { before: 3 },
        Placement::StraddleOneRange { before: 27 },
    ] {
        let (st, mac, _) = g.query(rndis::oid::P802_3_PERMANENT_ADDRESS, &[], placement);
        assert_eq!((st, mac), (0, NIC_MAC.0.to_vec()), "{placement:?}");
    }
    assert_eq!(a.nic.stats().bad_control, 0);
}

/// A full client on the NIC plus a probe port.
fn connected(a: &Appliance, probe_caps: OffloadCaps) -> (NetvscClient, HostedClient, PortHandle) {
    let mut host = HostedClient::connect(a.server.path(), 48 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let opts = NetvscOptions {
        packet_filter: rndis::filter::DIRECTED | rndis::filter::BROADCAST,
        scatter_buffers: true,
        ..Default::default()
    };
    let c = NetvscClient::connect(&mut host, &offer, &opts).unwrap();
    (c, host, probe(&a.sw, probe_caps))
}

/// Frames the probe port got, waiting up to a second for `n` of them.
fn drain(p: &mut PortHandle, n: usize) -> Vec<Delivery> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.len() < n && Instant::now() < deadline {
        p.drain(&mut out, 1024);
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

fn tcp4_frame(dst: MacAddr, src: MacAddr, payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20 + payload];
    f[..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let total = (40 + payload) as u16;
    f[14..34].copy_from_slice(&[
        0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ]);
    f[16..18].copy_from_slice(&total.to_be_bytes());
    let c = !fold(ones_sum(&f[14..34], 0));
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f[34..38].copy_from_slice(&[0x9c, 0x40, 0x00, 0x50]);
    f[38..42].copy_from_slice(&1000u32.to_be_bytes());
    f[46] = 0x50;
    f[47] = 0x18;
    f[48..50].copy_from_slice(&[0xff, 0xff]);
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    f
}

/// A large TCP segment as netvsc_xmit hands it over for LSO: IPv4 total
/// length and header checksum zero, a length-less pseudo-header sum in the
/// TCP checksum.
fn lso_frame(src: MacAddr, payload: usize) -> Vec<u8> {
    let mut big = tcp4_frame(PEER_MAC, src, payload);
    big[16..18].copy_from_slice(&[0, 0]);
    big[24..26].copy_from_slice(&[0, 0]);
    let p0 = fold(ones_sum(&big[26..34], 6));
    big[50..52].copy_from_slice(&p0.to_be_bytes());
    big
}

fn lso_tx(frame: &[u8], mss: u32) -> TxFrame<'_> {
    TxFrame {
        data: frame,
        info: PacketInfo {
            lso: Some(rndis::lso::encode(mss, 34, false)),
            ..Default::default()
        },
    }
}

fn pseudo4(f: &[u8], l4_len: usize) -> u64 {
    ones_sum(&f[26..34], 6 + l4_len as u64)
}

fn tcp_valid(f: &[u8]) -> bool {
    fold(ones_sum(&f[34..], pseudo4(f, f.len() - 34))) == 0xffff
}

#[test]
fn checksum_lso_vlan_and_batched_frames_from_the_guest() {
    let a = appliance(1);
    let (mut c, _host, mut probe) = connected(&a, OffloadCaps::ALL);
    // 1. A TCP frame with the checksum left to the host (pseudo-header sum
    //    in the field, checksum PPI), as netvsc_xmit sends CHECKSUM_PARTIAL.
    let mut f = tcp4_frame(PEER_MAC, c.mac, 100);
    let p = fold(pseudo4(&f, f.len() - 34));
    f[50..52].copy_from_slice(&p.to_be_bytes());
    let csum = TxFrame {
        data: &f,
        info: PacketInfo {
            csum: Some(rndis::csum_tx::IS_IPV4 | rndis::csum_tx::TCP | 34 << 16),
            ..Default::default()
        },
    };
    // 2. Four plain frames batched with it into one section, then a tagged one.
    let plain: Vec<Vec<u8>> = (0..4)
        .map(|i| tcp4_frame(PEER_MAC, c.mac, 10 + i))
        .collect();
    let mut batch = vec![csum];
    batch.extend(plain.iter().map(|p| TxFrame::new(p)));
    let tagged = TxFrame {
        data: &plain[0],
        info: PacketInfo {
            vlan: Some(rndis::vlan::from_tci(0x2005)),
            ..Default::default()
        },
    };
    batch.push(tagged);
    assert_eq!(c.send(0, &batch).unwrap(), 6);
    let got = drain(&mut probe, 6);
    assert_eq!(got.len(), 6, "every batched message became a frame");
    assert_eq!(&got[0].data[..], &f[..]);
    assert_eq!(
        got[0].offload,
        Offload {
            csum: Some(PartialCsum {
                start: 34,
                offset: 16
            }),
            gso: None
        }
    );
    for (d, p) in got[1..5].iter().zip(&plain) {
        assert_eq!(&d.data[..], &p[..]);
        assert_eq!(d.offload, Offload::default());
    }
    // The 802.1Q PPI became a tag in the frame.
    let tagged_frame = [&plain[0][..12], &[0x81, 0x00, 0x20, 0x05], &plain[0][12..]].concat();
    assert_eq!(&got[5].data[..], &tagged_frame[..]);

    // 3. An LSO frame, GPA-direct, with the header straddling a page: the
    //    guest zeroes the IPv4 total length and header checksum and puts a
    //    length-less pseudo-header sum in the TCP checksum.
    let big = lso_frame(c.mac, 20_000);
    let lso = lso_tx(&big, 1448);
    c.send_frame_direct(0, &lso, Placement::StraddleTwoRanges { before: 20 })
        .unwrap();
    let got = drain(&mut probe, 1);
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!(d.data.len(), big.len());
    assert_eq!(
        u16::from_be_bytes([d.data[16], d.data[17]]) as usize,
        big.len() - 14,
        "IPv4 total length fixed"
    );
    assert_eq!(
        fold(ones_sum(&d.data[14..34], 0)),
        0xffff,
        "IPv4 header checksum fixed"
    );
    let gso = d.offload.gso.unwrap();
    assert_eq!((gso.kind, gso.mss), (GsoKind::Tcp4, 1448));
    // Completing the partial checksum gives a valid TCP checksum.
    let mut full = d.data.to_vec();
    let v = !fold(ones_sum(&full[34..], 0));
    full[50..52].copy_from_slice(&v.to_be_bytes());
    assert!(tcp_valid(&full));
    assert_eq!(&full[54..], &big[54..], "payload intact");
    // Every send was completed with success.
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.free_sections() < c.sections() && Instant::now() < deadline {
        c.poll(0, |_| {}).unwrap();
    }
    assert_eq!(c.free_sections(), c.sections());
    assert_eq!(c.state.failed_sends, 0);
    assert_eq!(a.nic.stats().drop_tx_malformed, 0);
}

#[test]
fn lso_frames_reach_a_port_without_offloads_as_valid_segments() {
    let a = appliance(1);
    let (mut c, _host, mut probe) = connected(&a, OffloadCaps::NONE);
    let big = lso_frame(c.mac, 5000);
    let lso = lso_tx(&big, 1000);
    c.send_frame_direct(0, &lso, Placement::StraddleOneRange { before: 30 })
        .unwrap();
    let got = drain(&mut probe, 5);
    assert_eq!(got.len(), 5);
    let mut payload = Vec::new();
    for d in &got {
        assert!(d.data.len() <= 14 + 40 + 1000);
        assert_eq!(fold(ones_sum(&d.data[14..34], 0)), 0xffff);
        assert!(tcp_valid(&d.data), "segment TCP checksum");
        payload.extend_from_slice(&d.data[54..]);
    }
    assert_eq!(payload, big[54..]);
}

#[test]
fn frames_to_the_guest_batched_with_checksums_and_tags() {
    let a = appliance(1);
    let (mut c, _host, mut probe) = connected(&a, OffloadCaps::ALL);
    // The probe sends: a frame with a partial checksum, a tagged one,
    // frames for another MAC (filtered: DIRECTED without PROMISCUOUS),
    // a broadcast, and 50 plain ones.
    let mut partial = tcp4_frame(c.mac, PEER_MAC, 300);
    let p = fold(pseudo4(&partial, partial.len() - 34));
    partial[50..52].copy_from_slice(&p.to_be_bytes());
    let mut tagged = tcp4_frame(c.mac, PEER_MAC, 10);
    tagged.splice(12..12, [0x81, 0x00, 0xa0, 0x05]);
    let other = tcp4_frame(MacAddr([2, 9, 9, 9, 9, 9]), PEER_MAC, 10);
    let bcast = tcp4_frame(MacAddr::BROADCAST, PEER_MAC, 10);
    let plain: Vec<Vec<u8>> = (0..50).map(|i| tcp4_frame(c.mac, PEER_MAC, i)).collect();
    let mut frames = vec![
        Frame {
            data: Bytes::from(partial.clone()),
            offload: Offload {
                csum: Some(PartialCsum {
                    start: 34,
                    offset: 16,
                }),
                gso: None,
            },
        },
        Frame::new(Bytes::from(tagged.clone())),
        Frame::new(Bytes::from(other)),
        Frame::new(Bytes::from(bcast.clone())),
    ];
    frames.extend(plain.iter().map(|p| Frame::new(Bytes::from(p.clone()))));
    probe.ingress(&mut frames);
    let mut got: Vec<(Vec<u8>, PacketInfo)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while got.len() < 53 && Instant::now() < deadline {
        c.poll(0, |f| got.push((f.to_vec(), f.info))).unwrap();
    }
    assert_eq!(got.len(), 53, "{:?}", a.nic.stats());
    // The checksum was completed on the copy and marked valid.
    assert!(tcp_valid(&got[0].0));
    assert_eq!(&got[0].0[..50], &partial[..50]);
    assert_eq!(
        got[0].1.csum,
        Some(rndis::csum_rx::TCP_SUCCEEDED | rndis::csum_rx::IP_SUCCEEDED)
    );
    // The tag went into an 802.1Q PPI, the frame arrives untagged.
    let untagged = [&tagged[..12], &tagged[16..]].concat();
    assert_eq!(got[1].0, untagged);
    assert_eq!(got[1].1.vlan.map(rndis::vlan::to_tci), Some(0xa005));
    assert_eq!(got[2].0, bcast);
    for (g, p) in got[3..].iter().zip(&plain) {
        assert_eq!(&g.0, p);
        assert_eq!(g.1, PacketInfo::default());
    }
    let s = a.nic.stats();
    assert_eq!(s.drop_rx_filtered, 1);
    assert!(s.rx_packets <= 3, "53 frames in at most 3 packets: {s:?}");
}

#[test]
fn link_state_indications_and_drops() {
    let a = appliance(1);
    let (mut c, _host, mut probe) = connected(&a, OffloadCaps::ALL);
    assert!(c.state.link_up);
    a.nic.set_link(false);
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.state.indications.is_empty() && Instant::now() < deadline {
        c.poll(0, |_| {}).unwrap();
    }
    assert_eq!(c.state.indications, vec![rndis::status::MEDIA_DISCONNECT]);
    assert!(!c.state.link_up);
    let (_, link) = c
        .query(
            rndis::oid::GEN_MEDIA_CONNECT_STATUS,
            &[],
            Placement::PageStart,
        )
        .unwrap();
    assert_eq!(link, 1u32.to_le_bytes(), "disconnected");
    // While down, frames to the guest are dropped and counted.
    let mut f = vec![Frame::new(Bytes::from(tcp4_frame(c.mac, PEER_MAC, 10)))];
    probe.ingress(&mut f);
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.nic.stats().drop_rx_not_ready == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(a.nic.stats().drop_rx_not_ready, 1);
    a.nic.set_link(true);
    let deadline = Instant::now() + Duration::from_secs(5);
    while c.state.indications.len() < 2 && Instant::now() < deadline {
        c.poll(0, |_| {}).unwrap();
    }
    assert_eq!(
        c.state.indications,
        vec![
            rndis::status::MEDIA_DISCONNECT,
            rndis::status::MEDIA_CONNECT
        ]
    );
    assert_eq!(a.nic.stats().link_indications, 2);
    let mut f = vec![Frame::new(Bytes::from(tcp4_frame(c.mac, PEER_MAC, 10)))];
    probe.ingress(&mut f);
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while n == 0 && Instant::now() < deadline {
        c.poll(0, |_| n += 1).unwrap();
    }
    assert_eq!(n, 1, "frames flow again");
}

#[test]
fn subchannels_rss_and_send_table() {
    let a = appliance(2);
    let mut host = HostedClient::connect(a.server.path(), 48 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let opts = NetvscOptions {
        subchannels: 3,
        packet_filter: rndis::filter::DIRECTED,
        ..Default::default()
    };
    let mut c = NetvscClient::connect(&mut host, &offer, &opts).unwrap();
    assert_eq!(
        c.channels.len(),
        2,
        "one sub-channel: the NIC has two channels"
    );
    let caps = &c.rss_caps;
    assert_eq!(&caps[..4], &[0x88, 2, 18, 0]);
    assert_eq!(caps.len(), 18);
    assert_eq!(&caps[12..16], &2u32.to_le_bytes(), "two receive queues");
    assert_eq!(&caps[16..18], &128u16.to_le_bytes(), "128 table entries");
    // The send table spreads the guest's sends over both channels.
    let mut table = c.state.send_table.clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while table.is_none() && Instant::now() < deadline {
        c.poll(0, |_| {}).unwrap();
        table = c.state.send_table.clone();
    }
    assert_eq!(table.unwrap(), (0..16).map(|i| i % 2).collect::<Vec<u32>>());
    // Flows from the probe land on the channel the guest's table names for
    // their Toeplitz hash, which comes along in a hash PPI.
    let mut probe = probe(&a.sw, OffloadCaps::ALL);
    let mut frames = Vec::new();
    for port in 0..64u16 {
        let mut f = tcp4_frame(c.mac, PEER_MAC, 10);
        f[34..36].copy_from_slice(&(1000 + port).to_be_bytes());
        frames.push(Frame::new(Bytes::from(f)));
    }
    probe.ingress(&mut frames);
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.len() < 64 && Instant::now() < deadline {
        for ch in 0..2 {
            c.poll(ch, |f| seen.push((f.channel, f.to_vec(), f.info.hash)))
                .unwrap();
        }
    }
    assert_eq!(seen.len(), 64);
    let mut per_channel = [0; 2];
    for (ch, f, hash) in &seen {
        let mut input = f[26..34].to_vec();
        input.extend_from_slice(&f[34..38]);
        let h = switch::netvsp::rss::toeplitz(&switch::netvsp::rss::DEFAULT_KEY, &input);
        assert_eq!(*hash, Some(h));
        assert_eq!(
            *ch as u32,
            (h % 128) % 2,
            "the guest's table picks the channel"
        );
        per_channel[*ch] += 1;
    }
    assert!(per_channel[0] > 0 && per_channel[1] > 0, "{per_channel:?}");
    // The guest may send on the sub-channel too.
    let f = tcp4_frame(PEER_MAC, c.mac, 10);
    assert_eq!(c.send(1, &[TxFrame::new(&f)]).unwrap(), 1);
    let got = drain(&mut probe, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].data[..], &f[..]);
}

#[test]
fn guests_without_8021q_get_inline_tags_and_guest_mtu_bounds_frames() {
    let a = appliance(1);
    let mut probe = probe(&a.sw, OffloadCaps::ALL);
    let receive = |c: &mut NetvscClient, n: usize| {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < n && Instant::now() < deadline {
            c.poll(0, |f| got.push((f.to_vec(), f.info))).unwrap();
        }
        got
    };
    // An NVSP 1 guest sends no NDIS config: no 802.1Q PPIs for it.
    let mut host = HostedClient::connect(a.server.path(), 48 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let opts = NetvscOptions {
        versions: vec![nvsp::version::V1],
        ..Default::default()
    };
    let mut c = NetvscClient::connect(&mut host, &offer, &opts).unwrap();
    assert_eq!(c.version, nvsp::version::V1);
    assert_eq!(
        &c.offload[..4],
        &[0xa7, 1, 112, 0],
        "NDIS 6.0 offload object"
    );
    let mut tagged = tcp4_frame(c.mac, PEER_MAC, 10);
    tagged.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    probe.ingress(&mut vec![Frame::new(Bytes::from(tagged.clone()))]);
    let got = receive(&mut c, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, tagged, "the tag stays in the frame");
    assert_eq!(got[0].1.vlan, None);
    drop(c);
    drop(host);
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.nic.is_open() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(!a.nic.is_open(), "the NIC is free once its guest left");

    // A guest whose MTU is 1000 (SEND_NDIS_CONFIG says 1014) gets frames up
    // to 1014 bytes; larger ones are dropped and counted.
    let mut host = HostedClient::connect(a.server.path(), 48 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let opts = NetvscOptions {
        mtu: 1000,
        ..Default::default()
    };
    let mut c = NetvscClient::connect(&mut host, &offer, &opts).unwrap();
    let fits = tcp4_frame(c.mac, PEER_MAC, 1014 - 54);
    let big = tcp4_frame(c.mac, PEER_MAC, 1015 - 54);
    probe.ingress(&mut vec![
        Frame::new(Bytes::from(big)),
        Frame::new(Bytes::from(fits.clone())),
    ]);
    let got = receive(&mut c, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, fits);
    assert_eq!(a.nic.stats().drop_rx_oversize, 1);
}

/// `rndis_filter_device_add` (drivers/net/hyperv/rndis_filter.c, Linux
/// 6.1) queries OID_GEN_RECEIVE_SCALE_CAPABILITIES into a
/// `struct ndis_recv_scale_cap` (`__packed`, 18 bytes, hyperv_net.h) and
/// `rndis_filter_query_device` fails when `query_complete->info_buflen >
/// inresult_size`; then `if (ret || rsscap.num_recv_que < 2) goto out;`
/// leaves the NIC on one channel.
#[test]
fn rss_capabilities_pass_rndis_filter_query_device() {
    let a = appliance(4);
    let mut host = HostedClient::connect(a.server.path(), 48 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let mut c = NetvscClient::connect(&mut host, &offer, &NetvscOptions::default()).unwrap();
    let req = 77;
    let r = c
        .request(
            &oid_message(
                rndis::msg::QUERY,
                req,
                rndis::oid::GEN_RECEIVE_SCALE_CAPABILITIES,
                &[],
            ),
            Placement::PageStart,
        )
        .unwrap();
    let word = |at: usize| u32::from_le_bytes(r[at..at + 4].try_into().unwrap());
    let (msg_len, info_buflen, info_buf_offset) = (word(4), word(16), word(20));
    const RNDIS_HEADER_SIZE: u32 = 8;
    const SIZEOF_RNDIS_QUERY_COMPLETE: u32 = 16;
    const SIZEOF_NDIS_RECV_SCALE_CAP: u32 = 18;
    assert!(msg_len - RNDIS_HEADER_SIZE >= SIZEOF_RNDIS_QUERY_COMPLETE);
    assert!(
        info_buflen <= SIZEOF_NDIS_RECV_SCALE_CAP,
        "info_buflen {info_buflen} > sizeof(struct ndis_recv_scale_cap)"
    );
    assert!(info_buf_offset >= SIZEOF_RNDIS_QUERY_COMPLETE);
    assert!(msg_len - RNDIS_HEADER_SIZE >= info_buf_offset);
    assert!(msg_len - RNDIS_HEADER_SIZE - info_buf_offset >= info_buflen);
    // rsscap.num_recv_que (offset 12 in the packed struct) >= 2.
    let at = (RNDIS_HEADER_SIZE + info_buf_offset) as usize;
    let num_recv_que = word(at + 12);
    assert_eq!(num_recv_que, 4);
    // The client, which applies the same checks, uses the queues.
    assert_eq!(c.rss_queues, Some(4));
}

/// `rndis_netdev_set_hwcaps` (rndis_filter.c, Linux 6.1) turns on TSO6
/// only `if ((hwcaps.lsov2.ip6_encap & NDIS_OFFLOAD_ENCAP_8023) &&
/// (hwcaps.lsov2.ip6_opts & NDIS_LSOV2_CAP_IP6) == NDIS_LSOV2_CAP_IP6)`,
/// inside `(hwcaps.csum.ip6_txcsum & NDIS_TXCSUM_ALL_TCP6) ==
/// NDIS_TXCSUM_ALL_TCP6`. hyperv_net.h: NDIS_OFFLOAD_ENCAP_8023 = 0x2,
/// NDIS_LSOV2_CAP_IP6 = IP6EXT 0x001 | TCP6OPT 0x004, NDIS_TXCSUM_ALL_TCP6 =
/// TCP6 0x010 | TCP6OPT 0x004 | IP6EXT 0x001. `struct ndis_offload` is not
/// packed: csum.ip6_txcsum at 24, lsov2.ip6_encap at 92, ip6_opts at 104;
/// `rndis_query_hwcaps` wants type NDIS_OBJECT_TYPE_OFFLOAD (0xa7),
/// revision >= 1 and 112 <= header.size <= the bytes returned.
#[test]
fn offload_capabilities_give_linux_tso6() {
    let a = appliance(1);
    let mut host = HostedClient::connect(a.server.path(), 48 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let mut c = NetvscClient::connect(&mut host, &offer, &NetvscOptions::default()).unwrap();
    assert_eq!(c.version, nvsp::version::V61);
    // What Linux sends for NVSP >= 5: a revision 3, 156-byte header.
    let mut input = vec![0u8; 156];
    input[..4].copy_from_slice(&[0xa7, 3, 156, 0]);
    let hw = c
        .query_linux(
            rndis::oid::TCP_OFFLOAD_HARDWARE_CAPABILITIES,
            &input,
            156,
            Placement::PageStart,
        )
        .unwrap()
        .expect("rndis_filter_query_device accepts the reply");
    let word = |at: usize| u32::from_le_bytes(hw[at..at + 4].try_into().unwrap());
    assert_eq!(hw[0], 0xa7, "NDIS_OBJECT_TYPE_OFFLOAD");
    assert!(hw[1] >= 1, "revision");
    let size = usize::from(u16::from_le_bytes([hw[2], hw[3]]));
    assert!((112..=hw.len()).contains(&size), "header.size {size}");
    const ALL_TCP6: u32 = 0x010 | 0x004 | 0x001;
    const LSOV2_CAP_IP6: u32 = 0x001 | 0x004;
    assert_eq!(word(24) & ALL_TCP6, ALL_TCP6, "csum.ip6_txcsum");
    assert_ne!(
        word(92) & 0x2,
        0,
        "lsov2.ip6_encap & NDIS_OFFLOAD_ENCAP_8023"
    );
    assert_eq!(word(104) & LSOV2_CAP_IP6, LSOV2_CAP_IP6, "lsov2.ip6_opts");
    assert!(c.features.tso6, "{:?}", c.features);
}

/// `netvsc_switch_datapath` (drivers/net/hyperv/netvsc.c, Linux 6.1)
/// sends NVSP_MSG4_TYPE_SWITCH_DATA_PATH with a completion requested and
/// then `wait_for_completion(&nv_dev->channel_init_wait)`; only
/// `netvsc_send_completion`'s `if (!msglen)` branch completes it for that
/// type. A completion with a payload of type 129 is "Unknown send
/// completion type" and the guest waits forever with RTNL held.
#[test]
fn switch_data_path_gets_the_empty_completion_linux_waits_for() {
    let a = appliance(1);
    let (mut c, _host, _probe) = connected(&a, OffloadCaps::ALL);
    for datapath in [2u32, 1] {
        let m = NvspMessage::new(
            nvsp::msg::SWITCH_DATA_PATH,
            &nvsp::SwitchDataPath {
                active_datapath: datapath.into(),
            },
        );
        send_nvsp(&mut c.channels[0], 0x5d, true, &m).unwrap();
        let payload = loop {
            match wait_packet(&mut c.channels[0], Duration::from_secs(5)).unwrap() {
                HostPacket::Completion { tid: 0x5d, payload } => break payload,
                _ => continue,
            }
        };
        assert_eq!(
            client::linux::send_completion(&payload),
            Ok(client::linux::Completion::Empty),
            "{payload:?}"
        );
    }
    assert_eq!(a.nic.stats().bad_nvsp, 0, "not a refusal");
    // The NIC carries on.
    assert!(
        c.query(rndis::oid::GEN_LINK_SPEED, &[], Placement::PageStart)
            .is_ok()
    );
}

/// `netvsc_receive` (netvsc.c, Linux 6.1) drops every range longer than
/// `recv_section_size` (`if (unlikely(buflen > net_device->recv_section_size))`
/// → NVSP_STAT_FAIL), and `rndis_filter_query_device` then waits forever
/// for the reply. The section size follows the guest's MTU; at Linux's
/// smallest (68) the QUERY_COMPLETE of a 127-character FRIENDLY_NAME
/// (`rndis_get_friendly_name`, 512-byte result) is 280 bytes, and must
/// still fit.
#[test]
fn control_replies_fit_the_receive_section_at_the_smallest_mtu() {
    let name: String = (0..127)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let a = appliance_with(|cfg| {
        cfg.channels = 1;
        cfg.name = name.clone();
    });
    let mut host = HostedClient::connect(a.server.path(), 48 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let opts = NetvscOptions {
        mtu: client::linux::MTU_MIN,
        ..Default::default()
    };
    // The client applies netvsc_receive's range checks to every reply.
    let c = NetvscClient::connect(&mut host, &offer, &opts).unwrap();
    assert_eq!(c.friendly_name.as_deref(), Some(name.as_str()));
    assert!(c.recv_sub_alloc.0 >= 280, "{:?}", c.recv_sub_alloc);
    // netvsc_init_buf's own bounds hold too.
    assert!(c.recv_sub_alloc.0 >= client::linux::MTU_MIN);
}

/// `rndis_set_subchannel` (rndis_filter.c, Linux 6.1): `if
/// (init_packet->msg.v5_msg.subchn_comp.num_subchannels > nvdev->num_chn -
/// 1) return -EINVAL;` — a 2-CPU guest on a 4-channel NIC asks for one
/// sub-channel and must get at most one, then `netvsc_sc_open` opens only
/// `chn_index < num_chn`.
#[test]
fn a_guest_asking_for_fewer_subchannels_gets_no_more() {
    let a = appliance(4);
    let mut host = HostedClient::connect(a.server.path(), 48 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let c = NetvscClient::connect(&mut host, &offer, &NetvscOptions::linux(2)).unwrap();
    assert_eq!(c.rss_queues, Some(4));
    assert_eq!(c.channels.len(), 2, "num_chn = min(cpus, queues)");
    let idx: Vec<u16> = c
        .channels
        .iter()
        .map(|ch| ch.offer.subchannel_index)
        .collect();
    assert_eq!(idx, vec![0, 1]);
}

/// `rndis_filter_set_offload_params` (rndis_filter.c, Linux 6.1) sends a
/// 22-byte `ndis_offload_params` (VERSION_4_OFFLOAD_SIZE) for NVSP 4 and
/// older, and `if (set_complete->status != RNDIS_STATUS_SUCCESS)` fails
/// `rndis_netdev_set_hwcaps`, hence `rndis_filter_device_add`.
#[test]
fn nvsp4_guests_get_their_22_byte_offload_parameters_accepted() {
    let a = appliance(1);
    let mut host = HostedClient::connect(a.server.path(), 48 << 20).unwrap();
    let offer = host.request_offers().unwrap().remove(0);
    let opts = NetvscOptions {
        versions: vec![nvsp::version::V4],
        ..Default::default()
    };
    let mut c = NetvscClient::connect(&mut host, &offer, &opts).unwrap();
    assert_eq!(c.version, nvsp::version::V4);
    let params = client::linux::offload_params(&c.features, c.version);
    assert_eq!(params.len(), 22);
    let st = c
        .set(
            rndis::oid::TCP_OFFLOAD_PARAMETERS,
            &params,
            Placement::PageStart,
        )
        .unwrap();
    assert_eq!(st, rndis::status::SUCCESS);
    assert!(c.features.tso4 && c.features.csum_tcp4);
}
