//! The VXLAN port over loopback: encapsulation bytes checked by hand,
//! checksum completion, TCP GSO frames leaving as UDP GSO datagrams that
//! the kernel cuts into exact VXLAN packets, VNI <-> VLAN mapping both
//! ways, learning, the drop counters, and the configuration table.

use super::wire::VxlanHdr;
use super::*;
use crate::frame::tests::{A, B, eth, ipv4};
use crate::frame::{Delivery, Frame, Gso, GsoKind, Offload, PartialCsum};
use crate::offload::{fold, ones_sum};
use crate::port::Port;
use bytes::Bytes;
use std::net::UdpSocket;
use std::time::{Duration, Instant};
use zerocopy::IntoBytes;

fn config(text: &str) -> VxlanConfig {
    toml::from_str(text).unwrap()
}

/// A peer VTEP: a plain UDP socket on loopback.
fn peer(ip: &str) -> (UdpSocket, SocketAddr) {
    let s = UdpSocket::bind(format!("{ip}:0")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let a = s.local_addr().unwrap();
    (s, a)
}

fn port_with(extra: &str, remotes: &[SocketAddr]) -> VxlanPort {
    let list: Vec<String> = remotes.iter().map(|r| format!("{r:?}")).collect();
    let cfg = config(&format!(
        "local = \"127.0.0.1:0\"\nremotes = {list:?}\nudp_csum = true\n{extra}"
    ));
    open(&cfg)
}

/// Opens `cfg` as an access port of VLAN 1.
fn open(cfg: &VxlanConfig) -> VxlanPort {
    let spec = cfg.validate(&crate::config::VlanMode::default()).unwrap();
    VxlanPort::open("sw", "vx", &spec).unwrap()
}

fn send(port: &mut VxlanPort, d: Delivery) {
    port.send_batch(&mut vec![d]).unwrap();
}

fn plain(data: Vec<u8>) -> Delivery {
    Delivery {
        data: Bytes::from(data),
        offload: Offload::default(),
        strip_tag: false,
        tag: None,
    }
}

/// Receives one datagram: its bytes and source.
fn recv(s: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65_536];
    let (n, from) = s.recv_from(&mut buf).expect("a datagram");
    buf.truncate(n);
    (buf, from)
}

/// Polls the port until `n` frames came in (2 s at most).
fn frames_in(port: &mut VxlanPort, n: usize) -> Vec<Frame> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while out.len() < n && Instant::now() < deadline {
        port.recv_batch(&mut out, 64).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    out
}

