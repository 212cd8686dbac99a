//! Hosted mode: VMBus between processes.
//!
//! A client process plays the guest. It connects to `vspa serve`'s Unix
//! socket (SOCK_SEQPACKET) and sends channel messages byte for byte as a
//! guest would post them. Its "guest memory" is a sealed memfd attached to
//! INITIATE_CONTACT; GPAs are offsets in that file. Each OPENCHANNEL carries
//! two eventfds: the first is rung by the client (the host's doorbell), the
//! second by the host (the client's interrupt). From then on the two sides
//! talk over rings in the shared memory exactly as guest and host do.
//!
//! Each client connection gets its own control thread and its own
//! [`ChannelServer`]: a client that misbehaves or dies loses only its own
//! channels.
//!
//! Admission ([`Admission`]): the socket's file mode and owner decide who
//! may connect at all; the peer's credentials (SO_PEERCRED, fixed at
//! connect time) are checked against the allowed uids and gids right after
//! accept, before a single message is read; connections beyond the limit
//! and memory larger than the limit are refused. Refusals and violations
//! (opening a channel that is not offered to this peer) are logged with the
//! label (the tenant) and the peer's credentials, and counted.

pub mod client;
pub mod connections;
pub mod socket;

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::event::{EventFd, poll_readable};
use crate::memory::SharedMemory;
use crate::server::{
    ChannelServer, ChannelSignals, Registry, ServerError, Transport, TransportError,
};
use crate::worker::{ServiceThread, StopToken};
use socket::{PeerCred, RECV_BUFFER, Received};

/// Who may use a hosted-mode socket, and how much.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// Names the socket's users in logs (the tenant).
    pub label: String,
    /// Peer uids allowed to connect (empty: any peer that can open the
    /// socket file).
    pub allow_uids: Vec<u32>,
    /// Peer primary gids allowed to connect (empty: any). With both lists
    /// set, a peer matching either is allowed.
    pub allow_gids: Vec<u32>,
    /// Connections at once.
    pub max_connections: Option<usize>,
    /// Largest guest memory (memfd) a connection may share.
    pub max_memory_bytes: Option<u64>,
    /// Mode of the socket file (default 0o600).
    pub socket_mode: Option<u32>,
    /// Owner (uid, gid) of the socket file.
    pub socket_owner: Option<(u32, u32)>,
    pub counters: Arc<AdmissionCounters>,
}

/// What happened at a socket, for reports and metrics.
#[derive(Debug, Default)]
pub struct AdmissionCounters {
    /// Connections now.
    pub connected: AtomicU64,
    pub accepted: AtomicU64,
    /// Peers whose credentials are not allowed.
    pub refused_credentials: AtomicU64,
    /// Connections refused by `max_connections` or memory by
    /// `max_memory_bytes`.
    pub limit_hits: AtomicU64,
    /// Requests for channels not offered to the peer.
    pub violations: Arc<AtomicU64>,
    /// The clients connected now.
    pub connections: connections::Connections,
}

impl Admission {
    fn allows(&self, cred: &PeerCred) -> bool {
        let open = self.allow_uids.is_empty() && self.allow_gids.is_empty();
        open || self.allow_uids.contains(&cred.uid) || self.allow_gids.contains(&cred.gid)
    }
}

/// The hosted-mode transport of one client connection.
#[derive(Debug)]
pub struct SocketTransport {
    sock: Arc<OwnedFd>,
    max_memory: Option<u64>,
    counters: Arc<AdmissionCounters>,
}

impl Transport for SocketTransport {
    fn send(&mut self, msg: &[u8]) -> Result<(), TransportError> {
        Ok(socket::send(&self.sock, msg, &[])?)
    }

    fn contact_memory(
        &mut self,
        attachments: &mut Vec<OwnedFd>,
    ) -> Result<SharedMemory, TransportError> {
        if attachments.len() != 1 {
            return Err(TransportError::Peer(format!(
                "INITIATE_CONTACT with {} descriptors, expected the memory fd",
                attachments.len()
            )));
        }
        let fd = attachments.remove(0);
        let memory =
            SharedMemory::from_memfd(fd).map_err(|e| TransportError::Peer(e.to_string()))?;
        match self.max_memory {
            Some(max) if memory.size() > max => {
                self.counters.limit_hits.fetch_add(1, Ordering::Relaxed);
                Err(TransportError::Peer(format!(
                    "guest memory of {} bytes is over this socket's limit of {max}",
                    memory.size()
                )))
            }
            _ => Ok(memory),
        }
    }

    fn channel_signals(
        &mut self,
        _relid: u32,
        _connection_id: u32,
        _target_vp: u32,
        attachments: &mut Vec<OwnedFd>,
    ) -> Result<ChannelSignals, TransportError> {
        if attachments.len() != 2 {
            return Err(TransportError::Peer(format!(
                "OPENCHANNEL with {} descriptors, expected two eventfds",
                attachments.len()
            )));
        }
        let notify = EventFd::from_fd(attachments.remove(1))?;
        let doorbell = EventFd::from_fd(attachments.remove(0))?;
        Ok(ChannelSignals {
            doorbell: Arc::new(doorbell),
            notify: Arc::new(notify),
        })
    }
}

/// A running hosted-mode server.
#[derive(Debug)]
pub struct HostedServer {
    path: PathBuf,
    thread: ServiceThread,
}

impl HostedServer {
    /// Listens on `path` and serves every device of `registry` to each client
    /// that connects, until stopped.
    pub fn start(path: &Path, registry: Registry) -> std::io::Result<Self> {
        Self::start_with(path, registry, Admission::default())
    }

