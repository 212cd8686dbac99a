//! Two processes: `vspa serve` with the echo device, and this test as the
//! client, pushing one million packets of random sizes through a channel.
//! Every packet carries a CRC32 of its payload; every echo must come back
//! intact and in order.

use std::time::Duration;

use rand::{RngExt, SeedableRng};
use vmbus::channel::Wait;
use vmbus::guid::ECHO_INTERFACE;
use vmbus::hosted::client::HostedClient;
use vspa_tests::VspaServe;

const PACKETS: u64 = 1_000_000;

fn fill(rng: &mut rand::rngs::StdRng, buf: &mut Vec<u8>) {
    let len = rng.random_range(0..2040usize);
    buf.clear();
    buf.resize(8 + len, 0);
    rng.fill(&mut buf[8..]);
    let crc = crc32fast::hash(&buf[8..]);
    buf[..4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[4..8].copy_from_slice(&crc.to_le_bytes());
}

#[test]
fn one_million_packets_echo_intact_and_in_order() {
    let mut serve = VspaServe::start(&["--echo"]);
    let mut client = HostedClient::connect(&serve.socket, 8 << 20).unwrap();
    let offers = client.request_offers().unwrap();
    let offer = offers
        .iter()
        .find(|o| o.interface == ECHO_INTERFACE)
        .expect("echo offer");
    let mut ch = client.open_channel(offer, 33, 33, &[]).unwrap();
    let c = &mut ch.channel;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut buf = Vec::new();
    fill(&mut rng, &mut buf);
    let (mut sent, mut got) = (0u64, 0u64);
    let mut data = vec![0u8; 4096];
    while got < PACKETS {
        while sent < PACKETS {
            if c.outgoing.write_inband(sent, false, &buf).is_err() {
                break;
            }
            sent += 1;
            fill(&mut rng, &mut buf);
        }
        c.flush().unwrap();
        let mut progressed = false;
        while let Some(p) = c.incoming.read().unwrap() {
            assert_eq!(p.desc.transaction_id, got, "echo out of order");
            let mut head = [0u8; 8];
            p.payload().read_at(0, &mut head).unwrap();
            let len = u32::from_le_bytes(head[..4].try_into().unwrap()) as usize;
            let crc = u32::from_le_bytes(head[4..].try_into().unwrap());
            assert!(8 + len <= p.payload().len(), "echo {got} truncated");
            p.payload().read_at(8, &mut data[..len]).unwrap();
            assert_eq!(crc32fast::hash(&data[..len]), crc, "echo {got} corrupted");
            got += 1;
            progressed = true;
        }
        c.flush().unwrap();
        if !progressed {
            let w = c.wait_for_work(Some(Duration::from_secs(10))).unwrap();
            assert_ne!(w, Wait::TimedOut, "echo stalled after {got} packets");
        }
    }
    assert_eq!(got, PACKETS);
    client.close_channel(ch).unwrap();
    assert!(serve.is_alive());
}
