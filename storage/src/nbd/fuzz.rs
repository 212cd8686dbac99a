//! The fuzz harness of the NBD server, shared by the cargo-fuzz target
//! `nbd_server` (in `storage/fuzz`) and the proptests: arbitrary client
//! bytes through a whole session (handshake, then transmission) against a
//! small raw disk, over a socket pair. It must end (any outcome is fine)
//! and never panic or hang.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use vhd::nbd::Stream;
use vhd::nbd::wire::{IHAVEOPT, OptionHeader, client_flags, opt};
use zerocopy::IntoBytes;

use super::{Export, Shared};
use vmbus::event::EventFd;
use vspa_threads::conns::Connections;

/// The server state of every fuzzed session (one raw 1 MiB export).
fn shared() -> &'static Shared {
    static S: OnceLock<(tempfile::TempDir, Shared)> = OnceLock::new();
    &S.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("disk.img");
        vhd::create::create_raw(&path, 1 << 20).expect("raw disk");
        let options = vhd::DiskOptions::default().cache(vhd::CacheMode::Cached);
        let device = vhd::open_as(&path, vhd::Format::Raw, &options).expect("open disk");
        let export = |name: &str, read_only| {
            Arc::new(Export {
                name: name.into(),
                description: "fuzz".into(),
                device: Arc::clone(&device),
                read_only,
            })
        };
        let shared = Shared {
            exports: vec![export("", false), export("ro", true)],
            stop: Default::default(),
            stop_event: EventFd::new().expect("eventfd"),
            handshake_timeout: Duration::from_secs(5),
            conns: Connections::new("NBD fuzz", "nbd-conn", 1),
        };
        (dir, shared)
    })
    .1
}

/// A client that negotiates structured replies, base:allocation and GO for
/// the default export: what the fuzzer's bytes follow when the first
/// input byte is odd, so it reaches transmission at once.
fn canned_handshake() -> Vec<u8> {
    let mut out = (client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    let mut option = |code, data: &[u8]| {
        out.extend_from_slice(OptionHeader::new(code, data.len() as u32).as_bytes());
        out.extend_from_slice(data);
    };
    option(opt::STRUCTURED_REPLY, &[]);
    let mut meta = 0u32.to_be_bytes().to_vec();
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    option(opt::SET_META_CONTEXT, &meta);
    option(opt::GO, &[0, 0, 0, 0, 0, 0]);
    debug_assert_eq!(&out[4..12], &IHAVEOPT.to_be_bytes());
    out
}

/// Runs one server session on `data` as the client's bytes.
pub fn server_session(data: &[u8]) {
    let _ = session_output(data);
}

/// Runs a session (the canned handshake first when the first byte is odd)
/// and returns everything the server sent.
fn session_output(data: &[u8]) -> Vec<u8> {
    let Ok((client, server)) = Stream::pair() else {
        return Vec::new();
    };
    let mut input = Vec::new();
    if data.first().is_some_and(|b| b & 1 == 1) {
        input.extend(canned_handshake());
    }
    input.extend_from_slice(data.get(1..).unwrap_or_default());
    let client = Arc::new(client);
    let writer = {
        let client = Arc::clone(&client);
        std::thread::spawn(move || {
            let _ = client.write_all(&input);
            client.shutdown(std::net::Shutdown::Write);
        })
    };
    let reader = {
        let client = Arc::clone(&client);
        std::thread::spawn(move || {
            // Drain replies so the server never blocks on a full socket.
            let mut out = Vec::new();
            let mut buf = [0u8; 64 * 1024];
            while let Ok(n @ 1..) = client.read(&mut buf) {
                out.extend_from_slice(&buf[..n]);
            }
            out
        })
    };
    super::connection(shared(), &server);
    drop(server);
    let _ = writer.join();
    reader.join().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhd::nbd::wire::{RequestHeader, STRUCTURED_REPLY_MAGIC, chunk, cmd};

    /// The harness reaches transmission: a READ after the canned
    /// handshake is answered with one data chunk.
    #[test]
    fn the_canned_handshake_reaches_transmission() {
        let mut data = vec![1u8];
        data.extend_from_slice(RequestHeader::new(cmd::READ, 0, 7, 4096, 512).as_bytes());
        data.extend_from_slice(RequestHeader::new(cmd::DISC, 0, 8, 0, 0).as_bytes());
        let out = session_output(&data);
        let reply = &out[out.len() - (20 + 8 + 512)..];
        assert_eq!(&reply[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&reply[6..8], &chunk::OFFSET_DATA.to_be_bytes());
        assert_eq!(&reply[8..16], &7u64.to_be_bytes());
        assert_eq!(&reply[20..28], &4096u64.to_be_bytes());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]
        #[test]
        fn arbitrary_client_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            server_session(&data);
        }

        #[test]
        fn arbitrary_request_headers_get_a_verdict(
            header in proptest::array::uniform28(proptest::prelude::any::<u8>()),
            structured in proptest::prelude::any::<bool>(),
            read_only in proptest::prelude::any::<bool>(),
        ) {
            use zerocopy::FromBytes;
            let h = vhd::nbd::wire::RequestHeader::read_from_bytes(&header).unwrap();
            let limits = super::super::request::Limits {
                size: 1 << 20,
                block: 512,
                read_only,
                structured,
                allocation: structured,
                trim: !read_only,
            };
            let _ = super::super::request::check(&h, &limits);
        }
    }
}
