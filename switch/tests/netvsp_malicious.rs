//! Malicious netvsc guests against the network VSP: bad section indices,
//! GPA and transfer-page ranges out of bounds, RNDIS lengths past the
//! buffer, never completing received packets, floods and a corrupted ring.
//! Each gets failure statuses, drops and counters, or a reset of its own
//! channel; meanwhile two good guests on the same switch and the same NIC
//! thread exchange frames without losing one.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use switch::netvsp::client::{HostPacket, NetvscClient, NetvscOptions, TxFrame, read_packet};
use switch::netvsp::nvsp::{self, NvspMessage};
use switch::netvsp::rndis;
use switch::netvsp::{Netvsp, NetvspConfig, Pool};
use switch::wire::MacAddr;
use switch::{Frame, OffloadCaps, PortSpec, Switch};
use vmbus::hosted::HostedServer;
use vmbus::hosted::client::{ClientChannel, HostedClient};
use vmbus::packet::{write_gpa_direct, write_transfer_pages};
use vmbus::wire::{PACKET_FLAG_COMPLETION_REQUESTED, packet_type};
use zerocopy::IntoBytes;

struct Appliance {
    _dir: tempfile::TempDir,
    server: HostedServer,
    sw: Arc<Switch>,
    nics: Vec<Netvsp>,
    _pool: Arc<Pool>,
}

const NAMES: [&str; 4] = ["good-a", "good-b", "evil", "evil-ring"];

fn appliance() -> Appliance {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new("sw", 1024, 300);
    // One thread runs every NIC: a stalled thread would show in the good pair.
    let pool = Pool::new("nvm", 1, Duration::from_micros(20)).unwrap();
    let registry = vmbus::server::Registry::new();
    let nics: Vec<Netvsp> = NAMES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let cfg = NetvspConfig::new(
                name,
                vmbus::Guid::from_fields(0x100 + i as u32, 1, 2, [3; 8]),
                MacAddr([2, 0, 0, 0, 1, i as u8]),
            );
            let n = Netvsp::new(
                cfg,
                sw.clone(),
                PortSpec::new(*name, OffloadCaps::NONE),
                pool.clone(),
            );
            registry.add(Arc::new(n.clone()));
            n
        })
        .collect();
    let server = HostedServer::start(&dir.path().join("s.sock"), registry).unwrap();
    Appliance {
        _dir: dir,
        server,
        sw,
        nics,
        _pool: pool,
    }
}

fn connect(a: &Appliance, index: usize) -> (HostedClient, NetvscClient) {
    let mut host = HostedClient::connect(a.server.path(), 16 << 20).unwrap();
    let instance = a.nics[index].config().instance;
    let offer = host
        .request_offers()
        .unwrap()
        .into_iter()
        .find(|o| o.instance == instance)
        .unwrap();
    let opts = NetvscOptions {
        ring_pages: 32,
        ..Default::default()
    };
    let c = NetvscClient::connect(&mut host, &offer, &opts).unwrap();
    (host, c)
}

fn frame(dst: MacAddr, src: MacAddr, seq: u64, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f[14..22].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f[22..].iter_mut().enumerate() {
        *b = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    f
}

/// The good pair: A streams numbered frames to B, B checks each one.
/// Returns (sent, received in order).
fn good_pair(
    a: &Appliance,
    stop: Arc<AtomicBool>,
    got: Arc<AtomicU64>,
) -> std::thread::JoinHandle<(u64, u64)> {
    let (host_a, mut ca) = connect(a, 0);
    let (host_b, mut cb) = connect(a, 1);
    std::thread::spawn(move || {
        let _hosts = (host_a, host_b);
        // B announces itself so A's frames are known unicast.
        let hello = frame(MacAddr::BROADCAST, cb.mac, 0, 64);
        cb.send(0, &[TxFrame::new(&hello)]).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let (mut sent, mut next) = (0u64, 0u64);
        let mut frames: Vec<Vec<u8>> = Vec::new();
        let mac_b = cb.mac;
        while !stop.load(Ordering::Acquire) || next < sent {
            // At most 1000 frames in flight: B's buffer holds them all even
            // when this thread is descheduled.
            if !stop.load(Ordering::Acquire) && sent - next < 1000 {
                frames.clear();
                for i in 0..64 {
                    let seq = sent + i;
                    frames.push(frame(cb.mac, ca.mac, seq, 60 + (seq as usize * 13) % 1400));
                }
                let batch: Vec<TxFrame> = frames.iter().map(|f| TxFrame::new(f)).collect();
                sent += ca.send(0, &batch).unwrap() as u64;
            }
            ca.poll(0, |_| {}).unwrap();
            let mac_a = ca.mac;
            let before = next;
            cb.poll(0, |f| {
                let v = f.to_vec();
                if v[6..12] != mac_a.0 {
                    return; // broadcasts from the probe
                }
                let seq = u64::from_be_bytes(v[14..22].try_into().unwrap());
                assert_eq!(seq, next, "good frames arrive in order, none lost");
                assert_eq!(v, frame(mac_b, mac_a, seq, v.len()));
                next += 1;
            })
            .unwrap();
            got.fetch_add(next - before, Ordering::Relaxed);
            if stop.load(Ordering::Acquire) && next < sent {
                cb.wait(0, Duration::from_millis(10)).unwrap();
            }
        }
        (sent, next)
    })
}

/// Writes one packet on the evil channel and returns the status of its
/// completion (transfer-page packets meanwhile are never completed).
fn call(ch: &mut ClientChannel, tid: u64, write: impl FnOnce(&mut ClientChannel)) -> u32 {
    write(ch);
    ch.channel.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match read_packet(ch).unwrap() {
            Some(HostPacket::Completion { tid: t, payload }) if t == tid => {
                assert!(payload.len() >= 8);
                return u32::from_le_bytes(payload[4..8].try_into().unwrap());
            }
            Some(_) => continue,
            None => {
                assert!(Instant::now() < deadline, "no completion for {tid}");
                ch.channel
                    .wait_for_work(Some(Duration::from_millis(10)))
                    .unwrap();
            }
        }
    }
}

