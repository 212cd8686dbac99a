//! Unit tests of the switch core: each feature, with frames delivered or
//! dropped and the counters that say so.

use crate::frame::tests::{A, B, dhcp, eth, ipv4, ipv6, udp};
use crate::frame::{Delivery, Frame, Gso, GsoKind, Offload, OffloadCaps, PartialCsum};
use crate::policy::{AclRule, Action, Direction};
use crate::policy::{PortPolicy, VlanPolicy};
use crate::wire::{ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPPROTO_ICMPV6, IPPROTO_UDP, MacAddr};
use crate::{PortHandle, PortSpec, Switch};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use vmbus::event::Epoll;

const C: MacAddr = MacAddr([2, 0, 0, 0, 0, 0xc]);
const BCAST: MacAddr = MacAddr::BROADCAST;

fn spec(name: &str, policy: PortPolicy) -> PortSpec {
    PortSpec {
        policy,
        ..PortSpec::new(name, OffloadCaps::ALL)
    }
}

fn plain(n: usize) -> Vec<PortSpec> {
    (0..n)
        .map(|i| spec(&format!("p{i}"), PortPolicy::default()))
        .collect()
}

fn rig(specs: Vec<PortSpec>) -> (Arc<Switch>, Vec<PortHandle>) {
    let sw = Switch::new("t", 1024, 300);
    let ports = specs.into_iter().map(|s| sw.add_port(s).unwrap()).collect();
    (sw, ports)
}

fn send(h: &mut PortHandle, frame: Vec<u8>) {
    h.ingress(&mut vec![Frame::new(Bytes::from(frame))]);
}

fn recv(h: &mut PortHandle) -> Vec<Delivery> {
    let mut out = Vec::new();
    h.drain(&mut out, usize::MAX);
    out
}

/// Frames each port has queued, draining them.
fn counts(ports: &mut [PortHandle]) -> Vec<usize> {
    ports.iter_mut().map(|p| recv(p).len()).collect()
}

fn ip_frame(dst: MacAddr, src: MacAddr, tag: Option<u16>) -> Vec<u8> {
    let l3 = ipv4(
        [10, 0, 0, 1],
        [10, 0, 0, 2],
        IPPROTO_UDP,
        &udp(1000, 2000, b"data"),
    );
    eth(dst, src, tag, ETHERTYPE_IPV4, &l3)
}

#[test]
fn learns_sources_floods_unknown_and_forwards_known_unicast() {
    let (sw, mut p) = rig(plain(3));
    send(&mut p[0], ip_frame(BCAST, A, None));
    assert_eq!(
        counts(&mut p),
        [0, 1, 1],
        "broadcast floods to all but the sender"
    );
    send(&mut p[1], ip_frame(C, B, None));
    assert_eq!(counts(&mut p), [1, 0, 1], "unknown unicast floods");
    send(&mut p[1], ip_frame(A, B, None));
    assert_eq!(
        counts(&mut p),
        [1, 0, 0],
        "known unicast goes to the learned port"
    );
    send(&mut p[0], ip_frame(B, A, None));
    assert_eq!(counts(&mut p), [0, 1, 0]);
    let mcast = MacAddr([0x01, 0, 0x5e, 0, 0, 1]);
    send(&mut p[2], ip_frame(mcast, C, None));
    assert_eq!(counts(&mut p), [1, 1, 0], "multicast floods");
    assert_eq!(sw.mac_entries(), 3);
    let s0 = p[0].stats();
    assert_eq!((s0.rx_frames, s0.tx_frames, s0.flooded), (2, 3, 1));
    assert_eq!(p[1].stats().flooded, 1);
    // The frames are the sender's buffers, not copies.
    let frame = Bytes::from(ip_frame(B, A, None));
    p[0].ingress(&mut vec![Frame::new(frame.clone())]);
    let got = recv(&mut p[1]);
    assert_eq!(got[0].data.as_ptr(), frame.as_ptr());
}

