//! Connections of the control-plane servers (the control API, metrics):
//! each served on a thread of its own, a bounded number at once, all of
//! them ended when the server stops, each request bounded in total time
//! ([`Deadline`]). A slow or stalled client then holds up only itself.
//! None of this is on the data path.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vspa_threads::ThreadKind;

/// A connected stream the server can cut off and time.
pub trait Stream: Send + Sync + 'static {
    /// Ends the stream's reads, so a thread waiting on them returns.
    fn stop_reading(&self);
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

/// Both socket types have the same calls under the same names.
macro_rules! stream {
    ($t:ty) => {
        impl Stream for $t {
            fn stop_reading(&self) {
                let _ = self.shutdown(Shutdown::Read);
            }
            fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                <$t>::set_read_timeout(self, t)
            }
            fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                <$t>::set_write_timeout(self, t)
            }
        }
    };
}
stream!(UnixStream);
stream!(TcpStream);

/// A connection whose request must arrive by a deadline: bounds the
/// request's total time, not only each read (a client sending a byte
/// every few seconds never trips a per-read timeout). Each write of the
/// answer gets the whole limit.
#[derive(Debug)]
pub struct Deadline<'a, S> {
    stream: &'a S,
    until: Instant,
}

impl<'a, S: Stream> Deadline<'a, S> {
    pub fn start(stream: &'a S, limit: Duration) -> io::Result<Self> {
        stream.set_write_timeout(Some(limit))?;
        Ok(Deadline {
            stream,
            until: Instant::now() + limit,
        })
    }
}

impl<S: Stream> Read for Deadline<'_, S>
where
    for<'b> &'b S: Read,
{
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&*self.stream).read(buf)
    }
}

impl<S> Write for Deadline<'_, S>
where
    for<'b> &'b S: Write,
{
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self.stream).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self.stream).flush()
    }
}

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
            .field("open", &vmbus::worker::lock(&self.open).streams.len())
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
        let open = vmbus::worker::lock(&self.open);
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
        let place = self.register(Arc::clone(&stream) as Arc<dyn Stream>);
        let spawned = vspa_threads::spawn(self.thread, kind, move || {
            let _place = place;
            serve(&stream);
        });
        if let Err(e) = spawned {
            // The closure, and with it the place, is dropped.
            tracing::warn!("{}: connection dropped, no thread: {e}", self.server);
        }
    }

    fn register(self: &Arc<Self>, stream: Arc<dyn Stream>) -> Place {
        let mut open = vmbus::worker::lock(&self.open);
        open.next_id += 1;
        let id = open.next_id;
        open.streams.insert(id, stream);
        Place {
            conns: Arc::clone(self),
            id,
        }
    }

    /// Stops every connection's reads and waits (up to `limit`) for their
    /// threads to finish the request in hand.
    pub fn close_and_wait(&self, limit: Duration) {
        let until = Instant::now() + limit;
        let mut open = vmbus::worker::lock(&self.open);
        for stream in open.streams.values() {
            stream.stop_reading();
        }
        while !open.streams.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let n = open.streams.len();
                tracing::warn!("{}: {n} connections still open at stop", self.server);
                return;
            }
            open = self
                .gone
                .wait_timeout(open, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A connection's place in [`Connections`], given back on drop.
struct Place {
    conns: Arc<Connections>,
    id: u64,
}

impl Drop for Place {
    fn drop(&mut self) {
        vmbus::worker::lock(&self.conns.open)
            .streams
            .remove(&self.id);
        self.conns.gone.notify_all();
    }
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
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "reads were stopped"
        );
        assert!(conns.wait_for_room(Duration::ZERO));
    }
}
