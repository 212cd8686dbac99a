//! Connections of the appliance's servers that are not on the data path
//! (the control API, metrics, the NBD server): each served on a thread of
//! its own, a bounded number at once, all of them ended when the server
//! stops. A slow or stalled client then holds up only itself.

use std::collections::HashMap;
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::ThreadKind;

/// A connected stream the server can cut off.
pub trait Stream: Send + Sync + 'static {
    /// Ends the stream's reads, so a thread waiting on them returns (and a
    /// connection finishes the request in hand, then sees the end).
    fn stop_reading(&self);
    /// Ends reads and writes: for connections still open after a grace.
    fn cut_off(&self);
}

/// Both socket types have the same `shutdown`.
macro_rules! socket {
    ($t:ty) => {
        impl Stream for $t {
            fn stop_reading(&self) {
                let _ = self.shutdown(Shutdown::Read);
            }
            fn cut_off(&self) {
                let _ = self.shutdown(Shutdown::Both);
            }
        }
    };
}
socket!(UnixStream);
socket!(TcpStream);

/// The connections one server is serving.
pub struct Connections {
    /// Who serves (for logs).
    server: &'static str,
    /// Name of the connections' threads (at most 15 bytes: the kernel's).
    thread: &'static str,
    max: usize,
    open: Mutex<Open>,
    gone: Condvar,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections")
            .field("server", &self.server)
            .field("max", &self.max)
            .field("open", &lock(&self.open).streams.len())
            .finish()
    }
}

#[derive(Default)]
struct Open {
    next_id: u64,
    streams: HashMap<u64, Arc<dyn Stream>>,
}

impl Connections {
    pub fn new(server: &'static str, thread: &'static str, max: usize) -> Arc<Self> {
        Arc::new(Connections {
            server,
            thread,
            max,
            open: Mutex::default(),
            gone: Condvar::new(),
        })
    }

    /// True once fewer than the maximum are being served; false if none
    /// ended within `limit`. An accept loop calls this first, so clients
    /// past the maximum wait in the listen backlog.
    pub fn wait_for_room(&self, limit: Duration) -> bool {
        let open = lock(&self.open);
        let (open, _) = self
            .gone
            .wait_timeout_while(open, limit, |o| o.streams.len() >= self.max)
            .unwrap_or_else(|e| e.into_inner());
        open.streams.len() < self.max
    }

    /// Serves `stream` with `serve` on a thread of `kind`; its place is
    /// given back when `serve` returns, panics, or the thread never starts.
    pub fn spawn<S: Stream>(
        self: &Arc<Self>,
        kind: ThreadKind,
        stream: S,
        serve: impl FnOnce(&S) + Send + 'static,
    ) {
        let stream = Arc::new(stream);
        if let Some(place) = self.register(Arc::clone(&stream) as Arc<dyn Stream>, false) {
            self.start(kind, place, stream, serve);
        }
    }

    fn start<S: Stream>(
        &self,
        kind: ThreadKind,
        place: Place,
        stream: Arc<S>,
        serve: impl FnOnce(&S) + Send + 'static,
    ) {
        let spawned = crate::spawn(self.thread, kind, move || {
            let _place = place;
            serve(&stream);
        });
        if let Err(e) = spawned {
            // The closure, and with it the place, is dropped.
            tracing::warn!("{}: connection dropped, no thread: {e}", self.server);
        }
    }

    /// [`Connections::spawn`] if fewer than the maximum are being served;
    /// false (and `stream` dropped, closing it) if not. For servers that
    /// refuse a client past the maximum instead of keeping it waiting.
    pub fn try_spawn<S: Stream>(
        self: &Arc<Self>,
        kind: ThreadKind,
        stream: S,
        serve: impl FnOnce(&S) + Send + 'static,
    ) -> bool {
        let stream = Arc::new(stream);
        let Some(place) = self.register(Arc::clone(&stream) as Arc<dyn Stream>, true) else {
            return false;
        };
        self.start(kind, place, stream, serve);
        true
    }

    /// Connections being served now.
    pub fn len(&self) -> usize {
        lock(&self.open).streams.len()
    }