#[test]
fn station_moves_and_same_port_filtering() {
    let (sw, mut p) = rig(plain(3));
    send(&mut p[0], ip_frame(BCAST, A, None));
    send(&mut p[1], ip_frame(BCAST, A, None));
    assert_eq!(sw.stats().mac_moves, 1);
    counts(&mut p);
    send(&mut p[2], ip_frame(A, C, None));
    assert_eq!(counts(&mut p), [0, 1, 0], "follows the move");
    send(&mut p[1], ip_frame(BCAST, B, None));
    counts(&mut p);
    send(&mut p[1], ip_frame(B, A, None));
    assert_eq!(counts(&mut p), [0, 0, 0]);
    assert_eq!(p[1].stats().drop_same_port, 1);
}

#[test]
fn learned_stations_age_out() {
    let sw = Switch::new("t", 64, 1);
    let mut p: Vec<_> = plain(3)
        .into_iter()
        .map(|s| sw.add_port(s).unwrap())
        .collect();
    send(&mut p[0], ip_frame(BCAST, A, None));
    counts(&mut p);
    send(&mut p[1], ip_frame(A, B, None));
    assert_eq!(counts(&mut p), [1, 0, 0], "fresh entry: unicast");
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(sw.mac_entries(), 0);
    send(&mut p[1], ip_frame(A, B, None));
    assert_eq!(counts(&mut p), [1, 0, 1], "aged out: flooded again");
}

#[test]
fn bounded_table_counts_what_it_cannot_learn() {
    let sw = Switch::new("t", 16, 300);
    let mut p: Vec<_> = plain(2)
        .into_iter()
        .map(|s| sw.add_port(s).unwrap())
        .collect();
    for n in 0..100u8 {
        send(
            &mut p[0],
            ip_frame(BCAST, MacAddr([2, 1, 0, 0, 0, n]), None),
        );
    }
    assert_eq!(sw.mac_entries(), 16);
    assert_eq!(sw.stats().learn_table_full, 84);
    assert_eq!(
        counts(&mut p),
        [0, 100],
        "unlearned stations still get through"
    );
}

#[test]
fn access_vlans_separate_traffic() {
    let (_sw, mut p) = rig(vec![
        spec(
            "a10",
            PortPolicy {
                vlan: VlanPolicy::access(10),
                ..Default::default()
            },
        ),
        spec(
            "a20",
            PortPolicy {
                vlan: VlanPolicy::access(20),
                ..Default::default()
            },
        ),
        spec(
            "b10",
            PortPolicy {
                vlan: VlanPolicy::access(10),
                ..Default::default()
            },
        ),
    ]);
    send(&mut p[0], ip_frame(BCAST, A, None));
    assert_eq!(counts(&mut p), [0, 0, 1]);
    send(&mut p[1], ip_frame(A, B, None));
    assert_eq!(
        counts(&mut p),
        [0, 0, 0],
        "A is unknown in VLAN 20, which has no other port"
    );
    send(&mut p[0], ip_frame(BCAST, A, Some(10)));
    assert_eq!(
        counts(&mut p),
        [0, 0, 0],
        "tagged frames on access ports drop"
    );
    assert_eq!(p[0].stats().drop_vlan, 1);
    send(&mut p[0], ip_frame(BCAST, A, Some(0x6000)));
    assert_eq!(
        counts(&mut p),
        [0, 0, 1],
        "priority-tagged frames are untagged ones"
    );
}

