//! Malicious storvsc clients against `vspa serve`: bad page lists, lengths
//! and CDBs get error statuses, floods are absorbed, a corrupted ring resets
//! only that channel, and a well-behaved client keeps working throughout.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use storage::client::{Buffer, Srb, StorvscClient, cdb, read_reply, send_srb};
use storage::protocol::{VstorPacket, direction, operation, srb, status};
use vmbus::hosted::client::{ClientChannel, HostedClient};
use vmbus::packet::write_gpa_direct;
use vmbus::wire::{PACKET_FLAG_COMPLETION_REQUESTED, packet_type};
use vspa_tests::VspaServe;
use zerocopy::IntoBytes;

fn serve() -> (tempfile::TempDir, VspaServe) {
    let dir = tempfile::tempdir().unwrap();
    vhd::create::create_dynamic(&dir.path().join("d.vhd"), 16 << 20, 2 << 20).unwrap();
    let config = dir.path().join("vspa.toml");
    std::fs::write(
        &config,
        "[[controller]]\nname = \"scsi0\"\nsubchannels = 1\nqueue_depth = 64\n\n[[controller.lun]]\nlun = 0\npath = \"d.vhd\"\n",
    )
    .unwrap();
    let s = VspaServe::start(&["--config", config.to_str().unwrap()]);
    (dir, s)
}

fn connect(socket: &std::path::Path) -> (HostedClient, StorvscClient) {
    vspa_tests::connect_scsi(socket, 8 << 20, 0, 8)
}

