//! vspa's NBD server against malicious and sloppy clients, byte by byte:
//! bad magic, oversized option data, requests past the end, huge lengths,
//! unknown commands, half-closed and vanishing sockets. Each gets the
//! error the spec names or a disconnect, never a panic, and the server
//! keeps serving others.

use std::sync::Arc;
use std::time::{Duration, Instant};

use storage::nbd::{ExportConfig, Listen, Server, ServerConfig};
use vhd::nbd::Stream;
use vhd::nbd::uri::Endpoint;
use vhd::nbd::wire::{
    self, ChunkHeader, OptionHeader, OptionReplyHeader, RequestHeader, SimpleReply, chunk,
    client_flags, cmd, errno, opt, rep,
};
use vhd::{BlockingIo, CacheMode, DiskOptions};
use zerocopy::{FromBytes, IntoBytes};

const SIZE: u64 = 1 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    server: Server,
    socket: std::path::PathBuf,
    device: Arc<dyn vhd::BlockDevice>,
}

fn fixture() -> Fixture {
    fixture_with(|_| {})
}

/// The fixture with its server configuration changed by `tune`.
fn fixture_with(tune: impl FnOnce(&mut ServerConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    vhd::create::create_raw(&image, SIZE).unwrap();
    let device =
        vhd::open_by_name(&image, &DiskOptions::default().cache(CacheMode::Cached)).unwrap();
    let mut io = BlockingIo::new().unwrap();
    io.write(&*device, 0, &[0xa5; 4096]).unwrap();
    let export = |name: &str, read_only| ExportConfig {
        name: name.into(),
        device: Arc::clone(&device),
        read_only,
        description: String::new(),
    };
    let socket = dir.path().join("nbd.sock");
    let mut config = ServerConfig::new(
        vec![export("rw", false), export("ro", true)],
        vec![Listen::Unix(socket.clone())],
    );
    config.handshake_timeout = Duration::from_millis(500);
    tune(&mut config);
    let server = Server::start(config).unwrap();
    Fixture {
        _dir: dir,
        server,
        socket,
        device,
    }
}

fn connect(f: &Fixture) -> Stream {
    let s = Stream::connect(&Endpoint::Unix(f.socket.clone()), Duration::from_secs(2)).unwrap();
    s.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    s
}

fn send_option(s: &Stream, option: u32, data: &[u8]) {
    let mut msg = OptionHeader::new(option, data.len() as u32)
        .as_bytes()
        .to_vec();
    msg.extend_from_slice(data);
    s.write_all(&msg).unwrap();
}

fn read_option_reply(s: &Stream) -> (u32, u32, Vec<u8>) {
    let mut head = [0u8; 20];
    s.read_exact(&mut head).unwrap();
    let h = OptionReplyHeader::read_from_bytes(&head).unwrap();
    assert_eq!(h.magic.get(), wire::OPTION_REPLY_MAGIC);
    let mut data = vec![0u8; h.length.get() as usize];
    s.read_exact(&mut data).unwrap();
    (h.option.get(), h.reply_type.get(), data)
}

/// True once the server has closed the connection.
fn closed(s: &Stream) -> bool {
    let mut byte = [0u8; 1];
    matches!(s.read(&mut byte), Ok(0) | Err(_))
}

/// Negotiates structured replies and enters transmission on `export`.
fn go(f: &Fixture, export: &str) -> Stream {
    go_on(&f.socket, export, false)
}

/// As `go`, on any server socket, selecting `base:allocation` if `meta`.
fn go_on(socket: &std::path::Path, export: &str, meta: bool) -> Stream {
    let s = Stream::connect(
        &Endpoint::Unix(socket.to_path_buf()),
        Duration::from_secs(2),
    )
    .unwrap();
    s.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES).to_be_bytes())
        .unwrap();
    send_option(&s, opt::STRUCTURED_REPLY, &[]);
    assert_eq!(read_option_reply(&s).1, rep::ACK);
    if meta {
        let query = wire::BASE_ALLOCATION.as_bytes();
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&1u32.to_be_bytes());
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query);
        send_option(&s, opt::SET_META_CONTEXT, &data);
        let (_, kind, context) = read_option_reply(&s);
        assert_eq!(kind, rep::META_CONTEXT);
        assert_eq!(&context[4..], query);
        assert_eq!(read_option_reply(&s).1, rep::ACK);
    }
    let mut data = (export.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    send_option(&s, opt::GO, &data);
    loop {
        match read_option_reply(&s).1 {
            rep::INFO => {}
            rep::ACK => return s,
            other => panic!("GO failed with {other:#x}"),
        }
    }
}

