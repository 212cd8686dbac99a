//! End-to-end tests of the network VSP: a real `vspa serve --config` with
//! netvsp ports, driven by hosted netvsc clients in this (separate)
//! process; one test puts a tap port into a network namespace the test
//! creates and has the kernel there answer ARP, ping and UDP, checked with
//! tshark and the namespace's own counters.

use std::process::Stdio;
use std::time::{Duration, Instant};

use switch::netvsp::client::{NetvscClient, NetvscOptions, TxFrame};
use switch::netvsp::rndis::{self, PacketInfo};
use switch::offload::{fold, ones_sum};
use switch::wire::MacAddr;
use vmbus::guid::NETWORK_INTERFACE;
use vmbus::hosted::client::HostedClient;
use vspa_tests::net::{Netns, Vspa, counter, counters_over_tcp, names};
use vspa_tests::require_tool;

/// Connects a client (its own hosted-mode connection: its own "VM") to
/// the NIC with instance GUID `instance`, whose friendly name is `name`.
fn nic(
    vspa: &Vspa,
    instance: &str,
    name: &str,
    opts: &NetvscOptions,
) -> (HostedClient, NetvscClient) {
    let mut host = HostedClient::connect(&vspa.socket(), 64 << 20).unwrap();
    let instance: vmbus::Guid = instance.parse().unwrap();
    let offer = host
        .request_offers()
        .unwrap()
        .into_iter()
        .find(|o| o.interface == NETWORK_INTERFACE && o.instance == instance)
        .unwrap_or_else(|| panic!("no NIC {instance}"));
    let c = NetvscClient::connect(&mut host, &offer, opts).unwrap();
    assert_eq!(c.friendly_name.as_deref(), Some(name));
    (host, c)
}

const NIC1: &str = "5a1b2c3d-0001-4e5f-8a9b-0c1d2e3f4a5b";
const NIC2: &str = "5a1b2c3d-0002-4e5f-8a9b-0c1d2e3f4a5b";

fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp(op: u16, sha: MacAddr, spa: [u8; 4], tha: MacAddr, tpa: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4];
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sha.0);
    p.extend_from_slice(&spa);
    p.extend_from_slice(&tha.0);
    p.extend_from_slice(&tpa);
    let dst = if op == 1 { MacAddr::BROADCAST } else { tha };
    eth(dst, sha, 0x0806, &p)
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0x33, 0x44, 0x40, 0, 64, proto, 0, 0];
    h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = !fold(ones_sum(&h, 0));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

