//! Hosted mode end to end inside one process: a server thread with the echo
//! device and a client over a real Unix socket, memfd and eventfds.

use std::sync::Arc;
use std::time::Duration;

use vmbus::channel::Wait;
use vmbus::echo::EchoDevice;
use vmbus::guid::ECHO_INTERFACE;
use vmbus::hosted::HostedServer;
use vmbus::hosted::client::{ClientChannel, HostedClient};
use vmbus::server::Registry;
use vmbus::wire::{packet_type, version};

fn start() -> (tempfile::TempDir, HostedServer, Registry) {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new();
    registry.add(Arc::new(EchoDevice::new(
        "11111111-2222-3333-4444-555555555555".parse().unwrap(),
    )));
    let server = HostedServer::start(&dir.path().join("vspa.sock"), registry.clone()).unwrap();
    (dir, server, registry)
}

fn open_echo(client: &mut HostedClient) -> ClientChannel {
    let offers = client.request_offers().unwrap();
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].interface, ECHO_INTERFACE);
    assert_eq!(offers[0].subchannel_index, 0);
    client.open_channel(&offers[0], 5, 5, &[]).unwrap()
}

/// Sends `payloads` and checks each comes back, in order.
fn round_trip(ch: &mut ClientChannel, payloads: &[Vec<u8>]) {
    let c = &mut ch.channel;
    let mut sent = 0;
    let mut got = 0;
    while got < payloads.len() {
        while sent < payloads.len() {
            match c.outgoing.write_inband(sent as u64, false, &payloads[sent]) {
                Ok(()) => sent += 1,
                Err(_) => break,
            }
        }
        c.flush().unwrap();
        let mut progressed = false;
        while let Some(p) = c.incoming.read().unwrap() {
            assert_eq!(p.desc.packet_type, packet_type::DATA_INBAND);
            assert_eq!(p.desc.transaction_id, got as u64);
            let want = &payloads[got];
            let mut buf = vec![0; want.len()];
            p.payload().read_at(0, &mut buf).unwrap();
            assert_eq!(&buf, want);
            got += 1;
            progressed = true;
        }
        c.flush().unwrap();
        if !progressed {
            let w = c.wait_for_work(Some(Duration::from_secs(5))).unwrap();
            assert_ne!(
                w,
                Wait::TimedOut,
                "echo stalled at {got}/{}",
                payloads.len()
            );
        }
    }
}

#[test]
fn echo_over_hosted_mode() {
    let (_dir, server, _reg) = start();
    let mut client = HostedClient::connect(server.path(), 1 << 20).unwrap();
    assert_eq!(client.version(), version::WIN10_V5_3);
    let mut ch = open_echo(&mut client);
    let payloads: Vec<Vec<u8>> = (0..5000)
        .map(|i| vec![(i % 251) as u8; (i * 7) % 3000])
        .collect();
    round_trip(&mut ch, &payloads);
    client.close_channel(ch).unwrap();
    // The channel can be opened again after a close.
    let offers = client.request_offers().unwrap();
    assert!(
        offers.is_empty(),
        "already offered channels are not offered twice"
    );
}

#[test]
fn hot_add_and_remove_offer_and_rescind() {
    let (_dir, server, registry) = start();
    let mut client = HostedClient::connect(server.path(), 1 << 20).unwrap();
    let mut ch = open_echo(&mut client);
    let id = registry.add(Arc::new(EchoDevice::new(Default::default())));
    let offer = client.wait_offer().unwrap();
    assert_eq!(offer.interface, ECHO_INTERFACE);
    let mut ch2 = client.open_channel(&offer, 2, 2, &[]).unwrap();
    round_trip(&mut ch2, &[vec![1, 2, 3]]);
    registry.remove(id);
    client.wait_rescind(offer.relid).unwrap();
    client.release_rescinded(ch2).unwrap();
    // The first device keeps working.
    round_trip(&mut ch, &[vec![9; 100]]);
}

#[test]
fn unload_stops_everything() {
    let (_dir, server, _reg) = start();
    let mut client = HostedClient::connect(server.path(), 1 << 20).unwrap();
    let _ch = open_echo(&mut client);
    client.unload().unwrap();
}

#[test]
fn subchannels_are_offered_after_open_and_reset_with_their_primary() {
    let dir = tempfile::tempdir().unwrap();
    let registry = Registry::new();
    let mut dev = EchoDevice::new(Default::default());
    dev.subchannels = 3;
    registry.add(Arc::new(dev));
    let server = HostedServer::start(&dir.path().join("s.sock"), registry).unwrap();
    let mut client = HostedClient::connect(server.path(), 1 << 20).unwrap();
    let primary = client.request_offers().unwrap().remove(0);
    assert_eq!(primary.subchannel_index, 0);
    let mut ch = client.open_channel(&primary, 2, 2, &[]).unwrap();
    let mut subs = Vec::new();
    for want in 1..=3u16 {
        let o = client.wait_offer().unwrap();
        assert_eq!(o.subchannel_index, want);
        assert_eq!(o.interface, primary.interface);
        assert_eq!(o.instance, primary.instance);
        subs.push(client.open_channel(&o, 2, 2, &[]).unwrap());
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        round_trip(sub, &[vec![i as u8; 33]]);
    }
    round_trip(&mut ch, &[vec![7; 10]]);
    // Corrupt sub-channel 2's ring: the whole device (primary and every
    // sub-channel) is rescinded, then the primary is offered again.
    let broken = subs.remove(1);
    let ctl = broken.ring_pages().first_pfn * 4096;
    client
        .memory()
        .slice(ctl, 4)
        .unwrap()
        .write_at(0, &12u32.to_le_bytes())
        .unwrap();
    broken.channel.signal_peer();
    let mut rescinded = vec![];
    while rescinded.len() < 4 {
        let m = client
            .recv(Duration::from_secs(5))
            .unwrap()
            .expect("rescinds");
        if vmbus::hosted::client::msg_type(&m) == Some(vmbus::wire::msgtype::RESCIND_CHANNELOFFER) {
            rescinded.push(u32::from_le_bytes(m[8..12].try_into().unwrap()));
        }
    }
    rescinded.sort();
    let mut all: Vec<u32> = subs
        .iter()
        .map(|s| s.relid())
        .chain([ch.relid(), broken.relid()])
        .collect();
    all.sort();
    assert_eq!(rescinded, all);
    for c in subs.into_iter().chain([broken]) {
        client.release_rescinded(c).unwrap();
    }
    client.release_rescinded(ch).unwrap();
    let again = client.wait_offer().unwrap();
    assert_eq!(again.subchannel_index, 0);
    let mut ch = client.open_channel(&again, 2, 2, &[]).unwrap();
    round_trip(&mut ch, &[vec![1; 5]]);
}