/// A good client reading and writing in the background.
fn good_client(
    socket: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (mut host, mut c) = connect(&socket);
        let b = Buffer {
            pages: host.alloc_pages(1).unwrap(),
            offset: 0,
            len: 4096,
        };
        let mut i = 0u64;
        while !stop.load(Ordering::Acquire) {
            host.slice(&b.pages).write_at(0, &i.to_le_bytes()).unwrap();
            let r = c.execute(
                0,
                &Srb::new(0, &cdb::write_16(i % 100 * 8, 8), direction::WRITE, 4096),
                Some(&b),
            );
            assert_eq!(r.unwrap().srb().srb_status, srb::SUCCESS);
            let r = c.execute(
                0,
                &Srb::new(0, &cdb::read_16(i % 100 * 8, 8), direction::READ, 4096),
                Some(&b),
            );
            assert_eq!(r.unwrap().srb().srb_status, srb::SUCCESS);
            let mut v = [0u8; 8];
            host.slice(&b.pages).read_at(0, &mut v).unwrap();
            assert_eq!(u64::from_le_bytes(v), i, "good client read back wrong data");
            i += 1;
            count.fetch_add(1, Ordering::Relaxed);
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn raw_srb(
    ch: &mut ClientChannel,
    txid: u64,
    cdb_bytes: &[u8],
    cdb_len: u8,
    (data_in, len): (u8, u32),
    (pfns, range_len): (&[u64], u32),
) {
    let mut p = VstorPacket::new(operation::EXECUTE_SRB, 0);
    p.header.flags = 1.into();
    let mut r = p.srb();
    r.length = 0x34.into();
    r.cdb_length = cdb_len;
    r.data_in = data_in;
    r.sense_info_length = 20;
    r.data_transfer_length = len.into();
    r.cdb_or_sense[..cdb_bytes.len()].copy_from_slice(cdb_bytes);
    p.set_srb(&r);
    write_gpa_direct(
        &mut ch.channel.outgoing,
        txid,
        1,
        &[(range_len, 0, pfns)],
        p.as_bytes(),
    )
    .unwrap();
}

fn reply_for(ch: &mut ClientChannel, txid: u64) -> storage::client::Reply {
    storage::client::wait_reply(ch, txid, &mut Vec::new(), Duration::from_secs(10)).unwrap()
}

#[test]
fn malicious_storage_clients() {
    let (_dir, mut serve) = serve();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let good = good_client(serve.socket.clone(), stop.clone(), count.clone());

    let (mut host, mut c) = connect(&serve.socket);
    let mem_pages = host.memory().size() / 4096;
    let page = host.alloc_pages(1).unwrap().first_pfn;
    let ch = &mut c.channels[0];
    let read10 = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];

    // GPA ranges outside shared memory.
    raw_srb(
        ch,
        1,
        &read10,
        10,
        (direction::READ, 512),
        (&[mem_pages + 5], 512),
    );
    assert_eq!(reply_for(ch, 1).srb().srb_status, srb::INVALID_REQUEST);
    raw_srb(
        ch,
        2,
        &read10,
        10,
        (direction::READ, 512),
        (&[u64::MAX / 4096], 512),
    );
    assert_eq!(reply_for(ch, 2).srb().srb_status, srb::INVALID_REQUEST);
    // data_transfer_length larger than the page list.
    raw_srb(ch, 3, &read10, 10, (direction::READ, 4096), (&[page], 512));
    assert_eq!(reply_for(ch, 3).srb().srb_status, srb::INVALID_REQUEST);
    // ...or disagreeing with the CDB: CHECK CONDITION, INVALID FIELD IN CDB.
    let read8 = [0x28, 0, 0, 0, 0, 0, 0, 0, 8, 0];
    raw_srb(ch, 4, &read8, 10, (direction::READ, 512), (&[page], 512));
    let r = reply_for(ch, 4);
    assert_eq!(r.srb().scsi_status, 2);
    assert_eq!(&r.sense()[12..14], &[0x24, 0]);
    // CDB length over 16, and a CDB shorter than its opcode needs.
    raw_srb(ch, 5, &read10, 17, (direction::READ, 512), (&[page], 512));
    assert_eq!(reply_for(ch, 5).srb().srb_status, srb::INVALID_REQUEST);
    raw_srb(ch, 6, &read10, 6, (direction::READ, 512), (&[page], 512));
    assert_eq!(reply_for(ch, 6).srb().srb_status, srb::INVALID_REQUEST);
    // Unknown operations and runt packets get a failure status.
    let mut p = VstorPacket::new(0x99, 0);
    p.header.flags = 1.into();
    ch.channel
        .outgoing
        .write_packet(
            packet_type::DATA_INBAND,
            PACKET_FLAG_COMPLETION_REQUESTED,
            7,
            &[],
            p.as_bytes(),
        )
        .unwrap();
    assert_eq!(reply_for(ch, 7).status(), status::INVALID_PARAMETER);
    ch.channel
        .outgoing
        .write_packet(
            packet_type::DATA_INBAND,
            PACKET_FLAG_COMPLETION_REQUESTED,
            8,
            &[],
            &[3, 0, 0, 0],
        )
        .unwrap();
    assert_eq!(reply_for(ch, 8).status(), status::INVALID_PARAMETER);

    // A flood beyond the ring, without reading completions for a while:
    // every request still gets exactly one completion.
    let b = Buffer {
        pages: host.alloc_pages(1).unwrap(),
        offset: 0,
        len: 512,
    };
    // The good client is running before the flood starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while count.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the good client never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut total = 20_000u64;
    let mut sent = 0u64;
    let mut seen = HashSet::new();
    let mut stalls = 0u64;
    let start = Instant::now();
    let before = count.load(Ordering::Relaxed);
    while sent < total {
        let srb_r = Srb::new(0, &read10, direction::READ, 512);
        match send_srb(ch, 1000 + sent, &srb_r, Some(&b)) {
            Ok(()) => sent += 1,
            Err(_) => {
                ch.channel.flush().unwrap();
                // Ring full: only every fifth time drain completions, so
                // the host sits on a full ring for a while.
                stalls += 1;
                if stalls.is_multiple_of(5) {
                    while let Some(r) = read_reply(ch).unwrap() {
                        assert!(seen.insert(r.txid), "duplicate completion {}", r.txid);
                    }
                }
                ch.channel.flush().unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "flood made no progress"
        );
        // Keep flooding until the good client got a turn (a loaded host
        // may run the whole flood before its thread is scheduled).
        if sent == total && count.load(Ordering::Relaxed) == before {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "good client starved during the flood"
            );
            total += 1000;
        }
    }
    ch.channel.flush().unwrap();
    while seen.len() < total as usize {
        while let Some(r) = read_reply(ch).unwrap() {
            assert_eq!(r.srb().srb_status, srb::SUCCESS);
            assert!(seen.insert(r.txid), "duplicate completion {}", r.txid);
        }
        ch.channel.flush().unwrap();
        ch.channel
            .wait_for_work(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "completions stopped at {}",
            seen.len()
        );
    }
    assert!(
        count.load(Ordering::Relaxed) > before,
        "good client starved during the flood"
    );

    // A corrupted ring index resets this channel only.
    let relid = c.channels[0].relid();
    let ctl = c.channels[0].ring_pages().first_pfn * 4096;
    host.memory()
        .slice(ctl, 4)
        .unwrap()
        .write_at(0, &7u32.to_le_bytes())
        .unwrap();
    c.channels[0].channel.signal_peer();
    host.wait_rescind(relid).unwrap();
    let before = count.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(5);
    while count.load(Ordering::Relaxed) < before + 20 {
        assert!(
            Instant::now() < deadline,
            "good client stalled after the reset"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Release);
    good.join().expect("good client failed");
    assert!(serve.is_alive(), "vspa serve died");
}