fn request(s: &Stream, command: u16, cookie: u64, offset: u64, length: u32) {
    let h = RequestHeader::new(command, 0, cookie, offset, length);
    s.write_all(h.as_bytes()).unwrap();
}

/// One structured reply chunk: (cookie, type, error or 0, payload).
fn read_chunk(s: &Stream) -> (u64, u16, u32, Vec<u8>) {
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic).unwrap();
    if u32::from_be_bytes(magic) == wire::SIMPLE_REPLY_MAGIC {
        let mut rest = [0u8; 12];
        s.read_exact(&mut rest).unwrap();
        let mut all = magic.to_vec();
        all.extend_from_slice(&rest);
        let r = SimpleReply::read_from_bytes(&all).unwrap();
        return (r.cookie.get(), u16::MAX, r.error.get(), Vec::new());
    }
    let mut rest = [0u8; 16];
    s.read_exact(&mut rest).unwrap();
    let mut all = magic.to_vec();
    all.extend_from_slice(&rest);
    let h = ChunkHeader::read_from_bytes(&all).unwrap();
    assert_eq!(h.magic.get(), wire::STRUCTURED_REPLY_MAGIC);
    let mut payload = vec![0u8; h.length.get() as usize];
    s.read_exact(&mut payload).unwrap();
    let error = if h.chunk_type.get() == chunk::ERROR {
        u32::from_be_bytes(payload[..4].try_into().unwrap())
    } else {
        0
    };
    (h.cookie.get(), h.chunk_type.get(), error, payload)
}