#[test]
fn trunk_tags_untags_and_filters() {
    let (_sw, mut p) = rig(vec![
        spec(
            "a10",
            PortPolicy {
                vlan: VlanPolicy::access(10),
                ..Default::default()
            },
        ),
        spec(
            "trunk",
            PortPolicy {
                vlan: VlanPolicy::trunk(&[10, 20], Some(1)),
                ..Default::default()
            },
        ),
        spec(
            "a20",
            PortPolicy {
                vlan: VlanPolicy::access(20),
                ..Default::default()
            },
        ),
        spec("a1", PortPolicy::default()),
    ]);
    send(&mut p[0], ip_frame(BCAST, A, None));
    let got = recv(&mut p[1]);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].contiguous(),
        ip_frame(BCAST, A, Some(10)),
        "tagged on the trunk"
    );
    assert_eq!(counts(&mut p), [0, 0, 0, 0]);

    send(&mut p[1], ip_frame(BCAST, B, Some(0xa014))); // PCP 5, VLAN 20
    let got = recv(&mut p[2]);
    assert_eq!(
        got[0].contiguous(),
        ip_frame(BCAST, B, None),
        "untagged to access"
    );
    assert_eq!(counts(&mut p), [0, 0, 0, 0]);

    send(&mut p[1], ip_frame(BCAST, B, None));
    assert_eq!(
        counts(&mut p),
        [0, 0, 0, 1],
        "untagged on the trunk is the native VLAN"
    );

    send(&mut p[1], ip_frame(BCAST, B, Some(30)));
    assert_eq!(counts(&mut p), [0, 0, 0, 0]);
    assert_eq!(p[1].stats().drop_vlan, 1, "VLAN 30 is not allowed");
}

#[test]
fn trunk_to_trunk_keeps_tag_and_priority() {
    let trunk = || PortPolicy {
        vlan: VlanPolicy::trunk(&[10], None),
        ..Default::default()
    };
    let (_sw, mut p) = rig(vec![spec("t1", trunk()), spec("t2", trunk())]);
    let frame = ip_frame(BCAST, A, Some(0x200a));
    send(&mut p[0], frame.clone());
    let got = recv(&mut p[1]);
    assert!(
        !got[0].strip_tag && got[0].tag.is_none(),
        "tag bytes pass untouched"
    );
    assert_eq!(got[0].contiguous(), frame);
    send(&mut p[0], ip_frame(BCAST, A, None));
    assert_eq!(counts(&mut p), [0, 0], "no native VLAN: untagged dropped");
    assert_eq!(p[0].stats().drop_vlan, 1);
}

#[test]
fn mac_spoofing_guard() {
    let guarded = PortPolicy {
        allowed_macs: Some(vec![A]),
        ..Default::default()
    };
    let (_sw, mut p) = rig(vec![spec("vm", guarded), spec("p1", PortPolicy::default())]);
    send(&mut p[0], ip_frame(BCAST, B, None));
    assert_eq!(counts(&mut p), [0, 0]);
    assert_eq!(p[0].stats().drop_spoof, 1);
    send(&mut p[0], ip_frame(BCAST, A, None));
    assert_eq!(counts(&mut p), [0, 1]);
}

#[test]
fn dhcp_guard_drops_server_messages_only() {
    let guarded = PortPolicy {
        dhcp_guard: true,
        ..Default::default()
    };
    let (_sw, mut p) = rig(vec![spec("vm", guarded), spec("p1", PortPolicy::default())]);
    let reply = ipv4([10, 0, 0, 1], [255; 4], IPPROTO_UDP, &udp(67, 68, &dhcp(2)));
    send(&mut p[0], eth(BCAST, A, None, ETHERTYPE_IPV4, &reply));
    let v6_reply = ipv6(IPPROTO_UDP, &udp(547, 546, b"advertise"));
    send(&mut p[0], eth(BCAST, A, None, ETHERTYPE_IPV6, &v6_reply));
    assert_eq!(counts(&mut p), [0, 0]);
    assert_eq!(p[0].stats().drop_dhcp_guard, 2);
    let request = ipv4([0; 4], [255; 4], IPPROTO_UDP, &udp(68, 67, &dhcp(1)));
    send(&mut p[0], eth(BCAST, A, None, ETHERTYPE_IPV4, &request));
    assert_eq!(counts(&mut p), [0, 1], "clients may still ask");
    // Without the guard a server reply passes.
    send(&mut p[1], eth(BCAST, B, None, ETHERTYPE_IPV4, &reply));
    assert_eq!(counts(&mut p), [1, 0]);
}

