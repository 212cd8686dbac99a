//! vspa's NBD server: exports block devices (images, or the devices of
//! LUNs) to any NBD client (qemu, libnbd's nbdinfo/nbdcopy, fio's `nbd`
//! engine, another vspa) over TCP and Unix sockets.
//!
//! # Place in the data path
//! ```text
//! listener thread ── accept ──▶ connection thread (one per client)
//!     handshake   fixed newstyle: LIST, INFO, GO, EXPORT_NAME, ABORT,
//!                 STRUCTURED_REPLY, LIST/SET_META_CONTEXT base:allocation
//!     conn        one IoQueue: RECV requests, BlockDevice::submit (the same
//!                 interface and io_uring queues the storage VSP uses),
//!                 SENDMSG replies, all in one io_uring_enter per pass
//! ```
//! WRITE payloads go to the device from the receive buffer they arrived
//! in and READ data is sent from the buffer it was read into: no copies.
//! Each connection's memory is bounded (128 requests in flight, 80 MiB of
//! buffers, 32 MiB per request; a larger WRITE gets `NBD_EOVERFLOW` and a
//! disconnect, a larger READ `NBD_EOVERFLOW`, or `NBD_EINVAL` without
//! structured replies).
//!
//! # Protocol
//! Transmission flags: FLUSH, FUA (a write, then a flush of the device,
//! before the reply), TRIM where the device can discard, WRITE_ZEROES
//! (a hole punch where the device's discard reads back zeros and the
//! client did not ask for NO_HOLE; else writes of zeros), FAST_ZERO (fails
//! fast with `NBD_ENOTSUP` when zeros would have to be written), CACHE (a
//! read into a scratch buffer, which warms the page cache), DF, and
//! BLOCK_STATUS with `base:allocation` from [`BlockDevice::allocation`]
//! (unallocated VHD blocks and file holes are `HOLE|ZERO`).
//! `CAN_MULTI_CONN` is set for every export: all connections of an export
//! share one device instance (one set of open files, one VHD metadata
//! state), and a FLUSH is an fdatasync of those files after writing the
//! shared metadata, so it covers every write any connection had completed
//! (replied to) before; that is the flag's promise.
//! Minimum block size is the device's (512, 2048 for ISO media); a client
//! that did not ask for block sizes and sends unaligned requests gets
//! `NBD_EINVAL`, as the spec allows. TLS is not offered (`STARTTLS` gets
//! `NBD_REP_ERR_POLICY`): serve on Unix sockets or trusted networks.
//!
//! # Configuration
//! [`config::NbdSpec`] is the `[[nbd]]` table of vspa's configuration file
//! (see [`config`] for the TOML and [`config::validate`]).
//!
//! [`BlockDevice::allocation`]: vhd::BlockDevice::allocation

pub mod buffers;
pub mod config;
#[allow(unsafe_code)]
mod conn;
pub mod fuzz;
mod handshake;
pub mod request;

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vhd::BlockDevice;
use vhd::nbd::Stream;
use vhd::nbd::wire::flag;
use vmbus::event::{EventFd, poll_readable};
use vspa_threads::ThreadKind;
use vspa_threads::conns::Connections;

/// One export as configured.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// Export name clients ask for (the empty name selects the first
    /// export unless one is named "").
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
    /// Serve read-only even if the device is writable.
    pub read_only: bool,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
}

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A TCP address (port 0 picks a free port).
    Tcp(SocketAddr),
    /// A Unix socket path (a stale socket there is replaced).
    Unix(PathBuf),
}

/// A server to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub exports: Vec<ExportConfig>,
    pub listen: Vec<Listen>,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
    /// Deadline of each handshake read and write.
    pub handshake_timeout: Duration,
}