fn rndis_pkt(section: u32, size: u32) -> NvspMessage {
    NvspMessage::new(
        nvsp::msg::SEND_RNDIS_PKT,
        &nvsp::SendRndisPkt {
            channel_type: 0.into(),
            section_index: section.into(),
            section_size: size.into(),
        },
    )
}

fn inband(ch: &mut ClientChannel, tid: u64, m: &NvspMessage) {
    ch.channel
        .outgoing
        .write_packet(
            packet_type::DATA_INBAND,
            PACKET_FLAG_COMPLETION_REQUESTED,
            tid,
            &[],
            m.as_bytes(),
        )
        .unwrap();
}

/// An RNDIS PACKET message around a 60-byte frame, with fields overridden.
fn data_message(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut hdr = [0u8; 96];
    let n = rndis::write_packet_headers(&mut hdr, 60, &Default::default());
    let mut m = hdr[..n].to_vec();
    m.extend_from_slice(&[0x11; 60]);
    f(&mut m);
    m
}

/// User + system clock ticks of this process's thread named `name`.
fn thread_cpu_ticks(name: &str) -> u64 {
    for t in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = t.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        // Fields after the parenthesised name: state is field 3, utime 14.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    panic!("no thread {name}");
}

#[test]
fn malicious_guests_cost_only_their_own_port() {
    let a = appliance();
    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let good = good_pair(&a, stop.clone(), got.clone());
    let (host_e, mut evil) = connect(&a, 2);
    let evil_stats = || a.nics[2].stats();
    let progress = |what: &str| {
        // The good pair keeps moving after each attack.
        let before = got.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.load(Ordering::Relaxed) < before + 500 {
            assert!(Instant::now() < deadline, "good pair stalled after {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    progress("start");
    let sections = evil.sections() as u32;
    let send_pages = evil.buffer_pages().1;
    let send = host_e.slice(&send_pages);
    let ch = &mut evil.channels[0];

    // 1. Bad section indices and sizes: failure completions.
    for (tid, idx, size) in [
        (1, sections, 100),
        (2, 0xFFFF_FFFE, 100),
        (3, 0, 6145),
        (4, 0, u32::MAX),
    ] {
        let st = call(ch, tid, |ch| inband(ch, tid, &rndis_pkt(idx, size)));
        assert_eq!(st, nvsp::status::FAIL, "section {idx} size {size}");
    }
    // No section and no ranges.
    let st = call(ch, 5, |ch| inband(ch, 5, &rndis_pkt(nvsp::NO_SECTION, 0)));
    assert_eq!(st, nvsp::status::FAIL);
    assert!(evil_stats().bad_nvsp >= 5);
    progress("bad sections");

    // 2. GPA ranges out of bounds: pages past the guest's memory, a range
    //    claiming more pages than it lists, a wild page number.
    let outside = (16u64 << 20) / 4096 + 5;
    for (tid, count, off, pfns) in [
        (10, 100u32, 0u32, vec![outside]),
        (11, 3 * 4096, 0, vec![1]),
        (12, 100, 0, vec![u64::MAX / 4096]),
        (13, 100, 4000, vec![2]),
        // More bytes than any frame, and a range list longer than any
        // guest sends: refused before being walked.
        (14, 200 * 1024, 0, (1..51).collect()),
        (15, 1100 * 4096, 0, (1..1101).collect()),
    ] {
        let st = call(ch, tid, |ch| {
            write_gpa_direct(
                &mut ch.channel.outgoing,
                tid,
                PACKET_FLAG_COMPLETION_REQUESTED,
                &[(count, off, &pfns)],
                rndis_pkt(nvsp::NO_SECTION, 0).as_bytes(),
            )
            .unwrap()
        });
        assert_ne!(
            st,
            nvsp::status::SUCCESS,
            "GPA range {count}@{off} {pfns:?}"
        );
    }
    // A transfer-page packet from the guest (only hosts send those), with
    // ranges far outside any buffer: ignored and counted.
    let before = evil_stats().bad_nvsp;
    write_transfer_pages(
        &mut ch.channel.outgoing,
        20,
        PACKET_FLAG_COMPLETION_REQUESTED,
        0xCAFE,
        &[(u32::MAX, u32::MAX), (4096, 0xFFFF_0000)],
        rndis_pkt(0, 10).as_bytes(),
    )
    .unwrap();
    // Completions of packets the host never sent.
    for tid in [0, 7, u64::MAX] {
        ch.channel
            .outgoing
            .write_completion(tid, &nvsp::rndis_pkt_complete(1))
            .unwrap();
    }
    ch.channel.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while (evil_stats().bad_nvsp == before || evil_stats().bad_completions < 3)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(evil_stats().bad_nvsp > before);
    assert!(evil_stats().bad_completions >= 3);
    progress("bad ranges");

    // 3. RNDIS lengths past the buffer: a message longer than the section's
    //    used size, one with a huge length, a zero length, frame data and
    //    PPIs pointing past the message.
    let cases: Vec<(Vec<u8>, u32)> = vec![
        (
            data_message(|m| m[4..8].copy_from_slice(&200u32.to_le_bytes())),
            104,
        ),
        (
            data_message(|m| m[4..8].copy_from_slice(&u32::MAX.to_le_bytes())),
            104,
        ),
        (
            data_message(|m| m[4..8].copy_from_slice(&0u32.to_le_bytes())),
            104,
        ),
        (
            data_message(|m| m[8..12].copy_from_slice(&500u32.to_le_bytes())),
            104,
        ),
        (
            data_message(|m| m[12..16].copy_from_slice(&0xFFFF_FF00u32.to_le_bytes())),
            104,
        ),
        (
            data_message(|m| {
                m[28..32].copy_from_slice(&36u32.to_le_bytes());
                m[32..36].copy_from_slice(&4000u32.to_le_bytes());
            }),
            104,
        ),
        (
            // A PPI whose size is 0 (would loop forever if accepted).
            {
                let mut m = data_message(|_| {});
                m.splice(44..44, [0u8; 16]);
                m[4..8].copy_from_slice(&120u32.to_le_bytes());
                m[8..12].copy_from_slice(&52u32.to_le_bytes());
                m[28..32].copy_from_slice(&36u32.to_le_bytes());
                m[32..36].copy_from_slice(&16u32.to_le_bytes());
                m
            },
            120,
        ),
        // A good message followed by a zero-length one.
        (
            {
                let mut m = data_message(|_| {});
                m.extend_from_slice(&[0; 16]);
                m
            },
            120,
        ),
    ];
    let before = evil_stats().drop_tx_malformed;
    for (i, (msg, size)) in cases.iter().enumerate() {
        let tid = 30 + i as u64;
        send.write_at(0, msg).unwrap();
        let st = call(ch, tid, |ch| inband(ch, tid, &rndis_pkt(0, *size)));
        assert_eq!(st, nvsp::status::INVALID_RNDIS_PKT, "case {i}");
    }
    assert!(evil_stats().drop_tx_malformed >= before + 7);
    // A good message still works on the same channel.
    send.write_at(0, &data_message(|_| {})).unwrap();
    let st = call(ch, 50, |ch| inband(ch, 50, &rndis_pkt(0, 104)));
    assert_eq!(st, nvsp::status::SUCCESS);
    progress("bad RNDIS lengths");

    // 4. A flood without reading: the host stops reading the evil ring
    //    when its completions do not fit, and nothing else notices.
    let (mut flooded, mut stuck) = (0u64, 0);
    while stuck < 3 {
        let m = rndis_pkt(0, 104);
        let tid = 100 + flooded;
        let w = ch.channel.outgoing.write_packet(
            packet_type::DATA_INBAND,
            PACKET_FLAG_COMPLETION_REQUESTED,
            tid,
            &[],
            m.as_bytes(),
        );
        if w.is_ok() {
            flooded += 1;
            stuck = 0;
        } else {
            // Full: the host stopped reading once its replies did not fit.
            ch.channel.flush().unwrap();
            std::thread::sleep(Duration::from_millis(20));
            stuck += 1;
        }
    }
    assert!(flooded > 1000);
    progress("flood");
    // Reading now gets every completion.
    let mut completions = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while completions < flooded {
        match read_packet(ch).unwrap() {
            Some(HostPacket::Completion { payload, .. }) => {
                assert_eq!(&payload[..8], &nvsp::rndis_pkt_complete(1));
                completions += 1;
            }
            Some(_) => {}
            None => {
                assert!(Instant::now() < deadline, "{completions} of {flooded}");
                ch.channel.flush().unwrap();
                ch.channel
                    .wait_for_work(Some(Duration::from_millis(10)))
                    .unwrap();
            }
        }
    }
    ch.channel.flush().unwrap();

    // 5. Never completing received packets: broadcasts reach the evil
    //    guest, which never completes them; its buffer fills and the port
    //    drops and counts, while the good pair keeps its pace.
    let mut probe =
        a.sw.add_port(PortSpec::new("probe", OffloadCaps::NONE))
            .unwrap();
    for round in 0..100u64 {
        let mut frames: Vec<Frame> = (0..50)
            .map(|i| {
                Frame::new(Bytes::from(frame(
                    MacAddr::BROADCAST,
                    MacAddr([2, 9, 9, 9, 9, 9]),
                    round * 50 + i,
                    1000,
                )))
            })
            .collect();
        probe.ingress(&mut frames);
        std::thread::sleep(Duration::from_millis(2));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while evil_stats().drop_rx_no_buffer == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(evil_stats().drop_rx_no_buffer > 0, "{:?}", evil_stats());
    progress("a guest that never completes");
    // Its control requests still get completions; the replies, once they
    // find no room in its buffer either, are dropped and counted (the
    // channel does not wait for a guest that never completes).
    let before = evil_stats().drop_control_replies;
    let query =
        switch::netvsp::client::oid_message(rndis::msg::QUERY, 99, rndis::oid::GEN_LINK_SPEED, &[]);
    let many = query.repeat(200);
    send.write_at(0, &many).unwrap();
    for round in 0..20 {
        let tid = 60 + round;
        let st = call(ch, tid, |ch| {
            inband(ch, tid, &rndis_pkt(0, many.len() as u32))
        });
        assert_eq!(st, nvsp::status::SUCCESS);
        if evil_stats().drop_control_replies > before {
            break;
        }
    }
    assert!(
        evil_stats().drop_control_replies > before,
        "{:?}",
        evil_stats()
    );
    progress("control requests of a guest that never completes");

    // 6. A corrupted ring on another NIC: that channel is reset (rescinded
    //    and offered again), nothing else.
    let (mut host_r, ring) = connect(&a, 3);
    let relid = ring.channels[0].relid();
    let out = ring.channels[0].channel.outgoing.memory().clone();
    // write_index past the ring, as a broken guest might leave it.
    out.write_control_bytes(&0x7fff_fff1u32.to_le_bytes());
    ring.channels[0].channel.signal_peer();
    host_r.wait_rescind(relid).unwrap();
    assert_eq!(a.nics[3].stats().channel_resets, 1);
    progress("a corrupted ring");
    assert!(!a.nics[3].is_open(), "the reset NIC left the switch");

    // (Port counters vanish with the port when the good guests leave.)
    let queue_drops = a.sw.port_stats("good-b").unwrap().drop_queue_full;
    stop.store(true, Ordering::Release);
    let (sent, received) = good.join().unwrap();
    // With the good guests gone, the NIC thread sleeps although the evil
    // guest still holds its buffer full: no busy loop.
    std::thread::sleep(Duration::from_millis(200));
    let before = thread_cpu_ticks("nvm-0");
    std::thread::sleep(Duration::from_secs(1));
    let used = thread_cpu_ticks("nvm-0") - before;
    assert!(
        used <= 10,
        "the NIC thread used {used} ticks of 100 while idle"
    );
    assert_eq!(sent, received, "the good pair lost nothing");
    assert!(sent > 5000);
    for n in &a.nics[..2] {
        let s = n.stats();
        assert_eq!(
            (
                s.bad_nvsp,
                s.drop_tx_malformed,
                s.drop_rx_no_buffer,
                s.channel_resets
            ),
            (0, 0, 0, 0),
            "{}: {s:?}",
            n.config().name
        );
    }
    assert_eq!(queue_drops, 0);
    drop(evil);
    drop(host_e);
}