#[test]
fn router_advertisement_guard() {
    let guarded = PortPolicy {
        ra_guard: true,
        ..Default::default()
    };
    let (_sw, mut p) = rig(vec![spec("vm", guarded), spec("p1", PortPolicy::default())]);
    let all_nodes = MacAddr([0x33, 0x33, 0, 0, 0, 1]);
    for icmp_type in [134u8, 137] {
        let ra = ipv6(IPPROTO_ICMPV6, &[icmp_type, 0, 0, 0, 0, 0, 0, 0]);
        send(&mut p[0], eth(all_nodes, A, None, ETHERTYPE_IPV6, &ra));
    }
    // An RA hidden behind a hop-by-hop header is found too.
    let mut hbh = vec![IPPROTO_ICMPV6, 0, 1, 4, 0, 0, 0, 0];
    hbh.extend_from_slice(&[134, 0, 0, 0, 0, 0, 0, 0]);
    send(
        &mut p[0],
        eth(all_nodes, A, None, ETHERTYPE_IPV6, &ipv6(0, &hbh)),
    );
    assert_eq!(counts(&mut p), [0, 0]);
    assert_eq!(p[0].stats().drop_ra_guard, 3);
    let ns = ipv6(IPPROTO_ICMPV6, &[135, 0, 0, 0, 0, 0, 0, 0]);
    send(&mut p[0], eth(all_nodes, A, None, ETHERTYPE_IPV6, &ns));
    assert_eq!(counts(&mut p), [0, 1], "neighbour solicitations pass");
}

fn rule(direction: Direction, action: Action) -> AclRule {
    AclRule {
        direction,
        action,
        src_mac: None,
        dst_mac: None,
        src_ip: None,
        dst_ip: None,
    }
}

#[test]
fn acls_by_direction_mac_and_ip() {
    let out_deny = AclRule {
        dst_ip: Some("10.0.0.2/32".parse().unwrap()),
        ..rule(Direction::Outbound, Action::Deny)
    };
    let in_allow = AclRule {
        src_mac: Some(C),
        ..rule(Direction::Inbound, Action::Allow)
    };
    let in_deny = AclRule {
        src_ip: Some("10.0.0.0/8".parse().unwrap()),
        ..rule(Direction::Inbound, Action::Deny)
    };
    let (_sw, mut p) = rig(vec![
        spec(
            "p0",
            PortPolicy {
                acl: vec![out_deny],
                ..Default::default()
            },
        ),
        spec(
            "p1",
            PortPolicy {
                acl: vec![in_allow, in_deny],
                ..Default::default()
            },
        ),
        spec("p2", PortPolicy::default()),
    ]);
    send(&mut p[0], ip_frame(BCAST, A, None));
    assert_eq!(counts(&mut p), [0, 0, 0], "outbound deny on the sender");
    assert_eq!(p[0].stats().drop_acl_outbound, 1);
    let other = ipv4([10, 0, 0, 1], [10, 0, 0, 3], IPPROTO_UDP, &udp(1, 2, b""));
    send(&mut p[0], eth(BCAST, A, None, ETHERTYPE_IPV4, &other));
    assert_eq!(
        counts(&mut p),
        [0, 0, 1],
        "inbound deny on p1 by source prefix"
    );
    assert_eq!(p[1].stats().drop_acl_inbound, 1);
    send(&mut p[2], eth(BCAST, C, None, ETHERTYPE_IPV4, &other));
    assert_eq!(
        counts(&mut p),
        [1, 1, 0],
        "the earlier allow rule wins for C"
    );
    send(&mut p[2], eth(BCAST, B, None, 0x88b5, b"not ip"));
    assert_eq!(
        counts(&mut p),
        [1, 1, 0],
        "IP rules do not match non-IP frames"
    );
}

