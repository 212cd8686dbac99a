//! End-to-end tests of the network VSP: a real `vspa serve --config` with
//! netvsp ports, driven by hosted netvsc clients in this (separate)
//! process; one test puts a tap port into a network namespace the test
//! creates and has the kernel there answer ARP, ping and UDP, checked with
//! tshark and the namespace's own counters.

use std::time::{Duration, Instant};

use switch::netvsp::client::packets::{eth, ipv4, ping, pump, resolve, udp};
use switch::netvsp::client::{NetvscClient, NetvscOptions, TxFrame, connect_hosted};
use switch::netvsp::rndis::{self, PacketInfo};
use switch::offload::{fold, ones_sum};
use switch::wire::MacAddr;
use vmbus::guid::NETWORK_INTERFACE;
use vmbus::hosted::client::HostedClient;
use vspa_tests::net::{Netns, Tshark, counter, counters_over_tcp, names, ping_seen_by_tshark};
use vspa_tests::{VspaServe, require_tool};

/// Connects a client (its own hosted-mode connection: its own "VM") to
/// the NIC with instance GUID `instance`, whose friendly name is `name`.
fn nic(
    vspa: &VspaServe,
    instance: &str,
    name: &str,
    opts: &NetvscOptions,
) -> (HostedClient, NetvscClient) {
    let (host, c) = connect_hosted(&vspa.socket(), 64 << 20, instance.parse().unwrap(), opts)
        .unwrap_or_else(|e| panic!("NIC {instance}: {e}"));
    assert_eq!(c.friendly_name.as_deref(), Some(name));
    (host, c)
}

const NIC1: &str = "5a1b2c3d-0001-4e5f-8a9b-0c1d2e3f4a5b";
const NIC2: &str = "5a1b2c3d-0002-4e5f-8a9b-0c1d2e3f4a5b";

