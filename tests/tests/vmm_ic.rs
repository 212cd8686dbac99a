//! Integration services over the VMM: the test guest finds the five IC
//! offers, opens each channel with Linux's ring sizes in guest memory and
//! answers as Linux's hv_utils does (the same guest library the hosted
//! tests use), every packet and signal crossing real KVM exits. One
//! negotiation and one message per service; the time sample carries the
//! partition's reference time, checked against TIME_REF_COUNT read by the
//! guest itself.

use std::sync::Arc;
use std::time::Duration;

use ic::guest::{GuestIc, Served};
use ic::protocol::msgtype;
use ic::{Health, IcConfig, IcSet, Service, ShutdownKind, ShutdownOutcome, Version};
use vmbus::server::Registry;
use vmm::hv::regs::msr;
use vmm::testguest::{GuestOptions, GuestVsc, TestGuest};

/// Emulated guests are slow: generous, but bounded.
const WAIT: Duration = Duration::from_secs(60);

#[test]
fn test_guest_negotiates_and_exchanges_one_message_per_service() {
    let set = IcSet::new(
        "vmm-guest",
        &IcConfig {
            heartbeat_period_ms: 600_000,
            timesync_period_ms: 600_000,
            kvp_refresh_ms: 0,
            reply_timeout_ms: 60_000,
            host_name: "vspa-host".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let registry = Registry::new();
    set.add_to(&registry);
    let guest = TestGuest::boot(GuestOptions {
        memory_mib: 32,
        registry,
        ..Default::default()
    })
    .unwrap();
    let h = set.handle();
    let partition = guest.vm().partition().clone();
    h.set_reference_clock(Arc::new(move || partition.reference_time()));

    let mut vsc = GuestVsc::connect(&guest).unwrap();
    let offers = vsc.request_offers().unwrap();
    assert_eq!(offers.len(), 5);
    for s in Service::ALL {
        let offer = offers
            .iter()
            .find(|o| o.interface == s.interface())
            .unwrap_or_else(|| panic!("{s} offered"));
        assert_eq!(offer.instance, s.hyperv_instance(), "{s} instance GUID");
        let t0 = guest.rdmsr(msr::TIME_REF_COUNT).unwrap().unwrap();
        let mut ch = ic::guest::open(&mut vsc, offer).unwrap();
        let mut g = GuestIc::new(s);
        assert_eq!(
            g.serve_one(&mut ch, WAIT).unwrap(),
            Served::Answered(msgtype::NEGOTIATE),
            "{s} NEGOTIATE"
        );
        assert!(h.wait_ready(s, WAIT), "{s} ready");
        let v = h.channel(s).unwrap().negotiated().unwrap();
        assert_eq!(Some(v), g.negotiated, "{s}: both sides agree");
        let serve = |g: &mut GuestIc, ch: &mut _| {
            assert_eq!(
                g.serve_one(ch, WAIT).unwrap(),
                Served::Answered(s.msgtype()),
                "{s} message"
            );
        };
        match s {
            Service::Shutdown => {
                assert_eq!(v.message, Version::new(3, 2));
                std::thread::scope(|scope| {
                    let asker = scope.spawn(|| h.shutdown(ShutdownKind::PowerOff, WAIT));
                    serve(&mut g, &mut ch);
                    assert_eq!(asker.join().unwrap(), ShutdownOutcome::Acknowledged);
                });
                assert_eq!(g.observed.shutdowns, [0]);
            }
            Service::TimeSync => {
                assert_eq!(v.message, Version::new(4, 0));
                // The SYNC went out right after negotiation; its reference
                // time lies between the guest's own TIME_REF_COUNT reads
                // before the channel opened and after the SYNC arrived.
                serve(&mut g, &mut ch);
                let t2 = guest.rdmsr(msr::TIME_REF_COUNT).unwrap().unwrap();
                let got = g.observed.times[0];
                assert_eq!(got.flags, ic::protocol::timesync_flags::SYNC);
                assert!(
                    (t0..=t2).contains(&got.reference_time),
                    "{t0} <= {} <= {t2}",
                    got.reference_time
                );
                let now = ic::timesync::filetime_now();
                assert!(got.parent_time <= now && now - got.parent_time < 600_000_000);
            }
            Service::Heartbeat => {
                serve(&mut g, &mut ch);
                let deadline = std::time::Instant::now() + WAIT;
                while h.heartbeat().unwrap().health != Health::Alive {
                    assert!(std::time::Instant::now() < deadline, "heartbeat alive");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Service::Kvp => {
                assert_eq!(v.message, Version::new(4, 0));
                // The host's own values: VirtualMachineName and host names.
                for _ in 0..4 {
                    serve(&mut g, &mut ch);
                }
                assert!(g.pools[3].contains(&("VirtualMachineName".into(), "vmm-guest".into())));
                assert!(g.pools[3].contains(&("HostName".into(), "vspa-host".into())));
            }
            Service::Vss => {
                assert_eq!(v.message, Version::new(5, 0));
                std::thread::scope(|scope| {
                    let asker = scope.spawn(|| h.vss_freeze(WAIT));
                    serve(&mut g, &mut ch);
                    asker.join().unwrap().unwrap();
                });
                assert!(g.frozen);
            }
        }
    }
    let snapshot = h.snapshot();
    assert_eq!(snapshot.kvp.unwrap().state.auto_external.len(), 4);
    assert_eq!(snapshot.vss.unwrap().state.phase, ic::VssPhase::Frozen);
}

/// `vspa run`'s SIGTERM path (`vspa::guest_stop`) through real KVM exits:
/// the host asks the guest to shut down through its Shutdown IC, the guest
/// acknowledges (as Linux's hv_utils does) and resets the machine within
/// the grace period; `vspa run` then exits with status 0.
#[test]
fn sigterm_shutdown_is_acknowledged_and_the_vm_ends_cleanly() {
    let config = IcConfig {
        timesync: false,
        heartbeat: false,
        kvp: false,
        vss: false,
        reply_timeout_ms: 60_000,
        ..Default::default()
    };
    let set = IcSet::new("vmm-stop", &config).unwrap();
    let registry = Registry::new();
    set.add_to(&registry);
    let guest = TestGuest::boot(GuestOptions {
        memory_mib: 32,
        registry,
        ..Default::default()
    })
    .unwrap();
    let stop = vspa::guest_stop::GuestStop {
        ic: Some(set.handle()),
        ack: WAIT,
        grace: WAIT,
    };
    let control = guest.vm().control();
    let asker = {
        let mut vsc = GuestVsc::connect(&guest).unwrap();
        let offer = vsc.request_offers().unwrap().remove(0);
        let mut ch = ic::guest::open(&mut vsc, &offer).unwrap();
        let mut g = GuestIc::new(Service::Shutdown);
        g.serve_one(&mut ch, WAIT).unwrap();
        assert!(set.handle().wait_ready(Service::Shutdown, WAIT));
        // What the signal thread of `vspa run` does.
        let asker = std::thread::spawn(move || stop.stop(&control));
        assert_eq!(
            g.serve_one(&mut ch, WAIT).unwrap(),
            Served::Answered(msgtype::SHUTDOWN)
        );
        assert_eq!(g.observed.shutdowns, [0], "a power-off request");
        asker
    };
    // The guest powers off after acknowledging (it resets the machine).
    let exit = guest.reset();
    let outcome = asker.join().unwrap();
    assert_eq!(outcome, vspa::guest_stop::StopOutcome::ShutDown);
    assert_eq!(
        vspa::guest_stop::exit_code(&exit, Some(&outcome)),
        vspa::guest_stop::EXIT_CLEAN
    );
}