#[test]
fn mirrors_both_directions_of_a_port() {
    let (_sw, mut p) = rig(vec![
        spec(
            "p0",
            PortPolicy {
                mirror: Some("mon".into()),
                ..Default::default()
            },
        ),
        spec("p1", PortPolicy::default()),
        spec(
            "mon",
            PortPolicy {
                vlan: VlanPolicy::none(),
                ..Default::default()
            },
        ),
    ]);
    send(&mut p[0], ip_frame(BCAST, A, None));
    send(&mut p[1], ip_frame(A, B, None));
    send(&mut p[1], ip_frame(BCAST, C, None));
    let mirrored = recv(&mut p[2]);
    assert_eq!(mirrored.len(), 3, "received by p0 once, sent to p0 twice");
    assert_eq!(mirrored[0].contiguous(), ip_frame(BCAST, A, None));
    assert_eq!(mirrored[1].contiguous(), ip_frame(A, B, None));
    assert_eq!(counts(&mut p), [2, 1, 0]);
    send(&mut p[1], ip_frame(BCAST, B, None));
    assert_eq!(counts(&mut p), [1, 0, 1]);
}

#[test]
fn storm_control_limits_broadcast_and_multicast_only() {
    let limited = PortPolicy {
        storm_limit_pps: Some(10),
        ..Default::default()
    };
    let (_sw, mut p) = rig(vec![spec("p0", limited), spec("p1", PortPolicy::default())]);
    let mut batch: Vec<Frame> = (0..50)
        .map(|_| Frame::new(Bytes::from(ip_frame(BCAST, A, None))))
        .collect();
    p[0].ingress(&mut batch);
    assert_eq!(counts(&mut p), [0, 10]);
    assert_eq!(p[0].stats().drop_storm, 40);
    send(&mut p[1], ip_frame(BCAST, B, None));
    let mut unicast: Vec<Frame> = (0..50)
        .map(|_| Frame::new(Bytes::from(ip_frame(B, A, None))))
        .collect();
    counts(&mut p);
    p[0].ingress(&mut unicast);
    assert_eq!(counts(&mut p), [0, 50]);
}

#[test]
fn ingress_and_egress_rate_limits() {
    let (_sw, mut p) = rig(vec![
        spec(
            "in",
            PortPolicy {
                ingress_limit_mbps: Some(1),
                ..Default::default()
            },
        ),
        spec(
            "out",
            PortPolicy {
                egress_limit_mbps: Some(1),
                ..Default::default()
            },
        ),
        spec("free", PortPolicy::default()),
    ]);
    // 1 Mbit/s: a 128 KiB burst, then (almost) nothing within the test.
    let big = |src| {
        let l3 = ipv4([1; 4], [2; 4], IPPROTO_UDP, &udp(1, 2, &[0u8; 1400]));
        eth(BCAST, src, None, ETHERTYPE_IPV4, &l3)
    };
    let mut batch: Vec<Frame> = (0..200).map(|_| Frame::new(Bytes::from(big(A)))).collect();
    p[0].ingress(&mut batch);
    let passed = recv(&mut p[2]).len();
    assert!(
        (90..=95).contains(&passed),
        "{passed} of 200 within the burst"
    );
    assert_eq!(p[0].stats().drop_ingress_rate, 200 - passed as u64);
    let limited_out = recv(&mut p[1]).len();
    assert!(
        (90..=95).contains(&limited_out),
        "{limited_out}: egress limit on drain"
    );
    assert_eq!(p[1].stats().drop_egress_rate, (passed - limited_out) as u64);
    assert_eq!(p[1].stats().tx_frames, limited_out as u64);
}