    /// As [`HostedServer::start`], admitting clients by `admission`.
    pub fn start_with(
        path: &Path,
        registry: Registry,
        admission: Admission,
    ) -> std::io::Result<Self> {
        let listener = socket::listen(path)?;
        socket::set_access(
            path,
            admission.socket_mode.unwrap_or(0o600),
            admission.socket_owner,
        )?;
        let stop = StopToken::new()?;
        let token = stop.clone();
        let thread = std::thread::Builder::new()
            .name("vmbus-accept".into())
            .spawn(move || {
                vspa_threads::enter(crate::ThreadKind::Acceptor);
                accept_loop(listener, registry, admission, token)
            })?;
        Ok(HostedServer {
            path: path.to_path_buf(),
            thread: ServiceThread::new(stop, thread, Some(path.to_path_buf())),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting clients (connected clients keep running until they
    /// disconnect) and removes the socket file.
    pub fn stop(mut self) {
        self.thread.stop();
    }

    /// Blocks until the accept loop ends (never, unless stopped).
    pub fn wait(mut self) {
        self.thread.wait();
    }
}

fn accept_loop(listener: OwnedFd, registry: Registry, admission: Admission, stop: StopToken) {
    let admission = Arc::new(admission);
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    while !stop.is_stopped() {
        let [ready, _] = poll_readable(
            [listener.as_fd(), stop.event().as_fd()],
            Some(Duration::from_millis(500)),
        );
        clients.retain(|c| !c.is_finished());
        if !ready {
            continue;
        }
        let sock = match socket::accept(&listener) {
            Ok(sock) => sock,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                continue;
            }
        };
        if let Some(client) = admit(&admission, sock, clients.len(), &registry) {
            clients.push(client);
        }
    }
}

/// Checks a new connection against `admission` before reading anything
/// from it, and starts its client thread.
fn admit(
    admission: &Arc<Admission>,
    sock: OwnedFd,
    connected: usize,
    registry: &Registry,
) -> Option<JoinHandle<()>> {
    let c = &admission.counters;
    let label = admission.label.as_str();
    let cred = match socket::peer_cred(&sock) {
        Ok(cred) => cred,
        Err(e) => {
            tracing::warn!(
                tenant = label,
                "no peer credentials, connection closed: {e}"
            );
            return None;
        }
    };
    if !admission.allows(&cred) {
        c.refused_credentials.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(tenant = label, peer = %cred, "peer not allowed on this socket, connection closed");
        return None;
    }
    if admission
        .max_connections
        .is_some_and(|max| connected >= max)
    {
        c.limit_hits.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(tenant = label, peer = %cred, "connection limit reached, connection closed");
        return None;
    }
    let (registry, admission2) = (registry.clone(), admission.clone());
    let spawned = std::thread::Builder::new()
        .name("vmbus-client".into())
        .spawn(move || {
            vspa_threads::enter(crate::ThreadKind::Client);
            let c = &admission2.counters;
            c.connected.fetch_add(1, Ordering::Relaxed);
            c.accepted.fetch_add(1, Ordering::Relaxed);
            serve_admitted(sock, registry, &admission2, cred);
            c.connected.fetch_sub(1, Ordering::Relaxed);
        });
    match spawned {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::error!("cannot start client thread: {e}");
            None
        }
    }
}

/// Serves one client until it disconnects or breaks the transport rules.
pub fn serve_client(sock: OwnedFd, registry: Registry) {
    let cred = PeerCred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    serve_admitted(sock, registry, &Admission::default(), cred);
}

fn serve_admitted(sock: OwnedFd, registry: Registry, admission: &Admission, cred: PeerCred) {
    let sock = Arc::new(sock);
    let transport = SocketTransport {
        sock: sock.clone(),
        max_memory: admission.max_memory_bytes,
        counters: admission.counters.clone(),
    };
    let mut server = match ChannelServer::new(Box::new(transport), registry) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot create channel server: {e}");
            return;
        }
    };
    server.set_peer_label(format!("tenant {:?} {cred}", admission.label));
    server.set_violation_counter(admission.counters.violations.clone());
    let wake = server.wake_event().clone();
    let clients = &admission.counters.connections;
    let id = clients.add(cred);
    let mut buf = vec![0u8; RECV_BUFFER];
    let result: Result<(), ServerError> = loop {
        let [msg_ready, req_ready] = poll_readable([sock.as_fd(), wake.as_fd()], None);
        if req_ready && let Err(e) = server.handle_requests() {
            break Err(e);
        }
        if !msg_ready {
            clients.update(id, server.version(), server.channel_summary());
            continue;
        }
        match socket::recv(&sock, &mut buf) {
            Ok(Received::Message { len, fds }) => {
                if let Err(e) = server.handle_message(&buf[..len], fds) {
                    break Err(e);
                }
            }
            Ok(Received::Closed) => break Ok(()),
            Err(e) => break Err(ServerError::Transport(TransportError::Io(e))),
        }
        clients.update(id, server.version(), server.channel_summary());
    };
    clients.remove(id);
    match result {
        Ok(()) => tracing::info!(tenant = admission.label, peer = %cred, "client disconnected"),
        Err(e) => tracing::warn!(tenant = admission.label, peer = %cred, "dropping client: {e}"),
    }
    server.shutdown();
}

/// Raw fd helper for tests that hand-craft attachments.
pub fn raw_fds(fds: &[&dyn AsFd]) -> Vec<RawFd> {
    use std::os::fd::AsRawFd;
    fds.iter().map(|f| f.as_fd().as_raw_fd()).collect()
}