/// Polls until the port's counters satisfy `f` (2 s at most).
fn until(port: &mut VxlanPort, f: impl Fn(&VxlanStats) -> bool) -> VxlanStats {
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut out = Vec::new();
    loop {
        port.recv_batch(&mut out, 64).unwrap();
        let s = port.shared().stats();
        if f(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn arp_frame(src: MacAddr) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&src.0);
    arp.extend_from_slice(&[192, 168, 42, 1, 0, 0, 0, 0, 0, 0, 192, 168, 42, 2]);
    eth(MacAddr::BROADCAST, src, None, 0x0806, &arp)
}

#[test]
fn encapsulates_with_the_exact_header_from_an_ephemeral_port() {
    let (r, ra) = peer("127.0.0.1");
    let mut port = port_with("vni = 42", &[ra]);
    let f = arp_frame(A);
    send(&mut port, plain(f.clone()));
    let (got, from) = recv(&r);
    assert_eq!(got[..8], [0x08, 0, 0, 0, 0, 0, 0x2a, 0]);
    assert_eq!(got[8..], f[..]);
    assert_ne!(
        from.port(),
        port.local_addr().unwrap().port(),
        "not the listening port"
    );
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let bounds: Vec<u16> = range
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert!(
        (bounds[0]..=bounds[1]).contains(&from.port()),
        "{from} in {range}"
    );
    let s = port.shared().stats();
    assert_eq!((s.tx_packets, s.tx_bytes), (1, f.len() as u64));
    assert_eq!(
        port.shared()
            .remote(ra.ip())
            .unwrap()
            .tx_packets
            .load(Ordering::Relaxed),
        1
    );
}

#[test]
fn floods_to_every_remote_and_unicasts_to_the_learned_one() {
    let (r1, a1) = peer("127.0.0.1");
    let (r2, a2) = peer("127.0.0.2");
    let mut port = port_with("vni = 42", &[a1, a2]);
    // A broadcast goes to both.
    send(&mut port, plain(arp_frame(A)));
    assert_eq!(recv(&r1).0[8..], arp_frame(A)[..]);
    assert_eq!(recv(&r2).0[8..], arp_frame(A)[..]);
    // B answers from r2: learned behind 127.0.0.2.
    let mut pkt = VxlanHdr::new(42).as_bytes().to_vec();
    pkt.extend_from_slice(&eth(A, B, None, 0x88b5, &[1; 50]));
    r2.send_to(&pkt, port.local_addr().unwrap()).unwrap();
    let got = frames_in(&mut port, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].data[..],
        pkt[8..],
        "the inner frame, untagged on an access port"
    );
    assert_eq!(port.shared().stats().fdb_learned, 1);
    // Unicast to B now goes to r2 only.
    send(&mut port, plain(eth(B, A, None, 0x88b5, &[2; 50])));
    assert_eq!(recv(&r2).0[8..14], B.0);
    r1.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(r1.recv_from(&mut [0; 100]).is_err(), "no copy to r1");
    // Unknown unicast floods.
    let c = MacAddr([2, 0, 0, 0, 0, 0xc]);
    send(&mut port, plain(eth(c, A, None, 0x88b5, &[3; 50])));
    assert_eq!(recv(&r1).0[8..14], c.0);
    assert_eq!(recv(&r2).0[8..14], c.0);
}

#[test]
fn trunk_maps_vlans_to_vnis_both_ways() {
    let (r, ra) = peer("127.0.0.1");
    let mut port = port_with(
        "vnis = [{ vni = 100, vlan = 10 }, { vni = 200, vlan = 20 }]",
        &[ra],
    );
    // VLAN 20 leaves in VNI 200 without its tag, whether the tag is in the
    // frame or added on the way out.
    let tagged = eth(MacAddr::BROADCAST, A, Some(20), 0x88b5, &[5; 40]);
    let untagged = eth(MacAddr::BROADCAST, A, None, 0x88b5, &[5; 40]);
    send(&mut port, plain(tagged));
    let (got, _) = recv(&r);
    assert_eq!(got[..8], [8, 0, 0, 0, 0, 0, 200, 0]);
    assert_eq!(got[8..], untagged[..]);
    let add = Delivery {
        tag: Some(10),
        ..plain(untagged.clone())
    };
    send(&mut port, add);
    let (got, _) = recv(&r);
    assert_eq!(got[..8], [8, 0, 0, 0, 0, 0, 100, 0]);
    assert_eq!(got[8..], untagged[..]);
    // VLAN 30 has no VNI.
    send(
        &mut port,
        plain(eth(MacAddr::BROADCAST, A, Some(30), 0x88b5, &[5; 40])),
    );
    assert_eq!(port.shared().stats().drop_no_vni, 1);
    // VNI 200 comes in tagged with VLAN 20; VNI 300 is not carried.
    let mut pkt = VxlanHdr::new(200).as_bytes().to_vec();
    pkt.extend_from_slice(&eth(A, B, None, 0x88b5, &[6; 40]));
    r.send_to(&pkt, port.local_addr().unwrap()).unwrap();
    let got = frames_in(&mut port, 1);
    assert_eq!(got[0].data[..], eth(A, B, Some(20), 0x88b5, &[6; 40])[..]);
    pkt[4..8].copy_from_slice(&(300u32 << 8).to_be_bytes());
    r.send_to(&pkt, port.local_addr().unwrap()).unwrap();
    assert_eq!(
        until(&mut port, |s| s.drop_unknown_vni == 1).drop_unknown_vni,
        1
    );
}