#[test]
fn full_queue_drops_and_counts() {
    let mut specs = plain(2);
    specs[1].queue_len = 4;
    let (_sw, mut p) = rig(specs);
    let mut batch: Vec<Frame> = (0..10)
        .map(|_| Frame::new(Bytes::from(ip_frame(BCAST, A, None))))
        .collect();
    p[0].ingress(&mut batch);
    assert_eq!(counts(&mut p), [0, 4]);
    assert_eq!(p[1].stats().drop_queue_full, 6);
}

#[test]
fn malformed_frames_drop_and_count() {
    let (_sw, mut p) = rig(plain(2));
    send(&mut p[0], vec![0; 10]);
    send(
        &mut p[0],
        ip_frame(BCAST, MacAddr([1, 0, 0, 0, 0, 1]), None),
    );
    send(&mut p[0], ip_frame(BCAST, MacAddr([0; 6]), None));
    let mut bad_ip = ip_frame(BCAST, A, None);
    bad_ip[14] = 0x4f; // IHL past the packet
    send(&mut p[0], bad_ip);
    assert_eq!(counts(&mut p), [0, 0]);
    assert_eq!(p[0].stats().drop_malformed, 4);
    assert_eq!(p[0].stats().rx_frames, 4);
}

/// A 3000-byte TCP payload as a GSO frame with a partial checksum.
fn gso_frame() -> Frame {
    let mut tcp = vec![0u8; 20];
    tcp[12] = 0x50;
    tcp[13] = 0x18;
    tcp.extend(std::iter::repeat_n(7u8, 3000));
    let l3 = ipv4([10, 0, 0, 1], [10, 0, 0, 2], 6, &tcp);
    Frame {
        data: Bytes::from(eth(B, A, None, ETHERTYPE_IPV4, &l3)),
        offload: Offload {
            csum: Some(PartialCsum {
                start: 34,
                offset: 16,
            }),
            gso: Some(Gso {
                kind: GsoKind::Tcp4,
                mss: 1448,
                ecn: false,
            }),
        },
    }
}

#[test]
fn gso_frames_stay_whole_for_capable_ports_and_are_segmented_for_others() {
    let sw = Switch::new("t", 64, 300);
    let mut src = sw.add_port(PortSpec::new("src", OffloadCaps::ALL)).unwrap();
    let mut tso = sw.add_port(PortSpec::new("tso", OffloadCaps::ALL)).unwrap();
    let mut csum_only = sw
        .add_port(PortSpec::new(
            "csum",
            OffloadCaps {
                csum: true,
                ..OffloadCaps::NONE
            },
        ))
        .unwrap();
    let mut none = sw
        .add_port(PortSpec::new("none", OffloadCaps::NONE))
        .unwrap();
    let frame = gso_frame();
    src.ingress(&mut vec![frame.clone()]);
    let whole = recv(&mut tso);
    assert_eq!(whole.len(), 1);
    assert_eq!(whole[0].data, frame.data);
    assert_eq!(whole[0].offload, frame.offload);
    for port in [&mut csum_only, &mut none] {
        let segs = recv(port);
        assert_eq!(segs.len(), 3);
        assert!(
            segs.iter()
                .all(|s| s.offload == Offload::default() && s.len() <= 1514)
        );
        let total: usize = segs.iter().map(|s| s.len() - 54).sum();
        assert_eq!(total, 3000);
    }
    // Malformed offload metadata costs only the frames that need the fallback.
    let mut bad = gso_frame();
    bad.offload.gso = Some(Gso {
        kind: GsoKind::Tcp6,
        mss: 1448,
        ecn: false,
    });
    src.ingress(&mut vec![bad]);
    assert_eq!(recv(&mut tso).len(), 1);
    assert_eq!(recv(&mut none).len(), 0);
    assert_eq!(none.stats().drop_offload, 1);
}