    /// True when none is being served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a place for `stream`; None if `bounded` and none is free.
    fn register(self: &Arc<Self>, stream: Arc<dyn Stream>, bounded: bool) -> Option<Place> {
        let mut open = lock(&self.open);
        if bounded && open.streams.len() >= self.max {
            tracing::warn!("{}: connection refused, {} open", self.server, self.max);
            return None;
        }
        open.next_id += 1;
        let id = open.next_id;
        open.streams.insert(id, stream);
        Some(Place {
            conns: Arc::clone(self),
            id,
        })
    }

    /// Stops every connection's reads and waits up to `grace` for their
    /// threads to finish the request in hand; then cuts off the ones still
    /// open and waits up to `grace` again.
    pub fn close_and_wait(&self, grace: Duration) {
        let mut open = lock(&self.open);
        for cut in [false, true] {
            for stream in open.streams.values() {
                if cut {
                    stream.cut_off();
                } else {
                    stream.stop_reading();
                }
            }
            open = self.wait_until_empty(open, Instant::now() + grace);
        }
        if !open.streams.is_empty() {
            let n = open.streams.len();
            tracing::warn!("{}: {n} connections still open at stop", self.server);
        }
    }

    fn wait_until_empty<'a>(
        &self,
        mut open: MutexGuard<'a, Open>,
        until: Instant,
    ) -> MutexGuard<'a, Open> {
        while !open.streams.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            open = self
                .gone
                .wait_timeout(open, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        open
    }
}

/// A connection's place in [`Connections`], given back on drop.
struct Place {
    conns: Arc<Connections>,
    id: u64,
}

impl Drop for Place {
    fn drop(&mut self) {
        lock(&self.conns.open).streams.remove(&self.id);
        self.conns.gone.notify_all();
    }
}

/// The set's lock; a panic elsewhere never leaves it unusable (the map
/// is consistent after every operation).
fn lock(open: &Mutex<Open>) -> MutexGuard<'_, Open> {
    open.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_come_back_when_connections_end_or_panic() {
        let conns = Connections::new("test", "test-conn", 2);
        let (a, _a_peer) = UnixStream::pair().unwrap();
        let (b, _b_peer) = UnixStream::pair().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        conns.spawn(ThreadKind::Api, a, move |_| {
            let _ = rx.recv();
        });
        conns.spawn(ThreadKind::Api, b, |_| panic!("a handler that panics"));
        assert!(
            conns.wait_for_room(Duration::from_secs(5)),
            "the panicking handler's place came back"
        );
        let (c, _c_peer) = UnixStream::pair().unwrap();
        conns.spawn(ThreadKind::Api, c, |s| {
            let mut buf = [0u8; 1];
            // Blocks until stop_reading ends it.
            let _ = std::io::Read::read(&mut &*s, &mut buf);
        });
        assert!(!conns.wait_for_room(Duration::from_millis(100)), "two open");
        drop(tx);
        let start = Instant::now();
        conns.close_and_wait(Duration::from_secs(5));
        assert!(conns.is_empty());
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "reads were stopped"
        );
        assert!(conns.wait_for_room(Duration::ZERO));
    }

    #[test]
    fn try_spawn_refuses_past_the_maximum_and_stop_cuts_off_a_writer() {
        let conns = Connections::new("test", "test-conn", 1);
        let (a, a_peer) = UnixStream::pair().unwrap();
        // A connection that ignores the end of its reads and keeps writing
        // to a peer that never reads: only cutting it off ends it.
        assert!(conns.try_spawn(ThreadKind::Api, a, |s| {
            let chunk = [0u8; 4096];
            while std::io::Write::write_all(&mut &*s, &chunk).is_ok() {}
        }));
        let (b, mut b_peer) = UnixStream::pair().unwrap();
        assert!(!conns.try_spawn(ThreadKind::Api, b, |_| unreachable!()));
        let mut byte = [0u8; 1];
        assert_eq!(
            std::io::Read::read(&mut b_peer, &mut byte).unwrap(),
            0,
            "the refused stream was closed"
        );
        assert_eq!(conns.len(), 1);
        conns.close_and_wait(Duration::from_millis(200));
        assert!(conns.is_empty(), "the writer was cut off");
        drop(a_peer);
    }
}