#[test]
fn completes_a_partial_checksum_on_the_way_out() {
    let (r, ra) = peer("127.0.0.1");
    let mut port = port_with("vni = 7", &[ra]);
    let (src, dst) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let mut udp = crate::frame::tests::udp(1000, 2000, b"partial checksum");
    let pseudo = fold(ones_sum(&[src, dst].concat(), 17 + udp.len() as u64));
    udp[6..8].copy_from_slice(&pseudo.to_be_bytes());
    let frame = eth(B, A, Some(1), 0x0800, &ipv4(src, dst, 17, &udp));
    let d = Delivery {
        data: Bytes::from(frame),
        offload: Offload {
            csum: Some(PartialCsum {
                start: 38,
                offset: 6,
            }),
            gso: None,
        },
        strip_tag: true,
        tag: None,
    };
    send(&mut port, d);
    let (got, _) = recv(&r);
    let inner = &got[8..];
    assert_eq!(inner[12..14], [8, 0], "tag stripped");
    let l4 = &inner[34..];
    let check = fold(ones_sum(
        l4,
        ones_sum(&[src, dst].concat(), 17 + l4.len() as u64),
    ));
    assert_eq!(check, 0xffff, "UDP checksum complete");
}

/// A TCP segment with a 12-byte option block carrying `payload`.
fn tcp(seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut t = vec![0x9c, 0x40, 0x14, 0x51];
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 9, 0x80, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    t.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    t.extend_from_slice(payload);
    t
}

fn gso_delivery(payload: &[u8], mss: u16, tag: Option<u16>) -> Delivery {
    let (src, dst) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let mut t = tcp(1000, payload);
    let len = t.len() as u64;
    let pseudo = fold(ones_sum(&[src, dst].concat(), 6 + len));
    t[16..18].copy_from_slice(&pseudo.to_be_bytes());
    let frame = eth(B, A, tag, 0x0800, &ipv4(src, dst, 6, &t));
    let l3 = if tag.is_some() { 18 } else { 14 };
    Delivery {
        data: Bytes::from(frame),
        offload: Offload {
            csum: Some(PartialCsum {
                start: l3 + 20,
                offset: 16,
            }),
            gso: Some(Gso {
                kind: GsoKind::Tcp4,
                mss,
                ecn: false,
            }),
        },
        strip_tag: tag.is_some(),
        tag: None,
    }
}

#[test]
fn a_tcp_gso_frame_leaves_as_exact_vxlan_packets() {
    let (r, ra) = peer("127.0.0.1");
    let mut port = port_with("vni = 9\nmtu = 1500", &[ra]);
    let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
    send(&mut port, gso_delivery(&payload, 1398, Some(1)));
    let mut joined = Vec::new();
    for i in 0..4 {
        let (got, _) = recv(&r);
        assert_eq!(got[..8], [8, 0, 0, 0, 0, 0, 9, 0]);
        let inner = &got[8..];
        assert_eq!(inner[12..14], [8, 0], "untagged IPv4");
        assert!(inner.len() <= 1450 + 14, "fits a 1500 underlay");
        assert_eq!(fold(ones_sum(&inner[14..34], 0)), 0xffff, "IP checksum");
        assert_eq!(
            usize::from(u16::from_be_bytes([inner[16], inner[17]])),
            inner.len() - 14
        );
        let l4 = &inner[34..];
        let sum = ones_sum(l4, ones_sum(&inner[26..34], 6 + l4.len() as u64));
        assert_eq!(fold(sum), 0xffff, "TCP checksum of segment {i}");
        let seq = u32::from_be_bytes(l4[4..8].try_into().unwrap());
        assert_eq!(seq, 1000 + i * 1398);
        assert_eq!(l4[13] & 0x08 != 0, i == 3, "PSH on the last only");
        joined.extend_from_slice(&l4[32..]);
    }
    assert_eq!(joined, payload);
    let s = port.shared().stats();
    assert_eq!(s.tx_packets, 4);
    assert_eq!(s.tx_gso_sends, 1, "one UDP GSO send");
}