fn icmp_echo(id: u16, seq: u16, payload: &[u8]) -> Vec<u8> {
    let mut m = vec![8, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(payload);
    let c = !fold(ones_sum(&m, 0));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A UDP datagram; with `partial` the checksum holds only the
/// pseudo-header sum (for the host to complete), else the full checksum.
fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, data: &[u8], partial: bool) -> Vec<u8> {
    let len = 8 + data.len();
    let mut u = Vec::with_capacity(len);
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&(len as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(data);
    let mut addrs = src.to_vec();
    addrs.extend_from_slice(&dst);
    let pseudo = ones_sum(&addrs, 17 + len as u64);
    let c = if partial {
        fold(pseudo)
    } else {
        !fold(ones_sum(&u, pseudo))
    };
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// Polls the client, answering ARP for `ip`, until `f` returns true for a
/// frame or the deadline passes.
fn pump(
    c: &mut NetvscClient,
    ip: [u8; 4],
    secs: u64,
    mut f: impl FnMut(&[u8], &PacketInfo) -> bool,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mac = c.mac;
    while Instant::now() < deadline {
        let mut frames = Vec::new();
        c.poll(0, |fr| frames.push((fr.to_vec(), fr.info))).unwrap();
        for (fr, info) in frames {
            if fr.len() >= 42 && fr[12..14] == [8, 6] && fr[20..22] == [0, 1] && fr[38..42] == ip {
                let sha = MacAddr(fr[22..28].try_into().unwrap());
                let spa: [u8; 4] = fr[28..32].try_into().unwrap();
                let reply = arp(2, mac, ip, sha, spa);
                assert_eq!(c.send(0, &[TxFrame::new(&reply)]).unwrap(), 1);
                continue;
            }
            if f(&fr, &info) {
                return true;
            }
        }
        c.wait(0, Duration::from_millis(5)).unwrap();
    }
    false
}

/// Resolves `ip` with ARP from the guest at `me`.
fn resolve(c: &mut NetvscClient, me: [u8; 4], ip: [u8; 4]) -> MacAddr {
    let req = arp(1, c.mac, me, MacAddr::default(), ip);
    let mut mac = None;
    for _ in 0..5 {
        c.send(0, &[TxFrame::new(&req)]).unwrap();
        let ok = pump(c, me, 2, |f, _| {
            if f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == ip {
                mac = Some(MacAddr(f[22..28].try_into().unwrap()));
                return true;
            }
            false
        });
        if ok {
            break;
        }
    }
    mac.unwrap_or_else(|| panic!("no ARP reply from {ip:?}"))
}

/// Pings `ip` `n` times from the guest, sequence numbers from `first`;
/// returns the replies' payloads.
fn ping(
    c: &mut NetvscClient,
    me: [u8; 4],
    ip: [u8; 4],
    mac: MacAddr,
    first: u16,
    n: u16,
) -> Vec<Vec<u8>> {
    let mut replies = Vec::new();
    for seq in first..first + n {
        let payload: Vec<u8> = (0..56).map(|i| (i as u8) ^ (seq as u8)).collect();
        let f = eth(
            mac,
            c.mac,
            0x0800,
            &ipv4(me, ip, 1, &icmp_echo(0x77, seq, &payload)),
        );
        c.send(0, &[TxFrame::new(&f)]).unwrap();
        let got = pump(c, me, 5, |f, _| {
            let ok = f.len() >= 42
                && f[12..14] == [8, 0]
                && f[23] == 1
                && f[26..30] == ip
                && f[34] == 0
                && f[40..42] == seq.to_be_bytes();
            if ok {
                assert_eq!(fold(ones_sum(&f[34..], 0)), 0xffff, "ICMP checksum");
                replies.push(f[42..].to_vec());
            }
            ok
        });
        assert!(got, "no echo reply {seq} from {ip:?}");
    }
    replies
}

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
    let vspa = Vspa::start(&format!(
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
    let mut tshark = ns
        .cmd(&[
            "tshark",
            "-l",
            "-i",
            &dev,
            "-f",
            "icmp",
            "-T",
            "fields",
            "-e",
            "ip.src",
            "-e",
            "icmp.type",
            "-e",
            "icmp.seq",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, seen_by_tshark) = std::sync::mpsc::channel::<String>();
    let out = tshark.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let (_host, mut c) = nic(&vspa, NIC1, "vm", &NetvscOptions::default());
    assert_eq!(c.mac.to_string(), "02:00:00:00:04:02");
    let (me, there) = ([10, 204, 0, 2], [10, 204, 0, 1]);

    // ARP and ping the namespace's kernel through vspa; first until tshark
    // shows it is capturing (sequence numbers from 100).
    let ns_mac = resolve(&mut c, me, there);
    let deadline = Instant::now() + Duration::from_secs(20);
    for seq in 100.. {
        assert!(Instant::now() < deadline, "tshark never saw a packet");
        ping(&mut c, me, there, ns_mac, seq, 1);
        if seen_by_tshark
            .recv_timeout(Duration::from_millis(200))
            .is_ok()
        {
            break;
        }
    }
    let replies = ping(&mut c, me, there, ns_mac, 0, 3);
    for (seq, r) in replies.iter().enumerate() {
        let want: Vec<u8> = (0..56).map(|i| (i as u8) ^ (seq as u8)).collect();
        assert_eq!(r, &want, "echo payload {seq}");
    }
    // tshark on the tap saw the three requests and three replies.
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines.len() < 6 && Instant::now() < deadline {
        if let Ok(l) = seen_by_tshark.recv_timeout(Duration::from_millis(100))
            && l.split('\t')
                .nth(2)
                .is_some_and(|s| s.parse::<u16>().is_ok_and(|s| s < 100))
        {
            lines.push(l);
        }
    }
    let _ = tshark.kill();
    let _ = tshark.wait();
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
    pump(&mut c, me, 10, |f, info| {
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
    });
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
        let got = pump(&mut c, me, 5, |r, _| {
            r.len() >= 70 && r[12..14] == [8, 0] && r[23] == 1 && r[34] == 3 && r[35] == 3
        });
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
    let vspa = Vspa::start(&format!(
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
    let mgmt = resolve(&mut a, me, [10, 205, 0, 254]);
    assert_eq!(mgmt.to_string(), "02:00:00:00:05:fe");
    assert_eq!(ping(&mut a, me, [10, 205, 0, 254], mgmt, 0, 2).len(), 2);

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
