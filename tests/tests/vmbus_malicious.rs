//! Malicious peers against `vspa serve`: each misbehaving client gets an
//! error or a reset of its own channel, while a well-behaved client keeps
//! echoing packets through the same server the whole time and the server
//! process never dies.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmbus::channel::Wait;
use vmbus::event::EventFd;
use vmbus::guid::ECHO_INTERFACE;
use vmbus::hosted::client::{ClientChannel, ClientError, HostedClient, Offer, msg_type};
use vmbus::hosted::socket;
use vmbus::wire::{InitiateContact, MessageHeader, OpenChannel, OpenResult, msgtype, ring_offset};
use vspa_tests::VspaServe;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

const RING_PAGES: u64 = 4;

fn echo_offer(client: &mut HostedClient) -> Offer {
    let offers = client.request_offers().unwrap();
    offers
        .into_iter()
        .find(|o| o.interface == ECHO_INTERFACE)
        .expect("echo offer")
}

/// Sends one packet and waits for its echo.
fn ping(ch: &mut ClientChannel, id: u64) -> Result<(), String> {
    let c = &mut ch.channel;
    c.outgoing
        .write_inband(id, false, &id.to_le_bytes())
        .map_err(|e| e.to_string())?;
    c.flush().map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(p) = c.incoming.read().map_err(|e| e.to_string())? {
            let mut b = [0u8; 8];
            p.payload().read_at(0, &mut b).map_err(|e| e.to_string())?;
            if p.desc.transaction_id != id || u64::from_le_bytes(b) != id {
                return Err(format!("wrong echo for {id}"));
            }
            c.flush().map_err(|e| e.to_string())?;
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no echo for {id}"));
        }
        c.wait_for_work(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
    }
}

/// A well-behaved client echoing in the background; counts round trips.
struct GoodClient {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl GoodClient {
    fn start(socket: &std::path::Path) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let (s, c) = (stop.clone(), count.clone());
        let socket = socket.to_path_buf();
        let thread = std::thread::spawn(move || {
            let mut client = HostedClient::connect(&socket, 1 << 20).map_err(|e| e.to_string())?;
            let offer = echo_offer(&mut client);
            let mut ch = client
                .open_channel(&offer, RING_PAGES, RING_PAGES, &[])
                .map_err(|e| e.to_string())?;
            let mut id = 0;
            while !s.load(Ordering::Acquire) {
                ping(&mut ch, id)?;
                id += 1;
                c.fetch_add(1, Ordering::Relaxed);
            }
            client.close_channel(ch).map_err(|e| e.to_string())
        });
        GoodClient {
            stop,
            count,
            thread: Some(thread),
        }
    }

