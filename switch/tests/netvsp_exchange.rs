//! Two hosted netvsc clients on one switch exchange frames.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switch::netvsp::client::{NetvscClient, NetvscOptions, TxFrame};
use switch::netvsp::{Netvsp, NetvspConfig, Pool};
use switch::wire::MacAddr;
use switch::{OffloadCaps, PortSpec, Switch};
use vmbus::guid::NETWORK_INTERFACE;
use vmbus::hosted::HostedServer;
use vmbus::hosted::client::HostedClient;
use vmbus::server::Registry;

fn frame(dst: MacAddr, src: MacAddr, seq: u32, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&dst.0);
    f[6..12].copy_from_slice(&src.0);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    f[14..18].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f[18..].iter_mut().enumerate() {
        *b = (seq as usize + i) as u8;
    }
    f
}

#[test]
fn two_clients_exchange_frames() {
    let dir = tempfile::tempdir().unwrap();
    let sw = Switch::new("sw", 1024, 300);
    let pool = Pool::new("nv", 1, Duration::from_micros(50)).unwrap();
    let registry = Registry::new();
    let macs = [MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 2])];
    let mut nics = Vec::new();
    for (i, mac) in macs.iter().enumerate() {
        let name = format!("vm{i}");
        let cfg = NetvspConfig::new(
            &name,
            vmbus::Guid::from_fields(i as u32 + 1, 0, 0, [0; 8]),
            *mac,
        );
        let n = Netvsp::new(
            cfg,
            sw.clone(),
            PortSpec::new(&name, OffloadCaps::NONE),
            pool.clone(),
        );
        registry.add(Arc::new(n.clone()));
        nics.push(n);
    }
    let server = HostedServer::start(&dir.path().join("s.sock"), registry).unwrap();
    let mut host = HostedClient::connect(server.path(), 64 << 20).unwrap();
    let offers: Vec<_> = host
        .request_offers()
        .unwrap()
        .into_iter()
        .filter(|o| o.interface == NETWORK_INTERFACE)
        .collect();
    assert_eq!(offers.len(), 2);
    let opts = NetvscOptions::default();
    let mut a = NetvscClient::connect(&mut host, &offers[0], &opts).unwrap();
    let mut b = NetvscClient::connect(&mut host, &offers[1], &opts).unwrap();
    assert_eq!(a.mac, macs[0]);
    assert_eq!(b.mac, macs[1]);
    // b announces itself so the switch learns it.
    let hello = frame(MacAddr::BROADCAST, b.mac, 0, 60);
    assert_eq!(b.send(0, &[TxFrame::new(&hello)]).unwrap(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.is_empty() && Instant::now() < deadline {
        a.poll(0, |f| got.push(f.to_vec())).unwrap();
        b.poll(0, |_| {}).unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(got, vec![hello]);
    // a sends 1000 frames of varied sizes to b.
    let frames: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| frame(b.mac, a.mac, i, 60 + (i as usize * 7) % 1400))
        .collect();
    let mut sent = 0;
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.len() < frames.len() && Instant::now() < deadline {
        if sent < frames.len() {
            let batch: Vec<TxFrame> = frames[sent..(sent + 64).min(frames.len())]
                .iter()
                .map(|f| TxFrame::new(f))
                .collect();
            sent += a.send(0, &batch).unwrap();
        }
        a.poll(0, |_| {}).unwrap();
        b.poll(0, |f| received.push(f.to_vec())).unwrap();
    }
    assert_eq!(
        received.len(),
        frames.len(),
        "{:?}\n{:?}\n{:?}\n{:?}",
        nics[0].stats(),
        nics[1].stats(),
        sw.port_stats("vm0"),
        sw.port_stats("vm1")
    );
    assert_eq!(received, frames);
    let stats = nics[1].stats();
    assert!(stats.rx_packets < 1000, "frames were batched: {stats:?}");
    drop(a);
    drop(b);
    drop(host);
    server.stop();
}
