//! vspa's NBD client against malicious servers: a fake server completes the
//! handshake, then answers a request with bad bytes (wrong magic, a cookie
//! never sent, an oversized chunk, a chunk type from nowhere) or never
//! answers. The client drops the connection, reconnects and sends the
//! request again; when every attempt meets the same server, the request
//! fails with EIO. Errors the server reports properly fail only their
//! request. Nothing panics.

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use vhd::nbd::wire::{
    self, ChunkHeader, InfoExport, OptionHeader, OptionReplyHeader, RequestHeader, SimpleReply,
    chunk, errno, flag, info, opt, rep, reply_flag,
};
use vhd::nbd::{NbdClient, NbdOptions, NbdUri, Stream};
use vhd::{BlockDevice, BlockError, BlockingIo};
use zerocopy::{FromBytes, IntoBytes};

const SIZE: u64 = 1 << 20;

/// How the fake server answers the first request of each connection.
#[derive(Clone, Copy, Debug)]
enum Answer {
    BadMagic,
    WrongCookie,
    OversizedChunk,
    UnknownChunkType,
    Silence,
    ErrorChunk,
    /// A correct (all-0x5c) reply.
    Good,
}

struct Fake {
    _dir: tempfile::TempDir,
    uri: NbdUri,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

/// A server that speaks the handshake correctly, then answers `answer`.
fn fake(answer: Answer, greeting_magic: u64) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (count, seen) = (Arc::clone(&connections), Arc::clone(&requests));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            count.fetch_add(1, Ordering::SeqCst);
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let s = Stream::from(conn);
                let _ = s.set_timeout(Some(Duration::from_secs(5)));
                let _ = serve_one(&s, answer, greeting_magic, &seen);
            });
        }
    });
    Fake {
        uri: format!("nbd+unix:///?socket={}", socket.display())
            .parse()
            .unwrap(),
        _dir: dir,
        connections,
        requests,
    }
}

fn serve_one(s: &Stream, answer: Answer, magic: u64, seen: &AtomicUsize) -> std::io::Result<()> {
    let mut greeting = magic.to_be_bytes().to_vec();
    greeting.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&wire::handshake::FIXED_NEWSTYLE.to_be_bytes());
    s.write_all(&greeting)?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    loop {
        let mut head = [0u8; 16];
        s.read_exact(&mut head)?;
        let h = OptionHeader::read_from_bytes(&head).unwrap();
        let mut data = vec![0u8; h.length.get() as usize];
        s.read_exact(&mut data)?;
        let option = h.option.get();
        let reply = |t: u32, d: &[u8]| {
            let mut m = OptionReplyHeader::new(option, t, d.len() as u32)
                .as_bytes()
                .to_vec();
            m.extend_from_slice(d);
            s.write_all(&m)
        };
        match option {
            opt::GO => {
                let e = InfoExport {
                    info_type: info::EXPORT.into(),
                    size: SIZE.into(),
                    flags: (flag::HAS_FLAGS | flag::SEND_FLUSH).into(),
                };
                reply(rep::INFO, e.as_bytes())?;
                reply(rep::ACK, &[])?;
                break;
            }
            opt::STRUCTURED_REPLY => reply(rep::ACK, &[])?,
            _ => reply(rep::ERR_UNSUP, &[])?,
        }
    }
    loop {
        let mut req = [0u8; 28];
        s.read_exact(&mut req)?;
        let r = RequestHeader::read_from_bytes(&req).unwrap();
        seen.fetch_add(1, Ordering::SeqCst);
        let (cookie, len) = (r.cookie.get(), r.length.get());
        let data_chunk = |cookie: u64, length: u32| {
            let mut m = ChunkHeader::new(cookie, reply_flag::DONE, chunk::OFFSET_DATA, length)
                .as_bytes()
                .to_vec();
            m.extend_from_slice(&r.offset.get().to_be_bytes());
            m
        };
        let bytes = match answer {
            Answer::BadMagic => SimpleReply {
                magic: 0x6744_6699.into(),
                ..SimpleReply::new(cookie, 0)
            }
            .as_bytes()
            .to_vec(),
            Answer::WrongCookie => data_chunk(cookie ^ 0xdead_0000, len + 8),
            Answer::OversizedChunk => data_chunk(cookie, 64 << 20),
            Answer::UnknownChunkType => ChunkHeader::new(cookie, reply_flag::DONE, 77, 0)
                .as_bytes()
                .to_vec(),
            Answer::Silence => Vec::new(),
            Answer::ErrorChunk => {
                let mut m = ChunkHeader::new(cookie, reply_flag::DONE, chunk::ERROR, 6 + 4)
                    .as_bytes()
                    .to_vec();
                m.extend_from_slice(&errno::ENOSPC.to_be_bytes());
                m.extend_from_slice(&4u16.to_be_bytes());
                m.extend_from_slice(b"full");
                m
            }
            Answer::Good => {
                let mut m = data_chunk(cookie, len + 8);
                m.extend(std::iter::repeat_n(0x5c, len as usize));
                m
            }
        };
        s.write_all(&bytes)?;
        if matches!(answer, Answer::Silence) {
            std::thread::sleep(Duration::from_secs(3));
            return Ok(());
        }
    }
}