#[test]
fn gso_needs_checksums_and_too_large_frames_are_dropped() {
    let (r, ra) = peer("127.0.0.1");
    let cfg = config(&format!(
        "local = \"127.0.0.1:0\"\nvni = 9\nremotes = [\"{ra}\"]\nudp_csum = false\n"
    ));
    let mut port = open(&cfg);
    send(&mut port, gso_delivery(&[1; 3000], 1000, None));
    for _ in 0..3 {
        let (got, _) = recv(&r);
        assert!(got.len() <= 8 + 66 + 1000);
    }
    let s = port.shared().stats();
    assert_eq!(
        (s.tx_packets, s.tx_gso_sends),
        (3, 0),
        "one datagram per segment"
    );
    // 1450-byte segments do not fit a 1500 underlay; nor does a big frame.
    send(&mut port, gso_delivery(&[1; 3000], 1450, None));
    send(&mut port, plain(eth(B, A, None, 0x88b5, &[0; 1451])));
    send(&mut port, plain(eth(B, A, None, 0x88b5, &[0; 1450])));
    let s = port.shared().stats();
    assert_eq!(s.drop_tx_too_big, 2);
    assert_eq!(recv(&r).0.len(), 8 + 1464, "the largest frame that fits");
}

#[test]
fn bad_input_is_counted_never_forwarded() {
    let (r, ra) = peer("127.0.0.1");
    let (stranger, _) = peer("127.0.0.3");
    let mut port = port_with("vni = 42\nmtu = 600", &[ra]);
    let to = port.local_addr().unwrap();
    let good = {
        let mut p = VxlanHdr::new(42).as_bytes().to_vec();
        p.extend_from_slice(&arp_frame(B));
        p
    };
    let with = |i: usize, v: u8| {
        let mut p = good.clone();
        p[i] = v;
        p
    };
    let mut big = VxlanHdr::new(42).as_bytes().to_vec();
    big.extend_from_slice(&eth(A, B, None, 0x88b5, &[0; 600]));
    for p in [
        good[..5].to_vec(),      // truncated header
        with(0, 0x88),           // reserved flag bit
        with(3, 1),              // reserved byte
        with(7, 1),              // reserved byte after the VNI
        with(6, 43),             // unknown VNI
        good[..8 + 10].to_vec(), // inner frame shorter than Ethernet
        big,                     // inner frame longer than the MTU
        with(14, 0x03),          // multicast source MAC
    ] {
        r.send_to(&p, to).unwrap();
    }
    for _ in 0..100 {
        stranger.send_to(&good, to).unwrap();
    }
    let s = until(&mut port, |s| {
        s.drop_unknown_source == 100 && s.drop_bad_source_mac == 1
    });
    assert_eq!(s.drop_truncated, 1);
    assert_eq!(s.drop_bad_flags, 3);
    assert_eq!(s.drop_unknown_vni, 1);
    assert_eq!(s.drop_short_inner, 1);
    assert_eq!(s.drop_rx_too_big, 1);
    assert_eq!(s.drop_bad_source_mac, 1);
    assert_eq!(
        s.drop_unknown_source, 100,
        "a flood from an unconfigured source"
    );
    assert_eq!((s.rx_packets, s.fdb_learned), (0, 0));
    r.send_to(&good, to).unwrap();
    assert_eq!(
        frames_in(&mut port, 1).len(),
        1,
        "a good packet still passes"
    );
}

