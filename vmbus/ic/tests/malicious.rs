//! Malicious and broken guests against the real IC worker: wrong versions,
//! truncated and oversized replies, wrong transaction ids and flags, bad
//! UTF-16, floods, corrupt rings and guests that never answer. Each must
//! end in a clear state (channel status, error counts, a typed error for
//! the caller) without a panic, and a channel that still works whenever
//! the guest starts behaving.

use std::time::{Duration, Instant};

use ic::guest::GuestIc;
use ic::harness::{RawGuest, RawPacket};
use ic::{
    ChannelStatus, Health, IcConfig, IcError, IcSet, Pool, Service, ShutdownKind, ShutdownOutcome,
};
use proptest::prelude::*;

const WAIT: Duration = Duration::from_secs(5);
const SHORT: Duration = Duration::from_millis(300);

fn config() -> IcConfig {
    IcConfig {
        host_name: "h".into(),
        heartbeat_period_ms: 60_000,
        timesync_period_ms: 60_000,
        kvp_refresh_ms: 0,
        reply_timeout_ms: 300,
        ..Default::default()
    }
}

fn recv(g: &mut RawGuest) -> RawPacket {
    g.recv(WAIT).unwrap().expect("a packet from the host")
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Attaches `service` and answers NEGOTIATE as Linux does.
fn ready(set: &IcSet, service: Service) -> (RawGuest, GuestIc) {
    let mut g = RawGuest::attach(set, service).unwrap();
    let mut linux = GuestIc::new(service);
    let p = recv(&mut g);
    g.send(p.txid, &linux.answer(&p.payload).unwrap()).unwrap();
    let h = set.handle();
    until("negotiation", || {
        h.channel(service).unwrap().negotiated().is_some()
    });
    (g, linux)
}

fn errors(set: &IcSet, service: Service) -> u64 {
    set.handle().channel(service).unwrap().protocol_errors
}

/// Sends a shutdown request from another thread; the guest end gets it.
fn ask_shutdown(set: &IcSet, timeout: Duration) -> std::thread::JoinHandle<ShutdownOutcome> {
    let h = set.handle();
    std::thread::spawn(move || h.shutdown(ShutdownKind::PowerOff, timeout))
}

/// A full request/answer cycle with a well-behaved guest still works.
fn still_works(set: &IcSet, g: &mut RawGuest, linux: &mut GuestIc) {
    let asker = ask_shutdown(set, WAIT);
    let p = recv(g);
    g.send(p.txid, &linux.answer(&p.payload).unwrap()).unwrap();
    assert_eq!(asker.join().unwrap(), ShutdownOutcome::Acknowledged);
}

#[test]
fn versions_not_offered_fail_the_channel_clearly() {
    for (fw, msg, reason) in [
        ((3u16, 0u16), (2u16, 0u16), "2.0, which was not offered"),
        ((9, 9), (3, 2), "9.9, which was not offered"),
    ] {
        let set = IcSet::new("vm", &config()).unwrap();
        let mut g = RawGuest::attach(&set, Service::Shutdown).unwrap();
        let p = recv(&mut g);
        let mut r = GuestIc::new(Service::Shutdown).answer(&p.payload).unwrap();
        r[36..40].copy_from_slice(&[fw.0 as u8, 0, fw.1 as u8, 0]);
        r[40..44].copy_from_slice(&[msg.0 as u8, 0, msg.1 as u8, 0]);
        g.send(p.txid, &r).unwrap();
        let h = set.handle();
        until("failure", || {
            matches!(
                h.channel(Service::Shutdown).unwrap().status,
                ChannelStatus::Failed { .. }
            )
        });
        let status = h.channel(Service::Shutdown).unwrap().status;
        assert!(format!("{status:?}").contains(reason), "{status:?}");
        let started = Instant::now();
        match h.shutdown(ShutdownKind::PowerOff, WAIT) {
            ShutdownOutcome::NotConnected(IcError::Failed(why)) => assert!(why.contains(reason)),
            other => panic!("{other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "answered at once"
        );
    }
}

#[test]
fn no_common_version_and_bad_counts() {
    let set = IcSet::new("vm", &config()).unwrap();
    let mut g = RawGuest::attach(&set, Service::Vss).unwrap();
    let p = recv(&mut g);
    // A guest without VSS 5.0: Linux's answer has both counts 0.
    let mut reply = GuestIc::new(Service::Vss).answer(&p.payload).unwrap();
    reply[28..32].copy_from_slice(&[0, 0, 0, 0]);
    g.send(p.txid, &reply).unwrap();
    let h = set.handle();
    until("failure", || {
        matches!(
            h.channel(Service::Vss).unwrap().status,
            ChannelStatus::Failed { .. }
        )
    });
    assert!(
        matches!(h.vss_freeze(WAIT), Err(IcError::Failed(r)) if r.contains("none of the offered"))
    );

    // Counts of 2 and 1 are not an answer Linux gives.
    let mut g = RawGuest::attach(&set, Service::Heartbeat).unwrap();
    let p = recv(&mut g);
    let mut reply = GuestIc::new(Service::Heartbeat).answer(&p.payload).unwrap();
    reply[28] = 2;
    g.send(p.txid, &reply).unwrap();
    until("failure", || {
        matches!(
            h.channel(Service::Heartbeat).unwrap().status,
            ChannelStatus::Failed { .. }
        )
    });
    assert_eq!(h.heartbeat().unwrap().health, Health::Unknown);
}

#[test]
fn a_nonzero_status_on_negotiate_is_not_a_failure() {
    // Linux leaves status as the host sent it and signals failure only by
    // the counts; a guest that also sets a status still negotiated.
    let set = IcSet::new("vm", &config()).unwrap();
    let mut g = RawGuest::attach(&set, Service::Shutdown).unwrap();
    let p = recv(&mut g);
    let mut r = GuestIc::new(Service::Shutdown).answer(&p.payload).unwrap();
    r[20..24].copy_from_slice(&0x8000_4005u32.to_le_bytes());
    g.send(p.txid, &r).unwrap();
    assert!(set.handle().wait_ready(Service::Shutdown, WAIT));
}

#[test]
fn truncated_oversized_and_misflagged_replies_are_refused() {
    let set = IcSet::new("vm", &config()).unwrap();
    let (mut g, mut linux) = ready(&set, Service::Shutdown);
    type Damage = fn(&mut Vec<u8>, &mut u64);
    let cases: [(&str, Damage); 7] = [
        ("truncated", |r, _| r.truncate(r.len() - 8)),
        ("oversized", |r, _| r.extend_from_slice(&[0; 4096])),
        ("header only", |r, _| r.truncate(32)),
        ("request flags", |r, _| r[25] = 0x3),
        ("response bit only", |r, _| r[25] = 0x4),
        ("IC transaction id", |r, _| r[24] ^= 0xff),
        ("icmsgsize", |r, _| r[18] ^= 1),
    ];
    for (i, (what, damage)) in cases.into_iter().enumerate() {
        let asker = ask_shutdown(&set, WAIT);
        let p = recv(&mut g);
        let mut reply = linux.answer(&p.payload).unwrap();
        let mut txid = p.txid;
        damage(&mut reply, &mut txid);
        g.send(txid, &reply).unwrap();
        match asker.join().unwrap() {
            ShutdownOutcome::Failed(IcError::BadReply(_)) => {}
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(errors(&set, Service::Shutdown), i as u64 + 1, "{what}");
    }
    still_works(&set, &mut g, &mut linux);
    let info = set.handle().channel(Service::Shutdown).unwrap();
    assert!(matches!(info.status, ChannelStatus::Ready { .. }));
    assert!(info.last_error.unwrap().contains("icmsgsize"));
}

#[test]
fn wrong_transaction_ids_time_out_without_stalling() {
    let set = IcSet::new("vm", &config()).unwrap();
    let (mut g, mut linux) = ready(&set, Service::Shutdown);
    let asker = ask_shutdown(&set, SHORT);
    let p = recv(&mut g);
    let reply = linux.answer(&p.payload).unwrap();
    g.send(p.txid + 100, &reply).unwrap();
    assert_eq!(asker.join().unwrap(), ShutdownOutcome::TimedOut);
    assert_eq!(errors(&set, Service::Shutdown), 1);
    // The guest read that request, so the next one goes out; a correct
    // answer to the old one afterwards is dropped quietly.
    let asker = ask_shutdown(&set, WAIT);
    let p2 = recv(&mut g);
    assert_ne!(p2.txid, p.txid);
    g.send(p.txid, &reply).unwrap();
    g.send(p2.txid, &linux.answer(&p2.payload).unwrap())
        .unwrap();
    assert_eq!(asker.join().unwrap(), ShutdownOutcome::Acknowledged);
    assert_eq!(errors(&set, Service::Shutdown), 1);
}

#[test]
fn a_guest_that_never_answers() {
    let set = IcSet::new(
        "vm",
        &IcConfig {
            heartbeat_period_ms: 40,
            heartbeat_misses: 3,
            ..config()
        },
    )
    .unwrap();
    let h = set.handle();
    // NEGOTIATE unanswered: NoReply, and callers are told at once.
    let mut kvp = RawGuest::attach(&set, Service::Kvp).unwrap();
    until("no reply", || {
        h.channel(Service::Kvp).unwrap().status == ChannelStatus::NoReply
    });
    let started = Instant::now();
    assert_eq!(h.kvp_enumerate(Pool::Auto, WAIT), Err(IcError::NotReady));
    assert!(started.elapsed() < Duration::from_secs(1));
    // The late answer (the daemon started) still completes negotiation.
    let p = recv(&mut kvp);
    let mut linux = GuestIc::new(Service::Kvp);
    kvp.send(p.txid, &linux.answer(&p.payload).unwrap())
        .unwrap();
    assert!(h.wait_ready(Service::Kvp, WAIT));

    // A shutdown request read and never answered: TimedOut, then the
    // late acknowledgement is recorded.
    let (mut sd, mut sd_linux) = ready(&set, Service::Shutdown);
    let asker = ask_shutdown(&set, SHORT);
    let p = recv(&mut sd);
    assert_eq!(asker.join().unwrap(), ShutdownOutcome::TimedOut);
    sd.send(p.txid, &sd_linux.answer(&p.payload).unwrap())
        .unwrap();
    until("late record", || {
        h.snapshot()
            .shutdown
            .unwrap()
            .state
            .last
            .is_some_and(|l| l.late)
    });

    // Heartbeats unanswered: unresponsive after three periods, without
    // the host piling requests into a ring nobody reads.
    let (mut hb, mut hb_linux) = ready(&set, Service::Heartbeat);
    let first = recv(&mut hb);
    hb.send(first.txid, &hb_linux.answer(&first.payload).unwrap())
        .unwrap();
    until("alive", || h.heartbeat().unwrap().health == Health::Alive);
    let stopped = Instant::now();
    until("unresponsive", || {
        h.heartbeat().unwrap().health == Health::Unresponsive
    });
    assert!(stopped.elapsed() >= Duration::from_millis(80));
    // Exactly one heartbeat waits in the ring (16 + 72 + 8 bytes).
    assert_eq!(hb.channel.incoming.bytes_available().unwrap(), 96);
    // Answering brings it back (answer whatever comes until it does).
    let deadline = Instant::now() + WAIT;
    while h.heartbeat().unwrap().health != Health::Alive {
        assert!(Instant::now() < deadline, "never alive again");
        if let Some(p) = hb.recv(Duration::from_millis(50)).unwrap() {
            hb.send(p.txid, &hb_linux.answer(&p.payload).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn bad_kvp_strings_are_refused_and_the_channel_goes_on() {
    let set = IcSet::new("vm", &config()).unwrap();
    let h = set.handle();
    let (mut g, mut linux) = ready(&set, Service::Kvp);
    // The host's own values first.
    for _ in 0..4 {
        let p = recv(&mut g);
        g.send(p.txid, &linux.answer(&p.payload).unwrap()).unwrap();
    }
    linux.pools[1].push(("key".into(), "value".into()));
    type Damage = fn(&mut Vec<u8>);
    // Payload offsets of the ENUMERATE entry's key_size (40), value_size (44), key (48).
    let cases: [(&str, Damage); 6] = [
        ("odd key size", |r| r[40] = 7),
        ("key without NUL", |r| r[40] = 6),
        ("value size past the field", |r| {
            r[44..48].copy_from_slice(&4096u32.to_le_bytes())
        }),
        ("huge key size", |r| {
            r[40..44].copy_from_slice(&u32::MAX.to_le_bytes())
        }),
        ("lone surrogate", |r| {
            r[48..50].copy_from_slice(&0xd800u16.to_le_bytes())
        }),
        ("unknown value type", |r| r[28 + 8] = 11),
    ];
    for (what, damage) in cases {
        let asker = {
            let h = h.clone();
            std::thread::spawn(move || h.kvp_enumerate(Pool::Guest, WAIT))
        };
        let p = recv(&mut g);
        let mut reply = linux.answer(&p.payload).unwrap();
        damage(&mut reply);
        g.send(p.txid, &reply).unwrap();
        match asker.join().unwrap() {
            Err(IcError::BadReply(why)) => assert!(why.contains("KVP"), "{what}: {why}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    // Refused statuses come back typed; the channel still works.
    let asker = {
        let h = h.clone();
        std::thread::spawn(move || h.kvp_delete(Pool::External, "absent", WAIT))
    };
    let p = recv(&mut g);
    g.send(p.txid, &linux.answer(&p.payload).unwrap()).unwrap();
    assert_eq!(asker.join().unwrap(), Err(IcError::Refused(0x8007_0103)));
    let asker = {
        let h = h.clone();
        std::thread::spawn(move || h.kvp_enumerate(Pool::Guest, WAIT))
    };
    for _ in 0..2 {
        let p = recv(&mut g);
        g.send(p.txid, &linux.answer(&p.payload).unwrap()).unwrap();
    }
    assert_eq!(
        asker.join().unwrap().unwrap(),
        [ic::KvpEntry::new("key", "value")]
    );
    // Arguments are checked before anything is sent.
    assert!(matches!(
        h.kvp_set(Pool::Guest, "k", "v", WAIT),
        Err(IcError::InvalidArgument(_))
    ));
    assert!(matches!(
        h.kvp_set(Pool::External, &"k".repeat(300), "v", WAIT),
        Err(IcError::InvalidArgument(_))
    ));
}

#[test]
fn floods_and_corrupt_rings() {
    let set = IcSet::new("vm", &config()).unwrap();
    let (mut g, mut linux) = ready(&set, Service::Shutdown);
    // Unsolicited packets of every kind: counted, dropped, no effect.
    for i in 0..150u64 {
        let kind = [6u16, 7, 9, 11][i as usize % 4];
        g.send_packet(kind, i, &[0xab; 40]).unwrap();
    }
    until("flood counted", || errors(&set, Service::Shutdown) >= 150);
    still_works(&set, &mut g, &mut linux);

    // A descriptor that lies about its length (on a fresh channel, whose
    // ring still starts at 0): the worker gives the channel up (a reset)
    // instead of reading out of bounds.
    drop(g);
    let g = RawGuest::attach(&set, Service::Shutdown).unwrap();
    let mut bad = [0u8; 24];
    bad[0] = 6; // in-band
    bad[2] = 2; // offset8
    bad[4] = 0xff; // length8 far past the data
    g.channel.outgoing.memory().write_data_bytes(&bad);
    g.channel
        .outgoing
        .memory()
        .write_control_bytes(&24u32.to_le_bytes());
    g.channel.signal_peer();
    let h = set.handle();
    until("reset", || {
        h.channel(Service::Shutdown).unwrap().status == ChannelStatus::Offline
    });
    assert!(h.channel(Service::Shutdown).unwrap().last_error.is_some());
    assert!(matches!(
        h.shutdown(ShutdownKind::PowerOff, WAIT),
        ShutdownOutcome::NotConnected(IcError::NotConnected)
    ));
}

#[test]
fn closing_the_channel_answers_waiting_callers() {
    let set = IcSet::new("vm", &config()).unwrap();
    let (mut g, _) = ready(&set, Service::Shutdown);
    let asker = ask_shutdown(&set, WAIT);
    recv(&mut g);
    g.close();
    assert_eq!(
        asker.join().unwrap(),
        ShutdownOutcome::NotConnected(IcError::NotConnected)
    );
    // A second connection may open it again.
    let (mut g2, mut linux) = ready(&set, Service::Shutdown);
    still_works(&set, &mut g2, &mut linux);
    // While it is open, nobody else can.
    assert!(RawGuest::attach(&set, Service::Shutdown).is_err());
}

#[test]
fn host_policy_refusals() {
    let set = IcSet::new("vm", &config()).unwrap();
    let h = set.handle();
    assert!(matches!(
        h.shutdown(ShutdownKind::PowerOff, SHORT),
        ShutdownOutcome::NotConnected(IcError::NotConnected)
    ));
    let (mut g, mut linux) = ready(&set, Service::Shutdown);
    assert!(matches!(
        h.shutdown(ShutdownKind::Hibernate, SHORT),
        ShutdownOutcome::Failed(IcError::NotAllowed(_))
    ));
    // One request at a time.
    let first = ask_shutdown(&set, WAIT);
    let p = recv(&mut g);
    assert_eq!(
        h.shutdown(ShutdownKind::Reboot, SHORT),
        ShutdownOutcome::Failed(IcError::Busy)
    );
    g.send(p.txid, &linux.answer(&p.payload).unwrap()).unwrap();
    assert_eq!(first.join().unwrap(), ShutdownOutcome::Acknowledged);
    // A service that is off.
    let off = IcSet::new(
        "vm",
        &IcConfig {
            vss: false,
            ..config()
        },
    )
    .unwrap();
    assert_eq!(off.handle().vss_freeze(SHORT), Err(IcError::Disabled));
    assert!(off.handle().snapshot().vss.is_none());
}

#[test]
fn reboot_needs_a_guest_that_negotiated_3_1() {
    let set = IcSet::new("vm", &config()).unwrap();
    let mut g = RawGuest::attach(&set, Service::Shutdown).unwrap();
    let p = recv(&mut g);
    // An older guest (shutdown 3.0 only).
    let mut old = GuestIc::new(Service::Shutdown);
    let mut payload = p.payload.clone();
    ic::message::linux_negotiate(
        &mut payload,
        &[ic::Version::new(3, 0)],
        &[ic::Version::new(3, 0)],
    )
    .unwrap();
    payload[25] = 5;
    g.send(p.txid, &payload).unwrap();
    let h = set.handle();
    assert!(h.wait_ready(Service::Shutdown, WAIT));
    match h.shutdown(ShutdownKind::Reboot, SHORT) {
        ShutdownOutcome::Failed(IcError::NotAllowed(why)) => assert!(why.contains("3.1")),
        other => panic!("{other:?}"),
    }
    old.srv_version = 0x0003_0000;
    still_works(&set, &mut g, &mut old);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random damage to a heartbeat answer never wedges the channel: a
    /// correct answer to a later heartbeat makes the guest alive.
    #[test]
    fn random_replies_never_wedge_a_channel(
        flips in proptest::collection::vec((0usize..80, any::<u8>()), 1..8),
        cut in 0usize..80,
        wrong_txid in any::<bool>(),
    ) {
        let set = IcSet::new("vm", &IcConfig { heartbeat_period_ms: 30, ..config() }).unwrap();
        let h = set.handle();
        let (mut g, mut linux) = ready(&set, Service::Heartbeat);
        let p = recv(&mut g);
        let mut reply = linux.answer(&p.payload).unwrap();
        for (at, x) in &flips {
            if let Some(b) = reply.get_mut(*at) {
                *b ^= *x;
            }
        }
        reply.truncate(cut.max(1));
        let _ = g.send(if wrong_txid { !p.txid } else { p.txid }, &reply);
        let deadline = Instant::now() + WAIT;
        loop {
            let Some(p) = g.recv(Duration::from_millis(200)).unwrap() else { continue };
            g.send(p.txid, &linux.answer(&p.payload).unwrap()).unwrap();
            if h.heartbeat().unwrap().health == Health::Alive {
                break;
            }
            prop_assert!(Instant::now() < deadline, "never alive again");
        }
        let ready = matches!(h.channel(Service::Heartbeat).unwrap().status, ChannelStatus::Ready { .. });
        prop_assert!(ready);
    }
}

/// CPU ticks (user + system) of this process's IC worker threads whose
/// name ends with `suffix`, and how many there are.
fn worker_ticks(suffix: &str) -> (usize, u64) {
    let (mut threads, mut total) = (0, 0);
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let comm = comm.trim();
        if !(comm.starts_with("ic-") && comm.ends_with(suffix)) {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // Fields after the ")" closing the name: state is field 3, utime 14, stime 15.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let fields: Vec<u64> = rest
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        total += fields.get(10).copied().unwrap_or(0) + fields.get(11).copied().unwrap_or(0);
        threads += 1;
    }
    (threads, total)
}

#[test]
fn workers_waiting_on_a_silent_guest_sleep() {
    let set = IcSet::new(
        "zz",
        &IcConfig {
            vss_freeze_limit_ms: 50,
            ..config()
        },
    )
    .unwrap();
    let h = set.handle();
    // NEGOTIATE never answered.
    let _kvp = RawGuest::attach(&set, Service::Kvp).unwrap();
    until("no reply", || {
        h.channel(Service::Kvp).unwrap().status == ChannelStatus::NoReply
    });
    // Frozen past the limit; the host's own THAW never answered.
    let (mut vss, mut linux) = ready(&set, Service::Vss);
    let asker = {
        let h = h.clone();
        std::thread::spawn(move || h.vss_freeze(WAIT))
    };
    let p = recv(&mut vss);
    vss.send(p.txid, &linux.answer(&p.payload).unwrap())
        .unwrap();
    asker.join().unwrap().unwrap();
    let thaw = recv(&mut vss);
    assert_eq!(thaw.payload[28], 6, "the host thaws by itself");
    assert_eq!(h.snapshot().vss.unwrap().state.auto_thaws, 1);
    let (threads, before) = worker_ticks("-zz");
    assert_eq!(threads, 2, "the KVP and VSS workers");
    std::thread::sleep(Duration::from_millis(500));
    let spent = worker_ticks("-zz").1 - before;
    assert!(spent <= 5, "waiting workers used {spent} ticks in 500 ms");
}