    /// Asserts the good client made progress since `before`.
    fn progressed_since(&self, before: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.count.load(Ordering::Relaxed) <= before + 10 {
            assert!(Instant::now() < deadline, "good client stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(mut self) {
        self.stop.store(true, Ordering::Release);
        self.thread
            .take()
            .unwrap()
            .join()
            .unwrap()
            .expect("good client failed");
    }
}

fn control_gpa(ch: &ClientChannel, outgoing: bool) -> u64 {
    let pages = ch.ring_pages();
    let pfn = if outgoing {
        pages.first_pfn
    } else {
        pages.first_pfn + ch.out_ring_pages()
    };
    pfn * 4096
}

fn poke(client: &HostedClient, gpa: u64, value: u32) {
    client
        .memory()
        .slice(gpa, 4)
        .unwrap()
        .write_at(0, &value.to_le_bytes())
        .unwrap();
}

/// Expects the host to reset the channel: a rescind, then (after the client
/// releases it) a fresh offer of the same device that works again.
fn expect_reset(client: &mut HostedClient, ch: ClientChannel) {
    let relid = ch.relid();
    client
        .wait_rescind(relid)
        .expect("host rescinds the broken channel");
    client.release_rescinded(ch).unwrap();
    let offer = client.wait_offer().expect("host offers the device again");
    assert_eq!(offer.interface, ECHO_INTERFACE);
    // The released relid is free again: the host offers the lowest free
    // one, as Hyper-V does (Linux maps relids only below 2048).
    assert!(offer.relid <= relid, "{} > {relid}", offer.relid);
    let mut fresh = client
        .open_channel(&offer, RING_PAGES, RING_PAGES, &[])
        .unwrap();
    ping(&mut fresh, 1).unwrap();
    client.close_channel(fresh).unwrap();
}

fn open(client: &mut HostedClient) -> ClientChannel {
    let offer = echo_offer(client);
    client
        .open_channel(&offer, RING_PAGES, RING_PAGES, &[])
        .unwrap()
}

fn case_bad_write_index(socket: &std::path::Path, value: u32) {
    let mut client = HostedClient::connect(socket, 1 << 20).unwrap();
    let mut ch = open(&mut client);
    ping(&mut ch, 0).unwrap();
    poke(
        &client,
        control_gpa(&ch, true) + ring_offset::WRITE_INDEX as u64,
        value,
    );
    ch.channel.signal_peer();
    expect_reset(&mut client, ch);
}

fn case_bad_read_index(socket: &std::path::Path) {
    let mut client = HostedClient::connect(socket, 1 << 20).unwrap();
    let mut ch = open(&mut client);
    poke(
        &client,
        control_gpa(&ch, false) + ring_offset::READ_INDEX as u64,
        4,
    );
    // Unmasked, the host reads our (broken) read index when it publishes
    // the echo reply.
    ch.channel.incoming.unmask_and_check_empty().unwrap();
    ch.channel.outgoing.write_inband(1, false, &[0; 8]).unwrap();
    ch.channel.flush().unwrap();
    ch.channel.signal_peer();
    expect_reset(&mut client, ch);
}

fn case_descriptor_past_ring(socket: &std::path::Path) {
    let mut client = HostedClient::connect(socket, 1 << 20).unwrap();
    let ch = open(&mut client);
    let data = control_gpa(&ch, true) + 4096;
    // type 6, offset8 2, length8 0xffff: far past the 12 KiB data area.
    let desc = [6u8, 0, 2, 0, 0xff, 0xff, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0];
    client
        .memory()
        .slice(data, 16)
        .unwrap()
        .write_at(0, &desc)
        .unwrap();
    poke(
        &client,
        control_gpa(&ch, true) + ring_offset::WRITE_INDEX as u64,
        32,
    );
    ch.channel.signal_peer();
    expect_reset(&mut client, ch);
}

fn case_gpadl_outside_memory(socket: &std::path::Path) {
    let mut client = HostedClient::connect(socket, 1 << 20).unwrap();
    let offer = echo_offer(&mut client);
    let pages = client.memory().size() / 4096;
    let r = client.create_gpadl(offer.relid, &[1, 2, pages + 7]);
    assert!(
        matches!(r, Err(ClientError::Refused { what: "GPADL", .. })),
        "{r:?}"
    );
    let r = client.create_gpadl(offer.relid, &[u64::MAX / 4096]);
    assert!(
        matches!(r, Err(ClientError::Refused { what: "GPADL", .. })),
        "{r:?}"
    );
    // Opening with a GPADL that does not exist is refused too.
    let mut m = OpenChannel::new_zeroed();
    m.header = MessageHeader::new(msgtype::OPENCHANNEL);
    m.child_relid = offer.relid.into();
    m.ring_gpadl = 0xdead.into();
    m.downstream_ring_page_offset = 2.into();
    let (a, b) = (EventFd::new().unwrap(), EventFd::new().unwrap());
    client.send_raw(m.as_bytes(), &[&a, &b]).unwrap();
    let reply = client
        .wait_for(msgtype::OPENCHANNEL_RESULT, "open result")
        .unwrap();
    let (r, _) = OpenResult::read_from_prefix(&reply).unwrap();
    assert_ne!(r.status.get(), 0);
    // The connection still works.
    let mut ch = client
        .open_channel(&offer, RING_PAGES, RING_PAGES, &[])
        .unwrap();
    ping(&mut ch, 3).unwrap();
}

fn case_oversized_message(socket: &std::path::Path) {
    let mut client = HostedClient::connect(socket, 1 << 20).unwrap();
    let _ch = open(&mut client);
    let mut big = vec![0u8; 300];
    big[0] = msgtype::REQUESTOFFERS as u8;
    client.send_raw(&big, &[]).unwrap();
    let r = client.recv(Duration::from_secs(5));
    assert!(
        matches!(r, Err(ClientError::Closed)),
        "host drops the client: {r:?}"
    );
}

fn case_stops_reading(socket: &std::path::Path) {
    let mut client = HostedClient::connect(socket, 1 << 20).unwrap();
    let mut ch = open(&mut client);
    // Fill our outgoing ring again and again without reading any echo.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut id = 0;
    loop {
        while ch
            .channel
            .outgoing
            .write_inband(id, false, &[7; 512])
            .is_ok()
        {
            id += 1;
        }
        ch.channel.outgoing.commit().unwrap();
        ch.channel.signal_peer();
        if client
            .recv(Duration::from_millis(50))
            .unwrap()
            .is_some_and(|m| msg_type(&m) == Some(msgtype::RESCIND_CHANNELOFFER))
        {
            break;
        }
        assert!(Instant::now() < deadline, "stalled channel was never reset");
    }
    client.release_rescinded(ch).unwrap();
    let offer = client.wait_offer().unwrap();
    let mut fresh = client
        .open_channel(&offer, RING_PAGES, RING_PAGES, &[])
        .unwrap();
    ping(&mut fresh, 9).unwrap();
}

fn case_garbage_messages(socket: &std::path::Path) {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut client = HostedClient::connect(socket, 1 << 20).unwrap();
    for _ in 0..2000 {
        let len = rng.random_range(0..=240usize);
        let mut m = vec![0u8; len];
        rng.fill(&mut m[..]);
        if len >= 4 {
            // Mostly valid message types, with random bodies.
            m[..4].copy_from_slice(&rng.random_range(0u32..26).to_le_bytes());
        }
        // Never UNLOAD or re-contact, so the session survives.
        if matches!(
            msg_type(&m),
            Some(msgtype::UNLOAD | msgtype::INITIATE_CONTACT)
        ) {
            continue;
        }
        client.send_raw(&m, &[]).unwrap();
    }
    // Drain whatever the host answered; then the session still works.
    while client.recv(Duration::from_millis(200)).unwrap().is_some() {}
    let _ = client.request_offers().unwrap();
}

fn case_unsealed_memory(socket: &std::path::Path) {
    let sock = socket::connect(socket).unwrap();
    // SAFETY-free: a plain memfd without seals.
    let file = tempfile::tempfile().unwrap();
    file.set_len(1 << 20).unwrap();
    let mut m = InitiateContact::new_zeroed();
    m.header = MessageHeader::new(msgtype::INITIATE_CONTACT);
    m.version_requested = vmbus::wire::version::WIN10_V5_3.into();
    socket::send(&sock, m.as_bytes(), &[file.as_raw_fd()]).unwrap();
    let mut buf = vec![0u8; socket::RECV_BUFFER];
    let socket::Received::Message { len, .. } = socket::recv(&sock, &mut buf).unwrap() else {
        panic!("host closed instead of refusing");
    };
    let (r, _) = vmbus::wire::VersionResponse::read_from_prefix(&buf[..len]).unwrap();
    assert_eq!(r.version_supported, 0, "unsealed memory must be refused");
}

fn case_client_dies(socket: &std::path::Path) {
    let mut client = HostedClient::connect(socket, 1 << 20).unwrap();
    let mut ch = open(&mut client);
    ping(&mut ch, 1).unwrap();
    // Vanish without closing anything.
    drop(ch);
    drop(client);
}

#[test]
fn malicious_peers_cost_only_their_own_channels() {
    let mut serve = VspaServe::start(&["--echo", "--echo-stall-ms", "500"]);
    let good = GoodClient::start(&serve.socket);
    good.progressed_since(0);
    type Case = (&'static str, fn(&std::path::Path));
    let cases: [Case; 10] = [
        ("write index unaligned", |s| case_bad_write_index(s, 4)),
        ("write index past the ring", |s| {
            case_bad_write_index(s, 3 * 4096)
        }),
        ("write index huge", |s| case_bad_write_index(s, 0xffff_fff8)),
        ("read index unaligned", case_bad_read_index),
        ("descriptor past the ring", case_descriptor_past_ring),
        ("GPADL pages outside memory", case_gpadl_outside_memory),
        ("oversized message", case_oversized_message),
        ("peer stops reading", case_stops_reading),
        ("garbage messages", case_garbage_messages),
        ("unsealed memory", case_unsealed_memory),
    ];
    for (name, case) in cases {
        let before = good.count.load(Ordering::Relaxed);
        eprintln!("case: {name}");
        case(&serve.socket);
        assert!(serve.is_alive(), "server died during: {name}");
        good.progressed_since(before);
    }
    case_client_dies(&serve.socket);
    good.progressed_since(good.count.load(Ordering::Relaxed));
    good.finish();
    assert!(serve.is_alive());
}

#[test]
fn unknown_messages_before_contact_are_ignored() {
    let serve = VspaServe::start(&["--echo"]);
    let sock = socket::connect(&serve.socket).unwrap();
    socket::send(
        &sock,
        MessageHeader::new(msgtype::REQUESTOFFERS).as_bytes(),
        &[],
    )
    .unwrap();
    socket::send(&sock, &[1, 2], &[]).unwrap();
    drop(sock);
    let mut client = HostedClient::connect(&serve.socket, 1 << 20).unwrap();
    let mut ch = open(&mut client);
    ping(&mut ch, 5).unwrap();
    let _ = Wait::Ready;
}
