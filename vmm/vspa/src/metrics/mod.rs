//! Prometheus metrics for `vspa serve --metrics ADDR`: a control-plane
//! thread accepts on a TCP address (loopback by default) or a Unix socket
//! and answers `GET /metrics` over HTTP/1.1, each connection on a thread of
//! its own (a few at once, [`crate::conns`]), in the text exposition
//! format 0.0.4.
//!
//! The data path only keeps counters (per worker, relaxed atomics only its
//! owner writes: see `vmbus::stats` and `storage::stats`); a scrape locks
//! the appliance (as a reload or the control API does), reads and sums
//! them ([`collect`]) and writes the families ([`exposition`]).

pub mod collect;
pub mod exposition;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmbus::event::{EventFd, poll_readable};
use vmbus::worker::{ServiceThread, StopToken};

use crate::Appliance;
use crate::conns::{Deadline, Timed};
use vspa_threads::conns::Connections;

/// Where metrics are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Why `--metrics` was refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "metrics address {0:?}: expected HOST:PORT (e.g. 127.0.0.1:9464), :PORT, or a Unix socket path"
)]
pub struct BadAddr(String);

impl FromStr for MetricsAddr {
    type Err = BadAddr;

    /// `IP:PORT`, `:PORT` (loopback), or a path with a `/` (Unix).
    fn from_str(s: &str) -> Result<Self, BadAddr> {
        if s.contains('/') {
            return Ok(MetricsAddr::Unix(PathBuf::from(s)));
        }
        let full = match s.strip_prefix(':') {
            Some(port) => format!("127.0.0.1:{port}"),
            None => s.to_string(),
        };
        full.parse()
            .map(MetricsAddr::Tcp)
            .map_err(|_| BadAddr(s.to_string()))
    }
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// The running metrics endpoint; dropping it stops the thread.
#[derive(Debug)]
pub struct MetricsServer {
    local: String,
    /// Held to be dropped: that stops and joins the thread, then removes a
    /// Unix socket's file.
    _thread: ServiceThread,
}

/// Longest request head read.
const MAX_REQUEST: usize = 8 << 10;
/// How long a client may take to send its request (in all), and each
/// write of the answer.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

impl MetricsServer {
    /// Listens on `addr` and serves `appliance`'s metrics.
    pub fn start(addr: &MetricsAddr, appliance: Arc<Mutex<Appliance>>) -> std::io::Result<Self> {
        let socket = match addr {
            MetricsAddr::Unix(path) => Some(path.clone()),
            MetricsAddr::Tcp(_) => None,
        };
        let (listener, local) = match addr {
            MetricsAddr::Tcp(a) => {
                let l = TcpListener::bind(a)?;
                let local = l.local_addr()?.to_string();
                (Listener::Tcp(l), local)
            }
            MetricsAddr::Unix(path) => {
                vmbus::hosted::socket::clear_socket_path(path)?;
                let l = UnixListener::bind(path)?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
                (Listener::Unix(l), path.display().to_string())
            }
        };
        let stop = StopToken::new()?;
        let token = stop.clone();
        let kind = vspa_threads::ThreadKind::Metrics;
        let thread = vspa_threads::spawn("vspa-metrics", kind, move || {
            serve(listener, &appliance, token.event())
        })?;
        tracing::info!("metrics on {local}");
        Ok(MetricsServer {
            local,
            _thread: ServiceThread::new(stop, thread, socket),
        })
    }

    /// The address it listens on (the port bound for `:0`), or its path.
    pub fn local(&self) -> &str {
        &self.local
    }
}

/// Scrapes served at once.
const MAX_CONNECTIONS: usize = 4;

/// Accepts until `stop` is signalled; each connection on its own thread.
fn serve(listener: Listener, appliance: &Arc<Mutex<Appliance>>, stop: &EventFd) {
    let conns = Connections::new("metrics", "metrics-conn", MAX_CONNECTIONS);
    loop {
        if !conns.wait_for_room(Duration::from_millis(100)) {
            continue;
        }
        let [ready, stopped] = match &listener {
            Listener::Tcp(l) => poll_readable([l.as_fd(), stop.as_fd()], None),
            Listener::Unix(l) => poll_readable([l.as_fd(), stop.as_fd()], None),
        };
        if stopped {
            break;
        }
        if !ready {
            continue;
        }
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().map(|(s, _)| spawn(&conns, s, appliance)),
            Listener::Unix(l) => l.accept().map(|(s, _)| spawn(&conns, s, appliance)),
        };
        if let Err(e) = accepted {
            tracing::debug!("metrics accept: {e}");
        }
    }
    conns.close_and_wait(IO_TIMEOUT);
}

/// Answers `s` on a thread of its own, its request within [`IO_TIMEOUT`].
fn spawn<S: Timed>(conns: &Arc<Connections>, s: S, appliance: &Arc<Mutex<Appliance>>)
where
    for<'a> &'a S: Read + Write,
{
    let appliance = Arc::clone(appliance);
    let kind = vspa_threads::ThreadKind::Metrics;
    conns.spawn(kind, s, move |s| {
        let result = Deadline::start(s, IO_TIMEOUT).and_then(|conn| answer(conn, &appliance));
        if let Err(e) = result {
            tracing::debug!("metrics connection: {e}");
        }
    });
}

/// Reads one request and answers it; the connection then closes.
fn answer(mut s: impl Read + Write, appliance: &Mutex<Appliance>) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    let route = loop {
        let n = s.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        match route(&buf[..len]) {
            Some(r) => break r,
            None if len == buf.len() => break Route::Bad,
            None => {}
        }
    };
    let (status, body) = match route {
        Route::Metrics => {
            let text = collect::collect(&vmbus::worker::lock(appliance)).render();
            ("200 OK", text)
        }
        Route::NotFound => ("404 Not Found", "not found: try /metrics\n".into()),
        Route::NotAllowed => ("405 Method Not Allowed", "GET only\n".into()),
        Route::Bad => ("400 Bad Request", "bad request\n".into()),
    };
    let content_type = if status.starts_with("200") {
        exposition::CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.flush()
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    NotAllowed,
    Bad,
}

/// Parses a request head; None while it is incomplete.
fn route(head: &[u8]) -> Option<Route> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) => None,
        Err(_) => Some(Route::Bad),
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            Some(match (req.method, path) {
                (Some("GET"), "/metrics") => Route::Metrics,
                (Some("GET"), _) => Route::NotFound,
                _ => Route::NotAllowed,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_tcp_loopback_or_unix() {
        assert_eq!(
            ":9464".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Tcp("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(
            "[::1]:0".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Tcp("[::1]:0".parse().unwrap())
        );
        assert_eq!(
            "/run/vspa.metrics".parse::<MetricsAddr>().unwrap(),
            MetricsAddr::Unix("/run/vspa.metrics".into())
        );
        assert!("localhost".parse::<MetricsAddr>().is_err());
    }

    #[test]
    fn requests_route_by_method_and_path() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(
            route(b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(Route::Metrics)
        );
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Some(Route::NotFound));
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Route::NotAllowed)
        );
        assert_eq!(route(b"\x00\x01 nonsense\r\n\r\n"), Some(Route::Bad));
    }
}
