//! VMBus end to end over the VMM: the test guest negotiates a version,
//! gets offers, builds a GPADL, opens a channel with its rings in guest
//! memory and exchanges packets with a VSP (the echo device until the
//! storage and network VSPs are merged). Guest-to-host signals take the
//! ioeventfd fast path; host-to-guest interrupts arrive as the channel's
//! SIEFP bit plus the VMBus vector.

use std::sync::Arc;

use vmbus::echo::EchoDevice;
use vmbus::guid::ECHO_INTERFACE;
use vmbus::server::Registry;
use vmm::testguest::{GuestOptions, GuestVsc, TestGuest};

#[test]
fn guest_opens_a_channel_and_exchanges_packets_through_the_synic() {
    let registry = Registry::new();
    let instance = "0f0e0d0c-0b0a-0908-0706-050403020100".parse().unwrap();
    registry.add(Arc::new(EchoDevice::new(instance)));
    let guest = TestGuest::boot(GuestOptions {
        memory_mib: 32,
        registry,
        ..Default::default()
    })
    .unwrap();
    let partition = guest.vm().partition().clone();
    let mut vsc = GuestVsc::connect(&guest).unwrap();
    assert_eq!(vsc.version(), vmbus::wire::version::WIN10_V5_3);
    assert_eq!(
        partition.vmbus_version(),
        Some(vmbus::wire::version::WIN10_V5_3)
    );
    let offers = vsc.request_offers().unwrap();
    assert_eq!(offers.len(), 1);
    let offer = &offers[0];
    assert_eq!(offer.interface, ECHO_INTERFACE);
    assert_eq!(offer.instance, instance);
    let mut ch = vsc.open_channel(offer, 4, 4).unwrap();

    let slow_before = partition.slow_signals();
    let mut irqs_seen = 0;
    for round in 0..5u64 {
        let payloads: Vec<Vec<u8>> = (0..8)
            .map(|i| {
                (0..(24 + 40 * i + 8 * round as usize))
                    .map(|b| (b as u64 * 7 + round) as u8)
                    .collect()
            })
            .collect();
        // Wait until the VSP worker sleeps (mask clear), so the ring rules
        // ask the guest to signal.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ch.host_interrupt_mask(vsc.guest.memory()) != 0 {
            assert!(std::time::Instant::now() < deadline, "worker never idled");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for (i, p) in payloads.iter().enumerate() {
            ch.outgoing
                .write_inband(round * 100 + i as u64, false, p)
                .unwrap();
        }
        // The ring was empty, so the rules ask for a signal: a fast
        // HvSignalEvent from the guest, matched by KVM's ioeventfd.
        assert_eq!(vsc.flush(&mut ch).unwrap(), Some(0));
        let mut got = Vec::new();
        while got.len() < payloads.len() {
            vsc.wait_channel_interrupt(&ch).unwrap();
            irqs_seen += 1;
            while let Some(p) = ch.incoming.read().unwrap() {
                let mut buf = vec![0u8; p.payload().len()];
                p.payload().read_at(0, &mut buf).unwrap();
                got.push((p.desc.transaction_id, buf));
            }
            ch.incoming.commit().unwrap();
        }
        for (i, (txid, data)) in got.iter().enumerate() {
            assert_eq!(*txid, round * 100 + i as u64);
            assert_eq!(data, &payloads[i], "round {round} packet {i}");
        }
    }
    assert!(irqs_seen >= 5);
    assert_eq!(
        partition.slow_signals(),
        slow_before,
        "every guest signal stayed in the kernel (ioeventfd)"
    );
    drop(vsc);
    guest.stop();
}

/// MODIFYCHANNEL as Linux sends it when a channel's CPU changes; returns
/// the response status.
fn modify_channel(vsc: &mut GuestVsc<'_>, relid: u32, target_vp: u32) -> u32 {
    use vmbus::wire::{MessageHeader, ModifyChannel, ModifyChannelResponse, msgtype};
    use zerocopy::{FromBytes, IntoBytes};
    let m = ModifyChannel {
        header: MessageHeader::new(msgtype::MODIFYCHANNEL),
        child_relid: relid.into(),
        target_vp: target_vp.into(),
    };
    vsc.post(m.as_bytes()).unwrap();
    let reply = vsc
        .wait_for(|m| m.get(..4) == Some(&msgtype::MODIFYCHANNEL_RESPONSE.to_le_bytes()))
        .unwrap();
    let (r, _) = ModifyChannelResponse::read_from_prefix(&reply).unwrap();
    assert_eq!(r.child_relid.get(), relid);
    r.status.get()
}

/// Sends one packet once the worker idles and returns whether the echo
/// came with an interrupt on VP 0 (its SIEFP bit and vector) within
/// `wait`. The echo is in the ring either way.
fn echo_interrupts_vp0(
    vsc: &mut GuestVsc<'_>,
    ch: &mut vmm::testguest::GuestChannel<'_>,
    txid: u64,
    wait: std::time::Duration,
) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ch.host_interrupt_mask(vsc.guest.memory()) != 0 {
        assert!(std::time::Instant::now() < deadline, "worker never idled");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    ch.outgoing.write_inband(txid, false, b"moved?").unwrap();
    assert_eq!(vsc.flush(ch).unwrap(), Some(0));
    let interrupted = ch.wait_interrupt(wait).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(p) = ch.incoming.read().unwrap() {
            assert_eq!(p.desc.transaction_id, txid);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no echo in the ring");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    ch.incoming.commit().unwrap();
    interrupted
}

#[test]
fn modifychannel_moves_a_channels_interrupts_to_another_vp() {
    let registry = Registry::new();
    registry.add(Arc::new(EchoDevice::new(Default::default())));
    let guest = TestGuest::boot(GuestOptions {
        memory_mib: 32,
        vcpus: 2,
        registry,
        ..Default::default()
    })
    .unwrap();
    let mut vsc = GuestVsc::connect(&guest).unwrap();
    let offer = vsc.request_offers().unwrap().remove(0);
    let mut ch = vsc.open_channel(&offer, 4, 4).unwrap();
    let relid = offer.relid;
    let second = std::time::Duration::from_secs(1);
    let long = std::time::Duration::from_secs(20);

    assert!(echo_interrupts_vp0(&mut vsc, &mut ch, 1, long));
    // To VP 1, whose SynIC this guest never enabled: the host's signal
    // goes there (and is dropped), VP 0 hears nothing.
    assert_eq!(modify_channel(&mut vsc, relid, 1), 0);
    assert!(!echo_interrupts_vp0(&mut vsc, &mut ch, 2, second));
    // Back to VP 0.
    assert_eq!(modify_channel(&mut vsc, relid, 0), 0);
    assert!(echo_interrupts_vp0(&mut vsc, &mut ch, 3, long));
    // A VP the VM does not have, or a relid never opened, is refused and
    // changes nothing.
    assert_eq!(modify_channel(&mut vsc, relid, 2), 0xC000_0001);
    assert_eq!(modify_channel(&mut vsc, relid + 40, 0), 0xC000_0001);
    assert!(echo_interrupts_vp0(&mut vsc, &mut ch, 4, long));
    drop(vsc);
    guest.stop();
}
