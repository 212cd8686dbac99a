//! The control API: HTTP/1.1 with JSON bodies on a Unix socket
//! (`vspa serve --api-socket PATH`, `vspa run --api-socket PATH`), the
//! management plane of a running appliance. `vspa ctl` is its client;
//! docs/api.md lists every endpoint with examples.
//!
//! ```text
//!  vspa ctl ──▶ api socket ──▶ control thread (accept) ──▶ a thread per connection (read, route)
//!                                   │ lock per request
//!                                   ▼
//!                              Appliance ──▶ change(Override) ──▶ the reload's plans
//!                                        ──▶ views (tenants, clients, devices, ports)
//!                                        ──▶ IcHandle (waits without the lock)
//! ```
//!
//! The control thread accepts; each connection gets a thread of its own
//! (at most [`MAX_CONNECTIONS`] at once; more wait to be accepted), so a
//! client that is slow to send, or a request that waits on a guest, holds
//! up nobody else. Each connection is bounded in size ([`http::MAX_HEAD`],
//! [`http::MAX_BODY`]) and time ([`http::REQUEST_TIMEOUT`]); requests
//! that change the appliance take its lock one at a time. None of these
//! threads touches a ring or a worker, so the data path does not see them.
//! Errors are `{"error", "code"}` with the status that fits, and a request
//! that fails changes nothing.
//!
//! Areas register their endpoints from their own modules: one line in
//! [`AREAS`] per area.

mod checkpoint;
pub mod error;
pub mod http;
mod ic;
mod network;
pub mod router;
mod storage;
mod system;
mod tenants;

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vmbus::event::poll_readable;
use vmbus::worker::{ServiceThread, StopToken};

pub use error::ApiError;
use http::{ReadError, Response};
pub use router::{Call, Ctx, Router};

use crate::Appliance;
use crate::conns::Deadline;
use vspa_threads::conns::Connections;

/// Every area's `routes` function: an area adds its endpoints with one
/// line here.
pub const AREAS: &[fn(&mut Router)] = &[
    system::routes,
    tenants::routes,
    storage::routes,
    network::routes,
    ic::routes,
    checkpoint::routes,
];

/// The router with every area's endpoints.
pub fn router() -> Router {
    let mut r = Router::default();
    for area in AREAS {
        area(&mut r);
    }
    r
}

/// Where and how the API listens.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    pub path: PathBuf,
    /// Mode of the socket file (default 0600: root only).
    pub mode: u32,
    /// Owner (uid, gid) of the socket file.
    pub owner: Option<(u32, u32)>,
}

/// The running control thread; [`ApiServer::stop`] (or drop) ends it and
/// removes the socket file.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    thread: ServiceThread,
}

impl ApiServer {
    /// Listens on `options.path` and serves requests against `appliance`.
    pub fn start(options: &ApiOptions, appliance: Arc<Mutex<Appliance>>) -> std::io::Result<Self> {
        let path = &options.path;
        clear_stale(path)?;
        let listener = UnixListener::bind(path)?;
        vmbus::hosted::socket::set_access(path, options.mode, options.owner)?;
        let stop = StopToken::new()?;
        let token = stop.clone();
        let ctx = Ctx::new(appliance);
        let kind = vspa_threads::ThreadKind::Api;
        let thread = vspa_threads::spawn("vspa-api", kind, move || serve(listener, ctx, token))?;
        tracing::info!("control API listening on {}", path.display());
        Ok(ApiServer {
            path: path.clone(),
            thread: ServiceThread::new(stop, thread, Some(path.clone())),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stop(mut self) {
        self.thread.stop();
    }
}

/// Removes a socket file left by a vspa that is gone; a live socket or a
/// file of another kind at `path` is an error, never deleted.
fn clear_stale(path: &Path) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    if UnixStream::connect(path).is_ok() {
        return Err(Error::new(
            ErrorKind::AddrInUse,
            format!("{} is being served by another process", path.display()),
        ));
    }
    vmbus::hosted::socket::clear_socket_path(path)
}

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;

fn serve(listener: UnixListener, ctx: Ctx, stop: StopToken) {
    let router = Arc::new(router());
    let conns = Connections::new("control API", "api-conn", MAX_CONNECTIONS);
    while !stop.is_stopped() {
        if !conns.wait_for_room(std::time::Duration::from_millis(100)) {
            continue;
        }
        let [ready, _] = poll_readable([listener.as_fd(), stop.event().as_fd()], None);
        if !ready {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let (router, ctx) = (Arc::clone(&router), ctx.clone());
                let kind = vspa_threads::ThreadKind::Api;
                conns.spawn(kind, stream, move |s| handle(&router, &ctx, s));
            }
            Err(e) => tracing::warn!("control API: accept failed: {e}"),
        }
    }
    conns.close_and_wait(http::REQUEST_TIMEOUT);
}

/// Serves one connection: one request, one response.
fn handle(router: &Router, ctx: &Ctx, stream: &UnixStream) {
    let Ok(mut conn) = Deadline::start(stream, http::REQUEST_TIMEOUT) else {
        return;
    };
    let resp = match http::read_request(&mut conn) {
        Ok(req) => {
            let resp = router.dispatch(ctx, &req);
            log(stream, &req, &resp);
            resp
        }
        Err(ReadError::Closed) => return,
        Err(ReadError::Bad(e)) => {
            tracing::info!("control API: refused request: {e}");
            Response::error(&e)
        }
    };
    if let Err(e) = http::write_response(&mut conn, &resp) {
        tracing::debug!("control API: writing the response: {e}");
    }
}

fn log(stream: &UnixStream, req: &http::Request, resp: &Response) {
    let peer = stream
        .as_fd()
        .try_clone_to_owned()
        .ok()
        .and_then(|fd| vmbus::hosted::socket::peer_cred(&fd).ok())
        .map(|c| c.to_string())
        .unwrap_or_default();
    let changes = req.method != "GET";
    if changes {
        tracing::info!(
            peer,
            status = resp.status,
            "control API: {} {}",
            req.method,
            req.path
        );
    } else {
        tracing::debug!(
            peer,
            status = resp.status,
            "control API: {} {}",
            req.method,
            req.path
        );
    }
}

/// A GUID as text.
pub(crate) fn guid(g: &vmbus::Guid) -> String {
    g.to_string()
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stale_sockets_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        assert!(clear_stale(&file).is_err());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        let sock = dir.path().join("sock");
        let live = UnixListener::bind(&sock).unwrap();
        assert!(clear_stale(&sock).is_err(), "a live socket");
        drop(live);
        clear_stale(&sock).unwrap();
        assert!(!sock.exists());
        clear_stale(&sock).unwrap();
    }
}
