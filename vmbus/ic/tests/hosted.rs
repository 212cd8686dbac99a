//! Hosted mode end to end, in one process: a `HostedServer` whose registry
//! holds two guests' IC sets, and two clients (over real Unix sockets,
//! memfds and eventfds) that each open their own set and answer as Linux's
//! hv_utils does. Requests reach only the right guest; heartbeat health
//! follows a client that stops and resumes; KVP values flow both ways;
//! time samples arrive on the configured period.

use std::time::{Duration, Instant};

use ic::guest::{GuestIc, GuestRunner};
use ic::{Health, IcConfig, IcSet, Pool, Service, ShutdownKind, ShutdownOutcome, instance_guid};
use vmbus::hosted::HostedServer;
use vmbus::hosted::client::HostedClient;
use vmbus::server::Registry;

const WAIT: Duration = Duration::from_secs(10);

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A connected client serving its own set's five channels.
struct Guest {
    _client: HostedClient,
    runners: Vec<(Service, GuestRunner)>,
}

impl Guest {
    fn connect(server: &HostedServer, salt: u32, ipv4: &str) -> Guest {
        let mut client = HostedClient::connect(server.path(), 1 << 20).unwrap();
        let offers = client.request_offers().unwrap();
        assert_eq!(
            offers.len(),
            10,
            "both sets are offered on this shared socket"
        );
        let mut runners = Vec::new();
        for offer in &offers {
            let service = Service::from_interface(&offer.interface).expect("an IC offer");
            if offer.instance != instance_guid(service, salt) {
                continue; // the other guest's
            }
            let ch = ic::guest::open(&mut client, offer).unwrap();
            let mut g = GuestIc::new(service);
            g.auto.ipv4 = vec![ipv4.to_string()];
            g.auto.ipv6 = vec!["fe80::1".into()];
            runners.push((service, GuestRunner::spawn(ch, g)));
        }
        assert_eq!(runners.len(), 5);
        Guest {
            _client: client,
            runners,
        }
    }

    fn runner(&self, s: Service) -> &GuestRunner {
        &self.runners.iter().find(|(x, _)| *x == s).unwrap().1
    }
}

