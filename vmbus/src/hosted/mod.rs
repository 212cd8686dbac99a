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

pub mod client;
pub mod socket;

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::event::{EventFd, poll_readable};
use crate::memory::SharedMemory;
use crate::server::{
    ChannelServer, ChannelSignals, Registry, ServerError, Transport, TransportError,
};
use socket::{RECV_BUFFER, Received};

/// The hosted-mode transport of one client connection.
#[derive(Debug)]
pub struct SocketTransport {
    sock: Arc<OwnedFd>,
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
        SharedMemory::from_memfd(fd).map_err(|e| TransportError::Peer(e.to_string()))
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
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl HostedServer {
    /// Listens on `path` and serves every device of `registry` to each client
    /// that connects, until stopped.
    pub fn start(path: &Path, registry: Registry) -> std::io::Result<Self> {
        let listener = socket::listen(path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(EventFd::new()?);
        let (s, w) = (stop.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name("vmbus-accept".into())
            .spawn(move || {
                vspa_threads::enter(crate::ThreadKind::Acceptor);
                accept_loop(listener, registry, s, w)
            })?;
        Ok(HostedServer {
            path: path.to_path_buf(),
            stop,
            wake,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stops accepting clients (connected clients keep running until they
    /// disconnect) and removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.wake.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }

    /// Blocks until the accept loop ends (never, unless stopped).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for HostedServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn accept_loop(listener: OwnedFd, registry: Registry, stop: Arc<AtomicBool>, wake: Arc<EventFd>) {
    let mut clients: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let [ready, _] = poll_readable(
            [listener.as_fd(), wake.as_fd()],
            Some(Duration::from_millis(500)),
        );
        clients.retain(|c| !c.is_finished());
        if !ready {
            continue;
        }
        match socket::accept(&listener) {
            Ok(sock) => {
                let registry = registry.clone();
                match std::thread::Builder::new()
                    .name("vmbus-client".into())
                    .spawn(move || {
                        vspa_threads::enter(crate::ThreadKind::Client);
                        serve_client(sock, registry)
                    }) {
                    Ok(h) => clients.push(h),
                    Err(e) => tracing::error!("cannot start client thread: {e}"),
                }
            }
            Err(e) => tracing::warn!("accept failed: {e}"),
        }
    }
}

/// Serves one client until it disconnects or breaks the transport rules.
pub fn serve_client(sock: OwnedFd, registry: Registry) {
    let sock = Arc::new(sock);
    let transport = SocketTransport { sock: sock.clone() };
    let mut server = match ChannelServer::new(Box::new(transport), registry) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot create channel server: {e}");
            return;
        }
    };
    let wake = server.wake_event().clone();
    let mut buf = vec![0u8; RECV_BUFFER];
    let result: Result<(), ServerError> = loop {
        let [msg_ready, req_ready] = poll_readable([sock.as_fd(), wake.as_fd()], None);
        if req_ready && let Err(e) = server.handle_requests() {
            break Err(e);
        }
        if !msg_ready {
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
    };
    match result {
        Ok(()) => tracing::info!("client disconnected"),
        Err(e) => tracing::warn!("dropping client: {e}"),
    }
    server.shutdown();
}

/// Raw fd helper for tests that hand-craft attachments.
pub fn raw_fds(fds: &[&dyn AsFd]) -> Vec<RawFd> {
    use std::os::fd::AsRawFd;
    fds.iter().map(|f| f.as_fd().as_raw_fd()).collect()
}