#[test]
fn unknown_sources_are_learned_when_allowed_and_statics_hold() {
    let (r, ra) = peer("127.0.0.1");
    let (stranger, sa) = peer("127.0.0.3");
    let cfg = config(&format!(
        "local = \"127.0.0.1:0\"\nvni = 42\nremotes = [\"{ra}\"]\nudp_csum = true\n\
         learn_unknown = true\nstatic = [{{ mac = \"{A}\", remote = \"{ra}\" }}]\n"
    ));
    let mut port = open(&cfg);
    let to = port.local_addr().unwrap();
    let mut from_b = VxlanHdr::new(42).as_bytes().to_vec();
    from_b.extend_from_slice(&arp_frame(B));
    stranger.send_to(&from_b, to).unwrap();
    assert_eq!(frames_in(&mut port, 1).len(), 1);
    // A claims to be behind the stranger: static entries win.
    let mut from_a = VxlanHdr::new(42).as_bytes().to_vec();
    from_a.extend_from_slice(&arp_frame(A));
    stranger.send_to(&from_a, to).unwrap();
    let s = until(&mut port, |s| s.drop_static_conflict == 1);
    assert_eq!(s.drop_static_conflict, 1);
    // Unicast to B goes to the stranger's address, at the VXLAN port the
    // port listens on (learning never uses the sender's source port).
    assert_eq!(port.remotes.last(), Some(&SocketAddr::new(sa.ip(), 4789)));
    send(&mut port, plain(eth(B, A, None, 0x88b5, &[1; 50])));
    assert_eq!(port.shared().stats().tx_packets, 1);
    // Unicast to A goes to its static remote.
    send(&mut port, plain(eth(A, B, None, 0x88b5, &[1; 50])));
    assert_eq!(recv(&r).0[8..14], A.0);
}

#[test]
fn config_table_parses_and_refuses_nonsense() {
    use crate::config::VlanMode;
    let doc = include_str!("mod.rs");
    let line = doc
        .lines()
        .find(|l| l.starts_with("//! vxlan = "))
        .unwrap()
        .trim_start_matches("//! ");
    let t: toml::Table = toml::from_str(line).unwrap();
    let v: VxlanConfig = t["vxlan"].clone().try_into().unwrap();
    let spec = v.validate(&VlanMode::default()).unwrap();
    assert_eq!(spec.maps.len(), 2);
    assert_eq!(v.remotes[0].port, None);
    assert_eq!(spec.config.remotes[0].port, Some(4789), "ports spelled out");
    assert_eq!(v.max_inner(), 1464);
    assert!(spec.trunk());
    let bad = [
        ("vni = 1, vnis = [{ vni = 2, vlan = 2 }]", "exactly one of"),
        ("vni = 16777216", "24 bits"),
        (
            "vnis = [{ vni = 1, vlan = 2 }, { vni = 3, vlan = 2 }]",
            "mapped twice",
        ),
        ("vnis = [{ vni = 1, vlan = 4095 }]", "VLAN 4095"),
        ("vni = 1, remotes = [\"fd00::1\"]", "family"),
        ("vni = 1, remotes = [\"224.0.0.1\"]", "unicast"),
        ("vni = 1, remotes = [\"10.0.0.1\", \"10.0.0.1\"]", "twice"),
        (
            "vni = 1, remotes = [\"10.0.0.1\", \"10.0.0.1:4789\"]",
            "twice",
        ),
        ("vni = 1, remotes = [\"10.0.0.300\"]", "invalid remote"),
        (
            "vni = 1, static = [{ mac = \"01:00:00:00:00:01\", remote = \"10.0.0.1\" }]",
            "unicast MAC",
        ),
        (
            "vni = 1, static = [{ mac = \"02:00:00:00:00:01\", remote = \"10.0.0.1\", vni = 5 }]",
            "not on the port",
        ),
        ("vni = 1, mtu = 100", "mtu"),
        ("vni = 1, tx_sockets = 0", "tx_sockets"),
        ("vni = 1, gso_tap = \"\"", "not an interface name"),
        (
            "vni = 1, gso_tap = \"sixteen-chars-xx\"",
            "not an interface name",
        ),
        ("vni = 1, gso_tap = \"a/b\"", "not an interface name"),
        (
            "vni = 1, gso_tap = \"vt0\", offloads = false",
            "offloads = true",
        ),
        ("vni = 1, colour = 1", "unknown field"),
    ];
    for (extra, want) in bad {
        let text = format!("vxlan = {{ local = \"10.0.0.2:4789\", udp_csum = true, {extra} }}");
        let err = toml::from_str::<toml::Table>(&text)
            .map_err(|e| e.to_string())
            .and_then(|t| {
                t["vxlan"]
                    .clone()
                    .try_into::<VxlanConfig>()
                    .map_err(|e| e.to_string())
            })
            .and_then(|v| v.validate(&VlanMode::default()));
        let err = err.unwrap_err();
        assert!(err.contains(want), "{extra}: {err} (want {want})");
    }
    let no_csum = "vxlan = { local = \"10.0.0.2:4789\", vni = 1 }";
    let t: toml::Table = toml::from_str(no_csum).unwrap();
    let err = t["vxlan"].clone().try_into::<VxlanConfig>().unwrap_err();
    assert!(
        err.to_string().contains("udp_csum"),
        "checksums are explicit: {err}"
    );
    let one: VxlanConfig = config("local = \"10.0.0.2:4789\"\nvni = 1\nudp_csum = false\n");
    let trunk = VlanMode::Trunk {
        allowed: vec![5],
        native: None,
    };
    assert!(one.validate(&trunk).unwrap_err().contains("access port"));
    let many =
        config("local = \"10.0.0.2:4789\"\nvnis = [{ vni = 1, vlan = 5 }]\nudp_csum = false\n");
    assert!(
        many.validate(&VlanMode::Access { id: 3 })
            .unwrap_err()
            .contains("no `vlan`")
    );
    let v6 =
        config("local = \"[fd00::2]:4789\"\nvni = 1\nudp_csum = true\nremotes = [\"fd00::1\"]\n");
    v6.validate(&VlanMode::default()).unwrap();
    assert_eq!(v6.max_inner(), 1444);
}

