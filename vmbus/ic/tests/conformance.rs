//! Conformance: every byte vspa sends on each IC channel, checked against
//! bytes built by hand from the layouts in ic.md (pipe header, icmsg_hdr,
//! each service's body), and Linux 6.1's exact replies replayed to it (the
//! request edited in place: icmsgsize 16 and the chosen versions for
//! NEGOTIATE, flags 0x5, status, seq+1, ENUMERATE entries). The guest model
//! is checked against the same hand-written replies.

use std::time::Duration;

use ic::guest::GuestIc;
use ic::harness::{RawGuest, RawPacket};
use ic::{ChannelStatus, IcConfig, IcSet, Pool, Service, ShutdownKind, ShutdownOutcome, Version};

const WAIT: Duration = Duration::from_secs(5);

/// A version as (major, minor).
type V = (u16, u16);

/// Writes little-endian `v` (of `n` bytes) at `off`.
fn put(buf: &mut [u8], off: usize, v: u64, n: usize) {
    buf[off..off + n].copy_from_slice(&v.to_le_bytes()[..n]);
}

/// A host request as ic.md §1.5/§2.1 lays it out: pipe {1, 20 + body},
/// icmsg_hdr {fw, type, msg, size, status 0, txid, flags 0x3}, body;
/// padded to 8 with zeros.
fn host_request(kind: u16, fw: (u16, u16), msg: (u16, u16), txid: u8, body: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; (28 + body.len()).next_multiple_of(8)];
    put(&mut p, 0, 1, 4);
    put(&mut p, 4, 20 + body.len() as u64, 4);
    put(&mut p, 8, fw.0.into(), 2);
    put(&mut p, 10, fw.1.into(), 2);
    put(&mut p, 12, kind.into(), 2);
    put(&mut p, 14, msg.0.into(), 2);
    put(&mut p, 16, msg.1.into(), 2);
    put(&mut p, 18, body.len() as u64, 2);
    p[24] = txid;
    p[25] = 0x3;
    p[28..28 + body.len()].copy_from_slice(body);
    p
}

/// A NEGOTIATE body: counts, reserved, versions.
fn negotiate(fw: &[(u16, u16)], msg: &[(u16, u16)]) -> Vec<u8> {
    let mut b = vec![0u8; 8];
    put(&mut b, 0, fw.len() as u64, 2);
    put(&mut b, 2, msg.len() as u64, 2);
    for (maj, min) in fw.iter().chain(msg) {
        b.extend_from_slice(&maj.to_le_bytes());
        b.extend_from_slice(&min.to_le_bytes());
    }
    b
}

/// Linux's answer to a NEGOTIATE: icmsgsize 16, flags 0x5, counts 1/1,
/// slots 0 and 1 the chosen versions, everything else as received.
fn linux_negotiate_reply(req: &[u8], fw: (u16, u16), msg: (u16, u16)) -> Vec<u8> {
    let mut r = req.to_vec();
    put(&mut r, 18, 16, 2);
    r[25] = 0x5;
    put(&mut r, 28, 1, 2);
    put(&mut r, 30, 1, 2);
    put(&mut r, 36, fw.0.into(), 2);
    put(&mut r, 38, fw.1.into(), 2);
    put(&mut r, 40, msg.0.into(), 2);
    put(&mut r, 42, msg.1.into(), 2);
    r
}

/// Linux's answer to any other message: flags 0x5 and a status.
fn linux_reply(req: &[u8], status: u32) -> Vec<u8> {
    let mut r = req.to_vec();
    r[25] = 0x5;
    put(&mut r, 20, status.into(), 4);
    r
}

fn config() -> IcConfig {
    IcConfig {
        host_name: "hostA".into(),
        heartbeat_period_ms: 60_000,
        timesync_period_ms: 60_000,
        kvp_refresh_ms: 0,
        reply_timeout_ms: 2000,
        ..Default::default()
    }
}

fn recv(g: &mut RawGuest) -> RawPacket {
    let p = g.recv(WAIT).unwrap().expect("a packet from the host");
    assert_eq!(p.packet_type, 6, "in-band data");
    assert_eq!(p.flags, 0, "no completion requested");
    p
}