#[test]
fn partial_checksums_are_completed_for_ports_without_offload() {
    let sw = Switch::new("t", 64, 300);
    let mut src = sw.add_port(PortSpec::new("src", OffloadCaps::ALL)).unwrap();
    let mut none = sw
        .add_port(PortSpec::new("none", OffloadCaps::NONE))
        .unwrap();
    let mut f = Frame::new(Bytes::from(ip_frame(BCAST, A, None)));
    f.offload.csum = Some(PartialCsum {
        start: 34,
        offset: 6,
    });
    src.ingress(&mut vec![f.clone()]);
    let got = recv(&mut none);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].offload, Offload::default());
    assert_ne!(&got[0].data[40..42], &[0, 0], "checksum filled in");
    assert_eq!(got[0].data[..40], f.data[..40]);
}

#[test]
fn doorbell_wakes_a_sleeping_owner_only() {
    let (_sw, mut p) = rig(plain(2));
    let ep = Epoll::new().unwrap();
    ep.add(p[1].doorbell_fd(), 1).unwrap();
    let mut ready = Vec::new();
    let mut wait = |ms| {
        ep.wait(Some(Duration::from_millis(ms)), &mut ready)
            .unwrap();
        ready.len()
    };
    send(&mut p[0], ip_frame(BCAST, A, None));
    assert_eq!(wait(0), 0, "awake owner: no doorbell");
    assert!(!p[1].prepare_sleep(), "frames queued: do not sleep");
    counts(&mut p);
    assert!(p[1].prepare_sleep());
    send(&mut p[0], ip_frame(BCAST, A, None));
    assert_eq!(wait(1000), 1, "doorbell rung");
    p[1].woke(true);
    assert_eq!(wait(0), 0, "reset after wake-up");
    assert_eq!(p[1].queued(), 1);
}

#[test]
fn frames_cross_threads_without_loss_when_queues_have_room() {
    let sw = Switch::new("t", 64, 300);
    let mut tx = sw.add_port(PortSpec::new("tx", OffloadCaps::ALL)).unwrap();
    let mut rx = sw
        .add_port(PortSpec {
            queue_len: 4096,
            ..PortSpec::new("rx", OffloadCaps::ALL)
        })
        .unwrap();
    const N: usize = 20_000;
    let reader = std::thread::spawn(move || {
        let ep = Epoll::new().unwrap();
        ep.add(rx.doorbell_fd(), 1).unwrap();
        let mut got = 0;
        let mut out = Vec::new();
        while got < N {
            out.clear();
            if rx.drain(&mut out, 256) == 0 {
                if rx.prepare_sleep() {
                    ep.wait(Some(Duration::from_secs(5)), &mut Vec::new())
                        .unwrap();
                }
                rx.woke(true);
            }
            got += out.len();
        }
        (got, rx.stats())
    });
    let frame = Bytes::from(ip_frame(B, A, None));
    for _ in 0..N / 100 {
        let mut batch: Vec<Frame> = (0..100).map(|_| Frame::new(frame.clone())).collect();
        tx.ingress(&mut batch);
        // Stay within the queue's room (the reader may be gone at the end).
        let behind = || {
            sw.port_stats("rx")
                .is_some_and(|s| s.tx_frames + 2048 < tx.stats().rx_frames)
        };
        while behind() {
            std::thread::yield_now();
        }
    }
    let (got, stats) = reader.join().unwrap();
    assert_eq!(got, N);
    assert_eq!(stats.drop_queue_full, 0);
    assert_eq!(stats.tx_frames, N as u64);
}

#[test]
fn removed_ports_get_nothing_and_names_are_unique() {
    let (sw, mut p) = rig(plain(3));
    send(&mut p[2], ip_frame(BCAST, C, None));
    assert_eq!(counts(&mut p), [1, 1, 0]);
    assert!(sw.add_port(PortSpec::new("p0", OffloadCaps::ALL)).is_err());
    let gone = p.pop().unwrap();
    drop(gone);
    assert!(sw.port_stats("p2").is_none());
    send(&mut p[0], ip_frame(C, A, None));
    assert_eq!(
        counts(&mut p),
        [0, 1],
        "C forgotten with its port: flooded to the rest"
    );
    let mut again = sw.add_port(PortSpec::new("p2", OffloadCaps::ALL)).unwrap();
    send(&mut p[0], ip_frame(C, A, None));
    assert_eq!(recv(&mut again).len(), 1);
}