impl ServerConfig {
    pub fn new(exports: Vec<ExportConfig>, listen: Vec<Listen>) -> ServerConfig {
        ServerConfig {
            exports,
            listen,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("NBD server: {0}")]
    Config(String),
    #[error("NBD server: cannot listen on {what}: {source}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// An export being served.
#[derive(Debug)]
pub(crate) struct Export {
    pub name: String,
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
    pub read_only: bool,
}

impl Export {
    pub fn size(&self) -> u64 {
        self.device.info().size()
    }

    pub fn block_size(&self) -> u32 {
        self.device.info().block_size
    }

    pub fn can_trim(&self) -> bool {
        !self.read_only && self.device.info().supports_discard
    }

    /// Transmission flags for a connection (DF needs structured replies).
    pub fn flags(&self, structured: bool) -> u16 {
        let mut f = flag::HAS_FLAGS
            | flag::SEND_FLUSH
            | flag::SEND_FUA
            | flag::CAN_MULTI_CONN
            | flag::SEND_CACHE;
        if self.read_only {
            f |= flag::READ_ONLY;
        } else {
            f |= flag::SEND_WRITE_ZEROES | flag::SEND_FAST_ZERO;
        }
        if self.can_trim() {
            f |= flag::SEND_TRIM;
        }
        if structured {
            f |= flag::SEND_DF;
        }
        f
    }
}

#[derive(Debug)]
struct Shared {
    exports: Vec<Arc<Export>>,
    stop: AtomicBool,
    stop_event: EventFd,
    handshake_timeout: Duration,
    /// Connections being served (at most the configured number; more are
    /// refused), so `stop` can end them.
    conns: Arc<Connections>,
}

/// A running NBD server; stopped on drop.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    listeners: Vec<std::thread::JoinHandle<()>>,
    tcp: Option<SocketAddr>,
    unix: Option<PathBuf>,
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Server {
    /// Binds every listener and starts serving.
    pub fn start(config: ServerConfig) -> Result<Server, ServerError> {
        if config.exports.is_empty() {
            return Err(ServerError::Config("no exports".into()));
        }
        if config.listen.is_empty() {
            return Err(ServerError::Config("no listen address".into()));
        }
        let mut names = std::collections::HashSet::new();
        for e in &config.exports {
            if !names.insert(e.name.as_str()) {
                return Err(ServerError::Config(format!(
                    "export {:?} defined twice",
                    e.name
                )));
            }
            config::check_name(&e.name).map_err(ServerError::Config)?;
        }
        let exports = config
            .exports
            .into_iter()
            .map(|e| {
                Arc::new(Export {
                    read_only: e.read_only || e.device.info().read_only,
                    name: e.name,
                    description: e.description,
                    device: e.device,
                })
            })
            .collect();
        let listen_err = |what: String| move |source| ServerError::Listen { what, source };
        let shared = Arc::new(Shared {
            exports,
            stop: AtomicBool::new(false),
            stop_event: EventFd::new().map_err(listen_err("an eventfd".into()))?,
            handshake_timeout: config.handshake_timeout,
            conns: Connections::new("NBD server", "nbd-conn", config.max_connections.max(1)),
        });
        let mut server = Server {
            shared,
            listeners: Vec::new(),
            tcp: None,
            unix: None,
        };
        for l in &config.listen {
            let listener = match l {
                Listen::Tcp(addr) => {
                    let t = TcpListener::bind(addr).map_err(listen_err(addr.to_string()))?;
                    server.tcp = t.local_addr().ok();
                    Listener::Tcp(t)
                }
                Listen::Unix(path) => {
                    remove_stale_socket(path);
                    let u =
                        UnixListener::bind(path).map_err(listen_err(path.display().to_string()))?;
                    server.unix = Some(path.clone());
                    Listener::Unix(u)
                }
            };
            let shared = Arc::clone(&server.shared);
            let thread = vspa_threads::spawn("nbd-listen", ThreadKind::NbdListener, move || {
                accept_loop(&shared, listener)
            })
            .map_err(listen_err("a listener thread".into()))?;
            server.listeners.push(thread);
        }
        Ok(server)
    }

    /// The bound TCP address (with the port picked for port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp
    }

    /// The Unix socket path.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_deref()
    }

    /// Connections being served now.
    pub fn connections(&self) -> usize {
        self.shared.conns.len()
    }

    /// Stops listening, lets connections finish the requests they have
    /// (their read side is shut, so no new ones arrive), and after
    /// `grace` cuts off the ones that still have not ended.
    pub fn stop(mut self, grace: Duration) {
        self.shutdown(grace);
    }

    fn shutdown(&mut self, grace: Duration) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.stop_event.signal();
        for t in self.listeners.drain(..) {
            let _ = t.join();
        }
        if let Some(path) = self.unix.take() {
            let _ = std::fs::remove_file(path);
        }
        self.shared.conns.close_and_wait(grace);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown(Duration::from_secs(5));
    }
}

/// Replaces a socket left by an earlier run (never any other file).
fn remove_stale_socket(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: Listener) {
    let fd = match &listener {
        Listener::Tcp(t) => t.as_fd(),
        Listener::Unix(u) => u.as_fd(),
    };
    loop {
        let [incoming, stop] = poll_readable([fd, shared.stop_event.as_fd()], None);
        if stop || shared.stop.load(Ordering::Acquire) {
            return;
        }
        if !incoming {
            continue;
        }
        let accepted = match &listener {
            Listener::Tcp(t) => t.accept().and_then(|(s, _)| Stream::from_tcp(s)),
            Listener::Unix(u) => u.accept().map(|(s, _)| Stream::from(s)),
        };
        match accepted {
            Ok(stream) => admit(shared, stream),
            Err(e) => {
                tracing::warn!("NBD accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Starts a connection thread, unless the server is full (then the
/// client is refused: closed at once).
fn admit(shared: &Arc<Shared>, stream: Stream) {
    let worker = Arc::clone(shared);
    shared
        .conns
        .try_spawn(ThreadKind::NbdConnection, stream, move |s| {
            connection(&worker, s)
        });
}

/// One client, from greeting to close.
fn connection(shared: &Shared, stream: &Stream) {
    if stream.set_timeout(Some(shared.handshake_timeout)).is_err() {
        return;
    }
    let session = match handshake::negotiate(stream, &shared.exports) {
        Ok(session) => session,
        Err(handshake::HandshakeError::Aborted) => return,
        Err(e) => {
            tracing::info!("NBD handshake ended: {e}");
            return;
        }
    };
    if stream.set_timeout(None).is_err() {
        return;
    }
    tracing::debug!(
        export = %session.export.name,
        structured = session.structured,
        "NBD client entered transmission"
    );
    if let Err(why) = conn::serve(stream, &session) {
        tracing::info!(export = %session.export.name, "NBD connection closed: {why}");
    }
}