#[test]
fn two_guests_each_get_their_own_integration_services() {
    let dir = tempfile::tempdir().unwrap();
    let config = |period_ms| IcConfig {
        heartbeat_period_ms: 50,
        heartbeat_misses: 3,
        timesync_period_ms: period_ms,
        kvp_refresh_ms: 100,
        reply_timeout_ms: 2000,
        host_name: "vspa-host".into(),
        kvp_external: [("tenant".to_string(), "a".to_string())].into(),
        ..Default::default()
    };
    let set_a = IcSet::new("vm-a", &config(100)).unwrap();
    let set_b = IcSet::with_instance_salt("vm-b", &config(5000), 1).unwrap();
    let registry = Registry::new();
    set_a.add_to(&registry);
    set_b.add_to(&registry);
    let server = HostedServer::start(&dir.path().join("ic.sock"), registry).unwrap();
    let (a, b) = (set_a.handle(), set_b.handle());
    let guest_a = Guest::connect(&server, 0, "10.0.0.5");
    let guest_b = Guest::connect(&server, 1, "10.0.1.6");
    for s in Service::ALL {
        assert!(
            a.wait_ready(s, WAIT) && b.wait_ready(s, WAIT),
            "{s} negotiated"
        );
    }

    // A shutdown request reaches the right guest only.
    assert_eq!(
        b.shutdown(ShutdownKind::Reboot, WAIT),
        ShutdownOutcome::Acknowledged
    );
    assert_eq!(
        guest_b
            .runner(Service::Shutdown)
            .with(|g| g.observed.shutdowns.clone()),
        [2]
    );
    assert!(
        guest_a
            .runner(Service::Shutdown)
            .with(|g| g.observed.shutdowns.is_empty())
    );

    // KVP: the host's values arrive in each guest's own pools...
    let kvp_a = guest_a.runner(Service::Kvp);
    let has = |r: &GuestRunner, pool: usize, k: &str, v: &str| {
        r.with(|g| g.pools[pool].contains(&(k.to_string(), v.to_string())))
    };
    until("host values", || {
        has(kvp_a, 3, "VirtualMachineName", "vm-a") && has(kvp_a, 0, "tenant", "a")
    });
    assert!(has(kvp_a, 3, "HostName", "vspa-host"));
    let kvp_b = guest_b.runner(Service::Kvp);
    until("host values b", || {
        has(kvp_b, 3, "VirtualMachineName", "vm-b")
    });
    a.kvp_set(Pool::External, "greeting", "grüß dich", WAIT)
        .unwrap();
    assert!(has(kvp_a, 0, "greeting", "grüß dich"));
    assert!(!has(kvp_b, 0, "greeting", "grüß dich"));
    a.kvp_delete(Pool::External, "greeting", WAIT).unwrap();
    assert!(!has(kvp_a, 0, "greeting", "grüß dich"));
    // ...and the host reads each guest's values, its addresses included.
    kvp_a.with(|g| g.pools[1].push(("role".into(), "db".into())));
    assert_eq!(
        a.kvp_enumerate(Pool::Guest, WAIT).unwrap(),
        [ic::KvpEntry::new("role", "db")]
    );
    let auto = a.kvp_enumerate(Pool::Auto, WAIT).unwrap();
    assert_eq!(auto.len(), 10);
    assert!(auto.contains(&ic::KvpEntry::new("NetworkAddressIPv4", "10.0.0.5")));
    let ips = |h: &ic::IcHandle| {
        h.kvp_values()
            .unwrap()
            .ip_addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(ips(&a), ["10.0.0.5", "fe80::1"]);
    // B's values come in by the periodic refresh alone.
    until("b's addresses", || ips(&b) == ["10.0.1.6", "fe80::1"]);

    // Heartbeat: a client that stops answering turns unresponsive, the
    // other stays alive; resuming makes it alive again.
    until("alive", || {
        a.heartbeat().unwrap().health == Health::Alive
            && b.heartbeat().unwrap().health == Health::Alive
    });
    let hb_a = guest_a.runner(Service::Heartbeat);
    hb_a.set_paused(true);
    let paused = Instant::now();
    until("unresponsive", || {
        a.heartbeat().unwrap().health == Health::Unresponsive
    });
    assert!(paused.elapsed() >= Duration::from_millis(100));
    assert_eq!(b.heartbeat().unwrap().health, Health::Alive);
    hb_a.set_paused(false);
    until("alive again", || {
        a.heartbeat().unwrap().health == Health::Alive
    });

    // Time sync: SYNC first, then samples every 100 ms (A) while B, with
    // a 5 s period, has had only its SYNC.
    let ts_a = guest_a.runner(Service::TimeSync);
    until("samples", || ts_a.with(|g| g.observed.times.len() >= 6));
    let times = ts_a.with(|g| g.observed.times.clone());
    assert_eq!(times[0].flags, 1, "SYNC first");
    assert!(times[1..].iter().all(|t| t.flags == 2), "then SAMPLEs");
    let spans: Vec<Duration> = times[1..].windows(2).map(|w| w[1].at - w[0].at).collect();
    let mean = spans.iter().sum::<Duration>() / spans.len() as u32;
    assert!(
        (Duration::from_millis(70)..Duration::from_millis(250)).contains(&mean),
        "mean interval {mean:?} for a 100 ms period ({spans:?})"
    );
    assert!(
        times.iter().all(|t| t.reference_time > 0),
        "v4 carries the reference time"
    );
    let ts_b = guest_b
        .runner(Service::TimeSync)
        .with(|g| g.observed.times.clone());
    assert_eq!(ts_b.iter().map(|t| t.flags).collect::<Vec<_>>(), [1]);
    let state = a.time_sync().unwrap();
    assert_eq!(state.syncs, 1);
    assert!(state.samples >= 4);

    // VSS on A only.
    a.vss_with_frozen(WAIT, || {
        assert!(guest_a.runner(Service::Vss).with(|g| g.frozen));
    })
    .unwrap();
    assert!(!guest_a.runner(Service::Vss).with(|g| g.frozen));
    assert!(
        guest_b
            .runner(Service::Vss)
            .with(|g| g.observed.vss_ops.is_empty())
    );

    // The snapshot, as the appliance would report it.
    let report = serde_json::to_value(a.snapshot()).unwrap();
    assert_eq!(report["heartbeat"]["health"], "alive");
    assert_eq!(report["heartbeat"]["channel"]["status"]["state"], "ready");
    assert_eq!(report["shutdown"]["channel"]["status"]["message"], "3.2");
    assert_eq!(report["kvp"]["ip_addresses"][0], "10.0.0.5");
    assert_eq!(report["vss"]["phase"], "thawed");
    assert_eq!(report["timesync"]["last"]["kind"], "sample");

    for (_, r) in guest_a.runners.into_iter().chain(guest_b.runners) {
        r.stop().unwrap();
    }
}

#[test]
fn a_misbehaving_guest_costs_only_its_own_channels() {
    let dir = tempfile::tempdir().unwrap();
    let config = IcConfig {
        heartbeat_period_ms: 40,
        heartbeat_misses: 2,
        timesync_period_ms: 60_000,
        kvp_refresh_ms: 0,
        reply_timeout_ms: 300,
        host_name: "h".into(),
        ..Default::default()
    };
    let set_a = IcSet::new("bad", &config).unwrap();
    let set_b = IcSet::with_instance_salt("good", &config, 7).unwrap();
    let registry = Registry::new();
    set_a.add_to(&registry);
    set_b.add_to(&registry);
    let server = HostedServer::start(&dir.path().join("ic.sock"), registry).unwrap();
    let (a, b) = (set_a.handle(), set_b.handle());
    let bad = Guest::connect(&server, 0, "10.0.0.1");
    let _good = Guest::connect(&server, 7, "10.0.0.2");
    for s in Service::ALL {
        assert!(
            a.wait_ready(s, WAIT) && b.wait_ready(s, WAIT),
            "{s} negotiated"
        );
    }
    until("alive", || {
        a.heartbeat().unwrap().health == Health::Alive
            && b.heartbeat().unwrap().health == Health::Alive
    });

    // Heartbeats echoed without the increment: unresponsive, with the
    // refused answers counted; the other guest stays alive.
    let hb = bad.runner(Service::Heartbeat);
    hb.with(|g| {
        g.tamper = Some(Box::new(|r| {
            let seq = u64::from_le_bytes(r.payload[28..36].try_into().unwrap());
            r.payload[28..36].copy_from_slice(&(seq - 1).to_le_bytes());
        }))
    });
    until("unresponsive", || {
        a.heartbeat().unwrap().health == Health::Unresponsive
    });
    assert_eq!(b.heartbeat().unwrap().health, Health::Alive);
    hb.with(|g| g.tamper = None);
    until("alive again", || {
        a.heartbeat().unwrap().health == Health::Alive
    });

    // Shutdown answers that never come: a timeout, not a hang.
    bad.runner(Service::Shutdown)
        .with(|g| g.tamper = Some(Box::new(|r| r.send = false)));
    let started = Instant::now();
    assert_eq!(
        a.shutdown(ShutdownKind::PowerOff, Duration::from_millis(300)),
        ShutdownOutcome::TimedOut
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        b.shutdown(ShutdownKind::PowerOff, WAIT),
        ShutdownOutcome::Acknowledged
    );

    // KVP entries with odd UTF-16 byte counts: refused, typed.
    bad.runner(Service::Kvp).with(|g| {
        g.tamper = Some(Box::new(|r| {
            if r.payload.len() > 100 && r.payload[28] == 3 {
                r.payload[40] |= 1; // key_size odd
            }
        }))
    });
    match a.kvp_enumerate(Pool::Auto, WAIT) {
        Err(ic::IcError::BadReply(why)) => assert!(why.contains("odd"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(b.kvp_enumerate(Pool::Auto, WAIT).unwrap().len(), 10);
    bad.runner(Service::Kvp).with(|g| g.tamper = None);
    assert_eq!(a.kvp_enumerate(Pool::Auto, WAIT).unwrap().len(), 10);
    // Every refused reply is counted on its own channel, none on the other guest's.
    let errors = |h: &ic::IcHandle, s| h.channel(s).unwrap().protocol_errors;
    assert_eq!(errors(&a, Service::Kvp), 1);
    assert!(errors(&a, Service::Heartbeat) >= 2);
    let info = a.channel(Service::Heartbeat).unwrap();
    assert!(
        info.last_error.unwrap().contains("heartbeat"),
        "the reason is kept"
    );
    for s in Service::ALL {
        assert_eq!(errors(&b, s), 0, "{s}");
    }
}