#[test]
fn counters_text_has_one_line_per_counter() {
    let (sw, mut p) = rig(plain(2));
    send(&mut p[0], ip_frame(BCAST, A, None));
    let mut text = String::new();
    sw.write_counters(&mut text);
    assert!(text.contains("switch.t.mac_entries 1\n"), "{text}");
    assert!(text.contains("switch.t.port.p0.rx_frames 1\n"));
    assert!(text.contains("switch.t.port.p1.tx_frames 0\n"));
    assert!(text.lines().all(|l| l.split(' ').count() == 2));
}

mod arbitrary_frames {
    use super::*;
    use proptest::prelude::*;

    /// Frames that often get past the Ethernet/IP parse: a real header chosen
    /// from a few shapes, then arbitrary bytes, with arbitrary offload state.
    fn frame() -> impl Strategy<Value = Frame> {
        let header = prop_oneof![
            Just(eth(BCAST, A, None, ETHERTYPE_IPV4, &[])),
            Just(eth(B, A, Some(10), ETHERTYPE_IPV4, &[])),
            Just(eth(BCAST, A, Some(20), ETHERTYPE_IPV6, &[])),
            Just(eth(B, A, None, ETHERTYPE_IPV6, &[])),
            Just(Vec::new()),
        ];
        let csum = proptest::option::of((0u16..2000, 0u16..64));
        let gso = proptest::option::of((any::<bool>(), 0u16..3000, any::<bool>()));
        (
            header,
            proptest::collection::vec(any::<u8>(), 0..3000),
            csum,
            gso,
        )
            .prop_map(|(mut head, tail, csum, gso)| {
                head.extend_from_slice(&tail);
                Frame {
                    data: Bytes::from(head),
                    offload: Offload {
                        csum: csum.map(|(start, offset)| PartialCsum { start, offset }),
                        gso: gso.map(|(v6, mss, ecn)| Gso {
                            kind: if v6 { GsoKind::Tcp6 } else { GsoKind::Tcp4 },
                            mss,
                            ecn,
                        }),
                    },
                }
            })
    }

    proptest! {
        #[test]
        fn any_frame_is_delivered_well_formed_or_counted(frames in proptest::collection::vec(frame(), 1..8)) {
            let guards = |vlan| PortPolicy { vlan, dhcp_guard: true, ra_guard: true, ..Default::default() };
            let sw = Switch::new("p", 64, 300);
            let mut src = sw.add_port(spec("src", guards(VlanPolicy::trunk(&[1, 10, 20], Some(1))))).unwrap();
            let mut sinks = vec![
                sw.add_port(spec("tso", guards(VlanPolicy::trunk(&[10, 20], None)))).unwrap(),
                sw.add_port(PortSpec { policy: guards(VlanPolicy::access(1)), ..PortSpec::new("none", OffloadCaps::NONE) }).unwrap(),
                sw.add_port(PortSpec { policy: guards(VlanPolicy::access(10)), ..PortSpec::new("csum", OffloadCaps { csum: true, ..OffloadCaps::NONE }) }).unwrap(),
            ];
            let n = frames.len() as u64;
            src.ingress(&mut frames.clone());
            prop_assert_eq!(src.stats().rx_frames, n);
            for sink in &mut sinks {
                let caps_none = sink.name() != "tso";
                for d in recv(sink) {
                    let mut tag = [0; 4];
                    let len: usize = d.parts(&mut tag).iter().map(|p| p.len()).sum();
                    prop_assert_eq!(len, d.len());
                    prop_assert!(len >= 14);
                    if caps_none {
                        prop_assert!(d.offload.gso.is_none());
                    }
                }
            }
        }
    }
}