fn options() -> NbdOptions {
    NbdOptions {
        connect_timeout: Duration::from_secs(1),
        reconnect_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_millis(300),
        ..NbdOptions::default()
    }
}

#[test]
fn protocol_violations_are_retried_then_fail_with_eio() {
    for answer in [
        Answer::BadMagic,
        Answer::WrongCookie,
        Answer::OversizedChunk,
        Answer::UnknownChunkType,
        Answer::Silence,
    ] {
        let f = fake(answer, wire::NBDMAGIC);
        let client = NbdClient::open(&f.uri, &options()).unwrap();
        let mut io = BlockingIo::new().unwrap();
        let mut buf = vec![0u8; 4096];
        let started = Instant::now();
        let got = io.read(&client, 8, &mut buf);
        assert_eq!(got, Err(BlockError::Os(libc::EIO)), "{answer:?}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{answer:?} took too long"
        );
        // Sent once per attempt, each time on a new connection.
        let attempts = options().max_attempts as usize;
        assert_eq!(f.requests.load(Ordering::SeqCst), attempts, "{answer:?}");
        assert!(
            f.connections.load(Ordering::SeqCst) >= attempts,
            "{answer:?}"
        );
        assert!(
            buf.iter().all(|&b| b == 0),
            "{answer:?}: no data from a bad reply"
        );
    }
}

#[test]
fn reported_errors_fail_only_their_request() {
    let f = fake(Answer::ErrorChunk, wire::NBDMAGIC);
    let client = NbdClient::open(&f.uri, &options()).unwrap();
    let mut io = BlockingIo::new().unwrap();
    let mut buf = vec![0u8; 4096];
    assert_eq!(
        io.read(&client, 0, &mut buf),
        Err(BlockError::Os(libc::ENOSPC))
    );
    assert_eq!(
        io.read(&client, 8, &mut buf),
        Err(BlockError::Os(libc::ENOSPC))
    );
    assert_eq!(f.connections.load(Ordering::SeqCst), 1, "no reconnect");

    let f = fake(Answer::Good, wire::NBDMAGIC);
    let client = NbdClient::open(&f.uri, &options()).unwrap();
    assert_eq!(client.info().size(), SIZE);
    // A 1 MiB read is one request; the fake sends 0x5c everywhere.
    let mut big = vec![0u8; SIZE as usize];
    io.read(&client, 0, &mut big).unwrap();
    assert!(big.iter().all(|&b| b == 0x5c));
    // The server did not offer base:allocation: everything is data.
    assert_eq!(
        client.allocation(0, 2048).unwrap(),
        (vhd::Allocation::Data, 2048)
    );
}

#[test]
fn broken_handshakes_fail_the_open() {
    let f = fake(Answer::Good, 0x1234_5678_9abc_def0);
    let err = NbdClient::open(&f.uri, &options()).unwrap_err();
    assert!(err.to_string().contains("bad greeting magic"), "{err}");
    let missing: NbdUri = "nbd+unix:///?socket=/nonexistent/vspa-nbd.sock"
        .parse()
        .unwrap();
    assert!(NbdClient::open(&missing, &options()).is_err());
}