#[test]
fn ipv6_underlay_carries_frames() {
    let Ok(r) = UdpSocket::bind("[::1]:0") else {
        panic!("IPv6 loopback is needed");
    };
    r.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let ra = r.local_addr().unwrap();
    let cfg = config(&format!(
        "local = \"[::1]:0\"\nvni = 5\nremotes = [\"{ra}\"]\nudp_csum = true\n"
    ));
    let mut port = open(&cfg);
    send(&mut port, plain(arp_frame(A)));
    let (got, from) = recv(&r);
    assert_eq!(got[..8], [8, 0, 0, 0, 0, 0, 5, 0]);
    r.send_to(
        &[&got[..8], &arp_frame(B)[..]].concat(),
        port.local_addr().unwrap(),
    )
    .unwrap();
    assert!(from.is_ipv6());
    assert_eq!(frames_in(&mut port, 1)[0].data[..], arp_frame(B)[..]);
}

#[test]
fn reload_replaces_a_changed_vxlan_port_only() {
    let switches = |remotes: &str| {
        let text = format!(
            "[[switch]]\nname = \"s\"\n[[switch.port]]\nname = \"vx\"\n\
             vxlan = {{ local = \"10.0.0.2:4789\", vni = 7, remotes = {remotes}, udp_csum = true }}\n\
             vlan = {{ mode = \"access\", id = 10 }}\n"
        );
        let t: toml::Table = toml::from_str(&text).unwrap();
        let raw: Vec<crate::config::SwitchConfig> = t["switch"].clone().try_into().unwrap();
        crate::config::validate(&raw, std::path::Path::new("/")).unwrap()
    };
    let two = switches("[\"10.0.0.1\", \"10.0.0.3\"]");
    let port = &two[0].ports[0];
    let crate::config::PortKind::Vxlan(spec) = &port.kind else {
        panic!("a VXLAN port: {port:?}");
    };
    assert_eq!(spec.maps, [VniVlan { vni: 7, vlan: 10 }]);
    assert_eq!(port.policy.vlan, crate::policy::VlanPolicy::access(10));
    let same = switches("[\"10.0.0.1:4789\", \"10.0.0.3\"]");
    assert!(crate::config::plan(&two, &same).is_empty(), "the same port");
    let one = switches("[\"10.0.0.1\"]");
    let plan = crate::config::plan(&two, &one);
    let names: Vec<String> = plan.ports.iter().map(|c| c.to_string()).collect();
    assert_eq!(
        names,
        ["port vx removed from switch s", "port vx added to switch s"]
    );
}