fn ns_udp_stat(ns: &Netns, field: &str) -> u64 {
    let text = ns.ok(&["cat", "/proc/net/snmp"]);
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
    let i = names.split_whitespace().position(|n| n == field).unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

#[test]
fn netvsp_client_and_a_tap_in_a_namespace() {
    for tool in ["ip", "tshark", "bash"] {
        require_tool(tool);
    }
    let (ns_name, tap) = names("n");
    let vspa = VspaServe::with_config(&format!(
        r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "vm"
netvsp = {{ mac = "02:00:00:00:04:02", instance = "{NIC1}" }}
[[switch.port]]
name = "t"
tap = {{ ifname = "{tap}1" }}
[[switch.port]]
name = "mgmt"
internal = {{ mac = "02:00:00:00:04:fe", ip = "10.204.0.254/24", counters_port = 9100 }}
"#
    ));
    let ns = Netns::new(format!("{ns_name}1"));
    let dev = format!("{tap}1");
    ns.take(&dev, "10.204.0.1/24");
    // tshark on the tap, printing each ICMP packet as it sees it.
    let tshark = Tshark::start(&ns, &dev, "icmp", &["ip.src", "icmp.type", "icmp.seq"]);
    let (_host, mut c) = nic(&vspa, NIC1, "vm", &NetvscOptions::default());
    assert_eq!(c.mac.to_string(), "02:00:00:00:04:02");
    let (me, there) = ([10, 204, 0, 2], [10, 204, 0, 1]);

    // ARP and ping the namespace's kernel through vspa; tshark on the tap
    // saw the three requests and three replies.
    let (ns_mac, lines) = ping_seen_by_tshark(&mut c, me, there, &tshark, 2);
    drop(tshark);
    assert_eq!(
        lines,
        [
            "10.204.0.2\t8\t0",
            "10.204.0.1\t0\t0",
            "10.204.0.2\t8\t1",
            "10.204.0.1\t0\t1",
            "10.204.0.2\t8\t2",
            "10.204.0.1\t0\t2"
        ]
    );

    // UDP from the namespace to the guest: bash writes a datagram, the
    // kernel resolves the guest with ARP (answered by the client), and the
    // guest checks payload and checksum (which the tap may leave partial:
    // vspa completes it on the copy into the receive buffer).
    let mut sender = ns
        .cmd(&[
            "bash",
            "-c",
            "for i in 1 2 3 4 5; do echo -n hello-netvsp-$i > /dev/udp/10.204.0.2/7777; sleep 0.2; done",
        ])
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    pump(&mut c, me, Duration::from_secs(10), |f, info| {
        if f.len() >= 42 && f[12..14] == [8, 0] && f[23] == 17 && f[36..38] == 7777u16.to_be_bytes()
        {
            let ulen = u16::from_be_bytes([f[38], f[39]]) as usize;
            let pseudo = ones_sum(&f[26..34], 17 + ulen as u64);
            assert_eq!(
                fold(ones_sum(&f[34..34 + ulen], pseudo)),
                0xffff,
                "UDP checksum"
            );
            if let Some(flags) = info.csum {
                assert_ne!(flags & rndis::csum_rx::UDP_SUCCEEDED, 0);
            }
            seen.push(String::from_utf8(f[42..34 + ulen].to_vec()).unwrap());
        }
        seen.len() == 5
    })
    .unwrap();
    assert!(sender.wait().unwrap().success());
    assert_eq!(
        seen,
        (1..=5)
            .map(|i| format!("hello-netvsp-{i}"))
            .collect::<Vec<_>>()
    );

    // UDP from the guest to a closed port of the namespace, once with a
    // complete checksum and once with the checksum offloaded (PPI): the
    // kernel accepts both (NoPorts, no checksum errors) and answers each
    // with an ICMP port unreachable.
    let (no_ports, csum_errors) = (
        ns_udp_stat(&ns, "NoPorts"),
        ns_udp_stat(&ns, "InCsumErrors"),
    );
    for partial in [false, true] {
        let u = udp(me, there, 5555, 9, b"checksum me", partial);
        let f = eth(ns_mac, c.mac, 0x0800, &ipv4(me, there, 17, &u));
        let info = PacketInfo {
            csum: partial.then_some(rndis::csum_tx::IS_IPV4 | rndis::csum_tx::UDP | 34 << 16),
            ..Default::default()
        };
        c.send(0, &[TxFrame { data: &f, info }]).unwrap();
        let got = pump(&mut c, me, Duration::from_secs(5), |r, _| {
            r.len() >= 70 && r[12..14] == [8, 0] && r[23] == 1 && r[34] == 3 && r[35] == 3
        })
        .unwrap();
        assert!(got, "ICMP port unreachable (partial checksum: {partial})");
    }
    assert_eq!(ns_udp_stat(&ns, "NoPorts"), no_ports + 2);
    assert_eq!(ns_udp_stat(&ns, "InCsumErrors"), csum_errors);

    // The internal port serves the NIC's counters next to the switch's.
    let text = counters_over_tcp(&ns, "10.204.0.254", 9100);
    assert_eq!(counter(&text, "netvsp.vm.link_up"), 1);
    assert_eq!(counter(&text, "netvsp.vm.drop_tx_malformed"), 0);
    assert_eq!(counter(&text, "netvsp.vm.bad_nvsp"), 0);
    assert!(counter(&text, "netvsp.vm.rx_packets") >= 8);
    assert!(counter(&text, "switch.sw.port.vm.rx_frames") >= 10);
    assert!(counter(&text, "switch.sw.port.vm.tx_frames") >= 10);
}

fn seq_frame(dst: MacAddr, src: MacAddr, seq: u32) -> Vec<u8> {
    let len = 60 + (seq as usize * 37) % 1450;
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f[18..].iter_mut().enumerate() {
        *b = (seq as usize).wrapping_mul(13).wrapping_add(i) as u8;
    }
    f
}

#[test]
fn two_netvsc_clients_exchange_frames_through_vspa_serve() {
    let vspa = VspaServe::with_config(&format!(
        r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "vm-a"
netvsp = {{ mac = "02:00:00:00:05:0a", instance = "{NIC1}" }}
[[switch.port]]
name = "vm-b"
netvsp = {{ mac = "02:00:00:00:05:0b", instance = "{NIC2}", channels = 2 }}
[[switch.port]]
name = "mgmt"
internal = {{ mac = "02:00:00:00:05:fe", ip = "10.205.0.254/24", counters_port = 9100 }}
"#
    ));
    let (_ha, mut a) = nic(&vspa, NIC1, "vm-a", &NetvscOptions::default());
    let opts_b = NetvscOptions {
        subchannels: 1,
        ..Default::default()
    };
    let (_hb, mut b) = nic(&vspa, NIC2, "vm-b", &opts_b);
    assert_eq!(b.channels.len(), 2, "B has a sub-channel");

    // A pings the appliance's own interface.
    let me = [10, 205, 0, 1];
    let mgmt = resolve(&mut a, me, [10, 205, 0, 254]).unwrap().unwrap();
    assert_eq!(mgmt.to_string(), "02:00:00:00:05:fe");
    for seq in 0..2 {
        assert!(
            ping(&mut a, me, [10, 205, 0, 254], mgmt, seq)
                .unwrap()
                .is_some()
        );
    }

    // Both ways at once: 20000 frames each, of many sizes, checked byte by
    // byte and in order per direction; B receives on both of its channels.
    const N: u32 = 20_000;
    let (ma, mb) = (a.mac, b.mac);
    let to_b: Vec<Vec<u8>> = (0..N).map(|i| seq_frame(mb, ma, i)).collect();
    let to_a: Vec<Vec<u8>> = (0..N).map(|i| seq_frame(ma, mb, i)).collect();
    let (mut sent_a, mut sent_b) = (0usize, 0usize);
    let (mut got_a, mut got_b) = (0usize, 0usize);
    let mut per_channel = [0u32; 2];
    let deadline = Instant::now() + Duration::from_secs(60);
    while (got_a < N as usize || got_b < N as usize) && Instant::now() < deadline {
        // Keep at most 500 frames in flight each way.
        if sent_a < to_b.len() && sent_a - got_b < 500 {
            let end = (sent_a + 64).min(to_b.len());
            let batch: Vec<TxFrame> = to_b[sent_a..end].iter().map(|f| TxFrame::new(f)).collect();
            sent_a += a.send(0, &batch).unwrap();
        }
        if sent_b < to_a.len() && sent_b - got_a < 500 {
            let end = (sent_b + 64).min(to_a.len());
            let batch: Vec<TxFrame> = to_a[sent_b..end].iter().map(|f| TxFrame::new(f)).collect();
            sent_b += b.send(1, &batch).unwrap();
        }
        a.poll(0, |f| {
            if f.data.len() >= 18 {
                let v = f.to_vec();
                if v[12..14] == [0x88, 0xb5] {
                    assert_eq!(v, to_a[got_a], "frame {got_a} to A");
                    got_a += 1;
                }
            }
        })
        .unwrap();
        for ch in 0..2 {
            b.poll(ch, |f| {
                let v = f.to_vec();
                if v[12..14] == [0x88, 0xb5] {
                    // One flow: it stays on one channel, so order holds.
                    assert_eq!(v, to_b[got_b], "frame {got_b} to B");
                    got_b += 1;
                    per_channel[f.channel] += 1;
                }
            })
            .unwrap();
        }
    }
    assert_eq!((got_a, got_b), (N as usize, N as usize));
    assert_eq!(a.state.failed_sends + b.state.failed_sends, 0);
    assert!(per_channel.iter().sum::<u32>() == N);
}

/// A reload that adds a netvsp port offers a new NIC to running clients,
/// which joins the switch; a reload that drops it rescinds the offer. The
/// NIC that stayed keeps working throughout.
#[test]
fn reload_hot_adds_and_removes_guest_nics() {
    let base = format!(
        r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "vm-a"
netvsp = {{ mac = "02:00:00:00:06:0a", instance = "{NIC1}" }}
[[switch.port]]
name = "mgmt"
internal = {{ mac = "02:00:00:00:06:fe", ip = "10.206.0.254/24", counters_port = 9100 }}
"#
    );
    let with_b = format!(
        "{base}[[switch.port]]\nname = \"vm-b\"\n\
         netvsp = {{ mac = \"02:00:00:00:06:0b\", instance = \"{NIC2}\" }}\n"
    );
    let vspa = VspaServe::with_config(&base);
    let (_ha, mut a) = nic(&vspa, NIC1, "vm-a", &NetvscOptions::default());
    let mgmt_ip = [10, 206, 0, 254];
    let mgmt = resolve(&mut a, [10, 206, 0, 1], mgmt_ip).unwrap().unwrap();

    // Another "VM" watching the bus: no vm-b yet.
    let nic2: vmbus::Guid = NIC2.parse().unwrap();
    let mut host = HostedClient::connect(&vspa.socket(), 64 << 20).unwrap();
    assert!(
        !host
            .request_offers()
            .unwrap()
            .iter()
            .any(|o| o.instance == nic2)
    );
    vspa.reload(&with_b);
    let offer = loop {
        let o = host.wait_offer().unwrap();
        if o.instance == nic2 {
            break o;
        }
    };
    assert_eq!(offer.interface, NETWORK_INTERFACE);
    let mut b = NetvscClient::connect(&mut host, &offer, &NetvscOptions::default()).unwrap();
    assert_eq!(b.friendly_name.as_deref(), Some("vm-b"));
    assert_eq!(b.mac.to_string(), "02:00:00:00:06:0b");
    // vm-b is on the switch: it reaches the internal port and vm-a.
    let me_b = [10, 206, 0, 2];
    assert_eq!(resolve(&mut b, me_b, mgmt_ip).unwrap(), Some(mgmt));
    assert!(ping(&mut b, me_b, mgmt_ip, mgmt, 1).unwrap().is_some());
    let frame = seq_frame(a.mac, b.mac, 7);
    b.send(0, &[TxFrame::new(&frame)]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut got = false;
    while !got && Instant::now() < deadline {
        a.poll(0, |f| got |= f.to_vec() == frame).unwrap();
    }
    assert!(got, "vm-a received vm-b's frame");

    // Dropping the port rescinds the NIC; vm-a stays.
    vspa.reload(&base);
    host.wait_rescind(offer.relid).unwrap();
    assert!(
        ping(&mut a, [10, 206, 0, 1], mgmt_ip, mgmt, 2)
            .unwrap()
            .is_some()
    );
}

/// An IPv6 TCP frame from `src` to `dst` with `payload`, its lengths and
/// checksum left for the host as a Linux guest leaves them under LSO.
fn tcp6_frame(dst: MacAddr, src: MacAddr, payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0, 0, 0, 6, 64];
    ip.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    ip.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    let mut tcp = vec![0u8; 20];
    tcp[..2].copy_from_slice(&40_000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&5201u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = 0x18;
    tcp[14..16].copy_from_slice(&512u16.to_be_bytes());
    ip.extend_from_slice(&tcp);
    ip.extend_from_slice(payload);
    eth(dst, src, 0x86dd, &ip)
}

/// A guest that negotiates as Linux 6.1 does (`NetvscOptions::linux`, here
/// a 4-CPU guest) on a 4-channel NIC: the RSS capabilities reply passes
/// `rndis_filter_query_device`, so it allocates 3 sub-channels; the
/// offload capabilities give it TSO for IPv6 (`rndis_netdev_set_hwcaps`),
/// and an IPv6 LSOv2 send of 3000 bytes reaches another guest as three
/// segments with valid checksums.
#[test]
fn a_linux_guest_negotiates_rss_subchannels_and_tso6() {
    let vspa = VspaServe::with_config(&format!(
        r#"
[[switch]]
name = "sw"
[[switch.port]]
name = "vm-a"
netvsp = {{ mac = "02:00:00:00:07:0a", instance = "{NIC1}", channels = 4 }}
[[switch.port]]
name = "vm-b"
netvsp = {{ mac = "02:00:00:00:07:0b", instance = "{NIC2}" }}
"#
    ));
    let (_ha, mut a) = nic(&vspa, NIC1, "vm-a", &NetvscOptions::linux(4));
    assert_eq!(a.rss_queues, Some(4), "RSS capabilities accepted");
    assert_eq!(a.channels.len(), 4, "primary + 3 sub-channels");
    assert!(a.features.tso4 && a.features.tso6, "{:?}", a.features);
    let (_hb, mut b) = nic(&vspa, NIC2, "vm-b", &NetvscOptions::linux(1));
    assert_eq!(b.channels.len(), 1, "a one-CPU guest stays on one channel");
    // B speaks first so the switch learns where it is.
    let hello = seq_frame(MacAddr::BROADCAST, b.mac, 1);
    b.send(0, &[TxFrame::new(&hello)]).unwrap();
    let payload: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let frame = tcp6_frame(b.mac, a.mac, &payload);
    let info = PacketInfo {
        lso: Some(rndis::lso::encode(1440, 54, true)),
        ..PacketInfo::default()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut learned = false;
    while !learned && Instant::now() < deadline {
        a.poll(0, |f| learned |= f.to_vec() == hello).unwrap();
    }
    assert!(learned, "B's hello reached A");
    assert_eq!(a.send(2, &[TxFrame { data: &frame, info }]).unwrap(), 1);
    let mut segments = Vec::new();
    while segments.len() < 3 && Instant::now() < deadline {
        b.poll(0, |f| {
            let v = f.to_vec();
            if v[12..14] == [0x86, 0xdd] {
                segments.push(v);
            }
        })
        .unwrap();
    }
    let mut rebuilt = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        let plen = usize::from(u16::from_be_bytes([s[18], s[19]]));
        assert_eq!(s.len(), 54 + plen, "segment {i} length");
        let seq = u32::from_be_bytes(s[58..62].try_into().unwrap());
        assert_eq!(seq, 1000 + 1440 * i as u32, "segment {i} sequence");
        let pseudo = ones_sum(&s[22..54], 6 + plen as u64);
        assert_eq!(
            fold(ones_sum(&s[54..], pseudo)),
            0xffff,
            "segment {i} TCP checksum"
        );
        rebuilt.extend_from_slice(&s[74..]);
    }
    assert_eq!(segments.len(), 3);
    assert_eq!(rebuilt, payload);
}