fn wait_for_no_connections(server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.connections() > 0 {
        assert!(Instant::now() < deadline, "a connection thread never ended");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn clients_past_the_limit_are_refused_and_stop_ends_every_connection() {
    let f = fixture_with(|c| {
        c.max_connections = 2;
        c.handshake_timeout = Duration::from_secs(30);
    });
    let a = connect(&f);
    let _b = connect(&f);
    let c = Stream::connect(&Endpoint::Unix(f.socket.clone()), Duration::from_secs(2)).unwrap();
    c.set_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut byte = [0u8; 1];
    assert!(
        c.read_exact(&mut byte).is_err(),
        "the third client is closed without a greeting"
    );
    assert_eq!(f.server.connections(), 2);
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    while f.server.connections() > 1 {
        assert!(
            Instant::now() < deadline,
            "the closed client's place came back"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let _d = connect(&f);
    // Two clients sit in the handshake (30 s limit): stop cuts them off.
    let start = Instant::now();
    f.server.stop(Duration::from_millis(200));
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn handshake_abuse_gets_errors_or_a_disconnect() {
    let f = fixture();
    // Unknown client flags: dropped at once.
    let s = connect(&f);
    s.write_all(&0x8000_0001u32.to_be_bytes()).unwrap();
    assert!(closed(&s));

    // Bad option magic: dropped.
    let s = connect(&f);
    s.write_all(&client_flags::FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    let mut bogus = OptionHeader::new(opt::LIST, 0);
    bogus.magic = 0x1122_3344_5566_7788u64.into();
    s.write_all(bogus.as_bytes()).unwrap();
    assert!(closed(&s));

    // Option data of 4 GiB: told it is too big, then dropped.
    let s = connect(&f);
    s.write_all(&client_flags::FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    s.write_all(OptionHeader::new(opt::GO, u32::MAX).as_bytes())
        .unwrap();
    assert_eq!(read_option_reply(&s).1, rep::ERR_TOO_BIG);
    assert!(closed(&s));

    // Unknown options, lying lengths and unknown exports get error replies
    // and the session goes on.
    let s = connect(&f);
    s.write_all(&client_flags::FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    send_option(&s, 4242, b"whatever");
    assert_eq!(
        read_option_reply(&s),
        (4242, rep::ERR_UNSUP, b"option not supported".to_vec())
    );
    send_option(&s, opt::GO, &[0, 0, 0, 99, b'x']);
    assert_eq!(read_option_reply(&s).1, rep::ERR_INVALID);
    send_option(&s, opt::INFO, &[0, 0, 0, 1, b'x', 0, 0]);
    assert_eq!(read_option_reply(&s).1, rep::ERR_UNKNOWN);
    send_option(&s, opt::SET_META_CONTEXT, &[0; 8]);
    assert_eq!(
        read_option_reply(&s).1,
        rep::ERR_INVALID,
        "needs structured replies"
    );
    send_option(&s, opt::STARTTLS, &[]);
    assert_eq!(read_option_reply(&s).1, rep::ERR_POLICY);
    send_option(&s, opt::LIST, &[]);
    let names: Vec<_> = (0..3).map(|_| read_option_reply(&s)).collect();
    assert_eq!(names[0].1, rep::SERVER);
    assert_eq!(&names[0].2[4..], b"rw");
    assert_eq!(&names[1].2[4..], b"ro");
    assert_eq!(names[2].1, rep::ACK);
    // EXPORT_NAME of an unknown export cannot fail politely: dropped.
    send_option(&s, opt::EXPORT_NAME, b"nope");
    assert!(closed(&s));

    // A client that goes quiet mid-handshake is timed out.
    let s = connect(&f);
    s.write_all(&client_flags::FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    s.write_all(&OptionHeader::new(opt::GO, 10).as_bytes()[..10])
        .unwrap();
    wait_for_no_connections(&f.server);
    assert!(closed(&s));
}

#[test]
fn bad_requests_get_spec_errors_and_the_connection_goes_on() {
    let f = fixture();
    let s = go(&f, "rw");
    request(&s, cmd::READ, 1, SIZE - 512, 1024);
    request(&s, cmd::READ, 2, 0, u32::MAX);
    request(&s, cmd::READ, 3, 100, 512);
    request(&s, 42, 4, 0, 0);
    request(&s, cmd::FLUSH, 5, 0, 512);
    request(&s, cmd::WRITE_ZEROES, 6, SIZE, 512);
    request(&s, cmd::BLOCK_STATUS, 7, 0, 4096);
    request(&s, cmd::READ, 8, u64::MAX - 511, 512);
    request(&s, cmd::READ, 9, 0, 4096);
    let mut replies: Vec<_> = (0..9).map(|_| read_chunk(&s)).collect();
    replies.sort_by_key(|r| r.0);
    let errors: Vec<(u64, u32)> = replies.iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(
        errors,
        [
            (1, errno::EINVAL),
            (2, errno::EOVERFLOW),
            (3, errno::EINVAL),
            (4, errno::EINVAL),
            (5, errno::EINVAL),
            (6, errno::ENOSPC),
            (7, errno::EINVAL),
            (8, errno::EINVAL),
            (9, 0),
        ]
    );
    let (_, kind, _, data) = &replies[8];
    assert_eq!(*kind, chunk::OFFSET_DATA);
    assert!(data[8..].iter().all(|&b| b == 0xa5));

    // A refused WRITE's payload is skipped: the next request parses.
    let s = go(&f, "ro");
    request(&s, cmd::WRITE, 10, 0, 4096);
    s.write_all(&[0x11; 4096]).unwrap();
    request(&s, cmd::READ, 11, 0, 512);
    assert_eq!(read_chunk(&s).2, errno::EPERM);
    let (cookie, kind, _, data) = read_chunk(&s);
    assert_eq!((cookie, kind), (11, chunk::OFFSET_DATA));
    assert!(
        data[8..].iter().all(|&b| b == 0xa5),
        "the refused write changed nothing"
    );
}

#[test]
fn streams_that_cannot_be_trusted_are_dropped() {
    let f = fixture();
    // A WRITE beyond the 32 MiB maximum payload: an error, then goodbye.
    let s = go(&f, "rw");
    request(&s, cmd::WRITE, 1, 0, wire::MAX_PAYLOAD + 512);
    assert_eq!(read_chunk(&s).2, errno::EOVERFLOW);
    assert!(closed(&s));
    // A request with a bad magic: nothing after it can be parsed.
    let s = go(&f, "rw");
    let mut h = RequestHeader::new(cmd::READ, 0, 1, 0, 512);
    h.magic = 0x2560_9514.into();
    s.write_all(h.as_bytes()).unwrap();
    assert!(closed(&s));
    // A client vanishing in the middle of a payload.
    let s = go(&f, "rw");
    request(&s, cmd::WRITE, 1, 0, 1 << 20);
    s.write_all(&[0x22; 1000]).unwrap();
    drop(s);
    wait_for_no_connections(&f.server);
    let mut io = BlockingIo::new().unwrap();
    let mut back = [0u8; 512];
    io.read(&*f.device, 0, &mut back).unwrap();
    assert!(
        back.iter().all(|&b| b == 0xa5),
        "a partial payload was never written"
    );
}

#[test]
fn half_closed_and_disconnecting_clients_still_get_their_replies() {
    let f = fixture();
    // Requests, then the client shuts its sending side: every reply comes,
    // then the server closes.
    let s = go(&f, "rw");
    for cookie in 0..16 {
        request(&s, cmd::READ, cookie, cookie * 4096, 4096);
    }
    s.shutdown(std::net::Shutdown::Write);
    let mut cookies: Vec<u64> = (0..16).map(|_| read_chunk(&s).0).collect();
    cookies.sort_unstable();
    assert_eq!(cookies, (0..16).collect::<Vec<_>>());
    assert!(closed(&s));
    // DISC after a write: the write is answered first.
    let s = go(&f, "rw");
    request(&s, cmd::WRITE, 7, 8192, 512);
    s.write_all(&[0x33; 512]).unwrap();
    request(&s, cmd::DISC, 8, 0, 0);
    assert_eq!(read_chunk(&s), (7, u16::MAX, 0, Vec::new()));
    assert!(closed(&s));
    wait_for_no_connections(&f.server);
    // The server still serves.
    let s = go(&f, "rw");
    request(&s, cmd::READ, 9, 8192, 512);
    let (_, _, _, data) = read_chunk(&s);
    assert!(data[8..].iter().all(|&b| b == 0x33));
    drop(s);
    f.server.stop(Duration::from_secs(1));
}

fn request_flags(s: &Stream, command: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
    let h = RequestHeader::new(command, flags, cookie, offset, length);
    s.write_all(h.as_bytes()).unwrap();
}

/// The (length, flags) descriptors of a BLOCK_STATUS reply.
fn block_status(s: &Stream, flags: u16, offset: u64, length: u32) -> Vec<(u32, u32)> {
    request_flags(s, cmd::BLOCK_STATUS, flags, 99, offset, length);
    let (cookie, kind, error, payload) = read_chunk(s);
    assert_eq!((cookie, kind, error), (99, chunk::BLOCK_STATUS, 0));
    assert_eq!(&payload[..4], &1u32.to_be_bytes(), "context id");
    payload[4..]
        .chunks_exact(8)
        .map(|d| {
            (
                u32::from_be_bytes(d[..4].try_into().unwrap()),
                u32::from_be_bytes(d[4..].try_into().unwrap()),
            )
        })
        .collect()
}

fn read_back(s: &Stream, offset: u64, length: u32) -> Vec<u8> {
    request(s, cmd::READ, 98, offset, length);
    let (cookie, kind, error, payload) = read_chunk(s);
    assert_eq!((cookie, kind, error), (98, chunk::OFFSET_DATA, 0));
    payload[8..].to_vec()
}

#[test]
fn commands_do_what_the_spec_says_on_vhds() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhd");
    let child = dir.path().join("child.vhd");
    vhd::create::create_dynamic(&base, 8 * MIB, MIB as u32).unwrap();
    vhd::create::create_differencing(&child, &base, MIB as u32).unwrap();
    let options = DiskOptions::default().cache(CacheMode::Cached);
    let export = |name: &str, path: &std::path::Path| ExportConfig {
        name: name.into(),
        device: vhd::open_by_name(path, &options).unwrap(),
        read_only: false,
        description: String::new(),
    };
    // Two exports of one chain would fight over the base's lock: the
    // child gets its own copy of the chain.
    let copy = dir.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(&base, copy.join("base.vhd")).unwrap();
    std::fs::copy(&child, copy.join("child.vhd")).unwrap();
    let socket = dir.path().join("cmd.sock");
    let _server = Server::start(ServerConfig::new(
        vec![
            export("dyn", &base),
            export("diff", &copy.join("child.vhd")),
        ],
        vec![Listen::Unix(socket.clone())],
    ))
    .unwrap();
    let (hole, data) = (wire::state::HOLE | wire::state::ZERO, 0);
    let mib = MIB as u32;

    let s = go_on(&socket, "dyn", true);
    assert_eq!(block_status(&s, 0, 0, 8 * mib), [(8 * mib, hole)]);
    // A FUA write allocates block 1.
    request_flags(&s, cmd::WRITE, wire::cmd_flag::FUA, 1, MIB, 4096);
    s.write_all(&[0x11; 4096]).unwrap();
    assert_eq!(read_chunk(&s), (1, u16::MAX, 0, Vec::new()));
    assert_eq!(
        block_status(&s, 0, 0, 8 * mib),
        [(mib, hole), (mib, data), (6 * mib, hole)]
    );
    assert_eq!(
        block_status(&s, wire::cmd_flag::REQ_ONE, 0, 8 * mib),
        [(mib, hole)]
    );
    // WRITE_ZEROES leaves a hole a hole; with NO_HOLE it allocates.
    request(&s, cmd::WRITE_ZEROES, 2, 3 * MIB, mib);
    request_flags(
        &s,
        cmd::WRITE_ZEROES,
        wire::cmd_flag::NO_HOLE,
        3,
        4 * MIB,
        mib,
    );
    let mut done: Vec<_> = (0..2).map(|_| read_chunk(&s).0).collect();
    done.sort_unstable();
    assert_eq!(done, [2, 3]);
    assert_eq!(
        block_status(&s, 0, 0, 8 * mib),
        [
            (mib, hole),
            (mib, data),
            (2 * mib, hole),
            (mib, data),
            (3 * mib, hole)
        ]
    );
    assert!(read_back(&s, 4 * MIB, 4096).iter().all(|&b| b == 0));
    // TRIM of the written block: it reads zeros again.
    request(&s, cmd::TRIM, 4, MIB, mib);
    assert_eq!(read_chunk(&s).2, 0);
    assert!(read_back(&s, MIB, 4096).iter().all(|&b| b == 0));
    // CACHE, and a zero-length READ (one NONE chunk).
    request(&s, cmd::CACHE, 5, 0, 8 * mib);
    assert_eq!(read_chunk(&s).2, 0);
    request(&s, cmd::READ, 6, 0, 0);
    assert_eq!(read_chunk(&s), (6, chunk::NONE, 0, Vec::new()));

    // A differencing disk cannot punch: FAST_ZERO fails fast, plain
    // WRITE_ZEROES writes zeros over the parent's data.
    let s = go_on(&socket, "diff", true);
    request_flags(&s, cmd::WRITE_ZEROES, wire::cmd_flag::FAST_ZERO, 7, 0, mib);
    assert_eq!(read_chunk(&s).2, errno::ENOTSUP);
    request(&s, cmd::WRITE, 8, 2 * MIB, 4096);
    s.write_all(&[0x22; 4096]).unwrap();
    assert_eq!(read_chunk(&s).2, 0);
    request(&s, cmd::WRITE_ZEROES, 9, 2 * MIB, 2048);
    assert_eq!(read_chunk(&s).2, 0);
    let back = read_back(&s, 2 * MIB, 4096);
    assert!(back[..2048].iter().all(|&b| b == 0));
    assert!(back[2048..].iter().all(|&b| b == 0x22));
}

#[test]
fn vspas_client_and_server_over_tcp_with_two_connections() {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("tcp.vhd");
    vhd::create::create_dynamic(&image, 8 * MIB, MIB as u32).unwrap();
    let device =
        vhd::open_by_name(&image, &DiskOptions::default().cache(CacheMode::Cached)).unwrap();
    let config = ServerConfig::new(
        vec![ExportConfig {
            name: "disk".into(),
            device,
            read_only: false,
            description: "over TCP".into(),
        }],
        vec![Listen::Tcp("127.0.0.1:0".parse().unwrap())],
    );
    let server = Server::start(config).unwrap();
    let addr = server.tcp_addr().unwrap();
    let uri: vhd::nbd::NbdUri = format!("nbd://{addr}/disk").parse().unwrap();
    let options = vhd::nbd::NbdOptions::default();
    let a = vhd::nbd::NbdClient::open(&uri, &options).unwrap();
    let b = vhd::nbd::NbdClient::open(&uri, &options).unwrap();
    assert_eq!(server.connections(), 2);
    assert!(a.export().has(wire::flag::CAN_MULTI_CONN));
    assert_eq!(a.export().description.as_deref(), Some("over TCP"));
    let mut io = BlockingIo::new().unwrap();
    io.write(&a, 2048, &[0x44; 8192]).unwrap();
    io.write(&b, 6 * 2048, &[0x55; 4096]).unwrap();
    io.flush(&a).unwrap();
    // Each connection sees the other's completed writes.
    let mut back = vec![0u8; 4096];
    io.read(&b, 2048, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0x44));
    io.read(&a, 6 * 2048, &mut back).unwrap();
    assert!(back.iter().all(|&x| x == 0x55));
    // Block status through vspa's client: blocks 1 and 6 are allocated.
    use vhd::{Allocation, BlockDevice};
    assert_eq!(a.allocation(0, 16384).unwrap(), (Allocation::Hole, 2048));
    assert_eq!(a.allocation(2048, 14336).unwrap(), (Allocation::Data, 2048));
    assert_eq!(a.allocation(4096, 12288).unwrap(), (Allocation::Hole, 8192));
    // Discard through the client: the data reads as zeros.
    io.discard(&b, 2048, 16).unwrap();
    io.read(&a, 2048, &mut back).unwrap();
    assert!(back[..4096].iter().all(|&x| x == 0));
    drop((a, b));
    wait_for_no_connections(&server);
}
