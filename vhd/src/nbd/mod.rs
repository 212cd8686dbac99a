//! NBD (the Network Block Device protocol, NetworkBlockDevice/nbd
//! `doc/proto.md`): vspa's client, which makes an export of any NBD server
//! (nbdkit, qemu-nbd, another vspa) a [`BlockDevice`], and the wire format
//! the client and vspa's server (`storage::nbd`) share.
//!
//! # Place in the data path
//! ```text
//! storage VSP worker --Request{iovecs into guest memory}--> NbdClient::submit
//!     IoQueue slot + one record per NBD request (split at the max payload)
//!     record index --lock-free queue--> connection thread (one per client)
//!         sendmsg: 28-byte header + the guest's pages (WRITE)
//!         recvmsg: reply header, then READ data straight into guest pages
//!     IORING_OP_MSG_RING --CQE into the worker's ring--> IoQueue::reap
//! ```
//! The worker never blocks on the network and needs no new wake-up: the
//! connection thread's completions arrive in the ring the worker already
//! sleeps on. See [`client`] for the reconnect rule.
//!
//! - [`wire`]: magics, codes and the fixed-size messages (zero-copy views).
//! - [`uri`]: `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`.
//! - [`negotiate`]: the client's fixed newstyle handshake.
//! - [`reply`]: the client's decoder of simple and structured replies.
//! - [`stream`]: the socket both ends use.
//! - [`image`]: `vspa image info` and `convert` on NBD URIs.
//! - [`fuzzing`]: the reply decoder over arbitrary bytes.
//!
//! TLS is not implemented (`nbds://` URIs are refused): exports are meant
//! for Unix sockets and trusted storage networks.
//!
//! [`BlockDevice`]: crate::BlockDevice

#[allow(unsafe_code)]
pub mod client;
#[allow(unsafe_code)]
pub mod fuzzing;
pub mod image;
pub mod negotiate;
#[allow(unsafe_code)]
pub mod reply;
#[allow(unsafe_code)]
pub mod stream;
pub mod uri;
pub mod wire;

pub use client::{NbdClient, NbdOptions};
pub use negotiate::ExportInfo;
pub use stream::Stream;
pub use uri::{Endpoint, NbdUri, is_uri};

/// Why an NBD connection or handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("bad NBD URI {0}")]
    Uri(String),
    #[error("NBD connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD protocol violation by the peer: {0}")]
    Protocol(String),
    #[error("NBD server refused option {option} (reply {reply:#x}){}", if message.is_empty() { String::new() } else { format!(": {message}") })]
    Refused {
        option: u32,
        reply: u32,
        message: String,
    },
    #[error("unsupported NBD export: {0}")]
    Unsupported(String),
}