fn wait_status(set: &IcSet, s: Service, want: ChannelStatus) {
    let h = set.handle();
    let deadline = std::time::Instant::now() + WAIT;
    while h.channel(s).unwrap().status != want {
        assert!(
            std::time::Instant::now() < deadline,
            "{s}: {:?}",
            h.channel(s)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Receives NEGOTIATE, checks it byte for byte, replays Linux's reply and
/// waits for the channel to be ready with the chosen versions.
fn negotiate_as_linux(
    set: &IcSet,
    g: &mut RawGuest,
    service: Service,
    offered: (&[V], &[V]),
    chosen: (V, V),
) {
    let p = recv(g);
    let want = host_request(
        0,
        (0, 0),
        (0, 0),
        p.txid as u8,
        &negotiate(offered.0, offered.1),
    );
    assert_eq!(p.payload, want, "{service} NEGOTIATE bytes");
    assert_eq!(p.txid, 1);
    let reply = linux_negotiate_reply(&p.payload, chosen.0, chosen.1);
    assert_eq!(
        GuestIc::new(service).answer(&p.payload),
        Some(reply.clone()),
        "the guest model answers as Linux"
    );
    g.send(p.txid, &reply).unwrap();
    wait_status(
        set,
        service,
        ChannelStatus::Ready {
            framework: Version::new(chosen.0.0, chosen.0.1),
            message: Version::new(chosen.1.0, chosen.1.1),
        },
    );
}

#[test]
fn shutdown_negotiate_bytes_are_exact() {
    let set = IcSet::new("vm", &config()).unwrap();
    let mut g = RawGuest::attach(&set, Service::Shutdown).unwrap();
    let p = recv(&mut g);
    #[rustfmt::skip]
    let want: [u8; 64] = [
        0x01, 0, 0, 0, 0x34, 0, 0, 0,            // pipe: data, 20 + 32 bytes
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0,            // fw 0.0, NEGOTIATE, msg 0.0
        0x20, 0, 0, 0, 0, 0, 0x01, 0x03, 0, 0,   // icmsgsize 32, status 0, txid 1, flags 3
        2, 0, 4, 0, 0, 0, 0, 0,                  // 2 framework, 4 message versions
        1, 0, 0, 0, 3, 0, 0, 0,                  // 1.0 3.0
        1, 0, 0, 0, 3, 0, 0, 0, 3, 0, 1, 0, 3, 0, 2, 0, // 1.0 3.0 3.1 3.2
        0, 0, 0, 0,                              // padding to 8
    ];
    assert_eq!(p.payload, want);
    #[rustfmt::skip]
    let linux: [u8; 64] = [
        0x01, 0, 0, 0, 0x34, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0x10, 0, 0, 0, 0, 0, 0x01, 0x05, 0, 0,   // icmsgsize 16, flags 5
        1, 0, 1, 0, 0, 0, 0, 0,                  // one of each
        3, 0, 0, 0, 3, 0, 2, 0,                  // chose 3.0 and 3.2
        1, 0, 0, 0, 3, 0, 0, 0, 3, 0, 1, 0, 3, 0, 2, 0, // the rest as received
        0, 0, 0, 0,
    ];
    assert_eq!(
        GuestIc::new(Service::Shutdown).answer(&p.payload).unwrap(),
        linux
    );
    g.send(p.txid, &linux).unwrap();
    wait_status(
        &set,
        Service::Shutdown,
        ChannelStatus::Ready {
            framework: Version::new(3, 0),
            message: Version::new(3, 2),
        },
    );
}

#[test]
fn shutdown_requests_carry_the_full_2060_byte_body() {
    let set = IcSet::new(
        "vm",
        &IcConfig {
            hibernate: true,
            ..config()
        },
    )
    .unwrap();
    let h = set.handle();
    let mut g = RawGuest::attach(&set, Service::Shutdown).unwrap();
    let sd = [(1, 0), (3, 0), (3, 1), (3, 2)];
    negotiate_as_linux(
        &set,
        &mut g,
        Service::Shutdown,
        (&[(1, 0), (3, 0)], &sd),
        ((3, 0), (3, 2)),
    );
    for (kind, flags, status, outcome) in [
        (ShutdownKind::PowerOff, 0, 0, ShutdownOutcome::Acknowledged),
        (ShutdownKind::Reboot, 2, 0, ShutdownOutcome::Acknowledged),
        // Linux without ACPI S4 refuses hibernation with E_FAIL.
        (
            ShutdownKind::Hibernate,
            4,
            0x8000_4005,
            ShutdownOutcome::Refused(0x8000_4005),
        ),
    ] {
        let asker = {
            let h = h.clone();
            std::thread::spawn(move || h.shutdown(kind, WAIT))
        };
        let p = recv(&mut g);
        let mut body = vec![0u8; 2060];
        put(&mut body, 0, 0x8000_0000, 4); // SHTDN_REASON_FLAG_PLANNED
        put(&mut body, 8, flags, 4);
        let want = host_request(3, (3, 0), (3, 2), p.txid as u8, &body);
        assert_eq!(p.payload.len(), 2088);
        assert_eq!(p.payload, want, "{kind:?}");
        let reply = linux_reply(&p.payload, status);
        assert_eq!(
            GuestIc::new(Service::Shutdown).answer(&p.payload),
            Some(reply.clone())
        );
        g.send(p.txid, &reply).unwrap();
        assert_eq!(asker.join().unwrap(), outcome, "{kind:?}");
    }
    let last = h.snapshot().shutdown.unwrap().state.last.unwrap();
    assert_eq!(last.kind, ShutdownKind::Hibernate);
}

#[test]
fn timesync_sends_sync_then_samples_in_the_v4_layout() {
    let set = IcSet::new(
        "vm",
        &IcConfig {
            timesync_period_ms: 100,
            ..config()
        },
    )
    .unwrap();
    let h = set.handle();
    h.set_reference_clock(std::sync::Arc::new(|| 0x1122_3344_5566));
    let mut g = RawGuest::attach(&set, Service::TimeSync).unwrap();
    negotiate_as_linux(
        &set,
        &mut g,
        Service::TimeSync,
        (&[(1, 0), (3, 0)], &[(3, 0), (4, 0)]),
        ((3, 0), (4, 0)),
    );
    for flags in [1u64, 2] {
        let before = ic::timesync::filetime_now();
        let p = recv(&mut g);
        let after = ic::timesync::filetime_now();
        let parent = u64::from_le_bytes(p.payload[28..36].try_into().unwrap());
        assert!(
            (before - 10_000_000..=after).contains(&parent),
            "host time as FILETIME"
        );
        let mut body = vec![0u8; 22];
        put(&mut body, 0, parent, 8);
        put(&mut body, 8, 0x1122_3344_5566, 8);
        put(&mut body, 16, flags, 1);
        assert_eq!(
            p.payload,
            host_request(4, (3, 0), (4, 0), p.txid as u8, &body)
        );
        assert_eq!(p.payload.len(), 56);
        let reply = linux_reply(&p.payload, 0);
        assert_eq!(
            GuestIc::new(Service::TimeSync).answer(&p.payload),
            Some(reply.clone())
        );
        g.send(p.txid, &reply).unwrap();
    }
    let deadline = std::time::Instant::now() + WAIT;
    while h.time_sync().unwrap().samples < 1 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    let s = h.time_sync().unwrap();
    assert_eq!((s.syncs, s.samples), (1, 1));
    let last = s.last.unwrap();
    assert_eq!(last.kind, "sample");
    assert_eq!(last.reference_time, 0x1122_3344_5566);
    assert_eq!(
        last.offset_100ns,
        (last.parent_time - 0x1122_3344_5566) as i64
    );
}

#[test]
fn timesync_v3_guest_gets_the_25_byte_layout() {
    let set = IcSet::new("vm", &config()).unwrap();
    let mut g = RawGuest::attach(&set, Service::TimeSync).unwrap();
    let p = recv(&mut g);
    // A guest that knows only 3.0 (Linux before time sync v4).
    g.send(p.txid, &linux_negotiate_reply(&p.payload, (3, 0), (3, 0)))
        .unwrap();
    let p = recv(&mut g);
    let parent = u64::from_le_bytes(p.payload[28..36].try_into().unwrap());
    let mut body = vec![0u8; 25];
    put(&mut body, 0, parent, 8);
    body[24] = 1; // SYNC; childtime and roundtriptime zero
    assert_eq!(
        p.payload,
        host_request(4, (3, 0), (3, 0), p.txid as u8, &body)
    );
}

#[test]
fn heartbeat_answers_with_sequence_plus_one() {
    let set = IcSet::new("vm", &config()).unwrap();
    let h = set.handle();
    let mut g = RawGuest::attach(&set, Service::Heartbeat).unwrap();
    negotiate_as_linux(
        &set,
        &mut g,
        Service::Heartbeat,
        (&[(1, 0), (3, 0)], &[(1, 0), (3, 0)]),
        ((3, 0), (3, 0)),
    );
    let p = recv(&mut g);
    let seq = u64::from_le_bytes(p.payload[28..36].try_into().unwrap());
    let mut body = vec![0u8; 40];
    put(&mut body, 0, seq, 8);
    assert_eq!(
        p.payload,
        host_request(1, (3, 0), (3, 0), p.txid as u8, &body)
    );
    let mut reply = linux_reply(&p.payload, 0);
    put(&mut reply, 28, seq + 1, 8);
    assert_eq!(
        GuestIc::new(Service::Heartbeat).answer(&p.payload),
        Some(reply.clone())
    );
    g.send(p.txid, &reply).unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    while h.heartbeat().unwrap().health != ic::Health::Alive {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// UTF-16LE of `s` plus terminator, and its byte count.
fn utf16(s: &str) -> (Vec<u8>, u64) {
    let mut b: Vec<u8> = s.encode_utf16().flat_map(u16::to_le_bytes).collect();
    b.extend_from_slice(&[0, 0]);
    let n = b.len() as u64;
    (b, n)
}

#[test]
fn kvp_set_and_enumerate_bytes() {
    let set = IcSet::new("vm-é", &config()).unwrap();
    let h = set.handle();
    let mut g = RawGuest::attach(&set, Service::Kvp).unwrap();
    negotiate_as_linux(
        &set,
        &mut g,
        Service::Kvp,
        (&[(1, 0), (3, 0)], &[(3, 0), (4, 0)]),
        ((3, 0), (4, 0)),
    );
    // The host's own values into AutoExternal (pool 3), one SET each.
    let mut linux = GuestIc::new(Service::Kvp);
    for (key, value) in [
        ("VirtualMachineName", "vm-é"),
        ("HostName", "hostA"),
        ("PhysicalHostName", "hostA"),
        ("PhysicalHostNameFullyQualified", "hostA"),
    ] {
        let p = recv(&mut g);
        let mut body = vec![0u8; 2576];
        body[0] = 1; // SET
        body[1] = 3; // AutoExternal
        put(&mut body, 4, 1, 4); // REG_SZ
        let (k, klen) = utf16(key);
        let (v, vlen) = utf16(value);
        put(&mut body, 8, klen, 4);
        put(&mut body, 12, vlen, 4);
        body[16..16 + k.len()].copy_from_slice(&k);
        body[528..528 + v.len()].copy_from_slice(&v);
        assert_eq!(
            p.payload,
            host_request(2, (3, 0), (4, 0), p.txid as u8, &body),
            "{key}"
        );
        let reply = linux_reply(&p.payload, 0);
        assert_eq!(linux.answer(&p.payload), Some(reply.clone()));
        g.send(p.txid, &reply).unwrap();
    }
    assert!(linux.pools[3].contains(&("VirtualMachineName".into(), "vm-é".into())));

    // ENUMERATE of the guest's pool: index 0 has an entry, index 1 ends it.
    let asker = {
        let h = h.clone();
        std::thread::spawn(move || h.kvp_enumerate(Pool::Guest, WAIT))
    };
    linux.pools[1].push(("role".into(), "db".into()));
    for index in 0..2u64 {
        let p = recv(&mut g);
        let mut body = vec![0u8; 2580];
        body[0] = 3; // ENUMERATE
        body[1] = 1; // Guest
        put(&mut body, 4, index, 4);
        assert_eq!(
            p.payload,
            host_request(2, (3, 0), (4, 0), p.txid as u8, &body)
        );
        assert_eq!(p.payload.len(), 2608);
        let reply = if index == 0 {
            let mut r = linux_reply(&p.payload, 0);
            put(&mut r, 28 + 8, 1, 4); // REG_SZ
            put(&mut r, 28 + 12, 10, 4); // "role" + NUL
            put(&mut r, 28 + 16, 6, 4); // "db" + NUL
            r[48..56].copy_from_slice(&[b'r', 0, b'o', 0, b'l', 0, b'e', 0]);
            r[560..564].copy_from_slice(&[b'd', 0, b'b', 0]);
            r
        } else {
            linux_reply(&p.payload, 0x8007_0103) // HV_S_CONT: no more items
        };
        assert_eq!(
            linux.answer(&p.payload),
            Some(reply.clone()),
            "index {index}"
        );
        g.send(p.txid, &reply).unwrap();
    }
    let entries = asker.join().unwrap().unwrap();
    assert_eq!(entries, [ic::KvpEntry::new("role", "db")]);
    assert_eq!(h.kvp_values().unwrap().guest, entries);
}

#[test]
fn vss_freeze_and_thaw_bytes() {
    let set = IcSet::new("vm", &config()).unwrap();
    let h = set.handle();
    let mut g = RawGuest::attach(&set, Service::Vss).unwrap();
    negotiate_as_linux(
        &set,
        &mut g,
        Service::Vss,
        (&[(3, 0)], &[(5, 0)]),
        ((3, 0), (5, 0)),
    );
    let mut linux = GuestIc::new(Service::Vss);
    for (freeze, op) in [(true, 5u8), (false, 6)] {
        let asker = {
            let h = h.clone();
            std::thread::spawn(move || {
                if freeze {
                    h.vss_freeze(WAIT)
                } else {
                    h.vss_thaw(WAIT)
                }
            })
        };
        let p = recv(&mut g);
        let mut body = vec![0u8; 12];
        body[0] = op;
        assert_eq!(
            p.payload,
            host_request(5, (3, 0), (5, 0), p.txid as u8, &body)
        );
        assert_eq!(p.payload.len(), 40);
        let reply = linux_reply(&p.payload, 0);
        assert_eq!(linux.answer(&p.payload), Some(reply.clone()));
        g.send(p.txid, &reply).unwrap();
        asker.join().unwrap().unwrap();
        assert_eq!(linux.frozen, freeze);
    }
    let v = h.snapshot().vss.unwrap().state;
    assert_eq!((v.phase, v.freezes), (ic::VssPhase::Thawed, 1));
}
